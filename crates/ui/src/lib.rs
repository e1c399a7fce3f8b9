//! The device's window: a local web page and JSON API served by `portway http` and
//! `portway agent` (default `127.0.0.1:4040`, as ngrok's inspector). It shows every tunnel
//! (public URLs, state, the path to each gateway, live traffic, its objects' conditions)
//! with a pause switch, lets `portway agent` add, edit and remove tunnels in its config
//! file, and inspects http tunnels' requests with replay against the local app.
//!
//! It listens on loopback only, answers nothing without the per-run token (in the link it
//! prints, kept by the browser as a cookie, and in the owner-only ready file), answers
//! only requests whose `Host` names loopback (a DNS rebinding page cannot reach it), and
//! changes nothing unless the token comes in a header, which no cross-site request can
//! send.

mod api;
mod file;
mod guard;
mod replay;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portway_agent::{Handle, Tunnel};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How the UI is started.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Where to listen; loopback only. Unset: the default, or the next free one of the
    /// twenty ports after it, or else any free port.
    pub listen: Option<SocketAddr>,
    /// `http` for the one-liner, `agent` for `portway agent`.
    pub mode: &'static str,
    /// The agent's config file: tunnels may be added, edited and removed there.
    pub config_file: Option<PathBuf>,
    /// Tunnels given by flags: shown, never edited (the file does not hold them).
    pub flag_tunnels: Vec<Tunnel>,
    /// Public URLs known for a tunnel (the one-liner knows its edge's scheme and port).
    pub urls: BTreeMap<String, Vec<String>>,
}

/// The default address, as ngrok's.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4040);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--ui {0}: the UI listens on loopback only (127.0.0.1, ::1): it shows requests' headers and bodies and can replay them"
    )]
    NotLoopback(SocketAddr),
    #[error("--ui {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
}

/// A running UI.
pub struct Ui {
    addr: SocketAddr,
    token: String,
    task: JoinHandle<()>,
}

impl Ui {
    /// Binds and serves until dropped.
    ///
    /// # Errors
    /// When the address is not loopback or cannot be bound.
    pub async fn start(agent: Handle, options: Options) -> Result<Self, Error> {
        let listener = bind(options.listen).await?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Bind(addr_of(&options), e))?;
        let token = guard::new_token();
        let state = Arc::new(State {
            agent,
            token: token.clone(),
            port: addr.port(),
            options,
            history: parking_lot::Mutex::default(),
            conditions: tokio::sync::Mutex::default(),
        });
        tokio::spawn(sample(Arc::downgrade(&state)));
        let app = api::router(state);
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "the local UI stopped");
            }
        });
        Ok(Self { addr, token, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The page's address.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The link to print: it carries the token, which the page keeps as a cookie.
    pub fn login_url(&self) -> String {
        format!("http://{}/?token={}", self.addr, self.token)
    }

    /// What the API asks of changes (header `X-Portway-Token`), for scripts: it is in
    /// the ready file, and in the page.
    pub fn token(&self) -> &str {
        &self.token
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn addr_of(options: &Options) -> SocketAddr {
    options.listen.unwrap_or(DEFAULT_LISTEN)
}

/// The address asked for; for the default one, the next free port when it is taken (a
/// second `portway http` on the machine gets 4041, as ngrok's second agent does).
async fn bind(listen: Option<SocketAddr>) -> Result<TcpListener, Error> {
    let addr = listen.unwrap_or(DEFAULT_LISTEN);
    if !addr.ip().is_loopback() {
        return Err(Error::NotLoopback(addr));
    }
    let tries = if listen.is_none() { 20 } else { 1 };
    let mut last = None;
    for i in 0..tries {
        let at = SocketAddr::new(addr.ip(), addr.port() + i);
        match TcpListener::bind(at).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(Error::Bind(at, e)),
        }
    }
    if listen.is_none() {
        // Twenty agents on one machine: any free port, printed as always.
        let any = SocketAddr::new(addr.ip(), 0);
        return TcpListener::bind(any)
            .await
            .map_err(|e| Error::Bind(any, e));
    }
    Err(Error::Bind(
        addr,
        last.unwrap_or_else(|| std::io::Error::other("no port")),
    ))
}

/// One second of a tunnel's traffic.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
struct Sample {
    /// Unix seconds.
    t: u64,
    requests: u64,
    bytes_in: u64,
    bytes_out: u64,
}

/// Seconds of history kept per tunnel.
const HISTORY: usize = 60;

struct State {
    agent: Handle,
    token: String,
    port: u16,
    options: Options,
    /// Per tunnel: the last counters read and the last minute's samples.
    history: parking_lot::Mutex<HashMap<String, (Sample, VecDeque<Sample>)>>,
    /// The tunnels' objects' conditions, read at most every few seconds.
    conditions: tokio::sync::Mutex<Option<(Instant, api::Conditions)>>,
}

/// Reads every tunnel's counters once a second, for the charts; ends with the UI.
async fn sample(state: std::sync::Weak<State>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let names: Vec<String> = state.agent.tunnels().into_iter().map(|t| t.name).collect();
        let mut history = state.history.lock();
        history.retain(|name, _| names.contains(name));
        for name in names {
            let traffic = state.agent.traffic().of(&name);
            let load =
                |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            let now = Sample {
                t,
                requests: load(&traffic.requests),
                bytes_in: load(&traffic.bytes_in),
                bytes_out: load(&traffic.bytes_out),
            };
            let (last, samples) = history.entry(name).or_insert((now, VecDeque::new()));
            samples.push_back(Sample {
                t,
                requests: now.requests.saturating_sub(last.requests),
                bytes_in: now.bytes_in.saturating_sub(last.bytes_in),
                bytes_out: now.bytes_out.saturating_sub(last.bytes_out),
            });
            if samples.len() > HISTORY {
                samples.pop_front();
            }
            *last = now;
        }
    }
}
