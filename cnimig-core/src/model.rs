//! The domain model: what cnimig knows about a cluster, as plain values.
//!
//! Everything here is data with no IO. Adapters (`cnimig-kube`, `cnimig-sim`) translate their
//! world into these types; the planner, the preflight rules, the scheduler and the per-node state
//! machine read only these.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point in time, in milliseconds since an epoch chosen by the [`Clock`](crate::ports::Clock)
/// (Unix time for real clusters, zero for a simulation).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Time(pub u64);

impl Time {
    /// The time `d` later (saturating).
    #[must_use]
    pub fn after(self, d: Duration) -> Time {
        Time(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }
    /// How long from `earlier` to `self` (zero if `earlier` is later).
    #[must_use]
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
    /// Seconds as a float, for reports.
    #[must_use]
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1000.0
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1}s", self.as_secs_f64())
    }
}

/// A Kubernetes node name. Validated by [`NodeName::new`] (RFC 1123 subdomain).
///
/// Cheap to clone: clones share one immutable string (every pod names its node, and a run
/// looks at the pods of every node in flight many times).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(Arc<str>);

/// A node name that is not a valid RFC 1123 subdomain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid node name {name:?}: {why}; node names are lower-case RFC 1123 subdomains (letters, digits, '-' and '.', at most 253 characters, starting and ending with a letter or digit)"
)]
pub struct InvalidNodeName {
    /// The rejected input.
    pub name: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl NodeName {
    /// Validates and wraps a node name.
    ///
    /// # Errors
    /// [`InvalidNodeName`] when `name` is empty, longer than 253 characters, or not an RFC 1123
    /// subdomain.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidNodeName> {
        let name = name.into();
        let why = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > 253 {
            Some("it is longer than 253 characters")
        } else if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            Some("it contains a character other than a-z, 0-9, '-' or '.'")
        } else if name.split('.').any(|label| {
            label.is_empty() || label.len() > 63 || label.starts_with('-') || label.ends_with('-')
        }) {
            Some("a dot-separated part is empty, longer than 63, or starts or ends with '-'")
        } else {
            None
        };
        match why {
            Some(why) => Err(InvalidNodeName { name, why }),
            None => Ok(NodeName(Arc::from(name))),
        }
    }
    /// The name as a string slice.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeName {
    type Error = InvalidNodeName;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        NodeName::new(s)
    }
}
impl From<NodeName> for String {
    fn from(n: NodeName) -> String {
        n.0.as_ref().to_owned()
    }
}
impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a node does in the cluster. Control-plane (and etcd) nodes migrate last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeRole {
    /// Runs the API server and friends (any distribution's label name for it).
    ControlPlane,
    /// Runs etcd (RKE1/RKE2 label it separately).
    Etcd,
    /// Runs workloads.
    Worker,
}

/// Allocatable or requested resources, in millicores and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in millicores.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

impl Resources {
    /// Component-wise sum (saturating).
    #[must_use]
    pub fn plus(self, o: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(o.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(o.memory_bytes),
        }
    }
    /// True when both components fit in `capacity`.
    #[must_use]
    pub fn fits_in(self, capacity: Resources) -> bool {
        self.cpu_millis <= capacity.cpu_millis && self.memory_bytes <= capacity.memory_bytes
    }
}

/// A taint on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taint {
    /// Taint key.
    pub key: String,
    /// Taint value (may be empty).
    #[serde(default)]
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

/// A node, as the migration sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Node name.
    pub name: NodeName,
    /// Roles (derived from the distribution's role labels by the adapter).
    pub roles: Vec<NodeRole>,
    /// Topology zone (`topology.kubernetes.io/zone`), if any.
    pub zone: Option<String>,
    /// All labels.
    pub labels: BTreeMap<String, String>,
    /// Taints.
    pub taints: Vec<Taint>,
    /// `spec.unschedulable` (cordoned).
    pub unschedulable: bool,
    /// The `Ready` condition is `True`.
    pub ready: bool,
    /// `InternalIP` addresses.
    pub internal_ips: Vec<Ipv4Addr>,
    /// Allocatable resources.
    pub allocatable: Resources,
    /// Sum of the requests of the pods on the node.
    pub requested: Resources,
}

impl Node {
    /// True when the node has the control-plane or etcd role (it migrates after all workers).
    #[must_use]
    pub fn is_control_plane(&self) -> bool {
        self.roles
            .iter()
            .any(|r| matches!(r, NodeRole::ControlPlane | NodeRole::Etcd))
    }
}

/// A pod's identity: eviction and deletion are always keyed by UID, never by name alone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID, sent as the eviction's precondition.
    pub uid: String,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The kind of a pod's controlling owner.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub enum OwnerKind {
    /// No controller: evicting it deletes it for good (kubectl's `--force`).
    None,
    /// A ReplicaSet (usually from a Deployment).
    ReplicaSet,
    /// A StatefulSet: the replacement keeps the name and starts only after the old pod is gone.
    StatefulSet,
    /// A DaemonSet: never drained, recycled in place.
    DaemonSet,
    /// A Job.
    Job,
    /// Anything else (a custom controller).
    Other(String),
}

/// The pod's lifecycle phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PodPhase {
    /// Not yet running.
    Pending,
    /// Running.
    Running,
    /// Finished successfully.
    Succeeded,
    /// Finished with an error.
    Failed,
}

/// Which network a pod is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PodNetwork {
    /// `hostNetwork: true`: unaffected by the CNI.
    Host,
    /// Address from a Calico IP pool.
    Calico,
    /// Address from Cilium's cluster pool (and a CiliumEndpoint).
    Cilium,
    /// No address yet (pending sandbox).
    None,
}

/// A pod, as the migration sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    /// Identity.
    pub pod: PodRef,
    /// Labels, shared so that cloning a `Pod` does not copy them (an adapter that reads many
    /// pods of one template, like the simulator, hands out one map for all of them). Change them
    /// with [`Arc::make_mut`]; serialized as a plain map.
    #[serde(with = "shared_map")]
    pub labels: Arc<BTreeMap<String, String>>,
    /// Controller kind.
    pub owner: OwnerKind,
    /// Node it is bound to, if scheduled.
    pub node: Option<NodeName>,
    /// Pod IP.
    pub ip: Option<Ipv4Addr>,
    /// Which network the IP belongs to.
    pub network: PodNetwork,
    /// Lifecycle phase.
    pub phase: PodPhase,
    /// The `Ready` condition is `True`.
    pub ready: bool,
    /// Has a deletion timestamp.
    pub terminating: bool,
    /// `hostNetwork: true`.
    pub host_network: bool,
    /// Uses at least one `hostPort`.
    pub host_port: bool,
    /// Mounts an `emptyDir` volume (data is lost on eviction).
    pub empty_dir: bool,
    /// A mirror pod of a static pod (annotation `kubernetes.io/config.mirror`).
    pub mirror: bool,
    /// Tolerates `node.kubernetes.io/unschedulable` (can be scheduled onto a cordoned node).
    pub tolerates_unschedulable: bool,
    /// Resource requests.
    pub requests: Resources,
    /// When the pod was created (`metadata.creationTimestamp`, whole seconds on a real
    /// cluster), on the [`Clock`](crate::ports::Clock)'s time line; `None` when unknown. The
    /// drain evicts only the pods created before the node was cordoned, as `kubectl drain` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<Time>,
}

impl Pod {
    /// True when the pod's network comes from the CNI (not hostNetwork) and it is not finished.
    #[must_use]
    pub fn uses_pod_network(&self) -> bool {
        !self.host_network && !matches!(self.phase, PodPhase::Succeeded | PodPhase::Failed)
    }
    /// True when `kubectl drain` would evict it: not a DaemonSet or mirror pod, not finished.
    /// (cnimig also leaves hostNetwork pods in place: the CNI change does not touch them.)
    #[must_use]
    pub fn is_drainable(&self) -> bool {
        self.owner != OwnerKind::DaemonSet
            && !self.mirror
            && !self.host_network
            && !matches!(self.phase, PodPhase::Succeeded | PodPhase::Failed)
    }
}

/// (De)serializes an `Arc<BTreeMap<String, String>>` as the map itself.
mod shared_map {
    use super::{Arc, BTreeMap, Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(
        map: &Arc<BTreeMap<String, String>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        map.as_ref().serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Arc<BTreeMap<String, String>>, D::Error> {
        BTreeMap::deserialize(d).map(Arc::new)
    }
}

/// A label selector (`matchLabels` and `matchExpressions`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LabelSelector {
    /// Exact matches.
    #[serde(default, rename = "matchLabels")]
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements.
    #[serde(default, rename = "matchExpressions")]
    pub match_expressions: Vec<SelectorRequirement>,
}

/// One set-based selector requirement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectorRequirement {
    /// Label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: SelectorOp,
    /// Values for `In` / `NotIn`.
    #[serde(default)]
    pub values: Vec<String>,
}

/// Selector operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectorOp {
    /// Value in the set.
    In,
    /// Value not in the set (or key absent).
    NotIn,
    /// Key present.
    Exists,
    /// Key absent.
    DoesNotExist,
}

impl LabelSelector {
    /// True when `labels` satisfy every requirement. An empty selector matches everything,
    /// as in Kubernetes' `policy/v1` PodDisruptionBudget.
    #[must_use]
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let v = labels.get(&r.key);
                match r.operator {
                    SelectorOp::In => v.is_some_and(|v| r.values.contains(v)),
                    SelectorOp::NotIn => v.is_none_or(|v| !r.values.contains(v)),
                    SelectorOp::Exists => v.is_some(),
                    SelectorOp::DoesNotExist => v.is_none(),
                }
            })
    }
}

/// An absolute count or a percentage (Kubernetes `IntOrString`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntOrPercent {
    /// An absolute number of pods.
    Int(u32),
    /// A percentage of the expected pods, rounded up (as the disruption controller does).
    Percent(u32),
}

impl IntOrPercent {
    /// Scales against `total`, rounding up.
    #[must_use]
    pub fn scaled(self, total: u32) -> u32 {
        match self {
            IntOrPercent::Int(n) => n,
            IntOrPercent::Percent(p) => {
                let p = u64::from(p.min(100));
                u32::try_from((u64::from(total) * p).div_ceil(100)).unwrap_or(u32::MAX)
            }
        }
    }
}

/// What a PodDisruptionBudget promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Budget {
    /// `minAvailable`.
    MinAvailable(IntOrPercent),
    /// `maxUnavailable`.
    MaxUnavailable(IntOrPercent),
}

/// A PodDisruptionBudget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pdb {
    /// Namespace (a PDB selects pods only in its own namespace).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Pod selector.
    pub selector: LabelSelector,
    /// The budget.
    pub budget: Budget,
    /// The number of pods the owning controller wants (`expectedPods`); used for percentages
    /// and for `maxUnavailable`.
    pub expected_pods: u32,
}

impl Pdb {
    /// `namespace/name`.
    #[must_use]
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
    /// True when this budget covers `pod`.
    #[must_use]
    pub fn covers(&self, pod: &Pod) -> bool {
        pod.pod.namespace == self.namespace && self.selector.matches(&pod.labels)
    }
    /// The number of healthy pods the budget requires (the disruption controller's
    /// `desiredHealthy`).
    #[must_use]
    pub fn desired_healthy(&self) -> u32 {
        match self.budget {
            Budget::MinAvailable(v) => v.scaled(self.expected_pods),
            Budget::MaxUnavailable(v) => self
                .expected_pods
                .saturating_sub(v.scaled(self.expected_pods)),
        }
    }
    /// Disruptions allowed now, given `healthy` covered pods (the controller's
    /// `disruptionsAllowed`).
    #[must_use]
    pub fn disruptions_allowed(&self, healthy: u32) -> u32 {
        healthy.saturating_sub(self.desired_healthy())
    }
}

/// How Calico encapsulates traffic between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encapsulation {
    /// IP-in-IP (no UDP port).
    Ipip,
    /// IP-in-IP only across subnets.
    IpipCrossSubnet,
    /// VXLAN on Felix's `vxlanPort`.
    Vxlan,
    /// VXLAN only across subnets.
    VxlanCrossSubnet,
    /// No encapsulation: native routing (BGP).
    None,
}

impl Encapsulation {
    /// True for the VXLAN modes (which use a UDP port).
    #[must_use]
    pub fn uses_vxlan(self) -> bool {
        matches!(self, Encapsulation::Vxlan | Encapsulation::VxlanCrossSubnet)
    }
}

/// A Calico IP pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpPool {
    /// Pool name.
    pub name: String,
    /// Pool CIDR.
    pub cidr: Ipv4Net,
    /// Encapsulation.
    pub encapsulation: Encapsulation,
    /// `natOutgoing`.
    pub nat_outgoing: bool,
    /// `disabled`.
    pub disabled: bool,
}

/// Calico's node address autodetection method (`IP_AUTODETECTION_METHOD` or
/// `nodeAddressAutodetectionV4`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Autodetection {
    /// `first-found` / `firstFound` (the default): can pick `cilium_host`.
    FirstFound,
    /// `kubernetes-internal-ip` / `kubernetes: NodeInternalIP`.
    KubernetesInternalIp,
    /// `interface=REGEX`.
    Interface(String),
    /// `skip-interface=REGEX`.
    SkipInterface(String),
    /// `can-reach=DEST`.
    CanReach(String),
    /// `cidr=CIDR,...`.
    Cidrs(Vec<Ipv4Net>),
}

impl Autodetection {
    /// True when this method could select Cilium's `cilium_host` / `cilium_net` interfaces.
    ///
    /// Regexes are judged by a conservative reading (see the preflight rule's docs).
    #[must_use]
    pub fn may_pick_cilium_interface(&self) -> bool {
        match self {
            Autodetection::FirstFound => true,
            Autodetection::KubernetesInternalIp
            | Autodetection::CanReach(_)
            | Autodetection::Cidrs(_) => false,
            Autodetection::Interface(re) => crate::preflight::interface_regex_may_match_cilium(re),
            Autodetection::SkipInterface(re) => {
                !crate::preflight::skip_interface_regex_excludes_cilium(re)
            }
        }
    }
}

/// Calico's dataplane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dataplane {
    /// iptables (supported by Cilium's migration procedure).
    Iptables,
    /// nftables (routes through the Linux stack: supported).
    Nftables,
    /// eBPF: outside Cilium's procedure.
    Bpf,
    /// VPP: outside Cilium's procedure.
    Vpp,
}

/// How Calico was installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CalicoInstall {
    /// Tigera operator (`Installation default`, `calico-system`).
    Operator,
    /// Plain manifests (`kube-system/calico-node`).
    Manifest,
}

/// The old CNI's facts that matter for the migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalicoFacts {
    /// How Calico was installed.
    pub install: CalicoInstall,
    /// IP pools.
    pub ip_pools: Vec<IpPool>,
    /// Felix `vxlanPort` (default 4789).
    pub vxlan_port: u16,
    /// Node address autodetection.
    pub autodetection: Autodetection,
    /// Dataplane.
    pub dataplane: Dataplane,
    /// BGP enabled (native routing).
    pub bgp: bool,
}

impl Default for CalicoFacts {
    fn default() -> Self {
        CalicoFacts {
            install: CalicoInstall::Operator,
            ip_pools: Vec::new(),
            vxlan_port: 4789,
            autodetection: Autodetection::FirstFound,
            dataplane: Dataplane::Iptables,
            bgp: false,
        }
    }
}

/// Everything preflight and the planner read: one consistent view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSnapshot {
    /// Nodes.
    pub nodes: Vec<Node>,
    /// Pods (all namespaces).
    pub pods: Vec<Pod>,
    /// PodDisruptionBudgets.
    pub pdbs: Vec<Pdb>,
    /// Calico's facts.
    pub calico: CalicoFacts,
    /// The service CIDR.
    pub service_cidr: Ipv4Net,
    /// The cluster CIDR (kube-controller-manager `--cluster-cidr`), if known.
    pub cluster_cidr: Option<Ipv4Net>,
    /// Other routed networks the user declared (VPN, peered VPCs…), checked for overlap.
    #[serde(default)]
    pub other_routed: Vec<Ipv4Net>,
    /// A connectivity checker (Goldpinger) is deployed.
    pub connectivity_checker: bool,
    /// The Cilium agent's resource requests (from the chart or the live DaemonSet).
    pub cilium_agent_requests: Resources,
    /// The migration records on the nodes, left by an earlier run that stopped or was killed
    /// (empty before the first run). Preflight reads them to tell that run's own effects (nodes
    /// it cordoned, pods it evicted that are still being replaced) from problems.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub records: BTreeMap<NodeName, crate::machine::NodeRecord>,
    /// Nodes whose agent config and CNI directory the adapter cannot observe, with why
    /// ([`Inventory::unobservable`](crate::ports::Inventory::unobservable)).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unobservable: BTreeMap<NodeName, String>,
}

impl ClusterSnapshot {
    /// The node named `name`.
    #[must_use]
    pub fn node(&self, name: &NodeName) -> Option<&Node> {
        self.nodes.iter().find(|n| &n.name == name)
    }
}
