//! `portway`: parses flags and hands over to the library crates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "portway",
    version,
    about = "Publish services behind NAT at public hostnames, over iroh tunnels."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Kubernetes-compatible API server on an embedded SQLite store.
    Apiserver(ApiserverArgs),
    /// Print the CustomResourceDefinitions of Portway's kinds (YAML).
    Crds,
}

#[derive(Parser)]
struct ApiserverArgs {
    /// Directory for the database, generated tokens, certificates and the admin kubeconfig.
    #[arg(long, default_value = "portway-data")]
    data: PathBuf,
    /// Address to listen on. Served over TLS: with --tls-cert/--tls-key, or a CA generated
    /// in DATA/pki (the kubeconfig carries it).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Tokens file, CSV `token,user,roles,namespaces` (roles: admin, operator, agent,
    /// viewer; namespaces: a quoted list or *). Default: DATA/tokens.csv, created with one
    /// admin token.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Serving certificate (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Serving key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve plain HTTP (loopback addresses only). kubectl sends no token over plain HTTP,
    /// so this suits kube-rs and curl only.
    #[arg(long, conflicts_with = "tls_cert")]
    insecure_http: bool,
    /// Extra DNS name or IP for the generated certificate (repeatable).
    #[arg(long)]
    tls_san: Vec<String>,
    /// Revisions of change history kept for watches to resume from.
    #[arg(long, default_value_t = 10_000)]
    history: u64,
    /// Write the bound addresses here as JSON once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

/// Writes `value` to `path` atomically, so readers never see half a file.
fn write_ready_file(path: &Path, value: &serde_json::Value) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

async fn apiserver(args: ApiserverArgs) -> Result<()> {
    let mut config = portway_apiserver::Config::new(args.data);
    config.listen = args.listen;
    config.tokens_file = args.tokens;
    config.tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => portway_apiserver::TlsMode::Files { cert, key },
        _ if args.insecure_http => portway_apiserver::TlsMode::PlainLoopback,
        _ => portway_apiserver::TlsMode::SelfSigned,
    };
    config.tls_sans = args.tls_san;
    config.history = args.history;
    let server = portway_apiserver::Server::bind(config)
        .await
        .context("starting the API server")?;
    if let Some(path) = &args.ready_file {
        write_ready_file(
            path,
            &json!({"apiserver": server.url(), "listen": server.local_addr(), "kubeconfig": server.kubeconfig()}),
        )?;
    }
    match server.kubeconfig() {
        Some(k) => eprintln!(
            "API server at {}\n  kubectl --kubeconfig {} get connectors -A",
            server.url(),
            k.display()
        ),
        None => eprintln!("API server at {}", server.url()),
    }
    shutdown_signal().await;
    server.shutdown();
    server.join().await;
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Apiserver(args) => apiserver(args).await,
            Command::Crds => {
                print!("{}", portway_api::crds_yaml()?);
                Ok(())
            }
        }
    })
}
