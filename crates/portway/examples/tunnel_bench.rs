//! Data-path benchmark: every figure through Portway beside the same figure direct to the
//! target, from one run on one machine, as ratios.
//!
//! Needs nginx, wrk and curl (`apt-get install -y nginx wrk curl`) and release binaries:
//!
//! ```sh
//! cargo build --release -p portway --bins --examples
//! target/release/examples/tunnel_bench
//! ```
//!
//! Target: nginx with sendfile serving a 256 MiB file and a 13-byte file. Path:
//! client → `portway up` edge (in-process sidecar) → iroh (direct UDP on loopback) →
//! `portway http` agent → nginx.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, PostParams};
use portway_api::HttpProxy;
use portway_testkit::bench::{rss_kib, wrk};
use portway_testkit::origin::Origin;
use serde_json::json;

/// curl download speed in MB/s (best of three).
fn curl_mbps(url: &str, connect_to: Option<SocketAddr>, host: &str) -> f64 {
    (0..3)
        .map(|_| {
            let mut cmd = Command::new("curl");
            cmd.args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{speed_download} %{http_code}",
            ]);
            if let Some(addr) = connect_to {
                cmd.args([
                    "--connect-to",
                    &format!("{host}:80:{}:{}", addr.ip(), addr.port()),
                ]);
            }
            let out = cmd.arg(url).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let mut parts = text.split_whitespace();
            let speed: f64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
            assert_eq!(parts.next(), Some("200"), "curl {url}: {text}");
            speed / 1e6
        })
        .fold(0.0, f64::max)
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bin = portway_testkit::bench::release_bin();
    let tmp = tempfile::tempdir().unwrap();
    let stack = portway_testkit::bench::TunnelStack::start(&bin, tmp.path()).await;
    let portway_testkit::bench::TunnelStack {
        nginx: _nginx,
        nginx_port,
        data,
        up,
        info,
        edge,
        http,
    } = stack;

    let direct = format!("http://127.0.0.1:{nginx_port}");
    let tunnel = format!("http://{edge}");
    // Warm both paths (connections, pools).
    let _ = wrk(&format!("{direct}/small.txt"), "localhost", 1, 8, 1);
    let _ = wrk(&format!("{tunnel}/small.txt"), "bench.localhost", 1, 8, 1);

    eprintln!("measuring throughput");
    let big_direct = curl_mbps(&format!("{direct}/big.bin"), None, "localhost");
    let big_tunnel = curl_mbps(
        "http://bench.localhost/big.bin",
        Some(edge),
        "bench.localhost",
    );
    eprintln!("measuring latency and request rates");
    let one_direct = wrk(&format!("{direct}/small.txt"), "localhost", 1, 1, 5);
    let one_tunnel = wrk(&format!("{tunnel}/small.txt"), "bench.localhost", 1, 1, 5);
    let many_direct = wrk(&format!("{direct}/small.txt"), "localhost", 2, 64, 10);
    let many_tunnel = wrk(&format!("{tunnel}/small.txt"), "bench.localhost", 2, 64, 10);

    // 1000 tunnelled connections held open (WebSockets), RSS per connection.
    eprintln!("opening 1000 tunnelled WebSockets");
    let origin = Origin::spawn().await.unwrap();
    let oport = origin.addr.port().to_string();
    let (ws_http, _) = portway_testkit::start_quiet(
        &bin,
        &[
            "http",
            &oport,
            "--hostname",
            "ws.localhost",
            "--data",
            data.to_str().unwrap(),
        ],
        "ws-http",
    )
    .await;
    let (edge_before, agent_before) = (rss_kib(up.pid()), rss_kib(ws_http.pid()));
    let mut sockets = Vec::new();
    let mut opens = futures::stream::iter(0..1000)
        .map(|_| async move {
            let tcp = tokio::net::TcpStream::connect(edge).await.unwrap();
            tokio_tungstenite::client_async("ws://ws.localhost/ws", tcp)
                .await
                .unwrap()
                .0
        })
        .buffer_unordered(50);
    while let Some(ws) = opens.next().await {
        sockets.push(ws);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (edge_after, agent_after) = (rss_kib(up.pid()), rss_kib(ws_http.pid()));
    let per_edge = (edge_after - edge_before) / 1000.0;
    let per_agent = (agent_after - agent_before) / 1000.0;
    drop(sockets);

    // HTTPProxy create → first 200 through the edge (connector and advertisement exist).
    eprintln!("measuring HTTPProxy create → first 200");
    let admin = {
        let kc = kube::config::Kubeconfig::read_from(info["kubeconfig"].as_str().unwrap()).unwrap();
        kube::Client::try_from(
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap(),
        )
        .unwrap()
    };
    let proxies: Api<HttpProxy> = Api::namespaced(admin.clone(), "default");
    let bench = proxies
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|p| p.spec.hostnames == ["bench.localhost"])
        .unwrap();
    let connector = bench.spec.rules[0].backends[0]
        .connector
        .clone()
        .unwrap()
        .name
        .unwrap();
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut to_first = Vec::new();
    for i in 0..10 {
        let host = format!("t{i}.localhost");
        let p = serde_json::from_value(json!({
            "metadata": {"name": format!("latency-{i}")},
            "spec": {"hostnames": [host], "rules": [{"backends": [{"endpoint": format!("http://127.0.0.1:{nginx_port}"), "connector": {"name": connector}}]}]},
        }))
        .unwrap();
        let t0 = Instant::now();
        proxies.create(&PostParams::default(), &p).await.unwrap();
        loop {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{host} never answered 200"
            );
            let req = http::Request::get(format!("http://{edge}/small.txt"))
                .header("host", &host)
                .body(http_body_util::Empty::new())
                .unwrap();
            if plain.request(req).await.is_ok_and(|r| r.status() == 200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        to_first.push(t0.elapsed());
    }
    to_first.sort();

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "machine: {cpus} cores, {}",
        std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("model name\t: "))
            .unwrap_or("?")
    );
    println!("| figure | direct (nginx) | through Portway | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| 256 MiB download, MB/s (curl, best of 3) | {big_direct:.0} | {big_tunnel:.0} | {:.2} × |",
        big_tunnel / big_direct
    );
    println!(
        "| 1 connection, p50 latency (wrk) | {:.0} µs | {:.0} µs | {:.2} × |",
        one_direct.p50_us,
        one_tunnel.p50_us,
        one_tunnel.p50_us / one_direct.p50_us
    );
    println!(
        "| 1 connection, p99 latency (wrk) | {:.0} µs | {:.0} µs | {:.2} × |",
        one_direct.p99_us,
        one_tunnel.p99_us,
        one_tunnel.p99_us / one_direct.p99_us
    );
    println!(
        "| 64 connections, requests/s (wrk -t2) | {:.0} | {:.0} | {:.2} × |",
        many_direct.rps,
        many_tunnel.rps,
        many_tunnel.rps / many_direct.rps
    );
    println!(
        "| RSS per open tunnelled connection (1000 WebSockets): edge / agent | – | {per_edge:.1} KiB / {per_agent:.1} KiB | – |"
    );
    println!(
        "| HTTPProxy create → first 200 (n=10) | – | p50 {:.0} ms, max {:.0} ms | – |",
        to_first[4].as_secs_f64() * 1e3,
        to_first[9].as_secs_f64() * 1e3
    );
    drop(http);
}
