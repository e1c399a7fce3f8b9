//! Kubernetes `Status` errors: every failure leaves the server as one of these.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use portway_api::FieldError;
use serde_json::{Value, json};

use crate::registry::Res;

/// A failed request, rendered as a `metav1.Status` with the matching HTTP code.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: StatusCode,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

impl ApiError {
    pub fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    pub fn not_found(res: Res, name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} \"{name}\" not found", res.key()),
        )
        .with_details(res, name)
    }

    pub fn namespace_not_found(ns: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("namespaces \"{ns}\" not found"),
        )
        .with_details_raw("", "namespaces", ns)
    }

    pub fn path_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    pub fn already_exists(res: Res, name: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", res.key()),
        )
        .with_details(res, name)
    }

    pub fn conflict(res: Res, name: &str, why: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                res.key()
            ),
        )
        .with_details(res, name)
    }

    pub fn invalid(res: Res, name: &str, errors: &[FieldError]) -> Self {
        let list = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let message = if errors.len() == 1 {
            format!("{} \"{name}\" is invalid: {list}", res.kind)
        } else {
            format!("{} \"{name}\" is invalid: [{list}]", res.kind)
        };
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| json!({"reason": e.kind.reason(), "message": e.message, "field": e.field}))
            .collect();
        Self {
            code: StatusCode::UNPROCESSABLE_ENTITY,
            reason: "Invalid",
            message,
            details: Some(
                json!({"name": name, "group": res.group, "kind": res.kind, "causes": causes}),
            ),
        }
    }

    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "Forbidden", message)
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GONE, "Expired", message)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            message,
        )
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", message)
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    }

    /// A request for a `resourceVersion` the store has not reached, even after waiting: what
    /// Kubernetes' watch cache answers (`NewTooLargeResourceVersionError`), so that clients
    /// retry after a second.
    pub fn too_large_resource_version(requested: u64, current: u64) -> Self {
        Self {
            code: StatusCode::GATEWAY_TIMEOUT,
            reason: "Timeout",
            message: format!(
                "Timeout: Too large resource version: {requested}, current: {current}"
            ),
            details: Some(json!({
                "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                "retryAfterSeconds": 1,
            })),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", message)
    }

    fn with_details(self, res: Res, name: &str) -> Self {
        self.with_details_raw(res.group, res.plural, name)
    }

    /// Names the object in `details`, as Kubernetes does (`kind` is the plural).
    pub fn with_details_raw(mut self, group: &str, kind: &str, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": group, "kind": kind}));
        self
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.code.as_u16(),
            self.reason,
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.to_status()).unwrap_or_default();
        let mut response = (
            self.code,
            [(http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        // As kube-apiserver: client-go retries 429 and 5xx after the header's delay.
        if let Some(after) = self
            .details
            .as_ref()
            .and_then(|d| d["retryAfterSeconds"].as_u64())
        {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, after.into());
        }
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::from(&e)
    }
}

impl From<&crate::store::StoreError> for ApiError {
    fn from(e: &crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            // What kube-apiserver answers when etcd refuses a request as too large.
            StoreError::TooLarge { .. } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                e.to_string(),
            ),
            // As kube-apiserver on an etcd timeout: the client reads and decides.
            StoreError::Unknown(_) => {
                Self::new(StatusCode::GATEWAY_TIMEOUT, "Timeout", e.to_string())
            }
            StoreError::Busy(_) => Self {
                code: StatusCode::SERVICE_UNAVAILABLE,
                reason: "ServiceUnavailable",
                message: e.to_string(),
                details: Some(json!({"retryAfterSeconds": 1})),
            },
            _ => {
                tracing::error!(error = %e, "storage failure");
                Self::internal(format!("storage failure: {e}"))
            }
        }
    }
}
