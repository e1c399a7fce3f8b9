//! The Gateway and HTTPRoute status the route watcher owes, decided from cached objects
//! alone (no client, no async), so the rules are tested with tables.

use std::collections::HashMap;

use gateway_api::apis::experimental::tcproutes::TcpRoute;
use gateway_api::apis::experimental::tlsroutes::TlsRoute;
use gateway_api::apis::experimental::udproutes::UdpRoute;
use gateway_api::apis::standard::gateways::Gateway;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use portway_api::{condition, set_condition};
use serde_json::{Map, Value, json};

use super::Config;
use crate::model::{Attachment, Layer4Routes, RouteKind};

/// A route of a kind the edge serves, as its status is written.
#[derive(Clone, Copy, Debug)]
pub enum RouteRef<'a> {
    Http(&'a HttpRoute),
    Tcp(&'a TcpRoute),
    Tls(&'a TlsRoute),
    Udp(&'a UdpRoute),
}

impl<'a> From<&'a HttpRoute> for RouteRef<'a> {
    fn from(r: &'a HttpRoute) -> Self {
        Self::Http(r)
    }
}

impl<'a> From<&'a TcpRoute> for RouteRef<'a> {
    fn from(r: &'a TcpRoute) -> Self {
        Self::Tcp(r)
    }
}

impl<'a> From<&'a TlsRoute> for RouteRef<'a> {
    fn from(r: &'a TlsRoute) -> Self {
        Self::Tls(r)
    }
}

impl<'a> From<&'a UdpRoute> for RouteRef<'a> {
    fn from(r: &'a UdpRoute) -> Self {
        Self::Udp(r)
    }
}

/// A route by kind, namespace and name.
type RouteKey<'a> = (RouteKind, &'a str, &'a str);

/// One entry of a route's `status.parents`, whatever the route's kind.
struct Parent<'a> {
    controller: &'a str,
    gateway: &'a str,
    conditions: &'a [Condition],
    json: Value,
}

impl<'a> RouteRef<'a> {
    pub fn meta(&self) -> &'a ObjectMeta {
        match self {
            Self::Http(r) => &r.metadata,
            Self::Tcp(r) => &r.metadata,
            Self::Tls(r) => &r.metadata,
            Self::Udp(r) => &r.metadata,
        }
    }

    fn kind(&self) -> RouteKind {
        match self {
            Self::Http(_) => RouteKind::Http,
            Self::Tcp(_) => RouteKind::Tcp,
            Self::Tls(_) => RouteKind::Tls,
            Self::Udp(_) => RouteKind::Udp,
        }
    }

    fn parents(&self) -> Vec<Parent<'a>> {
        // The kinds' status types differ but have the same fields.
        macro_rules! parents {
            ($r:expr) => {
                $r.status
                    .iter()
                    .flat_map(|s| s.parents.iter())
                    .map(|p| Parent {
                        controller: &p.controller_name,
                        gateway: &p.parent_ref.name,
                        conditions: &p.conditions,
                        json: serde_json::to_value(p).unwrap_or_default(),
                    })
                    .collect()
            };
        }
        match self {
            Self::Http(r) => parents!(r),
            Self::Tcp(r) => parents!(r),
            Self::Tls(r) => parents!(r),
            Self::Udp(r) => parents!(r),
        }
    }
}

/// One status write, with the cached object it was decided from (the write is guarded on
/// that object's `resourceVersion`).
#[derive(Debug)]
pub enum StatusWrite<'a> {
    /// Our conditions on a Gateway of our class, and the fields we own beside them
    /// (`addresses`, `listeners`), which are written whole.
    Gateway {
        gateway: &'a Gateway,
        conditions: Vec<Condition>,
        rest: Map<String, Value>,
    },
    /// The route's whole `status`: our parent entry for each Gateway of ours it attaches
    /// to, other entries as they were.
    RouteParents {
        route: RouteRef<'a>,
        gateways: Vec<String>,
        /// Gateways whose listener for the route cannot serve it, and why.
        refused: HashMap<String, String>,
        status: Value,
    },
}

/// Every status write that the cached `gateways` and `routes` need, given the
/// `attachments` of the route table just built. An object whose status is already right
/// gets none.
pub fn desired<'a>(
    config: &Config,
    gateways: &[&'a Gateway],
    routes: &[&'a HttpRoute],
    l4: &Layer4Routes<'a>,
    attachments: &[Attachment],
) -> Vec<StatusWrite<'a>> {
    let mut attached: HashMap<(&str, &str), usize> = HashMap::new();
    for a in attachments {
        *attached.entry((&a.route_ns, &a.gateway)).or_default() += 1;
    }
    let binds = config.tcp_binds.as_ref().map(|b| b.borrow().clone());
    let udp_binds = config.udp_binds.as_ref().map(|b| b.borrow().clone());
    // A TCP (UDP) listener's state: `None` while its port has not been tried yet.
    let tcp_state = |l: &gateway_api::apis::standard::gateways::GatewayListeners| {
        let binds = match l.protocol.as_str() {
            "UDP" => udp_binds.as_ref()?,
            _ => binds.as_ref()?,
        };
        u16::try_from(l.port)
            .ok()
            .and_then(|p| binds.get(&p).cloned())
    };
    let mut writes: Vec<StatusWrite<'a>> = gateways
        .iter()
        .filter(|g| g.spec.gateway_class_name == config.class)
        .filter_map(|g| {
            let ns = g.metadata.namespace.as_deref().unwrap_or_default();
            let name = g.metadata.name.as_deref().unwrap_or_default();
            let count = attached.get(&(ns, name)).copied().unwrap_or(0);
            gateway_status(g, &config.addresses, count, &tcp_state)
        })
        .collect();

    // One write per route, naming all its Gateways: a write per attachment would race
    // with itself on a route attached twice.
    let by_key: HashMap<RouteKey, RouteRef<'a>> = routes
        .iter()
        .map(|r| RouteRef::Http(r))
        .chain(l4.tcp.iter().map(|r| RouteRef::Tcp(r)))
        .chain(l4.tls.iter().map(|r| RouteRef::Tls(r)))
        .chain(l4.udp.iter().map(|r| RouteRef::Udp(r)))
        .map(|r| {
            let meta = r.meta();
            let ns = meta.namespace.as_deref().unwrap_or_default();
            ((r.kind(), ns, meta.name.as_deref().unwrap_or_default()), r)
        })
        .collect();
    let mut per_route: Vec<(RouteKey, Vec<String>)> = Vec::new();
    for a in attachments {
        let key = (a.kind, a.route_ns.as_str(), a.route.as_str());
        match per_route.iter_mut().find(|(k, _)| *k == key) {
            Some((_, gws)) if !gws.contains(&a.gateway) => gws.push(a.gateway.clone()),
            Some(_) => {}
            None => per_route.push((key, vec![a.gateway.clone()])),
        }
    }
    let all_gateways = gateways;
    for (key, gateways) in per_route {
        let Some(route) = by_key.get(&key) else {
            continue;
        };
        // A TCPRoute is served once its port listens: refused with the bind error, not
        // reported at all before the port was tried.
        let mut refused = HashMap::new();
        let mut untried = false;
        let (bound, protocol) = match key.0 {
            RouteKind::Udp => (udp_binds.is_some(), "UDP"),
            _ => (binds.is_some(), "TCP"),
        };
        if matches!(key.0, RouteKind::Tcp | RouteKind::Udp) && bound {
            for gw in &gateways {
                let listeners = all_gateways
                    .iter()
                    .find(|g| {
                        g.metadata.namespace.as_deref() == Some(key.1)
                            && g.metadata.name.as_deref() == Some(gw.as_str())
                    })
                    .into_iter()
                    .flat_map(|g| g.spec.listeners.iter())
                    .filter(|l| l.protocol == protocol);
                for l in listeners {
                    match tcp_state(l) {
                        None => untried = true,
                        Some(Err(why)) => {
                            refused.insert(gw.clone(), why);
                        }
                        Some(Ok(())) => {}
                    }
                }
            }
        }
        if untried {
            continue;
        }
        // A passthrough route needs the edge's TLS port; a UDP one a data plane that
        // carries UDP.
        let cannot = match key.0 {
            RouteKind::Tls => config.no_tls_port.as_ref(),
            RouteKind::Udp => config.no_udp.as_ref(),
            _ => None,
        };
        if let Some(why) = cannot {
            for gw in &gateways {
                refused.insert(gw.clone(), why.clone());
            }
        }
        if let Some(status) = route_parents(*route, &config.controller_name, &gateways, &refused) {
            writes.push(StatusWrite::RouteParents {
                route: *route,
                gateways,
                refused,
                status,
            });
        }
    }
    writes
}

/// `Accepted` and `Programmed`, the published `addresses` and a `listeners` entry per
/// listener counting `attached` routes (a TCP listener whose port cannot be bound is not
/// programmed: `PortUnavailable`); `None` when the Gateway already says all that.
fn gateway_status<'a>(
    g: &'a Gateway,
    addresses: &[String],
    attached: usize,
    tcp_state: &dyn Fn(
        &gateway_api::apis::standard::gateways::GatewayListeners,
    ) -> Option<Result<(), String>>,
) -> Option<StatusWrite<'a>> {
    let generation = g.metadata.generation;
    let status = g.status.clone().unwrap_or_default();
    let ours = vec![
        condition(
            "Accepted",
            true,
            "Accepted",
            "served by the built-in edge",
            generation,
        ),
        condition(
            "Programmed",
            true,
            "Programmed",
            "routes are live",
            generation,
        ),
    ];
    let mut conditions = status.conditions.clone().unwrap_or_default();
    let mut changed = false;
    for c in &ours {
        changed |= set_condition(&mut conditions, c.clone());
    }
    let addresses: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"type": "IPAddress", "value": a}))
        .collect();
    let current_addresses =
        serde_json::to_value(status.addresses.clone().unwrap_or_default()).unwrap_or_default();
    let listeners: Vec<Value> = g
        .spec
        .listeners
        .iter()
        .map(|l| {
            let kind = match l.protocol.as_str() {
                "TCP" => "TCPRoute",
                "TLS" => "TLSRoute",
                "UDP" => "UDPRoute",
                _ => "HTTPRoute",
            };
            let programmed = match tcp_state(l) {
                Some(Err(why)) => condition("Programmed", false, "PortUnavailable", &why, generation),
                _ => condition("Programmed", true, "Programmed", "", generation),
            };
            json!({"name": l.name, "attachedRoutes": attached, "supportedKinds": [{"group": "gateway.networking.k8s.io", "kind": kind}],
                   "conditions": [condition("Accepted", true, "Accepted", "", generation), programmed]})
        })
        .collect();
    let programmed_of = |conditions: &[Condition]| {
        conditions
            .iter()
            .find(|c| c.type_ == "Programmed")
            .map(|c| (c.status.clone(), c.message.clone()))
    };
    let listeners_same = status.listeners.as_ref().is_some_and(|ls| {
        ls.len() == listeners.len()
            && ls.iter().zip(&listeners).all(|(l, want)| {
                let want: Vec<Condition> =
                    serde_json::from_value(want["conditions"].clone()).unwrap_or_default();
                l.attached_routes == attached as i32
                    && programmed_of(&l.conditions) == programmed_of(&want)
            })
    });
    if !changed && current_addresses == json!(addresses) && listeners_same {
        return None;
    }
    let mut rest = Map::new();
    rest.insert("addresses".into(), json!(addresses));
    rest.insert("listeners".into(), json!(listeners));
    Some(StatusWrite::Gateway {
        gateway: g,
        conditions: ours,
        rest,
    })
}

/// The route's `status` with our parent entry for each of `gateways` accepted, or `None`
/// when it already says so. Other controllers' entries, and ours for other Gateways, are
/// kept as they are.
pub(super) fn route_parents(
    route: RouteRef<'_>,
    controller: &str,
    gateways: &[String],
    refused: &HashMap<String, String>,
) -> Option<Value> {
    let parents = route.parents();
    let mine = |p: &Parent, gateway: &str| p.controller == controller && p.gateway == gateway;
    let generation = route.meta().generation;
    let ns = route.meta().namespace.clone().unwrap_or_default();
    let mut changed = false;
    let mut entries = Vec::new();
    for gateway in gateways {
        let existing = parents.iter().find(|p| mine(p, gateway));
        let mut conditions = existing.map(|p| p.conditions.to_vec()).unwrap_or_default();
        changed |= existing.is_none();
        let accepted = match refused.get(gateway) {
            // Gateway API's reason for a listener that cannot bind its port.
            Some(why) => condition("Accepted", false, "PortUnavailable", why, generation),
            None => condition("Accepted", true, "Accepted", "", generation),
        };
        changed |= set_condition(&mut conditions, accepted);
        changed |= set_condition(
            &mut conditions,
            condition("ResolvedRefs", true, "ResolvedRefs", "", generation),
        );
        entries.push(json!({
            "controllerName": controller,
            "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway, "namespace": ns},
            "conditions": conditions,
        }));
    }
    if !changed {
        return None;
    }
    let mut kept: Vec<Value> = parents
        .into_iter()
        .filter(|p| !gateways.iter().any(|g| mine(p, g)))
        .map(|p| p.json)
        .collect();
    kept.extend(entries);
    Some(json!({"parents": kept}))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = "portway.example/edge";
    const OTHER: &str = "other.example/controller";

    fn config() -> Config {
        Config {
            class: "portway".into(),
            controller_name: OURS.into(),
            addresses: vec!["10.0.0.1".into()],
            write_status: true,
            tcp_binds: None,
            no_tls_port: None,
            udp_binds: None,
            no_udp: None,
            leading: None,
        }
    }

    fn gateway(name: &str, class: &str, listeners: &[&str]) -> Gateway {
        let listeners: Vec<Value> = listeners
            .iter()
            .map(|l| json!({"name": l, "port": 80, "protocol": "HTTP"}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "p", "generation": 1, "resourceVersion": "1"},
            "spec": {"gatewayClassName": class, "listeners": listeners},
        }))
        .unwrap()
    }

    fn route(name: &str) -> HttpRoute {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "p", "generation": 1, "resourceVersion": "1"},
            "spec": {"parentRefs": [{"name": "gw"}]},
        }))
        .unwrap()
    }

    /// A TCPRoute on a TCP listener gets our parent entry, and the listener says it takes
    /// TCPRoutes.
    #[test]
    fn a_data_plane_without_udp_or_tls_refuses_those_routes() {
        let gw: Gateway = serde_json::from_value(json!({
            "metadata": {"name": "dns", "namespace": "p", "generation": 1, "resourceVersion": "1"},
            "spec": {"gatewayClassName": "portway", "listeners": [{"name": "udp", "port": 20053, "protocol": "UDP"}]},
        }))
        .unwrap();
        let route: UdpRoute = serde_json::from_value(json!({
            "metadata": {"name": "dns", "namespace": "p", "generation": 1, "resourceVersion": "1"},
            "spec": {"parentRefs": [{"name": "dns"}], "rules": [{"backendRefs": [{"name": "a", "port": 53}]}]},
        }))
        .unwrap();
        let attachments = [Attachment {
            kind: RouteKind::Udp,
            route_ns: "p".into(),
            route: "dns".into(),
            gateway: "dns".into(),
        }];
        let udp = [&route];
        let l4 = Layer4Routes {
            udp: &udp,
            ..Default::default()
        };
        let accepted = |config: &Config| -> Vec<(String, String)> {
            desired(config, &[&gw], &[], &l4, &attachments)
                .iter()
                .filter_map(|w| match w {
                    StatusWrite::RouteParents {
                        route: RouteRef::Udp(_),
                        status,
                        ..
                    } => {
                        let c = &status["parents"][0]["conditions"][0];
                        Some((c["status"].to_string(), c["message"].to_string()))
                    }
                    _ => None,
                })
                .collect()
        };
        assert_eq!(
            accepted(&config()),
            [("\"True\"".to_owned(), "\"\"".to_owned())]
        );
        let envoy = Config {
            no_udp: Some("Envoy does not carry UDP".into()),
            ..config()
        };
        assert_eq!(
            accepted(&envoy),
            [(
                "\"False\"".to_owned(),
                "\"Envoy does not carry UDP\"".to_owned()
            )]
        );
    }

    #[test]
    fn tcp_routes_get_parents_and_tcp_listeners_say_so() {
        let gw: Gateway = serde_json::from_value(json!({
            "metadata": {"name": "db", "namespace": "p", "generation": 1, "resourceVersion": "1"},
            "spec": {"gatewayClassName": "portway", "listeners": [{"name": "tcp", "port": 20001, "protocol": "TCP"}]},
        }))
        .unwrap();
        let route: TcpRoute = serde_json::from_value(json!({
            "metadata": {"name": "db", "namespace": "p", "generation": 1, "resourceVersion": "1"},
            "spec": {"parentRefs": [{"name": "db"}], "rules": [{"backendRefs": [{"name": "a", "port": 1}]}]},
        }))
        .unwrap();
        let attachments = [Attachment {
            kind: RouteKind::Tcp,
            route_ns: "p".into(),
            route: "db".into(),
            gateway: "db".into(),
        }];
        let tcp = [&route];
        let writes = desired(
            &config(),
            &[&gw],
            &[],
            &Layer4Routes {
                tcp: &tcp,
                ..Default::default()
            },
            &attachments,
        );
        let kinds: Vec<&Value> = writes
            .iter()
            .filter_map(|w| match w {
                StatusWrite::Gateway { rest, .. } => {
                    Some(&rest["listeners"][0]["supportedKinds"][0]["kind"])
                }
                _ => None,
            })
            .collect();
        assert_eq!(kinds, [&json!("TCPRoute")]);
        let parents: Vec<String> = writes
            .iter()
            .filter_map(|w| match w {
                StatusWrite::RouteParents {
                    route: RouteRef::Tcp(r),
                    status,
                    ..
                } => Some(format!(
                    "{}:{}",
                    r.metadata.name.as_deref().unwrap(),
                    status["parents"][0]["conditions"][0]["type"]
                )),
                _ => None,
            })
            .collect();
        assert_eq!(parents, ["db:\"Accepted\""]);

        // When this process binds the ports (the built-in edge): nothing is said of a port
        // not tried yet; one another program holds refuses the route and is not
        // programmed on the listener, with the bind error; one that listens is accepted.
        let with_binds = |binds: crate::tcp::Binds| {
            let (_tx, rx) = tokio::sync::watch::channel(binds);
            let config = Config {
                tcp_binds: Some(rx),
                no_tls_port: None,
                udp_binds: None,
                no_udp: None,
                ..config()
            };
            let tcp = [&route];
            let writes = desired(
                &config,
                &[&gw],
                &[],
                &Layer4Routes {
                    tcp: &tcp,
                    ..Default::default()
                },
                &attachments,
            );
            let route_accepted: Vec<(String, String)> = writes
                .iter()
                .filter_map(|w| match w {
                    StatusWrite::RouteParents { status, .. } => {
                        let c = &status["parents"][0]["conditions"][0];
                        Some((
                            c["status"].as_str()?.to_owned(),
                            c["reason"].as_str()?.to_owned(),
                        ))
                    }
                    _ => None,
                })
                .collect();
            let listener_programmed: Vec<String> = writes
                .iter()
                .filter_map(|w| match w {
                    StatusWrite::Gateway { rest, .. } => {
                        let c = &rest["listeners"][0]["conditions"][1];
                        Some(format!(
                            "{}/{}",
                            c["status"].as_str()?,
                            c["reason"].as_str()?
                        ))
                    }
                    _ => None,
                })
                .collect();
            (route_accepted, listener_programmed)
        };
        let (route_accepted, listener) = with_binds(Default::default());
        assert!(route_accepted.is_empty(), "{route_accepted:?}");
        assert_eq!(listener, ["True/Programmed"]);
        let (route_accepted, listener) =
            with_binds([(20001, Err("address in use".to_owned()))].into());
        assert_eq!(
            route_accepted,
            [("False".to_owned(), "PortUnavailable".to_owned())]
        );
        assert_eq!(listener, ["False/PortUnavailable"]);
        let (route_accepted, _) = with_binds([(20001, Ok(()))].into());
        assert_eq!(route_accepted, [("True".to_owned(), "Accepted".to_owned())]);
    }

    fn attach(route: &str, gateway: &str) -> Attachment {
        Attachment {
            kind: RouteKind::Http,
            route_ns: "p".into(),
            route: route.into(),
            gateway: gateway.into(),
        }
    }

    /// `route`'s status with one parent entry of `controller` for Gateway `gw`.
    fn with_parent(mut r: HttpRoute, controller: &str, gw: &str) -> HttpRoute {
        let mut status = serde_json::to_value(r.status.take().unwrap_or_default()).unwrap();
        status["parents"].as_array_mut().unwrap().push(json!({
            "controllerName": controller,
            "parentRef": {"name": gw},
            "conditions": [condition("Accepted", false, "NotAllowed", "", Some(1))],
        }));
        r.status = serde_json::from_value(status).unwrap();
        r
    }

    /// What a write says, short enough for a table.
    fn summary(w: &StatusWrite) -> String {
        match w {
            StatusWrite::Gateway {
                gateway,
                conditions,
                rest,
            } => {
                let types: Vec<_> = conditions.iter().map(|c| c.type_.as_str()).collect();
                let addresses: Vec<_> = rest["addresses"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a["value"].as_str().unwrap())
                    .collect();
                let attached: Vec<_> = rest["listeners"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| format!("{}={}", l["name"].as_str().unwrap(), l["attachedRoutes"]))
                    .collect();
                format!(
                    "gateway {} {types:?} addresses={addresses:?} listeners={attached:?}",
                    gateway.metadata.name.as_deref().unwrap()
                )
            }
            StatusWrite::RouteParents {
                route,
                gateways,
                status,
                ..
            } => {
                let parents: Vec<_> = status["parents"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| {
                        let accepted = p["conditions"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .find(|c| c["type"] == "Accepted")
                            .map(|c| c["status"].as_str().unwrap())
                            .unwrap_or("-");
                        format!(
                            "{}:{}:{accepted}",
                            p["controllerName"].as_str().unwrap(),
                            p["parentRef"]["name"].as_str().unwrap()
                        )
                    })
                    .collect();
                format!(
                    "route {} for {gateways:?} parents={parents:?}",
                    route.meta().name.as_deref().unwrap()
                )
            }
        }
    }

    /// The object as it would be once `w` is written.
    fn written_gateway(w: &StatusWrite) -> Gateway {
        let StatusWrite::Gateway {
            gateway,
            conditions,
            rest,
        } = w
        else {
            panic!("not a Gateway write")
        };
        let mut status = rest.clone();
        status.insert("conditions".into(), json!(conditions));
        let mut g = (*gateway).clone();
        g.status = serde_json::from_value(Value::Object(status)).unwrap();
        g
    }

    fn written_route(w: &StatusWrite) -> HttpRoute {
        let StatusWrite::RouteParents {
            route: RouteRef::Http(route),
            status,
            ..
        } = w
        else {
            panic!("not an HTTPRoute write")
        };
        let mut r = (*route).clone();
        r.status = serde_json::from_value(status.clone()).unwrap();
        r
    }

    /// One row: the cache and the route table's attachments → the writes, summarised.
    struct Case<'a> {
        what: &'a str,
        config: Config,
        gateways: Vec<&'a Gateway>,
        routes: Vec<&'a HttpRoute>,
        attachments: Vec<Attachment>,
        want: Vec<&'a str>,
    }

    fn check(cases: Vec<Case>) {
        for c in cases {
            let writes = desired(
                &c.config,
                &c.gateways,
                &c.routes,
                &Layer4Routes {
                    tcp: &[],
                    ..Default::default()
                },
                &c.attachments,
            );
            let got: Vec<String> = writes.iter().map(summary).collect();
            assert_eq!(got, c.want, "{}", c.what);
        }
    }

    #[test]
    fn writes_follow_class_attachments_and_other_controllers() {
        let gw = gateway("gw", "portway", &["http", "https"]);
        let foreign = gateway("foreign", "istio", &["http"]);
        let lonely = gateway("lonely", "portway", &["http"]);
        let (r1, r2) = (route("r1"), route("r2"));
        let shared = with_parent(route("shared"), OTHER, "gw");
        check(vec![
            Case {
                what: "a Gateway of another class is left alone",
                config: config(),
                gateways: vec![&foreign],
                routes: vec![],
                attachments: vec![],
                want: vec![],
            },
            Case {
                what: "every listener counts the routes attached to its Gateway",
                config: config(),
                gateways: vec![&gw, &foreign, &lonely],
                routes: vec![&r1, &r2],
                attachments: vec![attach("r1", "gw"), attach("r2", "gw")],
                want: vec![
                    r#"gateway gw ["Accepted", "Programmed"] addresses=["10.0.0.1"] listeners=["http=2", "https=2"]"#,
                    r#"gateway lonely ["Accepted", "Programmed"] addresses=["10.0.0.1"] listeners=["http=0"]"#,
                    r#"route r1 for ["gw"] parents=["portway.example/edge:gw:True"]"#,
                    r#"route r2 for ["gw"] parents=["portway.example/edge:gw:True"]"#,
                ],
            },
            Case {
                what: "another controller's parent entry for the same Gateway is kept",
                config: config(),
                gateways: vec![&gw],
                routes: vec![&shared],
                attachments: vec![attach("shared", "gw")],
                want: vec![
                    r#"gateway gw ["Accepted", "Programmed"] addresses=["10.0.0.1"] listeners=["http=1", "https=1"]"#,
                    r#"route shared for ["gw"] parents=["other.example/controller:gw:False", "portway.example/edge:gw:True"]"#,
                ],
            },
            Case {
                what: "a route attached to two Gateways gets one write naming both",
                config: config(),
                gateways: vec![],
                routes: vec![&r1],
                attachments: vec![
                    attach("r1", "gw"),
                    attach("r1", "lonely"),
                    attach("r1", "gw"),
                ],
                want: vec![
                    r#"route r1 for ["gw", "lonely"] parents=["portway.example/edge:gw:True", "portway.example/edge:lonely:True"]"#,
                ],
            },
            Case {
                what: "an attachment whose route is not cached is skipped",
                config: config(),
                gateways: vec![],
                routes: vec![],
                attachments: vec![attach("gone", "gw")],
                want: vec![],
            },
        ]);
    }

    #[test]
    fn written_status_needs_no_second_write_until_something_changes() {
        let gw = gateway("gw", "portway", &["http"]);
        let r = with_parent(route("r"), OTHER, "gw");
        let attached = || vec![attach("r", "gw")];
        let writes = desired(
            &config(),
            &[&gw],
            &[&r],
            &Layer4Routes {
                tcp: &[],
                ..Default::default()
            },
            &attached(),
        );
        let (gw, r) = (written_gateway(&writes[0]), written_route(&writes[1]));
        let mut moved = config();
        moved.addresses = vec!["10.0.0.2".into()];
        let mut newer = gw.clone();
        newer.metadata.generation = Some(2);
        let mut newer_route = r.clone();
        newer_route.metadata.generation = Some(2);
        check(vec![
            Case {
                what: "unchanged status → no write",
                config: config(),
                gateways: vec![&gw],
                routes: vec![&r],
                attachments: attached(),
                want: vec![],
            },
            Case {
                what: "new addresses",
                config: moved,
                gateways: vec![&gw],
                routes: vec![&r],
                attachments: attached(),
                want: vec![
                    r#"gateway gw ["Accepted", "Programmed"] addresses=["10.0.0.2"] listeners=["http=1"]"#,
                ],
            },
            Case {
                what: "a route detached",
                config: config(),
                gateways: vec![&gw],
                routes: vec![&r],
                attachments: vec![],
                want: vec![
                    r#"gateway gw ["Accepted", "Programmed"] addresses=["10.0.0.1"] listeners=["http=0"]"#,
                ],
            },
            Case {
                what: "a new Gateway generation",
                config: config(),
                gateways: vec![&newer],
                routes: vec![&r],
                attachments: attached(),
                want: vec![
                    r#"gateway gw ["Accepted", "Programmed"] addresses=["10.0.0.1"] listeners=["http=1"]"#,
                ],
            },
            Case {
                what: "a new route generation",
                config: config(),
                gateways: vec![&gw],
                routes: vec![&newer_route],
                attachments: attached(),
                want: vec![
                    r#"route r for ["gw"] parents=["other.example/controller:gw:False", "portway.example/edge:gw:True"]"#,
                ],
            },
        ]);
    }

    #[test]
    fn our_entry_for_another_gateway_is_kept() {
        let r = with_parent(route("r"), OURS, "old");
        let status =
            route_parents(RouteRef::Http(&r), OURS, &["gw".into()], &HashMap::new()).unwrap();
        let names: Vec<_> = status["parents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["parentRef"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["old", "gw"]);
    }
}
