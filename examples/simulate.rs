//! The main job: migrate a simulated cluster from Calico to Cilium and show the result.
//!
//! ```sh
//! cargo run --release --example simulate                       # the 150-node reference cluster
//! cargo run --release --example simulate -- --nodes 40 --seed 7 --max-in-flight 8
//! cargo run --release --example simulate -- --scenario examples/scenarios/small.yaml --json
//! cargo run --release --example simulate -- --svg timeline.svg --report report.md
//! ```
//!
//! It plans (preflight, values, node config), installs Cilium in migration mode in the simulator
//! (standing in for `helm install` with the generated values), runs the orchestrator to the end,
//! then migrates the same cluster again one node at a time — as the source procedure does — to
//! report the speed-up. With `--svg` and `--report` it also writes a timeline of the run (open it in
//! a browser) and a Markdown report for a change ticket. The simulator checks the invariants at every step; the exit code is 1 if
//! any was violated or any node did not end Done.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use cnimig::core::cilium::{CiliumPhase, rendered_config};
use cnimig::core::config::{FailurePolicy, MigrationConfig};
use cnimig::core::events::{Discard, Event, EventSink};
use cnimig::core::machine::Phase;
use cnimig::core::orchestrator::{Orchestrator, Ports, RunOptions, RunReport};
use cnimig::core::plan::Plan;
use cnimig::core::preflight::Severity;
use cnimig::core::report::{BudgetHealth, Figures, Timeline, event_time, markdown};
use cnimig::progress::{Mode, Progress};
use cnimig::sim::{Scenario, SimCluster, SimParams, ViolationKind};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "Migrate a simulated cluster from Calico to Cilium and report the result")]
struct Args {
    /// Nodes in the generated reference cluster (ignored with --scenario).
    #[arg(long, default_value_t = 150)]
    nodes: usize,
    /// Seed for the simulation's timings.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Nodes migrated at once.
    #[arg(long, default_value_t = 20)]
    max_in_flight: u32,
    /// A cluster described in YAML (see examples/README.md).
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// New Cilium pod CIDR.
    #[arg(long, default_value = "10.245.0.0/16")]
    pod_cidr: String,
    /// Print one JSON report on stdout instead of the summary.
    #[arg(long)]
    json: bool,
    /// Plain progress lines instead of the live bar (also when stdout is not a terminal or
    /// RUST_LOG is set).
    #[arg(long)]
    no_progress: bool,
    /// No progress and no notes on stderr; only the summary (or --json) on stdout.
    #[arg(long, short)]
    quiet: bool,
    /// Skip the one-node-at-a-time baseline run.
    #[arg(long)]
    no_baseline: bool,
    /// Write the run's timeline as SVG to this file (open it in a browser).
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Write a Markdown report of the run to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

/// The JSON report.
#[derive(Serialize)]
struct Report {
    scenario: String,
    seed: u64,
    max_in_flight: u32,
    nodes_total: usize,
    pods_total: usize,
    nodes_migrated: usize,
    nodes_rolled_back: usize,
    nodes_failed: usize,
    nodes_skipped: usize,
    pdb_violations: usize,
    connectivity_violations: usize,
    order_violations: usize,
    other_violations: usize,
    makespan_seconds: f64,
    sequential_makespan_seconds: Option<f64>,
    speedup: Option<f64>,
    evictions_accepted: u64,
    evictions_blocked: u64,
    api_calls: u64,
    preflight_warnings: usize,
    wall_seconds: f64,
}

/// Passes every event on to `inner` and `timeline`, and samples the budgets' health for the
/// timeline at each event (the simulator knows them; the orchestrator does not report them).
struct Sampled<'a> {
    inner: &'a dyn EventSink,
    timeline: &'a Timeline,
    sim: SimCluster,
}

impl EventSink for Sampled<'_> {
    fn emit(&self, e: &Event) {
        self.inner.emit(e);
        self.timeline.emit(e);
        let budgets: Vec<BudgetHealth> = self
            .sim
            .pdb_health()
            .into_iter()
            .map(BudgetHealth::from)
            .collect();
        self.timeline.record_budgets(event_time(e), &budgets);
    }
}

fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

async fn migrate(
    scenario: &Scenario,
    cfg: &MigrationConfig,
    seed: u64,
    sink: &dyn EventSink,
    timeline: Option<&Timeline>,
    notes: Option<&Progress>,
) -> anyhow::Result<(SimCluster, Plan, RunReport, usize)> {
    let sim = SimCluster::new(scenario.clone(), SimParams::default(), seed)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let orch = Orchestrator::new(
        Ports::from_one(sim.clone()),
        cfg.clone(),
        RunOptions::default(),
    );
    let (_, plan) = orch.plan().await?;
    let warnings = plan
        .preflight
        .checks
        .iter()
        .filter(|c| c.severity == Severity::Warn)
        .count();
    if let Some(notes) = notes {
        for c in plan
            .preflight
            .checks
            .iter()
            .filter(|c| c.severity != Severity::Pass)
        {
            notes.println(&format!(
                "preflight {:?} [{}] {}",
                c.severity, c.id, c.message
            ));
        }
        notes.println(&plan.node_config.reasons.join("\n"));
    }
    if !plan.preflight.ok() {
        bail!("preflight failed; nothing was changed");
    }
    sim.set_scope(plan.order.iter().map(|p| p.name.clone()).collect())?;
    sim.set_control_plane_last(cfg.control_plane_last);
    // Stands in for `helm install cilium -f <migration values>`.
    sim.install_cilium(rendered_config(cfg, plan.inputs, CiliumPhase::Migration))?;
    let report = match timeline {
        Some(timeline) => {
            timeline.add_nodes(plan.order.iter().map(|p| &p.name));
            let sampled = Sampled {
                inner: sink,
                timeline,
                sim: sim.clone(),
            };
            orch.run(&plan, &sampled).await?
        }
        None => orch.run(&plan, sink).await?,
    };
    Ok((sim, plan, report, warnings))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cnimig::progress::init_logs();
    #[allow(
        clippy::disallowed_methods,
        reason = "the example reports its own wall time; the simulation never reads this clock"
    )]
    let wall = Instant::now();
    let scenario = match &args.scenario {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Scenario::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => Scenario::reference(args.nodes),
    };
    let mut cfg = MigrationConfig::new(
        args.pod_cidr
            .parse()
            .with_context(|| format!("--pod-cidr {:?} is not an IPv4 CIDR", args.pod_cidr))?,
    );
    cfg.max_in_flight = args.max_in_flight;
    cfg.on_node_failure = FailurePolicy::RollbackAndContinue;
    cfg.poll_interval = Duration::from_secs(2);
    cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let name = if scenario.name.is_empty() {
        format!("reference-{}", args.nodes)
    } else {
        scenario.name.clone()
    };
    let progress = Progress::new(Mode::detect(args.no_progress, args.quiet));
    let notes = (!args.quiet).then_some(&progress);
    let timeline = Timeline::new();
    let record = (args.svg.is_some() || args.report.is_some()).then_some(&timeline);
    let result = rt.block_on(migrate(
        &scenario,
        &cfg,
        args.seed,
        &progress,
        record,
        notes.filter(|_| !args.json),
    ));
    progress.finish();
    let (sim, plan, report, warnings) = result?;
    let sequential = if args.no_baseline {
        None
    } else {
        if !args.quiet {
            eprintln!(
                "baseline: the same cluster one node at a time (as the source procedure does) ..."
            );
        }
        let mut one = cfg.clone();
        one.max_in_flight = 1;
        let (_, _, r, _) =
            rt.block_on(migrate(&scenario, &one, args.seed, &Discard, None, None))?;
        Some(r.makespan().as_secs_f64())
    };

    let violations = sim.violations();
    let count = |k: ViolationKind| violations.iter().filter(|v| v.kind == k).count();
    let stats = sim.stats();
    let makespan = report.makespan().as_secs_f64();
    let out = Report {
        scenario: name,
        seed: args.seed,
        max_in_flight: cfg.max_in_flight,
        nodes_total: report.nodes.len() + report.skipped.len(),
        pods_total: sim.pods().len(),
        nodes_migrated: report.count(Phase::Done),
        nodes_rolled_back: report.count(Phase::RolledBack),
        nodes_failed: report.count(Phase::Failed),
        nodes_skipped: report.skipped.len(),
        pdb_violations: count(ViolationKind::Pdb),
        connectivity_violations: count(ViolationKind::Connectivity),
        order_violations: count(ViolationKind::Order),
        other_violations: violations
            .iter()
            .filter(|v| {
                !matches!(
                    v.kind,
                    ViolationKind::Pdb | ViolationKind::Connectivity | ViolationKind::Order
                )
            })
            .count(),
        makespan_seconds: makespan,
        sequential_makespan_seconds: sequential,
        speedup: sequential.map(|s| s / makespan.max(1e-9)),
        evictions_accepted: stats.evictions_accepted,
        evictions_blocked: stats.evictions_blocked,
        api_calls: stats.total_api_calls(),
        preflight_warnings: warnings,
        wall_seconds: wall.elapsed().as_secs_f64(),
    };
    if let Some(path) = &args.svg {
        std::fs::write(path, timeline.to_svg())
            .with_context(|| format!("writing {}", path.display()))?;
        if !args.quiet {
            eprintln!("wrote the timeline to {}", path.display());
        }
    }
    if let Some(path) = &args.report {
        let figures = figures(&out, &cfg);
        std::fs::write(path, markdown(&plan, &report, &figures))
            .with_context(|| format!("writing {}", path.display()))?;
        if !args.quiet {
            eprintln!("wrote the report to {}", path.display());
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_summary(&out, &report);
        for v in violations.iter().take(20) {
            println!("  violation: {v:?}");
        }
    }
    let ok = violations.is_empty() && out.nodes_migrated == report.nodes.len();
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

/// The figures of the Markdown report that only this example knows.
fn figures(r: &Report, cfg: &MigrationConfig) -> Figures {
    let seconds = |s: f64| clock((s * 1000.0) as u64);
    let mut f = Figures::new().titled(format!(
        "cnimig simulated migration: {} (seed {})",
        r.scenario, r.seed
    ));
    f.push("nodes in the cluster", r.nodes_total)
        .push("pods", r.pods_total)
        .push("max nodes in flight", cfg.max_in_flight);
    if let (Some(seq), Some(x)) = (r.sequential_makespan_seconds, r.speedup) {
        f.push("makespan one node at a time (simulated)", seconds(seq))
            .push("speed-up", format!("{x:.1}x"));
    }
    f.push("evictions accepted", r.evictions_accepted)
        .push(
            "evictions refused by budgets (retried)",
            r.evictions_blocked,
        )
        .push("PDB violations", r.pdb_violations)
        .push("connectivity violations", r.connectivity_violations)
        .push("order violations", r.order_violations)
        .push("other violations", r.other_violations)
        .push("API calls", r.api_calls)
        .push("preflight warnings", r.preflight_warnings);
    f
}

fn print_summary(r: &Report, run: &RunReport) {
    println!();
    println!(
        "cnimig simulated migration: {} (seed {})",
        r.scenario, r.seed
    );
    println!(
        "  nodes        {} total, {} migrated, {} rolled back, {} failed, {} skipped",
        r.nodes_total, r.nodes_migrated, r.nodes_rolled_back, r.nodes_failed, r.nodes_skipped
    );
    println!("  pods         {}", r.pods_total);
    println!(
        "  invariants   {} PDB, {} connectivity, {} order, {} other violations",
        r.pdb_violations, r.connectivity_violations, r.order_violations, r.other_violations
    );
    println!(
        "  makespan     {} with up to {} nodes in flight",
        clock((r.makespan_seconds * 1000.0) as u64),
        r.max_in_flight
    );
    if let (Some(seq), Some(x)) = (r.sequential_makespan_seconds, r.speedup) {
        println!(
            "  one by one   {}  ({x:.1}x faster in parallel, {:.3} of the sequential time)",
            clock((seq * 1000.0) as u64),
            1.0 / x
        );
    }
    println!(
        "  evictions    {} accepted, {} refused by budgets and retried",
        r.evictions_accepted, r.evictions_blocked
    );
    println!(
        "  API calls    {} ({:.0} per node)",
        r.api_calls,
        r.api_calls as f64 / r.nodes_total.max(1) as f64
    );
    for n in run.nodes.iter().filter(|n| n.phase != Phase::Done) {
        println!(
            "  {} ended {:?}: {}",
            n.node,
            n.phase,
            n.cause.as_deref().unwrap_or("(no cause recorded)")
        );
    }
    for s in &run.skipped {
        println!("  {} skipped: {}", s.node, s.reason);
    }
    println!("  simulated in {:.2}s of wall time", r.wall_seconds);
}
