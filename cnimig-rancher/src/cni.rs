//! The distribution's own CNI settings, which would otherwise put Calico back or break the
//! migration (FACTS.md, "Rancher"). Pure: reads and patches of JSON objects.
//!
//! - **RKE1**: the management cluster's `management.cattle.io/v3` Cluster
//!   `spec.rancherKubernetesEngineConfig.network.plugin` must be `none` before the migration, or
//!   RKE redeploys Calico on the next cluster update ([`rke1_plugin`], [`rke1_plugin_patch`]).
//! - **RKE2**: Calico's address autodetection must not be able to pick Cilium's `cilium_host`.
//!   On RKE2, Calico's `Installation` is rendered by the `rke2-calico` chart, so a direct edit is
//!   reverted: the fix goes into the chart's values, through HelmChartConfig
//!   `kube-system/rke2-calico` (standalone: [`values_with_autodetection`]) or through
//!   `spec.rkeConfig.chartValues.rke2-calico` of the `provisioning.cattle.io/v1` Cluster when
//!   Rancher provisioned the cluster ([`provisioned_autodetection_patch`]).
//! - **RKE2, last step**: `spec.rkeConfig.machineGlobalConfig.cni` switches only after every
//!   node is on Cilium, because it is cluster-wide and uninstalls the Calico chart everywhere
//!   ([`cni_switch_patch`]).

use serde_json::{Value, json};

/// The HelmChart and HelmChartConfig of RKE2's Calico.
pub const RKE2_CALICO: &str = "rke2-calico";
/// What cnimig sets Calico's IPv4 autodetection to: the node's InternalIP, which Cilium's
/// interfaces never carry.
pub const AUTODETECTION_FIX: &str = "NodeInternalIP";

/// A values document that cannot be updated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CniError {
    /// `valuesContent` is not YAML, or not a mapping where one is needed.
    #[error(
        "HelmChartConfig kube-system/{RKE2_CALICO} spec.valuesContent cannot be updated: {detail}; fix the YAML by hand (set installation.calicoNetwork.nodeAddressAutodetectionV4: {{kubernetes: {AUTODETECTION_FIX}}}) and run again"
    )]
    BadValues {
        /// What is wrong.
        detail: String,
    },
}

/// `spec.rancherKubernetesEngineConfig.network.plugin` of an RKE1 management Cluster.
#[must_use]
pub fn rke1_plugin(cluster: &Value) -> Option<&str> {
    cluster
        .pointer("/spec/rancherKubernetesEngineConfig/network/plugin")
        .and_then(Value::as_str)
}

/// The merge patch that sets the RKE1 network plugin to `none`.
#[must_use]
pub fn rke1_plugin_patch() -> Value {
    json!({"spec": {"rancherKubernetesEngineConfig": {"network": {"plugin": "none"}}}})
}

/// `spec.rkeConfig.machineGlobalConfig.cni` of an RKE2 provisioning Cluster.
#[must_use]
pub fn rke2_cni(cluster: &Value) -> Option<&str> {
    cluster
        .pointer("/spec/rkeConfig/machineGlobalConfig/cni")
        .and_then(Value::as_str)
}

/// The merge patch that switches an RKE2 provisioning Cluster's `cni` to `target` (`none` when
/// Cilium is the user's own Helm release, as cnimig installs it; `cilium` to hand Cilium to
/// RKE2's chart).
#[must_use]
pub fn cni_switch_patch(target: &str) -> Value {
    json!({"spec": {"rkeConfig": {"machineGlobalConfig": {"cni": target}}}})
}

/// Whether an `installation.calicoNetwork.nodeAddressAutodetectionV4` value keeps Calico off
/// Cilium's interfaces; `Err` says why not. Absent means `firstFound`, which may pick
/// `cilium_host`.
///
/// # Errors
/// A sentence naming the problem.
pub fn autodetection_ok(v: Option<&Value>) -> Result<(), String> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Err(
            "not set, so Calico uses firstFound, which can pick Cilium's cilium_host".into(),
        );
    };
    if v.get("kubernetes").and_then(Value::as_str) == Some(AUTODETECTION_FIX) {
        return Ok(());
    }
    if let Some(re) = v.get("interface").and_then(Value::as_str) {
        return if cnimig_core::preflight::interface_regex_may_match_cilium(re) {
            Err(format!(
                "interface: {re:?} may match Cilium's interfaces (cilium_*)"
            ))
        } else {
            Ok(())
        };
    }
    if let Some(re) = v.get("skipInterface").and_then(Value::as_str) {
        return if cnimig_core::preflight::skip_interface_regex_excludes_cilium(re) {
            Ok(())
        } else {
            Err(format!(
                "skipInterface: {re:?} does not exclude every cilium_* interface"
            ))
        };
    }
    if v.get("cidrs").is_some() || v.get("canReach").is_some() {
        return Ok(());
    }
    Err(format!("{v} (firstFound) can pick Cilium's cilium_host"))
}

/// The autodetection setting in a `rke2-calico` values document (`valuesContent`).
///
/// # Errors
/// [`CniError::BadValues`] when the document is not YAML.
pub fn values_autodetection(values_yaml: &str) -> Result<Option<Value>, CniError> {
    let v = parse_values(values_yaml)?;
    Ok(
        v.pointer("/installation/calicoNetwork/nodeAddressAutodetectionV4")
            .cloned(),
    )
}

fn parse_values(values_yaml: &str) -> Result<Value, CniError> {
    if values_yaml.trim().is_empty() {
        return Ok(json!({}));
    }
    let v: Value = serde_yaml_ng::from_str(values_yaml).map_err(|e| CniError::BadValues {
        detail: e.to_string(),
    })?;
    Ok(if v.is_null() { json!({}) } else { v })
}

/// `values_yaml` with `installation.calicoNetwork.nodeAddressAutodetectionV4` replaced by
/// `{kubernetes: NodeInternalIP}` (the methods are exclusive, so the whole object is replaced)
/// and everything else kept.
///
/// # Errors
/// [`CniError::BadValues`] when the document is not YAML or a level on the path is not a
/// mapping.
pub fn values_with_autodetection(values_yaml: &str) -> Result<String, CniError> {
    let mut v = parse_values(values_yaml)?;
    let mut cur = &mut v;
    for key in ["installation", "calicoNetwork"] {
        let Value::Object(map) = cur else {
            return Err(CniError::BadValues {
                detail: format!("the parent of {key:?} is not a mapping"),
            });
        };
        cur = map.entry(key.to_string()).or_insert_with(|| json!({}));
    }
    let Value::Object(map) = cur else {
        return Err(CniError::BadValues {
            detail: "installation.calicoNetwork is not a mapping".into(),
        });
    };
    map.insert(
        "nodeAddressAutodetectionV4".into(),
        json!({"kubernetes": AUTODETECTION_FIX}),
    );
    serde_yaml_ng::to_string(&v).map_err(|e| CniError::BadValues {
        detail: e.to_string(),
    })
}

/// The autodetection setting in a provisioning Cluster's
/// `spec.rkeConfig.chartValues.rke2-calico`.
#[must_use]
pub fn provisioned_autodetection(cluster: &Value) -> Option<&Value> {
    cluster.pointer(
        "/spec/rkeConfig/chartValues/rke2-calico/installation/calicoNetwork/nodeAddressAutodetectionV4",
    )
}

/// The merge patch that sets the provisioning Cluster's Calico autodetection to the node's
/// InternalIP (the other, exclusive methods set to `null`, which a merge patch removes).
#[must_use]
pub fn provisioned_autodetection_patch() -> Value {
    json!({"spec": {"rkeConfig": {"chartValues": {RKE2_CALICO: {"installation": {"calicoNetwork": {
        "nodeAddressAutodetectionV4": {
            "kubernetes": AUTODETECTION_FIX, "firstFound": null, "interface": null,
            "skipInterface": null, "canReach": null, "cidrs": null
        }
    }}}}}}})
}

/// The HelmChartConfig `kube-system/rke2-calico` to apply, with `values` as `valuesContent`.
#[must_use]
pub fn helm_chart_config(namespace: &str, values: &str) -> Value {
    json!({
        "apiVersion": "helm.cattle.io/v1",
        "kind": "HelmChartConfig",
        "metadata": {"name": RKE2_CALICO, "namespace": namespace},
        "spec": {"valuesContent": values},
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn values_are_merged_not_replaced() {
        let before = "installation:\n  calicoNetwork:\n    mtu: 1450\n    nodeAddressAutodetectionV4:\n      firstFound: true\n  flexVolumePath: /x\nfelixConfiguration:\n  wireguardEnabled: false\n";
        assert!(autodetection_ok(values_autodetection(before).unwrap().as_ref()).is_err());
        let after = values_with_autodetection(before).unwrap();
        let v: Value = serde_yaml_ng::from_str(&after).unwrap();
        assert_eq!(v["installation"]["calicoNetwork"]["mtu"], 1450);
        assert_eq!(v["installation"]["flexVolumePath"], "/x");
        assert_eq!(v["felixConfiguration"]["wireguardEnabled"], false);
        assert_eq!(
            v["installation"]["calicoNetwork"]["nodeAddressAutodetectionV4"],
            json!({"kubernetes": "NodeInternalIP"})
        );
        assert_eq!(
            autodetection_ok(values_autodetection(&after).unwrap().as_ref()),
            Ok(())
        );
        // Empty values and a fresh HelmChartConfig.
        let fresh = values_with_autodetection("").unwrap();
        assert_eq!(
            autodetection_ok(values_autodetection(&fresh).unwrap().as_ref()),
            Ok(())
        );
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(values_with_autodetection("installation: [1, 2]").is_err());
        let e = values_with_autodetection("a: [").unwrap_err();
        assert!(e.to_string().contains("fix the YAML by hand"), "{e}");
    }

    #[test]
    fn autodetection_methods() {
        assert!(autodetection_ok(None).is_err());
        assert!(autodetection_ok(Some(&json!({"firstFound": true}))).is_err());
        assert!(autodetection_ok(Some(&json!({"interface": "eth.*"}))).is_ok());
        assert!(autodetection_ok(Some(&json!({"interface": ".*"}))).is_err());
        assert!(autodetection_ok(Some(&json!({"skipInterface": "cilium_.*"}))).is_ok());
        assert!(autodetection_ok(Some(&json!({"skipInterface": "docker.*"}))).is_err());
        assert!(autodetection_ok(Some(&json!({"cidrs": ["10.0.0.0/8"]}))).is_ok());
    }

    #[test]
    fn provisioned_cluster_patches() {
        let mut c = json!({"spec": {"rkeConfig": {
            "machineGlobalConfig": {"cni": "calico"},
            "chartValues": {"rke2-calico": {"installation": {"calicoNetwork": {"nodeAddressAutodetectionV4": {"firstFound": true}}}}}}}});
        assert_eq!(rke2_cni(&c), Some("calico"));
        assert!(autodetection_ok(provisioned_autodetection(&c)).is_err());
        json_patch::merge(&mut c, &provisioned_autodetection_patch());
        assert_eq!(
            provisioned_autodetection(&c),
            Some(&json!({"kubernetes": "NodeInternalIP"}))
        );
        json_patch::merge(&mut c, &cni_switch_patch("none"));
        assert_eq!(rke2_cni(&c), Some("none"));
        let mut r1 = json!({"spec": {"rancherKubernetesEngineConfig": {"network": {"plugin": "calico", "options": {"a": "b"}}}}});
        json_patch::merge(&mut r1, &rke1_plugin_patch());
        assert_eq!(rke1_plugin(&r1), Some("none"));
        assert_eq!(
            r1["spec"]["rancherKubernetesEngineConfig"]["network"]["options"]["a"],
            "b"
        );
    }
}
