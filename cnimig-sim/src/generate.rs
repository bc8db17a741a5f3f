//! Generated scenarios: the reference cluster (scaled to N nodes) and random clusters for
//! property tests.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use cnimig_core::model::NodeRole;
use ipnet::Ipv4Net;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::scenario::{
    CalicoSpec, Cpu, EncapsulationSpec, Memory, NodeSpec, PdbDecl, PdbSpec, PoolSpec, Requests,
    Scenario, WorkloadKind, WorkloadSpec,
};

const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];
const APPS: [&str; 16] = [
    "api", "web", "worker", "cache", "search", "auth", "billing", "orders", "catalog", "notify",
    "report", "gateway", "ledger", "media", "profile", "queue",
];

fn net(a: u8, b: u8, c: u8, d: u8, p: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(a, b, c, d), p).unwrap_or_default()
}

fn ds(namespace: &str, name: &str, host: bool, cpu: u64, mem: u64) -> WorkloadSpec {
    WorkloadSpec::new(WorkloadKind::DaemonSet, namespace, name)
        .host_network(host)
        .requests(Cpu(cpu), Memory::mib(mem))
}

fn static_pod(name: &str) -> WorkloadSpec {
    WorkloadSpec::new(WorkloadKind::StaticPod, "kube-system", name)
        .host_network(true)
        .requests(Cpu(0), Memory(0))
}

impl Scenario {
    /// The reference cluster scaled to `nodes` nodes (at least 1), the same for the same
    /// `nodes`: 3 control-plane nodes (1 below 3 nodes, which also runs workloads) and workers
    /// round-robin in 3 zones; about 13 pods per node. DaemonSets `calico-node`,
    /// `node-exporter` (hostNetwork), `fluent-bit` (a log shipper on the pod network, so it must
    /// be recycled) and `goldpinger` (the connectivity checker); static hostNetwork pods on the
    /// control plane; system Deployments (CoreDNS, an ingress controller with `hostPort`, a
    /// hostNetwork agent); and application workloads on the workers: Deployments of 2 to 10
    /// replicas, four in five with `maxUnavailable: 1`, StatefulSets of 3 with
    /// `minAvailable: 2`, and single-replica Deployments without a budget. The Cilium agent
    /// DaemonSet appears with `install_cilium`. Calico uses VXLAN on 4789 and
    /// `kubernetes-internal-ip` autodetection, so the cluster is migratable.
    #[must_use]
    pub fn reference(nodes: usize) -> Scenario {
        Scenario::reference_with(nodes, 89)
    }

    /// The reference cluster of `nodes` nodes with about `pods_per_node` pods per node (the four
    /// DaemonSets' and application pods; Cilium's agent comes on top), for scaling measurements:
    /// the same workload mix as [`Scenario::reference`], with more application replicas.
    /// `pods_per_node` is at least 5 (one application pod per node).
    #[must_use]
    pub fn reference_dense(nodes: usize, pods_per_node: u32) -> Scenario {
        let apps = u64::from(pods_per_node.saturating_sub(4).max(1));
        let mut s = Scenario::reference_with(nodes, apps * 10);
        s.name = format!("{}-x{pods_per_node}", s.name);
        s
    }

    /// The reference cluster with `app_tenths` / 10 application pods per node.
    fn reference_with(nodes: usize, app_tenths: u64) -> Scenario {
        let n = nodes.clamp(1, crate::scenario::MAX_NODES);
        let mut rng = ChaCha8Rng::seed_from_u64(0x00c1_1e5e ^ n as u64);
        let cp = if n >= 3 { 3 } else { 1 };
        let workers = n - cp;
        let mut node_specs = Vec::new();
        for i in 0..cp {
            let mut spec = NodeSpec::worker(&format!("cp-{}", i + 1), Some(ZONES[i % 3]));
            spec.roles = if workers == 0 {
                vec![NodeRole::ControlPlane, NodeRole::Etcd, NodeRole::Worker]
            } else {
                vec![NodeRole::ControlPlane, NodeRole::Etcd]
            };
            spec.cpu = Cpu::cores(if workers == 0 { 8 } else { 4 });
            spec.memory = Memory::gib(if workers == 0 { 32 } else { 16 });
            node_specs.push(spec);
        }
        if workers > 0 {
            let mut group = NodeSpec::worker("worker", None);
            group.count = Some(u32::try_from(workers).unwrap_or(u32::MAX));
            group.zones = ZONES.iter().map(|z| (*z).to_string()).collect();
            node_specs.push(group);
        }
        let app_roles = if workers >= 2 {
            vec![NodeRole::Worker]
        } else {
            Vec::new()
        };
        let mut w = vec![
            ds("kube-system", "calico-node", true, 250, 256),
            ds("monitoring", "node-exporter", true, 50, 64),
            ds("logging", "fluent-bit", false, 50, 128),
            ds("goldpinger", "goldpinger", false, 10, 32),
        ];
        for name in [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ] {
            w.push(static_pod(name));
        }
        let small = |k: WorkloadKind, ns: &str, name: &str, r: u32| {
            WorkloadSpec::new(k, ns, name)
                .replicas(r)
                .requests(Cpu(100), Memory::mib(128))
        };
        w.push(
            small(WorkloadKind::Deployment, "kube-system", "coredns", 2)
                .pdb(PdbSpec::max_unavailable(1)),
        );
        w.push(small(
            WorkloadKind::Deployment,
            "calico-system",
            "calico-kube-controllers",
            1,
        ));
        w.push(small(
            WorkloadKind::Deployment,
            "kube-system",
            "metrics-server",
            1,
        ));
        w.push(
            small(
                WorkloadKind::Deployment,
                "ingress-nginx",
                "ingress-nginx-controller",
                3.min(n as u32),
            )
            .host_port(true)
            .pdb(PdbSpec::max_unavailable(1)),
        );
        w.push(small(WorkloadKind::Deployment, "infra", "host-agent", 2).host_network(true));
        // Application workloads: about 9 pods per node beyond the DaemonSets (reference).
        let target = (n as u64 * app_tenths).div_ceil(10);
        let mut total = 0u64;
        let mut k = 0usize;
        while total < target {
            k += 1;
            let ns = format!("team-{:02}", rng.random_range(1..=12u32));
            let base = APPS[rng.random_range(0..APPS.len())];
            let roll = rng.random_range(0..100u32);
            let (kind, replicas, pdb, name) = if roll < 70 {
                let r = rng.random_range(2..=10u32);
                let pdb = rng.random_range(0..5u32) < 4;
                (
                    WorkloadKind::Deployment,
                    r,
                    pdb.then(|| PdbSpec::max_unavailable(1)),
                    format!("{base}-{k}"),
                )
            } else if roll < 85 {
                (
                    WorkloadKind::StatefulSet,
                    3,
                    Some(PdbSpec::min_available(2)),
                    format!("{base}-db-{k}"),
                )
            } else {
                (
                    WorkloadKind::Deployment,
                    1,
                    None,
                    format!("{base}-single-{k}"),
                )
            };
            let mut spec = WorkloadSpec::new(kind, &ns, &name)
                .replicas(replicas)
                .requests(
                    Cpu(rng.random_range(5..=30u64) * 10),
                    Memory::mib(rng.random_range(1..=8u64) * 64),
                );
            spec.pdb = pdb;
            spec.empty_dir = rng.random_range(0..5u32) == 0;
            spec.node_roles = app_roles.clone();
            total += u64::from(replicas);
            w.push(spec);
        }
        let large = n > 500;
        let pool = if large {
            net(10, 64, 0, 0, 10)
        } else {
            net(10, 42, 0, 0, 16)
        };
        Scenario {
            name: format!("reference-{n}"),
            nodes: node_specs,
            workloads: w,
            pdbs: Vec::new(),
            calico: CalicoSpec {
                pools: vec![PoolSpec {
                    name: "default-ipv4-ippool".into(),
                    cidr: pool,
                    encapsulation: EncapsulationSpec::VxlanCrossSubnet,
                    nat_outgoing: true,
                    disabled: false,
                    block_size: 26,
                }],
                autodetection: "kubernetes-internal-ip".into(),
                ..CalicoSpec::default()
            },
            service_cidr: net(10, 43, 0, 0, 16),
            cluster_cidr: Some(pool),
            node_cidr: if n > 60_000 {
                net(172, 16, 0, 0, 12)
            } else {
                net(172, 20, 0, 0, 16)
            },
            connectivity_checker: true,
            cilium_agent: Requests {
                cpu: Cpu(100),
                memory: Memory::mib(128),
            },
        }
    }

    /// A random cluster for property tests, drawn from `rng` within `spec`. With the default
    /// spec it is migratable: every budget allows a disruption when its pods are healthy, at
    /// least two nodes (or the only one) are Ready and schedulable, and the nodes have room for
    /// every pod twice over on all but one of them.
    pub fn random<R: Rng + ?Sized>(rng: &mut R, spec: &RandomSpec) -> Scenario {
        let n = rng.random_range(1..=spec.max_nodes.clamp(1, 2_000));
        let zones = rng.random_range(1..=3usize);
        let cp = if n >= 4 && rng.random_bool(0.5) {
            if n >= 6 { 3 } else { 1 }
        } else {
            0
        };
        let mut nodes: Vec<NodeSpec> = (0..n)
            .map(|i| {
                let mut s = NodeSpec::worker(&format!("node-{i}"), Some(ZONES[i % zones]));
                if i < cp {
                    s.roles = vec![NodeRole::ControlPlane, NodeRole::Etcd];
                }
                // The first two nodes stay Ready and schedulable.
                if i >= 2 {
                    s.cordoned = rng.random_bool(spec.pre_cordoned.clamp(0.0, 1.0));
                    s.ready = !rng.random_bool(spec.not_ready.clamp(0.0, 1.0));
                }
                s
            })
            .collect();
        let usable = nodes.iter().filter(|s| s.ready && !s.cordoned).count();
        let namespaces = ["ns-a", "ns-b", "ns-c"];
        let mut workloads = Vec::new();
        let mut pdbs = Vec::new();
        let count = rng.random_range(0..=spec.max_workloads);
        let mut pods_cpu = 0u64;
        let mut pods_mem = 0u64;
        let mut per_node_cpu = 0u64;
        let mut per_node_mem = 0u64;
        for k in 0..count {
            let ns = namespaces[rng.random_range(0..namespaces.len())];
            let roll = rng.random_range(0..100u32);
            let cpu = rng.random_range(1..=20u64) * 10;
            let mem = rng.random_range(1..=4u64) * 64;
            let kind = match roll {
                0..50 => WorkloadKind::Deployment,
                50..72 => WorkloadKind::StatefulSet,
                72..90 => WorkloadKind::DaemonSet,
                90..95 if spec.bare_pods => WorkloadKind::Pod,
                _ => WorkloadKind::Deployment,
            };
            let mut w =
                WorkloadSpec::new(kind, ns, &format!("w{k}")).requests(Cpu(cpu), Memory::mib(mem));
            w.empty_dir = rng.random_bool(0.2);
            w.tolerates_unschedulable = spec.tolerating_pods && rng.random_bool(0.2);
            match kind {
                WorkloadKind::DaemonSet => {
                    w.host_network = rng.random_bool(0.5);
                    per_node_cpu = per_node_cpu.saturating_add(cpu);
                    per_node_mem = per_node_mem.saturating_add(mem);
                }
                _ => {
                    let r = rng.random_range(0..=spec.max_replicas.max(1));
                    w.replicas = Some(r);
                    if kind == WorkloadKind::Deployment {
                        w.host_network = rng.random_bool(0.1);
                        w.host_port = spec.host_port && !w.host_network && rng.random_bool(0.15);
                    }
                    pods_cpu = pods_cpu.saturating_add(cpu * u64::from(r));
                    pods_mem = pods_mem.saturating_add(mem * u64::from(r));
                    if kind != WorkloadKind::Pod
                        && (usable >= 2 || spec.unsatisfiable_pdbs)
                        && rng.random_bool(0.6)
                    {
                        w.pdb = Some(random_budget(rng, r, spec.unsatisfiable_pdbs));
                    }
                    if spec.multiple_pdbs && w.pdb.is_some() && rng.random_bool(0.3) {
                        let mut sel = BTreeMap::new();
                        sel.insert("app".to_string(), w.name.clone());
                        pdbs.push(PdbDecl {
                            name: format!("{}-extra", w.name),
                            namespace: ns.to_string(),
                            selector: sel,
                            min_available: None,
                            max_unavailable: Some(crate::scenario::Amount(
                                cnimig_core::model::IntOrPercent::Int(1),
                            )),
                        });
                    }
                }
            }
            workloads.push(w);
        }
        if spec.static_pods && rng.random_bool(0.7) {
            let mut s = static_pod("kube-apiserver");
            if cp == 0 {
                s.nodes = vec![nodes.first().map(|n| n.name.clone()).unwrap_or_default()];
            }
            workloads.push(s);
            if spec.pod_network_static_pods && rng.random_bool(0.5) {
                let mut s = static_pod("pod-net-static");
                s.host_network = false;
                s.nodes = vec![nodes.first().map(|n| n.name.clone()).unwrap_or_default()];
                workloads.push(s);
            }
        }
        // Room for every pod twice over on all usable nodes but one, plus the DaemonSets and
        // the Cilium agent on each.
        let spread = (usable.max(2) - 1) as u64;
        let cpu = pods_cpu
            .saturating_mul(2)
            .div_ceil(spread)
            .saturating_add(per_node_cpu)
            .saturating_add(1100);
        let mem_mib = pods_mem
            .saturating_mul(2)
            .div_ceil(spread)
            .saturating_add(per_node_mem)
            .saturating_add(1152);
        for s in &mut nodes {
            s.cpu = Cpu(cpu.div_ceil(1000).saturating_mul(1000));
            s.memory = Memory::mib(mem_mib.div_ceil(1024).saturating_mul(1024));
        }
        Scenario {
            name: "random".into(),
            nodes,
            workloads,
            pdbs,
            calico: CalicoSpec {
                autodetection: "kubernetes-internal-ip".into(),
                ..CalicoSpec::default()
            },
            service_cidr: net(10, 43, 0, 0, 16),
            cluster_cidr: Some(net(10, 42, 0, 0, 16)),
            node_cidr: net(172, 20, 0, 0, 16),
            connectivity_checker: true,
            cilium_agent: Requests {
                cpu: Cpu(100),
                memory: Memory::mib(128),
            },
        }
    }
}

/// A budget for `r` replicas that allows at least one disruption when all are healthy (unless
/// `unsatisfiable` and the dice say otherwise).
fn random_budget<R: Rng + ?Sized>(rng: &mut R, r: u32, unsatisfiable: bool) -> PdbSpec {
    if unsatisfiable && rng.random_bool(0.3) {
        return if rng.random_bool(0.5) {
            PdbSpec::min_available(r.max(1))
        } else {
            PdbSpec::max_unavailable(0)
        };
    }
    match rng.random_range(0..4u32) {
        0 => PdbSpec::max_unavailable(rng.random_range(1..=(r / 2).max(1))),
        1 => PdbSpec::percent(false, rng.random_range(1..=100u32)),
        2 if r >= 2 => PdbSpec::min_available(rng.random_range(0..r)),
        3 if r >= 2 => {
            // ceil(r * p / 100) <= r - 1  <=>  p <= 100 * (r - 1) / r
            let max = u32::try_from(100 * (u64::from(r) - 1) / u64::from(r)).unwrap_or(99);
            PdbSpec::percent(true, rng.random_range(0..=max))
        }
        _ => PdbSpec::max_unavailable(1),
    }
}

/// What [`Scenario::random`] may generate.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomSpec {
    /// At most this many nodes (at least 1; capped at 2,000).
    pub max_nodes: usize,
    /// At most this many workloads.
    pub max_workloads: usize,
    /// At most this many replicas per Deployment / StatefulSet.
    pub max_replicas: u32,
    /// Probability that a node (beyond the first two) is cordoned before the run.
    pub pre_cordoned: f64,
    /// Probability that a node (beyond the first two) is NotReady.
    pub not_ready: f64,
    /// Generate hostPort Deployments.
    pub host_port: bool,
    /// Generate static (hostNetwork) pods.
    pub static_pods: bool,
    /// Also generate static pods on the pod network (a preflight failure).
    pub pod_network_static_pods: bool,
    /// Also generate budgets that never allow a disruption.
    pub unsatisfiable_pdbs: bool,
    /// Also generate pods covered by two budgets (evictions fail with 500).
    pub multiple_pdbs: bool,
    /// Also generate bare pods (drain needs `evictUnmanagedPods`).
    pub bare_pods: bool,
    /// Also generate pods that tolerate `unschedulable` (they can land back on cordoned nodes).
    pub tolerating_pods: bool,
}

impl RandomSpec {
    /// Migratable clusters of up to `max_nodes` nodes: pre-cordoned nodes (10%) and NotReady
    /// nodes (5%) included, every trap flag off.
    #[must_use]
    pub fn new(max_nodes: usize) -> RandomSpec {
        RandomSpec {
            max_nodes,
            max_workloads: 12,
            max_replicas: 8,
            pre_cordoned: 0.1,
            not_ready: 0.05,
            host_port: true,
            static_pods: true,
            pod_network_static_pods: false,
            unsatisfiable_pdbs: false,
            multiple_pdbs: false,
            bare_pods: false,
            tolerating_pods: false,
        }
    }
}

impl Default for RandomSpec {
    fn default() -> Self {
        RandomSpec::new(8)
    }
}
