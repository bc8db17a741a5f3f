//! # cnimig-core
//!
//! The pure core of cnimig, a library that live-migrates Kubernetes clusters from Calico to
//! Cilium node by node. Start with [`config::MigrationConfig`], then [`preflight::preflight`] over
//! a [`model::ClusterSnapshot`], the generated values in [`cilium`], the per-node state machine in
//! [`machine`], the [`schedule`]r, and the async [`orchestrator`] that drives them through the
//! [`ports`].
//!
//! Everything except the orchestrator is synchronous, free of IO, and never reads the clock or a
//! random source: time comes in as [`model::Time`] values.

pub mod allow;
pub mod cilium;
pub mod cleanup;
pub mod config;
pub mod events;
pub mod finalize;
pub mod machine;
pub mod model;
pub mod orchestrator;
pub mod plan;
pub mod policy;
pub mod ports;
pub mod preflight;
pub mod report;
pub mod schedule;
