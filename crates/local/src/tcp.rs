//! `portway tcp PORT`: the one-liner for raw TCP (like `ngrok tcp 22`). Runs the agent with
//! one tcp tunnel to `127.0.0.1:PORT` published at a public port of the edge, waits until
//! the port is live, and reports `tcp://HOST:PORT`.
//!
//! `portway tls PORT [--hostname H]...` (like `ngrok tls`): the same for a TLS server on
//! the device, published by passthrough on the edge's TLS port under the proxy's
//! canonical name and `H`; reports `tls://NAME:PORT` for each name.
//!
//! `portway udp PORT [--remote-port N]`: a UDP service at a public UDP port of the
//! built-in edge; reports `udp://HOST:PORT`.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::Api;
use portway_agent::{Agent, Protocol, PublicPort, Tunnel};
use portway_api::{TcpProxy, find_condition};

use crate::http::{Config, Error, Slot, live, local_tunnel, not_programmed, start_device};

/// A running TCP (or TLS passthrough) one-liner.
pub struct Tcp {
    pub agent: Agent,
    /// `tcp://HOST:PORT` (`tls://NAME:PORT`, the first name), where clients connect.
    pub url: String,
    /// The public port granted; for TLS, the edge's TLS port.
    pub port: u16,
    /// TLS passthrough: every name served, canonical one last.
    pub hostnames: Vec<String>,
    /// TLS with a certificate directory: the chain issued for the device's key.
    pub certificate: Option<PathBuf>,
    pub proxy: String,
    _slot: Slot,
}

/// Why a certificate request will not be granted by waiting. (`NameNotServed` is not
/// final: a request stored by an earlier run names that run's proxy, and the agent
/// replaces it once it sees this proxy's names.)
const CERTIFICATE_REFUSALS: [&str; 3] = ["InvalidRequest", "NameNotProven", "NoIssuer"];

/// Waits until the proxy's certificate is issued and the agent has written it to
/// `dir/cert.pem` for the key there; returns that path.
async fn await_certificate(
    api: &Api<TcpProxy>,
    proxy: &str,
    dir: &std::path::Path,
) -> Result<PathBuf, Error> {
    // ACME orders take a few round trips, and answers must show at the DNS server.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    // Only a verdict on the proxy as it is now (its latest request) counts.
    let condition = |p: Option<&TcpProxy>| {
        let p = p?;
        p.status
            .as_ref()
            .and_then(|s| find_condition(&s.conditions, "CertificateReady"))
            .filter(|c| c.observed_generation == p.metadata.generation)
            .cloned()
    };
    let settled = |p: Option<&TcpProxy>| {
        condition(p).is_some_and(|c| {
            c.status == "True" || CERTIFICATE_REFUSALS.contains(&c.reason.as_str())
        })
    };
    let waited = tokio::time::timeout_at(
        deadline,
        kube::runtime::wait::await_condition(api.clone(), proxy, settled),
    )
    .await;
    let last = match waited {
        Ok(Ok(p)) => condition(p.as_ref()),
        _ => api
            .get_opt(proxy)
            .await
            .ok()
            .flatten()
            .and_then(|p| condition(Some(&p))),
    };
    match last {
        Some(c) if c.status == "True" => {}
        Some(c) => return Err(Error::Certificate(format!("{}: {}", c.reason, c.message))),
        None => {
            return Err(Error::Certificate(
                "the operator has not answered the request (CertificateReady is missing)".into(),
            ));
        }
    }
    // The agent writes the file once it sees the chain; moments at most.
    let path = dir.join(portway_agent::certificate::CERT);
    let key = std::fs::read_to_string(dir.join(portway_agent::certificate::KEY))
        .map_err(|e| Error::Certificate(format!("{}: {e}", dir.display())))?;
    let public_key = portway_tls::csr::public_key_of(&key)
        .map_err(|e| Error::Certificate(format!("{}: {e}", dir.display())))?;
    let mut delay = Duration::from_millis(10);
    loop {
        let ours = std::fs::read_to_string(&path)
            .ok()
            .and_then(|c| portway_tls::csr::leaf(&c).ok())
            .is_some_and(|l| l.public_key == public_key);
        if ours {
            return Ok(path);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Certificate(format!(
                "issued, but {} was not written in time",
                path.display()
            )));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// Why a port or name will not be granted by waiting: the TCPProxy's refusal.
const REFUSALS: [&str; 4] = [
    "PortInUse",
    "PortNotAllowed",
    "NoPortAvailable",
    "HostnameInUse",
];

impl Tcp {
    /// Starts the agent and waits until the public port reaches the local one. `remote`:
    /// the public port wanted, else one from the edge's range; `proxy_protocol`: each
    /// connection starts with a PROXY v2 header naming the public client.
    ///
    /// # Errors
    /// When `portway up` is not running, the port is refused (taken, outside the range,
    /// none left), or the proxy is not programmed in time (the error says which condition
    /// is missing).
    pub async fn start(
        config: Config,
        remote: Option<u16>,
        proxy_protocol: bool,
    ) -> Result<Self, Error> {
        let tunnel = Tunnel {
            public: Some(remote.map_or(PublicPort::Any, PublicPort::Port)),
            proxy_protocol,
            ..local_tunnel(Protocol::Tcp, config.port)
        };
        Self::publish(config, tunnel).await
    }

    /// Starts the agent and waits until the public UDP port reaches the local one.
    ///
    /// # Errors
    /// As [`Tcp::start`].
    pub async fn start_udp(config: Config, remote: Option<u16>) -> Result<Self, Error> {
        let tunnel = Tunnel {
            public: Some(remote.map_or(PublicPort::Any, PublicPort::Port)),
            ..local_tunnel(Protocol::Udp, config.port)
        };
        Self::publish(config, tunnel).await
    }

    /// Starts the agent and waits until TLS connections naming the proxy's names reach
    /// the local TLS server, undecrypted. `hostnames`: names besides the canonical one
    /// (outside the zone, the project must have proven them). `cert_dir`: get a
    /// certificate for those names for a key made there, and wait until it is written
    /// (`cert.pem`, beside `key.pem`).
    ///
    /// # Errors
    /// As [`Tcp::start`]; a name another proxy holds is refused at once, and an edge
    /// without a TLS port never programs the proxy (the error says so). With `cert_dir`,
    /// a request refused (no issuer, say) or not issued in time, with the issuer's reason.
    pub async fn start_tls(
        config: Config,
        hostnames: Vec<String>,
        proxy_protocol: bool,
        cert_dir: Option<PathBuf>,
    ) -> Result<Self, Error> {
        let tunnel = Tunnel {
            hostnames: hostnames.iter().map(|h| h.to_ascii_lowercase()).collect(),
            proxy_protocol,
            cert_dir,
            ..local_tunnel(Protocol::Tls, config.port)
        };
        Self::publish(config, tunnel).await
    }

    async fn publish(config: Config, tunnel: Tunnel) -> Result<Self, Error> {
        let tls = tunnel.protocol == Protocol::Tls;
        let cert_dir = tunnel.cert_dir.clone();
        let scheme = tunnel.protocol.as_str();
        let key = tunnel.name.clone();
        let (device, proxy) = start_device(&config, &key, tunnel).await?;
        let (agent, info, slot) = (device.agent, device.info, device.slot);
        let api: Api<TcpProxy> = Api::namespaced(device.client, &config.project);
        let conditions = |p: Option<&TcpProxy>| -> Vec<Condition> {
            p.and_then(|p| p.status.clone())
                .map(|s| s.conditions)
                .unwrap_or_default()
        };
        let refused = |c: &[Condition]| {
            find_condition(c, "Accepted")
                .filter(|a| a.status == "False" && REFUSALS.contains(&a.reason.as_str()))
                .map(|a| a.message.clone())
        };
        let settled = |p: Option<&TcpProxy>| {
            let c = conditions(p);
            live(&c) || refused(&c).is_some()
        };
        let deadline = Duration::from_secs(60);
        let waited = tokio::time::timeout(
            deadline,
            kube::runtime::wait::await_condition(api.clone(), &proxy, settled),
        )
        .await;
        let done = match &waited {
            Ok(Ok(p)) => p.clone(),
            _ => None,
        };
        if let Some(message) = refused(&conditions(done.as_ref())) {
            agent.shutdown(true).await;
            return Err(if tls {
                Error::NameRefused(message)
            } else {
                Error::PortRefused(message)
            });
        }
        let status = done
            .as_ref()
            .filter(|p| live(&conditions(Some(p))))
            .and_then(|p| p.status.clone());
        let hostnames = status
            .as_ref()
            .map(|s| s.hostnames.clone())
            .unwrap_or_default();
        let port = if tls {
            info.https
                .map(|a| a.port())
                .filter(|_| !hostnames.is_empty())
        } else {
            status
                .and_then(|s| s.port)
                .and_then(|p| u16::try_from(p).ok())
        };
        let Some(port) = port else {
            let watch = match waited {
                Ok(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            agent.shutdown(true).await;
            return Err(not_programmed(deadline, &conditions(done.as_ref()), watch));
        };
        // The edge binds public ports where it serves HTTP.
        let host = match info.http.ip() {
            ip if ip.is_unspecified() => "localhost".to_owned(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let url = match hostnames.first() {
            Some(name) if tls => format!("tls://{name}:{port}"),
            _ => format!("{scheme}://{host}:{port}"),
        };
        let certificate = match cert_dir {
            Some(dir) => match await_certificate(&api, &proxy, &dir).await {
                Ok(path) => Some(path),
                Err(e) => {
                    agent.shutdown(true).await;
                    return Err(e);
                }
            },
            None => None,
        };
        Ok(Self {
            agent,
            url,
            port,
            hostnames,
            certificate,
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
