//! The temporary Calico allow rule for the Cilium pod CIDR during the migration.
//!
//! While Cilium enforces no policy, Calico still enforces on unmigrated nodes, where traffic from
//! the Cilium CIDR matches no Calico selector and would be dropped by policies that select by
//! label (FACTS.md). The rule is a Calico `Tier` ordered before `default` holding one
//! `GlobalNetworkPolicy` that allows traffic from and to the Cilium pod CIDR and `Pass`es
//! everything else, so the existing policies in the tiers after it still decide for Calico pods.
//! Finalize removes it.

use async_trait::async_trait;
use ipnet::Ipv4Net;
use serde_json::{Value, json};

use crate::ports::PortError;

/// Name of the Tier.
pub const TIER_NAME: &str = "cnimig-migration";
/// Name of the GlobalNetworkPolicy (Calico requires the tier name as prefix).
pub const POLICY_NAME: &str = "cnimig-migration.allow-cilium";
/// The Tier's order: `default` has none (it is last); lower orders come first.
pub const TIER_ORDER: u32 = 100;

/// The Calico `Tier` object (`projectcalico.org/v3`, cluster-scoped).
#[must_use]
pub fn tier_object() -> Value {
    json!({
        "apiVersion": "projectcalico.org/v3",
        "kind": "Tier",
        "metadata": {"name": TIER_NAME, "labels": {"app.kubernetes.io/managed-by": "cnimig"}},
        "spec": {"order": TIER_ORDER}
    })
}

/// The `GlobalNetworkPolicy` allowing the Cilium pod CIDR both ways and passing the rest on to
/// the next tier.
#[must_use]
pub fn policy_object(cilium_cidr: Ipv4Net) -> Value {
    let cidr = cilium_cidr.to_string();
    json!({
        "apiVersion": "projectcalico.org/v3",
        "kind": "GlobalNetworkPolicy",
        "metadata": {"name": POLICY_NAME, "labels": {"app.kubernetes.io/managed-by": "cnimig"}},
        "spec": {
            "tier": TIER_NAME,
            "order": 0,
            "selector": "all()",
            "types": ["Ingress", "Egress"],
            "ingress": [
                {"action": "Allow", "source": {"nets": [cidr]}},
                {"action": "Pass"}
            ],
            "egress": [
                {"action": "Allow", "destination": {"nets": [cidr]}},
                {"action": "Pass"}
            ]
        }
    })
}

/// Applies and removes the allow rule.
///
/// `#[async_trait]` like every port (used as `dyn`, futures `Send`).
#[async_trait]
pub trait AllowRulePort: Send + Sync {
    /// Creates or updates the Tier and the policy for `cilium_cidr`. Idempotent.
    ///
    /// # Errors
    /// Any write failure.
    async fn apply_allow_rule(&self, cilium_cidr: Ipv4Net) -> Result<(), PortError>;
    /// Deletes the policy, then the Tier (Calico refuses to delete a Tier that holds policies).
    /// Already gone is success.
    ///
    /// # Errors
    /// Any write failure.
    async fn remove_allow_rule(&self) -> Result<(), PortError>;
    /// Whether the policy exists.
    ///
    /// # Errors
    /// Any read failure.
    async fn allow_rule_present(&self) -> Result<bool, PortError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_the_cilium_cidr_then_passes() {
        let p = policy_object("10.245.0.0/16".parse().unwrap());
        assert_eq!(p["spec"]["tier"], json!(TIER_NAME));
        assert_eq!(
            p["spec"]["ingress"][0]["source"]["nets"][0],
            json!("10.245.0.0/16")
        );
        assert_eq!(p["spec"]["ingress"][1]["action"], json!("Pass"));
        assert_eq!(p["spec"]["egress"][1]["action"], json!("Pass"));
        assert!(POLICY_NAME.starts_with(&format!("{TIER_NAME}.")));
        assert_eq!(tier_object()["spec"]["order"], json!(TIER_ORDER));
    }
}
