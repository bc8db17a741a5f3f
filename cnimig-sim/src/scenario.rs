//! The description of a simulated cluster: nodes, workloads, budgets, Calico, and the timings the
//! simulation uses.
//!
//! A scenario is compact YAML a person can write: workloads are described once with a replica
//! count and the simulator expands them into pods, and groups of alike nodes take a `count`.
//!
//! ```yaml
//! nodes:
//!   - {name: cp, count: 3, roles: [control-plane, etcd], zones: [a, b, c], cpu: 4, memory: 16Gi}
//!   - {name: worker, count: 6, zones: [a, b, c], cpu: 8, memory: 32Gi}
//! workloads:
//!   - {kind: Deployment, name: web, namespace: shop, replicas: 4, pdb: {maxUnavailable: 1}}
//!   - {kind: StatefulSet, name: db, namespace: shop, replicas: 3, pdb: {minAvailable: 2}}
//!   - {kind: DaemonSet, name: calico-node, namespace: kube-system, hostNetwork: true}
//!   - {kind: StaticPod, name: kube-apiserver, namespace: kube-system, hostNetwork: true}
//! calico:
//!   pools: [{name: default-ipv4-ippool, cidr: 10.42.0.0/16, encapsulation: VXLAN}]
//!   autodetection: kubernetes-internal-ip
//! serviceCIDR: 10.43.0.0/16
//! connectivityChecker: true
//! ```
//!
//! [`Scenario::from_yaml`] rejects unknown fields and validates everything; every problem names
//! the object and field and says how to fix it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use cnimig_core::model::{
    Autodetection, CalicoFacts, CalicoInstall, Dataplane, Encapsulation, IntOrPercent, IpPool,
    NodeName, NodeRole, Resources,
};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub use crate::quantity::{Amount, Cpu, Dur, Memory};

/// At most this many nodes in a scenario (keeps a hostile scenario from exhausting memory).
pub const MAX_NODES: usize = 100_000;
/// At most this many pods in a scenario.
pub const MAX_PODS: u64 = 1_000_000;

/// A simulated cluster. See the [module docs](self) for the YAML form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Scenario {
    /// A name for reports.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Nodes (or groups of alike nodes), in order.
    pub nodes: Vec<NodeSpec>,
    /// Workloads; the simulator expands them into pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<WorkloadSpec>,
    /// Budgets beyond the ones declared on workloads (e.g. one spanning several workloads).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pdbs: Vec<PdbDecl>,
    /// Calico.
    #[serde(default)]
    pub calico: CalicoSpec,
    /// The service CIDR.
    #[serde(default = "default_service_cidr", rename = "serviceCIDR")]
    pub service_cidr: Ipv4Net,
    /// The cluster CIDR (`--cluster-cidr`), if the cluster declares one.
    #[serde(
        default,
        rename = "clusterCIDR",
        skip_serializing_if = "Option::is_none"
    )]
    pub cluster_cidr: Option<Ipv4Net>,
    /// Where node InternalIPs come from (in node order) unless a node sets `internalIP`.
    #[serde(default = "default_node_cidr", rename = "nodeCIDR")]
    pub node_cidr: Ipv4Net,
    /// A connectivity checker (Goldpinger) is deployed.
    #[serde(default)]
    pub connectivity_checker: bool,
    /// The Cilium agent's requests (its DaemonSet is added by `install_cilium`).
    #[serde(default = "default_agent_requests")]
    pub cilium_agent: Requests,
}

fn default_service_cidr() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 43, 0, 0), 16).unwrap_or_default()
}
fn default_node_cidr() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(172, 20, 0, 0), 16).unwrap_or_default()
}
fn default_agent_requests() -> Requests {
    Requests {
        cpu: Cpu(100),
        memory: Memory::mib(128),
    }
}
fn yes() -> bool {
    true
}
fn is_false(b: &bool) -> bool {
    !*b
}
fn is_true(b: &bool) -> bool {
    *b
}

/// CPU and memory requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requests {
    /// CPU.
    #[serde(default)]
    pub cpu: Cpu,
    /// Memory.
    #[serde(default)]
    pub memory: Memory,
}

impl Requests {
    /// As the model's resources.
    #[must_use]
    pub fn resources(self) -> Resources {
        Resources {
            cpu_millis: self.cpu.0,
            memory_bytes: self.memory.0,
        }
    }
}

/// A node, or with `count` a group of alike nodes named `NAME-1` … `NAME-N`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    /// Node name (or the group's name prefix).
    pub name: String,
    /// Expand into this many nodes named `NAME-1` … (zero-padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Roles (default: worker).
    #[serde(default = "worker_roles")]
    pub roles: Vec<NodeRole>,
    /// Zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// For a group: zones assigned round-robin.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<String>,
    /// Allocatable CPU (default 8 cores).
    #[serde(default = "default_node_cpu")]
    pub cpu: Cpu,
    /// Allocatable memory (default 32Gi).
    #[serde(default = "default_node_memory")]
    pub memory: Memory,
    /// Cordoned before the migration.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cordoned: bool,
    /// The Ready condition.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub ready: bool,
    /// Extra labels (role, zone and hostname labels are added).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// InternalIP (default: from `nodeCIDR` in node order). Not with `count`.
    #[serde(
        default,
        rename = "internalIP",
        skip_serializing_if = "Option::is_none"
    )]
    pub internal_ip: Option<Ipv4Addr>,
}

fn worker_roles() -> Vec<NodeRole> {
    vec![NodeRole::Worker]
}
fn default_node_cpu() -> Cpu {
    Cpu::cores(8)
}
fn default_node_memory() -> Memory {
    Memory::gib(32)
}

impl NodeSpec {
    /// A single worker node with default capacity.
    #[must_use]
    pub fn worker(name: &str, zone: Option<&str>) -> NodeSpec {
        NodeSpec {
            name: name.to_string(),
            count: None,
            roles: worker_roles(),
            zone: zone.map(str::to_string),
            zones: Vec::new(),
            cpu: default_node_cpu(),
            memory: default_node_memory(),
            cordoned: false,
            ready: true,
            labels: BTreeMap::new(),
            internal_ip: None,
        }
    }
}

/// What kind of controller owns a workload's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum WorkloadKind {
    /// A Deployment (ReplicaSet): replacements start as soon as a pod starts terminating.
    Deployment,
    /// A StatefulSet: the replacement (same name) starts only after the old pod is gone.
    StatefulSet,
    /// A DaemonSet: one pod per selected node, recreated in place.
    DaemonSet,
    /// A static pod with its mirror pod, one per selected node (default: control-plane nodes).
    StaticPod,
    /// Bare pods without a controller (`replicas` of them): never recreated.
    Pod,
}

/// A workload, described once; the simulator expands it into pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Controller kind.
    pub kind: WorkloadKind,
    /// Name (pods are named after it).
    pub name: String,
    /// Namespace (default `default`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Replicas (Deployment, StatefulSet, Pod; default 1). Not for DaemonSets and static pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// A PodDisruptionBudget named after the workload, selecting its pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pdb: Option<PdbSpec>,
    /// `hostNetwork: true`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub host_network: bool,
    /// Uses a `hostPort`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub host_port: bool,
    /// Mounts an `emptyDir`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub empty_dir: bool,
    /// Tolerates `node.kubernetes.io/unschedulable`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tolerates_unschedulable: bool,
    /// Requests per pod (default 100m CPU, 128Mi).
    #[serde(default = "default_pod_requests")]
    pub requests: Requests,
    /// Pod labels (`app: NAME` is added unless set).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Restrict placement to these nodes (for a Pod: the first is its node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Restrict placement to these zones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<String>,
    /// Restrict placement to nodes with one of these roles.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_roles: Vec<NodeRole>,
}

fn default_namespace() -> String {
    "default".into()
}
fn default_pod_requests() -> Requests {
    Requests {
        cpu: Cpu(100),
        memory: Memory::mib(128),
    }
}

impl WorkloadSpec {
    /// A workload of `kind` with defaults for everything else.
    #[must_use]
    pub fn new(kind: WorkloadKind, namespace: &str, name: &str) -> WorkloadSpec {
        WorkloadSpec {
            kind,
            name: name.to_string(),
            namespace: namespace.to_string(),
            replicas: None,
            pdb: None,
            host_network: false,
            host_port: false,
            empty_dir: false,
            tolerates_unschedulable: false,
            requests: default_pod_requests(),
            labels: BTreeMap::new(),
            nodes: Vec::new(),
            zones: Vec::new(),
            node_roles: Vec::new(),
        }
    }
    /// Sets the replica count.
    #[must_use]
    pub fn replicas(mut self, n: u32) -> Self {
        self.replicas = Some(n);
        self
    }
    /// Sets the budget.
    #[must_use]
    pub fn pdb(mut self, pdb: PdbSpec) -> Self {
        self.pdb = Some(pdb);
        self
    }
    /// Sets `hostNetwork`.
    #[must_use]
    pub fn host_network(mut self, on: bool) -> Self {
        self.host_network = on;
        self
    }
    /// Sets `hostPort`.
    #[must_use]
    pub fn host_port(mut self, on: bool) -> Self {
        self.host_port = on;
        self
    }
    /// Sets the requests.
    #[must_use]
    pub fn requests(mut self, cpu: Cpu, memory: Memory) -> Self {
        self.requests = Requests { cpu, memory };
        self
    }
    /// The replica count in effect.
    #[must_use]
    pub fn replica_count(&self) -> u32 {
        self.replicas.unwrap_or(1)
    }
    /// The pod labels in effect (`app: NAME` unless overridden).
    #[must_use]
    pub fn pod_labels(&self) -> BTreeMap<String, String> {
        let mut l = self.labels.clone();
        l.entry("app".into()).or_insert_with(|| self.name.clone());
        l
    }
}

/// A budget on a workload: exactly one of `minAvailable` / `maxUnavailable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PdbSpec {
    /// `minAvailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<Amount>,
    /// `maxUnavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<Amount>,
}

impl PdbSpec {
    /// `maxUnavailable: n`.
    #[must_use]
    pub fn max_unavailable(n: u32) -> PdbSpec {
        PdbSpec {
            min_available: None,
            max_unavailable: Some(Amount(IntOrPercent::Int(n))),
        }
    }
    /// `minAvailable: n`.
    #[must_use]
    pub fn min_available(n: u32) -> PdbSpec {
        PdbSpec {
            min_available: Some(Amount(IntOrPercent::Int(n))),
            max_unavailable: None,
        }
    }
    /// `minAvailable` or `maxUnavailable` as a percentage.
    #[must_use]
    pub fn percent(min: bool, p: u32) -> PdbSpec {
        let a = Some(Amount(IntOrPercent::Percent(p)));
        if min {
            PdbSpec {
                min_available: a,
                max_unavailable: None,
            }
        } else {
            PdbSpec {
                min_available: None,
                max_unavailable: a,
            }
        }
    }
    /// The budget, when exactly one amount is set.
    #[must_use]
    pub fn budget(&self) -> Option<cnimig_core::model::Budget> {
        use cnimig_core::model::Budget;
        match (self.min_available, self.max_unavailable) {
            (Some(a), None) => Some(Budget::MinAvailable(a.0)),
            (None, Some(a)) => Some(Budget::MaxUnavailable(a.0)),
            _ => None,
        }
    }
}

/// A standalone budget selecting pods by labels in its namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PdbDecl {
    /// Name.
    pub name: String,
    /// Namespace (default `default`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// `matchLabels` (empty selects every pod in the namespace).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// `minAvailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<Amount>,
    /// `maxUnavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<Amount>,
}

/// Calico's encapsulation, spelled as in the operator's `Installation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EncapsulationSpec {
    /// IP-in-IP.
    #[serde(rename = "IPIP")]
    Ipip,
    /// IP-in-IP across subnets.
    #[serde(rename = "IPIPCrossSubnet")]
    IpipCrossSubnet,
    /// VXLAN.
    #[serde(rename = "VXLAN")]
    Vxlan,
    /// VXLAN across subnets.
    #[serde(rename = "VXLANCrossSubnet")]
    VxlanCrossSubnet,
    /// None (BGP).
    None,
}

impl From<EncapsulationSpec> for Encapsulation {
    fn from(e: EncapsulationSpec) -> Self {
        match e {
            EncapsulationSpec::Ipip => Encapsulation::Ipip,
            EncapsulationSpec::IpipCrossSubnet => Encapsulation::IpipCrossSubnet,
            EncapsulationSpec::Vxlan => Encapsulation::Vxlan,
            EncapsulationSpec::VxlanCrossSubnet => Encapsulation::VxlanCrossSubnet,
            EncapsulationSpec::None => Encapsulation::None,
        }
    }
}

/// A Calico IP pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolSpec {
    /// Name.
    pub name: String,
    /// CIDR.
    pub cidr: Ipv4Net,
    /// Encapsulation (default VXLAN).
    #[serde(default = "default_encap")]
    pub encapsulation: EncapsulationSpec,
    /// `natOutgoing` (default true).
    #[serde(default = "yes")]
    pub nat_outgoing: bool,
    /// `disabled`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
    /// Per-node block prefix length (default 26).
    #[serde(default = "default_block_size")]
    pub block_size: u8,
}

fn default_encap() -> EncapsulationSpec {
    EncapsulationSpec::Vxlan
}
fn default_block_size() -> u8 {
    26
}

/// How Calico was installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstallSpec {
    /// Tigera operator.
    Operator,
    /// Manifests.
    Manifest,
}

/// Calico's dataplane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneSpec {
    /// iptables.
    Iptables,
    /// nftables.
    Nftables,
    /// eBPF.
    Bpf,
    /// VPP.
    Vpp,
}

/// Calico, as the scenario describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CalicoSpec {
    /// How Calico was installed (default operator).
    #[serde(default = "default_install")]
    pub install: InstallSpec,
    /// IP pools (default one VXLAN pool `10.42.0.0/16`).
    #[serde(default = "default_pools")]
    pub pools: Vec<PoolSpec>,
    /// Felix `vxlanPort` (default 4789).
    #[serde(default = "default_vxlan_port")]
    pub vxlan_port: u16,
    /// `IP_AUTODETECTION_METHOD` syntax: `first-found` (Calico's default),
    /// `kubernetes-internal-ip`, `interface=REGEX`, `skip-interface=REGEX`, `can-reach=DEST`,
    /// `cidr=CIDR,...`.
    #[serde(default = "default_autodetection")]
    pub autodetection: String,
    /// Dataplane (default iptables).
    #[serde(default = "default_dataplane")]
    pub dataplane: DataplaneSpec,
    /// BGP enabled.
    #[serde(default, skip_serializing_if = "is_false")]
    pub bgp: bool,
}

fn default_install() -> InstallSpec {
    InstallSpec::Operator
}
fn default_pools() -> Vec<PoolSpec> {
    vec![PoolSpec {
        name: "default-ipv4-ippool".into(),
        cidr: Ipv4Net::new(Ipv4Addr::new(10, 42, 0, 0), 16).unwrap_or_default(),
        encapsulation: EncapsulationSpec::Vxlan,
        nat_outgoing: true,
        disabled: false,
        block_size: 26,
    }]
}
fn default_vxlan_port() -> u16 {
    4789
}
fn default_autodetection() -> String {
    "first-found".into()
}
fn default_dataplane() -> DataplaneSpec {
    DataplaneSpec::Iptables
}

impl Default for CalicoSpec {
    fn default() -> Self {
        CalicoSpec {
            install: default_install(),
            pools: default_pools(),
            vxlan_port: default_vxlan_port(),
            autodetection: default_autodetection(),
            dataplane: default_dataplane(),
            bgp: false,
        }
    }
}

/// Parses Calico's `IP_AUTODETECTION_METHOD` syntax.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_autodetection(s: &str) -> Result<Autodetection, String> {
    let t = s.trim();
    let bad = || {
        format!(
            "{s:?} is not a Calico autodetection method; use first-found, kubernetes-internal-ip, interface=REGEX, skip-interface=REGEX, can-reach=DEST or cidr=CIDR[,CIDR]"
        )
    };
    match t {
        "first-found" | "firstFound" => return Ok(Autodetection::FirstFound),
        "kubernetes-internal-ip" | "kubernetes: NodeInternalIP" => {
            return Ok(Autodetection::KubernetesInternalIp);
        }
        _ => {}
    }
    let (k, v) = t.split_once('=').ok_or_else(bad)?;
    match k {
        "interface" => Ok(Autodetection::Interface(v.to_string())),
        "skip-interface" => Ok(Autodetection::SkipInterface(v.to_string())),
        "can-reach" => Ok(Autodetection::CanReach(v.to_string())),
        "cidr" | "cidrs" => v
            .split(',')
            .map(|c| c.trim().parse::<Ipv4Net>().map_err(|_| bad()))
            .collect::<Result<Vec<_>, _>>()
            .map(Autodetection::Cidrs),
        _ => Err(bad()),
    }
}

/// Renders an autodetection method in `IP_AUTODETECTION_METHOD` syntax.
#[must_use]
pub fn autodetection_string(a: &Autodetection) -> String {
    match a {
        Autodetection::FirstFound => "first-found".into(),
        Autodetection::KubernetesInternalIp => "kubernetes-internal-ip".into(),
        Autodetection::Interface(r) => format!("interface={r}"),
        Autodetection::SkipInterface(r) => format!("skip-interface={r}"),
        Autodetection::CanReach(r) => format!("can-reach={r}"),
        Autodetection::Cidrs(c) => format!(
            "cidr={}",
            c.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

impl CalicoSpec {
    /// Calico's facts as the model has them.
    ///
    /// # Errors
    /// When the autodetection method does not parse.
    pub fn facts(&self) -> Result<CalicoFacts, String> {
        Ok(CalicoFacts {
            install: match self.install {
                InstallSpec::Operator => CalicoInstall::Operator,
                InstallSpec::Manifest => CalicoInstall::Manifest,
            },
            ip_pools: self
                .pools
                .iter()
                .map(|p| IpPool {
                    name: p.name.clone(),
                    cidr: p.cidr,
                    encapsulation: p.encapsulation.into(),
                    nat_outgoing: p.nat_outgoing,
                    disabled: p.disabled,
                })
                .collect(),
            vxlan_port: self.vxlan_port,
            autodetection: parse_autodetection(&self.autodetection)?,
            dataplane: match self.dataplane {
                DataplaneSpec::Iptables => Dataplane::Iptables,
                DataplaneSpec::Nftables => Dataplane::Nftables,
                DataplaneSpec::Bpf => Dataplane::Bpf,
                DataplaneSpec::Vpp => Dataplane::Vpp,
            },
            bgp: self.bgp,
        })
    }
}

/// A range of durations; the simulator draws uniformly from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Span {
    /// Shortest.
    pub min: Dur,
    /// Longest.
    pub max: Dur,
}

impl Span {
    /// From whole seconds.
    #[must_use]
    pub const fn secs(min: u64, max: u64) -> Span {
        Span {
            min: Dur(Duration::from_secs(min)),
            max: Dur(Duration::from_secs(max)),
        }
    }
    /// A fixed duration.
    #[must_use]
    pub const fn fixed(d: Duration) -> Span {
        Span {
            min: Dur(d),
            max: Dur(d),
        }
    }
}

/// How long things take in the simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimParams {
    /// From deletion (eviction) to the pod being gone (default 2–30 s).
    #[serde(default = "d_term")]
    pub pod_termination: Span,
    /// From a pod's start (sandbox) to Ready (default 3–20 s).
    #[serde(default = "d_ready")]
    pub pod_ready: Span,
    /// From a Cilium agent pod's start to Ready (default 20–60 s).
    #[serde(default = "d_agent")]
    pub agent_ready: Span,
    /// How long the helper pod restoring Calico's CNI config takes (default 3–10 s).
    #[serde(default = "d_restore")]
    pub cni_restore: Span,
}

fn d_term() -> Span {
    Span::secs(2, 30)
}
fn d_ready() -> Span {
    Span::secs(3, 20)
}
fn d_agent() -> Span {
    Span::secs(20, 60)
}
fn d_restore() -> Span {
    Span::secs(3, 10)
}

impl Default for SimParams {
    fn default() -> Self {
        SimParams {
            pod_termination: d_term(),
            pod_ready: d_ready(),
            agent_ready: d_agent(),
            cni_restore: d_restore(),
        }
    }
}

impl SimParams {
    /// Every duration fixed at `d` (handy in tests).
    #[must_use]
    pub fn fixed(d: Duration) -> SimParams {
        let s = Span::fixed(d);
        SimParams {
            pod_termination: s,
            pod_ready: s,
            agent_ready: s,
            cni_restore: s,
        }
    }
}

/// One thing wrong with a scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioProblem {
    /// The object, e.g. `nodes[2] (worker-2)` or `workloads[0] (shop/web)`.
    pub object: String,
    /// The field, as spelled in YAML.
    pub field: String,
    /// What is wrong.
    pub problem: String,
    /// What to do.
    pub fix: String,
}

impl fmt::Display for ScenarioProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} field `{}`: {}. Fix: {}",
            self.object, self.field, self.problem, self.fix
        )
    }
}

/// A scenario that does not parse or does not make sense; lists every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ScenarioError(pub Vec<ScenarioProblem>);

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "the scenario has {} problem(s):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

fn problem(
    object: impl Into<String>,
    field: &str,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> ScenarioProblem {
    ScenarioProblem {
        object: object.into(),
        field: field.to_string(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// A node after expanding groups: what the simulator builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpandedNode {
    /// Name.
    pub name: NodeName,
    /// Roles.
    pub roles: Vec<NodeRole>,
    /// Zone.
    pub zone: Option<String>,
    /// Allocatable.
    pub allocatable: Resources,
    /// Cordoned before the run.
    pub cordoned: bool,
    /// Ready.
    pub ready: bool,
    /// All labels (hostname, zone and role labels included).
    pub labels: BTreeMap<String, String>,
    /// InternalIP.
    pub internal_ip: Ipv4Addr,
}

/// True for a DNS-1123 label (namespaces, workload names).
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && (s.is_empty()
            || (s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.ends_with(|c: char| c.is_ascii_alphanumeric())))
}

fn check_labels(
    out: &mut Vec<ScenarioProblem>,
    object: &str,
    field: &str,
    labels: &BTreeMap<String, String>,
) {
    for (k, v) in labels {
        if let Err(why) = cnimig_core::config::validate_label_key(k) {
            out.push(problem(
                object,
                field,
                format!("label key {k:?}: {why}"),
                "use a key such as app or example.com/tier",
            ));
        }
        if !is_label_value(v) {
            out.push(problem(
                object,
                field,
                format!("label {k:?} has value {v:?}, which is not a label value"),
                "use at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
            ));
        }
    }
}

fn check_cidr(out: &mut Vec<ScenarioProblem>, object: &str, field: &str, c: &Ipv4Net) {
    if *c != c.trunc() {
        out.push(problem(
            object,
            field,
            format!("{c} has host bits set"),
            format!("use the network address {}", c.trunc()),
        ));
    }
}

fn check_budget(
    out: &mut Vec<ScenarioProblem>,
    object: &str,
    min: Option<Amount>,
    max: Option<Amount>,
) {
    match (min, max) {
        (Some(_), Some(_)) => out.push(problem(
            object,
            "pdb",
            "both minAvailable and maxUnavailable are set",
            "keep one of them",
        )),
        (None, None) => out.push(problem(
            object,
            "pdb",
            "neither minAvailable nor maxUnavailable is set",
            "set one, e.g. maxUnavailable: 1",
        )),
        _ => {}
    }
    for a in [min, max].into_iter().flatten() {
        if let IntOrPercent::Percent(p) = a.0
            && p > 100
        {
            out.push(problem(
                object,
                "pdb",
                format!("{p}% is more than 100%"),
                "use a percentage between 0% and 100%",
            ));
        }
    }
}

impl Scenario {
    /// Parses and validates a scenario.
    ///
    /// # Errors
    /// Every problem found, each naming the object, the field and the fix.
    pub fn from_yaml(text: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = serde_yaml_ng::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!(" (line {} column {})", l.line(), l.column()))
                .unwrap_or_default();
            ScenarioError(vec![problem(
                format!("the document{at}"),
                "(document)",
                format!("not a valid scenario: {e}"),
                "check the YAML against the documented fields (nodes, workloads, pdbs, calico, serviceCIDR, clusterCIDR, nodeCIDR, connectivityChecker, ciliumAgent)",
            )])
        })?;
        s.validate()?;
        Ok(s)
    }

    /// The scenario as YAML (parses back to an equal scenario).
    #[must_use]
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_default()
    }

    /// Checks the scenario. [`Scenario::from_yaml`] and `SimCluster::new` call it.
    ///
    /// # Errors
    /// Every problem found.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let mut out = Vec::new();
        let nodes = self.expand_nodes_inner(&mut out);
        let names: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        let zones: BTreeSet<&str> = nodes.iter().filter_map(|n| n.zone.as_deref()).collect();
        let mut workload_keys = BTreeSet::new();
        let mut pdb_keys = BTreeSet::new();
        let mut total_pods: u64 = 0;
        let mut placements = Placements::new(&nodes);
        for (i, w) in self.workloads.iter().enumerate() {
            let obj = format!("workloads[{i}] ({}/{})", w.namespace, w.name);
            if !is_dns_label(&w.name) {
                out.push(problem(
                    &obj,
                    "name",
                    format!("{:?} is not a DNS-1123 label", w.name),
                    "use lower-case letters, digits and '-', at most 63 characters",
                ));
            }
            if !is_dns_label(&w.namespace) {
                out.push(problem(
                    &obj,
                    "namespace",
                    format!("{:?} is not a DNS-1123 label", w.namespace),
                    "use lower-case letters, digits and '-', at most 63 characters",
                ));
            }
            if !workload_keys.insert((w.namespace.clone(), w.name.clone())) {
                out.push(problem(
                    &obj,
                    "name",
                    "another workload in the namespace has this name (their pods would clash)",
                    "give each workload in a namespace its own name",
                ));
            }
            if w.namespace == "kube-system" && w.name == "cilium" {
                out.push(problem(
                    &obj,
                    "name",
                    "kube-system/cilium is the Cilium agent, which install_cilium adds",
                    "remove this workload and set ciliumAgent requests instead",
                ));
            }
            if matches!(w.kind, WorkloadKind::DaemonSet | WorkloadKind::StaticPod)
                && w.replicas.is_some()
            {
                out.push(problem(
                    &obj,
                    "replicas",
                    format!(
                        "a {:?} runs one pod per selected node, so replicas means nothing",
                        w.kind
                    ),
                    "remove replicas; restrict placement with nodes, zones or nodeRoles",
                ));
            }
            if let Some(p) = &w.pdb {
                if matches!(w.kind, WorkloadKind::StaticPod | WorkloadKind::Pod) {
                    out.push(problem(
                        &obj,
                        "pdb",
                        format!("a budget on a {:?} is not supported here", w.kind),
                        "declare it under pdbs with a selector instead",
                    ));
                }
                check_budget(&mut out, &obj, p.min_available, p.max_unavailable);
                pdb_keys.insert((w.namespace.clone(), w.name.clone()));
            }
            check_labels(&mut out, &obj, "labels", &w.labels);
            for n in &w.nodes {
                if !names.contains(n.as_str()) {
                    out.push(problem(
                        &obj,
                        "nodes",
                        format!("node {n:?} is not in the scenario"),
                        "name a node listed under nodes (groups expand to NAME-1, NAME-2, …)",
                    ));
                }
            }
            for z in &w.zones {
                if !zones.contains(z.as_str()) {
                    out.push(problem(
                        &obj,
                        "zones",
                        format!("no node is in zone {z:?}"),
                        "name a zone some node is in",
                    ));
                }
            }
            if w.kind == WorkloadKind::Pod && w.nodes.len() > 1 {
                out.push(problem(
                    &obj,
                    "nodes",
                    "a bare pod is bound to one node",
                    "list at most one node",
                ));
            }
            let selected = placements.selected(w).len();
            let per = match w.kind {
                WorkloadKind::DaemonSet | WorkloadKind::StaticPod => selected as u64,
                _ => u64::from(w.replica_count()),
            };
            total_pods = total_pods.saturating_add(per);
            if selected == 0
                && !nodes.is_empty()
                && (per > 0 || matches!(w.kind, WorkloadKind::DaemonSet | WorkloadKind::StaticPod))
            {
                out.push(problem(
                    &obj,
                    "nodes",
                    "the placement (nodes, zones, nodeRoles) selects no node",
                    "loosen the placement so at least one node matches",
                ));
            }
        }
        if total_pods > MAX_PODS {
            out.push(problem("workloads", "replicas", format!("the workloads add up to {total_pods} pods, more than the simulator's limit of {MAX_PODS}"), "use fewer replicas or nodes"));
        }
        for (i, p) in self.pdbs.iter().enumerate() {
            let obj = format!("pdbs[{i}] ({}/{})", p.namespace, p.name);
            if !is_dns_label(&p.name) && NodeName::new(p.name.clone()).is_err() {
                out.push(problem(
                    &obj,
                    "name",
                    format!("{:?} is not a valid object name", p.name),
                    "use lower-case letters, digits, '-' and '.'",
                ));
            }
            if !is_dns_label(&p.namespace) {
                out.push(problem(
                    &obj,
                    "namespace",
                    format!("{:?} is not a DNS-1123 label", p.namespace),
                    "use lower-case letters, digits and '-'",
                ));
            }
            if !pdb_keys.insert((p.namespace.clone(), p.name.clone())) {
                out.push(problem(&obj, "name", "another budget in the namespace has this name (a workload's budget is named after the workload)", "rename it"));
            }
            check_labels(&mut out, &obj, "selector", &p.selector);
            check_budget(&mut out, &obj, p.min_available, p.max_unavailable);
        }
        let c = &self.calico;
        if let Err(e) = parse_autodetection(&c.autodetection) {
            out.push(problem(
                "calico",
                "autodetection",
                e,
                "use kubernetes-internal-ip (safe with Cilium) or first-found",
            ));
        }
        if c.vxlan_port == 0 {
            out.push(problem(
                "calico",
                "vxlanPort",
                "port 0 is not a port",
                "use Felix's default 4789",
            ));
        }
        if !c.pools.iter().any(|p| !p.disabled) {
            out.push(problem(
                "calico",
                "pools",
                "no enabled IP pool, so Calico pods could get no address",
                "add a pool such as {name: default-ipv4-ippool, cidr: 10.42.0.0/16}",
            ));
        }
        for (i, p) in c.pools.iter().enumerate() {
            let obj = format!("calico.pools[{i}] ({})", p.name);
            check_cidr(&mut out, &obj, "cidr", &p.cidr);
            if p.block_size < p.cidr.prefix_len() || p.block_size > 32 {
                out.push(problem(
                    &obj,
                    "blockSize",
                    format!("/{} does not fit in {}", p.block_size, p.cidr),
                    format!(
                        "use a prefix length between {} and 32 (Calico's default is 26)",
                        p.cidr.prefix_len()
                    ),
                ));
            }
        }
        check_cidr(&mut out, "the scenario", "serviceCIDR", &self.service_cidr);
        if let Some(cc) = &self.cluster_cidr {
            check_cidr(&mut out, "the scenario", "clusterCIDR", cc);
        }
        check_cidr(&mut out, "the scenario", "nodeCIDR", &self.node_cidr);
        let room = 1u64 << (32 - u32::from(self.node_cidr.prefix_len()).min(32));
        if (nodes.len() as u64).saturating_add(12) > room {
            out.push(problem(
                "the scenario",
                "nodeCIDR",
                format!(
                    "{} has room for {} addresses, too few for {} nodes",
                    self.node_cidr,
                    room.saturating_sub(12),
                    nodes.len()
                ),
                "use a larger range such as 172.20.0.0/16",
            ));
        }
        if out.is_empty() {
            Ok(())
        } else {
            Err(ScenarioError(out))
        }
    }

    /// The nodes after expanding groups, in order.
    ///
    /// # Errors
    /// When the scenario is invalid.
    pub fn expand_nodes(&self) -> Result<Vec<ExpandedNode>, ScenarioError> {
        let mut out = Vec::new();
        let nodes = self.expand_nodes_inner(&mut out);
        if out.is_empty() {
            Ok(nodes)
        } else {
            Err(ScenarioError(out))
        }
    }

    fn expand_nodes_inner(&self, out: &mut Vec<ScenarioProblem>) -> Vec<ExpandedNode> {
        let mut nodes: Vec<ExpandedNode> = Vec::new();
        let mut seen = BTreeSet::new();
        if self.nodes.is_empty() {
            out.push(problem(
                "the scenario",
                "nodes",
                "there are no nodes",
                "list at least one node",
            ));
        }
        let total: u64 = self
            .nodes
            .iter()
            .map(|n| u64::from(n.count.unwrap_or(1)))
            .sum();
        if total > MAX_NODES as u64 {
            out.push(problem(
                "the scenario",
                "nodes",
                format!("{total} nodes is more than the simulator's limit of {MAX_NODES}"),
                "use fewer nodes",
            ));
            return nodes;
        }
        let base = u32::from(self.node_cidr.network());
        for (i, spec) in self.nodes.iter().enumerate() {
            let obj = format!("nodes[{i}] ({})", spec.name);
            if spec.zone.is_some() && !spec.zones.is_empty() {
                out.push(problem(
                    &obj,
                    "zones",
                    "both zone and zones are set",
                    "use zone for one node, zones for a group",
                ));
            }
            if spec.count.is_none() && spec.zones.len() > 1 {
                out.push(problem(
                    &obj,
                    "zones",
                    "several zones on a single node",
                    "use zone, or add count to make a group",
                ));
            }
            if spec.count.is_some() && spec.internal_ip.is_some() {
                out.push(problem(
                    &obj,
                    "internalIP",
                    "a group of nodes cannot share one address",
                    "remove internalIP (addresses come from nodeCIDR) or list the nodes one by one",
                ));
            }
            if spec.count == Some(0) {
                out.push(problem(
                    &obj,
                    "count",
                    "a group of zero nodes",
                    "remove the entry or use count: 1 or more",
                ));
            }
            if spec.roles.is_empty() {
                out.push(problem(
                    &obj,
                    "roles",
                    "no role",
                    "use [worker], [control-plane, etcd] or similar",
                ));
            }
            check_labels(out, &obj, "labels", &spec.labels);
            for z in spec.zone.iter().chain(spec.zones.iter()) {
                if !is_label_value(z) || z.is_empty() {
                    out.push(problem(
                        &obj,
                        "zone",
                        format!("{z:?} is not a label value"),
                        "use a zone name such as eu-west-1a",
                    ));
                }
            }
            let names: Vec<String> = match spec.count {
                None => vec![spec.name.clone()],
                Some(c) => {
                    let width = c.to_string().len();
                    (1..=c)
                        .map(|k| format!("{}-{k:0width$}", spec.name))
                        .collect()
                }
            };
            for (k, raw) in names.into_iter().enumerate() {
                let name = match NodeName::new(raw) {
                    Ok(n) => n,
                    Err(e) => {
                        out.push(problem(
                            &obj,
                            "name",
                            e.to_string(),
                            "use a lower-case name such as worker-1",
                        ));
                        break; // once per group
                    }
                };
                if !seen.insert(name.clone()) {
                    out.push(problem(
                        &obj,
                        "name",
                        format!("node {name} appears twice"),
                        "give every node its own name",
                    ));
                    continue;
                }
                let zone = spec.zone.clone().or_else(|| {
                    (!spec.zones.is_empty()).then(|| spec.zones[k % spec.zones.len()].clone())
                });
                let mut labels = BTreeMap::new();
                labels.insert("kubernetes.io/hostname".to_string(), name.to_string());
                labels.insert("kubernetes.io/os".to_string(), "linux".to_string());
                if let Some(z) = &zone {
                    labels.insert("topology.kubernetes.io/zone".to_string(), z.clone());
                }
                for r in &spec.roles {
                    let key = match r {
                        NodeRole::ControlPlane => "node-role.kubernetes.io/control-plane",
                        NodeRole::Etcd => "node-role.kubernetes.io/etcd",
                        NodeRole::Worker => "node-role.kubernetes.io/worker",
                    };
                    labels.insert(key.to_string(), "true".to_string());
                }
                labels.extend(spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
                let idx = nodes.len() as u32;
                let internal_ip = spec
                    .internal_ip
                    .unwrap_or_else(|| Ipv4Addr::from(base.wrapping_add(10).wrapping_add(idx)));
                nodes.push(ExpandedNode {
                    name,
                    roles: spec.roles.clone(),
                    zone,
                    allocatable: Resources {
                        cpu_millis: spec.cpu.0,
                        memory_bytes: spec.memory.0,
                    },
                    cordoned: spec.cordoned,
                    ready: spec.ready,
                    labels,
                    internal_ip,
                });
            }
        }
        nodes
    }
}

type PlacementKey = (Vec<String>, Vec<String>, Vec<NodeRole>, bool);

/// Which nodes workloads' placements select, computed once per distinct placement.
pub(crate) struct Placements<'a> {
    nodes: &'a [ExpandedNode],
    lists: BTreeMap<PlacementKey, Arc<Vec<usize>>>,
    masks: BTreeMap<PlacementKey, Arc<Vec<bool>>>,
}

impl<'a> Placements<'a> {
    pub(crate) fn new(nodes: &'a [ExpandedNode]) -> Self {
        Placements {
            nodes,
            lists: BTreeMap::new(),
            masks: BTreeMap::new(),
        }
    }

    fn key(w: &WorkloadSpec) -> PlacementKey {
        (
            w.nodes.clone(),
            w.zones.clone(),
            w.node_roles.clone(),
            w.kind == WorkloadKind::StaticPod,
        )
    }

    /// Indexes of the nodes `w` may run on.
    pub(crate) fn selected(&mut self, w: &WorkloadSpec) -> Arc<Vec<usize>> {
        let nodes = self.nodes;
        Arc::clone(self.lists.entry(Self::key(w)).or_insert_with(|| {
            Arc::new(
                nodes
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| placement_allows(w, n))
                    .map(|(i, _)| i)
                    .collect(),
            )
        }))
    }

    /// The same as a mask by node index.
    pub(crate) fn mask(&mut self, w: &WorkloadSpec) -> Arc<Vec<bool>> {
        let nodes = self.nodes;
        Arc::clone(
            self.masks.entry(Self::key(w)).or_insert_with(|| {
                Arc::new(nodes.iter().map(|n| placement_allows(w, n)).collect())
            }),
        )
    }
}

/// True when `w`'s placement (nodes, zones, nodeRoles; static pods default to control-plane
/// nodes) allows node `n`.
pub(crate) fn placement_allows(w: &WorkloadSpec, n: &ExpandedNode) -> bool {
    if !w.nodes.is_empty() && !w.nodes.iter().any(|x| x == n.name.as_str()) {
        return false;
    }
    if !w.zones.is_empty() && !n.zone.as_ref().is_some_and(|z| w.zones.contains(z)) {
        return false;
    }
    let roles: &[NodeRole] = if w.node_roles.is_empty()
        && w.nodes.is_empty()
        && w.zones.is_empty()
        && w.kind == WorkloadKind::StaticPod
    {
        &[NodeRole::ControlPlane]
    } else {
        &w.node_roles
    };
    roles.is_empty() || n.roles.iter().any(|r| roles.contains(r))
}
