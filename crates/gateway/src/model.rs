//! The route model: Gateway API objects of our class turned into one immutable table that
//! both renderers use — the built-in edge looks requests up in it, the xDS server
//! translates it to Envoy configuration. Built by a pure function, swapped whole.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use gateway_api::apis::experimental::tcproutes::TcpRoute;
use gateway_api::apis::experimental::tlsroutes::TlsRoute;
use gateway_api::apis::experimental::udproutes::UdpRoute;
use gateway_api::apis::standard::gateways::Gateway;
use gateway_api::apis::standard::httproutes::{
    HttpRoute, HttpRouteRulesBackendRefsFilters, HttpRouteRulesFilters, HttpRouteRulesMatches,
    HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesMethod, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParamsType,
};
use http::header::{HeaderName, HeaderValue};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use portway_api::filters::Level;
use portway_api::{AccessPolicy, Target, headers};

use crate::filters::{Cors, Redirect, Rewrite};
use crate::policy::Policy;

/// How a path is matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    /// Matches whole segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    Prefix(String),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => path == p,
            Self::Prefix(p) if p == "/" => true,
            Self::Prefix(p) => {
                let p = p.trim_end_matches('/');
                path == p
                    || path
                        .strip_prefix(p)
                        .is_some_and(|rest| rest.starts_with('/'))
            }
        }
    }
}

/// Header changes, applied in order remove, set, add. Names and values are parsed once,
/// when the table is built, not per request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderFilter {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

fn pair(name: &str, value: &str) -> Option<(HeaderName, HeaderValue)> {
    Some((
        HeaderName::from_bytes(name.as_bytes()).ok()?,
        HeaderValue::from_str(value).ok()?,
    ))
}

/// Gateway API declares the same RequestHeaderModifier twice (for rules and for
/// backendRefs) as distinct Rust types with the same fields.
macro_rules! modifier {
    ($out:ident, $m:ident) => {{
        let set: Vec<_> = $m
            .set
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect();
        let add: Vec<_> = $m
            .add
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect();
        $out.push(&set, &add, $m.remove.as_deref().unwrap_or_default());
    }};
}

/// The request and response header filters of a list of either Gateway API filter type.
macro_rules! modifiers {
    ($filters:ident) => {{
        let (mut request, mut response) = (Self::default(), Self::default());
        for f in $filters {
            if let Some(m) = &f.request_header_modifier {
                modifier!(request, m);
            }
            if let Some(m) = &f.response_header_modifier {
                modifier!(response, m);
            }
        }
        (request, response)
    }};
}

impl HeaderFilter {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Reserved headers (`datum-*`, `x-iroh-*`) never enter a user-visible filter, even
    /// when an object stored before admission refused them names one: they would choose
    /// the device. The backend's [`Tunnel`] carries them, typed.
    fn push(&mut self, set: &[(String, String)], add: &[(String, String)], remove: &[String]) {
        // Nor Host: Envoy refuses a whole route configuration that changes it.
        let user = |n: &&String| !headers::is_reserved(n) && !n.eq_ignore_ascii_case("host");
        self.set.extend(
            set.iter()
                .filter(|(n, _)| user(&n))
                .filter_map(|(n, v)| pair(n, v)),
        );
        self.add.extend(
            add.iter()
                .filter(|(n, _)| user(&n))
                .filter_map(|(n, v)| pair(n, v)),
        );
        self.remove.extend(
            remove
                .iter()
                .filter(user)
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok()),
        );
    }

    /// A rule's request and response header changes.
    fn from_rule(filters: &[HttpRouteRulesFilters]) -> (Self, Self) {
        modifiers!(filters)
    }

    /// A backendRef's request and response header changes.
    fn from_backend(filters: &[HttpRouteRulesBackendRefsFilters]) -> (Self, Self) {
        modifiers!(filters)
    }

    /// This filter, then `next`, as one filter with the same effect (applied remove, set,
    /// add): what `next` removes or sets undoes this one's set and add of that name. Both
    /// data planes apply the composed filter, so the order never depends on where Envoy
    /// puts a list.
    pub fn then(&self, next: &HeaderFilter) -> HeaderFilter {
        let undone =
            |n: &HeaderName| next.remove.contains(n) || next.set.iter().any(|(m, _)| m == n);
        let mut remove = self.remove.clone();
        remove.extend(
            next.remove
                .iter()
                .filter(|n| !self.remove.contains(n))
                .cloned(),
        );
        HeaderFilter {
            set: self
                .set
                .iter()
                .filter(|(n, _)| !undone(n))
                .chain(&next.set)
                .cloned()
                .collect(),
            add: self
                .add
                .iter()
                .filter(|(n, _)| !undone(n))
                .chain(&next.add)
                .cloned()
                .collect(),
            remove,
        }
    }

    /// The value a filter sets for `name`, if any.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.set
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.to_str().ok())
    }
}

/// Where a backend's requests go: the device (NodeID) and the target on it. Typed, read
/// from the operator's header modifier (the first one on the backendRef that names the
/// device), and set on the internal hop after every user filter, so no filter can
/// change it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// The device's id, or [`headers::DIRECT`] for an origin the sidecar reaches itself.
    pub node_id: HeaderValue,
    pub host: HeaderValue,
    pub port: HeaderValue,
    pub proto: HeaderValue,
    /// The name an https target's certificate is checked against (`-` for none).
    pub tls_name: Option<HeaderValue>,
    /// An origin's `Host` (`-` keeps the public one); `None` for a device.
    pub authority: Option<HeaderValue>,
}

impl Tunnel {
    fn from_backend(filters: &[HttpRouteRulesBackendRefsFilters]) -> Option<Self> {
        let set = filters
            .iter()
            .filter_map(|f| f.request_header_modifier.as_ref())
            .filter_map(|m| m.set.as_deref())
            .find(|set| {
                set.iter()
                    .any(|h| h.name.eq_ignore_ascii_case(headers::NODE_ID))
            })?;
        let get = |name: &str| {
            set.iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| HeaderValue::from_str(&h.value).ok())
        };
        let node_id = get(headers::NODE_ID)?;
        // An origin's name and Host are written as `-` when absent, never left out, so a
        // client's own never stands in for them.
        let origin = node_id == headers::DIRECT;
        let none = || origin.then(|| HeaderValue::from_static(headers::NONE));
        Some(Self {
            host: get(headers::TARGET_HOST)?,
            port: get(headers::TARGET_PORT)?,
            proto: get(headers::TARGET_PROTO).unwrap_or(HeaderValue::from_static("http")),
            tls_name: get(headers::TARGET_TLS_NAME).or_else(none),
            authority: get(headers::TARGET_AUTHORITY)
                .filter(|_| origin)
                .or_else(none),
            node_id,
        })
    }

    /// The target `host:port` on the device (or the origin).
    pub fn target(&self) -> Option<Target> {
        Some(Target {
            host: self.host.to_str().ok()?.to_owned(),
            port: self.port.to_str().ok()?.parse().ok()?,
        })
    }

    /// Whether it is an origin, not a device.
    pub fn is_origin(&self) -> bool {
        self.node_id == headers::DIRECT
    }

    /// The routing headers, for the sidecar (in process, or behind Envoy).
    pub fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        let mut out = vec![
            (
                HeaderName::from_static(headers::NODE_ID),
                self.node_id.clone(),
            ),
            (
                HeaderName::from_static(headers::TARGET_HOST),
                self.host.clone(),
            ),
            (
                HeaderName::from_static(headers::TARGET_PORT),
                self.port.clone(),
            ),
            (
                HeaderName::from_static(headers::TARGET_PROTO),
                self.proto.clone(),
            ),
        ];
        if let Some(name) = &self.tls_name {
            out.push((
                HeaderName::from_static(headers::TARGET_TLS_NAME),
                name.clone(),
            ));
        }
        if let Some(authority) = &self.authority {
            out.push((
                HeaderName::from_static(headers::TARGET_AUTHORITY),
                authority.clone(),
            ));
        }
        out
    }

    /// Sets the routing headers, replacing whatever a filter or client put there.
    pub fn apply(&self, h: &mut http::HeaderMap) {
        for (n, v) in self.headers() {
            h.insert(n, v);
        }
    }
}

/// One backend of a route rule: a Service whose EndpointSlices say whether it is ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Service name (unique within the route's namespace).
    pub service: String,
    pub weight: u32,
    pub ready: bool,
    /// The backendRef's user filters (never a reserved header).
    pub headers: HeaderFilter,
    /// The response header changes when this backend answers: the rule's, then the
    /// backendRef's, composed ([`HeaderFilter::then`]).
    pub response: HeaderFilter,
    /// The device and target; a backendRef that names none is never ready.
    pub tunnel: Option<Tunnel>,
}

/// One rule × match of an HTTPRoute, in precedence order within its host.
#[derive(Debug)]
pub struct Route {
    /// `namespace/name` of the HTTPRoute.
    pub route: String,
    pub rule: usize,
    pub path: PathMatch,
    pub method: Option<String>,
    /// Exact header matches (lower-case names).
    pub headers: Vec<(String, String)>,
    /// Exact query parameter matches.
    pub query: Vec<(String, String)>,
    /// The rule's request header filter.
    pub filter: HeaderFilter,
    /// The rule's response header filter (for answers no backend gave: redirects).
    pub response: HeaderFilter,
    /// Answered with a redirect; no backend is asked.
    pub redirect: Option<Redirect>,
    /// The host and path the device sees instead of the public ones.
    pub rewrite: Option<Rewrite>,
    pub cors: Option<Arc<Cors>>,
    /// The AccessPolicy the rule's `ExtensionRef` names, compiled.
    pub access: Option<Arc<Policy>>,
    /// A filter neither data plane implements (or cannot apply to this match): answered
    /// with 500 and this reason, never skipped, since skipping it would serve what the
    /// route's author did not ask for.
    pub unsupported: Option<String>,
    pub backends: Vec<Backend>,
    /// Round-robin position among ready backends.
    cursor: AtomicUsize,
    /// For precedence ties: older routes first.
    created: i64,
}

impl Route {
    pub fn matches(
        &self,
        method: &str,
        path: &str,
        headers: &http::HeaderMap,
        query: Option<&str>,
    ) -> bool {
        self.path.matches(path)
            && self.method.as_deref().is_none_or(|m| m == method)
            && self
                .headers
                .iter()
                .all(|(n, v)| headers.get(n).and_then(|h| h.to_str().ok()) == Some(v.as_str()))
            && self.query.iter().all(|(n, v)| {
                query.is_some_and(|q| {
                    url::form_urlencoded::parse(q.as_bytes())
                        .any(|(k, val)| k == n.as_str() && val == v.as_str())
                })
            })
    }

    /// Ready backends, starting at the next round-robin position (weights repeat a
    /// backend); the caller tries them in order, so a failed dial fails over.
    pub fn ready_in_order(&self) -> Vec<&Backend> {
        ready_in_order(&self.backends, &self.cursor)
    }

    /// Precedence per Gateway API: exact path, longer prefix, method, more headers, more
    /// query params, older route, then name.
    fn precedence(&self) -> impl Ord + '_ {
        let (exact, len) = match &self.path {
            PathMatch::Exact(p) => (1, p.len()),
            PathMatch::Prefix(p) => (0, p.len()),
        };
        (
            std::cmp::Reverse(exact),
            std::cmp::Reverse(len),
            std::cmp::Reverse(usize::from(self.method.is_some())),
            std::cmp::Reverse(self.headers.len()),
            std::cmp::Reverse(self.query.len()),
            self.created,
            self.route.as_str(),
            self.rule,
        )
    }
}

/// Ready `backends`, starting at the next round-robin position of `cursor` (weights
/// repeat a backend); the caller tries them in order, so a failed dial fails over.
fn ready_in_order<'a>(backends: &'a [Backend], cursor: &AtomicUsize) -> Vec<&'a Backend> {
    let ready: Vec<&Backend> = backends
        .iter()
        .filter(|b| b.ready && b.weight > 0)
        .collect();
    if ready.is_empty() {
        return ready;
    }
    let total: usize = ready.iter().map(|b| b.weight as usize).sum();
    let mut slot = cursor.fetch_add(1, Ordering::Relaxed) % total;
    let start = ready
        .iter()
        .position(|b| {
            let w = b.weight as usize;
            if slot < w {
                true
            } else {
                slot -= w;
                false
            }
        })
        .unwrap_or(0);
    ready
        .iter()
        .cycle()
        .skip(start)
        .take(ready.len())
        .copied()
        .collect()
}

/// A public TCP port (a TCPRoute on a Gateway's `TCP` listener), or a name passed through
/// on the TLS port (a TLSRoute on a `TLS` listener in `Passthrough` mode): each connection
/// goes to one of its backends, ready ones in round-robin order.
#[derive(Debug)]
pub struct TcpService {
    pub port: u16,
    /// `namespace/name` of the TCPRoute.
    pub route: String,
    pub backends: Vec<Backend>,
    cursor: AtomicUsize,
}

impl TcpService {
    /// A service whose round robin starts at its first ready backend.
    pub fn new(port: u16, route: String, backends: Vec<Backend>) -> Self {
        Self {
            port,
            route,
            backends,
            cursor: AtomicUsize::new(0),
        }
    }

    /// The device and target of each ready backend, in the order to try them.
    pub fn choices(&self) -> Vec<(String, Target)> {
        ready_in_order(&self.backends, &self.cursor)
            .into_iter()
            .filter_map(|b| {
                let t = b.tunnel.as_ref()?;
                Some((t.node_id.to_str().ok()?.to_owned(), t.target()?))
            })
            .collect()
    }
}

/// All routes of one hostname.
#[derive(Debug)]
pub struct Host {
    pub hostname: String,
    pub routes: Vec<Route>,
    /// Plain HTTP is redirected to HTTPS once an issued certificate covers the name,
    /// unless a route of the name says `portway.dev/https-redirect: "false"`.
    pub https_redirect: bool,
    /// `Strict-Transport-Security` for HTTPS answers (annotation `portway.dev/hsts`).
    pub hsts: Option<HeaderValue>,
}

/// The whole table: exact hostnames by hash, wildcards by longest suffix.
#[derive(Debug, Default)]
pub struct Table {
    exact: HashMap<String, Arc<Host>>,
    wildcard: Vec<(String, Arc<Host>)>,
    /// Public TCP ports.
    pub tcp: BTreeMap<u16, Arc<TcpService>>,
    /// Names passed through undecrypted on the TLS port (lowercase, exact).
    pub tls: BTreeMap<String, Arc<TcpService>>,
    /// Public UDP ports (built-in edge only).
    pub udp: BTreeMap<u16, Arc<TcpService>>,
    /// AccessPolicies in force, by `namespace/name`: what Envoy's external authorization
    /// asks the xDS server about.
    pub policies: HashMap<String, Arc<Policy>>,
    /// The key the caller's identity is signed with, once the operator has made it.
    pub identity: Option<Arc<crate::jwt::Signer>>,
}

/// Lower-cases and strips a port (`Host: a.example.com:8080`) and a trailing dot.
pub fn normalize_host(host: &str) -> String {
    let h = if host.starts_with('[') {
        host.split(']')
            .next()
            .map(|h| format!("{h}]"))
            .unwrap_or_default()
    } else {
        host.rsplit_once(':')
            .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
            .map_or(host, |(h, _)| h)
            .to_owned()
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

impl Table {
    /// The host entry for a request host: a hash lookup, then wildcard suffixes.
    pub fn lookup(&self, host: &str) -> Option<&Arc<Host>> {
        let host = normalize_host(host);
        self.exact.get(&host).or_else(|| {
            self.wildcard
                .iter()
                .find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
                .map(|(_, h)| h)
        })
    }

    pub fn hosts(&self) -> impl Iterator<Item = &Arc<Host>> {
        self.exact
            .values()
            .chain(self.wildcard.iter().map(|(_, h)| h))
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A route accepted by one of our Gateways, for status reporting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub kind: RouteKind,
    pub route_ns: String,
    pub route: String,
    pub gateway: String,
}

/// Which kind of route an [`Attachment`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteKind {
    Http,
    Tcp,
    Tls,
    Udp,
}

fn key(ns: Option<&String>, name: Option<&String>) -> String {
    format!(
        "{}/{}",
        ns.map(String::as_str).unwrap_or_default(),
        name.map(String::as_str).unwrap_or_default()
    )
}

fn path_match(m: &HttpRouteRulesMatches) -> Option<PathMatch> {
    let Some(p) = &m.path else {
        return Some(PathMatch::Prefix("/".into()));
    };
    let value = p.value.clone().unwrap_or_else(|| "/".into());
    match p
        .r#type
        .clone()
        .unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix)
    {
        HttpRouteRulesMatchesPathType::Exact => Some(PathMatch::Exact(value)),
        HttpRouteRulesMatchesPathType::PathPrefix => Some(PathMatch::Prefix(value)),
        // Regular expressions are implementation-specific; this gateway does not serve them.
        HttpRouteRulesMatchesPathType::RegularExpression => None,
    }
}

fn method_name(m: &HttpRouteRulesMatchesMethod) -> &'static str {
    match m {
        HttpRouteRulesMatchesMethod::Get => "GET",
        HttpRouteRulesMatchesMethod::Head => "HEAD",
        HttpRouteRulesMatchesMethod::Post => "POST",
        HttpRouteRulesMatchesMethod::Put => "PUT",
        HttpRouteRulesMatchesMethod::Delete => "DELETE",
        HttpRouteRulesMatchesMethod::Connect => "CONNECT",
        HttpRouteRulesMatchesMethod::Options => "OPTIONS",
        HttpRouteRulesMatchesMethod::Trace => "TRACE",
        HttpRouteRulesMatchesMethod::Patch => "PATCH",
    }
}

/// Builds the table from the objects of `class`. Returns it with the route attachments
/// (for status).
pub fn build(
    class: &str,
    gateways: &[&Gateway],
    routes: &[&HttpRoute],
    access: &Access<'_>,
    l4: &Layer4Routes<'_>,
    slices: &[&EndpointSlice],
) -> (Table, Vec<Attachment>) {
    let Layer4Routes {
        tcp: tcp_routes,
        tls: tls_routes,
        udp: udp_routes,
    } = *l4;
    let ours: HashMap<String, &Gateway> = gateways
        .iter()
        .filter(|g| g.spec.gateway_class_name == class && g.metadata.deletion_timestamp.is_none())
        .map(|g| {
            (
                key(g.metadata.namespace.as_ref(), g.metadata.name.as_ref()),
                *g,
            )
        })
        .collect();
    // Service readiness: any ready endpoint in any slice labelled with its name.
    let mut ready: HashMap<String, bool> = HashMap::new();
    for s in slices {
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        else {
            continue;
        };
        let any = s
            .endpoints
            .iter()
            .flatten()
            .any(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true));
        *ready
            .entry(key(s.metadata.namespace.as_ref(), Some(svc)))
            .or_default() |= any;
    }
    // Each policy compiled once, however many rules name it.
    let secrets: HashMap<(&str, &str), &Secret> = access
        .secrets
        .iter()
        .map(|s| {
            (
                (
                    s.metadata.namespace.as_deref().unwrap_or_default(),
                    s.metadata.name.as_deref().unwrap_or_default(),
                ),
                *s,
            )
        })
        .collect();
    let policies: HashMap<String, Result<Arc<Policy>, String>> = access
        .policies
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let secret = |ns: &str, name: &str| secrets.get(&(ns, name)).copied();
            (
                key(p.metadata.namespace.as_ref(), p.metadata.name.as_ref()),
                Policy::compile(p, secret).map(Arc::new),
            )
        })
        .collect();
    let mut by_host: BTreeMap<String, Vec<Route>> = BTreeMap::new();
    // Per name: redirect to HTTPS allowed (every route must allow it), and HSTS.
    let mut settings: HashMap<String, (bool, Option<HeaderValue>)> = HashMap::new();
    let mut attachments = Vec::new();
    for r in routes {
        if r.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let ns = r.metadata.namespace.clone().unwrap_or_default();
        let name = r.metadata.name.clone().unwrap_or_default();
        let parents: Vec<String> = r
            .spec
            .parent_refs
            .iter()
            .flatten()
            .filter(|p| p.kind.as_deref().is_none_or(|k| k == "Gateway"))
            .map(|p| {
                format!(
                    "{}/{}",
                    p.namespace.clone().unwrap_or_else(|| ns.clone()),
                    p.name
                )
            })
            .filter(|k| ours.contains_key(k))
            .collect();
        if parents.is_empty() {
            continue;
        }
        let mut hostnames: Vec<String> = r.spec.hostnames.clone().unwrap_or_default();
        if hostnames.is_empty() {
            hostnames = parents
                .iter()
                .filter_map(|p| ours.get(p))
                .flat_map(|g| g.spec.listeners.iter().filter_map(|l| l.hostname.clone()))
                .collect();
        }
        for p in &parents {
            let gateway = p.rsplit('/').next().unwrap_or_default().to_owned();
            attachments.push(Attachment {
                kind: RouteKind::Http,
                route_ns: ns.clone(),
                route: name.clone(),
                gateway,
            });
        }
        let created = r
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second());
        let annotations = r.metadata.annotations.as_ref();
        let no_redirect = annotations
            .and_then(|a| a.get(portway_api::certificates::HTTPS_REDIRECT))
            .is_some_and(|v| v == "false");
        let hsts = annotations
            .and_then(|a| a.get(portway_api::certificates::HSTS))
            .filter(|v| portway_api::certificates::hsts(v).is_ok())
            .and_then(|v| HeaderValue::from_str(v).ok());
        for h in &hostnames {
            let s = settings
                .entry(h.to_ascii_lowercase())
                .or_insert((true, None::<HeaderValue>));
            s.0 &= !no_redirect;
            if s.1.is_none() {
                s.1.clone_from(&hsts);
            }
        }
        for (i, rule) in r.spec.rules.iter().flatten().enumerate() {
            let rule_filters = rule.filters.as_deref().unwrap_or_default();
            let (filter, response) = HeaderFilter::from_rule(rule_filters);
            let field = format!("spec.rules[{i}].filters");
            // An AccessPolicy named by ExtensionRef is ours to enforce; any other
            // extension is refused below. A policy that cannot be found or compiled
            // refuses the rule (500) rather than leave it unguarded.
            let ours: Vec<(usize, &str)> = rule_filters
                .iter()
                .enumerate()
                .filter_map(|(j, f)| f.extension_ref.as_ref().map(|e| (j, e)))
                .filter(|(_, e)| {
                    e.group == portway_api::access::GROUP && e.kind == portway_api::access::KIND
                })
                .map(|(j, e)| (j, e.name.as_str()))
                .collect();
            let mut unsupported: Vec<String> =
                portway_api::filters::unsupported(&field, Level::Rule, rule_filters)
                    .iter()
                    .filter(|e| {
                        !ours
                            .iter()
                            .any(|(j, _)| e.field == format!("{field}[{j}].extensionRef"))
                    })
                    .map(ToString::to_string)
                    .collect();
            let mut guard = None;
            match ours.as_slice() {
                [] => {}
                [(j, policy)] => match policies.get(&format!("{ns}/{policy}")) {
                    Some(Ok(p)) => guard = Some(p.clone()),
                    Some(Err(why)) => unsupported.push(format!(
                        "{field}[{j}]: AccessPolicy {policy:?} is invalid: {why}"
                    )),
                    None => unsupported.push(format!(
                        "{field}[{j}]: AccessPolicy {policy:?} does not exist"
                    )),
                },
                _ => unsupported.push(format!(
                    "{field}: a rule takes one AccessPolicy, this one names {}",
                    ours.len()
                )),
            }
            for (j, b) in rule.backend_refs.iter().flatten().enumerate() {
                unsupported.extend(
                    portway_api::filters::unsupported(
                        &format!("spec.rules[{i}].backendRefs[{j}].filters"),
                        Level::Backend,
                        b.filters.as_deref().unwrap_or_default(),
                    )
                    .iter()
                    .map(ToString::to_string),
                );
            }
            let cors = rule_filters
                .iter()
                .find_map(|f| f.cors.as_ref())
                .map(|c| Arc::new(Cors::new(c)));
            let backends: Vec<Backend> = rule
                .backend_refs
                .iter()
                .flatten()
                .filter(|b| b.kind.as_deref().is_none_or(|k| k == "Service"))
                .map(|b| {
                    let bns = b.namespace.clone().unwrap_or_else(|| ns.clone());
                    let filters = b.filters.as_deref().unwrap_or_default();
                    let tunnel = Tunnel::from_backend(filters);
                    let (headers, own_response) = HeaderFilter::from_backend(filters);
                    let response = response.then(&own_response);
                    Backend {
                        service: b.name.clone(),
                        weight: b.weight.map_or(1, |w| u32::try_from(w).unwrap_or(0)),
                        ready: tunnel.is_some()
                            && ready
                                .get(&format!("{bns}/{}", b.name))
                                .copied()
                                .unwrap_or(false),
                        headers,
                        response,
                        tunnel,
                    }
                })
                .collect();
            let default_match = [HttpRouteRulesMatches::default()];
            let matches: &[HttpRouteRulesMatches] = match rule.matches.as_deref() {
                Some(m) if !m.is_empty() => m,
                _ => &default_match,
            };
            for m in matches {
                let Some(path) = path_match(m) else { continue };
                let exact_only = |t: &Option<HttpRouteRulesMatchesHeadersType>| {
                    t.clone()
                        .is_none_or(|t| t == HttpRouteRulesMatchesHeadersType::Exact)
                };
                if m.headers.iter().flatten().any(|h| !exact_only(&h.r#type))
                    || m.query_params.iter().flatten().any(|q| {
                        q.r#type
                            .clone()
                            .is_some_and(|t| t != HttpRouteRulesMatchesQueryParamsType::Exact)
                    })
                {
                    continue;
                }
                let redirect = rule_filters
                    .iter()
                    .find_map(|f| f.request_redirect.as_ref());
                let rewrite = rule_filters.iter().find_map(|f| f.url_rewrite.as_ref());
                let mut unsupported = unsupported.clone();
                let redirect = redirect.and_then(|r| {
                    let out = Redirect::new(r, &path);
                    if out.is_none() {
                        unsupported.push(format!(
                            "spec.rules[{i}]: the redirect cannot apply to this match"
                        ));
                    }
                    out
                });
                let rewrite = rewrite.and_then(|r| {
                    let out = Rewrite::new(r, &path);
                    if out.is_none() {
                        unsupported.push(format!(
                            "spec.rules[{i}]: the rewrite cannot apply to this match"
                        ));
                    }
                    out
                });
                let unsupported = (!unsupported.is_empty()).then(|| unsupported.join("; "));
                for h in &hostnames {
                    by_host
                        .entry(h.to_ascii_lowercase())
                        .or_default()
                        .push(Route {
                            route: format!("{ns}/{name}"),
                            rule: i,
                            access: guard.clone(),
                            path: path.clone(),
                            method: m.method.as_ref().map(|m| method_name(m).to_owned()),
                            headers: m
                                .headers
                                .iter()
                                .flatten()
                                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                                .collect(),
                            query: m
                                .query_params
                                .iter()
                                .flatten()
                                .map(|q| (q.name.clone(), q.value.clone()))
                                .collect(),
                            filter: filter.clone(),
                            response: response.clone(),
                            redirect: redirect.clone(),
                            rewrite: rewrite.clone(),
                            cors: cors.clone(),
                            unsupported: unsupported.clone(),
                            backends: backends.clone(),
                            cursor: AtomicUsize::new(0),
                            created,
                        });
                }
            }
        }
    }
    let mut table = Table {
        policies: policies
            .into_iter()
            .filter_map(|(k, p)| p.ok().map(|p| (k, p)))
            .collect(),
        identity: access.identity.and_then(|s| {
            let der = s
                .data
                .as_ref()?
                .get(portway_api::access::IDENTITY_SECRET_KEY)?;
            crate::jwt::Signer::from_pkcs8(&der.0)
                .inspect_err(|e| tracing::error!("the identity signing key: {e}"))
                .ok()
                .map(Arc::new)
        }),
        ..Table::default()
    };
    for (hostname, mut routes) in by_host {
        routes.sort_by(|a, b| a.precedence().cmp(&b.precedence()));
        let (https_redirect, hsts) = settings.remove(&hostname).unwrap_or((true, None));
        let host = Arc::new(Host {
            hostname: hostname.clone(),
            routes,
            https_redirect,
            hsts,
        });
        match hostname.strip_prefix('*') {
            Some(suffix) => table.wildcard.push((suffix.to_owned(), host)),
            None => {
                table.exact.insert(hostname, host);
            }
        }
    }
    table
        .wildcard
        .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
    let targets = tunnel_targets(slices);
    let (tcp, tcp_attachments) = port_services(&ours, tcp_routes, Proto::Tcp, &targets, &ready);
    table.tcp = tcp;
    attachments.extend(tcp_attachments);
    // A UDPRoute has a TCPRoute's shape: read through one type.
    let udp_routes: Vec<TcpRoute> = udp_routes
        .iter()
        .filter_map(|r| serde_json::to_value(r).ok())
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    let udp_refs: Vec<&TcpRoute> = udp_routes.iter().collect();
    let (udp, udp_attachments) = port_services(&ours, &udp_refs, Proto::Udp, &targets, &ready);
    table.udp = udp;
    attachments.extend(udp_attachments);
    let (tls, tls_attachments) = tls_services(&ours, tls_routes, &targets, &ready);
    table.tls = tls;
    attachments.extend(tls_attachments);
    (table, attachments)
}

/// Each layer-4 backend's device and target, by `namespace/service`: from the operator's
/// annotation on its EndpointSlices (TCPRoutes and TLSRoutes carry no filters).
fn tunnel_targets(slices: &[&EndpointSlice]) -> HashMap<String, Tunnel> {
    let mut targets: HashMap<String, Tunnel> = HashMap::new();
    for s in slices {
        let (Some(svc), Some(target)) = (
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name")),
            s.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(portway_api::annotations::TUNNEL_TARGET))
                .and_then(|v| portway_api::annotations::parse_tunnel_target(v)),
        ) else {
            continue;
        };
        let (node, target) = target;
        let (Ok(node_id), Ok(host)) = (
            HeaderValue::from_str(&node),
            HeaderValue::from_str(&target.host),
        ) else {
            continue;
        };
        targets.insert(
            key(s.metadata.namespace.as_ref(), Some(svc)),
            Tunnel {
                node_id,
                host,
                port: HeaderValue::from(target.port),
                proto: HeaderValue::from_static("tcp"),
                tls_name: None,
                authority: None,
            },
        );
    }
    targets
}

/// A layer-4 route's backends: each Service's tunnel, ready when its slices say so.
fn l4_backends<'r>(
    ns: &str,
    refs: impl Iterator<Item = (Option<&'r str>, Option<&'r str>, &'r str, Option<i32>)>,
    targets: &HashMap<String, Tunnel>,
    ready: &HashMap<String, bool>,
) -> Vec<Backend> {
    refs.filter(|(kind, ..)| kind.is_none_or(|k| k == "Service"))
        .map(|(_, bns, name, weight)| {
            let svc = format!("{}/{name}", bns.unwrap_or(ns));
            let tunnel = targets.get(&svc).cloned();
            Backend {
                service: name.to_owned(),
                weight: weight.map_or(1, |w| u32::try_from(w).unwrap_or(0)),
                ready: tunnel.is_some() && ready.get(&svc).copied().unwrap_or(false),
                headers: HeaderFilter::default(),
                response: HeaderFilter::default(),
                tunnel,
            }
        })
        .collect()
}

/// Oldest first, then by name: the order in which routes take ports and names.
fn by_age<'a, K: kube::Resource>(routes: &[&'a K]) -> Vec<&'a K> {
    let mut routes: Vec<&K> = routes
        .iter()
        .copied()
        .filter(|r| r.meta().deletion_timestamp.is_none())
        .collect();
    routes.sort_by_key(|r| {
        let m = r.meta();
        (
            m.creation_timestamp.as_ref().map(|t| t.0),
            key(m.namespace.as_ref(), m.name.as_ref()),
        )
    });
    routes
}

/// The names passed through: each TLSRoute attached to a `TLS` listener in `Passthrough`
/// mode of one of `ours` serves its hostnames (exact ones; the operator writes no
/// wildcard). One route a name: the oldest.
fn tls_services(
    ours: &HashMap<String, &Gateway>,
    routes: &[&TlsRoute],
    targets: &HashMap<String, Tunnel>,
    ready: &HashMap<String, bool>,
) -> (BTreeMap<String, Arc<TcpService>>, Vec<Attachment>) {
    use gateway_api::apis::standard::gateways::GatewayListenersTlsMode;
    let mut services: BTreeMap<String, Arc<TcpService>> = BTreeMap::new();
    let mut attachments = Vec::new();
    for r in by_age(routes) {
        let ns = r.metadata.namespace.clone().unwrap_or_default();
        let name = r.metadata.name.clone().unwrap_or_default();
        for p in r.spec.parent_refs.iter().flatten() {
            if p.kind.as_deref().is_some_and(|k| k != "Gateway") {
                continue;
            }
            let gw_ns = p.namespace.clone().unwrap_or_else(|| ns.clone());
            let Some(g) = ours.get(&format!("{gw_ns}/{}", p.name)) else {
                continue;
            };
            let Some(l) = g.spec.listeners.iter().find(|l| {
                l.protocol == "TLS"
                    && l.tls.as_ref().and_then(|t| t.mode.clone())
                        == Some(GatewayListenersTlsMode::Passthrough)
                    && p.section_name.as_ref().is_none_or(|s| *s == l.name)
                    && p.port.is_none_or(|port| port == l.port)
            }) else {
                continue;
            };
            let backends = l4_backends(
                &ns,
                r.spec
                    .rules
                    .iter()
                    .flat_map(|rule| rule.backend_refs.iter())
                    .map(|b| {
                        (
                            b.kind.as_deref(),
                            b.namespace.as_deref(),
                            b.name.as_str(),
                            b.weight,
                        )
                    }),
                targets,
                ready,
            );
            let service = Arc::new(TcpService {
                port: u16::try_from(l.port).unwrap_or(443),
                route: format!("{ns}/{name}"),
                backends,
                cursor: AtomicUsize::new(0),
            });
            let mut served = false;
            for h in &r.spec.hostnames {
                let h = normalize_host(h);
                if h.starts_with('*') || services.contains_key(&h) {
                    continue;
                }
                services.insert(h, service.clone());
                served = true;
            }
            if served {
                attachments.push(Attachment {
                    kind: RouteKind::Tls,
                    route_ns: ns.clone(),
                    route: name.clone(),
                    gateway: p.name.clone(),
                });
            }
        }
    }
    (services, attachments)
}

/// What AccessPolicies need: the policies, the Secrets their rules name (of types
/// `portway.dev/htpasswd` and `portway.dev/jwks`), and the identity signing key's.
#[derive(Clone, Copy, Default)]
pub struct Access<'a> {
    pub policies: &'a [&'a AccessPolicy],
    pub secrets: &'a [&'a Secret],
    pub identity: Option<&'a Secret>,
}

/// The layer-4 routes of a table.
#[derive(Clone, Copy, Default)]
pub struct Layer4Routes<'a> {
    pub tcp: &'a [&'a TcpRoute],
    pub tls: &'a [&'a TlsRoute],
    pub udp: &'a [&'a UdpRoute],
}

/// Which kind of public port.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

/// The public ports of one protocol: each route (TCPRoute, or UDPRoute read as one)
/// attached to a listener of that protocol of one of `ours` serves that listener's port.
/// One route a port: the oldest.
fn port_services(
    ours: &HashMap<String, &Gateway>,
    routes: &[&TcpRoute],
    proto: Proto,
    targets: &HashMap<String, Tunnel>,
    ready: &HashMap<String, bool>,
) -> (BTreeMap<u16, Arc<TcpService>>, Vec<Attachment>) {
    let (protocol, kind) = match proto {
        Proto::Tcp => ("TCP", RouteKind::Tcp),
        Proto::Udp => ("UDP", RouteKind::Udp),
    };
    let mut services = BTreeMap::new();
    let mut attachments = Vec::new();
    for r in by_age(routes) {
        let ns = r.metadata.namespace.clone().unwrap_or_default();
        let name = r.metadata.name.clone().unwrap_or_default();
        for p in r.spec.parent_refs.iter().flatten() {
            if p.kind.as_deref().is_some_and(|k| k != "Gateway") {
                continue;
            }
            let gw_ns = p.namespace.clone().unwrap_or_else(|| ns.clone());
            let Some(g) = ours.get(&format!("{gw_ns}/{}", p.name)) else {
                continue;
            };
            let listeners = g.spec.listeners.iter().filter(|l| {
                l.protocol == protocol
                    && p.section_name.as_ref().is_none_or(|s| *s == l.name)
                    && p.port.is_none_or(|port| port == l.port)
            });
            for l in listeners {
                let Ok(port) = u16::try_from(l.port) else {
                    continue;
                };
                if services.contains_key(&port) {
                    continue;
                }
                let backends = l4_backends(
                    &ns,
                    r.spec
                        .rules
                        .iter()
                        .flat_map(|rule| rule.backend_refs.iter())
                        .map(|b| {
                            (
                                b.kind.as_deref(),
                                b.namespace.as_deref(),
                                b.name.as_str(),
                                b.weight,
                            )
                        }),
                    targets,
                    ready,
                );
                services.insert(
                    port,
                    Arc::new(TcpService {
                        port,
                        route: format!("{ns}/{name}"),
                        backends,
                        cursor: AtomicUsize::new(0),
                    }),
                );
                attachments.push(Attachment {
                    kind,
                    route_ns: ns.clone(),
                    route: name.clone(),
                    gateway: p.name.clone(),
                });
            }
        }
    }
    (services, attachments)
}

/// Applies a filter to request headers: remove, then set (replace), then add.
pub fn apply_filter(filter: &HeaderFilter, headers: &mut http::HeaderMap) {
    for name in &filter.remove {
        headers.remove(name);
    }
    for (n, v) in &filter.set {
        headers.insert(n.clone(), v.clone());
    }
    for (n, v) in &filter.add {
        headers.append(n.clone(), v.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gateway(name: &str, class: &str) -> Gateway {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "p1"}, "spec": {"gatewayClassName": class, "listeners": [{"name": "h", "port": 80, "protocol": "HTTP", "hostname": "listener.example.com"}]}})).unwrap()
    }

    fn route(
        name: &str,
        gateway: &str,
        hosts: &[&str],
        rules: serde_json::Value,
        created: &str,
    ) -> HttpRoute {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "p1", "creationTimestamp": created},
            "spec": {"parentRefs": [{"name": gateway}], "hostnames": hosts, "rules": rules},
        }))
        .unwrap()
    }

    fn slice(svc: &str, ready: bool) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{svc}-1"), "namespace": "p1", "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": ready}}],
        }))
        .unwrap()
    }

    /// The operator's modifier first, then a user filter that tries to pick another
    /// device (as an object stored before admission refused it would).
    fn backend(svc: &str, node: &str) -> serde_json::Value {
        json!({"name": svc, "port": 80, "filters": [
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [
                {"name": "datum-node-id", "value": node}, {"name": "datum-target-host", "value": "127.0.0.1"},
                {"name": "datum-target-port", "value": "3000"}, {"name": "datum-target-proto", "value": "http"}]}},
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                "set": [{"name": "Datum-Node-Id", "value": "victim"}, {"name": "x-app", "value": "1"}],
                "add": [{"name": "datum-target-port", "value": "22"}],
                "remove": ["x-iroh-anything"]}},
        ]})
    }

    /// A TCPRoute on a Gateway's TCP listener serves that port: its backends' devices
    /// and targets from the operator's slice annotations, ready ones only; a second route
    /// on the same port (newer), one on an HTTP listener, and a slice without the
    /// annotation serve nothing.
    #[test]
    fn tcp_ports_from_tcp_listeners_and_annotated_slices() {
        let tcp_gateway = |name: &str, port: i32| -> Gateway {
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "p1"},
                "spec": {"gatewayClassName": "portway", "listeners": [{"name": "tcp", "port": port, "protocol": "TCP"}]}})).unwrap()
        };
        let tcp_route = |name: &str, gateway: &str, services: &[&str], created: &str| -> TcpRoute {
            let refs: Vec<_> = services
                .iter()
                .map(|s| json!({"name": s, "port": 6379}))
                .collect();
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "p1", "creationTimestamp": created},
                "spec": {"parentRefs": [{"name": gateway, "sectionName": "tcp"}], "rules": [{"backendRefs": refs}]},
            }))
            .unwrap()
        };
        let annotated = |svc: &str, ready: bool, node: &str| -> EndpointSlice {
            let mut s = slice(svc, ready);
            s.metadata.annotations = Some(
                [(
                    portway_api::annotations::TUNNEL_TARGET.to_owned(),
                    format!("{node} 127.0.0.1 6379"),
                )]
                .into(),
            );
            s
        };
        let gws = [
            tcp_gateway("db", 20001),
            tcp_gateway("db-too", 20001),
            gateway("gw", "portway"),
        ];
        let routes = [
            tcp_route(
                "db",
                "db",
                &["a", "b", "c", "plain"],
                "2026-01-01T00:00:00Z",
            ),
            tcp_route("db-too", "db-too", &["a"], "2026-01-02T00:00:00Z"),
            tcp_route("on-http", "gw", &["a"], "2026-01-01T00:00:00Z"),
        ];
        let slices = [
            annotated("a", true, "n1"),
            annotated("b", false, "n2"),
            annotated("c", true, "n3"),
            slice("plain", true),
        ];
        let (table, attachments) = build(
            "portway",
            &gws.iter().collect::<Vec<_>>(),
            &[],
            &crate::model::Access::default(),
            &crate::model::Layer4Routes {
                tcp: &routes.iter().collect::<Vec<_>>(),
                tls: &[],
                ..Default::default()
            },
            &slices.iter().collect::<Vec<_>>(),
        );
        assert_eq!(table.tcp.keys().copied().collect::<Vec<_>>(), [20001]);
        let db = &table.tcp[&20001];
        assert_eq!(db.route, "p1/db");
        let target = |n: &str| {
            (
                n.to_owned(),
                Target {
                    host: "127.0.0.1".into(),
                    port: 6379,
                },
            )
        };
        assert_eq!(db.choices(), [target("n1"), target("n3")]);
        assert_eq!(db.choices(), [target("n3"), target("n1")], "round robin");
        assert_eq!(
            attachments,
            [Attachment {
                kind: RouteKind::Tcp,
                route_ns: "p1".into(),
                route: "db".into(),
                gateway: "db".into(),
            }]
        );
    }

    #[test]
    fn hosts_routes_precedence_and_readiness() {
        let gws = [gateway("gw", "portway"), gateway("other", "someone-else")];
        let routes = [
            route(
                "web",
                "gw",
                &["App.example.com", "*.wild.example.com"],
                json!([
                    {"backendRefs": [backend("a", "n1"), backend("b", "n2")]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}], "backendRefs": [backend("b", "n2")]},
                    {"matches": [{"path": {"type": "Exact", "value": "/api/exact"}}], "backendRefs": [backend("a", "n1")]},
                ]),
                "2026-01-01T00:00:00Z",
            ),
            route(
                "foreign",
                "other",
                &["foreign.example.com"],
                json!([{"backendRefs": [backend("a", "n1")]}]),
                "2026-01-01T00:00:00Z",
            ),
            route(
                "nohosts",
                "gw",
                &[],
                json!([{"backendRefs": [backend("a", "n1")]}]),
                "2026-01-02T00:00:00Z",
            ),
        ];
        let slices = [slice("a", true), slice("b", false)];
        let (table, attachments) = build(
            "portway",
            &gws.iter().collect::<Vec<_>>(),
            &routes.iter().collect::<Vec<_>>(),
            &crate::model::Access::default(),
            &crate::model::Layer4Routes::default(),
            &slices.iter().collect::<Vec<_>>(),
        );
        assert!(
            table.lookup("foreign.example.com").is_none(),
            "routes of other classes are not served"
        );
        assert_eq!(attachments.len(), 2);
        let host = table.lookup("app.example.com:8080").unwrap();
        let order: Vec<String> = host
            .routes
            .iter()
            .map(|r| format!("{:?}", r.path))
            .collect();
        assert_eq!(
            order,
            ["Exact(\"/api/exact\")", "Prefix(\"/api\")", "Prefix(\"/\")"]
        );
        let headers = http::HeaderMap::new();
        let first = |path: &str| {
            host.routes
                .iter()
                .find(|r| r.matches("GET", path, &headers, None))
                .map(|r| r.rule)
        };
        assert_eq!(first("/api/exact"), Some(2));
        assert_eq!(first("/api/x"), Some(1));
        assert_eq!(first("/apix"), Some(0), "prefixes match whole segments");
        assert_eq!(
            host.routes[2]
                .backends
                .iter()
                .map(|b| b.ready)
                .collect::<Vec<_>>(),
            [true, false]
        );
        assert!(
            table.lookup("x.wild.example.com").is_some()
                && table.lookup("a.b.wild.example.com").is_some()
        );
        assert!(table.lookup("wild.example.com").is_none());
        assert!(
            table.lookup("listener.example.com").is_some(),
            "a route without hostnames takes its listeners'"
        );
        let b = &host.routes[2].backends[0];
        let tunnel = b.tunnel.as_ref().unwrap();
        assert_eq!(
            (
                tunnel.node_id.to_str().unwrap(),
                tunnel.port.to_str().unwrap()
            ),
            ("n1", "3000")
        );
        assert_eq!(b.headers.get("datum-node-id"), None);
        assert_eq!(b.headers.get("x-app"), Some("1"));
        assert!(b.headers.add.is_empty() && b.headers.remove.is_empty());
        let mut h = http::HeaderMap::new();
        apply_filter(&b.headers, &mut h);
        tunnel.apply(&mut h);
        assert_eq!(h.get_all("datum-target-port").iter().count(), 1);
        assert_eq!(h["datum-node-id"], "n1");
    }

    #[test]
    fn round_robin_over_ready_backends_with_failover_order() {
        let b = |s: &str, ready| Backend {
            service: s.into(),
            weight: 1,
            ready,
            headers: HeaderFilter::default(),
            response: HeaderFilter::default(),
            tunnel: None,
        };
        let r = Route {
            route: "p/r".into(),
            rule: 0,
            path: PathMatch::Prefix("/".into()),
            method: None,
            headers: vec![],
            query: vec![],
            filter: HeaderFilter::default(),
            response: HeaderFilter::default(),
            redirect: None,
            rewrite: None,
            cors: None,
            access: None,
            unsupported: None,
            backends: vec![b("a", true), b("down", false), b("c", true)],
            cursor: AtomicUsize::new(0),
            created: 0,
        };
        let picks: Vec<Vec<&str>> = (0..3)
            .map(|_| {
                r.ready_in_order()
                    .iter()
                    .map(|b| b.service.as_str())
                    .collect()
            })
            .collect();
        assert_eq!(picks, [vec!["a", "c"], vec!["c", "a"], vec!["a", "c"]]);
        let none = Route {
            backends: vec![b("down", false)],
            cursor: AtomicUsize::new(0),
            ..r
        };
        assert!(none.ready_in_order().is_empty());
    }

    #[test]
    fn filters_and_hosts() {
        let mut f = HeaderFilter::default();
        f.push(
            &[("x-a".into(), "1".into())],
            &[("x-b".into(), "2".into())],
            &["x-c".into()],
        );
        let mut h = http::HeaderMap::new();
        h.insert("x-a", "old".parse().unwrap());
        h.insert("x-b", "1".parse().unwrap());
        h.insert("x-c", "gone".parse().unwrap());
        apply_filter(&f, &mut h);
        assert_eq!(h.get("x-a").unwrap(), "1");
        assert_eq!(h.get_all("x-b").iter().count(), 2);
        assert!(h.get("x-c").is_none());
        // Composed filters act as the two in a row (what Envoy gets is the composition).
        let filter = |set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]| {
            let own = |l: &[(&str, &str)]| -> Vec<(String, String)> {
                l.iter().map(|(n, v)| ((*n).into(), (*v).into())).collect()
            };
            let mut f = HeaderFilter::default();
            let remove: Vec<String> = remove.iter().map(|r| (*r).into()).collect();
            f.push(&own(set), &own(add), &remove);
            f
        };
        let rule = filter(
            &[("x-s", "rule"), ("x-k", "rule")],
            &[("x-a", "rule")],
            &["x-r"],
        );
        let backend = filter(&[("x-s", "backend")], &[("x-a", "backend")], &["x-k"]);
        let original = || {
            let mut h = http::HeaderMap::new();
            for (n, v) in [("x-r", "o"), ("x-k", "o"), ("x-a", "o"), ("x-s", "o")] {
                h.insert(n, v.parse().unwrap());
            }
            h
        };
        let (mut one_by_one, mut composed) = (original(), original());
        apply_filter(&rule, &mut one_by_one);
        apply_filter(&backend, &mut one_by_one);
        apply_filter(&rule.then(&backend), &mut composed);
        assert_eq!(one_by_one, composed);
        assert!(composed.get("x-k").is_none() && composed["x-s"] == "backend");
        assert_eq!(composed.get_all("x-a").iter().count(), 3);
        // Host is never a filter's: Envoy would refuse the route configuration.
        assert!(filter(&[("Host", "x")], &[], &["host"]).is_empty());
        assert_eq!(normalize_host("A.Example.com:443"), "a.example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("a.example.com."), "a.example.com");
    }
}
