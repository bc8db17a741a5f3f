//! Cilium: live config, the node config at the served version, agents, CNI dir, verification,
//! the restore helper.

use std::time::Duration;

use cnimig_core::cilium::{CiliumNodeConfig, ValueInputs};
use cnimig_core::config::MigrationConfig;
use cnimig_core::model::NodeName;
use cnimig_core::ports::{CniDirState, NewCni, Verification, Verifier};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::json;

use crate::common::{
    self, create_node, create_pod, delete_node, labels, mark_running, unique, wait_until,
};

fn cnc(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cilium.io", version, "CiliumNodeConfig"),
        "ciliumnodeconfigs",
    )
}

#[tokio::test]
async fn node_config_live_config_and_agents() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "cilium", |ns| async move {
        let cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
        common::cilium_config(&admin, &ns, json!({"cluster-pool-ipv4-cidr": "10.245.0.0/16", "ipam": "cluster-pool"})).await;
        let cilium = env.cluster(common::opts(&ns));
        let live = cilium.live_config().await.unwrap();
        assert_eq!(live["ipam"], "cluster-pool");

        // The node config goes in at v2, the version the CRD serves and cnimig prefers.
        let nc = CiliumNodeConfig::for_migration(&cfg, ValueInputs::default());
        cilium.apply_node_config(&nc).await.unwrap();
        cilium.apply_node_config(&nc).await.unwrap(); // idempotent
        let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &ns, &cnc("v2"));
        let obj = api.get(&nc.name).await.unwrap();
        assert_eq!(
            obj.data["spec"]["defaults"]["write-cni-conf-when-ready"],
            "/host/etc/cni/net.d/05-cilium.conflist"
        );
        let managed = obj.metadata.managed_fields.unwrap_or_default();
        let ours = managed
            .iter()
            .find(|m| m.manager.as_deref() == Some("cnimig"))
            .expect("cnimig's managed fields");
        assert_eq!(ours.api_version.as_deref(), Some("cilium.io/v2"));
        assert_eq!(ours.operation.as_deref(), Some("Apply"));

        // The agent on a node: UID, readiness and the node config it resolved.
        let node = unique("agent");
        create_node(&admin, &node, labels(&[])).await;
        let name = NodeName::new(node.clone()).unwrap();
        assert_eq!(cilium.agent(&name).await.unwrap(), None);
        let uid = create_pod(
            &admin,
            &ns,
            "cilium-x1",
            &node,
            json!({"metadata": {"labels": {"k8s-app": "cilium"},
                                "annotations": {"cnimig.io/resolved-node-config": "cilium-default"}},
                   "spec": {"hostNetwork": true}}),
        )
        .await;
        let a = cilium.agent(&name).await.unwrap().expect("agent");
        assert_eq!((a.pod_uid.as_str(), a.ready, a.node_config.as_deref()), (uid.as_str(), false, Some("cilium-default")));
        mark_running(&admin, &ns, "cilium-x1", "192.0.2.10").await;
        assert!(cilium.agent(&name).await.unwrap().expect("agent").ready);
        cilium.restart_agent(&name, "not-the-uid").await.unwrap();
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
        assert!(pods.get("cilium-x1").await.unwrap().metadata.deletion_timestamp.is_none());
        cilium.restart_agent(&name, &uid).await.unwrap();
        assert!(pods.get("cilium-x1").await.unwrap().metadata.deletion_timestamp.is_some());

        // The CNI directory, as the emulator's annotation shows it.
        assert_eq!(cilium.cni_dir(&name).await.unwrap(), CniDirState::CALICO);
        let nodes: Api<Node> = Api::all(admin.clone());
        nodes
            .patch(
                &node,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {
                    "cnimig.io/emulated-cni-dir": serde_json::to_string(&CniDirState::CILIUM).unwrap()}}})),
            )
            .await
            .unwrap();
        assert_eq!(cilium.cni_dir(&name).await.unwrap(), CniDirState::CILIUM);
        delete_node(&admin, &node).await;
    })
    .await;
}

#[tokio::test]
async fn verify_node_wants_cilium_endpoints() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "verify", |ns| async move {
        common::cilium_config(
            &admin,
            &ns,
            json!({"cluster-pool-ipv4-cidr": "10.245.0.0/16"}),
        )
        .await;
        let cluster = env.cluster(common::opts(&ns));
        let node = unique("verify");
        create_node(&admin, &node, labels(&[])).await;
        let name = NodeName::new(node.clone()).unwrap();
        create_pod(&admin, &ns, "web", &node, json!({})).await;
        mark_running(&admin, &ns, "web", "10.245.7.8").await;
        create_pod(
            &admin,
            &ns,
            "hostnet",
            &node,
            json!({"spec": {"hostNetwork": true}}),
        )
        .await;
        match cluster.verify_node(&name).await.unwrap() {
            Verification::Unhealthy(p) => assert!(p[0].contains("no CiliumEndpoint"), "{p:?}"),
            Verification::Healthy => panic!("a pod without a CiliumEndpoint is not Cilium-managed"),
        }
        cnimig_emu::setup::apply(
            &admin,
            &json!({"apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
                    "metadata": {"name": "web", "namespace": ns},
                    "status": {"networking": {"addressing": [{"ipv4": "10.245.7.8"}]}}}),
        )
        .await
        .unwrap();
        assert_eq!(
            cluster.verify_node(&name).await.unwrap(),
            Verification::Healthy
        );
        create_pod(&admin, &ns, "old", &node, json!({})).await;
        mark_running(&admin, &ns, "old", "10.42.1.1").await;
        match cluster.verify_node(&name).await.unwrap() {
            Verification::Unhealthy(p) => {
                assert!(p.iter().any(|m| m.contains("still on Calico")), "{p:?}")
            }
            Verification::Healthy => panic!("a Calico pod is not migrated"),
        }
        delete_node(&admin, &node).await;
    })
    .await;
}

#[tokio::test]
async fn restore_runs_a_pinned_helper_pod() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "restore", |ns| async move {
        let cluster = env.cluster(common::opts(&ns));
        let node = unique("restore");
        create_node(&admin, &node, labels(&[])).await;
        let name = NodeName::new(node.clone()).unwrap();
        let helper = cnimig_kube::restore_helper_name(&name);
        // Play the kubelet: when the helper appears, check it and mark it Succeeded.
        let kubelet = {
            let (admin, ns, helper, node) =
                (admin.clone(), ns.clone(), helper.clone(), node.clone());
            tokio::spawn(async move {
                let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
                wait_until("the helper pod", Duration::from_secs(30), || {
                    let pods = pods.clone();
                    let helper = helper.clone();
                    async move { pods.get_opt(&helper).await.ok().flatten().is_some() }
                })
                .await;
                let p = pods.get(&helper).await.unwrap();
                let spec = p.spec.clone().unwrap();
                assert_eq!(spec.node_name.as_deref(), Some(node.as_str()));
                assert_eq!(spec.host_network, Some(true));
                let vol = &spec.volumes.unwrap()[0];
                assert_eq!(vol.host_path.as_ref().unwrap().path, "/etc/cni/net.d");
                pods.patch_status(
                    &helper,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
                )
                .await
                .unwrap();
            })
        };
        cluster.restore_calico_cni(&name).await.unwrap();
        kubelet.await.unwrap();
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
        assert!(
            pods.get_opt(&helper).await.unwrap().is_none(),
            "the helper is removed"
        );
        delete_node(&admin, &node).await;
    })
    .await;
}
