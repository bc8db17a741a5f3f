//! Answers for cnimig's per-node probe pods (label `cnimig.io/helper=probe`,
//! `cnimig_kube::probe`), which cannot run their script on an emulated node.
//!
//! Once the emulator has started a probe pod (it got an address from Calico's or Cilium's block
//! of its node, as any pod), [`respond`] finishes it as the script would: each check computed
//! from the shared reachability model ([`cnimig_sim::pairs`]) and a [`Firewall`](cnimig_sim::pairs::Firewall):
//! - `api`: the pod to the API server (a host endpoint on the pseudo-node `api-server`);
//! - `dns`: the pod to any Ready cluster DNS pod (`k8s-app=kube-dns`); none Ready is a failure;
//! - `peer`: the pod to the pod whose address is in the probe's `PEER_IP` (skipped without it).
//!
//! The result goes where the real one would: the container's termination message (one
//! `CHECK=ok|fail: why` line each), exit code 0 or 1, phase `Succeeded` or `Failed`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use cnimig_core::model::CalicoFacts;
use cnimig_sim::pairs::{Endpoint, Model, Net};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::emulator::HELPER_LABEL;
use crate::goldpinger::{SharedFirewall, is_ready};

/// The pseudo-node the API server runs on, for [`Firewall`](cnimig_sim::pairs::Firewall) node
/// pairs.
pub const API_SERVER_NODE: &str = "api-server";

/// What the responder needs.
#[derive(Debug, Clone)]
pub struct ProbeEmuConfig {
    /// Namespace of `cilium-config`.
    pub cilium_namespace: String,
    /// Calico's facts for the model.
    pub calico: CalicoFacts,
    /// Breaks outside both CNIs (share it with the Goldpinger endpoint).
    pub firewall: SharedFirewall,
    /// Label selector of cluster DNS pods.
    pub dns_selector: String,
    /// Poll interval.
    pub tick: Duration,
    /// Only probe pods on these nodes (the emulator's own), or on every node when `None`: two
    /// responders on one control plane must not answer each other's probes.
    pub nodes: Option<Vec<String>>,
}

impl ProbeEmuConfig {
    /// Cilium in `kube-system`, Calico autodetecting by InternalIP, the given firewall.
    #[must_use]
    pub fn new(firewall: SharedFirewall) -> Self {
        ProbeEmuConfig {
            cilium_namespace: "kube-system".into(),
            calico: CalicoFacts {
                autodetection: cnimig_core::model::Autodetection::KubernetesInternalIp,
                ..CalicoFacts::default()
            },
            firewall,
            dns_selector: "k8s-app=kube-dns".into(),
            tick: Duration::from_millis(200),
            nodes: None,
        }
    }
}

/// A running responder; stops when dropped.
#[derive(Debug)]
pub struct ProbeEmu {
    task: JoinHandle<()>,
}

impl Drop for ProbeEmu {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the responder.
pub fn respond(client: Client, cfg: ProbeEmuConfig) -> ProbeEmu {
    let cfg = Arc::new(cfg);
    let task = tokio::spawn(async move {
        loop {
            if let Err(e) = tick(&client, &cfg).await {
                tracing::warn!("probe responder: {e:#}");
            }
            tokio::time::sleep(cfg.tick).await;
        }
    });
    ProbeEmu { task }
}

fn endpoint<'a>(p: &'a Pod, pool: &[Ipv4Net]) -> Option<Endpoint<'a>> {
    let spec = p.spec.as_ref()?;
    let node = spec.node_name.as_deref()?;
    let net = if spec.host_network.unwrap_or(false) {
        Net::Host
    } else {
        let ip: std::net::Ipv4Addr = p.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
        if pool.iter().any(|c| c.contains(&ip)) {
            Net::Cilium
        } else {
            Net::Calico
        }
    };
    Some(Endpoint { node, net })
}

fn line(key: &str, r: Result<(), String>) -> (String, bool) {
    match r {
        Ok(()) => (format!("{key}=ok"), true),
        Err(why) => (format!("{key}=fail: {why}"), false),
    }
}

async fn tick(client: &Client, cfg: &ProbeEmuConfig) -> Result<()> {
    let all: Api<Pod> = Api::all(client.clone());
    let probes = all
        .list(&ListParams::default().labels(&format!("{HELPER_LABEL}=probe")))
        .await?;
    let waiting: Vec<&Pod> = probes
        .items
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && cfg.nodes.as_ref().is_none_or(|ns| {
                    p.spec
                        .as_ref()
                        .and_then(|s| s.node_name.as_ref())
                        .is_some_and(|n| ns.contains(n))
                })
                && p.status
                    .as_ref()
                    .is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some())
        })
        .collect();
    if waiting.is_empty() {
        return Ok(());
    }
    let live = crate::emulator::cilium_config(client, &cfg.cilium_namespace).await?;
    let pool: Vec<Ipv4Net> = live
        .as_ref()
        .map(crate::cni::cilium_pool)
        .unwrap_or_default();
    let pods = all.list(&ListParams::default()).await?.items;
    let firewall = cfg
        .firewall
        .lock()
        .map_err(|_| anyhow::anyhow!("firewall lock poisoned"))?
        .clone();
    let model = Model {
        cilium_live: live.as_ref(),
        calico: &cfg.calico,
        firewall: &firewall,
    };
    let dns_pods = all
        .list(&ListParams::default().labels(&cfg.dns_selector))
        .await?
        .items;
    for probe in waiting {
        let Some(me) = endpoint(probe, &pool) else {
            continue;
        };
        let api_server = Endpoint {
            node: API_SERVER_NODE,
            net: Net::Host,
        };
        let mut lines = vec![line("api", model.reach(me, api_server))];
        let dns: Vec<Endpoint<'_>> = dns_pods
            .iter()
            .filter(|p| is_ready(p) && p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| endpoint(p, &pool))
            .collect();
        let dns_result = if dns.is_empty() {
            Err("no cluster DNS pod is Ready".to_string())
        } else {
            dns.iter()
                .map(|d| model.reach(me, *d))
                .find(Result::is_ok)
                .unwrap_or_else(|| {
                    model
                        .reach(me, dns[0])
                        .map_err(|why| format!("no DNS pod answers: {why}"))
                })
        };
        lines.push(line("dns", dns_result));
        let peer_ip = probe
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.env.as_ref())
            .and_then(|env| env.iter().find(|e| e.name == "PEER_IP"))
            .and_then(|e| e.value.clone());
        match peer_ip {
            None => lines.push(("peer=skipped".into(), true)),
            Some(ip) => {
                let target = pods.iter().find(|p| {
                    p.status.as_ref().and_then(|s| s.pod_ip.as_deref()) == Some(ip.as_str())
                        && p.metadata.deletion_timestamp.is_none()
                });
                let r = match target.and_then(|t| endpoint(t, &pool)) {
                    Some(t) => model.reach(me, t),
                    None => Err(format!("no reply from {ip} (no such pod)")),
                };
                lines.push(line("peer", r));
            }
        }
        let ok = lines.iter().all(|(_, ok)| *ok);
        let message: String = lines.iter().map(|(l, _)| format!("{l}\n")).collect();
        let image = probe
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.image.clone())
            .unwrap_or_default();
        let status = json!({"status": {
            "phase": if ok { "Succeeded" } else { "Failed" },
            "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
            "containerStatuses": [{
                "name": "probe", "ready": false, "restartCount": 0, "image": image, "imageID": "",
                "state": {"terminated": {
                    "exitCode": if ok { 0 } else { 1 },
                    "reason": if ok { "Completed" } else { "Error" },
                    "message": message,
                }},
            }],
        }});
        let api: Api<Pod> = Api::namespaced(client.clone(), &probe.namespace().unwrap_or_default());
        api.patch_status(
            &probe.name_any(),
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await?;
    }
    Ok(())
}
