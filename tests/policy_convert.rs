//! The `policy_convert` example binary, from files (no cluster): a Calico input with network
//! sets converts into the expected Cilium policies with CIDR sets, the report marks exactness,
//! and bad input exits non-zero with a message naming the problem and prints no policy.
//!
//! Runs `$CNIMIG_EXAMPLES_DIR/policy_convert` (scripts/test-all.sh exports it), else
//! `target/release/examples/policy_convert`; builds nothing itself:
//!
//! ```sh
//! cargo build --release --example policy_convert && cargo test --release --test policy_convert
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

fn binary() -> PathBuf {
    let dir = std::env::var_os("CNIMIG_EXAMPLES_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/examples"),
        PathBuf::from,
    );
    let bin = dir.join("policy_convert");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --release --example policy_convert` first (or set \
         CNIMIG_EXAMPLES_DIR to the folder of the built examples)",
        bin.display()
    );
    bin
}

fn input(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/policy_convert")
        .join(name)
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str], stdin: Option<&str>) -> Run {
    let mut child = Command::new(binary())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start policy_convert");
    {
        let mut pipe = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            pipe.write_all(text.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// The YAML documents of the output (each must parse).
fn documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("the output is YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn named<'a>(docs: &'a [Value], name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in the output"))
}

#[test]
fn policy_convert_writes_network_sets_as_cidr_sets() {
    let file = input("netsets.yaml");
    let r = run(
        &[
            "--pod-cidr",
            "10.42.0.0/16",
            "--report-json",
            file.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    let docs = documents(&r.stdout);
    assert_eq!(docs.len(), 3, "{}", r.stdout);

    let partners = named(&docs, "partners-in");
    assert_eq!(partners["kind"], "CiliumClusterwideNetworkPolicy");
    assert_eq!(
        partners["metadata"]["annotations"]["cnimig.io/conversion"],
        "exact"
    );
    // Pods with the label, and the set's nets in a rule of their own (Cilium rejects a rule
    // that combines fromEndpoints and fromCIDRSet).
    let ports = json!([{"ports": [{"port": "443", "protocol": "TCP"}]}]);
    assert_eq!(
        partners["spec"]["ingress"],
        json!([
            {
                "fromEndpoints": [{
                    "matchLabels": {"role": "partner"},
                    "matchExpressions": [{"key": "k8s:io.kubernetes.pod.namespace", "operator": "Exists"}]
                }],
                "toPorts": ports
            },
            {
                "fromCIDRSet": [{"cidr": "198.51.100.0/24"}, {"cidr": "203.0.113.8/29"}],
                "toPorts": ports
            }
        ])
    );

    let dbs = named(&docs, "to-dbs");
    let egress = dbs["spec"]["egress"].as_array().unwrap();
    assert_eq!(egress.len(), 2, "{egress:?}");
    assert!(egress[0].get("toEndpoints").is_some() && egress[0].get("toCIDRSet").is_none());
    assert_eq!(egress[1]["toCIDRSet"], json!([{"cidr": "192.0.2.0/24"}]));
    assert_eq!(egress[1]["toPorts"], egress[0]["toPorts"]);

    let legacy = named(&docs, "legacy-in");
    assert_eq!(legacy["kind"], "CiliumClusterwideNetworkPolicy");
    assert_eq!(
        legacy["metadata"]["annotations"]["cnimig.io/conversion"],
        "partial"
    );

    let report: Value = serde_json::from_str(&r.stderr).expect("the report is JSON");
    let status = |name: &str| {
        report["report"]["policies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["policy"]["name"] == name)
            .map(|p| (p["status"].clone(), p["items"].clone()))
            .unwrap()
    };
    let (s, items) = status("partners-in");
    assert_eq!(s, "exact");
    assert!(
        items.to_string().contains("network-set-nets"),
        "the note names the sets: {items}"
    );
    assert_eq!(status("to-dbs").0, "exact");
    let (s, items) = status("legacy-in");
    assert_eq!(s, "partial");
    assert!(
        items.to_string().contains("nets-partly-cover-pods")
            && items.to_string().contains("10.42.7.0/24"),
        "{items}"
    );
}

#[test]
fn policy_convert_without_the_namespaces_reports_the_set_partial() {
    // The same input without the Namespace: whether `data` is prod is not known.
    let text = std::fs::read_to_string(input("netsets.yaml")).unwrap();
    let without: Vec<&str> = text
        .split("\n---\n")
        .filter(|d| !d.contains("kind: Namespace"))
        .collect();
    let r = run(
        &["--pod-cidr", "10.42.0.0/16", "--fail-on-partial", "-"],
        Some(&without.join("\n---\n")),
    );
    assert_eq!(r.code, 2, "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains("NetworkPolicy shop/to-dbs (PARTIAL)")
            && r.stderr.contains("NetworkSet data/dbs")
            && r.stderr.contains("namespace labels"),
        "{}",
        r.stderr
    );
    let dbs = named(&documents(&r.stdout), "to-dbs").clone();
    // The allow leaves the unknown set out (less access).
    assert!(!dbs.to_string().contains("192.0.2.0/24"), "{dbs}");
}

#[test]
fn policy_convert_refuses_bad_input_and_prints_nothing() {
    let good = std::fs::read_to_string(input("netsets.yaml")).unwrap();
    // An action Calico does not have, among good documents.
    let bad_action = good.replace(
        "  - action: Allow\n    protocol: TCP\n    destination:",
        "  - action: Permit\n    protocol: TCP\n    destination:",
    );
    assert_ne!(bad_action, good);
    let r = run(&["-"], Some(&bad_action));
    assert_eq!(r.code, 1, "stderr: {}", r.stderr);
    assert!(r.stdout.is_empty(), "printed: {}", r.stdout);
    assert!(
        r.stderr.contains("to-dbs")
            && r.stderr.contains("Permit")
            && r.stderr.contains("fix the input"),
        "{}",
        r.stderr
    );

    // An unknown protocol.
    let bad_protocol = good.replace("protocol: TCP", "protocol: TCPX");
    let r = run(&["-"], Some(&bad_protocol));
    assert_eq!(r.code, 1, "stderr: {}", r.stderr);
    assert!(r.stdout.is_empty(), "printed: {}", r.stdout);
    assert!(
        r.stderr.contains("unknown protocol \"TCPX\""),
        "{}",
        r.stderr
    );

    // Not YAML.
    let r = run(&["-"], Some("apiVersion: projectcalico.org/v3\nkind: [\n"));
    assert_eq!(r.code, 1, "stderr: {}", r.stderr);
    assert!(r.stdout.is_empty(), "printed: {}", r.stdout);
    assert!(r.stderr.contains("not valid YAML"), "{}", r.stderr);

    // A bad --pod-cidr.
    let file = input("netsets.yaml");
    let r = run(
        &["--pod-cidr", "10.42.0.0/33", file.to_str().unwrap()],
        None,
    );
    assert_eq!(r.code, 1, "stderr: {}", r.stderr);
    assert!(r.stdout.is_empty(), "printed: {}", r.stdout);
    assert!(
        r.stderr.contains("--pod-cidr") && r.stderr.contains("10.42.0.0/33"),
        "{}",
        r.stderr
    );
}
