//! Planner, scheduler and whole-migration benchmarks at fleet scale.
//!
//! ```sh
//! cargo bench --bench planner                 # everything
//! cargo bench --bench planner -- decision     # one group
//! ```
//!
//! - `decision/5000`: one scheduling decision on a 5,000-node, 150,000-pod cluster (30 pods a
//!   node): the budget view for the candidate window and the nodes draining, then
//!   `schedule::pick`.
//! - `plan/N`: preflight, node order and values from a snapshot of N nodes.
//! - `migrate/N`: a whole simulated migration of the reference cluster of N nodes (50 in flight).

// Test and benchmark code may panic on a broken fixture.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use cnimig::core::cilium::{CiliumPhase, rendered_config};
use cnimig::core::config::MigrationConfig;
use cnimig::core::events::Discard;
use cnimig::core::model::ClusterSnapshot;
use cnimig::core::orchestrator::{Orchestrator, Ports, RunOptions};
use cnimig::core::plan::plan;
use cnimig::core::ports::{Cluster, OldCni};
use cnimig::core::schedule::{InFlightNode, Limits, PendingNode, pick, window};
use cnimig::sim::{Scenario, SimCluster, SimParams};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn cfg(k: u32) -> MigrationConfig {
    let mut c = MigrationConfig::new("10.224.0.0/11".parse().expect("static CIDR"));
    c.max_in_flight = k;
    c
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

fn snapshot(rt: &tokio::runtime::Runtime, sim: &SimCluster) -> ClusterSnapshot {
    rt.block_on(async {
        let inv = sim.inventory().await.expect("inventory");
        let calico = sim.facts().await.expect("facts");
        inv.with_calico(calico)
    })
}

fn decision(c: &mut Criterion) {
    let rt = rt();
    let n = 5000;
    // 30 pods a node: 150,000 pods.
    let sim = SimCluster::new(Scenario::reference_dense(n, 30), SimParams::default(), 1)
        .expect("scenario");
    let snap = snapshot(&rt, &sim);
    let p = plan(&snap, &cfg(50));
    let limits = Limits {
        max_in_flight: 50,
        control_plane_last: true,
    };
    // 40 nodes draining, 10 further along; the rest pending.
    let in_flight: Vec<InFlightNode> = p.order[..50]
        .iter()
        .enumerate()
        .map(|(i, x)| InFlightNode {
            name: x.name.clone(),
            zone: x.zone.clone(),
            control_plane: false,
            draining: i < 40,
        })
        .collect();
    let pending: Vec<PendingNode> = p.order[50..].iter().map(PendingNode::from).collect();
    let mut g = c.benchmark_group("decision");
    g.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut ask: Vec<_> = pending
                    .iter()
                    .take(window(limits, in_flight.len()))
                    .map(|p| p.name.clone())
                    .collect();
                ask.extend(
                    in_flight
                        .iter()
                        .filter(|f| f.draining)
                        .map(|f| f.name.clone()),
                );
                let budgets = sim.budget_view(&ask).await.expect("budgets");
                black_box(pick(&pending, &in_flight, &budgets, limits))
            })
        })
    });
    g.finish();
}

fn planning(c: &mut Criterion) {
    let rt = rt();
    let mut g = c.benchmark_group("plan");
    g.sample_size(10);
    for n in [500, 5000] {
        let sim =
            SimCluster::new(Scenario::reference(n), SimParams::default(), 1).expect("scenario");
        let snap = snapshot(&rt, &sim);
        let cfg = cfg(50);
        g.bench_with_input(BenchmarkId::from_parameter(n), &snap, |b, s| {
            b.iter(|| black_box(plan(s, &cfg)))
        });
    }
    g.finish();
}

fn migrate(c: &mut Criterion) {
    let rt = rt();
    let mut g = c.benchmark_group("migrate");
    g.sample_size(10);
    for n in [500, 1000, 2000] {
        let scenario = Scenario::reference(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &scenario, |b, sc| {
            b.iter(|| {
                rt.block_on(async {
                    let sim =
                        SimCluster::new(sc.clone(), SimParams::default(), 1).expect("scenario");
                    let cfg = cfg(50);
                    let orch = Orchestrator::new(
                        Ports::from_one(sim.clone()),
                        cfg.clone(),
                        RunOptions::default(),
                    );
                    let (_, p) = orch.plan().await.expect("plan");
                    sim.install_cilium(rendered_config(&cfg, p.inputs, CiliumPhase::Migration))
                        .expect("install");
                    black_box(orch.run(&p, &Discard).await.expect("run"))
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decision, planning, migrate);
criterion_main!(benches);
