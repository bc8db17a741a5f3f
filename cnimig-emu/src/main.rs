//! `cnimig-emu`: runs the emulator against the cluster in `KUBECONFIG` until Ctrl-C.
//!
//! ```sh
//! scripts/testenv/up.sh && . /tmp/cnimig-testenv/env
//! cargo run -p cnimig-emu -- --nodes 5 --prefix emu --install-crds
//! ```

use anyhow::Result;
use clap::Parser;

/// Emulate kubelets and the Calico and Cilium agents of N nodes.
#[derive(Debug, Parser)]
struct Args {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Node name prefix (`<prefix>-NN`).
    #[arg(long, default_value = "emu")]
    prefix: String,
    /// Namespace of cilium-config, the agents and the CiliumNodeConfigs.
    #[arg(long, default_value = "kube-system")]
    cilium_namespace: String,
    /// Install the CRDs of deploy/crds first.
    #[arg(long)]
    install_crds: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let client = kube::Client::try_default().await?;
    if args.install_crds {
        cnimig_emu::setup::install_crds(&client).await?;
    }
    let mut cfg = cnimig_emu::EmuConfig::new(&args.prefix, args.nodes);
    cfg.cilium_namespace = args.cilium_namespace;
    let handle = cnimig_emu::start(client, cfg).await?;
    eprintln!("cnimig-emu: emulating {} nodes; Ctrl-C to stop", args.nodes);
    tokio::signal::ctrl_c().await?;
    handle.stop();
    Ok(())
}
