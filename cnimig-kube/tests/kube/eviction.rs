//! Eviction through the real API: budgets honoured, named; two budgets; UID preconditions.

use std::time::Duration;

use cnimig_core::model::{NodeName, PodRef};
use cnimig_core::ports::{Cluster, EvictOutcome};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Client;
use kube::api::Api;
use serde_json::json;

use crate::common::{
    self, create_node, create_pod, delete_node, labels, mark_running, unique, wait_until,
};

async fn pdb(client: &Client, ns: &str, name: &str, app: &str, min_available: i32) {
    cnimig_emu::setup::apply(
        client,
        &json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"minAvailable": min_available, "selector": {"matchLabels": {"app": app}}}}),
    )
    .await
    .unwrap();
}

/// Waits until the disruption controller has observed the budget with `healthy` pods.
async fn observed(client: &Client, ns: &str, name: &str, healthy: i32) {
    let api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    wait_until(
        &format!("PDB {ns}/{name} observed with {healthy} healthy"),
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let Ok(p) = api.get(name).await else {
                    return false;
                };
                let generation = p.metadata.generation.unwrap_or(0);
                p.status.is_some_and(|s| {
                    s.observed_generation.unwrap_or(0) >= generation && s.current_healthy == healthy
                })
            }
        },
    )
    .await;
}

fn pod_ref(ns: &str, name: &str, uid: &str) -> PodRef {
    PodRef {
        namespace: ns.into(),
        name: name.into(),
        uid: uid.into(),
    }
}

#[tokio::test]
async fn eviction_honours_and_names_budgets() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "evict", |ns| async move {
        let node = unique("evict");
        create_node(&admin, &node, labels(&[])).await;
        let cluster = env.cluster(common::opts(&ns));
        let app_a = json!({"metadata": {"labels": {"app": "a"}}});
        let uid0 = create_pod(&admin, &ns, "a-0", &node, app_a.clone()).await;
        let uid1 = create_pod(&admin, &ns, "a-1", &node, app_a).await;
        mark_running(&admin, &ns, "a-0", "10.42.0.10").await;
        mark_running(&admin, &ns, "a-1", "10.42.0.11").await;
        pdb(&admin, &ns, "a-budget", "a", 1).await;
        observed(&admin, &ns, "a-budget", 2).await;

        let name = NodeName::new(node.clone()).unwrap();
        let bv = cluster
            .budget_view(std::slice::from_ref(&name))
            .await
            .unwrap();
        let key = format!("{ns}/a-budget");
        assert_eq!(bv.per_node[&name], vec![(key.clone(), 2)]);
        assert_eq!(bv.allowed[&key], 1);

        // A wrong UID is the pod of another life: Gone, and nothing is evicted. (On a pod a
        // budget covers, the API server takes the disruption from the budget before the delete
        // fails on the UID, and the disruption controller gives it back only after 2 minutes:
        // so this uses a pod no budget covers.)
        create_pod(&admin, &ns, "c-0", &node, json!({})).await;
        mark_running(&admin, &ns, "c-0", "10.42.0.13").await;
        assert_eq!(
            cluster
                .evict(&pod_ref(&ns, "c-0", "00000000-0000-0000-0000-000000000000"))
                .await
                .unwrap(),
            EvictOutcome::Gone
        );
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
        assert!(
            pods.get("c-0")
                .await
                .unwrap()
                .metadata
                .deletion_timestamp
                .is_none()
        );
        assert_eq!(
            cluster.evict(&pod_ref(&ns, "a-0", &uid0)).await.unwrap(),
            EvictOutcome::Evicted
        );
        let p0 = pods.get("a-0").await.unwrap();
        assert!(
            p0.metadata.deletion_timestamp.is_some(),
            "evicted pod is terminating"
        );

        let started = tokio::time::Instant::now();
        assert_eq!(
            cluster.evict(&pod_ref(&ns, "a-1", &uid1)).await.unwrap(),
            EvictOutcome::BlockedByBudget { pdb: key.clone() }
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a budget refusal returns at once (no client retry): {:?}",
            started.elapsed()
        );
        assert_eq!(
            cluster.evict(&pod_ref(&ns, "nope", &uid1)).await.unwrap(),
            EvictOutcome::Gone,
            "a pod that does not exist is Gone"
        );

        // Two budgets over one pod: the API server's 500, both named.
        let uid_b = create_pod(
            &admin,
            &ns,
            "b-0",
            &node,
            json!({"metadata": {"labels": {"app": "b"}}}),
        )
        .await;
        mark_running(&admin, &ns, "b-0", "10.42.0.12").await;
        pdb(&admin, &ns, "b-one", "b", 0).await;
        pdb(&admin, &ns, "b-two", "b", 0).await;
        observed(&admin, &ns, "b-one", 1).await;
        observed(&admin, &ns, "b-two", 1).await;
        assert_eq!(
            cluster.evict(&pod_ref(&ns, "b-0", &uid_b)).await.unwrap(),
            EvictOutcome::MultipleBudgets {
                pdbs: vec![format!("{ns}/b-one"), format!("{ns}/b-two")]
            }
        );

        // delete_pod keys on the UID too: a wrong one leaves the pod alone.
        cluster
            .delete_pod(&pod_ref(&ns, "b-0", "00000000-0000-0000-0000-000000000000"))
            .await
            .unwrap();
        assert!(
            pods.get("b-0")
                .await
                .unwrap()
                .metadata
                .deletion_timestamp
                .is_none()
        );
        cluster
            .delete_pod(&pod_ref(&ns, "b-0", &uid_b))
            .await
            .unwrap();
        assert!(
            pods.get("b-0")
                .await
                .unwrap()
                .metadata
                .deletion_timestamp
                .is_some()
        );
        delete_node(&admin, &node).await;
    })
    .await;
}

/// Confirms what preflight's `pdb-blocking` rule relies on: for an integer `minAvailable` the
/// disruption controller's `expectedPods` is the number of matching pods that exist, not the
/// controller's scale (which it uses for `maxUnavailable`). A StatefulSet of 3 whose first pod
/// can never start (OrderedReady creates the next only once it is Ready) has one pod: the
/// `minAvailable: 1` budget expects 1 pod, the `maxUnavailable: 1` budget over the same pods 3.
/// So while a pod is being replaced an integer-minAvailable budget reads one lower.
#[tokio::test]
async fn integer_min_available_expects_the_pods_that_exist_not_the_scale() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "expected", |ns| async move {
        cnimig_emu::setup::apply(
            &admin,
            &json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
                    "metadata": {"name": "db", "namespace": ns},
                    "spec": {"replicas": 3, "serviceName": "db",
                             "selector": {"matchLabels": {"app": "db"}},
                             "template": {"metadata": {"labels": {"app": "db"}},
                                          "spec": {"nodeSelector": {"cnimig.io/no-such-node": "x"},
                                                   "containers": [{"name": "c", "image": "busybox:1.36"}]}}}}),
        )
        .await
        .unwrap();
        pdb(&admin, &ns, "db-min", "db", 1).await;
        cnimig_emu::setup::apply(
            &admin,
            &json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                    "metadata": {"name": "db-max", "namespace": ns},
                    "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "db"}}}}),
        )
        .await
        .unwrap();
        let api: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), &ns);
        let expected = |name: &'static str, want: i32| {
            let api = api.clone();
            async move {
                wait_until(
                    &format!("PDB {name} observed with expectedPods {want}"),
                    Duration::from_secs(120),
                    || {
                        let api = api.clone();
                        async move {
                            api.get(name)
                                .await
                                .ok()
                                .and_then(|p| p.status)
                                .is_some_and(|s| s.expected_pods == want)
                        }
                    },
                )
                .await;
            }
        };
        expected("db-min", 1).await;
        expected("db-max", 3).await;
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
        let existing = pods.list(&Default::default()).await.unwrap().items.len();
        assert_eq!(existing, 1, "OrderedReady made only db-0");

        // The adapter reads the same numbers into the model preflight judges.
        let cluster = env.cluster(common::opts(&ns));
        let inv = cluster.inventory().await.unwrap();
        let read = |name: &str| {
            inv.pdbs
                .iter()
                .find(|p| p.namespace == ns && p.name == name)
                .map(|p| p.expected_pods)
        };
        assert_eq!(read("db-min"), Some(1));
        assert_eq!(read("db-max"), Some(3));
    })
    .await;
}
