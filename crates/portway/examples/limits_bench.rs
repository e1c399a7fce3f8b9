//! Figures of the parser and connection limits, from one run of release binaries:
//! the time the API server takes to answer 3 MiB bodies of hostile shapes, and the edge's
//! latency, request rate and memory while it holds many idle keep-alive connections,
//! beside the same figures with none held.
//!
//! ```sh
//! apt-get install -y wrk curl
//! cargo build --release -p portway --bins --examples
//! target/release/examples/limits_bench [IDLE_CONNECTIONS]   # default 19000
//! ```
//!
//! Each process may have at most `ulimit -Hn` descriptors (20 000 on the machines this
//! was written on): the bench holds the client ends, `portway up` the server ends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use portway_testkit::bench::{rss_kib, wrk};
use portway_testkit::origin::Origin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB3: usize = 3 * 1024 * 1024 - 64;

/// 3 MiB bodies, by name: (content type, bytes).
fn bodies() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let repeat = |unit: &str, close: &str| {
        let n = MIB3 / (unit.len() + close.len());
        let mut b = unit.repeat(n);
        b.push_str(&close.repeat(n));
        b.into_bytes()
    };
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
    for i in 1..9 {
        let prev = if i == 1 {
            "a".to_owned()
        } else {
            format!("a{}", i - 1)
        };
        bomb.push_str(&format!(
            "a{i}: &a{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
        ));
    }
    let mut padded = format!("pad: \"{}\"\n", "x".repeat(MIB3 - bomb.len() - 16));
    padded.push_str(&bomb);
    vec![
        (
            "JSON [[[…",
            "application/json",
            "[".repeat(MIB3).into_bytes(),
        ),
        (
            "YAML [[[…",
            "application/yaml",
            "[".repeat(MIB3).into_bytes(),
        ),
        ("YAML {a: {a: …", "application/yaml", repeat("{a: ", "}")),
        (
            "YAML - - - …",
            "application/yaml",
            "- ".repeat(MIB3 / 2).into_bytes(),
        ),
        (
            "YAML alias bomb, padded to 3 MiB",
            "application/yaml",
            padded.into_bytes(),
        ),
    ]
}

/// Seconds curl needed for the whole exchange, and the status code.
fn post(
    api: &str,
    ca: &std::path::Path,
    token: &str,
    ctype: &str,
    body: &std::path::Path,
) -> (String, f64) {
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}"])
        .arg("--cacert")
        .arg(ca)
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["-H", &format!("Content-Type: {ctype}"), "--data-binary"])
        .arg(format!("@{}", body.display()))
        .arg(format!(
            "{api}/apis/networking.datumapis.com/v1alpha/namespaces/default/httpproxies"
        ))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut parts = text.split_whitespace();
    let code = parts.next().unwrap_or_default().to_owned();
    (
        code,
        parts.next().and_then(|t| t.parse().ok()).unwrap_or(0.0),
    )
}

/// Opens `n` connections to the edge, each answered once (so it is an idle keep-alive
/// connection, not a half-sent one the header timeout would close), and keeps them.
async fn hold(edge: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::with_capacity(n);
    let mut opens = futures::stream::iter(0..n)
        .map(|_| async move {
            let mut s = tokio::net::TcpStream::connect(edge).await.ok()?;
            s.write_all(b"GET /hello HTTP/1.1\r\nHost: idle.localhost\r\n\r\n")
                .await
                .ok()?;
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
                let k = s.read(&mut buf).await.ok()?;
                if k == 0 {
                    return None;
                }
                got.extend_from_slice(&buf[..k]);
            }
            // The body of the 404 is small and arrives with the head.
            Some(s)
        })
        .buffer_unordered(256);
    while let Some(s) = opens.next().await {
        held.extend(s);
    }
    held
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = portway_serve::raise_fd_limit();
    let idle: usize = std::env::args()
        .nth(1)
        .map_or(19_000, |a| a.parse().expect("IDLE_CONNECTIONS is a number"));
    let bin = portway_testkit::bench::release_bin();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let args = portway_testkit::up_args(&data, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (up, info) = portway_testkit::start_quiet(&bin, &args, "up").await;
    let edge: SocketAddr = info["http"].as_str().unwrap().parse().unwrap();
    let api = info["apiserver"].as_str().unwrap().to_owned();
    let ca = data.join("pki/ca.crt");
    let token = std::fs::read_to_string(data.join("tokens.csv"))
        .unwrap()
        .lines()
        .find(|l| l.contains(",admin,"))
        .and_then(|l| l.split(',').next())
        .unwrap()
        .to_owned();
    let origin = Origin::spawn().await.unwrap();
    let (_http, _) = portway_testkit::bench::http_tunnel(&bin, &data, origin.addr.port()).await;

    println!("## 3 MiB bodies (release API server, over HTTPS with curl)");
    println!("| body | answer | seconds |");
    println!("|---|---|---|");
    for (name, ctype, bytes) in bodies() {
        let f = tmp.path().join("body");
        std::fs::write(&f, &bytes).unwrap();
        let (code, secs) = post(&api, &ca, &token, ctype, &f);
        println!("| {name} ({} bytes) | {code} | {secs:.3} |", bytes.len());
    }

    let url = format!("http://{edge}/hello");
    let _ = wrk(&url, "bench.localhost", 1, 8, 1);
    let base_rss = rss_kib(up.pid());
    let one = wrk(&url, "bench.localhost", 1, 1, 5);
    let many = wrk(&url, "bench.localhost", 2, 64, 5);

    let t0 = Instant::now();
    let held = hold(edge, idle).await;
    let opened = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held_rss = rss_kib(up.pid());
    let one_held = wrk(&url, "bench.localhost", 1, 1, 5);
    let many_held = wrk(&url, "bench.localhost", 2, 64, 5);
    let still_open = {
        let mut probe = [0u8; 1];
        let mut open = 0;
        for s in &held {
            if matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            {
                open += 1;
            }
        }
        open
    };

    println!();
    println!(
        "## Edge with {} idle keep-alive connections held ({} asked; opened in {:.1} s; {} still open after the runs)",
        held.len(),
        idle,
        opened.as_secs_f64(),
        still_open
    );
    println!("| figure | none held | held | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| 1 connection p50 µs | {:.0} | {:.0} | {:.2} |",
        one.p50_us,
        one_held.p50_us,
        one_held.p50_us / one.p50_us
    );
    println!(
        "| 1 connection p99 µs | {:.0} | {:.0} | {:.2} |",
        one.p99_us,
        one_held.p99_us,
        one_held.p99_us / one.p99_us
    );
    println!(
        "| 64 connections req/s | {:.0} | {:.0} | {:.2} |",
        many.rps,
        many_held.rps,
        many_held.rps / many.rps
    );
    println!(
        "| `portway up` RSS MiB | {:.1} | {:.1} | {:.2} KiB per held connection |",
        base_rss / 1024.0,
        held_rss / 1024.0,
        (held_rss - base_rss) / held.len().max(1) as f64
    );
    drop(held);
}
