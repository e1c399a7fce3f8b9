//! Every decision about an HTTPProxy, as a pure function: which Gateway API objects it
//! needs and what its status says. No client, no clock (the time is an input).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use gateway_api::apis::standard::gateways::{
    Gateway, GatewayListeners, GatewaySpec, GatewayStatusAddresses,
};
use gateway_api::apis::standard::httproutes::{
    HttpRoute, HttpRouteParentRefs, HttpRouteRules, HttpRouteRulesBackendRefs,
    HttpRouteRulesBackendRefsFilters, HttpRouteRulesBackendRefsFiltersRequestHeaderModifier,
    HttpRouteRulesBackendRefsFiltersRequestHeaderModifierSet, HttpRouteRulesBackendRefsFiltersType,
    HttpRouteSpec, HttpRouteStatus,
};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{
    Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use portway_api::{
    BackendTrafficPolicy, BackendTrafficPolicySpec, Connector, ConnectorAdvertisement,
    HostnameStatus, HttpProxy, HttpProxyStatus, PolicyTargetReference, ProtocolUpgradeConfig,
    Target, condition_at, headers, is_condition_true, labels, managers, selector_matches,
};

/// Condition types and reasons on HTTPProxy.
pub mod reasons {
    pub const ACCEPTED: &str = "Accepted";
    pub const PROGRAMMED: &str = "Programmed";
    pub const METADATA: &str = "ConnectorMetadataProgrammed";
    pub const HOSTNAMES_IN_USE: &str = "HostnamesInUse";
    pub const HOSTNAME_IN_USE: &str = "HostnameInUse";
    pub const INVALID: &str = "Invalid";
    pub const CONNECTOR_NOT_FOUND: &str = "ConnectorNotFound";
    pub const NOT_ADVERTISED: &str = "BackendNotAdvertised";
    pub const PENDING: &str = "Pending";
}
use reasons::*;

/// Settings that are the same for every proxy.
#[derive(Clone, Debug)]
pub struct Config {
    /// The sidecar addresses the EndpointSlices list.
    pub sidecars: Vec<SocketAddr>,
    /// Canonical hostnames are `<uid>.<zone>`.
    pub zone: String,
    /// GatewayClass of the generated Gateways.
    pub gateway_class: String,
    /// The controller name written into route status parents by our gateway.
    pub controller_name: String,
}

/// What the decision needs to know.
pub struct Inputs<'a> {
    pub proxy: &'a HttpProxy,
    /// Connectors in the proxy's namespace.
    pub connectors: &'a [&'a Connector],
    /// Advertisements in the proxy's namespace.
    pub advertisements: &'a [&'a ConnectorAdvertisement],
    /// For a hostname, who owns it if this proxy may not have it (see `hostnames`).
    pub claimed_by: &'a dyn Fn(&str) -> Option<String>,
    /// The generated HTTPRoute's status, as the gateway reported it.
    pub route_status: Option<&'a HttpRouteStatus>,
    /// The generated Gateway's addresses, as the gateway reported them.
    pub gateway_addresses: &'a [GatewayStatusAddresses],
    pub config: &'a Config,
    /// Stamped on conditions as their transition time.
    pub now: Timestamp,
}

/// The objects and status the proxy should have. Objects absent here must not exist.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub gateway: Option<Gateway>,
    pub route: Option<HttpRoute>,
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub policy: Option<BackendTrafficPolicy>,
    pub status: HttpProxyStatus,
}

/// FNV-1a: a stable hash for generated names (std's hasher may change between releases).
fn fnv(parts: &[&str]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// A DNS label (Service names must be one) from `base` plus a hash of `parts`.
pub fn label_name(base: &str, parts: &[&str]) -> String {
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let prefix: String = cleaned.chars().take(54).collect();
    format!("{}-{:08x}", prefix.trim_end_matches('-'), fnv(parts))
}

/// A listener name for a hostname: a DNS label, stable per hostname.
fn listener_name(hostname: &str) -> String {
    label_name(&hostname.replace('*', "wildcard"), &[hostname])
}

/// A backend endpoint URL, reduced to what the sidecar dials: where, and which scheme.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub target: Target,
    pub proto: String,
}

/// # Errors
/// A sentence saying why the endpoint cannot be used.
pub fn parse_endpoint(endpoint: &str) -> Result<Endpoint, String> {
    let url = portway_api::validation::http_url(endpoint, false)?;
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        Some(h) => h.to_string(),
        None => return Err(format!("{endpoint:?} has no host")),
    };
    let port = url
        .port_or_known_default()
        .ok_or_else(|| format!("{endpoint:?} has no port"))?;
    Ok(Endpoint {
        target: Target { host, port },
        proto: url.scheme().to_owned(),
    })
}

fn connector_ready(c: &Connector) -> bool {
    c.status
        .as_ref()
        .is_some_and(|s| is_condition_true(&s.conditions, "Ready"))
}

/// One resolved backend: a (rule, backend) pair through one connector.
struct BackendRef<'a> {
    rule: usize,
    backend: usize,
    connector: &'a Connector,
    node_id: &'a str,
    endpoint: Endpoint,
}

fn owner(proxy: &HttpProxy) -> Option<Vec<OwnerReference>> {
    proxy.controller_owner_ref(&()).map(|o| vec![o])
}

fn child_meta(proxy: &HttpProxy, name: String, extra_labels: &[(&str, &str)]) -> ObjectMeta {
    let mut l = BTreeMap::from([
        (labels::MANAGED_BY.to_owned(), managers::OPERATOR.to_owned()),
        (
            labels::PROXY.to_owned(),
            proxy.metadata.name.clone().unwrap_or_default(),
        ),
    ]);
    l.extend(
        extra_labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    ObjectMeta {
        name: Some(name),
        namespace: proxy.metadata.namespace.clone(),
        labels: Some(l),
        owner_references: owner(proxy),
        ..Default::default()
    }
}

/// Decides the proxy's children and status.
pub fn desired(input: &Inputs<'_>) -> Desired {
    let proxy = input.proxy;
    let name = proxy.metadata.name.clone().unwrap_or_default();
    let generation = proxy.metadata.generation;
    let cond = |t: &str, ok: bool, reason: &str, msg: String| {
        condition_at(t, ok, reason, msg, generation, input.now)
    };
    let canonical = proxy
        .metadata
        .uid
        .as_ref()
        .map(|uid| format!("{uid}.{}", input.config.zone));

    // Hostnames: a name another proxy owns refuses the whole proxy, so its status never
    // claims a URL that serves someone else's app.
    let mut hostname_statuses = Vec::new();
    let mut active: Vec<String> = Vec::new();
    let mut in_use = Vec::new();
    for h in &proxy.spec.hostnames {
        let h = h.to_ascii_lowercase();
        let claim = (input.claimed_by)(&h);
        let c = match &claim {
            Some(other) => cond(
                HOSTNAMES_IN_USE,
                true,
                HOSTNAME_IN_USE,
                format!("{h} is already claimed by {other}"),
            ),
            None => cond(
                HOSTNAMES_IN_USE,
                false,
                "HostnameAvailable",
                format!("{h} is routed to this proxy"),
            ),
        };
        hostname_statuses.push(HostnameStatus {
            hostname: h.clone(),
            conditions: vec![c],
        });
        match claim {
            Some(other) => in_use.push(format!("{h} is already claimed by {other}")),
            None => active.push(h),
        }
    }
    if let Some(c) = &canonical {
        active.push(c.clone());
    }
    let in_use_condition = if in_use.is_empty() {
        cond(
            HOSTNAMES_IN_USE,
            false,
            "NoConflicts",
            "all hostnames are available".into(),
        )
    } else {
        cond(
            HOSTNAMES_IN_USE,
            true,
            "HostnamesInUse",
            format!("hostnames already claimed: {}", in_use.join(", ")),
        )
    };

    // Backends: resolve connectors, check endpoints and advertisements.
    let mut errors: Vec<(&'static str, String)> = in_use
        .iter()
        .map(|u| {
            (
                HOSTNAME_IN_USE,
                format!("spec.hostnames: {u}; choose another hostname or delete the other claim"),
            )
        })
        .collect();
    // Objects stored before a validation rule existed (a reserved header in a filter,
    // say) are refused here too, never half-applied.
    errors.extend(
        portway_api::validation::Validate::validate(proxy)
            .into_iter()
            .map(|e| (INVALID, e.to_string())),
    );
    let mut refs: Vec<BackendRef<'_>> = Vec::new();
    for (i, rule) in proxy.spec.rules.iter().enumerate() {
        for (j, backend) in rule.backends.iter().enumerate() {
            let field = format!("spec.rules[{i}].backends[{j}]");
            let endpoint = match parse_endpoint(&backend.endpoint) {
                Ok(e) => e,
                Err(e) => {
                    errors.push((INVALID, format!("{field}.endpoint: {e}")));
                    continue;
                }
            };
            let matched: Vec<&Connector> = match &backend.connector {
                None => {
                    errors.push((
                        INVALID,
                        format!(
                            "{field}.connector: a backend needs a connector (by name or selector)"
                        ),
                    ));
                    continue;
                }
                Some(r) => match (&r.name, &r.selector) {
                    (Some(n), None) => input
                        .connectors
                        .iter()
                        .copied()
                        .filter(|c| c.metadata.name.as_deref() == Some(n))
                        .collect(),
                    (None, Some(sel))
                        if sel.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
                            && sel.match_expressions.as_ref().is_none_or(Vec::is_empty) =>
                    {
                        errors.push((INVALID, format!("{field}.connector.selector: an empty selector would select every connector")));
                        continue;
                    }
                    (None, Some(sel)) => {
                        let mut m: Vec<&Connector> = input
                            .connectors
                            .iter()
                            .copied()
                            .filter(|c| selector_matches(sel, c.metadata.labels.as_ref()))
                            .collect();
                        m.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
                        m
                    }
                    _ => {
                        errors.push((
                            INVALID,
                            format!("{field}.connector: set exactly one of name or selector"),
                        ));
                        continue;
                    }
                },
            };
            let matched: Vec<&Connector> = matched
                .into_iter()
                .filter(|c| c.metadata.deletion_timestamp.is_none())
                .collect();
            if matched.is_empty() {
                let what = match backend.connector.as_ref().and_then(|r| r.name.clone()) {
                    Some(n) => format!("connector {n:?} does not exist"),
                    None => "no connector matches the selector".into(),
                };
                errors.push((
                    CONNECTOR_NOT_FOUND,
                    format!(
                        "{field}: {what} in project {}",
                        proxy.metadata.namespace.as_deref().unwrap_or_default()
                    ),
                ));
                continue;
            }
            for c in matched {
                let cname = c.metadata.name.as_deref().unwrap_or_default();
                let ads: Vec<_> = input
                    .advertisements
                    .iter()
                    .filter(|a| {
                        a.spec.connector_ref.name == cname
                            && a.metadata.deletion_timestamp.is_none()
                    })
                    .collect();
                let allowed = c.connect_tcp_enabled()
                    && ads.iter().any(|a| {
                        a.spec.allows(
                            &endpoint.target.host,
                            endpoint.target.port,
                            portway_api::Protocol::Tcp,
                        )
                    });
                if !allowed {
                    let offered: BTreeSet<String> = ads
                        .iter()
                        .flat_map(|a| a.spec.layer4.iter().flat_map(|l| l.services.iter()))
                        .flat_map(|s| {
                            s.ports
                                .iter()
                                .map(move |p| format!("{}:{}", s.address, p.port))
                        })
                        .collect();
                    let offered = if offered.is_empty() {
                        "nothing".to_owned()
                    } else {
                        offered.into_iter().collect::<Vec<_>>().join(", ")
                    };
                    errors.push((
                        NOT_ADVERTISED,
                        format!("{field}: endpoint {} is not advertised by connector {cname} (it advertises {offered})", backend.endpoint),
                    ));
                    continue;
                }
                // A connector that has not reported its id cannot be dialed yet; it gets no
                // backend until it does (requests meet 503 meanwhile).
                if let Some(node_id) = c.endpoint_id() {
                    refs.push(BackendRef {
                        rule: i,
                        backend: j,
                        connector: c,
                        node_id,
                        endpoint: endpoint.clone(),
                    });
                }
            }
        }
    }

    let mut status = HttpProxyStatus {
        conditions: Vec::new(),
        hostname_statuses,
        canonical_hostname: canonical,
        addresses: input.gateway_addresses.to_vec(),
    };
    if let Some((reason, _)) = errors.first() {
        let message = errors
            .iter()
            .map(|(_, m)| m.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        status.conditions = vec![
            cond(ACCEPTED, false, reason, message),
            cond(
                PROGRAMMED,
                false,
                reason,
                "not programmed: the proxy is not accepted".into(),
            ),
            cond(
                METADATA,
                false,
                reason,
                "not programmed: the proxy is not accepted".into(),
            ),
            in_use_condition,
        ];
        return Desired {
            status,
            ..Default::default()
        };
    }

    let ns = proxy.metadata.namespace.clone().unwrap_or_default();
    let gateway = Gateway {
        metadata: child_meta(proxy, name.clone(), &[]),
        spec: GatewaySpec {
            gateway_class_name: input.config.gateway_class.clone(),
            listeners: active
                .iter()
                .map(|h| GatewayListeners {
                    name: listener_name(h),
                    hostname: Some(h.clone()),
                    port: 80,
                    protocol: "HTTP".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        },
        status: None,
    };

    let mut services = Vec::new();
    let mut slices = Vec::new();
    let mut rules: Vec<HttpRouteRules> = proxy
        .spec
        .rules
        .iter()
        .map(|r| HttpRouteRules {
            name: r.name.clone(),
            matches: Some(r.matches.clone()),
            filters: (!r.filters.is_empty()).then(|| r.filters.clone()),
            backend_refs: Some(Vec::new()),
            ..Default::default()
        })
        .collect();
    let mut groups: BTreeMap<(bool, u16), Vec<SocketAddr>> = BTreeMap::new();
    for s in &input.config.sidecars {
        groups.entry((s.is_ipv6(), s.port())).or_default().push(*s);
    }
    for r in &refs {
        let cname = r.connector.metadata.name.as_deref().unwrap_or_default();
        let svc_name = label_name(
            &name,
            &[&name, &r.rule.to_string(), &r.backend.to_string(), cname],
        );
        let ready = connector_ready(r.connector);
        let extra = [("portway.dev/connector", cname)];
        services.push(Service {
            metadata: child_meta(proxy, svc_name.clone(), &extra),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        });
        for ((v6, port), addrs) in &groups {
            let family = if *v6 { "IPv6" } else { "IPv4" };
            let slice_name = format!("{svc_name}-{}{port}", if *v6 { "v6-" } else { "" });
            slices.push(EndpointSlice {
                metadata: child_meta(
                    proxy,
                    slice_name,
                    &[
                        ("kubernetes.io/service-name", &svc_name),
                        ("endpointslice.kubernetes.io/managed-by", managers::OPERATOR),
                        ("portway.dev/connector", cname),
                    ],
                ),
                address_type: family.into(),
                endpoints: Some(
                    addrs
                        .iter()
                        .map(|a| SliceEndpoint {
                            addresses: vec![a.ip().to_string()],
                            conditions: Some(EndpointConditions {
                                ready: Some(ready),
                                serving: Some(ready),
                                terminating: Some(false),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ports: Some(vec![EndpointPort {
                    name: Some("http".into()),
                    port: Some(i32::from(*port)),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
            });
        }
        let set = |n: &str, v: String| HttpRouteRulesBackendRefsFiltersRequestHeaderModifierSet {
            name: n.into(),
            value: v,
        };
        let mut filters = vec![HttpRouteRulesBackendRefsFilters {
            r#type: HttpRouteRulesBackendRefsFiltersType::RequestHeaderModifier,
            request_header_modifier: Some(HttpRouteRulesBackendRefsFiltersRequestHeaderModifier {
                set: Some(vec![
                    set(headers::NODE_ID, r.node_id.to_owned()),
                    set(headers::TARGET_HOST, r.endpoint.target.host.clone()),
                    set(headers::TARGET_PORT, r.endpoint.target.port.to_string()),
                    set(headers::TARGET_PROTO, r.endpoint.proto.clone()),
                ]),
                ..Default::default()
            }),
            ..Default::default()
        }];
        filters.extend(
            proxy.spec.rules[r.rule].backends[r.backend]
                .filters
                .iter()
                .cloned(),
        );
        if let Some(list) = rules[r.rule].backend_refs.as_mut() {
            list.push(HttpRouteRulesBackendRefs {
                name: svc_name,
                namespace: None,
                group: Some(String::new()),
                kind: Some("Service".into()),
                port: Some(80),
                weight: Some(1),
                filters: Some(filters),
            });
        }
    }
    for r in &mut rules {
        if r.backend_refs.as_ref().is_some_and(Vec::is_empty) {
            r.backend_refs = None;
        }
    }
    let route = HttpRoute {
        metadata: child_meta(proxy, name.clone(), &[]),
        spec: HttpRouteSpec {
            parent_refs: Some(vec![HttpRouteParentRefs {
                group: Some("gateway.networking.k8s.io".into()),
                kind: Some("Gateway".into()),
                name: name.clone(),
                namespace: Some(ns),
                ..Default::default()
            }]),
            hostnames: Some(active),
            rules: Some(rules),
        },
        status: None,
    };
    let policy = BackendTrafficPolicy {
        metadata: child_meta(proxy, name.clone(), &[]),
        spec: BackendTrafficPolicySpec {
            target_refs: vec![PolicyTargetReference {
                group: "gateway.networking.k8s.io".into(),
                kind: "HTTPRoute".into(),
                name: name.clone(),
                section_name: None,
            }],
            http_upgrade: vec![
                ProtocolUpgradeConfig {
                    type_: "websocket".into(),
                    connect: None,
                },
                ProtocolUpgradeConfig {
                    type_: "CONNECT".into(),
                    connect: None,
                },
            ],
            timeout: None,
        },
        status: None,
    };

    let accepted_by_gateway = input.route_status.is_some_and(|s| {
        s.parents.iter().any(|p| {
            p.controller_name == input.config.controller_name
                && p.parent_ref.name == name
                && p.conditions
                    .iter()
                    .any(|c| c.type_ == "Accepted" && c.status == "True")
        })
    });
    let ready_backends = refs.iter().filter(|r| connector_ready(r.connector)).count();
    status.conditions = vec![
        cond(
            ACCEPTED,
            true,
            ACCEPTED,
            format!(
                "{} backend(s) through {} connector(s), {ready_backends} ready",
                refs.len(),
                refs.iter()
                    .map(|r| r.connector.metadata.name.as_deref())
                    .collect::<BTreeSet<_>>()
                    .len()
            ),
        ),
        if accepted_by_gateway {
            cond(
                PROGRAMMED,
                true,
                PROGRAMMED,
                "the gateway accepted the route".into(),
            )
        } else {
            cond(
                PROGRAMMED,
                false,
                PENDING,
                "waiting for the gateway to accept the route".into(),
            )
        },
        if refs.is_empty() {
            cond(
                METADATA,
                false,
                PENDING,
                "no backend connector has reported its endpoint id yet".into(),
            )
        } else {
            cond(
                METADATA,
                true,
                METADATA,
                "datum-node-id and datum-target-* headers are set on every backend".into(),
            )
        },
        in_use_condition,
    ];
    Desired {
        gateway: Some(gateway),
        route: Some(route),
        services,
        slices,
        policy: Some(policy),
        status,
    }
}

/// Conditions: the proxy's current list with `desired` merged in, keeping transition
/// times of unchanged statuses.
pub fn merged_conditions(current: &[Condition], desired: &[Condition]) -> Vec<Condition> {
    let mut out = current.to_vec();
    for c in desired {
        portway_api::set_condition(&mut out, c.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_api::apis::standard::httproutes::{
        HttpRouteStatusParents, HttpRouteStatusParentsParentRef,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use portway_api::*;

    fn config() -> Config {
        Config {
            sidecars: vec![
                "127.0.0.1:4001".parse().unwrap(),
                "10.0.0.2:4001".parse().unwrap(),
            ],
            zone: "portway.localhost".into(),
            gateway_class: "portway".into(),
            controller_name: CONTROLLER_NAME.into(),
        }
    }

    fn connector(name: &str, id: Option<u8>, ready: bool, labels: &[(&str, &str)]) -> Connector {
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

    fn advertise(connector: &str, address: &str, port: i32) -> ConnectorAdvertisement {
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

    fn proxy(
        hostnames: &[&str],
        endpoint: &str,
        connector: Option<ConnectorReference>,
    ) -> HttpProxy {
        let mut p = HttpProxy::new(
            "web",
            HttpProxySpec {
                hostnames: hostnames.iter().map(|h| h.to_string()).collect(),
                rules: vec![HttpProxyRule {
                    matches: default_matches(),
                    backends: vec![HttpProxyBackend {
                        endpoint: endpoint.into(),
                        connector,
                        filters: vec![],
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

    fn by_name(n: &str) -> Option<ConnectorReference> {
        Some(ConnectorReference {
            name: Some(n.into()),
            selector: None,
        })
    }

    fn by_labels(l: &[(&str, &str)]) -> Option<ConnectorReference> {
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
    const NOW: Timestamp = Timestamp::UNIX_EPOCH;

    struct Case<'a> {
        proxy: HttpProxy,
        connectors: Vec<Connector>,
        ads: Vec<ConnectorAdvertisement>,
        claimed: &'a [(&'a str, &'a str)],
        route_status: Option<HttpRouteStatus>,
    }

    impl Case<'_> {
        fn run(&self) -> Desired {
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
                now: NOW,
            })
        }
    }

    fn cond<'a>(d: &'a Desired, t: &str) -> &'a Condition {
        find_condition(&d.status.conditions, t).unwrap_or_else(|| panic!("no {t} condition"))
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
                "no connector",
                Case {
                    proxy: proxy(&[], "http://127.0.0.1:3000", None),
                    connectors: laptop(),
                    ads: ad(),
                    claimed: &[],
                    route_status: None,
                },
                INVALID,
                "needs a connector",
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
            let accepted = cond(&d, ACCEPTED);
            assert_eq!(
                (accepted.status.as_str(), accepted.reason.as_str()),
                ("False", reason),
                "{what}: {}",
                accepted.message
            );
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
            accepted.message.contains(
                "taken.example.com is already claimed by another project (as *.example.com)"
            ),
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
    fn wildcard_advertisements_and_unreported_ids() {
        let d = Case {
            proxy: proxy(&[], "https://api.internal:8443", by_name("laptop")),
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
        assert!(
            d.route.unwrap().spec.rules.unwrap()[0]
                .backend_refs
                .is_none()
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
}
