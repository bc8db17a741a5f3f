//! # cnimig-sim
//!
//! An in-memory Kubernetes cluster with Calico and Cilium, a virtual clock and a seed. It
//! implements every port of [`cnimig_core::ports`], so the orchestrator migrates it exactly as it
//! would a real cluster, and it records what a real cluster would not tell you: every invariant
//! violation ([`Violation`]), every migration operation ([`Op`]) and counters ([`SimStats`]).
//!
//! - [`Scenario`]: the cluster, as compact YAML ([`Scenario::from_yaml`]), the embedded reference
//!   cluster ([`Scenario::reference`]) or a random one ([`Scenario::random`]).
//! - [`SimCluster`]: the cluster itself. Kubernetes where it matters: the Eviction API with
//!   PodDisruptionBudgets, ReplicaSet / StatefulSet / DaemonSet / static / bare pods, a
//!   zone-spreading scheduler, pods taking their network when their sandbox starts; Cilium
//!   agents that resolve `CiliumNodeConfig`s at start and write `05-cilium.conflist` when Ready;
//!   a reachability model (see [`reach`]) under which a skipped preflight check shows up as
//!   broken connectivity.
//! - [`SimFaults`]: injected faults, counted by kind in [`SimStats::faults_injected`]: API errors
//!   on any port call (500/503, 429, 409 on writes other than the state store's, timeouts, some
//!   after the write landed), agents that never become Ready, evictions blocked forever, nodes
//!   going NotReady and coming back, nodes joining with their DaemonSet pods, pods ignoring their
//!   grace period, verification failing. [`SimCluster::cut_off_after`] cuts a run off mid-call
//!   sequence (a kill), and [`SimCluster::check_write_ahead`] checks every operation against the
//!   node's persisted record.
//! - Deterministic: one ChaCha8 generator seeded from the seed for timings, another derived from
//!   it for faults; time is virtual and moves only when the clock port sleeps.
//!
//! ```
//! use std::time::Duration;
//! use cnimig_core::cilium::{CiliumNodeConfig, CiliumPhase, ValueInputs, rendered_config};
//! use cnimig_core::config::MigrationConfig;
//! use cnimig_core::ports::{Clock, Cluster, NewCni};
//! use cnimig_sim::{Scenario, SimCluster, SimParams};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let sim = SimCluster::new(Scenario::reference(6), SimParams::default(), 42)?;
//! let cfg = MigrationConfig::new("10.245.0.0/16".parse()?);
//! let inputs = ValueInputs { host_port_pods: true };
//! sim.install_cilium(rendered_config(&cfg, inputs, CiliumPhase::Migration))?;
//!
//! let rt = tokio::runtime::Builder::new_current_thread().build()?;
//! rt.block_on(async {
//!     sim.apply_node_config(&CiliumNodeConfig::for_migration(&cfg, inputs)).await?;
//!     let node = sim.node_names().await?[3].clone();
//!     // Cordon, drain (evictions the budgets refuse are retried), label, restart the agent.
//!     sim.set_unschedulable(&node, true).await?;
//!     loop {
//!         let view = sim.node_view(&node).await?;
//!         let left: Vec<_> = view.pods.iter().filter(|p| p.is_drainable()).collect();
//!         if left.is_empty() {
//!             break;
//!         }
//!         for pod in left.iter().filter(|p| !p.terminating) {
//!             sim.evict(&pod.pod).await?; // Evicted, or BlockedByBudget until replacements are Ready
//!         }
//!         sim.sleep_until(sim.now().after(Duration::from_secs(5))).await;
//!     }
//!     sim.set_node_label(&node, &cfg.migration_label, Some("true")).await?;
//!     let agent = sim.agent(&node).await?.ok_or("no agent")?;
//!     sim.restart_agent(&node, &agent.pod_uid).await?;
//!     sim.sleep_until(sim.now().after(Duration::from_secs(120))).await;
//!     assert!(sim.cni_dir(&node).await?.cilium_conflist);
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })?;
//! // The simulator checked every step: no budget broken, nothing out of order, no pods cut off.
//! assert!(sim.violations().is_empty(), "{:?}", sim.violations());
//! # Ok(())
//! # }
//! ```

mod faults;
pub mod finalize;
mod generate;
mod observe;
pub mod pairs;
mod ports;
mod quantity;
pub mod reach;
pub mod scenario;
mod sim;
mod state;

pub use generate::RandomSpec;
pub use observe::{
    FaultKind, NodeJoin, Op, OpKind, PdbHealth, SimFaults, SimStats, Violation, ViolationKind,
};
pub use scenario::{
    Amount, Cpu, Dur, Memory, NodeSpec, PdbDecl, PdbSpec, Requests, Scenario, ScenarioError,
    ScenarioProblem, SimParams, Span, WorkloadKind, WorkloadSpec,
};
pub use sim::SimCluster;
