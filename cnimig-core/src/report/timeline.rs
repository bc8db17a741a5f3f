//! Recording a run's timeline from its events.

use std::sync::{Mutex, MutexGuard};

use crate::events::{Event, EventSink};
use crate::machine::Phase;
use crate::model::{NodeName, Time};

/// Marks kept per node at most (a drain blocked for hours changes blockers many times).
const MAX_MARKS_PER_NODE: usize = 500;

/// When an event happened.
#[must_use]
pub fn event_time(e: &Event) -> Time {
    match e {
        Event::RunStarted { at, .. }
        | Event::NodeStarted { at, .. }
        | Event::Phase { at, .. }
        | Event::Waiting { at, .. }
        | Event::EvictionBlocked { at, .. }
        | Event::NodeFinished { at, .. }
        | Event::NodeJoined { at, .. }
        | Event::Retrying { at, .. }
        | Event::Stopping { at, .. }
        | Event::Progress { at, .. } => *at,
    }
}

/// Records a run for [`Timeline::to_svg`]: an [`EventSink`] that keeps every node's phase
/// transitions, plus the availability samples an embedder feeds.
///
/// It is cheap to share (`&Timeline` is a sink); events and samples may come from different
/// threads, and are kept in the order they arrive.
#[derive(Debug, Default)]
pub struct Timeline {
    data: Mutex<Recorded>,
}

/// Everything a [`Timeline`] recorded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recorded {
    /// When the run started acting (from `RunStarted`).
    pub run_started: Option<Time>,
    /// The earliest time seen in any event or sample.
    pub first: Option<Time>,
    /// The latest time seen in any event or sample.
    pub last: Option<Time>,
    /// One per node, in the order nodes first appeared.
    pub tracks: Vec<Track>,
    /// Availability of PDB-covered pods, in the order fed (consecutive equal samples are kept once).
    pub samples: Vec<AvailabilitySample>,
    /// `Stopping` events.
    pub stops: Vec<Stop>,
}

/// One node's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Track {
    /// Node.
    pub node: NodeName,
    /// When it started (its first `NodeStarted`, or its first `Phase` for a resumed node).
    pub started: Option<Time>,
    /// The phases it went through, in order.
    pub segments: Vec<Segment>,
    /// When it finished.
    pub finished: Option<Time>,
    /// Its terminal phase.
    pub outcome: Option<Phase>,
    /// The rollback cause.
    pub cause: Option<String>,
    /// What it waited for and which budgets blocked it.
    pub marks: Vec<Mark>,
}

/// A span of time a node spent with `phase` as its last completed step (so working on the next).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// The last completed step.
    pub phase: Phase,
    /// Entered.
    pub from: Time,
    /// Left (`None` while the node is still in it).
    pub to: Option<Time>,
    /// Progress a rollback later undid.
    pub undone: bool,
}

/// What kind of annotation a [`Mark`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MarkKind {
    /// The node waited for something (`Event::Waiting`).
    Waiting,
    /// An eviction was refused by a budget (`Event::EvictionBlocked`).
    EvictionBlocked,
}

/// An annotation on a node's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// When.
    pub at: Time,
    /// What kind.
    pub kind: MarkKind,
    /// One line for people.
    pub text: String,
}

/// A `Stopping` event: no new node starts after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    /// When.
    pub at: Time,
    /// Why.
    pub reason: String,
}

/// One budget's health at a sample time, as the embedder sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetHealth {
    /// `namespace/name` of the budget.
    pub pdb: String,
    /// Covered pods Ready and not terminating.
    pub healthy: u32,
    /// The healthy count the budget requires.
    pub desired: u32,
    /// The pods the workload's controller wants.
    pub expected: u32,
}

/// The budget with the lowest `healthy / expected` at a sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorstBudget {
    /// `namespace/name`.
    pub pdb: String,
    /// Healthy pods.
    pub healthy: u32,
    /// Required healthy pods.
    pub desired: u32,
    /// Wanted pods.
    pub expected: u32,
}

/// Availability of the PDB-covered pods at one time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvailabilitySample {
    /// When.
    pub at: Time,
    /// Covered pods ready (summed over budgets: a pod two budgets cover counts twice).
    pub ready: u64,
    /// Covered pods wanted (summed the same way).
    pub total: u64,
    /// The budget with the lowest `healthy / expected`, when fed per budget.
    pub worst: Option<WorstBudget>,
    /// Budgets below their floor (`healthy < desired`), when fed per budget.
    pub below_floor: u32,
}

impl Timeline {
    /// An empty timeline.
    #[must_use]
    pub fn new() -> Self {
        Timeline::default()
    }

    fn lock(&self) -> MutexGuard<'_, Recorded> {
        // A panic elsewhere while holding the lock leaves data that is still worth drawing.
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives these nodes a row even if they never start (say, the plan's order, so that a run
    /// that stopped early shows the nodes it never reached). Known nodes are left as they are.
    pub fn add_nodes<'a>(&self, nodes: impl IntoIterator<Item = &'a NodeName>) {
        let mut d = self.lock();
        for n in nodes {
            d.track_mut(n);
        }
    }

    /// Records one event (what [`EventSink::emit`] does).
    pub fn record(&self, e: &Event) {
        self.lock().apply(e);
    }

    /// Records the health of every PodDisruptionBudget at `at`: the SVG plots the covered pods
    /// ready over wanted (summed over budgets), the worst budget's healthy over wanted, and marks
    /// the times a budget was below its floor. Budgets that want no pods are left out.
    pub fn record_budgets(&self, at: Time, budgets: &[BudgetHealth]) {
        let mut ready = 0u64;
        let mut total = 0u64;
        let mut below_floor = 0u32;
        let mut worst: Option<&BudgetHealth> = None;
        for b in budgets.iter().filter(|b| b.expected > 0) {
            ready = ready.saturating_add(u64::from(b.healthy.min(b.expected)));
            total = total.saturating_add(u64::from(b.expected));
            if b.healthy < b.desired {
                below_floor = below_floor.saturating_add(1);
            }
            // a/b < c/d  <=>  a*d < c*b (no floats, so ties break the same way every time).
            let lower = worst.is_none_or(|w| {
                u64::from(b.healthy) * u64::from(w.expected)
                    < u64::from(w.healthy) * u64::from(b.expected)
            });
            if lower {
                worst = Some(b);
            }
        }
        self.lock().push_sample(AvailabilitySample {
            at,
            ready,
            total,
            worst: worst.map(|w| WorstBudget {
                pdb: w.pdb.clone(),
                healthy: w.healthy,
                desired: w.desired,
                expected: w.expected,
            }),
            below_floor,
        });
    }

    /// Records the covered pods ready and wanted at `at`, for an embedder that counts them
    /// itself (the SVG then plots only `ready / total`).
    pub fn record_covered(&self, at: Time, ready: u64, total: u64) {
        self.lock().push_sample(AvailabilitySample {
            at,
            ready,
            total,
            worst: None,
            below_floor: 0,
        });
    }

    /// A copy of what was recorded.
    #[must_use]
    pub fn snapshot(&self) -> Recorded {
        self.lock().clone()
    }

    /// The timeline as a self-contained SVG document. See [`Recorded::to_svg`].
    #[must_use]
    pub fn to_svg(&self) -> String {
        self.lock().to_svg()
    }
}

impl EventSink for Timeline {
    fn emit(&self, event: &Event) {
        self.record(event);
    }
}

impl Recorded {
    fn touch(&mut self, t: Time) {
        self.first = Some(self.first.map_or(t, |f| f.min(t)));
        self.last = Some(self.last.map_or(t, |l| l.max(t)));
    }

    fn track_mut(&mut self, node: &NodeName) -> &mut Track {
        let idx = match self.tracks.iter().position(|t| &t.node == node) {
            Some(i) => i,
            None => {
                self.tracks.push(Track {
                    node: node.clone(),
                    started: None,
                    segments: Vec::new(),
                    finished: None,
                    outcome: None,
                    cause: None,
                    marks: Vec::new(),
                });
                self.tracks.len() - 1
            }
        };
        &mut self.tracks[idx]
    }

    fn push_sample(&mut self, s: AvailabilitySample) {
        self.touch(s.at);
        let same = self.samples.last().is_some_and(|l| {
            l.ready == s.ready
                && l.total == s.total
                && l.worst == s.worst
                && l.below_floor == s.below_floor
        });
        if !same {
            self.samples.push(s);
        }
    }

    fn apply(&mut self, e: &Event) {
        let at = event_time(e);
        self.touch(at);
        match e {
            Event::RunStarted { .. } => {
                if self.run_started.is_none() {
                    self.run_started = Some(at);
                }
            }
            Event::NodeStarted { node, .. } => {
                let t = self.track_mut(node);
                t.started.get_or_insert(at);
                if t.segments.last().is_none_or(|s| s.to.is_some()) {
                    t.segments.push(Segment {
                        phase: Phase::Pending,
                        from: at,
                        to: None,
                        undone: false,
                    });
                }
            }
            Event::Phase { node, to, .. } => {
                let t = self.track_mut(node);
                t.started.get_or_insert(at);
                t.close(at);
                if *to == Phase::RollingBack {
                    t.mark_undone();
                }
                if !to.is_terminal() {
                    t.segments.push(Segment {
                        phase: *to,
                        from: at,
                        to: None,
                        undone: false,
                    });
                }
            }
            Event::Waiting { node, reason, .. } => {
                self.track_mut(node)
                    .mark(at, MarkKind::Waiting, reason.clone());
            }
            Event::EvictionBlocked { node, pod, pdb, .. } => {
                self.track_mut(node).mark(
                    at,
                    MarkKind::EvictionBlocked,
                    format!("eviction of {pod} blocked by budget {pdb}"),
                );
            }
            Event::NodeFinished {
                node,
                outcome,
                cause,
                ..
            } => {
                let t = self.track_mut(node);
                t.started.get_or_insert(at);
                t.close(at);
                t.finished = Some(at);
                t.outcome = Some(*outcome);
                t.cause.clone_from(cause);
                if *outcome != Phase::Done {
                    t.mark_undone();
                }
            }
            Event::Stopping { reason, .. } => self.stops.push(Stop {
                at,
                reason: reason.clone(),
            }),
            Event::NodeJoined { .. } | Event::Retrying { .. } | Event::Progress { .. } => {}
        }
    }

    /// The time the picture starts at: the run's start, or the first thing recorded.
    #[must_use]
    pub fn origin(&self) -> Time {
        self.run_started
            .or(self.first)
            .map_or(Time(0), |r| self.first.map_or(r, |f| r.min(f)))
    }

    /// The time the picture ends at (at least a second after [`Recorded::origin`]).
    #[must_use]
    pub fn end(&self) -> Time {
        let origin = self.origin();
        let last = self.last.unwrap_or(origin);
        if last.0 > origin.0 {
            last
        } else {
            Time(origin.0.saturating_add(1000))
        }
    }

    /// Nodes in flight (started, not finished) over time, as `(time, count)` steps from
    /// [`Recorded::origin`]: the count holds from its time until the next step.
    #[must_use]
    pub fn in_flight(&self) -> Vec<(Time, usize)> {
        let mut deltas: Vec<(Time, i64)> = Vec::new();
        for t in &self.tracks {
            if let Some(s) = t.started {
                deltas.push((s, 1));
                if let Some(f) = t.finished {
                    deltas.push((f.max(s), -1));
                }
            }
        }
        deltas.sort_unstable();
        let mut out = vec![(self.origin(), 0usize)];
        let mut count: i64 = 0;
        let mut i = 0;
        while i < deltas.len() {
            let at = deltas[i].0;
            while i < deltas.len() && deltas[i].0 == at {
                count += deltas[i].1;
                i += 1;
            }
            let c = usize::try_from(count.max(0)).unwrap_or(0);
            match out.last_mut() {
                Some(last) if last.0 == at => last.1 = c,
                _ => out.push((at, c)),
            }
        }
        out
    }
}

impl Track {
    fn close(&mut self, at: Time) {
        if let Some(s) = self.segments.last_mut()
            && s.to.is_none()
        {
            s.to = Some(at.max(s.from));
        }
    }

    fn mark_undone(&mut self) {
        for s in &mut self.segments {
            if s.phase != Phase::RollingBack {
                s.undone = true;
            }
        }
    }

    fn mark(&mut self, at: Time, kind: MarkKind, text: String) {
        if self.marks.len() < MAX_MARKS_PER_NODE {
            self.marks.push(Mark { at, kind, text });
        }
    }

    /// True when a rollback undid this node's progress (it rolled back or failed).
    #[must_use]
    pub fn rolled_back(&self) -> bool {
        matches!(self.outcome, Some(Phase::RolledBack | Phase::Failed))
            || self.segments.iter().any(|s| s.phase == Phase::RollingBack)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }

    fn phase(t: &Timeline, node: &str, from: Phase, to: Phase, at: u64) {
        t.emit(&Event::Phase {
            node: n(node),
            from,
            to,
            at: Time(at),
        });
    }

    #[test]
    fn phases_become_segments_and_rollbacks_mark_them_undone() {
        let t = Timeline::new();
        t.emit(&Event::RunStarted {
            nodes: 2,
            resumed: 0,
            at: Time(0),
        });
        t.emit(&Event::NodeStarted {
            node: n("a"),
            at: Time(10),
        });
        phase(&t, "a", Phase::Pending, Phase::Cordoned, 20);
        phase(&t, "a", Phase::Cordoned, Phase::Drained, 50);
        phase(&t, "a", Phase::Drained, Phase::RollingBack, 70);
        phase(&t, "a", Phase::RollingBack, Phase::RolledBack, 90);
        t.emit(&Event::NodeFinished {
            node: n("a"),
            outcome: Phase::RolledBack,
            cause: Some("agent never ready".into()),
            at: Time(90),
        });
        let r = t.snapshot();
        let a = &r.tracks[0];
        let phases: Vec<_> = a.segments.iter().map(|s| (s.phase, s.undone)).collect();
        assert_eq!(
            phases,
            vec![
                (Phase::Pending, true),
                (Phase::Cordoned, true),
                (Phase::Drained, true),
                (Phase::RollingBack, false),
            ]
        );
        assert!(a.segments.iter().all(|s| s.to.is_some()));
        assert_eq!(a.outcome, Some(Phase::RolledBack));
        assert!(a.rolled_back());
        assert_eq!(
            r.in_flight(),
            vec![(Time(0), 0), (Time(10), 1), (Time(90), 0)]
        );
    }

    #[test]
    fn a_resumed_node_starts_at_its_first_phase() {
        let t = Timeline::new();
        phase(&t, "b", Phase::Labelled, Phase::AgentRestarted, 5_000);
        let r = t.snapshot();
        assert_eq!(r.tracks[0].started, Some(Time(5_000)));
        assert_eq!(r.tracks[0].segments[0].phase, Phase::AgentRestarted);
    }

    #[test]
    fn budgets_are_summed_and_the_worst_kept() {
        let t = Timeline::new();
        let b = |pdb: &str, healthy, desired, expected| BudgetHealth {
            pdb: pdb.into(),
            healthy,
            desired,
            expected,
        };
        t.record_budgets(
            Time(1),
            &[
                b("x/web", 5, 5, 6),
                b("x/db", 1, 2, 3),
                b("x/none", 0, 0, 0),
            ],
        );
        t.record_budgets(Time(2), &[b("x/web", 5, 5, 6), b("x/db", 1, 2, 3)]);
        let r = t.snapshot();
        assert_eq!(
            r.samples.len(),
            1,
            "equal consecutive samples are kept once"
        );
        let s = &r.samples[0];
        assert_eq!((s.ready, s.total, s.below_floor), (6, 9, 1));
        assert_eq!(s.worst.as_ref().map(|w| w.pdb.as_str()), Some("x/db"));
    }
}
