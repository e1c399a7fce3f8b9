//! The Gateway API objects of an accepted proxy, all owned by it and named after it: a
//! Gateway listening on its hostnames, an HTTPRoute with a backend per resolved backend,
//! a headless Service and EndpointSlices (pointing at the sidecars) per backend, and a
//! BackendTrafficPolicy that lets upgrades through.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use gateway_api::apis::standard::gateways::{Gateway, GatewayListeners, GatewaySpec};
use gateway_api::apis::standard::httproutes::{
    HttpRoute, HttpRouteParentRefs, HttpRouteRules, HttpRouteRulesBackendRefs,
    HttpRouteRulesBackendRefsFilters, HttpRouteRulesBackendRefsFiltersRequestHeaderModifier,
    HttpRouteRulesBackendRefsFiltersRequestHeaderModifierSet, HttpRouteRulesBackendRefsFiltersType,
    HttpRouteRulesFilters, HttpRouteRulesFiltersType, HttpRouteRulesFiltersUrlRewrite,
    HttpRouteSpec,
};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use portway_api::{
    BackendTrafficPolicy, BackendTrafficPolicySpec, HttpProxy, PolicyTargetReference,
    ProtocolUpgradeConfig, headers, labels, managers,
};

use super::backends::Backend;

pub use portway_api::names::label_name;

/// A listener name for a hostname: a DNS label, stable per hostname.
fn listener_name(hostname: &str) -> String {
    label_name(&hostname.replace('*', "wildcard"), &[hostname])
}

/// The backend's Service (and its slices' prefix): stable per rule, backend and connector.
fn service_name(proxy: &HttpProxy, b: &Backend<'_>) -> String {
    let name = proxy_name(proxy);
    label_name(
        &name,
        &[
            &name,
            &b.rule.to_string(),
            &b.backend.to_string(),
            b.connector_name(),
        ],
    )
}

fn proxy_name(proxy: &HttpProxy) -> String {
    proxy.metadata.name.clone().unwrap_or_default()
}

/// Labelled as ours and owned by the proxy, so pruning finds it and deletion takes it along.
fn child_meta(proxy: &HttpProxy, name: String, extra_labels: &[(&str, &str)]) -> ObjectMeta {
    owned_meta(proxy, labels::PROXY, name, extra_labels)
}

/// The metadata of an object generated for `owner` (a proxy of either kind): in its
/// namespace, controlled by it (deletion takes it along), labelled as the operator's and
/// with the owner's name under `owner_label`, so pruning finds it.
pub(crate) fn owned_meta<K: Resource<DynamicType = ()>>(
    owner: &K,
    owner_label: &str,
    name: String,
    extra_labels: &[(&str, &str)],
) -> ObjectMeta {
    let mut l = BTreeMap::from([
        (labels::MANAGED_BY.to_owned(), managers::OPERATOR.to_owned()),
        (
            owner_label.to_owned(),
            owner.meta().name.clone().unwrap_or_default(),
        ),
    ]);
    l.extend(
        extra_labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    ObjectMeta {
        name: Some(name),
        namespace: owner.meta().namespace.clone(),
        labels: Some(l),
        owner_references: owner.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

/// One HTTP listener per hostname.
pub(super) fn gateway(proxy: &HttpProxy, hostnames: &[String], class: &str) -> Gateway {
    Gateway {
        metadata: child_meta(proxy, proxy_name(proxy), &[]),
        spec: GatewaySpec {
            gateway_class_name: class.to_owned(),
            listeners: hostnames
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
    }
}

/// The proxy's rules with their backends as Services; a rule left without any has an
/// empty `backendRefs` (the gateway answers 503 for it).
pub(super) fn route(
    proxy: &HttpProxy,
    hostnames: Vec<String>,
    backends: &[Backend<'_>],
    access: Option<&str>,
) -> HttpRoute {
    let name = proxy_name(proxy);
    let mut rules: Vec<HttpRouteRules> = proxy
        .spec
        .rules
        .iter()
        .map(|r| {
            // The policy first: a request it refuses meets no other filter.
            let filters: Vec<_> = access
                .map(crate::access::filter)
                .into_iter()
                .chain(rule_filters(r))
                .collect();
            HttpRouteRules {
                name: r.name.clone(),
                matches: Some(r.matches.clone()),
                // Empty lists are written, not left out: `apply` skips a write when the
                // stored route already holds everything asked for, so a list left out
                // would keep what it last held (a removed AccessPolicy or CORS filter
                // would stay in force).
                filters: Some(filters),
                backend_refs: Some(Vec::new()),
                ..Default::default()
            }
        })
        .collect();
    for b in backends {
        if let Some(list) = rules[b.rule].backend_refs.as_mut() {
            list.push(backend_ref(proxy, b));
        }
    }
    // The data planes read HTTPS behaviour from the route, as they read everything else.
    let mut metadata = child_meta(proxy, name.clone(), &[]);
    let carried: std::collections::BTreeMap<String, String> = proxy
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| {
            [
                portway_api::certificates::HTTPS_REDIRECT,
                portway_api::certificates::HSTS,
            ]
            .contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !carried.is_empty() {
        metadata.annotations = Some(carried);
    }
    HttpRoute {
        metadata,
        spec: HttpRouteSpec {
            parent_refs: Some(vec![HttpRouteParentRefs {
                group: Some("gateway.networking.k8s.io".into()),
                kind: Some("Gateway".into()),
                name,
                namespace: Some(proxy.metadata.namespace.clone().unwrap_or_default()),
                ..Default::default()
            }]),
            hostnames: Some(hostnames),
            rules: Some(rules),
        },
        status: None,
    }
}

/// A rule's filters as the route carries them: a `Host` the request header filter sets
/// (Datum's way) becomes the URLRewrite hostname the data planes apply.
fn rule_filters(rule: &portway_api::HttpProxyRule) -> Vec<HttpRouteRulesFilters> {
    let mut filters = rule.filters.clone();
    let Some(host) = portway_api::filters::host_override(rule) else {
        return filters;
    };
    for f in &mut filters {
        if let Some(set) = f
            .request_header_modifier
            .as_mut()
            .and_then(|m| m.set.as_mut())
        {
            set.retain(|h| !h.name.eq_ignore_ascii_case("host"));
        }
    }
    match filters.iter_mut().find_map(|f| f.url_rewrite.as_mut()) {
        Some(rewrite) => rewrite.hostname = Some(host),
        None => filters.push(HttpRouteRulesFilters {
            r#type: HttpRouteRulesFiltersType::UrlRewrite,
            url_rewrite: Some(HttpRouteRulesFiltersUrlRewrite {
                hostname: Some(host),
                path: None,
            }),
            ..Default::default()
        }),
    }
    filters
}

/// The backend's Service, with the headers that tell the sidecar which device and target
/// to dial set first, then the user's own filters.
fn backend_ref(proxy: &HttpProxy, b: &Backend<'_>) -> HttpRouteRulesBackendRefs {
    let set = |n: &str, v: String| HttpRouteRulesBackendRefsFiltersRequestHeaderModifierSet {
        name: n.into(),
        value: v,
    };
    let mut routing = vec![
        set(headers::NODE_ID, b.node_id.to_owned()),
        set(headers::TARGET_HOST, b.endpoint.target.host.clone()),
        set(headers::TARGET_PORT, b.endpoint.target.port.to_string()),
        set(headers::TARGET_PROTO, b.endpoint.proto.clone()),
    ];
    // An origin's name and Host are always written, `-` for none, so no client's own
    // header is left in their place; so is the TLS name of an https target on a device.
    let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| headers::NONE.into());
    if b.connector.is_none() {
        routing.push(set(headers::TARGET_TLS_NAME, or_none(&b.tls_name)));
        routing.push(set(headers::TARGET_AUTHORITY, or_none(&b.authority)));
    } else if b.tls_name.is_some() {
        routing.push(set(headers::TARGET_TLS_NAME, or_none(&b.tls_name)));
    }
    let mut filters = vec![HttpRouteRulesBackendRefsFilters {
        r#type: HttpRouteRulesBackendRefsFiltersType::RequestHeaderModifier,
        request_header_modifier: Some(HttpRouteRulesBackendRefsFiltersRequestHeaderModifier {
            set: Some(routing),
            ..Default::default()
        }),
        ..Default::default()
    }];
    filters.extend(
        proxy.spec.rules[b.rule].backends[b.backend]
            .filters
            .iter()
            .cloned()
            .map(|mut f| {
                // Moved to the rule's URLRewrite (see `rule_filters`).
                if let Some(set) = f
                    .request_header_modifier
                    .as_mut()
                    .and_then(|m| m.set.as_mut())
                {
                    set.retain(|h| !h.name.eq_ignore_ascii_case("host"));
                }
                f
            }),
    );
    HttpRouteRulesBackendRefs {
        name: service_name(proxy, b),
        namespace: None,
        group: Some(String::new()),
        kind: Some("Service".into()),
        port: Some(80),
        weight: Some(1),
        filters: Some(filters),
    }
}

/// What an HTTPProxy backend's Service and EndpointSlices are made of.
fn sidecar_backend<'a>(proxy: &HttpProxy, b: &'a Backend<'_>) -> SidecarBackend<'a> {
    SidecarBackend {
        service: service_name(proxy, b),
        connector: b.connector_name(),
        ready: b.ready(),
        port: ("http", 80),
    }
}

/// A headless Service per backend; its endpoints are the slices below.
pub(super) fn services(proxy: &HttpProxy, backends: &[Backend<'_>]) -> Vec<Service> {
    let meta = |name, extra: &[(&str, &str)]| child_meta(proxy, name, extra);
    backends
        .iter()
        .map(|b| sidecar_service(&meta, &sidecar_backend(proxy, b)))
        .collect()
}

/// Per backend, the slices of [`sidecar_slices`].
pub(super) fn slices(
    proxy: &HttpProxy,
    backends: &[Backend<'_>],
    sidecars: &[SocketAddr],
) -> Vec<EndpointSlice> {
    let meta = |name, extra: &[(&str, &str)]| child_meta(proxy, name, extra);
    backends
        .iter()
        .flat_map(|b| sidecar_slices(&meta, &sidecar_backend(proxy, b), sidecars))
        .collect()
}

/// One backend through one connector, as its Service and EndpointSlices show it, for
/// either proxy kind: the route names the Service, whose endpoints are the sidecars.
pub(crate) struct SidecarBackend<'a> {
    pub service: String,
    /// The connector's name (a label on both objects).
    pub connector: &'a str,
    /// The connector's `Ready`: the endpoints' readiness.
    pub ready: bool,
    /// The Service port's name and number: what the route's backendRef names.
    pub port: (&'static str, i32),
}

/// Builds a generated object's metadata from its name and extra labels.
pub(crate) type MetaFn<'a> = dyn Fn(String, &[(&str, &str)]) -> ObjectMeta + 'a;

/// A backend's headless Service; its endpoints are [`sidecar_slices`].
pub(crate) fn sidecar_service(meta: &MetaFn<'_>, b: &SidecarBackend<'_>) -> Service {
    Service {
        metadata: meta(b.service.clone(), &[("portway.dev/connector", b.connector)]),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            ports: Some(vec![ServicePort {
                name: Some(b.port.0.into()),
                port: b.port.1,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// A backend's EndpointSlices: one per address family and port of the sidecars (a slice
/// holds one of each), ready while the backend's connector is.
pub(crate) fn sidecar_slices(
    meta: &MetaFn<'_>,
    b: &SidecarBackend<'_>,
    sidecars: &[SocketAddr],
) -> Vec<EndpointSlice> {
    let mut groups: BTreeMap<(bool, u16), Vec<SocketAddr>> = BTreeMap::new();
    for s in sidecars {
        groups.entry((s.is_ipv6(), s.port())).or_default().push(*s);
    }
    let svc_name = &b.service;
    let ready = b.ready;
    let mut slices = Vec::new();
    for ((v6, port), addrs) in &groups {
        let family = if *v6 { "IPv6" } else { "IPv4" };
        let slice_name = format!("{svc_name}-{}{port}", if *v6 { "v6-" } else { "" });
        slices.push(EndpointSlice {
            metadata: meta(
                slice_name,
                &[
                    ("kubernetes.io/service-name", svc_name),
                    ("endpointslice.kubernetes.io/managed-by", managers::OPERATOR),
                    ("portway.dev/connector", b.connector),
                ],
            ),
            address_type: family.into(),
            endpoints: Some(
                addrs
                    .iter()
                    .map(|a| Endpoint {
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
                name: Some(b.port.0.into()),
                port: Some(i32::from(*port)),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
        });
    }
    slices
}

/// Lets WebSocket and CONNECT upgrades through the route (tunnels need both).
pub(super) fn policy(proxy: &HttpProxy) -> BackendTrafficPolicy {
    let name = proxy_name(proxy);
    BackendTrafficPolicy {
        metadata: child_meta(proxy, name.clone(), &[]),
        spec: BackendTrafficPolicySpec {
            target_refs: vec![PolicyTargetReference {
                group: "gateway.networking.k8s.io".into(),
                kind: "HTTPRoute".into(),
                name,
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
    }
}
