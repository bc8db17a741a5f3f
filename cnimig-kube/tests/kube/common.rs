//! Shared helpers: the control plane, temporary namespaces, emulated-by-hand nodes and pods.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cnimig_kube::{KubeCluster, KubeOptions, SystemClock};
use futures::FutureExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::KubeConfigOptions;
use kube::{Client, Config};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

/// The control plane, as admin and as cnimig's ServiceAccount.
pub struct Env {
    /// Admin client (system:masters).
    pub admin: Client,
    /// cnimig's ServiceAccount config (bearer token, `deploy/rbac.yaml`).
    pub sa_config: Config,
}

impl Env {
    /// The adapter under test, as the ServiceAccount.
    pub fn cluster(&self, opts: KubeOptions) -> KubeCluster {
        KubeCluster::new(self.sa_config.clone(), opts).expect("adapter from the SA config")
    }
}

static SETUP: OnceCell<()> = OnceCell::const_new();

/// The test control plane, or `None` (test skipped, with a message) when it is not set up.
/// Panics instead when `CNIMIG_REQUIRE_TESTENV=1`.
pub async fn env() -> Option<Env> {
    let present = std::env::var_os("CNIMIG_TESTENV_APISERVER").is_some()
        && std::env::var_os("KUBECONFIG").is_some();
    if !present {
        assert!(
            std::env::var("CNIMIG_REQUIRE_TESTENV").as_deref() != Ok("1"),
            "CNIMIG_REQUIRE_TESTENV=1 but no test control plane: run scripts/testenv/up.sh and \
             `. /tmp/cnimig-testenv/env` (or scripts/test-kube.sh)"
        );
        // Straight to fd 2: libtest captures `eprintln!` of passing tests.
        use std::io::Write;
        let test = std::thread::current().name().unwrap_or("test").to_string();
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: no test control plane (KUBECONFIG and CNIMIG_TESTENV_APISERVER \
             unset); run scripts/test-kube.sh"
        );
        return None;
    }
    let admin_config = Config::from_kubeconfig(&KubeConfigOptions::default())
        .await
        .expect("read KUBECONFIG");
    let admin = Client::try_from(admin_config.clone()).expect("admin client");
    SETUP
        .get_or_init(|| async {
            cnimig_emu::setup::install_crds(&admin)
                .await
                .expect("install deploy/crds");
            cnimig_emu::setup::apply_yaml(&admin, cnimig_emu::setup::RBAC)
                .await
                .expect("apply deploy/rbac.yaml");
        })
        .await;
    let sa_config =
        cnimig_emu::setup::service_account_config(&admin, &admin_config, "kube-system", "cnimig")
            .await
            .expect("token for kube-system/cnimig");
    Some(Env { admin, sa_config })
}

/// Skips the test (returns) when there is no control plane.
#[macro_export]
macro_rules! env_or_skip {
    () => {
        match $crate::common::env().await {
            Some(e) => e,
            None => return,
        }
    };
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `prefix-<hex>`.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemClock::unix_now().0 % 0xff_ffff;
    format!("{prefix}-{t:06x}{:02x}{n:x}", std::process::id() % 256)
}

/// Runs `f` in a fresh namespace, then deletes the namespace (and its pods at once), even when
/// `f` panics.
pub async fn with_temp_ns<F, Fut>(client: Client, prefix: &str, f: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let name = unique(prefix);
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace"),
    )
    .await
    .expect("create namespace");
    let result = std::panic::AssertUnwindSafe(f(name.clone()))
        .catch_unwind()
        .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &name);
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    let _ = pods.delete_collection(&now, &ListParams::default()).await;
    let _ = nss.delete(&name, &DeleteParams::default()).await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Creates a Ready node with an InternalIP.
pub async fn create_node(client: &Client, name: &str, labels: BTreeMap<String, String>) {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
                .expect("node"),
        )
        .await
        .expect("create node");
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "conditions": [{"type": "Ready", "status": "True", "reason": "Test",
                                "lastHeartbeatTime": null}],
                "addresses": [{"type": "InternalIP", "address": "192.0.2.10"}],
                "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
                "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            }})),
        )
        .await
        .expect("node status");
}

/// Deletes a node (best effort).
pub async fn delete_node(client: &Client, name: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let _ = nodes.delete(name, &DeleteParams::default()).await;
}

/// Creates a pod bound to `node` (no scheduler) and returns its UID.
pub async fn create_pod(client: &Client, ns: &str, name: &str, node: &str, extra: Value) -> String {
    let mut pod = json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]},
    });
    merge(&mut pod, extra);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let p = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod).expect("pod"),
        )
        .await
        .expect("create pod");
    p.metadata.uid.expect("uid")
}

/// Marks a pod Running and Ready with `ip` through the status subresource (what a kubelet does).
pub async fn mark_running(client: &Client, ns: &str, name: &str, ip: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }})),
    )
    .await
    .expect("pod status");
}

/// JSON merge (objects merged recursively, everything else replaced).
pub fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

/// Polls `check` every 200 ms until it is true; panics naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Labels from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

/// Options for a test: Cilium's objects and helper pods in the test's namespace, a Lease of its
/// own.
pub fn opts(ns: &str) -> KubeOptions {
    KubeOptions {
        cilium_namespace: ns.to_string(),
        system_namespace: ns.to_string(),
        lock_name: format!("cnimig-lock-{ns}"),
        helper_timeout: Duration::from_secs(30),
        ..KubeOptions::default()
    }
}

/// Creates `cilium-config` in `ns` with the given data.
pub async fn cilium_config(client: &Client, ns: &str, data: Value) {
    cnimig_emu::setup::apply(
        client,
        &json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "cilium-config", "namespace": ns}, "data": data}),
    )
    .await
    .expect("cilium-config");
}

/// This machine's IPv4 address on its default route: an endpoint the API server's service proxy
/// accepts (it refuses loopback and link-local destinations). Found with an unconnected UDP
/// socket's `connect`, which only picks a route and sends nothing.
pub fn routable_ipv4() -> std::net::Ipv4Addr {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
    sock.connect("192.0.2.254:9")
        .or_else(|_| sock.connect("10.255.255.254:9"))
        .expect(
            "this machine has no route for a non-loopback address (no default route): the \
             service-proxy test needs an address the API server's proxy accepts",
        );
    match sock.local_addr().expect("local address").ip() {
        std::net::IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_link_local() => ip,
        other => panic!(
            "the default route's source address {other} is not one the API server's service \
             proxy accepts (loopback or link-local)"
        ),
    }
}

/// Cilium's live config for `cfg` (migration phase) as `cilium-config` in `ns`, and an emulator
/// config for `n` nodes `<ns>-n-NN` labelled `cnimig.io/e2e=<ns>` with Cilium's objects in `ns`,
/// for the test to adjust before `cnimig_emu::start`. Returns both.
pub async fn emulated_cluster(
    admin: &Client,
    ns: &str,
    cfg: &cnimig_core::config::MigrationConfig,
    n: usize,
) -> (cnimig_emu::EmuConfig, BTreeMap<String, String>) {
    let live = cnimig_core::cilium::rendered_config(
        cfg,
        cnimig_core::cilium::ValueInputs::default(),
        cnimig_core::cilium::CiliumPhase::Migration,
    );
    cilium_config(
        admin,
        ns,
        serde_json::to_value(&live).expect("config as JSON"),
    )
    .await;
    let mut ecfg = cnimig_emu::EmuConfig::new(&format!("{ns}-n"), n);
    ecfg.cilium_namespace = ns.to_string();
    ecfg.node_labels = BTreeMap::from([("cnimig.io/e2e".to_string(), ns.to_string())]);
    (ecfg, live)
}

/// Plans with `orch` and runs the plan to its end (failing the test after `timeout`).
pub async fn plan_and_run(
    orch: &cnimig_core::orchestrator::Orchestrator,
    timeout: Duration,
) -> cnimig_core::orchestrator::RunReport {
    let (_, plan) = orch.plan().await.unwrap();
    tokio::time::timeout(timeout, orch.run(&plan, &cnimig_core::events::Discard))
        .await
        .expect("the run ends")
        .unwrap()
}

/// The one node a run with `RollbackAndStop` rolled back: asserts the run stopped, exactly one
/// node is RolledBack and none is Done.
pub fn the_rolled_back_node(
    report: &cnimig_core::orchestrator::RunReport,
) -> &cnimig_core::orchestrator::NodeOutcome {
    use cnimig_core::machine::Phase;
    assert!(
        report.stopped.is_some(),
        "RollbackAndStop stops the run: {report:?}"
    );
    let failed: Vec<_> = report
        .nodes
        .iter()
        .filter(|n| n.phase == Phase::RolledBack)
        .collect();
    assert_eq!(failed.len(), 1, "{report:#?}");
    assert_eq!(report.count(Phase::Done), 0, "{report:#?}");
    failed[0]
}

/// A ServiceAccount `probe-<ns>` in `ns` bound to ClusterRole `cnimig` (`deploy/rbac.yaml`) and
/// to ClusterRole `role` (set its rules with [`set_role_rules`]), and the adapter acting as it.
#[allow(
    dead_code,
    reason = "used by the policy and finalize binaries, which include this file"
)]
pub async fn probe_account(admin: &Client, ns: &str, role: &str) -> KubeCluster {
    let sa = format!("probe-{ns}");
    cnimig_emu::setup::apply(
        admin,
        &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}}),
    )
    .await
    .unwrap();
    for (name, target) in [(format!("{role}-base"), "cnimig"), (role.to_string(), role)] {
        cnimig_emu::setup::apply(admin, &json!({"apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding", "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": target},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]}))
        .await
        .unwrap();
    }
    let admin_config = Config::from_kubeconfig(&KubeConfigOptions::default())
        .await
        .unwrap();
    let sa_config = cnimig_emu::setup::service_account_config(admin, &admin_config, ns, &sa)
        .await
        .unwrap();
    KubeCluster::new(sa_config, opts(ns)).unwrap()
}

/// Sets ClusterRole `role`'s rules.
#[allow(
    dead_code,
    reason = "used by the policy and finalize binaries, which include this file"
)]
pub async fn set_role_rules(admin: &Client, role: &str, rules: Vec<Value>) {
    cnimig_emu::setup::apply(
        admin,
        &json!({"apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole", "metadata": {"name": role}, "rules": rules}),
    )
    .await
    .unwrap();
}

/// Removes what [`probe_account`] and [`set_role_rules`] made cluster-wide (the ServiceAccount
/// goes with its namespace).
#[allow(
    dead_code,
    reason = "used by the policy and finalize binaries, which include this file"
)]
pub async fn drop_probe_account(admin: &Client, role: &str) {
    let crb: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> = Api::all(admin.clone());
    let cr: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(admin.clone());
    let _ = crb
        .delete(&format!("{role}-base"), &DeleteParams::default())
        .await;
    let _ = crb.delete(role, &DeleteParams::default()).await;
    let _ = cr.delete(role, &DeleteParams::default()).await;
}
