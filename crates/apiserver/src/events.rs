//! Events, served as Kubernetes serves them: one record under two APIs. kube-rs's
//! `Recorder` writes `events.k8s.io/v1`; `kubectl describe` and `kubectl get events` read
//! `core/v1`. Every write to either is mirrored, converted, to the other in the same
//! transaction, so both lists and both watches agree. Events are bounded per namespace
//! (the oldest make room) and expire an hour (by default) after they were last seen.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::registry::{Res, registry};
use crate::store::{Store, Txn};
use crate::write::name_of;

/// Events kept per namespace and API; a new one past it removes the oldest.
pub const MAX_PER_NAMESPACE: usize = 1000;

/// Events kept per object they are about; a new one past it removes that object's oldest.
/// So a writer that may only report on its own object (a device) fills at most this much
/// of its namespace, and evicts only what is about that object.
pub const MAX_PER_OBJECT: usize = 100;

/// How long an event lives after it was last seen, as kube-apiserver's `--event-ttl`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

const CORE: &str = "events";
const EVENTS: &str = "events.events.k8s.io";

/// Whether `res` is one of the two Event kinds.
pub fn is_event(res: Res) -> bool {
    res.kind == "Event"
}

/// The other API's Event kind.
fn other(res: Res) -> Option<Res> {
    let key = if res.group.is_empty() { EVENTS } else { CORE };
    registry().by_key(key)
}

fn copy(from: &Value, to: &mut Map<String, Value>, pairs: &[(&str, &str)]) {
    for (a, b) in pairs {
        if let Some(v) = from.get(*a).filter(|v| !v.is_null()) {
            to.insert((*b).to_owned(), v.clone());
        }
    }
}

/// A microsecond time (`…:05.123456Z`) as a second-precision one (`…:05Z`).
fn seconds(t: &Value) -> Option<Value> {
    let s = t.as_str()?;
    Some(Value::String(match s.split_once('.') {
        Some((head, _)) => format!("{head}Z"),
        None => s.to_owned(),
    }))
}

/// The metadata a mirror carries: the original's, without what the store stamps.
fn meta(v: &Value) -> Value {
    let mut m = v.get("metadata").cloned().unwrap_or_else(|| json!({}));
    if let Some(m) = m.as_object_mut() {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    m
}

/// events.k8s.io/v1 → core/v1, field for field as Kubernetes converts.
pub fn to_core(ev: &Value) -> Value {
    let mut out = Map::new();
    out.insert("apiVersion".into(), json!("v1"));
    out.insert("kind".into(), json!("Event"));
    out.insert("metadata".into(), meta(ev));
    out.insert("involvedObject".into(), json!({}));
    copy(
        ev,
        &mut out,
        &[
            ("regarding", "involvedObject"),
            ("related", "related"),
            ("note", "message"),
            ("reason", "reason"),
            ("type", "type"),
            ("action", "action"),
            ("eventTime", "eventTime"),
            ("series", "series"),
            ("reportingController", "reportingComponent"),
            ("reportingInstance", "reportingInstance"),
            ("deprecatedSource", "source"),
            ("deprecatedFirstTimestamp", "firstTimestamp"),
            ("deprecatedLastTimestamp", "lastTimestamp"),
            ("deprecatedCount", "count"),
        ],
    );
    // kubectl's columns (LAST SEEN, AGE) read the legacy times and count.
    let first = ev.get("eventTime").and_then(seconds);
    let last = ev
        .pointer("/series/lastObservedTime")
        .and_then(seconds)
        .or_else(|| first.clone());
    for (field, v) in [("firstTimestamp", first), ("lastTimestamp", last)] {
        if let Some(v) = v {
            out.entry(field).or_insert(v);
        }
    }
    let count = ev.pointer("/series/count").cloned().unwrap_or(json!(1));
    out.entry("count").or_insert(count);
    if let Some(c) = ev.get("reportingController").cloned() {
        out.entry("source")
            .or_insert_with(|| json!({"component": c}));
    }
    Value::Object(out)
}

/// core/v1 → events.k8s.io/v1.
pub fn to_events(ev: &Value) -> Value {
    let mut out = Map::new();
    out.insert("apiVersion".into(), json!("events.k8s.io/v1"));
    out.insert("kind".into(), json!("Event"));
    out.insert("metadata".into(), meta(ev));
    copy(
        ev,
        &mut out,
        &[
            ("involvedObject", "regarding"),
            ("related", "related"),
            ("message", "note"),
            ("reason", "reason"),
            ("type", "type"),
            ("action", "action"),
            ("eventTime", "eventTime"),
            ("series", "series"),
            ("reportingComponent", "reportingController"),
            ("reportingInstance", "reportingInstance"),
            ("source", "deprecatedSource"),
            ("firstTimestamp", "deprecatedFirstTimestamp"),
            ("lastTimestamp", "deprecatedLastTimestamp"),
            ("count", "deprecatedCount"),
        ],
    );
    if !out.contains_key("reportingController")
        && let Some(c) = ev.pointer("/source/component").cloned()
    {
        out.insert("reportingController".into(), c);
    }
    Value::Object(out)
}

/// Writes the other API's copy of `object` (an Event just stored as `res`).
pub fn mirror(txn: &mut Txn<'_>, res: Res, object: &Value) {
    let Some(other) = other(res) else { return };
    let copy = if res.group.is_empty() {
        to_events(object)
    } else {
        to_core(object)
    };
    txn.put(other, copy);
}

/// Removes the other API's copy of a removed Event.
pub fn unmirror(txn: &mut Txn<'_>, res: Res, ns: &str, name: &str) {
    if let Some(other) = other(res) {
        txn.remove(other, ns, name);
    }
}

/// When the event was last seen: its series' last observation, its time, or its creation.
fn last_seen(ev: &Value) -> Option<Timestamp> {
    [
        "/series/lastObservedTime",
        "/lastTimestamp",
        "/deprecatedLastTimestamp",
        "/eventTime",
        "/metadata/creationTimestamp",
    ]
    .iter()
    .filter_map(|p| ev.pointer(p)?.as_str()?.parse::<Timestamp>().ok())
    .max()
}

/// What an event is about, in either API: (kind, name).
fn about(ev: &Value) -> (String, String) {
    let r = ev.get("regarding").or_else(|| ev.get("involvedObject"));
    let s = |k: &str| {
        r.and_then(|r| r.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    (s("kind"), s("name"))
}

/// Before `new`, a new Event in `ns`: removes the oldest (in both APIs) about the same
/// object until there is room under [`MAX_PER_OBJECT`], then the oldest of the namespace
/// under [`MAX_PER_NAMESPACE`].
pub fn make_room(txn: &mut Txn<'_>, res: Res, ns: &str, new: &Value) {
    let object = about(new);
    make_room_within(txn, res, ns, MAX_PER_OBJECT, |e| about(e) == object);
    make_room_within(txn, res, ns, MAX_PER_NAMESPACE, |_| true);
}

fn make_room_within(
    txn: &mut Txn<'_>,
    res: Res,
    ns: &str,
    max: usize,
    counts: impl Fn(&Value) -> bool,
) {
    let mut all: Vec<Arc<Value>> = txn
        .list(res, Some(ns))
        .into_iter()
        .filter(|e| counts(e))
        .collect();
    if all.len() < max {
        return;
    }
    all.sort_by_key(|e| last_seen(e));
    let excess = all.len() + 1 - max;
    for ev in all.iter().take(excess) {
        let name = name_of(ev).to_owned();
        txn.remove(res, ns, &name);
        unmirror(txn, res, ns, &name);
    }
}

/// Removes every Event last seen more than `ttl` ago, in both APIs.
///
/// # Errors
/// A storage failure.
pub async fn expire(store: &Store, ttl: Duration, now: Timestamp) -> Result<usize, ApiError> {
    let Ok(ttl) = k8s_openapi::jiff::SignedDuration::try_from(ttl) else {
        return Ok(0);
    };
    let cutoff = now - ttl;
    let mut total = 0;
    // As many as fit in one write, then again (one commit on etcd holds so much).
    loop {
        let (removed, more) = store.write(move |txn| expire_some(txn, cutoff)).await?;
        total += removed;
        if !more {
            return Ok(total);
        }
    }
}

/// Removes Events last seen before `cutoff`, as many as fit in this write; says how many
/// and whether some are left.
fn expire_some(txn: &mut Txn<'_>, cutoff: Timestamp) -> Result<(usize, bool), ApiError> {
    let mut removed = 0;
    for key in [EVENTS, CORE] {
        let Some(res) = registry().by_key(key) else {
            continue;
        };
        for ev in txn.list(res, None) {
            if last_seen(&ev).is_some_and(|t| t < cutoff) {
                if !txn.fits(&ev) {
                    return Ok((removed, true));
                }
                let ns = ev
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let name = name_of(&ev).to_owned();
                if txn.remove(res, &ns, &name).is_some() {
                    removed += 1;
                }
                unmirror(txn, res, &ns, &name);
            }
        }
    }
    Ok((removed, false))
}

/// Expires events until `stop`, checking a few times per `ttl` (at most once a minute).
pub async fn expire_until(store: Store, ttl: Duration, stop: tokio_util::sync::CancellationToken) {
    let period = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        match expire(&store, ttl, Timestamp::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "expired events"),
            Err(e) => tracing::warn!(error = %e, "expiring events"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_make_room_in_both_apis() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), 100).unwrap();
        let res = registry().by_key(EVENTS).unwrap();
        let core = registry().by_key(CORE).unwrap();
        store
            .write(move |txn| {
                for i in 0..5 {
                    let ev = json!({
                        "apiVersion": "events.k8s.io/v1", "kind": "Event",
                        "metadata": {"name": format!("e{i}"), "namespace": "default"},
                        "eventTime": format!("2026-12-02T12:00:0{i}.000000Z"),
                        "reason": "R", "note": "n",
                    });
                    let stored = txn.put(res, ev);
                    mirror(txn, res, &stored);
                }
                make_room_within(txn, res, "default", 3, |_| true);
                Ok(())
            })
            .await
            .unwrap();
        let names = |r| {
            store
                .list(r, Some("default"))
                .1
                .iter()
                .map(|e| name_of(e).to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(res), ["e3", "e4"]);
        assert_eq!(names(core), ["e3", "e4"]);
        let now: Timestamp = "2026-12-02T12:00:04.500000Z".parse().unwrap();
        assert_eq!(
            expire(&store, Duration::from_secs(1), now).await.unwrap(),
            1
        );
        assert_eq!(names(res), ["e4"]);
        assert_eq!(names(core), ["e4"]);
    }

    #[test]
    fn both_apis_say_the_same() {
        let ev = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "p.1", "namespace": "default", "resourceVersion": "7"},
            "regarding": {"kind": "HTTPProxy", "name": "p", "namespace": "default"},
            "note": "refused", "reason": "Refused", "type": "Warning", "action": "Reconcile",
            "eventTime": "2026-12-02T12:00:05.123456Z",
            "reportingController": "portway-operator", "reportingInstance": "host",
            "series": {"count": 3, "lastObservedTime": "2026-12-02T12:10:00.000001Z"},
        });
        let core = to_core(&ev);
        assert_eq!(core["involvedObject"]["name"], "p");
        assert_eq!(core["message"], "refused");
        assert_eq!(core["reportingComponent"], "portway-operator");
        assert_eq!(core["source"]["component"], "portway-operator");
        assert_eq!(core["firstTimestamp"], "2026-12-02T12:00:05Z");
        assert_eq!(core["lastTimestamp"], "2026-12-02T12:10:00Z");
        assert_eq!(core["count"], 3);
        assert!(core["metadata"].get("resourceVersion").is_none());
        let back = to_events(&core);
        for field in [
            "regarding",
            "note",
            "reason",
            "type",
            "action",
            "eventTime",
            "series",
            "reportingController",
        ] {
            assert_eq!(back[field], ev[field], "{field}");
        }
        assert_eq!(
            last_seen(&ev).unwrap().to_string(),
            "2026-12-02T12:10:00.000001Z"
        );
    }
}
