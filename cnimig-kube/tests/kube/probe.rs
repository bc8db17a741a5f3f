//! The per-node probe against the real control plane: `ProbeVerifier` creates a pod pinned to
//! each just-migrated node, the emulator finishes it from the shared reachability model, and the
//! verifier reads its termination message. A healthy migration ends Done with no probe pod left;
//! a firewall between the nodes and the API server fails the first node's probe, which rolls
//! back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cnimig_core::config::{MigrationConfig, NodeScope};
use cnimig_core::machine::Phase;
use cnimig_core::model::LabelSelector;
use cnimig_core::orchestrator::{Orchestrator, Ports, RunOptions, RunReport};
use cnimig_emu::goldpinger::SharedFirewall;
use cnimig_kube::probe::{ProbeOptions, ProbeVerifier};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::json;

use crate::common;

/// Three emulated nodes with Cilium's and Calico's DaemonSets, a cluster DNS Deployment and a
/// web Deployment; runs a migration with the probe and returns its report.
async fn run(env: &common::Env, ns: &str, firewall: SharedFirewall) -> RunReport {
    let admin = env.admin.clone();
    let mut cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
    cfg.scope = NodeScope::Selector(LabelSelector {
        match_labels: BTreeMap::from([("cnimig.io/e2e".to_string(), ns.to_string())]),
        match_expressions: Vec::new(),
    });
    cfg.poll_interval = Duration::from_millis(300);
    cfg.drain_timeout = Duration::from_secs(60);
    cfg.step_timeout = Duration::from_secs(20);
    crate::calico::calico_objects(&admin).await;
    let (ecfg, _) = common::emulated_cluster(&admin, ns, &cfg, 3).await;
    let node_names = ecfg.nodes.clone();
    let emu = cnimig_emu::start(admin.clone(), ecfg).await.unwrap();
    let mut pcfg = cnimig_emu::probe::ProbeEmuConfig::new(firewall);
    pcfg.cilium_namespace = ns.to_string();
    pcfg.nodes = Some(node_names.clone());
    let responder = cnimig_emu::probe::respond(admin.clone(), pcfg);
    let mut objs = Vec::new();
    for (name, label, replicas) in [("web", "web", 2), ("coredns", "kube-dns", 1)] {
        objs.push(json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"k8s-app": label}},
                     "template": {"metadata": {"labels": {"k8s-app": label}},
                        "spec": {"nodeSelector": {"cnimig.io/e2e": ns},
                                 "terminationGracePeriodSeconds": 1,
                                 "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}}}}));
    }
    objs.extend(cnimig_emu::setup::agent_daemon_sets(
        ns,
        "registry.k8s.io/pause:3.10",
        &json!([]),
    ));
    for o in objs {
        cnimig_emu::setup::apply(&admin, &o).await.unwrap();
    }
    cnimig_emu::setup::wait_ready_pods(&admin, ns, 9, Duration::from_secs(120))
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let mut opts = common::opts(ns);
    opts.node_selector = Some(format!("cnimig.io/e2e={ns}"));
    let cluster = env.cluster(opts);
    let mut ports = Ports::from_one(cluster.clone());
    ports.verifier = Arc::new(ProbeVerifier::new(
        cluster.clone(),
        cluster.clone(),
        ProbeOptions {
            timeout: Duration::from_secs(20),
            ..ProbeOptions::default()
        },
    ));
    let orch = Orchestrator::new(
        ports,
        cfg,
        RunOptions {
            holder: format!("probe-{ns}"),
            ..RunOptions::default()
        },
    );
    let report = common::plan_and_run(&orch, Duration::from_secs(400)).await;
    let probes: Vec<String> = pods
        .list(&ListParams::default().labels("cnimig.io/helper=probe"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert!(probes.is_empty(), "probe pods left behind: {probes:?}");
    drop(responder);
    emu.stop();
    for n in &node_names {
        common::delete_node(&admin, n).await;
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_passes_on_a_healthy_migration() {
    let env = crate::env_or_skip!();
    common::with_temp_ns(env.admin.clone(), "probe", |ns| async move {
        let report = run(&env, &ns, SharedFirewall::default()).await;
        assert_eq!(report.count(Phase::Done), 3, "{report:#?}");
        assert!(report.stopped.is_none(), "{report:#?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_cannot_reach_the_api_server_rolls_the_node_back() {
    let env = crate::env_or_skip!();
    common::with_temp_ns(env.admin.clone(), "probefw", |ns| async move {
        let firewall = SharedFirewall::default();
        {
            let mut f = firewall.lock().unwrap();
            for i in 0..3 {
                f.blocked_node_pairs.insert((
                    format!("{ns}-n-{i:02}"),
                    cnimig_emu::probe::API_SERVER_NODE.to_string(),
                ));
            }
        }
        let report = run(&env, &ns, firewall).await;
        let failed = common::the_rolled_back_node(&report);
        let cause = failed.cause.clone().unwrap_or_default();
        assert!(cause.contains("step Verify"), "{cause}");
        assert!(cause.contains("cannot reach the API server"), "{cause}");
        assert!(cause.contains(failed.node.as_str()), "{cause}");
    })
    .await;
}
