//! The plan: what a run will do, computed read-only from a snapshot and a config.

use serde::Serialize;
use serde_json::Value;

use crate::cilium::{CiliumNodeConfig, CiliumPhase, ValueInputs, helm_values};
use crate::config::{MigrationConfig, NodeScope};
use crate::model::{ClusterSnapshot, Node, NodeName};
use crate::preflight::{PreflightReport, preflight};
use crate::schedule::PendingNode;

/// A node left out of the run, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// Node.
    pub node: NodeName,
    /// Why.
    pub reason: String,
}

/// What a run will do.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// Preflight results; the run refuses to start while any failed.
    pub preflight: PreflightReport,
    /// Ready nodes in the whole cluster when planned.
    pub ready_nodes: usize,
    /// Of those, the ones cordoned when planned (by a person, or by a run that stopped: a run
    /// counts the nodes whose record says the migration cordoned them as schedulable). A run
    /// never has every schedulable node in flight at once (each stays cordoned until it is
    /// verified): the pods a drain evicts need a node to go to ([`in_flight_limit`]).
    pub cordoned_ready: Vec<NodeName>,
    /// Nodes to migrate, in the order they are considered (workers interleaved by zone, then
    /// control-plane nodes).
    pub order: Vec<PlannedNode>,
    /// Nodes in scope that are left out.
    pub skipped: Vec<Skipped>,
    /// Facts the values depend on.
    #[serde(skip)]
    pub inputs: ValueInputs,
    /// Helm values for installing Cilium in migration mode.
    pub migration_values: Value,
    /// Helm values for the final phase.
    pub final_values: Value,
    /// The `CiliumNodeConfig` that moves labelled nodes to Cilium.
    pub node_config: CiliumNodeConfig,
}

/// A node in the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedNode {
    /// Name.
    pub name: NodeName,
    /// Zone.
    pub zone: Option<String>,
    /// Control-plane or etcd.
    pub control_plane: bool,
}

impl From<&PlannedNode> for PendingNode {
    fn from(p: &PlannedNode) -> Self {
        PendingNode {
            name: p.name.clone(),
            zone: p.zone.clone(),
            control_plane: p.control_plane,
        }
    }
}

/// True when `node` is in `scope`.
#[must_use]
pub fn in_scope(scope: &NodeScope, node: &Node) -> bool {
    match scope {
        NodeScope::All => true,
        NodeScope::Names(names) => names.contains(&node.name),
        NodeScope::Selector(sel) => sel.matches(&node.labels),
    }
}

/// The most nodes a run has in flight at once: `max_in_flight`, but at most one less than the
/// cluster's `schedulable` nodes (when it has two or more), so that at least one node is left
/// for the pods a drain evicts while every node in flight is cordoned; never below one.
#[must_use]
pub fn in_flight_limit(max_in_flight: u32, schedulable: usize) -> u32 {
    let room = u32::try_from(schedulable.saturating_sub(1)).unwrap_or(u32::MAX);
    if schedulable >= 2 {
        max_in_flight.min(room).max(1)
    } else {
        max_in_flight.max(1)
    }
}

/// Computes the plan. Pure.
#[must_use]
pub fn plan(snapshot: &ClusterSnapshot, cfg: &MigrationConfig) -> Plan {
    let inputs = ValueInputs {
        host_port_pods: snapshot.pods.iter().any(|p| p.host_port && !p.host_network),
    };
    let mut skipped = Vec::new();
    let mut chosen: Vec<&Node> = Vec::new();
    for n in snapshot.nodes.iter().filter(|n| in_scope(&cfg.scope, n)) {
        if n.ready {
            chosen.push(n);
        } else {
            skipped.push(Skipped {
                node: n.name.clone(),
                reason: "node is NotReady; migrate it once it is Ready".into(),
            });
        }
    }
    let scope: Vec<NodeName> = chosen.iter().map(|n| n.name.clone()).collect();
    let report = preflight(snapshot, cfg, &scope);
    Plan {
        preflight: report,
        ready_nodes: snapshot.nodes.iter().filter(|n| n.ready).count(),
        cordoned_ready: snapshot
            .nodes
            .iter()
            .filter(|n| n.ready && n.unschedulable)
            .map(|n| n.name.clone())
            .collect(),
        order: order_nodes(&chosen, cfg.control_plane_last),
        skipped,
        inputs,
        migration_values: helm_values(cfg, inputs, CiliumPhase::Migration),
        final_values: helm_values(cfg, inputs, CiliumPhase::Final),
        node_config: CiliumNodeConfig::for_migration(cfg, inputs),
    }
}

/// Workers first (round-robin across zones, names sorted within a zone), then control-plane nodes.
#[must_use]
pub fn order_nodes(nodes: &[&Node], control_plane_last: bool) -> Vec<PlannedNode> {
    let mut groups: std::collections::BTreeMap<(bool, Option<&str>), Vec<&Node>> =
        std::collections::BTreeMap::new();
    for n in nodes {
        let cp = control_plane_last && n.is_control_plane();
        groups.entry((cp, n.zone.as_deref())).or_default().push(n);
    }
    for g in groups.values_mut() {
        g.sort_by(|a, b| a.name.cmp(&b.name));
    }
    let mut out = Vec::with_capacity(nodes.len());
    for cp in [false, true] {
        let mut lanes: Vec<std::collections::VecDeque<&Node>> = groups
            .iter()
            .filter(|((c, _), _)| *c == cp)
            .map(|(_, v)| v.iter().copied().collect())
            .collect();
        while lanes.iter().any(|l| !l.is_empty()) {
            for lane in &mut lanes {
                if let Some(n) = lane.pop_front() {
                    out.push(PlannedNode {
                        name: n.name.clone(),
                        zone: n.zone.clone(),
                        control_plane: n.is_control_plane(),
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::in_flight_limit;

    #[test]
    fn the_in_flight_limit_leaves_one_schedulable_node() {
        assert_eq!(in_flight_limit(4, 10), 4);
        assert_eq!(in_flight_limit(4, 4), 3);
        assert_eq!(in_flight_limit(2, 2), 1);
        // A one-node cluster (or one with every node cordoned) still migrates, one at a time.
        assert_eq!(in_flight_limit(3, 1), 3);
        assert_eq!(in_flight_limit(3, 0), 3);
        assert_eq!(in_flight_limit(0, 5), 1);
    }
}
