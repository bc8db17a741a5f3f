//! [`FinalizePort`] on the Kubernetes API: the [`FinalRecord`] in the annotation
//! [`FINAL_ANNOTATION`] of the Lease `cnimig-final` in the system namespace, replaced with a
//! `resourceVersion` precondition (compare-and-swap), and the `CiliumNodeConfig` deleted at the
//! version API discovery finds.
//!
//! Exercised by `cnimig-kube/tests/finalize` on the test control plane.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use cnimig_core::finalize::{FINAL_ANNOTATION, FinalPorts, FinalRecord, FinalizePort};
use cnimig_core::ports::PortError;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};

use crate::KubeCluster;
use crate::error::port_error;

/// The Lease's name (in the system namespace).
pub const FINAL_LEASE_NAME: &str = "cnimig-final";

fn record_of(lease: &Lease) -> Result<Option<FinalRecord>, PortError> {
    match lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(FINAL_ANNOTATION))
    {
        None => Ok(None),
        Some(text) => FinalRecord::from_annotation(text)
            .map(Some)
            .map_err(|detail| PortError::Invalid {
                what: format!("lease {FINAL_LEASE_NAME}"),
                detail,
            }),
    }
}

impl KubeCluster {
    /// Every port finalize (and clean-up, through it) drives, on this one adapter and the
    /// system clock.
    pub fn final_ports(&self) -> FinalPorts {
        FinalPorts {
            cluster: Arc::new(self.clone()),
            cilium: Arc::new(self.clone()),
            store: Arc::new(self.clone()),
            finalize: Arc::new(self.clone()),
            allow: Arc::new(self.clone()),
            clock: Arc::new(crate::SystemClock),
        }
    }
}

#[async_trait]
impl FinalizePort for KubeCluster {
    /// # RBAC
    /// `get` on `leases` (`coordination.k8s.io`) in the system namespace.
    async fn load_final(&self) -> Result<Option<FinalRecord>, PortError> {
        let lease = self
            .leases()
            .get_opt(FINAL_LEASE_NAME)
            .await
            .map_err(|e| port_error("get", format!("lease {FINAL_LEASE_NAME}"), e))?;
        match lease {
            None => Ok(None),
            Some(l) => record_of(&l),
        }
    }

    /// Reads the Lease, checks it holds `prev`, and replaces it at the `resourceVersion` it
    /// read (a concurrent writer makes the API server answer 409, mapped to
    /// [`PortError::Conflict`]). With no Lease and `prev == None` it creates the Lease.
    ///
    /// # RBAC
    /// `get`, `create`, `update` on `leases` in the system namespace.
    async fn save_final(
        &self,
        prev: Option<&FinalRecord>,
        next: &FinalRecord,
    ) -> Result<(), PortError> {
        let what = format!("lease {FINAL_LEASE_NAME} annotation {FINAL_ANNOTATION}");
        let api = self.leases();
        let lease = api
            .get_opt(FINAL_LEASE_NAME)
            .await
            .map_err(|e| port_error("get", what.clone(), e))?;
        match lease {
            None if prev.is_none() => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(FINAL_LEASE_NAME.into()),
                        annotations: Some(BTreeMap::from([(
                            FINAL_ANNOTATION.to_string(),
                            next.to_annotation(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    spec: None,
                };
                api.create(&PostParams::default(), &lease)
                    .await
                    .map(|_| ())
                    .map_err(|e| port_error("create", what, e))
            }
            None => Err(PortError::Conflict { what }),
            Some(mut l) => {
                if record_of(&l)?.as_ref() != prev {
                    return Err(PortError::Conflict { what });
                }
                l.metadata
                    .annotations
                    .get_or_insert_with(BTreeMap::new)
                    .insert(FINAL_ANNOTATION.to_string(), next.to_annotation());
                api.replace(FINAL_LEASE_NAME, &PostParams::default(), &l)
                    .await
                    .map(|_| ())
                    .map_err(|e| port_error("update", what, e))
            }
        }
    }

    /// # RBAC
    /// `delete` on `ciliumnodeconfigs` (`cilium.io`) in the Cilium namespace.
    async fn delete_node_config(&self, name: &str) -> Result<(), PortError> {
        let version = self.node_config_api().await?;
        let gvk = GroupVersionKind::gvk(
            "cilium.io",
            version.api_version().trim_start_matches("cilium.io/"),
            "CiliumNodeConfig",
        );
        let ar = ApiResource::from_gvk_with_plural(&gvk, "ciliumnodeconfigs");
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client().clone(), &self.options().cilium_namespace, &ar);
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(port_error("delete", format!("ciliumnodeconfig {name}"), e)),
        }
    }
}
