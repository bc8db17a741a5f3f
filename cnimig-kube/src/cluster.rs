//! [`Cluster`] on the Kubernetes API: nodes, pods, eviction, disruption budgets.

use std::collections::BTreeMap;

use async_trait::async_trait;
use cnimig_core::model::{NodeName, Pdb, PodPhase, PodRef, Resources};
use cnimig_core::ports::{
    BudgetView, Cluster, EvictOutcome, Inventory, NodeView, PodBudgets, PortError,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::api::policy::v1::{Eviction, PodDisruptionBudget};
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::json;

use crate::error::{port_error, retry_after};
use crate::{KubeCluster, convert};

/// The `StatusCause` type of a budget refusal (`policyv1.DisruptionBudgetCause`).
const DISRUPTION_BUDGET_CAUSE: &str = "DisruptionBudget";

/// The budget name in a `DisruptionBudget` cause message: the API server writes
/// "The disruption budget NAME needs N healthy pods…" or "The disruption budget NAME is still
/// being processed by the server."
fn budget_name_in(message: &str) -> Option<&str> {
    let rest = message.split("disruption budget ").nth(1)?;
    let name = rest.split_whitespace().next()?;
    (!name.is_empty()).then_some(name)
}

impl KubeCluster {
    async fn list_pdbs(
        &self,
        namespace: Option<&str>,
    ) -> Result<Vec<PodDisruptionBudget>, PortError> {
        let api: Api<PodDisruptionBudget> = match namespace {
            Some(ns) => Api::namespaced(self.inner.client.clone(), ns),
            None => Api::all(self.inner.client.clone()),
        };
        let what = namespace.map_or_else(
            || "poddisruptionbudgets".to_string(),
            |ns| format!("poddisruptionbudgets in {ns}"),
        );
        api.list(&ListParams::default())
            .await
            .map(|l| l.items)
            .map_err(|e| port_error("list", what, e))
    }

    /// The budgets (`namespace/name`, sorted) whose selectors match the pod's labels.
    ///
    /// # RBAC
    /// `get pods`, `list poddisruptionbudgets`.
    async fn covering_pdbs(&self, pod: &PodRef) -> Result<Vec<String>, PortError> {
        let pods: Api<core::Pod> = Api::namespaced(self.inner.client.clone(), &pod.namespace);
        let Some(p) = pods
            .get_opt(&pod.name)
            .await
            .map_err(|e| port_error("get", format!("pod {pod}"), e))?
        else {
            return Ok(Vec::new());
        };
        let Some(model) = convert::pod(&p, &[]) else {
            return Ok(Vec::new());
        };
        let mut out: Vec<String> = self
            .list_pdbs(Some(&pod.namespace))
            .await?
            .iter()
            .filter_map(convert::pdb)
            .filter(|b| b.covers(&model))
            .map(|b| b.key())
            .collect();
        out.sort();
        Ok(out)
    }

    async fn service_cidr(&self) -> Result<ipnet::Ipv4Net, PortError> {
        let api: Api<ServiceCIDR> = Api::all(self.inner.client.clone());
        let found = match api.get_opt("kubernetes").await {
            Ok(s) => s
                .and_then(|s| s.spec)
                .and_then(|s| s.cidrs)
                .unwrap_or_default()
                .iter()
                .find_map(|c| c.parse::<ipnet::Ipv4Net>().ok()),
            // Older clusters have no ServiceCIDR API; fall back to the option. A 403 falls
            // back only when the option is set; otherwise it is reported as the missing grant.
            Err(e) if crate::error::api_code(&e) == Some(404) => None,
            Err(e)
                if crate::error::api_code(&e) == Some(403)
                    && self.inner.opts.service_cidr.is_some() =>
            {
                None
            }
            Err(e) => return Err(port_error("get", "servicecidr kubernetes", e)),
        };
        found
            .or(self.inner.opts.service_cidr)
            .ok_or_else(|| PortError::Invalid {
                what: "find the service CIDR".into(),
                detail:
                    "the cluster has no ServiceCIDR named kubernetes; set KubeOptions::service_cidr"
                        .into(),
            })
    }

    async fn cilium_agent_requests(&self) -> Result<Resources, PortError> {
        let api: Api<DaemonSet> =
            Api::namespaced(self.inner.client.clone(), &self.inner.opts.cilium_namespace);
        let ds = api
            .get_opt("cilium")
            .await
            .map_err(|e| port_error("get", "daemonset cilium", e))?;
        let Some(ds) = ds else {
            return Ok(Resources::default());
        };
        let containers = ds
            .spec
            .and_then(|s| s.template.spec)
            .map(|s| s.containers)
            .unwrap_or_default();
        let agent = containers
            .iter()
            .find(|c| c.name == "cilium-agent")
            .or(containers.first());
        let requests = agent
            .and_then(|c| c.resources.as_ref())
            .and_then(|r| r.requests.as_ref());
        Ok(Resources {
            cpu_millis: requests
                .and_then(|r| r.get("cpu"))
                .and_then(|q| convert::cpu_millis(&q.0))
                .unwrap_or(0),
            memory_bytes: requests
                .and_then(|r| r.get("memory"))
                .and_then(|q| convert::memory_bytes(&q.0))
                .unwrap_or(0),
        })
    }

    async fn patch_node(
        &self,
        node: &NodeName,
        verb_what: &str,
        body: serde_json::Value,
    ) -> Result<(), PortError> {
        let n = self
            .nodes()
            .patch(node.as_str(), &PatchParams::default(), &Patch::Merge(&body))
            .await
            .map_err(|e| port_error("patch", format!("node {node} ({verb_what})"), e))?;
        self.inner.caches.node_written(n);
        Ok(())
    }
}

/// Why this adapter cannot observe a real node's `AgentReady` step, and what to do meanwhile
/// (preflight rule `node-observability`).
fn unobservable_why() -> String {
    format!(
        "This version of cnimig-kube reads both from annotations only its emulator writes ({} on \
         the agent pod, {} on the node); reading them on a real node is not built yet: migrate \
         these nodes with Cilium's per-node procedure meanwhile",
        crate::AGENT_CONFIG_ANNOTATION,
        crate::CNI_DIR_ANNOTATION
    )
}

#[async_trait]
impl Cluster for KubeCluster {
    /// Nodes, pods, budgets, the service CIDR (the `ServiceCIDR` named `kubernetes`, else
    /// [`KubeOptions::service_cidr`](crate::KubeOptions::service_cidr)), whether Goldpinger runs
    /// (a pod labelled `app=goldpinger` or `app.kubernetes.io/name=goldpinger`), and the Cilium
    /// agent's requests (container `cilium-agent` of DaemonSet `cilium`, zero when absent). Nodes
    /// without the emulator's [`CNI_DIR_ANNOTATION`](crate::CNI_DIR_ANNOTATION) are
    /// `unobservable` (real nodes: see the crate's "Emulator contracts").
    ///
    /// # RBAC
    /// `list nodes`, `list pods`, `list poddisruptionbudgets`, `get configmaps`,
    /// `get servicecidrs`, `get daemonsets`.
    ///
    /// # Errors
    /// Any read failure; [`PortError::Invalid`] when the service CIDR cannot be found.
    async fn inventory(&self) -> Result<Inventory, PortError> {
        let nodes = self
            .nodes()
            .list(&self.node_list_params())
            .await
            .map_err(|e| port_error("list", "nodes", e))?
            .items;
        let cidrs = self.cilium_cidrs().await?;
        let pods_api: Api<core::Pod> = Api::all(self.inner.client.clone());
        let pods = pods_api
            .list(&ListParams::default())
            .await
            .map_err(|e| port_error("list", "pods", e))?
            .items;
        self.inner
            .caches
            .set_one_pod_watch(pods.len() <= self.inner.opts.one_pod_watch_max_pods);
        let pods = Self::model_pods(&pods, &cidrs);
        let pdbs: Vec<Pdb> = self
            .list_pdbs(None)
            .await?
            .iter()
            .filter_map(convert::pdb)
            .collect();
        let mut requested: BTreeMap<&NodeName, Resources> = BTreeMap::new();
        for p in pods
            .iter()
            .filter(|p| p.uses_pod_network() || p.host_network)
        {
            if let Some(n) = &p.node {
                let r = requested.entry(n).or_default();
                *r = r.plus(p.requests);
            }
        }
        // A node without the emulator's CNI-directory annotation is a real one: see
        // `unobservable_why`.
        let why = unobservable_why();
        let unobservable = nodes
            .iter()
            .filter(|n| {
                !n.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(crate::CNI_DIR_ANNOTATION))
            })
            .filter_map(|n| n.metadata.name.as_deref())
            .filter_map(|n| NodeName::new(n).ok())
            .map(|n| (n, why.clone()))
            .collect();
        let nodes = nodes
            .iter()
            .filter_map(convert::node)
            .map(|mut n| {
                n.requested = requested.get(&n.name).copied().unwrap_or_default();
                n
            })
            .collect();
        let connectivity_checker = pods.iter().any(|p| {
            p.labels.get("app").map(String::as_str) == Some("goldpinger")
                || p.labels.get("app.kubernetes.io/name").map(String::as_str) == Some("goldpinger")
        });
        Ok(Inventory {
            nodes,
            pdbs,
            service_cidr: self.service_cidr().await?,
            cluster_cidr: self.inner.opts.cluster_cidr,
            connectivity_checker,
            cilium_agent_requests: self.cilium_agent_requests().await?,
            pods,
            unobservable,
        })
    }

    /// One LIST of node metadata; from the node watch while the adapter holds the run lock.
    ///
    /// # RBAC
    /// `list nodes` (and `watch nodes` while holding the run lock).
    ///
    /// # Errors
    /// Any read failure.
    async fn node_names(&self) -> Result<Vec<NodeName>, PortError> {
        if let Some(nodes) = self.cached_nodes().await? {
            return Ok(nodes
                .into_iter()
                .filter_map(|n| n.metadata.name.and_then(|n| NodeName::new(n).ok()))
                .collect());
        }
        let list = self
            .nodes()
            .list_metadata(&self.node_list_params())
            .await
            .map_err(|e| port_error("list", "nodes", e))?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name.and_then(|n| NodeName::new(n).ok()))
            .collect())
    }

    /// One GET of the node and one LIST of its pods (`fieldSelector=spec.nodeName=<node>`, never
    /// a cluster-wide list); while the adapter holds the run lock, both from watches (the
    /// module `watch`: no request once the node's watches are synced).
    ///
    /// # RBAC
    /// `get nodes`, `list pods`, `get configmaps` (`cilium-config`, once); while holding the run
    /// lock, `list` and `watch` `nodes` and `pods`.
    ///
    /// # Errors
    /// [`PortError::NotFound`] naming the node when it is gone.
    async fn node_view(&self, node: &NodeName) -> Result<NodeView, PortError> {
        let n = self.node(node).await?;
        self.remember_cni_dir(node, &n);
        let cidrs = self.cilium_cidrs().await?;
        let pods = Self::model_pods(&self.pods_on(node).await?, &cidrs);
        let mut model = convert::node(&n).ok_or_else(|| PortError::Invalid {
            what: format!("read node {node}"),
            detail: "the node object has no valid name".into(),
        })?;
        model.requested = pods
            .iter()
            .filter(|p| p.uses_pod_network() || p.host_network)
            .fold(Resources::default(), |acc, p| acc.plus(p.requests));
        Ok(NodeView { node: model, pods })
    }

    /// The budgets covering `node`'s Running, Ready, drainable pods and what each allows now,
    /// from the run's watches only (no request); empty while they are not running.
    ///
    /// # RBAC
    /// None beyond the watches' (`list`/`watch` on `pods` and `poddisruptionbudgets`).
    async fn pod_budgets(&self, node: &NodeName) -> Result<PodBudgets, PortError> {
        let mut out = PodBudgets::default();
        let Some(raw) = self.inner.caches.pdbs(&self.inner.client).await? else {
            return Ok(out);
        };
        let Some(pods) = self.inner.caches.pods_on(&self.inner.client, node).await? else {
            return Ok(out);
        };
        let pdbs: Vec<(Pdb, u32)> = raw
            .iter()
            .filter_map(|p| convert::pdb(p).map(|m| (m, convert::disruptions_allowed(p))))
            .collect();
        for p in Self::model_pods(&pods, &[]) {
            if !p.is_drainable() || p.terminating || p.phase != PodPhase::Running || !p.ready {
                continue;
            }
            let names: Vec<String> = pdbs
                .iter()
                .filter(|(b, _)| b.covers(&p))
                .map(|(b, allowed)| {
                    let key = b.key();
                    out.allowed.insert(key.clone(), *allowed);
                    key
                })
                .collect();
            if !names.is_empty() {
                out.covering.insert(p.pod, names);
            }
        }
        Ok(out)
    }

    /// One LIST of pods per node (field selector) and one LIST of all budgets; counts, per node,
    /// the drainable pods each budget covers. While the adapter holds the run lock, both come
    /// from watches (the pods of the run's one pod watch, or of each node's by field selector on a
    /// large cluster; the budgets of all namespaces).
    ///
    /// # RBAC
    /// `list pods`, `list poddisruptionbudgets`; `watch` both while holding the run lock.
    ///
    /// # Errors
    /// Any read failure.
    async fn budget_view(&self, nodes: &[NodeName]) -> Result<BudgetView, PortError> {
        let mut view = BudgetView::default();
        if nodes.is_empty() {
            return Ok(view);
        }
        let raw = match self.inner.caches.pdbs(&self.inner.client).await? {
            Some(p) => p,
            None => self.list_pdbs(None).await?,
        };
        let pdbs: Vec<(Pdb, u32)> = raw
            .iter()
            .filter_map(|p| convert::pdb(p).map(|m| (m, convert::disruptions_allowed(p))))
            .collect();
        for node in nodes {
            let pods = Self::model_pods(&self.pods_on(node).await?, &[]);
            let mut counts: BTreeMap<String, u32> = BTreeMap::new();
            for p in pods.iter().filter(|p| p.is_drainable()) {
                for (b, allowed) in pdbs.iter().filter(|(b, _)| b.covers(p)) {
                    *counts.entry(b.key()).or_default() += 1;
                    view.allowed.insert(b.key(), *allowed);
                }
            }
            view.per_node
                .insert(node.clone(), counts.into_iter().collect());
        }
        Ok(view)
    }

    /// Merge PATCH of `spec.unschedulable` (no read first).
    ///
    /// # RBAC
    /// `patch nodes`.
    ///
    /// # Errors
    /// Any write failure.
    async fn set_unschedulable(
        &self,
        node: &NodeName,
        unschedulable: bool,
    ) -> Result<(), PortError> {
        self.patch_node(
            node,
            if unschedulable { "cordon" } else { "uncordon" },
            json!({"spec": {"unschedulable": unschedulable}}),
        )
        .await
    }

    /// Merge PATCH of `metadata.labels` (`null` removes the label).
    ///
    /// # RBAC
    /// `patch nodes`.
    ///
    /// # Errors
    /// Any write failure.
    async fn set_node_label(
        &self,
        node: &NodeName,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), PortError> {
        self.patch_node(
            node,
            &format!("label {key}"),
            json!({"metadata": {"labels": {key: value}}}),
        )
        .await
    }

    /// POSTs a `policy/v1` Eviction with `deleteOptions.preconditions.uid`, through the client
    /// with kube's retry off.
    ///
    /// | answer | outcome |
    /// |---|---|
    /// | 201/200 | `Evicted` |
    /// | 404, 409 (UID precondition) | `Gone` |
    /// | 429 with a `DisruptionBudget` cause | `BlockedByBudget` (name from the cause, else the covering budget) |
    /// | 403 about a poddisruptionbudget (negative budget) | `BlockedByBudget` |
    /// | 500 "more than one PodDisruptionBudget" | `MultipleBudgets` (LIST of the namespace's budgets, matched) |
    /// | 429 without the cause | `Err(Throttled)` |
    ///
    /// # RBAC
    /// `create pods/eviction`; `get pods` and `list poddisruptionbudgets` to name budgets.
    ///
    /// # Errors
    /// Transport, permission and throttling failures.
    async fn evict(&self, pod: &PodRef) -> Result<EvictOutcome, PortError> {
        let api: Api<core::Pod> = Api::namespaced(self.inner.evict_client.clone(), &pod.namespace);
        let body = Eviction {
            metadata: meta::ObjectMeta {
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                ..Default::default()
            },
            delete_options: Some(meta::DeleteOptions {
                preconditions: Some(meta::Preconditions {
                    uid: Some(pod.uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            }),
        };
        let res = api
            .create_subresource::<_, serde_json::Value>(
                "eviction",
                &pod.name,
                &PostParams::default(),
                &body,
            )
            .await;
        let status = match res {
            Ok(_) => return Ok(EvictOutcome::Evicted),
            Err(kube::Error::Api(s)) => s,
            Err(e) => return Err(port_error("create", format!("pods/eviction for {pod}"), e)),
        };
        let causes = status
            .details
            .as_ref()
            .map(|d| d.causes.as_slice())
            .unwrap_or_default();
        match status.code {
            404 | 409 => Ok(EvictOutcome::Gone),
            429 => {
                let Some(cause) = causes.iter().find(|c| c.reason == DISRUPTION_BUDGET_CAUSE)
                else {
                    return Err(PortError::Throttled {
                        retry_after: retry_after(&status),
                    });
                };
                let pdb = match budget_name_in(&cause.message) {
                    Some(name) => format!("{}/{name}", pod.namespace),
                    None => self
                        .covering_pdbs(pod)
                        .await?
                        .into_iter()
                        .next()
                        .unwrap_or_else(|| format!("{}/<unknown budget>", pod.namespace)),
                };
                Ok(EvictOutcome::BlockedByBudget { pdb })
            }
            403 if status
                .details
                .as_ref()
                .is_some_and(|d| d.kind.eq_ignore_ascii_case("poddisruptionbudget")) =>
            {
                let name = status
                    .details
                    .as_ref()
                    .map(|d| d.name.clone())
                    .unwrap_or_default();
                Ok(EvictOutcome::BlockedByBudget {
                    pdb: format!("{}/{name}", pod.namespace),
                })
            }
            500 if status.message.contains("more than one PodDisruptionBudget") => {
                Ok(EvictOutcome::MultipleBudgets {
                    pdbs: self.covering_pdbs(pod).await?,
                })
            }
            _ => Err(port_error(
                "create",
                format!("pods/eviction for {pod}"),
                kube::Error::Api(status),
            )),
        }
    }

    /// DELETE with `preconditions.uid`; a pod already gone (404) or replaced (409) is success.
    ///
    /// # RBAC
    /// `delete pods`.
    ///
    /// # Errors
    /// Any other write failure.
    async fn delete_pod(&self, pod: &PodRef) -> Result<(), PortError> {
        delete_pod_by_uid(&self.inner.client, pod).await
    }
}

/// Deletes `pod` keyed by its UID; 404 and 409 count as done.
pub(crate) async fn delete_pod_by_uid(
    client: &kube::Client,
    pod: &PodRef,
) -> Result<(), PortError> {
    let api: Api<core::Pod> = Api::namespaced(client.clone(), &pod.namespace);
    let dp = DeleteParams::default().preconditions(Preconditions {
        uid: Some(pod.uid.clone()),
        resource_version: None,
    });
    match api.delete(&pod.name, &dp).await {
        Ok(_) => Ok(()),
        Err(e) if matches!(crate::error::api_code(&e), Some(404 | 409)) => Ok(()),
        Err(e) => Err(port_error("delete", format!("pod {pod}"), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::budget_name_in;

    #[test]
    fn budget_names_from_cause_messages() {
        assert_eq!(
            budget_name_in(
                "The disruption budget web-pdb needs 2 healthy pods and has 2 currently"
            ),
            Some("web-pdb")
        );
        assert_eq!(
            budget_name_in("The disruption budget db is still being processed by the server."),
            Some("db")
        );
        assert_eq!(budget_name_in("something else"), None);
    }
}
