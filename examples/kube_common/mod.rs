//! What `kube_plan` and `kube_migrate` share: the connection and config flags, finding the
//! cluster (kubeconfig, or the in-cluster ServiceAccount), the exit codes, and the one-line
//! rendering of progress events.

#![allow(dead_code)] // each example uses a different part

use std::path::PathBuf;
use std::time::Duration;

use cnimig_core::config::MigrationConfig;
use cnimig_core::events::Event;
use cnimig_kube::KubeOptions;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Every run finished: all nodes Done (or, without `--yes`, the dry run passed).
pub const EXIT_OK: i32 = 0;
/// A node failed or was rolled back, or the run stopped (lock lost, another writer).
pub const EXIT_STOPPED: i32 = 1;
/// Usage or config error (bad flag, unreadable or invalid config, no kubeconfig).
pub const EXIT_USAGE: i32 = 2;
/// Another run holds the lock.
pub const EXIT_LOCKED: i32 = 3;
/// Preflight failed (or Cilium's live config is not in migration mode).
pub const EXIT_PREFLIGHT: i32 = 4;
/// The cluster or its API failed (unreachable, refused a request or a dry-run write).
pub const EXIT_API: i32 = 5;

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Fail {
    /// Exit code.
    pub code: i32,
    /// What to print.
    pub message: String,
}

impl Fail {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Fail {
            code,
            message: message.into(),
        }
    }
}

/// Where the cluster is and the run's choices.
#[derive(clap::Args, Debug, Clone)]
pub struct Conn {
    /// Kubeconfig of the cluster (default: $KUBECONFIG, ~/.kube/config, else the in-cluster
    /// ServiceAccount when run in a pod).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Context in that kubeconfig (default: its current context).
    #[arg(long)]
    pub context: Option<String>,
    /// The migration config (MigrationConfig YAML); without it, --pod-cidr and defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Cilium's new pod CIDR (when no --config).
    #[arg(long, default_value = "10.245.0.0/16")]
    pub pod_cidr: ipnet::Ipv4Net,
    /// Namespace of Cilium's agents, cilium-config and the CiliumNodeConfig.
    #[arg(long, default_value = "kube-system")]
    pub cilium_namespace: String,
    /// Namespace of the run lock Lease and the rollback helper pods.
    #[arg(long, default_value = "kube-system")]
    pub system_namespace: String,
    /// Name of the run lock Lease.
    #[arg(long, default_value = "cnimig-migration")]
    pub lock_name: String,
    /// Only see Nodes matching this label selector (key=value,…); others are not this run's.
    #[arg(long)]
    pub node_selector: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl Conn {
    /// The adapter's options from the flags.
    pub fn kube_options(&self, instance: Option<String>) -> KubeOptions {
        KubeOptions {
            cilium_namespace: self.cilium_namespace.clone(),
            system_namespace: self.system_namespace.clone(),
            lock_name: self.lock_name.clone(),
            node_selector: self.node_selector.clone(),
            instance,
            ..KubeOptions::default()
        }
    }

    /// The migration config: `--config` validated, or defaults around `--pod-cidr`.
    pub fn migration_config(&self) -> Result<MigrationConfig, Fail> {
        match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    Fail::new(
                        EXIT_USAGE,
                        format!("cannot read --config {}: {e}", p.display()),
                    )
                })?;
                MigrationConfig::from_yaml(&text)
                    .map_err(|e| Fail::new(EXIT_USAGE, format!("--config {}: {e}", p.display())))
            }
            None => Ok(MigrationConfig::new(self.pod_cidr)),
        }
    }

    /// The Kubernetes client config: `--kubeconfig`/`--context` if given, else
    /// `kube::Config::infer` ($KUBECONFIG, ~/.kube/config, then the in-cluster ServiceAccount).
    pub async fn kube_config(&self) -> Result<kube::Config, Fail> {
        let opts = KubeConfigOptions {
            context: self.context.clone(),
            ..KubeConfigOptions::default()
        };
        match (&self.kubeconfig, &self.context) {
            (Some(p), _) => {
                let kc = Kubeconfig::read_from(p).map_err(|e| {
                    Fail::new(EXIT_USAGE, format!("cannot read --kubeconfig {}: {e}", p.display()))
                })?;
                kube::Config::from_custom_kubeconfig(kc, &opts)
                    .await
                    .map_err(|e| {
                        Fail::new(EXIT_USAGE, format!("cannot use --kubeconfig {}: {e}", p.display()))
                    })
            }
            (None, Some(_)) => kube::Config::from_kubeconfig(&opts).await.map_err(|e| {
                Fail::new(
                    EXIT_USAGE,
                    format!("--context needs a kubeconfig ($KUBECONFIG or ~/.kube/config): {e}"),
                )
            }),
            (None, None) => kube::Config::infer().await.map_err(|e| {
                Fail::new(
                    EXIT_USAGE,
                    format!(
                        "no Kubernetes configuration found: pass --kubeconfig, set $KUBECONFIG, or run in a pod with a ServiceAccount ({e})"
                    ),
                )
            }),
        }
    }
}

/// `host-pid`: this process, for the Lease.
pub fn default_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host}-{}", std::process::id())
}

/// Unix milliseconds as `HH:MM:SS` UTC.
pub fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

/// How long from now until `until_ms` (Unix milliseconds), as `in 12s` or `12s ago`.
pub fn relative(until_ms: u64) -> String {
    let now = cnimig_kube::SystemClock::unix_now().0;
    if until_ms >= now {
        format!("in {:.0?}", Duration::from_millis(until_ms - now))
    } else {
        format!("{:.0?} ago", Duration::from_millis(now - until_ms))
    }
}

/// One plain line per event.
pub fn event_line(e: &Event) -> String {
    match e {
        Event::RunStarted { nodes, resumed, at } => {
            format!(
                "{} run started: {nodes} nodes, {resumed} resumed",
                clock(at.0)
            )
        }
        Event::NodeStarted { node, at } => format!("{} {node}: started", clock(at.0)),
        Event::Phase { node, from, to, at } => {
            format!("{} {node}: {from:?} -> {to:?}", clock(at.0))
        }
        Event::Waiting { node, reason, at } => format!("{} {node}: waiting: {reason}", clock(at.0)),
        Event::EvictionBlocked { node, pod, pdb, at } => format!(
            "{} {node}: eviction of {pod} blocked by PodDisruptionBudget {pdb}",
            clock(at.0)
        ),
        Event::NodeFinished {
            node,
            outcome,
            cause,
            at,
        } => format!(
            "{} {node}: finished {outcome:?}{}",
            clock(at.0),
            cause
                .as_deref()
                .map(|c| format!(": {c}"))
                .unwrap_or_default()
        ),
        Event::NodeJoined {
            node,
            migrating,
            at,
        } => format!(
            "{} {node}: joined the cluster ({})",
            clock(at.0),
            if *migrating {
                "will migrate"
            } else {
                "out of scope, reported only"
            }
        ),
        Event::Retrying { what, at } => format!("{} retrying: {what}", clock(at.0)),
        Event::Stopping { reason, at } => format!("{} stopping: {reason}", clock(at.0)),
        Event::Progress {
            done,
            rolled_back,
            in_flight,
            pending,
            at,
        } => format!(
            "{} progress: {done} done, {in_flight} in flight, {pending} pending, {rolled_back} rolled back",
            clock(at.0)
        ),
    }
}

// ---- What kube_finalize and kube_cleanup share. ----

/// The run flags of `kube_finalize` and `kube_cleanup`.
#[derive(clap::Args, Debug, Clone)]
pub struct FinishRun {
    /// Act. Without it nothing is changed: every write is sent with dryRun=All.
    #[arg(long)]
    pub yes: bool,
    /// This run's identity in the lock Lease (default: host name and process id).
    #[arg(long)]
    pub holder: Option<String>,
    /// The lock's time-to-live in seconds; renewed every third of it.
    #[arg(long, default_value_t = 60)]
    pub lock_ttl: u64,
    /// How often to look at the cluster while waiting, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub poll_ms: u64,
    /// Write the plan, the dry-run results or the run's result, and the exit code, as JSON.
    #[arg(long)]
    pub json_report: Option<PathBuf>,
    /// No progress lines during the run (the plan and the result are still printed).
    #[arg(long, short)]
    pub quiet: bool,
}

impl FinishRun {
    /// `--holder` or host and pid.
    pub fn holder(&self) -> String {
        self.holder.clone().unwrap_or_else(default_holder)
    }

    /// `--lock-ttl`, checked.
    pub fn lock_ttl(&self) -> Result<Duration, Fail> {
        if self.lock_ttl < 3 {
            return Err(Fail::new(
                EXIT_USAGE,
                format!(
                    "--lock-ttl {} is too short: use 3 seconds or more",
                    self.lock_ttl
                ),
            ));
        }
        Ok(Duration::from_secs(self.lock_ttl))
    }

    /// Prints `plan` as text, or as JSON with `--json`.
    pub fn show<T: serde::Serialize + std::fmt::Display>(
        &self,
        conn: &Conn,
        plan: &T,
    ) -> Result<(), Fail> {
        if conn.json {
            let text = serde_json::to_string_pretty(plan)
                .map_err(|e| Fail::new(EXIT_API, format!("serialise the plan: {e}")))?;
            println!("{text}");
        } else {
            print!("{plan}");
        }
        Ok(())
    }
}

impl Conn {
    /// Validates the flags and config, then connects: (config, client config, adapter).
    pub async fn connect(
        &self,
        run: &FinishRun,
    ) -> Result<(MigrationConfig, kube::Config, cnimig_kube::KubeCluster), Fail> {
        run.lock_ttl()?;
        if run.poll_ms == 0 {
            return Err(Fail::new(EXIT_USAGE, "--poll-ms 0: use 1 or more"));
        }
        let cfg = self.migration_config()?;
        let config = self.kube_config().await?;
        let cluster =
            cnimig_kube::planning::connect(&config, self.kube_options(Some(run.holder())))
                .await
                .map_err(|e| Fail::new(EXIT_API, e.to_string()))?;
        Ok((cfg, config, cluster))
    }
}

/// An exit code and the JSON report.
pub struct Outcome {
    /// Exit code.
    pub code: i32,
    /// The report.
    pub report: serde_json::Value,
}

impl Outcome {
    pub fn new(code: i32, report: serde_json::Value) -> Self {
        Outcome { code, report }
    }
}

/// Prints the dry-run probes; `EXIT_OK` when none was refused.
pub fn dry_run_outcome(
    probes: &[cnimig_kube::planning::Probe],
    plan: serde_json::Value,
    what: &str,
    done: bool,
) -> Outcome {
    if done {
        println!("{what} already succeeded: nothing to send.");
        return Outcome::new(EXIT_OK, serde_json::json!({"plan": plan, "dryRun": []}));
    }
    println!("== Dry run: every write above, sent with dryRun=All");
    for p in probes {
        println!("{p}");
    }
    let refused = probes.iter().filter(|p| !p.ok()).count();
    let code = if refused == 0 {
        println!(
            "dry run: nothing changed. With --yes, {what} makes the writes listed above, in that order."
        );
        EXIT_OK
    } else {
        eprintln!(
            "dry run: {refused} write(s) refused (above): nothing changed; a run would fail there. Grant what deploy/rbac.yaml and deploy/rbac-finalize.yaml grant, or fix the admission problem."
        );
        EXIT_API
    };
    Outcome::new(code, serde_json::json!({"plan": plan, "dryRun": probes}))
}

/// Prints, while finalize or clean-up runs, each change of the persisted record (the step,
/// agents restarting and restarted, nodes flushing and flushed): progress read back from the
/// cluster, so what it shows is what a resumed run would start from.
pub struct RecordWatch {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts a [`RecordWatch`] (nothing with `--quiet`).
pub fn watch_record(cluster: cnimig_kube::KubeCluster, run: &FinishRun) -> RecordWatch {
    use cnimig_core::finalize::FinalizePort;
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    let quiet = run.quiet;
    let every = Duration::from_millis(run.poll_ms.max(200));
    let task = tokio::spawn(async move {
        let mut last = String::new();
        let mut stopping = false;
        loop {
            if !quiet && let Ok(Some(r)) = cluster.load_final().await {
                let line = record_line(&r);
                if line != last {
                    let now = cnimig_kube::SystemClock::unix_now().0;
                    println!("{} {line}", clock(now));
                    last = line;
                }
            }
            if stopping {
                return;
            }
            // On stop, one last look so the final state is printed.
            tokio::select! {
                _ = &mut rx => stopping = true,
                () = tokio::time::sleep(every) => {}
            }
        }
    });
    RecordWatch { stop: tx, task }
}

impl RecordWatch {
    /// Stops watching.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

fn record_line(r: &cnimig_core::finalize::FinalRecord) -> String {
    let mut s = format!(
        "finalize: {:?}; agents restarted {}, restarting {:?}",
        r.step,
        r.restarted.len(),
        r.restarting.keys().map(|n| n.as_str()).collect::<Vec<_>>()
    );
    if let Some(c) = &r.cleanup {
        s = format!(
            "clean-up: {:?}; nodes flushed {}, flushing {:?}",
            c.step,
            c.flushed.len(),
            c.flushing.keys().map(|n| n.as_str()).collect::<Vec<_>>()
        );
    }
    s
}

/// Prints a failure, writes `--json-report`, and returns the exit code.
pub fn finish_main(outcome: Result<Outcome, Fail>, report: Option<&PathBuf>) -> i32 {
    let (mut code, mut v) = match outcome {
        Ok(o) => (o.code, o.report),
        Err(f) => {
            eprintln!("error: {}", f.message);
            (f.code, serde_json::json!({"error": f.message}))
        }
    };
    if let Some(path) = report {
        v["exitCode"] = serde_json::json!(code);
        let written = serde_json::to_string_pretty(&v)
            .map_err(|e| e.to_string())
            .and_then(|t| std::fs::write(path, t).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("error: cannot write --json-report {}: {e}", path.display());
            if code == EXIT_OK {
                code = EXIT_USAGE;
            }
        }
    }
    code
}
