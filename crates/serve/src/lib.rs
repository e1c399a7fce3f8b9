//! One way to serve HTTP/1.1 and HTTP/2 on a TCP listener, with or without TLS, within limits
//! that keep slow, idle or too many clients from exhausting the process.
//!
//! [`serve`] accepts connections until its shutdown token is cancelled and drives each with
//! hyper-util's `auto` server: HTTP/1.1 with upgrades (WebSocket, CONNECT), and HTTP/2 by
//! ALPN over TLS or by prior knowledge (h2c) on plain TCP. Every connection task is tracked,
//! carries a `conn` tracing span, and keeps to [`Limits`]:
//! - a client has `header_read_timeout` to send a complete request head, counted from the
//!   connection's start (after TLS) and, on a kept-alive HTTP/1.1 connection, from the first
//!   byte of the next request; a connection that never sends anything is closed then too;
//! - a connection with no request in flight for `idle_timeout` is closed (HTTP/2 gets a
//!   GOAWAY first); requests in flight, such as long watches, are never cut by it;
//! - past `max_connections` a new connection is answered `503 Service Unavailable` and closed
//!   on a plain listener, and closed on a TLS one (it could not read a plain answer);
//! - accept errors (EMFILE and the like) pause the loop, 10 ms doubling to 1 s, instead of
//!   spinning;
//! - on shutdown, connections finish the requests in flight for up to `shutdown_grace`, then
//!   are dropped.
//!
//! [`serve_with_passthrough`] does the same on a TLS listener, except that connections
//! whose ClientHello names a server that a [`Passthrough`] claims are handed to it
//! undecrypted, for a device that terminates TLS itself.
//!
//! [`supervise::Supervisor`] runs the parts of one process (`portway up`) so that one
//! part's death stops them all, and stops them in order within a grace period.
//!
//! [`raise_fd_limit`] lifts the open-files soft limit to the hard limit, for `main` to call
//! once at start.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use hyper::{Request, Response, body::Incoming, service::service_fn};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let hello = |_peer: &portway_serve::Peer| {
//!     service_fn(|_req: Request<Incoming>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(String::from("hello\n")))
//!     })
//! };
//! tokio::spawn(portway_serve::serve(listener, None, hello, shutdown.clone(), Default::default()));
//! # Ok(()) }
//! ```

mod passthrough;
pub mod proxy_protocol;
pub mod supervise;

pub use passthrough::{Passthrough, Prefixed};

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::Service;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What one server tolerates from its clients.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Time to send a complete request head: from the start of a connection (after TLS),
    /// and on a kept-alive HTTP/1.1 connection from the first byte of the next request.
    /// Trickling bytes does not extend it. Default 10 s.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed. Default 120 s:
    /// longer than the 90 s that Go's and hyper's client pools keep idle connections, so
    /// those clients let go first and never send on a connection being closed.
    pub idle_timeout: Duration,
    /// Connections served at once, upgraded ones included. Default 10 000. Past it, new
    /// connections are refused (see the crate docs); the process's open-files limit must
    /// be above it (see [`raise_fd_limit`]) or accepting fails first.
    pub max_connections: usize,
    /// Time for a client to complete the TLS handshake. Default 10 s.
    pub tls_handshake_timeout: Duration,
    /// On shutdown, how long requests in flight may take to finish before their
    /// connections are dropped. Default 10 s.
    pub shutdown_grace: Duration,
    /// Connections from these addresses (TCP load balancers in front) start with a PROXY
    /// protocol header, v1 or v2, read within `header_read_timeout`: [`Peer::remote`] is
    /// then the client it names. From them a connection without one is closed. Default
    /// none.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connections: 10_000,
            tls_handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            proxy_protocol_from: Vec::new(),
        }
    }
}

/// The two ends of an accepted connection, for building its service.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub remote: SocketAddr,
    /// The listener's address.
    pub local: SocketAddr,
    /// Whether the connection came through the TLS acceptor.
    pub tls: bool,
}

/// Raises this process's soft limit on open files to its hard limit, so that servers can
/// hold as many connections as the system allows. Returns the soft limit now in force.
///
/// # Errors
/// When the limits cannot be read or set.
pub fn raise_fd_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Per-connection HTTP/2 settings.
const H2_MAX_STREAMS: u32 = 200;
/// Pings find peers that vanished while a long request (a watch) is open.
const H2_PING_EVERY: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// After a GOAWAY for idleness, how long a client has to finish what it had just sent.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);
/// Refused connections answered at once; past this, they are closed without an answer.
const REFUSING_AT_ONCE: usize = 64;
/// Time to hand a refused client its 503.
const REFUSE_WITHIN: Duration = Duration::from_secs(1);
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain; charset=utf-8\r\n\
content-length: 21\r\n\
retry-after: 1\r\n\
connection: close\r\n\
\r\n\
too many connections\n";
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// The "connection limit reached" warning is logged at most this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Serves `listener` until `shutdown` is cancelled, then lets connections finish within
/// `limits.shutdown_grace`. `make_service` builds each connection's service once the
/// connection is established (after TLS).
pub async fn serve<M, S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    make_service: M,
    shutdown: CancellationToken,
    limits: Limits,
) where
    M: Fn(&Peer) -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let tls = tls.map(|acceptor| Tls {
        acceptor,
        passthrough: None,
    });
    serve_inner(listener, tls, make_service, shutdown, limits).await;
}

/// As [`serve`] with TLS, but while `passthrough` is [active](Passthrough::active) each
/// connection's ClientHello is read first, and a connection whose server name it
/// [claims](Passthrough::claim) is handed to it undecrypted instead of being served here.
/// Reading the ClientHello counts against `limits.tls_handshake_timeout`; a claimed
/// connection holds its connection slot until it ends.
pub async fn serve_with_passthrough<M, S, B>(
    listener: TcpListener,
    tls: TlsAcceptor,
    passthrough: Arc<dyn Passthrough>,
    make_service: M,
    shutdown: CancellationToken,
    limits: Limits,
) where
    M: Fn(&Peer) -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let tls = Tls {
        acceptor: tls,
        passthrough: Some(passthrough),
    };
    serve_inner(listener, Some(tls), make_service, shutdown, limits).await;
}

/// How a TLS listener takes its connections.
#[derive(Clone)]
struct Tls {
    acceptor: TlsAcceptor,
    passthrough: Option<Arc<dyn Passthrough>>,
}

async fn serve_inner<M, S, B>(
    listener: TcpListener,
    tls: Option<Tls>,
    make_service: M,
    shutdown: CancellationToken,
    limits: Limits,
) where
    M: Fn(&Peer) -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "listener has no address; not serving");
            return;
        }
    };
    let shared = Arc::new(Shared {
        make_service,
        builder: builder(),
        limits,
        shutdown,
        force: CancellationToken::new(),
    });
    let slots = Arc::new(Semaphore::new(shared.limits.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSING_AT_ONCE));
    let tracker = TaskTracker::new();
    let mut pause = ACCEPT_PAUSE_MIN;
    let mut refusals = Refusals::default();
    loop {
        let (stream, remote) = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(accepted) => {
                    pause = ACCEPT_PAUSE_MIN;
                    accepted
                }
                // The client gave up before we took it: nothing wrong with us.
                Err(e) if is_per_connection(&e) => {
                    tracing::debug!(error = %e, "accept: connection failed before it was taken");
                    continue;
                }
                // Out of descriptors or memory: retrying at once would spin.
                Err(e) => {
                    tracing::warn!(%local, error = %e, pause_ms = pause.as_millis() as u64, "accept failed; pausing");
                    tokio::select! {
                        () = shared.shutdown.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refusals.note(local, shared.limits.max_connections);
            if tls.is_none()
                && let Ok(permit) = refusing.clone().try_acquire_owned()
            {
                tracker.spawn(async move {
                    refuse(stream).await;
                    drop(permit);
                });
            }
            continue;
        };
        let peer = Peer {
            remote,
            local,
            tls: tls.is_some(),
        };
        let span = tracing::debug_span!("conn", %remote, %local);
        tracker.spawn(connection(stream, peer, slot, tls.clone(), shared.clone()).instrument(span));
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(shared.limits.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::info!(%local, connections = tracker.len(), "shutdown grace passed; dropping the remaining connections");
        shared.force.cancel();
        tracker.wait().await;
    }
}

/// What every connection task of one server shares.
struct Shared<M> {
    make_service: M,
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
    shutdown: CancellationToken,
    /// Cancelled when the shutdown grace has passed: connections still open are dropped.
    force: CancellationToken,
}

fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Request heads and idle connections are timed by `Activity`: hyper's own header clock
    // does not run while `auto` reads the first bytes to tell HTTP/2 from HTTP/1.1 (a
    // silent client would be held forever), and it would end kept-alive connections after
    // the header timeout rather than the idle one.
    builder.http1().header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_EVERY)
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .max_concurrent_streams(H2_MAX_STREAMS);
    builder
}

/// Errors of one pending connection, not of the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Counts refused connections and says so now and then, not once per connection.
#[derive(Default)]
struct Refusals {
    since_logged: u64,
    logged_at: Option<Instant>,
}

impl Refusals {
    fn note(&mut self, local: SocketAddr, max: usize) {
        self.since_logged += 1;
        if self
            .logged_at
            .is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY)
        {
            tracing::warn!(%local, max_connections = max, refused = self.since_logged, "connection limit reached; refusing new connections");
            self.since_logged = 0;
            self.logged_at = Some(Instant::now());
        }
    }
}

/// Answers a connection over the limit with a plain 503 and closes it.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(REFUSE_WITHIN, async {
        stream.write_all(TOO_MANY_CONNECTIONS).await?;
        stream.shutdown().await?;
        // Closing with the request unread would send a reset, which may destroy the answer
        // before the client reads it: read until the client closes (or time is up).
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

async fn connection<M, S, B>(
    mut stream: TcpStream,
    peer: Peer,
    slot: OwnedSemaphorePermit,
    tls: Option<Tls>,
    shared: Arc<Shared<M>>,
) where
    M: Fn(&Peer) -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let _ = stream.set_nodelay(true);
    let mut peer = peer;
    if shared
        .limits
        .proxy_protocol_from
        .iter()
        .any(|n| n.contains(&peer.remote.ip()))
    {
        let header = proxy_protocol::read(&mut stream);
        match tokio::time::timeout(shared.limits.header_read_timeout, header).await {
            Ok(Ok(Some(client))) => {
                tracing::debug!(%client, "client named by the balancer");
                peer.remote = client;
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "closing a connection from a balancer");
                return;
            }
            Err(_) => return,
        }
    }
    let Some(tls) = tls else {
        if let Err(e) = drive(stream, slot, &peer, &shared).await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        return;
    };
    // One deadline for reading the ClientHello and for the handshake that follows.
    let deadline = Instant::now() + shared.limits.tls_handshake_timeout;
    let Some(passthrough) = tls.passthrough.filter(|p| p.active()) else {
        return terminate(stream, tls.acceptor, deadline, slot, &peer, &shared).await;
    };
    let sniffed = tokio::select! {
        r = tokio::time::timeout_at(deadline, passthrough::sniff(&mut stream)) => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "reading the ClientHello failed");
                return;
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                return;
            }
        },
        () = shared.shutdown.cancelled() => return,
    };
    let io = Prefixed::new(sniffed.bytes, stream);
    let io = match sniffed.server_name {
        Some(name) => {
            let raw = Peer { tls: false, ..peer };
            match passthrough.claim(&name, io, raw) {
                Ok(carry) => {
                    tracing::debug!(server_name = %name, "passing the connection through");
                    return pass_through(carry, slot, &shared).await;
                }
                Err(io) => io,
            }
        }
        None => io,
    };
    terminate(io, tls.acceptor, deadline, slot, &peer, &shared).await;
}

/// Completes the TLS handshake by `deadline` and serves HTTP over it.
async fn terminate<I, M, S, B>(
    io: I,
    acceptor: TlsAcceptor,
    deadline: Instant,
    slot: OwnedSemaphorePermit,
    peer: &Peer,
    shared: &Shared<M>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    M: Fn(&Peer) -> S,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let handshake = tokio::time::timeout_at(deadline, acceptor.accept(io));
    let stream = tokio::select! {
        r = handshake => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                return;
            }
        },
        () = shared.shutdown.cancelled() => return,
    };
    if let Err(e) = drive(stream, slot, peer, shared).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Runs a claimed connection to its end, or until the shutdown grace has passed.
async fn pass_through<M>(
    carry: futures::future::BoxFuture<'static, ()>,
    slot: OwnedSemaphorePermit,
    shared: &Shared<M>,
) {
    // The spliced connection costs a descriptor like any other: it keeps its slot.
    let _slot = slot;
    tokio::select! {
        () = carry => {}
        () = shared.force.cancelled() => {
            tracing::debug!("shutdown grace passed; dropping a passed-through connection");
        }
    }
}

/// Serves HTTP on an established connection until it ends, times out or is shut down.
async fn drive<I, M, S, B>(
    io: I,
    slot: OwnedSemaphorePermit,
    peer: &Peer,
    shared: &Shared<M>,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    M: Fn(&Peer) -> S,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let activity = Arc::new(Activity::new(&shared.limits));
    let io = Watched {
        io,
        activity: activity.clone(),
        _slot: slot,
    };
    let service = Tracked {
        inner: (shared.make_service)(peer),
        activity: activity.clone(),
    };
    let conn = shared
        .builder
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = activity.expired() => {
            // Nothing is in flight. HTTP/2 clients get a GOAWAY naming the last stream taken,
            // so one sent just now can be retried elsewhere; HTTP/1.1 ones see the close.
            if activity.is_h2() {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    _ = conn.as_mut() => {}
                    () = tokio::time::sleep(GOAWAY_GRACE) => {}
                    () = shared.force.cancelled() => {}
                }
            }
            tracing::debug!("closing a connection that sent no request in time");
            Ok(())
        }
        () = shared.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                // A partly sent request head keeps HTTP/1.1 from closing gracefully.
                () = activity.expired() => Ok(()),
                () = shared.force.cancelled() => Err("shutdown grace passed".into()),
            }
        }
    }
}

/// When a connection last had work to do, and so when it should be closed.
struct Activity {
    header_timeout: Duration,
    idle_timeout: Duration,
    state: Mutex<State>,
    /// Set while a kept-alive HTTP/1.1 connection waits for its next request, so that the
    /// first byte read starts the header clock without taking the lock on every read.
    awaiting_request: AtomicBool,
    changed: Notify,
}

struct State {
    in_flight: usize,
    /// When to close; `None` while a request is in flight.
    deadline: Option<Instant>,
    h2: bool,
}

impl Activity {
    fn new(limits: &Limits) -> Self {
        Self {
            header_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            state: Mutex::new(State {
                in_flight: 0,
                deadline: Some(Instant::now() + limits.header_read_timeout),
                h2: false,
            }),
            awaiting_request: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_h2(&self) -> bool {
        self.state().h2
    }

    fn begin(self: &Arc<Self>, version: Version) -> InFlight {
        let mut state = self.state();
        state.in_flight += 1;
        state.deadline = None;
        state.h2 |= version == Version::HTTP_2;
        self.awaiting_request.store(false, Ordering::Release);
        InFlight(self.clone())
    }

    fn end(&self) {
        let mut state = self.state();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0 {
            state.deadline = Some(Instant::now() + self.idle_timeout);
            // HTTP/2 reads pings and window updates while idle: they start no request.
            self.awaiting_request.store(!state.h2, Ordering::Release);
            self.changed.notify_one();
        }
    }

    /// Bytes arrived: on an idle HTTP/1.1 connection they begin the next request's head.
    fn read(&self) {
        if !self.awaiting_request.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut state = self.state();
        if state.in_flight == 0 {
            let head_by = Instant::now() + self.header_timeout;
            state.deadline = Some(state.deadline.map_or(head_by, |d| d.min(head_by)));
            self.changed.notify_one();
        }
    }

    /// Resolves once the connection's deadline has passed with nothing in flight.
    async fn expired(&self) {
        loop {
            let deadline = self.state().deadline;
            match deadline {
                Some(d) if d <= Instant::now() => return,
                Some(d) => tokio::select! {
                    () = tokio::time::sleep_until(d) => {}
                    () = self.changed.notified() => {}
                },
                None => self.changed.notified().await,
            }
        }
    }
}

/// A request in flight, from its head until its response body is done or dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// The connection's IO, noting reads for [`Activity`] and holding its connection slot until
/// it is dropped (after an upgrade, that is when the upgraded stream closes).
struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
    _slot: OwnedSemaphorePermit,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The caller's service, marking each request in flight until its response is sent.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

type TrackedFuture<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<TrackedBody<B>>, E>> + Send>>;

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Body + Unpin,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<B, S::Error>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.begin(req.version());
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| TrackedBody {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// A response body that keeps its request in flight until it is done or dropped.
struct TrackedBody<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
