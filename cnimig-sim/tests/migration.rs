//! End-to-end: the core's per-node state machine migrates simulated clusters without breaking an
//! invariant, and the same seed gives the same run.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use std::time::Duration;

use cnimig_core::machine::Phase;
use cnimig_core::model::{NodeName, PodNetwork};
use cnimig_core::ports::{Cluster, Verification, Verifier};
use cnimig_sim::{OpKind, Scenario, SimCluster, SimParams};
use common::*;

async fn migrate_all(sim: &SimCluster) -> Vec<(NodeName, Phase)> {
    let nodes = sim.inventory().await.unwrap().nodes;
    let mut order: Vec<_> = nodes.iter().filter(|n| !n.is_control_plane()).collect();
    order.extend(nodes.iter().filter(|n| n.is_control_plane()));
    let mut out = Vec::new();
    for n in order {
        let rec = migrate_node(sim, &n.name, Duration::from_secs(1800)).await;
        out.push((n.name.clone(), rec.phase));
    }
    out
}

#[tokio::test]
async fn reference_cluster_migrates_without_violations() {
    let sim = SimCluster::new(Scenario::reference(12), SimParams::default(), 5).unwrap();
    let before = sim.pods().len();
    install(&sim, true).await;
    let results = migrate_all(&sim).await;
    for (n, phase) in &results {
        assert_eq!(*phase, Phase::Done, "{n}");
        assert!(sim.is_fully_migrated(n), "{n}");
        assert!(!sim.node(n).unwrap().unschedulable, "{n} left cordoned");
    }
    assert!(sim.violations().is_empty(), "{:#?}", sim.violations());
    assert!(sim.reachability_problems().is_empty());
    assert_eq!(sim.verify_cluster().await.unwrap(), Verification::Healthy);
    // Every pod-network pod is on Cilium and every pod is back (plus one agent per node).
    let pods = sim.pods();
    assert!(
        pods.iter()
            .filter(|p| !p.host_network && !p.mirror)
            .all(|p| p.network == PodNetwork::Cilium)
    );
    assert_eq!(pods.len(), before + 12);
    assert!(pods.iter().all(|p| p.ready), "all ready at the end");
    for h in sim.pdb_health() {
        assert!(h.healthy >= h.desired, "{h:?}");
    }
    let stats = sim.stats();
    assert!(
        stats.evictions_accepted > 0 && stats.evictions_blocked > 0,
        "{stats:?}"
    );
    assert!(stats.api_calls["Cluster::evict"] >= stats.evictions_attempted);
    // Control-plane nodes were cordoned after every worker.
    let log = sim.op_log();
    let first_cp = log
        .iter()
        .position(|o| o.node.as_str().starts_with("cp-") && o.kind == OpKind::Cordon)
        .unwrap();
    assert!(
        log[first_cp..]
            .iter()
            .all(|o| o.node.as_str().starts_with("cp-"))
    );
}

#[tokio::test]
async fn same_seed_same_run() {
    async fn run(seed: u64) -> (Vec<cnimig_sim::Op>, Vec<cnimig_core::model::Pod>) {
        let sim = SimCluster::new(Scenario::reference(5), SimParams::default(), seed).unwrap();
        install(&sim, true).await;
        migrate_all(&sim).await;
        (sim.op_log(), sim.pods())
    }
    let a = run(9).await;
    let b = run(9).await;
    assert_eq!(a, b);
    let c = run(10).await;
    assert_ne!(a.0, c.0, "another seed gives other timings");
}
