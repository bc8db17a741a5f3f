//! Finalize: make Cilium the cluster's CNI once every node in scope is migrated.
//!
//! [`Finalizer::finalize`] does, in order, each step persisted before it acts (a
//! [`FinalRecord`] kept by a [`FinalizePort`], on a real cluster an annotation on the Lease
//! [`FINAL_LEASE`], written with a resourceVersion guard):
//! 1. Refuses, changing nothing, while any node in scope is not [`Phase::Done`] (each named with
//!    its phase).
//! 2. Takes the migration's lock ([`StateStore::acquire_lock`]).
//! 3. Waits up to [`FinalOptions::config_timeout`] for the live `cilium-config` to hold the final
//!    values ([`final_values_yaml`], which the user applies with `helm upgrade`); on timeout it
//!    names every differing key.
//! 4. Restarts the Cilium agent of every node in scope with the migration's own scheduler rules
//!    ([`schedule::pick`](crate::schedule::pick): in-flight limit, budget rule, control plane
//!    last), each waited for Ready with Cilium's CNI config in place.
//! 5. Removes the temporary Calico allow rule ([`AllowRulePort::remove_allow_rule`]), deletes the
//!    `CiliumNodeConfig` and removes the migration label from every node.
//!
//! A run stopped anywhere (an error, a killed process) is resumed by running it again: port
//! errors are not retried inside a run, so a flaky API surfaces as an error and the next run
//! continues from the stored record. Every action is idempotent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::allow::AllowRulePort;
use crate::cilium::{
    CiliumPhase, ConfigMismatch, ValueInputs, check_live_config, helm_values_yaml,
};
use crate::cleanup::CleanupRecord;
use crate::config::MigrationConfig;
use crate::machine::Phase;
use crate::model::{Node, NodeName, Time};
use crate::plan::in_scope;
use crate::ports::{Clock, Cluster, LockOutcome, NewCni, PortError, StateStore};
use crate::schedule::{InFlightNode, Limits, PendingNode, pick, window};

/// `namespace/name` of the Lease whose annotation [`FINAL_ANNOTATION`] holds the
/// [`FinalRecord`] on a real cluster.
pub const FINAL_LEASE: &str = "kube-system/cnimig-final";
/// The annotation on [`FINAL_LEASE`] holding the [`FinalRecord`] as JSON.
pub const FINAL_ANNOTATION: &str = "cnimig.io/final";

/// The last completed step of finalize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FinalStep {
    /// Every node in scope was Done; nothing changed yet.
    Started,
    /// The live `cilium-config` holds the final values.
    ConfigVerified,
    /// Every agent in scope restarted and is Ready with Cilium's CNI config.
    AgentsRestarted,
    /// The temporary Calico allow rule is gone.
    AllowRuleRemoved,
    /// The `CiliumNodeConfig` is deleted.
    NodeConfigDeleted,
    /// The migration label is off every node. Finalize succeeded.
    Done,
}

/// One agent restart in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRestart {
    /// UID of the agent pod deleted (the new one has another).
    pub from_uid: String,
    /// When the restart was decided.
    pub since: Time,
}

/// Finalize's and clean-up's progress, persisted before every action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalRecord {
    /// Last completed step.
    pub step: FinalStep,
    /// When finalize first started.
    pub started: Time,
    /// Agents being restarted.
    #[serde(default)]
    pub restarting: BTreeMap<NodeName, AgentRestart>,
    /// Nodes whose agent restarted and is Ready with Cilium's CNI config.
    #[serde(default)]
    pub restarted: BTreeSet<NodeName>,
    /// Clean-up's progress, once it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup: Option<CleanupRecord>,
}

impl FinalRecord {
    /// The annotation value.
    #[must_use]
    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
    /// Parses an annotation value.
    ///
    /// # Errors
    /// A message naming the problem when `value` is not a record.
    pub fn from_annotation(value: &str) -> Result<Self, String> {
        serde_json::from_str(value).map_err(|e| {
            format!(
                "the {FINAL_ANNOTATION} annotation on {FINAL_LEASE} is not a cnimig final record ({e}); if no cnimig run owns it, delete the Lease"
            )
        })
    }
}

/// Where finalize keeps its record, and the writes only finalize makes.
///
/// `#[async_trait]` like every port (used as `dyn`, futures `Send`).
#[async_trait]
pub trait FinalizePort: Send + Sync {
    /// The stored record, if any.
    ///
    /// # Errors
    /// Any read failure; [`PortError::Invalid`] when the stored record does not parse.
    async fn load_final(&self) -> Result<Option<FinalRecord>, PortError>;
    /// Replaces the record if it still is `prev` (compare-and-swap; `None` = no record).
    ///
    /// # Errors
    /// [`PortError::Conflict`] when the stored record differs from `prev`.
    async fn save_final(
        &self,
        prev: Option<&FinalRecord>,
        next: &FinalRecord,
    ) -> Result<(), PortError>;
    /// Deletes the `CiliumNodeConfig` `kube-system/<name>`. Already gone is success.
    ///
    /// # Errors
    /// Any write failure.
    async fn delete_node_config(&self, name: &str) -> Result<(), PortError>;
}

/// The ports finalize drives.
#[derive(Clone)]
pub struct FinalPorts {
    /// Nodes, labels, budgets.
    pub cluster: Arc<dyn Cluster>,
    /// Cilium: live config, agents.
    pub cilium: Arc<dyn NewCni>,
    /// Node records and the migration lock.
    pub store: Arc<dyn StateStore>,
    /// Finalize's own record and writes.
    pub finalize: Arc<dyn FinalizePort>,
    /// The temporary Calico allow rule.
    pub allow: Arc<dyn AllowRulePort>,
    /// Time.
    pub clock: Arc<dyn Clock>,
}

/// How finalize runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalOptions {
    /// Lock holder identity.
    pub holder: String,
    /// Lock time-to-live; renewed every third of it.
    pub lock_ttl: Duration,
    /// How long to wait for the live `cilium-config` to hold the final values.
    pub config_timeout: Duration,
    /// How long one agent may take to be Ready with Cilium's CNI config after its restart.
    pub agent_timeout: Duration,
    /// How often to look.
    pub poll_interval: Duration,
    /// Facts the values depend on (hostPort pods).
    pub inputs: ValueInputs,
}

impl Default for FinalOptions {
    fn default() -> Self {
        FinalOptions {
            holder: "cnimig".into(),
            lock_ttl: Duration::from_secs(60),
            config_timeout: Duration::from_secs(600),
            agent_timeout: Duration::from_secs(300),
            poll_interval: Duration::from_secs(2),
            inputs: ValueInputs::default(),
        }
    }
}

/// Why finalize refused or stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FinalizeError {
    /// Some node in scope is not Done. Nothing was changed.
    #[error("finalize refused, nothing was changed: every node in scope must be Done first; finish or roll back these and run the migration again:\n{}", .0.iter().map(|m| format!("  - {m}")).collect::<Vec<_>>().join("\n"))]
    NotMigrated(Vec<String>),
    /// Another run holds the migration lock.
    #[error(
        "another cnimig run ({holder}) holds the migration lock until {until}; wait for it, or if it died, retry after that time"
    )]
    Locked {
        /// The holder.
        holder: String,
        /// Expiry.
        until: Time,
    },
    /// The live config did not reach the final values in time.
    #[error("cilium-config does not hold the final values after {waited:?}; apply them with `helm upgrade` (see the final values) and run finalize again:\n{}", .mismatches.iter().map(|m| format!("  - {m}")).collect::<Vec<_>>().join("\n"))]
    ConfigNotFinal {
        /// How long finalize waited.
        waited: Duration,
        /// Every differing key.
        mismatches: Vec<ConfigMismatch>,
    },
    /// A node has no Cilium agent.
    #[error(
        "node {0} has no Cilium agent pod; check the cilium DaemonSet's scheduling and run finalize again"
    )]
    NoAgent(NodeName),
    /// An agent did not come back Ready with Cilium's CNI config in time.
    #[error(
        "the Cilium agent on node {node} is not Ready with Cilium's CNI config {waited:?} after its restart; look at the agent's logs, then run finalize again (it resumes)"
    )]
    AgentNotReady {
        /// The node.
        node: NodeName,
        /// How long finalize waited.
        waited: Duration,
    },
    /// The stored record is unreadable or another writer changed it.
    #[error("{0}")]
    BadState(String),
    /// A port failed; running finalize again resumes.
    #[error("{what}: {source}; run again to resume")]
    Port {
        /// What was attempted.
        what: String,
        /// The failure.
        source: PortError,
    },
}

fn port(what: impl Into<String>) -> impl FnOnce(PortError) -> FinalizeError {
    let what = what.into();
    move |source| FinalizeError::Port { what, source }
}

/// What a successful finalize did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalReport {
    /// The nodes in scope.
    pub nodes: Vec<NodeName>,
    /// Agents restarted by this run (a resumed run counts only its own).
    pub restarted_now: usize,
    /// Largest number of agents restarting at once in this run.
    pub max_in_flight_seen: usize,
}

/// The final Helm values (for `helm upgrade`), as YAML.
#[must_use]
pub fn final_values_yaml(cfg: &MigrationConfig, inputs: ValueInputs) -> String {
    helm_values_yaml(cfg, inputs, CiliumPhase::Final)
}

/// Checks, without writing, that every node in scope is Done. Returns the nodes in scope, or
/// one line per node that is not.
///
/// # Errors
/// A port failure.
pub async fn nodes_in_scope_done(
    cluster: &dyn Cluster,
    store: &dyn StateStore,
    cfg: &MigrationConfig,
) -> Result<Result<Vec<Node>, Vec<String>>, PortError> {
    let inv = cluster.inventory().await?;
    let records = store.load().await?;
    let mut nodes: Vec<Node> = inv
        .nodes
        .into_iter()
        .filter(|n| in_scope(&cfg.scope, n))
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let bad: Vec<String> = nodes
        .iter()
        .filter_map(|n| match records.get(&n.name).map(|r| r.phase) {
            Some(Phase::Done) => None,
            Some(p) => Some(format!("node {} is {p}", n.name)),
            None => Some(format!("node {} was never migrated (no record)", n.name)),
        })
        .collect();
    Ok(if bad.is_empty() { Ok(nodes) } else { Err(bad) })
}

/// Runs finalize.
pub struct Finalizer {
    ports: FinalPorts,
    cfg: MigrationConfig,
    opts: FinalOptions,
}

impl Finalizer {
    /// A finalizer over these ports.
    #[must_use]
    pub fn new(ports: FinalPorts, cfg: MigrationConfig, opts: FinalOptions) -> Self {
        Finalizer { ports, cfg, opts }
    }

    /// The final Helm values, as YAML.
    #[must_use]
    pub fn values_yaml(&self) -> String {
        final_values_yaml(&self.cfg, self.opts.inputs)
    }

    /// Runs (or resumes) finalize; see the module docs for the steps. Finalize already done
    /// returns at once.
    ///
    /// # Errors
    /// [`FinalizeError`]: a refusal (nothing changed), the lock held elsewhere, the config not
    /// final in time (every differing key named), an agent not Ready in time, a port failure.
    pub async fn finalize(&self) -> Result<FinalReport, FinalizeError> {
        let p = &self.ports;
        // Refuse before any write, the lock included.
        let nodes = match nodes_in_scope_done(p.cluster.as_ref(), p.store.as_ref(), &self.cfg)
            .await
            .map_err(port("read nodes and their records"))?
        {
            Ok(n) => n,
            Err(bad) => return Err(FinalizeError::NotMigrated(bad)),
        };
        let mut lock = Lock::take(p, &self.opts).await?;
        let result = self.locked(&nodes, &mut lock).await;
        // A release that fails only delays the next run until the lock expires.
        if result.is_ok() {
            let _ = p.store.release_lock(&self.opts.holder).await;
        }
        result
    }

    async fn locked(&self, nodes: &[Node], lock: &mut Lock) -> Result<FinalReport, FinalizeError> {
        let p = &self.ports;
        let stored = p
            .finalize
            .load_final()
            .await
            .map_err(port("read the final record"))?;
        let mut rec = match stored {
            Some(r) => r,
            None => {
                let r = FinalRecord {
                    step: FinalStep::Started,
                    started: p.clock.now(),
                    restarting: BTreeMap::new(),
                    restarted: BTreeSet::new(),
                    cleanup: None,
                };
                self.save(None, &r).await?;
                r
            }
        };
        let names: Vec<NodeName> = nodes.iter().map(|n| n.name.clone()).collect();
        let mut report = FinalReport {
            nodes: names.clone(),
            restarted_now: 0,
            max_in_flight_seen: 0,
        };
        if rec.step < FinalStep::ConfigVerified {
            self.wait_for_config(lock).await?;
            rec = self.advance(&rec, FinalStep::ConfigVerified).await?;
        }
        if rec.step < FinalStep::AgentsRestarted {
            rec = self.restart_agents(nodes, rec, lock, &mut report).await?;
            rec = self.advance(&rec, FinalStep::AgentsRestarted).await?;
        }
        if rec.step < FinalStep::AllowRuleRemoved {
            lock.renew(p, &self.opts).await?;
            p.allow
                .remove_allow_rule()
                .await
                .map_err(port("remove the temporary Calico allow rule"))?;
            rec = self.advance(&rec, FinalStep::AllowRuleRemoved).await?;
        }
        if rec.step < FinalStep::NodeConfigDeleted {
            lock.renew(p, &self.opts).await?;
            p.finalize
                .delete_node_config(&self.cfg.node_config_name)
                .await
                .map_err(port(format!(
                    "delete CiliumNodeConfig kube-system/{}",
                    self.cfg.node_config_name
                )))?;
            rec = self.advance(&rec, FinalStep::NodeConfigDeleted).await?;
        }
        if rec.step < FinalStep::Done {
            for n in nodes {
                lock.renew(p, &self.opts).await?;
                let view = p
                    .cluster
                    .node_view(&n.name)
                    .await
                    .map_err(port(format!("read node {}", n.name)))?;
                if view.node.labels.contains_key(&self.cfg.migration_label) {
                    p.cluster
                        .set_node_label(&n.name, &self.cfg.migration_label, None)
                        .await
                        .map_err(port(format!(
                            "remove label {} from node {}",
                            self.cfg.migration_label, n.name
                        )))?;
                }
            }
            self.advance(&rec, FinalStep::Done).await?;
        }
        Ok(report)
    }

    async fn save(
        &self,
        prev: Option<&FinalRecord>,
        next: &FinalRecord,
    ) -> Result<(), FinalizeError> {
        self.ports
            .finalize
            .save_final(prev, next)
            .await
            .map_err(|e| match e {
                PortError::Conflict { .. } => FinalizeError::BadState(format!(
                    "the final record on {FINAL_LEASE} was changed by someone else ({e}); make sure no other cnimig run is active, then run again"
                )),
                other => FinalizeError::Port {
                    what: "save the final record".into(),
                    source: other,
                },
            })
    }

    async fn advance(
        &self,
        rec: &FinalRecord,
        step: FinalStep,
    ) -> Result<FinalRecord, FinalizeError> {
        let mut next = rec.clone();
        next.step = step;
        self.save(Some(rec), &next).await?;
        Ok(next)
    }

    async fn wait_for_config(&self, lock: &mut Lock) -> Result<(), FinalizeError> {
        let p = &self.ports;
        let start = p.clock.now();
        loop {
            lock.renew(p, &self.opts).await?;
            let live = p
                .cilium
                .live_config()
                .await
                .map_err(port("read kube-system/cilium-config"))?;
            let mismatches =
                check_live_config(&live, &self.cfg, self.opts.inputs, CiliumPhase::Final);
            if mismatches.is_empty() {
                return Ok(());
            }
            let now = p.clock.now();
            if now.since(start) >= self.opts.config_timeout {
                return Err(FinalizeError::ConfigNotFinal {
                    waited: now.since(start),
                    mismatches,
                });
            }
            p.clock
                .sleep_until(now.after(self.opts.poll_interval))
                .await;
        }
    }

    async fn restart_agents(
        &self,
        nodes: &[Node],
        mut rec: FinalRecord,
        lock: &mut Lock,
        report: &mut FinalReport,
    ) -> Result<FinalRecord, FinalizeError> {
        let p = &self.ports;
        let limits = Limits {
            max_in_flight: self.cfg.max_in_flight.max(1),
            control_plane_last: self.cfg.control_plane_last,
        };
        let by_name: BTreeMap<&NodeName, &Node> = nodes.iter().map(|n| (&n.name, n)).collect();
        loop {
            lock.renew(p, &self.opts).await?;
            // Look at the restarts in flight.
            let in_flight: Vec<(NodeName, AgentRestart)> = rec
                .restarting
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (node, restart) in in_flight {
                let agent = p
                    .cilium
                    .agent(&node)
                    .await
                    .map_err(port(format!("read the Cilium agent on node {node}")))?;
                let now = p.clock.now();
                match agent {
                    // The restart did not land (a killed run): send it again (keyed by UID).
                    Some(a) if a.pod_uid == restart.from_uid => {
                        p.cilium
                            .restart_agent(&node, &a.pod_uid)
                            .await
                            .map_err(port(format!("restart the Cilium agent on node {node}")))?;
                    }
                    Some(a) if a.ready => {
                        let dir = p
                            .cilium
                            .cni_dir(&node)
                            .await
                            .map_err(port(format!("read /etc/cni/net.d on node {node}")))?;
                        if dir.cilium_conflist {
                            let mut next = rec.clone();
                            next.restarting.remove(&node);
                            next.restarted.insert(node.clone());
                            self.save(Some(&rec), &next).await?;
                            rec = next;
                            continue;
                        }
                    }
                    _ => {}
                }
                if now.since(restart.since) >= self.opts.agent_timeout {
                    return Err(FinalizeError::AgentNotReady {
                        node,
                        waited: now.since(restart.since),
                    });
                }
            }
            let pending: Vec<PendingNode> = nodes
                .iter()
                .filter(|n| {
                    !rec.restarted.contains(&n.name) && !rec.restarting.contains_key(&n.name)
                })
                .map(|n| PendingNode {
                    name: n.name.clone(),
                    zone: n.zone.clone(),
                    control_plane: n.is_control_plane(),
                })
                .collect();
            if pending.is_empty() && rec.restarting.is_empty() {
                return Ok(rec);
            }
            let flying: Vec<InFlightNode> = rec
                .restarting
                .keys()
                .map(|name| InFlightNode {
                    name: name.clone(),
                    zone: by_name.get(name).and_then(|n| n.zone.clone()),
                    control_plane: by_name.get(name).is_some_and(|n| n.is_control_plane()),
                    draining: false,
                })
                .collect();
            if !pending.is_empty() && flying.len() < limits.max_in_flight as usize {
                let ask: Vec<NodeName> = pending
                    .iter()
                    .take(window(limits, flying.len()))
                    .map(|n| n.name.clone())
                    .collect();
                let budgets = p
                    .cluster
                    .budget_view(&ask)
                    .await
                    .map_err(port("read PodDisruptionBudgets"))?;
                let picks = pick(&pending, &flying, &budgets, limits);
                for node in picks.start {
                    let agent = p
                        .cilium
                        .agent(&node)
                        .await
                        .map_err(port(format!("read the Cilium agent on node {node}")))?
                        .ok_or_else(|| FinalizeError::NoAgent(node.clone()))?;
                    let mut next = rec.clone();
                    next.restarting.insert(
                        node.clone(),
                        AgentRestart {
                            from_uid: agent.pod_uid.clone(),
                            since: p.clock.now(),
                        },
                    );
                    self.save(Some(&rec), &next).await?;
                    rec = next;
                    p.cilium
                        .restart_agent(&node, &agent.pod_uid)
                        .await
                        .map_err(port(format!("restart the Cilium agent on node {node}")))?;
                    report.restarted_now += 1;
                }
                report.max_in_flight_seen = report.max_in_flight_seen.max(rec.restarting.len());
            }
            let now = p.clock.now();
            p.clock
                .sleep_until(now.after(self.opts.poll_interval))
                .await;
        }
    }
}

/// The migration lock, held for the run and renewed every third of its time-to-live. Shared by
/// finalize and clean-up.
pub(crate) struct Lock {
    last: Time,
}

impl Lock {
    pub(crate) async fn take(p: &FinalPorts, opts: &FinalOptions) -> Result<Lock, FinalizeError> {
        let now = p.clock.now();
        match p
            .store
            .acquire_lock(&opts.holder, now, opts.lock_ttl)
            .await
            .map_err(port("take the migration lock"))?
        {
            LockOutcome::Acquired => Ok(Lock { last: now }),
            LockOutcome::HeldBy { holder, until } => Err(FinalizeError::Locked { holder, until }),
        }
    }

    pub(crate) async fn renew(
        &mut self,
        p: &FinalPorts,
        opts: &FinalOptions,
    ) -> Result<(), FinalizeError> {
        let now = p.clock.now();
        if now.since(self.last) < opts.lock_ttl / 3 {
            return Ok(());
        }
        if now.since(self.last) >= opts.lock_ttl {
            return Err(FinalizeError::BadState(format!(
                "this run ({}) did not renew the migration lock before it expired; another run may have acted since: run again to resume",
                opts.holder
            )));
        }
        match p
            .store
            .acquire_lock(&opts.holder, now, opts.lock_ttl)
            .await
            .map_err(port("renew the migration lock"))?
        {
            LockOutcome::Acquired => {
                self.last = now;
                Ok(())
            }
            LockOutcome::HeldBy { holder, until } => Err(FinalizeError::Locked { holder, until }),
        }
    }
}
