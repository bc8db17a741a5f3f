//! Calico's facts read from real objects.

use cnimig_core::model::{Autodetection, CalicoInstall, Dataplane, Encapsulation};
use cnimig_core::ports::OldCni;
use kube::Client;

use crate::common;

/// The cluster-scoped Calico objects every test that reads facts shares (identical in each, so
/// tests running in parallel agree): an operator install with a VXLAN pool, Felix on port 4789
/// and autodetection by the node's InternalIP.
pub async fn calico_objects(client: &Client) {
    cnimig_emu::setup::calico_objects(client)
        .await
        .expect("Calico objects");
}

#[tokio::test]
async fn facts_from_pools_felix_and_installation() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "calico", |ns| async move {
        calico_objects(&admin).await;
        let facts = env.cluster(common::opts(&ns)).facts().await.unwrap();
        assert_eq!(facts.install, CalicoInstall::Operator);
        assert_eq!(facts.vxlan_port, 4789);
        assert_eq!(facts.dataplane, Dataplane::Iptables);
        assert_eq!(facts.autodetection, Autodetection::KubernetesInternalIp);
        let pool = facts
            .ip_pools
            .iter()
            .find(|p| p.name == "default-ipv4-ippool")
            .expect("the pool");
        assert_eq!(pool.cidr.to_string(), "10.42.0.0/16");
        assert_eq!(pool.encapsulation, Encapsulation::Vxlan);
        assert!(pool.nat_outgoing && !facts.bgp);
    })
    .await;
}
