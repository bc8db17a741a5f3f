//! The `kube_finalize` and `kube_cleanup` examples as processes, against the real test control
//! plane and the `cnimig-emu` emulator: refused (exit 4, each node named) before the migration;
//! after it, a dry run changes nothing (the objects finalize and clean-up touch compared before
//! and after), `--yes` finishes, and a second `--yes` changes nothing.
//!
//! Needs the control plane (`scripts/testenv/up.sh`, `. $CNIMIG_TESTENV_RUN/env`); without it
//! the test prints SKIPPED and passes, unless `CNIMIG_REQUIRE_TESTENV=1`. It runs `cargo build
//! --release --example kube_finalize --example kube_cleanup` first (a no-op when fresh).
//!
//! ```sh
//! CNIMIG_REQUIRE_TESTENV=1 cargo test --release --test kube_finish
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../cnimig-kube/tests/kube/common.rs"]
#[allow(dead_code, reason = "shared with the kube test binary")]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cnimig_core::cilium::{CiliumPhase, ValueInputs, rendered_config};
use cnimig_core::config::MigrationConfig;
use cnimig_core::finalize::{FINAL_ANNOTATION, FinalRecord, FinalStep};
use cnimig_core::machine::Phase;
use cnimig_core::orchestrator::{Orchestrator, Ports, RunOptions};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::common::wait_until;

const NODES: usize = 3;

/// The built examples' directory (`cargo build --release --example …`, a no-op when fresh).
fn examples_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        // scripts/test-all.sh points here at the examples `cargo test` built (no second build
        // from inside the test, with other features).
        if let Some(p) = std::env::var_os("CNIMIG_EXAMPLES_DIR") {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "--release",
                "--example",
                "kube_finalize",
                "--example",
                "kube_cleanup",
            ])
            .current_dir(root)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build of the examples failed");
        let exe = std::env::current_exe().unwrap();
        exe.parent()
            .and_then(Path::parent)
            .unwrap()
            .join("examples")
    })
    .clone()
}

struct Run {
    code: i32,
    out: String,
    err: String,
}

async fn run(example: &str, args: &[String], extra: &[&str]) -> Run {
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(examples_dir().join(example))
            .args(args)
            .args(extra)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the example ends within 5 minutes")
    .unwrap();
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    println!(
        "--- {example} {extra:?}: exit {}\n{}\n{}",
        r.code, r.out, r.err
    );
    r
}

fn dynamic(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// What finalize and clean-up write, read back: nodes (labels, annotations, cordon), every pod
/// of the namespace (name and UID), Leases, CiliumNodeConfigs, Calico's CRDs and Installation.
async fn fingerprint(admin: &Client, ns: &str) -> Value {
    let nodes: Api<Node> = Api::all(admin.clone());
    let nodes: Vec<Value> = nodes
        .list(&ListParams::default().labels(&format!("cnimig.io/e2e={ns}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|n| {
            json!({"name": n.name_any(), "labels": n.labels(), "annotations": n.annotations(),
                   "unschedulable": n.spec.and_then(|s| s.unschedulable)})
        })
        .collect();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let mut pods: Vec<(String, String)> = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| (p.name_any(), p.metadata.uid.unwrap_or_default()))
        .collect();
    pods.sort();
    let leases: Api<Lease> = Api::namespaced(admin.clone(), ns);
    let leases: Vec<Value> = leases
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|l| {
            json!({"name": l.name_any(), "annotations": l.annotations(),
                        "holder": l.spec.and_then(|s| s.holder_identity)})
        })
        .collect();
    let ncs: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        ns,
        &dynamic("cilium.io", "v2", "CiliumNodeConfig", "ciliumnodeconfigs"),
    );
    let ncs: Vec<String> = ncs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let mut crds: Vec<String> = crds
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|c| cnimig_kube::cleanup::CALICO_CRD_GROUPS.contains(&c.spec.group.as_str()))
        .map(|c| c.name_any())
        .collect();
    crds.sort();
    let inst: Api<DynamicObject> = Api::all_with(
        admin.clone(),
        &dynamic("operator.tigera.io", "v1", "Installation", "installations"),
    );
    let installation = inst.get_opt("default").await.ok().flatten().is_some();
    json!({"nodes": nodes, "pods": pods, "leases": leases, "nodeConfigs": ncs, "crds": crds,
           "installation": installation})
}

async fn final_record(admin: &Client, ns: &str) -> Option<FinalRecord> {
    let leases: Api<Lease> = Api::namespaced(admin.clone(), ns);
    let l = leases
        .get_opt(cnimig_kube::finalize::FINAL_LEASE_NAME)
        .await
        .unwrap()?;
    Some(FinalRecord::from_annotation(l.annotations().get(FINAL_ANNOTATION)?).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_and_clean_up_examples_dry_run_act_and_repeat() {
    let Some(env) = common::env().await else {
        return;
    };
    let admin = env.admin.clone();
    examples_dir();
    common::with_temp_ns(admin.clone(), "finish", |ns| async move {
        for obj in [
            json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool",
                   "metadata": {"name": "default-ipv4-ippool"},
                   "spec": {"cidr": "10.42.0.0/16", "vxlanMode": "Always", "ipipMode": "Never",
                            "natOutgoing": true, "blockSize": 26}}),
            json!({"apiVersion": "operator.tigera.io/v1", "kind": "Installation",
                   "metadata": {"name": "default"},
                   "spec": {"calicoNetwork": {"linuxDataplane": "Iptables", "bgp": "Disabled",
                       "nodeAddressAutodetectionV4": {"kubernetes": "NodeInternalIP"},
                       "ipPools": [{"cidr": "10.42.0.0/16", "encapsulation": "VXLAN"}]}}}),
        ] {
            cnimig_emu::setup::apply(&admin, &obj).await.unwrap();
        }
        let cfg_yaml = format!(
            "podCIDR: 10.245.0.0/16\nnodeSelector:\n  matchLabels:\n    cnimig.io/e2e: {ns}\nmaxInFlight: 2\npollInterval: 300ms\ndrainTimeout: 120s\nstepTimeout: 60s\n"
        );
        let cfg = MigrationConfig::from_yaml(&cfg_yaml).unwrap();
        let live = rendered_config(&cfg, ValueInputs::default(), CiliumPhase::Migration);
        common::cilium_config(&admin, &ns, serde_json::to_value(&live).unwrap()).await;

        let mut ecfg = cnimig_emu::EmuConfig::new(&format!("{ns}-n"), NODES);
        ecfg.cilium_namespace = ns.clone();
        ecfg.node_labels = BTreeMap::from([("cnimig.io/e2e".to_string(), ns.clone())]);
        let cp = ecfg.nodes[NODES - 1].clone();
        ecfg.extra_labels.insert(
            cp,
            BTreeMap::from([("node-role.kubernetes.io/control-plane".to_string(), "true".to_string())]),
        );
        let node_names = ecfg.nodes.clone();
        let emu = cnimig_emu::start(admin.clone(), ecfg).await.unwrap();
        let mut objs = vec![
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": ns},
                "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                         "template": {"metadata": {"labels": {"app": "web"}},
                            "spec": {"nodeSelector": {"cnimig.io/e2e": ns}, "terminationGracePeriodSeconds": 1,
                                     "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}}}}),
        ];
        objs.extend(cnimig_emu::setup::agent_daemon_sets(&ns, "quay.io/cilium/cilium:v1.17.0", &json!([])));
        for o in objs {
            cnimig_emu::setup::apply(&admin, &o).await.unwrap();
        }
        cnimig_emu::setup::wait_ready_pods(&admin, &ns, 2 + 2 * NODES, Duration::from_secs(120)).await.unwrap();
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);

        let dir = std::env::temp_dir().join(format!("cnimig-finish-{ns}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("migration.yaml"), &cfg_yaml).unwrap();
        let kubeconfig = std::env::var("KUBECONFIG").unwrap();
        let args: Vec<String> = [
            "--kubeconfig", &kubeconfig,
            "--config", &dir.join("migration.yaml").to_string_lossy(),
            "--cilium-namespace", &ns, "--system-namespace", &ns,
            "--lock-name", &format!("lock-{ns}"),
            "--node-selector", &format!("cnimig.io/e2e={ns}"),
            "--poll-ms", "300", "--lock-ttl", "15",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();

        // Before the migration: both refuse, change nothing, and name the nodes.
        let before = fingerprint(&admin, &ns).await;
        let r = run("kube_finalize", &args, &["--yes"]).await;
        assert_eq!(r.code, 4, "finalize before the migration: exit 4");
        for n in &node_names {
            assert!(r.err.contains(&format!("node {n} was never migrated")), "{n} named: {}", r.err);
        }
        let r = run("kube_cleanup", &args, &["--yes"]).await;
        assert_eq!(r.code, 4, "clean-up before finalize: exit 4");
        assert!(r.err.contains("finalize has not succeeded"), "{}", r.err);
        assert_eq!(fingerprint(&admin, &ns).await, before, "a refused run changed something");

        // Migrate (the library, as kube_migrate would).
        let mut opts = common::opts(&ns);
        opts.lock_name = format!("lock-{ns}");
        opts.node_selector = Some(format!("cnimig.io/e2e={ns}"));
        let cluster = env.cluster(opts);
        let orch = Orchestrator::new(
            Ports::from_one(cluster.clone()),
            cfg.clone(),
            RunOptions { holder: format!("finish-{ns}"), ..RunOptions::default() },
        );
        let (_, plan) = orch.plan().await.unwrap();
        let report = tokio::time::timeout(Duration::from_secs(300), orch.run(&plan, &cnimig_core::events::Discard))
            .await
            .expect("the migration ends")
            .unwrap();
        assert_eq!(report.count(Phase::Done), NODES, "{report:#?}");

        // cilium-config still in migration mode: the dry run names the differing keys.
        let before = fingerprint(&admin, &ns).await;
        assert_eq!(before["nodeConfigs"].as_array().unwrap().len(), 1, "{before}");
        let r = run("kube_finalize", &args, &[]).await;
        assert_eq!(r.code, 0, "dry run passes");
        assert!(r.out.contains("cilium-config differs from the final values"), "{}", r.out);
        assert!(r.out.contains("custom-cni-conf"), "{}", r.out);
        assert!(r.out.contains("dryRun=All"));
        assert!(!r.out.contains("REFUSED"), "{}", r.out);
        // Every planned write was probed: an agent delete per node and a label removal per node.
        assert_eq!(r.out.matches(&format!("DELETE pods {ns}/")).count(), 2 * NODES, "{}", r.out);
        assert_eq!(r.out.matches("remove label").count(), NODES, "{}", r.out);
        // The control-plane node's agent restarts last.
        let pos = |n: &str| r.out.find(&format!("(the Cilium agent on {n})")).unwrap();
        assert!(pos(&node_names[NODES - 1]) > pos(&node_names[0]));
        assert_eq!(fingerprint(&admin, &ns).await, before, "the finalize dry run changed something");

        // "helm upgrade" with the final values; finalize for real.
        let final_cfg = rendered_config(&cfg, ValueInputs::default(), CiliumPhase::Final);
        common::cilium_config(&admin, &ns, serde_json::to_value(&final_cfg).unwrap()).await;
        let r = run("kube_finalize", &args, &["--yes"]).await;
        assert_eq!(r.code, 0, "finalize --yes succeeds");
        assert!(r.out.contains(&format!("{NODES} agent(s) restarted by this run")), "{}", r.out);
        assert!(r.out.contains("finalize: Done"), "progress shows the last step: {}", r.out);
        let after = fingerprint(&admin, &ns).await;
        assert_eq!(after["nodeConfigs"], json!([]), "CiliumNodeConfig deleted");
        for n in after["nodes"].as_array().unwrap() {
            assert!(n["labels"].get(&cfg.migration_label).is_none(), "label left on {n}");
        }
        assert_eq!(final_record(&admin, &ns).await.unwrap().step, FinalStep::Done);

        // Again: nothing to do, nothing changed (no agent restarted).
        let settled = fingerprint(&admin, &ns).await;
        let r = run("kube_finalize", &args, &["--yes"]).await;
        assert_eq!(r.code, 0);
        assert!(r.out.contains("finalize already succeeded"), "{}", r.out);
        assert!(r.out.contains("0 agent(s) restarted by this run"), "{}", r.out);
        assert_eq!(fingerprint(&admin, &ns).await, settled, "a second finalize changed something");

        // Clean-up: the dry run changes nothing.
        let r = run("kube_cleanup", &args, &[]).await;
        assert_eq!(r.code, 0, "clean-up dry run passes");
        assert!(r.out.contains("DELETE installations.operator.tigera.io default"), "{}", r.out);
        assert_eq!(r.out.matches("CREATE pods").count(), NODES, "{}", r.out);
        assert!(r.out.contains("DELETE customresourcedefinitions ippools.crd.projectcalico.org"), "{}", r.out);
        assert!(!r.out.contains("REFUSED"), "{}", r.out);
        assert_eq!(fingerprint(&admin, &ns).await, settled, "the clean-up dry run changed something");
        assert!(settled["installation"].as_bool().unwrap());

        let r = run("kube_cleanup", &args, &["--yes", "--helper-timeout", "60"]).await;
        assert_eq!(r.code, 0, "clean-up --yes succeeds");
        assert!(r.out.contains(&format!("{NODES} node(s) flushed by this run")), "{}", r.out);
        // A deleted CRD lists as terminating until the API server's finalizer has removed its
        // objects, which took over 60 s once on a loaded machine.
        wait_until("Calico's CRDs gone", Duration::from_secs(180), || {
            let (admin, ns) = (admin.clone(), ns.clone());
            async move { fingerprint(&admin, &ns).await["crds"] == json!([]) }
        })
        .await;
        let done = fingerprint(&admin, &ns).await;
        assert_eq!(done["installation"], json!(false));
        let helpers = pods
            .list(&ListParams::default().labels(&format!(
                "{}={}",
                cnimig_kube::cleanup::FLUSH_HELPER_LABEL,
                cnimig_kube::cleanup::FLUSH_HELPER_VALUE
            )))
            .await
            .unwrap();
        assert!(helpers.items.is_empty(), "every helper deleted");

        let r = run("kube_cleanup", &args, &["--yes"]).await;
        assert_eq!(r.code, 0);
        assert!(r.out.contains("clean-up already succeeded"), "{}", r.out);
        assert!(r.out.contains("0 node(s) flushed by this run"), "{}", r.out);
        let r = run("kube_cleanup", &args, &[]).await;
        assert_eq!(r.code, 0, "a dry run after clean-up: nothing to send");

        emu.stop();
        for n in &node_names {
            common::delete_node(&admin, n).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}
