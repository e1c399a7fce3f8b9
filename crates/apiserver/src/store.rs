//! The object store: SQLite for durability, an in-memory copy for reads, and an event log
//! (persisted too) from which watches resume.
//!
//! Writers are serialised: a write runs as a closure over a [`Txn`] that sees the current
//! state plus its own changes, and is committed to SQLite before it becomes visible in
//! memory or to watchers. An acknowledged write therefore survives `kill -9`.
//!
//! Writes that queue up while one commit is syncing are committed together (group
//! commit): each still runs alone, in order, seeing the ones before it, and one that
//! fails leaves no trace; the group then costs one SQLite transaction and one fsync
//! instead of one each, which bounded a busy server at a few hundred writes a second.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use tokio::sync::watch;

use crate::error::ApiError;
use crate::registry::{Res, registry};

pub mod etcd;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening {path}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("sqlite")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored object {key} is not valid JSON")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("write task failed")]
    Join,
    #[error("etcd: {0}")]
    Etcd(String),
    /// One write larger than a single commit may be (etcd's `--max-txn-ops` and
    /// `--max-request-bytes`).
    #[error(
        "this write changes {changes} objects (about {bytes} bytes, {ops} etcd operations); one etcd transaction holds at most {max_ops} operations and {max_bytes} bytes (etcd's --max-txn-ops and --max-request-bytes, told to the API server with --etcd-max-txn-ops and --etcd-max-request-bytes)"
    )]
    TooLarge {
        changes: usize,
        ops: usize,
        bytes: usize,
        max_ops: usize,
        max_bytes: usize,
    },
    /// etcd took the write but its answer never came: it may or may not have been applied.
    #[error(
        "the outcome of this write is unknown ({0}); it may have been applied: read before retrying"
    )]
    Unknown(String),
    /// Other replicas won every race for the store's revision.
    #[error("the store is busy: other API servers wrote first {0} times in a row")]
    Busy(usize),
}

/// What one commit may hold: etcd caps a transaction's operations (`--max-txn-ops`) and
/// its size (`--max-request-bytes`). SQLite has no such cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub ops: usize,
    pub bytes: usize,
}

impl Budget {
    /// etcd's defaults.
    pub const ETCD: Self = Self {
        ops: 128,
        bytes: 1536 * 1024,
    };

    /// What a commit of these changes costs, as [`etcd::Etcd::commit`] writes them: each
    /// change writes its object (or deletes it) and its event, which carries the object
    /// again; every commit writes the revision, trims history and names itself. `bytes`
    /// is what the changes' objects and keys take once ([`Txn::count`]).
    fn cost(changes: usize, bytes: usize) -> Self {
        Self {
            ops: changes * 2 + 3,
            bytes: bytes * 2 + changes * PER_CHANGE + 16 * 1024,
        }
    }

    fn holds(&self, other: &Self) -> bool {
        other.ops <= self.ops && other.bytes <= self.bytes
    }
}

/// What each change adds beside its object and key: the etcd keys' prefixes, the event's
/// wrapper, gRPC framing.
const PER_CHANGE: usize = 512;

/// The length of `v` as JSON, without building the string.
fn json_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, v);
    count.0
}

/// Namespace (empty for cluster-scoped kinds) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    pub ns: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(ns: &str, name: &str) -> Self {
        Self {
            ns: ns.to_owned(),
            name: name.to_owned(),
        }
    }

    pub fn of(value: &Value) -> Self {
        let meta = &value["metadata"];
        Self::new(
            meta["namespace"].as_str().unwrap_or_default(),
            meta["name"].as_str().unwrap_or_default(),
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "ADDED" => Self::Added,
            "DELETED" => Self::Deleted,
            _ => Self::Modified,
        }
    }
}

/// One change. `object` carries the change's revision as its `resourceVersion`; for
/// deletions it is the last state. `old` is the previous state, when known, so filtered
/// watches can tell an object leaving their selection.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub type_: EventType,
    pub res: Res,
    pub key: ObjKey,
    pub object: Arc<Value>,
    pub old: Option<Arc<Value>>,
}

struct State {
    objects: Vec<BTreeMap<ObjKey, Arc<Value>>>,
    rv: u64,
    /// Events with `rv > floor`, contiguous, oldest first.
    log: VecDeque<Arc<Event>>,
    floor: u64,
}

/// Where writes are made durable.
enum Durable {
    /// One file on this machine; the store is the only writer.
    Sqlite(Mutex<Connection>),
    /// An etcd cluster shared by every replica; see [`etcd`].
    Etcd(Arc<etcd::Etcd>),
}

struct Inner {
    db: Durable,
    state: RwLock<State>,
    changed: watch::Sender<u64>,
    history: u64,
    queue: Mutex<Queue>,
    /// What one commit may hold, when capped.
    budget: Option<Budget>,
    /// Woken by a write that left work for later.
    leftover: tokio::sync::Notify,
}

/// Writes waiting for the committer, and whether one runs.
#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    committing: bool,
}

/// How often etcd's own history is compacted (as kube-apiserver does, every 5 minutes).
const COMPACT_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

/// Writes run in one group at most, so one slow group does not hold up the next ones.
const MAX_GROUP: usize = 1024;

/// One queued write: runs against the group's view and says whether it succeeded (its
/// changes then join the group); what it returns delivers its outcome once the group
/// is durable, or its failure. It may run more than once: on etcd, a group another
/// replica got ahead of runs again on the newer state, and only the last run's outcome
/// is delivered.
type Job = Box<dyn FnMut(&mut Txn<'_>) -> (bool, Deliver) + Send>;
type Deliver = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;

/// Cheap to clone; all clones share one database and one memory image.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

type Overlay = HashMap<(usize, ObjKey), Option<Arc<Value>>>;

/// A write in progress: reads see the committed state, then the earlier writes of its
/// group (`below`), then this transaction's own changes.
pub struct Txn<'a> {
    state: &'a State,
    below: &'a Overlay,
    overlay: Overlay,
    changes: Vec<Event>,
    rv: u64,
    /// The commit's budget, when capped; the changes of the group's earlier writes; and
    /// the bytes of objects they and this write changed so far.
    room: Option<Budget>,
    below_changes: usize,
    bytes: usize,
    /// Work this write left for a later one (see [`Txn::leave_for_later`]).
    later: bool,
}

impl Txn<'_> {
    /// Whether one more change to an object like `object` fits in this write's commit
    /// (always, on SQLite; the first change of a write always does: a write that does not
    /// fit behind others runs again first in the next commit). Writes that sweep many
    /// objects (a namespace's teardown, a collection deleted, expiry) stop when it says
    /// no, and leave the rest to a later write.
    pub fn fits(&self, object: &Value) -> bool {
        let Some(room) = self.room else {
            return true;
        };
        if self.changes.is_empty() {
            return true;
        }
        // Room for it, and for what its removal may bring along: an Event's twin in the
        // other Events API, and the namespace it empties (small).
        let bytes = self.bytes + (json_len(object) + 1024) * 2 + 8 * 1024;
        room.holds(&Budget::cost(
            self.below_changes + self.changes.len() + 3,
            bytes,
        ))
    }

    /// Says that this write stopped short (what it swept did not fit) and left the rest
    /// for the collector; [`Store::leftovers`] wakes once it commits.
    pub fn leave_for_later(&mut self) {
        self.later = true;
    }

    pub fn left_for_later(&self) -> bool {
        self.later
    }

    /// What the group's commit costs with this write in it.
    fn cost(&self) -> Budget {
        Budget::cost(self.below_changes + self.changes.len(), self.bytes)
    }

    fn count(&mut self, res: Res, key: &ObjKey, object: &Value) {
        if self.room.is_some() {
            // The object, and its key (written twice: the object's and the event's).
            self.bytes += json_len(object) + res.key().len() + key.ns.len() + key.name.len();
        }
    }

    pub fn get(&self, res: Res, ns: &str, name: &str) -> Option<Arc<Value>> {
        let key = (res.id, ObjKey::new(ns, name));
        match self.overlay.get(&key).or_else(|| self.below.get(&key)) {
            Some(v) => v.clone(),
            None => self.state.objects[res.id].get(&key.1).cloned(),
        }
    }

    /// Objects of a kind, in one namespace or all of them, as this transaction sees them.
    pub fn list(&self, res: Res, ns: Option<&str>) -> Vec<Arc<Value>> {
        let mut merged: BTreeMap<ObjKey, Arc<Value>> = range(&self.state.objects[res.id], ns)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for ((id, key), v) in self.below.iter().chain(&self.overlay) {
            if *id != res.id || ns.is_some_and(|ns| key.ns != ns) {
                continue;
            }
            match v {
                Some(v) => merged.insert(key.clone(), v.clone()),
                None => merged.remove(key),
            };
        }
        merged.into_values().collect()
    }

    /// Stores `object` at its `metadata.namespace/name`, stamping a new resourceVersion.
    pub fn put(&mut self, res: Res, mut object: Value) -> Arc<Value> {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        let key = ObjKey::of(&object);
        let old = self.get(res, &key.ns, &key.name);
        self.count(res, &key, &object);
        let object = Arc::new(object);
        let type_ = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.overlay
            .insert((res.id, key.clone()), Some(object.clone()));
        self.changes.push(Event {
            rv: self.rv,
            type_,
            res,
            key,
            object: object.clone(),
            old,
        });
        object
    }

    /// Removes an object; the DELETED event carries its last state at a new revision.
    pub fn remove(&mut self, res: Res, ns: &str, name: &str) -> Option<Arc<Value>> {
        let old = self.get(res, ns, name)?;
        self.rv += 1;
        let mut last = (*old).clone();
        last["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        let key = ObjKey::new(ns, name);
        self.count(res, &key, &last);
        let last = Arc::new(last);
        self.overlay.insert((res.id, key.clone()), None);
        self.changes.push(Event {
            rv: self.rv,
            type_: EventType::Deleted,
            res,
            key,
            object: last.clone(),
            old: Some(old),
        });
        Some(last)
    }
}

fn range<'a>(
    map: &'a BTreeMap<ObjKey, Arc<Value>>,
    ns: Option<&str>,
) -> Box<dyn Iterator<Item = (&'a ObjKey, &'a Arc<Value>)> + 'a> {
    match ns {
        None => Box::new(map.iter()),
        Some(ns) => {
            let ns = ns.to_owned();
            let start = ObjKey {
                ns: ns.clone(),
                name: String::new(),
            };
            Box::new(map.range(start..).take_while(move |(k, _)| k.ns == ns))
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS objects (
    resource TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (resource, namespace, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    rv INTEGER PRIMARY KEY, type TEXT NOT NULL, resource TEXT NOT NULL,
    namespace TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
";

impl Store {
    /// Opens (or creates) the database at `path`, keeping `history` revisions of events
    /// for watches to resume from.
    ///
    /// # Errors
    /// When the file cannot be opened or holds data that is not ours.
    pub fn open(path: &Path, history: u64) -> Result<Self, StoreError> {
        let db = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        // WAL keeps readers and the writer apart; FULL syncs the WAL on every commit so an
        // acknowledged write survives a crash of the process and of the machine.
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(SCHEMA)?;
        let meta = |key: &str| -> Result<u64, rusqlite::Error> {
            let v: Option<i64> = db
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()?;
            Ok(v.unwrap_or(0) as u64)
        };
        let rv = meta("revision")?;
        let floor = meta("floor")?;

        let reg = registry();
        let mut objects: Vec<BTreeMap<ObjKey, Arc<Value>>> =
            reg.all().map(|_| BTreeMap::new()).collect();
        {
            let mut stmt = db.prepare("SELECT resource, namespace, name, body FROM objects")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let resource: String = row.get(0)?;
                let Some(res) = reg.by_key(&resource) else {
                    tracing::warn!(%resource, "skipping stored objects of an unknown kind");
                    continue;
                };
                let (ns, name, body): (String, String, String) =
                    (row.get(1)?, row.get(2)?, row.get(3)?);
                let value = serde_json::from_str(&body).map_err(|source| StoreError::Corrupt {
                    key: format!("{resource}/{ns}/{name}"),
                    source,
                })?;
                objects[res.id].insert(ObjKey { ns, name }, Arc::new(value));
            }
        }
        let mut log = VecDeque::new();
        {
            let mut last: HashMap<(usize, ObjKey), Arc<Value>> = HashMap::new();
            let mut stmt = db
                .prepare("SELECT rv, type, resource, namespace, name, body FROM events WHERE rv > ?1 ORDER BY rv")?;
            let mut rows = stmt.query([floor as i64])?;
            let mut expected = floor + 1;
            while let Some(row) = rows.next()? {
                let rv = row.get::<_, i64>(0)? as u64;
                let resource: String = row.get(2)?;
                let res = reg.by_key(&resource);
                if rv != expected || res.is_none() {
                    // A gap (or a kind we no longer serve): resuming across it would skip
                    // changes, so history restarts after it.
                    log.clear();
                    last.clear();
                }
                expected = rv + 1;
                let Some(res) = res else { continue };
                let key = ObjKey {
                    ns: row.get(3)?,
                    name: row.get(4)?,
                };
                let body: String = row.get(5)?;
                let object: Arc<Value> =
                    Arc::new(serde_json::from_str(&body).map_err(|source| {
                        StoreError::Corrupt {
                            key: format!("event {rv}"),
                            source,
                        }
                    })?);
                let type_ = EventType::parse(&row.get::<_, String>(1)?);
                let old = if type_ == EventType::Deleted {
                    last.remove(&(res.id, key.clone()))
                } else {
                    last.insert((res.id, key.clone()), object.clone())
                };
                log.push_back(Arc::new(Event {
                    rv,
                    type_,
                    res,
                    key,
                    object,
                    old,
                }));
            }
        }
        if log.back().is_some_and(|e| e.rv != rv) {
            log.clear();
        }
        let floor = log.front().map_or(rv, |e| e.rv - 1);
        let (changed, _) = watch::channel(rv);
        let state = State {
            objects,
            rv,
            log,
            floor,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                db: Durable::Sqlite(Mutex::new(db)),
                state: RwLock::new(state),
                changed,
                history: history.max(1),
                queue: Mutex::default(),
                budget: None,
                leftover: tokio::sync::Notify::new(),
            }),
        })
    }

    /// Opens the store on an etcd cluster (see [`etcd`]), keeping `history` revisions of
    /// events, and follows the other replicas' writes from then on.
    ///
    /// # Errors
    /// When no member answers, or what is stored is not ours.
    pub async fn open_etcd(config: &etcd::Config, history: u64) -> Result<Self, StoreError> {
        let etcd = Arc::new(etcd::Etcd::connect(config).await?);
        let loaded = etcd.load().await?;
        let (changed, _) = watch::channel(loaded.state.rv);
        let inner = Arc::new(Inner {
            db: Durable::Etcd(etcd.clone()),
            state: RwLock::new(loaded.state),
            changed,
            history: history.max(1),
            queue: Mutex::default(),
            budget: Some(config.budget),
            leftover: tokio::sync::Notify::new(),
        });
        tokio::spawn(etcd.clone().follow(Arc::downgrade(&inner), loaded.at));
        tokio::spawn(etcd.compact_every(COMPACT_EVERY, Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// Runs `f` as one serialised transaction and commits its changes durably.
    ///
    /// # Errors
    /// Whatever `f` returns, or a storage failure.
    pub async fn write<T, F>(&self, mut f: F) -> Result<T, ApiError>
    where
        F: FnMut(&mut Txn<'_>) -> Result<T, ApiError> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let job: Job = Box::new(move |txn| {
            let result = f(txn);
            let ok = result.is_ok();
            let tx = tx.clone();
            let deliver: Deliver = Box::new(move |durable| {
                // A group that did not persist fails every write in it, refused ones too:
                // a refusal may rest on an earlier write of the group that is now gone.
                if let Some(tx) = tx.lock().take() {
                    let _ = tx.send(match durable {
                        Err(e) => Err(ApiError::from(e)),
                        Ok(()) => result,
                    });
                }
            });
            (ok, deliver)
        });
        let start = {
            let mut q = self.inner.queue.lock();
            q.jobs.push(job);
            !std::mem::replace(&mut q.committing, true)
        };
        if start {
            let inner = self.inner.clone();
            match &self.inner.db {
                Durable::Sqlite(_) => {
                    tokio::task::spawn_blocking(move || inner.commit_queued());
                }
                Durable::Etcd(_) => {
                    tokio::spawn(async move { inner.commit_queued_etcd().await });
                }
            }
        }
        // A dropped sender means the write panicked.
        rx.await.map_err(|_| ApiError::from(StoreError::Join))?
    }

    pub fn get(&self, res: Res, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.inner.state.read().objects[res.id]
            .get(&ObjKey::new(ns, name))
            .cloned()
    }

    /// A consistent snapshot: the current revision and the objects of a kind.
    pub fn list(&self, res: Res, ns: Option<&str>) -> (u64, Vec<Arc<Value>>) {
        let state = self.inner.state.read();
        (
            state.rv,
            range(&state.objects[res.id], ns)
                .map(|(_, v)| v.clone())
                .collect(),
        )
    }

    pub fn revision(&self) -> u64 {
        self.inner.state.read().rv
    }

    /// Events after revision `rv`, or `Err(floor)` when some of them were compacted away.
    pub fn events_after(&self, rv: u64) -> Result<Vec<Arc<Event>>, u64> {
        let state = self.inner.state.read();
        if rv < state.floor {
            return Err(state.floor);
        }
        let skip = usize::try_from(rv - state.floor).unwrap_or(usize::MAX);
        Ok(state.log.iter().skip(skip).cloned().collect())
    }

    /// Resolves once a write has left work for later (see [`Txn::leave_for_later`]);
    /// possibly early, as the write may still fail.
    pub async fn leftovers(&self) {
        self.inner.leftover.notified().await;
    }

    /// Resolves whenever the revision moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }
}

impl Inner {
    /// The next group of queued writes, or `None` (and no committer) when there is none.
    fn next_group(&self, max: usize) -> Option<Vec<Job>> {
        let mut q = self.queue.lock();
        if q.jobs.is_empty() {
            q.committing = false;
            return None;
        }
        let n = q.jobs.len().min(max);
        Some(q.jobs.drain(..n).collect())
    }

    /// Commits groups until the queue is empty; one committer runs at a time.
    fn commit_queued(&self) {
        let guard = Committer(self);
        let Durable::Sqlite(db) = &self.db else {
            return;
        };
        let mut db = db.lock();
        while let Some(jobs) = self.next_group(MAX_GROUP) {
            self.commit_group(&mut db, jobs);
        }
        std::mem::forget(guard);
    }

    /// Runs `jobs` in order against the current state, each seeing the ones before it:
    /// the changes of those that succeeded, the revision after them, and every outcome
    /// to deliver once the group is durable (or not). When the commit's budget is capped,
    /// the group stops before the first write that would not fit (`ran` says how many
    /// ran; the rest wait for the next group), and a write that does not fit even alone
    /// fails at once.
    fn run_group(&self, jobs: &mut [Job]) -> Group {
        let mut overlay = Overlay::new();
        let mut changes = Vec::new();
        let mut delivers = Vec::with_capacity(jobs.len());
        let state = self.state.read();
        let base = state.rv;
        let mut rv = base;
        let mut bytes = 0;
        let mut ran = 0;
        for job in jobs.iter_mut() {
            let mut txn = Txn {
                state: &state,
                below: &overlay,
                overlay: Overlay::new(),
                changes: Vec::new(),
                rv,
                room: self.budget,
                below_changes: changes.len(),
                bytes,
                later: false,
            };
            // A panicking write drops its sender (its caller sees a failed write)
            // and leaves no changes; the others in the group go on.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut txn)));
            let Ok((ok, deliver)) = outcome else {
                ran += 1;
                continue;
            };
            if ok && let Some(budget) = self.budget {
                let cost = txn.cost();
                if !budget.holds(&cost) {
                    if !changes.is_empty() {
                        // Runs again, first in the next group.
                        break;
                    }
                    deliver(Err(&StoreError::TooLarge {
                        changes: txn.changes.len(),
                        ops: cost.ops,
                        bytes: cost.bytes,
                        max_ops: budget.ops,
                        max_bytes: budget.bytes,
                    }));
                    ran += 1;
                    continue;
                }
            }
            ran += 1;
            if ok {
                if txn.later {
                    self.leftover.notify_one();
                }
                rv = txn.rv;
                bytes = txn.bytes;
                changes.append(&mut txn.changes);
                overlay.extend(txn.overlay);
            }
            delivers.push(deliver);
        }
        Group {
            base,
            rv,
            changes,
            delivers,
            ran,
        }
    }

    fn commit_group(&self, db: &mut Connection, mut jobs: Vec<Job>) {
        // No budget on SQLite: every job runs.
        let Group {
            rv,
            changes,
            delivers,
            ..
        } = self.run_group(&mut jobs);
        let durable = if changes.is_empty() {
            Ok(())
        } else {
            let floor = rv.saturating_sub(self.history);
            let persisted = persist(db, &changes, rv, floor);
            if persisted.is_ok() {
                self.apply(changes, rv, floor);
            } else if let Err(e) = &persisted {
                tracing::error!(error = %e, "storage failure");
            }
            persisted
        };
        for deliver in delivers {
            deliver(durable.as_ref().map(|_| ()));
        }
    }

    /// Commits groups through etcd until the queue is empty. A group that another replica
    /// got ahead of runs again once this replica has caught up; writes that did not fit
    /// in a group's transaction go back to the head of the queue.
    async fn commit_queued_etcd(self: Arc<Self>) {
        let guard = Committer(&self);
        let Durable::Etcd(etcd) = &self.db else {
            return;
        };
        while let Some(mut jobs) = self.next_group(MAX_GROUP) {
            let ran = self.commit_group_etcd(etcd, &mut jobs).await;
            if ran < jobs.len() {
                let rest = jobs.split_off(ran);
                self.queue.lock().jobs.splice(0..0, rest);
            }
        }
        std::mem::forget(guard);
    }

    /// Waits until this replica has seen revision `current` (written by another), telling
    /// the watch to reload if it takes long; says whether it got there.
    async fn catch_up(&self, etcd: &etcd::Etcd, current: u64) -> bool {
        const CATCH_UP: std::time::Duration = std::time::Duration::from_secs(10);
        let mut seen = self.changed.subscribe();
        for reload in [false, true] {
            if reload {
                etcd.reload();
            }
            let wait = seen.wait_for(|rv| *rv >= current);
            if matches!(tokio::time::timeout(CATCH_UP, wait).await, Ok(Ok(_))) {
                return true;
            }
        }
        false
    }

    /// Commits one group; says how many of `jobs` it took.
    async fn commit_group_etcd(&self, etcd: &etcd::Etcd, jobs: &mut [Job]) -> usize {
        // Races lost in a row before the group's writes fail (a replica that never wins
        // would otherwise hold its callers forever).
        const MAX_RACES: usize = 100;
        let mut races = 0;
        loop {
            let Group {
                base,
                rv,
                changes,
                delivers,
                ran,
            } = self.run_group(jobs);
            if changes.is_empty() {
                // Nothing to commit, but a refusal here (a name not found, a nonce
                // unknown) rests on this replica's view, which another replica's write may
                // have overtaken: when etcd is further on, catch up and run again.
                if races + 1 < MAX_RACES
                    && let Ok(current) = etcd.revision().await
                    && current > base
                {
                    races += 1;
                    if self.catch_up(etcd, current).await {
                        continue;
                    }
                }
                for deliver in delivers {
                    deliver(Ok(()));
                }
                return ran;
            }
            let floor = rv.saturating_sub(self.history);
            let outcome = match etcd.commit(base, &changes, rv, floor).await {
                Ok(Ok(())) => {
                    self.apply(changes, rv, floor);
                    Ok(())
                }
                Ok(Err(current)) if races + 1 < MAX_RACES => {
                    // Another replica wrote first: run again once its writes are here
                    // (this run's outcomes are dropped undelivered). A watch that missed
                    // them is told to reload once.
                    races += 1;
                    if self.catch_up(etcd, current).await {
                        continue;
                    }
                    Err(StoreError::Etcd(format!(
                        "revision {current} was written elsewhere and did not reach this replica, even reloaded"
                    )))
                }
                Ok(Err(_)) => Err(StoreError::Busy(races + 1)),
                Err(e) => Err(e),
            };
            if let Err(e) = &outcome {
                tracing::error!(error = %e, "storage failure");
            }
            for deliver in delivers {
                deliver(outcome.as_ref().map(|_| ()));
            }
            return ran;
        }
    }

    /// Replaces the whole state (an etcd replica that fell behind and reloaded): watches
    /// older than it get `410 Gone` and list again.
    fn replace(&self, state: State) {
        let rv = state.rv;
        let mut current = self.state.write();
        // Read before a local commit landed: this replica is already further.
        if rv < current.rv {
            return;
        }
        *current = state;
        drop(current);
        self.changed.send_replace(rv);
    }

    /// Moves to revision `rv` without its change (of a kind this replica does not serve):
    /// the history before it goes, so watches older than it list again (410) rather than
    /// miss a change.
    fn skip_to(&self, rv: u64) {
        let mut state = self.state.write();
        if rv <= state.rv {
            return;
        }
        state.rv = rv;
        state.log.clear();
        state.floor = rv;
        drop(state);
        self.changed.send_replace(rv);
    }

    /// Makes committed changes visible to readers and watchers. Changes already applied
    /// (an etcd replica hears its own writes back) are skipped.
    fn apply(&self, changes: Vec<Event>, rv: u64, floor: u64) {
        let mut state = self.state.write();
        if rv <= state.rv {
            return;
        }
        let known = state.rv;
        for change in changes.into_iter().filter(|c| c.rv > known) {
            let map = &mut state.objects[change.res.id];
            if change.type_ == EventType::Deleted {
                map.remove(&change.key);
            } else {
                map.insert(change.key.clone(), change.object.clone());
            }
            state.log.push_back(Arc::new(change));
        }
        state.rv = rv;
        while state.floor < floor {
            state.log.pop_front();
            state.floor += 1;
        }
        drop(state);
        self.changed.send_replace(rv);
    }
}

/// A group of writes, run.
struct Group {
    /// The revision it ran on.
    base: u64,
    /// The revision after it.
    rv: u64,
    changes: Vec<Event>,
    delivers: Vec<Deliver>,
    /// How many of the jobs ran; the others did not fit and wait for the next group.
    ran: usize,
}

/// Held by the committer while it runs: if it unwinds (a panic outside a job, or its task
/// torn down with the runtime), the queued writes fail instead of waiting forever, and the
/// next write starts a new committer.
struct Committer<'a>(&'a Inner);

impl Drop for Committer<'_> {
    fn drop(&mut self) {
        let mut q = self.0.queue.lock();
        q.committing = false;
        // Dropping a job drops its sender: its caller sees a failed write.
        q.jobs.clear();
    }
}

fn persist(db: &mut Connection, changes: &[Event], rv: u64, floor: u64) -> Result<(), StoreError> {
    let tx = db.transaction()?;
    {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO objects (resource, namespace, name, body) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (resource, namespace, name) DO UPDATE SET body = excluded.body",
        )?;
        let mut delete = tx.prepare_cached(
            "DELETE FROM objects WHERE resource = ?1 AND namespace = ?2 AND name = ?3",
        )?;
        let mut event = tx.prepare_cached(
            "INSERT INTO events (rv, type, resource, namespace, name, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for c in changes {
            let resource = c.res.key();
            let body = c.object.to_string();
            if c.type_ == EventType::Deleted {
                delete.execute(params![resource, c.key.ns, c.key.name])?;
            } else {
                upsert.execute(params![resource, c.key.ns, c.key.name, body])?;
            }
            event.execute(params![
                c.rv as i64,
                c.type_.as_str(),
                resource,
                c.key.ns,
                c.key.name,
                body
            ])?;
        }
        tx.execute("DELETE FROM events WHERE rv <= ?1", [floor as i64])?;
        let mut set_meta = tx.prepare_cached(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )?;
        set_meta.execute(params!["revision", rv as i64])?;
        set_meta.execute(params!["floor", floor as i64])?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ns_obj(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    }

    #[tokio::test]
    async fn writes_survive_reopen_and_history_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let ns = registry().by_key("namespaces").unwrap();
        let store = Store::open(&path, 3).unwrap();
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
        assert_eq!(store.revision(), 6);
        assert_eq!(store.events_after(2).err(), Some(3));
        assert_eq!(store.events_after(3).unwrap().len(), 3);
        drop(store);

        let store = Store::open(&path, 3).unwrap();
        assert_eq!(store.revision(), 6);
        assert_eq!(store.list(ns, None).1.len(), 4);
        assert_eq!(
            store.get(ns, "", "n4").unwrap()["metadata"]["resourceVersion"],
            "5"
        );
        let events = store.events_after(4).unwrap();
        assert_eq!(
            events.iter().map(|e| (e.rv, e.type_)).collect::<Vec<_>>(),
            [(5, EventType::Added), (6, EventType::Deleted)]
        );
        assert!(store.events_after(2).is_err());
    }

    #[tokio::test]
    async fn failed_transaction_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ns = registry().by_key("namespaces").unwrap();
        let store = Store::open(&dir.path().join("db"), 100).unwrap();
        let err = store
            .write(move |txn| {
                txn.put(ns, ns_obj("a"));
                assert!(txn.get(ns, "", "a").is_some());
                Err::<(), _>(ApiError::bad_request("no"))
            })
            .await;
        assert!(err.is_err());
        assert_eq!(store.revision(), 0);
        assert!(store.get(ns, "", "a").is_none());
    }

    /// Writes queued together commit as a group: each sees the ones before it, one that
    /// fails or panics leaves no trace, and the others are durable and in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_commits_its_writes_alone_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let ns = registry().by_key("namespaces").unwrap();
        let store = Store::open(&path, 1000).unwrap();
        let writes = (0..200).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(move |txn| {
                        // Every write also counts the namespaces it sees: they must be the
                        // successful writes before it, in its group or not.
                        let seen = txn.list(ns, None).len();
                        txn.put(ns, ns_obj(&format!("n{i}")));
                        match i % 50 {
                            7 => Err(ApiError::bad_request("refused")),
                            13 => panic!("a write that panics"),
                            _ => Ok(seen),
                        }
                    })
                    .await
            })
        });
        let results = futures::future::join_all(writes).await;
        let mut seen: Vec<usize> = results
            .into_iter()
            .filter_map(|r| r.unwrap().ok())
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..192).collect::<Vec<_>>());
        assert_eq!(store.revision(), 192);
        let events = store.events_after(0).unwrap();
        assert!(events.iter().enumerate().all(|(i, e)| e.rv == i as u64 + 1));
        drop(store);
        let store = Store::open(&path, 1000).unwrap();
        let names = store.list(ns, None).1;
        assert_eq!(names.len(), 192);
        assert!(store.get(ns, "", "n7").is_none() && store.get(ns, "", "n13").is_none());
    }

    /// A committer that unwinds past every per-write catch (here, a delivery that panics)
    /// must fail what it held and leave the next write a committer, not a queue that
    /// waits forever.
    #[tokio::test]
    async fn a_committer_that_unwinds_leaves_the_store_writable() {
        let dir = tempfile::tempdir().unwrap();
        let ns = registry().by_key("namespaces").unwrap();
        let store = Store::open(&dir.path().join("db"), 100).unwrap();
        {
            let mut q = store.inner.queue.lock();
            q.jobs.push(Box::new(move |_| {
                let deliver: Deliver = Box::new(|_| panic!("a delivery that panics"));
                (true, deliver)
            }));
            q.committing = true;
        }
        let inner = store.inner.clone();
        let committer = tokio::task::spawn_blocking(move || inner.commit_queued()).await;
        assert!(committer.is_err());
        let obj = ns_obj("after");
        let written = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            store.write(move |txn| Ok(txn.put(ns, obj.clone()))),
        )
        .await;
        assert!(
            matches!(written, Ok(Ok(_))),
            "the write after an unwound committer hung or failed"
        );
        assert!(store.get(ns, "", "after").is_some());
    }
}
