//! Migrates an emulated cluster on the test control plane (`scripts/testenv/up.sh`) and reports
//! cnimig's API requests per migrated node, by verb and resource.
//!
//! `apiserver_request_total` has no client label (its labels are verb, resource, subresource,
//! scope, component, code, group, version, dry_run), so it mixes cnimig, the emulator (which
//! plays every kubelet and the Cilium agents) and the controllers. cnimig's share is read from
//! the control plane's audit log (level Metadata, always on in the test control plane) by the
//! adapter's own `User-Agent`; the emulator's share by the admin user it runs as (nothing else
//! uses admin while the run is measured); the metric's total is printed beside them.
//!
//! Without `--yes` it prints what it would create and changes nothing. With `--yes` it creates
//! a namespace, `--nodes` emulated nodes with Deployments, a StatefulSet, budgets and the Cilium
//! and Calico DaemonSets, migrates them as cnimig's ServiceAccount (`deploy/rbac.yaml`), prints
//! the figures and deletes what it created.
//!
//! With `--kubectl PATH` it also runs the source procedure's per-node `kubectl` commands against
//! a second emulated cluster of the same shape (its own namespace, nodes and emulator) on the
//! same control plane, one node at a time as the procedure does, counts their requests in the
//! audit log by kubectl's `User-Agent` (`kubectl/…`) and prints both per-node figures and the
//! ratio. The commands, per node (the procedure's `kube-system` is the cluster's namespace):
//!
//! 1. `kubectl drain --ignore-daemonsets --delete-emptydir-data NODE` (cordons, evicts, polls)
//! 2. `kubectl label node NODE --overwrite io.cilium.migration/cilium-default=true`
//! 3. `kubectl -n NS delete pod --field-selector spec.nodeName=NODE -l k8s-app=cilium --wait=false`
//! 4. `kubectl -n NS rollout status ds/cilium -w`
//! 5. `kubectl get -o wide node NODE`
//! 6. `kubectl uncordon NODE`
//! 7. `kubectl get pods --all-namespaces -o wide --field-selector spec.nodeName=NODE`, then
//!    `kubectl delete pod --grace-period=0 --wait=false POD -n NS` for each pod whose line names
//!    neither calico nor cilium.
//!
//! Not counted: `cilium status --wait` and the Goldpinger check (other tools than kubectl),
//! so the baseline is, if anything, low. kubectl's discovery cache (`--cache-dir`) is warmed
//! before the measured window, as on a person's laptop after the first command.
//!
//! ```sh
//! export CNIMIG_TESTENV_RUN=/tmp/cnimig-testenv; scripts/testenv/up.sh; . $CNIMIG_TESTENV_RUN/env
//! cargo run --release --example kube_api_cost -- --nodes 10 --yes
//! CNIMIG_TESTENV_KUBECTL=1 scripts/testenv/build.sh   # kubectl at the pinned version
//! cargo run --release --example kube_api_cost -- --nodes 10 --yes \
//!     --kubectl ~/.cache/cnimig/testenv/v1.34.4/bin/kubectl
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use cnimig_core::cilium::{CiliumPhase, ValueInputs, rendered_config};
use cnimig_core::config::{MigrationConfig, NodeScope};
use cnimig_core::machine::Phase;
use cnimig_core::model::LabelSelector;
use cnimig_core::orchestrator::{Orchestrator, Ports, RunOptions};
use cnimig_kube::{KubeCluster, KubeOptions, metrics};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::KubeConfigOptions;
use kube::{Client, Config};
use serde_json::{Value, json};

/// Measures cnimig's API requests per migrated node on the test control plane.
#[derive(Parser, Debug)]
struct Args {
    /// Emulated nodes to migrate.
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Nodes migrated at once.
    #[arg(long, default_value_t = 4)]
    max_in_flight: u32,
    /// Workload pods per node (Deployments and the StatefulSet's share), besides the Cilium and
    /// Calico agents. The default 2 is a sparse cluster; the simulator's 150-node reference
    /// cluster has about 11 a node.
    #[arg(long, default_value_t = 2)]
    pods_per_node: usize,
    /// The API server's audit log (JSON lines, level Metadata or more); default
    /// `$CNIMIG_TESTENV_AUDIT_LOG`, set by `scripts/testenv/up.sh`'s env file.
    #[arg(long)]
    audit_log: Option<std::path::PathBuf>,
    /// Also run the source procedure's per-node kubectl commands against a second emulated
    /// cluster of the same shape and compare (`CNIMIG_TESTENV_KUBECTL=1 scripts/testenv/build.sh`
    /// builds kubectl at the pinned version).
    #[arg(long)]
    kubectl: Option<std::path::PathBuf>,
    /// The migration's poll interval in milliseconds (cnimig's default is 2000).
    #[arg(long, default_value_t = 2000)]
    poll_ms: u64,
    /// Act. Without it nothing is changed.
    #[arg(long)]
    yes: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.nodes == 0 || args.max_in_flight == 0 {
        bail!("--nodes and --max-in-flight must be at least 1");
    }
    if args.pods_per_node == 0 || args.pods_per_node > 50 {
        bail!("--pods-per-node must be between 1 and 50");
    }
    if args.nodes < 2 {
        bail!("--nodes must be at least 2: a drained node's pods need another node to go to");
    }
    if args.poll_ms == 0 || args.poll_ms > 60_000 {
        bail!("--poll-ms must be between 1 and 60000");
    }
    if let Some(k) = &args.kubectl
        && !k.is_file()
    {
        bail!(
            "--kubectl {}: no such file; build it with CNIMIG_TESTENV_KUBECTL=1 scripts/testenv/build.sh",
            k.display()
        );
    }
    let audit_log = args
        .audit_log
        .clone()
        .or_else(|| std::env::var_os("CNIMIG_TESTENV_AUDIT_LOG").map(Into::into))
        .context(
            "no audit log: pass --audit-log FILE or source the test control plane's env \
             (scripts/testenv/up.sh; . $CNIMIG_TESTENV_RUN/env)",
        )?;
    if !audit_log.is_file() {
        bail!(
            "audit log {} does not exist: start the API server with --audit-log-path (scripts/testenv/up.sh does)",
            audit_log.display()
        );
    }
    let admin_config = Config::from_kubeconfig(&KubeConfigOptions::default())
        .await
        .context("read KUBECONFIG (the test control plane's admin.kubeconfig)")?;
    let admin = Client::try_from(admin_config.clone())?;
    let run = format!("apicost-{:x}", std::process::id());
    if !args.yes {
        println!(
            "would create namespace {run}, {n} emulated nodes {run}-n-NN, 3 Deployments, a StatefulSet, \
             their budgets and the cilium/calico-node DaemonSets on {}, migrate the nodes as \
             kube-system/cnimig, count the requests in {}, and delete it all",
            admin_config.cluster_url,
            audit_log.display(),
            n = args.nodes
        );
        if let Some(k) = &args.kubectl {
            println!(
                "then the same in namespace {run}-k with nodes {run}-k-n-NN, migrated by the source \
                 procedure's kubectl commands ({}), one node at a time, and delete it all",
                k.display()
            );
        }
        println!("dry run: nothing changed; add --yes to run");
        return Ok(());
    }
    let result = measure(&args, &audit_log, &admin, &admin_config, &run).await;
    // Clean up whatever happened.
    for ns in [run.clone(), format!("{run}-k")] {
        let nodes: Api<Node> = Api::all(admin.clone());
        for i in 0..args.nodes {
            let _ = nodes
                .delete(&format!("{ns}-n-{i:02}"), &DeleteParams::default())
                .await;
        }
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
        let now = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        let _ = pods.delete_collection(&now, &ListParams::default()).await;
        let _ = Api::<Namespace>::all(admin.clone())
            .delete(&ns, &DeleteParams::default())
            .await;
    }
    result
}

/// One emulated cluster in namespace `ns`: nodes `<ns>-n-NN` labelled `cnimig.io/e2e=<ns>`,
/// `cilium-config` (migration mode), the emulator, the workloads, all pods Ready and every
/// budget allowing a disruption. Returns the emulator and the number of pods.
async fn emulated_cluster(
    admin: &Client,
    ns: &str,
    nodes: usize,
    pods_per_node: usize,
    cfg: &MigrationConfig,
) -> Result<(cnimig_emu::EmuHandle, usize)> {
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await
        .with_context(|| format!("create namespace {ns}"))?;
    let live = rendered_config(cfg, ValueInputs::default(), CiliumPhase::Migration);
    cnimig_emu::setup::apply(
        admin,
        &json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "cilium-config", "namespace": ns},
                "data": serde_json::to_value(&live)?}),
    )
    .await?;
    let mut ecfg = cnimig_emu::EmuConfig::new(&format!("{ns}-n"), nodes);
    ecfg.cilium_namespace = ns.to_string();
    ecfg.node_labels = BTreeMap::from([("cnimig.io/e2e".to_string(), ns.to_string())]);
    let emu = cnimig_emu::start(admin.clone(), ecfg).await?;
    let expected = workloads(admin, ns, nodes, pods_per_node).await?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    wait_for(
        "pods Running and Ready",
        Duration::from_secs(300),
        || async {
            let l = pods.list(&ListParams::default()).await.ok()?;
            let ready = l
                .items
                .iter()
                .filter(|p| ready(p) && p.metadata.deletion_timestamp.is_none())
                .count();
            (ready == expected).then_some(())
        },
    )
    .await?;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), ns);
    wait_for(
        "budgets with disruptions allowed",
        Duration::from_secs(60),
        || async {
            let l = pdbs.list(&ListParams::default()).await.ok()?;
            (l.items.len() == 4
                && l.items.iter().all(|p| {
                    p.status
                        .as_ref()
                        .is_some_and(|s| s.disruptions_allowed >= 1)
                }))
            .then_some(())
        },
    )
    .await?;
    Ok((emu, expected))
}

async fn measure(
    args: &Args,
    audit_log: &std::path::Path,
    admin: &Client,
    admin_config: &Config,
    ns: &str,
) -> Result<()> {
    cnimig_emu::setup::install_crds(admin).await?;
    cnimig_emu::setup::apply_yaml(admin, cnimig_emu::setup::RBAC).await?;
    cnimig_emu::setup::calico_objects(admin).await?;
    let mut cfg = MigrationConfig::new("10.245.0.0/16".parse()?);
    cfg.scope = NodeScope::Selector(LabelSelector {
        match_labels: BTreeMap::from([("cnimig.io/e2e".to_string(), ns.to_string())]),
        match_expressions: Vec::new(),
    });
    cfg.max_in_flight = args.max_in_flight;
    cfg.poll_interval = Duration::from_millis(args.poll_ms);
    cfg.drain_timeout = Duration::from_secs(180);
    cfg.step_timeout = Duration::from_secs(90);
    let (emu, expected) = emulated_cluster(admin, ns, args.nodes, args.pods_per_node, &cfg).await?;

    // cnimig as its ServiceAccount, with a User-Agent of its own.
    let agent = format!("cnimig-api-cost/{ns}");
    let mut sa =
        cnimig_emu::setup::service_account_config(admin, admin_config, "kube-system", "cnimig")
            .await?;
    sa.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_str(&agent)?,
    ));
    let opts = KubeOptions {
        cilium_namespace: ns.to_string(),
        system_namespace: ns.to_string(),
        lock_name: format!("cnimig-lock-{ns}"),
        node_selector: Some(format!("cnimig.io/e2e={ns}")),
        ..KubeOptions::default()
    };
    let cluster = KubeCluster::new(sa, opts)?;
    let orch = Orchestrator::new(
        Ports::from_one(cluster.clone()),
        cfg.clone(),
        RunOptions {
            holder: format!("api-cost-{ns}"),
            ..RunOptions::default()
        },
    );

    // The measured window: plan and run. Nothing else uses admin in it but the emulator.
    let audit_start = std::fs::metadata(audit_log)?.len();
    let metrics_before = metrics::scrape(admin).await?;
    let started = tokio::time::Instant::now();
    let (_, plan) = orch.plan().await?;
    let fails: Vec<String> = plan
        .preflight
        .failures()
        .map(|c| format!("{}: {}", c.id, c.message))
        .collect();
    if !fails.is_empty() {
        bail!("preflight failed: {fails:#?}");
    }
    let report = tokio::time::timeout(
        Duration::from_secs(900),
        orch.run(&plan, &cnimig_core::events::Discard),
    )
    .await
    .context("the migration did not finish within 15 minutes")??;
    let elapsed = started.elapsed();
    let metrics_after = metrics::scrape(admin).await?;
    emu.stop();
    let bytes = std::fs::read(audit_log)?;
    let window = String::from_utf8_lossy(&bytes[usize::try_from(audit_start)?.min(bytes.len())..])
        .into_owned();

    let done = report.count(Phase::Done);
    println!(
        "{done} of {} emulated nodes migrated in {elapsed:.1?} (max {} in flight, {} pods)",
        args.nodes, args.max_in_flight, expected
    );
    if done == 0 {
        bail!("no node migrated: {report:#?}");
    }
    let per = |v: f64| v / done as f64;
    let ours = metrics::audit_counts_by_agent(&window, &agent);
    let total: u64 = ours.values().sum();
    println!("\ncnimig's requests (audit log, User-Agent {agent}), plan and run:");
    println!("{:<40} {:>7} {:>9}", "verb resource", "total", "per node");
    let mut rows: Vec<_> = ours.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (k, v) in rows {
        println!("{k:<40} {v:>7} {:>9.1}", per(*v as f64));
    }
    println!("{:<40} {total:>7} {:>9.1}", "all", per(total as f64));

    let users = metrics::audit_users(&window);
    let admin_user =
        std::env::var("CNIMIG_TESTENV_ADMIN_USER").unwrap_or_else(|_| "kubernetes-admin".into());
    let emulator = users.get(&admin_user).copied().unwrap_or(0);
    let audited: u64 = users.values().sum();
    let all: f64 = metrics::delta(&metrics_before, &metrics_after)
        .values()
        .sum();
    println!("\nevery client in the same window:");
    println!(
        "  cnimig (its User-Agent)                 {total:>7} {:>9.1} per node",
        per(total as f64)
    );
    println!(
        "  {:<38} {emulator:>7} {:>9.1} per node",
        format!("emulator (user {admin_user})"),
        per(emulator as f64)
    );
    println!(
        "  controllers, scheduler, others          {:>7} {:>9.1} per node",
        audited.saturating_sub(total + emulator),
        per(audited.saturating_sub(total + emulator) as f64)
    );
    println!("  audit log, all users                    {audited:>7}");
    println!(
        "  apiserver_request_total delta           {all:>7.0}   (all clients; counts each watch when it ends)"
    );
    let unfiltered = metrics::unfiltered_pod_reads(&window, &agent);
    println!(
        "\ncnimig's cluster-wide pod LIST/WATCH without a field selector: {} ({})",
        unfiltered.len(),
        if unfiltered.is_empty() {
            "none".to_string()
        } else {
            unfiltered.join(", ")
        }
    );
    let Some(kubectl) = &args.kubectl else {
        return Ok(());
    };
    let ours_per_node = per(total as f64);
    let kns = format!("{ns}-k");
    let baseline = kubectl_baseline(args, kubectl, audit_log, admin, &kns, &cfg).await?;
    println!(
        "\n| nodes | cnimig per node | kubectl per node | cnimig / kubectl |\n|---:|---:|---:|---:|\n| {} | {ours_per_node:.1} | {baseline:.1} | {:.2} |",
        args.nodes,
        ours_per_node / baseline
    );
    Ok(())
}

/// The source procedure's per-node kubectl commands against a second emulated cluster in
/// namespace `ns`; prints its requests by verb and resource and returns the requests per node.
async fn kubectl_baseline(
    args: &Args,
    kubectl: &std::path::Path,
    audit_log: &std::path::Path,
    admin: &Client,
    ns: &str,
    cfg: &MigrationConfig,
) -> Result<f64> {
    let (emu, expected) = emulated_cluster(admin, ns, args.nodes, args.pods_per_node, cfg).await?;
    // The node config the procedure deploys before its per-node steps (not measured).
    let mut node_config =
        cnimig_core::cilium::CiliumNodeConfig::for_migration(cfg, ValueInputs::default())
            .to_object(cnimig_core::cilium::NodeConfigApi::V2);
    node_config["metadata"]["namespace"] = json!(ns);
    cnimig_emu::setup::apply(admin, &node_config).await?;
    let kubeconfig = std::env::var_os("KUBECONFIG")
        .context("KUBECONFIG unset: source the test control plane's env file")?;
    let cache = std::env::temp_dir().join(format!("{ns}-kubectl-cache"));
    let k = Kubectl {
        bin: kubectl.to_path_buf(),
        kubeconfig: kubeconfig.into(),
        cache: cache.clone(),
        invocations: std::cell::Cell::new(0),
    };
    // Warm the discovery cache, as after a person's first command.
    k.run(&["api-resources", "-o", "name"])?;

    let audit_start = std::fs::metadata(audit_log)?.len();
    let started = tokio::time::Instant::now();
    let label = format!("{}=true", cfg.migration_label);
    for i in 0..args.nodes {
        let node = format!("{ns}-n-{i:02}");
        k.run(&[
            "drain",
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            &node,
        ])?;
        k.run(&["label", "node", &node, "--overwrite", &label])?;
        k.run(&[
            "-n",
            ns,
            "delete",
            "pod",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-l",
            "k8s-app=cilium",
            "--wait=false",
        ])?;
        k.run(&["-n", ns, "rollout", "status", "ds/cilium", "-w"])?;
        k.run(&["get", "-o", "wide", "node", &node])?;
        k.run(&["uncordon", &node])?;
        let listing = k.run(&[
            "get",
            "pods",
            "--all-namespaces",
            "-o",
            "wide",
            "--field-selector",
            &format!("spec.nodeName={node}"),
        ])?;
        for line in listing.lines().skip(1) {
            if line.contains("calico") || line.contains("cilium") {
                continue;
            }
            let mut cols = line.split_whitespace();
            if let (Some(pod_ns), Some(pod)) = (cols.next(), cols.next()) {
                k.run(&[
                    "delete",
                    "pod",
                    "--grace-period=0",
                    "--wait=false",
                    pod,
                    "-n",
                    pod_ns,
                ])?;
            }
        }
    }
    let elapsed = started.elapsed();
    emu.stop();
    let _ = std::fs::remove_dir_all(&cache);
    let bytes = std::fs::read(audit_log)?;
    let window = String::from_utf8_lossy(&bytes[usize::try_from(audit_start)?.min(bytes.len())..])
        .into_owned();
    let theirs = metrics::audit_counts_by_agent_prefix(&window, "kubectl/");
    let total: u64 = theirs.values().sum();
    let per = |v: u64| v as f64 / args.nodes as f64;
    println!(
        "\nthe source procedure's kubectl commands: {} nodes in {elapsed:.1?}, one at a time ({} pods), \
         {} kubectl invocations",
        args.nodes,
        expected,
        k.invocations.get()
    );
    println!("{:<40} {:>7} {:>9}", "verb resource", "total", "per node");
    let mut rows: Vec<_> = theirs.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (key, v) in rows {
        println!("{key:<40} {v:>7} {:>9.1}", per(*v));
    }
    println!("{:<40} {total:>7} {:>9.1}", "all", per(total));
    if total == 0 {
        bail!(
            "no kubectl request in the audit log window: is the audit log {} this control plane's?",
            audit_log.display()
        );
    }
    Ok(per(total))
}

/// A kubectl binary run against the test control plane with its own discovery cache.
struct Kubectl {
    bin: std::path::PathBuf,
    kubeconfig: std::path::PathBuf,
    cache: std::path::PathBuf,
    invocations: std::cell::Cell<u32>,
}

impl Kubectl {
    /// Runs one command to its end; its stdout, or an error with its stderr.
    fn run(&self, args: &[&str]) -> Result<String> {
        self.invocations.set(self.invocations.get() + 1);
        // Blocking, off the runtime's workers, so the emulator keeps running meanwhile.
        let out = tokio::task::block_in_place(|| {
            std::process::Command::new(&self.bin)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .arg("--cache-dir")
                .arg(&self.cache)
                .args(args)
                .output()
        })
        .with_context(|| format!("run {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while check().await.is_none() {
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The workloads: about `per_node` pods a node in three Deployments (half, a quarter, a
/// quarter) and a StatefulSet of 3, each under a budget, and the Cilium and Calico agents on
/// every node. Returns the number of pods.
async fn workloads(admin: &Client, ns: &str, nodes: usize, per_node: usize) -> Result<usize> {
    let total = nodes * per_node;
    let template = |app: &str| -> Value {
        json!({"metadata": {"labels": {"app": app}},
               "spec": {"nodeSelector": {"cnimig.io/e2e": ns}, "terminationGracePeriodSeconds": 5,
                        "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}})
    };
    let mut objs = Vec::new();
    let mut expected = 0;
    for (name, replicas) in [
        ("web", (total / 2).max(2)),
        ("api", (total / 4).max(2)),
        ("cache", (total / 4).max(2)),
    ] {
        objs.push(json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}}, "template": template(name)}}));
        objs.push(
            json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": name}}}}),
        );
        expected += replicas;
    }
    objs.push(json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": ns},
        "spec": {"replicas": 3, "serviceName": "db", "podManagementPolicy": "Parallel",
                 "selector": {"matchLabels": {"app": "db"}}, "template": template("db")}}));
    objs.push(
        json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "db", "namespace": ns},
        "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "db"}}}}),
    );
    expected += 3;
    for (name, label) in [("cilium", "cilium"), ("calico-node", "calico-node")] {
        objs.push(json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"matchLabels": {"k8s-app": label}},
                     "template": {"metadata": {"labels": {"k8s-app": label}},
                        "spec": {"hostNetwork": true, "nodeSelector": {"cnimig.io/e2e": ns},
                                 "terminationGracePeriodSeconds": 1,
                                 "tolerations": [{"operator": "Exists"}],
                                 "containers": [{"name": label, "image": "registry.k8s.io/pause:3.10"}]}}}}));
        expected += nodes;
    }
    for o in objs {
        cnimig_emu::setup::apply(admin, &o).await?;
    }
    Ok(expected)
}
