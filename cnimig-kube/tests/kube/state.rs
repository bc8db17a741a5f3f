//! The state store's compare-and-swap and the Lease.

use std::time::Duration;

use cnimig_core::machine::{NodeRecord, Phase, STATE_ANNOTATION};
use cnimig_core::model::{NodeName, Time};
use cnimig_core::ports::{LockOutcome, PortError, StateStore};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::common::{self, create_node, delete_node, labels, unique};

#[tokio::test]
async fn record_writes_are_compare_and_swap() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "state", |ns| async move {
        let node = unique("state");
        create_node(&admin, &node, labels(&[])).await;
        let store = env.cluster(common::opts(&ns));
        let name = NodeName::new(node.clone()).unwrap();

        let r1 = NodeRecord::new(Time(1));
        store.save(&name, None, &r1).await.unwrap();
        assert!(
            matches!(store.save(&name, None, &r1).await, Err(PortError::Conflict { .. })),
            "a second first write conflicts (the annotation is no longer absent)"
        );
        // The API server's JSON Patch fails a `test` with a bare 422 (no cause, nothing about a
        // test), which is why the adapter re-reads the node to confirm a conflict.
        let nodes: Api<Node> = Api::all(admin.clone());
        let null_test: json_patch::Patch = serde_json::from_value(json!([
            {"op": "test", "path": "/metadata/annotations/cnimig.io~1migration", "value": null}
        ]))
        .unwrap();
        match nodes.patch(&node, &PatchParams::default(), &Patch::Json::<()>(null_test)).await {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 422, "{s:?}"),
            other => panic!("a failed test must be refused: {:?}", other.map(|_| ())),
        }
        let mut r2 = r1.clone();
        r2.phase = Phase::Cordoned;
        store.save(&name, Some(&r1), &r2).await.unwrap();
        assert_eq!(store.load().await.unwrap()[&name], r2);

        // A concurrent writer changes the record: our next write must fail, not overwrite.
        let mut theirs = r2.clone();
        theirs.phase = Phase::Drained;
        nodes
            .patch(
                &node,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {STATE_ANNOTATION: theirs.to_annotation()}}})),
            )
            .await
            .unwrap();
        let mut r3 = r2.clone();
        r3.phase = Phase::Drained;
        r3.since = Time(3);
        assert!(matches!(
            store.save(&name, Some(&r2), &r3).await,
            Err(PortError::Conflict { .. })
        ));
        assert_eq!(store.load().await.unwrap()[&name], theirs);
        delete_node(&admin, &node).await;
    })
    .await;
}

#[tokio::test]
async fn one_lease_holder_at_a_time() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "lease", |ns| async move {
        let store = env.cluster(common::opts(&ns));
        let now = cnimig_kube::SystemClock::unix_now();
        let ttl = Duration::from_secs(30);
        assert_eq!(
            store.acquire_lock("run-a", now, ttl).await.unwrap(),
            LockOutcome::Acquired
        );
        assert_eq!(store.previous_lock_renewal(), None, "no Lease before");
        match store.acquire_lock("run-b", now, ttl).await.unwrap() {
            LockOutcome::HeldBy { holder, until } => {
                assert_eq!(holder, "run-a");
                assert!(
                    until >= now.after(ttl) && until <= now.after(ttl + Duration::from_secs(1))
                );
            }
            other => panic!("second holder must be refused: {other:?}"),
        }
        assert_eq!(
            store
                .acquire_lock("run-a", now.after(Duration::from_secs(5)), ttl)
                .await
                .unwrap(),
            LockOutcome::Acquired,
            "the holder renews"
        );
        assert_eq!(store.previous_lock_renewal(), Some(now));
        // run-a dies: after its TTL, run-b takes over.
        let later = now.after(Duration::from_secs(40));
        assert_eq!(
            store.acquire_lock("run-b", later, ttl).await.unwrap(),
            LockOutcome::Acquired
        );
        assert_eq!(
            store.previous_lock_renewal(),
            Some(now.after(Duration::from_secs(5))),
            "run-a was last known alive at its renewal"
        );
        store.release_lock("run-a").await.unwrap(); // not the holder: no effect
        assert!(matches!(
            store.acquire_lock("run-c", later, ttl).await.unwrap(),
            LockOutcome::HeldBy { .. }
        ));
        store.release_lock("run-b").await.unwrap();
        assert_eq!(
            store.acquire_lock("run-c", later, ttl).await.unwrap(),
            LockOutcome::Acquired
        );
    })
    .await;
}

/// A renewal sends back the Lease its last write returned, without reading it first: a run whose
/// Lease another run took over (after it expired) must find that out from the 409, not renew
/// over it, and its release must leave the new holder's Lease alone.
#[tokio::test]
async fn a_renewal_without_a_read_still_sees_a_takeover() {
    let env = crate::env_or_skip!();
    let admin = env.admin.clone();
    common::with_temp_ns(admin.clone(), "lease-takeover", |ns| async move {
        let a = env.cluster(common::opts(&ns));
        let b = env.cluster(common::opts(&ns));
        let now = cnimig_kube::SystemClock::unix_now();
        let ttl = Duration::from_secs(30);
        let at = |s: u64| now.after(Duration::from_secs(s));
        assert_eq!(
            a.acquire_lock("run-a", now, ttl).await.unwrap(),
            LockOutcome::Acquired
        );
        assert_eq!(
            a.acquire_lock("run-a", at(10), ttl).await.unwrap(),
            LockOutcome::Acquired
        );
        // run-a stalls; once its Lease expired, run-b takes it.
        assert_eq!(
            b.acquire_lock("run-b", at(45), ttl).await.unwrap(),
            LockOutcome::Acquired
        );
        assert_eq!(b.previous_lock_renewal(), Some(at(10)));
        match a.acquire_lock("run-a", at(46), ttl).await.unwrap() {
            LockOutcome::HeldBy { holder, .. } => assert_eq!(holder, "run-b"),
            other => panic!("run-a renewed over run-b's Lease: {other:?}"),
        }
        a.release_lock("run-a").await.unwrap();
        match a.acquire_lock("run-c", at(47), ttl).await.unwrap() {
            LockOutcome::HeldBy { holder, .. } => assert_eq!(holder, "run-b"),
            other => panic!("run-a's release cleared run-b's Lease: {other:?}"),
        }
        // run-b renews from its own write, then releases; the next run takes it at once.
        assert_eq!(
            b.acquire_lock("run-b", at(50), ttl).await.unwrap(),
            LockOutcome::Acquired
        );
        assert_eq!(b.previous_lock_renewal(), Some(at(45)));
        b.release_lock("run-b").await.unwrap();
        assert_eq!(
            a.acquire_lock("run-c", at(51), ttl).await.unwrap(),
            LockOutcome::Acquired
        );
    })
    .await;
}
