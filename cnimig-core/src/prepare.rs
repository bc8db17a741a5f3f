//! Prepare, pure: the change to Calico's IP autodetection that keeps it off Cilium's
//! `cilium_*` interfaces (with what it replaces, for an exact undo), the after-install check
//! that every node's `projectcalico.org/IPv4Address` is still its InternalIP, and the actions
//! the user must take outside the cluster (security groups, firewalls).
//!
//! ```
//! use cnimig_core::model::{Autodetection, CalicoFacts, CalicoInstall};
//! use cnimig_core::prepare::{AutodetectChange, autodetection_change};
//! let facts = CalicoFacts { install: CalicoInstall::Manifest, ..CalicoFacts::default() };
//! let c = autodetection_change(&facts, None).unwrap().expect("first-found must change");
//! assert_eq!(c.after, Autodetection::KubernetesInternalIp);
//! assert!(matches!(c.target, AutodetectChange::ManifestEnv { .. }));
//! ```

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::machine::Phase;
use crate::model::{Autodetection, CalicoFacts, CalicoInstall};
use crate::orchestrator::RunReport;

/// Where the autodetection method lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AutodetectChange {
    /// Env `IP_AUTODETECTION_METHOD` on container `calico-node` of DaemonSet
    /// `kube-system/calico-node` (manifest installs).
    ManifestEnv {
        /// `kube-system`.
        namespace: String,
        /// `calico-node`.
        daemon_set: String,
        /// `calico-node`.
        container: String,
    },
    /// `spec.calicoNetwork.nodeAddressAutodetectionV4` of `Installation default`
    /// (`operator.tigera.io/v1`, operator installs).
    OperatorInstallation {
        /// `default`.
        name: String,
    },
}

/// One autodetection change: where, from what, to what. Saved before it is applied; undoing it
/// writes `before` back exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutodetectionFix {
    /// Where.
    pub target: AutodetectChange,
    /// The method in force now.
    pub before: Autodetection,
    /// The method to set.
    pub after: Autodetection,
}

/// Bad prepare input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    /// The user's interface pattern could still select a Cilium interface.
    #[error(
        "the interface pattern {pattern:?} can match Cilium's interfaces (cilium_host, cilium_net, cilium_vxlan); give a pattern that names only the node's real interface (e.g. ^eth0$ or ^ens[0-9]+$), or none to use kubernetes-internal-ip"
    )]
    PatternMatchesCilium {
        /// The pattern.
        pattern: String,
    },
    /// The user's interface pattern is not a regular expression.
    #[error("the interface pattern {pattern:?} is not a valid regular expression: {detail}")]
    BadPattern {
        /// The pattern.
        pattern: String,
        /// The parser's complaint.
        detail: String,
    },
}

/// The autodetection change needed, if any: `None` when the current method cannot pick a
/// `cilium_*` interface. The new method is `interface=<pattern>` when the user gives a pattern,
/// else `kubernetes-internal-ip`.
///
/// # Errors
/// [`PrepareError`] when the pattern is not a regex or could match a Cilium interface.
pub fn autodetection_change(
    facts: &CalicoFacts,
    interface_pattern: Option<&str>,
) -> Result<Option<AutodetectionFix>, PrepareError> {
    let after = match interface_pattern {
        None => Autodetection::KubernetesInternalIp,
        Some(p) => {
            let re = regex::Regex::new(p).map_err(|e| PrepareError::BadPattern {
                pattern: p.into(),
                detail: e.to_string(),
            })?;
            let a = Autodetection::Interface(p.into());
            if ["cilium_host", "cilium_net", "cilium_vxlan", "cilium_geneve"]
                .iter()
                .any(|i| re.is_match(i))
                || a.may_pick_cilium_interface()
            {
                return Err(PrepareError::PatternMatchesCilium { pattern: p.into() });
            }
            a
        }
    };
    if !facts.autodetection.may_pick_cilium_interface() {
        return Ok(None);
    }
    let target = match facts.install {
        CalicoInstall::Manifest => AutodetectChange::ManifestEnv {
            namespace: "kube-system".into(),
            daemon_set: "calico-node".into(),
            container: "calico-node".into(),
        },
        CalicoInstall::Operator => AutodetectChange::OperatorInstallation {
            name: "default".into(),
        },
    };
    Ok(Some(AutodetectionFix {
        target,
        before: facts.autodetection.clone(),
        after,
    }))
}

/// How a method is written in `IP_AUTODETECTION_METHOD`.
#[must_use]
pub fn manifest_value(a: &Autodetection) -> String {
    match a {
        Autodetection::FirstFound => "first-found".into(),
        Autodetection::KubernetesInternalIp => "kubernetes-internal-ip".into(),
        Autodetection::Interface(re) => format!("interface={re}"),
        Autodetection::SkipInterface(re) => format!("skip-interface={re}"),
        Autodetection::CanReach(d) => format!("can-reach={d}"),
        Autodetection::Cidrs(c) => format!(
            "cidr={}",
            c.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

/// How a method is written in `nodeAddressAutodetectionV4`.
#[must_use]
pub fn operator_value(a: &Autodetection) -> serde_json::Value {
    use serde_json::json;
    match a {
        Autodetection::FirstFound => json!({"firstFound": true}),
        Autodetection::KubernetesInternalIp => json!({"kubernetes": "NodeInternalIP"}),
        Autodetection::Interface(re) => json!({"interface": re}),
        Autodetection::SkipInterface(re) => json!({"skipInterface": re}),
        Autodetection::CanReach(d) => json!({"canReach": d}),
        Autodetection::Cidrs(c) => {
            json!({"cidrs": c.iter().map(ToString::to_string).collect::<Vec<_>>()})
        }
    }
}

impl AutodetectionFix {
    /// The plan line: what changes where, and that it waits for the calico-node rollout.
    #[must_use]
    pub fn describe(&self) -> String {
        match &self.target {
            AutodetectChange::ManifestEnv {
                namespace,
                daemon_set,
                container,
            } => format!(
                "set env IP_AUTODETECTION_METHOD={} (was {}) on container {container} of DaemonSet {namespace}/{daemon_set}, then wait for its rollout; undone by writing {} back",
                manifest_value(&self.after),
                manifest_value(&self.before),
                manifest_value(&self.before)
            ),
            AutodetectChange::OperatorInstallation { name } => format!(
                "set spec.calicoNetwork.nodeAddressAutodetectionV4 of Installation {name} to {} (was {}), then wait for calico-system/calico-node's rollout; undone by writing the old value back",
                operator_value(&self.after),
                operator_value(&self.before)
            ),
        }
    }
}

/// Nodes whose `projectcalico.org/IPv4Address` (`ADDR/PREFIX`) is not one of their InternalIPs,
/// or is missing: `(node, InternalIPs, annotation)`. Checked after Cilium is installed and
/// before the first node; any problem stops the run.
#[must_use]
pub fn calico_address_problems(nodes: &[(String, Vec<Ipv4Addr>, Option<String>)]) -> Vec<String> {
    let mut out = Vec::new();
    for (name, ips, ann) in nodes {
        let Some(a) = ann else {
            out.push(format!(
                "node {name} has no projectcalico.org/IPv4Address annotation: calico-node has not registered its address"
            ));
            continue;
        };
        let ip = a.split('/').next().and_then(|s| s.parse::<Ipv4Addr>().ok());
        if !ip.is_some_and(|ip| ips.contains(&ip)) {
            out.push(format!(
                "node {name}: Calico uses {a}, not its InternalIP ({}); Calico's autodetection picked another interface (cilium_host?): fix the autodetection method and restart calico-node there",
                ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    out
}

/// What the user must open outside the cluster before the first node, with exact CIDRs and
/// ports: Cilium's tunnel and health checks between all nodes, and the new pod CIDR wherever
/// pod traffic is filtered.
#[must_use]
pub fn user_actions(
    pod_cidr: Ipv4Net,
    tunnel_protocol: &str,
    tunnel_port: u16,
    node_cidrs: &[Ipv4Net],
) -> Vec<String> {
    let nodes = if node_cidrs.is_empty() {
        "all node addresses".to_string()
    } else {
        node_cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    vec![
        format!(
            "security groups / host firewalls: allow UDP {tunnel_port} ({tunnel_protocol}, Cilium's tunnel) between {nodes}, both ways"
        ),
        format!("allow TCP 4240 and ICMP echo (Cilium's health checks) between {nodes}"),
        format!(
            "allow the new pod CIDR {pod_cidr} wherever pod addresses are filtered (cloud route tables with source/destination checks, firewalls in front of databases, allow-lists)"
        ),
    ]
}

/// True when the run `report` describes was **abandoned**: it ended with no node on Cilium,
/// every planned node either untouched ([`Phase::Pending`]) or back on Calico
/// ([`Phase::RolledBack`]). This includes a run with no node to migrate, one stopped by the
/// failure policy after its first node rolled back, and one where every node rolled back.
/// A run with any node `Done`, part-way, or `Failed` (a rollback that could not finish) is
/// not abandoned: Calico and Cilium then both serve nodes, and the prepare changes stay.
///
/// An abandoned run's prepare changes are undone (the cluster goes back to how it was before
/// cnimig); a later run plans and applies them again.
#[must_use]
pub fn abandoned(report: &RunReport) -> bool {
    report
        .nodes
        .iter()
        .all(|n| matches!(n.phase, Phase::Pending | Phase::RolledBack))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_first_found_is_changed_with_undo() {
        let f = CalicoFacts::default();
        let c = autodetection_change(&f, None).unwrap().unwrap();
        assert_eq!(c.before, Autodetection::FirstFound);
        assert!(c.describe().contains("{\"kubernetes\":\"NodeInternalIP\"}"));
        assert!(c.describe().contains("was {\"firstFound\":true}"));
    }

    #[test]
    fn safe_methods_need_no_change() {
        let f = CalicoFacts {
            autodetection: Autodetection::KubernetesInternalIp,
            ..CalicoFacts::default()
        };
        assert_eq!(autodetection_change(&f, None).unwrap(), None);
    }

    #[test]
    fn user_patterns_are_checked() {
        let f = CalicoFacts {
            install: CalicoInstall::Manifest,
            ..CalicoFacts::default()
        };
        let c = autodetection_change(&f, Some("^eth0$")).unwrap().unwrap();
        assert!(
            c.describe()
                .contains("IP_AUTODETECTION_METHOD=interface=^eth0$ (was first-found)")
        );
        assert!(matches!(
            autodetection_change(&f, Some("cilium.*")),
            Err(PrepareError::PatternMatchesCilium { .. })
        ));
        assert!(matches!(
            autodetection_change(&f, Some("(")),
            Err(PrepareError::BadPattern { .. })
        ));
    }

    #[test]
    fn calico_addresses_must_be_internal_ips() {
        let ip: Ipv4Addr = "172.31.0.2".parse().unwrap();
        let p = calico_address_problems(&[
            ("a".into(), vec![ip], Some("172.31.0.2/20".into())),
            ("b".into(), vec![ip], Some("10.245.1.1/32".into())),
            ("c".into(), vec![ip], None),
        ]);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("node b: Calico uses 10.245.1.1/32"));
    }

    #[test]
    fn user_actions_name_cidr_and_ports() {
        let a = user_actions("10.245.0.0/16".parse().unwrap(), "vxlan", 8473, &[]);
        assert!(a[0].contains("UDP 8473"));
        assert!(a[2].contains("10.245.0.0/16"));
    }

    #[test]
    fn abandoned_means_no_node_left_on_cilium() {
        use crate::model::Time;
        use crate::orchestrator::NodeOutcome;
        let report = |phases: &[Phase]| RunReport {
            nodes: phases
                .iter()
                .enumerate()
                .map(|(i, p)| NodeOutcome {
                    node: crate::model::NodeName::new(format!("n{i}")).unwrap(),
                    phase: *p,
                    started: None,
                    finished: None,
                    cause: None,
                })
                .collect(),
            skipped: Vec::new(),
            started: Time(0),
            finished: Time(1),
            stopped: None,
            interrupted: false,
            joined_not_migrated: Vec::new(),
            joins_checked: Time(0),
        };
        assert!(abandoned(&report(&[])));
        assert!(abandoned(&report(&[Phase::RolledBack, Phase::Pending])));
        assert!(abandoned(&report(&[Phase::RolledBack, Phase::RolledBack])));
        assert!(!abandoned(&report(&[Phase::RolledBack, Phase::Done])));
        assert!(!abandoned(&report(&[Phase::Failed, Phase::Pending])));
        assert!(!abandoned(&report(&[Phase::Drained, Phase::Pending])));
    }
}
