//! Cordon, label, node_view with its field selector.

use cnimig_core::model::{NodeName, NodeRole, PodNetwork};
use cnimig_core::ports::Cluster;
use serde_json::json;

use crate::common::{self, create_node, create_pod, delete_node, labels, mark_running, unique};

#[tokio::test]
async fn cordon_uncordon_and_labels() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "nodes", |ns| async move {
        let node = unique("cordon");
        create_node(
            &admin,
            &node,
            labels(&[("node-role.kubernetes.io/etcd", "true")]),
        )
        .await;
        let other = unique("cordon-other");
        create_node(&admin, &other, labels(&[])).await;
        let cluster = env.cluster(common::opts(&ns));
        common::cilium_config(
            &admin,
            &ns,
            json!({"cluster-pool-ipv4-cidr": "10.245.0.0/16"}),
        )
        .await;
        let name = NodeName::new(node.clone()).unwrap();

        create_pod(&admin, &ns, "calico-pod", &node, json!({})).await;
        mark_running(&admin, &ns, "calico-pod", "10.42.0.7").await;
        create_pod(&admin, &ns, "cilium-pod", &node, json!({})).await;
        mark_running(&admin, &ns, "cilium-pod", "10.245.3.4").await;
        create_pod(
            &admin,
            &ns,
            "host-pod",
            &node,
            json!({"spec": {"hostNetwork": true}}),
        )
        .await;
        create_pod(&admin, &ns, "elsewhere", &other, json!({})).await;

        let v = cluster.node_view(&name).await.unwrap();
        assert!(!v.node.unschedulable && v.node.ready);
        assert_eq!(v.node.roles, vec![NodeRole::Etcd]);
        let mut pods: Vec<(&str, PodNetwork)> = v
            .pods
            .iter()
            .map(|p| (p.pod.name.as_str(), p.network))
            .collect();
        pods.sort();
        assert_eq!(
            pods,
            vec![
                ("calico-pod", PodNetwork::Calico),
                ("cilium-pod", PodNetwork::Cilium),
                ("host-pod", PodNetwork::Host)
            ],
            "only the node's pods, each on its network"
        );

        cluster.set_unschedulable(&name, true).await.unwrap();
        assert!(cluster.node_view(&name).await.unwrap().node.unschedulable);
        cluster.set_unschedulable(&name, false).await.unwrap();
        assert!(!cluster.node_view(&name).await.unwrap().node.unschedulable);

        let key = "io.cilium.migration/cilium-default";
        cluster
            .set_node_label(&name, key, Some("true"))
            .await
            .unwrap();
        let v = cluster.node_view(&name).await.unwrap();
        assert_eq!(v.node.labels.get(key).map(String::as_str), Some("true"));
        assert_eq!(
            v.node
                .labels
                .get("node-role.kubernetes.io/etcd")
                .map(String::as_str),
            Some("true"),
            "a merge patch keeps the other labels"
        );
        cluster.set_node_label(&name, key, None).await.unwrap();
        assert!(
            !cluster
                .node_view(&name)
                .await
                .unwrap()
                .node
                .labels
                .contains_key(key)
        );

        assert!(cluster.node_names().await.unwrap().contains(&name));
        let gone = NodeName::new(unique("gone")).unwrap();
        match cluster.node_view(&gone).await {
            Err(cnimig_core::ports::PortError::NotFound { what }) => {
                assert!(what.contains(gone.as_str()), "{what}");
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
        delete_node(&admin, &node).await;
        delete_node(&admin, &other).await;
    })
    .await;
}

#[tokio::test]
async fn inventory_reads_the_service_cidr() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "inventory", |ns| async move {
        let cluster = env.cluster(common::opts(&ns));
        let inv = cluster.inventory().await.unwrap();
        assert_eq!(inv.service_cidr.to_string(), "10.96.0.0/16");
        use cnimig_core::ports::Verifier;
        // verify_cluster's minimal check runs with the SA's permissions.
        cluster.verify_cluster().await.unwrap();
    })
    .await;
}
