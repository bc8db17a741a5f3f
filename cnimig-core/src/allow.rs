//! The temporary Calico allow rule for the Cilium pod CIDR during the migration.
//!
//! While Cilium enforces no policy, Calico still enforces on unmigrated nodes, where traffic from
//! the Cilium CIDR matches no Calico selector and would be dropped by policies that select by
//! label (FACTS.md). The rule is a Calico `Tier` ordered before `default` holding one
//! `GlobalNetworkPolicy` that allows traffic from and to the Cilium pod CIDR and `Pass`es
//! everything else, so the existing policies in the tiers after it still decide for Calico pods.
//! Finalize removes it.
//!
//! # Why a tier of its own
//!
//! A policy in the `default` tier cannot do this job. Calico evaluates a tier's policies that
//! select an endpoint in order, and a packet no rule decided is denied at the end of the tier
//! ("end of tier deny"). A `selector: all()` policy in `default` ending with nothing would
//! therefore deny everything not from the Cilium CIDR for every endpoint that had no policy
//! before (they were open, since with no policy Calico falls through to the namespace profiles,
//! which allow); ending it with `Pass` instead would jump past the rest of `default`, so the
//! user's own policies would stop applying. In a separate tier ordered before `default`, `Pass`
//! hands everything but the Cilium CIDR to the next tier unchanged: endpoints with policies keep
//! them, endpoints without stay open.
//!
//! # Which API
//!
//! The objects are written to `crd.projectcalico.org/v1` ([`CalicoApi::CrdV1`]), the CRDs every
//! Calico install in Kubernetes-datastore mode has; `projectcalico.org/v3` exists only where
//! Calico's own API server runs. On Calico 3.32+ installs in native-v3-CRD mode (the
//! `projectcalico.org` group served and `crd.projectcalico.org` absent, the tigera-operator's own
//! rule) the same objects go to `projectcalico.org/v3` ([`CalicoApi::NativeV3`]). [`choose_api`]
//! decides from API discovery.
//!
//! In the CRD backend a policy in a tier other than `default` is stored under the name
//! `<tier>.<name>` (libcalico-go `names.BackendTieredPolicyName`), which is why
//! [`POLICY_NAME`] carries the [`TIER_NAME`] prefix; `spec.tier` names the tier too.
//! `tiers.crd.projectcalico.org` arrived with tiers in Calico Open Source v3.28: on an older
//! Calico [`choose_api`] refuses with [`AllowRuleApiError::TiersMissing`], before anything is
//! written.
//!
//! # Caveats
//! Writing the CRDs directly skips the validation and defaulting Calico's API server or
//! `calicoctl` would do, so the objects here carry every field Calico reads (`types`, `order`,
//! `selector`) and nothing else. The tier's order ([`TIER_ORDER`] = 100) also puts it before
//! the `kube-admin` tier (order 1,000) of Calico 3.30+, so an AdminNetworkPolicy that denies
//! traffic from the Cilium CIDR does not apply while the rule exists.

use async_trait::async_trait;
use ipnet::Ipv4Net;
use serde_json::{Value, json};

use crate::ports::PortError;

/// Name of the Tier.
pub const TIER_NAME: &str = "cnimig-migration";
/// Name of the GlobalNetworkPolicy (the CRD backend stores a tiered policy as `<tier>.<name>`).
pub const POLICY_NAME: &str = "cnimig-migration.allow-cilium";
/// The Tier's order: `default` has none (it is last) or 1,000,000 (Calico 3.30+); lower orders
/// come first.
pub const TIER_ORDER: u32 = 100;
/// The first Calico Open Source release with `tiers.crd.projectcalico.org`.
pub const MIN_CALICO_WITH_TIERS: &str = "v3.28";
/// The label every object of the rule carries.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "cnimig");

/// The API group and version the rule's objects are written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CalicoApi {
    /// `crd.projectcalico.org/v1`: the CRDs of every Kubernetes-datastore Calico.
    CrdV1,
    /// `projectcalico.org/v3` served by CRDs (Calico 3.32+ native-v3-CRD mode).
    NativeV3,
}

impl CalicoApi {
    /// The API group.
    #[must_use]
    pub fn group(self) -> &'static str {
        match self {
            CalicoApi::CrdV1 => "crd.projectcalico.org",
            CalicoApi::NativeV3 => "projectcalico.org",
        }
    }

    /// The API version (without the group).
    #[must_use]
    pub fn version(self) -> &'static str {
        match self {
            CalicoApi::CrdV1 => "v1",
            CalicoApi::NativeV3 => "v3",
        }
    }

    /// `group/version`, as in an object's `apiVersion`.
    #[must_use]
    pub fn api_version(self) -> String {
        format!("{}/{}", self.group(), self.version())
    }
}

/// Why the rule cannot be written on this cluster. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowRuleApiError {
    /// Calico's API is served but has no `tiers`: Calico older than v3.28.
    #[error(
        "this Calico is older than {MIN_CALICO_WITH_TIERS}: its API serves no `tiers` \
         (tiers.crd.projectcalico.org arrived in Calico {MIN_CALICO_WITH_TIERS}), so the \
         temporary allow rule cannot be placed before the `default` tier; nothing was changed. \
         Upgrade Calico to {MIN_CALICO_WITH_TIERS} or later first, or migrate without the allow \
         rule (traffic from migrated pods to pods whose Calico policies select their sources by \
         label is then dropped until those pods migrate too)"
    )]
    TiersMissing,
    /// Neither Calico API group is served.
    #[error(
        "no Calico API: neither crd.projectcalico.org/v1 nor projectcalico.org/v3 is served, so \
         Calico is not installed (or not in Kubernetes-datastore mode) and has no policy to \
         bypass; nothing was changed. Skip the allow rule on this cluster"
    )]
    NoCalico,
}

impl From<AllowRuleApiError> for PortError {
    fn from(e: AllowRuleApiError) -> Self {
        PortError::Invalid {
            what: "the temporary Calico allow rule".into(),
            detail: e.to_string(),
        }
    }
}

/// Chooses the API from discovery: `crd_v1` is the resources (plurals) `crd.projectcalico.org/v1`
/// serves (`None`: the group-version is not served), `v3` the same for `projectcalico.org/v3`.
///
/// `crd.projectcalico.org/v1` wins whenever it is served (Calico's API server, where installed,
/// stores `projectcalico.org/v3` objects in it); `projectcalico.org/v3` is used only when it
/// serves `tiers` and `crd.projectcalico.org` is absent (native-v3-CRD mode).
///
/// # Errors
/// [`AllowRuleApiError::TiersMissing`] when the API that would be used has no `tiers` (Calico
/// before v3.28); [`AllowRuleApiError::NoCalico`] when neither group-version is served.
pub fn choose_api(
    crd_v1: Option<&[String]>,
    v3: Option<&[String]>,
) -> Result<CalicoApi, AllowRuleApiError> {
    let has = |r: &[String], p: &str| r.iter().any(|x| x == p);
    match (crd_v1, v3) {
        (Some(r), _) if has(r, "tiers") && has(r, "globalnetworkpolicies") => Ok(CalicoApi::CrdV1),
        (Some(_), _) => Err(AllowRuleApiError::TiersMissing),
        (None, Some(r)) if has(r, "tiers") && has(r, "globalnetworkpolicies") => {
            Ok(CalicoApi::NativeV3)
        }
        (None, Some(_)) => Err(AllowRuleApiError::TiersMissing),
        (None, None) => Err(AllowRuleApiError::NoCalico),
    }
}

/// The Calico `Tier` object (cluster-scoped).
#[must_use]
pub fn tier_object(api: CalicoApi) -> Value {
    json!({
        "apiVersion": api.api_version(),
        "kind": "Tier",
        "metadata": {"name": TIER_NAME, "labels": {MANAGED_BY.0: MANAGED_BY.1}},
        "spec": {"order": TIER_ORDER}
    })
}

/// The `GlobalNetworkPolicy` allowing the Cilium pod CIDR both ways and passing the rest on to
/// the next tier.
#[must_use]
pub fn policy_object(api: CalicoApi, cilium_cidr: Ipv4Net) -> Value {
    let cidr = cilium_cidr.to_string();
    json!({
        "apiVersion": api.api_version(),
        "kind": "GlobalNetworkPolicy",
        "metadata": {"name": POLICY_NAME, "labels": {MANAGED_BY.0: MANAGED_BY.1}},
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
    /// Creates or updates the Tier, then the policy for `cilium_cidr`. Idempotent.
    ///
    /// # Errors
    /// [`PortError::Invalid`] (from [`AllowRuleApiError`]) when Calico has no tiers or no API,
    /// before anything is written; any write failure.
    async fn apply_allow_rule(&self, cilium_cidr: Ipv4Net) -> Result<(), PortError>;
    /// Deletes the policy, then the Tier (Calico refuses to delete a Tier that holds policies).
    /// Already gone, or Calico's API not served, is success.
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

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn the_policy_allows_the_cilium_cidr_then_passes() {
        let p = policy_object(CalicoApi::CrdV1, "10.245.0.0/16".parse().unwrap());
        assert_eq!(p["apiVersion"], json!("crd.projectcalico.org/v1"));
        assert_eq!(p["spec"]["tier"], json!(TIER_NAME));
        assert_eq!(
            p["spec"]["ingress"][0]["source"]["nets"][0],
            json!("10.245.0.0/16")
        );
        assert_eq!(
            p["spec"]["egress"][0]["destination"]["nets"][0],
            json!("10.245.0.0/16")
        );
        assert_eq!(p["spec"]["ingress"][1], json!({"action": "Pass"}));
        assert_eq!(p["spec"]["egress"][1], json!({"action": "Pass"}));
        assert!(POLICY_NAME.starts_with(&format!("{TIER_NAME}.")));
        let t = tier_object(CalicoApi::CrdV1);
        assert_eq!(t["spec"]["order"], json!(TIER_ORDER));
        assert_eq!(t["apiVersion"], json!("crd.projectcalico.org/v1"));
        assert_eq!(
            tier_object(CalicoApi::NativeV3)["apiVersion"],
            json!("projectcalico.org/v3")
        );
    }

    #[test]
    fn the_api_is_chosen_from_discovery() {
        let full = names(&[
            "ippools",
            "tiers",
            "globalnetworkpolicies",
            "networkpolicies",
        ]);
        let old = names(&["ippools", "globalnetworkpolicies", "networkpolicies"]);
        assert_eq!(choose_api(Some(&full), None), Ok(CalicoApi::CrdV1));
        // Calico's API server on top of the CRDs: still the CRDs.
        assert_eq!(choose_api(Some(&full), Some(&full)), Ok(CalicoApi::CrdV1));
        assert_eq!(choose_api(None, Some(&full)), Ok(CalicoApi::NativeV3));
        assert_eq!(
            choose_api(Some(&old), None),
            Err(AllowRuleApiError::TiersMissing)
        );
        // An old Calico with its API server: the v3 group has no tiers either, and the CRDs win.
        assert_eq!(
            choose_api(Some(&old), Some(&old)),
            Err(AllowRuleApiError::TiersMissing)
        );
        assert_eq!(choose_api(None, None), Err(AllowRuleApiError::NoCalico));
        assert_eq!(
            choose_api(None, Some(&old)),
            Err(AllowRuleApiError::TiersMissing)
        );
        let msg = AllowRuleApiError::TiersMissing.to_string();
        assert!(
            msg.contains("v3.28") && msg.contains("Upgrade Calico"),
            "{msg}"
        );
    }
}
