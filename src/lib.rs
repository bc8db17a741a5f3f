//! # cnimig
//!
//! Live-migrate Kubernetes clusters from Calico to Cilium, node by node, with the workloads
//! running. This facade re-exports the workspace's crates: [`core`] (the pure planner, state
//! machine and orchestrator), [`sim`] (a simulated cluster); [`progress`] shows a run on a
//! terminal or in logs. The Kubernetes and Rancher adapters are the crates `cnimig-kube` and
//! `cnimig-rancher`.
//!
//! Plan and run a migration on the simulator:
//!
//! ```
//! use cnimig::core::cilium::{CiliumPhase, rendered_config};
//! use cnimig::core::config::MigrationConfig;
//! use cnimig::core::events::Discard;
//! use cnimig::core::machine::Phase;
//! use cnimig::core::orchestrator::{Orchestrator, Ports, RunOptions};
//! use cnimig::sim::{Scenario, SimCluster, SimParams};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let sim = SimCluster::new(Scenario::reference(6), SimParams::default(), 3)?;
//! let cfg = MigrationConfig::new("10.245.0.0/16".parse()?);
//! let orch = Orchestrator::new(Ports::from_one(sim.clone()), cfg.clone(), RunOptions::default());
//! let rt = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
//! let (planned, done) = rt.block_on(async {
//!     let (_, plan) = orch.plan().await?;
//!     sim.set_scope(plan.order.iter().map(|p| p.name.clone()).collect())?;
//!     sim.set_control_plane_last(cfg.control_plane_last);
//!     sim.install_cilium(rendered_config(&cfg, plan.inputs, CiliumPhase::Migration))?;
//!     let report = orch.run(&plan, &Discard).await?;
//!     Ok::<_, Box<dyn std::error::Error>>((plan.order.len(), report.count(Phase::Done)))
//! })?;
//! assert_eq!(done, planned);
//! # Ok(())
//! # }
//! ```

pub use cnimig_core as core;
pub use cnimig_sim as sim;

pub mod progress;

/// The README's Rust snippets, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
