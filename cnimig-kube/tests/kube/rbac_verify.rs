//! Least privilege for `deploy/rbac-verify.yaml`, the way `rbac.rs` does it for
//! `deploy/rbac.yaml`: for each (API group, resource, verb) the verify role grants, a
//! ServiceAccount bound to `deploy/rbac.yaml`'s role plus the verify role with just that verb
//! removed runs the call that needs it, which must fail with `Forbidden` naming the adapter's
//! verb and the object; with both roles whole the same call must not be forbidden. A grant with
//! no call that needs it fails the test (an excess grant: remove it), and so does a grant
//! `deploy/rbac.yaml` already gives.

use std::collections::BTreeSet;
use std::time::Duration;

use cnimig_core::model::Autodetection;
use cnimig_core::ports::PortError;
use cnimig_core::prepare::{AutodetectChange, AutodetectionFix};
use cnimig_kube::KubeCluster;
use cnimig_kube::goldpinger::{GoldpingerOptions, GoldpingerVerifier, manifests};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind};
use kube::config::KubeConfigOptions;
use kube::{Client, Config};
use serde_json::{Value, json};

use crate::common::{self, unique};
use crate::rbac::{allowed, bind, grants, role_rules, unbind, without_grant};

/// The ClusterRole `cnimig-verify` of deploy/rbac-verify.yaml: its rules.
fn verify_rules() -> Vec<Value> {
    let docs =
        cnimig_emu::setup::yaml_docs(include_str!("../../../deploy/rbac-verify.yaml")).unwrap();
    let role = docs
        .into_iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "cnimig-verify")
        .expect("deploy/rbac-verify.yaml has ClusterRole cnimig-verify");
    role["rules"].as_array().cloned().unwrap_or_default()
}

/// The call that needs (`resource`, `verb`), and what its `Forbidden` must name: the adapter's
/// verb and a piece of the object.
fn expected(resource: &str, verb: &str) -> Option<(&'static str, &'static str)> {
    Some(match (resource, verb) {
        ("services/proxy", "get") => ("get", "services/proxy"),
        ("serviceaccounts", "create" | "patch") => ("apply", "serviceaccount "),
        ("services", "create" | "patch") => ("apply", "service "),
        ("daemonsets", "create" | "patch") => ("apply", "daemonset "),
        ("clusterroles", "create" | "patch") => ("apply", "clusterrole "),
        ("clusterrolebindings", "create" | "patch") => ("apply", "clusterrolebinding "),
        ("installations", "get") => ("get", "Installation "),
        ("installations", "patch") => ("patch", "Installation "),
        _ => return None,
    })
}

fn installations() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("operator.tigera.io", "v1", "Installation"),
        "installations",
    )
}

/// Runs the call that needs (`resource`, `verb`) as `sa`. `Ok` or a non-`Forbidden` error means
/// the API server let it through.
async fn run_call(admin: &Client, ns: &str, sa: &Config, resource: &str) -> Result<(), PortError> {
    let client = Client::try_from(sa.clone()).unwrap();
    match resource {
        "services/proxy" => {
            let mut opts = common::opts(ns);
            opts.node_selector = Some(format!("cnimig.io/e2e={ns}"));
            let v = GoldpingerVerifier::new(
                KubeCluster::new(sa.clone(), opts).unwrap(),
                GoldpingerOptions {
                    namespace: ns.into(),
                    name: "gpx".into(),
                    request_timeout: Duration::from_secs(10),
                    ..GoldpingerOptions::default()
                },
            )
            .unwrap();
            v.check_all().await.map(drop)
        }
        "installations" => {
            // An Installation of its own (the operator only reads `default`, which other tests
            // share), asking for first-found, so the fix patches it.
            let name = unique("inst");
            cnimig_emu::setup::apply(
                admin,
                &json!({"apiVersion": "operator.tigera.io/v1", "kind": "Installation",
                "metadata": {"name": name},
                "spec": {"calicoNetwork": {"nodeAddressAutodetectionV4": {"firstFound": true}}}}),
            )
            .await
            .unwrap();
            let cluster = KubeCluster::new(sa.clone(), common::opts(ns)).unwrap();
            let fix = AutodetectionFix {
                target: AutodetectChange::OperatorInstallation { name: name.clone() },
                before: Autodetection::FirstFound,
                after: Autodetection::KubernetesInternalIp,
            };
            // Past the write it waits for calico-node to roll out, which no operator does
            // here: a timeout means the Installation was read and patched.
            let r = cluster
                .apply_autodetection_fix(&fix, Duration::from_secs(1))
                .await
                .map(drop);
            let api: Api<DynamicObject> = Api::all_with(admin.clone(), &installations());
            let _ = api.delete(&name, &DeleteParams::default()).await;
            r
        }
        _ => {
            // Goldpinger's objects under a fresh name, so each apply creates them.
            let name = unique("gpr");
            let m = manifests(&GoldpingerOptions {
                namespace: ns.into(),
                name: name.clone(),
                ..GoldpingerOptions::default()
            });
            let r = m.apply(&client).await;
            for plural in ["clusterroles", "clusterrolebindings"] {
                let ar = ApiResource {
                    group: "rbac.authorization.k8s.io".into(),
                    version: "v1".into(),
                    api_version: "rbac.authorization.k8s.io/v1".into(),
                    kind: String::new(),
                    plural: plural.into(),
                };
                let api: Api<DynamicObject> = Api::all_with(admin.clone(), &ar);
                let _ = api.delete(&name, &DeleteParams::default()).await;
            }
            r
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grant_of_deploy_rbac_verify_is_needed() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    let admin_config = Config::from_kubeconfig(&KubeConfigOptions::default())
        .await
        .unwrap();
    let base = role_rules();
    let verify = verify_rules();
    let granted = grants(&verify);
    let base_grants = grants(&base);
    let twice: Vec<_> = granted.intersection(&base_grants).collect();
    assert!(
        twice.is_empty(),
        "deploy/rbac-verify.yaml grants {twice:?}, which deploy/rbac.yaml already grants: remove them from rbac-verify.yaml"
    );
    let unneeded: Vec<_> = granted
        .iter()
        .filter(|(_, r, v)| expected(r, v).is_none())
        .collect();
    assert!(
        unneeded.is_empty(),
        "deploy/rbac-verify.yaml grants {unneeded:?}, which no verification or prepare call uses: remove them"
    );

    common::with_temp_ns(admin.clone(), "rbacv", |ns| async move {
        let (gp, nodes) = crate::goldpinger::goldpinger_behind_a_service(&admin, &ns).await;
        let all: Vec<Value> = base.iter().chain(&verify).cloned().collect();
        let (full, full_name) = bind(&admin, &admin_config, &ns, &all, ("", "services/proxy", "get")).await;
        let mut report = Vec::new();
        for (group, resource, verb) in &granted {
            let (adapter_verb, what) = expected(resource, verb).expect("checked above");
            // Whole: through (the proxy may need a moment to see the Endpoints).
            let mut r = run_call(&admin, &ns, &full, resource).await;
            for _ in 0..10 {
                if r.is_ok() || matches!(r, Err(PortError::Timeout { .. })) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                r = run_call(&admin, &ns, &full, resource).await;
            }
            assert!(
                !matches!(r, Err(PortError::Forbidden { .. })),
                "{group}/{resource} {verb}: forbidden even with both roles whole: {r:?}"
            );
            if *resource != "installations" {
                r.unwrap_or_else(|e| panic!("{group}/{resource} {verb}: the call fails with both roles whole: {e}"));
            }
            // Without this verb: forbidden, naming it.
            let reduced: Vec<Value> = base
                .iter()
                .cloned()
                .chain(without_grant(&verify, group, resource, verb))
                .collect();
            let (cfg, name) = bind(&admin, &admin_config, &ns, &reduced, ("", "nodes", "list")).await;
            let user = format!("system:serviceaccount:{ns}:{name}");
            assert!(!allowed(&admin, &user, group, resource, verb).await, "the reduced role still allows {group}/{resource} {verb}");
            let r = run_call(&admin, &ns, &cfg, resource).await;
            unbind(&admin, &name).await;
            match &r {
                Err(PortError::Forbidden { verb: v, what: w }) if v == adapter_verb && w.contains(what) => {
                    report.push(format!("{group}/{resource} {verb} -> Forbidden({v} {w})"));
                }
                other => panic!(
                    "without {group}/{resource} {verb} the call should be Forbidden({adapter_verb} {what}…), got {other:?}: \
                     if it passes, the grant is not needed (remove it from deploy/rbac-verify.yaml)"
                ),
            }
        }
        unbind(&admin, &full_name).await;
        drop(gp);
        for n in &nodes {
            common::delete_node(&admin, n).await;
        }
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "rbac-verify: {} grants, each needed:\n  {}", report.len(), report.join("\n  "));
    })
    .await;
}

/// The grants the test walks are the file's: a sanity check that parsing found them.
#[test]
fn the_verify_role_parses() {
    let g: BTreeSet<_> = grants(&verify_rules());
    assert!(
        g.contains(&(String::new(), "services/proxy".into(), "get".into())),
        "{g:?}"
    );
}
