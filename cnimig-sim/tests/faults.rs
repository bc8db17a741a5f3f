//! Injected faults: seeded and replayable, counted by kind, and each behaving as the real failure
//! would.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use std::time::Duration;

use cnimig_core::machine::NodeRecord;
use cnimig_core::model::{NodeName, OwnerKind, Time};
use cnimig_core::ports::{
    Clock, Cluster, EvictOutcome, NewCni, PortError, StateStore, Verification, Verifier,
};
use cnimig_sim::{FaultKind, NodeJoin, SimCluster, SimFaults, ViolationKind};
use common::*;

const CLUSTER: &str = r"
nodes:
  - {name: n, count: 3, zones: [a, b]}
workloads:
  - {kind: Deployment, name: web, replicas: 3}
  - {kind: StatefulSet, name: db, replicas: 2, pdb: {maxUnavailable: 1}}
  - {kind: DaemonSet, name: shipper}
  - {kind: DaemonSet, name: hostds, hostNetwork: true}
calico: {autodetection: kubernetes-internal-ip}
";

fn api_faults(ppm: u32) -> SimFaults {
    SimFaults {
        api_error_ppm: ppm,
        ..SimFaults::default()
    }
}

/// The same calls against a cluster built from `seed` with API errors at `ppm`: what each returned.
async fn calls(seed: u64, ppm: u32) -> (Vec<String>, cnimig_sim::SimStats) {
    let sim = SimCluster::new(
        cnimig_sim::Scenario::from_yaml(CLUSTER).unwrap(),
        params(),
        seed,
    )
    .unwrap();
    sim.set_faults(api_faults(ppm)).unwrap();
    let n = name("n-1");
    let mut out = Vec::new();
    for i in 0..400u64 {
        let r = match i % 5 {
            0 => sim.node_view(&n).await.map(|_| ()),
            1 => sim.set_unschedulable(&n, i % 2 == 0).await,
            2 => sim.load().await.map(|_| ()),
            3 => sim
                .acquire_lock("me", Time(i * 1000), Duration::from_secs(60))
                .await
                .map(|_| ()),
            _ => sim.node_names().await.map(|_| ()),
        };
        out.push(format!("{r:?}"));
    }
    (out, sim.stats())
}

#[tokio::test]
async fn api_errors_are_seeded_and_replay() {
    let (a, sa) = calls(7, 150_000).await;
    let (b, sb) = calls(7, 150_000).await;
    assert_eq!(a, b, "the same seed fails the same calls the same way");
    assert_eq!(sa.faults_injected, sb.faults_injected);
    let (c, _) = calls(8, 150_000).await;
    assert_ne!(a, c, "another seed fails other calls");
    let (none, s0) = calls(7, 0).await;
    assert!(
        none.iter().all(|r| r.starts_with("Ok")),
        "no faults when off"
    );
    assert_eq!(s0.total_faults(), 0);
    let failed = a.iter().filter(|r| r.starts_with("Err")).count();
    assert!(
        (30..=100).contains(&failed),
        "about 15% of 400 calls fail: {failed}"
    );
    assert_eq!(sa.total_faults() as usize, failed);
}

#[tokio::test]
async fn each_api_error_kind_maps_to_its_port_error_and_409s_spare_the_state_store() {
    let sim = sim(CLUSTER);
    sim.set_faults(api_faults(1_000_000)).unwrap();
    let n = name("n-2");
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..400u64 {
        let e = if i % 2 == 0 {
            sim.set_unschedulable(&n, false).await.unwrap_err()
        } else {
            let r = NodeRecord::new(Time(i));
            match sim.save(&n, None, &r).await {
                Err(e) => e,
                // A timeout after the save landed: the next save with `None` conflicts for real.
                Ok(()) => unreachable!("every call fails at 100%"),
            }
        };
        match &e {
            PortError::Unavailable { detail, .. } => {
                assert!(detail.contains("500") || detail.contains("503"), "{e}");
                seen.insert(if detail.contains("500") { "500" } else { "503" });
            }
            PortError::Throttled { .. } => {
                seen.insert("429");
            }
            PortError::Conflict { what } => {
                assert!(
                    i % 2 == 0 || !what.contains("injected"),
                    "no injected 409 on save: {e}"
                );
                seen.insert("409");
            }
            PortError::Timeout { .. } => {
                seen.insert("timeout");
            }
            other => panic!("unexpected {other}"),
        }
        assert!(e.is_transient() || matches!(e, PortError::Conflict { .. }));
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["409", "429", "500", "503", "timeout"]
    );
    let stats = sim.stats();
    for k in [
        FaultKind::Api500,
        FaultKind::Api503,
        FaultKind::Api429,
        FaultKind::Api409,
        FaultKind::ApiTimeout,
        FaultKind::ApiTimeoutApplied,
    ] {
        assert!(
            stats.faults_injected.get(&k).copied().unwrap_or(0) > 0,
            "{k}"
        );
    }
}

#[tokio::test]
async fn a_write_that_times_out_may_have_landed() {
    let sim = sim(CLUSTER);
    sim.set_faults(SimFaults {
        api_error_ppm: 1_000_000,
        api_error_methods: ["Cluster::set_unschedulable".to_string()].into(),
        ..SimFaults::default()
    })
    .unwrap();
    let n = name("n-1");
    // Try until a timeout that landed comes up.
    for _ in 0..200 {
        let before = sim.node(&n).unwrap().unschedulable;
        let r = sim.set_unschedulable(&n, !before).await;
        let after = sim.node(&n).unwrap().unschedulable;
        match r {
            Err(PortError::Timeout { .. }) if after != before => return,
            Err(_) => assert_eq!(after, before, "only timeouts may land"),
            Ok(()) => panic!("every call fails"),
        }
    }
    panic!("no timeout after the write landed in 200 calls");
}

#[tokio::test]
async fn a_joining_node_brings_its_daemonset_pods_and_agent() {
    let sim = sim(CLUSTER);
    install(&sim, false).await;
    let joined = name("n-4");
    sim.set_faults(SimFaults {
        node_joins: vec![NodeJoin {
            name: joined.clone(),
            at: Time(200_000),
            zone: Some("b".into()),
            control_plane: false,
        }],
        node_not_ready_at: vec![(joined.clone(), Time(400_000))],
        node_ready_at: vec![(joined.clone(), Time(500_000))],
        ..SimFaults::default()
    })
    .unwrap();
    assert!(!sim.node_names().await.unwrap().contains(&joined));
    sim.sleep_until(Time(199_000)).await;
    assert!(sim.node(&joined).is_none());
    sim.sleep_until(Time(300_000)).await;
    let node = sim.node(&joined).unwrap();
    assert!(node.ready && !node.unschedulable);
    assert_eq!(node.zone.as_deref(), Some("b"));
    let pods = sim.pods_on(&joined);
    let ds: Vec<_> = pods
        .iter()
        .filter(|p| p.owner == OwnerKind::DaemonSet)
        .map(|p| p.pod.name.split('-').next().unwrap_or("").to_string())
        .collect();
    for want in ["shipper", "hostds", "cilium"] {
        assert!(ds.iter().any(|d| d == want), "{want} in {ds:?}");
    }
    assert!(pods.iter().all(|p| p.ready), "{pods:?}");
    let agent = sim.agent(&joined).await.unwrap().unwrap();
    assert!(agent.ready && agent.node_config.is_none());
    assert!(sim.node_pod_cidr(&joined).is_some());
    sim.sleep_until(Time(450_000)).await;
    assert!(
        !sim.node(&joined).unwrap().ready,
        "its NotReady fault applies"
    );
    sim.sleep_until(Time(550_000)).await;
    assert!(sim.node(&joined).unwrap().ready, "and it comes back");
    let f = sim.stats().faults_injected;
    assert_eq!(f.get(&FaultKind::NodeJoined), Some(&1));
    assert_eq!(f.get(&FaultKind::NodeNotReady), Some(&1));
    // A joining node may not take an existing name.
    assert!(
        sim.set_faults(SimFaults {
            node_joins: vec![NodeJoin {
                name: name("n-1"),
                at: Time(0),
                zone: None,
                control_plane: false,
            }],
            ..SimFaults::default()
        })
        .is_err()
    );
}

#[tokio::test]
async fn a_pod_ignoring_its_grace_period_takes_long_to_go() {
    let sim = sim(CLUSTER);
    sim.set_faults(SimFaults {
        slow_termination_pods: ["default/db".to_string()].into(),
        slow_termination: Duration::from_secs(900),
        ..SimFaults::default()
    })
    .unwrap();
    let db = pods_named(&sim, "db-0").remove(0);
    let web = pods_named(&sim, "web-").remove(0);
    assert_eq!(sim.evict(&db.pod).await.unwrap(), EvictOutcome::Evicted);
    assert_eq!(sim.evict(&web.pod).await.unwrap(), EvictOutcome::Evicted);
    sim.sleep_until(Time(60_000)).await;
    assert!(
        sim.pods().iter().all(|p| p.pod.uid != web.pod.uid),
        "web went in 10 s"
    );
    assert!(
        sim.pods()
            .iter()
            .any(|p| p.pod.uid == db.pod.uid && p.terminating)
    );
    sim.sleep_until(Time(901_000)).await;
    assert!(sim.pods().iter().all(|p| p.pod.uid != db.pod.uid));
    assert_eq!(
        sim.stats().faults_injected.get(&FaultKind::SlowTermination),
        Some(&1)
    );
}

#[tokio::test]
async fn verification_fails_on_a_faulty_node_once_it_is_labelled() {
    let sim = sim(CLUSTER);
    install(&sim, false).await;
    let n = name("n-3");
    sim.set_faults(SimFaults {
        verify_fails: [n.clone()].into(),
        ..SimFaults::default()
    })
    .unwrap();
    // Not labelled: its Calico pods are the only problem.
    let before = sim.verify_node(&n).await.unwrap();
    assert!(
        matches!(&before, Verification::Unhealthy(p) if p.iter().all(|x| !x.contains("injected")))
    );
    let rec = migrate_node(&sim, &n, Duration::from_secs(1800)).await;
    assert_eq!(rec.phase, cnimig_core::machine::Phase::RolledBack);
    let cause = rec.rollback.unwrap().cause;
    assert!(
        cause.starts_with("step Verify") && cause.contains("injected"),
        "{cause}"
    );
    assert_eq!(
        sim.stats().faults_injected.get(&FaultKind::VerifyFailed),
        Some(&1)
    );
}

#[tokio::test]
async fn an_action_without_its_record_is_a_write_ahead_violation() {
    let sim = sim(CLUSTER);
    sim.check_write_ahead(true);
    let n = name("n-1");
    sim.set_unschedulable(&n, true).await.unwrap();
    let v = sim.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].kind, ViolationKind::WriteAhead);
    // With the record saved first, the same action is fine.
    let m = name("n-2");
    sim.save(&m, None, &NodeRecord::new(Time(0))).await.unwrap();
    sim.set_unschedulable(&m, true).await.unwrap();
    let write_ahead = sim
        .violations()
        .iter()
        .filter(|v| v.kind == ViolationKind::WriteAhead)
        .count();
    assert_eq!(write_ahead, 1);
}

#[tokio::test]
async fn a_cut_off_caller_gets_nothing_through_until_reconnected() {
    let sim = sim(CLUSTER);
    sim.cut_off_after(Some(3));
    let n: NodeName = name("n-1");
    for _ in 0..3 {
        assert!(sim.node_view(&n).await.is_ok());
    }
    assert!(!sim.is_cut_off());
    assert!(sim.node_view(&n).await.is_err());
    assert!(sim.is_cut_off());
    assert!(sim.set_unschedulable(&n, true).await.is_err());
    assert!(
        !sim.node(&n).unwrap().unschedulable,
        "nothing lands after the cut"
    );
    sim.cut_off_after(None);
    assert!(sim.set_unschedulable(&n, true).await.is_ok());
    assert_eq!(sim.stats().total_faults(), 0, "a cut is not a fault");
}
