//! Convert Calico network policies into Cilium network policies for a person to review.
//!
//! ```sh
//! kubectl get networkpolicies.crd.projectcalico.org,globalnetworkpolicies.crd.projectcalico.org,\
//! tiers.crd.projectcalico.org,networkpolicies.networking.k8s.io -A -o yaml > calico.yaml
//! cargo run --example policy_convert -- --pod-cidr 10.42.0.0/16 --pod-cidr 10.245.0.0/16 \
//!     --service-cidr 10.43.0.0/16 calico.yaml > cilium.yaml 2> report.md
//! cargo run --example policy_convert -- --report-json calico.yaml > cilium.yaml 2> report.json
//! ```
//!
//! Reads one or more YAML files (multi-document, `List`s unpacked; `-` reads stdin), prints the
//! Cilium policies as YAML on stdout (each preceded by a comment saying which Calico policy it
//! came from and whether it converted exactly), and the report on stderr: Markdown-ish text, or
//! JSON with `--report-json`. Kubernetes `NetworkPolicy` objects in the input are not converted
//! (Cilium enforces them) but audited for the constructs that behave differently under Cilium.
//!
//! There is no `--apply`: applying the policies needs the kube adapter, a later step. Review the
//! YAML and apply it with `kubectl apply -f` once Cilium enforces policy.
//!
//! Exit code: 0; 1 when an input cannot be read; 2 with `--fail-on-partial` when some policy
//! did not convert exactly.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use cnimig::core::policy::{
    ClusterCidrs, ConvertOptions, ParsedDocuments, audit_k8s_network_policies, convert_documents,
    parse_cidrs, parse_documents, render_yaml,
};

#[derive(Parser, Debug)]
#[command(about = "Convert Calico network policies into Cilium network policies for review")]
struct Args {
    /// Calico YAML files (`-` for stdin).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Pod CIDR (repeat for the old and the new one). Calico's nets match pods by IP and
    /// Cilium's CIDR rules never do; without this, nets are assumed not to cover pods.
    #[arg(long = "pod-cidr")]
    pod_cidrs: Vec<String>,
    /// Service CIDR (repeatable): nets covering it are reported.
    #[arg(long = "service-cidr")]
    service_cidrs: Vec<String>,
    /// Node address range (repeatable): nets covering it are reported.
    #[arg(long = "node-cidr")]
    node_cidrs: Vec<String>,
    /// Print the report as JSON on stderr instead of text.
    #[arg(long)]
    report_json: bool,
    /// Exit with code 2 when some policy did not convert exactly.
    #[arg(long)]
    fail_on_partial: bool,
}

fn read(path: &PathBuf) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }
}

fn main() {
    cnimig::progress::init_logs();
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("policy_convert: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run() -> anyhow::Result<i32> {
    let args = Args::parse();
    let mut parsed = ParsedDocuments::default();
    for f in &args.files {
        let text = read(f)?;
        let docs = parse_documents(&text).with_context(|| format!("parsing {}", f.display()))?;
        parsed.extend(docs);
    }
    if parsed.policies.is_empty() && parsed.kubernetes_network_policies.is_empty() {
        bail!(
            "no Calico NetworkPolicy or GlobalNetworkPolicy in the input ({} documents skipped)",
            parsed.skipped.len()
        );
    }
    let cidrs = ClusterCidrs {
        pods: parse_cidrs(&args.pod_cidrs).context("--pod-cidr")?,
        services: parse_cidrs(&args.service_cidrs).context("--service-cidr")?,
        nodes: parse_cidrs(&args.node_cidrs).context("--node-cidr")?,
    };
    let opts = ConvertOptions {
        pod_cidrs: cidrs.pods.clone(),
        service_cidrs: cidrs.services.clone(),
        node_cidrs: cidrs.nodes.clone(),
        ..ConvertOptions::default()
    };
    let conv = convert_documents(&parsed, &opts);
    let audit = audit_k8s_network_policies(&parsed.kubernetes_network_policies, &cidrs);
    print!("{}", render_yaml(&conv));
    if args.report_json {
        let json = serde_json::json!({ "report": conv.report, "audit": audit });
        eprintln!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        eprint!("{}", conv.report);
        if !parsed.kubernetes_network_policies.is_empty() {
            eprintln!();
            eprintln!(
                "## Kubernetes NetworkPolicy audit ({} NetworkPolicy objects, {} findings)",
                parsed.kubernetes_network_policies.len(),
                audit.len()
            );
            for f in &audit {
                let at = match (f.direction, f.rule) {
                    (Some(d), Some(r)) => format!(" {d} rule {r}"),
                    _ => String::new(),
                };
                eprintln!("- {}/{}{at}: {}", f.namespace, f.name, f.detail);
            }
        }
    }
    Ok(if args.fail_on_partial && !conv.report.all_exact() {
        2
    } else {
        0
    })
}
