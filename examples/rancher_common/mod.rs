//! What `rancher_plan` and `rancher_migrate` share: connecting to the downstream cluster (and
//! the Rancher management cluster), and printing both plans.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cnimig_core::config::MigrationConfig;
use cnimig_core::orchestrator::{Orchestrator, Ports, RunOptions};
use cnimig_core::plan::Plan;
use cnimig_kube::{KubeCluster, KubeOptions};
use cnimig_rancher::plan::RancherPlan;
use cnimig_rancher::{Management, RancherCluster, RancherOptions};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Where the clusters are and the run's choices.
#[derive(clap::Args, Debug)]
pub struct Conn {
    /// Kubeconfig of the cluster to migrate (default: $KUBECONFIG, ~/.kube/config). Use a direct
    /// one, not Rancher's proxy URL, which drops while the cluster agent reconnects.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Context in that kubeconfig (default: its current context).
    #[arg(long)]
    pub context: Option<String>,
    /// Kubeconfig of the Rancher management cluster: lets cnimig check and set RKE1's
    /// network.plugin, RKE2's chartValues and cni, and read Fleet Bundles.
    #[arg(long)]
    pub management_kubeconfig: Option<PathBuf>,
    /// Context in the management kubeconfig.
    #[arg(long)]
    pub management_context: Option<String>,
    /// This cluster in the management cluster: `c-xxxxx` (RKE1, management.cattle.io Cluster) or
    /// `NAMESPACE/NAME` (RKE2, provisioning.cattle.io Cluster, usually fleet-default/NAME).
    #[arg(long)]
    pub cluster: Option<String>,
    /// Pause Argo CD auto-sync of Applications that would revert the changes, restore it at the
    /// end.
    #[arg(long)]
    pub pause_gitops: bool,
    /// What an RKE2 provisioning Cluster's cni becomes once every node is on Cilium.
    #[arg(long, default_value = "none")]
    pub rke2_cni_target: String,
    /// The migration config (MigrationConfig YAML); without it, --pod-cidr and defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Cilium's new pod CIDR (when no --config).
    #[arg(long, default_value = "10.245.0.0/16")]
    pub pod_cidr: ipnet::Ipv4Net,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

async fn kube_config(path: Option<&PathBuf>, context: Option<&String>) -> Result<kube::Config> {
    let opts = KubeConfigOptions {
        context: context.cloned(),
        ..KubeConfigOptions::default()
    };
    Ok(match path {
        Some(p) => {
            let kc = Kubeconfig::read_from(p)
                .with_context(|| format!("read kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &opts)
                .await
                .with_context(|| format!("use kubeconfig {}", p.display()))?
        }
        None => kube::Config::from_kubeconfig(&opts)
            .await
            .context("read the kubeconfig ($KUBECONFIG or ~/.kube/config); or pass --kubeconfig")?,
    })
}

/// Everything a run needs.
pub struct Session {
    /// The downstream cluster's client configuration (`rancher_migrate`'s dry run sends with it).
    #[allow(dead_code)]
    pub config: kube::Config,
    pub kube: KubeCluster,
    pub rancher: RancherCluster,
    pub cfg: MigrationConfig,
}

/// Connects, validating the arguments before any request.
pub async fn connect(c: &Conn) -> Result<Session> {
    if c.management_kubeconfig.is_some() != c.cluster.is_some() {
        bail!(
            "--management-kubeconfig and --cluster go together: the first says where Rancher is, the second which cluster this is there"
        );
    }
    if !["none", "cilium"].contains(&c.rke2_cni_target.as_str()) {
        bail!(
            "--rke2-cni-target must be none (Cilium stays your Helm release) or cilium (RKE2's chart), not {:?}",
            c.rke2_cni_target
        );
    }
    let cfg = match &c.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
            MigrationConfig::from_yaml(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        }
        None => MigrationConfig::new(c.pod_cidr),
    };
    let config = kube_config(c.kubeconfig.as_ref(), c.context.as_ref()).await?;
    let url = config.cluster_url.to_string();
    let client = cnimig_kube::logged_client(config.clone()).context("build a client")?;
    let kube = KubeCluster::new(config.clone(), KubeOptions::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mgmt = match (&c.management_kubeconfig, &c.cluster) {
        (Some(p), Some(cluster)) => {
            let mc = kube_config(Some(p), c.management_context.as_ref()).await?;
            Some(Management {
                client: cnimig_kube::logged_client(mc).context("build the management client")?,
                cluster: cluster.clone(),
                fleet_namespace: None,
            })
        }
        _ => None,
    };
    let mut opts = RancherOptions::default();
    opts.config.pause_gitops = c.pause_gitops;
    opts.config.rke2_cni_target = c.rke2_cni_target.clone();
    let rancher = RancherCluster::new(client, url, opts, mgmt);
    Ok(Session {
        config,
        kube,
        rancher,
        cfg,
    })
}

/// An orchestrator over the cluster (the verifier wrapped by the caller when it migrates).
pub fn orchestrator(ports: Ports, cfg: &MigrationConfig) -> Orchestrator {
    let holder = format!("rancher-migrate-{}", std::process::id());
    Orchestrator::new(
        ports,
        cfg.clone(),
        RunOptions {
            holder,
            lock_ttl: Duration::from_secs(60),
            ..RunOptions::default()
        },
    )
}

/// Prints both plans.
pub fn print(rplan: &RancherPlan, plan: &Plan, json: bool) -> Result<()> {
    if json {
        let v = serde_json::json!({"rancher": rplan, "migration": plan});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("== Rancher\n{rplan}");
    println!("== Migration");
    for c in &plan.preflight.checks {
        println!("  {c}");
    }
    println!(
        "  order ({} nodes): {}",
        plan.order.len(),
        plan.order
            .iter()
            .map(|n| if n.control_plane {
                format!("{} (control plane)", n.name)
            } else {
                n.name.to_string()
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    for s in &plan.skipped {
        println!("  skipped: {}: {}", s.node, s.reason);
    }
    Ok(())
}
