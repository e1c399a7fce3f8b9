//! Origins: backends without a connector, which the sidecar reaches itself over HTTP or
//! HTTPS (Datum's plain reverse proxy). The route names the origin in the same `datum-*`
//! headers as a device (`datum-node-id: direct`), so the built-in edge and Envoy reach it
//! the same way, through the sidecar.
//!
//! Every address the origin's name resolves to is checked before connecting
//! ([`portway_api::origins::check`]): a name that points at the edge's own machine or its
//! cloud's metadata service is refused even when the operator let the name through.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use ipnet::IpNet;
use portway_api::headers;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::sidecar::ForwardError;

/// How the sidecar reaches origins.
#[derive(Clone, Debug)]
pub struct Config {
    /// Networks an origin may be in although the forbidden list holds them.
    pub allowed: Vec<IpNet>,
    /// Roots trusted for origins' certificates besides the system's (PEM).
    pub roots: Option<Vec<u8>>,
    pub connect_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            allowed: Vec::new(),
            roots: None,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading origin roots: {0}")]
    Roots(String),
    #[error("building the TLS client: {0}")]
    Tls(#[from] rustls::Error),
}

/// One origin, as its route names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub host: String,
    pub port: u16,
    pub https: bool,
    /// The name its certificate is checked against.
    pub tls_name: Option<String>,
    /// The `Host` it is sent; `None` keeps the public one.
    pub authority: Option<String>,
}

impl Origin {
    /// Reads the origin from a route's headers (`datum-node-id: direct`); `None` when they
    /// name a device.
    ///
    /// # Errors
    /// When they are incomplete (a gateway bug).
    pub fn from_headers(h: &HeaderMap) -> Result<Option<Self>, ForwardError> {
        let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok());
        if get(headers::NODE_ID) != Some(headers::DIRECT) {
            return Ok(None);
        }
        let bad = |why: &str| ForwardError::BadRoute(format!("origin: {why}"));
        let opt = |n: &str| {
            get(n)
                .filter(|v| !v.is_empty() && *v != headers::NONE)
                .map(str::to_owned)
        };
        let https = match get(headers::TARGET_PROTO) {
            Some("https") => true,
            Some("http") | None => false,
            Some(other) => return Err(bad(&format!("protocol {other:?}"))),
        };
        Ok(Some(Self {
            host: get(headers::TARGET_HOST)
                .ok_or_else(|| bad("no host"))?
                .to_owned(),
            port: get(headers::TARGET_PORT)
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| bad("no port"))?,
            https,
            tls_name: opt(headers::TARGET_TLS_NAME),
            authority: opt(headers::TARGET_AUTHORITY),
        }))
    }
}

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Connects to origins.
pub struct Connector {
    config: Config,
    tls: tokio_rustls::TlsConnector,
}

impl Connector {
    /// # Errors
    /// When the extra roots do not parse.
    pub fn new(config: Config) -> Result<Self, Error> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(pem) = &config.roots {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| Error::Roots(e.to_string()))?;
                roots.add(cert).map_err(|e| Error::Roots(e.to_string()))?;
            }
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        })
    }

    /// TLS as client over `io`, the peer's certificate checked against `name`.
    ///
    /// # Errors
    /// The handshake's error, as a sentence.
    pub async fn tls<T: AsyncRead + AsyncWrite + Unpin>(
        &self,
        name: &str,
        io: T,
    ) -> Result<tokio_rustls::client::TlsStream<T>, String> {
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|e| format!("{name:?} is not a TLS name: {e}"))?;
        tokio::time::timeout(
            self.config.connect_timeout,
            self.tls.connect(server_name, io),
        )
        .await
        .map_err(|_| "no TLS handshake in time".to_owned())?
        .map_err(|e| format!("TLS as {name}: {e}"))
    }

    /// A connection to `origin`: its addresses resolved and checked, the first that
    /// answers, and TLS over it for `https`.
    ///
    /// # Errors
    /// `Origin` when it cannot be resolved, every address is refused or none answers, or
    /// TLS fails (nothing was sent).
    pub async fn connect(&self, origin: &Origin) -> Result<Box<dyn Io>, ForwardError> {
        let host = origin.host.trim_matches(['[', ']']);
        let dial = |why: String| ForwardError::Origin(format!("{host}: {why}"));
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, origin.port))
            .await
            .map_err(|e| dial(format!("cannot resolve: {e}")))?
            .collect();
        let mut refused = Vec::new();
        let mut last = None;
        let mut stream = None;
        for addr in addrs {
            if let Err(why) = portway_api::origins::check(addr.ip(), &self.config.allowed) {
                refused.push(why);
                continue;
            }
            match tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(addr)).await
            {
                Ok(Ok(s)) => {
                    stream = Some(s);
                    break;
                }
                Ok(Err(e)) => last = Some(format!("{addr}: {e}")),
                Err(_) => {
                    last = Some(format!(
                        "{addr}: no answer within {:?}",
                        self.config.connect_timeout
                    ));
                }
            }
        }
        let Some(stream) = stream else {
            return Err(dial(match (last, refused.first()) {
                (Some(e), _) => e,
                (None, Some(why)) => why.clone(),
                (None, None) => "no address".into(),
            }));
        };
        let _ = stream.set_nodelay(true);
        if !origin.https {
            return Ok(Box::new(stream));
        }
        let name = origin.tls_name.as_deref().unwrap_or(host);
        Ok(Box::new(self.tls(name, stream).await.map_err(dial)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn an_origin_is_read_from_its_route_headers() {
        let h = headers(&[
            ("datum-node-id", "direct"),
            ("datum-target-host", "api.example.com"),
            ("datum-target-port", "443"),
            ("datum-target-proto", "https"),
            ("datum-target-tls-name", "api.example.com"),
            ("datum-target-authority", "-"),
        ]);
        assert_eq!(
            Origin::from_headers(&h).unwrap(),
            Some(Origin {
                host: "api.example.com".into(),
                port: 443,
                https: true,
                tls_name: Some("api.example.com".into()),
                authority: None,
            })
        );
        let device = headers(&[("datum-node-id", "ab"), ("datum-target-host", "x")]);
        assert_eq!(Origin::from_headers(&device).unwrap(), None);
        let broken = headers(&[("datum-node-id", "direct"), ("datum-target-host", "x")]);
        assert!(Origin::from_headers(&broken).is_err());
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_the_edge_machine_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let origin = Origin {
            host: "localhost".into(),
            port,
            https: false,
            tls_name: None,
            authority: None,
        };
        let strict = Connector::new(Config::default()).unwrap();
        let err = strict.connect(&origin).await.err().unwrap();
        assert!(
            matches!(&err, ForwardError::Origin(why) if why.contains("127.0.0.0/8") || why.contains("::1")),
            "{err:?}"
        );
        let open = Connector::new(Config {
            allowed: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            ..Default::default()
        })
        .unwrap();
        assert!(open.connect(&origin).await.is_ok());
    }
}
