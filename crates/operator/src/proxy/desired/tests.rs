//! The decision as a whole, case by case: each case builds inputs and checks the children
//! and conditions `desired` returns. Its fixtures serve the TCPProxy's tests too.

use super::*;
use gateway_api::apis::standard::httproutes::{
    HttpRouteStatusParents, HttpRouteStatusParentsParentRef,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use portway_api::*;

pub(crate) fn config() -> Config {
    Config {
        sidecars: vec![
            "127.0.0.1:4001".parse().unwrap(),
            "10.0.0.2:4001".parse().unwrap(),
        ],
        zone: "portway.localhost".into(),
        gateway_class: "portway".into(),
        controller_name: CONTROLLER_NAME.into(),
        allowed_origins: Vec::new(),
    }
}

pub(crate) fn connector(
    name: &str,
    id: Option<u8>,
    ready: bool,
    labels: &[(&str, &str)],
) -> Connector {
    let mut c = Connector::new(
        name,
        ConnectorSpec {
            connector_class_name: "portway".into(),
            capabilities: vec![],
        },
    );
    c.metadata.namespace = Some("p1".into());
    c.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    c.status = Some(ConnectorStatus {
        conditions: vec![condition("Ready", ready, "R", "", None)],
        connection_details: id.map(|n| ConnectionDetails {
            type_: ConnectionType::PublicKey,
            public_key: Some(PublicKeyConnectionDetails {
                id: format!("{n:02x}").repeat(32),
                ..Default::default()
            }),
        }),
        lease_ref: None,
    });
    c
}

pub(crate) fn advertise(connector: &str, address: &str, port: i32) -> ConnectorAdvertisement {
    let mut a = ConnectorAdvertisement::new(
        &format!("{connector}-ad"),
        ConnectorAdvertisementSpec {
            connector_ref: LocalObjectReference {
                name: connector.into(),
            },
            layer4: vec![Layer4Advertisement {
                name: "web".into(),
                services: vec![Layer4Service {
                    address: address.into(),
                    ports: vec![portway_api::ServicePort {
                        name: None,
                        port,
                        protocol: Protocol::Tcp,
                    }],
                }],
            }],
        },
    );
    a.metadata.namespace = Some("p1".into());
    a
}

fn proxy(hostnames: &[&str], endpoint: &str, connector: Option<ConnectorReference>) -> HttpProxy {
    let mut p = HttpProxy::new(
        "web",
        HttpProxySpec {
            hostnames: hostnames.iter().map(|h| h.to_string()).collect(),
            rules: vec![HttpProxyRule {
                matches: default_matches(),
                backends: vec![HttpProxyBackend {
                    endpoint: endpoint.into(),
                    connector,
                    tls: None,
                    filters: vec![],
                    instance: None,
                }],
                ..Default::default()
            }],
        },
    );
    p.metadata.namespace = Some("p1".into());
    p.metadata.uid = Some("u-1".into());
    p.metadata.generation = Some(3);
    p
}

pub(crate) fn by_name(n: &str) -> Option<ConnectorReference> {
    Some(ConnectorReference {
        name: Some(n.into()),
        selector: None,
    })
}

pub(crate) fn by_labels(l: &[(&str, &str)]) -> Option<ConnectorReference> {
    Some(ConnectorReference {
        name: None,
        selector: Some(LabelSelector {
            match_labels: Some(
                l.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            match_expressions: None,
        }),
    })
}

/// A fixed clock, so every condition's stamp is known.
pub(crate) const NOW: Timestamp = Timestamp::UNIX_EPOCH;

struct Case<'a> {
    proxy: HttpProxy,
    connectors: Vec<Connector>,
    ads: Vec<ConnectorAdvertisement>,
    claimed: &'a [(&'a str, &'a str)],
    route_status: Option<HttpRouteStatus>,
}

impl Case<'_> {
    fn run(&self) -> Desired {
        self.run_with(None)
    }

    fn run_with(&self, certificate: Option<super::CertificateReady<'_>>) -> Desired {
        self.run_full(certificate, None)
    }

    fn run_full(
        &self,
        certificate: Option<super::CertificateReady<'_>>,
        access: Option<&str>,
    ) -> Desired {
        let connectors: Vec<&Connector> = self.connectors.iter().collect();
        let ads: Vec<&ConnectorAdvertisement> = self.ads.iter().collect();
        let claimed = |h: &str| {
            self.claimed
                .iter()
                .find(|(c, _)| *c == h)
                .map(|(_, by)| by.to_string())
        };
        desired(&Inputs {
            proxy: &self.proxy,
            connectors: &connectors,
            advertisements: &ads,
            claimed_by: &claimed,
            route_status: self.route_status.as_ref(),
            gateway_addresses: &[],
            config: &config(),
            certificate,
            verification: None,
            access,
            now: NOW,
        })
    }
}

fn cond<'a>(d: &'a Desired, t: &str) -> &'a Condition {
    find_condition(&d.status.conditions, t).unwrap_or_else(|| panic!("no {t} condition"))
}

/// `Accepted` of a refused proxy (of either kind), checked to be False for `reason`.
pub(crate) fn refused<'a>(conditions: &'a [Condition], what: &str, reason: &str) -> &'a Condition {
    let accepted =
        find_condition(conditions, ACCEPTED).unwrap_or_else(|| panic!("{what}: no Accepted"));
    assert_eq!(
        (accepted.status.as_str(), accepted.reason.as_str()),
        ("False", reason),
        "{what}: {}",
        accepted.message
    );
    accepted
}

fn route_headers(d: &Desired) -> Vec<Vec<(String, String)>> {
    d.route.as_ref().unwrap().spec.rules.as_ref().unwrap()[0]
        .backend_refs
        .iter()
        .flatten()
        .map(|b| {
            b.filters.as_ref().unwrap()[0]
                .request_header_modifier
                .as_ref()
                .unwrap()
                .set
                .iter()
                .flatten()
                .map(|s| (s.name.clone(), s.value.clone()))
                .collect()
        })
        .collect()
}

#[test]
fn advertised_backend_is_programmed_with_headers_and_sidecar_endpoints() {
    let d = Case {
        proxy: proxy(
            &["app.example.com"],
            "http://127.0.0.1:3000",
            by_name("laptop"),
        ),
        connectors: vec![connector("laptop", Some(0xab), true, &[])],
        ads: vec![advertise("laptop", "127.0.0.1", 3000)],
        claimed: &[],
        route_status: None,
    }
    .run();
    assert_eq!(cond(&d, ACCEPTED).status, "True");
    assert_eq!(cond(&d, ACCEPTED).observed_generation, Some(3));
    assert!(
        d.status
            .conditions
            .iter()
            .all(|c| c.last_transition_time.0 == NOW),
        "stamped with the given time"
    );
    assert_eq!(
        (
            cond(&d, PROGRAMMED).status.as_str(),
            cond(&d, PROGRAMMED).reason.as_str()
        ),
        ("False", PENDING)
    );
    assert_eq!(cond(&d, METADATA).status, "True");
    assert_eq!(cond(&d, HOSTNAMES_IN_USE).status, "False");
    assert_eq!(
        route_headers(&d),
        vec![vec![
            ("datum-node-id".to_string(), "ab".repeat(32)),
            ("datum-target-host".into(), "127.0.0.1".into()),
            ("datum-target-port".into(), "3000".into()),
            ("datum-target-proto".into(), "http".into()),
        ]]
    );
    let route = d.route.as_ref().unwrap();
    assert_eq!(
        route.spec.hostnames.as_ref().unwrap(),
        &["app.example.com", "u-1.portway.localhost"]
    );
    assert_eq!(
        d.status.canonical_hostname.as_deref(),
        Some("u-1.portway.localhost")
    );
    assert_eq!(d.gateway.as_ref().unwrap().spec.listeners.len(), 2);
    assert_eq!(d.services.len(), 1);
    let backend = &route.spec.rules.as_ref().unwrap()[0]
        .backend_refs
        .as_ref()
        .unwrap()[0];
    assert_eq!(backend.name, d.services[0].metadata.name.clone().unwrap());
    assert_eq!(d.slices.len(), 1, "both sidecars share family and port");
    let slice = &d.slices[0];
    assert_eq!(
        slice.metadata.labels.as_ref().unwrap()["kubernetes.io/service-name"],
        backend.name
    );
    let eps = slice.endpoints.as_ref().unwrap();
    assert_eq!(
        eps.iter()
            .map(|e| e.addresses[0].as_str())
            .collect::<Vec<_>>(),
        ["127.0.0.1", "10.0.0.2"]
    );
    assert!(
        eps.iter()
            .all(|e| e.conditions.as_ref().unwrap().ready == Some(true))
    );
    assert_eq!(slice.ports.as_ref().unwrap()[0].port, Some(4001));
    let btp = d.policy.as_ref().unwrap();
    assert_eq!(btp.spec.target_refs[0].kind, "HTTPRoute");
    assert!(btp.spec.http_upgrade.iter().any(|u| u.type_ == "CONNECT"));
    for owner in [
        &d.gateway.as_ref().unwrap().metadata,
        &route.metadata,
        &d.services[0].metadata,
        &slice.metadata,
        &btp.metadata,
    ] {
        assert_eq!(owner.owner_references.as_ref().unwrap()[0].uid, "u-1");
        assert_eq!(owner.namespace.as_deref(), Some("p1"));
    }
}

#[test]
fn the_guarding_access_policy_is_named_first_on_every_rule() {
    let mut p = proxy(
        &["app.example.com"],
        "http://127.0.0.1:3000",
        by_name("laptop"),
    );
    let mut second = p.spec.rules[0].clone();
    second.filters = vec![
        serde_json::from_value(
            serde_json::json!({"type": "CORS", "cors": {"allowOrigins": ["*"]}}),
        )
        .unwrap(),
    ];
    p.spec.rules.push(second);
    let case = Case {
        proxy: p,
        connectors: vec![connector("laptop", Some(0xab), true, &[])],
        ads: vec![advertise("laptop", "127.0.0.1", 3000)],
        claimed: &[],
        route_status: None,
    };
    let kinds = |d: &Desired| -> Vec<Vec<String>> {
        d.route
            .as_ref()
            .unwrap()
            .spec
            .rules
            .iter()
            .flatten()
            .map(|r| {
                r.filters
                    .iter()
                    .flatten()
                    .map(|f| match &f.extension_ref {
                        Some(e) => format!("{}/{}/{}", e.group, e.kind, e.name),
                        None => format!("{:?}", f.r#type),
                    })
                    .collect()
            })
            .collect()
    };
    assert_eq!(kinds(&case.run()), [vec![], vec!["Cors".to_owned()]]);
    // An unguarded rule says so (an empty list), so a policy that goes is removed.
    assert_eq!(
        case.run().route.unwrap().spec.rules.unwrap()[0].filters,
        Some(vec![])
    );
    let guarded = case.run_full(None, Some("office-only"));
    let ext = "networking.datumapis.com/AccessPolicy/office-only".to_owned();
    assert_eq!(
        kinds(&guarded),
        [vec![ext.clone()], vec![ext, "Cors".to_owned()]]
    );
    assert_eq!(cond(&guarded, ACCEPTED).status, "True");
}

#[test]
fn gateway_acceptance_makes_it_programmed() {
    let status = HttpRouteStatus {
        parents: vec![HttpRouteStatusParents {
            controller_name: CONTROLLER_NAME.into(),
            parent_ref: HttpRouteStatusParentsParentRef {
                name: "web".into(),
                ..Default::default()
            },
            conditions: vec![condition("Accepted", true, "Accepted", "", Some(1))],
        }],
    };
    let d = Case {
        proxy: proxy(&[], "http://127.0.0.1:3000", by_name("laptop")),
        connectors: vec![connector("laptop", Some(1), true, &[])],
        ads: vec![advertise("laptop", "127.0.0.1", 3000)],
        claimed: &[],
        route_status: Some(status),
    }
    .run();
    assert_eq!(cond(&d, PROGRAMMED).status, "True");
    // Where Datum's agent reads its URL: every served name, the canonical one included.
    assert_eq!(d.status.hostnames, ["u-1.portway.localhost"]);
    // Not yet accepted by the gateway: no name is claimed to be served.
    let pending = Case {
        proxy: proxy(
            &["b.example.com", "a.example.com"],
            "http://127.0.0.1:3000",
            by_name("laptop"),
        ),
        connectors: vec![connector("laptop", Some(1), true, &[])],
        ads: vec![advertise("laptop", "127.0.0.1", 3000)],
        claimed: &[],
        route_status: None,
    }
    .run();
    assert!(
        pending.status.hostnames.is_empty(),
        "{:?}",
        pending.status.hostnames
    );
}

#[test]
fn refusals_each_with_their_reason_and_no_children() {
    let laptop = || vec![connector("laptop", Some(1), true, &[("app", "web")])];
    let ad = || vec![advertise("laptop", "127.0.0.1", 3000)];
    let mut disabled = connector("laptop", Some(1), true, &[]);
    disabled.spec.capabilities = vec![ConnectorCapability {
        type_: CapabilityType::ConnectTcp,
        connect_tcp: Some(ConnectTcpCapability { disabled: true }),
    }];
    let empty_selector = Some(ConnectorReference {
        name: None,
        selector: Some(LabelSelector::default()),
    });
    let cases: Vec<(&str, Case<'_>, &str, &str)> = vec![
        (
            "port not advertised",
            Case {
                proxy: proxy(&[], "http://127.0.0.1:3001", by_name("laptop")),
                connectors: laptop(),
                ads: ad(),
                claimed: &[],
                route_status: None,
            },
            NOT_ADVERTISED,
            "endpoint http://127.0.0.1:3001 is not advertised by connector laptop (it advertises 127.0.0.1:3000)",
        ),
        (
            "host not advertised",
            Case {
                proxy: proxy(&[], "http://localhost:3000", by_name("laptop")),
                connectors: laptop(),
                ads: ad(),
                claimed: &[],
                route_status: None,
            },
            NOT_ADVERTISED,
            "localhost:3000",
        ),
        (
            "no advertisement",
            Case {
                proxy: proxy(&[], "http://127.0.0.1:3000", by_name("laptop")),
                connectors: laptop(),
                ads: vec![],
                claimed: &[],
                route_status: None,
            },
            NOT_ADVERTISED,
            "advertises nothing",
        ),
        (
            "other connector's advertisement",
            Case {
                proxy: proxy(&[], "http://127.0.0.1:3000", by_name("laptop")),
                connectors: laptop(),
                ads: vec![advertise("desktop", "127.0.0.1", 3000)],
                claimed: &[],
                route_status: None,
            },
            NOT_ADVERTISED,
            "laptop",
        ),
        (
            "capability disabled",
            Case {
                proxy: proxy(&[], "http://127.0.0.1:3000", by_name("laptop")),
                connectors: vec![disabled],
                ads: ad(),
                claimed: &[],
                route_status: None,
            },
            NOT_ADVERTISED,
            "laptop",
        ),
        (
            "connector missing",
            Case {
                proxy: proxy(&[], "http://127.0.0.1:3000", by_name("desktop")),
                connectors: laptop(),
                ads: ad(),
                claimed: &[],
                route_status: None,
            },
            CONNECTOR_NOT_FOUND,
            "connector \"desktop\" does not exist in project p1",
        ),
        (
            "selector matches nothing",
            Case {
                proxy: proxy(&[], "http://127.0.0.1:3000", by_labels(&[("app", "db")])),
                connectors: laptop(),
                ads: ad(),
                claimed: &[],
                route_status: None,
            },
            CONNECTOR_NOT_FOUND,
            "no connector matches the selector",
        ),
        (
            "bad scheme",
            Case {
                proxy: proxy(&[], "ftp://127.0.0.1:3000", by_name("laptop")),
                connectors: laptop(),
                ads: ad(),
                claimed: &[],
                route_status: None,
            },
            INVALID,
            "scheme \"ftp\"",
        ),
        (
            "an origin on the edge's own machine",
            Case {
                proxy: proxy(&[], "http://127.0.0.1:3000", None),
                connectors: laptop(),
                ads: ad(),
                claimed: &[],
                route_status: None,
            },
            ORIGIN_NOT_ALLOWED,
            "127.0.0.1 is in 127.0.0.0/8",
        ),
        (
            "an origin named localhost",
            Case {
                proxy: proxy(&[], "http://localhost:3000", None),
                connectors: laptop(),
                ads: ad(),
                claimed: &[],
                route_status: None,
            },
            ORIGIN_NOT_ALLOWED,
            "localhost is this machine",
        ),
        (
            "the cloud's metadata service",
            Case {
                proxy: proxy(&[], "http://169.254.169.254", None),
                connectors: laptop(),
                ads: ad(),
                claimed: &[],
                route_status: None,
            },
            ORIGIN_NOT_ALLOWED,
            "169.254.169.254 is in 169.254.0.0/16",
        ),
        (
            "empty selector",
            Case {
                proxy: proxy(&[], "http://127.0.0.1:3000", empty_selector),
                connectors: laptop(),
                ads: ad(),
                claimed: &[],
                route_status: None,
            },
            INVALID,
            "empty selector",
        ),
    ];
    for (what, case, reason, mention) in cases {
        let d = case.run();
        let accepted = refused(&d.status.conditions, what, reason);
        assert!(
            accepted.message.contains(mention),
            "{what}: {:?} should mention {mention:?}",
            accepted.message
        );
        assert!(
            accepted.message.starts_with("spec.rules[0].backends[0]"),
            "{what}: names the field: {}",
            accepted.message
        );
        assert_eq!(cond(&d, PROGRAMMED).status, "False", "{what}");
        assert!(
            d.route.is_none()
                && d.gateway.is_none()
                && d.services.is_empty()
                && d.slices.is_empty()
                && d.policy.is_none(),
            "{what}: no children"
        );
    }
}

#[test]
fn selector_with_two_connectors_gives_two_backends_and_readiness_per_endpoint() {
    let d = Case {
        proxy: proxy(&[], "http://127.0.0.1:3000", by_labels(&[("app", "web")])),
        connectors: vec![
            connector("b-desktop", Some(2), false, &[("app", "web")]),
            connector("a-laptop", Some(1), true, &[("app", "web")]),
            connector("other", Some(3), true, &[("app", "db")]),
        ],
        ads: vec![
            advertise("a-laptop", "127.0.0.1", 3000),
            advertise("b-desktop", "*.0.0.1", 1),
            advertise("b-desktop", "127.0.0.1", 3000),
        ],
        claimed: &[],
        route_status: None,
    }
    .run();
    assert_eq!(cond(&d, ACCEPTED).status, "True");
    let ids: Vec<String> = route_headers(&d).iter().map(|h| h[0].1.clone()).collect();
    assert_eq!(ids, ["01".repeat(32), "02".repeat(32)]);
    assert_eq!(d.services.len(), 2);
    let ready: Vec<Option<bool>> = d
        .slices
        .iter()
        .map(|s| {
            s.endpoints.as_ref().unwrap()[0]
                .conditions
                .as_ref()
                .unwrap()
                .ready
        })
        .collect();
    assert_eq!(ready, [Some(true), Some(false)]);
    let c = cond(&d, BACKENDS_READY);
    assert_eq!(
        (c.status.as_str(), c.message.as_str()),
        ("True", "1 of 2 backend(s) ready")
    );
    let none = Case {
        proxy: proxy(&[], "http://127.0.0.1:3000", by_labels(&[("app", "web")])),
        connectors: vec![connector("b-desktop", Some(2), false, &[("app", "web")])],
        ads: vec![advertise("b-desktop", "127.0.0.1", 3000)],
        claimed: &[],
        route_status: None,
    }
    .run();
    let c = cond(&none, BACKENDS_READY);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", NO_READY_BACKEND)
    );
}

#[test]
fn a_hostname_owned_by_another_proxy_refuses_the_proxy() {
    let d = Case {
        proxy: proxy(
            &["taken.example.com", "Free.example.com"],
            "http://127.0.0.1:3000",
            by_name("laptop"),
        ),
        connectors: vec![connector("laptop", Some(1), true, &[])],
        ads: vec![advertise("laptop", "127.0.0.1", 3000)],
        claimed: &[("taken.example.com", "another project (as *.example.com)")],
        route_status: None,
    }
    .run();
    let accepted = cond(&d, ACCEPTED);
    assert_eq!(
        (accepted.status.as_str(), accepted.reason.as_str()),
        ("False", HOSTNAME_IN_USE),
        "a URL that would serve someone else's app is never reported as working"
    );
    assert!(
        accepted
            .message
            .contains("taken.example.com is already claimed by another project (as *.example.com)"),
        "{}",
        accepted.message
    );
    assert_eq!(cond(&d, PROGRAMMED).status, "False");
    assert_eq!(cond(&d, HOSTNAMES_IN_USE).status, "True");
    let statuses: Vec<(&str, &str)> = d
        .status
        .hostname_statuses
        .iter()
        .map(|h| (h.hostname.as_str(), h.conditions[0].status.as_str()))
        .collect();
    assert_eq!(
        statuses,
        [("taken.example.com", "True"), ("free.example.com", "False")]
    );
    assert!(
        d.route.is_none() && d.gateway.is_none(),
        "no generated objects"
    );
}

#[test]
fn reserved_headers_in_stored_objects_are_refused() {
    let mut p = proxy(
        &["app.example.com"],
        "http://127.0.0.1:3000",
        by_name("laptop"),
    );
    p.spec.rules[0].backends[0].filters = serde_json::from_value(serde_json::json!([
        {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "datum-node-id", "value": "cd".repeat(32)}]}}
    ]))
    .unwrap();
    let d = Case {
        proxy: p,
        connectors: vec![connector("laptop", Some(1), true, &[])],
        ads: vec![advertise("laptop", "127.0.0.1", 3000)],
        claimed: &[],
        route_status: None,
    }
    .run();
    let accepted = cond(&d, ACCEPTED);
    assert_eq!(
        (accepted.status.as_str(), accepted.reason.as_str()),
        ("False", INVALID)
    );
    assert!(
        accepted
            .message
            .contains("spec.rules[0].backends[0].filters[0].requestHeaderModifier.set[0].name"),
        "{}",
        accepted.message
    );
    assert!(d.route.is_none());
}

#[test]
fn an_origin_is_reached_directly_with_its_name_and_host() {
    let routing = |d: &Desired| route_headers(d)[0].clone();
    let d = Case {
        proxy: proxy(&[], "https://api.example.com", None),
        connectors: vec![],
        ads: vec![],
        claimed: &[],
        route_status: None,
    }
    .run();
    assert_eq!(
        cond(&d, ACCEPTED).status,
        "True",
        "{:?}",
        cond(&d, ACCEPTED)
    );
    assert_eq!(cond(&d, BACKENDS_READY).status, "True");
    let h = routing(&d);
    let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    assert_eq!(get("datum-node-id"), Some("direct"));
    assert_eq!(get("datum-target-host"), Some("api.example.com"));
    assert_eq!(get("datum-target-port"), Some("443"));
    assert_eq!(get("datum-target-proto"), Some("https"));
    assert_eq!(get("datum-target-tls-name"), Some("api.example.com"));
    assert_eq!(get("datum-target-authority"), Some("api.example.com"));

    // At an IP: the TLS name given; over http, no TLS name, the public Host kept; and a
    // loopback origin once the installation allows it.
    let mut p = proxy(&[], "https://10.0.0.7:8443", None);
    p.spec.rules[0].backends[0].tls = Some(portway_api::BackendTls {
        hostname: Some("internal.example.com".into()),
    });
    let d = Case {
        proxy: p,
        connectors: vec![],
        ads: vec![],
        claimed: &[],
        route_status: None,
    }
    .run();
    let h = routing(&d);
    let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    assert_eq!(get("datum-target-tls-name"), Some("internal.example.com"));
    assert_eq!(get("datum-target-authority"), Some("internal.example.com"));
    let d = Case {
        proxy: proxy(&[], "http://10.0.0.7:8080", None),
        connectors: vec![],
        ads: vec![],
        claimed: &[],
        route_status: None,
    }
    .run();
    let h = routing(&d);
    let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    assert_eq!(
        (get("datum-target-tls-name"), get("datum-target-authority")),
        (Some("-"), Some("-"))
    );
    let mut allowing = config();
    allowing.allowed_origins = vec!["127.0.0.0/8".parse().unwrap()];
    let p = proxy(&[], "http://127.0.0.1:3000", None);
    let d = desired(&Inputs {
        proxy: &p,
        connectors: &[],
        advertisements: &[],
        claimed_by: &|_| None,
        route_status: None,
        gateway_addresses: &[],
        config: &allowing,
        certificate: None,
        verification: None,
        access: None,
        now: NOW,
    });
    assert_eq!(
        cond(&d, ACCEPTED).status,
        "True",
        "{:?}",
        cond(&d, ACCEPTED)
    );
}

#[test]
fn a_host_set_on_the_request_becomes_the_rules_rewrite() {
    let mut p = proxy(&[], "http://api.example.com", None);
    p.spec.rules[0].filters = serde_json::from_value(serde_json::json!([{
        "type": "RequestHeaderModifier",
        "requestHeaderModifier": {"set": [{"name": "Host", "value": "Coffee.Example.com"},
            {"name": "x-kept", "value": "1"}]}}]))
    .unwrap();
    let d = Case {
        proxy: p,
        connectors: vec![],
        ads: vec![],
        claimed: &[],
        route_status: None,
    }
    .run();
    let rule = &d.route.as_ref().unwrap().spec.rules.as_ref().unwrap()[0];
    let filters = rule.filters.as_ref().unwrap();
    let set = filters[0]
        .request_header_modifier
        .as_ref()
        .unwrap()
        .set
        .as_ref()
        .unwrap();
    assert_eq!(
        set.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(),
        ["x-kept"]
    );
    assert_eq!(
        filters[1].url_rewrite.as_ref().unwrap().hostname.as_deref(),
        Some("coffee.example.com")
    );
    // The origin is sent that Host too.
    let h = route_headers(&d)[0].clone();
    assert!(
        h.contains(&(
            "datum-target-authority".to_owned(),
            "coffee.example.com".to_owned()
        )),
        "{h:?}"
    );
}

#[test]
fn wildcard_advertisements_and_unreported_ids() {
    let d = Case {
        proxy: proxy(&[], "http://api.internal:8443", by_name("laptop")),
        connectors: vec![connector("laptop", None, false, &[])],
        ads: vec![advertise("laptop", "*.internal", 8443)],
        claimed: &[],
        route_status: None,
    }
    .run();
    assert_eq!(cond(&d, ACCEPTED).status, "True");
    assert_eq!(
        (
            cond(&d, METADATA).status.as_str(),
            cond(&d, METADATA).reason.as_str()
        ),
        ("False", PENDING)
    );
    assert!(d.services.is_empty());
    // Written empty, so a backend that goes is removed from the stored route.
    assert_eq!(
        d.route.unwrap().spec.rules.unwrap()[0].backend_refs,
        Some(vec![])
    );
    assert_eq!(
        parse_endpoint("https://api.internal:8443").unwrap(),
        Endpoint {
            target: Target {
                host: "api.internal".into(),
                port: 8443,
            },
            proto: "https".into()
        }
    );
    assert_eq!(parse_endpoint("http://[::1]").unwrap().target.port, 80);
}

#[test]
fn generated_names_are_stable_labels() {
    let a = label_name("My.Proxy", &["x", "0"]);
    assert_eq!(a, label_name("My.Proxy", &["x", "0"]));
    assert_ne!(a, label_name("My.Proxy", &["x", "1"]));
    assert!(portway_api::validation::dns1123_label(&a).is_ok(), "{a}");
    assert!(portway_api::validation::dns1123_label(&label_name(&"x".repeat(100), &[])).is_ok());
}

/// Accepted means implemented: a filter no data plane carries out refuses the proxy with
/// UnsupportedValue and the field; the implemented ones pass into the route as written.
#[test]
fn filters_no_data_plane_implements_are_refused() {
    let mut p = proxy(
        &["app.example.com"],
        "http://127.0.0.1:3000",
        by_name("laptop"),
    );
    p.spec.rules[0].filters = serde_json::from_value(serde_json::json!([
        {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow"}}}
    ]))
    .unwrap();
    let case = |p: HttpProxy| {
        Case {
            proxy: p,
            connectors: vec![connector("laptop", Some(1), true, &[])],
            ads: vec![advertise("laptop", "127.0.0.1", 3000)],
            claimed: &[],
            route_status: None,
        }
        .run()
    };
    let d = case(p.clone());
    let accepted = cond(&d, ACCEPTED);
    assert_eq!(
        (accepted.status.as_str(), accepted.reason.as_str()),
        ("False", UNSUPPORTED_VALUE)
    );
    assert!(
        accepted
            .message
            .contains("spec.rules[0].filters[0].requestMirror: RequestMirror filters are not implemented on a rule"),
        "{}",
        accepted.message
    );
    assert_eq!(cond(&d, PROGRAMMED).reason, UNSUPPORTED_VALUE);
    assert!(d.route.is_none() && d.gateway.is_none());

    // Datum's ExtensionRef to Envoy Gateway's HTTPRouteFilter, on a rule and on a backend.
    let mut ext = p.clone();
    let filter = serde_json::json!([{"type": "ExtensionRef", "extensionRef": {
        "group": "gateway.envoyproxy.io", "kind": "HTTPRouteFilter", "name": "f"}}]);
    ext.spec.rules[0].filters = serde_json::from_value(filter.clone()).unwrap();
    ext.spec.rules[0].backends[0].filters = serde_json::from_value(filter).unwrap();
    let d = case(ext);
    let accepted = cond(&d, ACCEPTED);
    assert_eq!(accepted.reason, UNSUPPORTED_VALUE);
    for field in [
        "spec.rules[0].filters[0].extensionRef",
        "spec.rules[0].backends[0].filters[0].extensionRef",
    ] {
        assert!(accepted.message.contains(field), "{}", accepted.message);
    }

    let implemented: Vec<gateway_api::apis::standard::httproutes::HttpRouteRulesFilters> =
        serde_json::from_value(serde_json::json!([
            {"type": "URLRewrite", "urlRewrite": {"hostname": "internal.example"}},
            {"type": "CORS", "cors": {"allowOrigins": ["*"]}},
        ]))
        .unwrap();
    p.spec.rules[0].filters = implemented.clone();
    let d = case(p.clone());
    assert_eq!(cond(&d, ACCEPTED).status, "True");
    let route = d.route.unwrap();
    assert_eq!(
        route.spec.rules.unwrap()[0].filters.as_deref(),
        Some(implemented.as_slice())
    );

    // A proxy that only redirects needs no device, and says so.
    p.spec.rules[0].filters = serde_json::from_value(serde_json::json!([
        {"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}
    ]))
    .unwrap();
    p.spec.rules[0].backends.clear();
    let d = case(p);
    assert_eq!(cond(&d, ACCEPTED).status, "True");
    assert_eq!(cond(&d, BACKENDS_READY).status, "True");
    assert_eq!(cond(&d, METADATA).status, "True");
}

#[test]
fn each_served_hostname_and_the_canonical_one_tell_their_certificate() {
    let d = Case {
        proxy: proxy(
            &["app.example.com", "taken.example.com"],
            "http://127.0.0.1:3000",
            by_name("laptop"),
        ),
        connectors: vec![],
        ads: vec![],
        claimed: &[(
            "taken.example.com",
            "another project (as taken.example.com)",
        )],
        route_status: None,
    }
    .run_with(Some(&|h: &str| {
        if h.ends_with(".portway.localhost") {
            (true, "Issued", format!("{h} is covered"))
        } else {
            (false, "NotCovered", format!("nothing covers {h}"))
        }
    }));
    let certs: Vec<(&str, Option<(&str, &str)>)> = d
        .status
        .hostname_statuses
        .iter()
        .map(|h| {
            let c = h.conditions.iter().find(|c| c.type_ == "CertificatesReady");
            (
                h.hostname.as_str(),
                c.map(|c| (c.status.as_str(), c.reason.as_str())),
            )
        })
        .collect();
    assert_eq!(
        certs,
        [
            ("app.example.com", Some(("False", "NotCovered"))),
            ("taken.example.com", None),
            ("u-1.portway.localhost", Some(("True", "Issued"))),
        ],
        "another project's name says nothing of certificates; the canonical name is listed"
    );
    // Summed up on the proxy, as Datum does.
    let summary = cond(&d, "CertificatesReady");
    assert_eq!(
        (summary.status.as_str(), summary.reason.as_str()),
        ("False", "CertificatesPending")
    );
    assert!(
        summary.message.contains("app.example.com (NotCovered)"),
        "{summary:?}"
    );
}

#[test]
fn a_hostname_not_yet_proven_is_not_routed_and_says_what_to_publish() {
    use crate::verify::Verification;
    let case = Case {
        proxy: proxy(
            &["shop.test", "app.portway.localhost"],
            "http://127.0.0.1:3000",
            by_name("laptop"),
        ),
        connectors: vec![connector("laptop", Some(1), true, &[])],
        ads: vec![advertise("laptop", "127.0.0.1", 3000)],
        claimed: &[],
        route_status: None,
    };
    let verdict = |h: &str| {
        if h == "shop.test" {
            Verification::Pending {
                instructions: "publish TXT _portway-challenge.shop.test \"t\"".into(),
                found: "no TXT".into(),
            }
        } else {
            Verification::NotRequired(format!("{h} is under the zone"))
        }
    };
    let d = desired(&Inputs {
        proxy: &case.proxy,
        connectors: &case.connectors.iter().collect::<Vec<_>>(),
        advertisements: &case.ads.iter().collect::<Vec<_>>(),
        claimed_by: &|_| None,
        route_status: None,
        gateway_addresses: &[],
        config: &config(),
        certificate: None,
        verification: Some(&verdict),
        access: None,
        now: NOW,
    });
    let routed = d.route.as_ref().unwrap().spec.hostnames.clone().unwrap();
    assert_eq!(routed, ["app.portway.localhost", "u-1.portway.localhost"]);
    let verified: Vec<(&str, &str, &str)> = d
        .status
        .hostname_statuses
        .iter()
        .filter_map(|h| {
            let c = h
                .conditions
                .iter()
                .find(|c| c.type_ == "HostnamesVerified")?;
            Some((h.hostname.as_str(), c.status.as_str(), c.reason.as_str()))
        })
        .collect();
    assert_eq!(
        verified,
        [
            ("shop.test", "False", "NotVerified"),
            ("app.portway.localhost", "True", "VerificationNotRequired"),
        ]
    );
    let shop = &d.status.hostname_statuses[0].conditions;
    assert!(
        shop.iter()
            .any(|c| c.message.contains("_portway-challenge.shop.test")),
        "{shop:?}"
    );
    assert_eq!(
        cond(&d, ACCEPTED).status,
        "True",
        "the proxy still serves its other names"
    );
    let summary = cond(&d, "HostnamesVerified");
    assert_eq!(
        (summary.status.as_str(), summary.reason.as_str()),
        ("False", "UnverifiedHostnamesPresent")
    );
    assert!(
        summary.message.contains("shop.test (NotVerified)"),
        "{summary:?}"
    );
}

#[test]
fn the_zone_itself_and_wildcards_in_it_are_refused() {
    for h in [
        "portway.localhost",
        "*.portway.localhost",
        "*.team.portway.localhost",
    ] {
        let d = Case {
            proxy: proxy(&[h], "http://127.0.0.1:3000", by_name("laptop")),
            connectors: vec![connector("laptop", Some(1), true, &[])],
            ads: vec![advertise("laptop", "127.0.0.1", 3000)],
            claimed: &[],
            route_status: None,
        }
        .run();
        let accepted = cond(&d, ACCEPTED);
        assert_eq!(accepted.status, "False", "{h}");
        assert!(
            accepted.message.contains("spec.hostnames[0]"),
            "{}",
            accepted.message
        );
        assert!(d.route.is_none(), "{h} is not routed");
    }
}
