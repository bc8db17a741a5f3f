//! Finalizes a migrated cluster: Cilium becomes the cluster's CNI. Run it after `kube_migrate`
//! finished every node in scope and after `helm upgrade` with the final values it prints.
//!
//! It always prints what it would do first (`cnimig_kube::finish::plan_finalize`): the nodes
//! in scope, how far a previous run got, the keys of the live `cilium-config` that still
//! differ from the final values (with the values to apply), and every write in order (Leases,
//! each Cilium agent pod restarted, the temporary Calico allow rule, the `CiliumNodeConfig`,
//! each node's migration label). It refuses, changing nothing, while a node in scope is not
//! Done, and names each such node. Without `--yes` it then sends every write with server-side
//! `dryRun=All` and stops. With `--yes` it runs `Finalizer::finalize` (resuming a stopped run)
//! and prints its progress from the persisted record.
//!
//! Exit codes:
//! - 0: finalize succeeded (without `--yes`: every dry-run write was allowed);
//! - 1: finalize stopped (an agent not Ready in time, the lock lost, the record changed);
//! - 2: usage or config error;
//! - 3: another run holds the lock;
//! - 4: refused: a node in scope is not Done, or `cilium-config` does not hold the final values
//!   within `--config-timeout`;
//! - 5: cluster or API error (a read, a write or a dry-run write refused).
//!
//! ```sh
//! cargo run --release --example kube_finalize -- --kubeconfig prod.yaml             # dry run
//! cargo run --release --example kube_finalize -- --kubeconfig prod.yaml --config m.yaml --yes
//! ```

#[path = "kube_common/mod.rs"]
mod kube_common;

use std::time::Duration;

use clap::Parser;
use cnimig_core::finalize::{FinalOptions, FinalizeError, Finalizer};
use cnimig_kube::finish;
use kube_common::{EXIT_API, EXIT_LOCKED, EXIT_OK, EXIT_PREFLIGHT, EXIT_STOPPED, Fail};

/// Makes Cilium the cluster's CNI after the migration; a dry run without --yes.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    conn: kube_common::Conn,
    #[command(flatten)]
    run: kube_common::FinishRun,
    /// How long to wait for the live cilium-config to hold the final values, in seconds.
    #[arg(long, default_value_t = 600)]
    config_timeout: u64,
    /// How long one agent may take to be Ready with Cilium's CNI config, in seconds.
    #[arg(long, default_value_t = 300)]
    agent_timeout: u64,
}

async fn run(args: &Args) -> Result<kube_common::Outcome, Fail> {
    let (cfg, config, cluster) = args.conn.connect(&args.run).await?;
    let plan = finish::plan_finalize(&cluster, &cfg)
        .await
        .map_err(|e| Fail::new(EXIT_API, format!("reading the cluster failed: {e}")))?;
    args.run.show(&args.conn, &plan)?;
    let plan_json = serde_json::to_value(&plan).unwrap_or_default();
    if !plan.refused.is_empty() {
        eprintln!(
            "finalize refused, nothing was changed: every node in scope must be Done first; finish or roll back these and run kube_migrate again:"
        );
        for r in &plan.refused {
            eprintln!("  - {r}");
        }
        return Ok(kube_common::Outcome::new(
            EXIT_PREFLIGHT,
            serde_json::json!({"plan": plan_json, "refused": plan.refused}),
        ));
    }
    if !args.run.yes {
        let probes = finish::probe_finalize(&config, &cluster, &plan).await;
        return Ok(kube_common::dry_run_outcome(
            &probes,
            plan_json,
            "finalize",
            plan.step == Some(cnimig_core::finalize::FinalStep::Done),
        ));
    }
    let opts = FinalOptions {
        holder: args.run.holder(),
        lock_ttl: args.run.lock_ttl()?,
        config_timeout: Duration::from_secs(args.config_timeout),
        agent_timeout: Duration::from_secs(args.agent_timeout),
        poll_interval: Duration::from_millis(args.run.poll_ms),
        inputs: cnimig_core::cilium::ValueInputs {
            host_port_pods: plan.host_port_pods,
        },
    };
    let fin = Finalizer::new(cluster.final_ports(), cfg, opts.clone());
    println!("== Finalize (holder {})", opts.holder);
    let watch = kube_common::watch_record(cluster.clone(), &args.run);
    let result = fin.finalize().await;
    watch.stop().await;
    let (code, run) = match result {
        Ok(r) => {
            println!(
                "finalize succeeded: {} node(s) in scope, {} agent(s) restarted by this run (at most {} at once); the CiliumNodeConfig and the migration labels are gone. Next: kube_cleanup.",
                r.nodes.len(),
                r.restarted_now,
                r.max_in_flight_seen
            );
            (
                EXIT_OK,
                serde_json::json!({"nodes": r.nodes, "restartedNow": r.restarted_now, "maxInFlightSeen": r.max_in_flight_seen}),
            )
        }
        Err(e) => {
            eprintln!("{e}");
            (
                finalize_code(&e),
                serde_json::json!({"error": e.to_string()}),
            )
        }
    };
    Ok(kube_common::Outcome::new(
        code,
        serde_json::json!({"plan": plan_json, "run": run}),
    ))
}

fn finalize_code(e: &FinalizeError) -> i32 {
    match e {
        FinalizeError::NotMigrated(_) | FinalizeError::ConfigNotFinal { .. } => EXIT_PREFLIGHT,
        FinalizeError::Locked { .. } => EXIT_LOCKED,
        FinalizeError::Port { .. } => EXIT_API,
        FinalizeError::NoAgent(_)
        | FinalizeError::AgentNotReady { .. }
        | FinalizeError::BadState(_) => EXIT_STOPPED,
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    cnimig::progress::init_logs();
    let code = kube_common::finish_main(run(&args).await, args.run.json_report.as_ref());
    std::process::exit(code);
}
