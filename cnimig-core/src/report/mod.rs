//! Run reports: an SVG timeline and a Markdown report of a migration.
//!
//! - [`Timeline`] is an [`EventSink`](crate::events::EventSink): pass it (alone or next to other
//!   sinks) to [`Orchestrator::run`](crate::orchestrator::Orchestrator::run) and it records every
//!   node's phases over time, what the nodes waited for and which budgets blocked their drains.
//!   The embedder may also feed it availability samples of the PDB-covered workloads
//!   ([`Timeline::record_budgets`] or [`Timeline::record_covered`]), since only the cluster
//!   knows them. [`Timeline::to_svg`] draws it all as one self-contained SVG a browser opens.
//! - [`markdown`] writes a report of a run fit to paste into a change ticket: preflight results,
//!   the plan (node order, Helm values, the `CiliumNodeConfig`), per-node timings, rollbacks with
//!   their causes, and the [`Figures`] the caller adds.
//!
//! Both are pure: no IO, no clock. The same events give the same bytes.
//!
//! ```
//! use cnimig_core::events::{Event, EventSink};
//! use cnimig_core::machine::Phase;
//! use cnimig_core::model::{NodeName, Time};
//! use cnimig_core::report::Timeline;
//!
//! let timeline = Timeline::new();
//! let node = NodeName::new("worker-1").unwrap();
//! timeline.emit(&Event::NodeStarted { node: node.clone(), at: Time(0) });
//! let (from, to) = (Phase::Pending, Phase::Cordoned);
//! timeline.emit(&Event::Phase { node: node.clone(), from, to, at: Time(1_000) });
//! let outcome = Phase::Done;
//! timeline.emit(&Event::NodeFinished { node, outcome, cause: None, at: Time(60_000) });
//! let svg = timeline.to_svg();
//! assert!(svg.starts_with("<svg") && svg.contains("worker-1"));
//! ```

mod markdown;
mod svg;
mod text;
mod timeline;

pub use markdown::{Figure, Figures, markdown};
pub use text::{hms, md_cell, xml_escape};
pub use timeline::{
    AvailabilitySample, BudgetHealth, Mark, MarkKind, Recorded, Segment, Stop, Timeline, Track,
    WorstBudget, event_time,
};
