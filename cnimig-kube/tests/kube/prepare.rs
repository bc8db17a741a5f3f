//! Prepare against the real control plane: emulated nodes whose `calico-node` autodetects with
//! `first-found` while a Cilium agent runs there, so it picks `cilium_host` (the emulator's
//! model, `cnimig_emu::calico_node`). The address check names every node and changes nothing;
//! the autodetection fix is applied (as cnimig's ServiceAccount with deploy/rbac-verify.yaml),
//! rolls out, and the check passes; undone when the run is abandoned, the DaemonSet is as before.
//! The same through an operator install's `Installation`, with an emulated operator rendering it.

use std::collections::BTreeMap;
use std::time::Duration;

use cnimig_core::config::MigrationConfig;
use cnimig_core::model::{Autodetection, CalicoFacts, CalicoInstall};
use cnimig_core::prepare::{AutodetectChange, autodetection_change};
use cnimig_kube::prepare::AUTODETECTION_UNDO_ANNOTATION;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::json;

use crate::common::{self, wait_until};

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        && p.metadata.deletion_timestamp.is_none()
}

async fn wait_ready(pods: &Api<Pod>, label: &str, n: usize) {
    wait_until(
        &format!("{n} {label} pods Ready"),
        Duration::from_secs(120),
        || {
            let pods = pods.clone();
            let lp = ListParams::default().labels(&format!("k8s-app={label}"));
            async move {
                let Ok(l) = pods.list(&lp).await else {
                    return false;
                };
                l.items.iter().filter(|p| ready(p)).count() == n
            }
        },
    )
    .await;
}

/// What a write of ours changes on a DaemonSet: its generation (any spec change) and its
/// annotations (the undo record). Not its `resourceVersion`, which the DaemonSet controller moves
/// whenever it updates the status (CI saw that between two reads of an unchanged DaemonSet).
fn written(d: &DaemonSet) -> (Option<i64>, BTreeMap<String, String>) {
    (
        d.metadata.generation,
        d.metadata.annotations.clone().unwrap_or_default(),
    )
}

fn daemon_set(ns: &str, label: &str, env: serde_json::Value) -> serde_json::Value {
    cnimig_emu::setup::agent_daemon_set(ns, label, "registry.k8s.io/pause:3.10", &env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autodetection_fix_is_needed_applied_checked_and_undone() {
    let env = crate::env_or_skip!();
    common::with_temp_ns(env.admin.clone(), "prepare", |ns| async move {
        let admin = env.admin.clone();
        cnimig_emu::setup::apply_yaml(&admin, include_str!("../../../deploy/rbac-verify.yaml"))
            .await
            .unwrap();
        let cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
        let (ecfg, _) = common::emulated_cluster(&admin, &ns, &cfg, 3).await;
        let node_names = ecfg.nodes.clone();
        let emu = cnimig_emu::start(admin.clone(), ecfg).await.unwrap();
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);

        // Cilium installed first (its agents create cilium_host), then calico-node (re)starts
        // with first-found.
        cnimig_emu::setup::apply(&admin, &daemon_set(&ns, "cilium", json!([])))
            .await
            .unwrap();
        wait_ready(&pods, "cilium", 3).await;
        let calico_env = json!([{"name": "CALICO_NETWORKING_BACKEND", "value": "vxlan"},
                                {"name": "IP_AUTODETECTION_METHOD", "value": "first-found"},
                                {"name": "FELIX_LOGSEVERITYSCREEN", "value": "info"}]);
        cnimig_emu::setup::apply(&admin, &daemon_set(&ns, "calico-node", calico_env))
            .await
            .unwrap();
        wait_ready(&pods, "calico-node", 3).await;

        let cluster = env.cluster(common::opts(&ns));
        let selector = format!("cnimig.io/e2e={ns}");
        let dss: Api<DaemonSet> = Api::namespaced(admin.clone(), &ns);
        let before = dss.get("calico-node").await.unwrap();

        // The check before the first node: every node named, nothing written.
        let problems = cluster.calico_address_check(Some(&selector)).await.unwrap();
        assert_eq!(problems.len(), 3, "{problems:#?}");
        for n in &node_names {
            let line = problems
                .iter()
                .find(|p| p.starts_with(&format!("node {n}: Calico uses 10.245.")))
                .unwrap_or_else(|| panic!("{n} not named: {problems:#?}"));
            assert!(line.contains("not its InternalIP (172.31."), "{line}");
        }
        let unchanged = dss.get("calico-node").await.unwrap();
        assert_eq!(written(&unchanged), written(&before));

        // The plan line, then the change with consent.
        let facts = CalicoFacts {
            install: CalicoInstall::Manifest,
            autodetection: Autodetection::FirstFound,
            ..CalicoFacts::default()
        };
        let mut fix = autodetection_change(&facts, None).unwrap().expect("needed");
        fix.target = AutodetectChange::ManifestEnv {
            namespace: ns.clone(),
            daemon_set: "calico-node".into(),
            container: "calico-node".into(),
        };
        let line = fix.describe();
        assert!(
            line.contains("IP_AUTODETECTION_METHOD=kubernetes-internal-ip (was first-found)"),
            "{line}"
        );
        // The dry run (what `kube_migrate` without --yes sends): admitted, nothing persisted.
        assert!(cluster.dry_run_autodetection_fix(&fix).await.unwrap());
        assert_eq!(
            written(&dss.get("calico-node").await.unwrap()),
            written(&before)
        );
        cluster
            .apply_autodetection_fix(&fix, Duration::from_secs(180))
            .await
            .unwrap();
        let applied = dss.get("calico-node").await.unwrap();
        let record = applied
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(AUTODETECTION_UNDO_ANNOTATION))
            .cloned()
            .expect("undo record");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&record).unwrap(),
            json!({"before": {"name": "IP_AUTODETECTION_METHOD", "value": "first-found"}})
        );
        let problems = cluster.calico_address_check(Some(&selector)).await.unwrap();
        assert!(problems.is_empty(), "{problems:#?}");
        // Applying again writes nothing, and a dry run says there is nothing to send.
        assert!(!cluster.dry_run_autodetection_fix(&fix).await.unwrap());
        cluster
            .apply_autodetection_fix(&fix, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            written(&dss.get("calico-node").await.unwrap()),
            written(&applied)
        );

        // The run is abandoned: undo restores the DaemonSet exactly.
        assert!(
            cluster
                .undo_autodetection_fix(&fix.target, Duration::from_secs(180))
                .await
                .unwrap()
        );
        let after = dss.get("calico-node").await.unwrap();
        assert_eq!(
            serde_json::to_value(&after.spec.as_ref().unwrap().template).unwrap(),
            serde_json::to_value(&before.spec.as_ref().unwrap().template).unwrap()
        );
        let strip = |d: &DaemonSet| {
            let mut a = d.metadata.annotations.clone().unwrap_or_default();
            a.remove("deprecated.daemonset.template.generation");
            a
        };
        assert_eq!(strip(&after), strip(&before));
        // calico-node restarted with first-found again: the addresses are wrong again.
        let problems = cluster.calico_address_check(Some(&selector)).await.unwrap();
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(
            !cluster
                .undo_autodetection_fix(&fix.target, Duration::from_secs(30))
                .await
                .unwrap()
        );

        emu.stop();
        for n in &node_names {
            common::delete_node(&admin, n).await;
        }
    })
    .await;
}

/// The prepare step wired into a run, through the library calls `kube_migrate` makes: refused
/// without confirmation of the actions outside the cluster; a wrong Calico address stops the
/// run naming every node; the autodetection fix applied with consent, then a run whose first
/// node fails its probe (a firewall between the nodes and the API server) is abandoned and the
/// fix undone; a second, healthy run applies it again, migrates every node, and keeps it.
///
/// The fix targets this test's own `calico-node` DaemonSet (a manifest install in the test
/// namespace) so parallel tests sharing `Installation default` are not disturbed; the
/// orchestrator's own preflight reads that Installation (`kubernetes: NodeInternalIP`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_prepares_and_undoes_the_fix_when_abandoned() {
    use std::sync::Arc;

    use cnimig_core::config::NodeScope;
    use cnimig_core::machine::Phase;
    use cnimig_core::model::LabelSelector;
    use cnimig_core::orchestrator::{Orchestrator, Ports, RunOptions, RunReport};
    use cnimig_emu::goldpinger::SharedFirewall;
    use cnimig_kube::prepare::{PreparePlan, PrepareRunError};
    use cnimig_kube::probe::{ProbeOptions, ProbeVerifier};

    let env = crate::env_or_skip!();
    common::with_temp_ns(env.admin.clone(), "prep-run", |ns| async move {
        let admin = env.admin.clone();
        cnimig_emu::setup::apply_yaml(&admin, include_str!("../../../deploy/rbac-verify.yaml"))
            .await
            .unwrap();
        let mut cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
        cfg.scope = NodeScope::Selector(LabelSelector {
            match_labels: BTreeMap::from([("cnimig.io/e2e".to_string(), ns.clone())]),
            match_expressions: Vec::new(),
        });
        cfg.poll_interval = Duration::from_millis(300);
        cfg.drain_timeout = Duration::from_secs(60);
        cfg.step_timeout = Duration::from_secs(20);
        crate::calico::calico_objects(&admin).await;
        let (ecfg, _) = common::emulated_cluster(&admin, &ns, &cfg, 3).await;
        let node_names = ecfg.nodes.clone();
        let emu = cnimig_emu::start(admin.clone(), ecfg).await.unwrap();
        let firewall = SharedFirewall::default();
        let mut pcfg = cnimig_emu::probe::ProbeEmuConfig::new(firewall.clone());
        pcfg.cilium_namespace = ns.clone();
        pcfg.nodes = Some(node_names.clone());
        let responder = cnimig_emu::probe::respond(admin.clone(), pcfg);
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
        cnimig_emu::setup::apply(
            &admin,
            &json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "coredns", "namespace": ns},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"k8s-app": "kube-dns"}},
                         "template": {"metadata": {"labels": {"k8s-app": "kube-dns"}},
                            "spec": {"nodeSelector": {"cnimig.io/e2e": ns},
                                     "terminationGracePeriodSeconds": 1,
                                     "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}}}}),
        )
        .await
        .unwrap();
        cnimig_emu::setup::apply(&admin, &daemon_set(&ns, "cilium", json!([])))
            .await
            .unwrap();
        wait_ready(&pods, "cilium", 3).await;
        let calico_env = json!([{"name": "IP_AUTODETECTION_METHOD", "value": "first-found"}]);
        cnimig_emu::setup::apply(&admin, &daemon_set(&ns, "calico-node", calico_env))
            .await
            .unwrap();
        wait_ready(&pods, "calico-node", 3).await;
        wait_ready(&pods, "kube-dns", 1).await;

        let mut opts = common::opts(&ns);
        opts.node_selector = Some(format!("cnimig.io/e2e={ns}"));
        let cluster = env.cluster(opts);
        let dss: Api<DaemonSet> = Api::namespaced(admin.clone(), &ns);
        let before = dss.get("calico-node").await.unwrap();
        let rv = written;
        let facts = CalicoFacts {
            install: CalicoInstall::Manifest,
            autodetection: Autodetection::FirstFound,
            ..CalicoFacts::default()
        };
        let mut prep = PreparePlan::new(&facts, &cfg, None).unwrap();
        prep.fix.as_mut().expect("first-found needs the fix").target =
            AutodetectChange::ManifestEnv {
                namespace: ns.clone(),
                daemon_set: "calico-node".into(),
                container: "calico-node".into(),
            };
        assert!(
            prep.user_actions
                .iter()
                .any(|a| a.contains("UDP 8472 (vxlan")),
            "{:?}",
            prep.user_actions
        );
        assert!(prep.user_actions.iter().any(|a| a.contains("10.245.0.0/16")));
        let rollout = Duration::from_secs(180);

        // Not confirmed: refused, nothing written.
        let holder = format!("prep-{ns}");
        let e = cluster.prepare_run(&prep, false, &holder, rollout).await.unwrap_err();
        assert!(matches!(e, PrepareRunError::NotConfirmed), "{e}");
        assert_eq!(rv(&dss.get("calico-node").await.unwrap()), rv(&before));

        // No fix planned (as if the method were safe) while the addresses are wrong: the check
        // stops the run naming every node, nothing written.
        let no_fix = PreparePlan {
            fix: None,
            ..prep.clone()
        };
        match cluster.prepare_run(&no_fix, true, &holder, rollout).await {
            Err(PrepareRunError::AddressMismatch { problems, undo }) => {
                assert_eq!(problems.len(), 3, "{problems:#?}");
                for n in &node_names {
                    assert!(
                        problems.iter().any(|p| p.starts_with(&format!("node {n}: "))),
                        "{n}: {problems:#?}"
                    );
                }
                assert_eq!(undo, "nothing was changed");
            }
            other => panic!("expected the address check to stop: {other:?}"),
        }
        assert_eq!(rv(&dss.get("calico-node").await.unwrap()), rv(&before));

        let run = |retry: bool| {
            let cluster = cluster.clone();
            let cfg = cfg.clone();
            let ns = ns.clone();
            async move {
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
                        holder: format!("prep-{ns}"),
                        retry_rolled_back: retry,
                        ..RunOptions::default()
                    },
                );
                let (_, plan) = orch.plan().await.unwrap();
                let r: RunReport = tokio::time::timeout(
                    Duration::from_secs(400),
                    orch.run(&plan, &cnimig_core::events::Discard),
                )
                .await
                .expect("the run ends")
                .unwrap();
                r
            }
        };

        // Run 1: prepared with consent, then every probe fails (the nodes cannot reach the
        // API server): the first node rolls back, the run stops, it is abandoned, undone.
        let p = cluster.prepare_run(&prep, true, &holder, rollout).await.unwrap();
        assert!(p.applied);
        // A second run started meanwhile: the Lease is this run's, so it changes nothing.
        let prepared = dss.get("calico-node").await.unwrap();
        match cluster.prepare_run(&prep, true, "another-run", rollout).await {
            Err(PrepareRunError::Locked { holder: h, .. }) => assert_eq!(h, holder),
            other => panic!("a second run must be refused while the first holds the Lease: {other:?}"),
        }
        assert_eq!(rv(&dss.get("calico-node").await.unwrap()), rv(&prepared));
        assert!(
            dss.get("calico-node")
                .await
                .unwrap()
                .metadata
                .annotations
                .unwrap_or_default()
                .contains_key(AUTODETECTION_UNDO_ANNOTATION)
        );
        {
            let mut f = firewall.lock().unwrap();
            for n in &node_names {
                f.blocked_node_pairs.insert((
                    n.clone(),
                    cnimig_emu::probe::API_SERVER_NODE.to_string(),
                ));
            }
        }
        let r1 = run(false).await;
        assert_eq!(r1.count(Phase::RolledBack), 1, "{r1:#?}");
        assert_eq!(r1.count(Phase::Done), 0, "{r1:#?}");
        assert!(cnimig_core::prepare::abandoned(&r1));
        assert!(cluster.undo_if_abandoned(&prep, &r1, &holder, rollout).await.unwrap());
        let after = dss.get("calico-node").await.unwrap();
        assert_eq!(
            serde_json::to_value(&after.spec.as_ref().unwrap().template).unwrap(),
            serde_json::to_value(&before.spec.as_ref().unwrap().template).unwrap()
        );
        assert!(
            !after
                .metadata
                .annotations
                .unwrap_or_default()
                .contains_key(AUTODETECTION_UNDO_ANNOTATION)
        );
        let problems = cluster
            .calico_address_check(Some(&format!("cnimig.io/e2e={ns}")))
            .await
            .unwrap();
        assert_eq!(problems.len(), 3, "first-found again: {problems:#?}");

        // Run 2: the firewall is fixed; prepared again, every node Done, the fix stays.
        firewall.lock().unwrap().blocked_node_pairs.clear();
        let p = cluster.prepare_run(&prep, true, &holder, rollout).await.unwrap();
        assert!(p.applied);
        let r2 = run(true).await;
        assert_eq!(r2.count(Phase::Done), 3, "{r2:#?}");
        assert!(!cnimig_core::prepare::abandoned(&r2));
        assert!(!cluster.undo_if_abandoned(&prep, &r2, &holder, rollout).await.unwrap());
        let kept = dss.get("calico-node").await.unwrap();
        assert!(
            kept.metadata
                .annotations
                .unwrap_or_default()
                .contains_key(AUTODETECTION_UNDO_ANNOTATION)
        );

        drop(responder);
        emu.stop();
        for n in &node_names {
            common::delete_node(&admin, n).await;
        }
    })
    .await;
}

/// What the Tigera operator does with `spec.calicoNetwork.nodeAddressAutodetectionV4`: renders
/// it as `IP_AUTODETECTION_METHOD` of `calico-system/calico-node` (absent: first-found). Written
/// here from Calico's documented fields, independently of the adapter's own mapping.
fn operator_render(installation: &serde_json::Value) -> String {
    let a = &installation["spec"]["calicoNetwork"]["nodeAddressAutodetectionV4"];
    let s = |k: &str| a[k].as_str().map(str::to_string);
    if a["kubernetes"] == "NodeInternalIP" {
        "kubernetes-internal-ip".into()
    } else if let Some(i) = s("interface") {
        format!("interface={i}")
    } else if let Some(i) = s("skipInterface") {
        format!("skip-interface={i}")
    } else if let Some(d) = s("canReach") {
        format!("can-reach={d}")
    } else if let Some(c) = a["cidrs"].as_array() {
        let c: Vec<&str> = c.iter().filter_map(serde_json::Value::as_str).collect();
        format!("cidr={}", c.join(","))
    } else {
        "first-found".into()
    }
}

/// An operator install: the fix patches the `Installation` (an Installation of this test's own,
/// so the tests sharing `Installation default` are not disturbed), an emulated operator renders
/// it into `calico-system/calico-node` on this test's nodes, the adapter waits for that rollout,
/// the address check passes; applying again writes nothing; undo restores the Installation's
/// spec exactly and the operator rolls first-found back out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_install_is_fixed_through_its_installation() {
    let env = crate::env_or_skip!();
    common::with_temp_ns(env.admin.clone(), "prepop", |ns| async move {
        use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams};
        let admin = env.admin.clone();
        cnimig_emu::setup::apply_yaml(&admin, include_str!("../../../deploy/rbac-verify.yaml"))
            .await
            .unwrap();
        let cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
        let (ecfg, _) = common::emulated_cluster(&admin, &ns, &cfg, 2).await;
        let node_names = ecfg.nodes.clone();
        let emu = cnimig_emu::start(admin.clone(), ecfg).await.unwrap();
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
        cnimig_emu::setup::apply(&admin, &daemon_set(&ns, "cilium", json!([]))).await.unwrap();
        wait_ready(&pods, "cilium", 2).await;

        // The operator's objects: an Installation asking for first-found, and what it renders.
        let inst_name = common::unique("inst");
        let inst_ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("operator.tigera.io", "v1", "Installation"),
            "installations",
        );
        let insts: Api<DynamicObject> = Api::all_with(admin.clone(), &inst_ar);
        cnimig_emu::setup::apply(&admin, &json!({"apiVersion": "operator.tigera.io/v1", "kind": "Installation",
            "metadata": {"name": inst_name},
            "spec": {"variant": "Calico", "calicoNetwork": {"bgp": "Disabled",
                     "nodeAddressAutodetectionV4": {"firstFound": true},
                     "ipPools": [{"cidr": "10.42.0.0/16", "encapsulation": "VXLAN"}]}}}))
            .await
            .unwrap();
        cnimig_emu::setup::apply(&admin, &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "calico-system"}}))
            .await
            .unwrap();
        let mut ds = daemon_set("calico-system", "calico-node",
            json!([{"name": "IP_AUTODETECTION_METHOD", "value": "first-found"}]));
        ds["spec"]["template"]["spec"]["nodeSelector"] = json!({"cnimig.io/e2e": ns});
        cnimig_emu::setup::apply(&admin, &ds).await.unwrap();
        let sys_pods: Api<Pod> = Api::namespaced(admin.clone(), "calico-system");
        wait_ready(&sys_pods, "calico-node", 2).await;
        let operator = {
            let (admin, insts, name) = (admin.clone(), insts.clone(), inst_name.clone());
            tokio::spawn(async move {
                let dss: Api<DaemonSet> = Api::namespaced(admin, "calico-system");
                loop {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let Ok(i) = insts.get(&name).await else { continue };
                    let want = operator_render(&serde_json::to_value(&i).unwrap());
                    let Ok(d) = dss.get("calico-node").await else { continue };
                    let d = serde_json::to_value(&d).unwrap();
                    if d["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] != want.as_str() {
                        let patch = json!([{"op": "replace",
                            "path": "/spec/template/spec/containers/0/env/0/value", "value": want}]);
                        let _ = dss
                            .patch("calico-node", &PatchParams::default(),
                                   &Patch::<()>::Json(serde_json::from_value(patch).unwrap()))
                            .await;
                    }
                }
            })
        };

        let cluster = env.cluster(common::opts(&ns));
        let selector = format!("cnimig.io/e2e={ns}");
        assert_eq!(cluster.calico_address_check(Some(&selector)).await.unwrap().len(), 2);
        let before = insts.get(&inst_name).await.unwrap();
        let facts = CalicoFacts {
            install: CalicoInstall::Operator,
            autodetection: Autodetection::FirstFound,
            ..CalicoFacts::default()
        };
        let mut fix = autodetection_change(&facts, None).unwrap().expect("needed");
        assert!(matches!(fix.target, AutodetectChange::OperatorInstallation { .. }), "{fix:?}");
        fix.target = AutodetectChange::OperatorInstallation { name: inst_name.clone() };
        assert!(cluster.apply_autodetection_fix(&fix, Duration::from_secs(180)).await.unwrap());
        let applied = insts.get(&inst_name).await.unwrap();
        assert_eq!(
            applied.data["spec"]["calicoNetwork"]["nodeAddressAutodetectionV4"],
            json!({"kubernetes": "NodeInternalIP"})
        );
        assert!(
            applied.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(AUTODETECTION_UNDO_ANNOTATION)),
            "undo record: {:?}",
            applied.metadata.annotations
        );
        let problems = cluster.calico_address_check(Some(&selector)).await.unwrap();
        assert!(problems.is_empty(), "calico-node rolled out with the node's InternalIP: {problems:#?}");
        // Applying again writes nothing.
        assert!(!cluster.apply_autodetection_fix(&fix, Duration::from_secs(60)).await.unwrap());
        assert_eq!(
            insts.get(&inst_name).await.unwrap().metadata.resource_version,
            applied.metadata.resource_version
        );

        // Undo: the Installation's spec as before, the record gone, first-found rolled out again.
        assert!(cluster.undo_autodetection_fix(&fix.target, Duration::from_secs(180)).await.unwrap());
        let after = insts.get(&inst_name).await.unwrap();
        assert_eq!(after.data["spec"], before.data["spec"]);
        assert_eq!(after.metadata.annotations.unwrap_or_default(), before.metadata.annotations.unwrap_or_default());
        assert_eq!(cluster.calico_address_check(Some(&selector)).await.unwrap().len(), 2);
        assert!(!cluster.undo_autodetection_fix(&fix.target, Duration::from_secs(30)).await.unwrap());

        operator.abort();
        let _ = insts.delete(&inst_name, &DeleteParams::default()).await;
        let dss: Api<DaemonSet> = Api::namespaced(admin.clone(), "calico-system");
        let _ = dss.delete("calico-node", &DeleteParams::default()).await;
        emu.stop();
        for n in &node_names {
            common::delete_node(&admin, n).await;
        }
    })
    .await;
}
