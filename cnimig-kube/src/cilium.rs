//! [`NewCni`] on the Kubernetes API: `cilium-config`, the `CiliumNodeConfig`, the agent pods,
//! and the node's CNI directory (through the emulator's annotation and a helper pod).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use cnimig_core::cilium::{CiliumNodeConfig, NodeConfigApi};
use cnimig_core::model::{NodeName, PodRef};
use cnimig_core::ports::{AgentObservation, CniDirState, NewCni, PortError};
use k8s_openapi::api::core::v1 as core;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use serde_json::json;

use crate::cluster::delete_pod_by_uid;
use crate::error::{api_code, port_error};
use crate::{
    AGENT_CONFIG_ANNOTATION, CILIUM_AGENT_LABEL, CNI_DIR_ANNOTATION, FIELD_MANAGER, KubeCluster,
    RESTORE_HELPER_LABEL,
};

/// The shell script the restore helper runs against the host's `/etc/cni/net.d` (mounted at
/// `/host/etc/cni/net.d`): remove Cilium's conflist, put Calico's back. Idempotent.
pub const RESTORE_SCRIPT: &str = "set -e; d=/host/etc/cni/net.d; rm -f \"$d/05-cilium.conflist\"; \
if [ -f \"$d/10-calico.conflist.cilium_bak\" ]; then mv -f \"$d/10-calico.conflist.cilium_bak\" \"$d/10-calico.conflist\"; fi";

/// The name of the restore helper pod for `node` (at most 63 characters).
#[must_use]
pub fn restore_helper_name(node: &NodeName) -> String {
    let mut name = format!("cnimig-restore-cni-{node}");
    name.truncate(63);
    name.trim_end_matches(['-', '.']).to_string()
}

impl KubeCluster {
    /// Keeps the node's CNI-dir annotation from a fresh read, for [`NewCni::cni_dir`].
    pub(crate) fn remember_cni_dir(&self, node: &NodeName, n: &core::Node) {
        let v = n
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CNI_DIR_ANNOTATION))
            .cloned();
        if let Ok(mut m) = self.inner.cni_seen.lock() {
            m.insert(node.clone(), (tokio::time::Instant::now(), v));
        }
    }

    fn recent_cni_dir(&self, node: &NodeName) -> Option<Option<String>> {
        let m = self.inner.cni_seen.lock().ok()?;
        let (at, v) = m.get(node)?;
        (at.elapsed() <= crate::CNI_SEEN_TTL).then(|| v.clone())
    }

    /// The version of `cilium.io` to use for `ciliumnodeconfigs`, by API discovery: `v2`'s
    /// resources, and `v2alpha1`'s only when `v2` is not served or lacks them (one request on
    /// Cilium 1.16 and later; a 404 says a version is not served, so `/apis` is not read).
    ///
    /// # RBAC
    /// None beyond discovery (`/apis/cilium.io/*` is open to authenticated users).
    pub(crate) async fn node_config_api(&self) -> Result<NodeConfigApi, PortError> {
        let mut served = Vec::new();
        // In the order `NodeConfigApi::from_served` prefers them.
        for v in ["v2", "v2alpha1"] {
            let Some(resources) = self.served_resources(&format!("cilium.io/{v}")).await? else {
                continue;
            };
            served.push(v);
            if resources.iter().any(|r| r == "ciliumnodeconfigs")
                && let Some(api) = NodeConfigApi::from_served([v])
            {
                return Ok(api);
            }
        }
        Err(PortError::NotFound {
            what: if served.is_empty() {
                // No Cilium CRD at all: say what to install, as when the version is missing.
                "CRD ciliumnodeconfigs.cilium.io (cilium.io/v2 and cilium.io/v2alpha1 not served); install Cilium 1.13 or later".into()
            } else {
                format!(
                    "CRD ciliumnodeconfigs.cilium.io at v2 or v2alpha1 (cilium.io serves {served:?} of them, without ciliumnodeconfigs); install Cilium 1.13 or later"
                )
            },
        })
    }

    /// The Cilium agent pods on `node`: from the node's pod watch while the adapter holds the
    /// run lock, else one LIST (label and field selector).
    pub(crate) async fn agent_pods(&self, node: &NodeName) -> Result<Vec<core::Pod>, PortError> {
        if let Some(pods) = self.inner.caches.pods_on(&self.inner.client, node).await? {
            let (k, v) = CILIUM_AGENT_LABEL
                .split_once('=')
                .unwrap_or((CILIUM_AGENT_LABEL, ""));
            return Ok(pods
                .into_iter()
                .filter(|p| {
                    p.metadata.namespace.as_deref()
                        == Some(self.inner.opts.cilium_namespace.as_str())
                        && p.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(k))
                            .is_some_and(|x| x == v)
                })
                .collect());
        }
        self.list_agent_pods(node).await
    }

    /// The Cilium agent pods on `node`: one LIST (label and field selector).
    async fn list_agent_pods(&self, node: &NodeName) -> Result<Vec<core::Pod>, PortError> {
        let api: Api<core::Pod> =
            Api::namespaced(self.inner.client.clone(), &self.inner.opts.cilium_namespace);
        let lp = ListParams::default()
            .labels(CILIUM_AGENT_LABEL)
            .fields(&format!("spec.nodeName={node}"));
        api.list(&lp)
            .await
            .map(|l| l.items)
            .map_err(|e| port_error("list", format!("cilium agent pods on {node}"), e))
    }

    async fn wait_helper(&self, api: &Api<core::Pod>, name: &str) -> Result<(), PortError> {
        let deadline = tokio::time::Instant::now() + self.inner.opts.helper_timeout;
        loop {
            let pod = api
                .get_opt(name)
                .await
                .map_err(|e| port_error("get", format!("pod {name}"), e))?;
            match pod
                .as_ref()
                .and_then(|p| p.status.as_ref())
                .and_then(|s| s.phase.as_deref())
            {
                Some("Succeeded") => return Ok(()),
                Some("Failed") => {
                    return Err(PortError::Unavailable {
                        what: format!("restore Calico's CNI config with helper pod {name}"),
                        detail: "the helper pod failed; see its logs".into(),
                    });
                }
                _ if pod.is_none() => {
                    return Err(PortError::Unavailable {
                        what: format!("restore Calico's CNI config with helper pod {name}"),
                        detail: "the helper pod disappeared before finishing".into(),
                    });
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(PortError::Timeout {
                    what: format!(
                        "helper pod {name} did not finish within {:?}",
                        self.inner.opts.helper_timeout
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn delete_helper(&self, api: &Api<core::Pod>, name: &str) -> Result<(), PortError> {
        delete_pod_and_wait(api, name, "helper pod").await
    }
}

/// Deletes pod `name` at once (grace period 0) and waits until it is gone (polling every
/// 250 ms, up to 30 s), so a new pod of the same name can be created; a pod already gone counts
/// as deleted. `what` names the pod's role in the timeout message (`helper pod`, `probe pod`).
///
/// # RBAC
/// `delete`, `get` `pods` in the pod's namespace.
///
/// # Errors
/// The delete or a read failed; [`PortError::Timeout`] when the pod is still there after 30 s.
pub(crate) async fn delete_pod_and_wait(
    api: &Api<core::Pod>,
    name: &str,
    what: &str,
) -> Result<(), PortError> {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => {}
        Err(e) if api_code(&e) == Some(404) => return Ok(()),
        Err(e) => return Err(port_error("delete", format!("pod {name}"), e)),
    }
    for _ in 0..120 {
        match api.get_opt(name).await {
            Ok(None) => return Ok(()),
            Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(250)).await,
            Err(e) => return Err(port_error("get", format!("pod {name}"), e)),
        }
    }
    Err(PortError::Timeout {
        what: format!("{what} {name} was not deleted within 30s"),
    })
}

/// The restore helper pod for `node`: pinned with `nodeName` (no scheduler, so a cordoned node is
/// fine), `hostNetwork` (it must start even when the node's CNI is broken), tolerating every
/// taint, the host's `/etc/cni/net.d` mounted read-write; root, but no privilege escalation and
/// no capabilities beyond the defaults minus all.
#[must_use]
pub fn restore_helper_pod(node: &NodeName, namespace: &str, image: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": restore_helper_name(node),
            "namespace": namespace,
            "labels": {RESTORE_HELPER_LABEL: "restore-cni"},
        },
        "spec": {
            "nodeName": node.as_str(),
            "hostNetwork": true,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{
                "name": "restore",
                "image": image,
                "command": ["sh", "-c", RESTORE_SCRIPT],
                "securityContext": {
                    "runAsUser": 0,
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [{"name": "cni-net-d", "mountPath": "/host/etc/cni/net.d"}],
            }],
            "volumes": [{"name": "cni-net-d", "hostPath": {"path": "/etc/cni/net.d", "type": "Directory"}}],
        }
    })
}

#[async_trait]
impl NewCni for KubeCluster {
    /// The data of `cilium-config` in the Cilium namespace.
    ///
    /// # RBAC
    /// `get configmaps`.
    ///
    /// # Errors
    /// [`PortError::NotFound`] when Cilium is not installed.
    async fn live_config(&self) -> Result<BTreeMap<String, String>, PortError> {
        let api: Api<core::ConfigMap> =
            Api::namespaced(self.inner.client.clone(), &self.inner.opts.cilium_namespace);
        let cm = api.get("cilium-config").await.map_err(|e| {
            port_error(
                "get",
                format!(
                    "configmap {}/cilium-config",
                    self.inner.opts.cilium_namespace
                ),
                e,
            )
        })?;
        Ok(cm.data.unwrap_or_default())
    }

    /// Server-side apply (field manager `cnimig`, forced) of the `CiliumNodeConfig` in the Cilium
    /// namespace, at the version the CRD serves (v2 preferred, else v2alpha1), found by
    /// discovery.
    ///
    /// # RBAC
    /// `create` and `patch ciliumnodeconfigs.cilium.io` (an apply that creates needs both).
    ///
    /// # Errors
    /// [`PortError::NotFound`] when no supported version is served; any write failure.
    async fn apply_node_config(&self, config: &CiliumNodeConfig) -> Result<(), PortError> {
        let version = self.node_config_api().await?;
        let gvk = GroupVersionKind::gvk(
            "cilium.io",
            version.api_version().trim_start_matches("cilium.io/"),
            "CiliumNodeConfig",
        );
        let ar = ApiResource::from_gvk_with_plural(&gvk, "ciliumnodeconfigs");
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.inner.client.clone(),
            &self.inner.opts.cilium_namespace,
            &ar,
        );
        let mut obj = config.to_object(version);
        obj["metadata"]["namespace"] = json!(self.inner.opts.cilium_namespace);
        api.patch(
            &config.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
        .map(|_| ())
        .map_err(|e| port_error("apply", format!("ciliumnodeconfig {}", config.name), e))
    }

    /// The pod labelled `k8s-app=cilium` on the node (LIST with `fieldSelector=spec.nodeName`,
    /// or the node's pod watch while the adapter holds the run lock), preferring one that is not
    /// terminating: its UID, Ready, and the node config it resolved.
    ///
    /// The resolved node config is read from the pod annotation
    /// [`AGENT_CONFIG_ANNOTATION`], which the emulator writes. A
    /// real agent resolves its config in its init container into files inside the pod
    /// (`/tmp/cilium/config-map/`, including `config-sources`); the API shows them only through
    /// `pods/exec` (`cilium-dbg` or `cat`), which this adapter does not use yet.
    ///
    /// # RBAC
    /// `list pods`.
    ///
    /// # Errors
    /// Any read failure.
    async fn agent(&self, node: &NodeName) -> Result<Option<AgentObservation>, PortError> {
        let mut pods = self.agent_pods(node).await?;
        pods.sort_by_key(|p| p.metadata.deletion_timestamp.is_some());
        Ok(pods.into_iter().next().and_then(|p| {
            let uid = p.metadata.uid.clone()?;
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let node_config = p
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(AGENT_CONFIG_ANNOTATION))
                .filter(|v| !v.is_empty())
                .cloned();
            Some(AgentObservation {
                pod_uid: uid,
                ready,
                node_config,
            })
        }))
    }

    /// Deletes the agent pod with this UID (found among the node's agent pods: the node's pod
    /// watch while the adapter holds the run lock, else a LIST), with a UID precondition; its
    /// DaemonSet recreates it.
    ///
    /// # RBAC
    /// `list pods`, `delete pods`.
    ///
    /// # Errors
    /// Any write failure other than the pod being gone.
    async fn restart_agent(&self, node: &NodeName, pod_uid: &str) -> Result<(), PortError> {
        let has = |pods: &[core::Pod]| {
            pods.iter()
                .find(|p| p.metadata.uid.as_deref() == Some(pod_uid))
                .cloned()
        };
        let mut pod = has(&self.agent_pods(node).await?);
        if pod.is_none() && self.inner.caches.active() {
            // Not in the watch (yet): ask the API server before concluding it is gone.
            pod = has(&self.list_agent_pods(node).await?);
        }
        let Some(pod) = pod else {
            return Ok(());
        };
        let r = PodRef {
            namespace: self.inner.opts.cilium_namespace.clone(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod_uid.to_string(),
        };
        delete_pod_by_uid(&self.inner.client, &r).await
    }

    /// The node annotation [`CNI_DIR_ANNOTATION`] (JSON of
    /// [`CniDirState`]); a node without it is on Calico ([`CniDirState::CALICO`]).
    ///
    /// This is the emulator's stand-in for reading `/etc/cni/net.d`: on a real cluster the same
    /// answer needs a helper pod with the directory mounted (like the restore helper) or a node
    /// agent; the emulator keeps the directory's state in this annotation.
    ///
    /// Answers from the node read by a `node_view` of the last second when there is one (the
    /// orchestrator reads view, agent and CNI dir in a row), else from the node watch while the
    /// adapter holds the run lock, else GETs the node's metadata.
    ///
    /// # RBAC
    /// `get nodes`.
    ///
    /// # Errors
    /// Any read failure; [`PortError::Invalid`] when the annotation does not parse.
    async fn cni_dir(&self, node: &NodeName) -> Result<CniDirState, PortError> {
        let cached = match self.recent_cni_dir(node) {
            Some(v) => Some(v),
            None => self.cached_node(node).await?.map(|n| {
                n.metadata
                    .annotations
                    .and_then(|mut a| a.remove(CNI_DIR_ANNOTATION))
            }),
        };
        let value = match cached {
            Some(v) => v,
            None => self
                .nodes()
                .get_metadata(node.as_str())
                .await
                .map_err(|e| port_error("get", format!("node {node}"), e))?
                .metadata
                .annotations
                .and_then(|mut a| a.remove(CNI_DIR_ANNOTATION)),
        };
        match value.as_deref() {
            None => Ok(CniDirState::CALICO),
            Some(v) => serde_json::from_str(v).map_err(|e| PortError::Invalid {
                what: format!("read annotation {CNI_DIR_ANNOTATION} of node {node}"),
                detail: e.to_string(),
            }),
        }
    }

    /// Runs the restore helper pod ([`restore_helper_pod`]) on the node: deletes a leftover
    /// helper, creates it, polls until it Succeeded (up to
    /// [`KubeOptions::helper_timeout`](crate::KubeOptions::helper_timeout)), then deletes it.
    /// Blocks the caller for the helper's run time.
    ///
    /// # RBAC
    /// `create`, `get`, `delete pods` in the system namespace.
    ///
    /// # Errors
    /// [`PortError::Timeout`] when the helper does not finish, [`PortError::Unavailable`] when it
    /// fails; the helper is deleted in every case.
    async fn restore_calico_cni(&self, node: &NodeName) -> Result<(), PortError> {
        let ns = &self.inner.opts.system_namespace;
        let api: Api<core::Pod> = Api::namespaced(self.inner.client.clone(), ns);
        let name = restore_helper_name(node);
        self.delete_helper(&api, &name).await?;
        let pod: core::Pod =
            serde_json::from_value(restore_helper_pod(node, ns, &self.inner.opts.helper_image))
                .map_err(|e| PortError::Invalid {
                    what: format!("build helper pod {name}"),
                    detail: e.to_string(),
                })?;
        api.create(&PostParams::default(), &pod)
            .await
            .map_err(|e| port_error("create", format!("pod {ns}/{name}"), e))?;
        let waited = self.wait_helper(&api, &name).await;
        let deleted = self.delete_helper(&api, &name).await;
        waited.and(deleted)
    }
}
