//! Typed Calico policy input: `NetworkPolicy` and `GlobalNetworkPolicy` of
//! `projectcalico.org/v3` (what `calicoctl` and the Calico API server show) or
//! `crd.projectcalico.org/v1` (the CRDs that back them), plus `Tier`s for their order.
//!
//! Fields this module does not know are kept (see [`CalicoPolicy::unknown_fields`]) so the
//! conversion can report them instead of silently ignoring them. Selectors, nets and ports
//! stay as written and are validated by the conversion, which names the rule that is wrong.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which Calico policy resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyKind {
    /// Namespaced `NetworkPolicy`; becomes a `CiliumNetworkPolicy`.
    NetworkPolicy,
    /// Cluster-wide `GlobalNetworkPolicy`; becomes a `CiliumClusterwideNetworkPolicy`.
    GlobalNetworkPolicy,
}

/// Names one Calico policy in reports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyRef {
    /// The resource kind.
    pub kind: PolicyKind,
    /// The namespace (`None` for a `GlobalNetworkPolicy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The name.
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "NetworkPolicy {ns}/{}", self.name),
            None => write!(f, "GlobalNetworkPolicy {}", self.name),
        }
    }
}

/// One Calico `NetworkPolicy` or `GlobalNetworkPolicy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalicoPolicy {
    /// Resource kind.
    pub kind: PolicyKind,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` for a `NetworkPolicy` (`default` when absent, as `calicoctl`
    /// does); `None` for a `GlobalNetworkPolicy`.
    pub namespace: Option<String>,
    /// `spec`.
    pub spec: PolicySpec,
}

/// Direction of a policy type or rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyType {
    /// Traffic into the selected endpoints.
    Ingress,
    /// Traffic out of the selected endpoints.
    Egress,
}

impl fmt::Display for PolicyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyType::Ingress => "ingress",
            PolicyType::Egress => "egress",
        })
    }
}

/// `spec` of a Calico policy.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    /// Tier name; `None` or `default` is the default tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Evaluation order (lower first; absent sorts last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    /// Endpoints the policy applies to (empty: all, within the namespace for a
    /// `NetworkPolicy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// `GlobalNetworkPolicy` only: namespaces whose endpoints the policy applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    /// Endpoints whose service account's labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_selector: Option<String>,
    /// `Ingress`, `Egress`; defaulted by [`CalicoPolicy::types`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<PolicyType>>,
    /// Ingress rules, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Rule>,
    /// Egress rules, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Rule>,
    /// Untracked policy (host endpoints only).
    #[serde(default, skip_serializing_if = "is_false")]
    pub do_not_track: bool,
    /// Applied before DNAT (host endpoints only).
    #[serde(default, rename = "preDNAT", skip_serializing_if = "is_false")]
    pub pre_dnat: bool,
    /// Also applies to traffic forwarded through host endpoints.
    #[serde(default, skip_serializing_if = "is_false")]
    pub apply_on_forward: bool,
    /// `performanceHints` (no effect on what is allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub performance_hints: Option<Value>,
    /// Fields this module does not know.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

// serde's skip_serializing_if passes a reference.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_false(b: &bool) -> bool {
    !*b
}

/// A rule action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    /// Allow and stop evaluating.
    #[serde(alias = "allow")]
    Allow,
    /// Drop and stop evaluating.
    #[serde(alias = "deny")]
    Deny,
    /// Log and go on to the next rule.
    #[serde(alias = "log")]
    Log,
    /// Skip the rest of the tier.
    #[serde(alias = "pass")]
    Pass,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// What to do on a match.
    pub action: Action,
    /// 4 or 6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<u8>,
    /// IP protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Any protocol but this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_protocol: Option<Protocol>,
    /// ICMP type and code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpMatch>,
    /// Any ICMP but this type and code.
    #[serde(default, rename = "notICMP", skip_serializing_if = "Option::is_none")]
    pub not_icmp: Option<IcmpMatch>,
    /// Matches on the packet's source.
    #[serde(default)]
    pub source: EntityRule,
    /// Matches on the packet's destination.
    #[serde(default)]
    pub destination: EntityRule,
    /// HTTP method and path (Calico enforces these only with application layer policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpMatch>,
    /// Rule annotations (no effect on what is allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Fields this module does not know.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

impl Rule {
    /// A rule with this action and nothing else (matches everything).
    #[must_use]
    pub fn new(action: Action) -> Rule {
        Rule {
            action,
            ip_version: None,
            protocol: None,
            not_protocol: None,
            icmp: None,
            not_icmp: None,
            source: EntityRule::default(),
            destination: EntityRule::default(),
            http: None,
            metadata: None,
            unknown: BTreeMap::new(),
        }
    }
}

/// Source or destination match criteria.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntityRule {
    /// CIDRs (or bare IPs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<String>,
    /// Not in any of these CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_nets: Vec<String>,
    /// Endpoint selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Not an endpoint matching this selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_selector: Option<String>,
    /// Namespaces of the endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    /// Service accounts of the endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<ServiceAccountMatch>,
    /// Ports (numbers, `"a:b"` ranges, or named ports).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    /// Not these ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<Port>,
    /// A Kubernetes service (its endpoints and their ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<ServiceMatch>,
    /// Fields this module does not know.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

impl EntityRule {
    /// True when nothing is set (matches anything).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self == &EntityRule::default()
    }
}

/// `serviceAccounts`: names and/or a selector over the service accounts' labels (ANDed).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ServiceAccountMatch {
    /// Service account names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Selector over service account labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

/// `services`: a Kubernetes service by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceMatch {
    /// Service name.
    pub name: String,
    /// Service namespace (the policy's namespace when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// ICMP type and code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IcmpMatch {
    /// ICMP type (0–255).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    /// ICMP code (needs a type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u8>,
}

/// HTTP match criteria: a method in `methods` (if any) and a path in `paths` (if any).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HttpMatch {
    /// Methods, ORed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Paths, ORed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<HttpPath>,
}

/// One HTTP path match: exactly one of `exact` and `prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HttpPath {
    /// The whole path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// A string prefix of the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// An IP protocol by name or number (numbers of named protocols are normalised to names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "NumOrString", into = "NumOrString")]
pub enum Protocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// ICMP (1).
    Icmp,
    /// ICMPv6 (58).
    IcmpV6,
    /// SCTP (132).
    Sctp,
    /// UDP-Lite (136).
    UdpLite,
    /// Any other protocol number.
    Number(u8),
}

impl Protocol {
    /// The IP protocol number.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Icmp => 1,
            Protocol::IcmpV6 => 58,
            Protocol::Sctp => 132,
            Protocol::UdpLite => 136,
            Protocol::Number(n) => n,
        }
    }
    /// The protocol for a number.
    #[must_use]
    pub fn from_number(n: u8) -> Protocol {
        match n {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            1 => Protocol::Icmp,
            58 => Protocol::IcmpV6,
            132 => Protocol::Sctp,
            136 => Protocol::UdpLite,
            n => Protocol::Number(n),
        }
    }
    /// True for the protocols that have ports in Calico (TCP, UDP, SCTP, UDP-Lite).
    #[must_use]
    pub fn has_ports(self) -> bool {
        matches!(
            self,
            Protocol::Tcp | Protocol::Udp | Protocol::Sctp | Protocol::UdpLite
        )
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Tcp => f.write_str("TCP"),
            Protocol::Udp => f.write_str("UDP"),
            Protocol::Icmp => f.write_str("ICMP"),
            Protocol::IcmpV6 => f.write_str("ICMPv6"),
            Protocol::Sctp => f.write_str("SCTP"),
            Protocol::UdpLite => f.write_str("UDPLite"),
            Protocol::Number(n) => write!(f, "{n}"),
        }
    }
}

/// A number or a string, as Calico's `numorstring` types accept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NumOrString {
    /// A number.
    Num(u64),
    /// A string.
    Str(String),
}

impl TryFrom<NumOrString> for Protocol {
    type Error = String;
    fn try_from(v: NumOrString) -> Result<Self, Self::Error> {
        match v {
            NumOrString::Num(n) => u8::try_from(n)
                .ok()
                .filter(|n| *n >= 1)
                .map(Protocol::from_number)
                .ok_or_else(|| format!("protocol number {n} is not in 1-255")),
            NumOrString::Str(s) => match s.to_ascii_lowercase().as_str() {
                "tcp" => Ok(Protocol::Tcp),
                "udp" => Ok(Protocol::Udp),
                "icmp" => Ok(Protocol::Icmp),
                "icmpv6" => Ok(Protocol::IcmpV6),
                "sctp" => Ok(Protocol::Sctp),
                "udplite" => Ok(Protocol::UdpLite),
                other => other
                    .parse::<u64>()
                    .map_err(|_| {
                        format!(
                            "unknown protocol {s:?}: use TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or a number 1-255"
                        )
                    })
                    .and_then(|n| Protocol::try_from(NumOrString::Num(n))),
            },
        }
    }
}

impl From<Protocol> for NumOrString {
    fn from(p: Protocol) -> NumOrString {
        match p {
            Protocol::Number(n) => NumOrString::Num(u64::from(n)),
            other => NumOrString::Str(other.to_string()),
        }
    }
}

/// A port match: a number, a `"first:last"` range, or a named port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "NumOrString", into = "NumOrString")]
pub enum Port {
    /// One port.
    Number(u16),
    /// An inclusive range.
    Range(u16, u16),
    /// A container port name.
    Named(String),
}

impl TryFrom<NumOrString> for Port {
    type Error = String;
    fn try_from(v: NumOrString) -> Result<Self, Self::Error> {
        let num = |s: &str| s.trim().parse::<u16>().ok();
        match v {
            NumOrString::Num(n) => u16::try_from(n)
                .map(Port::Number)
                .map_err(|_| format!("port {n} is not in 0-65535")),
            NumOrString::Str(s) => {
                if let Some(n) = num(&s) {
                    return Ok(Port::Number(n));
                }
                if let Some((a, b)) = s.split_once(':') {
                    return match (num(a), num(b)) {
                        (Some(a), Some(b)) if a <= b => Ok(Port::Range(a, b)),
                        _ => Err(format!(
                            "port range {s:?} must be \"first:last\" with first <= last, both 0-65535"
                        )),
                    };
                }
                let valid_name = !s.is_empty()
                    && s.len() <= 15
                    && s.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && s.bytes().any(|b| b.is_ascii_lowercase());
                if valid_name {
                    Ok(Port::Named(s))
                } else {
                    Err(format!(
                        "{s:?} is neither a port number, a \"first:last\" range, nor a port name"
                    ))
                }
            }
        }
    }
}

impl From<Port> for NumOrString {
    fn from(p: Port) -> NumOrString {
        match p {
            Port::Number(n) => NumOrString::Num(u64::from(n)),
            Port::Range(a, b) => NumOrString::Str(format!("{a}:{b}")),
            Port::Named(s) => NumOrString::Str(s),
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Port::Number(n) => write!(f, "{n}"),
            Port::Range(a, b) => write!(f, "{a}:{b}"),
            Port::Named(s) => f.write_str(s),
        }
    }
}

/// A Calico `Tier` (only its order matters here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tier {
    /// Tier name.
    pub name: String,
    /// Tier order (lower first; absent sorts last).
    pub order: Option<f64>,
}

/// The order of Calico's `default` tier when no `Tier` object says otherwise.
pub const DEFAULT_TIER_ORDER: f64 = 1_000_000.0;

impl CalicoPolicy {
    /// Names this policy in reports.
    #[must_use]
    pub fn reference(&self) -> PolicyRef {
        PolicyRef {
            kind: self.kind,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The tier name (`default` when absent).
    #[must_use]
    pub fn tier(&self) -> &str {
        match self.spec.tier.as_deref() {
            None | Some("") => "default",
            Some(t) => t,
        }
    }

    /// The effective policy types: as written, or Calico's default when absent (`Ingress`
    /// unless there are egress rules; `Egress` too when there are; only `Egress` when there
    /// are egress rules and no ingress rules).
    #[must_use]
    pub fn types(&self) -> Vec<PolicyType> {
        match &self.spec.types {
            Some(t) if !t.is_empty() => {
                let mut t = t.clone();
                t.sort();
                t.dedup();
                t
            }
            _ => match (self.spec.ingress.is_empty(), self.spec.egress.is_empty()) {
                (_, true) => vec![PolicyType::Ingress],
                (false, false) => vec![PolicyType::Ingress, PolicyType::Egress],
                (true, false) => vec![PolicyType::Egress],
            },
        }
    }

    /// Whether the policy applies in a direction.
    #[must_use]
    pub fn has_type(&self, t: PolicyType) -> bool {
        self.types().contains(&t)
    }

    /// The rules of one direction.
    #[must_use]
    pub fn rules(&self, t: PolicyType) -> &[Rule] {
        match t {
            PolicyType::Ingress => &self.spec.ingress,
            PolicyType::Egress => &self.spec.egress,
        }
    }

    /// Paths (like `spec.ingress[0].source.fooBar`) of every field this module does not know.
    #[must_use]
    pub fn unknown_fields(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .spec
            .unknown
            .keys()
            .map(|k| format!("spec.{k}"))
            .collect();
        for (dir, rules) in [
            ("ingress", &self.spec.ingress),
            ("egress", &self.spec.egress),
        ] {
            for (i, r) in rules.iter().enumerate() {
                out.extend(r.unknown.keys().map(|k| format!("spec.{dir}[{i}].{k}")));
                for (side, e) in [("source", &r.source), ("destination", &r.destination)] {
                    out.extend(
                        e.unknown
                            .keys()
                            .map(|k| format!("spec.{dir}[{i}].{side}.{k}")),
                    );
                }
            }
        }
        out
    }
}

/// A document that was not converted, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedDocument {
    /// 0-based index of the document in the input (items of a `List` count separately).
    pub index: usize,
    /// `apiVersion/kind` as written.
    pub kind: String,
    /// `metadata.name` if any.
    pub name: String,
    /// Why it was skipped.
    pub reason: String,
    /// True for a Calico policy that does not fit the schema (bad input, which a caller
    /// should refuse); false for objects that are simply not converted.
    #[serde(default, skip_serializing_if = "is_false")]
    pub invalid: bool,
}

/// A Calico `NetworkSet` (namespaced) or `GlobalNetworkSet`: addresses that rule selectors
/// match by the set's labels, as they match pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSet {
    /// Namespace (`None` for a `GlobalNetworkSet`).
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// Labels (what selectors match).
    pub labels: BTreeMap<String, String>,
    /// `spec.nets`.
    pub nets: Vec<String>,
}

impl NetworkSet {
    /// The labels Calico's rule selectors see on the set: its own labels and, for a namespaced
    /// `NetworkSet`, `projectcalico.org/namespace` and its namespace's labels as `pcns.<key>`
    /// (with `pcns.projectcalico.org/name`), as on a pod of that namespace (libcalico-go gives
    /// a namespaced set the namespace's profile, whose labels it inherits). A
    /// `GlobalNetworkSet` has its own labels only. `namespace_labels`: the labels of the set's
    /// namespace (ignored for a `GlobalNetworkSet`).
    #[must_use]
    pub fn selector_labels(
        &self,
        namespace_labels: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let mut out = self.labels.clone();
        if let Some(ns) = &self.namespace {
            out.insert("projectcalico.org/namespace".into(), ns.clone());
            for (k, v) in namespace_labels {
                out.insert(format!("pcns.{k}"), v.clone());
            }
            out.insert("pcns.projectcalico.org/name".into(), ns.clone());
        }
        out
    }

    /// `spec.nets` parsed (host bits masked; a bare address is a /32 or /128), and the entries
    /// that are not CIDRs or addresses (Calico rejects such a set).
    #[must_use]
    pub fn parsed_nets(&self) -> (Vec<ipnet::IpNet>, Vec<String>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for s in &self.nets {
            match s
                .trim()
                .parse::<ipnet::IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| s.trim().parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            {
                Ok(n) => ok.push(n),
                Err(_) => bad.push(s.clone()),
            }
        }
        (ok, bad)
    }
}

impl fmt::Display for NetworkSet {
    /// `NetworkSet ns/name` or `GlobalNetworkSet name`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "NetworkSet {ns}/{}", self.name),
            None => write!(f, "GlobalNetworkSet {}", self.name),
        }
    }
}

/// What [`parse_documents`] found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ParsedDocuments {
    /// Calico policies, in input order.
    pub policies: Vec<CalicoPolicy>,
    /// Calico tiers.
    pub tiers: Vec<Tier>,
    /// Calico `NetworkSet` and `GlobalNetworkSet` objects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_sets: Vec<NetworkSet>,
    /// Labels of the Kubernetes `Namespace` objects in the input, by name (for network sets
    /// selected through namespace labels; see [`super::convert::ConvertOptions::namespace_labels`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Everything else, with the reason.
    pub skipped: Vec<SkippedDocument>,
    /// Kubernetes `NetworkPolicy` objects found in the input (also listed in `skipped`), for
    /// [`super::audit::audit_k8s_network_policies`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kubernetes_network_policies: Vec<Value>,
}

impl ParsedDocuments {
    /// Appends another parse result (for several input files).
    pub fn extend(&mut self, other: ParsedDocuments) {
        let base =
            self.policies.len() + self.tiers.len() + self.network_sets.len() + self.skipped.len();
        self.policies.extend(other.policies);
        self.tiers.extend(other.tiers);
        self.network_sets.extend(other.network_sets);
        self.namespaces.extend(other.namespaces);
        self.kubernetes_network_policies
            .extend(other.kubernetes_network_policies);
        self.skipped.extend(other.skipped.into_iter().map(|mut s| {
            s.index += base;
            s
        }));
    }
}

/// Input that is not YAML (or JSON) at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "document {document} is not valid YAML: {message}; fix the syntax (documents before it were read)"
)]
pub struct PolicyInputError {
    /// 0-based document index.
    pub document: usize,
    /// The YAML parser's message (with line and column).
    pub message: String,
}

/// Parses a multi-document YAML (or JSON) text of Calico objects, as `kubectl get -o yaml` or
/// `calicoctl get -o yaml` print them (`List` objects are unpacked): Calico policies, tiers and
/// network sets, and the labels of Kubernetes `Namespace` objects. Other documents, and Calico
/// policies that do not fit the schema ([`SkippedDocument::invalid`]), are listed in
/// [`ParsedDocuments::skipped`] with the reason.
///
/// # Errors
/// [`PolicyInputError`] when a document is not YAML at all.
pub fn parse_documents(text: &str) -> Result<ParsedDocuments, PolicyInputError> {
    let mut out = ParsedDocuments::default();
    let mut index = 0usize;
    for (doc_no, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                return Err(PolicyInputError {
                    document: doc_no,
                    message: e.to_string(),
                });
            }
        };
        if value.is_null() {
            continue;
        }
        parse_value(&value, &mut index, &mut out);
    }
    Ok(out)
}

/// Classifies one object (recursing into `List`s).
pub fn parse_value(value: &Value, index: &mut usize, out: &mut ParsedDocuments) {
    let s = |p: &str| value.pointer(p).and_then(Value::as_str).unwrap_or("");
    let api = s("/apiVersion");
    let kind = s("/kind");
    let name = s("/metadata/name").to_string();
    if let Some(items) = value.get("items").and_then(Value::as_array)
        && (kind == "List" || kind.ends_with("List"))
    {
        for item in items {
            parse_value(item, index, out);
        }
        return;
    }
    let here = *index;
    *index += 1;
    let skip = |reason: String| SkippedDocument {
        index: here,
        kind: format!("{api}/{kind}"),
        name: name.clone(),
        reason,
        invalid: false,
    };
    let invalid = |reason: String| SkippedDocument {
        invalid: true,
        ..skip(reason)
    };
    if api == "v1" && kind == "Namespace" && !name.is_empty() {
        let labels = value
            .pointer("/metadata/labels")
            .cloned()
            .and_then(|l| serde_json::from_value(l).ok())
            .unwrap_or_default();
        out.namespaces.insert(name, labels);
        return;
    }
    let calico = matches!(api, "projectcalico.org/v3" | "crd.projectcalico.org/v1");
    if !calico {
        let reason = if api == "networking.k8s.io/v1" && kind == "NetworkPolicy" {
            out.kubernetes_network_policies.push(value.clone());
            "a Kubernetes NetworkPolicy: Cilium enforces it as is (see policy::audit for the \
             known differences)"
                .to_string()
        } else {
            "not a Calico object (apiVersion projectcalico.org/v3 or crd.projectcalico.org/v1)"
                .to_string()
        };
        out.skipped.push(skip(reason));
        return;
    }
    let policy_kind = match kind {
        "NetworkPolicy" => PolicyKind::NetworkPolicy,
        "GlobalNetworkPolicy" => PolicyKind::GlobalNetworkPolicy,
        "Tier" => {
            let order = value.pointer("/spec/order").and_then(Value::as_f64);
            out.tiers.push(Tier { name, order });
            return;
        }
        "NetworkSet" | "GlobalNetworkSet" => {
            let labels = value
                .pointer("/metadata/labels")
                .cloned()
                .and_then(|l| serde_json::from_value(l).ok())
                .unwrap_or_default();
            let nets = value
                .pointer("/spec/nets")
                .and_then(Value::as_array)
                .map(|a| {
                    // A non-string entry is kept as written, so the conversion reports it.
                    a.iter()
                        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let namespace = (kind == "NetworkSet").then(|| match s("/metadata/namespace") {
                "" => "default".to_string(),
                ns => ns.to_string(),
            });
            out.network_sets.push(NetworkSet {
                namespace,
                name,
                labels,
                nets,
            });
            return;
        }
        k if k.starts_with("Staged") => {
            out.skipped.push(skip(
                "a staged policy: it does not enforce anything, so there is nothing to convert"
                    .into(),
            ));
            return;
        }
        _ => {
            out.skipped.push(skip(format!(
                "Calico {kind} is not a policy: only NetworkPolicy and GlobalNetworkPolicy are converted"
            )));
            return;
        }
    };
    if name.is_empty() {
        out.skipped.push(invalid("metadata.name is missing".into()));
        return;
    }
    let spec_value = value
        .get("spec")
        .cloned()
        .unwrap_or(Value::Object(Default::default()));
    let spec: PolicySpec = match serde_json::from_value(spec_value) {
        Ok(spec) => spec,
        Err(e) => {
            out.skipped
                .push(invalid(format!("spec does not fit the Calico schema: {e}")));
            return;
        }
    };
    let namespace = match policy_kind {
        PolicyKind::NetworkPolicy => Some(match s("/metadata/namespace") {
            "" => "default".to_string(),
            ns => ns.to_string(),
        }),
        PolicyKind::GlobalNetworkPolicy => None,
    };
    // Calico's CRD backend stores a `default`-tier policy as `default.<name>` (libcalico-go
    // `names.TieredPolicyName`, before v3.32); its v3 name, and so the Cilium name, is `<name>`.
    let name = match (api, spec.tier.as_deref()) {
        ("crd.projectcalico.org/v1", None | Some("" | "default")) => name
            .strip_prefix("default.")
            .filter(|n| !n.is_empty())
            .map_or(name.clone(), str::to_string),
        _ => name,
    };
    out.policies.push(CalicoPolicy {
        kind: policy_kind,
        name,
        namespace,
        spec,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_backend_default_tier_names_lose_their_prefix() {
        let text = "apiVersion: crd.projectcalico.org/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: default.allow-dns}\nspec: {selector: all()}\n---\napiVersion: crd.projectcalico.org/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: security.deny-x}\nspec: {tier: security, selector: all()}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: default.kept}\nspec: {selector: all()}\n";
        let parsed = parse_documents(text).unwrap();
        let names: Vec<&str> = parsed.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["allow-dns", "security.deny-x", "default.kept"]);
    }

    #[test]
    fn parses_ports_protocols_and_unknown_fields() {
        let text = r#"
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: p, namespace: shop}
spec:
  selector: app == 'web'
  fancyNewField: 1
  ingress:
  - action: Allow
    protocol: 6
    source: {selector: app == 'x', madeUp: true}
    destination: {ports: [80, "8000:8100", http, "443"]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: k, namespace: shop}
spec: {podSelector: {}}
---
apiVersion: crd.projectcalico.org/v1
kind: Tier
metadata: {name: security}
spec: {order: 100}
"#;
        let parsed = parse_documents(text).unwrap();
        assert_eq!(parsed.policies.len(), 1);
        let p = &parsed.policies[0];
        assert_eq!(p.spec.ingress[0].protocol, Some(Protocol::Tcp));
        assert_eq!(
            p.spec.ingress[0].destination.ports,
            vec![
                Port::Number(80),
                Port::Range(8000, 8100),
                Port::Named("http".into()),
                Port::Number(443)
            ]
        );
        assert_eq!(
            p.unknown_fields(),
            vec![
                "spec.fancyNewField".to_string(),
                "spec.ingress[0].source.madeUp".to_string()
            ]
        );
        assert_eq!(p.types(), vec![PolicyType::Ingress]);
        assert_eq!(parsed.skipped.len(), 1);
        assert_eq!(parsed.tiers[0].order, Some(100.0));
    }

    #[test]
    fn bad_documents_are_skipped_with_a_reason() {
        let text = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: g}\nspec: {ingress: [{action: Allow, protocol: TCP, destination: {ports: [\"90:80\"]}}]}\n";
        let parsed = parse_documents(text).unwrap();
        assert!(parsed.policies.is_empty());
        assert!(
            parsed.skipped[0].reason.contains("90:80"),
            "{:?}",
            parsed.skipped
        );
        assert!(parse_documents("a: [").is_err());
    }

    #[test]
    fn default_types_follow_calico() {
        let mut p = CalicoPolicy {
            kind: PolicyKind::GlobalNetworkPolicy,
            name: "g".into(),
            namespace: None,
            spec: PolicySpec::default(),
        };
        assert_eq!(p.types(), vec![PolicyType::Ingress]);
        p.spec.egress.push(Rule::new(Action::Allow));
        assert_eq!(p.types(), vec![PolicyType::Egress]);
        p.spec.ingress.push(Rule::new(Action::Allow));
        assert_eq!(p.types(), vec![PolicyType::Ingress, PolicyType::Egress]);
    }
}
