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
    /// Run the authoritative DNS server for iroh discovery records.
    Dns(DnsArgs),
    /// Run an iroh relay.
    Relay(RelayArgs),
    /// Run the device agent: register this device and serve its tunnels.
    Agent(AgentArgs),
    /// Run the operator: HTTPProxy → Gateway API objects, connector readiness.
    Operator(OperatorArgs),
    /// Print the CustomResourceDefinitions of Portway's kinds (YAML).
    Crds,
}

#[derive(Parser)]
struct DnsArgs {
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
    /// Write the bound address here as JSON once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Parser)]
struct RelayArgs {
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
    /// Write the relay URL here as JSON once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Parser)]
struct OperatorArgs {
    /// Kubeconfig of the control plane (an operator or admin token).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Sidecar address(es) the generated EndpointSlices point at (comma-separated or
    /// repeated).
    #[arg(long, value_delimiter = ',', required = true)]
    sidecar: Vec<SocketAddr>,
    /// Zone for canonical hostnames (`<uid>.<zone>`).
    #[arg(long, default_value = "portway.localhost")]
    zone: String,
    /// Write {"operator": "ready"} here once the caches are synced and controllers run.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

async fn operator(args: OperatorArgs) -> Result<()> {
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    let mut config = portway_operator::Config::new(args.sidecar);
    config.proxy.zone = args.zone;
    let operator = portway_operator::Operator::start(config, client)
        .await
        .context("starting the operator")?;
    if let Some(path) = &args.ready_file {
        write_ready_file(path, &json!({"operator": "started"}))?;
    }
    eprintln!("operator running");
    shutdown_signal().await;
    operator.shutdown();
    operator.join().await;
    Ok(())
}

#[derive(Parser)]
#[command(args_conflicts_with_subcommands = true)]
struct AgentArgs {
    #[command(subcommand)]
    command: Option<AgentCommand>,
    /// Kubeconfig of the control plane (an agent token scoped to the project suffices).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The project (namespace) to register in; or `project` in --config.
    #[arg(long)]
    project: Option<String>,
    /// Connector name (default: `name` in --config, else this machine's hostname).
    #[arg(long)]
    name: Option<String>,
    /// Where the key and cached policy live (default: $XDG_STATE_HOME/portway/agent).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// TOML file with project, name, labels, relays and [[tunnel]] entries; re-read when it
    /// changes.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A tunnel: NAME=HOST:PORT[,http|tcp][,HOSTNAME...] (repeatable).
    #[arg(long)]
    tunnel: Vec<String>,
    /// A label for the connector, KEY=VALUE (repeatable).
    #[arg(long)]
    label: Vec<String>,
    /// Relay URL (repeatable); or `relays` in --config.
    #[arg(long)]
    relay: Vec<String>,
    /// Also use n0's public relays and discovery.
    #[arg(long)]
    n0: bool,
    /// Local UDP address for direct iroh paths.
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Heartbeat lease duration, in seconds (renewed at half of it).
    #[arg(long, default_value_t = 30)]
    lease_seconds: u64,
    /// ConnectorClass of a newly created connector.
    #[arg(long)]
    connector_class: Option<String>,
    /// Write the node id and connector here as JSON once registered.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Show or rotate the agent's iroh key.
    Key {
        #[command(subcommand)]
        action: KeyAction,
        /// Where the key lives (default: $XDG_STATE_HOME/portway/agent).
        #[arg(long, global = true)]
        state_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeyAction {
    /// Print the NodeID (hex and z-base-32); creates the key if there is none.
    Show,
    /// Replace the key with a new one (the old one is kept as key.old). The NodeID
    /// changes; the agent takes its connector over on the next start.
    Rotate,
}

fn default_state_dir() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("portway").join("agent")
}

async fn agent(args: AgentArgs) -> Result<()> {
    if let Some(AgentCommand::Key { action, state_dir }) = args.command {
        let path = state_dir
            .or(args.state_dir)
            .unwrap_or_else(default_state_dir)
            .join("key");
        let key = match action {
            KeyAction::Show => portway_discovery::endpoint::load_or_create_key(&path)?.0,
            KeyAction::Rotate => portway_discovery::endpoint::rotate_key(&path)?,
        };
        println!(
            "node id: {}
z32:     {}
key:     {}",
            key.public(),
            key.public().to_z32(),
            path.display()
        );
        return Ok(());
    }
    let file = match &args.config {
        Some(path) => portway_agent::config::load(path)?,
        None => portway_agent::config::FileConfig::default(),
    };
    let project = args
        .project
        .or(file.project)
        .context("no project: pass --project or set `project` in --config")?;
    let state_dir = args.state_dir.unwrap_or_else(default_state_dir);
    let mut config = portway_agent::Config::new(project, state_dir);
    if let Some(name) = args.name.or(file.name) {
        config.name = name;
    }
    if let Some(class) = args.connector_class.or(file.connector_class) {
        config.connector_class = class;
    }
    config.labels = file.labels;
    for l in &args.label {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--label {l:?}: expected KEY=VALUE"))?;
        portway_api::validation::qualified_name(k)
            .map_err(|e| anyhow::anyhow!("--label {l:?}: {e}"))?;
        portway_api::validation::label_value(v)
            .map_err(|e| anyhow::anyhow!("--label {l:?}: {e}"))?;
        config.labels.insert(k.to_owned(), v.to_owned());
    }
    let flag_tunnels = args
        .tunnel
        .iter()
        .map(|t| portway_agent::Tunnel::parse_flag(t).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    config.tunnels = file.tunnels;
    config.tunnels.extend(flag_tunnels.iter().cloned());
    for r in args.relay.iter().chain(&file.relays) {
        config.relays.push(
            r.parse()
                .with_context(|| format!("relay {r:?} is not a URL"))?,
        );
    }
    if config.relays.is_empty() && !args.n0 {
        anyhow::bail!(
            "no relay: pass --relay URL (or --n0 for n0's public relays), or set `relays` in --config"
        );
    }
    config.n0 = args.n0;
    config.bind_addr = args.bind;
    config.lease_duration = std::time::Duration::from_secs(args.lease_seconds.max(2));
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    let agent = portway_agent::Agent::start(config, client)
        .await
        .context("starting the agent")?;
    eprintln!("agent {} starting", agent.node_id());
    let _follow = args
        .config
        .clone()
        .map(|path| agent.follow_config_file(path, flag_tunnels));
    let reg = tokio::select! {
        reg = agent.registered() => Some(reg),
        () = shutdown_signal() => None,
    };
    if let Some(reg) = reg {
        eprintln!("registered as connector {}/{}", reg.project, reg.connector);
        if let Some(path) = &args.ready_file {
            write_ready_file(
                path,
                &json!({"node_id": agent.node_id().to_string(), "z32": agent.node_id().to_z32(), "project": reg.project, "connector": reg.connector}),
            )?;
        }
        shutdown_signal().await;
    }
    agent.shutdown(false).await;
    Ok(())
}

/// A kube client from a kubeconfig file, or kube's defaults.
async fn kube_client(path: Option<&Path>) -> Result<kube::Client> {
    let config = match path {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("finding a kubeconfig (use --kubeconfig)")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

async fn dns(args: DnsArgs) -> Result<()> {
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    let mut config = portway_discovery::dns::Config::new(args.zone);
    config.listen = args.listen;
    config.ttl = args.ttl;
    let server = portway_discovery::dns::Server::bind(config, client)
        .await
        .context("starting the DNS server")?;
    if let Some(path) = &args.ready_file {
        write_ready_file(path, &json!({"dns": server.local_addr()}))?;
    }
    eprintln!("DNS at {} (udp+tcp)", server.local_addr());
    shutdown_signal().await;
    server.shutdown();
    server.join().await;
    Ok(())
}

async fn relay(args: RelayArgs) -> Result<()> {
    let config = portway_discovery::relay::Config {
        listen: args.listen,
        tls: args.tls_cert.zip(args.tls_key),
        http_listen: args.http_listen,
        hostname: args.hostname,
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
    // Both ring and aws-lc-rs end up linked (reqwest insists on the latter), so rustls
    // cannot pick a process default by itself.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            // hickory logs every query at info.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,hickory_server=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Apiserver(args) => apiserver(args).await,
            Command::Dns(args) => dns(args).await,
            Command::Relay(args) => relay(args).await,
            Command::Agent(args) => agent(args).await,
            Command::Operator(args) => operator(args).await,
            Command::Crds => {
                print!("{}", portway_api::crds_yaml()?);
                Ok(())
            }
        }
    })
}
