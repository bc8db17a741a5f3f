//! Plans the migration of a Rancher-managed (RKE1, RKE2, K3s) or plain cluster, read-only: the
//! Rancher steps (cluster agent, the distribution's CNI settings, GitOps) and the core's
//! preflight and node order. Exit code 1 if any check failed.
//!
//! ```sh
//! cargo run --release --example rancher_plan -- --kubeconfig prod.yaml --pause-gitops
//! cargo run --release --example rancher_plan -- --kubeconfig prod.yaml \
//!     --management-kubeconfig rancher.yaml --cluster fleet-default/prod
//! ```

#[path = "rancher_common/mod.rs"]
mod rancher_common;

use anyhow::Result;
use clap::Parser;

/// Plans a Rancher cluster's migration from Calico to Cilium, changing nothing.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    conn: rancher_common::Conn,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    cnimig::progress::init_logs();
    let s = rancher_common::connect(&args.conn).await?;
    let rplan = s.rancher.plan().await?;
    let orch = rancher_common::orchestrator(
        cnimig_core::orchestrator::Ports::from_one(s.kube.clone()),
        &s.cfg,
    );
    let (_, plan) = orch.plan().await?;
    rancher_common::print(&rplan, &plan, args.conn.json)?;
    if !rplan.ok() || !plan.preflight.ok() {
        std::process::exit(1);
    }
    Ok(())
}
