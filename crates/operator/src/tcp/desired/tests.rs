//! The decision as a whole, case by case: each case builds inputs (the port from a real
//! port index) and checks the children and conditions `desired` returns.

use super::*;
use crate::proxy::desired::tests::{
    NOW, advertise, by_labels, by_name, config, connector, refused,
};
use crate::tcp::ports::PortIndex;
use gateway_api::apis::experimental::tcproutes::{
    TcpRouteStatusParents, TcpRouteStatusParentsParentRef,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::Resource;
use portway_api::{
    CONTROLLER_NAME, ConnectorReference, TcpProxyBackend, TcpProxySpec, condition, find_condition,
};
use serde_json::json;

fn proxy(port: Option<i32>, backends: &[(&str, Option<ConnectorReference>)]) -> TcpProxy {
    let mut p = TcpProxy::new(
        "ssh",
        TcpProxySpec {
            port,
            backends: backends
                .iter()
                .map(|(endpoint, connector)| TcpProxyBackend {
                    endpoint: (*endpoint).into(),
                    connector: connector.clone().unwrap_or_default(),
                })
                .collect(),
            ..Default::default()
        },
    );
    p.metadata.namespace = Some("p1".into());
    p.metadata.uid = Some("u-1".into());
    p.metadata.generation = Some(3);
    p.metadata.creation_timestamp = Some(Time(Timestamp::from_second(100).unwrap()));
    p
}

fn ssh(port: Option<i32>) -> TcpProxy {
    proxy(port, &[("tcp://127.0.0.1:22", by_name("laptop"))])
}

struct Case {
    proxy: TcpProxy,
    connectors: Vec<Connector>,
    ads: Vec<ConnectorAdvertisement>,
    port: Verdict,
    taken: Option<&'static str>,
    route_status: Option<TcpRouteStatus>,
}

impl Case {
    /// `proxy` through a laptop that is ready and advertises port 22, on port 20022.
    fn new(proxy: TcpProxy) -> Self {
        Self {
            proxy,
            connectors: vec![connector("laptop", Some(0xab), true, &[])],
            ads: vec![advertise("laptop", "127.0.0.1", 22)],
            port: Ok(20022),
            taken: None,
            route_status: None,
        }
    }

    fn run(&self) -> Desired {
        desired(&Inputs {
            proxy: &self.proxy,
            connectors: &self.connectors.iter().collect::<Vec<_>>(),
            advertisements: &self.ads.iter().collect::<Vec<_>>(),
            listen: Listen::Port(&self.port),
            name_taken_by: self.taken,
            route_status: self.route_status.as_ref(),
            config: &config(),
            now: NOW,
        })
    }
}

fn cond<'a>(d: &'a Desired, t: &str) -> &'a Condition {
    find_condition(&d.status.conditions, t).unwrap_or_else(|| panic!("no {t} condition"))
}

fn status_of(d: &Desired, t: &str) -> (String, String) {
    let c = cond(d, t);
    (c.status.clone(), c.reason.clone())
}

fn no_children(d: &Desired) -> bool {
    d.gateway.is_none() && d.route.is_none() && d.services.is_empty() && d.slices.is_empty()
}

fn listener_port(d: &Desired) -> i32 {
    d.gateway.as_ref().unwrap().spec.listeners[0].port
}

#[test]
fn an_accepted_proxy_gets_the_gateway_route_service_and_annotated_slice() {
    let case = Case::new(ssh(None));
    let d = case.run();
    let svc = label_name("ssh", &["ssh", "tcp", "0", "laptop"]);
    let owner = serde_json::to_value(vec![case.proxy.controller_owner_ref(&()).unwrap()]).unwrap();
    let labels =
        json!({"app.kubernetes.io/managed-by": "portway-operator", "portway.dev/tcpproxy": "ssh"});
    let meta = |name: &str, extra: serde_json::Value| {
        let mut l = labels.clone();
        l.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"name": name, "namespace": "p1", "labels": l, "ownerReferences": owner})
    };
    assert_eq!(
        serde_json::to_value(d.gateway.as_ref().unwrap()).unwrap(),
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": meta("ssh.tcp", json!({})),
            "spec": {"gatewayClassName": "portway", "listeners": [{
                "name": "tcp", "port": 20022, "protocol": "TCP",
                "allowedRoutes": {"kinds": [{"group": "gateway.networking.k8s.io", "kind": "TCPRoute"}]},
            }]},
        })
    );
    assert_eq!(
        serde_json::to_value(d.route.as_ref().unwrap()).unwrap(),
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
            "metadata": meta("ssh.tcp", json!({})),
            "spec": {
                "parentRefs": [{"name": "ssh.tcp", "sectionName": "tcp"}],
                "rules": [{"backendRefs": [{"name": svc, "port": 22, "weight": 1}]}],
            },
        })
    );
    let connector_label = json!({"portway.dev/connector": "laptop"});
    assert_eq!(
        serde_json::to_value(&d.services).unwrap(),
        json!([{
            "apiVersion": "v1", "kind": "Service",
            "metadata": meta(&svc, connector_label.clone()),
            "spec": {"clusterIP": "None", "ports": [{"name": "tcp", "port": 22, "protocol": "TCP"}]},
        }])
    );
    let mut slice_meta = meta(
        &format!("{svc}-4001"),
        json!({
            "kubernetes.io/service-name": svc,
            "endpointslice.kubernetes.io/managed-by": "portway-operator",
            "portway.dev/connector": "laptop",
        }),
    );
    slice_meta["annotations"] =
        json!({"portway.dev/tunnel-target": format!("{} 127.0.0.1 22", "ab".repeat(32))});
    let ready = json!({"ready": true, "serving": true, "terminating": false});
    assert_eq!(
        serde_json::to_value(&d.slices).unwrap(),
        json!([{
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": slice_meta,
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["127.0.0.1"], "conditions": ready},
                {"addresses": ["10.0.0.2"], "conditions": ready},
            ],
            "ports": [{"name": "tcp", "port": 4001, "protocol": "TCP"}],
        }])
    );
    assert_eq!(d.status.port, Some(20022));
    let accepted = cond(&d, ACCEPTED);
    assert_eq!(
        (accepted.status.as_str(), accepted.message.as_str()),
        (
            "True",
            "port 20022: 1 backend(s) through 1 connector(s), 1 ready"
        )
    );
    assert!(
        d.status
            .conditions
            .iter()
            .all(|c| c.observed_generation == Some(3) && c.last_transition_time.0 == NOW)
    );
    assert_eq!(status_of(&d, PROGRAMMED), ("False".into(), PENDING.into()));
    let ready = cond(&d, BACKENDS_READY);
    assert_eq!(
        (ready.status.as_str(), ready.message.as_str()),
        ("True", "1 of 1 backend(s) ready")
    );
}

/// The port the index grants is the listener's and the status's: kept from status,
/// the one asked for, or the lowest free one.
#[test]
fn the_port_is_kept_requested_or_allocated() {
    let with_status = |mut p: TcpProxy, port: i32| {
        p.status = Some(TcpProxyStatus {
            conditions: vec![],
            port: Some(port),
            ..Default::default()
        });
        p
    };
    let cases = [
        ("kept", with_status(ssh(None), 20007), 20007),
        ("requested", ssh(Some(20022)), 20022),
        (
            "requested again after a move",
            with_status(ssh(Some(20500)), 20007),
            20500,
        ),
        ("allocated", ssh(None), 20000),
    ];
    for (what, p, want) in cases {
        let index = PortIndex::new(20000..=20999);
        let mut case = Case::new(p);
        index.observe(&case.proxy);
        case.port = index.assign(&case.proxy).0;
        let d = case.run();
        assert_eq!(cond(&d, ACCEPTED).status, "True", "{what}");
        assert_eq!(listener_port(&d), want, "{what}");
        assert_eq!(d.status.port, Some(want), "{what}");
        assert!(
            cond(&d, ACCEPTED)
                .message
                .starts_with(&format!("port {want}:")),
            "{what}"
        );
    }
}

/// A proxy that holds no port is refused under the port's reason, loses `status.port`,
/// and gets no objects.
#[test]
fn port_refusals_clear_the_port_and_generate_nothing() {
    let mut holder = TcpProxy::new(
        "holder",
        TcpProxySpec {
            port: Some(20022),
            backends: vec![],
            ..Default::default()
        },
    );
    holder.metadata.namespace = Some("p1".into());
    holder.metadata.creation_timestamp = Some(Time(Timestamp::from_second(1).unwrap()));
    let in_use = PortIndex::new(20000..=20999);
    in_use.observe(&holder);
    let _ = in_use.assign(&holder);
    let full = PortIndex::new(20022..=20022);
    full.observe(&holder);
    let _ = full.assign(&holder);
    let narrow = PortIndex::new(20000..=20999);
    let mut lost = ssh(Some(20022));
    lost.status = Some(TcpProxyStatus {
        conditions: vec![],
        port: Some(20005),
        ..Default::default()
    });
    let cases = [
        (
            "in use in the same project",
            &in_use,
            lost,
            PORT_IN_USE,
            "spec.port: port 20022 is already held by the TCPProxy p1/holder",
        ),
        (
            "range used up",
            &full,
            ssh(None),
            NO_PORT_AVAILABLE,
            "every port of 20022-20022 is held",
        ),
        (
            "outside the range",
            &narrow,
            ssh(Some(22)),
            PORT_NOT_ALLOWED,
            "spec.port: 22 is not a port this edge publishes: choose one of 20000-20999",
        ),
    ];
    for (what, index, p, reason, says) in cases {
        let mut case = Case::new(p);
        index.observe(&case.proxy);
        case.port = index.assign(&case.proxy).0;
        let d = case.run();
        let accepted = refused(&d.status.conditions, what, reason);
        assert!(
            accepted.message.contains(says),
            "{what}: {}",
            accepted.message
        );
        assert_eq!(status_of(&d, PROGRAMMED), ("False".into(), reason.into()));
        assert_eq!(status_of(&d, BACKENDS_READY).0, "False", "{what}");
        assert_eq!(d.status.port, None, "{what}: the port is lost");
        assert!(no_children(&d), "{what}");
    }
}

/// Refused for anything but its port, a proxy keeps its port (nobody else may take it
/// while the user fixes the backend) but gets no objects.
#[test]
fn other_refusals_keep_the_port_and_generate_nothing() {
    let mut disabled = connector("laptop", Some(1), true, &[]);
    disabled.spec.capabilities = vec![portway_api::ConnectorCapability {
        type_: portway_api::CapabilityType::ConnectTcp,
        connect_tcp: Some(portway_api::ConnectTcpCapability { disabled: true }),
    }];
    let cases: Vec<(&str, Case, &str, &str)> = vec![
        (
            "connector missing",
            Case::new(proxy(None, &[("tcp://127.0.0.1:22", by_name("desktop"))])),
            CONNECTOR_NOT_FOUND,
            "spec.backends[0]: connector \"desktop\" does not exist in project p1",
        ),
        (
            "selector matches nothing",
            Case::new(proxy(
                None,
                &[("tcp://127.0.0.1:22", by_labels(&[("app", "db")]))],
            )),
            CONNECTOR_NOT_FOUND,
            "spec.backends[0]: no connector matches the selector",
        ),
        (
            "port not advertised",
            Case::new(proxy(None, &[("tcp://127.0.0.1:2222", by_name("laptop"))])),
            NOT_ADVERTISED,
            "spec.backends[0]: endpoint tcp://127.0.0.1:2222 is not advertised by connector laptop (it advertises 127.0.0.1:22)",
        ),
        (
            "capability disabled",
            Case {
                connectors: vec![disabled],
                ..Case::new(ssh(None))
            },
            NOT_ADVERTISED,
            "spec.backends[0]: endpoint tcp://127.0.0.1:22 is not advertised by connector laptop",
        ),
        (
            "stored before validation refused it",
            Case::new(proxy(None, &[("tcp://127.0.0.1", by_name("laptop"))])),
            INVALID,
            "spec.backends[0].endpoint: \"tcp://127.0.0.1\" has no port",
        ),
        (
            "empty selector",
            Case::new(proxy(
                None,
                &[(
                    "tcp://127.0.0.1:22",
                    Some(ConnectorReference {
                        name: None,
                        selector: Some(Default::default()),
                    }),
                )],
            )),
            INVALID,
            "spec.backends[0].connector.selector: an empty selector would select every connector",
        ),
        (
            "its Gateway's name is another proxy's",
            Case {
                taken: Some("the Gateway p1/ssh belongs to the HTTPProxy ssh"),
                ..Case::new(ssh(None))
            },
            NAME_IN_USE,
            "metadata.name: the Gateway p1/ssh belongs to the HTTPProxy ssh",
        ),
    ];
    for (what, case, reason, says) in cases {
        let d = case.run();
        let accepted = refused(&d.status.conditions, what, reason);
        assert!(
            accepted.message.starts_with(says),
            "{what}: {:?} should start with {says:?}",
            accepted.message
        );
        assert!(
            !accepted.message.contains("; "),
            "{what}: each problem once: {}",
            accepted.message
        );
        assert_eq!(d.status.port, Some(20022), "{what}: the port is kept");
        assert!(no_children(&d), "{what}");
    }
}

#[test]
fn a_selector_fans_out_to_every_matching_connector() {
    let db = || by_labels(&[("app", "db")]);
    let case = Case {
        connectors: vec![
            connector("b-desktop", Some(2), false, &[("app", "db")]),
            connector("a-laptop", Some(1), true, &[("app", "db")]),
            connector("other", Some(3), true, &[("app", "web")]),
        ],
        ads: vec![
            advertise("a-laptop", "::1", 5432),
            advertise("b-desktop", "::1", 5432),
        ],
        ..Case::new(proxy(None, &[("tcp://[::1]:5432", db())]))
    };
    let d = case.run();
    assert_eq!(
        cond(&d, ACCEPTED).status,
        "True",
        "{:?}",
        cond(&d, ACCEPTED)
    );
    let refs: Vec<(String, Option<i32>)> = d.route.as_ref().unwrap().spec.rules[0]
        .backend_refs
        .iter()
        .map(|b| (b.name.clone(), b.port))
        .collect();
    let svc = |c: &str| label_name("ssh", &["ssh", "tcp", "0", c]);
    assert_eq!(
        refs,
        [
            (svc("a-laptop"), Some(5432)),
            (svc("b-desktop"), Some(5432))
        ]
    );
    assert_eq!(d.services.len(), 2);
    let slices: Vec<(String, String, Option<bool>)> = d
        .slices
        .iter()
        .map(|s| {
            (
                s.metadata.labels.as_ref().unwrap()["kubernetes.io/service-name"].clone(),
                s.metadata.annotations.as_ref().unwrap()[annotations::TUNNEL_TARGET].clone(),
                s.endpoints.as_ref().unwrap()[0]
                    .conditions
                    .as_ref()
                    .unwrap()
                    .ready,
            )
        })
        .collect();
    assert_eq!(
        slices,
        [
            (
                svc("a-laptop"),
                format!("{} ::1 5432", "01".repeat(32)),
                Some(true)
            ),
            (
                svc("b-desktop"),
                format!("{} ::1 5432", "02".repeat(32)),
                Some(false)
            ),
        ],
        "the target host without brackets, readiness per connector"
    );
    let ready = cond(&d, BACKENDS_READY);
    assert_eq!(
        (ready.status.as_str(), ready.message.as_str()),
        ("True", "1 of 2 backend(s) ready")
    );
    let none = Case {
        connectors: vec![connector("b-desktop", Some(2), false, &[("app", "db")])],
        ads: vec![advertise("b-desktop", "::1", 5432)],
        ..Case::new(proxy(None, &[("tcp://[::1]:5432", db())]))
    }
    .run();
    assert_eq!(
        status_of(&none, BACKENDS_READY),
        ("False".into(), NO_READY_BACKEND.into())
    );
    // A connector that has not reported its id yet: accepted, but nothing to dial.
    let unreported = Case {
        connectors: vec![connector("laptop", None, true, &[])],
        ..Case::new(ssh(None))
    }
    .run();
    assert_eq!(cond(&unreported, ACCEPTED).status, "True");
    assert!(
        unreported.route.as_ref().unwrap().spec.rules[0]
            .backend_refs
            .is_empty()
    );
    assert!(unreported.services.is_empty() && unreported.slices.is_empty());
    assert_eq!(
        status_of(&unreported, BACKENDS_READY),
        ("False".into(), NO_READY_BACKEND.into())
    );
}

#[test]
fn programmed_once_our_gateway_accepts_the_route() {
    let parent = |controller: &str, gateway: &str, accepted: bool| TcpRouteStatus {
        parents: vec![TcpRouteStatusParents {
            controller_name: controller.into(),
            parent_ref: TcpRouteStatusParentsParentRef {
                name: gateway.into(),
                section_name: Some(LISTENER.into()),
                ..Default::default()
            },
            conditions: vec![if accepted {
                condition("Accepted", true, "Accepted", "", Some(1))
            } else {
                condition(
                    "Accepted",
                    false,
                    "PortUnavailable",
                    "the edge cannot listen on 127.0.0.1:20022: address in use",
                    Some(1),
                )
            }],
        }],
    };
    // The gateway's own refusal is passed on, reason and words.
    let d = Case {
        route_status: Some(parent(CONTROLLER_NAME, "ssh.tcp", false)),
        ..Case::new(ssh(None))
    }
    .run();
    let c = cond(&d, PROGRAMMED);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "PortUnavailable")
    );
    assert!(c.message.contains("address in use"), "{}", c.message);
    let cases = [
        (Some(parent(CONTROLLER_NAME, "ssh.tcp", true)), true),
        (Some(parent("example.com/other", "ssh.tcp", true)), false),
        (Some(parent("example.com/other", "ssh.tcp", false)), false),
        (Some(parent(CONTROLLER_NAME, "other", true)), false),
        (None, false),
    ];
    for (route_status, programmed) in cases {
        let d = Case {
            route_status: route_status.clone(),
            ..Case::new(ssh(None))
        }
        .run();
        let c = cond(&d, PROGRAMMED);
        let want = if programmed {
            ("True", PROGRAMMED)
        } else {
            ("False", PENDING)
        };
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            want,
            "{route_status:?}"
        );
    }
}

#[test]
fn a_name_held_by_another_object_is_named() {
    let me = ssh(None);
    let owned_by = |kind: &str, uid: &str| ObjectMeta {
        name: Some("ssh".into()),
        owner_references: Some(vec![OwnerReference {
            kind: kind.into(),
            name: "ssh".into(),
            uid: uid.into(),
            controller: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let mine = owned_by("TCPProxy", "u-1");
    let http = owned_by("HTTPProxy", "u-2");
    let by_hand = ObjectMeta {
        name: Some("ssh".into()),
        ..Default::default()
    };
    assert_eq!(
        name_taken_by(&me, &[("Gateway", Some(&mine)), ("TCPRoute", None)]),
        None
    );
    assert_eq!(
        name_taken_by(&me, &[("Gateway", Some(&http)), ("TCPRoute", Some(&mine))]).as_deref(),
        Some("the Gateway p1/ssh belongs to the HTTPProxy ssh")
    );
    assert_eq!(
        name_taken_by(&me, &[("Gateway", None), ("TCPRoute", Some(&by_hand))]).as_deref(),
        Some("the TCPRoute p1/ssh exists and was not generated for this proxy")
    );
}

/// TLS passthrough: no port; a TLS listener in Passthrough mode on the shared port and a
/// TLSRoute for the spec names the proxy holds and has proven, then its canonical name;
/// a name another proxy holds refuses the proxy; one not proven yet is not routed and
/// Accepted says what to publish.
#[test]
fn a_passthrough_proxy_gets_a_tls_listener_and_route_for_its_names() {
    let mut p = ssh(None);
    p.spec.tls = Some(portway_api::TlsPassthrough {
        hostnames: vec!["db.example.com".into(), "new.example.org".into()],
        ..Default::default()
    });
    let case = Case::new(p);
    let run = |claimed: &dyn Fn(&str) -> Option<String>| {
        let pending = |h: &str| {
            if h == "new.example.org" {
                Verification::Pending {
                    instructions: "publish TXT".into(),
                    found: "nothing".into(),
                }
            } else {
                Verification::Verified("TXT".into())
            }
        };
        desired(&Inputs {
            proxy: &case.proxy,
            connectors: &case.connectors.iter().collect::<Vec<_>>(),
            advertisements: &case.ads.iter().collect::<Vec<_>>(),
            listen: Listen::Tls(TlsNames {
                canonical: Some("u-1.portway.localhost"),
                claimed_by: claimed,
                verification: Some(&pending),
            }),
            name_taken_by: None,
            route_status: None,
            config: &config(),
            now: NOW,
        })
    };
    let d = run(&|_| None);
    assert_eq!(status_of(&d, ACCEPTED), ("True".into(), ACCEPTED.into()));
    let accepted = &cond(&d, ACCEPTED).message;
    assert!(
        accepted.starts_with("TLS passthrough for db.example.com, u-1.portway.localhost:")
            && accepted.contains("new.example.org is not routed until this project proves it controls it: publish TXT"),
        "{accepted}"
    );
    assert_eq!(d.status.port, None);
    assert_eq!(
        d.status.hostnames,
        ["db.example.com", "u-1.portway.localhost"]
    );
    assert!(d.route.is_none());
    let listener = &d.gateway.as_ref().unwrap().spec.listeners[0];
    assert_eq!(
        serde_json::to_value(listener).unwrap(),
        json!({"name": "tls", "port": 443, "protocol": "TLS", "tls": {"mode": "Passthrough"},
               "allowedRoutes": {"kinds": [{"group": "gateway.networking.k8s.io", "kind": "TLSRoute"}]}})
    );
    let route = serde_json::to_value(d.tls_route.as_ref().unwrap()).unwrap();
    assert_eq!(route["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(
        route["spec"],
        json!({"hostnames": ["db.example.com", "u-1.portway.localhost"],
               "parentRefs": [{"name": "ssh.tcp", "sectionName": "tls"}],
               "rules": [{"backendRefs": [{"name": label_name("ssh", &["ssh", "tcp", "0", "laptop"]), "port": 22, "weight": 1}]}]})
    );
    assert_eq!(d.slices.len(), 1);

    let d = run(&|h| {
        (h == "db.example.com").then(|| "the HTTPProxy p1/web (as db.example.com)".into())
    });
    assert!(no_children(&d) && d.tls_route.is_none());
    assert_eq!(
        status_of(&d, ACCEPTED),
        ("False".into(), HOSTNAME_IN_USE.into())
    );
    assert_eq!(
        cond(&d, ACCEPTED).message,
        "spec.tls.hostnames[0]: db.example.com is already claimed by the HTTPProxy p1/web (as db.example.com); choose another hostname or delete the other claim"
    );
    assert!(d.status.hostnames.is_empty());
}

/// The zone's own name is Portway's: a passthrough proxy asking for it is refused.
#[test]
fn a_passthrough_proxy_may_not_take_the_zone_itself() {
    let mut p = ssh(None);
    p.spec.tls = Some(portway_api::TlsPassthrough {
        hostnames: vec!["Portway.Localhost.".into()],
        ..Default::default()
    });
    let case = Case::new(p);
    let d = desired(&Inputs {
        proxy: &case.proxy,
        connectors: &case.connectors.iter().collect::<Vec<_>>(),
        advertisements: &case.ads.iter().collect::<Vec<_>>(),
        listen: Listen::Tls(TlsNames {
            canonical: Some("u-1.portway.localhost"),
            claimed_by: &|_| None,
            verification: None,
        }),
        name_taken_by: None,
        route_status: None,
        config: &config(),
        now: NOW,
    });
    assert!(no_children(&d) && d.tls_route.is_none());
    assert_eq!(status_of(&d, ACCEPTED), ("False".into(), INVALID.into()));
    assert!(
        cond(&d, ACCEPTED).message.contains("is the zone itself"),
        "{}",
        cond(&d, ACCEPTED).message
    );
}

/// `udp://` backends: a UDP listener and a UDPRoute on the granted port; the target must
/// be advertised as UDP (a TCP advertisement of the same port does not do).
#[test]
fn udp_backends_get_a_udp_listener_and_route() {
    let mut case = Case::new(proxy(None, &[("udp://127.0.0.1:22", by_name("laptop"))]));
    let d = case.run();
    assert_eq!(
        status_of(&d, ACCEPTED),
        ("False".into(), NOT_ADVERTISED.into())
    );
    assert!(
        cond(&d, ACCEPTED)
            .message
            .contains("(it advertises 127.0.0.1:22)"),
        "{}",
        cond(&d, ACCEPTED).message
    );
    for ad in &mut case.ads {
        for l in &mut ad.spec.layer4 {
            for svc in &mut l.services {
                for p in &mut svc.ports {
                    p.protocol = portway_api::Protocol::Udp;
                }
            }
        }
    }
    let d = case.run();
    assert_eq!(status_of(&d, ACCEPTED), ("True".into(), ACCEPTED.into()));
    assert!(cond(&d, ACCEPTED).message.starts_with("UDP port 20022:"));
    let listener = &d.gateway.as_ref().unwrap().spec.listeners[0];
    assert_eq!(
        (
            listener.name.as_str(),
            listener.protocol.as_str(),
            listener.port
        ),
        ("udp", "UDP", 20022)
    );
    assert!(d.route.is_none() && d.tls_route.is_none());
    let route = serde_json::to_value(d.udp_route.as_ref().unwrap()).unwrap();
    assert_eq!(route["apiVersion"], "gateway.networking.k8s.io/v1alpha2");
    assert_eq!(route["kind"], "UDPRoute");
    assert_eq!(
        route["spec"]["parentRefs"],
        json!([{"name": "ssh.tcp", "sectionName": "udp"}])
    );
}
