//! `portway http PORT`: the one-liner.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use serde_json::json;

use super::{default_data_dir, shutdown_signal, write_ready_file};

#[derive(Parser)]
pub struct Args {
    /// The local port your app listens on (127.0.0.1:PORT).
    port: u16,
    /// Public hostname (default: a random name under .localhost).
    #[arg(long)]
    hostname: Option<String>,
    /// Project (namespace).
    #[arg(long, default_value = "default")]
    project: String,
    /// Kubeconfig with a join token (default: join with a one-use token minted by the
    /// admin kubeconfig of `portway up`).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Connector name (default: this machine's hostname).
    #[arg(long)]
    name: Option<String>,
    /// Data directory of `portway up`.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Heartbeat lease in seconds: if this process dies, the URL answers 503 after this.
    #[arg(long, default_value_t = 30)]
    lease_seconds: u64,
    /// Reach the edge only through the relay: no direct UDP path.
    #[arg(long)]
    relay_only: bool,
    /// Write the public URL here as JSON once it works.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

pub async fn run(args: Args) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let config = portway_local::http::Config {
        data_dir: args.data.unwrap_or_else(default_data_dir),
        port: args.port,
        hostname: args.hostname,
        project: args.project,
        kubeconfig: args.kubeconfig,
        name: args.name,
        lease: std::time::Duration::from_secs(args.lease_seconds.max(2)),
        relay_only: args.relay_only,
    };
    let started = tokio::time::Instant::now();
    let h = tokio::select! {
        h = portway_local::http::Http::start(config) => h.map_err(|e| {
            use portway_local::http::Error;
            match e {
                // Complete sentences that say what to do: one line, no chain.
                Error::HostnameTaken { .. }
                | Error::HostnameNotVerified { .. }
                | Error::Unreachable { .. } => anyhow::anyhow!(e.to_string()),
                e => anyhow::Error::new(e).context("publishing the port"),
            }
        })?,
        () = shutdown_signal() => return Ok(()),
    };
    if let Some(path) = &args.ready_file {
        write_ready_file(
            path,
            &json!({"url": h.url, "hostname": h.hostname, "proxy": h.proxy, "node_id": h.agent.node_id().to_string()}),
        )?;
    }
    println!(
        "{} → http://127.0.0.1:{}  (ready in {} ms; Ctrl-C to stop)",
        h.url,
        args.port,
        started.elapsed().as_millis()
    );
    let tty = std::io::stdout().is_terminal();
    crate::logs::STATUS_LINE.store(tty, std::sync::atomic::Ordering::Relaxed);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let state = h.agent.state();
    loop {
        tokio::select! {
            () = shutdown_signal() => break,
            _ = tick.tick() => {
                if tty {
                    let s = h.agent.stats();
                    print!("\r\x1b[2K{}  requests {}  active {}  refused {}", state.borrow().as_str(), s.requests, s.active, s.denied);
                    let _ = std::io::stdout().flush();
                }
            }
        }
    }
    crate::logs::STATUS_LINE.store(false, std::sync::atomic::Ordering::Relaxed);
    if tty {
        println!();
    }
    h.stop().await;
    eprintln!("tunnel removed");
    Ok(())
}
