//! [`SimCluster`]: the handle tests and examples hold.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use cnimig_core::model::{Node, NodeName, Pdb, Pod, PodNetwork, Time};
use cnimig_core::ports::{AgentObservation, CniDirState, PortError};
use ipnet::Ipv4Net;

use crate::observe::{Op, PdbHealth, SimFaults, SimStats, Violation};
use crate::scenario::{Scenario, ScenarioError, SimParams};
use crate::state::State;

/// An in-memory Kubernetes cluster with Calico and Cilium, a virtual clock and a seed.
///
/// Cheap to clone: clones share one cluster. It implements every port of
/// [`cnimig_core::ports`] (`Cluster`, `NewCni`, `OldCni`, `Verifier`, `StateStore`, `Clock`);
/// the inherent methods here are for setting a run up and for looking at it afterwards, and
/// are not counted as API calls.
///
/// Deterministic: the only randomness is a ChaCha8 generator seeded from `seed`, and time is
/// virtual (it starts at zero and moves only in [`Clock::sleep_until`](cnimig_core::ports::Clock)
/// or [`SimCluster::advance_to`]).
#[derive(Clone)]
pub struct SimCluster {
    pub(crate) inner: Arc<Mutex<State>>,
}

impl std::fmt::Debug for SimCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("SimCluster")
            .field("now", &s.now)
            .field("nodes", &s.nodes.len())
            .field("pods", &s.pods.len())
            .finish_non_exhaustive()
    }
}

impl SimCluster {
    /// Builds the cluster at time zero: every node as the scenario says, every pod placed,
    /// Running and Ready on Calico (or the host network). Cilium is not installed yet.
    ///
    /// # Errors
    /// When the scenario is invalid (see [`Scenario::validate`]).
    pub fn new(
        scenario: Scenario,
        params: SimParams,
        seed: u64,
    ) -> Result<SimCluster, ScenarioError> {
        Ok(SimCluster {
            inner: Arc::new(Mutex::new(State::new(scenario, params, seed)?)),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Installs Cilium (standing in for `helm install` with the generated values): stores the
    /// live `cilium-config`, gives every node a podCIDR from `cluster-pool-ipv4-cidr` split by
    /// `cluster-pool-ipv4-mask-size` (in node order), and creates the `kube-system/cilium`
    /// DaemonSet's agent pods, Ready after the agent start time (never, on a node the pool has
    /// no podCIDR left for, as a real agent waits for its allocation). Agents resolve node configs
    /// when they start. Called again, it replaces the live config (a `helm upgrade`); running
    /// agents keep what they resolved until they restart.
    ///
    /// # Errors
    /// [`PortError::Invalid`] when the pool CIDR or mask size does not parse.
    pub fn install_cilium(&self, live_config: BTreeMap<String, String>) -> Result<(), PortError> {
        self.lock()
            .install_cilium(live_config)
            .map_err(|detail| PortError::Invalid {
                what: "helm install cilium".into(),
                detail,
            })
    }

    /// The scenario the cluster was built from.
    #[must_use]
    pub fn scenario(&self) -> Scenario {
        self.lock().scenario.clone()
    }

    /// Cilium's cluster pool and per-node mask size, once installed.
    #[must_use]
    pub fn cilium_pool(&self) -> Option<(Ipv4Net, u8)> {
        self.lock().cilium_pool()
    }

    /// Virtual time now.
    #[must_use]
    pub fn now(&self) -> Time {
        self.lock().now
    }

    /// Processes every event due at or before `t` (in time order), then sets the clock to `t`.
    /// The same as `Clock::sleep_until`, without the await and the API-call count.
    pub fn advance_to(&self, t: Time) {
        self.lock().advance_to(t);
    }

    /// Processes events until none is left or the clock reaches `limit`; returns the time.
    pub fn settle(&self, limit: Time) -> Time {
        let mut s = self.lock();
        while let Some(t) = s.next_event() {
            if t > limit {
                break;
            }
            s.advance_to(t);
        }
        s.now
    }

    /// When the next scheduled event is due.
    #[must_use]
    pub fn next_event(&self) -> Option<Time> {
        self.lock().next_event()
    }

    /// Every pod, in creation order.
    #[must_use]
    pub fn pods(&self) -> Vec<Pod> {
        let s = self.lock();
        s.pods.values().map(|p| s.model_pod(p)).collect()
    }

    /// Pods bound to `node` (terminating included). Empty for an unknown node.
    #[must_use]
    pub fn pods_on(&self, node: &NodeName) -> Vec<Pod> {
        let s = self.lock();
        s.node_idx(node).map(|n| s.pods_on(n)).unwrap_or_default()
    }

    /// The node named `name`.
    #[must_use]
    pub fn node(&self, name: &NodeName) -> Option<Node> {
        let s = self.lock();
        s.node_idx(name)
            .and_then(|n| s.nodes.get(n))
            .map(|n| n.node.clone())
    }

    /// Node names in scenario order.
    #[must_use]
    pub fn node_list(&self) -> Vec<NodeName> {
        self.lock()
            .nodes
            .iter()
            .map(|n| n.node.name.clone())
            .collect()
    }

    /// The node's CNI config directory (the `NewCni::cni_dir` port, uncounted).
    #[must_use]
    pub fn node_cni(&self, name: &NodeName) -> Option<CniDirState> {
        let s = self.lock();
        s.node_idx(name).and_then(|n| s.nodes.get(n)).map(|n| n.cni)
    }

    /// The chaining mode the node's Cilium CNI config was written with (`None` on Calico).
    #[must_use]
    pub fn chaining_mode(&self, name: &NodeName) -> Option<String> {
        let s = self.lock();
        s.node_idx(name)
            .and_then(|n| s.nodes.get(n))
            .and_then(|n| n.chaining.clone())
    }

    /// The node's Cilium podCIDR, once Cilium is installed.
    #[must_use]
    pub fn node_pod_cidr(&self, name: &NodeName) -> Option<Ipv4Net> {
        let s = self.lock();
        s.node_idx(name)
            .and_then(|n| s.nodes.get(n))
            .and_then(|n| n.pod_cidr())
    }

    /// Budgets as declared.
    #[must_use]
    pub fn pdbs(&self) -> Vec<Pdb> {
        self.lock().pdbs.iter().map(|p| p.pdb.clone()).collect()
    }

    /// Every budget's health now.
    #[must_use]
    pub fn pdb_health(&self) -> Vec<PdbHealth> {
        self.lock()
            .pdbs
            .iter()
            .map(|p| PdbHealth {
                pdb: p.pdb.key(),
                healthy: p.healthy,
                desired: p.pdb.desired_healthy(),
                expected: p.pdb.expected_pods,
                allowed: p.allowed(),
            })
            .collect()
    }

    /// True when every pod on the node that uses the pod network (mirror pods aside) is on
    /// Cilium. False for an unknown node.
    #[must_use]
    pub fn is_fully_migrated(&self, name: &NodeName) -> bool {
        let s = self.lock();
        let Some(n) = s.node_idx(name) else {
            return false;
        };
        let Some(node) = s.nodes.get(n) else {
            return false;
        };
        node.pods
            .iter()
            .filter_map(|id| s.pods.get(id))
            .filter(|p| p.uses_pod_network() && !p.mirror)
            .all(|p| p.network == PodNetwork::Cilium)
    }

    /// Invariant violations recorded so far, in order.
    #[must_use]
    pub fn violations(&self) -> Vec<Violation> {
        self.lock().violations.clone()
    }

    /// Migration operations so far, in order.
    #[must_use]
    pub fn op_log(&self) -> Vec<Op> {
        self.lock().op_log.clone()
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> SimStats {
        self.lock().stats.clone()
    }

    /// Every broken reachability rule now (empty = every pair of ready pods can reach each
    /// other). See [`crate::reach`].
    #[must_use]
    pub fn reachability_problems(&self) -> Vec<String> {
        self.lock().reachability_problems()
    }

    /// The nodes the run migrates (default: all). Used by the order checks: control-plane
    /// nodes in scope must start only after the workers in scope.
    ///
    /// # Errors
    /// [`PortError::NotFound`] naming a node that does not exist (the scope is then unchanged).
    pub fn set_scope(&self, nodes: Vec<NodeName>) -> Result<(), PortError> {
        let mut s = self.lock();
        let mut set = BTreeSet::new();
        for n in &nodes {
            let Some(i) = s.node_idx(n) else {
                return Err(PortError::NotFound {
                    what: format!("node {n}"),
                });
            };
            set.insert(i);
        }
        s.scope = Some(set);
        Ok(())
    }

    /// Whether the order checks expect control-plane nodes last (default true).
    pub fn set_control_plane_last(&self, on: bool) {
        self.lock().control_plane_last = on;
    }

    /// Injects faults (replacing earlier ones). Node NotReady / Ready and join times in the past
    /// take effect at the next clock step. Faults name nodes that exist, or that join.
    ///
    /// # Errors
    /// [`PortError::NotFound`] naming an unknown node, [`PortError::Invalid`] for a joining node
    /// whose name is taken (nothing is changed).
    pub fn set_faults(&self, faults: SimFaults) -> Result<(), PortError> {
        let mut s = self.lock();
        let mut joining = BTreeSet::new();
        for j in &faults.node_joins {
            if s.node_idx(&j.name).is_some() || !joining.insert(j.name.clone()) {
                return Err(PortError::Invalid {
                    what: format!("node join {}", j.name),
                    detail: "a node of that name exists or joins twice".into(),
                });
            }
        }
        for n in faults
            .agent_never_ready
            .iter()
            .chain(faults.verify_fails.iter())
            .chain(faults.node_not_ready_at.iter().map(|(n, _)| n))
            .chain(faults.node_ready_at.iter().map(|(n, _)| n))
        {
            if s.node_idx(n).is_none() && !joining.contains(n) {
                return Err(PortError::NotFound {
                    what: format!("node {n}"),
                });
            }
        }
        let not_ready: Vec<(NodeName, Time)> = faults.node_not_ready_at.clone();
        let ready: Vec<(NodeName, Time)> = faults.node_ready_at.clone();
        let joins: Vec<Time> = faults.node_joins.iter().map(|j| j.at).collect();
        s.faults = faults;
        for (i, t) in joins.into_iter().enumerate() {
            s.schedule_join(i, t);
        }
        // Node faults on joining nodes are scheduled once the node exists (see `join_node`).
        for (n, t) in not_ready {
            if let Some(i) = s.node_idx(&n) {
                s.schedule_not_ready(i, t);
            }
        }
        for (n, t) in ready {
            if let Some(i) = s.node_idx(&n) {
                s.schedule_ready(i, t);
            }
        }
        Ok(())
    }

    /// Checks every migration operation against the node's persisted record from now on: an
    /// operation the record does not lead to is a [`ViolationKind::WriteAhead`] violation (the
    /// orchestrator acted without persisting its intent first).
    ///
    /// [`ViolationKind::WriteAhead`]: crate::ViolationKind::WriteAhead
    pub fn check_write_ahead(&self, on: bool) {
        self.lock().write_ahead = on;
    }

    /// Cuts the caller off from the cluster after `calls` more port calls: every call after that
    /// fails with [`PortError::Unavailable`], as for a process that died (its writes stop
    /// landing). `None` reconnects.
    pub fn cut_off_after(&self, calls: Option<u64>) {
        let mut s = self.lock();
        let total = s.stats.total_api_calls();
        s.cut_off_after = calls.map(|c| total.saturating_add(c));
    }

    /// True once a [`SimCluster::cut_off_after`] limit was reached.
    #[must_use]
    pub fn is_cut_off(&self) -> bool {
        let s = self.lock();
        s.cut_off_after
            .is_some_and(|limit| s.stats.total_api_calls() > limit)
    }

    /// Who holds the run lock, and until when.
    #[must_use]
    pub fn lock_holder(&self) -> Option<(String, Time)> {
        self.lock().lock.clone()
    }

    /// Sets a node's Ready condition now (a kubelet stopping or coming back).
    ///
    /// # Errors
    /// [`PortError::NotFound`] for an unknown node.
    pub fn set_node_ready(&self, name: &NodeName, ready: bool) -> Result<(), PortError> {
        let mut s = self.lock();
        let n = s.node_idx(name).ok_or_else(|| PortError::NotFound {
            what: format!("node {name}"),
        })?;
        s.set_node_ready(n, ready);
        s.check_reach();
        Ok(())
    }

    /// Writes a node's raw state annotation (as a person editing it would), bypassing the
    /// compare-and-swap.
    ///
    /// # Errors
    /// [`PortError::NotFound`] for an unknown node.
    pub fn set_annotation(&self, name: &NodeName, value: Option<String>) -> Result<(), PortError> {
        let mut s = self.lock();
        let n = s.node_idx(name).ok_or_else(|| PortError::NotFound {
            what: format!("node {name}"),
        })?;
        if let Some(node) = s.nodes.get_mut(n) {
            node.annotation = value;
        }
        Ok(())
    }

    /// The Cilium agent on the node (the `NewCni::agent` port, uncounted and never failing).
    #[must_use]
    pub fn node_agent(&self, name: &NodeName) -> Option<AgentObservation> {
        let s = self.lock();
        s.node_idx(name).and_then(|n| s.agent_observation(n))
    }

    /// The node's persisted migration record, raw (the state annotation), if any.
    #[must_use]
    pub fn annotation(&self, name: &NodeName) -> Option<String> {
        let s = self.lock();
        s.node_idx(name)
            .and_then(|n| s.nodes.get(n))
            .and_then(|n| n.annotation.clone())
    }

    /// The nodes' CNI state and agent, one line per node, for debugging.
    #[must_use]
    pub fn describe_nodes(&self) -> Vec<String> {
        let s = self.lock();
        (0..s.nodes.len())
            .filter_map(|n| {
                let node = s.nodes.get(n)?;
                let agent = s.agent_observation(n);
                Some(format!(
                    "{} ready={} unschedulable={} cni={:?} chaining={:?} agent={:?} pods={}",
                    node.node.name,
                    node.node.ready,
                    node.node.unschedulable,
                    node.cni,
                    node.chaining,
                    agent,
                    node.pods.len()
                ))
            })
            .collect()
    }
}
