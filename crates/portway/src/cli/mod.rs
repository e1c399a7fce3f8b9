//! One file per command, each with its `Args` and a `run()` that calls the libraries.

pub mod acme;
pub mod agent;
pub mod apiserver;
pub mod dns;
pub mod edge;
pub mod http;
pub mod operator;
pub mod origins;
pub mod relay;
pub mod sidecar;
pub mod token;
pub mod up;
pub mod xds;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "portway",
    version,
    about = "Publish services behind NAT at public hostnames, over iroh tunnels."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as text, or as one JSON object per line (RUST_LOG filters them either way).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "PORTWAY_LOG_FORMAT"
    )]
    pub log_format: crate::logs::Format,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run everything on this machine: API server, DNS, relay, operator, edge, sidecar.
    Up(up::Args),
    /// Publish a local port at a public hostname (needs `portway up`), like `ngrok http`.
    Http(http::Args),
    /// Publish a local TCP port at a public TCP port of the edge (needs `portway up`),
    /// like `ngrok tcp`.
    Tcp(http::TcpArgs),
    /// Publish a local TLS server by passthrough on the edge's TLS port (needs `portway
    /// up`), like `ngrok tls`: the edge routes by server name and never decrypts.
    Tls(http::TlsArgs),
    /// Publish a local UDP service at a public UDP port of the built-in edge (needs
    /// `portway up`).
    Udp(http::UdpArgs),
    /// Run the built-in edge (with its sidecar in process) against a control plane.
    Edge(edge::Args),
    /// Run a standalone sidecar for an Envoy: requests carrying datum-* headers are
    /// forwarded to devices.
    Sidecar(sidecar::Args),
    /// Run the Kubernetes-compatible API server on an embedded SQLite store.
    Apiserver(apiserver::Args),
    /// Serve the Gateway API routes to Envoys over xDS (ADS).
    Xds(xds::Args),
    /// Print an Envoy bootstrap that points at `portway xds`.
    EnvoyBootstrap(xds::BootstrapArgs),
    /// Run the authoritative DNS server for iroh discovery records.
    Dns(dns::Args),
    /// Run an iroh relay.
    Relay(relay::Args),
    /// Run the device agent: register this device and serve its tunnels.
    Agent(agent::Args),
    /// Run the operator: HTTPProxy → Gateway API objects, connector readiness.
    Operator(operator::Args),
    /// Print the CustomResourceDefinitions of Portway's kinds (YAML).
    Crds,
    /// Join tokens: how a device gets its own credential for one project.
    Token(token::Args),
}

/// Runs the command.
///
/// # Errors
/// Whatever the command fails with, with context for the person who ran it.
pub async fn run(command: Command) -> Result<()> {
    match command {
        Command::Up(args) => up::run(args).await,
        Command::Http(args) => http::run(args).await,
        Command::Tcp(args) => http::run_tcp(args).await,
        Command::Tls(args) => http::run_tls(args).await,
        Command::Udp(args) => http::run_udp(args).await,
        Command::Edge(args) => edge::run(args).await,
        Command::Sidecar(args) => sidecar::run(args).await,
        Command::Apiserver(args) => apiserver::run(args).await,
        Command::Dns(args) => dns::run(args).await,
        Command::Xds(args) => xds::run(args).await,
        Command::EnvoyBootstrap(args) => {
            xds::bootstrap(args);
            Ok(())
        }
        Command::Relay(args) => relay::run(args).await,
        Command::Agent(args) => agent::run(args).await,
        Command::Operator(args) => operator::run(args).await,
        Command::Crds => {
            print!("{}", portway_api::crds_yaml()?);
            Ok(())
        }
        Command::Token(args) => token::run(args).await,
    }
}

/// A kube client from a kubeconfig file, or kube's defaults.
pub async fn kube_client(path: Option<&Path>) -> Result<kube::Client> {
    Ok(portway_kube::client(path).await?)
}

/// `$XDG_DATA_HOME/portway`: where `portway up` keeps its data.
pub fn default_data_dir() -> PathBuf {
    xdg_home("XDG_DATA_HOME", ".local/share").join("portway")
}

/// `$XDG_STATE_HOME/portway/<part>`: a long-running part's key and caches.
pub fn default_state_dir(part: &str) -> PathBuf {
    xdg_home("XDG_STATE_HOME", ".local/state")
        .join("portway")
        .join(part)
}

fn xdg_home(var: &str, under_home: &str) -> PathBuf {
    base_dir(
        std::env::var_os(var).as_deref(),
        std::env::var_os("HOME").as_deref(),
        under_home,
    )
}

/// An XDG base directory: `xdg` when it is absolute (the spec says to ignore a relative
/// one), else `home/under_home`, else — no home, as for a system service — `/var/lib`.
/// Never relative, so where data lands does not depend on the working directory.
fn base_dir(xdg: Option<&OsStr>, home: Option<&OsStr>, under_home: &str) -> PathBuf {
    let absolute = |v: Option<&OsStr>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    absolute(xdg)
        .or_else(|| absolute(home).map(|h| h.join(under_home)))
        .unwrap_or_else(|| PathBuf::from("/var/lib"))
}

/// `--tcp-ports FIRST-LAST`, as clap's value parser.
pub fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    portway_operator::tcp::ports::parse_range(s).map_err(|e| e.to_string())
}

/// Writes `value` to `path` atomically, so readers never see half a file.
/// `--leader-elect` for parts that run as several replicas.
#[derive(clap::Args, Clone, Debug)]
pub struct LeaderFlags {
    /// Run as one of several replicas: only the one holding the Lease
    /// `portway-system/<part>` writes status; all of them serve.
    #[arg(long)]
    pub leader_elect: bool,
    /// Seconds a leader that stopped renewing keeps the lease.
    #[arg(long, default_value_t = 15)]
    pub leader_elect_lease_seconds: u64,
}

impl LeaderFlags {
    /// The election for `lease` (named after the part), when asked for.
    pub fn config(&self, lease: &str) -> Option<portway_kube::leader::Config> {
        if !self.leader_elect {
            return None;
        }
        // Host names and process ids repeat across containers: a random part keeps two
        // replicas from taking one identity (and both leading).
        let identity = format!(
            "{}-{}-{:04x}",
            portway_agent::default_name(),
            std::process::id(),
            rand::random::<u16>()
        );
        let mut config = portway_kube::leader::Config::new(
            portway_api::certificates::SYSTEM_NAMESPACE,
            lease,
            identity,
        );
        config.lease_duration = std::time::Duration::from_secs(self.leader_elect_lease_seconds);
        // Renewed several times a lease, so one slow renewal does not cost leadership.
        config.retry_period = (config.lease_duration / 5).clamp(
            std::time::Duration::from_millis(200),
            std::time::Duration::from_secs(2),
        );
        Some(config)
    }

    /// Leadership as a flag (see [`portway_kube::leader::follow`]), when asked for.
    pub fn follow(
        &self,
        lease: &str,
        client: &kube::Client,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Option<tokio::sync::watch::Receiver<bool>> {
        let config = self.config(lease)?;
        Some(portway_kube::leader::follow(
            client.clone(),
            config,
            shutdown,
        ))
    }
}

pub fn write_ready_file(path: &Path, value: &serde_json::Value) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    // Owner only: it may carry the local UI's token.
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&serde_json::to_vec_pretty(value)?))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::CommandFactory;

    use super::*;

    /// Every command and subcommand, with its path (`portway agent key show`).
    fn commands(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Command)>) {
        let path = format!("{path} {}", cmd.get_name()).trim().to_owned();
        for sub in cmd.get_subcommands() {
            commands(sub, &path, out);
        }
        out.push((path, cmd.clone()));
    }

    #[test]
    fn every_flag_has_help_and_no_default_path_is_relative() {
        let mut cmd = Cli::command();
        // Global flags show up on subcommands only once the command is built.
        cmd.build();
        let mut all = Vec::new();
        commands(&cmd, "", &mut all);
        let mut problems = Vec::new();
        for (path, cmd) in &all {
            for arg in cmd.get_arguments() {
                let name = arg
                    .get_long()
                    .map_or_else(|| arg.get_id().to_string(), |l| format!("--{l}"));
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    problems.push(format!("{path} {name}: no help text"));
                }
                let is_path = arg.get_value_parser().type_id() == std::any::TypeId::of::<PathBuf>();
                for default in arg.get_default_values() {
                    if is_path && !Path::new(default).is_absolute() {
                        problems.push(format!(
                            "{path} {name}: default {default:?} is relative to the working directory"
                        ));
                    }
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        assert!(
            all.len() > 15,
            "walked {} commands: the walk must reach subcommands",
            all.len()
        );
    }

    #[test]
    fn default_directories_are_never_relative() {
        let dir = |xdg: Option<&str>, home: Option<&str>| {
            base_dir(xdg.map(OsStr::new), home.map(OsStr::new), ".local/state")
        };
        assert_eq!(
            dir(Some("/x/state"), Some("/home/a")),
            Path::new("/x/state")
        );
        assert_eq!(
            dir(Some("rel/state"), Some("/home/a")),
            Path::new("/home/a/.local/state"),
            "a relative XDG variable is ignored, as the spec says"
        );
        assert_eq!(
            dir(None, Some("/home/a")),
            Path::new("/home/a/.local/state")
        );
        assert_eq!(dir(None, None), Path::new("/var/lib"));
        assert_eq!(dir(Some(""), Some("")), Path::new("/var/lib"));
        assert!(default_state_dir("sidecar").ends_with("portway/sidecar"));
        assert!(default_data_dir().ends_with("portway"));
    }

    #[test]
    fn log_format_is_a_global_flag_and_an_env_variable() {
        let cli = Cli::try_parse_from(["portway", "crds", "--log-format", "json"]).unwrap();
        assert_eq!(cli.log_format, crate::logs::Format::Json);
        let cli = Cli::try_parse_from(["portway", "crds"]).unwrap();
        assert_eq!(cli.log_format, crate::logs::Format::Text);
        assert!(Cli::try_parse_from(["portway", "crds", "--log-format", "xml"]).is_err());
        let arg = Cli::command()
            .get_arguments()
            .find(|a| a.get_id() == "log_format")
            .cloned()
            .unwrap();
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some("PORTWAY_LOG_FORMAT")
        );
    }
}
