//! What the local UI's request inspector costs the data path: requests/s through a device
//! whose UI is on (every exchange of its http tunnel followed and recorded) beside one with
//! `--no-ui`, in one run, as ratios; then again with a viewer on the live stream.
//!
//! Needs nginx, wrk and curl (`apt-get install -y nginx wrk curl`) and release binaries:
//!
//! ```sh
//! cargo build --release -p portway --bins --examples
//! target/release/examples/inspect_bench
//! ```
//!
//! Path: wrk (64 connections, 2 threads, 5 s) → `portway up` edge → iroh → a `portway
//! http` agent → nginx serving a 13-byte file (and, in a second case, a 64 KiB one). Two
//! agents publish the same nginx: `ui.localhost` with the UI on (its default), `plain.localhost`
//! with `--no-ui`. They are measured in turn, eight times (each first in every other
//! pair), and the median of the eight ratios is reported (this machine's req/s drifts by
//! ±30% over a minute, so only side-by-side pairs compare).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;

/// req/s for `path` with `Host: host`, 64 connections for 5 s.
fn rps(edge: SocketAddr, host: &str, path: &str) -> f64 {
    portway_testkit::bench::wrk_rps(edge, host, path, &[])
}

/// Eight pairs, `plain` and `ui` in turn, each going first in every other pair (the
/// machine's rate drifts within a pair too): the medians of each and of the ratios.
fn pairs(edge: SocketAddr, path: &str) -> (f64, f64, f64) {
    let runs: Vec<(f64, f64)> = (0..8)
        .map(|i| {
            let (without, with) = if i % 2 == 0 {
                let without = rps(edge, "plain.localhost", path);
                (without, rps(edge, "ui.localhost", path))
            } else {
                let with = rps(edge, "ui.localhost", path);
                (rps(edge, "plain.localhost", path), with)
            };
            eprintln!("  {without:.0} → {with:.0}");
            (without, with)
        })
        .collect();
    portway_testkit::bench::pair_medians(&runs)
}

#[tokio::main]
async fn main() {
    let bin = portway_testkit::bench::release_bin();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_nginx, nginx_port) = portway_testkit::bench::nginx(dir);
    std::fs::write(dir.join("www/mid.bin"), vec![b'x'; 64 * 1024]).unwrap();
    let data = dir.join("data");
    let args = portway_testkit::up_args(&data, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_up, info) = portway_testkit::start_quiet(&bin, &args, "up").await;
    let edge: SocketAddr = info["http"].as_str().unwrap().parse().unwrap();
    let port = nginx_port.to_string();
    let data = data.to_string_lossy();
    let (_plain, _) = portway_testkit::start_quiet(
        &bin,
        &[
            "http",
            &port,
            "--hostname",
            "plain.localhost",
            "--data",
            &data,
            "--no-ui",
        ],
        "http",
    )
    .await;
    let (_ui, ready) = portway_testkit::start_quiet(
        &bin,
        &[
            "http",
            &port,
            "--hostname",
            "ui.localhost",
            "--data",
            &data,
            "--ui",
            "127.0.0.1:0",
        ],
        "http",
    )
    .await;
    let ui = ready["ui"]["url"].as_str().unwrap().to_owned();
    let token = format!(
        "x-portway-token: {}",
        ready["ui"]["token"].as_str().unwrap()
    );

    // Warm both paths.
    let _ = rps(edge, "ui.localhost", "/small.txt");
    let _ = rps(edge, "plain.localhost", "/small.txt");
    let mut rows = Vec::new();
    for (case, path) in [
        ("13-byte file, UI on, no viewer", "/small.txt"),
        ("64 KiB file, UI on, no viewer", "/mid.bin"),
    ] {
        eprintln!("{case}");
        rows.push((case, pairs(edge, path)));
    }
    // A viewer: the page's live stream open throughout.
    let mut viewer = Command::new("curl")
        .args(["-sN", "-H", &token, &format!("{ui}api/events")])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eprintln!("13-byte file, the page's live stream open");
    rows.push((
        "13-byte file, UI on, a viewer on the live stream",
        pairs(edge, "/small.txt"),
    ));
    let _ = viewer.kill();
    let _ = viewer.wait();
    let recorded = Command::new("curl")
        .args(["-s", "-H", &token, &format!("{ui}api/requests?limit=1")])
        .output()
        .unwrap();
    let last = String::from_utf8_lossy(&recorded.stdout);
    assert!(
        last.contains("\"id\""),
        "the inspector recorded nothing: {last}"
    );

    println!("| case | --no-ui req/s | UI on req/s | ratio (median of 8 pairs) |");
    println!("|---|---|---|---|");
    for (case, (without, with, ratio)) in rows {
        println!("| {case} | {without:.0} | {with:.0} | {ratio:.2} |");
    }
}
