//! Calico `NetworkPolicy` / `GlobalNetworkPolicy` to `CiliumNetworkPolicy` /
//! `CiliumClusterwideNetworkPolicy`.
//!
//! Each Calico rule is first normalised into peers (pods as label-selector terms, external
//! addresses as CIDR sets), ports and ICMP types, then written out. Whatever Cilium cannot
//! express becomes a [`ReportItem`]; the rule is then approximated *towards less access*:
//! an allow rule (or the part of it) that cannot be written is left out, a deny rule is widened.
//! A policy selector that cannot be written is widened (more pods selected, hence default-deny).
//!
//! Ordering: Calico evaluates rules in order and the first `Allow` or `Deny` wins; Cilium
//! denies whenever any deny rule matches. The two agree unless an `Allow` evaluated before a
//! `Deny` matches some of the same traffic, which is checked symbolically for every such pair
//! (conservatively: when disjointness cannot be shown, the pair is reported).
//!
//! # Caveats
//! Only pods are converted as policy subjects: a `GlobalNetworkPolicy` that also selects host
//! endpoints loses that part (Cilium's host firewall is a separate, node-selected policy). Rule
//! selectors that select network sets get the sets' nets as CIDR peers, from the sets given in
//! [`ConvertOptions::network_sets`] (sets that exist in the cluster but not in the input are not
//! known). Service target ports are taken as numbers from [`ConvertOptions::services`].

use std::collections::{BTreeMap, BTreeSet, HashSet};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::calico::{
    Action, CalicoPolicy, DEFAULT_TIER_ORDER, EntityRule, NetworkSet, ParsedDocuments, PolicyKind,
    PolicyRef, PolicyType, Port, Protocol, Rule, Tier,
};
use super::cilium::{
    self, API_VERSION, CidrRule, HttpRule, IcmpField, IcmpRule, K8sService, L7Rules, NAMESPACE_KEY,
    ObjectMeta, PortProtocol, PortRule, SERVICE_ACCOUNT_KEY, ServicePeer,
};
use super::norm::{Conj, Ctx, Dnf, KeyCons, dnf};
use super::report::{ConversionReport, ItemKind, PolicyReport, ReportItem, Status};
use super::selector::Selector;

/// What the conversion needs to know about the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConvertOptions {
    /// Pod CIDRs (old and new). Calico's `nets` match pod IPs, Cilium's CIDR rules never do:
    /// nets that cover all pod CIDRs become an "all pods" peer too; nets that cover part of
    /// them are reported. Empty: nets are assumed not to cover pods (and reported).
    pub pod_cidrs: Vec<IpNet>,
    /// Node address ranges (reported when `nets` cover them; optional).
    pub node_cidrs: Vec<IpNet>,
    /// Service CIDRs (reported when `nets` cover them; optional).
    pub service_cidrs: Vec<IpNet>,
    /// Services that rules name in `destination.services` (optional).
    pub services: Vec<ServiceInfo>,
    /// Calico tiers, for the evaluation order.
    pub tiers: Vec<Tier>,
    /// Calico `NetworkSet` and `GlobalNetworkSet` objects. Calico matches a rule's selectors
    /// against their labels as against pods', so the nets of the sets a remote selector
    /// selects are written as `fromCIDRSet` / `toCIDRSet` (and those a `notSelector` selects
    /// as `except` entries). See [`convert`](fn@convert) for which sets a rule sees.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_sets: Vec<NetworkSet>,
    /// Namespace labels by namespace name, for namespaced network sets selected through a
    /// rule's `namespaceSelector` or by `pcns.` label keys. The labels of a namespace missing
    /// here are not known: a selection that depends on them is reported partial.
    /// [`convert_documents`] adds the `Namespace` objects of the input.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
}

/// A Kubernetes service, for rules that name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Pod selector (`None` for a service without a selector).
    pub selector: Option<BTreeMap<String, String>>,
    /// The endpoints' ports (target ports as numbers).
    pub ports: Vec<ServicePort>,
}

/// One port of a service's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// TCP, UDP or SCTP.
    pub protocol: Protocol,
    /// The target port on the pods.
    pub port: u16,
}

/// One Cilium object and the Calico policy it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvertedObject {
    /// The Calico policy.
    pub policy: PolicyRef,
    /// The `CiliumNetworkPolicy` or `CiliumClusterwideNetworkPolicy`.
    pub object: Value,
}

/// The output of [`convert`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Conversion {
    /// Cilium objects, in input order.
    pub objects: Vec<ConvertedObject>,
    /// What is exact and what is not.
    pub report: ConversionReport,
}

impl Conversion {
    /// The Cilium objects alone.
    #[must_use]
    pub fn values(&self) -> Vec<Value> {
        self.objects.iter().map(|o| o.object.clone()).collect()
    }
}

/// A CIDR that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a CIDR (like 10.42.0.0/16) or an IP address")]
pub struct InvalidCidr {
    /// The text given.
    pub input: String,
}

/// Parses CIDRs or bare addresses (as given on a command line), masking host bits.
///
/// # Errors
/// [`InvalidCidr`] for the first one that does not parse.
pub fn parse_cidrs<S: AsRef<str>>(list: &[S]) -> Result<Vec<IpNet>, InvalidCidr> {
    list.iter()
        .map(|s| {
            let s = s.as_ref().trim();
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| InvalidCidr {
                    input: s.to_string(),
                })
        })
        .collect()
}

/// Converts parsed documents: their policies, with their tiers added to `opts`, and the skipped
/// documents listed in the report.
#[must_use]
pub fn convert_documents(parsed: &ParsedDocuments, opts: &ConvertOptions) -> Conversion {
    let mut opts = opts.clone();
    opts.tiers.extend(parsed.tiers.iter().cloned());
    opts.network_sets
        .extend(parsed.network_sets.iter().cloned());
    for (ns, labels) in &parsed.namespaces {
        opts.namespace_labels
            .entry(ns.clone())
            .or_insert_with(|| labels.clone());
    }
    let mut conv = convert(&parsed.policies, &opts);
    conv.report.skipped = parsed.skipped.clone();
    conv
}

/// Converts Calico policies into Cilium policies and a report.
///
/// # Network sets
/// Which [`ConvertOptions::network_sets`] a rule's `selector` and `notSelector` see follows
/// Calico's documentation (resources "NetworkSet" and "GlobalNetworkSet", and "Calico automatic
/// labels"): a `NetworkPolicy`'s rule without `namespaceSelector` sees the `NetworkSet`s of
/// the policy's namespace; a rule with one sees the `NetworkSet`s of the namespaces it selects
/// and, when it selects non-namespaced objects (`global()`), the `GlobalNetworkSet`s; a
/// `GlobalNetworkPolicy`'s rule without `namespaceSelector` sees every set. As for pods, a rule
/// side that uses only `namespaceSelector` (or, in a `NetworkPolicy`, only `notSelector`)
/// selects every set it sees; `serviceAccounts` and `services` select no set. Calico matches
/// the sets' addresses, so: the nets of the selected sets (intersected with the rule's `nets`,
/// less its `notNets` and the nets of the sets its `notSelector` selects) become CIDR peers
/// next to the endpoint selectors, exact as long as the sets' nets do not overlap the pod CIDRs
/// (Calico would then match those pods by IP, which Cilium's CIDR rules never do: reported).
#[must_use]
pub fn convert(policies: &[CalicoPolicy], opts: &ConvertOptions) -> Conversion {
    let mut states: Vec<PolicyState> = policies
        .iter()
        .enumerate()
        .map(|(i, p)| PolicyCx::new(i, p, opts).run())
        .collect();
    order_analysis(policies, &mut states, opts);
    emit(policies, states)
}

/// Renders the objects as multi-document YAML for review, each preceded by a comment naming
/// the Calico policy and whether it converted exactly.
#[must_use]
pub fn render_yaml(conv: &Conversion) -> String {
    let mut out = String::new();
    for o in &conv.objects {
        let status = conv
            .report
            .policies
            .iter()
            .find(|p| p.policy == o.policy)
            .map(|p| match p.status {
                Status::Exact => "exact".to_string(),
                Status::Partial => {
                    let n = p.items.iter().filter(|i| i.kind.makes_partial()).count();
                    let s = if n == 1 { "" } else { "s" };
                    format!("PARTIAL, see the report ({n} item{s})")
                }
            })
            .unwrap_or_default();
        out.push_str("---\n");
        out.push_str(&format!("# From Calico {}: {status}\n", o.policy));
        match serde_yaml_ng::to_string(&o.object) {
            Ok(y) => out.push_str(&y),
            Err(e) => out.push_str(&format!("# could not render this object: {e}\n")),
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Externals {
    None,
    /// Every address outside the cluster (`world`).
    All,
    /// These blocks, each with its exceptions.
    Cidrs(Vec<(IpNet, Vec<IpNet>)>),
}

/// Whether a network set is selected: yes, no, or not known (namespace labels not given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tri {
    Yes,
    No,
    Unknown,
}

impl Tri {
    fn and(self, other: Tri) -> Tri {
        match (self, other) {
            (Tri::No, _) | (_, Tri::No) => Tri::No,
            (Tri::Yes, Tri::Yes) => Tri::Yes,
            _ => Tri::Unknown,
        }
    }
    fn of(b: bool) -> Tri {
        if b { Tri::Yes } else { Tri::No }
    }
}

/// The network sets one side of a rule selects, as nets.
#[derive(Debug, Clone, Default)]
struct SetNets {
    /// Nets of the sets the positive selector selects (already intersected with `nets`).
    pos: Vec<IpNet>,
    /// Nets of the sets the `notSelector` selects.
    neg: Vec<IpNet>,
}

/// The other end of a rule (or, for the local side, a constraint on the policy's own pod).
#[derive(Debug, Clone)]
struct Peer {
    /// Anything at all (pods, external addresses, hosts).
    any: bool,
    pods: Dnf,
    externals: Externals,
    services: Vec<(String, Option<String>)>,
    /// Ports of a described service, which replace the rule's ports.
    svc_ports: Option<Vec<(Protocol, u16)>>,
}

impl Peer {
    fn any() -> Peer {
        Peer {
            any: true,
            pods: Dnf::top(),
            externals: Externals::All,
            services: Vec::new(),
            svc_ports: None,
        }
    }
    fn is_empty(&self) -> bool {
        !self.any
            && self.pods.is_bottom()
            && self.externals == Externals::None
            && self.services.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum L4Item {
    Ports {
        proto: Protocol,
        ranges: Vec<(u16, u16)>,
        named: Vec<String>,
    },
    Icmp {
        v6: bool,
        /// `None`: every type.
        types: Option<BTreeSet<u8>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum L4 {
    Any,
    Items(Vec<L4Item>),
}

#[derive(Debug, Clone)]
struct NormRule {
    dir: PolicyType,
    index: usize,
    act: Act,
    local: Dnf,
    remote: Peer,
    l4: L4,
    http: Option<Vec<HttpRule>>,
}

struct PolicyState {
    items: Vec<ReportItem>,
    /// `None` when nothing is written for the policy.
    subject: Option<Dnf>,
    rules: Vec<NormRule>,
    types: Vec<PolicyType>,
}

/// How to treat a condition that cannot be expressed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// Leave the term out (allow rules: less access).
    Omit,
    /// Drop the condition (deny rules and policy selectors: wider).
    Widen,
}

struct PolicyCx<'a> {
    p: &'a CalicoPolicy,
    opts: &'a ConvertOptions,
    items: Vec<ReportItem>,
}

fn blank(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

const FULL: (u16, u16) = (1, u16::MAX);

impl<'a> PolicyCx<'a> {
    fn new(_index: usize, p: &'a CalicoPolicy, opts: &'a ConvertOptions) -> Self {
        PolicyCx {
            p,
            opts,
            items: Vec::new(),
        }
    }

    fn item(
        &mut self,
        dir: Option<PolicyType>,
        rule: Option<usize>,
        kind: ItemKind,
        detail: impl Into<String>,
    ) {
        let it = ReportItem {
            policy: self.p.reference(),
            direction: dir,
            rule,
            kind,
            detail: detail.into(),
        };
        if !self.items.contains(&it) {
            self.items.push(it);
        }
    }

    fn run(mut self) -> PolicyState {
        let p = self.p;
        let types = p.types();
        let state = |items, subject, rules| PolicyState {
            items,
            subject,
            rules,
            types: types.clone(),
        };
        for k in p.spec.unknown.keys() {
            self.item(
                None,
                None,
                ItemKind::UnknownField,
                format!("spec.{k} is not known to this converter and was ignored"),
            );
        }
        if p.tier() != "default" {
            self.item(
                None,
                None,
                ItemKind::Tier,
                format!(
                    "tier {:?}: Cilium has no tiers; converted as if every policy were in one tier, so the \
                     tier's place in the evaluation order and its end-of-tier deny are lost",
                    p.tier()
                ),
            );
        }
        if p.spec.do_not_track || p.spec.pre_dnat {
            let (kind, what) = if p.spec.do_not_track {
                (ItemKind::DoNotTrack, "doNotTrack")
            } else {
                (ItemKind::PreDnat, "preDNAT")
            };
            self.item(
                None,
                None,
                kind,
                format!(
                    "{what} policies apply to host endpoints only; not converted (write a Cilium host \
                     firewall policy with a nodeSelector instead)"
                ),
            );
            return state(self.items, None, Vec::new());
        }
        if p.spec.apply_on_forward {
            self.item(
                None,
                None,
                ItemKind::ApplyOnForward,
                "applyOnForward: the host-endpoint forwarding part is not converted; pod traffic is",
            );
        }
        let Some(subject) = self.subject() else {
            return state(self.items, None, Vec::new());
        };
        let mut rules = Vec::new();
        for dir in [PolicyType::Ingress, PolicyType::Egress] {
            let list = p.rules(dir);
            if !types.contains(&dir) {
                if !list.is_empty() {
                    self.item(
                        Some(dir),
                        None,
                        ItemKind::IgnoredRules,
                        format!(
                            "{} {dir} rules ignored because types does not include {dir} (Calico ignores them too)",
                            list.len()
                        ),
                    );
                }
                continue;
            }
            for (i, r) in list.iter().enumerate() {
                if let Some(n) = self.rule(dir, i, r) {
                    rules.push(n);
                }
            }
        }
        state(self.items, Some(subject), rules)
    }

    fn parse(
        &mut self,
        text: &str,
        dir: Option<PolicyType>,
        rule: Option<usize>,
        field: &str,
    ) -> Option<Selector> {
        match Selector::parse(text) {
            Ok(s) => Some(s),
            Err(e) => {
                self.item(
                    dir,
                    rule,
                    ItemKind::InvalidSelector,
                    format!("{field}: {e}"),
                );
                None
            }
        }
    }

    fn dnf(
        &mut self,
        sel: &Selector,
        neg: bool,
        ctx: Ctx,
        dir: Option<PolicyType>,
        rule: Option<usize>,
        field: &str,
    ) -> Option<Dnf> {
        if sel.uses_global() && ctx == Ctx::Namespace {
            self.item(
                dir,
                rule,
                ItemKind::GlobalNamespace,
                format!(
                    "{field} `{sel}`: global() selects host endpoints, which are not converted (global \
                     network sets are, from the input's GlobalNetworkSets); it selects no pod"
                ),
            );
        }
        match dnf(sel, neg, ctx) {
            Ok(d) => Some(d),
            Err(_) => {
                self.item(
                    dir,
                    rule,
                    ItemKind::TooComplex,
                    format!(
                        "{field} `{sel}` expands into more than {} label selectors",
                        super::norm::MAX_TERMS
                    ),
                );
                None
            }
        }
    }

    /// Reports the lossy parts of each term; leaves the term out or drops the condition.
    fn resolve_lossy(
        &mut self,
        d: Dnf,
        loss: Loss,
        dir: Option<PolicyType>,
        rule: Option<usize>,
        what: &str,
    ) -> Dnf {
        let mut out = Vec::new();
        for mut c in d.0 {
            if c.lossy.is_empty() {
                out.push(c);
                continue;
            }
            for (kind, text) in std::mem::take(&mut c.lossy) {
                let consequence = match loss {
                    Loss::Omit => {
                        format!(
                            "{what}: the alternative with this condition is left out (less access)"
                        )
                    }
                    Loss::Widen => format!("{what}: the condition is dropped (wider)"),
                };
                self.item(dir, rule, kind, format!("{text}; {consequence}"));
            }
            if loss == Loss::Widen {
                out.push(c);
            }
        }
        Dnf::from_terms(out)
    }

    /// The pods the policy applies to, over Cilium keys (with the namespace of a
    /// `NetworkPolicy` as a constraint). `None` when nothing is written.
    fn subject(&mut self) -> Option<Dnf> {
        let p = self.p;
        let mut d = match blank(&p.spec.selector) {
            Some(s) => {
                let sel = self.parse(s, None, None, "spec.selector")?;
                self.dnf(&sel, false, Ctx::Endpoint, None, None, "spec.selector")?
            }
            None => Dnf::top(),
        };
        match (&p.namespace, blank(&p.spec.namespace_selector)) {
            (Some(ns), _) => {
                d = self.and(
                    &d,
                    &Dnf::single(NAMESPACE_KEY, KeyCons::In([ns.clone()].into())),
                )?;
            }
            (None, Some(s)) => {
                let sel = self.parse(s, None, None, "spec.namespaceSelector")?;
                let n = self.dnf(
                    &sel,
                    false,
                    Ctx::Namespace,
                    None,
                    None,
                    "spec.namespaceSelector",
                )?;
                d = self.and(&d, &n)?;
            }
            (None, None) => {}
        }
        if let Some(s) = blank(&p.spec.service_account_selector) {
            let sel = self.parse(s, None, None, "spec.serviceAccountSelector")?;
            let n = self.dnf(
                &sel,
                false,
                Ctx::ServiceAccount,
                None,
                None,
                "spec.serviceAccountSelector",
            )?;
            d = self.and(&d, &n)?;
        }
        let d = self.resolve_lossy(
            d,
            Loss::Widen,
            None,
            None,
            "policy selector (more pods are selected and get default deny)",
        );
        if d.is_bottom() {
            self.item(
                None,
                None,
                ItemKind::MatchesNothing,
                "the policy selects no pod; nothing is written",
            );
            return None;
        }
        Some(d)
    }

    fn and(&mut self, a: &Dnf, b: &Dnf) -> Option<Dnf> {
        match a.and(b) {
            Ok(d) => Some(d),
            Err(_) => {
                self.item(
                    None,
                    None,
                    ItemKind::TooComplex,
                    format!(
                        "selectors combine into more than {} label selectors",
                        super::norm::MAX_TERMS
                    ),
                );
                None
            }
        }
    }

    fn rule(&mut self, dir: PolicyType, index: usize, rule: &Rule) -> Option<NormRule> {
        let (d, r) = (Some(dir), Some(index));
        for k in rule.unknown.keys() {
            self.item(
                d,
                r,
                ItemKind::UnknownField,
                format!("field {k} is not known to this converter and was ignored"),
            );
        }
        for (side, e) in [("source", &rule.source), ("destination", &rule.destination)] {
            for k in e.unknown.keys() {
                self.item(
                    d,
                    r,
                    ItemKind::UnknownField,
                    format!("field {side}.{k} is not known to this converter and was ignored"),
                );
            }
        }
        let act = match rule.action {
            Action::Allow => Act::Allow,
            Action::Deny => Act::Deny,
            Action::Log => {
                self.item(
                    d,
                    r,
                    ItemKind::Log,
                    "Log logs and goes on to the next rule; Cilium has no log action (use Hubble flow \
                     logs); left out, which changes no verdict",
                );
                return None;
            }
            Action::Pass => {
                self.item(
                    d,
                    r,
                    ItemKind::Pass,
                    "Pass skips the rest of the tier (to the next tier, or the namespace profile, which \
                     allows); Cilium has no tiers; left out, so later rules and default deny now decide",
                );
                return None;
            }
        };
        let allow = act == Act::Allow;
        let loss = if allow { Loss::Omit } else { Loss::Widen };
        match rule.ip_version {
            None => {}
            Some(4) => self.item(
                d,
                r,
                ItemKind::IpVersion,
                "ipVersion 4: Cilium rules have no IP-version filter; the rule also applies to IPv6",
            ),
            Some(6) => {
                self.item(
                    d,
                    r,
                    ItemKind::IpVersion,
                    "ipVersion 6: Cilium rules cannot be limited to IPv6; left out",
                );
                return None;
            }
            Some(v) => {
                self.item(
                    d,
                    r,
                    ItemKind::InvalidRule,
                    format!("ipVersion {v} is neither 4 nor 6; rule left out"),
                );
                return None;
            }
        }
        let src = &rule.source;
        if !src.ports.is_empty() || !src.not_ports.is_empty() {
            let list: Vec<String> = src
                .ports
                .iter()
                .map(ToString::to_string)
                .chain(src.not_ports.iter().map(|p| format!("not {p}")))
                .collect();
            self.item(
                d,
                r,
                ItemKind::SourcePorts,
                format!(
                    "source ports {}: Cilium cannot match source ports; {}",
                    list.join(", "),
                    if allow {
                        "rule left out (less access)"
                    } else {
                        "ignored (the deny is wider)"
                    }
                ),
            );
            if allow {
                return None;
            }
        }
        let mut l4 = self.l4(dir, index, rule, allow)?;
        let (local_e, remote_e) = match dir {
            PolicyType::Ingress => (&rule.destination, &rule.source),
            PolicyType::Egress => (&rule.source, &rule.destination),
        };
        let remote = self.entity(dir, index, remote_e, true, loss)?;
        if let Some(sp) = &remote.svc_ports {
            l4 = restrict_to_service_ports(&l4, sp);
        }
        let local = self.entity(dir, index, local_e, false, loss)?;
        let local = if local.any { Dnf::top() } else { local.pods };
        let http = match &rule.http {
            None => None,
            Some(_) if !allow => {
                self.item(
                    d,
                    r,
                    ItemKind::HttpUnsupported,
                    "Cilium deny rules cannot match HTTP; the whole connection is denied (wider)",
                );
                None
            }
            Some(h) => {
                let ok = match &l4 {
                    L4::Items(items) => items.iter().all(|i| {
                        matches!(i, L4Item::Ports { proto: Protocol::Tcp, ranges, named }
                            if named.is_empty() && !ranges.is_empty() && ranges.len() <= 40
                                && ranges.iter().all(|(a, b)| a == b))
                    }),
                    L4::Any => false,
                };
                if !ok {
                    self.item(
                        d,
                        r,
                        ItemKind::HttpUnsupported,
                        "Cilium applies HTTP rules only to TCP with single port numbers; rule left out",
                    );
                    return None;
                }
                self.item(
                    d,
                    r,
                    ItemKind::HttpProxy,
                    "HTTP rules are enforced by Cilium's Envoy proxy for every selected pod (Calico needed \
                     application layer policy); Cilium matches the path against the whole request target, \
                     query string included",
                );
                Some(http_rules(&h.methods, &h.paths))
            }
        };
        let empty_l4 = matches!(&l4, L4::Items(items) if items.is_empty());
        if remote.is_empty() || local.is_bottom() || empty_l4 {
            self.item(
                d,
                r,
                ItemKind::MatchesNothing,
                "the rule can match no pod traffic; nothing is written for it",
            );
            return None;
        }
        Some(NormRule {
            dir,
            index,
            act,
            local,
            remote,
            l4,
            http,
        })
    }

    fn l4(&mut self, dir: PolicyType, index: usize, rule: &Rule, allow: bool) -> Option<L4> {
        let (d, r) = (Some(dir), Some(index));
        let dst = &rule.destination;
        let any_ports = !dst.ports.is_empty()
            || !dst.not_ports.is_empty()
            || !rule.source.ports.is_empty()
            || !rule.source.not_ports.is_empty();
        if any_ports && !rule.protocol.is_some_and(Protocol::has_ports) {
            self.item(
                d,
                r,
                ItemKind::InvalidRule,
                "ports need protocol TCP, UDP, SCTP or UDPLite (Calico rejects this rule); left out",
            );
            return None;
        }
        if (rule.icmp.is_some() || rule.not_icmp.is_some())
            && !matches!(rule.protocol, Some(Protocol::Icmp | Protocol::IcmpV6))
        {
            self.item(
                d,
                r,
                ItemKind::InvalidRule,
                "icmp and notICMP need protocol ICMP or ICMPv6 (Calico rejects this rule); left out",
            );
            return None;
        }
        let Some(proto) = rule.protocol else {
            return match rule.not_protocol {
                None => Some(L4::Any),
                Some(np) => {
                    self.item(
                        d,
                        r,
                        ItemKind::NotProtocol,
                        if allow {
                            format!(
                                "notProtocol {np}: Cilium has no protocol negation; written as TCP, UDP and SCTP \
                                 without {np}, so ICMP and other IP protocols are not allowed (less access)"
                            )
                        } else {
                            format!(
                                "notProtocol {np}: Cilium has no protocol negation; the deny covers every \
                                 protocol, {np} included (wider)"
                            )
                        },
                    );
                    if !allow {
                        return Some(L4::Any);
                    }
                    let items: Vec<L4Item> = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
                        .into_iter()
                        .filter(|p| *p != np)
                        .map(|proto| L4Item::Ports {
                            proto,
                            ranges: vec![FULL],
                            named: Vec::new(),
                        })
                        .collect();
                    Some(L4::Items(items))
                }
            };
        };
        if rule.not_protocol == Some(proto) {
            self.item(
                d,
                r,
                ItemKind::MatchesNothing,
                format!("protocol {proto} and notProtocol {proto}: the rule matches nothing"),
            );
            return None;
        }
        match proto {
            Protocol::Tcp | Protocol::Udp | Protocol::Sctp => {
                let mut ranges = Vec::new();
                let mut named = Vec::new();
                if dst.ports.is_empty() {
                    ranges.push(FULL);
                }
                for port in &dst.ports {
                    match port {
                        Port::Number(n) if *n >= 1 => ranges.push((*n, *n)),
                        Port::Number(_) => {}
                        Port::Range(a, b) if *b >= 1 => ranges.push(((*a).max(1), *b)),
                        Port::Range(..) => {}
                        Port::Named(s) => named.push(s.clone()),
                    }
                }
                let mut minus = Vec::new();
                for port in &dst.not_ports {
                    match port {
                        Port::Number(n) => minus.push((*n, *n)),
                        Port::Range(a, b) => minus.push((*a, *b)),
                        Port::Named(s) => {
                            self.item(
                                d,
                                r,
                                ItemKind::NamedPort,
                                format!(
                                    "notPorts {s}: a named port cannot be subtracted from a port range; {}",
                                    if allow {
                                        "rule left out (less access)"
                                    } else {
                                        "ignored (the deny is wider)"
                                    }
                                ),
                            );
                            if allow {
                                return None;
                            }
                        }
                    }
                }
                let ranges = subtract(&normalise(ranges), &normalise(minus));
                if !named.is_empty() {
                    self.item(
                        d,
                        r,
                        ItemKind::NamedPort,
                        format!(
                            "named port {}: kept by name for Cilium to resolve from the destination pods' \
                             container ports; not verified",
                            named.join(", ")
                        ),
                    );
                }
                if ranges.is_empty() && named.is_empty() {
                    self.item(
                        d,
                        r,
                        ItemKind::MatchesNothing,
                        "ports and notPorts leave no port; the rule matches nothing",
                    );
                    return None;
                }
                Some(L4::Items(vec![L4Item::Ports {
                    proto,
                    ranges,
                    named,
                }]))
            }
            Protocol::Icmp | Protocol::IcmpV6 => {
                let v6 = proto == Protocol::IcmpV6;
                let all = || (0..=u8::MAX).collect::<BTreeSet<u8>>();
                let mut types: Option<BTreeSet<u8>> = None;
                if let Some(m) = rule.icmp {
                    match (m.icmp_type, m.code) {
                        (None, Some(_)) => {
                            self.item(
                                d,
                                r,
                                ItemKind::InvalidRule,
                                "an ICMP code needs a type (Calico rejects this rule); left out",
                            );
                            return None;
                        }
                        (None, None) => {}
                        (Some(t), code) => {
                            if let Some(c) = code {
                                self.item(
                                    d,
                                    r,
                                    ItemKind::IcmpCode,
                                    format!(
                                        "ICMP type {t} code {c}: Cilium matches ICMP by type only; {}",
                                        if allow {
                                            "rule left out (less access)".to_string()
                                        } else {
                                            format!("every code of type {t} is denied (wider)")
                                        }
                                    ),
                                );
                                if allow {
                                    return None;
                                }
                            }
                            types = Some([t].into());
                        }
                    }
                }
                if let Some(m) = rule.not_icmp {
                    match (m.icmp_type, m.code) {
                        (Some(t), None) => {
                            let mut set = types.unwrap_or_else(all);
                            set.remove(&t);
                            types = Some(set);
                        }
                        (Some(t), Some(c)) => {
                            self.item(
                                d,
                                r,
                                ItemKind::NotIcmp,
                                format!(
                                    "notICMP type {t} code {c}: Cilium matches ICMP by type only; {}",
                                    if allow {
                                        format!("every code of type {t} is left out (less access)")
                                    } else {
                                        "notICMP is ignored (the deny is wider)".to_string()
                                    }
                                ),
                            );
                            if allow {
                                let mut set = types.unwrap_or_else(all);
                                set.remove(&t);
                                types = Some(set);
                            }
                        }
                        (None, _) => {
                            self.item(
                                d,
                                r,
                                ItemKind::InvalidRule,
                                "notICMP needs a type (Calico rejects this rule); left out",
                            );
                            return None;
                        }
                    }
                }
                if types.is_none() {
                    self.item(
                        d,
                        r,
                        ItemKind::IcmpAllTypes,
                        "every ICMP type: Cilium has no \"any ICMP\" match, so all 256 types are listed",
                    );
                }
                if types.as_ref().is_some_and(BTreeSet::is_empty) {
                    self.item(
                        d,
                        r,
                        ItemKind::MatchesNothing,
                        "icmp and notICMP leave no ICMP type; the rule matches nothing",
                    );
                    return None;
                }
                Some(L4::Items(vec![L4Item::Icmp { v6, types }]))
            }
            Protocol::UdpLite | Protocol::Number(_) => {
                self.item(
                    d,
                    r,
                    ItemKind::ProtocolNumber,
                    format!(
                        "protocol {proto}: Cilium policies match only TCP, UDP, SCTP and ICMP; {}",
                        if allow {
                            "rule left out (less access)"
                        } else {
                            "the deny covers every protocol (wider)"
                        }
                    ),
                );
                if allow { None } else { Some(L4::Any) }
            }
        }
    }

    /// Normalises one side of a rule. `remote`: the peer (source of an ingress rule,
    /// destination of an egress rule); otherwise the policy's own pod.
    fn entity(
        &mut self,
        dir: PolicyType,
        index: usize,
        e: &EntityRule,
        remote: bool,
        loss: Loss,
    ) -> Option<Peer> {
        let (d, r) = (Some(dir), Some(index));
        let allow = loss == Loss::Omit;
        let side = if (dir == PolicyType::Ingress) == remote {
            "source"
        } else {
            "destination"
        };
        let identity_empty = e.nets.is_empty()
            && e.not_nets.is_empty()
            && blank(&e.selector).is_none()
            && blank(&e.not_selector).is_none()
            && blank(&e.namespace_selector).is_none()
            && e.service_accounts.is_none()
            && e.services.is_none();
        if identity_empty {
            return Some(Peer::any());
        }
        let ns = self.p.namespace.clone();
        let mut services = Vec::new();
        let mut svc_pods: Option<Dnf> = None;
        let mut svc_ports = None;
        let mut services_only = false;
        if let Some(svc) = &e.services {
            if !e.nets.is_empty()
                || !e.not_nets.is_empty()
                || blank(&e.selector).is_some()
                || blank(&e.not_selector).is_some()
                || !e.ports.is_empty()
                || !e.not_ports.is_empty()
            {
                self.item(
                    d,
                    r,
                    ItemKind::InvalidRule,
                    format!(
                        "{side}.services cannot be combined with selector, notSelector, nets, notNets, ports \
                         or notPorts (Calico rejects this rule); left out"
                    ),
                );
                return None;
            }
            let svc_ns = svc.namespace.clone().or_else(|| ns.clone());
            let name = format!("{}/{}", svc_ns.as_deref().unwrap_or("?"), svc.name);
            if remote && dir == PolicyType::Egress {
                let info = svc_ns.as_ref().and_then(|n| {
                    self.opts
                        .services
                        .iter()
                        .find(|s| &s.namespace == n && s.name == svc.name)
                });
                match info {
                    Some(info) if info.selector.is_some() => {
                        let mut sel = vec![Selector::Has("projectcalico.org/namespace".into())];
                        for (k, v) in info.selector.iter().flatten() {
                            sel.push(Selector::Eq(k.clone(), v.clone()));
                        }
                        let sel = Selector::And(sel);
                        let mut pods =
                            self.dnf(&sel, false, Ctx::Endpoint, d, r, "service selector")?;
                        pods = self.and(
                            &pods,
                            &Dnf::single(
                                NAMESPACE_KEY,
                                KeyCons::In([info.namespace.clone()].into()),
                            ),
                        )?;
                        svc_pods = Some(pods);
                        svc_ports = Some(info.ports.iter().map(|p| (p.protocol, p.port)).collect());
                    }
                    Some(info) => {
                        self.item(
                            d,
                            r,
                            ItemKind::Services,
                            format!(
                                "service {name} has no selector: written as toServices, which Cilium resolves to \
                                 the service's endpoint addresses; not verified"
                            ),
                        );
                        services.push((svc.name.clone(), svc_ns.clone()));
                        svc_ports = Some(info.ports.iter().map(|p| (p.protocol, p.port)).collect());
                        services_only = true;
                    }
                    None => {
                        self.item(
                            d,
                            r,
                            ItemKind::Services,
                            format!(
                                "service {name} was not described (ConvertOptions::services): written as \
                                 toServices, which Cilium applies only to services without a selector, and \
                                 without Calico's limit to the service's ports"
                            ),
                        );
                        services.push((svc.name.clone(), svc_ns.clone()));
                        services_only = true;
                    }
                }
            } else {
                self.item(
                    d,
                    r,
                    ItemKind::Services,
                    format!(
                        "{side}.services {name}: Cilium names services only as egress destinations; {}",
                        if allow {
                            "rule left out (less access)"
                        } else {
                            "ignored (the deny is wider)"
                        }
                    ),
                );
                if allow {
                    return None;
                }
            }
        }
        // Calico's GetEntityRuleSelector: the namespace scope applies as soon as any selector
        // field is used, including notSelector.
        let ns_given = blank(&e.namespace_selector);
        let ns_sel = match (ns_given, &ns) {
            (Some(s), _) => {
                let field = format!("{side}.namespaceSelector");
                let sel = self.parse(s, d, r, &field)?;
                Some(self.dnf(&sel, false, Ctx::Namespace, d, r, &field)?)
            }
            (None, Some(ns)) => Some(Dnf::single(NAMESPACE_KEY, KeyCons::In([ns.clone()].into()))),
            (None, None) => None,
        };
        let mut sel_part: Option<Dnf> = None;
        if let Some(sa) = &e.service_accounts {
            let mut acc = Dnf::top();
            if !sa.names.is_empty() {
                acc = Dnf::single(
                    SERVICE_ACCOUNT_KEY,
                    KeyCons::In(sa.names.iter().cloned().collect()),
                );
            }
            if let Some(s) = blank(&sa.selector) {
                let field = format!("{side}.serviceAccounts.selector");
                let sel = self.parse(s, d, r, &field)?;
                let x = self.dnf(&sel, false, Ctx::ServiceAccount, d, r, &field)?;
                acc = self.and(&acc, &x)?;
            }
            sel_part = Some(acc);
        }
        if let Some(s) = blank(&e.selector) {
            let field = format!("{side}.selector");
            let sel = self.parse(s, d, r, &field)?;
            let x = self.dnf(&sel, false, Ctx::Endpoint, d, r, &field)?;
            sel_part = Some(match sel_part {
                Some(p) => self.and(&p, &x)?,
                None => x,
            });
        }
        if let Some(sp) = svc_pods {
            sel_part = Some(match sel_part {
                Some(p) => self.and(&p, &sp)?,
                None => sp,
            });
        }
        let not_sel = match blank(&e.not_selector) {
            Some(s) => {
                let field = format!("{side}.notSelector");
                let sel = self.parse(s, d, r, &field)?;
                Some(self.dnf(&sel, true, Ctx::Endpoint, d, r, &field)?)
            }
            None => None,
        };
        let pos = match (ns_sel, sel_part) {
            (Some(n), sp) if sp.is_some() || not_sel.is_some() || ns_given.is_some() => {
                Some(self.and(&n, &sp.unwrap_or_else(Dnf::top))?)
            }
            (_, sp) => sp,
        };
        let nets = self.nets(&e.nets, d, r, &format!("{side}.nets"))?;
        let not_nets = self.nets(&e.not_nets, d, r, &format!("{side}.notNets"))?;
        let sets = self.network_sets(e, dir, index, side, remote, allow, pos.is_some(), &nets);
        let mut pods = pos.clone().unwrap_or_else(Dnf::top);
        if let Some(n) = &not_sel {
            pods = self.and(&pods, n)?;
        }
        if services_only {
            pods = Dnf::bottom();
        }
        if !nets.is_empty() {
            match self.cover(&nets) {
                Cover::All => {}
                Cover::None => pods = Dnf::bottom(),
                Cover::Partial => {
                    self.item(
                        d,
                        r,
                        ItemKind::NetsPartlyCoverPods,
                        format!(
                            "{side}.nets cover part of the pod CIDRs: Calico matches those pods by IP, Cilium's \
                             CIDR rules never match pods; {}",
                            if allow {
                                "no pod is matched (less access)"
                            } else {
                                "every pod is matched (wider)"
                            }
                        ),
                    );
                    if allow {
                        pods = Dnf::bottom();
                    }
                }
                Cover::Unknown => {
                    self.item(
                        d,
                        r,
                        ItemKind::PodCidrsUnknown,
                        format!(
                            "{side}.nets: pod CIDRs were not given, so the nets are assumed not to contain pods \
                             (Calico matches pods by IP, Cilium's CIDR rules never do)"
                        ),
                    );
                    pods = Dnf::bottom();
                }
            }
        }
        if !not_nets.is_empty() {
            match self.cover(&not_nets) {
                Cover::All => pods = Dnf::bottom(),
                Cover::None => {}
                Cover::Partial => {
                    self.item(
                        d,
                        r,
                        ItemKind::NetsPartlyCoverPods,
                        format!(
                            "{side}.notNets cover part of the pod CIDRs: Calico excludes those pods by IP, \
                             Cilium cannot; {}",
                            if allow {
                                "no pod is matched (less access)"
                            } else {
                                "every pod is matched (wider)"
                            }
                        ),
                    );
                    if allow {
                        pods = Dnf::bottom();
                    }
                }
                Cover::Unknown => {
                    self.item(
                        d,
                        r,
                        ItemKind::PodCidrsUnknown,
                        format!(
                            "{side}.notNets: pod CIDRs were not given, so the notNets are assumed not to contain \
                             pods"
                        ),
                    );
                }
            }
        }
        // Network sets whose nets overlap the pod CIDRs: Calico matches those pods by IP.
        let pos_pods = overlapping(&sets.pos, &self.opts.pod_cidrs);
        let neg_pods = overlapping(&sets.neg, &self.opts.pod_cidrs);
        for (list, neg) in [(pos_pods, false), (neg_pods, true)] {
            if list.is_empty() {
                continue;
            }
            let field = if neg { "notSelector" } else { "selector" };
            let effect = match (neg, allow) {
                (false, true) => "those pods are not matched by address (less access)",
                (false, false) => "every pod is matched (wider)",
                (true, true) => "no pod is matched (less access)",
                (true, false) => "those pods are not excluded (wider)",
            };
            self.item(
                d,
                r,
                ItemKind::NetsPartlyCoverPods,
                format!(
                    "{side}.{field} selects network sets whose nets ({}) overlap the pod CIDRs: Calico \
                     matches those pods by IP, Cilium's CIDR rules never match pods; {effect}",
                    list.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                ),
            );
            match (neg, allow) {
                (false, false) => pods = Dnf::top(),
                (true, true) => pods = Dnf::bottom(),
                _ => {}
            }
        }
        if self.opts.pod_cidrs.is_empty() && !(sets.pos.is_empty() && sets.neg.is_empty()) {
            self.item(
                d,
                r,
                ItemKind::PodCidrsUnknown,
                format!(
                    "{side}: pod CIDRs were not given, so the selected network sets' nets are assumed not \
                     to contain pods (Calico matches pods by IP, Cilium's CIDR rules never do)"
                ),
            );
        }
        let what = format!("{side} selector");
        pods = self.resolve_lossy(pods, loss, d, r, &what);
        let externals = if remote && !services_only && (pos.is_none() || !sets.pos.is_empty()) {
            let minus: Vec<IpNet> = not_nets.iter().chain(&sets.neg).copied().collect();
            let ext = if pos.is_some() {
                Externals::Cidrs(carve(&sets.pos, &minus))
            } else if nets.is_empty() && minus.is_empty() {
                Externals::All
            } else {
                let bases: Vec<IpNet> = if nets.is_empty() {
                    ["0.0.0.0/0", "::/0"]
                        .iter()
                        .filter_map(|s| s.parse().ok())
                        .collect()
                } else {
                    nets.clone()
                };
                Externals::Cidrs(carve(&bases, &minus))
            };
            self.check_infra(&ext, d, r, side);
            match ext {
                Externals::Cidrs(c) if c.is_empty() => Externals::None,
                other => other,
            }
        } else {
            Externals::None
        };
        Some(Peer {
            any: false,
            pods,
            externals,
            services,
            svc_ports,
        })
    }

    /// The network sets one side of a rule selects (see [`convert`](fn@convert) for which sets a
    /// rule sees), with report items: a note naming the sets whose nets are written, and
    /// partial items for selections that depend on unknown namespace labels or sets whose nets
    /// do not parse. `scope`: whether the side's positive selector applies (a selector field
    /// is used); otherwise only `notSelector` takes sets away. `nets`: the rule's nets, which
    /// the selected sets' nets are intersected with.
    #[allow(clippy::too_many_arguments)]
    fn network_sets(
        &mut self,
        e: &EntityRule,
        dir: PolicyType,
        index: usize,
        side: &str,
        remote: bool,
        allow: bool,
        scope: bool,
        nets: &[IpNet],
    ) -> SetNets {
        let (d, r) = (Some(dir), Some(index));
        let mut out = SetNets::default();
        if self.opts.network_sets.is_empty() || e.services.is_some() {
            return out;
        }
        let parse = |t: Option<&str>| t.and_then(|t| Selector::parse(t).ok());
        let sel = parse(blank(&e.selector));
        let not_sel = parse(blank(&e.not_selector));
        let ns_sel = parse(blank(&e.namespace_selector));
        let positive = scope && e.service_accounts.is_none();
        if !positive && not_sel.is_none() {
            return out;
        }
        let own_ns = self.p.namespace.clone();
        let known = &self.opts.namespace_labels;
        let empty = BTreeMap::new();
        // Does a selector over the set's labels need the namespace's labels (other than its
        // name, which is known)?
        let needs_ns = |s: &Selector| {
            s.tests_key(&|k| k.starts_with("pcns.") && k != "pcns.projectcalico.org/name")
        };
        let (mut pos_names, mut neg_names, mut unsure, mut bad) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for set in &self.opts.network_sets {
            let ns_labels = set.namespace.as_ref().and_then(|ns| known.get(ns));
            let labels_known = set.namespace.is_none() || ns_labels.is_some();
            let labels = set.selector_labels(ns_labels.unwrap_or(&empty));
            let visible = match (&ns_sel, &set.namespace) {
                (Some(n), None) => Tri::of(n.matches_with_global(&empty, true)),
                (Some(n), Some(ns)) => match ns_labels {
                    Some(l) => {
                        let mut l = l.clone();
                        l.insert("projectcalico.org/name".into(), ns.clone());
                        Tri::of(n.matches(&l))
                    }
                    None if !n.tests_key(&|k| k != "projectcalico.org/name") => {
                        let l =
                            BTreeMap::from([("projectcalico.org/name".to_string(), ns.clone())]);
                        Tri::of(n.matches(&l))
                    }
                    None => Tri::Unknown,
                },
                (None, _) => match &own_ns {
                    Some(own) => Tri::of(set.namespace.as_ref() == Some(own)),
                    None => Tri::Yes,
                },
            };
            let eval = |s: &Selector| {
                if !labels_known && needs_ns(s) {
                    Tri::Unknown
                } else {
                    Tri::of(s.matches(&labels))
                }
            };
            let pos_t = if positive {
                visible.and(sel.as_ref().map_or(Tri::Yes, eval))
            } else {
                Tri::No
            };
            let neg_t = not_sel.as_ref().map_or(Tri::No, |n| visible.and(eval(n)));
            if pos_t == Tri::No && neg_t == Tri::No {
                continue;
            }
            let (set_nets, bad_nets) = set.parsed_nets();
            if !bad_nets.is_empty() {
                bad.push(format!("{set} ({})", bad_nets.join(", ")));
            }
            // Unknown: an allow rule leaves the set out of its peers and in its exceptions (less
            // access), a deny rule the other way round (wider).
            let take_pos = pos_t == Tri::Yes || (pos_t == Tri::Unknown && !allow);
            let take_neg = neg_t == Tri::Yes || (neg_t == Tri::Unknown && allow);
            if pos_t == Tri::Unknown || neg_t == Tri::Unknown {
                unsure.push(set.to_string());
            }
            if take_pos {
                let mine = intersect(&set_nets, nets);
                if !mine.is_empty() {
                    pos_names.push(format!(
                        "{set} ({})",
                        mine.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                    out.pos.extend(mine);
                }
            }
            if take_neg && !set_nets.is_empty() {
                neg_names.push(format!(
                    "{set} ({})",
                    set_nets
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                out.neg.extend(set_nets);
            }
        }
        out.pos.sort();
        out.pos.dedup();
        out.neg.sort();
        out.neg.dedup();
        if !bad.is_empty() {
            self.item(
                d,
                r,
                ItemKind::NetworkSet,
                format!(
                    "{side}: selected network sets have nets that are not CIDRs or addresses (Calico \
                     rejects such a set): {}; those entries are ignored",
                    bad.join("; ")
                ),
            );
        }
        if !unsure.is_empty() {
            self.item(
                d,
                r,
                ItemKind::NetworkSet,
                format!(
                    "{side}: whether the selectors select {} depends on namespace labels, which were not \
                     given (ConvertOptions::namespace_labels); {}",
                    unsure.join(", "),
                    if allow {
                        "taken as not selected by selector and selected by notSelector (less access)"
                    } else {
                        "taken as selected by selector and not by notSelector (wider)"
                    }
                ),
            );
        }
        if remote {
            let field = if dir == PolicyType::Ingress {
                "fromCIDRSet"
            } else {
                "toCIDRSet"
            };
            if !pos_names.is_empty() {
                self.item(
                    d,
                    r,
                    ItemKind::NetworkSetNets,
                    format!(
                        "{side} selects network sets, written as {field}: {}",
                        pos_names.join("; ")
                    ),
                );
            }
            if !neg_names.is_empty() {
                self.item(
                    d,
                    r,
                    ItemKind::NetworkSetNets,
                    format!(
                        "{side}.notSelector selects network sets, whose nets are excepted from the CIDR \
                         peers: {}",
                        neg_names.join("; ")
                    ),
                );
            }
        }
        out
    }

    fn nets(
        &mut self,
        list: &[String],
        d: Option<PolicyType>,
        r: Option<usize>,
        field: &str,
    ) -> Option<Vec<IpNet>> {
        let mut out = Vec::new();
        for s in list {
            let parsed = s
                .parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(n) => out.push(n),
                Err(_) => {
                    self.item(
                        d,
                        r,
                        ItemKind::InvalidRule,
                        format!("{field}: {s:?} is not a CIDR or IP address (Calico rejects this rule); left out"),
                    );
                    return None;
                }
            }
        }
        Some(out)
    }

    fn cover(&self, nets: &[IpNet]) -> Cover {
        cover(nets, &self.opts.pod_cidrs)
    }

    fn check_infra(
        &mut self,
        ext: &Externals,
        d: Option<PolicyType>,
        r: Option<usize>,
        side: &str,
    ) {
        let blocks: Vec<(IpNet, Vec<IpNet>)> = match ext {
            Externals::None => return,
            Externals::All => ["0.0.0.0/0", "::/0"]
                .iter()
                .filter_map(|s| s.parse().ok())
                .map(|n| (n, Vec::new()))
                .collect(),
            Externals::Cidrs(c) => c.clone(),
        };
        // Ranges a block reaches: overlapping it, and not wholly inside one of its exceptions.
        let hits = |list: &[IpNet]| {
            list.iter()
                .filter(|x| {
                    blocks
                        .iter()
                        .any(|(b, except)| overlaps(b, x) && !except.iter().any(|e| e.contains(*x)))
                })
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        let nodes = hits(&self.opts.node_cidrs);
        if !nodes.is_empty() {
            self.item(
                d,
                r,
                ItemKind::NetsCoverNodes,
                format!(
                    "{side} addresses include node addresses ({}): Calico matches host traffic by IP, Cilium's \
                     CIDR rules do not match nodes (add fromEntities/toEntities host, remote-node or \
                     kube-apiserver)",
                    nodes.join(", ")
                ),
            );
        }
        if matches!(ext, Externals::Cidrs(_)) {
            let svcs = hits(&self.opts.service_cidrs);
            if !svcs.is_empty() {
                self.item(
                    d,
                    r,
                    ItemKind::NetsCoverServices,
                    format!(
                        "{side}.nets include the service CIDR ({}): policy sees the backend pod after service \
                         translation, so service IPs in nets match nothing under Cilium (and under Calico \
                         except with kube-proxy in IPVS mode); select the backends instead",
                        svcs.join(", ")
                    ),
                );
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cover {
    All,
    None,
    Partial,
    Unknown,
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// The nets of `a` that overlap some net of `b`.
fn overlapping(a: &[IpNet], b: &[IpNet]) -> Vec<IpNet> {
    a.iter()
        .filter(|x| b.iter().any(|y| overlaps(x, y)))
        .copied()
        .collect()
}

/// The intersection of two unions of CIDRs (`within` empty: no limit). Two CIDRs either nest
/// or are disjoint, so each piece is the smaller of a nesting pair.
fn intersect(nets: &[IpNet], within: &[IpNet]) -> Vec<IpNet> {
    if within.is_empty() {
        return nets.to_vec();
    }
    let mut out = Vec::new();
    for n in nets {
        for w in within {
            if w.contains(n) {
                out.push(*n);
            } else if n.contains(w) {
                out.push(*w);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Each block with the nets of `minus` inside it as exceptions; blocks wholly inside one of
/// `minus` are dropped.
fn carve(blocks: &[IpNet], minus: &[IpNet]) -> Vec<(IpNet, Vec<IpNet>)> {
    let mut out = Vec::new();
    for n in blocks {
        if minus.iter().any(|x| x.contains(n)) {
            continue;
        }
        let mut except: Vec<IpNet> = minus
            .iter()
            .filter(|x| n.contains(*x) && *x != n)
            .copied()
            .collect();
        except.sort();
        except.dedup();
        if !out.iter().any(|(b, e)| b == n && e == &except) {
            out.push((*n, except));
        }
    }
    out
}

fn cover(nets: &[IpNet], pods: &[IpNet]) -> Cover {
    if pods.is_empty() {
        return Cover::Unknown;
    }
    let mut all = true;
    let mut any = false;
    for p in pods {
        if nets.iter().any(|n| n.contains(p)) {
            any = true;
        } else {
            all = false;
            if nets.iter().any(|n| overlaps(n, p)) {
                any = true;
            }
        }
    }
    match (all, any) {
        (true, _) => Cover::All,
        (false, false) => Cover::None,
        (false, true) => Cover::Partial,
    }
}

/// Sorted, merged, non-overlapping inclusive ranges.
fn normalise(mut v: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    v.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// `a` minus `b` (both normalised).
fn subtract(a: &[(u16, u16)], b: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    for &(lo, hi) in a {
        let mut cur = Some((lo, hi));
        for &(blo, bhi) in b {
            let Some((clo, chi)) = cur else { break };
            if bhi < clo || blo > chi {
                continue;
            }
            if blo > clo {
                out.push((clo, blo - 1));
            }
            cur = if bhi < chi {
                Some((bhi + 1, chi))
            } else {
                None
            };
        }
        if let Some(c) = cur {
            out.push(c);
        }
    }
    out
}

fn restrict_to_service_ports(l4: &L4, ports: &[(Protocol, u16)]) -> L4 {
    let mut by_proto: BTreeMap<Protocol, Vec<(u16, u16)>> = BTreeMap::new();
    for (p, n) in ports {
        let allowed = match l4 {
            L4::Any => true,
            L4::Items(items) => items.iter().any(|i| {
                matches!(i, L4Item::Ports { proto, ranges, .. }
                    if proto == p && ranges.iter().any(|(a, b)| a <= n && n <= b))
            }),
        };
        if allowed && *n >= 1 {
            by_proto.entry(*p).or_default().push((*n, *n));
        }
    }
    L4::Items(
        by_proto
            .into_iter()
            .map(|(proto, r)| L4Item::Ports {
                proto,
                ranges: normalise(r),
                named: Vec::new(),
            })
            .collect(),
    )
}

fn http_rules(methods: &[String], paths: &[super::calico::HttpPath]) -> Vec<HttpRule> {
    let path_res: Vec<Option<String>> = if paths.is_empty() {
        vec![None]
    } else {
        paths
            .iter()
            .map(|p| match (&p.exact, &p.prefix) {
                (Some(e), _) => Some(regex::escape(e)),
                (None, Some(pre)) => Some(format!("{}.*", regex::escape(pre))),
                (None, None) => None,
            })
            .collect()
    };
    let method_res: Vec<Option<String>> = if methods.is_empty() {
        vec![None]
    } else {
        methods.iter().map(|m| Some(regex::escape(m))).collect()
    };
    let mut out = Vec::new();
    for m in &method_res {
        for p in &path_res {
            out.push(HttpRule {
                method: m.clone(),
                path: p.clone(),
            });
        }
    }
    out
}

fn l4_overlaps(a: &L4, b: &L4) -> bool {
    match (a, b) {
        (L4::Any, L4::Items(i)) | (L4::Items(i), L4::Any) => !i.is_empty(),
        (L4::Any, L4::Any) => true,
        (L4::Items(x), L4::Items(y)) => x.iter().any(|i| {
            y.iter().any(|j| match (i, j) {
                (
                    L4Item::Ports {
                        proto: p1,
                        ranges: r1,
                        named: n1,
                    },
                    L4Item::Ports {
                        proto: p2,
                        ranges: r2,
                        named: n2,
                    },
                ) => {
                    p1 == p2
                        && (!n1.is_empty()
                            || !n2.is_empty()
                            || r1
                                .iter()
                                .any(|(a, b)| r2.iter().any(|(c, d)| a <= d && c <= b)))
                }
                (L4Item::Icmp { v6: v1, types: t1 }, L4Item::Icmp { v6: v2, types: t2 }) => {
                    v1 == v2
                        && match (t1, t2) {
                            (Some(s1), Some(s2)) => !s1.is_disjoint(s2),
                            _ => true,
                        }
                }
                _ => false,
            })
        }),
    }
}

fn remote_overlaps(a: &Peer, b: &Peer) -> bool {
    if a.is_empty() || b.is_empty() {
        return false;
    }
    if a.any || b.any {
        return true;
    }
    if a.pods.overlaps(&b.pods) {
        return true;
    }
    let ext = match (&a.externals, &b.externals) {
        (Externals::None, _) | (_, Externals::None) => false,
        (Externals::All, _) | (_, Externals::All) => true,
        (Externals::Cidrs(x), Externals::Cidrs(y)) => {
            x.iter().any(|(n, _)| y.iter().any(|(m, _)| overlaps(n, m)))
        }
    };
    let svc = (!a.services.is_empty() && (!b.services.is_empty() || !b.pods.is_bottom()))
        || (!b.services.is_empty() && !a.pods.is_bottom());
    ext || svc
}

fn sort_key(p: &CalicoPolicy, opts: &ConvertOptions) -> (f64, String, f64, String) {
    let tier = p.tier().to_string();
    let tier_order = opts
        .tiers
        .iter()
        .find(|t| t.name == tier)
        .map(|t| t.order.unwrap_or(f64::INFINITY))
        .unwrap_or(if tier == "default" {
            DEFAULT_TIER_ORDER
        } else {
            f64::INFINITY
        });
    let name = match &p.namespace {
        Some(ns) => format!("{ns}/{}", p.name),
        None => p.name.clone(),
    };
    (
        tier_order,
        tier,
        p.spec.order.unwrap_or(f64::INFINITY),
        name,
    )
}

/// Calico's order of evaluation: by tier order, tier name, policy order, policy name.
pub(crate) fn evaluation_order(policies: &[CalicoPolicy], tiers: &[Tier]) -> Vec<usize> {
    let opts = ConvertOptions {
        tiers: tiers.to_vec(),
        ..ConvertOptions::default()
    };
    let keys: Vec<_> = policies.iter().map(|p| sort_key(p, &opts)).collect();
    let mut idx: Vec<usize> = (0..policies.len()).collect();
    idx.sort_by(|&a, &b| {
        let (ka, kb) = (&keys[a], &keys[b]);
        ka.0.total_cmp(&kb.0)
            .then_with(|| ka.1.cmp(&kb.1))
            .then_with(|| ka.2.total_cmp(&kb.2))
            .then_with(|| ka.3.cmp(&kb.3))
    });
    idx
}

fn order_analysis(policies: &[CalicoPolicy], states: &mut [PolicyState], opts: &ConvertOptions) {
    let order = evaluation_order(policies, &opts.tiers);
    for dir in [PolicyType::Ingress, PolicyType::Egress] {
        // (policy index, rule position in state.rules), in Calico's evaluation order.
        let mut seq: Vec<(usize, usize)> = Vec::new();
        for &pi in &order {
            let Some(st) = states.get(pi) else { continue };
            if st.subject.is_none() {
                continue;
            }
            for (ri, r) in st.rules.iter().enumerate() {
                if r.dir == dir {
                    seq.push((pi, ri));
                }
            }
        }
        let mut found: Vec<(usize, usize, usize, usize)> = Vec::new();
        let conflict = |pa: usize, ra: usize, pb: usize, rb: usize| -> bool {
            let (Some(sa), Some(sb)) = (states.get(pa), states.get(pb)) else {
                return false;
            };
            let (Some(a), Some(b)) = (sa.rules.get(ra), sb.rules.get(rb)) else {
                return false;
            };
            if a.act != Act::Allow || b.act != Act::Deny {
                return false;
            }
            let (Some(subj_a), Some(subj_b)) = (&sa.subject, &sb.subject) else {
                return false;
            };
            let (Ok(la), Ok(lb)) = (subj_a.and(&a.local), subj_b.and(&b.local)) else {
                return true;
            };
            la.overlaps(&lb) && remote_overlaps(&a.remote, &b.remote) && l4_overlaps(&a.l4, &b.l4)
        };
        for (i, &(pa, ra)) in seq.iter().enumerate() {
            for &(pb, rb) in seq.iter().skip(i + 1) {
                if conflict(pa, ra, pb, rb) {
                    found.push((pa, ra, pb, rb));
                }
                // Policies of equal tier and order: the tie-break (by name) is Calico's
                // internal detail, so check both ways.
                let tie = pa != pb
                    && match (policies.get(pa), policies.get(pb)) {
                        (Some(x), Some(y)) => {
                            let (kx, ky) = (sort_key(x, opts), sort_key(y, opts));
                            kx.0 == ky.0 && kx.1 == ky.1 && kx.2 == ky.2
                        }
                        _ => false,
                    };
                if tie && conflict(pb, rb, pa, ra) {
                    found.push((pb, rb, pa, ra));
                }
            }
        }
        for (pa, ra, pb, rb) in found {
            let (Some(a), Some(b)) = (
                states.get(pa).and_then(|s| s.rules.get(ra)).cloned(),
                states.get(pb).and_then(|s| s.rules.get(rb)).cloned(),
            ) else {
                continue;
            };
            let (Some(pol_a), Some(pol_b)) = (policies.get(pa), policies.get(pb)) else {
                continue;
            };
            let where_b = if pa == pb {
                format!("deny rule {}", b.index)
            } else {
                format!("deny rule {} of {}", b.index, pol_b.reference())
            };
            let where_a = if pa == pb {
                format!("allow rule {}", a.index)
            } else {
                format!("allow rule {} of {}", a.index, pol_a.reference())
            };
            let text_a = format!(
                "this allow comes before (or ties in order with) {where_b} and may match some of the same \
                 traffic: Calico \
                 allows that traffic, Cilium denies it (deny always wins); reorder or narrow the rules, or \
                 accept the stricter result"
            );
            let text_b = format!(
                "{where_a} comes before (or ties in order with) this deny and may match some of the same \
                 traffic: Calico \
                 allows that traffic, Cilium denies it"
            );
            for (pi, r, text) in [(pa, &a, text_a), (pb, &b, text_b)] {
                if let (Some(st), Some(pol)) = (states.get_mut(pi), policies.get(pi)) {
                    let it = ReportItem {
                        policy: pol.reference(),
                        direction: Some(dir),
                        rule: Some(r.index),
                        kind: ItemKind::AllowBeforeDeny,
                        detail: text,
                    };
                    if !st.items.contains(&it) {
                        st.items.push(it);
                    }
                }
            }
        }
    }
}

/// The Cilium rules (before ports) for a peer: one per kind of peer, since Cilium rejects a
/// rule that combines `fromEndpoints`, `fromEntities` and `fromCIDRSet` ("combining … is not
/// supported yet"); the rules of a direction are ORed, so this is the same peer.
fn peer_rules(dir: PolicyType, peer: &Peer) -> Vec<cilium::Rule> {
    let ingress = dir == PolicyType::Ingress;
    if peer.any {
        let mut main = cilium::Rule::default();
        if ingress {
            main.from_entities = vec!["all".into()];
        } else {
            main.to_entities = vec!["all".into()];
        }
        return vec![main];
    }
    let selectors: Vec<_> = peer
        .pods
        .0
        .iter()
        .filter_map(|c| {
            let mut c = c.clone();
            // Only pods: a selector without the namespace key would also match identities
            // outside the cluster, and Cilium would scope it to the policy's namespace.
            c.add(NAMESPACE_KEY, KeyCons::Exists)
                .then(|| c.to_selector())
        })
        .collect();
    let (entities, cidrs) = match &peer.externals {
        Externals::None => (Vec::new(), Vec::new()),
        Externals::All => (vec!["world".to_string()], Vec::new()),
        Externals::Cidrs(list) => (
            Vec::new(),
            list.iter()
                .map(|(n, ex)| CidrRule {
                    cidr: n.to_string(),
                    except: ex.iter().map(ToString::to_string).collect(),
                })
                .collect(),
        ),
    };
    let mut out = Vec::new();
    if !selectors.is_empty() {
        let mut r = cilium::Rule::default();
        if ingress {
            r.from_endpoints = selectors;
        } else {
            r.to_endpoints = selectors;
        }
        out.push(r);
    }
    if !entities.is_empty() {
        let mut r = cilium::Rule::default();
        if ingress {
            r.from_entities = entities;
        } else {
            r.to_entities = entities;
        }
        out.push(r);
    }
    if !cidrs.is_empty() {
        let mut r = cilium::Rule::default();
        if ingress {
            r.from_cidr_set = cidrs;
        } else {
            r.to_cidr_set = cidrs;
        }
        out.push(r);
    }
    if !peer.services.is_empty() && !ingress {
        out.push(cilium::Rule {
            to_services: peer
                .services
                .iter()
                .map(|(name, ns)| ServicePeer {
                    k8s_service: Some(K8sService {
                        service_name: name.clone(),
                        namespace: ns.clone(),
                    }),
                })
                .collect(),
            ..cilium::Rule::default()
        });
    }
    out
}

fn l4_parts(l4: &L4, http: Option<&Vec<HttpRule>>) -> Vec<(Vec<PortRule>, Vec<IcmpRule>)> {
    let L4::Items(items) = l4 else {
        return vec![(Vec::new(), Vec::new())];
    };
    let mut ports = Vec::new();
    let mut fields = Vec::new();
    for i in items {
        match i {
            L4Item::Ports {
                proto,
                ranges,
                named,
            } => {
                let protocol = Some(proto.to_string());
                for &(a, b) in ranges {
                    ports.push(if (a, b) == FULL {
                        PortProtocol {
                            port: "0".into(),
                            end_port: None,
                            protocol: protocol.clone(),
                        }
                    } else {
                        PortProtocol {
                            port: a.to_string(),
                            end_port: (b > a).then_some(b),
                            protocol: protocol.clone(),
                        }
                    });
                }
                for n in named {
                    ports.push(PortProtocol {
                        port: n.clone(),
                        end_port: None,
                        protocol: protocol.clone(),
                    });
                }
            }
            L4Item::Icmp { v6, types } => {
                let family = v6.then(|| "IPv6".to_string());
                let list: Vec<u8> = match types {
                    Some(t) => t.iter().copied().collect(),
                    None => (0..=u8::MAX).collect(),
                };
                for t in list {
                    fields.push(IcmpField {
                        family: family.clone(),
                        icmp_type: Value::from(t),
                    });
                }
            }
        }
    }
    let mut out = Vec::new();
    if !ports.is_empty() {
        let rules: Vec<PortRule> = ports
            .chunks(40)
            .map(|c| PortRule {
                ports: c.to_vec(),
                rules: http.map(|h| L7Rules { http: h.clone() }),
            })
            .collect();
        out.push((rules, Vec::new()));
    }
    if !fields.is_empty() {
        let icmps = fields
            .chunks(40)
            .map(|c| IcmpRule { fields: c.to_vec() })
            .collect();
        out.push((Vec::new(), icmps));
    }
    out
}

fn cilium_rules(r: &NormRule) -> Vec<cilium::Rule> {
    let mut out = Vec::new();
    for l3 in peer_rules(r.dir, &r.remote) {
        for (ports, icmps) in l4_parts(&r.l4, r.http.as_ref()) {
            let mut rule = l3.clone();
            rule.to_ports = ports;
            rule.icmps = icmps;
            out.push(rule);
        }
    }
    out
}

fn emit(policies: &[CalicoPolicy], states: Vec<PolicyState>) -> Conversion {
    let mut conv = Conversion::default();
    let mut used: HashSet<(Option<String>, String)> = HashSet::new();
    for (p, st) in policies.iter().zip(states) {
        let status = if st.items.iter().any(|i| i.kind.makes_partial()) {
            Status::Partial
        } else {
            Status::Exact
        };
        let mut outputs = Vec::new();
        if let Some(subject) = &st.subject {
            // Rules grouped by the extra constraint on the policy's own pod.
            let mut groups: Vec<(Option<Conj>, Vec<&NormRule>)> = vec![(None, Vec::new())];
            for r in &st.rules {
                if r.local.is_top() {
                    if let Some(g) = groups.first_mut() {
                        g.1.push(r);
                    }
                    continue;
                }
                for c in &r.local.0 {
                    match groups.iter_mut().find(|g| g.0.as_ref() == Some(c)) {
                        Some(g) => g.1.push(r),
                        None => groups.push((Some(c.clone()), vec![r])),
                    }
                }
            }
            for s in &subject.0 {
                for (local, rules) in &groups {
                    let base = local.is_none();
                    let sel = match local {
                        None => Some(s.clone()),
                        Some(l) => s.and(l),
                    };
                    let Some(sel) = sel else { continue };
                    if !base && rules.is_empty() {
                        continue;
                    }
                    let mut spec = cilium::PolicyRule::default();
                    for dir in [PolicyType::Ingress, PolicyType::Egress] {
                        let of = |act: Act| -> Vec<cilium::Rule> {
                            rules
                                .iter()
                                .filter(|r| r.dir == dir && r.act == act)
                                .flat_map(|r| cilium_rules(r))
                                .collect()
                        };
                        let mut allow = of(Act::Allow);
                        let deny = of(Act::Deny);
                        if allow.is_empty() && base && st.types.contains(&dir) {
                            // An empty rule matches nothing but puts the pods in default deny.
                            allow.push(cilium::Rule::default());
                        }
                        let (allow, deny) = (
                            (!allow.is_empty()).then_some(allow),
                            (!deny.is_empty()).then_some(deny),
                        );
                        match dir {
                            PolicyType::Ingress => {
                                spec.ingress = allow;
                                spec.ingress_deny = deny;
                            }
                            PolicyType::Egress => {
                                spec.egress = allow;
                                spec.egress_deny = deny;
                            }
                        }
                    }
                    if spec.ingress.is_none()
                        && spec.ingress_deny.is_none()
                        && spec.egress.is_none()
                        && spec.egress_deny.is_none()
                    {
                        continue;
                    }
                    let mut sel = sel;
                    match &p.namespace {
                        Some(ns) => {
                            // Cilium adds the policy's namespace itself.
                            if sel.keys.get(NAMESPACE_KEY)
                                == Some(&KeyCons::In([ns.clone()].into()))
                            {
                                sel.keys.remove(NAMESPACE_KEY);
                            }
                        }
                        None => {
                            if !sel.add(NAMESPACE_KEY, KeyCons::Exists) {
                                continue;
                            }
                        }
                    }
                    spec.endpoint_selector = sel.to_selector();
                    spec.description = Some(description(p));
                    let mut name = if outputs.is_empty() {
                        p.name.clone()
                    } else {
                        format!("{}-{}", p.name, outputs.len() + 1)
                    };
                    while used.contains(&(p.namespace.clone(), name.clone())) {
                        name.push_str("-x");
                    }
                    used.insert((p.namespace.clone(), name.clone()));
                    let kind = match p.kind {
                        PolicyKind::NetworkPolicy => "CiliumNetworkPolicy",
                        PolicyKind::GlobalNetworkPolicy => "CiliumClusterwideNetworkPolicy",
                    };
                    let obj = cilium::CiliumPolicy {
                        api_version: API_VERSION.into(),
                        kind: kind.into(),
                        metadata: ObjectMeta {
                            name: name.clone(),
                            namespace: p.namespace.clone(),
                            labels: [("app.kubernetes.io/managed-by".into(), "cnimig".into())]
                                .into(),
                            annotations: [
                                ("cnimig.io/calico-policy".into(), p.reference().to_string()),
                                (
                                    "cnimig.io/conversion".into(),
                                    match status {
                                        Status::Exact => "exact".into(),
                                        Status::Partial => "partial".into(),
                                    },
                                ),
                            ]
                            .into(),
                        },
                        spec,
                    };
                    if let Ok(v) = serde_json::to_value(&obj) {
                        outputs.push(name);
                        conv.objects.push(ConvertedObject {
                            policy: p.reference(),
                            object: v,
                        });
                    }
                }
            }
        }
        conv.report.policies.push(PolicyReport {
            policy: p.reference(),
            status,
            outputs,
            items: st.items,
        });
    }
    conv
}

fn description(p: &CalicoPolicy) -> String {
    let mut s = format!("Converted by cnimig from Calico {}", p.reference());
    if let Some(o) = p.spec.order {
        s.push_str(&format!(" (order {o})"));
    }
    if p.tier() != "default" {
        s.push_str(&format!(" (tier {})", p.tier()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_subtract_and_merge() {
        assert_eq!(normalise(vec![(5, 9), (1, 3), (4, 4)]), vec![(1, 9)]);
        assert_eq!(
            subtract(&[(1, 100)], &[(10, 20), (50, 50)]),
            vec![(1, 9), (21, 49), (51, 100)]
        );
        assert_eq!(subtract(&[(1, 10)], &[(1, 10)]), vec![]);
        assert_eq!(
            subtract(&[FULL], &[(1, 1), (65535, 65535)]),
            vec![(2, 65534)]
        );
    }

    #[test]
    fn cidr_intersection_and_carving() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(
            intersect(
                &[n("10.0.0.0/8"), n("192.168.1.0/24")],
                &[n("10.1.0.0/16"), n("192.168.0.0/16")]
            ),
            vec![n("10.1.0.0/16"), n("192.168.1.0/24")]
        );
        assert_eq!(intersect(&[n("10.0.0.0/8")], &[]), vec![n("10.0.0.0/8")]);
        assert_eq!(intersect(&[n("10.0.0.0/8")], &[n("11.0.0.0/8")]), vec![]);
        assert_eq!(
            carve(
                &[n("10.0.0.0/8"), n("11.0.0.0/16")],
                &[n("10.1.0.0/16"), n("11.0.0.0/8")]
            ),
            vec![(n("10.0.0.0/8"), vec![n("10.1.0.0/16")])]
        );
    }

    #[test]
    fn network_sets_through_namespace_labels_need_the_namespaces() {
        let policy = "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: p, namespace: web}\nspec:\n  selector: all()\n  egress:\n  - action: Allow\n    destination: {namespaceSelector: env == 'prod', selector: role == 'db'}\n---\napiVersion: projectcalico.org/v3\nkind: NetworkSet\nmetadata: {name: dbs, namespace: data, labels: {role: db}}\nspec: {nets: [192.0.2.0/24]}\n";
        let opts = ConvertOptions {
            pod_cidrs: vec!["10.42.0.0/16".parse().unwrap()],
            ..ConvertOptions::default()
        };
        let unknown = convert_documents(
            &super::super::calico::parse_documents(policy).unwrap(),
            &opts,
        );
        assert!(!unknown.report.all_exact());
        assert!(unknown.report.items().any(|i| i.kind == ItemKind::NetworkSet && i.detail.contains("NetworkSet data/dbs")));
        // The allow leaves the set out (less access).
        assert!(
            !unknown.objects[0]
                .object
                .to_string()
                .contains("192.0.2.0/24")
        );
        let ns =
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: data, labels: {env: prod}}\n";
        let parsed = super::super::calico::parse_documents(&format!("{policy}{ns}")).unwrap();
        assert!(parsed.skipped.is_empty());
        let known = convert_documents(&parsed, &opts);
        assert!(known.report.all_exact(), "{}", known.report);
        assert_eq!(
            known.objects[0].object["spec"]["egress"][1]["toCIDRSet"],
            serde_json::json!([{"cidr": "192.0.2.0/24"}])
        );
        // A namespace without those labels: the set is not selected, exactly.
        let other = ns.replace("env: prod", "env: dev");
        let parsed = super::super::calico::parse_documents(&format!("{policy}{other}")).unwrap();
        let dev = convert_documents(&parsed, &opts);
        assert!(dev.report.all_exact(), "{}", dev.report);
        assert!(!dev.objects[0].object.to_string().contains("192.0.2.0/24"));
    }

    #[test]
    fn pod_cidr_cover() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let pods = [n("10.42.0.0/16")];
        assert_eq!(cover(&[n("10.0.0.0/8")], &pods), Cover::All);
        assert_eq!(cover(&[n("10.42.3.0/24")], &pods), Cover::Partial);
        assert_eq!(cover(&[n("192.168.0.0/16")], &pods), Cover::None);
        assert_eq!(cover(&[n("10.0.0.0/8")], &[]), Cover::Unknown);
    }

    #[test]
    fn http_paths_become_anchored_regexes() {
        let r = http_rules(
            &["GET".into()],
            &[
                super::super::calico::HttpPath {
                    exact: Some("/a.b".into()),
                    prefix: None,
                },
                super::super::calico::HttpPath {
                    exact: None,
                    prefix: Some("/api/".into()),
                },
            ],
        );
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].path.as_deref(), Some("/a\\.b"));
        assert_eq!(r[1].path.as_deref(), Some("/api/.*"));
    }
}
