//! The per-node probe: [`ProbeVerifier`] wraps another [`Verifier`] and, once its node check
//! passes, runs a short-lived pod pinned to the just-migrated node that must get an address in
//! Cilium's pool, reach the API server, resolve cluster DNS and reach a pod on a node still on
//! Calico ([`cnimig_core::verify_probe`] has the script and the judging). The pod is removed
//! afterwards, pass or fail.
//!
//! Pod `cnimig-probe-<node>` in [`KubeOptions::system_namespace`](crate::KubeOptions), label
//! `cnimig.io/helper=probe`, `nodeName` set (no scheduler, so the cordon does not matter),
//! tolerating every taint, `restartPolicy: Never`, no privileges, all capabilities dropped except
//! `NET_RAW` (for `ping`).

use std::net::Ipv4Addr;
use std::time::Duration;

use async_trait::async_trait;
use cnimig_core::model::NodeName;
use cnimig_core::ports::{PortError, Verification, Verifier};
use cnimig_core::verify_probe::{PROBE_SCRIPT, ProbeReport, probe_problems};
use k8s_openapi::api::core::v1 as core;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

use crate::error::port_error;
use crate::{KubeCluster, RESTORE_HELPER_LABEL, in_cidrs};

/// The label value of probe pods (label key [`RESTORE_HELPER_LABEL`], `cnimig.io/helper`).
pub const PROBE_LABEL_VALUE: &str = "probe";

/// How the probe runs.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Image with busybox's `sh`, `nc`, `nslookup`, `ping` (`busybox:1.36`).
    pub image: String,
    /// The name to resolve (`kubernetes.default.svc.cluster.local`).
    pub dns_name: String,
    /// How long the probe may take, from creation to its end.
    pub timeout: Duration,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            image: "busybox:1.36".into(),
            dns_name: "kubernetes.default.svc.cluster.local".into(),
            timeout: Duration::from_secs(60),
        }
    }
}

/// The probe pod's name for `node` (at most 63 characters).
#[must_use]
pub fn probe_pod_name(node: &NodeName) -> String {
    let mut n = format!("cnimig-probe-{node}");
    n.truncate(63);
    n.trim_end_matches(['-', '.']).to_string()
}

/// The probe pod for `node`; `peer_ip` is the pod on Calico it must reach.
#[must_use]
pub fn probe_pod(
    node: &NodeName,
    namespace: &str,
    peer_ip: Option<Ipv4Addr>,
    o: &ProbeOptions,
) -> serde_json::Value {
    let mut env = vec![json!({"name": "DNS_NAME", "value": o.dns_name})];
    if let Some(ip) = peer_ip {
        env.push(json!({"name": "PEER_IP", "value": ip.to_string()}));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": probe_pod_name(node),
            "namespace": namespace,
            "labels": {RESTORE_HELPER_LABEL: PROBE_LABEL_VALUE},
        },
        "spec": {
            "nodeName": node.as_str(),
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "tolerations": [{"operator": "Exists"}],
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "probe",
                "image": o.image,
                "command": ["sh", "-c", PROBE_SCRIPT],
                "env": env,
                "terminationMessagePolicy": "File",
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": {"drop": ["ALL"], "add": ["NET_RAW"]},
                },
            }],
        },
    })
}

/// A [`Verifier`] that adds the per-node probe to `inner`'s node check; cluster checks are
/// `inner`'s.
#[derive(Debug, Clone)]
pub struct ProbeVerifier<V> {
    inner: V,
    cluster: KubeCluster,
    opts: ProbeOptions,
}

impl<V: Verifier> ProbeVerifier<V> {
    /// `inner` plus the probe, run through `cluster`.
    pub fn new(inner: V, cluster: KubeCluster, opts: ProbeOptions) -> Self {
        ProbeVerifier {
            inner,
            cluster,
            opts,
        }
    }

    /// A Running, Ready pod-network pod on another node whose address is outside Cilium's pool
    /// (so on Calico), if any.
    async fn calico_peer(
        &self,
        node: &NodeName,
        cidrs: &[ipnet::Ipv4Net],
    ) -> Result<Option<Ipv4Addr>, PortError> {
        let pods: Api<core::Pod> = Api::all(self.cluster.client().clone());
        let lp = ListParams::default().fields("status.phase=Running");
        let list = pods
            .list(&lp)
            .await
            .map_err(|e| port_error("list", "running pods", e))?;
        Ok(list.items.iter().find_map(|p| {
            let spec = p.spec.as_ref()?;
            if spec.host_network.unwrap_or(false)
                || spec.node_name.as_deref() == Some(node.as_str())
                || p.metadata.deletion_timestamp.is_some()
            {
                return None;
            }
            let status = p.status.as_ref()?;
            let ready = status
                .conditions
                .as_ref()?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let ip: Ipv4Addr = status.pod_ip.as_deref()?.parse().ok()?;
            (ready && !in_cidrs(ip, cidrs)).then_some(ip)
        }))
    }

    async fn delete_probe(&self, api: &Api<core::Pod>, name: &str) -> Result<(), PortError> {
        crate::cilium::delete_pod_and_wait(api, name, "probe pod").await
    }

    /// Runs the probe on `node`: problems found (empty = passed).
    ///
    /// # RBAC
    /// `list pods` (all namespaces), `create`, `get`, `delete pods` in the system namespace.
    ///
    /// # Errors
    /// When the pod cannot be created, read or removed (not when a check fails).
    pub async fn probe(&self, node: &NodeName) -> Result<Vec<String>, PortError> {
        let cidrs = self.cluster.cilium_cidrs().await?;
        let peer = self.calico_peer(node, &cidrs).await?;
        let ns = &self.cluster.options().system_namespace;
        let api: Api<core::Pod> = Api::namespaced(self.cluster.client().clone(), ns);
        let name = probe_pod_name(node);
        self.delete_probe(&api, &name).await?;
        let pod: core::Pod = serde_json::from_value(probe_pod(node, ns, peer, &self.opts))
            .map_err(|e| PortError::Invalid {
                what: format!("build probe pod {name}"),
                detail: e.to_string(),
            })?;
        api.create(&PostParams::default(), &pod)
            .await
            .map_err(|e| port_error("create", format!("pod {ns}/{name}"), e))?;
        let waited = self.wait(&api, &name).await;
        let deleted = self.delete_probe(&api, &name).await;
        let finished = waited?;
        deleted?;
        let Some(p) = finished else {
            return Ok(vec![format!(
                "probe on node {node}: pod {ns}/{name} did not finish within {:?}",
                self.opts.timeout
            )]);
        };
        let status = p.status.unwrap_or_default();
        let ip = status.pod_ip.as_deref().and_then(|s| s.parse().ok());
        let msg = status
            .container_statuses
            .unwrap_or_default()
            .into_iter()
            .find_map(|c| c.state?.terminated?.message)
            .unwrap_or_default();
        Ok(probe_problems(
            node.as_str(),
            ip,
            &cidrs,
            &ProbeReport::parse(&msg),
            peer.is_some(),
        ))
    }

    /// The pod once Succeeded or Failed, `None` after the timeout.
    async fn wait(&self, api: &Api<core::Pod>, name: &str) -> Result<Option<core::Pod>, PortError> {
        let deadline = tokio::time::Instant::now() + self.opts.timeout;
        loop {
            let pod = api
                .get_opt(name)
                .await
                .map_err(|e| port_error("get", format!("pod {name}"), e))?;
            let Some(pod) = pod else {
                return Err(PortError::Unavailable {
                    what: format!("probe pod {name}"),
                    detail: "it disappeared before finishing".into(),
                });
            };
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded" | "Failed")) {
                return Ok(Some(pod));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[async_trait]
impl<V: Verifier> Verifier for ProbeVerifier<V> {
    /// `inner`'s node check, then (when it passed) the probe.
    async fn verify_node(&self, node: &NodeName) -> Result<Verification, PortError> {
        match self.inner.verify_node(node).await? {
            Verification::Healthy => {}
            unhealthy => return Ok(unhealthy),
        }
        let p = self.probe(node).await?;
        Ok(if p.is_empty() {
            Verification::Healthy
        } else {
            Verification::Unhealthy(p)
        })
    }

    /// `inner`'s cluster check.
    async fn verify_cluster(&self) -> Result<Verification, PortError> {
        self.inner.verify_cluster().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_pod_is_pinned_and_unprivileged() {
        let node = NodeName::new("n-01").unwrap();
        let p = probe_pod(
            &node,
            "kube-system",
            Some(Ipv4Addr::new(10, 42, 1, 2)),
            &ProbeOptions::default(),
        );
        assert_eq!(p["spec"]["nodeName"], "n-01");
        assert_eq!(p["metadata"]["name"], "cnimig-probe-n-01");
        assert_eq!(p["spec"]["containers"][0]["env"][1]["value"], "10.42.1.2");
        assert_eq!(
            p["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"],
            false
        );
        let _: core::Pod = serde_json::from_value(p).unwrap();
    }

    #[test]
    fn long_names_are_cut() {
        // A valid node name (each dot-separated part at most 63) longer than a pod name may be.
        let node = NodeName::new(format!("{}.{}", "x".repeat(60), "y".repeat(30))).unwrap();
        assert_eq!(probe_pod_name(&node).len(), 63);
    }
}
