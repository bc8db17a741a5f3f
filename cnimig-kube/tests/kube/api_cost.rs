//! Issue #5: cnimig never reads the cluster's pods by a LIST per node or per look. On a cluster
//! small enough (`KubeOptions::one_pod_watch_max_pods`) a run reads every pod from one watch; on
//! a larger one, a node's pods from a watch with a field selector (`spec.nodeName`) per node.
//! Counted from the control plane's audit log by the adapter's own User-Agent over a whole plan
//! and run of 6 emulated nodes.

use std::collections::BTreeMap;
use std::time::Duration;

use cnimig_core::cilium::{CiliumPhase, ValueInputs, rendered_config};
use cnimig_core::config::{MigrationConfig, NodeScope};
use cnimig_core::machine::Phase;
use cnimig_core::model::LabelSelector;
use cnimig_core::orchestrator::{Orchestrator, Ports, RunOptions};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::json;

use crate::common::{self, wait_until};

const NODES: usize = 6;

/// A large cluster (here: the limit set to 0): one pod watch a node, by field selector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cluster_wide_pod_list_per_node() {
    count_a_run(true).await;
}

/// A small cluster (the default limit): one pod watch for the whole run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pod_watch_for_a_small_cluster() {
    count_a_run(false).await;
}

async fn count_a_run(per_node: bool) {
    let env = crate::env_or_skip!();
    let Some(audit) = std::env::var_os("CNIMIG_TESTENV_AUDIT_LOG") else {
        panic!("CNIMIG_TESTENV_AUDIT_LOG unset: source the test control plane's env file");
    };
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "apicost", |ns| async move {
        crate::calico::calico_objects(&admin).await;
        let mut cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
        cfg.scope = NodeScope::Selector(LabelSelector {
            match_labels: BTreeMap::from([("cnimig.io/e2e".to_string(), ns.clone())]),
            match_expressions: Vec::new(),
        });
        cfg.max_in_flight = 3;
        cfg.poll_interval = Duration::from_millis(300);
        cfg.drain_timeout = Duration::from_secs(120);
        cfg.step_timeout = Duration::from_secs(60);
        let live = rendered_config(&cfg, ValueInputs::default(), CiliumPhase::Migration);
        common::cilium_config(&admin, &ns, serde_json::to_value(&live).unwrap()).await;
        let mut ecfg = cnimig_emu::EmuConfig::new(&format!("{ns}-n"), NODES);
        ecfg.cilium_namespace = ns.clone();
        ecfg.node_labels = BTreeMap::from([("cnimig.io/e2e".to_string(), ns.clone())]);
        let node_names = ecfg.nodes.clone();
        let emu = cnimig_emu::start(admin.clone(), ecfg).await.unwrap();
        // Only the agents (DaemonSets) tolerate every taint. The Deployment's pods must not:
        // a pod tolerating `node.kubernetes.io/unschedulable` is scheduled back onto the emptiest
        // node, which is the cordoned one being drained, so each replacement is evicted again and,
        // under load, the drain chases it until its timeout (what kept this test ignored).
        let template = |app: &str, host: bool| json!({"metadata": {"labels": {"app": app, "k8s-app": app}},
            "spec": {"nodeSelector": {"cnimig.io/e2e": ns}, "hostNetwork": host, "terminationGracePeriodSeconds": 1,
                     "tolerations": if host { json!([{"operator": "Exists"}]) } else { json!([]) },
                     "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}});
        let mut objs = vec![
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": ns},
                   "spec": {"replicas": NODES, "selector": {"matchLabels": {"app": "web"}}, "template": template("web", false)}}),
            json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "web", "namespace": ns},
                   "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}}}),
        ];
        for label in ["cilium", "calico-node"] {
            objs.push(json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": label, "namespace": ns},
                "spec": {"selector": {"matchLabels": {"k8s-app": label}}, "template": template(label, true)}}));
        }
        for o in objs {
            cnimig_emu::setup::apply(&admin, &o).await.unwrap();
        }
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
        wait_until("pods Running", Duration::from_secs(180), || {
            let pods = pods.clone();
            async move {
                let Ok(l) = pods.list(&ListParams::default()).await else { return false };
                l.items.iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")).count()
                    == 3 * NODES
            }
        })
        .await;

        let agent = format!("cnimig-api-cost-test/{ns}");
        let mut sa = env.sa_config.clone();
        sa.headers.push((http::header::USER_AGENT, http::HeaderValue::from_str(&agent).unwrap()));
        let mut opts = common::opts(&ns);
        opts.node_selector = Some(format!("cnimig.io/e2e={ns}"));
        if per_node {
            opts.one_pod_watch_max_pods = 0;
        }
        let cluster = cnimig_kube::KubeCluster::new(sa, opts).unwrap();
        let orch = Orchestrator::new(
            Ports::from_one(cluster),
            cfg,
            RunOptions { holder: format!("apicost-{ns}"), ..RunOptions::default() },
        );
        let start = std::fs::metadata(&audit).map_or(0, |m| m.len());
        let (_, plan) = orch.plan().await.unwrap();
        let report = tokio::time::timeout(Duration::from_secs(600), orch.run(&plan, &cnimig_core::events::Discard))
            .await
            .expect("the run ends")
            .unwrap();
        assert_eq!(report.count(Phase::Done), NODES, "{report:#?}");
        emu.stop();
        let bytes = std::fs::read(&audit).unwrap();
        let window = String::from_utf8_lossy(&bytes[usize::try_from(start).unwrap().min(bytes.len())..]).into_owned();

        let ours = cnimig_kube::metrics::audit_counts_by_agent(&window, &agent);
        let unfiltered = cnimig_kube::metrics::unfiltered_pod_reads(&window, &agent);
        if per_node {
            // Every node's pods were read by node (the selector names it), through the node's
            // pod watch: one WATCH a node (a streaming list), or a LIST and a WATCH where the
            // server does not stream lists...
            for n in &node_names {
                let by_node = format!("fieldSelector=spec.nodeName%3D{n}");
                assert!(window.lines().any(|l| l.contains(&agent) && l.contains(&by_node)), "no pod read by node for {n}");
            }
            assert!(ours.get("watch pods").copied().unwrap_or(0) >= NODES as u64, "no pod watch per node: {ours:?}");
            // ...once each, not once per look (polling LISTed them about twenty times a node): at
            // most a relist each besides, and the inventory.
            let lists = ours.get("list pods").copied().unwrap_or(0);
            assert!(lists <= 2 * NODES as u64 + 1, "{lists} pod LISTs for {NODES} nodes: polling again? {ours:?}");
            // ...and the whole cluster's pods at most once (the plan's inventory), not per node.
            assert!(unfiltered.len() <= 1, "{} cluster-wide pod reads for {NODES} nodes: {unfiltered:?}", unfiltered.len());
        } else {
            // One pod watch for the run, not one a node: the inventory's LIST, the run's WATCH
            // (and its LIST where the server does not stream lists).
            let watches = ours.get("watch pods").copied().unwrap_or(0);
            assert!(watches >= 1 && watches < NODES as u64, "{watches} pod watches for {NODES} nodes: {ours:?}");
            let lists = ours.get("list pods").copied().unwrap_or(0);
            assert!(lists <= 2, "{lists} pod LISTs for {NODES} nodes with one pod watch: {ours:?}");
            assert!(unfiltered.len() <= 3, "{} cluster-wide pod reads: {unfiltered:?}", unfiltered.len());
        }
        for n in &node_names {
            common::delete_node(&admin, n).await;
        }
    })
    .await;
}
