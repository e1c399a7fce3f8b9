//! HTTP surface: authentication, URL parsing, content negotiation and the handlers for
//! each verb. Every error leaves as a Kubernetes `Status`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::apply::{self, Managed, Scope, Writer};
use crate::auth::{Access, Tokens, User, Verb, authorize};
use crate::decode::{Format, decode};
use crate::devices::{self, Devices, JoinRequest};
use crate::discovery;
use crate::error::{ApiError, Result};
use crate::patch::{self, PatchType};
use crate::registry::{Res, registry};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{ObjKey, Store};
use crate::table::{self, Include};
use crate::watch;
use crate::write::{self, FieldValidation, Propagation, WriteCtx};

pub struct App {
    pub store: Store,
    pub tokens: Tokens,
    pub devices: Arc<Devices>,
    /// `host:port` clients reach us at, for `/api`'s `serverAddressByClientCIDRs`.
    pub address: String,
    pub max_body: usize,
    pub shutdown: CancellationToken,
}

pub type Query = HashMap<String, String>;

fn parse_query(q: Option<&str>) -> Query {
    url::form_urlencoded::parse(q.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

fn flag(q: &Query, key: &str) -> bool {
    q.get(key).is_some_and(|v| v == "true" || v == "1")
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> &str {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// The single entry point behind the router.
pub async fn handle(State(app): State<Arc<App>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    if matches!(path.as_str(), "/healthz" | "/readyz" | "/livez") {
        return "ok".into_response();
    }
    if path.starts_with("/portway/v1/join") && req.method() == Method::POST {
        return match join(&app, req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let user = app.tokens.authenticate(bearer).or_else(|| {
        let token = bearer?.strip_prefix("Bearer ")?.trim();
        let connectors = connectors_res()?;
        app.devices.authenticate(token, |ns, name| {
            let c = app.store.get(connectors, ns, name)?;
            c["metadata"]["uid"].as_str().map(str::to_owned)
        })
    });
    let Some(user) = user else {
        return ApiError::unauthorized().into_response();
    };
    let method = req.method().clone();
    match dispatch(&app, &user, req).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(%method, %path, user = %user.name, code = e.code.as_u16(), reason = e.reason, "{}", e.message);
            e.into_response()
        }
    }
}

async fn dispatch(app: &Arc<App>, user: &Arc<User>, req: Request) -> Result<Response> {
    let path = req.uri().path().to_owned();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let accept = header_str(req.headers(), header::ACCEPT).to_owned();
    let is_get = req.method() == Method::GET;
    let discovery = |v: Option<Value>| -> Result<Response> {
        if !is_get {
            return Err(ApiError::method_not_allowed(
                "discovery endpoints only answer GET",
            ));
        }
        v.map(|v| json_response(StatusCode::OK, &v))
            .ok_or_else(ApiError::path_not_found)
    };
    match segs.as_slice() {
        ["version"] => discovery(Some(discovery::version())),
        ["api"] | ["apis"] => {
            let core = segs[0] == "api";
            if let Some(ct) = discovery::aggregated_content_type(&accept) {
                let body = serde_json::to_vec(&discovery::aggregated(core, ct)).unwrap_or_default();
                return Ok((StatusCode::OK, [(header::CONTENT_TYPE, ct)], body).into_response());
            }
            discovery(Some(if core {
                discovery::api_versions(&app.address)
            } else {
                discovery::api_group_list()
            }))
        }
        ["api", "v1"] => discovery(discovery::resource_list("", "v1")),
        ["apis", group] => discovery(discovery::api_group(group)),
        ["apis", group, version] => discovery(discovery::resource_list(group, version)),
        ["openapi", "v2"] => {
            // An empty protobuf document: clients then validate nothing client-side and
            // leave validation to this server (see notes on kubectl 1.20).
            if accept.contains("protobuf") {
                Ok((
                    StatusCode::OK,
                    [(
                        header::CONTENT_TYPE,
                        "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
                    )],
                    Vec::new(),
                )
                    .into_response())
            } else {
                discovery(Some(
                    json!({"swagger": "2.0", "info": {"title": "Portway", "version": env!("CARGO_PKG_VERSION")}, "paths": {}, "definitions": {}}),
                ))
            }
        }
        ["openapi", "v3"] => discovery(Some(discovery::openapi_v3_root())),
        ["openapi", "v3", rest @ ..] => {
            discovery(discovery::openapi_v3_doc(&rest.join("/")).cloned())
        }
        ["api", "v1", rest @ ..] => {
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            resource(app, user, req, "", "v1", &rest).await
        }
        ["apis", group, version, rest @ ..] => {
            let (g, v) = (group.to_string(), version.to_string());
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            resource(app, user, req, &g, &v, &rest).await
        }
        _ => Err(ApiError::path_not_found()),
    }
}

/// A parsed resource URL.
struct Target {
    res: Res,
    /// Namespace from the URL (`None` for cluster-scoped kinds and all-namespace lists).
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

fn target(group: &str, version: &str, rest: &[String]) -> Result<Target> {
    let reg = registry();
    let namespaced_path = rest.len() >= 3
        && rest[0] == "namespaces"
        && reg
            .by_path(group, version, &rest[2])
            .is_some_and(|r| r.namespaced);
    let (ns, tail) = if namespaced_path {
        (Some(rest[1].clone()), &rest[2..])
    } else {
        (None, rest)
    };
    let (plural, name, sub) = match tail {
        [p] => (p, None, None),
        [p, n] => (p, Some(n.clone()), None),
        [p, n, s] => (p, Some(n.clone()), Some(s.as_str())),
        _ => return Err(ApiError::path_not_found()),
    };
    let res = reg
        .by_path(group, version, plural)
        .ok_or_else(ApiError::path_not_found)?;
    if res.namespaced && ns.is_none() && name.is_some() {
        return Err(ApiError::path_not_found());
    }
    let status = match sub {
        None => false,
        Some("status") if res.status => true,
        Some(_) => return Err(ApiError::path_not_found()),
    };
    Ok(Target {
        res,
        ns,
        name,
        status,
    })
}

fn verb(method: &Method, t: &Target, q: &Query) -> Result<Verb> {
    Ok(match (method, t.name.is_some()) {
        (&Method::GET, true) => Verb::Get,
        (&Method::GET, false) if flag(q, "watch") => Verb::Watch,
        (&Method::GET, false) => Verb::List,
        (&Method::POST, false) => Verb::Create,
        (&Method::PUT, true) => Verb::Update,
        (&Method::PATCH, true) => Verb::Patch,
        (&Method::DELETE, true) => Verb::Delete,
        (&Method::DELETE, false) => Verb::DeleteCollection,
        (m, _) => {
            return Err(ApiError::method_not_allowed(format!(
                "{m} is not supported on this path"
            )));
        }
    })
}

async fn resource(
    app: &Arc<App>,
    user: &Arc<User>,
    req: Request,
    group: &str,
    version: &str,
    rest: &[String],
) -> Result<Response> {
    let t = target(group, version, rest)?;
    let q = parse_query(req.uri().query());
    let verb = verb(req.method(), &t, &q)?;
    let auth_ns = if t.res.kind == "Namespace" {
        t.name.as_deref()
    } else {
        t.ns.as_deref()
    };
    authorize(
        user,
        &Access {
            verb,
            res: t.res,
            ns: auth_ns,
        },
    )?;
    let accept = header_str(req.headers(), header::ACCEPT).to_owned();
    let ctx = |q: &Query, headers: &HeaderMap| -> Result<WriteCtx> {
        Ok(WriteCtx {
            res: t.res,
            ns: t.ns.clone().unwrap_or_default(),
            manager: manager(q, headers),
            validation: FieldValidation::parse(q.get("fieldValidation").map(String::as_str))?,
            dry_run: q.get("dryRun").is_some_and(|v| v == "All"),
            now: write::now(),
            guard: Some({
                let (devices, user) = (app.devices.clone(), user.clone());
                Arc::new(
                    move |res, ns: &str, old: Option<&Value>, new: Option<&Value>| {
                        devices::check_write(&devices, &user, res, ns, old, new)
                    },
                )
            }),
        })
    };
    match verb {
        Verb::Get => get(app, &t, &accept, &q),
        Verb::List => {
            if let Some(rv) = min_resource_version(&q) {
                watch::wait_for_revision(&app.store, rv).await?;
            }
            list(app, &t, &accept, &q)
        }
        Verb::Watch => watch::serve(app, t.res, t.ns.clone(), &q, table::wants_table(&accept)),
        Verb::Create => {
            if t.status {
                return Err(ApiError::method_not_allowed(
                    "POST is not supported on the status subresource",
                ));
            }
            let ctx = ctx(&q, req.headers())?;
            let body = read_object(app, req).await?;
            let created = app
                .store
                .write(move |txn| write::create(txn, &ctx, body))
                .await?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        Verb::Update => {
            let ctx = ctx(&q, req.headers())?;
            let name = t.name.clone().unwrap_or_default();
            let status = t.status;
            let body = read_object(app, req).await?;
            if write::name_of(&body) != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({}) does not match the name on the URL ({name})",
                    write::name_of(&body)
                )));
            }
            let updated = app
                .store
                .write(move |txn| {
                    let old = txn
                        .get(ctx.res, &ctx.ns, &name)
                        .ok_or_else(|| ApiError::not_found(ctx.res, &name))?;
                    let new = write::admit(&ctx, Some(&old), body, scope(ctx.res, status), None)?;
                    write::commit(txn, &ctx, Some(&old), new)
                })
                .await?;
            Ok(json_response(StatusCode::OK, &updated))
        }
        Verb::Patch => {
            let ctx = ctx(&q, req.headers())?;
            patch(app, &t, req, ctx, &q).await
        }
        Verb::Delete => {
            let ctx = ctx(&q, req.headers())?;
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
        Verb::DeleteCollection => {
            let ctx = ctx(&q, req.headers())?;
            let (label, field) = selectors(&q, t.res)?;
            let opts = read_delete_options(app, req).await?;
            let policy = Propagation::parse(opts["propagationPolicy"].as_str())?;
            let ns = t.ns.clone();
            let res = t.res;
            let deleted = app
                .store
                .write(move |txn| {
                    let mut out = Vec::new();
                    for obj in txn.list(res, ns.as_deref()) {
                        if label.matches(&obj) && field.matches(&obj) {
                            let obj_ns = obj["metadata"]["namespace"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned();
                            let ctx = WriteCtx {
                                ns: obj_ns,
                                ..ctx.clone()
                            };
                            out.push(write::delete(txn, &ctx, write::name_of(&obj), policy)?);
                        }
                    }
                    Ok(out)
                })
                .await?;
            let items: Vec<&Value> = deleted.iter().map(|v| v.as_ref()).collect();
            Ok(json_response(
                StatusCode::OK,
                &list_object(t.res, &items, &app.store.revision().to_string(), None),
            ))
        }
    }
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

fn check_preconditions(res: Res, name: &str, obj: &Value, pre: &Value) -> Result<()> {
    if let Some(uid) = pre["uid"].as_str()
        && obj["metadata"]["uid"] != uid
    {
        return Err(ApiError::conflict(
            res,
            name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                obj["metadata"]["uid"].as_str().unwrap_or_default()
            ),
        ));
    }
    if let Some(rv) = pre["resourceVersion"].as_str()
        && obj["metadata"]["resourceVersion"] != rv
    {
        return Err(ApiError::conflict(
            res,
            name,
            &format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                obj["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

fn get(app: &App, t: &Target, accept: &str, q: &Query) -> Result<Response> {
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

pub fn list_object(res: Res, items: &[&Value], rv: &str, cont: Option<&str>) -> Value {
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

/// The `labelSelector` and `fieldSelector` of a request.
///
/// # Errors
/// 400 when either does not parse.
pub(crate) fn selectors(q: &Query, res: Res) -> Result<(LabelSelector, FieldSelector)> {
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or_default();
    Ok((
        LabelSelector::parse(get("labelSelector"))?,
        FieldSelector::parse(get("fieldSelector"), res)?,
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

fn list(app: &App, t: &Target, accept: &str, q: &Query) -> Result<Response> {
    let (label, field) = selectors(q, t.res)?;
    let limit: usize = match q.get("limit") {
        None => 0,
        Some(l) => l
            .parse()
            .map_err(|_| ApiError::bad_request(format!("limit must be a number, got {l:?}")))?,
    };
    let (rv, objects) = app.store.list(t.res, t.ns.as_deref());
    // Later pages report the first page's revision, so a watch started from the list
    // replays anything that changed while the pages were read.
    let (list_rv, after) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            let (first_rv, key) = decode_continue(c)?;
            if app.store.events_after(first_rv).is_err() {
                return Err(ApiError::gone(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                ));
            }
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

/// Reads the whole body. Past the limit the rest is read and dropped (up to a hard cap),
/// so the client gets its 413 rather than a broken connection.
async fn read_body(app: &App, req: Request) -> Result<(HeaderMap, Bytes)> {
    let (parts, mut body) = req.into_parts();
    let hard_cap = app.max_body.saturating_mul(8);
    let mut buf = bytes::BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if total > hard_cap {
                return Err(ApiError::too_large(app.max_body));
            }
            if total <= app.max_body {
                buf.extend_from_slice(&data);
            }
        }
    }
    if total > app.max_body {
        return Err(ApiError::too_large(app.max_body));
    }
    Ok((parts.headers, buf.freeze()))
}

/// Reads a JSON (or YAML) object body for create and update.
async fn read_object(app: &App, req: Request) -> Result<Value> {
    let (headers, bytes) = read_body(app, req).await?;
    let ct = header_str(&headers, header::CONTENT_TYPE);
    let mime = ct.split(';').next().unwrap_or_default().trim();
    let format = match mime {
        "" | "application/json" => Format::Json,
        "application/yaml" | "application/x-yaml" | "text/yaml" => Format::Yaml,
        other => {
            return Err(ApiError::unsupported_media_type(format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {other})"
            )));
        }
    };
    let value = decode(bytes, format).await?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

/// DeleteOptions in the body, if any (kubectl and kube-rs send them without TypeMeta).
async fn read_delete_options(app: &App, req: Request) -> Result<Value> {
    let (_, bytes) = read_body(app, req).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let v = decode(bytes, Format::Json).await?;
    if !v.is_object() {
        return Err(ApiError::bad_request("DeleteOptions must be a JSON object"));
    }
    Ok(v)
}

async fn patch(app: &App, t: &Target, req: Request, ctx: WriteCtx, q: &Query) -> Result<Response> {
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
                let mut body = body;
                write::check_type(res, &mut body)?;
                if write::name_of(&body) != name {
                    return Err(ApiError::bad_request(format!("the name of the object ({}) does not match the name on the URL ({name})", write::name_of(&body))));
                }
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
                    let mut body = body;
                    write::check_type(res, &mut body)?;
                    if write::name_of(&body) != name {
                        return Err(ApiError::bad_request(format!("the name of the object ({}) does not match the name on the URL ({name})", write::name_of(&body))));
                    }
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

/// The device join: `POST /portway/v1/join/challenge` `{"joinToken"}` → `{"nonce"}`;
/// `POST /portway/v1/join` with the signed request → `{"token", "namespace",
/// "connector"}`; `POST /portway/v1/jointokens` (admin) `{"namespace", "ttlSeconds",
/// "uses"}` → `{"token", "expires"}`. See [`devices`].
async fn join(app: &Arc<App>, req: Request) -> Result<Response> {
    let path = req.uri().path().to_owned();
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (_, bytes) = read_body(app, req).await?;
    let parse = |what: &str| -> Result<Value> {
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("{what}: invalid JSON body: {e}")))
    };
    match path.as_str() {
        "/portway/v1/join/challenge" => {
            let v = parse("join challenge")?;
            let token = v["joinToken"].as_str().unwrap_or_default();
            let (nonce, ns) = app.devices.challenge(token)?;
            Ok(json_response(
                StatusCode::OK,
                &json!({"nonce": nonce, "namespace": ns}),
            ))
        }
        "/portway/v1/join" => {
            let r: JoinRequest = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::bad_request(format!("join request: {e}")))?;
            let ns = app.devices.verify_join(&r)?;
            portway_api::validation::dns1123_subdomain(&r.connector)
                .map_err(|e| ApiError::bad_request(format!("connector: {e}")))?;
            let uid = ensure_connector(app, &ns, &r).await?;
            let token = app.devices.bind(
                &r.join_token,
                devices::Binding {
                    ns: ns.clone(),
                    connector: r.connector.clone(),
                    connector_uid: uid,
                    node_id: r.node_id.to_ascii_lowercase(),
                },
            )?;
            tracing::info!(project = %ns, connector = %r.connector, node_id = %r.node_id, "device joined");
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"token": token, "namespace": ns, "connector": r.connector}),
            ))
        }
        "/portway/v1/jointokens" => {
            let user = app
                .tokens
                .authenticate(bearer.as_deref())
                .ok_or_else(ApiError::unauthorized)?;
            if !user.roles.contains(&crate::auth::Role::Admin) {
                return Err(ApiError::forbidden(format!(
                    "User \"{}\" cannot create join tokens: only admins can",
                    user.name
                )));
            }
            let v = parse("join token request")?;
            let ns = v["namespace"].as_str().unwrap_or_default();
            if app.store.get(registry().namespaces(), "", ns).is_none() {
                return Err(ApiError::namespace_not_found(ns));
            }
            let ttl = std::time::Duration::from_secs(v["ttlSeconds"].as_u64().unwrap_or(3600));
            if ttl > devices::MAX_JOIN_TTL {
                return Err(ApiError::bad_request("ttlSeconds: at most 604800 (7 days)"));
            }
            let uses = u32::try_from(v["uses"].as_u64().unwrap_or(1))
                .ok()
                .filter(|u| (1..=1000).contains(u))
                .ok_or_else(|| ApiError::bad_request("uses: from 1 to 1000"))?;
            let (token, expires) = app.devices.create_join_token(ns, ttl, uses)?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"token": token, "namespace": ns, "expires": expires, "uses": uses}),
            ))
        }
        _ => Err(ApiError::path_not_found()),
    }
}

/// The Connector a joining device is bound to: created when absent; an existing one is
/// taken only if no other device reported its NodeID there.
async fn ensure_connector(app: &Arc<App>, ns: &str, r: &JoinRequest) -> Result<String> {
    let res = connectors_res().ok_or_else(|| ApiError::internal("Connector is not served"))?;
    let uid_of = |c: &Value| c["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
    if let Some(c) = app.store.get(res, ns, &r.connector) {
        let id = c["status"]["connectionDetails"]["publicKey"]["id"].as_str();
        if id.is_some_and(|id| !id.eq_ignore_ascii_case(&r.node_id)) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!(
                    "connector {} in project {ns} belongs to another device; join with another name",
                    r.connector
                ),
            ));
        }
        return Ok(uid_of(&c));
    }
    let ctx = WriteCtx {
        res,
        ns: ns.to_owned(),
        manager: portway_api::managers::AGENT.into(),
        validation: FieldValidation::Strict,
        dry_run: false,
        now: write::now(),
        guard: None,
    };
    let body = json!({
        "apiVersion": "networking.datumapis.com/v1alpha1", "kind": "Connector",
        "metadata": {"name": r.connector, "namespace": ns},
        "spec": {"connectorClassName": r.connector_class_name.as_deref().unwrap_or(portway_api::DEFAULT_CLASS)},
    });
    let created = app
        .store
        .write(move |txn| write::create(txn, &ctx, body))
        .await?;
    Ok(uid_of(&created))
}

fn connectors_res() -> Option<Res> {
    registry().by_key("connectors.networking.datumapis.com")
}
