//! The certificate flags `portway operator` and `portway up` share: ACME, and renewal.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct AcmeFlags {
    /// Issue certificates from this ACME directory, e.g.
    /// https://acme-v02.api.letsencrypt.org/directory: the zone's wildcard over DNS-01
    /// (answered by Portway's DNS server, which must be the zone's authoritative server),
    /// and proven custom domains over HTTP-01 (answered by every edge).
    #[arg(long, value_name = "URL")]
    acme_directory: Option<String>,
    /// Contact address for the ACME account.
    #[arg(long, value_name = "EMAIL", requires = "acme_directory")]
    acme_email: Option<String>,
    /// External account binding key id (CAs such as ZeroSSL or Google require one).
    #[arg(long, value_name = "KID", requires_all = ["acme_directory", "acme_eab_hmac"])]
    acme_eab_kid: Option<String>,
    /// External account binding HMAC key (base64url, as the CA gives it).
    #[arg(long, value_name = "KEY", requires = "acme_eab_kid")]
    acme_eab_hmac: Option<String>,
    /// Trust these roots (PEM) for the ACME directory instead of the system's (a test CA
    /// such as Pebble).
    #[arg(long, value_name = "FILE", requires = "acme_directory")]
    acme_directory_roots: Option<PathBuf>,
    /// The port the ACME server fetches HTTP-01 answers from; each answer is fetched
    /// there first, at the name's address, before the ACME server is told to look. Only
    /// a test CA (Pebble) is configured to use another port than 80.
    #[arg(
        long,
        value_name = "PORT",
        default_value_t = 80,
        requires = "acme_directory"
    )]
    acme_http_port: u16,
}

impl AcmeFlags {
    pub fn enabled(&self) -> bool {
        self.acme_directory.is_some()
    }

    /// The issuer's ACME settings; `dns`: the zone's DNS server, asked for each DNS-01
    /// answer before the ACME server is told to look; `resolver`: where a name's address
    /// is looked up before its HTTP-01 answer is fetched (none: the system's).
    pub fn config(
        &self,
        dns: Option<SocketAddr>,
        resolver: Option<SocketAddr>,
    ) -> Result<Option<portway_operator::acme::Config>> {
        let Some(directory) = &self.acme_directory else {
            return Ok(None);
        };
        // RFC 8555 §6.1: ACME is spoken over HTTPS only.
        anyhow::ensure!(
            directory.starts_with("https://"),
            "--acme-directory {directory}: an ACME directory is an https:// URL"
        );
        let directory_roots =
            match &self.acme_directory_roots {
                Some(path) => Some(std::fs::read(path).with_context(|| {
                    format!("reading --acme-directory-roots {}", path.display())
                })?),
                None => None,
            };
        Ok(Some(portway_operator::acme::Config {
            directory: directory.clone(),
            email: self.acme_email.clone(),
            eab: self.acme_eab_kid.clone().zip(self.acme_eab_hmac.clone()),
            directory_roots,
            dns,
            http_port: self.acme_http_port,
            resolver,
        }))
    }
}

#[derive(Args, Debug, Clone)]
pub struct RenewalFlags {
    /// Seconds a certificate from the local CA is valid (default 90 days).
    #[arg(long, value_name = "SECONDS")]
    certificate_validity: Option<u64>,
    /// Renew a certificate this many seconds before it expires (default 30 days).
    #[arg(long, value_name = "SECONDS")]
    renew_before: Option<u64>,
}

impl RenewalFlags {
    /// Validity and renewal window, where given.
    pub fn durations(&self) -> (Option<std::time::Duration>, Option<std::time::Duration>) {
        (
            self.certificate_validity
                .map(std::time::Duration::from_secs),
            self.renew_before.map(std::time::Duration::from_secs),
        )
    }
}
