//! The reachability model: each rule has a case that breaks connectivity and one that does not,
//! and breaks are recorded as violations once per transition.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use std::collections::BTreeMap;

use cnimig_core::model::{NodeName, OwnerKind, PodNetwork};
use cnimig_core::ports::{Clock, Cluster, NewCni, Verification, Verifier};
use cnimig_sim::{SimCluster, ViolationKind};
use common::*;

fn cluster(calico: &str) -> SimCluster {
    sim(&format!(
        r"
nodes:
  - {{name: n, count: 2}}
workloads:
  - {{kind: Deployment, name: web, replicas: 2}}
  - {{kind: DaemonSet, name: shipper}}
  - {{kind: DaemonSet, name: hp, hostPort: true}}
calico: {calico}
"
    ))
}

const GOOD: &str = "{autodetection: kubernetes-internal-ip}";

/// Moves one node to Cilium by hand: cordon, drain, label, restart the agent, recycle.
async fn switch(sim: &SimCluster, n: &NodeName) {
    let t = Clock::now(sim);
    sim.set_unschedulable(n, true).await.unwrap();
    for p in sim
        .node_view(n)
        .await
        .unwrap()
        .pods
        .iter()
        .filter(|p| p.is_drainable())
    {
        sim.evict(&p.pod).await.unwrap();
    }
    sim.sleep_until(t.after(std::time::Duration::from_secs(60)))
        .await;
    sim.set_node_label(n, &cfg().migration_label, Some("true"))
        .await
        .unwrap();
    let a = sim.agent(n).await.unwrap().unwrap();
    sim.restart_agent(n, &a.pod_uid).await.unwrap();
    sim.sleep_until(t.after(std::time::Duration::from_secs(120)))
        .await;
    assert!(sim.cni_dir(n).await.unwrap().cilium_conflist);
    sim.set_unschedulable(n, false).await.unwrap();
    for p in sim
        .node_view(n)
        .await
        .unwrap()
        .pods
        .iter()
        .filter(|p| p.network == PodNetwork::Calico)
    {
        if p.owner == OwnerKind::DaemonSet {
            sim.delete_pod(&p.pod).await.unwrap();
        } else {
            sim.evict(&p.pod).await.unwrap();
        }
    }
    sim.sleep_until(t.after(std::time::Duration::from_secs(180)))
        .await;
    assert!(sim.is_fully_migrated(n));
}

async fn setup(
    calico: &str,
    live_cfg: BTreeMap<String, String>,
    host_port_cfg: bool,
) -> SimCluster {
    let sim = cluster(calico);
    sim.install_cilium(live_cfg).unwrap();
    sim.apply_node_config(&node_config(host_port_cfg))
        .await
        .unwrap();
    sim.sleep_until(secs(60)).await;
    sim
}

fn connectivity(sim: &SimCluster) -> Vec<String> {
    sim.violations()
        .into_iter()
        .filter(|v| v.kind == ViolationKind::Connectivity)
        .map(|v| v.message)
        .collect()
}

#[tokio::test]
async fn correct_migration_mode_keeps_calico_and_cilium_pods_connected() {
    let sim = setup(GOOD, live(true), true).await;
    switch(&sim, &name("n-1")).await;
    assert!(
        sim.pods()
            .iter()
            .any(|p| p.network == PodNetwork::Calico && p.ready)
    );
    assert!(
        sim.pods()
            .iter()
            .any(|p| p.network == PodNetwork::Cilium && p.ready)
    );
    assert!(
        sim.reachability_problems().is_empty(),
        "{:?}",
        sim.reachability_problems()
    );
    assert_eq!(sim.verify_cluster().await.unwrap(), Verification::Healthy);
    assert_eq!(
        sim.verify_node(&name("n-1")).await.unwrap(),
        Verification::Healthy
    );
    assert!(sim.violations().is_empty(), "{:#?}", sim.violations());
}

#[tokio::test]
async fn without_host_legacy_routing_calico_and_cilium_pods_are_cut_off() {
    let mut cfg = live(true);
    cfg.insert("enable-host-legacy-routing".into(), "false".into());
    let sim = setup(GOOD, cfg, true).await;
    assert!(sim.reachability_problems().is_empty(), "no Cilium pods yet");
    switch(&sim, &name("n-1")).await;
    let p = sim.reachability_problems();
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("enable-host-legacy-routing"), "{p:?}");
    match sim.verify_node(&name("n-1")).await.unwrap() {
        Verification::Unhealthy(v) => assert!(v.iter().any(|x| x.contains("legacy")), "{v:?}"),
        Verification::Healthy => panic!("must be unhealthy"),
    }
    assert!(matches!(
        sim.verify_cluster().await.unwrap(),
        Verification::Unhealthy(_)
    ));
    // Once every pod is on Cilium nothing is cut off; the break was recorded once.
    switch(&sim, &name("n-2")).await;
    assert!(sim.reachability_problems().is_empty());
    assert_eq!(connectivity(&sim).len(), 1, "{:#?}", sim.violations());
}

#[tokio::test]
async fn a_vxlan_port_shared_with_calico_cuts_calico_off_from_cilium() {
    let sim = setup(
        "{autodetection: kubernetes-internal-ip, vxlanPort: 8472}",
        live(true),
        true,
    )
    .await;
    switch(&sim, &name("n-1")).await;
    let p = sim.reachability_problems();
    assert!(p.len() == 1 && p[0].contains("8472"), "{p:?}");
    assert_eq!(connectivity(&sim).len(), 1);

    // IPIP uses no UDP port: no collision.
    let ipip = "{autodetection: kubernetes-internal-ip, vxlanPort: 8472, pools: [{name: p, cidr: 10.42.0.0/16, encapsulation: IPIP}]}";
    let sim = setup(ipip, live(true), true).await;
    switch(&sim, &name("n-1")).await;
    assert!(sim.reachability_problems().is_empty());

    // Cilium's tunnel moved onto Calico's 4789.
    let mut cfg = live(true);
    cfg.insert("tunnel-port".into(), "4789".into());
    let sim = setup(GOOD, cfg, true).await;
    switch(&sim, &name("n-1")).await;
    assert!(sim.reachability_problems()[0].contains("4789"));
}

#[tokio::test]
async fn first_found_autodetection_breaks_calico_once_cilium_is_installed() {
    let sim = cluster("{autodetection: first-found}");
    assert!(sim.reachability_problems().is_empty());
    sim.install_cilium(live(true)).unwrap();
    let p = sim.reachability_problems();
    assert!(p.len() == 1 && p[0].contains("cilium_host"), "{p:?}");
    assert_eq!(connectivity(&sim).len(), 1);
    // An interface regex that only matches eth0 would be safe; kubernetes-internal-ip is (see the
    // first test). A single node has no cross-node Calico traffic to break.
    let single = sim_one("{autodetection: first-found}");
    single.install_cilium(live(true)).unwrap();
    assert!(single.reachability_problems().is_empty());
}

fn sim_one(calico: &str) -> SimCluster {
    sim(&format!(
        "nodes: [{{name: solo}}]\nworkloads: [{{kind: Deployment, name: web, replicas: 2}}]\ncalico: {calico}\n"
    ))
}

#[tokio::test]
async fn host_port_pods_on_cilium_need_portmap() {
    let sim = setup(GOOD, live(true), false).await;
    switch(&sim, &name("n-1")).await;
    assert_eq!(sim.chaining_mode(&name("n-1")).as_deref(), Some("none"));
    let p = sim.reachability_problems();
    assert!(
        p.len() == 1 && p[0].contains("hostPort") && p[0].contains("n-1"),
        "{p:?}"
    );
    match sim.verify_node(&name("n-1")).await.unwrap() {
        Verification::Unhealthy(v) => assert!(v.iter().any(|x| x.contains("portmap"))),
        Verification::Healthy => panic!("hostPort pod unreachable"),
    }
    match sim.verify_node(&name("n-2")).await.unwrap() {
        Verification::Unhealthy(v) => assert!(
            v.iter().all(|x| !x.contains("hostPort")),
            "not n-2's problem: {v:?}"
        ),
        Verification::Healthy => panic!("n-2 is still on Calico"),
    }

    let sim = setup(GOOD, live(true), true).await;
    switch(&sim, &name("n-1")).await;
    assert_eq!(sim.chaining_mode(&name("n-1")).as_deref(), Some("portmap"));
    assert!(sim.reachability_problems().is_empty());
}
