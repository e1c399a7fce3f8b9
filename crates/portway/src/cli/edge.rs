//! `portway edge`: the built-in edge with its sidecar in process.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;

use super::{kube_client, shutdown_signal, write_ready_file};

#[derive(Parser)]
pub struct Args {
    #[command(flatten)]
    sidecar: super::sidecar::Flags,
    /// Public HTTP address (HTTP/1.1 and h2c).
    #[arg(long, default_value = "0.0.0.0:8080")]
    http: SocketAddr,
    /// Public HTTPS address: serves the certificates the operator issues (Secrets in
    /// `portway-system`) and those of --cert-dir.
    #[arg(long)]
    https: Option<SocketAddr>,
    /// Directory of <hostname>.crt/.key pairs (`_.example.com` for *.example.com,
    /// `default` for any other name), served before issued ones.
    #[arg(long, requires = "https")]
    cert_dir: Option<PathBuf>,
    /// Keep X-Forwarded-*, Forwarded and X-Real-IP from peers in this CIDR (or address),
    /// e.g. a load balancer in front (repeatable). Everyone else's are replaced.
    #[arg(long = "trusted-proxy", value_name = "CIDR", value_parser = portway_gateway::edge::parse_cidr)]
    trusted_proxies: Vec<portway_gateway::edge::IpNet>,
    /// TCP load balancers in this CIDR (or address) send the PROXY protocol, v1 or v2
    /// (nginx `proxy_protocol on;`, HAProxy `send-proxy`), on the HTTP and HTTPS
    /// listeners: the client it names is the client (repeatable). A connection from them
    /// without one is closed.
    #[arg(long = "proxy-protocol-from", value_name = "CIDR", value_parser = portway_gateway::edge::parse_cidr)]
    proxy_protocol_from: Vec<portway_gateway::edge::IpNet>,
    /// Address published in Gateway status (default: the listen address).
    #[arg(long)]
    address: Vec<String>,
    /// Serve /metrics here.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Log every request (host, method, path, status, bytes, duration, device and the
    /// path to it) as a `portway::access` event.
    #[arg(long)]
    access_log: bool,
    /// Write the bound addresses here as JSON once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

pub async fn run(args: Args) -> Result<()> {
    use portway_gateway::{EdgeStack, EdgeStackConfig, edge};
    let client = kube_client(args.sidecar.kubeconfig.as_deref()).await?;
    let config = EdgeStackConfig {
        sidecar: super::sidecar::setup(&args.sidecar)?,
        edge: edge::Config {
            http: Some(args.http),
            https: args.https,
            cert_dir: args.cert_dir,
            trusted_proxies: args.trusted_proxies,
            proxy_protocol_from: args.proxy_protocol_from,
            access_log: args.access_log,
        },
        class: args.sidecar.class.clone(),
        addresses: args.address,
        origins: args.sidecar.origins.config()?,
    };
    let stack = EdgeStack::start(config, client, None)
        .await
        .context("starting the edge")?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut metrics_addr = None;
    if let Some(addr) = args.metrics {
        let mut registry = prometheus_client::registry::Registry::default();
        stack.metrics().register(&mut registry);
        metrics_addr = Some(
            portway_gateway::serve_metrics(addr, std::sync::Arc::new(registry), shutdown.clone())
                .await?
                .0,
        );
    }
    if let Some(path) = &args.ready_file {
        write_ready_file(
            path,
            &json!({"http": stack.http_addr(), "https": stack.https_addr(), "metrics": metrics_addr}),
        )?;
    }
    eprintln!(
        "edge on http://{}",
        stack.http_addr().map(|a| a.to_string()).unwrap_or_default()
    );
    shutdown_signal().await;
    stack.shutdown();
    shutdown.cancel();
    stack.join().await;
    Ok(())
}
