//! [`OldCni`] on the Kubernetes API: Calico's IP pools, Felix configuration, and the operator's
//! `Installation` or the manifest install's `calico-node` DaemonSet.

use async_trait::async_trait;
use cnimig_core::model::{
    Autodetection, CalicoFacts, CalicoInstall, Dataplane, Encapsulation, IpPool,
};
use cnimig_core::ports::{OldCni, PortError};
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde_json::Value;

use crate::KubeCluster;
use crate::error::{api_code, port_error};

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// Encapsulation of a `crd.projectcalico.org/v1` IPPool spec.
#[must_use]
pub fn pool_encapsulation(spec: &Value) -> Encapsulation {
    let mode = |k: &str| spec.get(k).and_then(Value::as_str).unwrap_or("Never");
    match (mode("vxlanMode"), mode("ipipMode")) {
        ("Always", _) => Encapsulation::Vxlan,
        ("CrossSubnet", _) => Encapsulation::VxlanCrossSubnet,
        (_, "Always") => Encapsulation::Ipip,
        (_, "CrossSubnet") => Encapsulation::IpipCrossSubnet,
        _ => Encapsulation::None,
    }
}

/// Encapsulation of an operator `Installation` pool (`IPIP`, `VXLANCrossSubnet`, …).
#[must_use]
pub fn operator_encapsulation(v: &str) -> Encapsulation {
    match v {
        "IPIP" => Encapsulation::Ipip,
        "IPIPCrossSubnet" => Encapsulation::IpipCrossSubnet,
        "VXLAN" => Encapsulation::Vxlan,
        "VXLANCrossSubnet" => Encapsulation::VxlanCrossSubnet,
        _ => Encapsulation::None,
    }
}

/// Parses the manifest env `IP_AUTODETECTION_METHOD`.
#[must_use]
pub fn manifest_autodetection(v: &str) -> Autodetection {
    let v = v.trim();
    if let Some(re) = v.strip_prefix("interface=") {
        Autodetection::Interface(re.to_string())
    } else if let Some(re) = v.strip_prefix("skip-interface=") {
        Autodetection::SkipInterface(re.to_string())
    } else if let Some(d) = v.strip_prefix("can-reach=") {
        Autodetection::CanReach(d.to_string())
    } else if let Some(c) = v.strip_prefix("cidr=") {
        Autodetection::Cidrs(c.split(',').filter_map(|s| s.trim().parse().ok()).collect())
    } else if v == "kubernetes-internal-ip" {
        Autodetection::KubernetesInternalIp
    } else {
        Autodetection::FirstFound
    }
}

/// Parses the operator's `nodeAddressAutodetectionV4`.
#[must_use]
pub fn operator_autodetection(v: &Value) -> Autodetection {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    if v.get("kubernetes").and_then(Value::as_str) == Some("NodeInternalIP") {
        Autodetection::KubernetesInternalIp
    } else if let Some(re) = s("interface") {
        Autodetection::Interface(re)
    } else if let Some(re) = s("skipInterface") {
        Autodetection::SkipInterface(re)
    } else if let Some(d) = s("canReach") {
        Autodetection::CanReach(d)
    } else if let Some(c) = v.get("cidrs").and_then(Value::as_array) {
        Autodetection::Cidrs(
            c.iter()
                .filter_map(Value::as_str)
                .filter_map(|s| s.parse().ok())
                .collect(),
        )
    } else {
        Autodetection::FirstFound
    }
}

impl KubeCluster {
    async fn get_dynamic(
        &self,
        ar: &ApiResource,
        name: &str,
    ) -> Result<Option<DynamicObject>, PortError> {
        let api: Api<DynamicObject> = Api::all_with(self.inner.client.clone(), ar);
        match api.get_opt(name).await {
            Ok(o) => Ok(o),
            // The CRD is not installed: the same as no object.
            Err(e) if api_code(&e) == Some(404) => Ok(None),
            Err(e) => Err(port_error("get", format!("{} {name}", ar.plural), e)),
        }
    }
}

#[async_trait]
impl OldCni for KubeCluster {
    /// Reads, in this order: `ippools.crd.projectcalico.org` (LIST), FelixConfiguration `default`
    /// (`vxlanPort`, default 4789; `bpfEnabled`, `nftablesMode`), `Installation default`
    /// (`operator.tigera.io/v1`: pools when no IPPool objects exist yet, `linuxDataplane`,
    /// `nodeAddressAutodetectionV4`); without an Installation, the DaemonSet
    /// `kube-system/calico-node`'s env `IP_AUTODETECTION_METHOD`.
    ///
    /// `bgp` means native routing: an enabled pool without encapsulation.
    ///
    /// # RBAC
    /// `list ippools`, `get felixconfigurations` (`crd.projectcalico.org`), `get installations`
    /// (`operator.tigera.io`), `get daemonsets`.
    ///
    /// # Errors
    /// Any read failure (a missing CRD is not one).
    async fn facts(&self) -> Result<CalicoFacts, PortError> {
        let mut facts = CalicoFacts::default();
        let pools_ar = resource("crd.projectcalico.org", "v1", "IPPool", "ippools");
        let pools: Api<DynamicObject> = Api::all_with(self.inner.client.clone(), &pools_ar);
        let pool_list = match pools.list(&ListParams::default()).await {
            Ok(l) => l.items,
            Err(e) if api_code(&e) == Some(404) => Vec::new(),
            Err(e) => return Err(port_error("list", "ippools.crd.projectcalico.org", e)),
        };
        for p in &pool_list {
            let spec = &p.data["spec"];
            let Some(cidr) = spec["cidr"].as_str().and_then(|c| c.parse().ok()) else {
                continue; // IPv6 pools are out of scope.
            };
            facts.ip_pools.push(IpPool {
                name: p.metadata.name.clone().unwrap_or_default(),
                cidr,
                encapsulation: pool_encapsulation(spec),
                nat_outgoing: spec["natOutgoing"].as_bool().unwrap_or(false),
                disabled: spec["disabled"].as_bool().unwrap_or(false),
            });
        }

        let felix_ar = resource(
            "crd.projectcalico.org",
            "v1",
            "FelixConfiguration",
            "felixconfigurations",
        );
        if let Some(f) = self.get_dynamic(&felix_ar, "default").await? {
            let spec = &f.data["spec"];
            if let Some(port) = spec["vxlanPort"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
            {
                facts.vxlan_port = port;
            }
            if spec["bpfEnabled"].as_bool() == Some(true) {
                facts.dataplane = Dataplane::Bpf;
            } else if spec["nftablesMode"].as_str() == Some("Enabled") {
                facts.dataplane = Dataplane::Nftables;
            }
        }

        let inst_ar = resource("operator.tigera.io", "v1", "Installation", "installations");
        if let Some(inst) = self.get_dynamic(&inst_ar, "default").await? {
            facts.install = CalicoInstall::Operator;
            let net = &inst.data["spec"]["calicoNetwork"];
            if facts.ip_pools.is_empty() {
                for (i, p) in net["ipPools"].as_array().into_iter().flatten().enumerate() {
                    let Some(cidr) = p["cidr"].as_str().and_then(|c| c.parse().ok()) else {
                        continue;
                    };
                    facts.ip_pools.push(IpPool {
                        name: p["name"]
                            .as_str()
                            .map_or_else(|| format!("installation-pool-{i}"), str::to_string),
                        cidr,
                        encapsulation: operator_encapsulation(
                            p["encapsulation"].as_str().unwrap_or("IPIP"),
                        ),
                        nat_outgoing: p["natOutgoing"].as_str() != Some("Disabled"),
                        disabled: p["disableNewAllocations"].as_bool().unwrap_or(false),
                    });
                }
            }
            facts.dataplane = match net["linuxDataplane"].as_str() {
                Some("BPF") => Dataplane::Bpf,
                Some("VPP") => Dataplane::Vpp,
                Some("Nftables") => Dataplane::Nftables,
                Some("Iptables") => Dataplane::Iptables,
                _ => facts.dataplane,
            };
            facts.autodetection = operator_autodetection(&net["nodeAddressAutodetectionV4"]);
        } else {
            facts.install = CalicoInstall::Manifest;
            let ds: Api<DaemonSet> = Api::namespaced(self.inner.client.clone(), "kube-system");
            let d = ds
                .get_opt("calico-node")
                .await
                .map_err(|e| port_error("get", "daemonset kube-system/calico-node", e))?;
            let method = d
                .and_then(|d| d.spec)
                .and_then(|s| s.template.spec)
                .and_then(|s| s.containers.into_iter().find(|c| c.name == "calico-node"))
                .and_then(|c| c.env)
                .and_then(|env| {
                    env.into_iter()
                        .find(|e| e.name == "IP_AUTODETECTION_METHOD")
                })
                .and_then(|e| e.value);
            facts.autodetection = method
                .as_deref()
                .map_or(Autodetection::FirstFound, manifest_autodetection);
        }
        facts.bgp = facts
            .ip_pools
            .iter()
            .any(|p| !p.disabled && p.encapsulation == Encapsulation::None);
        Ok(facts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn encapsulation_and_autodetection() {
        assert_eq!(
            pool_encapsulation(&json!({"vxlanMode": "Always"})),
            Encapsulation::Vxlan
        );
        assert_eq!(
            pool_encapsulation(&json!({"ipipMode": "CrossSubnet", "vxlanMode": "Never"})),
            Encapsulation::IpipCrossSubnet
        );
        assert_eq!(pool_encapsulation(&json!({})), Encapsulation::None);
        assert_eq!(
            operator_encapsulation("VXLANCrossSubnet"),
            Encapsulation::VxlanCrossSubnet
        );
        assert_eq!(
            manifest_autodetection("interface=eth.*"),
            Autodetection::Interface("eth.*".into())
        );
        assert_eq!(
            manifest_autodetection("kubernetes-internal-ip"),
            Autodetection::KubernetesInternalIp
        );
        assert_eq!(
            operator_autodetection(&json!({"kubernetes": "NodeInternalIP"})),
            Autodetection::KubernetesInternalIp
        );
        assert_eq!(
            operator_autodetection(&json!({"firstFound": true})),
            Autodetection::FirstFound
        );
    }
}
