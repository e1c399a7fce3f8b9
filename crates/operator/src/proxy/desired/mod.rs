//! Every decision about an HTTPProxy, as a pure function: which Gateway API objects it
//! needs and what its status says. No client, no clock (the time is an input).
//!
//! [`desired`] runs the steps in order, each a module: [`hostnames`] (which names the proxy
//! may serve), [`backends`] (each backend through its connectors to the devices that may
//! serve it), [`render`] (the Gateway API objects) and [`conditions`] (the status).

pub(crate) mod backends;
pub(crate) mod conditions;
mod hostnames;
pub(crate) mod render;
#[cfg(test)]
pub(crate) mod tests;

use std::net::SocketAddr;

use gateway_api::apis::standard::gateways::{Gateway, GatewayStatusAddresses};
use gateway_api::apis::standard::httproutes::{HttpRoute, HttpRouteStatus};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use portway_api::{
    BackendTrafficPolicy, Connector, ConnectorAdvertisement, HttpProxy, HttpProxyStatus,
};

pub use backends::{Endpoint, parse_endpoint};
pub use render::label_name;

use conditions::{Problem, Stamp};

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
    /// An origin (a backend without a connector) at the edge's own machine or link.
    pub const ORIGIN_NOT_ALLOWED: &str = "OriginNotAllowed";
    pub const PENDING: &str = "Pending";
    /// At least one backend's connector is Ready (its agent holds a current lease), so
    /// the public URL reaches a device; False means it answers 503.
    pub const BACKENDS_READY: &str = "BackendsReady";
    pub const NO_READY_BACKEND: &str = "NoReadyBackend";
    /// A filter the schema admits but no data plane implements.
    pub const UNSUPPORTED_VALUE: &str = portway_api::filters::UNSUPPORTED_VALUE;
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
    /// Networks an origin may be in although [`portway_api::origins::FORBIDDEN`] holds
    /// them (a development machine's loopback).
    pub allowed_origins: Vec<ipnet::IpNet>,
}

/// `CertificatesReady` for a hostname: status, reason, message.
pub type CertificateReady<'a> = &'a dyn Fn(&str) -> (bool, &'static str, String);

/// What the decision needs to know.
pub struct Inputs<'a> {
    pub proxy: &'a HttpProxy,
    /// Connectors in the proxy's namespace.
    pub connectors: &'a [&'a Connector],
    /// Advertisements in the proxy's namespace.
    pub advertisements: &'a [&'a ConnectorAdvertisement],
    /// For a hostname, who owns it if this proxy may not have it (the operator's hostname
    /// index answers).
    pub claimed_by: &'a dyn Fn(&str) -> Option<String>,
    /// The generated HTTPRoute's status, as the gateway reported it.
    pub route_status: Option<&'a HttpRouteStatus>,
    /// The generated Gateway's addresses, as the gateway reported them.
    pub gateway_addresses: &'a [GatewayStatusAddresses],
    pub config: &'a Config,
    /// `CertificatesReady` for a hostname (status, reason, message), when an issuer runs.
    pub certificate: Option<CertificateReady<'a>>,
    /// Whether a hostname is proven to be the project's, when proof is asked for.
    pub verification: Option<&'a dyn Fn(&str) -> crate::verify::Verification>,
    /// The AccessPolicy guarding the proxy, if any: named on every rule of its route.
    pub access: Option<&'a str>,
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

/// Decides the proxy's children and status.
pub fn desired(input: &Inputs<'_>) -> Desired {
    let proxy = input.proxy;
    let stamp = Stamp {
        generation: proxy.metadata.generation,
        now: input.now,
    };
    let canonical = proxy
        .metadata
        .uid
        .as_ref()
        .map(|uid| format!("{uid}.{}", input.config.zone));
    // Hostnames first: one another proxy owns refuses this one.
    let hosts = hostnames::resolve(
        proxy,
        input.claimed_by,
        canonical.as_deref(),
        input.certificate,
        input.verification,
        stamp,
    );
    // Only what a connector's device advertises may be routed to it.
    let backends = backends::resolve(
        proxy,
        input.connectors,
        input.advertisements,
        &input.config.allowed_origins,
    );
    // Objects stored before a validation rule existed (a reserved header in a filter,
    // say) are refused here too, never half-applied.
    let invalid = portway_api::validation::Validate::validate(proxy)
        .into_iter()
        .map(|e| Problem::new(INVALID, e.to_string()));
    // Accepted means implemented: a filter no data plane carries out refuses the proxy.
    let unsupported = portway_api::filters::unsupported_in_proxy(&proxy.spec)
        .into_iter()
        .map(|e| Problem::new(UNSUPPORTED_VALUE, e.to_string()));
    // The zone is Portway's: its apex or a wildcard in it would take every project's
    // names (and the tunnel URLs `portway http` makes there).
    let zone = input.config.zone.trim_end_matches('.').to_ascii_lowercase();
    let reserved = proxy.spec.hostnames.iter().enumerate().filter_map(|(i, h)| {
        let h = h.trim_end_matches('.').to_ascii_lowercase();
        let in_zone = |n: &str| n == zone || n.ends_with(&format!(".{zone}"));
        let taken = h == zone || h.strip_prefix("*.").is_some_and(in_zone);
        taken.then(|| {
            Problem::new(
                INVALID,
                format!(
                    "spec.hostnames[{i}]: {h} would cover names of Portway's zone {zone} that belong to others; claim an exact name such as app.{zone}"
                ),
            )
        })
    });
    let problems: Vec<Problem> = hosts
        .problems
        .into_iter()
        .chain(reserved)
        .chain(invalid)
        .chain(unsupported)
        .chain(backends.problems)
        .collect();

    let summaries =
        conditions::hostname_summaries(&hosts.statuses, !proxy.spec.hostnames.is_empty(), stamp);
    let mut status = HttpProxyStatus {
        conditions: Vec::new(),
        hostnames: Vec::new(),
        hostname_statuses: hosts.statuses,
        canonical_hostname: canonical,
        addresses: input.gateway_addresses.to_vec(),
    };
    // Any problem refuses the whole proxy: no children, so nothing half-works.
    if let Some(refused) = conditions::refused(&problems, &hosts.condition, stamp) {
        status.conditions = refused;
        status.conditions.extend(summaries);
        return Desired {
            status,
            ..Default::default()
        };
    }
    let accepted_by_gateway = conditions::accepted_by_gateway(
        input.route_status,
        &input.config.controller_name,
        proxy.metadata.name.as_deref().unwrap_or_default(),
    );
    // A proxy whose every rule redirects needs no device.
    let forwards = proxy
        .spec
        .rules
        .iter()
        .any(|r| !r.filters.iter().any(|f| f.request_redirect.is_some()));
    status.conditions = conditions::accepted(
        &backends.resolved,
        forwards,
        accepted_by_gateway,
        &hosts.condition,
        stamp,
    );
    status.conditions.extend(summaries);
    if accepted_by_gateway {
        status.hostnames = hosts.active.clone();
        status.hostnames.sort();
        status.hostnames.dedup();
    }
    Desired {
        gateway: Some(render::gateway(
            proxy,
            &hosts.active,
            &input.config.gateway_class,
        )),
        services: render::services(proxy, &backends.resolved),
        slices: render::slices(proxy, &backends.resolved, &input.config.sidecars),
        route: Some(render::route(
            proxy,
            hosts.active,
            &backends.resolved,
            input.access,
        )),
        policy: Some(render::policy(proxy)),
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
