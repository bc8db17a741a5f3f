//! Helpers shared by the integration tests (included with `mod common;`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use cnimig_core::cilium::{CiliumNodeConfig, CiliumPhase, ValueInputs, rendered_config};
use cnimig_core::config::MigrationConfig;
use cnimig_core::machine::{Action, NodeRecord, Observation, StepConfig, decide, on_verification};
use cnimig_core::model::{NodeName, Pod, Time};
use cnimig_core::ports::{Clock, Cluster, NewCni, StateStore, Verifier};
use cnimig_sim::{Scenario, SimCluster, SimParams, Span};

/// A node name.
pub fn name(s: &str) -> NodeName {
    NodeName::new(s).unwrap()
}

/// The migration config the tests use (pod CIDR 10.245.0.0/16).
pub fn cfg() -> MigrationConfig {
    MigrationConfig::new("10.245.0.0/16".parse().unwrap())
}

/// The live cilium-config a correct migration-mode install holds.
pub fn live(host_port: bool) -> BTreeMap<String, String> {
    rendered_config(
        &cfg(),
        ValueInputs {
            host_port_pods: host_port,
        },
        CiliumPhase::Migration,
    )
}

/// The migration's CiliumNodeConfig.
pub fn node_config(host_port: bool) -> CiliumNodeConfig {
    CiliumNodeConfig::for_migration(
        &cfg(),
        ValueInputs {
            host_port_pods: host_port,
        },
    )
}

/// Fixed, distinct durations: termination 10 s, pod ready 5 s, agent ready 30 s, restore 4 s.
pub fn params() -> SimParams {
    SimParams {
        pod_termination: Span::fixed(Duration::from_secs(10)),
        pod_ready: Span::fixed(Duration::from_secs(5)),
        agent_ready: Span::fixed(Duration::from_secs(30)),
        cni_restore: Span::fixed(Duration::from_secs(4)),
    }
}

/// A simulator over the YAML scenario with [`params`] and seed 1.
pub fn sim(yaml: &str) -> SimCluster {
    SimCluster::new(Scenario::from_yaml(yaml).unwrap(), params(), 1).unwrap()
}

/// `s` seconds after the start.
pub fn secs(s: u64) -> Time {
    Time(s * 1000)
}

/// Pods whose name starts with `prefix`.
pub fn pods_named(sim: &SimCluster, prefix: &str) -> Vec<Pod> {
    sim.pods()
        .into_iter()
        .filter(|p| p.pod.name.starts_with(prefix))
        .collect()
}

/// Drives one node through the core's per-node state machine until it finishes, polling every
/// 2 s, as a minimal orchestrator would. Panics if it takes longer than `limit`.
pub async fn migrate_node(sim: &SimCluster, node: &NodeName, limit: Duration) -> NodeRecord {
    let step = StepConfig::from(&cfg());
    let start = Clock::now(sim);
    let mut rec = match sim.load().await.unwrap().get(node) {
        Some(r) => r.clone(),
        None => {
            let r = NodeRecord::new(start);
            sim.save(node, None, &r).await.unwrap();
            r
        }
    };
    loop {
        let now = Clock::now(sim);
        assert!(
            now.since(start) <= limit,
            "node {node} not finished after {limit:?}: {rec:?}\n{:#?}",
            sim.describe_nodes()
        );
        let view = sim.node_view(node).await.unwrap();
        let agent = sim.agent(node).await.unwrap();
        let cni = sim.cni_dir(node).await.unwrap();
        let d = decide(
            &rec,
            &Observation {
                view: &view,
                agent: agent.as_ref(),
                cni,
            },
            &step,
            now,
        );
        if d.changed {
            sim.save(node, Some(&rec), &d.record).await.unwrap();
            rec = d.record;
        }
        match d.action {
            Action::Cordon => sim.set_unschedulable(node, true).await.unwrap(),
            Action::Uncordon => sim.set_unschedulable(node, false).await.unwrap(),
            Action::Evict(pods) => {
                for p in pods {
                    sim.evict(&p).await.unwrap();
                }
            }
            Action::Label => sim
                .set_node_label(node, &step.label, Some("true"))
                .await
                .unwrap(),
            Action::Unlabel => sim.set_node_label(node, &step.label, None).await.unwrap(),
            Action::RestartAgent(uid) => sim.restart_agent(node, &uid).await.unwrap(),
            Action::Recycle { evict, delete } => {
                for p in evict {
                    sim.evict(&p).await.unwrap();
                }
                for p in delete {
                    sim.delete_pod(&p).await.unwrap();
                }
            }
            Action::Verify => {
                let v = sim.verify_node(node).await.unwrap();
                let next = on_verification(&rec, &v, &step, now);
                if next != rec {
                    sim.save(node, Some(&rec), &next).await.unwrap();
                    rec = next;
                }
            }
            Action::RestoreCni => {
                let _ = sim.restore_calico_cni(node).await;
            }
            Action::Wait(_) => {}
            Action::Finished => return rec,
        }
        sim.sleep_until(now.after(Duration::from_secs(2))).await;
    }
}

/// Installs Cilium in migration mode and applies the node config.
pub async fn install(sim: &SimCluster, host_port: bool) {
    sim.install_cilium(live(host_port)).unwrap();
    sim.apply_node_config(&node_config(host_port))
        .await
        .unwrap();
    let t = Clock::now(sim).after(Duration::from_secs(120));
    sim.sleep_until(t).await;
}
