//! Calico's address autodetection, as `calico-node` runs it once when it starts: the address it
//! writes to its Node's `projectcalico.org/IPv4Address` annotation.
//!
//! The model is the trap the field report hit: with `first-found` (the default when
//! `IP_AUTODETECTION_METHOD` is unset) and a Cilium agent already running on the node,
//! `calico-node` picks `cilium_host` (Calico's default exclusions do not cover `cilium_*`; which
//! interface `first-found` meets first depends on the kernel's order, and the emulator takes the
//! bad order). `kubernetes-internal-ip`, or an `interface=` / `skip-interface=` regex that keeps
//! `cilium_*` out, gives the node's InternalIP.

use std::net::Ipv4Addr;

/// Node annotation `calico-node` writes with the address it autodetected (`ADDR/PREFIX`).
pub const IPV4_ADDRESS_ANNOTATION: &str = "projectcalico.org/IPv4Address";

/// The annotation value a starting `calico-node` writes.
///
/// `method` is the container's `IP_AUTODETECTION_METHOD` (`None`: unset, so `first-found`);
/// `internal` the node's InternalIP with its subnet prefix; `cilium_host` the address of the
/// node's `cilium_host` interface when a Cilium agent runs there.
#[must_use]
pub fn autodetected_address(
    method: Option<&str>,
    internal: (Ipv4Addr, u8),
    cilium_host: Option<Ipv4Addr>,
) -> String {
    let internal_s = format!("{}/{}", internal.0, internal.1);
    let Some(host) = cilium_host else {
        return internal_s;
    };
    let cilium_s = format!("{host}/32");
    let m = method.map(str::trim).unwrap_or("first-found");
    let can_pick = |re: &str| regex::Regex::new(re).is_ok_and(|r| r.is_match("cilium_host"));
    if m == "first-found" || m.is_empty() {
        cilium_s
    } else if let Some(re) = m.strip_prefix("interface=") {
        if can_pick(re) { cilium_s } else { internal_s }
    } else if let Some(re) = m.strip_prefix("skip-interface=") {
        if can_pick(re) { internal_s } else { cilium_s }
    } else {
        // kubernetes-internal-ip, can-reach= (routes to the peer go through the real
        // interface), cidr= (the node's subnet).
        internal_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_found_picks_cilium_host_only_when_it_exists() {
        let ip = (Ipv4Addr::new(172, 31, 0, 2), 16);
        let host = Some(Ipv4Addr::new(10, 245, 0, 1));
        assert_eq!(autodetected_address(None, ip, None), "172.31.0.2/16");
        assert_eq!(autodetected_address(None, ip, host), "10.245.0.1/32");
        assert_eq!(
            autodetected_address(Some("first-found"), ip, host),
            "10.245.0.1/32"
        );
        assert_eq!(
            autodetected_address(Some("kubernetes-internal-ip"), ip, host),
            "172.31.0.2/16"
        );
        assert_eq!(
            autodetected_address(Some("interface=^eth0$"), ip, host),
            "172.31.0.2/16"
        );
        assert_eq!(
            autodetected_address(Some("interface=.*"), ip, host),
            "10.245.0.1/32"
        );
        assert_eq!(
            autodetected_address(Some("skip-interface=cilium_.*"), ip, host),
            "172.31.0.2/16"
        );
    }
}
