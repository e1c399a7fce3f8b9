//! Who may use the tunnel and where to: the authorised gateways (from the ConnectorClass)
//! and the advertised targets (from this connector's ConnectorAdvertisements). Both are
//! watched; every stream is checked against the current snapshot.

use std::collections::HashSet;
use std::sync::Arc;

use iroh::EndpointId;
use iroh_proxy_utils::HttpProxyRequest;
use iroh_proxy_utils::upstream::{AuthError, AuthHandler};
use portway_api::ConnectorAdvertisementSpec;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The allow-lists, swapped whole on every change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Endpoint ids (hex) that may open streams.
    pub gateways: HashSet<String>,
    /// What may be reached.
    pub advertisements: Vec<ConnectorAdvertisementSpec>,
}

/// Why a stream was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    Dialer,
    Target,
}

impl Policy {
    /// Decides one request: the dialer must be an authorised gateway and the target must
    /// be advertised (host exact or `*.` wildcard, port listed, TCP).
    ///
    /// # Errors
    /// Which check failed.
    pub fn check(&self, dialer: &EndpointId, host: &str, port: u16) -> Result<(), Denied> {
        if !self.gateways.contains(&dialer.to_string()) {
            return Err(Denied::Dialer);
        }
        if !self
            .advertisements
            .iter()
            .any(|a| a.allows(host, port, portway_api::Protocol::Tcp))
        {
            return Err(Denied::Target);
        }
        Ok(())
    }
}

/// The `AuthHandler` the tunnel server runs every stream through.
#[derive(Clone)]
pub struct Gatekeeper {
    pub policy: watch::Receiver<Arc<Policy>>,
    pub denied: Arc<std::sync::atomic::AtomicU64>,
}

impl AuthHandler for Gatekeeper {
    async fn authorize<'a>(
        &'a self,
        remote_id: EndpointId,
        req: &'a HttpProxyRequest,
    ) -> Result<(), AuthError> {
        let authority = req.kind.authority().map_err(|_| AuthError::BadRequest)?;
        let policy = self.policy.borrow().clone();
        match policy.check(&remote_id, &authority.host, authority.port) {
            Ok(()) => Ok(()),
            Err(why) => {
                self.denied
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let reason = match why {
                    Denied::Dialer => "dialer is not an authorised gateway",
                    Denied::Target => "target is not advertised by this connector",
                };
                tracing::warn!(dialer = %remote_id, target = %format!("{}:{}", authority.host, authority.port), reason, "tunnel request refused (403)");
                Err(AuthError::Forbidden)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portway_api::{Layer4Advertisement, Layer4Service, LocalObjectReference, ServicePort};

    #[test]
    fn needs_both_an_authorised_dialer_and_an_advertised_target() {
        let gw = iroh::SecretKey::from_bytes(&[1; 32]).public();
        let stranger = iroh::SecretKey::from_bytes(&[2; 32]).public();
        let policy = Policy {
            gateways: [gw.to_string()].into(),
            advertisements: vec![ConnectorAdvertisementSpec {
                connector_ref: LocalObjectReference { name: "c".into() },
                layer4: vec![Layer4Advertisement {
                    name: "web".into(),
                    services: vec![Layer4Service {
                        address: "*.svc.local".into(),
                        ports: vec![ServicePort {
                            name: None,
                            port: 80,
                            protocol: portway_api::Protocol::Tcp,
                        }],
                    }],
                }],
            }],
        };
        assert_eq!(policy.check(&gw, "a.svc.local", 80), Ok(()));
        assert_eq!(policy.check(&gw, "a.svc.local", 81), Err(Denied::Target));
        assert_eq!(policy.check(&gw, "svc.local", 80), Err(Denied::Target));
        assert_eq!(
            policy.check(&stranger, "a.svc.local", 80),
            Err(Denied::Dialer)
        );
        assert_eq!(
            Policy::default().check(&gw, "a.svc.local", 80),
            Err(Denied::Dialer)
        );
    }
}
