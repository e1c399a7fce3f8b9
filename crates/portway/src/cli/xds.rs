//! `portway xds`: Gateway API routes for Envoys over ADS, and `portway envoy-bootstrap`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use serde_json::json;

use super::{kube_client, shutdown_signal, write_ready_file};

#[derive(Parser)]
pub struct Args {
    /// Kubeconfig of the control plane (operator or admin: it writes Gateway status).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Where Envoys connect (gRPC, ADS).
    #[arg(long, default_value = "127.0.0.1:18000")]
    listen: SocketAddr,
    /// Default sidecar address, for Envoys whose bootstrap does not name theirs.
    #[arg(long, default_value = "127.0.0.1:4001")]
    sidecar: SocketAddr,
    /// Default public listener address, for Envoys whose bootstrap does not name theirs.
    #[arg(long, default_value = "0.0.0.0:10080")]
    envoy_listen: SocketAddr,
    /// Default HTTPS listener (SNI; the issued certificates over SDS), for Envoys whose
    /// bootstrap does not name theirs; none by default.
    #[arg(long)]
    envoy_listen_tls: Option<SocketAddr>,
    /// GatewayClass served.
    #[arg(long, default_value = "portway")]
    class: String,
    /// Write Gateway and HTTPRoute status (turn off when the built-in edge also runs).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    write_status: bool,
    /// Addresses to publish in Gateway status.
    #[arg(long)]
    address: Vec<String>,
    /// With --leader-elect, of several xDS servers only the one holding the Lease
    /// `portway-system/portway-xds` writes route status; all of them serve Envoys.
    #[command(flatten)]
    leader: super::LeaderFlags,
    /// Write the bound address here as JSON once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

pub async fn run(args: Args) -> Result<()> {
    use portway_gateway::xds;
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let config = xds::StackConfig {
        leading: args.leader.follow("portway-xds", &client, stop.clone()),
        listen: args.listen,
        defaults: xds::NodeConfig {
            sidecar: args.sidecar,
            listen: args.envoy_listen,
            listen_tls: args.envoy_listen_tls,
        },
        class: args.class,
        addresses: args.address,
        write_status: args.write_status,
    };
    let stack = xds::Stack::start(config, client).await?;
    if let Some(path) = &args.ready_file {
        write_ready_file(path, &json!({"xds": stack.local_addr()}))?;
    }
    eprintln!("xDS on {} (ADS, state of the world)", stack.local_addr());
    shutdown_signal().await;
    stop.cancel();
    stack.shutdown();
    stack.join().await;
    Ok(())
}

#[derive(Parser)]
pub struct BootstrapArgs {
    /// The xDS server (`portway xds --listen`).
    #[arg(long)]
    xds: SocketAddr,
    /// This Envoy's node id (unique per Envoy).
    #[arg(long)]
    node_id: String,
    /// The sidecar beside this Envoy.
    #[arg(long, default_value = "127.0.0.1:4001")]
    sidecar: SocketAddr,
    /// This Envoy's public listener.
    #[arg(long, default_value = "0.0.0.0:10080")]
    listen: SocketAddr,
    /// This Envoy's HTTPS listener (SNI; certificates from `portway xds` over SDS).
    #[arg(long)]
    listen_tls: Option<SocketAddr>,
    /// Envoy's admin interface (keep it private).
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: SocketAddr,
}

/// Prints the bootstrap.
pub fn bootstrap(args: BootstrapArgs) {
    let node = portway_gateway::xds::NodeConfig {
        sidecar: args.sidecar,
        listen: args.listen,
        listen_tls: args.listen_tls,
    };
    print!(
        "{}",
        portway_gateway::xds::bootstrap(args.xds, &args.node_id, &node, args.admin)
    );
}
