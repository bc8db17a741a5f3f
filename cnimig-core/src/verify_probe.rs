//! The per-node probe, pure: the script a short-lived pod pinned to a just-migrated node runs,
//! and how its report is read and judged.
//!
//! The pod must get an address in Cilium's pool, reach the API server, resolve a cluster DNS
//! name and reach a pod on a node still on Calico. It writes one line per check to its
//! termination message (`/dev/termination-log`), `CHECK=ok` or `CHECK=fail: why`, and exits 1
//! when a check failed.
//!
//! ```
//! use cnimig_core::verify_probe::{ProbeReport, probe_problems};
//! let r = ProbeReport::parse("api=ok\ndns=ok\npeer=fail: no reply from 10.42.1.7\n");
//! let p = probe_problems("n1", Some("10.245.0.9".parse().unwrap()),
//!     &["10.245.0.0/16".parse().unwrap()], &r, true);
//! assert_eq!(p, vec!["probe on node n1: cannot reach the pod on a Calico node: no reply from 10.42.1.7"]);
//! ```

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The probe's shell script (busybox: `nc`, `nslookup`, `ping`). Environment: `DNS_NAME`, and
/// `PEER_IP` when there is a pod on Calico to reach; `KUBERNETES_SERVICE_HOST`/`_PORT` come
/// from the kubelet.
pub const PROBE_SCRIPT: &str = r#"out=/dev/termination-log
: > "$out"
r=0
if nc -z -w 3 "$KUBERNETES_SERVICE_HOST" "$KUBERNETES_SERVICE_PORT"; then echo "api=ok" >> "$out"
else echo "api=fail: no TCP connection to $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT" >> "$out"; r=1; fi
if nslookup "$DNS_NAME" > /dev/null 2>&1; then echo "dns=ok" >> "$out"
else echo "dns=fail: $DNS_NAME does not resolve" >> "$out"; r=1; fi
if [ -n "${PEER_IP:-}" ]; then
  if ping -c 1 -W 3 "$PEER_IP" > /dev/null 2>&1; then echo "peer=ok" >> "$out"
  else echo "peer=fail: no reply from $PEER_IP" >> "$out"; r=1; fi
else echo "peer=skipped" >> "$out"; fi
exit $r
"#;

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Passed.
    Ok,
    /// Failed, with the probe's reason.
    Fail(String),
    /// Not run (no pod on Calico left to reach).
    Skipped,
    /// Missing from the report (the probe did not get that far).
    Missing,
}

/// The probe's termination message, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// The API server check.
    pub api: Outcome,
    /// The cluster DNS check.
    pub dns: Outcome,
    /// The pod-on-Calico check.
    pub peer: Outcome,
}

fn outcome(msg: &str, key: &str) -> Outcome {
    let prefix = format!("{key}=");
    match msg
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
    {
        None => Outcome::Missing,
        Some("ok") => Outcome::Ok,
        Some("skipped") => Outcome::Skipped,
        Some(rest) => Outcome::Fail(
            rest.strip_prefix("fail")
                .map(|r| r.trim_start_matches(':').trim())
                .unwrap_or(rest)
                .to_string(),
        ),
    }
}

impl ProbeReport {
    /// Reads a termination message; unknown lines are ignored, absent checks are
    /// [`Outcome::Missing`].
    #[must_use]
    pub fn parse(msg: &str) -> Self {
        ProbeReport {
            api: outcome(msg, "api"),
            dns: outcome(msg, "dns"),
            peer: outcome(msg, "peer"),
        }
    }
}

/// Every problem the probe on `node` shows: its address outside Cilium's pool (or none), and each
/// failed or missing check. `peer_expected`: a pod on Calico was given to reach, so a skipped
/// peer check is a problem too.
#[must_use]
pub fn probe_problems(
    node: &str,
    pod_ip: Option<Ipv4Addr>,
    cilium_cidrs: &[Ipv4Net],
    report: &ProbeReport,
    peer_expected: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    match pod_ip {
        None => out.push(format!("probe on node {node}: got no pod address")),
        Some(ip) if !cilium_cidrs.iter().any(|c| c.contains(&ip)) => out.push(format!(
            "probe on node {node}: got {ip}, outside Cilium's pool: new pods there are not on Cilium"
        )),
        Some(_) => {}
    }
    for (what, o) in [
        ("reach the API server", &report.api),
        ("resolve cluster DNS", &report.dns),
        ("reach the pod on a Calico node", &report.peer),
    ] {
        match o {
            Outcome::Ok => {}
            Outcome::Skipped if !peer_expected => {}
            Outcome::Skipped => out.push(format!(
                "probe on node {node}: skipped the check to {what} although a target was given"
            )),
            Outcome::Fail(why) => out.push(format!("probe on node {node}: cannot {what}: {why}")),
            Outcome::Missing => out.push(format!(
                "probe on node {node}: no result for the check to {what}"
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Vec<Ipv4Net> {
        vec!["10.245.0.0/16".parse().unwrap()]
    }

    #[test]
    fn all_ok() {
        let r = ProbeReport::parse("api=ok\ndns=ok\npeer=ok\n");
        assert!(
            probe_problems("n", Some("10.245.1.2".parse().unwrap()), &pool(), &r, true).is_empty()
        );
    }

    #[test]
    fn a_calico_address_and_a_missing_check_are_problems() {
        let r = ProbeReport::parse("api=ok\n");
        let p = probe_problems("n", Some("10.42.1.2".parse().unwrap()), &pool(), &r, false);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("outside Cilium's pool"));
        assert!(p[1].contains("no result for the check to resolve cluster DNS"));
    }

    #[test]
    fn skipped_peer_is_fine_only_without_a_target() {
        let r = ProbeReport::parse("api=ok\ndns=ok\npeer=skipped");
        let ip = Some("10.245.1.2".parse().unwrap());
        assert!(probe_problems("n", ip, &pool(), &r, false).is_empty());
        assert_eq!(probe_problems("n", ip, &pool(), &r, true).len(), 1);
    }

    #[test]
    fn failure_reasons_are_kept() {
        let r = ProbeReport::parse("api=fail: no TCP connection to 10.96.0.1:443\ndns=ok\npeer=ok");
        assert_eq!(
            r.api,
            Outcome::Fail("no TCP connection to 10.96.0.1:443".into())
        );
    }
}
