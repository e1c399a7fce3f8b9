//! Who may use the tunnel and where to: the authorised gateways (from the ConnectorClass,
//! watched) and the targets this device offers — its own tunnels, from its flags and
//! config file, never from the API: an advertisement someone else writes for this
//! connector opens nothing here. Every stream is checked against the current snapshot.

use std::collections::HashSet;
use std::sync::Arc;

use iroh::EndpointId;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The allow-lists, swapped whole on every change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Endpoint ids (hex) that may open streams.
    pub gateways: HashSet<String>,
    /// What may be reached: this device's tunnels' targets. Not cached: the
    /// configuration is at hand.
    #[serde(skip)]
    pub targets: Vec<Offer>,
}

/// One target the device offers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Offer {
    /// Lowercase; a `*.` wildcard stands for names strictly below it.
    pub host: String,
    pub port: u16,
    /// A tunnel to it starts with a PROXY protocol v2 header naming the public client.
    pub proxy_protocol: bool,
    /// A UDP service: reached only by UDP tunnels (and a TCP one only by TCP tunnels).
    pub udp: bool,
    /// The tunnel offering it, for its counters and pause switch.
    pub tunnel: String,
    /// An http tunnel: its streams carry HTTP/1.1, which the inspector may follow.
    pub http: bool,
}

impl Offer {
    pub fn new(host: &str, port: u16) -> Self {
        Self {
            host: host.to_ascii_lowercase(),
            port,
            proxy_protocol: false,
            udp: false,
            tunnel: String::new(),
            http: false,
        }
    }
}

/// Why a stream was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    Dialer,
    Target,
}

impl Policy {
    /// Decides one request: the dialer must be an authorised gateway and the target one
    /// of this device's tunnels (host exact, case-insensitive, or `*.` wildcard; port).
    /// Returns the tunnel's offer.
    ///
    /// # Errors
    /// Which check failed.
    pub fn check(
        &self,
        dialer: &EndpointId,
        host: &str,
        port: u16,
        udp: bool,
    ) -> Result<&Offer, Denied> {
        if !self.gateways.contains(&dialer.to_string()) {
            return Err(Denied::Dialer);
        }
        let host = host.to_ascii_lowercase();
        let offered = |pattern: &str| match pattern.strip_prefix('*') {
            Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
            None => pattern.eq_ignore_ascii_case(&host),
        };
        // Of several tunnels to one target, one that asks for the PROXY protocol wins: an
        // app that expects the header must never get a client's bytes first (a client
        // could write a header of its own).
        self.targets
            .iter()
            .filter(|o| o.port == port && o.udp == udp && offered(&o.host))
            .max_by_key(|o| o.proxy_protocol)
            .ok_or(Denied::Target)
    }
}

/// The check the tunnel server runs every stream through: it counts and logs refusals,
/// and hands each to `refusals` (when set) to be reported as an event.
#[derive(Clone)]
pub struct Gatekeeper {
    pub policy: watch::Receiver<Arc<Policy>>,
    pub denied: Arc<std::sync::atomic::AtomicU64>,
    pub refusals: Option<tokio::sync::mpsc::Sender<String>>,
}

impl Gatekeeper {
    /// The offer `remote` may reach at `host:port` (over UDP with `udp`) under the
    /// current policy, if any.
    pub fn allows(&self, remote: &EndpointId, host: &str, port: u16, udp: bool) -> Option<Offer> {
        let policy = self.policy.borrow().clone();
        let why = match policy.check(remote, host, port, udp) {
            Ok(offer) => return Some(offer.clone()),
            Err(why) => why,
        };
        self.denied
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let reason = match why {
            Denied::Dialer => "dialer is not an authorised gateway",
            Denied::Target => "target is not one of this device's tunnels",
        };
        tracing::warn!(dialer = %remote, target = %format!("{host}:{port}"), reason, "tunnel request refused (403)");
        if let Some(tx) = &self.refusals {
            // Full means a report is already due: this one is counted in it.
            let _ = tx.try_send(format!("{remote} asked for {host}:{port}: {reason}"));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_both_an_authorised_dialer_and_an_offered_target() {
        let gw = iroh::SecretKey::from_bytes(&[1; 32]).public();
        let stranger = iroh::SecretKey::from_bytes(&[2; 32]).public();
        let policy = Policy {
            gateways: [gw.to_string()].into(),
            targets: vec![Offer::new("*.svc.local", 80), Offer::new("127.0.0.1", 3000)],
        };
        let ok = |h: &str, p: u16| policy.check(&gw, h, p, false).map(|o| o.port);
        assert_eq!(ok("a.svc.local", 80), Ok(80));
        assert_eq!(ok("A.Svc.Local", 80), Ok(80));
        assert_eq!(ok("127.0.0.1", 3000), Ok(3000));
        // Two tunnels to one target: the one with the PROXY protocol decides.
        let both = Policy {
            gateways: [gw.to_string()].into(),
            targets: vec![
                Offer::new("127.0.0.1", 22),
                Offer {
                    proxy_protocol: true,
                    ..Offer::new("*.0.0.1", 22)
                },
            ],
        };
        assert!(
            both.check(&gw, "127.0.0.1", 22, false)
                .unwrap()
                .proxy_protocol
        );
        // A TCP service is not reached over UDP.
        assert_eq!(
            policy.check(&gw, "127.0.0.1", 3000, true),
            Err(Denied::Target)
        );
        assert_eq!(
            policy.check(&gw, "127.0.0.1", 22, false),
            Err(Denied::Target)
        );
        assert_eq!(
            policy.check(&gw, "a.svc.local", 81, false),
            Err(Denied::Target)
        );
        assert_eq!(
            policy.check(&gw, "svc.local", 80, false),
            Err(Denied::Target)
        );
        assert_eq!(
            policy.check(&stranger, "a.svc.local", 80, false),
            Err(Denied::Dialer)
        );
        assert_eq!(
            Policy::default().check(&gw, "a.svc.local", 80, false),
            Err(Denied::Dialer)
        );
    }
}
