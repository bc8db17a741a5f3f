//! A Goldpinger-compatible HTTP endpoint for the emulated nodes.
//!
//! Real Goldpinger pods call each other's `/ping` through pod IPs; the emulated pods' addresses
//! go nowhere, so [`serve`] answers `GET /check_all` (and `/healthz`) itself, in Goldpinger's
//! `CheckAllResults` shape ([`cnimig_core::verify::CheckAll`]), computing every pair's result
//! from the shared reachability model ([`cnimig_sim::pairs`]) and the live API: the Goldpinger
//! pods that are Running and Ready (label selector), their nodes' InternalIPs, Cilium's live
//! `cilium-config` (a pod whose IP is in `cluster-pool-ipv4-cidr` is on Cilium, a hostNetwork
//! pod on the host, any other on Calico) and a [`Firewall`] a test can change while it runs.
//!
//! It listens on a local TCP port (plain HTTP/1.x, one request per connection). The emulated
//! pods' IPs are not routable, so a verifier reaches this endpoint by URL
//! (`cnimig_kube::goldpinger::GoldpingerSource::Url`), as it would reach a real Goldpinger
//! through `kubectl port-forward`; or, listening on a routable address (the API server's service
//! proxy refuses loopback) behind a Service whose Endpoints name a pod holding that address,
//! through the service proxy.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use cnimig_core::model::CalicoFacts;
use cnimig_core::verify::{CheckAll, CheckResults, Host, PodResult, SourceResult};
use cnimig_sim::pairs::{Endpoint, Firewall, Model, Net};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A [`Firewall`] shared with a running endpoint.
pub type SharedFirewall = Arc<Mutex<Firewall>>;

/// Where the endpoint finds Goldpinger's pods and Cilium's config.
#[derive(Debug, Clone)]
pub struct GoldpingerEmuConfig {
    /// Namespace of the Goldpinger pods.
    pub namespace: String,
    /// Their label selector (`app=goldpinger`).
    pub selector: String,
    /// Namespace of `cilium-config`.
    pub cilium_namespace: String,
    /// Calico's facts for the model (no VXLAN pool by default, as the emulator's Calico).
    pub calico: CalicoFacts,
    /// Breaks outside both CNIs.
    pub firewall: SharedFirewall,
    /// Where to listen (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
}

impl GoldpingerEmuConfig {
    /// Goldpinger in `namespace` with label `app=goldpinger`, Cilium in `kube-system`, no
    /// firewall, listening on a free loopback port.
    #[must_use]
    pub fn new(namespace: &str) -> Self {
        GoldpingerEmuConfig {
            namespace: namespace.into(),
            selector: "app=goldpinger".into(),
            cilium_namespace: "kube-system".into(),
            calico: CalicoFacts {
                autodetection: cnimig_core::model::Autodetection::KubernetesInternalIp,
                ..CalicoFacts::default()
            },
            firewall: SharedFirewall::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

/// A running endpoint; stops when dropped.
#[derive(Debug)]
pub struct GoldpingerEmu {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The firewall it applies (change it to inject a break).
    pub firewall: SharedFirewall,
    task: JoinHandle<()>,
}

impl GoldpingerEmu {
    /// The `/check_all` URL.
    #[must_use]
    pub fn check_all_url(&self) -> String {
        format!("http://{}/check_all", self.addr)
    }
}

impl Drop for GoldpingerEmu {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the endpoint.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(client: Client, cfg: GoldpingerEmuConfig) -> Result<GoldpingerEmu> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("bind {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let firewall = cfg.firewall.clone();
    let cfg = Arc::new(cfg);
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (client, cfg) = (client.clone(), cfg.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = match path {
                    "/check_all" => match check_all(&client, &cfg).await {
                        Ok(r) => ("200 OK", serde_json::to_string(&r).unwrap_or_default()),
                        Err(e) => (
                            "500 Internal Server Error",
                            serde_json::json!({"error": format!("{e:#}")}).to_string(),
                        ),
                    },
                    "/healthz" => ("200 OK", r#"{"OK":true}"#.to_string()),
                    _ => ("404 Not Found", "{}".to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(GoldpingerEmu {
        addr,
        firewall,
        task,
    })
}

pub(crate) fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub(crate) fn internal_ip(n: &Node) -> Option<String> {
    n.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.clone())
}

/// One `/check_all` answer from the live API and the model.
async fn check_all(client: &Client, cfg: &GoldpingerEmuConfig) -> Result<CheckAll> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &cfg.namespace);
    let pods = pods
        .list(&ListParams::default().labels(&cfg.selector))
        .await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let node_ips: BTreeMap<String, String> = nodes
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|n| Some((n.name_any(), internal_ip(n)?)))
        .collect();
    let live = crate::emulator::cilium_config(client, &cfg.cilium_namespace).await?;
    let pool: Vec<Ipv4Net> = live
        .as_ref()
        .map(crate::cni::cilium_pool)
        .unwrap_or_default();
    struct Gp {
        name: String,
        node: String,
        net: Net,
        host_ip: Option<String>,
        pod_ip: Option<String>,
    }
    let mut gps = Vec::new();
    for p in &pods.items {
        let running = p
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|ph| ph == "Running");
        if !running || !is_ready(p) || p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        let pod_ip = p.status.as_ref().and_then(|s| s.pod_ip.clone());
        let host = p
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let net = if host {
            Net::Host
        } else if pod_ip
            .as_ref()
            .and_then(|ip| ip.parse::<std::net::Ipv4Addr>().ok())
            .is_some_and(|ip| pool.iter().any(|c| c.contains(&ip)))
        {
            Net::Cilium
        } else {
            Net::Calico
        };
        gps.push(Gp {
            name: p.name_any(),
            host_ip: node_ips.get(&node).cloned(),
            node,
            net,
            pod_ip,
        });
    }
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
    let mut all_ok = true;
    let mut responses = BTreeMap::new();
    for from in &gps {
        let mut pod_results = BTreeMap::new();
        for to in &gps {
            let r = model.reach(
                Endpoint {
                    node: &from.node,
                    net: from.net,
                },
                Endpoint {
                    node: &to.node,
                    net: to.net,
                },
            );
            all_ok &= r.is_ok();
            pod_results.insert(
                to.name.clone(),
                PodResult {
                    ok: r.is_ok(),
                    pod_ip: to.pod_ip.clone(),
                    host_ip: to.host_ip.clone(),
                    error: r.err().map(|why| {
                        format!(
                            "Get \"http://{}:8080/ping\": context deadline exceeded ({why})",
                            to.pod_ip.as_deref().unwrap_or("?")
                        )
                    }),
                },
            );
        }
        responses.insert(
            from.name.clone(),
            SourceResult {
                ok: true,
                host_ip: from.host_ip.clone(),
                pod_ip: from.pod_ip.clone(),
                response: Some(CheckResults { pod_results }),
                error: None,
            },
        );
    }
    Ok(CheckAll {
        ok: all_ok,
        hosts: gps
            .iter()
            .map(|g| Host {
                pod_name: g.name.clone(),
                host_ip: g.host_ip.clone(),
                pod_ip: g.pod_ip.clone(),
            })
            .collect(),
        responses,
    })
}
