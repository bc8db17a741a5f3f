//! Every rule of `deploy/rbac-policy.yaml` is needed.

use std::time::Duration;

use cnimig_core::allow::{AllowRulePort, POLICY_NAME, TIER_NAME};
use cnimig_core::ports::PortError;
use cnimig_kube::KubeCluster;
use cnimig_kube::policy::PolicyApplyError;
use kube::Client;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind};
use serde_json::{Value, json};

use crate::common;
use crate::{RBAC_POLICY, role_rules, serial};

/// The port method a rule of `deploy/rbac-policy.yaml` exists for; `Ok(true)` when it was
/// forbidden.
async fn call(k: &KubeCluster, ns: &str, key: &str) -> Result<bool, String> {
    let forbidden = |r: Result<(), PortError>| match r {
        Ok(()) => Ok(false),
        Err(PortError::Forbidden { .. }) => Ok(true),
        Err(e) => Err(e.to_string()),
    };
    match key {
        "crd.projectcalico.org/tiers/create" => {
            forbidden(k.apply_allow_rule("10.245.0.0/16".parse().unwrap()).await)
        }
        "crd.projectcalico.org/globalnetworkpolicies/get" => {
            forbidden(k.allow_rule_present().await.map(|_| ()))
        }
        "crd.projectcalico.org/tiers/list"
        | "networking.k8s.io/networkpolicies/list"
        | "/namespaces/list" => forbidden(k.read_calico_policies().await.map(|_| ())),
        "cilium.io/ciliumnetworkpolicies/get" => {
            let o = json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                "metadata": {"name": "rbac-probe", "namespace": ns},
                "spec": {"endpointSelector": {}, "ingress": [{}]}});
            match k.apply_cilium_policies(&[o], true).await {
                Ok(_) => Ok(false),
                Err(PolicyApplyError::Refused { refused, .. })
                    if refused[0]
                        .refused
                        .as_deref()
                        .is_some_and(|m| m.starts_with("403")) =>
                {
                    Ok(true)
                }
                Err(e) => Err(e.to_string()),
            }
        }
        other => panic!("no probe for the rule on {other}: add one"),
    }
}

/// A ServiceAccount bound to `deploy/rbac.yaml` and to `deploy/rbac-policy.yaml` without one
/// rule gets Forbidden from the method that uses that rule, and succeeds once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_rule_is_needed() {
    let env = match common::env().await {
        Some(e) => e,
        None => return,
    };
    let _serial = serial().await;
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "rbacpol", |ns| async move {
        let role = format!("cnimig-policy-probe-{ns}");
        let k = common::probe_account(&admin, &ns, &role).await;
        let rules = role_rules(RBAC_POLICY);
        let set_rules = |rules: Vec<Value>| common::set_role_rules(&admin, &role, rules);
        for (i, rule) in rules.iter().enumerate() {
            // The probe: by the rule's first group, resource and verb.
            let resource = format!(
                "{}/{}/{}",
                rule["apiGroups"][0].as_str().unwrap(),
                rule["resources"][0].as_str().unwrap(),
                rule["verbs"][0].as_str().unwrap()
            );
            let without: Vec<Value> = rules
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, r)| r.clone())
                .collect();
            set_rules(without).await;
            let mut forbidden = Ok(false);
            for _ in 0..50 {
                forbidden = call(&k, &ns, &resource).await;
                if forbidden == Ok(true) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert_eq!(
                forbidden,
                Ok(true),
                "without rule {i} ({resource}) the call is not Forbidden"
            );
            set_rules(rules.clone()).await;
            let mut allowed = Ok(true);
            for _ in 0..50 {
                allowed = call(&k, &ns, &resource).await;
                if allowed == Ok(false) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert_eq!(
                allowed,
                Ok(false),
                "with rule {i} ({resource}) the call still fails"
            );
        }
        common::drop_probe_account(&admin, &role).await;
        clean_up(&admin).await;
    })
    .await;
}

/// Removes the allow rule the probes wrote.
async fn clean_up(admin: &Client) {
    for (kind, plural, name) in [
        ("GlobalNetworkPolicy", "globalnetworkpolicies", POLICY_NAME),
        ("Tier", "tiers", TIER_NAME),
    ] {
        let api: Api<DynamicObject> = Api::all_with(
            admin.clone(),
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("crd.projectcalico.org", "v1", kind),
                plural,
            ),
        );
        let _ = api.delete(name, &DeleteParams::default()).await;
    }
}
