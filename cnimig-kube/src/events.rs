//! Kubernetes Events (`events.k8s.io/v1`) on the Nodes the migration touches.
//!
//! The ports do not tell the adapter which step a call belongs to (a cordon can start a
//! migration or a rollback), but the orchestrator's progress [`Event`]s do. So Events come from
//! a [`KubeEventSink`] passed to `Orchestrator::run` (alone or beside another sink), which maps
//! each progress event with [`node_events`] and publishes it on the Node through
//! `kube::runtime::events::Recorder` (repeats become an event series). Reasons are PascalCase:
//! `NodeMigrationStarted`, `NodeCordoned`, `NodeDrained`, `NodeLabelled`, `CiliumAgentRestarted`,
//! `CiliumAgentReady`, `PodsRestarted`, `NodeVerified`, `NodeUncordoned`, `NodeRollingBack`,
//! `EvictionBlocked`, `NodeMigrated`, `NodeRolledBack`, `NodeMigrationFailed`.
//!
//! Events of cluster-scoped Nodes live in the `default` namespace (as kubelet's do).

use cnimig_core::events::{Event, EventSink};
use cnimig_core::machine::Phase;
use cnimig_core::model::NodeName;
use cnimig_core::ports::PortError;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event as KEvent, EventType, Recorder, Reporter};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::port_error;
use crate::{FIELD_MANAGER, KubeCluster};

/// One Event to publish on a Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEvent {
    /// The node.
    pub node: NodeName,
    /// PascalCase reason.
    pub reason: &'static str,
    /// Human-readable note.
    pub note: String,
    /// `Warning` rather than `Normal`.
    pub warning: bool,
}

/// The forward path of a migration, in order.
const FORWARD: [Phase; 9] = [
    Phase::Cordoned,
    Phase::Drained,
    Phase::Labelled,
    Phase::AgentRestarted,
    Phase::AgentReady,
    Phase::PodsRestarted,
    Phase::Verified,
    Phase::Uncordoned,
    Phase::Done,
];

fn phase_reason(p: Phase) -> Option<(&'static str, bool)> {
    Some(match p {
        Phase::Cordoned => ("NodeCordoned", false),
        Phase::Drained => ("NodeDrained", false),
        Phase::Labelled => ("NodeLabelled", false),
        Phase::AgentRestarted => ("CiliumAgentRestarted", false),
        Phase::AgentReady => ("CiliumAgentReady", false),
        Phase::Uncordoned => ("NodeUncordoned", false),
        Phase::PodsRestarted => ("PodsRestarted", false),
        Phase::Verified => ("NodeVerified", false),
        Phase::RollingBack => ("NodeRollingBack", true),
        // Terminal phases are reported by NodeFinished, with the cause.
        Phase::Pending | Phase::Done | Phase::RolledBack | Phase::Failed => return None,
    })
}

/// The Node Events for a progress event (pure). One `decide` can complete several steps at once
/// (the orchestrator then reports `from` the old phase `to` the last one), so a forward `Phase`
/// event yields one Node Event per step completed.
#[must_use]
pub fn node_events(e: &Event) -> Vec<NodeEvent> {
    let ev = |node: &NodeName, reason, note: String, warning| NodeEvent {
        node: node.clone(),
        reason,
        note,
        warning,
    };
    match e {
        Event::NodeStarted { node, .. } => vec![ev(
            node,
            "NodeMigrationStarted",
            "cnimig started migrating the node from Calico to Cilium".into(),
            false,
        )],
        Event::Phase { node, from, to, .. } => {
            let steps: Vec<Phase> = match (
                FORWARD.iter().position(|p| p == from),
                FORWARD.iter().position(|p| p == to),
            ) {
                (from_i, Some(to_i)) => {
                    let start = from_i.map_or(0, |i| i + 1);
                    FORWARD.get(start..=to_i).unwrap_or_default().to_vec()
                }
                _ => vec![*to],
            };
            steps
                .into_iter()
                .filter_map(|p| {
                    let (reason, warning) = phase_reason(p)?;
                    Some(ev(
                        node,
                        reason,
                        format!("migration step {p} done (was {from})"),
                        warning,
                    ))
                })
                .collect()
        }
        Event::EvictionBlocked { node, pod, pdb, .. } => vec![ev(
            node,
            "EvictionBlocked",
            format!("eviction of pod {pod} refused by PodDisruptionBudget {pdb}; retrying"),
            true,
        )],
        Event::NodeFinished {
            node,
            outcome,
            cause,
            ..
        } => {
            let cause = cause.clone().unwrap_or_default();
            vec![match outcome {
                Phase::Done => ev(
                    node,
                    "NodeMigrated",
                    "the node runs on Cilium".into(),
                    false,
                ),
                Phase::RolledBack => ev(
                    node,
                    "NodeRolledBack",
                    format!("the node is back on Calico: {cause}"),
                    true,
                ),
                _ => ev(
                    node,
                    "NodeMigrationFailed",
                    format!("the rollback did not finish, a person must look: {cause}"),
                    true,
                ),
            }]
        }
        _ => Vec::new(),
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

impl KubeCluster {
    fn recorder(&self) -> Recorder {
        Recorder::new(
            self.inner.client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: self.inner.opts.instance.clone(),
            },
        )
    }

    /// Publishes one Event on the Node (in namespace `default`).
    ///
    /// # RBAC
    /// `create`, `patch events.k8s.io/events`.
    ///
    /// # Errors
    /// Any write failure.
    pub async fn record_node_event(&self, e: &NodeEvent) -> Result<(), PortError> {
        publish(&self.recorder(), e).await
    }

    /// A sink that publishes the orchestrator's progress as Node Events in the background.
    /// Call inside a tokio runtime; [`KubeEventSink::close`] waits for the queue to drain.
    #[must_use]
    pub fn event_sink(&self) -> KubeEventSink {
        let (tx, mut rx) = mpsc::unbounded_channel::<NodeEvent>();
        let recorder = self.recorder();
        let worker = tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                if let Err(err) = publish(&recorder, &e).await {
                    tracing::warn!(node = %e.node, reason = e.reason, "could not publish Event: {err}");
                }
            }
        });
        KubeEventSink { tx, worker }
    }
}

async fn publish(recorder: &Recorder, e: &NodeEvent) -> Result<(), PortError> {
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(e.node.to_string()),
        ..ObjectReference::default()
    };
    let ev = KEvent {
        type_: if e.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: e.reason.into(),
        note: Some(truncate(e.note.clone(), 1000)),
        action: "Migrate".into(),
        secondary: None,
    };
    recorder.publish(&ev, &reference).await.map_err(|err| {
        port_error(
            "create",
            format!("event {} on node {}", e.reason, e.node),
            err,
        )
    })
}

/// Publishes the orchestrator's progress as Kubernetes Events on the Nodes (see the module
/// docs). Failures to publish are logged, never returned: Events are best effort.
#[derive(Debug)]
pub struct KubeEventSink {
    tx: mpsc::UnboundedSender<NodeEvent>,
    worker: JoinHandle<()>,
}

impl KubeEventSink {
    /// Stops accepting events and waits until the queued ones are published.
    pub async fn close(self) {
        drop(self.tx);
        let _ = self.worker.await;
    }
}

impl EventSink for KubeEventSink {
    fn emit(&self, event: &Event) {
        for e in node_events(event) {
            let _ = self.tx.send(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnimig_core::model::Time;

    #[test]
    fn progress_maps_to_pascal_case_reasons() {
        let n = NodeName::new("w1").unwrap();
        let reasons =
            |e: &Event| -> Vec<&'static str> { node_events(e).iter().map(|e| e.reason).collect() };
        assert_eq!(
            reasons(&Event::Phase {
                node: n.clone(),
                from: Phase::Pending,
                to: Phase::Cordoned,
                at: Time(0)
            }),
            vec!["NodeCordoned"]
        );
        // Several steps in one decision: one Event each; Done is left to NodeFinished.
        assert_eq!(
            reasons(&Event::Phase {
                node: n.clone(),
                from: Phase::AgentReady,
                to: Phase::Done,
                at: Time(0)
            }),
            vec!["PodsRestarted", "NodeVerified", "NodeUncordoned"]
        );
        assert_eq!(
            reasons(&Event::Phase {
                node: n.clone(),
                from: Phase::Drained,
                to: Phase::RollingBack,
                at: Time(0)
            }),
            vec!["NodeRollingBack"]
        );
        let e = node_events(&Event::NodeFinished {
            node: n.clone(),
            outcome: Phase::RolledBack,
            cause: Some("step Drain".into()),
            at: Time(0),
        });
        assert_eq!(e[0].reason, "NodeRolledBack");
        assert!(e[0].warning && e[0].note.contains("step Drain"));
        assert!(
            node_events(&Event::Retrying {
                what: "x".into(),
                at: Time(0)
            })
            .is_empty()
        );
    }
}
