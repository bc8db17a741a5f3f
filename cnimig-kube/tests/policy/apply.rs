//! Calico policies read from the cluster, converted, dry-run, then created.

use cnimig_core::policy::{ConvertOptions, convert_documents};
use cnimig_kube::policy::{PolicyApplyError, PolicyWrite};
use kube::Client;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams};
use serde_json::{Value, json};

use crate::common;
use crate::{extra_rbac, serial};

fn cilium(client: &Client, kind: &str, plural: &str, ns: Option<&str>) -> Api<DynamicObject> {
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("cilium.io", "v2", kind), plural);
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

fn cnps(client: &Client, ns: &str) -> Api<DynamicObject> {
    cilium(
        client,
        "CiliumNetworkPolicy",
        "ciliumnetworkpolicies",
        Some(ns),
    )
}

fn ccnps(client: &Client) -> Api<DynamicObject> {
    cilium(
        client,
        "CiliumClusterwideNetworkPolicy",
        "ciliumclusterwidenetworkpolicies",
        None,
    )
}

fn opts() -> ConvertOptions {
    ConvertOptions {
        pod_cidrs: vec![
            "10.42.0.0/16".parse().unwrap(),
            "10.245.0.0/16".parse().unwrap(),
        ],
        ..ConvertOptions::default()
    }
}

/// Names of the CiliumNetworkPolicies in `ns` and whether the clusterwide `ccnp` exists.
async fn existing(admin: &Client, ns: &str, ccnp: &str) -> (Vec<String>, bool) {
    let names = cnps(admin, ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|o| o.metadata.name)
        .collect();
    (names, ccnps(admin).get_opt(ccnp).await.unwrap().is_some())
}

/// Calico objects created as admin in `crd.projectcalico.org/v1`, read back by cnimig's
/// ServiceAccount, converted exactly; a dry run changes nothing; `write` creates exactly the
/// converted objects; a second run changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calico_policies_from_the_cluster_are_dry_run_then_created() {
    let env = match common::env().await {
        Some(e) => e,
        None => return,
    };
    let _serial = serial().await;
    let admin = env.admin.clone();
    extra_rbac(&admin).await;
    common::with_temp_ns(admin.clone(), "papply", |ns| async move {
        let gnp_name = format!("{ns}-deny-docs");
        for o in [
            json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": "allow-web", "namespace": ns},
                   "spec": {"selector": "app == 'db'", "types": ["Ingress"],
                            "ingress": [{"action": "Allow", "protocol": "TCP",
                                         "source": {"selector": "app == 'web'"},
                                         "destination": {"ports": [5432]}}]}}),
            json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "GlobalNetworkPolicy",
                   "metadata": {"name": gnp_name},
                   "spec": {"selector": format!("projectcalico.org/namespace == '{ns}'"),
                            "types": ["Egress"],
                            "egress": [{"action": "Deny", "destination": {"nets": ["192.0.2.0/24"]}}]}}),
        ] {
            cnimig_emu::setup::apply(&admin, &o).await.unwrap();
        }
        let k = env.cluster(common::opts(&ns));
        let parsed = k.read_calico_policies().await.unwrap();
        // The namespaces' labels come along (namespaceSelectors over NetworkSets need them).
        assert_eq!(
            parsed
                .namespaces
                .get(&ns)
                .and_then(|l| l.get("kubernetes.io/metadata.name")),
            Some(&ns),
            "{:?}",
            parsed.namespaces.keys().collect::<Vec<_>>()
        );
        let ours: Vec<_> = parsed
            .policies
            .iter()
            .filter(|p| p.namespace.as_deref() == Some(ns.as_str()) || p.name == gnp_name)
            .cloned()
            .collect();
        assert_eq!(ours.len(), 2, "{:?}", parsed.policies);
        let mut mine = parsed.clone();
        mine.policies = ours;
        let conv = convert_documents(&mine, &opts());
        assert!(conv.report.all_exact(), "{}", conv.report);
        let mut objects = conv.values();
        assert_eq!(objects.len(), 2);
        // The namespaced one first (the cluster lists global policies first).
        objects.sort_by_key(|o| o["kind"] != "CiliumNetworkPolicy");
        let kinds: Vec<&str> = objects.iter().map(|o| o["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"]);
        let ccnp_name = objects[1]["metadata"]["name"].as_str().unwrap().to_string();

        // Dry run: both accepted, nothing stored.
        let (dry, written) = k.apply_cilium_policies(&objects, false).await.unwrap();
        assert_eq!(dry.len(), 2);
        assert!(dry.iter().all(|d| d.refused.is_none()), "{dry:?}");
        assert!(written.is_empty());
        assert_eq!(existing(&admin, &ns, &ccnp_name).await, (Vec::new(), false));

        // Write: exactly the converted objects.
        let (_, written) = k.apply_cilium_policies(&objects, true).await.unwrap();
        let what: Vec<PolicyWrite> = written.iter().map(|(_, w)| *w).collect();
        assert_eq!(what, [PolicyWrite::Created, PolicyWrite::Created]);
        let (names, ccnp) = existing(&admin, &ns, &ccnp_name).await;
        assert_eq!(names, [objects[0]["metadata"]["name"].as_str().unwrap()]);
        assert!(ccnp);
        let cnp = cnps(&admin, &ns).get(&names[0]).await.unwrap();
        assert_eq!(cnp.data["spec"], objects[0]["spec"]);
        let cc = ccnps(&admin).get(&ccnp_name).await.unwrap();
        assert_eq!(cc.data["spec"], objects[1]["spec"]);
        assert_eq!(
            cnp.metadata.labels.unwrap_or_default(),
            serde_json::from_value(objects[0]["metadata"]["labels"].clone()).unwrap_or_default()
        );

        // Again: unchanged.
        let (_, again) = k.apply_cilium_policies(&objects, true).await.unwrap();
        let what: Vec<PolicyWrite> = again.iter().map(|(_, w)| *w).collect();
        assert_eq!(what, [PolicyWrite::Unchanged, PolicyWrite::Unchanged]);

        let _ = ccnps(&admin).delete(&ccnp_name, &DeleteParams::default()).await;
        let gnps: Api<DynamicObject> = Api::all_with(
            admin.clone(),
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("crd.projectcalico.org", "v1", "GlobalNetworkPolicy"),
                "globalnetworkpolicies",
            ),
        );
        let _ = gnps.delete(&gnp_name, &DeleteParams::default()).await;
    })
    .await;
}

/// One object the API server refuses (a label value Calico allows and Kubernetes does not,
/// and a hand-broken protocol) and nothing is created, not even the valid one before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_policy_means_nothing_is_created() {
    let env = match common::env().await {
        Some(e) => e,
        None => return,
    };
    let _serial = serial().await;
    let admin = env.admin.clone();
    extra_rbac(&admin).await;
    common::with_temp_ns(admin.clone(), "prefuse", |ns| async move {
        let text = format!(
            "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: good, namespace: {ns}}}
spec:
  selector: app == 'db'
  ingress: [{{action: Allow, source: {{selector: app == 'web'}}}}]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: spaced, namespace: {ns}}}
spec:
  selector: app == 'has space'
  ingress: [{{action: Allow, source: {{selector: app == 'web'}}}}]
"
        );
        let parsed = cnimig_core::policy::parse_documents(&text).unwrap();
        let conv = convert_documents(&parsed, &opts());
        let mut objects = conv.values();
        assert_eq!(objects.len(), 2, "{}", conv.report);
        let names: Vec<String> = objects
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        let k = env.cluster(common::opts(&ns));
        let err = k.apply_cilium_policies(&objects, true).await.unwrap_err();
        let PolicyApplyError::Refused { refused, total } = &err else {
            panic!("expected Refused, got {err:?}");
        };
        assert_eq!(*total, 2);
        assert_eq!(refused.len(), 1, "{err}");
        assert_eq!(refused[0].target.name, names[1]);
        let why = refused[0].refused.clone().unwrap_or_default();
        assert!(
            why.starts_with("422") && why.contains("matchLabels"),
            "{why}"
        );
        assert!(err.to_string().contains("nothing was created"), "{err}");
        assert_eq!(existing(&admin, &ns, "none").await.0, Vec::<String>::new());

        // A schema violation in a field the conversion never gets wrong, added by hand.
        objects.truncate(1);
        objects[0]["spec"]["ingress"][0]["toPorts"] =
            json!([{"ports": [{"port": "80", "protocol": "BOGUS"}]}]);
        let mut good2: Value = objects[0].clone();
        good2["metadata"]["name"] = json!("good-2");
        good2["spec"]["ingress"][0]["toPorts"] =
            json!([{"ports": [{"port": "80", "protocol": "TCP"}]}]);
        objects.insert(0, good2);
        let err = k.apply_cilium_policies(&objects, true).await.unwrap_err();
        let PolicyApplyError::Refused { refused, .. } = &err else {
            panic!("expected Refused, got {err:?}");
        };
        assert_eq!(refused.len(), 1, "{err}");
        assert!(
            refused[0]
                .refused
                .as_deref()
                .unwrap_or("")
                .contains("protocol"),
            "{err}"
        );
        assert_eq!(existing(&admin, &ns, "none").await.0, Vec::<String>::new());
    })
    .await;
}
