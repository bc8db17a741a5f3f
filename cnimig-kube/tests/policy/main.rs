//! The temporary Calico allow rule and policy conversion's apply on the real control plane
//! (`scripts/testenv`), as cnimig's ServiceAccount bound to `deploy/rbac.yaml`,
//! `deploy/rbac-policy.yaml` and `deploy/rbac-finalize.yaml`.
//!
//! A test binary of its own: one test takes Calico's `tiers` CRD away (an old Calico) and the
//! finalize binary deletes every Calico CRD, so these must not share a process with tests that
//! need them. The tests here run one at a time ([`serial`]).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers fail the test by panicking"
)]

#[path = "../kube/common.rs"]
#[allow(
    dead_code,
    reason = "shared with the kube binary; not every helper is used here"
)]
mod common;

mod allow_rule;
mod apply;
mod rbac;

use std::sync::OnceLock;

use kube::Client;
use serde_json::Value;

/// Serialises the tests of this binary (one of them removes a CRD every test uses).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}

/// The ClusterRole's rules in a `deploy/` RBAC file.
pub fn role_rules(text: &str) -> Vec<Value> {
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        if v["kind"] == "ClusterRole" {
            return v["rules"].as_array().unwrap().clone();
        }
    }
    panic!("no ClusterRole in the file");
}

/// `deploy/rbac-policy.yaml`.
pub const RBAC_POLICY: &str = include_str!("../../../deploy/rbac-policy.yaml");
/// `deploy/rbac-finalize.yaml`.
pub const RBAC_FINALIZE: &str = include_str!("../../../deploy/rbac-finalize.yaml");

/// Applies the extra RBAC files (admin).
pub async fn extra_rbac(admin: &Client) {
    cnimig_emu::setup::apply_yaml(admin, RBAC_POLICY)
        .await
        .expect("apply deploy/rbac-policy.yaml");
    cnimig_emu::setup::apply_yaml(admin, RBAC_FINALIZE)
        .await
        .expect("apply deploy/rbac-finalize.yaml");
}
