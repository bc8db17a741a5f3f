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

/// A node without the emulator's annotations is a real one, whose agent config and CNI directory
/// this adapter cannot read yet: the plan's preflight fails naming it (and only it), and the run
/// refuses before any write: no Lease, no cordon, no record.
#[tokio::test]
async fn a_real_node_is_refused_before_any_write() {
    use cnimig_core::config::{MigrationConfig, NodeScope};
    use cnimig_core::model::LabelSelector;
    use cnimig_core::orchestrator::{Orchestrator, Ports, RunError, RunOptions};
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, Patch, PatchParams};

    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "real-node", |ns| async move {
        crate::calico::calico_objects(&admin).await;
        let mut cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
        cfg.scope = NodeScope::Selector(LabelSelector {
            match_labels: labels(&[("cnimig.io/e2e", &ns)]),
            match_expressions: Vec::new(),
        });
        let live = cnimig_core::cilium::rendered_config(
            &cfg,
            cnimig_core::cilium::ValueInputs::default(),
            cnimig_core::cilium::CiliumPhase::Migration,
        );
        common::cilium_config(&admin, &ns, serde_json::to_value(&live).unwrap()).await;
        let real = format!("{ns}-real");
        let emulated = format!("{ns}-emulated");
        for n in [&real, &emulated] {
            create_node(&admin, n, labels(&[("cnimig.io/e2e", &ns)])).await;
        }
        let nodes: Api<Node> = Api::all(admin.clone());
        let calico = serde_json::to_string(&cnimig_core::ports::CniDirState::CALICO).unwrap();
        nodes
            .patch(
                &emulated,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {
                    cnimig_kube::CNI_DIR_ANNOTATION: calico}}})),
            )
            .await
            .unwrap();

        let mut opts = common::opts(&ns);
        opts.node_selector = Some(format!("cnimig.io/e2e={ns}"));
        let cluster = env.cluster(opts);
        let orch = Orchestrator::new(
            Ports::from_one(cluster.clone()),
            cfg,
            RunOptions {
                holder: format!("real-{ns}"),
                ..RunOptions::default()
            },
        );
        let (_, plan) = orch.plan().await.unwrap();
        let fails: Vec<String> = plan
            .preflight
            .with_id("node-observability")
            .filter(|c| c.severity == cnimig_core::preflight::Severity::Fail)
            .map(|c| c.message.clone())
            .collect();
        assert_eq!(fails.len(), 1, "{}", plan.preflight);
        assert!(
            fails[0].starts_with(&format!("1 node in scope ({real}): "))
                && fails[0].contains(&real),
            "{fails:?}"
        );
        assert!(!fails[0].contains(&emulated), "{fails:?}");
        assert!(
            fails[0].contains(cnimig_kube::CNI_DIR_ANNOTATION),
            "{fails:?}"
        );

        match orch.run(&plan, &cnimig_core::events::Discard).await {
            Err(RunError::Preflight(why)) => {
                assert!(
                    why.iter().any(|l| l.contains("[node-observability]")),
                    "{why:?}"
                );
            }
            other => panic!("a run on a real node must be refused: {other:?}"),
        }
        let leases: Api<Lease> = Api::namespaced(admin.clone(), &ns);
        assert!(
            leases
                .get_opt(&format!("cnimig-lock-{ns}"))
                .await
                .unwrap()
                .is_none(),
            "the refused run took the Lease"
        );
        for n in [&real, &emulated] {
            let node = nodes.get(n).await.unwrap();
            assert_ne!(
                node.spec.and_then(|s| s.unschedulable),
                Some(true),
                "{n} cordoned"
            );
            assert!(
                !node
                    .metadata
                    .annotations
                    .unwrap_or_default()
                    .contains_key(cnimig_core::machine::STATE_ANNOTATION),
                "{n} has a record"
            );
        }
        for n in [&real, &emulated] {
            delete_node(&admin, n).await;
        }
    })
    .await;
}
