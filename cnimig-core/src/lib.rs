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
//!
//! The pure path, from a config to the Helm values and the check of a live `cilium-config`:
//!
//! ```
//! use cnimig_core::cilium::{CiliumPhase, ValueInputs, check_live_config, helm_values_yaml, rendered_config};
//! use cnimig_core::config::MigrationConfig;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = MigrationConfig::new("10.245.0.0/16".parse()?);
//! cfg.validate()?;
//! let inputs = ValueInputs { host_port_pods: true };
//! // `helm install cilium -f values.yaml` with these values installs Cilium beside Calico.
//! let values = helm_values_yaml(&cfg, inputs, CiliumPhase::Migration);
//! assert!(values.contains("10.245.0.0/16"), "{values}");
//! // What the chart renders into `cilium-config` passes the live check for the migration
//! // phase, and fails it for the final phase (Cilium is not yet the cluster's CNI).
//! let live = rendered_config(&cfg, inputs, CiliumPhase::Migration);
//! assert!(check_live_config(&live, &cfg, inputs, CiliumPhase::Migration).is_empty());
//! assert!(!check_live_config(&live, &cfg, inputs, CiliumPhase::Final).is_empty());
//! # Ok(())
//! # }
//! ```

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
pub mod prepare;
pub mod report;
pub mod schedule;
pub mod verify;
pub mod verify_probe;
