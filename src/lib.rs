//! # cnimig
//!
//! Live-migrate Kubernetes clusters from Calico to Cilium, node by node, with the workloads
//! running. This facade re-exports the workspace's crates.

pub use cnimig_core as core;
pub use cnimig_sim as sim;
