//! create, update, patch (merge, JSON, strategic, server-side apply), delete and
//! deletecollection.

use std::sync::Arc;

use axum::extract::Request;
use axum::response::Response;
use http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};

use super::body::{read_body, read_delete_options, read_object};
use super::reads::list_object;
use super::{Target, header_str, json_response};
use crate::app::{App, Query, flag, selectors};
use crate::apply::{self, Managed, Scope, Writer};
use crate::auth::User;
use crate::decode::{Format, decode};
use crate::devices;
use crate::error::{ApiError, Result};
use crate::patch::{self, PatchType};
use crate::registry::Res;
use crate::store::ObjKey;
use crate::write::{self, FieldValidation, Propagation, WriteCtx};

/// A write request, once its URL is parsed and its user authorised.
pub(super) struct Write<'a> {
    app: &'a App,
    t: &'a Target,
    q: &'a Query,
    ctx: WriteCtx,
}

impl<'a> Write<'a> {
    /// Takes the field manager, validation and dry run from the request, and guards the
    /// write so that a joined device keeps to what it is bound to.
    pub(super) fn new(
        app: &'a App,
        user: &Arc<User>,
        t: &'a Target,
        q: &'a Query,
        headers: &HeaderMap,
    ) -> Result<Self> {
        let ctx = WriteCtx {
            res: t.res,
            ns: t.ns.clone().unwrap_or_default(),
            manager: manager(q, headers),
            validation: FieldValidation::parse(q.get("fieldValidation").map(String::as_str))?,
            dry_run: q.get("dryRun").is_some_and(|v| v == "All"),
            now: write::now(),
            guard: Some({
                let user = user.clone();
                Arc::new(
                    move |txn: &crate::store::Txn<'_>,
                          res,
                          ns: &str,
                          old: Option<&Value>,
                          new: Option<&Value>| {
                        devices::check_write(txn, &user, res, ns, old, new)
                    },
                )
            }),
        };
        Ok(Self { app, t, q, ctx })
    }
}

pub(super) async fn create(w: Write<'_>, req: Request) -> Result<Response> {
    let Write { app, t, ctx, .. } = w;
    if t.status {
        return Err(ApiError::method_not_allowed(
            "POST is not supported on the status subresource",
        ));
    }
    let body = read_object(app, req, t.res.proto, ctx.validation).await?;
    let created = app
        .store
        .write(move |txn| write::create(txn, &ctx, body.clone()))
        .await?;
    Ok(json_response(StatusCode::CREATED, &created))
}

pub(super) async fn update(w: Write<'_>, req: Request) -> Result<Response> {
    let Write { app, t, ctx, .. } = w;
    let name = t.name.clone().unwrap_or_default();
    let status = t.status;
    let body = read_object(app, req, t.res.proto, ctx.validation).await?;
    check_name(&body, &name)?;
    let updated = app
        .store
        .write(move |txn| {
            let old = txn
                .get(ctx.res, &ctx.ns, &name)
                .ok_or_else(|| ApiError::not_found(ctx.res, &name))?;
            let new = write::admit(&ctx, Some(&old), body.clone(), scope(ctx.res, status), None)?;
            write::commit(txn, &ctx, Some(&old), new)
        })
        .await?;
    Ok(json_response(StatusCode::OK, &updated))
}

pub(super) async fn patch(w: Write<'_>, req: Request) -> Result<Response> {
    let Write { app, t, q, ctx } = w;
    let ct = header_str(req.headers(), header::CONTENT_TYPE).to_owned();
    let patch_type = PatchType::from_content_type(&ct).ok_or_else(|| {
        ApiError::unsupported_media_type(format!(
            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml{} (got {ct:?})",
            if t.res.strategic.is_some() { ", application/strategic-merge-patch+json" } else { "" }
        ))
    })?;
    if patch_type == PatchType::Strategic && t.res.strategic.is_none() {
        return Err(ApiError::unsupported_media_type(format!(
            "strategic merge patch is not supported for {}; use --type=merge or --type=json",
            t.res.key()
        )));
    }
    if patch_type == PatchType::Apply && q.get("fieldManager").is_none_or(|m| m.is_empty()) {
        return Err(ApiError::bad_request(
            "PATCH with application/apply-patch+yaml requires the fieldManager parameter",
        ));
    }
    let force = flag(q, "force");
    let (_, bytes) = read_body(app, req).await?;
    let format = match patch_type {
        PatchType::Apply => Format::Yaml,
        _ => Format::Json,
    };
    let body = decode(bytes, format).await?;
    let name = t.name.clone().unwrap_or_default();
    let scope = scope(t.res, t.status);
    let status = t.status;
    let result = app
        .store
        .write(move |txn| {
            let res = ctx.res;
            let old = txn.get(res, &ctx.ns, &name);
            let Some(old) = old else {
                if patch_type != PatchType::Apply || status {
                    return Err(ApiError::not_found(res, &name));
                }
                let mut body = body.clone();
                write::check_type(res, &mut body)?;
                check_name(&body, &name)?;
                let mut entries = Vec::new();
                let writer = Writer { manager: &ctx.manager, api_version: &res.api_version(), time: &ctx.now, scope };
                let merged = apply::apply(&json!({}), &body, &mut entries, &writer, true, &Value::clone)
                    .map_err(|_| ApiError::internal("apply conflict on create"))?;
                let mut merged = merged;
                merged["apiVersion"] = body["apiVersion"].clone();
                merged["kind"] = body["kind"].clone();
                merged["metadata"]["name"] = json!(name);
                let new = write::admit(&ctx, None, merged, scope, Some(entries))?;
                return write::commit(txn, &ctx, None, new).map(|v| (StatusCode::CREATED, v));
            };
            let (new, entries) = match patch_type {
                PatchType::Merge => {
                    let mut doc = (*old).clone();
                    json_patch::merge(&mut doc, &body);
                    (doc, None)
                }
                PatchType::Json => {
                    let mut doc = (*old).clone();
                    patch::json_patch(&mut doc, &body).map_err(|e| {
                        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", format!("the JSON patch could not be applied: {e}"))
                    })?;
                    (doc, None)
                }
                PatchType::Strategic => {
                    let doc = patch::strategic_merge(&old, &body, res).map_err(ApiError::bad_request)?;
                    (doc, None)
                }
                PatchType::Apply => {
                    let mut body = body.clone();
                    write::check_type(res, &mut body)?;
                    check_name(&body, &name)?;
                    let mut entries = Managed::parse_all(&old);
                    let writer = Writer { manager: &ctx.manager, api_version: &res.api_version(), time: &ctx.now, scope };
                    let canonical = |v: &Value| res.decode(v).map_or_else(|_| v.clone(), |d| d.value);
                    let merged = apply::apply(&old, &body, &mut entries, &writer, force, &canonical).map_err(|conflicts| {
                        let n = conflicts.len();
                        let mut e = ApiError::new(
                            StatusCode::CONFLICT,
                            "Conflict",
                            format!(
                                "Apply failed with {n} conflict{}: {}",
                                if n == 1 { "" } else { "s" },
                                apply::describe(&conflicts)
                            ),
                        );
                        let causes: Vec<Value> = conflicts
                            .iter()
                            .map(|c| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{}\"", c.manager), "field": c.field}))
                            .collect();
                        e.details = Some(json!({"name": name, "group": res.group, "kind": res.plural, "causes": causes}));
                        e
                    })?;
                    (merged, Some(entries))
                }
            };
            let mut new = new;
            // Patches may pin a resourceVersion; otherwise they apply to the latest.
            let pinned = patch_type != PatchType::Apply && new["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"];
            if !pinned && let Some(m) = new["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            let new = write::admit(&ctx, Some(&old), new, scope, entries)?;
            write::commit(txn, &ctx, Some(&old), new).map(|v| (StatusCode::OK, v))
        })
        .await?;
    Ok(json_response(result.0, &result.1))
}

pub(super) async fn delete(w: Write<'_>, req: Request) -> Result<Response> {
    let Write { app, t, q, ctx } = w;
    let name = t.name.clone().unwrap_or_default();
    let opts = read_delete_options(app, req).await?;
    let policy = Propagation::parse(
        opts["propagationPolicy"]
            .as_str()
            .or(q.get("propagationPolicy").map(String::as_str)),
    )?;
    let dry_run = ctx.dry_run
        || opts["dryRun"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v == "All"));
    let ctx = WriteCtx { dry_run, ..ctx };
    let pre = opts["preconditions"].clone();
    let deleted = app
        .store
        .write(move |txn| {
            if let Some(old) = txn.get(ctx.res, &ctx.ns, &name) {
                check_preconditions(ctx.res, &name, &old, &pre)?;
            }
            write::delete(txn, &ctx, &name, policy)
        })
        .await?;
    Ok(json_response(StatusCode::OK, &deleted))
}

pub(super) async fn delete_collection(w: Write<'_>, req: Request) -> Result<Response> {
    let Write { app, t, q, ctx } = w;
    let (label, field) = selectors(q, t.res)?;
    let opts = read_delete_options(app, req).await?;
    let policy = Propagation::parse(opts["propagationPolicy"].as_str())?;
    let ns = t.ns.clone();
    let res = t.res;
    // As kube-apiserver, one object after another rather than all at once: as many as
    // fit in one write (one commit on etcd holds so much), then again.
    let mut deleted: Vec<Arc<Value>> = Vec::new();
    let mut done = std::collections::HashSet::new();
    loop {
        let (label, field, ctx, ns) = (label.clone(), field.clone(), ctx.clone(), ns.clone());
        let skip = done.clone();
        let (batch, more) = app
            .store
            .write(move |txn| {
                let mut out = Vec::new();
                for obj in txn.list(res, ns.as_deref()) {
                    let key = ObjKey::of(&obj);
                    if skip.contains(&key) || !label.matches(&obj) || !field.matches(&obj) {
                        continue;
                    }
                    if !txn.fits(&obj) {
                        return Ok((out, true));
                    }
                    let ctx = WriteCtx {
                        ns: key.ns.clone(),
                        ..ctx.clone()
                    };
                    out.push(write::delete(txn, &ctx, &key.name, policy)?);
                }
                Ok((out, false))
            })
            .await?;
        done.extend(batch.iter().map(|o| ObjKey::of(o)));
        deleted.extend(batch);
        if !more {
            break;
        }
    }
    let items: Vec<&Value> = deleted.iter().map(|v| v.as_ref()).collect();
    Ok(json_response(
        StatusCode::OK,
        &list_object(t.res, &items, &app.store.revision().to_string(), None),
    ))
}

fn check_name(body: &Value, name: &str) -> Result<()> {
    if write::name_of(body) != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            write::name_of(body)
        )));
    }
    Ok(())
}

fn check_preconditions(res: Res, name: &str, obj: &Value, pre: &Value) -> Result<()> {
    for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
        if let Some(want) = pre[field].as_str()
            && obj["metadata"][field] != want
        {
            return Err(ApiError::conflict(
                res,
                name,
                &format!(
                    "Precondition failed: {label} in precondition: {want}, {label} in object meta: {}",
                    obj["metadata"][field].as_str().unwrap_or_default()
                ),
            ));
        }
    }
    Ok(())
}

fn scope(res: Res, status: bool) -> Scope {
    if status {
        Scope::Status
    } else {
        Scope::Main {
            status_subresource: res.status,
        }
    }
}

/// The field manager: the `fieldManager` parameter, else the client's user agent name.
fn manager(q: &Query, headers: &HeaderMap) -> String {
    if let Some(m) = q.get("fieldManager").filter(|m| !m.is_empty()) {
        return m.clone();
    }
    let agent = header_str(headers, header::USER_AGENT);
    let name = agent.split('/').next().unwrap_or_default().trim();
    if name.is_empty() {
        "unknown".into()
    } else {
        name.chars().take(128).collect()
    }
}
