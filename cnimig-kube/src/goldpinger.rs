//! Cluster-wide connectivity with Goldpinger: its manifests (typed objects, printable as YAML),
//! an optional deployment, and [`GoldpingerVerifier`], a [`Verifier`] whose
//! [`verify_cluster`](Verifier::verify_cluster) reads Goldpinger's full `/check_all` result
//! (every pod calls every other pod through pod IPs) and requires every pair healthy within a
//! retry window; a failure names the failing pairs and their nodes
//! ([`cnimig_core::verify::failing_pairs`]).
//!
//! Where `/check_all` is read ([`GoldpingerSource`]):
//! - `ServiceProxy` (the default): `GET /api/v1/namespaces/NS/services/NAME:PORT/proxy/check_all`
//!   through the API server, no port-forward and no route to the pod network needed. RBAC: `get
//!   services/proxy` on the Service.
//! - `Url`: a direct `http://` URL (a `kubectl port-forward`, an ingress, or the emulator's
//!   endpoint on loopback, which the API server's proxy refuses). Plain HTTP only.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use cnimig_core::model::NodeName;
use cnimig_core::ports::{PortError, Verification, Verifier};
use cnimig_core::verify::{CheckAll, capped, failing_pairs};
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSpec,
    PodTemplateSpec, Probe, Service, ServiceAccount, ServicePort, ServiceSpec, Toleration,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::port_error;
use crate::{FIELD_MANAGER, KubeCluster, convert};

/// Where [`GoldpingerVerifier`] reads `/check_all`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GoldpingerSource {
    /// Through the API server's service proxy.
    ServiceProxy,
    /// A direct `http://host:port/check_all` URL.
    Url(String),
}

/// Goldpinger's place and image, and how long the check may take to turn healthy.
#[derive(Debug, Clone)]
pub struct GoldpingerOptions {
    /// Namespace (`goldpinger`).
    pub namespace: String,
    /// Name of the DaemonSet, Service, ServiceAccount and RBAC objects (`goldpinger`).
    pub name: String,
    /// Image (`bloomberg/goldpinger:3.10.2`).
    pub image: String,
    /// HTTP port (8080).
    pub port: u16,
    /// Where `/check_all` is read.
    pub source: GoldpingerSource,
    /// How long a failing check is retried before it counts as failed (pods restarted onto
    /// Cilium need a moment to be listed and answer).
    pub window: Duration,
    /// Pause between tries.
    pub interval: Duration,
    /// Timeout of one `/check_all` request.
    pub request_timeout: Duration,
}

impl Default for GoldpingerOptions {
    fn default() -> Self {
        GoldpingerOptions {
            namespace: "goldpinger".into(),
            name: "goldpinger".into(),
            image: "bloomberg/goldpinger:3.10.2".into(),
            port: 8080,
            source: GoldpingerSource::ServiceProxy,
            window: Duration::from_secs(60),
            interval: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// The objects Goldpinger needs, typed.
#[derive(Debug, Clone)]
pub struct GoldpingerManifests {
    /// The pods' identity.
    pub service_account: ServiceAccount,
    /// `list pods` (Goldpinger finds its peers through the API).
    pub cluster_role: ClusterRole,
    /// Binds the role to the ServiceAccount.
    pub cluster_role_binding: ClusterRoleBinding,
    /// One pod per node, tolerating every taint so control-plane nodes are checked too.
    pub daemon_set: DaemonSet,
    /// The Service `/check_all` is read through.
    pub service: Service,
}

fn meta(name: &str, ns: Option<&str>, labels: &BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: ns.map(str::to_string),
        labels: Some(labels.clone()),
        ..ObjectMeta::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn value_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// Goldpinger's ServiceAccount, ClusterRole (`list pods`), ClusterRoleBinding, DaemonSet and
/// Service, labelled `app=<name>`.
#[must_use]
pub fn manifests(o: &GoldpingerOptions) -> GoldpingerManifests {
    let labels: BTreeMap<String, String> = [("app".to_string(), o.name.clone())].into();
    let ns = Some(o.namespace.as_str());
    let probe = Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz".into()),
            port: IntOrString::Int(i32::from(o.port)),
            ..HTTPGetAction::default()
        }),
        initial_delay_seconds: Some(5),
        period_seconds: Some(5),
        ..Probe::default()
    };
    let container = Container {
        name: "goldpinger".into(),
        image: Some(o.image.clone()),
        env: Some(vec![
            value_env("HOST", "0.0.0.0"),
            value_env("PORT", &o.port.to_string()),
            value_env("LABEL_SELECTOR", &format!("app={}", o.name)),
            value_env("NAMESPACE", &o.namespace),
            field_env("HOSTNAME", "spec.nodeName"),
            field_env("POD_IP", "status.podIP"),
            field_env("HOST_IP", "status.hostIP"),
        ]),
        ports: Some(vec![ContainerPort {
            container_port: i32::from(o.port),
            name: Some("http".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(probe.clone()),
        liveness_probe: Some(probe),
        ..Container::default()
    };
    GoldpingerManifests {
        service_account: ServiceAccount {
            metadata: meta(&o.name, ns, &labels),
            ..ServiceAccount::default()
        },
        cluster_role: ClusterRole {
            metadata: meta(&o.name, None, &labels),
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["pods".into()]),
                verbs: vec!["list".into()],
                ..PolicyRule::default()
            }]),
            ..ClusterRole::default()
        },
        cluster_role_binding: ClusterRoleBinding {
            metadata: meta(&o.name, None, &labels),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: o.name.clone(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: o.name.clone(),
                namespace: Some(o.namespace.clone()),
                ..Subject::default()
            }]),
        },
        daemon_set: DaemonSet {
            metadata: meta(&o.name, ns, &labels),
            spec: Some(DaemonSetSpec {
                selector: LabelSelector {
                    match_labels: Some(labels.clone()),
                    ..LabelSelector::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels.clone()),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        service_account_name: Some(o.name.clone()),
                        containers: vec![container],
                        tolerations: Some(vec![Toleration {
                            operator: Some("Exists".into()),
                            ..Toleration::default()
                        }]),
                        ..PodSpec::default()
                    }),
                },
                ..DaemonSetSpec::default()
            }),
            ..DaemonSet::default()
        },
        service: Service {
            metadata: meta(&o.name, ns, &labels),
            spec: Some(ServiceSpec {
                selector: Some(labels),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: i32::from(o.port),
                    target_port: Some(IntOrString::Int(i32::from(o.port))),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        },
    }
}

fn with_type<T: serde::Serialize>(
    obj: &T,
    api_version: &str,
    kind: &str,
) -> Result<serde_json::Value, PortError> {
    let mut v = serde_json::to_value(obj).map_err(|e| PortError::Invalid {
        what: format!("serialise {kind}"),
        detail: e.to_string(),
    })?;
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), api_version.into());
        m.insert("kind".into(), kind.into());
    }
    Ok(v)
}

impl GoldpingerManifests {
    /// The objects as JSON values with `apiVersion` and `kind`, in apply order (the namespace
    /// is not included: create it first).
    ///
    /// # Errors
    /// Never in practice (serialising typed objects).
    pub fn objects(&self) -> Result<Vec<serde_json::Value>, PortError> {
        Ok(vec![
            with_type(&self.service_account, "v1", "ServiceAccount")?,
            with_type(
                &self.cluster_role,
                "rbac.authorization.k8s.io/v1",
                "ClusterRole",
            )?,
            with_type(
                &self.cluster_role_binding,
                "rbac.authorization.k8s.io/v1",
                "ClusterRoleBinding",
            )?,
            with_type(&self.daemon_set, "apps/v1", "DaemonSet")?,
            with_type(&self.service, "v1", "Service")?,
        ])
    }

    /// A multi-document YAML manifest, for `kubectl apply -f -` or review.
    ///
    /// # Errors
    /// Never in practice (serialising typed objects).
    pub fn to_yaml(&self) -> Result<String, PortError> {
        let mut out = String::new();
        for o in self.objects()? {
            let y = serde_yaml_ng::to_string(&o).map_err(|e| PortError::Invalid {
                what: "print the Goldpinger manifests".into(),
                detail: e.to_string(),
            })?;
            out.push_str("---\n");
            out.push_str(&y);
        }
        Ok(out)
    }

    /// Server-side applies every object (field manager `cnimig`); the namespace must exist.
    ///
    /// # RBAC
    /// `patch` (and `create`) of serviceaccounts, services and daemonsets in the namespace,
    /// clusterroles and clusterrolebindings; and, to grant it, `list pods` itself
    /// (`deploy/rbac-verify.yaml`).
    ///
    /// # Errors
    /// The first failed apply; objects applied before it stay (applying again is idempotent).
    pub async fn apply(&self, client: &kube::Client) -> Result<(), PortError> {
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let ns = self
            .daemon_set
            .metadata
            .namespace
            .clone()
            .unwrap_or_default();
        let name = self.daemon_set.metadata.name.clone().unwrap_or_default();
        let what = |k: &str| format!("{k} {ns}/{name}");
        Api::<ServiceAccount>::namespaced(client.clone(), &ns)
            .patch(&name, &pp, &Patch::Apply(&self.service_account))
            .await
            .map_err(|e| port_error("apply", what("serviceaccount"), e))?;
        Api::<ClusterRole>::all(client.clone())
            .patch(&name, &pp, &Patch::Apply(&self.cluster_role))
            .await
            .map_err(|e| port_error("apply", format!("clusterrole {name}"), e))?;
        Api::<ClusterRoleBinding>::all(client.clone())
            .patch(&name, &pp, &Patch::Apply(&self.cluster_role_binding))
            .await
            .map_err(|e| port_error("apply", format!("clusterrolebinding {name}"), e))?;
        Api::<DaemonSet>::namespaced(client.clone(), &ns)
            .patch(&name, &pp, &Patch::Apply(&self.daemon_set))
            .await
            .map_err(|e| port_error("apply", what("daemonset"), e))?;
        Api::<Service>::namespaced(client.clone(), &ns)
            .patch(&name, &pp, &Patch::Apply(&self.service))
            .await
            .map_err(|e| port_error("apply", what("service"), e))?;
        Ok(())
    }
}

/// A [`Verifier`]: node checks from [`KubeCluster`] (pods on Cilium with a `CiliumEndpoint`),
/// cluster checks from Goldpinger's `/check_all` plus every node Ready.
#[derive(Debug, Clone)]
pub struct GoldpingerVerifier {
    cluster: KubeCluster,
    opts: GoldpingerOptions,
}

impl GoldpingerVerifier {
    /// A verifier reading Goldpinger as `opts` says.
    ///
    /// # Errors
    /// [`PortError::Invalid`] when the URL of [`GoldpingerSource::Url`] is not `http://host:port/…`.
    pub fn new(cluster: KubeCluster, opts: GoldpingerOptions) -> Result<Self, PortError> {
        if let GoldpingerSource::Url(u) = &opts.source {
            split_url(u)?;
        }
        Ok(GoldpingerVerifier { cluster, opts })
    }

    /// One read of `/check_all`, parsed.
    ///
    /// # RBAC
    /// With the service proxy: `get services/proxy` in Goldpinger's namespace.
    ///
    /// # Errors
    /// When it cannot be read or is not Goldpinger's JSON.
    pub async fn check_all(&self) -> Result<CheckAll, PortError> {
        let o = &self.opts;
        let body = match &o.source {
            GoldpingerSource::ServiceProxy => {
                let path = format!(
                    "/api/v1/namespaces/{}/services/{}:{}/proxy/check_all",
                    o.namespace, o.name, o.port
                );
                let req =
                    http::Request::get(&path)
                        .body(Vec::new())
                        .map_err(|e| PortError::Invalid {
                            what: format!("build GET {path}"),
                            detail: e.to_string(),
                        })?;
                let fut = self.cluster.client().request_text(req);
                tokio::time::timeout(o.request_timeout, fut)
                    .await
                    .map_err(|_| PortError::Timeout {
                        what: format!("GET {path}"),
                    })?
                    .map_err(|e| port_error("get", format!("services/proxy {path}"), e))?
            }
            GoldpingerSource::Url(u) => tokio::time::timeout(o.request_timeout, http_get(u))
                .await
                .map_err(|_| PortError::Timeout {
                    what: format!("GET {u}"),
                })??,
        };
        serde_json::from_str(&body).map_err(|e| PortError::Invalid {
            what: "read Goldpinger's /check_all answer".into(),
            detail: format!(
                "{e}; is {} really Goldpinger? (first bytes: {:?})",
                match &o.source {
                    GoldpingerSource::ServiceProxy => format!("service {}/{}", o.namespace, o.name),
                    GoldpingerSource::Url(u) => u.clone(),
                },
                body.chars().take(80).collect::<String>()
            ),
        })
    }

    /// The current problems: nodes not Ready, and `/check_all`'s failing pairs.
    async fn problems(&self) -> Result<Vec<String>, PortError> {
        let nodes = self
            .cluster
            .nodes()
            .list(&self.cluster.node_list_params())
            .await
            .map_err(|e| port_error("list", "nodes", e))?;
        let nodes: Vec<_> = nodes.items.iter().filter_map(convert::node).collect();
        let mut out: Vec<String> = nodes
            .iter()
            .filter(|n| !n.ready)
            .map(|n| format!("node {} is not Ready", n.name))
            .collect();
        let by_ip: BTreeMap<String, String> = nodes
            .iter()
            .flat_map(|n| {
                n.internal_ips
                    .iter()
                    .map(|ip| (ip.to_string(), n.name.to_string()))
            })
            .collect();
        let expected: Vec<String> = nodes
            .iter()
            .filter(|n| n.ready)
            .map(|n| n.name.to_string())
            .collect();
        let r = self.check_all().await?;
        out.extend(failing_pairs(&r, &by_ip, &expected));
        Ok(out)
    }
}

#[async_trait]
impl Verifier for GoldpingerVerifier {
    /// [`KubeCluster`]'s node check: every pod-network pod on the node has a Cilium address and
    /// a `CiliumEndpoint`, and is Ready.
    async fn verify_node(&self, node: &NodeName) -> Result<Verification, PortError> {
        self.cluster.verify_node(node).await
    }

    /// Every node Ready and every Goldpinger pod reaching every other one, retried every
    /// [`GoldpingerOptions::interval`] until healthy or [`GoldpingerOptions::window`] has
    /// passed; then the last problems, failing pairs named with their nodes.
    ///
    /// # RBAC
    /// `list nodes`; `get services/proxy` in Goldpinger's namespace (service proxy source).
    ///
    /// # Errors
    /// When the nodes or `/check_all` cannot be read at the end of the window.
    async fn verify_cluster(&self) -> Result<Verification, PortError> {
        let deadline = tokio::time::Instant::now() + self.opts.window;
        loop {
            let last = self.problems().await;
            match last {
                Ok(p) if p.is_empty() => return Ok(Verification::Healthy),
                Ok(p) if tokio::time::Instant::now() >= deadline => {
                    return Ok(Verification::Unhealthy(capped(p)));
                }
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                _ => tokio::time::sleep(self.opts.interval).await,
            }
        }
    }
}

/// `(host:port, path)` of an `http://` URL.
fn split_url(u: &str) -> Result<(String, String), PortError> {
    let bad = |why: &str| PortError::Invalid {
        what: format!("Goldpinger URL {u:?}"),
        detail: format!("{why}; give http://HOST:PORT/check_all"),
    };
    let rest = u
        .strip_prefix("http://")
        .ok_or_else(|| bad("only plain http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/check_all"),
    };
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

/// A minimal HTTP/1.0 GET (Goldpinger answers plain HTTP; 1.0 avoids chunked replies).
async fn http_get(u: &str) -> Result<String, PortError> {
    let (authority, path) = split_url(u)?;
    let unavailable = |detail: String| PortError::Unavailable {
        what: format!("GET {u}"),
        detail,
    };
    let mut sock = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let req =
        format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: application/json\r\n\r\n");
    sock.write_all(req.as_bytes())
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let mut raw = Vec::new();
    sock.read_to_end(&mut raw)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| unavailable("no HTTP header in the answer".into()))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(unavailable(format!(
            "HTTP {status}: {}",
            body.chars().take(200).collect::<String>()
        )));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://127.0.0.1:8080/check_all").unwrap(),
            ("127.0.0.1:8080".into(), "/check_all".into())
        );
        assert_eq!(
            split_url("http://gp").unwrap(),
            ("gp:80".into(), "/check_all".into())
        );
        assert!(split_url("https://gp/check_all").is_err());
        assert!(split_url("http:///x").is_err());
    }

    #[test]
    fn manifests_print_and_select_their_pods() {
        let m = manifests(&GoldpingerOptions::default());
        let y = m.to_yaml().unwrap();
        assert_eq!(y.matches("---\n").count(), 5);
        assert!(y.contains("kind: DaemonSet") && y.contains("kind: ClusterRoleBinding"));
        let ds = m.daemon_set.spec.unwrap();
        assert_eq!(
            ds.selector.match_labels,
            ds.template.metadata.unwrap().labels
        );
        assert_eq!(m.service.spec.unwrap().selector, ds.selector.match_labels);
    }
}
