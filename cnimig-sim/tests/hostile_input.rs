//! Hostile input: configs, scenario files and node names from property-based generation never
//! panic, and every rejection names the problem; a config naming nodes the cluster lacks is
//! refused before anything touches the cluster.
//!
//! `cargo fuzz` needs a nightly toolchain; proptest over arbitrary strings and bytes, and over
//! structured documents built from the real field names with hostile values, stands in for the
//! fuzz targets of the config and scenario parsers. (These tests live in `cnimig-sim`, which has
//! proptest as a dev-dependency and sees both parsers.)

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use cnimig_core::cilium::{CiliumPhase, rendered_config};
use cnimig_core::config::{FailurePolicy, MigrationConfig, NodeScope};
use cnimig_core::events::Discard;
use cnimig_core::model::NodeName;
use cnimig_core::orchestrator::{Orchestrator, Ports, RunError, RunOptions};
use cnimig_sim::{Scenario, SimCluster, SimParams};
use proptest::prelude::*;
use serde_yaml_ng::{Mapping, Value};

// ---------------------------------------------------------------- generators

/// Scalars a hostile document may hold where a value goes.
fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        (-5i64..300).prop_map(|n| Value::Number(n.into())),
        any::<f64>().prop_map(|f| Value::Number(f.into())),
        "\\PC{0,40}".prop_map(Value::String),
        prop_oneof![
            Just("10.245.0.0/16"),
            Just("10.245.0.1/16"),
            Just("0.0.0.0/0"),
            Just("300.1.1.1/8"),
            Just("::1/128"),
            Just("10m"),
            Just("1h30m"),
            Just("-5s"),
            Just("99999999999999999999h"),
            Just("vxlan"),
            Just("geneve"),
            Just("rollback-and-stop"),
            Just("Deployment"),
            Just("StatefulSet"),
            Just("DaemonSet"),
            Just("StaticPod"),
            Just("Pod"),
            Just("worker"),
            Just("control-plane"),
            Just("kubernetes-internal-ip"),
            Just("interface=eth.*"),
            Just("node-1"),
            Just("Node_1"),
            Just(""),
            Just("500m"),
            Just("4Gi"),
            Just("1e9"),
        ]
        .prop_map(|s| Value::String(s.to_string())),
    ]
}

/// Values: scalars, lists and maps (keys from `keys` or anything), a few levels deep.
fn value(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Sequence),
            prop::collection::vec((key(keys), inner), 0..6).prop_map(|kv| {
                Value::Mapping(kv.into_iter().map(|(k, v)| (Value::String(k), v)).collect())
            }),
        ]
    })
}

fn key(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(keys).prop_map(str::to_string),
        1 => "\\PC{0,12}",
    ]
}

/// A document whose top-level keys mostly are the real ones.
fn document(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::collection::vec((key(keys), value(keys)), 0..10).prop_map(|kv| {
        let m: Mapping = kv.into_iter().map(|(k, v)| (Value::String(k), v)).collect();
        serde_yaml_ng::to_string(&Value::Mapping(m)).unwrap_or_default()
    })
}

const CONFIG_KEYS: &[&str] = &[
    "podCIDR",
    "maskSize",
    "tunnelProtocol",
    "tunnelPort",
    "migrationLabel",
    "nodeConfigName",
    "nodes",
    "nodeSelector",
    "matchLabels",
    "matchExpressions",
    "maxInFlight",
    "drainTimeout",
    "stepTimeout",
    "controlPlaneLast",
    "onNodeFailure",
    "deleteEmptydirData",
    "evictUnmanagedPods",
    "finalHostLegacyRouting",
    "otherRoutedCIDRs",
    "pollInterval",
];

const SCENARIO_KEYS: &[&str] = &[
    "name",
    "nodes",
    "count",
    "zone",
    "zones",
    "roles",
    "cpu",
    "memory",
    "cordoned",
    "ready",
    "labels",
    "internalIP",
    "workloads",
    "kind",
    "namespace",
    "replicas",
    "pdb",
    "maxUnavailable",
    "minAvailable",
    "hostNetwork",
    "hostPort",
    "emptyDir",
    "toleratesUnschedulable",
    "requests",
    "nodeRoles",
    "pdbs",
    "selector",
    "calico",
    "pools",
    "cidr",
    "encapsulation",
    "blockSize",
    "natOutgoing",
    "disabled",
    "autodetection",
    "vxlanPort",
    "serviceCIDR",
    "clusterCIDR",
    "nodeCIDR",
    "connectivityChecker",
    "ciliumAgent",
];

/// A scenario that is mostly well-formed: small node groups and workloads whose fields take
/// valid, borderline or hostile values.
fn near_scenario() -> impl Strategy<Value = String> {
    let node = (
        prop_oneof![8 => "[a-z]{1,5}", 1 => Just("Bad_Name".to_string())],
        prop::option::of(0u32..6),
        prop::option::of(prop_oneof![4 => Just("a"), 4 => Just("b"), 1 => Just("bad zone!")]),
        prop::option::of(prop_oneof![
            4 => Just("[worker]"),
            2 => Just("[control-plane, etcd]"),
            1 => Just("[]"),
            1 => Just("[chef]")
        ]),
        prop::option::of(
            prop_oneof![4 => Just("4"), 4 => Just("500m"), 1 => Just("-1"), 1 => Just("lots")],
        ),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(name, count, zone, roles, cpu, cordoned, ready)| {
            let mut s = format!("  - name: {name:?}\n");
            if let Some(c) = count {
                s.push_str(&format!("    count: {c}\n"));
            }
            if let Some(z) = zone {
                s.push_str(&format!("    zone: {z:?}\n"));
            }
            if let Some(r) = roles {
                s.push_str(&format!("    roles: {r}\n"));
            }
            if let Some(c) = cpu {
                s.push_str(&format!("    cpu: {c:?}\n"));
            }
            s.push_str(&format!("    cordoned: {cordoned}\n    ready: {ready}\n"));
            s
        });
    let workload = (
        prop_oneof![
            4 => Just("Deployment"),
            3 => Just("StatefulSet"),
            2 => Just("DaemonSet"),
            1 => Just("StaticPod"),
            1 => Just("Pod"),
            1 => Just("CronJob")
        ],
        prop_oneof![8 => "[a-z]{1,6}", 1 => Just("UPPER".to_string())],
        prop::option::of(-1i64..12),
        prop::option::of(prop_oneof![
            4 => Just("{maxUnavailable: 1}"),
            2 => Just("{minAvailable: \"50%\"}"),
            1 => Just("{minAvailable: 1, maxUnavailable: 1}"),
            1 => Just("{maxUnavailable: \"150%\"}"),
            1 => Just("{}")
        ]),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(kind, name, replicas, pdb, host_net, host_port)| {
            let mut s = format!("  - kind: {kind}\n    name: {name}\n");
            if let Some(r) = replicas {
                s.push_str(&format!("    replicas: {r}\n"));
            }
            if let Some(p) = pdb {
                s.push_str(&format!("    pdb: {p}\n"));
            }
            s.push_str(&format!(
                "    hostNetwork: {host_net}\n    hostPort: {host_port}\n"
            ));
            s
        });
    (
        prop::collection::vec(node, 0..4),
        prop::collection::vec(workload, 0..5),
        prop::option::of(prop_oneof![
            4 => Just("kubernetes-internal-ip"),
            2 => Just("first-found"),
            1 => Just("interface=("),
            1 => Just("can-reach=")
        ]),
    )
        .prop_map(|(nodes, workloads, auto)| {
            let mut s = String::from("nodes:\n");
            for n in nodes {
                s.push_str(&n);
            }
            if !workloads.is_empty() {
                s.push_str("workloads:\n");
                for w in workloads {
                    s.push_str(&w);
                }
            }
            if let Some(a) = auto {
                s.push_str(&format!("calico: {{autodetection: {a:?}}}\n"));
            }
            s
        })
}

/// A config that is mostly well-formed: every field present or not, with valid, borderline or
/// hostile values.
fn near_config() -> impl Strategy<Value = String> {
    // The first value is valid and drawn most often; absent fields take their defaults.
    let field = |name: &'static str, values: &'static [&'static str]| {
        let valid = values.first().copied().unwrap_or_default();
        prop_oneof![
            2 => Just(String::new()),
            6 => Just(format!("{name}: {valid}\n")),
            1 => prop::sample::select(values).prop_map(move |v| format!("{name}: {v}\n")),
        ]
    };
    (
        (
            field(
                "podCIDR",
                &[
                    "10.245.0.0/16",
                    "10.245.0.0/16",
                    "10.245.0.1/16",
                    "10.0.0.0/30",
                    "x",
                ],
            ),
            field("maskSize", &["24", "25", "16", "31", "-1", "300"]),
            field("tunnelProtocol", &["vxlan", "geneve", "gre"]),
            field("tunnelPort", &["8473", "0", "65536", "-3"]),
            field("maxInFlight", &["1", "8", "0", "-2", "99999999999"]),
            field("drainTimeout", &["10m", "5s", "1h2m3s", "10 parsecs", "''"]),
        ),
        (
            field("stepTimeout", &["5m", "0", "ms"]),
            field("pollInterval", &["2s", "0s", "2m", "1ms"]),
            field(
                "onNodeFailure",
                &["rollback-and-stop", "rollback-and-continue", "panic"],
            ),
            field(
                "nodes",
                &[
                    "[worker-1, worker-2]",
                    "[]",
                    "[Worker_1]",
                    "[\"\"]",
                    "[a..b]",
                ],
            ),
            field(
                "nodeSelector",
                &["{matchLabels: {pool: blue}}", "{}", "[x]"],
            ),
            field(
                "migrationLabel",
                &[
                    "io.cilium.migration/cilium-default",
                    "a/",
                    "Bad Prefix/x",
                    "plain",
                ],
            ),
            field(
                "otherRoutedCIDRs",
                &["[192.168.0.0/16]", "[192.168.0.1/16]", "[nope]"],
            ),
        ),
    )
        .prop_map(|(a, b)| {
            [
                a.0, a.1, a.2, a.3, a.4, a.5, b.0, b.1, b.2, b.3, b.4, b.5, b.6,
            ]
            .concat()
        })
}

/// `cases` cases; failures are kept in `hostile_input.regressions` beside this file (commit them).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("regressions"),
        )),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------- checks

/// Every config rejection names a field, says what is wrong and how to fix it.
fn config_errors_name_the_problem(text: &str) -> Result<(), TestCaseError> {
    if let Err(e) = MigrationConfig::from_yaml(text) {
        prop_assert!(!e.0.is_empty());
        let shown = e.to_string();
        for err in &e.0 {
            prop_assert!(!err.field.is_empty() && !err.problem.is_empty() && !err.fix.is_empty());
            prop_assert!(shown.contains(err.field), "{shown}");
        }
    }
    Ok(())
}

/// Every scenario rejection names the object and the field, what is wrong and the fix; an
/// accepted scenario of a reasonable size builds a cluster.
fn scenario_checked(text: &str) -> Result<(), TestCaseError> {
    match Scenario::from_yaml(text) {
        Err(e) => {
            prop_assert!(!e.0.is_empty());
            let shown = e.to_string();
            for p in &e.0 {
                prop_assert!(!p.object.is_empty() && !p.field.is_empty());
                prop_assert!(!p.problem.is_empty() && !p.fix.is_empty());
                prop_assert!(shown.contains(&p.field), "{shown}");
            }
        }
        Ok(s) => {
            let nodes = s.expand_nodes().map(|n| n.len()).unwrap_or(usize::MAX);
            let pods: u64 = s
                .workloads
                .iter()
                .map(|w| u64::from(w.replica_count()))
                .sum();
            if nodes <= 64 && pods <= 2_000 {
                let built = SimCluster::new(s, SimParams::default(), 1);
                prop_assert!(built.is_ok(), "validated but not built: {:?}", built.err());
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn configs_from_arbitrary_text(s in "\\PC{0,300}") {
        config_errors_name_the_problem(&s)?;
    }

    #[test]
    fn configs_from_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..300)) {
        config_errors_name_the_problem(&String::from_utf8_lossy(&b))?;
    }

    #[test]
    fn configs_from_structured_documents(doc in document(CONFIG_KEYS)) {
        config_errors_name_the_problem(&doc)?;
    }

    #[test]
    fn configs_near_valid(doc in near_config()) {
        config_errors_name_the_problem(&doc)?;
    }

    #[test]
    fn configs_built_in_code_validate_without_panicking(
        prefix in 0u8..=32,
        mask in any::<u8>(),
        max_in_flight in any::<u32>(),
        label in "\\PC{0,70}",
        name in "\\PC{0,70}",
        drain_ms in any::<u64>(),
        poll_ms in any::<u64>(),
        port in any::<Option<u16>>(),
        names in prop::collection::vec("\\PC{0,20}", 0..4),
    ) {
        let net = ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 245, 0, 0), prefix).unwrap();
        let mut c = MigrationConfig::new(net);
        c.mask_size = mask;
        c.max_in_flight = max_in_flight;
        c.migration_label = label;
        c.node_config_name = name;
        c.drain_timeout = std::time::Duration::from_millis(drain_ms);
        c.poll_interval = std::time::Duration::from_millis(poll_ms);
        c.tunnel_port = port;
        c.scope = NodeScope::Names(names.into_iter().filter_map(|n| NodeName::new(n).ok()).collect());
        if let Err(e) = c.validate() {
            for err in &e.0 {
                prop_assert!(!err.field.is_empty() && !err.problem.is_empty() && !err.fix.is_empty());
            }
        }
    }

    #[test]
    fn scenarios_from_arbitrary_text(s in "\\PC{0,300}") {
        scenario_checked(&s)?;
    }

    #[test]
    fn scenarios_from_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..300)) {
        scenario_checked(&String::from_utf8_lossy(&b))?;
    }

    #[test]
    fn scenarios_from_structured_documents(doc in document(SCENARIO_KEYS)) {
        scenario_checked(&doc)?;
    }

    #[test]
    fn scenarios_near_valid(doc in near_scenario()) {
        scenario_checked(&doc)?;
    }

    #[test]
    fn node_names(s in prop_oneof!["\\PC{0,300}", "[a-z0-9.-]{0,80}", "[a-z0-9]{60,70}(\\.[a-z0-9]{1,5}){0,3}"]) {
        match NodeName::new(s.clone()) {
            Ok(n) => {
                prop_assert_eq!(n.as_str(), s.as_str());
                prop_assert!(!s.is_empty() && s.len() <= 253);
                prop_assert!(s.split('.').all(|l| !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-')));
                prop_assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'));
                // It round-trips through the config's `nodes` list.
                let yaml = format!("podCIDR: 10.245.0.0/16\nnodes: [{s:?}]\n");
                prop_assert!(MigrationConfig::from_yaml(&yaml).is_ok(), "{}", yaml);
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains(&format!("{s:?}")) && msg.contains(e.why), "{}", msg);
                let yaml = format!("podCIDR: 10.245.0.0/16\nnodes: [{s:?}]\n");
                if let Err(errs) = MigrationConfig::from_yaml(&yaml) {
                    prop_assert!(errs.0.iter().any(|x| x.field == "nodes" || x.field == "(document)"), "{}", errs);
                }
            }
        }
    }

    #[test]
    fn node_names_from_bytes(b in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = NodeName::new(String::from_utf8_lossy(&b).into_owned());
    }
}

// ---------------------------------------------------------------- refusing before touching

const CLUSTER: &str = r"
nodes:
  - {name: worker, count: 3, zones: [a, b]}
workloads:
  - {kind: Deployment, name: web, replicas: 3, pdb: {maxUnavailable: 1}}
calico: {autodetection: kubernetes-internal-ip}
";

proptest! {
    #![proptest_config(config(64))]

    /// A config whose `nodes` list names nodes the cluster lacks is refused, naming them, before
    /// anything is written: no operation, no lock, no record.
    #[test]
    fn a_config_naming_missing_nodes_is_refused_before_touching_the_cluster(
        present in prop::sample::subsequence(vec!["worker-1", "worker-2", "worker-3"], 0..=3),
        missing in prop::collection::btree_set("[a-z][a-z0-9-]{0,20}[a-z0-9]", 1..4),
        policy in prop_oneof![Just(FailurePolicy::RollbackAndStop), Just(FailurePolicy::RollbackAndContinue)],
    ) {
        let missing: Vec<String> = missing.into_iter().filter(|m| !m.starts_with("worker-")).collect();
        prop_assume!(!missing.is_empty());
        let names: Vec<String> = present.iter().map(|s| (*s).to_string()).chain(missing.iter().cloned()).collect();
        let yaml = format!("podCIDR: 10.245.0.0/16\nonNodeFailure: {}\nnodes: {names:?}\n",
            if policy == FailurePolicy::RollbackAndStop { "rollback-and-stop" } else { "rollback-and-continue" });
        let cfg = MigrationConfig::from_yaml(&yaml).unwrap();
        let sim = common::sim(CLUSTER);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let result = rt.block_on(async {
            let orch = Orchestrator::new(Ports::from_one(sim.clone()), cfg.clone(), RunOptions::default());
            let (_, plan) = orch.plan().await.unwrap();
            // Cilium is installed as it should be: the refusal is about the names alone.
            sim.install_cilium(rendered_config(&cfg, plan.inputs, CiliumPhase::Migration)).unwrap();
            orch.run(&plan, &Discard).await
        });
        match result {
            Err(e @ RunError::Preflight(_)) => {
                let msg = e.to_string();
                prop_assert!(msg.contains(missing[0].as_str()), "{}", msg);
            }
            other => prop_assert!(false, "expected a preflight refusal, got {:?}", other),
        }
        prop_assert!(sim.op_log().is_empty(), "{:?}", sim.op_log());
        prop_assert_eq!(sim.lock_holder(), None);
        for n in sim.node_list() {
            prop_assert_eq!(sim.annotation(&n), None);
        }
        let stats = sim.stats();
        for write in ["Cluster::set_unschedulable", "Cluster::set_node_label", "Cluster::evict",
                      "Cluster::delete_pod", "NewCni::apply_node_config", "NewCni::restart_agent",
                      "StateStore::save", "StateStore::save_with", "StateStore::acquire_lock"] {
            prop_assert!(!stats.api_calls.contains_key(write), "{} was called", write);
        }
    }
}
