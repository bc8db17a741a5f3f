//! Crash and resume (DESIGN.md invariants 6 and 7): a run killed at random points and started
//! again ends in the same state as a run never killed, without repeating a disruptive step; two
//! runs started together never both act; a lock whose holder died is taken over, and a holder
//! that lost its lock stops acting.
//!
//! - `CNIMIG_RESUME_CASES=N` sets how many random clusters the kill property runs (default 1,000).
//! - `CNIMIG_SEED=S` replays one; a failing case prints its seed.

#![allow(clippy::expect_used, clippy::panic)] // helpers outside #[test] functions

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cnimig::core::cilium::{CiliumPhase, rendered_config};
use cnimig::core::config::{FailurePolicy, MigrationConfig};
use cnimig::core::events::Discard;
use cnimig::core::machine::{NodeRecord, Phase};
use cnimig::core::model::{NodeName, Time};
use cnimig::core::orchestrator::{Orchestrator, Ports, RunError, RunOptions, RunReport};
use cnimig::core::ports::{Clock, LockOutcome, PortError, StateStore};
use cnimig::sim::{OpKind, Scenario, SimCluster, SimFaults, SimParams};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use support::{Case, FaultMix, Kill, Tally};

/// The case for a seed: a random cluster, faults whose outcome does not depend on timing (agents
/// that never become Ready, evictions blocked forever, verification failing), and one to four
/// kills at random points. Rollback-and-stop runs one node at a time, so which nodes started
/// before the stop does not depend on timing either.
fn case(seed: u64) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7e57_a127);
    let scenario = support::draw_scenario(&mut rng);
    let mut cfg = support::draw_config(&mut rng);
    if cfg.on_node_failure == FailurePolicy::RollbackAndStop {
        cfg.max_in_flight = 1;
    }
    let faults = if rng.random_bool(0.5) {
        support::draw_faults(
            &mut rng,
            &scenario,
            FaultMix {
                api: false,
                timing: false,
                joins: false,
            },
        )
    } else {
        SimFaults::default()
    };
    let kills = (0..rng.random_range(1..=4))
        .map(|_| {
            if rng.random_bool(0.5) {
                Kill::Ticks(rng.random_range(1..150))
            } else {
                Kill::Calls(rng.random_range(1..1_500))
            }
        })
        .collect();
    Case {
        seed,
        scenario,
        cfg,
        faults,
        kills,
        new_holder: rng.random_bool(0.5),
    }
}

/// Per node: its phase, cordon, migration label, CNI dir and whether its agent runs with the node
/// config; then its structural operations (cordon, label, agent restart, uncordon, restore,
/// unlabel) with repeats of the same operation in a row collapsed.
type EndState = BTreeMap<NodeName, (String, Vec<&'static str>)>;

fn end_state(sim: &SimCluster, report: &RunReport, label: &str) -> EndState {
    let mut ops: BTreeMap<NodeName, Vec<&'static str>> = BTreeMap::new();
    for op in sim.op_log() {
        let k = match op.kind {
            OpKind::Cordon => "cordon",
            OpKind::Label { .. } => "label",
            OpKind::RestartAgent { .. } => "restart-agent",
            OpKind::Uncordon => "uncordon",
            OpKind::RestoreCni => "restore-cni",
            OpKind::Unlabel { .. } => "unlabel",
            OpKind::Evict { .. } | OpKind::Delete { .. } => continue,
        };
        let v = ops.entry(op.node).or_default();
        if v.last() != Some(&k) {
            v.push(k);
        }
    }
    let phases: BTreeMap<&NodeName, Phase> =
        report.nodes.iter().map(|n| (&n.node, n.phase)).collect();
    sim.node_list()
        .into_iter()
        .map(|n| {
            let node = sim.node(&n);
            let state = format!(
                "phase={:?} cordoned={:?} labelled={:?} cni={:?} agent-config={:?}",
                phases.get(&n),
                node.as_ref().map(|x| x.unschedulable),
                node.as_ref().map(|x| x.labels.contains_key(label)),
                sim.node_cni(&n),
                sim.node_agent(&n).map(|a| a.node_config.is_some()),
            );
            let o = ops.remove(&n).unwrap_or_default();
            (n, (state, o))
        })
        .collect()
}

/// The record `node` has in the simulator's store now.
async fn stored(sim: &SimCluster, node: &NodeName) -> NodeRecord {
    sim.load()
        .await
        .expect("records")
        .remove(node)
        .expect("record")
}

async fn run_case(seed: u64) -> Tally {
    let killed = case(seed);
    let mut t = Tally::default();
    let mut problems = Vec::new();
    // The same case never killed.
    let calm = Case {
        kills: Vec::new(),
        ..killed.clone()
    };
    let (sim_a, sim_b) = match (support::build(&calm), support::build(&killed)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            t.runs += 1;
            t.violations += 1;
            t.failing.push((seed, vec![e]));
            return t;
        }
    };
    let a = support::drive(&sim_a, &calm).await;
    let b = support::drive(&sim_b, &killed).await;
    problems.extend(
        support::check(&sim_a, &calm, &a)
            .into_iter()
            .map(|p| format!("never killed: {p}")),
    );
    problems.extend(
        support::check(&sim_b, &killed, &b)
            .into_iter()
            .map(|p| format!("killed: {p}")),
    );
    if let (Some(ra), Some(rb)) = (&a.report, &b.report) {
        let label = &killed.cfg.migration_label;
        let (ea, eb) = (end_state(&sim_a, ra, label), end_state(&sim_b, rb, label));
        for (node, (sa, oa)) in &ea {
            match eb.get(node) {
                None => problems.push(format!("{node} missing after the killed run")),
                Some((sb, ob)) => {
                    if sa != sb {
                        problems.push(format!("{node}: never killed {sa}, killed {sb}"));
                    }
                    if oa != ob {
                        problems.push(format!(
                            "{node}: operations never killed {oa:?}, killed {ob:?} (a step repeated or skipped)"
                        ));
                    }
                }
            }
        }
        if ra.stopped.is_some() != rb.stopped.is_some() {
            problems.push(format!(
                "stop differs: {:?} vs {:?}",
                ra.stopped, rb.stopped
            ));
        }
    }
    if std::env::var("CNIMIG_DEBUG").is_ok() {
        support::dump(&sim_b, &killed, &b);
    }
    t.add(seed, &sim_b, &b, problems);
    t.reference_evictions += sim_a.stats().evictions_accepted;
    t
}

#[test]
fn a_run_killed_at_random_points_ends_as_one_never_killed() {
    let seeds = support::seeds("CNIMIG_RESUME_CASES", 1_000);
    let t = support::run_all(&seeds, run_case);
    println!(
        "resume: {} random clusters, {} kills ({} restarts locked out until the dead run's lock expired), {} nodes Done, {} RolledBack; {} differing",
        t.runs,
        t.kills,
        t.locked_out,
        t.done,
        t.rolled_back,
        t.failing.len()
    );
    println!(
        "  evictions accepted: {} in the killed runs, {} in the same runs never killed",
        t.evictions, t.reference_evictions
    );
    assert!(t.kills as usize >= seeds.len());
    if let Some((seed, problems)) = t.failing.first() {
        panic!(
            "{} of {} cases differ from the run never killed; first: seed {seed} (replay: CNIMIG_SEED={seed} cargo test --release --test resume):\n  {}",
            t.failing.len(),
            t.runs,
            problems
                .iter()
                .take(12)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
}

// ---------------------------------------------------------------- one run at a time

fn small_cluster(seed: u64) -> (SimCluster, MigrationConfig) {
    let sim = SimCluster::new(Scenario::reference(8), SimParams::default(), seed).expect("sim");
    let mut cfg = MigrationConfig::new("10.245.0.0/16".parse().expect("cidr"));
    cfg.max_in_flight = 2;
    cfg.on_node_failure = FailurePolicy::RollbackAndContinue;
    sim.check_write_ahead(true);
    (sim, cfg)
}

fn orch(sim: &SimCluster, cfg: &MigrationConfig, holder: &str) -> Orchestrator {
    let opts = RunOptions {
        holder: holder.into(),
        ..RunOptions::default()
    };
    Orchestrator::new(Ports::from_one(sim.clone()), cfg.clone(), opts)
}

async fn install(
    sim: &SimCluster,
    o: &Orchestrator,
    cfg: &MigrationConfig,
) -> cnimig::core::plan::Plan {
    let (_, plan) = o.plan().await.expect("plan");
    assert!(plan.preflight.ok());
    sim.install_cilium(rendered_config(cfg, plan.inputs, CiliumPhase::Migration))
        .expect("install");
    plan
}

fn all_done(r: &RunReport) -> bool {
    r.nodes.iter().all(|n| n.phase == Phase::Done)
}

#[tokio::test]
async fn two_runs_started_together_exactly_one_acts() {
    for seed in 0..20u64 {
        let (sim, cfg) = small_cluster(seed);
        let (a, b) = (orch(&sim, &cfg, "run-a"), orch(&sim, &cfg, "run-b"));
        let plan = install(&sim, &a, &cfg).await;
        // Both start at the same instant; which one polls first varies with the seed.
        let (ra, rb) = if seed % 2 == 0 {
            tokio::join!(a.run(&plan, &Discard), b.run(&plan, &Discard))
        } else {
            let (rb, ra) = tokio::join!(b.run(&plan, &Discard), a.run(&plan, &Discard));
            (ra, rb)
        };
        let (winner, loser, other) = match (&ra, &rb) {
            (Ok(w), Err(e)) => (w, e, "run-a"),
            (Err(e), Ok(w)) => (w, e, "run-b"),
            _ => panic!("seed {seed}: expected exactly one run to act: {ra:?} / {rb:?}"),
        };
        match loser {
            RunError::Locked { holder, .. } => assert_eq!(holder, other, "names the holder"),
            e => panic!("seed {seed}: the other run failed with {e}, not Locked"),
        }
        assert!(loser.to_string().contains(other), "{loser}");
        assert!(all_done(winner), "seed {seed}: {winner:?}");
        assert!(
            sim.violations().is_empty(),
            "seed {seed}: {:?}",
            sim.violations()
        );
        assert_eq!(sim.lock_holder(), None, "the winner released the lock");
    }
}

#[tokio::test]
async fn a_dead_runs_lock_is_taken_over_after_it_expires() {
    let (sim, cfg) = small_cluster(3);
    let dead = Orchestrator::new(
        Ports::from_one(sim.clone()),
        cfg.clone(),
        RunOptions {
            holder: "dead".into(),
            max_ticks: Some(40),
            ..RunOptions::default()
        },
    );
    let plan = install(&sim, &dead, &cfg).await;
    let r = dead.run(&plan, &Discard).await.expect("first run");
    assert!(r.interrupted);
    let (holder, until) = sim.lock_holder().expect("a dead run keeps its lock");
    assert_eq!(holder, "dead");
    let next = orch(&sim, &cfg, "next");
    match next.run(&plan, &Discard).await {
        Err(RunError::Locked { holder, until: u }) => {
            assert_eq!((holder.as_str(), u), ("dead", until));
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    assert!(sim.now() < until);
    sim.advance_to(until.after(Duration::from_millis(1)));
    let r = next.run(&plan, &Discard).await.expect("takeover");
    assert!(!r.interrupted && all_done(&r), "{r:?}");
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
    for n in &r.nodes {
        let restarts = sim
            .op_log()
            .iter()
            .filter(|o| o.node == n.node && matches!(o.kind, OpKind::RestartAgent { .. }))
            .count();
        assert_eq!(restarts, 1, "{}", n.node);
    }
}

/// Sleeps on the simulated clock in one-second steps, so that concurrent runs interleave.
async fn pause_until(sim: &SimCluster, t: Time) {
    while sim.now() < t {
        let next = sim.now().after(Duration::from_secs(1)).min(t);
        sim.sleep_until(next).await;
    }
}

/// The state store of one run whose lock renewals fail while `failing` is set (its API server
/// connection is broken for lock calls); everything else passes through.
#[derive(Clone)]
struct FlakyLock {
    sim: SimCluster,
    failing: Arc<AtomicBool>,
}

/// A boxed port future (what `#[async_trait]` generates; the facade's tests do not depend on the
/// macro crate).
type PortFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, PortError>> + Send + 'a>>;

impl StateStore for FlakyLock {
    fn load<'s, 'f>(&'s self) -> PortFuture<'f, BTreeMap<NodeName, NodeRecord>>
    where
        's: 'f,
        Self: 'f,
    {
        Box::pin(self.sim.load())
    }

    fn save<'s, 'n, 'p, 'x, 'f>(
        &'s self,
        node: &'n NodeName,
        prev: Option<&'p NodeRecord>,
        next: &'x NodeRecord,
    ) -> PortFuture<'f, ()>
    where
        's: 'f,
        'n: 'f,
        'p: 'f,
        'x: 'f,
        Self: 'f,
    {
        Box::pin(self.sim.save(node, prev, next))
    }

    fn acquire_lock<'s, 'h, 'f>(
        &'s self,
        holder: &'h str,
        now: Time,
        ttl: Duration,
    ) -> PortFuture<'f, LockOutcome>
    where
        's: 'f,
        'h: 'f,
        Self: 'f,
    {
        if self.failing.load(Ordering::SeqCst) {
            return Box::pin(std::future::ready(Err(PortError::Unavailable {
                what: "renew the lease".into(),
                detail: "connection reset".into(),
            })));
        }
        Box::pin(self.sim.acquire_lock(holder, now, ttl))
    }

    fn release_lock<'s, 'h, 'f>(&'s self, holder: &'h str) -> PortFuture<'f, ()>
    where
        's: 'f,
        'h: 'f,
        Self: 'f,
    {
        Box::pin(self.sim.release_lock(holder))
    }
}

#[tokio::test]
async fn a_run_that_cannot_renew_its_lock_stops_acting_and_yields_to_the_next() {
    let (sim, cfg) = small_cluster(5);
    let failing = Arc::new(AtomicBool::new(false));
    let mut ports = Ports::from_one(sim.clone());
    ports.store = Arc::new(FlakyLock {
        sim: sim.clone(),
        failing: failing.clone(),
    });
    let stale = Orchestrator::new(
        ports,
        cfg.clone(),
        RunOptions {
            holder: "stale".into(),
            ..RunOptions::default()
        },
    );
    let plan = install(&sim, &stale, &cfg).await;
    let next = orch(&sim, &cfg, "next");
    let ttl = RunOptions::default().lock_ttl;
    let stale_run = stale.run(&plan, &Discard);
    let takeover = async {
        // Let the first run get going, then cut its lock renewals. Time moves in small steps so
        // the two runs interleave (a simulated sleep jumps the clock).
        pause_until(&sim, Time(90_000)).await;
        failing.store(true, Ordering::SeqCst);
        let mut expiry = None;
        let report = loop {
            match next.run(&plan, &Discard).await {
                Err(RunError::Locked { holder, until }) => {
                    assert_eq!(holder, "stale");
                    expiry = Some(until);
                    pause_until(&sim, until.after(Duration::from_millis(1))).await;
                }
                other => break other,
            }
        };
        // The first run's connection comes back after the takeover.
        failing.store(false, Ordering::SeqCst);
        (expiry, report)
    };
    let (stale_result, (expiry, next_result)) = tokio::join!(stale_run, takeover);
    // It stops: on seeing the new holder, or (the new run has finished and released the lock)
    // on finding that its own lock expired meanwhile.
    match stale_result {
        Err(RunError::Locked { holder, .. }) => assert_eq!(holder, "next"),
        Err(RunError::LockLost { holder, .. }) => assert_eq!(holder, "stale"),
        other => panic!("the stale run should stop, got {other:?}"),
    }
    let r = next_result.expect("the next run completes");
    assert!(all_done(&r), "{r:?}");
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
    // The stale lock expired at `expiry`; the stale run stopped acting a third of the lock's
    // time-to-live before (its last renewal plus two thirds), so nobody acted in between.
    let expiry = expiry.expect("the next run found the stale run's lock");
    let quiet_from = Time(expiry.0 - u64::try_from((ttl / 3).as_millis()).expect("ms"));
    let acted: Vec<_> = sim
        .op_log()
        .into_iter()
        .filter(|o| o.time >= quiet_from && o.time < expiry)
        .collect();
    assert!(
        acted.is_empty(),
        "acted while its lock was stale: {acted:?}"
    );
}

// ---------------------------------------------------------------- rollbacks across runs

/// Runs `o` one tick at a time (each a run "killed" after one tick and started again a poll
/// interval later, as a resumed run would) until `until` holds for the stored records, at most
/// `max` ticks.
async fn tick_until(
    o: &Orchestrator,
    plan: &cnimig::core::plan::Plan,
    sim: &SimCluster,
    max: usize,
    until: impl Fn(&BTreeMap<NodeName, NodeRecord>) -> bool,
) {
    for _ in 0..max {
        let r = o.run(plan, &Discard).await.expect("run");
        let records = sim.load().await.expect("records");
        if until(&records) {
            return;
        }
        assert!(
            r.interrupted,
            "the run ended before the condition held: {r:?}"
        );
        sim.sleep_until(sim.now().after(Duration::from_secs(2)))
            .await;
    }
    panic!("condition not reached in {max} ticks");
}

fn one_tick(sim: &SimCluster, cfg: &MigrationConfig, opts: RunOptions) -> Orchestrator {
    Orchestrator::new(
        Ports::from_one(sim.clone()),
        cfg.clone(),
        RunOptions {
            max_ticks: Some(1),
            ..opts
        },
    )
}

#[tokio::test]
async fn a_node_that_stays_not_ready_while_rolling_back_ends_failed_naming_node_step_and_cause() {
    let (sim, mut cfg) = small_cluster(5);
    // Long enough for the agent's restart (its old pod's termination and the new one's start,
    // up to a minute each in the simulator), timed from the restart request.
    cfg.step_timeout = Duration::from_secs(120);
    let limit = Duration::from_secs(120);
    let opts = RunOptions {
        rollback_not_ready_limit: Some(limit),
        ..RunOptions::default()
    };
    let stepper = one_tick(&sim, &cfg, opts.clone());
    let plan = install(&sim, &stepper, &cfg).await;
    let victim = plan.order[0].name.clone();
    // Verification fails on the victim: it rolls back from PodsRestarted, with pods on Cilium and
    // Cilium's CNI config to undo.
    let mut faults = SimFaults::default();
    faults.verify_fails.insert(victim.clone());
    sim.set_faults(faults.clone()).expect("faults");
    let v = victim.clone();
    tick_until(&stepper, &plan, &sim, 2_000, |r| {
        r.get(&v).is_some_and(|r| r.phase == Phase::RollingBack)
    })
    .await;
    // Its kubelet stops now, for good.
    let down = sim.now();
    faults.node_not_ready_at.push((victim.clone(), down));
    sim.set_faults(faults).expect("faults");
    let full = Orchestrator::new(Ports::from_one(sim.clone()), cfg.clone(), opts);
    let report = full.run(&plan, &Discard).await.expect("run");
    assert!(!report.interrupted);
    let out = report
        .nodes
        .iter()
        .find(|n| n.node == victim)
        .expect("victim in the report");
    assert_eq!(out.phase, Phase::Failed, "{report:?}");
    let cause = out.cause.clone().unwrap_or_default();
    assert!(
        cause.contains(&format!("node {victim} NotReady for more than")),
        "{cause}"
    );
    assert!(cause.contains("rollback step"), "{cause}");
    assert!(
        cause.contains("step Verify"),
        "names the original cause: {cause}"
    );
    assert!(!cause.contains('\n'), "one line: {cause}");
    // Given up on after the NotReady limit (plus a poll or two), not after a rollback step's
    // drain-plus-step limit.
    let rec = stored(&sim, &victim).await;
    let gave_up = rec.since.since(down);
    assert!(
        gave_up >= limit && gave_up <= limit + Duration::from_secs(30),
        "failed {gave_up:?} after going NotReady"
    );
    // The others went on (RollbackAndContinue) to an end: migrated, or rolled back where the
    // victim's unready pods left a budget without a disruption to spare.
    assert!(
        report
            .nodes
            .iter()
            .filter(|n| n.node != victim)
            .all(|n| matches!(n.phase, Phase::Done | Phase::RolledBack)),
        "{report:?}"
    );
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

#[tokio::test]
async fn a_later_run_retries_rolled_back_nodes_only_when_asked() {
    // The first run stops at the node that failed (so the control-plane nodes, which go last,
    // are still pending when the retried worker migrates).
    let (sim, mut cfg) = small_cluster(6);
    cfg.on_node_failure = FailurePolicy::RollbackAndStop;
    let first = orch(&sim, &cfg, "first");
    let plan = install(&sim, &first, &cfg).await;
    let victim = plan.order[1].name.clone();
    let mut faults = SimFaults::default();
    faults.verify_fails.insert(victim.clone());
    sim.set_faults(faults).expect("faults");
    let r = first.run(&plan, &Discard).await.expect("first run");
    let phase =
        |r: &RunReport, n: &NodeName| r.nodes.iter().find(|x| &x.node == n).map(|x| x.phase);
    assert_eq!(phase(&r, &victim), Some(Phase::RolledBack), "{r:?}");
    let done_first: Vec<NodeName> = r
        .nodes
        .iter()
        .filter(|n| n.phase == Phase::Done)
        .map(|n| n.node.clone())
        .collect();
    // The cause is fixed.
    sim.set_faults(SimFaults::default()).expect("faults");
    // By default a later run leaves it rolled back and touches nothing.
    let ops = sim.op_log().len();
    let (_, plan2) = first.plan().await.expect("plan");
    let r = orch(&sim, &cfg, "second")
        .run(&plan2, &Discard)
        .await
        .expect("second run");
    assert_eq!(phase(&r, &victim), Some(Phase::RolledBack), "{r:?}");
    assert!(r.stopped.is_some(), "{r:?}");
    assert!(
        sim.op_log()[ops..].iter().all(|o| o.node != victim),
        "the default run acted on the rolled-back node"
    );
    let ops = sim.op_log().len();
    // With retry_rolled_back it migrates it.
    let retry = Orchestrator::new(
        Ports::from_one(sim.clone()),
        cfg.clone(),
        RunOptions {
            holder: "third".into(),
            retry_rolled_back: true,
            ..RunOptions::default()
        },
    );
    let r = retry.run(&plan2, &Discard).await.expect("third run");
    assert!(all_done(&r), "{r:?}");
    assert!(sim.is_fully_migrated(&victim));
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
    let rec = sim.load().await.expect("records");
    assert_eq!(rec.get(&victim).map(|r| r.phase), Some(Phase::Done));
    // Nodes already Done were not touched again: no operation of the retry run names them.
    assert!(!done_first.is_empty());
    assert!(
        sim.op_log()[ops..]
            .iter()
            .all(|o| !done_first.contains(&o.node)),
        "the retry run acted on a node already Done"
    );
}

/// A plain run writes a node's record ahead of what a resumed run could not see for itself (the
/// start with whether the node was cordoned before, which the cordon carries; the agent pod to
/// replace, from whose restart request the later steps are timed, which the label carries; the
/// end, which the uncordon carries), and not for the steps a look finds complete (issue #5: a
/// record write is an API request). Every cordon, label and uncordon goes in a record's write,
/// and each write still leads its action (`check_write_ahead`).
#[tokio::test]
async fn a_plain_run_writes_each_record_only_ahead_of_what_a_resume_could_not_see() {
    let (sim, cfg) = small_cluster(11);
    let o = orch(&sim, &cfg, "run");
    let plan = install(&sim, &o, &cfg).await;
    let calls = |names: &[&str]| {
        let stats = sim.stats();
        names
            .iter()
            .map(|n| stats.api_calls.get(*n).copied().unwrap_or(0))
            .sum::<u64>()
    };
    let saves = ["StateStore::save", "StateStore::save_with"];
    let node_writes = ["Cluster::set_unschedulable", "Cluster::set_node_label"];
    let (saved, changed) = (calls(&saves), calls(&node_writes));
    let r = o.run(&plan, &Discard).await.expect("run");
    assert!(all_done(&r), "{r:?}");
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
    let nodes = u64::try_from(r.nodes.len()).expect("count");
    assert_eq!(
        calls(&saves) - saved,
        3 * nodes,
        "record saves for {nodes} nodes (start with the cordon, agent to replace with the label, done with the uncordon)"
    );
    assert_eq!(
        calls(&node_writes) - changed,
        0,
        "a cordon, label or uncordon written apart from its record"
    );
}

/// A drain that never finishes times out although every run is stopped after one look and
/// started again: the drain is timed from the cordon's stored record, not from each resumed
/// run's first look at the cordoned node.
#[tokio::test]
async fn a_stuck_drain_times_out_across_runs_restarted_every_look() {
    let (sim, mut cfg) = small_cluster(5);
    cfg.drain_timeout = Duration::from_secs(60);
    let stepper = one_tick(&sim, &cfg, RunOptions::default());
    let plan = install(&sim, &stepper, &cfg).await;
    let victim = plan.order[0].name.clone();
    let stuck = sim
        .pods()
        .into_iter()
        .find(|p| p.node.as_ref() == Some(&victim) && p.is_drainable())
        .expect("a drainable pod on the first node");
    let mut faults = SimFaults::default();
    faults.blocked_evictions.insert(stuck.pod.to_string());
    sim.set_faults(faults).expect("faults");
    let v = victim.clone();
    tick_until(&stepper, &plan, &sim, 200, |r| {
        r.get(&v).is_some_and(|r| r.rollback.is_some())
    })
    .await;
    let rec = stored(&sim, &victim).await;
    let cause = rec.rollback.map(|rb| rb.cause).unwrap_or_default();
    assert!(
        cause.contains("step Drain: not finished after 60s"),
        "{cause}"
    );
}
