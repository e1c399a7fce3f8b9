//! `portway sidecar`: the iroh sidecar beside an Envoy; its flags are shared with `portway edge`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;

use super::{kube_client, shutdown_signal, write_ready_file};

/// Flags shared by the commands that run a sidecar.
#[derive(Parser)]
pub struct Flags {
    /// Kubeconfig of the control plane (operator or admin: the sidecar registers itself in
    /// the ConnectorClass).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Relay URL(s).
    #[arg(long, required = true)]
    pub relay: Vec<String>,
    /// The discovery DNS server (`portway dns`).
    #[arg(long)]
    pub dns: SocketAddr,
    /// The discovery zone.
    #[arg(long, default_value = "portway.localhost")]
    pub zone: String,
    /// Also use n0's public relays and discovery.
    #[arg(long)]
    pub n0: bool,
    /// Where the sidecar key lives (its id is what agents authorise);
    /// $XDG_STATE_HOME/portway/sidecar, else ~/.local/state/portway/sidecar.
    #[arg(long, default_value_os_t = super::default_state_dir("sidecar"))]
    pub state_dir: PathBuf,
    /// Name of this gateway in the ConnectorClass status.
    #[arg(long, default_value = "gateway")]
    pub name: String,
    /// ConnectorClass to register in.
    #[arg(long, default_value = "portway")]
    pub class: String,
    #[command(flatten)]
    pub origins: super::origins::OriginFlags,
}

pub fn setup(f: &Flags) -> Result<portway_gateway::sidecar::Setup> {
    Ok(portway_gateway::sidecar::Setup {
        key: f.state_dir.join("key"),
        relays: f
            .relay
            .iter()
            .map(|r| r.parse().with_context(|| format!("relay {r:?}")))
            .collect::<Result<_>>()?,
        dns: portway_discovery::endpoint::DnsLookup {
            origin: f.zone.clone(),
            nameserver: f.dns,
        },
        n0: f.n0,
        class: f.class.clone(),
        name: f.name.clone(),
    })
}

#[derive(Parser)]
pub struct Args {
    #[command(flatten)]
    sidecar: Flags,
    /// Where Envoy sends requests (keep it private: it trusts the datum-* headers).
    #[arg(long, default_value = "127.0.0.1:4001")]
    listen: SocketAddr,
    /// Write the listen address and the sidecar's NodeID here as JSON once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

pub async fn run(args: Args) -> Result<()> {
    let client = kube_client(args.sidecar.kubeconfig.as_deref()).await?;
    let setup = setup(&args.sidecar)?;
    let s = portway_gateway::sidecar::start(
        &setup,
        &client,
        portway_gateway::sidecar::Config {
            origins: args.sidecar.origins.config()?,
            ..Default::default()
        },
        Default::default(),
    )
    .await?;
    let s = std::sync::Arc::new(s);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = portway_gateway::serve_sidecar(listener, s.clone(), shutdown.clone());
    if let Some(path) = &args.ready_file {
        write_ready_file(path, &json!({"sidecar": addr, "id": s.id().to_string()}))?;
    }
    eprintln!("sidecar {} on {addr}", s.id());
    shutdown_signal().await;
    shutdown.cancel();
    let _ = task.await;
    Ok(())
}
