//! Kubernetes behaviour: the Eviction API with budgets, controllers' replacements, scheduling.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use cnimig_core::model::{OwnerKind, PodPhase, PodRef};
use cnimig_core::ports::{Clock, Cluster, EvictOutcome};
use common::*;

const CLUSTER: &str = r"
nodes:
  - {name: n, count: 3, zones: [a, b, c]}
workloads:
  - {kind: Deployment, name: web, replicas: 3, pdb: {maxUnavailable: 1}}
  - {kind: StatefulSet, name: db, replicas: 3, pdb: {minAvailable: 2}}
  - {kind: Deployment, name: two, replicas: 2}
  - {kind: DaemonSet, name: agent, namespace: kube-system}
  - {kind: Pod, name: lonely, nodes: [n-1]}
pdbs:
  - {name: two-a, selector: {app: two}, maxUnavailable: 1}
  - {name: two-b, selector: {app: two}, minAvailable: 1}
";

#[tokio::test]
async fn eviction_honours_budgets_like_the_api_server() {
    let sim = sim(CLUSTER);
    let web = pods_named(&sim, "web-");
    assert_eq!(web.len(), 3);
    assert_eq!(sim.evict(&web[0].pod).await.unwrap(), EvictOutcome::Evicted);
    // The budget is spent until the replacement is Ready.
    assert_eq!(
        sim.evict(&web[1].pod).await.unwrap(),
        EvictOutcome::BlockedByBudget {
            pdb: "default/web".into()
        }
    );
    // Evicting the terminating pod again is accepted (already being deleted).
    assert_eq!(sim.evict(&web[0].pod).await.unwrap(), EvictOutcome::Evicted);
    // The Pending replacement skips the budget check.
    let pending: Vec<_> = pods_named(&sim, "web-")
        .into_iter()
        .filter(|p| p.phase == PodPhase::Pending)
        .collect();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        sim.evict(&pending[0].pod).await.unwrap(),
        EvictOutcome::Evicted
    );
    // Wrong UID: gone (409 precondition), as is a pod that does not exist.
    let mut wrong = web[1].pod.clone();
    wrong.uid = "00000000-0000-4000-8000-ffffffffffff".into();
    assert_eq!(sim.evict(&wrong).await.unwrap(), EvictOutcome::Gone);
    let ghost = PodRef {
        namespace: "default".into(),
        name: "ghost".into(),
        uid: "nope".into(),
    };
    assert_eq!(sim.evict(&ghost).await.unwrap(), EvictOutcome::Gone);
    // Two budgets: 500, never succeeds.
    let two = pods_named(&sim, "two-");
    match sim.evict(&two[0].pod).await.unwrap() {
        EvictOutcome::MultipleBudgets { pdbs } => assert_eq!(
            pdbs,
            vec!["default/two-a".to_string(), "default/two-b".into()]
        ),
        other => panic!("{other:?}"),
    }
    // Once the replacements are Ready the budget allows a disruption again.
    sim.sleep_until(secs(20)).await;
    assert_eq!(pods_named(&sim, "web-").len(), 3);
    assert_eq!(sim.evict(&web[1].pod).await.unwrap(), EvictOutcome::Evicted);
    let s = sim.stats();
    assert_eq!(
        (
            s.evictions_attempted,
            s.evictions_accepted,
            s.evictions_blocked,
            s.evictions_multiple_budgets,
            s.evictions_gone
        ),
        (8, 4, 1, 1, 2)
    );
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

#[tokio::test]
async fn replicaset_replaces_at_once_statefulset_after_the_old_pod_is_gone() {
    let sim = sim(CLUSTER);
    let web = pods_named(&sim, "web-")[0].clone();
    let db = pods_named(&sim, "db-1")[0].clone();
    sim.evict(&web.pod).await.unwrap();
    sim.evict(&db.pod).await.unwrap();
    // ReplicaSet: the replacement exists (Pending) while the old one terminates.
    let now: Vec<_> = pods_named(&sim, "web-");
    assert_eq!(now.len(), 4);
    assert_eq!(now.iter().filter(|p| p.terminating).count(), 1);
    // StatefulSet: only the terminating pod so far.
    assert_eq!(pods_named(&sim, "db-1").len(), 1);
    sim.sleep_until(secs(9)).await;
    assert_eq!(pods_named(&sim, "db-1").len(), 1);
    assert!(
        pods_named(&sim, "web-")
            .iter()
            .all(|p| p.ready || p.terminating),
        "web replacement ready after 5 s"
    );
    sim.sleep_until(secs(10)).await;
    let db1 = pods_named(&sim, "db-1");
    assert_eq!(db1.len(), 1);
    assert_eq!(db1[0].pod.name, "db-1", "same name");
    assert_ne!(db1[0].pod.uid, db.pod.uid, "new UID");
    assert!(!db1[0].ready);
    assert_eq!(pods_named(&sim, "web-").len(), 3, "old web pod gone");
    sim.sleep_until(secs(15)).await;
    assert!(pods_named(&sim, "db-1")[0].ready);
    assert_eq!(Clock::now(&sim), secs(15));
}

#[tokio::test]
async fn daemonset_pods_come_back_in_place_bare_pods_do_not() {
    let sim = sim(CLUSTER);
    let agent = sim
        .pods_on(&name("n-2"))
        .into_iter()
        .find(|p| p.owner == OwnerKind::DaemonSet)
        .unwrap();
    let lonely = pods_named(&sim, "lonely")[0].clone();
    assert_eq!(lonely.owner, OwnerKind::None);
    sim.delete_pod(&agent.pod).await.unwrap();
    sim.evict(&lonely.pod).await.unwrap();
    sim.sleep_until(secs(9)).await;
    let on2: Vec<_> = sim
        .pods_on(&name("n-2"))
        .into_iter()
        .filter(|p| p.owner == OwnerKind::DaemonSet)
        .collect();
    assert_eq!(on2.len(), 1);
    assert!(
        on2[0].terminating,
        "no new DaemonSet pod before the old one is gone"
    );
    sim.sleep_until(secs(10)).await;
    let on2: Vec<_> = sim
        .pods_on(&name("n-2"))
        .into_iter()
        .filter(|p| p.owner == OwnerKind::DaemonSet)
        .collect();
    assert_eq!(on2.len(), 1);
    assert_ne!(on2[0].pod.uid, agent.pod.uid);
    assert!(
        pods_named(&sim, "lonely").is_empty(),
        "a bare pod is gone for good"
    );
    // Deleting a pod that is gone is fine.
    sim.delete_pod(&agent.pod).await.unwrap();
}

#[tokio::test]
async fn delete_pod_ignores_budgets_and_the_sim_records_the_breach() {
    let sim = sim(CLUSTER);
    let web = pods_named(&sim, "web-");
    sim.delete_pod(&web[0].pod).await.unwrap();
    sim.delete_pod(&web[1].pod).await.unwrap();
    let v = sim.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].kind, cnimig_sim::ViolationKind::Pdb);
    assert!(v[0].message.contains("default/web"), "{}", v[0].message);
    let h = sim
        .pdb_health()
        .into_iter()
        .find(|h| h.pdb == "default/web")
        .unwrap();
    assert_eq!((h.healthy, h.desired, h.allowed), (1, 2, 0));
}

#[tokio::test]
async fn scheduler_spreads_zones_avoids_cordoned_nodes_and_retries_pending_pods() {
    let sim = sim(r"
nodes:
  - {name: a, zone: z1, cpu: 1, memory: 1Gi}
  - {name: b, zone: z2, cpu: 1, memory: 1Gi}
workloads:
  - {kind: Deployment, name: web, replicas: 2, requests: {cpu: 600m, memory: 128Mi}}
  - {kind: Deployment, name: tol, replicas: 1, toleratesUnschedulable: true, requests: {cpu: 100m}}
");
    let on = |n: &str| {
        sim.pods_on(&name(n))
            .iter()
            .filter(|p| p.pod.name.starts_with("web-"))
            .count()
    };
    assert_eq!((on("a"), on("b")), (1, 1), "one per zone");
    sim.set_unschedulable(&name("a"), true).await.unwrap();
    let web_a = sim
        .pods_on(&name("a"))
        .into_iter()
        .find(|p| p.pod.name.starts_with("web-"))
        .unwrap();
    sim.evict(&web_a.pod).await.unwrap();
    // No room on b (600m + 600m > 1 core) and a is cordoned: Pending, unbound.
    let pending: Vec<_> = pods_named(&sim, "web-")
        .into_iter()
        .filter(|p| p.node.is_none())
        .collect();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].phase, PodPhase::Pending);
    // A pod tolerating unschedulable may land on the cordoned node.
    let tol = pods_named(&sim, "tol-")[0].clone();
    sim.evict(&tol.pod).await.unwrap();
    let tol2: Vec<_> = pods_named(&sim, "tol-")
        .into_iter()
        .filter(|p| !p.terminating)
        .collect();
    assert!(tol2[0].node.is_some());
    // Uncordon: the pending pod is scheduled (back on a, once the old pod has left).
    sim.sleep_until(secs(10)).await;
    sim.set_unschedulable(&name("a"), false).await.unwrap();
    let web: Vec<_> = pods_named(&sim, "web-");
    assert_eq!(web.len(), 2);
    assert!(web.iter().all(|p| p.node.is_some()), "{web:?}");
    sim.sleep_until(secs(20)).await;
    assert!(pods_named(&sim, "web-").iter().all(|p| p.ready));
}

#[tokio::test]
async fn node_views_and_budget_views() {
    let sim = sim(CLUSTER);
    let inv = sim.inventory().await.unwrap();
    assert_eq!(inv.nodes.len(), 3);
    assert_eq!(inv.pdbs.len(), 4);
    assert_eq!(
        sim.node_names().await.unwrap(),
        vec![name("n-1"), name("n-2"), name("n-3")]
    );
    let view = sim.node_view(&name("n-1")).await.unwrap();
    assert!(
        view.pods
            .iter()
            .all(|p| p.node.as_ref() == Some(&name("n-1")))
    );
    assert!(sim.node_view(&name("nope")).await.is_err());
    let bv = sim
        .budget_view(&[name("n-1"), name("n-2"), name("n-3")])
        .await
        .unwrap();
    let total_web: u32 = bv
        .per_node
        .values()
        .flatten()
        .filter(|(k, _)| k == "default/web")
        .map(|(_, c)| c)
        .sum();
    assert_eq!(total_web, 3);
    assert_eq!(bv.allowed["default/web"], 1);
    assert_eq!(bv.allowed["default/db"], 1);
    assert_eq!(bv.allowed["default/two-b"], 1);
    // Initial pods: all Running, Ready, on Calico with addresses from the pool.
    let pool: ipnet::Ipv4Net = "10.42.0.0/16".parse().unwrap();
    for p in &inv.pods {
        assert!(p.ready && p.phase == PodPhase::Running);
        assert!(pool.contains(&p.ip.unwrap()), "{p:?}");
    }
}
