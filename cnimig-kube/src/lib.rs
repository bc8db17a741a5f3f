//! # cnimig-kube
//!
//! The ports of [`cnimig_core::ports`] on a real Kubernetes API, with kube-rs. One value,
//! [`KubeCluster`], implements all six ([`Cluster`](cnimig_core::ports::Cluster),
//! [`NewCni`](cnimig_core::ports::NewCni) for Cilium, [`OldCni`](cnimig_core::ports::OldCni) for
//! Calico, [`Verifier`](cnimig_core::ports::Verifier),
//! [`StateStore`](cnimig_core::ports::StateStore) and [`Clock`](cnimig_core::ports::Clock) through
//! [`SystemClock`]), so `Ports::from_one(KubeCluster::infer(opts).await?)` is a complete set.
//!
//! Where to start:
//! - [`KubeCluster::new`] / [`KubeCluster::infer`] and [`KubeOptions`];
//! - [`convert`]: how Nodes, Pods and PodDisruptionBudgets become model values (pure, tested
//!   without a cluster);
//! - [`events::KubeEventSink`]: the orchestrator's progress as Kubernetes Events on the Nodes;
//! - [`goldpinger`]: Goldpinger's manifests and [`goldpinger::GoldpingerVerifier`], the cluster
//!   check that reads every node-to-node result (README, "Verification");
//! - [`prepare`]: the Calico autodetection fix applied with an exact undo record, the
//!   `calico-node` rollout wait, and the `projectcalico.org/IPv4Address` vs InternalIP check;
//! - [`metrics`]: `apiserver_request_total` scraping, for request-cost reports;
//! - `deploy/rbac.yaml`: the ServiceAccount and ClusterRole with exactly the verbs used here; each
//!   method's `# RBAC` section names its own.
//! - [`log`]: every write to the API server logged at `info`, in the step's tracing span.
//!
//! The pure parts run without a cluster:
//!
//! ```
//! use cnimig_kube::convert::{cpu_millis, memory_bytes};
//! use cnimig_kube::log::describe;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! assert_eq!(cpu_millis("250m"), Some(250));
//! assert_eq!(memory_bytes("128Mi"), Some(128 << 20));
//! // The log line an eviction gets.
//! let w = describe(&http::Method::POST, &"/api/v1/namespaces/shop/pods/web-0/eviction".parse()?)
//!     .ok_or("an eviction is a write")?;
//! assert_eq!((w.verb, w.resource.as_str(), w.object.as_str()), ("create", "pods/eviction", "shop/web-0"));
//! # Ok(())
//! # }
//! ```
//!
//! ## What is read and written
//!
//! | port method | API calls |
//! |---|---|
//! | `node_view` | GET node; LIST pods `fieldSelector=spec.nodeName=<node>`; GET `cilium-config` once (cached) |
//! | `budget_view` | per node: LIST pods on the node (field selector); one LIST of PDBs, all namespaces |
//! | `set_unschedulable`, `set_node_label` | merge PATCH of the node |
//! | `evict` | POST `pods/eviction` (no client retry); on 500 or a 429 without a name, LIST PDBs in the namespace |
//! | `save` | JSON PATCH of the node annotation `cnimig.io/migration` with a `test` op (the first save: GET, then a `test` of `resourceVersion`) |
//! | `acquire_lock` | GET, then CREATE or UPDATE (resourceVersion precondition) of a Lease |
//!
//! While the adapter holds the run lock, `node_view`, `node_names`, `budget_view`, `agent`,
//! `cni_dir`, `verify_cluster`, `verify_node`'s pod read and the first `save`'s read are answered
//! from watches instead (one of the Nodes, one of the budgets, and one of every pod, or on a
//! cluster above `KubeOptions::one_pod_watch_max_pods` one per looked-at node of its pods by field
//! selector; see `watch` below): after each watch's initial state, a look at a node costs no
//! request. The Node a write returns goes into the node watch's copy at once.
//!
//! ## Watches (`watch`)
//!
//! The run's caches are `kube::runtime::watcher` streams whose initial state is a streaming
//! list: one WATCH with `sendInitialEvents=true` per cache, no LIST, streamed again after 410
//! Gone. A server that refuses streaming lists (the `WatchList` feature gate off: Kubernetes
//! 1.27 to 1.31, and 1.33 by default) or never ends one makes the adapter LIST then WATCH from
//! then on; the first cache probes, the others wait for its answer. They are started at the
//! first read after the lock is taken and stopped when it is released (a node's pod watch also
//! after a minute without a read). A watch that failed is not read until it delivers again
//! (reads go to the API server meanwhile); one refused by RBAC fails the read with `Forbidden`.
//!
//! ## Two clients
//!
//! kube's `Config::default_retry` retries 429, 503 and 504 up to 15 times with backoff up to
//! 1000 s; a PodDisruptionBudget refusal is a 429, so an eviction through such a client hangs for
//! minutes inside one call. Evictions therefore go through a second client with the retry off;
//! the orchestrator retries them on its own schedule.
//!
//! ## k8s-openapi version
//!
//! This library does not pick a `k8s-openapi` version feature (libraries must not). Binaries and
//! tests do: the workspace's `cnimig-emu` binary enables `v1_34`, and Cargo's feature unification
//! lets `cargo build --workspace`, `cargo clippy --workspace` and `cargo doc --workspace` build
//! this crate; this crate's dev-dependencies enable `v1_34` for its tests. Building this crate
//! alone (`cargo build -p cnimig-kube`) needs a dependent that picks a version.
//!
//! ## Emulator contracts
//!
//! Two things a real cluster exposes only on the node are read from annotations that the
//! emulator (`cnimig-emu`) writes, documented on the methods that read them:
//! [`AGENT_CONFIG_ANNOTATION`] (the node config a Cilium agent resolved) and
//! [`CNI_DIR_ANNOTATION`] (the state of `/etc/cni/net.d`). A node without the latter is a real
//! one: the inventory lists it as `unobservable`, and preflight (rule `node-observability`)
//! refuses a run over it before any write.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use cnimig_core::model::{NodeName, Pod};
use cnimig_core::ports::PortError;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1 as core;
use kube::api::{Api, ListParams};
use kube::{Client, Config};
use tokio::sync::RwLock;

pub mod allow;
mod calico;
mod cilium;
pub mod cleanup;
mod clock;
mod cluster;
pub mod convert;
mod error;
pub mod events;
pub mod finalize;
pub mod finish;
pub mod goldpinger;
pub mod log;
pub mod metrics;
pub mod planning;
pub mod policy;
pub mod prepare;
pub mod probe;
mod state;
mod verify;
mod watch;

pub use cilium::{RESTORE_SCRIPT, restore_helper_name, restore_helper_pod};
pub use clock::SystemClock;
pub use watch::CLUSTER_POD_WATCH_MAX;

use error::port_error;

/// The annotation on a Cilium agent pod naming the `CiliumNodeConfig` the agent resolved at
/// start-up. Written by the emulator; see [`KubeCluster`]'s `NewCni::agent` for what a real
/// cluster offers instead.
pub const AGENT_CONFIG_ANNOTATION: &str = "cnimig.io/resolved-node-config";
/// The Node annotation holding the node's `/etc/cni/net.d` state as JSON
/// ([`CniDirState`](cnimig_core::ports::CniDirState)). Written by the emulator, as its stand-in
/// for reading the directory through a helper pod.
pub const CNI_DIR_ANNOTATION: &str = "cnimig.io/emulated-cni-dir";
/// The label of Cilium agent pods.
pub const CILIUM_AGENT_LABEL: &str = "k8s-app=cilium";
/// The label on helper pods that restore Calico's CNI config.
pub const RESTORE_HELPER_LABEL: &str = "cnimig.io/helper";
/// The field manager of server-side applies and the Events' reporting controller.
pub const FIELD_MANAGER: &str = "cnimig";

/// Where the adapter finds things and how it behaves. [`Default`] fits a standard install.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// Namespace of Cilium's agents, `cilium-config` and the `CiliumNodeConfig` (`kube-system`).
    pub cilium_namespace: String,
    /// Namespace of the run lock Lease and the restore helper pods (`kube-system`).
    pub system_namespace: String,
    /// Name of the run lock Lease (`cnimig-migration`).
    pub lock_name: String,
    /// Image of the helper pod that restores Calico's CNI config (needs `sh`, `rm`, `mv`).
    pub helper_image: String,
    /// How long to wait for the helper pod to finish.
    pub helper_timeout: Duration,
    /// The service CIDR, when the cluster has no `ServiceCIDR` object named `kubernetes`
    /// (Kubernetes before 1.33).
    pub service_cidr: Option<Ipv4Net>,
    /// The cluster CIDR (kube-controller-manager `--cluster-cidr`), which the API does not show.
    pub cluster_cidr: Option<Ipv4Net>,
    /// The Events' reporting instance (host name, pod name).
    pub instance: Option<String>,
    /// A label selector (`key=value,…`) restricting which Nodes the adapter lists
    /// (`node_names`, `inventory`, `load`, `verify_cluster`): records on other nodes are not
    /// this run's. `None` sees every node.
    pub node_selector: Option<String>,
    /// The largest cluster (pods counted by the plan's inventory) whose pods a run reads from one
    /// cluster-wide watch; a larger one gets a watch per node in flight
    /// (`fieldSelector=spec.nodeName`). One watch costs one request for the whole run, and its
    /// initial state is no larger than the inventory's LIST, but it carries every pod change of
    /// the cluster for the run's length ([`CLUSTER_POD_WATCH_MAX`] pods by default; 0: always
    /// per node).
    pub one_pod_watch_max_pods: usize,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            cilium_namespace: "kube-system".into(),
            system_namespace: "kube-system".into(),
            lock_name: "cnimig-migration".into(),
            helper_image: "busybox:1.36".into(),
            helper_timeout: Duration::from_secs(120),
            service_cidr: None,
            cluster_cidr: None,
            instance: None,
            node_selector: None,
            one_pod_watch_max_pods: CLUSTER_POD_WATCH_MAX,
        }
    }
}

/// cnimig's ports on a Kubernetes API server. Cheap to clone (shares its clients and caches).
#[derive(Clone)]
pub struct KubeCluster {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    evict_client: Client,
    opts: KubeOptions,
    cilium_cidrs: RwLock<Option<Vec<Ipv4Net>>>,
    /// The CNI-dir annotation seen by the last `node_view` of each node, and when.
    cni_seen: std::sync::Mutex<
        std::collections::HashMap<NodeName, (tokio::time::Instant, Option<String>)>,
    >,
    clock: SystemClock,
    /// Watch-fed caches, on while this adapter holds the run lock ([`watch`]).
    caches: watch::Caches,
    /// The Lease's `renewTime` as the latest `acquire_lock` found it, before writing its own.
    lock_renewed_before: std::sync::Mutex<Option<cnimig_core::model::Time>>,
    /// The run lock's Lease as our last write of it returned it (a renewal sends it back
    /// without reading it first).
    lease: std::sync::Mutex<Option<k8s_openapi::api::coordination::v1::Lease>>,
}

/// How long `cni_dir` may answer from the annotation the last `node_view` read (the orchestrator
/// reads a node's view, agent and CNI dir in a row; this saves one GET per look).
const CNI_SEEN_TTL: Duration = Duration::from_secs(1);

impl std::fmt::Debug for KubeCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCluster")
            .field("opts", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

/// A client whose writes are logged by [`log::LogWritesLayer`].
///
/// # Errors
/// When the config cannot make a client (bad TLS material, URL).
pub fn logged_client(config: Config) -> Result<Client, kube::Error> {
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&log::LogWritesLayer)
        .build())
}

impl KubeCluster {
    /// An adapter for the cluster `config` points at. Builds two clients: one as configured,
    /// one with kube's default retry off for evictions.
    ///
    /// # Errors
    /// [`PortError::Invalid`] when the config cannot make a client (bad TLS material, URL).
    pub fn new(config: Config, opts: KubeOptions) -> Result<Self, PortError> {
        let bad = |e: kube::Error| PortError::Invalid {
            what: "build a Kubernetes client".into(),
            detail: e.to_string(),
        };
        let client = logged_client(config.clone()).map_err(bad)?;
        let mut no_retry = config;
        no_retry.default_retry = false;
        let evict_client = logged_client(no_retry).map_err(bad)?;
        Ok(KubeCluster {
            inner: Arc::new(Inner {
                client,
                evict_client,
                opts,
                cilium_cidrs: RwLock::new(None),
                cni_seen: std::sync::Mutex::default(),
                clock: SystemClock,
                caches: watch::Caches::default(),
                lock_renewed_before: std::sync::Mutex::new(None),
                lease: std::sync::Mutex::new(None),
            }),
        })
    }

    /// An adapter from the environment (`KUBECONFIG`, `~/.kube/config`, or in-cluster).
    ///
    /// # Errors
    /// [`PortError::Invalid`] when no usable configuration is found.
    pub async fn infer(opts: KubeOptions) -> Result<Self, PortError> {
        let config = Config::infer().await.map_err(|e| PortError::Invalid {
            what: "find a Kubernetes configuration".into(),
            detail: e.to_string(),
        })?;
        Self::new(config, opts)
    }

    /// The client for ordinary calls (kube's default retry as configured).
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The options.
    #[must_use]
    pub fn options(&self) -> &KubeOptions {
        &self.inner.opts
    }

    /// ListParams for node lists, with [`KubeOptions::node_selector`].
    fn node_list_params(&self) -> ListParams {
        match &self.inner.opts.node_selector {
            Some(sel) => ListParams::default().labels(sel),
            None => ListParams::default(),
        }
    }

    fn nodes(&self) -> Api<core::Node> {
        Api::all(self.inner.client.clone())
    }

    /// The node: from the node watch while the adapter holds the run lock ([`watch`]), else
    /// (or when the watch does not hold it) one GET.
    ///
    /// # RBAC
    /// `get nodes`; `list`, `watch nodes` while holding the run lock.
    async fn node(&self, node: &NodeName) -> Result<core::Node, PortError> {
        if let Some(n) = self.cached_node(node).await? {
            return Ok(n);
        }
        self.nodes()
            .get(node.as_str())
            .await
            .map_err(|e| port_error("get", format!("node {node}"), e))
    }

    /// The node from the node watch, `None` when there is no answer there (inactive, not
    /// synced, or the node is not in the watched set).
    async fn cached_node(&self, node: &NodeName) -> Result<Option<core::Node>, PortError> {
        self.inner
            .caches
            .node(
                &self.inner.client,
                self.inner.opts.node_selector.as_deref(),
                node,
            )
            .await
    }

    /// Every node of the node watch (the selector's), `None` when inactive or not synced.
    async fn cached_nodes(&self) -> Result<Option<Vec<core::Node>>, PortError> {
        self.inner
            .caches
            .nodes(&self.inner.client, self.inner.opts.node_selector.as_deref())
            .await
    }

    /// Pods bound to `node`: from the node's pod watch while the adapter holds the run lock
    /// ([`watch`]), else one LIST with `fieldSelector=spec.nodeName=<node>`.
    ///
    /// # RBAC
    /// `list pods` (all namespaces); `watch pods` while holding the run lock.
    async fn pods_on(&self, node: &NodeName) -> Result<Vec<core::Pod>, PortError> {
        if let Some(p) = self.inner.caches.pods_on(&self.inner.client, node).await? {
            return Ok(p);
        }
        let pods: Api<core::Pod> = Api::all(self.inner.client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
        pods.list(&lp)
            .await
            .map(|l| l.items)
            .map_err(|e| port_error("list", format!("pods on node {node}"), e))
    }

    /// Cilium's cluster-pool CIDRs from `cilium-config` (`cluster-pool-ipv4-cidr`), cached once
    /// found (FACTS: the pod CIDR never changes during or after the migration). Empty when Cilium
    /// is not installed yet (not cached then).
    ///
    /// # RBAC
    /// `get configmaps` in the Cilium namespace.
    async fn cilium_cidrs(&self) -> Result<Vec<Ipv4Net>, PortError> {
        if let Some(c) = self.inner.cilium_cidrs.read().await.as_ref() {
            return Ok(c.clone());
        }
        let cms: Api<core::ConfigMap> =
            Api::namespaced(self.inner.client.clone(), &self.inner.opts.cilium_namespace);
        let cm = cms
            .get_opt("cilium-config")
            .await
            .map_err(|e| port_error("get", "configmap cilium-config", e))?;
        let cidrs = cm
            .and_then(|cm| cm.data)
            .and_then(|d| {
                d.get("cluster-pool-ipv4-cidr")
                    .map(|v| convert::cilium_cidrs(v))
            })
            .unwrap_or_default();
        if !cidrs.is_empty() {
            *self.inner.cilium_cidrs.write().await = Some(cidrs.clone());
        }
        Ok(cidrs)
    }

    /// Model pods from API pods.
    fn model_pods(pods: &[core::Pod], cidrs: &[Ipv4Net]) -> Vec<Pod> {
        pods.iter().filter_map(|p| convert::pod(p, cidrs)).collect()
    }
}

/// True when `ip` lies in one of `cidrs`.
fn in_cidrs(ip: Ipv4Addr, cidrs: &[Ipv4Net]) -> bool {
    cidrs.iter().any(|c| c.contains(&ip))
}
