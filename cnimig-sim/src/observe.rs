//! What the simulator records about a run: invariant violations, the log of migration
//! operations, counters, budgets' health, and the faults it injects.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use cnimig_core::model::{NodeName, PodNetwork, Time};
use serde::Serialize;

/// Which invariant a [`Violation`] breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum ViolationKind {
    /// A migration action left a budget below its desired healthy count.
    Pdb,
    /// Some ready pods could no longer reach each other.
    Connectivity,
    /// A step happened out of order (label before drain, uncordon before the agent is ready,
    /// control-plane nodes before workers).
    Order,
    /// A node was started while a budget it needs was already promised to another draining node.
    Oversubscribed,
    /// A migration operation was not justified by the node's persisted record: the record that
    /// leads to an action must be saved before the action (checked only after
    /// [`SimCluster::check_write_ahead`](crate::SimCluster::check_write_ahead)).
    WriteAhead,
}

/// One invariant violation, recorded by the simulator when it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// When.
    pub time: Time,
    /// Which invariant.
    pub kind: ViolationKind,
    /// What happened, naming the objects.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {:?}: {}", self.time, self.kind, self.message)
    }
}

/// What a logged operation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum OpKind {
    /// `set_unschedulable(true)`.
    Cordon,
    /// `set_unschedulable(false)`.
    Uncordon,
    /// A label set.
    Label {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// A label removed.
    Unlabel {
        /// Key.
        key: String,
    },
    /// The agent pod with this UID deleted.
    RestartAgent {
        /// Agent pod UID.
        uid: String,
    },
    /// Calico's CNI config restore requested.
    RestoreCni,
    /// An eviction of a pod on the node.
    Evict {
        /// `namespace/name`.
        pod: String,
        /// Accepted (the pod is terminating).
        accepted: bool,
        /// The network the pod was on.
        network: PodNetwork,
    },
    /// A pod on the node deleted.
    Delete {
        /// `namespace/name`.
        pod: String,
        /// The network the pod was on.
        network: PodNetwork,
    },
}

/// One operation the migration did on a node, in the order they happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Op {
    /// When.
    pub time: Time,
    /// The node acted on (for pods: the node they were on).
    pub node: NodeName,
    /// What.
    pub kind: OpKind,
}

/// Counters over a simulation.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct SimStats {
    /// Eviction requests.
    pub evictions_attempted: u64,
    /// Evictions that made a pod terminate (or found it terminating already).
    pub evictions_accepted: u64,
    /// Evictions refused by a budget (429).
    pub evictions_blocked: u64,
    /// Evictions refused because several budgets cover the pod (500).
    pub evictions_multiple_budgets: u64,
    /// Evictions of pods that were gone (404/409).
    pub evictions_gone: u64,
    /// Faults injected, by kind (API errors per failed call; node and pod faults once per node or
    /// pod they hit).
    pub faults_injected: BTreeMap<FaultKind, u64>,
    /// Pod deletions (`delete_pod` and agent restarts).
    pub deletions: u64,
    /// Port calls per method (`Cluster::evict`, `Clock::sleep_until`, …).
    pub api_calls: BTreeMap<String, u64>,
    /// Pods created (initial and replacements).
    pub pods_created: u64,
    /// Scheduled events processed by the clock.
    pub events_processed: u64,
}

impl SimStats {
    /// All port calls.
    #[must_use]
    pub fn total_api_calls(&self) -> u64 {
        self.api_calls.values().sum()
    }
    /// All faults injected.
    #[must_use]
    pub fn total_faults(&self) -> u64 {
        self.faults_injected.values().sum()
    }
}

/// One budget's health now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PdbHealth {
    /// `namespace/name`.
    pub pdb: String,
    /// Covered pods Ready and not terminating.
    pub healthy: u32,
    /// The healthy count the budget requires.
    pub desired: u32,
    /// The pods the controller wants.
    pub expected: u32,
    /// Disruptions allowed now.
    pub allowed: u32,
}

impl From<PdbHealth> for cnimig_core::report::BudgetHealth {
    fn from(h: PdbHealth) -> Self {
        cnimig_core::report::BudgetHealth {
            pdb: h.pdb,
            healthy: h.healthy,
            desired: h.desired,
            expected: h.expected,
        }
    }
}

/// A kind of injected fault, for [`SimStats::faults_injected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// A port call failed with 500 Internal Server Error ([`PortError::Unavailable`]).
    ///
    /// [`PortError::Unavailable`]: cnimig_core::ports::PortError::Unavailable
    Api500,
    /// A port call failed with 503 Service Unavailable ([`PortError::Unavailable`]).
    ///
    /// [`PortError::Unavailable`]: cnimig_core::ports::PortError::Unavailable
    Api503,
    /// A port call was throttled: 429 without a budget cause ([`PortError::Throttled`]).
    ///
    /// [`PortError::Throttled`]: cnimig_core::ports::PortError::Throttled
    Api429,
    /// A write failed with 409 Conflict ([`PortError::Conflict`]); never on the state store, whose
    /// conflicts mean another writer.
    ///
    /// [`PortError::Conflict`]: cnimig_core::ports::PortError::Conflict
    Api409,
    /// A port call timed out before the server acted ([`PortError::Timeout`]).
    ///
    /// [`PortError::Timeout`]: cnimig_core::ports::PortError::Timeout
    ApiTimeout,
    /// A write timed out after the server had applied it: the caller sees an error for a change
    /// that happened.
    ApiTimeoutApplied,
    /// A node's Cilium agent never became Ready.
    AgentNeverReady,
    /// A pod's eviction was refused forever, as by a budget that never allows it.
    EvictionBlocked,
    /// A node went NotReady.
    NodeNotReady,
    /// A node joined the cluster.
    NodeJoined,
    /// A pod ignored its termination grace period and took much longer to go.
    SlowTermination,
    /// A node's verification failed after its agent restart.
    VerifyFailed,
}

impl FaultKind {
    /// Every kind, in report order.
    pub const ALL: [FaultKind; 12] = [
        FaultKind::Api500,
        FaultKind::Api503,
        FaultKind::Api429,
        FaultKind::Api409,
        FaultKind::ApiTimeout,
        FaultKind::ApiTimeoutApplied,
        FaultKind::AgentNeverReady,
        FaultKind::EvictionBlocked,
        FaultKind::NodeNotReady,
        FaultKind::NodeJoined,
        FaultKind::SlowTermination,
        FaultKind::VerifyFailed,
    ];
    /// A short kebab-case name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Api500 => "api-500",
            FaultKind::Api503 => "api-503",
            FaultKind::Api429 => "api-429",
            FaultKind::Api409 => "api-409",
            FaultKind::ApiTimeout => "api-timeout",
            FaultKind::ApiTimeoutApplied => "api-timeout-applied",
            FaultKind::AgentNeverReady => "agent-never-ready",
            FaultKind::EvictionBlocked => "eviction-blocked",
            FaultKind::NodeNotReady => "node-not-ready",
            FaultKind::NodeJoined => "node-joined",
            FaultKind::SlowTermination => "slow-termination",
            FaultKind::VerifyFailed => "verify-failed",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node that joins the cluster during a simulation: Ready, schedulable, with the same
/// allocatable resources as the scenario's first node, and the pods of every DaemonSet (the Cilium
/// agent's included) whose placement selects it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeJoin {
    /// Its name (must not exist yet).
    pub name: NodeName,
    /// When it joins.
    pub at: Time,
    /// Its zone (`None`: no zone label).
    pub zone: Option<String>,
    /// A control-plane (and etcd) node rather than a worker.
    pub control_plane: bool,
}

/// Faults to inject. All off by default. Replayable: the only randomness is the simulator's fault
/// generator, seeded from the simulation's seed (separately from its timings).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SimFaults {
    /// Cilium agents on these nodes never become Ready.
    pub agent_never_ready: BTreeSet<NodeName>,
    /// Evictions always refused with a budget 429 for pods matching any of these `namespace/name`
    /// keys: a pod, a workload (its pods) or a budget (the pods it covers).
    pub blocked_evictions: BTreeSet<String>,
    /// These nodes go NotReady at these times (their kubelet stops: pods turn unready, nothing
    /// on the node starts or finishes terminating).
    pub node_not_ready_at: Vec<(NodeName, Time)>,
    /// These nodes come back Ready at these times.
    pub node_ready_at: Vec<(NodeName, Time)>,
    /// Each port call (the clock's aside) fails with this probability, in parts per million:
    /// 500, 503, 429 throttling, 409 conflicts (writes other than the state store's), and
    /// timeouts (on writes, half of them after the write was applied).
    pub api_error_ppm: u32,
    /// The port methods API errors hit, named as in [`SimStats::api_calls`]
    /// (`Cluster::evict`, `StateStore::save`, …); empty means every method.
    pub api_error_methods: BTreeSet<String>,
    /// Nodes that join during the run.
    pub node_joins: Vec<NodeJoin>,
    /// Pods matching any of these `namespace/name` keys (pod, workload or budget, as for
    /// `blocked_evictions`) ignore their termination grace period: once deleted they take
    /// `slow_termination` to go.
    pub slow_termination_pods: BTreeSet<String>,
    /// How long the pods in `slow_termination_pods` take to go.
    pub slow_termination: Duration,
    /// Verification of these nodes fails once they carry the migration label (after their agent
    /// restart), as when a connectivity check from the node fails.
    pub verify_fails: BTreeSet<NodeName>,
}
