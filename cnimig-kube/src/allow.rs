//! The temporary Calico allow rule on Kubernetes: [`AllowRulePort`] on [`KubeCluster`].
//!
//! The objects ([`cnimig_core::allow`]) go to `crd.projectcalico.org/v1`, the CRDs every
//! Kubernetes-datastore Calico has, or to `projectcalico.org/v3` on a Calico in native-v3-CRD
//! mode; [`KubeCluster::allow_rule_api`] picks one from API discovery
//! ([`cnimig_core::allow::choose_api`]) before any write.
//!
//! | method | API calls |
//! |---|---|
//! | `allow_rule_api` | GET `/apis/crd.projectcalico.org/v1`, GET `/apis/projectcalico.org/v3` (discovery; no RBAC needed) |
//! | `apply_allow_rule` | discovery; server-side apply of the Tier, then of the GlobalNetworkPolicy |
//! | [`KubeCluster::dry_run_allow_rule`] | discovery; the same two applies with `dryRun=All` |
//! | `remove_allow_rule` | discovery; DELETE of the policy, then of the Tier (404, or no Calico API, is success) |
//! | `allow_rule_present` | discovery; GET of the GlobalNetworkPolicy |
//!
//! The permissions are in `deploy/rbac-policy.yaml` (apply, get) and `deploy/rbac-finalize.yaml`
//! (delete).

use async_trait::async_trait;
use cnimig_core::allow::{
    AllowRuleApiError, AllowRulePort, CalicoApi, POLICY_NAME, TIER_NAME, choose_api, policy_object,
    tier_object,
};
use cnimig_core::ports::PortError;
use ipnet::Ipv4Net;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
};

use crate::cleanup::DeleteTarget;
use crate::error::port_error;
use crate::{FIELD_MANAGER, KubeCluster};

/// The objects [`AllowRulePort::remove_allow_rule`] deletes on `api`, in order: the policy,
/// then its Tier (Calico's API server refuses to delete a Tier that still holds policies).
#[must_use]
pub fn allow_rule_targets(api: CalicoApi) -> Vec<DeleteTarget> {
    vec![
        DeleteTarget {
            group: api.group().into(),
            version: api.version().into(),
            kind: "GlobalNetworkPolicy".into(),
            plural: "globalnetworkpolicies".into(),
            namespace: None,
            name: POLICY_NAME.into(),
        },
        DeleteTarget {
            group: api.group().into(),
            version: api.version().into(),
            kind: "Tier".into(),
            plural: "tiers".into(),
            namespace: None,
            name: TIER_NAME.into(),
        },
    ]
}

fn resource(api: CalicoApi, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(api.group(), api.version(), kind),
        plural,
    )
}

impl KubeCluster {
    /// The resources (plurals) `group_version` serves, `None` when it is not served (404).
    pub(crate) async fn served_resources(
        &self,
        group_version: &str,
    ) -> Result<Option<Vec<String>>, PortError> {
        match self.client().list_api_group_resources(group_version).await {
            Ok(list) => Ok(Some(list.resources.into_iter().map(|r| r.name).collect())),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(e) => Err(port_error("discover", format!("/apis/{group_version}"), e)),
        }
    }

    /// Where the allow rule lives on this cluster: the outer error is a failed discovery, the
    /// inner one says Calico has no tiers or no API at all (see
    /// [`cnimig_core::allow::choose_api`]).
    ///
    /// # Errors
    /// A discovery request that failed for another reason than 404.
    ///
    /// # RBAC
    /// None (discovery is open to every authenticated user).
    pub async fn allow_rule_api(&self) -> Result<Result<CalicoApi, AllowRuleApiError>, PortError> {
        let v1 = self.served_resources("crd.projectcalico.org/v1").await?;
        let v3 = self.served_resources("projectcalico.org/v3").await?;
        Ok(choose_api(v1.as_deref(), v3.as_deref()))
    }

    /// Server-side applies the Tier, then the policy (field manager `cnimig`, forced), with
    /// `dryRun=All` when `dry_run`. Returns the API used and the objects as the server answered
    /// (what it stored, or would store on a dry run).
    ///
    /// # Errors
    /// [`PortError::Invalid`] when Calico has no tiers (older than v3.28) or no API, before
    /// anything is sent; any refused write (a dry run that is refused changes nothing either).
    ///
    /// # RBAC
    /// `patch` and `create` on `tiers`, `globalnetworkpolicies` (`crd.projectcalico.org`, or
    /// `projectcalico.org` in native-v3-CRD mode): `deploy/rbac-policy.yaml`.
    pub async fn write_allow_rule(
        &self,
        cilium_cidr: Ipv4Net,
        dry_run: bool,
    ) -> Result<(CalicoApi, Vec<DynamicObject>), PortError> {
        let api = self.allow_rule_api().await??;
        let mut pp = PatchParams::apply(FIELD_MANAGER).force();
        pp.dry_run = dry_run;
        let tiers: Api<DynamicObject> =
            Api::all_with(self.client().clone(), &resource(api, "Tier", "tiers"));
        let policies: Api<DynamicObject> = Api::all_with(
            self.client().clone(),
            &resource(api, "GlobalNetworkPolicy", "globalnetworkpolicies"),
        );
        let tier = tiers
            .patch(TIER_NAME, &pp, &Patch::Apply(&tier_object(api)))
            .await
            .map_err(|e| port_error("apply", format!("tiers.{} {TIER_NAME}", api.group()), e))?;
        let policy = policies
            .patch(
                POLICY_NAME,
                &pp,
                &Patch::Apply(&policy_object(api, cilium_cidr)),
            )
            .await
            .map_err(|e| {
                port_error(
                    "apply",
                    format!("globalnetworkpolicies.{} {POLICY_NAME}", api.group()),
                    e,
                )
            })?;
        Ok((api, vec![tier, policy]))
    }

    /// The allow rule's two applies sent with `dryRun=All`: authorised, validated and admitted
    /// like the real ones, never persisted.
    ///
    /// # Errors
    /// As [`KubeCluster::write_allow_rule`].
    ///
    /// # RBAC
    /// As [`KubeCluster::write_allow_rule`].
    pub async fn dry_run_allow_rule(
        &self,
        cilium_cidr: Ipv4Net,
    ) -> Result<(CalicoApi, Vec<DynamicObject>), PortError> {
        self.write_allow_rule(cilium_cidr, true).await
    }
}

#[async_trait]
impl AllowRulePort for KubeCluster {
    /// [`KubeCluster::write_allow_rule`] for real.
    ///
    /// # RBAC
    /// As [`KubeCluster::write_allow_rule`].
    async fn apply_allow_rule(&self, cilium_cidr: Ipv4Net) -> Result<(), PortError> {
        self.write_allow_rule(cilium_cidr, false).await.map(|_| ())
    }

    /// Deletes the policy, then the Tier. Absent (404), or no Calico API with tiers at all
    /// (nothing of ours can exist there), is success.
    ///
    /// # RBAC
    /// `delete` on `tiers`, `globalnetworkpolicies` (`crd.projectcalico.org`, or
    /// `projectcalico.org` in native-v3-CRD mode): `deploy/rbac-finalize.yaml`.
    async fn remove_allow_rule(&self) -> Result<(), PortError> {
        let Ok(api) = self.allow_rule_api().await? else {
            return Ok(());
        };
        for t in allow_rule_targets(api) {
            match t
                .api(self.client())
                .delete(&t.name, &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(port_error("delete", t.to_string(), e)),
            }
        }
        Ok(())
    }

    /// # RBAC
    /// `get` on `globalnetworkpolicies` (`crd.projectcalico.org`, or `projectcalico.org` in
    /// native-v3-CRD mode): `deploy/rbac-policy.yaml`.
    async fn allow_rule_present(&self) -> Result<bool, PortError> {
        let Ok(api) = self.allow_rule_api().await? else {
            return Ok(false);
        };
        let policies: Api<DynamicObject> = Api::all_with(
            self.client().clone(),
            &resource(api, "GlobalNetworkPolicy", "globalnetworkpolicies"),
        );
        match policies.get_opt(POLICY_NAME).await {
            Ok(o) => Ok(o.is_some()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(port_error(
                "get",
                format!("globalnetworkpolicies.{} {POLICY_NAME}", api.group()),
                e,
            )),
        }
    }
}
