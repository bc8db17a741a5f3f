//! Plans the migration of a cluster from Calico to Cilium, read-only: connects, reads a snapshot,
//! runs preflight, checks Cilium's live config, and prints the Helm values, the
//! `CiliumNodeConfig`, the node order, the prepare change (Calico autodetection, old → new), the
//! actions for the user outside the cluster, and the writes a run would make. Changes nothing.
//! `--calico-interface REGEX` plans Calico autodetection `interface=REGEX` instead of the node's
//! InternalIP, as `kube_migrate` takes it.
//!
//! Exit codes: 0 ready to run, 2 usage or config error, 4 preflight failed (each failed rule is
//! printed with its fix), 5 the cluster could not be read.
//!
//! ```sh
//! cargo run --release --example kube_plan -- --kubeconfig prod.yaml
//! cargo run --release --example kube_plan -- --context prod --config migration.yaml --json
//! ```

#[path = "kube_common/mod.rs"]
mod kube_common;

use clap::Parser;
use kube_common::{EXIT_API, EXIT_OK, EXIT_PREFLIGHT, EXIT_USAGE, Fail};

/// Plans a cluster's migration from Calico to Cilium, changing nothing.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    conn: kube_common::Conn,
    /// Plan Calico autodetection `interface=<REGEX>` instead of the node's InternalIP.
    #[arg(long, value_name = "REGEX")]
    calico_interface: Option<String>,
}

async fn run(args: &Args) -> Result<i32, Fail> {
    let cfg = args.conn.migration_config()?;
    let config = args.conn.kube_config().await?;
    let server = config.cluster_url.to_string();
    let cluster = cnimig_kube::planning::connect(&config, args.conn.kube_options(None))
        .await
        .map_err(|e| Fail::new(EXIT_API, e.to_string()))?;
    let mut plan = cnimig_kube::planning::plan(&cluster, &server, &cfg)
        .await
        .map_err(|e| Fail::new(EXIT_API, e.to_string()))?;
    if let Some(p) = &args.calico_interface {
        plan.set_interface_pattern(p)
            .map_err(|e| Fail::new(EXIT_USAGE, format!("--calico-interface: {e}")))?;
    }
    if args.conn.json {
        let text = serde_json::to_string_pretty(&plan)
            .map_err(|e| Fail::new(EXIT_API, format!("serialise the plan: {e}")))?;
        println!("{text}");
    } else {
        print!("{plan}");
    }
    if plan.ready() {
        Ok(EXIT_OK)
    } else {
        eprintln!("a run would refuse to start; fix these first:");
        for b in plan.blockers() {
            eprintln!("  - {b}");
        }
        Ok(EXIT_PREFLIGHT)
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    cnimig::progress::init_logs();
    let code = match run(&args).await {
        Ok(c) => c,
        Err(f) => {
            eprintln!("error: {}", f.message);
            f.code
        }
    };
    std::process::exit(code);
}
