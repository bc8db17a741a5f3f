//! A whole migration of 22 emulated nodes (20 workers, 2 control-plane) with Deployments,
//! StatefulSets, DaemonSets and PodDisruptionBudgets, driven by the core's `Orchestrator` over
//! `KubeCluster` as cnimig's ServiceAccount, against the real control plane and `cnimig-emu`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use cnimig_core::config::{MigrationConfig, NodeScope};
use cnimig_core::events::Event;
use cnimig_core::machine::Phase;
use cnimig_core::model::LabelSelector;
use cnimig_core::orchestrator::{Orchestrator, Ports, RunOptions};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::common::{self, wait_until};

const WORKERS: usize = 20;
const CONTROL_PLANE: usize = 2;

fn pod_template(app: &str, run: &str, extra_spec: Value) -> Value {
    let mut spec = json!({
        "nodeSelector": {"cnimig.io/e2e": run},
        "terminationGracePeriodSeconds": 5,
        "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}],
    });
    common::merge(&mut spec, extra_spec);
    json!({"metadata": {"labels": {"app": app}}, "spec": spec})
}

async fn workloads(admin: &Client, ns: &str) -> usize {
    let mut expected = 0;
    let mut objs = Vec::new();
    for (name, replicas) in [("web", 10), ("api", 8), ("cache", 6)] {
        objs.push(json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": pod_template(name, ns, json!({}))}}));
        objs.push(
            json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": name}}}}),
        );
        expected += replicas;
    }
    for (name, replicas) in [("db", 3), ("queue", 3)] {
        objs.push(json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": replicas, "serviceName": name, "podManagementPolicy": "Parallel",
                     "selector": {"matchLabels": {"app": name}},
                     "template": pod_template(name, ns, json!({}))}}));
        objs.push(
            json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"minAvailable": replicas - 1, "selector": {"matchLabels": {"app": name}}}}),
        );
        expected += replicas;
    }
    // The two DaemonSets the migration recycles: Cilium's agent and Calico's node agent.
    for (name, label) in [("cilium", "cilium"), ("calico-node", "calico-node")] {
        objs.push(json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"matchLabels": {"k8s-app": label}},
                     "template": {"metadata": {"labels": {"k8s-app": label}},
                        "spec": {"hostNetwork": true, "nodeSelector": {"cnimig.io/e2e": ns},
                                 "terminationGracePeriodSeconds": 1,
                                 "tolerations": [{"operator": "Exists"}],
                                 "containers": [{"name": label, "image": "registry.k8s.io/pause:3.10"}]}}}}));
        expected += WORKERS + CONTROL_PLANE;
    }
    for o in objs {
        cnimig_emu::setup::apply(admin, &o).await.unwrap();
    }
    expected
}

/// Watches the budgets every 200 ms: the lowest `currentHealthy - desiredHealthy` seen.
pub(crate) fn watch_budgets(
    admin: Client,
    ns: String,
    stop: Arc<AtomicBool>,
    min_margin: Arc<AtomicI32>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let api: Api<PodDisruptionBudget> = Api::namespaced(admin, &ns);
        let mut violations = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Ok(list) = api.list(&ListParams::default()).await {
                for p in list.items {
                    let Some(s) = &p.status else { continue };
                    if s.observed_generation.unwrap_or(0) < p.metadata.generation.unwrap_or(0) {
                        continue;
                    }
                    let margin = s.current_healthy - s.desired_healthy;
                    min_margin.fetch_min(margin, Ordering::Relaxed);
                    if margin < 0 {
                        violations.push(format!(
                            "{}: {} healthy < {} desired",
                            p.name_any(),
                            s.current_healthy,
                            s.desired_healthy
                        ));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        violations
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrates_twenty_two_emulated_nodes() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "e2e", |ns| async move {
        assert_eq!(cnimig_emu::emulator::AGENT_CONFIG_ANNOTATION, cnimig_kube::AGENT_CONFIG_ANNOTATION);
        assert_eq!(cnimig_emu::emulator::CNI_DIR_ANNOTATION, cnimig_kube::CNI_DIR_ANNOTATION);
        assert_eq!(cnimig_emu::emulator::HELPER_LABEL, cnimig_kube::RESTORE_HELPER_LABEL);
        crate::calico::calico_objects(&admin).await;

        let mut cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
        cfg.scope = NodeScope::Selector(LabelSelector {
            match_labels: BTreeMap::from([("cnimig.io/e2e".to_string(), ns.clone())]),
            match_expressions: Vec::new(),
        });
        cfg.max_in_flight = 4;
        cfg.poll_interval = Duration::from_millis(300);
        cfg.drain_timeout = Duration::from_secs(180);
        cfg.step_timeout = Duration::from_secs(90);

        let (mut ecfg, _) = common::emulated_cluster(&admin, &ns, &cfg, WORKERS + CONTROL_PLANE).await;
        for (i, n) in ecfg.nodes.iter().enumerate() {
            let mut l = BTreeMap::from([("topology.kubernetes.io/zone".to_string(), format!("zone-{}", i % 3))]);
            if i >= WORKERS {
                l.insert("node-role.kubernetes.io/control-plane".into(), "true".into());
            }
            ecfg.extra_labels.insert(n.clone(), l);
        }
        let node_names = ecfg.nodes.clone();
        let emu = cnimig_emu::start(admin.clone(), ecfg).await.unwrap();

        let expected = workloads(&admin, &ns).await;
        cnimig_emu::setup::wait_ready_pods(&admin, &ns, expected, Duration::from_secs(240)).await.unwrap();
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), &ns);
        wait_until("budgets observed with disruptions allowed", Duration::from_secs(60), || {
            let pdbs = pdbs.clone();
            async move {
                let Ok(l) = pdbs.list(&ListParams::default()).await else { return false };
                l.items.len() == 5
                    && l.items.iter().all(|p| p.status.as_ref().is_some_and(|s| s.disruptions_allowed >= 1))
            }
        })
        .await;

        // The adapter as cnimig's ServiceAccount, with a User-Agent of its own for the audit log.
        let agent = format!("cnimig-e2e/{ns}");
        let mut sa = env.sa_config.clone();
        sa.headers.push((http::header::USER_AGENT, http::HeaderValue::from_str(&agent).unwrap()));
        let mut opts = common::opts(&ns);
        opts.node_selector = Some(format!("cnimig.io/e2e={ns}"));
        let cluster = cnimig_kube::KubeCluster::new(sa, opts).unwrap();
        let orch = Orchestrator::new(
            Ports::from_one(cluster.clone()),
            cfg.clone(),
            RunOptions { holder: format!("e2e-{ns}"), ..RunOptions::default() },
        );
        let (_, plan) = orch.plan().await.unwrap();
        let fails: Vec<String> = plan.preflight.failures().map(|c| format!("{}: {}", c.id, c.message)).collect();
        assert!(fails.is_empty(), "preflight failed: {fails:#?}");
        assert_eq!(plan.order.len(), WORKERS + CONTROL_PLANE);

        let stop = Arc::new(AtomicBool::new(false));
        let min_margin = Arc::new(AtomicI32::new(i32::MAX));
        let watcher = watch_budgets(admin.clone(), ns.clone(), stop.clone(), min_margin.clone());
        let audit = std::env::var("CNIMIG_TESTENV_AUDIT_LOG").ok();
        let audit_start = audit.as_ref().and_then(|p| std::fs::metadata(p).ok()).map_or(0, |m| m.len());
        let metrics_before = cnimig_kube::metrics::scrape(&admin).await.unwrap();
        let events = cluster.event_sink();
        let log = std::sync::Mutex::new(Vec::<String>::new());
        let tee = |e: &Event| {
            cnimig_core::events::EventSink::emit(&events, e);
            if let Ok(mut l) = log.lock() {
                l.push(serde_json::to_string(e).unwrap_or_default());
            }
        };
        let started = tokio::time::Instant::now();
        let report = tokio::time::timeout(Duration::from_secs(900), orch.run(&plan, &tee))
            .await
            .expect("the migration finishes within 15 minutes")
            .unwrap_or_else(|e| panic!("run failed: {e}\n{}", log.lock().map(|l| l.join("\n")).unwrap_or_default()));
        let elapsed = started.elapsed();
        events.close().await;
        stop.store(true, Ordering::Relaxed);
        let violations = watcher.await.unwrap();
        let metrics_after = cnimig_kube::metrics::scrape(&admin).await.unwrap();

        // Every node Done, none cordoned, no budget broken.
        let not_done: Vec<_> = report.nodes.iter().filter(|n| n.phase != Phase::Done).collect();
        assert!(not_done.is_empty(), "nodes not Done: {not_done:#?}");
        assert!(violations.is_empty(), "budgets violated: {violations:?}");
        let nodes: Api<Node> = Api::all(admin.clone());
        for n in &node_names {
            let node = nodes.get(n).await.unwrap();
            assert!(!node.spec.and_then(|s| s.unschedulable).unwrap_or(false), "{n} left cordoned");
        }
        // Every pod that uses the pod network is on Cilium.
        let pool: ipnet::Ipv4Net = "10.245.0.0/16".parse().unwrap();
        for p in pods.list(&ListParams::default()).await.unwrap().items {
            let spec = p.spec.clone().unwrap_or_default();
            if spec.host_network == Some(true) || p.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let ip: Option<std::net::Ipv4Addr> = p.status.as_ref().and_then(|s| s.pod_ip.as_deref()).and_then(|s| s.parse().ok());
            assert!(ip.is_some_and(|ip| pool.contains(&ip)), "pod {} on {:?} has {ip:?}, not a Cilium address", p.name_any(), spec.node_name);
        }

        // Cost: cnimig's own requests (audit log, by its User-Agent), and all clients' (metrics).
        let by_kind = audit
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| {
                let from = usize::try_from(audit_start).unwrap_or(0).min(b.len());
                cnimig_kube::metrics::audit_counts_by_agent(&String::from_utf8_lossy(&b[from..]), &agent)
            })
            .unwrap_or_default();
        let ours: u64 = by_kind.values().sum();
        let all: f64 = cnimig_kube::metrics::delta(&metrics_before, &metrics_after).values().sum();
        let n = (WORKERS + CONTROL_PLANE) as f64;
        // Straight to fd 2, so the numbers show without --nocapture.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "e2e: {} nodes migrated in {elapsed:.1?} (max {} in flight); lowest budget margin {}; \
             cnimig's API requests: {ours} ({:.1} per node); all clients (apiserver_request_total): {all:.0} ({:.1} per node)",
            report.count(Phase::Done),
            cfg.max_in_flight,
            min_margin.load(Ordering::Relaxed),
            ours as f64 / n,
            all / n
        );
        let mut top: Vec<(&String, &u64)> = by_kind.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        let _ = writeln!(
            std::io::stderr(),
            "e2e: cnimig's requests by kind: {}",
            top.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
        );
        assert!(ours > 0, "the audit log shows cnimig's requests");

        // The Node Events, published as cnimig's ServiceAccount: one per step.
        let kevents: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), "default");
        let first = &node_names[0];
        let reasons: std::collections::BTreeSet<String> = kevents
            .list(&ListParams::default().fields(&format!("regarding.name={first}")))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reporting_controller.as_deref() == Some("cnimig"))
            .filter_map(|e| e.reason)
            .collect();
        for r in ["NodeMigrationStarted", "NodeCordoned", "NodeDrained", "NodeLabelled", "CiliumAgentRestarted",
                  "CiliumAgentReady", "NodeUncordoned", "PodsRestarted", "NodeVerified", "NodeMigrated"] {
            assert!(reasons.contains(r), "no {r} Event on node {first}: {reasons:?}");
        }
        emu.stop();
        for n in &node_names {
            common::delete_node(&admin, n).await;
        }
    })
    .await;
}

/// A node whose new agent never becomes Ready rolls back through every rollback step: Cilium
/// pods drained, Calico's CNI config restored by the helper pod (run by the emulator), label
/// removed, agent restarted, pods recycled, node uncordoned; the run then stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_node_rolls_back_to_calico() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "rollback", |ns| async move {
        let mut cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
        cfg.scope = NodeScope::Selector(LabelSelector {
            match_labels: BTreeMap::from([("cnimig.io/e2e".to_string(), ns.clone())]),
            match_expressions: Vec::new(),
        });
        cfg.poll_interval = Duration::from_millis(300);
        cfg.drain_timeout = Duration::from_secs(60);
        cfg.step_timeout = Duration::from_secs(8);
        crate::calico::calico_objects(&admin).await;
        let (mut ecfg, _) = common::emulated_cluster(&admin, &ns, &cfg, 3).await;
        ecfg.stuck_agents = ecfg.nodes.iter().cloned().collect();
        let node_names = ecfg.nodes.clone();
        let emu = cnimig_emu::start(admin.clone(), ecfg).await.unwrap();
        let mut objs = vec![
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": ns},
                "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                         "template": pod_template("web", &ns, json!({}))}}),
            json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": {"name": "web", "namespace": ns},
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}}}),
        ];
        objs.extend(cnimig_emu::setup::agent_daemon_sets(
            &ns,
            "registry.k8s.io/pause:3.10",
            &json!([]),
        ));
        for o in objs {
            cnimig_emu::setup::apply(&admin, &o).await.unwrap();
        }
        cnimig_emu::setup::wait_ready_pods(&admin, &ns, 9, Duration::from_secs(120))
            .await
            .unwrap();
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);

        let mut opts = common::opts(&ns);
        opts.node_selector = Some(format!("cnimig.io/e2e={ns}"));
        let cluster = env.cluster(opts);
        let orch = Orchestrator::new(
            Ports::from_one(cluster.clone()),
            cfg.clone(),
            RunOptions {
                holder: format!("rollback-{ns}"),
                ..RunOptions::default()
            },
        );
        let report = common::plan_and_run(&orch, Duration::from_secs(300)).await;
        let failed = common::the_rolled_back_node(&report);
        assert!(
            failed.cause.as_deref().unwrap_or("").contains("AgentReady"),
            "{:?}",
            failed.cause
        );
        let name = failed.node.as_str().to_string();
        let nodes: Api<Node> = Api::all(admin.clone());
        let node = nodes.get(&name).await.unwrap();
        assert!(
            !node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
            "uncordoned"
        );
        assert!(
            !node.labels().contains_key(&cfg.migration_label),
            "label removed"
        );
        assert_eq!(
            node.annotations()
                .get(cnimig_kube::CNI_DIR_ANNOTATION)
                .map(String::as_str),
            Some(
                serde_json::to_string(&cnimig_core::ports::CniDirState::CALICO)
                    .unwrap()
                    .as_str()
            ),
            "Calico's CNI config restored"
        );
        let pool: ipnet::Ipv4Net = "10.245.0.0/16".parse().unwrap();
        for p in pods.list(&ListParams::default()).await.unwrap().items {
            let ip: Option<std::net::Ipv4Addr> = p
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|s| s.parse().ok());
            assert!(
                !ip.is_some_and(|ip| pool.contains(&ip)),
                "pod {} still on Cilium after the rollback",
                p.name_any()
            );
        }
        emu.stop();
        for n in &node_names {
            common::delete_node(&admin, n).await;
        }
    })
    .await;
}
