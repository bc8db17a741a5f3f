//! # cnimig-rancher
//!
//! What Rancher adds to a Calico-to-Cilium migration (FACTS.md, "Rancher"), for RKE1, RKE2 and
//! K3s clusters:
//!
//! - [`detect`]: which distribution runs (kubelet version suffixes, runtimes, node labels and
//!   annotations, the distribution's own objects), how Calico was installed, and each node's
//!   roles under the distribution's label names (control-plane and etcd nodes go last: the core's
//!   [`Node::roles`](cnimig_core::model::Node::roles) gets the same mapping);
//! - [`agent`]: `cattle-system/cattle-cluster-agent` JSON-patched onto the host network before
//!   the first node, its original fields saved in an annotation so they are restored exactly,
//!   once, even by a resumed run; its host ports (80, 443, 444) checked against the nodes; its
//!   health checked between nodes;
//! - [`cni`]: the distribution's CNI settings (RKE1 `network.plugin: none`; RKE2's Calico
//!   autodetection through the `rke2-calico` HelmChartConfig or the provisioning Cluster's
//!   `chartValues`, and its `cni` switch as the very last step);
//! - [`gitops`]: Argo CD Applications that would revert the changes (paused and restored with
//!   `--pause-gitops`) and Fleet Bundles (reported with what to pause);
//! - [`plan`]: all of it as checks and ordered steps, from one [`plan::RancherSnapshot`];
//! - [`RancherCluster`]: reads the snapshot and carries out the steps on the Kubernetes API (and
//!   on the Rancher management cluster when given one); [`RancherVerifier`] wraps the core's
//!   verifier with the agent check between nodes.
//!
//! Everything but [`RancherCluster`] and [`RancherVerifier`] is pure and tested without a
//! cluster. The pure path:
//!
//! ```
//! use cnimig_rancher::detect::{CalicoInstall, Distribution, DistroObjects};
//! use cnimig_rancher::plan::{plan, Action, RancherConfig, RancherSnapshot, When};
//! use serde_json::json;
//!
//! let node = |name: &str, role: &str| -> k8s_openapi::api::core::v1::Node {
//!     serde_json::from_value(json!({
//!         "metadata": {"name": name, "labels": {format!("node-role.kubernetes.io/{role}"): "true"},
//!                      "annotations": {"rke2.io/node-args": "[]"}},
//!         "status": {"nodeInfo": {"kubeletVersion": "v1.28.9+rke2r1",
//!             "containerRuntimeVersion": "containerd://1.7.11-k3s2", "architecture": "amd64",
//!             "operatingSystem": "linux", "kernelVersion": "", "osImage": "", "machineID": "",
//!             "systemUUID": "", "bootID": "", "kubeProxyVersion": ""}}
//!     })).unwrap()
//! };
//! let agent = serde_json::from_value(json!({
//!     "metadata": {"name": "cattle-cluster-agent", "namespace": "cattle-system", "resourceVersion": "9"},
//!     "spec": {"selector": {"matchLabels": {"app": "cattle-cluster-agent"}},
//!              "template": {"spec": {"dnsPolicy": "ClusterFirst", "containers": []}}}
//! })).unwrap();
//! let snapshot = RancherSnapshot {
//!     nodes: vec![node("server-1", "control-plane"), node("agent-1", "worker")],
//!     objects: DistroObjects {
//!         helm_charts: ["rke2-calico".to_string(), "rke2-calico-crd".to_string()].into(),
//!         daemonsets: ["calico-system/calico-node".to_string()].into(),
//!         ..DistroObjects::default()
//!     },
//!     agent: Some(agent),
//!     ..RancherSnapshot::default()
//! };
//! let p = plan(&snapshot, &RancherConfig::default());
//! assert_eq!(p.detection.distribution, Distribution::Rke2);
//! assert_eq!(p.detection.calico, CalicoInstall::Rke2Chart);
//! assert_eq!(p.detection.control_plane_nodes(), vec!["server-1"]);
//! assert!(p.ok(), "{p}");
//! let first: Vec<&Action> = p.steps_at(When::BeforeFirstNode).map(|s| &s.action).collect();
//! assert_eq!(first, [&Action::AgentToHostNetwork, &Action::Rke2HelmChartConfigAutodetection]);
//! assert!(p.steps_at(When::AfterLastNode).any(|s| s.action == Action::AgentRestore));
//! println!("{p}"); // what `rancher_plan` prints
//! ```
//!
//! ## Order of a Rancher migration
//!
//! 1. [`RancherCluster::snapshot`], [`plan::plan`]: print it; stop unless the person consents
//!    (`--yes`) and no check failed.
//! 2. [`RancherCluster::prepare`]: the [`plan::When::BeforeFirstNode`] steps (agent onto the host
//!    network and Ready there, RKE1 plugin `none`, RKE2 autodetection, Argo CD paused).
//! 3. The core's orchestrator, with [`RancherVerifier`] around the verifier.
//! 4. [`RancherCluster::finish`] once every node is Done: the [`plan::When::AfterLastNode`]
//!    steps (RKE2 `cni` switch, Argo CD restored, agent restored).
//!
//! Each step re-reads its object and is idempotent, so running again after a crash, at any
//! point, finishes the job without doing anything twice.
//!
//! ## RBAC
//!
//! `deploy/rbac-rancher.yaml`: what the steps need beyond `deploy/rbac.yaml`, for the
//! downstream cluster and (a separate ClusterRole) for the management cluster.

pub mod agent;
mod cluster;
pub mod cni;
pub mod detect;
pub mod dry_run;
pub mod gitops;
pub mod plan;

pub use cluster::{Management, RancherCluster, RancherError, RancherOptions, RancherVerifier};
pub use dry_run::RancherWrite;

/// The CRDs this crate's objects need on a test control plane (`deploy/crds/rancher/`):
/// `management.cattle.io` and `provisioning.cattle.io` Clusters, `helm.cattle.io` HelmChart and
/// HelmChartConfig, Argo CD's Application, Fleet's GitRepo and Bundle. Minimal schemas that the
/// project writes (spec and status preserve unknown fields); real clusters have the real ones.
pub const CRDS: [&str; 7] = [
    include_str!("../../deploy/crds/rancher/clusters.management.cattle.io.yaml"),
    include_str!("../../deploy/crds/rancher/clusters.provisioning.cattle.io.yaml"),
    include_str!("../../deploy/crds/rancher/helmcharts.helm.cattle.io.yaml"),
    include_str!("../../deploy/crds/rancher/helmchartconfigs.helm.cattle.io.yaml"),
    include_str!("../../deploy/crds/rancher/applications.argoproj.io.yaml"),
    include_str!("../../deploy/crds/rancher/gitrepos.fleet.cattle.io.yaml"),
    include_str!("../../deploy/crds/rancher/bundles.fleet.cattle.io.yaml"),
];

/// `deploy/rbac-rancher.yaml`.
pub const RBAC: &str = include_str!("../../deploy/rbac-rancher.yaml");
