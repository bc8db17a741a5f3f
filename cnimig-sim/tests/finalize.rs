//! Finalize and clean-up on the simulator: refusal with no writes, the config wait's error, both
//! Calico install orders, idempotence, and runs killed after every single action resuming to the
//! same end without a budget violation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cnimig_core::allow::AllowRulePort;
use cnimig_core::cilium::{CiliumPhase, ValueInputs, rendered_config};
use cnimig_core::cleanup::{CalicoObject, Cleaner, CleanupError, removal_order};
use cnimig_core::finalize::{
    FinalOptions, FinalPorts, FinalRecord, FinalStep, FinalizeError, Finalizer,
};
use cnimig_core::machine::Phase;
use cnimig_core::model::{CalicoInstall, NodeName};
use cnimig_core::ports::{Cluster, NewCni};
use cnimig_sim::finalize::SimFinal;
use cnimig_sim::{Scenario, SimCluster, SimParams};
use common::*;

fn scenario(install: &str) -> String {
    format!(
        r"
nodes:
  - {{name: cp, count: 1, roles: [control-plane, etcd], zones: [a], cpu: 4, memory: 16Gi}}
  - {{name: w, count: 4, zones: [a, b], cpu: 8, memory: 32Gi}}
calico:
  install: {install}
  autodetection: kubernetes-internal-ip
workloads:
  - {{kind: Deployment, name: web, namespace: shop, replicas: 4, pdb: {{minAvailable: 3}}}}
  - {{kind: StatefulSet, name: db, namespace: shop, replicas: 2, pdb: {{maxUnavailable: 1}}}}
"
    )
}

fn cfg_final() -> cnimig_core::config::MigrationConfig {
    let mut c = cfg();
    c.max_in_flight = 2;
    c
}

fn ports(sim: &SimCluster, fin: &SimFinal) -> FinalPorts {
    FinalPorts {
        cluster: Arc::new(sim.clone()),
        cilium: Arc::new(sim.clone()),
        store: Arc::new(sim.clone()),
        finalize: Arc::new(fin.clone()),
        allow: Arc::new(fin.clone()),
        clock: Arc::new(sim.clone()),
    }
}

fn finalizer(sim: &SimCluster, fin: &SimFinal) -> Finalizer {
    let opts = FinalOptions {
        config_timeout: Duration::from_secs(60),
        ..FinalOptions::default()
    };
    Finalizer::new(ports(sim, fin), cfg_final(), opts)
}

fn cleaner(sim: &SimCluster, fin: &SimFinal) -> Cleaner {
    Cleaner::new(
        ports(sim, fin),
        Arc::new(sim.clone()),
        Arc::new(fin.clone()),
        cfg_final(),
        FinalOptions::default(),
        Duration::from_secs(120),
    )
}

/// A simulated cluster with Cilium installed, the allow rule applied and `migrate` nodes (all
/// when `None`) migrated.
async fn migrated(install: &str, migrate: Option<usize>) -> (SimCluster, SimFinal) {
    let sim = SimCluster::new(
        Scenario::from_yaml(&scenario(install)).unwrap(),
        params(),
        3,
    )
    .unwrap();
    let fin = SimFinal::new(&sim);
    install_cilium_and_config(&sim).await;
    fin.apply_allow_rule(cfg().pod_cidr).await.unwrap();
    let nodes = sim.inventory().await.unwrap().nodes;
    let mut order: Vec<_> = nodes.iter().filter(|n| !n.is_control_plane()).collect();
    order.extend(nodes.iter().filter(|n| n.is_control_plane()));
    for n in order.into_iter().take(migrate.unwrap_or(usize::MAX)) {
        let rec = migrate_node(&sim, &n.name, Duration::from_secs(1800)).await;
        assert_eq!(rec.phase, Phase::Done, "{}", n.name);
    }
    (sim, fin)
}

async fn install_cilium_and_config(sim: &SimCluster) {
    install(sim, false).await;
}

/// `helm upgrade` with the final values.
fn upgrade(sim: &SimCluster) {
    sim.install_cilium(rendered_config(
        &cfg_final(),
        ValueInputs::default(),
        CiliumPhase::Final,
    ))
    .unwrap();
}

/// Everything the run should leave behind, for comparing runs.
#[derive(Debug, PartialEq, Eq)]
struct End {
    step: Option<(FinalStep, bool)>,
    labels: Vec<(NodeName, bool)>,
    node_configs: bool,
    agents_ready_with_cilium: Vec<bool>,
    calico: Vec<CalicoObject>,
    crds: bool,
    helpers: usize,
    flushed: usize,
    allow_rule: bool,
}

async fn end(sim: &SimCluster, fin: &SimFinal) -> End {
    let v = fin.view();
    let rec = v
        .record
        .as_deref()
        .map(|r| FinalRecord::from_annotation(r).unwrap());
    let mut labels = Vec::new();
    let mut agents = Vec::new();
    for n in sim.node_list() {
        labels.push((
            n.clone(),
            sim.node(&n)
                .unwrap()
                .labels
                .contains_key(&cfg().migration_label),
        ));
        let a = sim.agent(&n).await.unwrap();
        agents.push(a.is_some_and(|a| a.ready) && sim.node_cni(&n).unwrap().cilium_conflist);
    }
    End {
        step: rec.map(|r| {
            (
                r.step,
                r.cleanup
                    .is_some_and(|c| c.step == cnimig_core::cleanup::CleanupStep::Done),
            )
        }),
        labels,
        node_configs: fin.node_config_present(&cfg().node_config_name),
        agents_ready_with_cilium: agents,
        calico: v.calico_objects.into_iter().collect(),
        crds: v.crds_present,
        helpers: v.helpers.len(),
        flushed: v.flushed.len(),
        allow_rule: v.allow_rule.is_some(),
    }
}

/// The simulator's violations, less the one rule that belongs to the per-node migration only:
/// its order check flags any act on a worker after a control-plane node started migrating, and
/// finalize restarts every agent again (workers first, which the tests check themselves).
/// Budget, connectivity and oversubscription violations all count.
fn violations(
    sim: &SimCluster,
    finalize_started: cnimig_core::model::Time,
) -> Vec<cnimig_sim::Violation> {
    sim.violations()
        .into_iter()
        .filter(|v| {
            !(v.kind == cnimig_sim::ViolationKind::Order
                && v.time >= finalize_started
                && v.message.contains("after control-plane node"))
        })
        .collect()
}

fn write_calls(sim: &SimCluster) -> BTreeMap<String, u64> {
    sim.stats()
        .api_calls
        .into_iter()
        .filter(|(k, _)| {
            [
                "set_", "save", "lock", "restart", "delete", "apply", "evict", "remove", "start",
            ]
            .iter()
            .any(|w| k.contains(w))
        })
        .collect()
}

#[tokio::test]
async fn refuses_with_unmigrated_nodes_and_writes_nothing() {
    let (sim, fin) = migrated("operator", Some(2)).await;
    upgrade(&sim);
    let before = write_calls(&sim);
    let view_before = fin.view();
    let err = finalizer(&sim, &fin).finalize().await.unwrap_err();
    let FinalizeError::NotMigrated(lines) = &err else {
        panic!("{err}")
    };
    let text = err.to_string();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        text.contains("node cp") && text.contains("never migrated"),
        "{text}"
    );
    assert_eq!(write_calls(&sim), before, "no write call at all");
    assert_eq!(fin.view(), view_before);
    assert!(sim.lock_holder().is_none(), "the lock was not taken");
    // Clean-up refuses too: finalize never ran.
    let err = cleaner(&sim, &fin).clean_up().await.unwrap_err();
    assert!(matches!(err, CleanupError::NotFinalized(_)), "{err}");
    assert_eq!(write_calls(&sim), before);
}

#[tokio::test]
async fn waits_for_the_config_and_names_every_differing_key() {
    let (sim, fin) = migrated("operator", None).await;
    // No helm upgrade: the live config is still the migration's.
    let t0 = sim.now();
    let err = finalizer(&sim, &fin).finalize().await.unwrap_err();
    let FinalizeError::ConfigNotFinal { mismatches, waited } = &err else {
        panic!("{err}")
    };
    assert!(*waited >= Duration::from_secs(60));
    assert!(sim.now().since(t0) >= Duration::from_secs(60));
    let keys: Vec<&str> = mismatches.iter().map(|m| m.key.as_str()).collect();
    for k in [
        "custom-cni-conf",
        "unmanaged-pod-watcher-interval",
        "enable-policy",
        "cni-exclusive",
    ] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
        assert!(err.to_string().contains(k));
    }
    assert_eq!(keys.len(), 4, "{keys:?}");
    // No agent was restarted, nothing removed.
    let e = end(&sim, &fin).await;
    assert!(e.labels.iter().all(|(_, l)| *l));
    assert!(e.node_configs && e.allow_rule);
    // After the upgrade it resumes and finishes.
    upgrade(&sim);
    finalizer(&sim, &fin).finalize().await.unwrap();
}

async fn full_run(install: &str) -> (SimCluster, SimFinal) {
    let (sim, fin) = migrated(install, None).await;
    upgrade(&sim);
    let agents_before: Vec<_> = {
        let mut v = Vec::new();
        for n in sim.node_list() {
            v.push(sim.agent(&n).await.unwrap().unwrap().pod_uid);
        }
        v
    };
    let ops_before = sim.op_log().len();
    let t_final = sim.now();
    let rep = finalizer(&sim, &fin).finalize().await.unwrap();
    assert_eq!(rep.restarted_now, 5);
    assert!(
        rep.max_in_flight_seen <= 2 && rep.max_in_flight_seen >= 1,
        "{rep:?}"
    );
    for (n, before) in sim.node_list().iter().zip(agents_before) {
        let a = sim.agent(n).await.unwrap().unwrap();
        assert_ne!(a.pod_uid, before, "{n} agent restarted");
    }
    // The control-plane agent restarted last.
    let log = sim.op_log();
    let restarts: Vec<&str> = log[ops_before..]
        .iter()
        .filter(|o| matches!(o.kind, cnimig_sim::OpKind::RestartAgent { .. }))
        .map(|o| o.node.as_str())
        .collect();
    assert!(restarts.last().unwrap().starts_with("cp"), "{restarts:?}");
    assert_eq!(restarts.len(), 5);
    let rep = cleaner(&sim, &fin).clean_up().await.unwrap();
    assert_eq!(rep.flushed_now, 5);
    assert!(rep.max_in_flight_seen <= 2);
    assert!(fin.view().max_helpers <= 2);
    let e = end(&sim, &fin).await;
    assert_eq!(e.step, Some((FinalStep::Done, true)));
    assert!(e.labels.iter().all(|(_, l)| !l), "{e:?}");
    assert!(!e.node_configs && !e.allow_rule && !e.crds);
    assert!(e.agents_ready_with_cilium.iter().all(|a| *a));
    assert!(e.calico.is_empty() && e.helpers == 0 && e.flushed == 5);
    let v = violations(&sim, t_final);
    assert!(v.is_empty(), "{v:#?}");
    (sim, fin)
}

fn deletions(fin: &SimFinal) -> Vec<String> {
    fin.view()
        .log
        .into_iter()
        .filter(|l| l.starts_with("delete ") && !l.starts_with("delete helper"))
        .collect()
}

#[tokio::test]
async fn operator_install_is_removed_in_order() {
    let (_sim, fin) = full_run("operator").await;
    assert_eq!(fin.install(), CalicoInstall::Operator);
    let d = deletions(&fin);
    assert_eq!(
        d,
        vec![
            "delete CiliumNodeConfig cilium-default",
            "delete Installation",
            "delete ApiServer",
            "delete OperatorDeployment",
            "delete Namespaces",
            "delete CRDs"
        ]
    );
    // Every node was flushed (and its helper deleted) before the CRDs went.
    let log = fin.view().log;
    let crds = log.iter().position(|l| l == "delete CRDs").unwrap();
    assert_eq!(
        log[..crds]
            .iter()
            .filter(|l| l.starts_with("delete helper"))
            .count(),
        5
    );
}

#[tokio::test]
async fn manifest_install_is_removed_in_order() {
    let (_sim, fin) = full_run("manifest").await;
    let d = deletions(&fin);
    let want: Vec<String> = removal_order(CalicoInstall::Manifest)
        .iter()
        .map(|o| format!("delete {o:?}"))
        .collect();
    assert_eq!(d[1..4], want[..]);
    assert_eq!(
        want,
        vec![
            "delete NodeDaemonSet",
            "delete KubeControllers",
            "delete CalicoConfig"
        ]
    );
}

#[tokio::test]
async fn running_again_changes_nothing() {
    let (sim, fin) = full_run("operator").await;
    let before = write_calls(&sim);
    let log = fin.view().log;
    let ops = sim.op_log().len();
    let rep = finalizer(&sim, &fin).finalize().await.unwrap();
    assert_eq!(rep.restarted_now, 0);
    let rep = cleaner(&sim, &fin).clean_up().await.unwrap();
    assert_eq!(rep.flushed_now, 0);
    assert_eq!(fin.view().log, log);
    assert_eq!(sim.op_log().len(), ops);
    let after = write_calls(&sim);
    // Only the lock was taken and released again.
    for (k, v) in &after {
        if !k.contains("lock") {
            assert_eq!(before.get(k), Some(v), "{k}");
        }
    }
}

/// Kills a run after every single port call (each cut-off point in turn), then runs again
/// until it finishes; every such pair ends exactly as a run never killed.
#[tokio::test]
async fn a_run_killed_after_any_call_resumes_to_the_same_end() {
    let (sim, fin) = full_run("operator").await;
    let reference = end(&sim, &fin).await;
    // How many calls an unkilled finalize + clean-up makes.
    let (sim, fin) = migrated("operator", None).await;
    upgrade(&sim);
    let c0 = sim.stats().total_api_calls();
    finalizer(&sim, &fin).finalize().await.unwrap();
    cleaner(&sim, &fin).clean_up().await.unwrap();
    let calls = sim.stats().total_api_calls() - c0;
    assert!(calls > 50, "{calls}");
    let mut killed = 0;
    for cut in 0..calls {
        let (sim, fin) = migrated("operator", None).await;
        upgrade(&sim);
        let t_final = sim.now();
        sim.cut_off_after(Some(cut));
        let a = finalizer(&sim, &fin).finalize().await;
        let b = if a.is_ok() {
            cleaner(&sim, &fin).clean_up().await.map(|_| ())
        } else {
            Ok(())
        };
        if a.is_err() || b.is_err() {
            killed += 1;
        }
        sim.cut_off_after(None);
        // The dead run keeps its lock, as a dead process would; the same holder takes it again.
        finalizer(&sim, &fin)
            .finalize()
            .await
            .unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        cleaner(&sim, &fin)
            .clean_up()
            .await
            .unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        assert_eq!(end(&sim, &fin).await, reference, "cut after {cut} calls");
        let v = violations(&sim, t_final);
        assert!(v.is_empty(), "cut {cut}: {v:#?}");
    }
    eprintln!(
        "{killed} of {calls} cut-off points stopped a run; every one resumed to the reference end"
    );
    assert!(
        killed as u64 >= calls - 1,
        "{killed} of {calls} runs were cut off"
    );
}

#[tokio::test]
async fn a_failed_node_blocks_finalize_and_clean_up() {
    let (sim, fin) = migrated("operator", None).await;
    upgrade(&sim);
    // A rolled-back record on one node.
    let n = sim
        .node_list()
        .into_iter()
        .find(|n| n.as_str().starts_with('w'))
        .unwrap();
    let mut recs = cnimig_core::ports::StateStore::load(&sim).await.unwrap();
    let prev = recs.remove(&n).unwrap();
    let mut next = prev.clone();
    next.phase = Phase::RolledBack;
    cnimig_core::ports::StateStore::save(&sim, &n, Some(&prev), &next)
        .await
        .unwrap();
    let err = finalizer(&sim, &fin).finalize().await.unwrap_err();
    assert!(
        err.to_string().contains(&format!("node {n} is RolledBack")),
        "{err}"
    );
    let _ = SimParams::default();
}
