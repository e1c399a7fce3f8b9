//! Backends: each (rule, backend) pair of the spec, through the connectors it names, to
//! the devices that advertise its endpoint.

use std::collections::{BTreeMap, BTreeSet};

use portway_api::{
    Connector, ConnectorAdvertisement, ConnectorReference, HttpProxy, Protocol, Target,
    is_condition_true, selector_matches,
};

use super::conditions::Problem;
use super::reasons::{CONNECTOR_NOT_FOUND, INVALID, NOT_ADVERTISED};

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

/// One resolved backend: a (rule, backend) pair through one connector.
pub(super) struct Backend<'a> {
    pub rule: usize,
    pub backend: usize,
    pub connector: &'a Connector,
    pub node_id: &'a str,
    pub endpoint: Endpoint,
}

impl Backend<'_> {
    pub fn connector_name(&self) -> &str {
        self.connector.metadata.name.as_deref().unwrap_or_default()
    }

    /// Whether the connector's agent is connected; its endpoints' readiness follows.
    pub fn ready(&self) -> bool {
        self.connector
            .status
            .as_ref()
            .is_some_and(|s| is_condition_true(&s.conditions, "Ready"))
    }
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
            let matched =
                match select_connectors(&field, backend.connector.as_ref(), connectors, project) {
                    Ok(m) => m,
                    Err(p) => {
                        problems.push(p);
                        continue;
                    }
                };
            for c in matched {
                if let Err(p) =
                    check_advertised(&field, &backend.endpoint, &endpoint, c, advertisements)
                {
                    problems.push(p);
                    continue;
                }
                // A connector that has not reported its id cannot be dialed yet; it gets no
                // backend until it does (requests meet 503 meanwhile).
                if let Some(node_id) = c.endpoint_id() {
                    resolved.push(Backend {
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
    Backends { resolved, problems }
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

/// A device serves only what its connector allows (TCP connect enabled) and advertises.
fn check_advertised(
    field: &str,
    url: &str,
    endpoint: &Endpoint,
    connector: &Connector,
    advertisements: &[&ConnectorAdvertisement],
) -> Result<(), Problem> {
    let cname = connector.metadata.name.as_deref().unwrap_or_default();
    let ads: Vec<&ConnectorAdvertisement> = advertisements
        .iter()
        .copied()
        .filter(|a| a.spec.connector_ref.name == cname && a.metadata.deletion_timestamp.is_none())
        .collect();
    let target = &endpoint.target;
    if connector.connect_tcp_enabled()
        && ads
            .iter()
            .any(|a| a.spec.allows(&target.host, target.port, Protocol::Tcp))
    {
        return Ok(());
    }
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
    Err(Problem::new(
        NOT_ADVERTISED,
        format!(
            "{field}: endpoint {url} is not advertised by connector {cname} (it advertises {offered})"
        ),
    ))
}
