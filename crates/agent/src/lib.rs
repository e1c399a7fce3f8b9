//! The device agent: owns the iroh key, registers a Connector, heartbeats, advertises
//! tunnels and serves them safely.
//!
//! It accepts iroh connections on ALPN `iroh-http-proxy/1` (the wire protocol of
//! `iroh-proxy-utils`, Datum Connect and iroh-gateway): each QUIC stream carries one
//! HTTP/1.1 `CONNECT host:port` or absolute-form request. When the app cannot be reached
//! the 502 says why in `Proxy-Status` ("the app at 127.0.0.1:3000 on device laptop
//! refused the connection"), for the gateway to pass on. A stream is served
//! only when its dialer is a gateway listed in the ConnectorClass's `status.gateways` and
//! its target is one of this device's own tunnels (its flags and config file, never what
//! the API says); anything else gets 403. The gateway list is watched and cached on disk,
//! so tunnels keep serving when the API is away. [`join`] turns a join token into the
//! device's own credential.
//!
//! ```no_run
//! # async fn run(client: kube::Client) -> Result<(), portway_agent::Error> {
//! use portway_agent::{Agent, Config, Tunnel};
//! let mut config = Config::new("default", "state".into());
//! config.tunnels.push(Tunnel::parse_flag("web=127.0.0.1:3000,http,app.localhost").unwrap());
//! config.relays.push("http://127.0.0.1:3340/".parse().unwrap());
//! let agent = Agent::start(config, client).await?;
//! println!("{:?}", agent.registered().await);
//! agent.shutdown(false).await;
//! # Ok(()) }
//! ```

mod agent;
pub mod certificate;
pub mod config;
pub mod inspect;
pub mod join;
pub mod objects;
pub mod policy;
mod proxy_protocol;
mod server;
pub mod tap;
pub mod tunnel;
mod udp;

pub use agent::{Agent, Config, Error, Handle, Registration, Stats, default_name, device_labels};
pub use server::GatewayPath;
pub use tunnel::{Protocol, PublicPort, Target, Tunnel};
