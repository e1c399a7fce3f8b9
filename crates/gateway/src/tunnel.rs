//! Tunnels to devices: one pooled iroh connection per device, a `CONNECT host:port` on a
//! new QUIC stream per tunnel, and the devices this gateway just lost.
//!
//! A device is *down* once its connection died (silent past the QUIC idle timeout, reset,
//! or closed by the device) or a dial to it failed. Asking for a down device answers at
//! once, without a dial, while a probe dials it in the background; the probe's connection
//! is the one the next request uses. A down device nobody asks for is forgotten after
//! [`FORGET_AFTER`], and the next request for it dials afresh.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use iroh::endpoint::{Connection, ConnectionError, RecvStream, SendStream};
use iroh::{Endpoint, EndpointId};
use iroh_proxy_utils::HttpResponse;
use iroh_util::connection_pool::{ConnectionPool, ConnectionRef, Options};
use parking_lot::Mutex;
use portway_api::{TUNNEL_ALPN, Target, headers, proxy_status};
use tokio::io::{AsyncRead, ReadBuf};

/// Largest CONNECT response head read.
const MAX_HEAD: usize = 8 * 1024;
/// Devices remembered at most, down or connected; past that, no more are marked down
/// (they are dialed as usual).
const MAX_DEVICES: usize = 4096;
/// A down device nobody asked for this long is forgotten, and its probe stops.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);
/// The first pause between probes of a down device; it doubles up to [`PROBE_MAX`].
const PROBE_FIRST: Duration = Duration::from_millis(100);
const PROBE_MAX: Duration = Duration::from_secs(1);
/// Callers waiting on the connection pool at once. iroh-util's pool is two actors that
/// talk over bounded channels (100) both ways; with more callers than that in flight at
/// once (200 requests arriving together, each opening a tunnel) they can block on each
/// other for good, and every caller times out.
const MAX_POOL_CALLERS: usize = 32;
/// One probe dial at most this long (a device back mid-dial is found by the next one).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a tunnel could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// The device is down: unreachable, or its connection died.
    Down(String),
    /// The device answered the CONNECT with an error; `details` are its own words
    /// (`Proxy-Status`).
    Refused {
        status: StatusCode,
        details: Option<String>,
    },
    /// The tunnel's stream failed while the device stayed connected.
    Stream(String),
}

/// An open tunnel: the stream pair, and the pooled connection it runs on.
pub struct Tunnel {
    pub send: SendStream,
    pub recv: Prefixed<RecvStream>,
    pub conn: ConnectionRef,
}

/// A reader that yields `head` before reading on: bytes read past the CONNECT response.
pub struct Prefixed<R> {
    head: Bytes,
    inner: R,
}

impl<R: AsyncRead + Unpin> AsyncRead for Prefixed<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.remaining());
            let chunk = self.head.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

struct Down {
    why: String,
    asked: Instant,
}

/// Dials devices over one pool, and knows which are down.
pub struct Dialer {
    pool: ConnectionPool,
    /// Bounds the callers of `pool` (see [`MAX_POOL_CALLERS`]).
    callers: tokio::sync::Semaphore,
    dial_timeout: Duration,
    down: Mutex<HashMap<EndpointId, Down>>,
    /// The last connection handed out per device: one that closed with an error means
    /// the device went away, one this side closed (idle) means nothing.
    live: Mutex<HashMap<EndpointId, Connection>>,
}

impl Dialer {
    pub fn new(endpoint: Endpoint, dial_timeout: Duration, idle_timeout: Duration) -> Arc<Self> {
        let options = Options {
            connect_timeout: dial_timeout,
            idle_timeout,
            ..Default::default()
        };
        Arc::new(Self {
            pool: ConnectionPool::new(endpoint, TUNNEL_ALPN, options),
            callers: tokio::sync::Semaphore::new(MAX_POOL_CALLERS),
            dial_timeout,
            down: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
        })
    }

    /// Why `node` is down, if it is. A connection found dead here marks it down.
    pub fn down(self: &Arc<Self>, node: &EndpointId) -> Option<String> {
        if let Some(d) = self.down.lock().get_mut(node) {
            d.asked = Instant::now();
            return Some(d.why.clone());
        }
        let reason = {
            let mut live = self.live.lock();
            let reason = live.get(node).and_then(Connection::close_reason)?;
            live.remove(node);
            reason
        };
        let why = gone(&reason)?;
        self.mark_down(*node, why.clone());
        Some(why)
    }

    /// Opens a tunnel to `target` on `node`, dialing it if needed; `client`: the public
    /// client's address, told to the device for targets that take the PROXY protocol;
    /// `udp`: the tunnel carries datagrams to a UDP target (framed, see
    /// [`portway_api::UDP_FRAME_LENGTH_BYTES`]).
    ///
    /// # Errors
    /// See [`OpenError`]; `Down` when the device is (now) down.
    pub async fn open(
        self: &Arc<Self>,
        node: EndpointId,
        target: &Target,
        client: Option<SocketAddr>,
        udp: bool,
    ) -> Result<Tunnel, OpenError> {
        if let Some(why) = self.down(&node) {
            return Err(OpenError::Down(why));
        }
        let conn = match tokio::time::timeout(self.dial_timeout, self.connection(node)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(self.unreachable(node, format!("dialing it failed: {e}"))),
            Err(_) => {
                // Drop the dial under way, so the probe starts a fresh one.
                let _ = self.pool.close(node).await;
                let why = format!("no connection within {}s", self.dial_timeout.as_secs());
                return Err(self.unreachable(node, why));
            }
        };
        self.remember(node, &conn);
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(streams) => streams,
            Err(e) => return Err(self.broke(node, &conn, e.to_string())),
        };
        let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(client) = client {
            head.push_str(&format!("{}: {client}\r\n", headers::CLIENT_ADDRESS));
        }
        if udp {
            head.push_str(&format!("{}: {}\r\n", headers::TARGET_PROTO, headers::UDP));
        }
        head.push_str("\r\n");
        if let Err(e) = send.write_all(head.as_bytes()).await {
            return Err(self.broke(node, &conn, e.to_string()));
        }
        let (resp, rest) = match tokio::time::timeout(self.dial_timeout, read_head(&mut recv)).await
        {
            Ok(Ok(answer)) => answer,
            Ok(Err(why)) => return Err(self.broke(node, &conn, why)),
            Err(_) => {
                let why = format!(
                    "the device did not answer the tunnel request within {}s",
                    self.dial_timeout.as_secs()
                );
                return Err(self.broke(node, &conn, why));
            }
        };
        if resp.status != StatusCode::OK {
            let details = resp
                .headers
                .get(proxy_status::NAME)
                .and_then(|v| v.to_str().ok())
                .and_then(proxy_status::details);
            return Err(OpenError::Refused {
                status: resp.status,
                details,
            });
        }
        Ok(Tunnel {
            send,
            recv: Prefixed {
                head: rest,
                inner: recv,
            },
            conn,
        })
    }

    /// The pooled connection to `node`, dialing it if needed.
    async fn connection(&self, node: EndpointId) -> Result<ConnectionRef, String> {
        let _turn = self.callers.acquire().await.map_err(|e| e.to_string())?;
        self.pool
            .get_or_connect(node)
            .await
            .map_err(|e| e.to_string())
    }

    fn remember(&self, node: EndpointId, conn: &Connection) {
        let mut live = self.live.lock();
        if live
            .get(&node)
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            return;
        }
        if live.len() >= MAX_DEVICES {
            live.clear();
        }
        live.insert(node, conn.clone());
    }

    fn unreachable(self: &Arc<Self>, node: EndpointId, why: String) -> OpenError {
        self.mark_down(node, why.clone());
        OpenError::Down(why)
    }

    /// A stream failed: the device is down when its connection went with it.
    fn broke(self: &Arc<Self>, node: EndpointId, conn: &Connection, why: String) -> OpenError {
        match conn.close_reason().as_ref().and_then(gone) {
            Some(gone) => self.unreachable(node, gone),
            None => OpenError::Stream(why),
        }
    }

    fn mark_down(self: &Arc<Self>, node: EndpointId, why: String) {
        let mut down = self.down.lock();
        if down.contains_key(&node) || down.len() >= MAX_DEVICES {
            return;
        }
        tracing::warn!(node = %node.fmt_short(), %why, "device down: answering at once while probing it");
        down.insert(
            node,
            Down {
                why,
                asked: Instant::now(),
            },
        );
        drop(down);
        tokio::spawn(self.clone().probe(node));
    }

    /// Dials a down device until it answers (then it is up, its connection pooled) or
    /// nobody has asked for it for [`FORGET_AFTER`].
    async fn probe(self: Arc<Self>, node: EndpointId) {
        let mut pause = PROBE_FIRST;
        loop {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(PROBE_MAX);
            let asked = self.down.lock().get(&node).map(|d| d.asked);
            match asked {
                None => return,
                Some(t) if t.elapsed() > FORGET_AFTER => {
                    self.down.lock().remove(&node);
                    return;
                }
                Some(_) => {}
            }
            let timeout = self.dial_timeout.min(PROBE_TIMEOUT);
            match tokio::time::timeout(timeout, self.connection(node)).await {
                Ok(Ok(conn)) if conn.close_reason().is_none() => {
                    self.remember(node, &conn);
                    self.down.lock().remove(&node);
                    tracing::info!(node = %node.fmt_short(), "device reachable again");
                    return;
                }
                // A failed or dead connection leaves the pool, so the next probe dials.
                _ => {
                    let _ = self.pool.close(node).await;
                }
            }
        }
    }
}

/// Why a connection that closed with `reason` means the device is gone; `None` when this
/// side closed it.
fn gone(reason: &ConnectionError) -> Option<String> {
    Some(match reason {
        ConnectionError::LocallyClosed => return None,
        ConnectionError::TimedOut => "the device stopped answering".into(),
        ConnectionError::Reset => "the device restarted".into(),
        ConnectionError::ApplicationClosed(_) | ConnectionError::ConnectionClosed(_) => {
            "the device closed its connection".into()
        }
        other => format!("the connection to the device failed: {other}"),
    })
}

/// Reads a response head; returns it and the bytes read past it.
async fn read_head(recv: &mut RecvStream) -> Result<(HttpResponse, Bytes), String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    loop {
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(None) => return Err("the device closed the tunnel before answering".into()),
            Err(e) => return Err(e.to_string()),
        }
        match HttpResponse::parse_with_len(&buf) {
            Ok(Some((len, resp))) => return Ok((resp, Bytes::copy_from_slice(&buf[len..]))),
            Ok(None) if buf.len() < MAX_HEAD => {}
            Ok(None) => return Err("the device's answer has an oversized head".into()),
            Err(e) => return Err(format!("the device's answer is not HTTP: {e}")),
        }
    }
}
