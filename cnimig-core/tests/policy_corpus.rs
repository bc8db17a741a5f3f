//! The policy corpus (`tests/policy_corpus/*.yaml`, one scenario per file): every Calico feature
//! the converter knows, converted file by file, with the report checked policy by policy, some
//! outputs golden-checked against `tests/policy_corpus/golden/` (`CNIMIG_BLESS=1` rewrites
//! them), and every conversion that keeps pod verdicts cross-checked with both evaluators.

#![allow(clippy::unwrap_used, clippy::panic)] // helpers outside #[test] functions

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use cnimig_core::policy::calico::{ParsedDocuments, Protocol};
use cnimig_core::policy::convert::{ServiceInfo, ServicePort};
use cnimig_core::policy::eval::HttpRequest;
use cnimig_core::policy::{
    CalicoEvaluator, CiliumEvaluator, Connection, Conversion, ConvertOptions, Endpoint, ItemKind,
    Pod, Status, Verdict, World, convert_documents, parse_documents, render_yaml,
};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy_corpus")
}

fn services() -> Vec<ServiceInfo> {
    vec![
        ServiceInfo {
            namespace: "shop".into(),
            name: "db".into(),
            selector: Some(BTreeMap::from([("app".into(), "db".into())])),
            ports: vec![ServicePort {
                protocol: Protocol::Tcp,
                port: 5432,
            }],
        },
        ServiceInfo {
            namespace: "default".into(),
            name: "kubernetes".into(),
            selector: None,
            ports: vec![ServicePort {
                protocol: Protocol::Tcp,
                port: 6443,
            }],
        },
    ]
}

fn options() -> ConvertOptions {
    ConvertOptions {
        pod_cidrs: vec!["10.42.0.0/16".parse().unwrap()],
        node_cidrs: vec!["192.168.1.0/24".parse().unwrap()],
        service_cidrs: vec!["10.43.0.0/16".parse().unwrap()],
        services: services(),
        tiers: Vec::new(),
        network_sets: Vec::new(),
        // Not known: network sets selected through namespace labels are reported.
        namespace_labels: BTreeMap::new(),
    }
}

/// Each corpus file, parsed and converted on its own.
fn corpus() -> Vec<(String, ParsedDocuments, Conversion)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            let parsed = parse_documents(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            let conv = convert_documents(&parsed, &options());
            let stem = f.file_stem().unwrap().to_string_lossy().to_string();
            (stem, parsed, conv)
        })
        .collect()
}

use ItemKind as K;

/// Per file and policy: exact, or partial with exactly these kinds of items.
fn expected() -> Vec<(&'static str, &'static str, &'static [ItemKind])> {
    vec![
        ("01-basic", "db-from-web", &[]),
        ("01-basic", "default-deny", &[]),
        ("01-basic", "web", &[]),
        ("02-or-selectors", "api-or-admin", &[]),
        ("03-namespaces-serviceaccounts", "metrics", &[]),
        (
            "03-namespaces-serviceaccounts",
            "sa-labels",
            &[K::ServiceAccountLabels],
        ),
        ("04-nets", "egress-internet", &[K::NetsCoverNodes]),
        ("04-nets", "partner", &[]),
        (
            "04-nets",
            "by-ip",
            &[
                K::NetsPartlyCoverPods,
                K::NetsCoverNodes,
                K::NetsCoverServices,
            ],
        ),
        ("05-ports", "ports", &[]),
        ("05-ports", "named-ports", &[K::NamedPort, K::SourcePorts]),
        ("06-icmp-protocols", "ping", &[]),
        (
            "06-icmp-protocols",
            "icmp-detail",
            &[K::IcmpCode, K::NotIcmp],
        ),
        (
            "06-icmp-protocols",
            "protocols",
            &[K::ProtocolNumber, K::NotProtocol],
        ),
        ("07-deny-first", "deny-first", &[]),
        (
            "08-allow-before-deny",
            "allow-web-db",
            &[K::AllowBeforeDeny],
        ),
        (
            "08-allow-before-deny",
            "quarantine-db",
            &[K::AllowBeforeDeny],
        ),
        ("08-allow-before-deny", "allow-then-disjoint-deny", &[]),
        (
            "09-actions-tiers-host",
            "security.quarantine",
            &[K::Tier, K::Log, K::Pass],
        ),
        ("09-actions-tiers-host", "log-and-allow", &[K::Log]),
        ("09-actions-tiers-host", "untracked", &[K::DoNotTrack]),
        ("09-actions-tiers-host", "pre-dnat", &[K::PreDnat]),
        ("09-actions-tiers-host", "forward", &[K::ApplyOnForward]),
        ("10-services-http", "to-services", &[K::Services]),
        (
            "10-services-http",
            "http",
            &[K::HttpUnsupported, K::AllowBeforeDeny],
        ),
        (
            "11-string-match",
            "string-match",
            &[K::StringMatch, K::AllowBeforeDeny],
        ),
        (
            "12-selectors-and-input",
            "global-and-filtered",
            &[K::LabelFiltered, K::GlobalNamespace],
        ),
        (
            "12-selectors-and-input",
            "odd-input",
            &[
                K::UnknownField,
                K::InvalidSelector,
                K::IpVersion,
                K::InvalidRule,
            ],
        ),
        ("12-selectors-and-input", "too-complex", &[K::TooComplex]),
        ("13-network-sets", "partners-in", &[]),
        ("13-network-sets", "office-in", &[]),
        ("13-network-sets", "office-elsewhere", &[]),
        ("13-network-sets", "not-partners-out", &[]),
        ("13-network-sets", "deny-partners", &[K::GlobalNamespace]),
        ("13-network-sets", "office-by-namespace", &[K::NetworkSet]),
        ("13-network-sets", "legacy-in", &[K::NetsPartlyCoverPods]),
        ("13-network-sets", "broken-in", &[K::NetworkSet]),
    ]
}

#[test]
fn policy_corpus_reports_match_expectations() {
    let want = expected();
    let mut seen = BTreeSet::new();
    let mut problems = Vec::new();
    for (file, _, conv) in corpus() {
        for p in &conv.report.policies {
            let key = (file.clone(), p.policy.name.clone());
            seen.insert(key.clone());
            let Some((_, _, kinds)) = want
                .iter()
                .find(|(f, n, _)| *f == file && *n == p.policy.name)
            else {
                problems.push(format!("{file}: {} has no expectation", p.policy));
                continue;
            };
            let got: BTreeSet<ItemKind> = p
                .items
                .iter()
                .filter(|i| i.kind.makes_partial())
                .map(|i| i.kind)
                .collect();
            let want_kinds: BTreeSet<ItemKind> = kinds.iter().copied().collect();
            let want_status = if want_kinds.is_empty() {
                Status::Exact
            } else {
                Status::Partial
            };
            if got != want_kinds || p.status != want_status {
                problems.push(format!(
                    "{file}: {}: expected {want_status:?} {want_kinds:?}, got {:?} {got:?}:\n  {}",
                    p.policy,
                    p.status,
                    p.items
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("\n  ")
                ));
            }
            // Every item names the policy, and rule items name direction and index.
            for i in &p.items {
                assert_eq!(i.policy, p.policy);
                assert_eq!(
                    i.direction.is_some(),
                    i.rule.is_some() || i.direction.is_some()
                );
            }
        }
    }
    for (f, n, _) in &want {
        if !seen.contains(&(f.to_string(), n.to_string())) {
            problems.push(format!("{f}: {n} expected but not in the corpus"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn policy_corpus_covers_every_item_kind() {
    let seen: BTreeSet<ItemKind> = corpus()
        .iter()
        .flat_map(|(_, _, c)| c.report.items().map(|i| i.kind).collect::<Vec<_>>())
        .collect();
    let not_covered: Vec<ItemKind> = [
        K::AllowBeforeDeny,
        K::Pass,
        K::Log,
        K::Tier,
        K::DoNotTrack,
        K::PreDnat,
        K::ApplyOnForward,
        K::NotProtocol,
        K::NotIcmp,
        K::IcmpCode,
        K::ProtocolNumber,
        K::NamedPort,
        K::SourcePorts,
        K::StringMatch,
        K::ServiceAccountLabels,
        K::LabelFiltered,
        K::GlobalNamespace,
        K::NetworkSet,
        K::NetsPartlyCoverPods,
        K::NetsCoverNodes,
        K::NetsCoverServices,
        K::Services,
        K::HttpUnsupported,
        K::IpVersion,
        K::InvalidSelector,
        K::InvalidRule,
        K::TooComplex,
        K::UnknownField,
        K::IgnoredRules,
        K::HttpProxy,
        K::IcmpAllTypes,
        K::MatchesNothing,
        K::NetworkSetNets,
    ]
    .into_iter()
    .filter(|k| !seen.contains(k))
    .collect();
    assert!(not_covered.is_empty(), "not in the corpus: {not_covered:?}");
}

#[test]
fn policy_corpus_skips_what_is_not_calico_policy() {
    let all = corpus();
    let (_, parsed, conv) = all
        .iter()
        .find(|(f, _, _)| f == "12-selectors-and-input")
        .unwrap();
    let kinds: Vec<&str> = parsed.skipped.iter().map(|s| s.kind.as_str()).collect();
    assert_eq!(
        kinds,
        vec![
            "networking.k8s.io/v1/NetworkPolicy",
            "projectcalico.org/v3/StagedNetworkPolicy"
        ]
    );
    assert_eq!(conv.report.skipped.len(), 2);
    assert_eq!(parsed.kubernetes_network_policies.len(), 1);
    let (_, parsed, _) = all
        .iter()
        .find(|(f, _, _)| f == "09-actions-tiers-host")
        .unwrap();
    assert_eq!(parsed.tiers.len(), 1);
    let (_, parsed, conv) = all.iter().find(|(f, _, _)| f == "13-network-sets").unwrap();
    let sets: Vec<String> = parsed
        .network_sets
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        sets,
        [
            "GlobalNetworkSet partners",
            "NetworkSet shop/office",
            "GlobalNetworkSet legacy",
            "GlobalNetworkSet broken"
        ]
    );
    assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
    let text = conv.report.to_string();
    assert!(
        text.contains("GlobalNetworkSet partners (198.51.100.0/24)")
            && text.contains("NetworkSet shop/office (203.0.113.0/24)"),
        "{text}"
    );
    // The sets' nets are CIDR peers, in rules of their own (Cilium rejects a rule that
    // combines fromEndpoints and fromCIDRSet).
    let obj = |name: &str| {
        conv.objects
            .iter()
            .find(|o| o.policy.name == name)
            .map(|o| o.object.clone())
            .unwrap()
    };
    assert_eq!(
        obj("partners-in")["spec"]["ingress"],
        serde_json::json!([
            {"fromEndpoints": [{"matchLabels": {"role": "partner"}, "matchExpressions": [{"key": "k8s:io.kubernetes.pod.namespace", "operator": "Exists"}]}],
             "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]},
            {"fromCIDRSet": [{"cidr": "198.51.100.0/24"}],
             "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}
        ])
    );
    assert_eq!(
        obj("not-partners-out")["spec"]["egress"][0]["toCIDRSet"],
        serde_json::json!([{"cidr": "198.51.0.0/16", "except": ["198.51.100.0/24"]}])
    );
    assert_eq!(
        obj("office-elsewhere")["spec"]["ingress"][0].get("fromCIDRSet"),
        None
    );
}

/// Some outputs, byte for byte.
#[test]
fn policy_corpus_golden_outputs() {
    let bless = std::env::var_os("CNIMIG_BLESS").is_some();
    let mut problems = Vec::new();
    for (file, _, conv) in corpus() {
        if !matches!(
            file.as_str(),
            "01-basic"
                | "02-or-selectors"
                | "04-nets"
                | "05-ports"
                | "08-allow-before-deny"
                | "10-services-http"
        ) {
            continue;
        }
        let path = corpus_dir().join("golden").join(format!("{file}.yaml"));
        let got = render_yaml(&conv);
        if bless {
            std::fs::write(&path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        if want != got {
            problems.push(format!(
                "{} differs (CNIMIG_BLESS=1 rewrites it); got:\n{got}",
                path.display()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn world() -> World {
    let pod = |i: usize, ns: &str, labels: &[(&str, &str)], sa: &str| Pod {
        name: format!("pod{i}"),
        namespace: ns.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        service_account: sa.into(),
        ip: format!("10.42.0.{}", i + 1).parse().unwrap(),
    };
    let pods = vec![
        pod(0, "shop", &[("app", "web")], "default"),
        pod(1, "shop", &[("app", "web"), ("env", "dev")], "default"),
        pod(
            2,
            "shop",
            &[("app", "db"), ("tier", "primary"), ("version", "1")],
            "default",
        ),
        pod(3, "shop", &[("app", "api")], "default"),
        pod(
            4,
            "shop",
            &[("role", "admin"), ("team", "contractors")],
            "default",
        ),
        pod(5, "shop", &[("app", "media"), ("metrics", "1")], "default"),
        pod(6, "shop", &[("app", "gateway")], "default"),
        pod(7, "shop", &[("app", "cache")], "default"),
        pod(8, "monitoring", &[("app", "prom")], "prometheus"),
        pod(9, "obs", &[("app", "agent")], "grafana-agent"),
        pod(10, "kube-system", &[("k8s-app", "kube-dns")], "coredns"),
        pod(11, "net", &[("app", "vpn")], "default"),
        pod(
            12,
            "edge",
            &[("app", "router"), ("internet", "allowed")],
            "default",
        ),
        pod(13, "shop", &[("app", "admin")], "default"),
    ];
    World {
        pods,
        namespaces: BTreeMap::from([
            (
                "obs".into(),
                BTreeMap::from([("team".into(), "observability".into())]),
            ),
            (
                "shop".into(),
                BTreeMap::from([("environment".into(), "prod".into())]),
            ),
        ]),
        services: services(),
        network_sets: Vec::new(),
    }
}

/// Protocol, destination port, ICMP type and code, HTTP request.
type Probe = (Protocol, u16, Option<(u8, u8)>, Option<HttpRequest>);

fn connections(w: &World) -> Vec<Connection> {
    let mut ends: Vec<Endpoint> = (0..w.pods.len()).map(Endpoint::Pod).collect();
    for ip in ["203.0.113.9", "198.51.100.7", "8.8.8.8", "10.1.2.3"] {
        ends.push(Endpoint::External(ip.parse().unwrap()));
    }
    let get = |path: &str| {
        Some(HttpRequest {
            method: "GET".into(),
            path: path.into(),
        })
    };
    let kinds: Vec<Probe> = vec![
        (Protocol::Tcp, 5432, None, None),
        (Protocol::Tcp, 443, None, None),
        (Protocol::Tcp, 9100, None, None),
        (Protocol::Tcp, 8080, None, get("/api/v1/x")),
        (Protocol::Tcp, 8080, None, get("/admin")),
        (Protocol::Udp, 53, None, None),
        (Protocol::Udp, 15000, None, None),
        (Protocol::Udp, 12000, None, None),
        (Protocol::Sctp, 3868, None, None),
        (Protocol::Tcp, 22, None, None),
        (Protocol::Icmp, 0, Some((8, 0)), None),
        (Protocol::Icmp, 0, Some((5, 0)), None),
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

/// Per file, the policies whose conversion keeps pod verdicts are converted again on their own
/// and, if that is still verdict-preserving, both evaluators must agree on every connection.
#[test]
fn policy_corpus_exact_policies_agree_with_both_evaluators() {
    let w = world();
    let conns = connections(&w);
    let mut checked = Vec::new();
    let (mut allowed, mut denied) = (0, 0);
    for (file, parsed, conv) in corpus() {
        let keep: Vec<_> = parsed
            .policies
            .iter()
            .filter(|p| {
                conv.report
                    .policies
                    .iter()
                    .find(|r| r.policy == p.reference())
                    .is_some_and(|r| r.items.iter().all(|i| !i.kind.changes_pod_verdicts()))
            })
            .cloned()
            .collect();
        if keep.is_empty() {
            continue;
        }
        let subset = ParsedDocuments {
            policies: keep,
            tiers: parsed.tiers.clone(),
            network_sets: parsed.network_sets.clone(),
            ..ParsedDocuments::default()
        };
        let w = World {
            network_sets: parsed.network_sets.clone(),
            ..w.clone()
        };
        let conv = convert_documents(&subset, &options());
        if !conv.report.pod_verdicts_preserved() {
            continue;
        }
        let calico = CalicoEvaluator::new(&subset.policies, &subset.tiers);
        let cilium = CiliumEvaluator::new(&conv.values()).unwrap();
        for c in &conns {
            let (a, b) = (calico.verdict(&w, c), cilium.verdict(&w, c));
            // (`w` holds this file's network sets.)
            assert_eq!(a, b, "{file}: {c:?}\n{}", render_yaml(&conv));
            match a {
                Verdict::Allow => allowed += 1,
                Verdict::Deny => denied += 1,
            }
        }
        checked.extend(subset.policies.iter().map(|p| p.name.clone()));
    }
    assert!(checked.len() >= 15, "only {checked:?} were cross-checked");
    assert!(
        allowed > 1000 && denied > 1000,
        "allowed {allowed}, denied {denied}"
    );
}
