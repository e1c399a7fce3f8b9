//! How fast a lost device is answered for and how fast it is back: `kill -9` of the
//! agent under a steady trickle of requests (and once under `wrk -c64`), then a restart.
//!
//! Needs wrk (`apt-get install -y wrk`) and release binaries:
//!
//! ```sh
//! cargo build --release -p portway --bins --examples
//! target/release/examples/fail_fast
//! ```
//!
//! Reports, per run: seconds from the kill to the first 503, the longest any request
//! waited, seconds from the restart to the first 200, and what the clients saw.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use portway_testkit::Process;
use portway_testkit::bench::{http_tunnel, release_bin, wrk_errors};
use portway_testkit::origin::Origin;

/// Clients asking one after another, each on a connection of its own.
const PROBERS: usize = 4;

struct Sample {
    sent: Instant,
    done: Instant,
    status: u16,
}

/// Asks `GET /hello` on the edge every 20 ms until `stop`; 0 is a failed request.
async fn probe(edge: SocketAddr, stop: Arc<AtomicBool>, out: Arc<Mutex<Vec<Sample>>>) {
    while !stop.load(Ordering::Relaxed) {
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let req = Request::get(format!("http://{edge}/hello"))
            .header("host", "bench.localhost")
            .body(Empty::new())
            .unwrap();
        let sent = Instant::now();
        let status = match tokio::time::timeout(Duration::from_secs(60), client.request(req)).await
        {
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                let _ = resp.into_body().collect().await;
                status
            }
            _ => 0,
        };
        out.lock().unwrap().push(Sample {
            sent,
            done: Instant::now(),
            status,
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for_200(edge: SocketAddr) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let req = Request::get(format!("http://{edge}/hello"))
            .header("host", "bench.localhost")
            .body(Empty::new())
            .unwrap();
        if let Ok(resp) = client.request(req).await
            && resp.status() == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "the tunnel never answered 200");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The running `portway up` and what restarting its agent needs.
struct Bench {
    bin: PathBuf,
    data: PathBuf,
    origin_port: u16,
    edge: SocketAddr,
}

impl Bench {
    /// One outage: kill the agent `kill_at` into the run, restart it `down_for` later, and
    /// report once the probers see 200 again; with `load`, wrk -c64 runs for the first 10 s.
    async fn outage(
        &self,
        http: &mut Process,
        kill_at: Duration,
        down_for: Duration,
        load: bool,
        label: &str,
    ) -> Process {
        let edge = self.edge;
        wait_for_200(edge).await;
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let probers: Vec<_> = (0..PROBERS)
            .map(|_| tokio::spawn(probe(edge, stop.clone(), samples.clone())))
            .collect();
        let wrk = load.then(|| {
            let url = format!("http://{edge}/hello");
            std::thread::spawn(move || wrk_errors(&url, "bench.localhost", 2, 64, 10))
        });
        tokio::time::sleep(kill_at).await;
        http.kill9();
        let killed = Instant::now();
        tokio::time::sleep(down_for).await;
        let restarted = Instant::now();
        let (again, _) = http_tunnel(&self.bin, &self.data, self.origin_port).await;
        let ready = restarted.elapsed();
        // Until the probers see 200 again, and a little after.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let back = samples
                .lock()
                .unwrap()
                .iter()
                .any(|s| s.sent >= restarted && s.status == 200);
            if back || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let wrk = wrk.map(|w| w.join().unwrap());
        stop.store(true, Ordering::Relaxed);
        for p in probers {
            let _ = p.await;
        }

        let samples = samples.lock().unwrap();
        let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
        let after_kill = samples.iter().filter(|s| s.done > killed);
        let first_503 = after_kill
            .clone()
            .filter(|s| s.status == 503)
            .map(|s| s.done - killed)
            .min();
        let longest = after_kill
            .clone()
            .filter(|s| s.sent < restarted)
            .map(|s| s.done - s.sent)
            .max();
        let first_200 = samples
            .iter()
            .filter(|s| s.sent >= restarted && s.status == 200)
            .map(|s| s.done - restarted)
            .min();
        let mut seen = std::collections::BTreeMap::new();
        for s in after_kill.filter(|s| s.sent < restarted) {
            *seen.entry(s.status).or_insert(0) += 1;
        }
        println!("{label}");
        println!(
            "  kill -9 → first 503:            {}",
            first_503.map_or("none".into(), secs)
        );
        println!(
            "  longest wait while down:        {}",
            longest.map_or("none".into(), secs)
        );
        println!(
            "  restart → first 200:            {} (the agent reported ready after {})",
            first_200.map_or("none".into(), secs),
            secs(ready)
        );
        println!("  probers' answers while down:    {seen:?} (0 = no answer)");
        if let Some(w) = wrk {
            println!(
                "  wrk -c64 -d10s:                 {} requests, {} non-2xx, {} socket errors, longest {:.2} s",
                w.requests,
                w.non_2xx,
                w.socket_errors,
                w.max_us / 1e6
            );
        }
        again
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bin = release_bin();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let args = portway_testkit::up_args(&data, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_up, info) = portway_testkit::start_quiet(&bin, &args, "up").await;
    let edge: SocketAddr = info["http"].as_str().unwrap().parse().unwrap();
    let origin = Origin::spawn().await.unwrap();
    let port = origin.addr.port();
    let (mut http, _) = http_tunnel(&bin, &data, port).await;
    let bench = Bench {
        bin,
        data,
        origin_port: port,
        edge,
    };

    let s = Duration::from_secs;
    let mut http = bench
        .outage(&mut http, s(1), s(6), false, "idle, agent down 6 s:")
        .await;
    let mut http = bench
        .outage(
            &mut http,
            s(1),
            Duration::from_millis(1500),
            false,
            "idle, agent restarted after 1.5 s:",
        )
        .await;
    let _http = bench
        .outage(
            &mut http,
            s(2),
            s(4),
            true,
            "under wrk -c64 -d10s, agent down 4 s:",
        )
        .await;
}
