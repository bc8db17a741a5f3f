//! The simulated cluster's state and its behaviour: controllers, scheduler, kubelet, Cilium
//! agents, the event queue, and the counters behind the reachability model and the invariants.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use cnimig_core::cilium::CiliumNodeConfig;
use cnimig_core::machine::{NodeRecord, Phase, RollbackStep};
use cnimig_core::model::{
    Budget, CalicoFacts, IntOrPercent, LabelSelector, Node, NodeName, NodeRole, OwnerKind, Pdb,
    Pod, PodNetwork, PodPhase, PodRef, Resources, Taint, Time,
};
use cnimig_core::ports::{AgentObservation, CniDirState, EvictOutcome};
use ipnet::Ipv4Net;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::observe::{FaultKind, Op, OpKind, SimFaults, SimStats, Violation, ViolationKind};
use crate::scenario::{
    ExpandedNode, Placements, Scenario, ScenarioError, SimParams, Span, WorkloadKind,
};

pub(crate) type PodId = u64;

const UID_PREFIX: &str = "00000000-0000-4000-8000-";
const AGENT_NAMESPACE: &str = "kube-system";
const AGENT_NAME: &str = "cilium";
const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";
const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";

/// Which replica of its workload a pod is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Slot {
    /// Any (ReplicaSet pods).
    Any,
    /// A StatefulSet ordinal or a bare pod's index.
    Ordinal(u32),
    /// A DaemonSet or static pod's node.
    Node(usize),
}

pub(crate) struct Template {
    labels: Arc<BTreeMap<String, String>>,
    host_network: bool,
    host_port: bool,
    empty_dir: bool,
    tolerates: bool,
    requests: Resources,
}

pub(crate) struct Workload {
    kind: WorkloadKind,
    namespace: String,
    name: String,
    replicas: u32,
    template: Template,
    /// Nodes the scheduler may use, by node index (`None` = any).
    allowed: Option<Arc<Vec<bool>>>,
    /// DaemonSet / static pods: the nodes they run on.
    per_node: Vec<usize>,
    /// Pods not terminating.
    active: BTreeSet<PodId>,
    /// How many of `active` hold each slot (so a DaemonSet of thousands of pods does not scan
    /// them all to learn whether one node's slot is free).
    active_slots: BTreeMap<Slot, u32>,
    serial: u64,
    rs_hash: String,
    agent: bool,
    /// The budgets covering its pods, by index, ascending: the pods of a workload share its
    /// namespace and template labels, so every pod is covered by the same budgets (computed once,
    /// when the workload is added; budgets are all added before any workload).
    pdbs: Vec<usize>,
}

impl Workload {
    fn deactivate(&mut self, id: PodId, slot: Slot) {
        if self.active.remove(&id)
            && let Some(c) = self.active_slots.get_mut(&slot)
        {
            *c = c.saturating_sub(1);
        }
    }
}

pub(crate) struct SimPod {
    pub(crate) uid: String,
    pub(crate) namespace: String,
    pub(crate) name: String,
    labels: Arc<BTreeMap<String, String>>,
    owner: OwnerKind,
    workload: usize,
    slot: Slot,
    pub(crate) node: Option<usize>,
    ip: Option<Ipv4Addr>,
    pub(crate) network: PodNetwork,
    pub(crate) phase: PodPhase,
    pub(crate) ready: bool,
    pub(crate) terminating: bool,
    pub(crate) host_network: bool,
    pub(crate) host_port: bool,
    empty_dir: bool,
    pub(crate) mirror: bool,
    tolerates: bool,
    requests: Resources,
    pub(crate) pdbs: Vec<usize>,
    pub(crate) agent: bool,
    /// The node config an agent pod resolved at start: name and defaults.
    agent_config: Option<(String, BTreeMap<String, String>)>,
    /// The portmap plugin was chained when the sandbox was created.
    pub(crate) portmap: bool,
    awaiting_node: bool,
    gone_blocked: bool,
    /// When it was created.
    created: Time,
}

impl SimPod {
    /// `kubectl drain` would evict it (the model's definition).
    pub(crate) fn is_drainable(&self) -> bool {
        self.owner != OwnerKind::DaemonSet && !self.mirror && !self.host_network
    }
    /// Uses the pod network (not hostNetwork; the sim's pods never finish).
    pub(crate) fn uses_pod_network(&self) -> bool {
        !self.host_network
    }
    pub(crate) fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Every pod, indexed by its id (ids are handed out in sequence from 1, so a vector indexed by id
/// replaces a map: a lookup is an index, and iteration is still in id order).
#[derive(Default)]
pub(crate) struct PodTable {
    slots: Vec<Option<SimPod>>,
    len: usize,
}

impl PodTable {
    fn slot(id: PodId) -> Option<usize> {
        usize::try_from(id).ok()
    }
    pub(crate) fn get(&self, id: &PodId) -> Option<&SimPod> {
        self.slots.get(Self::slot(*id)?)?.as_ref()
    }
    pub(crate) fn get_mut(&mut self, id: &PodId) -> Option<&mut SimPod> {
        self.slots.get_mut(Self::slot(*id)?)?.as_mut()
    }
    fn insert(&mut self, id: PodId, pod: SimPod) {
        let Some(i) = Self::slot(id) else { return };
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
        }
        if let Some(s) = self.slots.get_mut(i) {
            if s.is_none() {
                self.len += 1;
            }
            *s = Some(pod);
        }
    }
    fn remove(&mut self, id: &PodId) -> Option<SimPod> {
        let p = self.slots.get_mut(Self::slot(*id)?)?.take();
        if p.is_some() {
            self.len -= 1;
        }
        p
    }
    pub(crate) fn values(&self) -> impl Iterator<Item = &SimPod> {
        self.slots.iter().filter_map(Option::as_ref)
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

pub(crate) struct SimNode {
    pub(crate) node: Node,
    zone: usize,
    pub(crate) cni: CniDirState,
    pub(crate) chaining: Option<String>,
    pub(crate) pods: BTreeSet<PodId>,
    /// Budgets covering the node's drainable pods that are not terminating, with how many of
    /// them each covers, by budget index (ascending, no zero counts): kept up to date as pods
    /// bind, terminate and go, so the budget view does not walk the pods on every look.
    pub(crate) demand: Vec<(usize, u32)>,
    calico_block: u64,
    calico_used: u64,
    cilium_cidr: Option<Ipv4Net>,
    cilium_used: u64,
    key: (u64, usize, usize),
    in_sched: bool,
    in_ready: bool,
    restore_pending: bool,
    pub(crate) annotation: Option<String>,
    /// When the node was last cordoned (zero for a node cordoned from the start).
    pub(crate) cordoned_at: Time,
}

impl SimNode {
    pub(crate) fn pod_cidr(&self) -> Option<Ipv4Net> {
        self.cilium_cidr
    }
}

pub(crate) struct SimPdb {
    pub(crate) pdb: Pdb,
    /// `namespace/name`, formatted once (the budget view names it on every tick).
    pub(crate) key: String,
    pub(crate) members: BTreeSet<PodId>,
    pub(crate) healthy: u32,
}

impl SimPdb {
    pub(crate) fn allowed(&self) -> u32 {
        self.pdb.disruptions_allowed(self.healthy)
    }
    /// The budget as the disruption controller reports it: for an integer `minAvailable` its
    /// `expectedPods` is the number of matching pods that exist now (a pod being replaced lowers
    /// it), for the other forms the controllers' scale. (Confirmed on the real control plane by
    /// cnimig-kube's `integer_min_available_expects_the_pods_that_exist_not_the_scale`.)
    pub(crate) fn observed(&self) -> Pdb {
        let mut pdb = self.pdb.clone();
        if matches!(pdb.budget, Budget::MinAvailable(IntOrPercent::Int(_))) {
            pdb.expected_pods = u32::try_from(self.members.len()).unwrap_or(u32::MAX);
        }
        pdb
    }
}

/// Counters of ready pods by network class, kept up to date on every change.
#[derive(Default)]
pub(crate) struct Reach {
    pub(crate) calico_per_node: Vec<u32>,
    pub(crate) calico_nodes: u32,
    pub(crate) calico_total: u64,
    pub(crate) cilium_per_node: Vec<u32>,
    pub(crate) cilium_total: u64,
    pub(crate) hostport_broken_per_node: Vec<u32>,
    pub(crate) hostport_broken_nodes: BTreeSet<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Calico,
    Cilium { hostport_broken: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Contrib {
    healthy: bool,
    class: Option<(usize, Class)>,
}

fn contrib(p: &SimPod) -> Contrib {
    let healthy = p.ready && !p.terminating && p.phase == PodPhase::Running;
    let class = if healthy {
        p.node.and_then(|n| match p.network {
            PodNetwork::Calico => Some((n, Class::Calico)),
            PodNetwork::Cilium => Some((
                n,
                Class::Cilium {
                    hostport_broken: p.host_port && !p.portmap,
                },
            )),
            PodNetwork::Host | PodNetwork::None => None,
        })
    } else {
        None
    };
    Contrib { healthy, class }
}

/// Counts one pod covered by `pdbs` in (or out of) a node's [`SimNode::demand`].
fn count_demand(demand: &mut Vec<(usize, u32)>, pdbs: &[usize], add: bool) {
    for &i in pdbs {
        match demand.binary_search_by_key(&i, |(j, _)| *j) {
            Ok(at) => {
                if let Some((_, c)) = demand.get_mut(at) {
                    if add {
                        *c += 1;
                    } else {
                        *c = c.saturating_sub(1);
                    }
                    if *c == 0 {
                        demand.remove(at);
                    }
                }
            }
            Err(at) if add => demand.insert(at, (i, 1)),
            Err(_) => {}
        }
    }
}

fn bump(v: &mut u32, add: bool) {
    *v = if add {
        v.saturating_add(1)
    } else {
        v.saturating_sub(1)
    };
}

fn apply(reach: &mut Reach, pdbs: &mut [SimPdb], members: &[usize], c: Contrib, add: bool) {
    if c.healthy {
        for &i in members {
            if let Some(p) = pdbs.get_mut(i) {
                bump(&mut p.healthy, add);
            }
        }
    }
    let Some((n, class)) = c.class else { return };
    let total = |t: &mut u64| {
        *t = if add {
            t.saturating_add(1)
        } else {
            t.saturating_sub(1)
        }
    };
    match class {
        Class::Calico => {
            total(&mut reach.calico_total);
            if let Some(c) = reach.calico_per_node.get_mut(n) {
                let before = *c;
                bump(c, add);
                if before == 0 && *c == 1 {
                    reach.calico_nodes = reach.calico_nodes.saturating_add(1);
                } else if before == 1 && *c == 0 {
                    reach.calico_nodes = reach.calico_nodes.saturating_sub(1);
                }
            }
        }
        Class::Cilium { hostport_broken } => {
            total(&mut reach.cilium_total);
            if let Some(c) = reach.cilium_per_node.get_mut(n) {
                bump(c, add);
            }
            if hostport_broken && let Some(c) = reach.hostport_broken_per_node.get_mut(n) {
                bump(c, add);
                if *c == 0 {
                    reach.hostport_broken_nodes.remove(&n);
                } else {
                    reach.hostport_broken_nodes.insert(n);
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    PodReady(PodId),
    PodGone(PodId),
    CniRestored(usize),
    NodeNotReady(usize),
    NodeReady(usize),
    NodeJoin(usize),
}

pub(crate) struct CiliumState {
    pub(crate) live: BTreeMap<String, String>,
    pool: Ipv4Net,
    mask: u8,
}

pub(crate) struct State {
    pub(crate) now: Time,
    params: SimParams,
    rng: ChaCha8Rng,
    pub(crate) scenario: Scenario,
    pub(crate) calico: CalicoFacts,
    pub(crate) autodetect_bad: bool,
    pub(crate) nodes: Vec<SimNode>,
    pub(crate) node_index: BTreeMap<NodeName, usize>,
    zone_count: usize,
    sched_idx: Vec<BTreeSet<(u64, usize, usize)>>,
    ready_idx: Vec<BTreeSet<(u64, usize, usize)>>,
    pub(crate) pods: PodTable,
    next_pod: PodId,
    workloads: Vec<Workload>,
    pub(crate) pdbs: Vec<SimPdb>,
    /// Budgets by namespace and the first `matchLabels` pair (a pod can only be covered by a
    /// budget whose first pair it carries) ...
    pdbs_by_label: BTreeMap<(String, String, String), Vec<usize>>,
    /// ... and budgets without `matchLabels`, by namespace.
    pdbs_any: BTreeMap<String, Vec<usize>>,
    pending: BTreeSet<PodId>,
    events: BinaryHeap<Reverse<(Time, u64, Ev)>>,
    seq: u64,
    calico_pool: Option<(Ipv4Net, u8)>,
    next_calico_block: u64,
    pub(crate) cilium: Option<CiliumState>,
    pub(crate) node_configs: BTreeMap<String, CiliumNodeConfig>,
    pub(crate) lock: Option<(String, Time)>,
    /// When the lock was last taken or renewed (kept after a release).
    pub(crate) lock_renewed: Option<Time>,
    /// [`Self::lock_renewed`] as it was before the latest acquisition.
    pub(crate) lock_renewed_before: Option<Time>,
    pub(crate) faults: SimFaults,
    /// Decides which port calls fail; separate from `rng` so faults do not shift the timings.
    pub(crate) fault_rng: ChaCha8Rng,
    /// Node and pod faults already counted, by kind and target.
    pub(crate) fault_counted: BTreeSet<(FaultKind, String)>,
    /// Check every migration operation against the node's persisted record.
    pub(crate) write_ahead: bool,
    /// True while a record's save carries a change to its node in the same write
    /// (`StateStore::save_with`): the operation is then checked against the record it lands with.
    pub(crate) carried: bool,
    /// Fail every port call after this many (a run cut off from the cluster, as if killed).
    pub(crate) cut_off_after: Option<u64>,
    pub(crate) scope: Option<BTreeSet<usize>>,
    pub(crate) control_plane_last: bool,
    pub(crate) cordoned_by_us: BTreeSet<usize>,
    cp_started: Option<usize>,
    /// Workers that were NotReady when the first control-plane node started: they could not
    /// have gone first, so acting on them later is no order violation.
    not_ready_at_cp_start: BTreeSet<usize>,
    late_reported: BTreeSet<usize>,
    pub(crate) violations: Vec<Violation>,
    pub(crate) op_log: Vec<Op>,
    pub(crate) stats: SimStats,
    pub(crate) reach: Reach,
    was_broken: bool,
}

fn ppm(a: u64, b: u64) -> u64 {
    if b == 0 {
        if a == 0 { 0 } else { 1 << 40 }
    } else {
        u64::try_from(u128::from(a) * 1_000_000 / u128::from(b))
            .unwrap_or(1 << 40)
            .min(1 << 40)
    }
}

const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

fn base27(mut x: u64, len: usize) -> String {
    let mut out = vec![b'b'; len];
    for c in out.iter_mut().rev() {
        *c = ALPHABET.get((x % 27) as usize).copied().unwrap_or(b'b');
        x /= 27;
    }
    String::from_utf8(out).unwrap_or_default()
}

/// A pod-name suffix unique per serial (a bijection on 0..27^5).
fn suffix(serial: u64) -> String {
    const M: u64 = 14_348_907; // 27^5
    base27((serial % M).wrapping_mul(1_000_003).wrapping_add(7) % M, 5)
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn pod_uid(id: PodId) -> String {
    format!("{UID_PREFIX}{id:012x}")
}

pub(crate) fn parse_uid(uid: &str) -> Option<PodId> {
    uid.strip_prefix(UID_PREFIX)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
}

fn sub(a: Resources, b: Resources) -> Resources {
    Resources {
        cpu_millis: a.cpu_millis.saturating_sub(b.cpu_millis),
        memory_bytes: a.memory_bytes.saturating_sub(b.memory_bytes),
    }
}

fn addr(base: Ipv4Addr, offset: u64) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base).wrapping_add(offset as u32))
}

impl State {
    pub(crate) fn new(
        scenario: Scenario,
        params: SimParams,
        seed: u64,
    ) -> Result<State, ScenarioError> {
        scenario.validate()?;
        let expanded = scenario.expand_nodes()?;
        let calico = scenario.calico.facts().map_err(|e| {
            ScenarioError(vec![crate::scenario::ScenarioProblem {
                object: "calico".into(),
                field: "autodetection".into(),
                problem: e,
                fix: "use kubernetes-internal-ip or first-found".into(),
            }])
        })?;
        let autodetect_bad = calico.autodetection.may_pick_cilium_interface();
        let calico_pool = scenario
            .calico
            .pools
            .iter()
            .find(|p| !p.disabled)
            .map(|p| (p.cidr, p.block_size));
        let mut zones: BTreeMap<String, usize> = BTreeMap::new();
        for n in &expanded {
            let z = n.zone.clone().unwrap_or_default();
            let next = zones.len();
            zones.entry(z).or_insert(next);
        }
        let zone_count = zones.len().max(1);
        let n_nodes = expanded.len();
        let mut st = State {
            now: Time(0),
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            scenario,
            calico,
            autodetect_bad,
            nodes: Vec::with_capacity(n_nodes),
            node_index: BTreeMap::new(),
            zone_count,
            sched_idx: vec![BTreeSet::new(); zone_count],
            ready_idx: vec![BTreeSet::new(); zone_count],
            pods: PodTable::default(),
            next_pod: 1,
            workloads: Vec::new(),
            pdbs: Vec::new(),
            pdbs_by_label: BTreeMap::new(),
            pdbs_any: BTreeMap::new(),
            pending: BTreeSet::new(),
            events: BinaryHeap::new(),
            seq: 0,
            calico_pool,
            next_calico_block: n_nodes as u64,
            cilium: None,
            node_configs: BTreeMap::new(),
            lock: None,
            lock_renewed: None,
            lock_renewed_before: None,
            faults: SimFaults::default(),
            fault_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x6661_756c_7473_2121),
            fault_counted: BTreeSet::new(),
            write_ahead: false,
            carried: false,
            cut_off_after: None,
            scope: None,
            control_plane_last: true,
            cordoned_by_us: BTreeSet::new(),
            cp_started: None,
            not_ready_at_cp_start: BTreeSet::new(),
            late_reported: BTreeSet::new(),
            violations: Vec::new(),
            op_log: Vec::new(),
            stats: SimStats::default(),
            reach: Reach {
                calico_per_node: vec![0; n_nodes],
                cilium_per_node: vec![0; n_nodes],
                hostport_broken_per_node: vec![0; n_nodes],
                ..Reach::default()
            },
            was_broken: false,
        };
        for (i, n) in expanded.iter().enumerate() {
            let zone = zones
                .get(&n.zone.clone().unwrap_or_default())
                .copied()
                .unwrap_or(0);
            st.push_node(n, zone, i as u64);
        }
        // Budgets first, so pods know their budgets when created.
        let specs = st.scenario.workloads.clone();
        let mut placements = Placements::new(&expanded);
        let per_workload_pods: Vec<u32> = specs
            .iter()
            .map(|w| match w.kind {
                WorkloadKind::DaemonSet | WorkloadKind::StaticPod => {
                    u32::try_from(placements.selected(w).len()).unwrap_or(u32::MAX)
                }
                _ => w.replica_count(),
            })
            .collect();
        for (w, count) in specs.iter().zip(&per_workload_pods) {
            if let Some(b) = w.pdb.as_ref().and_then(|p| p.budget()) {
                let selector = LabelSelector {
                    match_labels: w.pod_labels(),
                    match_expressions: Vec::new(),
                };
                st.add_pdb(Pdb {
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    selector,
                    budget: b,
                    expected_pods: *count,
                });
            }
        }
        for d in st.scenario.pdbs.clone() {
            let budget = match (d.min_available, d.max_unavailable) {
                (Some(a), None) => Budget::MinAvailable(a.0),
                (None, Some(a)) => Budget::MaxUnavailable(a.0),
                _ => continue,
            };
            let selector = LabelSelector {
                match_labels: d.selector.clone(),
                match_expressions: Vec::new(),
            };
            let expected = specs
                .iter()
                .zip(&per_workload_pods)
                .filter(|(w, _)| {
                    w.namespace == d.namespace
                        && d.selector
                            .iter()
                            .all(|(k, v)| w.pod_labels().get(k) == Some(v))
                })
                .map(|(_, c)| *c)
                .sum();
            st.add_pdb(Pdb {
                namespace: d.namespace.clone(),
                name: d.name.clone(),
                selector,
                budget,
                expected_pods: expected,
            });
        }
        for w in &specs {
            let restricted = !w.nodes.is_empty() || !w.zones.is_empty() || !w.node_roles.is_empty();
            let per_node = if matches!(w.kind, WorkloadKind::DaemonSet | WorkloadKind::StaticPod) {
                placements.selected(w).as_ref().clone()
            } else {
                Vec::new()
            };
            let mask = restricted.then(|| placements.mask(w));
            let idx = st.workloads.len();
            st.workloads.push(Workload {
                kind: w.kind,
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                replicas: w.replica_count(),
                template: Template {
                    labels: Arc::new(w.pod_labels()),
                    host_network: w.host_network,
                    host_port: w.host_port,
                    empty_dir: w.empty_dir,
                    tolerates: w.tolerates_unschedulable,
                    requests: w.requests.resources(),
                },
                allowed: mask,
                per_node,
                active: BTreeSet::new(),
                active_slots: BTreeMap::new(),
                serial: 0,
                rs_hash: base27(fnv(&format!("{}/{}", w.namespace, w.name)), 10),
                agent: false,
                pdbs: Vec::new(),
            });
            st.index_workload_pdbs(idx);
            st.populate(idx, true);
        }
        Ok(st)
    }

    /// Appends a node (no pods yet) and indexes it for the scheduler.
    fn push_node(&mut self, n: &ExpandedNode, zone: usize, calico_block: u64) -> usize {
        let i = self.nodes.len();
        let mut taints = Vec::new();
        if n.cordoned {
            taints.push(Taint {
                key: UNSCHEDULABLE_TAINT.into(),
                value: String::new(),
                effect: "NoSchedule".into(),
            });
        }
        if !n.ready {
            taints.push(Taint {
                key: NOT_READY_TAINT.into(),
                value: String::new(),
                effect: "NoSchedule".into(),
            });
        }
        self.node_index.insert(n.name.clone(), i);
        self.nodes.push(SimNode {
            node: Node {
                name: n.name.clone(),
                roles: n.roles.clone(),
                zone: n.zone.clone(),
                labels: n.labels.clone(),
                taints,
                unschedulable: n.cordoned,
                ready: n.ready,
                internal_ips: vec![n.internal_ip],
                allocatable: n.allocatable,
                requested: Resources::default(),
            },
            zone,
            cni: CniDirState::CALICO,
            chaining: None,
            pods: BTreeSet::new(),
            demand: Vec::new(),
            calico_block,
            calico_used: 0,
            cilium_cidr: None,
            cilium_used: 0,
            key: (0, 0, i),
            in_sched: false,
            in_ready: false,
            restore_pending: false,
            annotation: None,
            cordoned_at: Time(0),
        });
        self.reach.calico_per_node.resize(self.nodes.len(), 0);
        self.reach.cilium_per_node.resize(self.nodes.len(), 0);
        self.reach
            .hostport_broken_per_node
            .resize(self.nodes.len(), 0);
        self.reindex(i);
        i
    }

    /// A node joins (`faults.node_joins[j]`): Ready and schedulable, sized like the first node,
    /// with a Cilium podCIDR if the pool has one left, and the pods of every DaemonSet (and
    /// static pod) whose placement selects it, the Cilium agent's included.
    pub(crate) fn join_node(&mut self, j: usize) {
        let Some(join) = self.faults.node_joins.get(j).cloned() else {
            return;
        };
        if self.node_index.contains_key(&join.name) {
            return;
        }
        let roles = if join.control_plane {
            vec![NodeRole::ControlPlane, NodeRole::Etcd]
        } else {
            vec![NodeRole::Worker]
        };
        let mut labels = BTreeMap::new();
        labels.insert("kubernetes.io/hostname".to_string(), join.name.to_string());
        labels.insert("kubernetes.io/os".to_string(), "linux".to_string());
        if let Some(z) = &join.zone {
            labels.insert("topology.kubernetes.io/zone".to_string(), z.clone());
        }
        for r in &roles {
            let key = match r {
                NodeRole::ControlPlane => "node-role.kubernetes.io/control-plane",
                NodeRole::Etcd => "node-role.kubernetes.io/etcd",
                NodeRole::Worker => "node-role.kubernetes.io/worker",
            };
            labels.insert(key.to_string(), "true".to_string());
        }
        let idx = self.nodes.len();
        let base = u32::from(self.scenario.node_cidr.network());
        let expanded = ExpandedNode {
            name: join.name.clone(),
            roles,
            zone: join.zone.clone(),
            allocatable: self
                .nodes
                .first()
                .map(|n| n.node.allocatable)
                .unwrap_or_default(),
            cordoned: false,
            ready: true,
            labels,
            internal_ip: Ipv4Addr::from(base.wrapping_add(10).wrapping_add(idx as u32)),
        };
        let zone = match self
            .nodes
            .iter()
            .find(|n| n.node.zone == join.zone)
            .map(|n| n.zone)
        {
            Some(z) => z,
            None => {
                self.zone_count += 1;
                self.sched_idx.push(BTreeSet::new());
                self.ready_idx.push(BTreeSet::new());
                self.zone_count - 1
            }
        };
        let block = self.next_calico_block;
        self.next_calico_block += 1;
        let n = self.push_node(&expanded, zone, block);
        if let Some(c) = &self.cilium {
            let (pool, mask) = (c.pool, c.mask);
            let per = 1u64 << (32 - u32::from(mask));
            let count = 1u64 << (u32::from(mask) - u32::from(pool.prefix_len()));
            let i = n as u64;
            let cidr = (i < count)
                .then(|| Ipv4Net::new(addr(pool.network(), i * per), mask).ok())
                .flatten();
            if let Some(node) = self.nodes.get_mut(n) {
                node.cilium_cidr = cidr;
            }
        }
        self.count_fault(FaultKind::NodeJoined, join.name.to_string());
        let later: Vec<(Time, bool)> = self
            .faults
            .node_not_ready_at
            .iter()
            .filter(|(x, _)| *x == join.name)
            .map(|(_, t)| (*t, false))
            .chain(
                self.faults
                    .node_ready_at
                    .iter()
                    .filter(|(x, _)| *x == join.name)
                    .map(|(_, t)| (*t, true)),
            )
            .collect();
        for (t, ready) in later {
            if ready {
                self.schedule_ready(n, t);
            } else {
                self.schedule_not_ready(n, t);
            }
        }
        let specs = self.scenario.workloads.clone();
        let mut per_node: Vec<usize> = Vec::new();
        for w in 0..self.workloads.len() {
            let allows = match specs.get(w) {
                Some(spec) => crate::scenario::placement_allows(spec, &expanded),
                None => true, // the Cilium agent
            };
            let Some(wl) = self.workloads.get_mut(w) else {
                continue;
            };
            if let Some(mask) = wl.allowed.as_mut() {
                Arc::make_mut(mask).push(allows);
            }
            if matches!(wl.kind, WorkloadKind::DaemonSet | WorkloadKind::StaticPod) && allows {
                wl.per_node.push(n);
                per_node.push(w);
            }
        }
        for w in per_node {
            self.create_pod(w, Slot::Node(n), false);
        }
        self.retry_pending();
        self.check_reach();
    }

    fn add_pdb(&mut self, pdb: Pdb) {
        let i = self.pdbs.len();
        match pdb.selector.match_labels.iter().next() {
            Some((k, v)) => self
                .pdbs_by_label
                .entry((pdb.namespace.clone(), k.clone(), v.clone()))
                .or_default()
                .push(i),
            None => self
                .pdbs_any
                .entry(pdb.namespace.clone())
                .or_default()
                .push(i),
        }
        self.pdbs.push(SimPdb {
            key: pdb.key(),
            pdb,
            members: BTreeSet::new(),
            healthy: 0,
        });
    }

    /// Fills [`Workload::pdbs`]: the budgets whose selector matches the workload's template labels
    /// in its namespace.
    fn index_workload_pdbs(&mut self, w: usize) {
        let Some(wl) = self.workloads.get(w) else {
            return;
        };
        let labels = Arc::clone(&wl.template.labels);
        let namespace = wl.namespace.clone();
        let mut cands: Vec<usize> = self.pdbs_any.get(&namespace).cloned().unwrap_or_default();
        for (k, v) in labels.iter() {
            if let Some(c) = self
                .pdbs_by_label
                .get(&(namespace.clone(), k.clone(), v.clone()))
            {
                cands.extend(c);
            }
        }
        cands.sort_unstable();
        // A budget indexed under several of the pod's labels is a candidate once.
        cands.dedup();
        cands.retain(|&i| {
            self.pdbs
                .get(i)
                .is_some_and(|p| p.pdb.selector.matches(&labels))
        });
        if let Some(wl) = self.workloads.get_mut(w) {
            wl.pdbs = cands;
        }
    }

    /// Creates the workload's missing pods.
    fn populate(&mut self, w: usize, instant: bool) {
        let Some(wl) = self.workloads.get(w) else {
            return;
        };
        match wl.kind {
            WorkloadKind::Deployment => self.reconcile_rs(w, instant),
            WorkloadKind::StatefulSet | WorkloadKind::Pod => {
                for o in 0..wl.replicas {
                    self.create_pod(w, Slot::Ordinal(o), instant);
                }
            }
            WorkloadKind::DaemonSet | WorkloadKind::StaticPod => {
                for n in wl.per_node.clone() {
                    self.create_pod(w, Slot::Node(n), instant);
                }
            }
        }
    }

    fn reconcile_rs(&mut self, w: usize, instant: bool) {
        while let Some(wl) = self.workloads.get(w)
            && (wl.active.len() as u64) < u64::from(wl.replicas)
        {
            self.create_pod(w, Slot::Any, instant);
        }
    }

    // ---------------------------------------------------------------- time and randomness

    fn draw(&mut self, span: Span) -> Duration {
        let (a, b) = (span.min.0, span.max.0);
        if b <= a {
            return a;
        }
        let lo = u64::try_from(a.as_millis()).unwrap_or(u64::MAX);
        let hi = u64::try_from(b.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(self.rng.random_range(lo..=hi))
    }

    fn schedule(&mut self, after: Duration, ev: Ev) {
        self.seq += 1;
        self.events
            .push(Reverse((self.now.after(after), self.seq, ev)));
    }

    /// Processes every event due at or before `t`, in time order, then sets now to `t`.
    pub(crate) fn advance_to(&mut self, t: Time) {
        while let Some(Reverse((at, _, _))) = self.events.peek() {
            if *at > t {
                break;
            }
            let Some(Reverse((at, _, ev))) = self.events.pop() else {
                break;
            };
            self.now = self.now.max(at);
            self.stats.events_processed += 1;
            self.handle(ev);
            self.check_reach();
        }
        self.now = self.now.max(t);
    }

    /// When the next event is due.
    pub(crate) fn next_event(&self) -> Option<Time> {
        self.events.peek().map(|Reverse((t, _, _))| *t)
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::PodReady(id) => self.on_pod_ready(id),
            Ev::PodGone(id) => {
                let Some(p) = self.pods.get_mut(&id) else {
                    return;
                };
                if let Some(n) = p.node
                    && !self.nodes.get(n).is_some_and(|n| n.node.ready)
                {
                    p.gone_blocked = true;
                    return;
                }
                self.remove_pod(id);
            }
            Ev::CniRestored(n) => {
                if let Some(node) = self.nodes.get_mut(n) {
                    node.cni = CniDirState::CALICO;
                    node.chaining = None;
                    node.restore_pending = false;
                }
            }
            Ev::NodeNotReady(n) => {
                if let Some(name) = self.nodes.get(n).map(|x| x.node.name.to_string()) {
                    self.count_fault(FaultKind::NodeNotReady, format!("{name}@{}", self.now.0));
                }
                self.set_node_ready(n, false);
            }
            Ev::NodeReady(n) => self.set_node_ready(n, true),
            Ev::NodeJoin(i) => self.join_node(i),
        }
    }

    // ---------------------------------------------------------------- pods

    fn mutate_pod(&mut self, id: PodId, f: impl FnOnce(&mut SimPod)) {
        let Some(p) = self.pods.get_mut(&id) else {
            return;
        };
        let before = contrib(p);
        f(p);
        let after = contrib(p);
        if before != after {
            apply(&mut self.reach, &mut self.pdbs, &p.pdbs, before, false);
            apply(&mut self.reach, &mut self.pdbs, &p.pdbs, after, true);
        }
    }

    fn create_pod(&mut self, w: usize, slot: Slot, instant: bool) -> Option<PodId> {
        let id = self.next_pod;
        self.next_pod += 1;
        let node_name = |st: &State, n: usize| {
            st.nodes
                .get(n)
                .map(|n| n.node.name.to_string())
                .unwrap_or_default()
        };
        let slot_node = match slot {
            Slot::Node(n) => Some(node_name(self, n)),
            _ => None,
        };
        let wl = self.workloads.get_mut(w)?;
        wl.serial += 1;
        let serial = wl.serial.wrapping_add(fnv(&wl.name) % 14_348_907);
        let (name, owner, mirror) = match (wl.kind, slot) {
            (WorkloadKind::Deployment, _) => (
                format!("{}-{}-{}", wl.name, wl.rs_hash, suffix(serial)),
                OwnerKind::ReplicaSet,
                false,
            ),
            (WorkloadKind::StatefulSet, Slot::Ordinal(o)) => {
                (format!("{}-{o}", wl.name), OwnerKind::StatefulSet, false)
            }
            (WorkloadKind::DaemonSet, _) => (
                format!("{}-{}", wl.name, suffix(serial)),
                OwnerKind::DaemonSet,
                false,
            ),
            (WorkloadKind::StaticPod, _) => (
                format!("{}-{}", wl.name, slot_node.unwrap_or_default()),
                OwnerKind::Other("Node".into()),
                true,
            ),
            (WorkloadKind::Pod, Slot::Ordinal(o)) if wl.replicas > 1 => {
                (format!("{}-{o}", wl.name), OwnerKind::None, false)
            }
            (WorkloadKind::Pod, _) => (wl.name.clone(), OwnerKind::None, false),
            (WorkloadKind::StatefulSet, _) => (
                format!("{}-{}", wl.name, wl.serial),
                OwnerKind::StatefulSet,
                false,
            ),
        };
        if wl.active.insert(id) {
            *wl.active_slots.entry(slot).or_default() += 1;
        }
        let t = &wl.template;
        let pod = SimPod {
            uid: pod_uid(id),
            namespace: wl.namespace.clone(),
            name,
            labels: Arc::clone(&t.labels),
            owner,
            workload: w,
            slot,
            node: None,
            ip: None,
            network: PodNetwork::None,
            phase: PodPhase::Pending,
            ready: false,
            terminating: false,
            host_network: t.host_network,
            host_port: t.host_port,
            empty_dir: t.empty_dir,
            mirror,
            tolerates: t.tolerates || wl.kind == WorkloadKind::DaemonSet,
            requests: if mirror {
                Resources::default()
            } else {
                t.requests
            },
            pdbs: wl.pdbs.clone(),
            agent: wl.agent,
            agent_config: None,
            portmap: false,
            awaiting_node: false,
            gone_blocked: false,
            created: self.now,
        };
        for &i in &pod.pdbs {
            if let Some(p) = self.pdbs.get_mut(i) {
                p.members.insert(id);
            }
        }
        self.pods.insert(id, pod);
        self.stats.pods_created += 1;
        self.pending.insert(id);
        self.try_place(id, instant);
        Some(id)
    }

    fn fits(&self, n: usize, req: Resources) -> bool {
        self.nodes
            .get(n)
            .is_some_and(|n| n.node.requested.plus(req).fits_in(n.node.allocatable))
    }

    fn try_place(&mut self, id: PodId, instant: bool) {
        let Some(p) = self.pods.get(&id) else { return };
        if p.node.is_some() || p.terminating {
            self.pending.remove(&id);
            return;
        }
        let target = match p.slot {
            Slot::Node(n) => (p.mirror || self.fits(n, p.requests)).then_some(n),
            _ => self.pick_node(p.workload, p.tolerates, p.requests),
        };
        if let Some(n) = target {
            self.bind(id, n, instant);
        }
    }

    /// The scheduler: the zone with the fewest pods of the workload, then the least-loaded
    /// Ready node there that is schedulable (or cordoned, for tolerating pods) with room.
    fn pick_node(&self, w: usize, tolerates: bool, req: Resources) -> Option<usize> {
        let wl = self.workloads.get(w)?;
        let mut counts = vec![0u64; self.zone_count];
        for id in &wl.active {
            if let Some(z) = self
                .pods
                .get(id)
                .and_then(|p| p.node)
                .and_then(|n| self.nodes.get(n))
                .map(|n| n.zone)
                && let Some(c) = counts.get_mut(z)
            {
                *c += 1;
            }
        }
        let mut order: Vec<usize> = (0..self.zone_count).collect();
        order.sort_by_key(|&z| (counts.get(z).copied().unwrap_or(0), z));
        let allowed = |n: usize| {
            wl.allowed
                .as_ref()
                .is_none_or(|a| a.get(n).copied().unwrap_or(false))
        };
        for z in order {
            let set = if tolerates {
                self.ready_idx.get(z)
            } else {
                self.sched_idx.get(z)
            };
            if let Some(found) =
                set.and_then(|s| s.iter().find(|k| allowed(k.2) && self.fits(k.2, req)))
            {
                return Some(found.2);
            }
        }
        None
    }

    fn reindex(&mut self, n: usize) {
        let Some(node) = self.nodes.get_mut(n) else {
            return;
        };
        let z = node.zone;
        if node.in_sched
            && let Some(s) = self.sched_idx.get_mut(z)
        {
            s.remove(&node.key);
        }
        if node.in_ready
            && let Some(s) = self.ready_idx.get_mut(z)
        {
            s.remove(&node.key);
        }
        let load = ppm(
            node.node.requested.cpu_millis,
            node.node.allocatable.cpu_millis,
        )
        .saturating_add(ppm(
            node.node.requested.memory_bytes,
            node.node.allocatable.memory_bytes,
        ));
        node.key = (load, node.pods.len(), n);
        node.in_ready = node.node.ready;
        node.in_sched = node.node.ready && !node.node.unschedulable;
        if node.in_sched
            && let Some(s) = self.sched_idx.get_mut(z)
        {
            s.insert(node.key);
        }
        if node.in_ready
            && let Some(s) = self.ready_idx.get_mut(z)
        {
            s.insert(node.key);
        }
    }

    fn bind(&mut self, id: PodId, n: usize, instant: bool) {
        let Some(node) = self.nodes.get(n) else {
            return;
        };
        let Some(p) = self.pods.get(&id) else { return };
        let (req, is_agent) = (p.requests, p.agent);
        let demands = p.is_drainable() && !p.terminating && p.node.is_none();
        let network = if p.host_network {
            PodNetwork::Host
        } else if node.cni.cilium_conflist {
            PodNetwork::Cilium
        } else {
            PodNetwork::Calico
        };
        let portmap = node.chaining.as_deref() == Some("portmap");
        let node_ready = node.node.ready;
        let host_ip = node.node.internal_ips.first().copied();
        let agent_config = if is_agent {
            self.resolve_node_config(n)
        } else {
            None
        };
        let ip = match network {
            PodNetwork::Host => host_ip,
            PodNetwork::Calico => self.alloc_calico(n),
            PodNetwork::Cilium => self.alloc_cilium(n),
            PodNetwork::None => None,
        };
        if let Some(node) = self.nodes.get_mut(n) {
            node.pods.insert(id);
            node.node.requested = node.node.requested.plus(req);
            if demands && let Some(p) = self.pods.get(&id) {
                count_demand(&mut node.demand, &p.pdbs, true);
            }
        }
        self.reindex(n);
        self.pending.remove(&id);
        self.mutate_pod(id, |p| {
            p.node = Some(n);
            p.network = network;
            p.ip = ip;
            p.portmap = portmap;
            p.agent_config = agent_config;
        });
        if instant {
            self.mutate_pod(id, |p| {
                p.phase = PodPhase::Running;
                p.ready = node_ready;
            });
        } else {
            let span = if is_agent {
                self.params.agent_ready
            } else {
                self.params.pod_ready
            };
            let d = self.draw(span);
            self.schedule(d, Ev::PodReady(id));
        }
    }

    fn alloc_calico(&mut self, n: usize) -> Option<Ipv4Addr> {
        let (pool, bs) = self.calico_pool?;
        let block_len = 1u64 << (32 - u32::from(bs.min(32)));
        let pool_len = 1u64 << (32 - u32::from(pool.prefix_len()));
        let blocks = (pool_len / block_len).max(1);
        let next_block = &mut self.next_calico_block;
        let node = self.nodes.get_mut(n)?;
        if node.calico_used >= block_len {
            node.calico_block = *next_block;
            *next_block += 1;
            node.calico_used = 0;
        }
        let off = (node.calico_block % blocks) * block_len + node.calico_used;
        node.calico_used += 1;
        Some(addr(pool.network(), off))
    }

    fn alloc_cilium(&mut self, n: usize) -> Option<Ipv4Addr> {
        let node = self.nodes.get_mut(n)?;
        let cidr = node.cilium_cidr?;
        let size = 1u64 << (32 - u32::from(cidr.prefix_len()));
        let usable = size.saturating_sub(3).max(1);
        let off = 2 + node.cilium_used % usable;
        node.cilium_used += 1;
        Some(addr(cidr.network(), off.min(size.saturating_sub(1))))
    }

    fn resolve_node_config(&self, n: usize) -> Option<(String, BTreeMap<String, String>)> {
        let labels = &self.nodes.get(n)?.node.labels;
        self.node_configs
            .values()
            .rfind(|c| labels.get(&c.label).is_some_and(|v| v == "true"))
            .map(|c| (c.name.clone(), c.defaults.clone()))
    }

    fn on_pod_ready(&mut self, id: PodId) {
        let Some(p) = self.pods.get_mut(&id) else {
            return;
        };
        if p.terminating || p.phase != PodPhase::Pending {
            return;
        }
        let Some(n) = p.node else { return };
        let Some(node) = self.nodes.get(n) else {
            return;
        };
        if !node.node.ready {
            p.awaiting_node = true;
            return;
        }
        // An agent without a podCIDR from the cluster pool (the pool is too small for the
        // nodes) never becomes Ready, nor one the faults say never will.
        if p.agent && node.cilium_cidr.is_none() {
            return;
        }
        if p.agent && self.faults.agent_never_ready.contains(&node.node.name) {
            let name = node.node.name.to_string();
            self.count_fault(FaultKind::AgentNeverReady, name);
            return;
        }
        let agent = p.agent;
        self.mutate_pod(id, |p| {
            p.phase = PodPhase::Running;
            p.ready = true;
            p.awaiting_node = false;
        });
        if agent {
            self.on_agent_ready(n, id);
        }
    }

    /// A Ready agent writes Cilium's CNI config unless the effective config keeps
    /// `custom-cni-conf: "true"`.
    fn on_agent_ready(&mut self, n: usize, id: PodId) {
        let Some(c) = &self.cilium else { return };
        let mut eff = c.live.clone();
        if let Some((_, d)) = self.pods.get(&id).and_then(|p| p.agent_config.as_ref()) {
            eff.extend(d.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        if eff.get("custom-cni-conf").is_some_and(|v| v == "true") {
            return;
        }
        let Some(node) = self.nodes.get_mut(n) else {
            return;
        };
        node.cni.cilium_conflist = true;
        if eff.get("cni-exclusive").is_none_or(|v| v != "false") && node.cni.calico_conflist {
            node.cni.calico_conflist = false;
            node.cni.calico_backup = true;
        }
        node.chaining = Some(
            eff.get("cni-chaining-mode")
                .cloned()
                .unwrap_or_else(|| "none".into()),
        );
    }

    /// Starts terminating a pod (eviction or deletion). No budget check here.
    pub(crate) fn terminate(&mut self, id: PodId) {
        let Some(p) = self.pods.get(&id) else { return };
        if p.terminating {
            return;
        }
        let (w, bound, slot) = (p.workload, p.node.is_some(), p.slot);
        if p.is_drainable()
            && let Some(node) = p.node.and_then(|n| self.nodes.get_mut(n))
        {
            count_demand(&mut node.demand, &p.pdbs, false);
        }
        self.mutate_pod(id, |p| p.terminating = true);
        if let Some(wl) = self.workloads.get_mut(w) {
            wl.deactivate(id, slot);
        }
        if bound {
            let mut d = self.draw(self.params.pod_termination);
            if let Some(key) = self
                .fault_match(&self.faults.slow_termination_pods, id)
                .and_then(|_| self.pods.get(&id).map(SimPod::key))
            {
                self.count_fault(FaultKind::SlowTermination, key);
                d = d.max(self.faults.slow_termination);
            }
            self.schedule(d, Ev::PodGone(id));
        }
        if self
            .workloads
            .get(w)
            .is_some_and(|wl| wl.kind == WorkloadKind::Deployment)
        {
            self.reconcile_rs(w, false);
        }
        if !bound {
            self.remove_pod(id);
        }
    }

    fn remove_pod(&mut self, id: PodId) {
        let Some(p) = self.pods.remove(&id) else {
            return;
        };
        apply(&mut self.reach, &mut self.pdbs, &p.pdbs, contrib(&p), false);
        for &i in &p.pdbs {
            if let Some(pdb) = self.pdbs.get_mut(i) {
                pdb.members.remove(&id);
            }
        }
        if let Some(n) = p.node {
            if let Some(node) = self.nodes.get_mut(n) {
                node.pods.remove(&id);
                node.node.requested = sub(node.node.requested, p.requests);
                if p.is_drainable() && !p.terminating {
                    count_demand(&mut node.demand, &p.pdbs, false);
                }
            }
            self.reindex(n);
        }
        self.pending.remove(&id);
        let w = p.workload;
        let Some(wl) = self.workloads.get_mut(w) else {
            return;
        };
        wl.deactivate(id, p.slot);
        let slot_free =
            |wl: &Workload, _: &PodTable| wl.active_slots.get(&p.slot).is_none_or(|c| *c == 0);
        match (wl.kind, p.slot) {
            (WorkloadKind::StatefulSet, Slot::Ordinal(o))
                if o < wl.replicas && slot_free(wl, &self.pods) =>
            {
                self.create_pod(w, p.slot, false);
            }
            (WorkloadKind::DaemonSet | WorkloadKind::StaticPod, Slot::Node(n))
                if wl.per_node.contains(&n) && slot_free(wl, &self.pods) =>
            {
                self.create_pod(w, p.slot, false);
            }
            (WorkloadKind::Deployment, _) => self.reconcile_rs(w, false),
            _ => {}
        }
        self.retry_pending();
    }

    fn retry_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let ids: Vec<PodId> = self.pending.iter().copied().collect();
        // Placing a pod only takes room, so a pod the scheduler could not place in this pass is
        // not placed later in the pass either, nor any other pod of the same workload asking the
        // same (tolerating, requests): those are skipped without searching the nodes again.
        let mut unplaceable: Vec<(usize, bool, Resources)> = Vec::new();
        for id in ids {
            let Some(p) = self.pods.get(&id) else {
                continue;
            };
            let key = (p.slot == Slot::Any && p.node.is_none() && !p.terminating).then_some((
                p.workload,
                p.tolerates,
                p.requests,
            ));
            if key.is_some_and(|k| unplaceable.contains(&k)) {
                continue;
            }
            self.try_place(id, false);
            if let Some(k) = key
                && self.pending.contains(&id)
            {
                unplaceable.push(k);
            }
        }
    }

    // ---------------------------------------------------------------- nodes

    pub(crate) fn set_node_ready(&mut self, n: usize, ready: bool) {
        let Some(node) = self.nodes.get_mut(n) else {
            return;
        };
        if node.node.ready == ready {
            return;
        }
        node.node.ready = ready;
        node.node.taints.retain(|t| t.key != NOT_READY_TAINT);
        if !ready {
            node.node.taints.push(Taint {
                key: NOT_READY_TAINT.into(),
                value: String::new(),
                effect: "NoSchedule".into(),
            });
        }
        let name = node.node.name.clone();
        let ids: Vec<PodId> = node.pods.iter().copied().collect();
        let no_cidr = node.cilium_cidr.is_none();
        self.reindex(n);
        let never = no_cidr || self.faults.agent_never_ready.contains(&name);
        for id in ids {
            let Some(p) = self.pods.get(&id) else {
                continue;
            };
            let (gone, awaiting, agent, running, terminating) = (
                p.gone_blocked,
                p.awaiting_node,
                p.agent,
                p.phase == PodPhase::Running,
                p.terminating,
            );
            if !ready {
                self.mutate_pod(id, |p| p.ready = false);
            } else if gone {
                self.remove_pod(id);
            } else if awaiting {
                self.mutate_pod(id, |p| p.awaiting_node = false);
                let span = if agent {
                    self.params.agent_ready
                } else {
                    self.params.pod_ready
                };
                let d = self.draw(span);
                self.schedule(d, Ev::PodReady(id));
            } else if running && !terminating && !(agent && never) {
                self.mutate_pod(id, |p| p.ready = true);
            }
        }
        if ready {
            self.retry_pending();
        }
    }

    pub(crate) fn set_unschedulable(&mut self, n: usize, on: bool) {
        let now = self.now;
        let Some(node) = self.nodes.get_mut(n) else {
            return;
        };
        if node.node.unschedulable == on {
            return;
        }
        node.node.unschedulable = on;
        if on {
            node.cordoned_at = now;
        }
        node.node.taints.retain(|t| t.key != UNSCHEDULABLE_TAINT);
        if on {
            node.node.taints.push(Taint {
                key: UNSCHEDULABLE_TAINT.into(),
                value: String::new(),
                effect: "NoSchedule".into(),
            });
        }
        self.reindex(n);
        if !on {
            self.retry_pending();
        }
    }

    pub(crate) fn node_idx(&self, name: &NodeName) -> Option<usize> {
        self.node_index.get(name).copied()
    }

    // ---------------------------------------------------------------- Cilium

    pub(crate) fn install_cilium(&mut self, live: BTreeMap<String, String>) -> Result<(), String> {
        let pool_text = live
            .get("cluster-pool-ipv4-cidr")
            .map_or("10.0.0.0/8", String::as_str);
        let first = pool_text.split_whitespace().next().unwrap_or("10.0.0.0/8");
        let pool: Ipv4Net = first
            .parse()
            .map_err(|_| format!("cluster-pool-ipv4-cidr {pool_text:?} is not an IPv4 CIDR"))?;
        let mask: u8 = match live.get("cluster-pool-ipv4-mask-size") {
            None => 24,
            Some(m) => m
                .trim()
                .parse()
                .map_err(|_| format!("cluster-pool-ipv4-mask-size {m:?} is not a number"))?,
        };
        if mask < pool.prefix_len() || mask > 32 {
            return Err(format!(
                "cluster-pool-ipv4-mask-size /{mask} does not fit in {pool}"
            ));
        }
        if let Some(c) = &mut self.cilium {
            // An upgrade: new config, agents pick it up when they restart.
            c.live = live;
            self.check_reach();
            return Ok(());
        }
        let per = 1u64 << (32 - u32::from(mask));
        let count = 1u64 << (u32::from(mask) - u32::from(pool.prefix_len()));
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let i = i as u64;
            node.cilium_cidr = (i < count)
                .then(|| Ipv4Net::new(addr(pool.network(), i * per), mask).ok())
                .flatten();
        }
        let req = self.scenario.cilium_agent.resources();
        let mut labels = BTreeMap::new();
        labels.insert("k8s-app".to_string(), "cilium".to_string());
        let w = self.workloads.len();
        self.workloads.push(Workload {
            kind: WorkloadKind::DaemonSet,
            namespace: AGENT_NAMESPACE.into(),
            name: AGENT_NAME.into(),
            replicas: 0,
            template: Template {
                labels: Arc::new(labels),
                host_network: true,
                host_port: false,
                empty_dir: false,
                tolerates: true,
                requests: req,
            },
            allowed: None,
            per_node: (0..self.nodes.len()).collect(),
            active: BTreeSet::new(),
            active_slots: BTreeMap::new(),
            serial: 0,
            rs_hash: String::new(),
            agent: true,
            pdbs: Vec::new(),
        });
        self.index_workload_pdbs(w);
        self.cilium = Some(CiliumState { live, pool, mask });
        self.populate(w, false);
        self.check_reach();
        Ok(())
    }

    pub(crate) fn cilium_pool(&self) -> Option<(Ipv4Net, u8)> {
        self.cilium.as_ref().map(|c| (c.pool, c.mask))
    }

    /// The node's agent pod: the newest one not terminating, else the terminating one.
    pub(crate) fn agent_pod(&self, n: usize) -> Option<(PodId, &SimPod)> {
        let node = self.nodes.get(n)?;
        let mut best: Option<(PodId, &SimPod)> = None;
        for id in &node.pods {
            let Some(p) = self.pods.get(id) else { continue };
            if !p.agent {
                continue;
            }
            best = match best {
                Some((_, b)) if !b.terminating && p.terminating => best,
                _ => Some((*id, p)),
            };
        }
        best
    }

    pub(crate) fn agent_observation(&self, n: usize) -> Option<AgentObservation> {
        self.agent_pod(n).map(|(_, p)| AgentObservation {
            pod_uid: p.uid.clone(),
            ready: p.ready && !p.terminating,
            node_config: p.agent_config.as_ref().map(|(name, _)| name.clone()),
        })
    }

    pub(crate) fn agent_ready_with_config(&self, n: usize) -> bool {
        self.agent_observation(n)
            .is_some_and(|a| a.ready && a.node_config.is_some())
            && self.nodes.get(n).is_some_and(|n| n.cni.cilium_conflist)
    }

    pub(crate) fn request_restore(&mut self, n: usize) -> Result<(), String> {
        let Some(node) = self.nodes.get_mut(n) else {
            return Err("no such node".into());
        };
        if !node.node.ready {
            return Err(format!(
                "node {} is NotReady, so the helper pod cannot run there",
                node.node.name
            ));
        }
        if node.cni == CniDirState::CALICO || node.restore_pending {
            return Ok(());
        }
        node.restore_pending = true;
        let d = self.draw(self.params.cni_restore);
        self.schedule(d, Ev::CniRestored(n));
        Ok(())
    }

    pub(crate) fn schedule_not_ready(&mut self, n: usize, at: Time) {
        let after = at.since(self.now);
        self.schedule(after, Ev::NodeNotReady(n));
    }

    pub(crate) fn schedule_ready(&mut self, n: usize, at: Time) {
        let after = at.since(self.now);
        self.schedule(after, Ev::NodeReady(n));
    }

    /// Schedules `faults.node_joins[i]`.
    pub(crate) fn schedule_join(&mut self, i: usize, at: Time) {
        let after = at.since(self.now);
        self.schedule(after, Ev::NodeJoin(i));
    }

    // ---------------------------------------------------------------- eviction

    pub(crate) fn lookup(&self, r: &PodRef) -> Option<PodId> {
        let id = parse_uid(&r.uid)?;
        let p = self.pods.get(&id)?;
        (p.namespace == r.namespace && p.name == r.name).then_some(id)
    }

    /// The key in `b` (a pod, its workload or a budget covering it) that matches pod `id`.
    pub(crate) fn fault_match(&self, b: &BTreeSet<String>, id: PodId) -> Option<String> {
        if b.is_empty() {
            return None;
        }
        let p = self.pods.get(&id)?;
        if b.contains(&p.key()) {
            return Some(p.key());
        }
        if let Some(wl) = self.workloads.get(p.workload) {
            let k = format!("{}/{}", wl.namespace, wl.name);
            if b.contains(&k) {
                return Some(k);
            }
        }
        p.pdbs
            .iter()
            .filter_map(|&i| self.pdbs.get(i))
            .map(|x| x.key.clone())
            .find(|k| b.contains(k))
    }

    /// The Eviction API.
    pub(crate) fn evict(&mut self, r: &PodRef) -> EvictOutcome {
        self.stats.evictions_attempted += 1;
        let Some(id) = self.lookup(r) else {
            self.stats.evictions_gone += 1;
            return EvictOutcome::Gone;
        };
        let Some(p) = self.pods.get(&id) else {
            return EvictOutcome::Gone;
        };
        let node = p.node;
        let key = p.key();
        let network = p.network;
        let outcome = if p.terminating {
            EvictOutcome::Evicted
        } else if let Some(k) = self.fault_match(&self.faults.blocked_evictions, id) {
            self.count_fault(FaultKind::EvictionBlocked, key.clone());
            EvictOutcome::BlockedByBudget { pdb: k }
        } else if p.phase == PodPhase::Running && p.ready {
            match p.pdbs.as_slice() {
                [] => EvictOutcome::Evicted,
                [one] => match self.pdbs.get(*one) {
                    Some(b) if b.allowed() == 0 => {
                        EvictOutcome::BlockedByBudget { pdb: b.key.clone() }
                    }
                    _ => EvictOutcome::Evicted,
                },
                many => EvictOutcome::MultipleBudgets {
                    pdbs: many
                        .iter()
                        .filter_map(|&i| self.pdbs.get(i))
                        .map(|b| b.key.clone())
                        .collect(),
                },
            }
        } else {
            EvictOutcome::Evicted
        };
        match &outcome {
            EvictOutcome::Evicted => {
                self.stats.evictions_accepted += 1;
                self.disrupt(id, "eviction");
            }
            EvictOutcome::BlockedByBudget { .. } => self.stats.evictions_blocked += 1,
            EvictOutcome::MultipleBudgets { .. } => self.stats.evictions_multiple_budgets += 1,
            EvictOutcome::Gone => self.stats.evictions_gone += 1,
        }
        if let Some(n) = node {
            let accepted = outcome == EvictOutcome::Evicted;
            self.log(
                n,
                OpKind::Evict {
                    pod: key,
                    accepted,
                    network,
                },
            );
        }
        outcome
    }

    /// Terminates `id` on behalf of the migration and checks the budget invariant.
    pub(crate) fn disrupt(&mut self, id: PodId, how: &str) {
        let Some(p) = self.pods.get(&id) else { return };
        let key = p.key();
        let before: Vec<(usize, u32)> = p
            .pdbs
            .iter()
            .filter_map(|&i| self.pdbs.get(i).map(|b| (i, b.healthy)))
            .collect();
        self.terminate(id);
        for (i, h0) in before {
            let Some(b) = self.pdbs.get(i) else { continue };
            let desired = b.pdb.desired_healthy();
            if b.healthy < desired && h0 >= desired {
                let msg = format!(
                    "{how} of {key} left budget {} with {} healthy pod(s), below the {desired} it requires",
                    b.key.clone(),
                    b.healthy
                );
                self.violate(ViolationKind::Pdb, msg);
            }
        }
    }

    // ---------------------------------------------------------------- records and checks

    pub(crate) fn log(&mut self, n: usize, kind: OpKind) {
        let Some(node) = self.nodes.get(n) else {
            return;
        };
        let name = node.node.name.clone();
        if self.write_ahead
            && let Err(why) =
                crate::faults::write_ahead(node.annotation.as_deref(), &kind, self.carried)
        {
            self.violate(
                ViolationKind::WriteAhead,
                format!("{kind:?} on node {name} without a persisted record leading to it: {why}"),
            );
        }
        let Some(node) = self.nodes.get(n) else {
            return;
        };
        if self.control_plane_last
            && self.in_scope(n)
            && !node.node.is_control_plane()
            && let Some(cp) = self.cp_started
            && !self.not_ready_at_cp_start.contains(&n)
            && self.late_reported.insert(n)
        {
            let cp_name = self
                .nodes
                .get(cp)
                .map(|c| c.node.name.to_string())
                .unwrap_or_default();
            self.violate(
                ViolationKind::Order,
                format!("worker {name} was acted on ({kind:?}) after control-plane node {cp_name} started"),
            );
        }
        self.op_log.push(Op {
            time: self.now,
            node: name,
            kind,
        });
    }

    pub(crate) fn violate(&mut self, kind: ViolationKind, message: String) {
        self.violations.push(Violation {
            time: self.now,
            kind,
            message,
        });
    }

    pub(crate) fn in_scope(&self, n: usize) -> bool {
        self.scope.as_ref().is_none_or(|s| s.contains(&n))
    }

    pub(crate) fn is_migration_label(&self, key: &str) -> bool {
        key == cnimig_core::config::DEFAULT_MIGRATION_LABEL
            || self.node_configs.values().any(|c| c.label == key)
    }

    pub(crate) fn labelled(&self, n: usize) -> bool {
        self.nodes.get(n).is_some_and(|node| {
            node.node
                .labels
                .iter()
                .any(|(k, v)| v == "true" && self.is_migration_label(k))
        })
    }

    /// The drainable pods on node `n` that were there when it was cordoned: what a finished
    /// drain has evicted (`kubectl drain` semantics: pods arriving on the cordoned node later,
    /// because they tolerate the cordon, are not chased and move after the agent restart).
    pub(crate) fn drainable_since_cordon(
        &self,
        n: usize,
    ) -> impl Iterator<Item = (PodId, &SimPod)> {
        let at = self.nodes.get(n).map_or(Time(0), |x| x.cordoned_at);
        self.drainable_on(n).filter(move |(_, p)| p.created <= at)
    }

    pub(crate) fn drainable_on(&self, n: usize) -> impl Iterator<Item = (PodId, &SimPod)> {
        self.nodes
            .get(n)
            .into_iter()
            .flat_map(|node| node.pods.iter())
            .filter_map(|id| self.pods.get(id).map(|p| (*id, p)))
            .filter(|(_, p)| p.is_drainable())
    }

    /// [`SimNode::demand`] computed from the node's pods (what the cache must equal).
    pub(crate) fn demand_by_walk(&self, n: usize) -> Vec<(usize, u32)> {
        let mut demand = Vec::new();
        for (_, p) in self.drainable_on(n).filter(|(_, p)| !p.terminating) {
            count_demand(&mut demand, &p.pdbs, true);
        }
        demand
    }

    fn record(&self, n: usize) -> Option<NodeRecord> {
        let a = self.nodes.get(n)?.annotation.as_ref()?;
        NodeRecord::from_annotation(a).ok()
    }

    fn record_phase(&self, n: usize) -> Option<Phase> {
        self.record(n).map(|r| r.phase)
    }

    fn record_terminal(&self, n: usize) -> Option<bool> {
        let a = self.nodes.get(n)?.annotation.as_ref()?;
        NodeRecord::from_annotation(a)
            .ok()
            .map(|r| r.phase.is_terminal())
    }

    /// Checks made when the migration cordons node `n` (before the cordon takes effect).
    pub(crate) fn on_migration_cordon(&mut self, n: usize) {
        let Some(node) = self.nodes.get(n) else {
            return;
        };
        let name = node.node.name.clone();
        if node.node.is_control_plane() && self.in_scope(n) && self.control_plane_last {
            let unfinished: Vec<String> = (0..self.nodes.len())
                .filter(|&w| w != n && self.in_scope(w))
                .filter(|&w| {
                    self.nodes
                        .get(w)
                        .is_some_and(|x| !x.node.is_control_plane())
                })
                .filter(|&w| {
                    self.record_terminal(w) == Some(false)
                        || (self.labelled(w)
                            && self.nodes.get(w).is_some_and(|x| !x.cni.cilium_conflist))
                })
                .filter_map(|w| self.nodes.get(w).map(|x| x.node.name.to_string()))
                .collect();
            if !unfinished.is_empty() {
                self.violate(
                    ViolationKind::Order,
                    format!(
                        "control-plane node {name} cordoned while worker(s) {} are still migrating",
                        unfinished.join(", ")
                    ),
                );
            }
            if self.cp_started.is_none() {
                self.cp_started = Some(n);
                self.not_ready_at_cp_start = (0..self.nodes.len())
                    .filter(|&w| self.nodes.get(w).is_some_and(|x| !x.node.ready))
                    .collect();
            }
        }
        // Budget oversubscription, judged when a node starts: a rollback cordoning its node again
        // is not a start.
        if self.record_phase(n).is_some_and(|p| p != Phase::Pending) {
            return;
        }
        let demand: BTreeMap<usize, u32> = self
            .nodes
            .get(n)
            .map(|x| x.demand.iter().copied().collect())
            .unwrap_or_default();
        if demand.is_empty() {
            return;
        }
        let mut pending: BTreeMap<usize, u32> = BTreeMap::new();
        for &m in &self.cordoned_by_us {
            // What is still to drain on `m`, by its record: a forward drain evicts every drainable
            // pod, a rollback's drain only those on Cilium, anything else nothing.
            let (draining, cilium_only) = match self.record(m) {
                None => (!self.labelled(m), false),
                Some(r) => match (r.phase, r.rollback.as_ref().map(|rb| rb.step)) {
                    (Phase::Pending | Phase::Cordoned, _) => (true, false),
                    (
                        Phase::RollingBack,
                        Some(RollbackStep::Cordon | RollbackStep::DrainCilium),
                    ) => (true, true),
                    _ => (false, false),
                },
            };
            if m == n || !draining {
                continue;
            }
            for (_, p) in self
                .drainable_on(m)
                .filter(|(_, p)| !p.terminating)
                .filter(|(_, p)| !cilium_only || p.network == PodNetwork::Cilium)
            {
                for &i in &p.pdbs {
                    if demand.contains_key(&i) {
                        *pending.entry(i).or_default() += 1;
                    }
                }
            }
        }
        for (i, d) in demand {
            let pend = pending.get(&i).copied().unwrap_or(0);
            let Some(b) = self.pdbs.get(i) else { continue };
            let allowed = b.allowed();
            if pend > 0 && pend + d > allowed {
                let msg = format!(
                    "node {name} started while budget {} is oversubscribed: {pend} pod(s) still to drain on other cordoned nodes plus {d} here, {allowed} disruption(s) allowed",
                    b.key.clone()
                );
                self.violate(ViolationKind::Oversubscribed, msg);
            }
        }
    }

    /// Records a connectivity violation on each transition from reachable to broken.
    pub(crate) fn check_reach(&mut self) {
        let broken = self.reach_broken();
        if broken && !self.was_broken {
            let problems = self.reachability_problems();
            self.violate(ViolationKind::Connectivity, problems.join("; "));
        }
        self.was_broken = broken;
    }

    // ---------------------------------------------------------------- views

    pub(crate) fn model_pod(&self, p: &SimPod) -> Pod {
        Pod {
            pod: PodRef {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                uid: p.uid.clone(),
            },
            labels: Arc::clone(&p.labels),
            owner: p.owner.clone(),
            node: p
                .node
                .and_then(|n| self.nodes.get(n))
                .map(|n| n.node.name.clone()),
            ip: p.ip,
            network: p.network,
            phase: p.phase,
            ready: p.ready,
            terminating: p.terminating,
            host_network: p.host_network,
            host_port: p.host_port,
            empty_dir: p.empty_dir,
            mirror: p.mirror,
            tolerates_unschedulable: p.tolerates,
            requests: p.requests,
            created: Some(p.created),
        }
    }

    /// The budgets covering node `n`'s Running, Ready, drainable pods, and their allowances.
    pub(crate) fn pod_budgets(&self, n: usize) -> cnimig_core::ports::PodBudgets {
        let mut out = cnimig_core::ports::PodBudgets::default();
        let Some(node) = self.nodes.get(n) else {
            return out;
        };
        for p in node.pods.iter().filter_map(|id| self.pods.get(id)) {
            if p.pdbs.is_empty() || p.terminating || p.phase != PodPhase::Running || !p.ready {
                continue;
            }
            let m = self.model_pod(p);
            if !m.is_drainable() {
                continue;
            }
            let names: Vec<String> = p
                .pdbs
                .iter()
                .filter_map(|&i| self.pdbs.get(i))
                .map(|b| {
                    out.allowed.insert(b.key.clone(), b.allowed());
                    b.key.clone()
                })
                .collect();
            out.covering.insert(m.pod, names);
        }
        out
    }

    pub(crate) fn pods_on(&self, n: usize) -> Vec<Pod> {
        self.nodes
            .get(n)
            .map(|node| {
                node.pods
                    .iter()
                    .filter_map(|id| self.pods.get(id))
                    .map(|p| self.model_pod(p))
                    .collect()
            })
            .unwrap_or_default()
    }
}
