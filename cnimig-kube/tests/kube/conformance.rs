//! Conformance: the same scenarios, with the same assertions, against the in-memory simulator
//! (`cnimig-sim`) and against the kube adapter + emulator (`cnimig-emu`) on the real control
//! plane, so the simulator cannot drift from Kubernetes unnoticed.
//!
//! A scenario is one `cnimig-sim` [`Scenario`] (YAML). [`SimHarness`] builds it with
//! `SimCluster::new`; [`KubeHarness`] turns it into Kubernetes objects (emulated Nodes,
//! Deployments, StatefulSets, DaemonSets, PodDisruptionBudgets, `cilium-config`, a `cilium`
//! DaemonSet) in a namespace of its own. Both are then driven and observed only through the
//! [`Harness`] trait: the orchestrator's ports (the same calls the engine makes), a clock to wait
//! on (virtual in the simulator, real on the control plane) and a budget watch during a run
//! (the simulator's own `BudgetBroken` checks; a 200 ms poll of the PDBs' status on the control
//! plane). Each test runs the simulator side first (it never skips) and then the control-plane
//! side (skipped without a control plane, like every test here).
//!
//! Differences found and how they are handled are listed in the README section "Conformance
//! suite".

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32};
use std::time::Duration;

use async_trait::async_trait;
use cnimig_core::cilium::{CiliumPhase, ValueInputs, rendered_config};
use cnimig_core::config::{MigrationConfig, NodeScope};
use cnimig_core::machine::Phase;
use cnimig_core::model::{LabelSelector, NodeName, Pod, PodNetwork};
use cnimig_core::orchestrator::{Orchestrator, Ports, RunOptions};
use cnimig_core::ports::{Clock, EvictOutcome};
use cnimig_sim::{Scenario, SimCluster, SimParams, WorkloadKind};
use k8s_openapi::api::core::v1::Node as KNode;
use k8s_openapi::api::core::v1::Pod as KPod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use crate::common::{self, Env, wait_until};

/// The label that puts a node in a scenario's scope (value: the namespace).
const SCOPE_LABEL: &str = "cnimig.io/conformance";

/// What a run ended with, in terms both harnesses can give.
#[derive(Debug)]
struct RunOutcome {
    /// Each node's terminal phase.
    phases: BTreeMap<String, Phase>,
    /// Why the run stopped early, if it did.
    stopped: Option<String>,
    /// Budgets seen broken during the run.
    budget_violations: Vec<String>,
}

/// One side of the conformance suite.
#[async_trait]
trait Harness: Send + Sync {
    /// "sim" or "kube", for messages.
    fn name(&self) -> &'static str;
    /// The ports the orchestrator and the checks use.
    fn ports(&self) -> Ports;
    /// The scenario's nodes, in order.
    fn nodes(&self) -> Vec<NodeName>;
    /// Waits `d` (virtual time in the simulator).
    async fn wait(&self, d: Duration);
    /// Plans and runs the orchestrator over the scenario's nodes with `cfg`.
    async fn run(&self, cfg: &MigrationConfig) -> RunOutcome;
}

/// The namespace every scenario object lives in; also the sim's, so names compare literally.
/// Calico as `crate::calico::calico_objects` installs it on the control plane.
const CALICO: &str = r"
calico:
  pools: [{name: default-ipv4-ippool, cidr: 10.42.0.0/16, encapsulation: VXLAN}]
  autodetection: kubernetes-internal-ip
";

fn scenario(yaml: &str, ns: &str) -> Scenario {
    let text = format!("{}{CALICO}", yaml.replace("{ns}", ns));
    let mut s = Scenario::from_yaml(&text).expect("scenario YAML");
    for n in &mut s.nodes {
        n.labels.insert(SCOPE_LABEL.into(), ns.into());
    }
    s
}

fn config(ns: &str) -> MigrationConfig {
    let mut cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
    cfg.scope = NodeScope::Selector(LabelSelector {
        match_labels: BTreeMap::from([(SCOPE_LABEL.to_string(), ns.to_string())]),
        match_expressions: Vec::new(),
    });
    cfg.max_in_flight = 2;
    cfg.poll_interval = Duration::from_millis(300);
    cfg.drain_timeout = Duration::from_secs(120);
    // The agent's step is timed from the restart request: in the simulator the old agent's
    // termination and the new one's start take up to a minute each.
    cfg.step_timeout = Duration::from_secs(180);
    cfg
}

// ---------------------------------------------------------------------------------------------
// The simulator side.

struct SimHarness {
    sim: SimCluster,
    nodes: Vec<NodeName>,
}

impl SimHarness {
    fn new(scenario: Scenario, cfg: &MigrationConfig) -> SimHarness {
        let sim = SimCluster::new(scenario, SimParams::default(), 7).expect("valid scenario");
        sim.install_cilium(rendered_config(
            cfg,
            ValueInputs::default(),
            CiliumPhase::Migration,
        ))
        .expect("install cilium");
        // Let the agents become Ready, as the control-plane side waits for its pods.
        let limit = sim.now().after(Duration::from_secs(300));
        sim.settle(limit);
        let nodes = sim.node_list();
        SimHarness { sim, nodes }
    }
}

#[async_trait]
impl Harness for SimHarness {
    fn name(&self) -> &'static str {
        "sim"
    }
    fn ports(&self) -> Ports {
        Ports::from_one(self.sim.clone())
    }
    fn nodes(&self) -> Vec<NodeName> {
        self.nodes.clone()
    }
    async fn wait(&self, d: Duration) {
        self.sim.sleep_until(self.sim.now().after(d)).await;
    }
    async fn run(&self, cfg: &MigrationConfig) -> RunOutcome {
        let orch = Orchestrator::new(self.ports(), cfg.clone(), RunOptions::default());
        let (_, plan) = orch.plan().await.expect("plan");
        let fails: Vec<String> = plan
            .preflight
            .failures()
            .map(|c| format!("{}: {}", c.id, c.message))
            .collect();
        assert!(fails.is_empty(), "sim: preflight failed: {fails:#?}");
        self.sim
            .set_scope(plan.order.iter().map(|p| p.name.clone()).collect())
            .unwrap();
        let report = orch
            .run(&plan, &cnimig_core::events::Discard)
            .await
            .expect("run");
        RunOutcome {
            phases: report
                .nodes
                .iter()
                .map(|n| (n.node.as_str().to_string(), n.phase))
                .collect(),
            stopped: report.stopped.clone(),
            budget_violations: self
                .sim
                .violations()
                .iter()
                .map(ToString::to_string)
                .collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The control-plane side.

struct KubeHarness {
    admin: Client,
    ns: String,
    cluster: cnimig_kube::KubeCluster,
    nodes: Vec<NodeName>,
    emu: Option<cnimig_emu::EmuHandle>,
}

fn pod_template(
    labels: &BTreeMap<String, String>,
    ns: &str,
    host_network: bool,
    tolerates_unschedulable: bool,
) -> serde_json::Value {
    let tolerations = if host_network {
        json!([{"operator": "Exists"}])
    } else if tolerates_unschedulable {
        json!([{"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}])
    } else {
        json!([])
    };
    json!({"metadata": {"labels": labels},
           "spec": {"nodeSelector": {SCOPE_LABEL: ns},
                    "hostNetwork": host_network,
                    "terminationGracePeriodSeconds": 5,
                    "tolerations": tolerations,
                    "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}})
}

impl KubeHarness {
    /// Builds the scenario on the control plane and waits until every pod is Running and Ready
    /// and every budget has been observed.
    async fn new(env: &Env, ns: &str, scenario: &Scenario, cfg: &MigrationConfig) -> KubeHarness {
        let admin = env.admin.clone();
        crate::calico::calico_objects(&admin).await;
        let live = rendered_config(cfg, ValueInputs::default(), CiliumPhase::Migration);
        common::cilium_config(&admin, ns, serde_json::to_value(&live).unwrap()).await;

        let names: Vec<String> = scenario.nodes.iter().map(|n| n.name.clone()).collect();
        let mut ecfg = cnimig_emu::EmuConfig::new(&format!("{ns}-n"), names.len());
        ecfg.nodes = names.clone();
        ecfg.cilium_namespace = ns.to_string();
        ecfg.node_labels = BTreeMap::from([(SCOPE_LABEL.to_string(), ns.to_string())]);
        for n in &scenario.nodes {
            let mut l = n.labels.clone();
            if let Some(z) = &n.zone {
                l.insert("topology.kubernetes.io/zone".into(), z.clone());
            }
            ecfg.extra_labels.insert(n.name.clone(), l);
        }
        let emu = cnimig_emu::start(admin.clone(), ecfg).await.unwrap();
        let knodes: Api<KNode> = Api::all(admin.clone());
        for n in scenario.nodes.iter().filter(|n| n.cordoned) {
            wait_until(
                &format!("node {} registered", n.name),
                Duration::from_secs(60),
                || {
                    let knodes = knodes.clone();
                    let name = n.name.clone();
                    async move { knodes.get(&name).await.is_ok() }
                },
            )
            .await;
            knodes
                .patch(
                    &n.name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"unschedulable": true}})),
                )
                .await
                .unwrap();
        }

        let mut expected = 0usize;
        let mut objs = Vec::new();
        let mut budgets = 0usize;
        // Cilium's agent DaemonSet (the simulator's `install_cilium` creates its pods).
        let cilium = BTreeMap::from([("k8s-app".to_string(), "cilium".to_string())]);
        objs.push(json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "cilium", "namespace": ns},
            "spec": {"selector": {"matchLabels": cilium}, "template": pod_template(&cilium, ns, true, false)}}));
        expected += names.len();
        for w in &scenario.workloads {
            assert_eq!(
                w.namespace, ns,
                "scenario workloads live in the test namespace"
            );
            let labels = w.pod_labels();
            let template = pod_template(&labels, ns, w.host_network, w.tolerates_unschedulable);
            let replicas = w.replica_count();
            let obj = match w.kind {
                WorkloadKind::Deployment => {
                    expected += replicas as usize;
                    json!({"apiVersion": "apps/v1", "kind": "Deployment",
                        "metadata": {"name": w.name, "namespace": ns},
                        "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": template}})
                }
                WorkloadKind::StatefulSet => {
                    expected += replicas as usize;
                    json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
                        "metadata": {"name": w.name, "namespace": ns},
                        "spec": {"replicas": replicas, "serviceName": w.name, "podManagementPolicy": "Parallel",
                                 "selector": {"matchLabels": labels}, "template": template}})
                }
                WorkloadKind::DaemonSet => {
                    expected += names.len();
                    json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
                        "metadata": {"name": w.name, "namespace": ns},
                        "spec": {"selector": {"matchLabels": labels}, "template": template}})
                }
                other => panic!("the conformance suite does not build {other:?} workloads"),
            };
            objs.push(obj);
            if let Some(p) = &w.pdb {
                budgets += 1;
                objs.push(
                    json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                    "metadata": {"name": w.name, "namespace": ns},
                    "spec": {"minAvailable": p.min_available, "maxUnavailable": p.max_unavailable,
                             "selector": {"matchLabels": labels}}}),
                );
            }
        }
        for p in &scenario.pdbs {
            budgets += 1;
            objs.push(
                json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": {"name": p.name, "namespace": ns},
                "spec": {"minAvailable": p.min_available, "maxUnavailable": p.max_unavailable,
                         "selector": {"matchLabels": p.selector}}}),
            );
        }
        for mut o in objs {
            // `null` amounts are left out (a PDB takes exactly one).
            if let Some(spec) = o.get_mut("spec").and_then(|s| s.as_object_mut()) {
                spec.retain(|_, v| !v.is_null());
            }
            cnimig_emu::setup::apply(&admin, &o).await.unwrap();
        }
        let pods: Api<KPod> = Api::namespaced(admin.clone(), ns);
        wait_until(
            &format!("{expected} pods Running and Ready"),
            Duration::from_secs(180),
            || {
                let pods = pods.clone();
                async move {
                    let Ok(l) = pods.list(&ListParams::default()).await else {
                        return false;
                    };
                    l.items
                        .iter()
                        .filter(|p| kpod_ready(p) && p.metadata.deletion_timestamp.is_none())
                        .count()
                        == expected
                }
            },
        )
        .await;
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), ns);
        // Set-up, not the behaviour under test: the disruption controller observes the
        // budgets once the ReplicaSets' pods exist, which took over 60 s in a full parallel
        // kube suite on the loaded 2-core CI machine.
        wait_until(
            &format!("{budgets} budgets observed"),
            Duration::from_secs(180),
            || {
                let pdbs = pdbs.clone();
                async move {
                    let Ok(l) = pdbs.list(&ListParams::default()).await else {
                        return false;
                    };
                    l.items.len() == budgets
                        && l.items.iter().all(|p| {
                            p.status.as_ref().is_some_and(|s| {
                                s.observed_generation.unwrap_or(0)
                                    >= p.metadata.generation.unwrap_or(0)
                                    && s.expected_pods > 0
                            })
                        })
                }
            },
        )
        .await;

        let mut opts = common::opts(ns);
        opts.node_selector = Some(format!("{SCOPE_LABEL}={ns}"));
        KubeHarness {
            admin,
            ns: ns.to_string(),
            cluster: env.cluster(opts),
            nodes: names
                .iter()
                .map(|n| NodeName::new(n.clone()).unwrap())
                .collect(),
            emu: Some(emu),
        }
    }

    async fn teardown(mut self) {
        if let Some(e) = self.emu.take() {
            e.stop();
        }
        for n in &self.nodes {
            common::delete_node(&self.admin, n.as_str()).await;
        }
    }
}

fn kpod_ready(p: &KPod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[async_trait]
impl Harness for KubeHarness {
    fn name(&self) -> &'static str {
        "kube"
    }
    fn ports(&self) -> Ports {
        Ports::from_one(self.cluster.clone())
    }
    fn nodes(&self) -> Vec<NodeName> {
        self.nodes.clone()
    }
    async fn wait(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }
    async fn run(&self, cfg: &MigrationConfig) -> RunOutcome {
        let orch = Orchestrator::new(
            self.ports(),
            cfg.clone(),
            RunOptions {
                holder: format!("conformance-{}", self.ns),
                ..RunOptions::default()
            },
        );
        let (_, plan) = orch.plan().await.expect("plan");
        let fails: Vec<String> = plan
            .preflight
            .failures()
            .map(|c| format!("{}: {}", c.id, c.message))
            .collect();
        assert!(fails.is_empty(), "kube: preflight failed: {fails:#?}");
        let stop = Arc::new(AtomicBool::new(false));
        let margin = Arc::new(AtomicI32::new(i32::MAX));
        let watcher =
            crate::e2e::watch_budgets(self.admin.clone(), self.ns.clone(), stop.clone(), margin);
        let report = tokio::time::timeout(
            Duration::from_secs(600),
            orch.run(&plan, &cnimig_core::events::Discard),
        )
        .await
        .expect("the run finishes within 10 minutes")
        .expect("run");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        RunOutcome {
            phases: report
                .nodes
                .iter()
                .map(|n| (n.node.as_str().to_string(), n.phase))
                .collect(),
            stopped: report.stopped.clone(),
            budget_violations: watcher.await.unwrap(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Observation and assertions, shared: only through the ports.

/// Every pod on the scenario's nodes (terminating ones included).
async fn pods(h: &dyn Harness) -> Vec<Pod> {
    let cluster = h.ports().cluster;
    let mut out = Vec::new();
    for n in h.nodes() {
        out.extend(cluster.node_view(&n).await.expect("node_view").pods);
    }
    out
}

fn app(p: &Pod) -> &str {
    p.labels.get("app").map_or("", String::as_str)
}

/// Polls `check` (through the harness's clock) until it returns `None`; panics with its last
/// complaint after `limit`.
async fn eventually<F, Fut>(h: &dyn Harness, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<String>>,
{
    let step = Duration::from_millis(500);
    let mut waited = Duration::ZERO;
    loop {
        let Some(why) = check().await else { return };
        assert!(waited < limit, "{}: after {limit:?}: {why}", h.name());
        h.wait(step).await;
        waited += step;
    }
}

/// After a whole migration: every node Done, no budget broken, only the nodes cordoned before
/// the run still cordoned, and every workload back at full strength with its pod-network pods
/// on Cilium.
async fn assert_migrated(h: &dyn Harness, scenario: &Scenario, out: &RunOutcome) {
    let who = h.name();
    assert!(
        out.stopped.is_none(),
        "{who}: run stopped: {:?}",
        out.stopped
    );
    assert_eq!(out.phases.len(), scenario.nodes.len(), "{who}: {out:?}");
    for (n, p) in &out.phases {
        assert_eq!(*p, Phase::Done, "{who}: node {n} ended {p:?}");
    }
    assert!(
        out.budget_violations.is_empty(),
        "{who}: budgets broken: {:?}",
        out.budget_violations
    );
    let cluster = h.ports().cluster;
    for spec in &scenario.nodes {
        let view = cluster
            .node_view(&NodeName::new(spec.name.clone()).unwrap())
            .await
            .unwrap();
        assert_eq!(
            view.node.unschedulable, spec.cordoned,
            "{who}: node {} cordoned after the run: {} (before: {})",
            spec.name, view.node.unschedulable, spec.cordoned
        );
    }
    let want: BTreeMap<String, usize> = scenario
        .workloads
        .iter()
        .map(|w| {
            let n = match w.kind {
                WorkloadKind::DaemonSet => scenario.nodes.len(),
                _ => w.replica_count() as usize,
            };
            (w.name.clone(), n)
        })
        .collect();
    eventually(h, Duration::from_secs(120), || async {
        let pods = pods(h).await;
        for (w, n) in &want {
            let ready = pods
                .iter()
                .filter(|p| app(p) == w && p.ready && !p.terminating)
                .count();
            if ready != *n {
                return Some(format!("workload {w}: {ready} of {n} pods Ready"));
            }
        }
        let off: Vec<String> = pods
            .iter()
            .filter(|p| !p.terminating && !p.host_network && p.network != PodNetwork::Cilium)
            .map(|p| format!("{} ({:?})", p.pod.name, p.network))
            .collect();
        (!off.is_empty()).then(|| format!("pods not on Cilium: {off:?}"))
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The scenarios. Each is a function of the harness, so both sides run the same code.

const PLAIN: &str = r"
nodes:
  - {name: '{ns}-n-00', zone: a}
  - {name: '{ns}-n-01', zone: b}
  - {name: '{ns}-n-02', zone: c}
workloads:
  - {kind: DaemonSet, name: calico-node, namespace: '{ns}', hostNetwork: true, labels: {k8s-app: calico-node}}
  - {kind: Deployment, name: web, namespace: '{ns}', replicas: 4, pdb: {maxUnavailable: 1}}
  - {kind: Deployment, name: api, namespace: '{ns}', replicas: 3, pdb: {minAvailable: 2}}
  - {kind: StatefulSet, name: db, namespace: '{ns}', replicas: 3, pdb: {minAvailable: 2}}
";

async fn plain_migration(h: &dyn Harness, scenario: &Scenario, cfg: &MigrationConfig) {
    let out = h.run(cfg).await;
    assert_migrated(h, scenario, &out).await;
}

const PRE_CORDONED: &str = r"
nodes:
  - {name: '{ns}-n-00'}
  - {name: '{ns}-n-01', cordoned: true}
  - {name: '{ns}-n-02'}
workloads:
  - {kind: DaemonSet, name: calico-node, namespace: '{ns}', hostNetwork: true, labels: {k8s-app: calico-node}}
  - {kind: Deployment, name: web, namespace: '{ns}', replicas: 2, pdb: {maxUnavailable: 1}}
";

async fn pre_cordoned(h: &dyn Harness, scenario: &Scenario, cfg: &MigrationConfig) {
    let cluster = h.ports().cluster;
    let cordoned = NodeName::new(scenario.nodes[1].name.clone()).unwrap();
    assert!(
        cluster
            .node_view(&cordoned)
            .await
            .unwrap()
            .node
            .unschedulable,
        "{}: the scenario's node starts cordoned",
        h.name()
    );
    let out = h.run(cfg).await;
    // assert_migrated checks that exactly the pre-cordoned node is still cordoned.
    assert_migrated(h, scenario, &out).await;
}

const TOLERATING: &str = r"
nodes:
  - {name: '{ns}-n-00'}
workloads:
  - {kind: DaemonSet, name: calico-node, namespace: '{ns}', hostNetwork: true, labels: {k8s-app: calico-node}}
  - {kind: Deployment, name: sticky, namespace: '{ns}', replicas: 2, toleratesUnschedulable: true}
";

/// A Deployment whose pods tolerate the cordon, on a single node: each evicted pod's
/// replacement lands on the cordoned node again. The drain evicts the pods there when the node
/// was cordoned, as `kubectl drain` does, and does not chase the replacements until its timeout
/// (which rolled the node back); they are moved to Cilium after the agent restart.
async fn tolerating(h: &dyn Harness, scenario: &Scenario, cfg: &MigrationConfig) {
    let out = h.run(cfg).await;
    assert_migrated(h, scenario, &out).await;
}

const ZERO_BUDGET: &str = r"
nodes:
  - {name: '{ns}-n-00'}
  - {name: '{ns}-n-01'}
  - {name: '{ns}-n-02'}
workloads:
  - {kind: DaemonSet, name: calico-node, namespace: '{ns}', hostNetwork: true, labels: {k8s-app: calico-node}}
  - {kind: Deployment, name: web, namespace: '{ns}', replicas: 2, pdb: {minAvailable: 1}}
";

/// Drains the nodes of both replicas of a 2-replica Deployment under `minAvailable: 1`: the
/// first eviction is allowed, which leaves the budget at zero disruptions; the second is refused
/// naming the budget, and is refused until the first pod's replacement is Ready on the free node.
async fn zero_budget(h: &dyn Harness, ns: &str) {
    let who = h.name();
    let cluster = h.ports().cluster;
    let budget = format!("{ns}/web");
    let web: Vec<Pod> = pods(h)
        .await
        .into_iter()
        .filter(|p| app(p) == "web")
        .collect();
    assert_eq!(web.len(), 2, "{who}: {web:#?}");
    let busy: Vec<NodeName> = web.iter().filter_map(|p| p.node.clone()).collect();
    for n in &busy {
        cluster.set_unschedulable(n, true).await.unwrap();
    }
    let bv = cluster.budget_view(&busy).await.unwrap();
    assert_eq!(bv.allowed.get(&budget), Some(&1), "{who}: {bv:?}");

    assert_eq!(
        cluster.evict(&web[0].pod).await.unwrap(),
        EvictOutcome::Evicted,
        "{who}"
    );
    let bv = cluster.budget_view(&busy).await.unwrap();
    assert_eq!(
        bv.allowed.get(&budget),
        Some(&0),
        "{who}: zero disruptions after one: {bv:?}"
    );
    assert_eq!(
        cluster.evict(&web[1].pod).await.unwrap(),
        EvictOutcome::BlockedByBudget {
            pdb: budget.clone()
        },
        "{who}: the second eviction is refused naming the budget"
    );
    let mut refusals = 1;
    let step = Duration::from_millis(500);
    let mut waited = Duration::ZERO;
    loop {
        match cluster.evict(&web[1].pod).await.unwrap() {
            EvictOutcome::Evicted => break,
            EvictOutcome::BlockedByBudget { pdb } => {
                assert_eq!(pdb, budget, "{who}");
                refusals += 1;
            }
            other => panic!("{who}: unexpected {other:?}"),
        }
        assert!(
            waited < Duration::from_secs(120),
            "{who}: still refused after {waited:?}"
        );
        h.wait(step).await;
        waited += step;
    }
    // The eviction went through because a replica moved: a Ready replacement on the free node.
    let now = pods(h).await;
    let moved: Vec<&Pod> = now
        .iter()
        .filter(|p| app(p) == "web" && p.ready && !p.terminating)
        .filter(|p| p.node.as_ref().is_some_and(|n| !busy.contains(n)))
        .collect();
    assert!(
        !moved.is_empty(),
        "{who}: no Ready replica moved off {busy:?}: {now:#?}"
    );
    assert!(refusals >= 1, "{who}");
}

const TWO_BUDGETS: &str = r"
nodes:
  - {name: '{ns}-n-00'}
  - {name: '{ns}-n-01'}
workloads:
  - {kind: DaemonSet, name: calico-node, namespace: '{ns}', hostNetwork: true, labels: {k8s-app: calico-node}}
  - {kind: Deployment, name: dual, namespace: '{ns}', replicas: 2}
pdbs:
  - {name: dual-a, namespace: '{ns}', selector: {app: dual}, maxUnavailable: 1}
  - {name: dual-b, namespace: '{ns}', selector: {app: dual}, minAvailable: 1}
";

/// A pod two budgets cover cannot be evicted; the refusal names both budgets, and the pod stays.
async fn two_budgets(h: &dyn Harness, ns: &str) {
    let who = h.name();
    let cluster = h.ports().cluster;
    let dual: Vec<Pod> = pods(h)
        .await
        .into_iter()
        .filter(|p| app(p) == "dual")
        .collect();
    assert_eq!(dual.len(), 2, "{who}: {dual:#?}");
    let node = dual[0].node.clone().unwrap();
    let bv = cluster
        .budget_view(std::slice::from_ref(&node))
        .await
        .unwrap();
    let names: Vec<&str> = bv.per_node[&node].iter().map(|(b, _)| b.as_str()).collect();
    assert_eq!(
        names,
        [format!("{ns}/dual-a"), format!("{ns}/dual-b")],
        "{who}: {bv:?}"
    );
    assert_eq!(
        cluster.evict(&dual[0].pod).await.unwrap(),
        EvictOutcome::MultipleBudgets {
            pdbs: vec![format!("{ns}/dual-a"), format!("{ns}/dual-b")]
        },
        "{who}"
    );
    let after = cluster.node_view(&node).await.unwrap();
    let still = after.pods.iter().find(|p| p.pod.uid == dual[0].pod.uid);
    assert!(
        still.is_some_and(|p| !p.terminating),
        "{who}: the pod was not evicted: {still:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The tests: the simulator first (always), then the control plane (skipped without one).

/// Runs `body` against the simulator and then against the control plane, with the same
/// scenario.
macro_rules! conformance {
    ($yaml:expr, $prefix:expr, |$h:ident, $s:ident, $cfg:ident, $ns:ident| $body:expr) => {{
        let sim_ns = common::unique($prefix);
        {
            let $ns: &str = &sim_ns;
            let $s = scenario($yaml, $ns);
            let $cfg = config($ns);
            let sim = SimHarness::new($s.clone(), &$cfg);
            let $h: &dyn Harness = &sim;
            $body.await;
        }
        let env = crate::env_or_skip!();
        let admin = env.admin.clone();
        common::with_temp_ns(admin, $prefix, |ns| async move {
            let $ns: &str = &ns;
            let $s = scenario($yaml, $ns);
            let $cfg = config($ns);
            let kube = KubeHarness::new(&env, $ns, &$s, &$cfg).await;
            {
                let $h: &dyn Harness = &kube;
                $body.await;
            }
            kube.teardown().await;
        })
        .await;
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_plain_migration() {
    conformance!(PLAIN, "conf-plain", |h, s, cfg, ns| {
        let _ = ns;
        plain_migration(h, &s, &cfg)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_pre_cordoned_node_stays_cordoned() {
    conformance!(PRE_CORDONED, "conf-cordon", |h, s, cfg, ns| {
        let _ = ns;
        pre_cordoned(h, &s, &cfg)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_pods_tolerating_the_cordon_are_not_chased() {
    conformance!(TOLERATING, "conf-tol", |h, s, cfg, ns| {
        let _ = ns;
        tolerating(h, &s, &cfg)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_zero_disruption_budget_blocks_until_a_replica_moves() {
    conformance!(ZERO_BUDGET, "conf-zero", |h, s, cfg, ns| {
        let _ = (&s, &cfg);
        zero_budget(h, ns)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_two_budgets_named_both() {
    conformance!(TWO_BUDGETS, "conf-two", |h, s, cfg, ns| {
        let _ = (&s, &cfg);
        two_budgets(h, ns)
    });
}
