//! Watch-fed caches of Nodes, PodDisruptionBudgets and Pods, used while this adapter holds the
//! run lock (issue #5, API economy).
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
//! - the Pods: on a cluster whose pods the plan's inventory counted at most
//!   [`KubeOptions::one_pod_watch_max_pods`](crate::KubeOptions) ([`CLUSTER_POD_WATCH_MAX`] by
//!   default), one watch of every pod, started at the first read of any node's pods, each read
//!   copying out that node's pods only; the cache keeps of each pod only what the adapter reads
//!   ([`Trim`]: no `managedFields`, no `kubectl apply` copy, no container commands, environment,
//!   mounts or probes, no container statuses). On a larger cluster (or before the inventory),
//!   per node one watch of its Pods with `fieldSelector=spec.nodeName=<node>`, started at the
//!   first read of that node's pods and stopped after [`IDLE`] without a read. The one watch
//!   costs one request for the run instead of one a node; its initial state is no larger than
//!   the inventory's LIST, but it carries every pod change of the cluster while the run lasts.
//!
//! Each watch is `kube::runtime::watcher`. Its initial state comes from a **streaming list**
//! (`watcher::Config::streaming_lists`): one WATCH with `sendInitialEvents=true`,
//! `resourceVersionMatch=NotOlderThan` and `resourceVersion=0`, whose first events are the
//! collection's objects, ended by a BOOKMARK annotated `k8s.io/initial-events-end`; the same
//! request then carries the changes. A cache therefore costs one request where a LIST and a WATCH
//! cost two. The WATCH is re-opened from the last `resourceVersion` when the server ends it (every
//! 290 s) and streamed again from the start after 410 Gone. Every cache stops when the lock is
//! released or the adapter is dropped.
//!
//! Servers that do not stream lists: the API server's `WatchList` feature gate is beta since
//! Kubernetes 1.32, on by default in 1.32 and from 1.34, **off by default in 1.33**, and off
//! (alpha) in 1.27 to 1.31. With it off the server refuses the WATCH before it starts, with
//! 422 `Invalid` naming `sendInitialEvents` (`sendInitialEvents is forbidden for watch unless the
//! WatchList feature gate is enabled`); before 1.27 it refuses `resourceVersionMatch` on a watch
//! (`resourceVersionMatch is forbidden for watch`, also 422). A server may also accept the WATCH
//! and never end its initial events (one that ignores the parameters). The first cache to start
//! probes; caches started meanwhile wait for its answer. A refusal of that shape (400 or 422
//! naming either parameter), a streaming list that goes [`STREAM_IDLE`] without an object or its
//! end, or one that the server ends before its end, switches **this adapter** to LIST then WATCH
//! (a quorum LIST, `resourceVersion` unset, then a WATCH from the list's `resourceVersion`,
//! re-listed after 410 Gone): the cache that found it starts over that way, and so does every
//! cache started later. The decision is never undone (no back and forth), and it outlives the
//! lock. All three collections are served by kube-apiserver itself, so one decision fits them.
//! Any other failure (a 5xx, a dropped connection, a 403) decides nothing: the watch retries with
//! back-off, and the probe passes to the next cache that starts.
//!
//! Freshness: a cache reflects the API server as of its last event, typically milliseconds behind.
//! A streaming list starts from the API server's watch cache as it stands (`resourceVersion=0`,
//! what kube 5.0.0 sends; the server does not wait to catch up with etcd), where the LIST it
//! replaces was a quorum read; every later event comes from that same watch cache either way, so a
//! cache is as fresh as the watch that feeds it. The adapter's own writes of a Node (cordon,
//! label, record saves) are put into the node cache from the write's response at once, so a look
//! right after a write sees it. A cache whose watch failed (a dropped connection, a 5xx) is not
//! used until its watch delivers again: reads then go to the API server directly, as without a
//! lock. A watch refused with 401/403 makes the read fail with `Forbidden` naming `watch` (grant
//! it in `deploy/rbac.yaml`) rather than silently costing a LIST per read; so does a LIST of the
//! fallback, naming `list`.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use cnimig_core::model::NodeName;
use cnimig_core::ports::PortError;
use futures::{Stream, StreamExt};
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

/// How long a first read waits for a new cache's initial state before reading directly.
const FIRST_SYNC: Duration = Duration::from_secs(15);

/// How long a streaming list may go without an object or its end bookmark before the server is
/// taken not to stream lists. Well under [`FIRST_SYNC`], so the LIST that replaces it can still
/// answer the first read.
const STREAM_IDLE: Duration = Duration::from_secs(5);

/// Where a cache stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SyncState {
    /// The initial state (streaming list or LIST) has not arrived yet.
    Starting,
    /// Complete as of the last event.
    Synced,
    /// The watch failed; not used until it delivers again.
    Lost,
    /// The watch (or the fallback's LIST) was refused: the verb and what.
    Forbidden(&'static str),
}

/// How this adapter's caches get their initial state (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lists {
    /// Not known: the next cache to start probes with a streaming list.
    Unknown,
    /// A cache is probing: caches starting now wait for its answer.
    Probing,
    /// The server streams lists.
    Streaming,
    /// The server does not: LIST then WATCH, for good.
    ListWatch,
}

/// The adapter-wide [`Lists`] decision, shared by every cache of one adapter.
struct ListChoice(chan::Sender<Lists>);

impl Default for ListChoice {
    fn default() -> Self {
        ListChoice(chan::channel(Lists::Unknown).0)
    }
}

/// What a starting cache is to do.
enum Mode {
    /// A streaming list; with the probe when this cache holds it.
    Stream(Option<Probe>),
    /// LIST then WATCH.
    ListWatch,
}

/// The probe a cache holds; dropped undecided (the cache stopped, or its watch failed with
/// something that decides nothing), it passes to the next cache that starts.
struct Probe(Arc<ListChoice>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.0.send_if_modified(|s| {
            let release = *s == Lists::Probing;
            if release {
                *s = Lists::Unknown;
            }
            release
        });
    }
}

impl ListChoice {
    /// What a starting cache is to do; waits while another cache probes.
    async fn mode(self: &Arc<Self>) -> Mode {
        let mut rx = self.0.subscribe();
        loop {
            let now = *rx.borrow_and_update();
            match now {
                Lists::Streaming => return Mode::Stream(None),
                Lists::ListWatch => return Mode::ListWatch,
                Lists::Unknown => {
                    let claimed = self.0.send_if_modified(|s| {
                        let claim = *s == Lists::Unknown;
                        if claim {
                            *s = Lists::Probing;
                        }
                        claim
                    });
                    if claimed {
                        return Mode::Stream(Some(Probe(Arc::clone(self))));
                    }
                }
                Lists::Probing => {
                    if rx.changed().await.is_err() {
                        return Mode::ListWatch;
                    }
                }
            }
        }
    }

    /// Records what a cache found: `Streaming` unless `ListWatch` was decided already,
    /// `ListWatch` always.
    fn settle(&self, found: Lists) {
        self.0.send_if_modified(|s| {
            let next = if *s == Lists::ListWatch {
                Lists::ListWatch
            } else {
                found
            };
            let changed = next != *s;
            *s = next;
            changed
        });
    }

    #[cfg(test)]
    fn decided(&self) -> Lists {
        *self.0.borrow()
    }
}

/// What one event of a streaming watcher tells about the server.
#[derive(Debug, PartialEq, Eq)]
enum Finding {
    Nothing,
    /// The initial events ended with their bookmark: the server streams lists.
    Streams,
    /// It does not: why.
    DoesNot(&'static str),
    /// A failure that tells nothing about streaming lists (5xx, 403, a dropped connection).
    Inconclusive,
}

/// Reads a streaming watcher's events for what they tell about the server (no clock: the
/// driver reports [`STREAM_IDLE`] passing while [`Self::awaiting_end`]).
#[derive(Debug, Default)]
struct StreamCheck {
    /// The server accepted the streaming WATCH and its initial events have not ended yet.
    awaiting_end: bool,
}

impl StreamCheck {
    fn observe<K>(&mut self, ev: &Result<Event<K>, watcher::Error>) -> Finding {
        match ev {
            // The watcher emits `Init` when a streaming WATCH opens; a second one with no end
            // and no error in between means the server closed the stream before its end.
            Ok(Event::Init) if self.awaiting_end => Finding::DoesNot(
                "it closed a streaming list before the initial-events-end bookmark",
            ),
            Ok(Event::Init) => {
                self.awaiting_end = true;
                Finding::Nothing
            }
            Ok(Event::InitApply(_) | Event::Apply(_) | Event::Delete(_)) => Finding::Nothing,
            Ok(Event::InitDone) => {
                self.awaiting_end = false;
                Finding::Streams
            }
            Err(e) if refuses_streaming(e) => {
                Finding::DoesNot("it refused sendInitialEvents/resourceVersionMatch on a watch")
            }
            Err(_) => {
                // The watcher backs off and opens a new WATCH, which emits `Init` again.
                self.awaiting_end = false;
                Finding::Inconclusive
            }
        }
    }
}

/// True when `e` is the API server refusing a streaming list: 400 or 422 naming
/// `sendInitialEvents` or `resourceVersionMatch` (in its message or a cause's field), when the
/// WATCH starts (or, from servers that report it so, as the stream's ERROR event).
fn refuses_streaming(e: &watcher::Error) -> bool {
    let status = match e {
        watcher::Error::WatchStartFailed(kube::Error::Api(s)) => &**s,
        watcher::Error::WatchError(s) => &**s,
        _ => return false,
    };
    if status.code != 400 && status.code != 422 {
        return false;
    }
    let names = |t: &str| t.contains("sendInitialEvents") || t.contains("resourceVersionMatch");
    names(&status.message)
        || status.details.as_ref().is_some_and(|d| {
            d.causes
                .iter()
                .any(|c| names(&c.field) || names(&c.message))
        })
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
    /// Objects of an initial state in progress (between `Init` and `InitDone`).
    buffer: Option<HashMap<String, K>>,
}

/// One watched collection.
pub(crate) struct Cache<K> {
    what: String,
    state: Mutex<State<K>>,
    sync: chan::Sender<SyncState>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
    last_read: Mutex<tokio::time::Instant>,
    /// A read has waited for the initial state already (later reads do not wait).
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

/// A watcher's event stream.
type Events<K> = futures::stream::BoxStream<'static, Result<Event<K>, watcher::Error>>;

/// What a cache keeps of each object: everything, except for the cluster-wide pod watch, which
/// drops what no read of this adapter uses (so that a large cluster's pods fit in memory).
pub(crate) trait Trim {
    /// Drops the fields the adapter never reads.
    fn trim(&mut self) {}
}

impl Trim for core::Node {}
impl Trim for PodDisruptionBudget {}

/// The annotation `kubectl apply` leaves on an object (a copy of the whole object).
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

impl Trim for core::Pod {
    /// Keeps the metadata (but `managedFields` and `kubectl apply`'s copy), the containers' ports
    /// and resources, the volumes, the status's phase, conditions and IPs; drops the rest of the
    /// containers (commands, environment, mounts, probes) and the container statuses.
    fn trim(&mut self) {
        self.metadata.managed_fields = None;
        if let Some(a) = self.metadata.annotations.as_mut() {
            a.remove(LAST_APPLIED);
        }
        if let Some(spec) = self.spec.as_mut() {
            for c in spec
                .containers
                .iter_mut()
                .chain(spec.init_containers.iter_mut().flatten())
            {
                c.command = None;
                c.args = None;
                c.env = None;
                c.env_from = None;
                c.volume_mounts = None;
                c.liveness_probe = None;
                c.readiness_probe = None;
                c.startup_probe = None;
                c.lifecycle = None;
            }
        }
        if let Some(st) = self.status.as_mut() {
            st.container_statuses = None;
            st.init_container_statuses = None;
            st.ephemeral_container_statuses = None;
        }
    }
}

impl<K> Cache<K>
where
    K: Resource<DynamicType = ()> + Trim + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
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

    /// Starts watching `api` with `cfg` (streaming lists or not as `lists` decides); `what`
    /// names the collection in errors.
    fn start(api: Api<K>, cfg: watcher::Config, lists: Arc<ListChoice>, what: String) -> Arc<Self> {
        let streaming = {
            let (api, cfg) = (api.clone(), cfg.clone());
            move || {
                watcher::watcher(api, cfg.streaming_lists())
                    .default_backoff()
                    .boxed()
            }
        };
        let list_watch = move || watcher::watcher(api, cfg).default_backoff().boxed();
        Self::start_with(streaming, list_watch, STREAM_IDLE, lists, what)
    }

    /// [`Self::start`] with the two ways to watch given as functions (tests feed events).
    fn start_with<S, L>(
        streaming: S,
        list_watch: L,
        stream_idle: Duration,
        lists: Arc<ListChoice>,
        what: String,
    ) -> Arc<Self>
    where
        S: FnOnce() -> Events<K> + Send + 'static,
        L: FnOnce() -> Events<K> + Send + 'static,
    {
        let cache = Arc::new(Self::empty(what));
        let weak = Arc::downgrade(&cache);
        let task = Self::run(streaming, list_watch, stream_idle, lists, weak);
        let handle = tokio::spawn(task).abort_handle();
        if let Ok(mut t) = cache.task.lock() {
            *t = Some(handle);
        }
        cache
    }

    async fn run<S, L>(
        streaming: S,
        list_watch: L,
        stream_idle: Duration,
        lists: Arc<ListChoice>,
        cache: Weak<Self>,
    ) where
        S: FnOnce() -> Events<K>,
        L: FnOnce() -> Events<K>,
    {
        if let Mode::Stream(probe) = lists.mode().await {
            let Some(why) = Self::stream(streaming(), stream_idle, &lists, probe, &cache).await
            else {
                return;
            };
            if let Some(c) = cache.upgrade() {
                tracing::info!(what = %c.what, why, "the API server does not stream lists: this adapter's watches LIST then WATCH from now on");
            }
        }
        Self::feed(list_watch(), &cache).await;
    }

    /// Feeds a streaming watcher's events in until the cache is dropped (`None`) or the server
    /// turns out not to stream lists (`Some(why)`, with the adapter switched to LIST then WATCH).
    async fn stream(
        mut events: impl Stream<Item = Result<Event<K>, watcher::Error>> + Unpin,
        stream_idle: Duration,
        lists: &ListChoice,
        mut probe: Option<Probe>,
        cache: &Weak<Self>,
    ) -> Option<&'static str> {
        let mut check = StreamCheck::default();
        loop {
            let next = if check.awaiting_end {
                match tokio::time::timeout(stream_idle, events.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        lists.settle(Lists::ListWatch);
                        return Some(
                            "a streaming list went quiet before the initial-events-end bookmark",
                        );
                    }
                }
            } else {
                events.next().await
            };
            let ev = next?;
            match check.observe(&ev) {
                Finding::DoesNot(why) => {
                    // Not applied: the LIST that follows answers the reads waiting for it.
                    lists.settle(Lists::ListWatch);
                    return Some(why);
                }
                Finding::Streams => {
                    lists.settle(Lists::Streaming);
                    drop(probe.take());
                }
                // Let the next cache that starts probe meanwhile.
                Finding::Inconclusive => drop(probe.take()),
                Finding::Nothing => {}
            }
            cache.upgrade()?.apply(ev);
        }
    }

    /// Feeds a watcher's events in until the cache is dropped.
    async fn feed(
        mut events: impl Stream<Item = Result<Event<K>, watcher::Error>> + Unpin,
        cache: &Weak<Self>,
    ) {
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
            Ok(Event::InitApply(mut o)) => {
                o.trim();
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
            Ok(Event::Apply(mut o)) => {
                o.trim();
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

    /// Waits (a first read only) for the initial state; `Ok(true)` when the cache can answer,
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
        self.matching(|_| true).await
    }

    /// The objects `keep` selects (only those are copied), or `None` when the cache cannot
    /// answer.
    async fn matching(&self, keep: impl Fn(&K) -> bool) -> Result<Option<Vec<K>>, PortError> {
        if !self.ready().await? {
            return Ok(None);
        }
        Ok(self
            .state
            .lock()
            .ok()
            .map(|st| st.objects.values().filter(|o| keep(o)).cloned().collect()))
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
    fn written(&self, mut o: K) {
        o.trim();
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
    /// Streaming lists or LIST then WATCH, decided once (kept when the lock is released).
    lists: Arc<ListChoice>,
    nodes: Mutex<Option<Arc<Cache<core::Node>>>>,
    pdbs: Mutex<Option<Arc<Cache<PodDisruptionBudget>>>>,
    pods: Mutex<HashMap<NodeName, Arc<Cache<core::Pod>>>>,
    /// The run's one watch of every pod, used instead of `pods` when the cluster is small
    /// enough (`small_cluster`).
    all_pods: Mutex<Option<Arc<Cache<core::Pod>>>>,
    /// The cluster was small enough for one pod watch at the plan's inventory (false until
    /// known: one watch per node).
    small_cluster: AtomicBool,
}

/// The default of [`KubeOptions::one_pod_watch_max_pods`](crate::KubeOptions): the largest
/// cluster (pods at the plan's inventory) whose pods a run watches with one cluster-wide watch
/// rather than one watch per node. Its initial state is no larger than the inventory's LIST,
/// which the plan made already; its events are every pod change of the cluster for the run's
/// length, which on a larger cluster would outweigh the request a node it saves.
pub const CLUSTER_POD_WATCH_MAX: usize = 20_000;

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
        if let Ok(mut p) = self.all_pods.lock() {
            p.take();
        }
    }

    /// Notes whether the cluster is small enough for one pod watch (decided at the plan's
    /// inventory, [`KubeOptions::one_pod_watch_max_pods`](crate::KubeOptions)).
    pub(crate) fn set_one_pod_watch(&self, yes: bool) {
        self.small_cluster.store(yes, Ordering::SeqCst);
    }

    /// True when the run watches every pod with one watch.
    fn one_pod_watch(&self) -> bool {
        self.small_cluster.load(Ordering::SeqCst)
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
        let mut cfg = watcher::Config::default();
        if let Some(s) = selector {
            cfg = cfg.labels(s);
        }
        self.slot_cache(&self.nodes, client, cfg, "nodes")
    }

    /// The cache in `slot`, started with `cfg` over every namespace if there is none yet;
    /// `None` when the slot's lock is poisoned.
    fn slot_cache<K>(
        &self,
        slot: &Mutex<Option<Arc<Cache<K>>>>,
        client: &kube::Client,
        cfg: watcher::Config,
        what: &str,
    ) -> Option<Arc<Cache<K>>>
    where
        K: Resource<DynamicType = ()>
            + Trim
            + Clone
            + DeserializeOwned
            + Debug
            + Send
            + Sync
            + 'static,
    {
        let mut slot = slot.lock().ok()?;
        Some(
            slot.get_or_insert_with(|| {
                Cache::start(
                    Api::all(client.clone()),
                    cfg,
                    self.lists.clone(),
                    what.into(),
                )
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
        let Some(c) = self.slot_cache(
            &self.pdbs,
            client,
            watcher::Config::default(),
            "poddisruptionbudgets",
        ) else {
            return Ok(None);
        };
        c.all().await
    }

    /// The pods on `node` (from the run's one pod watch, or from the node's own watch with
    /// `fieldSelector=spec.nodeName=<node>` on a large cluster), or `None` when inactive or the
    /// cache cannot answer.
    pub(crate) async fn pods_on(
        &self,
        client: &kube::Client,
        node: &NodeName,
    ) -> Result<Option<Vec<core::Pod>>, PortError> {
        if !self.active() {
            return Ok(None);
        }
        if self.one_pod_watch() {
            let Some(c) =
                self.slot_cache(&self.all_pods, client, watcher::Config::default(), "pods")
            else {
                return Ok(None);
            };
            return c
                .matching(|p| {
                    p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str())
                })
                .await;
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
                        self.lists.clone(),
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

    fn api_error(code: u16, reason: &str, message: &str) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure(message, reason)
                .with_code(code)
                .boxed(),
        )
    }

    /// What kube-apiserver 1.27+ answers with its `WatchList` feature gate off: the Status of
    /// `errors.NewInvalid` over `ValidateListOptions`' errors (the body below is what the 1.34
    /// test control plane answers for a watch with `sendInitialEvents` but no
    /// `resourceVersionMatch`, with the gate's field and message in place of that one's).
    fn gate_off() -> watcher::Error {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled",
            "reason": "Invalid",
            "details": {"group": "meta.k8s.io", "kind": "ListOptions", "causes": [{
                "reason": "FieldValueForbidden",
                "message": "Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled",
                "field": "sendInitialEvents"}]},
            "code": 422
        }))
        .unwrap();
        watcher::Error::WatchStartFailed(kube::Error::Api(status.boxed()))
    }

    #[test]
    fn refusals_of_streaming_lists_are_told_from_other_failures() {
        use watcher::Error as W;
        // With the WatchList gate off (1.27 to 1.31, 1.33 by default).
        assert!(refuses_streaming(&gate_off()));
        // Before 1.27: resourceVersionMatch is refused on any watch.
        assert!(refuses_streaming(&W::WatchStartFailed(api_error(
            422,
            "Invalid",
            "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch",
        ))));
        // Other servers: a 400, or the refusal as the stream's ERROR event.
        assert!(refuses_streaming(&W::WatchStartFailed(api_error(
            400,
            "BadRequest",
            "sendInitialEvents is not supported",
        ))));
        assert!(refuses_streaming(&W::WatchError(
            kube::core::Status::failure("sendInitialEvents is forbidden for watch", "Invalid")
                .with_code(422)
                .boxed()
        )));
        // Failures that say nothing about streaming lists.
        for e in [
            W::WatchStartFailed(api_error(
                403,
                "Forbidden",
                "nodes is forbidden: User cannot watch resource",
            )),
            W::WatchStartFailed(api_error(401, "Unauthorized", "Unauthorized")),
            W::WatchStartFailed(api_error(
                500,
                "InternalError",
                "etcdserver: request timed out",
            )),
            W::WatchStartFailed(api_error(
                400,
                "BadRequest",
                "unable to parse requirement: found '=', expected: identifier",
            )),
            W::WatchStartFailed(api_error(422, "Invalid", "fieldSelector: Invalid value")),
            W::WatchError(
                kube::core::Status::failure("too old resource version", "Expired")
                    .with_code(410)
                    .boxed(),
            ),
            W::WatchFailed(api_error(422, "Invalid", "sendInitialEvents")),
            W::InitialListFailed(api_error(422, "Invalid", "resourceVersionMatch")),
            W::NoResourceVersion,
        ] {
            assert!(!refuses_streaming(&e), "{e:?}");
        }
    }

    #[test]
    fn a_streaming_list_is_judged_by_its_end() {
        type Ev = Result<Event<core::Node>, watcher::Error>;
        let run = |evs: Vec<Ev>| {
            let mut c = StreamCheck::default();
            evs.iter().map(|e| c.observe(e)).collect::<Vec<_>>()
        };
        let a = || node("a", "5", false);
        use Finding::{DoesNot, Inconclusive, Nothing, Streams};
        // Objects, then the initial-events-end bookmark (the watcher's `InitDone`).
        assert_eq!(
            run(vec![
                Ok(Event::Init),
                Ok(Event::InitApply(a())),
                Ok(Event::InitDone),
                Ok(Event::Apply(a()))
            ]),
            [Nothing, Nothing, Streams, Nothing]
        );
        // Refused before it starts.
        assert!(matches!(run(vec![Err(gate_off())])[..], [DoesNot(_)]));
        // Closed before its end (the watcher opens a new one: `Init` again).
        assert!(matches!(
            run(vec![
                Ok(Event::Init),
                Ok(Event::InitApply(a())),
                Ok(Event::Init)
            ])[..],
            [Nothing, Nothing, DoesNot(_)]
        ));
        // A failure in between decides nothing, and the next `Init` is a fresh start.
        let server_error = || {
            watcher::Error::WatchError(
                kube::core::Status::failure("etcd", "InternalError")
                    .with_code(500)
                    .boxed(),
            )
        };
        assert_eq!(
            run(vec![
                Ok(Event::Init),
                Err(server_error()),
                Ok(Event::Init),
                Ok(Event::InitDone)
            ]),
            [Nothing, Inconclusive, Nothing, Streams]
        );
        // After a 410 the watcher streams the list again.
        assert_eq!(
            run(vec![
                Ok(Event::Init),
                Ok(Event::InitDone),
                Err(watcher::Error::WatchError(
                    kube::core::Status::failure("gone", "Expired")
                        .with_code(410)
                        .boxed()
                )),
                Ok(Event::Init),
                Ok(Event::InitDone),
            ]),
            [Nothing, Streams, Inconclusive, Nothing, Streams]
        );
        // Waiting for the end is what the driver times.
        let mut c = StreamCheck::default();
        assert!(!c.awaiting_end);
        c.observe(&Ok::<_, watcher::Error>(Event::<core::Node>::Init));
        assert!(c.awaiting_end);
        c.observe(&Ok::<_, watcher::Error>(Event::<core::Node>::InitDone));
        assert!(!c.awaiting_end);
    }

    #[tokio::test]
    async fn one_cache_probes_and_the_decision_sticks() {
        let l = Arc::new(ListChoice::default());
        let Mode::Stream(Some(p)) = l.mode().await else {
            panic!("the first cache probes")
        };
        assert_eq!(l.decided(), Lists::Probing);
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { matches!(l.mode().await, Mode::Stream(Some(_))) }
        });
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "a cache starting during the probe waits"
        );
        // The prober stops undecided: the waiter takes the probe over.
        drop(p);
        assert!(waiter.await.unwrap());
        assert_eq!(l.decided(), Lists::Unknown, "its probe ended with its task");
        // Streaming found: later caches stream without probing.
        let Mode::Stream(Some(p)) = l.mode().await else {
            panic!()
        };
        l.settle(Lists::Streaming);
        drop(p);
        assert!(matches!(l.mode().await, Mode::Stream(None)));
        // A refusal later (another API server of the cluster) switches for good.
        l.settle(Lists::ListWatch);
        l.settle(Lists::Streaming);
        assert_eq!(l.decided(), Lists::ListWatch);
        assert!(matches!(l.mode().await, Mode::ListWatch));
    }

    type Calls = Arc<Mutex<Vec<String>>>;

    /// A watcher's stream that yields `evs` and then stays open.
    fn events(evs: Vec<Result<Event<core::Node>, watcher::Error>>) -> Events<core::Node> {
        futures::stream::iter(evs)
            .chain(futures::stream::pending())
            .boxed()
    }

    /// Starts a node cache whose streaming list yields `streamed` and whose LIST then WATCH
    /// yields node `a`; `calls` records which was opened, as `stream NAME` / `list NAME`.
    fn started(
        name: &str,
        streamed: Vec<Result<Event<core::Node>, watcher::Error>>,
        lists: &Arc<ListChoice>,
        calls: &Calls,
    ) -> Arc<Cache<core::Node>> {
        let (c1, c2) = (calls.clone(), calls.clone());
        let (n1, n2) = (format!("stream {name}"), format!("list {name}"));
        Cache::start_with(
            move || {
                c1.lock().unwrap().push(n1);
                events(streamed)
            },
            move || {
                c2.lock().unwrap().push(n2);
                events(vec![
                    Ok(Event::Init),
                    Ok(Event::InitApply(node("a", "5", false))),
                    Ok(Event::InitDone),
                ])
            },
            Duration::from_millis(200),
            lists.clone(),
            "nodes".into(),
        )
    }

    fn synced_streaming() -> Vec<Result<Event<core::Node>, watcher::Error>> {
        vec![
            Ok(Event::Init),
            Ok(Event::InitApply(node("a", "5", false))),
            Ok(Event::InitDone),
        ]
    }

    #[tokio::test]
    async fn a_streaming_list_is_one_request_and_later_caches_stream_at_once() {
        let (lists, calls) = (Arc::new(ListChoice::default()), Calls::default());
        let c1 = started("1", synced_streaming(), &lists, &calls);
        assert!(c1.ready().await.unwrap());
        assert!(c1.get("a").await.unwrap().flatten().is_some());
        assert_eq!(lists.decided(), Lists::Streaming);
        let c2 = started("2", synced_streaming(), &lists, &calls);
        assert!(c2.ready().await.unwrap());
        assert_eq!(*calls.lock().unwrap(), ["stream 1", "stream 2"]);
    }

    #[tokio::test]
    async fn a_refused_streaming_list_falls_back_for_the_whole_adapter() {
        let (lists, calls) = (Arc::new(ListChoice::default()), Calls::default());
        let c1 = started("1", vec![Err(gate_off())], &lists, &calls);
        // The first read waits through the refusal for the LIST (the refusal is not `Lost`).
        assert!(c1.ready().await.unwrap());
        assert!(c1.get("a").await.unwrap().flatten().is_some());
        assert_eq!(lists.decided(), Lists::ListWatch);
        let c2 = started("2", synced_streaming(), &lists, &calls);
        assert!(c2.ready().await.unwrap());
        assert_eq!(*calls.lock().unwrap(), ["stream 1", "list 1", "list 2"]);
    }

    #[tokio::test]
    async fn a_streaming_list_without_its_end_falls_back_and_caches_started_meanwhile_wait() {
        let (lists, calls) = (Arc::new(ListChoice::default()), Calls::default());
        // Objects but never the initial-events-end bookmark (a server ignoring the parameters).
        let quiet = vec![Ok(Event::Init), Ok(Event::InitApply(node("a", "5", false)))];
        let c1 = started("1", quiet, &lists, &calls);
        tokio::task::yield_now().await;
        let c2 = started("2", synced_streaming(), &lists, &calls);
        let (r1, r2) = tokio::join!(c1.ready(), c2.ready());
        assert!(r1.unwrap() && r2.unwrap());
        assert_eq!(lists.decided(), Lists::ListWatch);
        assert_eq!(*calls.lock().unwrap(), ["stream 1", "list 1", "list 2"]);
    }

    #[tokio::test]
    async fn a_forbidden_streaming_list_names_watch_and_passes_the_probe_on() {
        let (lists, calls) = (Arc::new(ListChoice::default()), Calls::default());
        let refused = vec![Err(watcher::Error::WatchStartFailed(api_error(
            403,
            "Forbidden",
            "nodes is forbidden",
        )))];
        let c1 = started("1", refused, &lists, &calls);
        assert!(
            matches!(c1.ready().await, Err(PortError::Forbidden { verb, .. }) if verb == "watch")
        );
        assert_eq!(lists.decided(), Lists::Unknown, "a 403 decides nothing");
        let c2 = started("2", synced_streaming(), &lists, &calls);
        assert!(c2.ready().await.unwrap());
        assert_eq!(lists.decided(), Lists::Streaming);
        // A cache stopped while it probes passes the probe on too.
        let (lists, calls) = (Arc::new(ListChoice::default()), Calls::default());
        let c3 = started("3", vec![], &lists, &calls);
        tokio::task::yield_now().await;
        assert_eq!(lists.decided(), Lists::Probing);
        drop(c3);
        tokio::task::yield_now().await;
        assert_eq!(lists.decided(), Lists::Unknown);
    }
}
