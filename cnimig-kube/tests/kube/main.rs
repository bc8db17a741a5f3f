//! Integration tests of cnimig-kube against a real control plane (`scripts/testenv`).
//!
//! Run them with `scripts/test-kube.sh` (starts and stops the control plane), or by hand:
//! `scripts/testenv/up.sh && . /tmp/cnimig-testenv/env && cargo test -p cnimig-kube --release`.
//! Without the control plane every test prints `SKIPPED` and passes, unless
//! `CNIMIG_REQUIRE_TESTENV=1` (CI), which makes them fail.
//!
//! The adapter under test authenticates as ServiceAccount `kube-system/cnimig`, bound to
//! `deploy/rbac.yaml`, so a missing permission fails a test. Each test works in its own namespace
//! (`with_temp_ns`) and on nodes named uniquely for it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers fail the test by panicking"
)]

mod api_cost;
mod calico;
mod cilium;
mod common;
mod conformance;
mod e2e;
mod eviction;
mod goldpinger;
mod metrics;
mod nodes;
mod prepare;
mod probe;
mod rbac;
mod rbac_verify;
mod served_version;
mod state;
mod watch;
