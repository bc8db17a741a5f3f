//! Single steps on the real API, without the emulator: the agent patch and its exact,
//! exactly-once restore (also under a race), the RKE2 HelmChartConfig fix, Argo CD pause and
//! restore, the RKE1 plugin through the management cluster.

use std::time::Duration;

use cnimig_rancher::agent::ORIGINAL_ANNOTATION;
use cnimig_rancher::plan::{Action, When};
use cnimig_rancher::{Management, RancherCluster, RancherOptions};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Client;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind};
use serde_json::{Value, json};

use crate::common;

/// The agent Deployment as Rancher ships it (the parts that matter), pinned to `node_label`.
pub fn agent_deployment(ns: &str, node_label: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "cattle-cluster-agent", "namespace": ns, "labels": {"app": "cattle-cluster-agent"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "cattle-cluster-agent"}},
            "template": {"metadata": {"labels": {"app": "cattle-cluster-agent"}},
                "spec": {"nodeSelector": {"cnimig.io/e2e": node_label},
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "cluster-register", "image": "rancher/rancher-agent:v2.8.5",
                        "env": [{"name": "CATTLE_CLUSTER", "value": "true"},
                                {"name": "CATTLE_SERVER", "value": "https://rancher.example"}],
                        "ports": [{"containerPort": 80}, {"containerPort": 443}, {"containerPort": 444}]}]}}}})
}

/// cnimig's RancherCluster as the ServiceAccount, its objects in `ns`, with the management
/// cluster (the same control plane) naming `cluster` when given.
pub fn rancher(
    env: &common::Env,
    ns: &str,
    cluster: Option<String>,
    pause_gitops: bool,
) -> RancherCluster {
    let client = Client::try_from(env.sa_config.clone()).unwrap();
    let mut opts = RancherOptions {
        agent_namespace: ns.to_string(),
        system_namespace: ns.to_string(),
        // Only the RKE2-shaped tests put a calico-node DaemonSet "in calico-system".
        calico_namespace: format!("{ns}-calico-system"),
        argo_namespace: Some(ns.to_string()),
        node_selector: Some(format!("cnimig.io/e2e={ns}")),
        agent_ready_timeout: Duration::from_secs(90),
        poll: Duration::from_millis(300),
        ..RancherOptions::default()
    };
    opts.config.pause_gitops = pause_gitops;
    opts.config.system_namespace = ns.to_string();
    let mgmt = cluster.map(|c| Management {
        client: client.clone(),
        cluster: c,
        fleet_namespace: Some(ns.to_string()),
    });
    RancherCluster::new(client, env.sa_config.cluster_url.to_string(), opts, mgmt)
}

pub fn template(d: &Deployment) -> Value {
    serde_json::to_value(&d.spec.as_ref().unwrap().template).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_is_restored_exactly_and_once() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    crate::rancher_crds(&admin).await;
    common::with_temp_ns(admin.clone(), "ragent", |ns| async move {
        crate::rancher_rbac(&admin, &ns).await;
        cnimig_emu::setup::apply(&admin, &agent_deployment(&ns, "nowhere"))
            .await
            .unwrap();
        let deps: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
        let before = deps.get("cattle-cluster-agent").await.unwrap();
        let r = rancher(&env, &ns, None, false);
        assert!(r.agent_to_host_network().await.unwrap());
        let on = deps.get("cattle-cluster-agent").await.unwrap();
        let spec = on.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(spec.host_network, Some(true));
        assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
        assert!(
            on.metadata
                .annotations
                .as_ref()
                .unwrap()
                .contains_key(ORIGINAL_ANNOTATION)
        );
        assert!(
            !r.agent_to_host_network().await.unwrap(),
            "a second prepare changes nothing"
        );
        // Two runs restore at once: exactly one of them does it.
        let r2 = r.clone();
        let (a, b) = tokio::join!(r.restore_agent(), r2.restore_agent());
        assert_eq!(
            u8::from(a.unwrap()) + u8::from(b.unwrap()),
            1,
            "restored exactly once"
        );
        let after = deps.get("cattle-cluster-agent").await.unwrap();
        assert_eq!(
            template(&after),
            template(&before),
            "the pod template is exactly as before"
        );
        assert!(
            !after
                .metadata
                .annotations
                .unwrap_or_default()
                .contains_key(ORIGINAL_ANNOTATION)
        );
        assert!(!r.restore_agent().await.unwrap());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rke2_helm_chart_config_and_argo_pause_on_the_api() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    crate::rancher_crds(&admin).await;
    common::with_temp_ns(admin.clone(), "rhcc", |ns| async move {
        crate::rancher_rbac(&admin, &ns).await;
        let r = rancher(&env, &ns, None, true);
        // No HelmChartConfig yet: created with the fix.
        assert!(r.rke2_helm_chart_config().await.unwrap());
        assert!(!r.rke2_helm_chart_config().await.unwrap(), "idempotent");
        let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("helm.cattle.io", "v1", "HelmChartConfig"), "helmchartconfigs");
        let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &ns, &ar);
        api.delete("rke2-calico", &DeleteParams::default()).await.unwrap();
        // An existing one with other values: they are kept.
        cnimig_emu::setup::apply(&admin, &json!({"apiVersion": "helm.cattle.io/v1", "kind": "HelmChartConfig",
            "metadata": {"name": "rke2-calico", "namespace": ns},
            "spec": {"valuesContent": "installation:\n  calicoNetwork:\n    mtu: 1400\n    nodeAddressAutodetectionV4:\n      firstFound: true\n"}})).await.unwrap();
        assert!(r.rke2_helm_chart_config().await.unwrap());
        let v = serde_json::to_value(api.get("rke2-calico").await.unwrap()).unwrap();
        let values: Value = serde_yaml_ng::from_str(v["spec"]["valuesContent"].as_str().unwrap()).unwrap();
        assert_eq!(values["installation"]["calicoNetwork"]["mtu"], 1400);
        assert_eq!(values["installation"]["calicoNetwork"]["nodeAddressAutodetectionV4"], json!({"kubernetes": "NodeInternalIP"}));

        // Argo CD: an Application self-healing Calico is paused and restored exactly.
        let app = json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
            "metadata": {"name": "cni", "namespace": ns},
            "spec": {"project": "default", "source": {"repoURL": "https://git.example/infra", "chart": "rke2-calico"},
                     "syncPolicy": {"automated": {"prune": true, "selfHeal": true}, "syncOptions": ["ServerSideApply=true"]}}});
        cnimig_emu::setup::apply(&admin, &app).await.unwrap();
        let aar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("argoproj.io", "v1alpha1", "Application"), "applications");
        let apps: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &ns, &aar);
        let spec_before = serde_json::to_value(apps.get("cni").await.unwrap()).unwrap()["spec"].clone();
        let plan = r.plan().await.unwrap();
        assert!(plan.steps.iter().any(|s| matches!(&s.action, Action::ArgoPause { name, .. } if name == "cni")), "{plan}");
        assert!(r.argo_pause(&ns, "cni").await.unwrap());
        let paused = serde_json::to_value(apps.get("cni").await.unwrap()).unwrap();
        assert!(paused.pointer("/spec/syncPolicy/automated").is_none());
        assert!(!r.argo_pause(&ns, "cni").await.unwrap());
        // The restore step is still planned from the paused state (a resumed run).
        let plan = r.plan().await.unwrap();
        assert!(plan.steps_at(When::AfterLastNode).any(|s| matches!(&s.action, Action::ArgoRestore { name, .. } if name == "cni")), "{plan}");
        assert!(r.argo_restore(&ns, "cni").await.unwrap());
        assert!(!r.argo_restore(&ns, "cni").await.unwrap());
        let restored = serde_json::to_value(apps.get("cni").await.unwrap()).unwrap();
        assert_eq!(restored["spec"], spec_before);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rke1_network_plugin_through_the_management_cluster() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    crate::rancher_crds(&admin).await;
    common::with_temp_ns(admin.clone(), "rrke1", |ns| async move {
        crate::rancher_rbac(&admin, &ns).await;
        let id = format!("c-{}", &ns[ns.len() - 8..]);
        cnimig_emu::setup::apply(&admin, &json!({"apiVersion": "management.cattle.io/v3", "kind": "Cluster",
            "metadata": {"name": id},
            "spec": {"displayName": "prod", "rancherKubernetesEngineConfig": {"network": {"plugin": "calico", "options": {"calico_cloud_provider": "none"}}}}})).await.unwrap();
        let r = rancher(&env, &ns, Some(id.clone()), false);
        assert!(r.rke1_plugin_none().await.unwrap());
        assert!(!r.rke1_plugin_none().await.unwrap(), "already none");
        let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("management.cattle.io", "v3", "Cluster"), "clusters");
        let api: Api<DynamicObject> = Api::all_with(admin.clone(), &ar);
        let c = serde_json::to_value(api.get(&id).await.unwrap()).unwrap();
        assert_eq!(c["spec"]["rancherKubernetesEngineConfig"]["network"]["plugin"], "none");
        assert_eq!(c["spec"]["rancherKubernetesEngineConfig"]["network"]["options"]["calico_cloud_provider"], "none");
        let _ = api.delete(&id, &DeleteParams::default()).await;
        // The provisioning Cluster's cni switch is refused before every node is on Cilium.
        let r2 = rancher(&env, &ns, Some(format!("{ns}/prod")), false);
        cnimig_emu::setup::apply(&admin, &json!({"apiVersion": "provisioning.cattle.io/v1", "kind": "Cluster",
            "metadata": {"name": "prod", "namespace": ns},
            "spec": {"rkeConfig": {"machineGlobalConfig": {"cni": "calico"}}}})).await.unwrap();
        let mut plan = r2.plan().await.unwrap();
        // This namespace has no nodes, so the distribution is generic: add the RKE2 step by hand.
        plan.steps.push(cnimig_rancher::plan::Step { when: When::AfterLastNode,
            action: Action::Rke2CniSwitch { target: "none".into() }, describe: "cni switch".into() });
        let e = r2.finish(&plan, false).await.unwrap_err();
        assert!(e.to_string().contains("only once every node is on Cilium"), "{e}");
        let pr = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("provisioning.cattle.io", "v1", "Cluster"), "clusters");
        let papi: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &ns, &pr);
        let c = serde_json::to_value(papi.get("prod").await.unwrap()).unwrap();
        assert_eq!(c["spec"]["rkeConfig"]["machineGlobalConfig"]["cni"], "calico", "nothing changed");
    })
    .await;
}
