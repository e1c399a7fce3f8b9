//! The route table as Envoy resources: clusters, the public listener, the route
//! configuration, each for one node.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster,
    circuit_breakers::Thresholds,
    cluster::{ClusterDiscoveryType, DiscoveryType},
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, DataSource, HeaderValue,
    HeaderValueOption, Http2ProtocolOptions, SocketAddress, address, config_source, data_source,
    header_value_option::HeaderAppendAction, socket_address,
};
use envoy_types::pb::envoy::config::core::v3::{TransportSocket, transport_socket};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster, header_matcher,
    query_parameter_matcher, redirect_action, route, route_action, route_match,
    weighted_cluster::ClusterWeight,
};
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::{Cors, CorsPolicy};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds,
    http_connection_manager::{CodecType, RouteSpecifier, UpgradeConfig},
    http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret as TlsSecret, TlsCertificate,
    secret as tls_secret,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, RegexMatcher, StringMatcher, string_matcher,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as PbDuration, UInt32Value};
use k8s_openapi::api::core::v1::Secret;
use portway_api::certificates::{Http01, Info};
use prost::Message;

use portway_api::headers;

use super::NodeConfig;
use crate::filters::{PathChange, Redirect};
use crate::model::{Backend, HeaderFilter, PathMatch, Table, TcpService, Tunnel};

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The route configuration of the HTTPS listener, and of the plain one without HTTPS.
pub const ROUTES: &str = "portway_routes";
/// The plain listener's, with HTTPS: the same routes, covered names redirected.
pub const ROUTES_HTTP: &str = "portway_routes_http";
/// The name of Envoy's CORS filter in the chain, which per-route policies refer to.
const CORS_FILTER: &str = "envoy.filters.http.cors";
/// A cluster without endpoints: routes whose backends are all unready point here, so
/// Envoy answers 503 by itself.
pub const UNREADY: &str = "portway_unready";

pub(super) fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: m.encode_to_vec(),
    }
}

fn socket(addr: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                addr.port(),
            ))),
            ..Default::default()
        })),
    }
}

/// The sidecar cluster for backend slot `i` (weighted clusters need distinct names).
pub fn sidecar_cluster(i: usize) -> String {
    format!("portway_sidecar_{i}")
}

fn cluster(name: &str, endpoint: Option<SocketAddr>) -> Cluster {
    let lb_endpoints = endpoint
        .map(|a| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(socket(a)),
                ..Default::default()
            })),
            ..Default::default()
        })
        .into_iter()
        .collect();
    let high = Some(UInt32Value { value: 1_000_000 });
    Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(PbDuration {
            seconds: 2,
            nanos: 0,
        }),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.to_owned(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints,
                ..Default::default()
            }],
            ..Default::default()
        }),
        // The sidecar is local and multiplexes everything: Envoy's default limits (1024)
        // would cap concurrency, not protect anything.
        circuit_breakers: Some(CircuitBreakers {
            thresholds: vec![Thresholds {
                max_connections: high,
                max_pending_requests: high,
                max_requests: high,
                max_retries: high,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The sidecar cluster public TCP ports tunnel through.
pub const SIDECAR_TCP: &str = "portway_sidecar_tcp";

/// The local sidecar over HTTP/2 (h2c): a `CONNECT` on an HTTP/2 stream can end one
/// direction and keep the other (`END_STREAM`), so a TCP client's half-close is passed
/// on; over HTTP/1.1 Envoy would close the whole tunnel at the client's end.
fn sidecar_h2_cluster(node: &NodeConfig) -> Cluster {
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
        HttpProtocolOptions,
        http_protocol_options::{
            ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
        },
    };
    let mut c = cluster(SIDECAR_TCP, Some(node.sidecar));
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                    Http2ProtocolOptions::default(),
                )),
            },
        )),
        ..Default::default()
    };
    c.typed_extension_protocol_options.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
        any(
            "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            &options,
        ),
    );
    c
}

/// Clusters: one per backend slot (all the local sidecar), the local sidecar over
/// HTTP/2 for TCP tunnels, and the empty one.
pub fn clusters(table: &Table, node: &NodeConfig) -> Vec<Cluster> {
    let slots = table
        .hosts()
        .flat_map(|h| h.routes.iter().map(|r| r.backends.len()))
        .max()
        .unwrap_or(0)
        .max(1);
    let mut out: Vec<Cluster> = (0..slots)
        .map(|i| cluster(&sidecar_cluster(i), Some(node.sidecar)))
        .collect();
    if !(table.tcp.is_empty() && table.tls.is_empty()) {
        out.push(sidecar_h2_cluster(node));
    }
    out.push(cluster(UNREADY, None));
    out
}

/// The HTTP connection manager both listeners run: HTTP/1.1 and h2 (codec AUTO: h2c on
/// the plain listener, h2 by ALPN on the TLS one), WebSocket upgrades, routes by RDS.
fn connection_manager(routes: &str) -> Filter {
    // An AccessPolicy's address rule runs first, then CORS (it answers preflights
    // before routing), then its rate limits and basic auth (external authorization),
    // then its size limit; each is off on every route without a config of its own.
    let http_filters = vec![
        super::access::rbac_filter(),
        HttpFilter {
            name: CORS_FILTER.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any(
                "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors",
                &Cors::default(),
            ))),
            ..Default::default()
        },
        super::access::authz_filter(),
        super::access::buffer_filter(),
        HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any(
                "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                &Router::default(),
            ))),
            ..Default::default()
        },
    ];
    // An upgraded stream's bytes are no request body for the size rule to hold (Envoy's
    // buffer filter would wait for an end that never comes): upgrades run the same chain
    // without it.
    let upgrade_filters: Vec<HttpFilter> = http_filters
        .iter()
        .filter(|f| f.name != super::access::BUFFER_FILTER)
        .cloned()
        .collect();
    let hcm = HttpConnectionManager {
        stat_prefix: "portway".into(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            route_config_name: routes.into(),
            config_source: Some(ads()),
        })),
        http_filters,
        upgrade_configs: vec![UpgradeConfig {
            upgrade_type: "websocket".into(),
            filters: upgrade_filters,
            ..Default::default()
        }],
        use_remote_address: Some(BoolValue { value: true }),
        http2_protocol_options: Some(Http2ProtocolOptions {
            allow_connect: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(any(
            "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            &hcm,
        ))),
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// The public listeners: plain HTTP, and HTTPS when the node has a TLS address and there
/// is a certificate to serve or a name to pass through (a listener with no filter chain
/// would match nothing). A passthrough name's chain matches its exact server name, which
/// Envoy ranks above a certificate's wildcard, and tunnels the TLS bytes undecrypted.
pub fn listeners(table: &Table, node: &NodeConfig, certificates: &[Arc<Secret>]) -> Vec<Listener> {
    // With HTTPS served, the plain listener has routes of its own: the same, but names an
    // issued certificate covers redirect to HTTPS.
    let plain = if serves_https(node, certificates) {
        ROUTES_HTTP
    } else {
        ROUTES
    };
    let mut out = vec![Listener {
        name: "portway_http".into(),
        address: Some(socket(node.listen)),
        filter_chains: vec![FilterChain {
            filters: vec![connection_manager(plain)],
            ..Default::default()
        }],
        ..Default::default()
    }];
    let passthrough = table.tls.iter().map(|(name, service)| FilterChain {
        filter_chain_match: Some(FilterChainMatch {
            server_names: vec![name.clone()],
            ..Default::default()
        }),
        filters: vec![tunnel_filter(service, format!("portway_tls_{name}"))],
        ..Default::default()
    });
    // A name passed through is not also a certificate's: Envoy refuses a listener whose
    // filter chains match one server name twice, and would drop the whole HTTPS
    // listener. A certificate left with no name serves nothing here (an empty list would
    // match every name).
    let terminated = |info: &Info| -> Vec<String> {
        info.hostnames
            .iter()
            .filter(|h| !table.tls.contains_key(h.as_str()))
            .cloned()
            .collect()
    };
    let chains: Vec<FilterChain> = certificates
        .iter()
        .filter_map(|s| Info::of(s))
        .map(|info| (terminated(&info), info))
        .filter(|(names, _)| !names.is_empty())
        .map(|(server_names, info)| FilterChain {
            // Envoy matches `*.x` here as clients do: one label below `x`.
            filter_chain_match: Some(FilterChainMatch {
                server_names,
                ..Default::default()
            }),
            transport_socket: Some(TransportSocket {
                name: "envoy.transport_sockets.tls".into(),
                config_type: Some(transport_socket::ConfigType::TypedConfig(any(
                    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    &DownstreamTlsContext {
                        common_tls_context: Some(CommonTlsContext {
                            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
                            tls_certificate_sds_secret_configs: vec![SdsSecretConfig {
                                name: info.name.clone(),
                                sds_config: Some(ads()),
                            }],
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ))),
            }),
            filters: vec![connection_manager(ROUTES)],
            ..Default::default()
        })
        .chain(passthrough)
        .collect();
    if let Some(addr) = node.listen_tls
        && !chains.is_empty()
    {
        out.push(Listener {
            name: "portway_https".into(),
            address: Some(socket(addr)),
            listener_filters: vec![ListenerFilter {
                name: "envoy.filters.listener.tls_inspector".into(),
                config_type: Some(listener_filter::ConfigType::TypedConfig(any(
                    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
                    &TlsInspector::default(),
                ))),
                ..Default::default()
            }],
            filter_chains: chains,
            ..Default::default()
        });
    }
    out
}

/// One listener per public TCP port, on the node's listen address: `tcp_proxy` tunnels
/// each connection to the sidecar as a `CONNECT` to the first ready backend's target,
/// with its device in `datum-node-id` and the other ready backends in
/// `datum-fallback` (the sidecar tries those when that device is down). With no ready
/// backend the upstream is the empty cluster, so Envoy closes the connection at once.
pub fn tcp_listeners(table: &Table, node: &NodeConfig) -> Vec<Listener> {
    table
        .tcp
        .values()
        .map(|service| {
            let name = format!("portway_tcp_{}", service.port);
            Listener {
                address: Some(socket(SocketAddr::new(node.listen.ip(), service.port))),
                filter_chains: vec![FilterChain {
                    filters: vec![tunnel_filter(service, name.clone())],
                    ..Default::default()
                }],
                name,
                ..Default::default()
            }
        })
        .collect()
}

/// The `tcp_proxy` of one layer-4 service (a public port, or a passthrough name): a
/// CONNECT to the sidecar for the first ready backend's target, naming its device, the
/// other ready ones as fallback; with none ready, the empty cluster.
fn tunnel_filter(service: &TcpService, stat_prefix: String) -> Filter {
    let ready: Vec<(usize, &Backend)> = service
        .backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.ready && b.tunnel.is_some())
        .collect();
    let (cluster, tunneling_config) = match ready.first() {
        Some((chosen, b)) => {
            // `host:port`, an IPv6 host in brackets: the CONNECT authority.
            let hostname = b
                .tunnel
                .as_ref()
                .and_then(Tunnel::target)
                .map(|t| t.to_string())
                .unwrap_or_default();
            let mut headers_to_add = backend_headers(b);
            if ready.len() > 1 {
                headers_to_add.push(fallback_header(*chosen, &ready));
            }
            // The public client, for device targets that take the PROXY protocol.
            headers_to_add.push(HeaderValueOption {
                header: Some(HeaderValue {
                    key: headers::CLIENT_ADDRESS.into(),
                    value: "%DOWNSTREAM_REMOTE_ADDRESS%".into(),
                    ..Default::default()
                }),
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                ..Default::default()
            });
            (
                SIDECAR_TCP.to_owned(),
                Some(tcp_proxy::TunnelingConfig {
                    hostname: hostname.replace('%', "%%"),
                    headers_to_add,
                    ..Default::default()
                }),
            )
        }
        None => (UNREADY.to_owned(), None),
    };
    let proxy = TcpProxy {
        stat_prefix,
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster)),
        tunneling_config,
        // As the built-in edge: a connection that moves nothing for an hour ends.
        idle_timeout: Some(PbDuration {
            seconds: 3600,
            nanos: 0,
        }),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(filter::ConfigType::TypedConfig(any(
            "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            &proxy,
        ))),
    }
}

fn serves_https(node: &NodeConfig, certificates: &[Arc<Secret>]) -> bool {
    node.listen_tls.is_some() && certificates.iter().any(|s| Info::of(s).is_some())
}

/// The plain listener's routes when HTTPS is served, from the HTTPS listener's `routes`
/// (rendered once): a virtual host whose name an issued certificate covers answers every
/// request with a 308 to the same URL over HTTPS, unless its routes opt out.
pub fn http_route_configuration(
    routes: &RouteConfiguration,
    table: &Table,
    node: &NodeConfig,
    certificates: &[Arc<Secret>],
) -> RouteConfiguration {
    use redirect_action::RedirectResponseCode as Code;
    let covered: HashSet<String> = certificates
        .iter()
        .filter_map(|s| Info::of(s))
        .flat_map(|i| i.hostnames)
        .collect();
    // As clients check: the name itself, or `*.` and its parent (one label).
    let covers = |name: &str| {
        covered.contains(name)
            || name
                .split_once('.')
                .is_some_and(|(_, parent)| covered.contains(&format!("*.{parent}")))
    };
    let kept: HashSet<&str> = table
        .hosts()
        .filter(|h| !h.https_redirect)
        .map(|h| h.hostname.as_str())
        .collect();
    let port = node.listen_tls.map_or(0, |a| a.port());
    let mut rc = routes.clone();
    rc.name = ROUTES_HTTP.into();
    for vh in &mut rc.virtual_hosts {
        if kept.contains(vh.name.as_str()) || !covers(&vh.name) {
            continue;
        }
        vh.routes = vec![Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(route::Action::Redirect(RedirectAction {
                scheme_rewrite_specifier: Some(
                    redirect_action::SchemeRewriteSpecifier::SchemeRedirect("https".into()),
                ),
                port_redirect: if port == 443 { 0 } else { u32::from(port) },
                response_code: Code::PermanentRedirect as i32,
                ..Default::default()
            })),
            ..Default::default()
        }];
    }
    rc
}

fn add_hsts(rc: &mut RouteConfiguration, table: &Table) {
    let hsts: HashMap<&str, &str> = table
        .hosts()
        .filter_map(|h| Some((h.hostname.as_str(), h.hsts.as_ref()?.to_str().ok()?)))
        .collect();
    for vh in &mut rc.virtual_hosts {
        let Some(v) = hsts.get(vh.name.as_str()) else {
            continue;
        };
        vh.response_headers_to_add.push(HeaderValueOption {
            header: Some(HeaderValue {
                key: "strict-transport-security".into(),
                value: (*v).to_owned(),
                ..Default::default()
            }),
            append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            ..Default::default()
        });
    }
}

/// The certificates as SDS secrets, named as the listeners' filter chains ask for them.
pub fn secrets(certificates: &[Arc<Secret>]) -> Vec<TlsSecret> {
    certificates
        .iter()
        .filter_map(|s| {
            let info = Info::of(s)?;
            let data = s.data.as_ref()?;
            let inline = |key: &str| {
                Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineBytes(
                        data.get(key)?.0.clone(),
                    )),
                    ..Default::default()
                })
            };
            Some(TlsSecret {
                name: info.name,
                r#type: Some(tls_secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline("tls.crt"),
                    private_key: inline("tls.key"),
                    ..Default::default()
                })),
            })
        })
        .collect()
}

fn removals(f: &HeaderFilter) -> Vec<String> {
    f.remove.iter().map(|n| n.as_str().to_owned()).collect()
}

fn header_options(f: &HeaderFilter) -> Vec<HeaderValueOption> {
    let opt = |n: &http::HeaderName, v: &http::HeaderValue, action: HeaderAppendAction| {
        HeaderValueOption {
            header: Some(HeaderValue {
                key: n.as_str().to_owned(),
                // Envoy formats header values: a literal % must be doubled.
                value: v.to_str().unwrap_or_default().replace('%', "%%"),
                ..Default::default()
            }),
            append_action: action as i32,
            ..Default::default()
        }
    };
    f.set
        .iter()
        .map(|(n, v)| opt(n, v, HeaderAppendAction::OverwriteIfExistsOrAdd))
        .chain(
            f.add
                .iter()
                .map(|(n, v)| opt(n, v, HeaderAppendAction::AppendIfExistsOrAdd)),
        )
        .collect()
}

/// A backend's user filter, then the device and target: user filters hold no reserved
/// header (the model drops them), so the routing headers cannot be overridden.
fn backend_headers(b: &Backend) -> Vec<HeaderValueOption> {
    let mut out = header_options(&b.headers);
    if let Some(t) = &b.tunnel {
        out.extend(header_options(&HeaderFilter {
            set: t.headers(),
            ..Default::default()
        }));
    }
    out
}

/// `datum-fallback` for one of several ready backends: the others' devices and targets
/// (`<node-id> <host> <port>`, comma separated), which the sidecar tries when this one's
/// device is down. Envoy keeps a retry on the weighted cluster it picked first, so the
/// failover happens in the sidecar. It overwrites a client's: Envoy applies a weighted
/// cluster's headers before its route's, so a route-level removal would remove ours.
fn fallback_header(chosen: usize, ready: &[(usize, &Backend)]) -> HeaderValueOption {
    let others: Vec<String> = ready
        .iter()
        .filter(|(i, _)| *i != chosen)
        .filter_map(|(_, b)| b.tunnel.as_ref())
        // A fallback names a device; an origin is never down in the sidecar's sense.
        .filter(|t| !t.is_origin())
        .filter_map(|t| {
            Some(format!(
                "{} {} {}",
                t.node_id.to_str().ok()?,
                t.host.to_str().ok()?,
                t.port.to_str().ok()?
            ))
        })
        .collect();
    HeaderValueOption {
        header: Some(HeaderValue {
            key: headers::FALLBACK.into(),
            value: others.join(", ").replace('%', "%%"),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        keep_empty_value: true,
        ..Default::default()
    }
}

/// A path change as Envoy's regex rewrite (which keeps the query).
fn path_rewrite(change: &PathChange) -> RegexMatchAndSubstitute {
    let (regex, substitution) = change.regex();
    RegexMatchAndSubstitute {
        pattern: Some(RegexMatcher {
            regex,
            ..Default::default()
        }),
        substitution,
    }
}

/// Envoy's redirect keeps the request's `Host` port unless it is given a host or a port,
/// and writes a given port even when it is the scheme's own. So the port is given only
/// when it must appear, and the virtual host's name is given to drop the request's port
/// where Gateway API says the scheme's own port is meant; a new host without a port gets
/// this listener's port, the one the client used.
fn redirect(r: &Redirect, vhost: &str, listen_port: u16) -> RedirectAction {
    use redirect_action::RedirectResponseCode as Code;
    let code = match r.status {
        301 => Code::MovedPermanently,
        303 => Code::SeeOther,
        307 => Code::TemporaryRedirect,
        308 => Code::PermanentRedirect,
        _ => Code::Found,
    };
    let scheme = r.scheme.unwrap_or("http");
    let default = |p: u16| crate::filters::default_port(scheme) == Some(p);
    let host = r
        .hostname
        .clone()
        .or_else(|| (r.port.is_some() && !vhost.starts_with('*')).then(|| vhost.to_owned()));
    let port = match (r.port, &r.hostname) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => Some(listen_port),
        (None, None) => None,
    };
    RedirectAction {
        host_redirect: host.unwrap_or_default(),
        port_redirect: port.filter(|p| !default(*p)).map_or(0, u32::from),
        response_code: code as i32,
        scheme_rewrite_specifier: r
            .scheme
            .map(|s| redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s.into())),
        path_rewrite_specifier: r
            .path
            .as_ref()
            .map(|p| redirect_action::PathRewriteSpecifier::RegexRewrite(path_rewrite(p))),
        ..Default::default()
    }
}

/// The route's CORS policy for Envoy's CORS filter; origins match case-insensitively, as
/// at the built-in edge.
fn cors_policy(c: &crate::filters::Cors) -> Any {
    let policy = CorsPolicy {
        allow_origin_string_match: c
            .origin_regexes()
            .into_iter()
            .map(|regex| StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                    regex,
                    ..Default::default()
                })),
                ..Default::default()
            })
            .collect(),
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        max_age: c.max_age.map(|a| a.to_string()).unwrap_or_default(),
        allow_credentials: Some(BoolValue {
            value: c.allow_credentials,
        }),
        ..Default::default()
    };
    any(
        "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        &policy,
    )
}

fn exact(v: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Exact(v.to_owned())),
        ..Default::default()
    }
}

/// The shared route configuration: a virtual host per hostname, a route per match in the
/// model's precedence order, `datum-*` headers per backend.
pub fn route_configuration(table: &Table, node: &NodeConfig) -> RouteConfiguration {
    let mut hosts: Vec<_> = table.hosts().collect();
    hosts.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    let virtual_hosts: Vec<VirtualHost> = hosts
        .into_iter()
        .map(|h| VirtualHost {
            name: h.hostname.clone(),
            domains: vec![h.hostname.clone()],
            routes: h
                .routes
                .iter()
                .flat_map(|r| {
                    let path = match &r.path {
                        PathMatch::Exact(p) => route_match::PathSpecifier::Path(p.clone()),
                        PathMatch::Prefix(p) if p == "/" => {
                            route_match::PathSpecifier::Prefix("/".into())
                        }
                        PathMatch::Prefix(p) => route_match::PathSpecifier::PathSeparatedPrefix(
                            p.trim_end_matches('/').to_owned(),
                        ),
                    };
                    let mut headers: Vec<HeaderMatcher> = r
                        .headers
                        .iter()
                        .map(|(n, v)| HeaderMatcher {
                            name: n.clone(),
                            header_match_specifier: Some(
                                header_matcher::HeaderMatchSpecifier::StringMatch(exact(v)),
                            ),
                            ..Default::default()
                        })
                        .collect();
                    if let Some(m) = &r.method {
                        headers.push(HeaderMatcher {
                            name: ":method".into(),
                            header_match_specifier: Some(
                                header_matcher::HeaderMatchSpecifier::StringMatch(exact(m)),
                            ),
                            ..Default::default()
                        });
                    }
                    let query_parameters = r
                        .query
                        .iter()
                        .map(|(n, v)| QueryParameterMatcher {
                            name: n.clone(),
                            query_parameter_match_specifier: Some(
                                query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                                    exact(v),
                                ),
                            ),
                        })
                        .collect();
                    let ready: Vec<_> = r
                        .backends
                        .iter()
                        .enumerate()
                        .filter(|(_, b)| b.ready && b.weight > 0)
                        .collect();
                    let mut request_headers_to_add = header_options(&r.filter);
                    // A backend's response filter already holds the rule's, composed; the
                    // rule's alone is for answers no backend gives (redirects).
                    let (mut response_headers_to_add, mut response_headers_to_remove) =
                        if ready.is_empty() {
                            (header_options(&r.response), removals(&r.response))
                        } else {
                            (Vec::new(), Vec::new())
                        };
                    let weighted = ready.len() > 1;
                    let specifier = match ready.as_slice() {
                        [] => route_action::ClusterSpecifier::Cluster(UNREADY.into()),
                        [(i, b)] => {
                            request_headers_to_add.extend(backend_headers(b));
                            response_headers_to_add.extend(header_options(&b.response));
                            response_headers_to_remove.extend(removals(&b.response));
                            route_action::ClusterSpecifier::Cluster(sidecar_cluster(*i))
                        }
                        many => route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
                            clusters: many
                                .iter()
                                .map(|(i, b)| ClusterWeight {
                                    name: sidecar_cluster(*i),
                                    weight: Some(UInt32Value { value: b.weight }),
                                    request_headers_to_add: backend_headers(b)
                                        .into_iter()
                                        .chain([fallback_header(*i, many)])
                                        .collect(),
                                    response_headers_to_add: header_options(&b.response),
                                    response_headers_to_remove: removals(&b.response),
                                    ..Default::default()
                                })
                                .collect(),
                            ..Default::default()
                        }),
                    };
                    let action = if let Some(why) = &r.unsupported {
                        route::Action::DirectResponse(DirectResponseAction {
                            status: 500,
                            body: Some(DataSource {
                                specifier: Some(data_source::Specifier::InlineString(format!(
                                    "{}: the route uses a filter Portway does not implement: {why}",
                                    h.hostname
                                ))),
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                    } else if let Some(rd) = &r.redirect {
                        route::Action::Redirect(redirect(rd, &h.hostname, node.listen.port()))
                    } else {
                        let rewrite = r.rewrite.as_ref();
                        route::Action::Route(RouteAction {
                            cluster_specifier: Some(specifier),
                            // Streams (SSE, uploads) must not be cut off by a route timeout.
                            timeout: Some(PbDuration {
                                seconds: 0,
                                nanos: 0,
                            }),
                            host_rewrite_specifier: rewrite
                                .and_then(|w| w.hostname.as_ref())
                                .and_then(|h| h.to_str().ok())
                                .map(|h| {
                                    route_action::HostRewriteSpecifier::HostRewriteLiteral(
                                        h.to_owned(),
                                    )
                                }),
                            regex_rewrite: rewrite.and_then(|w| w.path.as_ref()).map(path_rewrite),
                            ..Default::default()
                        })
                    };
                    let cors: Vec<(String, Any)> = r
                        .cors
                        .as_deref()
                        .map(|c| (CORS_FILTER.to_owned(), cors_policy(c)))
                        .into_iter()
                        .collect();
                    let access = r
                        .access
                        .as_deref()
                        .map(super::access::route_configs)
                        .unwrap_or_default();
                    let route_match = RouteMatch {
                        path_specifier: Some(path),
                        headers,
                        query_parameters,
                        ..Default::default()
                    };
                    // Methods the policy does not allow: a route of their own ahead of
                    // the rule's, with the address rule, CORS and authentication (so
                    // only a signed-in caller learns what is allowed), answering 405.
                    let refusal = r
                        .access
                        .as_deref()
                        .filter(|_| r.unsupported.is_none())
                        .and_then(super::access::method_refusal)
                        .map(|(method, response, allow)| {
                            let mut m = route_match.clone();
                            m.headers.push(method);
                            Route {
                                name: format!("{}/{}/method", r.route, r.rule),
                                r#match: Some(m),
                                action: Some(route::Action::DirectResponse(response)),
                                typed_per_filter_config: cors
                                    .iter()
                                    .chain(
                                        access
                                            .iter()
                                            .filter(|(f, _)| f != super::access::BUFFER_FILTER),
                                    )
                                    .cloned()
                                    .collect(),
                                response_headers_to_add: vec![allow],
                                ..Default::default()
                            }
                        });
                    let main = Route {
                        name: format!("{}/{}", r.route, r.rule),
                        r#match: Some(route_match),
                        action: Some(action),
                        typed_per_filter_config: cors.into_iter().chain(access).collect(),
                        response_headers_to_add,
                        response_headers_to_remove,
                        request_headers_to_add,
                        // A client's `datum-fallback` never reaches the sidecar: removed
                        // here, or overwritten by each weighted cluster.
                        // A client's identity header never passes; a route whose policy
                        // signs callers in has it set (or removed) by ext_authz instead, which
                        // this removal, applied later by the router, would undo.
                        request_headers_to_remove: removals(&r.filter)
                            .into_iter()
                            .chain(
                                (!r.access
                                    .as_deref()
                                    .is_some_and(crate::policy::Policy::authenticates))
                                .then(|| portway_api::access::IDENTITY_HEADER.to_owned()),
                            )
                            .chain((!weighted).then(|| headers::FALLBACK.to_owned()))
                            .collect(),
                        ..Default::default()
                    };
                    refusal.into_iter().chain([main])
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    // Each public hostname publishes the keys the caller's identity is signed with.
    let jwks = identity_jwks(table);
    let virtual_hosts = virtual_hosts
        .into_iter()
        .map(|mut vh| {
            vh.routes.insert(0, jwks.clone());
            vh
        })
        .collect();
    RouteConfiguration {
        name: ROUTES.into(),
        virtual_hosts,
        // A client must never choose the device: every route (or weighted cluster) that
        // reaches the sidecar overwrites all four datum-* headers, and the sidecar drops any
        // other datum-* or x-iroh-* header. (A global removal here would also remove the
        // values Envoy adds per weighted cluster, which are applied before it.)
        most_specific_header_mutations_wins: true,
        ignore_port_in_host_matching: true,
        ..Default::default()
    }
}

const IDENTITY_JWKS_ROUTE: &str = "portway/identity-jwks";

/// The route answering [`portway_api::access::IDENTITY_JWKS_PATH`] (GET and HEAD) with
/// the identity signing key's JWKS, or 503 until there is one.
fn identity_jwks(table: &Table) -> Route {
    let (status, body, content_type) = match &table.identity {
        Some(s) => (200, s.jwks().to_owned(), "application/jwk-set+json"),
        None => (
            503,
            "the identity signing key is not loaded yet".to_owned(),
            "text/plain; charset=utf-8",
        ),
    };
    Route {
        name: IDENTITY_JWKS_ROUTE.into(),
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Path(
                portway_api::access::IDENTITY_JWKS_PATH.into(),
            )),
            headers: vec![HeaderMatcher {
                name: ":method".into(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                    StringMatcher {
                        match_pattern: Some(string_matcher::MatchPattern::SafeRegex(
                            RegexMatcher {
                                regex: "GET|HEAD".into(),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }],
            ..Default::default()
        }),
        action: Some(route::Action::DirectResponse(DirectResponseAction {
            status,
            body: Some(DataSource {
                specifier: Some(data_source::Specifier::InlineString(body)),
                ..Default::default()
            }),
            ..Default::default()
        })),
        response_headers_to_add: vec![HeaderValueOption {
            header: Some(HeaderValue {
                key: "content-type".into(),
                value: content_type.into(),
                ..Default::default()
            }),
            append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// ACME HTTP-01 answers as direct responses on the plain listener, first in their name's
/// virtual host (a new one when the name has none), so no route or redirect hides them.
fn add_http01(rc: &mut RouteConfiguration, answers: &[Http01]) {
    for a in answers {
        let route = Route {
            name: format!("acme-http01/{}", a.token),
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Path(a.path())),
                headers: vec![HeaderMatcher {
                    name: ":method".into(),
                    header_match_specifier: Some(
                        header_matcher::HeaderMatchSpecifier::StringMatch(exact("GET")),
                    ),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            action: Some(route::Action::DirectResponse(DirectResponseAction {
                status: 200,
                body: Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineString(
                        a.key_authorization.clone(),
                    )),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        match rc
            .virtual_hosts
            .iter_mut()
            .find(|vh| vh.domains.iter().any(|d| d.eq_ignore_ascii_case(&a.host)))
        {
            Some(vh) => vh.routes.insert(0, route),
            None => rc.virtual_hosts.push(VirtualHost {
                name: format!("acme-http01/{}", a.host),
                domains: vec![a.host.clone()],
                routes: vec![route],
                ..Default::default()
            }),
        }
    }
}

/// Every resource of one type for one node, as `Any`s.
pub fn resources(
    type_url: &str,
    table: &Table,
    edge: &super::Secrets,
    node: &NodeConfig,
) -> Vec<Any> {
    let certificates = &edge.certificates;
    match type_url {
        CLUSTER_TYPE => clusters(table, node)
            .iter()
            .map(|c| any(CLUSTER_TYPE, c))
            .collect(),
        LISTENER_TYPE => listeners(table, node, certificates)
            .iter()
            .chain(&tcp_listeners(table, node))
            .map(|l| any(LISTENER_TYPE, l))
            .collect(),
        ROUTE_TYPE => {
            let mut routes = route_configuration(table, node);
            if !serves_https(node, certificates) {
                // The plain listener's alone.
                add_http01(&mut routes, &edge.http01);
                return vec![any(ROUTE_TYPE, &routes)];
            }
            let mut plain = http_route_configuration(&routes, table, node, certificates);
            add_http01(&mut plain, &edge.http01);
            // HSTS only on the HTTPS listener's routes (clients ignore it over HTTP).
            add_hsts(&mut routes, table);
            vec![any(ROUTE_TYPE, &routes), any(ROUTE_TYPE, &plain)]
        }
        SECRET_TYPE => secrets(certificates)
            .iter()
            .map(|s| any(SECRET_TYPE, s))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::tests::{node, table};
    use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
    use envoy_types::pb::envoy::config::route::v3::{Route, route, route_action, route_match};
    use envoy_types::pb::google::protobuf::Duration as PbDuration;

    /// TLS passthrough: a TLSRoute on a `TLS` listener in `Passthrough` mode becomes a
    /// chain of the HTTPS listener matching its exact names, with no TLS of Envoy's own,
    /// tunnelling to the device as a public port does; a listener of another mode, a
    /// wildcard name or a route of another class is not served. Without certificates, the
    /// HTTPS listener exists for the passthrough chain alone.
    #[test]
    fn passthrough_names_become_sni_chains_without_tls_termination() {
        use serde_json::json;
        let gw = |name: &str, mode: &str| -> gateway_api::apis::standard::gateways::Gateway {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "p"}, "spec": {"gatewayClassName": "portway",
                "listeners": [{"name": "tls", "port": 443, "protocol": "TLS", "tls": {"mode": mode}}]}}))
            .unwrap()
        };
        let (pass, term) = (gw("db", "Passthrough"), gw("t", "Terminate"));
        let route = |name: &str,
                     gw: &str,
                     hosts: &[&str]|
         -> gateway_api::apis::experimental::tlsroutes::TlsRoute {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "p"},
                "spec": {"hostnames": hosts, "parentRefs": [{"name": gw}],
                         "rules": [{"backendRefs": [{"name": "a", "port": 8443}]}]}}))
            .unwrap()
        };
        let routes = [
            route("db", "db", &["DB.example.com", "*.example.com"]),
            route("t", "t", &["t.example.com"]),
        ];
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "a", "namespace": "p", "labels": {"kubernetes.io/service-name": "a"},
                "annotations": {(portway_api::annotations::TUNNEL_TARGET): "n1 127.0.0.1 8443"}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}]}))
        .unwrap();
        let (table, attachments) = crate::model::build(
            "portway",
            &[&pass, &term],
            &[],
            &crate::model::Access::default(),
            &crate::model::Layer4Routes {
                tcp: &[],
                tls: &routes.iter().collect::<Vec<_>>(),
                ..Default::default()
            },
            &[&slice],
        );
        assert_eq!(table.tls.keys().collect::<Vec<_>>(), ["db.example.com"]);
        assert_eq!(attachments.len(), 1);
        assert_eq!(attachments[0].kind, crate::model::RouteKind::Tls);
        let mut tls_node = node();
        tls_node.listen_tls = Some("0.0.0.0:10443".parse().unwrap());
        let all = listeners(&table, &tls_node, &[]);
        let https = all.iter().find(|l| l.name == "portway_https").unwrap();
        assert_eq!(https.filter_chains.len(), 1);
        let chain = &https.filter_chains[0];
        assert_eq!(
            chain.filter_chain_match.as_ref().unwrap().server_names,
            ["db.example.com"]
        );
        assert!(chain.transport_socket.is_none(), "Envoy must not decrypt");
        let Some(filter::ConfigType::TypedConfig(any)) = &chain.filters[0].config_type else {
            panic!("no typed config")
        };
        let p = TcpProxy::decode(any.value.as_slice()).unwrap();
        assert_eq!(p.tunneling_config.unwrap().hostname, "127.0.0.1:8443");
        assert!(
            clusters(&table, &tls_node)
                .iter()
                .any(|c| c.name == SIDECAR_TCP)
        );

        // A certificate that also lists the passthrough name exactly leaves it to the
        // passthrough chain (Envoy would refuse the listener with one name matched
        // twice); one listing only that name adds no chain (an empty list matches all).
        let cert = |name: &str, hosts: &str| -> Arc<Secret> {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": "portway-system",
                        "labels": {(portway_api::certificates::LABEL): "true"},
                        "annotations": {(portway_api::certificates::HOSTNAMES): hosts}},
                    "type": "kubernetes.io/tls"}))
                .unwrap(),
            )
        };
        let certs = [
            cert("both", "db.example.com,*.example.com"),
            cert("only", "db.example.com"),
        ];
        let all = listeners(&table, &tls_node, &certs);
        let https = all.iter().find(|l| l.name == "portway_https").unwrap();
        let names: Vec<&[String]> = https
            .filter_chains
            .iter()
            .map(|c| {
                c.filter_chain_match
                    .as_ref()
                    .unwrap()
                    .server_names
                    .as_slice()
            })
            .collect();
        assert_eq!(
            names,
            [
                &["*.example.com".to_owned()][..],
                &["db.example.com".to_owned()][..]
            ]
        );
    }

    /// A public TCP port: a listener whose tcp_proxy tunnels to the sidecar as a CONNECT
    /// to the first ready backend's target, naming its device, the other ready one as
    /// fallback; with none ready, the empty cluster and no tunnel.
    #[test]
    fn tcp_ports_become_tcp_proxy_listeners_tunnelling_to_the_sidecar() {
        use serde_json::json;
        let gw: gateway_api::apis::standard::gateways::Gateway = serde_json::from_value(json!({
            "metadata": {"name": "db", "namespace": "p"}, "spec": {"gatewayClassName": "portway",
            "listeners": [{"name": "tcp", "port": 20001, "protocol": "TCP"}]}}))
        .unwrap();
        let route: gateway_api::apis::experimental::tcproutes::TcpRoute = serde_json::from_value(json!({
            "metadata": {"name": "db", "namespace": "p"},
            "spec": {"parentRefs": [{"name": "db"}], "rules": [{"backendRefs": [
                {"name": "a", "port": 6379}, {"name": "b", "port": 6379}, {"name": "c", "port": 6379}]}]}})).unwrap();
        let slice = |svc: &str,
                     ready: bool,
                     node: &str|
         -> k8s_openapi::api::discovery::v1::EndpointSlice {
            serde_json::from_value(json!({"metadata": {"name": svc, "namespace": "p",
                "labels": {"kubernetes.io/service-name": svc},
                "annotations": {(portway_api::annotations::TUNNEL_TARGET): format!("{node} 127.0.0.1 6379")}},
                "addressType": "IPv4", "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": ready}}]})).unwrap()
        };
        let proxy = |slices: &[k8s_openapi::api::discovery::v1::EndpointSlice]| {
            let (table, _) = crate::model::build(
                "portway",
                &[&gw],
                &[],
                &crate::model::Access::default(),
                &crate::model::Layer4Routes {
                    tcp: &[&route],
                    tls: &[],
                    ..Default::default()
                },
                &slices.iter().collect::<Vec<_>>(),
            );
            let listeners = tcp_listeners(&table, &node());
            assert_eq!(listeners.len(), 1);
            let l = &listeners[0];
            assert_eq!(l.name, "portway_tcp_20001");
            assert_eq!(
                l.address,
                Some(socket(SocketAddr::new(node().listen.ip(), 20001)))
            );
            let Some(filter::ConfigType::TypedConfig(any)) =
                &l.filter_chains[0].filters[0].config_type
            else {
                panic!("no typed config")
            };
            TcpProxy::decode(any.value.as_slice()).unwrap()
        };
        let p = proxy(&[
            slice("a", false, "n1"),
            slice("b", true, "n2"),
            slice("c", true, "n3"),
        ]);
        assert_eq!(
            p.cluster_specifier,
            Some(tcp_proxy::ClusterSpecifier::Cluster(SIDECAR_TCP.into()))
        );
        let tunnel = p.tunneling_config.unwrap();
        assert_eq!(tunnel.hostname, "127.0.0.1:6379");
        let headers: Vec<(String, String)> = tunnel
            .headers_to_add
            .iter()
            .filter_map(|h| h.header.as_ref())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect();
        assert!(
            headers.contains(&("datum-node-id".into(), "n2".into()))
                && headers.contains(&("datum-fallback".into(), "n3 127.0.0.1 6379".into())),
            "{headers:?}"
        );
        let p = proxy(&[
            slice("a", false, "n1"),
            slice("b", false, "n2"),
            slice("c", false, "n3"),
        ]);
        assert_eq!(
            p.cluster_specifier,
            Some(tcp_proxy::ClusterSpecifier::Cluster(UNREADY.into()))
        );
        assert!(p.tunneling_config.is_none());
    }

    #[test]
    fn clusters_point_every_slot_at_the_local_sidecar() {
        let c = clusters(&table(), &node());
        assert_eq!(
            c.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["portway_sidecar_0", "portway_sidecar_1", UNREADY]
        );
        let ep = &c[0].load_assignment.as_ref().unwrap().endpoints[0].lb_endpoints;
        assert_eq!(ep.len(), 1);
        assert!(
            c[2].load_assignment.as_ref().unwrap().endpoints[0]
                .lb_endpoints
                .is_empty(),
            "the unready cluster has no endpoints"
        );
    }

    #[test]
    fn routes_carry_headers_matches_and_readiness() {
        let rc = route_configuration(&table(), &node());
        assert!(rc.most_specific_header_mutations_wins && rc.ignore_port_in_host_matching);
        let app = rc
            .virtual_hosts
            .iter()
            .find(|v| v.name == "app.example.com")
            .unwrap();
        // After the identity JWKS route every virtual host starts with.
        let routes = &app.routes[1..];
        assert_eq!(app.domains, ["app.example.com"]);
        assert_eq!(app.routes[0].name, IDENTITY_JWKS_ROUTE);
        // Precedence: exact /down, then the /api/ prefix with method + header, then /.
        let paths: Vec<_> = routes
            .iter()
            .map(|r| r.r#match.as_ref().unwrap().path_specifier.clone().unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                route_match::PathSpecifier::Path("/down".into()),
                route_match::PathSpecifier::PathSeparatedPrefix("/api".into()),
                route_match::PathSpecifier::Prefix("/".into()),
            ]
        );
        let action = |r: &Route| match r.action.clone().unwrap() {
            route::Action::Route(a) => a,
            _ => panic!("not a route action"),
        };
        assert_eq!(
            action(&routes[0]).cluster_specifier,
            Some(route_action::ClusterSpecifier::Cluster(UNREADY.into())),
            "all backends unready → 503"
        );
        let api = &routes[1];
        assert_eq!(
            api.r#match
                .as_ref()
                .unwrap()
                .headers
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>(),
            ["x-env", ":method"]
        );
        assert_eq!(
            action(api).cluster_specifier,
            Some(route_action::ClusterSpecifier::Cluster(
                "portway_sidecar_0".into()
            ))
        );
        let node_header = api
            .request_headers_to_add
            .iter()
            .find(|h| h.header.as_ref().unwrap().key == "datum-node-id")
            .unwrap();
        assert_eq!(node_header.header.as_ref().unwrap().value, "n1");
        assert_eq!(
            api.request_headers_to_add
                .iter()
                .filter(|h| h.header.as_ref().unwrap().key.starts_with("datum-"))
                .count(),
            4,
            "the routing headers once each; a user filter naming one is dropped"
        );
        assert_eq!(
            node_header.append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
        let root = action(&routes[2]);
        assert_eq!(
            root.timeout,
            Some(PbDuration {
                seconds: 0,
                nanos: 0
            }),
            "streams are not cut off"
        );
        let Some(route_action::ClusterSpecifier::WeightedClusters(w)) = root.cluster_specifier
        else {
            panic!("two ready backends → weighted")
        };
        let ids: Vec<_> = w
            .clusters
            .iter()
            .map(|c| {
                c.request_headers_to_add[0]
                    .header
                    .as_ref()
                    .unwrap()
                    .value
                    .clone()
            })
            .collect();
        assert_eq!(ids, ["n1", "n2"]);
    }

    #[test]
    fn each_weighted_backend_carries_the_others_as_fallback() {
        let rc = route_configuration(&table(), &node());
        let app = rc
            .virtual_hosts
            .iter()
            .find(|v| v.name == "app.example.com")
            .unwrap();
        // After the identity JWKS route every virtual host starts with.
        let routes = &app.routes[1..];
        let value = |opts: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]| {
            opts.iter()
                .map(|h| h.header.as_ref().unwrap())
                .find(|h| h.key == "datum-fallback")
                .map(|h| h.value.clone())
        };
        let removes = |r: &Route| {
            r.request_headers_to_remove
                .contains(&"datum-fallback".to_owned())
        };
        assert!(
            removes(&routes[0]) && removes(&routes[1]),
            "a client's fallback never reaches the sidecar"
        );
        assert!(
            !removes(&routes[2]),
            "Envoy applies a route's removals after its weighted clusters' headers"
        );
        assert_eq!(
            value(&routes[1].request_headers_to_add),
            None,
            "one backend: nothing to fall back to"
        );
        let Some(route::Action::Route(root)) = &routes[2].action else {
            panic!("not a route action")
        };
        let Some(route_action::ClusterSpecifier::WeightedClusters(w)) = &root.cluster_specifier
        else {
            panic!("two ready backends → weighted")
        };
        let fallbacks: Vec<_> = w
            .clusters
            .iter()
            .map(|c| value(&c.request_headers_to_add))
            .collect();
        assert_eq!(
            fallbacks,
            [
                Some("n2 127.0.0.1 3000".to_owned()),
                Some("n1 127.0.0.1 3000".to_owned())
            ]
        );
    }

    /// Redirect, rewrite, response headers and CORS become Envoy's own actions and
    /// filter config; a filter Envoy is not given (RequestMirror) answers 500.
    #[test]
    fn filters_become_envoy_actions() {
        use serde_json::json;
        let gw: gateway_api::apis::standard::gateways::Gateway = serde_json::from_value(json!({
            "metadata": {"name": "gw", "namespace": "p"}, "spec": {"gatewayClassName": "portway", "listeners": []}})).unwrap();
        let route: gateway_api::apis::standard::httproutes::HttpRoute = serde_json::from_value(json!({
            "metadata": {"name": "r", "namespace": "p"},
            "spec": {"parentRefs": [{"name": "gw"}], "hostnames": ["app.example.com"], "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
                 "filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 301,
                     "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                 "filters": [
                     {"type": "URLRewrite", "urlRewrite": {"hostname": "in.example", "path": {"type": "ReplaceFullPath", "replaceFullPath": "/x"}}},
                     {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "x-a", "value": "1"}], "remove": ["x-b"]}},
                     {"type": "CORS", "cors": {"allowOrigins": ["https://*.example.com"], "allowMethods": ["GET", "PUT"], "maxAge": 60}}],
                 "backendRefs": [{"name": "svc"}]},
                {"matches": [{"path": {"type": "Exact", "value": "/m"}}],
                 "filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow"}}}]},
            ]},
        }))
        .unwrap();
        let (table, _) = crate::model::build(
            "portway",
            &[&gw],
            &[&route],
            &crate::model::Access::default(),
            &crate::model::Layer4Routes::default(),
            &[],
        );
        let rc = route_configuration(&table, &node());
        let by_rule = |rule: &str| {
            rc.virtual_hosts[0]
                .routes
                .iter()
                .find(|r| r.name == format!("p/r/{rule}"))
                .unwrap()
        };

        let Some(route::Action::Redirect(r)) = &by_rule("0").action else {
            panic!("{:?}", by_rule("0").action)
        };
        assert_eq!(
            (
                r.host_redirect.as_str(),
                r.port_redirect,
                r.response_code,
                r.scheme_rewrite_specifier.clone()
            ),
            (
                "app.example.com",
                0,
                redirect_action::RedirectResponseCode::MovedPermanently as i32,
                Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(
                    "https".into()
                ))
            )
        );
        let Some(redirect_action::PathRewriteSpecifier::RegexRewrite(rw)) =
            &r.path_rewrite_specifier
        else {
            panic!("{r:?}")
        };
        assert_eq!(
            (
                rw.pattern.as_ref().unwrap().regex.as_str(),
                rw.substitution.as_str()
            ),
            ("^/old/?", "/")
        );

        let api = by_rule("1");
        let Some(route::Action::Route(a)) = &api.action else {
            panic!("{:?}", api.action)
        };
        assert_eq!(
            a.host_rewrite_specifier,
            Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(
                "in.example".into()
            ))
        );
        let rw = a.regex_rewrite.as_ref().unwrap();
        assert_eq!(
            (
                rw.pattern.as_ref().unwrap().regex.as_str(),
                rw.substitution.as_str()
            ),
            ("^.*$", "/x")
        );
        assert_eq!(
            api.response_headers_to_add[0].header.as_ref().unwrap().key,
            "x-a"
        );
        assert_eq!(api.response_headers_to_remove, ["x-b"]);
        let cors = &api.typed_per_filter_config[CORS_FILTER];
        let policy = CorsPolicy::decode(cors.value.as_slice()).unwrap();
        assert_eq!(
            (policy.allow_methods.as_str(), policy.max_age.as_str()),
            ("GET,PUT", "60")
        );
        assert!(by_rule("0").typed_per_filter_config.is_empty());
        let hcm = match &listeners(&Table::default(), &node(), &[])[0].filter_chains[0].filters[0]
            .config_type
        {
            Some(filter::ConfigType::TypedConfig(a)) => {
                HttpConnectionManager::decode(a.value.as_slice()).unwrap()
            }
            other => panic!("{other:?}"),
        };
        let names: Vec<_> = hcm.http_filters.iter().map(|f| f.name.clone()).collect();
        // A WebSocket's stream is no body to hold: its chain has no buffer filter.
        let upgrade: Vec<_> = hcm.upgrade_configs[0]
            .filters
            .iter()
            .map(|f| f.name.clone())
            .collect();
        let mut expected = names.clone();
        expected.retain(|n| n != super::super::access::BUFFER_FILTER);
        assert_eq!(upgrade, expected);
        assert_eq!(
            names,
            [
                super::super::access::RBAC_FILTER,
                CORS_FILTER,
                super::super::access::AUTHZ_FILTER,
                super::super::access::BUFFER_FILTER,
                "envoy.filters.http.router"
            ]
        );

        let Some(route::Action::DirectResponse(d)) = &by_rule("2").action else {
            panic!("{:?}", by_rule("2").action)
        };
        assert_eq!(d.status, 500);
    }

    /// An AccessPolicy on a rule: the address rule as RBACPerRoute, the size limit as an
    /// enabled BufferPerRoute, other methods as a 405 route ahead of the rule's; a rule
    /// naming a policy that does not exist answers 500; a rule without one is untouched.
    #[test]
    fn access_policies_become_per_route_filters_and_a_405_route() {
        use super::super::access::{BUFFER_FILTER, RBAC_FILTER};
        use envoy_types::pb::envoy::config::route::v3::FilterConfig;
        use envoy_types::pb::envoy::extensions::filters::http::buffer::v3::{
            BufferPerRoute, buffer_per_route,
        };
        use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::RbacPerRoute;
        use serde_json::json;
        let gw: gateway_api::apis::standard::gateways::Gateway = serde_json::from_value(json!({
            "metadata": {"name": "gw", "namespace": "p"}, "spec": {"gatewayClassName": "portway", "listeners": []}})).unwrap();
        let guard = |name: &str| {
            json!({"type": "ExtensionRef", "extensionRef": {
            "group": "networking.datumapis.com", "kind": "AccessPolicy", "name": name}})
        };
        let route: gateway_api::apis::standard::httproutes::HttpRoute = serde_json::from_value(json!({
            "metadata": {"name": "r", "namespace": "p"},
            "spec": {"parentRefs": [{"name": "gw"}], "hostnames": ["app.example.com"], "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/a"}}], "filters": [guard("guard")], "backendRefs": [{"name": "svc"}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/b"}}], "filters": [guard("gone")], "backendRefs": [{"name": "svc"}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/c"}}], "backendRefs": [{"name": "svc"}]},
            ]},
        }))
        .unwrap();
        let policy: portway_api::AccessPolicy = serde_json::from_value(json!({
            "metadata": {"name": "guard", "namespace": "p"},
            "spec": {"targetRefs": [{"group": "networking.datumapis.com", "kind": "HTTPProxy", "name": "r"}],
                     "ip": {"allow": ["10.0.0.0/8"], "deny": ["10.1.0.0/16"]},
                     "methods": ["GET", "POST"], "maxRequestBytes": 1000},
        }))
        .unwrap();
        let (table, _) = crate::model::build(
            "portway",
            &[&gw],
            &[&route],
            &crate::model::Access {
                policies: &[&policy],
                secrets: &[],
                identity: None,
            },
            &crate::model::Layer4Routes::default(),
            &[],
        );
        let rc = route_configuration(&table, &node());
        let routes = &rc.virtual_hosts[0].routes[1..];
        let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["p/r/0/method", "p/r/0", "p/r/1", "p/r/2"]);
        // A client's identity header is removed where no sign-in sets it (this policy
        // has none).
        assert!(routes[1..].iter().all(|r| {
            r.request_headers_to_remove
                .contains(&portway_api::access::IDENTITY_HEADER.to_owned())
        }));

        let refusal = &routes[0];
        let Some(route::Action::DirectResponse(d)) = &refusal.action else {
            panic!("{:?}", refusal.action)
        };
        assert_eq!(d.status, 405);
        let method = refusal.r#match.as_ref().unwrap().headers.last().unwrap();
        assert_eq!(method.name, ":method");
        assert!(method.invert_match);
        assert_eq!(
            refusal.response_headers_to_add[0]
                .header
                .as_ref()
                .unwrap()
                .value,
            "GET, POST"
        );
        assert!(refusal.typed_per_filter_config.contains_key(RBAC_FILTER));
        assert!(!refusal.typed_per_filter_config.contains_key(BUFFER_FILTER));

        let guarded = &routes[1].typed_per_filter_config;
        let rbac = RbacPerRoute::decode(guarded[RBAC_FILTER].value.as_slice()).unwrap();
        let rules = rbac.rbac.unwrap().rules.unwrap();
        assert_eq!(rules.policies.len(), 1);
        let text = format!("{:?}", rules.policies["ip"]);
        assert!(
            text.contains("10.0.0.0") && text.contains("NotId") && text.contains("10.1.0.0"),
            "{text}"
        );
        let wrapper = FilterConfig::decode(guarded[BUFFER_FILTER].value.as_slice()).unwrap();
        assert!(!wrapper.disabled);
        let per_route = BufferPerRoute::decode(wrapper.config.unwrap().value.as_slice()).unwrap();
        let Some(buffer_per_route::Override::Buffer(b)) = per_route.r#override else {
            panic!("{per_route:?}")
        };
        assert_eq!(b.max_request_bytes.unwrap().value, 1000);

        let Some(route::Action::DirectResponse(d)) = &routes[2].action else {
            panic!("{:?}", routes[2].action)
        };
        assert_eq!(d.status, 500, "a missing policy fails closed");
        assert!(routes[3].typed_per_filter_config.is_empty());
    }

    #[test]
    fn http01_answers_come_first_in_their_virtual_host_or_get_one() {
        let answer = |host: &str, token: &str| Http01 {
            host: host.into(),
            token: token.into(),
            key_authorization: format!("{token}.thumb"),
        };
        let secrets = super::super::Secrets {
            certificates: Vec::new(),
            http01: vec![
                answer("app.example.com", "t1"),
                answer("new.example.com", "t2"),
                answer("new.example.com", "t3"),
            ],
        };
        let rcs = resources(ROUTE_TYPE, &table(), &secrets, &node());
        let rc = RouteConfiguration::decode(rcs[0].value.as_slice()).unwrap();
        let vhost = |name: &str| {
            rc.virtual_hosts
                .iter()
                .find(|v| v.domains.iter().any(|d| d == name))
                .unwrap_or_else(|| panic!("no virtual host for {name}"))
        };
        let app = vhost("app.example.com");
        assert_eq!(app.routes[0].name, "acme-http01/t1");
        assert!(app.routes.len() > 1, "the routes are kept after the answer");
        let Some(route::Action::DirectResponse(d)) = &app.routes[0].action else {
            panic!("{:?}", app.routes[0].action)
        };
        assert_eq!(d.status, 200);
        assert_eq!(
            d.body.as_ref().unwrap().specifier,
            Some(data_source::Specifier::InlineString("t1.thumb".into()))
        );
        assert_eq!(
            app.routes[0].r#match.as_ref().unwrap().path_specifier,
            Some(route_match::PathSpecifier::Path(
                "/.well-known/acme-challenge/t1".into()
            ))
        );
        let new: Vec<&str> = vhost("new.example.com")
            .routes
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(new, ["acme-http01/t3", "acme-http01/t2"]);
    }
}
