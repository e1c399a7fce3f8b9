//! `portway relay`: a self-hosted iroh relay (the `iroh-relay` server), plain HTTP for
//! local use or HTTPS with a given certificate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use iroh::RelayUrl;
use iroh_relay::server::{self as relay, CertConfig, QuicConfig, ServerConfig, TlsConfig};

#[derive(Clone, Debug)]
pub struct Config {
    /// Where the relay (HTTP, or HTTPS with `tls`) listens; default `127.0.0.1:3340`.
    pub listen: SocketAddr,
    /// Certificate chain and key (PEM). With them the relay serves HTTPS on `listen` and
    /// QUIC address discovery on the same port over UDP; plain HTTP then moves to
    /// `http_listen`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Plain HTTP listener used alongside TLS (captive-portal checks); default port 0.
    pub http_listen: Option<SocketAddr>,
    /// The hostname clients use in the relay URL (default: the listen address).
    pub hostname: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 3340)),
            tls: None,
            http_listen: None,
            hostname: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("building the TLS configuration")]
    Tls(#[from] rustls::Error),
    #[error("starting the relay")]
    Spawn(#[from] relay::SpawnError),
    #[error("relay URL {0:?} is invalid")]
    Url(String),
}

/// A running relay.
pub struct Server {
    inner: relay::Server,
    url: RelayUrl,
}

fn tls_config(cert: &PathBuf, key: &PathBuf) -> Result<rustls::ServerConfig, Error> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|source| Error::Read {
            path: p.clone(),
            source,
        })
    };
    let certs: Vec<_> = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(Error::Pem {
            path: cert.clone(),
            what: "certificate",
        });
    }
    let key_der = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| Error::Pem {
            path: key.clone(),
            what: "private key",
        })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_single_cert(certs, key_der)?;
    // The relay protocol is an HTTP/1.1 upgrade.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl Server {
    /// Starts the relay; returns once it listens.
    ///
    /// # Errors
    /// When the certificate cannot be loaded or the sockets cannot be bound.
    pub async fn bind(config: Config) -> Result<Self, Error> {
        let mut server_config = ServerConfig::default();
        match &config.tls {
            None => {
                server_config.relay = Some(relay::RelayConfig::new(config.listen));
            }
            Some((cert, key)) => {
                let tls = tls_config(cert, key)?;
                let http = config
                    .http_listen
                    .unwrap_or_else(|| SocketAddr::new(config.listen.ip(), 0));
                let mut rc = relay::RelayConfig::new(http);
                rc.tls = Some(TlsConfig::new(
                    config.listen,
                    CertConfig::Manual {
                        server_config: tls.clone(),
                    },
                ));
                server_config.relay = Some(rc);
                let mut quic = QuicConfig::new(config.listen);
                quic.server_config = Some(tls);
                server_config.quic = Some(quic);
            }
        }
        let inner = relay::Server::spawn(server_config).await?;
        let (scheme, addr) = match (inner.https_addr(), inner.http_addr()) {
            (Some(a), _) => ("https", a),
            (None, Some(a)) => ("http", a),
            (None, None) => return Err(Error::Url("the relay bound no listener".into())),
        };
        let host = config.hostname.clone().unwrap_or_else(|| match addr.ip() {
            ip if ip.is_unspecified() => "127.0.0.1".into(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        });
        let text = format!("{scheme}://{host}:{}/", addr.port());
        let url = text.parse().map_err(|_| Error::Url(text))?;
        tracing::info!(%url, "relay listening");
        Ok(Self { inner, url })
    }

    /// The URL endpoints use to reach this relay.
    pub fn url(&self) -> &RelayUrl {
        &self.url
    }

    /// The QUIC address-discovery port, when TLS is on.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.inner.quic_addr()
    }

    /// Stops the relay.
    pub async fn shutdown(self) {
        let _ = self.inner.shutdown().await;
    }
}
