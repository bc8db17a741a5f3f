//! The reachability model between two endpoints (pods or nodes), pure, for callers that are not
//! the simulator: the emulator's Goldpinger and probe answers (`cnimig-emu`) are computed here,
//! from the same rules as the simulator's class-based checks in [`crate::reach`] (which call
//! [`cross_cni_block`] too), plus a [`Firewall`] for breaks outside either CNI (security groups,
//! host firewalls).
//!
//! ```
//! use std::collections::BTreeMap;
//! use cnimig_sim::pairs::{Endpoint, Firewall, Net, Model};
//! let live: BTreeMap<String, String> =
//!     [("enable-host-legacy-routing".to_string(), "true".to_string())].into();
//! let calico = cnimig_core::model::CalicoFacts {
//!     autodetection: cnimig_core::model::Autodetection::KubernetesInternalIp,
//!     ..Default::default()
//! };
//! let mut m = Model { cilium_live: Some(&live), calico: &calico, firewall: &Firewall::default() };
//! let a = Endpoint { node: "n1", net: Net::Cilium };
//! let b = Endpoint { node: "n2", net: Net::Calico };
//! assert!(m.reach(a, b).is_ok());
//! let fw = Firewall { blocked_udp_ports: [8472].into(), ..Firewall::default() };
//! m.firewall = &fw;
//! assert!(m.reach(a, b).unwrap_err().contains("8472"));
//! ```

use std::collections::{BTreeMap, BTreeSet};

use cnimig_core::model::CalicoFacts;

/// Which network an endpoint is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    /// A pod with a Calico address.
    Calico,
    /// A pod with a Cilium address.
    Cilium,
    /// A hostNetwork pod, or the node itself.
    Host,
}

/// One end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint<'a> {
    /// The node it runs on.
    pub node: &'a str,
    /// Its network.
    pub net: Net,
}

/// Breaks outside both CNIs, as a security group or a host firewall would make them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Firewall {
    /// UDP ports dropped between nodes (a tunnel port not opened in the security group).
    pub blocked_udp_ports: BTreeSet<u16>,
    /// Ordered node pairs `(from, to)` between which everything is dropped.
    pub blocked_node_pairs: BTreeSet<(String, String)>,
}

/// Everything a reachability answer depends on.
#[derive(Debug, Clone, Copy)]
pub struct Model<'a> {
    /// The live `cilium-config` data, `None` when Cilium is not installed.
    pub cilium_live: Option<&'a BTreeMap<String, String>>,
    /// Calico's facts (pools, VXLAN port, autodetection).
    pub calico: &'a CalicoFacts,
    /// Breaks outside both CNIs.
    pub firewall: &'a Firewall,
}

/// Cilium's tunnel UDP port from its live config (8472 for VXLAN, 6081 for Geneve, unless
/// `tunnel-port` sets another).
#[must_use]
pub fn tunnel_port(live: &BTreeMap<String, String>) -> u16 {
    let default = if live.get("tunnel-protocol").is_some_and(|p| p == "geneve") {
        6081
    } else {
        8472
    };
    live.get("tunnel-port")
        .and_then(|p| p.trim().parse::<u16>().ok())
        .filter(|p| *p != 0)
        .unwrap_or(default)
}

/// Why Calico and Cilium pods cannot reach each other under this Cilium config and these
/// Calico facts, if they cannot.
#[must_use]
pub fn cross_cni_block(live: &BTreeMap<String, String>, calico: &CalicoFacts) -> Option<String> {
    if live
        .get("enable-host-legacy-routing")
        .is_none_or(|v| v != "true")
    {
        return Some(
            "Cilium's enable-host-legacy-routing is not \"true\", so traffic between Calico and Cilium pods bypasses the host's routing stack"
                .into(),
        );
    }
    let port = tunnel_port(live);
    let vxlan = calico
        .ip_pools
        .iter()
        .any(|p| !p.disabled && p.encapsulation.uses_vxlan());
    if vxlan && calico.vxlan_port == port {
        return Some(format!(
            "Calico's VXLAN and Cilium's tunnel both use UDP port {port}; give Cilium another tunnel-port"
        ));
    }
    None
}

impl Model<'_> {
    /// Whether `from` reaches `to`, and if not, why.
    ///
    /// # Errors
    /// The reason, when it does not.
    pub fn reach(&self, from: Endpoint<'_>, to: Endpoint<'_>) -> Result<(), String> {
        let cross_node = from.node != to.node;
        if cross_node
            && self
                .firewall
                .blocked_node_pairs
                .contains(&(from.node.to_string(), to.node.to_string()))
        {
            return Err(format!(
                "a firewall drops traffic from node {} to node {}",
                from.node, to.node
            ));
        }
        if from.net == Net::Host || to.net == Net::Host {
            return Ok(());
        }
        let calico_involved = from.net == Net::Calico || to.net == Net::Calico;
        let cilium_involved = from.net == Net::Cilium || to.net == Net::Cilium;
        if let Some(live) = self.cilium_live {
            if cross_node
                && calico_involved
                && self.calico.autodetection.may_pick_cilium_interface()
            {
                return Err(
                    "Calico's IP autodetection can pick Cilium's cilium_host interface; set it to kubernetes-internal-ip"
                        .into(),
                );
            }
            if calico_involved
                && cilium_involved
                && let Some(why) = cross_cni_block(live, self.calico)
            {
                return Err(why);
            }
            let port = tunnel_port(live);
            if cross_node && cilium_involved && self.firewall.blocked_udp_ports.contains(&port) {
                return Err(format!(
                    "a firewall drops UDP port {port} (Cilium's tunnel) between nodes {} and {}; open it between all nodes",
                    from.node, to.node
                ));
            }
        } else if cilium_involved {
            return Err("Cilium is not installed".into());
        }
        if cross_node && calico_involved && !cilium_involved {
            let vxlan = self
                .calico
                .ip_pools
                .iter()
                .any(|p| !p.disabled && p.encapsulation.uses_vxlan());
            let port = self.calico.vxlan_port;
            if vxlan && self.firewall.blocked_udp_ports.contains(&port) {
                return Err(format!(
                    "a firewall drops UDP port {port} (Calico's VXLAN) between nodes {} and {}",
                    from.node, to.node
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnimig_core::model::Autodetection;

    fn calico() -> CalicoFacts {
        CalicoFacts {
            autodetection: Autodetection::KubernetesInternalIp,
            ..CalicoFacts::default()
        }
    }

    fn live() -> BTreeMap<String, String> {
        [("enable-host-legacy-routing".to_string(), "true".to_string())].into()
    }

    const A: Endpoint<'static> = Endpoint {
        node: "n1",
        net: Net::Cilium,
    };
    const B: Endpoint<'static> = Endpoint {
        node: "n2",
        net: Net::Calico,
    };
    const C: Endpoint<'static> = Endpoint {
        node: "n3",
        net: Net::Calico,
    };

    #[test]
    fn healthy_migration_reaches_everything() {
        let (l, c, f) = (live(), calico(), Firewall::default());
        let m = Model {
            cilium_live: Some(&l),
            calico: &c,
            firewall: &f,
        };
        assert!(m.reach(A, B).is_ok() && m.reach(B, A).is_ok() && m.reach(B, C).is_ok());
    }

    #[test]
    fn blocked_tunnel_port_cuts_cilium_across_nodes_only() {
        let (l, c) = (live(), calico());
        let f = Firewall {
            blocked_udp_ports: [8472].into(),
            ..Firewall::default()
        };
        let m = Model {
            cilium_live: Some(&l),
            calico: &c,
            firewall: &f,
        };
        assert!(m.reach(A, B).is_err());
        assert!(
            m.reach(B, C).is_ok(),
            "Calico to Calico does not use Cilium's tunnel"
        );
        let same = Endpoint {
            node: "n1",
            net: Net::Calico,
        };
        assert!(m.reach(A, same).is_ok(), "same node: no tunnel");
    }

    #[test]
    fn no_legacy_routing_cuts_cross_cni() {
        let (c, f) = (calico(), Firewall::default());
        let l = BTreeMap::new();
        let m = Model {
            cilium_live: Some(&l),
            calico: &c,
            firewall: &f,
        };
        assert!(m.reach(A, B).unwrap_err().contains("legacy-routing"));
        assert!(m.reach(B, C).is_ok());
    }

    #[test]
    fn autodetection_trap_cuts_calico_across_nodes_once_cilium_is_installed() {
        let (l, f) = (live(), Firewall::default());
        let c = CalicoFacts {
            autodetection: Autodetection::FirstFound,
            ..CalicoFacts::default()
        };
        let m = Model {
            cilium_live: Some(&l),
            calico: &c,
            firewall: &f,
        };
        assert!(m.reach(B, C).unwrap_err().contains("autodetection"));
        assert!(m.reach(A, B).is_err(), "Calico to Cilium across nodes too");
        let before = Model {
            cilium_live: None,
            ..m
        };
        assert!(before.reach(B, C).is_ok());
    }

    #[test]
    fn blocked_node_pair_is_one_way() {
        let (l, c) = (live(), calico());
        let f = Firewall {
            blocked_node_pairs: [("n2".to_string(), "n3".to_string())].into(),
            ..Firewall::default()
        };
        let m = Model {
            cilium_live: Some(&l),
            calico: &c,
            firewall: &f,
        };
        assert!(m.reach(B, C).is_err());
        assert!(m.reach(C, B).is_ok());
    }
}
