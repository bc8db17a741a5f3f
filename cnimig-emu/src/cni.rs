//! The emulator's CNI decisions, pure: which `CiliumNodeConfig` an agent resolves, what a node's
//! `/etc/cni/net.d` holds once the agent is Ready, and which address a new pod gets.
//!
//! `cnimig-sim` models the same behaviour for the in-memory simulator; its public API did not
//! offer these decisions when this was written, so they are duplicated here in their smallest
//! form. Merge them when the simulator exposes its CNI model.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use cnimig_core::model::LabelSelector;
use cnimig_core::ports::CniDirState;
use ipnet::Ipv4Net;

/// Cilium's pod pool from `cilium-config`'s data: `cluster-pool-ipv4-cidr`, CIDRs separated by
/// spaces (as the Helm chart renders the list) or commas; entries that are not IPv4 CIDRs are
/// skipped. Empty when the key is absent.
///
/// ```
/// let data = [("cluster-pool-ipv4-cidr".to_string(), "10.245.0.0/16 10.246.0.0/16,x".to_string())].into();
/// let pool = cnimig_emu::cni::cilium_pool(&data);
/// assert_eq!(pool, ["10.245.0.0/16".parse().unwrap(), "10.246.0.0/16".parse().unwrap()]);
/// ```
#[must_use]
pub fn cilium_pool(data: &BTreeMap<String, String>) -> Vec<Ipv4Net> {
    data.get("cluster-pool-ipv4-cidr")
        .map(|v| {
            v.split(|c: char| c.is_whitespace() || c == ',')
                .filter_map(|s| s.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// One `CiliumNodeConfig`, as the agent's init container sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Object name.
    pub name: String,
    /// `spec.nodeSelector`.
    pub selector: LabelSelector,
    /// `spec.defaults`.
    pub defaults: BTreeMap<String, String>,
}

/// What an agent resolved at start-up: the merged `defaults` of every matching config (in name
/// order, later names overriding), and the name that sorts last (what cnimig checks).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resolved {
    /// The winning config's name, if any matched.
    pub name: Option<String>,
    /// Merged overrides of `cilium-config`.
    pub defaults: BTreeMap<String, String>,
}

/// Resolves the node configs for a node with `labels`, as Cilium does when its agent pod starts
/// (and only then).
#[must_use]
pub fn resolve(configs: &[NodeConfig], labels: &BTreeMap<String, String>) -> Resolved {
    let mut matching: Vec<&NodeConfig> = configs
        .iter()
        .filter(|c| c.selector.matches(labels))
        .collect();
    matching.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Resolved::default();
    for c in matching {
        out.defaults
            .extend(c.defaults.iter().map(|(k, v)| (k.clone(), v.clone())));
        out.name = Some(c.name.clone());
    }
    out
}

/// The CNI directory after an agent with `resolved` (over the global `cilium-config`) becomes
/// Ready on a node whose directory is `before`: with `custom-cni-conf` off and
/// `write-cni-conf-when-ready` set, the agent writes `05-cilium.conflist` and moves Calico's
/// conflist aside; otherwise it leaves the directory alone (it never restores it: that is the
/// rollback helper's job).
#[must_use]
pub fn cni_after_agent_ready(
    global: &BTreeMap<String, String>,
    resolved: &Resolved,
    before: CniDirState,
) -> CniDirState {
    let get = |k: &str| resolved.defaults.get(k).or_else(|| global.get(k));
    let custom = get("custom-cni-conf").is_some_and(|v| v == "true");
    let writes = get("write-cni-conf-when-ready").is_some_and(|v| !v.is_empty());
    if !custom && writes {
        CniDirState::CILIUM
    } else {
        before
    }
}

/// The `index`-th subnet of `mask` bits in `pool` (a node's block), if the pool has that many.
#[must_use]
pub fn node_block(pool: Ipv4Net, mask: u8, index: usize) -> Option<Ipv4Net> {
    pool.subnets(mask).ok()?.nth(index)
}

/// Hands out addresses from a node's block, skipping the network, the first host (the
/// gateway) and the broadcast address; wraps around when exhausted.
#[derive(Debug, Clone)]
pub struct Allocator {
    block: Ipv4Net,
    next: u32,
}

impl Allocator {
    /// An allocator over `block`.
    #[must_use]
    pub fn new(block: Ipv4Net) -> Self {
        Allocator { block, next: 2 }
    }
    /// The block it allocates from.
    #[must_use]
    pub fn block(&self) -> Ipv4Net {
        self.block
    }
    /// The next address.
    pub fn next_ip(&mut self) -> Ipv4Addr {
        let size = 1u32 << (32 - u32::from(self.block.prefix_len())).min(31);
        if self.next >= size.saturating_sub(1) {
            self.next = 2;
        }
        let ip = u32::from(self.block.network()).saturating_add(self.next);
        self.next += 1;
        Ipv4Addr::from(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, key: &str, defaults: &[(&str, &str)]) -> NodeConfig {
        NodeConfig {
            name: name.into(),
            selector: LabelSelector {
                match_labels: BTreeMap::from([(key.to_string(), "true".to_string())]),
                match_expressions: Vec::new(),
            },
            defaults: defaults
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        }
    }

    #[test]
    fn last_name_wins_and_only_matching_configs_count() {
        let configs = [
            cfg("b", "l", &[("cni-chaining-mode", "portmap")]),
            cfg("a", "l", &[("cni-chaining-mode", "none"), ("x", "1")]),
            cfg("z", "other", &[("x", "2")]),
        ];
        let labels = BTreeMap::from([("l".to_string(), "true".to_string())]);
        let r = resolve(&configs, &labels);
        assert_eq!(r.name.as_deref(), Some("b"));
        assert_eq!(r.defaults["cni-chaining-mode"], "portmap");
        assert_eq!(r.defaults["x"], "1");
        assert_eq!(resolve(&configs, &BTreeMap::new()), Resolved::default());
    }

    #[test]
    fn agent_writes_its_conflist_only_when_told() {
        let global = BTreeMap::from([("custom-cni-conf".to_string(), "true".to_string())]);
        let none = Resolved::default();
        assert_eq!(
            cni_after_agent_ready(&global, &none, CniDirState::CALICO),
            CniDirState::CALICO
        );
        let r = resolve(
            &[cfg(
                "cilium-default",
                "l",
                &[
                    ("custom-cni-conf", "false"),
                    (
                        "write-cni-conf-when-ready",
                        "/host/etc/cni/net.d/05-cilium.conflist",
                    ),
                ],
            )],
            &BTreeMap::from([("l".to_string(), "true".to_string())]),
        );
        assert_eq!(
            cni_after_agent_ready(&global, &r, CniDirState::CALICO),
            CniDirState::CILIUM
        );
        // A restarted agent without the config leaves Cilium's conflist in place.
        assert_eq!(
            cni_after_agent_ready(&global, &none, CniDirState::CILIUM),
            CniDirState::CILIUM
        );
    }

    #[test]
    fn blocks_and_addresses() {
        let pool: Ipv4Net = "10.245.0.0/16".parse().unwrap();
        let b = node_block(pool, 24, 3).unwrap();
        assert_eq!(b.to_string(), "10.245.3.0/24");
        let mut a = Allocator::new(b);
        assert_eq!(a.next_ip(), Ipv4Addr::new(10, 245, 3, 2));
        assert_eq!(a.next_ip(), Ipv4Addr::new(10, 245, 3, 3));
        assert!(node_block(pool, 24, 256).is_none());
    }
}
