//! The reachability model: which ready pods can reach which, computed from classes of pods
//! (network, and for hostPort pods on Cilium whether `portmap` is chained), never from pairs.
//!
//! Rules (the pairwise form, for the emulator, is [`crate::pairs`]):
//! - Calico↔Calico and Cilium↔Cilium reach each other; hostNetwork pods reach everything.
//! - Calico↔Cilium only with `enable-host-legacy-routing: "true"` in the live Cilium config, and
//!   not when an enabled Calico pool uses VXLAN on the same UDP port as Cilium's tunnel.
//! - When Calico's IP autodetection may pick Cilium's `cilium_host` and Cilium is installed,
//!   Calico pods on different nodes no longer reach each other, nor Cilium pods.
//! - A hostPort pod on Cilium is unreachable on its host port unless `portmap` was chained on
//!   its node when it started.

use crate::state::State;

/// At most this many nodes or pods are named in one problem.
const LIST: usize = 10;

fn list(names: impl Iterator<Item = String>) -> String {
    let all: Vec<String> = names.collect();
    if all.len() > LIST {
        format!("{} and {} more", all[..LIST].join(", "), all.len() - LIST)
    } else {
        all.join(", ")
    }
}

impl State {
    /// Why Calico and Cilium pods cannot reach each other, if they cannot.
    pub(crate) fn cross_cni_reason(&self) -> Option<String> {
        let c = self.cilium.as_ref()?;
        crate::pairs::cross_cni_block(&c.live, &self.calico)
    }

    fn autodetect_breaks(&self) -> bool {
        self.cilium.is_some() && self.autodetect_bad
    }

    /// Cheap check of whether any reachability rule is broken now.
    pub(crate) fn reach_broken(&self) -> bool {
        let r = &self.reach;
        let (calico, cilium) = (r.calico_total > 0, r.cilium_total > 0);
        if self.autodetect_breaks() && (r.calico_nodes >= 2 || (calico && cilium)) {
            return true;
        }
        if calico && cilium && self.cross_cni_reason().is_some() {
            return true;
        }
        !r.hostport_broken_nodes.is_empty()
    }

    /// Every broken reachability rule, each naming who cannot reach whom and why. Empty = fine.
    pub(crate) fn reachability_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let r = &self.reach;
        let (calico, cilium) = (r.calico_total > 0, r.cilium_total > 0);
        let autodetect = format!(
            "Calico's IP autodetection ({}) can pick Cilium's cilium_host interface; set it to kubernetes-internal-ip",
            crate::scenario::autodetection_string(&self.calico.autodetection)
        );
        if self.autodetect_breaks() && r.calico_nodes >= 2 {
            out.push(format!(
                "{} ready Calico pod(s) on {} nodes cannot reach each other across nodes: {autodetect}",
                r.calico_total, r.calico_nodes
            ));
        }
        if calico && cilium {
            let why = if self.autodetect_breaks() {
                Some(autodetect)
            } else {
                self.cross_cni_reason()
            };
            if let Some(why) = why {
                out.push(format!(
                    "{} ready Calico pod(s) cannot reach {} ready Cilium pod(s): {why}",
                    r.calico_total, r.cilium_total
                ));
            }
        }
        if !r.hostport_broken_nodes.is_empty() {
            let nodes = r.hostport_broken_nodes.iter().filter_map(|&n| {
                self.nodes.get(n).map(|x| {
                    format!(
                        "{} (chaining mode {})",
                        x.node.name,
                        x.chaining.as_deref().unwrap_or("none")
                    )
                })
            });
            out.push(format!(
                "hostPort pods on Cilium are unreachable on their host ports because the portmap plugin was not chained when they started, on node(s) {}; set cni-chaining-mode: portmap in the node config and restart those pods",
                list(nodes)
            ));
        }
        out
    }

    /// Problems on one node: its pod-network pods not on Cilium or not Ready, its agent, and the
    /// reachability rules its pods take part in.
    pub(crate) fn node_problems(&self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        let Some(node) = self.nodes.get(n) else {
            return out;
        };
        if !node.node.ready {
            out.push(format!("node {} is NotReady", node.node.name));
        }
        if self.cilium.is_some() {
            match self.agent_observation(n) {
                None => out.push(format!("no Cilium agent pod on node {}", node.node.name)),
                Some(a) if !a.ready => out.push(format!(
                    "Cilium agent {} on node {} is not Ready",
                    a.pod_uid, node.node.name
                )),
                Some(_) => {}
            }
        }
        let mut not_cilium = Vec::new();
        let mut not_ready = Vec::new();
        for id in &node.pods {
            let Some(p) = self.pods.get(id) else { continue };
            if !p.uses_pod_network() || p.mirror {
                continue;
            }
            if p.network != cnimig_core::model::PodNetwork::Cilium {
                not_cilium.push(format!("{} ({:?})", p.key(), p.network));
            } else if !p.ready || p.terminating || p.phase != cnimig_core::model::PodPhase::Running
            {
                not_ready.push(p.key());
            }
        }
        if !not_cilium.is_empty() {
            out.push(format!(
                "pods on node {} not managed by Cilium: {}",
                node.node.name,
                list(not_cilium.into_iter())
            ));
        }
        if !not_ready.is_empty() {
            out.push(format!(
                "Cilium pods on node {} not Ready: {}",
                node.node.name,
                list(not_ready.into_iter())
            ));
        }
        let r = &self.reach;
        let here_calico = r.calico_per_node.get(n).copied().unwrap_or(0) > 0;
        let here_cilium = r.cilium_per_node.get(n).copied().unwrap_or(0) > 0;
        let involved = here_calico || here_cilium;
        if involved && self.reach_broken() {
            for p in self.reachability_problems() {
                let hostport = p.starts_with("hostPort");
                if !hostport || r.hostport_broken_nodes.contains(&n) {
                    out.push(p);
                }
            }
        } else if r.hostport_broken_nodes.contains(&n) {
            out.extend(
                self.reachability_problems()
                    .into_iter()
                    .filter(|p| p.starts_with("hostPort")),
            );
        }
        out
    }
}
