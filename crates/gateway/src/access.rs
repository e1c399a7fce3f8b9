//! The edge's access log: one `portway::access` event per public request, once its
//! response has been sent.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};

use crate::sidecar::{Body, BoxError, Via, request_authority};

/// The tracing target of access log events (filter on it with `RUST_LOG`).
pub const TARGET: &str = "portway::access";

/// Runs `handle` on `req`; when `on`, logs the request once its response body has been
/// sent (or the client went away): client, host, method, path (without the query, which
/// may carry secrets), status, bytes sent, duration, and the device it went to with the
/// path the iroh connection takes to it (`direct` or `relay`, as it is when the response
/// ends), or `-` when no device answered.
pub async fn logged<F, Fut>(
    on: bool,
    req: Request<Incoming>,
    client: SocketAddr,
    handle: F,
) -> Response<Body>
where
    F: FnOnce(Request<Incoming>) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    if !on {
        return handle(req).await;
    }
    let started = Instant::now();
    let host = request_authority(req.uri(), req.headers()).unwrap_or_else(|| "-".into());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = handle(req).await;
    let entry = Entry {
        client: client.ip().to_canonical(),
        host,
        method,
        path,
        status: resp.status().as_u16(),
        via: resp.extensions().get::<Via>().cloned(),
        denied: resp.extensions().get::<DeniedBy>().copied(),
        started,
    };
    resp.map(|body| Counted::new(body, move |sent, complete| entry.emit(sent, complete)).boxed())
}

/// What is known of a request once its response head is ready.
struct Entry {
    client: IpAddr,
    host: String,
    method: Method,
    path: String,
    status: u16,
    via: Option<Via>,
    denied: Option<DeniedBy>,
    started: Instant,
}

/// Set on a response an AccessPolicy gave instead of the app: its rule and reason, logged
/// as `denied=rule/reason`.
#[derive(Clone, Copy, Debug)]
pub struct DeniedBy {
    pub rule: &'static str,
    pub reason: &'static str,
}

impl Entry {
    fn emit(self, bytes_sent: u64, complete: bool) {
        let duration_ms = self.started.elapsed().as_micros() as f64 / 1000.0;
        let device = self.via.as_ref().map(|v| v.node.to_string());
        tracing::info!(
            target: TARGET,
            client = %self.client,
            host = %self.host,
            method = %self.method,
            path = %self.path,
            status = self.status,
            bytes_sent,
            duration_ms,
            device = device.as_deref().unwrap_or("-"),
            via = self.via.as_ref().map_or("-", Via::path),
            denied = %self
                .denied
                .map_or_else(|| "-".to_owned(), |d| format!("{}/{}", d.rule, d.reason)),
            complete,
        );
    }
}

/// A response body that counts the bytes it hands out and calls `done(bytes, complete)`
/// once: at its end, or when dropped before it (`complete` is false then, and after an
/// error).
struct Counted<F: FnOnce(u64, bool)> {
    inner: Body,
    sent: u64,
    done: Option<F>,
}

impl<F: FnOnce(u64, bool)> Counted<F> {
    fn new(inner: Body, done: F) -> Self {
        Self {
            inner,
            sent: 0,
            done: Some(done),
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(done) = self.done.take() {
            done(self.sent, complete);
        }
    }
}

impl<F: FnOnce(u64, bool) + Unpin> HttpBody for Counted<F> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.sent += d.len() as u64;
                }
                // hyper stops polling once a body says it has ended.
                if self.inner.is_end_stream() {
                    self.finish(true);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Ready(None) => self.finish(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<F: FnOnce(u64, bool)> Drop for Counted<F> {
    fn drop(&mut self) {
        // A body nobody polls to its end (HEAD, 204, an upgrade) may still be whole.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::sidecar::full;

    type Calls = Arc<Mutex<Vec<(u64, bool)>>>;

    fn counted(body: Body) -> (Counted<impl FnOnce(u64, bool) + Unpin>, Calls) {
        let calls = Calls::default();
        let c = calls.clone();
        let body = Counted::new(body, move |sent, complete| {
            c.lock().unwrap().push((sent, complete));
        });
        (body, calls)
    }

    fn chunks(parts: Vec<Result<&'static str, &'static str>>) -> Body {
        let frames = parts.into_iter().map(|p| {
            p.map(|s| Frame::data(Bytes::from_static(s.as_bytes())))
                .map_err(BoxError::from)
        });
        http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed()
    }

    #[tokio::test]
    async fn a_whole_body_is_logged_once_with_its_length() {
        let (body, calls) = counted(full("hello, world"));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello, world");
        assert_eq!(*calls.lock().unwrap(), [(12, true)]);

        let (body, calls) = counted(chunks(vec![Ok("ab"), Ok("cde")]));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcde");
        assert_eq!(*calls.lock().unwrap(), [(5, true)]);
    }

    #[tokio::test]
    async fn a_body_cut_short_is_logged_as_incomplete() {
        let (mut body, calls) = counted(chunks(vec![Ok("ab"), Ok("cde"), Ok("f")]));
        body.frame().await.unwrap().unwrap();
        assert!(
            calls.lock().unwrap().is_empty(),
            "not logged before its end"
        );
        drop(body);
        assert_eq!(*calls.lock().unwrap(), [(2, false)]);

        let (body, calls) = counted(chunks(vec![Ok("ab"), Err("reset")]));
        assert!(body.collect().await.is_err());
        assert_eq!(*calls.lock().unwrap(), [(2, false)]);
    }

    #[test]
    fn a_body_never_polled_but_empty_is_complete() {
        let (body, calls) = counted(crate::sidecar::empty());
        drop(body);
        assert_eq!(*calls.lock().unwrap(), [(0, true)]);
    }
}
