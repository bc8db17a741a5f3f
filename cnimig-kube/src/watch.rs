//! Watch-fed caches of Nodes, PodDisruptionBudgets and each looked-at node's Pods, used while
//! this adapter holds the run lock (issue #5, API economy).
//!
//! A run looks at every node in flight once per poll (node, pods, agent, CNI directory) and at
//! the budgets of the candidate nodes before starting any; answered by GETs and LISTs, that was
//! most of a run's requests. While the adapter holds the run lock
//! ([`StateStore::acquire_lock`](cnimig_core::ports::StateStore::acquire_lock) answered
//! `Acquired`), those reads come from caches instead:
//!
//! - one watch of the Nodes the adapter sees ([`KubeOptions::node_selector`](crate::KubeOptions)),
//!   started at the first read;
//! - one watch of all PodDisruptionBudgets, started at the first budget read;
//! - per node, one watch of its Pods with `fieldSelector=spec.nodeName=<node>` (never a
//!   cluster-wide pod watch), started at the first read of that node's pods and stopped after
//!   [`IDLE`] without a read.
//!
//! Each watch is `kube::runtime::watcher`: a LIST (a quorum read, `resourceVersion` unset), then a
//! WATCH from the list's `resourceVersion`, re-opened when the server ends it (every 290 s) and
//! re-listed when the `resourceVersion` expired (410 Gone). Every cache stops when the lock is
//! released or the adapter is dropped.
//!
//! Freshness: a cache reflects the API server as of its last event, typically milliseconds behind;
//! this is the same as a LIST sent that much earlier. The adapter's own writes of a Node (cordon,
//! label, record saves) are put into the node cache from the write's response at once, so a look
//! right after a write sees it. A cache whose watch failed (a dropped connection, a 5xx) is not
//! used until its watch delivers again: reads then go to the API server directly, as without a
//! lock. A watch refused with 401/403 makes the read fail with `Forbidden` naming `watch`
//! (grant it in `deploy/rbac.yaml`) rather than silently costing a LIST per read.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use cnimig_core::model::NodeName;
use cnimig_core::ports::PortError;
use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Resource;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;
use tokio::sync::watch as chan;

/// A node's pod cache not read for this long is stopped (its watch closed).
pub(crate) const IDLE: Duration = Duration::from_secs(60);

/// How long a first read waits for a new cache's initial LIST before reading directly.
const FIRST_SYNC: Duration = Duration::from_secs(15);

/// Where a cache stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SyncState {
    /// The initial LIST has not completed yet.
    Starting,
    /// Complete as of the last event.
    Synced,
    /// The watch failed; not used until it delivers again.
    Lost,
    /// The watch (or its LIST) was refused: the verb and what.
    Forbidden(&'static str),
}

/// The resourceVersion as a number, when it is one (etcd revisions are).
fn rv<K: Resource>(o: &K) -> Option<u64> {
    o.meta().resource_version.as_deref()?.parse().ok()
}

/// True when `incoming` is at least as new as `current` (unknown versions count as newer).
fn newer<K: Resource>(incoming: &K, current: &K) -> bool {
    match (rv(incoming), rv(current)) {
        (Some(a), Some(b)) => a >= b,
        _ => true,
    }
}

fn key<K: Resource>(o: &K) -> String {
    let m = o.meta();
    match &m.namespace {
        Some(ns) => format!("{ns}/{}", m.name.as_deref().unwrap_or("")),
        None => m.name.clone().unwrap_or_default(),
    }
}

struct State<K> {
    objects: HashMap<String, K>,
    /// Objects of a LIST in progress (between `Init` and `InitDone`).
    buffer: Option<HashMap<String, K>>,
}

/// One watched collection.
pub(crate) struct Cache<K> {
    what: String,
    state: Mutex<State<K>>,
    sync: chan::Sender<SyncState>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
    last_read: Mutex<tokio::time::Instant>,
    /// A read has waited for the initial LIST already (later reads do not wait).
    waited: AtomicBool,
}

impl<K> Drop for Cache<K> {
    fn drop(&mut self) {
        if let Ok(mut t) = self.task.lock()
            && let Some(t) = t.take()
        {
            t.abort();
        }
    }
}

impl<K> Cache<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// An empty cache, not synced, with no watch task; `what` names the collection in errors.
    fn empty(what: String) -> Self {
        let (tx, _) = chan::channel(SyncState::Starting);
        Cache {
            what,
            state: Mutex::new(State {
                objects: HashMap::new(),
                buffer: None,
            }),
            sync: tx,
            task: Mutex::new(None),
            last_read: Mutex::new(tokio::time::Instant::now()),
            waited: AtomicBool::new(false),
        }
    }

    /// Starts watching `api` with `cfg`; `what` names the collection in errors.
    fn start(api: Api<K>, cfg: watcher::Config, what: String) -> Arc<Self> {
        let cache = Arc::new(Self::empty(what));
        let weak = Arc::downgrade(&cache);
        let handle = tokio::spawn(Self::run(api, cfg, weak)).abort_handle();
        if let Ok(mut t) = cache.task.lock() {
            *t = Some(handle);
        }
        cache
    }

    async fn run(api: Api<K>, cfg: watcher::Config, cache: Weak<Self>) {
        let mut events = watcher::watcher(api, cfg).default_backoff().boxed();
        while let Some(ev) = events.next().await {
            let Some(c) = cache.upgrade() else { return };
            c.apply(ev);
        }
    }

    fn set_sync(&self, s: SyncState) {
        self.sync.send_if_modified(|cur| {
            if *cur == s {
                false
            } else {
                *cur = s;
                true
            }
        });
    }

    fn apply(&self, ev: Result<Event<K>, watcher::Error>) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        match ev {
            Ok(Event::Init) => st.buffer = Some(HashMap::new()),
            Ok(Event::InitApply(o)) => {
                if let Some(b) = st.buffer.as_mut() {
                    b.insert(key(&o), o);
                }
            }
            Ok(Event::InitDone) => {
                let mut listed = st.buffer.take().unwrap_or_default();
                // Keep what is newer than the list (a write's response put in meanwhile).
                for (k, cur) in st.objects.drain() {
                    if let Some(l) = listed.get_mut(&k)
                        && !newer(l, &cur)
                    {
                        *l = cur;
                    }
                }
                st.objects = listed;
                drop(st);
                self.set_sync(SyncState::Synced);
            }
            Ok(Event::Apply(o)) => {
                let k = key(&o);
                match st.objects.get(&k) {
                    Some(cur) if !newer(&o, cur) => {}
                    _ => {
                        st.objects.insert(k, o);
                    }
                }
                drop(st);
                self.set_sync(SyncState::Synced);
            }
            Ok(Event::Delete(o)) => {
                st.objects.remove(&key(&o));
                drop(st);
                self.set_sync(SyncState::Synced);
            }
            Err(e) => {
                drop(st);
                let refused = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 401 || s.code == 403);
                let s = match &e {
                    watcher::Error::InitialListFailed(e) if refused(e) => {
                        SyncState::Forbidden("list")
                    }
                    watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e)
                        if refused(e) =>
                    {
                        SyncState::Forbidden("watch")
                    }
                    watcher::Error::WatchError(s) if s.code == 401 || s.code == 403 => {
                        SyncState::Forbidden("watch")
                    }
                    _ => SyncState::Lost,
                };
                tracing::debug!(what = %self.what, error = %e, "watch failed; reading directly until it recovers");
                self.set_sync(s);
            }
        }
    }

    /// Waits (a first read only) for the initial LIST; `Ok(true)` when the cache can answer,
    /// `Ok(false)` when the caller must read directly.
    async fn ready(&self) -> Result<bool, PortError> {
        if let Ok(mut t) = self.last_read.lock() {
            *t = tokio::time::Instant::now();
        }
        let mut rx = self.sync.subscribe();
        let s = if self.waited.swap(true, Ordering::SeqCst) {
            rx.borrow().clone()
        } else {
            match tokio::time::timeout(FIRST_SYNC, rx.wait_for(|s| *s != SyncState::Starting)).await
            {
                Ok(Ok(s)) => s.clone(),
                _ => SyncState::Starting,
            }
        };
        match s {
            SyncState::Synced => Ok(true),
            SyncState::Starting | SyncState::Lost => Ok(false),
            SyncState::Forbidden(verb) => Err(PortError::Forbidden {
                verb: verb.to_string(),
                what: self.what.clone(),
            }),
        }
    }

    /// Every object, or `None` when the cache cannot answer.
    async fn all(&self) -> Result<Option<Vec<K>>, PortError> {
        if !self.ready().await? {
            return Ok(None);
        }
        Ok(self
            .state
            .lock()
            .ok()
            .map(|st| st.objects.values().cloned().collect()))
    }

    /// The object named `name` (cluster-scoped key), `Some(None)` when the cache has no such
    /// object, `None` when the cache cannot answer.
    async fn get(&self, name: &str) -> Result<Option<Option<K>>, PortError> {
        if !self.ready().await? {
            return Ok(None);
        }
        Ok(self
            .state
            .lock()
            .ok()
            .map(|st| st.objects.get(name).cloned()))
    }

    /// Puts an object the adapter wrote (the write's response) in, if it is newer.
    fn written(&self, o: K) {
        if let Ok(mut st) = self.state.lock() {
            let k = key(&o);
            match st.objects.get(&k) {
                Some(cur) if !newer(&o, cur) => {}
                _ => {
                    st.objects.insert(k, o);
                }
            }
        }
    }

    fn idle(&self, now: tokio::time::Instant) -> bool {
        self.last_read
            .lock()
            .map_or(true, |t| now.duration_since(*t) >= IDLE)
    }
}

/// The caches of one adapter: off until the run lock is taken, cleared when it is released.
#[derive(Default)]
pub(crate) struct Caches {
    active: AtomicBool,
    nodes: Mutex<Option<Arc<Cache<core::Node>>>>,
    pdbs: Mutex<Option<Arc<Cache<PodDisruptionBudget>>>>,
    pods: Mutex<HashMap<NodeName, Arc<Cache<core::Pod>>>>,
}

impl Caches {
    /// Turns the caches on (the run lock is ours).
    pub(crate) fn activate(&self) {
        self.active.store(true, Ordering::SeqCst);
    }

    /// Turns the caches off and stops every watch.
    pub(crate) fn deactivate(&self) {
        self.active.store(false, Ordering::SeqCst);
        if let Ok(mut n) = self.nodes.lock() {
            n.take();
        }
        if let Ok(mut p) = self.pdbs.lock() {
            p.take();
        }
        if let Ok(mut p) = self.pods.lock() {
            p.clear();
        }
    }

    /// True while the run lock is ours.
    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// The node cache (started at the first call), or `None` when inactive.
    fn node_cache(
        &self,
        client: &kube::Client,
        selector: Option<&str>,
    ) -> Option<Arc<Cache<core::Node>>> {
        if !self.active() {
            return None;
        }
        let mut slot = self.nodes.lock().ok()?;
        Some(
            slot.get_or_insert_with(|| {
                let mut cfg = watcher::Config::default();
                if let Some(s) = selector {
                    cfg = cfg.labels(s);
                }
                Cache::start(Api::all(client.clone()), cfg, "nodes".into())
            })
            .clone(),
        )
    }

    /// The node named `name` from the cache: `Some(Some(node))`, `Some(None)` when the cache
    /// has no such node (it may be outside the selector: read it directly), `None` when the
    /// cache cannot answer.
    pub(crate) async fn node(
        &self,
        client: &kube::Client,
        selector: Option<&str>,
        name: &NodeName,
    ) -> Result<Option<core::Node>, PortError> {
        let Some(c) = self.node_cache(client, selector) else {
            return Ok(None);
        };
        Ok(c.get(name.as_str()).await?.flatten())
    }

    /// Every node the cache holds, or `None` when it cannot answer.
    pub(crate) async fn nodes(
        &self,
        client: &kube::Client,
        selector: Option<&str>,
    ) -> Result<Option<Vec<core::Node>>, PortError> {
        let Some(c) = self.node_cache(client, selector) else {
            return Ok(None);
        };
        c.all().await
    }

    /// Records a Node the adapter wrote (a PATCH's response).
    pub(crate) fn node_written(&self, n: core::Node) {
        if !self.active() {
            return;
        }
        let c = self.nodes.lock().ok().and_then(|s| s.clone());
        if let Some(c) = c {
            c.written(n);
        }
    }

    /// Every budget, or `None` when inactive or the cache cannot answer.
    pub(crate) async fn pdbs(
        &self,
        client: &kube::Client,
    ) -> Result<Option<Vec<PodDisruptionBudget>>, PortError> {
        if !self.active() {
            return Ok(None);
        }
        let c = {
            let Ok(mut slot) = self.pdbs.lock() else {
                return Ok(None);
            };
            slot.get_or_insert_with(|| {
                Cache::start(
                    Api::all(client.clone()),
                    watcher::Config::default(),
                    "poddisruptionbudgets".into(),
                )
            })
            .clone()
        };
        c.all().await
    }

    /// The pods on `node` (a watch with `fieldSelector=spec.nodeName=<node>`), or `None` when
    /// inactive or the cache cannot answer.
    pub(crate) async fn pods_on(
        &self,
        client: &kube::Client,
        node: &NodeName,
    ) -> Result<Option<Vec<core::Pod>>, PortError> {
        if !self.active() {
            return Ok(None);
        }
        let c = {
            let Ok(mut map) = self.pods.lock() else {
                return Ok(None);
            };
            let now = tokio::time::Instant::now();
            map.retain(|n, c| n == node || !c.idle(now));
            map.entry(node.clone())
                .or_insert_with(|| {
                    Cache::start(
                        Api::all(client.clone()),
                        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
                        format!("pods on node {node}"),
                    )
                })
                .clone()
        };
        c.all().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn node(name: &str, rv: &str, unschedulable: bool) -> core::Node {
        core::Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            spec: Some(core::NodeSpec {
                unschedulable: Some(unschedulable),
                ..core::NodeSpec::default()
            }),
            status: None,
        }
    }

    fn cache() -> Cache<core::Node> {
        Cache::empty("nodes".into())
    }

    fn unschedulable(c: &Cache<core::Node>, name: &str) -> Option<bool> {
        c.state
            .lock()
            .unwrap()
            .objects
            .get(name)
            .and_then(|n| n.spec.as_ref()?.unschedulable)
    }

    #[tokio::test]
    async fn older_events_do_not_undo_a_write() {
        let c = cache();
        c.apply(Ok(Event::Init));
        c.apply(Ok(Event::InitApply(node("a", "10", false))));
        c.apply(Ok(Event::InitDone));
        assert_eq!(
            c.get("a").await.unwrap().flatten().map(|n| key(&n)),
            Some("a".into())
        );
        // Our cordon's response, then a late event from before it.
        c.written(node("a", "12", true));
        c.apply(Ok(Event::Apply(node("a", "11", false))));
        assert_eq!(unschedulable(&c, "a"), Some(true));
        // A relist that predates the write keeps the write; a newer one wins.
        c.apply(Ok(Event::Init));
        c.apply(Ok(Event::InitApply(node("a", "11", false))));
        c.apply(Ok(Event::InitDone));
        assert_eq!(unschedulable(&c, "a"), Some(true));
        c.apply(Ok(Event::Apply(node("a", "13", false))));
        assert_eq!(unschedulable(&c, "a"), Some(false));
        c.apply(Ok(Event::Delete(node("a", "14", false))));
        assert_eq!(c.get("a").await.unwrap(), Some(None));
    }

    #[tokio::test]
    async fn a_failed_watch_is_not_read_and_a_refused_one_names_the_verb() {
        let c = cache();
        c.apply(Ok(Event::Init));
        c.apply(Ok(Event::InitDone));
        assert!(c.ready().await.unwrap());
        let api = |code: u16| {
            kube::Error::Api(
                kube::core::Status::failure("no", "Reason")
                    .with_code(code)
                    .boxed(),
            )
        };
        c.apply(Err(watcher::Error::WatchFailed(api(500))));
        assert!(!c.ready().await.unwrap());
        // It delivers again: usable again.
        c.apply(Ok(Event::Apply(node("b", "3", false))));
        assert!(c.ready().await.unwrap());
        c.apply(Err(watcher::Error::WatchStartFailed(api(403))));
        match c.ready().await {
            Err(PortError::Forbidden { verb, what }) => {
                assert_eq!((verb.as_str(), what.as_str()), ("watch", "nodes"));
            }
            other => panic!("{other:?}"),
        }
        c.apply(Err(watcher::Error::InitialListFailed(api(403))));
        assert!(
            matches!(c.ready().await, Err(PortError::Forbidden { verb, .. }) if verb == "list")
        );
    }
}
