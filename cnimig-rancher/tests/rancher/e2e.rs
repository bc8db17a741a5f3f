//! Whole migrations of an RKE1-shaped and an RKE2-shaped emulated cluster, with the Rancher
//! steps around the core's orchestrator (as `examples/rancher_migrate.rs` runs them), and a run
//! killed mid-way then resumed. Throughout, a watcher checks that the cluster agent's template
//! is on the host network and a Ready agent pod runs there.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cnimig_core::cilium::{CiliumPhase, ValueInputs, rendered_config};
use cnimig_core::config::{MigrationConfig, NodeScope};
use cnimig_core::machine::Phase;
use cnimig_core::model::LabelSelector;
use cnimig_core::orchestrator::{Orchestrator, Ports, RunOptions, RunReport};
use cnimig_core::ports::Verifier;
use cnimig_rancher::agent::{ORIGINAL_ANNOTATION, agent_health};
use cnimig_rancher::detect::{CalicoInstall, Distribution};
use cnimig_rancher::plan::{Action, RancherPlan, When};
use cnimig_rancher::{RancherCluster, RancherVerifier};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use serde_json::{Value, json};

use crate::common::{self, wait_until};
use crate::steps::{agent_deployment, rancher, template};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    Rke1,
    Rke2,
}

/// Emulated nodes shaped like `shape`: role labels through the emulator, then the annotations,
/// kubelet version and runtime the distribution shows.
async fn cluster(
    admin: &Client,
    ns: &str,
    shape: Shape,
    workers: usize,
    servers: usize,
) -> (cnimig_emu::EmuHandle, Vec<String>) {
    let mut ecfg = cnimig_emu::EmuConfig::new(&format!("{ns}-n"), workers + servers);
    ecfg.cilium_namespace = ns.to_string();
    ecfg.node_labels = BTreeMap::from([("cnimig.io/e2e".to_string(), ns.to_string())]);
    for (i, n) in ecfg.nodes.iter().enumerate() {
        let server = i >= workers;
        let roles: &[&str] = match (shape, server) {
            (Shape::Rke1, true) => &["controlplane", "etcd"],
            (Shape::Rke1, false) => &["worker"],
            (Shape::Rke2, true) => &["control-plane", "etcd", "master"],
            (Shape::Rke2, false) => &[],
        };
        let mut l: BTreeMap<String, String> = roles
            .iter()
            .map(|r| (format!("node-role.kubernetes.io/{r}"), "true".to_string()))
            .collect();
        if shape == Shape::Rke2 {
            l.insert("node.kubernetes.io/instance-type".into(), "rke2".into());
        }
        ecfg.extra_labels.insert(n.clone(), l);
    }
    let names = ecfg.nodes.clone();
    let emu = cnimig_emu::start(admin.clone(), ecfg).await.unwrap();
    let nodes: Api<Node> = Api::all(admin.clone());
    for n in &names {
        let (version, runtime, ann) = match shape {
            Shape::Rke1 => (
                "v1.26.15",
                "docker://20.10.24",
                json!({"rke.cattle.io/external-ip": "203.0.113.9", "rke.cattle.io/internal-ip": "10.0.0.9"}),
            ),
            Shape::Rke2 => (
                "v1.28.9+rke2r1",
                "containerd://1.7.11-k3s2",
                json!({"rke2.io/node-args": "[\"server\"]", "rke2.io/internal-ip": "10.0.0.9"}),
            ),
        };
        nodes
            .patch(
                n,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": ann}})),
            )
            .await
            .unwrap();
        nodes
            .patch_status(n, &PatchParams::default(), &Patch::Merge(json!({"status": {"nodeInfo": {"kubeletVersion": version, "containerRuntimeVersion": runtime}}})))
            .await
            .unwrap();
    }
    (emu, names)
}

fn pod_template(app: &str, ns: &str, extra: Value) -> Value {
    let mut spec = json!({"nodeSelector": {"cnimig.io/e2e": ns}, "terminationGracePeriodSeconds": 2,
        "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]});
    common::merge(&mut spec, extra);
    json!({"metadata": {"labels": {"app": app}}, "spec": spec})
}

/// Workloads (a Deployment with a budget, an ingress holding host port 80), the two CNI
/// DaemonSets, and the cluster agent. Returns how many pods to wait for.
async fn workloads(admin: &Client, ns: &str) -> usize {
    let mut objs = vec![
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": ns},
            "spec": {"replicas": 4, "selector": {"matchLabels": {"app": "web"}}, "template": pod_template("web", ns, json!({}))}}),
        json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "web", "namespace": ns},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ingress", "namespace": ns},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "ingress"}}, "template": pod_template("ingress", ns,
                json!({"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10", "ports": [{"containerPort": 80, "hostPort": 80}]}]}))}}),
        agent_deployment(ns, ns),
    ];
    for (name, label) in [("cilium", "cilium"), ("calico-node", "calico-node")] {
        objs.push(json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"matchLabels": {"k8s-app": label}},
                "template": {"metadata": {"labels": {"k8s-app": label}},
                    "spec": {"hostNetwork": true, "nodeSelector": {"cnimig.io/e2e": ns}, "terminationGracePeriodSeconds": 1,
                        "tolerations": [{"operator": "Exists"}],
                        "containers": [{"name": label, "image": "registry.k8s.io/pause:3.10"}]}}}}));
    }
    for o in objs {
        cnimig_emu::setup::apply(admin, &o).await.unwrap();
    }
    4 + 1 + 1
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn wait_pods(admin: &Client, ns: &str, expected: usize, nodes: usize) {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let want = expected + 2 * nodes;
    wait_until(
        &format!("{want} pods Running and Ready"),
        Duration::from_secs(180),
        || {
            let pods = pods.clone();
            async move {
                let Ok(l) = pods.list(&ListParams::default()).await else {
                    return false;
                };
                l.items
                    .iter()
                    .filter(|p| ready(p) && p.metadata.deletion_timestamp.is_none())
                    .count()
                    >= want
            }
        },
    )
    .await;
}

/// Samples the agent every 200 ms until stopped: each sample where its template is off the host
/// network or no Ready agent pod runs on the host network is a violation.
fn watch_agent(
    admin: Client,
    ns: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let deps: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
        let pods: Api<Pod> = Api::namespaced(admin, &ns);
        let mut samples = 0;
        let mut violations = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let (Ok(d), Ok(p)) = (
                deps.get("cattle-cluster-agent").await,
                pods.list(&ListParams::default().labels("app=cattle-cluster-agent"))
                    .await,
            ) {
                samples += 1;
                let problems = agent_health(&d, &p.items).unwrap().problems();
                if !problems.is_empty() {
                    violations.push(problems.join("; "));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (samples, violations)
    })
}

fn migration_config(ns: &str) -> MigrationConfig {
    let mut cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
    cfg.scope = NodeScope::Selector(LabelSelector {
        match_labels: BTreeMap::from([("cnimig.io/e2e".to_string(), ns.to_string())]),
        match_expressions: Vec::new(),
    });
    cfg.max_in_flight = 2;
    cfg.poll_interval = Duration::from_millis(300);
    cfg.drain_timeout = Duration::from_secs(120);
    cfg.step_timeout = Duration::from_secs(60);
    cfg
}

/// The core's orchestrator over cnimig-kube as the ServiceAccount, with the Rancher verifier.
async fn migrate(
    env: &common::Env,
    ns: &str,
    rancher: &RancherCluster,
    max_ticks: Option<u64>,
) -> RunReport {
    let cfg = migration_config(ns);
    let mut opts = common::opts(ns);
    opts.node_selector = Some(format!("cnimig.io/e2e={ns}"));
    let kube = env.cluster(opts);
    let mut ports = Ports::from_one(kube.clone());
    let inner: Arc<dyn Verifier> = Arc::new(kube);
    ports.verifier = Arc::new(RancherVerifier::new(inner, rancher.clone()));
    let orch = Orchestrator::new(
        ports,
        cfg,
        RunOptions {
            holder: format!("rancher-{ns}"),
            max_ticks,
            ..RunOptions::default()
        },
    );
    let (_, plan) = orch.plan().await.unwrap();
    let fails: Vec<String> = plan
        .preflight
        .failures()
        .map(|c| format!("{}: {}", c.id, c.message))
        .collect();
    assert!(fails.is_empty(), "preflight failed: {fails:#?}");
    let last: Vec<bool> = plan.order.iter().map(|p| p.control_plane).collect();
    assert!(
        last.windows(2).all(|w| !w[0] || w[1]),
        "control-plane nodes go last: {:?}",
        plan.order
    );
    tokio::time::timeout(
        Duration::from_secs(420),
        orch.run(&plan, &cnimig_core::events::Discard),
    )
    .await
    .expect("the migration ends within 7 minutes")
    .unwrap()
}

async fn setup_cni(admin: &Client, ns: &str) {
    // The ingress holds a hostPort (and so does the agent on the host network): portmap on.
    let live = rendered_config(
        &migration_config(ns),
        ValueInputs {
            host_port_pods: true,
        },
        CiliumPhase::Migration,
    );
    common::cilium_config(admin, ns, serde_json::to_value(&live).unwrap()).await;
}

fn done(report: &RunReport) -> bool {
    report.nodes.iter().all(|n| n.phase == Phase::Done) && !report.interrupted
}

fn has(plan: &RancherPlan, when: When, action: &Action) -> bool {
    plan.steps_at(when).any(|s| &s.action == action)
}

async fn end_to_end(shape: Shape) {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    crate::rancher_crds(&admin).await;
    common::with_temp_ns(admin.clone(), if shape == Shape::Rke1 { "rke1" } else { "rke2" }, |ns| async move {
        crate::rancher_rbac(&admin, &ns).await;
        crate::calico_objects(&admin).await;
        setup_cni(&admin, &ns).await;
        let (emu, names) = cluster(&admin, &ns, shape, 3, 1).await;
        let expected = workloads(&admin, &ns).await;
        // The distribution's objects, and a self-healing Argo CD Application over the agent.
        let mgmt_name;
        match shape {
            Shape::Rke1 => {
                mgmt_name = format!("c-{}", &ns[ns.len() - 8..]);
                cnimig_emu::setup::apply(&admin, &json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "rke-network-plugin", "namespace": ns}, "data": {"rke-network-plugin": "calico"}})).await.unwrap();
                cnimig_emu::setup::apply(&admin, &json!({"apiVersion": "management.cattle.io/v3", "kind": "Cluster",
                    "metadata": {"name": mgmt_name}, "spec": {"rancherKubernetesEngineConfig": {"network": {"plugin": "calico"}}}})).await.unwrap();
            }
            Shape::Rke2 => {
                mgmt_name = format!("{ns}/prod");
                for chart in ["rke2-calico", "rke2-calico-crd", "rke2-coredns"] {
                    cnimig_emu::setup::apply(&admin, &json!({"apiVersion": "helm.cattle.io/v1", "kind": "HelmChart",
                        "metadata": {"name": chart, "namespace": ns, "annotations": {"fleet.cattle.io/bundle-id": "rke2"}},
                        "spec": {"chart": chart, "version": "v3.27.300"}})).await.unwrap();
                }
                cnimig_emu::setup::apply(&admin, &json!({"apiVersion": "provisioning.cattle.io/v1", "kind": "Cluster",
                    "metadata": {"name": "prod", "namespace": ns},
                    "spec": {"rkeConfig": {"machineGlobalConfig": {"cni": "calico"},
                        "chartValues": {"rke2-calico": {"installation": {"calicoNetwork": {"nodeAddressAutodetectionV4": {"firstFound": true}}}}}}}})).await.unwrap();
                cnimig_emu::setup::apply(&admin, &json!({"apiVersion": "fleet.cattle.io/v1alpha1", "kind": "Bundle",
                    "metadata": {"name": "infra-cilium", "namespace": ns, "labels": {"fleet.cattle.io/repo-name": "infra"}},
                    "spec": {"resources": [{"name": "cilium/values.yaml", "content": "ipam: {mode: cluster-pool}"}]}})).await.unwrap();
            }
        }
        cnimig_emu::setup::apply(&admin, &json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
            "metadata": {"name": "rancher-agent", "namespace": ns},
            "spec": {"project": "default", "source": {"repoURL": "https://git.example/infra", "path": "cattle-system"},
                     "syncPolicy": {"automated": {"prune": true, "selfHeal": true}}},
            "status": {"resources": [{"group": "apps", "kind": "Deployment", "namespace": "cattle-system", "name": "cattle-cluster-agent"}]}})).await.unwrap();
        wait_pods(&admin, &ns, expected, names.len()).await;
        let deps: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
        let original = deps.get("cattle-cluster-agent").await.unwrap();

        // Plan: without --pause-gitops the Application fails it; with it, every step is there.
        let r = rancher(&env, &ns, Some(mgmt_name.clone()), false);
        assert!(!r.plan().await.unwrap().ok(), "a self-healing Application over the agent fails the plan");
        let r = rancher(&env, &ns, Some(mgmt_name.clone()), true);
        let plan = r.plan().await.unwrap();
        assert!(plan.ok(), "{plan}");
        let want = match shape { Shape::Rke1 => Distribution::Rke1, Shape::Rke2 => Distribution::Rke2 };
        assert_eq!(plan.detection.distribution, want, "{plan}");
        assert_eq!(plan.detection.control_plane_nodes(), vec![names[3].as_str()]);
        assert!(has(&plan, When::BeforeFirstNode, &Action::AgentToHostNetwork));
        assert!(has(&plan, When::AfterLastNode, &Action::AgentRestore));
        assert!(plan.checks.iter().any(|c| c.id == "rancher-agent-host-ports" && c.severity == cnimig_core::preflight::Severity::Warn
            && c.message.contains("ingress")), "the ingress's host port 80 is reported: {plan}");
        match shape {
            Shape::Rke1 => {
                assert_eq!(plan.detection.calico, CalicoInstall::Rke1Manifest, "{plan}");
                assert!(has(&plan, When::BeforeFirstNode, &Action::Rke1PluginNone), "{plan}");
            }
            Shape::Rke2 => {
                assert_eq!(plan.detection.calico, CalicoInstall::Rke2Chart);
                assert!(has(&plan, When::BeforeFirstNode, &Action::Rke2ProvisionedAutodetection), "{plan}");
                assert!(has(&plan, When::AfterLastNode, &Action::Rke2CniSwitch { target: "none".into() }), "{plan}");
                assert!(plan.fleet.iter().any(|b| b.name == "infra-cilium"), "{plan}");
            }
        }

        r.prepare(&plan).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = watch_agent(admin.clone(), ns.clone(), stop.clone());
        let report = migrate(&env, &ns, &r, None).await;
        assert!(done(&report), "{report:#?}");
        // Throughout: from the end of prepare to the last node Done.
        stop.store(true, Ordering::Relaxed);
        let (samples, violations) = watcher.await.unwrap();
        // The RKE2 cni switch waits for this point.
        let steps = r.finish(&plan, done(&report)).await.unwrap();
        assert!(samples > 10, "the watcher looked ({samples} samples)");
        assert!(violations.is_empty(), "the agent left the host network during the migration: {violations:?}");
        assert!(r.counters().checks.load(Ordering::Relaxed) >= names.len(), "an agent check after every node");

        let after = deps.get("cattle-cluster-agent").await.unwrap();
        assert_eq!(template(&after), template(&original), "the agent's template is exactly as before");
        assert!(!after.metadata.annotations.unwrap_or_default().contains_key(ORIGINAL_ANNOTATION));
        let aar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("argoproj.io", "v1alpha1", "Application"), "applications");
        let app = serde_json::to_value(Api::<DynamicObject>::namespaced_with(admin.clone(), &ns, &aar).get("rancher-agent").await.unwrap()).unwrap();
        assert_eq!(app["spec"]["syncPolicy"]["automated"], json!({"prune": true, "selfHeal": true}), "auto-sync restored");
        match shape {
            Shape::Rke1 => {
                let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("management.cattle.io", "v3", "Cluster"), "clusters");
                let api: Api<DynamicObject> = Api::all_with(admin.clone(), &ar);
                let c = serde_json::to_value(api.get(&mgmt_name).await.unwrap()).unwrap();
                assert_eq!(c["spec"]["rancherKubernetesEngineConfig"]["network"]["plugin"], "none");
                let _ = api.delete(&mgmt_name, &DeleteParams::default()).await;
            }
            Shape::Rke2 => {
                let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("provisioning.cattle.io", "v1", "Cluster"), "clusters");
                let c = serde_json::to_value(Api::<DynamicObject>::namespaced_with(admin.clone(), &ns, &ar).get("prod").await.unwrap()).unwrap();
                assert_eq!(c["spec"]["rkeConfig"]["machineGlobalConfig"]["cni"], "none");
                assert_eq!(c["spec"]["rkeConfig"]["chartValues"]["rke2-calico"]["installation"]["calicoNetwork"]["nodeAddressAutodetectionV4"],
                           json!({"kubernetes": "NodeInternalIP"}));
            }
        }
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "rancher e2e {shape:?}: {} nodes Done, {samples} agent samples, 0 off the host network; finish: {steps:?}", report.count(Phase::Done));
        emu.stop();
        for n in &names {
            common::delete_node(&admin, n).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rke1_cluster_migrates_with_the_agent_on_the_host_network() {
    end_to_end(Shape::Rke1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rke2_cluster_migrates_with_the_agent_on_the_host_network() {
    end_to_end(Shape::Rke2).await;
}

/// A run killed after a few ticks, Rancher redeploying the agent while nothing runs, then a new
/// run: it sees the saved original, re-patches the agent without overwriting it, migrates the
/// rest and restores the agent exactly, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_run_restores_the_agent_exactly_once() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    crate::rancher_crds(&admin).await;
    common::with_temp_ns(admin.clone(), "rresume", |ns| async move {
        crate::rancher_rbac(&admin, &ns).await;
        crate::calico_objects(&admin).await;
        setup_cni(&admin, &ns).await;
        let (emu, names) = cluster(&admin, &ns, Shape::Rke2, 3, 0).await;
        let expected = workloads(&admin, &ns).await;
        wait_pods(&admin, &ns, expected, names.len()).await;
        let deps: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
        let original = deps.get("cattle-cluster-agent").await.unwrap();

        // First run: prepare, then killed after 15 ticks.
        let first = rancher(&env, &ns, None, false);
        let plan = first.plan().await.unwrap();
        first.prepare(&plan).await.unwrap();
        let killed = migrate(&env, &ns, &first, Some(15)).await;
        assert!(killed.interrupted, "{killed:#?}");
        assert!(!done(&killed), "killed before the end");

        // Rancher re-applies its manifest meanwhile: the agent is back on the pod network, the
        // saved copy stays.
        let dp = PatchParams::default();
        deps.patch("cattle-cluster-agent", &dp, &Patch::Strategic(json!({"spec": {"template": {"spec": {"hostNetwork": false, "dnsPolicy": "ClusterFirst"}}}})))
            .await
            .unwrap();

        // Second run: a fresh RancherCluster, as a new process would have.
        let second = rancher(&env, &ns, None, false);
        let plan = second.plan().await.unwrap();
        let step = plan.steps_at(When::BeforeFirstNode).find(|s| s.action == Action::AgentToHostNetwork).unwrap();
        assert!(step.describe.contains("re-patch"), "{plan}");
        second.prepare(&plan).await.unwrap();
        let d = deps.get("cattle-cluster-agent").await.unwrap();
        assert_eq!(d.metadata.annotations.as_ref().and_then(|a| a.get(ORIGINAL_ANNOTATION)),
                   deps.get("cattle-cluster-agent").await.unwrap().metadata.annotations.as_ref().and_then(|a| a.get(ORIGINAL_ANNOTATION)));
        let saved: Value = serde_json::from_str(d.metadata.annotations.as_ref().unwrap()[ORIGINAL_ANNOTATION].as_str()).unwrap();
        assert_eq!(saved, json!({"hostNetwork": null, "dnsPolicy": "ClusterFirst"}), "the first run's original, not the redeployed state");
        let report = migrate(&env, &ns, &second, None).await;
        assert!(done(&report), "{report:#?}");
        let steps = second.finish(&plan, true).await.unwrap();
        assert!(steps.iter().any(|s| s.starts_with("restore ")), "{steps:?}");
        let after = deps.get("cattle-cluster-agent").await.unwrap();
        assert_eq!(template(&after), template(&original), "restored exactly");
        // Once: a third finish, or the first run's process coming back, changes nothing.
        let again = second.finish(&plan, true).await.unwrap();
        assert!(again.iter().all(|s| s.starts_with("(already done)")), "{again:?}");
        assert!(!first.restore_agent().await.unwrap());
        assert_eq!(deps.get("cattle-cluster-agent").await.unwrap().metadata.generation, after.metadata.generation,
            "no spec change after the restore (generation; resourceVersion also moves with the rollout's status)");
        emu.stop();
        for n in &names {
            common::delete_node(&admin, n).await;
        }
    })
    .await;
}
