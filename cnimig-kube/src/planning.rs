//! Planning a migration of a real cluster, read-only: connect, snapshot, preflight, the Helm
//! values and `CiliumNodeConfig` the run needs, the live Cilium config checked against migration
//! mode, the node order, and the list of writes a run would make, as one [`KubePlan`] that
//! prints readably (`Display`) and serialises to JSON.
//!
//! [`probe_writes`] then sends the first write of each kind a run makes with server-side
//! `dryRun=All`, so RBAC and admission problems show before anything is changed. A dry-run
//! request is authorised and admitted like the real one but never persisted.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use cnimig_core::config::MigrationConfig;
//! use cnimig_kube::{KubeCluster, KubeOptions, planning};
//! let config = kube::Config::infer().await?;
//! let cluster = planning::connect(&config, KubeOptions::default()).await?;
//! let cfg = MigrationConfig::new("10.245.0.0/16".parse()?);
//! let plan = planning::plan(&cluster, config.cluster_url.to_string().as_str(), &cfg).await?;
//! println!("{plan}");
//! for probe in planning::probe_writes(&config, cluster.options(), &plan).await {
//!     println!("{probe}");
//! }
//! # Ok(()) }
//! ```

use std::fmt;

use cnimig_core::cilium::{CiliumPhase, ConfigMismatch, NodeConfigApi, check_live_config};
use cnimig_core::config::MigrationConfig;
use cnimig_core::machine::STATE_ANNOTATION;
use cnimig_core::model::{ClusterSnapshot, OwnerKind};
use cnimig_core::orchestrator::{Orchestrator, Ports, RunError, RunOptions};
use cnimig_core::plan::Plan;
use cnimig_core::ports::NewCni;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::policy::v1::Eviction;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::{Client, Config};
use serde::Serialize;
use serde_json::json;

use crate::prepare::PreparePlan;
use crate::{CILIUM_AGENT_LABEL, FIELD_MANAGER, KubeCluster, KubeOptions};

/// The preflight check a planned autodetection change resolves (the run applies the change,
/// with consent, before its own preflight).
const CALICO_AUTODETECTION_CHECK: &str = "calico-autodetection";

/// Why planning failed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The API server could not be reached or refused the credentials.
    #[error(
        "could not connect to {server}: {detail}; check --kubeconfig/--context (or the in-cluster ServiceAccount)"
    )]
    Connect {
        /// The server URL.
        server: String,
        /// The cause.
        detail: String,
    },
    /// Reading the cluster failed (after the orchestrator's retries).
    #[error("could not read the cluster: {0}")]
    Read(#[from] RunError),
}

/// Counts from the snapshot, for a person to check the plan looked at the right cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSummary {
    /// Nodes the adapter sees (after [`KubeOptions::node_selector`]).
    pub nodes: usize,
    /// Of which Ready.
    pub ready_nodes: usize,
    /// Of which already cordoned (they stay cordoned after the run).
    pub cordoned_nodes: usize,
    /// Pods on those nodes.
    pub pods: usize,
    /// PodDisruptionBudgets.
    pub pdbs: usize,
    /// Calico's IP pools (CIDRs).
    pub calico_pools: Vec<String>,
    /// The service CIDR.
    pub service_cidr: String,
}

impl SnapshotSummary {
    fn of(s: &ClusterSnapshot) -> Self {
        SnapshotSummary {
            nodes: s.nodes.len(),
            ready_nodes: s.nodes.iter().filter(|n| n.ready).count(),
            cordoned_nodes: s.nodes.iter().filter(|n| n.unschedulable).count(),
            pods: s.pods.len(),
            pdbs: s.pdbs.len(),
            calico_pools: s
                .calico
                .ip_pools
                .iter()
                .map(|p| p.cidr.to_string())
                .collect(),
            service_cidr: s.service_cidr.to_string(),
        }
    }
}

/// One kind of write a run makes: what, to which object, which fields, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedWrite {
    /// Position in the run (1 = first).
    pub order: usize,
    /// When in the run it happens.
    pub when: String,
    /// The HTTP verb and API (`PATCH nodes`, `POST pods/eviction`, …).
    pub verb: String,
    /// The object(s).
    pub object: String,
    /// The fields written and their values.
    pub fields: String,
}

impl fmt::Display for PlannedWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>2}. [{}] {} {}: {}",
            self.order, self.when, self.verb, self.object, self.fields
        )
    }
}

/// Everything a person needs to decide whether to run the migration.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubePlan {
    /// The API server.
    pub server: String,
    /// Counts from the snapshot.
    pub snapshot: SnapshotSummary,
    /// The core's plan: preflight, node order, skipped nodes, Helm values, node config.
    pub plan: Plan,
    /// The `CiliumNodeConfig` API version the cluster serves (`None`: Cilium's CRDs missing).
    pub node_config_api: Option<String>,
    /// The `CiliumNodeConfig` as YAML, at the served version (v2 when none is served).
    pub node_config_yaml: String,
    /// Helm values for installing Cilium in migration mode, as YAML.
    pub migration_values_yaml: String,
    /// Helm values for the final phase, as YAML.
    pub final_values_yaml: String,
    /// Where the live `cilium-config` differs from migration mode (empty: ready to run).
    pub live_config_mismatches: Vec<ConfigMismatch>,
    /// Why the live config could not be read, if it could not (Cilium not installed yet).
    pub live_config_error: Option<String>,
    /// The writes a run makes, in order.
    pub writes: Vec<PlannedWrite>,
    /// What the run changes before the first node (with consent), and the actions for the
    /// user outside the cluster.
    pub prepare: PreparePlan,
}

impl KubePlan {
    /// True when a run would start: preflight passed and Cilium's live config is in migration
    /// mode.
    #[must_use]
    pub fn ready(&self) -> bool {
        self.preflight_failures().next().is_none()
            && self.live_config_mismatches.is_empty()
            && self.live_config_error.is_none()
    }

    /// Preflight failures the run does not fix itself: a failed `calico-autodetection` check is
    /// left out when the plan's prepare step changes the method ([`PreparePlan::fix`]).
    fn preflight_failures(&self) -> impl Iterator<Item = &cnimig_core::preflight::Check> {
        let fixed = self.prepare.fix.is_some();
        self.plan
            .preflight
            .failures()
            .filter(move |c| !(fixed && c.id == CALICO_AUTODETECTION_CHECK))
    }

    /// Uses Calico autodetection `interface=<pattern>` instead of the node's InternalIP in
    /// the prepare step.
    ///
    /// # Errors
    /// The pattern is not a regex or could select a Cilium interface; the plan is unchanged.
    pub fn set_interface_pattern(
        &mut self,
        pattern: &str,
    ) -> Result<(), cnimig_core::prepare::PrepareError> {
        let facts = cnimig_core::model::CalicoFacts {
            install: self.prepare.install,
            autodetection: self.prepare.current.clone(),
            ..cnimig_core::model::CalicoFacts::default()
        };
        self.prepare.fix = cnimig_core::prepare::autodetection_change(&facts, Some(pattern))?;
        Ok(())
    }

    /// Each reason the run would refuse to start, one line each with its fix.
    #[must_use]
    pub fn blockers(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .preflight_failures()
            .map(|c| format!("[{}] {}", c.id, c.message))
            .collect();
        out.extend(
            self.live_config_mismatches
                .iter()
                .map(|m| format!("[cilium-live-config] {m}")),
        );
        if let Some(e) = &self.live_config_error {
            out.push(format!(
                "[cilium-live-config] {e}; install Cilium with the migration values above first"
            ));
        }
        out
    }
}

fn yaml_block(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    for line in text.lines() {
        writeln!(f, "    {line}")?;
    }
    Ok(())
}

impl fmt::Display for KubePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.snapshot;
        writeln!(f, "== Cluster {}", self.server)?;
        writeln!(
            f,
            "  {} nodes ({} Ready, {} cordoned), {} pods, {} PodDisruptionBudgets; Calico pools {}; services {}",
            s.nodes,
            s.ready_nodes,
            s.cordoned_nodes,
            s.pods,
            s.pdbs,
            if s.calico_pools.is_empty() {
                "none".to_string()
            } else {
                s.calico_pools.join(", ")
            },
            s.service_cidr
        )?;
        writeln!(f, "== Preflight")?;
        for c in &self.plan.preflight.checks {
            writeln!(f, "  {c}")?;
        }
        writeln!(f, "== Cilium's live config (cilium-config)")?;
        match (
            &self.live_config_error,
            self.live_config_mismatches.is_empty(),
        ) {
            (Some(e), _) => writeln!(f, "  not readable: {e}")?,
            (None, true) => writeln!(f, "  in migration mode")?,
            (None, false) => {
                for m in &self.live_config_mismatches {
                    writeln!(f, "  - {m}")?;
                }
            }
        }
        writeln!(f, "== Helm values: install Cilium in migration mode")?;
        yaml_block(f, &self.migration_values_yaml)?;
        writeln!(f, "== Helm values: final (after every node is Done)")?;
        yaml_block(f, &self.final_values_yaml)?;
        writeln!(
            f,
            "== CiliumNodeConfig ({})",
            self.node_config_api
                .as_deref()
                .unwrap_or("CRD not served: install Cilium first")
        )?;
        yaml_block(f, &self.node_config_yaml)?;
        writeln!(f, "== Node order ({} nodes)", self.plan.order.len())?;
        for (i, n) in self.plan.order.iter().enumerate() {
            writeln!(
                f,
                "  {:>3}. {}{}{}",
                i + 1,
                n.name,
                n.zone
                    .as_deref()
                    .map(|z| format!(" (zone {z})"))
                    .unwrap_or_default(),
                if n.control_plane {
                    " [control plane]"
                } else {
                    ""
                }
            )?;
        }
        for sk in &self.plan.skipped {
            writeln!(f, "  skipped: {}: {}", sk.node, sk.reason)?;
        }
        writeln!(
            f,
            "== Prepare: cnimig changes, with --yes, before the first node"
        )?;
        for l in self.prepare.change_lines() {
            writeln!(f, "  {l}")?;
        }
        writeln!(
            f,
            "== Actions for you, outside the cluster (a run asks you to confirm them)"
        )?;
        for a in &self.prepare.user_actions {
            writeln!(f, "  - {a}")?;
        }
        writeln!(f, "== Writes a run makes, in order")?;
        for w in &self.writes {
            writeln!(f, "  {w}")?;
        }
        Ok(())
    }
}

/// Connects to the cluster `config` points at: builds the adapter and checks that the API
/// server answers (`GET /version`), so a wrong address or credentials fail here, clearly.
///
/// # Errors
/// [`PlanError::Connect`] naming the server and the cause.
pub async fn connect(config: &Config, opts: KubeOptions) -> Result<KubeCluster, PlanError> {
    let server = config.cluster_url.to_string();
    let cluster = KubeCluster::new(config.clone(), opts).map_err(|e| PlanError::Connect {
        server: server.clone(),
        detail: e.to_string(),
    })?;
    cluster
        .client()
        .apiserver_version()
        .await
        .map_err(|e| PlanError::Connect {
            server,
            detail: e.to_string(),
        })?;
    Ok(cluster)
}

/// The `CiliumNodeConfig` version the cluster serves (discovery of `cilium.io`), if any.
async fn served_node_config_api(client: &Client) -> Option<NodeConfigApi> {
    let group = kube::discovery::group(client, "cilium.io").await.ok()?;
    let served: Vec<String> = group
        .versions()
        .filter(|v| {
            group
                .versioned_resources(v)
                .iter()
                .any(|(r, _)| r.plural == "ciliumnodeconfigs")
        })
        .map(str::to_string)
        .collect();
    NodeConfigApi::from_served(served.iter().map(String::as_str))
}

/// Reads the cluster and builds the plan. Changes nothing. `server` is shown in the plan
/// (`Config::cluster_url`).
///
/// # RBAC
/// What [`Orchestrator::plan`] needs (`list nodes, pods, poddisruptionbudgets`, Calico's
/// objects), `get configmaps` (`cilium-config`), and discovery of `cilium.io`.
///
/// # Errors
/// [`PlanError::Read`] when the cluster cannot be read (after retries).
pub async fn plan(
    cluster: &KubeCluster,
    server: &str,
    cfg: &MigrationConfig,
) -> Result<KubePlan, PlanError> {
    let orch = Orchestrator::new(
        Ports::from_one(cluster.clone()),
        cfg.clone(),
        RunOptions::default(),
    );
    let (snapshot, plan) = orch.plan().await?;
    let api = served_node_config_api(cluster.client()).await;
    let (live_config_mismatches, live_config_error) = match cluster.live_config().await {
        Ok(live) => (
            check_live_config(&live, cfg, plan.inputs, CiliumPhase::Migration),
            None,
        ),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let writes = planned_writes(cluster.options(), cfg, &plan, &snapshot);
    // Without an interface pattern the change cannot fail (see `set_interface_pattern`).
    let prepare = PreparePlan::new(&snapshot.calico, cfg, None).unwrap_or_else(|_| PreparePlan {
        install: snapshot.calico.install,
        current: snapshot.calico.autodetection.clone(),
        fix: None,
        user_actions: Vec::new(),
    });
    Ok(KubePlan {
        prepare,
        server: server.to_string(),
        snapshot: SnapshotSummary::of(&snapshot),
        node_config_api: api.map(|a| a.api_version().to_string()),
        node_config_yaml: plan.node_config.to_yaml(api.unwrap_or(NodeConfigApi::V2)),
        migration_values_yaml: yaml(&plan.migration_values),
        final_values_yaml: yaml(&plan.final_values),
        live_config_mismatches,
        live_config_error,
        writes,
        plan,
    })
}

fn yaml(v: &serde_json::Value) -> String {
    // JSON is valid YAML; pretty JSON keeps this crate free of a YAML dependency.
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// The writes a run of `plan` makes, in order (see the crate docs' table for the API calls).
#[must_use]
pub fn planned_writes(
    opts: &KubeOptions,
    cfg: &MigrationConfig,
    plan: &Plan,
    snapshot: &ClusterSnapshot,
) -> Vec<PlannedWrite> {
    let nodes = plan.order.len();
    let evictable = plan
        .order
        .iter()
        .map(|n| {
            snapshot
                .pods
                .iter()
                .filter(|p| {
                    p.node.as_ref() == Some(&n.name)
                        && !p.host_network
                        && !p.mirror
                        && p.owner != OwnerKind::DaemonSet
                })
                .count()
        })
        .sum::<usize>();
    let sys = &opts.system_namespace;
    let cil = &opts.cilium_namespace;
    let label = &cfg.migration_label;
    let items: Vec<(String, String, String, String)> = vec![
        (
            "start".into(),
            "CREATE or UPDATE leases".into(),
            format!("{sys}/{}", opts.lock_name),
            "spec.holderIdentity, renewTime, leaseDurationSeconds (renewed every third of its time-to-live, released at the end)".into(),
        ),
        (
            "start".into(),
            "APPLY (server-side, manager cnimig) ciliumnodeconfigs.cilium.io".into(),
            format!("{cil}/{}", plan.node_config.name),
            format!(
                "spec.nodeSelector {label}=…, spec.defaults {}",
                plan.node_config
                    .defaults
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        (
            if nodes == 1 {
                "the node, before every step".to_string()
            } else {
                format!("each of {nodes} nodes, before every step")
            },
            "PATCH nodes (JSON patch with a test op)".into(),
            "the node".into(),
            format!("metadata.annotations[{STATE_ANNOTATION}] = the node's migration record"),
        ),
        (
            "each node: Cordoned".into(),
            "PATCH nodes (merge)".into(),
            "the node".into(),
            "spec.unschedulable = true (skipped for a node already cordoned)".into(),
        ),
        (
            "each node: Drained".into(),
            "POST pods/eviction (UID precondition)".into(),
            format!("{evictable} pods in all, not DaemonSet/mirror/hostNetwork pods"),
            "Eviction; PodDisruptionBudgets honoured, max_in_flight nodes at once (never every schedulable node)".into(),
        ),
        (
            "each node: Labelled".into(),
            "PATCH nodes (merge)".into(),
            "the node".into(),
            format!("metadata.labels[{label}] set"),
        ),
        (
            "each node: AgentRestarted".into(),
            "DELETE pods".into(),
            format!("{cil}: the node's {CILIUM_AGENT_LABEL} pod"),
            "the agent restarts and reads the CiliumNodeConfig".into(),
        ),
        (
            "each node: PodsRestarted".into(),
            "DELETE pods".into(),
            "pods left on the node still on Calico addresses".into(),
            "recreated by their controllers on Cilium (the node still cordoned)".into(),
        ),
        (
            "each node: Uncordoned".into(),
            "PATCH nodes (merge)".into(),
            "the node".into(),
            "spec.unschedulable = false once the node is verified (only if cnimig cordoned it)"
                .into(),
        ),
        (
            "every step".into(),
            "CREATE events.k8s.io/v1 events".into(),
            "default/ (regarding the Node)".into(),
            "reason NodeCordoned, NodeDrained, …, NodeMigrated".into(),
        ),
        (
            "only when a node rolls back".into(),
            "CREATE, then DELETE pods".into(),
            format!("{sys}/ helper pod on the node (image {})", opts.helper_image),
            "privileged, hostPath /etc/cni/net.d: removes 05-cilium.conflist, renames 10-calico.conflist.cilium_bak back; then the label is removed, the agent restarted, the pods recycled".into(),
        ),
    ];
    items
        .into_iter()
        .enumerate()
        .map(|(i, (when, verb, object, fields))| PlannedWrite {
            order: i + 1,
            when,
            verb,
            object,
            fields,
        })
        .collect()
}

/// The result of one dry-run write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    /// Which write (`PATCH nodes/<name>`, …).
    pub write: String,
    /// What happened.
    pub outcome: ProbeOutcome,
}

/// What a dry-run write answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum ProbeOutcome {
    /// Authorised and admitted.
    Allowed,
    /// Refused by the API server: RBAC (403), admission, validation, a budget (429).
    Refused {
        /// HTTP status.
        code: u16,
        /// The server's message.
        message: String,
    },
    /// Not sent, and why (no object of that kind to try it on).
    NotSent {
        /// Why.
        reason: String,
    },
    /// The request did not get an answer (transport error).
    Failed {
        /// The error.
        error: String,
    },
}

impl ProbeOutcome {
    /// True unless the server refused or the request failed.
    #[must_use]
    pub fn ok(&self) -> bool {
        matches!(self, ProbeOutcome::Allowed | ProbeOutcome::NotSent { .. })
    }
}

impl Probe {
    /// True unless the server refused or the request failed.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.outcome.ok()
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            ProbeOutcome::Allowed => write!(f, "  ok       {} (dryRun=All)", self.write),
            ProbeOutcome::Refused { code, message } => {
                write!(
                    f,
                    "  REFUSED  {} (dryRun=All): {code} {message}",
                    self.write
                )
            }
            ProbeOutcome::NotSent { reason } => {
                write!(f, "  not sent {}: {reason}", self.write)
            }
            ProbeOutcome::Failed { error } => write!(f, "  FAILED   {}: {error}", self.write),
        }
    }
}

pub(crate) fn outcome<T>(r: Result<T, kube::Error>) -> ProbeOutcome {
    match r {
        Ok(_) => ProbeOutcome::Allowed,
        Err(kube::Error::Api(s)) => ProbeOutcome::Refused {
            code: s.code,
            message: s.message.clone(),
        },
        Err(e) => ProbeOutcome::Failed {
            error: e.to_string(),
        },
    }
}

/// Sends the plan's Calico autodetection change ([`KubePlan::prepare`]) with server-side
/// `dryRun=All`; `None` when the plan has no change.
///
/// # RBAC
/// `get` (`deploy/rbac.yaml`) and `patch` (`deploy/rbac-verify.yaml`) of `daemonsets` or
/// `installations`.
pub async fn probe_prepare(cluster: &KubeCluster, plan: &KubePlan) -> Option<Probe> {
    let fix = plan.prepare.fix.as_ref()?;
    let write = match &fix.target {
        cnimig_core::prepare::AutodetectChange::ManifestEnv {
            namespace,
            daemon_set,
            ..
        } => format!("PATCH daemonsets {namespace}/{daemon_set} (Calico autodetection)"),
        cnimig_core::prepare::AutodetectChange::OperatorInstallation { name } => {
            format!("PATCH installations {name} (Calico autodetection)")
        }
    };
    let outcome = match cluster.dry_run_autodetection_fix(fix).await {
        Ok(true) => ProbeOutcome::Allowed,
        Ok(false) => ProbeOutcome::NotSent {
            reason: "the method is already set".into(),
        },
        Err(e @ cnimig_core::ports::PortError::Forbidden { .. }) => ProbeOutcome::Refused {
            code: 403,
            message: e.to_string(),
        },
        Err(e) => ProbeOutcome::Failed {
            error: e.to_string(),
        },
    };
    Some(Probe { write, outcome })
}

pub(crate) fn dry_post() -> PostParams {
    PostParams {
        dry_run: true,
        field_manager: Some(FIELD_MANAGER.into()),
    }
}

/// Sends the first write of each kind a run of `plan` makes with server-side `dryRun=All`:
/// the Lease, the `CiliumNodeConfig` apply, the node patches (annotation, cordon, label) on the
/// first planned node, an eviction of its first evictable pod, the deletion of its Cilium agent
/// pod, an Event, and the rollback helper pod. Nothing is persisted. Requests go through a
/// client without kube's default retry (a budget's 429 answers at once).
///
/// # RBAC
/// The same verbs as the run itself (`deploy/rbac.yaml`); a missing one shows as a 403 here.
pub async fn probe_writes(config: &Config, opts: &KubeOptions, plan: &KubePlan) -> Vec<Probe> {
    let mut no_retry = config.clone();
    no_retry.default_retry = false;
    let client = match Client::try_from(no_retry) {
        Ok(c) => c,
        Err(e) => {
            return vec![Probe {
                write: "build a client".into(),
                outcome: ProbeOutcome::Failed {
                    error: e.to_string(),
                },
            }];
        }
    };
    let mut out = Vec::new();
    out.push(probe_lease(&client, opts).await);
    out.push(probe_node_config(&client, opts, plan).await);
    let first = plan.plan.order.first().map(|n| n.name.to_string());
    let Some(node) = first else {
        out.push(Probe {
            write: "node writes".into(),
            outcome: ProbeOutcome::NotSent {
                reason: "no node to migrate".into(),
            },
        });
        return out;
    };
    let nodes: Api<core::Node> = Api::all(client.clone());
    let pp = PatchParams {
        dry_run: true,
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let annotation = json!({"metadata": {"annotations": {STATE_ANNOTATION: "{}"}}});
    out.push(Probe {
        write: format!("PATCH nodes/{node} annotation {STATE_ANNOTATION}"),
        outcome: outcome(nodes.patch(&node, &pp, &Patch::Merge(&annotation)).await),
    });
    out.push(Probe {
        write: format!("PATCH nodes/{node} spec.unschedulable=true"),
        outcome: outcome(
            nodes
                .patch(
                    &node,
                    &pp,
                    &Patch::Merge(json!({"spec": {"unschedulable": true}})),
                )
                .await,
        ),
    });
    let label = &plan.plan.node_config.label;
    out.push(Probe {
        write: format!("PATCH nodes/{node} label {label}"),
        outcome: outcome(
            nodes
                .patch(
                    &node,
                    &pp,
                    &Patch::Merge(json!({"metadata": {"labels": {label.as_str(): "true"}}})),
                )
                .await,
        ),
    });
    out.push(probe_eviction(&client, &node).await);
    out.push(probe_agent_delete(&client, opts, &node).await);
    out.push(probe_event(&client, &node).await);
    out.push(probe_helper(&client, opts, &node).await);
    out
}

pub(crate) async fn probe_lease(client: &Client, opts: &KubeOptions) -> Probe {
    let api: Api<Lease> = Api::namespaced(client.clone(), &opts.system_namespace);
    let what = format!("leases {}/{}", opts.system_namespace, opts.lock_name);
    match api.get_opt(&opts.lock_name).await {
        Ok(Some(lease)) => Probe {
            write: format!("UPDATE {what}"),
            outcome: outcome(api.replace(&opts.lock_name, &dry_post(), &lease).await),
        },
        Ok(None) => {
            let lease = Lease {
                metadata: meta::ObjectMeta {
                    name: Some(opts.lock_name.clone()),
                    ..meta::ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some("cnimig-dry-run".into()),
                    lease_duration_seconds: Some(60),
                    ..LeaseSpec::default()
                }),
            };
            Probe {
                write: format!("CREATE {what}"),
                outcome: outcome(api.create(&dry_post(), &lease).await),
            }
        }
        Err(e) => Probe {
            write: format!("GET {what}"),
            outcome: outcome::<()>(Err(e)),
        },
    }
}

async fn probe_node_config(client: &Client, opts: &KubeOptions, plan: &KubePlan) -> Probe {
    let name = &plan.plan.node_config.name;
    let Some(version) = plan.node_config_api.as_deref() else {
        return Probe {
            write: format!("APPLY ciliumnodeconfigs {}/{name}", opts.cilium_namespace),
            outcome: ProbeOutcome::NotSent {
                reason: "the cluster serves no CiliumNodeConfig CRD: install Cilium first".into(),
            },
        };
    };
    let api_version = if version.ends_with("v2alpha1") {
        NodeConfigApi::V2Alpha1
    } else {
        NodeConfigApi::V2
    };
    let gvk = GroupVersionKind::gvk(
        "cilium.io",
        version.trim_start_matches("cilium.io/"),
        "CiliumNodeConfig",
    );
    let ar = ApiResource::from_gvk_with_plural(&gvk, "ciliumnodeconfigs");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &opts.cilium_namespace, &ar);
    let mut obj = plan.plan.node_config.to_object(api_version);
    obj["metadata"]["namespace"] = json!(opts.cilium_namespace);
    let pp = PatchParams::apply(FIELD_MANAGER).force().dry_run();
    Probe {
        write: format!("APPLY ciliumnodeconfigs {}/{name}", opts.cilium_namespace),
        outcome: outcome(api.patch(name, &pp, &Patch::Apply(&obj)).await),
    }
}

async fn probe_eviction(client: &Client, node: &str) -> Probe {
    let pods: Api<core::Pod> = Api::all(client.clone());
    let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let list = match pods.list(&lp).await {
        Ok(l) => l.items,
        Err(e) => {
            return Probe {
                write: format!("LIST pods on {node}"),
                outcome: outcome::<()>(Err(e)),
            };
        }
    };
    let target = list.iter().find(|p| {
        let spec = p.spec.as_ref();
        let ds = p
            .metadata
            .owner_references
            .as_ref()
            .is_some_and(|o| o.iter().any(|r| r.kind == "DaemonSet"));
        let mirror = p
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
        !ds && !mirror
            && !spec.and_then(|s| s.host_network).unwrap_or(false)
            && p.metadata.deletion_timestamp.is_none()
    });
    let Some(pod) = target else {
        return Probe {
            write: format!("POST pods/eviction on {node}"),
            outcome: ProbeOutcome::NotSent {
                reason: format!("no evictable pod on {node}"),
            },
        };
    };
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<core::Pod> = Api::namespaced(client.clone(), &ns);
    let body = Eviction {
        metadata: meta::ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            ..meta::ObjectMeta::default()
        },
        delete_options: Some(meta::DeleteOptions {
            dry_run: Some(vec!["All".into()]),
            preconditions: Some(meta::Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..meta::DeleteOptions::default()
        }),
    };
    Probe {
        write: format!("POST pods/eviction {ns}/{name}"),
        outcome: outcome(
            api.create_subresource::<_, serde_json::Value>(
                "eviction",
                &name,
                &PostParams::default(),
                &body,
            )
            .await,
        ),
    }
}

async fn probe_agent_delete(client: &Client, opts: &KubeOptions, node: &str) -> Probe {
    let api: Api<core::Pod> = Api::namespaced(client.clone(), &opts.cilium_namespace);
    let lp = ListParams::default()
        .labels(CILIUM_AGENT_LABEL)
        .fields(&format!("spec.nodeName={node}"));
    match api.list(&lp).await {
        Ok(l) => match l.items.first().and_then(|p| p.metadata.name.clone()) {
            Some(name) => Probe {
                write: format!("DELETE pods {}/{name}", opts.cilium_namespace),
                outcome: outcome(
                    api.delete(
                        &name,
                        &DeleteParams {
                            dry_run: true,
                            ..DeleteParams::default()
                        },
                    )
                    .await,
                ),
            },
            None => Probe {
                write: format!("DELETE the Cilium agent pod on {node}"),
                outcome: ProbeOutcome::NotSent {
                    reason: format!(
                        "no {CILIUM_AGENT_LABEL} pod on {node} in {}",
                        opts.cilium_namespace
                    ),
                },
            },
        },
        Err(e) => Probe {
            write: format!("LIST agent pods on {node}"),
            outcome: outcome::<()>(Err(e)),
        },
    }
}

async fn probe_event(client: &Client, node: &str) -> Probe {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "default");
    let now = k8s_openapi::jiff::Timestamp::now();
    let ev = k8s_openapi::api::events::v1::Event {
        metadata: meta::ObjectMeta {
            generate_name: Some(format!("{node}-")),
            ..meta::ObjectMeta::default()
        },
        event_time: Some(meta::MicroTime(now)),
        action: Some("Migrate".into()),
        reason: Some("DryRun".into()),
        note: Some("cnimig dry run".into()),
        type_: Some("Normal".into()),
        reporting_controller: Some(FIELD_MANAGER.into()),
        reporting_instance: Some("dry-run".into()),
        regarding: Some(core::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.to_string()),
            ..core::ObjectReference::default()
        }),
        ..k8s_openapi::api::events::v1::Event::default()
    };
    Probe {
        write: "CREATE events.k8s.io/v1 events default/…".into(),
        outcome: outcome(api.create(&dry_post(), &ev).await),
    }
}

async fn probe_helper(client: &Client, opts: &KubeOptions, node: &str) -> Probe {
    let Ok(name) = cnimig_core::model::NodeName::new(node) else {
        return Probe {
            write: "CREATE the rollback helper pod".into(),
            outcome: ProbeOutcome::NotSent {
                reason: format!("{node:?} is not a valid node name"),
            },
        };
    };
    let value = crate::restore_helper_pod(&name, &opts.system_namespace, &opts.helper_image);
    let pod: core::Pod = match serde_json::from_value(value) {
        Ok(p) => p,
        Err(e) => {
            return Probe {
                write: "CREATE the rollback helper pod".into(),
                outcome: ProbeOutcome::Failed {
                    error: e.to_string(),
                },
            };
        }
    };
    let api: Api<core::Pod> = Api::namespaced(client.clone(), &opts.system_namespace);
    Probe {
        write: format!(
            "CREATE pods {}/{} (rollback helper, only used on a rollback)",
            opts.system_namespace,
            crate::restore_helper_name(&name)
        ),
        outcome: outcome(api.create(&dry_post(), &pod).await),
    }
}
