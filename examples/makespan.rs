//! The makespan table: how long a migration takes with cnimig's scheduler, against a lower bound
//! computed without the scheduler, against one node at a time, and against the policy users
//! would otherwise script (a fixed number of nodes at a time in name order, each batch waiting for
//! its slowest drain).
//!
//! ```sh
//! cargo run --release --example makespan                          # 50, 150, 300, 500, 1000 nodes
//! cargo run --release --example makespan -- --sizes 150 --max-in-flight 30
//! ```
//!
//! The bound is the larger of
//! - (a) the rounds the in-flight limit forces — workers, then control-plane nodes, each divided
//!   by the limit and rounded up — times the time one node takes when nothing else is in flight
//!   (the median node of the one-at-a-time run; the `strict` column uses the fastest node, a true
//!   lower bound that random durations keep out of reach), and
//! - (b) for each PodDisruptionBudget, the evictions it must allow in sequence (the pods it
//!   covers on nodes in scope divided by the disruptions it allows, rounded up) times the
//!   shortest time a replacement pod needs to become ready.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use cnimig::core::cilium::{CiliumPhase, rendered_config};
use cnimig::core::config::{FailurePolicy, MigrationConfig};
use cnimig::core::events::Discard;
use cnimig::core::machine::Phase;
use cnimig::core::model::NodeRole;
use cnimig::core::orchestrator::{Orchestrator, PickFn, Ports, RunOptions, RunReport};
use cnimig::core::ports::{BudgetView, Cluster};
use cnimig::core::schedule::{InFlightNode, Limits, PendingNode, Picks, pick};
use cnimig::sim::{Scenario, SimCluster, SimParams};

#[derive(Parser, Debug)]
#[command(about = "Makespan of cnimig's scheduler against a lower bound and two baselines")]
struct Args {
    /// Cluster sizes (nodes) of the reference cluster.
    #[arg(long, value_delimiter = ',', default_values_t = vec![50, 150, 300, 500, 1000])]
    sizes: Vec<usize>,
    /// Nodes in flight.
    #[arg(long, default_value_t = 20)]
    max_in_flight: u32,
    /// Seed of the simulated timings.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// The naive policy: `max_in_flight` nodes at a time in name order; the next batch starts only
/// when the whole batch is done (a script running `kubectl drain` on each and waiting).
fn naive_batches(
    pending: &[PendingNode],
    in_flight: &[InFlightNode],
    _: &BudgetView,
    l: Limits,
) -> Picks {
    if !in_flight.is_empty() {
        return Picks::default();
    }
    let mut names: Vec<_> = pending.iter().map(|p| p.name.clone()).collect();
    names.sort();
    names.truncate(l.max_in_flight as usize);
    Picks {
        start: names,
        held: None,
    }
}

struct Run {
    report: RunReport,
    wall: Duration,
}

async fn run(
    scenario: &Scenario,
    cfg: &MigrationConfig,
    seed: u64,
    scheduler: PickFn,
) -> anyhow::Result<(SimCluster, Run)> {
    let sim = SimCluster::new(scenario.clone(), SimParams::default(), seed)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    #[allow(
        clippy::disallowed_methods,
        reason = "the example reports its own wall time; the simulation itself never reads the clock"
    )]
    let t = Instant::now();
    let opts = RunOptions {
        scheduler,
        ..RunOptions::default()
    };
    let orch = Orchestrator::new(Ports::from_one(sim.clone()), cfg.clone(), opts);
    let (_, plan) = orch.plan().await?;
    if !plan.preflight.ok() {
        bail!(
            "preflight failed: {:?}",
            plan.preflight.failures().collect::<Vec<_>>()
        );
    }
    sim.install_cilium(rendered_config(cfg, plan.inputs, CiliumPhase::Migration))?;
    let report = orch.run(&plan, &Discard).await?;
    if report.count(Phase::Done) != report.nodes.len() {
        bail!("not every node ended Done");
    }
    Ok((
        sim,
        Run {
            report,
            wall: t.elapsed(),
        },
    ))
}

fn node_secs(r: &RunReport) -> Vec<f64> {
    let mut v: Vec<f64> = r
        .nodes
        .iter()
        .filter_map(|n| Some(n.finished?.since(n.started?).as_secs_f64()))
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Bound (b): each budget's evictions in sequence.
async fn budget_bound(sim: &SimCluster, ready: Duration) -> anyhow::Result<(f64, String)> {
    let inv = sim.inventory().await?;
    let mut worst = (0.0, String::from("-"));
    for pdb in &inv.pdbs {
        let covered: Vec<_> = inv
            .pods
            .iter()
            .filter(|p| p.is_drainable() && pdb.covers(p))
            .collect();
        let healthy = covered.iter().filter(|p| p.ready && !p.terminating).count() as u32;
        let allowed = pdb.disruptions_allowed(healthy).max(1);
        let secs = (covered.len() as u32).div_ceil(allowed) as f64 * ready.as_secs_f64();
        if secs > worst.0 {
            worst = (secs, pdb.key());
        }
    }
    Ok(worst)
}

fn hms(s: f64) -> String {
    let s = s.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cnimig::progress::init_logs();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let params = SimParams::default();
    let ready_min = params.pod_ready.min.0;
    println!(
        "{:>5} {:>6} {:>4} | {:>8} {:>8} {:>8} | {:>8} {:>6} {:>7} | {:>8} {:>7} | {:>8} {:>7} | {:>6}",
        "nodes",
        "pods",
        "K",
        "bound-a",
        "bound-b",
        "bound",
        "cnimig",
        "ratio",
        "strict",
        "1-by-1",
        "x",
        "naive",
        "ratio",
        "wall"
    );
    for &n in &args.sizes {
        let scenario = Scenario::reference(n);
        let mut cfg = MigrationConfig::new("10.224.0.0/11".parse()?);
        cfg.max_in_flight = args.max_in_flight;
        cfg.on_node_failure = FailurePolicy::RollbackAndStop;
        let (sim, ours) = rt.block_on(run(&scenario, &cfg, args.seed, pick))?;
        let mut one = cfg.clone();
        one.max_in_flight = 1;
        let (_, seq) = rt.block_on(run(&scenario, &one, args.seed, pick))?;
        let (_, naive) = rt.block_on(run(&scenario, &cfg, args.seed, naive_batches))?;

        let seq_nodes = node_secs(&seq.report);
        let t_node = seq_nodes.first().copied().unwrap_or(0.0);
        let t_median = seq_nodes.get(seq_nodes.len() / 2).copied().unwrap_or(0.0);
        let busy: f64 = node_secs(&ours.report).iter().sum();
        eprintln!(
            "  {n} nodes: node alone min {t_node:.0}s median {t_median:.0}s; cnimig node mean {:.0}s, mean in flight {:.1}",
            busy / n as f64,
            busy / ours.report.makespan().as_secs_f64()
        );
        let cp = scenario
            .expand_nodes()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .iter()
            .filter(|x| {
                x.roles
                    .iter()
                    .any(|r| matches!(r, NodeRole::ControlPlane | NodeRole::Etcd))
            })
            .count();
        let k = args.max_in_flight as usize;
        let rounds = (n - cp).div_ceil(k) + cp.div_ceil(k);
        let bound_a = rounds as f64 * t_median;
        let strict_a = rounds as f64 * t_node;
        let (bound_b, _pdb) = rt.block_on(budget_bound(&sim, ready_min))?;
        let bound = bound_a.max(bound_b);
        let strict = strict_a.max(bound_b);
        let m = ours.report.makespan().as_secs_f64();
        let s = seq.report.makespan().as_secs_f64();
        let nv = naive.report.makespan().as_secs_f64();
        println!(
            "{:>5} {:>6} {:>4} | {:>8} {:>8} {:>8} | {:>8} {:>6.2} {:>7.2} | {:>8} {:>6.1}x | {:>8} {:>6.2} | {:>5.2}s",
            n,
            sim.pods().len(),
            k,
            hms(bound_a),
            hms(bound_b),
            hms(bound),
            hms(m),
            m / bound,
            m / strict,
            hms(s),
            s / m,
            hms(nv),
            nv / m,
            ours.wall.as_secs_f64()
        );
    }
    println!();
    println!(
        "bound-a: rounds forced by K (workers/K + control-plane/K, K = {}) x the median time of a node alone (one-by-one run)",
        args.max_in_flight
    );
    println!(
        "bound-b: the slowest budget's evictions in sequence x the shortest replacement start; bound = max(a, b)"
    );
    println!(
        "ratio: cnimig / bound (target <= 1.25); strict: the same with the fastest node alone instead of the median"
    );
    println!(
        "x: one-by-one / cnimig (target >= 10); naive ratio: naive batches in name order / cnimig"
    );
    Ok(())
}
