//! The conversion report: per Calico policy, whether the Cilium output is exact, and every item
//! that could not be expressed exactly (never silently dropped).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::calico::{PolicyRef, PolicyType, SkippedDocument};

/// Whether a policy converted exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The Cilium policies allow and deny exactly what the Calico policy did.
    Exact,
    /// Something could not be expressed; see the items.
    Partial,
}

/// What could not be expressed (or is worth a note).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ItemKind {
    /// An `Allow` rule is evaluated before a `Deny` rule that matches some of the same traffic;
    /// Calico allows that traffic, Cilium denies it (deny always wins).
    AllowBeforeDeny,
    /// `Pass` (skip to the next tier) has no Cilium equivalent; the rule is left out.
    Pass,
    /// `Log` has no Cilium equivalent (use Hubble); the rule is left out.
    Log,
    /// A tier other than `default`: Cilium has no tiers; the policy is converted as if in one.
    Tier,
    /// `doNotTrack` applies to host endpoints only; not converted (Cilium host firewall).
    DoNotTrack,
    /// `preDNAT` applies to host endpoints only; not converted (Cilium host firewall).
    PreDnat,
    /// `applyOnForward`: the host-endpoint part is not converted (pod traffic is).
    ApplyOnForward,
    /// `notProtocol` cannot be expressed; approximated.
    NotProtocol,
    /// `notICMP` cannot be expressed; approximated.
    NotIcmp,
    /// Cilium matches ICMP by type only, not code.
    IcmpCode,
    /// A protocol other than TCP, UDP, SCTP, ICMP and ICMPv6.
    ProtocolNumber,
    /// A named port: kept by name for Cilium to resolve, not verified.
    NamedPort,
    /// Source ports cannot be matched in Cilium.
    SourcePorts,
    /// `starts with`, `ends with` or `contains` in a selector.
    StringMatch,
    /// Selection by service-account labels (Cilium identities carry only the name).
    ServiceAccountLabels,
    /// A pod label that Cilium's default identity label filter leaves out.
    LabelFiltered,
    /// `global()`: host endpoints and global network sets are not converted.
    GlobalNamespace,
    /// A rule's selectors and Calico network sets: which sets a selector selects is not
    /// known (namespace labels not given), or a set's nets do not parse.
    NetworkSet,
    /// `nets` or `notNets` cover part of the pod CIDRs: Calico matches pods by IP, Cilium's
    /// CIDR rules never match pods.
    NetsPartlyCoverPods,
    /// Pod CIDRs were not given, so `nets` were assumed not to cover pods.
    PodCidrsUnknown,
    /// `nets` cover node addresses: Cilium's CIDR rules do not match nodes by default.
    NetsCoverNodes,
    /// `nets` cover the service CIDR: both CNIs evaluate policy after service translation.
    NetsCoverServices,
    /// `services` could not be converted exactly.
    Services,
    /// HTTP matching that Cilium cannot express here (deny rules, or no single TCP port).
    HttpUnsupported,
    /// `ipVersion`: Cilium rules have no IP-version filter.
    IpVersion,
    /// A selector that does not parse.
    InvalidSelector,
    /// A rule Calico itself would reject (bad CIDR, ports without a protocol, …).
    InvalidRule,
    /// A field this converter does not know.
    UnknownField,
    /// A selector too complex to expand into label selectors.
    TooComplex,
    /// Note: HTTP rules are enforced by Cilium's Envoy proxy for every selected pod (Calico
    /// needed application layer policy for them).
    HttpProxy,
    /// Note: every ICMP type is allowed, which Cilium can only express by listing all 256.
    IcmpAllTypes,
    /// Note: rules of a direction that is not in `types` (Calico ignores them too).
    IgnoredRules,
    /// Note: a selector or rule that can match no pod (nothing is emitted for it).
    MatchesNothing,
    /// Note: a rule's selector selects Calico network sets; their nets are written as
    /// `fromCIDRSet` / `toCIDRSet` (or, for `notSelector`, as `except` entries).
    NetworkSetNets,
}

impl ItemKind {
    /// True when this item makes the conversion inexact (false for notes).
    #[must_use]
    pub fn makes_partial(self) -> bool {
        !matches!(
            self,
            ItemKind::HttpProxy
                | ItemKind::IcmpAllTypes
                | ItemKind::IgnoredRules
                | ItemKind::MatchesNothing
                | ItemKind::NetworkSetNets
        )
    }

    /// True when this item can change the verdict for traffic between pods and external
    /// addresses (what [`super::eval`] models). False for items that only concern host
    /// endpoints, nodes, IPv6, service IPs or side effects such as logging.
    #[must_use]
    pub fn changes_pod_verdicts(self) -> bool {
        !matches!(
            self,
            ItemKind::Log
                | ItemKind::DoNotTrack
                | ItemKind::PreDnat
                | ItemKind::ApplyOnForward
                | ItemKind::GlobalNamespace
                | ItemKind::NetsCoverNodes
                | ItemKind::NetsCoverServices
                | ItemKind::IpVersion
                | ItemKind::HttpProxy
                | ItemKind::IcmpAllTypes
                | ItemKind::IgnoredRules
                | ItemKind::MatchesNothing
                | ItemKind::NetworkSetNets
        )
    }
}

impl fmt::Display for ItemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// One thing the conversion could not express exactly (or a note).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportItem {
    /// The Calico policy.
    pub policy: PolicyRef,
    /// The rule direction, when the item is about a rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<PolicyType>,
    /// The rule's 0-based index in its direction, when the item is about a rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// What kind of item.
    pub kind: ItemKind,
    /// What exactly, and what the output does instead.
    pub detail: String,
}

impl fmt::Display for ReportItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.direction, self.rule) {
            (Some(d), Some(i)) => write!(f, "{d} rule {i}: ")?,
            (Some(d), None) => write!(f, "{d}: ")?,
            _ => {}
        }
        write!(f, "[{}] {}", self.kind, self.detail)
    }
}

/// The result for one Calico policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReport {
    /// The Calico policy.
    pub policy: PolicyRef,
    /// Exact or partial.
    pub status: Status,
    /// Names of the Cilium policies written for it.
    pub outputs: Vec<String>,
    /// Everything not expressed exactly, and notes.
    pub items: Vec<ReportItem>,
}

/// The whole conversion report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversionReport {
    /// One entry per Calico policy, in input order.
    pub policies: Vec<PolicyReport>,
    /// Input documents that were not converted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedDocument>,
}

impl ConversionReport {
    /// True when every policy converted exactly.
    #[must_use]
    pub fn all_exact(&self) -> bool {
        self.policies.iter().all(|p| p.status == Status::Exact)
    }

    /// True when no item can change a verdict between pods and external addresses.
    #[must_use]
    pub fn pod_verdicts_preserved(&self) -> bool {
        self.items().all(|i| !i.kind.changes_pod_verdicts())
    }

    /// Every item of every policy.
    pub fn items(&self) -> impl Iterator<Item = &ReportItem> {
        self.policies.iter().flat_map(|p| p.items.iter())
    }

    /// The report for one policy.
    #[must_use]
    pub fn policy(&self, name: &str, namespace: Option<&str>) -> Option<&PolicyReport> {
        self.policies
            .iter()
            .find(|p| p.policy.name == name && p.policy.namespace.as_deref() == namespace)
    }
}

/// Markdown-ish text for a person to read.
impl fmt::Display for ConversionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exact = self
            .policies
            .iter()
            .filter(|p| p.status == Status::Exact)
            .count();
        writeln!(f, "# Calico to Cilium policy conversion")?;
        writeln!(f)?;
        writeln!(
            f,
            "{} policies: {exact} exact, {} partial; {} documents skipped.",
            self.policies.len(),
            self.policies.len() - exact,
            self.skipped.len()
        )?;
        for p in &self.policies {
            writeln!(f)?;
            let status = match p.status {
                Status::Exact => "exact",
                Status::Partial => "PARTIAL",
            };
            writeln!(f, "## {} ({status})", p.policy)?;
            if p.outputs.is_empty() {
                writeln!(f, "- writes no Cilium policy")?;
            } else {
                writeln!(f, "- writes: {}", p.outputs.join(", "))?;
            }
            for i in &p.items {
                let tag = if i.kind.makes_partial() { "" } else { "note: " };
                writeln!(f, "- {tag}{i}")?;
            }
        }
        if !self.skipped.is_empty() {
            writeln!(f)?;
            writeln!(f, "## Skipped documents")?;
            for s in &self.skipped {
                let name = if s.name.is_empty() {
                    "(no name)"
                } else {
                    &s.name
                };
                writeln!(f, "- #{} {} {name}: {}", s.index, s.kind, s.reason)?;
            }
        }
        Ok(())
    }
}
