//! Removes Calico from a finalized cluster: its objects in the order its install kind needs,
//! its leftovers on every node (a privileged helper pod per node running the program cnimig
//! renders from typed actions, deleted once it succeeded), then its CRDs.
//!
//! It always prints what it would do first (`cnimig_kube::finish::plan_cleanup`): how Calico
//! is installed, how far a previous run got, every write in order and the helper's program. It
//! refuses, changing nothing, until `kube_finalize` has succeeded and every node is Done (each
//! node that is not is named). Without `--yes` it then sends every write with server-side
//! `dryRun=All` and stops. With `--yes` it runs `Cleaner::clean_up` (resuming a stopped run)
//! and prints its progress from the persisted record.
//!
//! Exit codes:
//! - 0: clean-up succeeded (without `--yes`: every dry-run write was allowed);
//! - 1: clean-up stopped (a helper failed or timed out, the lock lost, the record changed);
//! - 2: usage or config error;
//! - 3: another run holds the lock;
//! - 4: refused: finalize has not succeeded, or a node is not Done;
//! - 5: cluster or API error (a read, a write or a dry-run write refused).
//!
//! ```sh
//! cargo run --release --example kube_cleanup -- --kubeconfig prod.yaml             # dry run
//! cargo run --release --example kube_cleanup -- --kubeconfig prod.yaml --config m.yaml --yes
//! ```

#[path = "kube_common/mod.rs"]
mod kube_common;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use cnimig_core::cleanup::{Cleaner, CleanupError, CleanupStep};
use cnimig_core::finalize::{FinalOptions, FinalizeError};
use cnimig_kube::{KubeCluster, finish};
use kube_common::{EXIT_API, EXIT_LOCKED, EXIT_OK, EXIT_PREFLIGHT, EXIT_STOPPED, Fail};

/// Removes Calico after finalize; a dry run without --yes.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    conn: kube_common::Conn,
    #[command(flatten)]
    run: kube_common::FinishRun,
    /// How long one node's helper may take, in seconds.
    #[arg(long, default_value_t = 300)]
    helper_timeout: u64,
}

async fn run(args: &Args) -> Result<kube_common::Outcome, Fail> {
    let (cfg, config, cluster) = args.conn.connect(&args.run).await?;
    let plan = finish::plan_cleanup(&cluster, &cfg)
        .await
        .map_err(|e| Fail::new(EXIT_API, format!("reading the cluster failed: {e}")))?;
    args.run.show(&args.conn, &plan)?;
    let plan_json = serde_json::to_value(&plan).unwrap_or_default();
    if !plan.refused.is_empty() {
        eprintln!("clean-up refused, nothing was changed:");
        for r in &plan.refused {
            eprintln!("  - {r}");
        }
        return Ok(kube_common::Outcome::new(
            EXIT_PREFLIGHT,
            serde_json::json!({"plan": plan_json, "refused": plan.refused}),
        ));
    }
    if !args.run.yes {
        let probes = finish::probe_cleanup(&config, &cluster, &plan).await;
        return Ok(kube_common::dry_run_outcome(
            &probes,
            plan_json,
            "clean-up",
            plan.step == Some(CleanupStep::Done),
        ));
    }
    let opts = FinalOptions {
        holder: args.run.holder(),
        lock_ttl: args.run.lock_ttl()?,
        poll_interval: Duration::from_millis(args.run.poll_ms),
        ..FinalOptions::default()
    };
    let cleaner = Cleaner::new(
        cluster.final_ports(),
        Arc::new(cluster.clone()),
        Arc::new(cluster.clone()) as Arc<KubeCluster>,
        cfg,
        opts.clone(),
        Duration::from_secs(args.helper_timeout),
    );
    println!("== Clean up (holder {})", opts.holder);
    let watch = kube_common::watch_record(cluster.clone(), &args.run);
    let result = cleaner.clean_up().await;
    watch.stop().await;
    let (code, run) = match result {
        Ok(r) => {
            println!(
                "clean-up succeeded: {} node(s) flushed by this run (at most {} at once); Calico's objects and CRDs are gone.",
                r.flushed_now, r.max_in_flight_seen
            );
            (
                EXIT_OK,
                serde_json::json!({"flushedNow": r.flushed_now, "maxInFlightSeen": r.max_in_flight_seen}),
            )
        }
        Err(e) => {
            eprintln!("{e}");
            (
                cleanup_code(&e),
                serde_json::json!({"error": e.to_string()}),
            )
        }
    };
    Ok(kube_common::Outcome::new(
        code,
        serde_json::json!({"plan": plan_json, "run": run}),
    ))
}

fn cleanup_code(e: &CleanupError) -> i32 {
    match e {
        CleanupError::NotFinalized(_) | CleanupError::NodesNotMigrated(_) => EXIT_PREFLIGHT,
        CleanupError::Run(FinalizeError::Locked { .. }) => EXIT_LOCKED,
        CleanupError::Run(FinalizeError::Port { .. }) => EXIT_API,
        _ => EXIT_STOPPED,
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    cnimig::progress::init_logs();
    let code = kube_common::finish_main(run(&args).await, args.run.json_report.as_ref());
    std::process::exit(code);
}
