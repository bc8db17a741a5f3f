//! Clean-up: remove Calico once finalize succeeded.
//!
//! [`Cleaner::clean_up`] refuses unless finalize's record says [`FinalStep::Done`] and every
//! node holds a Done record, then, each step persisted in the [`FinalRecord`] before it acts:
//! 1. deletes Calico's objects in the order its install kind needs ([`removal_order`]);
//! 2. runs, on every node, a privileged helper pod with the `sh` program [`render_script`]
//!    produces from typed [`FlushAction`]s ([`node_flush_actions`]), at most `max_in_flight`
//!    nodes at once, each helper deleted once it succeeded;
//! 3. deletes Calico's CRDs.
//!
//! Like finalize, a failed or killed run resumes by running it again; every action is idempotent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::MigrationConfig;
use crate::finalize::{FinalOptions, FinalPorts, FinalRecord, FinalStep, FinalizeError, Lock};
use crate::machine::Phase;
use crate::model::{CalicoInstall, NodeName, Time};
use crate::ports::{OldCni, PortError};

/// One Calico object (or group of objects) clean-up deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CalicoObject {
    /// `operator.tigera.io/v1` `Installation` `default` (the operator then removes calico-node).
    Installation,
    /// `operator.tigera.io/v1` `APIServer` `default`.
    ApiServer,
    /// The `tigera-operator/tigera-operator` Deployment.
    OperatorDeployment,
    /// Namespaces `calico-system`, `calico-apiserver`, `tigera-operator`.
    Namespaces,
    /// DaemonSet `kube-system/calico-node` (manifest installs).
    NodeDaemonSet,
    /// Deployment `kube-system/calico-kube-controllers` (manifest installs).
    KubeControllers,
    /// ConfigMap `kube-system/calico-config` (manifest installs).
    CalicoConfig,
}

/// The order to delete Calico's objects in, by install kind. The CRDs come after the nodes are
/// flushed.
#[must_use]
pub fn removal_order(install: CalicoInstall) -> &'static [CalicoObject] {
    match install {
        CalicoInstall::Operator => &[
            CalicoObject::Installation,
            CalicoObject::ApiServer,
            CalicoObject::OperatorDeployment,
            CalicoObject::Namespaces,
        ],
        CalicoInstall::Manifest => &[
            CalicoObject::NodeDaemonSet,
            CalicoObject::KubeControllers,
            CalicoObject::CalicoConfig,
        ],
    }
}

/// An iptables back end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IptablesBackend {
    /// `iptables-legacy`.
    Legacy,
    /// `iptables-nft`.
    Nft,
}

impl IptablesBackend {
    fn command(self) -> &'static str {
        match self {
            IptablesBackend::Legacy => "iptables-legacy",
            IptablesBackend::Nft => "iptables-nft",
        }
    }
}

/// One thing the node helper does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlushAction {
    /// In `table` on `backend`: delete the rules outside `prefix*` chains that jump to a
    /// `prefix*` chain or carry a `comment` starting with `comment_prefix`, then flush and delete
    /// every `prefix*` chain.
    Iptables {
        /// Back end.
        backend: IptablesBackend,
        /// `filter`, `nat`, `mangle` or `raw`.
        table: String,
        /// Chain name prefix (`cali-`).
        chain_prefix: String,
        /// Rule comment prefix (`cali:`).
        comment_prefix: String,
    },
    /// Delete every route with this `proto` (`bird`).
    RoutesByProto {
        /// The routing protocol.
        proto: String,
    },
    /// Delete a network interface if present.
    Link {
        /// The interface.
        name: String,
    },
    /// Remove the entries of `dir` matching `glob` (a shell pattern of `[A-Za-z0-9._*-]`).
    Files {
        /// Directory (as mounted in the helper, the same path as on the host).
        dir: String,
        /// Entry pattern.
        glob: String,
    },
}

/// The actions that remove Calico's leftovers from a node (FACTS.md, "Leftovers after removing
/// Calico").
#[must_use]
pub fn node_flush_actions() -> Vec<FlushAction> {
    let mut out = Vec::new();
    for backend in [IptablesBackend::Legacy, IptablesBackend::Nft] {
        for table in ["filter", "nat", "mangle", "raw"] {
            out.push(FlushAction::Iptables {
                backend,
                table: table.into(),
                chain_prefix: "cali-".into(),
                comment_prefix: "cali:".into(),
            });
        }
    }
    out.push(FlushAction::RoutesByProto {
        proto: "bird".into(),
    });
    out.push(FlushAction::Link {
        name: "tunl0".into(),
    });
    out.push(FlushAction::Link {
        name: "vxlan.calico".into(),
    });
    out.push(FlushAction::Files {
        dir: "/etc/cni/net.d".into(),
        glob: "*calico*".into(),
    });
    out.push(FlushAction::Files {
        dir: "/opt/cni/bin".into(),
        glob: "calico*".into(),
    });
    out.push(FlushAction::Files {
        dir: "/var/lib/calico".into(),
        glob: "*".into(),
    });
    out
}

/// The host paths the helper mounts (at the same paths), and nothing else.
pub const HELPER_HOST_PATHS: [&str; 4] = [
    "/etc/cni/net.d",
    "/opt/cni/bin",
    "/var/lib/calico",
    "/run/xtables.lock",
];

/// The last line a successful helper prints.
pub const FLUSH_DONE_MARKER: &str = "cnimig-flush-done";

/// Quotes `s` for `sh` (single quotes; a single quote becomes `'\''`).
#[must_use]
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn glob_ok(g: &str) -> bool {
    !g.is_empty()
        && g.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '*' | '-'))
        && g != "."
        && g != ".."
}

/// A flush action that cannot be rendered safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("flush action {action}: {problem}")]
pub struct BadAction {
    /// The action.
    pub action: String,
    /// What is wrong with it.
    pub problem: String,
}

const PRELUDE: &str = r#"#!/bin/sh
# Generated by cnimig: removes Calico's leftovers from this node.
set -u
cnimig_iptables() {
  cmd=$1; table=$2; chains=$3; comment=$4
  if ! command -v "$cmd-save" >/dev/null 2>&1; then
    echo "skip $cmd $table: $cmd-save not found"; return 0
  fi
  "$cmd-save" -t "$table" 2>/dev/null | grep '^-A ' | grep -v "^-A $chains" \
    | grep -e "-j $chains" -e "--comment \"\{0,1\}$comment" | sed 's/^-A /-D /' \
    | while IFS= read -r rule; do
        eval "\"\$cmd\" -w -t \"\$table\" $rule" || echo "could not delete: $rule"
      done
  for op in -F -X; do
    "$cmd-save" -t "$table" 2>/dev/null | grep "^:$chains" | cut -d' ' -f1 | cut -c2- \
      | while IFS= read -r chain; do
          "$cmd" -w -t "$table" "$op" "$chain" || echo "could not $op $chain"
        done
  done
}
cnimig_files() {
  dir=$1; pattern=$2
  [ -d "$dir" ] || return 0
  cd "$dir" || return 1
  for f in $pattern; do
    [ -e "$f" ] || [ -L "$f" ] || continue
    rm -rf -- "$f" && echo "removed $dir/$f"
  done
  cd / || return 1
}
"#;

/// Renders the helper's `sh` program. Every value is quoted; globs are restricted to
/// `[A-Za-z0-9._*-]` (they must stay unquoted to expand).
///
/// # Errors
/// [`BadAction`] for an action with an unsafe glob, a relative directory, or an empty name.
pub fn render_script(actions: &[FlushAction]) -> Result<String, BadAction> {
    let mut out = String::from(PRELUDE);
    for a in actions {
        let bad = |problem: &str| BadAction {
            action: format!("{a:?}"),
            problem: problem.into(),
        };
        match a {
            FlushAction::Iptables {
                backend,
                table,
                chain_prefix,
                comment_prefix,
            } => {
                if table.is_empty() || chain_prefix.is_empty() || comment_prefix.is_empty() {
                    return Err(bad("table and prefixes must not be empty"));
                }
                if !chain_prefix
                    .chars()
                    .chain(table.chars())
                    .chain(comment_prefix.chars())
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':'))
                {
                    return Err(bad(
                        "table and prefixes may hold only letters, digits, '-', '_' and ':' (they are used in patterns)",
                    ));
                }
                out.push_str(&format!(
                    "cnimig_iptables {} {} {} {}\n",
                    sh_quote(backend.command()),
                    sh_quote(table),
                    sh_quote(chain_prefix),
                    sh_quote(comment_prefix)
                ));
            }
            FlushAction::RoutesByProto { proto } => {
                if proto.is_empty() {
                    return Err(bad("empty proto"));
                }
                out.push_str(&format!(
                    "ip route flush proto {} || echo 'could not flush routes'\n",
                    sh_quote(proto)
                ));
            }
            FlushAction::Link { name } => {
                if name.is_empty() {
                    return Err(bad("empty interface name"));
                }
                let q = sh_quote(name);
                out.push_str(&format!(
                    "if ip link show {q} >/dev/null 2>&1; then ip link delete {q} || ip link set {q} down || echo 'could not remove link'; fi\n"
                ));
            }
            FlushAction::Files { dir, glob } => {
                if !dir.starts_with('/') {
                    return Err(bad("the directory must be absolute"));
                }
                if !glob_ok(glob) {
                    return Err(bad(
                        "the pattern may hold only letters, digits, '.', '_', '-' and '*'",
                    ));
                }
                out.push_str(&format!("cnimig_files {} {glob}\n", sh_quote(dir)));
            }
        }
    }
    out.push_str(&format!("echo {}\n", sh_quote(FLUSH_DONE_MARKER)));
    Ok(out)
}

/// The node helper's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelperStatus {
    /// No helper pod on the node.
    Absent,
    /// Created, not finished.
    Running,
    /// Finished successfully.
    Succeeded,
    /// Failed; the message says why (its log's tail).
    Failed(String),
}

/// The writes only clean-up makes.
///
/// `#[async_trait]` like every port (used as `dyn`, futures `Send`).
#[async_trait]
pub trait CleanupPort: Send + Sync {
    /// Deletes one Calico object (group). Already gone is success.
    ///
    /// # Errors
    /// Any write failure.
    async fn delete_calico_object(&self, object: CalicoObject) -> Result<(), PortError>;
    /// Starts the helper on `node` running `script`. A helper already there is success.
    ///
    /// # Errors
    /// Any write failure.
    async fn start_helper(&self, node: &NodeName, script: &str) -> Result<(), PortError>;
    /// The helper's state on `node`.
    ///
    /// # Errors
    /// Any read failure.
    async fn helper_status(&self, node: &NodeName) -> Result<HelperStatus, PortError>;
    /// Deletes the helper on `node`. Already gone is success.
    ///
    /// # Errors
    /// Any write failure.
    async fn delete_helper(&self, node: &NodeName) -> Result<(), PortError>;
    /// Deletes the CRDs in `crd.projectcalico.org` and `operator.tigera.io`.
    ///
    /// # Errors
    /// Any write failure.
    async fn delete_calico_crds(&self) -> Result<(), PortError>;
}

/// Clean-up's step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CleanupStep {
    /// Deleting the object at this index of [`removal_order`].
    Objects(usize),
    /// Flushing nodes.
    Flush,
    /// Deleting the CRDs.
    Crds,
    /// Clean-up succeeded.
    Done,
}

/// Clean-up's progress (inside the [`FinalRecord`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupRecord {
    /// How Calico was installed (read once, before anything was removed).
    pub install: CalicoInstall,
    /// The step under way.
    pub step: CleanupStep,
    /// Nodes whose helper was started, and when.
    #[serde(default)]
    pub flushing: BTreeMap<NodeName, Time>,
    /// Nodes flushed (helper succeeded and deleted).
    #[serde(default)]
    pub flushed: BTreeSet<NodeName>,
}

/// Why clean-up refused or stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CleanupError {
    /// Finalize has not succeeded. Nothing was changed.
    #[error(
        "clean-up refused, nothing was changed: finalize has not succeeded ({0}); run finalize first"
    )]
    NotFinalized(String),
    /// A node is not migrated. Nothing was changed.
    #[error("clean-up refused, nothing was changed: Calico still serves these nodes:\n{}", .0.iter().map(|m| format!("  - {m}")).collect::<Vec<_>>().join("\n"))]
    NodesNotMigrated(Vec<String>),
    /// A node's helper failed.
    #[error(
        "the clean-up helper on node {node} failed: {detail}; its pod is kept for inspection: delete it and run clean-up again"
    )]
    HelperFailed {
        /// The node.
        node: NodeName,
        /// Why.
        detail: String,
    },
    /// A node's helper did not finish in time.
    #[error(
        "the clean-up helper on node {node} has not finished after {waited:?}; look at its pod, then run clean-up again"
    )]
    HelperTimeout {
        /// The node.
        node: NodeName,
        /// How long.
        waited: Duration,
    },
    /// The script could not be rendered.
    #[error("{0}")]
    Script(#[from] BadAction),
    /// As for finalize: lock, record, port failures.
    #[error(transparent)]
    Run(#[from] FinalizeError),
}

fn port(what: impl Into<String>) -> impl FnOnce(PortError) -> CleanupError {
    let what = what.into();
    move |source| CleanupError::Run(FinalizeError::Port { what, source })
}

/// What clean-up did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// Nodes flushed by this run.
    pub flushed_now: usize,
    /// Largest number of helpers at once in this run.
    pub max_in_flight_seen: usize,
}

/// Runs clean-up.
pub struct Cleaner {
    ports: FinalPorts,
    calico: Arc<dyn OldCni>,
    cleanup: Arc<dyn CleanupPort>,
    cfg: MigrationConfig,
    opts: FinalOptions,
    helper_timeout: Duration,
}

impl Cleaner {
    /// A cleaner over these ports; `helper_timeout` bounds each node's helper.
    #[must_use]
    pub fn new(
        ports: FinalPorts,
        calico: Arc<dyn OldCni>,
        cleanup: Arc<dyn CleanupPort>,
        cfg: MigrationConfig,
        opts: FinalOptions,
        helper_timeout: Duration,
    ) -> Self {
        Cleaner {
            ports,
            calico,
            cleanup,
            cfg,
            opts,
            helper_timeout,
        }
    }

    /// The `sh` program every node's helper runs.
    ///
    /// # Errors
    /// Never for the built-in actions; [`BadAction`] if they were unsafe.
    pub fn script(&self) -> Result<String, BadAction> {
        render_script(&node_flush_actions())
    }

    /// Runs (or resumes) clean-up; see the module docs. Already done returns at once.
    ///
    /// # Errors
    /// [`CleanupError`]: refusals (nothing changed), a helper failing or timing out, lock,
    /// record and port failures.
    pub async fn clean_up(&self) -> Result<CleanupReport, CleanupError> {
        let p = &self.ports;
        let script = self.script()?;
        // Refuse before any write.
        let rec = p
            .finalize
            .load_final()
            .await
            .map_err(port("read the final record"))?;
        let rec = match rec {
            Some(r) if r.step == FinalStep::Done => r,
            Some(r) => {
                return Err(CleanupError::NotFinalized(format!(
                    "its last step is {:?}",
                    r.step
                )));
            }
            None => return Err(CleanupError::NotFinalized("it never ran".into())),
        };
        let records = p.store.load().await.map_err(port("read node records"))?;
        let nodes = p.cluster.node_names().await.map_err(port("list nodes"))?;
        let bad: Vec<String> = nodes
            .iter()
            .filter_map(|n| match records.get(n).map(|r| r.phase) {
                Some(Phase::Done) => None,
                Some(ph) => Some(format!("node {n} is {ph}")),
                None => Some(format!("node {n} was never migrated")),
            })
            .collect();
        if !bad.is_empty() {
            return Err(CleanupError::NodesNotMigrated(bad));
        }
        let mut lock = Lock::take(p, &self.opts).await?;
        let out = self.locked(rec, &nodes, &script, &mut lock).await;
        if out.is_ok() {
            let _ = p.store.release_lock(&self.opts.holder).await;
        }
        out
    }

    async fn save(
        &self,
        prev: &FinalRecord,
        c: CleanupRecord,
    ) -> Result<FinalRecord, CleanupError> {
        let mut next = prev.clone();
        next.cleanup = Some(c);
        self.ports
            .finalize
            .save_final(Some(prev), &next)
            .await
            .map_err(|e| match e {
                PortError::Conflict { .. } => CleanupError::Run(FinalizeError::BadState(format!(
                    "the final record was changed by someone else ({e}); make sure no other cnimig run is active, then run again"
                ))),
                other => port("save the final record")(other),
            })?;
        Ok(next)
    }

    async fn locked(
        &self,
        mut rec: FinalRecord,
        nodes: &[NodeName],
        script: &str,
        lock: &mut Lock,
    ) -> Result<CleanupReport, CleanupError> {
        let p = &self.ports;
        let mut report = CleanupReport {
            flushed_now: 0,
            max_in_flight_seen: 0,
        };
        let mut c = match rec.cleanup.clone() {
            Some(c) => c,
            None => {
                let facts = self
                    .calico
                    .facts()
                    .await
                    .map_err(port("read Calico's install"))?;
                let c = CleanupRecord {
                    install: facts.install,
                    step: CleanupStep::Objects(0),
                    flushing: BTreeMap::new(),
                    flushed: BTreeSet::new(),
                };
                rec = self.save(&rec, c.clone()).await?;
                c
            }
        };
        let order = removal_order(c.install);
        while let CleanupStep::Objects(i) = c.step {
            lock.renew(p, &self.opts).await?;
            let Some(obj) = order.get(i) else {
                c.step = CleanupStep::Flush;
                rec = self.save(&rec, c.clone()).await?;
                break;
            };
            self.cleanup
                .delete_calico_object(*obj)
                .await
                .map_err(port(format!("delete Calico {obj:?}")))?;
            c.step = CleanupStep::Objects(i + 1);
            rec = self.save(&rec, c.clone()).await?;
        }
        if c.step == CleanupStep::Flush {
            let max = self.cfg.max_in_flight.max(1) as usize;
            loop {
                lock.renew(p, &self.opts).await?;
                let flying: Vec<(NodeName, Time)> =
                    c.flushing.iter().map(|(k, v)| (k.clone(), *v)).collect();
                for (node, since) in flying {
                    let now = p.clock.now();
                    match self
                        .cleanup
                        .helper_status(&node)
                        .await
                        .map_err(port(format!("read the helper on node {node}")))?
                    {
                        HelperStatus::Succeeded => {
                            self.cleanup
                                .delete_helper(&node)
                                .await
                                .map_err(port(format!("delete the helper on node {node}")))?;
                            c.flushing.remove(&node);
                            c.flushed.insert(node.clone());
                            rec = self.save(&rec, c.clone()).await?;
                            report.flushed_now += 1;
                        }
                        HelperStatus::Failed(detail) => {
                            return Err(CleanupError::HelperFailed { node, detail });
                        }
                        // A helper recorded but never created (a killed run): create it.
                        HelperStatus::Absent => {
                            self.cleanup
                                .start_helper(&node, script)
                                .await
                                .map_err(port(format!("start the helper on node {node}")))?;
                        }
                        HelperStatus::Running => {
                            if now.since(since) >= self.helper_timeout {
                                return Err(CleanupError::HelperTimeout {
                                    node,
                                    waited: now.since(since),
                                });
                            }
                        }
                    }
                }
                let pending: Vec<&NodeName> = nodes
                    .iter()
                    .filter(|n| !c.flushed.contains(*n) && !c.flushing.contains_key(*n))
                    .collect();
                if pending.is_empty() && c.flushing.is_empty() {
                    break;
                }
                for node in pending
                    .into_iter()
                    .take(max.saturating_sub(c.flushing.len()))
                {
                    c.flushing.insert(node.clone(), p.clock.now());
                    rec = self.save(&rec, c.clone()).await?;
                    self.cleanup
                        .start_helper(node, script)
                        .await
                        .map_err(port(format!("start the helper on node {node}")))?;
                }
                report.max_in_flight_seen = report.max_in_flight_seen.max(c.flushing.len());
                let now = p.clock.now();
                p.clock
                    .sleep_until(now.after(self.opts.poll_interval))
                    .await;
            }
            c.step = CleanupStep::Crds;
            rec = self.save(&rec, c.clone()).await?;
        }
        if c.step == CleanupStep::Crds {
            lock.renew(p, &self.opts).await?;
            self.cleanup
                .delete_calico_crds()
                .await
                .map_err(port("delete Calico's CRDs"))?;
            c.step = CleanupStep::Done;
            self.save(&rec, c).await?;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_order_follows_the_install_kind() {
        assert_eq!(
            removal_order(CalicoInstall::Operator)[0],
            CalicoObject::Installation
        );
        assert_eq!(
            removal_order(CalicoInstall::Manifest),
            &[
                CalicoObject::NodeDaemonSet,
                CalicoObject::KubeControllers,
                CalicoObject::CalicoConfig
            ]
        );
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }

    #[test]
    fn unsafe_actions_are_refused() {
        let e = render_script(&[FlushAction::Files {
            dir: "/etc".into(),
            glob: "*; rm -rf /".into(),
        }]);
        assert!(e.is_err());
        let e = render_script(&[FlushAction::Files {
            dir: "etc".into(),
            glob: "*".into(),
        }]);
        assert!(e.is_err());
        let e = render_script(&[FlushAction::Iptables {
            backend: IptablesBackend::Nft,
            table: "filter".into(),
            chain_prefix: "cali-$(x)".into(),
            comment_prefix: "cali:".into(),
        }]);
        assert!(e.is_err());
    }

    #[test]
    fn the_script_covers_every_leftover_and_parses_with_sh_n() {
        let s = render_script(&node_flush_actions()).unwrap();
        for table in ["filter", "nat", "mangle", "raw"] {
            assert!(s.contains(&format!(
                "cnimig_iptables 'iptables-legacy' '{table}' 'cali-' 'cali:'"
            )));
            assert!(s.contains(&format!(
                "cnimig_iptables 'iptables-nft' '{table}' 'cali-' 'cali:'"
            )));
        }
        assert!(s.contains("ip route flush proto 'bird'"));
        assert!(s.contains("ip link delete 'tunl0'"));
        assert!(s.contains("ip link delete 'vxlan.calico'"));
        assert!(s.contains("cnimig_files '/etc/cni/net.d' *calico*"));
        assert!(s.contains("cnimig_files '/opt/cni/bin' calico*"));
        assert!(s.contains("cnimig_files '/var/lib/calico' *"));
        assert!(s.trim_end().ends_with("echo 'cnimig-flush-done'"));
        let dir = std::env::temp_dir().join(format!("cnimig-flush-{}.sh", std::process::id()));
        std::fs::write(&dir, &s).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-n")
            .arg(&dir)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // And a deliberately broken program fails `sh -n`, so the check can fail.
        let bad = std::env::temp_dir().join(format!("cnimig-bad-{}.sh", std::process::id()));
        std::fs::write(&bad, "if then fi\n").unwrap();
        let out = std::process::Command::new("sh")
            .arg("-n")
            .arg(&bad)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&bad);
        assert!(!out.status.success());
    }

    #[test]
    fn the_file_helper_removes_only_matching_entries() {
        // Run the rendered file action for real, in a temporary directory.
        let dir = std::env::temp_dir().join(format!("cnimig-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "10-calico.conflist",
            "10-calico.conflist.cilium_bak",
            "calico-kubeconfig",
            "05-cilium.conflist",
        ] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let s = render_script(&[FlushAction::Files {
            dir: dir.to_string_lossy().into_owned(),
            glob: "*calico*".into(),
        }])
        .unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&s)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(left, vec!["05-cilium.conflist".to_string()]);
        assert!(String::from_utf8_lossy(&out.stdout).contains(FLUSH_DONE_MARKER));
    }
}
