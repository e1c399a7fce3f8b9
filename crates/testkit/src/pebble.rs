//! Pebble, Let's Encrypt's ACME test server (Debian's `pebble`), on loopback ports, with
//! its own TLS certificate from a CA made here, asking `dns` for DNS-01 answers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{Process, eventually};

pub struct Pebble {
    pub process: Process,
    /// `https://127.0.0.1:PORT/dir`.
    pub directory: String,
    /// The CA of Pebble's own listener (for `--acme-directory-roots`).
    pub directory_roots: PathBuf,
    /// The root Pebble issues from (PEM; for curl's `--cacert`).
    pub issuing_root: PathBuf,
    /// Its management API (`https://127.0.0.1:PORT`, trusted with `directory_roots`).
    pub management: String,
}

/// A port nobody listens on right now (TCP and UDP), for servers that need one up front.
///
/// # Errors
/// When no socket can be bound.
pub fn free_port() -> Result<u16> {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
}

impl Pebble {
    /// Whether Pebble holds the certificate `serial` (hex) as revoked.
    ///
    /// # Errors
    /// When its management API does not answer about the serial.
    pub async fn revoked(&self, serial: &str) -> Result<bool> {
        let out = tokio::process::Command::new("curl")
            .args(["-sSf", "--cacert"])
            .arg(&self.directory_roots)
            .arg(format!(
                "{}/cert-status-by-serial/{serial}",
                self.management
            ))
            .output()
            .await?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr));
        }
        let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(status["Status"] == "Revoked")
    }

    /// Starts Pebble in `dir` (config and certificates are written there) and waits until
    /// its directory answers and its issuing root is saved. It fetches HTTP-01 answers
    /// from `http_port` (none: a port nobody listens on).
    ///
    /// # Errors
    /// When Pebble is not installed or does not come up within 30 s.
    pub async fn start(dir: &Path, dns: SocketAddr, http_port: Option<u16>) -> Result<Self> {
        let bin = which("pebble")
            .context("pebble is not installed: `apt-get install -y pebble` (.ci/run does it)")?;
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "pebble listener CA");
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca, &ca_key);
        let key = rcgen::KeyPair::generate()?;
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])?
            .signed_by(&key, &issuer)?;
        let (cert_path, key_path) = (dir.join("pebble.crt"), dir.join("pebble.key"));
        let directory_roots = dir.join("pebble-ca.crt");
        std::fs::write(&cert_path, leaf.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        std::fs::write(&directory_roots, ca_cert.pem())?;
        let (listen, management) = (free_port()?, free_port()?);
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": cert_path, "privateKey": key_path,
            "httpPort": match http_port { Some(p) => p, None => free_port()? },
            "tlsPort": free_port()?,
            "ocspResponderURL": "", "externalAccountBindingRequired": false,
        }});
        let config_path = dir.join("pebble.json");
        std::fs::write(&config_path, config.to_string())?;
        let dns = dns.to_string();
        let process = Process::spawn_with_env(
            "pebble",
            &bin,
            ["-config", config_path.to_str().unwrap(), "-dnsserver", &dns],
            // No random sleep before validating, and no nonces refused at random.
            [("PEBBLE_VA_NOSLEEP", "1"), ("PEBBLE_WFE_NONCEREJECT", "0")],
        )?;
        let issuing_root = dir.join("pebble-root.crt");
        let roots = directory_roots.clone();
        let root_url = format!("https://127.0.0.1:{management}/roots/0");
        let root = eventually(
            "pebble serves its issuing root",
            Duration::from_secs(30),
            || {
                let (roots, url) = (roots.clone(), root_url.clone());
                async move {
                    let out = tokio::process::Command::new("curl")
                        .args(["-sSf", "--cacert"])
                        .arg(&roots)
                        .arg(&url)
                        .output()
                        .await?;
                    if !out.status.success() {
                        bail!("{}", String::from_utf8_lossy(&out.stderr));
                    }
                    Ok(out.stdout)
                }
            },
        )
        .await;
        std::fs::write(&issuing_root, root)?;
        Ok(Self {
            process,
            directory: format!("https://127.0.0.1:{listen}/dir"),
            directory_roots,
            issuing_root,
            management: format!("https://127.0.0.1:{management}"),
        })
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.exists())
}

/// `pebble-challtestsrv` as a mock DNS server whose records a test sets over HTTP.
pub struct MockDns {
    pub process: Process,
    /// Where it answers DNS (UDP and TCP).
    pub dns: SocketAddr,
    management: u16,
}

impl MockDns {
    /// # Errors
    /// When it is not installed (Debian's `pebble`) or does not come up within 30 s.
    pub async fn start() -> Result<Self> {
        let bin = which("pebble-challtestsrv").context(
            "pebble-challtestsrv is not installed: `apt-get install -y pebble` (.ci/run does it)",
        )?;
        let (dns, management) = (free_port()?, free_port()?);
        let (dns_addr, mgmt_addr) = (
            format!("127.0.0.1:{dns}"),
            format!("127.0.0.1:{management}"),
        );
        let process = Process::spawn(
            "pebble-challtestsrv",
            &bin,
            [
                "-dns01",
                &dns_addr,
                "-management",
                &mgmt_addr,
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                // Every name is at 127.0.0.1 (its default), and only there.
                "-defaultIPv6",
                "",
            ],
        )?;
        let me = Self {
            process,
            dns: dns_addr.parse()?,
            management,
        };
        eventually(
            "pebble-challtestsrv answers",
            Duration::from_secs(30),
            || me.post("clear-txt", serde_json::json!({"host": "ready.test."})),
        )
        .await;
        Ok(me)
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> Result<()> {
        let out = tokio::process::Command::new("curl")
            .args(["-sSf", "-X", "POST", "-d"])
            .arg(body.to_string())
            .arg(format!("http://127.0.0.1:{}/{path}", self.management))
            .output()
            .await?;
        if !out.status.success() {
            bail!("{path}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Sets the TXT value of `host`.
    ///
    /// # Errors
    /// When the server refuses.
    pub async fn set_txt(&self, host: &str, value: &str) -> Result<()> {
        self.post(
            "set-txt",
            serde_json::json!({"host": format!("{host}."), "value": value}),
        )
        .await
    }

    /// Makes `host` a CNAME to `target`.
    ///
    /// # Errors
    /// When the server refuses.
    pub async fn set_cname(&self, host: &str, target: &str) -> Result<()> {
        self.post(
            "set-cname",
            serde_json::json!({"host": format!("{host}."), "target": format!("{target}.")}),
        )
        .await
    }
}
