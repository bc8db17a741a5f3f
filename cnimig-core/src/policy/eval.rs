//! Two small reference evaluators, one per CNI, over the same model of pods and connections:
//! [`CalicoEvaluator`] (ordered tiers and policies, first matching `Allow`/`Deny` wins,
//! `Pass` to the next tier, `Log` goes on, end-of-tier deny once a policy selects the pod,
//! namespace profiles allow otherwise) and [`CiliumEvaluator`] (allowed when some allow rule
//! matches and no deny rule does; default deny once a policy with rules in that direction
//! selects the pod). Both are used by the tests to check that exact conversions agree.
//!
//! # Caveats
//! The model has pods, external addresses and Calico network sets ([`World::network_sets`],
//! which Calico's rule selectors select by label and match by address, pod addresses included):
//! no host endpoints, nodes or service IPs (connections are after service translation). Pods have no named container
//! ports, so named ports never match on either side. Cilium's `toServices` never matches a
//! pod (Cilium applies it to services without a selector only). IPv4 and IPv6 addresses both
//! work; `ipVersion` is checked against the source address.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::calico::{
    Action, CalicoPolicy, EntityRule, IcmpMatch, NetworkSet, PolicyKind, PolicyType, Port,
    Protocol, Rule, Tier,
};
use super::cilium::{self, CiliumPolicy, ICMPV4_TYPE_NAMES, LabelSelector, Operator};
use super::convert::{ServiceInfo, evaluation_order};
use super::norm::cilium_filters_label;
use super::selector::Selector;

/// A pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    /// Name (for messages).
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Service account name.
    pub service_account: String,
    /// Pod IP.
    pub ip: IpAddr,
}

/// Pods, namespaces (with their labels) and services.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct World {
    /// The pods.
    pub pods: Vec<Pod>,
    /// Namespace labels by namespace name (a namespace missing here has no labels).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Services (for Calico's `services` rules).
    pub services: Vec<ServiceInfo>,
    /// Calico `NetworkSet` and `GlobalNetworkSet` objects.
    #[serde(default)]
    pub network_sets: Vec<NetworkSet>,
}

impl World {
    fn ns_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.namespaces.get(ns).cloned().unwrap_or_default()
    }
}

/// One end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Endpoint {
    /// A pod, by index into [`World::pods`].
    Pod(usize),
    /// An address outside the cluster.
    External(IpAddr),
}

/// An HTTP request carried by the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRequest {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Path (request target).
    pub path: String,
}

/// A connection (its first packet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// Source.
    pub src: Endpoint,
    /// Destination.
    pub dst: Endpoint,
    /// IP protocol.
    pub protocol: Protocol,
    /// Source port (TCP, UDP, SCTP).
    pub src_port: u16,
    /// Destination port (TCP, UDP, SCTP).
    pub dst_port: u16,
    /// ICMP type and code (ICMP, ICMPv6).
    pub icmp: Option<(u8, u8)>,
    /// The HTTP request, if the connection carries one.
    pub http: Option<HttpRequest>,
}

/// The decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Delivered.
    Allow,
    /// Dropped.
    Deny,
}

fn and(a: Verdict, b: Verdict) -> Verdict {
    if a == Verdict::Allow && b == Verdict::Allow {
        Verdict::Allow
    } else {
        Verdict::Deny
    }
}

fn endpoint_ip(world: &World, e: Endpoint) -> Option<IpAddr> {
    match e {
        Endpoint::Pod(i) => world.pods.get(i).map(|p| p.ip),
        Endpoint::External(ip) => Some(ip),
    }
}

// ---------------------------------------------------------------------------------------------
// Calico

struct CEntity {
    selector: Option<Selector>,
    not_selector: Option<Selector>,
    namespace_selector: Option<Selector>,
    sa_selector: Option<Selector>,
    nets: Vec<IpNet>,
    not_nets: Vec<IpNet>,
}

struct CRule<'a> {
    rule: &'a Rule,
    src: CEntity,
    dst: CEntity,
}

struct CPolicy<'a> {
    p: &'a CalicoPolicy,
    selector: Selector,
    namespace_selector: Option<Selector>,
    sa_selector: Option<Selector>,
    ingress: Vec<CRule<'a>>,
    egress: Vec<CRule<'a>>,
}

fn parse_opt(s: &Option<String>) -> Result<Option<Selector>, ()> {
    match s.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => Selector::parse(s).map(Some).map_err(|_| ()),
    }
}

fn parse_nets(v: &[String]) -> Result<Vec<IpNet>, ()> {
    v.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| ())
        })
        .collect()
}

fn compile_entity(e: &EntityRule) -> Result<CEntity, ()> {
    Ok(CEntity {
        selector: parse_opt(&e.selector)?,
        not_selector: parse_opt(&e.not_selector)?,
        namespace_selector: parse_opt(&e.namespace_selector)?,
        sa_selector: match &e.service_accounts {
            Some(sa) => parse_opt(&sa.selector)?,
            None => None,
        },
        nets: parse_nets(&e.nets)?,
        not_nets: parse_nets(&e.not_nets)?,
    })
}

fn compile_rules_calico(list: &[Rule]) -> Result<Vec<CRule<'_>>, ()> {
    list.iter()
        .map(|r| {
            Ok(CRule {
                rule: r,
                src: compile_entity(&r.source)?,
                dst: compile_entity(&r.destination)?,
            })
        })
        .collect()
}

fn compile_policy(p: &CalicoPolicy) -> Result<CPolicy<'_>, ()> {
    let rules = compile_rules_calico;
    Ok(CPolicy {
        p,
        selector: parse_opt(&p.spec.selector)?.unwrap_or(Selector::All),
        namespace_selector: parse_opt(&p.spec.namespace_selector)?,
        sa_selector: parse_opt(&p.spec.service_account_selector)?,
        ingress: rules(&p.spec.ingress)?,
        egress: rules(&p.spec.egress)?,
    })
}

/// The labels Calico sees on a pod's endpoint, its namespace and its service account.
struct CalicoView<'w> {
    pod: &'w Pod,
    endpoint: BTreeMap<String, String>,
    namespace: BTreeMap<String, String>,
    service_account: BTreeMap<String, String>,
}

fn calico_view<'w>(world: &'w World, pod: &'w Pod) -> CalicoView<'w> {
    let mut namespace = world.ns_labels(&pod.namespace);
    namespace.insert("projectcalico.org/name".into(), pod.namespace.clone());
    let service_account: BTreeMap<String, String> = [(
        "projectcalico.org/name".to_string(),
        pod.service_account.clone(),
    )]
    .into();
    let mut endpoint = pod.labels.clone();
    endpoint.insert("projectcalico.org/namespace".into(), pod.namespace.clone());
    endpoint.insert("projectcalico.org/orchestrator".into(), "k8s".into());
    endpoint.insert(
        "projectcalico.org/serviceaccount".into(),
        pod.service_account.clone(),
    );
    for (k, v) in &namespace {
        endpoint.insert(format!("pcns.{k}"), v.clone());
    }
    for (k, v) in &service_account {
        endpoint.insert(format!("pcsa.{k}"), v.clone());
    }
    CalicoView {
        pod,
        endpoint,
        namespace,
        service_account,
    }
}

/// Calico's evaluation of its own policies.
pub struct CalicoEvaluator<'a> {
    /// Compiled policies in evaluation order (invalid ones left out, as Calico rejects them).
    policies: Vec<CPolicy<'a>>,
}

impl<'a> CalicoEvaluator<'a> {
    /// Prepares the policies (in Calico's order: tier, order, name). Policies Calico would
    /// reject (a selector or CIDR that does not parse) are left out.
    #[must_use]
    pub fn new(policies: &'a [CalicoPolicy], tiers: &[Tier]) -> Self {
        let order = evaluation_order(policies, tiers);
        let policies = order
            .into_iter()
            .filter_map(|i| policies.get(i))
            .filter_map(|p| compile_policy(p).ok())
            .collect();
        CalicoEvaluator { policies }
    }

    /// The verdict for a connection: egress policy at a source pod and ingress policy at a
    /// destination pod must both allow it.
    #[must_use]
    pub fn verdict(&self, world: &World, conn: &Connection) -> Verdict {
        let mut v = Verdict::Allow;
        if let Endpoint::Pod(i) = conn.src
            && let Some(pod) = world.pods.get(i)
        {
            v = and(v, self.direction(world, PolicyType::Egress, pod, conn));
        }
        if let Endpoint::Pod(i) = conn.dst
            && let Some(pod) = world.pods.get(i)
        {
            v = and(v, self.direction(world, PolicyType::Ingress, pod, conn));
        }
        v
    }

    fn selects(&self, cp: &CPolicy<'_>, view: &CalicoView<'_>) -> bool {
        let p = cp.p;
        if p.spec.do_not_track || p.spec.pre_dnat {
            return false;
        }
        if p.kind == PolicyKind::NetworkPolicy
            && p.namespace.as_deref() != Some(view.pod.namespace.as_str())
        {
            return false;
        }
        if !cp.selector.matches(&view.endpoint) {
            return false;
        }
        if p.kind == PolicyKind::GlobalNetworkPolicy
            && let Some(ns) = &cp.namespace_selector
            && !ns.matches(&view.namespace)
        {
            return false;
        }
        if let Some(sa) = &cp.sa_selector
            && !sa.matches(&view.service_account)
        {
            return false;
        }
        true
    }

    fn direction(&self, world: &World, dir: PolicyType, pod: &Pod, conn: &Connection) -> Verdict {
        let view = calico_view(world, pod);
        let mut i = 0;
        while i < self.policies.len() {
            let tier = self.policies[i].p.tier();
            let mut j = i;
            while j < self.policies.len() && self.policies[j].p.tier() == tier {
                j += 1;
            }
            let applicable: Vec<&CPolicy<'_>> = self.policies[i..j]
                .iter()
                .filter(|cp| cp.p.has_type(dir) && self.selects(cp, &view))
                .collect();
            i = j;
            if applicable.is_empty() {
                continue;
            }
            let mut passed = false;
            'tier: for cp in applicable {
                let rules = match dir {
                    PolicyType::Ingress => &cp.ingress,
                    PolicyType::Egress => &cp.egress,
                };
                for r in rules {
                    if !rule_matches(world, cp.p, r, conn) {
                        continue;
                    }
                    match r.rule.action {
                        Action::Allow => return Verdict::Allow,
                        Action::Deny => return Verdict::Deny,
                        Action::Log => {}
                        Action::Pass => {
                            passed = true;
                            break 'tier;
                        }
                    }
                }
            }
            if !passed {
                return Verdict::Deny;
            }
        }
        // No tier decided: the namespace profile allows.
        Verdict::Allow
    }
}

fn port_matches(ports: &[Port], n: u16) -> bool {
    ports.iter().any(|p| match p {
        Port::Number(x) => *x == n,
        Port::Range(a, b) => *a <= n && n <= *b,
        Port::Named(_) => false,
    })
}

fn icmp_matches(m: &IcmpMatch, conn: &Connection) -> bool {
    match conn.icmp {
        Some((t, c)) => m.icmp_type.is_none_or(|x| x == t) && m.code.is_none_or(|x| x == c),
        None => false,
    }
}

fn rule_matches(world: &World, p: &CalicoPolicy, r: &CRule<'_>, conn: &Connection) -> bool {
    let rule = r.rule;
    if let Some(v) = rule.ip_version {
        let is_v4 = endpoint_ip(world, conn.src).is_some_and(|ip| ip.is_ipv4());
        if (v == 4) != is_v4 {
            return false;
        }
    }
    if let Some(proto) = rule.protocol
        && conn.protocol != proto
    {
        return false;
    }
    if let Some(proto) = rule.not_protocol
        && conn.protocol == proto
    {
        return false;
    }
    if let Some(m) = &rule.icmp
        && !icmp_matches(m, conn)
    {
        return false;
    }
    if let Some(m) = &rule.not_icmp
        && icmp_matches(m, conn)
    {
        return false;
    }
    let has_ports = conn.protocol.has_ports();
    for (e, port) in [
        (&rule.source, conn.src_port),
        (&rule.destination, conn.dst_port),
    ] {
        if !e.ports.is_empty() && (!has_ports || !port_matches(&e.ports, port)) {
            return false;
        }
        if !e.not_ports.is_empty() && (!has_ports || port_matches(&e.not_ports, port)) {
            return false;
        }
    }
    if !entity_matches(world, p, &rule.source, &r.src, conn.src, conn, false)
        || !entity_matches(world, p, &rule.destination, &r.dst, conn.dst, conn, true)
    {
        return false;
    }
    if let Some(h) = &rule.http {
        let Some(req) = &conn.http else {
            return false;
        };
        if !h.methods.is_empty() && !h.methods.contains(&req.method) {
            return false;
        }
        if !h.paths.is_empty()
            && !h.paths.iter().any(|p| match (&p.exact, &p.prefix) {
                (Some(e), _) => &req.path == e,
                (None, Some(pre)) => req.path.starts_with(pre.as_str()),
                (None, None) => true,
            })
        {
            return false;
        }
    }
    true
}

fn entity_matches(
    world: &World,
    p: &CalicoPolicy,
    raw: &EntityRule,
    e: &CEntity,
    who: Endpoint,
    conn: &Connection,
    is_dst: bool,
) -> bool {
    let Some(ip) = endpoint_ip(world, who) else {
        return false;
    };
    if !e.nets.is_empty() && !e.nets.iter().any(|n| n.contains(&ip)) {
        return false;
    }
    if e.not_nets.iter().any(|n| n.contains(&ip)) {
        return false;
    }
    let pod = match who {
        Endpoint::Pod(i) => world.pods.get(i),
        Endpoint::External(_) => None,
    };
    let view = pod.map(|pod| calico_view(world, pod));
    // Calico turns each selector into the set of addresses of the endpoints and network sets
    // it selects; a network set is seen as in `set_selected`.
    let in_sets = |sel: Option<&Selector>| {
        world.network_sets.iter().any(|set| {
            set_selected(world, p, e.namespace_selector.as_ref(), sel, set)
                && set.parsed_nets().0.iter().any(|n| n.contains(&ip))
        })
    };
    // libcalico-go GetEntityRuleSelector: the namespace scope (the namespaceSelector, or the
    // policy's namespace) applies as soon as any selector field is used, notSelector included.
    let sel_given = e.selector.is_some() || raw.service_accounts.is_some();
    let ns_given = e.namespace_selector.is_some();
    let ns_scoped = ns_given || p.namespace.is_some();
    if sel_given || (ns_scoped && (e.not_selector.is_some() || ns_given)) {
        let pod_ok = view.as_ref().is_some_and(|v| {
            if let Some(ns) = &e.namespace_selector {
                if !ns.matches(&v.namespace) {
                    return false;
                }
            } else if let Some(ns) = &p.namespace
                && &v.pod.namespace != ns
            {
                return false;
            }
            if let Some(s) = &e.selector
                && !s.matches(&v.endpoint)
            {
                return false;
            }
            if let Some(sa) = &raw.service_accounts {
                if !sa.names.is_empty() && !sa.names.contains(&v.pod.service_account) {
                    return false;
                }
                if let Some(s) = &e.sa_selector
                    && !s.matches(&v.service_account)
                {
                    return false;
                }
            }
            true
        });
        // Network sets have no service account, and `services` excludes selectors.
        let set_ok = raw.service_accounts.is_none()
            && raw.services.is_none()
            && in_sets(Some(e.selector.as_ref().unwrap_or(&Selector::All)));
        if !pod_ok && !set_ok {
            return false;
        }
    }
    if let Some(ns) = &e.not_selector {
        if view.as_ref().is_some_and(|v| ns.matches(&v.endpoint)) {
            return false;
        }
        if raw.services.is_none() && in_sets(Some(ns)) {
            return false;
        }
    }
    if let Some(svc) = &raw.services {
        let Some(pod) = pod else {
            return false;
        };
        let svc_ns = svc.namespace.as_deref().or(p.namespace.as_deref());
        let Some(info) = world
            .services
            .iter()
            .find(|s| Some(s.namespace.as_str()) == svc_ns && s.name == svc.name)
        else {
            return false;
        };
        let Some(sel) = &info.selector else {
            return false;
        };
        if pod.namespace != info.namespace || !sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
        {
            return false;
        }
        let port = if is_dst { conn.dst_port } else { conn.src_port };
        if !info
            .ports
            .iter()
            .any(|sp| sp.protocol == conn.protocol && sp.port == port)
        {
            return false;
        }
    }
    true
}

/// Whether a rule side of policy `p` with this `namespaceSelector` selects `set` through
/// `sel`: Calico's documentation ("NetworkSet", "GlobalNetworkSet", "Calico automatic labels")
/// says a `NetworkPolicy` rule without `namespaceSelector` sees the `NetworkSet`s of its
/// namespace, one with a `namespaceSelector` those of the selected namespaces and, with
/// `global()`, the `GlobalNetworkSet`s; a `GlobalNetworkPolicy` rule without one sees every set.
fn set_selected(
    world: &World,
    p: &CalicoPolicy,
    ns_sel: Option<&Selector>,
    sel: Option<&Selector>,
    set: &NetworkSet,
) -> bool {
    let empty = BTreeMap::new();
    let visible = match (ns_sel, &set.namespace) {
        (Some(n), None) => n.matches_with_global(&empty, true),
        (Some(n), Some(ns)) => {
            let mut l = world.ns_labels(ns);
            l.insert("projectcalico.org/name".into(), ns.clone());
            n.matches(&l)
        }
        (None, set_ns) => p.namespace.is_none() || p.namespace.as_ref() == set_ns.as_ref(),
    };
    let ns_labels = set
        .namespace
        .as_deref()
        .map(|ns| world.ns_labels(ns))
        .unwrap_or_default();
    visible && sel.is_none_or(|s| s.matches(&set.selector_labels(&ns_labels)))
}

// ---------------------------------------------------------------------------------------------
// Cilium

/// A Cilium object the evaluator cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Cilium policy #{index} ({name}): {message}")]
pub struct CiliumPolicyError {
    /// Index in the input.
    pub index: usize,
    /// `metadata.name` if known.
    pub name: String,
    /// What is wrong.
    pub message: String,
}

enum PeerSel {
    Endpoints(LabelSelector),
    Cidr(IpNet, Vec<IpNet>),
    Entity(String),
    Service,
}

struct CPortRule {
    ports: Vec<(Option<String>, String, Option<u16>)>,
    http: Vec<(Option<Regex>, Option<Regex>)>,
}

struct CilRule {
    peers: Vec<PeerSel>,
    ports: Vec<CPortRule>,
    icmps: Vec<(bool, u8)>,
}

/// One direction of a Cilium policy.
struct Section {
    allow: Option<Vec<CilRule>>,
    deny: Option<Vec<CilRule>>,
    default_deny: Option<bool>,
}

struct CilPolicy {
    namespace: Option<String>,
    subject: LabelSelector,
    /// Ingress, then egress.
    sections: [Section; 2],
}

/// Cilium's evaluation of `CiliumNetworkPolicy` / `CiliumClusterwideNetworkPolicy` objects.
pub struct CiliumEvaluator {
    policies: Vec<CilPolicy>,
}

type Identity = Vec<(String, String, String)>;

const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";

fn split_key(k: &str) -> (&str, &str) {
    match k.split_once(':') {
        Some((src, key)) if !src.contains('.') && !src.contains('/') => (src, key),
        _ => ("any", k),
    }
}

fn lookup<'i>(id: &'i Identity, key: &str) -> Option<&'i str> {
    let (src, k) = split_key(key);
    id.iter()
        .find(|(s, kk, _)| kk == k && (src == "any" || s == src))
        .map(|(_, _, v)| v.as_str())
}

fn selector_matches(sel: &LabelSelector, id: &Identity) -> bool {
    sel.match_labels
        .iter()
        .all(|(k, v)| lookup(id, k) == Some(v.as_str()))
        && sel.match_expressions.iter().all(|r| {
            let v = lookup(id, &r.key);
            match r.operator {
                Operator::In => v.is_some_and(|v| r.values.iter().any(|x| x == v)),
                Operator::NotIn => !v.is_some_and(|v| r.values.iter().any(|x| x == v)),
                Operator::Exists => v.is_some(),
                Operator::DoesNotExist => v.is_none(),
            }
        })
}

fn has_key(sel: &LabelSelector, key: &str) -> bool {
    sel.match_labels.contains_key(key) || sel.match_expressions.iter().any(|r| r.key == key)
}

fn has_key_prefix(sel: &LabelSelector, prefix: &str) -> bool {
    sel.match_labels.keys().any(|k| k.starts_with(prefix))
        || sel
            .match_expressions
            .iter()
            .any(|r| r.key.starts_with(prefix))
}

/// Cilium's `getEndpointSelector`: a peer selector without a namespace key is limited to the
/// policy's namespace (unless it selects by namespace labels), or, cluster-wide, to pods.
fn scope_peer(mut sel: LabelSelector, ns: Option<&str>) -> LabelSelector {
    let ns_keys = [
        format!("k8s:{POD_NAMESPACE}"),
        format!("any:{POD_NAMESPACE}"),
        POD_NAMESPACE.to_string(),
    ];
    if ns_keys.iter().any(|k| has_key(&sel, k)) {
        return sel;
    }
    match ns {
        None => sel.match_expressions.push(cilium::Requirement {
            key: ns_keys[0].clone(),
            operator: Operator::Exists,
            values: Vec::new(),
        }),
        Some(ns) => {
            let labels = "io.cilium.k8s.namespace.labels";
            if !has_key_prefix(&sel, &format!("k8s:{labels}"))
                && !has_key_prefix(&sel, &format!("any:{labels}"))
                && !has_key_prefix(&sel, labels)
            {
                sel.match_labels.insert(ns_keys[0].clone(), ns.to_string());
            }
        }
    }
    sel
}

fn pod_identity(world: &World, pod: &Pod) -> Identity {
    let mut id: Identity = pod
        .labels
        .iter()
        .filter(|(k, _)| !cilium_filters_label(k))
        .map(|(k, v)| ("k8s".to_string(), k.clone(), v.clone()))
        .collect();
    let k8s = |k: &str, v: &str| ("k8s".to_string(), k.to_string(), v.to_string());
    id.push(k8s(POD_NAMESPACE, &pod.namespace));
    id.push(k8s(
        "io.cilium.k8s.policy.serviceaccount",
        &pod.service_account,
    ));
    id.push(k8s("io.cilium.k8s.policy.cluster", "default"));
    for (k, v) in world.ns_labels(&pod.namespace) {
        id.push(k8s(&format!("io.cilium.k8s.namespace.labels.{k}"), &v));
    }
    id
}

fn compile_rules(
    rules: &Option<Vec<cilium::Rule>>,
    ns: Option<&str>,
) -> Result<Option<Vec<CilRule>>, String> {
    let Some(rules) = rules else {
        return Ok(None);
    };
    let net = |s: &str| {
        s.parse::<IpNet>()
            .map(|n| n.trunc())
            .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| format!("{s:?} is not a CIDR"))
    };
    let re = |s: &Option<String>| -> Result<Option<Regex>, String> {
        s.as_ref()
            .map(|s| Regex::new(&format!("^(?:{s})$")).map_err(|e| format!("bad regex {s:?}: {e}")))
            .transpose()
    };
    let mut out = Vec::new();
    for r in rules {
        // Cilium's IngressCommonRule/EgressCommonRule validation.
        let members = [
            (
                "fromEndpoints/toEndpoints",
                r.from_endpoints.len() + r.to_endpoints.len(),
            ),
            ("fromCIDR/toCIDR", r.from_cidr.len() + r.to_cidr.len()),
            (
                "fromCIDRSet/toCIDRSet",
                r.from_cidr_set.len() + r.to_cidr_set.len(),
            ),
            (
                "fromEntities/toEntities",
                r.from_entities.len() + r.to_entities.len(),
            ),
            ("toServices", r.to_services.len()),
        ];
        let present: Vec<&str> = members
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(m, _)| *m)
            .collect();
        if let [a, b, ..] = present.as_slice() {
            return Err(format!(
                "a rule combines {a} and {b}, which Cilium rejects (\"combining … is not supported yet\")"
            ));
        }
        let mut peers = Vec::new();
        for s in r.from_endpoints.iter().chain(&r.to_endpoints) {
            peers.push(PeerSel::Endpoints(scope_peer(s.clone(), ns)));
        }
        for c in r.from_cidr.iter().chain(&r.to_cidr) {
            peers.push(PeerSel::Cidr(net(c)?, Vec::new()));
        }
        for c in r.from_cidr_set.iter().chain(&r.to_cidr_set) {
            let except = c.except.iter().map(|e| net(e)).collect::<Result<_, _>>()?;
            peers.push(PeerSel::Cidr(net(&c.cidr)?, except));
        }
        for e in r.from_entities.iter().chain(&r.to_entities) {
            peers.push(PeerSel::Entity(e.clone()));
        }
        for _ in &r.to_services {
            peers.push(PeerSel::Service);
        }
        let mut ports = Vec::new();
        for pr in &r.to_ports {
            let mut http = Vec::new();
            for h in pr.rules.iter().flat_map(|l7| l7.http.iter()) {
                http.push((re(&h.method)?, re(&h.path)?));
            }
            ports.push(CPortRule {
                ports: pr
                    .ports
                    .iter()
                    .map(|p| (p.protocol.clone(), p.port.clone(), p.end_port))
                    .collect(),
                http,
            });
        }
        let mut icmps = Vec::new();
        for ir in &r.icmps {
            for f in &ir.fields {
                let v6 = f.family.as_deref() == Some("IPv6");
                let t = match &f.icmp_type {
                    Value::Number(n) => n.as_u64().and_then(|n| u8::try_from(n).ok()),
                    Value::String(s) => s.parse::<u8>().ok().or_else(|| {
                        if v6 {
                            None
                        } else {
                            ICMPV4_TYPE_NAMES
                                .iter()
                                .find(|(n, _)| n == s)
                                .map(|(_, t)| *t)
                        }
                    }),
                    _ => None,
                };
                let t = t.ok_or_else(|| format!("ICMP type {} is not known", f.icmp_type))?;
                icmps.push((v6, t));
            }
        }
        out.push(CilRule {
            peers,
            ports,
            icmps,
        });
    }
    Ok(Some(out))
}

impl CiliumEvaluator {
    /// Reads Cilium policy objects (as written by the conversion, or by hand).
    ///
    /// # Errors
    /// [`CiliumPolicyError`] for an object that does not fit the schema, or holds a bad CIDR,
    /// ICMP type or HTTP regex.
    pub fn new(objects: &[Value]) -> Result<Self, CiliumPolicyError> {
        let mut policies = Vec::new();
        for (index, v) in objects.iter().enumerate() {
            let err = |message: String| CiliumPolicyError {
                index,
                name: v
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                message,
            };
            let p: CiliumPolicy =
                serde_json::from_value(v.clone()).map_err(|e| err(e.to_string()))?;
            let ns = if p.is_clusterwide() {
                None
            } else {
                Some(
                    p.metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                )
            };
            let mut subject = p.spec.endpoint_selector.clone();
            if let Some(ns) = &ns {
                subject
                    .match_labels
                    .insert(format!("k8s:{POD_NAMESPACE}"), ns.clone());
            }
            let dd = p.spec.enable_default_deny.unwrap_or_default();
            let nsr = ns.as_deref();
            let sections = [
                Section {
                    allow: compile_rules(&p.spec.ingress, nsr).map_err(err)?,
                    deny: compile_rules(&p.spec.ingress_deny, nsr).map_err(err)?,
                    default_deny: dd.ingress,
                },
                Section {
                    allow: compile_rules(&p.spec.egress, nsr).map_err(err)?,
                    deny: compile_rules(&p.spec.egress_deny, nsr).map_err(err)?,
                    default_deny: dd.egress,
                },
            ];
            policies.push(CilPolicy {
                namespace: ns,
                subject,
                sections,
            });
        }
        Ok(CiliumEvaluator { policies })
    }

    /// The verdict for a connection: egress policy at a source pod and ingress policy at a
    /// destination pod must both allow it.
    #[must_use]
    pub fn verdict(&self, world: &World, conn: &Connection) -> Verdict {
        let mut v = Verdict::Allow;
        if let Endpoint::Pod(i) = conn.src
            && let Some(pod) = world.pods.get(i)
        {
            v = and(v, self.direction(world, 1, pod, conn.dst, conn));
        }
        if let Endpoint::Pod(i) = conn.dst
            && let Some(pod) = world.pods.get(i)
        {
            v = and(v, self.direction(world, 0, pod, conn.src, conn));
        }
        v
    }

    fn direction(
        &self,
        world: &World,
        section: usize,
        pod: &Pod,
        peer: Endpoint,
        conn: &Connection,
    ) -> Verdict {
        let id = pod_identity(world, pod);
        let peer_id: Identity = match peer {
            Endpoint::Pod(i) => world
                .pods
                .get(i)
                .map(|p| pod_identity(world, p))
                .unwrap_or_default(),
            Endpoint::External(_) => vec![("reserved".into(), "world".into(), String::new())],
        };
        let peer_ip = endpoint_ip(world, peer);
        let selecting: Vec<&CilPolicy> = self
            .policies
            .iter()
            .filter(|p| {
                p.namespace.as_deref().is_none_or(|ns| ns == pod.namespace)
                    && selector_matches(&p.subject, &id)
            })
            .collect();
        let matches = |r: &CilRule| cil_rule_matches(r, &peer_id, peer, peer_ip, conn);
        let mut enforced = false;
        let mut allowed = false;
        for p in &selecting {
            let Some(Section {
                allow,
                deny,
                default_deny: dd,
            }) = p.sections.get(section)
            else {
                continue;
            };
            if deny.iter().flatten().any(matches) {
                return Verdict::Deny;
            }
            let has_rules = allow.as_ref().is_some_and(|v| !v.is_empty())
                || deny.as_ref().is_some_and(|v| !v.is_empty());
            if dd.unwrap_or(has_rules) {
                enforced = true;
            }
            if allow.iter().flatten().any(matches) {
                allowed = true;
            }
        }
        if !enforced || allowed {
            Verdict::Allow
        } else {
            Verdict::Deny
        }
    }
}

fn cil_rule_matches(
    r: &CilRule,
    peer_id: &Identity,
    peer: Endpoint,
    peer_ip: Option<IpAddr>,
    conn: &Connection,
) -> bool {
    let has_l4 = !r.ports.is_empty() || !r.icmps.is_empty();
    let l3 = if r.peers.is_empty() {
        // A rule with ports but no peer applies to every peer; an empty rule to none.
        has_l4
    } else {
        r.peers.iter().any(|p| match p {
            PeerSel::Endpoints(sel) => selector_matches(sel, peer_id),
            PeerSel::Cidr(net, except) => {
                matches!(peer, Endpoint::External(_))
                    && peer_ip.is_some_and(|ip| {
                        net.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
                    })
            }
            PeerSel::Entity(e) => match e.as_str() {
                "all" => true,
                "world" | "world-ipv4" | "world-ipv6" => matches!(peer, Endpoint::External(_)),
                "cluster" => matches!(peer, Endpoint::Pod(_)),
                _ => false,
            },
            PeerSel::Service => false,
        })
    };
    if !l3 {
        return false;
    }
    if !has_l4 {
        return true;
    }
    let port_ok = r.ports.iter().any(|pr| {
        let l4 = pr.ports.is_empty()
            || pr.ports.iter().any(|(proto, port, end)| {
                let proto_ok = match proto.as_deref().map(str::to_ascii_uppercase).as_deref() {
                    None | Some("ANY") | Some("") => {
                        conn.protocol.has_ports() && conn.protocol != Protocol::UdpLite
                    }
                    Some("TCP") => conn.protocol == Protocol::Tcp,
                    Some("UDP") => conn.protocol == Protocol::Udp,
                    Some("SCTP") => conn.protocol == Protocol::Sctp,
                    _ => false,
                };
                let port_ok = match port.parse::<u16>() {
                    Ok(0) => true,
                    Ok(p) => {
                        let e = end.unwrap_or(p).max(p);
                        p <= conn.dst_port && conn.dst_port <= e
                    }
                    Err(_) => port.is_empty(),
                };
                proto_ok && port_ok
            });
        l4 && (pr.http.is_empty()
            || conn.http.as_ref().is_some_and(|req| {
                pr.http.iter().any(|(m, p)| {
                    m.as_ref().is_none_or(|m| m.is_match(&req.method))
                        && p.as_ref().is_none_or(|p| p.is_match(&req.path))
                })
            }))
    });
    let icmp_ok = conn.icmp.is_some_and(|(t, _)| {
        r.icmps.iter().any(|(v6, ty)| {
            *ty == t
                && if *v6 {
                    conn.protocol == Protocol::IcmpV6
                } else {
                    conn.protocol == Protocol::Icmp
                }
        })
    });
    port_ok || icmp_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::calico::parse_documents;
    use crate::policy::convert::{ConvertOptions, convert};

    fn world() -> World {
        let pod = |name: &str, ns: &str, app: &str, ip: &str| Pod {
            name: name.into(),
            namespace: ns.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            service_account: "default".into(),
            ip: ip.parse().unwrap(),
        };
        World {
            pods: vec![
                pod("web", "shop", "web", "10.42.0.1"),
                pod("db", "shop", "db", "10.42.0.2"),
                pod("other", "misc", "web", "10.42.1.1"),
            ],
            namespaces: BTreeMap::new(),
            services: Vec::new(),
            network_sets: Vec::new(),
        }
    }

    fn tcp(src: Endpoint, dst: Endpoint, port: u16) -> Connection {
        Connection {
            src,
            dst,
            protocol: Protocol::Tcp,
            src_port: 40000,
            dst_port: port,
            icmp: None,
            http: None,
        }
    }

    #[test]
    fn order_matters_in_calico_but_not_in_cilium() {
        let text = r#"
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  selector: app == 'db'
  order: 10
  ingress:
  - {action: Allow, protocol: TCP, source: {selector: app == 'web'}, destination: {ports: [5432]}}
  - {action: Deny, source: {selector: all()}}
"#;
        let parsed = parse_documents(text).unwrap();
        let w = world();
        let calico = CalicoEvaluator::new(&parsed.policies, &[]);
        let conv = convert(
            &parsed.policies,
            &ConvertOptions {
                pod_cidrs: vec!["10.42.0.0/16".parse().unwrap()],
                ..ConvertOptions::default()
            },
        );
        let cilium = CiliumEvaluator::new(&conv.values()).unwrap();
        let c = tcp(Endpoint::Pod(0), Endpoint::Pod(1), 5432);
        assert_eq!(calico.verdict(&w, &c), Verdict::Allow);
        assert_eq!(cilium.verdict(&w, &c), Verdict::Deny);
        assert!(!conv.report.all_exact());
        assert!(
            conv.report
                .items()
                .any(|i| i.kind == crate::policy::report::ItemKind::AllowBeforeDeny)
        );
        // Unselected pods are unaffected on both sides.
        let c = tcp(Endpoint::Pod(1), Endpoint::Pod(0), 80);
        assert_eq!(calico.verdict(&w, &c), Verdict::Allow);
        assert_eq!(cilium.verdict(&w, &c), Verdict::Allow);
    }

    #[test]
    fn calico_tiers_pass_and_log() {
        let text = r#"
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.gate}
spec:
  tier: security
  selector: app == 'db'
  ingress:
  - {action: Log}
  - {action: Pass, source: {selector: app == 'web'}}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  selector: app == 'db'
  ingress:
  - {action: Allow, protocol: TCP, destination: {ports: [5432]}}
"#;
        let parsed = parse_documents(text).unwrap();
        let calico = CalicoEvaluator::new(&parsed.policies, &parsed.tiers);
        let w = world();
        // web passes the security tier; the default tier allows 5432 and denies the rest.
        assert_eq!(
            calico.verdict(&w, &tcp(Endpoint::Pod(0), Endpoint::Pod(1), 5432)),
            Verdict::Allow
        );
        assert_eq!(
            calico.verdict(&w, &tcp(Endpoint::Pod(0), Endpoint::Pod(1), 22)),
            Verdict::Deny
        );
        // Not passed (not a web pod): end of the security tier denies.
        let outside = Endpoint::External("8.8.8.8".parse().unwrap());
        assert_eq!(
            calico.verdict(&w, &tcp(outside, Endpoint::Pod(1), 5432)),
            Verdict::Deny
        );
        // Pass in the last tier goes to the namespace profile, which allows.
        let only_gate = &parsed.policies[..1];
        let calico = CalicoEvaluator::new(only_gate, &parsed.tiers);
        assert_eq!(
            calico.verdict(&w, &tcp(Endpoint::Pod(0), Endpoint::Pod(1), 22)),
            Verdict::Allow
        );
    }

    #[test]
    fn nets_without_pod_cidrs_are_reported() {
        let text = r#"
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: n, namespace: shop}
spec:
  ingress:
  - {action: Allow, source: {nets: [10.0.0.0/8]}}
"#;
        let parsed = parse_documents(text).unwrap();
        let conv = convert(&parsed.policies, &ConvertOptions::default());
        assert!(
            conv.report
                .items()
                .any(|i| i.kind == crate::policy::report::ItemKind::PodCidrsUnknown)
        );
        assert!(!conv.report.all_exact());
    }

    #[test]
    fn cilium_scopes_peers_to_the_policy_namespace() {
        let objects = vec![serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "x", "namespace": "shop"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "db"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}]}]}
        })];
        let cilium = CiliumEvaluator::new(&objects).unwrap();
        let w = world();
        assert_eq!(
            cilium.verdict(&w, &tcp(Endpoint::Pod(0), Endpoint::Pod(1), 1)),
            Verdict::Allow
        );
        assert_eq!(
            cilium.verdict(&w, &tcp(Endpoint::Pod(2), Endpoint::Pod(1), 1)),
            Verdict::Deny
        );
        assert_eq!(
            cilium.verdict(
                &w,
                &tcp(
                    Endpoint::External("8.8.8.8".parse().unwrap()),
                    Endpoint::Pod(1),
                    1
                )
            ),
            Verdict::Deny
        );
    }
}
