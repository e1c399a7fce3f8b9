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
    /// Run everything on this machine: API server, DNS, relay, operator, edge, sidecar.
    Up(UpArgs),
    /// Publish a local port at a public hostname (needs `portway up`), like `ngrok http`.
    Http(HttpArgs),
    /// Run the built-in edge (with its sidecar in process) against a control plane.
    Edge(EdgeArgs),
    /// Run a standalone sidecar for an Envoy: requests carrying datum-* headers are
    /// forwarded to devices.
    Sidecar(SidecarArgs),
    /// Run the Kubernetes-compatible API server on an embedded SQLite store.
    Apiserver(ApiserverArgs),
    /// Serve the Gateway API routes to Envoys over xDS (ADS).
    Xds(XdsArgs),
    /// Print an Envoy bootstrap that points at `portway xds`.
    EnvoyBootstrap(BootstrapArgs),
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
    /// Join tokens: how a device gets its own credential for one project.
    Token(TokenArgs),
}

#[derive(Parser)]
struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a short-lived join token for one project (needs an admin kubeconfig). The
    /// device exchanges it once for its own credential: `portway agent --join-token T`.
    Create {
        /// The project (namespace) the device joins.
        #[arg(long, default_value = "default")]
        project: String,
        /// How long the token may be used, in seconds (at most 7 days).
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
        /// How many devices may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Admin kubeconfig (default: $KUBECONFIG, ~/.kube/config).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Print a bootstrap kubeconfig (server, CA and the join token) instead of the
        /// bare token: hand it to the device as `--kubeconfig`.
        #[arg(long)]
        bootstrap_kubeconfig: bool,
    },
}

async fn token(args: TokenArgs) -> Result<()> {
    let TokenCommand::Create {
        project,
        ttl_seconds,
        uses,
        kubeconfig,
        bootstrap_kubeconfig,
    } = args.command;
    let client = kube_client(kubeconfig.as_deref()).await?;
    let (token, expires) =
        portway_agent::join::create_join_token(&client, &project, ttl_seconds, uses).await?;
    if bootstrap_kubeconfig {
        let kc = match &kubeconfig {
            Some(p) => kube::config::Kubeconfig::read_from(p)?,
            None => kube::config::Kubeconfig::read()?,
        };
        print!(
            "{}",
            serde_yaml::to_string(&portway_agent::join::with_token(kc, &token))?
        );
    } else {
        println!("{token}");
        eprintln!(
            "join token for project {project}: {uses} use(s), expires at unix time {expires}.\n\
             On the device: portway agent --project {project} --kubeconfig SERVER.kubeconfig --join-token {token} ..."
        );
    }
    Ok(())
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
    let mut signal = std::pin::pin!(shutdown_signal());
    tokio::select! {
        synced = operator.ready() => {
            synced.context("waiting for the operator's caches")?;
            if let Some(path) = &args.ready_file {
                write_ready_file(path, &json!({"operator": "ready"}))?;
            }
            eprintln!("operator running");
            signal.await;
        }
        () = &mut signal => {}
    }
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
    /// A join token (`portway token create`): exchanged once, with proof of the device
    /// key, for this device's own credential (saved as STATE/device.kubeconfig). The
    /// server and CA come from --kubeconfig.
    #[arg(long, env = "PORTWAY_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
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
    let client = agent_client(
        args.kubeconfig.as_deref(),
        args.join_token.as_deref(),
        &config,
    )
    .await?;
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

/// The device's saved credential; else a join (with --join-token, or a join token in
/// the kubeconfig); else the kubeconfig as it is (a person's agent-role token).
async fn agent_client(
    kubeconfig: Option<&Path>,
    join_token: Option<&str>,
    config: &portway_agent::Config,
) -> Result<kube::Client> {
    use portway_agent::join;
    let (state, project, name, class) = (
        &config.state_dir,
        &config.project,
        &config.name,
        &config.connector_class,
    );
    let cred = join::credential_path(state);
    if cred.exists() {
        return Ok(join::client(&cred, state, project, name, class).await?);
    }
    let kc = match kubeconfig {
        Some(p) => kube::config::Kubeconfig::read_from(p)
            .with_context(|| format!("reading kubeconfig {}", p.display()))?,
        None if join_token.is_some() => {
            kube::config::Kubeconfig::read().context("finding a kubeconfig (use --kubeconfig)")?
        }
        None => return kube_client(None).await,
    };
    let kc = match join_token {
        Some(t) => join::with_token(kc, t),
        None => kc,
    };
    Ok(join::client_with(kc, state, project, name, class).await?)
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("portway")
}

#[derive(Parser)]
struct UpArgs {
    /// Data directory (database, kubeconfigs, keys); default $XDG_DATA_HOME/portway.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Public HTTP address of the edge (HTTP/1.1 and h2c).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Public HTTPS address (h2 and HTTP/1.1), with certificates from --cert-dir.
    #[arg(long, requires = "cert_dir")]
    https: Option<SocketAddr>,
    /// Directory of <hostname>.crt/.key pairs (`_.example.com` for *.example.com).
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:6443")]
    apiserver: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:5353")]
    dns: SocketAddr,
    /// DNS zone for discovery records and canonical hostnames.
    #[arg(long, default_value = "portway.localhost")]
    zone: String,
    #[arg(long, default_value = "127.0.0.1:3340")]
    relay: SocketAddr,
    /// The sidecar's listener (for an Envoy; the edge calls the sidecar in process).
    #[arg(long, default_value = "127.0.0.1:4001")]
    sidecar: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9090")]
    metrics: SocketAddr,
    /// Write every bound address here as JSON once ready.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

async fn up(args: UpArgs) -> Result<()> {
    let data = args.data.unwrap_or_else(default_data_dir);
    let mut config = portway_local::up::Config::new(data.clone());
    config.http = args.http;
    config.https = args.https;
    config.cert_dir = args.cert_dir;
    config.apiserver = args.apiserver;
    config.dns = args.dns;
    config.zone = args.zone;
    config.relay = args.relay;
    config.sidecar = args.sidecar;
    config.metrics = args.metrics;
    let up = portway_local::up::Up::start(config)
        .await
        .context("starting portway")?;
    let i = &up.info;
    if let Some(path) = &args.ready_file {
        write_ready_file(path, &serde_json::to_value(i)?)?;
    }
    let https = i
        .https
        .map(|a| format!("\n  https edge  https://{a}"))
        .unwrap_or_default();
    eprintln!(
        "Portway is up (data in {}).\n  public edge http://{}{https}\n  API server  {}  (kubectl --kubeconfig {} get httpproxies -A)\n  relay       {}\n  DNS         {} (zone {})\n  metrics     http://{}/metrics\n\nNext: start your app, then in another terminal:\n  portway http 3000{}",
        data.display(),
        i.http,
        i.apiserver,
        i.kubeconfig.display(),
        i.relay,
        i.dns,
        i.zone,
        i.metrics,
        if data == default_data_dir() {
            String::new()
        } else {
            format!(" --data {}", data.display())
        },
    );
    shutdown_signal().await;
    eprintln!("stopping…");
    up.shutdown().await;
    Ok(())
}

#[derive(Parser)]
struct HttpArgs {
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
    /// Write the public URL here as JSON once it works.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

async fn http(args: HttpArgs) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let config = portway_local::http::Config {
        data_dir: args.data.unwrap_or_else(default_data_dir),
        port: args.port,
        hostname: args.hostname,
        project: args.project,
        kubeconfig: args.kubeconfig,
        name: args.name,
        lease: std::time::Duration::from_secs(args.lease_seconds.max(2)),
    };
    let started = tokio::time::Instant::now();
    let h = tokio::select! {
        h = portway_local::http::Http::start(config) => h.context("publishing the port")?,
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
    if tty {
        println!();
    }
    h.stop().await;
    eprintln!("tunnel removed");
    Ok(())
}

/// Flags shared by the commands that run a sidecar.
#[derive(Parser)]
struct SidecarFlags {
    /// Kubeconfig of the control plane (operator or admin: the sidecar registers itself in
    /// the ConnectorClass).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Relay URL(s).
    #[arg(long, required = true)]
    relay: Vec<String>,
    /// The discovery DNS server (`portway dns`).
    #[arg(long)]
    dns: SocketAddr,
    /// The discovery zone.
    #[arg(long, default_value = "portway.localhost")]
    zone: String,
    /// Also use n0's public relays and discovery.
    #[arg(long)]
    n0: bool,
    /// Where the sidecar key lives (its id is what agents authorise).
    #[arg(long, default_value = "portway-sidecar")]
    state_dir: PathBuf,
    /// Name of this gateway in the ConnectorClass status.
    #[arg(long, default_value = "gateway")]
    name: String,
    /// ConnectorClass to register in.
    #[arg(long, default_value = "portway")]
    class: String,
}

async fn start_sidecar(
    f: &SidecarFlags,
    client: &kube::Client,
    metrics: portway_gateway::metrics::Metrics,
) -> Result<portway_gateway::sidecar::Sidecar> {
    let setup = portway_gateway::sidecar::Setup {
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
    };
    Ok(portway_gateway::sidecar::start(&setup, client, Default::default(), metrics).await?)
}

#[derive(Parser)]
struct EdgeArgs {
    #[command(flatten)]
    sidecar: SidecarFlags,
    /// Public HTTP address (HTTP/1.1 and h2c).
    #[arg(long, default_value = "0.0.0.0:8080")]
    http: SocketAddr,
    /// Public HTTPS address, with certificates from --cert-dir.
    #[arg(long, requires = "cert_dir")]
    https: Option<SocketAddr>,
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// Keep X-Forwarded-*, Forwarded and X-Real-IP from peers in this CIDR (or address),
    /// e.g. a load balancer in front (repeatable). Everyone else's are replaced.
    #[arg(long = "trusted-proxy", value_name = "CIDR", value_parser = portway_gateway::edge::parse_cidr)]
    trusted_proxies: Vec<portway_gateway::edge::IpNet>,
    /// Address published in Gateway status (default: the listen address).
    #[arg(long)]
    address: Vec<String>,
    /// Serve /metrics here.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

async fn edge(args: EdgeArgs) -> Result<()> {
    use portway_gateway::{edge, metrics::Metrics, model::Table, routes};
    let client = kube_client(args.sidecar.kubeconfig.as_deref()).await?;
    let metrics = Metrics::default();
    let sidecar =
        std::sync::Arc::new(start_sidecar(&args.sidecar, &client, metrics.clone()).await?);
    let table = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(Table::default()));
    let e = edge::Edge::bind(
        edge::Config {
            http: Some(args.http),
            https: args.https,
            cert_dir: args.cert_dir,
            trusted_proxies: args.trusted_proxies,
        },
        table.clone(),
        sidecar,
        metrics.clone(),
    )
    .await
    .context("starting the edge")?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let addresses = if args.address.is_empty() {
        vec![args.http.ip().to_string()]
    } else {
        args.address
    };
    let config = routes::Config {
        class: args.sidecar.class.clone(),
        controller_name: portway_api::CONTROLLER_NAME.into(),
        addresses,
        write_status: true,
    };
    let routes_task = routes::spawn(
        client,
        config,
        table,
        tokio::sync::watch::channel(0).0,
        shutdown.clone(),
    );
    let mut metrics_addr = None;
    if let Some(addr) = args.metrics {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        metrics_addr = Some(
            portway_gateway::serve_metrics(addr, std::sync::Arc::new(registry), shutdown.clone())
                .await?
                .0,
        );
    }
    if let Some(path) = &args.ready_file {
        write_ready_file(
            path,
            &json!({"http": e.http_addr(), "https": e.https_addr(), "metrics": metrics_addr}),
        )?;
    }
    eprintln!(
        "edge on http://{}",
        e.http_addr().map(|a| a.to_string()).unwrap_or_default()
    );
    shutdown_signal().await;
    e.shutdown();
    shutdown.cancel();
    e.join().await;
    let _ = routes_task.await;
    Ok(())
}

#[derive(Parser)]
struct SidecarArgs {
    #[command(flatten)]
    sidecar: SidecarFlags,
    /// Where Envoy sends requests (keep it private: it trusts the datum-* headers).
    #[arg(long, default_value = "127.0.0.1:4001")]
    listen: SocketAddr,
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

async fn sidecar(args: SidecarArgs) -> Result<()> {
    let client = kube_client(args.sidecar.kubeconfig.as_deref()).await?;
    let s = std::sync::Arc::new(start_sidecar(&args.sidecar, &client, Default::default()).await?);
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

#[derive(Parser)]
struct XdsArgs {
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
    /// GatewayClass served.
    #[arg(long, default_value = "portway")]
    class: String,
    /// Write Gateway and HTTPRoute status (turn off when the built-in edge also runs).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    write_status: bool,
    /// Addresses to publish in Gateway status.
    #[arg(long)]
    address: Vec<String>,
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

async fn xds(args: XdsArgs) -> Result<()> {
    use portway_gateway::{model::Table, routes, xds};
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    let table = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(Table::default()));
    let (version_tx, version_rx) = tokio::sync::watch::channel(0u64);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let addresses = if args.address.is_empty() {
        vec![args.envoy_listen.ip().to_string()]
    } else {
        args.address
    };
    let config = routes::Config {
        class: args.class.clone(),
        controller_name: portway_api::CONTROLLER_NAME.into(),
        addresses,
        write_status: args.write_status,
    };
    let routes_task = routes::spawn(
        client.clone(),
        config,
        table.clone(),
        version_tx,
        shutdown.clone(),
    );
    let defaults = xds::NodeConfig {
        sidecar: args.sidecar,
        listen: args.envoy_listen,
    };
    let server = xds::Server::bind(args.listen, table, version_rx, defaults, shutdown.clone())
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let reporter = xds::spawn_reporter(client, args.class, server.envoys(), shutdown.clone());
    if let Some(path) = &args.ready_file {
        write_ready_file(path, &json!({"xds": server.local_addr()}))?;
    }
    eprintln!("xDS on {} (ADS, state of the world)", server.local_addr());
    shutdown_signal().await;
    shutdown.cancel();
    server.join().await;
    let _ = routes_task.await;
    let _ = reporter.await;
    Ok(())
}

#[derive(Parser)]
struct BootstrapArgs {
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
    /// Envoy's admin interface (keep it private).
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: SocketAddr,
}

/// A kube client from a kubeconfig file, or kube's defaults.
async fn kube_client(path: Option<&Path>) -> Result<kube::Client> {
    Ok(portway_kube::client(path).await?)
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
    // Servers hold one descriptor per connection: take the whole hard limit, so a flood
    // of idle clients meets the connection caps, not EMFILE.
    match portway_serve::raise_fd_limit() {
        Ok(n) => tracing::debug!(limit = n, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up(args).await,
            Command::Http(args) => http(args).await,
            Command::Edge(args) => edge(args).await,
            Command::Sidecar(args) => sidecar(args).await,
            Command::Apiserver(args) => apiserver(args).await,
            Command::Dns(args) => dns(args).await,
            Command::Xds(args) => xds(args).await,
            Command::EnvoyBootstrap(args) => {
                let node = portway_gateway::xds::NodeConfig {
                    sidecar: args.sidecar,
                    listen: args.listen,
                };
                print!(
                    "{}",
                    portway_gateway::xds::bootstrap(args.xds, &args.node_id, &node, args.admin)
                );
                Ok(())
            }
            Command::Relay(args) => relay(args).await,
            Command::Agent(args) => agent(args).await,
            Command::Operator(args) => operator(args).await,
            Command::Crds => {
                print!("{}", portway_api::crds_yaml()?);
                Ok(())
            }
            Command::Token(args) => token(args).await,
        }
    })
}
