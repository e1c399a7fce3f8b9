//! `portway apiserver`: the Kubernetes-compatible API server, on SQLite or on etcd.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;

use super::{shutdown_signal, write_ready_file};

#[derive(Parser)]
pub struct Args {
    /// Directory for the database, generated tokens, certificates and the admin kubeconfig
    /// ($XDG_DATA_HOME/portway/apiserver, else ~/.local/share/portway/apiserver).
    #[arg(long, default_value_os_t = super::default_data_dir().join("apiserver"))]
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
    /// Seconds an Event is kept after it was last seen.
    #[arg(long, default_value_t = 3600)]
    event_ttl: u64,
    /// Keep objects in etcd (comma-separated client URLs) instead of DATA/portway.db; any
    /// number of API servers may share one cluster.
    #[arg(long, value_delimiter = ',', value_name = "URL,URL,…")]
    etcd_servers: Vec<String>,
    /// Every key lives under this prefix, so installations can share a cluster.
    #[arg(long, default_value = "/portway")]
    etcd_prefix: String,
    /// CA that signed the etcd members' certificates (PEM); turns TLS on.
    #[arg(long)]
    etcd_cafile: Option<PathBuf>,
    /// Client certificate for etcd (PEM), when the members ask for one.
    #[arg(long, requires_all = ["etcd_keyfile", "etcd_cafile"])]
    etcd_certfile: Option<PathBuf>,
    /// Client key for etcd (PEM).
    #[arg(long, requires = "etcd_certfile")]
    etcd_keyfile: Option<PathBuf>,
    /// Operations etcd accepts in one transaction: its own `--max-txn-ops`. Writes are
    /// grouped to fit, and a single write that cannot is refused with 413.
    #[arg(long, default_value_t = portway_apiserver::store::Budget::ETCD.ops, value_name = "N")]
    etcd_max_txn_ops: usize,
    /// Bytes etcd accepts in one request: its own `--max-request-bytes`.
    #[arg(long, default_value_t = portway_apiserver::store::Budget::ETCD.bytes, value_name = "BYTES")]
    etcd_max_request_bytes: usize,
    /// Write the bound addresses here as JSON once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

pub async fn run(args: Args) -> Result<()> {
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
    config.event_ttl = std::time::Duration::from_secs(args.event_ttl);
    if !args.etcd_servers.is_empty() {
        config.etcd = Some(portway_apiserver::store::etcd::Config {
            endpoints: args.etcd_servers,
            prefix: args.etcd_prefix,
            tls: args
                .etcd_cafile
                .map(|ca| portway_apiserver::store::etcd::Tls {
                    ca,
                    cert: args.etcd_certfile,
                    key: args.etcd_keyfile,
                }),
            budget: portway_apiserver::store::Budget {
                ops: args.etcd_max_txn_ops,
                bytes: args.etcd_max_request_bytes,
            },
        });
    }
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
