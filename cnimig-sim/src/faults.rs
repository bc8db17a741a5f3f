//! Injected API errors, fault counting, and the write-ahead check.
//!
//! Every port call asks [`State::api_fault`] whether it fails. The answer comes from the fault
//! generator (seeded from the simulation's seed, apart from the timings' generator), so a seed
//! replays the same faults for the same sequence of calls.

use std::time::Duration;

use cnimig_core::machine::{NodeRecord, Phase, RollbackStep};
use cnimig_core::ports::PortError;
use rand::Rng;

use crate::observe::{FaultKind, OpKind};
use crate::state::State;

/// What a port call is, for the errors it may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    /// A read: 500, 503, 429, timeout.
    Read,
    /// A write: also 409, and timeouts after the write was applied.
    Write,
    /// The state store's compare-and-swap and the lock: a write, but never an injected 409 (their
    /// conflicts mean another writer).
    Exclusive,
}

/// The fault a call gets.
#[derive(Debug)]
pub(crate) enum Injected {
    /// None: the call behaves.
    None,
    /// The call fails before the server acts.
    Before(PortError),
    /// The server acts, then the caller sees this error (a timeout after the write landed).
    After(PortError),
}

impl Injected {
    /// The error to return before acting, if any.
    pub(crate) fn before(&self) -> Option<PortError> {
        match self {
            Injected::Before(e) => Some(e.clone()),
            Injected::None | Injected::After(_) => None,
        }
    }
    /// The call's result once the server has acted.
    pub(crate) fn after<T>(self, r: Result<T, PortError>) -> Result<T, PortError> {
        match (self, r) {
            (Injected::After(e), Ok(_)) => Err(e),
            (_, r) => r,
        }
    }
}

impl State {
    /// Counts a node or pod fault once per `target`.
    pub(crate) fn count_fault(&mut self, kind: FaultKind, target: String) {
        if self.fault_counted.insert((kind, target)) {
            *self.stats.faults_injected.entry(kind).or_default() += 1;
        }
    }

    fn count_api_fault(&mut self, kind: FaultKind) {
        *self.stats.faults_injected.entry(kind).or_default() += 1;
    }

    /// Whether the call `method` (already counted) fails, and how.
    pub(crate) fn api_fault(&mut self, method: &'static str, call: Call) -> Injected {
        if let Some(limit) = self.cut_off_after
            && self.stats.total_api_calls() > limit
        {
            return Injected::Before(PortError::Unavailable {
                what: method.to_string(),
                detail: "connection refused: this run was cut off from the cluster".into(),
            });
        }
        let f = &self.faults;
        if f.api_error_ppm == 0
            || (!f.api_error_methods.is_empty() && !f.api_error_methods.contains(method))
        {
            return Injected::None;
        }
        if self.fault_rng.random_range(0..1_000_000u32) >= f.api_error_ppm {
            return Injected::None;
        }
        let roll = self.fault_rng.random_range(0..100u32);
        let unavailable = |code: &str| PortError::Unavailable {
            what: method.to_string(),
            detail: format!("the API server answered {code} (injected)"),
        };
        let (kind, injected) = match roll {
            0..25 => (
                FaultKind::Api500,
                Injected::Before(unavailable("500 Internal Server Error")),
            ),
            25..50 => (
                FaultKind::Api503,
                Injected::Before(unavailable("503 Service Unavailable")),
            ),
            50..70 => (
                FaultKind::Api429,
                Injected::Before(PortError::Throttled {
                    retry_after: Duration::from_secs(1),
                }),
            ),
            70..85 if call == Call::Write => (
                FaultKind::Api409,
                Injected::Before(PortError::Conflict {
                    what: format!("{method} (injected 409: the object changed meanwhile)"),
                }),
            ),
            70..85 => (
                FaultKind::Api503,
                Injected::Before(unavailable("503 Service Unavailable")),
            ),
            _ => {
                let timeout = PortError::Timeout {
                    what: format!("{method} (injected)"),
                };
                if call != Call::Read && self.fault_rng.random_bool(0.5) {
                    (FaultKind::ApiTimeoutApplied, Injected::After(timeout))
                } else {
                    (FaultKind::ApiTimeout, Injected::Before(timeout))
                }
            }
        };
        self.count_api_fault(kind);
        injected
    }
}

/// Whether the persisted record (`annotation`) of a node justifies the operation `op` on it: the
/// orchestrator must save the record that leads to an action before taking the action, or
/// (`carried`) save it in the same write as the action.
///
/// The orchestrator keeps in memory the steps a resumed run finds complete by looking (drained,
/// agent restarted, agent ready, pods restarted, verified, uncordoned), so an operation is
/// justified by the last record that must be stored ahead of it:
/// - a drain's eviction by the record carried with the cordon (`Pending`, knowing whether the
///   node was cordoned before the run) or `Cordoned`;
/// - the label by `Drained`, the agent restart by `Drained` (the record the label carries) or
///   `Labelled`, naming the agent pod;
/// - moving pods still on Calico (evict, delete) by a record that names the replaced agent pod
///   and has not gone past verification (the one the label carries, in `Drained`);
/// - the uncordon by `Verified`, or by `Done` when the record lands in the same write (a
///   store that carries the uncordon writes the migrated node's last record with it);
/// - every rollback operation by the rollback step that does it.
pub(crate) fn write_ahead(
    annotation: Option<&str>,
    op: &OpKind,
    carried: bool,
) -> Result<(), String> {
    let Some(a) = annotation else {
        return Err("the node has no record".into());
    };
    let rec = NodeRecord::from_annotation(a).map_err(|e| e.to_string())?;
    let rb = rec
        .rollback
        .as_ref()
        .filter(|_| rec.phase == Phase::RollingBack);
    let rb_step = rb.map(|r| r.step);
    let draining =
        (rec.phase == Phase::Pending && rec.pre_cordoned.is_some()) || rec.phase == Phase::Cordoned;
    // `Uncordoned` only in a record of an older cnimig, which uncordoned before the pods moved.
    let agent_replaced = rec.agent_restarted_from.is_some()
        && matches!(
            rec.phase,
            Phase::Drained
                | Phase::Labelled
                | Phase::AgentRestarted
                | Phase::AgentReady
                | Phase::PodsRestarted
                | Phase::Uncordoned
        );
    let ok = match op {
        OpKind::Cordon => rec.phase == Phase::Pending || rb_step == Some(RollbackStep::Cordon),
        OpKind::Evict { .. } => {
            draining
                || agent_replaced
                || matches!(
                    rb_step,
                    Some(RollbackStep::DrainCilium | RollbackStep::Recycle)
                )
        }
        OpKind::Delete { .. } => agent_replaced || rb_step == Some(RollbackStep::Recycle),
        OpKind::Label { .. } => rec.phase == Phase::Drained,
        OpKind::RestartAgent { uid } => {
            (matches!(rec.phase, Phase::Drained | Phase::Labelled)
                && rec.agent_restarted_from.as_deref() == Some(uid))
                || rb.is_some_and(|r| {
                    r.step == RollbackStep::RestartAgent
                        && r.agent_restarted_from.as_deref() == Some(uid)
                })
        }
        OpKind::Uncordon => {
            rec.phase == Phase::Verified
                || (carried && rec.phase == Phase::Done && rec.pre_cordoned == Some(false))
                || rb_step == Some(RollbackStep::Uncordon)
        }
        OpKind::RestoreCni => rb_step == Some(RollbackStep::RestoreCni),
        OpKind::Unlabel { .. } => rb_step == Some(RollbackStep::Unlabel),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the record is in {:?}{}",
            rec.phase,
            rb_step
                .map(|s| format!(" at rollback step {s:?}"))
                .unwrap_or_default()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnimig_core::model::Time;

    #[test]
    fn write_ahead_needs_the_record_of_the_step() {
        let mut rec = NodeRecord::new(Time(0));
        assert!(write_ahead(None, &OpKind::Cordon, false).is_err());
        assert!(write_ahead(Some(&rec.to_annotation()), &OpKind::Cordon, false).is_ok());
        let label = OpKind::Label {
            key: "k".into(),
            value: "true".into(),
        };
        assert!(write_ahead(Some(&rec.to_annotation()), &label, false).is_err());
        rec.phase = Phase::Labelled;
        let restart = OpKind::RestartAgent { uid: "a".into() };
        assert!(write_ahead(Some(&rec.to_annotation()), &restart, false).is_err());
        rec.agent_restarted_from = Some("a".into());
        assert!(write_ahead(Some(&rec.to_annotation()), &restart, false).is_ok());
        // The record the label carries names the agent pod to replace.
        rec.phase = Phase::Drained;
        assert!(write_ahead(Some(&rec.to_annotation()), &restart, false).is_ok());
        let other = OpKind::RestartAgent { uid: "b".into() };
        assert!(write_ahead(Some(&rec.to_annotation()), &other, false).is_err());
        rec.phase = Phase::Cordoned;
        assert!(write_ahead(Some(&rec.to_annotation()), &restart, false).is_err());
        assert!(write_ahead(Some("garbage"), &OpKind::Cordon, false).is_err());
    }

    #[test]
    fn evictions_need_the_cordon_record_or_the_agent_restart() {
        let evict = OpKind::Evict {
            pod: "ns/p".into(),
            accepted: true,
            network: cnimig_core::model::PodNetwork::Calico,
        };
        let delete = OpKind::Delete {
            pod: "ns/d".into(),
            network: cnimig_core::model::PodNetwork::Calico,
        };
        let mut rec = NodeRecord::new(Time(0));
        // Before the cordon's record says whether the node was cordoned before the run.
        assert!(write_ahead(Some(&rec.to_annotation()), &evict, false).is_err());
        rec.pre_cordoned = Some(false);
        assert!(write_ahead(Some(&rec.to_annotation()), &evict, false).is_ok());
        assert!(write_ahead(Some(&rec.to_annotation()), &delete, false).is_err());
        // Labelled: nothing is evicted until the agent pod to replace is stored.
        rec.phase = Phase::Labelled;
        assert!(write_ahead(Some(&rec.to_annotation()), &evict, false).is_err());
        rec.agent_restarted_from = Some("a".into());
        assert!(write_ahead(Some(&rec.to_annotation()), &evict, false).is_ok());
        assert!(write_ahead(Some(&rec.to_annotation()), &delete, false).is_ok());
        // The record the label carries names it too: the pods move under it.
        rec.phase = Phase::Drained;
        assert!(write_ahead(Some(&rec.to_annotation()), &evict, false).is_ok());
        assert!(write_ahead(Some(&rec.to_annotation()), &delete, false).is_ok());
        rec.phase = Phase::Verified;
        assert!(write_ahead(Some(&rec.to_annotation()), &evict, false).is_err());
        rec.phase = Phase::Done;
        assert!(write_ahead(Some(&rec.to_annotation()), &evict, false).is_err());
        assert!(write_ahead(Some(&rec.to_annotation()), &delete, false).is_err());
    }

    #[test]
    fn the_uncordon_needs_the_verified_record_or_lands_with_the_last_one() {
        let mut rec = NodeRecord::new(Time(0));
        rec.pre_cordoned = Some(false);
        rec.agent_restarted_from = Some("a".into());
        for phase in [Phase::Drained, Phase::AgentReady, Phase::PodsRestarted] {
            rec.phase = phase;
            assert!(
                write_ahead(Some(&rec.to_annotation()), &OpKind::Uncordon, true).is_err(),
                "{phase:?}"
            );
        }
        rec.phase = Phase::Verified;
        assert!(write_ahead(Some(&rec.to_annotation()), &OpKind::Uncordon, false).is_ok());
        // Done saved ahead of the uncordon would leave the node cordoned if the run died
        // between the two: only a write that carries both may say Done.
        rec.phase = Phase::Done;
        assert!(write_ahead(Some(&rec.to_annotation()), &OpKind::Uncordon, false).is_err());
        assert!(write_ahead(Some(&rec.to_annotation()), &OpKind::Uncordon, true).is_ok());
        // Never for a node a person had cordoned.
        rec.pre_cordoned = Some(true);
        assert!(write_ahead(Some(&rec.to_annotation()), &OpKind::Uncordon, true).is_err());
    }
}
