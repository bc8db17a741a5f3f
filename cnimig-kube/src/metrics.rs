//! Request counting for reports: `apiserver_request_total` from the API server's `/metrics`, and
//! per-user counts from an audit log.
//!
//! `apiserver_request_total` has no client label, so it mixes every client (controllers,
//! emulators, cnimig); count one client's requests from the audit log ([`audit_counts`]).

use std::collections::BTreeMap;

use cnimig_core::ports::PortError;
use kube::Client;

use crate::error::port_error;

/// One sample of `apiserver_request_total`.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSample {
    /// Labels (`verb`, `resource`, `subresource`, `code`, `group`, …).
    pub labels: BTreeMap<String, String>,
    /// The counter's value.
    pub value: f64,
}

impl RequestSample {
    /// A label's value, or `""`.
    #[must_use]
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map_or("", String::as_str)
    }
}

/// GETs `/metrics` from the API server.
///
/// # RBAC
/// `get` on the non-resource URL `/metrics` (not in cnimig's ClusterRole: use an admin or a
/// monitoring identity).
///
/// # Errors
/// Any request failure.
pub async fn scrape(client: &Client) -> Result<String, PortError> {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .map_err(|e| PortError::Invalid {
            what: "build GET /metrics".into(),
            detail: e.to_string(),
        })?;
    client
        .request_text(req)
        .await
        .map_err(|e| port_error("get", "/metrics", e))
}

/// The `apiserver_request_total` samples in a Prometheus text exposition.
#[must_use]
pub fn request_totals(text: &str) -> Vec<RequestSample> {
    text.lines()
        .filter_map(|line| line.strip_prefix("apiserver_request_total{"))
        .filter_map(|rest| {
            let (labels, value) = rest.rsplit_once('}')?;
            let value: f64 = value.split_whitespace().next()?.parse().ok()?;
            let mut map = BTreeMap::new();
            for pair in split_labels(labels) {
                let (k, v) = pair.split_once('=')?;
                map.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
            }
            Some(RequestSample { labels: map, value })
        })
        .collect()
}

fn split_labels(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

/// Sums samples by `VERB resource[/subresource]`.
#[must_use]
pub fn by_verb_resource(samples: &[RequestSample]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in samples {
        let mut key = format!("{} {}", s.label("verb"), s.label("resource"));
        if !s.label("subresource").is_empty() {
            key = format!("{key}/{}", s.label("subresource"));
        }
        *out.entry(key).or_insert(0.0) += s.value;
    }
    out
}

/// The difference `after - before` of two scrapes, by `VERB resource[/subresource]`.
#[must_use]
pub fn delta(before: &str, after: &str) -> BTreeMap<String, f64> {
    let b = by_verb_resource(&request_totals(before));
    let mut a = by_verb_resource(&request_totals(after));
    for (k, v) in a.iter_mut() {
        *v -= b.get(k).copied().unwrap_or(0.0);
    }
    a.retain(|_, v| *v > 0.0);
    a
}

/// Counts the requests of `username` in a JSON-lines audit log, by
/// `verb resource[/subresource]`: each request once, a watch still open included.
#[must_use]
pub fn audit_counts(log: &str, username: &str) -> BTreeMap<String, u64> {
    count_audit(log, |v| v["user"]["username"] == username)
}

/// Counts the requests sent with `User-Agent: user_agent`, like [`audit_counts`].
#[must_use]
pub fn audit_counts_by_agent(log: &str, user_agent: &str) -> BTreeMap<String, u64> {
    count_audit(log, |v| v["userAgent"] == user_agent)
}

/// Counts the requests whose `User-Agent` starts with `prefix` (e.g. `kubectl/`, which
/// every kubectl invocation sends followed by its version), like [`audit_counts`].
#[must_use]
pub fn audit_counts_by_agent_prefix(log: &str, prefix: &str) -> BTreeMap<String, u64> {
    count_audit(log, |v| {
        v["userAgent"]
            .as_str()
            .is_some_and(|a| a.starts_with(prefix))
    })
}

/// Requests per user (`user.username`) in a JSON-lines audit log (each once, open watches too).
#[must_use]
pub fn audit_users(log: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for v in audit_events(log) {
        let user = v["user"]["username"].as_str().unwrap_or("").to_string();
        *out.entry(user).or_insert(0) += 1;
    }
    out
}

/// The request URIs of the cluster-wide pod LISTs and WATCHes (`/api/v1/pods` without a
/// namespace) sent with `User-Agent: user_agent` that carry no field selector, i.e. that read
/// every pod of the cluster.
#[must_use]
pub fn unfiltered_pod_reads(log: &str, user_agent: &str) -> Vec<String> {
    audit_events(log)
        .filter(|v| v["userAgent"] == user_agent)
        .filter(|v| matches!(v["verb"].as_str(), Some("list" | "watch")))
        .filter(|v| v["objectRef"]["resource"] == "pods" && v["objectRef"]["namespace"].is_null())
        .filter_map(|v| v["requestURI"].as_str().map(str::to_string))
        .filter(|uri| !uri.contains("fieldSelector="))
        .collect()
}

/// One event per request of a JSON-lines audit log: its `ResponseComplete`, or its
/// `ResponseStarted` (long-running requests: watches) when the log has that first. Requests are
/// told apart by `auditID`, so a watch still open when the log is read counts too; events without
/// an `auditID` count at `ResponseComplete` only.
fn audit_events(log: &str) -> impl Iterator<Item = serde_json::Value> + '_ {
    let mut seen = std::collections::HashSet::new();
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(move |v| match v["auditID"].as_str() {
            Some(id) => {
                matches!(
                    v["stage"].as_str(),
                    Some("ResponseStarted" | "ResponseComplete")
                ) && seen.insert(id.to_string())
            }
            None => v["stage"] == "ResponseComplete",
        })
}

fn count_audit(log: &str, pick: impl Fn(&serde_json::Value) -> bool) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for v in audit_events(log) {
        if !pick(&v) {
            continue;
        }
        let verb = v["verb"].as_str().unwrap_or("");
        let resource = v["objectRef"]["resource"]
            .as_str()
            .or_else(|| v["requestURI"].as_str())
            .unwrap_or("");
        let key = match v["objectRef"]["subresource"].as_str() {
            Some(sub) => format!("{verb} {resource}/{sub}"),
            None => format!("{verb} {resource}"),
        };
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_totals() {
        let text = "# HELP x\napiserver_request_total{code=\"200\",component=\"apiserver\",resource=\"nodes\",subresource=\"\",verb=\"GET\"} 12\n\
apiserver_request_total{code=\"201\",resource=\"pods\",subresource=\"eviction\",verb=\"POST\"} 3\n";
        let s = request_totals(text);
        assert_eq!(s.len(), 2);
        let m = by_verb_resource(&s);
        assert_eq!(m["GET nodes"], 12.0);
        assert_eq!(m["POST pods/eviction"], 3.0);
        let later = text.replace("} 12", "} 20");
        assert_eq!(delta(text, &later)["GET nodes"], 8.0);
    }

    #[test]
    fn counts_audit_lines_by_user() {
        let log = r#"{"stage":"ResponseComplete","verb":"patch","user":{"username":"u"},"objectRef":{"resource":"nodes"}}
{"stage":"ResponseStarted","verb":"watch","user":{"username":"u"},"objectRef":{"resource":"pods"}}
{"stage":"ResponseComplete","verb":"create","user":{"username":"u"},"objectRef":{"resource":"pods","subresource":"eviction"}}
{"stage":"ResponseComplete","verb":"get","user":{"username":"other"},"objectRef":{"resource":"nodes"}}"#;
        let c = audit_counts(log, "u");
        assert_eq!(c["patch nodes"], 1);
        assert_eq!(c["create pods/eviction"], 1);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn finds_unfiltered_pod_reads_and_users() {
        let log = r#"{"stage":"ResponseComplete","verb":"list","userAgent":"a","user":{"username":"u"},"requestURI":"/api/v1/pods?fieldSelector=spec.nodeName%3Dn1","objectRef":{"resource":"pods"}}
{"stage":"ResponseComplete","verb":"list","userAgent":"a","user":{"username":"u"},"requestURI":"/api/v1/pods","objectRef":{"resource":"pods"}}
{"stage":"ResponseComplete","verb":"list","userAgent":"a","user":{"username":"u"},"requestURI":"/api/v1/namespaces/x/pods","objectRef":{"resource":"pods","namespace":"x"}}
{"stage":"ResponseComplete","verb":"list","userAgent":"b","user":{"username":"v"},"requestURI":"/api/v1/pods","objectRef":{"resource":"pods"}}"#;
        assert_eq!(
            unfiltered_pod_reads(log, "a"),
            vec!["/api/v1/pods".to_string()]
        );
        let users = audit_users(log);
        assert_eq!((users["u"], users["v"]), (3, 1));
    }

    #[test]
    fn counts_each_request_once_open_watches_included() {
        let log = r#"{"auditID":"1","stage":"ResponseStarted","verb":"watch","userAgent":"a","objectRef":{"resource":"pods"}}
{"auditID":"2","stage":"ResponseComplete","verb":"get","userAgent":"a","objectRef":{"resource":"nodes"}}
{"auditID":"1","stage":"ResponseComplete","verb":"watch","userAgent":"a","objectRef":{"resource":"pods"}}
{"auditID":"3","stage":"ResponseStarted","verb":"watch","userAgent":"a","objectRef":{"resource":"nodes"}}"#;
        let c = audit_counts_by_agent(log, "a");
        assert_eq!(c["watch pods"], 1, "started and completed: one request");
        assert_eq!(c["watch nodes"], 1, "still open: counted");
        assert_eq!(c["get nodes"], 1);
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn counts_by_user_agent_prefix() {
        let log = r#"{"stage":"ResponseComplete","verb":"get","userAgent":"kubectl/v1.34.4 (linux/amd64) kubernetes/0000000","objectRef":{"resource":"nodes"}}
{"stage":"ResponseComplete","verb":"get","userAgent":"kubectl/v1.34.4 (linux/amd64) kubernetes/0000000","objectRef":{"resource":"nodes"}}
{"stage":"ResponseStarted","verb":"watch","userAgent":"kubectl/v1.34.4","objectRef":{"resource":"pods"}}
{"stage":"ResponseComplete","verb":"get","userAgent":"kube-controller-manager/v1.34.4","objectRef":{"resource":"nodes"}}"#;
        let c = audit_counts_by_agent_prefix(log, "kubectl/");
        assert_eq!(c["get nodes"], 2);
        assert_eq!(c.len(), 1);
    }
}
