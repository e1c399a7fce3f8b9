//! Watches that feed caches. Every cached copy drops `managedFields` (a large part of
//! each object, never read by a controller), and every watch restarts with kube's
//! default backoff, so a restarted API server is a pause, not an error.
//!
//! [`reflect`] is the plain form: a store and the event stream to drive. [`pending`]
//! is for a controller with several kinds: create every store first, so each kind's
//! subscribers can read the others' stores, then [`Pending::spawn`] them.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, PoisonError, RwLock};

use futures::{Stream, StreamExt};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Events of a watch as it feeds its store.
pub type Events<K> = futures::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// Watches `api` into a new store. Nothing moves until the returned stream is polled.
pub fn reflect<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, Events<K>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    (store, reflect_into(writer, api, config))
}

fn reflect_into<K>(writer: Writer<K>, api: Api<K>, config: watcher::Config) -> Events<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|o: &mut K| o.meta_mut().managed_fields = None);
    reflector::reflector(writer, stream).boxed()
}

/// Whether the store has listed at least once (without waiting).
pub fn is_ready<K>(store: &Store<K>) -> bool
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    futures::FutureExt::now_or_never(store.wait_until_ready()).is_some()
}

/// Called for every event after the store has applied it.
pub type Subscriber<K> = Box<dyn Fn(&watcher::Event<K>) + Send + Sync>;

/// A store whose writer is not yet driven.
pub struct Pending<K: Resource<DynamicType = ()> + Clone + 'static> {
    pub store: Store<K>,
    writer: Writer<K>,
}

pub fn pending<K>() -> Pending<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, writer) = reflector::store();
    Pending { store, writer }
}

impl<K> Pending<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// Watches `api` until `shutdown`, feeding the store and then each subscriber.
    pub fn spawn(
        self,
        api: Api<K>,
        subscribers: Vec<Subscriber<K>>,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        self.spawn_with(api, watcher::Config::default(), subscribers, shutdown)
    }

    /// As [`Pending::spawn`], watching only what `config` selects (a field selector, say).
    pub fn spawn_with(
        self,
        api: Api<K>,
        config: watcher::Config,
        subscribers: Vec<Subscriber<K>>,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        let events = reflect_into(self.writer, api, config);
        tokio::spawn(drive(events, subscribers, shutdown))
    }
}

/// Polls `events` until `shutdown` or its end, handing each to the subscribers.
pub async fn drive<K>(
    mut events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
    subscribers: Vec<Subscriber<K>>,
    shutdown: CancellationToken,
) where
    K: Resource<DynamicType = ()>,
{
    let kind = K::kind(&()).into_owned();
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            e = events.next() => e,
        };
        match event {
            None => return,
            Some(Ok(e)) => subscribers.iter().for_each(|s| s(&e)),
            Some(Err(e)) => tracing::debug!(kind, error = %e, "watch interrupted; retrying"),
        }
    }
}

/// The object an event carries that changed (not the bulk of a relist).
pub fn touched<K>(event: &watcher::Event<K>) -> Option<&K> {
    match event {
        watcher::Event::Apply(o) | watcher::Event::Delete(o) => Some(o),
        _ => None,
    }
}

/// Whether a (re)list just finished: objects may have vanished without a Delete event.
pub fn relisted<K>(event: &watcher::Event<K>) -> bool {
    matches!(event, watcher::Event::InitDone)
}

/// Objects of one kind grouped by a key (their namespace, their owners' uids), kept
/// beside a store: a controller finds an object's group without scanning every cached
/// object, which made reconciling n objects cost n² (10 000 proxies took minutes).
///
/// Feed it with [`Index::subscriber`] on the store's watch; it reads the store only to
/// rebuild after a relist.
pub struct Index<K: Resource<DynamicType = ()> + Clone + 'static> {
    store: Store<K>,
    keys: fn(&K) -> Vec<String>,
    inner: Arc<RwLock<Groups>>,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Clone for Index<K> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            keys: self.keys,
            inner: self.inner.clone(),
        }
    }
}

/// Namespace and name, ordered so a group lists deterministically.
type Key = (String, String);

#[derive(Default)]
struct Groups {
    members: HashMap<String, BTreeSet<Key>>,
    keys_of: HashMap<Key, Vec<String>>,
}

impl Groups {
    fn remove(&mut self, at: &Key) {
        for k in self.keys_of.remove(at).unwrap_or_default() {
            if let Some(set) = self.members.get_mut(&k) {
                set.remove(at);
                if set.is_empty() {
                    self.members.remove(&k);
                }
            }
        }
    }

    fn insert(&mut self, at: Key, keys: Vec<String>) {
        self.remove(&at);
        for k in &keys {
            self.members
                .entry(k.clone())
                .or_default()
                .insert(at.clone());
        }
        self.keys_of.insert(at, keys);
    }
}

fn key_of<K: Resource>(o: &K) -> Key {
    let m = o.meta();
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

/// An object's namespace, as an [`Index`] key.
pub fn by_namespace<K: Resource>(o: &K) -> Vec<String> {
    vec![o.meta().namespace.clone().unwrap_or_default()]
}

/// The uids of an object's owners, as [`Index`] keys.
pub fn by_owner<K: Resource>(o: &K) -> Vec<String> {
    o.meta()
        .owner_references
        .iter()
        .flatten()
        .map(|r| r.uid.clone())
        .collect()
}

impl<K> Index<K>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    pub fn new(store: Store<K>, keys: fn(&K) -> Vec<String>) -> Self {
        Self {
            store,
            keys,
            inner: Arc::default(),
        }
    }

    /// Keeps the index current; subscribe it before any subscriber that reads it.
    pub fn subscriber(&self) -> Subscriber<K> {
        let this = self.clone();
        Box::new(move |e| this.update(e))
    }

    fn update(&self, event: &watcher::Event<K>) {
        let mut g = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        match event {
            watcher::Event::Apply(o) => g.insert(key_of(o), (self.keys)(o)),
            watcher::Event::Delete(o) => g.remove(&key_of(o)),
            watcher::Event::InitDone => {
                *g = Groups::default();
                for o in self.store.state() {
                    g.insert(key_of(o.as_ref()), (self.keys)(&o));
                }
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
        }
    }

    /// The cached objects in group `key`, ordered by namespace and name.
    pub fn get(&self, key: &str) -> Vec<Arc<K>> {
        let g = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        g.members
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|(ns, name)| {
                let r = ObjectRef::new(name);
                self.store
                    .get(&if ns.is_empty() { r } else { r.within(ns) })
            })
            .collect()
    }

    pub fn store(&self) -> &Store<K> {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn cm(ns: &str, name: &str, owners: &[&str]) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.namespace = Some(ns.into());
        c.metadata.name = Some(name.into());
        c.metadata.owner_references = Some(
            owners
                .iter()
                .map(|uid| OwnerReference {
                    uid: (*uid).into(),
                    ..OwnerReference::default()
                })
                .collect(),
        );
        c
    }

    fn names(objs: Vec<Arc<ConfigMap>>) -> Vec<String> {
        objs.iter()
            .map(|o| o.metadata.name.clone().unwrap())
            .collect()
    }

    #[test]
    fn groups_follow_applies_deletes_and_relists() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let by_ns = Index::new(store.clone(), by_namespace);
        let by_owner = Index::new(store, by_owner);
        let mut feed = |e: watcher::Event<ConfigMap>| {
            writer.apply_watcher_event(&e);
            by_ns.update(&e);
            by_owner.update(&e);
        };
        feed(watcher::Event::Init);
        feed(watcher::Event::InitApply(cm("a", "x", &["u1"])));
        feed(watcher::Event::InitApply(cm("b", "y", &["u1", "u2"])));
        feed(watcher::Event::InitDone);
        assert_eq!(names(by_ns.get("a")), ["x"]);
        assert_eq!(names(by_owner.get("u1")), ["x", "y"]);

        // An object that changes owner leaves its old group.
        feed(watcher::Event::Apply(cm("a", "x", &["u2"])));
        feed(watcher::Event::Apply(cm("a", "z", &[])));
        assert_eq!(names(by_owner.get("u1")), ["y"]);
        assert_eq!(names(by_owner.get("u2")), ["x", "y"]);
        assert_eq!(names(by_ns.get("a")), ["x", "z"]);

        feed(watcher::Event::Delete(cm("b", "y", &["u1", "u2"])));
        assert!(by_owner.get("u1").is_empty());
        assert!(by_ns.get("b").is_empty());

        // A relist drops what vanished meanwhile.
        feed(watcher::Event::Init);
        feed(watcher::Event::InitApply(cm("c", "w", &["u3"])));
        feed(watcher::Event::InitDone);
        assert!(by_ns.get("a").is_empty());
        assert_eq!(names(by_owner.get("u3")), ["w"]);
    }
}
