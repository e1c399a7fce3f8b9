//! Public UDP ports (`portway udp 53`): one socket per UDP port of the route table, bound
//! and closed as the table changes. Each client address is a flow: its datagrams go
//! through one tunnel (a CONNECT with `datum-target-proto: udp`, then each datagram framed
//! by its 2-byte length) to the first of the port's backends whose device accepts (ready
//! ones in round-robin order, devices that are down last), and what the device sends back
//! leaves the port for that client. A flow ends when its tunnel does, when nothing moves
//! either way for the idle timeout, or when the port closes; the client's next datagram
//! opens a new one.
//!
//! Limits: `max_flows` flows per port, past which a new client's datagrams are dropped;
//! [`FLOW_QUEUE`] datagrams waiting per flow (while its tunnel opens, or when the tunnel is
//! slower than the client), past which they are dropped — UDP may drop, and the port never
//! waits on one flow. A datagram is at most 65 535 bytes.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// A flow that carries no datagram either way for this long ends; default 60 s.
    pub idle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ip: IpAddr::from([0, 0, 0, 0]),
            max_flows: 10_000,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Datagrams waiting for one flow's tunnel.
pub const FLOW_QUEUE: usize = 256;
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
        let (ended, ended_rx) = mpsc::unbounded_channel();
        let port = Port {
            port,
            socket: Arc::new(socket),
            config: config.clone(),
            table: table.clone(),
            opener: opener.clone(),
            closed: token,
            flows: HashMap::new(),
            ended,
            next_id: 0,
            dropped: 0,
        };
        tokio::spawn(port.serve(ended_rx));
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
    /// Each flow says here that it ended (client, id), to be forgotten.
    ended: mpsc::UnboundedSender<(SocketAddr, u64)>,
    next_id: u64,
    /// Datagrams dropped: a full flow queue, or too many flows.
    dropped: u64,
}

/// A flow as its port sees it.
struct Flow {
    /// Tells a late notice of an earlier flow of the same client from this one's.
    id: u64,
    queue: mpsc::Sender<Bytes>,
}

impl Port {
    async fn serve(mut self, mut ended: mpsc::UnboundedReceiver<(SocketAddr, u64)>) {
        let socket = self.socket.clone();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut backoff = Duration::from_millis(10);
        loop {
            tokio::select! {
                biased;
                () = self.closed.cancelled() => break,
                Some((client, id)) = ended.recv() => {
                    if self.flows.get(&client).is_some_and(|f| f.id == id) {
                        self.flows.remove(&client);
                    }
                }
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

    /// Hands `datagram` to `client`'s flow, opening one if it has none.
    fn dispatch(&mut self, client: SocketAddr, datagram: Bytes) {
        let datagram = match self.flows.get(&client) {
            None => datagram,
            Some(flow) => match flow.queue.try_send(datagram) {
                Ok(()) => return,
                Err(TrySendError::Full(_)) => {
                    self.dropped += 1;
                    tracing::debug!(port = self.port, %client, dropped = self.dropped, "flow queue full; datagram dropped");
                    return;
                }
                // That flow just ended (its notice is on the way): this starts the next.
                Err(TrySendError::Closed(datagram)) => {
                    self.flows.remove(&client);
                    datagram
                }
            },
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
        let (queue, waiting) = mpsc::channel(FLOW_QUEUE);
        // Cannot fail: the queue is new and empty.
        let _ = queue.try_send(datagram);
        let id = self.next_id;
        self.next_id += 1;
        self.flows.insert(client, Flow { id, queue });
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
    mut waiting: mpsc::Receiver<Bytes>,
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
    // What the client sends from here on starts a new flow.
    waiting.close();
}

/// Datagrams from `waiting` to the tunnel as frames, and frames from the tunnel to
/// `client`, until the tunnel ends or fails, nothing moves for `idle`, or the port closes.
async fn carry(
    tunnel: Box<dyn Tunnel>,
    waiting: &mut mpsc::Receiver<Bytes>,
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
            while let Some(datagram) = waiting.recv().await {
                touch();
                to_device.feed(datagram).await?;
                // What queued meanwhile goes out in the same write.
                while let Ok(datagram) = waiting.try_recv() {
                    to_device.feed(datagram).await?;
                }
                SinkExt::<Bytes>::flush(&mut to_device).await?;
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

    use http::HeaderValue;
    use parking_lot::Mutex;
    use std::sync::atomic::AtomicUsize;

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
        let table = Arc::new(ArcSwap::from_pointee(table_with(port)));
        let (version, version_rx) = watch::channel(0);
        let (binds_tx, binds) = watch::channel(Binds::new());
        let shutdown = CancellationToken::new();
        let config = Config {
            ip: IpAddr::from([127, 0, 0, 1]),
            idle_timeout: idle,
            ..Config::default()
        };
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
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
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
}
