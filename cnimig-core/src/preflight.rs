//! Preflight: read-only checks over a [`ClusterSnapshot`], each pass / warn / fail with a reason a
//! person can act on.
//!
//! [`preflight`] runs every rule in a fixed order. Every rule emits at least one [`Check`] (a
//! [`Severity::Pass`] when it found nothing), so the report shows that it ran. Check ids are
//! stable kebab-case strings, listed in [`RULE_IDS`]:
//!
//! | id | what it looks at |
//! |---|---|
//! | `pod-cidr-overlap` | the new pod CIDR against Calico's pools, the service and cluster CIDRs, node addresses, Calico pod addresses and other routed networks |
//! | `pod-cidr-capacity` | the new pod CIDR has a per-node block (`maskSize`) for every node |
//! | `tunnel-port` | Cilium's tunnel port against Calico's VXLAN port |
//! | `calico-autodetection` | whether Calico's node address autodetection can pick a Cilium interface |
//! | `calico-dataplane` | Calico's eBPF / VPP dataplane (fail) and native routing (warn) |
//! | `pdb-multiple` | pods covered by more than one PodDisruptionBudget |
//! | `pdb-blocking` | budgets that allow no disruption (fail) or none right now (warn) |
//! | `agent-room` | room on each node for the Cilium agent's requests |
//! | `host-port` | hostPort pods (they need Cilium's portmap chaining) |
//! | `connectivity-checker` | a connectivity checker (Goldpinger) is deployed |
//! | `static-pods` | static pods on the pod network |
//! | `unmanaged-pods` | pods with no controller |
//! | `emptydir-pods` | pods with emptyDir volumes |
//! | `nodes-not-ready` | nodes in scope that are not Ready |
//! | `nodes-cordoned` | nodes in scope that a person already cordoned |
//! | `scope` | node names in the config that do not exist, an empty scope |
//! | `node-observability` | nodes whose agent config and CNI directory the adapter cannot observe (fail) |
//! | `nat-outgoing` | Calico pools whose natOutgoing would SNAT traffic to the new CIDR |
//!
//! Prefix arithmetic is real (two networks overlap when either contains the other's network
//! address), never string prefixes. Messages name at most a few objects, then "and N more".

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::config::MigrationConfig;
use crate::model::{ClusterSnapshot, IpPool, Node, NodeName, Pdb, Pod};

#[cfg(test)]
mod fixture;
mod network;
mod nodes;
mod workloads;

pub use network::{
    CILIUM_INTERFACES, interface_regex_may_match_cilium, skip_interface_regex_excludes_cilium,
};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Severity {
    /// Fine.
    Pass,
    /// Proceed with care; the message says what to watch.
    Warn,
    /// Do not proceed until fixed; the message says how.
    Fail,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Pass => "PASS",
            Severity::Warn => "WARN",
            Severity::Fail => "FAIL",
        })
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable identifier (kebab-case), e.g. `pod-cidr-overlap`.
    pub id: &'static str,
    /// Outcome.
    pub severity: Severity,
    /// What was found and what to do.
    pub message: String,
}

impl Check {
    /// A check with the given outcome.
    #[must_use]
    pub fn new(id: &'static str, severity: Severity, message: impl Into<String>) -> Self {
        Check {
            id,
            severity,
            message: message.into(),
        }
    }
    /// A passed check.
    #[must_use]
    pub fn pass(id: &'static str, message: impl Into<String>) -> Self {
        Check::new(id, Severity::Pass, message)
    }
    /// A warning.
    #[must_use]
    pub fn warn(id: &'static str, message: impl Into<String>) -> Self {
        Check::new(id, Severity::Warn, message)
    }
    /// A failed check.
    #[must_use]
    pub fn fail(id: &'static str, message: impl Into<String>) -> Self {
        Check::new(id, Severity::Fail, message)
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}: {}", self.severity, self.id, self.message)
    }
}

/// All checks.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct PreflightReport {
    /// Results, in rule order.
    pub checks: Vec<Check>,
}

impl PreflightReport {
    /// True when no check failed.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.severity != Severity::Fail)
    }
    /// The failed checks.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.severity == Severity::Fail)
    }
    /// The warnings.
    pub fn warnings(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.severity == Severity::Warn)
    }
    /// The checks a rule produced.
    pub fn with_id<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a Check> + 'a {
        self.checks.iter().filter(move |c| c.id == id)
    }
    /// The worst outcome of a rule (`None` if it produced no check).
    #[must_use]
    pub fn worst(&self, id: &str) -> Option<Severity> {
        self.with_id(id).map(|c| c.severity).max()
    }
}

impl fmt::Display for PreflightReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            writeln!(f, "{c}")?;
        }
        Ok(())
    }
}

/// Every rule's check id, in the order the report lists them.
pub const RULE_IDS: &[&str] = &[
    network::POD_CIDR_OVERLAP,
    network::POD_CIDR_CAPACITY,
    network::TUNNEL_PORT,
    network::CALICO_AUTODETECTION,
    network::CALICO_DATAPLANE,
    workloads::PDB_MULTIPLE,
    workloads::PDB_BLOCKING,
    nodes::AGENT_ROOM,
    workloads::HOST_PORT,
    nodes::CONNECTIVITY_CHECKER,
    workloads::STATIC_PODS,
    workloads::UNMANAGED_PODS,
    workloads::EMPTYDIR_PODS,
    nodes::NODES_NOT_READY,
    nodes::NODES_CORDONED,
    nodes::SCOPE,
    nodes::NODE_OBSERVABILITY,
    network::NAT_OUTGOING,
];

/// Runs every rule. `scope` is the nodes the run will migrate (the config's scope, resolved
/// against the cluster).
#[must_use]
pub fn preflight(
    snapshot: &ClusterSnapshot,
    cfg: &MigrationConfig,
    scope: &[NodeName],
) -> PreflightReport {
    let ctx = Ctx::new(snapshot, cfg, scope);
    let rules: [fn(&Ctx<'_>) -> Vec<Check>; 18] = [
        network::pod_cidr_overlap,
        network::pod_cidr_capacity,
        network::tunnel_port,
        network::calico_autodetection,
        network::calico_dataplane,
        workloads::pdb_multiple,
        workloads::pdb_blocking,
        nodes::agent_room,
        workloads::host_port,
        nodes::connectivity_checker,
        workloads::static_pods,
        workloads::unmanaged_pods,
        workloads::emptydir_pods,
        nodes::nodes_not_ready,
        nodes::nodes_cordoned,
        nodes::scope,
        nodes::node_observability,
        network::nat_outgoing,
    ];
    PreflightReport {
        checks: rules.iter().flat_map(|rule| rule(&ctx)).collect(),
    }
}

/// What every rule reads: the snapshot, the config and the resolved scope.
pub(crate) struct Ctx<'a> {
    snap: &'a ClusterSnapshot,
    cfg: &'a MigrationConfig,
    /// The resolved scope, deduplicated, in the order given.
    scope_list: Vec<&'a NodeName>,
    scope: BTreeSet<&'a NodeName>,
    /// Budgets by namespace and the first of their `matchLabels` (each budget once); budgets
    /// without `matchLabels` are under `(namespace, None)`. Matching a pod then looks only at
    /// budgets that can match one of its labels, not at every budget in its namespace.
    pdbs_by_label: BTreeMap<LabelKey<'a>, Vec<&'a Pdb>>,
    pods_by_ns: BTreeMap<&'a str, Vec<&'a Pod>>,
    /// Pods by namespace and label.
    pods_by_label: BTreeMap<LabelKey<'a>, Vec<&'a Pod>>,
}

/// `(namespace, Some((key, value)))`, or `(namespace, None)` for "no label".
type LabelKey<'a> = (&'a str, Option<(&'a str, &'a str)>);

fn first_label(pdb: &Pdb) -> Option<(&str, &str)> {
    pdb.selector
        .match_labels
        .iter()
        .next()
        .map(|(k, v)| (k.as_str(), v.as_str()))
}

impl<'a> Ctx<'a> {
    fn new(snap: &'a ClusterSnapshot, cfg: &'a MigrationConfig, scope: &'a [NodeName]) -> Self {
        let mut set = BTreeSet::new();
        let scope_list = scope.iter().filter(|n| set.insert(*n)).collect();
        let mut pdbs_by_label: BTreeMap<LabelKey<'_>, Vec<&Pdb>> = BTreeMap::new();
        for p in &snap.pdbs {
            pdbs_by_label
                .entry((p.namespace.as_str(), first_label(p)))
                .or_default()
                .push(p);
        }
        let mut pods_by_ns: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
        let mut pods_by_label: BTreeMap<LabelKey<'_>, Vec<&Pod>> = BTreeMap::new();
        for p in &snap.pods {
            let ns = p.pod.namespace.as_str();
            pods_by_ns.entry(ns).or_default().push(p);
            for (k, v) in p.labels.iter() {
                pods_by_label
                    .entry((ns, Some((k.as_str(), v.as_str()))))
                    .or_default()
                    .push(p);
            }
        }
        Ctx {
            snap,
            cfg,
            scope_list,
            scope: set,
            pdbs_by_label,
            pods_by_ns,
            pods_by_label,
        }
    }

    /// The new pod CIDR, as a network address.
    fn pod_cidr(&self) -> Ipv4Net {
        self.cfg.pod_cidr.trunc()
    }

    /// True when `node` is in scope.
    fn node_in_scope(&self, node: &NodeName) -> bool {
        self.scope.contains(node)
    }

    /// True when `pod` is bound to a node in scope.
    fn pod_in_scope(&self, pod: &Pod) -> bool {
        pod.node.as_ref().is_some_and(|n| self.node_in_scope(n))
    }

    /// The snapshot's nodes that are in scope.
    fn scope_nodes(&self) -> impl Iterator<Item = &'a Node> + '_ {
        self.snap
            .nodes
            .iter()
            .filter(|n| self.node_in_scope(&n.name))
    }

    /// True when the drain of a node in scope would evict `pod` (not a DaemonSet, mirror or
    /// hostNetwork pod, not finished or already terminating).
    fn is_drainable_in_scope(&self, pod: &Pod) -> bool {
        pod.is_drainable() && !pod.terminating && self.pod_in_scope(pod)
    }

    /// Pods the drain of a node in scope would evict.
    fn drainable_in_scope(&self) -> impl Iterator<Item = &'a Pod> + '_ {
        self.snap
            .pods
            .iter()
            .filter(|p| self.is_drainable_in_scope(p))
    }

    /// The budgets covering `pod`.
    fn pdbs_covering(&self, pod: &Pod) -> Vec<&'a Pdb> {
        let ns = pod.pod.namespace.as_str();
        let keys = std::iter::once((ns, None)).chain(
            pod.labels
                .iter()
                .map(|(k, v)| (ns, Some((k.as_str(), v.as_str())))),
        );
        keys.filter_map(|k| self.pdbs_by_label.get(&k))
            .flatten()
            .copied()
            .filter(|p| p.covers(pod))
            .collect()
    }

    /// The pods `pdb` covers.
    fn pods_covered_by(&self, pdb: &'a Pdb) -> impl Iterator<Item = &'a Pod> + '_ {
        let candidates: &[&'a Pod] = match first_label(pdb) {
            Some(label) => self
                .pods_by_label
                .get(&(pdb.namespace.as_str(), Some(label)))
                .map_or(&[], Vec::as_slice),
            None => self
                .pods_by_ns
                .get(pdb.namespace.as_str())
                .map_or(&[], Vec::as_slice),
        };
        candidates.iter().copied().filter(move |p| pdb.covers(p))
    }

    /// A disabled pool inside the new pod CIDR: the "no NAT" pool preflight recommends (see
    /// `nat-outgoing`); it allocates nothing, so it is not a Calico network in use.
    fn is_exemption_pool(&self, pool: &IpPool) -> bool {
        pool.disabled && self.pod_cidr().contains(&pool.cidr.trunc())
    }

    /// Calico's pools, without the disabled exemption pool(s) for the new CIDR.
    fn calico_pools(&self) -> impl Iterator<Item = &'a IpPool> + '_ {
        self.snap
            .calico
            .ip_pools
            .iter()
            .filter(|p| !self.is_exemption_pool(p))
    }
}

/// How many objects a message names before "and N more".
const LIST_MAX: usize = 5;

/// `a, b, c` or `a, b, c, d, e and 7 more`.
pub(crate) fn bounded<I>(items: I) -> String
where
    I: IntoIterator,
    I::Item: fmt::Display,
{
    let mut shown = Vec::new();
    let mut more = 0usize;
    for item in items {
        if shown.len() < LIST_MAX {
            shown.push(item.to_string());
        } else {
            more = more.saturating_add(1);
        }
    }
    let mut out = shown.join(", ");
    if more > 0 {
        out.push_str(&format!(" and {more} more"));
    }
    out
}

/// `1 pod` / `3 pods`.
pub(crate) fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// `one` when `n` is 1, else `many` (verb agreement).
pub(crate) fn verb(n: usize, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}

/// At most `max` characters of user-supplied text (for messages).
pub(crate) fn short(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}

/// Memory in Kubernetes units (`512Mi`, `2Gi`, or bytes).
pub(crate) fn fmt_bytes(b: u64) -> String {
    const MI: u64 = 1 << 20;
    const GI: u64 = 1 << 30;
    if b == 0 {
        "0".to_string()
    } else if b.is_multiple_of(GI) {
        format!("{}Gi", b / GI)
    } else if b.is_multiple_of(MI) {
        format!("{}Mi", b / MI)
    } else if b >= MI {
        format!("{}Mi", b.div_ceil(MI))
    } else {
        format!("{b} bytes")
    }
}

/// True when two networks share at least one address (either contains the other's network
/// address).
#[must_use]
pub(crate) fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    let (a, b) = (a.trunc(), b.trunc());
    a.contains(&b.network()) || b.contains(&a.network())
}
