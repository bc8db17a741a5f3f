//! Property tests of DESIGN.md's invariants: random clusters migrated end to end by the real
//! orchestrator over the simulator, with every invariant checked after every step (by the
//! simulator) and at the end (here).
//!
//! - `CNIMIG_CASES=N` sets how many random clusters (default 2,000).
//! - `CNIMIG_SEED=S` replays one case; a failing case prints its seed.
//!
//! Each case is a seed: the seed draws the cluster (1 to 200 nodes, random workloads, replica
//! counts, PDBs by count and percent, DaemonSets, hostNetwork, hostPort and static pods,
//! pre-cordoned and NotReady nodes) and the run's settings, and seeds the simulation's timings.

// Test and benchmark code may panic on a broken fixture.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

mod support;

use cnimig::core::cilium::{CiliumPhase, rendered_config};
use cnimig::core::config::{FailurePolicy, MigrationConfig};
use cnimig::core::events::Event;
use cnimig::core::machine::Phase;
use cnimig::core::model::{NodeName, Time};
use cnimig::core::orchestrator::{Orchestrator, PickFn, Ports, RunOptions};
use cnimig::core::ports::BudgetView;
use cnimig::core::schedule::{InFlightNode, Limits, PendingNode, Picks, pick};
use cnimig::sim::{OpKind, RandomSpec, Scenario, SimCluster, SimParams, ViolationKind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What one case found.
#[derive(Debug, Default)]
struct Outcome {
    nodes: usize,
    problems: Vec<String>,
    kinds: Vec<ViolationKind>,
}

fn case_settings(seed: u64) -> (Scenario, MigrationConfig) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Most cases are small (fast, and where corner cases live); one in five goes up to 200 nodes.
    let max_nodes = if rng.random_bool(0.2) { 200 } else { 40 };
    let scenario = Scenario::random(&mut rng, &RandomSpec::new(max_nodes));
    let mut cfg = MigrationConfig::new("10.245.0.0/16".parse().expect("static CIDR"));
    cfg.max_in_flight = rng.random_range(1..=12);
    cfg.on_node_failure = FailurePolicy::RollbackAndContinue;
    cfg.poll_interval = Duration::from_secs(2);
    (scenario, cfg)
}

async fn run_case(seed: u64, scheduler: PickFn) -> Outcome {
    let (scenario, cfg) = case_settings(seed);
    let mut out = Outcome::default();
    let sim = match SimCluster::new(scenario, SimParams::default(), seed) {
        Ok(s) => s,
        Err(e) => {
            out.problems
                .push(format!("generated scenario rejected: {e}"));
            return out;
        }
    };
    let before: BTreeMap<NodeName, bool> = sim
        .node_list()
        .into_iter()
        .filter_map(|n| sim.node(&n).map(|x| (n, x.unschedulable)))
        .collect();
    let opts = RunOptions {
        scheduler,
        ..RunOptions::default()
    };
    let orch = Orchestrator::new(Ports::from_one(sim.clone()), cfg.clone(), opts);
    let plan = match orch.plan().await {
        Ok((_, p)) => p,
        Err(e) => {
            out.problems.push(format!("plan failed: {e}"));
            return out;
        }
    };
    if !plan.preflight.ok() {
        let f: Vec<String> = plan
            .preflight
            .failures()
            .map(|c| format!("[{}] {}", c.id, c.message))
            .collect();
        out.problems
            .push(format!("generated cluster fails preflight: {f:?}"));
        return out;
    }
    let scope: Vec<NodeName> = plan.order.iter().map(|p| p.name.clone()).collect();
    out.nodes = scope.len();
    if sim.set_scope(scope.clone()).is_err() {
        out.problems
            .push("set_scope refused the plan's nodes".into());
        return out;
    }
    sim.set_control_plane_last(cfg.control_plane_last);
    if let Err(e) = sim.install_cilium(rendered_config(&cfg, plan.inputs, CiliumPhase::Migration)) {
        out.problems.push(format!("install: {e}"));
        return out;
    }
    let events = Mutex::new(Vec::<Event>::new());
    let sink = |e: &Event| {
        events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e.clone())
    };
    let report = match orch.run(&plan, &sink).await {
        Ok(r) => r,
        Err(e) => {
            out.problems.push(format!("run failed: {e}"));
            return out;
        }
    };
    let events = events.into_inner().unwrap_or_else(|p| p.into_inner());

    // 1, 2, 4: the simulator's own checks after every step (budgets, reachability, step order,
    // budget oversubscription at start).
    for v in sim.violations() {
        out.kinds.push(v.kind);
        out.problems.push(v.to_string());
    }
    // 3: every node ends Done or RolledBack, none left cordoned by us.
    for n in &report.nodes {
        if !matches!(n.phase, Phase::Done | Phase::RolledBack) {
            out.problems
                .push(format!("{} ended {:?} ({:?})", n.node, n.phase, n.cause));
        }
        if n.phase == Phase::RolledBack {
            // No faults are injected here: a rollback means the engine misjudged something.
            out.problems.push(format!(
                "{} rolled back without an injected fault: {:?}",
                n.node, n.cause
            ));
        }
        let cordoned = sim.node(&n.node).map(|x| x.unschedulable);
        if cordoned != before.get(&n.node).copied() {
            out.problems.push(format!(
                "{} cordon changed from {:?} to {cordoned:?}",
                n.node,
                before.get(&n.node)
            ));
        }
        // 5: on a Done node every pod on the pod network is Cilium-managed.
        if n.phase == Phase::Done && !sim.is_fully_migrated(&n.node) {
            out.problems
                .push(format!("{} is Done but still has pods off Cilium", n.node));
        }
    }
    // 4: per-node step order from the operation log.
    let mut first: BTreeMap<(&NodeName, &'static str), usize> = BTreeMap::new();
    let log = sim.op_log();
    for (i, op) in log.iter().enumerate() {
        let k = match &op.kind {
            OpKind::Cordon => "cordon",
            OpKind::Label { .. } => "label",
            OpKind::RestartAgent { .. } => "restart",
            OpKind::Uncordon => "uncordon",
            _ => continue,
        };
        first.entry((&op.node, k)).or_insert(i);
    }
    for n in &scope {
        let at = |k| first.get(&(n, k)).copied();
        let chain = [at("label"), at("restart"), at("uncordon")];
        let mut prev = at("cordon").or(Some(0));
        for (step, t) in ["label", "restart", "uncordon"].iter().zip(chain) {
            if let (Some(p), Some(t)) = (prev, t)
                && t < p
            {
                out.problems.push(format!(
                    "{n}: {step} happened before the step it depends on"
                ));
            }
            prev = t.or(prev);
        }
    }
    // 4: control-plane nodes only after all workers; never more in flight than configured.
    let cp: Vec<&NodeName> = plan
        .order
        .iter()
        .filter(|p| p.control_plane)
        .map(|p| &p.name)
        .collect();
    let mut last_worker_end = Time(0);
    let mut first_cp_start: Option<Time> = None;
    let mut in_flight = 0usize;
    for e in &events {
        match e {
            Event::NodeStarted { node, at } => {
                in_flight += 1;
                if in_flight > cfg.max_in_flight as usize {
                    out.problems.push(format!(
                        "{in_flight} nodes in flight at {at}, limit {}",
                        cfg.max_in_flight
                    ));
                }
                if cp.contains(&node) {
                    first_cp_start.get_or_insert(*at);
                }
            }
            Event::NodeFinished { node, at, .. } => {
                in_flight = in_flight.saturating_sub(1);
                if !cp.contains(&node) {
                    last_worker_end = last_worker_end.max(*at);
                }
            }
            _ => {}
        }
    }
    if let Some(t) = first_cp_start
        && t < last_worker_end
    {
        out.problems.push(format!(
            "a control-plane node started at {t} before the last worker finished at {last_worker_end}"
        ));
    }
    out
}

/// The seeds' outcomes that broke an invariant, and the nodes migrated in all.
fn run_all(seeds: &[u64], scheduler: PickFn) -> (usize, Vec<(u64, Outcome)>) {
    let all = support::map_seeds(seeds, |seed| run_case(seed, scheduler));
    let nodes = all.iter().map(|(_, o)| o.nodes).sum();
    (
        nodes,
        all.into_iter()
            .filter(|(_, o)| !o.problems.is_empty())
            .collect(),
    )
}

#[test]
fn random_clusters_migrate_without_breaking_an_invariant() {
    let seeds = support::seeds("CNIMIG_CASES", 2000);
    let (nodes, failures) = run_all(&seeds, pick);
    println!(
        "{} random clusters, {nodes} nodes migrated, {} failing",
        seeds.len(),
        failures.len()
    );
    if let Some((seed, o)) = failures.first() {
        panic!(
            "{} of {} cases broke an invariant; first: seed {seed} (replay: CNIMIG_SEED={seed} cargo test --release --test invariants):\n  {}",
            failures.len(),
            seeds.len(),
            o.problems
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
}

// Deliberately broken schedulers: the same harness must catch each of them.

fn ignores_budgets(p: &[PendingNode], f: &[InFlightNode], _: &BudgetView, l: Limits) -> Picks {
    pick(p, f, &BudgetView::default(), l)
}

fn control_plane_first(p: &[PendingNode], f: &[InFlightNode], b: &BudgetView, l: Limits) -> Picks {
    let mut reordered: Vec<PendingNode> = p.iter().filter(|n| n.control_plane).cloned().collect();
    reordered.extend(p.iter().filter(|n| !n.control_plane).cloned());
    pick(
        &reordered,
        f,
        b,
        Limits {
            control_plane_last: false,
            ..l
        },
    )
}

fn ignores_the_limit(p: &[PendingNode], f: &[InFlightNode], b: &BudgetView, l: Limits) -> Picks {
    pick(
        p,
        f,
        b,
        Limits {
            max_in_flight: l.max_in_flight * 3 + 1,
            ..l
        },
    )
}

fn caught(scheduler: PickFn, what: &str) -> Vec<(u64, Outcome)> {
    let seeds: Vec<u64> = (0..300).collect();
    let (_, failures) = run_all(&seeds, scheduler);
    assert!(
        !failures.is_empty(),
        "a scheduler that {what} went unnoticed over {} random clusters",
        seeds.len()
    );
    failures
}

#[test]
fn a_scheduler_that_ignores_budgets_is_caught() {
    let f = caught(ignores_budgets, "ignores PodDisruptionBudgets");
    assert!(
        f.iter()
            .any(|(_, o)| o.kinds.contains(&ViolationKind::Oversubscribed)),
        "caught as oversubscription"
    );
}

#[test]
fn a_scheduler_that_starts_control_plane_nodes_first_is_caught() {
    let f = caught(control_plane_first, "starts control-plane nodes first");
    assert!(
        f.iter()
            .any(|(_, o)| o.problems.iter().any(|p| p.contains("control-plane")))
    );
}

#[test]
fn a_scheduler_that_ignores_the_in_flight_limit_is_caught() {
    let f = caught(ignores_the_limit, "ignores the in-flight limit");
    assert!(
        f.iter()
            .any(|(_, o)| o.problems.iter().any(|p| p.contains("in flight")))
    );
}
