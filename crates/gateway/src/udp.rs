//! Public UDP ports (`portway udp 53`): one socket per UDP port of the route table, bound
//! and closed as the table changes. Each client address is a flow: its datagrams go
//! through one tunnel (a CONNECT with `datum-target-proto: udp`, then each datagram framed
//! by its 2-byte length) to the first of the port's backends whose device accepts (ready
//! ones in round-robin order, devices that are down last), and what the device sends back
//! leaves the port for that client. A flow ends when its tunnel does, when nothing moves
//! either way for the idle timeout, or when the port closes; the client's next datagram
//! opens a new one.
//!
//! Limits: `max_flows` flows per port, and `max_flows_per_ip` of them from one client IP
//! (IPv6: one /64)
//! (so one host's source ports cannot take them all), past which a new client's datagrams
//! are dropped. Datagrams waiting for a flow's tunnel (while it opens, or when it is slower
//! than the client) are held to [`FLOW_QUEUE`] datagrams and [`FLOW_BYTES`] bytes per flow,
//! and `max_queued_bytes` across the port's flows; past any of these they are dropped — UDP
//! may drop, and the port never waits on one flow. A datagram counts as at least 64 bytes
//! (so empty ones meet the budget too) and is at most 65 535.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use portway_api::Target;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::{LengthDelimitedCodec, length_delimited};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::model::Table;
use crate::sidecar::Sidecar;
use crate::tunnel::OpenError;

#[derive(Clone, Debug)]
pub struct Config {
    /// The address public ports are bound on (the edge's `--http` address).
    pub ip: IpAddr,
    /// Flows (client addresses) at once on one port; default 10 000. Past it a new
    /// client's datagrams are dropped.
    pub max_flows: usize,
    /// Flows at once on one port from one client IP (any of its source ports); default 64.
    /// Past it that IP's new client addresses get their datagrams dropped.
    pub max_flows_per_ip: usize,
    /// Datagram bytes waiting across one port's flows, not yet written to their tunnels;
    /// default 64 MiB. A datagram that would pass it is dropped.
    pub max_queued_bytes: usize,
    /// A flow that carries no datagram either way for this long ends; default 60 s.
    pub idle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ip: IpAddr::from([0, 0, 0, 0]),
            max_flows: 10_000,
            max_flows_per_ip: 64,
            max_queued_bytes: 64 << 20,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Datagrams waiting for one flow's tunnel.
pub const FLOW_QUEUE: usize = 256;
/// Datagram bytes waiting for one flow's tunnel: without it [`FLOW_QUEUE`] full-size
/// datagrams would be 16 MiB for a single flow.
pub const FLOW_BYTES: usize = 1 << 20;
/// Largest datagram: the most a 2-byte length can say (and above any UDP payload).
const MAX_DATAGRAM: usize = u16::MAX as usize;
/// Time for a tunnel's end to be sent once its flow is over.
const FINISH: Duration = Duration::from_secs(1);

/// Each port of the table: listening, or why it cannot (the bind error).
pub type Binds = crate::tcp::Binds;

/// An open UDP tunnel: framed datagrams both ways.
pub trait Tunnel: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Tunnel for T {}

/// Opens a UDP tunnel to the first of `choices` (device, target) that accepts, for the
/// public client `client`; the error says why none did.
pub trait Opener: Send + Sync + 'static {
    fn open(
        &self,
        choices: Vec<(String, Target)>,
        client: SocketAddr,
    ) -> BoxFuture<'static, Result<Box<dyn Tunnel>, String>>;
}

/// Opens UDP tunnels through the sidecar.
pub struct SidecarOpener(pub Arc<Sidecar>);

impl Opener for SidecarOpener {
    fn open(
        &self,
        choices: Vec<(String, Target)>,
        client: SocketAddr,
    ) -> BoxFuture<'static, Result<Box<dyn Tunnel>, String>> {
        let sidecar = self.0.clone();
        Box::pin(async move {
            match sidecar.open_first(&choices, Some(client), true).await {
                Ok(tunnel) => Ok(Box::new(tunnel) as Box<dyn Tunnel>),
                Err(OpenError::Down(why)) => Err(format!("the device is down: {why}")),
                Err(OpenError::Refused { status, details }) => {
                    Err(details.unwrap_or_else(|| format!("the device answered {status}")))
                }
                Err(OpenError::Stream(why)) => Err(format!("the tunnel failed: {why}")),
            }
        })
    }
}

/// The framing of a UDP tunnel.
fn framing() -> length_delimited::Builder {
    let mut b = LengthDelimitedCodec::builder();
    b.length_field_length(portway_api::UDP_FRAME_LENGTH_BYTES)
        .max_frame_length(MAX_DATAGRAM);
    b
}

/// Serves the table's UDP ports until `shutdown`, telling `binds` how each fares.
pub fn spawn(
    config: Config,
    table: Arc<ArcSwap<Table>>,
    version: watch::Receiver<u64>,
    opener: Arc<dyn Opener>,
    binds: watch::Sender<Binds>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let config = Arc::new(config);
    let ports = crate::tcp::Ports {
        ip: config.ip,
        protocol: "UDP",
        wanted: {
            let table = table.clone();
            Box::new(move || table.load().udp.keys().copied().collect())
        },
        version,
        binds,
        shutdown,
    };
    tokio::spawn(ports.keep(UdpSocket::bind, move |socket, port, token| {
        let (port, ended) = Port::new(
            port,
            Arc::new(socket),
            config.clone(),
            table.clone(),
            opener.clone(),
            token,
        );
        tokio::spawn(port.serve(ended));
    }))
}

/// One bound port and its flows, owned by the port's task.
struct Port {
    port: u16,
    socket: Arc<UdpSocket>,
    config: Arc<Config>,
    table: Arc<ArcSwap<Table>>,
    opener: Arc<dyn Opener>,
    /// Cancelled when the port leaves the table, or on shutdown; ends every flow.
    closed: CancellationToken,
    flows: HashMap<SocketAddr, Flow>,
    /// How many of `flows` each client IP has; IPs with none are absent.
    flows_per_ip: HashMap<IpAddr, usize>,
    /// Datagram bytes waiting across the port's flows.
    queued: Arc<AtomicUsize>,
    /// Each flow says here that it ended (client, id), to be forgotten.
    ended: mpsc::UnboundedSender<(SocketAddr, u64)>,
    next_id: u64,
    /// Datagrams dropped: a full flow queue, too many bytes waiting, or too many flows.
    dropped: u64,
}

/// A flow as its port sees it.
struct Flow {
    /// Tells a late notice of an earlier flow of the same client from this one's.
    id: u64,
    queue: mpsc::Sender<Held>,
    budget: Arc<Budget>,
}

/// The bytes one flow has waiting, and those of its port.
struct Budget {
    flow: AtomicUsize,
    port: Arc<AtomicUsize>,
    port_limit: usize,
}

impl Budget {
    /// Counts `datagram` as waiting, unless that would pass the flow's or the port's limit
    /// (said in the error).
    fn hold(self: &Arc<Self>, datagram: Bytes) -> Result<Held, &'static str> {
        // An empty datagram still costs its slot and bookkeeping: counted as at least
        // that, so floods of tiny datagrams meet the budget too.
        let len = datagram.len().max(DATAGRAM_OVERHEAD);
        if !reserve(&self.flow, len, FLOW_BYTES) {
            return Err("flow has too many bytes waiting");
        }
        if !reserve(&self.port, len, self.port_limit) {
            self.flow.fetch_sub(len, Ordering::Relaxed);
            return Err("port has too many bytes waiting");
        }
        Ok(Held {
            datagram,
            len,
            budget: self.clone(),
        })
    }
}

/// The client "host" a flow counts against: an IPv4 address, or an IPv6 /64 (one host
/// commonly holds a whole /64, so counting its addresses one by one would not bound it).
fn host_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        IpAddr::V6(v6) => IpAddr::V4(
            v6.to_ipv4_mapped()
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
        ),
        v4 => v4,
    }
}

/// What a queued datagram costs besides its payload (the queue slot, its guard).
const DATAGRAM_OVERHEAD: usize = 64;

/// Adds `n` to `counter` if the sum stays within `limit`.
fn reserve(counter: &AtomicUsize, n: usize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
            c.checked_add(n).filter(|&sum| sum <= limit)
        })
        .is_ok()
}

/// A datagram counted against its flow's and port's budgets until this is dropped: once
/// the tunnel has it, or with the queue of a flow that ended, or wherever else it goes, so
/// the count cannot leak.
struct Held {
    /// Taken (left empty) when written; `len` still counts until the write is flushed.
    datagram: Bytes,
    len: usize,
    budget: Arc<Budget>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.flow.fetch_sub(self.len, Ordering::Relaxed);
        self.budget.port.fetch_sub(self.len, Ordering::Relaxed);
    }
}

impl Port {
    /// A port serving `socket`, and where its flows say they ended (for [`Port::serve`]).
    fn new(
        port: u16,
        socket: Arc<UdpSocket>,
        config: Arc<Config>,
        table: Arc<ArcSwap<Table>>,
        opener: Arc<dyn Opener>,
        closed: CancellationToken,
    ) -> (Self, mpsc::UnboundedReceiver<(SocketAddr, u64)>) {
        let (ended, ended_rx) = mpsc::unbounded_channel();
        let port = Self {
            port,
            socket,
            config,
            table,
            opener,
            closed,
            flows: HashMap::new(),
            flows_per_ip: HashMap::new(),
            queued: Arc::new(AtomicUsize::new(0)),
            ended,
            next_id: 0,
            dropped: 0,
        };
        (port, ended_rx)
    }

    async fn serve(mut self, mut ended: mpsc::UnboundedReceiver<(SocketAddr, u64)>) {
        let socket = self.socket.clone();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut backoff = Duration::from_millis(10);
        loop {
            tokio::select! {
                biased;
                () = self.closed.cancelled() => break,
                Some((client, id)) = ended.recv() => self.flow_ended(client, id),
                received = socket.recv_from(&mut buf) => match received {
                    Ok((n, client)) => {
                        backoff = Duration::from_millis(10);
                        self.dispatch(client, Bytes::copy_from_slice(&buf[..n]));
                    }
                    // An ICMP error for an earlier answer (on some systems): that client's
                    // trouble, not the port's.
                    Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset) => {
                        tracing::debug!(port = self.port, error = %e, "receiving a UDP datagram");
                    }
                    // Out of memory for buffers, say: pause rather than spin.
                    Err(e) => {
                        tracing::warn!(port = self.port, error = %e, "receiving a UDP datagram");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                },
            }
        }
        if self.dropped > 0 {
            tracing::info!(
                port = self.port,
                dropped = self.dropped,
                "datagrams dropped on the port while it was open"
            );
        }
    }

    /// Forgets the flow `id` of `client`, unless a newer flow took its place.
    fn flow_ended(&mut self, client: SocketAddr, id: u64) {
        if self.flows.get(&client).is_some_and(|f| f.id == id) {
            self.forget(client);
        }
    }

    /// Forgets `client`'s flow, freeing its place under the flow limits.
    fn forget(&mut self, client: SocketAddr) {
        if self.flows.remove(&client).is_none() {
            return;
        }
        if let Entry::Occupied(mut n) = self.flows_per_ip.entry(host_of(client.ip())) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
    }

    /// Hands `datagram` to `client`'s flow, opening one if it has none.
    fn dispatch(&mut self, client: SocketAddr, datagram: Bytes) {
        let datagram = match self.flows.get(&client) {
            None => datagram,
            Some(flow) => {
                let held = match flow.budget.hold(datagram) {
                    Ok(held) => held,
                    Err(why) => {
                        self.dropped += 1;
                        tracing::debug!(port = self.port, %client, dropped = self.dropped, "{why}; datagram dropped");
                        return;
                    }
                };
                match flow.queue.try_send(held) {
                    Ok(()) => return,
                    Err(TrySendError::Full(_)) => {
                        self.dropped += 1;
                        tracing::debug!(port = self.port, %client, dropped = self.dropped, "flow queue full; datagram dropped");
                        return;
                    }
                    // That flow just ended (its notice is on the way): this starts the next,
                    // counted against the next one's budget.
                    Err(TrySendError::Closed(mut held)) => {
                        self.forget(client);
                        std::mem::take(&mut held.datagram)
                    }
                }
            }
        };
        if self.flows.len() >= self.config.max_flows {
            self.dropped += 1;
            tracing::debug!(
                port = self.port,
                %client,
                "too many flows; datagram dropped"
            );
            return;
        }
        let ip = host_of(client.ip());
        if self.flows_per_ip.get(&ip).copied().unwrap_or(0) >= self.config.max_flows_per_ip {
            self.dropped += 1;
            tracing::debug!(
                port = self.port,
                %client,
                "too many flows from this IP; datagram dropped"
            );
            return;
        }
        // The backends as the table says now: a route's changes apply to new flows
        // without closing the port.
        let Some(service) = self.table.load().udp.get(&self.port).cloned() else {
            return;
        };
        let choices = service.choices();
        if choices.is_empty() {
            tracing::debug!(port = self.port, %client, route = %service.route, "no ready backend; datagram dropped");
            return;
        }
        let budget = Arc::new(Budget {
            flow: AtomicUsize::new(0),
            port: self.queued.clone(),
            port_limit: self.config.max_queued_bytes,
        });
        // Before the flow exists: no tunnel is opened for a datagram that is dropped.
        let held = match budget.hold(datagram) {
            Ok(held) => held,
            Err(why) => {
                self.dropped += 1;
                tracing::debug!(port = self.port, %client, dropped = self.dropped, "{why}; datagram dropped");
                return;
            }
        };
        let (queue, waiting) = mpsc::channel(FLOW_QUEUE);
        // Cannot fail: the queue is new and empty.
        let _ = queue.try_send(held);
        let id = self.next_id;
        self.next_id += 1;
        self.flows.insert(client, Flow { id, queue, budget });
        *self.flows_per_ip.entry(ip).or_default() += 1;
        let span =
            tracing::debug_span!("udp flow", port = self.port, %client, route = %service.route);
        let flow = run_flow(
            self.opener.open(choices, client),
            waiting,
            self.socket.clone(),
            client,
            self.config.idle_timeout,
            self.closed.clone(),
        );
        let ended = self.ended.clone();
        tokio::spawn(
            async move {
                flow.await;
                let _ = ended.send((client, id));
            }
            .instrument(span),
        );
    }
}

/// One flow: opens its tunnel, then carries datagrams until it ends.
async fn run_flow(
    open: BoxFuture<'static, Result<Box<dyn Tunnel>, String>>,
    mut waiting: mpsc::Receiver<Held>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    idle: Duration,
    closed: CancellationToken,
) {
    let opened = tokio::select! {
        opened = open => opened,
        () = closed.cancelled() => return,
    };
    match opened {
        Ok(tunnel) => carry(tunnel, &mut waiting, &socket, client, idle, &closed).await,
        Err(why) => tracing::debug!(%why, "no backend accepted; flow ended"),
    }
    // What the client sends from here on starts a new flow; what still waits is dropped
    // with `waiting`, and leaves the budgets.
    waiting.close();
}

/// Datagrams from `waiting` to the tunnel as frames, and frames from the tunnel to
/// `client`, until the tunnel ends or fails, nothing moves for `idle`, or the port closes.
async fn carry(
    tunnel: Box<dyn Tunnel>,
    waiting: &mut mpsc::Receiver<Held>,
    socket: &UdpSocket,
    client: SocketAddr,
    idle: Duration,
    closed: &CancellationToken,
) {
    let (read, write) = tokio::io::split(tunnel);
    let mut from_device = framing().new_read(read);
    let mut to_device = framing().new_write(write);
    let start = Instant::now();
    // Milliseconds after `start` that something last moved.
    let last = AtomicU64::new(0);
    let touch = || {
        let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        last.store(ms, Ordering::Relaxed);
    };
    {
        let up = async {
            // Counted until flushed: the codec's buffer holds them until then.
            let mut written = Vec::new();
            while let Some(mut held) = waiting.recv().await {
                touch();
                to_device.feed(std::mem::take(&mut held.datagram)).await?;
                written.push(held);
                // What queued meanwhile goes out in the same write, up to a queue's worth
                // so that `written` stays small.
                while written.len() < FLOW_QUEUE {
                    let Ok(mut held) = waiting.try_recv() else {
                        break;
                    };
                    to_device.feed(std::mem::take(&mut held.datagram)).await?;
                    written.push(held);
                }
                SinkExt::<Bytes>::flush(&mut to_device).await?;
                written.clear();
            }
            Ok::<_, io::Error>(())
        };
        let down = async {
            while let Some(frame) = from_device.next().await {
                let frame = frame?;
                touch();
                if let Err(e) = socket.send_to(&frame, client).await {
                    tracing::debug!(error = %e, "datagram to the client dropped");
                }
            }
            Ok::<_, io::Error>(())
        };
        let quiet = async {
            loop {
                let deadline = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
                if deadline <= Instant::now() {
                    return;
                }
                tokio::time::sleep_until(deadline).await;
            }
        };
        tokio::select! {
            r = up => if let Err(e) = r {
                tracing::debug!(error = %e, "tunnel failed; flow ended");
            },
            r = down => match r {
                Ok(()) => tracing::debug!("the device ended the flow"),
                Err(e) => tracing::debug!(error = %e, "tunnel failed; flow ended"),
            },
            () = quiet => tracing::debug!(?idle, "idle UDP flow ended"),
            () = closed.cancelled() => {}
        }
    }
    // Before the device hears the end: the client's next datagram opens a new flow rather
    // than queueing for this one.
    waiting.close();
    let _ = tokio::time::timeout(FINISH, to_device.get_mut().shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_host_is_its_64_and_a_mapped_ipv4_is_itself() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(host_of(a), host_of(b));
        assert_ne!(host_of(a), host_of(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(host_of(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    use http::HeaderValue;
    use parking_lot::Mutex;
    use tokio::io::{AsyncReadExt, DuplexStream};

    use crate::model::{Backend, HeaderFilter, TcpService};

    const DEADLINE: Duration = Duration::from_secs(10);

    type Asked = (Vec<(String, Target)>, SocketAddr);

    /// Devices that echo every frame back; counts tunnels opened and ended.
    struct Echo {
        opens: AtomicUsize,
        ended: Arc<watch::Sender<usize>>,
        /// Each open's choices and client.
        asked: Mutex<Vec<Asked>>,
    }

    impl Echo {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                opens: AtomicUsize::new(0),
                ended: Arc::new(watch::channel(0).0),
                asked: Mutex::default(),
            })
        }
    }

    impl Opener for Echo {
        fn open(
            &self,
            choices: Vec<(String, Target)>,
            client: SocketAddr,
        ) -> BoxFuture<'static, Result<Box<dyn Tunnel>, String>> {
            self.opens.fetch_add(1, Ordering::Relaxed);
            self.asked.lock().push((choices, client));
            let (edge, device) = tokio::io::duplex(64 * 1024);
            let ended = self.ended.clone();
            tokio::spawn(async move {
                let mut frames = framing().new_framed(device);
                while let Some(Ok(frame)) = frames.next().await {
                    if frames.send(frame.freeze()).await.is_err() {
                        break;
                    }
                }
                ended.send_modify(|n| *n += 1);
            });
            Box::pin(async move { Ok(Box::new(edge) as Box<dyn Tunnel>) })
        }
    }

    /// Devices that accept every tunnel and never read it; the device ends are kept here.
    #[derive(Default)]
    struct Stalled {
        asked: Mutex<Vec<SocketAddr>>,
        devices: Mutex<Vec<DuplexStream>>,
    }

    impl Opener for Stalled {
        fn open(
            &self,
            _: Vec<(String, Target)>,
            client: SocketAddr,
        ) -> BoxFuture<'static, Result<Box<dyn Tunnel>, String>> {
            self.asked.lock().push(client);
            // Small, so that the flow's writer is soon stuck on it.
            let (edge, device) = tokio::io::duplex(1024);
            self.devices.lock().push(device);
            Box::pin(async move { Ok(Box::new(edge) as Box<dyn Tunnel>) })
        }
    }

    /// Devices that refuse every tunnel.
    #[derive(Default)]
    struct Refuse {
        asked: Mutex<Vec<SocketAddr>>,
    }

    impl Opener for Refuse {
        fn open(
            &self,
            _: Vec<(String, Target)>,
            client: SocketAddr,
        ) -> BoxFuture<'static, Result<Box<dyn Tunnel>, String>> {
            self.asked.lock().push(client);
            Box::pin(async { Err("refused".to_owned()) })
        }
    }

    /// Waits until `check` holds, or panics after [`DEADLINE`].
    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !check() {
            assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A port not yet serving, for tests that hand it datagrams themselves.
    async fn port_with(
        config: Config,
        opener: Arc<dyn Opener>,
    ) -> (
        Port,
        mpsc::UnboundedReceiver<(SocketAddr, u64)>,
        CancellationToken,
    ) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let number = socket.local_addr().unwrap().port();
        let closed = CancellationToken::new();
        let (port, ended) = Port::new(
            number,
            Arc::new(socket),
            Arc::new(config),
            Arc::new(ArcSwap::from_pointee(table_with(number))),
            opener,
            closed.clone(),
        );
        (port, ended, closed)
    }

    fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    /// A port no one holds right now.
    fn free_port() -> u16 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    }

    fn target() -> (String, Target) {
        (
            "n1".into(),
            Target {
                host: "127.0.0.1".into(),
                port: 5353,
            },
        )
    }

    fn table_with(port: u16) -> Table {
        let backend = Backend {
            service: "dns".into(),
            weight: 1,
            ready: true,
            headers: HeaderFilter::default(),
            response: HeaderFilter::default(),
            tunnel: Some(crate::model::Tunnel {
                node_id: HeaderValue::from_static("n1"),
                host: HeaderValue::from_static("127.0.0.1"),
                port: HeaderValue::from_static("5353"),
                proto: HeaderValue::from_static("udp"),
                tls_name: None,
                authority: None,
            }),
        };
        let mut table = Table::default();
        table.udp.insert(
            port,
            Arc::new(TcpService::new(port, "p/dns".into(), vec![backend])),
        );
        table
    }

    struct Edge {
        table: Arc<ArcSwap<Table>>,
        version: watch::Sender<u64>,
        binds: watch::Receiver<Binds>,
        shutdown: CancellationToken,
        _task: JoinHandle<()>,
    }

    impl Drop for Edge {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    fn start(port: u16, idle: Duration, opener: Arc<Echo>) -> Edge {
        let config = Config {
            ip: IpAddr::from([127, 0, 0, 1]),
            idle_timeout: idle,
            ..Config::default()
        };
        start_with(port, config, opener)
    }

    fn start_with(port: u16, config: Config, opener: Arc<dyn Opener>) -> Edge {
        let table = Arc::new(ArcSwap::from_pointee(table_with(port)));
        let (version, version_rx) = watch::channel(0);
        let (binds_tx, binds) = watch::channel(Binds::new());
        let shutdown = CancellationToken::new();
        let task = spawn(
            config,
            table.clone(),
            version_rx,
            opener,
            binds_tx,
            shutdown.clone(),
        );
        Edge {
            table,
            version,
            binds,
            shutdown,
            _task: task,
        }
    }

    async fn listening(edge: &mut Edge, port: u16) {
        tokio::time::timeout(
            DEADLINE,
            edge.binds.wait_for(|b| b.get(&port) == Some(&Ok(()))),
        )
        .await
        .expect("the port is bound in time")
        .unwrap();
    }

    async fn client(port: u16) -> UdpSocket {
        client_on([127, 0, 0, 1], port).await
    }

    /// A client with its own source port on `ip` (any of 127/8 is loopback on Linux).
    async fn client_on(ip: [u8; 4], port: u16) -> UdpSocket {
        let c = UdpSocket::bind(addr(ip, 0)).await.unwrap();
        c.connect(("127.0.0.1", port)).await.unwrap();
        c
    }

    async fn round_trip(c: &UdpSocket, payload: &[u8]) {
        c.send(payload).await.unwrap();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let n = tokio::time::timeout(DEADLINE, c.recv(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert_eq!(&buf[..n], payload);
    }

    #[tokio::test]
    async fn each_client_is_its_own_flow_and_gets_its_own_datagrams_back_in_order() {
        let port = free_port();
        let echo = Echo::new();
        let mut edge = start(port, Duration::from_secs(60), echo.clone());
        listening(&mut edge, port).await;
        let talk = |id: usize| async move {
            let c = client(port).await;
            let payload =
                |i: usize| format!("client {id} datagram {i} {}", "x".repeat((i * 37) % 1200));
            let mut buf = vec![0u8; MAX_DATAGRAM];
            // A window in flight, not all at once: loopback UDP drops what overflows a buffer.
            let (window, total) = (16, 500);
            for i in 0..window {
                c.send(payload(i).as_bytes()).await.unwrap();
            }
            for i in 0..total {
                let n = c.recv(&mut buf).await.unwrap();
                assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), payload(i));
                if i + window < total {
                    c.send(payload(i + window).as_bytes()).await.unwrap();
                }
            }
            c.local_addr().unwrap()
        };
        let (a, b) = tokio::time::timeout(DEADLINE, async { tokio::join!(talk(1), talk(2)) })
            .await
            .expect("all datagrams back in time");
        assert_eq!(echo.opens.load(Ordering::Relaxed), 2, "one flow per client");
        let mut asked = echo.asked.lock().clone();
        asked.sort_by_key(|(_, c)| *c);
        let mut want = vec![(vec![target()], a), (vec![target()], b)];
        want.sort_by_key(|(_, c)| *c);
        assert_eq!(asked, want);
    }

    #[tokio::test]
    async fn a_client_back_after_the_idle_timeout_gets_a_new_flow() {
        let port = free_port();
        let echo = Echo::new();
        let mut edge = start(port, Duration::from_millis(200), echo.clone());
        listening(&mut edge, port).await;
        let c = client(port).await;
        round_trip(&c, b"first").await;
        assert_eq!(echo.opens.load(Ordering::Relaxed), 1);
        let mut ended = echo.ended.subscribe();
        tokio::time::timeout(DEADLINE, ended.wait_for(|n| *n == 1))
            .await
            .expect("the idle flow ends in time")
            .unwrap();
        round_trip(&c, b"again").await;
        assert_eq!(echo.opens.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_port_leaving_the_table_closes_and_ends_its_flows() {
        let port = free_port();
        let echo = Echo::new();
        let mut edge = start(port, Duration::from_secs(60), echo.clone());
        listening(&mut edge, port).await;
        let c = client(port).await;
        round_trip(&c, b"hello").await;
        edge.table.store(Arc::new(Table::default()));
        edge.version.send_replace(1);
        let mut ended = echo.ended.subscribe();
        tokio::time::timeout(DEADLINE, ended.wait_for(|n| *n == 1))
            .await
            .expect("the flow ends in time")
            .unwrap();
        tokio::time::timeout(DEADLINE, edge.binds.wait_for(Binds::is_empty))
            .await
            .expect("the port is gone from binds in time")
            .unwrap();
    }

    #[tokio::test]
    async fn a_port_another_program_holds_is_reported() {
        let holder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = holder.local_addr().unwrap().port();
        let mut edge = start(port, Duration::from_secs(60), Echo::new());
        let binds = tokio::time::timeout(DEADLINE, edge.binds.wait_for(|b| b.contains_key(&port)))
            .await
            .expect("reported in time")
            .unwrap()
            .clone();
        let why = binds[&port].clone().unwrap_err();
        assert!(
            why.starts_with(&format!("the edge cannot listen on 127.0.0.1:{port}/udp: ")),
            "{why}"
        );
    }

    #[tokio::test]
    async fn a_client_ip_gets_no_more_than_max_flows_per_ip_flows() {
        let port = free_port();
        let echo = Echo::new();
        let config = Config {
            ip: IpAddr::from([127, 0, 0, 1]),
            max_flows_per_ip: 2,
            ..Config::default()
        };
        let mut edge = start_with(port, config, echo.clone());
        listening(&mut edge, port).await;
        let (a1, a2, a3) = (client(port).await, client(port).await, client(port).await);
        round_trip(&a1, b"a1").await;
        round_trip(&a2, b"a2").await;
        a3.send(b"a3").await.unwrap();
        // The port reads its socket in order: once another IP's datagram is answered, a3's
        // has been handled.
        let b = client_on([127, 0, 0, 2], port).await;
        round_trip(&b, b"b").await;
        round_trip(&a1, b"a1 again").await;
        let mut asked: Vec<_> = echo.asked.lock().iter().map(|(_, c)| *c).collect();
        asked.sort();
        let mut want = vec![
            a1.local_addr().unwrap(),
            a2.local_addr().unwrap(),
            b.local_addr().unwrap(),
        ];
        want.sort();
        assert_eq!(asked, want, "no flow for a3");
    }

    #[tokio::test]
    async fn a_client_ip_gets_a_flow_again_once_one_of_its_flows_ends() {
        let refuse = Arc::new(Refuse::default());
        let config = Config {
            max_flows_per_ip: 1,
            ..Config::default()
        };
        let (mut port, mut ended, _closed) = port_with(config, refuse.clone()).await;
        let (a1, a2) = (addr([127, 0, 0, 1], 1001), addr([127, 0, 0, 1], 1002));
        port.dispatch(a1, Bytes::from_static(b"one"));
        port.dispatch(a2, Bytes::from_static(b"two"));
        assert_eq!(*refuse.asked.lock(), [a1]);
        assert_eq!(port.dropped, 1);
        let (client, id) = tokio::time::timeout(DEADLINE, ended.recv())
            .await
            .expect("the refused flow ends in time")
            .unwrap();
        port.flow_ended(client, id);
        port.dispatch(a2, Bytes::from_static(b"two again"));
        assert_eq!(*refuse.asked.lock(), [a1, a2]);
        assert_eq!(port.dropped, 1);
    }

    #[tokio::test]
    async fn a_flow_holds_no_more_than_flow_bytes_until_its_tunnel_takes_them() {
        let stalled = Arc::new(Stalled::default());
        let (mut port, _ended, _closed) = port_with(Config::default(), stalled.clone()).await;
        let queued = port.queued.clone();
        let client = addr([127, 0, 0, 1], 1000);
        let size = 60_000;
        let fit = FLOW_BYTES / size;
        // All offered before the flow's task first runs (the test's runtime has one thread).
        for _ in 0..fit + 10 {
            port.dispatch(client, Bytes::from(vec![7u8; size]));
        }
        assert_eq!(queued.load(Ordering::Relaxed), fit * size);
        assert_eq!(port.dropped, 10);
        // The tunnel has the first bytes; the rest of the write waits on the device.
        let mut device = stalled.devices.lock().pop().unwrap();
        let mut head = [0u8; 2];
        tokio::time::timeout(DEADLINE, device.read_exact(&mut head))
            .await
            .expect("the flow writes to its tunnel in time")
            .unwrap();
        assert_eq!(usize::from(u16::from_be_bytes(head)), size);
        for _ in 0..10 {
            port.dispatch(client, Bytes::from(vec![7u8; size]));
        }
        assert_eq!(queued.load(Ordering::Relaxed), fit * size);
        assert_eq!(port.dropped, 20);
        // Once the device reads, what was written leaves the budget, and the flow has room
        // again.
        tokio::spawn(async move { tokio::io::copy(&mut device, &mut tokio::io::sink()).await });
        eventually("the written datagrams leave the budget", || {
            queued.load(Ordering::Relaxed) == 0
        })
        .await;
        for _ in 0..fit {
            port.dispatch(client, Bytes::from(vec![7u8; size]));
        }
        assert_eq!(port.dropped, 20);
        assert_eq!(stalled.asked.lock().len(), 1, "one flow throughout");
    }

    #[tokio::test]
    async fn a_port_holds_no_more_than_max_queued_bytes_and_frees_them_when_its_flows_end() {
        let size = 60_000;
        let stalled = Arc::new(Stalled::default());
        let config = Config {
            max_queued_bytes: 5 * size,
            ..Config::default()
        };
        let (mut port, _ended, closed) = port_with(config, stalled.clone()).await;
        let queued = port.queued.clone();
        let (a, b, c) = (
            addr([127, 0, 0, 1], 1001),
            addr([127, 0, 0, 1], 1002),
            addr([127, 0, 0, 1], 1003),
        );
        for client in [a, a, a, b, b, b, c] {
            port.dispatch(client, Bytes::from(vec![7u8; size]));
        }
        assert_eq!(queued.load(Ordering::Relaxed), 5 * size);
        assert_eq!(port.dropped, 2, "b's third and c's first");
        assert_eq!(
            *stalled.asked.lock(),
            [a, b],
            "no tunnel for a dropped datagram"
        );
        // The flows end with their datagrams unwritten (devices that never read).
        closed.cancel();
        eventually("the ended flows' datagrams leave the budget", || {
            queued.load(Ordering::Relaxed) == 0
        })
        .await;
        for flow in port.flows.values() {
            assert_eq!(flow.budget.flow.load(Ordering::Relaxed), 0);
        }
    }
}
