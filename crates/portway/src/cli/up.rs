//! `portway up`: every part on this machine.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

use super::{default_data_dir, shutdown_signal, write_ready_file};

#[derive(Parser)]
pub struct Args {
    /// Data directory (database, kubeconfigs, keys); default $XDG_DATA_HOME/portway.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Public HTTP address of the edge (HTTP/1.1 and h2c).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Public HTTPS address (h2 and HTTP/1.1). Certificates come from the local CA in
    /// DATA/pki (a wildcard for the zone), and from --cert-dir if given.
    #[arg(long)]
    https: Option<SocketAddr>,
    /// Directory of <hostname>.crt/.key pairs (`_.example.com` for *.example.com),
    /// served before the issued ones.
    #[arg(long, requires = "https")]
    cert_dir: Option<PathBuf>,
    /// The Kubernetes-compatible API server (HTTPS; kubeconfig in DATA/kubeconfig).
    #[arg(long, default_value = "127.0.0.1:6443")]
    apiserver: SocketAddr,
    /// The discovery DNS server (UDP and TCP).
    #[arg(long, default_value = "127.0.0.1:5353")]
    dns: SocketAddr,
    /// DNS zone for discovery records and canonical hostnames.
    #[arg(long, default_value = "portway.localhost")]
    zone: String,
    /// The iroh relay (HTTP).
    #[arg(long, default_value = "127.0.0.1:3340")]
    relay: SocketAddr,
    /// The sidecar's listener (for an Envoy; the edge calls the sidecar in process).
    #[arg(long, default_value = "127.0.0.1:4001")]
    sidecar: SocketAddr,
    /// Serve /metrics here.
    #[arg(long, default_value = "127.0.0.1:9090")]
    metrics: SocketAddr,
    /// Seconds a `portway http` tunnel whose process died keeps its connector, proxy and
    /// hostname before they are deleted (a restart within it keeps them).
    #[arg(long, default_value_t = 900)]
    ephemeral_ttl: u64,
    /// Log every request at the edge (host, method, path, status, bytes, duration, device
    /// and the path to it) as a `portway::access` event.
    #[arg(long)]
    access_log: bool,
    /// The public ports TCPProxies may have, FIRST-LAST (each a listener of the edge).
    #[arg(long, value_name = "FIRST-LAST", default_value = "20000-20999", value_parser = super::parse_port_range)]
    tcp_ports: std::ops::RangeInclusive<u16>,
    /// Seconds an Event (`kubectl get events`) is kept after it was last seen.
    #[arg(long, default_value_t = 3600)]
    event_ttl: u64,
    /// The resolver that checks hostnames outside the zone before they are routed
    /// (default: the first nameserver of /etc/resolv.conf).
    #[arg(long, value_name = "ADDR")]
    hostname_resolver: Option<SocketAddr>,
    #[command(flatten)]
    renewal: super::acme::RenewalFlags,
    /// With --https: certificates from an ACME directory instead of the local CA.
    #[command(flatten)]
    acme: super::acme::AcmeFlags,
    #[command(flatten)]
    origins: super::origins::OriginFlags,
    /// Write every bound address here as JSON once ready.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

pub async fn run(args: Args) -> Result<()> {
    let data = args.data.unwrap_or_else(default_data_dir);
    let mut config = portway_local::up::Config::new(data.clone());
    config.http = args.http;
    config.https = args.https;
    config.cert_dir = args.cert_dir;
    config.apiserver = args.apiserver;
    config.dns = args.dns;
    config.zone = args.zone;
    config.relay = args.relay;
    config.sidecar = args.sidecar;
    config.metrics = args.metrics;
    config.ephemeral_ttl = std::time::Duration::from_secs(args.ephemeral_ttl);
    config.event_ttl = std::time::Duration::from_secs(args.event_ttl);
    config.access_log = args.access_log;
    config.tcp_ports = args.tcp_ports;
    config.hostname_resolver = args.hostname_resolver;
    config.origins = args.origins.config()?;
    (config.certificate_validity, config.renew_before) = args.renewal.durations();
    anyhow::ensure!(
        !args.acme.enabled() || args.https.is_some(),
        "--acme-directory needs --https: certificates are served there"
    );
    // Our own DNS server answers the challenges; its address is known once it is bound,
    // and names are looked up where hostnames are checked.
    config.acme = args.acme.config(None, None)?;
    let acme_directory = config.acme.as_ref().map(|a| a.directory.clone());
    let up = portway_local::up::Up::start(config)
        .await
        .context("starting portway")?;
    let i = &up.info;
    if let Some(path) = &args.ready_file {
        write_ready_file(path, &serde_json::to_value(i)?)?;
    }
    // Certificates for the zone come from the local CA the API server made: say how to
    // trust it, or browsers will refuse them.
    let ca = data.join("pki/ca.crt");
    let issuer = match &acme_directory {
        Some(url) => format!("from ACME at {url}"),
        None => format!(
            "from the local CA {}: curl --cacert it, or add it to your trust store",
            ca.display()
        ),
    };
    let https = i
        .https
        .map(|a| format!("\n  https edge  https://{a}  (*.{} {issuer})", i.zone))
        .unwrap_or_default();
    eprintln!(
        "Portway is up (data in {}).\n  public edge http://{}{https}\n  API server  {}  (kubectl --kubeconfig {} get httpproxies -A)\n  relay       {}\n  DNS         {} (zone {})\n  metrics     http://{}/metrics\n\nNext: start your app, then in another terminal:\n  portway http 3000{}",
        data.display(),
        i.http,
        i.apiserver,
        i.kubeconfig.display(),
        i.relay,
        i.dns,
        i.zone,
        i.metrics,
        if data == default_data_dir() {
            String::new()
        } else {
            format!(" --data {}", data.display())
        },
    );
    up.run(async {
        shutdown_signal().await;
        eprintln!("stopping…");
    })
    .await
    .context("portway up stopped")
}
