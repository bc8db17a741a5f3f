//! `RancherCluster::dry_run`: every write of the Rancher steps sent with `dryRun=All`, in run
//! order, reported with its exact body, and nothing changed (every object compared before and
//! after, `resourceVersion` included, except what the Deployment controller itself writes to the
//! agent: its status, revision annotation, field-manager entry and so its `resourceVersion`); a
//! write an admission policy refuses is reported refused.

use std::time::Duration;

use cnimig_kube::planning::ProbeOutcome;
use cnimig_rancher::RancherWrite;
use cnimig_rancher::plan::{Action, RancherPlan, Step, When};
use kube::Client;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind};
use serde_json::{Value, json};

use crate::common;
use crate::steps::{agent_deployment, rancher};

fn ar(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// Every object a Rancher step could write, as stored (`None`: absent).
async fn objects(admin: &Client, ns: &str, rke1: &str) -> Vec<(String, Option<Value>)> {
    let mut out = Vec::new();
    for (what, ar, namespaced, name) in [
        (
            "agent",
            ar("apps", "v1", "Deployment", "deployments"),
            true,
            "cattle-cluster-agent",
        ),
        (
            "application",
            ar("argoproj.io", "v1alpha1", "Application", "applications"),
            true,
            "cni",
        ),
        (
            "helmchartconfig",
            ar(
                "helm.cattle.io",
                "v1",
                "HelmChartConfig",
                "helmchartconfigs",
            ),
            true,
            "rke2-calico",
        ),
        (
            "provisioning cluster",
            ar("provisioning.cattle.io", "v1", "Cluster", "clusters"),
            true,
            "prod",
        ),
        (
            "management cluster",
            ar("management.cattle.io", "v3", "Cluster", "clusters"),
            false,
            rke1,
        ),
    ] {
        let api: Api<DynamicObject> = if namespaced {
            Api::namespaced_with(admin.clone(), ns, &ar)
        } else {
            Api::all_with(admin.clone(), &ar)
        };
        let mut v = api
            .get_opt(name)
            .await
            .unwrap()
            .map(|o| serde_json::to_value(o).unwrap());
        if what == "agent"
            && let Some(v) = v.as_mut()
        {
            without_deployment_controller(v);
        }
        out.push((what.to_string(), v));
    }
    out
}

/// Drops from a Deployment what the Deployment controller writes on its own, at any time after
/// a change (CI caught it updating the agent's status between two snapshots). A write by the
/// dry run would still show: every Rancher step changes the spec or an annotation of ours, and
/// our field manager's entry.
fn without_deployment_controller(deployment: &mut Value) {
    if let Some(o) = deployment.as_object_mut() {
        o.remove("status");
    }
    let Some(meta) = deployment
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    meta.remove("resourceVersion");
    if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
        a.remove("deployment.kubernetes.io/revision");
    }
    if let Some(m) = meta.get_mut("managedFields").and_then(Value::as_array_mut) {
        m.retain(|e| e.get("manager").and_then(Value::as_str) != Some("kube-controller-manager"));
    }
}

/// [`objects`] once they stop changing for a second (at most 30 s): controllers react to the
/// steps the test makes, so only the dry run could change what is compared afterwards.
async fn settled(admin: &Client, ns: &str, rke1: &str) -> Vec<(String, Option<Value>)> {
    let mut before = objects(admin, ns, rke1).await;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = objects(admin, ns, rke1).await;
        if now == before {
            break;
        }
        before = now;
    }
    before
}

fn step(when: When, action: Action) -> Step {
    Step {
        when,
        describe: format!("{action:?}"),
        action,
    }
}

/// The plan with every automatic step (the node-less test namespace detects no distribution).
fn every_step(mut plan: RancherPlan, ns: &str) -> RancherPlan {
    let app = || (ns.to_string(), "cni".to_string());
    plan.steps = vec![
        step(When::BeforeFirstNode, Action::AgentToHostNetwork),
        step(
            When::BeforeFirstNode,
            Action::Rke2HelmChartConfigAutodetection,
        ),
        step(When::BeforeFirstNode, Action::Rke2ProvisionedAutodetection),
        step(
            When::BeforeFirstNode,
            Action::ArgoPause {
                namespace: app().0,
                name: app().1,
            },
        ),
        step(When::BetweenNodes, Action::AgentCheck),
        step(When::AfterLastNode, Action::AgentRestore),
        step(
            When::AfterLastNode,
            Action::ArgoRestore {
                namespace: app().0,
                name: app().1,
            },
        ),
        step(
            When::AfterLastNode,
            Action::Rke2CniSwitch {
                target: "none".into(),
            },
        ),
        step(When::AfterLastNode, Action::Manual),
    ];
    plan
}

fn show(writes: &[RancherWrite]) -> String {
    writes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_sends_every_rancher_write_and_changes_nothing() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    crate::rancher_crds(&admin).await;
    common::with_temp_ns(admin.clone(), "rdry", |ns| async move {
        crate::rancher_rbac(&admin, &ns).await;
        let rke1 = format!("c-{}", &ns[ns.len() - 8..]);
        for obj in [
            agent_deployment(&ns, "nowhere"),
            json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
                "metadata": {"name": "cni", "namespace": ns},
                "spec": {"project": "default", "source": {"repoURL": "https://git.example/infra", "chart": "rke2-calico"},
                         "syncPolicy": {"automated": {"prune": true, "selfHeal": true}}}}),
            json!({"apiVersion": "provisioning.cattle.io/v1", "kind": "Cluster",
                "metadata": {"name": "prod", "namespace": ns},
                "spec": {"rkeConfig": {"machineGlobalConfig": {"cni": "calico"}}}}),
            json!({"apiVersion": "management.cattle.io/v3", "kind": "Cluster",
                "metadata": {"name": rke1},
                "spec": {"rancherKubernetesEngineConfig": {"network": {"plugin": "calico"}}}}),
        ] {
            cnimig_emu::setup::apply(&admin, &obj).await.unwrap();
        }
        let before = settled(&admin, &ns, &rke1).await;
        assert!(before[2].1.is_none(), "no HelmChartConfig yet");

        let r = rancher(&env, &ns, Some(format!("{ns}/prod")), true);
        let plan = every_step(r.plan().await.unwrap(), &ns);
        let writes = r.dry_run(&plan).await.unwrap();
        let text = show(&writes);
        println!("{text}");
        assert_eq!(objects(&admin, &ns, &rke1).await, before, "the dry run changed something:\n{text}");

        // Every automatic step once, in the order a run makes them (the restores after the
        // cni switch and the Application before the agent, as `finish` does).
        let requests: Vec<(When, &str)> = writes.iter().map(|w| (w.when, w.request.as_str())).collect();
        let agent = format!("PATCH deployments.apps {ns}/cattle-cluster-agent (JSON patch)");
        let app = format!("PATCH applications.argoproj.io {ns}/cni (JSON patch)");
        let prov = format!("PATCH clusters.provisioning.cattle.io {ns}/prod (merge patch, management cluster)");
        let hcc = format!("POST helmchartconfigs.helm.cattle.io {ns} (create rke2-calico)");
        assert_eq!(requests, vec![
            (When::BeforeFirstNode, agent.as_str()),
            (When::BeforeFirstNode, hcc.as_str()),
            (When::BeforeFirstNode, prov.as_str()),
            (When::BeforeFirstNode, app.as_str()),
            (When::AfterLastNode, prov.as_str()),
            (When::AfterLastNode, app.as_str()),
            (When::AfterLastNode, agent.as_str()),
        ], "{text}");
        assert_eq!(writes.iter().map(|w| w.order).collect::<Vec<_>>(), (1..=7).collect::<Vec<_>>());
        for w in &writes[..5] {
            assert_eq!(w.outcome, ProbeOutcome::Allowed, "{w}");
        }
        // The restores patch the objects as the first steps leave them: computed, shown, not sent.
        for w in &writes[5..] {
            assert!(matches!(&w.outcome, ProbeOutcome::NotSent { reason } if reason.contains("dry run's answer")), "{w}");
        }
        // The bodies are the exact requests.
        let body = |i: usize| writes[i].body.to_string();
        assert!(body(0).contains(r#""path":"/spec/template/spec/hostNetwork","value":true"#), "{}", body(0));
        assert!(body(0).contains(r#""op":"test","path":"/metadata/resourceVersion""#), "{}", body(0));
        assert!(body(1).contains("NodeInternalIP") && body(1).contains("HelmChartConfig"), "{}", body(1));
        assert!(body(2).contains("nodeAddressAutodetectionV4"), "{}", body(2));
        assert!(body(3).contains(r#""op":"remove","path":"/spec/syncPolicy/automated""#), "{}", body(3));
        assert_eq!(writes[4].body, json!({"spec": {"rkeConfig": {"machineGlobalConfig": {"cni": "none"}}}}));
        assert!(body(5).contains(r#""path":"/spec/syncPolicy/automated","value":{"prune":true,"selfHeal":true}"#), "{}", body(5));
        assert!(body(6).contains(r#""op":"remove","path":"/spec/template/spec/hostNetwork""#), "{}", body(6));

        // RKE1's network plugin through the management cluster.
        let r1 = rancher(&env, &ns, Some(rke1.clone()), false);
        let mut p1 = r1.plan().await.unwrap();
        p1.steps = vec![step(When::BeforeFirstNode, Action::Rke1PluginNone)];
        let w1 = r1.dry_run(&p1).await.unwrap();
        assert_eq!(w1.len(), 1);
        assert_eq!(w1[0].request, format!("PATCH clusters.management.cattle.io {rke1} (merge patch, management cluster)"));
        assert_eq!(w1[0].outcome, ProbeOutcome::Allowed, "{}", w1[0]);
        assert_eq!(objects(&admin, &ns, &rke1).await, before);

        // Once the steps are made, the restores are sent too (a resumed run's dry run).
        assert!(r.agent_to_host_network().await.unwrap());
        assert!(r.argo_pause(&ns, "cni").await.unwrap());
        let made = settled(&admin, &ns, &rke1).await;
        let writes = r.dry_run(&plan).await.unwrap();
        let text = show(&writes);
        assert_eq!(objects(&admin, &ns, &rke1).await, made, "{text}");
        for (w, step) in writes.iter().zip([0, 1, 2, 3, 4, 5, 6]) {
            match step {
                0 | 3 => assert!(matches!(&w.outcome, ProbeOutcome::NotSent { reason } if reason.contains("already done")), "{w}"),
                _ => assert_eq!(w.outcome, ProbeOutcome::Allowed, "{w}"),
            }
        }
        assert!(r.restore_agent().await.unwrap());
        assert!(r.argo_restore(&ns, "cni").await.unwrap());

        // An admission policy refusing the agent on the host network: the dry run reports the
        // refusal (the server ran admission) and still changes nothing.
        let policy = format!("cnimig-{ns}");
        let vap = ar("admissionregistration.k8s.io", "v1", "ValidatingAdmissionPolicy", "validatingadmissionpolicies");
        let vapb = ar("admissionregistration.k8s.io", "v1", "ValidatingAdmissionPolicyBinding", "validatingadmissionpolicybindings");
        cnimig_emu::setup::apply(&admin, &json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": policy},
            "spec": {"failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{"apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["deployments"]}],
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}},
                "validations": [{"expression": "!has(object.spec.template.spec.hostNetwork) || !object.spec.template.spec.hostNetwork",
                    "message": "no hostNetwork in this namespace"}]}})).await.unwrap();
        cnimig_emu::setup::apply(&admin, &json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": policy},
            "spec": {"policyName": policy, "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}}})).await.unwrap();
        let restored = settled(&admin, &ns, &rke1).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let refused = loop {
            let w = r.dry_run(&plan).await.unwrap();
            let last = show(&w);
            if let ProbeOutcome::Refused { code, message } = &w[0].outcome {
                break (*code, message.clone(), w[0].ok(), last);
            }
            assert!(tokio::time::Instant::now() < deadline, "the policy never refused the agent's patch:\n{last}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let last = refused.3;
        println!("{last}");
        assert_eq!(refused.0, 422, "{last}");
        assert!(refused.1.contains("no hostNetwork in this namespace"), "{last}");
        assert!(!refused.2);
        assert!(last.contains("REFUSED  PATCH deployments.apps"), "{last}");
        assert_eq!(objects(&admin, &ns, &rke1).await, restored);
        for (ar, name) in [(&vapb, &policy), (&vap, &policy)] {
            let api: Api<DynamicObject> = Api::all_with(admin.clone(), ar);
            api.delete(name, &DeleteParams::default()).await.unwrap();
        }
        let api: Api<DynamicObject> = Api::all_with(admin.clone(), &ar("management.cattle.io", "v3", "Cluster", "clusters"));
        let _ = api.delete(&rke1, &DeleteParams::default()).await;
    })
    .await;
}
