//! The clock, the state store, and the invariant checks the simulator records.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use std::time::Duration;

use cnimig_core::machine::{NodeRecord, Phase};
use cnimig_core::model::{PodNetwork, Time};
use cnimig_core::ports::{Clock, Cluster, LockOutcome, NewCni, PortError, StateStore};
use cnimig_sim::{OpKind, RandomSpec, Scenario, SimCluster, SimParams, ViolationKind};
use common::*;
use rand::SeedableRng;

const CLUSTER: &str = r"
nodes:
  - {name: cp, roles: [control-plane], zone: a}
  - {name: w, count: 3, zones: [a, b, c]}
workloads:
  - {kind: Deployment, name: web, replicas: 3, pdb: {maxUnavailable: 1}, nodeRoles: [worker]}
calico: {autodetection: kubernetes-internal-ip}
";

fn kinds(sim: &SimCluster) -> Vec<ViolationKind> {
    sim.violations().iter().map(|v| v.kind).collect()
}

#[tokio::test]
async fn the_clock_processes_events_in_time_order_and_never_goes_back() {
    let sim = sim(CLUSTER);
    assert_eq!(Clock::now(&sim), Time(0));
    let web = pods_named(&sim, "web-");
    sim.evict(&web[0].pod).await.unwrap(); // gone at 10 s; replacement Ready at 5 s
    assert_eq!(sim.next_event(), Some(secs(5)));
    sim.sleep_until(Time(4_999)).await;
    assert_eq!(Clock::now(&sim), Time(4_999));
    assert_eq!(sim.pdb_health()[0].healthy, 2);
    sim.sleep_until(secs(5)).await;
    assert_eq!(sim.pdb_health()[0].healthy, 3);
    sim.sleep_until(Time(9_999)).await;
    assert_eq!(pods_named(&sim, "web-").len(), 4);
    sim.sleep_until(secs(10)).await;
    assert_eq!(pods_named(&sim, "web-").len(), 3);
    sim.sleep_until(secs(3)).await;
    assert_eq!(Clock::now(&sim), secs(10), "time never goes back");
    assert_eq!(sim.next_event(), None);
    assert_eq!(sim.stats().events_processed, 2);
    // settle() runs everything due.
    sim.evict(&pods_named(&sim, "web-")[1].pod).await.unwrap();
    assert_eq!(sim.settle(secs(1000)), secs(20));
}

#[tokio::test]
async fn the_state_store_is_compare_and_swap() {
    let sim = sim(CLUSTER);
    let n = name("w-1");
    let r1 = NodeRecord::new(Time(1));
    let mut r2 = r1.clone();
    r2.phase = Phase::Cordoned;
    sim.save(&n, None, &r1).await.unwrap();
    assert!(matches!(
        sim.save(&n, None, &r2).await,
        Err(PortError::Conflict { .. })
    ));
    assert!(matches!(
        sim.save(&n, Some(&r2), &r2).await,
        Err(PortError::Conflict { .. })
    ));
    sim.save(&n, Some(&r1), &r2).await.unwrap();
    assert_eq!(sim.load().await.unwrap()[&n], r2);
    assert!(matches!(
        sim.save(&name("nope"), None, &r1).await,
        Err(PortError::NotFound { .. })
    ));
    sim.set_annotation(&n, Some("{not json".into())).unwrap();
    assert!(matches!(sim.load().await, Err(PortError::Invalid { .. })));
    assert!(matches!(
        sim.save(&n, Some(&r2), &r1).await,
        Err(PortError::Conflict { .. })
    ));
}

#[tokio::test]
async fn the_lock_has_one_holder_until_it_expires() {
    let sim = sim(CLUSTER);
    let ttl = Duration::from_secs(60);
    assert_eq!(
        sim.acquire_lock("a", Time(0), ttl).await.unwrap(),
        LockOutcome::Acquired
    );
    assert_eq!(
        sim.acquire_lock("b", secs(10), ttl).await.unwrap(),
        LockOutcome::HeldBy {
            holder: "a".into(),
            until: secs(60)
        }
    );
    assert_eq!(
        sim.acquire_lock("a", secs(30), ttl).await.unwrap(),
        LockOutcome::Acquired,
        "renewed to 90 s"
    );
    sim.release_lock("b").await.unwrap();
    assert!(matches!(
        sim.acquire_lock("b", secs(89), ttl).await.unwrap(),
        LockOutcome::HeldBy { .. }
    ));
    assert_eq!(
        sim.acquire_lock("b", secs(90), ttl).await.unwrap(),
        LockOutcome::Acquired,
        "expired"
    );
    sim.release_lock("b").await.unwrap();
    assert_eq!(
        sim.acquire_lock("a", secs(91), ttl).await.unwrap(),
        LockOutcome::Acquired
    );
}

#[tokio::test]
async fn steps_out_of_order_are_recorded() {
    let sim = sim(CLUSTER);
    install(&sim, false).await;
    let (w1, w2) = (name("w-1"), name("w-2"));
    let label = cfg().migration_label;
    // Label before cordon.
    sim.set_node_label(&w1, &label, Some("true")).await.unwrap();
    assert_eq!(kinds(&sim), vec![ViolationKind::Order]);
    // Label while drainable pods remain.
    sim.set_unschedulable(&w2, true).await.unwrap();
    sim.set_node_label(&w2, &label, Some("true")).await.unwrap();
    assert!(
        sim.violations()[1].message.contains("drainable pod"),
        "{:?}",
        sim.violations()
    );
    // Uncordon while labelled and the agent has not restarted with the config.
    sim.set_unschedulable(&w2, false).await.unwrap();
    assert!(
        sim.violations()[2].message.contains("uncordoned"),
        "{:?}",
        sim.violations()
    );
    // Other labels are not the migration's business.
    sim.set_node_label(&w1, "example.com/x", Some("true"))
        .await
        .unwrap();
    assert_eq!(sim.violations().len(), 3);
    let log = sim.op_log();
    assert_eq!(log.len(), 5);
    assert_eq!(log[1].kind, OpKind::Cordon);
    assert!(
        sim.set_node_label(&w1, "bad key!", Some("x"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn control_plane_before_the_workers_is_recorded() {
    let sim = sim(CLUSTER);
    install(&sim, false).await;
    // A worker in flight (record not terminal) when the control-plane node starts.
    sim.save(&name("w-1"), None, &NodeRecord::new(Time(0)))
        .await
        .unwrap();
    sim.set_unschedulable(&name("cp"), true).await.unwrap();
    assert!(
        sim.violations()[0]
            .message
            .contains("control-plane node cp"),
        "{:?}",
        sim.violations()
    );
    // A worker acted on after the control plane started.
    sim.set_unschedulable(&name("w-3"), true).await.unwrap();
    assert!(
        sim.violations()
            .iter()
            .any(|v| v.message.contains("worker w-3")),
        "{:?}",
        sim.violations()
    );
    // Out of scope, or with control-plane-last off, nothing is recorded.
    let sim = common::sim(CLUSTER);
    sim.set_scope(vec![name("cp"), name("w-2")]).unwrap();
    sim.set_unschedulable(&name("cp"), true).await.unwrap();
    sim.set_unschedulable(&name("w-3"), true).await.unwrap();
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
    assert!(sim.set_scope(vec![name("zz")]).is_err());
    let sim = common::sim(CLUSTER);
    sim.set_control_plane_last(false);
    sim.set_unschedulable(&name("cp"), true).await.unwrap();
    sim.set_unschedulable(&name("w-3"), true).await.unwrap();
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

#[tokio::test]
async fn starting_a_node_while_its_budget_is_promised_elsewhere_is_oversubscription() {
    let sim = sim(CLUSTER);
    // w-1 is cordoned and still holds a web pod: the budget's only disruption is promised.
    sim.set_unschedulable(&name("w-1"), true).await.unwrap();
    assert!(sim.violations().is_empty());
    sim.set_unschedulable(&name("w-2"), true).await.unwrap();
    assert_eq!(kinds(&sim), vec![ViolationKind::Oversubscribed]);
    assert!(sim.violations()[0].message.contains("default/web"));
    // Once w-1 is drained (and labelled) the budget is free again.
    let sim = common::sim(CLUSTER);
    sim.set_unschedulable(&name("w-1"), true).await.unwrap();
    let web = sim
        .pods_on(&name("w-1"))
        .into_iter()
        .find(|p| p.pod.name.starts_with("web-"))
        .unwrap();
    sim.evict(&web.pod).await.unwrap();
    sim.sleep_until(secs(30)).await;
    sim.set_unschedulable(&name("w-2"), true).await.unwrap();
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

#[tokio::test]
async fn random_clusters_migrate_without_violations() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let spec = RandomSpec::new(6);
    let (mut not_ready, mut pre_cordoned, mut done) = (0, 0, 0);
    for round in 0..25 {
        let s = Scenario::random(&mut rng, &spec);
        let yaml = s.to_yaml();
        let sim = SimCluster::new(s, SimParams::default(), round).unwrap();
        install(&sim, true).await;
        let nodes = sim.inventory().await.unwrap().nodes;
        let mut order: Vec<_> = nodes.iter().filter(|n| !n.is_control_plane()).collect();
        order.extend(nodes.iter().filter(|n| n.is_control_plane()));
        for n in order {
            let rec = migrate_node(&sim, &n.name, Duration::from_secs(3600)).await;
            let after = sim.node(&n.name).unwrap();
            not_ready += usize::from(!n.ready);
            pre_cordoned += usize::from(n.unschedulable);
            done += usize::from(rec.phase == Phase::Done);
            if n.ready {
                assert_eq!(
                    rec.phase,
                    Phase::Done,
                    "round {round} node {}: {rec:?}\n{yaml}",
                    n.name
                );
                assert!(sim.is_fully_migrated(&n.name));
            } else {
                assert_eq!(
                    rec.phase,
                    Phase::RolledBack,
                    "round {round} node {}: {rec:?}\n{yaml}",
                    n.name
                );
            }
            assert_eq!(
                after.unschedulable, n.unschedulable,
                "cordon state restored"
            );
        }
        assert!(
            sim.violations().is_empty(),
            "round {round}: {:#?}\n{yaml}",
            sim.violations()
        );
        assert!(
            sim.pods()
                .iter()
                .filter(|p| p.ready && !p.host_network)
                .all(|p| p.network == PodNetwork::Cilium
                    || nodes
                        .iter()
                        .any(|n| !n.ready && p.node.as_ref() == Some(&n.name)))
        );
        assert!(sim.cni_dir(&nodes[0].name).await.unwrap().cilium_conflist);
    }
    assert!(
        not_ready > 0 && pre_cordoned > 0 && done > 40,
        "{not_ready} {pre_cordoned} {done}"
    );
}
