//! The orchestrator: runs a whole migration through the [`ports`](crate::ports).
//!
//! It is the only async part of the core and the only one that does IO, and it decides nothing
//! itself: [`plan`](crate::plan) computes the plan, [`schedule::pick`](crate::schedule::pick)
//! chooses nodes, [`machine::decide`](crate::machine::decide) chooses each node's next action.
//! A node's record is persisted through the [`StateStore`] before every action a resumed run could
//! not work out from the cluster or must time exactly (see `needs_store`), so a run killed at any
//! point can be started again and resumes from what the cluster holds. The steps a look finds
//! complete by itself are kept in memory until the next such write carries them; a resumed run
//! finds them again and times the step one past the stored record from it.
//!
//! What it does about faults (each one exercised by the fault campaign in `tests/faults.rs`):
//! - Transient port errors (5xx, 429, timeouts) and 409s on anything but a node record are retried:
//!   the calls before the first node with backoff, the per-node ones on the next look.
//! - A record save that failed in a way that may have landed (a timeout, a 5xx) is read back; a
//!   later compare-and-swap conflict with a record the run itself wrote is recognised as its own.
//!   A record that is not known to be stored is never acted on.
//! - Cordoning starts a drain, so it is admitted by the scheduler against the budgets of the look
//!   at which it happens: a node whose cordon failed, a node resumed before it cordoned, and a
//!   rollback that must cordon again all go through it.
//! - The lock is renewed every third of its time-to-live; after two thirds without a renewal the
//!   run stops acting, and a run whose lock expired stops ([`RunError::LockLost`]) rather than act
//!   on records another run may have changed.
//! - A resumed run resumes every node with a record (NotReady ones included), and with
//!   [`FailurePolicy::RollbackAndStop`] stays stopped if an earlier run stopped.
//! - Nodes that join, and skipped NotReady nodes that come back, are migrated when in scope, or
//!   reported in [`RunReport::joined_not_migrated`]; before a control-plane node starts the run
//!   looks again, so a worker that appeared goes first.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::cilium::{CiliumPhase, ConfigMismatch, check_live_config};
use crate::config::{FailurePolicy, MigrationConfig};
use crate::events::{Discard, Event, EventSink};
use crate::machine::{
    Action, NodeRecord, Observation, Phase, RollbackStep, STATE_ANNOTATION, StepConfig, decide,
    keeps_since, on_verification, rollback_step_limit, start_rollback, uncordoned_record,
    with_problem,
};
use crate::model::{ClusterSnapshot, NodeName, Time};
use crate::plan::{Plan, PlannedNode, Skipped, in_scope, plan};
use crate::ports::Verification; // verify (issue #9)
use crate::ports::{
    Clock, Cluster, EvictOutcome, LockOutcome, NewCni, NodeChange, OldCni, PortError, StateStore,
    Verifier,
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
    /// The run could not renew its lock before it expired: another run may have acted since.
    #[error(
        "this run ({holder}) could not renew the migration lock, which expired at {since}; another run may have acted since, so this one stops: start it again to resume from the records in the cluster"
    )]
    LockLost {
        /// This run's identity.
        holder: String,
        /// When the lock expired.
        since: Time,
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
    /// Migrate again the nodes an earlier run rolled back (their record says `RolledBack`), once
    /// the cause is fixed. Off by default: a rolled-back node stays on Calico and is reported.
    /// Nodes that ended `Failed` are never retried (a person must look at them first).
    pub retry_rolled_back: bool,
    /// A node rolling back that stays NotReady this long ends `Failed` (see
    /// [`StepConfig::rollback_not_ready_limit`](crate::machine::StepConfig::rollback_not_ready_limit));
    /// `None` uses a rollback step's limit (the config's drain timeout plus its step timeout).
    pub rollback_not_ready_limit: Option<Duration>,
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
            retry_rolled_back: false,
            rollback_not_ready_limit: None,
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
    /// Why it stopped early, if it did: one line naming the node, the step and the cause.
    pub stopped: Option<String>,
    /// Whether it ended by `max_ticks` (a simulated kill) rather than by finishing.
    pub interrupted: bool,
    /// Nodes that joined the cluster during the run and were not migrated, and why (outside the
    /// config's scope, joined after the run stopped, or never became Ready).
    pub joined_not_migrated: Vec<Skipped>,
    /// When the run last listed the cluster's nodes to look for joined ones (before its final
    /// cluster check and the release of its lock): a node that joined later is in neither list
    /// above; a new run migrates it.
    pub joins_checked: Time,
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
    /// The node's record as the run knows it (it may be ahead of the stored one, see
    /// [`needs_store`]).
    record: NodeRecord,
    /// The record last known stored (compare-and-swap base of the next save), or while
    /// `unsaved` the record the run started the node with.
    stored: NodeRecord,
    /// Started by this run and nothing saved for it yet: its first save creates the record, with
    /// the cordon in the same write where the store can (one write, not a start and a cordon),
    /// replacing `replaces`.
    unsaved: bool,
    /// The record a first save replaces: a rolled-back node's, migrated again
    /// (`retry_rolled_back`); `None` when the node has none.
    replaces: Option<NodeRecord>,
    /// Loaded from the store by this run and not looked at yet: the step one past the stored
    /// record that its first look finds is timed from that record (see [`Orchestrator::look`]).
    resumed: bool,
    /// For a resumed node: when the run that stopped was last known alive
    /// ([`StateStore::previous_lock_renewal`]); the time since does not count against the step.
    alive_until: Option<Time>,
    waiting: Option<String>,
    blocked: Option<(String, String)>,
    /// Records whose save failed in a way that may have landed (a timeout, a 5xx) since the last
    /// confirmed one: if the store later holds one of them, it is ours.
    uncertain: Vec<NodeRecord>,
    /// The look at which the scheduler admitted the node (it may cordon then).
    admitted: Option<Time>,
    /// The last look wanted to cordon the node without an admission at that look (see
    /// [`Orchestrator::admit_cordons`]).
    wants_cordon: bool,
}

impl Flying {
    /// A node this run resumes from its stored record.
    fn resumed(planned: PlannedNode, record: NodeRecord, alive_until: Option<Time>) -> Self {
        Flying {
            resumed: true,
            alive_until,
            ..Flying::new(planned, record)
        }
    }

    /// A node this run starts: nothing is stored until its first look saves.
    fn started(planned: PlannedNode, record: NodeRecord, replaces: Option<NodeRecord>) -> Self {
        Flying {
            unsaved: true,
            replaces,
            ..Flying::new(planned, record)
        }
    }

    fn new(planned: PlannedNode, record: NodeRecord) -> Self {
        Flying {
            planned,
            stored: record.clone(),
            record,
            unsaved: false,
            replaces: None,
            resumed: false,
            alive_until: None,
            waiting: None,
            blocked: None,
            uncertain: Vec::new(),
            admitted: None,
            wants_cordon: false,
        }
    }

    /// The compare-and-swap base of the next save (`None`: no record is stored).
    fn base(&self) -> Option<&NodeRecord> {
        if self.unsaved {
            self.replaces.as_ref()
        } else {
            Some(&self.stored)
        }
    }
}

/// Nodes that joined during the run, as far as the run has looked.
#[derive(Default)]
struct Joins {
    /// Every node the run knows (planned, skipped, or joined and decided on).
    known: BTreeSet<NodeName>,
    /// Joined nodes not Ready yet: decided on once they are.
    not_ready: BTreeSet<NodeName>,
    /// Nodes in scope the plan skipped because they were NotReady: they join the run if they
    /// become Ready (otherwise they stay in the report's skipped list).
    skipped_not_ready: BTreeSet<NodeName>,
    /// Joined nodes the run will not migrate, and why.
    not_migrated: Vec<Skipped>,
    /// When the node list was last read (the run's start until then).
    checked: Time,
}

/// How many times a call the run cannot go on without is tried before the run gives up.
const ATTEMPTS: u32 = 8;

/// At most this many looks at one node per tick (steps that take effect at once are chained).
const MAX_LOOKS_PER_TICK: usize = 8;

/// True while the node may still evict budget-covered pods in a drain: before its drain is done,
/// or rolling back up to the end of the rollback's own drain. The scheduler counts these
/// evictions against the budgets before starting another node.
fn drains(r: &NodeRecord) -> bool {
    r.phase.is_draining()
        || (r.phase == Phase::RollingBack
            && r.rollback.as_ref().is_some_and(|rb| {
                matches!(rb.step, RollbackStep::Cordon | RollbackStep::DrainCilium)
            }))
}

/// Whether moving a node's record from `stored` to `next` must be written before the run goes on.
///
/// A record is written ahead of what a resumed run could not work out from the cluster: that
/// the run started the node and whether the node was cordoned before it (the node's first
/// record, which the cordon carries), the agent pod to replace (before it is deleted; the label
/// carries it), every step of a rollback, and the phase a node ends in (which the uncordon
/// carries). The node changes that carry the record (cordon, label, uncordon, unlabel) write it
/// anyway. The other steps (drained, agent restarted, agent ready, pods restarted, verified,
/// uncordoned) are seen complete from the node, its pods and its agent, or redone (a
/// verification): a resumed run finds them again in its first look ([`decide`] advances through
/// every step a look shows complete), so they are kept in memory until the next write carries
/// them. A resumed run times the step one past the stored record from that record, and the steps
/// after the agent's restart from that restart ([`crate::machine::keeps_since`]), later ones
/// from its own first look ([`Orchestrator::look`]).
fn needs_store(stored: &NodeRecord, next: &NodeRecord) -> bool {
    next.phase.is_terminal()
        || next.phase == Phase::RollingBack
        || stored.phase == Phase::RollingBack
        || next.pre_cordoned != stored.pre_cordoned
        || next.agent_restarted_from != stored.agent_restarted_from
        || next.rollback != stored.rollback
}

/// When a step that began at `began` in a run last known alive at `alive_until` counts as begun
/// for a run resuming it at `now`: the time no run was watching (from the stopped run's last lock
/// renewal to now) does not count against its limit, so a run that was down for a while does not
/// fail a step at once that it never had the time to finish; the time before that renewal does,
/// so a run restarted over and over (each restart renews the lock later) still times a stuck step
/// out. Without that moment, the step counts from `began`. A record written after the last
/// renewal began while that run was alive but none of its time is known: it counts from `now`.
fn resumed_since(began: Time, alive_until: Option<Time>, now: Time) -> Time {
    match alive_until {
        Some(a) if a >= began => began.after(now.since(a)).min(now),
        Some(_) => now,
        None => began.min(now),
    }
}

/// The cluster's schedulable nodes for [`crate::plan::in_flight_limit`]: the Ready nodes the plan
/// saw, less those cordoned then other than by the migration (a node a stopped run cordoned and
/// left in flight counts, as it did for that run: a resumed run keeps the same limit; a node that
/// ended and is cordoned again is a person's).
fn schedulable_nodes(
    ready: usize,
    cordoned_ready: &[NodeName],
    records: &BTreeMap<NodeName, NodeRecord>,
) -> usize {
    let by_us = |n: &NodeName| {
        records
            .get(n)
            .is_some_and(|r| r.pre_cordoned == Some(false) && !r.phase.is_terminal())
    };
    let cordoned = cordoned_ready.iter().filter(|n| !by_us(n)).count();
    ready.saturating_sub(cordoned)
}

/// True for errors after which a write may or may not have been applied.
fn maybe_applied(e: &PortError) -> bool {
    matches!(e, PortError::Timeout { .. } | PortError::Unavailable { .. })
}

/// A change to the node that a record's save carries where the store can
/// ([`Orchestrator::persist`]).
struct Carry<'a> {
    change: &'a NodeChange,
    /// The record to store instead when the change goes in the same write (the step the change
    /// completes is then stored with it), and the phases entered on the way to it.
    record: Option<(NodeRecord, Vec<Phase>)>,
}

/// What a save did ([`Orchestrator::persist`]).
enum Saved {
    /// Not stored (retried on the next look; never act then).
    No,
    /// Stored.
    Yes,
    /// Stored, and the node change went with it in the same write.
    WithChange,
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
        let mut step = StepConfig::from(&cfg);
        if let Some(limit) = opts.rollback_not_ready_limit {
            step.rollback_not_ready_limit = limit;
        }
        Orchestrator {
            ports,
            cfg,
            step,
            opts,
        }
    }

    /// Reads the cluster (with the migration records an earlier run left on the nodes) and
    /// computes the plan. Changes nothing.
    ///
    /// # Errors
    /// Any read failure.
    pub async fn plan(&self) -> Result<(ClusterSnapshot, Plan), RunError> {
        let cluster = &self.ports.cluster;
        let calico = &self.ports.calico;
        let inv = self
            .retry("read the cluster inventory", &Discard, move || {
                cluster.inventory()
            })
            .await?;
        let calico = self
            .retry("read Calico's configuration", &Discard, move || {
                calico.facts()
            })
            .await?;
        let store = &self.ports.store;
        let records = self
            .retry("read the nodes' migration records", &Discard, move || {
                store.load()
            })
            .await?;
        let mut snapshot = inv.with_calico(calico);
        snapshot.records = records;
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
        // Refuse a failed preflight before touching anything, the lock included.
        if !plan.preflight.ok() {
            return Err(RunError::Preflight(
                plan.preflight
                    .failures()
                    .map(|c| format!("  - [{}] {}", c.id, c.message))
                    .collect(),
            ));
        }
        let clock = &self.ports.clock;
        let store = &self.ports.store;
        let holder = self.opts.holder.as_str();
        let ttl = self.opts.lock_ttl;
        match self
            .retry("take the run lock", sink, move || {
                store.acquire_lock(holder, clock.now(), ttl)
            })
            .await?
        {
            LockOutcome::Acquired => {}
            LockOutcome::HeldBy { holder, until } => {
                return Err(RunError::Locked { holder, until });
            }
        }
        let result = self.run_locked(plan, sink).await;
        // A run that was "killed" keeps its lock, as a dead process would. A release that fails
        // only delays the next run until the lock expires.
        if !matches!(&result, Ok(r) if r.interrupted) {
            let _ = self
                .retry("release the run lock", sink, move || {
                    store.release_lock(holder)
                })
                .await;
        }
        result
    }

    /// Calls `f` until it succeeds, retrying transient errors [`ATTEMPTS`] times with backoff
    /// (1 s doubling to 30 s, or what a throttling answer asks for).
    async fn retry<T, F, Fut>(
        &self,
        what: &str,
        sink: &dyn EventSink,
        mut f: F,
    ) -> Result<T, RunError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, PortError>>,
    {
        let mut delay = Duration::from_secs(1);
        let mut attempt = 1;
        loop {
            match f().await {
                Ok(t) => return Ok(t),
                // A 409 outside the state store's compare-and-swap means "re-read and retry".
                Err(e)
                    if (e.is_transient() || matches!(e, PortError::Conflict { .. }))
                        && attempt < ATTEMPTS =>
                {
                    let now = self.ports.clock.now();
                    sink.emit(&Event::Retrying {
                        what: format!("{what}: {e}"),
                        at: now,
                    });
                    let wait = match &e {
                        PortError::Throttled { retry_after } => (*retry_after).max(delay),
                        _ => delay,
                    };
                    self.ports.clock.sleep_until(now.after(wait)).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn run_locked(&self, plan: &Plan, sink: &dyn EventSink) -> Result<RunReport, RunError> {
        // Read before the first renewal overwrites it.
        let alive_until = self.ports.store.previous_lock_renewal();
        let ports = &self.ports;
        let cilium = &ports.cilium;
        let store = &ports.store;
        let live = self
            .retry("read Cilium's live config", sink, move || {
                cilium.live_config()
            })
            .await?;
        let mismatches = check_live_config(&live, &self.cfg, plan.inputs, CiliumPhase::Migration);
        if !mismatches.is_empty() {
            return Err(RunError::NotInMigrationMode(mismatches));
        }
        let node_config = &plan.node_config;
        self.retry("apply the CiliumNodeConfig", sink, move || {
            cilium.apply_node_config(node_config)
        })
        .await?;

        let started = ports.clock.now();
        let records = self
            .retry("load the node records", sink, move || store.load())
            .await?;
        let mut pending: Vec<PlannedNode> = Vec::new();
        let mut flying: BTreeMap<NodeName, Flying> = BTreeMap::new();
        let mut finished: BTreeMap<NodeName, (PlannedNode, NodeRecord, Option<Time>)> =
            BTreeMap::new();
        let mut joins = Joins {
            checked: started,
            ..Joins::default()
        };
        let mut stopped: Option<String> = None;
        // Rolled-back nodes to migrate again (`retry_rolled_back`): their record is replaced when
        // they start.
        let mut retried: BTreeMap<NodeName, NodeRecord> = BTreeMap::new();
        for p in &plan.order {
            joins.known.insert(p.name.clone());
            match records.get(&p.name) {
                None => pending.push(p.clone()),
                Some(r) if r.phase == Phase::RolledBack && self.opts.retry_rolled_back => {
                    retried.insert(p.name.clone(), r.clone());
                    pending.push(p.clone());
                }
                Some(r) if r.phase.is_terminal() => {
                    finished.insert(p.name.clone(), (p.clone(), r.clone(), None));
                }
                Some(r) => {
                    flying.insert(
                        p.name.clone(),
                        Flying::resumed(p.clone(), r.clone(), alive_until),
                    );
                }
            }
        }
        for s in plan
            .skipped
            .iter()
            .filter(|s| !records.contains_key(&s.node))
        {
            joins.skipped_not_ready.insert(s.node.clone());
        }
        // Nodes with a record that the plan does not list: an earlier run started them, and they
        // either joined after that run's plan or are NotReady now (the plan skips those). They
        // resume where they are: a node left cordoned half-way would be worse than a NotReady one
        // timing out into rollback.
        for (name, r) in &records {
            if joins.known.contains(name) {
                continue;
            }
            joins.known.insert(name.clone());
            let view = ports.cluster.node_view(name).await.ok();
            let planned = PlannedNode {
                name: name.clone(),
                zone: view.as_ref().and_then(|v| v.node.zone.clone()),
                control_plane: view.as_ref().is_some_and(|v| v.node.is_control_plane()),
            };
            if r.phase.is_terminal() {
                finished.insert(name.clone(), (planned, r.clone(), None));
            } else {
                flying.insert(
                    name.clone(),
                    Flying::resumed(planned, r.clone(), alive_until),
                );
            }
        }
        // verify (issue #9): the whole cluster must be healthy before the first node is touched.
        if flying.is_empty() {
            let v = &ports.verifier;
            let pre = self.retry("verify the cluster", sink, move || v.verify_cluster());
            if let Verification::Unhealthy(p) = pre.await? {
                return Err(RunError::Preflight(crate::verify::before_first_node(p)));
            }
        }
        sink.emit(&Event::RunStarted {
            nodes: plan.order.len(),
            resumed: flying.len(),
            at: started,
        });

        let limits = Limits {
            max_in_flight: crate::plan::in_flight_limit(
                self.cfg.max_in_flight,
                schedulable_nodes(plan.ready_nodes, &plan.cordoned_ready, &records),
            ),
            control_plane_last: self.cfg.control_plane_last,
        };
        // An earlier run stopped on a failed node: so does this one (as a run never killed would
        // have), until a person clears that node's record.
        if self.cfg.on_node_failure == FailurePolicy::RollbackAndStop
            && let Some((name, (_, r, _))) = finished
                .iter()
                .find(|(_, (_, r, _))| r.phase != Phase::Done)
        {
            stopped = Some(format!(
                "node {name} ended {:?} in an earlier run: {}; remove its {STATE_ANNOTATION} annotation to try it again",
                r.phase,
                r.rollback
                    .as_ref()
                    .map_or("no cause recorded", |x| x.cause.as_str())
            ));
        }
        if let Some(reason) = &stopped {
            sink.emit(&Event::Stopping {
                reason: reason.clone(),
                at: started,
            });
        }
        let mut last_lock = started;
        let mut last_join_check = started;
        let mut last_progress = (usize::MAX, 0, 0, 0);
        let mut done_count = (usize::MAX, 0);
        let mut ticks: u64 = 0;
        'run: loop {
            let now = ports.clock.now();
            if now.since(last_lock) >= self.opts.lock_ttl / 3 {
                match ports
                    .store
                    .acquire_lock(&self.opts.holder, now, self.opts.lock_ttl)
                    .await
                {
                    // Our lock expired before we could renew it: another run may have taken it,
                    // acted and finished meanwhile, so what this run holds in memory may be stale.
                    Ok(LockOutcome::Acquired) if now.since(last_lock) >= self.opts.lock_ttl => {
                        return Err(RunError::LockLost {
                            holder: self.opts.holder.clone(),
                            since: last_lock.after(self.opts.lock_ttl),
                        });
                    }
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
            // Act only while the lock is surely ours: after a third of its time-to-live without a
            // renewal, another run may take it over once it expires.
            'act: {
                if now.since(last_lock) >= self.opts.lock_ttl * 2 / 3 {
                    break 'act;
                }
                if now.since(last_join_check) >= self.opts.join_check_interval {
                    last_join_check = now;
                    self.notice_joins(&mut joins, &mut pending, stopped.is_some(), sink, now)
                        .await;
                }

                // Advance every node in flight.
                let names: Vec<NodeName> = flying.keys().cloned().collect();
                for name in names {
                    if let Some(f) = flying.get_mut(&name) {
                        self.advance(f, sink, now, false).await?;
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

                // Cordons (drains starting) that wait for the scheduler's admission.
                self.admit_cordons(&mut flying, limits, sink, now).await?;

                // Before a control-plane node starts, a fresh look for workers that joined or came
                // back Ready: with control-plane-last, they go first.
                if self.cfg.control_plane_last
                    && stopped.is_none()
                    && !pending.is_empty()
                    && pending.iter().all(|p| p.control_plane)
                    && last_join_check != now
                {
                    last_join_check = now;
                    self.notice_joins(&mut joins, &mut pending, false, sink, now)
                        .await;
                }

                // Start new nodes.
                if stopped.is_none()
                    && !pending.is_empty()
                    && flying.len() < limits.max_in_flight as usize
                {
                    let started_now = self
                        .start_nodes(&mut pending, &mut flying, &mut retried, limits, sink, now)
                        .await?;
                    // Every node started now is cordoned before any of them evicts: a pod
                    // evicted from one must not land on another about to be cordoned.
                    // A node whose cordon did not go through (an API error) must not cordon later
                    // in this tick, after the others evicted: it goes through the scheduler again
                    // on the next look (`admit_cordons`), against the budgets as they are then.
                    let mut cordoned = Vec::new();
                    for name in started_now {
                        if let Some(f) = flying.get_mut(&name) {
                            let acted = self.advance(f, sink, now, true).await?;
                            if acted == Some(Action::Cordon) || f.record.phase != Phase::Pending {
                                cordoned.push(name);
                            } else {
                                f.admitted = None;
                            }
                        }
                    }
                    for name in cordoned {
                        if let Some(f) = flying.get_mut(&name) {
                            self.advance(f, sink, now, false).await?;
                        }
                    }
                }

                // Counted again only when a node finished (not on every tick: O(nodes) each).
                if done_count.0 != finished.len() {
                    done_count = (
                        finished.len(),
                        finished
                            .values()
                            .filter(|(_, r, _)| r.phase == Phase::Done)
                            .count(),
                    );
                }
                let done = done_count.1;
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
                    // A last look for nodes that joined since the last check, so none is left behind
                    // unreported.
                    let before = pending.len();
                    let looked = self
                        .notice_joins(&mut joins, &mut pending, stopped.is_some(), sink, now)
                        .await;
                    last_join_check = now;
                    // A look that failed is tried again on the next tick rather than ending blind.
                    if looked && (pending.len() == before || stopped.is_some()) {
                        break 'run;
                    }
                }
            }
            ticks += 1;
            if self.opts.max_ticks.is_some_and(|m| ticks >= m) {
                return Ok(self.report(
                    plan, &finished, &flying, &pending, started, stopped, true, &joins,
                ));
            }
            ports
                .clock
                .sleep_until(now.after(self.cfg.poll_interval))
                .await;
        }
        // verify (issue #9): the whole cluster once more after the last node.
        if stopped.is_none() {
            let v = &ports.verifier;
            let post = self.retry("verify the cluster", sink, move || v.verify_cluster());
            if let Verification::Unhealthy(p) = post.await? {
                stopped = Some(crate::verify::after_last_node(&p));
            }
        }
        Ok(self.report(
            plan, &finished, &flying, &pending, started, stopped, false, &joins,
        ))
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
        joins: &Joins,
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
        let planned: BTreeSet<&NodeName> = plan.order.iter().map(|o| &o.name).collect();
        for p in pending
            .iter()
            .chain(flying.values().map(|f| &f.planned))
            .chain(finished.values().map(|(p, _, _)| p))
        {
            if !planned.contains(&p.name) {
                push(p);
            }
        }
        // Skipped nodes that an earlier run had started, or that came back Ready and joined,
        // are reported with the others.
        let skipped = plan
            .skipped
            .iter()
            .filter(|s| !nodes.iter().any(|n: &NodeOutcome| n.node == s.node))
            .cloned()
            .collect();
        RunReport {
            nodes,
            skipped,
            started,
            finished: self.ports.clock.now(),
            stopped,
            interrupted,
            joined_not_migrated: joins
                .not_migrated
                .iter()
                .cloned()
                .chain(joins.not_ready.iter().map(|n| Skipped {
                    node: n.clone(),
                    reason: "joined during the run and was not Ready when it ended; migrate it once it is Ready".into(),
                }))
                .collect(),
            joins_checked: joins.checked,
        }
    }

    /// Looks for nodes that joined the cluster: a Ready one in scope joins the run (workers before
    /// the control-plane nodes still pending), any other is reported. Nodes not Ready yet are
    /// looked at again next time; read failures leave the node for next time too. False when
    /// some read failed (the look is incomplete).
    async fn notice_joins(
        &self,
        joins: &mut Joins,
        pending: &mut Vec<PlannedNode>,
        stopping: bool,
        sink: &dyn EventSink,
        now: Time,
    ) -> bool {
        let asked = self.ports.clock.now();
        let names = match self.ports.cluster.node_names().await {
            Ok(n) => {
                joins.checked = asked;
                n
            }
            Err(e) => {
                sink.emit(&Event::Retrying {
                    what: format!("list nodes: {e}"),
                    at: now,
                });
                return false;
            }
        };
        let mut complete = true;
        for name in names {
            if joins.known.contains(&name) {
                continue;
            }
            let view = match self.ports.cluster.node_view(&name).await {
                Ok(v) => v,
                Err(e) => {
                    sink.emit(&Event::Retrying {
                        what: format!("read joined node {name}: {e}"),
                        at: now,
                    });
                    complete = false;
                    continue;
                }
            };
            let skipped = joins.skipped_not_ready.contains(&name);
            if !view.node.ready {
                if !skipped {
                    joins.not_ready.insert(name);
                }
                continue;
            }
            joins.not_ready.remove(&name);
            joins.skipped_not_ready.remove(&name);
            joins.known.insert(name.clone());
            if skipped && stopping {
                // Still skipped: the report lists it.
                continue;
            }
            let why_not = if !in_scope(&self.cfg.scope, &view.node) {
                Some("joined during the run and is outside the config's scope")
            } else if stopping {
                Some("joined after the run stopped starting nodes")
            } else {
                None
            };
            match why_not {
                Some(reason) => joins.not_migrated.push(Skipped {
                    node: name.clone(),
                    reason: reason.into(),
                }),
                None => {
                    let planned = PlannedNode {
                        name: name.clone(),
                        zone: view.node.zone.clone(),
                        control_plane: view.node.is_control_plane(),
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
            }
            if !skipped {
                sink.emit(&Event::NodeJoined {
                    node: name,
                    migrating: why_not.is_none(),
                    at: now,
                });
            }
        }
        complete
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_nodes(
        &self,
        pending: &mut Vec<PlannedNode>,
        flying: &mut BTreeMap<NodeName, Flying>,
        retried: &mut BTreeMap<NodeName, NodeRecord>,
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
                draining: drains(&f.record),
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
            // Nothing is written yet: the node's first look saves its first record, with the
            // cordon in the same write (`persist`).
            sink.emit(&Event::NodeStarted {
                node: name.clone(),
                at: now,
            });
            let mut f = Flying::started(planned, NodeRecord::new(now), retried.remove(&name));
            f.admitted = Some(now);
            flying.insert(name.clone(), f);
            started.push(name);
        }
        Ok(started)
    }

    /// Cordons, through the scheduler, the nodes whose last look wanted to cordon without having
    /// been admitted at this look: a node started earlier whose cordon failed or whose run died
    /// right after starting it (pods kept landing on it meanwhile, so the drain the scheduler
    /// allowed may no longer fit the budgets), and a node rolling back that must be cordoned and
    /// drained again. Cordoning is what starts a drain, so it is admitted against the budgets as
    /// they are now, like a start; a node refused waits. A rollback waits at most half its step
    /// limit, then cordons anyway.
    async fn admit_cordons(
        &self,
        flying: &mut BTreeMap<NodeName, Flying>,
        limits: Limits,
        sink: &dyn EventSink,
        now: Time,
    ) -> Result<(), RunError> {
        let waiting: Vec<NodeName> = flying
            .values()
            .filter(|f| f.wants_cordon)
            .map(|f| f.planned.name.clone())
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        let others: Vec<InFlightNode> = flying
            .values()
            .filter(|f| !f.wants_cordon)
            .map(|f| InFlightNode {
                name: f.planned.name.clone(),
                zone: f.planned.zone.clone(),
                control_plane: f.planned.control_plane,
                draining: drains(&f.record),
            })
            .collect();
        let cands: Vec<PendingNode> = waiting
            .iter()
            .filter_map(|n| flying.get(n))
            .map(|f| PendingNode::from(&f.planned))
            .collect();
        let mut ask = waiting.clone();
        ask.extend(others.iter().filter(|n| n.draining).map(|n| n.name.clone()));
        let picks = match self.ports.cluster.budget_view(&ask).await {
            Ok(b) => (self.opts.scheduler)(&cands, &others, &b, limits),
            Err(e) if e.is_transient() => {
                sink.emit(&Event::Retrying {
                    what: format!("read disruption budgets: {e}"),
                    at: now,
                });
                crate::schedule::Picks::default()
            }
            Err(e) => return Err(e.into()),
        };
        let reason = match &picks.held {
            Some((_, crate::schedule::Held::Budget { pdb })) => format!(
                "waiting to cordon: PodDisruptionBudget {pdb} is in use by nodes already draining"
            ),
            _ => "waiting to cordon until the disruption budgets allow it".to_string(),
        };
        let rollback_wait = rollback_step_limit(&self.step) / 2;
        let mut cordoned = Vec::new();
        for name in waiting {
            let Some(f) = flying.get_mut(&name) else {
                continue;
            };
            f.wants_cordon = false;
            let overdue = f
                .record
                .rollback
                .as_ref()
                .filter(|_| f.record.phase == Phase::RollingBack)
                .is_some_and(|rb| now.since(rb.step_since) >= rollback_wait);
            if picks.start.contains(&name) || overdue {
                f.admitted = Some(now);
                if f.record.phase == Phase::Pending {
                    // The record the cordon carries is timed from this cordon: a resumed run
                    // drains the pods created before that time.
                    let mut next = f.record.clone();
                    next.since = now;
                    let change = NodeChange::Unschedulable(true);
                    let carry = Carry {
                        change: &change,
                        record: None,
                    };
                    match self.persist(f, next, &[], Some(carry), sink, now).await? {
                        Saved::No => continue,
                        Saved::WithChange => {
                            cordoned.push(name);
                            continue;
                        }
                        Saved::Yes => {}
                    }
                }
                if self.act_or_retry(f, Action::Cordon, sink, now).await? {
                    cordoned.push(name);
                }
            } else {
                self.act_or_retry(f, Action::Wait(reason.clone()), sink, now)
                    .await?;
            }
        }
        // Every admitted node is cordoned before any of them evicts.
        for name in cordoned {
            if let Some(f) = flying.get_mut(&name) {
                self.advance(f, sink, now, false).await?;
            }
        }
        Ok(())
    }

    /// The record stored for `node` now.
    async fn stored(&self, node: &NodeName) -> Result<Option<NodeRecord>, PortError> {
        Ok(self.ports.store.load().await?.remove(node))
    }

    /// Persists `next` over the node's record. `Ok(true)` when it is stored (then the caller may
    /// act on it), `Ok(false)` when it is not (retried on the next look; never act then).
    async fn save(
        &self,
        f: &mut Flying,
        next: NodeRecord,
        sink: &dyn EventSink,
        now: Time,
    ) -> Result<bool, RunError> {
        self.save_via(f, next, &[], sink, now).await
    }

    /// Persists `next` (compare-and-swap against the record we hold) and reports the phases
    /// entered: `entered` when the caller knows the way (a decision), else just the new phase.
    async fn save_via(
        &self,
        f: &mut Flying,
        next: NodeRecord,
        entered: &[Phase],
        sink: &dyn EventSink,
        now: Time,
    ) -> Result<bool, RunError> {
        Ok(!matches!(
            self.persist(f, next, entered, None, sink, now).await?,
            Saved::No
        ))
    }

    /// [`save_via`](Self::save_via), with a change to the node carried by the same write when
    /// the store can ([`StateStore::save_with`]): both land or neither, so the record is still
    /// never behind the cluster. [`Saved::WithChange`] when the change went with the record
    /// (the caller must not apply it again); the record stored is then the carry's own, when it
    /// has one.
    async fn persist(
        &self,
        f: &mut Flying,
        next: NodeRecord,
        entered: &[Phase],
        carry: Option<Carry<'_>>,
        sink: &dyn EventSink,
        now: Time,
    ) -> Result<Saved, RunError> {
        if !f.unsaved && (next == f.stored || (carry.is_none() && !needs_store(&f.stored, &next))) {
            self.emit_phases(f, &next, entered, sink, now);
            f.record = next;
            return Ok(Saved::Yes);
        }
        let name = f.planned.name.clone();
        let store = &self.ports.store;
        // Folded only when the combined write is known to have gone through: a record found
        // stored after an error may come from another write of it, so the change is then
        // applied again (cordon, label and uncordon are idempotent).
        let mut next = next;
        let mut entered = entered.to_vec();
        // The carry's own record, while it may have landed with the change.
        let mut instead: Option<(NodeRecord, Vec<Phase>)> = None;
        let (result, mut folded) = match carry {
            Some(c) => {
                let with = c.record.as_ref().map_or(&next, |(r, _)| r);
                match store.save_with(&name, f.base(), with, c.change).await {
                    Ok(true) => {
                        if let Some((r, way)) = c.record {
                            next = r;
                            entered.extend(way);
                        }
                        (Ok(()), true)
                    }
                    Ok(false) => (store.save(&name, f.base(), &next).await, false),
                    Err(e) => {
                        instead = c.record;
                        (Err(e), false)
                    }
                }
            }
            None => (store.save(&name, f.base(), &next).await, false),
        };
        let stored = match result {
            Ok(()) => true,
            Err(PortError::Conflict { .. }) => {
                // A save that failed earlier may have landed after all: if the store holds what
                // we wrote then, it is ours, not another writer's.
                match self.stored(&name).await {
                    Ok(Some(r)) if r == next => true,
                    Ok(Some(r)) if f.uncertain.contains(&r) => {
                        // Adopt it and decide again from it on the next look.
                        f.stored = r.clone();
                        f.record = r;
                        f.uncertain.clear();
                        f.unsaved = false;
                        f.replaces = None;
                        return Ok(Saved::No);
                    }
                    Ok(_) => return Err(RunError::Conflict(name)),
                    Err(e) if e.is_transient() => false,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) if e.is_transient() => {
                sink.emit(&Event::Retrying {
                    what: format!("save {name}: {e}"),
                    at: now,
                });
                // A timeout or a 5xx may hide a write that landed: read it back.
                maybe_applied(&e)
                    && match self.stored(&name).await {
                        // The carry's record landed, so did the change with it (one write).
                        Ok(Some(r)) if instead.as_ref().is_some_and(|(i, _)| *i == r) => {
                            if let Some((_, way)) = instead.take() {
                                entered.extend(way);
                            }
                            next = r;
                            folded = true;
                            true
                        }
                        Ok(r) => r.as_ref() == Some(&next),
                        Err(_) => {
                            f.uncertain.push(next.clone());
                            f.uncertain.extend(instead.take().map(|(r, _)| r));
                            false
                        }
                    }
            }
            Err(e) => return Err(e.into()),
        };
        if !stored {
            return Ok(Saved::No);
        }
        self.emit_phases(f, &next, &entered, sink, now);
        f.stored = next.clone();
        f.record = next;
        f.uncertain.clear();
        f.unsaved = false;
        f.replaces = None;
        Ok(if folded {
            Saved::WithChange
        } else {
            Saved::Yes
        })
    }

    /// Reports the phases entered from the run's record to `next`: `entered` when the caller
    /// knows the way (a decision), else just the new phase.
    fn emit_phases(
        &self,
        f: &Flying,
        next: &NodeRecord,
        entered: &[Phase],
        sink: &dyn EventSink,
        now: Time,
    ) {
        if next.phase == f.record.phase {
            return;
        }
        let way: Vec<Phase> = if entered.last() == Some(&next.phase) {
            entered.to_vec()
        } else {
            vec![next.phase]
        };
        let mut from = f.record.phase;
        for to in way {
            sink.emit(&Event::Phase {
                node: f.planned.name.clone(),
                from,
                to,
                at: now,
            });
            from = to;
        }
    }

    /// Looks at one node and acts, then, while the action took effect at once (a cordon, a
    /// label, an uncordon, a verification that passed), looks again within the same tick: the
    /// node goes cordon then evict, label then restart, verified then uncordon then done without
    /// waiting a poll interval between. `cordon_only` takes one look and acts only if
    /// that is a cordon (used to cordon every node started at one look before any of them evicts,
    /// so that evicted pods do not land on a node about to be cordoned).
    async fn advance(
        &self,
        f: &mut Flying,
        sink: &dyn EventSink,
        now: Time,
        cordon_only: bool,
    ) -> Result<Option<Action>, RunError> {
        let chain = !cordon_only;
        let mut last = None;
        for _ in 0..MAX_LOOKS_PER_TICK {
            let acted = self.look(f, sink, now, cordon_only).await?;
            let immediate = match &acted {
                Some(Action::Cordon | Action::Uncordon | Action::Label | Action::Unlabel) => true,
                Some(Action::Verify) => f.record.phase == Phase::Verified,
                _ => false,
            };
            last = acted;
            if !chain || !immediate || f.record.phase.is_terminal() {
                break;
            }
        }
        Ok(last)
    }

    /// One look at one node: observe, decide, persist, act (with `cordon_only`, act only if the
    /// action is a cordon; the record is persisted either way). The action taken, if it was taken
    /// without error.
    async fn look(
        &self,
        f: &mut Flying,
        sink: &dyn EventSink,
        now: Time,
        cordon_only: bool,
    ) -> Result<Option<Action>, RunError> {
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
                return Ok(None);
            }
            Err(e) if e.is_transient() => {
                sink.emit(&Event::Retrying {
                    what: format!("observe {name}: {e}"),
                    at: now,
                });
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let obs = Observation {
            view: &view,
            agent: agent.as_ref(),
            cni,
        };
        let mut d = decide(&f.record, &obs, &self.step, now);
        let resumed = std::mem::take(&mut f.resumed);
        // The first look of a resumed node that finds it one step past the stored record (and
        // in the steps timed from that one, `keeps_since`).
        let one_step = resumed
            && d.entered
                .split_first()
                .is_some_and(|(_, rest)| rest.iter().all(|p| keeps_since(*p)));
        if one_step && !d.record.phase.is_terminal() && d.record.phase != Phase::RollingBack {
            // The step this first look finds the node in, one past the stored record, began
            // when that record was written (the run that stopped kept it in memory only): time
            // it from there, so that its limit is never stretched by restarts (a run restarted
            // every few seconds still times a stuck step out). Decided again from there, so a
            // limit already passed fails the node now (a step timed from the one before it,
            // `keeps_since`, goes with that one). Further steps began at an unknown time since,
            // and are timed from this look.
            let mut r = d.record;
            r.since = resumed_since(f.stored.since, f.alive_until, now);
            let again = decide(&r, &obs, &self.step, now);
            d.entered.extend(again.entered);
            d.changed = again.record != f.record;
            d.record = again.record;
            d.action = again.action;
        }
        if resumed && matches!(d.action, Action::RestartAgent(_)) {
            // The stopped run stored the agent pod to replace but may have died before asking:
            // this run asks now, and times the agent's step from its own request.
            d.record.since = now;
        }
        // A cordon (when admitted now), label, unlabel or uncordon this look will act on goes
        // with the record's save in one write where the store can.
        let label = |value: Option<&str>| NodeChange::Label {
            key: self.cfg.migration_label.clone(),
            value: value.map(str::to_string),
        };
        let change = match &d.action {
            Action::Cordon if f.admitted == Some(now) => Some(NodeChange::Unschedulable(true)),
            Action::Uncordon if !cordon_only => Some(NodeChange::Unschedulable(false)),
            Action::Label if !cordon_only => Some(label(Some("true"))),
            Action::Unlabel if !cordon_only => Some(label(None)),
            _ => None,
        };
        // The uncordon of a verified node completes its migration: where it goes in the
        // record's write, that write says Done and no other follows.
        let carry = change.as_ref().map(|c| Carry {
            change: c,
            record: match d.action {
                Action::Uncordon => uncordoned_record(&d.record, now)
                    .map(|r| (r, vec![Phase::Uncordoned, Phase::Done])),
                _ => None,
            },
        });
        match self
            .persist(f, d.record, &d.entered, carry, sink, now)
            .await?
        {
            Saved::No => return Ok(None),
            Saved::WithChange => return Ok(Some(d.action)),
            Saved::Yes => {}
        }
        if d.action == Action::Cordon && f.admitted != Some(now) {
            // Cordoning starts a drain: it goes through the scheduler first (`admit_cordons`).
            f.wants_cordon = true;
            return Ok(None);
        }
        if cordon_only && d.action != Action::Cordon {
            return Ok(None);
        }
        let action = d.action.clone();
        Ok(self
            .act_or_retry(f, d.action, sink, now)
            .await?
            .then_some(action))
    }

    /// Acts, retrying on the next look what a transient error or a 409 stopped. True when the
    /// action went through.
    async fn act_or_retry(
        &self,
        f: &mut Flying,
        action: Action,
        sink: &dyn EventSink,
        now: Time,
    ) -> Result<bool, RunError> {
        let name = f.planned.name.clone();
        match self.act(f, action, sink, now).await {
            Ok(()) => Ok(true),
            // A 409 on a write other than the record's (the node or a pod changed meanwhile) is
            // retried like a transient error: the next look re-reads.
            Err(RunError::Port(e))
                if e.is_transient() || matches!(e, PortError::Conflict { .. }) =>
            {
                sink.emit(&Event::Retrying {
                    what: format!("{name}: {e}"),
                    at: now,
                });
                Ok(false)
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
        // Every write the adapters make for this action is logged inside this span.
        let span = tracing::info_span!(
            "step",
            node = %name,
            phase = ?f.record.phase,
            action = match &action {
                Action::Cordon => "cordon",
                Action::Evict(_) => "evict",
                Action::Label => "label",
                Action::RestartAgent(_) => "restart agent",
                Action::Uncordon => "uncordon",
                Action::Recycle { .. } => "recycle pods",
                Action::Verify => "verify",
                Action::RestoreCni => "restore Calico CNI",
                Action::Unlabel => "unlabel",
                Action::Wait(_) => "wait",
                Action::Finished => "finished",
            }
        );
        tracing::Instrument::instrument(
            async {
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
                        let mut v = ports.verifier.verify_node(&name).await?;
                        if v == Verification::Healthy {
                            v = ports.verifier.verify_cluster().await?; // verify (issue #9)
                        }
                        let next = on_verification(&f.record, &v, &self.step, now);
                        self.save(f, next, sink, now).await?;
                    }
                    Action::Wait(reason) => waiting(f, reason),
                    Action::Finished => {}
                }
                Ok::<(), RunError>(())
            },
            span,
        )
        .await
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
        // A Ready pod is evicted only while its budget allows a disruption, and each eviction
        // this look uses one up (the adapter answers from its watches: asking costs no
        // request): an eviction the budget refuses only earns a 429 (issue #5). When the
        // allowance is not known, the eviction is posted and the API server decides.
        let mut budgets = if evict.is_empty() {
            crate::ports::PodBudgets::default()
        } else {
            match self.ports.cluster.pod_budgets(&name).await {
                Ok(b) => b,
                Err(e) if e.is_transient() => crate::ports::PodBudgets::default(),
                Err(e) => return Err(e.into()),
            }
        };
        for pod in evict {
            // A pod under several budgets is posted anyway: the API server's refusal names them.
            if let Some([pdb]) = budgets.covering.get(pod).map(Vec::as_slice)
                && let Some(n) = budgets.allowed.get_mut(pdb)
            {
                if *n == 0 {
                    blocked.get_or_insert((pod.to_string(), pdb.clone()));
                    continue;
                }
                *n -= 1;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_step_does_not_count_the_time_no_run_was_watching() {
        let s = |x: u64| Time(x * 1000);
        // Began at 10 s; the stopped run renewed its lock last at 100 s; resumed at 700 s: 90 s
        // of the step have passed, not 690.
        assert_eq!(resumed_since(s(10), Some(s(100)), s(700)), s(610));
        // Without the renewal, as before: from the record.
        assert_eq!(resumed_since(s(10), None, s(700)), s(10));
        // A record written after the last renewal: none of the step's time is known to have
        // passed under a run.
        assert_eq!(resumed_since(s(150), Some(s(100)), s(700)), s(700));
        // A run restarted over and over renews later each time: the step's counted time grows
        // with every restart, so a stuck step still times out.
        let counted =
            |renewed: u64, now: u64| s(now).since(resumed_since(s(10), Some(s(renewed)), s(now)));
        assert!(counted(400, 1000) > counted(100, 700));
        assert_eq!(counted(400, 1000), Duration::from_secs(390));
    }

    #[test]
    fn a_node_cordoned_by_a_stopped_run_still_counts_as_schedulable() {
        let name = |s: &str| NodeName::new(s).unwrap();
        let cordoned = [name("a"), name("b"), name("c"), name("d")];
        let rec = |phase: Phase, pre_cordoned: bool| {
            let mut r = NodeRecord::new(Time(0));
            r.phase = phase;
            r.pre_cordoned = Some(pre_cordoned);
            r
        };
        let records = BTreeMap::from([
            // In flight, cordoned by the stopped run: schedulable for the limit.
            (name("a"), rec(Phase::Cordoned, false)),
            // In flight, cordoned by a person before that run.
            (name("b"), rec(Phase::Cordoned, true)),
            // Migrated and uncordoned by a run, cordoned again since: a person's cordon.
            (name("c"), rec(Phase::Done, false)),
        ]);
        // 10 Ready nodes, 4 cordoned when planned, one of them by the migration: 7.
        assert_eq!(schedulable_nodes(10, &cordoned, &records), 7);
        assert_eq!(schedulable_nodes(10, &cordoned, &BTreeMap::new()), 6);
    }
}
