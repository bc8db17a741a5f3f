//! [`RancherCluster`]: reads the [`RancherSnapshot`] and carries out a [`RancherPlan`]'s steps on
//! the Kubernetes API; [`RancherVerifier`]: the core's verifier plus the agent check.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use cnimig_core::model::NodeName;
use cnimig_core::ports::{PortError, Verification, Verifier};
use cnimig_kube::planning::ProbeOutcome;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1 as core;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Client, ResourceExt};
use serde_json::Value;

use crate::agent::{self, AgentError};
use crate::cni::{self, CniError};
use crate::dry_run::RancherWrite;
use crate::gitops;
use crate::plan::{Action, RancherConfig, RancherPlan, RancherSnapshot, When};

/// Errors of the Rancher steps.
#[derive(Debug, thiserror::Error)]
pub enum RancherError {
    /// An API call failed.
    #[error(transparent)]
    Port(#[from] PortError),
    /// The agent's Deployment cannot be handled as it is.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// RKE2's values cannot be updated.
    #[error(transparent)]
    Cni(#[from] CniError),
    /// A step refused to act; the message says why and what to do.
    #[error("{0}")]
    Refused(String),
}

/// Where things are. [`Default`] fits a Rancher-managed cluster.
#[derive(Debug, Clone)]
pub struct RancherOptions {
    /// The agent's namespace (`cattle-system`).
    pub agent_namespace: String,
    /// The agent's Deployment (`cattle-cluster-agent`).
    pub agent_name: String,
    /// HelmCharts, HelmChartConfigs, RKE1's objects, `calico-node`/`canal` manifests
    /// (`kube-system`).
    pub system_namespace: String,
    /// The Tigera operator's namespace (`calico-system`).
    pub calico_namespace: String,
    /// Where Argo CD Applications live (`None`: all namespaces).
    pub argo_namespace: Option<String>,
    /// A label selector restricting the nodes read (`None`: all).
    pub node_selector: Option<String>,
    /// How long the agent may take to be Ready on the host network after a patch.
    pub agent_ready_timeout: Duration,
    /// How often to look while waiting.
    pub poll: Duration,
    /// The run's choices.
    pub config: RancherConfig,
}

impl Default for RancherOptions {
    fn default() -> Self {
        RancherOptions {
            agent_namespace: agent::AGENT_NAMESPACE.into(),
            agent_name: agent::AGENT_NAME.into(),
            system_namespace: "kube-system".into(),
            calico_namespace: "calico-system".into(),
            argo_namespace: None,
            node_selector: None,
            agent_ready_timeout: Duration::from_secs(300),
            poll: Duration::from_secs(2),
            config: RancherConfig::default(),
        }
    }
}

/// The Rancher management cluster, and this cluster's object there.
#[derive(Clone)]
pub struct Management {
    /// A client for the management cluster.
    pub client: Client,
    /// This cluster's object: `c-xxxxx` names the `management.cattle.io/v3` Cluster (RKE1);
    /// `NAMESPACE/NAME` the `provisioning.cattle.io/v1` Cluster (RKE2, usually
    /// `fleet-default/NAME`).
    pub cluster: String,
    /// Where Fleet Bundles are listed (`None`: all namespaces).
    pub fleet_namespace: Option<String>,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Management")
            .field("cluster", &self.cluster)
            .field("fleet_namespace", &self.fleet_namespace)
            .finish_non_exhaustive()
    }
}

fn port(verb: &str, what: impl Into<String>, e: kube::Error) -> PortError {
    let what = what.into();
    match e {
        kube::Error::Api(s) => match s.code {
            404 => PortError::NotFound { what },
            409 => PortError::Conflict { what },
            401 | 403 => PortError::Forbidden {
                verb: verb.into(),
                what: format!("{what} (see deploy/rbac-rancher.yaml)"),
            },
            429 => PortError::Throttled {
                retry_after: Duration::from_secs(1),
            },
            400 | 422 => PortError::Invalid {
                what: format!("{verb} {what}"),
                detail: s.message,
            },
            code => PortError::Unavailable {
                what: format!("{verb} {what}"),
                detail: format!("HTTP {code}: {}", s.message),
            },
        },
        other => PortError::Unavailable {
            what: format!("{verb} {what}"),
            detail: other.to_string(),
        },
    }
}

/// A JSON patch `test` that failed (the API server answers a bare 422) or a lost update (409):
/// the object is not what the patch expected. A patch that is invalid for another reason fails
/// the same way each time and ends the retries with [`PortError::Conflict`].
fn failed_test(code: u16) -> bool {
    matches!(code, 409 | 422)
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

fn helm_chart() -> ApiResource {
    resource("helm.cattle.io", "v1", "HelmChart", "helmcharts")
}
fn helm_chart_config() -> ApiResource {
    resource(
        "helm.cattle.io",
        "v1",
        "HelmChartConfig",
        "helmchartconfigs",
    )
}
fn application() -> ApiResource {
    resource("argoproj.io", "v1alpha1", "Application", "applications")
}
fn management_cluster() -> ApiResource {
    resource("management.cattle.io", "v3", "Cluster", "clusters")
}
fn provisioning_cluster() -> ApiResource {
    resource("provisioning.cattle.io", "v1", "Cluster", "clusters")
}
fn bundle() -> ApiResource {
    resource("fleet.cattle.io", "v1alpha1", "Bundle", "bundles")
}
fn installation() -> ApiResource {
    resource("operator.tigera.io", "v1", "Installation", "installations")
}

/// `Ok(None)` for a 404 (object or resource not served).
fn opt<T>(r: Result<T, kube::Error>, verb: &str, what: &str) -> Result<Option<T>, PortError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(port(verb, what, e)),
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Whether a write is made or only sent with server-side `dryRun=All`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Apply,
    DryRun,
}

impl Mode {
    fn patch(self) -> PatchParams {
        match self {
            Mode::Apply => PatchParams::default(),
            Mode::DryRun => PatchParams::default().dry_run(),
        }
    }
    fn post(self) -> PostParams {
        PostParams {
            dry_run: self == Mode::DryRun,
            ..PostParams::default()
        }
    }
}

/// What one write site did.
#[derive(Debug)]
enum Wrote {
    /// Nothing to write; why (already done, object absent).
    Nothing(String),
    /// The write was made ([`Mode::Apply`]).
    Changed,
    /// The write was sent with `dryRun=All` ([`Mode::DryRun`]).
    DryRun {
        /// Verb, resource and object.
        request: String,
        /// The body sent (patch or object).
        body: Value,
        /// The server's answer.
        outcome: ProbeOutcome,
        /// The object as the write would leave it (the dry run's answer), when allowed.
        answer: Option<Value>,
    },
}

impl Wrote {
    fn changed(&self) -> bool {
        matches!(self, Wrote::Changed)
    }
    /// A write that applies to the object only as an earlier step leaves it: computed, not sent.
    fn after_earlier_step(
        request: String,
        patch: Option<json_patch::Patch>,
        earlier: &str,
    ) -> Self {
        match patch {
            None => Wrote::Nothing(format!("{request}: nothing to do after {earlier}")),
            Some(p) => Wrote::DryRun {
                request,
                body: to_json(&p),
                outcome: ProbeOutcome::NotSent {
                    reason: format!(
                        "computed from the dry run's answer for {earlier}; the API server can check it only once that step is made"
                    ),
                },
                answer: None,
            },
        }
    }
    fn into_write(self, order: usize, step: &crate::plan::Step) -> RancherWrite {
        let (request, body, outcome) = match self {
            Wrote::Nothing(reason) => (
                String::new(),
                Value::Null,
                ProbeOutcome::NotSent {
                    reason: format!("nothing to write: {reason}"),
                },
            ),
            Wrote::Changed => (String::new(), Value::Null, ProbeOutcome::Allowed),
            Wrote::DryRun {
                request,
                body,
                outcome,
                ..
            } => (request, body, outcome),
        };
        RancherWrite {
            order,
            when: step.when,
            step: step.describe.clone(),
            request,
            body,
            outcome,
        }
    }
    fn dry<T: serde::Serialize>(request: String, body: Value, r: Result<T, kube::Error>) -> Self {
        let (outcome, answer) = match r {
            Ok(v) => (ProbeOutcome::Allowed, Some(to_json(&v))),
            Err(kube::Error::Api(s)) => (
                ProbeOutcome::Refused {
                    code: s.code,
                    message: s.message,
                },
                None,
            ),
            Err(e) => (
                ProbeOutcome::Failed {
                    error: e.to_string(),
                },
                None,
            ),
        };
        Wrote::DryRun {
            request,
            body,
            outcome,
            answer,
        }
    }
}

/// Counters of what the agent check did, for reports and tests.
#[derive(Debug, Default)]
pub struct AgentCounters {
    /// Agent checks run.
    pub checks: AtomicUsize,
    /// Times the agent was found off the host network and re-patched.
    pub repairs: AtomicUsize,
}

/// The Rancher side of a migration on a Kubernetes API. Cheap to clone.
#[derive(Clone)]
pub struct RancherCluster {
    client: Client,
    server_url: String,
    opts: Arc<RancherOptions>,
    mgmt: Option<Management>,
    counters: Arc<AgentCounters>,
}

impl std::fmt::Debug for RancherCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RancherCluster")
            .field("server_url", &self.server_url)
            .field("opts", &self.opts)
            .field("mgmt", &self.mgmt)
            .finish_non_exhaustive()
    }
}

impl RancherCluster {
    /// The Rancher side for the cluster `client` talks to (`server_url` is its API URL, checked
    /// for Rancher's proxy), with the management cluster when given.
    #[must_use]
    pub fn new(
        client: Client,
        server_url: impl Into<String>,
        opts: RancherOptions,
        mgmt: Option<Management>,
    ) -> Self {
        RancherCluster {
            client,
            server_url: server_url.into(),
            opts: Arc::new(opts),
            mgmt,
            counters: Arc::default(),
        }
    }

    /// The options.
    #[must_use]
    pub fn options(&self) -> &RancherOptions {
        &self.opts
    }

    /// What the agent check did so far.
    #[must_use]
    pub fn counters(&self) -> &AgentCounters {
        &self.counters
    }

    fn ns_dyn(&self, ns: &str, ar: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, ar)
    }

    fn agent_api(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.opts.agent_namespace)
    }

    fn agent_id(&self) -> String {
        format!("{}/{}", self.opts.agent_namespace, self.opts.agent_name)
    }

    /// Reads everything the plan needs.
    ///
    /// Calls: LIST nodes, LIST pods (all namespaces); GET ConfigMap `rke-network-plugin`, Job
    /// `rke-network-plugin-deploy-job`, DaemonSets `calico-node`/`canal` (system namespace) and
    /// `calico-node` (Calico namespace), Installation `default`; LIST HelmCharts and GET
    /// HelmChartConfig `rke2-calico` (system namespace); GET the agent Deployment; LIST
    /// Applications; with the management cluster, GET its Cluster and LIST Bundles. A 404 (the
    /// object or its API is absent) reads as absent.
    ///
    /// # RBAC
    /// `deploy/rbac.yaml` (nodes, pods, configmaps, daemonsets, installations) and
    /// `deploy/rbac-rancher.yaml` (jobs, helmcharts, helmchartconfigs, deployments,
    /// applications; clusters and bundles in the management cluster).
    ///
    /// # Errors
    /// Any read failure other than a 404.
    pub async fn snapshot(&self) -> Result<RancherSnapshot, RancherError> {
        let o = &self.opts;
        let lp = match &o.node_selector {
            Some(s) => ListParams::default().labels(s),
            None => ListParams::default(),
        };
        let nodes = Api::<core::Node>::all(self.client.clone())
            .list(&lp)
            .await
            .map_err(|e| port("list", "nodes", e))?
            .items;
        let names: BTreeSet<String> = nodes.iter().map(ResourceExt::name_any).collect();
        let pods = Api::<core::Pod>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| port("list", "pods", e))?
            .items
            .into_iter()
            .filter(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .is_some_and(|n| names.contains(n))
            })
            .collect();

        let sys = &o.system_namespace;
        let cms: Api<core::ConfigMap> = Api::namespaced(self.client.clone(), sys);
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), sys);
        let mut objects = crate::detect::DistroObjects {
            rke_network_plugin_configmap: opt(
                cms.get("rke-network-plugin").await,
                "get",
                "configmap rke-network-plugin",
            )?
            .is_some(),
            rke_network_plugin_job: opt(
                jobs.get("rke-network-plugin-deploy-job").await,
                "get",
                "job rke-network-plugin-deploy-job",
            )?
            .is_some(),
            ..Default::default()
        };
        for (ns, name, label) in [
            (sys.as_str(), "calico-node", "kube-system/calico-node"),
            (sys.as_str(), "canal", "kube-system/canal"),
            (
                o.calico_namespace.as_str(),
                "calico-node",
                "calico-system/calico-node",
            ),
        ] {
            let ds: Api<DaemonSet> = Api::namespaced(self.client.clone(), ns);
            if opt(ds.get(name).await, "get", &format!("daemonset {ns}/{name}"))?.is_some() {
                objects.daemonsets.insert(label.to_string());
            }
        }
        let inst: Api<DynamicObject> = Api::all_with(self.client.clone(), &installation());
        objects.tigera_installation =
            opt(inst.get("default").await, "get", "installation default")?.is_some();
        if let Some(list) = opt(
            self.ns_dyn(sys, &helm_chart())
                .list(&ListParams::default())
                .await,
            "list",
            "helmcharts",
        )? {
            objects.helm_charts = list.items.iter().map(ResourceExt::name_any).collect();
        }
        let helm_chart_config = opt(
            self.ns_dyn(sys, &helm_chart_config())
                .get(cni::RKE2_CALICO)
                .await,
            "get",
            "helmchartconfig rke2-calico",
        )?
        .map(|h| to_json(&h));
        let agent = opt(
            self.agent_api().get(&o.agent_name).await,
            "get",
            &self.agent_id(),
        )?;
        let apps: Api<DynamicObject> = match &o.argo_namespace {
            Some(ns) => self.ns_dyn(ns, &application()),
            None => Api::all_with(self.client.clone(), &application()),
        };
        let argo_apps = opt(
            apps.list(&ListParams::default()).await,
            "list",
            "applications",
        )?
        .map(|l| l.items.iter().map(to_json).collect());

        let mut snap = RancherSnapshot {
            server_url: self.server_url.clone(),
            nodes,
            pods,
            objects,
            agent,
            helm_chart_config,
            argo_apps,
            management: self.mgmt.is_some(),
            ..RancherSnapshot::default()
        };
        if let Some(m) = &self.mgmt {
            match m.cluster.split_once('/') {
                Some((ns, name)) => {
                    let api: Api<DynamicObject> =
                        Api::namespaced_with(m.client.clone(), ns, &provisioning_cluster());
                    snap.rke2_cluster = opt(
                        api.get(name).await,
                        "get",
                        &format!("provisioning cluster {}", m.cluster),
                    )?
                    .map(|c| to_json(&c));
                }
                None => {
                    let api: Api<DynamicObject> =
                        Api::all_with(m.client.clone(), &management_cluster());
                    snap.rke1_cluster = opt(
                        api.get(&m.cluster).await,
                        "get",
                        &format!("management cluster {}", m.cluster),
                    )?
                    .map(|c| to_json(&c));
                }
            }
            let api: Api<DynamicObject> = match &m.fleet_namespace {
                Some(ns) => Api::namespaced_with(m.client.clone(), ns, &bundle()),
                None => Api::all_with(m.client.clone(), &bundle()),
            };
            snap.fleet_bundles = opt(api.list(&ListParams::default()).await, "list", "bundles")?
                .map(|l| l.items.iter().map(to_json).collect())
                .unwrap_or_default();
        }
        Ok(snap)
    }

    /// The plan for the cluster as it is now.
    ///
    /// # Errors
    /// As [`snapshot`](Self::snapshot).
    pub async fn plan(&self) -> Result<RancherPlan, RancherError> {
        Ok(crate::plan::plan(
            &self.snapshot().await?,
            &self.opts.config,
        ))
    }

    /// Carries out the plan's [`When::BeforeFirstNode`] steps that cnimig does, in order, then
    /// waits for the agent to be Ready on the host network. Refuses a plan with a failed check.
    /// Each step re-reads its object, so running it again (a resumed run) changes only what is
    /// not done yet.
    ///
    /// # Errors
    /// [`RancherError::Refused`] for a failed check or an agent not Ready in time; API failures.
    pub async fn prepare(&self, plan: &RancherPlan) -> Result<Vec<String>, RancherError> {
        if !plan.ok() {
            return Err(RancherError::Refused(format!(
                "the Rancher plan has failed checks; fix them first:\n{}",
                plan.checks
                    .iter()
                    .filter(|c| c.severity == cnimig_core::preflight::Severity::Fail)
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )));
        }
        let mut done = Vec::new();
        for s in plan
            .steps_at(When::BeforeFirstNode)
            .filter(|s| s.automatic())
        {
            let changed = match &s.action {
                Action::AgentToHostNetwork => self.agent_to_host_network().await?,
                Action::Rke1PluginNone => self.rke1_plugin_none().await?,
                Action::Rke2ProvisionedAutodetection => {
                    self.rke2_provisioned_autodetection().await?
                }
                Action::Rke2HelmChartConfigAutodetection => self.rke2_helm_chart_config().await?,
                Action::ArgoPause { namespace, name } => self.argo_pause(namespace, name).await?,
                _ => false,
            };
            done.push(format!(
                "{}{}",
                if changed { "" } else { "(already done) " },
                s.describe
            ));
        }
        if plan.has_agent() {
            self.wait_agent_ready().await?;
        }
        Ok(done)
    }

    /// Carries out the plan's [`When::AfterLastNode`] steps that cnimig does: the RKE2 `cni`
    /// switch (only with `all_nodes_on_cilium`), Argo CD restored, the agent restored last.
    /// Each is idempotent and exactly-once (see [`agent::restore_patch`]).
    ///
    /// # Errors
    /// [`RancherError::Refused`] for the `cni` switch before every node is on Cilium; API
    /// failures.
    pub async fn finish(
        &self,
        plan: &RancherPlan,
        all_nodes_on_cilium: bool,
    ) -> Result<Vec<String>, RancherError> {
        let mut done = Vec::new();
        for s in finish_steps(plan) {
            let changed = match &s.action {
                Action::Rke2CniSwitch { target } => {
                    if !all_nodes_on_cilium {
                        return Err(RancherError::Refused(
                            "the RKE2 cni switch is cluster-wide and removes the Calico chart: it runs only once every node is on Cilium".into(),
                        ));
                    }
                    self.rke2_cni_switch(target).await?
                }
                Action::ArgoRestore { namespace, name } => {
                    self.argo_restore(namespace, name).await?
                }
                Action::AgentRestore => self.restore_agent().await?,
                _ => false,
            };
            done.push(format!(
                "{}{}",
                if changed { "" } else { "(already done) " },
                s.describe
            ));
        }
        Ok(done)
    }

    /// Sends every write the plan's automatic steps make, in the order a run makes them
    /// ([`prepare`](Self::prepare)'s, then [`finish`](Self::finish)'s), with server-side
    /// `dryRun=All`: the API server authenticates, authorises, validates and admits each one
    /// (webhooks included) and persists nothing. Each [`RancherWrite`] names the step, the
    /// request (verb, resource, object), the exact body (the JSON or merge patch, or the object
    /// created) and the server's answer.
    ///
    /// # Caveats
    /// A step after the last node whose patch applies to the object only as an earlier step
    /// leaves it (restoring an agent or an Application not paused yet) cannot be sent before
    /// that step is made: its patch is computed from the earlier step's dry-run answer and
    /// reported as [`ProbeOutcome::NotSent`], body included. Nothing is waited for (the agent's
    /// readiness on the host network is not), and the RKE2 `cni` switch is sent whatever the
    /// nodes' state (a run sends it only once every node is on Cilium).
    ///
    /// # RBAC
    /// The same as the steps (`get`, and `patch` or `create`, of each object): a missing verb
    /// shows as a 403 in that write's outcome.
    ///
    /// # Errors
    /// A failed read (other than a 404); [`RancherError::Agent`], [`RancherError::Cni`] or
    /// [`RancherError::Refused`] for an object cnimig cannot handle as it is. A refused write
    /// is an outcome, not an error.
    pub async fn dry_run(&self, plan: &RancherPlan) -> Result<Vec<RancherWrite>, RancherError> {
        let mode = Mode::DryRun;
        let mut out = Vec::new();
        // The objects as the steps before the first node would leave them (their dry-run
        // answers), for the restores after the last node.
        let mut agent_after: Option<Value> = None;
        let mut apps_after: BTreeMap<(String, String), Value> = BTreeMap::new();
        let steps = plan
            .steps_at(When::BeforeFirstNode)
            .filter(|s| s.automatic())
            .chain(finish_steps(plan));
        for s in steps {
            let wrote = match &s.action {
                Action::AgentToHostNetwork => {
                    let w = self.patch_agent(agent::prepare_patch, mode).await?;
                    if let Wrote::DryRun {
                        answer: Some(a), ..
                    } = &w
                    {
                        agent_after = Some(a.clone());
                    }
                    w
                }
                Action::Rke1PluginNone => self.rke1_plugin_none_as(mode).await?,
                Action::Rke2ProvisionedAutodetection => {
                    self.rke2_provisioned_autodetection_as(mode).await?
                }
                Action::Rke2HelmChartConfigAutodetection => {
                    self.rke2_helm_chart_config_as(mode).await?
                }
                Action::ArgoPause { namespace, name } => {
                    let w = self
                        .argo_patch(namespace, name, |a| Ok(gitops::argo_pause_patch(a)), mode)
                        .await?;
                    if let Wrote::DryRun {
                        answer: Some(a), ..
                    } = &w
                    {
                        apps_after.insert((namespace.clone(), name.clone()), a.clone());
                    }
                    w
                }
                Action::Rke2CniSwitch { target } => self.rke2_cni_switch_as(target, mode).await?,
                Action::ArgoRestore { namespace, name } => {
                    let w = self
                        .argo_patch(namespace, name, gitops::argo_restore_patch, mode)
                        .await?;
                    match (w, apps_after.get(&(namespace.clone(), name.clone()))) {
                        (Wrote::Nothing(_), Some(paused)) => Wrote::after_earlier_step(
                            format!(
                                "PATCH applications.argoproj.io {namespace}/{name} (JSON patch)"
                            ),
                            gitops::argo_restore_patch(paused).map_err(RancherError::Refused)?,
                            "the Application's pause",
                        ),
                        (w, _) => w,
                    }
                }
                Action::AgentRestore => {
                    let w = self.patch_agent(agent::restore_patch, mode).await?;
                    match (w, &agent_after) {
                        (Wrote::Nothing(_), Some(prepared)) => {
                            let d: Deployment =
                                serde_json::from_value(prepared.clone()).map_err(|e| {
                                    RancherError::Refused(format!(
                                        "read the dry run's answer for {}: {e}",
                                        self.agent_id()
                                    ))
                                })?;
                            Wrote::after_earlier_step(
                                format!("PATCH deployments.apps {} (JSON patch)", self.agent_id()),
                                agent::restore_patch(&d)?,
                                "the agent's move onto the host network",
                            )
                        }
                        (w, _) => w,
                    }
                }
                Action::AgentCheck | Action::Manual => continue,
            };
            out.push(wrote.into_write(out.len() + 1, s));
        }
        Ok(out)
    }

    /// JSON-patches the agent onto the host network ([`agent::prepare_patch`]); `true` when it
    /// changed something. Retries a few times when the Deployment changed under it.
    ///
    /// # RBAC
    /// `get`, `patch` `deployments` `cattle-cluster-agent` in `cattle-system`.
    ///
    /// # Errors
    /// API failures; [`RancherError::Agent`] for a foreign annotation.
    pub async fn agent_to_host_network(&self) -> Result<bool, RancherError> {
        Ok(self
            .patch_agent(agent::prepare_patch, Mode::Apply)
            .await?
            .changed())
    }

    /// Restores the agent's saved fields and removes the saved copy ([`agent::restore_patch`]);
    /// `false` when there was nothing to restore (never prepared, or already restored).
    ///
    /// # RBAC
    /// As [`agent_to_host_network`](Self::agent_to_host_network).
    ///
    /// # Errors
    /// API failures; [`RancherError::Agent`] for a foreign annotation.
    pub async fn restore_agent(&self) -> Result<bool, RancherError> {
        Ok(self
            .patch_agent(agent::restore_patch, Mode::Apply)
            .await?
            .changed())
    }

    async fn patch_agent(
        &self,
        make: fn(&Deployment) -> Result<Option<json_patch::Patch>, AgentError>,
        mode: Mode,
    ) -> Result<Wrote, RancherError> {
        let id = self.agent_id();
        let request = format!("PATCH deployments.apps {id} (JSON patch)");
        json_patch_step(
            &self.agent_api(),
            &self.opts.agent_name,
            &id,
            request,
            mode,
            |d| Ok(make(d)?),
        )
        .await
    }

    /// The agent's health now, re-patching it first when it was prepared but Rancher put it
    /// back on the pod network.
    ///
    /// # RBAC
    /// As [`agent_to_host_network`](Self::agent_to_host_network), and `list pods`.
    ///
    /// # Errors
    /// API failures.
    pub async fn agent_check(&self) -> Result<Vec<String>, RancherError> {
        self.counters.checks.fetch_add(1, Ordering::Relaxed);
        let id = self.agent_id();
        let Some(d) = opt(
            self.agent_api().get(&self.opts.agent_name).await,
            "get",
            &id,
        )?
        else {
            return Ok(vec![format!(
                "Deployment {id} is gone: Rancher redeploys it; check the cluster in Rancher before going on"
            )]);
        };
        if let agent::AgentState::Prepared {
            template_on_host_network: false,
            ..
        } = agent::agent_state(&d)?
        {
            self.counters.repairs.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(agent = %id, "the cluster agent is off the host network again: re-patching it");
            self.agent_to_host_network().await?;
            return match self.wait_agent_ready().await {
                Ok(()) => Ok(Vec::new()),
                Err(e) => Ok(vec![e.to_string()]),
            };
        }
        let pods = self.agent_pods(&d).await?;
        Ok(agent::agent_health(&d, &pods)?.problems())
    }

    async fn agent_pods(&self, d: &Deployment) -> Result<Vec<core::Pod>, RancherError> {
        let sel = d
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.clone())
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let pods: Api<core::Pod> = Api::namespaced(self.client.clone(), &self.opts.agent_namespace);
        Ok(pods
            .list(&ListParams::default().labels(&sel))
            .await
            .map_err(|e| port("list", "cluster agent pods", e))?
            .items)
    }

    /// Waits until the agent is Ready on the host network.
    ///
    /// # Errors
    /// [`RancherError::Refused`] naming the problems after `agent_ready_timeout`.
    pub async fn wait_agent_ready(&self) -> Result<(), RancherError> {
        let deadline = tokio::time::Instant::now() + self.opts.agent_ready_timeout;
        let id = self.agent_id();
        loop {
            let problems = match opt(
                self.agent_api().get(&self.opts.agent_name).await,
                "get",
                &id,
            )? {
                None => vec![format!("Deployment {id} not found")],
                Some(d) => {
                    let pods = self.agent_pods(&d).await?;
                    agent::agent_health(&d, &pods)?.problems()
                }
            };
            if problems.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RancherError::Refused(format!(
                    "the cluster agent is not Ready on the host network after {:?}: {}; no node has been touched by this step",
                    self.opts.agent_ready_timeout,
                    problems.join("; ")
                )));
            }
            tokio::time::sleep(self.opts.poll).await;
        }
    }

    fn mgmt(&self) -> Result<&Management, RancherError> {
        self.mgmt.as_ref().ok_or_else(|| {
            RancherError::Refused(
                "this step needs the management cluster (--management-kubeconfig)".into(),
            )
        })
    }

    /// Merge-patches a management-cluster object and reads it back through `check`.
    async fn mgmt_merge(
        &self,
        ar: &ApiResource,
        patch: &Value,
        check: impl Fn(&Value) -> bool,
        mode: Mode,
    ) -> Result<Wrote, RancherError> {
        let m = self.mgmt()?;
        let (api, name): (Api<DynamicObject>, &str) = match m.cluster.split_once('/') {
            Some((ns, name)) => (Api::namespaced_with(m.client.clone(), ns, ar), name),
            None => (Api::all_with(m.client.clone(), ar), m.cluster.as_str()),
        };
        let what = format!("{} {}", ar.kind, m.cluster);
        let before = to_json(&api.get(name).await.map_err(|e| port("get", &what, e))?);
        if check(&before) {
            return Ok(Wrote::Nothing(format!("{what}: already so")));
        }
        let r = api.patch(name, &mode.patch(), &Patch::Merge(patch)).await;
        if mode == Mode::DryRun {
            let request = format!(
                "PATCH {}.{} {} (merge patch, management cluster)",
                ar.plural, ar.group, m.cluster
            );
            let mut wrote = Wrote::dry(request, patch.clone(), r);
            if let Wrote::DryRun {
                outcome,
                answer: Some(a),
                ..
            } = &mut wrote
                && !check(a)
            {
                *outcome = ProbeOutcome::Failed {
                    error: format!(
                        "the dry run's answer does not show the change (a webhook would revert it?); check {what} in Rancher"
                    ),
                };
            }
            return Ok(wrote);
        }
        r.map_err(|e| port("patch", &what, e))?;
        let after = to_json(&api.get(name).await.map_err(|e| port("get", &what, e))?);
        if !check(&after) {
            return Err(RancherError::Refused(format!(
                "{what} does not show the change after the patch (a webhook or controller reverted it?); check it in Rancher"
            )));
        }
        Ok(Wrote::Changed)
    }

    /// RKE1: `network.plugin: none` on the management Cluster, read back.
    ///
    /// # RBAC
    /// Management cluster: `get`, `patch` `clusters.management.cattle.io`.
    ///
    /// # Errors
    /// API failures; [`RancherError::Refused`] when the value does not stick.
    pub async fn rke1_plugin_none(&self) -> Result<bool, RancherError> {
        Ok(self.rke1_plugin_none_as(Mode::Apply).await?.changed())
    }

    async fn rke1_plugin_none_as(&self, mode: Mode) -> Result<Wrote, RancherError> {
        self.mgmt_merge(
            &management_cluster(),
            &cni::rke1_plugin_patch(),
            |c| cni::rke1_plugin(c) == Some("none"),
            mode,
        )
        .await
    }

    /// RKE2 provisioned by Rancher: Calico autodetection in `chartValues.rke2-calico`.
    ///
    /// # RBAC
    /// Management cluster: `get`, `patch` `clusters.provisioning.cattle.io`.
    ///
    /// # Errors
    /// As [`rke1_plugin_none`](Self::rke1_plugin_none).
    pub async fn rke2_provisioned_autodetection(&self) -> Result<bool, RancherError> {
        Ok(self
            .rke2_provisioned_autodetection_as(Mode::Apply)
            .await?
            .changed())
    }

    async fn rke2_provisioned_autodetection_as(&self, mode: Mode) -> Result<Wrote, RancherError> {
        self.mgmt_merge(
            &provisioning_cluster(),
            &cni::provisioned_autodetection_patch(),
            |c| cni::autodetection_ok(cni::provisioned_autodetection(c)).is_ok(),
            mode,
        )
        .await
    }

    /// RKE2 provisioned by Rancher: `machineGlobalConfig.cni` to `target`.
    ///
    /// # RBAC
    /// Management cluster: `get`, `patch` `clusters.provisioning.cattle.io`.
    ///
    /// # Errors
    /// As [`rke1_plugin_none`](Self::rke1_plugin_none).
    pub async fn rke2_cni_switch(&self, target: &str) -> Result<bool, RancherError> {
        Ok(self
            .rke2_cni_switch_as(target, Mode::Apply)
            .await?
            .changed())
    }

    async fn rke2_cni_switch_as(&self, target: &str, mode: Mode) -> Result<Wrote, RancherError> {
        self.mgmt_merge(
            &provisioning_cluster(),
            &cni::cni_switch_patch(target),
            |c| cni::rke2_cni(c) == Some(target),
            mode,
        )
        .await
    }

    /// RKE2 standalone: the autodetection fix in HelmChartConfig `rke2-calico`'s values
    /// (created when absent; updated with a `test` of `resourceVersion` when present).
    ///
    /// # RBAC
    /// `get`, `create`, `patch` `helmchartconfigs.helm.cattle.io` in the system namespace.
    ///
    /// # Errors
    /// API failures; [`RancherError::Cni`] for values that are not YAML.
    pub async fn rke2_helm_chart_config(&self) -> Result<bool, RancherError> {
        Ok(self.rke2_helm_chart_config_as(Mode::Apply).await?.changed())
    }

    async fn rke2_helm_chart_config_as(&self, mode: Mode) -> Result<Wrote, RancherError> {
        let ns = &self.opts.system_namespace;
        let api = self.ns_dyn(ns, &helm_chart_config());
        let what = format!("helmchartconfig {ns}/{}", cni::RKE2_CALICO);
        for _ in 0..5 {
            let current = opt(api.get(cni::RKE2_CALICO).await, "get", &what)?.map(|h| to_json(&h));
            let values = current
                .as_ref()
                .and_then(|h| h.pointer("/spec/valuesContent"))
                .and_then(Value::as_str)
                .unwrap_or("");
            if cni::autodetection_ok(cni::values_autodetection(values)?.as_ref()).is_ok() {
                return Ok(Wrote::Nothing(format!("{what}: already so")));
            }
            let new_values = cni::values_with_autodetection(values)?;
            let (request, body, result) = match &current {
                None => {
                    let body = cni::helm_chart_config(ns, &new_values);
                    let obj: DynamicObject = serde_json::from_value(body.clone())
                        .map_err(|e| RancherError::Refused(format!("build {what}: {e}")))?;
                    (
                        format!(
                            "POST helmchartconfigs.helm.cattle.io {ns} (create {})",
                            cni::RKE2_CALICO
                        ),
                        body,
                        api.create(&mode.post(), &obj).await,
                    )
                }
                Some(h) => {
                    let rv = h
                        .pointer("/metadata/resourceVersion")
                        .cloned()
                        .unwrap_or(Value::Null);
                    let op = if h.pointer("/spec").is_some_and(Value::is_object) {
                        serde_json::json!({"op": "add", "path": "/spec/valuesContent", "value": new_values})
                    } else {
                        serde_json::json!({"op": "add", "path": "/spec", "value": {"valuesContent": new_values}})
                    };
                    let p: json_patch::Patch = serde_json::from_value(serde_json::json!([
                        {"op": "test", "path": "/metadata/resourceVersion", "value": rv}, op
                    ]))
                    .map_err(|e| {
                        RancherError::Refused(format!("build the patch of {what}: {e}"))
                    })?;
                    let body = to_json(&p);
                    (
                        format!(
                            "PATCH helmchartconfigs.helm.cattle.io {ns}/{} (JSON patch)",
                            cni::RKE2_CALICO
                        ),
                        body,
                        api.patch(cni::RKE2_CALICO, &mode.patch(), &Patch::<()>::Json(p))
                            .await,
                    )
                }
            };
            if mode == Mode::DryRun {
                return Ok(Wrote::dry(request, body, result));
            }
            match result {
                Ok(_) => return Ok(Wrote::Changed),
                Err(kube::Error::Api(s)) if failed_test(s.code) => {}
                Err(e) => return Err(port("write", &what, e).into()),
            }
        }
        Err(RancherError::Port(PortError::Conflict { what }))
    }

    async fn argo_patch(
        &self,
        namespace: &str,
        name: &str,
        make: impl Fn(&Value) -> Result<Option<json_patch::Patch>, String>,
        mode: Mode,
    ) -> Result<Wrote, RancherError> {
        let api = self.ns_dyn(namespace, &application());
        let what = format!("application {namespace}/{name}");
        let request = format!("PATCH applications.argoproj.io {namespace}/{name} (JSON patch)");
        json_patch_step(&api, name, &what, request, mode, |app| {
            make(&to_json(app)).map_err(RancherError::Refused)
        })
        .await
    }

    /// Pauses an Application's auto-sync ([`gitops::argo_pause_patch`]).
    ///
    /// # RBAC
    /// `get`, `patch` `applications.argoproj.io`.
    ///
    /// # Errors
    /// API failures.
    pub async fn argo_pause(&self, namespace: &str, name: &str) -> Result<bool, RancherError> {
        Ok(self
            .argo_patch(
                namespace,
                name,
                |a| Ok(gitops::argo_pause_patch(a)),
                Mode::Apply,
            )
            .await?
            .changed())
    }

    /// Restores an Application's auto-sync ([`gitops::argo_restore_patch`]).
    ///
    /// # RBAC
    /// `get`, `patch` `applications.argoproj.io`.
    ///
    /// # Errors
    /// API failures; [`RancherError::Refused`] for a foreign annotation.
    pub async fn argo_restore(&self, namespace: &str, name: &str) -> Result<bool, RancherError> {
        Ok(self
            .argo_patch(namespace, name, gitops::argo_restore_patch, Mode::Apply)
            .await?
            .changed())
    }
}

/// Reads `name`, asks `make` for the JSON patch that does the step (`None`: already done) and
/// sends it (`mode`). The patch carries its own `test` operations: when one fails (the object
/// changed, or another run did the step) the object is read again and `make` decides again,
/// up to 5 times. `what` names the object in errors, `request` the write in a dry run's report.
async fn json_patch_step<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    request: String,
    mode: Mode,
    make: impl Fn(&K) -> Result<Option<json_patch::Patch>, RancherError>,
) -> Result<Wrote, RancherError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    for _ in 0..5 {
        let Some(obj) = opt(api.get(name).await, "get", what)? else {
            return Ok(Wrote::Nothing(format!("{what} not found")));
        };
        let Some(p) = make(&obj)? else {
            return Ok(Wrote::Nothing(format!("{what}: already done")));
        };
        let body = to_json(&p);
        let r = api.patch(name, &mode.patch(), &Patch::<()>::Json(p)).await;
        if mode == Mode::DryRun {
            return Ok(Wrote::dry(request, body, r));
        }
        match r {
            Ok(_) => return Ok(Wrote::Changed),
            // A failed `test` (the API server answers 422; 409 for a lost update): re-read and
            // decide again.
            Err(kube::Error::Api(s)) if failed_test(s.code) => {}
            Err(e) => return Err(port("patch", what, e).into()),
        }
    }
    Err(RancherError::Port(PortError::Conflict {
        what: what.into(),
    }))
}

/// The automatic steps after the last node, in the order [`RancherCluster::finish`] makes
/// them: the RKE2 `cni` switch, Argo CD restored, the agent restored last.
fn finish_steps(plan: &RancherPlan) -> Vec<&crate::plan::Step> {
    let mut steps: Vec<_> = plan
        .steps_at(When::AfterLastNode)
        .filter(|s| s.automatic())
        .collect();
    steps.sort_by_key(|s| match s.action {
        Action::Rke2CniSwitch { .. } => 0,
        Action::ArgoRestore { .. } => 1,
        _ => 2,
    });
    steps
}

/// The core's [`Verifier`] plus the cluster agent: after a node verifies, the agent must still
/// be Ready on the host network (re-patched first if Rancher redeployed it); if it is not, the
/// node fails verification, which rolls it back and (with the default failure policy) stops the
/// run before more nodes lose the cluster's connection to Rancher.
pub struct RancherVerifier {
    inner: Arc<dyn Verifier>,
    rancher: RancherCluster,
}

impl RancherVerifier {
    /// Wraps `inner`.
    #[must_use]
    pub fn new(inner: Arc<dyn Verifier>, rancher: RancherCluster) -> Self {
        RancherVerifier { inner, rancher }
    }

    async fn with_agent(&self, v: Verification) -> Result<Verification, PortError> {
        let problems = self.rancher.agent_check().await.map_err(|e| match e {
            RancherError::Port(p) => p,
            other => PortError::Invalid {
                what: "check the cluster agent".into(),
                detail: other.to_string(),
            },
        })?;
        Ok(match (v, problems.is_empty()) {
            (v, true) => v,
            (Verification::Healthy, false) => Verification::Unhealthy(problems),
            (Verification::Unhealthy(mut p), false) => {
                p.extend(problems);
                Verification::Unhealthy(p)
            }
        })
    }
}

#[async_trait]
impl Verifier for RancherVerifier {
    async fn verify_node(&self, node: &NodeName) -> Result<Verification, PortError> {
        let v = self.inner.verify_node(node).await?;
        self.with_agent(v).await
    }
    async fn verify_cluster(&self) -> Result<Verification, PortError> {
        let v = self.inner.verify_cluster().await?;
        self.with_agent(v).await
    }
}
