//! get and list, with tables, paging and continue tokens.

use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::StatusCode;
use serde_json::{Value, json};

use super::{Target, json_response};
use crate::app::{App, Query, selectors};
use crate::error::{ApiError, Result};
use crate::registry::Res;
use crate::store::ObjKey;
use crate::table::{self, Include};
use crate::watch;

pub(super) fn get(app: &App, t: &Target, accept: &str, q: &Query) -> Result<Response> {
    let name = t.name.as_deref().unwrap_or_default();
    let obj = app
        .store
        .get(t.res, t.ns.as_deref().unwrap_or_default(), name)
        .ok_or_else(|| ApiError::not_found(t.res, name))?;
    if table::wants_table(accept) {
        let rv = obj["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let include = Include::parse(q.get("includeObject").map(String::as_str));
        return Ok(json_response(
            StatusCode::OK,
            &table::table(t.res, &[obj.as_ref()], &rv, None, include, true),
        ));
    }
    Ok(json_response(StatusCode::OK, &obj))
}

pub(super) async fn list(app: &App, t: &Target, accept: &str, q: &Query) -> Result<Response> {
    if let Some(rv) = min_resource_version(q) {
        watch::wait_for_revision(&app.store, rv).await?;
    }
    let (label, field) = selectors(q, t.res)?;
    let limit: usize = match q.get("limit") {
        None => 0,
        Some(l) => l
            .parse()
            .map_err(|_| ApiError::bad_request(format!("limit must be a number, got {l:?}")))?,
    };
    let token = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => Some(decode_continue(c)?),
        None => None,
    };
    if let Some((first_rv, _)) = &token {
        // The first page may have come from another replica, further on.
        watch::wait_for_revision(&app.store, *first_rv).await?;
    }
    let (rv, mut objects) = app.store.list(t.res, t.ns.as_deref());
    // Later pages are read at the first page's revision (and report it, so a watch
    // started from the list replays anything that changed while the pages were read).
    let (list_rv, after) = match token {
        Some((first_rv, key)) => {
            objects = as_of(&app.store, t, objects, first_rv).ok_or_else(|| {
                ApiError::gone(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                )
            })?;
            (first_rv, Some(key))
        }
        None => (rv, None),
    };
    let mut matching = objects
        .iter()
        .filter(|o| after.as_ref().is_none_or(|k| ObjKey::of(o) > *k))
        .filter(|o| label.matches(o) && field.matches(o));
    let mut items: Vec<&Value> = Vec::new();
    let mut cont = None;
    for o in matching.by_ref() {
        if limit > 0 && items.len() == limit {
            let last = items
                .last()
                .map(|v| ObjKey::of(v))
                .unwrap_or_else(|| ObjKey::of(o));
            cont = Some(encode_continue(list_rv, &last));
            break;
        }
        items.push(o);
    }
    let list_rv = list_rv.to_string();
    if table::wants_table(accept) {
        let include = Include::parse(q.get("includeObject").map(String::as_str));
        return Ok(json_response(
            StatusCode::OK,
            &table::table(t.res, &items, &list_rv, cont.as_deref(), include, true),
        ));
    }
    Ok(json_response(
        StatusCode::OK,
        &list_object(t.res, &items, &list_rv, cont.as_deref()),
    ))
}

/// The objects of `t`'s kind and namespace as they were at revision `rv`, from `now`
/// (the current ones, in key order) and the changes since: `None` when the history no
/// longer reaches `rv`, or does not say what a changed object was before.
fn as_of(
    store: &crate::store::Store,
    t: &Target,
    now: Vec<std::sync::Arc<Value>>,
    rv: u64,
) -> Option<Vec<std::sync::Arc<Value>>> {
    use std::collections::BTreeMap;
    let events = store.events_after(rv).ok()?;
    let mut then: BTreeMap<ObjKey, Option<std::sync::Arc<Value>>> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.res.id == t.res.id && t.ns.as_deref().is_none_or(|ns| e.key.ns == ns))
    {
        if then.contains_key(&e.key) {
            continue;
        }
        // Its first change since `rv` says what it was then.
        let was = match e.type_ {
            crate::store::EventType::Added => None,
            _ => Some(e.old.clone()?),
        };
        then.insert(e.key.clone(), was);
    }
    if then.is_empty() {
        return Some(now);
    }
    let mut objects: BTreeMap<ObjKey, std::sync::Arc<Value>> =
        now.into_iter().map(|o| (ObjKey::of(&o), o)).collect();
    for (key, was) in then {
        match was {
            Some(o) => objects.insert(key, o),
            None => objects.remove(&key),
        };
    }
    Some(objects.into_values().collect())
}

pub(super) fn list_object(res: Res, items: &[&Value], rv: &str, cont: Option<&str>) -> Value {
    let mut list = json!({
        "kind": format!("{}List", res.kind),
        "apiVersion": res.api_version(),
        "metadata": {"resourceVersion": rv},
        "items": items,
    });
    if let Some(c) = cont {
        list["metadata"]["continue"] = json!(c);
    }
    list
}

/// A continue token: the revision of the first page and the last key returned.
fn encode_continue(rv: u64, key: &ObjKey) -> String {
    URL_SAFE_NO_PAD.encode(json!({"rv": rv, "ns": key.ns, "name": key.name}).to_string())
}

fn decode_continue(token: &str) -> Result<(u64, ObjKey)> {
    let bad = || ApiError::bad_request("continue token is not valid");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    Ok((
        v["rv"].as_u64().ok_or_else(bad)?,
        ObjKey::new(
            v["ns"].as_str().ok_or_else(bad)?,
            v["name"].as_str().ok_or_else(bad)?,
        ),
    ))
}

/// The revision a list must be at least as new as: `resourceVersion` when it is not `0`
/// and `resourceVersionMatch` is unset or `NotOlderThan` (the first page only).
fn min_resource_version(q: &Query) -> Option<u64> {
    let matching = q.get("resourceVersionMatch").map(String::as_str);
    let paging = q.get("continue").is_some_and(|c| !c.is_empty());
    if !matches!(matching, None | Some("" | "NotOlderThan")) || paging {
        return None;
    }
    q.get("resourceVersion")?.parse().ok().filter(|&rv| rv > 0)
}
