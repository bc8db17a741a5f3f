//! `MigrationConfig`: what the user asks for, validated before anything touches a cluster.
//!
//! Configs come from YAML (see [`MigrationConfig::from_yaml`]) or are built in code from
//! [`MigrationConfig::new`] and adjusted field by field, then checked with
//! [`MigrationConfig::validate`]. Every rejection names the field, the value and the fix.

use std::fmt;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::model::{LabelSelector, NodeName};

/// Cilium's tunnel encapsulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelProtocol {
    /// VXLAN (Cilium's default port 8472).
    Vxlan,
    /// Geneve (Cilium's default port 6081).
    Geneve,
}

impl TunnelProtocol {
    /// Cilium's default UDP port for this protocol.
    #[must_use]
    pub fn default_port(self) -> u16 {
        match self {
            TunnelProtocol::Vxlan => 8472,
            TunnelProtocol::Geneve => 6081,
        }
    }
    /// The Helm / ConfigMap spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelProtocol::Vxlan => "vxlan",
            TunnelProtocol::Geneve => "geneve",
        }
    }
}

/// Which nodes the run migrates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum NodeScope {
    /// Every node in the cluster (including nodes that join during the run).
    #[default]
    All,
    /// Exactly these nodes.
    Names(Vec<NodeName>),
    /// Nodes whose labels match.
    Selector(LabelSelector),
}

/// What to do when a node's step fails or times out. The node is always rolled back first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Roll the node back and stop starting new nodes (nodes in flight finish). The default.
    #[default]
    RollbackAndStop,
    /// Roll the node back and carry on with the others.
    RollbackAndContinue,
}

/// A validated migration configuration. Build with [`MigrationConfig::new`] or
/// [`MigrationConfig::from_yaml`]; check with [`MigrationConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationConfig {
    /// Cilium's new cluster-pool pod CIDR (must not overlap anything routed).
    pub pod_cidr: Ipv4Net,
    /// Per-node allocation size from the pool (`clusterPoolIPv4MaskSize`).
    pub mask_size: u8,
    /// Tunnel protocol for Cilium.
    pub tunnel_protocol: TunnelProtocol,
    /// Cilium's tunnel port; `None` means the protocol's default.
    pub tunnel_port: Option<u16>,
    /// The node label that selects the `CiliumNodeConfig`.
    pub migration_label: String,
    /// The `CiliumNodeConfig` name (in `kube-system`).
    pub node_config_name: String,
    /// Which nodes to migrate.
    pub scope: NodeScope,
    /// At most this many nodes between cordon and done at once.
    pub max_in_flight: u32,
    /// A drain that has not finished in this time fails the node.
    pub drain_timeout: Duration,
    /// Any other step that has not finished in this time fails the node.
    pub step_timeout: Duration,
    /// Migrate control-plane and etcd nodes only after every worker.
    pub control_plane_last: bool,
    /// What to do after a node fails.
    pub on_node_failure: FailurePolicy,
    /// Evict pods with `emptyDir` volumes (their data is lost, as with kubectl's
    /// `--delete-emptydir-data`).
    pub delete_emptydir_data: bool,
    /// Evict pods with no controller (they are not recreated, as with kubectl's `--force`).
    pub evict_unmanaged_pods: bool,
    /// Keep `bpf.hostLegacyRouting` after the migration (the safe choice).
    pub final_host_legacy_routing: bool,
    /// Other routed networks to keep clear of (VPNs, peered VPCs, on-premises ranges).
    pub other_routed_cidrs: Vec<Ipv4Net>,
    /// How often the orchestrator looks at nodes in flight.
    pub poll_interval: Duration,
}

/// A configuration value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}` = {value:?}: {problem}. Fix: {fix}")]
pub struct ConfigError {
    /// The field, as spelled in YAML.
    pub field: &'static str,
    /// The rejected value, as given.
    pub value: String,
    /// What is wrong.
    pub problem: String,
    /// What to do.
    pub fix: String,
}

/// Several rejected values, all reported at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "the migration config has {} problem(s):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}
impl std::error::Error for ConfigErrors {}

fn err(
    field: &'static str,
    value: impl fmt::Display,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> ConfigError {
    ConfigError {
        field,
        value: value.to_string(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// The YAML form: every field optional except the pod CIDR, durations as `30s`, `10m`, `1h`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    mask_size: Option<i64>,
    tunnel_protocol: Option<String>,
    tunnel_port: Option<i64>,
    migration_label: Option<String>,
    node_config_name: Option<String>,
    nodes: Option<Vec<String>>,
    node_selector: Option<LabelSelector>,
    max_in_flight: Option<i64>,
    drain_timeout: Option<String>,
    step_timeout: Option<String>,
    control_plane_last: Option<bool>,
    on_node_failure: Option<String>,
    delete_emptydir_data: Option<bool>,
    evict_unmanaged_pods: Option<bool>,
    final_host_legacy_routing: Option<bool>,
    #[serde(rename = "otherRoutedCIDRs")]
    other_routed_cidrs: Option<Vec<String>>,
    poll_interval: Option<String>,
}

/// Parses `90s`, `10m`, `1h30m`, `500ms`, or a bare number of seconds.
///
/// # Errors
/// A message saying what was expected.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("expected a number at {rest:?}"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("number too large in {s:?}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "" => {
                return Err(format!(
                    "missing unit after {n} in {s:?} (use ms, s, m or h)"
                ));
            }
            other => {
                return Err(format!(
                    "unknown unit {other:?} in {s:?} (use ms, s, m or h)"
                ));
            }
        };
        total = total.saturating_add(d);
    }
    Ok(total)
}

/// Default label selecting the `CiliumNodeConfig` (Cilium's documented convention).
pub const DEFAULT_MIGRATION_LABEL: &str = "io.cilium.migration/cilium-default";
/// Default `CiliumNodeConfig` name.
pub const DEFAULT_NODE_CONFIG_NAME: &str = "cilium-default";

impl MigrationConfig {
    /// A config with safe defaults for the given new pod CIDR: VXLAN on Cilium's default port,
    /// one node at a time, 10-minute drain timeout, control plane last, roll back and stop on
    /// failure, host legacy routing kept.
    #[must_use]
    pub fn new(pod_cidr: Ipv4Net) -> Self {
        MigrationConfig {
            pod_cidr,
            mask_size: 24,
            tunnel_protocol: TunnelProtocol::Vxlan,
            tunnel_port: None,
            migration_label: DEFAULT_MIGRATION_LABEL.to_string(),
            node_config_name: DEFAULT_NODE_CONFIG_NAME.to_string(),
            scope: NodeScope::All,
            max_in_flight: 1,
            drain_timeout: Duration::from_secs(600),
            step_timeout: Duration::from_secs(300),
            control_plane_last: true,
            on_node_failure: FailurePolicy::RollbackAndStop,
            delete_emptydir_data: true,
            evict_unmanaged_pods: false,
            final_host_legacy_routing: true,
            other_routed_cidrs: Vec::new(),
            poll_interval: Duration::from_secs(2),
        }
    }

    /// Cilium's effective tunnel port.
    #[must_use]
    pub fn effective_tunnel_port(&self) -> u16 {
        self.tunnel_port
            .unwrap_or_else(|| self.tunnel_protocol.default_port())
    }

    /// Parses and validates a YAML config.
    ///
    /// # Errors
    /// Every problem found, each naming the field, the value and the fix.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigErrors> {
        let raw: RawConfig = serde_yaml_ng::from_str(text).map_err(|e| {
            ConfigErrors(vec![err(
                "(document)",
                e.location().map(|l| format!("line {} column {}", l.line(), l.column())).unwrap_or_default(),
                format!("not a valid migration config: {e}"),
                "check the YAML against the documented fields (podCIDR, maskSize, tunnelProtocol, tunnelPort, maxInFlight, …)",
            )])
        })?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ConfigErrors> {
        let mut errors = Vec::new();
        let pod_cidr = match raw.pod_cidr.as_deref() {
            None => {
                errors.push(err(
                    "podCIDR",
                    "(missing)",
                    "the new pod CIDR is required",
                    "set podCIDR to an unused range, e.g. 10.245.0.0/16",
                ));
                None
            }
            Some(s) => match s.trim().parse::<Ipv4Net>() {
                Ok(n) => Some(n),
                Err(_) => {
                    errors.push(err(
                        "podCIDR",
                        s,
                        "not an IPv4 CIDR",
                        "write it as ADDRESS/PREFIX, e.g. 10.245.0.0/16",
                    ));
                    None
                }
            },
        };
        let mut cfg = MigrationConfig::new(pod_cidr.unwrap_or_default());
        if let Some(m) = raw.mask_size {
            match u8::try_from(m) {
                Ok(m) => cfg.mask_size = m,
                Err(_) => errors.push(err(
                    "maskSize",
                    m,
                    "out of range",
                    "use a prefix length between the pod CIDR's and 30, e.g. 24",
                )),
            }
        }
        if let Some(p) = raw.tunnel_protocol {
            match p.as_str() {
                "vxlan" => cfg.tunnel_protocol = TunnelProtocol::Vxlan,
                "geneve" => cfg.tunnel_protocol = TunnelProtocol::Geneve,
                _ => errors.push(err(
                    "tunnelProtocol",
                    &p,
                    "unknown tunnel protocol",
                    "use vxlan or geneve",
                )),
            }
        }
        if let Some(p) = raw.tunnel_port {
            match u16::try_from(p) {
                Ok(p) => cfg.tunnel_port = Some(p),
                Err(_) => errors.push(err(
                    "tunnelPort",
                    p,
                    "not a UDP port",
                    "use a port between 1 and 65535 that nothing else uses",
                )),
            }
        }
        if let Some(l) = raw.migration_label {
            cfg.migration_label = l;
        }
        if let Some(n) = raw.node_config_name {
            cfg.node_config_name = n;
        }
        match (raw.nodes, raw.node_selector) {
            (Some(_), Some(_)) => errors.push(err(
                "nodes",
                "(with nodeSelector)",
                "both nodes and nodeSelector are set",
                "keep one of them",
            )),
            (Some(names), None) => {
                let mut ok = Vec::new();
                for n in names {
                    match NodeName::new(n) {
                        Ok(n) => ok.push(n),
                        Err(e) => errors.push(err(
                            "nodes",
                            &e.name,
                            e.why,
                            "list node names exactly as `kubectl get nodes` prints them",
                        )),
                    }
                }
                cfg.scope = NodeScope::Names(ok);
            }
            (None, Some(sel)) => cfg.scope = NodeScope::Selector(sel),
            (None, None) => {}
        }
        if let Some(k) = raw.max_in_flight {
            match u32::try_from(k) {
                Ok(k) => cfg.max_in_flight = k,
                Err(_) => errors.push(err(
                    "maxInFlight",
                    k,
                    "must be a positive whole number",
                    "use 1 (one node at a time) or more",
                )),
            }
        }
        for (field, raw, slot) in [
            ("drainTimeout", raw.drain_timeout, &mut cfg.drain_timeout),
            ("stepTimeout", raw.step_timeout, &mut cfg.step_timeout),
            ("pollInterval", raw.poll_interval, &mut cfg.poll_interval),
        ] {
            if let Some(s) = raw {
                match parse_duration(&s) {
                    Ok(d) => *slot = d,
                    Err(e) => {
                        errors.push(err(field, &s, e, "write a duration such as 90s, 10m or 1h"))
                    }
                }
            }
        }
        if let Some(b) = raw.control_plane_last {
            cfg.control_plane_last = b;
        }
        if let Some(p) = raw.on_node_failure {
            match p.as_str() {
                "rollback-and-stop" => cfg.on_node_failure = FailurePolicy::RollbackAndStop,
                "rollback-and-continue" => cfg.on_node_failure = FailurePolicy::RollbackAndContinue,
                _ => errors.push(err(
                    "onNodeFailure",
                    &p,
                    "unknown policy",
                    "use rollback-and-stop or rollback-and-continue",
                )),
            }
        }
        if let Some(b) = raw.delete_emptydir_data {
            cfg.delete_emptydir_data = b;
        }
        if let Some(b) = raw.evict_unmanaged_pods {
            cfg.evict_unmanaged_pods = b;
        }
        if let Some(b) = raw.final_host_legacy_routing {
            cfg.final_host_legacy_routing = b;
        }
        for s in raw.other_routed_cidrs.unwrap_or_default() {
            match s.trim().parse::<Ipv4Net>() {
                Ok(n) => cfg.other_routed_cidrs.push(n),
                Err(_) => errors.push(err(
                    "otherRoutedCIDRs",
                    &s,
                    "not an IPv4 CIDR",
                    "write it as ADDRESS/PREFIX, e.g. 192.168.0.0/16",
                )),
            }
        }
        if pod_cidr.is_some()
            && let Err(ConfigErrors(more)) = cfg.validate()
        {
            errors.extend(more);
        }
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Checks the values against each other and against what Cilium accepts.
    ///
    /// # Errors
    /// Every problem found, each naming the field, the value and the fix.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let prefix = self.pod_cidr.prefix_len();
        if self.pod_cidr != self.pod_cidr.trunc() {
            errors.push(err(
                "podCIDR",
                self.pod_cidr,
                "host bits are set",
                format!("use the network address: {}", self.pod_cidr.trunc()),
            ));
        }
        if !(8..=28).contains(&prefix) {
            errors.push(err(
                "podCIDR",
                self.pod_cidr,
                "the prefix must be between /8 and /28",
                "pick a range such as a /16 that fits every node's allocation",
            ));
        }
        if self.mask_size <= prefix || self.mask_size > 30 {
            errors.push(err(
                "maskSize",
                self.mask_size,
                format!("each node's allocation must be smaller than the pod CIDR (/{prefix}) and at most /30"),
                format!("use a value between {} and 30, e.g. 24", prefix + 1),
            ));
        }
        if self.tunnel_port == Some(0) {
            errors.push(err(
                "tunnelPort",
                0,
                "port 0 is not a port",
                "leave it unset for Cilium's default or pick a free UDP port",
            ));
        }
        if let Err(why) = validate_label_key(&self.migration_label) {
            errors.push(err(
                "migrationLabel",
                &self.migration_label,
                why,
                "use a label key such as io.cilium.migration/cilium-default",
            ));
        }
        if NodeName::new(self.node_config_name.clone()).is_err() {
            errors.push(err(
                "nodeConfigName",
                &self.node_config_name,
                "not a valid object name",
                "use a lower-case name such as cilium-default",
            ));
        }
        if let NodeScope::Names(names) = &self.scope
            && names.is_empty()
        {
            errors.push(err(
                "nodes",
                "[]",
                "the list is empty, so nothing would migrate",
                "list at least one node, or remove the field to migrate every node",
            ));
        }
        if self.max_in_flight == 0 {
            errors.push(err(
                "maxInFlight",
                0,
                "zero nodes in flight would never migrate anything",
                "use 1 (one node at a time) or more",
            ));
        }
        for (field, d) in [
            ("drainTimeout", self.drain_timeout),
            ("stepTimeout", self.step_timeout),
        ] {
            if d < Duration::from_secs(10) {
                errors.push(err(
                    field,
                    format!("{d:?}"),
                    "too short for pods to terminate or an agent to restart",
                    "use at least 10s; 5m to 10m is typical",
                ));
            }
        }
        if self.poll_interval.is_zero() || self.poll_interval > Duration::from_secs(60) {
            errors.push(err(
                "pollInterval",
                format!("{:?}", self.poll_interval),
                "must be between 1ms and 60s",
                "use 2s",
            ));
        }
        for c in &self.other_routed_cidrs {
            if c != &c.trunc() {
                errors.push(err(
                    "otherRoutedCIDRs",
                    c,
                    "host bits are set",
                    format!("use the network address: {}", c.trunc()),
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

/// Checks a Kubernetes label key (`[prefix/]name`).
///
/// # Errors
/// What is wrong with it.
pub fn validate_label_key(key: &str) -> Result<(), &'static str> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && NodeName::new(p.to_string()).is_err()
    {
        return Err("the prefix before '/' is not a DNS subdomain");
    }
    if name.is_empty() || name.len() > 63 {
        return Err("the name part must be 1 to 63 characters");
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
    if !name.chars().all(ok_char)
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(
            "the name part must be alphanumeric, '-', '_' or '.', starting and ending alphanumeric",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_yaml_gets_safe_defaults() {
        let c = MigrationConfig::from_yaml("podCIDR: 10.245.0.0/16\n").unwrap();
        assert_eq!(c.max_in_flight, 1);
        assert!(c.control_plane_last);
        assert_eq!(c.on_node_failure, FailurePolicy::RollbackAndStop);
        assert_eq!(c.effective_tunnel_port(), 8472);
        assert_eq!(c.migration_label, DEFAULT_MIGRATION_LABEL);
    }

    #[test]
    fn full_yaml_parses() {
        let c = MigrationConfig::from_yaml(
            "podCIDR: 10.245.0.0/16\nmaskSize: 25\ntunnelProtocol: geneve\ntunnelPort: 6090\nmaxInFlight: 8\n\
             drainTimeout: 15m\nstepTimeout: 1h30m\nnodes: [worker-1, worker-2]\nonNodeFailure: rollback-and-continue\n\
             otherRoutedCIDRs: [192.168.0.0/16]\n",
        )
        .unwrap();
        assert_eq!(c.mask_size, 25);
        assert_eq!(c.tunnel_protocol, TunnelProtocol::Geneve);
        assert_eq!(c.effective_tunnel_port(), 6090);
        assert_eq!(c.drain_timeout, Duration::from_secs(900));
        assert_eq!(c.step_timeout, Duration::from_secs(5400));
        assert!(matches!(c.scope, NodeScope::Names(ref n) if n.len() == 2));
        assert_eq!(c.on_node_failure, FailurePolicy::RollbackAndContinue);
    }

    #[test]
    fn every_bad_field_is_named_with_a_fix() {
        let e = MigrationConfig::from_yaml(
            "podCIDR: 10.245.0.1/16\nmaskSize: 12\ntunnelProtocol: gre\nmaxInFlight: 0\ndrainTimeout: 10 parsecs\nnodes: [Worker_1]\n",
        )
        .unwrap_err();
        let fields: Vec<_> = e.0.iter().map(|e| e.field).collect();
        for f in [
            "podCIDR",
            "maskSize",
            "tunnelProtocol",
            "maxInFlight",
            "drainTimeout",
            "nodes",
        ] {
            assert!(fields.contains(&f), "{f} not reported in {e}");
        }
        assert!(e.0.iter().all(|e| !e.fix.is_empty()));
        assert!(
            e.to_string().contains("10.245.0.0/16"),
            "suggests the network address: {e}"
        );
    }

    #[test]
    fn missing_cidr_and_unknown_fields_are_rejected() {
        let e = MigrationConfig::from_yaml("maxInFlight: 2\n").unwrap_err();
        assert_eq!(e.0[0].field, "podCIDR");
        let e = MigrationConfig::from_yaml("podCIDR: 10.0.0.0/16\nmaxInFlite: 2\n").unwrap_err();
        assert!(e.to_string().contains("maxInFlite"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h2m3s").unwrap(), Duration::from_secs(3723));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn label_keys() {
        assert!(validate_label_key("io.cilium.migration/cilium-default").is_ok());
        assert!(validate_label_key("plain").is_ok());
        assert!(validate_label_key("Bad Prefix/x").is_err());
        assert!(validate_label_key("a/").is_err());
        assert!(validate_label_key("a/-x").is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_yaml_never_panics(s in "\\PC{0,200}") {
            let _ = MigrationConfig::from_yaml(&s);
        }
        #[test]
        fn arbitrary_durations_never_panic(s in "[0-9hmsx ]{0,12}") {
            let _ = parse_duration(&s);
        }
    }
}
