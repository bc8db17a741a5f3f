//! Progress events: what the orchestrator tells an embedder while it runs.
//!
//! Pass any [`EventSink`] (a closure works) to
//! [`Orchestrator::run`](crate::orchestrator::Orchestrator::run), or use [`channel`] to consume
//! the events as a `futures::Stream`.

use serde::Serialize;

use crate::machine::Phase;
use crate::model::{NodeName, Time};

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub enum Event {
    /// The run holds the lock and is about to touch nodes.
    RunStarted {
        /// Nodes in scope.
        nodes: usize,
        /// Nodes resumed from an earlier run.
        resumed: usize,
        /// When.
        at: Time,
    },
    /// A node started its migration.
    NodeStarted {
        /// Node.
        node: NodeName,
        /// When.
        at: Time,
    },
    /// A node completed a step.
    Phase {
        /// Node.
        node: NodeName,
        /// The phase it left.
        from: Phase,
        /// The phase it entered.
        to: Phase,
        /// When.
        at: Time,
    },
    /// A node waits for something (emitted when the reason changes).
    Waiting {
        /// Node.
        node: NodeName,
        /// What it waits for.
        reason: String,
        /// When.
        at: Time,
    },
    /// An eviction was refused by a PodDisruptionBudget (emitted when the blocker changes).
    EvictionBlocked {
        /// Node being drained.
        node: NodeName,
        /// `namespace/name` of the pod.
        pod: String,
        /// `namespace/name` of the budget.
        pdb: String,
        /// When.
        at: Time,
    },
    /// A node reached a terminal phase.
    NodeFinished {
        /// Node.
        node: NodeName,
        /// `Done`, `RolledBack` or `Failed`.
        outcome: Phase,
        /// For rollbacks: the step and the cause, in one line.
        cause: Option<String>,
        /// When.
        at: Time,
    },
    /// A node joined the cluster during the run.
    NodeJoined {
        /// Node.
        node: NodeName,
        /// Whether it was added to the run (scope `All`) or only reported.
        migrating: bool,
        /// When.
        at: Time,
    },
    /// A port call failed transiently and will be retried.
    Retrying {
        /// What failed.
        what: String,
        /// When.
        at: Time,
    },
    /// No new node will start; nodes in flight finish.
    Stopping {
        /// Why.
        reason: String,
        /// When.
        at: Time,
    },
    /// Counts, emitted whenever one changes.
    Progress {
        /// Nodes Done.
        done: usize,
        /// Nodes rolled back or failed.
        rolled_back: usize,
        /// Nodes in flight.
        in_flight: usize,
        /// Nodes not started.
        pending: usize,
        /// When.
        at: Time,
    },
}

/// Receives events. Implemented for every `Fn(&Event) + Send + Sync`.
pub trait EventSink: Send + Sync {
    /// Called once per event, in order.
    fn emit(&self, event: &Event);
}

impl<F: Fn(&Event) + Send + Sync> EventSink for F {
    fn emit(&self, event: &Event) {
        self(event);
    }
}

/// A sink that drops every event.
#[derive(Debug, Clone, Copy, Default)]
pub struct Discard;

impl EventSink for Discard {
    fn emit(&self, _: &Event) {}
}

/// A sink that forwards events into an unbounded channel.
#[derive(Debug, Clone)]
pub struct ChannelSink(futures::channel::mpsc::UnboundedSender<Event>);

impl EventSink for ChannelSink {
    fn emit(&self, event: &Event) {
        // A closed receiver means nobody listens any more; the run goes on.
        let _ = self.0.unbounded_send(event.clone());
    }
}

/// A sink and the `Stream` of its events.
#[must_use]
pub fn channel() -> (
    ChannelSink,
    futures::channel::mpsc::UnboundedReceiver<Event>,
) {
    let (tx, rx) = futures::channel::mpsc::unbounded();
    (ChannelSink(tx), rx)
}
