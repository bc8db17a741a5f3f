//! Putting a test control plane in shape: the CRDs of `deploy/crds/`, cnimig's RBAC from
//! `deploy/rbac.yaml`, server-side apply of arbitrary objects, and a client acting as a
//! ServiceAccount (a token from the TokenRequest API).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::discovery::Scope;
use kube::{Client, Config};
use serde_json::Value;

/// The field manager of everything set up here.
pub const MANAGER: &str = "cnimig-setup";

/// The CRDs of `deploy/crds/`: Cilium's `CiliumNodeConfig` (v2 and v2alpha1), `CiliumNode`,
/// `CiliumEndpoint`, `CiliumNetworkPolicy`, `CiliumClusterwideNetworkPolicy`; Calico's `IPPool`,
/// `FelixConfiguration`, `IPAMBlock`, `Tier`, `GlobalNetworkPolicy`, `NetworkPolicy`,
/// `GlobalNetworkSet`, `NetworkSet`; the operator's `Installation`.
pub const CRDS: [&str; 14] = [
    include_str!("../../deploy/crds/ciliumnodeconfigs.yaml"),
    include_str!("../../deploy/crds/ciliumnodes.yaml"),
    include_str!("../../deploy/crds/ciliumendpoints.yaml"),
    include_str!("../../deploy/crds/ippools.yaml"),
    include_str!("../../deploy/crds/felixconfigurations.yaml"),
    include_str!("../../deploy/crds/ipamblocks.yaml"),
    include_str!("../../deploy/crds/installations.yaml"),
    include_str!("../../deploy/crds/tiers.yaml"),
    include_str!("../../deploy/crds/globalnetworkpolicies.yaml"),
    include_str!("../../deploy/crds/networkpolicies.yaml"),
    include_str!("../../deploy/crds/globalnetworksets.yaml"),
    include_str!("../../deploy/crds/networksets.yaml"),
    include_str!("../../deploy/crds/ciliumnetworkpolicies.yaml"),
    include_str!("../../deploy/crds/ciliumclusterwidenetworkpolicies.yaml"),
];

/// `deploy/rbac.yaml`: ServiceAccount `kube-system/cnimig`, ClusterRole and binding `cnimig`.
pub const RBAC: &str = include_str!("../../deploy/rbac.yaml");

/// Parses a multi-document YAML text into JSON values (empty documents skipped).
///
/// # Errors
/// When a document is not valid YAML.
pub fn yaml_docs(text: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(doc).context("parse YAML document")?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// Server-side applies `obj` (field manager [`MANAGER`], forced), finding its resource by
/// discovery.
///
/// # Errors
/// When the kind is not served or the apply fails.
pub async fn apply(client: &Client, obj: &Value) -> Result<DynamicObject> {
    let api_version = obj["apiVersion"]
        .as_str()
        .context("object without apiVersion")?;
    let kind = obj["kind"].as_str().context("object without kind")?;
    let name = obj["metadata"]["name"]
        .as_str()
        .context("object without name")?;
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("discover {api_version} {kind}"))?;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => {
            let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
            Api::namespaced_with(client.clone(), ns, &ar)
        }
        Scope::Cluster => Api::all_with(client.clone(), &ar),
    };
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .with_context(|| format!("apply {kind} {name}"))
}

/// Applies every document of a YAML text.
///
/// # Errors
/// As [`apply`].
pub async fn apply_yaml(client: &Client, text: &str) -> Result<()> {
    for doc in yaml_docs(text)? {
        apply(client, &doc).await?;
    }
    Ok(())
}

/// Installs the [`CRDS`] and waits until each is Established and served.
///
/// # Errors
/// When an apply fails or a CRD is not served within 60 s.
pub async fn install_crds(client: &Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut crds = Vec::new();
    for text in CRDS {
        let crd: CustomResourceDefinition =
            serde_yaml_ng::from_str(text).context("parse a CRD of deploy/crds")?;
        let name = crd.metadata.name.clone().context("CRD without name")?;
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("apply CRD {name}"))?;
        crds.push(crd);
    }
    for crd in &crds {
        for v in &crd.spec.versions {
            let gvk = GroupVersionKind::gvk(&crd.spec.group, &v.name, &crd.spec.names.kind);
            let mut tries = 0;
            while kube::discovery::pinned_kind(client, &gvk).await.is_err() {
                tries += 1;
                if tries > 240 {
                    bail!(
                        "{}/{} {} not served after 60s",
                        crd.spec.group,
                        v.name,
                        crd.spec.names.kind
                    );
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    Ok(())
}

/// The cluster-scoped Calico objects the tests on the shared control plane install (identical
/// everywhere, so tests running in parallel agree): an operator install (`Installation default`,
/// Iptables dataplane, no BGP, node addresses by the node's InternalIP) with the VXLAN pool
/// `default-ipv4-ippool` (10.42.0.0/16, natOutgoing, /26 blocks) and Felix's VXLAN on port 4789.
///
/// # Errors
/// When an apply fails (the Calico and operator CRDs must be installed: [`install_crds`]).
pub async fn calico_objects(client: &Client) -> Result<()> {
    for obj in [
        serde_json::json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool",
               "metadata": {"name": "default-ipv4-ippool"},
               "spec": {"cidr": "10.42.0.0/16", "vxlanMode": "Always", "ipipMode": "Never",
                        "natOutgoing": true, "blockSize": 26}}),
        serde_json::json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "FelixConfiguration",
               "metadata": {"name": "default"},
               "spec": {"vxlanPort": 4789, "vxlanVNI": 4096, "vxlanEnabled": true}}),
        serde_json::json!({"apiVersion": "operator.tigera.io/v1", "kind": "Installation",
               "metadata": {"name": "default"},
               "spec": {"calicoNetwork": {"linuxDataplane": "Iptables", "bgp": "Disabled",
                   "nodeAddressAutodetectionV4": {"kubernetes": "NodeInternalIP"},
                   "ipPools": [{"cidr": "10.42.0.0/16", "encapsulation": "VXLAN"}]}}}),
    ] {
        apply(client, &obj).await?;
    }
    Ok(())
}

/// A fresh token (TokenRequest API, one hour) for ServiceAccount `namespace/name`.
///
/// # Errors
/// When the token request fails.
pub async fn service_account_token(admin: &Client, namespace: &str, name: &str) -> Result<String> {
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(3600),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    let resp: TokenRequest = sas
        .create_subresource("token", name, &PostParams::default(), &req)
        .await
        .with_context(|| format!("request a token for serviceaccount {namespace}/{name}"))?;
    Ok(resp.status.context("token request without status")?.token)
}

/// A client config that authenticates as ServiceAccount `namespace/name` with a fresh token
/// ([`service_account_token`]), keeping `admin`'s server and CA.
///
/// # Errors
/// When the token request fails.
pub async fn service_account_config(
    admin: &Client,
    admin_config: &Config,
    namespace: &str,
    name: &str,
) -> Result<Config> {
    let token = service_account_token(admin, namespace, name).await?;
    let mut config = admin_config.clone();
    config.auth_info = kube::config::AuthInfo {
        token: Some(secrecy::SecretString::from(token)),
        ..kube::config::AuthInfo::default()
    };
    Ok(config)
}

/// The agents' DaemonSets as the emulator runs them: `cilium` and `calico-node` in `ns` (label
/// `k8s-app=<name>`, host network, every taint tolerated, a 1 s grace period) on the nodes
/// labelled `cnimig.io/e2e=<ns>`, one container named after each with `image` and `env` (a
/// JSON array of `EnvVar`s).
#[must_use]
pub fn agent_daemon_sets(ns: &str, image: &str, env: &Value) -> Vec<Value> {
    ["cilium", "calico-node"]
        .into_iter()
        .map(|label| agent_daemon_set(ns, label, image, env))
        .collect()
}

/// One agent DaemonSet as [`agent_daemon_sets`] writes them: `name` in `ns`, label
/// `k8s-app=<name>`.
#[must_use]
pub fn agent_daemon_set(ns: &str, name: &str, image: &str, env: &Value) -> Value {
    serde_json::json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"matchLabels": {"k8s-app": name}},
                 "template": {"metadata": {"labels": {"k8s-app": name}},
                    "spec": {"hostNetwork": true, "nodeSelector": {"cnimig.io/e2e": ns},
                             "terminationGracePeriodSeconds": 1,
                             "tolerations": [{"operator": "Exists"}],
                             "containers": [{"name": name, "image": image, "env": env}]}}}})
}

/// Waits until exactly `n` pods of `ns` are Ready and not being deleted.
///
/// # Errors
/// After `timeout`, naming how many were Ready at the last look.
pub async fn wait_ready_pods(client: &Client, ns: &str, n: usize, timeout: Duration) -> Result<()> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = 0;
    loop {
        if let Ok(l) = pods.list(&kube::api::ListParams::default()).await {
            seen = l
                .items
                .iter()
                .filter(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && p.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                })
                .count();
            if seen == n {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{seen} of the {n} pods expected in namespace {ns} are Ready after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
