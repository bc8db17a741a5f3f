//! Convert Calico network policies into Cilium network policies for a person to review.
//!
//! ```sh
//! kubectl get networkpolicies.crd.projectcalico.org,globalnetworkpolicies.crd.projectcalico.org,\
//! tiers.crd.projectcalico.org,networksets.crd.projectcalico.org,\
//! globalnetworksets.crd.projectcalico.org,networkpolicies.networking.k8s.io,namespaces \
//! -A -o yaml > calico.yaml
//! cargo run --example policy_convert -- --pod-cidr 10.42.0.0/16 --pod-cidr 10.245.0.0/16 \
//!     --service-cidr 10.43.0.0/16 calico.yaml > cilium.yaml 2> report.md
//! cargo run --example policy_convert -- --report-json calico.yaml > cilium.yaml 2> report.json
//! ```
//!
//! Reads one or more YAML files (multi-document, `List`s unpacked; `-` reads stdin), or with
//! `--from-cluster` Calico's `NetworkPolicy`, `GlobalNetworkPolicy`, `Tier`, `NetworkSet` and
//! `GlobalNetworkSet` objects from the cluster's `crd.projectcalico.org/v1` CRDs (with its
//! namespaces' labels, and its Kubernetes `NetworkPolicy` objects for the audit), prints the Cilium policies as YAML on
//! stdout (each preceded by a comment saying which Calico policy it came from and whether it
//! converted exactly), and the report on stderr: Markdown-ish text, or JSON with
//! `--report-json`. Kubernetes `NetworkPolicy` objects in the input are not converted (Cilium
//! enforces them) but audited for the constructs that behave differently under Cilium.
//!
//! Network sets: a rule whose selector selects `NetworkSet`s or `GlobalNetworkSet`s of the input
//! gets their nets as `fromCIDRSet` / `toCIDRSet` rules (the report notes which). Which
//! namespaced sets a `namespaceSelector` selects depends on the namespaces' labels: include the
//! `Namespace` objects in the input (as above; `--from-cluster` reads them), otherwise such
//! rules are reported partial.
//!
//! Bad input changes nothing and prints no policy: a file that is not YAML, or a Calico policy in a file
//! that does not fit the schema (an unknown `action`, `protocol`, a missing name, …), is
//! refused with exit code 1 and a message naming the document and the problem.
//!
//! With `--apply` every converted object is sent to the cluster with server-side `dryRun=All`
//! first (schema, admission and RBAC checked, nothing stored); if the server refuses any, none
//! is created and the refused ones are named with the server's message. Only with `--yes` as
//! well are they then created or updated (server-side apply, field manager `cnimig`), each
//! printed as created, updated or unchanged. Policies that did not convert exactly are applied
//! only with `--allow-partial`. Cilium enforces them once `enable-policy` is `default` (after
//! finalize); until then they change nothing. RBAC: `deploy/rbac-policy.yaml`.
//!
//! ```sh
//! cargo run --example policy_convert -- --from-cluster --pod-cidr 10.42.0.0/16 \
//!     --pod-cidr 10.245.0.0/16 --apply            # dry run of every policy
//! cargo run --example policy_convert -- --from-cluster --pod-cidr 10.42.0.0/16 \
//!     --pod-cidr 10.245.0.0/16 --apply --yes      # create / update them
//! ```
//!
//! Exit code: 0; 1 when an input cannot be read, is not valid (see above) or the cluster cannot
//! be reached; 2 with
//! `--fail-on-partial` (or `--apply` without `--allow-partial`) when some policy did not convert
//! exactly (nothing applied); 3 when the dry run refused some policy (nothing created); 4 when a
//! write failed after the dry run passed (the output says which were written; run again).

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use cnimig::core::policy::{
    ClusterCidrs, ConvertOptions, ParsedDocuments, audit_k8s_network_policies, convert_documents,
    parse_cidrs, parse_documents, render_yaml,
};
use cnimig_kube::policy::PolicyApplyError;

#[derive(Parser, Debug)]
#[command(about = "Convert Calico network policies into Cilium network policies for review")]
struct Args {
    /// Calico YAML files (`-` for stdin).
    #[arg(required_unless_present = "from_cluster")]
    files: Vec<PathBuf>,
    /// Read Calico's policies, tiers and network sets from the cluster (crd.projectcalico.org/v1).
    #[arg(long)]
    from_cluster: bool,
    /// Send every converted policy to the cluster with server-side dryRun=All; with --yes,
    /// create or update them once all passed.
    #[arg(long)]
    apply: bool,
    /// With --apply: really create or update the policies.
    #[arg(long, requires = "apply")]
    yes: bool,
    /// With --apply: apply policies that did not convert exactly too.
    #[arg(long, requires = "apply")]
    allow_partial: bool,
    /// Kubeconfig of the cluster (default: $KUBECONFIG, ~/.kube/config, else in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Context in that kubeconfig.
    #[arg(long)]
    context: Option<String>,
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

/// The cluster, from --kubeconfig / --context or the usual places.
async fn cluster(args: &Args) -> anyhow::Result<cnimig_kube::KubeCluster> {
    let opts = kube::config::KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let config = match (&args.kubeconfig, &args.context) {
        (Some(p), _) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("reading --kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &opts)
                .await
                .with_context(|| format!("using --kubeconfig {}", p.display()))?
        }
        (None, Some(_)) => kube::Config::from_kubeconfig(&opts)
            .await
            .context("--context needs a kubeconfig ($KUBECONFIG or ~/.kube/config)")?,
        (None, None) => kube::Config::infer().await.context(
            "no Kubernetes configuration: pass --kubeconfig, set $KUBECONFIG or run in a pod",
        )?,
    };
    Ok(cnimig_kube::KubeCluster::new(
        config,
        cnimig_kube::KubeOptions::default(),
    )?)
}

fn main() {
    cnimig::progress::init_logs();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("policy_convert: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    match rt.block_on(run()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("policy_convert: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run() -> anyhow::Result<i32> {
    let args = Args::parse();
    let needs_cluster = args.from_cluster || args.apply;
    let k = if needs_cluster {
        Some(cluster(&args).await?)
    } else {
        None
    };
    let mut parsed = ParsedDocuments::default();
    if let (true, Some(k)) = (args.from_cluster, &k) {
        parsed.extend(
            k.read_calico_policies()
                .await
                .context("reading Calico's policies from the cluster")?,
        );
    }
    for f in &args.files {
        let text = read(f)?;
        let docs = parse_documents(&text).with_context(|| format!("parsing {}", f.display()))?;
        let bad: Vec<String> = docs
            .skipped
            .iter()
            .filter(|d| d.invalid)
            .map(|d| {
                let name = if d.name.is_empty() {
                    "(no name)"
                } else {
                    &d.name
                };
                format!("document {} ({} {name}): {}", d.index, d.kind, d.reason)
            })
            .collect();
        if !bad.is_empty() {
            bail!(
                "{}: {}; fix the input (nothing was converted)",
                f.display(),
                bad.join("; ")
            );
        }
        parsed.extend(docs);
    }
    if parsed.policies.is_empty() && parsed.kubernetes_network_policies.is_empty() {
        if args.from_cluster && args.files.is_empty() {
            eprintln!(
                "no Calico NetworkPolicy or GlobalNetworkPolicy in the cluster: nothing to do"
            );
            return Ok(0);
        }
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
    let partial = !conv.report.all_exact();
    if args.fail_on_partial && partial {
        return Ok(2);
    }
    let Some(k) = k.filter(|_| args.apply) else {
        return Ok(0);
    };
    if partial && !args.allow_partial {
        eprintln!(
            "\nnot applied: some policies did not convert exactly (see the report); review them \
             and pass --allow-partial to apply them as converted"
        );
        return Ok(2);
    }
    eprintln!();
    eprintln!(
        "## Apply ({} Cilium policies; server-side dry run first{})",
        conv.objects.len(),
        if args.yes {
            ", then the writes"
        } else {
            " only: pass --yes to write"
        }
    );
    match k.apply_cilium_policies(&conv.values(), args.yes).await {
        Ok((dry, written)) => {
            for d in &dry {
                eprintln!("- dry run ok: {}", d.target);
            }
            for (t, w) in &written {
                eprintln!("- {w:?}: {t}");
            }
            Ok(0)
        }
        Err(e @ PolicyApplyError::Refused { .. }) => {
            eprintln!("{e}");
            Ok(3)
        }
        Err(e @ PolicyApplyError::Partial { .. }) => {
            if let PolicyApplyError::Partial { written, .. } = &e {
                for (t, w) in written {
                    eprintln!("- {w:?}: {t}");
                }
            }
            eprintln!("{e}");
            Ok(4)
        }
    }
}
