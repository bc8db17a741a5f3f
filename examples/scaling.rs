//! How the cost of a whole simulated migration grows with the cluster: 500 to 5,000 nodes at about
//! 30 pods a node, each size in a fresh process (this example runs itself again with `--one N`),
//! so that each size's peak memory is its own.
//!
//! ```sh
//! cargo run --release --example scaling                                   # 500 .. 5,000 nodes
//! cargo run --release --example scaling -- --sizes 500,1000 --pods-per-node 30 --max-in-flight 50
//! ```
//!
//! Per size: wall time, CPU time (`/proc/self/schedstat`), peak resident memory (`VmHWM` in
//! `/proc/self/status`), the simulated makespan, CPU time per pod, and, from one size to the next,
//! how much the CPU time grew against how much the pod count grew (1.0 when linear in pods; a
//! quadratic cost would double the exponent).

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use cnimig::core::cilium::{CiliumPhase, rendered_config};
use cnimig::core::config::MigrationConfig;
use cnimig::core::events::Discard;
use cnimig::core::machine::Phase;
use cnimig::core::orchestrator::{Orchestrator, Ports, RunOptions};
use cnimig::sim::{Scenario, SimCluster, SimParams};

#[derive(Parser, Debug)]
#[command(
    about = "Wall time, CPU time and memory of whole simulated migrations, 500 to 5,000 nodes"
)]
struct Args {
    /// Cluster sizes (nodes), each measured in its own process.
    #[arg(long, value_delimiter = ',', default_values_t = vec![500, 1000, 2000, 3000, 5000])]
    sizes: Vec<usize>,
    /// Pods per node (DaemonSet and application pods, before Cilium's agent).
    #[arg(long, default_value_t = 30)]
    pods_per_node: u32,
    /// Nodes in flight.
    #[arg(long, default_value_t = 50)]
    max_in_flight: u32,
    /// Seed of the simulated timings.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Measure one size in this process and print one result line (used by the parent).
    #[arg(long, hide = true)]
    one: Option<usize>,
}

/// One size's figures.
#[derive(Debug, Clone, Copy)]
struct Sample {
    nodes: usize,
    pods: usize,
    wall_s: f64,
    cpu_s: f64,
    rss_mib: f64,
    makespan_s: f64,
}

/// CPU time of this process so far (all threads), from `/proc/self/schedstat` (nanoseconds on
/// CPU, the first field).
fn cpu_seconds() -> anyhow::Result<f64> {
    let text = std::fs::read_to_string("/proc/self/schedstat")
        .context("read /proc/self/schedstat (Linux only)")?;
    let ns: u64 = text
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .context("parse /proc/self/schedstat")?;
    Ok(ns as f64 / 1e9)
}

/// Peak resident memory of this process, from `VmHWM` in `/proc/self/status`.
fn peak_rss_mib() -> anyhow::Result<f64> {
    let text = std::fs::read_to_string("/proc/self/status")
        .context("read /proc/self/status (Linux only)")?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("parse VmHWM in /proc/self/status")?;
    Ok(kib as f64 / 1024.0)
}

fn measure(args: &Args, nodes: usize) -> anyhow::Result<Sample> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    #[allow(
        clippy::disallowed_methods,
        reason = "the example reports its own wall time; the simulation itself never reads the clock"
    )]
    let t = Instant::now();
    let cpu0 = cpu_seconds()?;
    let scenario = Scenario::reference_dense(nodes, args.pods_per_node);
    let sim = SimCluster::new(scenario, SimParams::default(), args.seed)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut cfg = MigrationConfig::new("10.224.0.0/11".parse()?);
    cfg.max_in_flight = args.max_in_flight;
    let orch = Orchestrator::new(
        Ports::from_one(sim.clone()),
        cfg.clone(),
        RunOptions::default(),
    );
    let report = rt.block_on(async {
        let (_, plan) = orch.plan().await?;
        if !plan.preflight.ok() {
            bail!(
                "preflight failed: {:?}",
                plan.preflight.failures().collect::<Vec<_>>()
            );
        }
        sim.install_cilium(rendered_config(&cfg, plan.inputs, CiliumPhase::Migration))?;
        Ok::<_, anyhow::Error>(orch.run(&plan, &Discard).await?)
    })?;
    let done = report.count(Phase::Done);
    if done != report.nodes.len() {
        bail!(
            "{nodes} nodes: only {done} of {} nodes ended Done",
            report.nodes.len()
        );
    }
    let violations = sim.violations();
    if !violations.is_empty() {
        bail!(
            "{nodes} nodes: {} invariant violation(s), first: {:?}",
            violations.len(),
            violations.first()
        );
    }
    Ok(Sample {
        nodes,
        pods: sim.pods().len(),
        wall_s: t.elapsed().as_secs_f64(),
        cpu_s: cpu_seconds()? - cpu0,
        rss_mib: peak_rss_mib()?,
        makespan_s: report.makespan().as_secs_f64(),
    })
}

fn parse_line(line: &str) -> Option<Sample> {
    let f: Vec<&str> = line.strip_prefix("SAMPLE ")?.split_whitespace().collect();
    match f.as_slice() {
        [nodes, pods, wall, cpu, rss, makespan] => Some(Sample {
            nodes: nodes.parse().ok()?,
            pods: pods.parse().ok()?,
            wall_s: wall.parse().ok()?,
            cpu_s: cpu.parse().ok()?,
            rss_mib: rss.parse().ok()?,
            makespan_s: makespan.parse().ok()?,
        }),
        _ => None,
    }
}

fn hms(s: f64) -> String {
    let s = s.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(n) = args.one {
        let s = measure(&args, n)?;
        println!(
            "SAMPLE {} {} {:.3} {:.3} {:.1} {:.0}",
            s.nodes, s.pods, s.wall_s, s.cpu_s, s.rss_mib, s.makespan_s
        );
        return Ok(());
    }
    let exe = std::env::current_exe().context("find this example's executable")?;
    println!(
        "{:>6} {:>8} | {:>7} {:>7} {:>8} | {:>9} | {:>10} | {:>6} {:>6} {:>8}",
        "nodes",
        "pods",
        "wall",
        "cpu",
        "peak-rss",
        "makespan",
        "cpu/pod",
        "pods x",
        "cpu x",
        "exponent"
    );
    let mut prev: Option<Sample> = None;
    for &n in &args.sizes {
        let out = Command::new(&exe)
            .args([
                "--one",
                &n.to_string(),
                "--pods-per-node",
                &args.pods_per_node.to_string(),
                "--max-in-flight",
                &args.max_in_flight.to_string(),
                "--seed",
                &args.seed.to_string(),
            ])
            .output()
            .with_context(|| format!("run {} --one {n}", exe.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Some(s) = stdout.lines().find_map(parse_line) else {
            bail!(
                "{n} nodes: the measuring process failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        };
        let (pods_x, cpu_x, exponent) = match prev {
            Some(p) if p.pods > 0 && p.cpu_s > 0.0 => {
                let px = s.pods as f64 / p.pods as f64;
                let cx = s.cpu_s / p.cpu_s;
                (
                    format!("{px:.2}"),
                    format!("{cx:.2}"),
                    format!("{:.2}", cx.ln() / px.ln()),
                )
            }
            _ => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:>6} {:>8} | {:>6.2}s {:>6.2}s {:>5.0}MiB | {:>9} | {:>8.1}us | {:>6} {:>6} {:>8}",
            s.nodes,
            s.pods,
            s.wall_s,
            s.cpu_s,
            s.rss_mib,
            hms(s.makespan_s),
            s.cpu_s / s.pods.max(1) as f64 * 1e6,
            pods_x,
            cpu_x,
            exponent
        );
        prev = Some(s);
    }
    println!();
    println!(
        "{} pods a node (before Cilium's agent), {} nodes in flight, seed {}; each size in its own process",
        args.pods_per_node, args.max_in_flight, args.seed
    );
    println!(
        "cpu: CPU time of the measuring process (/proc/self/schedstat); peak-rss: VmHWM; makespan: simulated"
    );
    println!(
        "exponent: ln(cpu x) / ln(pods x) from the previous size: 1 is linear in pods, 2 quadratic"
    );
    Ok(())
}
