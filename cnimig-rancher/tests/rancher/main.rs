//! cnimig-rancher against the real control plane (`scripts/testenv`), with the emulator
//! (`cnimig-emu`) as kubelets and CNI agents, and the Rancher, RKE2, Argo CD and Fleet objects
//! created from the CRD schemas in `deploy/crds/rancher/`. Everything cnimig does runs as its
//! ServiceAccount with `deploy/rbac.yaml` and `deploy/rbac-rancher.yaml`.
//!
//! Without a control plane each test prints SKIPPED and passes, unless
//! `CNIMIG_REQUIRE_TESTENV=1`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// The harness of cnimig-kube's tests (control plane, ServiceAccount, temporary namespaces).
#[allow(dead_code)]
#[path = "../../../cnimig-kube/tests/kube/common.rs"]
mod common;

mod dry_run;
mod e2e;
mod steps;

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, GroupVersionKind, Patch, PatchParams};
use serde_json::Value;
use tokio::sync::OnceCell;

static RANCHER_SETUP: OnceCell<()> = OnceCell::const_new();

/// Installs `deploy/crds/rancher/` (once per process) and waits until each is served.
pub async fn rancher_crds(admin: &Client) {
    RANCHER_SETUP
        .get_or_init(|| async {
            let api: Api<CustomResourceDefinition> = Api::all(admin.clone());
            let mut crds = Vec::new();
            for text in cnimig_rancher::CRDS {
                let crd: CustomResourceDefinition =
                    serde_yaml_ng::from_str(text).expect("a CRD of deploy/crds/rancher");
                let name = crd.metadata.name.clone().expect("CRD name");
                api.patch(
                    &name,
                    &PatchParams::apply("cnimig-setup").force(),
                    &Patch::Apply(&crd),
                )
                .await
                .expect("apply CRD");
                crds.push(crd);
            }
            for crd in &crds {
                let v = &crd.spec.versions[0].name;
                let gvk = GroupVersionKind::gvk(&crd.spec.group, v, &crd.spec.names.kind);
                common::wait_until(
                    &format!("{} served", crd.spec.names.plural),
                    Duration::from_secs(60),
                    || {
                        let gvk = gvk.clone();
                        async move { kube::discovery::pinned_kind(admin, &gvk).await.is_ok() }
                    },
                )
                .await;
            }
        })
        .await;
}

/// Applies `deploy/rbac-rancher.yaml`, with its namespaced Roles and RoleBindings (cattle-system,
/// kube-system) moved into `ns`, where the test keeps the agent and the system objects.
pub async fn rancher_rbac(admin: &Client, ns: &str) {
    for mut doc in cnimig_emu::setup::yaml_docs(cnimig_rancher::RBAC).unwrap() {
        if doc["metadata"].get("namespace").is_some() {
            doc["metadata"]["namespace"] = Value::String(ns.to_string());
        }
        cnimig_emu::setup::apply(admin, &doc).await.unwrap();
    }
}

/// The cluster-scoped Calico objects cnimig-kube's tests create (identical, so tests running in
/// parallel agree): an operator install with a VXLAN pool, Felix on port 4789, autodetection by
/// the node's InternalIP.
pub async fn calico_objects(client: &Client) {
    cnimig_emu::setup::calico_objects(client)
        .await
        .expect("Calico objects");
}
