//! Workload rules: disruption budgets, hostPort, static, unmanaged and emptyDir pods.

use std::collections::{BTreeMap, BTreeSet};

use super::{Check, Ctx, bounded, count, verb};
use crate::model::{Budget, IntOrPercent, OwnerKind, Pdb, Pod, PodPhase};

pub(super) const PDB_MULTIPLE: &str = "pdb-multiple";
pub(super) const PDB_BLOCKING: &str = "pdb-blocking";
pub(super) const HOST_PORT: &str = "host-port";
pub(super) const STATIC_PODS: &str = "static-pods";
pub(super) const UNMANAGED_PODS: &str = "unmanaged-pods";
pub(super) const EMPTYDIR_PODS: &str = "emptydir-pods";

/// `ns/name (on node)`.
fn pod_on_node(p: &Pod) -> String {
    match &p.node {
        Some(n) => format!("{} (on {n})", p.pod),
        None => p.pod.to_string(),
    }
}

/// `1 node has` / `3 nodes have`.
fn count_nodes_with(n: usize) -> String {
    format!("{} {}", count(n, "node"), verb(n, "has", "have"))
}

/// `minAvailable: 2` / `maxUnavailable: 10%`.
fn budget_text(b: Budget) -> String {
    let v = |v: IntOrPercent| match v {
        IntOrPercent::Int(n) => n.to_string(),
        IntOrPercent::Percent(p) => format!("{p}%"),
    };
    match b {
        Budget::MinAvailable(x) => format!("minAvailable: {}", v(x)),
        Budget::MaxUnavailable(x) => format!("maxUnavailable: {}", v(x)),
    }
}

/// Rule `pdb-multiple`: the API server answers 500 to the eviction of a pod covered by more than
/// one budget, forever.
pub(super) fn pdb_multiple(ctx: &Ctx<'_>) -> Vec<Check> {
    // Budget set -> the pods it covers together.
    let mut groups: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
    for pod in ctx.drainable_in_scope() {
        let keys: Vec<String> = ctx.pdbs_covering(pod).into_iter().map(Pdb::key).collect();
        if keys.len() > 1 {
            groups.entry(keys).or_default().push(pod_on_node(pod));
        }
    }
    if groups.is_empty() {
        return vec![Check::pass(
            PDB_MULTIPLE,
            format!(
                "No pod on the {} in scope is covered by more than one PodDisruptionBudget.",
                count(ctx.scope.len(), "node")
            ),
        )];
    }
    groups
        .into_iter()
        .map(|(budgets, pods)| {
            Check::fail(
                PDB_MULTIPLE,
                format!(
                    "{} covered by more than one PodDisruptionBudget ({}): {}. The API server refuses to evict such a \
                     pod (HTTP 500 \"more than one PodDisruptionBudget\") however often it is retried, so the drain of \
                     its node could never finish. Fix: delete one of the budgets or narrow its selector so each pod \
                     matches exactly one.",
                    if pods.len() == 1 { "1 pod is".to_string() } else { format!("{} pods are", pods.len()) },
                    bounded(&budgets),
                    bounded(&pods)
                ),
            )
        })
        .collect()
}

/// True when the disruption controller counts the pod as healthy.
fn healthy(p: &Pod) -> bool {
    p.phase == PodPhase::Running && p.ready && !p.terminating
}

/// Rule `pdb-blocking`: a budget that allows no eviction even with every pod healthy blocks a
/// drain forever (fail); one at zero right now because pods are unhealthy makes it wait (warn).
pub(super) fn pdb_blocking(ctx: &Ctx<'_>) -> Vec<Check> {
    let mut out = Vec::new();
    let mut checked = 0usize;
    for pdb in &ctx.snap.pdbs {
        let covered: Vec<&Pod> = ctx.pods_covered_by(pdb).collect();
        let on_scope: Vec<&Pod> = covered
            .iter()
            .copied()
            .filter(|p| ctx.is_drainable_in_scope(p))
            .collect();
        if on_scope.is_empty() {
            continue;
        }
        checked = checked.saturating_add(1);
        let nodes: BTreeSet<String> = on_scope
            .iter()
            .filter_map(|p| p.node.as_ref().map(ToString::to_string))
            .collect();
        let pods: Vec<String> = on_scope.iter().map(|p| p.pod.to_string()).collect();
        let desired = pdb.desired_healthy();
        let expected = pdb.expected_pods;
        let what = format!(
            "PodDisruptionBudget {} ({}, {expected} expected pods)",
            pdb.key(),
            budget_text(pdb.budget)
        );
        // For an integer `minAvailable` the disruption controller's `expectedPods` is the number
        // of matching pods that exist now, not the controllers' scale: while a pod is being
        // replaced (evicted or deleted by an interrupted run of ours, or a StatefulSet rollout)
        // it is one lower, and the budget looks as if it could never allow an eviction.
        let counts_existing_pods = matches!(pdb.budget, Budget::MinAvailable(IntOrPercent::Int(_)));
        if expected.saturating_sub(desired) == 0
            && expected > 0
            && counts_existing_pods
            && !ctx.snap.records.is_empty()
        {
            out.push(Check::warn(
                PDB_BLOCKING,
                format!(
                    "{what} allows no eviction with the pods that exist now. A migration is under way \
                     ({} a record): for an integer minAvailable the disruption controller counts only the \
                     pods that exist, so a pod that run evicted or restarted and that is still being \
                     replaced lowers the count. Once the replacement exists, drains go on; if it does not \
                     come back, the drain of node(s) {} (running its pods {}) fails after the drain timeout \
                     ({}s) and the node rolls back. If the budget really requires every pod, let it allow one \
                     disruption (e.g. maxUnavailable: 1).",
                    count_nodes_with(ctx.snap.records.len()),
                    bounded(&nodes),
                    bounded(&pods),
                    ctx.cfg.drain_timeout.as_secs()
                ),
            ));
            continue;
        }
        if expected.saturating_sub(desired) == 0 {
            let why = if expected == 0 {
                "expects no pods (the disruption controller found no controller scale for them)"
                    .to_string()
            } else if counts_existing_pods {
                format!(
                    "requires {desired} healthy pods (for an integer minAvailable the disruption controller \
                     counts the pods that exist now: if one of them is being replaced, e.g. by a rollout, run \
                     again once it is back)"
                )
            } else {
                format!("requires {desired} healthy pods")
            };
            out.push(Check::fail(
                PDB_BLOCKING,
                format!(
                    "{what} {why}, so it allows no eviction even when every pod is healthy: \
                     the drain of node(s) {} (running its pods {}) could never finish. Fix: let it allow at least one \
                     disruption (e.g. maxUnavailable: 1, or more replicas than minAvailable), or take those nodes out \
                     of the scope.",
                    bounded(&nodes),
                    bounded(&pods)
                ),
            ));
            continue;
        }
        let healthy_now =
            u32::try_from(covered.iter().filter(|p| healthy(p)).count()).unwrap_or(u32::MAX);
        if pdb.disruptions_allowed(healthy_now) == 0 {
            out.push(Check::warn(
                PDB_BLOCKING,
                format!(
                    "{what} allows no disruption right now: {healthy_now} of its pods are healthy and it must keep \
                     {desired} healthy, so none may be evicted. Drains of node(s) {} (running its pods {}) will wait until the pods recover \
                     and fail after the drain timeout ({}s). Fix the unhealthy pods first.",
                    bounded(&nodes),
                    bounded(&pods),
                    ctx.cfg.drain_timeout.as_secs()
                ),
            ));
        }
    }
    if out.is_empty() {
        out.push(Check::pass(
            PDB_BLOCKING,
            format!(
                "Every PodDisruptionBudget covering pods on nodes in scope allows at least one eviction now ({} checked).",
                count(checked, "budget")
            ),
        ));
    }
    out
}

/// Rule `host-port`: hostPort pods on the pod network need Cilium's portmap chaining.
pub(super) fn host_port(ctx: &Ctx<'_>) -> Vec<Check> {
    let pods: Vec<String> = ctx
        .snap
        .pods
        .iter()
        .filter(|p| p.host_port && p.uses_pod_network())
        .map(pod_on_node)
        .collect();
    if pods.is_empty() {
        return vec![Check::pass(
            HOST_PORT,
            "No pod on the pod network uses hostPort: the CiliumNodeConfig keeps cni-chaining-mode: none.",
        )];
    }
    vec![Check::warn(
        HOST_PORT,
        format!(
            "{} on the pod network {} hostPort: {}. On migrated nodes they need Cilium's portmap chaining, so cnimig \
             sets cni-chaining-mode: portmap in the CiliumNodeConfig and hostPort.enabled=true in the Helm values \
             (automatically; check these pods answer on their host ports after their nodes migrate).",
            count(pods.len(), "pod"),
            verb(pods.len(), "uses", "use"),
            bounded(&pods)
        ),
    )]
}

/// Rule `static-pods`: the API cannot restart a static pod, so one on the pod network would
/// keep its Calico address.
pub(super) fn static_pods(ctx: &Ctx<'_>) -> Vec<Check> {
    let pods: Vec<String> = ctx
        .snap
        .pods
        .iter()
        .filter(|p| p.mirror && p.uses_pod_network() && ctx.pod_in_scope(p))
        .map(pod_on_node)
        .collect();
    if pods.is_empty() {
        return vec![Check::pass(
            STATIC_PODS,
            "No static pod on a node in scope uses the pod network (static pods on hostNetwork are unaffected).",
        )];
    }
    vec![Check::fail(
        STATIC_PODS,
        format!(
            "{} on nodes in scope {} the pod network: {}. Deleting a mirror pod does not restart a static pod, so \
             it would keep its Calico address after its node moves to Cilium and lose connectivity when Calico is \
             removed. Fix: make it hostNetwork, move its manifest out of the kubelet's static pod directory (and run \
             it another way), or take the node out of the scope.",
            count(pods.len(), "static pod"),
            verb(pods.len(), "uses", "use"),
            bounded(&pods)
        ),
    )]
}

/// Rule `unmanaged-pods`: evicting a pod with no controller deletes it for good.
pub(super) fn unmanaged_pods(ctx: &Ctx<'_>) -> Vec<Check> {
    let pods: Vec<String> = ctx
        .drainable_in_scope()
        .filter(|p| p.owner == OwnerKind::None)
        .map(pod_on_node)
        .collect();
    if pods.is_empty() {
        return vec![Check::pass(
            UNMANAGED_PODS,
            "Every pod to be drained from the nodes in scope has a controller.",
        )];
    }
    let what = format!(
        "{} with no controller on nodes in scope: {}",
        count(pods.len(), "pod"),
        bounded(&pods)
    );
    if ctx.cfg.evict_unmanaged_pods {
        vec![Check::warn(
            UNMANAGED_PODS,
            format!(
                "{what}. With evictUnmanagedPods: true the drain deletes them and nothing recreates them; recreate \
                 them yourself if they are needed."
            ),
        )]
    } else {
        vec![Check::fail(
            UNMANAGED_PODS,
            format!(
                "{what}. Evicting them would delete them for good, so their nodes cannot drain. Fix: run them under a \
                 controller (Deployment, StatefulSet, Job), or set evictUnmanagedPods: true to accept that they are \
                 deleted."
            ),
        )]
    }
}

/// Rule `emptydir-pods`: evicting a pod loses its emptyDir data.
pub(super) fn emptydir_pods(ctx: &Ctx<'_>) -> Vec<Check> {
    let pods: Vec<String> = ctx
        .drainable_in_scope()
        .filter(|p| p.empty_dir)
        .map(pod_on_node)
        .collect();
    if pods.is_empty() {
        return vec![Check::pass(
            EMPTYDIR_PODS,
            "No pod to be drained from the nodes in scope mounts an emptyDir volume.",
        )];
    }
    let what = format!(
        "{} with emptyDir volumes on nodes in scope: {}",
        count(pods.len(), "pod"),
        bounded(&pods)
    );
    if ctx.cfg.delete_emptydir_data {
        vec![Check::warn(
            EMPTYDIR_PODS,
            format!(
                "{what}. Their emptyDir data is lost when they are evicted (deleteEmptydirData: true)."
            ),
        )]
    } else {
        vec![Check::fail(
            EMPTYDIR_PODS,
            format!(
                "{what}. With deleteEmptydirData: false the drain refuses to evict them, so their nodes cannot drain. \
                 Fix: set deleteEmptydirData: true if the data is disposable (caches, scratch space), or move it to a \
                 persistent volume."
            ),
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::super::Severity;
    use super::super::fixture::{Fixture, assert_pass, expect};
    use super::*;
    use crate::model::{LabelSelector, PodPhase};

    fn labels(app: &str) -> LabelSelector {
        LabelSelector {
            match_labels: [("app".to_string(), app.to_string())].into(),
            ..LabelSelector::default()
        }
    }

    // ---- pdb-multiple ----

    #[test]
    fn pod_under_two_budgets_fails_naming_pod_and_budgets() {
        let mut f = Fixture::healthy();
        f.snap.pdbs.push(Pdb {
            namespace: "shop".into(),
            name: "web-extra".into(),
            selector: labels("web"),
            budget: Budget::MinAvailable(IntOrPercent::Int(1)),
            expected_pods: 2,
        });
        let c = expect(&f.run(), PDB_MULTIPLE, Severity::Fail);
        assert_eq!(c.len(), 1);
        let m = &c[0].message;
        assert!(m.contains("shop/web-a") && m.contains("shop/web-b"), "{m}");
        assert!(
            m.contains("shop/web") && m.contains("shop/web-extra") && m.contains("500"),
            "{m}"
        );
    }

    #[test]
    fn budgets_in_other_namespaces_or_nodes_out_of_scope_pass() {
        let mut f = Fixture::healthy();
        assert_pass(&f.run(), PDB_MULTIPLE);
        // Same selector in another namespace: not covering.
        f.snap.pdbs.push(Pdb {
            namespace: "other".into(),
            ..f.snap.pdbs[0].clone()
        });
        assert_pass(&f.run(), PDB_MULTIPLE);
        // A second budget in the namespace, but its pods are only on a node out of scope.
        f.snap.pdbs.push(Pdb {
            name: "web-extra".into(),
            ..f.snap.pdbs[0].clone()
        });
        f.scope.retain(|n| n.as_str() == "cp-1");
        assert_pass(&f.run(), PDB_MULTIPLE);
    }

    // ---- pdb-blocking ----

    #[test]
    fn budget_allowing_no_disruption_fails_naming_budget_and_nodes() {
        for budget in [
            Budget::MinAvailable(IntOrPercent::Percent(100)),
            Budget::MaxUnavailable(IntOrPercent::Int(0)),
            Budget::MinAvailable(IntOrPercent::Int(2)),
        ] {
            let mut f = Fixture::healthy();
            f.snap.pdbs[0].budget = budget;
            let c = expect(&f.run(), PDB_BLOCKING, Severity::Fail);
            let m = &c[0].message;
            assert!(
                m.contains("shop/web") && m.contains("worker-1") && m.contains("worker-2"),
                "{m}"
            );
        }
        // A single replica with minAvailable 1.
        let mut f = Fixture::healthy();
        f.snap.pods.retain(|p| p.pod.name != "web-b");
        f.snap.pdbs[0].expected_pods = 1;
        f.snap.pdbs[0].budget = Budget::MinAvailable(IntOrPercent::Int(1));
        let c = expect(&f.run(), PDB_BLOCKING, Severity::Fail);
        assert!(
            c[0].message.contains("worker-1") && !c[0].message.contains("worker-2"),
            "{c:?}"
        );
    }

    #[test]
    fn integer_min_available_short_of_a_pod_during_an_interrupted_run_warns() {
        use crate::machine::{NodeRecord, Phase};
        use crate::model::Time;
        // minAvailable: 2 over the two pods that exist now. For an integer minAvailable the
        // disruption controller's expectedPods counts existing pods, so while a third replica
        // evicted by a killed run is being replaced, the budget looks like this.
        let mut f = Fixture::healthy();
        f.snap.pdbs[0].budget = Budget::MinAvailable(IntOrPercent::Int(2));
        let c = expect(&f.run(), PDB_BLOCKING, Severity::Fail);
        assert!(
            c[0].message.contains("counts the pods that exist now"),
            "{c:?}"
        );
        f.snap.records.insert(
            super::super::fixture::name("worker-1"),
            NodeRecord {
                phase: Phase::Drained,
                ..NodeRecord::new(Time(1))
            },
        );
        let c = expect(&f.run(), PDB_BLOCKING, Severity::Warn);
        let m = &c[0].message;
        assert!(
            m.contains("shop/web")
                && m.contains("migration is under way")
                && m.contains("1 node has a record"),
            "{m}"
        );
        assert!(f.run().ok(), "{:?}", f.run());
        // Budgets whose expectedPods is the controllers' scale (maxUnavailable, percentages)
        // are structural whatever the records say: still refused.
        for budget in [
            Budget::MinAvailable(IntOrPercent::Percent(100)),
            Budget::MaxUnavailable(IntOrPercent::Int(0)),
        ] {
            f.snap.pdbs[0].budget = budget;
            expect(&f.run(), PDB_BLOCKING, Severity::Fail);
        }
        // A budget expecting no pod at all is no replacement in progress.
        f.snap.pdbs[0].budget = Budget::MinAvailable(IntOrPercent::Int(0));
        f.snap.pdbs[0].expected_pods = 0;
        expect(&f.run(), PDB_BLOCKING, Severity::Fail);
    }

    #[test]
    fn budget_at_zero_because_pods_are_unhealthy_warns() {
        let mut f = Fixture::healthy();
        f.pod_mut("web-b").ready = false;
        let c = expect(&f.run(), PDB_BLOCKING, Severity::Warn);
        assert!(
            c[0].message.contains("shop/web") && c[0].message.contains("1 of its pods are healthy"),
            "{c:?}"
        );
        let mut f = Fixture::healthy();
        f.pod_mut("web-a").phase = PodPhase::Pending;
        expect(&f.run(), PDB_BLOCKING, Severity::Warn);
    }

    #[test]
    fn healthy_budget_or_budget_off_scope_passes() {
        let mut f = Fixture::healthy();
        assert_pass(&f.run(), PDB_BLOCKING);
        f.snap.pdbs[0].budget = Budget::MaxUnavailable(IntOrPercent::Int(0));
        f.scope.retain(|n| n.as_str() == "cp-1");
        assert_pass(&f.run(), PDB_BLOCKING);
    }

    // ---- host-port ----

    #[test]
    fn host_port_pods_warn_with_portmap() {
        let mut f = Fixture::healthy();
        f.pod_mut("web-a").host_port = true;
        let c = expect(&f.run(), HOST_PORT, Severity::Warn);
        assert!(
            c[0].message.contains("shop/web-a") && c[0].message.contains("portmap"),
            "{c:?}"
        );
        assert!(c[0].message.contains("hostPort.enabled=true"), "{c:?}");
    }

    #[test]
    fn host_port_on_host_network_passes() {
        let mut f = Fixture::healthy();
        assert_pass(&f.run(), HOST_PORT);
        f.pod_mut("calico-node-worker-1").host_port = true; // hostNetwork: not the CNI's business.
        assert_pass(&f.run(), HOST_PORT);
    }

    // ---- static-pods ----

    #[test]
    fn static_pod_on_pod_network_fails() {
        let mut f = Fixture::healthy();
        f.pod_mut("kube-apiserver-cp-1").host_network = false;
        let c = expect(&f.run(), STATIC_PODS, Severity::Fail);
        assert!(
            c[0].message
                .contains("kube-system/kube-apiserver-cp-1 (on cp-1)"),
            "{c:?}"
        );
        assert!(c[0].message.contains("hostNetwork"), "{c:?}");
    }

    #[test]
    fn static_pods_on_host_network_or_off_scope_pass() {
        let mut f = Fixture::healthy();
        assert_pass(&f.run(), STATIC_PODS);
        f.pod_mut("kube-apiserver-cp-1").host_network = false;
        f.scope.retain(|n| n.as_str() != "cp-1");
        assert_pass(&f.run(), STATIC_PODS);
    }

    // ---- unmanaged-pods ----

    #[test]
    fn unmanaged_pods_fail_or_warn_by_config() {
        let mut f = Fixture::healthy();
        f.snap.pods.push(Fixture::pod(
            "default",
            "debug-shell",
            "worker-2",
            OwnerKind::None,
        ));
        let c = expect(&f.run(), UNMANAGED_PODS, Severity::Fail);
        assert!(
            c[0].message.contains("default/debug-shell")
                && c[0].message.contains("evictUnmanagedPods"),
            "{c:?}"
        );
        f.cfg.evict_unmanaged_pods = true;
        let c = expect(&f.run(), UNMANAGED_PODS, Severity::Warn);
        assert!(c[0].message.contains("default/debug-shell"), "{c:?}");
    }

    #[test]
    fn unmanaged_lists_are_bounded() {
        let mut f = Fixture::healthy();
        for i in 0..20 {
            f.snap.pods.push(Fixture::pod(
                "default",
                &format!("bare-{i}"),
                "worker-1",
                OwnerKind::None,
            ));
        }
        let c = expect(&f.run(), UNMANAGED_PODS, Severity::Fail);
        assert!(
            c[0].message.contains("20 pods") && c[0].message.contains("and 15 more"),
            "{c:?}"
        );
        assert!(!c[0].message.contains("bare-19"), "{c:?}");
    }

    #[test]
    fn managed_finished_or_off_scope_bare_pods_pass() {
        let mut f = Fixture::healthy();
        assert_pass(&f.run(), UNMANAGED_PODS);
        let mut done = Fixture::pod("default", "one-off", "worker-1", OwnerKind::None);
        done.phase = PodPhase::Succeeded;
        f.snap.pods.push(done);
        f.snap
            .pods
            .push(Fixture::pod("default", "bare", "cp-1", OwnerKind::None));
        f.scope.retain(|n| n.as_str() != "cp-1");
        assert_pass(&f.run(), UNMANAGED_PODS);
    }

    // ---- emptydir-pods ----

    #[test]
    fn emptydir_pods_warn_or_fail_by_config() {
        let mut f = Fixture::healthy();
        f.pod_mut("web-b").empty_dir = true;
        let c = expect(&f.run(), EMPTYDIR_PODS, Severity::Warn);
        assert!(c[0].message.contains("shop/web-b"), "{c:?}");
        f.cfg.delete_emptydir_data = false;
        let c = expect(&f.run(), EMPTYDIR_PODS, Severity::Fail);
        assert!(
            c[0].message.contains("shop/web-b") && c[0].message.contains("deleteEmptydirData"),
            "{c:?}"
        );
    }

    #[test]
    fn emptydir_on_daemonset_pods_passes() {
        let mut f = Fixture::healthy();
        f.cfg.delete_emptydir_data = false;
        assert_pass(&f.run(), EMPTYDIR_PODS);
        f.pod_mut("calico-node-worker-1").empty_dir = true; // DaemonSet pods are not drained.
        assert_pass(&f.run(), EMPTYDIR_PODS);
    }
}
