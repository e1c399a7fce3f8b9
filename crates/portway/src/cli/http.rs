//! `portway http PORT` and `portway tcp PORT`: the one-liners.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args as ClapArgs, Parser};
use serde_json::json;

use super::{default_data_dir, shutdown_signal, write_ready_file};

/// What both one-liners take besides the port.
#[derive(ClapArgs)]
pub struct DeviceArgs {
    /// Project (namespace).
    #[arg(long, default_value = "default")]
    project: String,
    /// Kubeconfig with a join token (default: join with a one-use token minted by the
    /// admin kubeconfig of `portway up`).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Connector name (default: this machine's hostname).
    #[arg(long)]
    name: Option<String>,
    /// Data directory of `portway up`.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Heartbeat lease in seconds: if this process dies, the tunnel goes offline after this.
    #[arg(long, default_value_t = 30)]
    lease_seconds: u64,
    /// Reach the edge only through the relay: no direct UDP path.
    #[arg(long)]
    relay_only: bool,
    /// Write the public URL here as JSON once it works.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

impl DeviceArgs {
    fn config(self, port: u16, hostname: Option<String>) -> portway_local::http::Config {
        portway_local::http::Config {
            data_dir: self.data.unwrap_or_else(default_data_dir),
            port,
            hostname,
            project: self.project,
            kubeconfig: self.kubeconfig,
            name: self.name,
            lease: std::time::Duration::from_secs(self.lease_seconds.max(2)),
            relay_only: self.relay_only,
            access: None,
            inspect: false,
        }
    }
}

#[derive(Parser)]
pub struct Args {
    /// The local port your app listens on (127.0.0.1:PORT).
    port: u16,
    /// Public hostname (default: a random name under .localhost).
    #[arg(long)]
    hostname: Option<String>,
    #[command(flatten)]
    access: AccessArgs,
    #[command(flatten)]
    ui: UiArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

/// The local web UI and request inspector.
#[derive(ClapArgs, Default)]
pub struct UiArgs {
    /// Serve the local UI here (loopback only; default 127.0.0.1:4040, or the next free
    /// port).
    #[arg(long, value_name = "ADDR", conflicts_with = "no_ui")]
    ui: Option<std::net::SocketAddr>,
    /// No local UI, and no request inspection.
    #[arg(long)]
    no_ui: bool,
}

impl UiArgs {
    pub fn enabled(&self) -> bool {
        !self.no_ui
    }

    /// Refuses a UI address off loopback before anything starts.
    pub fn check(&self) -> Result<()> {
        match self.ui {
            Some(addr) if !addr.ip().is_loopback() => {
                Err(portway_ui::Error::NotLoopback(addr).into())
            }
            _ => Ok(()),
        }
    }

    /// Starts the UI for `agent` unless --no-ui.
    pub async fn start(
        &self,
        agent: portway_agent::Handle,
        options: portway_ui::Options,
    ) -> Result<Option<portway_ui::Ui>> {
        if self.no_ui {
            return Ok(None);
        }
        let options = portway_ui::Options {
            listen: self.ui,
            ..options
        };
        Ok(Some(portway_ui::Ui::start(agent, options).await?))
    }
}

/// The UI's part of a ready file.
pub fn ui_ready(ui: Option<&portway_ui::Ui>) -> serde_json::Value {
    match ui {
        Some(ui) => json!({"url": ui.url(), "token": ui.token(), "open": ui.login_url()}),
        None => serde_json::Value::Null,
    }
}

/// Who may call the URL: written as an AccessPolicy guarding the tunnel's proxy, enforced
/// by the edge (see README "Access policy").
#[derive(ClapArgs, Default)]
pub struct AccessArgs {
    /// Ask for this user name and password (repeatable). The password is hashed here
    /// (bcrypt) and only the hash leaves this machine.
    #[arg(long = "basic-auth", value_name = "USER:PASSWORD")]
    basic_auth: Vec<String>,
    /// Answer only these client addresses (repeatable; CIDR or address).
    #[arg(long = "allow-ip", value_name = "CIDR")]
    allow_ip: Vec<String>,
    /// Refuse these client addresses (repeatable; CIDR or address).
    #[arg(long = "deny-ip", value_name = "CIDR")]
    deny_ip: Vec<String>,
    /// Requests per client address: N/s, N/m or N/h (e.g. 100/m); 429 past it.
    #[arg(long = "rate-limit", value_name = "N/UNIT")]
    rate_limit: Option<String>,
    /// Ask for a bearer JWT from this issuer, its keys found from its OpenID
    /// configuration (e.g. https://accounts.google.com).
    #[arg(long = "jwt-issuer", value_name = "URL")]
    jwt_issuer: Option<String>,
    /// The audience a JWT must name (repeatable; with --jwt-issuer).
    #[arg(long = "jwt-audience", value_name = "AUD", requires = "jwt_issuer")]
    jwt_audience: Vec<String>,
}

impl AccessArgs {
    fn access(&self) -> Result<Option<portway_agent::tunnel::Access>> {
        let flags = portway_agent::tunnel::AccessFlags {
            basic_auth: self.basic_auth.clone(),
            allow_ip: self.allow_ip.clone(),
            deny_ip: self.deny_ip.clone(),
            rate_limit: self.rate_limit.clone(),
            jwt_issuer: self.jwt_issuer.clone(),
            jwt_audience: self.jwt_audience.clone(),
        };
        flags.access().map_err(anyhow::Error::msg)
    }
}

#[derive(Parser)]
pub struct TcpArgs {
    /// The local port your service listens on (127.0.0.1:PORT).
    port: u16,
    /// The public port wanted (default: one from the edge's range, kept while this runs).
    #[arg(long)]
    remote_port: Option<u16>,
    /// Start each connection to the local port with a PROXY protocol v2 header naming
    /// the public client (like `ngrok --proxy-proto 2`); the app must expect it.
    #[arg(long)]
    proxy_protocol: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Parser)]
pub struct UdpArgs {
    /// The local UDP port your service listens on (127.0.0.1:PORT).
    port: u16,
    /// The public port wanted (default: one from the edge's range, kept while this runs).
    #[arg(long)]
    remote_port: Option<u16>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Parser)]
pub struct TlsArgs {
    /// The local port your TLS server listens on (127.0.0.1:PORT); it terminates TLS.
    port: u16,
    /// A name to serve besides the canonical one (repeatable); outside the zone, the
    /// project must have proven it.
    #[arg(long = "hostname")]
    hostnames: Vec<String>,
    /// Start each connection to the local port with a PROXY protocol v2 header naming
    /// the public client; the TLS server must expect it.
    #[arg(long)]
    proxy_protocol: bool,
    /// Get a certificate for the tunnel's names: a key is made in DIR (and never leaves
    /// it), the control plane's issuer signs a request for it (ACME DNS-01 in the zone),
    /// and the chain is written to DIR/cert.pem, renewed in place. Waits until it is.
    #[arg(long, value_name = "DIR")]
    cert_dir: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Failures that say what to do in one complete sentence: no chain.
fn one_line(e: portway_local::http::Error) -> anyhow::Error {
    use portway_local::http::Error;
    match e {
        Error::HostnameTaken { .. }
        | Error::HostnameNotVerified { .. }
        | Error::Unreachable { .. }
        | Error::PortRefused(_)
        | Error::NameRefused(_)
        | Error::Certificate(_) => anyhow::anyhow!(e.to_string()),
        e => anyhow::Error::new(e).context("publishing the port"),
    }
}

pub async fn run(args: Args) -> Result<()> {
    let ready_file = args.device.ready_file.clone();
    args.ui.check()?;
    let access = args.access.access()?;
    let mut config = args.device.config(args.port, args.hostname);
    config.access = access;
    config.inspect = args.ui.enabled();
    let started = tokio::time::Instant::now();
    let h = tokio::select! {
        h = portway_local::http::Http::start(config) => h.map_err(one_line)?,
        () = shutdown_signal() => return Ok(()),
    };
    let handle = h.agent.handle();
    let urls = handle
        .tunnels()
        .into_iter()
        .map(|t| (t.name, vec![h.url.clone()]))
        .collect();
    let ui = args
        .ui
        .start(
            handle,
            portway_ui::Options {
                mode: "http",
                urls,
                ..Default::default()
            },
        )
        .await?;
    if let Some(path) = &ready_file {
        write_ready_file(
            path,
            &json!({"url": h.url, "hostname": h.hostname, "proxy": h.proxy, "node_id": h.agent.node_id().to_string(), "ui": ui_ready(ui.as_ref())}),
        )?;
    }
    println!(
        "{} → http://127.0.0.1:{}  (ready in {} ms; Ctrl-C to stop)",
        h.url,
        args.port,
        started.elapsed().as_millis()
    );
    if let Some(ui) = &ui {
        println!("inspect and replay requests: {}", ui.login_url());
    }
    status_until_stopped(&h.agent).await;
    h.stop().await;
    eprintln!("tunnel removed");
    Ok(())
}

pub async fn run_tcp(args: TcpArgs) -> Result<()> {
    let ready_file = args.device.ready_file.clone();
    let config = args.device.config(args.port, None);
    let start = portway_local::tcp::Tcp::start(config, args.remote_port, args.proxy_protocol);
    run_port(ready_file, start, |t| {
        vec![format!("{} → 127.0.0.1:{}", t.url, args.port)]
    })
    .await
}

pub async fn run_udp(args: UdpArgs) -> Result<()> {
    let ready_file = args.device.ready_file.clone();
    let config = args.device.config(args.port, None);
    let start = portway_local::tcp::Tcp::start_udp(config, args.remote_port);
    run_port(ready_file, start, |t| {
        vec![format!("{} → 127.0.0.1:{} (udp)", t.url, args.port)]
    })
    .await
}

pub async fn run_tls(args: TlsArgs) -> Result<()> {
    let ready_file = args.device.ready_file.clone();
    let config = args.device.config(args.port, None);
    let start = portway_local::tcp::Tcp::start_tls(
        config,
        args.hostnames,
        args.proxy_protocol,
        args.cert_dir,
    );
    run_port(ready_file, start, |t| {
        let names = t.hostnames.iter();
        let mut lines: Vec<String> = names
            .map(|name| format!("tls://{name}:{} → 127.0.0.1:{}", t.port, args.port))
            .collect();
        if let Some(cert) = &t.certificate {
            lines.push(format!(
                "certificate for these names: {} (key beside it; renewed in place)",
                cert.display()
            ));
        }
        lines
    })
    .await
}

/// A layer-4 one-liner: waits until it is live (or Ctrl-C), writes the ready file, prints
/// `lines` (the first with the time it took), then a status line until Ctrl-C, when it
/// removes the tunnel.
async fn run_port(
    ready_file: Option<PathBuf>,
    start: impl std::future::Future<
        Output = Result<portway_local::tcp::Tcp, portway_local::http::Error>,
    >,
    lines: impl Fn(&portway_local::tcp::Tcp) -> Vec<String>,
) -> Result<()> {
    let started = tokio::time::Instant::now();
    let t = tokio::select! {
        t = start => t.map_err(one_line)?,
        () = shutdown_signal() => return Ok(()),
    };
    if let Some(path) = &ready_file {
        write_ready_file(
            path,
            &json!({"url": t.url, "port": t.port, "hostnames": t.hostnames, "certificate": t.certificate, "proxy": t.proxy, "node_id": t.agent.node_id().to_string()}),
        )?;
    }
    for (i, line) in lines(&t).iter().enumerate() {
        if i == 0 {
            let ms = started.elapsed().as_millis();
            println!("{line}  (ready in {ms} ms; Ctrl-C to stop)");
        } else {
            println!("{line}");
        }
    }
    status_until_stopped(&t.agent).await;
    t.stop().await;
    eprintln!("tunnel removed");
    Ok(())
}

/// On a terminal, a live status line until Ctrl-C.
async fn status_until_stopped(agent: &portway_agent::Agent) {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stdout().is_terminal();
    crate::logs::STATUS_LINE.store(tty, std::sync::atomic::Ordering::Relaxed);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let state = agent.state();
    loop {
        tokio::select! {
            () = shutdown_signal() => break,
            _ = tick.tick() => {
                if tty {
                    let s = agent.stats();
                    print!("\r\x1b[2K{}  requests {}  active {}  refused {}", state.borrow().as_str(), s.requests, s.active, s.denied);
                    let _ = std::io::stdout().flush();
                }
            }
        }
    }
    crate::logs::STATUS_LINE.store(false, std::sync::atomic::Ordering::Relaxed);
    if tty {
        println!();
    }
}
