//! Running several parts of one process as one: if any part ends on its own (it returned
//! or panicked), that is a failure of the whole, and everything stops.
//!
//! Parts live in a [`JoinSet`], so dropping the [`Supervisor`] aborts whatever still
//! runs: an early return or a `?` never leaves a part behind. [`Supervisor::shutdown`]
//! stops them in the reverse order of [`Supervisor::spawn`] (the edge before the API
//! server it reads from), each given `grace` to finish before it is aborted.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

/// How a part ended on its own.
#[derive(Debug, PartialEq, Eq)]
pub struct Died {
    pub part: &'static str,
    /// The panic message, when it panicked; `None` when it returned.
    pub panic: Option<String>,
}

impl std::fmt::Display for Died {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.panic {
            Some(p) => write!(f, "{} panicked: {p}", self.part),
            None => write!(f, "{} stopped on its own", self.part),
        }
    }
}

impl std::error::Error for Died {}

#[derive(Default)]
pub struct Supervisor {
    set: JoinSet<()>,
    names: HashMap<Id, &'static str>,
    /// In start order; stopped in reverse.
    stops: Vec<(&'static str, CancellationToken)>,
    /// Parts that have ended, so stopping them waits for nothing.
    ended: Vec<&'static str>,
}

impl Supervisor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `part` until it ends; cancelling `stop` is how it is asked to end.
    pub fn spawn<F>(&mut self, name: &'static str, stop: CancellationToken, part: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // Aborted (the supervisor dropped) counts as asked to stop: the part's own tasks,
        // which an abort does not reach, wind down too.
        let guard = stop.clone().drop_guard();
        let handle = self.set.spawn(async move {
            let _guard = guard;
            part.await;
        });
        self.names.insert(handle.id(), name);
        self.stops.push((name, stop));
    }

    /// Waits for the first part to end on its own. Pending forever when there is none.
    pub async fn died(&mut self) -> Died {
        let died = match self.set.join_next_with_id().await {
            Some(Ok((id, ()))) => Died {
                part: self.name(id),
                panic: None,
            },
            Some(Err(e)) => Died {
                part: self.name(e.id()),
                panic: Some(panic_message(e)),
            },
            None => std::future::pending().await,
        };
        self.ended.push(died.part);
        died
    }

    fn name(&self, id: Id) -> &'static str {
        self.names.get(&id).copied().unwrap_or("a part")
    }

    /// Stops every part, last started first, each within `grace`; a part still running
    /// then is aborted. Returns the parts that had to be aborted.
    pub async fn shutdown(mut self, grace: Duration) -> Vec<&'static str> {
        let mut ended = std::mem::take(&mut self.ended);
        let mut aborted = Vec::new();
        for (name, stop) in std::mem::take(&mut self.stops).into_iter().rev() {
            stop.cancel();
            let deadline = tokio::time::Instant::now() + grace;
            while !ended.contains(&name) {
                match tokio::time::timeout_at(deadline, self.set.join_next_with_id()).await {
                    Ok(Some(Ok((id, ())))) => ended.push(self.name(id)),
                    Ok(Some(Err(e))) => {
                        let part = self.name(e.id());
                        if e.is_panic() {
                            tracing::error!(
                                part,
                                panic = panic_message(e),
                                "part panicked while stopping"
                            );
                        }
                        ended.push(part);
                    }
                    Ok(None) => return aborted,
                    Err(_) => {
                        tracing::warn!(part = name, ?grace, "did not stop in time; aborting it");
                        aborted.push(name);
                        break;
                    }
                }
            }
        }
        self.set.shutdown().await;
        aborted
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return "cancelled".into();
    }
    let p = e.into_panic();
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A part that records when it stops, and stops when asked.
    fn obedient(
        sup: &mut Supervisor,
        name: &'static str,
        log: &Arc<Mutex<Vec<&'static str>>>,
    ) -> CancellationToken {
        let stop = CancellationToken::new();
        let (s, log) = (stop.clone(), log.clone());
        sup.spawn(name, stop.clone(), async move {
            s.cancelled().await;
            log.lock().unwrap().push(name);
        });
        stop
    }

    #[tokio::test]
    async fn a_part_that_returns_or_panics_is_reported_by_name() {
        let log = Arc::new(Mutex::new(vec![]));
        let mut sup = Supervisor::new();
        obedient(&mut sup, "apiserver", &log);
        sup.spawn("relay", CancellationToken::new(), async {});
        assert_eq!(
            sup.died().await,
            Died {
                part: "relay",
                panic: None
            }
        );
        sup.spawn("dns", CancellationToken::new(), async {
            panic!("port taken");
        });
        let died = sup.died().await;
        assert_eq!(died.part, "dns");
        assert_eq!(died.panic.as_deref(), Some("port taken"));
        assert!(sup.shutdown(Duration::from_secs(5)).await.is_empty());
        assert_eq!(*log.lock().unwrap(), ["apiserver"]);
    }

    #[tokio::test]
    async fn shutdown_stops_in_reverse_order_and_aborts_the_stubborn() {
        let log = Arc::new(Mutex::new(vec![]));
        let mut sup = Supervisor::new();
        obedient(&mut sup, "apiserver", &log);
        obedient(&mut sup, "operator", &log);
        sup.spawn(
            "stubborn",
            CancellationToken::new(),
            std::future::pending::<()>(),
        );
        obedient(&mut sup, "edge", &log);
        let aborted = sup.shutdown(Duration::from_millis(50)).await;
        assert_eq!(aborted, ["stubborn"]);
        assert_eq!(*log.lock().unwrap(), ["edge", "operator", "apiserver"]);
    }

    #[tokio::test]
    async fn dropping_the_supervisor_aborts_every_part() {
        let mut sup = Supervisor::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        sup.spawn("holder", CancellationToken::new(), async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        drop(sup);
        assert!(
            rx.await.is_err(),
            "the part was aborted, dropping its sender"
        );
    }
}
