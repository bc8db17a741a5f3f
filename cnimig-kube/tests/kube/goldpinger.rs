//! Goldpinger verification against the real control plane: the library's Goldpinger DaemonSet
//! runs on emulated nodes, the emulator answers `/check_all` from the shared reachability model,
//! and a firewall-like break injected into that model (Cilium's tunnel port dropped between
//! nodes) is caught after the first node moves to Cilium, which then rolls back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cnimig_core::cilium::{CiliumPhase, ValueInputs, rendered_config};
use cnimig_core::config::{MigrationConfig, NodeScope};
use cnimig_core::model::LabelSelector;
use cnimig_core::orchestrator::{Orchestrator, Ports, RunOptions};
use cnimig_core::ports::{Verification, Verifier};
use cnimig_kube::goldpinger::{GoldpingerOptions, GoldpingerSource, GoldpingerVerifier, manifests};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::json;

use crate::common::{self, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firewall_break_is_caught_by_goldpinger_and_the_node_rolls_back() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "gp", |ns| async move {
        let mut cfg = MigrationConfig::new("10.245.0.0/16".parse().unwrap());
        cfg.scope = NodeScope::Selector(LabelSelector {
            match_labels: BTreeMap::from([("cnimig.io/e2e".to_string(), ns.clone())]),
            match_expressions: Vec::new(),
        });
        cfg.poll_interval = Duration::from_millis(300);
        cfg.drain_timeout = Duration::from_secs(60);
        cfg.step_timeout = Duration::from_secs(10);
        crate::calico::calico_objects(&admin).await;
        let (ecfg, live) = common::emulated_cluster(&admin, &ns, &cfg, 3).await;
        let node_names = ecfg.nodes.clone();
        let emu = cnimig_emu::start(admin.clone(), ecfg).await.unwrap();

        // The library's Goldpinger, pinned to this test's nodes.
        let gopts = GoldpingerOptions {
            namespace: ns.clone(),
            name: format!("gp-{ns}"),
            ..GoldpingerOptions::default()
        };
        let mut m = manifests(&gopts);
        if let Some(spec) = m
            .daemon_set
            .spec
            .as_mut()
            .and_then(|s| s.template.spec.as_mut())
        {
            spec.node_selector = Some(BTreeMap::from([("cnimig.io/e2e".to_string(), ns.clone())]));
        }
        // Deployed as cnimig's ServiceAccount with deploy/rbac-verify.yaml.
        cnimig_emu::setup::apply_yaml(&admin, include_str!("../../../deploy/rbac-verify.yaml"))
            .await
            .unwrap();
        let sa = kube::Client::try_from(env.sa_config.clone()).unwrap();
        // (RBAC changes reach the authorizer through an informer: allow it a moment.)
        wait_until(
            "Goldpinger applied as the ServiceAccount",
            Duration::from_secs(10),
            || {
                let (m, sa) = (m.clone(), sa.clone());
                async move {
                    m.apply(&sa)
                        .await
                        .map_err(|e| eprintln!("apply: {e}"))
                        .is_ok()
                }
            },
        )
        .await;
        for ds in
            cnimig_emu::setup::agent_daemon_sets(&ns, "registry.k8s.io/pause:3.10", &json!([]))
        {
            cnimig_emu::setup::apply(&admin, &ds).await.unwrap();
        }
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
        cnimig_emu::setup::wait_ready_pods(&admin, &ns, 9, Duration::from_secs(120))
            .await
            .unwrap();

        let mut gcfg = cnimig_emu::goldpinger::GoldpingerEmuConfig::new(&ns);
        gcfg.selector = format!("app=gp-{ns}");
        gcfg.cilium_namespace = ns.clone();
        let gp = cnimig_emu::goldpinger::serve(admin.clone(), gcfg)
            .await
            .unwrap();

        let mut opts = common::opts(&ns);
        opts.node_selector = Some(format!("cnimig.io/e2e={ns}"));
        let cluster = env.cluster(opts);
        let verifier = GoldpingerVerifier::new(
            cluster.clone(),
            GoldpingerOptions {
                source: GoldpingerSource::Url(gp.check_all_url()),
                window: Duration::from_secs(3),
                interval: Duration::from_millis(500),
                ..gopts.clone()
            },
        )
        .unwrap();
        let r = verifier.check_all().await.unwrap();
        assert_eq!(r.hosts.len(), 3, "one Goldpinger pod per node: {r:?}");
        assert_eq!(
            verifier.verify_cluster().await.unwrap(),
            Verification::Healthy
        );

        // A security group that does not open Cilium's tunnel port between the nodes: harmless
        // while every pod is on Calico, so the check before the first node passes.
        let port = cnimig_sim::pairs::tunnel_port(&live);
        gp.firewall.lock().unwrap().blocked_udp_ports.insert(port);
        assert_eq!(
            verifier.verify_cluster().await.unwrap(),
            Verification::Healthy
        );

        let mut ports = Ports::from_one(cluster.clone());
        ports.verifier = Arc::new(verifier.clone());
        let orch = Orchestrator::new(
            ports,
            cfg.clone(),
            RunOptions {
                holder: format!("gp-{ns}"),
                ..RunOptions::default()
            },
        );
        let report = common::plan_and_run(&orch, Duration::from_secs(300)).await;
        let failed = common::the_rolled_back_node(&report);
        let cause = failed.cause.clone().unwrap_or_default();
        assert!(cause.contains("step Verify"), "{cause}");
        assert!(
            cause.contains("cannot reach"),
            "the failing pairs are named: {cause}"
        );
        assert!(cause.contains(&format!("UDP port {port}")), "{cause}");
        assert!(
            cause.contains(failed.node.as_str()),
            "the migrated node is named: {cause}"
        );

        // Back on Calico everywhere, the same break is latent again; without it, healthy.
        assert_eq!(
            verifier.verify_cluster().await.unwrap(),
            Verification::Healthy
        );
        gp.firewall.lock().unwrap().blocked_udp_ports.clear();
        assert_eq!(
            verifier.verify_cluster().await.unwrap(),
            Verification::Healthy
        );
        let pool: ipnet::Ipv4Net = "10.245.0.0/16".parse().unwrap();
        for p in pods.list(&ListParams::default()).await.unwrap().items {
            let ip: Option<std::net::Ipv4Addr> = p
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|s| s.parse().ok());
            assert!(
                !ip.is_some_and(|ip| pool.contains(&ip)),
                "pod {} still on Cilium after the rollback",
                p.name_any()
            );
        }
        drop(gp);
        emu.stop();
        for n in &node_names {
            common::delete_node(&admin, n).await;
        }
    })
    .await;
}

/// A Goldpinger URL that answers something else is a clear error, not a pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_goldpinger_url_is_an_error() {
    let env = crate::env_or_skip!();
    let cluster = env.cluster(common::opts("default"));
    assert!(
        GoldpingerVerifier::new(
            cluster.clone(),
            GoldpingerOptions {
                source: GoldpingerSource::Url("https://x/check_all".into()),
                ..GoldpingerOptions::default()
            }
        )
        .is_err()
    );
    let v = GoldpingerVerifier::new(
        cluster,
        GoldpingerOptions {
            source: GoldpingerSource::Url("http://127.0.0.1:1/check_all".into()),
            window: Duration::from_millis(300),
            interval: Duration::from_millis(100),
            ..GoldpingerOptions::default()
        },
    )
    .unwrap();
    assert!(v.verify_cluster().await.is_err());
}

/// The default source, the API server's service proxy, end to end: `/check_all` read through
/// `GET …/services/NAME:8080/proxy/check_all` as cnimig's ServiceAccount with
/// `deploy/rbac-verify.yaml`, equal to what the endpoint answers directly, and a break between
/// two nodes reported through the proxy with both nodes named.
///
/// The emulated Goldpinger listens on this machine's routable address (the proxy refuses
/// loopback), behind a Service without selector whose Endpoints name a host-network pod with
/// that address (the proxy checks the `targetRef` pod's IPs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goldpinger_is_read_through_the_api_server_service_proxy() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "gpx", |ns| async move {
        let (gp, nodes) = goldpinger_behind_a_service(&admin, &ns).await;
        cnimig_emu::setup::apply_yaml(&admin, include_str!("../../../deploy/rbac-verify.yaml"))
            .await
            .unwrap();
        let mut opts = common::opts(&ns);
        opts.node_selector = Some(format!("cnimig.io/e2e={ns}"));
        let gopts = GoldpingerOptions {
            namespace: ns.clone(),
            name: "gpx".into(),
            window: Duration::from_secs(2),
            interval: Duration::from_millis(500),
            request_timeout: Duration::from_secs(5),
            ..GoldpingerOptions::default()
        };
        assert_eq!(
            gopts.source,
            GoldpingerSource::ServiceProxy,
            "the default source"
        );
        let proxied = GoldpingerVerifier::new(env.cluster(opts.clone()), gopts.clone()).unwrap();
        let direct = GoldpingerVerifier::new(
            env.cluster(opts),
            GoldpingerOptions {
                source: GoldpingerSource::Url(gp.check_all_url()),
                ..gopts
            },
        )
        .unwrap();
        // (RBAC and the Endpoints reach the API server through informers: allow them a moment.)
        wait_until(
            "/check_all through the service proxy",
            Duration::from_secs(20),
            || {
                let proxied = proxied.clone();
                async move {
                    proxied
                        .check_all()
                        .await
                        .map_err(|e| eprintln!("proxy: {e}"))
                        .is_ok()
                }
            },
        )
        .await;
        let through_proxy = proxied.check_all().await.unwrap();
        assert_eq!(through_proxy.hosts.len(), 3, "{through_proxy:?}");
        assert_eq!(through_proxy, direct.check_all().await.unwrap());
        assert_eq!(
            proxied.verify_cluster().await.unwrap(),
            Verification::Healthy
        );

        // Everything dropped from node 0 to node 2: read through the proxy, named.
        gp.firewall
            .lock()
            .unwrap()
            .blocked_node_pairs
            .insert((nodes[0].clone(), nodes[2].clone()));
        let Verification::Unhealthy(problems) = proxied.verify_cluster().await.unwrap() else {
            panic!("the break is not seen through the proxy");
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains(&nodes[0])
                && problems[0].contains(&nodes[2])
                && problems[0].contains("cannot reach"),
            "{problems:?}"
        );
        drop(gp);
        for n in &nodes {
            common::delete_node(&admin, n).await;
        }
    })
    .await;
}

/// Three Ready nodes labelled `cnimig.io/e2e=<ns>` (`<ns>-n0`..`n2`), one Goldpinger pod
/// (`app=gpx`) on each, and the emulated Goldpinger endpoint on this machine's routable address
/// (the API server's service proxy refuses loopback) behind Service `gpx` (port 8080, no
/// selector) whose Endpoints name a host-network pod holding that address (the proxy only goes
/// to an address its `targetRef` pod has). Returns the endpoint and the node names.
pub(crate) async fn goldpinger_behind_a_service(
    admin: &kube::Client,
    ns: &str,
) -> (cnimig_emu::goldpinger::GoldpingerEmu, Vec<String>) {
    let (admin, ns) = (admin.clone(), ns.to_string());
    let host = common::routable_ipv4();
    let live = rendered_config(
        &MigrationConfig::new("10.245.0.0/16".parse().unwrap()),
        ValueInputs::default(),
        CiliumPhase::Migration,
    );
    common::cilium_config(&admin, &ns, serde_json::to_value(&live).unwrap()).await;
    let nodes: Vec<String> = (0..3).map(|i| format!("{ns}-n{i}")).collect();
    let node_api: Api<k8s_openapi::api::core::v1::Node> = Api::all(admin.clone());
    for (i, n) in nodes.iter().enumerate() {
        common::create_node(&admin, n, common::labels(&[("cnimig.io/e2e", &ns)])).await;
        node_api
            .patch_status(n, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(json!({
                "status": {"addresses": [{"type": "InternalIP", "address": format!("192.0.2.{}", 20 + i)}]}})))
            .await
            .unwrap();
        let pod = format!("gp-{i}");
        common::create_pod(
            &admin,
            &ns,
            &pod,
            n,
            json!({"metadata": {"labels": {"app": "gpx"}}}),
        )
        .await;
        common::mark_running(&admin, &ns, &pod, &format!("10.42.{i}.10")).await;
    }
    let mut gcfg = cnimig_emu::goldpinger::GoldpingerEmuConfig::new(&ns);
    gcfg.selector = "app=gpx".into();
    gcfg.cilium_namespace = ns.clone();
    gcfg.listen = std::net::SocketAddr::from((host, 0));
    let gp = cnimig_emu::goldpinger::serve(admin.clone(), gcfg)
        .await
        .unwrap();
    // The proxy only goes to an address whose `targetRef` pod has that IP: a host-network
    // pod on the first node stands for the endpoint (not labelled as Goldpinger, so not
    // one of the pods `/check_all` reports).
    common::create_pod(
        &admin,
        &ns,
        "gpx-endpoint",
        &nodes[0],
        json!({"spec": {"hostNetwork": true}}),
    )
    .await;
    common::mark_running(&admin, &ns, "gpx-endpoint", &host.to_string()).await;
    let target = i32::from(gp.addr.port());
    for o in [
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "gpx", "namespace": ns},
               "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": target}]}}),
        json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "gpx", "namespace": ns},
               "subsets": [{"addresses": [{"ip": host.to_string(),
                                           "targetRef": {"kind": "Pod", "namespace": ns, "name": "gpx-endpoint"}}],
                            "ports": [{"name": "http", "port": target}]}]}),
    ] {
        cnimig_emu::setup::apply(&admin, &o).await.unwrap();
    }
    (gp, nodes)
}
