//! HTTP surface: authentication, URL parsing and content negotiation; the verbs' handlers
//! are in [`reads`] and [`writes`], the device join in [`join`], the reviews behind
//! `kubectl auth` in [`reviews`], the read-only CRDs in [`crds`]. Every error leaves as a
//! Kubernetes `Status`.

mod body;
mod crds;
mod join;
mod reads;
mod reviews;
mod writes;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Method, StatusCode, header};
use serde_json::{Value, json};

use crate::app::{App, Query, flag, parse_query};
use crate::auth::{Access, User, Verb, authorize};
use crate::discovery;
use crate::error::{ApiError, Result};
use crate::registry::{Res, registry};
use crate::table;
use crate::watch;

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
        return match join::join(&app, req).await {
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
        [
            "apis",
            "authorization.k8s.io",
            "v1",
            "selfsubjectaccessreviews",
        ] => reviews::access(app, user, req).await,
        ["apis", "authentication.k8s.io", "v1", "selfsubjectreviews"] => {
            reviews::whoami(app, user, req).await
        }
        [
            "apis",
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            rest @ ..,
        ] => crds::serve(app, &req, rest),
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
            status: t.status,
        },
    )?;
    let accept = header_str(req.headers(), header::ACCEPT).to_owned();
    let write = |headers: &HeaderMap| writes::Write::new(app, user, &t, &q, headers);
    match verb {
        Verb::Get => reads::get(app, &t, &accept, &q),
        Verb::List => reads::list(app, &t, &accept, &q).await,
        Verb::Watch => watch::serve(app, t.res, t.ns.clone(), &q, table::wants_table(&accept)),
        Verb::Create => writes::create(write(req.headers())?, req).await,
        Verb::Update => writes::update(write(req.headers())?, req).await,
        Verb::Patch => writes::patch(write(req.headers())?, req).await,
        Verb::Delete => writes::delete(write(req.headers())?, req).await,
        Verb::DeleteCollection => writes::delete_collection(write(req.headers())?, req).await,
    }
}

fn connectors_res() -> Option<Res> {
    registry().by_key("connectors.networking.datumapis.com")
}
