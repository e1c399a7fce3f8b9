//! The one iroh endpoint builder (agent, sidecar and tests all use it) and the persistent
//! secret key file.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use iroh::address_lookup::DnsAddressLookup;
use iroh::dns::{DnsResolver, NameserverConfig};
use iroh::endpoint::PortmapperConfig;
use iroh::endpoint::presets;
use iroh::{Endpoint, EndpointAddr, RelayConfig, RelayMap, RelayMode, RelayUrl, SecretKey};
use portway_api::{
    ConnectionDetails, ConnectionType, DiscoveryMode, PublicKeyAddress, PublicKeyConnectionDetails,
};

/// Where to look up endpoints by id: `_iroh.<z32-id>.<origin>` TXT records served by
/// `nameserver` (normally `portway dns`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsLookup {
    pub origin: String,
    pub nameserver: SocketAddr,
}

/// How to build an endpoint. The default reaches nothing outside what is configured: no
/// n0 relays, no n0 DNS, no port mapping.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// The identity; absent means a fresh random key (the id changes on every start).
    pub secret_key: Option<SecretKey>,
    /// Relays to use as home relay and to reach others through. Empty: no relay.
    pub relays: Vec<RelayUrl>,
    /// Address lookup by DNS; absent: peers must be dialed with full addresses.
    pub dns: Option<DnsLookup>,
    /// Also use n0's public relays and address lookup (DNS and pkarr).
    pub n0: bool,
    /// Protocols to accept (e.g. the tunnel ALPN); empty for dial-only endpoints.
    pub alpns: Vec<Vec<u8>>,
    /// Local UDP address; absent: every interface, a random port.
    pub bind_addr: Option<SocketAddr>,
    /// Use only relays, no direct UDP paths (`bind_addr` is then ignored).
    pub relay_only: bool,
    /// Streams a peer may open at once (QUIC default 100); each tunnelled connection is
    /// one stream, so the agent raises this.
    pub max_streams: Option<u32>,
    /// Declare a silent peer gone after this long (QUIC default 30 s); a gateway lowers it
    /// to notice vanished devices sooner.
    pub idle_timeout: Option<std::time::Duration>,
    /// Ping a peer this often, even while idle (iroh's default 5 s); with a short
    /// `idle_timeout` it tells a dead peer from a quiet one within that timeout.
    pub keep_alive: Option<std::time::Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("invalid bind address {addr}")]
    Addr {
        addr: SocketAddr,
        source: iroh::endpoint::InvalidSocketAddr,
    },
    #[error("binding the iroh endpoint")]
    Bind(#[from] iroh::endpoint::BindError),
}

/// A DNS resolver that asks only `nameserver`: never the system's or public resolvers.
pub fn resolver(nameserver: SocketAddr) -> DnsResolver {
    DnsResolver::builder()
        .add_nameserver_config(NameserverConfig::udp(nameserver.ip()).with_port(nameserver.port()))
        .disable_fallback()
        .build()
}

/// Builds and binds an endpoint from `config`.
///
/// # Errors
/// When the socket cannot be bound.
pub async fn bind(config: &Config) -> Result<Endpoint, BindError> {
    // Relays are configured without QUIC address discovery: `RelayMap::from(url)` would
    // assume a QUIC port that our relay does not serve.
    let ours = config
        .relays
        .iter()
        .map(|u| RelayConfig::new(u.clone(), None));
    let mut builder = if config.n0 {
        let map = RelayMode::Default.relay_map();
        map.extend(&RelayMap::from_iter(ours));
        Endpoint::builder(presets::N0).relay_mode(RelayMode::Custom(map))
    } else {
        let map = RelayMap::from_iter(ours);
        let mode = if map.is_empty() {
            RelayMode::Disabled
        } else {
            RelayMode::Custom(map)
        };
        Endpoint::builder(presets::Minimal).relay_mode(mode)
    };
    builder = builder
        .portmapper_config(PortmapperConfig::Disabled)
        .alpns(config.alpns.clone());
    if let Some(key) = &config.secret_key {
        builder = builder.secret_key(key.clone());
    }
    if config.max_streams.is_some() || config.idle_timeout.is_some() || config.keep_alive.is_some()
    {
        let mut t = iroh::endpoint::QuicTransportConfig::builder();
        if let Some(n) = config.max_streams {
            t = t.max_concurrent_bidi_streams(n.into());
        }
        if let Some(d) = config
            .idle_timeout
            .and_then(|d| iroh::endpoint::IdleTimeout::try_from(d).ok())
        {
            t = t.max_idle_timeout(Some(d));
        }
        if let Some(d) = config.keep_alive {
            t = t.keep_alive_interval(d);
        }
        builder = builder.transport_config(t.build());
    }
    if let Some(dns) = &config.dns {
        // The lookup gets its own resolver, so relay hostnames still resolve normally.
        builder = builder.address_lookup(
            DnsAddressLookup::builder(dns.origin.clone()).dns_resolver(resolver(dns.nameserver)),
        );
    }
    match (config.relay_only, config.bind_addr) {
        (true, _) => builder = builder.clear_ip_transports(),
        (false, Some(addr)) => {
            builder = builder
                .bind_addr(addr)
                .map_err(|source| BindError::Addr { addr, source })?
        }
        (false, None) => {}
    }
    let endpoint = builder.bind().await?;
    if config.relays.len() > 1 || config.n0 {
        tokio::spawn(replace_lost_home_relay(endpoint.clone()));
    }
    Ok(endpoint)
}

/// How long the home relay may stay unreachable before another is looked for.
const HOME_RELAY_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// iroh keeps reconnecting to a home relay that went away and picks another only at its
/// next full network report, tens of seconds later (measured: 44 s), while a device
/// reachable only through relays is unreachable. When the home relay stays disconnected
/// for [`HOME_RELAY_GRACE`], this makes iroh probe every relay at once, which moves home
/// to one that answers (and the device's address record with it). Ends when the endpoint
/// closes.
async fn replace_lost_home_relay(endpoint: Endpoint) {
    use iroh::Watcher;
    let mut status = endpoint.home_relay_status();
    let closed = endpoint.closed();
    tokio::pin!(closed);
    loop {
        let lost = {
            let now = status.get();
            !now.is_empty()
                && now
                    .iter()
                    .all(|s| !s.is_connected() && s.last_error().is_some())
        };
        let wait = if lost {
            HOME_RELAY_GRACE
        } else {
            std::time::Duration::MAX
        };
        tokio::select! {
            () = &mut closed => return,
            changed = status.updated() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(wait) => {
                let lost: Vec<iroh::RelayUrl> =
                    status.get().iter().map(|s| s.url().clone()).collect();
                tracing::info!(relays = ?lost, "home relay unreachable; looking for another");
                // A change of the relay map is what makes iroh probe every relay afresh
                // (`network_change` only looks at the interfaces): the lost relay goes
                // back in as it was.
                for url in lost {
                    if let Some(config) = endpoint.remove_relay(&url).await {
                        endpoint.insert_relay(url, config).await;
                    }
                }
                // Give the report time to finish before asking again.
                tokio::select! {
                    () = &mut closed => return,
                    () = tokio::time::sleep(HOME_RELAY_GRACE * 2) => {}
                }
            }
        }
    }
}

/// What a Connector's status says about an endpoint: hex id, home relay, direct
/// addresses (sorted, loopback and link-local included: the DNS server publishes what
/// the device reports).
pub fn connection_details(addr: &EndpointAddr) -> ConnectionDetails {
    let mut addresses: Vec<PublicKeyAddress> = addr
        .ip_addrs()
        .map(|a| PublicKeyAddress {
            address: a.ip().to_string(),
            port: i32::from(a.port()),
        })
        .collect();
    addresses.sort();
    addresses.truncate(portway_api::validation::MAX_ITEMS);
    ConnectionDetails {
        type_: ConnectionType::PublicKey,
        public_key: Some(PublicKeyConnectionDetails {
            id: addr.id.to_string(),
            discovery_mode: DiscoveryMode::Dns,
            home_relay: addr.relay_urls().next().map(ToString::to_string),
            addresses,
        }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading key file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing key file {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key file {path} is corrupt ({reason}); refusing to replace it, because a new key would change this \
         device's NodeID. Move the file away to start over with a new identity"
    )]
    Corrupt { path: PathBuf, reason: String },
}

fn encode(key: &SecretKey) -> String {
    let hex: String = key.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}\n")
}

fn decode(text: &str) -> Result<SecretKey, String> {
    let text = text.trim();
    if text.len() != 64 {
        return Err(format!("expected 64 hex characters, found {}", text.len()));
    }
    let mut bytes = [0u8; 32];
    for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(chunk).map_err(|_| "not hex".to_owned())?;
        bytes[i] = u8::from_str_radix(pair, 16).map_err(|_| format!("{pair:?} is not hex"))?;
    }
    Ok(SecretKey::from_bytes(&bytes))
}

/// Writes a new key file that must not exist yet, readable by the owner only.
fn create_key_file(path: &Path, key: &SecretKey) -> Result<(), KeyError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let err = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    let tmp = path.with_extension("new");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(encode(key).as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Loads the secret key at `path`, creating it (mode 0600) on first use. Returns the key
/// and whether it was created.
///
/// # Errors
/// When the file cannot be read or written, or is corrupt: a corrupt key is never
/// silently replaced.
pub fn load_or_create_key(path: &Path) -> Result<(SecretKey, bool), KeyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => decode(&text)
            .map(|k| (k, false))
            .map_err(|reason| KeyError::Corrupt {
                path: path.to_owned(),
                reason,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate();
            create_key_file(path, &key)?;
            Ok((key, true))
        }
        Err(source) => Err(KeyError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Replaces the key at `path` with a new one, keeping the old one as `<path>.old`.
///
/// # Errors
/// When the files cannot be written.
pub fn rotate_key(path: &Path) -> Result<SecretKey, KeyError> {
    if path.exists() {
        let old = path.with_extension("old");
        std::fs::rename(path, &old).map_err(|source| KeyError::Write { path: old, source })?;
    }
    let key = SecretKey::generate();
    create_key_file(path, &key)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_is_created_private_reused_and_never_replaced_when_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/key");
        let (first, created) = load_or_create_key(&path).unwrap();
        assert!(created);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (again, created) = load_or_create_key(&path).unwrap();
        assert!(!created);
        assert_eq!(first.public(), again.public());

        std::fs::write(&path, "not a key").unwrap();
        let err = load_or_create_key(&path).unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains("NodeID"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a key");

        let rotated = rotate_key(&path).unwrap();
        assert_ne!(rotated.public(), first.public());
        assert_eq!(
            load_or_create_key(&path).unwrap().0.public(),
            rotated.public()
        );
        assert!(path.with_extension("old").exists());
    }
}
