//! The ports the orchestrator drives: the cluster, the old and new CNI, the verifier, the state
//! store and the clock.
//!
//! Every trait uses `#[async_trait]`: embedders choose backends at run time (`dyn Cluster`), and
//! the orchestrator's future must be `Send` to run on a multi-threaded runtime; `async_trait`
//! gives both without per-method bounds. The in-memory simulator (`cnimig-sim`) and the
//! Kubernetes adapter (`cnimig-kube`) implement all of them.
//!
//! Semantics every implementation must keep (the conformance tests check them):
//! - Reads return the cluster as it is now; writes are visible to the next read.
//! - [`Cluster::evict`] behaves like the Eviction API: it honours PodDisruptionBudgets and keys
//!   on the pod's UID.
//! - [`StateStore::save`] is a compare-and-swap: it fails with [`PortError::Conflict`] when the
//!   stored record is not `prev`.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::cilium::CiliumNodeConfig;
use crate::machine::NodeRecord;
use crate::model::{CalicoFacts, Node, NodeName, Pdb, Pod, PodRef, Resources, Time};

/// Errors any port can return, with enough meaning for the orchestrator to decide to retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// The object does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// A concurrent writer changed the object first.
    #[error("conflict writing {what}: someone else changed it first; re-read and retry")]
    Conflict {
        /// What was written.
        what: String,
    },
    /// The credentials lack a permission.
    #[error("forbidden: cannot {verb} {what}; grant it in the cnimig ClusterRole")]
    Forbidden {
        /// The verb.
        verb: String,
        /// The object.
        what: String,
    },
    /// The API server asked us to slow down.
    #[error("throttled by the API server; retry after {retry_after:?}")]
    Throttled {
        /// How long to wait.
        retry_after: Duration,
    },
    /// The call did not finish in time.
    #[error("timed out: {what}")]
    Timeout {
        /// What timed out.
        what: String,
    },
    /// The API server or a backend failed (5xx, connection reset).
    #[error("{what} failed: {detail}")]
    Unavailable {
        /// What was attempted.
        what: String,
        /// What came back.
        detail: String,
    },
    /// The request was rejected as invalid.
    #[error("{what} rejected: {detail}")]
    Invalid {
        /// What was attempted.
        what: String,
        /// Why.
        detail: String,
    },
}

impl PortError {
    /// True for errors worth retrying as they are (throttling, timeouts, 5xx).
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            PortError::Throttled { .. } | PortError::Timeout { .. } | PortError::Unavailable { .. }
        )
    }
}

/// Result of one eviction request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EvictOutcome {
    /// Accepted: the pod is terminating.
    Evicted,
    /// The pod (with that UID) no longer exists.
    Gone,
    /// 429 with a `DisruptionBudget` cause: the named budget allows no disruption now.
    BlockedByBudget {
        /// `namespace/name` of the budget.
        pdb: String,
    },
    /// 500 "more than one PodDisruptionBudget": never succeeds until a person fixes the budgets.
    MultipleBudgets {
        /// The budgets covering the pod.
        pdbs: Vec<String>,
    },
}

/// The pods bound to one node, and the node itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// The node.
    pub node: Node,
    /// Pods bound to the node (any phase, terminating included).
    pub pods: Vec<Pod>,
}

/// What the scheduler needs to know about disruption budgets for a set of candidate nodes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BudgetView {
    /// For each node asked about: the budgets covering its drainable pods, with how many of its
    /// pods each covers.
    pub per_node: BTreeMap<NodeName, Vec<(String, u32)>>,
    /// For each budget named above: disruptions allowed now.
    pub allowed: BTreeMap<String, u32>,
}

/// The budgets that govern the evictions of one node's pods ([`Cluster::pod_budgets`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodBudgets {
    /// For each Running and Ready drainable pod on the node that budgets cover: their names
    /// (`namespace/name`). Pods that are not Ready are left out: whether the API server lets
    /// them go does not depend on the allowance alone (`unhealthyPodEvictionPolicy`).
    pub covering: BTreeMap<PodRef, Vec<String>>,
    /// For each budget named above: disruptions allowed now.
    pub allowed: BTreeMap<String, u32>,
}

/// Cluster-wide inventory, read once for preflight and planning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    /// Nodes.
    pub nodes: Vec<Node>,
    /// Pods.
    pub pods: Vec<Pod>,
    /// Budgets.
    pub pdbs: Vec<Pdb>,
    /// Service CIDR.
    pub service_cidr: ipnet::Ipv4Net,
    /// Cluster CIDR, if known.
    pub cluster_cidr: Option<ipnet::Ipv4Net>,
    /// A connectivity checker (Goldpinger) is deployed.
    pub connectivity_checker: bool,
    /// The Cilium agent's requests per node.
    pub cilium_agent_requests: Resources,
    /// Nodes on which this adapter cannot see what a node's `AgentReady` step waits for (the
    /// node config its Cilium agent resolved, Cilium's CNI config in `/etc/cni/net.d`), each with
    /// why and what to do. A run would time out there and roll the node back, so preflight
    /// refuses them (rule `node-observability`). Empty when the adapter sees every node.
    pub unobservable: BTreeMap<NodeName, String>,
}

impl Inventory {
    /// The snapshot preflight and the planner read: this inventory plus Calico's facts.
    #[must_use]
    pub fn with_calico(self, calico: CalicoFacts) -> crate::model::ClusterSnapshot {
        crate::model::ClusterSnapshot {
            nodes: self.nodes,
            pods: self.pods,
            pdbs: self.pdbs,
            calico,
            service_cidr: self.service_cidr,
            cluster_cidr: self.cluster_cidr,
            other_routed: Vec::new(),
            connectivity_checker: self.connectivity_checker,
            cilium_agent_requests: self.cilium_agent_requests,
            records: BTreeMap::new(),
            unobservable: self.unobservable,
        }
    }
}

/// The Kubernetes side: nodes, pods, eviction.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// Everything preflight needs.
    ///
    /// # Errors
    /// Any read failure.
    async fn inventory(&self) -> Result<Inventory, PortError>;
    /// Names of all nodes now (to notice nodes that join during a run).
    ///
    /// # Errors
    /// Any read failure.
    async fn node_names(&self) -> Result<Vec<NodeName>, PortError>;
    /// One node and the pods bound to it.
    ///
    /// # Errors
    /// [`PortError::NotFound`] when the node is gone.
    async fn node_view(&self, node: &NodeName) -> Result<NodeView, PortError>;
    /// Budgets touching the drainable pods of `nodes`.
    ///
    /// # Errors
    /// Any read failure.
    async fn budget_view(&self, nodes: &[NodeName]) -> Result<BudgetView, PortError>;
    /// The budgets covering the Ready pods of `node` and what each allows now, when the adapter
    /// knows them without a request (from its watches, or in memory); empty when it does not.
    /// The orchestrator holds back the evictions these budgets would refuse (each a 429).
    ///
    /// # Errors
    /// Any read failure.
    async fn pod_budgets(&self, node: &NodeName) -> Result<PodBudgets, PortError> {
        let _ = node;
        Ok(PodBudgets::default())
    }
    /// Sets `spec.unschedulable`.
    ///
    /// # Errors
    /// Any write failure.
    async fn set_unschedulable(
        &self,
        node: &NodeName,
        unschedulable: bool,
    ) -> Result<(), PortError>;
    /// Sets (`Some`) or removes (`None`) a node label.
    ///
    /// # Errors
    /// Any write failure.
    async fn set_node_label(
        &self,
        node: &NodeName,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), PortError>;
    /// Posts an Eviction for the pod with this UID.
    ///
    /// # Errors
    /// Transport or permission failures; budget refusals are [`EvictOutcome`]s, not errors.
    async fn evict(&self, pod: &PodRef) -> Result<EvictOutcome, PortError>;
    /// Deletes the pod with this UID (for DaemonSet pods, which eviction would not move).
    ///
    /// # Errors
    /// Any write failure other than the pod being gone (which is success).
    async fn delete_pod(&self, pod: &PodRef) -> Result<(), PortError>;
}

/// The Cilium agent on one node, as observed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentObservation {
    /// UID of the agent pod now on the node.
    pub pod_uid: String,
    /// The agent pod is Ready.
    pub ready: bool,
    /// The `CiliumNodeConfig` the agent resolved at start-up (its `config-sources`), if any.
    pub node_config: Option<String>,
}

/// The state of a node's `/etc/cni/net.d`, as far as the migration cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CniDirState {
    /// `05-cilium.conflist` is present (Cilium is the node's CNI for new pods).
    pub cilium_conflist: bool,
    /// `10-calico.conflist` is present and active.
    pub calico_conflist: bool,
    /// `10-calico.conflist.cilium_bak` is present (Cilium moved Calico's config aside).
    pub calico_backup: bool,
}

impl CniDirState {
    /// A node Calico alone manages.
    pub const CALICO: CniDirState = CniDirState {
        cilium_conflist: false,
        calico_conflist: true,
        calico_backup: false,
    };
    /// A node Cilium took over (what a migrated node looks like).
    pub const CILIUM: CniDirState = CniDirState {
        cilium_conflist: true,
        calico_conflist: false,
        calico_backup: true,
    };
}

/// The new CNI: Cilium.
#[async_trait]
pub trait NewCni: Send + Sync {
    /// The live `kube-system/cilium-config` data.
    ///
    /// # Errors
    /// [`PortError::NotFound`] when Cilium is not installed.
    async fn live_config(&self) -> Result<BTreeMap<String, String>, PortError>;
    /// Creates or updates the `CiliumNodeConfig` (at the API version the cluster serves).
    ///
    /// # Errors
    /// Any write failure.
    async fn apply_node_config(&self, config: &CiliumNodeConfig) -> Result<(), PortError>;
    /// The agent on `node`, if one is scheduled there.
    ///
    /// # Errors
    /// Any read failure.
    async fn agent(&self, node: &NodeName) -> Result<Option<AgentObservation>, PortError>;
    /// Deletes the agent pod with this UID so its DaemonSet recreates it (and it re-resolves its
    /// node config).
    ///
    /// # Errors
    /// Any write failure other than the pod being gone.
    async fn restart_agent(&self, node: &NodeName, pod_uid: &str) -> Result<(), PortError>;
    /// The node's CNI config directory.
    ///
    /// # Errors
    /// Any read failure.
    async fn cni_dir(&self, node: &NodeName) -> Result<CniDirState, PortError>;
    /// Puts Calico's CNI config back on the node (removes `05-cilium.conflist`, renames
    /// `10-calico.conflist.cilium_bak` back), e.g. through a privileged helper pod that is removed
    /// afterwards. Idempotent.
    ///
    /// # Errors
    /// Any failure; the node then stays in rollback.
    async fn restore_calico_cni(&self, node: &NodeName) -> Result<(), PortError>;
}

/// The old CNI: Calico.
#[async_trait]
pub trait OldCni: Send + Sync {
    /// IP pools, encapsulation, VXLAN port, autodetection, dataplane.
    ///
    /// # Errors
    /// Any read failure.
    async fn facts(&self) -> Result<CalicoFacts, PortError>;
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verification {
    /// Everything checked is fine.
    Healthy,
    /// Something is wrong; each entry names one problem.
    Unhealthy(Vec<String>),
}

/// Checks that a migrated node works.
#[async_trait]
pub trait Verifier: Send + Sync {
    /// Every pod on `node` that uses the pod network is Cilium-managed, and the node's pods reach
    /// the rest of the cluster.
    ///
    /// # Errors
    /// When the check itself could not run (not when it found a problem).
    async fn verify_node(&self, node: &NodeName) -> Result<Verification, PortError>;
    /// Every node reaches every node (Goldpinger's full check).
    ///
    /// # Errors
    /// When the check itself could not run.
    async fn verify_cluster(&self) -> Result<Verification, PortError>;
}

/// Where a run keeps each node's [`NodeRecord`] (a Node annotation on a real cluster) and its
/// single-run lock (a Lease).
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Every node's record.
    ///
    /// # Errors
    /// Any read failure.
    async fn load(&self) -> Result<BTreeMap<NodeName, NodeRecord>, PortError>;
    /// Replaces `node`'s record if it still is `prev` (compare-and-swap; `None` = no record).
    ///
    /// # Errors
    /// [`PortError::Conflict`] when the stored record differs from `prev`.
    async fn save(
        &self,
        node: &NodeName,
        prev: Option<&NodeRecord>,
        next: &NodeRecord,
    ) -> Result<(), PortError>;
    /// Replaces `node`'s record if it still is `prev` (`None` = no record), like
    /// [`save`](StateStore::save), and applies `change` to the node **in the same write**: both
    /// land or neither. `Ok(true)` when written; `Ok(false)` when the store cannot carry the
    /// change (the default) or refused the combined write for a reason other than the record,
    /// having written nothing: the caller then saves and applies the change separately.
    ///
    /// A store on the Kubernetes API saves a request per cordon, label and uncordon this way
    /// (one JSON Patch that `test`s the record, replaces it and sets the field).
    ///
    /// # Errors
    /// As [`save`](StateStore::save): [`PortError::Conflict`] when the stored record differs
    /// from `prev`; a failure that may hide a landed write (timeout, 5xx) means the record and
    /// the change may both have landed.
    async fn save_with(
        &self,
        node: &NodeName,
        prev: Option<&NodeRecord>,
        next: &NodeRecord,
        change: &NodeChange,
    ) -> Result<bool, PortError> {
        let _ = (node, prev, next, change);
        Ok(false)
    }
    /// Takes or renews the run lock for `holder` until `now + ttl`. Returns the current holder
    /// when someone else holds an unexpired lock.
    ///
    /// # Errors
    /// Any read or write failure.
    async fn acquire_lock(
        &self,
        holder: &str,
        now: Time,
        ttl: Duration,
    ) -> Result<LockOutcome, PortError>;
    /// Releases the lock if `holder` has it.
    ///
    /// # Errors
    /// Any write failure.
    async fn release_lock(&self, holder: &str) -> Result<(), PortError>;
    /// When the run lock had last been taken or renewed before this store's latest
    /// [`acquire_lock`](StateStore::acquire_lock) took it: the last moment the run that held it
    /// before (one that stopped, or died) is known to have been alive. `None` when there was no
    /// lock before, or the store does not keep it (the default). A resumed run does not count
    /// the time since then against the limits of the steps that run had begun.
    fn previous_lock_renewal(&self) -> Option<Time> {
        None
    }
}

/// A change to a Node that a record save can carry ([`StateStore::save_with`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeChange {
    /// Set `spec.unschedulable` (cordon `true`, uncordon `false`).
    Unschedulable(bool),
    /// Set (`Some`) or remove (`None`) a label.
    Label {
        /// The label's key.
        key: String,
        /// Its value, or `None` to remove it.
        value: Option<String>,
    },
}

/// Result of [`StateStore::acquire_lock`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockOutcome {
    /// We hold it now.
    Acquired,
    /// Someone else holds it.
    HeldBy {
        /// Holder identity.
        holder: String,
        /// When their hold expires.
        until: Time,
    },
}

/// The lock decision every [`StateStore`] makes the same way: `holder` asks at `now`, `current`
/// is the stored holder (if any) and when its hold expires. A different holder whose hold has
/// not expired keeps the lock ([`LockOutcome::HeldBy`]); otherwise (no holder, an expired one,
/// or `holder` itself renewing) `holder` gets it ([`LockOutcome::Acquired`]) and the store then
/// records it with its new expiry.
#[must_use]
pub fn lock_decision(current: Option<(&str, Time)>, holder: &str, now: Time) -> LockOutcome {
    match current {
        Some((h, until)) if h != holder && until > now => LockOutcome::HeldBy {
            holder: h.to_string(),
            until,
        },
        _ => LockOutcome::Acquired,
    }
}

/// Time, for the orchestrator. The pure core never reads the clock itself.
#[async_trait]
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Time;
    /// Returns at or after `t` (a simulation advances its virtual time to `t`).
    async fn sleep_until(&self, t: Time);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_decision_keeps_a_live_other_holder_only() {
        let now = Time(1_000);
        let held = |until| lock_decision(Some(("a", Time(until))), "b", now);
        assert_eq!(
            held(1_001),
            LockOutcome::HeldBy {
                holder: "a".into(),
                until: Time(1_001)
            }
        );
        // Expired (at or before now): taken over.
        assert_eq!(held(1_000), LockOutcome::Acquired);
        assert_eq!(held(10), LockOutcome::Acquired);
        // No holder, or the same holder renewing before expiry.
        assert_eq!(lock_decision(None, "b", now), LockOutcome::Acquired);
        assert_eq!(
            lock_decision(Some(("b", Time(5_000))), "b", now),
            LockOutcome::Acquired
        );
    }
}
