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
    /// One per http tunnel with hostnames and access rules, guarding its proxy.
    pub policies: Vec<portway_api::AccessPolicy>,
    /// One per such tunnel with basic auth users (hashes only).
    pub secrets: Vec<k8s_openapi::api::core::v1::Secret>,
}

/// The AccessPolicy guarding the proxy of `tunnel`'s object name `name`, and its users'
/// Secret. The proxy names the policy (`portway.dev/access-policy`), so it answers 500
/// rather than serve unguarded until the policy exists.
fn access(
    meta: &ObjectMeta,
    name: &str,
    a: &crate::tunnel::Access,
) -> (
    portway_api::AccessPolicy,
    Option<k8s_openapi::api::core::v1::Secret>,
) {
    let users = format!("{name}-users");
    let mut spec = a.rules.clone();
    spec.target_refs = vec![portway_api::PolicyTargetReference {
        group: portway_api::access::GROUP.into(),
        kind: portway_api::access::TARGET_KIND.into(),
        name: name.to_owned(),
        section_name: None,
    }];
    let secret = a.htpasswd.as_ref().map(|text| {
        spec.basic_auth = Some(portway_api::BasicAuth {
            secret_ref: portway_api::SecretRef {
                name: users.clone(),
            },
            realm: spec.basic_auth.as_ref().and_then(|b| b.realm.clone()),
        });
        k8s_openapi::api::core::v1::Secret {
            metadata: ObjectMeta {
                name: Some(users.clone()),
                ..meta.clone()
            },
            type_: Some(portway_api::access::HTPASSWD_TYPE.into()),
            string_data: Some(BTreeMap::from([(
                portway_api::access::HTPASSWD_KEY.to_owned(),
                text.clone(),
            )])),
            ..Default::default()
        }
    });
    let policy = portway_api::AccessPolicy {
        metadata: ObjectMeta {
            name: Some(policy_name(name)),
            ..meta.clone()
        },
        spec,
        status: None,
    };
    (policy, secret)
}

/// The AccessPolicy of a proxy the agent writes.
pub fn policy_name(proxy: &str) -> String {
    format!("{proxy}-access")
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
    let mut policies = Vec::new();
    let mut secrets = Vec::new();
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
            let mut metadata = meta(connector, t);
            if let Some(a) = &t.access {
                let name = metadata.name.clone().unwrap_or_default();
                let (policy, secret) = access(&metadata, &name, a);
                metadata.annotations = Some(BTreeMap::from([(
                    portway_api::access::POLICY_ANNOTATION.to_owned(),
                    policy_name(&name),
                )]));
                policies.push(policy);
                secrets.extend(secret);
            }
            proxies.push(HttpProxy {
                metadata,
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
        policies,
        secrets,
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
            access: None,
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
            ..
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

    #[test]
    fn access_rules_become_a_labelled_policy_its_users_and_a_proxy_naming_it() {
        let flags = crate::tunnel::AccessFlags {
            basic_auth: vec!["ann:s3cret".into()],
            allow_ip: vec!["10.0.0.0/8".into()],
            rate_limit: Some("100/m".into()),
            ..Default::default()
        };
        let access = flags.access().unwrap();
        let t = Tunnel {
            access: access.clone(),
            ..tunnel("web", Protocol::Http, &["web.example.com"])
        };
        let o = desired(&connector(), &[t], &BTreeMap::new());
        let (p, policy, secret) = (&o.proxies[0], &o.policies[0], &o.secrets[0]);
        assert_eq!(
            p.metadata.annotations.as_ref().unwrap()[portway_api::access::POLICY_ANNOTATION],
            "laptop-web-access"
        );
        assert_eq!(policy.metadata.name.as_deref(), Some("laptop-web-access"));
        assert_eq!(policy.spec.target_refs[0].name, "laptop-web");
        assert_eq!(
            policy.spec.basic_auth.as_ref().unwrap().secret_ref.name,
            "laptop-web-users"
        );
        for labels in [&policy.metadata.labels, &secret.metadata.labels] {
            assert_eq!(labels.as_ref().unwrap()[CONNECTOR_LABEL], "laptop");
        }
        assert!(policy.validate().is_empty(), "{:?}", policy.validate());
        assert!(secret.validate().is_empty(), "{:?}", secret.validate());
        let text = &secret.string_data.as_ref().unwrap()["htpasswd"];
        assert!(
            text.starts_with("ann:$2") && !text.contains("s3cret"),
            "{text}"
        );
        // Bad flags say which; none: no policy.
        let bad = crate::tunnel::AccessFlags {
            allow_ip: vec!["10.0.0.0/33".into()],
            ..Default::default()
        };
        assert!(bad.access().unwrap_err().starts_with("--allow-ip"));
        assert_eq!(crate::tunnel::AccessFlags::default().access(), Ok(None));
        let plain = desired(
            &connector(),
            &[tunnel("web", Protocol::Http, &["w.example.com"])],
            &BTreeMap::new(),
        );
        assert!(plain.policies.is_empty() && plain.proxies[0].metadata.annotations.is_none());
    }
}
