//! Test fixture: a healthy three-node cluster that passes every rule, to mutate per test.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::{Check, PreflightReport, RULE_IDS, Severity, preflight};
use crate::config::MigrationConfig;
use crate::model::{
    Autodetection, Budget, CalicoFacts, CalicoInstall, ClusterSnapshot, Dataplane, Encapsulation,
    IntOrPercent, IpPool, LabelSelector, Node, NodeName, NodeRole, OwnerKind, Pdb, Pod, PodNetwork,
    PodPhase, PodRef, Resources,
};

const GI: u64 = 1 << 30;
const MI: u64 = 1 << 20;

pub(super) fn name(s: &str) -> NodeName {
    NodeName::new(s).unwrap()
}

/// A snapshot, a config and a resolved scope.
pub(super) struct Fixture {
    pub snap: ClusterSnapshot,
    pub cfg: MigrationConfig,
    pub scope: Vec<NodeName>,
}

impl Fixture {
    /// `cp-1` (control plane), `worker-1`, `worker-2`; Deployment `shop/web` with one pod per
    /// worker and PDB `shop/web` (maxUnavailable 1); Calico pool `default-ipv4-ippool`
    /// 10.42.0.0/16 VXLAN on 4789 with natOutgoing, plus the disabled no-NAT pool for the new
    /// CIDR; autodetection `kubernetes-internal-ip`; service CIDR 10.43.0.0/16; Goldpinger; new
    /// pod CIDR 10.245.0.0/16; every node in scope.
    pub fn healthy() -> Self {
        let nodes = vec![
            Self::node("cp-1", NodeRole::ControlPlane, 10),
            Self::node("worker-1", NodeRole::Worker, 11),
            Self::node("worker-2", NodeRole::Worker, 12),
        ];
        let mut pods = Vec::new();
        for n in &nodes {
            let mut ds = Self::pod(
                "calico-system",
                &format!("calico-node-{}", n.name),
                n.name.as_str(),
                OwnerKind::DaemonSet,
            );
            ds.host_network = true;
            ds.network = PodNetwork::Host;
            ds.ip = n.internal_ips.first().copied();
            pods.push(ds);
        }
        let mut api = Self::pod(
            "kube-system",
            "kube-apiserver-cp-1",
            "cp-1",
            OwnerKind::Other("Node".into()),
        );
        api.mirror = true;
        api.host_network = true;
        api.network = PodNetwork::Host;
        pods.push(api);
        for (i, (pod, node)) in [("web-a", "worker-1"), ("web-b", "worker-2")]
            .into_iter()
            .enumerate()
        {
            let mut p = Self::pod("shop", pod, node, OwnerKind::ReplicaSet);
            std::sync::Arc::make_mut(&mut p.labels).insert("app".into(), "web".into());
            p.ip = Some(Ipv4Addr::new(10, 42, u8::try_from(i + 1).unwrap(), 5));
            pods.push(p);
        }
        pods.push(Self::pod(
            "coredns",
            "coredns-abc",
            "cp-1",
            OwnerKind::ReplicaSet,
        ));
        let pdbs = vec![Pdb {
            namespace: "shop".into(),
            name: "web".into(),
            selector: LabelSelector {
                match_labels: [("app".to_string(), "web".to_string())].into(),
                ..LabelSelector::default()
            },
            budget: Budget::MaxUnavailable(IntOrPercent::Int(1)),
            expected_pods: 2,
        }];
        let snap = ClusterSnapshot {
            nodes,
            pods,
            pdbs,
            calico: CalicoFacts {
                install: CalicoInstall::Operator,
                ip_pools: vec![
                    IpPool {
                        name: "default-ipv4-ippool".into(),
                        cidr: "10.42.0.0/16".parse().unwrap(),
                        encapsulation: Encapsulation::Vxlan,
                        nat_outgoing: true,
                        disabled: false,
                    },
                    IpPool {
                        name: "cilium-no-nat".into(),
                        cidr: "10.245.0.0/16".parse().unwrap(),
                        encapsulation: Encapsulation::None,
                        nat_outgoing: false,
                        disabled: true,
                    },
                ],
                vxlan_port: 4789,
                autodetection: Autodetection::KubernetesInternalIp,
                dataplane: Dataplane::Iptables,
                bgp: false,
            },
            service_cidr: "10.43.0.0/16".parse().unwrap(),
            cluster_cidr: Some("10.42.0.0/16".parse().unwrap()),
            other_routed: vec!["172.16.0.0/12".parse().unwrap()],
            connectivity_checker: true,
            cilium_agent_requests: Resources {
                cpu_millis: 100,
                memory_bytes: 128 * MI,
            },
            records: std::collections::BTreeMap::new(),
            unobservable: std::collections::BTreeMap::new(),
        };
        let mut cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
        cfg.other_routed_cidrs
            .push("192.168.100.0/24".parse().unwrap());
        let scope = snap.nodes.iter().map(|n| n.name.clone()).collect();
        Fixture { snap, cfg, scope }
    }

    /// A Ready, schedulable node with InternalIP 192.168.1.`last`, 4 CPUs and 8Gi, a quarter used.
    pub fn node(n: &str, role: NodeRole, last: u8) -> Node {
        Node {
            name: name(n),
            roles: vec![role],
            zone: Some("zone-a".into()),
            labels: BTreeMap::new(),
            taints: Vec::new(),
            unschedulable: false,
            ready: true,
            internal_ips: vec![Ipv4Addr::new(192, 168, 1, last)],
            allocatable: Resources {
                cpu_millis: 4000,
                memory_bytes: 8 * GI,
            },
            requested: Resources {
                cpu_millis: 1000,
                memory_bytes: 2 * GI,
            },
        }
    }

    /// A Running, Ready pod on the Calico network.
    pub fn pod(ns: &str, pod: &str, node: &str, owner: OwnerKind) -> Pod {
        Pod {
            pod: PodRef {
                namespace: ns.into(),
                name: pod.into(),
                uid: format!("uid-{ns}-{pod}"),
            },
            labels: Default::default(),
            owner,
            node: Some(name(node)),
            ip: None,
            network: PodNetwork::Calico,
            phase: PodPhase::Running,
            ready: true,
            terminating: false,
            host_network: false,
            host_port: false,
            empty_dir: false,
            mirror: false,
            tolerates_unschedulable: false,
            created: None,
            requests: Resources {
                cpu_millis: 100,
                memory_bytes: 64 * MI,
            },
        }
    }

    pub fn node_mut(&mut self, n: &str) -> &mut Node {
        self.snap
            .nodes
            .iter_mut()
            .find(|x| x.name.as_str() == n)
            .unwrap()
    }

    pub fn pod_mut(&mut self, p: &str) -> &mut Pod {
        self.snap.pods.iter_mut().find(|x| x.pod.name == p).unwrap()
    }

    pub fn run(&self) -> PreflightReport {
        preflight(&self.snap, &self.cfg, &self.scope)
    }
}

/// The checks of rule `id` with severity `sev` (at least one), after asserting that no check of
/// that rule is worse.
pub(super) fn expect(r: &PreflightReport, id: &str, sev: Severity) -> Vec<Check> {
    assert_eq!(r.worst(id), Some(sev), "worst severity of {id} in\n{r}");
    let c: Vec<Check> = r
        .with_id(id)
        .filter(|c| c.severity == sev)
        .cloned()
        .collect();
    assert!(!c.is_empty());
    c
}

/// Rule `id` ran and passed.
pub(super) fn assert_pass(r: &PreflightReport, id: &str) {
    let c: Vec<&Check> = r.with_id(id).collect();
    assert!(!c.is_empty(), "{id} emitted nothing:\n{r}");
    assert!(
        c.iter().all(|c| c.severity == Severity::Pass),
        "{id} did not pass:\n{r}"
    );
}

#[test]
fn healthy_cluster_passes_every_rule_in_order() {
    let r = Fixture::healthy().run();
    assert!(r.ok(), "{r}");
    assert_eq!(r.warnings().count(), 0, "{r}");
    let ids: Vec<&str> = r.checks.iter().map(|c| c.id).collect();
    assert_eq!(ids, RULE_IDS, "one Pass per rule, in rule order");
    for c in &r.checks {
        assert!(c.message.ends_with('.'), "{c}");
    }
}

#[test]
fn report_display_lists_every_check() {
    let mut f = Fixture::healthy();
    f.snap.connectivity_checker = false;
    let text = f.run().to_string();
    assert!(text.contains("[WARN] connectivity-checker: "), "{text}");
    assert_eq!(text.lines().count(), RULE_IDS.len());
}

mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::config::NodeScope;

    const NODES: [&str; 4] = ["cp-1", "worker-1", "worker-2", "gone-1"];

    fn owner() -> impl Strategy<Value = OwnerKind> {
        prop_oneof![
            Just(OwnerKind::None),
            Just(OwnerKind::ReplicaSet),
            Just(OwnerKind::StatefulSet),
            Just(OwnerKind::DaemonSet),
            Just(OwnerKind::Job),
            Just(OwnerKind::Other("X".into())),
        ]
    }

    fn phase() -> impl Strategy<Value = PodPhase> {
        prop_oneof![
            Just(PodPhase::Pending),
            Just(PodPhase::Running),
            Just(PodPhase::Succeeded),
            Just(PodPhase::Failed)
        ]
    }

    fn value() -> impl Strategy<Value = IntOrPercent> {
        prop_oneof![
            any::<u32>().prop_map(IntOrPercent::Int),
            any::<u32>().prop_map(IntOrPercent::Percent)
        ]
    }

    fn budget() -> impl Strategy<Value = Budget> {
        prop_oneof![
            value().prop_map(Budget::MinAvailable),
            value().prop_map(Budget::MaxUnavailable)
        ]
    }

    prop_compose! {
        fn any_pod()(i in 0u32..1000, node in 0usize..5, app in 0u8..3, owner in owner(), phase in phase(),
                     flags in any::<[bool; 7]>()) -> Pod {
            let node = NODES.get(node).copied();
            let mut p = Fixture::pod("ns", &format!("p-{i}"), "cp-1", owner);
            p.node = node.map(name);
            std::sync::Arc::make_mut(&mut p.labels).insert("app".into(), format!("a{app}"));
            p.phase = phase;
            let [ready, terminating, host_network, host_port, empty_dir, mirror, ns2] = flags;
            p.ready = ready;
            p.terminating = terminating;
            p.host_network = host_network;
            p.host_port = host_port;
            p.empty_dir = empty_dir;
            p.mirror = mirror;
            if ns2 { p.pod.namespace = "other".into(); }
            p
        }
    }

    prop_compose! {
        fn any_pdb()(i in 0u8..4, app in 0u8..3, budget in budget(), expected in any::<u32>(), all in any::<bool>())
                    -> Pdb {
            let mut selector = LabelSelector::default();
            if !all { selector.match_labels.insert("app".into(), format!("a{app}")); }
            Pdb { namespace: "ns".into(), name: format!("pdb-{i}"), selector, budget, expected_pods: expected }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(150))]

        #[test]
        fn random_workloads_and_nodes_never_panic_and_stay_bounded(
            pods in proptest::collection::vec(any_pod(), 0..40),
            pdbs in proptest::collection::vec(any_pdb(), 0..5),
            res in any::<[u64; 6]>(),
            node_flags in any::<[bool; 6]>(),
            scope_mask in any::<[bool; 5]>(),
            cfg_flags in any::<[bool; 3]>(),
        ) {
            let mut f = Fixture::healthy();
            f.snap.pods = pods;
            f.snap.pdbs = pdbs;
            let [a_cpu, a_mem, r_cpu, r_mem, n_cpu, n_mem] = res;
            f.snap.cilium_agent_requests = Resources { cpu_millis: a_cpu, memory_bytes: a_mem };
            for (i, n) in f.snap.nodes.iter_mut().enumerate() {
                n.allocatable = Resources { cpu_millis: n_cpu, memory_bytes: n_mem };
                n.requested = Resources { cpu_millis: r_cpu, memory_bytes: r_mem };
                n.ready = node_flags.get(i).copied().unwrap_or(true);
                n.unschedulable = node_flags.get(i + 3).copied().unwrap_or(false);
            }
            f.scope = NODES.iter().chain(["extra"].iter()).zip(scope_mask).filter(|(_, on)| *on).map(|(n, _)| name(n)).collect();
            let [evict, delete, names] = cfg_flags;
            f.cfg.evict_unmanaged_pods = evict;
            f.cfg.delete_emptydir_data = delete;
            if names { f.cfg.scope = NodeScope::Names(f.scope.clone()); }
            let r = f.run();
            for id in RULE_IDS {
                prop_assert!(r.worst(id).is_some(), "rule {} emitted nothing", id);
            }
            prop_assert_eq!(r.ok(), r.failures().next().is_none());
            for c in &r.checks {
                prop_assert!(c.message.len() < 1500, "unbounded message: {}", c);
            }
        }
    }
}
