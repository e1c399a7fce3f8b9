//! `portway agent`: the device agent, and `portway agent key`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

use super::{default_state_dir, kube_client, shutdown_signal, write_ready_file};

#[derive(Parser)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
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
    /// Only through the relay: no direct UDP paths.
    #[arg(long)]
    relay_only: bool,
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
    #[command(flatten)]
    ui: super::http::UiArgs,
}

#[derive(Subcommand)]
enum Command {
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

pub async fn run(args: Args) -> Result<()> {
    if let Some(Command::Key { action, state_dir }) = args.command {
        let path = state_dir
            .or(args.state_dir)
            .unwrap_or_else(|| default_state_dir("agent"))
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
    args.ui.check()?;
    let file = match &args.config {
        Some(path) => portway_agent::config::load(path)?,
        None => portway_agent::config::FileConfig::default(),
    };
    let project = args
        .project
        .or(file.project)
        .context("no project: pass --project or set `project` in --config")?;
    let state_dir = args.state_dir.unwrap_or_else(|| default_state_dir("agent"));
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
    config.relay_only = args.relay_only;
    config.lease_duration = std::time::Duration::from_secs(args.lease_seconds.max(2));
    config.inspect = args.ui.enabled();
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
    let config_file = match &args.config {
        Some(p) => {
            Some(std::path::absolute(p).with_context(|| format!("--config {}", p.display()))?)
        }
        None => None,
    };
    let ui = args
        .ui
        .start(
            agent.handle(),
            portway_ui::Options {
                mode: "agent",
                config_file,
                flag_tunnels: flag_tunnels.clone(),
                ..Default::default()
            },
        )
        .await?;
    if let Some(ui) = &ui {
        eprintln!("local UI: {}", ui.login_url());
    }
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
                &json!({"node_id": agent.node_id().to_string(), "z32": agent.node_id().to_z32(), "project": reg.project, "connector": reg.connector, "ui": super::http::ui_ready(ui.as_ref())}),
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
