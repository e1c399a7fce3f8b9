//! Every decision about a TCPProxy, as a pure function: which Gateway API objects it
//! needs and what its status says. No client and no clock (the time is an input); the
//! public port is the port index's verdict ([`super::ports`]), an input too.
//!
//! [`desired`] runs the steps in order: the port (or, in TLS passthrough, the names), the
//! backends (each through the connectors it names, to devices that advertise its target;
//! the HTTPProxy's rules, shared), then either a refusal (no objects) or the Gateway,
//! TCPRoute (TLSRoute), Services and EndpointSlices with the conditions of an accepted
//! proxy.

#[cfg(test)]
mod tests;

use gateway_api::apis::experimental::tcproutes::{
    TcpRoute, TcpRouteParentRefs, TcpRouteRules, TcpRouteRulesBackendRefs, TcpRouteSpec,
    TcpRouteStatus,
};
use gateway_api::apis::experimental::tlsroutes::{
    TlsRoute, TlsRouteParentRefs, TlsRouteRules, TlsRouteRulesBackendRefs, TlsRouteSpec,
};
use gateway_api::apis::experimental::udproutes::{
    UdpRoute, UdpRouteParentRefs, UdpRouteRules, UdpRouteRulesBackendRefs, UdpRouteSpec,
};
use gateway_api::apis::standard::gateways::{
    Gateway, GatewayListeners, GatewayListenersAllowedRoutes, GatewayListenersAllowedRoutesKinds,
    GatewayListenersTls, GatewayListenersTlsMode, GatewaySpec,
};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use portway_api::names::label_name;
use portway_api::{
    Connector, ConnectorAdvertisement, Protocol, Target, TcpProxy, TcpProxyStatus, annotations,
    labels,
};

use super::ports::Verdict;
use crate::proxy::desired::Config;
use crate::proxy::desired::backends::{Wanted, connector_ready, reachable_through};
use crate::proxy::desired::conditions::{
    Problem, Stamp, backends_ready, parent_accepted, programmed,
};
use crate::proxy::desired::render::{SidecarBackend, owned_meta, sidecar_service, sidecar_slices};
use crate::verify::Verification;

/// Condition types and reasons on TCPProxy: HTTPProxy's where they mean the same.
pub mod reasons {
    pub use crate::proxy::desired::reasons::{
        ACCEPTED, BACKENDS_READY, CONNECTOR_NOT_FOUND, INVALID, NO_READY_BACKEND, NOT_ADVERTISED,
        PENDING, PROGRAMMED,
    };
    /// `spec.port` is held by another TCPProxy.
    pub const PORT_IN_USE: &str = "PortInUse";
    /// `spec.port` is outside the edge's range.
    pub const PORT_NOT_ALLOWED: &str = "PortNotAllowed";
    /// No port was asked for and the range is used up.
    pub const NO_PORT_AVAILABLE: &str = "NoPortAvailable";
    /// The Gateway or TCPRoute the proxy would generate exists and belongs to another
    /// object (an HTTPProxy of the same name makes a Gateway of that name too).
    pub const NAME_IN_USE: &str = "NameInUse";
    pub use crate::proxy::desired::reasons::HOSTNAME_IN_USE;
}
use reasons::*;

/// The Gateway listener of every TCPProxy, and the TCPRoute's `sectionName`.
pub const LISTENER: &str = "tcp";
/// The Gateway listener of a UDP proxy (`udp://` backends), and its UDPRoute's
/// `sectionName`.
pub const UDP_LISTENER: &str = "udp";
/// The Gateway listener of a passthrough proxy, and its TLSRoute's `sectionName`.
pub const TLS_LISTENER: &str = "tls";
/// The port a passthrough listener names: the edge serves it on its TLS address,
/// whatever port that is (as HTTP listeners say 80).
pub const TLS_PORT: i32 = 443;

/// The name of a TCPProxy's Gateway and TCPRoute: `<proxy>.tcp`. HTTPProxy names are
/// DNS labels, without a dot, so an HTTPProxy's Gateway (named after it) never takes it.
pub fn child_name(proxy: &str) -> String {
    format!("{proxy}.{LISTENER}")
}

/// What the decision needs to know.
pub struct Inputs<'a> {
    pub proxy: &'a TcpProxy,
    /// Connectors in the proxy's namespace.
    pub connectors: &'a [&'a Connector],
    /// Advertisements in the proxy's namespace.
    pub advertisements: &'a [&'a ConnectorAdvertisement],
    /// How the proxy is reached: its port, or its names on the shared TLS port.
    pub listen: Listen<'a>,
    /// Who holds the Gateway or TCPRoute name this proxy's objects would take, when that
    /// is not this proxy (e.g. `the Gateway p1/web belongs to the HTTPProxy web`).
    pub name_taken_by: Option<&'a str>,
    /// The generated TCPRoute's (or TLSRoute's, of the same shape) status, as the gateway
    /// reported it.
    pub route_status: Option<&'a TcpRouteStatus>,
    /// The settings shared with HTTPProxies: gateway class, controller name, sidecars.
    pub config: &'a Config,
    /// Stamped on conditions as their transition time.
    pub now: Timestamp,
}

/// How a proxy is reached.
pub enum Listen<'a> {
    /// A port of its own, as the port index granted it (or why it did not).
    Port(&'a Verdict),
    /// TLS passthrough (`spec.tls`): names on the edge's shared TLS port.
    Tls(TlsNames<'a>),
}

/// What decides a passthrough proxy's names.
pub struct TlsNames<'a> {
    /// `<uid>.<zone>`, always the proxy's own.
    pub canonical: Option<&'a str>,
    /// Who holds a name, when not this proxy (another proxy of either kind).
    pub claimed_by: &'a dyn Fn(&str) -> Option<String>,
    /// Whether the project has proven a name; `None`: no proof is asked for.
    pub verification: Option<&'a dyn Fn(&str) -> Verification>,
}

/// The objects and status the proxy should have. Objects absent here must not exist.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub gateway: Option<Gateway>,
    pub route: Option<TcpRoute>,
    pub tls_route: Option<TlsRoute>,
    pub udp_route: Option<UdpRoute>,
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub status: TcpProxyStatus,
}

/// One backend through one connector.
struct Backend<'a> {
    /// Its index in `spec.backends`.
    index: usize,
    connector: &'a Connector,
    node_id: &'a str,
    target: Target,
}

impl Backend<'_> {
    fn connector_name(&self) -> &str {
        self.connector.metadata.name.as_deref().unwrap_or_default()
    }

    /// Stable per backend and connector; `tcp` keeps it apart from the Services of an
    /// HTTPProxy of the same name.
    fn service_name(&self, proxy: &str) -> String {
        label_name(
            proxy,
            &[proxy, "tcp", &self.index.to_string(), self.connector_name()],
        )
    }

    fn sidecar(&self, proxy: &str) -> SidecarBackend<'_> {
        SidecarBackend {
            service: self.service_name(proxy),
            connector: self.connector_name(),
            ready: connector_ready(self.connector),
            port: ("tcp", i32::from(self.target.port)),
        }
    }
}

/// Each backend through the connectors it names, to devices that advertise its target.
fn resolve<'a>(
    proxy: &TcpProxy,
    connectors: &[&'a Connector],
    advertisements: &[&ConnectorAdvertisement],
) -> (Vec<Backend<'a>>, Vec<Problem>) {
    let project = proxy.metadata.namespace.as_deref().unwrap_or_default();
    let mut resolved = Vec::new();
    let mut problems = Vec::new();
    for (i, b) in proxy.spec.backends.iter().enumerate() {
        let field = format!("spec.backends[{i}]");
        let (protocol, target) = match portway_api::validation::layer4_endpoint(&b.endpoint) {
            Ok(t) => t,
            Err(e) => {
                problems.push(Problem::new(INVALID, format!("{field}.endpoint: {e}")));
                continue;
            }
        };
        let (reachable, refused) = reachable_through(
            &field,
            Wanted {
                endpoint: &b.endpoint,
                target: &target,
                protocol,
            },
            Some(&b.connector),
            connectors,
            advertisements,
            project,
        );
        problems.extend(refused);
        resolved.extend(reachable.into_iter().map(|(connector, node_id)| Backend {
            index: i,
            connector,
            node_id,
            target: target.clone(),
        }));
    }
    (resolved, problems)
}

/// Decides the proxy's children and status.
pub fn desired(input: &Inputs<'_>) -> Desired {
    let proxy = input.proxy;
    let name = proxy.metadata.name.clone().unwrap_or_default();
    let stamp = Stamp {
        generation: proxy.metadata.generation,
        now: input.now,
    };
    // The port first: its refusal is the one that says the proxy lost its port. A
    // passthrough proxy's names come first likewise.
    let (verdict, names) = match &input.listen {
        Listen::Port(v) => (Some(*v), None),
        Listen::Tls(t) => (None, Some(tls_names(proxy, t, &input.config.zone))),
    };
    let port_problem = verdict
        .and_then(|v| v.as_ref().err())
        .map(|r| Problem::new(r.reason(), r.message()));
    let name_problems = names.iter().flat_map(|n| n.problems.clone());
    let taken = input.name_taken_by.map(|by| {
        Problem::new(
            NAME_IN_USE,
            format!("metadata.name: {by}: rename this TCPProxy"),
        )
    });
    // Objects stored before a validation rule existed are refused here too.
    let invalid = portway_api::validation::Validate::validate(proxy)
        .into_iter()
        .map(|e| Problem::new(INVALID, e.to_string()));
    // Only what a connector's device advertises may be routed to it.
    let (backends, backend_problems) = resolve(proxy, input.connectors, input.advertisements);
    let mut said = std::collections::HashSet::new();
    let problems: Vec<Problem> = port_problem
        .into_iter()
        .chain(name_problems)
        .chain(taken)
        .chain(invalid)
        .chain(backend_problems)
        // A stored endpoint that fails today's validation fails to resolve too.
        .filter(|p| said.insert(p.message.clone()))
        .collect();
    // A proxy refused for any other reason keeps its port: it is still its own.
    let mut status = TcpProxyStatus {
        conditions: Vec::new(),
        port: verdict.and_then(|v| v.as_ref().ok()).map(|p| i32::from(*p)),
        hostnames: Vec::new(),
        certificate: None,
    };
    // One protocol a proxy (validation refuses a mix): its backends'.
    let udp = proxy.spec.backends.first().is_some_and(|b| {
        portway_api::validation::layer4_endpoint(&b.endpoint).is_ok_and(|(p, _)| p == Protocol::Udp)
    });
    let listen = match (verdict, &names) {
        (Some(Ok(port)), _) if problems.is_empty() && udp => Listening::Udp(*port),
        (Some(Ok(port)), _) if problems.is_empty() => Listening::Port(*port),
        (None, Some(n)) if problems.is_empty() => Listening::Tls(n),
        // Any problem refuses the whole proxy: no children, so nothing half-works.
        _ => {
            status.conditions = refused(&problems, stamp);
            return Desired {
                status,
                ..Default::default()
            };
        }
    };
    let accepted_by_gateway = input.route_status.is_some_and(|s| {
        let parents = s.parents.iter().map(|p| {
            (
                p.controller_name.as_str(),
                p.parent_ref.name.as_str(),
                p.conditions.as_slice(),
            )
        });
        parent_accepted(parents, &input.config.controller_name, &child_name(&name))
    });
    // The gateway's refusal as it words it: a port another program holds on the edge is
    // `PortUnavailable`, with the bind error.
    let refusal = input.route_status.and_then(|s| {
        s.parents
            .iter()
            .filter(|p| {
                p.controller_name == input.config.controller_name
                    && p.parent_ref.name == child_name(&name)
            })
            .flat_map(|p| p.conditions.iter())
            .find(|c| c.type_ == "Accepted" && c.status == "False")
    });
    status.conditions = accepted(&backends, &listen, accepted_by_gateway, refusal, stamp);
    let meta = |child: String, extra: &[(&str, &str)]| -> ObjectMeta {
        owned_meta(proxy, labels::TCP_PROXY, child, extra)
    };
    let services = backends
        .iter()
        .map(|b| sidecar_service(&meta, &b.sidecar(&name)))
        .collect();
    let slices = backends
        .iter()
        .flat_map(|b| {
            // Where the edge sends the connections: TCPRoutes carry no filters, so the
            // device and target ride on the slices only the operator may write.
            let target = annotations::tunnel_target(b.node_id, &b.target);
            sidecar_slices(&meta, &b.sidecar(&name), &input.config.sidecars)
                .into_iter()
                .map(move |mut s| {
                    s.metadata.annotations =
                        Some([(annotations::TUNNEL_TARGET.to_owned(), target.clone())].into());
                    s
                })
        })
        .collect();
    let gateway = Some(gateway(
        meta(child_name(&name), &[]),
        &listen,
        &input.config.gateway_class,
    ));
    let (mut route, mut tls_route, mut udp_route) = (None, None, None);
    let (child, gw) = (meta(child_name(&name), &[]), child_name(&name));
    match &listen {
        Listening::Port(_) => route = Some(self::route(child, &gw, &name, &backends)),
        Listening::Udp(_) => udp_route = Some(self::udp_route(child, &gw, &name, &backends)),
        Listening::Tls(n) => {
            status.hostnames.clone_from(&n.active);
            tls_route = Some(self::tls_route(child, &gw, &name, &n.active, &backends));
        }
    }
    Desired {
        gateway,
        route,
        tls_route,
        udp_route,
        services,
        slices,
        status,
    }
}

/// How an accepted proxy listens.
enum Listening<'a> {
    Port(u16),
    Udp(u16),
    Tls(&'a Names),
}

/// A passthrough proxy's names, decided.
struct Names {
    /// Served: spec names it holds and has proven, then the canonical name.
    active: Vec<String>,
    /// Spec names waiting for proof, each with what to publish.
    pending: Vec<String>,
    /// Names another proxy holds: each refuses the proxy, so its status never claims a
    /// name that reaches someone else's device.
    problems: Vec<Problem>,
}

fn tls_names(proxy: &TcpProxy, t: &TlsNames<'_>, zone: &str) -> Names {
    let zone = zone.trim_end_matches('.').to_ascii_lowercase();
    let mut names = Names {
        active: Vec::new(),
        pending: Vec::new(),
        problems: Vec::new(),
    };
    let spec = proxy.spec.tls.iter().flat_map(|t| t.hostnames.iter());
    for (i, h) in spec.enumerate() {
        let h = h.trim_end_matches('.').to_ascii_lowercase();
        // The zone's own name is Portway's (as for HTTPProxy): no proxy holds it, so the
        // index could not refuse it.
        if h == zone {
            names.problems.push(Problem::new(
                INVALID,
                format!("spec.tls.hostnames[{i}]: {h} is the zone itself, which is Portway's; use a name below it"),
            ));
            continue;
        }
        if let Some(owner) = (t.claimed_by)(&h) {
            names.problems.push(Problem::new(
                HOSTNAME_IN_USE,
                format!("spec.tls.hostnames[{i}]: {h} is already claimed by {owner}; choose another hostname or delete the other claim"),
            ));
            continue;
        }
        match t.verification.map(|v| v(&h)) {
            Some(Verification::Pending {
                instructions,
                found,
            }) => names.pending.push(format!(
                "{h} is not routed until this project proves it controls it: {instructions} ({found})"
            )),
            _ => names.active.push(h),
        }
    }
    names
        .active
        .extend(t.canonical.map(str::to_ascii_lowercase));
    names
}

/// Who holds a name this proxy's objects would take, when that is not this proxy:
/// `objects` are the Gateway and TCPRoute of its name that exist, by kind. Applying ours
/// over another's would take it from its owner (an HTTPProxy of the same name makes a
/// Gateway of that name).
pub fn name_taken_by(proxy: &TcpProxy, objects: &[(&str, Option<&ObjectMeta>)]) -> Option<String> {
    let ns = proxy.metadata.namespace.as_deref().unwrap_or_default();
    objects.iter().find_map(|(kind, meta)| {
        let m = (*meta)?;
        let name = m.name.as_deref().unwrap_or_default();
        let controller = m
            .owner_references
            .iter()
            .flatten()
            .find(|r| r.controller == Some(true));
        match controller {
            Some(r) if proxy.metadata.uid.as_ref() == Some(&r.uid) => None,
            Some(r) => Some(format!(
                "the {kind} {ns}/{name} belongs to the {} {}",
                r.kind, r.name
            )),
            None => Some(format!(
                "the {kind} {ns}/{name} exists and was not generated for this proxy"
            )),
        }
    })
}

/// One listener: TCP on the granted port, taking TCPRoutes only; or TLS in passthrough
/// mode on the shared TLS port, taking TLSRoutes only.
fn gateway(metadata: ObjectMeta, listen: &Listening<'_>, class: &str) -> Gateway {
    let (name, port, protocol, kind, tls) = match listen {
        Listening::Port(p) => (LISTENER, i32::from(*p), "TCP", "TCPRoute", None),
        Listening::Udp(p) => (UDP_LISTENER, i32::from(*p), "UDP", "UDPRoute", None),
        Listening::Tls(_) => (
            TLS_LISTENER,
            TLS_PORT,
            "TLS",
            "TLSRoute",
            Some(GatewayListenersTls {
                mode: Some(GatewayListenersTlsMode::Passthrough),
                ..Default::default()
            }),
        ),
    };
    Gateway {
        metadata,
        spec: GatewaySpec {
            gateway_class_name: class.to_owned(),
            listeners: vec![GatewayListeners {
                name: name.into(),
                port,
                protocol: protocol.into(),
                tls,
                allowed_routes: Some(GatewayListenersAllowedRoutes {
                    kinds: Some(vec![GatewayListenersAllowedRoutesKinds {
                        group: Some("gateway.networking.k8s.io".into()),
                        kind: kind.into(),
                    }]),
                    namespaces: None,
                }),
                ..Default::default()
            }],
            ..Default::default()
        },
        status: None,
    }
}

/// Attached to the proxy's UDP listener; as [`route`].
fn udp_route(
    metadata: ObjectMeta,
    gateway: &str,
    name: &str,
    backends: &[Backend<'_>],
) -> UdpRoute {
    UdpRoute {
        metadata,
        spec: UdpRouteSpec {
            parent_refs: Some(vec![UdpRouteParentRefs {
                name: gateway.to_owned(),
                section_name: Some(UDP_LISTENER.into()),
                ..Default::default()
            }]),
            rules: vec![UdpRouteRules {
                backend_refs: backends
                    .iter()
                    .map(|b| UdpRouteRulesBackendRefs {
                        name: b.service_name(name),
                        port: Some(i32::from(b.target.port)),
                        weight: Some(1),
                        ..Default::default()
                    })
                    .collect(),
                name: None,
            }],
            use_default_gateways: None,
        },
        status: None,
    }
}

/// Attached to the proxy's passthrough listener, matching its names; as [`route`].
fn tls_route(
    metadata: ObjectMeta,
    gateway: &str,
    name: &str,
    hostnames: &[String],
    backends: &[Backend<'_>],
) -> TlsRoute {
    TlsRoute {
        metadata,
        spec: TlsRouteSpec {
            hostnames: hostnames.to_vec(),
            parent_refs: Some(vec![TlsRouteParentRefs {
                name: gateway.to_owned(),
                section_name: Some(TLS_LISTENER.into()),
                ..Default::default()
            }]),
            rules: vec![TlsRouteRules {
                backend_refs: backends
                    .iter()
                    .map(|b| TlsRouteRulesBackendRefs {
                        name: b.service_name(name),
                        port: Some(i32::from(b.target.port)),
                        weight: Some(1),
                        ..Default::default()
                    })
                    .collect(),
                name: None,
            }],
            use_default_gateways: None,
        },
        status: None,
    }
}

/// Attached to the proxy's Gateway; one rule, a backendRef per backend and connector.
fn route(metadata: ObjectMeta, gateway: &str, name: &str, backends: &[Backend<'_>]) -> TcpRoute {
    TcpRoute {
        metadata,
        spec: TcpRouteSpec {
            parent_refs: Some(vec![TcpRouteParentRefs {
                name: gateway.to_owned(),
                section_name: Some(LISTENER.into()),
                ..Default::default()
            }]),
            rules: vec![TcpRouteRules {
                backend_refs: backends
                    .iter()
                    .map(|b| TcpRouteRulesBackendRefs {
                        name: b.service_name(name),
                        port: Some(i32::from(b.target.port)),
                        weight: Some(1),
                        ..Default::default()
                    })
                    .collect(),
                name: None,
            }],
            use_default_gateways: None,
        },
        status: None,
    }
}

/// Every problem in `Accepted`'s message (so one read shows all that needs fixing), under
/// the first one's reason.
fn refused(problems: &[Problem], stamp: Stamp) -> Vec<Condition> {
    let reason = problems.first().map_or(INVALID, |p| p.reason);
    let message = problems
        .iter()
        .map(|p| p.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    vec![
        stamp.condition(ACCEPTED, false, reason, message),
        stamp.condition(
            PROGRAMMED,
            false,
            reason,
            "not programmed: the proxy is not accepted".into(),
        ),
        stamp.condition(
            BACKENDS_READY,
            false,
            reason,
            "no backend is used: the proxy is not accepted".into(),
        ),
    ]
}

/// The conditions of an accepted proxy.
fn accepted(
    backends: &[Backend<'_>],
    listen: &Listening<'_>,
    accepted_by_gateway: bool,
    refusal: Option<&Condition>,
    stamp: Stamp,
) -> Vec<Condition> {
    let ready = backends
        .iter()
        .filter(|b| connector_ready(b.connector))
        .count();
    let mut connectors: Vec<&str> = backends.iter().map(Backend::connector_name).collect();
    connectors.sort_unstable();
    connectors.dedup();
    let total = backends.len();
    let (at, pending) = match listen {
        Listening::Port(port) => (format!("port {port}"), String::new()),
        Listening::Udp(port) => (format!("UDP port {port}"), String::new()),
        Listening::Tls(n) => (
            format!("TLS passthrough for {}", n.active.join(", ")),
            n.pending.iter().map(|p| format!("; {p}")).collect(),
        ),
    };
    vec![
        stamp.condition(
            ACCEPTED,
            true,
            ACCEPTED,
            format!(
                "{at}: {total} backend(s) through {} connector(s), {ready} ready{pending}",
                connectors.len()
            ),
        ),
        match refusal {
            Some(c) if !accepted_by_gateway => stamp.condition(
                PROGRAMMED,
                false,
                &c.reason,
                format!("the gateway cannot serve the route: {}", c.message),
            ),
            _ => programmed(accepted_by_gateway, stamp),
        },
        // A backend exists only once its connector has reported its id.
        if total == 0 {
            stamp.condition(
                BACKENDS_READY,
                false,
                NO_READY_BACKEND,
                "no backend connector has reported its endpoint id yet, so connections are refused"
                    .into(),
            )
        } else {
            backends_ready(ready, total, "connections are refused", stamp)
        },
    ]
}
