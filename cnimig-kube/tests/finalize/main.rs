//! Finalize and clean-up on the real control plane (`scripts/testenv`) with `cnimig-emu`, as
//! cnimig's ServiceAccount bound to `deploy/rbac.yaml` and `deploy/rbac-finalize.yaml`.
//!
//! A separate test binary: clean-up deletes cluster-wide Calico objects and CRDs, which the
//! `kube` binary's tests share; Cargo runs test binaries one after another, and every binary
//! installs `deploy/crds` again when it starts.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers fail the test by panicking"
)]

#[path = "../kube/common.rs"]
#[allow(
    dead_code,
    reason = "shared with the kube binary; not every helper is used here"
)]
mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cnimig_core::cilium::{CiliumPhase, ValueInputs, rendered_config};
use cnimig_core::cleanup::{Cleaner, HELPER_HOST_PATHS};
use cnimig_core::config::{MigrationConfig, NodeScope};
use cnimig_core::finalize::{FinalOptions, FinalizeError, Finalizer};
use cnimig_core::machine::Phase;
use cnimig_core::model::LabelSelector;
use cnimig_core::orchestrator::{Orchestrator, Ports, RunOptions};
use cnimig_kube::cleanup::{CALICO_CRD_GROUPS, FLUSH_HELPER_LABEL, FLUSH_HELPER_VALUE};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use crate::common::wait_until;

const NODES: usize = 5;

async fn agent_uids(pods: &Api<Pod>) -> BTreeMap<String, String> {
    pods.list(&ListParams::default().labels("k8s-app=cilium"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            (
                p.spec.and_then(|s| s.node_name).unwrap_or_default(),
                p.metadata.uid.unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_finalize_and_clean_up_five_emulated_nodes() {
    let env = match common::env().await {
        Some(e) => e,
        None => return,
    };
    let admin = env.admin.clone();
    cnimig_emu::setup::apply_yaml(&admin, include_str!("../../../deploy/rbac-finalize.yaml"))
        .await
        .expect("apply deploy/rbac-finalize.yaml");
    common::with_temp_ns(admin.clone(), "final", |ns| async move {
        assert_eq!(cnimig_emu::emulator::HELPER_LABEL, FLUSH_HELPER_LABEL);
        cnimig_emu::setup::calico_objects(&admin)
            .await
            .expect("Calico objects");
        let mut cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
        cfg.scope = NodeScope::Selector(LabelSelector {
            match_labels: BTreeMap::from([("cnimig.io/e2e".to_string(), ns.clone())]),
            match_expressions: Vec::new(),
        });
        cfg.max_in_flight = 2;
        cfg.poll_interval = Duration::from_millis(300);
        cfg.drain_timeout = Duration::from_secs(120);
        cfg.step_timeout = Duration::from_secs(60);
        let live = rendered_config(&cfg, ValueInputs::default(), CiliumPhase::Migration);
        common::cilium_config(&admin, &ns, serde_json::to_value(&live).unwrap()).await;

        let mut ecfg = cnimig_emu::EmuConfig::new(&format!("{ns}-n"), NODES);
        ecfg.cilium_namespace = ns.clone();
        ecfg.node_labels = BTreeMap::from([("cnimig.io/e2e".to_string(), ns.clone())]);
        let cp = ecfg.nodes[NODES - 1].clone();
        ecfg.extra_labels.insert(
            cp.clone(),
            BTreeMap::from([("node-role.kubernetes.io/control-plane".to_string(), "true".to_string())]),
        );
        let node_names = ecfg.nodes.clone();
        let emu = cnimig_emu::start(admin.clone(), ecfg).await.unwrap();
        let mut objs = vec![
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": ns},
                "spec": {"replicas": 4, "selector": {"matchLabels": {"app": "web"}},
                         "template": {"metadata": {"labels": {"app": "web"}},
                            "spec": {"nodeSelector": {"cnimig.io/e2e": ns}, "terminationGracePeriodSeconds": 1,
                                     "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}}}}),
            json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": {"name": "web", "namespace": ns},
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}}}),
        ];
        objs.extend(cnimig_emu::setup::agent_daemon_sets(&ns, "quay.io/cilium/cilium:v1.17.0", &json!([])));
        for o in objs {
            cnimig_emu::setup::apply(&admin, &o).await.unwrap();
        }
        cnimig_emu::setup::wait_ready_pods(&admin, &ns, 4 + 2 * NODES, Duration::from_secs(120)).await.unwrap();
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);

        // Migrate, as cnimig's ServiceAccount.
        let mut opts = common::opts(&ns);
        opts.node_selector = Some(format!("cnimig.io/e2e={ns}"));
        let cluster = env.cluster(opts);
        let orch = Orchestrator::new(
            Ports::from_one(cluster.clone()),
            cfg.clone(),
            RunOptions { holder: format!("final-{ns}"), ..RunOptions::default() },
        );
        let (_, plan) = orch.plan().await.unwrap();
        let report = tokio::time::timeout(Duration::from_secs(400), orch.run(&plan, &cnimig_core::events::Discard))
            .await
            .expect("the migration ends")
            .unwrap();
        assert_eq!(report.count(Phase::Done), NODES, "{report:#?}");

        let ports = cluster.final_ports();
        let fopts = FinalOptions {
            holder: format!("final-{ns}"),
            config_timeout: Duration::from_secs(2),
            agent_timeout: Duration::from_secs(60),
            poll_interval: Duration::from_millis(300),
            ..FinalOptions::default()
        };

        // Clean-up before finalize: refused.
        let cleaner = Cleaner::new(ports.clone(), Arc::new(cluster.clone()), Arc::new(cluster.clone()),
            cfg.clone(), fopts.clone(), Duration::from_secs(60));
        let early = cleaner.clean_up().await.unwrap_err();
        assert!(early.to_string().contains("finalize has not succeeded"), "{early}");

        // Finalize before `helm upgrade`: every differing key named.
        let fin = Finalizer::new(ports.clone(), cfg.clone(), fopts.clone());
        match fin.finalize().await {
            Err(FinalizeError::ConfigNotFinal { mismatches, .. }) => {
                let text = format!("{mismatches:?}");
                assert!(!mismatches.is_empty() && text.contains("cni"), "{text}");
            }
            other => panic!("expected ConfigNotFinal, got {other:?}"),
        }

        // "helm upgrade" with the final values, then finalize.
        let before = agent_uids(&pods).await;
        assert_eq!(before.len(), NODES);
        let final_cfg = rendered_config(&cfg, ValueInputs::default(), CiliumPhase::Final);
        common::cilium_config(&admin, &ns, serde_json::to_value(&final_cfg).unwrap()).await;
        let fin = Finalizer::new(ports.clone(), cfg.clone(), FinalOptions { config_timeout: Duration::from_secs(30), ..fopts.clone() });
        let freport = tokio::time::timeout(Duration::from_secs(300), fin.finalize()).await.expect("finalize ends").unwrap();
        assert_eq!(freport.restarted_now, NODES);
        assert!(freport.max_in_flight_seen <= 2 && freport.max_in_flight_seen >= 1, "{freport:?}");
        let after = agent_uids(&pods).await;
        for (node, uid) in &before {
            assert_ne!(after.get(node), Some(uid), "the agent on {node} was not restarted");
        }
        let nodes: Api<Node> = Api::all(admin.clone());
        for n in &node_names {
            let node = nodes.get(n).await.unwrap();
            assert!(!node.labels().contains_key(&cfg.migration_label), "{n} keeps the migration label");
        }
        let cnc: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &ns, &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("cilium.io", "v2", "CiliumNodeConfig"), "ciliumnodeconfigs"));
        assert!(cnc.get_opt(&cfg.node_config_name).await.unwrap().is_none(), "CiliumNodeConfig deleted");
        // Again: idempotent, nothing restarted.
        let again = fin.finalize().await.unwrap();
        assert_eq!(again.restarted_now, 0);

        // Clean-up, watching every helper pod.
        let seen: Arc<Mutex<BTreeMap<String, Pod>>> = Arc::default();
        let watch = {
            let seen = seen.clone();
            let api = pods.clone();
            tokio::spawn(async move {
                let cfgw = watcher::Config::default().labels(&format!("{FLUSH_HELPER_LABEL}={FLUSH_HELPER_VALUE}"));
                let mut s = watcher(api, cfgw).applied_objects().boxed();
                while let Some(Ok(p)) = s.next().await {
                    seen.lock().unwrap().entry(p.name_any()).or_insert(p);
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let creport = tokio::time::timeout(Duration::from_secs(300), cleaner.clean_up()).await.expect("clean-up ends").unwrap();
        assert_eq!(creport.flushed_now, NODES);
        assert!(creport.max_in_flight_seen <= 2, "{creport:?}");
        wait_until("no helper pod left", Duration::from_secs(30), || {
            let pods = pods.clone();
            async move {
                pods.list(&ListParams::default().labels(&format!("{FLUSH_HELPER_LABEL}={FLUSH_HELPER_VALUE}")))
                    .await
                    .is_ok_and(|l| l.items.is_empty())
            }
        })
        .await;
        watch.abort();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), NODES, "one helper per node: {:?}", seen.keys());
        for (name, p) in &seen {
            let spec = p.spec.clone().unwrap();
            assert_eq!(spec.host_network, Some(true), "{name}");
            assert_eq!(spec.automount_service_account_token, Some(false), "{name}");
            assert!(spec.host_pid.is_none() && spec.host_ipc.is_none(), "{name}");
            let c = &spec.containers[0];
            assert_eq!(spec.containers.len(), 1);
            assert_eq!(c.image.as_deref(), Some("quay.io/cilium/cilium:v1.17.0"), "the Cilium DaemonSet's image");
            assert_eq!(c.security_context.as_ref().and_then(|s| s.privileged), Some(true), "{name}");
            let mut host: Vec<String> = spec.volumes.clone().unwrap_or_default().into_iter()
                .map(|v| v.host_path.map(|h| h.path).unwrap_or_else(|| format!("non-host volume {}", v.name)))
                .collect();
            host.sort();
            let mut want: Vec<String> = HELPER_HOST_PATHS.iter().map(|s| (*s).to_string()).collect();
            want.sort();
            assert_eq!(host, want, "{name}: exactly the host paths it needs");
            let script = c.command.clone().unwrap_or_default().join(" ");
            assert!(script.contains("cali-") && script.contains("bird") && script.contains("vxlan.calico"), "{name}");
        }
        for n in &node_names {
            let node = nodes.get(n).await.unwrap();
            let flushed = node.annotations().get(cnimig_emu::emulator::FLUSHED_ANNOTATION).cloned().unwrap_or_default();
            assert!(flushed.starts_with("cnimig-flush-"), "node {n} not flushed: {flushed:?}");
            let dir: cnimig_core::ports::CniDirState =
                serde_json::from_str(node.annotations().get(cnimig_kube::CNI_DIR_ANNOTATION).unwrap()).unwrap();
            assert!(dir.cilium_conflist && !dir.calico_conflist && !dir.calico_backup, "{n}: {dir:?}");
        }
        let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
        wait_until("Calico's CRDs gone", Duration::from_secs(60), || {
            let crds = crds.clone();
            async move {
                crds.list(&ListParams::default()).await.is_ok_and(|l| {
                    l.items.iter().all(|c| !CALICO_CRD_GROUPS.contains(&c.spec.group.as_str()))
                })
            }
        })
        .await;
        let again = cleaner.clean_up().await.unwrap();
        assert_eq!(again.flushed_now, 0, "clean-up again does nothing");
        emu.stop();
        for n in &node_names {
            common::delete_node(&admin, n).await;
        }
    })
    .await;
}

/// The ClusterRole's rules in `deploy/rbac-finalize.yaml`.
fn finalize_rules() -> Vec<serde_json::Value> {
    let text = include_str!("../../../deploy/rbac-finalize.yaml");
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        if v["kind"] == "ClusterRole" {
            return v["rules"].as_array().unwrap().clone();
        }
    }
    panic!("no ClusterRole in deploy/rbac-finalize.yaml");
}

/// Every rule of `deploy/rbac-finalize.yaml` is needed: a ServiceAccount bound to `deploy/rbac.yaml`
/// and to the finalize role without that one rule gets Forbidden from the port method that uses
/// it, and (except the CRD rule, whose method would delete the shared Calico CRDs) succeeds once
/// the rule is back. The calls touch only objects that do not exist in the test control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_finalize_rule_is_needed() {
    use cnimig_core::allow::AllowRulePort;
    use cnimig_core::cleanup::{CalicoObject, CleanupPort};
    use cnimig_core::finalize::FinalizePort;
    use cnimig_core::ports::PortError;

    let env = match common::env().await {
        Some(e) => e,
        None => return,
    };
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "rbacfin", |ns| async move {
        let role = format!("cnimig-finalize-probe-{ns}");
        let cluster = common::probe_account(&admin, &ns, &role).await;
        let rules = finalize_rules();
        let set_rules =
            |rules: Vec<serde_json::Value>| common::set_role_rules(&admin, &role, rules);
        let mut probed = 0;
        for (i, rule) in rules.iter().enumerate() {
            let resource = rule["resources"][0].as_str().unwrap().to_string();
            let call = |c: cnimig_kube::KubeCluster, resource: String| async move {
                match resource.as_str() {
                    "ciliumnodeconfigs" => c.delete_node_config("cnimig-probe-absent").await,
                    "tiers" => c.remove_allow_rule().await,
                    "installations" => c.delete_calico_object(CalicoObject::ApiServer).await,
                    "deployments" => {
                        c.delete_calico_object(CalicoObject::OperatorDeployment)
                            .await
                    }
                    "namespaces" => c.delete_calico_object(CalicoObject::Namespaces).await,
                    "configmaps" => c.delete_calico_object(CalicoObject::CalicoConfig).await,
                    "customresourcedefinitions" => c.delete_calico_crds().await,
                    other => panic!("no probe for the rule on {other}: add one"),
                }
            };
            let without: Vec<serde_json::Value> = rules
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, r)| r.clone())
                .collect();
            set_rules(without).await;
            let mut last = None;
            for _ in 0..50 {
                let r = call(cluster.clone(), resource.clone()).await;
                if matches!(r, Err(PortError::Forbidden { .. })) {
                    last = None;
                    break;
                }
                last = Some(r);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert!(
                last.is_none(),
                "without the rule on {resource} the call is not Forbidden: {last:?}"
            );
            if resource != "customresourcedefinitions" {
                set_rules(rules.clone()).await;
                let mut ok = false;
                for _ in 0..50 {
                    if call(cluster.clone(), resource.clone()).await.is_ok() {
                        ok = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                assert!(ok, "with the rule on {resource} the call still fails");
            }
            probed += 1;
        }
        assert_eq!(probed, rules.len());
        common::drop_probe_account(&admin, &role).await;
    })
    .await;
}
