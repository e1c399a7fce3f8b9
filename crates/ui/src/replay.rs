//! Replay: a recorded request sent again, as it was or edited, straight to the tunnel's
//! local target (never anywhere else), and its answer recorded like any other exchange.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use portway_agent::Target;
use portway_agent::inspect::BODY_CAP;
use portway_agent::tap::{Body, Exchange};

use crate::api::{MASK, ReplayEdit};

/// Time to connect to the app, and for its whole answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Connection-level headers: the replay's own connection sets its own.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// The request to send.
#[derive(Debug)]
pub struct Request {
    method: Method,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Request {
    /// The original, with `edit`'s changes; a header sent back as the mask keeps its
    /// original value.
    ///
    /// # Errors
    /// The field that cannot be used, and why.
    pub fn of(original: &Exchange, edit: ReplayEdit) -> Result<Self, (&'static str, String)> {
        if original.upgraded {
            return Err((
                "upgraded",
                "an upgraded exchange (WebSocket) cannot be replayed".into(),
            ));
        }
        let method = edit.method.unwrap_or_else(|| original.method.clone());
        let method = Method::from_bytes(method.trim().as_bytes())
            .map_err(|_| ("method", format!("{method:?} is not an HTTP method")))?;
        let path = edit.path.unwrap_or_else(|| original.target.clone());
        if !path.starts_with('/') || path.parse::<http::Uri>().is_err() {
            return Err((
                "path",
                format!("{path:?}: a path starting with / is wanted"),
            ));
        }
        let headers = match edit.headers {
            None => original.request_headers.clone(),
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (name, value) in list {
                    let name = name.trim().to_owned();
                    HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| ("headers", format!("{name:?} is not a header name")))?;
                    let value = if value == MASK {
                        original
                            .request_headers
                            .iter()
                            .find(|(n, _)| n.eq_ignore_ascii_case(&name))
                            .map(|(_, v)| v.clone())
                            .ok_or_else(|| {
                                (
                                    "headers",
                                    format!("{name}: the original has no value to keep"),
                                )
                            })?
                    } else {
                        HeaderValue::from_str(value.trim()).map_err(|_| {
                            (
                                "headers",
                                format!("{name}: the value is not a valid header value"),
                            )
                        })?;
                        value.trim().as_bytes().to_vec()
                    };
                    out.push((name, value));
                }
                out
            }
        };
        let body = match edit.body {
            Some(text) => text.into_bytes(),
            None if original.request_body.truncated => {
                return Err((
                    "body",
                    format!(
                        "the original body ({} bytes) was larger than the inspector keeps ({} bytes): edit it to replay",
                        original.request_body.size, BODY_CAP
                    ),
                ));
            }
            None => original.request_body.bytes.clone(),
        };
        Ok(Self {
            method,
            path,
            headers,
            body,
        })
    }
}

/// Sends `req` to `target` on a connection of its own; the exchange says what happened
/// (its `error` when no answer came).
pub async fn send(target: &Target, req: Request) -> Exchange {
    let at = Instant::now();
    let mut exchange = Exchange::new(
        req.method.to_string(),
        req.path.clone(),
        req.headers.clone(),
    );
    exchange.request_body.keep(&req.body, BODY_CAP);
    match tokio::time::timeout(ANSWER_TIMEOUT, exchange_with(target, req)).await {
        Ok(Ok((status, headers, body))) => {
            exchange.status = Some(status);
            exchange.response_headers = headers;
            exchange.response_body = body;
        }
        Ok(Err(why)) => exchange.error = Some(why),
        Err(_) => {
            exchange.error = Some(format!(
                "the app at {target} did not answer within {}s",
                ANSWER_TIMEOUT.as_secs()
            ));
        }
    }
    exchange.duration = at.elapsed();
    exchange
}

type Answer = (u16, Vec<(String, Vec<u8>)>, Body);

async fn exchange_with(target: &Target, req: Request) -> Result<Answer, String> {
    let addr = target.to_string();
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr))
        .await
        .map_err(|_| format!("the app at {addr} did not accept the connection in time"))?
        .map_err(|e| format!("the app at {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let mut r = http::Request::new(Full::new(Bytes::from(req.body)));
    *r.method_mut() = req.method;
    *r.uri_mut() = req.path.parse().map_err(|e| format!("path: {e}"))?;
    for (name, value) in &req.headers {
        if HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name)) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            r.headers_mut().append(n, v);
        }
    }
    let resp = sender
        .send_request(r)
        .await
        .map_err(|e| format!("the app at {addr} did not answer: {e}"));
    let resp = match resp {
        Ok(resp) => resp,
        Err(e) => {
            conn.abort();
            return Err(e);
        }
    };
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    let mut incoming = resp.into_body();
    let mut body = Body::default();
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|e| format!("the app's answer broke off: {e}"))?;
        if let Ok(data) = frame.into_data() {
            body.keep(&data, BODY_CAP);
        }
    }
    conn.abort();
    Ok((status, headers, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn original() -> Exchange {
        let mut e = Exchange::new(
            "POST".into(),
            "/hook".into(),
            vec![
                ("Host".into(), b"a.example".to_vec()),
                ("Authorization".into(), b"Bearer t".to_vec()),
            ],
        );
        e.request_body.keep(b"{}", BODY_CAP);
        e.status = Some(200);
        e
    }

    #[test]
    fn an_edit_changes_what_it_names_and_a_masked_value_is_the_original() {
        let r = Request::of(&original(), ReplayEdit::default()).unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/hook"));
        assert_eq!(r.body, b"{}");
        let edit = ReplayEdit {
            method: Some("PUT".into()),
            path: Some("/other?x=1".into()),
            headers: Some(vec![
                ("Authorization".into(), MASK.into()),
                ("X-New".into(), "1".into()),
            ]),
            body: Some("changed".into()),
        };
        let r = Request::of(&original(), edit).unwrap();
        assert_eq!(r.method, Method::PUT);
        assert_eq!(r.path, "/other?x=1");
        assert_eq!(r.headers[0], ("Authorization".into(), b"Bearer t".to_vec()));
        assert_eq!(r.headers[1], ("X-New".into(), b"1".to_vec()));
        assert_eq!(r.body, b"changed");
    }

    #[test]
    fn bad_edits_name_their_field() {
        for (edit, field) in [
            (
                ReplayEdit {
                    method: Some("GE T".into()),
                    ..Default::default()
                },
                "method",
            ),
            (
                ReplayEdit {
                    path: Some("http://elsewhere/".into()),
                    ..Default::default()
                },
                "path",
            ),
            (
                ReplayEdit {
                    headers: Some(vec![("X-Gone".into(), MASK.into())]),
                    ..Default::default()
                },
                "headers",
            ),
            (
                ReplayEdit {
                    headers: Some(vec![("Bad Name".into(), "v".into())]),
                    ..Default::default()
                },
                "headers",
            ),
        ] {
            assert_eq!(Request::of(&original(), edit).unwrap_err().0, field);
        }
        let mut big = original();
        big.request_body.truncated = true;
        assert_eq!(
            Request::of(&big, ReplayEdit::default()).unwrap_err().0,
            "body"
        );
    }
}
