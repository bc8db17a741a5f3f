//! The subset of `CiliumNetworkPolicy` / `CiliumClusterwideNetworkPolicy` (`cilium.io/v2`)
//! that the conversion writes and the Cilium evaluator reads, as serde types with Cilium's
//! field names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `apiVersion` of both Cilium policy kinds.
pub const API_VERSION: &str = "cilium.io/v2";
/// The identity label holding a pod's namespace.
pub const NAMESPACE_KEY: &str = "k8s:io.kubernetes.pod.namespace";
/// The identity label holding a pod's service account.
pub const SERVICE_ACCOUNT_KEY: &str = "k8s:io.cilium.k8s.policy.serviceaccount";
/// Prefix of the identity labels that carry the pod's namespace's labels.
pub const NAMESPACE_LABELS_PREFIX: &str = "k8s:io.cilium.k8s.namespace.labels.";

/// A whole Cilium policy object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CiliumPolicy {
    /// `cilium.io/v2`.
    pub api_version: String,
    /// `CiliumNetworkPolicy` or `CiliumClusterwideNetworkPolicy`.
    pub kind: String,
    /// Name, namespace, labels, annotations.
    pub metadata: ObjectMeta,
    /// The rule.
    pub spec: PolicyRule,
}

impl CiliumPolicy {
    /// True for a `CiliumClusterwideNetworkPolicy`.
    #[must_use]
    pub fn is_clusterwide(&self) -> bool {
        self.kind == "CiliumClusterwideNetworkPolicy"
    }
}

/// The metadata the conversion sets.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// Name.
    pub name: String,
    /// Namespace (namespaced policies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// `spec`: one Cilium rule.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Endpoints the rule applies to.
    #[serde(default)]
    pub endpoint_selector: LabelSelector,
    /// Allow rules at ingress (present: ingress default deny for the selected endpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<Rule>>,
    /// Deny rules at ingress (win over every allow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_deny: Option<Vec<Rule>>,
    /// Allow rules at egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<Rule>>,
    /// Deny rules at egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_deny: Option<Vec<Rule>>,
    /// Per-direction override of default deny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_default_deny: Option<DefaultDeny>,
    /// Fields this module does not model (kept so a reader can tell).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// `enableDefaultDeny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DefaultDeny {
    /// Ingress default deny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<bool>,
    /// Egress default deny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<bool>,
}

/// One ingress or egress rule (allow or deny). Peers (the `from*`/`to*` fields) are ORed;
/// `toPorts` and `icmps` are ORed with each other and ANDed with the peers.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Ingress peers by labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_endpoints: Vec<LabelSelector>,
    /// Ingress peers by CIDR (never matches cluster endpoints).
    #[serde(default, rename = "fromCIDR", skip_serializing_if = "Vec::is_empty")]
    pub from_cidr: Vec<String>,
    /// Ingress peers by CIDR with exceptions.
    #[serde(default, rename = "fromCIDRSet", skip_serializing_if = "Vec::is_empty")]
    pub from_cidr_set: Vec<CidrRule>,
    /// Ingress peers by entity (`all`, `world`, `cluster`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_entities: Vec<String>,
    /// Egress peers by labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_endpoints: Vec<LabelSelector>,
    /// Egress peers by CIDR.
    #[serde(default, rename = "toCIDR", skip_serializing_if = "Vec::is_empty")]
    pub to_cidr: Vec<String>,
    /// Egress peers by CIDR with exceptions.
    #[serde(default, rename = "toCIDRSet", skip_serializing_if = "Vec::is_empty")]
    pub to_cidr_set: Vec<CidrRule>,
    /// Egress peers by entity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_entities: Vec<String>,
    /// Egress peers by Kubernetes service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_services: Vec<ServicePeer>,
    /// Ports (and L7 rules).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_ports: Vec<PortRule>,
    /// ICMP types.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub icmps: Vec<IcmpRule>,
    /// Fields this module does not model.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl Rule {
    /// True when the rule names no peer at all.
    #[must_use]
    pub fn has_no_peer(&self) -> bool {
        self.from_endpoints.is_empty()
            && self.from_cidr.is_empty()
            && self.from_cidr_set.is_empty()
            && self.from_entities.is_empty()
            && self.to_endpoints.is_empty()
            && self.to_cidr.is_empty()
            && self.to_cidr_set.is_empty()
            && self.to_entities.is_empty()
            && self.to_services.is_empty()
    }
}

/// A Kubernetes label selector.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Exact matches.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    /// Label key (optionally with a `source:` prefix such as `k8s:`).
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: Operator,
    /// Values for `In` and `NotIn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A label selector operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    /// The label has one of the values.
    In,
    /// The label is absent or has none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// A CIDR with exceptions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CidrRule {
    /// The block.
    pub cidr: String,
    /// Sub-blocks left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

/// `toServices` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePeer {
    /// Service by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_service: Option<K8sService>,
}

/// A service by name and namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct K8sService {
    /// Service name.
    pub service_name: String,
    /// Service namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// `toPorts` entry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PortRule {
    /// Ports, ORed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortProtocol>,
    /// L7 rules for these ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<L7Rules>,
}

/// A port (or range) and protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortProtocol {
    /// A number (`"0"` is every port) or a port name.
    pub port: String,
    /// Last port of a range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
    /// `TCP`, `UDP`, `SCTP` or `ANY` (TCP, UDP and SCTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// L7 rules.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct L7Rules {
    /// HTTP rules, ORed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRule>,
}

/// One HTTP rule: `method` and `path` are regular expressions matched against the whole value.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HttpRule {
    /// Method regex (any when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Path regex (any when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// `icmps` entry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IcmpRule {
    /// ICMP fields, ORed (at most 40 per entry).
    #[serde(default)]
    pub fields: Vec<IcmpField>,
}

/// One ICMP type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IcmpField {
    /// `IPv4` (default) or `IPv6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// Type number, or a CamelCase name such as `EchoRequest`.
    #[serde(rename = "type")]
    pub icmp_type: Value,
}

/// The IPv4 ICMP type names Cilium accepts, with their numbers.
pub const ICMPV4_TYPE_NAMES: &[(&str, u8)] = &[
    ("EchoReply", 0),
    ("DestinationUnreachable", 3),
    ("Redirect", 5),
    ("Echo", 8),
    ("EchoRequest", 8),
    ("RouterAdvertisement", 9),
    ("RouterSelection", 10),
    ("TimeExceeded", 11),
    ("ParameterProblem", 12),
    ("Timestamp", 13),
    ("TimestampReply", 14),
    ("Photuris", 40),
    ("ExtendedEchoRequest", 42),
    ("ExtendedEchoReply", 43),
];
