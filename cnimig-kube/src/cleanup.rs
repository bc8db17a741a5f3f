//! Clean-up on Kubernetes: [`CleanupPort`] on [`KubeCluster`], and the
//! node helper pod that runs the flush program ([`cnimig_core::cleanup::render_script`]).
//!
//! | port method | API calls |
//! |---|---|
//! | `delete_calico_object` | DELETE of the object(s) (404 is success) |
//! | `start_helper` | GET DaemonSet `cilium` (its image); CREATE pod (409 is success) |
//! | `helper_status` | GET pod |
//! | `delete_helper` | DELETE pod, grace period 0 (404 is success) |
//! | `delete_calico_crds` | LIST CRDs; DELETE those of `crd.projectcalico.org` and `operator.tigera.io` |
//!
//! The temporary Calico allow rule is in [`crate::allow`].

use async_trait::async_trait;
use cnimig_core::cleanup::{CalicoObject, CleanupPort, HELPER_HOST_PATHS, HelperStatus};
use cnimig_core::model::NodeName;
use cnimig_core::ports::PortError;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
};
use serde_json::{Value, json};

use crate::KubeCluster;
use crate::error::port_error;

/// The namespaces an operator install owns, deleted last among its objects.
pub const OPERATOR_NAMESPACES: [&str; 3] = ["calico-system", "calico-apiserver", "tigera-operator"];
/// The API groups whose CRDs clean-up deletes.
pub const CALICO_CRD_GROUPS: [&str; 2] = ["crd.projectcalico.org", "operator.tigera.io"];
/// The namespace of a manifest install's objects.
pub const MANIFEST_NAMESPACE: &str = "kube-system";

/// The label on clean-up helper pods.
pub const FLUSH_HELPER_LABEL: &str = "cnimig.io/helper";
/// The label's value on clean-up helper pods.
pub const FLUSH_HELPER_VALUE: &str = "flush-calico";

/// The helper pod's name on `node` (`cnimig-flush-<node>`, cut to 63 characters).
#[must_use]
pub fn flush_helper_name(node: &NodeName) -> String {
    let mut n = format!("cnimig-flush-{node}");
    n.truncate(63);
    n.trim_end_matches(['-', '.']).to_string()
}

fn volume_name(path: &str) -> String {
    path.trim_start_matches('/').replace(['/', '.'], "-")
}

/// The clean-up helper pod for `node`: pinned with `nodeName`, `hostNetwork` (it edits the
/// host's iptables, routes and links), privileged (iptables and `ip link` need `NET_ADMIN` in
/// the host's network namespace), no ServiceAccount token, tolerating every taint, and exactly
/// the host paths of [`HELPER_HOST_PATHS`] mounted at the same paths (`/run/xtables.lock` as a
/// file, so its `iptables -w` calls serialise with the node's own).
#[must_use]
pub fn flush_helper_pod(node: &NodeName, namespace: &str, image: &str, script: &str) -> Value {
    let mounts: Vec<Value> = HELPER_HOST_PATHS
        .iter()
        .map(|p| json!({"name": volume_name(p), "mountPath": p}))
        .collect();
    let volumes: Vec<Value> = HELPER_HOST_PATHS
        .iter()
        .map(|p| {
            let kind = if p.ends_with(".lock") {
                "FileOrCreate"
            } else {
                "DirectoryOrCreate"
            };
            json!({"name": volume_name(p), "hostPath": {"path": p, "type": kind}})
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": flush_helper_name(node),
            "namespace": namespace,
            "labels": {FLUSH_HELPER_LABEL: FLUSH_HELPER_VALUE},
        },
        "spec": {
            "nodeName": node.as_str(),
            "hostNetwork": true,
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{
                "name": "flush",
                "image": image,
                "command": ["sh", "-c", script],
                "securityContext": {"privileged": true, "runAsUser": 0},
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        }
    })
}

/// 404 (already gone) is success.
fn gone_ok<T>(r: Result<T, kube::Error>, verb: &str, what: String) -> Result<(), PortError> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(port_error(verb, what, e)),
    }
}

fn dynamic(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// One object a finalize or clean-up step deletes: its API, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteTarget {
    /// API group (empty for the core group).
    pub group: String,
    /// API version.
    pub version: String,
    /// Kind.
    pub kind: String,
    /// Resource (plural).
    pub plural: String,
    /// Namespace, for namespaced objects.
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

impl DeleteTarget {
    fn new(
        group: &str,
        version: &str,
        kind: &str,
        plural: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Self {
        DeleteTarget {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespace: ns.map(str::to_string),
            name: name.into(),
        }
    }

    /// The dynamic API of the object's resource.
    pub(crate) fn api(&self, client: &kube::Client) -> Api<DynamicObject> {
        let ar = dynamic(&self.group, &self.version, &self.kind, &self.plural);
        match &self.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        }
    }
}

impl std::fmt::Display for DeleteTarget {
    /// `plural[.group] [namespace/]name`, as `kubectl` names objects.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            String::new()
        } else {
            format!(".{}", self.group)
        };
        match &self.namespace {
            Some(ns) => write!(f, "{}{group} {ns}/{}", self.plural, self.name),
            None => write!(f, "{}{group} {}", self.plural, self.name),
        }
    }
}

/// The objects [`CleanupPort::delete_calico_object`] deletes for `object`, in order.
#[must_use]
pub fn calico_object_targets(object: CalicoObject) -> Vec<DeleteTarget> {
    let t = DeleteTarget::new;
    match object {
        CalicoObject::Installation => vec![t(
            "operator.tigera.io",
            "v1",
            "Installation",
            "installations",
            None,
            "default",
        )],
        CalicoObject::ApiServer => vec![t(
            "operator.tigera.io",
            "v1",
            "APIServer",
            "apiservers",
            None,
            "default",
        )],
        CalicoObject::OperatorDeployment => vec![t(
            "apps",
            "v1",
            "Deployment",
            "deployments",
            Some("tigera-operator"),
            "tigera-operator",
        )],
        CalicoObject::Namespaces => OPERATOR_NAMESPACES
            .iter()
            .map(|ns| t("", "v1", "Namespace", "namespaces", None, ns))
            .collect(),
        CalicoObject::NodeDaemonSet => vec![t(
            "apps",
            "v1",
            "DaemonSet",
            "daemonsets",
            Some(MANIFEST_NAMESPACE),
            "calico-node",
        )],
        CalicoObject::KubeControllers => vec![t(
            "apps",
            "v1",
            "Deployment",
            "deployments",
            Some(MANIFEST_NAMESPACE),
            "calico-kube-controllers",
        )],
        CalicoObject::CalicoConfig => vec![t(
            "",
            "v1",
            "ConfigMap",
            "configmaps",
            Some(MANIFEST_NAMESPACE),
            "calico-config",
        )],
    }
}

impl KubeCluster {
    fn helper_pods(&self) -> Api<core::Pod> {
        Api::namespaced(self.client().clone(), &self.options().system_namespace)
    }

    /// The image of the Cilium DaemonSet's first container (it has `sh`, `iptables`, `ip`), or
    /// [`KubeOptions::helper_image`](crate::KubeOptions::helper_image) when there is none.
    ///
    /// # RBAC
    /// `get daemonsets` in the Cilium namespace.
    pub(crate) async fn flush_image(&self) -> Result<String, PortError> {
        let api: Api<DaemonSet> =
            Api::namespaced(self.client().clone(), &self.options().cilium_namespace);
        let ds = api
            .get_opt("cilium")
            .await
            .map_err(|e| port_error("get", "daemonset cilium", e))?;
        Ok(ds
            .and_then(|d| d.spec)
            .and_then(|s| s.template.spec)
            .and_then(|s| s.containers.into_iter().next())
            .and_then(|c| c.image)
            .unwrap_or_else(|| self.options().helper_image.clone()))
    }
}

#[async_trait]
impl CleanupPort for KubeCluster {
    /// Deletes every object of [`calico_object_targets`] in turn.
    ///
    /// # RBAC
    /// `delete` on `installations`, `apiservers` (`operator.tigera.io`), `deployments`,
    /// `daemonsets` (`apps`), `namespaces`, `configmaps`.
    async fn delete_calico_object(&self, object: CalicoObject) -> Result<(), PortError> {
        for t in calico_object_targets(object) {
            gone_ok(
                t.api(self.client())
                    .delete(&t.name, &DeleteParams::default())
                    .await,
                "delete",
                t.to_string(),
            )?;
        }
        Ok(())
    }

    /// Creates [`flush_helper_pod`] in the system namespace with the Cilium DaemonSet's image.
    ///
    /// # RBAC
    /// `get daemonsets` in the Cilium namespace; `create pods` in the system namespace.
    async fn start_helper(&self, node: &NodeName, script: &str) -> Result<(), PortError> {
        let image = self.flush_image().await?;
        let pod: core::Pod = serde_json::from_value(flush_helper_pod(
            node,
            &self.options().system_namespace,
            &image,
            script,
        ))
        .map_err(|e| PortError::Invalid {
            what: format!("the flush helper pod for node {node}"),
            detail: e.to_string(),
        })?;
        match self
            .helper_pods()
            .create(&PostParams::default(), &pod)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(port_error(
                "create",
                format!("pod {}", flush_helper_name(node)),
                e,
            )),
        }
    }

    /// # RBAC
    /// `get pods` in the system namespace.
    async fn helper_status(&self, node: &NodeName) -> Result<HelperStatus, PortError> {
        let name = flush_helper_name(node);
        let pod = self
            .helper_pods()
            .get_opt(&name)
            .await
            .map_err(|e| port_error("get", format!("pod {name}"), e))?;
        let Some(pod) = pod else {
            return Ok(HelperStatus::Absent);
        };
        if pod.metadata.deletion_timestamp.is_some() {
            return Ok(HelperStatus::Running);
        }
        let status = pod.status.unwrap_or_default();
        Ok(match status.phase.as_deref() {
            Some("Succeeded") => HelperStatus::Succeeded,
            Some("Failed") => {
                let term = status
                    .container_statuses
                    .unwrap_or_default()
                    .into_iter()
                    .find_map(|c| c.state.and_then(|s| s.terminated));
                HelperStatus::Failed(match term {
                    Some(t) => format!(
                        "exit code {}{}",
                        t.exit_code,
                        t.message.map(|m| format!(": {m}")).unwrap_or_default()
                    ),
                    None => status.message.unwrap_or_else(|| "pod Failed".into()),
                })
            }
            _ => HelperStatus::Running,
        })
    }

    /// # RBAC
    /// `delete pods` in the system namespace.
    async fn delete_helper(&self, node: &NodeName) -> Result<(), PortError> {
        let name = flush_helper_name(node);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        gone_ok(
            self.helper_pods().delete(&name, &dp).await,
            "delete",
            format!("pod {name}"),
        )
    }

    /// # RBAC
    /// `list`, `delete` on `customresourcedefinitions` (`apiextensions.k8s.io`).
    async fn delete_calico_crds(&self) -> Result<(), PortError> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client().clone());
        let crds = api
            .list(&ListParams::default())
            .await
            .map_err(|e| port_error("list", "customresourcedefinitions", e))?;
        for crd in crds.items {
            if !CALICO_CRD_GROUPS.contains(&crd.spec.group.as_str()) {
                continue;
            }
            let name = crd.metadata.name.clone().unwrap_or_default();
            gone_ok(
                api.delete(&name, &DeleteParams::default()).await,
                "delete",
                format!("customresourcedefinition {name}"),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_helper_has_exactly_the_host_access_it_needs() {
        let node = NodeName::new("worker-1").unwrap();
        let pod = flush_helper_pod(
            &node,
            "kube-system",
            "quay.io/cilium/cilium:v1.17.0",
            "echo hi",
        );
        let spec = &pod["spec"];
        assert_eq!(spec["nodeName"], "worker-1");
        assert_eq!(spec["hostNetwork"], true);
        assert_eq!(spec["automountServiceAccountToken"], false);
        assert_eq!(spec["containers"][0]["securityContext"]["privileged"], true);
        assert_eq!(spec["containers"][0]["command"][2], "echo hi");
        let mut host: Vec<&str> = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["hostPath"]["path"].as_str().unwrap())
            .collect();
        host.sort_unstable();
        assert_eq!(
            host,
            vec![
                "/etc/cni/net.d",
                "/opt/cni/bin",
                "/run/xtables.lock",
                "/var/lib/calico"
            ]
        );
        let mounts: Vec<&str> = spec["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["mountPath"].as_str().unwrap())
            .collect();
        assert_eq!(mounts, HELPER_HOST_PATHS.to_vec());
        assert!(spec.get("hostPID").is_none() && spec.get("hostIPC").is_none());
    }

    #[test]
    fn long_node_names_give_valid_pod_names() {
        let node = NodeName::new("a".repeat(63)).unwrap();
        let n = flush_helper_name(&node);
        assert!(n.len() <= 63 && n.starts_with("cnimig-flush-"));
    }
}
