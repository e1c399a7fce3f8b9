//! `portway dns`: the authoritative DNS server for discovery records.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;

use super::{kube_client, shutdown_signal, write_ready_file};

#[derive(Parser)]
pub struct Args {
    /// Kubeconfig of the control plane (default: $KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// UDP and TCP address to answer on.
    #[arg(long, default_value = "127.0.0.1:5353")]
    listen: SocketAddr,
    /// The zone to serve; records are _iroh.<z32-node-id>[.<project>].<zone>.
    #[arg(long, default_value = "portway.localhost")]
    zone: String,
    /// TTL of the TXT records, in seconds.
    #[arg(long, default_value_t = 5)]
    ttl: u32,
    /// With --leader-elect, of several DNS servers only the one holding the Lease
    /// `portway-system/portway-dns` writes connectors' `IrohDNSPublished`; all answer.
    #[command(flatten)]
    leader: super::LeaderFlags,
    /// Write the bound address here as JSON once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

pub async fn run(args: Args) -> Result<()> {
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    let mut config = portway_discovery::dns::Config::new(args.zone);
    config.listen = args.listen;
    config.ttl = args.ttl;
    let stop = tokio_util::sync::CancellationToken::new();
    config.leading = args.leader.follow("portway-dns", &client, stop.clone());
    let server = portway_discovery::dns::Server::bind(config, client)
        .await
        .context("starting the DNS server")?;
    if let Some(path) = &args.ready_file {
        write_ready_file(path, &json!({"dns": server.local_addr()}))?;
    }
    eprintln!("DNS at {} (udp+tcp)", server.local_addr());
    shutdown_signal().await;
    stop.cancel();
    server.shutdown();
    server.join().await;
    Ok(())
}
