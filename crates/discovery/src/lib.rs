//! Finding devices by NodeID: authoritative DNS for iroh records, a self-hosted relay, and
//! the iroh endpoint builder.
//!
//! - [`dns`]: serves `_iroh.<z32-id>.<zone>` and `_iroh.<z32-id>.<project>.<zone>` TXT
//!   records (UDP and TCP) derived from Connectors, and sets their `IrohDNSPublished`
//!   condition.
//! - [`relay`]: an iroh relay over HTTP (local) or HTTPS, serving only the endpoints the
//!   API knows (Connectors' keys, ConnectorClasses' gateways) unless opened to everyone.
//! - [`endpoint`]: builds an iroh `Endpoint` from our relays and DNS only (n0's public
//!   services only when asked), with a persistent key.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use portway_discovery::endpoint::{self, DnsLookup};
//! let (key, _) = endpoint::load_or_create_key("state/key".as_ref())?;
//! let ep = endpoint::bind(&endpoint::Config {
//!     secret_key: Some(key),
//!     relays: vec!["http://127.0.0.1:3340/".parse()?],
//!     dns: Some(DnsLookup { origin: "portway.localhost".into(), nameserver: "127.0.0.1:5353".parse()? }),
//!     ..Default::default()
//! })
//! .await?;
//! println!("NodeID {}", ep.id());
//! # Ok(()) }
//! ```

pub mod dns;
pub mod endpoint;
pub mod relay;
pub mod zone;
