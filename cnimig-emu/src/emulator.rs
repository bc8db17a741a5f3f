//! The emulator proper: kubelets and Calico and Cilium agents for a set of emulated nodes, driven
//! by watches of the real API (pods, nodes) and a tick loop that acts on what they show.
//!
//! What it does, per emulated node:
//! - registers the Node (Ready, an InternalIP, allocatable resources, the CNI-dir annotation at
//!   Calico) and renews its `kube-node-lease` Lease so the node lifecycle controller keeps it
//!   Ready;
//! - creates its `CiliumNode` with `spec.ipam.podCIDRs` from Cilium's cluster pool (as the
//!   operator would) once `cilium-config` exists;
//! - starts pods bound to it after a delay: hostNetwork pods get the node's address, others an
//!   address from Cilium's block of the node when the node's CNI dir has `05-cilium.conflist`
//!   (then also a `CiliumEndpoint` owned by the pod), else from Calico's per-node block;
//! - Cilium agent pods (`k8s-app=cilium`): on start (only then) resolve the `CiliumNodeConfig`s
//!   ([`crate::cni::resolve`]), write the winner to the pod annotation
//!   [`AGENT_CONFIG_ANNOTATION`], become Ready after a delay and then apply
//!   [`crate::cni::cni_after_agent_ready`] to the node's CNI dir;
//! - `calico-node` pods (`k8s-app=calico-node`): on start, autodetect the node's address from
//!   their `IP_AUTODETECTION_METHOD` and write `projectcalico.org/IPv4Address`
//!   ([`crate::calico_node`]);
//! - restore helper pods (label `cnimig.io/helper=restore-cni`): reset the CNI dir to Calico and
//!   finish Succeeded;
//! - clean-up helper pods (label `cnimig.io/helper=flush-calico`): drop Calico's conflist and
//!   backup from the CNI dir, mark the node flushed with [`FLUSHED_ANNOTATION`] (the helper pod's
//!   name and UID), finish Succeeded;
//! - Cilium agents re-read `cilium-config` every time one starts (as a restarted agent does), so
//!   a `helm upgrade` between two restarts takes effect on the second;
//! - finishes deleting terminating pods after a short grace (a DELETE with grace 0, keyed by UID).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use cnimig_core::model::LabelSelector;
use cnimig_core::ports::CniDirState;
use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, Preconditions,
};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cni::{self, Allocator, NodeConfig, Resolved};

/// Pod annotation: the `CiliumNodeConfig` the agent resolved (cnimig-kube's
/// `AGENT_CONFIG_ANNOTATION`).
pub const AGENT_CONFIG_ANNOTATION: &str = "cnimig.io/resolved-node-config";
/// Node annotation: the node's `/etc/cni/net.d` as JSON (cnimig-kube's `CNI_DIR_ANNOTATION`).
pub const CNI_DIR_ANNOTATION: &str = "cnimig.io/emulated-cni-dir";
/// Pod label of restore helpers (cnimig-kube's `RESTORE_HELPER_LABEL`).
pub const HELPER_LABEL: &str = "cnimig.io/helper";
/// Node annotation: the clean-up helper that flushed the node's Calico leftovers
/// (`<pod name>/<pod UID>`).
pub const FLUSHED_ANNOTATION: &str = "cnimig.io/emulated-calico-flushed";
/// Field manager of the emulator's writes.
pub const MANAGER: &str = "cnimig-emu";

/// What to emulate.
#[derive(Debug, Clone)]
pub struct EmuConfig {
    /// Node names, in order (the index picks the node's address and blocks).
    pub nodes: Vec<String>,
    /// Labels every emulated node gets (plus `kubernetes.io/hostname`).
    pub node_labels: BTreeMap<String, String>,
    /// Extra labels per node (roles, zones).
    pub extra_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Namespace of `cilium-config`, the agents and the `CiliumNodeConfig`s.
    pub cilium_namespace: String,
    /// Calico's pool; node `i` allocates from its `i`-th `/calico_block` block.
    pub calico_pool: Ipv4Net,
    /// Calico's per-node block size.
    pub calico_block: u8,
    /// Delay from a pod being bound to it running.
    pub start_delay: Duration,
    /// Delay from an agent running to it being Ready.
    pub agent_ready_delay: Duration,
    /// How long a terminating pod takes to go (capped; pods' own grace periods are longer).
    pub kill_delay: Duration,
    /// Tick of the act loop.
    pub tick: Duration,
    /// Fault: agents on these nodes that resolved a node config never become Ready (as when
    /// the new config breaks the agent); agents without a node config are unaffected.
    pub stuck_agents: std::collections::BTreeSet<String>,
}

impl EmuConfig {
    /// `count` nodes named `<prefix>-NN`, defaults for everything else.
    #[must_use]
    pub fn new(prefix: &str, count: usize) -> Self {
        EmuConfig {
            nodes: (0..count).map(|i| format!("{prefix}-{i:02}")).collect(),
            node_labels: BTreeMap::new(),
            extra_labels: BTreeMap::new(),
            cilium_namespace: "kube-system".into(),
            calico_pool: Ipv4Net::new(Ipv4Addr::new(10, 42, 0, 0), 16).unwrap_or_default(),
            calico_block: 24,
            start_delay: Duration::from_millis(300),
            agent_ready_delay: Duration::from_millis(500),
            kill_delay: Duration::from_millis(300),
            tick: Duration::from_millis(100),
            stuck_agents: std::collections::BTreeSet::new(),
        }
    }
}

/// A running emulator; stops when [`EmuHandle::stop`] is called or it is dropped.
#[derive(Debug)]
pub struct EmuHandle {
    tasks: Vec<JoinHandle<()>>,
}

impl EmuHandle {
    /// Stops every task.
    pub fn stop(self) {}
}

impl Drop for EmuHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Seen bound and pending, since.
    Seen(Instant),
    /// An agent running but not Ready yet, since.
    AgentStarting(Instant),
    /// Running (and Ready), or finished: nothing more to do until deleted.
    Running,
    /// Deletion seen, since.
    Terminating(Instant),
    /// Deleted by us.
    Gone,
}

struct State {
    index: HashMap<String, usize>,
    calico: HashMap<String, Allocator>,
    cilium: HashMap<String, Allocator>,
    cilium_pool: Option<(Ipv4Net, u8)>,
    global: BTreeMap<String, String>,
    progress: HashMap<String, Progress>,
    resolved: HashMap<String, Resolved>,
    cilium_nodes_done: bool,
    /// Nodes with a Cilium agent running (so a `cilium_host` interface), this tick.
    cilium_hosts: std::collections::HashSet<String>,
    last_heartbeat: Option<Instant>,
}

/// Starts the emulator: registers the nodes, then watches and acts until stopped.
///
/// # Errors
/// When the nodes cannot be registered.
pub async fn start(client: Client, cfg: EmuConfig) -> Result<EmuHandle> {
    let emu = Arc::new(Emu { client, cfg });
    emu.register_nodes().await?;
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (nodes, node_writer) = reflector::store::<Node>();
    let pod_stream = reflector(
        pod_writer,
        watcher(
            Api::<Pod>::all(emu.client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|_| async {});
    let node_stream = reflector(
        node_writer,
        watcher(
            Api::<Node>::all(emu.client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|_| async {});
    let mut tasks = vec![tokio::spawn(pod_stream), tokio::spawn(node_stream)];
    let runner = emu.clone();
    tasks.push(tokio::spawn(async move {
        let _ = pods.wait_until_ready().await;
        let _ = nodes.wait_until_ready().await;
        let mut state = State {
            index: runner
                .cfg
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i))
                .collect(),
            calico: HashMap::new(),
            cilium: HashMap::new(),
            cilium_pool: None,
            global: BTreeMap::new(),
            progress: HashMap::new(),
            resolved: HashMap::new(),
            cilium_nodes_done: false,
            cilium_hosts: std::collections::HashSet::new(),
            last_heartbeat: None,
        };
        for (i, n) in runner.cfg.nodes.iter().enumerate() {
            if let Some(b) = cni::node_block(runner.cfg.calico_pool, runner.cfg.calico_block, i) {
                state.calico.insert(n.clone(), Allocator::new(b));
            }
        }
        loop {
            if let Err(e) = runner.tick(&mut state, &pods, &nodes).await {
                tracing::warn!("emulator tick: {e:#}");
            }
            tokio::time::sleep(runner.cfg.tick).await;
        }
    }));
    Ok(EmuHandle { tasks })
}

struct Emu {
    client: Client,
    cfg: EmuConfig,
}

fn node_ip(i: usize) -> String {
    format!("172.31.{}.{}", i / 250, i % 250 + 2)
}

fn cnc_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cilium.io", version, "CiliumNodeConfig"),
        "ciliumnodeconfigs",
    )
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl Emu {
    async fn register_nodes(&self) -> Result<()> {
        let api: Api<Node> = Api::all(self.client.clone());
        for (i, name) in self.cfg.nodes.iter().enumerate() {
            let mut labels = self.cfg.node_labels.clone();
            labels.insert("kubernetes.io/hostname".into(), name.clone());
            labels.insert("kubernetes.io/os".into(), "linux".into());
            if let Some(extra) = self.cfg.extra_labels.get(name) {
                labels.extend(extra.clone());
            }
            let cni = serde_json::to_string(&CniDirState::CALICO)?;
            let node = json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": labels,
                             "annotations": {CNI_DIR_ANNOTATION: cni}},
            });
            api.patch(
                name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&node),
            )
            .await
            .with_context(|| format!("register node {name}"))?;
            self.node_status(name, i).await?;
        }
        self.heartbeat().await
    }

    async fn node_status(&self, name: &str, i: usize) -> Result<()> {
        let api: Api<Node> = Api::all(self.client.clone());
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let status = json!({"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "emulated by cnimig-emu",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "addresses": [{"type": "InternalIP", "address": node_ip(i)},
                          {"type": "Hostname", "address": name}],
            "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "nodeInfo": {"kubeletVersion": "v1.34.4", "containerRuntimeVersion": "emulated://1",
                         "architecture": "amd64", "operatingSystem": "linux",
                         "kernelVersion": "", "osImage": "cnimig-emu", "machineID": "",
                         "systemUUID": "", "bootID": "", "kubeProxyVersion": ""},
        }});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .with_context(|| format!("status of node {name}"))?;
        Ok(())
    }

    /// Renews every node's Lease in `kube-node-lease` (what kubelets do every 10 s).
    async fn heartbeat(&self) -> Result<()> {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("coordination.k8s.io", "v1", "Lease"),
            "leases",
        );
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), "kube-node-lease", &ar);
        let now = k8s_openapi::jiff::Timestamp::now();
        let micro = now.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
        for name in &self.cfg.nodes {
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro},
            });
            api.patch(
                name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&lease),
            )
            .await
            .with_context(|| format!("lease of node {name}"))?;
        }
        Ok(())
    }

    async fn tick(
        &self,
        st: &mut State,
        pods: &reflector::Store<Pod>,
        nodes: &reflector::Store<Node>,
    ) -> Result<()> {
        if st
            .last_heartbeat
            .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
        {
            st.last_heartbeat = Some(Instant::now());
            self.heartbeat().await?;
        }
        if st.cilium_pool.is_none() {
            self.read_cilium_config(st).await?;
        }
        if !st.cilium_nodes_done && st.cilium_pool.is_some() {
            self.create_cilium_nodes(st).await?;
            st.cilium_nodes_done = true;
        }
        let node_objs: HashMap<String, Arc<Node>> = nodes
            .state()
            .into_iter()
            .filter(|n| st.index.contains_key(&n.name_any()))
            .map(|n| (n.name_any(), n))
            .collect();
        st.cilium_hosts = pods
            .state()
            .iter()
            .filter(|p| {
                p.labels().get("k8s-app").map(String::as_str) == Some("cilium")
                    && p.metadata.deletion_timestamp.is_none()
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
            .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
            .collect();
        let now = Instant::now();
        for pod in pods.state() {
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            if !st.index.contains_key(&node) {
                continue;
            }
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            if let Err(e) = self
                .handle_pod(st, &pod, &uid, &node, node_objs.get(&node), now)
                .await
            {
                tracing::warn!(pod = %pod.name_any(), "emulator: {e:#}");
            }
        }
        // Forget pods that are gone from the store.
        let live: std::collections::HashSet<String> = pods
            .state()
            .iter()
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        st.progress.retain(|uid, _| live.contains(uid));
        st.resolved.retain(|uid, _| live.contains(uid));
        Ok(())
    }

    async fn read_cilium_config(&self, st: &mut State) -> Result<()> {
        let Some(data) = cilium_config(&self.client, &self.cfg.cilium_namespace).await? else {
            return Ok(());
        };
        let pool = cni::cilium_pool(&data).first().copied();
        let mask = data
            .get("cluster-pool-ipv4-mask-size")
            .and_then(|m| m.parse().ok())
            .unwrap_or(24);
        st.global = data;
        st.cilium_pool = pool.map(|p| (p, mask));
        if let Some((pool, mask)) = st.cilium_pool {
            for (i, n) in self.cfg.nodes.iter().enumerate() {
                if let Some(b) = cni::node_block(pool, mask, i) {
                    st.cilium.insert(n.clone(), Allocator::new(b));
                }
            }
        }
        Ok(())
    }

    /// Re-reads `cilium-config`'s keys (not the pool: addresses already handed out stay).
    async fn refresh_global(&self, st: &mut State) -> Result<()> {
        if let Some(data) = cilium_config(&self.client, &self.cfg.cilium_namespace).await? {
            st.global = data;
        }
        Ok(())
    }

    /// `CiliumNode/<node>` with `spec.ipam.podCIDRs`, as the operator allocates them.
    async fn create_cilium_nodes(&self, st: &State) -> Result<()> {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("cilium.io", "v2", "CiliumNode"),
            "ciliumnodes",
        );
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
        let Some((pool, mask)) = st.cilium_pool else {
            return Ok(());
        };
        for (i, n) in self.cfg.nodes.iter().enumerate() {
            let Some(block) = cni::node_block(pool, mask, i) else {
                continue;
            };
            let obj = json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNode",
                             "metadata": {"name": n},
                             "spec": {"ipam": {"podCIDRs": [block.to_string()]}}});
            api.patch(n, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&obj))
                .await?;
        }
        Ok(())
    }

    async fn node_configs(&self) -> Result<Vec<NodeConfig>> {
        for version in ["v2", "v2alpha1"] {
            let api: Api<DynamicObject> = Api::namespaced_with(
                self.client.clone(),
                &self.cfg.cilium_namespace,
                &cnc_resource(version),
            );
            let Ok(list) = api.list(&ListParams::default()).await else {
                continue;
            };
            return Ok(list
                .items
                .into_iter()
                .map(|o| NodeConfig {
                    name: o.name_any(),
                    selector: serde_json::from_value::<LabelSelector>(
                        o.data["spec"]["nodeSelector"].clone(),
                    )
                    .unwrap_or_default(),
                    defaults: serde_json::from_value(o.data["spec"]["defaults"].clone())
                        .unwrap_or_default(),
                })
                .collect());
        }
        Ok(Vec::new())
    }

    fn cni_dir(node: Option<&Arc<Node>>) -> CniDirState {
        node.and_then(|n| n.metadata.annotations.as_ref())
            .and_then(|a| a.get(CNI_DIR_ANNOTATION))
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or(CniDirState::CALICO)
    }

    async fn set_cni_dir(&self, node: &str, state: CniDirState) -> Result<()> {
        let api: Api<Node> = Api::all(self.client.clone());
        let v = serde_json::to_string(&state)?;
        api.patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {CNI_DIR_ANNOTATION: v}}})),
        )
        .await?;
        Ok(())
    }

    async fn set_status(&self, pod: &Pod, status: serde_json::Value) -> Result<()> {
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        api.patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn handle_pod(
        &self,
        st: &mut State,
        pod: &Pod,
        uid: &str,
        node: &str,
        node_obj: Option<&Arc<Node>>,
        now: Instant,
    ) -> Result<()> {
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        let progress = st.progress.get(uid).copied();
        if pod.metadata.deletion_timestamp.is_some() {
            match progress {
                Some(Progress::Gone) => {}
                Some(Progress::Terminating(t)) if now.duration_since(t) >= self.cfg.kill_delay => {
                    let api: Api<Pod> =
                        Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
                    let dp = DeleteParams {
                        grace_period_seconds: Some(0),
                        preconditions: Some(Preconditions {
                            uid: Some(uid.to_string()),
                            resource_version: None,
                        }),
                        ..DeleteParams::default()
                    };
                    match api.delete(&pod.name_any(), &dp).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                        Err(e) => return Err(e.into()),
                    }
                    st.progress.insert(uid.to_string(), Progress::Gone);
                }
                Some(Progress::Terminating(_)) => {}
                _ => {
                    st.progress
                        .insert(uid.to_string(), Progress::Terminating(now));
                }
            }
            return Ok(());
        }
        if phase == "Succeeded" || phase == "Failed" {
            return Ok(());
        }
        let labels = pod.labels();
        let is_agent = labels.get("k8s-app").map(String::as_str) == Some("cilium");
        match progress {
            None if phase == "Running" && (is_ready(pod) || !is_agent) => {
                // Already running (an earlier emulator, or a test): leave it.
                st.progress.insert(uid.to_string(), Progress::Running);
            }
            None => {
                st.progress.insert(uid.to_string(), Progress::Seen(now));
            }
            Some(Progress::Seen(t)) if now.duration_since(t) >= self.cfg.start_delay => {
                let i = st.index.get(node).copied().unwrap_or(0);
                let spec = pod.spec.clone().unwrap_or_default();
                let host_ip = node_ip(i);
                if labels.get(HELPER_LABEL).map(String::as_str) == Some("restore-cni") {
                    // The helper's script: Calico's conflist back, Cilium's gone.
                    self.set_cni_dir(node, CniDirState::CALICO).await?;
                    self.set_status(pod, json!({"phase": "Succeeded", "hostIP": host_ip, "podIP": host_ip,
                        "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}]}))
                        .await?;
                    st.progress.insert(uid.to_string(), Progress::Running);
                } else if labels.get(HELPER_LABEL).map(String::as_str) == Some("flush-calico") {
                    // The flush program: Calico's CNI files gone, chains/routes/links (not
                    // emulated) marked by the annotation.
                    let mut dir = Self::cni_dir(node_obj);
                    dir.calico_conflist = false;
                    dir.calico_backup = false;
                    self.set_cni_dir(node, dir).await?;
                    let api: Api<Node> = Api::all(self.client.clone());
                    api.patch(
                        node,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"annotations": {
                        FLUSHED_ANNOTATION: format!("{}/{uid}", pod.name_any())}}})),
                    )
                    .await?;
                    self.set_status(pod, json!({"phase": "Succeeded", "hostIP": host_ip, "podIP": host_ip,
                        "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}]}))
                        .await?;
                    st.progress.insert(uid.to_string(), Progress::Running);
                } else if is_agent {
                    // A starting agent reads the current cilium-config.
                    self.refresh_global(st).await?;
                    let node_labels = node_obj.map(|n| n.labels().clone()).unwrap_or_default();
                    let resolved = cni::resolve(&self.node_configs().await?, &node_labels);
                    let api: Api<Pod> =
                        Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
                    api.patch(&pod.name_any(), &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"annotations": {AGENT_CONFIG_ANNOTATION: resolved.name.clone().unwrap_or_default()}}})))
                        .await?;
                    self.set_status(pod, json!({"phase": "Running", "hostIP": host_ip, "podIP": host_ip,
                        "podIPs": [{"ip": host_ip}], "startTime": k8s_openapi::jiff::Timestamp::now().to_string(),
                        "conditions": [{"type": "Ready", "status": "False"}]}))
                        .await?;
                    st.resolved.insert(uid.to_string(), resolved);
                    st.progress
                        .insert(uid.to_string(), Progress::AgentStarting(now));
                } else {
                    let host = spec.host_network.unwrap_or(false);
                    let ip = if host {
                        host_ip.clone()
                    } else if Self::cni_dir(node_obj).cilium_conflist {
                        let Some(a) = st.cilium.get_mut(node) else {
                            return Ok(()); // no Cilium pool yet: the sandbox waits
                        };
                        let ip = a.next_ip().to_string();
                        self.create_endpoint(pod, uid, &ip).await?;
                        ip
                    } else {
                        let Some(a) = st.calico.get_mut(node) else {
                            return Ok(());
                        };
                        a.next_ip().to_string()
                    };
                    if labels.get("k8s-app").map(String::as_str) == Some("calico-node") {
                        self.calico_node_started(st, &spec, node, i).await?;
                    }
                    let ts = k8s_openapi::jiff::Timestamp::now().to_string();
                    self.set_status(pod, json!({"phase": "Running", "hostIP": host_ip, "podIP": ip,
                        "podIPs": [{"ip": ip}], "startTime": ts,
                        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": ts},
                                       {"type": "ContainersReady", "status": "True", "lastTransitionTime": ts},
                                       {"type": "PodScheduled", "status": "True", "lastTransitionTime": ts}]}))
                        .await?;
                    st.progress.insert(uid.to_string(), Progress::Running);
                }
            }
            Some(Progress::AgentStarting(t))
                if now.duration_since(t) >= self.cfg.agent_ready_delay =>
            {
                let resolved = st.resolved.get(uid).cloned().unwrap_or_default();
                if resolved.name.is_some() && self.cfg.stuck_agents.contains(node) {
                    return Ok(()); // injected fault: never Ready
                }
                let before = Self::cni_dir(node_obj);
                let after = cni::cni_after_agent_ready(&st.global, &resolved, before);
                if after != before {
                    self.set_cni_dir(node, after).await?;
                }
                let ts = k8s_openapi::jiff::Timestamp::now().to_string();
                self.set_status(pod, json!({"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": ts}]}))
                    .await?;
                st.progress.insert(uid.to_string(), Progress::Running);
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// A `calico-node` pod starts: it autodetects its address from its container's
    /// `IP_AUTODETECTION_METHOD` ([`crate::calico_node::autodetected_address`]) and writes it to
    /// the Node's `projectcalico.org/IPv4Address`.
    async fn calico_node_started(
        &self,
        st: &State,
        spec: &k8s_openapi::api::core::v1::PodSpec,
        node: &str,
        i: usize,
    ) -> Result<()> {
        let method = spec
            .containers
            .iter()
            .find(|c| c.name == "calico-node")
            .and_then(|c| c.env.as_ref())
            .and_then(|e| e.iter().find(|v| v.name == "IP_AUTODETECTION_METHOD"))
            .and_then(|v| v.value.clone());
        let internal: Ipv4Addr = node_ip(i).parse()?;
        let cilium_host = st
            .cilium_hosts
            .contains(node)
            .then(|| st.cilium.get(node))
            .flatten()
            .map(|a| Ipv4Addr::from(u32::from(a.block().network()).saturating_add(1)));
        let addr = crate::calico_node::autodetected_address(
            method.as_deref(),
            (internal, 16),
            cilium_host,
        );
        let api: Api<Node> = Api::all(self.client.clone());
        api.patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                crate::calico_node::IPV4_ADDRESS_ANNOTATION: addr}}})),
        )
        .await
        .with_context(|| format!("calico-node address of node {node}"))?;
        Ok(())
    }

    /// The pod's `CiliumEndpoint`, owned by the pod (garbage-collected with it, as Cilium's are).
    async fn create_endpoint(&self, pod: &Pod, uid: &str, ip: &str) -> Result<()> {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("cilium.io", "v2", "CiliumEndpoint"),
            "ciliumendpoints",
        );
        let ns = pod.namespace().unwrap_or_default();
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &ns, &ar);
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
            "metadata": {"name": pod.name_any(), "namespace": ns,
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": pod.name_any(),
                                              "uid": uid, "blockOwnerDeletion": false}]},
            "status": {"networking": {"addressing": [{"ipv4": ip}], "node": pod.spec.as_ref().and_then(|s| s.node_name.clone())}},
        }))?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => Ok(()),
            // A StatefulSet pod reuses its name: replace the old pod's endpoint.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let _ = api.delete(&pod.name_any(), &DeleteParams::default()).await;
                api.create(&PostParams::default(), &obj).await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The data of `cilium-config` in `namespace` (`None` when there is no such ConfigMap): what the
/// emulated agents, Goldpinger and the probe responder read (its pool through
/// [`cni::cilium_pool`]).
///
/// # Errors
/// The API read failed.
pub async fn cilium_config(
    client: &Client,
    namespace: &str,
) -> Result<Option<BTreeMap<String, String>>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    Ok(api
        .get_opt("cilium-config")
        .await?
        .map(|c| c.data.unwrap_or_default()))
}
