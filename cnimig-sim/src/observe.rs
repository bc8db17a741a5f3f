//! What the simulator records about a run: invariant violations, the log of migration
//! operations, counters, budgets' health, and the faults it injects.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use cnimig_core::model::{NodeName, Time};
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
    },
    /// A pod on the node deleted.
    Delete {
        /// `namespace/name`.
        pod: String,
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

/// Faults to inject. All off by default.
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
}
