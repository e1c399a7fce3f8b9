//! `portway http PORT`: the one-liner. Runs the agent with one HTTP tunnel to
//! `127.0.0.1:PORT`, waits until the proxy is programmed, and reports the public URL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::api::Api;
use portway_agent::{Agent, Protocol, Target, Tunnel, join};
use portway_api::{HttpProxy, is_condition_true};

use crate::up::{Error as UpError, Info};

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub port: u16,
    /// Public hostname; default `<random-name>.localhost`.
    pub hostname: Option<String>,
    pub project: String,
    /// A kubeconfig carrying a join token (or a person's agent-role token). Default: a
    /// join token for `project`, minted with the admin kubeconfig of `portway up`; the
    /// device credential it is exchanged for is kept in the state slot.
    pub kubeconfig: Option<PathBuf>,
    /// Connector name; default: the hostname of this machine.
    pub name: Option<String>,
    /// Heartbeat lease; a device that vanishes goes offline after this long.
    pub lease: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Up(#[from] UpError),
    #[error("agent")]
    Agent(#[from] portway_agent::Error),
    #[error("hostname {0:?}: {1}")]
    Hostname(String, String),
    #[error("the proxy was not programmed within {0:?}: {1}")]
    NotProgrammed(Duration, String),
    #[error("joining as a device")]
    Join(#[from] join::JoinError),
    #[error("state directory {0}")]
    State(PathBuf, #[source] std::io::Error),
}

const ADJECTIVES: [&str; 16] = [
    "amber", "brave", "calm", "deft", "eager", "fair", "glad", "hardy", "keen", "lucid", "merry",
    "noble", "proud", "quick", "rapid", "sunny",
];
const NOUNS: [&str; 16] = [
    "otter", "falcon", "maple", "harbor", "comet", "meadow", "lynx", "river", "cedar", "pebble",
    "heron", "summit", "willow", "badger", "canyon", "dune",
];

/// A fresh `<adjective>-<noun>-<4 hex>.localhost` (browsers and curl resolve `*.localhost`
/// to loopback).
pub fn random_hostname() -> String {
    let a = ADJECTIVES[rand::random_range(0..ADJECTIVES.len())];
    let n = NOUNS[rand::random_range(0..NOUNS.len())];
    format!("{a}-{n}-{:04x}.localhost", rand::random::<u16>())
}

/// A state directory not used by another running `portway http`, so each run has its own
/// NodeID and connector. Holds a lock file with our pid.
fn state_slot(data_dir: &Path) -> Result<(PathBuf, usize), Error> {
    for slot in 1..=64usize {
        let dir = data_dir.join("agents").join(slot.to_string());
        std::fs::create_dir_all(&dir).map_err(|e| Error::State(dir.clone(), e))?;
        let lock = dir.join("lock");
        let held = std::fs::read_to_string(&lock)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|pid| {
                pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists()
            });
        if !held {
            std::fs::write(&lock, std::process::id().to_string())
                .map_err(|e| Error::State(lock, e))?;
            return Ok((dir, slot));
        }
    }
    Err(Error::State(
        data_dir.join("agents"),
        std::io::Error::other("64 `portway http` already running"),
    ))
}

/// The device's client: its saved credential, else a join — with the given kubeconfig,
/// or with a one-use join token minted by the admin kubeconfig of `portway up`.
async fn device_client(
    config: &Config,
    info: &Info,
    state_dir: &Path,
    agent: &portway_agent::Config,
) -> Result<kube::Client, Error> {
    let (project, name, class) = (&agent.project, &agent.name, &agent.connector_class);
    if let Some(path) = &config.kubeconfig {
        return Ok(join::client(path, state_dir, project, name, class).await?);
    }
    if join::credential_path(state_dir).exists() {
        let cred = join::credential_path(state_dir);
        return Ok(join::client(&cred, state_dir, project, name, class).await?);
    }
    let admin_kc = kube::config::Kubeconfig::read_from(&info.kubeconfig)
        .map_err(|e| UpError::Kubeconfig(e.to_string()))?;
    let admin = portway_kube::client(Some(&info.kubeconfig))
        .await
        .map_err(UpError::from)?;
    let (token, _) = join::create_join_token(&admin, project, 600, 1).await?;
    Ok(join::client_with(
        join::with_token(admin_kc, &token),
        state_dir,
        project,
        name,
        class,
    )
    .await?)
}

/// A running one-liner.
pub struct Http {
    pub agent: Agent,
    pub url: String,
    pub hostname: String,
    pub proxy: String,
    state_dir: PathBuf,
}

impl Http {
    /// Starts the agent and waits until the public URL works.
    ///
    /// # Errors
    /// When `portway up` is not running, or the proxy is not programmed in time (the
    /// error says which condition is missing).
    pub async fn start(config: Config) -> Result<Self, Error> {
        let info = Info::load(&config.data_dir)?;
        let hostname = config
            .hostname
            .clone()
            .unwrap_or_else(random_hostname)
            .to_ascii_lowercase();
        portway_api::validation::hostname(&hostname, false)
            .map_err(|e| Error::Hostname(hostname.clone(), e))?;
        let (state_dir, slot) = state_slot(&config.data_dir)?;
        let mut agent_config =
            portway_agent::Config::new(config.project.clone(), state_dir.clone());
        let base = config
            .name
            .clone()
            .unwrap_or_else(portway_agent::default_name);
        agent_config.name = if slot == 1 {
            base
        } else {
            format!("{base}-{slot}")
        };
        agent_config.lease_duration = config.lease;
        let client = device_client(&config, &info, &state_dir, &agent_config).await?;
        agent_config.relays =
            vec![info.relay.parse().map_err(|_| {
                UpError::Corrupt(config.data_dir.join(Info::FILE), "relay URL".into())
            })?];
        agent_config.tunnels = vec![Tunnel {
            name: format!("http-{}", config.port),
            target: Target {
                host: "127.0.0.1".into(),
                port: config.port,
            },
            protocol: Protocol::Http,
            hostnames: vec![hostname.clone()],
        }];
        let agent = Agent::start(agent_config, client.clone()).await?;
        let reg = agent.registered().await;
        let proxy =
            portway_agent::objects::object_name(&reg.connector, &format!("http-{}", config.port));
        let api: Api<HttpProxy> = Api::namespaced(client, &config.project);
        let deadline = Duration::from_secs(60);
        let live = |p: Option<&HttpProxy>| {
            let conds = p.and_then(|p| p.status.as_ref()).map(|s| &s.conditions[..]);
            conds.is_some_and(|c| {
                ["Accepted", "Programmed", "BackendsReady"]
                    .iter()
                    .all(|t| is_condition_true(c, t))
            })
        };
        let waited = tokio::time::timeout(
            deadline,
            kube::runtime::wait::await_condition(api.clone(), &proxy, live),
        )
        .await;
        if !matches!(waited, Ok(Ok(_))) {
            let conds = api
                .get_opt(&proxy)
                .await
                .ok()
                .flatten()
                .and_then(|p| p.status)
                .map(|s| s.conditions)
                .unwrap_or_default();
            let why = conds
                .iter()
                .filter(|c| c.status != "True")
                .map(|c| format!("{}={} ({}: {})", c.type_, c.status, c.reason, c.message))
                .collect::<Vec<_>>()
                .join("; ");
            let why = match waited {
                Ok(Err(e)) => format!("watching it failed: {e}"),
                _ if why.is_empty() => "no status yet".into(),
                _ => why,
            };
            agent.shutdown(true).await;
            return Err(Error::NotProgrammed(deadline, why));
        }
        let port = info.http.port();
        let url = if port == 80 {
            format!("http://{hostname}/")
        } else {
            format!("http://{hostname}:{port}/")
        };
        Ok(Self {
            agent,
            url,
            hostname,
            proxy,
            state_dir,
        })
    }

    /// Removes the tunnel's advertisement and proxy (the connector stays), releases the
    /// lease and frees the state slot.
    pub async fn stop(self) {
        self.agent.shutdown(true).await;
        let _ = std::fs::remove_file(self.state_dir.join("lock"));
    }
}
