//! Cilium and Calico behaviour: install, node configs resolved only at agent start, the CNI
//! directory, restoring Calico's config.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use std::collections::BTreeMap;

use cnimig_core::cilium::CiliumNodeConfig;
use cnimig_core::model::{OwnerKind, PodNetwork};
use cnimig_core::ports::{Clock, Cluster, CniDirState, NewCni, OldCni, PortError};
use common::*;

const CLUSTER: &str = r"
nodes:
  - {name: n, count: 2}
workloads:
  - {kind: Deployment, name: web, replicas: 2}
  - {kind: DaemonSet, name: shipper}
  - {kind: DaemonSet, name: hostds, hostNetwork: true}
calico: {autodetection: kubernetes-internal-ip}
";

fn other_config(name: &str, label: &str) -> CiliumNodeConfig {
    let mut c = node_config(false);
    c.name = name.into();
    c.label = label.into();
    c
}

async fn restart(sim: &cnimig_sim::SimCluster, n: &cnimig_core::model::NodeName) -> String {
    let a = sim.agent(n).await.unwrap().unwrap();
    sim.restart_agent(n, &a.pod_uid).await.unwrap();
    a.pod_uid
}

#[tokio::test]
async fn before_install_there_is_no_cilium() {
    let sim = sim(CLUSTER);
    assert!(matches!(
        sim.live_config().await,
        Err(PortError::NotFound { .. })
    ));
    assert_eq!(sim.agent(&name("n-1")).await.unwrap(), None);
    assert_eq!(
        sim.cni_dir(&name("n-1")).await.unwrap(),
        CniDirState::CALICO
    );
    assert!(sim.agent(&name("zz")).await.is_err());
    let facts = sim.facts().await.unwrap();
    assert_eq!(facts.vxlan_port, 4789);
    assert_eq!(facts.ip_pools.len(), 1);
}

#[tokio::test]
async fn agents_start_passive_and_take_the_node_config_only_when_restarted() {
    let sim = sim(CLUSTER);
    let n1 = name("n-1");
    sim.install_cilium(live(false)).unwrap();
    assert_eq!(sim.live_config().await.unwrap(), live(false));
    let a = sim.agent(&n1).await.unwrap().unwrap();
    assert!(!a.ready);
    sim.sleep_until(secs(30)).await;
    let a = sim.agent(&n1).await.unwrap().unwrap();
    assert!(a.ready);
    assert_eq!(a.node_config, None);
    assert_eq!(
        sim.cni_dir(&n1).await.unwrap(),
        CniDirState::CALICO,
        "custom-cni-conf keeps Cilium passive"
    );
    assert_eq!(
        sim.node_pod_cidr(&n1),
        Some("10.245.0.0/24".parse().unwrap())
    );
    assert_eq!(
        sim.node_pod_cidr(&name("n-2")),
        Some("10.245.1.0/24".parse().unwrap())
    );

    sim.apply_node_config(&node_config(false)).await.unwrap();
    sim.set_unschedulable(&n1, true).await.unwrap();
    for p in sim
        .node_view(&n1)
        .await
        .unwrap()
        .pods
        .iter()
        .filter(|p| p.is_drainable())
    {
        sim.evict(&p.pod).await.unwrap();
    }
    sim.sleep_until(secs(45)).await;
    sim.set_node_label(&n1, &cfg().migration_label, Some("true"))
        .await
        .unwrap();
    sim.sleep_until(secs(200)).await;
    // Labelled, but the running agent resolved nothing: nothing changes.
    assert_eq!(sim.agent(&n1).await.unwrap().unwrap().node_config, None);
    assert_eq!(sim.cni_dir(&n1).await.unwrap(), CniDirState::CALICO);

    let old = restart(&sim, &n1).await;
    let a = sim.agent(&n1).await.unwrap().unwrap();
    assert_eq!(a.pod_uid, old, "the terminating agent is still there");
    assert!(!a.ready);
    sim.sleep_until(secs(210)).await; // old agent gone, new one started and resolved the config
    let a = sim.agent(&n1).await.unwrap().unwrap();
    assert_ne!(a.pod_uid, old);
    assert_eq!(a.node_config.as_deref(), Some("cilium-default"));
    assert!(!a.ready);
    assert_eq!(
        sim.cni_dir(&n1).await.unwrap(),
        CniDirState::CALICO,
        "written only when Ready"
    );
    sim.sleep_until(secs(240)).await;
    assert!(sim.agent(&n1).await.unwrap().unwrap().ready);
    assert_eq!(sim.cni_dir(&n1).await.unwrap(), CniDirState::CILIUM);
    assert_eq!(sim.chaining_mode(&n1).as_deref(), Some("none"));

    // Pods already running keep Calico; new pods get Cilium addresses from the node's podCIDR.
    let shipper = sim
        .pods_on(&n1)
        .into_iter()
        .find(|p| p.pod.name.starts_with("shipper-"))
        .unwrap();
    assert_eq!(shipper.network, PodNetwork::Calico);
    assert!(!sim.is_fully_migrated(&n1));
    sim.delete_pod(&shipper.pod).await.unwrap();
    sim.sleep_until(secs(260)).await;
    let shipper = sim
        .pods_on(&n1)
        .into_iter()
        .find(|p| p.pod.name.starts_with("shipper-"))
        .unwrap();
    assert_eq!(shipper.network, PodNetwork::Cilium);
    assert!(
        "10.245.0.0/24"
            .parse::<ipnet::Ipv4Net>()
            .unwrap()
            .contains(&shipper.ip.unwrap())
    );
    let hostds = sim
        .pods_on(&n1)
        .into_iter()
        .find(|p| p.pod.name.starts_with("hostds-"))
        .unwrap();
    assert_eq!(hostds.network, PodNetwork::Host);
    assert!(sim.is_fully_migrated(&n1));
    assert!(sim.violations().is_empty(), "{:#?}", sim.violations());

    // Removing the label changes nothing until the agent restarts, and a restart without a
    // matching config does not bring Calico's files back.
    sim.set_node_label(&n1, &cfg().migration_label, None)
        .await
        .unwrap();
    assert_eq!(
        sim.agent(&n1)
            .await
            .unwrap()
            .unwrap()
            .node_config
            .as_deref(),
        Some("cilium-default")
    );
    restart(&sim, &n1).await;
    sim.sleep_until(secs(400)).await;
    let a = sim.agent(&n1).await.unwrap().unwrap();
    assert!(a.ready);
    assert_eq!(a.node_config, None);
    assert_eq!(sim.cni_dir(&n1).await.unwrap(), CniDirState::CILIUM);

    // Restoring Calico's config takes the helper pod's time and is idempotent.
    sim.restore_calico_cni(&n1).await.unwrap();
    sim.restore_calico_cni(&n1).await.unwrap();
    sim.sleep_until(secs(403)).await;
    assert_eq!(sim.cni_dir(&n1).await.unwrap(), CniDirState::CILIUM);
    sim.sleep_until(secs(404)).await;
    assert_eq!(sim.cni_dir(&n1).await.unwrap(), CniDirState::CALICO);
    sim.restore_calico_cni(&n1).await.unwrap();
    assert_eq!(sim.cni_dir(&n1).await.unwrap(), CniDirState::CALICO);
    assert_eq!(sim.chaining_mode(&n1), None);
}

#[tokio::test]
async fn the_config_whose_name_sorts_last_wins_and_only_true_selects() {
    let sim = sim(CLUSTER);
    let (n1, n2) = (name("n-1"), name("n-2"));
    sim.install_cilium(live(false)).unwrap();
    let mut a = other_config("a-config", "example.com/a");
    a.defaults
        .insert("cni-chaining-mode".into(), "portmap".into());
    let b = other_config("b-config", "example.com/b");
    sim.apply_node_config(&b).await.unwrap();
    sim.apply_node_config(&a).await.unwrap();
    sim.set_node_label(&n1, "example.com/a", Some("true"))
        .await
        .unwrap();
    sim.set_node_label(&n1, "example.com/b", Some("true"))
        .await
        .unwrap();
    sim.set_node_label(&n2, "example.com/a", Some("true"))
        .await
        .unwrap();
    sim.set_node_label(&n2, "example.com/b", Some("yes"))
        .await
        .unwrap();
    restart(&sim, &n1).await;
    restart(&sim, &n2).await;
    sim.sleep_until(secs(60)).await;
    assert_eq!(
        sim.agent(&n1)
            .await
            .unwrap()
            .unwrap()
            .node_config
            .as_deref(),
        Some("b-config")
    );
    assert_eq!(
        sim.agent(&n2)
            .await
            .unwrap()
            .unwrap()
            .node_config
            .as_deref(),
        Some("a-config")
    );
    assert_eq!(sim.chaining_mode(&n1).as_deref(), Some("none"));
    assert_eq!(sim.chaining_mode(&n2).as_deref(), Some("portmap"));
    // Labelling on schedulable nodes that hold pods is recorded as out of order.
    assert!(
        sim.violations()
            .iter()
            .all(|v| v.kind == cnimig_sim::ViolationKind::Order),
        "{:#?}",
        sim.violations()
    );
}

#[tokio::test]
async fn a_final_phase_config_makes_every_agent_write_its_conf() {
    let sim = sim(CLUSTER);
    let fin = cnimig_core::cilium::rendered_config(
        &cfg(),
        Default::default(),
        cnimig_core::cilium::CiliumPhase::Final,
    );
    sim.install_cilium(fin).unwrap();
    sim.sleep_until(secs(30)).await;
    for n in sim.node_list() {
        assert!(sim.cni_dir(&n).await.unwrap().cilium_conflist);
    }
}

#[tokio::test]
async fn faults_agent_never_ready_and_node_not_ready() {
    let sim = sim(CLUSTER);
    let (n1, n2) = (name("n-1"), name("n-2"));
    sim.set_faults(cnimig_sim::SimFaults {
        agent_never_ready: [n1.clone()].into(),
        node_not_ready_at: vec![(n2.clone(), secs(100))],
        blocked_evictions: ["default/web".to_string()].into(),
        ..Default::default()
    })
    .unwrap();
    sim.install_cilium(live(false)).unwrap();
    sim.sleep_until(secs(90)).await;
    assert!(!sim.agent(&n1).await.unwrap().unwrap().ready);
    assert!(sim.agent(&n2).await.unwrap().unwrap().ready);
    let web = pods_named(&sim, "web-");
    assert_eq!(
        sim.evict(&web[0].pod).await.unwrap(),
        cnimig_core::ports::EvictOutcome::BlockedByBudget {
            pdb: "default/web".into()
        }
    );
    sim.sleep_until(secs(100)).await;
    assert!(!sim.node(&n2).unwrap().ready);
    assert!(sim.pods_on(&n2).iter().all(|p| !p.ready));
    // The helper pod cannot run on a NotReady node; a deleted pod there never finishes.
    assert!(sim.restore_calico_cni(&n2).await.is_err());
    let ds = sim
        .pods_on(&n2)
        .into_iter()
        .find(|p| p.owner == OwnerKind::DaemonSet)
        .unwrap();
    sim.delete_pod(&ds.pod).await.unwrap();
    sim.sleep_until(secs(500)).await;
    assert!(sim.pods_on(&n2).iter().any(|p| p.pod.uid == ds.pod.uid));
    sim.set_node_ready(&n2, true).unwrap();
    assert!(!sim.pods_on(&n2).iter().any(|p| p.pod.uid == ds.pod.uid));
    assert!(
        sim.set_faults(cnimig_sim::SimFaults {
            agent_never_ready: [name("zz")].into(),
            ..Default::default()
        })
        .is_err()
    );
}

#[tokio::test]
async fn a_bad_pool_is_refused() {
    let sim = sim(CLUSTER);
    let mut bad = BTreeMap::new();
    bad.insert(
        "cluster-pool-ipv4-cidr".to_string(),
        "10.245.0.0".to_string(),
    );
    assert!(sim.install_cilium(bad.clone()).is_err());
    bad.insert(
        "cluster-pool-ipv4-cidr".to_string(),
        "10.245.0.0/16".to_string(),
    );
    bad.insert("cluster-pool-ipv4-mask-size".to_string(), "8".to_string());
    assert!(sim.install_cilium(bad).is_err());
    assert!(sim.live_config().await.is_err());
}

#[tokio::test]
async fn a_pool_too_small_for_the_nodes_leaves_agents_unready() {
    let sim = sim(CLUSTER);
    let mut cfg = live(false);
    cfg.insert("cluster-pool-ipv4-cidr".into(), "10.245.0.0/24".into());
    cfg.insert("cluster-pool-ipv4-mask-size".into(), "24".into());
    sim.install_cilium(cfg).unwrap();
    sim.sleep_until(secs(100)).await;
    assert!(sim.agent(&name("n-1")).await.unwrap().unwrap().ready);
    assert_eq!(sim.node_pod_cidr(&name("n-2")), None);
    assert!(!sim.agent(&name("n-2")).await.unwrap().unwrap().ready);
}
