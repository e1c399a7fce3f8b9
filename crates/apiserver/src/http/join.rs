//! The device join endpoints under `/portway/v1/`, which a device reaches before it has a
//! credential.

use std::sync::Arc;

use axum::extract::Request;
use axum::response::Response;
use http::{StatusCode, header};
use serde_json::{Value, json};

use super::body::read_body;
use super::{connectors_res, json_response};
use crate::app::App;
use crate::auth::Role;
use crate::devices::{self, JoinRequest};
use crate::error::{ApiError, Result};
use crate::registry::registry;
use crate::write::{self, FieldValidation, WriteCtx};

/// The device join: `POST /portway/v1/join/challenge` `{"joinToken"}` → `{"nonce"}`;
/// `POST /portway/v1/join` with the signed request → `{"token", "namespace",
/// "connector"}`; `POST /portway/v1/jointokens` (admin) `{"namespace", "ttlSeconds",
/// "uses"}` → `{"token", "expires"}`. See [`devices`].
pub(super) async fn join(app: &Arc<App>, req: Request) -> Result<Response> {
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
            let (nonce, ns) = app.devices.challenge(token).await?;
            Ok(json_response(
                StatusCode::OK,
                &json!({"nonce": nonce, "namespace": ns}),
            ))
        }
        "/portway/v1/join" => {
            let r: JoinRequest = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::bad_request(format!("join request: {e}")))?;
            let ns = app.devices.verify_join(&r).await?;
            portway_api::validation::dns1123_subdomain(&r.connector)
                .map_err(|e| ApiError::bad_request(format!("connector: {e}")))?;
            let uid = ensure_connector(app, &ns, &r).await?;
            let token = app
                .devices
                .bind(
                    &r.join_token,
                    devices::Binding {
                        ns: ns.clone(),
                        connector: r.connector.clone(),
                        connector_uid: uid,
                        node_id: r.node_id.to_ascii_lowercase(),
                    },
                )
                .await?;
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
            if !user.roles.contains(&Role::Admin) {
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
            let (token, expires) = app.devices.create_join_token(ns, ttl, uses).await?;
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
        .write(move |txn| write::create(txn, &ctx, body.clone()))
        .await?;
    Ok(uid_of(&created))
}
