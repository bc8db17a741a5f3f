//! The scheduler: which pending node(s) to start next.
//!
//! Pure and cheap. Rules, in order:
//! 1. Never more than `max_in_flight` nodes between start and a terminal phase.
//! 2. With `control_plane_last`, a control-plane (or etcd) node starts only once no worker is
//!    pending or in flight.
//! 3. A node whose drain would need more disruptions than a PodDisruptionBudget allows, given the
//!    evictions still ahead of the nodes already draining, waits. A budget nobody else is draining
//!    against may be used by one node even if that node needs several disruptions (its own drain
//!    then evicts them one at a time as replacements become ready).
//! 4. A node whose budget allows no disruption right now (replacements of earlier evictions are
//!    still starting) starts only when no other drain in flight or started in this decision still
//!    has pods of that budget, and after every node that can drain at once: its drain then waits
//!    for the budget like `kubectl drain` does, and its drain timeout decides if it never frees.
//! 5. Among the nodes allowed, prefer the zone with the fewest nodes in flight, then plan order.

use std::collections::BTreeMap;

use crate::model::NodeName;
use crate::ports::BudgetView;

/// A node waiting to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingNode {
    /// Name.
    pub name: NodeName,
    /// Zone, if known.
    pub zone: Option<String>,
    /// Control-plane or etcd node.
    pub control_plane: bool,
}

/// A node between start and a terminal phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlightNode {
    /// Name.
    pub name: NodeName,
    /// Zone, if known.
    pub zone: Option<String>,
    /// Control-plane or etcd node.
    pub control_plane: bool,
    /// Still draining (its remaining evictions count against budgets).
    pub draining: bool,
}

/// Scheduler limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum nodes in flight.
    pub max_in_flight: u32,
    /// Control-plane nodes after every worker.
    pub control_plane_last: bool,
}

/// How many pending nodes, in plan order, the orchestrator should ask budgets about per decision.
#[must_use]
pub fn window(limits: Limits, in_flight: usize) -> usize {
    let slots = (limits.max_in_flight as usize).saturating_sub(in_flight);
    (slots * 4).max(32)
}

/// Why a candidate was not started (for progress displays).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// No slot free.
    NoSlot,
    /// Control-plane node waiting for workers.
    ControlPlaneLast,
    /// A budget is in use by nodes already draining.
    Budget {
        /// `namespace/name`.
        pdb: String,
    },
}

/// The decision: nodes to start now (in order), and why the first held candidate waits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Picks {
    /// Start these.
    pub start: Vec<NodeName>,
    /// Why the next candidate in plan order could not start, if one could not.
    pub held: Option<(NodeName, Held)>,
}

/// Picks the nodes to start. `pending` is in plan order; `budgets` must cover the candidates
/// considered (a prefix of `pending` of [`window`] length) and every draining in-flight node.
#[must_use]
pub fn pick(
    pending: &[PendingNode],
    in_flight: &[InFlightNode],
    budgets: &BudgetView,
    limits: Limits,
) -> Picks {
    let mut picks = Picks::default();
    let mut slots = (limits.max_in_flight as usize).saturating_sub(in_flight.len());
    let workers_left =
        in_flight.iter().any(|n| !n.control_plane) || pending.iter().any(|n| !n.control_plane);

    let mut reserved: BTreeMap<&str, u32> = BTreeMap::new();
    for n in in_flight.iter().filter(|n| n.draining) {
        for (pdb, count) in budgets
            .per_node
            .get(&n.name)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            *reserved.entry(pdb.as_str()).or_default() += count;
        }
    }
    let mut zone_load: BTreeMap<Option<&str>, usize> = BTreeMap::new();
    for n in in_flight {
        *zone_load.entry(n.zone.as_deref()).or_default() += 1;
    }

    let mut candidates: Vec<(usize, &PendingNode)> = pending
        .iter()
        .take(window(limits, in_flight.len()))
        .enumerate()
        .collect();
    // Nodes that could start but whose budget allows no disruption right now: they go after every
    // node that can drain at once (rule 4).
    let mut deferred: Vec<(usize, &PendingNode)> = Vec::new();
    for second_pass in [false, true] {
        if second_pass {
            candidates = std::mem::take(&mut deferred);
        }
        while slots > 0 && !candidates.is_empty() {
            // Least-loaded zone first, then plan order.
            let Some(best) = candidates
                .iter()
                .enumerate()
                .min_by_key(|(_, (order, n))| {
                    (
                        zone_load.get(&n.zone.as_deref()).copied().unwrap_or(0),
                        *order,
                    )
                })
                .map(|(i, _)| i)
            else {
                break;
            };
            let (order, node) = candidates.remove(best);
            if limits.control_plane_last && node.control_plane && workers_left {
                picks
                    .held
                    .get_or_insert((node.name.clone(), Held::ControlPlaneLast));
                continue;
            }
            let demand = budgets
                .per_node
                .get(&node.name)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let used = |pdb: &str| reserved.get(pdb).copied().unwrap_or(0);
            let allowed = |pdb: &String| budgets.allowed.get(pdb).copied().unwrap_or(0);
            let blocking = demand
                .iter()
                .find(|(pdb, need)| {
                    let u = used(pdb.as_str());
                    u > 0 && u + need > allowed(pdb)
                })
                .map(|(pdb, _)| pdb);
            if let Some(pdb) = blocking {
                picks
                    .held
                    .get_or_insert((node.name.clone(), Held::Budget { pdb: pdb.clone() }));
                continue;
            }
            if !second_pass && demand.iter().any(|(pdb, _)| allowed(pdb) == 0) {
                deferred.push((order, node));
                continue;
            }
            for (pdb, need) in demand {
                *reserved.entry(pdb.as_str()).or_default() += need;
            }
            *zone_load.entry(node.zone.as_deref()).or_default() += 1;
            picks.start.push(node.name.clone());
            slots -= 1;
        }
    }
    if slots == 0
        && picks.held.is_none()
        && let Some(next) = pending.iter().find(|p| !picks.start.contains(&p.name))
    {
        picks.held = Some((next.name.clone(), Held::NoSlot));
    }
    picks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }
    fn pend(s: &str, zone: &str, cp: bool) -> PendingNode {
        PendingNode {
            name: n(s),
            zone: Some(zone.into()),
            control_plane: cp,
        }
    }
    fn fly(s: &str, zone: &str, draining: bool) -> InFlightNode {
        InFlightNode {
            name: n(s),
            zone: Some(zone.into()),
            control_plane: false,
            draining,
        }
    }
    fn budgets(per_node: &[(&str, &[(&str, u32)])], allowed: &[(&str, u32)]) -> BudgetView {
        BudgetView {
            per_node: per_node
                .iter()
                .map(|(node, v)| {
                    (
                        n(node),
                        v.iter().map(|(p, c)| ((*p).to_string(), *c)).collect(),
                    )
                })
                .collect(),
            allowed: allowed
                .iter()
                .map(|(p, c)| ((*p).to_string(), *c))
                .collect(),
        }
    }
    const LIM: Limits = Limits {
        max_in_flight: 3,
        control_plane_last: true,
    };

    #[test]
    fn respects_the_in_flight_limit() {
        let pending: Vec<_> = (0..10)
            .map(|i| pend(&format!("w{i}"), "a", false))
            .collect();
        let p = pick(
            &pending,
            &[fly("x", "a", false)],
            &BudgetView::default(),
            LIM,
        );
        assert_eq!(p.start.len(), 2);
        assert!(matches!(p.held, Some((_, Held::NoSlot))));
    }

    #[test]
    fn control_plane_waits_for_every_worker() {
        let pending = vec![pend("cp1", "a", true), pend("w1", "a", false)];
        let p = pick(&pending, &[], &BudgetView::default(), LIM);
        assert_eq!(p.start, vec![n("w1")]);
        let p = pick(
            &[pend("cp1", "a", true)],
            &[fly("w1", "a", false)],
            &BudgetView::default(),
            LIM,
        );
        assert!(p.start.is_empty());
        assert_eq!(p.held, Some((n("cp1"), Held::ControlPlaneLast)));
        let p = pick(&[pend("cp1", "a", true)], &[], &BudgetView::default(), LIM);
        assert_eq!(p.start, vec![n("cp1")]);
    }

    #[test]
    fn does_not_oversubscribe_a_budget_already_being_drained() {
        let b = budgets(
            &[
                ("x", &[("app/web", 1)]),
                ("w1", &[("app/web", 1)]),
                ("w2", &[("app/db", 1)]),
            ],
            &[("app/web", 1), ("app/db", 1)],
        );
        let p = pick(
            &[pend("w1", "a", false), pend("w2", "b", false)],
            &[fly("x", "c", true)],
            &b,
            LIM,
        );
        assert_eq!(p.start, vec![n("w2")]);
        assert_eq!(
            p.held,
            Some((
                n("w1"),
                Held::Budget {
                    pdb: "app/web".into()
                }
            ))
        );
        // Once x has drained, its budget is free again.
        let p = pick(&[pend("w1", "a", false)], &[fly("x", "c", false)], &b, LIM);
        assert_eq!(p.start, vec![n("w1")]);
    }

    #[test]
    fn two_candidates_sharing_a_budget_do_not_both_start() {
        let b = budgets(
            &[("w1", &[("app/web", 1)]), ("w2", &[("app/web", 1)])],
            &[("app/web", 1)],
        );
        let p = pick(
            &[pend("w1", "a", false), pend("w2", "b", false)],
            &[],
            &b,
            LIM,
        );
        assert_eq!(p.start, vec![n("w1")]);
        // A budget allowing two lets both go.
        let b = budgets(
            &[("w1", &[("app/web", 1)]), ("w2", &[("app/web", 1)])],
            &[("app/web", 2)],
        );
        let p = pick(
            &[pend("w1", "a", false), pend("w2", "b", false)],
            &[],
            &b,
            LIM,
        );
        assert_eq!(p.start.len(), 2);
    }

    #[test]
    fn an_exhausted_budget_waits_while_another_drain_still_has_its_pods() {
        let b = budgets(
            &[("w1", &[("app/web", 1)]), ("x", &[("app/web", 2)])],
            &[("app/web", 0)],
        );
        // x is still draining pods of app/web: w1 waits.
        let p = pick(&[pend("w1", "a", false)], &[fly("x", "b", true)], &b, LIM);
        assert!(p.start.is_empty());
        assert_eq!(
            p.held,
            Some((
                n("w1"),
                Held::Budget {
                    pdb: "app/web".into()
                }
            ))
        );
        // x has drained (its replacements are still starting): w1 starts and its drain waits.
        let p = pick(&[pend("w1", "a", false)], &[fly("x", "b", false)], &b, LIM);
        assert_eq!(p.start, vec![n("w1")]);
        let p = pick(&[pend("w1", "a", false)], &[], &b, LIM);
        assert_eq!(p.start, vec![n("w1")]);
    }

    #[test]
    fn nodes_that_can_drain_at_once_go_before_an_exhausted_budget() {
        let b = budgets(
            &[
                ("w1", &[("app/web", 1)]),
                ("w2", &[("app/web", 1)]),
                ("w3", &[("app/db", 1)]),
            ],
            &[("app/web", 0), ("app/db", 1)],
        );
        let lim = Limits {
            max_in_flight: 2,
            control_plane_last: true,
        };
        let pending = [
            pend("w1", "a", false),
            pend("w2", "a", false),
            pend("w3", "a", false),
        ];
        let p = pick(&pending, &[], &b, lim);
        // w3 first although later in plan order; then one (not two) node on the exhausted budget.
        assert_eq!(p.start, vec![n("w3"), n("w1")]);
        let p = pick(&pending, &[], &b, LIM);
        assert_eq!(p.start, vec![n("w3"), n("w1")]);
        assert_eq!(
            p.held,
            Some((
                n("w2"),
                Held::Budget {
                    pdb: "app/web".into()
                }
            ))
        );
    }

    #[test]
    fn spreads_across_zones() {
        let pending = vec![
            pend("a1", "a", false),
            pend("a2", "a", false),
            pend("b1", "b", false),
            pend("c1", "c", false),
        ];
        let p = pick(&pending, &[], &BudgetView::default(), LIM);
        assert_eq!(p.start, vec![n("a1"), n("b1"), n("c1")]);
    }
}
