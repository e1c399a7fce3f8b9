//! Request bodies: read within the size limit, then decoded (JSON, YAML or Kubernetes
//! protobuf) as an object or as DeleteOptions.

use axum::extract::Request;
use bytes::Bytes;
use http::{HeaderMap, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::header_str;
use crate::app::App;
use crate::decode::{Format, decode};
use crate::error::{ApiError, Result};
use crate::protobuf;
use crate::write::FieldValidation;

/// Reads the whole body. Past the limit the rest is read and dropped (up to a hard cap),
/// so the client gets its 413 rather than a broken connection.
pub(super) async fn read_body(app: &App, req: Request) -> Result<(HeaderMap, Bytes)> {
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

/// The media type of the body, without parameters.
fn mime(headers: &HeaderMap) -> &str {
    let ct = header_str(headers, header::CONTENT_TYPE);
    ct.split(';').next().unwrap_or_default().trim()
}

/// Reads an object body for create and update: JSON, YAML, or for a kind with a protobuf
/// `message`, Kubernetes protobuf (unknown field numbers refused under `Strict`).
pub(super) async fn read_object(
    app: &App,
    req: Request,
    message: Option<&'static protobuf::Message>,
    validation: FieldValidation,
) -> Result<Value> {
    let (headers, bytes) = read_body(app, req).await?;
    let format = match (mime(&headers), message) {
        ("" | "application/json", _) => Format::Json,
        ("application/yaml" | "application/x-yaml" | "text/yaml", _) => Format::Yaml,
        (protobuf::MEDIA_TYPE, Some(message)) => Format::Protobuf {
            message,
            strict: validation == FieldValidation::Strict,
        },
        (other, _) => {
            return Err(ApiError::unsupported_media_type(format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml{} (got {other})",
                if message.is_some() {
                    format!(", {}", protobuf::MEDIA_TYPE)
                } else {
                    String::new()
                }
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

/// DeleteOptions in the body, if any (kubectl and kube-rs send them as JSON without
/// TypeMeta; client-go's typed clients as protobuf).
pub(super) async fn read_delete_options(app: &App, req: Request) -> Result<Value> {
    let (headers, bytes) = read_body(app, req).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let format = if mime(&headers) == protobuf::MEDIA_TYPE {
        Format::Protobuf {
            message: &protobuf::DELETE_OPTIONS,
            // As in Kubernetes, where options it does not know are ignored.
            strict: false,
        }
    } else {
        Format::Json
    };
    let v = decode(bytes, format).await?;
    if !v.is_object() {
        return Err(ApiError::bad_request("DeleteOptions must be a JSON object"));
    }
    Ok(v)
}
