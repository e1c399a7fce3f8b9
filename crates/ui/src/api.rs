//! The page and its JSON API (see the README's "The local UI"): `/api/info`,
//! `/api/tunnels`, `/api/requests`, and `/api/events`, a server-sent event stream of each
//! request as it completes and of the tunnels every second.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use futures::{Stream, StreamExt};
use http::{StatusCode, header};
use kube::api::Api;
use portway_agent::Tunnel;
use portway_agent::inspect::Record;
use portway_agent::tap::Body;
use portway_api::{Connector, HttpProxy, TcpProxy};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::State as Ui;

type Shared = State<Arc<Ui>>;

const INDEX: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");

/// Shown for a masked header's value; sent back in an edited replay, it means "the
/// original value".
pub const MASK: &str = "••••••";

/// Headers whose values are credentials: masked unless revealed.
const SECRET_HEADERS: [&str; 7] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-auth-token",
    portway_api::access::IDENTITY_HEADER,
];

/// How long the objects' conditions are reused.
const CONDITIONS_TTL: Duration = Duration::from_secs(2);

pub fn router(state: Arc<Ui>) -> Router {
    Router::new()
        .route("/", get(index))
        .route(
            "/app.js",
            get(|| async { asset("text/javascript", APP_JS) }),
        )
        .route("/app.css", get(|| async { asset("text/css", APP_CSS) }))
        .route("/api/info", get(info))
        .route("/api/tunnels", get(tunnels).post(add_tunnel))
        .route(
            "/api/tunnels/{name}",
            axum::routing::put(edit_tunnel).delete(remove_tunnel),
        )
        .route("/api/tunnels/{name}/pause", post(pause))
        .route("/api/requests", get(requests).delete(clear))
        .route("/api/requests/{id}", get(request))
        .route("/api/requests/{id}/replay", post(replay))
        .route("/api/events", get(events))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::guard::layer,
        ))
        .with_state(state)
}

/// An error as the API answers it: `{"error": "...", "field": "..."}`.
pub fn error(status: StatusCode, why: impl Into<String>, field: Option<&str>) -> Response {
    let mut body = json!({"error": why.into()});
    if let Some(f) = field {
        body["field"] = json!(f);
    }
    (status, axum::Json(body)).into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn index(State(ui): Shared) -> Response {
    let page = INDEX.replace("{{TOKEN}}", &ui.token);
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
}

async fn info(State(ui): Shared) -> axum::Json<Value> {
    let a = &ui.agent;
    axum::Json(json!({
        "device": a.registered().map(|r| r.connector),
        "project": a.project(),
        "node_id": a.node_id().to_string(),
        "state": a.state(),
        "mode": ui.options.mode,
        "editable": ui.options.config_file.is_some(),
        "config_file": ui.options.config_file,
    }))
}

/// One condition of one of a tunnel's objects.
#[derive(Clone, Debug, Serialize)]
pub struct ConditionView {
    object: &'static str,
    #[serde(rename = "type")]
    type_: String,
    status: String,
    reason: String,
    message: String,
}

/// What the API said of the connector and of each tunnel's proxy, and the hostnames
/// each proxy is served at.
#[derive(Clone, Debug, Default)]
pub struct Conditions {
    connector: Vec<ConditionView>,
    proxies: HashMap<String, (Vec<ConditionView>, Vec<String>)>,
}

fn views(
    object: &'static str,
    c: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Vec<ConditionView> {
    c.iter()
        .map(|c| ConditionView {
            object,
            type_: c.type_.clone(),
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
        .collect()
}

/// The conditions, read again when older than a couple of seconds; on an API error the
/// last ones (or none) stand.
async fn conditions(ui: &Ui, tunnels: &[Tunnel]) -> Conditions {
    let mut cached = ui.conditions.lock().await;
    if let Some((at, c)) = cached.as_ref()
        && at.elapsed() < CONDITIONS_TTL
    {
        return c.clone();
    }
    let Some(reg) = ui.agent.registered() else {
        return Conditions::default();
    };
    let client = ui.agent.client();
    let mut out = Conditions::default();
    let read = async {
        let connectors: Api<Connector> = Api::namespaced(client.clone(), &reg.project);
        if let Some(c) = connectors.get_opt(&reg.connector).await? {
            out.connector = views(
                "Connector",
                &c.status.map(|s| s.conditions).unwrap_or_default(),
            );
        }
        let http: Api<HttpProxy> = Api::namespaced(client.clone(), &reg.project);
        let tcp: Api<TcpProxy> = Api::namespaced(client.clone(), &reg.project);
        for t in tunnels {
            let name = portway_agent::objects::object_name(&reg.connector, &t.name);
            let found = if t.protocol == portway_agent::Protocol::Http {
                http.get_opt(&name).await?.map(|p| {
                    let s = p.status.unwrap_or_default();
                    (views("HTTPProxy", &s.conditions), s.hostnames)
                })
            } else {
                tcp.get_opt(&name).await?.map(|p| {
                    let s = p.status.unwrap_or_default();
                    (views("TCPProxy", &s.conditions), Vec::new())
                })
            };
            if let Some(found) = found {
                out.proxies.insert(t.name.clone(), found);
            }
        }
        Ok::<_, kube::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(3), read).await {
        Ok(Ok(())) => {
            *cached = Some((Instant::now(), out.clone()));
            out
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "reading the tunnels' conditions");
            cached.as_ref().map(|c| c.1.clone()).unwrap_or_default()
        }
        Err(_) => cached.as_ref().map(|c| c.1.clone()).unwrap_or_default(),
    }
}

/// Every tunnel as the Tunnels page shows it.
async fn tunnels_json(ui: &Ui) -> Value {
    let tunnels = ui.agent.tunnels();
    let conditions = conditions(ui, &tunnels).await;
    let state = ui.agent.state();
    let paths: Vec<Value> = ui
        .agent
        .paths()
        .into_iter()
        .map(|p| {
            json!({
                "gateway": p.gateway.fmt_short().to_string(),
                "path": p.path,
                "rtt_ms": p.rtt.map(|r| (r.as_secs_f64() * 10_000.0).round() / 10.0),
            })
        })
        .collect();
    let history = ui.history.lock().clone();
    let flags: Vec<&str> = ui
        .options
        .flag_tunnels
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    let list: Vec<Value> = tunnels
        .iter()
        .map(|t| {
            let traffic = ui.agent.traffic().of(&t.name);
            let load =
                |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            let samples: Vec<crate::Sample> = history
                .get(&t.name)
                .map(|(_, s)| s.iter().copied().collect())
                .unwrap_or_default();
            // Over the last five seconds, so a burst does not flicker.
            let recent: Vec<&crate::Sample> = samples.iter().rev().take(5).collect();
            let per_s = if recent.is_empty() {
                0.0
            } else {
                recent.iter().map(|s| s.requests).sum::<u64>() as f64 / recent.len() as f64
            };
            let (proxy_conditions, served) =
                conditions.proxies.get(&t.name).cloned().unwrap_or_default();
            let mut all = conditions.connector.clone();
            all.extend(proxy_conditions.iter().cloned());
            let refused = proxy_conditions.iter().find(|c| {
                matches!(c.type_.as_str(), "Accepted" | "Programmed") && c.status == "False"
            });
            let (word, detail) = if traffic.paused() {
                (
                    "paused",
                    "paused here: the public URL answers 503".to_owned(),
                )
            } else if state.starts_with("reconnecting") {
                ("reconnecting", state.clone())
            } else if state != "online" {
                ("starting", state.clone())
            } else if let Some(c) = refused {
                ("refused", format!("{}: {}", c.reason, c.message))
            } else {
                ("online", String::new())
            };
            let urls = ui.options.urls.get(&t.name).cloned().unwrap_or_else(|| {
                let hosts = if served.is_empty() {
                    &t.hostnames
                } else {
                    &served
                };
                hosts.iter().map(|h| format!("http://{h}/")).collect()
            });
            json!({
                "name": t.name,
                "protocol": t.protocol.as_str(),
                "target": t.target.to_string(),
                "urls": urls,
                "hostnames": t.hostnames,
                "state": word,
                "state_detail": detail,
                "paused": traffic.paused(),
                "editable": ui.options.config_file.is_some() && !flags.contains(&t.name.as_str()),
                "source": if flags.contains(&t.name.as_str()) { "flag" } else { "file" },
                "paths": paths,
                "requests": load(&traffic.requests),
                "requests_per_s": per_s,
                "bytes_in": load(&traffic.bytes_in),
                "bytes_out": load(&traffic.bytes_out),
                "history": samples,
                "conditions": all,
            })
        })
        .collect();
    json!({ "tunnels": list })
}

async fn tunnels(State(ui): Shared) -> axum::Json<Value> {
    axum::Json(tunnels_json(&ui).await)
}

async fn one_tunnel(ui: &Ui, name: &str) -> Option<Value> {
    let mut all = tunnels_json(ui).await;
    let list = all.get_mut("tunnels")?.as_array_mut()?;
    let i = list.iter().position(|t| t["name"] == name)?;
    Some(list.swap_remove(i))
}

#[derive(Deserialize)]
struct PauseBody {
    paused: bool,
}

async fn pause(
    State(ui): Shared,
    Path(name): Path<String>,
    body: axum::Json<PauseBody>,
) -> Response {
    let tunnels = ui.agent.tunnels();
    let Some(tunnel) = tunnels.iter().find(|t| t.name == name) else {
        return error(StatusCode::NOT_FOUND, format!("no tunnel {name:?}"), None);
    };
    // The edge asks the device for a target, not a tunnel: tunnels to one target are one
    // to the device, and are switched together.
    let udp = tunnel.protocol == portway_agent::Protocol::Udp;
    for t in tunnels.iter().filter(|t| {
        t.target == tunnel.target && (t.protocol == portway_agent::Protocol::Udp) == udp
    }) {
        ui.agent.traffic().of(&t.name).set_paused(body.paused);
    }
    tracing::info!(tunnel = %name, paused = body.paused, "tunnel switched in the local UI");
    match one_tunnel(&ui, &name).await {
        Some(t) => axum::Json(t).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no tunnel {name:?}"), None),
    }
}

async fn add_tunnel(State(ui): Shared, body: axum::Json<crate::file::TunnelForm>) -> Response {
    let name = body.name.clone();
    edited(&ui, StatusCode::CREATED, Some(&name), |text| {
        crate::file::add(text, &body)
    })
    .await
}

async fn edit_tunnel(
    State(ui): Shared,
    Path(name): Path<String>,
    body: axum::Json<crate::file::TunnelForm>,
) -> Response {
    edited(&ui, StatusCode::OK, Some(&name), |text| {
        crate::file::edit(text, &name, &body)
    })
    .await
}

async fn remove_tunnel(State(ui): Shared, Path(name): Path<String>) -> Response {
    edited(&ui, StatusCode::NO_CONTENT, None, |text| {
        crate::file::remove(text, &name)
    })
    .await
}

/// Rewrites the config file with `change`, checks the result as the agent reads it, and
/// applies it at once (the agent's own watch of the file then finds nothing new).
async fn edited(
    ui: &Ui,
    status: StatusCode,
    show: Option<&str>,
    change: impl FnOnce(&str) -> Result<String, crate::file::EditError>,
) -> Response {
    let Some(path) = ui.options.config_file.clone() else {
        return error(
            StatusCode::CONFLICT,
            "tunnels are edited in the agent's config file: start `portway agent` with --config FILE",
            None,
        );
    };
    let flags = &ui.options.flag_tunnels;
    match crate::file::apply(&path, flags, change) {
        Ok(tunnels) => {
            ui.agent.set_tunnels(tunnels);
            match show {
                Some(name) => match one_tunnel(ui, name).await {
                    Some(t) => (status, axum::Json(t)).into_response(),
                    None => status.into_response(),
                },
                None => status.into_response(),
            }
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    tunnel: Option<String>,
    limit: Option<usize>,
}

/// A request's line in the list.
pub fn summary(r: &Record) -> Value {
    let e = &r.exchange;
    let host = header_text(&e.request_headers, "host");
    json!({
        "id": r.id,
        "tunnel": r.tunnel,
        "started": rfc3339(e.started),
        "method": e.method,
        "path": e.target,
        "host": host,
        "status": e.status,
        "duration_ms": (e.duration.as_secs_f64() * 10_000.0).round() / 10.0,
        "request_bytes": e.request_body.size,
        "response_bytes": e.response_body.size,
        "client": r.client,
        "replay_of": r.replay_of,
        "error": e.error,
    })
}

fn rfc3339(t: SystemTime) -> String {
    let ms = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
    k8s_openapi::jiff::Timestamp::from_millisecond(ms)
        .map(|t| format!("{t:.3}"))
        .unwrap_or_default()
}

fn header_text(headers: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

fn inspector_off() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "the inspector is off in this agent",
        None,
    )
}

async fn requests(State(ui): Shared, Query(q): Query<ListQuery>) -> Response {
    let Some(inspector) = ui.agent.inspector() else {
        return inspector_off();
    };
    let list: Vec<Value> = inspector
        .list()
        .iter()
        .filter(|r| q.tunnel.as_ref().is_none_or(|t| &r.tunnel == t))
        .take(q.limit.unwrap_or(500))
        .map(|r| summary(r))
        .collect();
    axum::Json(json!({ "requests": list })).into_response()
}

async fn clear(State(ui): Shared) -> Response {
    let Some(inspector) = ui.agent.inspector() else {
        return inspector_off();
    };
    inspector.clear();
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct DetailQuery {
    reveal: Option<String>,
}

fn body_json(body: &Body, headers: &[(String, Vec<u8>)]) -> Value {
    let mut v = json!({
        "size": body.size,
        "truncated": body.truncated,
        "content_type": header_text(headers, "content-type"),
    });
    match std::str::from_utf8(&body.bytes) {
        Ok(text) => v["text"] = json!(text),
        // A capture may end inside a character: the whole characters before it are text.
        Err(e) if body.truncated && e.error_len().is_none() => {
            v["text"] = json!(String::from_utf8_lossy(&body.bytes[..e.valid_up_to()]));
        }
        Err(_) => {
            v["base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&body.bytes))
        }
    }
    v
}

fn secret(name: &str) -> bool {
    SECRET_HEADERS.iter().any(|s| s.eq_ignore_ascii_case(name))
}

/// Headers as `[name, value]` pairs, credentials masked unless `reveal`; and the masked
/// names.
fn headers_json(headers: &[(String, Vec<u8>)], reveal: bool, masked: &mut Vec<String>) -> Value {
    let pairs: Vec<Value> = headers
        .iter()
        .map(|(n, v)| {
            if !reveal && secret(n) {
                let lower = n.to_ascii_lowercase();
                if !masked.contains(&lower) {
                    masked.push(lower);
                }
                json!([n, MASK])
            } else {
                json!([n, String::from_utf8_lossy(v)])
            }
        })
        .collect();
    Value::Array(pairs)
}

/// The public URL a request was made at, from what the edge told the app.
fn public_url(r: &Record) -> Option<String> {
    let h = &r.exchange.request_headers;
    let host = header_text(h, "x-forwarded-host").or_else(|| header_text(h, "host"))?;
    let scheme = header_text(h, "x-forwarded-proto")
        .filter(|s| s == "https")
        .unwrap_or_else(|| "http".into());
    Some(format!("{scheme}://{host}{}", r.exchange.target))
}

async fn request(State(ui): Shared, Path(id): Path<u64>, Query(q): Query<DetailQuery>) -> Response {
    let Some(inspector) = ui.agent.inspector() else {
        return inspector_off();
    };
    let Some(r) = inspector.get(id) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no request {id} (the inspector keeps the latest 1000)"),
            None,
        );
    };
    // The guard checked the token for a reveal.
    let reveal = q.reveal.as_deref().is_some_and(|v| v == "1" || v == "true");
    let e = &r.exchange;
    let mut masked = Vec::new();
    let mut out = summary(&r);
    out["public_url"] = json!(public_url(&r));
    out["request"] = json!({
        "headers": headers_json(&e.request_headers, reveal, &mut masked),
        "body": body_json(&e.request_body, &e.request_headers),
    });
    out["response"] = match e.status {
        Some(status) => json!({
            "status": status,
            "headers": headers_json(&e.response_headers, reveal, &mut masked),
            "body": body_json(&e.response_body, &e.response_headers),
        }),
        None => Value::Null,
    };
    out["upgraded"] = json!(e.upgraded);
    out["masked"] = json!(masked);
    axum::Json(out).into_response()
}

/// An edited replay; anything left out is the original's.
#[derive(Debug, Default, Deserialize)]
pub struct ReplayEdit {
    pub method: Option<String>,
    pub path: Option<String>,
    pub headers: Option<Vec<(String, String)>>,
    pub body: Option<String>,
}

async fn replay(
    State(ui): Shared,
    Path(id): Path<u64>,
    body: Option<axum::Json<ReplayEdit>>,
) -> Response {
    let Some(inspector) = ui.agent.inspector() else {
        return inspector_off();
    };
    let Some(original) = inspector.get(id) else {
        return error(StatusCode::NOT_FOUND, format!("no request {id}"), None);
    };
    let Some(tunnel) = ui
        .agent
        .tunnels()
        .into_iter()
        .find(|t| t.name == original.tunnel)
    else {
        return error(
            StatusCode::CONFLICT,
            format!(
                "tunnel {:?} is gone: nothing to replay against",
                original.tunnel
            ),
            None,
        );
    };
    let edit = body.map(|b| b.0).unwrap_or_default();
    let request = match crate::replay::Request::of(&original.exchange, edit) {
        Ok(r) => r,
        Err((field, why)) => return error(StatusCode::UNPROCESSABLE_ENTITY, why, Some(field)),
    };
    let exchange = crate::replay::send(&tunnel.target, request).await;
    let failed = exchange.status.is_none();
    let record = inspector.record(&tunnel.name, exchange, Some(id));
    let status = if failed {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::CREATED
    };
    let mut out = summary(&record);
    if failed {
        out["error"] = json!(record.exchange.error);
    }
    (status, axum::Json(out)).into_response()
}

/// Each request as it completes (`request`), and the tunnels every second (`tunnels`).
async fn events(State(ui): Shared) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let requests = match ui.agent.inspector() {
        Some(i) => tokio_stream::wrappers::BroadcastStream::new(i.subscribe())
            .filter_map(|r| async move {
                // A viewer too slow for the feed misses some; the list reloads on `lagged`.
                Some(match r {
                    Ok(r) => Event::default()
                        .event("request")
                        .json_data(summary(&r))
                        .ok()?,
                    Err(_) => Event::default().event("lagged").data("{}"),
                })
            })
            .boxed(),
        None => futures::stream::pending().boxed(),
    };
    let weak = Arc::downgrade(&ui);
    let ticks =
        tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(Duration::from_secs(1)))
            .filter_map(move |_| {
                let ui = weak.upgrade();
                async move {
                    let ui = ui?;
                    let tunnels = tunnels_json(&ui).await;
                    Event::default().event("tunnels").json_data(tunnels).ok()
                }
            });
    let stream = futures::stream::select(requests, ticks).map(Ok);
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_masked_unless_revealed() {
        let h = vec![
            ("Authorization".to_owned(), b"Bearer abc".to_vec()),
            ("Cookie".to_owned(), b"s=1".to_vec()),
            ("Accept".to_owned(), b"*/*".to_vec()),
            ("portway-identity".to_owned(), b"eyJ".to_vec()),
        ];
        let mut masked = Vec::new();
        let v = headers_json(&h, false, &mut masked);
        assert_eq!(v[0], json!(["Authorization", MASK]));
        assert_eq!(v[2], json!(["Accept", "*/*"]));
        assert_eq!(v[3], json!(["portway-identity", MASK]));
        assert_eq!(masked, ["authorization", "cookie", "portway-identity"]);
        let mut masked = Vec::new();
        let v = headers_json(&h, true, &mut masked);
        assert_eq!(v[0], json!(["Authorization", "Bearer abc"]));
        assert!(masked.is_empty());
    }

    #[test]
    fn bodies_are_text_when_they_are_and_base64_when_not() {
        let text = Body {
            bytes: b"{\"a\":1}".to_vec(),
            size: 7,
            truncated: false,
        };
        assert_eq!(body_json(&text, &[])["text"], "{\"a\":1}");
        let binary = Body {
            bytes: vec![0xff, 0x00],
            size: 2,
            truncated: false,
        };
        assert_eq!(body_json(&binary, &[])["base64"], "/wA=");
        // Cut inside "é": still text, without the half character.
        let cut = Body {
            bytes: vec![b'a', 0xc3],
            size: 3,
            truncated: true,
        };
        assert_eq!(body_json(&cut, &[])["text"], "a");
    }
}
