//! The temporary Calico allow rule on `crd.projectcalico.org/v1`.

use std::time::Duration;

use cnimig_core::allow::{
    AllowRulePort, CalicoApi, MANAGED_BY, POLICY_NAME, TIER_NAME, TIER_ORDER,
};
use cnimig_core::ports::PortError;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::common::{self, wait_until};
use crate::{extra_rbac, serial};

fn calico_api(client: &Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("crd.projectcalico.org", "v1", kind),
            plural,
        ),
    )
}

fn tiers(client: &Client) -> Api<DynamicObject> {
    calico_api(client, "Tier", "tiers")
}

fn policies(client: &Client) -> Api<DynamicObject> {
    calico_api(client, "GlobalNetworkPolicy", "globalnetworkpolicies")
}

/// Deletes the rule's objects as admin (a previous failed run may have left them).
async fn clean(admin: &Client) {
    let _ = policies(admin)
        .delete(POLICY_NAME, &DeleteParams::default())
        .await;
    let _ = tiers(admin)
        .delete(TIER_NAME, &DeleteParams::default())
        .await;
}

async fn absent(admin: &Client) -> bool {
    policies(admin)
        .get_opt(POLICY_NAME)
        .await
        .unwrap()
        .is_none()
        && tiers(admin).get_opt(TIER_NAME).await.unwrap().is_none()
}

/// The exact spec the rule's policy must have for `cidr`.
fn expected_policy_spec(cidr: &str) -> Value {
    json!({
        "tier": TIER_NAME,
        "order": 0,
        "selector": "all()",
        "types": ["Ingress", "Egress"],
        "ingress": [{"action": "Allow", "source": {"nets": [cidr]}}, {"action": "Pass"}],
        "egress": [{"action": "Allow", "destination": {"nets": [cidr]}}, {"action": "Pass"}],
    })
}

/// The DELETE requests cnimig's ServiceAccount sent for the rule's objects, from the audit log
/// (bytes from `from` on), as `(requestReceivedTimestamp, resource)` in log order.
fn audited_deletes(from: u64) -> Option<Vec<(String, String)>> {
    let path = std::env::var_os("CNIMIG_TESTENV_AUDIT_LOG")?;
    let bytes = std::fs::read(path).ok()?;
    let start = usize::try_from(from).unwrap_or(0).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[start..]);
    Some(
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| {
                e["stage"] == "ResponseComplete"
                    && e["verb"] == "delete"
                    && e["user"]["username"] == "system:serviceaccount:kube-system:cnimig"
                    && e["objectRef"]["apiGroup"] == "crd.projectcalico.org"
                    && (e["objectRef"]["name"] == POLICY_NAME
                        || e["objectRef"]["name"] == TIER_NAME)
            })
            .map(|e| {
                (
                    e["requestReceivedTimestamp"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    e["objectRef"]["resource"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                )
            })
            .collect(),
    )
}

fn audit_len() -> u64 {
    std::env::var_os("CNIMIG_TESTENV_AUDIT_LOG")
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len())
}

/// Dry run changes nothing; the rule is created with the exact CIDR and fields; applying twice
/// changes nothing; a new CIDR updates it in place; removal deletes the policy, then the tier;
/// removing again is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_rule_is_exact_idempotent_and_removed_policy_first() {
    let env = match common::env().await {
        Some(e) => e,
        None => return,
    };
    let _serial = serial().await;
    let admin = env.admin.clone();
    extra_rbac(&admin).await;
    clean(&admin).await;
    common::with_temp_ns(admin.clone(), "allow", |ns| async move {
        let k = env.cluster(common::opts(&ns));
        assert_eq!(
            k.allow_rule_api().await.unwrap(),
            Ok(CalicoApi::CrdV1),
            "the test control plane serves crd.projectcalico.org/v1 with tiers"
        );
        assert!(!k.allow_rule_present().await.unwrap());

        // Dry run: the server validates and answers with what it would store; nothing stays.
        let cidr: ipnet::Ipv4Net = "10.245.0.0/16".parse().unwrap();
        let (api, answered) = k.dry_run_allow_rule(cidr).await.unwrap();
        assert_eq!(api, CalicoApi::CrdV1);
        assert_eq!(answered.len(), 2);
        assert_eq!(answered[0].name_any(), TIER_NAME);
        assert_eq!(answered[1].name_any(), POLICY_NAME);
        assert_eq!(
            answered[1].data["spec"],
            expected_policy_spec("10.245.0.0/16")
        );
        assert!(absent(&admin).await, "a dry run created something");
        assert!(!k.allow_rule_present().await.unwrap());

        // Apply: the exact objects.
        k.apply_allow_rule(cidr).await.unwrap();
        let tier = tiers(&admin).get(TIER_NAME).await.unwrap();
        assert_eq!(tier.data["spec"], json!({"order": TIER_ORDER}));
        assert_eq!(
            tier.labels().get(MANAGED_BY.0).map(String::as_str),
            Some(MANAGED_BY.1)
        );
        let policy = policies(&admin).get(POLICY_NAME).await.unwrap();
        assert_eq!(
            policy.types.as_ref().map(|t| t.api_version.as_str()),
            Some("crd.projectcalico.org/v1")
        );
        assert_eq!(policy.data["spec"], expected_policy_spec("10.245.0.0/16"));
        assert_eq!(
            policy.labels().get(MANAGED_BY.0).map(String::as_str),
            Some(MANAGED_BY.1)
        );
        assert!(k.allow_rule_present().await.unwrap());

        // Twice: nothing changes (same resourceVersions).
        k.apply_allow_rule(cidr).await.unwrap();
        let tier2 = tiers(&admin).get(TIER_NAME).await.unwrap();
        let policy2 = policies(&admin).get(POLICY_NAME).await.unwrap();
        assert_eq!(tier2.resource_version(), tier.resource_version());
        assert_eq!(policy2.resource_version(), policy.resource_version());
        assert_eq!(policy2.metadata.uid, policy.metadata.uid);

        // Another CIDR: the same objects, updated.
        k.apply_allow_rule("10.246.0.0/16".parse().unwrap())
            .await
            .unwrap();
        let policy3 = policies(&admin).get(POLICY_NAME).await.unwrap();
        assert_eq!(policy3.metadata.uid, policy.metadata.uid);
        assert_eq!(policy3.data["spec"], expected_policy_spec("10.246.0.0/16"));
        let listed = policies(&admin).list(&Default::default()).await.unwrap();
        assert_eq!(
            listed
                .items
                .iter()
                .filter(|p| p.name_any() == POLICY_NAME)
                .count(),
            1
        );

        // Removal: the policy, then the tier.
        let from = audit_len();
        k.remove_allow_rule().await.unwrap();
        assert!(
            absent(&admin).await,
            "the rule is still there after removal"
        );
        assert!(!k.allow_rule_present().await.unwrap());
        if std::env::var_os("CNIMIG_TESTENV_AUDIT_LOG").is_some() {
            // Audit events are written after the response: poll briefly.
            let mut deletes = Vec::new();
            for _ in 0..50 {
                deletes = audited_deletes(from).unwrap_or_default();
                if deletes.len() >= 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let resources: Vec<&str> = deletes.iter().map(|(_, r)| r.as_str()).collect();
            assert_eq!(resources, ["globalnetworkpolicies", "tiers"], "{deletes:?}");
            assert!(
                deletes[0].0 < deletes[1].0,
                "policy deleted first: {deletes:?}"
            );
        }
        // Again: already gone is success.
        k.remove_allow_rule().await.unwrap();
    })
    .await;
}

/// A Calico without `tiers.crd.projectcalico.org` (older than v3.28): applying the rule fails
/// naming the version and the fix, and nothing is written; removing it is a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_rule_on_a_calico_without_tiers_is_refused_and_changes_nothing() {
    let env = match common::env().await {
        Some(e) => e,
        None => return,
    };
    let _serial = serial().await;
    let admin = env.admin.clone();
    extra_rbac(&admin).await;
    clean(&admin).await;
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let _ = crds
        .delete("tiers.crd.projectcalico.org", &DeleteParams::default())
        .await;
    wait_until("tiers no longer served", Duration::from_secs(60), || {
        let admin = admin.clone();
        async move {
            admin
                .list_api_group_resources("crd.projectcalico.org/v1")
                .await
                .is_ok_and(|l| l.resources.iter().all(|r| r.name != "tiers"))
        }
    })
    .await;
    let result = std::panic::AssertUnwindSafe(async {
        let k = env.cluster(common::opts("default"));
        let before = policies(&admin).list(&Default::default()).await.unwrap();
        let err = k
            .apply_allow_rule("10.245.0.0/16".parse().unwrap())
            .await
            .unwrap_err();
        let PortError::Invalid { detail, .. } = &err else {
            panic!("expected Invalid, got {err:?}");
        };
        assert!(
            detail.contains("v3.28") && detail.contains("Upgrade Calico"),
            "{err}"
        );
        assert!(detail.contains("nothing was changed"), "{err}");
        let dry = k.dry_run_allow_rule("10.245.0.0/16".parse().unwrap()).await;
        assert!(matches!(dry, Err(PortError::Invalid { .. })), "{dry:?}");
        let after = policies(&admin).list(&Default::default()).await.unwrap();
        let names = |l: &kube::core::ObjectList<DynamicObject>| {
            l.items
                .iter()
                .map(ResourceExt::name_any)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(&after),
            names(&before),
            "a GlobalNetworkPolicy was written"
        );
        k.remove_allow_rule().await.unwrap();
        assert!(!k.allow_rule_present().await.unwrap());
    });
    let outcome = futures::FutureExt::catch_unwind(result).await;
    // Put the CRD back for the other tests, whatever happened.
    cnimig_emu::setup::install_crds(&admin).await.unwrap();
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}
