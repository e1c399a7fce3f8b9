//! The store on etcd, shared by any number of API server replicas.
//!
//! Each replica keeps the same in-memory image and event log as on SQLite, fed by an etcd
//! watch, and writes through etcd transactions. Under `--etcd-prefix` (default
//! `/portway`):
//! - `revision`: the store's own revision, the `resourceVersion` of its latest change;
//! - `objects/<resource>/<namespace>/<name>`: each object, as JSON;
//! - `events/<revision, 20 digits>`: each change (type, resource, key, object), kept for
//!   `history` revisions, from which every replica's watchers resume;
//! - `commits/<replica>`: the id of the replica's last commit, so a replica whose answer
//!   from etcd was lost can tell whether its write was applied.
//!
//! Why a revision of our own rather than etcd's `mod_revision`, as kube-apiserver does:
//! one of our writes may change several objects at once (a cascade, a namespace's
//! teardown, a collection deleted), which etcd commits at one revision, while a watch
//! resumes from the revision of the last change it saw and must not skip its siblings.
//! Every change gets its own revision here, contiguous, exactly as on SQLite, so clients
//! see one behaviour. Every write is a transaction guarded on `revision` (compare and
//! swap): a replica that is behind loses, catches up from its watch, and runs the write
//! again on the newer state — the optimistic concurrency kube-apiserver has per object,
//! here for the whole store, so a write's checks (a name taken, a namespace gone) always
//! hold at its commit.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KvClient, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use serde_json::{Value, json};

use super::{Event, EventType, Inner, ObjKey, State, StoreError};
use crate::registry::registry;
use tokio::sync::Notify;

/// Where the etcd cluster is, and how to reach it.
#[derive(Clone, Debug)]
pub struct Config {
    /// Client URLs (`http://10.0.0.1:2379`); requests go to any that answers.
    pub endpoints: Vec<String>,
    /// Every key lives under it, so several installations can share a cluster.
    pub prefix: String,
    /// PEM files: the CA that signed the members' certificates, and this client's own
    /// certificate and key, when the cluster asks for them.
    pub tls: Option<Tls>,
    /// What the cluster takes in one transaction (its `--max-txn-ops` and
    /// `--max-request-bytes`); writes are grouped to fit, and a single write that cannot
    /// fit is refused with 413.
    pub budget: super::Budget,
}

#[derive(Clone, Debug)]
pub struct Tls {
    pub ca: std::path::PathBuf,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

/// Largest message read from etcd: a page of objects, or a burst of watch events.
const MAX_MESSAGE: usize = 64 << 20;
/// Objects read per request when loading.
const PAGE: i64 = 500;

pub(super) struct Etcd {
    client: Client,
    prefix: String,
    /// Names this replica's `commits/` key.
    replica: String,
    /// Tells the watch to reload the store (a committer that waited too long for it).
    reload: Notify,
    /// Held by a test to make this replica's watch lag.
    #[cfg(test)]
    lag: Arc<tokio::sync::RwLock<()>>,
}

fn etcd_error(what: &str) -> impl FnOnce(etcd_client::Error) -> StoreError + '_ {
    move |e| StoreError::Etcd(format!("{what}: {e}"))
}

/// A member that could not answer: down (the connection refused), or the connection
/// lost. The client spreads requests over the members, so the next try goes elsewhere.
/// A write that was sent may still have been applied: [`Etcd::commit`] finds out.
fn unsent(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable)
}

/// An answer that says the request was refused, not applied (too large, too many
/// operations, not allowed).
fn refused(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    matches!(e, etcd_client::Error::GRpcStatus(s) if matches!(
        s.code(),
        Code::InvalidArgument | Code::FailedPrecondition | Code::PermissionDenied
            | Code::Unauthenticated | Code::OutOfRange | Code::ResourceExhausted
    ))
}

/// `request`, tried again while the members it reaches cannot answer (a few seconds).
async fn retrying<T, F, Fut>(mut request: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut delay = Duration::from_millis(5);
    let mut tries = 0;
    loop {
        match request().await {
            Err(e) if unsent(&e) && tries < 12 => {
                tries += 1;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

/// What was read at one etcd revision.
pub(super) struct Loaded {
    pub state: State,
    /// The etcd revision it was read at: the watch starts after it.
    pub at: i64,
}

impl Etcd {
    pub(super) async fn connect(config: &Config) -> Result<Self, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            // A member cut off from the others answers nothing rather than old data.
            .with_require_leader(true);
        if let Some(tls) = &config.tls {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| StoreError::Etcd(format!("{}: {e}", p.display())))
            };
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                t = t.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(t);
        }
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(etcd_error("connecting"))?;
        Ok(Self {
            client,
            prefix: config.prefix.trim_end_matches('/').to_owned(),
            replica: format!("{:016x}", rand::random::<u64>()),
            reload: Notify::new(),
            #[cfg(test)]
            lag: Arc::default(),
        })
    }

    /// The store's revision in etcd now (a linearizable read).
    pub(super) async fn revision(&self) -> Result<u64, StoreError> {
        let kv = self.kv();
        let key = self.key("revision");
        let r = retrying(|| {
            let (mut kv, key) = (kv.clone(), key.clone());
            async move { kv.get(key, None).await }
        })
        .await
        .map_err(etcd_error("reading the revision"))?;
        Ok(r.kvs()
            .first()
            .and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse().ok())
            .unwrap_or(0))
    }

    /// Asks the watch to read the whole store again.
    pub(super) fn reload(&self) {
        self.reload.notify_one();
    }

    fn kv(&self) -> KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    fn object_key(&self, resource: &str, key: &ObjKey) -> String {
        self.key(&format!("objects/{resource}/{}/{}", key.ns, key.name))
    }

    fn event_key(&self, rv: u64) -> String {
        self.key(&format!("events/{rv:020}"))
    }

    /// Every key under `prefix`, read at etcd revision `at`, page by page.
    async fn range(&self, prefix: &str, at: i64) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let kv = self.kv();
        let end = prefix_end(prefix);
        let mut from = prefix.to_owned();
        let mut out = Vec::new();
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_revision(at)
                .with_limit(PAGE);
            let mut page = retrying(|| {
                let (mut kv, from, options) = (kv.clone(), from.clone(), options.clone());
                async move { kv.get(from, Some(options)).await }
            })
            .await
            .map_err(etcd_error("reading"))?;
            let more = page.more();
            let kvs = page.take_kvs();
            let Some(last) = kvs.last() else { break };
            // The next page starts just past the last key.
            from = format!("{}\0", String::from_utf8_lossy(last.key()));
            for kv in kvs {
                let (k, v) = kv.into_key_value();
                out.push((String::from_utf8_lossy(&k).into_owned(), v));
            }
            if !more {
                break;
            }
        }
        Ok(out)
    }

    /// The whole store as of now: objects, revision and the events kept.
    pub(super) async fn load(&self) -> Result<Loaded, StoreError> {
        let kv = self.kv();
        let revision_key = self.key("revision");
        let head = retrying(|| {
            let (mut kv, key) = (kv.clone(), revision_key.clone());
            async move { kv.get(key, None).await }
        })
        .await
        .map_err(etcd_error("reading the revision"))?;
        let at = head.header().map_or(0, |h| h.revision());
        let rv = head
            .kvs()
            .first()
            .and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse().ok())
            .unwrap_or(0u64);
        let reg = registry();
        let mut objects: Vec<BTreeMap<ObjKey, Arc<Value>>> =
            reg.all().map(|_| BTreeMap::new()).collect();
        let objects_prefix = self.key("objects/");
        for (key, value) in self.range(&objects_prefix, at).await? {
            let rest = &key[objects_prefix.len()..];
            let mut parts = rest.splitn(3, '/');
            let (Some(resource), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Some(res) = reg.by_key(resource) else {
                tracing::warn!(%resource, "skipping stored objects of an unknown kind");
                continue;
            };
            let value = serde_json::from_slice(&value).map_err(|source| StoreError::Corrupt {
                key: key.clone(),
                source,
            })?;
            objects[res.id].insert(ObjKey::new(ns, name), Arc::new(value));
        }
        let mut log = VecDeque::new();
        let mut last: HashMap<(usize, ObjKey), Arc<Value>> = HashMap::new();
        for (key, value) in self.range(&self.key("events/"), at).await? {
            let event = match decode_event(&key, &value, &mut last)? {
                Decoded::Event(event) => event,
                // History restarts after a change of a kind not served here.
                Decoded::Unknown(_) => {
                    log.clear();
                    continue;
                }
                Decoded::Other => continue,
            };
            // Events are contiguous; anything else restarts the history after it.
            if log
                .back()
                .is_some_and(|e: &Arc<Event>| e.rv + 1 != event.rv)
            {
                log.clear();
            }
            log.push_back(Arc::new(event));
        }
        if log.back().is_some_and(|e| e.rv != rv) {
            log.clear();
        }
        let floor = log.front().map_or(rv, |e| e.rv - 1);
        Ok(Loaded {
            state: State {
                objects,
                rv,
                log,
                floor,
            },
            at,
        })
    }

    /// Commits `changes` (from revision `base` to `rv`) if the store is still at `base`;
    /// otherwise says the revision it is at.
    pub(super) async fn commit(
        &self,
        base: u64,
        changes: &[Event],
        rv: u64,
        floor: u64,
    ) -> Result<Result<(), u64>, StoreError> {
        let revision = self.key("revision");
        // Names this attempt, so a retry after a lost answer can tell its own commit from
        // another replica's (see below).
        let commit = format!("{:016x}", rand::random::<u64>());
        let commits = self.key(&format!("commits/{}", self.replica));
        let guard = if base == 0 {
            Compare::version(revision.clone(), CompareOp::Equal, 0)
        } else {
            Compare::value(revision.clone(), CompareOp::Equal, base.to_string())
        };
        let mut ops = Vec::with_capacity(changes.len() * 2 + 2);
        // etcd refuses a transaction that names a key twice: of several changes to one
        // object in a group, its last state is written (each change keeps its event).
        let mut last = std::collections::HashMap::new();
        for (i, c) in changes.iter().enumerate() {
            last.insert((c.res.id, &c.key), i);
        }
        for (i, c) in changes.iter().enumerate() {
            let resource = c.res.key();
            let key = self.object_key(&resource, &c.key);
            if last.get(&(c.res.id, &c.key)) != Some(&i) {
            } else if c.type_ == EventType::Deleted {
                ops.push(TxnOp::delete(key, None));
            } else {
                ops.push(TxnOp::put(key, c.object.to_string(), None));
            }
            let event = json!({
                "type": c.type_.as_str(), "resource": resource,
                "namespace": c.key.ns, "name": c.key.name, "object": &*c.object,
            });
            ops.push(TxnOp::put(self.event_key(c.rv), event.to_string(), None));
        }
        // History kept trims up to `floor`, never into this transaction's own events (a
        // group larger than the history would name them twice).
        let first = changes.first().map_or(rv, |c| c.rv);
        let trim = floor.min(first.saturating_sub(1));
        if trim > 0 {
            let from = self.event_key(0);
            ops.push(TxnOp::delete(
                from,
                Some(DeleteOptions::new().with_range(self.event_key(trim + 1))),
            ));
        }
        ops.push(TxnOp::put(revision.clone(), rv.to_string(), None));
        ops.push(TxnOp::put(commits.clone(), commit.clone(), None));
        let txn = Txn::new()
            .when([guard])
            .and_then(ops)
            .or_else([TxnOp::get(revision, None)]);
        let kv = self.kv();
        // Whether this attempt was applied, read back from `commits/<replica>`: the
        // committer is one per replica, so only this attempt may have written that id.
        let ours = || async {
            retrying(|| {
                let (mut kv, key) = (kv.clone(), commits.clone());
                async move { kv.get(key, None).await }
            })
            .await
            .map(|r| {
                r.kvs()
                    .first()
                    .is_some_and(|kv| kv.value() == commit.as_bytes())
            })
        };
        let response = match retrying(|| {
            let (mut kv, txn) = (kv.clone(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
        {
            Ok(r) => r,
            Err(e) if refused(&e) => return Err(etcd_error("committing")(e)),
            // Sent, maybe applied, the answer lost: only the read-back can say.
            Err(e) => {
                return match ours().await {
                    Ok(true) => Ok(Ok(())),
                    Ok(false) => Err(StoreError::Unknown(format!("committing: {e}"))),
                    Err(again) => Err(StoreError::Unknown(format!(
                        "committing: {e}; reading it back: {again}"
                    ))),
                };
            }
        };
        if response.succeeded() {
            return Ok(Ok(()));
        }
        // Refused: another replica wrote first, or this very transaction did, on an
        // earlier try whose answer was lost.
        match ours().await {
            Ok(true) => return Ok(Ok(())),
            Ok(false) => {}
            Err(e) => {
                return Err(StoreError::Unknown(format!("reading back a commit: {e}")));
            }
        }
        let current = response
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse().ok()),
                _ => None,
            })
            .unwrap_or(0);
        Ok(Err(current))
    }

    /// Compacts etcd's history (every revision of every key is kept until compacted, and a
    /// full database stops all writes) to what was current one period ago, so watches
    /// that follow are never cut. Every replica does it; compacting twice is harmless.
    pub(super) async fn compact_every(self: Arc<Self>, period: Duration, inner: Weak<Inner>) {
        let mut previous: Option<i64> = None;
        loop {
            tokio::time::sleep(period).await;
            if inner.upgrade().is_none() {
                return;
            }
            let mut kv = self.kv();
            let now = match kv.get(self.key("revision"), None).await {
                Ok(r) => r.header().map(|h| h.revision()),
                Err(e) => {
                    tracing::debug!(error = %e, "reading etcd's revision to compact");
                    None
                }
            };
            if let Some(at) = previous {
                match kv.compact(at, None).await {
                    Ok(_) => tracing::debug!(revision = at, "etcd history compacted"),
                    // Another replica got there first.
                    Err(e) => tracing::debug!(error = %e, "compacting etcd"),
                }
                self.forget_commits_before(at).await;
            }
            previous = now;
        }
    }

    /// Removes the `commits/` keys of replicas that have not written since etcd revision
    /// `at` (gone, most likely): a replica reads its own key back only seconds after
    /// writing it, and writes it again with its next commit.
    async fn forget_commits_before(&self, at: i64) {
        let mut kv = self.kv();
        let prefix = self.key("commits/");
        let options = GetOptions::new().with_range(prefix_end(&prefix));
        let Ok(mut keys) = kv.get(prefix, Some(options)).await else {
            return;
        };
        for old in keys
            .take_kvs()
            .into_iter()
            .filter(|k| k.mod_revision() < at)
        {
            let key = old.key().to_vec();
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    old.mod_revision(),
                )])
                .and_then([TxnOp::delete(key, None)]);
            if let Err(e) = kv.txn(txn).await {
                tracing::debug!(error = %e, "forgetting an old replica's last commit");
            }
        }
    }

    /// Follows every replica's changes into `inner` until it is gone: the events written
    /// after etcd revision `at`, in order. A watch that breaks resumes after the last
    /// event applied; one that fell behind etcd's compaction, or saw a gap, or was told
    /// to by a committer, reloads the whole store.
    pub(super) async fn follow(self: Arc<Self>, inner: Weak<Inner>, mut at: i64) {
        let prefix = self.key("events/");
        let mut delay = Duration::from_millis(100);
        loop {
            let options = WatchOptions::new()
                .with_range(prefix_end(&prefix))
                .with_start_revision(at + 1);
            let mut watch = self
                .client
                .watch_client()
                .max_decoding_message_size(MAX_MESSAGE);
            let stream = watch.watch(prefix.clone(), Some(options)).await;
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "etcd watch failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            loop {
                let message = tokio::select! {
                    m = stream.message() => m,
                    () = self.reload.notified() => {
                        let Some(inner) = inner.upgrade() else { return };
                        tracing::warn!("a write waited too long for this replica's watch; reloading the store");
                        self.reload_into(&inner, &mut at).await;
                        break;
                    }
                };
                let message = match message {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "etcd watch broke; resuming");
                        break;
                    }
                };
                #[cfg(test)]
                let _lag = self.lag.read().await;
                let Some(inner) = inner.upgrade() else { return };
                delay = Duration::from_millis(100);
                if message.compact_revision() > 0 || message.canceled() {
                    tracing::warn!(
                        compacted = message.compact_revision(),
                        reason = message.cancel_reason(),
                        "etcd watch fell behind; reloading the store"
                    );
                    self.reload_into(&inner, &mut at).await;
                    break;
                }
                // `at` moves only with the events applied: a catch-up arrives in several
                // messages, each stamped with etcd's current revision, and a watch that
                // breaks between them must resume from the last event, not from there.
                let mut seen = at;
                let mut changes = Vec::new();
                let (mut unknown, mut unknown_first) = (None, None);
                {
                    let state = inner.state.read();
                    let mut last = HashMap::new();
                    for e in message.events() {
                        let Some(kv) = e.kv() else { continue };
                        seen = seen.max(kv.mod_revision());
                        if e.event_type() != etcd_client::EventType::Put {
                            continue;
                        }
                        let key = String::from_utf8_lossy(kv.key());
                        match decode_event(&key, kv.value(), &mut last) {
                            Ok(Decoded::Event(mut event)) => {
                                // The state before this change, as this replica knows it.
                                if event.old.is_none() {
                                    event.old =
                                        state.objects[event.res.id].get(&event.key).cloned();
                                }
                                changes.push(event);
                            }
                            Ok(Decoded::Unknown(rv)) => {
                                unknown = unknown.max(Some(rv));
                                unknown_first = unknown_first.or(Some(rv));
                            }
                            Ok(Decoded::Other) => {}
                            Err(e) => tracing::warn!(error = %e, "skipping an event"),
                        }
                    }
                }
                let first = match (changes.first().map(|c| c.rv), unknown_first) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if first.is_some_and(|rv| rv > inner.state.read().rv + 1) {
                    // Changes this replica never saw: start again from etcd.
                    self.reload_into(&inner, &mut at).await;
                    break;
                }
                if let Some(rv) = unknown {
                    // A kind this replica does not serve (a newer replica wrote it): its
                    // revision is skipped, with the history before it, since a watch
                    // resuming across it would miss a change.
                    let (before, after): (Vec<Event>, Vec<Event>) =
                        changes.into_iter().partition(|c| c.rv < rv);
                    if let Some(last) = before.last().map(|c| c.rv) {
                        inner.apply(before, last, last.saturating_sub(inner.history));
                    }
                    inner.skip_to(rv);
                    changes = after;
                }
                if let Some(rv) = changes.last().map(|c| c.rv) {
                    inner.apply(changes, rv, rv.saturating_sub(inner.history));
                }
                at = seen;
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// Reads the whole store again into `inner`; the watch resumes after it. On failure,
    /// `at` stays, so the next watch finds the same trouble and tries again.
    async fn reload_into(&self, inner: &Inner, at: &mut i64) {
        match self.load().await {
            Ok(loaded) => {
                *at = loaded.at;
                inner.replace(loaded.state);
            }
            Err(e) => tracing::warn!(error = %e, "reloading from etcd"),
        }
    }
}

/// The first key past every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// What a key under `events/` holds.
enum Decoded {
    Event(Event),
    /// A change to a kind this replica does not serve, at this revision.
    Unknown(u64),
    /// Not an event.
    Other,
}

/// An event as stored under `events/`; `last` holds the latest state of each object seen
/// so far, to fill in what a change replaced.
fn decode_event(
    key: &str,
    value: &[u8],
    last: &mut HashMap<(usize, ObjKey), Arc<Value>>,
) -> Result<Decoded, StoreError> {
    let Some(rv) = key.rsplit('/').next().and_then(|n| n.parse::<u64>().ok()) else {
        return Ok(Decoded::Other);
    };
    let v: Value = serde_json::from_slice(value).map_err(|source| StoreError::Corrupt {
        key: key.to_owned(),
        source,
    })?;
    let Some(res) = v["resource"].as_str().and_then(|r| registry().by_key(r)) else {
        return Ok(Decoded::Unknown(rv));
    };
    let obj_key = ObjKey::new(
        v["namespace"].as_str().unwrap_or_default(),
        v["name"].as_str().unwrap_or_default(),
    );
    let type_ = EventType::parse(v["type"].as_str().unwrap_or_default());
    let object = Arc::new(v["object"].clone());
    let old = if type_ == EventType::Deleted {
        last.remove(&(res.id, obj_key.clone()))
    } else {
        last.insert((res.id, obj_key.clone()), object.clone())
    };
    Ok(Decoded::Event(Event {
        rv,
        type_,
        res,
        key: obj_key,
        object,
        old,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::Store;
    use super::*;
    use crate::error::ApiError;

    fn ns_obj(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    }

    fn config(cluster: &portway_testkit::etcd::Cluster, prefix: &str) -> Config {
        Config {
            endpoints: cluster.endpoints(),
            prefix: prefix.to_owned(),
            tls: None,
            budget: crate::store::Budget::ETCD,
        }
    }

    /// Waits until `store` has seen revision `rv` (another replica's write).
    async fn sees(store: &Store, rv: u64) {
        let mut changed = store.subscribe();
        tokio::time::timeout(Duration::from_secs(10), changed.wait_for(|r| *r >= rv))
            .await
            .expect("the replica did not hear the write within 10 s")
            .unwrap();
    }

    /// The SQLite store's behaviour, on etcd: contiguous revisions, history kept and
    /// compacted, a refused write leaves nothing, and a new replica (or a restart) reads it
    /// all back.
    #[tokio::test]
    async fn etcd_keeps_the_sqlite_stores_behaviour() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = portway_testkit::etcd::Cluster::start(dir.path(), 1)
            .await
            .unwrap();
        let ns = registry().by_key("namespaces").unwrap();
        let store = Store::open_etcd(&config(&cluster, "/t1"), 3).await.unwrap();
        for i in 0..5 {
            let obj = ns_obj(&format!("n{i}"));
            store
                .write(move |txn| Ok(txn.put(ns, obj.clone())))
                .await
                .unwrap();
        }
        store
            .write(move |txn| Ok(txn.remove(ns, "", "n0")))
            .await
            .unwrap();
        let refused = store
            .write(move |txn| {
                txn.put(ns, ns_obj("never"));
                Err::<(), _>(ApiError::bad_request("no"))
            })
            .await;
        assert!(refused.is_err());
        assert_eq!(store.revision(), 6);
        assert_eq!(store.events_after(2).err(), Some(3));
        assert_eq!(store.events_after(3).unwrap().len(), 3);

        let again = Store::open_etcd(&config(&cluster, "/t1"), 3).await.unwrap();
        assert_eq!(again.revision(), 6);
        assert_eq!(again.list(ns, None).1.len(), 4);
        assert!(again.get(ns, "", "never").is_none());
        assert_eq!(
            again.get(ns, "", "n4").unwrap()["metadata"]["resourceVersion"],
            "5"
        );
        let events = again.events_after(4).unwrap();
        assert_eq!(
            events.iter().map(|e| (e.rv, e.type_)).collect::<Vec<_>>(),
            [(5, EventType::Added), (6, EventType::Deleted)]
        );
        // Another prefix is another store.
        let other = Store::open_etcd(&config(&cluster, "/t2"), 3).await.unwrap();
        assert_eq!(other.revision(), 0);
    }

    /// One write changing an object twice (created, then changed) commits: etcd refuses a
    /// transaction naming a key twice, so only the last state is written, and both
    /// changes keep their events.
    #[tokio::test]
    async fn a_write_may_change_one_object_twice() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = portway_testkit::etcd::Cluster::start(dir.path(), 1)
            .await
            .unwrap();
        let ns = registry().by_key("namespaces").unwrap();
        let store = Store::open_etcd(&config(&cluster, "/twice"), 100)
            .await
            .unwrap();
        store
            .write(move |txn| {
                txn.put(ns, ns_obj("a"));
                let mut changed = ns_obj("a");
                changed["metadata"]["labels"] = json!({"x": "y"});
                Ok(txn.put(ns, changed))
            })
            .await
            .unwrap();
        let again = Store::open_etcd(&config(&cluster, "/twice"), 100)
            .await
            .unwrap();
        assert_eq!(
            again.get(ns, "", "a").unwrap()["metadata"]["labels"]["x"],
            "y"
        );
        assert_eq!(again.events_after(0).unwrap().len(), 2);
    }

    /// A write with more changes than the history kept commits: the trimming of old events
    /// never reaches its own.
    #[tokio::test]
    async fn a_write_larger_than_the_history_commits() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = portway_testkit::etcd::Cluster::start(dir.path(), 1)
            .await
            .unwrap();
        let ns = registry().by_key("namespaces").unwrap();
        let store = Store::open_etcd(&config(&cluster, "/big"), 3)
            .await
            .unwrap();
        for round in 0..2 {
            store
                .write(move |txn| {
                    for i in 0..5 {
                        txn.put(ns, ns_obj(&format!("r{round}-{i}")));
                    }
                    Ok(())
                })
                .await
                .unwrap();
        }
        assert_eq!(store.revision(), 10);
        let again = Store::open_etcd(&config(&cluster, "/big"), 3)
            .await
            .unwrap();
        assert_eq!(again.list(ns, None).1.len(), 10);
    }

    /// A write larger than one etcd transaction fails alone with 413, naming the limits;
    /// writes queued with it commit, in groups that fit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_too_large_for_one_transaction_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = portway_testkit::etcd::Cluster::start(dir.path(), 1)
            .await
            .unwrap();
        let ns = registry().by_key("namespaces").unwrap();
        let mut small = config(&cluster, "/small");
        // Room for 8 changes per transaction.
        small.budget = crate::store::Budget {
            ops: 20,
            bytes: 1 << 20,
        };
        let store = Store::open_etcd(&small, 1000).await.unwrap();
        let big = store.clone();
        let too_big = tokio::spawn(async move {
            big.write(move |txn| {
                for i in 0..9 {
                    txn.put(ns, ns_obj(&format!("big{i}")));
                }
                Ok(())
            })
            .await
        });
        let writes = (0..40).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(move |txn| Ok(txn.put(ns, ns_obj(&format!("n{i}")))))
                    .await
            })
        });
        let results = futures::future::join_all(writes).await;
        assert!(results.iter().all(|r| matches!(r, Ok(Ok(_)))));
        let refused = too_big.await.unwrap().unwrap_err();
        assert_eq!(refused.code.as_u16(), 413, "{refused}");
        assert!(refused.message.contains("--etcd-max-txn-ops"), "{refused}");
        assert_eq!(store.revision(), 40);
        let again = Store::open_etcd(&small, 1000).await.unwrap();
        assert_eq!(again.list(ns, None).1.len(), 40);
    }

    /// Deleting a namespace holding more than one transaction takes: the first write
    /// deletes what fits and marks the namespace; the collector finishes, write by write.
    #[tokio::test]
    async fn a_namespace_larger_than_one_transaction_is_torn_down_in_parts() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = portway_testkit::etcd::Cluster::start(dir.path(), 1)
            .await
            .unwrap();
        let namespaces = registry().by_key("namespaces").unwrap();
        let secrets = registry().by_key("secrets").unwrap();
        let mut small = config(&cluster, "/teardown");
        small.budget = crate::store::Budget {
            ops: 20,
            bytes: 1 << 20,
        };
        let store = Store::open_etcd(&small, 1000).await.unwrap();
        store
            .write(move |txn| Ok(txn.put(namespaces, ns_obj("big"))))
            .await
            .unwrap();
        for i in 0..30 {
            let secret = json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": format!("c{i}"), "namespace": "big"}});
            store
                .write(move |txn| Ok(txn.put(secrets, secret.clone())))
                .await
                .unwrap();
        }
        let ctx = crate::write::WriteCtx {
            res: namespaces,
            ns: String::new(),
            manager: "test".into(),
            validation: crate::write::FieldValidation::Strict,
            dry_run: false,
            now: crate::write::now(),
            guard: None,
        };
        store
            .write(move |txn| {
                crate::write::delete(txn, &ctx, "big", crate::write::Propagation::Background)
            })
            .await
            .unwrap();
        let left = store.list(secrets, Some("big")).1.len();
        assert!(left > 0 && left < 30, "{left} left after the first write");
        assert!(store.get(namespaces, "", "big").is_some());
        assert!(crate::write::needs_collecting(&store));
        let mut writes = 0;
        while store.write(crate::write::collect).await.unwrap() {
            writes += 1;
            assert!(writes < 10, "the collector makes no progress");
        }
        assert!(store.list(secrets, Some("big")).1.is_empty());
        assert!(store.get(namespaces, "", "big").is_none());
        assert!(!crate::write::needs_collecting(&store));
    }

    /// An owner deleted with `Orphan` whose dependents do not fit in one transaction
    /// waits with the `orphan` finalizer while the collector takes its reference off
    /// them, then goes; no dependent is deleted.
    #[tokio::test]
    async fn orphaning_more_dependents_than_one_transaction_holds() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = portway_testkit::etcd::Cluster::start(dir.path(), 1)
            .await
            .unwrap();
        let secrets = registry().by_key("secrets").unwrap();
        let mut small = config(&cluster, "/orphan");
        small.budget = crate::store::Budget {
            ops: 20,
            bytes: 1 << 20,
        };
        let store = Store::open_etcd(&small, 1000).await.unwrap();
        let secret = |name: &str, owner: Option<&str>| {
            let mut s = json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")}});
            if let Some(o) = owner {
                s["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "Secret",
                    "name": o, "uid": format!("uid-{o}")}]);
            }
            s
        };
        let owner = secret("owner", None);
        store
            .write(move |txn| Ok(txn.put(secrets, owner.clone())))
            .await
            .unwrap();
        for i in 0..20 {
            let dep = secret(&format!("dep{i}"), Some("owner"));
            store
                .write(move |txn| Ok(txn.put(secrets, dep.clone())))
                .await
                .unwrap();
        }
        let ctx = crate::write::WriteCtx {
            res: secrets,
            ns: "default".into(),
            manager: "test".into(),
            validation: crate::write::FieldValidation::Strict,
            dry_run: false,
            now: crate::write::now(),
            guard: None,
        };
        let marked = store
            .write(move |txn| {
                crate::write::delete(txn, &ctx, "owner", crate::write::Propagation::Orphan)
            })
            .await
            .unwrap();
        assert_eq!(marked["metadata"]["finalizers"], json!(["orphan"]));
        assert!(crate::write::needs_collecting(&store));
        let mut writes = 0;
        while store.write(crate::write::collect).await.unwrap() {
            writes += 1;
            assert!(writes < 10, "the collector makes no progress");
        }
        assert!(store.get(secrets, "default", "owner").is_none());
        let deps = store.list(secrets, Some("default")).1;
        assert_eq!(deps.len(), 20, "a dependent was deleted");
        assert!(
            deps.iter().all(|d| d["metadata"]["ownerReferences"]
                .as_array()
                .is_none_or(Vec::is_empty)),
            "a dependent still names its deleted owner"
        );
    }

    /// A write at one replica that needs another replica's write just acknowledged is not
    /// refused on a stale view: a refusing (or no-op) write first checks etcd.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_never_rests_on_a_stale_replica() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = portway_testkit::etcd::Cluster::start(dir.path(), 1)
            .await
            .unwrap();
        let ns = registry().by_key("namespaces").unwrap();
        let a = Store::open_etcd(&config(&cluster, "/stale"), 1000)
            .await
            .unwrap();
        let b = Store::open_etcd(&config(&cluster, "/stale"), 1000)
            .await
            .unwrap();
        let super::super::Durable::Etcd(b_etcd) = &b.inner.db else {
            unreachable!()
        };
        for i in 0..3 {
            let name = format!("n{i}");
            let made = ns_obj(&name);
            // B's watch lags behind A's write for a moment.
            let lag = b_etcd.lag.clone().write_owned().await;
            a.write(move |txn| Ok(txn.put(ns, made.clone())))
                .await
                .unwrap();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                drop(lag);
            });
            b.write(move |txn| {
                txn.get(ns, "", &name)
                    .map(drop)
                    .ok_or_else(|| ApiError::not_found(ns, &name))
            })
            .await
            .unwrap_or_else(|e| panic!("replica B refused on a stale view: {e}"));
        }
    }

    /// Two replicas writing at once through one etcd: every acknowledged write is kept,
    /// each gets its own revision, contiguous, and both replicas see the same events in the
    /// same order; a name both create is created once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_share_one_history() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = portway_testkit::etcd::Cluster::start(dir.path(), 1)
            .await
            .unwrap();
        let ns = registry().by_key("namespaces").unwrap();
        let a = Store::open_etcd(&config(&cluster, "/r"), 10_000)
            .await
            .unwrap();
        let b = Store::open_etcd(&config(&cluster, "/r"), 10_000)
            .await
            .unwrap();
        let writes = (0..100).map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let mine = format!("n{i}");
                store
                    .write(move |txn| {
                        // Both replicas also race for one name: created once, by either.
                        if txn.get(ns, "", "shared").is_none() {
                            txn.put(ns, ns_obj("shared"));
                        }
                        Ok(txn.put(ns, ns_obj(&mine)))
                    })
                    .await
            })
        });
        let results = futures::future::join_all(writes).await;
        assert!(results.iter().all(|r| matches!(r, Ok(Ok(_)))));
        let total = 101;
        sees(&a, total).await;
        sees(&b, total).await;
        for store in [&a, &b] {
            assert_eq!(store.revision(), total);
            assert_eq!(store.list(ns, None).1.len(), 101);
            let events = store.events_after(0).unwrap();
            assert!(events.iter().enumerate().all(|(i, e)| e.rv == i as u64 + 1));
            let added: Vec<_> = events.iter().filter(|e| e.key.name == "shared").collect();
            assert_eq!(added.len(), 1, "the shared name was created twice");
        }
        let order = |s: &Store| -> Vec<String> {
            s.events_after(0)
                .unwrap()
                .iter()
                .map(|e| e.key.name.clone())
                .collect()
        };
        assert_eq!(order(&a), order(&b));
    }
}
