//! What the agent writes for its tunnels, as a pure function: one ConnectorAdvertisement
//! per tunnel; for HTTP tunnels with hostnames, one HTTPProxy; for TCP tunnels published
//! at a public port, one TCPProxy; each owned by the Connector (so deleting the Connector
//! removes them).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use portway_api::{
    Connector, ConnectorAdvertisement, ConnectorAdvertisementSpec, ConnectorReference, HttpProxy,
    HttpProxyBackend, HttpProxyRule, HttpProxySpec, Layer4Advertisement, Layer4Service,
    LocalObjectReference, ServicePort, TcpProxy, TcpProxyBackend, TcpProxySpec, TlsPassthrough,
    default_matches, labels, managers,
};

use crate::tunnel::{Protocol, PublicPort, Tunnel};

/// Labels every object the agent writes carries, so it can find (and prune) its own.
pub const CONNECTOR_LABEL: &str = "portway.dev/connector";
pub const TUNNEL_LABEL: &str = "portway.dev/tunnel";

/// `<connector>-<tunnel>`, shortened to fit a name if needed.
pub fn object_name(connector: &str, tunnel: &str) -> String {
    let name = format!("{connector}-{tunnel}");
    // An HTTPProxy's name is a DNS label: a connector named after an FQDN hostname, or a
    // long one, gets a readable prefix and a hash of both names instead.
    if portway_api::validation::dns1123_label(&name).is_ok() {
        name
    } else {
        portway_api::names::label_name(&name, &[connector, tunnel])
    }
}

/// The label selector matching every object the agent wrote for this connector.
pub fn selector(connector: &str) -> String {
    format!(
        "{}={},{CONNECTOR_LABEL}={connector}",
        labels::MANAGED_BY,
        managers::AGENT
    )
}

fn meta(connector: &Connector, tunnel: &Tunnel) -> ObjectMeta {
    let name = connector.metadata.name.clone().unwrap_or_default();
    ObjectMeta {
        name: Some(object_name(&name, &tunnel.name)),
        namespace: connector.metadata.namespace.clone(),
        labels: Some(BTreeMap::from([
            (labels::MANAGED_BY.to_owned(), managers::AGENT.to_owned()),
            (CONNECTOR_LABEL.to_owned(), name),
            (TUNNEL_LABEL.to_owned(), tunnel.name.clone()),
        ])),
        owner_references: connector.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

/// The objects a connector's tunnels call for.
#[derive(Debug, Default)]
pub struct Objects {
    /// One per tunnel: the device offers its target.
    pub advertisements: Vec<ConnectorAdvertisement>,
    /// One per http tunnel with hostnames.
    pub proxies: Vec<HttpProxy>,
    /// One per tcp tunnel published at a public port, and per tls tunnel.
    pub tcp_proxies: Vec<TcpProxy>,
}

/// The advertisements and proxies `tunnels` call for; `requests`: the certificate
/// request a tls tunnel has made for its names, by tunnel name.
pub fn desired(
    connector: &Connector,
    tunnels: &[Tunnel],
    requests: &BTreeMap<String, String>,
) -> Objects {
    let connector_name = connector.metadata.name.clone().unwrap_or_default();
    let mut advertisements = Vec::new();
    let mut proxies = Vec::new();
    let mut tcp_proxies = Vec::new();
    for t in tunnels {
        advertisements.push(ConnectorAdvertisement {
            metadata: meta(connector, t),
            spec: ConnectorAdvertisementSpec {
                connector_ref: LocalObjectReference {
                    name: connector_name.clone(),
                },
                layer4: vec![Layer4Advertisement {
                    name: t.name.clone(),
                    services: vec![Layer4Service {
                        address: t.target.host.clone(),
                        ports: vec![ServicePort {
                            name: Some(t.protocol.as_str().to_owned()),
                            port: i32::from(t.target.port),
                            protocol: if t.protocol == Protocol::Udp {
                                portway_api::Protocol::Udp
                            } else {
                                portway_api::Protocol::Tcp
                            },
                        }],
                    }],
                }],
            },
            status: None,
        });
        if t.protocol == Protocol::Http && !t.hostnames.is_empty() {
            proxies.push(HttpProxy {
                metadata: meta(connector, t),
                spec: HttpProxySpec {
                    hostnames: t.hostnames.clone(),
                    rules: vec![HttpProxyRule {
                        name: None,
                        matches: default_matches(),
                        filters: vec![],
                        backends: vec![HttpProxyBackend {
                            endpoint: format!("http://{}", t.target),
                            connector: Some(ConnectorReference {
                                name: Some(connector_name.clone()),
                                selector: None,
                            }),
                            tls: None,
                            filters: vec![],
                            instance: None,
                        }],
                    }],
                },
                status: None,
            });
        }
        let published = match (t.protocol, t.public) {
            (Protocol::Tcp | Protocol::Udp, Some(PublicPort::Any)) => Some((None, None)),
            (Protocol::Tcp | Protocol::Udp, Some(PublicPort::Port(p))) => {
                Some((Some(i32::from(p)), None))
            }
            (Protocol::Tls, _) => Some((
                None,
                Some(TlsPassthrough {
                    hostnames: t.hostnames.clone(),
                    certificate_request: requests.get(&t.name).cloned(),
                }),
            )),
            _ => None,
        };
        if let Some((port, tls)) = published {
            tcp_proxies.push(TcpProxy {
                metadata: meta(connector, t),
                spec: TcpProxySpec {
                    port,
                    tls,
                    backends: vec![TcpProxyBackend {
                        endpoint: format!(
                            "{}://{}",
                            if t.protocol == Protocol::Udp {
                                "udp"
                            } else {
                                "tcp"
                            },
                            t.target
                        ),
                        connector: ConnectorReference {
                            name: Some(connector_name.clone()),
                            selector: None,
                        },
                    }],
                },
                status: None,
            });
        }
    }
    Objects {
        advertisements,
        proxies,
        tcp_proxies,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::Target;
    use portway_api::{ConnectorSpec, Validate};

    fn connector() -> Connector {
        let mut c = Connector::new(
            "laptop",
            ConnectorSpec {
                connector_class_name: "portway".into(),
                capabilities: vec![],
            },
        );
        c.metadata.namespace = Some("p1".into());
        c.metadata.uid = Some("uid-1".into());
        c
    }

    fn tunnel(name: &str, protocol: Protocol, hostnames: &[&str]) -> Tunnel {
        Tunnel {
            name: name.into(),
            target: Target {
                host: "127.0.0.1".into(),
                port: 3000,
            },
            protocol,
            hostnames: hostnames.iter().map(|h| h.to_string()).collect(),
            public: None,
            proxy_protocol: false,
            cert_dir: None,
        }
    }

    #[test]
    fn one_advertisement_per_tunnel_and_proxies_for_http_hostnames() {
        let tunnels = [
            tunnel("web", Protocol::Http, &["web.example.com"]),
            tunnel("api", Protocol::Http, &[]),
            tunnel("db", Protocol::Tcp, &[]),
            Tunnel {
                public: Some(PublicPort::Port(20001)),
                ..tunnel("redis", Protocol::Tcp, &[])
            },
        ];
        let Objects {
            advertisements: ads,
            proxies,
            tcp_proxies,
        } = desired(&connector(), &tunnels, &BTreeMap::new());
        assert_eq!(tcp_proxies.len(), 1, "published tcp tunnels only");
        let t = &tcp_proxies[0];
        assert_eq!(t.metadata.name.as_deref(), Some("laptop-redis"));
        assert_eq!(t.spec.port, Some(20001));
        assert_eq!(t.spec.backends[0].endpoint, "tcp://127.0.0.1:3000");
        assert!(t.validate().is_empty(), "{:?}", t.validate());
        assert_eq!(
            ads.iter()
                .map(|a| a.metadata.name.clone().unwrap())
                .collect::<Vec<_>>(),
            ["laptop-web", "laptop-api", "laptop-db", "laptop-redis"]
        );
        assert_eq!(proxies.len(), 1);
        let p = &proxies[0];
        assert_eq!(
            p.spec.rules[0].backends[0].endpoint,
            "http://127.0.0.1:3000"
        );
        assert_eq!(
            p.spec.rules[0].backends[0]
                .connector
                .as_ref()
                .unwrap()
                .name
                .as_deref(),
            Some("laptop")
        );
        assert_eq!(
            p.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        assert_eq!(p.metadata.namespace.as_deref(), Some("p1"));
        assert!(ads.iter().all(|a| a.validate().is_empty()) && p.validate().is_empty());
        assert!(
            ads[0]
                .spec
                .allows("127.0.0.1", 3000, portway_api::Protocol::Tcp)
        );
    }

    #[test]
    fn names_stay_valid() {
        assert_eq!(object_name("laptop", "web"), "laptop-web");
        for connector in ["a".repeat(250), "laptop.example.com".into()] {
            let n = object_name(&connector, "web");
            assert!(
                portway_api::validation::dns1123_label(&n).is_ok(),
                "{n} is not a label"
            );
            assert_ne!(n, object_name(&connector, "api"), "unique per tunnel");
        }
    }

    #[test]
    fn a_tls_tunnels_request_goes_into_its_proxy() {
        let tunnels = [
            tunnel("mail", Protocol::Tls, &["mail.example.com"]),
            tunnel("other", Protocol::Tls, &[]),
        ];
        let requests = BTreeMap::from([("mail".to_owned(), "REQUEST".to_owned())]);
        let objects = desired(&connector(), &tunnels, &requests);
        let tls: Vec<_> = objects
            .tcp_proxies
            .iter()
            .map(|p| p.spec.tls.clone().unwrap())
            .collect();
        assert_eq!(tls[0].certificate_request.as_deref(), Some("REQUEST"));
        assert_eq!(tls[0].hostnames, ["mail.example.com"]);
        assert_eq!(tls[1].certificate_request, None);
    }
}
