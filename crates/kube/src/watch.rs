//! Watches that feed caches. Every cached copy drops `managedFields` (a large part of
//! each object, never read by a controller), and every watch restarts with kube's
//! default backoff, so a restarted API server is a pause, not an error.
//!
//! [`reflect`] is the plain form: a store and the event stream to drive. [`pending`]
//! is for a controller with several kinds: create every store first, so each kind's
//! subscribers can read the others' stores, then [`Pending::spawn`] them.

use std::fmt::Debug;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::{self, Store, store::Writer};
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
        let events = reflect_into(self.writer, api, watcher::Config::default());
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
