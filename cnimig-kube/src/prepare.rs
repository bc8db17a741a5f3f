//! Prepare on a cluster: applies the Calico autodetection change planned by
//! [`cnimig_core::prepare::autodetection_change`], saving the exact previous value on the object
//! it changes, waits for the `calico-node` rollout, undoes it exactly, and checks every node's
//! `projectcalico.org/IPv4Address` against its InternalIP.
//!
//! Consent: nothing here runs on its own. The caller shows
//! [`AutodetectionFix::describe`](cnimig_core::prepare::AutodetectionFix::describe) in the plan
//! and calls [`KubeCluster::apply_autodetection_fix`] only after the user agreed (`--yes`).
//!
//! Undo record: the annotation [`AUTODETECTION_UNDO_ANNOTATION`] on the changed object (the
//! `calico-node` DaemonSet for manifest installs, `Installation default` for operator installs)
//! holds `{"before": V}`, where `V` is the whole previous `IP_AUTODETECTION_METHOD` env entry
//! (or the previous `nodeAddressAutodetectionV4` object), or `null` when there was none. A second
//! apply keeps the first record, so undo always returns to the state before cnimig. Every write
//! is one JSON patch with a `test` of `resourceVersion`: the value and the record change together
//! or not at all.
//!
//! # RBAC
//! `patch` `daemonsets` (apps) and `installations` (`operator.tigera.io`) from
//! `deploy/rbac-verify.yaml`; `get` of both and `list` `nodes` from `deploy/rbac.yaml`.

use std::net::Ipv4Addr;
use std::time::Duration;

use cnimig_core::config::MigrationConfig;
use cnimig_core::model::Time;
use cnimig_core::model::{Autodetection, CalicoFacts, CalicoInstall};
use cnimig_core::orchestrator::RunReport;
use cnimig_core::ports::{Clock, LockOutcome, PortError, StateStore};
use cnimig_core::prepare::{
    AutodetectChange, AutodetectionFix, PrepareError, abandoned, autodetection_change,
    calico_address_problems, manifest_value, operator_value, user_actions,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::KubeCluster;
use crate::error::port_error;

/// Annotation holding the value an autodetection change replaced (`{"before": V}`).
pub const AUTODETECTION_UNDO_ANNOTATION: &str = "cnimig.io/autodetection-before";
/// Calico's node annotation with the address `calico-node` autodetected (`ADDR/PREFIX`).
pub const CALICO_IPV4_ANNOTATION: &str = "projectcalico.org/IPv4Address";
const ENV: &str = "IP_AUTODETECTION_METHOD";
/// The DaemonSet the operator renders from `Installation default`.
const OPERATOR_DS: (&str, &str) = ("calico-system", "calico-node");

fn esc(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

fn annotation_ops(obj: &Value, record: Option<Value>) -> Vec<Value> {
    let key = format!(
        "/metadata/annotations/{}",
        esc(AUTODETECTION_UNDO_ANNOTATION)
    );
    let has_annotations = obj["metadata"]["annotations"].is_object();
    let present = obj["metadata"]["annotations"][AUTODETECTION_UNDO_ANNOTATION].is_string();
    match record {
        Some(r) if !has_annotations => vec![json!({"op": "add", "path": "/metadata/annotations",
            "value": {AUTODETECTION_UNDO_ANNOTATION: r.to_string()}})],
        Some(r) => vec![json!({"op": "add", "path": key, "value": r.to_string()})],
        None if present
            && obj["metadata"]["annotations"]
                .as_object()
                .is_some_and(|a| a.len() == 1) =>
        {
            vec![json!({"op": "remove", "path": "/metadata/annotations"})]
        }
        None if present => vec![json!({"op": "remove", "path": key})],
        None => Vec::new(),
    }
}

fn saved_before(obj: &Value) -> Result<Option<Value>, String> {
    let Some(raw) = obj["metadata"]["annotations"][AUTODETECTION_UNDO_ANNOTATION].as_str() else {
        return Ok(None);
    };
    let v: Value = serde_json::from_str(raw).map_err(|e| {
        format!("annotation {AUTODETECTION_UNDO_ANNOTATION} is not JSON ({e}); restore the value by hand and remove the annotation")
    })?;
    v.get("before").cloned().map(Some).ok_or_else(|| {
        format!("annotation {AUTODETECTION_UNDO_ANNOTATION} has no \"before\"; restore the value by hand and remove the annotation")
    })
}

fn container_index(ds: &Value, container: &str) -> Result<usize, String> {
    ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().position(|c| c["name"] == container))
        .ok_or_else(|| {
            format!("the DaemonSet has no container {container:?}; is this Calico's calico-node DaemonSet?")
        })
}

/// The env slot: `(path of the env array, its entries, index of IP_AUTODETECTION_METHOD)`.
fn env_slot(ds: &Value, container: &str) -> Result<(String, Vec<Value>, Option<usize>), String> {
    let ci = container_index(ds, container)?;
    let path = format!("/spec/template/spec/containers/{ci}/env");
    let env = ds["spec"]["template"]["spec"]["containers"][ci]["env"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ei = env.iter().position(|e| e["name"] == ENV);
    Ok((path, env, ei))
}

fn rv_test(obj: &Value) -> Value {
    json!({"op": "test", "path": "/metadata/resourceVersion", "value": obj["metadata"]["resourceVersion"]})
}

/// The JSON patch setting `IP_AUTODETECTION_METHOD=value` on `container` of the DaemonSet `ds`
/// (its JSON), recording the previous entry unless a record exists. Empty when nothing changes.
///
/// # Errors
/// The container is missing, or the record is unreadable.
pub fn manifest_apply_ops(ds: &Value, container: &str, value: &str) -> Result<Vec<Value>, String> {
    let (path, env, ei) = env_slot(ds, container)?;
    let entry = json!({"name": ENV, "value": value});
    let mut ops = vec![rv_test(ds)];
    match ei {
        Some(i) if env[i] == entry => return Ok(Vec::new()),
        Some(i) => {
            ops.push(json!({"op": "replace", "path": format!("{path}/{i}"), "value": entry}))
        }
        None if env.is_empty() => ops.push(json!({"op": "add", "path": path, "value": [entry]})),
        None => ops.push(json!({"op": "add", "path": format!("{path}/-"), "value": entry})),
    }
    if saved_before(ds)?.is_none() {
        let before = ei.map_or(Value::Null, |i| env[i].clone());
        ops.extend(annotation_ops(ds, Some(json!({"before": before}))));
    }
    Ok(ops)
}

/// The JSON patch restoring the recorded entry (or removing the entry when there was none) and
/// the record. `None` when there is no record (nothing to undo).
///
/// # Errors
/// The container is missing, or the record is unreadable.
pub fn manifest_undo_ops(ds: &Value, container: &str) -> Result<Option<Vec<Value>>, String> {
    let Some(before) = saved_before(ds)? else {
        return Ok(None);
    };
    let (path, env, ei) = env_slot(ds, container)?;
    let mut ops = vec![rv_test(ds)];
    match (ei, before.is_null()) {
        (Some(_), true) if env.len() == 1 => ops.push(json!({"op": "remove", "path": path})),
        (Some(i), true) => ops.push(json!({"op": "remove", "path": format!("{path}/{i}")})),
        (Some(i), false) => {
            ops.push(json!({"op": "replace", "path": format!("{path}/{i}"), "value": before}));
        }
        (None, true) => {}
        (None, false) if env.is_empty() => {
            ops.push(json!({"op": "add", "path": path, "value": [before]}));
        }
        (None, false) => {
            ops.push(json!({"op": "add", "path": format!("{path}/-"), "value": before}))
        }
    }
    ops.extend(annotation_ops(ds, None));
    Ok(Some(ops))
}

/// The JSON patch setting `spec.calicoNetwork.nodeAddressAutodetectionV4` of an `Installation`
/// (its JSON) to `value`, recording the previous one unless a record exists. Empty when nothing
/// changes.
///
/// # Errors
/// The record is unreadable.
pub fn operator_apply_ops(inst: &Value, value: &Value) -> Result<Vec<Value>, String> {
    let net = &inst["spec"]["calicoNetwork"];
    let cur = net.get("nodeAddressAutodetectionV4");
    if cur == Some(value) {
        return Ok(Vec::new());
    }
    let mut ops = vec![rv_test(inst)];
    if !inst["spec"].is_object() {
        ops.push(json!({"op": "add", "path": "/spec", "value": {"calicoNetwork": {"nodeAddressAutodetectionV4": value}}}));
    } else if !net.is_object() {
        ops.push(json!({"op": "add", "path": "/spec/calicoNetwork", "value": {"nodeAddressAutodetectionV4": value}}));
    } else {
        ops.push(json!({"op": "add", "path": "/spec/calicoNetwork/nodeAddressAutodetectionV4", "value": value}));
    }
    if saved_before(inst)?.is_none() {
        let before = cur.cloned().unwrap_or(Value::Null);
        ops.extend(annotation_ops(inst, Some(json!({"before": before}))));
    }
    Ok(ops)
}

/// The JSON patch restoring the recorded `nodeAddressAutodetectionV4` (removing it when there was
/// none) and the record. `None` when there is no record.
///
/// # Errors
/// The record is unreadable.
pub fn operator_undo_ops(inst: &Value) -> Result<Option<Vec<Value>>, String> {
    let Some(before) = saved_before(inst)? else {
        return Ok(None);
    };
    let path = "/spec/calicoNetwork/nodeAddressAutodetectionV4";
    let present = inst["spec"]["calicoNetwork"]
        .get("nodeAddressAutodetectionV4")
        .is_some();
    let mut ops = vec![rv_test(inst)];
    if before.is_null() {
        if present {
            ops.push(json!({"op": "remove", "path": path}));
        }
    } else if inst["spec"]["calicoNetwork"].is_object() {
        ops.push(json!({"op": "add", "path": path, "value": before}));
    } else {
        ops.push(json!({"op": "add", "path": "/spec/calicoNetwork", "value": {"nodeAddressAutodetectionV4": before}}));
    }
    ops.extend(annotation_ops(inst, None));
    Ok(Some(ops))
}

/// True when the DaemonSet has rolled out `method` everywhere: the controller has seen the
/// latest spec, every scheduled pod runs the current template and is available, and the
/// template's `IP_AUTODETECTION_METHOD` is `method` (`None`: unset).
#[must_use]
pub fn rolled_out(ds: &Value, container: &str, method: Option<&str>) -> bool {
    let st = &ds["status"];
    let n = |v: &Value| v.as_i64().unwrap_or(0);
    let current = env_slot(ds, container)
        .ok()
        .and_then(|(_, env, ei)| ei.map(|i| env[i]["value"].as_str().map(str::to_string)))
        .flatten();
    current.as_deref() == method
        && n(&st["observedGeneration"]) >= n(&ds["metadata"]["generation"])
        && n(&st["updatedNumberScheduled"]) == n(&st["desiredNumberScheduled"])
        && n(&st["numberAvailable"]) == n(&st["desiredNumberScheduled"])
        && n(&st["numberUnavailable"]) == 0
}

fn installation_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("operator.tigera.io", "v1", "Installation"),
        "installations",
    )
}

fn patch_params(dry_run: bool) -> PatchParams {
    let p = PatchParams::default();
    if dry_run { p.dry_run() } else { p }
}

fn invalid(what: &str, detail: String) -> PortError {
    PortError::Invalid {
        what: what.into(),
        detail,
    }
}

impl KubeCluster {
    async fn json_patch_ds(
        &self,
        ns: &str,
        name: &str,
        ops: Vec<Value>,
        dry_run: bool,
    ) -> Result<(), PortError> {
        let what = format!("DaemonSet {ns}/{name}");
        let patch: json_patch::Patch =
            serde_json::from_value(Value::Array(ops)).map_err(|e| invalid(&what, e.to_string()))?;
        let api: Api<DaemonSet> = Api::namespaced(self.inner.client.clone(), ns);
        api.patch(name, &patch_params(dry_run), &Patch::<()>::Json(patch))
            .await
            .map_err(|e| port_error("patch", what, e))?;
        Ok(())
    }

    async fn get_ds_json(&self, ns: &str, name: &str) -> Result<Value, PortError> {
        let what = format!("DaemonSet {ns}/{name}");
        let api: Api<DaemonSet> = Api::namespaced(self.inner.client.clone(), ns);
        let ds = api
            .get(name)
            .await
            .map_err(|e| port_error("get", &what, e))?;
        serde_json::to_value(&ds).map_err(|e| invalid(&what, e.to_string()))
    }

    async fn installation(&self, name: &str) -> Result<(Api<DynamicObject>, Value), PortError> {
        let what = format!("Installation {name}");
        let api: Api<DynamicObject> =
            Api::all_with(self.inner.client.clone(), &installation_resource());
        let o = api
            .get(name)
            .await
            .map_err(|e| port_error("get", &what, e))?;
        let v = serde_json::to_value(&o).map_err(|e| invalid(&what, e.to_string()))?;
        Ok((api, v))
    }

    /// Applies `fix` (call it only after the user agreed to the plan line
    /// [`AutodetectionFix::describe`]) and waits up to `timeout` for `calico-node` to roll out
    /// with the new method. Re-applying is harmless and keeps the first undo record.
    ///
    /// # Errors
    /// Read or write failures, a changed object ([`PortError::Conflict`]: re-plan), a DaemonSet
    /// without the `calico-node` container ([`PortError::Invalid`]), or a rollout not finished
    /// in time ([`PortError::Timeout`]; the change stays, undo with
    /// [`KubeCluster::undo_autodetection_fix`]).
    ///
    /// Returns whether it wrote (`false`: the method was already set).
    pub async fn apply_autodetection_fix(
        &self,
        fix: &AutodetectionFix,
        timeout: Duration,
    ) -> Result<bool, PortError> {
        let wrote = self.write_autodetection_fix(fix, false).await?;
        let (ns, ds, container) = match &fix.target {
            AutodetectChange::ManifestEnv {
                namespace,
                daemon_set,
                container,
            } => (namespace.as_str(), daemon_set.as_str(), container.as_str()),
            AutodetectChange::OperatorInstallation { .. } => {
                (OPERATOR_DS.0, OPERATOR_DS.1, "calico-node")
            }
        };
        let method = manifest_value(&fix.after);
        self.wait_calico_rollout(ns, ds, container, Some(&method), timeout)
            .await?;
        Ok(wrote)
    }

    /// Reads the target of `fix` and sends its JSON patch (with `dryRun=All` when `dry_run`);
    /// `Ok(false)` when the method is already set, so nothing is sent.
    async fn write_autodetection_fix(
        &self,
        fix: &AutodetectionFix,
        dry_run: bool,
    ) -> Result<bool, PortError> {
        match &fix.target {
            AutodetectChange::ManifestEnv {
                namespace,
                daemon_set,
                container,
            } => {
                let ds = self.get_ds_json(namespace, daemon_set).await?;
                let ops = manifest_apply_ops(&ds, container, &manifest_value(&fix.after))
                    .map_err(|d| invalid(&format!("DaemonSet {namespace}/{daemon_set}"), d))?;
                if ops.is_empty() {
                    return Ok(false);
                }
                self.json_patch_ds(namespace, daemon_set, ops, dry_run)
                    .await?;
            }
            AutodetectChange::OperatorInstallation { name } => {
                let (api, inst) = self.installation(name).await?;
                let what = format!("Installation {name}");
                let ops = operator_apply_ops(&inst, &operator_value(&fix.after))
                    .map_err(|d| invalid(&what, d))?;
                if ops.is_empty() {
                    return Ok(false);
                }
                self.json_patch_dynamic(&api, name, &what, ops, dry_run)
                    .await?;
            }
        }
        Ok(true)
    }

    async fn json_patch_dynamic(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        what: &str,
        ops: Vec<Value>,
        dry_run: bool,
    ) -> Result<(), PortError> {
        let patch: json_patch::Patch =
            serde_json::from_value(Value::Array(ops)).map_err(|e| invalid(what, e.to_string()))?;
        api.patch(name, &patch_params(dry_run), &Patch::<()>::Json(patch))
            .await
            .map_err(|e| port_error("patch", what, e))?;
        Ok(())
    }

    /// Undoes the change recorded on `target`'s object: writes the saved value back exactly
    /// (or removes the entry when there was none), removes the record, and waits up to
    /// `timeout` for the `calico-node` rollout. `Ok(false)` when there is no record (nothing to
    /// undo, nothing written).
    ///
    /// # Errors
    /// As [`KubeCluster::apply_autodetection_fix`]; an unreadable record is
    /// [`PortError::Invalid`] and nothing is written.
    pub async fn undo_autodetection_fix(
        &self,
        target: &AutodetectChange,
        timeout: Duration,
    ) -> Result<bool, PortError> {
        match target {
            AutodetectChange::ManifestEnv {
                namespace,
                daemon_set,
                container,
            } => {
                let ds = self.get_ds_json(namespace, daemon_set).await?;
                let what = format!("DaemonSet {namespace}/{daemon_set}");
                let Some(ops) = manifest_undo_ops(&ds, container).map_err(|d| invalid(&what, d))?
                else {
                    return Ok(false);
                };
                let before = saved_before(&ds).ok().flatten().unwrap_or(Value::Null);
                self.json_patch_ds(namespace, daemon_set, ops, false)
                    .await?;
                let method = before["value"].as_str().map(str::to_string);
                self.wait_calico_rollout(
                    namespace,
                    daemon_set,
                    container,
                    method.as_deref(),
                    timeout,
                )
                .await?;
                Ok(true)
            }
            AutodetectChange::OperatorInstallation { name } => {
                let (api, inst) = self.installation(name).await?;
                let what = format!("Installation {name}");
                let Some(ops) = operator_undo_ops(&inst).map_err(|d| invalid(&what, d))? else {
                    return Ok(false);
                };
                let before = saved_before(&inst).ok().flatten().unwrap_or(Value::Null);
                self.json_patch_dynamic(&api, name, &what, ops, false)
                    .await?;
                // The operator renders an absent method as first-found.
                let method = manifest_value(&crate::calico::operator_autodetection(&before));
                let (ns, ds) = OPERATOR_DS;
                self.wait_calico_rollout(ns, ds, "calico-node", Some(&method), timeout)
                    .await?;
                Ok(true)
            }
        }
    }

    /// Waits until the DaemonSet has rolled out `method` on every node ([`rolled_out`]).
    ///
    /// # Errors
    /// Read failures; [`PortError::Timeout`] naming the counts seen last.
    pub async fn wait_calico_rollout(
        &self,
        ns: &str,
        name: &str,
        container: &str,
        method: Option<&str>,
        timeout: Duration,
    ) -> Result<(), PortError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ds = self.get_ds_json(ns, name).await?;
            if rolled_out(&ds, container, method) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(PortError::Timeout {
                    what: format!(
                        "rollout of DaemonSet {ns}/{name} with IP_AUTODETECTION_METHOD={} after {timeout:?}: status {}; check the calico-node pods (kubectl -n {ns} rollout status ds/{name})",
                        method.unwrap_or("(unset)"),
                        ds["status"]
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The after-install check, run before the first node: every node matching `selector` (a
    /// label selector; `None`: all nodes) must have `projectcalico.org/IPv4Address` equal to one
    /// of its InternalIPs. Returns one line per problem node, naming it; empty means the check
    /// passed. Reads only.
    ///
    /// # Errors
    /// The node list fails.
    pub async fn calico_address_check(
        &self,
        selector: Option<&str>,
    ) -> Result<Vec<String>, PortError> {
        let api: Api<Node> = Api::all(self.inner.client.clone());
        let lp = selector.map_or_else(ListParams::default, |s| ListParams::default().labels(s));
        let nodes = api
            .list(&lp)
            .await
            .map_err(|e| port_error("list", "nodes", e))?;
        let rows: Vec<(String, Vec<Ipv4Addr>, Option<String>)> = nodes
            .items
            .iter()
            .map(|n| {
                let name = n.metadata.name.clone().unwrap_or_default();
                let ips = n
                    .status
                    .as_ref()
                    .and_then(|s| s.addresses.as_ref())
                    .map(|a| {
                        a.iter()
                            .filter(|a| a.type_ == "InternalIP")
                            .filter_map(|a| a.address.parse().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                let ann = n
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(CALICO_IPV4_ANNOTATION).cloned());
                (name, ips, ann)
            })
            .collect();
        Ok(calico_address_problems(&rows))
    }
}

/// What a run does to prepare the cluster before the first node, and what the user must do
/// outside it: part of the plan ([`crate::planning::KubePlan::prepare`]), shown before anything
/// is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparePlan {
    /// How Calico is installed (where the autodetection method lives).
    pub install: CalicoInstall,
    /// The autodetection method in force now.
    pub current: Autodetection,
    /// The change cnimig makes (with consent), if the current method could pick a Cilium
    /// interface.
    pub fix: Option<AutodetectionFix>,
    /// What the user must do outside the cluster (security groups, host firewalls, routers),
    /// with the exact CIDR, ports and protocols; a run asks for confirmation that it is done.
    pub user_actions: Vec<String>,
}

impl PreparePlan {
    /// The prepare part of a plan from Calico's facts and the migration config.
    /// `interface_pattern`: the interface regex Calico should use instead of the node's
    /// InternalIP (`None`: `kubernetes-internal-ip`).
    ///
    /// # Errors
    /// [`PrepareError`] when the pattern is not a regex or could select a Cilium interface.
    pub fn new(
        facts: &CalicoFacts,
        cfg: &MigrationConfig,
        interface_pattern: Option<&str>,
    ) -> Result<Self, PrepareError> {
        let protocol = match cfg.tunnel_protocol {
            cnimig_core::config::TunnelProtocol::Vxlan => "vxlan",
            cnimig_core::config::TunnelProtocol::Geneve => "geneve",
        };
        Ok(PreparePlan {
            install: facts.install,
            current: facts.autodetection.clone(),
            fix: autodetection_change(facts, interface_pattern)?,
            user_actions: user_actions(cfg.pod_cidr, protocol, cfg.effective_tunnel_port(), &[]),
        })
    }

    /// Where an undo looks for cnimig's record: the object a fix for this install changes
    /// (also when this plan has no fix: an earlier run may have applied one).
    #[must_use]
    pub fn undo_target(&self) -> AutodetectChange {
        match &self.fix {
            Some(f) => f.target.clone(),
            None => match self.install {
                CalicoInstall::Manifest => AutodetectChange::ManifestEnv {
                    namespace: "kube-system".into(),
                    daemon_set: "calico-node".into(),
                    container: "calico-node".into(),
                },
                CalicoInstall::Operator => AutodetectChange::OperatorInstallation {
                    name: "default".into(),
                },
            },
        }
    }

    /// The plan's lines for this part (without headings): the changes, then the check.
    #[must_use]
    pub fn change_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        match &self.fix {
            Some(f) => out.push(format!("1. {}", f.describe())),
            None => out.push(format!(
                "no change: Calico's autodetection ({}) cannot pick Cilium's interfaces",
                manifest_value(&self.current)
            )),
        }
        out.push(format!(
            "{}check on every node that {CALICO_IPV4_ANNOTATION} equals its InternalIP; the run stops before the first node, naming each node that does not",
            if self.fix.is_some() { "2. " } else { "then: " }
        ));
        if self.fix.is_some() {
            out.push(
                "undone exactly when the run is abandoned (it ends with no node on Cilium: every node untouched or rolled back), or when the check fails".into(),
            );
        }
        out
    }
}

/// Why preparing for a run stopped. Nothing is left half-applied: the autodetection change
/// this call made is undone before this is returned (the outcome of that undo is in it).
#[derive(Debug, thiserror::Error)]
pub enum PrepareRunError {
    /// The user has not confirmed the actions outside the cluster. Nothing was written.
    #[error(
        "the actions for you outside the cluster (listed in the plan: security groups, host firewalls, routers) are not confirmed as done; make them, then confirm (--confirm-network-actions, or answer the prompt on a terminal). Nothing changed."
    )]
    NotConfirmed,
    /// Applying the autodetection change, or its rollout, failed.
    #[error("the Calico autodetection change failed: {error}; {undo}")]
    Apply {
        /// The failure.
        error: PortError,
        /// What happened to the change.
        undo: String,
    },
    /// Nodes whose Calico address is not their InternalIP (one line each, naming the node).
    #[error("Calico's node addresses are wrong, nothing was migrated: {}; {undo}", problems.join("; "))]
    AddressMismatch {
        /// One line per node.
        problems: Vec<String>,
        /// What happened to the change this call made.
        undo: String,
    },
    /// The address check could not read the nodes.
    #[error("the Calico address check could not read the nodes: {error}; {undo}")]
    Check {
        /// The failure.
        error: PortError,
        /// What happened to the change this call made.
        undo: String,
    },
    /// Another run holds the Lease. Nothing was written.
    #[error(
        "another run holds the Lease ({holder}, until {until:?}); nothing changed. If that run died, run again once its Lease expires."
    )]
    Locked {
        /// The holder.
        holder: String,
        /// Its expiry (milliseconds since the Unix epoch).
        until: Time,
    },
    /// The Lease could not be read or written. Nothing was written.
    #[error("the run's Lease could not be taken: {error}; nothing changed")]
    Lease {
        /// The failure.
        error: PortError,
    },
}

/// What [`KubeCluster::prepare_run`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    /// Whether it wrote the autodetection change (`false`: none needed, or already there).
    pub applied: bool,
}

impl KubeCluster {
    /// Sends the autodetection change of `fix` with server-side `dryRun=All` (authorised and
    /// admitted like the real write, never persisted). `Ok(false)` when nothing would be written.
    ///
    /// # Errors
    /// The read or the dry-run write is refused; the object is not what cnimig expects.
    pub async fn dry_run_autodetection_fix(
        &self,
        fix: &AutodetectionFix,
    ) -> Result<bool, PortError> {
        self.write_autodetection_fix(fix, true).await
    }

    /// Prepares the cluster for a run, before the first node is touched, in this order:
    /// refuses unless `network_actions_confirmed` (the user confirmed [`PreparePlan::user_actions`]);
    /// applies [`PreparePlan::fix`] and waits up to `timeout` for Calico's rollout; then checks
    /// every node (within [`crate::KubeOptions::node_selector`]) has
    /// `projectcalico.org/IPv4Address` equal to its InternalIP. Call it only after the user
    /// agreed to the plan (`--yes`).
    ///
    /// It first takes the run's Lease as `holder` (the orchestrator's
    /// [`RunOptions::holder`](cnimig_core::orchestrator::RunOptions::holder), which then takes it
    /// over), for `timeout` plus a minute, so that of two runs started at once only one changes
    /// Calico; the other gets [`PrepareRunError::Locked`] with nothing written. On success the
    /// Lease stays held; on failure it is released.
    ///
    /// On any failure the change this call wrote is undone (and the error says how that went);
    /// a change an earlier run recorded is left for [`KubeCluster::undo_if_abandoned`].
    ///
    /// # Errors
    /// [`PrepareRunError`], each naming what to do.
    pub async fn prepare_run(
        &self,
        plan: &PreparePlan,
        network_actions_confirmed: bool,
        holder: &str,
        timeout: Duration,
    ) -> Result<Prepared, PrepareRunError> {
        if !network_actions_confirmed {
            return Err(PrepareRunError::NotConfirmed);
        }
        match self.take_lease(holder, timeout).await {
            Ok(None) => {}
            Ok(Some((holder, until))) => return Err(PrepareRunError::Locked { holder, until }),
            Err(error) => return Err(PrepareRunError::Lease { error }),
        }
        let r = self.prepare_locked(plan, timeout).await;
        if r.is_err() {
            // Best effort: a Lease left held only delays the next run until it expires.
            let _ = self.release_lock(holder).await;
        }
        r
    }

    /// Takes the Lease as `holder` for `timeout` plus a minute; `Some((holder, until))` when
    /// another run holds it.
    async fn take_lease(
        &self,
        holder: &str,
        timeout: Duration,
    ) -> Result<Option<(String, Time)>, PortError> {
        let ttl = timeout.saturating_add(Duration::from_secs(60));
        match self.acquire_lock(holder, self.now(), ttl).await? {
            LockOutcome::Acquired => Ok(None),
            LockOutcome::HeldBy { holder, until } => Ok(Some((holder, until))),
        }
    }

    async fn prepare_locked(
        &self,
        plan: &PreparePlan,
        timeout: Duration,
    ) -> Result<Prepared, PrepareRunError> {
        let mut applied = false;
        if let Some(fix) = &plan.fix {
            match self.apply_autodetection_fix(fix, timeout).await {
                Ok(w) => applied = w,
                Err(error) => {
                    let undo = self.undo_after_failure(&fix.target, true, timeout).await;
                    return Err(PrepareRunError::Apply { error, undo });
                }
            }
        }
        let selector = self.options().node_selector.clone();
        match self.calico_address_check(selector.as_deref()).await {
            Ok(problems) if problems.is_empty() => Ok(Prepared { applied }),
            Ok(problems) => {
                let undo = self
                    .undo_after_failure(&plan.undo_target(), applied, timeout)
                    .await;
                Err(PrepareRunError::AddressMismatch { problems, undo })
            }
            Err(error) => {
                let undo = self
                    .undo_after_failure(&plan.undo_target(), applied, timeout)
                    .await;
                Err(PrepareRunError::Check { error, undo })
            }
        }
    }

    async fn undo_after_failure(
        &self,
        target: &AutodetectChange,
        wrote: bool,
        timeout: Duration,
    ) -> String {
        if !wrote {
            return "nothing was changed".into();
        }
        match self.undo_autodetection_fix(target, timeout).await {
            Ok(true) => "the autodetection change was undone".into(),
            Ok(false) => "there was no autodetection change to undo".into(),
            Err(e) => format!(
                "undoing the autodetection change failed too ({e}): the record is in annotation {AUTODETECTION_UNDO_ANNOTATION}; run again to retry, or restore the value it names by hand"
            ),
        }
    }

    /// After a run: when it was abandoned ([`cnimig_core::prepare::abandoned`]: no node on
    /// Cilium), undoes the recorded autodetection change (this run's or an earlier one's) with
    /// [`KubeCluster::undo_prepared`]. `Ok(true)` when something was undone. A run that is not
    /// abandoned changes nothing here.
    ///
    /// # Errors
    /// As [`KubeCluster::undo_prepared`].
    pub async fn undo_if_abandoned(
        &self,
        plan: &PreparePlan,
        report: &RunReport,
        holder: &str,
        timeout: Duration,
    ) -> Result<bool, PortError> {
        if !abandoned(report) {
            return Ok(false);
        }
        self.undo_prepared(plan, holder, timeout).await
    }

    /// Undoes the recorded autodetection change under the run's Lease (taken as `holder` again:
    /// the orchestrator releases it when a run ends) and waits up to `timeout` for Calico's
    /// rollout, then releases the Lease. `Ok(true)` when something was undone.
    ///
    /// # Errors
    /// [`PortError::Conflict`] when another run took the Lease since (the change is left to
    /// it, nothing written); otherwise as [`KubeCluster::undo_autodetection_fix`].
    pub async fn undo_prepared(
        &self,
        plan: &PreparePlan,
        holder: &str,
        timeout: Duration,
    ) -> Result<bool, PortError> {
        if let Some((other, _)) = self.take_lease(holder, timeout).await? {
            return Err(PortError::Conflict {
                what: format!(
                    "the run's Lease (now held by {other}, another run, which owns Calico's autodetection change from here; nothing undone)"
                ),
            });
        }
        let r = self
            .undo_autodetection_fix(&plan.undo_target(), timeout)
            .await;
        let _ = self.release_lock(holder).await;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(doc: &Value, ops: Vec<Value>) -> Value {
        let mut d = doc.clone();
        let p: json_patch::Patch = serde_json::from_value(Value::Array(ops)).unwrap();
        json_patch::patch(&mut d, &p).unwrap();
        d
    }

    fn ds(env: Value) -> Value {
        let mut c = json!({"name": "calico-node", "image": "calico/node"});
        if !env.is_null() {
            c["env"] = env;
        }
        json!({"metadata": {"name": "calico-node", "resourceVersion": "7"},
               "spec": {"template": {"spec": {"containers": [{"name": "other"}, c]}}}})
    }

    #[test]
    fn manifest_round_trips_exactly() {
        for env in [
            Value::Null,
            json!([{"name": "A", "value": "1"}]),
            json!([{"name": "A", "value": "1"}, {"name": ENV, "value": "first-found"}]),
            json!([{"name": ENV, "valueFrom": {"configMapKeyRef": {"name": "x", "key": "y"}}}]),
        ] {
            let d0 = ds(env);
            let d1 = apply(
                &d0,
                manifest_apply_ops(&d0, "calico-node", "kubernetes-internal-ip").unwrap(),
            );
            assert!(rolled_out(
                &json!({"metadata": {"generation": 1}, "spec": d1["spec"], "status": {"observedGeneration": 1}}),
                "calico-node",
                Some("kubernetes-internal-ip")
            ));
            // Re-applying changes nothing.
            assert!(
                manifest_apply_ops(&d1, "calico-node", "kubernetes-internal-ip")
                    .unwrap()
                    .is_empty()
            );
            // A second, different apply keeps the first record.
            let d2 = apply(
                &d1,
                manifest_apply_ops(&d1, "calico-node", "interface=^eth0$").unwrap(),
            );
            let d3 = apply(&d2, manifest_undo_ops(&d2, "calico-node").unwrap().unwrap());
            assert_eq!(d3, d0);
            assert_eq!(manifest_undo_ops(&d3, "calico-node").unwrap(), None);
        }
        assert!(
            manifest_apply_ops(&ds(Value::Null), "nope", "x")
                .unwrap_err()
                .contains("no container")
        );
    }

    #[test]
    fn operator_round_trips_exactly() {
        for spec in [
            json!({}),
            json!({"calicoNetwork": {"bgp": "Disabled"}}),
            json!({"calicoNetwork": {"nodeAddressAutodetectionV4": {"firstFound": true}}}),
        ] {
            let i0 = json!({"metadata": {"name": "default", "resourceVersion": "3", "annotations": {"a": "b"}}, "spec": spec});
            let v = json!({"kubernetes": "NodeInternalIP"});
            let i1 = apply(&i0, operator_apply_ops(&i0, &v).unwrap());
            assert_eq!(i1["spec"]["calicoNetwork"]["nodeAddressAutodetectionV4"], v);
            let i2 = apply(&i1, operator_undo_ops(&i1).unwrap().unwrap());
            let mut want = i0.clone();
            if spec_has_no_network(&i0) {
                want["spec"]["calicoNetwork"] = json!({});
            }
            assert_eq!(i2, want);
        }
    }

    fn spec_has_no_network(i: &Value) -> bool {
        i["spec"]["calicoNetwork"].is_null()
    }

    #[test]
    fn bad_record_is_refused() {
        let mut d = ds(Value::Null);
        d["metadata"]["annotations"] = json!({AUTODETECTION_UNDO_ANNOTATION: "{oops"});
        assert!(
            manifest_undo_ops(&d, "calico-node")
                .unwrap_err()
                .contains("by hand")
        );
    }
}
