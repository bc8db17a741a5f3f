//! GitOps controllers that would undo the migration's changes (FACTS.md, "Rancher"). Pure:
//! reads and JSON patches of Argo CD Applications and Fleet objects as JSON.
//!
//! - **Argo CD** (`argoproj.io/v1alpha1` Application): one with `spec.syncPolicy.automated` and
//!   `selfHeal: true` reverts changes to what it tracks (`status.resources[]`). [`argo_app`]
//!   reads one and says what it covers (Calico, Cilium, the cluster agent); with
//!   `--pause-gitops`, [`argo_pause_patch`] removes `automated` and saves it in the annotation
//!   [`ARGO_SAVED_ANNOTATION`] in one guarded request, and [`argo_restore_patch`] puts it back
//!   exactly once (the same pattern as [`crate::agent`]).
//! - **Fleet** lives in the Rancher management cluster (`fleet.cattle.io/v1alpha1` GitRepo and
//!   Bundle, `spec.paused`): cnimig reports what to pause there ([`fleet_bundle`]), it does not
//!   pause it.

use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, TestOperation};
use serde::Serialize;
use serde_json::Value;

/// The Application annotation holding the `spec.syncPolicy.automated` cnimig removed, as JSON.
pub const ARGO_SAVED_ANNOTATION: &str = "cnimig.io/argocd-automated-original";

/// What a GitOps object covers that the migration changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Covers {
    /// Calico's objects (its DaemonSets, the operator, its CRs, the `rke2-calico` chart).
    Calico,
    /// Cilium's objects.
    Cilium,
    /// Rancher's cluster agent.
    ClusterAgent,
}

/// What an object (group, kind, namespace, name) is, for the migration.
#[must_use]
pub fn classify(group: &str, kind: &str, namespace: &str, name: &str) -> Option<Covers> {
    let name_l = name.to_ascii_lowercase();
    if namespace == crate::agent::AGENT_NAMESPACE && name == crate::agent::AGENT_NAME {
        return Some(Covers::ClusterAgent);
    }
    if group == "cilium.io" || name_l.starts_with("cilium") || name_l == "rke2-cilium" {
        return Some(Covers::Cilium);
    }
    if group.ends_with("projectcalico.org")
        || group == "operator.tigera.io"
        || matches!(
            namespace,
            "calico-system" | "tigera-operator" | "calico-apiserver"
        )
        || name_l.contains("calico")
        || name_l.contains("tigera")
        || (kind == "DaemonSet" && name_l == "canal")
    {
        return Some(Covers::Calico);
    }
    None
}

/// An Argo CD Application, as far as the migration cares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArgoApp {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.syncPolicy.automated` is set.
    pub automated: bool,
    /// `spec.syncPolicy.automated.selfHeal` is true.
    pub self_heal: bool,
    /// cnimig paused it (the annotation [`ARGO_SAVED_ANNOTATION`] is present).
    pub paused_by_cnimig: bool,
    /// What it covers, from `status.resources[]` and its sources' chart names and paths.
    pub covers: Vec<Covers>,
}

impl ArgoApp {
    /// It would revert the migration's changes: automated self-heal over something covered.
    #[must_use]
    pub fn reverts_changes(&self) -> bool {
        self.automated && self.self_heal && !self.covers.is_empty()
    }
}

/// Reads an Application.
#[must_use]
pub fn argo_app(app: &Value) -> ArgoApp {
    let s = |p: &str| app.pointer(p).and_then(Value::as_str).unwrap_or("");
    let automated = app.pointer("/spec/syncPolicy/automated");
    let mut covers: Vec<Covers> = app
        .pointer("/status/resources")
        .and_then(Value::as_array)
        .map(|rs| {
            rs.iter()
                .filter_map(|r| {
                    let f = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("");
                    classify(f("group"), f("kind"), f("namespace"), f("name"))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut sources: Vec<&Value> = app.pointer("/spec/source").into_iter().collect();
    if let Some(a) = app.pointer("/spec/sources").and_then(Value::as_array) {
        sources.extend(a);
    }
    for src in sources {
        for key in ["chart", "path"] {
            if let Some(v) = src.get(key).and_then(Value::as_str) {
                let last = v.rsplit('/').next().unwrap_or(v);
                if let Some(c) = classify("", "", "", last) {
                    covers.push(c);
                }
            }
        }
    }
    covers.sort();
    covers.dedup();
    ArgoApp {
        namespace: s("/metadata/namespace").to_string(),
        name: s("/metadata/name").to_string(),
        automated: automated.is_some_and(|a| !a.is_null()),
        self_heal: automated
            .and_then(|a| a.get("selfHeal"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
        paused_by_cnimig: app
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(ARGO_SAVED_ANNOTATION))
            .is_some(),
        covers,
    }
}

fn ann_path() -> String {
    format!(
        "/metadata/annotations/{}",
        ARGO_SAVED_ANNOTATION.replace('~', "~0").replace('/', "~1")
    )
}

fn ptr(s: &str) -> jsonptr::PointerBuf {
    s.parse().unwrap_or_default()
}

use json_patch::jsonptr;

/// The patch that pauses auto-sync: removes `spec.syncPolicy.automated` and saves it in
/// [`ARGO_SAVED_ANNOTATION`], guarded by a `test` of `resourceVersion`. `None` when there is no
/// `automated` or cnimig already paused it.
#[must_use]
pub fn argo_pause_patch(app: &Value) -> Option<Patch> {
    let automated = app
        .pointer("/spec/syncPolicy/automated")
        .filter(|a| !a.is_null())?;
    if argo_app(app).paused_by_cnimig {
        return None;
    }
    let rv = app.pointer("/metadata/resourceVersion")?.clone();
    let saved = Value::String(automated.to_string());
    let mut ops = vec![PatchOperation::Test(TestOperation {
        path: ptr("/metadata/resourceVersion"),
        value: rv,
    })];
    if app
        .pointer("/metadata/annotations")
        .is_some_and(Value::is_object)
    {
        ops.push(PatchOperation::Add(AddOperation {
            path: ptr(&ann_path()),
            value: saved,
        }));
    } else {
        ops.push(PatchOperation::Add(AddOperation {
            path: ptr("/metadata/annotations"),
            value: serde_json::json!({ ARGO_SAVED_ANNOTATION: saved }),
        }));
    }
    ops.push(PatchOperation::Remove(RemoveOperation {
        path: ptr("/spec/syncPolicy/automated"),
    }));
    Some(Patch(ops))
}

/// The patch that restores the saved `automated` and removes the annotation, guarded by a
/// `test` of the annotation (exactly once). `None` when cnimig did not pause it.
///
/// # Errors
/// A message when the annotation is not valid JSON (restore by hand).
pub fn argo_restore_patch(app: &Value) -> Result<Option<Patch>, String> {
    let Some(raw) = app
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(ARGO_SAVED_ANNOTATION))
        .and_then(Value::as_str)
    else {
        return Ok(None);
    };
    let automated: Value = serde_json::from_str(raw).map_err(|e| {
        format!(
            "annotation {ARGO_SAVED_ANNOTATION} on Application {}/{} is not JSON ({e}); restore spec.syncPolicy.automated by hand and delete the annotation",
            app.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or(""),
            app.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("")
        )
    })?;
    let mut ops = vec![PatchOperation::Test(TestOperation {
        path: ptr(&ann_path()),
        value: Value::String(raw.to_string()),
    })];
    if app
        .pointer("/spec/syncPolicy")
        .is_some_and(Value::is_object)
    {
        ops.push(PatchOperation::Add(AddOperation {
            path: ptr("/spec/syncPolicy/automated"),
            value: automated,
        }));
    } else {
        ops.push(PatchOperation::Add(AddOperation {
            path: ptr("/spec/syncPolicy"),
            value: serde_json::json!({ "automated": automated }),
        }));
    }
    ops.push(PatchOperation::Remove(RemoveOperation {
        path: ptr(&ann_path()),
    }));
    Ok(Some(Patch(ops)))
}

/// A Fleet Bundle (management cluster) that deploys something the migration changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FleetBundle {
    /// Namespace (the Fleet workspace, e.g. `fleet-default`).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The GitRepo it comes from (label `fleet.cattle.io/repo-name`), if any.
    pub git_repo: Option<String>,
    /// `spec.paused`.
    pub paused: bool,
    /// What its resources mention.
    pub covers: Vec<Covers>,
}

impl FleetBundle {
    /// What to run in the management cluster to pause it.
    #[must_use]
    pub fn pause_command(&self) -> String {
        match &self.git_repo {
            Some(repo) => format!(
                "kubectl -n {} patch gitrepos.fleet.cattle.io {repo} --type merge -p '{{\"spec\":{{\"paused\":true}}}}'",
                self.namespace
            ),
            None => format!(
                "kubectl -n {} patch bundles.fleet.cattle.io {} --type merge -p '{{\"spec\":{{\"paused\":true}}}}'",
                self.namespace, self.name
            ),
        }
    }
}

/// Reads a Bundle: what its resources (`spec.resources[].name` and `.content`) mention. `None`
/// when it covers nothing the migration changes.
#[must_use]
pub fn fleet_bundle(bundle: &Value) -> Option<FleetBundle> {
    let mut covers = Vec::new();
    for r in bundle
        .pointer("/spec/resources")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let text = format!(
            "{} {}",
            r.get("name").and_then(Value::as_str).unwrap_or(""),
            r.get("content").and_then(Value::as_str).unwrap_or("")
        );
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.')) {
            if let Some(c) = classify("", "", "", word) {
                covers.push(c);
            }
            if word == crate::agent::AGENT_NAME {
                covers.push(Covers::ClusterAgent);
            }
        }
    }
    covers.sort();
    covers.dedup();
    if covers.is_empty() {
        return None;
    }
    let s = |p: &str| {
        bundle
            .pointer(p)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    Some(FleetBundle {
        namespace: s("/metadata/namespace").unwrap_or_default(),
        name: s("/metadata/name").unwrap_or_default(),
        git_repo: bundle
            .pointer("/metadata/labels")
            .and_then(|l| l.get("fleet.cattle.io/repo-name"))
            .and_then(Value::as_str)
            .map(str::to_string),
        paused: bundle
            .pointer("/spec/paused")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        covers,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    fn app(sync: Value, resources: Value) -> Value {
        json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
               "metadata": {"name": "net", "namespace": "argocd", "resourceVersion": "5"},
               "spec": {"source": {"repoURL": "https://git.example/infra", "path": "clusters/prod/addons"},
                        "syncPolicy": sync},
               "status": {"resources": resources}})
    }

    #[test]
    fn finds_self_healing_apps_over_calico_cilium_and_the_agent() {
        let res = json!([{"group": "apps", "kind": "DaemonSet", "namespace": "kube-system", "name": "calico-node"},
                         {"group": "apps", "kind": "Deployment", "namespace": "cattle-system", "name": "cattle-cluster-agent"},
                         {"group": "", "kind": "ConfigMap", "namespace": "web", "name": "site"}]);
        let a = argo_app(&app(
            json!({"automated": {"prune": true, "selfHeal": true}}),
            res.clone(),
        ));
        assert!(a.reverts_changes());
        assert_eq!(a.covers, vec![Covers::Calico, Covers::ClusterAgent]);
        let manual = argo_app(&app(json!({"automated": {"prune": true}}), res));
        assert!(
            !manual.reverts_changes(),
            "no selfHeal: it does not revert live changes"
        );
        let other = argo_app(&app(
            json!({"automated": {"selfHeal": true}}),
            json!([{"group": "", "kind": "Service", "namespace": "web", "name": "site"}]),
        ));
        assert!(!other.reverts_changes());
        let chart = argo_app(&json!({"metadata": {"name": "c", "namespace": "argocd"},
            "spec": {"source": {"chart": "cilium"}, "syncPolicy": {"automated": {"selfHeal": true}}}}));
        assert_eq!(chart.covers, vec![Covers::Cilium]);
    }

    #[test]
    fn pause_and_restore_once() {
        let original = app(
            json!({"automated": {"prune": true, "selfHeal": true}, "syncOptions": ["CreateNamespace=true"]}),
            json!([]),
        );
        let mut v = original.clone();
        json_patch::patch(&mut v, &argo_pause_patch(&original).unwrap()).unwrap();
        assert!(v.pointer("/spec/syncPolicy/automated").is_none());
        assert!(argo_app(&v).paused_by_cnimig);
        assert!(argo_pause_patch(&v).is_none(), "paused once");
        let restore = argo_restore_patch(&v).unwrap().unwrap();
        let mut r = v.clone();
        json_patch::patch(&mut r, &restore).unwrap();
        assert_eq!(r["spec"], original["spec"]);
        assert_eq!(r["metadata"]["annotations"], json!({}));
        assert_eq!(argo_restore_patch(&r).unwrap(), None);
        assert!(
            json_patch::patch(&mut r, &restore).is_err(),
            "a replayed restore fails its test"
        );
        // Not automated: nothing to pause.
        assert!(argo_pause_patch(&app(json!({}), json!([]))).is_none());
        let mut bad = v.clone();
        bad["metadata"]["annotations"][ARGO_SAVED_ANNOTATION] = json!("{");
        assert!(argo_restore_patch(&bad).unwrap_err().contains("by hand"));
    }

    #[test]
    fn fleet_bundles_report_what_to_pause() {
        let b = json!({"metadata": {"name": "infra-calico", "namespace": "fleet-default",
                                    "labels": {"fleet.cattle.io/repo-name": "infra"}},
                       "spec": {"resources": [{"name": "calico/values.yaml", "content": "installation:\n  calicoNetwork: {}"}]}});
        let f = fleet_bundle(&b).unwrap();
        assert_eq!(f.covers, vec![Covers::Calico]);
        assert!(!f.paused);
        assert_eq!(
            f.pause_command(),
            "kubectl -n fleet-default patch gitrepos.fleet.cattle.io infra --type merge -p '{\"spec\":{\"paused\":true}}'"
        );
        assert!(
            fleet_bundle(
                &json!({"spec": {"resources": [{"name": "web.yaml", "content": "kind: Service"}]}})
            )
            .is_none()
        );
    }
}
