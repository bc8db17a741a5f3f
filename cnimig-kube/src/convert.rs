//! Kubernetes objects to `cnimig-core` model values. Pure: no IO.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use cnimig_core::model::{
    Budget, IntOrPercent, LabelSelector, Node, NodeName, NodeRole, OwnerKind, Pdb, Pod, PodNetwork,
    PodPhase, PodRef, Resources, SelectorOp, SelectorRequirement, Taint, Time,
};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The annotation that marks a mirror pod (the API's copy of a static pod).
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// The taint key a cordoned node carries; pods tolerating it can land on cordoned nodes.
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";
/// The zone label.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Roles from the role labels of every distribution (`node-role.kubernetes.io/<role>`): RKE1
/// `controlplane|etcd|worker`, RKE2 and kubeadm `control-plane|master|etcd`. A node with no role
/// label is a worker.
#[must_use]
pub fn roles(labels: &BTreeMap<String, String>) -> Vec<NodeRole> {
    let mut out = Vec::new();
    for key in labels.keys() {
        let Some(role) = key.strip_prefix("node-role.kubernetes.io/") else {
            continue;
        };
        let r = match role {
            "control-plane" | "controlplane" | "master" => NodeRole::ControlPlane,
            "etcd" => NodeRole::Etcd,
            "worker" => NodeRole::Worker,
            _ => continue,
        };
        if !out.contains(&r) {
            out.push(r);
        }
    }
    if out.is_empty() {
        out.push(NodeRole::Worker);
    }
    out.sort();
    out
}

/// Parses a CPU quantity (`"250m"`, `"2"`, `"0.5"`) into millicores; `None` when unparsable.
#[must_use]
pub fn cpu_millis(q: &str) -> Option<u64> {
    let q = q.trim();
    if let Some(m) = q.strip_suffix('m') {
        return m.parse::<u64>().ok();
    }
    let v: f64 = q.parse().ok()?;
    (v >= 0.0).then(|| (v * 1000.0).ceil() as u64)
}

/// Parses a memory quantity (`"128Mi"`, `"1G"`, `"1e3"`, `"512"`) into bytes; `None` when
/// unparsable.
#[must_use]
pub fn memory_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    const SUFFIXES: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
        ("m", 1e-3),
    ];
    for (suffix, mult) in SUFFIXES {
        if let Some(num) = q.strip_suffix(suffix) {
            let v: f64 = num.parse().ok()?;
            return (v >= 0.0).then(|| (v * mult).ceil() as u64);
        }
    }
    let v: f64 = q.parse().ok()?;
    (v >= 0.0).then(|| v.ceil() as u64)
}

fn resources(map: Option<&BTreeMap<String, Quantity>>) -> Resources {
    let Some(map) = map else {
        return Resources::default();
    };
    Resources {
        cpu_millis: map.get("cpu").and_then(|q| cpu_millis(&q.0)).unwrap_or(0),
        memory_bytes: map
            .get("memory")
            .and_then(|q| memory_bytes(&q.0))
            .unwrap_or(0),
    }
}

/// A Node as the migration sees it. `requested` is left zero: the caller sums its pods'
/// requests. `None` when the name is not a valid node name.
#[must_use]
pub fn node(n: &core::Node) -> Option<Node> {
    let name = NodeName::new(n.metadata.name.clone()?).ok()?;
    let labels = n.metadata.labels.clone().unwrap_or_default();
    let spec = n.spec.clone().unwrap_or_default();
    let status = n.status.clone().unwrap_or_default();
    let ready = status
        .conditions
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let internal_ips = status
        .addresses
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse::<Ipv4Addr>().ok())
        .collect();
    Some(Node {
        name,
        roles: roles(&labels),
        zone: labels.get(ZONE_LABEL).cloned(),
        taints: spec
            .taints
            .unwrap_or_default()
            .into_iter()
            .map(|t| Taint {
                key: t.key,
                value: t.value.unwrap_or_default(),
                effect: t.effect,
            })
            .collect(),
        labels,
        unschedulable: spec.unschedulable.unwrap_or(false),
        ready,
        internal_ips,
        allocatable: resources(status.allocatable.as_ref()),
        requested: Resources::default(),
    })
}

/// The network of a pod with `ip` (and `hostNetwork` as given), judged against Cilium's
/// cluster-pool CIDRs.
#[must_use]
pub fn pod_network(host_network: bool, ip: Option<Ipv4Addr>, cilium: &[Ipv4Net]) -> PodNetwork {
    match ip {
        _ if host_network => PodNetwork::Host,
        Some(ip) if cilium.iter().any(|c| c.contains(&ip)) => PodNetwork::Cilium,
        Some(_) => PodNetwork::Calico,
        None => PodNetwork::None,
    }
}

/// Parses the `cluster-pool-ipv4-cidr` value of `cilium-config` (space- or comma-separated).
#[must_use]
pub fn cilium_cidrs(value: &str) -> Vec<Ipv4Net> {
    value
        .split([' ', ','])
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// The kind of the pod's controlling owner reference. cnimig's own helper pods (label
/// [`RESTORE_HELPER_LABEL`](crate::RESTORE_HELPER_LABEL): the per-node probe, the CNI restore
/// and clean-up helpers) have none but are managed by cnimig, which deletes them itself: they are
/// `Other("cnimig")`, so that one left by a killed run is not taken for an unmanaged workload
/// (preflight refuses those) when the run resumes.
#[must_use]
pub fn owner_kind(meta: &meta::ObjectMeta) -> OwnerKind {
    let Some(owner) = meta
        .owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|o| o.controller == Some(true))
    else {
        let ours = meta
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(crate::RESTORE_HELPER_LABEL));
        return if ours {
            OwnerKind::Other("cnimig".to_string())
        } else {
            OwnerKind::None
        };
    };
    match owner.kind.as_str() {
        "ReplicaSet" => OwnerKind::ReplicaSet,
        "StatefulSet" => OwnerKind::StatefulSet,
        "DaemonSet" => OwnerKind::DaemonSet,
        "Job" => OwnerKind::Job,
        other => OwnerKind::Other(other.to_string()),
    }
}

fn tolerates_unschedulable(t: &core::Toleration) -> bool {
    let op_exists = t.operator.as_deref() == Some("Exists");
    let effect_ok = t
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == "NoSchedule");
    match t.key.as_deref() {
        None | Some("") => op_exists && effect_ok,
        Some(k) => k == UNSCHEDULABLE_TAINT && effect_ok,
    }
}

/// A Pod as the migration sees it; `cilium` are Cilium's cluster-pool CIDRs. Requests are the
/// sum over the app containers (init containers are ignored). `None` without name, namespace or
/// UID.
#[must_use]
pub fn pod(p: &core::Pod, cilium: &[Ipv4Net]) -> Option<Pod> {
    let md = &p.metadata;
    let pod_ref = PodRef {
        namespace: md.namespace.clone()?,
        name: md.name.clone()?,
        uid: md.uid.clone()?,
    };
    let spec = p.spec.clone().unwrap_or_default();
    let status = p.status.clone().unwrap_or_default();
    let host_network = spec.host_network.unwrap_or(false);
    let ip = status.pod_ip.as_deref().and_then(|s| s.parse().ok());
    let phase = match status.phase.as_deref() {
        Some("Running") => PodPhase::Running,
        Some("Succeeded") => PodPhase::Succeeded,
        Some("Failed") => PodPhase::Failed,
        _ => PodPhase::Pending,
    };
    let ready = status
        .conditions
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let all_containers = || {
        spec.containers
            .iter()
            .chain(spec.init_containers.as_deref().unwrap_or_default())
    };
    let host_port = all_containers().any(|c| {
        c.ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|p| p.host_port.is_some_and(|h| h > 0))
    });
    let requests = spec.containers.iter().fold(Resources::default(), |acc, c| {
        acc.plus(resources(
            c.resources.as_ref().and_then(|r| r.requests.as_ref()),
        ))
    });
    Some(Pod {
        pod: pod_ref,
        labels: std::sync::Arc::new(md.labels.clone().unwrap_or_default()),
        owner: owner_kind(md),
        node: spec
            .node_name
            .as_deref()
            .and_then(|n| NodeName::new(n).ok()),
        ip,
        network: pod_network(host_network, ip, cilium),
        phase,
        ready,
        terminating: md.deletion_timestamp.is_some(),
        host_network,
        host_port,
        empty_dir: spec
            .volumes
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|v| v.empty_dir.is_some()),
        mirror: md
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION)),
        tolerates_unschedulable: spec
            .tolerations
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(tolerates_unschedulable),
        requests,
        created: md
            .creation_timestamp
            .as_ref()
            .and_then(|t| u64::try_from(t.0.as_millisecond()).ok())
            .map(Time),
    })
}

/// A label selector in the model's terms; `None` for an operator the model does not know.
#[must_use]
pub fn selector(s: &meta::LabelSelector) -> Option<LabelSelector> {
    let mut out = LabelSelector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: Vec::new(),
    };
    for r in s.match_expressions.as_deref().unwrap_or_default() {
        let operator = match r.operator.as_str() {
            "In" => SelectorOp::In,
            "NotIn" => SelectorOp::NotIn,
            "Exists" => SelectorOp::Exists,
            "DoesNotExist" => SelectorOp::DoesNotExist,
            _ => return None,
        };
        out.match_expressions.push(SelectorRequirement {
            key: r.key.clone(),
            operator,
            values: r.values.clone().unwrap_or_default(),
        });
    }
    Some(out)
}

fn int_or_percent(v: &IntOrString) -> Option<IntOrPercent> {
    match v {
        IntOrString::Int(n) => u32::try_from(*n).ok().map(IntOrPercent::Int),
        IntOrString::String(s) => match s.strip_suffix('%') {
            Some(p) => p.trim().parse().ok().map(IntOrPercent::Percent),
            None => s.trim().parse().ok().map(IntOrPercent::Int),
        },
    }
}

/// A PodDisruptionBudget in the model's terms. `None` without a selector (a `policy/v1` budget
/// with a null selector selects no pod) or with an unparsable one. A budget with neither
/// `minAvailable` nor `maxUnavailable` is `minAvailable: 0` (never blocks).
#[must_use]
pub fn pdb(p: &PodDisruptionBudget) -> Option<Pdb> {
    let spec = p.spec.as_ref()?;
    let selector = selector(spec.selector.as_ref()?)?;
    let budget = if let Some(v) = &spec.min_available {
        Budget::MinAvailable(int_or_percent(v)?)
    } else if let Some(v) = &spec.max_unavailable {
        Budget::MaxUnavailable(int_or_percent(v)?)
    } else {
        Budget::MinAvailable(IntOrPercent::Int(0))
    };
    Some(Pdb {
        namespace: p.metadata.namespace.clone()?,
        name: p.metadata.name.clone()?,
        selector,
        budget,
        expected_pods: p
            .status
            .as_ref()
            .and_then(|s| u32::try_from(s.expected_pods).ok())
            .unwrap_or(0),
    })
}

/// `disruptionsAllowed` from a budget's status (0 when not yet observed).
#[must_use]
pub fn disruptions_allowed(p: &PodDisruptionBudget) -> u32 {
    p.status
        .as_ref()
        .and_then(|s| u32::try_from(s.disruptions_allowed).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cidr() -> Vec<Ipv4Net> {
        cilium_cidrs("10.245.0.0/16")
    }

    #[test]
    fn quantities() {
        assert_eq!(cpu_millis("250m"), Some(250));
        assert_eq!(cpu_millis("2"), Some(2000));
        assert_eq!(cpu_millis("0.5"), Some(500));
        assert_eq!(memory_bytes("128Mi"), Some(128 * 1024 * 1024));
        assert_eq!(memory_bytes("1G"), Some(1_000_000_000));
        assert_eq!(memory_bytes("512"), Some(512));
        assert_eq!(memory_bytes("x"), None);
    }

    #[test]
    fn roles_from_every_distribution() {
        let l = |k: &str| BTreeMap::from([(k.to_string(), "true".to_string())]);
        assert_eq!(
            roles(&l("node-role.kubernetes.io/controlplane")),
            vec![NodeRole::ControlPlane]
        );
        assert_eq!(
            roles(&l("node-role.kubernetes.io/master")),
            vec![NodeRole::ControlPlane]
        );
        assert_eq!(
            roles(&l("node-role.kubernetes.io/etcd")),
            vec![NodeRole::Etcd]
        );
        assert_eq!(roles(&BTreeMap::new()), vec![NodeRole::Worker]);
    }

    #[test]
    fn node_fields() {
        let n: core::Node = serde_json::from_value(json!({
            "metadata": {"name": "w1", "labels": {"topology.kubernetes.io/zone": "z1",
                "node-role.kubernetes.io/worker": "true"}},
            "spec": {"unschedulable": true, "taints": [{"key": "a", "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                "addresses": [{"type": "InternalIP", "address": "192.0.2.1"},
                              {"type": "Hostname", "address": "w1"}],
                "allocatable": {"cpu": "4", "memory": "8Gi"}}
        }))
        .unwrap();
        let n = node(&n).unwrap();
        assert_eq!(n.zone.as_deref(), Some("z1"));
        assert!(n.unschedulable && n.ready);
        assert_eq!(n.internal_ips, vec![Ipv4Addr::new(192, 0, 2, 1)]);
        assert_eq!(n.allocatable.cpu_millis, 4000);
        assert_eq!(n.taints[0].key, "a");
    }

    #[test]
    fn pod_fields_and_network() {
        let p: core::Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1",
                "annotations": {"kubernetes.io/config.mirror": "x"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "d",
                    "uid": "o", "controller": true}]},
            "spec": {"nodeName": "w1", "containers": [{"name": "c",
                    "ports": [{"containerPort": 80, "hostPort": 8080}],
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}],
                "volumes": [{"name": "v", "emptyDir": {}}],
                "tolerations": [{"key": "node.kubernetes.io/unschedulable", "operator": "Exists",
                    "effect": "NoSchedule"}]},
            "status": {"phase": "Running", "podIP": "10.245.1.2",
                "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let p = pod(&p, &cidr()).unwrap();
        assert_eq!(p.owner, OwnerKind::DaemonSet);
        assert_eq!(p.network, PodNetwork::Cilium);
        assert!(p.mirror && p.host_port && p.empty_dir && p.tolerates_unschedulable && p.ready);
        assert_eq!(p.requests.cpu_millis, 100);
        assert_eq!(p.node.as_ref().map(NodeName::as_str), Some("w1"));
        let calico = Some(Ipv4Addr::new(10, 42, 0, 5));
        assert_eq!(pod_network(false, calico, &cidr()), PodNetwork::Calico);
        assert_eq!(pod_network(true, calico, &cidr()), PodNetwork::Host);
        assert_eq!(pod_network(false, None, &cidr()), PodNetwork::None);
    }

    #[test]
    fn owner_of_bare_pods_and_of_cnimigs_helpers() {
        let meta =
            |v: serde_json::Value| -> meta::ObjectMeta { serde_json::from_value(v).unwrap() };
        assert_eq!(owner_kind(&meta(json!({"name": "bare"}))), OwnerKind::None);
        assert_eq!(
            owner_kind(&meta(json!({"name": "bare", "labels": {"app": "x"}}))),
            OwnerKind::None
        );
        // A probe pod a killed run left behind: cnimig's, not an unmanaged workload.
        assert_eq!(
            owner_kind(&meta(json!({"name": "cnimig-probe-w1",
                                    "labels": {crate::RESTORE_HELPER_LABEL: crate::probe::PROBE_LABEL_VALUE}}))),
            OwnerKind::Other("cnimig".into())
        );
        // A controller reference wins.
        assert_eq!(
            owner_kind(&meta(
                json!({"name": "p", "labels": {crate::RESTORE_HELPER_LABEL: "x"},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "j",
                    "uid": "o", "controller": true}]})
            )),
            OwnerKind::Job
        );
    }

    #[test]
    fn pdb_fields() {
        let p: PodDisruptionBudget = serde_json::from_value(json!({
            "metadata": {"name": "b", "namespace": "ns"},
            "spec": {"maxUnavailable": "25%", "selector": {"matchLabels": {"app": "a"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["x"]}]}},
            "status": {"disruptionsAllowed": 2, "expectedPods": 8, "currentHealthy": 8,
                "desiredHealthy": 6}
        }))
        .unwrap();
        assert_eq!(disruptions_allowed(&p), 2);
        let b = pdb(&p).unwrap();
        assert_eq!(b.budget, Budget::MaxUnavailable(IntOrPercent::Percent(25)));
        assert_eq!(b.expected_pods, 8);
        assert_eq!(b.selector.match_expressions[0].operator, SelectorOp::In);
    }
}
