//! # cnimig-emu
//!
//! Emulates what needs a kernel, against a real Kubernetes API: kubelets and the Calico and
//! Cilium agents of N emulated nodes. With it, cnimig's Kubernetes adapter (`cnimig-kube`) runs
//! whole migrations against a real control plane (`scripts/testenv`); the real
//! kube-controller-manager and kube-scheduler create and place the pods of Deployments,
//! StatefulSets and DaemonSets, and the real API server enforces evictions and budgets.
//!
//! - [`emulator::start`] with an [`emulator::EmuConfig`]: the emulator (the module docs say what
//!   it emulates);
//! - [`calico_node`]: the address a starting `calico-node` autodetects (the `cilium_host` trap);
//! - [`cni`]: its CNI decisions, pure and unit-tested;
//! - [`goldpinger`]: a Goldpinger-compatible `/check_all` endpoint computed from the shared
//!   reachability model (`cnimig_sim::pairs`), with an injectable firewall;
//! - [`probe`]: finishes cnimig's per-node probe pods with results from the same model;
//! - [`setup`]: CRDs, RBAC, server-side apply, ServiceAccount clients for tests;
//! - the `cnimig-emu` binary runs the emulator against `KUBECONFIG` until interrupted.
//!
//! Its CNI decisions are pure; for instance the pod CIDR block of the second node:
//!
//! ```
//! use cnimig_emu::cni::node_block;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let block = node_block("10.245.0.0/16".parse()?, 24, 1).ok_or("the pool has 256 blocks")?;
//! assert_eq!(block.to_string(), "10.245.1.0/24");
//! assert_eq!(node_block("10.245.0.0/23".parse()?, 24, 2), None);
//! # Ok(())
//! # }
//! ```
//!
//! ## Contracts with cnimig-kube
//!
//! A real cluster shows two things only on the node; the emulator publishes them as
//! annotations that `cnimig-kube` reads: [`emulator::AGENT_CONFIG_ANNOTATION`] on agent pods
//! (the node config the agent resolved) and [`emulator::CNI_DIR_ANNOTATION`] on Nodes (the state
//! of `/etc/cni/net.d`).
//!
//! This crate is a test tool: it uses `anyhow` for errors.

pub mod calico_node;
pub mod cni;
pub mod emulator;
pub mod goldpinger;
pub mod probe;
pub mod setup;

pub use emulator::{EmuConfig, EmuHandle, start};
