//! The `CiliumNodeConfig` goes in at the version the cluster serves: here a control plane whose
//! CRD serves only `cilium.io/v2alpha1` (as Cilium 1.13 to 1.15 install it). The CRD is
//! cluster-scoped and the shared control plane serves v2 to every other test, so this test
//! starts a control plane of its own with `scripts/testenv/up.sh` (own run dir, a free port) and
//! stops it at the end, also when it fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cnimig_core::cilium::{CiliumNodeConfig, ValueInputs};
use cnimig_core::config::MigrationConfig;
use cnimig_core::ports::NewCni;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::json;

use crate::common::{self, wait_until};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// Runs a `scripts/testenv` script for this test's run dir, without the shared control plane's
/// `CNIMIG_TESTENV_*` variables (its port, above all); the binary cache and the readiness
/// timeout the user set are kept.
fn testenv(script: &str, run: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(repo_root().join("scripts/testenv").join(script));
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if name.starts_with("CNIMIG_TESTENV_")
            && name != "CNIMIG_TESTENV_CACHE"
            && name != "CNIMIG_TESTENV_TIMEOUT"
        {
            c.env_remove(k);
        }
    }
    c.env_remove("KUBECONFIG").env("CNIMIG_TESTENV_RUN", run);
    c
}

/// Stops the test's own control plane when dropped.
struct OwnControlPlane(PathBuf);

impl Drop for OwnControlPlane {
    fn drop(&mut self) {
        let _ = testenv("down.sh", &self.0).output();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn node_config_goes_in_at_v2alpha1_when_only_that_is_served() {
    // Skips (or fails under CNIMIG_REQUIRE_TESTENV=1) like every test here without the testenv.
    let _shared = crate::env_or_skip!();
    let run = std::env::temp_dir().join(format!("cnimig-testenv-served-{}", std::process::id()));
    let _own = OwnControlPlane(run.clone());
    let up = tokio::task::spawn_blocking({
        let run = run.clone();
        move || testenv("up.sh", &run).output()
    })
    .await
    .unwrap()
    .expect("run scripts/testenv/up.sh");
    assert!(
        up.status.success(),
        "a second control plane did not start:\n{}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    let kubeconfig = Kubeconfig::read_from(run.join("admin.kubeconfig")).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    let admin = Client::try_from(config.clone()).unwrap();

    // deploy/crds' CiliumNodeConfig CRD with v2 removed: v2alpha1 served and stored.
    let text =
        std::fs::read_to_string(repo_root().join("deploy/crds/ciliumnodeconfigs.yaml")).unwrap();
    let mut crd: CustomResourceDefinition = serde_yaml_ng::from_str(&text).unwrap();
    crd.spec.versions.retain(|v| v.name == "v2alpha1");
    assert_eq!(crd.spec.versions.len(), 1, "deploy/crds has no v2alpha1");
    crd.spec.versions[0].served = true;
    crd.spec.versions[0].storage = true;
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    crds.create(&PostParams::default(), &crd).await.unwrap();
    // As on Cilium 1.13 to 1.15, cilium.io/v2 is served too, for other kinds: discovery must
    // look past it to v2alpha1.
    let text =
        std::fs::read_to_string(repo_root().join("deploy/crds/ciliumendpoints.yaml")).unwrap();
    let endpoints: CustomResourceDefinition = serde_yaml_ng::from_str(&text).unwrap();
    assert!(
        endpoints
            .spec
            .versions
            .iter()
            .any(|v| v.name == "v2" && v.served)
    );
    crds.create(&PostParams::default(), &endpoints)
        .await
        .unwrap();
    let ns = "cilium-served";
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    // Served once discovery lists it.
    wait_until(
        "v2alpha1 ciliumnodeconfigs served",
        Duration::from_secs(60),
        || {
            let admin = admin.clone();
            async move {
                kube::discovery::group(&admin, "cilium.io")
                    .await
                    .is_ok_and(|g| {
                        serves_node_configs(&g, "v2alpha1")
                            && g.versioned_resources("v2")
                                .iter()
                                .any(|(r, _)| r.plural == "ciliumendpoints")
                    })
            }
        },
    )
    .await;

    let cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
    let nc = CiliumNodeConfig::for_migration(&cfg, ValueInputs::default());
    let cilium = cnimig_kube::KubeCluster::new(config, common::opts(ns)).unwrap();
    cilium.apply_node_config(&nc).await.unwrap();
    cilium.apply_node_config(&nc).await.unwrap(); // idempotent at that version too

    let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), ns, &cnc("v2alpha1"));
    let obj = api.get(&nc.name).await.unwrap();
    assert_eq!(
        obj.data["spec"]["defaults"]["write-cni-conf-when-ready"],
        "/host/etc/cni/net.d/05-cilium.conflist"
    );
    let ours = obj
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .find(|m| m.manager.as_deref() == Some("cnimig"))
        .expect("cnimig's managed fields");
    assert_eq!(ours.api_version.as_deref(), Some("cilium.io/v2alpha1"));
    // v2 serves no ciliumnodeconfigs on this cluster.
    let v2: Api<DynamicObject> = Api::namespaced_with(admin.clone(), ns, &cnc("v2"));
    match v2.get(&nc.name).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 404, "{e:?}"),
        other => panic!("v2 answered on a cluster serving only v2alpha1: {other:?}"),
    }

    // Neither version served: the adapter says what to install and writes nothing.
    crds.delete(&crd.metadata.name.clone().unwrap(), &Default::default())
        .await
        .unwrap();
    wait_until(
        "ciliumnodeconfigs no longer served",
        Duration::from_secs(60),
        || {
            let admin = admin.clone();
            async move {
                match kube::discovery::group(&admin, "cilium.io").await {
                    Err(_) => true,
                    Ok(g) => !g.versions().any(|v| serves_node_configs(&g, v)),
                }
            }
        },
    )
    .await;
    let err = cilium.apply_node_config(&nc).await.unwrap_err().to_string();
    assert!(err.contains("install Cilium 1.13 or later"), "{err}");
    assert!(err.contains("without ciliumnodeconfigs"), "{err}");
    // Nor any cilium.io version at all.
    crds.delete(
        &endpoints.metadata.name.clone().unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    wait_until(
        "cilium.io no longer served",
        Duration::from_secs(60),
        || {
            let admin = admin.clone();
            async move { kube::discovery::group(&admin, "cilium.io").await.is_err() }
        },
    )
    .await;
    let err = cilium.apply_node_config(&nc).await.unwrap_err().to_string();
    assert!(err.contains("install Cilium 1.13 or later"), "{err}");
    assert!(err.contains("not served"), "{err}");
}

fn serves_node_configs(group: &kube::discovery::ApiGroup, version: &str) -> bool {
    group
        .versioned_resources(version)
        .iter()
        .any(|(r, _)| r.plural == "ciliumnodeconfigs")
}

fn cnc(version: &str) -> kube::api::ApiResource {
    kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("cilium.io", version, "CiliumNodeConfig"),
        "ciliumnodeconfigs",
    )
}
