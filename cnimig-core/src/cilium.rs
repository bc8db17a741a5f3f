//! Cilium's Helm values for the migration and final phases, the `CiliumNodeConfig`, and the check
//! of a live `cilium-config` ConfigMap against what a phase requires.
//!
//! One table ([`settings`]) drives all three: each row is a Helm value and the ConfigMap key it
//! renders to, with the value for each phase (FACTS.md, "Cilium in migration mode"). Values are
//! never edited in two places.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::MigrationConfig;

/// Which phase's values to produce or check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CiliumPhase {
    /// Passive Cilium beside Calico.
    Migration,
    /// Cilium as the cluster's CNI.
    Final,
}

/// What the ConfigMap must hold for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Exactly this value.
    Equals(String),
    /// The key must be absent (the chart renders it only in other cases), or hold this value.
    AbsentOr(String),
    /// Not checked in this phase.
    Any,
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    /// Dotted Helm value path.
    pub helm: &'static str,
    /// The value for Helm.
    pub value: Value,
    /// The `cilium-config` key it renders to, if any.
    pub key: Option<&'static str>,
    /// What the live ConfigMap must hold.
    pub expect: Expect,
    /// Why (shown in plans and failed checks).
    pub why: &'static str,
}

/// Facts about the cluster the values depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ValueInputs {
    /// Some pod in the cluster uses `hostPort`.
    pub host_port_pods: bool,
}

fn s(v: &str) -> Expect {
    Expect::Equals(v.to_string())
}

/// The table for `phase`.
#[must_use]
pub fn settings(cfg: &MigrationConfig, inputs: ValueInputs, phase: CiliumPhase) -> Vec<Setting> {
    let mig = phase == CiliumPhase::Migration;
    let port = cfg.effective_tunnel_port();
    let mut rows = vec![
        Setting {
            helm: "cni.customConf",
            value: json!(mig),
            key: Some("custom-cni-conf"),
            expect: s(if mig { "true" } else { "false" }),
            why: "during the migration Cilium must not write its CNI config until a node opts in",
        },
        Setting {
            helm: "cni.uninstall",
            value: json!(false),
            key: Some("cni-uninstall"),
            expect: Expect::AbsentOr("false".into()),
            why: "an agent restart must not remove the CNI config",
        },
        Setting {
            helm: "operator.unmanagedPodWatcher.restart",
            value: json!(!mig),
            key: Some("unmanaged-pod-watcher-interval"),
            expect: s(if mig { "0" } else { "15s" }),
            why: "the operator must not restart pods Calico still manages",
        },
        Setting {
            helm: "routingMode",
            value: json!("tunnel"),
            key: Some("routing-mode"),
            expect: s("tunnel"),
            why: "an overlay beside Calico's routing",
        },
        Setting {
            helm: "tunnelProtocol",
            value: json!(cfg.tunnel_protocol.as_str()),
            key: Some("tunnel-protocol"),
            expect: s(cfg.tunnel_protocol.as_str()),
            why: "unchanged after the migration (changing it needs every agent restarted at once)",
        },
        Setting {
            helm: "tunnelPort",
            value: json!(port),
            key: Some("tunnel-port"),
            expect: Expect::AbsentOr(port.to_string()),
            why: "must differ from Calico's VXLAN port; unchanged after the migration",
        },
        Setting {
            helm: "ipam.mode",
            value: json!("cluster-pool"),
            key: Some("ipam"),
            expect: s("cluster-pool"),
            why: "Cilium allocates from its own new pool",
        },
        Setting {
            helm: "ipam.operator.clusterPoolIPv4PodCIDRList",
            value: json!([cfg.pod_cidr.to_string()]),
            key: Some("cluster-pool-ipv4-cidr"),
            expect: s(&cfg.pod_cidr.to_string()),
            why: "the new pod CIDR, never changed after the migration",
        },
        Setting {
            helm: "ipam.operator.clusterPoolIPv4MaskSize",
            value: json!(cfg.mask_size),
            key: Some("cluster-pool-ipv4-mask-size"),
            expect: s(&cfg.mask_size.to_string()),
            why: "per-node allocation size",
        },
        Setting {
            helm: "policyEnforcementMode",
            value: json!(if mig { "never" } else { "default" }),
            key: Some("enable-policy"),
            expect: s(if mig { "never" } else { "default" }),
            why: "Calico still enforces policy during the migration",
        },
        Setting {
            helm: "bpf.hostLegacyRouting",
            value: json!(mig || cfg.final_host_legacy_routing),
            key: Some("enable-host-legacy-routing"),
            expect: s(if mig || cfg.final_host_legacy_routing {
                "true"
            } else {
                "false"
            }),
            why: "traffic between Calico and Cilium pods goes through the host's routing stack",
        },
        Setting {
            helm: "kubeProxyReplacement",
            value: json!(false),
            key: Some("kube-proxy-replacement"),
            expect: s("false"),
            why: "kube-proxy keeps serving Services during and after the migration",
        },
        Setting {
            helm: "hostFirewall.enabled",
            value: json!(false),
            key: Some("enable-host-firewall"),
            expect: if mig { s("false") } else { Expect::Any },
            why: "no host policy while two CNIs share the nodes",
        },
        Setting {
            helm: "hubble.metrics.serviceMonitor.enabled",
            value: json!(!mig),
            key: None,
            expect: Expect::Any,
            why: "no alert noise while the migration runs",
        },
        Setting {
            helm: "prometheus.serviceMonitor.enabled",
            value: json!(!mig),
            key: None,
            expect: Expect::Any,
            why: "no alert noise while the migration runs",
        },
    ];
    if inputs.host_port_pods {
        rows.push(Setting {
            helm: "hostPort.enabled",
            value: json!(true),
            key: Some("enable-host-port"),
            expect: s("true"),
            why: "hostPort pods exist",
        });
    }
    if !mig {
        rows.push(Setting {
            helm: "cni.exclusive",
            value: json!(true),
            key: Some("cni-exclusive"),
            expect: s("true"),
            why: "Cilium owns /etc/cni/net.d once Calico is gone",
        });
        if inputs.host_port_pods {
            rows.push(Setting {
                helm: "cni.chainingMode",
                value: json!("portmap"),
                key: Some("cni-chaining-mode"),
                expect: s("portmap"),
                why: "hostPort needs the portmap plugin while kube-proxy replacement is off",
            });
        }
    }
    rows
}

/// The Helm values document for `phase` (nested, ready to serialise as YAML).
#[must_use]
pub fn helm_values(cfg: &MigrationConfig, inputs: ValueInputs, phase: CiliumPhase) -> Value {
    let mut root = Value::Object(serde_json::Map::new());
    for row in settings(cfg, inputs, phase) {
        let mut cur = &mut root;
        let parts: Vec<&str> = row.helm.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let Value::Object(map) = cur else { break };
            if i + 1 == parts.len() {
                map.insert((*part).to_string(), row.value.clone());
                break;
            }
            cur = map
                .entry((*part).to_string())
                .or_insert_with(|| Value::Object(serde_json::Map::new()));
        }
    }
    root
}

/// The Helm values as YAML text.
#[must_use]
pub fn helm_values_yaml(cfg: &MigrationConfig, inputs: ValueInputs, phase: CiliumPhase) -> String {
    serde_yaml_ng::to_string(&helm_values(cfg, inputs, phase)).unwrap_or_default()
}

/// The `CiliumNodeConfig` API version, found by discovery (never by parsing a version string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeConfigApi {
    /// `cilium.io/v2` (Cilium 1.16 and later).
    V2,
    /// `cilium.io/v2alpha1` (Cilium 1.13 to 1.19).
    V2Alpha1,
}

impl NodeConfigApi {
    /// The `apiVersion` string.
    #[must_use]
    pub fn api_version(self) -> &'static str {
        match self {
            NodeConfigApi::V2 => "cilium.io/v2",
            NodeConfigApi::V2Alpha1 => "cilium.io/v2alpha1",
        }
    }
    /// Picks the version from the versions the `ciliumnodeconfigs.cilium.io` CRD serves.
    /// Prefers v2. `None` when neither is served.
    #[must_use]
    pub fn from_served<'a>(served: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let served: Vec<&str> = served.into_iter().collect();
        if served.contains(&"v2") {
            Some(NodeConfigApi::V2)
        } else if served.contains(&"v2alpha1") {
            Some(NodeConfigApi::V2Alpha1)
        } else {
            None
        }
    }
}

/// The per-node configuration that makes Cilium the CNI of labelled nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CiliumNodeConfig {
    /// Object name (in `kube-system`).
    pub name: String,
    /// Label key (value `"true"`) selecting the nodes.
    pub label: String,
    /// `spec.defaults`: cilium-config keys overridden on the selected nodes.
    pub defaults: BTreeMap<String, String>,
    /// Why each non-obvious default was chosen (for the plan).
    pub reasons: Vec<String>,
}

/// Where migrated nodes' CNI config is written.
pub const CILIUM_CONFLIST: &str = "/host/etc/cni/net.d/05-cilium.conflist";

impl CiliumNodeConfig {
    /// The node config for this migration. The chaining mode comes from whether hostPort pods
    /// exist: a node config's `cni-chaining-mode` wins over the global one on migrated nodes, so
    /// `none` there would leave hostPort pods without the `portmap` plugin.
    #[must_use]
    pub fn for_migration(cfg: &MigrationConfig, inputs: ValueInputs) -> Self {
        let chaining = if inputs.host_port_pods {
            "portmap"
        } else {
            "none"
        };
        let mut defaults = BTreeMap::new();
        defaults.insert(
            "write-cni-conf-when-ready".to_string(),
            CILIUM_CONFLIST.to_string(),
        );
        defaults.insert("custom-cni-conf".to_string(), "false".to_string());
        defaults.insert("cni-chaining-mode".to_string(), chaining.to_string());
        defaults.insert("cni-exclusive".to_string(), "true".to_string());
        let reasons = vec![format!(
            "cni-chaining-mode is {chaining:?} because {}",
            if inputs.host_port_pods {
                "hostPort pods exist and kube-proxy replacement is off, so migrated nodes need the portmap plugin"
            } else {
                "no pod uses hostPort"
            }
        )];
        CiliumNodeConfig {
            name: cfg.node_config_name.clone(),
            label: cfg.migration_label.clone(),
            defaults,
            reasons,
        }
    }

    /// The object as JSON, at `api`.
    #[must_use]
    pub fn to_object(&self, api: NodeConfigApi) -> Value {
        json!({
            "apiVersion": api.api_version(),
            "kind": "CiliumNodeConfig",
            "metadata": {"name": self.name, "namespace": "kube-system"},
            "spec": {
                "nodeSelector": {"matchLabels": {self.label.clone(): "true"}},
                "defaults": self.defaults,
            }
        })
    }

    /// The object as YAML text, at `api`.
    #[must_use]
    pub fn to_yaml(&self, api: NodeConfigApi) -> String {
        serde_yaml_ng::to_string(&self.to_object(api)).unwrap_or_default()
    }
}

/// One key of the live config that does not match the phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigMismatch {
    /// ConfigMap key.
    pub key: String,
    /// What it should hold.
    pub expected: String,
    /// What it holds (`None` = absent).
    pub actual: Option<String>,
    /// The Helm value that sets it.
    pub helm: String,
    /// Why it matters.
    pub why: String,
}

impl std::fmt::Display for ConfigMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cilium-config {} is {} but must be {} ({}); set Helm value {} and upgrade",
            self.key,
            self.actual
                .as_deref()
                .map_or_else(|| "absent".to_string(), |a| format!("{a:?}")),
            self.expected,
            self.why,
            self.helm
        )
    }
}

/// Checks a live `cilium-config` ConfigMap's data against `phase`. Empty means it matches.
#[must_use]
pub fn check_live_config(
    live: &BTreeMap<String, String>,
    cfg: &MigrationConfig,
    inputs: ValueInputs,
    phase: CiliumPhase,
) -> Vec<ConfigMismatch> {
    let mut out = Vec::new();
    for row in settings(cfg, inputs, phase) {
        let Some(key) = row.key else { continue };
        let actual = live.get(key).cloned();
        let (ok, expected) = match &row.expect {
            Expect::Any => continue,
            Expect::Equals(v) => (actual.as_deref() == Some(v.as_str()), format!("{v:?}")),
            Expect::AbsentOr(v) => (
                actual.is_none() || actual.as_deref() == Some(v.as_str()),
                format!("absent or {v:?}"),
            ),
        };
        if !ok {
            out.push(ConfigMismatch {
                key: key.to_string(),
                expected,
                actual,
                helm: row.helm.to_string(),
                why: row.why.to_string(),
            });
        }
    }
    out
}

/// The ConfigMap data the chart renders for `phase` (what a correct install holds); the simulator
/// starts from it and tests use it as the "good" live config.
#[must_use]
pub fn rendered_config(
    cfg: &MigrationConfig,
    inputs: ValueInputs,
    phase: CiliumPhase,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for row in settings(cfg, inputs, phase) {
        let Some(key) = row.key else { continue };
        match row.expect {
            Expect::Equals(v) => {
                out.insert(key.to_string(), v);
            }
            Expect::AbsentOr(_) | Expect::Any => {
                if key == "tunnel-port" {
                    out.insert(key.to_string(), cfg.effective_tunnel_port().to_string());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MigrationConfig {
        MigrationConfig::new("10.245.0.0/16".parse().unwrap())
    }

    #[test]
    fn migration_values_are_passive() {
        let v = helm_values(&cfg(), ValueInputs::default(), CiliumPhase::Migration);
        assert_eq!(v["cni"]["customConf"], json!(true));
        assert_eq!(v["policyEnforcementMode"], json!("never"));
        assert_eq!(v["bpf"]["hostLegacyRouting"], json!(true));
        assert_eq!(v["kubeProxyReplacement"], json!(false));
        assert_eq!(
            v["operator"]["unmanagedPodWatcher"]["restart"],
            json!(false)
        );
        assert_eq!(
            v["ipam"]["operator"]["clusterPoolIPv4PodCIDRList"],
            json!(["10.245.0.0/16"])
        );
        assert_eq!(v["tunnelPort"], json!(8472));
        assert!(v.get("hostPort").is_none());
    }

    #[test]
    fn final_values_keep_the_network_and_switch_the_rest() {
        let m = helm_values(&cfg(), ValueInputs::default(), CiliumPhase::Migration);
        let f = helm_values(&cfg(), ValueInputs::default(), CiliumPhase::Final);
        for path in [
            ["tunnelPort"].as_slice(),
            &["tunnelProtocol"],
            &["ipam", "operator", "clusterPoolIPv4PodCIDRList"],
        ] {
            let get = |v: &Value| path.iter().fold(v.clone(), |v, p| v[*p].clone());
            assert_eq!(
                get(&m),
                get(&f),
                "{path:?} must not change in the final phase"
            );
        }
        assert_eq!(f["cni"]["customConf"], json!(false));
        assert_eq!(f["policyEnforcementMode"], json!("default"));
        assert_eq!(f["operator"]["unmanagedPodWatcher"]["restart"], json!(true));
    }

    #[test]
    fn host_port_pods_get_portmap_on_migrated_nodes() {
        let with = CiliumNodeConfig::for_migration(
            &cfg(),
            ValueInputs {
                host_port_pods: true,
            },
        );
        assert_eq!(with.defaults["cni-chaining-mode"], "portmap");
        let without = CiliumNodeConfig::for_migration(&cfg(), ValueInputs::default());
        assert_eq!(without.defaults["cni-chaining-mode"], "none");
        assert_eq!(
            without.defaults["write-cni-conf-when-ready"],
            CILIUM_CONFLIST
        );
        let obj = without.to_object(NodeConfigApi::V2);
        assert_eq!(
            obj["spec"]["nodeSelector"]["matchLabels"]["io.cilium.migration/cilium-default"],
            json!("true")
        );
        assert_eq!(obj["apiVersion"], json!("cilium.io/v2"));
        assert!(
            without
                .to_yaml(NodeConfigApi::V2Alpha1)
                .contains("cilium.io/v2alpha1")
        );
    }

    #[test]
    fn api_version_by_discovery() {
        assert_eq!(
            NodeConfigApi::from_served(["v2alpha1", "v2"]),
            Some(NodeConfigApi::V2)
        );
        assert_eq!(
            NodeConfigApi::from_served(["v2alpha1"]),
            Some(NodeConfigApi::V2Alpha1)
        );
        assert_eq!(NodeConfigApi::from_served(["v1"]), None);
    }

    #[test]
    fn rendered_config_passes_and_each_wrong_key_is_named() {
        let c = cfg();
        let good = rendered_config(&c, ValueInputs::default(), CiliumPhase::Migration);
        assert!(
            check_live_config(&good, &c, ValueInputs::default(), CiliumPhase::Migration).is_empty()
        );
        // The classic mistake: policy-enforcement-mode instead of enable-policy.
        let mut bad = good.clone();
        bad.remove("enable-policy");
        bad.insert("policy-enforcement-mode".into(), "never".into());
        let m = check_live_config(&bad, &c, ValueInputs::default(), CiliumPhase::Migration);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].key, "enable-policy");
        assert!(m[0].to_string().contains("policyEnforcementMode"));
        // A final-phase config is not a migration-phase config.
        let fin = rendered_config(&c, ValueInputs::default(), CiliumPhase::Final);
        let m = check_live_config(&fin, &c, ValueInputs::default(), CiliumPhase::Migration);
        let keys: Vec<_> = m.iter().map(|m| m.key.as_str()).collect();
        assert!(
            keys.contains(&"custom-cni-conf") && keys.contains(&"enable-policy"),
            "{keys:?}"
        );
        // cni-uninstall rendered true is caught; absent is fine.
        let mut bad = good;
        bad.insert("cni-uninstall".into(), "true".into());
        assert_eq!(
            check_live_config(&bad, &c, ValueInputs::default(), CiliumPhase::Migration).len(),
            1
        );
    }
}
