//! Watch streams: newline-delimited events from the store's event log, filtered per
//! request, with bookmarks and an in-stream `410 Expired` when history is gone.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use http::{StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::app::{App, Query, flag, selectors};
use crate::error::{ApiError, Result};
use crate::registry::Res;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Event, EventType, Store};
use crate::table::{self, Include};

/// Without `timeoutSeconds`, a watch stays open this long (kubectl exits when it ends).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const BOOKMARK_EVERY: Duration = Duration::from_secs(30);
/// How long a request for a future `resourceVersion` waits for the store to reach it, as
/// Kubernetes' watch cache does.
const CATCH_UP_WAIT: Duration = Duration::from_secs(3);

/// Waits up to [`CATCH_UP_WAIT`] for the store to reach revision `rv`.
///
/// # Errors
/// 504 `Timeout` with cause `ResourceVersionTooLarge` when it does not.
pub(crate) async fn wait_for_revision(store: &Store, rv: u64) -> Result<()> {
    let mut changed = store.subscribe();
    let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
    loop {
        let current = store.revision();
        if current >= rv {
            return Ok(());
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() {
                return Err(ApiError::too_large_resource_version(rv, current));
            },
            () = tokio::time::sleep_until(deadline) => {
                return Err(ApiError::too_large_resource_version(rv, store.revision()));
            }
        }
    }
}

struct Filter {
    res: Res,
    ns: Option<String>,
    label: LabelSelector,
    field: FieldSelector,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.ns
            .as_deref()
            .is_none_or(|ns| obj["metadata"]["namespace"] == ns)
            && self.label.matches(obj)
            && self.field.matches(obj)
    }

    /// What a watcher with this filter sees of an event: objects entering the selection are
    /// ADDED, objects leaving it are DELETED.
    fn translate<'e>(&self, e: &'e Event) -> Option<(EventType, &'e Value)> {
        if e.res.id != self.res.id || self.ns.as_deref().is_some_and(|ns| e.key.ns != ns) {
            return None;
        }
        if self.field.name().is_some_and(|n| n != e.key.name) {
            return None;
        }
        let now = self.matches(&e.object);
        let before = e.old.as_deref().map(|o| self.matches(o));
        let t = match (e.type_, before, now) {
            (EventType::Added, _, true) => EventType::Added,
            (EventType::Added, _, false) => return None,
            (EventType::Modified, Some(false), true) => EventType::Added,
            (EventType::Modified, _, true) => EventType::Modified,
            (EventType::Modified, Some(false), false) => return None,
            (EventType::Modified, _, false) => EventType::Deleted,
            (EventType::Deleted, before, now) if before.unwrap_or(false) || now => {
                EventType::Deleted
            }
            (EventType::Deleted, ..) => return None,
        };
        Some((t, &e.object))
    }
}

struct Encoder {
    res: Res,
    table: bool,
    columns_sent: bool,
}

impl Encoder {
    fn event(&mut self, type_: &str, object: &Value) -> Bytes {
        let object = if self.table && type_ != "BOOKMARK" && type_ != "ERROR" {
            let rv = object["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default();
            let t = table::table(
                self.res,
                &[object],
                rv,
                None,
                Include::Metadata,
                !self.columns_sent,
            );
            self.columns_sent = true;
            t
        } else {
            object.clone()
        };
        let mut line =
            serde_json::to_vec(&json!({"type": type_, "object": object})).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    }

    fn bookmark(&mut self, rv: u64, initial_end: bool) -> Bytes {
        let mut object = json!({
            "kind": self.res.kind, "apiVersion": self.res.api_version(),
            "metadata": {"resourceVersion": rv.to_string()},
        });
        if initial_end {
            object["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        self.event("BOOKMARK", &object)
    }
}

/// Starts a watch response.
///
/// # Errors
/// 400 for bad selectors or parameters (before the stream starts).
pub fn serve(
    app: &Arc<App>,
    res: Res,
    ns: Option<String>,
    q: &Query,
    table: bool,
) -> Result<Response> {
    let (label, field) = selectors(q, res)?;
    let filter = Filter {
        res,
        ns: ns.clone(),
        label,
        field,
    };
    let bookmarks = flag(q, "allowWatchBookmarks");
    let send_initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let timeout = match q.get("timeoutSeconds") {
        None => DEFAULT_TIMEOUT,
        Some(s) => Duration::from_secs(s.parse().map_err(|_| {
            ApiError::bad_request(format!("timeoutSeconds must be a number, got {s:?}"))
        })?),
    };
    let from = match q.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(_) if send_initial => None,
        Some(s) => Some(s.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("resourceVersion must be a number, got {s:?}"))
        })?),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let store = app.store.clone();
    let shutdown = app.shutdown.clone();
    let mut enc = Encoder {
        res,
        table,
        columns_sent: false,
    };
    let (start, initial) = match from {
        Some(rv) => (rv, Vec::new()),
        None => {
            let (rv, objects) = store.list(res, ns.as_deref());
            (
                rv,
                objects.into_iter().filter(|o| filter.matches(o)).collect(),
            )
        }
    };
    let initial_end = bookmarks && send_initial;
    tokio::spawn(async move {
        // A watch from a revision not reached yet starts once it is, or ends with an error.
        if from.is_some_and(|rv| rv > store.revision())
            && let Err(e) = wait_for_revision(&store, start).await
        {
            let _ = tx.send(enc.event("ERROR", &e.to_status())).await;
            return;
        }
        for o in initial {
            if tx.send(enc.event("ADDED", &o)).await.is_err() {
                return;
            }
        }
        if initial_end && tx.send(enc.bookmark(start, true)).await.is_err() {
            return;
        }
        stream(store, filter, enc, start, bookmarks, timeout, tx, shutdown).await;
    });
    let body = Body::from_stream(ReceiverStream::new(rx).map(Ok::<_, Infallible>));
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

#[allow(clippy::too_many_arguments)]
async fn stream(
    store: Store,
    filter: Filter,
    mut enc: Encoder,
    mut last: u64,
    bookmarks: bool,
    timeout: Duration,
    tx: mpsc::Sender<Bytes>,
    shutdown: CancellationToken,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut changed = store.subscribe();
    let mut next_bookmark = tokio::time::Instant::now() + BOOKMARK_EVERY;
    loop {
        changed.borrow_and_update();
        match store.events_after(last) {
            Err(floor) => {
                let status = ApiError::gone(format!("too old resource version: {last} ({floor})"))
                    .to_status();
                let _ = tx.send(enc.event("ERROR", &status)).await;
                return;
            }
            Ok(events) => {
                for e in events {
                    last = e.rv;
                    if let Some((t, obj)) = filter.translate(&e)
                        && tx.send(enc.event(t.as_str(), obj)).await.is_err()
                    {
                        return;
                    }
                }
            }
        }
        if bookmarks && tokio::time::Instant::now() >= next_bookmark {
            if tx.send(enc.bookmark(last, false)).await.is_err() {
                return;
            }
            next_bookmark = tokio::time::Instant::now() + BOOKMARK_EVERY;
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            () = tokio::time::sleep_until(next_bookmark) => {}
            () = tokio::time::sleep_until(deadline) => return,
            () = tx.closed() => return,
            () = shutdown.cancelled() => return,
        }
    }
}
