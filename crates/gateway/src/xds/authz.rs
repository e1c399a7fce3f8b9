//! Envoy's external authorization, answered by the xDS server for the AccessPolicy rules
//! Envoy's own filters cannot express alike: basic auth against bcrypt and Argon2 hashes
//! (Envoy's `basic_auth` takes only `{SHA}`); bearer JWTs (`jwt_authn` could verify
//! them, but not match a claim in a list for `requiredClaims` without a second RBAC
//! stage, and the identity the app is sent must be signed after sign-in, which no Envoy
//! filter does); and rate limits (`local_ratelimit` keeps a
//! bucket per Envoy, so N Envoys would allow N times the rate, and has no bucket per
//! client without dynamic descriptors; here the xDS server's buckets are shared by every
//! Envoy it feeds, and `Retry-After` is exact). Envoy asks over the same gRPC connection
//! it takes its configuration from; the route names its policy in the check's context,
//! and the answer comes from the same code the built-in edge runs.

use std::sync::Arc;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, address, header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse, check_response,
};
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode};
use envoy_types::pb::google::rpc::Status;
use http::HeaderMap;

use crate::model::Table;
use crate::policy::Denied;

/// The context key a route's check carries its policy's `namespace/name` under.
pub const POLICY_KEY: &str = "portway.dev/access-policy";

/// gRPC status codes of an answer.
const OK: i32 = 0;
const PERMISSION_DENIED: i32 = 7;
const RESOURCE_EXHAUSTED: i32 = 8;
const UNAUTHENTICATED: i32 = 16;

pub struct Authz {
    table: Arc<ArcSwap<Table>>,
}

pub fn service(table: Arc<ArcSwap<Table>>) -> AuthorizationServer<Authz> {
    AuthorizationServer::new(Authz { table })
}

#[tonic::async_trait]
impl Authorization for Authz {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let attributes = request.into_inner().attributes.unwrap_or_default();
        let Some(name) = attributes.context_extensions.get(POLICY_KEY) else {
            return Ok(tonic::Response::new(refused(
                "this route names no access policy",
            )));
        };
        // A policy that is gone or did not compile refuses: never served unguarded.
        let Some(policy) = self.table.load().policies.get(name).cloned() else {
            return Ok(tonic::Response::new(refused(&format!(
                "the access policy {name} is not in force"
            ))));
        };
        let mut headers = HeaderMap::new();
        let http = attributes.request.and_then(|r| r.http).unwrap_or_default();
        for (k, v) in &http.headers {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                headers.append(k, v);
            }
        }
        // The downstream peer as Envoy saw it (Envoy takes no X-Forwarded-For from
        // clients: `use_remote_address`).
        let client = attributes
            .source
            .and_then(|p| p.address)
            .and_then(|a| match a.address {
                Some(address::Address::SocketAddress(s)) => {
                    s.address.parse::<std::net::IpAddr>().ok()
                }
                _ => None,
            });
        let Some(client) = client else {
            return Ok(tonic::Response::new(refused(
                "Envoy named no client address",
            )));
        };
        let table = self.table.load();
        let method = http::Method::from_bytes(http.method.as_bytes()).unwrap_or(http::Method::GET);
        let identity = crate::policy::Identity {
            signer: table.identity.as_deref(),
            host: &http.host,
            method: &method,
            path: &http.path,
            // Envoy sets X-Forwarded-Proto from the connection (use_remote_address), where
            // `:scheme` is the client's to write over HTTP/2.
            scheme: match http.headers.get("x-forwarded-proto").map(String::as_str) {
                Some("https") => "https",
                Some(_) => "http",
                None if http.scheme == "https" => "https",
                None => "http",
            },
        };
        let grant = match policy
            .authenticate(&headers, client.to_canonical(), identity)
            .await
        {
            Ok(g) => g,
            Err(d) => return Ok(tonic::Response::new(denied(&http.host, d))),
        };
        // A header both removed and set is set: Envoy applies removals last.
        let remove = grant
            .remove
            .iter()
            .filter(|n| !grant.set.iter().any(|(s, _)| s == *n))
            .map(|n| n.as_str().to_owned())
            .collect();
        let set = grant
            .set
            .iter()
            .filter_map(|(n, v)| Some(header(n.as_str(), v.to_str().ok()?)))
            .collect();
        Ok(tonic::Response::new(CheckResponse {
            status: Some(Status {
                code: OK,
                ..Default::default()
            }),
            http_response: Some(check_response::HttpResponse::OkResponse(OkHttpResponse {
                headers_to_remove: remove,
                headers: set,
                ..Default::default()
            })),
            ..Default::default()
        }))
    }
}

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// The answer Envoy gives the client for a rule that failed, as the edge would.
fn denied(host: &str, d: Denied) -> CheckResponse {
    let mut headers = vec![header("content-type", "text/plain; charset=utf-8")];
    // Appended: an answer may carry several (two Set-Cookie on a sign-in).
    for (name, value) in &d.headers {
        if let Ok(value) = value.to_str() {
            let mut h = header(name.as_str(), value);
            h.append_action = HeaderAppendAction::AppendIfExistsOrAdd as i32;
            headers.push(h);
        }
    }
    let host = crate::edge::host_name(host);
    CheckResponse {
        status: Some(Status {
            code: match d.status {
                http::StatusCode::UNAUTHORIZED => UNAUTHENTICATED,
                http::StatusCode::TOO_MANY_REQUESTS => RESOURCE_EXHAUSTED,
                _ => PERMISSION_DENIED,
            },
            message: d.message.clone(),
            ..Default::default()
        }),
        http_response: Some(check_response::HttpResponse::DeniedResponse(
            DeniedHttpResponse {
                status: Some(HttpStatus {
                    code: i32::from(d.status.as_u16()),
                }),
                headers,
                body: format!("{host}: {}", d.message),
            },
        )),
        ..Default::default()
    }
}

fn refused(why: &str) -> CheckResponse {
    CheckResponse {
        status: Some(Status {
            code: PERMISSION_DENIED,
            message: why.to_owned(),
            ..Default::default()
        }),
        http_response: Some(check_response::HttpResponse::DeniedResponse(
            DeniedHttpResponse {
                status: Some(HttpStatus {
                    code: StatusCode::InternalServerError as i32,
                }),
                body: why.to_owned(),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}
