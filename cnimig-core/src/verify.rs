//! Cluster-wide verification, pure: Goldpinger's `/check_all` result read and judged, and the
//! messages the orchestrator uses when the cluster check fails before the first node or after
//! the last one.
//!
//! Goldpinger runs one pod per node (a DaemonSet); `GET /check_all` on any of them makes every
//! pod call every other pod's `/ping` through pod IPs, and returns (shape from Goldpinger's
//! `swagger.yml`, `CheckAllResults`):
//!
//! ```json
//! {"OK": false, "hosts-healthy": 1, "hosts-number": 2,
//!  "hosts": [{"podName": "gp-a", "hostIP": "10.0.0.1", "podIP": "10.42.0.5"}, …],
//!  "responses": {"gp-a": {"OK": true, "HostIP": "10.0.0.1", "PodIP": "10.42.0.5",
//!                          "response": {"podResults": {"gp-b": {"OK": false, "error": "…"}}}}}}
//! ```
//!
//! [`failing_pairs`] requires every listed pod to have answered and every pod to reach every
//! other one, and names each pair that does not (with the nodes they run on).
//!
//! ```
//! use cnimig_core::verify::{CheckAll, failing_pairs};
//! let json = r#"{"OK": true, "hosts": [{"podName": "gp-a", "hostIP": "10.0.0.1"}],
//!   "responses": {"gp-a": {"OK": true, "response": {"podResults": {"gp-a": {"OK": true}}}}}}"#;
//! let r: CheckAll = serde_json::from_str(json).unwrap();
//! let nodes = [("10.0.0.1".to_string(), "n1".to_string())].into_iter().collect();
//! assert!(failing_pairs(&r, &nodes, &["n1".to_string()]).is_empty());
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// At most this many problems are listed one per line; the rest are counted.
pub const MAX_LISTED: usize = 20;

/// Goldpinger's `CheckAllResults` (the fields cnimig reads).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckAll {
    /// Goldpinger's own verdict (every pair healthy); informational, [`failing_pairs`] decides.
    #[serde(rename = "OK", default)]
    pub ok: bool,
    /// The Goldpinger pods asked.
    #[serde(default)]
    pub hosts: Vec<Host>,
    /// Per asking pod (by pod name), its own check of every other pod.
    #[serde(default)]
    pub responses: BTreeMap<String, SourceResult>,
}

/// One Goldpinger pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// The pod's name.
    #[serde(rename = "podName", default)]
    pub pod_name: String,
    /// Its node's address.
    #[serde(rename = "hostIP", default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    /// Its pod address.
    #[serde(rename = "podIP", default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
}

/// One pod's answer to `/check` (Goldpinger's `CheckAllPodResult`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceResult {
    /// Whether the pod answered.
    #[serde(rename = "OK", default)]
    pub ok: bool,
    /// Its node's address.
    #[serde(rename = "HostIP", default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    /// Its pod address.
    #[serde(rename = "PodIP", default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// What it found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<CheckResults>,
    /// Why it could not be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Goldpinger's `CheckResults`: one pod's calls to the others.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResults {
    /// Per called pod (by pod name).
    #[serde(rename = "podResults", default)]
    pub pod_results: BTreeMap<String, PodResult>,
}

/// Goldpinger's `PodResult`: one call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodResult {
    /// Whether the call succeeded.
    #[serde(rename = "OK", default)]
    pub ok: bool,
    /// The called pod's address.
    #[serde(rename = "PodIP", default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// Its node's address.
    #[serde(rename = "HostIP", default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn label(host: &Host, nodes_by_ip: &BTreeMap<String, String>) -> String {
    let node = host
        .host_ip
        .as_ref()
        .and_then(|ip| nodes_by_ip.get(ip))
        .map_or_else(
            || format!("host {}", host.host_ip.as_deref().unwrap_or("unknown")),
            |n| format!("node {n}"),
        );
    format!("{} ({node})", host.pod_name)
}

/// Every problem in a `/check_all` result: a node of `expected_nodes` with no Goldpinger pod, a
/// pod that did not answer, and every ordered pair of pods where the first could not reach the
/// second, named with their nodes (`nodes_by_ip` maps a node's InternalIP to its name).
/// Empty = every node reaches every node.
#[must_use]
pub fn failing_pairs(
    r: &CheckAll,
    nodes_by_ip: &BTreeMap<String, String>,
    expected_nodes: &[String],
) -> Vec<String> {
    let mut out = Vec::new();
    if r.hosts.is_empty() {
        out.push(
            "Goldpinger listed no pods: is its DaemonSet running and Ready on the nodes?".into(),
        );
        return out;
    }
    let covered: BTreeSet<&String> = r
        .hosts
        .iter()
        .filter_map(|h| h.host_ip.as_ref().and_then(|ip| nodes_by_ip.get(ip)))
        .collect();
    for n in expected_nodes {
        if !covered.contains(n) {
            out.push(format!(
                "node {n} has no Goldpinger pod, so its connectivity is unchecked: the DaemonSet must tolerate the node's taints"
            ));
        }
    }
    for from in &r.hosts {
        let Some(src) = r.responses.get(&from.pod_name) else {
            out.push(format!(
                "{} gave no result: it could not be asked",
                label(from, nodes_by_ip)
            ));
            continue;
        };
        let Some(resp) = src.response.as_ref() else {
            out.push(format!(
                "{} could not be asked: {}",
                label(from, nodes_by_ip),
                src.error.as_deref().unwrap_or("no response")
            ));
            continue;
        };
        for to in &r.hosts {
            match resp.pod_results.get(&to.pod_name) {
                Some(p) if p.ok => {}
                Some(p) => out.push(format!(
                    "{} cannot reach {}: {}",
                    label(from, nodes_by_ip),
                    label(to, nodes_by_ip),
                    p.error.as_deref().unwrap_or("call failed")
                )),
                None => out.push(format!(
                    "{} has no result for {}",
                    label(from, nodes_by_ip),
                    label(to, nodes_by_ip)
                )),
            }
        }
    }
    out
}

/// Caps a list of problems at [`MAX_LISTED`], counting the rest in a last line.
#[must_use]
pub fn capped(mut problems: Vec<String>) -> Vec<String> {
    if problems.len() > MAX_LISTED {
        let more = problems.len() - MAX_LISTED;
        problems.truncate(MAX_LISTED);
        problems.push(format!("… and {more} more"));
    }
    problems
}

/// The orchestrator's message when the cluster check fails before any node is touched.
#[must_use]
pub fn before_first_node(problems: Vec<String>) -> Vec<String> {
    let mut out = vec![
        "the cluster-wide connectivity check failed before any node was touched (nothing was changed); fix these first:".to_string(),
    ];
    out.extend(capped(problems).into_iter().map(|p| format!("  {p}")));
    out
}

/// The orchestrator's message when the cluster check fails after the last node.
#[must_use]
pub fn after_last_node(problems: &[String]) -> String {
    format!(
        "every node finished, but the cluster-wide connectivity check then failed: {}",
        capped(problems.to_vec()).join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(pod: &str, ip: &str) -> Host {
        Host {
            pod_name: pod.into(),
            host_ip: Some(ip.into()),
            pod_ip: None,
        }
    }

    fn result(hosts: &[Host], broken: &[(&str, &str)]) -> CheckAll {
        let mut responses = BTreeMap::new();
        for from in hosts {
            let mut pod_results = BTreeMap::new();
            for to in hosts {
                let bad = broken.contains(&(from.pod_name.as_str(), to.pod_name.as_str()));
                pod_results.insert(
                    to.pod_name.clone(),
                    PodResult {
                        ok: !bad,
                        error: bad.then(|| "context deadline exceeded".to_string()),
                        ..PodResult::default()
                    },
                );
            }
            responses.insert(
                from.pod_name.clone(),
                SourceResult {
                    ok: true,
                    response: Some(CheckResults { pod_results }),
                    ..SourceResult::default()
                },
            );
        }
        CheckAll {
            ok: broken.is_empty(),
            hosts: hosts.to_vec(),
            responses,
        }
    }

    fn nodes() -> BTreeMap<String, String> {
        [("10.0.0.1", "n1"), ("10.0.0.2", "n2"), ("10.0.0.3", "n3")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn names() -> Vec<String> {
        vec!["n1".into(), "n2".into(), "n3".into()]
    }

    #[test]
    fn all_pairs_healthy() {
        let hosts = [
            host("a", "10.0.0.1"),
            host("b", "10.0.0.2"),
            host("c", "10.0.0.3"),
        ];
        assert!(failing_pairs(&result(&hosts, &[]), &nodes(), &names()).is_empty());
    }

    #[test]
    fn a_broken_pair_is_named_with_its_nodes() {
        let hosts = [
            host("a", "10.0.0.1"),
            host("b", "10.0.0.2"),
            host("c", "10.0.0.3"),
        ];
        let p = failing_pairs(&result(&hosts, &[("a", "c")]), &nodes(), &names());
        assert_eq!(
            p,
            vec!["a (node n1) cannot reach c (node n3): context deadline exceeded".to_string()]
        );
    }

    #[test]
    fn a_node_without_a_pod_and_a_silent_pod_are_problems() {
        let hosts = [host("a", "10.0.0.1"), host("b", "10.0.0.2")];
        let mut r = result(&hosts, &[]);
        r.responses.remove("b");
        let p = failing_pairs(&r, &nodes(), &names());
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("node n3 has no Goldpinger pod"));
        assert!(p[1].starts_with("b (node n2) gave no result"));
    }

    #[test]
    fn no_hosts_is_a_problem() {
        let p = failing_pairs(&CheckAll::default(), &nodes(), &names());
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn parses_goldpinger_json() {
        let json = r#"{"OK":false,"hosts-healthy":1,"hosts-number":2,
          "hosts":[{"podName":"gp-a","hostIP":"10.0.0.1","podIP":"10.42.0.5"},
                   {"podName":"gp-b","hostIP":"10.0.0.2","podIP":"10.42.1.5"}],
          "dnsResults":{},
          "responses":{
            "gp-a":{"OK":true,"HostIP":"10.0.0.1","PodIP":"10.42.0.5","status-code":200,
              "response":{"podResults":{"gp-a":{"OK":true,"response-time-ms":1},
                                        "gp-b":{"OK":false,"error":"timeout","status-code":504}}}},
            "gp-b":{"OK":false,"error":"Get http://10.42.1.5:8080/check: timeout"}}}"#;
        let r: CheckAll = serde_json::from_str(json).unwrap();
        let p = failing_pairs(&r, &nodes(), &["n1".into(), "n2".into()]);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0], "gp-a (node n1) cannot reach gp-b (node n2): timeout");
        assert!(p[1].contains("gp-b (node n2) could not be asked: Get http"));
    }

    #[test]
    fn capped_counts_the_rest() {
        let c = capped((0..25).map(|i| i.to_string()).collect());
        assert_eq!(c.len(), MAX_LISTED + 1);
        assert_eq!(c[MAX_LISTED], "… and 5 more");
    }
}
