//! Which distribution a cluster runs and how Calico was installed, from what the cluster shows
//! about itself. Pure: the inputs are Node objects and a few facts about the distribution's own
//! objects ([`DistroObjects`]), gathered by [`RancherCluster`](crate::RancherCluster) or written
//! by hand in tests.
//!
//! The signals (FACTS.md, "Rancher"):
//!
//! | signal | RKE1 | RKE2 | K3s |
//! |---|---|---|---|
//! | kubelet version | plain `v1.x.y` | `+rke2rN` | `+k3sN` |
//! | container runtime | `docker://` | `containerd://` | `containerd://` |
//! | node annotations | `rke.cattle.io/external-ip`, `rke.cattle.io/internal-ip` | `rke2.io/*` | `k3s.io/*` |
//! | `node.kubernetes.io/instance-type` | — | `rke2` | `k3s` |
//! | role labels | `controlplane`, `etcd`, `worker` | `control-plane`, `etcd`, `master` | `control-plane`, `master` |
//! | objects in `kube-system` | ConfigMap `rke-network-plugin`, Job `rke-network-plugin-deploy-job` | HelmCharts `rke2-*` | HelmCharts (e.g. `traefik`), none `rke2-*` |
//!
//! A version suffix is decisive; the rest adds up. Disagreeing evidence is reported, never
//! silently resolved.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use cnimig_core::model::NodeRole;
use k8s_openapi::api::core::v1 as core;
use serde::Serialize;

/// The Kubernetes distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Distribution {
    /// Rancher Kubernetes Engine 1 (Kubernetes in Docker containers).
    Rke1,
    /// RKE2.
    Rke2,
    /// K3s.
    K3s,
    /// Anything else (kubeadm, a cloud's managed Kubernetes, ...).
    Generic,
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Distribution::Rke1 => "RKE1",
            Distribution::Rke2 => "RKE2",
            Distribution::K3s => "K3s",
            Distribution::Generic => "generic Kubernetes",
        })
    }
}

/// How Calico was installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CalicoInstall {
    /// RKE1's own manifests: DaemonSet `kube-system/calico-node`, deployed by
    /// `rke-network-plugin-deploy-job`.
    Rke1Manifest,
    /// RKE1's Canal (Calico policy over flannel VXLAN, DaemonSet `kube-system/canal`): flannel's
    /// VXLAN port 8472 collides with Cilium's default.
    Canal,
    /// RKE2's `rke2-calico` HelmChart with the Tigera operator (`calico-system`): Calico's
    /// settings go through the chart's values, never the `Installation` directly.
    Rke2Chart,
    /// The Tigera operator installed by other means (`calico-system/calico-node`).
    Operator,
    /// A plain manifest (`kube-system/calico-node`).
    Manifest,
    /// No Calico found.
    NotFound,
}

impl fmt::Display for CalicoInstall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CalicoInstall::Rke1Manifest => {
                "RKE1 network plugin manifests (kube-system/calico-node)"
            }
            CalicoInstall::Canal => "Canal (kube-system/canal: Calico policy over flannel)",
            CalicoInstall::Rke2Chart => {
                "RKE2's rke2-calico HelmChart (Tigera operator, calico-system/calico-node)"
            }
            CalicoInstall::Operator => "Tigera operator (calico-system/calico-node)",
            CalicoInstall::Manifest => "plain manifest (kube-system/calico-node)",
            CalicoInstall::NotFound => "not found",
        })
    }
}

/// What detection needs from one Node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct NodeFacts {
    /// Node name.
    pub name: String,
    /// `status.nodeInfo.kubeletVersion`.
    pub kubelet_version: String,
    /// `status.nodeInfo.containerRuntimeVersion` (`docker://…`, `containerd://…`).
    pub container_runtime: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
}

impl NodeFacts {
    /// The facts of a Node object.
    #[must_use]
    pub fn from_node(node: &core::Node) -> Self {
        let info = node.status.as_ref().and_then(|s| s.node_info.as_ref());
        NodeFacts {
            name: node.metadata.name.clone().unwrap_or_default(),
            kubelet_version: info.map(|i| i.kubelet_version.clone()).unwrap_or_default(),
            container_runtime: info
                .map(|i| i.container_runtime_version.clone())
                .unwrap_or_default(),
            labels: node.metadata.labels.clone().unwrap_or_default(),
            annotations: node.metadata.annotations.clone().unwrap_or_default(),
        }
    }

    /// The node's roles under its distribution's label names (RKE1 `controlplane`, RKE2/K3s
    /// `control-plane`/`master`, `etcd`, `worker`): the same mapping `cnimig-kube` feeds the
    /// core's [`Node::roles`](cnimig_core::model::Node::roles), so control-plane and etcd nodes
    /// migrate last.
    #[must_use]
    pub fn roles(&self) -> Vec<NodeRole> {
        cnimig_kube::convert::roles(&self.labels)
    }

    /// True when Rancher's v2 provisioning made this node (`rke.cattle.io/machine` or
    /// `cluster.x-k8s.io/machine`, label or annotation): its RKE2 settings belong in the
    /// `provisioning.cattle.io` Cluster, not on the node.
    #[must_use]
    pub fn rancher_provisioned(&self) -> bool {
        ["rke.cattle.io/machine", "cluster.x-k8s.io/machine"]
            .iter()
            .any(|k| self.labels.contains_key(*k) || self.annotations.contains_key(*k))
    }
}

/// What detection needs from the distribution's own objects.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct DistroObjects {
    /// ConfigMap `kube-system/rke-network-plugin` exists (RKE1).
    pub rke_network_plugin_configmap: bool,
    /// Job `kube-system/rke-network-plugin-deploy-job` exists (RKE1).
    pub rke_network_plugin_job: bool,
    /// Names of the `helm.cattle.io` HelmCharts in `kube-system` (RKE2, K3s).
    pub helm_charts: BTreeSet<String>,
    /// `namespace/name` of the DaemonSets that matter: `kube-system/calico-node`,
    /// `kube-system/canal`, `calico-system/calico-node`.
    pub daemonsets: BTreeSet<String>,
    /// The Tigera operator's `Installation` `default` exists.
    pub tigera_installation: bool,
}

/// One piece of evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evidence {
    /// What it points at.
    pub distribution: Distribution,
    /// How much it counts: 10 for a kubelet version suffix, 3 for distribution objects, 2 for
    /// annotations and instance types, 1 for runtimes and role label spellings.
    pub weight: u32,
    /// What was seen, e.g. `node cp-1: kubelet v1.28.9+rke2r1`.
    pub what: String,
}

/// The result of [`detect`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Detection {
    /// The distribution with the most evidence ([`Distribution::Generic`] with none).
    pub distribution: Distribution,
    /// Everything seen, strongest first.
    pub evidence: Vec<Evidence>,
    /// Evidence for another distribution than the chosen one (a person should look).
    pub conflicts: Vec<String>,
    /// How Calico was installed.
    pub calico: CalicoInstall,
    /// Some node was made by Rancher's v2 provisioning ([`NodeFacts::rancher_provisioned`]).
    pub rancher_provisioned: bool,
    /// Each node's roles ([`NodeFacts::roles`]).
    pub roles: BTreeMap<String, Vec<NodeRole>>,
}

impl Detection {
    /// Nodes with the control-plane or etcd role: they migrate after every worker.
    #[must_use]
    pub fn control_plane_nodes(&self) -> Vec<&str> {
        self.roles
            .iter()
            .filter(|(_, r)| {
                r.iter()
                    .any(|r| matches!(r, NodeRole::ControlPlane | NodeRole::Etcd))
            })
            .map(|(n, _)| n.as_str())
            .collect()
    }
}

fn node_evidence(n: &NodeFacts, out: &mut Vec<Evidence>) {
    let mut push = |distribution, weight, what: String| {
        out.push(Evidence {
            distribution,
            weight,
            what: format!("node {}: {what}", n.name),
        });
    };
    let v = n.kubelet_version.as_str();
    if v.contains("+rke2r") {
        push(Distribution::Rke2, 10, format!("kubelet {v}"));
    } else if v.contains("+k3s") {
        push(Distribution::K3s, 10, format!("kubelet {v}"));
    }
    if n.container_runtime.starts_with("docker://") && !v.is_empty() && !v.contains('+') {
        push(
            Distribution::Rke1,
            1,
            format!("kubelet {v} on {}", n.container_runtime),
        );
    }
    for key in ["rke.cattle.io/external-ip", "rke.cattle.io/internal-ip"] {
        if n.annotations.contains_key(key) {
            push(Distribution::Rke1, 2, format!("annotation {key}"));
        }
    }
    if let Some(k) = n.annotations.keys().find(|k| k.starts_with("rke2.io/")) {
        push(Distribution::Rke2, 2, format!("annotation {k}"));
    }
    if let Some(k) = n.annotations.keys().find(|k| k.starts_with("k3s.io/")) {
        // RKE2 embeds k3s and also writes some k3s.io annotations: weak alone.
        push(Distribution::K3s, 1, format!("annotation {k}"));
    }
    match n
        .labels
        .get("node.kubernetes.io/instance-type")
        .map(String::as_str)
    {
        Some("rke2") => push(Distribution::Rke2, 2, "instance-type rke2".into()),
        Some("k3s") => push(Distribution::K3s, 2, "instance-type k3s".into()),
        _ => {}
    }
    for role in ["controlplane", "worker"] {
        let key = format!("node-role.kubernetes.io/{role}");
        if n.labels.get(&key).is_some_and(|v| v == "true") {
            push(Distribution::Rke1, 1, format!("label {key}=true"));
            break;
        }
    }
}

fn object_evidence(o: &DistroObjects, out: &mut Vec<Evidence>) {
    let mut push = |distribution, weight, what: String| {
        out.push(Evidence {
            distribution,
            weight,
            what,
        });
    };
    if o.rke_network_plugin_configmap {
        push(
            Distribution::Rke1,
            3,
            "ConfigMap kube-system/rke-network-plugin".into(),
        );
    }
    if o.rke_network_plugin_job {
        push(
            Distribution::Rke1,
            3,
            "Job kube-system/rke-network-plugin-deploy-job".into(),
        );
    }
    if let Some(c) = o.helm_charts.iter().find(|c| c.starts_with("rke2-")) {
        push(Distribution::Rke2, 3, format!("HelmChart kube-system/{c}"));
    } else if let Some(c) = o.helm_charts.iter().next() {
        push(Distribution::K3s, 2, format!("HelmChart kube-system/{c}"));
    }
}

/// How Calico was installed, from the distribution's objects.
#[must_use]
pub fn calico_install(o: &DistroObjects) -> CalicoInstall {
    let ds = |s: &str| o.daemonsets.contains(s);
    if o.helm_charts.contains("rke2-calico") {
        CalicoInstall::Rke2Chart
    } else if ds("kube-system/canal") {
        CalicoInstall::Canal
    } else if ds("kube-system/calico-node")
        && (o.rke_network_plugin_configmap || o.rke_network_plugin_job)
    {
        CalicoInstall::Rke1Manifest
    } else if ds("calico-system/calico-node") || o.tigera_installation {
        CalicoInstall::Operator
    } else if ds("kube-system/calico-node") {
        CalicoInstall::Manifest
    } else {
        CalicoInstall::NotFound
    }
}

/// Detects the distribution, how Calico was installed and each node's roles.
///
/// ```
/// use cnimig_rancher::detect::{detect, Distribution, DistroObjects, NodeFacts};
/// let node = NodeFacts {
///     name: "cp-1".into(),
///     kubelet_version: "v1.28.9+rke2r1".into(),
///     ..NodeFacts::default()
/// };
/// let d = detect(&[node], &DistroObjects::default());
/// assert_eq!(d.distribution, Distribution::Rke2);
/// ```
#[must_use]
pub fn detect(nodes: &[NodeFacts], objects: &DistroObjects) -> Detection {
    let mut evidence = Vec::new();
    for n in nodes {
        node_evidence(n, &mut evidence);
    }
    object_evidence(objects, &mut evidence);
    evidence.sort_by(|a, b| b.weight.cmp(&a.weight).then(a.what.cmp(&b.what)));
    let mut score: BTreeMap<Distribution, u32> = BTreeMap::new();
    for e in &evidence {
        *score.entry(e.distribution).or_default() += e.weight;
    }
    // A kubelet version suffix is decisive: RKE2 also writes k3s.io annotations, RKE2 clusters
    // Rancher provisions also carry rke.cattle.io annotations.
    let decisive = evidence
        .iter()
        .find(|e| e.weight >= 10)
        .map(|e| e.distribution);
    let distribution = decisive.unwrap_or_else(|| {
        score
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map_or(Distribution::Generic, |(d, _)| *d)
    });
    let conflicts = evidence
        .iter()
        .filter(|e| e.distribution != distribution && e.weight >= 2)
        .filter(|e| !(distribution == Distribution::Rke2 && e.distribution == Distribution::K3s))
        .map(|e| format!("{} points at {}", e.what, e.distribution))
        .collect();
    Detection {
        distribution,
        evidence,
        conflicts,
        calico: calico_install(objects),
        rancher_provisioned: nodes.iter().any(NodeFacts::rancher_provisioned),
        roles: nodes.iter().map(|n| (n.name.clone(), n.roles())).collect(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use cnimig_core::plan::order_nodes;
    use serde_json::json;

    /// A Node object as the API returns it, from a compact description.
    fn node(
        name: &str,
        version: &str,
        runtime: &str,
        labels: &[&str],
        annotations: &[&str],
    ) -> core::Node {
        let kv = |items: &[&str]| -> serde_json::Map<String, serde_json::Value> {
            items
                .iter()
                .map(|i| {
                    let (k, v) = i.split_once('=').unwrap_or((i, ""));
                    (k.to_string(), json!(v))
                })
                .collect()
        };
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": kv(labels), "annotations": kv(annotations)},
            "status": {"nodeInfo": {"kubeletVersion": version, "containerRuntimeVersion": runtime,
                "architecture": "amd64", "operatingSystem": "linux", "kernelVersion": "6.1",
                "osImage": "Ubuntu", "machineID": "", "systemUUID": "", "bootID": "",
                "kubeProxyVersion": ""},
                "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}
        }))
        .unwrap()
    }

    fn facts(nodes: &[core::Node]) -> Vec<NodeFacts> {
        nodes.iter().map(NodeFacts::from_node).collect()
    }

    /// Control-plane and etcd nodes come after every worker in the core's order.
    fn assert_control_plane_last(nodes: &[core::Node], expected_cp: &[&str]) {
        let model: Vec<_> = nodes
            .iter()
            .filter_map(cnimig_kube::convert::node)
            .collect();
        let refs: Vec<_> = model.iter().collect();
        let order = order_nodes(&refs, true);
        let names: Vec<&str> = order.iter().map(|p| p.name.as_str()).collect();
        let split = names.len() - expected_cp.len();
        let mut tail: Vec<&str> = names[split..].to_vec();
        tail.sort_unstable();
        assert_eq!(tail, expected_cp, "order {names:?}");
    }

    fn rke1_nodes() -> Vec<core::Node> {
        let ann = [
            "rke.cattle.io/external-ip=203.0.113.5",
            "rke.cattle.io/internal-ip=10.0.0.5",
        ];
        vec![
            node(
                "cp-1",
                "v1.26.15",
                "docker://20.10.24",
                &[
                    "node-role.kubernetes.io/controlplane=true",
                    "node-role.kubernetes.io/etcd=true",
                ],
                &ann,
            ),
            node(
                "etcd-1",
                "v1.26.15",
                "docker://20.10.24",
                &["node-role.kubernetes.io/etcd=true"],
                &ann,
            ),
            node(
                "w-1",
                "v1.26.15",
                "docker://20.10.24",
                &["node-role.kubernetes.io/worker=true"],
                &ann,
            ),
            node(
                "w-2",
                "v1.26.15",
                "docker://20.10.24",
                &["node-role.kubernetes.io/worker=true"],
                &ann,
            ),
        ]
    }

    #[test]
    fn rke1_from_nodes_and_objects() {
        let nodes = rke1_nodes();
        let objects = DistroObjects {
            rke_network_plugin_configmap: true,
            rke_network_plugin_job: true,
            daemonsets: ["kube-system/calico-node".to_string()].into(),
            ..DistroObjects::default()
        };
        let d = detect(&facts(&nodes), &objects);
        assert_eq!(d.distribution, Distribution::Rke1);
        assert_eq!(d.calico, CalicoInstall::Rke1Manifest);
        assert!(d.conflicts.is_empty(), "{:?}", d.conflicts);
        assert!(!d.rancher_provisioned);
        assert_eq!(d.control_plane_nodes(), vec!["cp-1", "etcd-1"]);
        assert_eq!(
            d.roles["cp-1"],
            vec![NodeRole::ControlPlane, NodeRole::Etcd]
        );
        assert_control_plane_last(&nodes, &["cp-1", "etcd-1"]);
    }

    #[test]
    fn rke1_canal_is_told_apart() {
        let objects = DistroObjects {
            rke_network_plugin_configmap: true,
            daemonsets: ["kube-system/canal".to_string()].into(),
            ..DistroObjects::default()
        };
        let d = detect(&facts(&rke1_nodes()), &objects);
        assert_eq!(d.calico, CalicoInstall::Canal);
    }

    fn rke2_nodes(provisioned: bool) -> Vec<core::Node> {
        let mut ann = vec![
            "rke2.io/node-args=[\"server\"]",
            "rke2.io/internal-ip=10.0.0.7",
            "k3s.io/node-args=[]",
        ];
        if provisioned {
            ann.push("rke.cattle.io/machine=6b1f");
        }
        let cp = [
            "node-role.kubernetes.io/control-plane=true",
            "node-role.kubernetes.io/etcd=true",
            "node-role.kubernetes.io/master=true",
            "node.kubernetes.io/instance-type=rke2",
        ];
        vec![
            node(
                "srv-1",
                "v1.28.9+rke2r1",
                "containerd://1.7.11-k3s2",
                &cp,
                &ann,
            ),
            node(
                "srv-2",
                "v1.28.9+rke2r1",
                "containerd://1.7.11-k3s2",
                &cp,
                &ann,
            ),
            node(
                "agent-1",
                "v1.28.9+rke2r1",
                "containerd://1.7.11-k3s2",
                &["node.kubernetes.io/instance-type=rke2"],
                &ann,
            ),
        ]
    }

    #[test]
    fn rke2_with_the_calico_chart() {
        let nodes = rke2_nodes(false);
        let objects = DistroObjects {
            helm_charts: ["rke2-calico", "rke2-calico-crd", "rke2-coredns"]
                .map(String::from)
                .into(),
            daemonsets: ["calico-system/calico-node".to_string()].into(),
            tigera_installation: true,
            ..DistroObjects::default()
        };
        let d = detect(&facts(&nodes), &objects);
        assert_eq!(d.distribution, Distribution::Rke2);
        assert_eq!(d.calico, CalicoInstall::Rke2Chart);
        assert!(
            d.conflicts.is_empty(),
            "k3s.io annotations on RKE2 are no conflict: {:?}",
            d.conflicts
        );
        assert!(!d.rancher_provisioned);
        assert_control_plane_last(&nodes, &["srv-1", "srv-2"]);
        assert!(detect(&facts(&rke2_nodes(true)), &objects).rancher_provisioned);
    }

    #[test]
    fn k3s_from_the_version_suffix() {
        let nodes = vec![
            node(
                "k-1",
                "v1.29.4+k3s1",
                "containerd://1.7.15-k3s1",
                &[
                    "node-role.kubernetes.io/control-plane=true",
                    "node-role.kubernetes.io/master=true",
                    "node.kubernetes.io/instance-type=k3s",
                ],
                &["k3s.io/node-args=[]"],
            ),
            node(
                "k-2",
                "v1.29.4+k3s1",
                "containerd://1.7.15-k3s1",
                &[],
                &["k3s.io/node-args=[]"],
            ),
        ];
        let objects = DistroObjects {
            helm_charts: ["traefik".to_string()].into(),
            daemonsets: ["kube-system/calico-node".to_string()].into(),
            ..DistroObjects::default()
        };
        let d = detect(&facts(&nodes), &objects);
        assert_eq!(d.distribution, Distribution::K3s);
        assert_eq!(d.calico, CalicoInstall::Manifest);
        assert_control_plane_last(&nodes, &["k-1"]);
    }

    #[test]
    fn generic_kubeadm_with_the_operator() {
        let nodes = vec![
            node(
                "m-1",
                "v1.30.2",
                "containerd://1.7.18",
                &["node-role.kubernetes.io/control-plane="],
                &["kubeadm.alpha.kubernetes.io/cri-socket=x"],
            ),
            node("n-1", "v1.30.2", "containerd://1.7.18", &[], &[]),
        ];
        let objects = DistroObjects {
            daemonsets: ["calico-system/calico-node".to_string()].into(),
            tigera_installation: true,
            ..DistroObjects::default()
        };
        let d = detect(&facts(&nodes), &objects);
        assert_eq!(d.distribution, Distribution::Generic);
        assert!(d.evidence.is_empty());
        assert_eq!(d.calico, CalicoInstall::Operator);
        assert_control_plane_last(&nodes, &["m-1"]);
    }

    #[test]
    fn disagreeing_evidence_is_reported() {
        let mut nodes = rke2_nodes(false);
        nodes.push(rke1_nodes().remove(2));
        let d = detect(&facts(&nodes), &DistroObjects::default());
        assert_eq!(d.distribution, Distribution::Rke2);
        assert!(
            d.conflicts
                .iter()
                .any(|c| c.contains("rke.cattle.io/external-ip") && c.contains("RKE1")),
            "{:?}",
            d.conflicts
        );
    }

    #[test]
    fn no_calico_found() {
        assert_eq!(
            calico_install(&DistroObjects::default()),
            CalicoInstall::NotFound
        );
    }
}
