//! [`RancherWrite`]: one write of the Rancher steps as [`RancherCluster::dry_run`] sent it with
//! server-side `dryRun=All`.
//!
//! [`RancherCluster::dry_run`]: crate::RancherCluster::dry_run

use std::fmt;

use cnimig_kube::planning::ProbeOutcome;
use serde::Serialize;
use serde_json::Value;

use crate::plan::When;

/// One write a run of the Rancher steps makes, as the dry run sent it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RancherWrite {
    /// Position among the Rancher writes (1 = first).
    pub order: usize,
    /// When in the run.
    pub when: When,
    /// The step, as the plan describes it.
    pub step: String,
    /// Verb, resource and object (`PATCH deployments.apps cattle-system/cattle-cluster-agent
    /// (JSON patch)`); empty when there is nothing to write.
    pub request: String,
    /// The exact body: the JSON patch (its `test` operations included), the merge patch, or the
    /// object created; `null` when there is nothing to write.
    pub body: Value,
    /// What the API server answered.
    pub outcome: ProbeOutcome,
}

impl RancherWrite {
    /// True unless the server refused the write or the request failed.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.outcome.ok()
    }
}

impl fmt::Display for RancherWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head = format!("{:>2}. [{}] {}", self.order, self.when, self.step);
        match &self.outcome {
            ProbeOutcome::Allowed => {
                writeln!(f, "{head}\n      ok       {} (dryRun=All)", self.request)?
            }
            ProbeOutcome::Refused { code, message } => writeln!(
                f,
                "{head}\n      REFUSED  {} (dryRun=All): {code} {message}",
                self.request
            )?,
            ProbeOutcome::NotSent { reason } if self.request.is_empty() => {
                writeln!(f, "{head}\n      not sent: {reason}")?;
            }
            ProbeOutcome::NotSent { reason } => {
                writeln!(f, "{head}\n      not sent {}: {reason}", self.request)?;
            }
            ProbeOutcome::Failed { error } => {
                writeln!(f, "{head}\n      FAILED   {}: {error}", self.request)?;
            }
        }
        if !self.body.is_null() {
            write!(f, "      body: {}", self.body)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_prints_its_step_request_answer_and_body() {
        let w = RancherWrite {
            order: 1,
            when: When::BeforeFirstNode,
            step: "move the agent".into(),
            request: "PATCH deployments.apps cattle-system/cattle-cluster-agent (JSON patch)"
                .into(),
            body: serde_json::json!([{"op": "add", "path": "/spec/template/spec/hostNetwork", "value": true}]),
            outcome: ProbeOutcome::Refused {
                code: 403,
                message: "forbidden".into(),
            },
        };
        assert!(!w.ok());
        let text = w.to_string();
        assert!(
            text.starts_with(" 1. [before the first node] move the agent"),
            "{text}"
        );
        assert!(text.contains("REFUSED  PATCH deployments.apps cattle-system/cattle-cluster-agent (JSON patch) (dryRun=All): 403 forbidden"), "{text}");
        assert!(
            text.contains(
                r#"body: [{"op":"add","path":"/spec/template/spec/hostNetwork","value":true}]"#
            ),
            "{text}"
        );
    }
}
