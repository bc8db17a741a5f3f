//! Finalize and clean-up on a real cluster, read-only first: what a run would change (objects,
//! fields, order), whether it may start at all, and every write sent once with server-side
//! `dryRun=All` so RBAC and admission problems show before anything is changed.
//!
//! [`plan_finalize`] and [`plan_cleanup`] only read. [`probe_finalize`] and [`probe_cleanup`]
//! send each planned write with `dryRun=All` (authorised and admitted like the real request,
//! never persisted). The examples `kube_finalize` and `kube_cleanup` print both, and run
//! [`Finalizer`](cnimig_core::finalize::Finalizer) / [`Cleaner`](cnimig_core::cleanup::Cleaner)
//! only with `--yes`.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use cnimig_core::config::MigrationConfig;
//! use cnimig_kube::{finish, planning, KubeOptions};
//! let config = kube::Config::infer().await?;
//! let cluster = planning::connect(&config, KubeOptions::default()).await?;
//! let cfg = MigrationConfig::new("10.245.0.0/16".parse()?);
//! let plan = finish::plan_finalize(&cluster, &cfg).await?;
//! print!("{plan}");
//! if plan.refused.is_empty() {
//!     for p in finish::probe_finalize(&config, &cluster, &plan).await {
//!         println!("{p}");
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::BTreeSet;
use std::fmt;

use cnimig_core::cilium::{CiliumPhase, ValueInputs, check_live_config};
use cnimig_core::cleanup::{CleanupStep, node_flush_actions, removal_order, render_script};
use cnimig_core::config::MigrationConfig;
use cnimig_core::finalize::{
    FINAL_ANNOTATION, FinalRecord, FinalStep, FinalizePort, final_values_yaml, nodes_in_scope_done,
};
use cnimig_core::model::{CalicoInstall, NodeName};
use cnimig_core::ports::{Cluster, NewCni, OldCni, PortError, StateStore};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, Config};
use serde::Serialize;
use serde_json::json;

use crate::allow::allow_rule_targets;
use crate::cleanup::{
    CALICO_CRD_GROUPS, DeleteTarget, calico_object_targets, flush_helper_name, flush_helper_pod,
};
use crate::finalize::FINAL_LEASE_NAME;
use crate::planning::{PlannedWrite, Probe, ProbeOutcome, dry_post, outcome, probe_lease};
use crate::{FIELD_MANAGER, KubeCluster};

/// What finalize would do on this cluster, read without writing.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FinalizePlan {
    /// Why finalize may not start (one line per node in scope that is not Done). Empty: it may.
    pub refused: Vec<String>,
    /// The nodes in scope, in the order their agents restart (workers, then control plane).
    pub nodes: Vec<String>,
    /// The last step a previous finalize run completed (`None`: it never ran).
    pub step: Option<FinalStep>,
    /// Agents a previous run already restarted (they are not restarted again).
    pub restarted: Vec<String>,
    /// Keys of the live `cilium-config` that differ from the final values (finalize waits for
    /// them; apply [`Self::values_yaml`] with `helm upgrade`).
    pub config_mismatches: Vec<String>,
    /// The final Helm values.
    pub values_yaml: String,
    /// Facts the values depend on.
    pub host_port_pods: bool,
    /// The Cilium agent pod on each node in scope (`None`: none found; finalize would stop).
    pub agents: Vec<(String, Option<String>)>,
    /// Nodes that still carry the migration label.
    pub labelled: Vec<String>,
    /// The API of the temporary Calico allow rule (`None`: Calico has no tiers or no API, so
    /// there is none to remove).
    pub allow_rule_api: Option<cnimig_core::allow::CalicoApi>,
    /// The writes, in order.
    pub writes: Vec<PlannedWrite>,
    /// The migration label.
    pub label: String,
    /// Namespace/name of the `CiliumNodeConfig`.
    pub node_config: String,
    /// At most this many agents restart at once.
    pub max_in_flight: u32,
}

/// What clean-up would do on this cluster, read without writing.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CleanupPlan {
    /// Why clean-up may not start (finalize not done, nodes not Done). Empty: it may.
    pub refused: Vec<String>,
    /// How Calico is installed (as stored by a previous run, or as read now).
    pub install: Option<CalicoInstall>,
    /// The step a previous clean-up run reached (`None`: it never ran).
    pub step: Option<CleanupStep>,
    /// Every node (each gets a flush helper).
    pub nodes: Vec<String>,
    /// Nodes a previous run already flushed.
    pub flushed: Vec<String>,
    /// Calico's objects still to delete, in order.
    pub objects: Vec<DeleteTarget>,
    /// Calico's CRDs that exist now (deleted last).
    pub crds: Vec<String>,
    /// The helper's image (the Cilium DaemonSet's).
    pub image: String,
    /// The program every helper runs.
    pub script: String,
    /// The writes, in order.
    pub writes: Vec<PlannedWrite>,
    /// At most this many helpers run at once.
    pub max_in_flight: u32,
}

fn write(
    order: &mut usize,
    when: &str,
    verb: &str,
    object: String,
    fields: String,
) -> PlannedWrite {
    *order += 1;
    PlannedWrite {
        order: *order,
        when: when.into(),
        verb: verb.into(),
        object,
        fields,
    }
}

fn lease_writes(order: &mut usize, k: &KubeCluster, step: &str, what: &str) -> Vec<PlannedWrite> {
    let o = k.options();
    vec![
        write(
            order,
            "start",
            "CREATE or UPDATE",
            format!("leases {}/{}", o.system_namespace, o.lock_name),
            "spec.holderIdentity, spec.leaseDurationSeconds, spec.renewTime (the migration lock, renewed during the run, released at the end)".into(),
        ),
        write(
            order,
            step,
            "CREATE or UPDATE",
            format!("leases {}/{FINAL_LEASE_NAME}", o.system_namespace),
            format!("annotation {FINAL_ANNOTATION} ({what}, replaced at its resourceVersion)"),
        ),
    ]
}

/// Reads what finalize needs and lists its writes. Changes nothing.
///
/// # Errors
/// A read failure (nodes, records, `cilium-config`, agents, the final record).
///
/// # RBAC
/// What `deploy/rbac.yaml` grants for reading, plus `get leases` (`deploy/rbac-finalize.yaml`).
pub async fn plan_finalize(
    k: &KubeCluster,
    cfg: &MigrationConfig,
) -> Result<FinalizePlan, PortError> {
    let inv = k.inventory().await?;
    let inputs = ValueInputs {
        host_port_pods: inv.pods.iter().any(|p| p.host_port && !p.host_network),
    };
    let (mut nodes, refused) = match nodes_in_scope_done(k, k, cfg).await? {
        Ok(n) => (n, Vec::new()),
        Err(bad) => (Vec::new(), bad),
    };
    nodes.sort_by(|a, b| (a.is_control_plane(), &a.name).cmp(&(b.is_control_plane(), &b.name)));
    let rec = k.load_final().await?;
    let live = k.live_config().await?;
    let config_mismatches = check_live_config(&live, cfg, inputs, CiliumPhase::Final)
        .iter()
        .map(ToString::to_string)
        .collect();
    let mut agents = Vec::new();
    for n in &nodes {
        let pods = k.agent_pods(&n.name).await?;
        let name = pods
            .iter()
            .find(|p| p.metadata.deletion_timestamp.is_none())
            .and_then(|p| p.metadata.name.clone());
        agents.push((n.name.to_string(), name));
    }
    let allow_rule_api = k.allow_rule_api().await?.ok();
    let in_scope: BTreeSet<&NodeName> = nodes.iter().map(|n| &n.name).collect();
    let labelled: Vec<String> = inv
        .nodes
        .iter()
        .filter(|n| in_scope.contains(&n.name) && n.labels.contains_key(&cfg.migration_label))
        .map(|n| n.name.to_string())
        .collect();
    let step = rec.as_ref().map(|r| r.step);
    let restarted: BTreeSet<String> = rec
        .as_ref()
        .map(|r| r.restarted.iter().map(ToString::to_string).collect())
        .unwrap_or_default();
    let o = k.options();
    let mut plan = FinalizePlan {
        refused,
        nodes: nodes.iter().map(|n| n.name.to_string()).collect(),
        step,
        restarted: restarted.iter().cloned().collect(),
        config_mismatches,
        values_yaml: final_values_yaml(cfg, inputs),
        host_port_pods: inputs.host_port_pods,
        agents,
        labelled,
        allow_rule_api,
        writes: Vec::new(),
        label: cfg.migration_label.clone(),
        node_config: format!("{}/{}", o.cilium_namespace, cfg.node_config_name),
        max_in_flight: cfg.max_in_flight.max(1),
    };
    if step == Some(FinalStep::Done) || !plan.refused.is_empty() {
        return Ok(plan);
    }
    let mut order = 0;
    let mut writes = lease_writes(
        &mut order,
        k,
        "start, then after every step",
        "finalize's progress",
    );
    let before = |s: FinalStep| step.is_none_or(|st| st < s);
    if before(FinalStep::AgentsRestarted) {
        for (node, pod) in &plan.agents {
            if restarted.contains(node) {
                continue;
            }
            writes.push(write(
                &mut order,
                "once cilium-config holds the final values",
                "DELETE",
                format!(
                    "pods {}/{} (the Cilium agent on {node})",
                    o.cilium_namespace,
                    pod.as_deref().unwrap_or("<none found>")
                ),
                format!(
                    "UID precondition; its DaemonSet recreates it; waited for Ready with 05-cilium.conflist; at most {} at once, PodDisruptionBudget rules as the migration, control plane last",
                    plan.max_in_flight
                ),
            ));
        }
    }
    if before(FinalStep::AllowRuleRemoved)
        && let Some(api) = plan.allow_rule_api
    {
        for t in allow_rule_targets(api) {
            writes.push(write(
                &mut order,
                "after the agents",
                "DELETE",
                t.to_string(),
                "the temporary Calico allow rule (absent is fine)".into(),
            ));
        }
    }
    if before(FinalStep::NodeConfigDeleted) {
        writes.push(write(
            &mut order,
            "after the allow rule",
            "DELETE",
            format!("ciliumnodeconfigs.cilium.io {}", plan.node_config),
            "the per-node config of the migration (absent is fine)".into(),
        ));
    }
    for n in &plan.labelled {
        writes.push(write(
            &mut order,
            "last",
            "PATCH",
            format!("nodes/{n}"),
            format!("metadata.labels.{}: removed", plan.label),
        ));
    }
    plan.writes = writes;
    Ok(plan)
}

impl fmt::Display for FinalizePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "== Finalize")?;
        writeln!(f, "nodes in scope: {}", self.nodes.len())?;
        match self.step {
            None => writeln!(f, "finalize never ran")?,
            Some(s) => writeln!(
                f,
                "a previous finalize run reached {s:?} (it resumes from there)"
            )?,
        }
        if !self.refused.is_empty() {
            writeln!(f, "REFUSED: every node in scope must be Done first:")?;
            for r in &self.refused {
                writeln!(f, "  - {r}")?;
            }
            return Ok(());
        }
        if self.step == Some(FinalStep::Done) {
            return writeln!(f, "finalize already succeeded: nothing to do");
        }
        if self.config_mismatches.is_empty() {
            writeln!(f, "cilium-config holds the final values")?;
        } else {
            writeln!(
                f,
                "cilium-config differs from the final values in {} key(s); finalize waits for them (apply these values with `helm upgrade`):",
                self.config_mismatches.len()
            )?;
            for m in &self.config_mismatches {
                writeln!(f, "  - {m}")?;
            }
            writeln!(f, "final Helm values:")?;
            for l in self.values_yaml.lines() {
                writeln!(f, "  {l}")?;
            }
        }
        writeln!(f, "== Writes, in order")?;
        for w in &self.writes {
            writeln!(f, "{w}")?;
        }
        Ok(())
    }
}

/// Sends every write of `plan` once with `dryRun=All`: the two Leases, each agent pod's
/// deletion, the allow rule's and the `CiliumNodeConfig`'s deletions, each label removal.
/// An object already gone is reported `not sent` (the real run skips it too).
///
/// # RBAC
/// The verbs of the run itself; a missing one shows as a 403 here.
pub async fn probe_finalize(config: &Config, k: &KubeCluster, plan: &FinalizePlan) -> Vec<Probe> {
    let (client, mut out) = match probe_leases(config, k).await {
        Ok(opened) => opened,
        Err(p) => return vec![p],
    };
    let o = k.options();
    let restarted: BTreeSet<&String> = plan.restarted.iter().collect();
    if plan.step.is_none_or(|s| s < FinalStep::AgentsRestarted) {
        let pods: Api<core::Pod> = Api::namespaced(client.clone(), &o.cilium_namespace);
        for (node, pod) in &plan.agents {
            if restarted.contains(node) {
                continue;
            }
            out.push(match pod {
                Some(name) => Probe {
                    write: format!("DELETE pods {}/{name}", o.cilium_namespace),
                    outcome: outcome(pods.delete(name, &dry_delete()).await),
                },
                None => Probe {
                    write: format!("DELETE the Cilium agent pod on {node}"),
                    outcome: ProbeOutcome::Refused {
                        code: 404,
                        message: format!(
                            "no Cilium agent pod on {node} in {}: finalize would stop there; check the cilium DaemonSet",
                            o.cilium_namespace
                        ),
                    },
                },
            });
        }
    }
    if plan.step.is_none_or(|s| s < FinalStep::AllowRuleRemoved)
        && let Some(api) = plan.allow_rule_api
    {
        for t in allow_rule_targets(api) {
            out.push(probe_delete(&client, &t).await);
        }
    }
    if plan.step.is_none_or(|s| s < FinalStep::NodeConfigDeleted) {
        match k.node_config_api().await {
            Ok(v) => {
                let (_, name) = plan
                    .node_config
                    .split_once('/')
                    .unwrap_or(("", &plan.node_config));
                let t = DeleteTarget {
                    group: "cilium.io".into(),
                    version: v.api_version().trim_start_matches("cilium.io/").into(),
                    kind: "CiliumNodeConfig".into(),
                    plural: "ciliumnodeconfigs".into(),
                    namespace: Some(o.cilium_namespace.clone()),
                    name: name.into(),
                };
                out.push(probe_delete(&client, &t).await);
            }
            Err(e) => out.push(Probe {
                write: format!("DELETE ciliumnodeconfigs.cilium.io {}", plan.node_config),
                outcome: ProbeOutcome::NotSent {
                    reason: format!("no CiliumNodeConfig API served ({e})"),
                },
            }),
        }
    }
    let nodes: Api<core::Node> = Api::all(client.clone());
    let pp = PatchParams {
        dry_run: true,
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    for n in &plan.labelled {
        let patch = json!({"metadata": {"labels": {plan.label.as_str(): null}}});
        out.push(Probe {
            write: format!("PATCH nodes/{n} remove label {}", plan.label),
            outcome: outcome(nodes.patch(n, &pp, &Patch::Merge(&patch)).await),
        });
    }
    out
}

/// Reads what clean-up needs and lists its writes. Changes nothing.
///
/// # Errors
/// A read failure (the final record, nodes, records, Calico's install, the Cilium DaemonSet,
/// CRDs).
///
/// # RBAC
/// What `deploy/rbac.yaml` grants for reading, plus `get leases` and `list
/// customresourcedefinitions` (`deploy/rbac-finalize.yaml`).
pub async fn plan_cleanup(
    k: &KubeCluster,
    cfg: &MigrationConfig,
) -> Result<CleanupPlan, PortError> {
    let rec: Option<FinalRecord> = k.load_final().await?;
    let mut refused = Vec::new();
    match rec.as_ref().map(|r| r.step) {
        Some(FinalStep::Done) => {}
        Some(s) => refused.push(format!(
            "finalize has not succeeded (its last step is {s:?}): run kube_finalize first"
        )),
        None => refused
            .push("finalize has not succeeded (it never ran): run kube_finalize first".into()),
    }
    let records = k.load().await?;
    let names = k.node_names().await?;
    for n in &names {
        match records.get(n).map(|r| r.phase) {
            Some(cnimig_core::machine::Phase::Done) => {}
            Some(p) => refused.push(format!("node {n} is {p}")),
            None => refused.push(format!("node {n} was never migrated")),
        }
    }
    let c = rec.as_ref().and_then(|r| r.cleanup.clone());
    let install = match &c {
        Some(c) => Some(c.install),
        None => Some(k.facts().await?.install),
    };
    let step = c.as_ref().map(|c| c.step);
    let flushed: BTreeSet<String> = c
        .as_ref()
        .map(|c| c.flushed.iter().map(ToString::to_string).collect())
        .unwrap_or_default();
    let crd_api: Api<CustomResourceDefinition> = Api::all(k.client().clone());
    let crds: Vec<String> = crd_api
        .list(&ListParams::default())
        .await
        .map_err(|e| crate::error::port_error("list", "customresourcedefinitions", e))?
        .items
        .into_iter()
        .filter(|c| CALICO_CRD_GROUPS.contains(&c.spec.group.as_str()))
        .filter_map(|c| c.metadata.name)
        .collect();
    let image = k.flush_image().await?;
    let script = render_script(&node_flush_actions()).map_err(|e| PortError::Invalid {
        what: "the flush program".into(),
        detail: e.to_string(),
    })?;
    let first_object = match step {
        None => 0,
        Some(CleanupStep::Objects(i)) => i,
        Some(_) => usize::MAX,
    };
    let objects: Vec<DeleteTarget> = install
        .map(|i| {
            removal_order(i)
                .iter()
                .skip(first_object)
                .flat_map(|o| calico_object_targets(*o))
                .collect()
        })
        .unwrap_or_default();
    let mut plan = CleanupPlan {
        refused,
        install,
        step,
        nodes: names.iter().map(ToString::to_string).collect(),
        flushed: flushed.iter().cloned().collect(),
        objects,
        crds,
        image,
        script,
        writes: Vec::new(),
        max_in_flight: cfg.max_in_flight.max(1),
    };
    if step == Some(CleanupStep::Done) || !plan.refused.is_empty() {
        return Ok(plan);
    }
    let mut order = 0;
    let mut writes = lease_writes(
        &mut order,
        k,
        "start, then after every step",
        "clean-up's progress",
    );
    for t in &plan.objects {
        writes.push(write(
            &mut order,
            "Calico's objects",
            "DELETE",
            t.to_string(),
            "absent is fine".into(),
        ));
    }
    let ns = &k.options().system_namespace;
    if step.is_none_or(|s| s <= CleanupStep::Flush) {
        for n in plan.nodes.iter().filter(|n| !flushed.contains(*n)) {
            let Ok(node) = NodeName::new(n) else { continue };
            let name = flush_helper_name(&node);
            writes.push(write(
                &mut order,
                "flush, node by node",
                "CREATE then DELETE",
                format!("pods {ns}/{name}"),
                format!(
                    "nodeName {n}, hostNetwork, privileged, image {}, host paths {}, no ServiceAccount token; deleted once Succeeded; at most {} at once",
                    plan.image,
                    cnimig_core::cleanup::HELPER_HOST_PATHS.join(" "),
                    plan.max_in_flight
                ),
            ));
        }
    }
    for c in &plan.crds {
        writes.push(write(
            &mut order,
            "last",
            "DELETE",
            format!("customresourcedefinitions {c}"),
            "Calico's CRD".into(),
        ));
    }
    plan.writes = writes;
    Ok(plan)
}

impl fmt::Display for CleanupPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "== Clean up")?;
        writeln!(f, "nodes: {}", self.nodes.len())?;
        if let Some(i) = self.install {
            writeln!(f, "Calico installed by: {i:?}")?;
        }
        match self.step {
            None => writeln!(f, "clean-up never ran")?,
            Some(s) => writeln!(
                f,
                "a previous clean-up run reached {s:?} (it resumes from there)"
            )?,
        }
        if !self.refused.is_empty() {
            writeln!(f, "REFUSED:")?;
            for r in &self.refused {
                writeln!(f, "  - {r}")?;
            }
            return Ok(());
        }
        if self.step == Some(CleanupStep::Done) {
            return writeln!(f, "clean-up already succeeded: nothing to do");
        }
        writeln!(f, "== Writes, in order")?;
        for w in &self.writes {
            writeln!(f, "{w}")?;
        }
        writeln!(f, "== The program every helper runs")?;
        for l in self.script.lines() {
            writeln!(f, "  | {l}")?;
        }
        Ok(())
    }
}

/// Sends every write of `plan` once with `dryRun=All`: the two Leases, each Calico object's
/// deletion, each node's helper pod creation, each CRD's deletion. An object already gone is
/// reported `not sent`.
///
/// # RBAC
/// The verbs of the run itself; a missing one shows as a 403 here.
pub async fn probe_cleanup(config: &Config, k: &KubeCluster, plan: &CleanupPlan) -> Vec<Probe> {
    let (client, mut out) = match probe_leases(config, k).await {
        Ok(opened) => opened,
        Err(p) => return vec![p],
    };
    let o = k.options();
    for t in &plan.objects {
        out.push(probe_delete(&client, t).await);
    }
    let flushed: BTreeSet<&String> = plan.flushed.iter().collect();
    if plan.step.is_none_or(|s| s <= CleanupStep::Flush) {
        let pods: Api<core::Pod> = Api::namespaced(client.clone(), &o.system_namespace);
        for n in plan.nodes.iter().filter(|n| !flushed.contains(n)) {
            let write = format!("CREATE the flush helper pod on {n}");
            let Ok(node) = NodeName::new(n) else {
                out.push(Probe {
                    write,
                    outcome: ProbeOutcome::Refused {
                        code: 422,
                        message: format!("{n:?} is not a valid node name"),
                    },
                });
                continue;
            };
            let value = flush_helper_pod(&node, &o.system_namespace, &plan.image, &plan.script);
            out.push(match serde_json::from_value::<core::Pod>(value) {
                Ok(pod) => Probe {
                    write: format!(
                        "CREATE pods {}/{}",
                        o.system_namespace,
                        flush_helper_name(&node)
                    ),
                    outcome: outcome(pods.create(&dry_post(), &pod).await),
                },
                Err(e) => Probe {
                    write,
                    outcome: ProbeOutcome::Failed {
                        error: e.to_string(),
                    },
                },
            });
        }
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for c in &plan.crds {
        out.push(Probe {
            write: format!("DELETE customresourcedefinitions {c}"),
            outcome: gone_not_sent(crds.delete(c, &dry_delete()).await),
        });
    }
    out
}

/// What both probes open with: a client that does not retry (a refusal shows at once) and the
/// dry runs of the two Lease writes (the run's lock and finalize's record); `Err` is the probe
/// saying the client could not be built.
async fn probe_leases(config: &Config, k: &KubeCluster) -> Result<(Client, Vec<Probe>), Probe> {
    let client = no_retry(config)?;
    let o = k.options();
    let leases = vec![
        probe_lease(&client, o).await,
        probe_final_lease(&client, &o.system_namespace).await,
    ];
    Ok((client, leases))
}

fn no_retry(config: &Config) -> Result<Client, Probe> {
    let mut c = config.clone();
    c.default_retry = false;
    Client::try_from(c).map_err(|e| Probe {
        write: "build a client".into(),
        outcome: ProbeOutcome::Failed {
            error: e.to_string(),
        },
    })
}

fn dry_delete() -> DeleteParams {
    DeleteParams {
        dry_run: true,
        ..DeleteParams::default()
    }
}

/// Like `outcome`, but 404 (already gone, or the API not served) is `NotSent`.
fn gone_not_sent<T>(r: Result<T, kube::Error>) -> ProbeOutcome {
    match r {
        Err(kube::Error::Api(s)) if s.code == 404 => ProbeOutcome::NotSent {
            reason: "absent: nothing to delete".into(),
        },
        other => outcome(other),
    }
}

async fn probe_delete(client: &Client, t: &DeleteTarget) -> Probe {
    Probe {
        write: format!("DELETE {t}"),
        outcome: gone_not_sent(t.api(client).delete(&t.name, &dry_delete()).await),
    }
}

async fn probe_final_lease(client: &Client, ns: &str) -> Probe {
    let api: Api<Lease> = Api::namespaced(client.clone(), ns);
    let what = format!("leases {ns}/{FINAL_LEASE_NAME}");
    match api.get_opt(FINAL_LEASE_NAME).await {
        Ok(Some(lease)) => Probe {
            write: format!("UPDATE {what}"),
            outcome: outcome(api.replace(FINAL_LEASE_NAME, &dry_post(), &lease).await),
        },
        Ok(None) => {
            let lease = Lease {
                metadata: meta::ObjectMeta {
                    name: Some(FINAL_LEASE_NAME.into()),
                    annotations: Some([(FINAL_ANNOTATION.to_string(), "{}".to_string())].into()),
                    ..meta::ObjectMeta::default()
                },
                spec: None,
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
