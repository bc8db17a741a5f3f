//! Rancher's cluster agent (`cattle-system/cattle-cluster-agent`) on the host network for the
//! migration, and back exactly as it was after. Pure: JSON patches computed from the Deployment
//! as read; [`RancherCluster`](crate::RancherCluster) sends them.
//!
//! While a node's CNI restarts, an agent on the pod network loses its tunnel to Rancher and the
//! cluster shows as disconnected; on the host network it keeps it (FACTS.md, "Rancher"). The
//! change is a JSON patch (never a client-side apply, which Rancher's next re-apply would
//! undo) of two fields of the pod template, `hostNetwork: true` and `dnsPolicy:
//! ClusterFirstWithHostNet` (so the agent still resolves cluster names), made in the same
//! request that saves their original values in the Deployment's annotation
//! [`ORIGINAL_ANNOTATION`]. The annotation is the run's memory:
//!
//! - [`prepare_patch`] never overwrites it: a resumed run (or a re-run) only puts the two fields
//!   back if Rancher redeployed the agent without them;
//! - [`restore_patch`] puts the saved values back (removing fields that were absent) and deletes
//!   the annotation in one request guarded by a `test` of the annotation, so the restore happens
//!   exactly once: a second restore, or one racing another, finds no annotation (or a changed
//!   one) and changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use cnimig_core::preflight::Check;
use json_patch::{
    AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation, TestOperation,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1 as core;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The agent's namespace.
pub const AGENT_NAMESPACE: &str = "cattle-system";
/// The agent's Deployment.
pub const AGENT_NAME: &str = "cattle-cluster-agent";
/// The Deployment annotation holding the original values of the fields cnimig changes, as JSON
/// ([`SavedAgentSpec`]). Present exactly while the agent is on the host network because of
/// cnimig.
pub const ORIGINAL_ANNOTATION: &str = "cnimig.io/rancher-agent-original";
/// The host ports the agent binds on the host network.
pub const AGENT_PORTS: [i32; 3] = [80, 443, 444];
/// The DNS policy a host-network pod needs to resolve cluster names.
pub const HOST_NET_DNS_POLICY: &str = "ClusterFirstWithHostNet";

/// The original values of the pod-template fields cnimig changes (`None` = the field was absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedAgentSpec {
    /// `spec.template.spec.hostNetwork`.
    pub host_network: Option<bool>,
    /// `spec.template.spec.dnsPolicy`.
    pub dns_policy: Option<String>,
}

/// A Deployment that cannot be handled as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// The saved-spec annotation is not what cnimig writes.
    #[error(
        "annotation {ORIGINAL_ANNOTATION} on the cluster agent is not valid ({detail}); it holds the agent's original hostNetwork and dnsPolicy: restore those by hand, then delete the annotation"
    )]
    BadAnnotation {
        /// The parse error.
        detail: String,
    },
    /// The Deployment has no pod template spec or no resourceVersion.
    #[error("the cluster agent Deployment as read has no {what}; re-read it")]
    Incomplete {
        /// What is missing.
        what: &'static str,
    },
}

/// Where the agent stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentState {
    /// No annotation: the agent is as Rancher deployed it.
    Original(SavedAgentSpec),
    /// cnimig prepared it; `template_on_host_network` says whether the template still has both
    /// fields (Rancher may have redeployed it).
    Prepared {
        /// The original values.
        saved: SavedAgentSpec,
        /// The template has `hostNetwork: true` and `dnsPolicy: ClusterFirstWithHostNet`.
        template_on_host_network: bool,
    },
}

fn template_spec(d: &Deployment) -> Result<&core::PodSpec, AgentError> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .ok_or(AgentError::Incomplete {
            what: "spec.template.spec",
        })
}

fn current(d: &Deployment) -> Result<SavedAgentSpec, AgentError> {
    let s = template_spec(d)?;
    Ok(SavedAgentSpec {
        host_network: s.host_network,
        dns_policy: s.dns_policy.clone(),
    })
}

fn on_host_network(s: &SavedAgentSpec) -> bool {
    s.host_network == Some(true) && s.dns_policy.as_deref() == Some(HOST_NET_DNS_POLICY)
}

/// Where the agent stands, from its Deployment.
///
/// # Errors
/// [`AgentError`] when the annotation is not cnimig's or the template is missing.
pub fn agent_state(d: &Deployment) -> Result<AgentState, AgentError> {
    let now = current(d)?;
    match d
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ORIGINAL_ANNOTATION))
    {
        None => Ok(AgentState::Original(now)),
        Some(raw) => {
            let saved: SavedAgentSpec =
                serde_json::from_str(raw).map_err(|e| AgentError::BadAnnotation {
                    detail: e.to_string(),
                })?;
            Ok(AgentState::Prepared {
                saved,
                template_on_host_network: on_host_network(&now),
            })
        }
    }
}

/// `/a/b` with `~` and `/` escaped in the last segment (JSON pointer).
fn pointer(prefix: &str, key: &str) -> String {
    format!("{prefix}/{}", key.replace('~', "~0").replace('/', "~1"))
}

fn op_set(path: &str, old: Option<&Value>, new: Value) -> PatchOperation {
    if old.is_some() {
        PatchOperation::Replace(ReplaceOperation {
            path: path.parse().unwrap_or_default(),
            value: new,
        })
    } else {
        PatchOperation::Add(AddOperation {
            path: path.parse().unwrap_or_default(),
            value: new,
        })
    }
}

fn op_test(path: &str, value: Value) -> PatchOperation {
    PatchOperation::Test(TestOperation {
        path: path.parse().unwrap_or_default(),
        value,
    })
}

fn op_remove(path: &str) -> PatchOperation {
    PatchOperation::Remove(RemoveOperation {
        path: path.parse().unwrap_or_default(),
    })
}

const HOST_NETWORK: &str = "/spec/template/spec/hostNetwork";
const DNS_POLICY: &str = "/spec/template/spec/dnsPolicy";

fn field_ops(now: &SavedAgentSpec, ops: &mut Vec<PatchOperation>) {
    if now.host_network != Some(true) {
        ops.push(op_set(
            HOST_NETWORK,
            now.host_network.map(Value::Bool).as_ref(),
            Value::Bool(true),
        ));
    }
    if now.dns_policy.as_deref() != Some(HOST_NET_DNS_POLICY) {
        let old = now.dns_policy.clone().map(Value::String);
        ops.push(op_set(DNS_POLICY, old.as_ref(), HOST_NET_DNS_POLICY.into()));
    }
}

/// The patch that puts the agent on the host network, or `None` when it already is (by
/// cnimig's hand). Saves the original values only when there is no saved copy yet, guarded by a
/// `test` of `resourceVersion` so a concurrent change makes the patch fail instead of saving a
/// stale copy; when a copy exists, the patch only puts the two fields back, guarded by a `test`
/// of the annotation.
///
/// ```
/// use cnimig_rancher::agent::{prepare_patch, restore_patch, ORIGINAL_ANNOTATION};
/// let mut d: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(serde_json::json!({
///     "metadata": {"name": "cattle-cluster-agent", "resourceVersion": "7"},
///     "spec": {"selector": {}, "template": {"spec": {"dnsPolicy": "ClusterFirst", "containers": []}}}
/// })).unwrap();
/// let patch = prepare_patch(&d).unwrap().expect("the agent is not on the host network yet");
/// let mut v = serde_json::to_value(&d).unwrap();
/// json_patch::patch(&mut v, &patch).unwrap();
/// d = serde_json::from_value(v).unwrap();
/// assert!(prepare_patch(&d).unwrap().is_none(), "idempotent");
/// let mut v = serde_json::to_value(&d).unwrap();
/// json_patch::patch(&mut v, &restore_patch(&d).unwrap().unwrap()).unwrap();
/// assert!(v["metadata"]["annotations"].get(ORIGINAL_ANNOTATION).is_none());
/// assert_eq!(v["spec"]["template"]["spec"]["dnsPolicy"], "ClusterFirst");
/// assert!(v["spec"]["template"]["spec"].get("hostNetwork").is_none());
/// ```
///
/// # Errors
/// [`AgentError`] as [`agent_state`], or when the Deployment has no `resourceVersion`.
pub fn prepare_patch(d: &Deployment) -> Result<Option<Patch>, AgentError> {
    let now = current(d)?;
    let mut ops = Vec::new();
    match agent_state(d)? {
        AgentState::Prepared {
            template_on_host_network: true,
            ..
        } => return Ok(None),
        AgentState::Prepared { .. } => {
            let raw = d
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ORIGINAL_ANNOTATION))
                .cloned()
                .unwrap_or_default();
            ops.push(op_test(
                &pointer("/metadata/annotations", ORIGINAL_ANNOTATION),
                Value::String(raw),
            ));
        }
        AgentState::Original(saved) => {
            let rv = d
                .metadata
                .resource_version
                .clone()
                .ok_or(AgentError::Incomplete {
                    what: "metadata.resourceVersion",
                })?;
            ops.push(op_test("/metadata/resourceVersion", Value::String(rv)));
            let json = serde_json::to_string(&saved).unwrap_or_default();
            if d.metadata.annotations.is_some() {
                ops.push(PatchOperation::Add(AddOperation {
                    path: pointer("/metadata/annotations", ORIGINAL_ANNOTATION)
                        .parse()
                        .unwrap_or_default(),
                    value: Value::String(json),
                }));
            } else {
                ops.push(PatchOperation::Add(AddOperation {
                    path: "/metadata/annotations".parse().unwrap_or_default(),
                    value: serde_json::json!({ ORIGINAL_ANNOTATION: json }),
                }));
            }
        }
    }
    field_ops(&now, &mut ops);
    Ok(Some(Patch(ops)))
}

/// The patch that restores the saved values and removes the annotation, or `None` when there
/// is nothing to restore (never prepared, or already restored).
///
/// # Errors
/// [`AgentError`] as [`agent_state`].
pub fn restore_patch(d: &Deployment) -> Result<Option<Patch>, AgentError> {
    let AgentState::Prepared { saved, .. } = agent_state(d)? else {
        return Ok(None);
    };
    let now = current(d)?;
    let raw = d
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ORIGINAL_ANNOTATION))
        .cloned()
        .unwrap_or_default();
    let ann = pointer("/metadata/annotations", ORIGINAL_ANNOTATION);
    let mut ops = vec![op_test(&ann, Value::String(raw))];
    for (path, was, is) in [
        (
            HOST_NETWORK,
            saved.host_network.map(Value::Bool),
            now.host_network.map(Value::Bool),
        ),
        (
            DNS_POLICY,
            saved.dns_policy.clone().map(Value::String),
            now.dns_policy.clone().map(Value::String),
        ),
    ] {
        match (was, is) {
            (Some(w), Some(i)) if w == i => {}
            (Some(w), i) => ops.push(op_set(path, i.as_ref(), w)),
            (None, Some(_)) => ops.push(op_remove(path)),
            (None, None) => {}
        }
    }
    ops.push(op_remove(&ann));
    Ok(Some(Patch(ops)))
}

/// The agent's health between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentHealth {
    /// The template has `hostNetwork: true` and `dnsPolicy: ClusterFirstWithHostNet`.
    pub template_on_host_network: bool,
    /// Ready, not terminating agent pods on the host network.
    pub ready_on_host_network: usize,
    /// Ready, not terminating agent pods on the pod network (an old ReplicaSet, or Rancher
    /// redeployed the agent).
    pub ready_on_pod_network: usize,
}

impl AgentHealth {
    /// Problems, each a sentence a person can act on; empty when the agent is connected and on
    /// the host network.
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.template_on_host_network {
            out.push(format!(
                "{AGENT_NAMESPACE}/{AGENT_NAME} is no longer on the host network (Rancher redeployed it?): cnimig re-applies its patch; if this repeats, look for what reverts it (GitOps, Rancher upgrades)"
            ));
        }
        if self.ready_on_host_network == 0 {
            out.push(format!(
                "no Ready {AGENT_NAME} pod on the host network ({} Ready on the pod network): the cluster's connection to Rancher is at risk; check the agent's logs before migrating more nodes",
                self.ready_on_pod_network
            ));
        }
        out
    }
}

fn pod_ready(p: &core::Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().is_some_and(|s| {
            s.conditions
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// The agent's health from its Deployment and its pods (selected by the Deployment's
/// selector). The agent's readiness probe is its connection to Rancher, so Ready is the
/// downstream view of "connected".
///
/// # Errors
/// [`AgentError::Incomplete`] without a template spec.
pub fn agent_health(d: &Deployment, pods: &[core::Pod]) -> Result<AgentHealth, AgentError> {
    let mut h = AgentHealth {
        template_on_host_network: on_host_network(&current(d)?),
        ..AgentHealth::default()
    };
    for p in pods.iter().filter(|p| pod_ready(p)) {
        if p.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            h.ready_on_host_network += 1;
        } else {
            h.ready_on_pod_network += 1;
        }
    }
    Ok(h)
}

/// The host ports (of [`AGENT_PORTS`]) a pod holds on its node: declared `hostPort`s, and for a
/// host-network pod its container ports (which are host ports there).
fn held_ports(p: &core::Pod) -> BTreeSet<i32> {
    let Some(spec) = p.spec.as_ref() else {
        return BTreeSet::new();
    };
    let host = spec.host_network == Some(true);
    spec.containers
        .iter()
        .flat_map(|c| c.ports.as_deref().unwrap_or_default())
        .filter_map(|port| port.host_port.or(host.then_some(port.container_port)))
        .filter(|p| AGENT_PORTS.contains(p))
        .collect()
}

/// Checks that the agent can bind ports 80, 443 and 444 on the nodes it may run on (those its
/// template's `nodeSelector` allows): a node where another pod holds one of them (a hostPort, or
/// a host-network pod's port, e.g. an ingress controller) is a warning; no node free is a
/// failure (the agent would crash-loop or stay Pending).
#[must_use]
pub fn host_port_check(agent: &Deployment, nodes: &[core::Node], pods: &[core::Pod]) -> Check {
    const ID: &str = "rancher-agent-host-ports";
    let selector: BTreeMap<String, String> = agent
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.node_selector.clone())
        .unwrap_or_default();
    let agent_labels = agent
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default();
    let eligible: BTreeSet<String> = nodes
        .iter()
        .filter(|n| {
            let labels = n.metadata.labels.clone().unwrap_or_default();
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let agent_ns = agent
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(AGENT_NAMESPACE);
    let mut busy: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in pods {
        let is_agent = p.metadata.namespace.as_deref() == Some(agent_ns)
            && !agent_labels.is_empty()
            && agent_labels
                .iter()
                .all(|(k, v)| p.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v));
        let finished = p
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
        if is_agent || finished {
            continue;
        }
        let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        if !eligible.contains(&node) {
            continue;
        }
        let ports = held_ports(p);
        if !ports.is_empty() {
            busy.entry(node).or_default().push(format!(
                "{}/{} ({})",
                p.metadata.namespace.as_deref().unwrap_or(""),
                p.metadata.name.as_deref().unwrap_or(""),
                ports
                    .iter()
                    .map(i32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if busy.is_empty() {
        return Check::pass(
            ID,
            format!(
                "no pod holds host port 80, 443 or 444 on the {} node(s) the agent may run on",
                eligible.len()
            ),
        );
    }
    let list = busy
        .iter()
        .map(|(n, pods)| format!("{n}: {}", pods.join(", ")))
        .collect::<Vec<_>>()
        .join("; ");
    if busy.len() >= eligible.len() {
        Check::fail(
            ID,
            format!(
                "every node the agent may run on has a pod holding host port 80, 443 or 444 ({list}): on the host network the agent could not bind them; free one node (or give the agent a nodeSelector for a free node) before migrating"
            ),
        )
    } else {
        Check::warn(
            ID,
            format!(
                "on the host network the agent binds ports 80, 443 and 444, which these pods hold: {list}; the agent must not land there (cordon them while it moves, or give it a nodeSelector/affinity for the other {} node(s))",
                eligible.len() - busy.len()
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use cnimig_core::preflight::Severity;
    use serde_json::json;

    fn deployment(spec: Value, annotations: Option<Value>) -> Deployment {
        let mut meta =
            json!({"name": AGENT_NAME, "namespace": AGENT_NAMESPACE, "resourceVersion": "42"});
        if let Some(a) = annotations {
            meta["annotations"] = a;
        }
        serde_json::from_value(json!({
            "metadata": meta,
            "spec": {"selector": {"matchLabels": {"app": "cattle-cluster-agent"}},
                     "template": {"metadata": {"labels": {"app": "cattle-cluster-agent"}}, "spec": spec}}
        }))
        .unwrap()
    }

    fn apply(d: &Deployment, p: &Patch) -> Deployment {
        let mut v = serde_json::to_value(d).unwrap();
        json_patch::patch(&mut v, p).unwrap();
        serde_json::from_value(v).unwrap()
    }

    fn template(d: &Deployment) -> Value {
        serde_json::to_value(&d.spec.as_ref().unwrap().template).unwrap()
    }

    #[test]
    fn prepare_then_restore_is_exact_for_each_starting_point() {
        let starts = [
            json!({"containers": [{"name": "cluster-register", "image": "rancher/rancher-agent"}]}),
            json!({"dnsPolicy": "ClusterFirst", "containers": []}),
            json!({"hostNetwork": false, "dnsPolicy": "Default", "containers": []}),
            json!({"hostNetwork": true, "dnsPolicy": "ClusterFirst", "containers": []}),
        ];
        for (i, spec) in starts.into_iter().enumerate() {
            for ann in [None, Some(json!({"other": "x"}))] {
                let d0 = deployment(spec.clone(), ann.clone());
                let d1 = apply(&d0, &prepare_patch(&d0).unwrap().unwrap());
                let s = d1.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
                assert_eq!(s.host_network, Some(true), "case {i}");
                assert_eq!(
                    s.dns_policy.as_deref(),
                    Some(HOST_NET_DNS_POLICY),
                    "case {i}"
                );
                assert!(matches!(
                    agent_state(&d1).unwrap(),
                    AgentState::Prepared {
                        template_on_host_network: true,
                        ..
                    }
                ));
                assert_eq!(
                    prepare_patch(&d1).unwrap(),
                    None,
                    "case {i}: a second prepare changes nothing"
                );
                let d2 = apply(&d1, &restore_patch(&d1).unwrap().unwrap());
                assert_eq!(
                    template(&d2),
                    template(&d0),
                    "case {i}: template restored exactly"
                );
                assert_eq!(
                    d2.metadata.annotations.clone().filter(|a| !a.is_empty()),
                    d0.metadata.annotations,
                    "case {i}"
                );
                assert_eq!(restore_patch(&d2).unwrap(), None, "case {i}: restored once");
            }
        }
    }

    #[test]
    fn a_redeployed_agent_is_put_back_without_losing_the_saved_copy() {
        let d0 = deployment(json!({"dnsPolicy": "ClusterFirst", "containers": []}), None);
        let d1 = apply(&d0, &prepare_patch(&d0).unwrap().unwrap());
        // Rancher re-applies its manifest: the fields are back to the original, the annotation stays.
        let mut v = serde_json::to_value(&d1).unwrap();
        v["spec"]["template"]["spec"] = json!({"dnsPolicy": "ClusterFirst", "containers": []});
        let redeployed: Deployment = serde_json::from_value(v).unwrap();
        assert!(matches!(
            agent_state(&redeployed).unwrap(),
            AgentState::Prepared {
                template_on_host_network: false,
                ..
            }
        ));
        let d2 = apply(&redeployed, &prepare_patch(&redeployed).unwrap().unwrap());
        assert_eq!(
            d2.metadata.annotations, d1.metadata.annotations,
            "the original copy is kept"
        );
        let d3 = apply(&d2, &restore_patch(&d2).unwrap().unwrap());
        assert_eq!(template(&d3), template(&d0));
    }

    #[test]
    fn the_patches_are_guarded() {
        let d0 = deployment(json!({"containers": []}), None);
        let p = prepare_patch(&d0).unwrap().unwrap();
        // Someone changed the Deployment in between: the resourceVersion test fails the patch.
        let mut moved = serde_json::to_value(&d0).unwrap();
        moved["metadata"]["resourceVersion"] = json!("43");
        assert!(json_patch::patch(&mut moved, &p).is_err());
        let d1 = apply(&d0, &p);
        let r = restore_patch(&d1).unwrap().unwrap();
        let restored = apply(&d1, &r);
        // Replaying the same restore on the restored object fails: exactly once.
        let mut again = serde_json::to_value(&restored).unwrap();
        assert!(json_patch::patch(&mut again, &r).is_err());
    }

    #[test]
    fn a_foreign_annotation_is_refused() {
        let d = deployment(
            json!({"containers": []}),
            Some(json!({ORIGINAL_ANNOTATION: "not json"})),
        );
        let e = prepare_patch(&d).unwrap_err();
        assert!(e.to_string().contains("restore those by hand"), "{e}");
        assert!(restore_patch(&d).is_err());
    }

    fn pod(name: &str, node: &str, spec: Value, ready: bool) -> core::Pod {
        let mut s = spec;
        s["nodeName"] = json!(node);
        if s.get("containers").is_none() {
            s["containers"] = json!([{"name": "c"}]);
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ingress", "labels": {}},
            "spec": s,
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
        .unwrap()
    }

    fn nodes(names: &[&str]) -> Vec<core::Node> {
        names
            .iter()
            .map(|n| serde_json::from_value(json!({"metadata": {"name": n}})).unwrap())
            .collect()
    }

    #[test]
    fn host_port_collisions() {
        let agent = deployment(json!({"containers": []}), None);
        let ns = nodes(&["a", "b", "c"]);
        let quiet = [pod(
            "web",
            "a",
            json!({"containers": [{"name": "c", "ports": [{"containerPort": 80}]}]}),
            true,
        )];
        assert_eq!(
            host_port_check(&agent, &ns, &quiet).severity,
            Severity::Pass
        );
        let ingress = [
            pod(
                "nginx",
                "a",
                json!({"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80}]}]}),
                true,
            ),
            pod(
                "haproxy",
                "b",
                json!({"hostNetwork": true, "containers": [{"name": "c", "ports": [{"containerPort": 443}]}]}),
                true,
            ),
        ];
        let c = host_port_check(&agent, &ns, &ingress);
        assert_eq!(c.severity, Severity::Warn, "{c}");
        assert!(
            c.message.contains("a: ingress/nginx (80)")
                && c.message.contains("b: ingress/haproxy (443)"),
            "{c}"
        );
        let all = [
            ingress[0].clone(),
            ingress[1].clone(),
            pod(
                "x",
                "c",
                json!({"containers": [{"name": "c", "ports": [{"containerPort": 9, "hostPort": 444}]}]}),
                true,
            ),
        ];
        assert_eq!(host_port_check(&agent, &ns, &all).severity, Severity::Fail);
        // The agent's nodeSelector limits the nodes that count.
        let pinned = deployment(
            json!({"nodeSelector": {"pool": "sys"}, "containers": []}),
            None,
        );
        let mut ns2 = ns.clone();
        ns2[2].metadata.labels = Some([("pool".to_string(), "sys".to_string())].into());
        assert_eq!(
            host_port_check(&pinned, &ns2, &ingress).severity,
            Severity::Pass
        );
    }

    #[test]
    fn health_between_nodes() {
        let mut d = deployment(json!({"containers": []}), None);
        d = apply(&d, &prepare_patch(&d).unwrap().unwrap());
        let on = pod("agent-1", "a", json!({"hostNetwork": true}), true);
        let off = pod("agent-0", "a", json!({}), true);
        let h = agent_health(&d, &[on.clone(), off.clone()]).unwrap();
        assert_eq!((h.ready_on_host_network, h.ready_on_pod_network), (1, 1));
        assert!(h.problems().is_empty());
        let h = agent_health(
            &d,
            &[
                off,
                pod("agent-2", "b", json!({"hostNetwork": true}), false),
            ],
        )
        .unwrap();
        assert_eq!(h.problems().len(), 1, "{:?}", h.problems());
        let original = deployment(json!({"containers": []}), None);
        assert_eq!(agent_health(&original, &[on]).unwrap().problems().len(), 1);
    }
}
