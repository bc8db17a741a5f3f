//! What the Rancher side of a migration will do, computed from a [`RancherSnapshot`]. Pure.
//!
//! [`plan`] turns what was read into checks (pass / warn / fail, like the core's preflight) and
//! ordered [`Step`]s, each saying when it happens, whether cnimig does it (with `--yes`) or a
//! person must, and exactly what changes.

use std::fmt;

use cnimig_core::preflight::{Check, Severity};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1 as core;
use serde::Serialize;
use serde_json::Value;

use crate::agent::{self, AgentState};
use crate::cni;
use crate::detect::{self, CalicoInstall, Detection, Distribution, DistroObjects, NodeFacts};
use crate::gitops::{self, ArgoApp, FleetBundle};

/// Everything the Rancher side reads, in one value (see
/// [`RancherCluster::snapshot`](crate::RancherCluster::snapshot)).
#[derive(Debug, Clone, Default)]
pub struct RancherSnapshot {
    /// The downstream API server's URL (a Rancher proxy URL is warned about).
    pub server_url: String,
    /// Nodes.
    pub nodes: Vec<core::Node>,
    /// All pods (host-port collisions).
    pub pods: Vec<core::Pod>,
    /// The distribution's own objects.
    pub objects: DistroObjects,
    /// The cluster agent's Deployment, if any.
    pub agent: Option<Deployment>,
    /// HelmChartConfig `rke2-calico` (RKE2), as JSON.
    pub helm_chart_config: Option<Value>,
    /// Argo CD Applications, as JSON (`None`: Argo CD's API is not served).
    pub argo_apps: Option<Vec<Value>>,
    /// The management cluster was given.
    pub management: bool,
    /// The `management.cattle.io/v3` Cluster (RKE1), as JSON.
    pub rke1_cluster: Option<Value>,
    /// The `provisioning.cattle.io/v1` Cluster (RKE2 provisioned by Rancher), as JSON.
    pub rke2_cluster: Option<Value>,
    /// Fleet Bundles in the management cluster, as JSON.
    pub fleet_bundles: Vec<Value>,
}

/// Choices of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RancherConfig {
    /// Pause Argo CD auto-sync of the Applications that would revert the migration's changes,
    /// and restore it at the end (`--pause-gitops`). Without it, such Applications fail the
    /// plan.
    pub pause_gitops: bool,
    /// What an RKE2 provisioning Cluster's `cni` becomes in the last step: `none` (Cilium stays
    /// the Helm release cnimig's values describe) or `cilium` (RKE2's own chart).
    pub rke2_cni_target: String,
    /// The namespace of HelmCharts, HelmChartConfigs and the RKE1 objects (`kube-system`).
    pub system_namespace: String,
}

impl Default for RancherConfig {
    fn default() -> Self {
        RancherConfig {
            pause_gitops: false,
            rke2_cni_target: "none".into(),
            system_namespace: "kube-system".into(),
        }
    }
}

/// When a step happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum When {
    /// Before any node is touched.
    BeforeFirstNode,
    /// After each node is verified.
    BetweenNodes,
    /// After every node is on Cilium.
    AfterLastNode,
}

impl fmt::Display for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            When::BeforeFirstNode => "before the first node",
            When::BetweenNodes => "between nodes",
            When::AfterLastNode => "after the last node",
        })
    }
}

/// What a step does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Action {
    /// JSON-patch the agent onto the host network, saving the original.
    AgentToHostNetwork,
    /// Check the agent is Ready on the host network (re-patch it if Rancher redeployed it).
    AgentCheck,
    /// Restore the agent's saved fields and remove the saved copy.
    AgentRestore,
    /// Merge-patch the RKE1 management Cluster's `network.plugin` to `none`, then read it back.
    Rke1PluginNone,
    /// Write `nodeAddressAutodetectionV4: {kubernetes: NodeInternalIP}` into HelmChartConfig
    /// `rke2-calico`'s values (creating it if absent).
    Rke2HelmChartConfigAutodetection,
    /// Merge-patch the provisioning Cluster's `chartValues.rke2-calico` autodetection.
    Rke2ProvisionedAutodetection,
    /// Merge-patch the provisioning Cluster's `machineGlobalConfig.cni`.
    Rke2CniSwitch {
        /// The new value.
        target: String,
    },
    /// Remove `automated` from an Application's sync policy, saving it.
    ArgoPause {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Put an Application's saved `automated` back.
    ArgoRestore {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Something a person does; the text says what.
    Manual,
}

/// One step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// When.
    pub when: When,
    /// What.
    pub action: Action,
    /// Exactly what changes, for a person.
    pub describe: String,
}

impl Step {
    /// cnimig does it (with consent); `false` for [`Action::Manual`].
    #[must_use]
    pub fn automatic(&self) -> bool {
        self.action != Action::Manual
    }
}

/// The Rancher side of a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RancherPlan {
    /// What runs where.
    pub detection: Detection,
    /// Checks.
    pub checks: Vec<Check>,
    /// Steps, in order.
    pub steps: Vec<Step>,
    /// Argo CD Applications that would revert the migration's changes.
    pub argo: Vec<ArgoApp>,
    /// Fleet Bundles that deploy something the migration changes.
    pub fleet: Vec<FleetBundle>,
}

impl RancherPlan {
    /// True when no check failed.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.severity != Severity::Fail)
    }
    /// The steps of one phase.
    pub fn steps_at(&self, when: When) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(move |s| s.when == when)
    }
    /// The agent is handled (there is one, so it goes on the host network and back).
    #[must_use]
    pub fn has_agent(&self) -> bool {
        self.steps
            .iter()
            .any(|s| s.action == Action::AgentToHostNetwork)
    }
}

impl fmt::Display for RancherPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.detection;
        writeln!(f, "distribution: {}", d.distribution)?;
        for e in d.evidence.iter().take(6) {
            writeln!(f, "  evidence: {}", e.what)?;
        }
        writeln!(f, "calico: {}", d.calico)?;
        let cp = d.control_plane_nodes();
        writeln!(
            f,
            "nodes: {} ({} control-plane/etcd, migrated last{}{})",
            d.roles.len(),
            cp.len(),
            if cp.is_empty() { "" } else { ": " },
            cp.join(", ")
        )?;
        writeln!(f, "checks:")?;
        for c in &self.checks {
            writeln!(f, "  {c}")?;
        }
        writeln!(f, "steps:")?;
        for (i, s) in self.steps.iter().enumerate() {
            writeln!(
                f,
                "  {}. [{}] {} {}",
                i + 1,
                s.when,
                if s.automatic() { "cnimig:" } else { "YOU:" },
                s.describe
            )?;
        }
        Ok(())
    }
}

fn name_of(v: &Value) -> String {
    let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or("");
    match s("/metadata/namespace") {
        "" => s("/metadata/name").to_string(),
        ns => format!("{ns}/{}", s("/metadata/name")),
    }
}

/// The plan for `snap` under `cfg`.
///
/// ```
/// use cnimig_rancher::plan::{plan, RancherConfig, RancherSnapshot};
/// use cnimig_rancher::detect::Distribution;
/// let snap = RancherSnapshot::default();
/// let p = plan(&snap, &RancherConfig::default());
/// assert_eq!(p.detection.distribution, Distribution::Generic);
/// assert!(p.ok() && p.steps.is_empty(), "nothing Rancher-specific to do: {p}");
/// ```
#[must_use]
pub fn plan(snap: &RancherSnapshot, cfg: &RancherConfig) -> RancherPlan {
    let facts: Vec<NodeFacts> = snap.nodes.iter().map(NodeFacts::from_node).collect();
    let detection = detect::detect(&facts, &snap.objects);
    let mut checks = Vec::new();
    let mut steps = Vec::new();
    let mut step = |when, action, describe: String| {
        steps.push(Step {
            when,
            action,
            describe,
        });
    };

    checks.push(if detection.conflicts.is_empty() {
        Check::pass(
            "rancher-distribution",
            format!(
                "{} ({} pieces of evidence)",
                detection.distribution,
                detection.evidence.len()
            ),
        )
    } else {
        Check::warn(
            "rancher-distribution",
            format!(
                "{} chosen, but: {}{}; check the nodes are one cluster of one distribution",
                detection.distribution,
                detection
                    .conflicts
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; "),
                match detection.conflicts.len() {
                    0..=3 => String::new(),
                    n => format!(" and {} more", n - 3),
                }
            ),
        )
    });
    if detection.calico == CalicoInstall::Canal {
        checks.push(Check::warn(
            "rancher-canal",
            "Calico runs as Canal (flannel VXLAN on UDP 8472, Cilium's default tunnel port): give Cilium another tunnel port (or Geneve), as the core's tunnel-port check says",
        ));
    }
    if snap.server_url.contains("/k8s/clusters/") {
        checks.push(Check::warn(
            "rancher-proxy",
            format!(
                "the API is reached through Rancher's proxy ({}), which disappears while the cluster agent reconnects; use a direct kubeconfig (a control-plane node's, or Rancher's authorized cluster endpoint)",
                snap.server_url
            ),
        ));
    }

    // The cluster agent.
    if let Some(agent_dep) = &snap.agent {
        let id = format!(
            "{}/{}",
            agent_dep
                .metadata
                .namespace
                .as_deref()
                .unwrap_or(agent::AGENT_NAMESPACE),
            agent_dep
                .metadata
                .name
                .as_deref()
                .unwrap_or(agent::AGENT_NAME)
        );
        match agent::agent_state(agent_dep) {
            Err(e) => checks.push(Check::fail("rancher-agent", e.to_string())),
            Ok(state) => {
                let describe = match &state {
                    AgentState::Original(s) => format!(
                        "JSON-patch Deployment {id}: spec.template.spec.hostNetwork {} -> true, dnsPolicy {} -> {}, original saved in its annotation {}",
                        s.host_network
                            .map_or("(absent)".to_string(), |b| b.to_string()),
                        s.dns_policy.as_deref().unwrap_or("(absent)"),
                        agent::HOST_NET_DNS_POLICY,
                        agent::ORIGINAL_ANNOTATION
                    ),
                    AgentState::Prepared {
                        template_on_host_network: true,
                        ..
                    } => format!(
                        "Deployment {id} is already on the host network (saved by an earlier run): nothing to change"
                    ),
                    AgentState::Prepared { .. } => format!(
                        "Deployment {id} was prepared by an earlier run but is off the host network again: re-patch hostNetwork/dnsPolicy, keeping the saved original"
                    ),
                };
                checks.push(Check::pass(
                    "rancher-agent",
                    format!(
                        "{id} found ({})",
                        match state {
                            AgentState::Original(_) => "as Rancher deployed it",
                            AgentState::Prepared { .. } => "prepared by an earlier cnimig run",
                        }
                    ),
                ));
                step(When::BeforeFirstNode, Action::AgentToHostNetwork, describe);
                step(
                    When::BetweenNodes,
                    Action::AgentCheck,
                    format!(
                        "after each node's verification: {id} Ready on the host network (re-patched if Rancher redeployed it; the node fails verification if the agent is not Ready)"
                    ),
                );
                step(
                    When::AfterLastNode,
                    Action::AgentRestore,
                    format!(
                        "restore {id}'s saved hostNetwork and dnsPolicy exactly and remove {} (once; a resumed run does it if this one dies)",
                        agent::ORIGINAL_ANNOTATION
                    ),
                );
            }
        }
        checks.push(agent::host_port_check(agent_dep, &snap.nodes, &snap.pods));
    } else {
        checks.push(Check::pass(
            "rancher-agent",
            "no cattle-cluster-agent Deployment: the cluster is not managed by Rancher, nothing to keep connected",
        ));
    }

    // The distribution's CNI settings.
    match detection.distribution {
        Distribution::Rke1 => match (&snap.rke1_cluster, snap.management) {
            (Some(c), _) if cni::rke1_plugin(c) == Some("none") => checks.push(Check::pass(
                "rancher-rke1-network-plugin",
                format!("management Cluster {} has network.plugin: none", name_of(c)),
            )),
            (Some(c), _) => {
                checks.push(Check::pass(
                    "rancher-rke1-network-plugin",
                    format!(
                        "management Cluster {} has network.plugin: {}; cnimig sets it to none before the first node",
                        name_of(c),
                        cni::rke1_plugin(c).unwrap_or("(absent)")
                    ),
                ));
                step(
                    When::BeforeFirstNode,
                    Action::Rke1PluginNone,
                    format!(
                        "merge-patch management.cattle.io/v3 Cluster {}: spec.rancherKubernetesEngineConfig.network.plugin {} -> none (RKE then never redeploys Calico; it deletes nothing), and read it back",
                        name_of(c),
                        cni::rke1_plugin(c).unwrap_or("(absent)")
                    ),
                );
            }
            (None, true) => checks.push(Check::fail(
                "rancher-rke1-network-plugin",
                "the management cluster has no management.cattle.io Cluster by the given name: pass the cluster's id (c-xxxxx) with --cluster",
            )),
            (None, false) => {
                checks.push(Check::warn(
                    "rancher-rke1-network-plugin",
                    "no management-cluster kubeconfig, so network.plugin cannot be checked: set it to none yourself before migrating (or pass --management-kubeconfig and --cluster)",
                ));
                step(
                    When::BeforeFirstNode,
                    Action::Manual,
                    "in Rancher, edit the cluster as YAML: rancher_kubernetes_engine_config.network.plugin: none (RKE then never redeploys Calico on the next cluster update; it deletes nothing)".into(),
                );
            }
        },
        Distribution::Rke2 => rke2_steps(snap, cfg, &detection, &mut checks, &mut step),
        Distribution::K3s | Distribution::Generic => {}
    }

    // GitOps.
    let argo: Vec<ArgoApp> = snap
        .argo_apps
        .iter()
        .flatten()
        .map(gitops::argo_app)
        .filter(|a| a.reverts_changes() || a.paused_by_cnimig)
        .collect();
    let active: Vec<&ArgoApp> = argo.iter().filter(|a| a.reverts_changes()).collect();
    let names = |apps: &[&ArgoApp]| {
        apps.iter()
            .map(|a| format!("{}/{} ({:?})", a.namespace, a.name, a.covers))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !active.is_empty() && !cfg.pause_gitops {
        checks.push(Check::fail(
            "rancher-gitops-argocd",
            format!(
                "Argo CD Applications with automated self-heal would revert the migration's changes: {}; run with --pause-gitops (cnimig pauses and restores them) or pause them yourself",
                names(&active)
            ),
        ));
    } else if !argo.is_empty() {
        checks.push(Check::warn(
            "rancher-gitops-argocd",
            format!(
                "Argo CD auto-sync paused for the migration and restored after: {}",
                names(&argo.iter().collect::<Vec<_>>())
            ),
        ));
        for a in &argo {
            if a.reverts_changes() {
                step(
                    When::BeforeFirstNode,
                    Action::ArgoPause {
                        namespace: a.namespace.clone(),
                        name: a.name.clone(),
                    },
                    format!(
                        "JSON-patch Application {}/{}: remove spec.syncPolicy.automated, saved in its annotation {}",
                        a.namespace,
                        a.name,
                        gitops::ARGO_SAVED_ANNOTATION
                    ),
                );
            }
            step(
                When::AfterLastNode,
                Action::ArgoRestore {
                    namespace: a.namespace.clone(),
                    name: a.name.clone(),
                },
                format!(
                    "restore Application {}/{}'s spec.syncPolicy.automated and remove the saved copy",
                    a.namespace, a.name
                ),
            );
        }
    } else {
        checks.push(Check::pass(
            "rancher-gitops-argocd",
            if snap.argo_apps.is_some() {
                "no Argo CD Application self-heals Calico, Cilium or the cluster agent"
            } else {
                "Argo CD's API is not served"
            },
        ));
    }
    let fleet: Vec<FleetBundle> = snap
        .fleet_bundles
        .iter()
        .filter_map(gitops::fleet_bundle)
        .collect();
    let unpaused: Vec<&FleetBundle> = fleet.iter().filter(|b| !b.paused).collect();
    if unpaused.is_empty() {
        checks.push(Check::pass(
            "rancher-gitops-fleet",
            if snap.management {
                "no unpaused Fleet Bundle deploys Calico, Cilium or the cluster agent"
            } else {
                "Fleet lives in the management cluster, which was not given: check its GitRepos yourself"
            },
        ));
    } else {
        checks.push(Check::warn(
            "rancher-gitops-fleet",
            format!(
                "Fleet Bundles deploy what the migration changes and are not paused: {}; pause them in the management cluster (steps below) and unpause after",
                unpaused
                    .iter()
                    .map(|b| format!("{}/{} ({:?})", b.namespace, b.name, b.covers))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
        for b in unpaused {
            step(
                When::BeforeFirstNode,
                Action::Manual,
                format!("in the management cluster: {}", b.pause_command()),
            );
        }
    }

    steps.sort_by_key(|s| s.when);
    RancherPlan {
        detection,
        checks,
        steps,
        argo,
        fleet,
    }
}

fn rke2_steps(
    snap: &RancherSnapshot,
    cfg: &RancherConfig,
    detection: &Detection,
    checks: &mut Vec<Check>,
    step: &mut impl FnMut(When, Action, String),
) {
    const ID: &str = "rancher-rke2-calico-autodetection";
    if let Some(c) = &snap.rke2_cluster {
        match cni::autodetection_ok(cni::provisioned_autodetection(c)) {
            Ok(()) => checks.push(Check::pass(
                ID,
                format!(
                    "provisioning Cluster {}: chartValues.rke2-calico keeps Calico off cilium_*",
                    name_of(c)
                ),
            )),
            Err(why) => {
                checks.push(Check::pass(ID, format!("provisioning Cluster {}: chartValues.rke2-calico autodetection {why}; cnimig sets kubernetes: NodeInternalIP", name_of(c))));
                step(
                    When::BeforeFirstNode,
                    Action::Rke2ProvisionedAutodetection,
                    format!(
                        "merge-patch provisioning.cattle.io/v1 Cluster {}: spec.rkeConfig.chartValues.rke2-calico.installation.calicoNetwork.nodeAddressAutodetectionV4 -> {{kubernetes: NodeInternalIP}}",
                        name_of(c)
                    ),
                );
            }
        }
        let current = cni::rke2_cni(c).unwrap_or("(absent)").to_string();
        if current != cfg.rke2_cni_target {
            step(
                When::AfterLastNode,
                Action::Rke2CniSwitch {
                    target: cfg.rke2_cni_target.clone(),
                },
                format!(
                    "only once every node is on Cilium: merge-patch Cluster {}: spec.rkeConfig.machineGlobalConfig.cni {current} -> {} (cluster-wide: RKE2 uninstalls the Calico chart everywhere; Rancher probes Calico on every node until then)",
                    name_of(c),
                    cfg.rke2_cni_target
                ),
            );
        }
        return;
    }
    if detection.rancher_provisioned {
        checks.push(Check::warn(
            ID,
            if snap.management {
                "Rancher provisioned this RKE2 cluster but the management cluster has no provisioning.cattle.io Cluster by the given name: pass --cluster NAMESPACE/NAME"
            } else {
                "Rancher provisioned this RKE2 cluster: Calico's autodetection and the final cni switch belong in its provisioning Cluster (spec.rkeConfig.chartValues.rke2-calico, machineGlobalConfig.cni); pass --management-kubeconfig and --cluster, or edit them yourself"
            },
        ));
        step(When::BeforeFirstNode, Action::Manual, "in Rancher, edit the cluster as YAML: spec.rkeConfig.chartValues.rke2-calico.installation.calicoNetwork.nodeAddressAutodetectionV4: {kubernetes: NodeInternalIP}".into());
        step(
            When::AfterLastNode,
            Action::Manual,
            format!(
                "only once every node is on Cilium: spec.rkeConfig.machineGlobalConfig.cni: {} (cluster-wide; removes the Calico chart)",
                cfg.rke2_cni_target
            ),
        );
        return;
    }
    if detection.calico == CalicoInstall::Rke2Chart {
        let values = snap
            .helm_chart_config
            .as_ref()
            .and_then(|h| h.pointer("/spec/valuesContent"))
            .and_then(Value::as_str)
            .unwrap_or("");
        match cni::values_autodetection(values) {
            Err(e) => checks.push(Check::fail(ID, e.to_string())),
            Ok(v) => match cni::autodetection_ok(v.as_ref()) {
                Ok(()) => checks.push(Check::pass(
                    ID,
                    format!(
                        "HelmChartConfig {}/rke2-calico keeps Calico off cilium_*",
                        cfg.system_namespace
                    ),
                )),
                Err(why) => {
                    checks.push(Check::pass(ID, format!("HelmChartConfig {}/rke2-calico: autodetection {why}; cnimig sets kubernetes: NodeInternalIP", cfg.system_namespace)));
                    step(
                        When::BeforeFirstNode,
                        Action::Rke2HelmChartConfigAutodetection,
                        format!(
                            "{} HelmChartConfig {}/rke2-calico: valuesContent installation.calicoNetwork.nodeAddressAutodetectionV4 -> {{kubernetes: NodeInternalIP}}, other values kept (RKE2's helm controller re-renders Calico's Installation from it)",
                            if snap.helm_chart_config.is_some() {
                                "update"
                            } else {
                                "create"
                            },
                            cfg.system_namespace
                        ),
                    );
                }
            },
        }
        step(
            When::AfterLastNode,
            Action::Manual,
            format!(
                "only once every node is on Cilium: on every server node set cni: {} in /etc/rancher/rke2/config.yaml and restart rke2-server (cluster-wide; removes the Calico chart)",
                cfg.rke2_cni_target
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    fn node(name: &str, version: &str, labels: Value) -> core::Node {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels},
            "status": {"nodeInfo": {"kubeletVersion": version, "containerRuntimeVersion": "containerd://1.7",
                "architecture": "", "operatingSystem": "", "kernelVersion": "", "osImage": "",
                "machineID": "", "systemUUID": "", "bootID": "", "kubeProxyVersion": ""}}})).unwrap()
    }

    fn agent() -> Deployment {
        serde_json::from_value(json!({"metadata": {"name": "cattle-cluster-agent", "namespace": "cattle-system", "resourceVersion": "1"},
            "spec": {"selector": {"matchLabels": {"app": "cattle-cluster-agent"}},
                     "template": {"spec": {"dnsPolicy": "ClusterFirst", "containers": []}}}})).unwrap()
    }

    fn rke2_snapshot() -> RancherSnapshot {
        RancherSnapshot {
            nodes: vec![
                node(
                    "s1",
                    "v1.28.9+rke2r1",
                    json!({"node-role.kubernetes.io/control-plane": "true"}),
                ),
                node("a1", "v1.28.9+rke2r1", json!({})),
            ],
            objects: DistroObjects {
                helm_charts: ["rke2-calico".to_string()].into(),
                ..DistroObjects::default()
            },
            agent: Some(agent()),
            argo_apps: Some(vec![
                json!({"metadata": {"name": "cni", "namespace": "argocd", "resourceVersion": "3"},
                "spec": {"source": {"chart": "rke2-calico"}, "syncPolicy": {"automated": {"selfHeal": true}}}}),
            ]),
            ..RancherSnapshot::default()
        }
    }

    #[test]
    fn rke2_standalone_plan() {
        let snap = rke2_snapshot();
        let p = plan(&snap, &RancherConfig::default());
        assert!(
            !p.ok(),
            "a self-healing Application fails the plan without --pause-gitops: {p}"
        );
        let p = plan(
            &snap,
            &RancherConfig {
                pause_gitops: true,
                ..RancherConfig::default()
            },
        );
        assert!(p.ok(), "{p}");
        let actions: Vec<(When, &Action)> = p.steps.iter().map(|s| (s.when, &s.action)).collect();
        assert!(actions.contains(&(When::BeforeFirstNode, &Action::AgentToHostNetwork)));
        assert!(actions.contains(&(
            When::BeforeFirstNode,
            &Action::Rke2HelmChartConfigAutodetection
        )));
        assert!(actions.contains(&(
            When::BeforeFirstNode,
            &Action::ArgoPause {
                namespace: "argocd".into(),
                name: "cni".into()
            }
        )));
        assert!(actions.contains(&(When::AfterLastNode, &Action::AgentRestore)));
        assert!(actions.contains(&(
            When::AfterLastNode,
            &Action::ArgoRestore {
                namespace: "argocd".into(),
                name: "cni".into()
            }
        )));
        // The cni switch of a standalone RKE2 is the person's, and the very last phase.
        let last = p.steps.last().unwrap();
        assert_eq!(last.when, When::AfterLastNode);
        assert!(
            p.steps.iter().any(|s| s.action == Action::Manual
                && s.describe.contains("/etc/rancher/rke2/config.yaml"))
        );
        let text = p.to_string();
        assert!(
            text.contains("distribution: RKE2")
                && text.contains("1 control-plane/etcd, migrated last: s1"),
            "{text}"
        );
    }

    #[test]
    fn rke2_provisioned_plan_switches_cni_last() {
        let mut snap = rke2_snapshot();
        snap.argo_apps = None;
        snap.management = true;
        snap.rke2_cluster = Some(
            json!({"metadata": {"name": "prod", "namespace": "fleet-default"},
            "spec": {"rkeConfig": {"machineGlobalConfig": {"cni": "calico"}}}}),
        );
        let p = plan(&snap, &RancherConfig::default());
        assert!(p.ok(), "{p}");
        let switch = p
            .steps
            .iter()
            .position(|s| {
                s.action
                    == Action::Rke2CniSwitch {
                        target: "none".into(),
                    }
            })
            .unwrap();
        assert_eq!(p.steps[switch].when, When::AfterLastNode);
        assert!(
            p.steps
                .iter()
                .any(|s| s.action == Action::Rke2ProvisionedAutodetection
                    && s.when == When::BeforeFirstNode)
        );
        assert!(
            !p.steps
                .iter()
                .any(|s| s.action == Action::Rke2HelmChartConfigAutodetection)
        );
    }

    #[test]
    fn rke1_plan_with_and_without_the_management_cluster() {
        let rke1 = RancherSnapshot {
            nodes: vec![node(
                "n1",
                "v1.26.15",
                json!({"node-role.kubernetes.io/worker": "true"}),
            )],
            objects: DistroObjects {
                rke_network_plugin_configmap: true,
                ..DistroObjects::default()
            },
            agent: Some(agent()),
            ..RancherSnapshot::default()
        };
        let p = plan(&rke1, &RancherConfig::default());
        assert_eq!(p.detection.distribution, Distribution::Rke1);
        assert!(
            p.steps
                .iter()
                .any(|s| s.action == Action::Manual && s.describe.contains("network.plugin: none"))
        );
        let mut with = rke1.clone();
        with.management = true;
        with.rke1_cluster = Some(
            json!({"metadata": {"name": "c-abcde"}, "spec": {"rancherKubernetesEngineConfig": {"network": {"plugin": "calico"}}}}),
        );
        let p = plan(&with, &RancherConfig::default());
        assert!(p.steps.iter().any(|s| s.action == Action::Rke1PluginNone));
        with.rke1_cluster = Some(
            json!({"metadata": {"name": "c-abcde"}, "spec": {"rancherKubernetesEngineConfig": {"network": {"plugin": "none"}}}}),
        );
        assert!(
            !plan(&with, &RancherConfig::default())
                .steps
                .iter()
                .any(|s| s.action == Action::Rke1PluginNone)
        );
        with.rke1_cluster = None;
        assert!(
            !plan(&with, &RancherConfig::default()).ok(),
            "a wrong cluster name fails"
        );
    }

    #[test]
    fn proxy_url_and_fleet_are_reported() {
        let mut snap = rke2_snapshot();
        snap.argo_apps = None;
        snap.server_url = "https://rancher.example/k8s/clusters/c-m-1".into();
        snap.management = true;
        snap.fleet_bundles = vec![
            json!({"metadata": {"name": "cni", "namespace": "fleet-default"},
            "spec": {"resources": [{"name": "cilium.yaml", "content": ""}]}}),
        ];
        let p = plan(&snap, &RancherConfig::default());
        assert!(
            p.checks
                .iter()
                .any(|c| c.id == "rancher-proxy" && c.severity == Severity::Warn)
        );
        assert!(
            p.checks
                .iter()
                .any(|c| c.id == "rancher-gitops-fleet" && c.severity == Severity::Warn)
        );
        assert!(
            p.steps
                .iter()
                .any(|s| s.describe.contains("patch bundles.fleet.cattle.io cni"))
        );
    }
}
