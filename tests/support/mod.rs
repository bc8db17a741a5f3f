//! What the fault campaign (`tests/faults.rs`), the crash-and-resume tests (`tests/resume.rs`)
//! and the invariant property test (`tests/invariants.rs`, seeds and threads only) share: drawing a case from a seed, driving the orchestrator through kills and restarts, and
//! checking the end state of every node against DESIGN.md's invariants.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use cnimig::core::cilium::{CiliumPhase, rendered_config};
use cnimig::core::config::{FailurePolicy, MigrationConfig};
use cnimig::core::events::Event;
use cnimig::core::machine::Phase;
use cnimig::core::model::{NodeName, PodNetwork, Time};
use cnimig::core::orchestrator::{Orchestrator, Ports, RunError, RunOptions, RunReport};
use cnimig::core::ports::CniDirState;
use cnimig::sim::{
    FaultKind, NodeJoin, OpKind, RandomSpec, Scenario, SimCluster, SimFaults, SimParams,
    WorkloadKind,
};
use rand::Rng;

/// How a run is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// After this many loop iterations (`RunOptions::max_ticks`): between two looks.
    Ticks(u64),
    /// After this many more port calls: anywhere, e.g. between saving a record and acting on it.
    /// The run future is dropped at its next await point, and no call of it lands after the cut.
    Calls(u64),
}

/// Which faults a case may draw.
#[derive(Debug, Clone, Copy)]
pub struct FaultMix {
    /// API errors.
    pub api: bool,
    /// Faults whose outcome depends on timing (NotReady windows, slow terminations).
    pub timing: bool,
    /// Nodes joining.
    pub joins: bool,
}

/// One seeded case.
#[derive(Debug, Clone)]
pub struct Case {
    pub seed: u64,
    pub scenario: Scenario,
    pub cfg: MigrationConfig,
    pub faults: SimFaults,
    pub kills: Vec<Kill>,
    /// Restarted runs take over the lock under a new identity (after it expires) rather than
    /// the dead run's.
    pub new_holder: bool,
}

/// Picks one element (None when empty).
fn one<'a, T, R: Rng>(rng: &mut R, v: &'a [T]) -> Option<&'a T> {
    if v.is_empty() {
        None
    } else {
        v.get(rng.random_range(0..v.len()))
    }
}

/// Draws random faults for `scenario`.
pub fn draw_faults<R: Rng>(rng: &mut R, scenario: &Scenario, mix: FaultMix) -> SimFaults {
    let nodes: Vec<NodeName> = scenario
        .expand_nodes()
        .map(|v| v.into_iter().map(|n| n.name).collect())
        .unwrap_or_default();
    let movable: Vec<String> = scenario
        .workloads
        .iter()
        .filter(|w| matches!(w.kind, WorkloadKind::Deployment | WorkloadKind::StatefulSet))
        .filter(|w| w.replica_count() > 0)
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect();
    let mut f = SimFaults::default();
    if mix.api && rng.random_bool(0.5) {
        f.api_error_ppm = [5_000, 20_000, 50_000, 100_000][rng.random_range(0..4)];
    }
    if rng.random_bool(0.2) {
        f.agent_never_ready.extend(one(rng, &nodes).cloned());
    }
    if rng.random_bool(0.15) {
        f.blocked_evictions.extend(one(rng, &movable).cloned());
    }
    if rng.random_bool(0.15) {
        f.verify_fails.extend(one(rng, &nodes).cloned());
    }
    if mix.timing
        && rng.random_bool(0.15)
        && let Some(n) = one(rng, &nodes)
    {
        let at = Time(rng.random_range(0..600_000));
        let back = at.after(Duration::from_millis(rng.random_range(30_000..300_000)));
        f.node_not_ready_at.push((n.clone(), at));
        f.node_ready_at.push((n.clone(), back));
    }
    if mix.timing && rng.random_bool(0.15) {
        f.slow_termination_pods.extend(one(rng, &movable).cloned());
        f.slow_termination = Duration::from_millis(rng.random_range(60_000..900_000));
    }
    if mix.joins && rng.random_bool(0.15) {
        let zones: Vec<Option<String>> = scenario
            .expand_nodes()
            .map(|v| v.into_iter().map(|n| n.zone).collect())
            .unwrap_or_default();
        for k in 0..rng.random_range(1..=2u32) {
            f.node_joins.push(NodeJoin {
                name: NodeName::new(format!("joined-{k}")).unwrap(),
                at: Time(rng.random_range(10_000..900_000)),
                zone: one(rng, &zones).cloned().flatten(),
                control_plane: rng.random_bool(0.1),
            });
        }
    }
    f
}

/// The migration config for a case.
pub fn draw_config<R: Rng>(rng: &mut R) -> MigrationConfig {
    let mut cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
    cfg.max_in_flight = rng.random_range(1..=4);
    cfg.on_node_failure = if rng.random_bool(0.5) {
        FailurePolicy::RollbackAndStop
    } else {
        FailurePolicy::RollbackAndContinue
    };
    cfg.poll_interval = Duration::from_secs(2);
    cfg.drain_timeout = Duration::from_secs(rng.random_range(4..=10) * 60);
    cfg.step_timeout = Duration::from_secs(rng.random_range(2..=5) * 60);
    cfg
}

/// Drops the run future at its first await point after the simulator cut it off.
struct UntilCutOff<'a, F> {
    sim: &'a SimCluster,
    fut: Pin<Box<F>>,
}

impl<F: Future> Future for UntilCutOff<'_, F> {
    type Output = Option<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.sim.is_cut_off() {
            return Poll::Ready(None);
        }
        match self.fut.as_mut().poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending if self.sim.is_cut_off() => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// What driving a case produced.
#[derive(Debug, Default)]
pub struct Driven {
    /// The last run's report (the one that was not killed).
    pub report: Option<RunReport>,
    /// Events of every run, in order.
    pub events: Vec<Event>,
    /// Kills that happened.
    pub kills: usize,
    /// Runs refused with `RunError::Locked` naming the dead run.
    pub locked_out: usize,
    /// Restarts whose new plan failed preflight only on `agent-room` (see `drive`).
    pub agent_room_on_resume: usize,
    /// What went wrong while driving.
    pub problems: Vec<String>,
    /// Whether each node was cordoned before anything ran.
    pub cordoned_before: BTreeMap<NodeName, bool>,
    /// The nodes of the first plan (the sim's scope).
    pub scope: Vec<NodeName>,
    /// Nodes the first plan skipped.
    pub skipped: Vec<NodeName>,
}

/// Builds the simulator for a case (faults set, write-ahead checked, Cilium not installed).
pub fn build(case: &Case) -> Result<SimCluster, String> {
    let sim = SimCluster::new(case.scenario.clone(), SimParams::default(), case.seed)
        .map_err(|e| format!("generated scenario rejected: {e}"))?;
    sim.set_faults(case.faults.clone())
        .map_err(|e| format!("faults rejected: {e}"))?;
    sim.check_write_ahead(true);
    Ok(sim)
}

/// Plans, installs Cilium and runs the case to the end, killing and restarting the run as the
/// case says.
pub async fn drive(sim: &SimCluster, case: &Case) -> Driven {
    let mut out = Driven {
        cordoned_before: sim
            .node_list()
            .into_iter()
            .filter_map(|n| sim.node(&n).map(|x| (n, x.unschedulable)))
            .collect(),
        ..Driven::default()
    };
    let events = Mutex::new(Vec::<Event>::new());
    let sink = |e: &Event| {
        events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e.clone())
    };
    let mut kills = case.kills.iter().copied();
    let mut holder_n = 0u32;
    let mut installed = false;
    let mut pending_kill: Option<Kill> = kills.next();
    let mut last_holder: Option<String> = None;
    let mut first_plan: Option<cnimig::core::plan::Plan> = None;
    for _attempt in 0..64 {
        if case.new_holder || holder_n == 0 {
            holder_n += 1;
        }
        let holder = format!("cnimig-run-{holder_n}");
        let opts = RunOptions {
            holder: holder.clone(),
            max_ticks: match pending_kill {
                Some(Kill::Ticks(t)) => Some(t),
                _ => Some(200_000),
            },
            ..RunOptions::default()
        };
        let orch = Orchestrator::new(Ports::from_one(sim.clone()), case.cfg.clone(), opts);
        let mut plan = match orch.plan().await {
            Ok((_, p)) => p,
            Err(e) => {
                out.problems.push(format!("plan failed: {e}"));
                break;
            }
        };
        // Known preflight limitation: `agent-room` counts the Cilium agent already running on a
        // node against the room it needs, so a restarted run's new plan can fail it. Such a
        // restart goes on with the first plan, and the tally counts it.
        if installed
            && !plan.preflight.ok()
            && plan.preflight.failures().all(|c| c.id == "agent-room")
            && let Some(first) = &first_plan
        {
            out.agent_room_on_resume += 1;
            plan = first.clone();
        }
        if !plan.preflight.ok() {
            let f: Vec<String> = plan
                .preflight
                .failures()
                .map(|c| format!("[{}] {}", c.id, c.message))
                .collect();
            out.problems.push(format!(
                "{} plan fails preflight: {f:?}",
                if installed { "a resumed" } else { "the first" }
            ));
            break;
        }
        if !installed {
            out.scope = plan.order.iter().map(|p| p.name.clone()).collect();
            out.skipped = plan.skipped.iter().map(|s| s.node.clone()).collect();
            if sim.set_scope(out.scope.clone()).is_err() {
                out.problems
                    .push("set_scope refused the plan's nodes".into());
                break;
            }
            sim.set_control_plane_last(case.cfg.control_plane_last);
            if let Err(e) = sim.install_cilium(rendered_config(
                &case.cfg,
                plan.inputs,
                CiliumPhase::Migration,
            )) {
                out.problems.push(format!("install: {e}"));
                break;
            }
            installed = true;
            first_plan = Some(plan.clone());
        }
        let result = match pending_kill {
            Some(Kill::Calls(n)) => {
                sim.cut_off_after(Some(n));
                let r = UntilCutOff {
                    sim,
                    fut: Box::pin(orch.run(&plan, &sink)),
                }
                .await;
                let cut = sim.is_cut_off();
                sim.cut_off_after(None);
                match r {
                    None => {
                        out.kills += 1;
                        pending_kill = kills.next();
                        last_holder = Some(holder);
                        continue;
                    }
                    // Cut off, and gave up on its own: the same as dying.
                    Some(Err(RunError::Port(_))) if cut => {
                        out.kills += 1;
                        pending_kill = kills.next();
                        last_holder = Some(holder);
                        continue;
                    }
                    Some(r) => r,
                }
            }
            _ => orch.run(&plan, &sink).await,
        };
        match result {
            Ok(r) if r.interrupted => {
                if !matches!(pending_kill, Some(Kill::Ticks(_))) {
                    out.problems
                        .push("the run did not finish within 200,000 looks (a livelock?)".into());
                    break;
                }
                out.kills += 1;
                pending_kill = kills.next();
                last_holder = Some(holder);
            }
            Ok(r) => {
                out.report = Some(r);
                break;
            }
            Err(RunError::Locked { holder: h, until }) => {
                // Only a dead run can hold it (the last one, or an earlier one if the last died
                // before it took the lock).
                if last_holder.is_none() || h == holder {
                    out.problems
                        .push(format!("run {holder} locked out by {h}, not by a dead run"));
                    break;
                }
                out.locked_out += 1;
                // The dead run's lock expires; the next run takes it over.
                sim.advance_to(until.after(Duration::from_millis(1)));
                holder_n += 1;
                if !case.new_holder {
                    holder_n -= 1;
                }
            }
            Err(e) => {
                out.problems.push(format!("run failed: {e}"));
                break;
            }
        }
    }
    if out.report.is_none() && out.problems.is_empty() {
        out.problems.push("the run never finished".into());
    }
    out.events = events.into_inner().unwrap_or_else(|p| p.into_inner());
    out
}

/// Checks the end state of every node against the invariants; returns the problems.
pub fn check(sim: &SimCluster, case: &Case, d: &Driven) -> Vec<String> {
    let mut out: Vec<String> = d.problems.clone();
    // 1, 2, 4 and write-ahead: the simulator's own checks after every step.
    out.extend(sim.violations().iter().map(ToString::to_string));
    let Some(report) = &d.report else {
        return out;
    };
    let label = &case.cfg.migration_label;
    let ops = sim.op_log();
    let touched: BTreeSet<&NodeName> = ops.iter().map(|o| &o.node).collect();
    let mut reported: BTreeSet<NodeName> = BTreeSet::new();
    for n in &report.nodes {
        reported.insert(n.node.clone());
        let Some(node) = sim.node(&n.node) else {
            out.push(format!(
                "{} is in the report but not in the cluster",
                n.node
            ));
            continue;
        };
        let cni = sim.node_cni(&n.node);
        let labelled = node.labels.get(label).is_some_and(|v| v == "true");
        let agent_cfg = sim.node_agent(&n.node).and_then(|a| a.node_config);
        let before = d.cordoned_before.get(&n.node).copied().unwrap_or(false);
        let pods = sim.pods_on(&n.node);
        let on_cilium: Vec<String> = pods
            .iter()
            .filter(|p| !p.host_network && !p.mirror && p.network == PodNetwork::Cilium)
            .filter(|p| !p.terminating)
            .map(|p| p.pod.to_string())
            .collect();
        match n.phase {
            Phase::Done => {
                // 5: every pod on the pod network is Cilium-managed; the node is Cilium's.
                if !sim.is_fully_migrated(&n.node) {
                    out.push(format!("{} is Done but still has pods off Cilium", n.node));
                }
                if cni != Some(CniDirState::CILIUM) || !labelled {
                    out.push(format!(
                        "{} is Done but its CNI dir is {cni:?} and labelled={labelled}",
                        n.node
                    ));
                }
                if node.unschedulable != before {
                    out.push(format!(
                        "{} is Done but cordoned={} (was {before})",
                        n.node, node.unschedulable
                    ));
                }
            }
            Phase::RolledBack => {
                // Back on Calico as it was.
                if cni != Some(CniDirState::CALICO) {
                    out.push(format!("{} rolled back but its CNI dir is {cni:?}", n.node));
                }
                if labelled {
                    out.push(format!("{} rolled back but still carries {label}", n.node));
                }
                if agent_cfg.is_some() {
                    out.push(format!(
                        "{} rolled back but its agent still runs with node config {agent_cfg:?}",
                        n.node
                    ));
                }
                if !on_cilium.is_empty() {
                    out.push(format!(
                        "{} rolled back but pods are still on Cilium there: {on_cilium:?}",
                        n.node
                    ));
                }
                if node.unschedulable != before {
                    out.push(format!(
                        "{} rolled back but cordoned={} (was {before})",
                        n.node, node.unschedulable
                    ));
                }
                if n.cause.as_deref().is_none_or(|c| !c.starts_with("step ")) {
                    out.push(format!(
                        "{} rolled back without a cause naming the step: {:?}",
                        n.node, n.cause
                    ));
                }
            }
            Phase::Pending if report.stopped.is_some() => {
                // Never started after the stop: untouched.
                if touched.contains(&n.node) {
                    out.push(format!("{} was never started but was acted on", n.node));
                }
                if sim.annotation(&n.node).is_some() {
                    out.push(format!("{} was never started but has a record", n.node));
                }
            }
            other => out.push(format!("{} ended {other:?} ({:?})", n.node, n.cause)),
        }
    }
    // The stop names the node, the step and the cause, in one line.
    let failed: Vec<&NodeName> = report
        .nodes
        .iter()
        .filter(|n| n.phase == Phase::RolledBack)
        .map(|n| &n.node)
        .collect();
    if case.cfg.on_node_failure == FailurePolicy::RollbackAndStop && !failed.is_empty() {
        match &report.stopped {
            None => out.push(format!(
                "{failed:?} rolled back under rollback-and-stop but the run did not stop"
            )),
            Some(why) => {
                if why.contains('\n')
                    || !failed.iter().any(|n| why.contains(n.as_str()))
                    || !why.contains("step ")
                {
                    out.push(format!(
                        "the stop reason is not one line naming the node and the step: {why:?}"
                    ));
                }
            }
        }
    }
    if case.cfg.on_node_failure == FailurePolicy::RollbackAndContinue && report.stopped.is_some() {
        out.push(format!(
            "rollback-and-continue stopped: {:?}",
            report.stopped
        ));
    }
    // Skipped nodes are untouched.
    for s in &report.skipped {
        reported.insert(s.node.clone());
        if touched.contains(&s.node) {
            out.push(format!("skipped node {} was acted on", s.node));
        }
    }
    // Every node that joined is migrated or reported.
    for s in &report.joined_not_migrated {
        reported.insert(s.node.clone());
    }
    for n in sim.node_list() {
        // A node that joined after the run's last look for joined nodes (during its final
        // cluster check or while it released its lock) is not its business.
        let late = case
            .faults
            .node_joins
            .iter()
            .any(|j| j.name == n && j.at > report.joins_checked);
        if !reported.contains(&n) && !late {
            out.push(format!("node {n} is neither migrated nor reported"));
        }
    }
    // The run and its restarts never repeated a disruptive step on a migrated node: one agent
    // restart, and no pod evicted off Cilium there.
    let mut restarts: BTreeMap<&NodeName, usize> = BTreeMap::new();
    for op in &ops {
        match &op.kind {
            OpKind::RestartAgent { .. } => *restarts.entry(&op.node).or_default() += 1,
            OpKind::Evict {
                network: PodNetwork::Cilium,
                accepted: true,
                pod,
            } if report
                .nodes
                .iter()
                .any(|n| n.node == op.node && n.phase == Phase::Done) =>
            {
                out.push(format!(
                    "pod {pod} was evicted off Cilium on {}, which ended Done",
                    op.node
                ));
            }
            _ => {}
        }
    }
    for n in report.nodes.iter().filter(|n| n.phase == Phase::Done) {
        let r = restarts.get(&n.node).copied().unwrap_or(0);
        if r != 1 {
            out.push(format!("{} is Done after {r} agent restarts", n.node));
        }
    }
    out
}

/// Fault counts over runs.
#[derive(Debug, Default)]
pub struct Tally {
    pub runs: u64,
    pub kills: u64,
    pub locked_out: u64,
    pub agent_room_on_resume: u64,
    pub faults: BTreeMap<FaultKind, u64>,
    pub done: u64,
    pub rolled_back: u64,
    pub not_started: u64,
    pub violations: u64,
    pub failing: Vec<(u64, Vec<String>)>,
    /// Evictions the API accepted over the runs.
    pub evictions: u64,
    /// The same for the reference runs a comparison was made against.
    pub reference_evictions: u64,
}

impl Tally {
    pub fn add(&mut self, seed: u64, sim: &SimCluster, d: &Driven, problems: Vec<String>) {
        self.runs += 1;
        self.kills += d.kills as u64;
        self.locked_out += d.locked_out as u64;
        self.agent_room_on_resume += d.agent_room_on_resume as u64;
        self.evictions += sim.stats().evictions_accepted;
        for (k, v) in sim.stats().faults_injected {
            *self.faults.entry(k).or_default() += v;
        }
        if let Some(r) = &d.report {
            self.done += r.count(Phase::Done) as u64;
            self.rolled_back += r.count(Phase::RolledBack) as u64;
            self.not_started += r.count(Phase::Pending) as u64;
        }
        if !problems.is_empty() {
            self.violations += problems.len() as u64;
            self.failing.push((seed, problems));
        }
    }

    pub fn merge(&mut self, o: Tally) {
        self.runs += o.runs;
        self.kills += o.kills;
        self.locked_out += o.locked_out;
        self.agent_room_on_resume += o.agent_room_on_resume;
        for (k, v) in o.faults {
            *self.faults.entry(k).or_default() += v;
        }
        self.done += o.done;
        self.rolled_back += o.rolled_back;
        self.not_started += o.not_started;
        self.violations += o.violations;
        self.failing.extend(o.failing);
        self.evictions += o.evictions;
        self.reference_evictions += o.reference_evictions;
    }

    pub fn faults_line(&self) -> String {
        FaultKind::ALL
            .iter()
            .map(|k| format!("{k} {}", self.faults.get(k).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Seeds: `CNIMIG_SEED=S` replays one; otherwise `var` (default `default`) cases from 0.
pub fn seeds(var: &str, default: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("CNIMIG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let n: u64 = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    (0..n).collect()
}

/// Runs `f` over `seeds` on up to four threads (two on this machine), each with a
/// current-thread runtime; the results by seed, in seed order. Each case draws everything from
/// its seed, so the threads do not change any result.
pub fn map_seeds<T, F, Fut>(seeds: &[u64], f: F) -> Vec<(u64, T)>
where
    T: Send,
    F: Fn(u64) -> Fut + Sync,
    Fut: Future<Output = T>,
{
    let out = Mutex::new(Vec::with_capacity(seeds.len()));
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4);
    std::thread::scope(|s| {
        for t in 0..threads {
            let out = &out;
            let f = &f;
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .expect("runtime");
                let mine: Vec<(u64, T)> = seeds
                    .iter()
                    .skip(t)
                    .step_by(threads)
                    .map(|seed| (*seed, rt.block_on(f(*seed))))
                    .collect();
                out.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
            });
        }
    });
    let mut v = out.into_inner().unwrap_or_else(|p| p.into_inner());
    v.sort_by_key(|(s, _)| *s);
    v
}

/// [`map_seeds`], the tallies merged.
pub fn run_all<F, Fut>(seeds: &[u64], f: F) -> Tally
where
    F: Fn(u64) -> Fut + Sync,
    Fut: Future<Output = Tally>,
{
    let mut t = Tally::default();
    for (_, one) in map_seeds(seeds, f) {
        t.merge(one);
    }
    t.failing.sort_by_key(|(s, _)| *s);
    t
}

/// The random cluster for a seed: mostly small, one in ten up to 40 nodes.
pub fn draw_scenario<R: Rng>(rng: &mut R) -> Scenario {
    let max_nodes = if rng.random_bool(0.1) { 40 } else { 10 };
    Scenario::random(rng, &RandomSpec::new(max_nodes))
}

/// Prints a case's faults, events, operations and end state (`CNIMIG_DEBUG=1` with one seed).
pub fn dump(sim: &SimCluster, case: &Case, d: &Driven) {
    println!("config: {:?}", case.cfg);
    println!("faults: {:?}\nkills: {:?}", case.faults, case.kills);
    for e in &d.events {
        if !matches!(e, Event::Retrying { .. } | Event::Progress { .. }) {
            println!("event {e:?}");
        }
    }
    for o in sim.op_log() {
        println!("op [{}] {} {:?}", o.time, o.node, o.kind);
    }
    for l in sim.describe_nodes() {
        println!("node {l}");
    }
    println!("report: {:#?}", d.report);
}
