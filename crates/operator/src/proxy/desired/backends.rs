//! Backends: each (rule, backend) pair of the spec, through the connectors it names, to
//! the devices that advertise its endpoint; or, without a connector, to an origin the
//! sidecar reaches itself.

use std::collections::{BTreeMap, BTreeSet};

use portway_api::{
    Connector, ConnectorAdvertisement, ConnectorReference, HttpProxy, Protocol, Target, headers,
    is_condition_true, selector_matches,
};

use super::conditions::Problem;
use super::reasons::{CONNECTOR_NOT_FOUND, INVALID, NOT_ADVERTISED, ORIGIN_NOT_ALLOWED};

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

/// One resolved backend: a (rule, backend) pair through one connector, or to an origin.
pub(super) struct Backend<'a> {
    pub rule: usize,
    pub backend: usize,
    /// `None`: an origin the sidecar reaches itself.
    pub connector: Option<&'a Connector>,
    /// The device's id, or [`headers::DIRECT`].
    pub node_id: &'a str,
    pub endpoint: Endpoint,
    /// For an origin: the name its certificate is checked against (https), and the
    /// `Host` it is sent (`None`: the public one).
    pub tls_name: Option<String>,
    pub authority: Option<String>,
}

impl Backend<'_> {
    /// The connector's name; `direct` for an origin.
    pub fn connector_name(&self) -> &str {
        self.connector.map_or(headers::DIRECT, |c| {
            c.metadata.name.as_deref().unwrap_or_default()
        })
    }

    /// Whether the connector's agent is connected; its endpoints' readiness follows. An
    /// origin is always ready: the sidecar answers for it.
    pub fn ready(&self) -> bool {
        self.connector.is_none_or(connector_ready)
    }
}

/// Whether a connector's agent is connected (holds a current lease): the readiness of the
/// endpoints of every backend through it.
pub(crate) fn connector_ready(c: &Connector) -> bool {
    c.status
        .as_ref()
        .is_some_and(|s| is_condition_true(&s.conditions, "Ready"))
}

/// An origin's TLS name and `Host`, or why it may not be reached: the edge's own machine
/// and link are refused unless `allowed` ([`portway_api::origins`]). The `Host` is the
/// rule's rewritten hostname, else the origin's name (its `tls.hostname`, or the
/// endpoint's DNS name), else the public one.
fn origin(
    field: &str,
    backend: &portway_api::HttpProxyBackend,
    endpoint: &Endpoint,
    rewritten_host: Option<&str>,
    allowed: &[ipnet::IpNet],
) -> Result<(Option<String>, Option<String>), Problem> {
    let host = endpoint.target.host.as_str();
    let refused =
        |why: String| Problem::new(ORIGIN_NOT_ALLOWED, format!("{field}.endpoint: {why}"));
    let ip = host
        .trim_matches(['[', ']'])
        .parse::<std::net::IpAddr>()
        .ok();
    match ip {
        Some(ip) => portway_api::origins::check(ip, allowed).map_err(refused)?,
        None if portway_api::origins::is_localhost(host) => {
            portway_api::origins::check(std::net::Ipv4Addr::LOCALHOST.into(), allowed)
                .map_err(|_| refused(format!("{host} is this machine, which an origin may not be; an administrator may allow it with --allow-origin-network")))?;
        }
        None => {}
    }
    let name = backend
        .tls
        .as_ref()
        .and_then(|t| t.hostname.clone())
        .or_else(|| ip.is_none().then(|| host.to_owned()));
    let tls_name = (endpoint.proto == "https").then(|| name.clone()).flatten();
    let authority = rewritten_host.map(str::to_owned).or(name);
    Ok((tls_name, authority))
}

/// The backends the proxy can route to, and why the others cannot be used.
pub(super) struct Backends<'a> {
    /// In spec order; a backend through several connectors once per connector, by name.
    pub resolved: Vec<Backend<'a>>,
    pub problems: Vec<Problem>,
}

pub(super) fn resolve<'a>(
    proxy: &HttpProxy,
    connectors: &[&'a Connector],
    advertisements: &[&ConnectorAdvertisement],
    allowed_origins: &[ipnet::IpNet],
) -> Backends<'a> {
    let project = proxy.metadata.namespace.as_deref().unwrap_or_default();
    let mut resolved = Vec::new();
    let mut problems = Vec::new();
    for (i, rule) in proxy.spec.rules.iter().enumerate() {
        for (j, backend) in rule.backends.iter().enumerate() {
            let field = format!("spec.rules[{i}].backends[{j}]");
            let endpoint = match parse_endpoint(&backend.endpoint) {
                Ok(e) => e,
                Err(e) => {
                    problems.push(Problem::new(INVALID, format!("{field}.endpoint: {e}")));
                    continue;
                }
            };
            if backend.connector.is_none() {
                let rewritten = portway_api::filters::host_override(rule);
                match origin(
                    &field,
                    backend,
                    &endpoint,
                    rewritten.as_deref(),
                    allowed_origins,
                ) {
                    Ok((tls_name, authority)) => resolved.push(Backend {
                        rule: i,
                        backend: j,
                        connector: None,
                        node_id: headers::DIRECT,
                        endpoint,
                        tls_name,
                        authority,
                    }),
                    Err(p) => problems.push(p),
                }
                continue;
            }
            // TLS to the app runs inside the tunnel, checked against this name.
            let tls_name = (endpoint.proto == "https").then(|| {
                backend
                    .tls
                    .as_ref()
                    .and_then(|t| t.hostname.clone())
                    .unwrap_or_else(|| endpoint.target.host.clone())
            });
            let (reachable, refused) = reachable_through(
                &field,
                Wanted {
                    endpoint: &backend.endpoint,
                    target: &endpoint.target,
                    protocol: Protocol::Tcp,
                },
                backend.connector.as_ref(),
                connectors,
                advertisements,
                project,
            );
            problems.extend(refused);
            for (c, node_id) in reachable {
                resolved.push(Backend {
                    rule: i,
                    backend: j,
                    connector: Some(c),
                    node_id,
                    endpoint: endpoint.clone(),
                    tls_name: tls_name.clone(),
                    authority: None,
                });
            }
        }
    }
    Backends { resolved, problems }
}

/// The connectors that carry a backend (`field`, e.g. `spec.backends[0]`) to `target`
/// (written `endpoint` in the spec), each with its device's id: those `reference`
/// selects that advertise the target. A connector that has not reported its id cannot be
/// dialed yet; it gets no backend until it does (clients meet a 503 or a refused
/// connection meanwhile).
/// The problems say why a selected connector may not be used, or why none is selected.
pub(crate) fn reachable_through<'a>(
    field: &str,
    wanted: Wanted<'_>,
    reference: Option<&ConnectorReference>,
    connectors: &[&'a Connector],
    advertisements: &[&ConnectorAdvertisement],
    project: &str,
) -> (Vec<(&'a Connector, &'a str)>, Vec<Problem>) {
    let Wanted {
        endpoint,
        target,
        protocol,
    } = wanted;
    let matched = match select_connectors(field, reference, connectors, project) {
        Ok(m) => m,
        Err(p) => return (Vec::new(), vec![p]),
    };
    let mut reachable = Vec::new();
    let mut problems = Vec::new();
    for c in matched {
        match check_advertised(field, endpoint, target, protocol, c, advertisements) {
            Err(p) => problems.push(p),
            Ok(()) => reachable.extend(c.endpoint_id().map(|id| (c, id))),
        }
    }
    (reachable, problems)
}

/// The live connectors a backend names: one by name, or all a selector matches (sorted by
/// name, so the route's order is stable).
fn select_connectors<'a>(
    field: &str,
    reference: Option<&ConnectorReference>,
    connectors: &[&'a Connector],
    project: &str,
) -> Result<Vec<&'a Connector>, Problem> {
    let Some(r) = reference else {
        return Err(Problem::new(
            INVALID,
            format!("{field}.connector: a backend needs a connector (by name or selector)"),
        ));
    };
    let matched: Vec<&Connector> = match (&r.name, &r.selector) {
        (Some(n), None) => connectors
            .iter()
            .copied()
            .filter(|c| c.metadata.name.as_deref() == Some(n))
            .collect(),
        (None, Some(sel))
            if sel.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
                && sel.match_expressions.as_ref().is_none_or(Vec::is_empty) =>
        {
            return Err(Problem::new(
                INVALID,
                format!(
                    "{field}.connector.selector: an empty selector would select every connector"
                ),
            ));
        }
        (None, Some(sel)) => {
            let mut m: Vec<&Connector> = connectors
                .iter()
                .copied()
                .filter(|c| selector_matches(sel, c.metadata.labels.as_ref()))
                .collect();
            m.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
            m
        }
        _ => {
            return Err(Problem::new(
                INVALID,
                format!("{field}.connector: set exactly one of name or selector"),
            ));
        }
    };
    let matched: Vec<&Connector> = matched
        .into_iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .collect();
    if matched.is_empty() {
        let what = match &r.name {
            Some(n) => format!("connector {n:?} does not exist"),
            None => "no connector matches the selector".into(),
        };
        return Err(Problem::new(
            CONNECTOR_NOT_FOUND,
            format!("{field}: {what} in project {project}"),
        ));
    }
    Ok(matched)
}

/// What a backend asks a device for: its endpoint as the spec writes it (for messages),
/// and the target and protocol read from it.
#[derive(Clone, Copy)]
pub(crate) struct Wanted<'a> {
    pub endpoint: &'a str,
    pub target: &'a Target,
    pub protocol: Protocol,
}

/// A device serves only what its connector allows (TCP connect enabled) and advertises.
/// `endpoint` is the target as the spec writes it, for the message.
fn check_advertised(
    field: &str,
    endpoint: &str,
    target: &Target,
    protocol: Protocol,
    connector: &Connector,
    advertisements: &[&ConnectorAdvertisement],
) -> Result<(), Problem> {
    let cname = connector.metadata.name.as_deref().unwrap_or_default();
    let ads: Vec<&ConnectorAdvertisement> = advertisements
        .iter()
        .copied()
        .filter(|a| a.spec.connector_ref.name == cname && a.metadata.deletion_timestamp.is_none())
        .collect();
    // UDP has no capability of its own in Datum's Connector: advertised is enough.
    if (protocol == Protocol::Udp || connector.connect_tcp_enabled())
        && ads
            .iter()
            .any(|a| a.spec.allows(&target.host, target.port, protocol))
    {
        return Ok(());
    }
    let offered: BTreeSet<String> = ads
        .iter()
        .flat_map(|a| a.spec.layer4.iter().flat_map(|l| l.services.iter()))
        .flat_map(|s| {
            s.ports.iter().map(move |p| match p.protocol {
                Protocol::Tcp => format!("{}:{}", s.address, p.port),
                Protocol::Udp => format!("{}:{}/udp", s.address, p.port),
            })
        })
        .collect();
    let offered = if offered.is_empty() {
        "nothing".to_owned()
    } else {
        offered.into_iter().collect::<Vec<_>>().join(", ")
    };
    Err(Problem::new(
        NOT_ADVERTISED,
        format!(
            "{field}: endpoint {endpoint} is not advertised by connector {cname} (it advertises {offered})"
        ),
    ))
}
