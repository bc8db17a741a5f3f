//! Network rules: the new pod CIDR, the tunnel port, Calico's autodetection, dataplane and NAT.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use regex::{Regex, RegexBuilder};

use super::{Check, Ctx, bounded, count, overlaps, short};
use crate::model::{Autodetection, CalicoInstall, Dataplane, Encapsulation, PodNetwork};

pub(super) const POD_CIDR_OVERLAP: &str = "pod-cidr-overlap";
pub(super) const TUNNEL_PORT: &str = "tunnel-port";
pub(super) const CALICO_AUTODETECTION: &str = "calico-autodetection";
pub(super) const CALICO_DATAPLANE: &str = "calico-dataplane";
pub(super) const NAT_OUTGOING: &str = "nat-outgoing";
pub(super) const POD_CIDR_CAPACITY: &str = "pod-cidr-capacity";

/// The interfaces Cilium creates on every node that Calico's autodetection must never pick.
pub const CILIUM_INTERFACES: [&str; 4] =
    ["cilium_host", "cilium_net", "cilium_vxlan", "cilium_geneve"];

/// Compiles a Calico interface regex list the way calico-node does: the value is split on
/// `\s*,\s*` and the parts joined as `(a)|(b)`, then matched unanchored (Go's `MatchString`).
///
/// Go's RE2 and the `regex` crate agree on the syntax that matters here; where they differ the
/// crate is stricter, so a pattern it rejects is reported as invalid (the safe side).
fn calico_regex(list: &str) -> Result<Regex, String> {
    // Go's `\s` is [\t\n\f\r ].
    let go_space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\x0C' | '\r');
    let parts: Vec<&str> = list.split(',').collect();
    let last = parts.len().saturating_sub(1);
    let parts: Vec<&str> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let p = if i > 0 {
                p.trim_start_matches(go_space)
            } else {
                p
            };
            if i < last {
                p.trim_end_matches(go_space)
            } else {
                p
            }
        })
        .collect();
    let joined = format!("({})", parts.join(")|("));
    RegexBuilder::new(&joined)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| {
            short(
                &e.to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
                160,
            )
        })
}

/// True when an interface regex (Calico `interface=` syntax, Go RE2, comma-separated list,
/// unanchored) could match `cilium_host`, `cilium_net`, `cilium_vxlan` or `cilium_geneve`.
///
/// An invalid regex counts as "may match": cnimig cannot prove it safe.
#[must_use]
pub fn interface_regex_may_match_cilium(re: &str) -> bool {
    match calico_regex(re) {
        Ok(r) => CILIUM_INTERFACES.iter().any(|n| r.is_match(n)),
        Err(_) => true,
    }
}

/// True when a Calico `skip-interface=` regex list is valid and skips every one of Cilium's
/// interfaces ([`CILIUM_INTERFACES`]), so first-found detection can never pick one of them.
#[must_use]
pub fn skip_interface_regex_excludes_cilium(re: &str) -> bool {
    calico_regex(re).is_ok_and(|r| CILIUM_INTERFACES.iter().all(|n| r.is_match(n)))
}

/// Rule `pod-cidr-overlap`.
pub(super) fn pod_cidr_overlap(ctx: &Ctx<'_>) -> Vec<Check> {
    let pod = ctx.pod_cidr();
    let snap = ctx.snap;
    let mut out = Vec::new();
    let fix = "pick a podCIDR that overlaps nothing routed in or around the cluster \
               (the pod CIDR cannot be changed after the migration without restarting every Cilium agent at once)";

    for pool in ctx.calico_pools().filter(|p| overlaps(p.cidr, pod)) {
        let state = if pool.disabled { "disabled " } else { "" };
        out.push(Check::fail(
            POD_CIDR_OVERLAP,
            format!(
                "Cilium's pod CIDR {pod} overlaps {state}Calico IPPool {} ({}): pods on both CNIs could get the same \
                 addresses. Fix: {fix}.",
                pool.name, pool.cidr
            ),
        ));
    }
    if overlaps(snap.service_cidr, pod) {
        out.push(Check::fail(
            POD_CIDR_OVERLAP,
            format!(
                "Cilium's pod CIDR {pod} overlaps the service CIDR {}: pod and Service addresses would clash. Fix: {fix}.",
                snap.service_cidr
            ),
        ));
    }
    if let Some(cc) = snap.cluster_cidr.filter(|cc| overlaps(*cc, pod)) {
        out.push(Check::fail(
            POD_CIDR_OVERLAP,
            format!(
                "Cilium's pod CIDR {pod} overlaps the cluster CIDR {cc} (kube-controller-manager --cluster-cidr, \
                 which node podCIDR allocation and kube-proxy may use). Fix: {fix}."
            ),
        ));
    }
    let nodes: Vec<String> = snap
        .nodes
        .iter()
        .flat_map(|n| {
            n.internal_ips
                .iter()
                .filter(|ip| pod.contains(*ip))
                .map(move |ip| format!("{} ({ip})", n.name))
        })
        .collect();
    if !nodes.is_empty() {
        out.push(Check::fail(
            POD_CIDR_OVERLAP,
            format!(
                "Cilium's pod CIDR {pod} contains the InternalIP of node(s) {}: traffic to those nodes would be routed \
                 into the pod network. Fix: {fix}.",
                bounded(&nodes)
            ),
        ));
    }
    let pods: Vec<String> = snap
        .pods
        .iter()
        .filter(|p| p.network == PodNetwork::Calico)
        .filter_map(|p| {
            p.ip.filter(|ip| pod.contains(ip))
                .map(|ip| format!("{} ({ip})", p.pod))
        })
        .collect();
    if !pods.is_empty() {
        out.push(Check::fail(
            POD_CIDR_OVERLAP,
            format!(
                "Cilium's pod CIDR {pod} contains the Calico address of {}: {}. Fix: {fix}.",
                count(pods.len(), "pod"),
                bounded(&pods)
            ),
        ));
    }
    let routed = ctx
        .cfg
        .other_routed_cidrs
        .iter()
        .map(|c| (c, "otherRoutedCIDRs in the migration config"))
        .chain(
            snap.other_routed
                .iter()
                .map(|c| (c, "the cluster's declared other routed networks")),
        );
    for (net, source) in routed.filter(|(c, _)| overlaps(**c, pod)) {
        out.push(Check::fail(
            POD_CIDR_OVERLAP,
            format!(
                "Cilium's pod CIDR {pod} overlaps routed network {net} (from {source}): that network would become \
                 unreachable from Cilium pods. Fix: {fix}."
            ),
        ));
    }

    if out.is_empty() {
        let cluster = snap
            .cluster_cidr
            .map(|c| format!(", the cluster CIDR {c}"))
            .unwrap_or_default();
        let node_ips = snap
            .nodes
            .iter()
            .map(|n| n.internal_ips.len())
            .sum::<usize>();
        let routed = ctx
            .cfg
            .other_routed_cidrs
            .len()
            .saturating_add(snap.other_routed.len());
        let n_pools = ctx.calico_pools().count();
        let pools = if n_pools == 0 {
            "Calico IP pools (none)".to_string()
        } else {
            format!(
                "{} ({})",
                count(n_pools, "Calico IP pool"),
                bounded(ctx.calico_pools().map(|p| p.cidr))
            )
        };
        out.push(Check::pass(
            POD_CIDR_OVERLAP,
            format!(
                "Cilium's pod CIDR {pod} overlaps none of: {}, the service CIDR {}{cluster}, {}, Calico pod \
                 addresses, {}.",
                pools,
                snap.service_cidr,
                count(node_ips, "node InternalIP"),
                count(routed, "other routed network"),
            ),
        ));
    }
    out
}

/// Rule `tunnel-port`. Disabled pools count too (their allocated blocks are still routed over
/// VXLAN), except the disabled exemption pool for the new CIDR.
pub(super) fn tunnel_port(ctx: &Ctx<'_>) -> Vec<Check> {
    let proto = ctx.cfg.tunnel_protocol.as_str();
    let port = ctx.cfg.effective_tunnel_port();
    let calico_port = ctx.snap.calico.vxlan_port;
    let vxlan_pools: Vec<&str> = ctx
        .calico_pools()
        .filter(|p| p.encapsulation.uses_vxlan())
        .map(|p| p.name.as_str())
        .collect();
    if vxlan_pools.is_empty() {
        return vec![Check::pass(
            TUNNEL_PORT,
            format!(
                "No Calico IPPool uses VXLAN (IPIP uses no UDP port), so Cilium's {proto} port {port} cannot collide \
                 with Calico's tunnel."
            ),
        )];
    }
    if port != calico_port {
        return vec![Check::pass(
            TUNNEL_PORT,
            format!(
                "Cilium's {proto} port {port} differs from Calico's VXLAN port {calico_port} (IPPool(s) {}).",
                bounded(&vxlan_pools)
            ),
        )];
    }
    let suggestion = [ctx.cfg.tunnel_protocol.default_port(), 4789, 8472, 8473]
        .into_iter()
        .find(|p| *p != calico_port)
        .unwrap_or(8473);
    let how = if ctx.cfg.tunnel_port.is_some() {
        "the configured tunnelPort"
    } else {
        "Cilium's default"
    };
    vec![Check::fail(
        TUNNEL_PORT,
        format!(
            "Cilium's {proto} port {port} ({how}) equals Calico's VXLAN port (FelixConfiguration vxlanPort \
             {calico_port}) used by IPPool(s) {}: both tunnels would receive each other's packets. Fix: set tunnelPort \
             in the migration config to another free UDP port, e.g. {suggestion}; it must stay unchanged after the \
             migration.",
            bounded(&vxlan_pools)
        ),
    )]
}

/// How a method is spelled in `IP_AUTODETECTION_METHOD`.
fn method_text(a: &Autodetection) -> String {
    match a {
        Autodetection::FirstFound => "first-found".to_string(),
        Autodetection::KubernetesInternalIp => "kubernetes-internal-ip".to_string(),
        Autodetection::Interface(re) => format!("interface={}", short(re, 80)),
        Autodetection::SkipInterface(re) => format!("skip-interface={}", short(re, 80)),
        Autodetection::CanReach(d) => format!("can-reach={}", short(d, 80)),
        Autodetection::Cidrs(c) => format!("cidr={}", bounded(c)),
    }
}

/// Why this method could pick a Cilium interface, if it could.
fn autodetection_problem(a: &Autodetection, pod_cidr: Ipv4Net) -> Option<String> {
    match a {
        Autodetection::FirstFound => Some(
            "first-found takes the first interface with an address that is not on Calico's built-in skip list, and \
             cilium_host (which Cilium creates on every node, addressed from the new pod CIDR) is not on it"
                .to_string(),
        ),
        Autodetection::KubernetesInternalIp => None,
        Autodetection::Interface(re) => match calico_regex(re) {
            Err(e) => Some(format!(
                "the interface regex {:?} is invalid ({e}); Calico cannot autodetect with it and cnimig cannot prove it \
                 avoids Cilium's interfaces",
                short(re, 80)
            )),
            Ok(r) => {
                let hits: Vec<&str> = CILIUM_INTERFACES.iter().copied().filter(|n| r.is_match(n)).collect();
                (!hits.is_empty()).then(|| {
                    format!(
                        "the interface regex (matched unanchored, as Calico does) matches Cilium's {} (anchor it, \
                         e.g. ^eth0$, if you keep a regex)",
                        hits.join(", ")
                    )
                })
            }
        },
        Autodetection::SkipInterface(re) => match calico_regex(re) {
            Err(e) => Some(format!(
                "the skip-interface regex {:?} is invalid ({e}); Calico cannot autodetect with it and cnimig cannot \
                 prove it skips Cilium's interfaces",
                short(re, 80)
            )),
            Ok(r) => {
                let missed: Vec<&str> = CILIUM_INTERFACES.iter().copied().filter(|n| !r.is_match(n)).collect();
                (!missed.is_empty()).then(|| format!("the skip-interface regex does not skip Cilium's {}", missed.join(", ")))
            }
        },
        Autodetection::CanReach(dest) => dest.trim().parse::<Ipv4Addr>().ok().filter(|ip| pod_cidr.contains(ip)).map(|ip| {
            format!("the can-reach destination {ip} is inside the new pod CIDR {pod_cidr}, which is routed through cilium_host")
        }),
        Autodetection::Cidrs(cidrs) => {
            let hits: Vec<&Ipv4Net> = cidrs.iter().filter(|c| overlaps(**c, pod_cidr)).collect();
            (!hits.is_empty()).then(|| {
                format!(
                    "the cidr= list ({}) overlaps the new pod CIDR {pod_cidr}, from which cilium_host gets its address",
                    bounded(&hits)
                )
            })
        }
    }
}

/// Rule `calico-autodetection`.
pub(super) fn calico_autodetection(ctx: &Ctx<'_>) -> Vec<Check> {
    let calico = &ctx.snap.calico;
    let a = &calico.autodetection;
    let method = method_text(a);
    let (source, fix) = match calico.install {
        CalicoInstall::Operator => (
            "the operator's Installation default, spec.calicoNetwork.nodeAddressAutodetectionV4",
            "set spec.calicoNetwork.nodeAddressAutodetectionV4 to `kubernetes: NodeInternalIP` (and nothing else) in \
             Installation `default` (operator.tigera.io/v1); on RKE2 set it through the rke2-calico chart values \
             (installation.calicoNetwork.nodeAddressAutodetectionV4)",
        ),
        CalicoInstall::Manifest => (
            "env IP_AUTODETECTION_METHOD of DaemonSet kube-system/calico-node",
            "set env IP_AUTODETECTION_METHOD=kubernetes-internal-ip on container calico-node of DaemonSet \
             kube-system/calico-node",
        ),
    };
    let problem = autodetection_problem(a, ctx.pod_cidr()).or_else(|| {
        a.may_pick_cilium_interface().then(|| {
            "cnimig's model of this method says it may select a Cilium interface".to_string()
        })
    });
    match problem {
        Some(why) => vec![Check::fail(
            CALICO_AUTODETECTION,
            format!(
                "Calico's node address autodetection ({method}, from {source}) may pick a Cilium interface: {why}. \
                 Calico would then use the wrong node address and routing between nodes breaks. Fix before installing \
                 Cilium: {fix}. Afterwards check that every node's projectcalico.org/IPv4Address annotation still \
                 equals its InternalIP."
            ),
        )],
        None => vec![Check::pass(
            CALICO_AUTODETECTION,
            format!(
                "Calico's node address autodetection ({method}, from {source}) cannot pick Cilium's interfaces. After \
                 installing Cilium, check that every node's projectcalico.org/IPv4Address annotation still equals its \
                 InternalIP."
            ),
        )],
    }
}

/// Rule `calico-dataplane`.
pub(super) fn calico_dataplane(ctx: &Ctx<'_>) -> Vec<Check> {
    let calico = &ctx.snap.calico;
    let mut out = Vec::new();
    let outside = match calico.dataplane {
        Dataplane::Bpf => Some("the eBPF dataplane (linuxDataplane: BPF)"),
        Dataplane::Vpp => Some("the VPP dataplane"),
        Dataplane::Iptables | Dataplane::Nftables => None,
    };
    if let Some(dp) = outside {
        out.push(Check::fail(
            CALICO_DATAPLANE,
            format!(
                "Calico runs {dp}: Cilium's per-node migration supports only an old CNI that routes through the Linux \
                 stack. Fix: switch Calico to the Iptables (or Nftables) dataplane and let it settle before migrating, \
                 or migrate by rebuilding the cluster."
            ),
        ));
    }
    let native: Vec<String> = ctx
        .calico_pools()
        .filter(|p| !p.disabled && p.encapsulation == Encapsulation::None)
        .map(|p| format!("{} ({})", p.name, p.cidr))
        .collect();
    if calico.bgp || !native.is_empty() {
        let mut what = Vec::new();
        if calico.bgp {
            what.push("BGP is enabled".to_string());
        }
        if !native.is_empty() {
            what.push(format!(
                "IPPool(s) {} use no encapsulation",
                bounded(&native)
            ));
        }
        out.push(Check::warn(
            CALICO_DATAPLANE,
            format!(
                "Calico routes natively ({}): Cilium's migration procedure is untested with native routing. Try it on \
                 a staging cluster first and watch connectivity between Calico and Cilium nodes after the first node.",
                what.join("; ")
            ),
        ));
    }
    if out.is_empty() {
        let dp = match calico.dataplane {
            Dataplane::Nftables => "Nftables",
            _ => "Iptables",
        };
        out.push(Check::pass(
            CALICO_DATAPLANE,
            format!("Calico uses the {dp} dataplane with encapsulation and no BGP: supported by Cilium's procedure."),
        ));
    }
    out
}

/// Rule `nat-outgoing`.
pub(super) fn nat_outgoing(ctx: &Ctx<'_>) -> Vec<Check> {
    let pod = ctx.pod_cidr();
    let natting: Vec<String> = ctx
        .snap
        .calico
        .ip_pools
        .iter()
        .filter(|p| !p.disabled && p.nat_outgoing)
        .map(|p| format!("{} ({})", p.name, p.cidr))
        .collect();
    if natting.is_empty() {
        return vec![Check::pass(
            NAT_OUTGOING,
            "No enabled Calico IPPool has natOutgoing, so Calico does not SNAT traffic to Cilium pods.",
        )];
    }
    let exemption = ctx
        .snap
        .calico
        .ip_pools
        .iter()
        .find(|p| p.disabled && p.cidr.trunc().contains(&pod));
    match exemption {
        Some(ex) => vec![Check::pass(
            NAT_OUTGOING,
            format!(
                "Calico IPPool(s) {} have natOutgoing, but disabled IPPool {} ({}) covers Cilium's pod CIDR {pod}, so \
                 Calico should not SNAT traffic to Cilium pods (an inference: confirm with a test pod after the first \
                 node).",
                bounded(&natting),
                ex.name,
                ex.cidr
            ),
        )],
        None => vec![Check::warn(
            NAT_OUTGOING,
            format!(
                "Calico IPPool(s) {} have natOutgoing: Calico SNATs pod traffic to every address outside its pools, \
                 including Cilium's pod CIDR {pod}, so Cilium pods would see node addresses instead of Calico pod \
                 addresses. Fix: create a Calico IPPool with cidr {pod} and disabled: true before migrating (an \
                 inference from Calico's behaviour: confirm with a test pod).",
                bounded(&natting)
            ),
        )],
    }
}

/// Cilium's cluster pool hands each node one `/maskSize` block: the pool must have a block for
/// every node in the cluster (all of them run an agent), with room for nodes that join.
pub(super) fn pod_cidr_capacity(ctx: &Ctx<'_>) -> Vec<Check> {
    let pod = ctx.pod_cidr();
    let mask = ctx.cfg.mask_size;
    let bits = u32::from(mask.saturating_sub(pod.prefix_len()));
    let blocks: u64 = if bits >= 63 { u64::MAX } else { 1u64 << bits };
    let nodes = ctx.snap.nodes.len() as u64;
    if blocks < nodes {
        let need_prefix = 64 - (nodes.max(1) - 1).leading_zeros();
        vec![Check::fail(
            POD_CIDR_CAPACITY,
            format!(
                "Cilium's pod CIDR {pod} with maskSize {mask} has {blocks} per-node blocks, but the cluster has {nodes} \
                 nodes: agents on the nodes left without a block never become Ready. Fix: use a pod CIDR of at most \
                 /{} for maskSize {mask}, or a larger maskSize.",
                u32::from(mask).saturating_sub(need_prefix)
            ),
        )]
    } else {
        vec![Check::pass(
            POD_CIDR_CAPACITY,
            format!(
                "Cilium's pod CIDR {pod} with maskSize {mask} has {blocks} per-node blocks for {nodes} nodes."
            ),
        )]
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use ipnet::Ipv4Net;
    use proptest::prelude::*;

    use super::super::fixture::{Fixture, assert_pass, expect};
    use super::super::{RULE_IDS, Severity, overlaps, preflight};
    use super::*;
    use crate::config::TunnelProtocol;
    use crate::model::{Dataplane, Encapsulation, IpPool};

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn pool(name: &str, cidr: &str, enc: Encapsulation) -> IpPool {
        IpPool {
            name: name.into(),
            cidr: net(cidr),
            encapsulation: enc,
            nat_outgoing: false,
            disabled: false,
        }
    }

    // ---- pool capacity ----

    #[test]
    fn pod_cidr_capacity_counts_per_node_blocks() {
        let mut f = Fixture::healthy();
        assert_pass(&f.run(), POD_CIDR_CAPACITY);
        // A /22 with maskSize 24 has 4 blocks; the fixture has 3 nodes: fine. A /23 has 2: not.
        f.cfg.pod_cidr = net("10.245.0.0/23");
        let c = expect(&f.run(), POD_CIDR_CAPACITY, Severity::Fail);
        assert!(
            c[0].message.contains("2 per-node blocks"),
            "{}",
            c[0].message
        );
        assert!(
            c[0].message.contains("/22"),
            "suggests a pool that fits: {}",
            c[0].message
        );
        f.cfg.pod_cidr = net("10.245.0.0/22");
        assert_pass(&f.run(), POD_CIDR_CAPACITY);
    }

    // ---- regexes ----

    #[test]
    fn interface_regexes_are_matched_unanchored_like_go() {
        for re in [
            "cilium_host",
            "cilium.*",
            "host",
            "_net",
            "^cilium",
            "c",
            ".*",
            "",
            "eth0,cilium_host",
            "eth0 , ^cil",
        ] {
            assert!(
                interface_regex_may_match_cilium(re),
                "{re:?} should be judged to match"
            );
        }
        for re in [
            "^eth0$",
            "eth.*",
            "^ens[0-9]+",
            "^(eth|ens|eno)",
            "bond0,eth1",
            "^cilium_hostx",
            "CILIUM",
        ] {
            assert!(
                !interface_regex_may_match_cilium(re),
                "{re:?} should not match"
            );
        }
    }

    #[test]
    fn invalid_regexes_are_unsafe() {
        for re in ["(", "eth[", "a{2,1}", "eth{1,2}"] {
            // `eth{1,2}` is split on the comma as Calico does; Go would read `eth{1` literally, the
            // stricter Rust parser rejects it: the safe side.
            assert!(interface_regex_may_match_cilium(re), "{re:?}");
            assert!(!skip_interface_regex_excludes_cilium(re), "{re:?}");
        }
    }

    #[test]
    fn skip_interface_must_cover_every_cilium_interface() {
        assert!(skip_interface_regex_excludes_cilium("cilium_.*"));
        assert!(skip_interface_regex_excludes_cilium("^cilium"));
        assert!(skip_interface_regex_excludes_cilium("docker0, cilium"));
        assert!(!skip_interface_regex_excludes_cilium("cilium_host"));
        assert!(!skip_interface_regex_excludes_cilium("^eth1$"));
    }

    // ---- pod-cidr-overlap ----

    #[test]
    fn pod_cidr_overlapping_a_calico_pool_fails_naming_it() {
        let mut f = Fixture::healthy();
        f.snap
            .calico
            .ip_pools
            .push(pool("legacy-pool", "10.244.0.0/14", Encapsulation::Vxlan));
        let c = expect(&f.run(), POD_CIDR_OVERLAP, Severity::Fail);
        assert!(
            c.iter()
                .any(|c| c.message.contains("legacy-pool") && c.message.contains("10.244.0.0/14")),
            "{c:?}"
        );
    }

    #[test]
    fn pod_cidr_overlapping_service_cluster_nodes_pods_and_routed_nets_fails() {
        let mut f = Fixture::healthy();
        f.snap.service_cidr = net("10.245.128.0/20");
        f.snap.cluster_cidr = Some(net("10.0.0.0/8"));
        f.snap.nodes[1]
            .internal_ips
            .push(Ipv4Addr::new(10, 245, 3, 4));
        f.pod_mut("coredns-abc").ip = Some(Ipv4Addr::new(10, 245, 9, 9));
        f.cfg.other_routed_cidrs.push(net("10.245.200.0/24"));
        f.snap.other_routed.push(net("10.240.0.0/12"));
        let c = expect(&f.run(), POD_CIDR_OVERLAP, Severity::Fail);
        let all: String = c
            .iter()
            .map(|c| c.message.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        for needle in [
            "service CIDR 10.245.128.0/20",
            "cluster CIDR 10.0.0.0/8",
            "worker-1 (10.245.3.4)",
            "coredns/coredns-abc (10.245.9.9)",
            "10.245.200.0/24",
            "10.240.0.0/12",
        ] {
            assert!(all.contains(needle), "{needle} missing from {all}");
        }
        assert_eq!(c.len(), 6, "{all}");
    }

    #[test]
    fn adjacent_networks_and_the_disabled_exemption_pool_pass() {
        let mut f = Fixture::healthy();
        // 10.244.0.0/16 ends right before 10.245.0.0/16; 10.246.0.0/15 starts right after.
        f.snap
            .calico
            .ip_pools
            .push(pool("below", "10.244.0.0/16", Encapsulation::Ipip));
        f.snap.other_routed.push(net("10.246.0.0/15"));
        f.snap.nodes[0]
            .internal_ips
            .push(Ipv4Addr::new(10, 244, 255, 255));
        assert_pass(&f.run(), POD_CIDR_OVERLAP);
        // A disabled pool larger than the new CIDR may still hold allocations: it fails.
        f.snap.calico.ip_pools.push(IpPool {
            disabled: true,
            ..pool("old-disabled", "10.240.0.0/12", Encapsulation::Ipip)
        });
        let c = expect(&f.run(), POD_CIDR_OVERLAP, Severity::Fail);
        assert!(
            c[0].message.contains("disabled Calico IPPool old-disabled"),
            "{c:?}"
        );
    }

    // ---- tunnel-port ----

    #[test]
    fn equal_vxlan_ports_fail() {
        let mut f = Fixture::healthy();
        f.snap.calico.vxlan_port = 8472; // Cilium's default.
        let c = expect(&f.run(), TUNNEL_PORT, Severity::Fail);
        assert!(
            c[0].message.contains("8472") && c[0].message.contains("default-ipv4-ippool"),
            "{c:?}"
        );
        assert!(c[0].message.contains("e.g. 4789"), "{c:?}");
        // VXLANCrossSubnet counts as VXLAN; an explicit port too.
        let mut f = Fixture::healthy();
        f.snap.calico.ip_pools[0].encapsulation = Encapsulation::VxlanCrossSubnet;
        f.cfg.tunnel_port = Some(4789);
        let c = expect(&f.run(), TUNNEL_PORT, Severity::Fail);
        assert!(c[0].message.contains("configured tunnelPort"), "{c:?}");
    }

    #[test]
    fn tunnel_port_passes_when_ports_differ_or_calico_has_no_vxlan() {
        let mut f = Fixture::healthy();
        let r = f.run();
        assert_pass(&r, TUNNEL_PORT);
        assert!(
            r.with_id(TUNNEL_PORT)
                .any(|c| c.message.contains("8472") && c.message.contains("4789"))
        );
        f.snap.calico.vxlan_port = 8472;
        f.snap.calico.ip_pools[0].encapsulation = Encapsulation::Ipip;
        assert_pass(&f.run(), TUNNEL_PORT);
        f.snap.calico.ip_pools[0].encapsulation = Encapsulation::Vxlan;
        f.cfg.tunnel_protocol = TunnelProtocol::Geneve;
        assert_pass(&f.run(), TUNNEL_PORT);
    }

    // ---- calico-autodetection ----

    #[test]
    fn first_found_fails_with_the_fix_for_the_install_kind() {
        let mut f = Fixture::healthy();
        f.snap.calico.autodetection = Autodetection::FirstFound;
        let c = expect(&f.run(), CALICO_AUTODETECTION, Severity::Fail);
        assert!(
            c[0].message.contains("first-found") && c[0].message.contains("cilium_host"),
            "{c:?}"
        );
        assert!(c[0].message.contains("kubernetes: NodeInternalIP"), "{c:?}");
        f.snap.calico.install = CalicoInstall::Manifest;
        let c = expect(&f.run(), CALICO_AUTODETECTION, Severity::Fail);
        assert!(
            c[0].message
                .contains("IP_AUTODETECTION_METHOD=kubernetes-internal-ip"),
            "{c:?}"
        );
        assert!(c[0].message.contains("kube-system/calico-node"), "{c:?}");
    }

    #[test]
    fn matching_invalid_and_partial_skip_regexes_fail() {
        let mut f = Fixture::healthy();
        f.snap.calico.autodetection = Autodetection::Interface("eth.*|cilium.*".into());
        let c = expect(&f.run(), CALICO_AUTODETECTION, Severity::Fail);
        assert!(
            c[0].message.contains("interface=eth.*|cilium.*")
                && c[0].message.contains("cilium_host"),
            "{c:?}"
        );
        f.snap.calico.autodetection = Autodetection::Interface("eth[0-".into());
        let c = expect(&f.run(), CALICO_AUTODETECTION, Severity::Fail);
        assert!(c[0].message.contains("invalid"), "{c:?}");
        f.snap.calico.autodetection = Autodetection::SkipInterface("(".into());
        let c = expect(&f.run(), CALICO_AUTODETECTION, Severity::Fail);
        assert!(c[0].message.contains("invalid"), "{c:?}");
        f.snap.calico.autodetection = Autodetection::SkipInterface("cilium_host".into());
        let c = expect(&f.run(), CALICO_AUTODETECTION, Severity::Fail);
        assert!(
            c[0].message.contains("does not skip Cilium's cilium_net"),
            "{c:?}"
        );
        f.snap.calico.autodetection = Autodetection::CanReach("10.245.0.1".into());
        let c = expect(&f.run(), CALICO_AUTODETECTION, Severity::Fail);
        assert!(c[0].message.contains("can-reach"), "{c:?}");
        f.snap.calico.autodetection = Autodetection::Cidrs(vec![net("10.0.0.0/8")]);
        let c = expect(&f.run(), CALICO_AUTODETECTION, Severity::Fail);
        assert!(c[0].message.contains("cidr=10.0.0.0/8"), "{c:?}");
    }

    #[test]
    fn safe_autodetection_methods_pass() {
        for a in [
            Autodetection::KubernetesInternalIp,
            Autodetection::Interface("^eth0$".into()),
            Autodetection::Interface("ens.*, bond0".into()),
            Autodetection::SkipInterface("cilium_.*".into()),
            Autodetection::CanReach("8.8.8.8".into()),
            Autodetection::CanReach("www.example.com".into()),
            Autodetection::Cidrs(vec![net("192.168.1.0/24")]),
        ] {
            let mut f = Fixture::healthy();
            f.snap.calico.autodetection = a.clone();
            assert_pass(&f.run(), CALICO_AUTODETECTION);
        }
    }

    // ---- calico-dataplane ----

    #[test]
    fn bpf_and_vpp_fail_native_routing_warns() {
        for (dp, word) in [(Dataplane::Bpf, "eBPF"), (Dataplane::Vpp, "VPP")] {
            let mut f = Fixture::healthy();
            f.snap.calico.dataplane = dp;
            let c = expect(&f.run(), CALICO_DATAPLANE, Severity::Fail);
            assert!(c[0].message.contains(word), "{c:?}");
        }
        let mut f = Fixture::healthy();
        f.snap.calico.bgp = true;
        let c = expect(&f.run(), CALICO_DATAPLANE, Severity::Warn);
        assert!(c[0].message.contains("BGP"), "{c:?}");
        let mut f = Fixture::healthy();
        f.snap.calico.ip_pools[0].encapsulation = Encapsulation::None;
        let c = expect(&f.run(), CALICO_DATAPLANE, Severity::Warn);
        assert!(c[0].message.contains("default-ipv4-ippool"), "{c:?}");
    }

    #[test]
    fn iptables_and_nftables_with_encapsulation_pass() {
        let mut f = Fixture::healthy();
        assert_pass(&f.run(), CALICO_DATAPLANE);
        f.snap.calico.dataplane = Dataplane::Nftables;
        f.snap.calico.ip_pools[0].encapsulation = Encapsulation::IpipCrossSubnet;
        assert_pass(&f.run(), CALICO_DATAPLANE);
    }

    // ---- nat-outgoing ----

    #[test]
    fn nat_outgoing_without_exemption_pool_warns() {
        let mut f = Fixture::healthy();
        f.snap.calico.ip_pools.retain(|p| !p.disabled);
        let c = expect(&f.run(), NAT_OUTGOING, Severity::Warn);
        assert!(
            c[0].message.contains("default-ipv4-ippool") && c[0].message.contains("10.245.0.0/16"),
            "{c:?}"
        );
        assert!(c[0].message.contains("disabled: true"), "{c:?}");
    }

    #[test]
    fn nat_outgoing_passes_with_exemption_pool_or_without_nat() {
        let mut f = Fixture::healthy();
        assert_pass(&f.run(), NAT_OUTGOING);
        f.snap.calico.ip_pools.retain(|p| !p.disabled);
        f.snap.calico.ip_pools[0].nat_outgoing = false;
        assert_pass(&f.run(), NAT_OUTGOING);
    }

    // ---- properties ----

    fn small_net(base: u32) -> impl Strategy<Value = Ipv4Net> {
        (0u32..4096, 24u8..=30).prop_map(move |(off, len)| {
            Ipv4Net::new(Ipv4Addr::from(base.wrapping_add(off)), len)
                .map(|n| n.trunc())
                .unwrap_or_default()
        })
    }

    fn brute_overlap(a: Ipv4Net, b: Ipv4Net) -> bool {
        (u32::from(a.network())..=u32::from(a.broadcast())).any(|x| b.contains(&Ipv4Addr::from(x)))
    }

    fn any_autodetection() -> impl Strategy<Value = Autodetection> {
        prop_oneof![
            Just(Autodetection::FirstFound),
            Just(Autodetection::KubernetesInternalIp),
            "[a-z_.*^$|()\\[\\]{},0-9 \\\\-]{0,24}".prop_map(Autodetection::Interface),
            "[a-z_.*^$|()\\[\\]{},0-9 \\\\-]{0,24}".prop_map(Autodetection::SkipInterface),
            "\\PC{0,20}".prop_map(Autodetection::CanReach),
            proptest::collection::vec((any::<u32>(), 0u8..=32), 0..3).prop_map(|v| {
                Autodetection::Cidrs(
                    v.into_iter()
                        .filter_map(|(a, l)| Ipv4Net::new(Ipv4Addr::from(a), l).ok())
                        .collect(),
                )
            }),
        ]
    }

    fn any_net() -> impl Strategy<Value = Ipv4Net> {
        (any::<u32>(), 0u8..=32)
            .prop_map(|(a, l)| Ipv4Net::new(Ipv4Addr::from(a), l).unwrap_or_default())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn overlap_agrees_with_brute_force(a in small_net(0x0AC8_0000), b in small_net(0x0AC8_0000)) {
            prop_assert_eq!(overlaps(a, b), brute_overlap(a, b));
            prop_assert_eq!(overlaps(a, b), overlaps(b, a));
            // And the rule agrees: the only thing near the pod CIDR is one pool.
            let mut f = Fixture::healthy();
            f.cfg.pod_cidr = a;
            f.snap.calico.ip_pools = vec![pool("p", &b.to_string(), Encapsulation::Vxlan)];
            let failed = f.run().worst(POD_CIDR_OVERLAP) == Some(Severity::Fail);
            prop_assert_eq!(failed, brute_overlap(a, b));
        }

        #[test]
        fn random_networks_ports_and_methods_never_panic(
            pod in any_net(), svc in any_net(), pool_net in any_net(), routed in any_net(),
            cilium_port in proptest::option::of(any::<u16>()), calico_port in any::<u16>(),
            auto in any_autodetection(), disabled in any::<bool>(), geneve in any::<bool>(),
        ) {
            let mut f = Fixture::healthy();
            f.cfg.pod_cidr = pod;
            f.cfg.tunnel_port = cilium_port;
            if geneve { f.cfg.tunnel_protocol = TunnelProtocol::Geneve; }
            f.snap.service_cidr = svc;
            f.snap.other_routed.push(routed);
            f.snap.calico.vxlan_port = calico_port;
            f.snap.calico.autodetection = auto.clone();
            f.snap.calico.ip_pools.push(IpPool { disabled, ..pool("random", &pool_net.to_string(), Encapsulation::Vxlan) });
            let r = preflight(&f.snap, &f.cfg, &f.scope);
            for id in RULE_IDS {
                prop_assert!(r.worst(id).is_some(), "rule {} emitted nothing", id);
            }
            prop_assert!(r.checks.iter().all(|c| RULE_IDS.contains(&c.id) && !c.message.is_empty()));
            // The rule is at least as strict as the model.
            if auto.may_pick_cilium_interface() {
                prop_assert_eq!(r.worst(CALICO_AUTODETECTION), Some(Severity::Fail));
            }
        }
    }
}
