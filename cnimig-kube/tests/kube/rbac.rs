//! Least privilege: every verb `deploy/rbac.yaml` grants is needed.
//!
//! For each (API group, resource, verb) of the ClusterRole `cnimig`, the test binds a fresh
//! ServiceAccount to a copy of the role with just that verb removed, and runs a probe: an adapter
//! call that needs it. With the verb removed the call must fail with `Forbidden` naming the verb
//! the adapter attempted (the probe's `adapter_verb`) and the object; with the full role the same
//! probe must not be forbidden. A grant without a probe fails the test (an excess grant: remove it
//! or add the call that needs it), and so does a probe whose grant is missing from the file.

use std::collections::BTreeSet;
use std::time::Duration;

use cnimig_core::cilium::{CiliumNodeConfig, ValueInputs};
use cnimig_core::config::MigrationConfig;
use cnimig_core::events::{Event, EventSink};
use cnimig_core::model::{NodeName, PodRef, Time};
use cnimig_core::ports::{Cluster, NewCni, OldCni, PortError, StateStore, Verifier};
use cnimig_kube::KubeCluster;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use kube::api::{Api, ListParams, PostParams};
use kube::config::KubeConfigOptions;
use kube::{Client, Config};
use serde_json::{Value, json};

use crate::common::{self, create_node, create_pod, labels, mark_running, unique, wait_until};

/// A grant and the adapter call that shows it is needed.
struct Probe {
    group: &'static str,
    resource: &'static str,
    verb: &'static str,
    /// The verb the adapter names in its `Forbidden` error.
    adapter_verb: &'static str,
    /// A piece of the object the error names.
    what: &'static str,
    /// What the probe calls (for messages).
    call: &'static str,
}

const PROBES: &[Probe] = &[
    Probe {
        group: "",
        resource: "nodes",
        verb: "get",
        adapter_verb: "get",
        what: "node ",
        call: "cni_dir",
    },
    Probe {
        group: "",
        resource: "nodes",
        verb: "list",
        adapter_verb: "list",
        what: "nodes",
        call: "node_names",
    },
    Probe {
        group: "",
        resource: "nodes",
        verb: "patch",
        adapter_verb: "patch",
        what: "node ",
        call: "set_unschedulable",
    },
    Probe {
        group: "",
        resource: "nodes",
        verb: "watch",
        adapter_verb: "watch",
        what: "nodes",
        call: "node_names holding the run lock",
    },
    Probe {
        group: "",
        resource: "pods",
        verb: "watch",
        adapter_verb: "watch",
        what: "pods on node",
        call: "node_view holding the run lock",
    },
    Probe {
        group: "policy",
        resource: "poddisruptionbudgets",
        verb: "watch",
        adapter_verb: "watch",
        what: "poddisruptionbudgets",
        call: "budget_view holding the run lock",
    },
    Probe {
        group: "",
        resource: "pods",
        verb: "get",
        adapter_verb: "get",
        what: "pod ",
        call: "restore_calico_cni",
    },
    Probe {
        group: "",
        resource: "pods",
        verb: "list",
        adapter_verb: "list",
        what: "pods",
        call: "node_view",
    },
    Probe {
        group: "",
        resource: "pods",
        verb: "create",
        adapter_verb: "create",
        what: "pod ",
        call: "restore_calico_cni",
    },
    Probe {
        group: "",
        resource: "pods",
        verb: "delete",
        adapter_verb: "delete",
        what: "pod ",
        call: "delete_pod",
    },
    Probe {
        group: "",
        resource: "pods/eviction",
        verb: "create",
        adapter_verb: "create",
        what: "pods/eviction",
        call: "evict",
    },
    Probe {
        group: "",
        resource: "configmaps",
        verb: "get",
        adapter_verb: "get",
        what: "cilium-config",
        call: "live_config",
    },
    Probe {
        group: "policy",
        resource: "poddisruptionbudgets",
        verb: "list",
        adapter_verb: "list",
        what: "poddisruptionbudgets",
        call: "budget_view",
    },
    Probe {
        group: "apps",
        resource: "daemonsets",
        verb: "get",
        adapter_verb: "get",
        what: "daemonset",
        call: "inventory",
    },
    Probe {
        group: "networking.k8s.io",
        resource: "servicecidrs",
        verb: "get",
        adapter_verb: "get",
        what: "servicecidr",
        call: "inventory",
    },
    Probe {
        group: "cilium.io",
        resource: "ciliumnodeconfigs",
        verb: "create",
        adapter_verb: "apply",
        what: "ciliumnodeconfig",
        call: "apply_node_config (new)",
    },
    Probe {
        group: "cilium.io",
        resource: "ciliumnodeconfigs",
        verb: "patch",
        adapter_verb: "apply",
        what: "ciliumnodeconfig",
        call: "apply_node_config (existing)",
    },
    Probe {
        group: "cilium.io",
        resource: "ciliumendpoints",
        verb: "get",
        adapter_verb: "get",
        what: "ciliumendpoint",
        call: "verify_node",
    },
    Probe {
        group: "crd.projectcalico.org",
        resource: "ippools",
        verb: "list",
        adapter_verb: "list",
        what: "ippools",
        call: "facts",
    },
    Probe {
        group: "crd.projectcalico.org",
        resource: "felixconfigurations",
        verb: "get",
        adapter_verb: "get",
        what: "felixconfigurations",
        call: "facts",
    },
    Probe {
        group: "operator.tigera.io",
        resource: "installations",
        verb: "get",
        adapter_verb: "get",
        what: "installations",
        call: "facts",
    },
    Probe {
        group: "coordination.k8s.io",
        resource: "leases",
        verb: "get",
        adapter_verb: "get",
        what: "lease ",
        call: "acquire_lock",
    },
    Probe {
        group: "coordination.k8s.io",
        resource: "leases",
        verb: "create",
        adapter_verb: "create",
        what: "lease ",
        call: "acquire_lock (no Lease yet)",
    },
    Probe {
        group: "coordination.k8s.io",
        resource: "leases",
        verb: "update",
        adapter_verb: "update",
        what: "lease ",
        call: "release_lock",
    },
    Probe {
        group: "events.k8s.io",
        resource: "events",
        verb: "create",
        adapter_verb: "create",
        what: "event ",
        call: "record_node_event",
    },
    Probe {
        group: "events.k8s.io",
        resource: "events",
        verb: "patch",
        adapter_verb: "patch",
        what: "event",
        call: "event_sink (the same Event twice)",
    },
];

/// The ClusterRole `cnimig` of deploy/rbac.yaml: its rules, as JSON.
pub(crate) fn role_rules() -> Vec<Value> {
    let docs = cnimig_emu::setup::yaml_docs(cnimig_emu::setup::RBAC).unwrap();
    let role = docs
        .into_iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "cnimig")
        .expect("deploy/rbac.yaml has ClusterRole cnimig");
    role["rules"].as_array().cloned().unwrap_or_default()
}

/// Every (group, resource, verb) the rules grant.
pub(crate) fn grants(rules: &[Value]) -> BTreeSet<(String, String, String)> {
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    let mut out = BTreeSet::new();
    for r in rules {
        for g in strs(&r["apiGroups"]) {
            for res in strs(&r["resources"]) {
                for v in strs(&r["verbs"]) {
                    out.insert((g.clone(), res.clone(), v));
                }
            }
        }
    }
    out
}

/// The rules with one verb taken away from one (group, resource).
fn without(rules: &[Value], p: &Probe) -> Vec<Value> {
    without_grant(rules, p.group, p.resource, p.verb)
}

/// The rules with `verb` taken away from (`group`, `resource`) only.
pub(crate) fn without_grant(
    rules: &[Value],
    group: &str,
    resource: &str,
    verb: &str,
) -> Vec<Value> {
    let mut out = Vec::new();
    for r in rules {
        let covers = r["apiGroups"]
            .as_array()
            .is_some_and(|a| a.iter().any(|g| g == group))
            && r["resources"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == resource));
        if !covers {
            out.push(r.clone());
            continue;
        }
        // Split the rule so only this (group, resource) loses the verb.
        for g in r["apiGroups"].as_array().into_iter().flatten() {
            for res in r["resources"].as_array().into_iter().flatten() {
                let verbs: Vec<&Value> = r["verbs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|v| !(g == group && res == resource && *v == verb))
                    .collect();
                if !verbs.is_empty() {
                    out.push(json!({"apiGroups": [g], "resources": [res], "verbs": verbs}));
                }
            }
        }
    }
    out
}

/// Asks the API server whether `user` may `verb` the resource (a SubjectAccessReview as admin).
pub(crate) async fn allowed(
    admin: &Client,
    user: &str,
    group: &str,
    resource: &str,
    verb: &str,
) -> bool {
    let (res, sub) = resource
        .split_once('/')
        .map_or((resource, None), |(r, s)| (r, Some(s)));
    let sar: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {"user": user, "groups": ["system:serviceaccounts", "system:authenticated"],
                 "resourceAttributes": {"group": group, "resource": res, "subresource": sub,
                                        "verb": verb, "namespace": "default"}}
    }))
    .unwrap();
    let api: Api<SubjectAccessReview> = Api::all(admin.clone());
    api.create(&PostParams::default(), &sar)
        .await
        .ok()
        .and_then(|r| r.status)
        .is_some_and(|s| s.allowed)
}

/// Binds a new ServiceAccount in `ns` to `rules`; returns its client config once the
/// authorizer has seen the binding.
pub(crate) async fn bind(
    admin: &Client,
    admin_config: &Config,
    ns: &str,
    rules: &[Value],
    check: (&str, &str, &str),
) -> (Config, String) {
    let name = unique("rbac");
    for o in [
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": name, "labels": {"cnimig.io/test": "rbac"}}, "rules": rules}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": name, "labels": {"cnimig.io/test": "rbac"}},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
               "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]}),
    ] {
        cnimig_emu::setup::apply(admin, &o).await.unwrap();
    }
    let user = format!("system:serviceaccount:{ns}:{name}");
    wait_until(
        &format!("binding {name} in effect"),
        Duration::from_secs(30),
        || {
            let user = user.clone();
            async move { allowed(admin, &user, check.0, check.1, check.2).await }
        },
    )
    .await;
    let cfg = cnimig_emu::setup::service_account_config(admin, admin_config, ns, &name)
        .await
        .unwrap();
    (cfg, name)
}

pub(crate) async fn unbind(admin: &Client, name: &str) {
    for kind in ["clusterroles", "clusterrolebindings"] {
        let ar = kube::api::ApiResource {
            group: "rbac.authorization.k8s.io".into(),
            version: "v1".into(),
            api_version: "rbac.authorization.k8s.io/v1".into(),
            kind: String::new(),
            plural: kind.into(),
        };
        let api: Api<kube::api::DynamicObject> = Api::all_with(admin.clone(), &ar);
        let _ = api.delete(name, &kube::api::DeleteParams::default()).await;
    }
}

/// What the probe's objects are.
struct Fixture {
    ns: String,
    node: NodeName,
    cfg: MigrationConfig,
}

/// Adapter options for a probe: the test namespace, a Lease of its own.
fn probe_opts(ns: &str, lock: &str) -> cnimig_kube::KubeOptions {
    let mut o = common::opts(ns);
    o.helper_timeout = Duration::from_secs(2);
    o.lock_name = lock.to_string();
    o.node_selector = Some(format!("cnimig.io/rbac={ns}"));
    o
}

/// Runs the probe as the ServiceAccount of `sa`; the full role (`full_sa`) sets up what the
/// probe needs first. `Err` is the adapter's error; `Ok` means the call did what it should.
async fn run_probe(
    p: &Probe,
    fx: &Fixture,
    admin: &Client,
    full_sa: &Config,
    sa: &Config,
) -> Result<(), PortError> {
    let opts = probe_opts(&fx.ns, &unique("lock"));
    let full = KubeCluster::new(full_sa.clone(), opts.clone()).unwrap();
    let cluster = KubeCluster::new(sa.clone(), opts).unwrap();
    let node = &fx.node;
    match (p.resource, p.verb) {
        ("nodes", "get") => cluster.cni_dir(node).await.map(drop),
        ("nodes", "list") => cluster.node_names().await.map(drop),
        ("nodes", "patch") => cluster.set_unschedulable(node, false).await,
        ("pods", "get" | "create") => cluster.restore_calico_cni(node).await,
        ("pods", "list") => cluster.node_view(node).await.map(drop),
        ("pods", "delete") => {
            let name = unique("victim");
            let uid = create_pod(admin, &fx.ns, &name, node.as_str(), json!({})).await;
            cluster
                .delete_pod(&PodRef {
                    namespace: fx.ns.clone(),
                    name,
                    uid,
                })
                .await
        }
        ("pods/eviction", "create") => {
            let name = unique("evictee");
            let uid = create_pod(admin, &fx.ns, &name, node.as_str(), json!({})).await;
            cluster
                .evict(&PodRef {
                    namespace: fx.ns.clone(),
                    name,
                    uid,
                })
                .await
                .map(drop)
        }
        ("configmaps", "get") => cluster.live_config().await.map(drop),
        (resource, "watch") => {
            // Holding the run lock, the adapter reads from watches. A watch's LIST may answer
            // the first read before its WATCH is refused, so read until the refusal shows.
            let holder = unique("holder");
            cluster
                .acquire_lock(&holder, Time(0), Duration::from_secs(60))
                .await?;
            let mut r = Ok(());
            for _ in 0..15 {
                r = match resource {
                    "nodes" => cluster.node_names().await.map(drop),
                    "pods" => cluster.node_view(node).await.map(drop),
                    _ => cluster
                        .budget_view(std::slice::from_ref(node))
                        .await
                        .map(drop),
                };
                if r.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            cluster.release_lock(&holder).await?;
            r
        }
        ("poddisruptionbudgets", "list") => cluster
            .budget_view(std::slice::from_ref(node))
            .await
            .map(drop),
        ("daemonsets" | "servicecidrs", "get") => cluster.inventory().await.map(drop),
        ("ciliumnodeconfigs", verb) => {
            let mut c = CiliumNodeConfig::for_migration(&fx.cfg, ValueInputs::default());
            c.name = unique("cnc");
            if verb == "patch" {
                full.apply_node_config(&c)
                    .await
                    .expect("apply as the full role");
            }
            cluster.apply_node_config(&c).await
        }
        ("ciliumendpoints", "get") => cluster.verify_node(node).await.map(drop),
        ("ippools" | "felixconfigurations" | "installations", _) => cluster.facts().await.map(drop),
        ("leases", verb) => {
            let holder = unique("holder");
            if verb == "update" {
                full.acquire_lock(&holder, Time(0), Duration::from_secs(60))
                    .await
                    .expect("lock as the full role");
                cluster.release_lock(&holder).await
            } else {
                cluster
                    .acquire_lock(&holder, Time(0), Duration::from_secs(60))
                    .await
                    .map(drop)
            }
        }
        ("events", "create") => {
            let e = cnimig_kube::events::NodeEvent {
                node: node.clone(),
                reason: "NodeMigrationStarted",
                note: unique("probe"),
                warning: false,
            };
            cluster.record_node_event(&e).await
        }
        ("events", "patch") => {
            // The sink publishes through one recorder: the second identical Event is a PATCH
            // of the first (its series). Failures are logged, not returned, so look at the
            // Event: a series means the PATCH landed.
            let victim = NodeName::new(unique("evnode")).unwrap();
            let sink = cluster.event_sink();
            let e = Event::NodeStarted {
                node: victim.clone(),
                at: Time(0),
            };
            sink.emit(&e);
            sink.emit(&e);
            sink.close().await;
            let events: Api<k8s_openapi::api::events::v1::Event> =
                Api::namespaced(admin.clone(), "default");
            let list = events
                .list(&ListParams::default().fields(&format!("regarding.name={victim}")))
                .await
                .unwrap();
            assert_eq!(
                list.items.len(),
                1,
                "the first publish (create) landed: {list:?}"
            );
            if list.items[0].series.is_some() {
                Ok(())
            } else {
                Err(PortError::Forbidden {
                    verb: "patch".into(),
                    what: format!("event on node {victim} (no series)"),
                })
            }
        }
        other => panic!("no probe code for {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grant_of_deploy_rbac_is_needed() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    let admin_config = Config::from_kubeconfig(&KubeConfigOptions::default())
        .await
        .unwrap();
    let rules = role_rules();
    let granted = grants(&rules);
    let probed: BTreeSet<(String, String, String)> = PROBES
        .iter()
        .map(|p| (p.group.into(), p.resource.into(), p.verb.into()))
        .collect();
    let unprobed: Vec<_> = granted.difference(&probed).collect();
    assert!(
        unprobed.is_empty(),
        "deploy/rbac.yaml grants {unprobed:?} but no probe shows a call needing it: remove the grant or add a probe"
    );
    let ungranted: Vec<_> = probed.difference(&granted).collect();
    assert!(
        ungranted.is_empty(),
        "probes for {ungranted:?}, which deploy/rbac.yaml does not grant: the adapter calls need them"
    );

    common::with_temp_ns(admin.clone(), "rbac", |ns| async move {
        crate::calico::calico_objects(&admin).await;
        let mut cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
        cfg.poll_interval = Duration::from_millis(300);
        let live = cnimig_core::cilium::rendered_config(
            &cfg,
            ValueInputs::default(),
            cnimig_core::cilium::CiliumPhase::Migration,
        );
        common::cilium_config(&admin, &ns, serde_json::to_value(&live).unwrap()).await;
        let node_name = unique("rbac");
        create_node(&admin, &node_name, labels(&[("cnimig.io/rbac", &ns)])).await;
        // A pod on Cilium's pool, so verify_node looks for its CiliumEndpoint.
        create_pod(&admin, &ns, "p", &node_name, json!({})).await;
        mark_running(&admin, &ns, "p", "10.245.0.10").await;
        let fx = Fixture {
            ns: ns.clone(),
            node: NodeName::new(node_name.clone()).unwrap(),
            cfg,
        };
        let (full_cfg, full_name) =
            bind(&admin, &admin_config, &ns, &rules, ("", "nodes", "list")).await;

        let mut report = Vec::new();
        for p in PROBES {
            // The full role: the probe is not forbidden (it may fail otherwise, e.g. the restore
            // helper times out without a kubelet).
            let r = run_probe(p, &fx, &admin, &full_cfg, &full_cfg).await;
            assert!(
                !matches!(r, Err(PortError::Forbidden { .. })),
                "{}/{} {}: {} is forbidden even with the full role: {r:?}",
                p.group,
                p.resource,
                p.verb,
                p.call
            );
            // The role without this verb: forbidden, naming it.
            let reduced = without(&rules, p);
            let still = grants(&reduced);
            let check = still.iter().next().expect("some grant left");
            let (cfg, name) = bind(
                &admin,
                &admin_config,
                &ns,
                &reduced,
                (&check.0, &check.1, &check.2),
            )
            .await;
            let user = format!("system:serviceaccount:{ns}:{name}");
            assert!(
                !allowed(&admin, &user, p.group, p.resource, p.verb).await,
                "the reduced role still allows {}/{} {}",
                p.group,
                p.resource,
                p.verb
            );
            let r = run_probe(p, &fx, &admin, &full_cfg, &cfg).await;
            unbind(&admin, &name).await;
            match &r {
                Err(PortError::Forbidden { verb, what })
                    if verb == p.adapter_verb && what.contains(p.what) =>
                {
                    report.push(format!(
                        "{}/{} {}: {} -> Forbidden({verb} {what})",
                        p.group, p.resource, p.verb, p.call
                    ));
                }
                other => panic!(
                    "without {}/{} {}, {} should be Forbidden({} {}…), got {other:?}",
                    p.group, p.resource, p.verb, p.call, p.adapter_verb, p.what
                ),
            }
        }
        unbind(&admin, &full_name).await;
        common::delete_node(&admin, &node_name).await;
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "rbac: {} grants, each needed:\n  {}",
            report.len(),
            report.join("\n  ")
        );
    })
    .await;
}
