//! One watch per kind, shared by every controller: a reflector store, plus subscribers
//! that turn each event (deletions included) into reconcile requests.

use std::fmt::Debug;

use futures::StreamExt;
use kube::Api;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Called for every event after the store has applied it.
pub type Subscriber<K> = Box<dyn Fn(&watcher::Event<K>) + Send + Sync>;

/// A store whose writer is not yet driven: create all stores first, so subscribers can
/// read each other's stores, then [`Pending::spawn`] them.
pub struct Pending<K: kube::Resource<DynamicType = ()> + Clone + 'static> {
    pub store: Store<K>,
    writer: Writer<K>,
}

pub fn pending<K>() -> Pending<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, writer) = reflector::store();
    Pending { store, writer }
}

impl<K> Pending<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// Watches `api` until `shutdown`, feeding the store and the subscribers.
    pub fn spawn(
        self,
        api: Api<K>,
        subscribers: Vec<Subscriber<K>>,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        let kind = K::kind(&()).into_owned();
        // managedFields are a large part of every object and never read here.
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|o: &mut K| o.meta_mut().managed_fields = None);
        let mut events = reflector::reflector(self.writer, stream).boxed();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => return,
                    e = events.next() => e,
                };
                match event {
                    None => return,
                    Some(Ok(e)) => subscribers.iter().for_each(|s| s(&e)),
                    Some(Err(e)) => {
                        tracing::debug!(kind, error = %e, "watch interrupted; retrying")
                    }
                }
            }
        })
    }
}

/// The objects an event carries that changed (not the bulk of a relist).
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
