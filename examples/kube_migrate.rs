//! Migrates a cluster from Calico to Cilium node by node, with the core's orchestrator over
//! `KubeCluster`. Cilium must already be installed with the migration values `kube_plan` prints.
//! Real nodes are refused for now (preflight rule `node-observability`, exit 4 before any write):
//! it migrates the test control plane's emulated nodes (see the README's "Running against a
//! cluster").
//!
//! It always prints the plan first. Without `--yes` it changes nothing: it prints the writes a
//! run makes (objects, fields, order) and sends the first write of each kind with server-side
//! `dryRun=All` (the prepare change included), so RBAC and admission problems show before
//! anything is done.
//!
//! With `--yes`, before the first node it **prepares**: it needs the plan's "actions for you"
//! outside the cluster (security groups, firewalls: the new pod CIDR, the tunnel port and
//! protocol) confirmed (`--confirm-network-actions`, or a prompt on a terminal; refused
//! otherwise, nothing changed), applies the plan's Calico autodetection change and waits for
//! calico-node's rollout, then checks every node's `projectcalico.org/IPv4Address` is its
//! InternalIP (stops naming each node that is not; this run's change is undone). Then it takes
//! the run lock (a Lease), migrates, and prints one line per progress event. A run that was
//! killed resumes, when started again, from the records on the Nodes.
//!
//! A run is **abandoned** when it ends with no node on Cilium (every node untouched or rolled
//! back; `cnimig_core::prepare::abandoned`), or refuses to start after preparing: the
//! autodetection change is then undone exactly. A run that migrated any node, failed a
//! rollback, or stopped on an API error keeps the change (it is still needed; a later run
//! undoes it if that one is abandoned).
//!
//! Without `--kubeconfig`/`--context` it uses `$KUBECONFIG`, `~/.kube/config`, or, in a pod,
//! the in-cluster ServiceAccount (see `deploy/job.yaml`).
//!
//! Exit codes:
//! - 0: every node Done (without `--yes`: the plan is ready and every dry-run write was allowed);
//! - 1: a node failed or was rolled back, or the run stopped (lock lost, another writer);
//! - 2: usage or config error, or the actions outside the cluster not confirmed;
//! - 3: another run holds the lock (its holder and expiry are printed);
//! - 4: preflight failed, Cilium's live config is not in migration mode (each failed rule
//!   is printed with its fix), or a node's Calico address is not its InternalIP;
//! - 5: cluster or API error (unreachable, a request or dry-run write refused).
//!
//! ```sh
//! cargo run --release --example kube_migrate -- --kubeconfig prod.yaml            # dry run
//! cargo run --release --example kube_migrate -- --kubeconfig prod.yaml --config m.yaml --yes \
//!     --confirm-network-actions
//! ```

#[path = "kube_common/mod.rs"]
mod kube_common;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use cnimig::progress::{Mode, Progress};
use cnimig_core::events::{Event, EventSink};
use cnimig_core::machine::Phase;
use cnimig_core::model::Time;
use cnimig_core::orchestrator::{Orchestrator, Ports, RunError, RunOptions, RunReport};
use cnimig_kube::planning::{self, KubePlan};
use cnimig_kube::prepare::PrepareRunError;
use kube_common::{
    EXIT_API, EXIT_LOCKED, EXIT_OK, EXIT_PREFLIGHT, EXIT_STOPPED, EXIT_USAGE, Fail, clock,
    event_line, relative,
};

/// Migrates a cluster from Calico to Cilium; a dry run without --yes.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    conn: kube_common::Conn,
    /// Act. Without it nothing is changed.
    #[arg(long)]
    yes: bool,
    /// This run's identity in the lock Lease (default: host name and process id).
    #[arg(long)]
    holder: Option<String>,
    /// The lock's time-to-live in seconds; renewed every third of it. A run that dies holds
    /// the lock this long.
    #[arg(long, default_value_t = 60)]
    lock_ttl: u64,
    /// Write the plan, the dry-run results or the run's report, and the exit code, as JSON.
    #[arg(long)]
    json_report: Option<PathBuf>,
    /// Do not publish Kubernetes Events on the Nodes.
    #[arg(long)]
    no_events: bool,
    /// Plain lines on stdout, one per event, even on a terminal (the default when stdout is
    /// not a terminal or RUST_LOG is set); on a terminal the run otherwise shows a live bar.
    #[arg(long)]
    no_progress: bool,
    /// No per-event output during the run (the plan and the summary are still printed).
    #[arg(long, short)]
    quiet: bool,
    /// Confirms that the plan's "actions for you" outside the cluster (security groups, host
    /// firewalls, routers: the new pod CIDR, Cilium's tunnel and health ports) are done. Without
    /// it, --yes asks on a terminal and refuses otherwise.
    #[arg(long)]
    confirm_network_actions: bool,
    /// Calico autodetection to set in the prepare step: `interface=<REGEX>` instead of the
    /// node's InternalIP (`kubernetes-internal-ip`). Refused if it could match `cilium_*`.
    #[arg(long, value_name = "REGEX")]
    calico_interface: Option<String>,
    /// Seconds to wait for calico-node's rollout after the prepare change (and its undo).
    #[arg(long, default_value_t = 600)]
    calico_rollout_timeout: u64,
}

/// Prints one plain line per event (swap in another `EventSink`, e.g. a progress bar).
struct Lines;

impl EventSink for Lines {
    fn emit(&self, e: &Event) {
        println!("{}", event_line(e));
    }
}

/// Prints nothing (`--quiet`).
struct Quiet;

impl EventSink for Quiet {
    fn emit(&self, _: &Event) {}
}

struct Outcome {
    code: i32,
    report: serde_json::Value,
}

fn write_report(path: &PathBuf, v: &serde_json::Value) -> Result<(), Fail> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| Fail::new(EXIT_API, format!("serialise the report: {e}")))?;
    std::fs::write(path, text).map_err(|e| {
        Fail::new(
            EXIT_USAGE,
            format!("cannot write --json-report {}: {e}", path.display()),
        )
    })
}

async fn run(args: &Args) -> Result<Outcome, Fail> {
    if args.lock_ttl < 3 {
        return Err(Fail::new(
            EXIT_USAGE,
            format!(
                "--lock-ttl {} is too short: use 3 seconds or more",
                args.lock_ttl
            ),
        ));
    }
    let cfg = args.conn.migration_config()?;
    let config = args.conn.kube_config().await?;
    let server = config.cluster_url.to_string();
    let holder = args
        .holder
        .clone()
        .unwrap_or_else(kube_common::default_holder);
    let cluster = planning::connect(&config, args.conn.kube_options(Some(holder.clone())))
        .await
        .map_err(|e| Fail::new(EXIT_API, e.to_string()))?;
    let mut kplan = planning::plan(&cluster, &server, &cfg)
        .await
        .map_err(|e| Fail::new(EXIT_API, e.to_string()))?;
    if let Some(p) = &args.calico_interface {
        kplan
            .set_interface_pattern(p)
            .map_err(|e| Fail::new(EXIT_USAGE, format!("--calico-interface: {e}")))?;
    }
    if args.conn.json {
        let text = serde_json::to_string_pretty(&kplan)
            .map_err(|e| Fail::new(EXIT_API, format!("serialise the plan: {e}")))?;
        println!("{text}");
    } else {
        print!("{kplan}");
    }
    let plan_json = serde_json::to_value(&kplan).unwrap_or_default();
    if !kplan.ready() {
        eprintln!("preflight failed: nothing changed. Fix these first:");
        for b in kplan.blockers() {
            eprintln!("  - {b}");
        }
        return Ok(Outcome {
            code: EXIT_PREFLIGHT,
            report: serde_json::json!({"plan": plan_json, "blockers": kplan.blockers()}),
        });
    }
    if !args.yes {
        return dry_run(&config, &cluster, &kplan, plan_json).await;
    }

    let rollout = Duration::from_secs(args.calico_rollout_timeout);
    let confirmed = args.confirm_network_actions || ask_network_actions(&kplan);
    println!("== Prepare");
    let prepared = match cluster
        .prepare_run(&kplan.prepare, confirmed, &holder, rollout)
        .await
    {
        Ok(p) => {
            println!(
                "  {}; every node's Calico address is its InternalIP",
                if p.applied {
                    "Calico's autodetection changed and rolled out"
                } else {
                    "no change needed"
                }
            );
            p
        }
        Err(e) => return Ok(prepare_failed(&e, plan_json, args)),
    };

    let orch = Orchestrator::new(
        Ports::from_one(cluster.clone()),
        cfg.clone(),
        RunOptions {
            holder: holder.clone(),
            lock_ttl: Duration::from_secs(args.lock_ttl),
            ..RunOptions::default()
        },
    );
    let events = (!args.no_events).then(|| cluster.event_sink());
    // On a terminal a live bar (cnimig::progress); otherwise the plain lines this example
    // has always printed on stdout (scripts and the kill test read them), or nothing.
    let mode = Mode::detect(args.no_progress, args.quiet);
    let bar = (mode == Mode::Bar).then(|| Progress::new(Mode::Bar));
    let lines = Lines;
    let progress: &dyn EventSink = match (&bar, mode) {
        (Some(b), _) => b,
        (None, Mode::Quiet) => &Quiet,
        (None, _) => &lines,
    };
    let sink = |e: &Event| {
        progress.emit(e);
        if let Some(k) = &events {
            k.emit(e);
        }
    };
    println!("== Run (holder {holder})");
    let result = orch.run(&kplan.plan, &sink).await;
    if let Some(b) = &bar {
        b.finish();
    }
    if let Some(k) = events {
        k.close().await;
    }
    let undo = match &result {
        Ok(r) => Some(
            cluster
                .undo_if_abandoned(&kplan.prepare, r, &holder, rollout)
                .await,
        ),
        // The run refused to start: nothing migrated; undo what this run changed.
        Err(RunError::Preflight(_) | RunError::NotInMigrationMode(_)) if prepared.applied => Some(
            cluster
                .undo_prepared(&kplan.prepare, &holder, rollout)
                .await,
        ),
        _ => None,
    };
    let undo_line = match (&undo, prepared.applied) {
        (Some(Ok(true)), _) => Some(
            "run abandoned (no node on Cilium): Calico's autodetection change undone".to_string(),
        ),
        (Some(Err(e)), _) => Some(format!(
            "run abandoned, but undoing Calico's autodetection change failed: {e}; the old value is in annotation {}; run again, or restore it by hand",
            cnimig_kube::prepare::AUTODETECTION_UNDO_ANNOTATION
        )),
        (None, true) | (Some(Ok(false)), true) => Some(
            "Calico's autodetection change stays (nodes are on Cilium, or the run will resume)"
                .to_string(),
        ),
        _ => None,
    };
    if let Some(l) = &undo_line {
        println!("{l}");
    }
    let (code, report) = match result {
        Ok(r) => (summarise(&r), serde_json::to_value(&r).unwrap_or_default()),
        Err(RunError::Locked { holder: h, until }) => locked(args, &h, until),
        Err(e @ (RunError::Preflight(_) | RunError::NotInMigrationMode(_))) => {
            eprintln!("{e}");
            (EXIT_PREFLIGHT, serde_json::json!({"error": e.to_string()}))
        }
        Err(e @ (RunError::LockLost { .. } | RunError::Conflict(_))) => {
            eprintln!("{e}");
            (EXIT_STOPPED, serde_json::json!({"error": e.to_string()}))
        }
        Err(e @ (RunError::Port(_) | RunError::BadRecord { .. })) => {
            eprintln!("cluster error: {e}; run again to resume from the records on the Nodes");
            (EXIT_API, serde_json::json!({"error": e.to_string()}))
        }
    };
    Ok(Outcome {
        code,
        report: serde_json::json!({"plan": plan_json, "run": report, "prepare": undo_line}),
    })
}

/// On a terminal, asks whether the plan's actions outside the cluster are done; `false`
/// without a terminal (the run then refuses: use --confirm-network-actions).
fn ask_network_actions(kplan: &KubePlan) -> bool {
    use std::io::{BufRead, IsTerminal, Write};
    if !(std::io::stdin().is_terminal() && std::io::stdout().is_terminal()) {
        return false;
    }
    println!("== Actions for you, outside the cluster");
    for a in &kplan.prepare.user_actions {
        println!("  - {a}");
    }
    print!("Are these done? Type yes to go on: ");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).is_ok() && line.trim() == "yes"
}

/// Another run holds the Lease: says who and until when; the exit code and report.
fn locked(args: &Args, h: &str, until: Time) -> (i32, serde_json::Value) {
    eprintln!(
        "another run holds the lock (Lease {}/{}): holder {h}, until {} UTC ({}); nothing changed. If that run died, run again after that time.",
        args.conn.system_namespace,
        args.conn.lock_name,
        clock(until.0),
        relative(until.0)
    );
    (
        EXIT_LOCKED,
        serde_json::json!({"lockedBy": h, "until": until.0}),
    )
}

/// The exit code and report when preparing failed (nothing left changed by this run).
fn prepare_failed(e: &PrepareRunError, plan_json: serde_json::Value, args: &Args) -> Outcome {
    let code = match e {
        PrepareRunError::NotConfirmed => EXIT_USAGE,
        PrepareRunError::Locked { holder, until } => {
            let (code, lock) = locked(args, holder, *until);
            return Outcome {
                code,
                report: serde_json::json!({"plan": plan_json, "run": lock}),
            };
        }
        PrepareRunError::Lease { .. } => EXIT_API,
        PrepareRunError::AddressMismatch { problems, undo } => {
            eprintln!("Calico's node addresses are wrong; no node was touched ({undo}):");
            for p in problems {
                eprintln!("  - {p}");
            }
            return Outcome {
                code: EXIT_PREFLIGHT,
                report: serde_json::json!({"plan": plan_json, "prepare": {"addressProblems": problems, "undo": undo}}),
            };
        }
        PrepareRunError::Apply { .. } | PrepareRunError::Check { .. } => EXIT_API,
    };
    eprintln!("{e}");
    Outcome {
        code,
        report: serde_json::json!({"plan": plan_json, "prepare": {"error": e.to_string()}}),
    }
}

/// Prints the report's summary; the exit code.
fn summarise(r: &RunReport) -> i32 {
    let done = r.count(Phase::Done);
    println!(
        "{done} of {} nodes Done in {:.0?}",
        r.nodes.len(),
        r.makespan()
    );
    for n in r.nodes.iter().filter(|n| n.phase != Phase::Done) {
        println!(
            "  {}: {:?}{}",
            n.node,
            n.phase,
            n.cause
                .as_deref()
                .map(|c| format!(": {c}"))
                .unwrap_or_default()
        );
    }
    for s in &r.skipped {
        println!("  skipped {}: {}", s.node, s.reason);
    }
    for s in &r.joined_not_migrated {
        println!("  joined, not migrated {}: {}", s.node, s.reason);
    }
    if let Some(s) = &r.stopped {
        println!("stopped: {s}");
    }
    if !r.interrupted && r.stopped.is_none() && done == r.nodes.len() {
        EXIT_OK
    } else {
        EXIT_STOPPED
    }
}

async fn dry_run(
    config: &kube::Config,
    cluster: &cnimig_kube::KubeCluster,
    kplan: &KubePlan,
    plan_json: serde_json::Value,
) -> Result<Outcome, Fail> {
    println!("== Dry run: the first write of each kind, sent with dryRun=All");
    let mut probes: Vec<_> = planning::probe_prepare(cluster, kplan)
        .await
        .into_iter()
        .collect();
    probes.extend(planning::probe_writes(config, cluster.options(), kplan).await);
    for p in &probes {
        println!("{p}");
    }
    let refused = probes.iter().filter(|p| !p.ok()).count();
    let code = if refused == 0 {
        println!(
            "dry run: nothing changed. With --yes, cnimig makes the writes listed above and migrates the {} nodes in the order shown.",
            kplan.plan.order.len()
        );
        EXIT_OK
    } else {
        eprintln!(
            "dry run: {refused} write(s) refused (above): nothing changed; a run would fail there. Grant what deploy/rbac.yaml grants, or fix the admission problem."
        );
        EXIT_API
    };
    Ok(Outcome {
        code,
        report: serde_json::json!({"plan": plan_json, "dryRun": probes}),
    })
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    cnimig::progress::init_logs();
    let outcome = run(&args).await;
    let (code, report) = match outcome {
        Ok(o) => (o.code, o.report),
        Err(f) => {
            eprintln!("error: {}", f.message);
            (f.code, serde_json::json!({"error": f.message}))
        }
    };
    let mut code = code;
    if let Some(path) = &args.json_report {
        let mut v = report;
        v["exitCode"] = serde_json::json!(code);
        if let Err(f) = write_report(path, &v) {
            eprintln!("error: {}", f.message);
            if code == EXIT_OK {
                code = f.code;
            }
        }
    }
    std::process::exit(code);
}
