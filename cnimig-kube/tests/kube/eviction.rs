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
