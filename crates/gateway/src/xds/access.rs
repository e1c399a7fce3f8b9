//! AccessPolicies as Envoy filters: one filter per rule in the connection manager's chain,
//! off (or without rules) unless a route's own config turns it on, so a route without a
//! policy pays nothing. The same fields the built-in edge checks in `crate::policy`, in
//! the same order: `rbac` (addresses) before `cors`; then `ext_authz` (rate limits and
//! basic auth, asked of the xDS server: see `authz`); then the method, as a route ahead of the rule's own
//! that answers 405; then `buffer` (size, 413).

use envoy_types::pb::envoy::config::core::v3::{
    ApiVersion, CidrRange, DataSource, GrpcService, HeaderValue, HeaderValueOption, data_source,
    grpc_service, header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy as RbacPolicy, Principal, Rbac as RbacRules, permission, principal,
    rbac::Action,
};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, FilterConfig, HeaderMatcher, header_matcher,
};
use envoy_types::pb::envoy::extensions::filters::http::buffer::v3::{
    Buffer, BufferPerRoute, buffer_per_route,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3::{
    CheckSettings, ExtAuthz, ExtAuthzPerRoute, ext_authz, ext_authz_per_route,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::{Rbac, RbacPerRoute};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_filter,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use ipnet::IpNet;

use super::render::any;
use crate::policy::Policy;

pub const RBAC_FILTER: &str = "envoy.filters.http.rbac";
pub const BUFFER_FILTER: &str = "envoy.filters.http.buffer";
pub const AUTHZ_FILTER: &str = "envoy.filters.http.ext_authz";
const AUTHZ_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";
const AUTHZ_ROUTE_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute";
/// The bootstrap's cluster of the xDS server (`portway envoy-bootstrap`), which also
/// answers external authorization.
const XDS_CLUSTER: &str = "xds_cluster";
const RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const RBAC_ROUTE_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute";
const BUFFER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer";
const BUFFER_ROUTE_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute";
const FILTER_CONFIG_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.FilterConfig";

/// The address filter: without rules it enforces nothing; a route's policy brings them.
pub fn rbac_filter() -> HttpFilter {
    HttpFilter {
        name: RBAC_FILTER.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(
            RBAC_TYPE,
            &Rbac::default(),
        ))),
        ..Default::default()
    }
}

/// External authorization by the xDS server, off in the chain. A check that fails or
/// times out refuses the request (never lets it through).
pub fn authz_filter() -> HttpFilter {
    let config = ExtAuthz {
        transport_api_version: ApiVersion::V3 as i32,
        failure_mode_allow: false,
        // Closed, and saying so: a 500 as the edge gives, not a 403 that looks like a
        // refusal.
        status_on_error: Some(HttpStatus {
            code: StatusCode::InternalServerError as i32,
        }),
        services: Some(ext_authz::Services::GrpcService(GrpcService {
            target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                grpc_service::EnvoyGrpc {
                    cluster_name: XDS_CLUSTER.into(),
                    ..Default::default()
                },
            )),
            // A slow hash check may queue behind others (Envoy's default is 200 ms).
            timeout: Some(PbDuration {
                seconds: 10,
                nanos: 0,
            }),
            ..Default::default()
        })),
        ..Default::default()
    };
    HttpFilter {
        name: AUTHZ_FILTER.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(
            AUTHZ_TYPE, &config,
        ))),
        disabled: true,
        ..Default::default()
    }
}

/// The size filter, off in the chain: it holds a request whole, which only a route with a
/// limit may do (streams elsewhere must flow).
pub fn buffer_filter() -> HttpFilter {
    HttpFilter {
        name: BUFFER_FILTER.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(
            BUFFER_TYPE,
            &Buffer {
                max_request_bytes: Some(UInt32Value {
                    value: u32::try_from(portway_api::access::MAX_REQUEST_BYTES)
                        .unwrap_or(u32::MAX),
                }),
            },
        ))),
        disabled: true,
        ..Default::default()
    }
}

fn cidr(n: &IpNet) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::RemoteIp(CidrRange {
            address_prefix: n.addr().to_string(),
            prefix_len: Some(UInt32Value {
                value: u32::from(n.prefix_len()),
            }),
        })),
    }
}

fn any_of(nets: &[IpNet]) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::OrIds(principal::Set {
            ids: nets.iter().map(cidr).collect(),
        })),
    }
}

/// The per-route configs a policy adds (filter name → config).
pub fn route_configs(p: &Policy) -> Vec<(String, Any)> {
    let mut out = Vec::new();
    if !p.allow.is_empty() || !p.deny.is_empty() {
        // One ALLOW policy: (in allow, when there is one) and not in deny.
        let mut all = Vec::new();
        if !p.allow.is_empty() {
            all.push(any_of(&p.allow));
        }
        if !p.deny.is_empty() {
            all.push(Principal {
                identifier: Some(principal::Identifier::NotId(Box::new(any_of(&p.deny)))),
            });
        }
        let rules = RbacRules {
            action: Action::Allow as i32,
            policies: [(
                "ip".to_owned(),
                RbacPolicy {
                    permissions: vec![Permission {
                        rule: Some(permission::Rule::Any(true)),
                    }],
                    principals: vec![Principal {
                        identifier: Some(principal::Identifier::AndIds(principal::Set {
                            ids: all,
                        })),
                    }],
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        out.push((
            RBAC_FILTER.to_owned(),
            any(
                RBAC_ROUTE_TYPE,
                &RbacPerRoute {
                    rbac: Some(Rbac {
                        rules: Some(rules),
                        ..Default::default()
                    }),
                },
            ),
        ));
    }
    if p.authenticates() {
        let per_route = ExtAuthzPerRoute {
            r#override: Some(ext_authz_per_route::Override::CheckSettings(
                CheckSettings {
                    context_extensions: [(super::authz::POLICY_KEY.to_owned(), p.name.clone())]
                        .into(),
                    ..Default::default()
                },
            )),
        };
        out.push((
            AUTHZ_FILTER.to_owned(),
            enabled(any(AUTHZ_ROUTE_TYPE, &per_route)),
        ));
    }
    if let Some(max) = p.max_request_bytes {
        let per_route = BufferPerRoute {
            r#override: Some(buffer_per_route::Override::Buffer(Buffer {
                max_request_bytes: Some(UInt32Value {
                    value: u32::try_from(max).unwrap_or(u32::MAX),
                }),
            })),
        };
        out.push((
            BUFFER_FILTER.to_owned(),
            enabled(any(BUFFER_ROUTE_TYPE, &per_route)),
        ));
    }
    out
}

/// A per-route config that turns on a filter the chain has off.
fn enabled(config: Any) -> Any {
    any(
        FILTER_CONFIG_TYPE,
        &FilterConfig {
            config: Some(config),
            disabled: false,
            ..Default::default()
        },
    )
}

/// For a policy with `methods`: the header match that picks every other method, and the
/// 405 the route ahead of the rule answers them with (with `Allow`).
pub fn method_refusal(
    p: &Policy,
) -> Option<(HeaderMatcher, DirectResponseAction, HeaderValueOption)> {
    if p.methods.is_empty() {
        return None;
    }
    let names: Vec<&str> = p.methods.iter().map(http::Method::as_str).collect();
    let allow = names.join(", ");
    let matcher = HeaderMatcher {
        name: ":method".into(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            StringMatcher {
                // Methods are upper-case letters only (validated), so no escaping.
                match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                    regex: format!("^({})$", names.join("|")),
                    ..Default::default()
                })),
                ..Default::default()
            },
        )),
        invert_match: true,
        ..Default::default()
    };
    let response = DirectResponseAction {
        status: 405,
        body: Some(DataSource {
            specifier: Some(data_source::Specifier::InlineString(format!(
                "this method is not allowed here; allowed: {allow}"
            ))),
            ..Default::default()
        }),
        ..Default::default()
    };
    let header = HeaderValueOption {
        header: Some(HeaderValue {
            key: "allow".into(),
            value: allow,
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    };
    Some((matcher, response, header))
}
