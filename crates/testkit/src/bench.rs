//! Helpers the release benchmarks share (`crates/portway/examples`): resident memory of a
//! process and wrk runs, parsed.

use std::path::PathBuf;
use std::process::Command;

/// The release `portway` beside the running example (`target/release/examples/..`).
/// Panics with the build command when it is missing.
pub fn release_bin() -> PathBuf {
    let bin = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.join("portway")))
        .unwrap_or_default();
    assert!(
        bin.exists(),
        "build first: cargo build --release -p portway --bins --examples"
    );
    bin
}

/// The number after `--name` on the command line, else `default`.
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile (0 to 1) of `sorted`, which must not be empty.
pub fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Resident set size of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// One wrk run: requests per second and latency percentiles in µs.
pub struct Wrk {
    pub rps: f64,
    /// Requests completed in the run.
    pub requests: u64,
    pub p50_us: f64,
    pub p99_us: f64,
}

fn parse_latency(v: &str) -> f64 {
    let (num, unit): (String, String) = v.chars().partition(|c| c.is_ascii_digit() || *c == '.');
    let n: f64 = num.parse().unwrap_or(0.0);
    match unit.as_str() {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        _ => n,
    }
}

/// wrk's report for `url` with `Host: host`, `option` added (`--latency`, a timeout).
fn run_wrk(
    url: &str,
    host: &str,
    threads: u32,
    conns: u32,
    secs: u32,
    option: [&str; 2],
) -> String {
    let out = Command::new("wrk")
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &conns.to_string(),
            "-d",
            &format!("{secs}s"),
            "-H",
            &format!("Host: {host}"),
        ])
        .args(option.iter().filter(|o| !o.is_empty()))
        .arg(url)
        .output()
        .expect("wrk (apt-get install -y wrk)");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs wrk against `url` with `Host: host`; panics when wrk is missing or saw non-2xx.
pub fn wrk(url: &str, host: &str, threads: u32, conns: u32, secs: u32) -> Wrk {
    let text = run_wrk(url, host, threads, conns, secs, ["--latency", ""]);
    assert!(!text.contains("Non-2xx"), "wrk saw errors:\n{text}");
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_owned()))
            .unwrap_or_default()
    };
    Wrk {
        rps: field("Requests/sec:").parse().unwrap_or(0.0),
        requests: text
            .lines()
            .find(|l| l.contains(" requests in "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        p50_us: parse_latency(&field("50%")),
        p99_us: parse_latency(&field("99%")),
    }
}

/// A wrk run that may see errors, for outages.
pub struct WrkErrors {
    pub requests: u64,
    /// Answers other than 2xx and 3xx.
    pub non_2xx: u64,
    /// Connect, read, write and timeout errors together.
    pub socket_errors: u64,
    /// The longest request, in µs.
    pub max_us: f64,
}

/// Runs wrk against `url` with `Host: host` and counts what went wrong. wrk's timeout is
/// raised to 60 s, so a request that waits shows as latency, not as a timeout.
pub fn wrk_errors(url: &str, host: &str, threads: u32, conns: u32, secs: u32) -> WrkErrors {
    let text = run_wrk(url, host, threads, conns, secs, ["--timeout", "60s"]);
    let line = |needle: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.contains(needle))
            .unwrap_or_default()
            .to_owned()
    };
    let numbers = |l: &str| -> u64 {
        l.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u64>().ok())
            .sum()
    };
    let latency = line("Latency");
    WrkErrors {
        requests: line(" requests in ")
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        non_2xx: numbers(&line("Non-2xx")),
        socket_errors: numbers(&line("Socket errors")),
        max_us: parse_latency(latency.split_whitespace().nth(3).unwrap_or("0")),
    }
}

/// `portway http PORT --hostname bench.localhost` against the `portway up` in `data`,
/// ready once its ready file is written.
pub async fn http_tunnel(
    bin: &std::path::Path,
    data: &std::path::Path,
    port: u16,
) -> (crate::Process, serde_json::Value) {
    let port = port.to_string();
    let data = data.to_string_lossy();
    let args = [
        "http",
        &port,
        "--hostname",
        "bench.localhost",
        "--data",
        &data,
    ];
    crate::start_quiet(bin, &args, "http").await
}

/// The data-path benchmarks' setup: nginx (see [`nginx`]) in `dir`, `portway up` with
/// its data in `dir/data`, and `portway http` publishing nginx at `bench.localhost`.
pub struct TunnelStack {
    pub nginx: crate::Process,
    pub nginx_port: u16,
    pub data: std::path::PathBuf,
    pub up: crate::Process,
    /// `portway up`'s ready file.
    pub info: serde_json::Value,
    /// The edge's HTTP listener.
    pub edge: std::net::SocketAddr,
    pub http: crate::Process,
}

impl TunnelStack {
    /// # Panics
    /// When a part does not start.
    pub async fn start(bin: &std::path::Path, dir: &std::path::Path) -> Self {
        let (nginx, nginx_port) = nginx(dir);
        let data = dir.join("data");
        let args = crate::up_args(&data, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (up, info) = crate::start_quiet(bin, &args, "up").await;
        let edge = info["http"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("the edge's address in up's ready file");
        let (http, _) = http_tunnel(bin, &data, nginx_port).await;
        Self {
            nginx,
            nginx_port,
            data,
            up,
            info,
            edge,
            http,
        }
    }
}

/// nginx with sendfile and one worker on a free loopback port, serving `big.bin` (256 MiB
/// of [`crate::origin::pattern`]) and `small.txt` from `dir`; stops when dropped.
///
/// # Panics
/// When nginx is missing or does not start within 10 s.
pub fn nginx(dir: &std::path::Path) -> (crate::Process, u16) {
    use std::time::{Duration, Instant};
    let root = dir.join("www");
    std::fs::create_dir_all(&root).unwrap();
    let big: Vec<u8> = (0..256u64 * 1024 * 1024)
        .map(crate::origin::pattern)
        .collect();
    std::fs::write(root.join("big.bin"), big).unwrap();
    std::fs::write(root.join("small.txt"), "hello, world\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/nginx.err warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 8192; }}
http {{ access_log off; sendfile on; tcp_nopush on; tcp_nodelay on; keepalive_requests 1000000; keepalive_timeout 300;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp; uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  server {{ listen 127.0.0.1:{port} default_server; root {root}; }} }}",
            d = dir.display(),
            root = root.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let child = crate::Process::spawn(
        "nginx",
        std::path::Path::new("nginx"),
        ["-c", conf.to_str().unwrap(), "-p", dir.to_str().unwrap()],
    )
    .expect("nginx (apt-get install -y nginx)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, port)
}

/// wrk's requests/s for `http://edge{path}` with `Host: host` and `headers`, 64
/// connections on 2 threads for 5 s; panics when any answer was not 2xx.
///
/// # Panics
/// When wrk is missing, saw refusals, or printed no rate.
pub fn wrk_rps(edge: std::net::SocketAddr, host: &str, path: &str, headers: &[&str]) -> f64 {
    let mut cmd = std::process::Command::new("wrk");
    cmd.args(["-t", "2", "-c", "64", "-d", "5s"]);
    cmd.args(["-H", &format!("Host: {host}")]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(format!("http://{edge}{path}"))
        .output()
        .expect("wrk (apt-get install -y wrk)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!text.contains("Non-2xx"), "wrk saw refusals:\n{text}");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in wrk's output:\n{text}"))
}

/// Side-by-side pairs `(without, with)`: the medians of each side and of the ratios.
pub fn pair_medians(runs: &[(f64, f64)]) -> (f64, f64, f64) {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0
    };
    (
        median(runs.iter().map(|r| r.0).collect()),
        median(runs.iter().map(|r| r.1).collect()),
        median(runs.iter().map(|r| r.1 / r.0).collect()),
    )
}
