//! [`SimFinal`]: the finalize, clean-up and allow-rule ports on a [`SimCluster`].
//!
//! Calls are counted in [`SimStats::api_calls`](crate::SimStats) and subject to the same
//! injected faults and cut-offs ([`SimCluster::cut_off_after`]) as the cluster's own ports.
//! Calico's objects start as the scenario's install kind has them; a node helper succeeds a
//! fixed [`SimFinal::HELPER_RUN`] after it was created, and marks the node flushed then.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use cnimig_core::allow::AllowRulePort;
use cnimig_core::cleanup::{CalicoObject, CleanupPort, FLUSH_DONE_MARKER, HelperStatus};
use cnimig_core::finalize::{FinalRecord, FinalizePort};
use cnimig_core::model::{CalicoInstall, NodeName, Time};
use cnimig_core::ports::PortError;
use ipnet::Ipv4Net;

use crate::faults::{Call, Injected};
use crate::sim::SimCluster;

/// Everything the finalize and clean-up ports change, for tests to look at.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FinalView {
    /// The stored final record, as stored (JSON).
    pub record: Option<String>,
    /// Calico objects still present.
    pub calico_objects: BTreeSet<CalicoObject>,
    /// Calico's CRDs are present.
    pub crds_present: bool,
    /// Helpers present now, by node.
    pub helpers: BTreeSet<NodeName>,
    /// Nodes a helper flushed (the mark a real emulator puts on the node).
    pub flushed: BTreeSet<NodeName>,
    /// The allow rule's CIDR, if present.
    pub allow_rule: Option<Ipv4Net>,
    /// Most helpers present at once.
    pub max_helpers: usize,
    /// Every change, in order (`delete Installation`, `helper w1`, `crds`, ...).
    pub log: Vec<String>,
}

/// The finalize, clean-up and allow-rule ports on a simulator. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SimFinal {
    sim: SimCluster,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    view: FinalView,
    helper_started: BTreeMap<NodeName, Time>,
}

impl SimFinal {
    /// How long a node helper runs.
    pub const HELPER_RUN: Duration = Duration::from_secs(3);

    /// The ports over `sim`, with Calico's objects as its install kind has them and the CRDs
    /// present.
    #[must_use]
    pub fn new(sim: &SimCluster) -> SimFinal {
        let install = sim.lock().calico.install;
        let calico_objects = cnimig_core::cleanup::removal_order(install)
            .iter()
            .copied()
            .collect();
        SimFinal {
            sim: sim.clone(),
            inner: Arc::new(Mutex::new(Inner {
                view: FinalView {
                    calico_objects,
                    crds_present: true,
                    ..FinalView::default()
                },
                helper_started: BTreeMap::new(),
            })),
        }
    }

    /// How Calico was installed in the scenario.
    #[must_use]
    pub fn install(&self) -> CalicoInstall {
        self.sim.lock().calico.install
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the `CiliumNodeConfig` `name` exists.
    #[must_use]
    pub fn node_config_present(&self, name: &str) -> bool {
        self.sim.lock().node_configs.contains_key(name)
    }

    /// A snapshot of what the ports changed.
    #[must_use]
    pub fn view(&self) -> FinalView {
        self.inner().view.clone()
    }

    /// Counts the call and decides its fault, as the cluster's ports do.
    fn call(&self, method: &'static str, call: Call) -> Injected {
        let mut s = self.sim.lock();
        *s.stats.api_calls.entry(method.to_string()).or_default() += 1;
        s.api_fault(method, call)
    }

    fn now(&self) -> Time {
        self.sim.lock().now
    }
}

#[async_trait]
impl FinalizePort for SimFinal {
    async fn load_final(&self) -> Result<Option<FinalRecord>, PortError> {
        if let Some(e) = self.call("Final::load_final", Call::Read).before() {
            return Err(e);
        }
        match &self.inner().view.record {
            None => Ok(None),
            Some(text) => FinalRecord::from_annotation(text)
                .map(Some)
                .map_err(|detail| PortError::Invalid {
                    what: "the final record".into(),
                    detail,
                }),
        }
    }

    async fn save_final(
        &self,
        prev: Option<&FinalRecord>,
        next: &FinalRecord,
    ) -> Result<(), PortError> {
        let inj = self.call("Final::save_final", Call::Exclusive);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        let mut g = self.inner();
        let same = match (&g.view.record, prev) {
            (None, None) => true,
            (Some(a), Some(p)) => FinalRecord::from_annotation(a).is_ok_and(|r| &r == p),
            _ => false,
        };
        if !same {
            return Err(PortError::Conflict {
                what: "the final record".into(),
            });
        }
        g.view.record = Some(next.to_annotation());
        drop(g);
        inj.after(Ok(()))
    }

    async fn delete_node_config(&self, name: &str) -> Result<(), PortError> {
        let inj = self.call("Final::delete_node_config", Call::Write);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        if self.sim.lock().node_configs.remove(name).is_some() {
            self.inner()
                .view
                .log
                .push(format!("delete CiliumNodeConfig {name}"));
        }
        inj.after(Ok(()))
    }
}

#[async_trait]
impl AllowRulePort for SimFinal {
    async fn apply_allow_rule(&self, cilium_cidr: Ipv4Net) -> Result<(), PortError> {
        let inj = self.call("Allow::apply_allow_rule", Call::Write);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        let mut g = self.inner();
        if g.view.allow_rule != Some(cilium_cidr) {
            g.view.allow_rule = Some(cilium_cidr);
            g.view.log.push(format!("apply allow rule {cilium_cidr}"));
        }
        drop(g);
        inj.after(Ok(()))
    }

    async fn remove_allow_rule(&self) -> Result<(), PortError> {
        let inj = self.call("Allow::remove_allow_rule", Call::Write);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        let mut g = self.inner();
        if g.view.allow_rule.take().is_some() {
            g.view.log.push("remove allow rule".into());
        }
        drop(g);
        inj.after(Ok(()))
    }

    async fn allow_rule_present(&self) -> Result<bool, PortError> {
        if let Some(e) = self.call("Allow::allow_rule_present", Call::Read).before() {
            return Err(e);
        }
        Ok(self.inner().view.allow_rule.is_some())
    }
}

#[async_trait]
impl CleanupPort for SimFinal {
    async fn delete_calico_object(&self, object: CalicoObject) -> Result<(), PortError> {
        let inj = self.call("Cleanup::delete_calico_object", Call::Write);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        let mut g = self.inner();
        if g.view.calico_objects.remove(&object) {
            g.view.log.push(format!("delete {object:?}"));
        }
        drop(g);
        inj.after(Ok(()))
    }

    async fn start_helper(&self, node: &NodeName, script: &str) -> Result<(), PortError> {
        let inj = self.call("Cleanup::start_helper", Call::Write);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        if self.sim.node(node).is_none() {
            return Err(PortError::NotFound {
                what: format!("node {node}"),
            });
        }
        if !script.contains(FLUSH_DONE_MARKER) {
            return Err(PortError::Invalid {
                what: format!("helper on node {node}"),
                detail: "the script does not end with the done marker".into(),
            });
        }
        let now = self.now();
        let mut g = self.inner();
        if g.view.helpers.insert(node.clone()) {
            g.helper_started.insert(node.clone(), now);
            g.view.log.push(format!("helper {node}"));
            g.view.max_helpers = g.view.max_helpers.max(g.view.helpers.len());
        }
        drop(g);
        inj.after(Ok(()))
    }

    async fn helper_status(&self, node: &NodeName) -> Result<HelperStatus, PortError> {
        if let Some(e) = self.call("Cleanup::helper_status", Call::Read).before() {
            return Err(e);
        }
        let now = self.now();
        let mut g = self.inner();
        let Some(started) = g.helper_started.get(node).copied() else {
            return Ok(HelperStatus::Absent);
        };
        if now.since(started) >= Self::HELPER_RUN {
            if g.view.flushed.insert(node.clone()) {
                g.view.log.push(format!("flushed {node}"));
            }
            Ok(HelperStatus::Succeeded)
        } else {
            Ok(HelperStatus::Running)
        }
    }

    async fn delete_helper(&self, node: &NodeName) -> Result<(), PortError> {
        let inj = self.call("Cleanup::delete_helper", Call::Write);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        let mut g = self.inner();
        g.helper_started.remove(node);
        if g.view.helpers.remove(node) {
            g.view.log.push(format!("delete helper {node}"));
        }
        drop(g);
        inj.after(Ok(()))
    }

    async fn delete_calico_crds(&self) -> Result<(), PortError> {
        let inj = self.call("Cleanup::delete_calico_crds", Call::Write);
        if let Some(e) = inj.before() {
            return Err(e);
        }
        let mut g = self.inner();
        if g.view.crds_present {
            g.view.crds_present = false;
            g.view.log.push("delete CRDs".into());
        }
        drop(g);
        inj.after(Ok(()))
    }
}
