//! The orchestrator: runs a whole migration through the [`ports`](crate::ports).
//!
//! It is the only async part of the core and the only one that does IO, and it decides nothing
//! itself: [`plan`](crate::plan) computes the plan, [`schedule::pick`](crate::schedule::pick)
//! chooses nodes, [`machine::decide`](crate::machine::decide) chooses each node's next action.
//! Every node record is persisted through the [`StateStore`] before the action it leads to, so a
//! run killed at any point can be started again and resumes from what the cluster holds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::cilium::{CiliumPhase, ConfigMismatch, check_live_config};
use crate::config::{FailurePolicy, MigrationConfig, NodeScope};
use crate::events::{Event, EventSink};
use crate::machine::{
    Action, NodeRecord, Observation, Phase, StepConfig, decide, on_verification, start_rollback,
    with_problem,
};
use crate::model::{ClusterSnapshot, NodeName, Time};
use crate::plan::{Plan, PlannedNode, plan};
use crate::ports::{
    Clock, Cluster, EvictOutcome, LockOutcome, NewCni, OldCni, PortError, StateStore, Verifier,
};
use crate::schedule::{InFlightNode, Limits, PendingNode, pick, window};

/// The ports a run drives.
#[derive(Clone)]
pub struct Ports {
    /// Nodes, pods, eviction.
    pub cluster: Arc<dyn Cluster>,
    /// Cilium.
    pub cilium: Arc<dyn NewCni>,
    /// Calico.
    pub calico: Arc<dyn OldCni>,
    /// Node and cluster verification.
    pub verifier: Arc<dyn Verifier>,
    /// Records and the run lock.
    pub store: Arc<dyn StateStore>,
    /// Time.
    pub clock: Arc<dyn Clock>,
}

impl Ports {
    /// All six ports from one value that implements them all (the simulator, or a bundle).
    pub fn from_one<T>(t: T) -> Ports
    where
        T: Cluster + NewCni + OldCni + Verifier + StateStore + Clock + Clone + 'static,
    {
        Ports {
            cluster: Arc::new(t.clone()),
            cilium: Arc::new(t.clone()),
            calico: Arc::new(t.clone()),
            verifier: Arc::new(t.clone()),
            store: Arc::new(t.clone()),
            clock: Arc::new(t),
        }
    }
}

/// Why a run did not start or stopped early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// Another run holds the lock.
    #[error(
        "another cnimig run ({holder}) holds the migration lock until {until}; wait for it, or if it died, retry after that time"
    )]
    Locked {
        /// The holder.
        holder: String,
        /// Expiry.
        until: Time,
    },
    /// Preflight failed.
    #[error("preflight failed; fix these first:\n{}", .0.join("\n"))]
    Preflight(Vec<String>),
    /// The live Cilium config is not in migration mode.
    #[error("Cilium's live config is not in migration mode; no node was touched:\n{}", .0.iter().map(|m| format!("  - {m}")).collect::<Vec<_>>().join("\n"))]
    NotInMigrationMode(Vec<ConfigMismatch>),
    /// A node record could not be read.
    #[error("node {node}: {detail}")]
    BadRecord {
        /// The node.
        node: NodeName,
        /// What is wrong.
        detail: String,
    },
    /// A port failed in a way retrying will not fix.
    #[error("{0}")]
    Port(#[from] PortError),
    /// Another writer changed a node record we own: a second run is acting.
    #[error(
        "node {0}'s migration record was changed by someone else; another run may be acting on this cluster, so this one stops"
    )]
    Conflict(NodeName),
}

/// How a run identifies itself and paces itself.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Lock holder identity (host and process, or a Job name).
    pub holder: String,
    /// Lock time-to-live; renewed every third of it.
    pub lock_ttl: Duration,
    /// Look for nodes that joined the cluster every this often.
    pub join_check_interval: Duration,
    /// Stop (as if killed) after this many loop iterations; for crash tests.
    pub max_ticks: Option<u64>,
    /// The scheduling policy. [`schedule::pick`](crate::schedule::pick) unless a test or a
    /// benchmark swaps in another (e.g. a naive baseline, or a deliberately broken one).
    pub scheduler: PickFn,
}

/// A scheduling policy: the signature of [`schedule::pick`](crate::schedule::pick).
pub type PickFn = fn(
    &[PendingNode],
    &[InFlightNode],
    &crate::ports::BudgetView,
    Limits,
) -> crate::schedule::Picks;

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            holder: "cnimig".into(),
            lock_ttl: Duration::from_secs(60),
            join_check_interval: Duration::from_secs(60),
            max_ticks: None,
            scheduler: pick,
        }
    }
}

/// One node's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeOutcome {
    /// Node.
    pub node: NodeName,
    /// Terminal phase, or the phase it was in when the run stopped.
    pub phase: Phase,
    /// When it started.
    pub started: Option<Time>,
    /// When it finished.
    pub finished: Option<Time>,
    /// Rollback cause.
    pub cause: Option<String>,
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunReport {
    /// Per node, in plan order.
    pub nodes: Vec<NodeOutcome>,
    /// Nodes left out by the plan.
    pub skipped: Vec<crate::plan::Skipped>,
    /// When the run started acting.
    pub started: Time,
    /// When it ended.
    pub finished: Time,
    /// Why it stopped early, if it did.
    pub stopped: Option<String>,
    /// Whether it ended by `max_ticks` (a simulated kill) rather than by finishing.
    pub interrupted: bool,
}

impl RunReport {
    /// Nodes in `phase`.
    #[must_use]
    pub fn count(&self, phase: Phase) -> usize {
        self.nodes.iter().filter(|n| n.phase == phase).count()
    }
    /// Wall time from start to end.
    #[must_use]
    pub fn makespan(&self) -> Duration {
        self.finished.since(self.started)
    }
}

struct Flying {
    planned: PlannedNode,
    record: NodeRecord,
    waiting: Option<String>,
    blocked: Option<(String, String)>,
}

/// Drives a migration.
pub struct Orchestrator {
    ports: Ports,
    cfg: MigrationConfig,
    step: StepConfig,
    opts: RunOptions,
}

impl Orchestrator {
    /// A new orchestrator for a validated config.
    #[must_use]
    pub fn new(ports: Ports, cfg: MigrationConfig, opts: RunOptions) -> Self {
        let step = StepConfig::from(&cfg);
        Orchestrator {
            ports,
            cfg,
            step,
            opts,
        }
    }

    /// Reads the cluster and computes the plan. Changes nothing.
    ///
    /// # Errors
    /// Any read failure.
    pub async fn plan(&self) -> Result<(ClusterSnapshot, Plan), RunError> {
        let inv = self.ports.cluster.inventory().await?;
        let calico = self.ports.calico.facts().await?;
        let snapshot = ClusterSnapshot {
            nodes: inv.nodes,
            pods: inv.pods,
            pdbs: inv.pdbs,
            calico,
            service_cidr: inv.service_cidr,
            cluster_cidr: inv.cluster_cidr,
            other_routed: Vec::new(),
            connectivity_checker: inv.connectivity_checker,
            cilium_agent_requests: inv.cilium_agent_requests,
        };
        let p = plan(&snapshot, &self.cfg);
        Ok((snapshot, p))
    }

    /// Runs the migration of `plan` to the end (or to a stop), emitting progress to `sink`.
    ///
    /// Before touching any node it takes the run lock, refuses a failed preflight, checks that
    /// the live Cilium config is in migration mode, and applies the `CiliumNodeConfig`.
    ///
    /// # Errors
    /// [`RunError`] for a held lock, failed preflight, wrong Cilium config, a conflicting writer,
    /// or a port failure that retrying cannot fix. Transient failures are retried.
    pub async fn run(&self, plan: &Plan, sink: &dyn EventSink) -> Result<RunReport, RunError> {
        let clock = &self.ports.clock;
        let holder = self.opts.holder.as_str();
        match self
            .ports
            .store
            .acquire_lock(holder, clock.now(), self.opts.lock_ttl)
            .await?
        {
            LockOutcome::Acquired => {}
            LockOutcome::HeldBy { holder, until } => {
                return Err(RunError::Locked { holder, until });
            }
        }
        let result = self.run_locked(plan, sink).await;
        // A run that was "killed" keeps its lock, as a dead process would.
        if !matches!(&result, Ok(r) if r.interrupted) {
            let _ = self.ports.store.release_lock(holder).await;
        }
        result
    }

    async fn run_locked(&self, plan: &Plan, sink: &dyn EventSink) -> Result<RunReport, RunError> {
        let ports = &self.ports;
        if !plan.preflight.ok() {
            return Err(RunError::Preflight(
                plan.preflight
                    .failures()
                    .map(|c| format!("  - [{}] {}", c.id, c.message))
                    .collect(),
            ));
        }
        let live = ports.cilium.live_config().await?;
        let mismatches = check_live_config(&live, &self.cfg, plan.inputs, CiliumPhase::Migration);
        if !mismatches.is_empty() {
            return Err(RunError::NotInMigrationMode(mismatches));
        }
        ports.cilium.apply_node_config(&plan.node_config).await?;

        let started = ports.clock.now();
        let records = ports.store.load().await?;
        let mut pending: Vec<PlannedNode> = Vec::new();
        let mut flying: BTreeMap<NodeName, Flying> = BTreeMap::new();
        let mut finished: BTreeMap<NodeName, (PlannedNode, NodeRecord, Option<Time>)> =
            BTreeMap::new();
        let mut known: BTreeSet<NodeName> = BTreeSet::new();
        for p in &plan.order {
            known.insert(p.name.clone());
            match records.get(&p.name) {
                None => pending.push(p.clone()),
                Some(r) if r.phase.is_terminal() => {
                    finished.insert(p.name.clone(), (p.clone(), r.clone(), None));
                }
                Some(r) => {
                    flying.insert(
                        p.name.clone(),
                        Flying {
                            planned: p.clone(),
                            record: r.clone(),
                            waiting: None,
                            blocked: None,
                        },
                    );
                }
            }
        }
        for s in &plan.skipped {
            known.insert(s.node.clone());
        }
        sink.emit(&Event::RunStarted {
            nodes: plan.order.len(),
            resumed: flying.len(),
            at: started,
        });

        let limits = Limits {
            max_in_flight: self.cfg.max_in_flight,
            control_plane_last: self.cfg.control_plane_last,
        };
        let mut stopped: Option<String> = None;
        let mut last_lock = started;
        let mut last_join_check = started;
        let mut last_progress = (usize::MAX, 0, 0, 0);
        let mut ticks: u64 = 0;
        loop {
            let now = ports.clock.now();
            if now.since(last_lock) >= self.opts.lock_ttl / 3 {
                match ports
                    .store
                    .acquire_lock(&self.opts.holder, now, self.opts.lock_ttl)
                    .await
                {
                    Ok(LockOutcome::Acquired) => last_lock = now,
                    Ok(LockOutcome::HeldBy { holder, until }) => {
                        return Err(RunError::Locked { holder, until });
                    }
                    Err(e) if e.is_transient() => sink.emit(&Event::Retrying {
                        what: format!("renew lock: {e}"),
                        at: now,
                    }),
                    Err(e) => return Err(e.into()),
                }
            }
            if matches!(self.cfg.scope, NodeScope::All)
                && now.since(last_join_check) >= self.opts.join_check_interval
            {
                last_join_check = now;
                self.notice_joins(&mut known, &mut pending, stopped.is_some(), sink, now)
                    .await;
            }

            // Advance every node in flight.
            let names: Vec<NodeName> = flying.keys().cloned().collect();
            for name in names {
                if let Some(f) = flying.get_mut(&name) {
                    self.advance(f, sink, now).await?;
                    if f.record.phase.is_terminal()
                        && let Some(f) = flying.remove(&name)
                    {
                        let cause = f.record.rollback.as_ref().map(|r| r.cause.clone());
                        sink.emit(&Event::NodeFinished {
                            node: name.clone(),
                            outcome: f.record.phase,
                            cause: cause.clone(),
                            at: now,
                        });
                        if f.record.phase != Phase::Done
                            && self.cfg.on_node_failure == FailurePolicy::RollbackAndStop
                            && stopped.is_none()
                        {
                            let reason = format!(
                                "node {name} ended {:?}: {}",
                                f.record.phase,
                                cause.unwrap_or_default()
                            );
                            sink.emit(&Event::Stopping {
                                reason: reason.clone(),
                                at: now,
                            });
                            stopped = Some(reason);
                        }
                        finished.insert(name.clone(), (f.planned, f.record, Some(now)));
                    }
                }
            }

            // Start new nodes.
            if stopped.is_none()
                && !pending.is_empty()
                && flying.len() < self.cfg.max_in_flight as usize
            {
                let started_now = self
                    .start_nodes(&mut pending, &mut flying, limits, sink, now)
                    .await?;
                for name in started_now {
                    if let Some(f) = flying.get_mut(&name) {
                        self.advance(f, sink, now).await?;
                    }
                }
            }

            let done = finished
                .values()
                .filter(|(_, r, _)| r.phase == Phase::Done)
                .count();
            let progress = (done, finished.len() - done, flying.len(), pending.len());
            if progress != last_progress {
                last_progress = progress;
                sink.emit(&Event::Progress {
                    done: progress.0,
                    rolled_back: progress.1,
                    in_flight: progress.2,
                    pending: progress.3,
                    at: now,
                });
            }
            if flying.is_empty() && (pending.is_empty() || stopped.is_some()) {
                break;
            }
            ticks += 1;
            if self.opts.max_ticks.is_some_and(|m| ticks >= m) {
                return Ok(self.report(plan, &finished, &flying, &pending, started, stopped, true));
            }
            ports
                .clock
                .sleep_until(now.after(self.cfg.poll_interval))
                .await;
        }
        Ok(self.report(plan, &finished, &flying, &pending, started, stopped, false))
    }

    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        plan: &Plan,
        finished: &BTreeMap<NodeName, (PlannedNode, NodeRecord, Option<Time>)>,
        flying: &BTreeMap<NodeName, Flying>,
        pending: &[PlannedNode],
        started: Time,
        stopped: Option<String>,
        interrupted: bool,
    ) -> RunReport {
        let mut nodes = Vec::new();
        let mut push = |p: &PlannedNode| {
            let outcome = if let Some((_, r, at)) = finished.get(&p.name) {
                NodeOutcome {
                    node: p.name.clone(),
                    phase: r.phase,
                    started: Some(r.started),
                    finished: *at,
                    cause: r.rollback.as_ref().map(|x| x.cause.clone()),
                }
            } else if let Some(f) = flying.get(&p.name) {
                NodeOutcome {
                    node: p.name.clone(),
                    phase: f.record.phase,
                    started: Some(f.record.started),
                    finished: None,
                    cause: None,
                }
            } else {
                NodeOutcome {
                    node: p.name.clone(),
                    phase: Phase::Pending,
                    started: None,
                    finished: None,
                    cause: None,
                }
            };
            nodes.push(outcome);
        };
        for p in &plan.order {
            push(p);
        }
        // Nodes that joined during the run.
        for p in pending
            .iter()
            .chain(flying.values().map(|f| &f.planned))
            .chain(finished.values().map(|(p, _, _)| p))
        {
            if !plan.order.iter().any(|o| o.name == p.name) {
                push(p);
            }
        }
        RunReport {
            nodes,
            skipped: plan.skipped.clone(),
            started,
            finished: self.ports.clock.now(),
            stopped,
            interrupted,
        }
    }

    async fn notice_joins(
        &self,
        known: &mut BTreeSet<NodeName>,
        pending: &mut Vec<PlannedNode>,
        stopping: bool,
        sink: &dyn EventSink,
        now: Time,
    ) {
        let names = match self.ports.cluster.node_names().await {
            Ok(n) => n,
            Err(e) => {
                sink.emit(&Event::Retrying {
                    what: format!("list nodes: {e}"),
                    at: now,
                });
                return;
            }
        };
        for name in names {
            if known.insert(name.clone()) {
                let view = self.ports.cluster.node_view(&name).await;
                let migrating = !stopping && view.is_ok();
                if let Ok(v) = view
                    && !stopping
                {
                    let planned = PlannedNode {
                        name: name.clone(),
                        zone: v.node.zone.clone(),
                        control_plane: v.node.is_control_plane(),
                    };
                    // Joined workers go before the control-plane nodes still pending.
                    let at = if planned.control_plane {
                        pending.len()
                    } else {
                        pending
                            .iter()
                            .position(|p| p.control_plane)
                            .unwrap_or(pending.len())
                    };
                    pending.insert(at, planned);
                }
                sink.emit(&Event::NodeJoined {
                    node: name,
                    migrating,
                    at: now,
                });
            }
        }
    }

    async fn start_nodes(
        &self,
        pending: &mut Vec<PlannedNode>,
        flying: &mut BTreeMap<NodeName, Flying>,
        limits: Limits,
        sink: &dyn EventSink,
        now: Time,
    ) -> Result<Vec<NodeName>, RunError> {
        let in_flight: Vec<InFlightNode> = flying
            .values()
            .map(|f| InFlightNode {
                name: f.planned.name.clone(),
                zone: f.planned.zone.clone(),
                control_plane: f.planned.control_plane,
                draining: f.record.phase.is_draining(),
            })
            .collect();
        let cands: Vec<PendingNode> = pending
            .iter()
            .take(window(limits, in_flight.len()))
            .map(PendingNode::from)
            .collect();
        let mut ask: Vec<NodeName> = cands.iter().map(|c| c.name.clone()).collect();
        ask.extend(
            in_flight
                .iter()
                .filter(|n| n.draining)
                .map(|n| n.name.clone()),
        );
        let budgets = match self.ports.cluster.budget_view(&ask).await {
            Ok(b) => b,
            Err(e) if e.is_transient() => {
                sink.emit(&Event::Retrying {
                    what: format!("read disruption budgets: {e}"),
                    at: now,
                });
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.into()),
        };
        let picks = (self.opts.scheduler)(&cands, &in_flight, &budgets, limits);
        let mut started = Vec::new();
        for name in picks.start {
            let Some(pos) = pending.iter().position(|p| p.name == name) else {
                continue;
            };
            let planned = pending.remove(pos);
            let record = NodeRecord::new(now);
            match self.ports.store.save(&name, None, &record).await {
                Ok(()) => {}
                Err(PortError::Conflict { .. }) => return Err(RunError::Conflict(name)),
                Err(e) if e.is_transient() => {
                    sink.emit(&Event::Retrying {
                        what: format!("start {name}: {e}"),
                        at: now,
                    });
                    pending.insert(pos, planned);
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            sink.emit(&Event::NodeStarted {
                node: name.clone(),
                at: now,
            });
            flying.insert(
                name.clone(),
                Flying {
                    planned,
                    record,
                    waiting: None,
                    blocked: None,
                },
            );
            started.push(name);
        }
        Ok(started)
    }

    async fn save(
        &self,
        f: &mut Flying,
        next: NodeRecord,
        sink: &dyn EventSink,
        now: Time,
    ) -> Result<bool, RunError> {
        if next == f.record {
            return Ok(true);
        }
        match self
            .ports
            .store
            .save(&f.planned.name, Some(&f.record), &next)
            .await
        {
            Ok(()) => {
                if next.phase != f.record.phase {
                    sink.emit(&Event::Phase {
                        node: f.planned.name.clone(),
                        from: f.record.phase,
                        to: next.phase,
                        at: now,
                    });
                }
                f.record = next;
                Ok(true)
            }
            Err(PortError::Conflict { .. }) => Err(RunError::Conflict(f.planned.name.clone())),
            Err(e) if e.is_transient() => {
                sink.emit(&Event::Retrying {
                    what: format!("save {}: {e}", f.planned.name),
                    at: now,
                });
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// One look at one node: observe, decide, persist, act.
    async fn advance(
        &self,
        f: &mut Flying,
        sink: &dyn EventSink,
        now: Time,
    ) -> Result<(), RunError> {
        let name = f.planned.name.clone();
        let ports = &self.ports;
        let observed = async {
            let view = ports.cluster.node_view(&name).await?;
            let agent = ports.cilium.agent(&name).await?;
            let cni = ports.cilium.cni_dir(&name).await?;
            Ok::<_, PortError>((view, agent, cni))
        }
        .await;
        let (view, agent, cni) = match observed {
            Ok(o) => o,
            Err(PortError::NotFound { what }) if what.contains(name.as_str()) => {
                let next = start_rollback(&f.record, format!("node {name} left the cluster"), now);
                let mut gone = next;
                gone.phase = Phase::Failed;
                self.save(f, gone, sink, now).await?;
                return Ok(());
            }
            Err(e) if e.is_transient() => {
                sink.emit(&Event::Retrying {
                    what: format!("observe {name}: {e}"),
                    at: now,
                });
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let obs = Observation {
            view: &view,
            agent: agent.as_ref(),
            cni,
        };
        let d = decide(&f.record, &obs, &self.step, now);
        if !self.save(f, d.record, sink, now).await? {
            return Ok(());
        }
        let result = self.act(f, d.action, sink, now).await;
        match result {
            Ok(()) => Ok(()),
            Err(RunError::Port(e)) if e.is_transient() => {
                sink.emit(&Event::Retrying {
                    what: format!("{name}: {e}"),
                    at: now,
                });
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn act(
        &self,
        f: &mut Flying,
        action: Action,
        sink: &dyn EventSink,
        now: Time,
    ) -> Result<(), RunError> {
        let name = f.planned.name.clone();
        let ports = &self.ports;
        let waiting = |f: &mut Flying, reason: String| {
            if f.waiting.as_ref() != Some(&reason) {
                sink.emit(&Event::Waiting {
                    node: f.planned.name.clone(),
                    reason: reason.clone(),
                    at: now,
                });
                f.waiting = Some(reason);
            }
        };
        match action {
            Action::Cordon => ports.cluster.set_unschedulable(&name, true).await?,
            Action::Uncordon => ports.cluster.set_unschedulable(&name, false).await?,
            Action::Label => {
                ports
                    .cluster
                    .set_node_label(&name, &self.cfg.migration_label, Some("true"))
                    .await?
            }
            Action::Unlabel => {
                ports
                    .cluster
                    .set_node_label(&name, &self.cfg.migration_label, None)
                    .await?
            }
            Action::RestartAgent(uid) => ports.cilium.restart_agent(&name, &uid).await?,
            Action::RestoreCni => ports.cilium.restore_calico_cni(&name).await?,
            Action::Evict(pods) => self.evict_all(f, &pods, &[], sink, now).await?,
            Action::Recycle { evict, delete } => {
                self.evict_all(f, &evict, &delete, sink, now).await?
            }
            Action::Verify => {
                let v = ports.verifier.verify_node(&name).await?;
                let next = on_verification(&f.record, &v, &self.step, now);
                self.save(f, next, sink, now).await?;
            }
            Action::Wait(reason) => waiting(f, reason),
            Action::Finished => {}
        }
        Ok(())
    }

    async fn evict_all(
        &self,
        f: &mut Flying,
        evict: &[crate::model::PodRef],
        delete: &[crate::model::PodRef],
        sink: &dyn EventSink,
        now: Time,
    ) -> Result<(), RunError> {
        let name = f.planned.name.clone();
        for pod in delete {
            self.ports.cluster.delete_pod(pod).await?;
        }
        let mut blocked: Option<(String, String)> = None;
        for pod in evict {
            match self.ports.cluster.evict(pod).await? {
                EvictOutcome::Evicted | EvictOutcome::Gone => {}
                EvictOutcome::BlockedByBudget { pdb } => {
                    blocked.get_or_insert((pod.to_string(), pdb));
                }
                EvictOutcome::MultipleBudgets { pdbs } => {
                    let cause = format!(
                        "step Drain: pod {pod} is covered by more than one PodDisruptionBudget ({}), so eviction can never succeed; make the budgets' selectors disjoint",
                        pdbs.join(", ")
                    );
                    let next = start_rollback(&f.record, cause, now);
                    self.save(f, next, sink, now).await?;
                    return Ok(());
                }
            }
        }
        if let Some((pod, pdb)) = blocked {
            if f.blocked.as_ref() != Some(&(pod.clone(), pdb.clone())) {
                sink.emit(&Event::EvictionBlocked {
                    node: name,
                    pod: pod.clone(),
                    pdb: pdb.clone(),
                    at: now,
                });
                let next = with_problem(
                    &f.record,
                    format!("eviction of {pod} blocked by PodDisruptionBudget {pdb}"),
                );
                self.save(f, next, sink, now).await?;
                f.blocked = Some((pod, pdb));
            }
        } else {
            f.blocked = None;
        }
        Ok(())
    }
}
