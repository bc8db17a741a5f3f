//! Kubernetes `NetworkPolicy` needs no conversion (Cilium enforces it), but a few constructs
//! mean something different under Cilium. [`audit_k8s_network_policies`] finds them.
//!
//! - `ipBlock` peers that cover pod CIDRs: Calico matches pods by IP, Cilium's CIDR selectors
//!   never match pods (they have identities), so pod traffic that relied on the block is dropped.
//! - `ipBlock` peers that cover node addresses: Cilium's CIDR selectors do not match nodes by
//!   default (`host`, `remote-node` and `kube-apiserver` identities), e.g. egress to the API
//!   server by its node IP.
//! - `ipBlock` peers that cover the service CIDR: policy sees the backend after service
//!   translation, so a ClusterIP in a block matches nothing (Calico with kube-proxy in IPVS
//!   mode evaluated egress against the ClusterIP, so such rules may have worked there).
//! - DNS egress written by the DNS service IP, or by a node-local DNS cache address
//!   (169.254.0.0/16, which Cilium sees as the host): DNS breaks for pods with egress default
//!   deny. Allow the DNS pods by selector instead.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::calico::PolicyType;

/// The cluster's address ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCidrs {
    /// Pod CIDRs (old and new).
    pub pods: Vec<IpNet>,
    /// Service CIDRs.
    pub services: Vec<IpNet>,
    /// Node address ranges.
    pub nodes: Vec<IpNet>,
}

/// What kind of difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// The block covers pod addresses.
    IpBlockCoversPods,
    /// The block covers node addresses.
    IpBlockCoversNodes,
    /// The block covers the service CIDR (and is not DNS).
    IpBlockCoversServices,
    /// DNS egress by the DNS service's ClusterIP.
    DnsByServiceIp,
    /// DNS egress by a link-local node-local DNS cache address.
    DnsByNodeLocalAddress,
    /// The object could not be read.
    Unreadable,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditFinding {
    /// Policy namespace.
    pub namespace: String,
    /// Policy name.
    pub name: String,
    /// Rule direction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<PolicyType>,
    /// 0-based rule index in that direction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// 0-based peer index in the rule's `from`/`to`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<usize>,
    /// What kind of difference.
    pub kind: FindingKind,
    /// What happens and what to do.
    pub detail: String,
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// Ranges of `targets` that the block reaches (overlaps, and not wholly inside an exception).
fn reached(block: &IpNet, except: &[IpNet], targets: &[IpNet]) -> Vec<String> {
    targets
        .iter()
        .filter(|t| overlaps(block, t) && !except.iter().any(|e| e.contains(*t)))
        .map(ToString::to_string)
        .collect()
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

/// True when the rule's ports name DNS (53, `dns`, `dns-tcp`).
fn names_dns(rule: &Value) -> bool {
    rule.get("ports")
        .and_then(Value::as_array)
        .is_some_and(|ports| {
            ports.iter().any(|p| match p.get("port") {
                Some(Value::Number(n)) => n.as_u64() == Some(53),
                Some(Value::String(s)) => s == "53" || s == "dns" || s == "dns-tcp",
                _ => false,
            })
        })
}

/// Audits Kubernetes `NetworkPolicy` objects (JSON values as the API returns them) for the
/// constructs that behave differently under Cilium. Objects of other kinds are ignored.
#[must_use]
pub fn audit_k8s_network_policies(policies: &[Value], cidrs: &ClusterCidrs) -> Vec<AuditFinding> {
    let link_local: Option<IpNet> = "169.254.0.0/16".parse().ok();
    let mut out = Vec::new();
    for np in policies {
        if np.get("kind").and_then(Value::as_str) != Some("NetworkPolicy")
            || np.get("apiVersion").and_then(Value::as_str) != Some("networking.k8s.io/v1")
        {
            continue;
        }
        let s = |p: &str| {
            np.pointer(p)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let (namespace, name) = (s("/metadata/namespace"), s("/metadata/name"));
        let mut finding = |direction, rule, peer, kind, detail: String| {
            out.push(AuditFinding {
                namespace: namespace.clone(),
                name: name.clone(),
                direction,
                rule,
                peer,
                kind,
                detail,
            })
        };
        for (dir, key, peers_key) in [
            (PolicyType::Ingress, "ingress", "from"),
            (PolicyType::Egress, "egress", "to"),
        ] {
            let rules = np
                .pointer(&format!("/spec/{key}"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for (ri, rule) in rules.iter().enumerate() {
                let peers = rule
                    .get(peers_key)
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for (pi, peer) in peers.iter().enumerate() {
                    let Some(block) = peer.get("ipBlock") else {
                        continue;
                    };
                    let at = (Some(dir), Some(ri), Some(pi));
                    let cidr_text = block.get("cidr").and_then(Value::as_str).unwrap_or("");
                    let Some(net) = parse_net(cidr_text) else {
                        finding(
                            at.0,
                            at.1,
                            at.2,
                            FindingKind::Unreadable,
                            format!("ipBlock.cidr {cidr_text:?} is not a CIDR"),
                        );
                        continue;
                    };
                    let except: Vec<IpNet> = block
                        .get("except")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(Value::as_str)
                                .filter_map(parse_net)
                                .collect()
                        })
                        .unwrap_or_default();
                    let pods = reached(&net, &except, &cidrs.pods);
                    if !pods.is_empty() {
                        finding(
                            at.0,
                            at.1,
                            at.2,
                            FindingKind::IpBlockCoversPods,
                            format!(
                                "ipBlock {net} covers pod addresses ({}): Calico matched those pods by IP, \
                                 Cilium's CIDR rules never match pods, so that pod traffic will be dropped; add a \
                                 podSelector/namespaceSelector peer for it (or except the pod CIDRs if the \
                                 block was meant for external addresses only)",
                                pods.join(", ")
                            ),
                        );
                    }
                    let nodes = reached(&net, &except, &cidrs.nodes);
                    if !nodes.is_empty() {
                        finding(
                            at.0,
                            at.1,
                            at.2,
                            FindingKind::IpBlockCoversNodes,
                            format!(
                                "ipBlock {net} covers node addresses ({}): Cilium's CIDR rules do not match \
                                 nodes by default (host, remote-node and kube-apiserver identities); allow them \
                                 with a CiliumNetworkPolicy toEntities/fromEntities rule",
                                nodes.join(", ")
                            ),
                        );
                    }
                    let dns = dir == PolicyType::Egress && names_dns(rule);
                    let in_service = cidrs.services.iter().any(|s| s.contains(&net));
                    let in_link_local = link_local.is_some_and(|l| l.contains(&net));
                    if dns && in_service {
                        finding(
                            at.0,
                            at.1,
                            at.2,
                            FindingKind::DnsByServiceIp,
                            format!(
                                "DNS egress by the service IP {net}: policy sees the DNS pods after service \
                                 translation, and Cilium's CIDR rules never match pods, so DNS breaks for pods \
                                 with egress default deny; allow the DNS pods instead (namespaceSelector \
                                 kubernetes.io/metadata.name: kube-system, podSelector k8s-app: kube-dns)"
                            ),
                        );
                    } else if dns && in_link_local {
                        finding(
                            at.0,
                            at.1,
                            at.2,
                            FindingKind::DnsByNodeLocalAddress,
                            format!(
                                "DNS egress to the node-local DNS cache {net}: Cilium sees that address as the \
                                 host, not as a CIDR, so the rule matches nothing; allow it with a \
                                 CiliumNetworkPolicy toEntities: [host] rule on port 53 (or a Local Redirect \
                                 Policy)"
                            ),
                        );
                    } else {
                        let svcs = reached(&net, &except, &cidrs.services);
                        if !svcs.is_empty() {
                            finding(
                                at.0,
                                at.1,
                                at.2,
                                FindingKind::IpBlockCoversServices,
                                format!(
                                    "ipBlock {net} covers the service CIDR ({}): policy sees the backend pods \
                                     after service translation, so service IPs match nothing; select the \
                                     backends instead",
                                    svcs.join(", ")
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_known_differences() {
        let np = serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {
                "podSelector": {},
                "egress": [
                    {"to": [{"ipBlock": {"cidr": "10.43.0.10/32"}}], "ports": [{"protocol": "UDP", "port": 53}]},
                    {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.42.0.0/16"]}}]},
                    {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]},
                    {"to": [{"ipBlock": {"cidr": "169.254.20.10/32"}}], "ports": [{"port": "dns"}]},
                    {"to": [{"ipBlock": {"cidr": "bogus"}}]}
                ]
            }
        });
        let cidrs = ClusterCidrs {
            pods: vec!["10.42.0.0/16".parse().unwrap()],
            services: vec!["10.43.0.0/16".parse().unwrap()],
            nodes: vec!["192.168.1.0/24".parse().unwrap()],
        };
        let f = audit_k8s_network_policies(&[np], &cidrs);
        let kinds: Vec<(usize, FindingKind)> =
            f.iter().map(|f| (f.rule.unwrap_or(99), f.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, FindingKind::DnsByServiceIp),
                (1, FindingKind::IpBlockCoversNodes),
                (1, FindingKind::IpBlockCoversServices),
                (2, FindingKind::IpBlockCoversPods),
                (2, FindingKind::IpBlockCoversNodes),
                (2, FindingKind::IpBlockCoversServices),
                (3, FindingKind::DnsByNodeLocalAddress),
                (4, FindingKind::Unreadable),
            ]
        );
    }
}
