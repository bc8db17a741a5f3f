//! Scenarios: YAML round trips, errors that name the object and the fix, generated clusters.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use cnimig_core::model::{NodeRole, OwnerKind, PodNetwork};
use cnimig_sim::{RandomSpec, Scenario, SimCluster, SimParams, WorkloadKind};
use proptest::prelude::*;
use rand::SeedableRng;

const DOC_EXAMPLE: &str = r"
nodes:
  - {name: cp, count: 3, roles: [control-plane, etcd], zones: [a, b, c], cpu: 4, memory: 16Gi}
  - {name: worker, count: 6, zones: [a, b, c], cpu: 8, memory: 32Gi}
workloads:
  - {kind: Deployment, name: web, namespace: shop, replicas: 4, pdb: {maxUnavailable: 1}}
  - {kind: StatefulSet, name: db, namespace: shop, replicas: 3, pdb: {minAvailable: 2}}
  - {kind: DaemonSet, name: calico-node, namespace: kube-system, hostNetwork: true}
  - {kind: StaticPod, name: kube-apiserver, namespace: kube-system, hostNetwork: true}
calico:
  pools: [{name: default-ipv4-ippool, cidr: 10.42.0.0/16, encapsulation: VXLAN}]
  autodetection: kubernetes-internal-ip
serviceCIDR: 10.43.0.0/16
connectivityChecker: true
";

#[test]
fn the_documented_example_parses_and_expands() {
    let s = Scenario::from_yaml(DOC_EXAMPLE).unwrap();
    let nodes = s.expand_nodes().unwrap();
    assert_eq!(nodes.len(), 9);
    assert_eq!(nodes[0].name.as_str(), "cp-1");
    assert_eq!(nodes[4].name.as_str(), "worker-2");
    assert_eq!(nodes[4].zone.as_deref(), Some("b"));
    assert!(nodes[0].roles.contains(&NodeRole::ControlPlane));
    assert_eq!(
        nodes[0].labels["node-role.kubernetes.io/control-plane"],
        "true"
    );
    let sim = SimCluster::new(s, SimParams::default(), 1).unwrap();
    let pods = sim.pods();
    // 4 + 3 + 9 DaemonSet pods + 3 static pods on the control plane.
    assert_eq!(pods.len(), 19);
    let mirrors: Vec<_> = pods.iter().filter(|p| p.mirror).collect();
    assert_eq!(mirrors.len(), 3);
    assert!(
        mirrors
            .iter()
            .all(|p| p.node.as_ref().unwrap().as_str().starts_with("cp-"))
    );
    assert!(
        pods.iter()
            .filter(|p| p.host_network)
            .all(|p| p.network == PodNetwork::Host)
    );
    assert!(
        pods.iter()
            .any(|p| p.owner == OwnerKind::StatefulSet && p.pod.name == "db-2")
    );
}

#[test]
fn yaml_round_trips() {
    for s in [
        Scenario::from_yaml(DOC_EXAMPLE).unwrap(),
        Scenario::reference(10),
        Scenario::reference(1),
    ] {
        let text = s.to_yaml();
        let back = Scenario::from_yaml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back, s);
    }
}

fn errors(yaml: &str) -> String {
    Scenario::from_yaml(yaml).unwrap_err().to_string()
}

#[test]
fn bad_scenarios_are_rejected_naming_the_object_and_the_fix() {
    let cases: &[(&str, &[&str])] = &[
        (
            "nodes: [{name: a}, {name: a}]",
            &["nodes[1] (a)", "appears twice"],
        ),
        ("nodes: [{name: Bad_Name}]", &["nodes[0]", "RFC 1123"]),
        ("nodes: []", &["at least one node"]),
        (
            "nodes: [{name: a, colour: red}]",
            &["unknown field `colour`"],
        ),
        (
            "nodes: [{name: a}]\nworkloads: [{kind: Deployment, name: w, replicas: -1}]",
            &["replicas"],
        ),
        (
            "nodes: [{name: a}]\nworkloads: [{kind: Deployment, name: w, pdb: {minAvailable: 150%}}]",
            &["150% is more than 100%"],
        ),
        (
            "nodes: [{name: a}]\nworkloads: [{kind: Deployment, name: w, pdb: {}}]",
            &["neither minAvailable nor maxUnavailable"],
        ),
        (
            "nodes: [{name: a}]\nworkloads: [{kind: Deployment, name: w, zones: [mars]}]",
            &["workloads[0] (default/w)", "zone \"mars\""],
        ),
        (
            "nodes: [{name: a}]\nworkloads: [{kind: Deployment, name: w, nodes: [b]}]",
            &["node \"b\" is not in the scenario"],
        ),
        (
            "nodes: [{name: a}]\nworkloads: [{kind: DaemonSet, name: d, replicas: 2}]",
            &["remove replicas"],
        ),
        (
            "nodes: [{name: a}]\nworkloads: [{kind: Deployment, name: w}, {kind: StatefulSet, name: w}]",
            &["clash"],
        ),
        (
            "nodes: [{name: a}]\nworkloads: [{kind: DaemonSet, name: cilium, namespace: kube-system}]",
            &["install_cilium"],
        ),
        (
            "nodes: [{name: a}]\nworkloads: [{kind: StaticPod, name: s}]",
            &["selects no node"],
        ),
        (
            "nodes: [{name: a}]\nserviceCIDR: 10.43.0.1/16",
            &["serviceCIDR", "10.43.0.0/16"],
        ),
        ("nodes: [{name: a}]\nserviceCIDR: banana", &["serviceCIDR"]),
        (
            "nodes: [{name: a}]\ncalico: {pools: [{name: p, cidr: 10.42.0.0/16, blockSize: 8}]}",
            &["blockSize"],
        ),
        (
            "nodes: [{name: a}]\ncalico: {pools: [{name: p, cidr: 10.42.0.0/16, disabled: true}]}",
            &["no enabled IP pool"],
        ),
        (
            "nodes: [{name: a}]\ncalico: {autodetection: guess}",
            &["autodetection"],
        ),
        ("nodes: [{name: a, cpu: lots}]", &["CPU quantity"]),
        ("nodes: [{name: a, memory: -5Gi}]", &["memory quantity"]),
        (
            "nodes: [{name: a, count: 2, internalIP: 10.0.0.1}]",
            &["internalIP"],
        ),
        ("nodes: [{name: a, count: 200000}]", &["limit"]),
        (
            "nodes: [{name: a}]\nworkloads: [{kind: Deployment, name: w, replicas: 4000000000}]",
            &["limit"],
        ),
        (
            "nodes: [{name: a}]\npdbs: [{name: p, selector: {app: x}, minAvailable: 1, maxUnavailable: 1}]",
            &["pdbs[0] (default/p)", "keep one"],
        ),
        ("{", &["not a valid scenario"]),
    ];
    for (yaml, wants) in cases {
        let e = errors(yaml);
        for w in *wants {
            assert!(e.contains(w), "{yaml:?}: wanted {w:?} in\n{e}");
        }
        assert!(e.contains("Fix:"), "{e}");
    }
    // Several problems are all reported.
    let e = Scenario::from_yaml("nodes: [{name: a}, {name: a}]\nserviceCIDR: 10.43.0.1/16\n")
        .unwrap_err();
    assert_eq!(e.0.len(), 2, "{e}");
}

#[test]
fn the_reference_cluster_has_the_documented_shape() {
    let s = Scenario::reference(150);
    assert_eq!(s, Scenario::reference(150), "deterministic");
    let nodes = s.expand_nodes().unwrap();
    assert_eq!(nodes.len(), 150);
    assert_eq!(
        nodes
            .iter()
            .filter(|n| n.roles.contains(&NodeRole::ControlPlane))
            .count(),
        3
    );
    let zones: std::collections::BTreeSet<_> =
        nodes.iter().filter_map(|n| n.zone.clone()).collect();
    assert_eq!(zones.len(), 3);
    let sim = SimCluster::new(s.clone(), SimParams::default(), 3).unwrap();
    let pods = sim.pods();
    assert!((1850..=2150).contains(&pods.len()), "{}", pods.len());
    assert!(pods.iter().all(|p| p.ready && p.node.is_some()));
    let deployments_with_pdb = s
        .workloads
        .iter()
        .filter(|w| w.kind == WorkloadKind::Deployment && w.pdb.is_some())
        .count();
    let multi = s
        .workloads
        .iter()
        .filter(|w| {
            w.kind == WorkloadKind::Deployment
                && w.replica_count() >= 2
                && w.namespace.starts_with("team")
        })
        .count();
    assert!(
        deployments_with_pdb * 10 >= multi * 6,
        "most multi-replica Deployments have a budget"
    );
    assert!(s.workloads.iter().any(|w| w.host_port));
    assert!(
        s.workloads
            .iter()
            .any(|w| w.host_network && w.kind == WorkloadKind::Deployment)
    );
    assert!(
        s.workloads
            .iter()
            .any(|w| w.kind == WorkloadKind::DaemonSet && !w.host_network)
    );
    assert!(
        s.workloads
            .iter()
            .any(|w| w.kind == WorkloadKind::StatefulSet && w.replicas == Some(3))
    );
    // Small sizes work too.
    for n in [0, 1, 2, 3, 4] {
        let sim = SimCluster::new(Scenario::reference(n), SimParams::default(), 3).unwrap();
        assert!(sim.pods().iter().all(|p| p.ready), "reference({n})");
    }
}

#[test]
fn random_clusters_are_valid_and_fully_placed() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let spec = RandomSpec::new(10);
    for _ in 0..200 {
        let s = Scenario::random(&mut rng, &spec);
        s.validate()
            .unwrap_or_else(|e| panic!("{e}\n{}", s.to_yaml()));
        let sim = SimCluster::new(s.clone(), SimParams::default(), 1).unwrap();
        for p in sim.pods() {
            assert!(p.node.is_some(), "unplaced {p:?}\n{}", s.to_yaml());
        }
        // Every budget allows a disruption while all its pods are healthy.
        for h in sim.pdb_health() {
            assert!(h.allowed >= 1 || h.expected == 0, "{h:?}\n{}", s.to_yaml());
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,300}") {
        let _ = Scenario::from_yaml(&s);
    }

    #[test]
    fn yaml_shaped_text_never_panics(s in "(nodes|workloads|calico|pdbs|name|count|replicas|cpu|memory|kind|pdb|minAvailable|zones|[-:\\[\\]{}, \\n0-9a-z%]){0,60}") {
        let _ = Scenario::from_yaml(&s);
    }
}

#[test]
fn random_trap_flags_generate_their_traps() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut spec = RandomSpec::new(8);
    spec.unsatisfiable_pdbs = true;
    spec.multiple_pdbs = true;
    spec.pod_network_static_pods = true;
    spec.bare_pods = true;
    spec.tolerating_pods = true;
    let (mut stuck, mut double, mut static_net, mut bare, mut tol) = (0, 0, 0, 0, 0);
    for _ in 0..300 {
        let s = Scenario::random(&mut rng, &spec);
        let sim = SimCluster::new(s, SimParams::default(), 1).unwrap();
        stuck += sim
            .pdb_health()
            .iter()
            .filter(|h| h.allowed == 0 && h.expected > 0)
            .count();
        double += usize::from(!sim.scenario().pdbs.is_empty());
        let pods = sim.pods();
        static_net += pods.iter().filter(|p| p.mirror && !p.host_network).count();
        bare += pods.iter().filter(|p| p.owner == OwnerKind::None).count();
        tol += pods
            .iter()
            .filter(|p| p.tolerates_unschedulable && p.owner != OwnerKind::DaemonSet)
            .count();
    }
    assert!(
        stuck > 0 && double > 0 && static_net > 0 && bare > 0 && tol > 0,
        "{stuck} {double} {static_net} {bare} {tol}"
    );
}
