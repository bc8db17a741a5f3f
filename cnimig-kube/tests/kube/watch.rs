//! Issue #5: holding the run lock, the adapter's watch caches (Nodes, budgets, each node's pods)
//! get their initial state from a streaming list, one WATCH each and no LIST, on a server with
//! the `WatchList` feature gate on (the test control plane, v1.34). On a server that refuses
//! streaming lists the adapter probes once and falls back to LIST then WATCH: the test asks the
//! server first and checks whichever applies. Counted from the audit log by the adapter's own
//! User-Agent.

use std::collections::BTreeMap;
use std::time::Duration;

use cnimig_core::model::{NodeName, Time};
use cnimig_core::ports::{Cluster, LockOutcome, StateStore};
use kube::Client;
use serde_json::json;

use crate::common::{self, create_node, create_pod, labels, unique, wait_until};

/// Whether the API server streams lists: one streaming WATCH of `ns`'s ConfigMaps as admin,
/// closed by the server after a second.
async fn server_streams_lists(admin: &Client, ns: &str) -> bool {
    let uri = format!(
        "/api/v1/namespaces/{ns}/configmaps?watch=true&sendInitialEvents=true\
         &resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1"
    );
    let req = http::Request::get(uri).body(Vec::new()).unwrap();
    match admin.request_text(req).await {
        Ok(body) => {
            assert!(
                body.contains("k8s.io/initial-events-end"),
                "a streaming list without its end bookmark: {body}"
            );
            true
        }
        Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("sendInitialEvents") => {
            false
        }
        Err(e) => panic!("streaming list probe: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_caches_stream_their_lists_or_fall_back_once() {
    let env = crate::env_or_skip!();
    let Some(audit) = std::env::var_os("CNIMIG_TESTENV_AUDIT_LOG") else {
        panic!("CNIMIG_TESTENV_AUDIT_LOG unset: source the test control plane's env file");
    };
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "watch", |ns| async move {
        let streams = server_streams_lists(&admin, &ns).await;
        let names = [unique("wl"), unique("wl")];
        for (i, n) in names.iter().enumerate() {
            create_node(&admin, n, labels(&[("cnimig.io/watch", &ns)])).await;
            create_pod(&admin, &ns, &format!("p{i}"), n, json!({"metadata": {"labels": {"app": "web"}}})).await;
        }
        cnimig_emu::setup::apply(
            &admin,
            &json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                    "metadata": {"name": "web", "namespace": ns},
                    "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}}}),
        )
        .await
        .unwrap();

        let agent = format!("cnimig-watch-test/{ns}");
        let mut sa = env.sa_config.clone();
        sa.headers.push((http::header::USER_AGENT, http::HeaderValue::from_str(&agent).unwrap()));
        let mut opts = common::opts(&ns);
        opts.node_selector = Some(format!("cnimig.io/watch={ns}"));
        let cluster = cnimig_kube::KubeCluster::new(sa, opts).unwrap();
        let nodes: Vec<NodeName> = names.iter().map(|n| NodeName::new(n.clone()).unwrap()).collect();

        let start = std::fs::metadata(&audit).map_or(0, |m| m.len());
        let holder = unique("holder");
        let got = cluster.acquire_lock(&holder, Time(0), Duration::from_secs(60)).await.unwrap();
        assert!(matches!(got, LockOutcome::Acquired), "{got:?}");
        // Every read from the caches, and right.
        let mut seen = cluster.node_names().await.unwrap();
        seen.sort();
        let mut want = nodes.clone();
        want.sort();
        assert_eq!(seen, want);
        for (i, n) in nodes.iter().enumerate() {
            let v = cluster.node_view(n).await.unwrap();
            let pods: Vec<&str> = v.pods.iter().map(|p| p.pod.name.as_str()).collect();
            assert_eq!(pods, [format!("p{i}")], "pods on {n}");
        }
        let budgets = cluster.budget_view(&nodes).await.unwrap();
        assert_eq!(budgets.per_node.len(), 2, "{budgets:?}");
        // A change after the initial state arrives through the same WATCH.
        create_pod(&admin, &ns, "late", names[0].as_str(), json!({})).await;
        wait_until("the late pod in the cache", Duration::from_secs(30), || {
            let (cluster, node) = (cluster.clone(), nodes[0].clone());
            async move {
                cluster.node_view(&node).await.is_ok_and(|v| v.pods.iter().any(|p| p.pod.name == "late"))
            }
        })
        .await;
        cluster.release_lock(&holder).await.unwrap();

        let bytes = std::fs::read(&audit).unwrap();
        let window = String::from_utf8_lossy(&bytes[usize::try_from(start).unwrap().min(bytes.len())..]).into_owned();
        let ours = cnimig_kube::metrics::audit_counts_by_agent(&window, &agent);
        let n = |k: &str| ours.get(k).copied().unwrap_or(0);
        let streamed = window
            .lines()
            .filter(|l| l.contains(&agent) && l.contains("\"verb\":\"watch\"") && l.contains("sendInitialEvents=true"))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["auditID"].as_str().map(str::to_string))
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let counts: BTreeMap<&str, u64> = ["list nodes", "watch nodes", "list pods", "watch pods",
            "list poddisruptionbudgets", "watch poddisruptionbudgets"]
            .into_iter()
            .map(|k| (k, n(k)))
            .collect();
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "watch caches (server streams lists: {streams}): {counts:?}, {streamed} streaming WATCHes");
        if streams {
            // One WATCH per cache (nodes, budgets, two nodes' pods), each a streaming list; no LIST.
            assert_eq!((n("list nodes"), n("list pods"), n("list poddisruptionbudgets")), (0, 0, 0), "{ours:?}");
            assert_eq!((n("watch nodes"), n("watch pods"), n("watch poddisruptionbudgets")), (1, 2, 1), "{ours:?}");
            assert_eq!(streamed, 4, "{ours:?}");
        } else {
            // One refused streaming WATCH for the adapter, then LIST and WATCH per cache.
            assert_eq!(streamed, 1, "the adapter probed more than once: {ours:?}");
            assert_eq!((n("list nodes"), n("list pods"), n("list poddisruptionbudgets")), (1, 2, 1), "{ours:?}");
            assert_eq!(
                n("watch nodes") + n("watch pods") + n("watch poddisruptionbudgets"),
                4 + 1,
                "{ours:?}"
            );
        }
        for name in &names {
            common::delete_node(&admin, name).await;
        }
    })
    .await;
}
