//! `portway http PORT`: the one-liner. Runs the agent with one HTTP tunnel to
//! `127.0.0.1:PORT`, waits until the proxy is programmed, and reports the public URL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::Api;
use portway_agent::{Agent, Protocol, Target, Tunnel, join};
use portway_api::{Connector, HttpProxy, find_condition, is_condition_true};

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
    /// Reach the edge only through the relay.
    pub relay_only: bool,
    /// Who may call the URL (`--basic-auth`, `--allow-ip`, ...): an AccessPolicy the
    /// device writes for its proxy (http only).
    pub access: Option<portway_agent::tunnel::Access>,
    /// Record the tunnel's exchanges for the local inspector.
    pub inspect: bool,
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
    #[error(
        "cannot reach the Portway API server at {url} ({why}): is `portway up` running? \
         Start it with `portway up` (same --data), then run this again"
    )]
    Unreachable { url: String, why: String },
    #[error("hostname {hostname} is taken: {message}. Choose another with --hostname")]
    HostnameTaken { hostname: String, message: String },
    #[error("hostname {hostname} is not verified: {message}. Then run this again")]
    HostnameNotVerified { hostname: String, message: String },
    #[error("the public port is refused: {0}. Choose another with --remote-port")]
    PortRefused(String),
    #[error("the TLS name is refused: {0}. Choose another with --hostname")]
    NameRefused(String),
    #[error("no certificate for the tunnel: {0}")]
    Certificate(String),
}

const ADJECTIVES: [&str; 16] = [
    "amber", "brave", "calm", "deft", "eager", "fair", "glad", "hardy", "keen", "lucid", "merry",
    "noble", "proud", "quick", "rapid", "sunny",
];
const NOUNS: [&str; 16] = [
    "otter", "falcon", "maple", "harbor", "comet", "meadow", "lynx", "river", "cedar", "pebble",
    "heron", "summit", "willow", "badger", "canyon", "dune",
];

/// A fresh `<adjective>-<noun>-<4 hex>.<zone>`: under the zone, so the zone's wildcard
/// certificate serves it over HTTPS at once (and with the default zone,
/// `portway.localhost`, browsers and curl resolve it to loopback).
pub fn random_hostname(zone: &str) -> String {
    let a = ADJECTIVES[rand::random_range(0..ADJECTIVES.len())];
    let n = NOUNS[rand::random_range(0..NOUNS.len())];
    format!("{a}-{n}-{:04x}.{zone}", rand::random::<u16>())
}

/// A state directory (`DATA/agents/N`: key, device credential, connector name) that this
/// process holds for its lifetime by an OS lock on `N/lock`. The kernel drops the lock
/// when the process ends, `kill -9` included, so a dead run never keeps its slot and a
/// recycled PID never looks alive.
pub struct Slot {
    dir: PathBuf,
    n: usize,
    _lock: std::fs::File,
}

/// How many `portway http` may run at once on one data directory.
const SLOTS: usize = 64;

/// The slot last used for `hostname` when it is free (a restart after a crash keeps its
/// connector, key and proxy), else the lowest free slot.
fn state_slot(data_dir: &Path, hostname: &str) -> Result<Slot, Error> {
    let dir = |n: usize| data_dir.join("agents").join(n.to_string());
    let try_take = |n: usize| -> Result<Option<Slot>, Error> {
        let d = dir(n);
        std::fs::create_dir_all(&d).map_err(|e| Error::State(d.clone(), e))?;
        let path = d.join("lock");
        let file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::State(path.clone(), e))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Slot {
                dir: d,
                n,
                _lock: file,
            })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::State(path, e)),
        }
    };
    let last_host = |n: usize| std::fs::read_to_string(dir(n).join(HOSTNAME_FILE)).ok();
    let mine = (1..=SLOTS).find(|n| last_host(*n).is_some_and(|h| h.trim() == hostname));
    let slot = match mine.map(try_take).transpose()?.flatten() {
        Some(slot) => slot,
        None => {
            let mut free = None;
            for n in 1..=SLOTS {
                if let Some(slot) = try_take(n)? {
                    free = Some(slot);
                    break;
                }
            }
            free.ok_or_else(|| {
                Error::State(
                    data_dir.join("agents"),
                    std::io::Error::other(format!("{SLOTS} `portway http` already running")),
                )
            })?
        }
    };
    let path = slot.dir.join(HOSTNAME_FILE);
    std::fs::write(&path, hostname).map_err(|e| Error::State(path, e))?;
    Ok(slot)
}

/// Which hostname a slot last served.
const HOSTNAME_FILE: &str = "hostname";

/// Waits up to `within` for the API server's port to accept a connection, so a stopped
/// `portway up` is one clear error instead of endless retries.
async fn reachable(url: &str, within: Duration) -> Result<(), Error> {
    let unreachable = |why: String| Error::Unreachable {
        url: url.to_owned(),
        why,
    };
    let parsed = url::Url::parse(url).map_err(|e| unreachable(e.to_string()))?;
    let addr = parsed
        .socket_addrs(|| None)
        .map_err(|e| unreachable(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(&addr[..]),
        )
        .await;
        let why = match attempt {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within 1 s".to_owned(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(unreachable(why));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
        let client = join::client(&cred, state_dir, project, name, class).await?;
        // An ephemeral connector deleted after its TTL takes its credential's binding
        // with it: forget the credential and join again, with the same key.
        match Api::<Connector>::namespaced(client.clone(), project)
            .get_opt(name)
            .await
        {
            Ok(Some(_)) => return Ok(client),
            Ok(None) => {}
            Err(kube::Error::Api(e)) if e.code == 401 || e.code == 403 => {}
            Err(e) => return Err(UpError::Kube(e).into()),
        }
        tracing::info!(connector = %name, "the saved credential's connector is gone; joining again");
        join::forget(state_dir).map_err(|e| Error::State(state_dir.to_owned(), e))?;
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

/// A one-liner's tunnel to `127.0.0.1:port`, named `<protocol>-<port>`.
pub(crate) fn local_tunnel(protocol: Protocol, port: u16) -> Tunnel {
    Tunnel {
        name: format!("{}-{port}", protocol.as_str()),
        target: Target {
            host: "127.0.0.1".into(),
            port,
        },
        protocol,
        hostnames: Vec::new(),
        public: None,
        proxy_protocol: false,
        cert_dir: None,
        access: None,
    }
}

/// Whether a one-liner's proxy is live: accepted, programmed and a backend ready.
pub(crate) fn live(c: &[Condition]) -> bool {
    ["Accepted", "Programmed", "BackendsReady"]
        .iter()
        .all(|t| is_condition_true(c, t))
}

/// Why a one-liner's proxy is not live by `deadline`: its conditions that are not True,
/// each with its reason and message, or the watch's failure.
pub(crate) fn not_programmed(deadline: Duration, c: &[Condition], watch: Option<String>) -> Error {
    let why = c
        .iter()
        .filter(|c| c.status != "True")
        .map(|c| format!("{}={} ({}: {})", c.type_, c.status, c.reason, c.message))
        .collect::<Vec<_>>()
        .join("; ");
    let why = match watch {
        Some(e) => format!("watching it failed: {e}"),
        None if why.is_empty() => "no status yet".into(),
        None => why,
    };
    Error::NotProgrammed(deadline, why)
}

/// A one-liner's agent, running with its one tunnel.
pub(crate) struct Device {
    pub agent: Agent,
    /// The device's own client (its credential).
    pub client: kube::Client,
    pub info: Info,
    pub slot: Slot,
}

/// Joins (or joins again) as the one-liner's device in the state slot last used for
/// `key` (a hostname, `tcp-PORT`), and starts the agent with `tunnel`.
/// Returns it with the name of the tunnel's proxy.
pub(crate) async fn start_device(
    config: &Config,
    key: &str,
    tunnel: Tunnel,
) -> Result<(Device, String), Error> {
    let info = Info::load(&config.data_dir)?;
    reachable(&info.apiserver, Duration::from_secs(5)).await?;
    let slot = state_slot(&config.data_dir, key)?;
    let state_dir = slot.dir.clone();
    let mut agent_config = portway_agent::Config::new(config.project.clone(), state_dir.clone());
    let base = config
        .name
        .clone()
        .unwrap_or_else(portway_agent::default_name);
    agent_config.name = if slot.n == 1 {
        base
    } else {
        format!("{base}-{}", slot.n)
    };
    agent_config.lease_duration = config.lease;
    agent_config.relay_only = config.relay_only;
    agent_config.inspect = config.inspect;
    agent_config
        .labels
        .insert(portway_api::labels::EPHEMERAL.into(), "true".into());
    let client = device_client(config, &info, &state_dir, &agent_config).await?;
    agent_config.relays = vec![
        info.relay
            .parse()
            .map_err(|_| UpError::Corrupt(config.data_dir.join(Info::FILE), "relay URL".into()))?,
    ];
    let name = tunnel.name.clone();
    agent_config.tunnels = vec![tunnel];
    let agent = Agent::start(agent_config, client.clone()).await?;
    let connector = agent.registered().await.connector.clone();
    let proxy = portway_agent::objects::object_name(&connector, &name);
    Ok((
        Device {
            agent,
            client,
            info,
            slot,
        },
        proxy,
    ))
}

/// How long a live tunnel waits for its certificate before printing an http:// URL.
const CERTIFICATE_WAIT: Duration = Duration::from_secs(15);

/// A running one-liner.
pub struct Http {
    pub agent: Agent,
    pub url: String,
    pub hostname: String,
    pub proxy: String,
    /// Held while running; dropped (and the OS lock with it) when this ends.
    _slot: Slot,
}

impl Http {
    /// Starts the agent and waits until the public URL works.
    ///
    /// # Errors
    /// When `portway up` is not running, or the proxy is not programmed in time (the
    /// error says which condition is missing).
    pub async fn start(config: Config) -> Result<Self, Error> {
        let zone = Info::load(&config.data_dir)?.zone;
        let hostname = config
            .hostname
            .clone()
            .unwrap_or_else(|| random_hostname(&zone))
            .to_ascii_lowercase();
        portway_api::validation::hostname(&hostname, false)
            .map_err(|e| Error::Hostname(hostname.clone(), e))?;
        let tunnel = Tunnel {
            hostnames: vec![hostname.clone()],
            access: config.access.clone(),
            ..local_tunnel(Protocol::Http, config.port)
        };
        let (device, proxy) = start_device(&config, &hostname, tunnel).await?;
        let (agent, info, slot) = (device.agent, device.info, device.slot);
        let api: Api<HttpProxy> = Api::namespaced(device.client, &config.project);
        let deadline = Duration::from_secs(60);
        // Only what the operator said about this very spec: a proxy of the same name left
        // by an earlier run of this slot (another hostname, killed before it removed it)
        // still carries its old conditions until the operator has looked again.
        let conditions = |p: Option<&HttpProxy>| {
            p.and_then(|p| {
                let generation = p.metadata.generation;
                p.status.as_ref().map(|s| {
                    s.conditions
                        .iter()
                        .filter(|c| generation.is_none() || c.observed_generation == generation)
                        .cloned()
                        .collect::<Vec<_>>()
                })
            })
            .unwrap_or_default()
        };
        // Another proxy owning the hostname will not change by waiting.
        let taken = |c: &[Condition]| {
            find_condition(c, "Accepted")
                .filter(|a| a.status == "False" && a.reason == "HostnameInUse")
                .map(|a| a.message.clone())
        };
        // With HTTPS on, the URL printed is https:// once the hostname's certificate is
        // ready; wait until the issuer has said either way.
        // A condition of this tunnel's hostname in the proxy's status.
        let of_hostname = |p: Option<&HttpProxy>, type_: &str| {
            p.and_then(|p| p.status.as_ref())
                .and_then(|s| s.hostname_statuses.iter().find(|h| h.hostname == hostname))
                .and_then(|h| find_condition(&h.conditions, type_).cloned())
        };
        let certificate = |p: Option<&HttpProxy>| {
            of_hostname(p, "CertificatesReady")
                .filter(|c| c.reason != "Pending")
                .map(|c| c.status == "True")
        };
        // Nor will a name outside the zone that this project has not proven.
        let unverified = |p: Option<&HttpProxy>| {
            of_hostname(p, "HostnamesVerified")
                .filter(|c| c.status == "False")
                .map(|c| c.message)
        };
        let settled = |p: Option<&HttpProxy>| {
            let c = conditions(p);
            live(&c) || taken(&c).is_some() || unverified(p).is_some()
        };
        let waited = tokio::time::timeout(
            deadline,
            kube::runtime::wait::await_condition(api.clone(), &proxy, settled),
        )
        .await;
        if let Ok(Ok(p)) = &waited
            && let Some(message) = taken(&conditions(p.as_ref()))
        {
            agent.shutdown(true).await;
            return Err(Error::HostnameTaken { hostname, message });
        }
        if let Ok(Ok(p)) = &waited
            && let Some(message) = unverified(p.as_ref())
        {
            agent.shutdown(true).await;
            return Err(Error::HostnameNotVerified { hostname, message });
        }
        if !matches!(&waited, Ok(Ok(p)) if live(&conditions(p.as_ref()))) {
            let conds = api
                .get_opt(&proxy)
                .await
                .ok()
                .flatten()
                .and_then(|p| p.status)
                .map(|s| s.conditions)
                .unwrap_or_default();
            let watch = match waited {
                Ok(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            agent.shutdown(true).await;
            return Err(not_programmed(deadline, &conds, watch));
        }
        // Live: with HTTPS on, give the issuer a bounded moment to say whether the name
        // has a certificate (a slow ACME order must not fail a working tunnel; the URL is
        // then printed as http://).
        let mut certified = matches!(&waited, Ok(Ok(p)) if certificate(p.as_ref()) == Some(true));
        if info.https.is_some() && !certified {
            let decided = |p: Option<&HttpProxy>| certificate(p).is_some();
            let waited = tokio::time::timeout(
                CERTIFICATE_WAIT,
                kube::runtime::wait::await_condition(api.clone(), &proxy, decided),
            )
            .await;
            certified = matches!(&waited, Ok(Ok(p)) if certificate(p.as_ref()) == Some(true));
        }
        let https = info.https.filter(|_| certified);
        let url = match https {
            Some(a) if a.port() == 443 => format!("https://{hostname}/"),
            Some(a) => format!("https://{hostname}:{}/", a.port()),
            None if info.http.port() == 80 => format!("http://{hostname}/"),
            None => format!("http://{hostname}:{}/", info.http.port()),
        };
        Ok(Self {
            agent,
            url,
            hostname,
            proxy,
            _slot: slot,
        })
    }

    /// Removes the tunnel's advertisement and proxy (the connector stays), releases the
    /// lease and frees the state slot.
    pub async fn stop(self) {
        self.agent.shutdown(true).await;
    }
}
