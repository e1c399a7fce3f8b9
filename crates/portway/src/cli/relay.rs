//! `portway relay`: an iroh relay serving the endpoints the API knows.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;

use super::{kube_client, shutdown_signal, write_ready_file};

#[derive(Parser)]
pub struct Args {
    /// Address to serve the relay on (HTTP, or HTTPS with --tls-cert).
    #[arg(long, default_value = "127.0.0.1:3340")]
    listen: SocketAddr,
    /// Certificate chain (PEM) to serve HTTPS and QUIC address discovery with.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Plain HTTP listener kept beside HTTPS (captive-portal checks).
    #[arg(long, requires = "tls_cert")]
    http_listen: Option<SocketAddr>,
    /// Hostname to put in the relay URL (the name on the certificate).
    #[arg(long)]
    hostname: Option<String>,
    /// Kubeconfig of the control plane (default: $KUBECONFIG, ~/.kube/config,
    /// in-cluster). The relay serves only the endpoints it lists: Connectors' keys and
    /// ConnectorClasses' gateways.
    #[arg(long, conflicts_with = "open")]
    kubeconfig: Option<PathBuf>,
    /// Serve every endpoint, without a control plane (standalone use).
    #[arg(long)]
    open: bool,
    /// Write the relay URL here as JSON once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

pub async fn run(args: Args) -> Result<()> {
    use portway_discovery::relay::Access;
    let access = if args.open {
        Access::Open
    } else {
        let client = kube_client(args.kubeconfig.as_deref())
            .await
            .context("the relay serves only endpoints the API knows (or pass --open)")?;
        Access::Api(client)
    };
    let config = portway_discovery::relay::Config {
        listen: args.listen,
        tls: args.tls_cert.zip(args.tls_key),
        http_listen: args.http_listen,
        hostname: args.hostname,
        access,
    };
    let server = portway_discovery::relay::Server::bind(config)
        .await
        .context("starting the relay")?;
    if let Some(path) = &args.ready_file {
        write_ready_file(
            path,
            &json!({"relay": server.url().to_string(), "quic": server.quic_addr()}),
        )?;
    }
    eprintln!("relay at {}", server.url());
    shutdown_signal().await;
    server.shutdown().await;
    Ok(())
}
