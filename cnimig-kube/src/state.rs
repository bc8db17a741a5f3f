//! [`StateStore`] on the Kubernetes API: node records in the Node annotation
//! [`STATE_ANNOTATION`], written with JSON Patch `test` operations, and the run lock as a
//! `coordination.k8s.io/v1` Lease written with `resourceVersion` preconditions.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use cnimig_core::machine::{NodeRecord, STATE_ANNOTATION};
use cnimig_core::model::{NodeName, Time};
use cnimig_core::ports::{LockOutcome, NodeChange, PortError, StateStore};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::KubeCluster;
use crate::error::{api_code, port_error};

/// The JSON Pointer of the state annotation (`/` escaped as `~1`).
fn annotation_path(key: &str) -> String {
    format!(
        "/metadata/annotations/{}",
        key.replace('~', "~0").replace('/', "~1")
    )
}

/// The JSON Patch that replaces the record if it still is `prev`.
///
/// For `prev == None` JSON Patch has no "absent" test (a `test` with value `null` passes on the
/// API server even when the key exists: checked by the integration tests), so the caller reads
/// the node, sees the annotation absent at `resource_version`, and the patch tests that
/// `resourceVersion`; `annotations_exist` says whether to add into the map or create it.
#[must_use]
pub fn record_patch(
    prev: Option<&NodeRecord>,
    next: &NodeRecord,
    resource_version: &str,
    annotations_exist: bool,
) -> Value {
    let path = annotation_path(STATE_ANNOTATION);
    match prev {
        Some(p) => json!([
            {"op": "test", "path": path, "value": p.to_annotation()},
            {"op": "replace", "path": path, "value": next.to_annotation()},
        ]),
        None if annotations_exist => json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version},
            {"op": "add", "path": path, "value": next.to_annotation()},
        ]),
        None => json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version},
            {"op": "add", "path": "/metadata/annotations",
             "value": {STATE_ANNOTATION: next.to_annotation()}},
        ]),
    }
}

/// The JSON Patch operation of a node change carried by a record save.
#[must_use]
pub fn change_op(change: &NodeChange) -> Value {
    match change {
        NodeChange::Unschedulable(b) => {
            json!({"op": "add", "path": "/spec/unschedulable", "value": b})
        }
        NodeChange::Label {
            key,
            value: Some(v),
        } => json!({"op": "add", "path": label_path(key), "value": v}),
        NodeChange::Label { key, value: None } => {
            json!({"op": "remove", "path": label_path(key)})
        }
    }
}

fn label_path(key: &str) -> String {
    format!(
        "/metadata/labels/{}",
        key.replace('~', "~0").replace('/', "~1")
    )
}

fn micro(t: Time) -> Option<MicroTime> {
    Timestamp::from_millisecond(i64::try_from(t.0).ok()?)
        .ok()
        .map(MicroTime)
}

fn millis(t: &MicroTime) -> u64 {
    u64::try_from(t.0.as_millisecond()).unwrap_or(0)
}

impl KubeCluster {
    /// Keeps the Lease as our write returned it (see [`acquire_lock`](StateStore::acquire_lock)).
    fn keep_lease(&self, lease: Lease) {
        if let Ok(mut g) = self.inner.lease.lock() {
            *g = Some(lease);
        }
    }

    /// The Lease kept by [`keep_lease`](Self::keep_lease), taken: a write that fails or a reader
    /// that finds another holder leaves none.
    fn take_kept_lease(&self) -> Option<Lease> {
        self.inner.lease.lock().ok().and_then(|mut g| g.take())
    }

    /// `kept` (the Lease our last write returned) when there is one, else the Lease as the API
    /// server holds it (one GET).
    async fn kept_or_read(
        &self,
        kept: Option<Lease>,
        api: &Api<Lease>,
        what: &str,
    ) -> Result<Option<Lease>, PortError> {
        match kept {
            Some(l) => Ok(Some(l)),
            None => api
                .get_opt(self.inner.opts.lock_name.as_str())
                .await
                .map_err(|e| port_error("get", what, e)),
        }
    }

    fn set_lock_renewed_before(&self, t: Option<Time>) {
        if let Ok(mut g) = self.inner.lock_renewed_before.lock() {
            *g = t;
        }
    }

    /// Writes a node's first record (none is stored), with `change` in the same patch when given.
    async fn save_first(
        &self,
        node: &NodeName,
        next: &NodeRecord,
        change: Option<&NodeChange>,
        what: &str,
    ) -> Result<(), PortError> {
        for attempt in 0..5 {
            // The node watch's copy first, when it shows no record (a stale copy fails the
            // `resourceVersion` test and the next attempt reads the API server); a copy that
            // shows one is confirmed by a read before refusing.
            let cached = match attempt {
                0 => self.cached_node(node).await?.filter(|n| {
                    !n.metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.contains_key(STATE_ANNOTATION))
                }),
                _ => None,
            };
            let meta = match cached {
                Some(n) => n.metadata,
                None => {
                    self.nodes()
                        .get_metadata(node.as_str())
                        .await
                        .map_err(|e| port_error("get", format!("node {node}"), e))?
                        .metadata
                }
            };
            let annotations = meta.annotations.as_ref();
            if annotations.is_some_and(|a| a.contains_key(STATE_ANNOTATION)) {
                return Err(PortError::Conflict {
                    what: what.to_string(),
                });
            }
            let rv = meta.resource_version.clone().unwrap_or_default();
            let mut ops = record_patch(None, next, &rv, annotations.is_some());
            if let (Some(c), Some(list)) = (change, ops.as_array_mut()) {
                list.push(change_op(c));
            }
            match self.json_patch_node(node, ops).await {
                Ok(()) => return Ok(()),
                // The node changed since the read (status, other annotations): read again.
                Err(e) if maybe_failed_test(&e) => continue,
                Err(e) => return Err(port_error("patch", what, e)),
            }
        }
        Err(PortError::Unavailable {
            what: format!("patch {what}"),
            detail: "the node changed under five writes in a row; retry".into(),
        })
    }

    /// The record stored on the node now (one GET of its metadata).
    async fn stored_record(&self, node: &NodeName) -> Result<Option<NodeRecord>, PortError> {
        let n = self
            .nodes()
            .get_metadata(node.as_str())
            .await
            .map_err(|e| port_error("get", format!("node {node}"), e))?;
        Ok(n.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(STATE_ANNOTATION))
            .and_then(|v| NodeRecord::from_annotation(v).ok()))
    }

    pub(crate) fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.inner.client.clone(), &self.inner.opts.system_namespace)
    }

    async fn json_patch_node(&self, node: &NodeName, ops: Value) -> Result<(), kube::Error> {
        let patch: json_patch::Patch =
            serde_json::from_value(ops).map_err(kube::Error::SerdeError)?;
        let n = self
            .nodes()
            .patch(
                node.as_str(),
                &PatchParams::default(),
                &Patch::Json::<()>(patch),
            )
            .await?;
        self.inner.caches.node_written(n);
        Ok(())
    }
}

/// A failed `test` op, or another error that means "the object is not what the patch expected".
/// The API server answers a failed `test` with a bare 422 Invalid ("the server rejected our
/// request due to an error in our request", no cause), so callers confirm by reading the object.
fn maybe_failed_test(e: &kube::Error) -> bool {
    matches!(api_code(e), Some(409 | 422))
}

#[async_trait]
impl StateStore for KubeCluster {
    /// One LIST of node metadata; parses every node's [`STATE_ANNOTATION`].
    ///
    /// # RBAC
    /// `list nodes`.
    ///
    /// # Errors
    /// Any read failure; [`PortError::Invalid`] naming the node when a record does not parse.
    async fn load(&self) -> Result<BTreeMap<NodeName, NodeRecord>, PortError> {
        let list = self
            .nodes()
            .list_metadata(&self.node_list_params())
            .await
            .map_err(|e| port_error("list", "nodes", e))?;
        let mut out = BTreeMap::new();
        for n in list.items {
            let Some(name) = n.metadata.name.and_then(|n| NodeName::new(n).ok()) else {
                continue;
            };
            let Some(v) = n
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(STATE_ANNOTATION))
            else {
                continue;
            };
            let rec = NodeRecord::from_annotation(v).map_err(|e| PortError::Invalid {
                what: format!("read the migration record of node {name}"),
                detail: e.to_string(),
            })?;
            out.insert(name, rec);
        }
        Ok(out)
    }

    /// With `prev`: one JSON PATCH of the node that `test`s the annotation holds `prev`, then
    /// replaces it (no read first). Without `prev`: GET the node's metadata, refuse if the
    /// annotation exists, and PATCH with a `test` of the `resourceVersion` read; when something
    /// else changed the node meanwhile (status, other annotations), read again, up to five times.
    ///
    /// # RBAC
    /// `patch nodes`.
    ///
    /// The API server answers a failed `test` with a bare 422; the adapter then reads the node
    /// to tell a conflict (the record is not `prev`) from a rejected patch.
    ///
    /// # Errors
    /// [`PortError::Conflict`] when the stored record is not `prev` (someone else wrote it);
    /// [`PortError::NotFound`] when the node is gone; [`PortError::Unavailable`] when the node
    /// kept changing under a first write.
    async fn save(
        &self,
        node: &NodeName,
        prev: Option<&NodeRecord>,
        next: &NodeRecord,
    ) -> Result<(), PortError> {
        let what = format!("annotation {STATE_ANNOTATION} of node {node}");
        let Some(prev) = prev else {
            return self.save_first(node, next, None, &what).await;
        };
        match self
            .json_patch_node(node, record_patch(Some(prev), next, "", true))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if maybe_failed_test(&e) => {
                // Confirm: is the stored record still `prev`? Then the patch itself was bad.
                if self.stored_record(node).await?.as_ref() == Some(prev) {
                    Err(port_error("patch", what, e))
                } else {
                    Err(PortError::Conflict { what })
                }
            }
            Err(e) => Err(port_error("patch", what, e)),
        }
    }

    /// One JSON PATCH of the node: `test` that the annotation holds `prev`, `replace` it with
    /// `next`, and the change (`add /spec/unschedulable`, `add` or `remove` of the label). The
    /// API server applies all operations or none, so the concurrent-writer check of
    /// [`save`](StateStore::save) holds for the change too. Without `prev` (a first record,
    /// which the run writes with the node's cordon), the patch `test`s the `resourceVersion`
    /// as [`save`](StateStore::save) does, and carries the change.
    ///
    /// # RBAC
    /// `patch nodes`.
    ///
    /// A 422 is confirmed by reading the node, as for `save`: the record is not `prev` →
    /// [`PortError::Conflict`]; it is → the change itself did not apply (say, removing a label
    /// that is gone), nothing was written, `Ok(false)`, and the caller saves and acts apart.
    ///
    /// # Errors
    /// As [`save`](StateStore::save).
    async fn save_with(
        &self,
        node: &NodeName,
        prev: Option<&NodeRecord>,
        next: &NodeRecord,
        change: &NodeChange,
    ) -> Result<bool, PortError> {
        let what = format!("annotation {STATE_ANNOTATION} of node {node} ({change:?})");
        let Some(prev) = prev else {
            return self
                .save_first(node, next, Some(change), &what)
                .await
                .map(|()| true);
        };
        let mut ops = record_patch(Some(prev), next, "", true);
        if let Some(list) = ops.as_array_mut() {
            list.push(change_op(change));
        }
        match self.json_patch_node(node, ops).await {
            Ok(()) => Ok(true),
            Err(e) if maybe_failed_test(&e) => {
                if self.stored_record(node).await?.as_ref() == Some(prev) {
                    Ok(false)
                } else {
                    Err(PortError::Conflict { what })
                }
            }
            Err(e) => Err(port_error("patch", what, e)),
        }
    }

    /// GET the Lease; CREATE it when absent, or UPDATE it (with the read `resourceVersion`) when
    /// we hold it, nobody does, or the holder's `renewTime + leaseDurationSeconds` is before
    /// `now`. A lost race (409) re-reads, up to three times. A renewal skips the GET: it sends
    /// back the Lease our last write returned, whose `resourceVersion` makes the UPDATE 409 if
    /// anyone else wrote it since (then it reads and decides as above).
    ///
    /// Taking the lock turns on the adapter's watch-fed caches (the module `watch`: nodes,
    /// budgets, each looked-at node's pods) for the run's reads; losing it to another holder or
    /// releasing it turns them off and closes the watches.
    ///
    /// # RBAC
    /// `get`, `create`, `update leases` (`coordination.k8s.io`) in the system namespace.
    ///
    /// # Errors
    /// Any read or write failure; [`PortError::Conflict`] after three lost races (four tries with a renewal's).
    async fn acquire_lock(
        &self,
        holder: &str,
        now: Time,
        ttl: Duration,
    ) -> Result<LockOutcome, PortError> {
        let api = self.leases();
        let name = self.inner.opts.lock_name.as_str();
        let what = format!("lease {}/{name}", self.inner.opts.system_namespace);
        let secs = i32::try_from(ttl.as_secs().max(1)).unwrap_or(i32::MAX);
        // The Lease as our last write returned it: a renewal (or a release) sends it back with
        // its resourceVersion, without reading it first. Anyone else's write since makes that
        // 409 (or 404 if deleted), and the next try reads it.
        let mut cached = self
            .take_kept_lease()
            .filter(|l| l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(holder));
        for _ in 0..4 {
            let from_cache = cached.is_some();
            let current = self.kept_or_read(cached.take(), &api, &what).await?;
            let Some(mut lease) = current else {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.to_string()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(holder.to_string()),
                        acquire_time: micro(now),
                        renew_time: micro(now),
                        lease_duration_seconds: Some(secs),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                match api.create(&PostParams::default(), &lease).await {
                    Ok(written) => {
                        self.keep_lease(written);
                        self.set_lock_renewed_before(None);
                        self.inner.caches.activate();
                        return Ok(LockOutcome::Acquired);
                    }
                    Err(e) if api_code(&e) == Some(409) => continue,
                    Err(e) => return Err(port_error("create", &what, e)),
                }
            };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            let current_holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
            let until = spec.renew_time.as_ref().map_or(0, millis).saturating_add(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0) * 1000,
            );
            let current = current_holder.as_deref().map(|h| (h, Time(until)));
            if let held @ LockOutcome::HeldBy { .. } =
                cnimig_core::ports::lock_decision(current, holder, now)
            {
                self.inner.caches.deactivate();
                return Ok(held);
            }
            if current_holder.as_deref() != Some(holder) {
                spec.acquire_time = micro(now);
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            let renewed_before = spec.renew_time.as_ref().map(|t| Time(millis(t)));
            spec.holder_identity = Some(holder.to_string());
            spec.renew_time = micro(now);
            spec.lease_duration_seconds = Some(secs);
            // `replace` sends the resourceVersion we read: a concurrent writer makes it 409.
            match api.replace(name, &PostParams::default(), &lease).await {
                Ok(written) => {
                    self.keep_lease(written);
                    self.set_lock_renewed_before(renewed_before);
                    self.inner.caches.activate();
                    return Ok(LockOutcome::Acquired);
                }
                Err(e) if api_code(&e) == Some(409) => continue,
                Err(e) if from_cache && api_code(&e) == Some(404) => continue,
                Err(e) => return Err(port_error("update", &what, e)),
            }
        }
        Err(PortError::Conflict { what })
    }

    /// The Lease's `renewTime` as the latest successful [`acquire_lock`](Self::acquire_lock)
    /// read it, before it wrote its own (no request).
    fn previous_lock_renewal(&self) -> Option<Time> {
        self.inner.lock_renewed_before.lock().ok().and_then(|g| *g)
    }

    /// Clears the holder (UPDATE with the read `resourceVersion`) if `holder` holds the Lease;
    /// like a renewal, from the Lease our last write returned when there is one.
    ///
    /// # RBAC
    /// `get`, `update leases`.
    ///
    /// # Errors
    /// Any read or write failure.
    async fn release_lock(&self, holder: &str) -> Result<(), PortError> {
        // The watches are the run's: stop them whatever the Lease says.
        self.inner.caches.deactivate();
        let api = self.leases();
        let name = self.inner.opts.lock_name.as_str();
        let what = format!("lease {}/{name}", self.inner.opts.system_namespace);
        let mut cached = self.take_kept_lease();
        for _ in 0..4 {
            let from_cache = cached.is_some();
            let current = self.kept_or_read(cached.take(), &api, &what).await?;
            let Some(mut lease) = current else {
                return Ok(());
            };
            let Some(spec) = lease.spec.as_mut() else {
                return Ok(());
            };
            if spec.holder_identity.as_deref() != Some(holder) {
                return Ok(());
            }
            spec.holder_identity = None;
            match api.replace(name, &PostParams::default(), &lease).await {
                Ok(_) => return Ok(()),
                Err(e) if api_code(&e) == Some(409) => continue,
                Err(e) if from_cache && api_code(&e) == Some(404) => continue,
                Err(e) => return Err(port_error("update", &what, e)),
            }
        }
        Err(PortError::Conflict { what })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_tests_the_previous_value() {
        let prev = NodeRecord::new(Time(1));
        let next = NodeRecord::new(Time(2));
        let p = record_patch(Some(&prev), &next, "", true);
        assert_eq!(p[0]["op"], "test");
        assert_eq!(p[0]["path"], "/metadata/annotations/cnimig.io~1migration");
        assert_eq!(p[0]["value"], json!(prev.to_annotation()));
        assert_eq!(p[1]["op"], "replace");
        let p = record_patch(None, &next, "42", true);
        assert_eq!(p[0]["path"], "/metadata/resourceVersion");
        assert_eq!(p[0]["value"], "42");
        assert_eq!(p[1]["op"], "add");
        let p = record_patch(None, &next, "42", false);
        assert_eq!(p[1]["path"], "/metadata/annotations");
    }

    #[test]
    fn changes_become_patch_operations() {
        assert_eq!(
            change_op(&NodeChange::Unschedulable(true)),
            json!({"op": "add", "path": "/spec/unschedulable", "value": true})
        );
        let key = "io.cilium.migration/cilium-default".to_string();
        assert_eq!(
            change_op(&NodeChange::Label {
                key: key.clone(),
                value: Some("true".into())
            }),
            json!({"op": "add", "path": "/metadata/labels/io.cilium.migration~1cilium-default", "value": "true"})
        );
        assert_eq!(
            change_op(&NodeChange::Label { key, value: None })["op"],
            "remove"
        );
    }

    #[test]
    fn lease_times_round_trip() {
        let t = Time(1_700_000_000_123);
        assert_eq!(micro(t).as_ref().map(millis), Some(t.0));
    }
}
