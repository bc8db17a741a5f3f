//! Policy conversion on a cluster: Calico's policies read from its CRDs, the converted Cilium
//! policies checked with a server-side dry run, then created or updated.
//!
//! | function | API calls |
//! |---|---|
//! | [`KubeCluster::read_calico_policies`] | discovery of `crd.projectcalico.org/v1`; LIST of `tiers`, `globalnetworkpolicies`, `networkpolicies`, `globalnetworksets`, `networksets` (all namespaces), and of `networkpolicies.networking.k8s.io` for the audit |
//! | [`KubeCluster::dry_run_cilium_policies`] | server-side apply of every object with `dryRun=All` |
//! | [`KubeCluster::apply_cilium_policies`] | the dry run of every object; only if all pass, GET and server-side apply of each |
//!
//! Every object is sent with `dryRun=All` before any is written, so a policy the API server
//! refuses (schema, admission, RBAC, Cilium not installed) stops the run with nothing created.
//!
//! # Caveats
//! The real writes come after the dry run has passed for all of them, one request per object;
//! a write can still fail in between (the API server went away, someone created a conflicting
//! object). [`PolicyApplyError::Partial`] then names what was written and what not; running
//! again converges, since every write is a server-side apply of the same object.

use std::fmt;

use cnimig_core::policy::ParsedDocuments;
use cnimig_core::policy::calico::parse_value;
use cnimig_core::ports::PortError;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::error::port_error;
use crate::{FIELD_MANAGER, KubeCluster};

/// Calico's kinds [`KubeCluster::read_calico_policies`] reads from `crd.projectcalico.org/v1`:
/// kind and resource.
pub const CALICO_POLICY_KINDS: [(&str, &str); 5] = [
    ("Tier", "tiers"),
    ("GlobalNetworkPolicy", "globalnetworkpolicies"),
    ("NetworkPolicy", "networkpolicies"),
    ("GlobalNetworkSet", "globalnetworksets"),
    ("NetworkSet", "networksets"),
];

/// Where a Cilium policy object goes: its kind's resource and its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyTarget {
    /// `CiliumNetworkPolicy` or `CiliumClusterwideNetworkPolicy`.
    pub kind: String,
    /// Namespace (namespaced kinds).
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

impl fmt::Display for PolicyTarget {
    /// `kind [namespace/]name`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// One object's dry run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyDryRun {
    /// The object.
    pub target: PolicyTarget,
    /// `None`: accepted; otherwise the server's refusal (HTTP status and message) or why the
    /// object could not be sent.
    pub refused: Option<String>,
}

/// What a write did to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PolicyWrite {
    /// It did not exist.
    Created,
    /// It existed and its content changed.
    Updated,
    /// It existed with the same content.
    Unchanged,
}

/// Why [`KubeCluster::apply_cilium_policies`] stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyApplyError {
    /// The dry run refused some objects: nothing was written.
    #[error("{} of {total} Cilium policies refused by the API server's dry run; nothing was created or changed:{}", refused.len(), list(refused))]
    Refused {
        /// The refused objects and why.
        refused: Vec<PolicyDryRun>,
        /// Objects in the run.
        total: usize,
    },
    /// The dry run passed but a real write failed: some objects were written, the rest not.
    #[error("writing {failed} failed after {} of {total} were written ({error}); run again to finish: every write is a server-side apply of the same object", written.len())]
    Partial {
        /// Written before the failure, in order.
        written: Vec<(PolicyTarget, PolicyWrite)>,
        /// The object whose write failed.
        failed: PolicyTarget,
        /// The error.
        error: String,
        /// Objects in the run.
        total: usize,
    },
}

fn list(refused: &[PolicyDryRun]) -> String {
    refused
        .iter()
        .map(|r| {
            format!(
                "\n  - {}: {}",
                r.target,
                r.refused.as_deref().unwrap_or("refused")
            )
        })
        .collect()
}

fn cilium_resource(kind: &str) -> Option<(ApiResource, bool)> {
    let (plural, namespaced) = match kind {
        "CiliumNetworkPolicy" => ("ciliumnetworkpolicies", true),
        "CiliumClusterwideNetworkPolicy" => ("ciliumclusterwidenetworkpolicies", false),
        _ => return None,
    };
    Some((
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("cilium.io", "v2", kind), plural),
        namespaced,
    ))
}

/// The object's target, or why it is not a Cilium policy this module writes.
fn target(object: &Value) -> Result<PolicyTarget, String> {
    let s = |p: &str| {
        object
            .pointer(p)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let kind = s("/kind").unwrap_or_default();
    let name = s("/metadata/name").unwrap_or_default();
    let namespace = s("/metadata/namespace");
    let t = PolicyTarget {
        kind: kind.clone(),
        namespace: namespace.clone(),
        name: name.clone(),
    };
    if s("/apiVersion").as_deref() != Some("cilium.io/v2") {
        return Err(format!(
            "{t}: apiVersion is not cilium.io/v2; only Cilium policies are applied"
        ));
    }
    let Some((_, namespaced)) = cilium_resource(&kind) else {
        return Err(format!(
            "{t}: not a CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy"
        ));
    };
    if name.is_empty() {
        return Err(format!("{t}: metadata.name is missing"));
    }
    if namespaced != namespace.is_some() {
        return Err(format!(
            "{t}: a {kind} {} a namespace",
            if namespaced { "needs" } else { "has no" }
        ));
    }
    Ok(t)
}

fn refusal(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.code == 404 && s.message.contains("namespaces") => {
            format!("404 {}: create the namespace first", s.message)
        }
        kube::Error::Api(s) if s.code == 404 => format!(
            "404 {}: is Cilium installed (its ciliumnetworkpolicies / \
             ciliumclusterwidenetworkpolicies CRDs, cilium.io/v2)?",
            s.message
        ),
        kube::Error::Api(s) => format!("{} {}", s.code, s.message),
        other => other.to_string(),
    }
}

impl KubeCluster {
    fn policy_api(&self, t: &PolicyTarget) -> Option<Api<DynamicObject>> {
        let (ar, _) = cilium_resource(&t.kind)?;
        Some(match &t.namespace {
            Some(ns) => Api::namespaced_with(self.client().clone(), ns, &ar),
            None => Api::all_with(self.client().clone(), &ar),
        })
    }

    /// Reads Calico's policies, tiers and network sets from `crd.projectcalico.org/v1` (every
    /// namespace), the namespaces' labels (for network sets selected through a
    /// `namespaceSelector`), and Kubernetes `NetworkPolicy` objects for the audit, into the
    /// documents the conversion takes (as [`cnimig_core::policy::parse_documents`] would from a
    /// file).
    /// A kind the cluster does not serve (`tiers` before Calico v3.28) is skipped.
    ///
    /// # Errors
    /// [`PortError::NotFound`] when `crd.projectcalico.org/v1` is not served (no Calico in
    /// Kubernetes-datastore mode); any failed list.
    ///
    /// # RBAC
    /// `list` on `tiers`, `globalnetworkpolicies`, `networkpolicies`, `globalnetworksets`,
    /// `networksets` (`crd.projectcalico.org`), `namespaces` and `networkpolicies`
    /// (`networking.k8s.io`): `deploy/rbac-policy.yaml`.
    pub async fn read_calico_policies(&self) -> Result<ParsedDocuments, PortError> {
        let served = match self
            .client()
            .list_api_group_resources("crd.projectcalico.org/v1")
            .await
        {
            Ok(l) => l.resources.into_iter().map(|r| r.name).collect::<Vec<_>>(),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                return Err(PortError::NotFound {
                    what: "crd.projectcalico.org/v1 (Calico's CRDs; is Calico installed in \
                           Kubernetes-datastore mode?)"
                        .into(),
                });
            }
            Err(e) => return Err(port_error("discover", "/apis/crd.projectcalico.org/v1", e)),
        };
        let mut out = ParsedDocuments::default();
        let mut index = 0;
        for (kind, plural) in CALICO_POLICY_KINDS {
            if !served.iter().any(|r| r == plural) {
                continue;
            }
            let ar = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("crd.projectcalico.org", "v1", kind),
                plural,
            );
            let api: Api<DynamicObject> = Api::all_with(self.client().clone(), &ar);
            let items = api
                .list(&ListParams::default())
                .await
                .map_err(|e| port_error("list", format!("{plural}.crd.projectcalico.org"), e))?;
            for o in items.items {
                let doc = json!({
                    "apiVersion": "crd.projectcalico.org/v1",
                    "kind": kind,
                    "metadata": {"name": o.metadata.name, "namespace": o.metadata.namespace,
                                 "labels": o.metadata.labels},
                    "spec": o.data.get("spec").cloned().unwrap_or_else(|| json!({})),
                });
                parse_value(&doc, &mut index, &mut out);
            }
        }
        // The namespaces' labels: Calico matches a rule's namespaceSelector against them, also
        // when it selects NetworkSets (without them such a rule converts as partial).
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> =
            Api::all(self.client().clone());
        let items = namespaces
            .list_metadata(&ListParams::default())
            .await
            .map_err(|e| port_error("list", "namespaces", e))?;
        for n in items.items {
            let doc = json!({"apiVersion": "v1", "kind": "Namespace",
                             "metadata": {"name": n.metadata.name, "labels": n.metadata.labels}});
            parse_value(&doc, &mut index, &mut out);
        }
        let knp: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
            Api::all(self.client().clone());
        let items = knp
            .list(&ListParams::default())
            .await
            .map_err(|e| port_error("list", "networkpolicies.networking.k8s.io", e))?;
        for mut p in items.items {
            p.metadata.managed_fields = None;
            let mut doc = serde_json::to_value(&p).map_err(|e| PortError::Invalid {
                what: "a Kubernetes NetworkPolicy".into(),
                detail: e.to_string(),
            })?;
            doc["apiVersion"] = json!("networking.k8s.io/v1");
            doc["kind"] = json!("NetworkPolicy");
            parse_value(&doc, &mut index, &mut out);
        }
        Ok(out)
    }

    /// Sends every object with `dryRun=All` (server-side apply, field manager `cnimig`):
    /// authorised, validated against the CRD schema and admitted like the real write, never
    /// persisted. One answer per object, in order.
    ///
    /// # RBAC
    /// `create` and `patch` on `ciliumnetworkpolicies`, `ciliumclusterwidenetworkpolicies`
    /// (`cilium.io`): `deploy/rbac-policy.yaml`.
    pub async fn dry_run_cilium_policies(&self, objects: &[Value]) -> Vec<PolicyDryRun> {
        let mut pp = PatchParams::apply(FIELD_MANAGER).force();
        pp.dry_run = true;
        let mut out = Vec::with_capacity(objects.len());
        for o in objects {
            let t = match target(o) {
                Ok(t) => t,
                Err(why) => {
                    out.push(PolicyDryRun {
                        target: PolicyTarget {
                            kind: o["kind"].as_str().unwrap_or("").into(),
                            namespace: o["metadata"]["namespace"].as_str().map(str::to_string),
                            name: o["metadata"]["name"].as_str().unwrap_or("").into(),
                        },
                        refused: Some(why),
                    });
                    continue;
                }
            };
            let refused = match self.policy_api(&t) {
                Some(api) => match api.patch(&t.name, &pp, &Patch::Apply(o)).await {
                    Ok(_) => None,
                    Err(e) => Some(refusal(&e)),
                },
                None => Some("not a Cilium policy kind".into()),
            };
            out.push(PolicyDryRun { target: t, refused });
        }
        out
    }

    /// Dry-runs every object ([`KubeCluster::dry_run_cilium_policies`]); only when all pass,
    /// and only with `write`, creates or updates each (server-side apply, field manager
    /// `cnimig`, forced: a converted policy replaces what another manager set in the same
    /// fields). Returns each object's dry run, and what the writes did (empty without `write`).
    ///
    /// # Errors
    /// [`PolicyApplyError::Refused`] (nothing written) when the dry run refused any object;
    /// [`PolicyApplyError::Partial`] when a real write failed after the dry run passed.
    ///
    /// # RBAC
    /// `get`, `create` and `patch` on `ciliumnetworkpolicies`,
    /// `ciliumclusterwidenetworkpolicies` (`cilium.io`): `deploy/rbac-policy.yaml`.
    pub async fn apply_cilium_policies(
        &self,
        objects: &[Value],
        write: bool,
    ) -> Result<(Vec<PolicyDryRun>, Vec<(PolicyTarget, PolicyWrite)>), PolicyApplyError> {
        let dry = self.dry_run_cilium_policies(objects).await;
        let refused: Vec<PolicyDryRun> = dry
            .iter()
            .filter(|d| d.refused.is_some())
            .cloned()
            .collect();
        if !refused.is_empty() {
            return Err(PolicyApplyError::Refused {
                refused,
                total: objects.len(),
            });
        }
        let mut written = Vec::new();
        if !write {
            return Ok((dry, written));
        }
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        for (o, d) in objects.iter().zip(&dry) {
            let t = d.target.clone();
            let fail = |error: String, written: Vec<(PolicyTarget, PolicyWrite)>| {
                PolicyApplyError::Partial {
                    written,
                    failed: t.clone(),
                    error,
                    total: objects.len(),
                }
            };
            let Some(api) = self.policy_api(&t) else {
                return Err(fail("not a Cilium policy kind".into(), written));
            };
            let before = match api.get_opt(&t.name).await {
                Ok(b) => b,
                Err(e) => return Err(fail(refusal(&e), written)),
            };
            let after = match api.patch(&t.name, &pp, &Patch::Apply(o)).await {
                Ok(a) => a,
                Err(e) => return Err(fail(refusal(&e), written)),
            };
            let what = match before {
                None => PolicyWrite::Created,
                Some(b) if b.metadata.resource_version == after.metadata.resource_version => {
                    PolicyWrite::Unchanged
                }
                Some(_) => PolicyWrite::Updated,
            };
            written.push((t, what));
        }
        Ok((dry, written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cilium_policies_with_the_right_scope_are_targets() {
        let cnp = json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                         "metadata": {"name": "a", "namespace": "shop"}});
        assert_eq!(
            target(&cnp).unwrap().to_string(),
            "CiliumNetworkPolicy shop/a"
        );
        let ccnp = json!({"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
                          "metadata": {"name": "b"}});
        assert_eq!(
            target(&ccnp).unwrap().to_string(),
            "CiliumClusterwideNetworkPolicy b"
        );
        let no_ns = json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                           "metadata": {"name": "a"}});
        assert!(target(&no_ns).unwrap_err().contains("needs a namespace"));
        let other = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
        assert!(target(&other).unwrap_err().contains("only Cilium policies"));
    }

    #[test]
    fn a_missing_namespace_is_not_blamed_on_cilium() {
        let status = |message: &str| {
            kube::Error::Api(
                kube::core::Status::failure(message, "NotFound")
                    .with_code(404)
                    .boxed(),
            )
        };
        let ns = refusal(&status("namespaces \"x\" not found"));
        assert!(
            ns.contains("create the namespace") && !ns.contains("Cilium"),
            "{ns}"
        );
        let crd = refusal(&status("the server could not find the requested resource"));
        assert!(crd.contains("is Cilium installed"), "{crd}");
    }

    #[test]
    fn a_refusal_lists_every_refused_policy() {
        let e = PolicyApplyError::Refused {
            refused: vec![PolicyDryRun {
                target: PolicyTarget {
                    kind: "CiliumNetworkPolicy".into(),
                    namespace: Some("shop".into()),
                    name: "a".into(),
                },
                refused: Some(
                    "422 spec.ingress[0].toPorts[0].ports[0].protocol: Unsupported value".into(),
                ),
            }],
            total: 3,
        };
        let text = e.to_string();
        assert!(
            text.contains("1 of 3") && text.contains("nothing was created"),
            "{text}"
        );
        assert!(text.contains("CiliumNetworkPolicy shop/a: 422"), "{text}");
    }
}
