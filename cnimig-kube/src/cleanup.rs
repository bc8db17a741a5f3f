//! Clean-up on Kubernetes: the node helper pod that runs the flush program
//! ([`cnimig_core::cleanup::render_script`]).
//!
//! Only the pod's shape is here so far: the [`CleanupPort`](cnimig_core::cleanup::CleanupPort)
//! implementation on `KubeCluster` is not built yet.

use cnimig_core::cleanup::HELPER_HOST_PATHS;
use cnimig_core::model::NodeName;
use serde_json::{Value, json};

/// The label on clean-up helper pods.
pub const FLUSH_HELPER_LABEL: &str = "cnimig.io/helper";
/// The label's value on clean-up helper pods.
pub const FLUSH_HELPER_VALUE: &str = "flush-calico";

/// The helper pod's name on `node` (`cnimig-flush-<node>`, cut to 63 characters).
#[must_use]
pub fn flush_helper_name(node: &NodeName) -> String {
    let mut n = format!("cnimig-flush-{node}");
    n.truncate(63);
    n.trim_end_matches(['-', '.']).to_string()
}

fn volume_name(path: &str) -> String {
    path.trim_start_matches('/').replace(['/', '.'], "-")
}

/// The clean-up helper pod for `node`: pinned with `nodeName`, `hostNetwork` (it edits the
/// host's iptables, routes and links), privileged (iptables and `ip link` need `NET_ADMIN` in
/// the host's network namespace), no ServiceAccount token, tolerating every taint, and exactly
/// the host paths of [`HELPER_HOST_PATHS`] mounted at the same paths (`/run/xtables.lock` as a
/// file, so its `iptables -w` calls serialise with the node's own).
#[must_use]
pub fn flush_helper_pod(node: &NodeName, namespace: &str, image: &str, script: &str) -> Value {
    let mounts: Vec<Value> = HELPER_HOST_PATHS
        .iter()
        .map(|p| json!({"name": volume_name(p), "mountPath": p}))
        .collect();
    let volumes: Vec<Value> = HELPER_HOST_PATHS
        .iter()
        .map(|p| {
            let kind = if p.ends_with(".lock") {
                "FileOrCreate"
            } else {
                "DirectoryOrCreate"
            };
            json!({"name": volume_name(p), "hostPath": {"path": p, "type": kind}})
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": flush_helper_name(node),
            "namespace": namespace,
            "labels": {FLUSH_HELPER_LABEL: FLUSH_HELPER_VALUE},
        },
        "spec": {
            "nodeName": node.as_str(),
            "hostNetwork": true,
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{
                "name": "flush",
                "image": image,
                "command": ["sh", "-c", script],
                "securityContext": {"privileged": true, "runAsUser": 0},
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_helper_has_exactly_the_host_access_it_needs() {
        let node = NodeName::new("worker-1").unwrap();
        let pod = flush_helper_pod(
            &node,
            "kube-system",
            "quay.io/cilium/cilium:v1.17.0",
            "echo hi",
        );
        let spec = &pod["spec"];
        assert_eq!(spec["nodeName"], "worker-1");
        assert_eq!(spec["hostNetwork"], true);
        assert_eq!(spec["automountServiceAccountToken"], false);
        assert_eq!(spec["containers"][0]["securityContext"]["privileged"], true);
        assert_eq!(spec["containers"][0]["command"][2], "echo hi");
        let mut host: Vec<&str> = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["hostPath"]["path"].as_str().unwrap())
            .collect();
        host.sort_unstable();
        assert_eq!(
            host,
            vec![
                "/etc/cni/net.d",
                "/opt/cni/bin",
                "/run/xtables.lock",
                "/var/lib/calico"
            ]
        );
        let mounts: Vec<&str> = spec["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["mountPath"].as_str().unwrap())
            .collect();
        assert_eq!(mounts, HELPER_HOST_PATHS.to_vec());
        assert!(spec.get("hostPID").is_none() && spec.get("hostIPC").is_none());
    }

    #[test]
    fn long_node_names_give_valid_pod_names() {
        let node = NodeName::new("a".repeat(63)).unwrap();
        let n = flush_helper_name(&node);
        assert!(n.len() <= 63 && n.starts_with("cnimig-flush-"));
    }
}
