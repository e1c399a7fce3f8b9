//! Keep-alive HTTP/1.1 connections over tunnels, per destination, driven by the task that
//! uses them.
//!
//! A pooled HTTP client (hyper's legacy `Client`) runs each connection in a task of its
//! own: a request is handed to that task, and its answer and every body chunk handed back,
//! so each request wakes two tasks, on two threads as often as not. Here the request's own
//! task drives the connection: while it waits for the head, and then — the connection
//! travelling inside the response body — whenever the client side reads the body. Once
//! the body is complete the connection goes back to the pool, idle and undriven; a
//! connection the device closed while idle is found closed when it is next taken (see
//! [`Pool::take`]).

use std::collections::HashMap;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;

use crate::sidecar::{Body, Destination, TunnelIo, Via};

/// Idle connections kept at most per destination; past it, the oldest is closed.
const MAX_IDLE_PER_DESTINATION: usize = 256;
/// Destinations with idle connections kept at most; past it, the pool forgets all idle ones
/// of the destination least recently used.
const MAX_DESTINATIONS: usize = 4096;

/// One HTTP/1.1 connection over a tunnel.
pub struct Conn {
    send: http1::SendRequest<Body>,
    conn: http1::Connection<TokioIo<TunnelIo>, Body>,
    /// The device and iroh connection it runs over.
    pub via: Via,
    /// Whether it served a request already (so a failure may be the device having closed
    /// it while idle, worth one retry on a fresh one).
    pub reused: bool,
}

impl Conn {
    /// An HTTP/1.1 client connection over a freshly opened tunnel.
    ///
    /// # Errors
    /// Never in practice (HTTP/1.1 needs no I/O to start); hyper's error otherwise.
    pub async fn new(io: TunnelIo, via: Via) -> Result<Self, hyper::Error> {
        let (send, conn) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
        Ok(Self {
            send,
            conn,
            via,
            reused: false,
        })
    }

    /// Whether the connection is open and waiting for a request. Polls it once, so a
    /// close (or a stray byte) the device sent while it sat idle is seen now rather than
    /// under a request. hyper asks for the next request only once the last exchange is
    /// over both ways: a request body still being sent (the app answered before reading
    /// it all) keeps a connection out of the pool.
    fn usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        !self.conn.poll_without_shutdown(&mut cx).is_ready() && self.send.is_ready()
    }

    /// Sends `req` and drives the connection until the response head arrives.
    ///
    /// # Errors
    /// hyper's error; `None` when the connection ended without one.
    pub async fn exchange(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, Option<hyper::Error>> {
        let Self { send, conn, .. } = self;
        // Ready once the connection has settled after its last exchange, which takes
        // driving it.
        poll_fn(|cx| {
            if let Poll::Ready(r) = send.poll_ready(cx) {
                return Poll::Ready(r.map_err(Some));
            }
            match conn.poll_without_shutdown(cx) {
                Poll::Pending => send.poll_ready(cx).map_err(Some),
                Poll::Ready(Err(e)) => Poll::Ready(Err(Some(e))),
                Poll::Ready(Ok(())) => Poll::Ready(Err(None)),
            }
        })
        .await?;
        let mut answer = std::pin::pin!(send.send_request(req));
        let mut done = false;
        poll_fn(|cx| {
            if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                return Poll::Ready(r.map_err(Some));
            }
            if !done {
                match conn.poll_without_shutdown(cx) {
                    Poll::Pending => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Some(e))),
                    // Finished: the answer, if any, is already on its way.
                    Poll::Ready(Ok(())) => done = true,
                }
            }
            if done {
                return match answer.as_mut().poll(cx) {
                    Poll::Ready(r) => Poll::Ready(r.map_err(Some)),
                    Poll::Pending => Poll::Ready(Err(None)),
                };
            }
            Poll::Pending
        })
        .await
    }

    /// Sends a request asking to switch protocols, the connection driven by a task of its
    /// own (it becomes the upgraded stream, and is never pooled).
    ///
    /// # Errors
    /// hyper's error.
    pub async fn upgrade(self, req: Request<Body>) -> Result<Response<Incoming>, hyper::Error> {
        let Self { mut send, conn, .. } = self;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upgraded tunnel connection ended");
            }
        });
        poll_fn(|cx| send.poll_ready(cx)).await?;
        send.send_request(req).await
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

#[derive(Default)]
struct Inner {
    idle: HashMap<Destination, Vec<Idle>>,
    sweeping: bool,
}

/// Idle connections per destination.
pub struct Pool {
    inner: Mutex<Inner>,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::default(),
            idle_timeout,
        })
    }

    /// The most recently used connection to `dest` that is still usable.
    pub fn take(&self, dest: &Destination) -> Option<Conn> {
        loop {
            let idle = {
                let mut inner = self.inner.lock();
                let list = inner.idle.get_mut(dest)?;
                let idle = list.pop();
                if list.is_empty() {
                    inner.idle.remove(dest);
                }
                idle?
            };
            // Closed outside the lock: dropping a connection ends its QUIC stream.
            let mut conn = idle.conn;
            if idle.since.elapsed() < self.idle_timeout && conn.usable() {
                return Some(conn);
            }
        }
    }

    /// Puts a connection whose last exchange is complete back.
    fn put(self: &Arc<Self>, dest: Destination, mut conn: Conn) {
        conn.reused = true;
        let mut start_sweeper = None;
        let evicted = {
            let mut inner = self.inner.lock();
            let mut evicted = Vec::new();
            if !inner.idle.contains_key(&dest) && inner.idle.len() >= MAX_DESTINATIONS {
                let oldest = inner
                    .idle
                    .iter()
                    .min_by_key(|(_, l)| l.last().map(|i| i.since))
                    .map(|(d, _)| d.clone());
                if let Some(d) = oldest {
                    evicted.extend(inner.idle.remove(&d).unwrap_or_default());
                }
            }
            let list = inner.idle.entry(dest).or_default();
            if list.len() >= MAX_IDLE_PER_DESTINATION {
                evicted.push(list.remove(0));
            }
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
            if !inner.sweeping
                && let Ok(rt) = tokio::runtime::Handle::try_current()
            {
                inner.sweeping = true;
                start_sweeper = Some(rt);
            }
            evicted
        };
        drop(evicted);
        if let Some(rt) = start_sweeper {
            rt.spawn(sweep(Arc::downgrade(self), self.idle_timeout));
        }
    }

    /// The response with the connection inside its body: reading the body drives the
    /// connection, and a complete body puts it back.
    pub fn respond(
        self: &Arc<Self>,
        dest: Destination,
        conn: Conn,
        resp: Response<Incoming>,
    ) -> Response<Driven> {
        resp.map(|body| Driven {
            body,
            ended: false,
            conn: Some(conn),
            dest: Some(dest),
            pool: Arc::downgrade(self),
        })
    }
}

/// Closes the connections idle past the timeout, until the pool is gone.
async fn sweep(pool: Weak<Pool>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)) / 2);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let expired: Vec<Idle> = {
            let mut inner = pool.inner.lock();
            let mut expired = Vec::new();
            inner.idle.retain(|_, list| {
                let (old, young): (Vec<Idle>, Vec<Idle>) = std::mem::take(list)
                    .into_iter()
                    .partition(|i| i.since.elapsed() >= pool.idle_timeout);
                expired.extend(old);
                *list = young;
                !list.is_empty()
            });
            expired
        };
        drop(expired);
    }
}

/// A response body that drives its connection, and returns it to the pool once complete.
pub struct Driven {
    body: Incoming,
    /// The body's end was read.
    ended: bool,
    conn: Option<Conn>,
    dest: Option<Destination>,
    pool: Weak<Pool>,
}

impl hyper::body::Body for Driven {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(conn) = &mut this.conn
            && let Poll::Ready(r) = conn.conn.poll_without_shutdown(cx)
        {
            // The exchange is over on this connection (closed or failed): the body has
            // what it will get; the connection is not reused.
            this.conn = None;
            if let Err(e) = r {
                tracing::debug!(error = %e, "tunnel connection ended under a response");
            }
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        // Only a complete response leaves the connection ready for the next; one dropped
        // half read would hand its rest to the next request.
        if (self.ended || self.body.is_end_stream())
            && let (Some(mut conn), Some(dest), Some(pool)) =
                (self.conn.take(), self.dest.take(), self.pool.upgrade())
            && conn.usable()
        {
            pool.put(dest, conn);
        }
    }
}
