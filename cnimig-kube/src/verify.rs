//! [`Verifier`] on the Kubernetes API.

use async_trait::async_trait;
use cnimig_core::model::NodeName;
use cnimig_core::ports::{PortError, Verification, Verifier};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};

use crate::error::{api_code, port_error};
use crate::{KubeCluster, convert, in_cidrs};

fn endpoints_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cilium.io", "v2", "CiliumEndpoint"),
        "ciliumendpoints",
    )
}

#[async_trait]
impl Verifier for KubeCluster {
    /// Every pod on the node that uses the pod network (not hostNetwork, not finished, not a
    /// mirror pod, not terminating) has an IP inside Cilium's cluster pool, a `CiliumEndpoint`
    /// of the same name in its namespace, and is Ready. Cross-node connectivity is
    /// [`verify_cluster`](Verifier::verify_cluster)'s job.
    ///
    /// Calls: one LIST of the node's pods (field selector; from the node's pod watch while the
    /// adapter holds the run lock) and one GET of a `CiliumEndpoint` (`cilium.io/v2`) per pod
    /// whose IP is already in the pool.
    ///
    /// # RBAC
    /// `list pods`, `get ciliumendpoints`, `get configmaps` (`cilium-config`, once).
    ///
    /// # Errors
    /// When the API cannot be read (not when a pod is wrong).
    async fn verify_node(&self, node: &NodeName) -> Result<Verification, PortError> {
        let cidrs = self.cilium_cidrs().await?;
        if cidrs.is_empty() {
            return Ok(Verification::Unhealthy(vec![format!(
                "{}/cilium-config has no cluster-pool-ipv4-cidr: Cilium is not installed in cluster-pool mode",
                self.inner.opts.cilium_namespace
            )]));
        }
        let pods = self.pods_on(node).await?;
        let mut problems = Vec::new();
        for p in pods.iter().filter_map(|p| convert::pod(p, &cidrs)) {
            if !p.uses_pod_network() || p.mirror || p.terminating {
                continue;
            }
            let Some(ip) = p.ip else {
                problems.push(format!("pod {} on {node} has no IP yet", p.pod));
                continue;
            };
            if !in_cidrs(ip, &cidrs) {
                problems.push(format!(
                    "pod {} on {node} has {ip}, outside Cilium's pool: still on Calico",
                    p.pod
                ));
                continue;
            }
            let ceps: Api<DynamicObject> = Api::namespaced_with(
                self.inner.client.clone(),
                &p.pod.namespace,
                &endpoints_resource(),
            );
            match ceps.get_opt(&p.pod.name).await {
                Ok(Some(_)) => {}
                Ok(None) => problems.push(format!(
                    "pod {} on {node} has no CiliumEndpoint: Cilium does not manage it",
                    p.pod
                )),
                Err(e) if api_code(&e) == Some(404) => problems.push(format!(
                    "the CiliumEndpoint CRD is missing, so pod {} cannot be Cilium-managed",
                    p.pod
                )),
                Err(e) => {
                    return Err(port_error("get", format!("ciliumendpoint {}", p.pod), e));
                }
            }
            if !p.ready {
                problems.push(format!("pod {} on {node} is not Ready", p.pod));
            }
        }
        Ok(if problems.is_empty() {
            Verification::Healthy
        } else {
            Verification::Unhealthy(problems)
        })
    }

    /// The minimal cluster check until a Goldpinger verifier exists: every node is Ready.
    /// It does not test pod-to-pod connectivity. One LIST of nodes; from the node watch while the
    /// adapter holds the run lock.
    ///
    /// # RBAC
    /// `list nodes` (and `watch nodes` while holding the run lock).
    ///
    /// # Errors
    /// When the nodes cannot be listed.
    async fn verify_cluster(&self) -> Result<Verification, PortError> {
        let nodes = match self.cached_nodes().await? {
            Some(n) => n,
            None => {
                self.nodes()
                    .list(&self.node_list_params())
                    .await
                    .map_err(|e| port_error("list", "nodes", e))?
                    .items
            }
        };
        let problems: Vec<String> = nodes
            .iter()
            .filter_map(convert::node)
            .filter(|n| !n.ready)
            .map(|n| format!("node {} is not Ready", n.name))
            .collect();
        Ok(if problems.is_empty() {
            Verification::Healthy
        } else {
            Verification::Unhealthy(problems)
        })
    }
}
