//! The simulator's budget view keeps, per node, a running count of the budgets its drainable
//! pods need (so that it does not walk every candidate's pods on every look). These tests check
//! that count against one computed from scratch through the public API, after evictions,
//! deletions, cordons, nodes going NotReady and back, and time passing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use cnimig_core::model::NodeName;
use cnimig_core::ports::{BudgetView, Cluster};
use cnimig_sim::{Scenario, SimCluster};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The budget view computed from the pods and budgets, the way the trait documents it: for each
/// node, the budgets covering its drainable pods that are not terminating, with how many each
/// covers (a budget's key is `namespace/name`).
fn oracle(sim: &SimCluster, nodes: &[NodeName]) -> BTreeMap<NodeName, Vec<(String, u32)>> {
    let pdbs = sim.pdbs();
    let mut out = BTreeMap::new();
    for n in nodes {
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for p in sim.pods_on(n) {
            if !p.is_drainable() || p.terminating {
                continue;
            }
            for b in &pdbs {
                if b.namespace == p.pod.namespace && b.selector.matches(&p.labels) {
                    *counts.entry(b.key()).or_default() += 1;
                }
            }
        }
        let mut list: Vec<(String, u32)> = counts.into_iter().collect();
        list.sort();
        out.insert(n.clone(), list);
    }
    out
}

fn sorted(view: &BudgetView) -> BTreeMap<NodeName, Vec<(String, u32)>> {
    view.per_node
        .iter()
        .map(|(n, l)| {
            let mut l = l.clone();
            l.sort();
            (n.clone(), l)
        })
        .collect()
}

async fn check(sim: &SimCluster, nodes: &[NodeName], when: &str) {
    let view = sim.budget_view(nodes).await.unwrap();
    assert_eq!(sorted(&view), oracle(sim, nodes), "budget view {when}");
    for (pdb, _) in view.per_node.values().flatten() {
        assert!(
            view.allowed.contains_key(pdb),
            "{when}: {pdb} has no allowance"
        );
    }
}

#[tokio::test]
async fn running_counts_match_the_pods_through_random_disruptions() {
    for seed in 1..=4u64 {
        let sim =
            SimCluster::new(Scenario::reference_dense(12, 30), common::params(), seed).unwrap();
        let nodes = sim.node_list();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        check(&sim, &nodes, &format!("seed {seed} at start")).await;
        // Some budget must be in play, or the test would compare empty lists.
        let start = sim.budget_view(&nodes).await.unwrap();
        assert!(
            start.per_node.values().any(|l| !l.is_empty()),
            "the scenario has no budget covering a drainable pod"
        );
        for step in 0..150 {
            let node = nodes[rng.random_range(0..nodes.len())].clone();
            let pods = sim.pods_on(&node);
            match rng.random_range(0..6u32) {
                0 | 1 => {
                    if let Some(p) = pods.get(rng.random_range(0..pods.len().max(1))) {
                        let _ = sim.evict(&p.pod).await;
                    }
                }
                2 => {
                    if let Some(p) = pods.get(rng.random_range(0..pods.len().max(1))) {
                        let _ = sim.delete_pod(&p.pod).await;
                    }
                }
                3 => {
                    let on = rng.random_range(0..2u32) == 0;
                    let _ = sim.set_unschedulable(&node, on).await;
                }
                4 => {
                    let ready = rng.random_range(0..3u32) != 0;
                    sim.set_node_ready(&node, ready).unwrap();
                }
                _ => {
                    let t = sim
                        .now()
                        .after(Duration::from_secs(rng.random_range(1..20)));
                    sim.advance_to(t);
                }
            }
            check(&sim, &nodes, &format!("seed {seed} after step {step}")).await;
        }
        let end = sim.now().after(Duration::from_secs(600));
        for n in &nodes {
            sim.set_node_ready(n, true).unwrap();
        }
        sim.advance_to(end);
        check(&sim, &nodes, &format!("seed {seed} at the end")).await;
    }
}
