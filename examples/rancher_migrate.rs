//! Migrates a Rancher-managed (or plain) cluster from Calico to Cilium node by node, with the
//! Rancher steps around the core's orchestrator: the cluster agent on the host network before
//! the first node and restored after the last, RKE1's network plugin / RKE2's Calico
//! autodetection before, RKE2's cni switch after every node is on Cilium, Argo CD paused and
//! restored (`--pause-gitops`). Cilium must already be installed with the migration values that
//! `rancher_plan` prints.
//!
//! Without `--yes` it prints exactly what would change and changes nothing. A run that stops
//! (a failed node, a kill) leaves the agent on the host network: run again to resume; the
//! agent is restored once, by the run that finishes (or `--restore-only --yes`).
//!
//! ```sh
//! cargo run --release --example rancher_migrate -- --kubeconfig prod.yaml            # dry run
//! cargo run --release --example rancher_migrate -- --kubeconfig prod.yaml --yes
//! ```

#[path = "rancher_common/mod.rs"]
mod rancher_common;

use std::sync::Arc;

use anyhow::{Result, bail};
use clap::Parser;
use cnimig_core::events::{Event, EventSink};
use cnimig_core::machine::Phase;
use cnimig_core::orchestrator::Ports;
use cnimig_core::ports::Verifier;
use cnimig_kube::planning;
use cnimig_rancher::RancherVerifier;
use cnimig_rancher::plan::{Action, RancherPlan, When};

/// Migrates a Rancher cluster from Calico to Cilium; a dry run without --yes.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    conn: rancher_common::Conn,
    /// Act. Without it nothing is changed.
    #[arg(long)]
    yes: bool,
    /// Only put back what an interrupted run left (the agent's saved spec, paused Argo CD
    /// Applications), without migrating.
    #[arg(long)]
    restore_only: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    cnimig::progress::init_logs();
    let s = rancher_common::connect(&args.conn).await?;
    let rplan = s.rancher.plan().await?;

    if args.restore_only {
        if !args.yes {
            let mut restores = rplan.clone();
            restores.steps.retain(|st| {
                matches!(st.action, Action::AgentRestore | Action::ArgoRestore { .. })
            });
            println!("== Dry run: the restores, in order, sent with dryRun=All");
            let writes = s.rancher.dry_run(&restores).await?;
            for w in &writes {
                println!("{w}");
            }
            if writes.iter().any(|w| !w.ok()) {
                bail!("dry run: a restore was refused (above): nothing changed");
            }
            println!("dry run: nothing changed; add --yes to restore");
            return Ok(());
        }
        for st in &rplan.steps {
            if matches!(st.action, Action::AgentRestore | Action::ArgoRestore { .. }) {
                println!("{}", st.describe);
            }
        }
        for st in &rplan.steps {
            match &st.action {
                Action::ArgoRestore { namespace, name } => {
                    s.rancher.argo_restore(namespace, name).await?;
                }
                Action::AgentRestore => {
                    s.rancher.restore_agent().await?;
                }
                _ => {}
            }
        }
        return Ok(());
    }

    let mut ports = Ports::from_one(s.kube.clone());
    let inner: Arc<dyn Verifier> = Arc::new(s.kube.clone());
    ports.verifier = Arc::new(RancherVerifier::new(inner, s.rancher.clone()));
    let orch = rancher_common::orchestrator(ports, &s.cfg);
    let (_, plan) = orch.plan().await?;
    if !args.yes {
        return dry_run(&s, &rplan, &plan, args.conn.json).await;
    }
    rancher_common::print(&rplan, &plan, args.conn.json)?;
    if !rplan.ok() || !plan.preflight.ok() {
        bail!("checks failed (above): nothing changed");
    }

    for line in s.rancher.prepare(&rplan).await? {
        eprintln!("prepared: {line}");
    }
    let events = s.kube.event_sink();
    let progress = |e: &Event| {
        events.emit(e);
        if let Event::Phase { node, to, .. } = e {
            eprintln!("{node}: {to:?}");
        }
    };
    let report = orch.run(&plan, &progress).await?;
    events.close().await;
    let all_done = !report.interrupted
        && report.stopped.is_none()
        && report.nodes.iter().all(|n| n.phase == Phase::Done);
    eprintln!(
        "{} of {} nodes Done{}",
        report.count(Phase::Done),
        report.nodes.len(),
        report
            .stopped
            .as_deref()
            .map(|s| format!("; stopped: {s}"))
            .unwrap_or_default()
    );
    if !all_done {
        bail!(
            "the migration did not finish: the cluster agent stays on the host network and paused Applications stay paused; run again to resume (or --restore-only --yes)"
        );
    }
    for line in s.rancher.finish(&rplan, true).await? {
        eprintln!("finished: {line}");
    }
    for st in rplan
        .steps_at(cnimig_rancher::plan::When::AfterLastNode)
        .filter(|s| !s.automatic())
    {
        println!("YOUR TURN: {}", st.describe);
    }
    Ok(())
}

/// Without `--yes`: the plans, then every write in the order a run makes it — the Rancher steps
/// before the first node, the migration's writes, the Rancher steps after the last node — each
/// Rancher write and the first migration write of each kind sent with server-side `dryRun=All`.
/// Changes nothing; fails when a check failed or the API server refused a write.
async fn dry_run(
    s: &rancher_common::Session,
    rplan: &RancherPlan,
    plan: &cnimig_core::plan::Plan,
    json: bool,
) -> Result<()> {
    if !json {
        rancher_common::print(rplan, plan, false)?;
    }
    if !rplan.ok() || !plan.preflight.ok() {
        if json {
            rancher_common::print(rplan, plan, true)?;
        }
        bail!("checks failed (above): nothing changed");
    }
    let rancher_writes = s.rancher.dry_run(rplan).await?;
    let server = s.config.cluster_url.to_string();
    let kplan = planning::plan(&s.kube, &server, &s.cfg).await?;
    let probes = planning::probe_writes(&s.config, s.kube.options(), &kplan).await;
    let refused = rancher_writes.iter().filter(|w| !w.ok()).count()
        + probes.iter().filter(|p| !p.ok()).count();
    if json {
        let v = serde_json::json!({
            "rancher": rplan,
            "migration": plan,
            "dryRun": {
                "rancherWrites": rancher_writes,
                "migrationWrites": kplan.writes,
                "migrationProbes": probes,
            },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let (before, after): (Vec<_>, Vec<_>) = rancher_writes
            .iter()
            .partition(|w| w.when == When::BeforeFirstNode);
        println!(
            "\n== Dry run, 1 of 3: the Rancher steps before the first node, sent with dryRun=All"
        );
        if before.is_empty() {
            println!("  (none)");
        }
        for w in before {
            println!("{w}");
        }
        println!(
            "\n== Dry run, 2 of 3: the migration's writes, in order, for each of the {} nodes",
            plan.order.len()
        );
        for w in &kplan.writes {
            println!("  {w}");
        }
        println!("  the first write of each kind, sent with dryRun=All:");
        for p in &probes {
            println!("  {p}");
        }
        println!("\n== Dry run, 3 of 3: the Rancher steps after the last node");
        if after.is_empty() {
            println!("  (none)");
        }
        for w in after {
            println!("{w}");
        }
    }
    if refused > 0 {
        bail!(
            "dry run: {refused} write(s) refused (above): nothing changed; a run would fail there. Grant what deploy/rbac.yaml and deploy/rbac-rancher.yaml grant, or fix the admission problem."
        );
    }
    println!(
        "\ndry run: nothing changed. With --yes, cnimig makes the writes above in that order and migrates the {} nodes; the steps marked \"YOU:\" are yours.",
        plan.order.len()
    );
    Ok(())
}
