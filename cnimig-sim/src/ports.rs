//! The six ports of `cnimig_core::ports`, implemented on [`SimCluster`]. Every call takes effect
//! at the current virtual time, is counted in [`SimStats::api_calls`](crate::SimStats), and is
//! followed by the invariant checks.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use cnimig_core::cilium::CiliumNodeConfig;
use cnimig_core::machine::NodeRecord;
use cnimig_core::model::{CalicoFacts, NodeName, PodRef, Time};
use cnimig_core::ports::{
    AgentObservation, BudgetView, Clock, Cluster, CniDirState, EvictOutcome, Inventory,
    LockOutcome, NewCni, NodeChange, NodeView, OldCni, PodBudgets, PortError, StateStore,
    Verification, Verifier,
};

use crate::faults::Call;
use crate::observe::{FaultKind, OpKind, ViolationKind};
use crate::sim::SimCluster;
use crate::state::State;

fn not_found(node: &NodeName) -> PortError {
    PortError::NotFound {
        what: format!("node {node}"),
    }
}

impl State {
    fn count(&mut self, method: &'static str) {
        match self.stats.api_calls.get_mut(method) {
            Some(c) => *c += 1,
            None => {
                self.stats.api_calls.insert(method.to_string(), 1);
            }
        }
    }

    fn idx(&self, node: &NodeName) -> Result<usize, PortError> {
        self.node_idx(node).ok_or_else(|| not_found(node))
    }
}

/// Returns `Pending` once, so other tasks run before virtual time moves.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

#[async_trait]
impl Cluster for SimCluster {
    async fn inventory(&self) -> Result<Inventory, PortError> {
        let mut s = self.lock();
        s.count("Cluster::inventory");
        if let Some(e) = s.api_fault("Cluster::inventory", Call::Read).before() {
            return Err(e);
        }
        Ok(Inventory {
            nodes: s.nodes.iter().map(|n| n.node.clone()).collect(),
            pods: s.pods.values().map(|p| s.model_pod(p)).collect(),
            pdbs: s.pdbs.iter().map(crate::state::SimPdb::observed).collect(),
            service_cidr: s.scenario.service_cidr,
            cluster_cidr: s.scenario.cluster_cidr,
            connectivity_checker: s.scenario.connectivity_checker,
            cilium_agent_requests: s.scenario.cilium_agent.resources(),
            // The simulator's nodes expose their agent and CNI directory to the model.
            unobservable: BTreeMap::new(),
        })
    }

    async fn node_names(&self) -> Result<Vec<NodeName>, PortError> {
        let mut s = self.lock();
        s.count("Cluster::node_names");
        if let Some(e) = s.api_fault("Cluster::node_names", Call::Read).before() {
            return Err(e);
        }
        Ok(s.nodes.iter().map(|n| n.node.name.clone()).collect())
    }

    async fn node_view(&self, node: &NodeName) -> Result<NodeView, PortError> {
        let mut s = self.lock();
        s.count("Cluster::node_view");
        if let Some(e) = s.api_fault("Cluster::node_view", Call::Read).before() {
            return Err(e);
        }
        let n = s.idx(node)?;
        let Some(sn) = s.nodes.get(n) else {
            return Err(not_found(node));
        };
        Ok(NodeView {
            node: sn.node.clone(),
            pods: s.pods_on(n),
        })
    }

    async fn pod_budgets(&self, node: &NodeName) -> Result<PodBudgets, PortError> {
        let mut s = self.lock();
        s.count("Cluster::pod_budgets");
        if let Some(e) = s.api_fault("Cluster::pod_budgets", Call::Read).before() {
            return Err(e);
        }
        let n = s.idx(node)?;
        Ok(s.pod_budgets(n))
    }

    async fn budget_view(&self, nodes: &[NodeName]) -> Result<BudgetView, PortError> {
        let mut s = self.lock();
        s.count("Cluster::budget_view");
        if let Some(e) = s.api_fault("Cluster::budget_view", Call::Read).before() {
            return Err(e);
        }
        let mut view = BudgetView::default();
        // Budgets already in `view.allowed`, by index (cheaper to look up than their names).
        let mut named: BTreeSet<usize> = BTreeSet::new();
        for name in nodes {
            let Some(n) = s.node_idx(name) else { continue };
            // Kept up to date as pods come and go (walking every candidate's pods on every look
            // was the largest cost of a large simulation).
            let Some(counts) = s.nodes.get(n).map(|x| x.demand.as_slice()) else {
                continue;
            };
            debug_assert_eq!(
                counts,
                s.demand_by_walk(n).as_slice(),
                "node {name}: budget demand cache"
            );
            let mut list = Vec::with_capacity(counts.len());
            for &(i, c) in counts {
                let Some(b) = s.pdbs.get(i) else { continue };
                // One budget's allowance is the same for every node of this view (the state is
                // locked): insert its name once.
                if named.insert(i) {
                    view.allowed.insert(b.key.clone(), b.allowed());
                }
                list.push((b.key.clone(), c));
            }
            view.per_node.insert(name.clone(), list);
        }
        Ok(view)
    }

    async fn set_unschedulable(
        &self,
        node: &NodeName,
        unschedulable: bool,
    ) -> Result<(), PortError> {
        let mut s = self.lock();
        s.count("Cluster::set_unschedulable");
        let inj = s.api_fault("Cluster::set_unschedulable", Call::Write);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        let n = s.idx(node)?;
        s.apply_unschedulable(n, unschedulable);
        inj.after(Ok(()))
    }

    async fn set_node_label(
        &self,
        node: &NodeName,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), PortError> {
        let mut s = self.lock();
        s.count("Cluster::set_node_label");
        let inj = s.api_fault("Cluster::set_node_label", Call::Write);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        let n = s.idx(node)?;
        label_key_ok(node, key)?;
        s.apply_label(n, key, value);
        inj.after(Ok(()))
    }

    async fn evict(&self, pod: &PodRef) -> Result<EvictOutcome, PortError> {
        let mut s = self.lock();
        s.count("Cluster::evict");
        let inj = s.api_fault("Cluster::evict", Call::Write);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        let out = s.evict(pod);
        s.check_reach();
        inj.after(Ok(out))
    }

    async fn delete_pod(&self, pod: &PodRef) -> Result<(), PortError> {
        let mut s = self.lock();
        s.count("Cluster::delete_pod");
        let inj = s.api_fault("Cluster::delete_pod", Call::Write);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        let Some(id) = s.lookup(pod) else {
            return inj.after(Ok(()));
        };
        s.stats.deletions += 1;
        if let Some((n, network)) = s.pods.get(&id).and_then(|p| p.node.map(|n| (n, p.network))) {
            s.log(
                n,
                OpKind::Delete {
                    pod: pod.to_string(),
                    network,
                },
            );
        }
        s.disrupt(id, "deletion");
        s.check_reach();
        inj.after(Ok(()))
    }
}

#[async_trait]
impl NewCni for SimCluster {
    async fn live_config(&self) -> Result<BTreeMap<String, String>, PortError> {
        let mut s = self.lock();
        s.count("NewCni::live_config");
        if let Some(e) = s.api_fault("NewCni::live_config", Call::Read).before() {
            return Err(e);
        }
        s.cilium
            .as_ref()
            .map(|c| c.live.clone())
            .ok_or_else(|| PortError::NotFound {
                what: "ConfigMap kube-system/cilium-config (Cilium is not installed)".into(),
            })
    }

    async fn apply_node_config(&self, config: &CiliumNodeConfig) -> Result<(), PortError> {
        let mut s = self.lock();
        s.count("NewCni::apply_node_config");
        let inj = s.api_fault("NewCni::apply_node_config", Call::Write);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        if config.name.is_empty() || NodeName::new(config.name.clone()).is_err() {
            return Err(PortError::Invalid {
                what: format!("CiliumNodeConfig {:?}", config.name),
                detail: "not a valid object name".into(),
            });
        }
        s.node_configs.insert(config.name.clone(), config.clone());
        inj.after(Ok(()))
    }

    async fn agent(&self, node: &NodeName) -> Result<Option<AgentObservation>, PortError> {
        let mut s = self.lock();
        s.count("NewCni::agent");
        if let Some(e) = s.api_fault("NewCni::agent", Call::Read).before() {
            return Err(e);
        }
        let n = s.idx(node)?;
        Ok(s.agent_observation(n))
    }

    async fn restart_agent(&self, node: &NodeName, pod_uid: &str) -> Result<(), PortError> {
        let mut s = self.lock();
        s.count("NewCni::restart_agent");
        let inj = s.api_fault("NewCni::restart_agent", Call::Write);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        let n = s.idx(node)?;
        let Some(id) = crate::state::parse_uid(pod_uid) else {
            return Ok(());
        };
        let ok = s
            .pods
            .get(&id)
            .is_some_and(|p| p.agent && p.node == Some(n) && !p.terminating);
        if ok {
            s.stats.deletions += 1;
            s.log(
                n,
                OpKind::RestartAgent {
                    uid: pod_uid.to_string(),
                },
            );
            s.disrupt(id, "agent restart");
            s.check_reach();
        }
        inj.after(Ok(()))
    }

    async fn cni_dir(&self, node: &NodeName) -> Result<CniDirState, PortError> {
        let mut s = self.lock();
        s.count("NewCni::cni_dir");
        if let Some(e) = s.api_fault("NewCni::cni_dir", Call::Read).before() {
            return Err(e);
        }
        let n = s.idx(node)?;
        s.nodes.get(n).map(|x| x.cni).ok_or_else(|| not_found(node))
    }

    async fn restore_calico_cni(&self, node: &NodeName) -> Result<(), PortError> {
        let mut s = self.lock();
        s.count("NewCni::restore_calico_cni");
        let inj = s.api_fault("NewCni::restore_calico_cni", Call::Write);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        let n = s.idx(node)?;
        s.log(n, OpKind::RestoreCni);
        let r = s
            .request_restore(n)
            .map_err(|detail| PortError::Unavailable {
                what: format!("restore Calico's CNI config on node {node}"),
                detail,
            });
        inj.after(r)
    }
}

#[async_trait]
impl OldCni for SimCluster {
    async fn facts(&self) -> Result<CalicoFacts, PortError> {
        let mut s = self.lock();
        s.count("OldCni::facts");
        if let Some(e) = s.api_fault("OldCni::facts", Call::Read).before() {
            return Err(e);
        }
        Ok(s.calico.clone())
    }
}

#[async_trait]
impl Verifier for SimCluster {
    async fn verify_node(&self, node: &NodeName) -> Result<Verification, PortError> {
        let mut s = self.lock();
        s.count("Verifier::verify_node");
        if let Some(e) = s.api_fault("Verifier::verify_node", Call::Read).before() {
            return Err(e);
        }
        let n = s.idx(node)?;
        let mut problems = s.node_problems(n);
        if s.labelled(n) && s.faults.verify_fails.contains(node) {
            s.count_fault(FaultKind::VerifyFailed, node.to_string());
            problems.push(format!(
                "connectivity check from node {node} failed: goldpinger there cannot reach the other nodes (injected)"
            ));
        }
        Ok(if problems.is_empty() {
            Verification::Healthy
        } else {
            Verification::Unhealthy(problems)
        })
    }

    async fn verify_cluster(&self) -> Result<Verification, PortError> {
        let mut s = self.lock();
        s.count("Verifier::verify_cluster");
        if let Some(e) = s.api_fault("Verifier::verify_cluster", Call::Read).before() {
            return Err(e);
        }
        let problems = s.reachability_problems();
        Ok(if problems.is_empty() {
            Verification::Healthy
        } else {
            Verification::Unhealthy(problems)
        })
    }
}

#[async_trait]
impl StateStore for SimCluster {
    async fn load(&self) -> Result<BTreeMap<NodeName, NodeRecord>, PortError> {
        let mut s = self.lock();
        s.count("StateStore::load");
        if let Some(e) = s.api_fault("StateStore::load", Call::Read).before() {
            return Err(e);
        }
        let mut out = BTreeMap::new();
        for node in &s.nodes {
            let Some(a) = &node.annotation else { continue };
            let rec = NodeRecord::from_annotation(a).map_err(|e| PortError::Invalid {
                what: format!(
                    "node {} annotation {}",
                    node.node.name,
                    cnimig_core::machine::STATE_ANNOTATION
                ),
                detail: e.to_string(),
            })?;
            out.insert(node.node.name.clone(), rec);
        }
        Ok(out)
    }

    async fn save(
        &self,
        node: &NodeName,
        prev: Option<&NodeRecord>,
        next: &NodeRecord,
    ) -> Result<(), PortError> {
        let mut s = self.lock();
        s.count("StateStore::save");
        let inj = s.api_fault("StateStore::save", Call::Exclusive);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        let n = s.idx(node)?;
        s.swap_record(node, n, prev, next)?;
        inj.after(Ok(()))
    }

    /// One write, as on the Kubernetes API (a JSON Patch that tests the record, replaces it and
    /// sets the field): both land or neither.
    async fn save_with(
        &self,
        node: &NodeName,
        prev: Option<&NodeRecord>,
        next: &NodeRecord,
        change: &NodeChange,
    ) -> Result<bool, PortError> {
        let mut s = self.lock();
        s.count("StateStore::save_with");
        let inj = s.api_fault("StateStore::save_with", Call::Exclusive);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        let n = s.idx(node)?;
        if let NodeChange::Label { key, .. } = change {
            label_key_ok(node, key)?;
        }
        s.swap_record(node, n, prev, next)?;
        s.carried = true;
        match change {
            NodeChange::Unschedulable(on) => s.apply_unschedulable(n, *on),
            NodeChange::Label { key, value } => s.apply_label(n, key, value.as_deref()),
        }
        s.carried = false;
        inj.after(Ok(true))
    }

    async fn acquire_lock(
        &self,
        holder: &str,
        now: Time,
        ttl: Duration,
    ) -> Result<LockOutcome, PortError> {
        let mut s = self.lock();
        s.count("StateStore::acquire_lock");
        let inj = s.api_fault("StateStore::acquire_lock", Call::Exclusive);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        let current = s.lock.as_ref().map(|(h, until)| (h.as_str(), *until));
        let out = cnimig_core::ports::lock_decision(current, holder, now);
        if out == LockOutcome::Acquired {
            s.lock = Some((holder.to_string(), now.after(ttl)));
            s.lock_renewed_before = s.lock_renewed.replace(now);
        }
        inj.after(Ok(out))
    }

    fn previous_lock_renewal(&self) -> Option<Time> {
        self.lock().lock_renewed_before
    }

    async fn release_lock(&self, holder: &str) -> Result<(), PortError> {
        let mut s = self.lock();
        s.count("StateStore::release_lock");
        let inj = s.api_fault("StateStore::release_lock", Call::Exclusive);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        if s.lock.as_ref().is_some_and(|(h, _)| h == holder) {
            s.lock = None;
        }
        inj.after(Ok(()))
    }
}

#[async_trait]
impl Clock for SimCluster {
    fn now(&self) -> Time {
        let mut s = self.lock();
        s.count("Clock::now");
        s.now
    }

    /// Lets other tasks run once, then processes every event due at or before `t` in time
    /// order (ties in the order they were scheduled) and sets the clock to `t` (never back).
    async fn sleep_until(&self, t: Time) {
        self.lock().count("Clock::sleep_until");
        YieldOnce(false).await;
        self.lock().advance_to(t);
    }
}

impl State {
    /// Cordons or uncordons node `n`, checking the order invariant.
    fn apply_unschedulable(&mut self, n: usize, unschedulable: bool) {
        let was = self.nodes.get(n).is_some_and(|x| x.node.unschedulable);
        if unschedulable {
            if !was {
                self.on_migration_cordon(n);
                self.cordoned_by_us.insert(n);
            }
            self.log(n, OpKind::Cordon);
        } else {
            if self.labelled(n) && !self.agent_ready_with_config(n) {
                let node = self
                    .nodes
                    .get(n)
                    .map(|x| x.node.name.to_string())
                    .unwrap_or_default();
                self.violate(
                    ViolationKind::Order,
                    format!("node {node} uncordoned while labelled for Cilium but its agent is not Ready with the node config"),
                );
            }
            self.cordoned_by_us.remove(&n);
            self.log(n, OpKind::Uncordon);
        }
        self.set_unschedulable(n, unschedulable);
        self.check_reach();
    }

    /// Sets (`Some`) or removes (`None`) label `key` (checked by [`label_key_ok`]) on node `n`,
    /// checking the order invariant.
    fn apply_label(&mut self, n: usize, key: &str, value: Option<&str>) {
        match value {
            Some(v) => {
                if v == "true" && self.is_migration_label(key) {
                    let node = self
                        .nodes
                        .get(n)
                        .map(|x| x.node.name.to_string())
                        .unwrap_or_default();
                    let schedulable = self.nodes.get(n).is_some_and(|x| !x.node.unschedulable);
                    let left: Vec<String> = self
                        .drainable_since_cordon(n)
                        .map(|(_, p)| p.key())
                        .collect();
                    if schedulable || !left.is_empty() {
                        let why = if schedulable {
                            "it is schedulable".to_string()
                        } else {
                            format!(
                                "{} drainable pod(s) are still on it ({})",
                                left.len(),
                                left.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                            )
                        };
                        self.violate(
                            ViolationKind::Order,
                            format!("node {node} labelled {key}=true while {why}"),
                        );
                    }
                }
                if let Some(x) = self.nodes.get_mut(n) {
                    x.node.labels.insert(key.to_string(), v.to_string());
                }
                self.log(
                    n,
                    OpKind::Label {
                        key: key.to_string(),
                        value: v.to_string(),
                    },
                );
            }
            None => {
                if let Some(x) = self.nodes.get_mut(n) {
                    x.node.labels.remove(key);
                }
                self.log(
                    n,
                    OpKind::Unlabel {
                        key: key.to_string(),
                    },
                );
            }
        }
        self.check_reach();
    }

    /// Compare-and-swap of node `n`'s record: `prev` must be what it holds.
    fn swap_record(
        &mut self,
        node: &NodeName,
        n: usize,
        prev: Option<&NodeRecord>,
        next: &NodeRecord,
    ) -> Result<(), PortError> {
        let Some(x) = self.nodes.get_mut(n) else {
            return Err(not_found(node));
        };
        let same = match (&x.annotation, prev) {
            (None, None) => true,
            (Some(a), Some(p)) => NodeRecord::from_annotation(a).is_ok_and(|r| &r == p),
            _ => false,
        };
        if !same {
            return Err(PortError::Conflict {
                what: format!(
                    "node {node} annotation {}",
                    cnimig_core::machine::STATE_ANNOTATION
                ),
            });
        }
        x.annotation = Some(next.to_annotation());
        Ok(())
    }
}

/// A label key the API server would accept, or the error it would give (nothing is changed then).
fn label_key_ok(node: &NodeName, key: &str) -> Result<(), PortError> {
    cnimig_core::config::validate_label_key(key).map_err(|why| PortError::Invalid {
        what: format!("label {key:?} on node {node}"),
        detail: why.into(),
    })
}
