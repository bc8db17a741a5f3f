//! Property tests for the Calico to Cilium policy conversion: for generated Calico policies,
//! pods and network sets (namespace labels known to the conversion or not), whenever the report says no item changes a pod-traffic verdict (in particular when
//! every policy converted exactly), Calico's evaluation of the input and Cilium's evaluation of
//! the output agree on every sampled connection.
//!
//! Deterministic (fixed seed) and fast: `cargo test -p cnimig-core --release policy`.

#![allow(clippy::unwrap_used, clippy::panic)] // helpers outside #[test] functions

use std::collections::BTreeMap;

use cnimig_core::policy::calico::{
    Action, CalicoPolicy, EntityRule, HttpMatch, HttpPath, IcmpMatch, NetworkSet, PolicyKind,
    PolicySpec, PolicyType, Port, Protocol, Rule, ServiceAccountMatch,
};
use cnimig_core::policy::calico::{ParsedDocuments, parse_value};
use cnimig_core::policy::eval::HttpRequest;
use cnimig_core::policy::report::ItemKind;
use cnimig_core::policy::{
    CalicoEvaluator, CiliumEvaluator, Connection, ConvertOptions, Endpoint, Pod, Selector, Verdict,
    World, convert, convert_documents, render_yaml,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngSeed, TestRunner};

const POD_CIDR: &str = "10.42.0.0/16";
const EXTERNALS: [&str; 4] = ["8.8.8.8", "10.0.0.5", "192.168.1.10", "198.51.100.7"];

fn s(x: &str) -> String {
    x.to_string()
}

fn pod_selector() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        40 => prop_oneof![
            Just(s("app == 'web'")),
            Just(s("app != 'db'")),
            Just(s("app in {'web', 'api'}")),
            Just(s("app not in {'db'}")),
            Just(s("has(tier)")),
            Just(s("!has(tier)")),
            Just(s("tier == 'fe'")),
            Just(s("all()")),
            Just(s("projectcalico.org/namespace == 'a'")),
            Just(s("pcns.team == 'red'")),
            Just(s("projectcalico.org/serviceaccount == 'robot'")),
            // Labels of the generated network sets.
            Just(s("role == 'partner'")),
            Just(s("has(role)")),
            Just(s("role in {'partner', 'office'}")),
        ],
        // Not expressible in Cilium: reported, so the property skips these cases.
        1 => prop_oneof![
            Just(s("pod-template-hash == 'h1'")),
            Just(s("app starts with 'w'")),
        ],
    ];
    leaf.prop_recursive(2, 6, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) && ({b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) || ({b})")),
            inner.prop_map(|a| format!("!({a})")),
        ]
    })
}

fn ns_selector() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(s("team == 'red'")),
        Just(s("team != 'blue'")),
        Just(s("has(team)")),
        Just(s("projectcalico.org/name == 'b'")),
        Just(s("all()")),
        Just(s("team == 'red' || projectcalico.org/name == 'c'")),
        // Global network sets (and host endpoints): no pod.
        Just(s("global()")),
        Just(s("global() || team == 'blue'")),
    ]
}

/// Calico network sets: namespaced (in a namespace of the pods) or global, labelled like pods
/// or not, with nets outside the pod CIDR (and rarely inside it, which must be reported).
fn network_sets() -> impl Strategy<Value = Vec<NetworkSet>> {
    let one = (
        prop_oneof![
            Just(None),
            Just(Some("a")),
            Just(Some("b")),
            Just(Some("c"))
        ],
        prop_oneof![
            Just(vec![("role", "partner")]),
            Just(vec![("role", "office")]),
            Just(vec![("app", "web")]),
            Just(vec![("role", "partner"), ("tier", "fe")]),
        ],
        prop::collection::vec(
            prop_oneof![
                6 => Just("198.51.100.0/24"),
                4 => Just("8.8.8.0/24"),
                3 => Just("192.168.1.10"),
                2 => Just("10.0.0.0/16"),
                2 => Just("10.42.0.0/24"),
            ],
            1..3,
        ),
    );
    prop::collection::vec(one, 0..4).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (ns, labels, nets))| NetworkSet {
                namespace: ns.map(s),
                name: format!("set{i}"),
                labels: labels.into_iter().map(|(k, v)| (s(k), s(v))).collect(),
                nets: nets.into_iter().map(s).collect(),
            })
            .collect()
    })
}

/// One generated case: policies, pods, network sets, and whether the conversion is told the
/// namespace labels.
type Case = (Vec<CalicoPolicy>, Vec<Pod>, Vec<NetworkSet>, bool);

fn case() -> impl Strategy<Value = Case> {
    (
        policies(),
        pods(),
        network_sets(),
        prop::bool::weighted(0.75),
    )
}

fn nets() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop_oneof![
            Just(s("0.0.0.0/0")),
            Just(s("10.0.0.0/8")),
            Just(s("8.8.8.8/32")),
            Just(s("192.168.0.0/16")),
            Just(s(POD_CIDR)),
            Just(s("10.0.0.0/16")),
        ],
        1..3,
    )
}

fn nets_with_partial() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop_oneof![
            8 => nets().prop_map(|mut v| v.remove(0)),
            1 => Just(s("10.42.0.0/24")),
        ],
        1..3,
    )
}

fn entity(full: bool) -> impl Strategy<Value = EntityRule> {
    let w = if full { 0.35 } else { 0.08 };
    (
        prop::option::weighted(w, pod_selector()),
        prop::option::weighted(w * 0.4, pod_selector()),
        prop::option::weighted(w * 0.6, ns_selector()),
        prop::option::weighted(
            w * 0.3,
            prop::sample::subsequence(vec![s("robot"), s("default")], 1..=2),
        ),
        prop::option::weighted(w * 0.7, nets_with_partial()),
        prop::option::weighted(w * 0.4, nets()),
    )
        .prop_map(
            |(selector, not_selector, namespace_selector, sa, nets, not_nets)| EntityRule {
                selector,
                not_selector,
                namespace_selector,
                service_accounts: sa.map(|names| ServiceAccountMatch {
                    names,
                    selector: None,
                }),
                nets: nets.unwrap_or_default(),
                not_nets: not_nets.unwrap_or_default(),
                ..EntityRule::default()
            },
        )
}

fn rule() -> impl Strategy<Value = Rule> {
    let action = prop_oneof![
        24 => Just(Action::Allow),
        12 => Just(Action::Deny),
        1 => Just(Action::Log),
        1 => Just(Action::Pass),
    ];
    let l4 = prop_oneof![
        10 => Just((None, None, vec![], vec![], None, None)),
        8 => (
            prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)],
            prop::sample::subsequence(vec![Port::Number(80), Port::Number(443), Port::Range(8000, 8100), Port::Number(53)], 0..=2),
            prop::sample::subsequence(vec![Port::Number(443), Port::Number(8050)], 0..=1),
        )
            .prop_map(|(p, ports, not_ports)| (Some(p), None, ports, not_ports, None, None)),
        3 => (
            prop::option::of(Just(IcmpMatch { icmp_type: Some(8), code: None })),
            prop::option::weighted(0.3, Just(IcmpMatch { icmp_type: Some(0), code: None })),
        )
            .prop_map(|(icmp, not_icmp)| (Some(Protocol::Icmp), None, vec![], vec![], icmp, not_icmp)),
        // notProtocol is never exact in Cilium; keep it rare.
        1 => prop_oneof![Just(Protocol::Tcp), Just(Protocol::Icmp), Just(Protocol::Number(47))]
            .prop_map(|np| (None, Some(np), vec![], vec![], None, None)),
    ];
    (
        action,
        l4,
        entity(true),
        entity(false),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(
                action,
                (protocol, not_protocol, ports, not_ports, icmp, not_icmp),
                source,
                mut destination,
                http,
            )| {
                destination.ports = ports;
                destination.not_ports = not_ports;
                let mut r = Rule::new(action);
                r.protocol = protocol;
                r.not_protocol = not_protocol;
                r.icmp = icmp;
                r.not_icmp = not_icmp;
                r.source = source;
                r.destination = destination;
                if http && protocol == Some(Protocol::Tcp) {
                    r.destination.ports = vec![Port::Number(80)];
                    r.destination.not_ports.clear();
                    r.http = Some(HttpMatch {
                        methods: vec![s("GET")],
                        paths: vec![HttpPath {
                            exact: None,
                            prefix: Some(s("/api")),
                        }],
                    });
                }
                r
            },
        )
}

/// Ingress rules see the generated `source` as the peer; egress rules the `destination`.
fn egress_rule() -> impl Strategy<Value = Rule> {
    rule().prop_map(|mut r| {
        let ports = std::mem::take(&mut r.destination.ports);
        let not_ports = std::mem::take(&mut r.destination.not_ports);
        std::mem::swap(&mut r.source, &mut r.destination);
        r.destination.ports = ports;
        r.destination.not_ports = not_ports;
        r
    })
}

fn policy(index: usize) -> impl Strategy<Value = CalicoPolicy> {
    (
        prop_oneof![
            Just(Some("a")),
            Just(Some("b")),
            Just(Some("c")),
            Just(None)
        ],
        prop::option::weighted(0.7, pod_selector()),
        prop::option::weighted(0.2, ns_selector()),
        prop::option::of(1..4u8),
        prop_oneof![
            3 => Just(None),
            1 => Just(Some(vec![PolicyType::Ingress])),
            1 => Just(Some(vec![PolicyType::Egress])),
            1 => Just(Some(vec![PolicyType::Ingress, PolicyType::Egress])),
        ],
        prop::collection::vec(rule(), 0..3),
        prop::collection::vec(egress_rule(), 0..3),
    )
        .prop_map(
            move |(ns, selector, nssel, order, types, ingress, egress)| CalicoPolicy {
                kind: if ns.is_some() {
                    PolicyKind::NetworkPolicy
                } else {
                    PolicyKind::GlobalNetworkPolicy
                },
                name: format!("p{index}"),
                namespace: ns.map(str::to_string),
                spec: PolicySpec {
                    selector,
                    namespace_selector: if ns.is_none() { nssel } else { None },
                    order: order.map(f64::from),
                    types,
                    ingress,
                    egress,
                    ..PolicySpec::default()
                },
            },
        )
}

fn policies() -> impl Strategy<Value = Vec<CalicoPolicy>> {
    (1..5usize).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>())
}

fn pods() -> impl Strategy<Value = Vec<Pod>> {
    let one = (
        prop_oneof![Just("a"), Just("b"), Just("c")],
        prop_oneof![Just("web"), Just("db"), Just("api")],
        prop::option::of(prop_oneof![Just("fe"), Just("be")]),
        prop::bool::weighted(0.3),
        prop_oneof![Just("default"), Just("robot")],
    );
    prop::collection::vec(one, 2..6).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (ns, app, tier, hash, sa))| {
                let mut labels = BTreeMap::from([(s("app"), s(app))]);
                if let Some(t) = tier {
                    labels.insert(s("tier"), s(t));
                }
                if hash {
                    labels.insert(s("pod-template-hash"), s("h1"));
                }
                Pod {
                    name: format!("pod{i}"),
                    namespace: s(ns),
                    labels,
                    service_account: s(sa),
                    ip: format!("10.42.0.{}", i + 1).parse().unwrap(),
                }
            })
            .collect()
    })
}

fn namespaces() -> BTreeMap<String, BTreeMap<String, String>> {
    BTreeMap::from([
        (s("a"), BTreeMap::from([(s("team"), s("red"))])),
        (s("b"), BTreeMap::from([(s("team"), s("blue"))])),
        (s("c"), BTreeMap::new()),
    ])
}

fn world(pods: Vec<Pod>, network_sets: Vec<NetworkSet>) -> World {
    World {
        pods,
        namespaces: namespaces(),
        services: Vec::new(),
        network_sets,
    }
}

/// Protocol, destination port, ICMP type and code, HTTP request.
type Probe = (Protocol, u16, Option<(u8, u8)>, Option<HttpRequest>);

fn connections(world: &World) -> Vec<Connection> {
    let mut ends: Vec<Endpoint> = (0..world.pods.len()).map(Endpoint::Pod).collect();
    ends.extend(
        EXTERNALS
            .iter()
            .map(|ip| Endpoint::External(ip.parse().unwrap())),
    );
    let kinds: Vec<Probe> = vec![
        (Protocol::Tcp, 80, None, None),
        (Protocol::Tcp, 443, None, None),
        (Protocol::Tcp, 8050, None, None),
        (Protocol::Udp, 53, None, None),
        (Protocol::Icmp, 0, Some((8, 0)), None),
        (Protocol::Icmp, 0, Some((0, 0)), None),
        (Protocol::Number(47), 0, None, None),
        (
            Protocol::Tcp,
            80,
            None,
            Some(HttpRequest {
                method: s("GET"),
                path: s("/api/v1"),
            }),
        ),
        (
            Protocol::Tcp,
            80,
            None,
            Some(HttpRequest {
                method: s("POST"),
                path: s("/api/v1"),
            }),
        ),
    ];
    let mut out = Vec::new();
    for &src in &ends {
        for &dst in &ends {
            if src == dst
                || (matches!(src, Endpoint::External(_)) && matches!(dst, Endpoint::External(_)))
            {
                continue;
            }
            for (protocol, port, icmp, http) in &kinds {
                out.push(Connection {
                    src,
                    dst,
                    protocol: *protocol,
                    src_port: 40000,
                    dst_port: *port,
                    icmp: *icmp,
                    http: http.clone(),
                });
            }
        }
    }
    out
}

fn options() -> ConvertOptions {
    ConvertOptions {
        pod_cidrs: vec![POD_CIDR.parse().unwrap()],
        ..ConvertOptions::default()
    }
}

fn options_for(sets: &[NetworkSet], ns_known: bool) -> ConvertOptions {
    ConvertOptions {
        network_sets: sets.to_vec(),
        namespace_labels: if ns_known {
            namespaces()
        } else {
            BTreeMap::new()
        },
        ..options()
    }
}

/// Returns a description of the first disagreement, if any.
fn disagreement((policies, pods, sets, ns_known): Case) -> Option<String> {
    let policies = &policies;
    let conv = convert(policies, &options_for(&sets, ns_known));
    if !conv.report.pod_verdicts_preserved() {
        return None;
    }
    let w = world(pods, sets);
    let calico = CalicoEvaluator::new(policies, &[]);
    let cilium = match CiliumEvaluator::new(&conv.values()) {
        Ok(c) => c,
        Err(e) => {
            return Some(format!(
                "the output does not read back: {e}\n{}",
                render_yaml(&conv)
            ));
        }
    };
    for c in connections(&w) {
        let (a, b) = (calico.verdict(&w, &c), cilium.verdict(&w, &c));
        if a != b {
            return Some(format!(
                "Calico {a:?}, Cilium {b:?} for {c:?}\npods: {:#?}\nsets: {:#?}\ncalico: {}\ncilium:\n{}\nreport:\n{}",
                w.pods,
                w.network_sets,
                serde_json::to_string_pretty(policies).unwrap_or_default(),
                render_yaml(&conv),
                conv.report
            ));
        }
    }
    None
}

fn any_document() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-5i64..70000).prop_map(Value::from),
        "[a-zA-Z0-9:./ '=!&|()]{0,12}".prop_map(Value::from),
        Just(json!("all()")),
        Just(json!("10.42.0.0/16")),
        Just(json!("TCP")),
        Just(json!("Allow")),
        Just(json!("Deny")),
    ];
    let keys = prop_oneof![
        Just("action"),
        Just("protocol"),
        Just("notProtocol"),
        Just("icmp"),
        Just("notICMP"),
        Just("source"),
        Just("destination"),
        Just("selector"),
        Just("notSelector"),
        Just("namespaceSelector"),
        Just("nets"),
        Just("notNets"),
        Just("ports"),
        Just("notPorts"),
        Just("services"),
        Just("serviceAccounts"),
        Just("names"),
        Just("http"),
        Just("methods"),
        Just("paths"),
        Just("exact"),
        Just("prefix"),
        Just("type"),
        Just("code"),
        Just("name"),
        Just("ipVersion"),
        Just("order"),
        Just("types"),
        Just("tier"),
        Just("bogus"),
    ];
    let value = leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(keys.clone(), inner, 0..5).prop_map(|m| {
                Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    });
    (
        prop_oneof![
            Just("NetworkPolicy"),
            Just("GlobalNetworkPolicy"),
            Just("Tier")
        ],
        prop::collection::vec(value.clone(), 0..3),
        prop::collection::vec(value, 0..3),
        prop::option::of("[a-z()=' ]{0,16}"),
    )
        .prop_map(|(kind, ingress, egress, selector)| {
            json!({
                "apiVersion": "projectcalico.org/v3",
                "kind": kind,
                "metadata": {"name": "fuzz", "namespace": "ns"},
                "spec": {"selector": selector, "ingress": ingress, "egress": egress},
            })
        })
}

/// `CNIMIG_CASES=N` (as for the other property tests) runs N cases instead of `default`.
fn cases(default: u32) -> u32 {
    std::env::var("CNIMIG_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0x005e_edca_11c0),
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config(cases(300)))]

    /// Any text: the selector parser returns a value or an error, never panics, and what it
    /// prints parses back to the same selector.
    #[test]
    fn policy_props_selector_parser_is_total(text in "[a-z!=&|(){}',\" .-]{0,40}") {
        if let Ok(sel) = Selector::parse(&text) {
            prop_assert_eq!(Selector::parse(&sel.to_string()), Ok(sel));
        }
    }

    /// Any JSON shaped roughly like a Calico document: parsing and converting never panic.
    #[test]
    fn policy_props_any_document_converts_without_panic(doc in any_document()) {
        let mut parsed = ParsedDocuments::default();
        let mut index = 0;
        parse_value(&doc, &mut index, &mut parsed);
        let conv = convert_documents(&parsed, &options());
        let _ = render_yaml(&conv);
        let _ = conv.report.to_string();
        prop_assert!(CiliumEvaluator::new(&conv.values()).is_ok());
    }

    #[test]
    fn policy_props_exact_conversions_agree(case in case()) {
        if let Some(d) = disagreement(case) {
            prop_assert!(false, "{}", d);
        }
    }
}

/// The property above must not be vacuous: a good share of generated cases are exact, and
/// both verdicts occur among them.
#[test]
fn policy_props_cover_exact_and_partial_cases() {
    let mut runner = TestRunner::new(config(1));
    let strategy = case();
    let (mut exact, mut preserved, mut partial, mut allows, mut denies) = (0, 0, 0, 0, 0);
    // Verdict-preserving cases whose output holds network sets' nets as CIDR peers, and
    // connections to or from a set's address that Calico allows / denies in them.
    let (mut with_sets, mut set_allows, mut set_denies) = (0, 0, 0);
    for _ in 0..300 {
        let Ok(tree) = strategy.new_tree(&mut runner) else {
            continue;
        };
        let (policies, pods, sets, ns_known) = tree.current();
        let conv = convert(&policies, &options_for(&sets, ns_known));
        if conv.report.all_exact() {
            exact += 1;
        } else {
            partial += 1;
        }
        if conv.report.pod_verdicts_preserved() {
            preserved += 1;
            let uses_sets = conv
                .report
                .items()
                .any(|i| i.kind == ItemKind::NetworkSetNets);
            with_sets += usize::from(uses_sets);
            let set_ips: Vec<std::net::IpAddr> = sets
                .iter()
                .flat_map(|set| set.parsed_nets().0)
                .flat_map(|n| {
                    EXTERNALS
                        .iter()
                        .map(|ip| ip.parse().unwrap())
                        .filter(move |ip| n.contains(ip))
                })
                .collect();
            let w = world(pods, sets);
            let calico = CalicoEvaluator::new(&policies, &[]);
            for c in connections(&w) {
                let v = calico.verdict(&w, &c);
                match v {
                    Verdict::Allow => allows += 1,
                    Verdict::Deny => denies += 1,
                }
                let in_set = [c.src, c.dst]
                    .iter()
                    .any(|e| matches!(e, Endpoint::External(ip) if set_ips.contains(ip)));
                if uses_sets && in_set {
                    match v {
                        Verdict::Allow => set_allows += 1,
                        Verdict::Deny => set_denies += 1,
                    }
                }
            }
        }
    }
    assert!(
        with_sets >= 20 && set_allows > 100 && set_denies > 100,
        "network sets are not exercised: {with_sets} verdict-preserving cases with set nets, \
         {set_allows} allowed and {set_denies} denied connections with a set's address"
    );
    assert!(
        exact >= 60,
        "only {exact} of 300 cases were exact ({partial} partial)"
    );
    assert!(preserved >= exact);
    assert!(
        partial >= 30,
        "only {partial} partial cases: the generator is too tame"
    );
    assert!(
        allows > 1000 && denies > 1000,
        "allows {allows}, denies {denies}"
    );
}

/// Prints which kinds of items make generated cases partial (to tune the generator):
/// `cargo test -p cnimig-core --release --test policy_props -- --ignored --nocapture`.
#[test]
#[ignore]
fn policy_props_histogram() {
    let mut runner = TestRunner::new(config(1));
    let strategy = case();
    let mut h: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..300 {
        let Ok(tree) = strategy.new_tree(&mut runner) else {
            continue;
        };
        let (policies, _, sets, ns_known) = tree.current();
        let conv = convert(&policies, &options_for(&sets, ns_known));
        let mut kinds: Vec<String> = conv
            .report
            .items()
            .filter(|i| i.kind.makes_partial())
            .map(|i| i.kind.to_string())
            .collect();
        kinds.sort();
        kinds.dedup();
        for k in kinds {
            *h.entry(k).or_default() += 1;
        }
    }
    eprintln!("{h:#?}");
}
