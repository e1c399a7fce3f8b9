//! The write path inside a transaction: admission (system metadata, status rules,
//! decoding, validation, generation, field ownership) and deletion with finalizers,
//! owner-reference cascades and namespace teardown.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use crate::apply::{self, Managed, Scope, Writer};
use crate::error::{ApiError, Result};
use crate::events;
use crate::registry::{Res, registry};
use crate::store::Txn;

/// How unknown fields are treated (`fieldValidation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    /// Reject (the default here: a typo should not vanish silently).
    Strict,
    /// Drop them.
    Ignore,
}

impl FieldValidation {
    /// # Errors
    /// 400 for a value other than Strict, Warn or Ignore.
    pub fn parse(s: Option<&str>) -> Result<Self> {
        match s {
            None | Some("" | "Strict") => Ok(Self::Strict),
            Some("Warn" | "Ignore") => Ok(Self::Ignore),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation must be Strict, Warn or Ignore, got {other:?}"
            ))),
        }
    }
}

/// Everything about a write that does not depend on the stored state.
#[derive(Clone)]
pub struct WriteCtx {
    pub res: Res,
    /// The namespace from the URL (empty for cluster-scoped kinds).
    pub ns: String,
    pub manager: String,
    pub validation: FieldValidation,
    pub dry_run: bool,
    pub now: String,
    /// Who writes, as far as object-level rules go (see `devices::check_write`); `None`
    /// for the server's own writes.
    pub guard: Option<Guard>,
}

/// Checks one write given the stored and the resulting object (`None` when deleting).
/// It reads through the write's own transaction (who a connector is bound to).
pub type Guard =
    Arc<dyn Fn(&Txn<'_>, Res, &str, Option<&Value>, Option<&Value>) -> Result<()> + Send + Sync>;

fn guard(txn: &Txn<'_>, ctx: &WriteCtx, old: Option<&Value>, new: Option<&Value>) -> Result<()> {
    match &ctx.guard {
        Some(g) => g(txn, ctx.res, &ctx.ns, old, new),
        None => Ok(()),
    }
}

pub fn now() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A random UUID (version 4).
pub fn new_uid() -> String {
    uuid(rand::random(), 4)
}

/// A UUID of RFC 9562 `version` (variant 1) from 16 bytes.
pub fn uuid(mut b: [u8; 16], version: u8) -> String {
    b[6] = (b[6] & 0x0f) | (version << 4);
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

pub fn name_of(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or_default()
}

fn is_deleting(v: &Value) -> bool {
    v["metadata"]["deletionTimestamp"].is_string()
}

fn finalizers(v: &Value) -> Vec<String> {
    v["metadata"]["finalizers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str().map(str::to_owned))
        .collect()
}

/// Removes every object member whose value is `null`, at any depth: as kube-apiserver
/// does (built-in kinds decode a null as the zero value; custom resources prune nulls of
/// fields that are not `nullable`), a JSON `null` is an absent field. Clients such as
/// Datum's agent send `"status": null` or `"filters": null` for what they leave unset.
fn drop_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, v| !v.is_null());
            m.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// Checks `apiVersion`/`kind` against the URL's kind, filling them when absent.
///
/// # Errors
/// 400 when the body is not an object or names another kind.
pub fn check_type(res: Res, body: &mut Value) -> Result<()> {
    check_type_meta(&res.api_version(), res.kind, body)
}

/// [`check_type`] for a kind given by `api_version` and `kind`.
///
/// # Errors
/// As [`check_type`].
pub fn check_type_meta(api_version: &str, kind: &str, body: &mut Value) -> Result<()> {
    drop_nulls(body);
    let Some(obj) = body.as_object_mut() else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    match obj.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => {
            obj.insert("apiVersion".into(), json!(api_version));
        }
        Some(v) if v == api_version => {}
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            )));
        }
    }
    match obj.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            obj.insert("kind".into(), json!(kind));
        }
        Some(k) if k == kind => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({kind})"
            )));
        }
    }
    if !obj.get("metadata").is_none_or(Value::is_object) {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    obj.entry("metadata").or_insert_with(|| json!({}));
    Ok(())
}

/// The part of an object that `generation` tracks: everything but metadata and status.
fn spec_of(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
    }
    v
}

/// Two versions are the same write if they differ only in resourceVersion and
/// managedFields timestamps.
fn same(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v["metadata"].as_object_mut() {
            m.remove("resourceVersion");
            m.remove("managedFields");
        }
        v
    };
    strip(a) == strip(b)
}

/// As kube-apiserver does: `stringData` is folded into `data` (base64) and never stored,
/// `type` defaults to `Opaque`, and a stored Secret's type never changes.
fn secret_defaults(res: Res, name: &str, old: Option<&Value>, new: &mut Value) -> Result<()> {
    use base64::Engine as _;
    let Some(obj) = new.as_object_mut() else {
        return Ok(());
    };
    let invalid = |field: String, message: &str| {
        ApiError::invalid(
            res,
            name,
            &[portway_api::FieldError {
                field,
                kind: portway_api::FieldErrorKind::Invalid,
                message: message.into(),
            }],
        )
    };
    match obj.remove("stringData") {
        None | Some(Value::Null) => {}
        Some(Value::Object(strings)) => {
            let data = obj.entry("data").or_insert_with(|| json!({}));
            if data.is_null() {
                *data = json!({});
            }
            let Some(data) = data.as_object_mut() else {
                return Err(invalid(
                    "data".into(),
                    "must be an object of base64 strings",
                ));
            };
            for (k, v) in strings {
                let Some(text) = v.as_str() else {
                    return Err(invalid(format!("stringData[{k}]"), "must be a string"));
                };
                data.insert(
                    k,
                    json!(base64::engine::general_purpose::STANDARD.encode(text)),
                );
            }
        }
        Some(_) => {
            return Err(invalid("stringData".into(), "must be an object of strings"));
        }
    }
    let ty = obj.entry("type").or_insert_with(|| json!("Opaque")).clone();
    if let Some(before) = old.and_then(|o| o.get("type"))
        && *before != ty
    {
        return Err(ApiError::invalid(
            res,
            name,
            &[portway_api::FieldError {
                field: "type".into(),
                kind: portway_api::FieldErrorKind::Invalid,
                message: "field is immutable".into(),
            }],
        ));
    }
    Ok(())
}

/// Admits `new` (a full object from the client, or the result of a patch) against `old`.
/// Returns the canonical object to store. `scope` says which part the write may change;
/// `applied` carries the field ownership a server-side apply already worked out.
///
/// # Errors
/// 400/409/422 as Kubernetes would answer.
pub fn admit(
    ctx: &WriteCtx,
    old: Option<&Value>,
    mut new: Value,
    scope: Scope,
    applied: Option<Vec<Managed>>,
) -> Result<Value> {
    let res = ctx.res;
    check_type(res, &mut new)?;
    let meta = &mut new["metadata"];
    if res.namespaced {
        match meta["namespace"].as_str() {
            None | Some("") => meta["namespace"] = json!(ctx.ns),
            Some(ns) if ns == ctx.ns => {}
            Some(_) => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
    } else if let Some(m) = meta.as_object_mut() {
        m.remove("namespace");
    }
    let name = name_of(&new).to_owned();
    match old {
        Some(old) => {
            let sent_rv = new["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default();
            let old_rv = old["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default();
            if !sent_rv.is_empty() && sent_rv != old_rv {
                return Err(ApiError::conflict(
                    res,
                    &name,
                    "the object has been modified; please apply your changes to the latest version and try again",
                ));
            }
            if let Some(old_uid) = old["metadata"]["uid"].as_str()
                && new["metadata"]["uid"]
                    .as_str()
                    .is_some_and(|u| !u.is_empty() && u != old_uid)
            {
                return Err(ApiError::conflict(
                    res,
                    &name,
                    "Precondition failed: UID in precondition does not match",
                ));
            }
            for field in [
                "uid",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "managedFields",
            ] {
                match old["metadata"].get(field) {
                    Some(v) => new["metadata"][field] = v.clone(),
                    None => {
                        if let Some(m) = new["metadata"].as_object_mut() {
                            m.remove(field);
                        }
                    }
                }
            }
            match scope {
                Scope::Main {
                    status_subresource: true,
                } => match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(o) = new.as_object_mut() {
                            o.remove("status");
                        }
                    }
                },
                Scope::Main {
                    status_subresource: false,
                } => {}
                Scope::Status => {
                    let status = new.get("status").cloned();
                    let meta_rv = new["metadata"]["resourceVersion"].clone();
                    new = old.clone();
                    match status {
                        Some(s) => new["status"] = s,
                        None => {
                            if let Some(o) = new.as_object_mut() {
                                o.remove("status");
                            }
                        }
                    }
                    new["metadata"]["resourceVersion"] = meta_rv;
                }
            }
            if is_deleting(old) {
                let before = finalizers(old);
                if let Some(added) = finalizers(&new).into_iter().find(|f| !before.contains(f)) {
                    return Err(ApiError::invalid(
                        res,
                        &name,
                        &[portway_api::FieldError {
                            field: "metadata.finalizers".into(),
                            kind: portway_api::FieldErrorKind::Forbidden,
                            message: format!(
                                "no new finalizers can be added if the object is being deleted, found new finalizers [{added}]"
                            ),
                        }],
                    ));
                }
            }
        }
        None => {
            let meta = &mut new["metadata"];
            if let Some(m) = meta.as_object_mut() {
                for field in [
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "managedFields",
                    "resourceVersion",
                    "selfLink",
                ] {
                    m.remove(field);
                }
            }
            meta["uid"] = json!(new_uid());
            meta["creationTimestamp"] = json!(ctx.now);
            meta["generation"] = json!(1);
            if res.status
                && scope != Scope::Status
                && let Some(o) = new.as_object_mut()
            {
                o.remove("status");
            }
            if res.kind == "Namespace" {
                new["status"] = json!({"phase": "Active"});
            }
        }
    }

    if res.kind == "Secret" {
        secret_defaults(res, &name, old, &mut new)?;
    }
    let decoded = res
        .decode(&new)
        .map_err(|e| ApiError::invalid(res, &name, &[e]))?;
    if !decoded.unknown.is_empty() && ctx.validation == FieldValidation::Strict {
        let list = decoded
            .unknown
            .iter()
            .map(|f| format!("unknown field \"{f}\""))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ApiError::bad_request(format!(
            "strict decoding error: {list}"
        )));
    }
    if !decoded.errors.is_empty() {
        return Err(ApiError::invalid(res, &name, &decoded.errors));
    }
    let mut out = decoded.value;
    if let Some(old) = old {
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        let bump = spec_of(old) != spec_of(&out);
        out["metadata"]["generation"] = json!(if bump { generation + 1 } else { generation });
    }
    let entries = match applied {
        Some(mut entries) => {
            apply::prune(&mut entries, &out);
            entries
        }
        None => {
            let writer = Writer {
                manager: &ctx.manager,
                api_version: &res.api_version(),
                time: &ctx.now,
                scope,
            };
            let mut entries = old.map(Managed::parse_all).unwrap_or_default();
            apply::record_update(&mut entries, old, &out, &writer);
            entries
        }
    };
    out["metadata"]["managedFields"] = Managed::render_all(&entries);
    if out["metadata"]["managedFields"]
        .as_array()
        .is_some_and(Vec::is_empty)
        && let Some(m) = out["metadata"].as_object_mut()
    {
        m.remove("managedFields");
    }
    Ok(out)
}

/// Stores an admitted object unless it is unchanged or this is a dry run; then removes it
/// if it was being deleted and its last finalizer is gone.
pub fn commit(
    txn: &mut Txn<'_>,
    ctx: &WriteCtx,
    old: Option<&Value>,
    new: Value,
) -> Result<Arc<Value>> {
    // Guarded before the no-op answer: that answer is the stored object, and an empty
    // patch of a Secret a device may not read must not hand it over.
    guard(txn, ctx, old, Some(&new))?;
    if let Some(old) = old
        && same(old, &new)
    {
        return Ok(Arc::new(old.clone()));
    }
    if ctx.dry_run {
        return Ok(Arc::new(new));
    }
    if old.is_none() && ctx.res.namespaced {
        let ns_res = registry().namespaces();
        match txn.get(ns_res, "", &ctx.ns) {
            None => return Err(ApiError::namespace_not_found(&ctx.ns)),
            Some(ns) if is_deleting(&ns) => {
                return Err(ApiError::forbidden(format!(
                    "unable to create new content in namespace {} because it is being terminated",
                    ctx.ns
                )));
            }
            Some(_) => {}
        }
    }
    if is_deleting(&new) && finalizers(&new).is_empty() {
        let name = name_of(&new).to_owned();
        txn.put(ctx.res, new);
        return remove(txn, ctx.res, &ctx.ns, &name, Propagation::Background)
            .map(|v| v.unwrap_or_else(|| Arc::new(Value::Null)));
    }
    if is_deleting(&new) && finalizers(&new) == [ORPHAN] {
        // Only the garbage collector's own finalizer is left: its turn.
        let stored = txn.put(ctx.res, new);
        finish_orphaning(txn, ctx.res, &stored)?;
        return Ok(stored);
    }
    if !events::is_event(ctx.res) {
        let stored = txn.put(ctx.res, new);
        // As Kubernetes' garbage collector: an object whose owners are all gone goes too.
        // A controller that was still writing a child when its owner was deleted (the
        // cascade ran in between) would otherwise leave it behind for good.
        if orphaned(txn, &stored) {
            let name = name_of(&stored).to_owned();
            remove(txn, ctx.res, &ctx.ns, &name, Propagation::Background)?;
        }
        return Ok(stored);
    }
    if old.is_none() {
        events::make_room(txn, ctx.res, &ctx.ns, &new);
    }
    let stored = txn.put(ctx.res, new);
    events::mirror(txn, ctx.res, &stored);
    Ok(stored)
}

/// Creates an object.
///
/// # Errors
/// 409 AlreadyExists, or any admission error.
pub fn create(txn: &mut Txn<'_>, ctx: &WriteCtx, mut body: Value) -> Result<Arc<Value>> {
    check_type(ctx.res, &mut body)?;
    let meta = &mut body["metadata"];
    if meta["name"].as_str().is_none_or(str::is_empty) {
        match meta["generateName"].as_str() {
            Some(prefix) if !prefix.is_empty() => {
                meta["name"] = json!(format!("{prefix}{}", random_suffix()));
            }
            _ => {
                return Err(ApiError::invalid(
                    ctx.res,
                    "",
                    &[portway_api::FieldError {
                        field: "metadata.name".into(),
                        kind: portway_api::FieldErrorKind::Required,
                        message: "name or generateName is required".into(),
                    }],
                ));
            }
        }
    }
    let name = name_of(&body).to_owned();
    if txn.get(ctx.res, &ctx.ns, &name).is_some() {
        return Err(ApiError::already_exists(ctx.res, &name));
    }
    let scope = Scope::Main {
        status_subresource: ctx.res.status,
    };
    let new = admit(ctx, None, body, scope, None)?;
    commit(txn, ctx, None, new)
}

/// Kubernetes' `propagationPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    Background,
    Foreground,
    Orphan,
}

impl Propagation {
    /// # Errors
    /// 400 for an unknown policy.
    pub fn parse(s: Option<&str>) -> Result<Self> {
        match s {
            None | Some("" | "Background") => Ok(Self::Background),
            Some("Foreground") => Ok(Self::Foreground),
            Some("Orphan") => Ok(Self::Orphan),
            Some(other) => Err(ApiError::bad_request(format!(
                "propagationPolicy must be Background, Foreground or Orphan, got {other:?}"
            ))),
        }
    }
}

/// Deletes an object: marks it when finalizers remain, removes it otherwise. Returns its
/// last state.
///
/// # Errors
/// 404 when absent.
pub fn delete(
    txn: &mut Txn<'_>,
    ctx: &WriteCtx,
    name: &str,
    policy: Propagation,
) -> Result<Arc<Value>> {
    let res = ctx.res;
    let old = txn
        .get(res, &ctx.ns, name)
        .ok_or_else(|| ApiError::not_found(res, name))?;
    guard(txn, ctx, Some(&old), None)?;
    if ctx.dry_run {
        return Ok(old);
    }
    mark_or_remove(txn, res, &old, policy).map(|v| v.unwrap_or(old))
}

/// Kubernetes' finalizer for an object deleted with `propagationPolicy=Orphan` whose
/// dependents still name it: they lose that owner reference before it goes.
const ORPHAN: &str = "orphan";

/// The objects that name `uid` among their owners.
fn dependents_of(txn: &Txn<'_>, res: Res, ns: &str, uid: &str) -> Vec<(Res, Arc<Value>)> {
    let scope = if res.namespaced { Some(ns) } else { None };
    registry()
        .all()
        .filter(|r| r.namespaced || !res.namespaced)
        .flat_map(|r| txn.list(r, scope).into_iter().map(move |o| (r, o)))
        .filter(|(_, o)| owner_uids(o).any(|u| u == uid))
        .collect()
}

/// Takes `obj`'s owner reference off its dependents, as many as fit in this write; says
/// whether none is left.
fn orphan_dependents(txn: &mut Txn<'_>, res: Res, obj: &Value) -> bool {
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
    let uid = obj["metadata"]["uid"].as_str().unwrap_or_default();
    for (r, dep) in dependents_of(txn, res, ns, uid) {
        if !txn.fits(&dep) {
            txn.leave_for_later();
            return false;
        }
        let mut orphan = (*dep).clone();
        if let Some(refs) = orphan["metadata"]["ownerReferences"].as_array_mut() {
            refs.retain(|o| o["uid"] != uid);
        }
        txn.put(r, orphan);
    }
    true
}

/// For a deleting object holding the [`ORPHAN`] finalizer: orphans its dependents (what
/// fits), then drops the finalizer, and removes the object if no other is left.
fn finish_orphaning(txn: &mut Txn<'_>, res: Res, obj: &Value) -> Result<()> {
    if !orphan_dependents(txn, res, obj) {
        return Ok(());
    }
    let mut done = obj.clone();
    if let Some(f) = done["metadata"]["finalizers"].as_array_mut() {
        f.retain(|f| f != ORPHAN);
    }
    let (ns, name) = (
        obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        name_of(obj).to_owned(),
    );
    let rest = finalizers(&done);
    txn.put(res, done);
    if rest.is_empty() {
        remove(txn, res, &ns, &name, Propagation::Orphan)?;
    }
    Ok(())
}

fn mark_or_remove(
    txn: &mut Txn<'_>,
    res: Res,
    obj: &Value,
    policy: Propagation,
) -> Result<Option<Arc<Value>>> {
    let ns = obj["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let name = name_of(obj).to_owned();
    let pending =
        !finalizers(obj).is_empty() || (res.kind == "Namespace" && !namespace_empty(txn, &name));
    if pending {
        if is_deleting(obj) {
            return Ok(Some(Arc::new(obj.clone())));
        }
        let mut marked = obj.clone();
        marked["metadata"]["deletionTimestamp"] = json!(now());
        marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        // Orphaning outlives the other finalizers, as in Kubernetes.
        if policy == Propagation::Orphan && !finalizers(obj).iter().any(|f| f == ORPHAN) {
            let uid = obj["metadata"]["uid"].as_str().unwrap_or_default();
            if !dependents_of(txn, res, &ns, uid).is_empty()
                && let Some(f) = marked["metadata"]["finalizers"].as_array_mut()
            {
                f.push(json!(ORPHAN));
            }
        }
        if res.kind == "Namespace" {
            marked["status"]["phase"] = json!("Terminating");
        }
        let marked = txn.put(res, marked);
        if res.kind == "Namespace" && tear_down(txn, &name)? {
            return remove(txn, res, "", &name, policy);
        }
        return Ok(Some(marked));
    }
    if policy == Propagation::Orphan && !orphan_dependents(txn, res, obj) {
        // More dependents than one write holds: the object waits, with the orphan
        // finalizer, for the collector to orphan the rest.
        let mut marked = obj.clone();
        marked["metadata"]["deletionTimestamp"] = json!(now());
        marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        marked["metadata"]["finalizers"] = json!([ORPHAN]);
        return Ok(Some(txn.put(res, marked)));
    }
    remove(txn, res, &ns, &name, policy)
}

/// Deletes what namespace `ns` holds, as much as fits in this write (the rest is left to
/// [`collect`]); says whether it is empty.
fn tear_down(txn: &mut Txn<'_>, ns: &str) -> Result<bool> {
    for (r, child) in namespace_contents(txn, ns) {
        if is_deleting(&child) {
            continue;
        }
        if !txn.fits(&child) {
            txn.leave_for_later();
            break;
        }
        mark_or_remove(txn, r, &child, Propagation::Background)?;
    }
    Ok(namespace_empty(txn, ns))
}

/// Finishes what deletions left for later, as much as fits in one write: the contents
/// of terminating namespaces, and objects whose owners are all gone (Kubernetes'
/// namespace controller and garbage collector). Says whether work remains.
///
/// # Errors
/// None expected: deletions here carry no preconditions.
pub fn collect(txn: &mut Txn<'_>) -> Result<bool> {
    let namespaces = registry().namespaces();
    for ns in txn.list(namespaces, None) {
        if !is_deleting(&ns) || !finalizers(&ns).is_empty() {
            continue;
        }
        let name = name_of(&ns).to_owned();
        if tear_down(txn, &name)? {
            remove(txn, namespaces, "", &name, Propagation::Background)?;
        }
        if txn.left_for_later() {
            return Ok(true);
        }
    }
    for res in registry().all() {
        for obj in txn.list(res, None) {
            if is_deleting(&obj) && finalizers(&obj) == [ORPHAN] {
                finish_orphaning(txn, res, &obj)?;
                if txn.left_for_later() {
                    return Ok(true);
                }
                continue;
            }
            if is_deleting(&obj) || !orphaned(txn, &obj) {
                continue;
            }
            if !txn.fits(&obj) {
                return Ok(true);
            }
            mark_or_remove(txn, res, &obj, Propagation::Background)?;
        }
    }
    Ok(txn.left_for_later())
}

/// Runs [`collect`] whenever a write leaves work for later, and every half minute when a
/// snapshot shows work (another replica that stopped midway), until `stop`.
pub async fn collect_until(store: crate::store::Store, stop: tokio_util::sync::CancellationToken) {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(30);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = store.leftovers() => {}
            () = tokio::time::sleep(EVERY) => {
                if !needs_collecting(&store) {
                    continue;
                }
            }
        }
        // Each write makes progress (its first deletion always fits); the cap only bounds
        // a pass.
        for _ in 0..10_000 {
            match store.write(collect).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "collecting what deletions left");
                    break;
                }
            }
        }
    }
}

/// Whether [`collect`] has anything to do, read from a snapshot (cheaper than a write).
pub fn needs_collecting(store: &crate::store::Store) -> bool {
    let get = |r: Res, ns: &str, name: &str| store.get(r, ns, name);
    let (_, namespaces) = store.list(registry().namespaces(), None);
    let teardown = namespaces.iter().any(|ns| {
        is_deleting(ns)
            && finalizers(ns).is_empty()
            && registry().all().filter(|r| r.namespaced).any(|r| {
                store
                    .list(r, Some(name_of(ns)))
                    .1
                    .iter()
                    .any(|o| !is_deleting(o))
            })
    });
    teardown
        || registry().all().any(|r| {
            store.list(r, None).1.iter().any(|o| {
                if is_deleting(o) {
                    finalizers(o) == [ORPHAN]
                } else {
                    orphaned_in(&get, o)
                }
            })
        })
}

fn namespace_contents(txn: &Txn<'_>, ns: &str) -> Vec<(Res, Arc<Value>)> {
    registry()
        .all()
        .filter(|r| r.namespaced)
        .flat_map(|r| txn.list(r, Some(ns)).into_iter().map(move |o| (r, o)))
        .collect()
}

fn namespace_empty(txn: &Txn<'_>, ns: &str) -> bool {
    registry()
        .all()
        .filter(|r| r.namespaced)
        .all(|r| txn.list(r, Some(ns)).is_empty())
}

/// Removes an object for good and collects what depended on it.
fn remove(
    txn: &mut Txn<'_>,
    res: Res,
    ns: &str,
    name: &str,
    policy: Propagation,
) -> Result<Option<Arc<Value>>> {
    let Some(last) = txn.remove(res, ns, name) else {
        return Ok(None);
    };
    if events::is_event(res) {
        events::unmirror(txn, res, ns, name);
    }
    let uid = last["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    for (r, dep) in dependents_of(txn, res, ns, &uid) {
        if !txn.fits(&dep) && policy != Propagation::Orphan {
            // Dependents whose owner is gone are collected later.
            txn.leave_for_later();
            break;
        }
        if policy == Propagation::Orphan {
            let mut orphan = (*dep).clone();
            if let Some(refs) = orphan["metadata"]["ownerReferences"].as_array_mut() {
                refs.retain(|o| o["uid"] != uid.as_str());
            }
            txn.put(r, orphan);
        } else if !has_live_owner(txn, &dep) {
            mark_or_remove(txn, r, &dep, Propagation::Background)?;
        }
    }
    if res.namespaced
        && let Some(nsobj) = txn.get(registry().namespaces(), "", ns)
        && is_deleting(&nsobj)
        && finalizers(&nsobj).is_empty()
        && namespace_empty(txn, ns)
    {
        remove(
            txn,
            registry().namespaces(),
            "",
            ns,
            Propagation::Background,
        )?;
    }
    Ok(Some(last))
}

fn owner_uids(obj: &Value) -> impl Iterator<Item = &str> {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["uid"].as_str())
}

/// Reads an object: through a write's transaction, or from a snapshot.
type Getter<'a> = &'a dyn Fn(Res, &str, &str) -> Option<Arc<Value>>;

/// Whether `obj` has owners, every one of a kind served here, and none of them exists.
/// (An owner of a kind this server does not know cannot be checked, so it keeps `obj`, as
/// Kubernetes' garbage collector does.)
fn orphaned(txn: &Txn<'_>, obj: &Value) -> bool {
    orphaned_in(&|r: Res, ns: &str, name: &str| txn.get(r, ns, name), obj)
}

fn orphaned_in(get: Getter<'_>, obj: &Value) -> bool {
    let refs = obj["metadata"]["ownerReferences"].as_array();
    let known = |o: &Value| {
        o["apiVersion"]
            .as_str()
            .zip(o["kind"].as_str())
            .is_some_and(|(v, k)| registry().by_kind(v, k).is_some())
    };
    refs.is_some_and(|r| !r.is_empty() && r.iter().all(known)) && !has_live_owner_in(get, obj)
}

/// Whether any owner of `obj` still exists (Kubernetes only collects dependents whose
/// owners are all gone).
fn has_live_owner(txn: &Txn<'_>, obj: &Value) -> bool {
    has_live_owner_in(&|r: Res, ns: &str, name: &str| txn.get(r, ns, name), obj)
}

fn has_live_owner_in(get: Getter<'_>, obj: &Value) -> bool {
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
    obj["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| {
            let (Some(api_version), Some(kind), Some(name), Some(uid)) = (
                o["apiVersion"].as_str(),
                o["kind"].as_str(),
                o["name"].as_str(),
                o["uid"].as_str(),
            ) else {
                return false;
            };
            registry().by_kind(api_version, kind).is_some_and(|r| {
                let owner_ns = if r.namespaced { ns } else { "" };
                get(r, owner_ns, name).is_some_and(|owner| owner["metadata"]["uid"] == uid)
            })
        })
}
