//! Public TCP ports (`TCPProxy` → Gateway `TCP` listener + `TCPRoute`): one listener per
//! port of the route table, bound and closed as the table changes. Every connection is
//! spliced through the sidecar to the first of the port's backends whose device accepts
//! (ready ones in round-robin order, devices that are down last); with no ready backend,
//! or none that accepts, the connection is closed at once.
//!
//! [`Passthrough`] carries the TLS connections the edge's TLS listener hands over by
//! server name (`TLSRoute`, passthrough) the same way: the bytes reach the device as the
//! client sent them, and the device terminates TLS.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use parking_lot::Mutex;

use crate::model::{Table, TcpService};
use crate::sidecar::Sidecar;

#[derive(Clone, Debug)]
pub struct Config {
    /// The address public ports are bound on (the edge's `--http` address).
    pub ip: IpAddr,
    /// Connections at once on one port; past it a new connection is closed at once.
    pub max_connections: usize,
    /// A connection that carries no byte either way for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ip: IpAddr::from([0, 0, 0, 0]),
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// How often a port that could not be bound (taken by another program) is tried again.
const REBIND: Duration = Duration::from_secs(5);

/// Each port of the table: listening, or why it cannot (the bind error). Route status says
/// so, so a port another program holds is never reported as served.
pub type Binds = BTreeMap<u16, Result<(), String>>;

/// Serves the table's TCP ports until `shutdown`, telling `binds` how each fares.
pub fn spawn(
    config: Config,
    table: Arc<ArcSwap<Table>>,
    version: watch::Receiver<u64>,
    sidecar: Arc<Sidecar>,
    binds: watch::Sender<Binds>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let config = Arc::new(config);
    let ports = Ports {
        ip: config.ip,
        protocol: "TCP",
        wanted: {
            let table = table.clone();
            Box::new(move || table.load().tcp.keys().copied().collect())
        },
        version,
        binds,
        shutdown,
    };
    tokio::spawn(ports.keep(TcpListener::bind, move |listener, port, token| {
        tokio::spawn(accept(
            listener,
            port,
            config.clone(),
            table.clone(),
            sidecar.clone(),
            token,
        ));
    }))
}

/// The public ports of one protocol, kept bound as the table changes.
pub(crate) struct Ports {
    /// Where they are bound.
    pub ip: IpAddr,
    /// `TCP` or `UDP`, for messages.
    pub protocol: &'static str,
    /// The ports the table has now.
    pub wanted: Box<dyn Fn() -> Vec<u16> + Send>,
    /// Moves when the table changes.
    pub version: watch::Receiver<u64>,
    /// Told how each port fares.
    pub binds: watch::Sender<Binds>,
    pub shutdown: CancellationToken,
}

impl Ports {
    /// Binds each wanted port with `bind` and hands it to `serve` with a token cancelled
    /// when the port leaves the table; cancels ports that left; tries a port that could
    /// not be bound again every [`REBIND`]; tells `binds` after each round. Until
    /// `shutdown`.
    pub(crate) async fn keep<L, B, F>(
        mut self,
        bind: B,
        mut serve: impl FnMut(L, u16, CancellationToken) + Send,
    ) where
        B: Fn(SocketAddr) -> F + Send,
        F: std::future::Future<Output = std::io::Result<L>> + Send,
        L: Send,
    {
        let protocol = self.protocol;
        let suffix = if protocol == "TCP" { "" } else { "/udp" };
        let mut bound: HashMap<u16, CancellationToken> = HashMap::new();
        let mut failed: HashMap<u16, String> = HashMap::new();
        let mut retry = tokio::time::interval(REBIND);
        loop {
            let wanted = (self.wanted)();
            bound.retain(|port, token| {
                let keep = wanted.contains(port);
                if !keep {
                    // Closes the listener and cuts its connections: the port is gone.
                    token.cancel();
                    tracing::info!(port, protocol, "public port closed");
                }
                keep
            });
            failed.retain(|port, _| wanted.contains(port));
            for &port in &wanted {
                if bound.contains_key(&port) {
                    continue;
                }
                let addr = SocketAddr::new(self.ip, port);
                match bind(addr).await {
                    Ok(listener) => {
                        tracing::info!(%addr, protocol, "public port open");
                        failed.remove(&port);
                        let token = self.shutdown.child_token();
                        bound.insert(port, token.clone());
                        serve(listener, port, token);
                    }
                    Err(e) => {
                        let why = format!("the edge cannot listen on {addr}{suffix}: {e}");
                        // Once per trouble, not every retry.
                        if failed.get(&port) != Some(&why) {
                            tracing::warn!(%addr, protocol, error = %e, "cannot bind a public port; trying again every {REBIND:?}");
                        }
                        failed.insert(port, why);
                    }
                }
            }
            let now: Binds = wanted
                .iter()
                .map(|p| (*p, failed.get(p).map_or(Ok(()), |e| Err(e.clone()))))
                .collect();
            self.binds.send_if_modified(|b| {
                let changed = *b != now;
                if changed {
                    *b = now;
                }
                changed
            });
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                changed = self.version.changed() => if changed.is_err() { return },
                _ = retry.tick() => {}
            }
        }
    }
}

async fn accept(
    listener: TcpListener,
    port: u16,
    config: Arc<Config>,
    table: Arc<ArcSwap<Table>>,
    sidecar: Arc<Sidecar>,
    closed: CancellationToken,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut backoff = Duration::from_millis(10);
    loop {
        let (stream, peer) = tokio::select! {
            () = closed.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff = Duration::from_millis(10);
                    a
                }
                // Out of file descriptors, say: pause rather than spin.
                Err(e) => {
                    tracing::warn!(port, error = %e, "accepting a TCP connection");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        if open.load(Ordering::Relaxed) >= config.max_connections {
            tracing::debug!(port, %peer, "too many connections; closed");
            continue;
        }
        // The backends as the table says now: a route's changes apply to new connections
        // without closing the port.
        let Some(service) = table.load().tcp.get(&port).cloned() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        open.fetch_add(1, Ordering::Relaxed);
        let open = open.clone();
        let (sidecar, closed, idle) = (sidecar.clone(), closed.clone(), config.idle_timeout);
        tokio::spawn(async move {
            carry(&service, stream, peer, &sidecar, idle, &closed).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// One client connection to one of the service's backends, the first whose device
/// accepts; closed at once when none does.
async fn carry<C>(
    service: &TcpService,
    client: C,
    peer: SocketAddr,
    sidecar: &Sidecar,
    idle: Duration,
    closed: &CancellationToken,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let choices = service.choices();
    if choices.is_empty() {
        tracing::debug!(%peer, route = %service.route, "no ready backend; closed");
        return;
    }
    match sidecar.open_first(&choices, Some(peer), false).await {
        Ok(tunnel) => splice(client, tunnel, idle, closed).await,
        Err(e) => {
            tracing::debug!(%peer, route = %service.route, error = ?e, "no backend accepted; closed");
        }
    }
}

/// The TLS listener's passthrough names ([`Table::tls`]): a connection whose ClientHello
/// names one is carried, undecrypted, to one of its backends.
pub struct Passthrough {
    table: Arc<ArcSwap<Table>>,
    sidecar: Arc<Sidecar>,
    config: Config,
    /// Connections open per name, for the per-tunnel cap (`config.max_connections`).
    open: Arc<Mutex<HashMap<String, usize>>>,
    shutdown: CancellationToken,
}

impl Passthrough {
    pub fn new(
        table: Arc<ArcSwap<Table>>,
        sidecar: Arc<Sidecar>,
        config: Config,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            table,
            sidecar,
            config,
            open: Arc::default(),
            shutdown,
        }
    }
}

/// One open connection of a name, counted until dropped.
struct Counted {
    open: Arc<Mutex<HashMap<String, usize>>>,
    name: String,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self.open.lock();
        if let Some(n) = open.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.name);
            }
        }
    }
}

impl portway_serve::Passthrough for Passthrough {
    fn active(&self) -> bool {
        !self.table.load().tls.is_empty()
    }

    fn claim(
        &self,
        server_name: &str,
        io: portway_serve::Prefixed<tokio::net::TcpStream>,
        peer: portway_serve::Peer,
    ) -> Result<
        futures::future::BoxFuture<'static, ()>,
        portway_serve::Prefixed<tokio::net::TcpStream>,
    > {
        let Some(service) = self.table.load().tls.get(server_name).cloned() else {
            return Err(io);
        };
        let counted = {
            let mut open = self.open.lock();
            let n = open.entry(server_name.to_owned()).or_default();
            if *n >= self.config.max_connections {
                tracing::debug!(server_name, peer = %peer.remote, "too many connections; closed");
                // Taken, and dropped: a name passed through is never terminated here.
                return Ok(Box::pin(async move { drop(io) }));
            }
            *n += 1;
            Counted {
                open: self.open.clone(),
                name: server_name.to_owned(),
            }
        };
        let (sidecar, idle, closed) = (
            self.sidecar.clone(),
            self.config.idle_timeout,
            self.shutdown.clone(),
        );
        Ok(Box::pin(async move {
            let _counted = counted;
            carry(&service, io, peer.remote, &sidecar, idle, &closed).await;
        }))
    }
}

/// Copies both ways (each direction's end passed on as a half-close) until both ends
/// are done, nothing moves for `idle`, or the port closes.
async fn splice<C, T>(client: C, mut tunnel: T, idle: Duration, closed: &CancellationToken)
where
    C: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Active {
        inner: client,
        start,
        last: last.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut tunnel);
    tokio::pin!(copy);
    loop {
        let quiet_since = start + Duration::from_millis(last.load(Ordering::Relaxed));
        tokio::select! {
            _ = &mut copy => return,
            () = closed.cancelled() => return,
            () = tokio::time::sleep_until(quiet_since + idle) => {
                let moved = start + Duration::from_millis(last.load(Ordering::Relaxed));
                if moved + idle <= Instant::now() {
                    tracing::debug!(?idle, "idle TCP connection closed");
                    return;
                }
            }
        }
    }
}

/// A client connection that notes when bytes last moved either way.
struct Active<S> {
    inner: S,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<S> Active<S> {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Active<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Active<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A splice that moves nothing ends when the idle timeout has passed; bytes moving
    /// either way put it off.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_after_the_timeout() {
        let idle = Duration::from_secs(30);
        let (client, mut user) = tokio::io::duplex(64);
        let (tunnel, mut app) = tokio::io::duplex(64);
        let closed = CancellationToken::new();
        let started = Instant::now();
        let talk = async {
            tokio::time::sleep(Duration::from_secs(20)).await;
            user.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            app.read_exact(&mut got).await.unwrap();
            (user, app)
        };
        let ((_user, _app), ()) = tokio::join!(talk, splice(client, tunnel, idle, &closed));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(50) && took < Duration::from_secs(51),
            "{took:?}"
        );
    }
}
