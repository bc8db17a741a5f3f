//! The per-node state machine, as pure transitions.
//!
//! ```text
//! Pending → Cordoned → Drained → Labelled → AgentRestarted → AgentReady → PodsRestarted
//!         → Verified → Uncordoned → Done
//! any step fails or times out → RollingBack → RolledBack   (or Failed, if the rollback itself
//!                                                            cannot finish: a person must look)
//! ```
//!
//! A [`NodeRecord`] holds the node's phase (the last step that is complete) and what the machine
//! must remember across a crash: whether the node was cordoned before the run, and which agent
//! pod it restarted. It serialises to the compact JSON kept in the node annotation
//! [`STATE_ANNOTATION`].
//!
//! [`decide`] takes the record, an [`Observation`] of the node and `now`, advances the record
//! through every step the observation shows complete, and returns the next [`Action`]. The caller
//! persists the new record *before* acting, so that a run killed at any point resumes from what
//! the cluster holds and never repeats a completed, disruptive step.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{OwnerKind, Pod, PodNetwork, PodRef, Time};
use crate::ports::{AgentObservation, CniDirState, NodeView, Verification};

/// The node annotation that holds a node's [`NodeRecord`].
pub const STATE_ANNOTATION: &str = "cnimig.io/migration";

/// The last completed step of a node's migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Nothing done yet.
    Pending,
    /// `spec.unschedulable` is set (by us, or before the run).
    Cordoned,
    /// No drainable pod is left on the node.
    Drained,
    /// The migration label is on the node.
    Labelled,
    /// The Cilium agent pod was replaced.
    AgentRestarted,
    /// The new agent is Ready and resolved the node config (Cilium owns the CNI config).
    AgentReady,
    /// No pod on the node uses Calico any more.
    PodsRestarted,
    /// The verifier found the node healthy (the node is still cordoned: nothing new lands on a
    /// node before its verification passed).
    Verified,
    /// The node is schedulable again (skipped for nodes cordoned before the run).
    Uncordoned,
    /// Migrated.
    Done,
    /// Undoing the node's migration.
    RollingBack,
    /// Back on Calico, as it was.
    RolledBack,
    /// The rollback could not finish; a person must look (the record says why).
    Failed,
}

impl Phase {
    /// True for phases a node ends in.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Done | Phase::RolledBack | Phase::Failed)
    }
    /// True while the node's drain may still disrupt PDB-covered pods.
    #[must_use]
    pub fn is_draining(self) -> bool {
        matches!(self, Phase::Pending | Phase::Cordoned)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The steps of a rollback, in order. Each is skipped when the observation shows it is not needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RollbackStep {
    /// Cordon, so nothing new lands on the node while it changes back.
    Cordon,
    /// Evict the drainable pods that already run on Cilium.
    DrainCilium,
    /// Restore Calico's CNI config in `/etc/cni/net.d`.
    RestoreCni,
    /// Remove the migration label.
    Unlabel,
    /// Restart the agent so it drops the node config.
    RestartAgent,
    /// Recycle the remaining Cilium pods (DaemonSet pods) onto Calico.
    Recycle,
    /// Uncordon, unless the node was cordoned before the run.
    Uncordon,
}

/// A rollback in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    /// The phase the node had reached when it failed.
    pub failed_after: Phase,
    /// One line: the step and the cause.
    pub cause: String,
    /// The rollback step under way.
    pub step: RollbackStep,
    /// When the current rollback step started.
    pub step_since: Time,
    /// The agent pod we restarted during rollback, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_restarted_from: Option<String>,
    /// Since when the rollback has seen the node NotReady without a Ready look between.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready_since: Option<Time>,
}

/// What the machine remembers about one node, persisted in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Last completed step.
    pub phase: Phase,
    /// When `phase` was entered.
    pub since: Time,
    /// When the node's migration started.
    pub started: Time,
    /// Whether the node was cordoned before the run (then it stays cordoned). `None` until known.
    #[serde(default)]
    pub pre_cordoned: Option<bool>,
    /// The agent pod UID we deleted to restart the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_restarted_from: Option<String>,
    /// Set while rolling back, and kept afterwards for the report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<Rollback>,
    /// Verification problems seen so far in the current verification window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_problem: Option<String>,
}

/// A stored record that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the {STATE_ANNOTATION} annotation holds {value:?}, which is not a cnimig node record ({detail}); if no cnimig run owns it, remove the annotation"
)]
pub struct BadRecord {
    /// The stored text.
    pub value: String,
    /// The parser's complaint.
    pub detail: String,
}

impl NodeRecord {
    /// A fresh record for a node about to start.
    #[must_use]
    pub fn new(now: Time) -> Self {
        NodeRecord {
            phase: Phase::Pending,
            since: now,
            started: now,
            pre_cordoned: None,
            agent_restarted_from: None,
            rollback: None,
            last_problem: None,
        }
    }
    /// The annotation value.
    #[must_use]
    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
    /// Parses an annotation value.
    ///
    /// # Errors
    /// [`BadRecord`] when `value` is not a record.
    pub fn from_annotation(value: &str) -> Result<Self, BadRecord> {
        serde_json::from_str(value).map_err(|e| BadRecord {
            value: value.to_string(),
            detail: e.to_string(),
        })
    }
    fn enter(&mut self, phase: Phase, now: Time) {
        self.phase = phase;
        self.since = now;
        self.last_problem = None;
    }
    /// [`enter`](Self::enter), keeping `since` for a phase timed from the one before
    /// ([`keeps_since`]).
    fn advance(&mut self, phase: Phase, now: Time) {
        let since = self.since;
        self.enter(phase, now);
        if keeps_since(phase) {
            self.since = since;
        }
    }
}

/// Per-step limits and drain options the machine needs from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepConfig {
    /// The migration label key (value `"true"`).
    pub label: String,
    /// The `CiliumNodeConfig` name the agent must have resolved.
    pub node_config: String,
    /// Drain limit.
    pub drain_timeout: Duration,
    /// Limit for every other step (each rollback step gets [`rollback_step_limit`]).
    pub step_timeout: Duration,
    /// Evict pods with emptyDir volumes.
    pub delete_emptydir_data: bool,
    /// Evict pods without a controller.
    pub evict_unmanaged_pods: bool,
    /// A node rolling back that stays NotReady this long ends [`Phase::Failed`] (nothing on it
    /// can change back while its kubelet is gone: the CNI restore's helper pod cannot run, pods
    /// cannot restart), naming the node, the rollback step and the cause, rather than spending
    /// every remaining step's limit. By default a rollback step's limit
    /// ([`rollback_step_limit`]: the drain timeout plus the step timeout), counted across steps,
    /// so a node whose kubelet comes back within it still rolls back.
    pub rollback_not_ready_limit: Duration,
}

impl From<&crate::config::MigrationConfig> for StepConfig {
    fn from(c: &crate::config::MigrationConfig) -> Self {
        StepConfig {
            label: c.migration_label.clone(),
            node_config: c.node_config_name.clone(),
            drain_timeout: c.drain_timeout,
            step_timeout: c.step_timeout,
            delete_emptydir_data: c.delete_emptydir_data,
            evict_unmanaged_pods: c.evict_unmanaged_pods,
            rollback_not_ready_limit: c.drain_timeout.saturating_add(c.step_timeout),
        }
    }
}

/// One look at a node, assembled by the orchestrator from the ports.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// The node and its pods.
    pub view: &'a NodeView,
    /// The Cilium agent on the node.
    pub agent: Option<&'a AgentObservation>,
    /// The node's CNI config directory.
    pub cni: CniDirState,
}

impl Observation<'_> {
    fn labelled(&self, cfg: &StepConfig) -> bool {
        self.view
            .node
            .labels
            .get(&cfg.label)
            .is_some_and(|v| v == "true")
    }
    fn unschedulable(&self) -> bool {
        self.view.node.unschedulable
    }
    fn drainable(&self) -> impl Iterator<Item = &Pod> {
        self.view.pods.iter().filter(|p| p.is_drainable())
    }
}

/// What the orchestrator must do next for a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Set `spec.unschedulable`.
    Cordon,
    /// Evict these pods (UID preconditions); refusals are retried on the next look.
    Evict(Vec<PodRef>),
    /// Put the migration label on the node.
    Label,
    /// Delete the agent pod with this UID.
    RestartAgent(String),
    /// Clear `spec.unschedulable`.
    Uncordon,
    /// Move pods still on the wrong network: evict those a budget may cover, delete DaemonSet pods.
    Recycle {
        /// To evict.
        evict: Vec<PodRef>,
        /// To delete.
        delete: Vec<PodRef>,
    },
    /// Run the verifier and report with [`on_verification`].
    Verify,
    /// Restore Calico's CNI config on the node.
    RestoreCni,
    /// Remove the migration label.
    Unlabel,
    /// Nothing to do until the node changes; the string says what we wait for.
    Wait(String),
    /// The node is in a terminal phase.
    Finished,
}

/// The result of [`decide`]: the record to persist (if it changed) and the action to take after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The new record; the orchestrator persists it before acting whenever a resumed run could not
    /// see the step for itself.
    pub record: NodeRecord,
    /// True when `record` differs from the input.
    pub changed: bool,
    /// Every phase entered on the way, in order (several when one look shows several steps
    /// complete), so progress reports miss none.
    pub entered: Vec<Phase>,
    /// What to do.
    pub action: Action,
}

/// Fails the node into rollback; the decision loop goes straight on with the first rollback step.
fn failed(rec: &mut NodeRecord, cause: String, now: Time) -> Step {
    fail(rec, cause, now);
    Step::Advance(Phase::RollingBack)
}

fn fail(rec: &mut NodeRecord, cause: String, now: Time) {
    rec.rollback = Some(Rollback {
        failed_after: rec.phase,
        cause,
        step: RollbackStep::Cordon,
        step_since: now,
        agent_restarted_from: None,
        not_ready_since: None,
    });
    rec.enter(Phase::RollingBack, now);
}

/// Advances `record` through every step `obs` shows complete and returns the next action.
///
/// Pure: no IO, no clock. Timeouts are judged from `now` and the record's timestamps.
#[must_use]
pub fn decide(record: &NodeRecord, obs: &Observation<'_>, cfg: &StepConfig, now: Time) -> Decision {
    let mut rec = record.clone();
    let mut entered = Vec::new();
    let action = loop {
        match step(&mut rec, obs, cfg, now) {
            Step::Advance(p) => {
                rec.advance(p, now);
                entered.push(p);
            }
            Step::Act(a) => break a,
        }
    };
    let changed = &rec != record;
    Decision {
        record: rec,
        changed,
        entered,
        action,
    }
}

enum Step {
    Advance(Phase),
    Act(Action),
}

/// Phases timed from the agent's restart request (the record naming the pod to replace, which the
/// label carries) rather than from the look that entered them, so that a resumed run, which
/// cannot know when that look would have come, times them the same way, and no step after the
/// label needs a record write of its own:
/// - [`Phase::AgentRestarted`]: the old pod's termination is part of the agent's step;
/// - [`Phase::AgentReady`], [`Phase::PodsRestarted`] and [`Phase::Verified`]: the pods' restart and
///   the verification each get one more step limit from there ([`restart_pods_limit`],
///   [`verify_limit`]).
#[must_use]
pub fn keeps_since(p: Phase) -> bool {
    matches!(
        p,
        Phase::AgentRestarted | Phase::AgentReady | Phase::PodsRestarted | Phase::Verified
    )
}

/// How long after the agent's restart request (see [`keeps_since`]) a node may take to have no
/// pod left on Calico: twice the step limit, so the pods' restart still has at least one step
/// limit after an agent restart that took its whole one.
#[must_use]
pub fn restart_pods_limit(cfg: &StepConfig) -> Duration {
    cfg.step_timeout.saturating_mul(2)
}

/// How long after the agent's restart request (see [`keeps_since`]) a node may take to pass
/// verification: three times the step limit, so the verification still has at least one step
/// limit after an agent restart and a pod restart that each took their whole one.
#[must_use]
pub fn verify_limit(cfg: &StepConfig) -> Duration {
    cfg.step_timeout.saturating_mul(3)
}

/// The record the uncordon of a verified node carries when the store writes both in one request
/// ([`crate::ports::StateStore::save_with`]): the node is then migrated, so the record says
/// [`Phase::Done`] and no write of its own follows. `None` for any other record (a store that
/// cannot carry the uncordon saves the [`Phase::Verified`] record before it, and the next look
/// finds the node uncordoned and writes `Done`).
#[must_use]
pub fn uncordoned_record(record: &NodeRecord, now: Time) -> Option<NodeRecord> {
    if record.phase != Phase::Verified {
        return None;
    }
    let mut rec = record.clone();
    rec.enter(Phase::Done, now);
    Some(rec)
}

/// The agent is Ready with the node config and Cilium's CNI config is written.
fn agent_ok(obs: &Observation<'_>, cfg: &StepConfig) -> bool {
    obs.agent
        .is_some_and(|a| a.ready && a.node_config.as_deref() == Some(cfg.node_config.as_str()))
        && obs.cni.cilium_conflist
}

fn timed_out(rec: &NodeRecord, limit: Duration, now: Time) -> bool {
    now.since(rec.since) > limit
}

fn step(rec: &mut NodeRecord, obs: &Observation<'_>, cfg: &StepConfig, now: Time) -> Step {
    match rec.phase {
        Phase::Pending => {
            if rec.pre_cordoned.is_none() {
                rec.pre_cordoned = Some(obs.unschedulable());
            }
            if obs.unschedulable() {
                Step::Advance(Phase::Cordoned)
            } else {
                // The record the cordon carries is timed from the cordon: a resumed run that
                // finds the node cordoned times its drain from it.
                rec.since = now;
                Step::Act(Action::Cordon)
            }
        }
        Phase::Cordoned => drain(rec, obs, cfg, now),
        Phase::Drained => {
            if obs.labelled(cfg) {
                Step::Advance(Phase::Labelled)
            } else {
                // The agent pod to replace goes in the record the label carries (one write, not
                // a label and then the pod): it is the pod on the node now, which started before
                // the label and so without the node config. (Were it replaced by someone else
                // between this look and the label, its successor might have started without the
                // label too; the next step then times out naming the node config the agent
                // resolved, and the node rolls back.)
                rec.agent_restarted_from = obs.agent.map(|a| a.pod_uid.clone());
                Step::Act(Action::Label)
            }
        }
        Phase::Labelled => match (obs.agent, rec.agent_restarted_from.as_deref()) {
            (Some(a), Some(old)) if a.pod_uid != old => Step::Advance(Phase::AgentRestarted),
            (Some(a), _) => {
                if timed_out(rec, cfg.step_timeout, now) {
                    return failed(
                        rec,
                        format!(
                            "step RestartAgent: agent pod {} was not replaced within {:?}",
                            a.pod_uid, cfg.step_timeout
                        ),
                        now,
                    );
                }
                if rec.agent_restarted_from.is_none() {
                    // The agent's step is timed from the restart request (a resumed run may
                    // make it long after the label).
                    rec.since = now;
                }
                rec.agent_restarted_from = Some(a.pod_uid.clone());
                Step::Act(Action::RestartAgent(a.pod_uid.clone()))
            }
            (None, _) => {
                if timed_out(rec, cfg.step_timeout, now) {
                    return failed(
                        rec,
                        format!(
                            "step RestartAgent: no Cilium agent pod on the node for {:?}",
                            cfg.step_timeout
                        ),
                        now,
                    );
                }
                Step::Act(Action::Wait(
                    "waiting for the Cilium agent pod to be scheduled".into(),
                ))
            }
        },
        Phase::AgentRestarted => {
            if agent_ok(obs, cfg) {
                return Step::Advance(Phase::AgentReady);
            }
            if timed_out(rec, cfg.step_timeout, now) {
                let why = match obs.agent {
                    None => "no agent pod".to_string(),
                    Some(a) if !a.ready => format!("agent {} not Ready", a.pod_uid),
                    Some(a) if a.node_config.as_deref() != Some(cfg.node_config.as_str()) => {
                        format!(
                            "agent {} resolved node config {:?}, not {:?}",
                            a.pod_uid, a.node_config, cfg.node_config
                        )
                    }
                    Some(_) => "05-cilium.conflist not written".to_string(),
                };
                return failed(
                    rec,
                    format!("step AgentReady: {why} after {:?}", cfg.step_timeout),
                    now,
                );
            }
            Step::Act(Action::Wait(
                "waiting for the new Cilium agent to become Ready with the node config".into(),
            ))
        }
        Phase::AgentReady => recycle(
            rec,
            obs,
            now,
            restart_pods_limit(cfg),
            PodNetwork::Calico,
            Phase::PodsRestarted,
        ),
        Phase::PodsRestarted => {
            // The agent was Ready with the node config when the node got here; the node may
            // have gone NotReady since (a node that is not Ready keeps no Ready agent).
            if agent_ok(obs, cfg) {
                return Step::Act(Action::Verify);
            }
            if timed_out(rec, verify_limit(cfg), now) {
                return failed(
                    rec,
                    format!(
                        "step Verify: the Cilium agent stopped being Ready with the node config and did not recover within {:?} of its restart",
                        verify_limit(cfg)
                    ),
                    now,
                );
            }
            Step::Act(Action::Wait(
                "waiting for the Cilium agent to be Ready again before verifying".into(),
            ))
        }
        Phase::Verified => {
            // Uncordoning would schedule pods onto a node without a working CNI: if the agent
            // stopped being Ready since the verification, verify again (within the same limit).
            if !agent_ok(obs, cfg) {
                Step::Advance(Phase::PodsRestarted)
            } else if rec.pre_cordoned == Some(true) || !obs.unschedulable() {
                Step::Advance(Phase::Uncordoned)
            } else {
                Step::Act(Action::Uncordon)
            }
        }
        // Only a record written by an older cnimig, which uncordoned before the pods' restart,
        // stays here: move what is left on Calico, then the node is done.
        Phase::Uncordoned => recycle(
            rec,
            obs,
            now,
            cfg.step_timeout,
            PodNetwork::Calico,
            Phase::Done,
        ),
        Phase::Done | Phase::RolledBack | Phase::Failed => Step::Act(Action::Finished),
        Phase::RollingBack => rollback_step(rec, obs, cfg, now),
    }
}

/// Evicts the node's drainable pods, as `kubectl drain` does: those there when the node was
/// cordoned (the record entered `Cordoned` at `rec.since`, just after the cordon was seen). A pod
/// created later (it tolerates the cordon, or names the node) is not chased, which would only
/// evict each replacement in turn until the drain timed out: it starts on Calico and is moved
/// with the node's other Calico pods after the agent restart (`PodsRestarted`, budgets
/// honoured). A pod whose creation time is unknown is evicted.
fn drain(rec: &mut NodeRecord, obs: &Observation<'_>, cfg: &StepConfig, now: Time) -> Step {
    let mut to_evict = Vec::new();
    let mut remaining = 0usize;
    let cordoned_at = rec.since;
    let present = |p: &&Pod| p.created.is_none_or(|c| c <= cordoned_at);
    for p in obs.drainable().filter(present) {
        remaining += 1;
        if p.terminating {
            continue;
        }
        if p.empty_dir && !cfg.delete_emptydir_data {
            return failed(
                rec,
                format!(
                    "step Drain: pod {} uses emptyDir and deleteEmptydirData is off",
                    p.pod
                ),
                now,
            );
        }
        if p.owner == OwnerKind::None && !cfg.evict_unmanaged_pods {
            return failed(
                rec,
                format!(
                    "step Drain: pod {} has no controller and evictUnmanagedPods is off",
                    p.pod
                ),
                now,
            );
        }
        to_evict.push(p.pod.clone());
    }
    if remaining == 0 {
        return Step::Advance(Phase::Drained);
    }
    if timed_out(rec, cfg.drain_timeout, now) {
        let what = rec
            .last_problem
            .clone()
            .unwrap_or_else(|| format!("{remaining} pod(s) still on the node"));
        return failed(
            rec,
            format!(
                "step Drain: not finished after {:?}: {what}",
                cfg.drain_timeout
            ),
            now,
        );
    }
    if to_evict.is_empty() {
        Step::Act(Action::Wait(format!(
            "waiting for {remaining} evicted pod(s) to terminate"
        )))
    } else {
        Step::Act(Action::Evict(to_evict))
    }
}

/// Pods on the node still on `wrong` that use the pod network and can be moved.
fn misplaced<'a>(obs: &'a Observation<'_>, wrong: PodNetwork) -> impl Iterator<Item = &'a Pod> {
    obs.view
        .pods
        .iter()
        .filter(move |p| p.uses_pod_network() && !p.mirror && p.network == wrong)
}

fn recycle(
    rec: &mut NodeRecord,
    obs: &Observation<'_>,
    now: Time,
    limit: Duration,
    wrong: PodNetwork,
    next: Phase,
) -> Step {
    let (mut evict, mut delete) = (Vec::new(), Vec::new());
    let mut remaining = 0usize;
    for p in misplaced(obs, wrong) {
        remaining += 1;
        if p.terminating {
            continue;
        }
        if p.owner == OwnerKind::DaemonSet {
            delete.push(p.pod.clone());
        } else {
            evict.push(p.pod.clone());
        }
    }
    if remaining == 0 {
        return Step::Advance(next);
    }
    if timed_out(rec, limit, now) {
        let what = rec
            .last_problem
            .clone()
            .unwrap_or_else(|| format!("{remaining} pod(s) still on {wrong:?}"));
        return failed(
            rec,
            format!("step RestartPods: not finished after {limit:?}: {what}"),
            now,
        );
    }
    if evict.is_empty() && delete.is_empty() {
        Step::Act(Action::Wait(format!(
            "waiting for {remaining} pod(s) to restart off {wrong:?}"
        )))
    } else {
        Step::Act(Action::Recycle { evict, delete })
    }
}

/// Feeds a verification result back to a node in [`Phase::PodsRestarted`]. Unhealthy results are
/// retried until [`verify_limit`] after the agent's restart request, then the node rolls back
/// naming the problems.
#[must_use]
pub fn on_verification(
    record: &NodeRecord,
    result: &Verification,
    cfg: &StepConfig,
    now: Time,
) -> NodeRecord {
    let mut rec = record.clone();
    if rec.phase != Phase::PodsRestarted {
        return rec;
    }
    match result {
        Verification::Healthy => rec.advance(Phase::Verified, now),
        Verification::Unhealthy(problems) => {
            let text = problems.join("; ");
            if timed_out(&rec, verify_limit(cfg), now) {
                fail(&mut rec, format!("step Verify: {text}"), now);
            } else {
                rec.last_problem = Some(text);
            }
        }
    }
    rec
}

/// Records a problem the orchestrator met while acting (e.g. the budget blocking an eviction),
/// so that a timeout names it.
#[must_use]
pub fn with_problem(record: &NodeRecord, problem: String) -> NodeRecord {
    let mut rec = record.clone();
    rec.last_problem = Some(problem);
    rec
}

/// Starts a rollback from any non-terminal phase (e.g. on an operator's request or a fault the
/// orchestrator saw).
#[must_use]
pub fn start_rollback(record: &NodeRecord, cause: String, now: Time) -> NodeRecord {
    let mut rec = record.clone();
    if !rec.phase.is_terminal() && rec.phase != Phase::RollingBack {
        fail(&mut rec, cause, now);
    }
    rec
}

/// How long one rollback step may take before the node ends [`Phase::Failed`]: a drain plus a step.
/// A rollback's drain may have to wait for another node in flight to give its capacity back (it
/// uncordons at the latest when its own step times out), and a node given up on is left
/// half-migrated for a person, so the rollback is given longer than any forward step.
#[must_use]
pub fn rollback_step_limit(cfg: &StepConfig) -> Duration {
    cfg.drain_timeout.saturating_add(cfg.step_timeout)
}

fn rollback_step(rec: &mut NodeRecord, obs: &Observation<'_>, cfg: &StepConfig, now: Time) -> Step {
    let Some(rb) = rec.rollback.clone() else {
        // A RollingBack record without its details cannot be trusted: stop for a person.
        rec.rollback = Some(Rollback {
            failed_after: Phase::Pending,
            cause: "record in RollingBack without rollback details".into(),
            step: RollbackStep::Uncordon,
            step_since: now,
            agent_restarted_from: None,
            not_ready_since: None,
        });
        return Step::Advance(Phase::Failed);
    };
    let set_step = |rec: &mut NodeRecord, s: RollbackStep| {
        if let Some(r) = rec.rollback.as_mut() {
            r.step = s;
            r.step_since = now;
        }
    };
    // A node whose kubelet is gone cannot change back: give up on it after the limit, saying so.
    if obs.view.node.ready {
        if rb.not_ready_since.is_some()
            && let Some(r) = rec.rollback.as_mut()
        {
            r.not_ready_since = None;
        }
    } else {
        let since = rb.not_ready_since.unwrap_or(now);
        if now.since(since) > cfg.rollback_not_ready_limit {
            if let Some(r) = rec.rollback.as_mut() {
                r.cause = format!(
                    "node {} NotReady for more than {:?} during rollback step {:?}, so it cannot be changed back to Calico (rolling back after: {})",
                    obs.view.node.name, cfg.rollback_not_ready_limit, rb.step, r.cause
                );
                r.not_ready_since = Some(since);
            }
            return Step::Advance(Phase::Failed);
        }
        if rb.not_ready_since.is_none()
            && let Some(r) = rec.rollback.as_mut()
        {
            r.not_ready_since = Some(now);
        }
    }
    if now.since(rb.step_since) > rollback_step_limit(cfg) {
        if let Some(r) = rec.rollback.as_mut() {
            r.cause = format!("{}; rollback step {:?} did not finish", r.cause, rb.step);
        }
        return Step::Advance(Phase::Failed);
    }
    match rb.step {
        RollbackStep::Cordon => {
            if obs.unschedulable() {
                set_step(rec, RollbackStep::DrainCilium);
                rollback_step(rec, obs, cfg, now)
            } else {
                Step::Act(Action::Cordon)
            }
        }
        // A pod already terminating counts as gone in a rollback: it is leaving the node, its
        // budget already paid for it, and one that ignores its grace period must not keep the
        // node from getting back to Calico. As in the drain, a pod created after this step
        // began is not chased: the Recycle step moves it once Calico's config is back.
        RollbackStep::DrainCilium => {
            let evict: Vec<PodRef> = obs
                .drainable()
                .filter(|p| p.network == PodNetwork::Cilium && !p.terminating)
                .filter(|p| p.created.is_none_or(|c| c <= rb.step_since))
                .map(|p| p.pod.clone())
                .collect();
            if evict.is_empty() {
                set_step(rec, RollbackStep::RestoreCni);
                return rollback_step(rec, obs, cfg, now);
            }
            Step::Act(Action::Evict(evict))
        }
        RollbackStep::RestoreCni => {
            if obs.cni == CniDirState::CALICO {
                set_step(rec, RollbackStep::Unlabel);
                rollback_step(rec, obs, cfg, now)
            } else {
                Step::Act(Action::RestoreCni)
            }
        }
        RollbackStep::Unlabel => {
            if obs.view.node.labels.contains_key(&cfg.label) {
                Step::Act(Action::Unlabel)
            } else {
                set_step(rec, RollbackStep::RestartAgent);
                rollback_step(rec, obs, cfg, now)
            }
        }
        RollbackStep::RestartAgent => match obs.agent {
            // Done when the agent no longer carries the node config (a fresh agent, or one that
            // never resolved it). Readiness is not needed: Calico's CNI config is back in place.
            Some(a) if a.node_config.as_deref() != Some(cfg.node_config.as_str()) => {
                set_step(rec, RollbackStep::Recycle);
                rollback_step(rec, obs, cfg, now)
            }
            // No agent pod at all (none was ever scheduled, or the one we deleted is gone and
            // its replacement not created yet): nothing holds the node config, and an agent
            // created from now on starts without the label. Waiting here would never end on a
            // node where the agent cannot be scheduled.
            None => {
                set_step(rec, RollbackStep::Recycle);
                rollback_step(rec, obs, cfg, now)
            }
            Some(a) => {
                // Either the agent we have not restarted yet, or a fresh one that resolved the
                // config again (the label was still there when it started): restart it.
                if let Some(r) = rec.rollback.as_mut() {
                    r.agent_restarted_from = Some(a.pod_uid.clone());
                }
                Step::Act(Action::RestartAgent(a.pod_uid.clone()))
            }
        },
        RollbackStep::Recycle => {
            // An agent that still had the node config could write Cilium's CNI config until it
            // was replaced (it turned Ready after the restore step looked): restore it again
            // before recycling pods onto Calico.
            if obs.cni != CniDirState::CALICO {
                set_step(rec, RollbackStep::RestoreCni);
                return rollback_step(rec, obs, cfg, now);
            }
            let (mut evict, mut delete) = (Vec::new(), Vec::new());
            for p in misplaced(obs, PodNetwork::Cilium).filter(|p| !p.terminating) {
                if p.owner == OwnerKind::DaemonSet {
                    delete.push(p.pod.clone())
                } else {
                    evict.push(p.pod.clone())
                }
            }
            if evict.is_empty() && delete.is_empty() {
                set_step(rec, RollbackStep::Uncordon);
                return rollback_step(rec, obs, cfg, now);
            }
            Step::Act(Action::Recycle { evict, delete })
        }
        RollbackStep::Uncordon => {
            if rec.pre_cordoned == Some(true) || !obs.unschedulable() {
                Step::Advance(Phase::RolledBack)
            } else {
                Step::Act(Action::Uncordon)
            }
        }
    }
}

#[cfg(test)]
mod tests;
