//! Portway beside the tunnels people would pick instead, in one run on one machine: the
//! same nginx behind each, the same clients in front, every figure also as a ratio to
//! nginx reached directly.
//!
//! Run it with `bench/run` (installs the peers, builds, runs inside `unshare --net`); by
//! hand:
//!
//! ```sh
//! bench/install-peers.sh
//! cargo build --release -p portway --bins --examples
//! PEERS_BIN=bench/.tools/bin target/release/examples/peer_bench
//! ```
//!
//! Portway is measured twice: HTTP tunnels through the edge (`portway http`), and public
//! TCP ports (`portway tcp`, the same layer as socat, bore and rathole).
//!
//! `PATHS=portway,portway-tcp,dumbpipe` limits the run to some paths (direct is always
//! measured);
//! `RELAY=1` adds Portway with direct UDP off (every packet through the relay);
//! `PORTWAY_BIN` runs another `portway` build (to compare two in one run).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use portway_testkit::Process;
use portway_testkit::bench::{Wrk, wrk};
use portway_testkit::origin::Origin;

const BIG: &str = "/big.bin";
const SMALL: &str = "/small.txt";
/// Connections held open at once to measure memory per connection.
const HELD: usize = 1000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One way to reach the two targets (nginx, and the WebSocket origin).
struct Tunnel {
    name: String,
    /// Where clients connect for nginx, and the Host they send.
    web: SocketAddr,
    web_host: String,
    /// Where clients connect for the WebSocket origin, and the Host they send.
    ws: SocketAddr,
    ws_host: String,
    /// The tunnel's own processes (both ends); empty for direct.
    procs: Vec<Process>,
}

impl Tunnel {
    fn pids(&self) -> Vec<u32> {
        self.procs.iter().flat_map(|p| tree(p.pid())).collect()
    }
}

/// `pid` and its live descendants (socat forks one process per connection).
fn tree(pid: u32) -> Vec<u32> {
    let mut parents: HashMap<u32, Vec<u32>> = HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some(ppid) = stat(p).map(|s| s.ppid) {
            parents.entry(ppid).or_default().push(p);
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        out.extend(parents.get(&out[i]).cloned().unwrap_or_default());
        i += 1;
    }
    out
}

struct Stat {
    ppid: u32,
    /// utime + stime + cutime + cstime, in clock ticks.
    ticks: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields start after its closing parenthesis.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some(Stat {
        ppid: n(1) as u32,
        ticks: n(11) + n(12) + n(13) + n(14),
    })
}

fn cpu_seconds(pids: &[u32]) -> f64 {
    let hz = 100.0; // USER_HZ on Linux
    pids.iter()
        .filter_map(|p| stat(*p))
        .map(|s| s.ticks as f64 / hz)
        .sum()
}

fn rss_kib(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|p| portway_testkit::bench::rss_kib(*p))
        .sum()
}

/// Polls `GET url` with `Host: host` until it answers 200.
fn wait_200(what: &str, addr: SocketAddr, host: &str, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-m", "2", "-w", "%{http_code}"])
            .args(["-H", &format!("Host: {host}")])
            .arg(format!("http://{addr}{path}"))
            .output()
            .unwrap();
        if out.stdout == b"200" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never answered 200 on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Download speed in MB/s, best of three.
fn download_mbps(addr: SocketAddr, host: &str) -> f64 {
    (0..3)
        .map(|_| {
            let out = Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{speed_download} %{http_code}",
                ])
                .args(["-H", &format!("Host: {host}")])
                .arg(format!("http://{addr}{BIG}"))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let mut parts = text.split_whitespace();
            let speed: f64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
            assert_eq!(parts.next(), Some("200"), "download through {addr}: {text}");
            speed / 1e6
        })
        .fold(0.0, f64::max)
}

/// Median time of a request on a fresh connection, in ms (20 curl runs; curl's own
/// `time_total`, so process start is not counted).
fn fresh_ms(addr: SocketAddr, host: &str) -> f64 {
    let mut t: Vec<f64> = (0..20)
        .map(|_| {
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{time_total}"])
                .args(["-H", &format!("Host: {host}")])
                .arg(format!("http://{addr}{SMALL}"))
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .parse::<f64>()
                .unwrap_or(0.0)
                * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// New connections a second, each carrying one request (`Connection: close`) read to its
/// end, from 8 clients at once for 3 s: what a tunnel costs per connection.
async fn conns_per_s(addr: SocketAddr, host: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request =
        format!("GET {SMALL} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes();
    let until = Instant::now() + Duration::from_secs(3);
    let started = Instant::now();
    let clients = (0..8).map(|_| {
        let request = request.clone();
        async move {
            let mut done = 0u64;
            let mut buf = vec![0u8; 4096];
            while Instant::now() < until {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(&request).await.unwrap();
                let mut got = Vec::new();
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                assert!(
                    got.starts_with(b"HTTP/1.1 200"),
                    "through {addr}: {}",
                    String::from_utf8_lossy(&got[..got.len().min(200)])
                );
                done += 1;
            }
            done
        }
    });
    let total: u64 = futures::future::join_all(clients).await.into_iter().sum();
    total as f64 / started.elapsed().as_secs_f64()
}

/// Opens [`HELD`] WebSockets through `addr`, each echoing once; returns them open.
async fn hold(addr: SocketAddr, host: &str) -> Vec<impl Send> {
    let url = format!("ws://{host}/ws");
    let mut opens = futures::stream::iter(0..HELD)
        .map(|_| {
            let url = url.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let (mut ws, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
                use futures::SinkExt;
                ws.send(tokio_tungstenite::tungstenite::Message::text("hi"))
                    .await
                    .unwrap();
                let _ = ws.next().await;
                ws
            }
        })
        .buffer_unordered(50);
    let mut held = Vec::with_capacity(HELD);
    while let Some(ws) = opens.next().await {
        held.push(ws);
    }
    held
}

struct Row {
    name: String,
    mbps: f64,
    fresh_ms: f64,
    conns: f64,
    c1: Wrk,
    c64: Wrk,
    cpu_us: Option<f64>,
    held_kib: Option<f64>,
}

async fn measure(path: &Tunnel) -> Row {
    eprintln!("measuring {}", path.name);
    let (web, host) = (path.web, path.web_host.as_str());
    let url = format!("http://{web}{SMALL}");
    let _ = wrk(&url, host, 1, 8, 1);
    let mbps = download_mbps(web, host);
    let fresh_ms = fresh_ms(web, host);
    let conns = conns_per_s(web, host).await;
    let c1 = wrk(&url, host, 1, 1, 5);
    let pids = path.pids();
    let before = cpu_seconds(&pids);
    let c64 = wrk(&url, host, 2, 64, 10);
    let cpu_us = (!pids.is_empty()).then(|| {
        // socat's per-connection children come and go: count the whole tree again.
        let after = cpu_seconds(&path.pids());
        (after - before) * 1e6 / c64.requests.max(1) as f64
    });
    let held_kib = if pids.is_empty() {
        None
    } else {
        let before = rss_kib(&path.pids());
        let held = hold(path.ws, &path.ws_host).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_kib(&path.pids());
        drop(held);
        Some((after - before) / HELD as f64)
    };
    Row {
        name: path.name.clone(),
        mbps,
        fresh_ms,
        conns,
        c1,
        c64,
        cpu_us,
        held_kib,
    }
}

fn peer(bin_dir: &Path, name: &str) -> PathBuf {
    let p = bin_dir.join(name);
    assert!(
        p.exists(),
        "{} missing: run bench/install-peers.sh (or set PEERS_BIN)",
        p.display()
    );
    p
}

fn socat(web: u16, ws: u16) -> Tunnel {
    let bin = Path::new("socat");
    let mut procs = Vec::new();
    let mut listen = |target: u16| {
        let port = free_port();
        procs.push(
            Process::spawn(
                "socat",
                bin,
                [
                    format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,nodelay,backlog=4096"),
                    format!("TCP:127.0.0.1:{target},nodelay"),
                ],
            )
            .expect("socat (apt-get install -y socat)"),
        );
        loopback(port)
    };
    let (web, ws) = (listen(web), listen(ws));
    Tunnel {
        name: "socat (plain TCP relay)".into(),
        web,
        web_host: "localhost".into(),
        ws,
        ws_host: "localhost".into(),
        procs,
    }
}

fn bore(bins: &Path, web: u16, ws: u16) -> Tunnel {
    let bin = peer(bins, "bore");
    let mut procs =
        vec![Process::spawn("bore server", &bin, ["server", "--bind-addr", "127.0.0.1"]).unwrap()];
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(loopback(7835)).is_err() {
        assert!(Instant::now() < deadline, "bore server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut client = |target: u16| {
        let port = free_port();
        procs.push(
            Process::spawn(
                "bore local",
                &bin,
                [
                    "local".to_owned(),
                    target.to_string(),
                    "--to".into(),
                    "127.0.0.1".into(),
                    "--port".into(),
                    port.to_string(),
                ],
            )
            .unwrap(),
        );
        loopback(port)
    };
    let (web, ws) = (client(web), client(ws));
    Tunnel {
        name: "bore 0.6".into(),
        web,
        web_host: "localhost".into(),
        ws,
        ws_host: "localhost".into(),
        procs,
    }
}

/// rathole with `transport` (`tcp`, `noise` or `tls`): one server and one client, two
/// services.
fn rathole(bins: &Path, dir: &Path, transport: &str, web: u16, ws: u16) -> Tunnel {
    let bin = peer(bins, "rathole");
    let control = free_port();
    let (web_port, ws_port) = (free_port(), free_port());
    let (server_t, client_t) = match transport {
        "tcp" => (
            "[server.transport]\ntype = \"tcp\"\n[server.transport.tcp]\nnodelay = true\n"
                .to_owned(),
            "[client.transport]\ntype = \"tcp\"\n[client.transport.tcp]\nnodelay = true\n"
                .to_owned(),
        ),
        "noise" => {
            let out = Command::new(&bin).arg("--genkey").output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let keys: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.contains(':'))
                .collect();
            assert_eq!(keys.len(), 2, "rathole --genkey printed: {text}");
            (
                format!(
                    "[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{}\"\n",
                    keys[0].trim()
                ),
                format!(
                    "[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{}\"\n",
                    keys[1].trim()
                ),
            )
        }
        "tls" => {
            let (key, cert, p12) = (
                dir.join("key.pem"),
                dir.join("cert.pem"),
                dir.join("id.p12"),
            );
            let ok = Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ])
                .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
                .args(["-addext", "subjectAltName=DNS:localhost"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .output()
                .unwrap()
                .status
                .success()
                && Command::new("openssl")
                    .args(["pkcs12", "-export", "-passout", "pass:bench"])
                    .arg("-inkey")
                    .arg(&key)
                    .arg("-in")
                    .arg(&cert)
                    .arg("-out")
                    .arg(&p12)
                    .output()
                    .unwrap()
                    .status
                    .success();
            assert!(ok, "openssl could not make rathole's certificate");
            (
                format!(
                    "[server.transport]\ntype = \"tls\"\n[server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"bench\"\n",
                    p12.display()
                ),
                format!(
                    "[client.transport]\ntype = \"tls\"\n[client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"localhost\"\n",
                    cert.display()
                ),
            )
        }
        other => panic!("no rathole transport {other}"),
    };
    let server = dir.join(format!("rathole-{transport}-server.toml"));
    std::fs::write(
        &server,
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\n{server_t}\
             [server.services.web]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{web_port}\"\n\
             [server.services.ws]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{ws_port}\"\n"
        ),
    )
    .unwrap();
    let client = dir.join(format!("rathole-{transport}-client.toml"));
    std::fs::write(
        &client,
        format!(
            "[client]\nremote_addr = \"127.0.0.1:{control}\"\n{client_t}\
             [client.services.web]\ntoken = \"bench\"\nlocal_addr = \"127.0.0.1:{web}\"\n\
             [client.services.ws]\ntoken = \"bench\"\nlocal_addr = \"127.0.0.1:{ws}\"\n"
        ),
    )
    .unwrap();
    let procs = vec![
        Process::spawn("rathole server", &bin, [server.as_os_str()]).unwrap(),
        Process::spawn("rathole client", &bin, [client.as_os_str()]).unwrap(),
    ];
    Tunnel {
        name: format!("rathole 0.5 {transport}"),
        web: loopback(web_port),
        web_host: "localhost".into(),
        ws: loopback(ws_port),
        ws_host: "localhost".into(),
        procs,
    }
}

fn dumbpipe(bins: &Path, web: u16, ws: u16) -> Tunnel {
    let bin = peer(bins, "dumbpipe");
    let mut procs = Vec::new();
    let mut pipe = |target: u16| {
        let listen = Process::spawn(
            "dumbpipe listen-tcp",
            &bin,
            ["listen-tcp", "--host", &format!("127.0.0.1:{target}")],
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let ticket = loop {
            if let Some(t) = listen
                .logs()
                .split_whitespace()
                .find(|w| w.starts_with("endpoint") && w.len() > 40)
            {
                break t.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "dumbpipe printed no ticket:\n{}",
                listen.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let port = free_port();
        let connect = Process::spawn(
            "dumbpipe connect-tcp",
            &bin,
            [
                "connect-tcp",
                "--addr",
                &format!("127.0.0.1:{port}"),
                &ticket,
            ],
        )
        .unwrap();
        procs.extend([listen, connect]);
        loopback(port)
    };
    let (web, ws) = (pipe(web), pipe(ws));
    Tunnel {
        name: "dumbpipe 0.40 (iroh)".into(),
        web,
        web_host: "localhost".into(),
        ws,
        ws_host: "localhost".into(),
        procs,
    }
}

async fn portway(dir: &Path, web: u16, ws: u16, relay_only: bool) -> Tunnel {
    let bin = std::env::var_os("PORTWAY_BIN")
        .map_or_else(portway_testkit::bench::release_bin, PathBuf::from);
    let data = dir.join(if relay_only {
        "portway-relay"
    } else {
        "portway"
    });
    let args = portway_testkit::up_args(&data, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (up, info) = portway_testkit::start_quiet(&bin, &args, "up").await;
    let edge: SocketAddr = info["http"].as_str().unwrap().parse().unwrap();
    let data = data.to_string_lossy();
    let mut procs = vec![up];
    for (port, host) in [(web, "web.localhost"), (ws, "ws.localhost")] {
        let port = port.to_string();
        let mut args = vec!["http", &port, "--hostname", host, "--data", &data];
        if relay_only {
            args.push("--relay-only");
        }
        procs.push(portway_testkit::start_quiet(&bin, &args, "http").await.0);
    }
    Tunnel {
        name: if relay_only {
            "Portway, relay only".into()
        } else {
            "**Portway**".into()
        },
        web: edge,
        web_host: "web.localhost".into(),
        ws: edge,
        ws_host: "ws.localhost".into(),
        procs,
    }
}

/// Public TCP ports (`portway tcp`): the raw bytes through the edge's port, the
/// sidecar and iroh to the agent, as the peers above carry them.
async fn portway_tcp(dir: &Path, web: u16, ws: u16) -> Tunnel {
    let bin = std::env::var_os("PORTWAY_BIN")
        .map_or_else(portway_testkit::bench::release_bin, PathBuf::from);
    let data = dir.join("portway-tcp");
    let args = portway_testkit::up_args(&data, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (up, _) = portway_testkit::start_quiet(&bin, &args, "up").await;
    let data = data.to_string_lossy();
    let mut procs = vec![up];
    let mut public = Vec::new();
    for port in [web, ws] {
        let port = port.to_string();
        let (p, info) =
            portway_testkit::start_quiet(&bin, &["tcp", &port, "--data", &data], "tcp").await;
        let url = info["url"].as_str().unwrap().to_owned();
        let addr: SocketAddr = url.trim_start_matches("tcp://").parse().unwrap();
        public.push(addr);
        procs.push(p);
    }
    Tunnel {
        name: "**Portway TCP port**".into(),
        web: public[0],
        web_host: "localhost".into(),
        ws: public[1],
        ws_host: "localhost".into(),
        procs,
    }
}

/// Starts a peer's processes.
type Start = Box<dyn FnOnce() -> Tunnel>;

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bins =
        PathBuf::from(std::env::var("PEERS_BIN").unwrap_or_else(|_| "bench/.tools/bin".into()));
    let only: Option<Vec<String>> = std::env::var("PATHS")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    let wanted = |key: &str| only.as_ref().is_none_or(|o| o.iter().any(|k| k == key));
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (_nginx, web) = portway_testkit::bench::nginx(d);
    let origin = Origin::spawn().await.unwrap();
    let ws = origin.addr.port();

    let mut rows = Vec::new();
    let direct = Tunnel {
        name: "direct (nginx)".into(),
        web: loopback(web),
        web_host: "localhost".into(),
        ws: origin.addr,
        ws_host: "localhost".into(),
        procs: Vec::new(),
    };
    rows.push(measure(&direct).await);
    let mut paths: Vec<(&str, Start)> = vec![
        ("socat", Box::new(move || socat(web, ws))),
        (
            "bore",
            Box::new({
                let b = bins.clone();
                move || bore(&b, web, ws)
            }),
        ),
    ];
    for t in ["tcp", "noise", "tls"] {
        let (b, dir) = (bins.clone(), d.to_owned());
        let key: &'static str = match t {
            "tcp" => "rathole-tcp",
            "noise" => "rathole-noise",
            _ => "rathole-tls",
        };
        paths.push((key, Box::new(move || rathole(&b, &dir, t, web, ws))));
    }
    paths.push((
        "dumbpipe",
        Box::new({
            let b = bins.clone();
            move || dumbpipe(&b, web, ws)
        }),
    ));
    for (key, start) in paths {
        let selected = wanted(key) || (key.starts_with("rathole") && wanted("rathole"));
        if !selected {
            continue;
        }
        let path = start();
        wait_200(&path.name, path.web, &path.web_host, SMALL);
        wait_200(&path.name, path.ws, &path.ws_host, "/hello");
        rows.push(measure(&path).await);
    }
    if wanted("portway") {
        let path = portway(d, web, ws, false).await;
        wait_200(&path.name, path.web, &path.web_host, SMALL);
        rows.push(measure(&path).await);
    }
    if wanted("portway-tcp") {
        let path = portway_tcp(d, web, ws).await;
        wait_200(&path.name, path.web, &path.web_host, SMALL);
        rows.push(measure(&path).await);
    }
    if std::env::var_os("RELAY").is_some() {
        let path = portway(d, web, ws, true).await;
        wait_200(&path.name, path.web, &path.web_host, SMALL);
        rows.push(measure(&path).await);
    }

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "machine: {cpus} cores, {}; kernel {}",
        std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("model name\t: "))
            .unwrap_or("?"),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let base = &rows[0];
    let (mbps0, rps0, conns0) = (base.mbps, base.c64.rps, base.conns);
    println!(
        "| path | 256 MiB, MB/s (× direct) | c1 p50 µs | c1 p99 µs | c64 req/s (× direct) | new connections/s (× direct) | CPU µs/req (c64) | RSS KiB per held connection | fresh connection ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let opt = |v: Option<f64>, digits: usize| v.map_or("–".into(), |v| format!("{v:.digits$}"));
    for r in &rows {
        println!(
            "| {} | {:.0} ({:.2} ×) | {:.0} | {:.0} | {:.0} ({:.2} ×) | {:.0} ({:.2} ×) | {} | {} | {:.2} |",
            r.name,
            r.mbps,
            r.mbps / mbps0,
            r.c1.p50_us,
            r.c1.p99_us,
            r.c64.rps,
            r.c64.rps / rps0,
            r.conns,
            r.conns / conns0,
            opt(r.cpu_us, 0),
            opt(r.held_kib, 1),
            r.fresh_ms,
        );
    }
}
