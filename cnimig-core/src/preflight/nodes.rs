//! Node rules: room for the agent, readiness, cordons, the scope itself, and the connectivity
//! checker.

use super::{Check, Ctx, bounded, count, fmt_bytes, verb};
use crate::config::NodeScope;
use std::collections::{BTreeMap, BTreeSet};

use crate::model::{NodeName, OwnerKind};

pub(super) const AGENT_ROOM: &str = "agent-room";
pub(super) const CONNECTIVITY_CHECKER: &str = "connectivity-checker";
pub(super) const NODES_NOT_READY: &str = "nodes-not-ready";
pub(super) const NODES_CORDONED: &str = "nodes-cordoned";
pub(super) const SCOPE: &str = "scope";
pub(super) const NODE_OBSERVABILITY: &str = "node-observability";

/// Rule `agent-room`: every node in scope has room for the Cilium agent's requests.
pub(super) fn agent_room(ctx: &Ctx<'_>) -> Vec<Check> {
    let need = ctx.snap.cilium_agent_requests;
    let need_text = format!(
        "{}m CPU, {} memory",
        need.cpu_millis,
        fmt_bytes(need.memory_bytes)
    );
    // Where the agent already runs (Cilium installed, e.g. a resumed run), its requests are
    // already in the node's requested resources.
    let has_agent: BTreeSet<&NodeName> = ctx
        .snap
        .pods
        .iter()
        .filter(|p| {
            p.owner == OwnerKind::DaemonSet
                && p.labels.get("k8s-app").is_some_and(|v| v == "cilium")
        })
        .filter_map(|p| p.node.as_ref())
        .collect();
    let mut short = Vec::new();
    let mut checked = 0usize;
    for node in ctx.scope_nodes() {
        checked = checked.saturating_add(1);
        if has_agent.contains(&node.name) {
            continue;
        }
        let free_cpu = node
            .allocatable
            .cpu_millis
            .saturating_sub(node.requested.cpu_millis);
        let free_mem = node
            .allocatable
            .memory_bytes
            .saturating_sub(node.requested.memory_bytes);
        let cpu = need.cpu_millis.saturating_sub(free_cpu);
        let mem = need.memory_bytes.saturating_sub(free_mem);
        let mut by = Vec::new();
        if cpu > 0 {
            by.push(format!("{cpu}m CPU"));
        }
        if mem > 0 {
            by.push(format!("{} memory", fmt_bytes(mem)));
        }
        if !by.is_empty() {
            short.push(format!("{} (short by {})", node.name, by.join(" and ")));
        }
    }
    if short.is_empty() {
        let note = if need.cpu_millis == 0 && need.memory_bytes == 0 {
            " (the agent's requests are unknown or zero: nothing was reserved)"
        } else {
            ""
        };
        return vec![Check::pass(
            AGENT_ROOM,
            format!(
                "Every node in scope ({checked}) has room for the Cilium agent's requests ({need_text}){note}."
            ),
        )];
    }
    vec![Check::fail(
        AGENT_ROOM,
        format!(
            "{} in scope {} room for the Cilium agent's requests ({need_text}): {}. The agent pod would stay Pending \
             there and the node could never move to Cilium. Fix: free capacity on those nodes (or lower the agent's \
             requests in the Helm values) before installing Cilium.",
            count(short.len(), "node"),
            verb(short.len(), "lacks", "lack"),
            bounded(&short)
        ),
    )]
}

/// Rule `connectivity-checker`.
pub(super) fn connectivity_checker(ctx: &Ctx<'_>) -> Vec<Check> {
    if ctx.snap.connectivity_checker {
        vec![Check::pass(
            CONNECTIVITY_CHECKER,
            "A connectivity checker (Goldpinger) is deployed: it shows whether pods on Calico and Cilium nodes still \
             reach each other while nodes migrate.",
        )]
    } else {
        vec![Check::warn(
            CONNECTIVITY_CHECKER,
            "No connectivity checker found. Deploy Goldpinger (a DaemonSet whose pods ping each other) before \
             migrating, so connectivity between Calico and Cilium nodes is verified after every node.",
        )]
    }
}

/// Rule `nodes-not-ready`.
pub(super) fn nodes_not_ready(ctx: &Ctx<'_>) -> Vec<Check> {
    let bad: Vec<&NodeName> = ctx
        .scope_nodes()
        .filter(|n| !n.ready)
        .map(|n| &n.name)
        .collect();
    if bad.is_empty() {
        let n = ctx.scope_nodes().count();
        return vec![Check::pass(
            NODES_NOT_READY,
            format!("Every node in scope ({n}) is Ready."),
        )];
    }
    vec![Check::warn(
        NODES_NOT_READY,
        format!(
            "{} in scope {} not Ready: {}. They will be skipped (a node must be Ready to drain and verify); repair \
             them and run again to migrate them.",
            count(bad.len(), "node"),
            verb(bad.len(), "is", "are"),
            bounded(bad)
        ),
    )]
}

/// Rule `node-observability`: the adapter can see, on every node in scope, what the node's
/// `AgentReady` step waits for (the node config its Cilium agent resolved, Cilium's CNI config in
/// `/etc/cni/net.d`). A node it cannot see would be cordoned, drained, relabelled and its agent
/// restarted, then time out there and be rolled back: refused before any change.
pub(super) fn node_observability(ctx: &Ctx<'_>) -> Vec<Check> {
    let mut by_why: BTreeMap<&str, Vec<&NodeName>> = BTreeMap::new();
    for n in ctx.scope_nodes() {
        if let Some(why) = ctx.snap.unobservable.get(&n.name) {
            by_why.entry(why.as_str()).or_default().push(&n.name);
        }
    }
    if by_why.is_empty() {
        let n = ctx.scope_nodes().count();
        return vec![Check::pass(
            NODE_OBSERVABILITY,
            format!(
                "The agent's node config and the CNI directory can be observed on every node in scope ({n})."
            ),
        )];
    }
    by_why
        .into_iter()
        .map(|(why, nodes)| {
            let them = verb(nodes.len(), "it", "them");
            Check::fail(
                NODE_OBSERVABILITY,
                format!(
                    "{} in scope ({}): cnimig cannot observe there which node config the Cilium \
                     agent resolved, nor /etc/cni/net.d, so a run would cordon, drain and relabel \
                     {them}, restart {} agent, never see {them} reach AgentReady and roll {} \
                     back. Nothing is started. {why}.",
                    count(nodes.len(), "node"),
                    bounded(&nodes),
                    verb(nodes.len(), "its", "their"),
                    verb(nodes.len(), "it", "each"),
                ),
            )
        })
        .collect()
}

/// Rule `nodes-cordoned`: nodes a person cordoned stay cordoned after their migration.
pub(super) fn nodes_cordoned(ctx: &Ctx<'_>) -> Vec<Check> {
    // Nodes an interrupted run cordoned itself (its record says they were schedulable before):
    // it uncordons them when they finish, so they are no person's cordon.
    let ours = |n: &NodeName| {
        ctx.snap
            .records
            .get(n)
            .is_some_and(|r| r.pre_cordoned == Some(false) && !r.phase.is_terminal())
    };
    let (by_run, cordoned): (Vec<&NodeName>, Vec<&NodeName>) = ctx
        .scope_nodes()
        .filter(|n| n.unschedulable)
        .map(|n| &n.name)
        .partition(|n| ours(n));
    if cordoned.is_empty() {
        if by_run.is_empty() {
            return vec![Check::pass(NODES_CORDONED, "No node in scope is cordoned.")];
        }
        return vec![Check::pass(
            NODES_CORDONED,
            format!(
                "No node in scope is cordoned but the {} an interrupted run cordoned ({}); the run \
                 uncordons them when they are migrated.",
                count(by_run.len(), "node"),
                bounded(by_run)
            ),
        )];
    }
    vec![Check::warn(
        NODES_CORDONED,
        format!(
            "{} in scope {} already cordoned: {}. cnimig migrates them but leaves them cordoned afterwards (it never \
             uncordons a node a person cordoned); uncordon them yourself when they should take pods again.",
            count(cordoned.len(), "node"),
            verb(cordoned.len(), "is", "are"),
            bounded(cordoned)
        ),
    )]
}

/// Rule `scope`: names in the config that are not nodes, and an empty scope.
pub(super) fn scope(ctx: &Ctx<'_>) -> Vec<Check> {
    let exists = |n: &NodeName| ctx.snap.node(n).is_some();
    let mut out = Vec::new();
    let listed: &[NodeName] = match &ctx.cfg.scope {
        NodeScope::Names(names) => names,
        NodeScope::All | NodeScope::Selector(_) => &[],
    };
    let missing_cfg: Vec<&NodeName> = listed.iter().filter(|n| !exists(n)).collect();
    if !missing_cfg.is_empty() {
        out.push(Check::fail(
            SCOPE,
            format!(
                "{} listed in the config's nodes {} not exist in the cluster: {}. Fix: spell them exactly as `kubectl \
                 get nodes` prints them, or remove them.",
                count(missing_cfg.len(), "node"),
                verb(missing_cfg.len(), "does", "do"),
                bounded(&missing_cfg)
            ),
        ));
    }
    let missing_scope: Vec<&NodeName> = ctx
        .scope_list
        .iter()
        .copied()
        .filter(|n| !exists(n) && !missing_cfg.contains(n))
        .collect();
    if !missing_scope.is_empty() {
        out.push(Check::fail(
            SCOPE,
            format!(
                "{} in the resolved scope {} not in the cluster snapshot: {}. Fix: take the snapshot again, or \
                 remove them from the scope.",
                count(missing_scope.len(), "node"),
                verb(missing_scope.len(), "is", "are"),
                bounded(&missing_scope)
            ),
        ));
    }
    let present: Vec<&NodeName> = ctx
        .scope_list
        .iter()
        .copied()
        .filter(|n| exists(n))
        .collect();
    if present.is_empty() {
        out.push(Check::warn(
            SCOPE,
            "No node of the cluster is in scope: nothing will migrate. Check the config's nodes or nodeSelector.",
        ));
    }
    if out.is_empty() {
        let cp = ctx.scope_nodes().filter(|n| n.is_control_plane()).count();
        let order = if cp > 0 && ctx.cfg.control_plane_last {
            ", migrated after every worker"
        } else {
            ""
        };
        out.push(Check::pass(
            SCOPE,
            format!(
                "{} in scope ({} control-plane or etcd{order}): {}.",
                count(present.len(), "node"),
                cp,
                bounded(&present)
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::Severity;
    use super::super::fixture::{Fixture, assert_pass, expect, name};
    use super::*;
    use crate::model::Resources;

    const MI: u64 = 1 << 20;

    // ---- node-observability ----

    #[test]
    fn nodes_whose_agent_cannot_be_observed_fail_grouped_by_reason_and_only_in_scope() {
        let mut f = Fixture::healthy();
        assert_pass(&f.run(), NODE_OBSERVABILITY);
        f.snap
            .unobservable
            .insert(name("worker-1"), "No emulator annotation".into());
        f.snap
            .unobservable
            .insert(name("worker-2"), "No emulator annotation".into());
        f.snap
            .unobservable
            .insert(name("cp-1"), "Another reason".into());
        let r = f.run();
        assert!(!r.ok(), "{r}");
        let c = expect(&r, NODE_OBSERVABILITY, Severity::Fail);
        assert_eq!(c.len(), 2, "one check per reason: {c:?}");
        let two = c
            .iter()
            .find(|c| c.message.contains("No emulator annotation"))
            .unwrap();
        assert!(
            two.message
                .starts_with("2 nodes in scope (worker-1, worker-2): ")
                && two
                    .message
                    .ends_with("Nothing is started. No emulator annotation."),
            "{two:?}"
        );
        assert!(two.message.contains("roll each back"), "{two:?}");
        // A node out of scope is not refused.
        f.scope.retain(|n| n.as_str() != "cp-1");
        let c = expect(&f.run(), NODE_OBSERVABILITY, Severity::Fail);
        assert_eq!(c.len(), 1, "{c:?}");
        f.scope.clear();
        f.scope.push(name("cp-1"));
        f.snap.unobservable.remove(&name("cp-1"));
        assert_pass(&f.run(), NODE_OBSERVABILITY);
    }

    // ---- agent-room ----

    #[test]
    fn node_without_room_for_the_agent_fails_with_the_shortfall() {
        let mut f = Fixture::healthy();
        let w = f.node_mut("worker-2");
        w.requested = Resources {
            cpu_millis: w.allocatable.cpu_millis - 50,
            memory_bytes: w.allocatable.memory_bytes,
        };
        let c = expect(&f.run(), AGENT_ROOM, Severity::Fail);
        assert!(
            c[0].message
                .contains("worker-2 (short by 50m CPU and 128Mi memory)"),
            "{c:?}"
        );
        assert!(!c[0].message.contains("worker-1"), "{c:?}");
    }

    #[test]
    fn exact_fit_or_full_node_out_of_scope_passes() {
        let mut f = Fixture::healthy();
        let need = f.snap.cilium_agent_requests;
        let w = f.node_mut("worker-1");
        w.requested = Resources {
            cpu_millis: w.allocatable.cpu_millis - need.cpu_millis,
            memory_bytes: w.allocatable.memory_bytes - need.memory_bytes,
        };
        assert_pass(&f.run(), AGENT_ROOM);
        f.node_mut("worker-1").requested.memory_bytes += MI;
        expect(&f.run(), AGENT_ROOM, Severity::Fail);
        f.scope.retain(|n| n.as_str() != "worker-1");
        assert_pass(&f.run(), AGENT_ROOM);
    }

    #[test]
    fn a_node_already_running_the_agent_has_its_requests_counted_already() {
        // A full node is fine when the agent is already one of its pods (a resumed run).
        let mut f = Fixture::healthy();
        let w = f.node_mut("worker-1");
        w.requested = w.allocatable;
        expect(&f.run(), AGENT_ROOM, Severity::Fail);
        let mut agent = Fixture::pod(
            "kube-system",
            "cilium-abcde",
            "worker-1",
            OwnerKind::DaemonSet,
        );
        agent.host_network = true;
        std::sync::Arc::make_mut(&mut agent.labels).insert("k8s-app".into(), "cilium".into());
        f.snap.pods.push(agent);
        assert_pass(&f.run(), AGENT_ROOM);
    }

    // ---- connectivity-checker ----

    #[test]
    fn missing_connectivity_checker_warns() {
        let mut f = Fixture::healthy();
        assert_pass(&f.run(), CONNECTIVITY_CHECKER);
        f.snap.connectivity_checker = false;
        let c = expect(&f.run(), CONNECTIVITY_CHECKER, Severity::Warn);
        assert!(c[0].message.contains("Goldpinger"), "{c:?}");
    }

    // ---- nodes-not-ready / nodes-cordoned ----

    #[test]
    fn unready_nodes_in_scope_warn() {
        let mut f = Fixture::healthy();
        f.node_mut("worker-1").ready = false;
        let c = expect(&f.run(), NODES_NOT_READY, Severity::Warn);
        assert!(
            c[0].message.contains("worker-1") && c[0].message.contains("skipped"),
            "{c:?}"
        );
        f.scope.retain(|n| n.as_str() != "worker-1");
        assert_pass(&f.run(), NODES_NOT_READY);
    }

    #[test]
    fn cordoned_nodes_in_scope_warn_that_they_stay_cordoned() {
        let mut f = Fixture::healthy();
        assert_pass(&f.run(), NODES_CORDONED);
        f.node_mut("worker-2").unschedulable = true;
        let c = expect(&f.run(), NODES_CORDONED, Severity::Warn);
        assert!(
            c[0].message.contains("worker-2") && c[0].message.contains("leaves them cordoned"),
            "{c:?}"
        );
    }

    #[test]
    fn nodes_an_interrupted_run_cordoned_are_not_reported_as_a_persons_cordon() {
        use crate::machine::{NodeRecord, Phase};
        use crate::model::Time;
        let record = |phase, pre_cordoned| NodeRecord {
            phase,
            pre_cordoned,
            ..NodeRecord::new(Time(1))
        };
        let mut f = Fixture::healthy();
        f.node_mut("worker-2").unschedulable = true;
        // The run cordoned it (it was schedulable before) and was killed mid-node.
        f.snap
            .records
            .insert(name("worker-2"), record(Phase::Drained, Some(false)));
        let c = expect(&f.run(), NODES_CORDONED, Severity::Pass);
        assert!(
            c[0].message.contains("worker-2") && c[0].message.contains("interrupted run"),
            "{c:?}"
        );
        // A person cordoned it before that run: it stays theirs.
        f.snap
            .records
            .insert(name("worker-2"), record(Phase::Drained, Some(true)));
        let c = expect(&f.run(), NODES_CORDONED, Severity::Warn);
        assert!(c[0].message.contains("leaves them cordoned"), "{c:?}");
        // Migrated and uncordoned by the run, cordoned again since: a person's cordon.
        f.snap
            .records
            .insert(name("worker-2"), record(Phase::Done, Some(false)));
        expect(&f.run(), NODES_CORDONED, Severity::Warn);
        // The run's node next to a person's: only the person's is warned about.
        f.snap
            .records
            .insert(name("worker-2"), record(Phase::Cordoned, Some(false)));
        f.node_mut("worker-1").unschedulable = true;
        let c = expect(&f.run(), NODES_CORDONED, Severity::Warn);
        assert!(
            c[0].message.contains("worker-1") && !c[0].message.contains("worker-2"),
            "{c:?}"
        );
    }

    // ---- scope ----

    #[test]
    fn unknown_names_in_the_config_fail() {
        let mut f = Fixture::healthy();
        f.cfg.scope = NodeScope::Names(vec![name("worker-1"), name("worker-9")]);
        f.scope = vec![name("worker-1")];
        let c = expect(&f.run(), SCOPE, Severity::Fail);
        assert!(
            c[0].message.contains("worker-9") && !c[0].message.contains("worker-1"),
            "{c:?}"
        );
        // A resolved scope naming a node the snapshot lacks.
        let mut f = Fixture::healthy();
        f.scope.push(name("ghost"));
        let c = expect(&f.run(), SCOPE, Severity::Fail);
        assert!(c[0].message.contains("ghost"), "{c:?}");
    }

    #[test]
    fn empty_scope_warns_and_valid_scope_passes() {
        let mut f = Fixture::healthy();
        let r = f.run();
        assert_pass(&r, SCOPE);
        assert!(
            r.with_id(SCOPE)
                .any(|c| c.message.contains("3 nodes") && c.message.contains("1 control-plane"))
        );
        f.cfg.scope = NodeScope::Names(vec![name("worker-1"), name("worker-2")]);
        f.scope = vec![name("worker-1"), name("worker-2")];
        assert_pass(&f.run(), SCOPE);
        f.scope.clear();
        f.cfg.scope = NodeScope::All;
        expect(&f.run(), SCOPE, Severity::Warn);
    }
}
