//! Validation of every kind the API server stores: one function per rule, one `Validate`
//! impl per kind, each error naming the field and the reason.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use gateway_api::apis::experimental::tcproutes::TcpRoute;
use gateway_api::apis::experimental::tlsroutes::TlsRoute;
use gateway_api::apis::experimental::udproutes::UdpRoute;
use gateway_api::apis::standard::gatewayclasses::GatewayClass;
use gateway_api::apis::standard::gateways::Gateway;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, ObjectMeta};
use url::Url;

use crate::{
    AccessPolicy, BackendTrafficPolicy, ConnectionType, Connector, ConnectorAdvertisement,
    ConnectorClass, ConnectorReference, HttpProxy, Protocol, Target, TcpProxy,
};

/// Most lists in Portway's own kinds hold at most this many items.
pub const MAX_ITEMS: usize = 16;
/// Matches in one HTTPProxy rule, and in all its rules (Gateway API's and Datum's limits).
pub const MAX_MATCHES: usize = 64;
pub const MAX_MATCHES_TOTAL: usize = 128;
/// Total size of all annotations on one object, as in Kubernetes.
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// One invalid field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.rules[0].backends[1].endpoint`.
    pub field: String,
    pub kind: FieldErrorKind,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldErrorKind {
    Required,
    Invalid,
    TooMany,
    TooLong,
    Duplicate,
    NotSupported,
    Forbidden,
}

impl FieldErrorKind {
    /// The `reason` Kubernetes uses for this kind of error in `details.causes`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Required => "FieldValueRequired",
            Self::Invalid => "FieldValueInvalid",
            Self::TooMany => "FieldValueTooMany",
            Self::TooLong => "FieldValueTooLong",
            Self::Duplicate => "FieldValueDuplicate",
            Self::NotSupported => "FieldValueNotSupported",
            Self::Forbidden => "FieldValueForbidden",
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Refuses header modifiers (request or response; set, add or remove) that name a
/// header reserved to Portway (`datum-*`, `x-iroh-*`): those choose the device and the
/// target, and a user filter that set them would route to another project's device.
/// Names must be HTTP tokens and values free of line breaks: the data planes could not
/// send anything else. Filters are walked as JSON so the rule covers every Gateway API
/// filter type alike.
fn reserved_headers<T: serde::Serialize>(errs: &mut Errors, field: &str, filters: &[T]) {
    for (i, f) in filters.iter().enumerate() {
        let Ok(v) = serde_json::to_value(f) else {
            continue;
        };
        for modifier in ["requestHeaderModifier", "responseHeaderModifier"] {
            let Some(m) = v.get(modifier) else { continue };
            for op in ["set", "add", "remove"] {
                for (k, h) in m
                    .get(op)
                    .and_then(|l| l.as_array())
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    let name = h.get("name").unwrap_or(h).as_str().unwrap_or_default();
                    let suffix = if op == "remove" { "" } else { ".name" };
                    let at = format!("{field}[{i}].{modifier}.{op}[{k}]");
                    errs.check(format!("{at}{suffix}"), crate::filters::header_name(name));
                    if let Some(v) = h.get("value").and_then(|v| v.as_str()) {
                        errs.check(format!("{at}.value"), crate::filters::header_value(v));
                    }
                    if name.eq_ignore_ascii_case("host") {
                        // As Datum: setting Host on the request rewrites it (a hostname,
                        // no port); nothing else may touch it.
                        match h.get("value").and_then(|v| v.as_str()) {
                            Some(value)
                                if modifier == "requestHeaderModifier" && op == "set" =>
                            {
                                errs.check(
                                    format!("{at}.value"),
                                    precise_hostname(&value.to_ascii_lowercase()),
                                );
                            }
                            _ => errs.push(
                                format!("{at}{suffix}"),
                                FieldErrorKind::Forbidden,
                                "the Host header may only be set on the request (its value a hostname), or rewritten with a URLRewrite filter's hostname",
                            ),
                        }
                    }
                    if crate::headers::is_reserved(name) {
                        errs.push(
                            format!("{at}{suffix}"),
                            FieldErrorKind::Forbidden,
                            format!("header {name:?} is reserved: datum-* and x-iroh-* headers are set by Portway alone"),
                        );
                    }
                }
            }
        }
    }
}

/// The naming rule of a kind's `metadata.name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    /// RFC 1123 label: at most 63 of `[a-z0-9-]`, alphanumeric at both ends.
    Label,
    /// RFC 1123 subdomain: labels joined by dots, at most 253 characters.
    Subdomain,
}

/// Validation of one kind's content (spec and status; metadata is checked by
/// [`validate_meta`]).
pub trait Validate {
    /// The rule `metadata.name` must follow.
    const NAME_RULE: NameRule = NameRule::Subdomain;

    /// Every problem found; empty when valid.
    fn validate(&self) -> Vec<FieldError>;
}

/// Accumulates errors under a path prefix.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: impl Into<String>, kind: FieldErrorKind, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            kind,
            message: message.into(),
        });
    }

    fn check(&mut self, field: impl Into<String>, result: Result<(), String>) {
        if let Err(message) = result {
            self.push(field, FieldErrorKind::Invalid, message);
        }
    }

    fn required(&mut self, field: impl Into<String>, value: &str) -> bool {
        if value.is_empty() {
            self.push(field, FieldErrorKind::Required, "Required value");
            return false;
        }
        true
    }

    fn max_items<T>(&mut self, field: &str, list: &[T], max: usize) {
        if list.len() > max {
            self.push(
                field,
                FieldErrorKind::TooMany,
                format!("must have at most {max} items, got {}", list.len()),
            );
        }
    }

    /// A list of 1 to `max` items, each a `what`.
    fn one_to<T>(&mut self, field: &str, list: &[T], max: usize, what: &str) {
        if list.is_empty() {
            self.push(
                field,
                FieldErrorKind::Required,
                format!("at least one {what} is required"),
            );
        }
        self.max_items(field, list, max);
    }

    fn unique<'a>(&mut self, field: &str, values: impl IntoIterator<Item = (usize, &'a str)>) {
        let mut seen = HashSet::new();
        for (i, v) in values {
            if !seen.insert(v) {
                self.push(
                    format!("{field}[{i}]"),
                    FieldErrorKind::Duplicate,
                    format!("duplicate value {v:?}"),
                );
            }
        }
    }

    fn conditions(&mut self, field: &str, conditions: &[Condition]) {
        for (i, c) in conditions.iter().enumerate() {
            self.required(format!("{field}[{i}].type"), &c.type_);
            if !matches!(c.status.as_str(), "True" | "False" | "Unknown") {
                self.push(
                    format!("{field}[{i}].status"),
                    FieldErrorKind::NotSupported,
                    format!("must be True, False or Unknown, got {:?}", c.status),
                );
            }
            if !c.reason.is_empty() {
                self.check(format!("{field}[{i}].reason"), condition_reason(&c.reason));
            }
        }
        self.unique(
            field,
            conditions
                .iter()
                .enumerate()
                .map(|(i, c)| (i, c.type_.as_str())),
        );
    }
}

fn is_alnum_lower(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// An RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn dns1123_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!("must be at most 63 characters, got {}", s.len()));
    }
    let ok = s.chars().all(|c| is_alnum_lower(c) || c == '-')
        && s.starts_with(is_alnum_lower)
        && s.ends_with(is_alnum_lower);
    if !ok {
        return Err(format!(
            "{s:?} must consist of lower case letters, digits and '-', and start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// An RFC 1123 subdomain: labels joined by `.`, at most 253 characters.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 253 {
        return Err(format!("must be at most 253 characters, got {}", s.len()));
    }
    if s.split('.').any(|label| dns1123_label(label).is_err()) {
        return Err(format!(
            "{s:?} must consist of lower case letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A DNS hostname; with `allow_wildcard`, `*.` may stand as the whole leading label.
/// IP addresses are refused: a hostname routes by `Host` header and TLS SNI.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn hostname(s: &str, allow_wildcard: bool) -> Result<(), String> {
    let rest = match s.strip_prefix("*.") {
        Some(rest) if allow_wildcard => rest,
        Some(_) => return Err(format!("{s:?}: a wildcard is not allowed here")),
        None => s,
    };
    if rest.contains('*') {
        return Err(format!(
            "{s:?}: '*' is allowed only as the whole leading label, as in *.example.com"
        ));
    }
    if rest.parse::<IpAddr>().is_ok() {
        return Err(format!("{s:?} is an IP address; a hostname is required"));
    }
    dns1123_subdomain(rest)
}

/// An address a device offers: an IP address, or a DNS name with an optional leading `*.`.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn service_address(s: &str) -> Result<(), String> {
    if s.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    hostname(s, true).map_err(|e| format!("must be an IP address or DNS name: {e}"))
}

/// A TCP/UDP port number.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn port(p: i32) -> Result<(), String> {
    if (1..=65535).contains(&p) {
        Ok(())
    } else {
        Err(format!("must be between 1 and 65535, got {p}"))
    }
}

/// An http(s) URL naming a host and optionally a port: no credentials, query or fragment.
/// With `allow_path` false, only an empty path or `/` is accepted.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn http_url(s: &str, allow_path: bool) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme {:?} is not supported; use http or https",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{s:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{s:?} must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{s:?} must not have a query or fragment"));
    }
    if !allow_path && !matches!(url.path(), "" | "/") {
        return Err(format!(
            "{s:?} must not have a path; route by path with the rule's matches instead"
        ));
    }
    Ok(url)
}

/// A TCPProxy backend's endpoint, `tcp://host:port`: the target on the device (an IP
/// address, IPv6 in brackets, or a DNS name; no wildcard) and its port, nothing else.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn tcp_endpoint(s: &str) -> Result<Target, String> {
    match layer4_endpoint(s)? {
        (Protocol::Tcp, target) => Ok(target),
        (Protocol::Udp, _) => Err(format!("{s:?} is not tcp://host:port")),
    }
}

/// A TCPProxy backend's endpoint, `tcp://host:port` or `udp://host:port` (a public UDP
/// port): the protocol, and the target as [`tcp_endpoint`] reads it.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn layer4_endpoint(s: &str) -> Result<(Protocol, Target), String> {
    let (protocol, rest) = match (s.strip_prefix("tcp://"), s.strip_prefix("udp://")) {
        (Some(rest), _) => (Protocol::Tcp, rest),
        (_, Some(rest)) => (Protocol::Udp, rest),
        _ => {
            return Err(match s.split_once("://") {
                Some((scheme, _)) => format!(
                    "scheme {scheme:?} is not supported; use tcp://host:port or udp://host:port"
                ),
                None => format!("{s:?} is not tcp://host:port"),
            });
        }
    };
    for (c, what) in [
        ('@', "credentials"),
        ('/', "a path"),
        ('?', "a query"),
        ('#', "a fragment"),
    ] {
        if rest.contains(c) {
            return Err(format!(
                "{s:?} must not have {what}: a TCP endpoint is tcp://host:port"
            ));
        }
    }
    // Without brackets an IPv6 address's last group would read as the port.
    if !rest.starts_with('[') && rest.matches(':').count() > 1 {
        return Err(format!(
            "{s:?}: an IPv6 address goes in brackets, as tcp://[::1]:22"
        ));
    }
    if !rest.contains(':') {
        return Err(format!("{s:?} has no port: use tcp://host:port"));
    }
    let target = Target::parse(rest)?;
    if rest.starts_with('[') && target.host.parse::<std::net::Ipv6Addr>().is_err() {
        return Err(format!("{s:?}: only an IPv6 address goes in brackets"));
    }
    Ok((protocol, target))
}

/// A name of at least two labels, as `example.com` (Datum's `IsFullyQualifiedDomainName`).
///
/// # Errors
/// A sentence saying what is wrong.
pub fn fully_qualified(s: &str) -> Result<(), String> {
    let s = s.strip_prefix("*.").unwrap_or(s);
    if s.trim_end_matches('.').contains('.') {
        Ok(())
    } else {
        Err(format!(
            "{s:?} must be a fully qualified domain name of at least two labels, e.g. {s}.example.com"
        ))
    }
}

/// A path match's value (`Exact` or `PathPrefix`), as Gateway API checks it: absolute,
/// without `//`, dot segments, an encoded `/` or a fragment, and only URL path characters,
/// so that a path means one thing to every proxy on the way.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn path_value(s: &str) -> Result<(), String> {
    if !s.starts_with('/') {
        return Err("must start with '/'".into());
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if s.contains(bad) {
            return Err(format!("must not contain {bad:?}"));
        }
    }
    for bad in ["/..", "/."] {
        if s.ends_with(bad) {
            return Err(format!("must not end with {bad:?}"));
        }
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            if !(i + 2 < bytes.len()
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit())
            {
                return Err("'%' must start a percent-encoded byte such as %20".into());
            }
            i += 3;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@".contains(&b)) {
            return Err(format!(
                "must only contain URL path characters ([-A-Za-z0-9/._~!$&'()*+,;=:@] or %XX), not {:?}",
                b as char
            ));
        }
        i += 1;
    }
    Ok(())
}

/// A hostname as Gateway API's `PreciseHostname`: lower-case DNS labels, no wildcard and
/// no port, at most 253 characters (Datum's rule for `Host` values and TLS names).
///
/// # Errors
/// A sentence saying what is wrong.
pub fn precise_hostname(s: &str) -> Result<(), String> {
    if let Some((host, port)) = s.rsplit_once(':')
        && !host.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(format!(
            "must not include a port; use {host:?} and set the port on the backend endpoint"
        ));
    }
    if s.len() > 253 {
        return Err("must be no more than 253 characters".into());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if s.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "{s:?} must be a hostname of lower-case letters, digits, '-' and '.', starting and ending with a letter or digit (e.g. example.com); wildcards are not permitted"
        ))
    }
}

/// A lower-case hex iroh endpoint id (32 bytes).
///
/// # Errors
/// A sentence saying what is wrong.
pub fn endpoint_id(s: &str) -> Result<(), String> {
    if s.len() == 64
        && s.chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        Ok(())
    } else {
        Err(format!(
            "must be 64 lower-case hex characters (an iroh endpoint id), got {s:?}"
        ))
    }
}

fn qualified_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A label or annotation key: an optional DNS-subdomain prefix and `/`, then a name of at
/// most 63 of `[A-Za-z0-9_.-]`.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn qualified_name(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(prefix) = prefix {
        dns1123_subdomain(prefix).map_err(|e| format!("prefix of {s:?}: {e}"))?;
    }
    if !qualified_name_part(name) {
        return Err(format!(
            "{s:?}: name part must be at most 63 of [A-Za-z0-9_.-], starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A label value: empty, or at most 63 of `[A-Za-z0-9_.-]` with alphanumeric ends.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn label_value(s: &str) -> Result<(), String> {
    if s.is_empty() || qualified_name_part(s) {
        Ok(())
    } else {
        Err(format!(
            "{s:?} must be at most 63 of [A-Za-z0-9_.-], starting and ending with a letter or digit"
        ))
    }
}

fn condition_reason(s: &str) -> Result<(), String> {
    let ok = s.len() <= 1024
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ',' | ':'));
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?} must be CamelCase ([A-Za-z][A-Za-z0-9_,:]*)"))
    }
}

/// Validates the user-settable parts of `metadata`: name, labels, annotations and
/// owner references.
pub fn validate_meta(meta: &ObjectMeta, rule: NameRule) -> Vec<FieldError> {
    let mut errs = Errors::default();
    match meta.name.as_deref() {
        None | Some("") => errs.push(
            "metadata.name",
            FieldErrorKind::Required,
            "name or generateName is required",
        ),
        Some(name) => errs.check(
            "metadata.name",
            match rule {
                NameRule::Label => dns1123_label(name),
                NameRule::Subdomain => dns1123_subdomain(name),
            },
        ),
    }
    validate_labels(&mut errs, "metadata.labels", meta.labels.as_ref());
    let mut size = 0;
    for key in meta.annotations.iter().flatten().map(|(k, v)| {
        size += k.len() + v.len();
        k
    }) {
        errs.check(format!("metadata.annotations[{key}]"), qualified_name(key));
    }
    if size > MAX_ANNOTATIONS_BYTES {
        errs.push(
            "metadata.annotations",
            FieldErrorKind::TooLong,
            format!("may not be more than {MAX_ANNOTATIONS_BYTES} bytes in total, got {size}"),
        );
    }
    for (i, o) in meta.owner_references.iter().flatten().enumerate() {
        let f = format!("metadata.ownerReferences[{i}]");
        errs.required(format!("{f}.apiVersion"), &o.api_version);
        errs.required(format!("{f}.kind"), &o.kind);
        errs.required(format!("{f}.name"), &o.name);
        errs.required(format!("{f}.uid"), &o.uid);
    }
    for (i, f) in meta.finalizers.iter().flatten().enumerate() {
        errs.check(format!("metadata.finalizers[{i}]"), qualified_name(f));
    }
    errs.0
}

fn validate_labels(errs: &mut Errors, field: &str, labels: Option<&BTreeMap<String, String>>) {
    for (k, v) in labels.into_iter().flatten() {
        errs.check(format!("{field}[{k}]"), qualified_name(k));
        errs.check(format!("{field}[{k}]"), label_value(v));
    }
}

fn validate_selector(errs: &mut Errors, field: &str, sel: &LabelSelector) {
    validate_labels(
        errs,
        &format!("{field}.matchLabels"),
        sel.match_labels.as_ref(),
    );
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        errs.check(format!("{f}.key"), qualified_name(&e.key));
        let n = e.values.as_ref().map_or(0, Vec::len);
        match e.operator.as_str() {
            "In" | "NotIn" if n == 0 => errs.push(
                format!("{f}.values"),
                FieldErrorKind::Required,
                "must be non-empty for In and NotIn",
            ),
            "Exists" | "DoesNotExist" if n > 0 => errs.push(
                format!("{f}.values"),
                FieldErrorKind::Forbidden,
                "must be empty for Exists and DoesNotExist",
            ),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => errs.push(
                format!("{f}.operator"),
                FieldErrorKind::NotSupported,
                format!("{other:?} is not one of In, NotIn, Exists, DoesNotExist"),
            ),
        }
    }
}

/// A backend's connector (`{field}.connector`): exactly one of a name or a selector.
fn connector_reference(errs: &mut Errors, field: &str, c: &ConnectorReference) {
    match (&c.name, &c.selector) {
        (Some(name), None) => {
            errs.check(format!("{field}.connector.name"), dns1123_subdomain(name))
        }
        (None, Some(sel)) => validate_selector(errs, &format!("{field}.connector.selector"), sel),
        _ => errs.push(
            format!("{field}.connector"),
            FieldErrorKind::Invalid,
            "exactly one of name or selector must be set",
        ),
    }
}

impl Validate for ConnectorClass {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        if errs.required("spec.controllerName", &self.spec.controller_name) {
            let ok = self
                .spec
                .controller_name
                .split_once('/')
                .is_some_and(|(domain, path)| {
                    dns1123_subdomain(domain).is_ok() && !path.is_empty()
                });
            if !ok {
                errs.push(
                    "spec.controllerName",
                    FieldErrorKind::Invalid,
                    "must be a domain-prefixed path such as portway.dev/operator",
                );
            }
        }
        if let Some(status) = &self.status {
            errs.conditions("status.conditions", &status.conditions);
            errs.max_items("status.gateways", &status.gateways, 64);
            for (i, g) in status.gateways.iter().enumerate() {
                errs.check(
                    format!("status.gateways[{i}].name"),
                    dns1123_subdomain(&g.name),
                );
                errs.check(
                    format!("status.gateways[{i}].endpointId"),
                    endpoint_id(&g.endpoint_id),
                );
            }
            errs.unique(
                "status.gateways",
                status
                    .gateways
                    .iter()
                    .enumerate()
                    .map(|(i, g)| (i, g.name.as_str())),
            );
        }
        errs.0
    }
}

impl Validate for Connector {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        if errs.required("spec.connectorClassName", &self.spec.connector_class_name) {
            errs.check(
                "spec.connectorClassName",
                dns1123_subdomain(&self.spec.connector_class_name),
            );
        }
        errs.max_items("spec.capabilities", &self.spec.capabilities, MAX_ITEMS);
        let mut seen = HashSet::new();
        for (i, c) in self.spec.capabilities.iter().enumerate() {
            if !seen.insert(c.type_) {
                errs.push(
                    format!("spec.capabilities[{i}].type"),
                    FieldErrorKind::Duplicate,
                    "declared twice",
                );
            }
        }
        let Some(status) = &self.status else {
            return errs.0;
        };
        errs.conditions("status.conditions", &status.conditions);
        if let Some(details) = &status.connection_details {
            let f = "status.connectionDetails.publicKey";
            match (&details.type_, &details.public_key) {
                (ConnectionType::PublicKey, None) => errs.push(
                    f,
                    FieldErrorKind::Required,
                    "required when type is PublicKey",
                ),
                (ConnectionType::PublicKey, Some(pk)) => {
                    errs.check(format!("{f}.id"), endpoint_id(&pk.id));
                    if let Some(relay) = &pk.home_relay {
                        errs.check(format!("{f}.homeRelay"), http_url(relay, true).map(drop));
                    }
                    errs.max_items(&format!("{f}.addresses"), &pk.addresses, MAX_ITEMS);
                    for (i, a) in pk.addresses.iter().enumerate() {
                        if a.address.parse::<IpAddr>().is_err() {
                            errs.push(
                                format!("{f}.addresses[{i}].address"),
                                FieldErrorKind::Invalid,
                                format!("{:?} is not an IP address", a.address),
                            );
                        }
                        errs.check(format!("{f}.addresses[{i}].port"), port(a.port));
                    }
                }
            }
        }
        if let Some(lease) = &status.lease_ref {
            errs.check("status.leaseRef.name", dns1123_subdomain(&lease.name));
        }
        errs.0
    }
}

impl Validate for ConnectorAdvertisement {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        if errs.required("spec.connectorRef.name", &self.spec.connector_ref.name) {
            errs.check(
                "spec.connectorRef.name",
                dns1123_subdomain(&self.spec.connector_ref.name),
            );
        }
        errs.max_items("spec.layer4", &self.spec.layer4, MAX_ITEMS);
        errs.unique(
            "spec.layer4",
            self.spec
                .layer4
                .iter()
                .enumerate()
                .map(|(i, l)| (i, l.name.as_str())),
        );
        for (i, l4) in self.spec.layer4.iter().enumerate() {
            let f = format!("spec.layer4[{i}]");
            errs.check(format!("{f}.name"), dns1123_label(&l4.name));
            if l4.services.is_empty() {
                errs.push(
                    format!("{f}.services"),
                    FieldErrorKind::Required,
                    "at least one service is required",
                );
            }
            errs.max_items(&format!("{f}.services"), &l4.services, MAX_ITEMS);
            for (j, svc) in l4.services.iter().enumerate() {
                let f = format!("{f}.services[{j}]");
                errs.check(format!("{f}.address"), service_address(&svc.address));
                if svc.ports.is_empty() {
                    errs.push(
                        format!("{f}.ports"),
                        FieldErrorKind::Required,
                        "at least one port is required",
                    );
                }
                errs.max_items(&format!("{f}.ports"), &svc.ports, MAX_ITEMS);
                // Datum keys ports by name: a name, when given, names one port.
                errs.unique(
                    &format!("{f}.ports"),
                    svc.ports
                        .iter()
                        .enumerate()
                        .filter_map(|(k, p)| Some((k, p.name.as_deref()?))),
                );
                for (k, p) in svc.ports.iter().enumerate() {
                    errs.check(format!("{f}.ports[{k}].port"), port(p.port));
                    if let Some(name) = &p.name {
                        errs.check(format!("{f}.ports[{k}].name"), dns1123_label(name));
                    }
                }
            }
        }
        if let Some(status) = &self.status {
            errs.conditions("status.conditions", &status.conditions);
        }
        errs.0
    }
}

impl Validate for HttpProxy {
    /// As Datum: the proxy's name names its generated Services, which are labels.
    const NAME_RULE: NameRule = NameRule::Label;

    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        let annotations = self.metadata.annotations.as_ref();
        if let Some(v) = annotations.and_then(|a| a.get(crate::certificates::HTTPS_REDIRECT))
            && v != "true"
            && v != "false"
        {
            errs.push(
                format!(
                    "metadata.annotations[{}]",
                    crate::certificates::HTTPS_REDIRECT
                ),
                FieldErrorKind::Invalid,
                format!("must be \"true\" or \"false\", got {v:?}"),
            );
        }
        if let Some(v) = annotations.and_then(|a| a.get(crate::certificates::HSTS)) {
            errs.check(
                format!("metadata.annotations[{}]", crate::certificates::HSTS),
                crate::certificates::hsts(v),
            );
        }
        let spec = &self.spec;
        errs.max_items("spec.hostnames", &spec.hostnames, MAX_ITEMS);
        for (i, h) in spec.hostnames.iter().enumerate() {
            errs.check(
                format!("spec.hostnames[{i}]"),
                hostname(h, true).and_then(|()| fully_qualified(h)),
            );
        }
        errs.unique(
            "spec.hostnames",
            spec.hostnames
                .iter()
                .enumerate()
                .map(|(i, h)| (i, h.as_str())),
        );
        errs.one_to("spec.rules", &spec.rules, MAX_ITEMS, "rule");
        errs.unique(
            "spec.rules",
            spec.rules
                .iter()
                .enumerate()
                .filter_map(|(i, r)| Some((i, r.name.as_deref()?))),
        );
        // As Datum (and Gateway API): 64 matches a rule, 128 in all.
        let matches: usize = spec.rules.iter().map(|r| r.matches.len()).sum();
        if matches > MAX_MATCHES_TOTAL {
            errs.push(
                "spec.rules",
                FieldErrorKind::TooMany,
                format!("{matches} matches in all: at most {MAX_MATCHES_TOTAL}"),
            );
        }
        for (i, rule) in spec.rules.iter().enumerate() {
            let f = format!("spec.rules[{i}]");
            if let Some(name) = &rule.name {
                errs.check(format!("{f}.name"), dns1123_subdomain(name));
            }
            errs.max_items(&format!("{f}.matches"), &rule.matches, MAX_MATCHES);
            for (j, m) in rule.matches.iter().enumerate() {
                if let Some(p) = &m.path
                    && let Some(value) = p.value.as_deref()
                {
                    let regex = p.r#type.as_ref().is_some_and(|t| {
                        *t == gateway_api::apis::standard::httproutes::HttpRouteRulesMatchesPathType::RegularExpression
                    });
                    if !regex {
                        errs.check(format!("{f}.matches[{j}].path.value"), path_value(value));
                    }
                }
            }
            let redirects = rule.filters.iter().any(|x| x.request_redirect.is_some());
            if rule.backends.is_empty() && !redirects {
                errs.push(
                    format!("{f}.backends"),
                    FieldErrorKind::Required,
                    "a backend is required unless the rule has a RequestRedirect filter",
                );
            }
            if !rule.backends.is_empty() && redirects {
                errs.push(
                    format!("{f}.backends"),
                    FieldErrorKind::Invalid,
                    "a rule that redirects sends nothing to a backend: remove the backends or the RequestRedirect filter",
                );
            }
            errs.max_items(&format!("{f}.filters"), &rule.filters, MAX_ITEMS);
            reserved_headers(&mut errs, &format!("{f}.filters"), &rule.filters);
            errs.0.extend(crate::filters::shapes(
                &format!("{f}.filters"),
                &rule.filters,
            ));
            rule_filters(&mut errs, &f, rule);
            let rewrites_host = rule
                .filters
                .iter()
                .any(|x| x.url_rewrite.as_ref().is_some_and(|u| u.hostname.is_some()));
            let sets_host = crate::filters::host_set(&rule.filters).is_some()
                || rule
                    .backends
                    .iter()
                    .any(|b| crate::filters::host_set(&b.filters).is_some());
            if rewrites_host && sets_host {
                errs.push(
                    format!("{f}.filters"),
                    FieldErrorKind::Invalid,
                    "sets Host and rewrites the hostname: choose one",
                );
            }
            if rule.backends.len() > 1
                && rule
                    .backends
                    .iter()
                    .any(|b| crate::filters::host_set(&b.filters).is_some())
            {
                errs.push(
                    format!("{f}.backends"),
                    FieldErrorKind::Invalid,
                    "a backend sets Host, which rewrites it for the whole rule: set it on the rule when it has several backends",
                );
            }
            errs.max_items(&format!("{f}.backends"), &rule.backends, MAX_ITEMS);
            for (j, b) in rule.backends.iter().enumerate() {
                let f = format!("{f}.backends[{j}]");
                if b.instance.is_some() {
                    errs.push(
                        format!("{f}.instance"),
                        FieldErrorKind::NotSupported,
                        "Datum's Instance backends are not available in Portway, which has no compute Instances: use endpoint (with a connector for an app on a device)",
                    );
                } else if errs.required(format!("{f}.endpoint"), &b.endpoint) {
                    errs.check(
                        format!("{f}.endpoint"),
                        http_url(&b.endpoint, false).and_then(|u| match u.host() {
                            // An origin's name is resolved by the edge: a single label
                            // would be a name of the edge's own network (as Datum).
                            Some(url::Host::Domain(d)) if b.connector.is_none() => {
                                fully_qualified(d).or_else(|e| {
                                    if crate::origins::is_localhost(d) {
                                        Ok(())
                                    } else {
                                        Err(format!("an origin {e}"))
                                    }
                                })
                            }
                            _ => Ok(()),
                        }),
                    );
                }
                if let Some(tls) = &b.tls {
                    if !b.endpoint.starts_with("https://") {
                        errs.push(
                            format!("{f}.tls"),
                            FieldErrorKind::Invalid,
                            "applies to https:// endpoints only",
                        );
                    }
                    if let Some(name) = &tls.hostname {
                        errs.check(format!("{f}.tls.hostname"), precise_hostname(name));
                    }
                }
                // An origin at an IP address has no name its certificate could carry.
                if b.connector.is_none()
                    && b.tls.as_ref().and_then(|t| t.hostname.as_ref()).is_none()
                    && http_url(&b.endpoint, false).is_ok_and(|u| {
                        u.scheme() == "https"
                            && matches!(u.host(), Some(url::Host::Ipv4(_) | url::Host::Ipv6(_)))
                    })
                {
                    errs.push(
                        format!("{f}.tls.hostname"),
                        FieldErrorKind::Required,
                        "required for an https:// endpoint at an IP address: the name the origin's certificate carries",
                    );
                }
                if let Some(c) = &b.connector {
                    connector_reference(&mut errs, &f, c);
                }
                errs.max_items(&format!("{f}.filters"), &b.filters, MAX_ITEMS);
                reserved_headers(&mut errs, &format!("{f}.filters"), &b.filters);
                errs.0
                    .extend(crate::filters::shapes(&format!("{f}.filters"), &b.filters));
            }
        }
        if let Some(status) = &self.status {
            errs.conditions("status.conditions", &status.conditions);
            for (i, h) in status.hostname_statuses.iter().enumerate() {
                errs.conditions(
                    &format!("status.hostnameStatuses[{i}].conditions"),
                    &h.conditions,
                );
            }
        }
        errs.0
    }
}

/// An AccessPolicy's `oidc` rule.
fn oidc(errs: &mut Errors, o: &crate::access::Oidc) {
    errs.check("spec.oidc.issuer", crate::access::fetch_url(&o.issuer));
    if o.client_id.is_empty()
        || o.client_id.len() > 256
        || !o.client_id.bytes().all(|b| (b'!'..=b'~').contains(&b))
    {
        errs.push(
            "spec.oidc.clientID",
            FieldErrorKind::Invalid,
            "must be 1 to 256 visible ASCII characters",
        );
    }
    errs.check(
        "spec.oidc.clientSecretRef.name",
        dns1123_subdomain(&o.client_secret_ref.name),
    );
    errs.max_items("spec.oidc.scopes", &o.scopes, MAX_ITEMS);
    for (i, sc) in o.scopes.iter().enumerate() {
        if sc.is_empty()
            || !sc
                .bytes()
                .all(|b| (b'!'..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            errs.push(
                format!("spec.oidc.scopes[{i}]"),
                FieldErrorKind::Invalid,
                "a scope is visible ASCII without '\"' or '\\'",
            );
        }
    }
    if !o.scopes.is_empty() && !o.scopes.iter().any(|s| s == "openid") {
        errs.push(
            "spec.oidc.scopes",
            FieldErrorKind::Required,
            "OpenID Connect needs the openid scope",
        );
    }
    for (field, list) in [
        ("spec.oidc.allowedEmails", &o.allowed_emails),
        ("spec.oidc.allowedDomains", &o.allowed_domains),
        ("spec.oidc.allowedGroups", &o.allowed_groups),
    ] {
        errs.max_items(field, list, 64);
        for (i, v) in list.iter().enumerate() {
            let bad = v.is_empty() || v.len() > 256 || v.chars().any(char::is_control);
            let why = match field {
                "spec.oidc.allowedEmails" if !v.contains('@') => {
                    Some("an email address (user@domain)")
                }
                "spec.oidc.allowedDomains"
                    if dns1123_subdomain(&v.to_ascii_lowercase()).is_err() =>
                {
                    Some("a domain name, e.g. example.com")
                }
                _ if bad => Some("1 to 256 characters, no control characters"),
                _ => None,
            };
            if let Some(why) = why {
                errs.push(
                    format!("{field}[{i}]"),
                    FieldErrorKind::Invalid,
                    format!("must be {why}"),
                );
            }
        }
    }
    if let Some(c) = &o.groups_claim
        && (c.is_empty() || c.len() > 256)
    {
        errs.push(
            "spec.oidc.groupsClaim",
            FieldErrorKind::Invalid,
            "must be 1 to 256 characters",
        );
    }
    if let Some(n) = o.session_seconds
        && !(60..=2_592_000).contains(&n)
    {
        errs.push(
            "spec.oidc.sessionSeconds",
            FieldErrorKind::Invalid,
            format!("must be 60 to 2592000 (30 days), got {n}"),
        );
    }
}

/// An AccessPolicy's `jwt` rule.
fn jwt(errs: &mut Errors, j: &crate::access::JwtAuth) {
    let text = |errs: &mut Errors, field: String, v: &str| {
        if v.is_empty() || v.len() > 2048 || v.chars().any(char::is_control) {
            errs.push(
                field,
                FieldErrorKind::Invalid,
                "must be 1 to 2048 characters, none of them control characters",
            );
        }
    };
    text(errs, "spec.jwt.issuer".into(), &j.issuer);
    errs.max_items("spec.jwt.audiences", &j.audiences, MAX_ITEMS);
    for (i, a) in j.audiences.iter().enumerate() {
        text(errs, format!("spec.jwt.audiences[{i}]"), a);
    }
    match (&j.jwks.secret_ref, &j.jwks.uri) {
        (Some(r), None) => {
            errs.check("spec.jwt.jwks.secretRef.name", dns1123_subdomain(&r.name));
        }
        (None, Some(uri)) => errs.check("spec.jwt.jwks.uri", crate::access::fetch_url(uri)),
        // Neither: the issuer's OpenID configuration names its jwks_uri.
        (None, None) => errs.check("spec.jwt.issuer", crate::access::fetch_url(&j.issuer)),
        (Some(_), Some(_)) => errs.push(
            "spec.jwt.jwks",
            FieldErrorKind::Invalid,
            "name at most one of secretRef (a Secret of type portway.dev/jwks) and uri",
        ),
    }
    errs.max_items("spec.jwt.requiredClaims", &j.required_claims, MAX_ITEMS);
    for (i, c) in j.required_claims.iter().enumerate() {
        let f = format!("spec.jwt.requiredClaims[{i}]");
        text(errs, format!("{f}.name"), &c.name);
        errs.one_to(&format!("{f}.values"), &c.values, MAX_ITEMS, "value");
        for (k, v) in c.values.iter().enumerate() {
            text(errs, format!("{f}.values[{k}]"), v);
        }
    }
    errs.max_items("spec.jwt.claimToHeaders", &j.claim_to_headers, MAX_ITEMS);
    for (i, c) in j.claim_to_headers.iter().enumerate() {
        let f = format!("spec.jwt.claimToHeaders[{i}]");
        text(errs, format!("{f}.claim"), &c.claim);
        errs.check(
            format!("{f}.header"),
            crate::access::claim_header(&c.header),
        );
    }
    let lower: Vec<String> = j
        .claim_to_headers
        .iter()
        .map(|c| c.header.to_ascii_lowercase())
        .collect();
    errs.unique(
        "spec.jwt.claimToHeaders",
        lower.iter().enumerate().map(|(i, h)| (i, h.as_str())),
    );
}

impl Validate for AccessPolicy {
    fn validate(&self) -> Vec<FieldError> {
        use crate::access;
        let mut errs = Errors::default();
        let spec = &self.spec;
        errs.one_to("spec.targetRefs", &spec.target_refs, MAX_ITEMS, "target");
        for (i, t) in spec.target_refs.iter().enumerate() {
            let f = format!("spec.targetRefs[{i}]");
            if t.group != access::GROUP || t.kind != access::TARGET_KIND {
                errs.push(
                    format!("{f}.kind"),
                    FieldErrorKind::NotSupported,
                    format!(
                        "an AccessPolicy guards HTTPProxies: group {:?}, kind {:?}; got group {:?}, kind {:?}",
                        access::GROUP,
                        access::TARGET_KIND,
                        t.group,
                        t.kind
                    ),
                );
            }
            errs.check(format!("{f}.name"), dns1123_label(&t.name));
            if t.section_name.is_some() {
                errs.push(
                    format!("{f}.sectionName"),
                    FieldErrorKind::Forbidden,
                    "a policy guards a whole proxy; sectionName is not supported",
                );
            }
        }
        errs.unique(
            "spec.targetRefs",
            spec.target_refs
                .iter()
                .enumerate()
                .map(|(i, t)| (i, t.name.as_str())),
        );
        if let Some(ip) = &spec.ip {
            for (field, list) in [("spec.ip.allow", &ip.allow), ("spec.ip.deny", &ip.deny)] {
                errs.max_items(field, list, 64);
                for (i, c) in list.iter().enumerate() {
                    errs.check(format!("{field}[{i}]"), access::cidr(c).map(drop));
                }
            }
            if ip.allow.is_empty() && ip.deny.is_empty() {
                errs.push(
                    "spec.ip",
                    FieldErrorKind::Required,
                    "name at least one address in allow or deny",
                );
            }
        }
        errs.max_items("spec.methods", &spec.methods, MAX_ITEMS);
        for (i, m) in spec.methods.iter().enumerate() {
            errs.check(format!("spec.methods[{i}]"), access::method(m));
        }
        errs.unique(
            "spec.methods",
            spec.methods
                .iter()
                .enumerate()
                .map(|(i, m)| (i, m.as_str())),
        );
        if let Some(n) = spec.max_request_bytes
            && !(1..=access::MAX_REQUEST_BYTES).contains(&n)
        {
            errs.push(
                "spec.maxRequestBytes",
                FieldErrorKind::Invalid,
                format!(
                    "must be 1 to {} (64 MiB), got {n}",
                    access::MAX_REQUEST_BYTES
                ),
            );
        }
        if let Some(b) = &spec.basic_auth {
            errs.check(
                "spec.basicAuth.secretRef.name",
                dns1123_subdomain(&b.secret_ref.name),
            );
            if let Some(realm) = &b.realm
                && (realm.is_empty()
                    || realm.len() > 64
                    || !realm
                        .bytes()
                        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\'))
            {
                errs.push(
                    "spec.basicAuth.realm",
                    FieldErrorKind::Invalid,
                    "must be 1 to 64 printable ASCII characters without '\"' or '\\'",
                );
            }
        }
        if let Some(j) = &spec.jwt {
            jwt(&mut errs, j);
            if spec.basic_auth.is_some() {
                errs.push(
                    "spec.jwt",
                    FieldErrorKind::Forbidden,
                    "basicAuth and jwt both read the Authorization header: choose one",
                );
            }
        }
        if let Some(o) = &spec.oidc {
            oidc(&mut errs, o);
            if spec.basic_auth.is_some() || spec.jwt.is_some() {
                errs.push(
                    "spec.oidc",
                    FieldErrorKind::Forbidden,
                    "a policy signs callers in one way: oidc, basicAuth or jwt",
                );
            }
        }
        if let Some(r) = &spec.rate_limit {
            for (field, rate) in [
                ("spec.rateLimit.perClient", r.per_client),
                ("spec.rateLimit.perTunnel", r.per_tunnel),
            ] {
                if let Some(rate) = rate {
                    errs.check(format!("{field}.requests"), access::rate_value(&rate));
                }
            }
            if r.per_client.is_none() && r.per_tunnel.is_none() {
                errs.push(
                    "spec.rateLimit",
                    FieldErrorKind::Required,
                    "name perClient, perTunnel or both",
                );
            }
        }
        if spec.ip.is_none()
            && spec.rate_limit.is_none()
            && spec.basic_auth.is_none()
            && spec.jwt.is_none()
            && spec.oidc.is_none()
            && spec.methods.is_empty()
            && spec.max_request_bytes.is_none()
        {
            errs.push(
                "spec",
                FieldErrorKind::Required,
                "a policy needs at least one rule: ip, rateLimit, basicAuth, jwt, oidc, methods or maxRequestBytes",
            );
        }
        if let Some(st) = &self.status {
            for (i, a) in st.ancestors.iter().enumerate() {
                errs.conditions(&format!("status.ancestors[{i}].conditions"), &a.conditions);
            }
        }
        errs.0
    }
}

impl Validate for TcpProxy {
    /// As HTTPProxy: the proxy's name names its generated Services, which are labels.
    const NAME_RULE: NameRule = NameRule::Label;

    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        let spec = &self.spec;
        if let Some(p) = spec.port {
            errs.check("spec.port", port(p));
        }
        if let Some(tls) = &spec.tls {
            if spec.port.is_some() {
                errs.push(
                    "spec.port",
                    FieldErrorKind::Forbidden,
                    "a TLS passthrough proxy (spec.tls) shares the edge's TLS port: drop spec.port or spec.tls",
                );
            }
            errs.max_items("spec.tls.hostnames", &tls.hostnames, MAX_ITEMS);
            for (i, h) in tls.hostnames.iter().enumerate() {
                // Exact names only: the data planes rank a wildcard against a certificate's
                // names differently, and a name served two ways would surprise.
                errs.check(
                    format!("spec.tls.hostnames[{i}]"),
                    hostname(h, false).and_then(|()| fully_qualified(h)),
                );
            }
            errs.unique(
                "spec.tls.hostnames",
                tls.hostnames
                    .iter()
                    .enumerate()
                    .map(|(i, h)| (i, h.as_str())),
            );
            if let Some(csr) = &tls.certificate_request {
                let field = "spec.tls.certificateRequest";
                if csr.len() > MAX_CERTIFICATE_REQUEST {
                    errs.push(
                        field,
                        FieldErrorKind::TooLong,
                        format!(
                            "may not be longer than {MAX_CERTIFICATE_REQUEST} bytes, got {}",
                            csr.len()
                        ),
                    );
                } else {
                    errs.check(field, certificate_request_pem(csr));
                }
            }
        }
        errs.one_to("spec.backends", &spec.backends, MAX_ITEMS, "backend");
        // One protocol a proxy: the first backend's.
        let mut protocol = None;
        for (i, b) in spec.backends.iter().enumerate() {
            let f = format!("spec.backends[{i}]");
            if errs.required(format!("{f}.endpoint"), &b.endpoint) {
                match layer4_endpoint(&b.endpoint) {
                    Err(e) => errs.check(format!("{f}.endpoint"), Err(e)),
                    Ok((p, _)) if *protocol.get_or_insert(p) != p => errs.check(
                        format!("{f}.endpoint"),
                        Err("tcp:// and udp:// backends cannot be mixed in one proxy".into()),
                    ),
                    Ok((Protocol::Udp, _)) if spec.tls.is_some() => errs.check(
                        format!("{f}.endpoint"),
                        Err("TLS passthrough (spec.tls) carries TCP: use tcp://".into()),
                    ),
                    Ok(_) => {}
                }
            }
            connector_reference(&mut errs, &f, &b.connector);
        }
        if let Some(status) = &self.status {
            errs.conditions("status.conditions", &status.conditions);
            if let Some(p) = status.port {
                errs.check("status.port", port(p));
            }
        }
        errs.0
    }
}

/// The values of a rule's redirect, rewrite and CORS filters.
fn rule_filters(errs: &mut Errors, f: &str, rule: &crate::HttpProxyRule) {
    use gateway_api::apis::standard::httproutes::{
        HttpRouteRulesFiltersRequestRedirectPathType as RedirectPath,
        HttpRouteRulesFiltersUrlRewritePathType as RewritePath, HttpRouteRulesMatchesPathType,
    };
    // A prefix can only be replaced where every match of the rule matched a prefix.
    let prefix_matches = rule.matches.iter().all(|m| {
        m.path.as_ref().is_none_or(|p| {
            p.r#type
                .as_ref()
                .is_none_or(|t| *t == HttpRouteRulesMatchesPathType::PathPrefix)
        })
    });
    let path_change = |errs: &mut Errors,
                       at: String,
                       prefix: bool,
                       full: Option<&String>,
                       replace: Option<&String>| {
        let (name, value) = if prefix {
            ("replacePrefixMatch", replace)
        } else {
            ("replaceFullPath", full)
        };
        match value {
            None => errs.push(
                format!("{at}.{name}"),
                FieldErrorKind::Required,
                format!(
                    "a {} path change needs {name}",
                    if prefix {
                        "ReplacePrefixMatch"
                    } else {
                        "ReplaceFullPath"
                    }
                ),
            ),
            Some(v) if !v.starts_with('/') => errs.push(
                format!("{at}.{name}"),
                FieldErrorKind::Invalid,
                "must start with '/'",
            ),
            Some(v) => errs.check(format!("{at}.{name}"), crate::filters::header_value(v)),
        }
        if prefix && !prefix_matches {
            errs.push(
                format!("{at}.type"),
                FieldErrorKind::Invalid,
                "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
            );
        }
    };
    for (i, filter) in rule.filters.iter().enumerate() {
        let at = format!("{f}.filters[{i}]");
        if let Some(r) = &filter.request_redirect {
            let at = format!("{at}.requestRedirect");
            if let Some(code) = r.status_code
                && ![301, 302, 303, 307, 308].contains(&code)
            {
                errs.push(
                    format!("{at}.statusCode"),
                    FieldErrorKind::NotSupported,
                    format!("{code} is not one of 301, 302, 303, 307, 308"),
                );
            }
            if let Some(p) = r.port {
                errs.check(format!("{at}.port"), port(p));
            }
            if let Some(h) = &r.hostname {
                errs.check(format!("{at}.hostname"), hostname(h, false));
            }
            if let Some(p) = &r.path {
                let prefix = p.r#type == RedirectPath::ReplacePrefixMatch;
                path_change(
                    errs,
                    format!("{at}.path"),
                    prefix,
                    p.replace_full_path.as_ref(),
                    p.replace_prefix_match.as_ref(),
                );
            }
        }
        if let Some(r) = &filter.url_rewrite {
            let at = format!("{at}.urlRewrite");
            if let Some(h) = &r.hostname {
                errs.check(format!("{at}.hostname"), hostname(h, false));
            }
            if let Some(p) = &r.path {
                let prefix = p.r#type == RewritePath::ReplacePrefixMatch;
                path_change(
                    errs,
                    format!("{at}.path"),
                    prefix,
                    p.replace_full_path.as_ref(),
                    p.replace_prefix_match.as_ref(),
                );
            }
        }
        if let Some(c) = &filter.cors {
            let at = format!("{at}.cors");
            for (k, o) in c.allow_origins.iter().flatten().enumerate() {
                errs.check(
                    format!("{at}.allowOrigins[{k}]"),
                    crate::filters::cors_origin(o),
                );
            }
            let lists = [
                ("allowMethods", &c.allow_methods),
                ("allowHeaders", &c.allow_headers),
                ("exposeHeaders", &c.expose_headers),
            ];
            for (name, list) in lists {
                let list = list.as_deref().unwrap_or_default();
                errs.max_items(&format!("{at}.{name}"), list, MAX_ITEMS);
                for (k, v) in list.iter().enumerate() {
                    if v != "*" {
                        errs.check(format!("{at}.{name}[{k}]"), crate::filters::header_name(v));
                    }
                }
            }
            if c.max_age.is_some_and(|a| a < 0) {
                errs.push(
                    format!("{at}.maxAge"),
                    FieldErrorKind::Invalid,
                    "must not be negative",
                );
            }
        }
    }
}

impl Validate for BackendTrafficPolicy {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        errs.max_items("spec.targetRefs", &self.spec.target_refs, MAX_ITEMS);
        for (i, t) in self.spec.target_refs.iter().enumerate() {
            errs.required(format!("spec.targetRefs[{i}].kind"), &t.kind);
            if errs.required(format!("spec.targetRefs[{i}].name"), &t.name) {
                errs.check(
                    format!("spec.targetRefs[{i}].name"),
                    dns1123_subdomain(&t.name),
                );
            }
        }
        errs.max_items("spec.httpUpgrade", &self.spec.http_upgrade, MAX_ITEMS);
        for (i, u) in self.spec.http_upgrade.iter().enumerate() {
            errs.required(format!("spec.httpUpgrade[{i}].type"), &u.type_);
        }
        errs.0
    }
}

impl Validate for Namespace {
    const NAME_RULE: NameRule = NameRule::Label;

    fn validate(&self) -> Vec<FieldError> {
        Vec::new()
    }
}

/// The longest event note (message), as in Kubernetes.
pub const MAX_EVENT_NOTE: usize = 1024;

fn event_fields(errs: &mut Errors, type_: Option<&str>, text: (&str, Option<&str>)) {
    if let Some(t) = type_
        && t != "Normal"
        && t != "Warning"
    {
        errs.push(
            "type",
            FieldErrorKind::NotSupported,
            format!("{t:?} is not Normal or Warning"),
        );
    }
    let (field, text) = text;
    if let Some(text) = text
        && text.len() > MAX_EVENT_NOTE
    {
        errs.push(
            field,
            FieldErrorKind::TooLong,
            format!("may not be longer than {MAX_EVENT_NOTE} bytes"),
        );
    }
}

impl Validate for k8s_openapi::api::events::v1::Event {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        event_fields(
            &mut errs,
            self.type_.as_deref(),
            ("note", self.note.as_deref()),
        );
        if self.event_time.is_none() {
            errs.push(
                "eventTime",
                FieldErrorKind::Required,
                "eventTime is required",
            );
        }
        if let (Some(ns), Some(own)) = (
            self.regarding.as_ref().and_then(|r| r.namespace.as_ref()),
            &self.metadata.namespace,
        ) && ns != own
        {
            errs.push(
                "regarding.namespace",
                FieldErrorKind::Invalid,
                "does not match the event's namespace",
            );
        }
        for (field, v) in [
            ("reportingController", &self.reporting_controller),
            ("action", &self.action),
            ("reason", &self.reason),
        ] {
            if v.as_deref().is_none_or(str::is_empty) {
                errs.push(
                    field,
                    FieldErrorKind::Required,
                    format!("{field} is required"),
                );
            }
        }
        errs.0
    }
}

impl Validate for k8s_openapi::api::core::v1::Event {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        event_fields(
            &mut errs,
            self.type_.as_deref(),
            ("message", self.message.as_deref()),
        );
        if let (Some(ns), Some(own)) = (&self.involved_object.namespace, &self.metadata.namespace)
            && ns != own
        {
            errs.push(
                "involvedObject.namespace",
                FieldErrorKind::Invalid,
                "does not match the event's namespace",
            );
        }
        errs.0
    }
}

impl Validate for Lease {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        if let Some(spec) = &self.spec
            && let Some(d) = spec.lease_duration_seconds
            && d <= 0
        {
            errs.push(
                "spec.leaseDurationSeconds",
                FieldErrorKind::Invalid,
                format!("must be greater than 0, got {d}"),
            );
        }
        errs.0
    }
}

/// A Secret's data, all keys together, at most 1 MiB as in Kubernetes.
pub const MAX_SECRET_BYTES: usize = 1024 * 1024;
/// Longest `spec.tls.certificateRequest`: a request for a hundred names with an RSA-4096
/// key is about 6 KiB of PEM.
pub const MAX_CERTIFICATE_REQUEST: usize = 16 * 1024;

/// One PEM `CERTIFICATE REQUEST` block and nothing else (its contents are checked by the
/// operator, which parses and verifies it before anything is signed).
fn certificate_request_pem(pem: &str) -> Result<(), String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE REQUEST-----";
    const END: &str = "-----END CERTIFICATE REQUEST-----";
    let body = pem
        .trim()
        .strip_prefix(BEGIN)
        .and_then(|rest| rest.strip_suffix(END))
        .ok_or_else(|| format!("must be one PEM block from {BEGIN} to {END}"))?;
    if body.contains("-----") {
        return Err("must hold one certificate request, and nothing else".into());
    }
    if !body
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+/=\r\n".contains(&b))
    {
        return Err("the PEM body is not base64".into());
    }
    Ok(())
}

/// The type whose data must hold `tls.crt` and `tls.key`.
pub const TLS_SECRET: &str = "kubernetes.io/tls";

impl Validate for Secret {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        let data = self.data.as_ref();
        let strings = self.string_data.as_ref();
        let mut size = 0;
        for (field, key, len) in data
            .into_iter()
            .flatten()
            .map(|(k, v)| ("data", k, v.0.len()))
            .chain(
                strings
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| ("stringData", k, v.len())),
            )
        {
            size += len;
            let valid = !key.is_empty()
                && key.len() <= 253
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !valid {
                errs.push(
                    format!("{field}[{key}]"),
                    FieldErrorKind::Invalid,
                    "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
                );
            }
        }
        if size > MAX_SECRET_BYTES {
            errs.push(
                "data",
                FieldErrorKind::TooLong,
                format!("may not be more than {MAX_SECRET_BYTES} bytes, got {size}"),
            );
        }
        if self.type_.as_deref() == Some(TLS_SECRET) {
            for key in ["tls.crt", "tls.key"] {
                let has = data.is_some_and(|d| d.contains_key(key))
                    || strings.is_some_and(|d| d.contains_key(key));
                if !has {
                    errs.push(
                        format!("data[{key}]"),
                        FieldErrorKind::Required,
                        format!("required for a Secret of type {TLS_SECRET}"),
                    );
                }
            }
        }
        // Users of an AccessPolicy's basicAuth: hashed, never plaintext, refused here
        // rather than found out at the edge.
        if self.type_.as_deref() == Some(crate::access::HTPASSWD_TYPE) {
            let key = crate::access::HTPASSWD_KEY;
            match crate::access::htpasswd_text(self) {
                None => errs.push(
                    format!("data[{key}]"),
                    FieldErrorKind::Required,
                    format!(
                        "required for a Secret of type {}: user:hash lines",
                        crate::access::HTPASSWD_TYPE
                    ),
                ),
                Some(text) => {
                    if let Err(lines) = crate::access::htpasswd(&text) {
                        errs.push(
                            format!("data[{key}]"),
                            FieldErrorKind::Invalid,
                            lines.join("; "),
                        );
                    }
                }
            }
        }
        if self.type_.as_deref() == Some(crate::access::OIDC_CLIENT_TYPE)
            && crate::access::oidc_client_secret(self).is_none_or(|s| s.is_empty())
        {
            errs.push(
                format!("data[{}]", crate::access::OIDC_CLIENT_KEY),
                FieldErrorKind::Required,
                format!(
                    "required for a Secret of type {}: the client's secret",
                    crate::access::OIDC_CLIENT_TYPE
                ),
            );
        }
        if self.type_.as_deref() == Some(crate::access::JWKS_TYPE) {
            let key = crate::access::JWKS_KEY;
            match crate::access::jwks_text(self) {
                None => errs.push(
                    format!("data[{key}]"),
                    FieldErrorKind::Required,
                    format!(
                        "required for a Secret of type {}: a JWKS",
                        crate::access::JWKS_TYPE
                    ),
                ),
                Some(text) => {
                    errs.check(format!("data[{key}]"), crate::access::jwks(&text).map(drop));
                }
            }
        }
        errs.0
    }
}

impl Validate for Service {
    const NAME_RULE: NameRule = NameRule::Label;

    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        let ports = self
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_deref())
            .unwrap_or_default();
        for (i, p) in ports.iter().enumerate() {
            errs.check(format!("spec.ports[{i}].port"), port(p.port));
            match &p.name {
                Some(name) => errs.check(format!("spec.ports[{i}].name"), dns1123_label(name)),
                None if ports.len() > 1 => errs.push(
                    format!("spec.ports[{i}].name"),
                    FieldErrorKind::Required,
                    "required when there is more than one port",
                ),
                None => {}
            }
        }
        errs.unique(
            "spec.ports",
            ports
                .iter()
                .enumerate()
                .filter_map(|(i, p)| Some((i, p.name.as_deref()?))),
        );
        errs.0
    }
}

impl Validate for EndpointSlice {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        let ip = |s: &str| s.parse::<IpAddr>();
        let endpoints = self.endpoints.as_deref().unwrap_or_default();
        for (i, e) in endpoints.iter().enumerate() {
            if e.addresses.is_empty() {
                errs.push(
                    format!("endpoints[{i}].addresses"),
                    FieldErrorKind::Required,
                    "at least one address",
                );
            }
            for (j, a) in e.addresses.iter().enumerate() {
                let f = format!("endpoints[{i}].addresses[{j}]");
                let ok = match self.address_type.as_str() {
                    "IPv4" => ip(a).is_ok_and(|ip| ip.is_ipv4()),
                    "IPv6" => ip(a).is_ok_and(|ip| ip.is_ipv6()),
                    _ => dns1123_subdomain(a).is_ok(),
                };
                if !ok {
                    errs.push(
                        f,
                        FieldErrorKind::Invalid,
                        format!("{a:?} is not a valid {} address", self.address_type),
                    );
                }
            }
        }
        if !matches!(self.address_type.as_str(), "IPv4" | "IPv6" | "FQDN") {
            errs.push(
                "addressType",
                FieldErrorKind::NotSupported,
                format!("{:?} is not one of IPv4, IPv6, FQDN", self.address_type),
            );
        }
        errs.max_items("endpoints", endpoints, 1000);
        for (i, p) in self.ports.iter().flatten().enumerate() {
            if let Some(n) = p.port {
                errs.check(format!("ports[{i}].port"), port(n));
            }
        }
        errs.0
    }
}

impl Validate for GatewayClass {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        errs.required("spec.controllerName", &self.spec.controller_name);
        errs.0
    }
}

impl Validate for Gateway {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        errs.required("spec.gatewayClassName", &self.spec.gateway_class_name);
        let listeners = &self.spec.listeners;
        errs.max_items("spec.listeners", listeners, 64);
        for (i, l) in listeners.iter().enumerate() {
            errs.check(format!("spec.listeners[{i}].name"), dns1123_label(&l.name));
            errs.check(format!("spec.listeners[{i}].port"), port(l.port));
            if let Some(h) = &l.hostname {
                errs.check(format!("spec.listeners[{i}].hostname"), hostname(h, true));
            }
        }
        errs.unique(
            "spec.listeners",
            listeners
                .iter()
                .enumerate()
                .map(|(i, l)| (i, l.name.as_str())),
        );
        errs.0
    }
}

impl Validate for HttpRoute {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        let hostnames = self.spec.hostnames.as_deref().unwrap_or_default();
        errs.max_items("spec.hostnames", hostnames, MAX_ITEMS);
        for (i, h) in hostnames.iter().enumerate() {
            errs.check(format!("spec.hostnames[{i}]"), hostname(h, true));
        }
        let rules = self.spec.rules.as_deref().unwrap_or_default();
        errs.max_items("spec.rules", rules, MAX_ITEMS);
        for (i, r) in rules.iter().enumerate() {
            // Rule filters apply to every backend and are never Portway's channel; the
            // operator sets the routing headers per backendRef (roles that may write
            // HTTPRoutes at all: operator and admin).
            reserved_headers(
                &mut errs,
                &format!("spec.rules[{i}].filters"),
                r.filters.as_deref().unwrap_or_default(),
            );
            for (j, b) in r.backend_refs.iter().flatten().enumerate() {
                if let Some(p) = b.port {
                    errs.check(format!("spec.rules[{i}].backendRefs[{j}].port"), port(p));
                }
            }
        }
        errs.0
    }
}

impl Validate for TcpRoute {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        let rules: Vec<Vec<Option<i32>>> = self
            .spec
            .rules
            .iter()
            .map(|r| r.backend_refs.iter().map(|b| b.port).collect())
            .collect();
        layer4_rules(&mut errs, &rules);
        errs.0
    }
}

impl Validate for UdpRoute {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        let rules: Vec<Vec<Option<i32>>> = self
            .spec
            .rules
            .iter()
            .map(|r| r.backend_refs.iter().map(|b| b.port).collect())
            .collect();
        layer4_rules(&mut errs, &rules);
        errs.0
    }
}

/// A layer-4 route's rules, given as each rule's backendRefs' ports: bounded counts, and
/// ports that are ports.
fn layer4_rules(errs: &mut Errors, rules: &[Vec<Option<i32>>]) {
    errs.max_items("spec.rules", rules, MAX_ITEMS);
    for (i, refs) in rules.iter().enumerate() {
        let f = format!("spec.rules[{i}].backendRefs");
        errs.max_items(&f, refs, MAX_ITEMS);
        for (j, p) in refs.iter().enumerate() {
            if let Some(p) = p {
                errs.check(format!("{f}[{j}].port"), port(*p));
            }
        }
    }
}

impl Validate for TlsRoute {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        let hostnames = &self.spec.hostnames;
        errs.max_items("spec.hostnames", hostnames, MAX_ITEMS);
        for (i, h) in hostnames.iter().enumerate() {
            errs.check(format!("spec.hostnames[{i}]"), hostname(h, true));
        }
        let rules: Vec<Vec<Option<i32>>> = self
            .spec
            .rules
            .iter()
            .map(|r| r.backend_refs.iter().map(|b| b.port).collect())
            .collect();
        layer4_rules(&mut errs, &rules);
        errs.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    #[test]
    fn a_jwt_rule_names_each_bad_field() {
        let p: AccessPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n"},
            "spec": {"targetRefs": [{"group": "networking.datumapis.com", "kind": "HTTPProxy", "name": "app"}],
                "basicAuth": {"secretRef": {"name": "users"}},
                "jwt": {"issuer": "", "jwks": {"secretRef": {"name": "k"}, "uri": "https://id/jwks"},
                    "requiredClaims": [{"name": "groups", "values": []}],
                    "claimToHeaders": [{"claim": "sub", "header": "datum-node-id"},
                        {"claim": "sub", "header": "Portway-Identity"},
                        {"claim": "a", "header": "x-a"}, {"claim": "b", "header": "X-A"}]}},
        }))
        .unwrap();
        let fields: Vec<String> = p.validate().into_iter().map(|e| e.field).collect();
        for f in [
            "spec.jwt",
            "spec.jwt.issuer",
            "spec.jwt.jwks",
            "spec.jwt.requiredClaims[0].values",
            "spec.jwt.claimToHeaders[0].header",
            "spec.jwt.claimToHeaders[1].header",
            "spec.jwt.claimToHeaders[3]",
        ] {
            assert!(fields.iter().any(|x| x == f), "{f} not in {fields:?}");
        }
        let o: AccessPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n"},
            "spec": {"targetRefs": [{"group": "networking.datumapis.com", "kind": "HTTPProxy", "name": "app"}],
                "jwt": {"issuer": "https://id", "jwks": {"uri": "https://id/jwks"}},
                "oidc": {"issuer": "http://id.example", "clientID": "", "clientSecretRef": {"name": "Bad"},
                    "scopes": ["email"], "allowedEmails": ["nobody"], "allowedDomains": ["not a domain"],
                    "sessionSeconds": 5}},
        }))
        .unwrap();
        let fields: Vec<String> = o.validate().into_iter().map(|e| e.field).collect();
        for f in [
            "spec.oidc",
            "spec.oidc.issuer",
            "spec.oidc.clientID",
            "spec.oidc.clientSecretRef.name",
            "spec.oidc.scopes",
            "spec.oidc.allowedEmails[0]",
            "spec.oidc.allowedDomains[0]",
            "spec.oidc.sessionSeconds",
        ] {
            assert!(fields.iter().any(|x| x == f), "{f} not in {fields:?}");
        }
        for (url, ok) in [
            ("https://id.example/jwks", true),
            ("http://127.0.0.1:9/jwks", true),
            ("http://localhost/jwks", true),
            ("http://[::1]/jwks", true),
            ("http://id.example/jwks", false),
            ("file:///etc/passwd", false),
            ("https://user:pw@id.example/", false),
        ] {
            assert_eq!(crate::access::fetch_url(url).is_ok(), ok, "{url}");
        }
    }

    #[test]
    fn labels_and_subdomains() {
        assert!(dns1123_label("web-1").is_ok());
        assert!(dns1123_label("-web").is_err());
        assert!(dns1123_label("Web").is_err());
        assert!(dns1123_label(&"a".repeat(64)).is_err());
        assert!(dns1123_subdomain("a.b-c.d").is_ok());
        assert!(dns1123_subdomain("a..b").is_err());
        assert!(dns1123_subdomain(&"a.".repeat(127)).is_err());
    }

    #[test]
    fn hostnames_allow_only_a_leading_wildcard() {
        assert!(hostname("app.example.com", false).is_ok());
        assert!(hostname("localhost", false).is_ok());
        assert!(hostname("*.example.com", true).is_ok());
        assert!(hostname("*.example.com", false).is_err());
        assert!(hostname("a.*.example.com", true).is_err());
        assert!(hostname("*example.com", true).is_err());
        assert!(hostname("10.0.0.1", true).is_err());
        assert!(hostname("UPPER.example.com", true).is_err());
        assert!(service_address("10.0.0.1").is_ok());
        assert!(service_address("::1").is_ok());
        assert!(service_address("*.svc.local").is_ok());
        assert!(service_address("a b").is_err());
    }

    #[test]
    fn urls_ports_ids_and_keys() {
        assert!(http_url("http://127.0.0.1:3000", false).is_ok());
        assert!(http_url("https://app.internal/", false).is_ok());
        assert!(http_url("ftp://x", false).unwrap_err().contains("scheme"));
        assert!(
            http_url("http://u:p@x", false)
                .unwrap_err()
                .contains("credentials")
        );
        assert!(http_url("http://x/a", false).unwrap_err().contains("path"));
        assert!(http_url("http://x/a", true).is_ok());
        assert!(http_url("not a url", false).is_err());
        assert!(port(0).is_err() && port(65536).is_err() && port(443).is_ok());
        assert!(endpoint_id(&"ab".repeat(32)).is_ok());
        assert!(endpoint_id(&"AB".repeat(32)).is_err());
        assert!(qualified_name("portway.dev/os").is_ok());
        assert!(qualified_name("app").is_ok());
        assert!(qualified_name("bad key").is_err());
        assert!(qualified_name("Bad_Prefix/x").is_err());
        assert!(
            label_value("").is_ok() && label_value("a.b_c-1").is_ok() && label_value("-x").is_err()
        );
    }

    fn proxy(spec: HttpProxySpec) -> HttpProxy {
        HttpProxy::new("p", spec)
    }

    #[test]
    fn proxy_errors_name_the_field() {
        let p = proxy(HttpProxySpec {
            hostnames: vec![
                "ok.example.com".into(),
                "bad_host".into(),
                "ok.example.com".into(),
            ],
            rules: vec![HttpProxyRule {
                backends: vec![HttpProxyBackend {
                    endpoint: "gopher://x".into(),
                    connector: Some(ConnectorReference {
                        name: Some("c".into()),
                        selector: Some(Default::default()),
                    }),
                    tls: None,
                    filters: vec![],
                    instance: None,
                }],
                ..Default::default()
            }],
        });
        let fields: Vec<_> = p
            .validate()
            .into_iter()
            .map(|e| (e.field, e.kind))
            .collect();
        assert!(
            fields.contains(&("spec.hostnames[1]".into(), FieldErrorKind::Invalid)),
            "{fields:?}"
        );
        assert!(
            fields.contains(&("spec.hostnames[2]".into(), FieldErrorKind::Duplicate)),
            "{fields:?}"
        );
        assert!(fields.contains(&(
            "spec.rules[0].backends[0].endpoint".into(),
            FieldErrorKind::Invalid
        )));
        assert!(fields.contains(&(
            "spec.rules[0].backends[0].connector".into(),
            FieldErrorKind::Invalid
        )));
        let empty = proxy(HttpProxySpec {
            hostnames: vec![],
            rules: vec![],
        });
        assert_eq!(empty.validate()[0].field, "spec.rules");
        let many = proxy(HttpProxySpec {
            hostnames: (0..17).map(|i| format!("h{i}.example.com")).collect(),
            rules: vec![HttpProxyRule::default()],
        });
        assert_eq!(many.validate()[0].kind, FieldErrorKind::TooMany);
    }

    /// Each case: a rule's matches and filters, and the fields (with kinds) refused.
    #[test]
    fn filters_are_checked_before_any_data_plane_sees_them() {
        use serde_json::json;
        let prefix = json!([{"path": {"type": "PathPrefix", "value": "/a"}}]);
        let exact = json!([{"path": {"type": "Exact", "value": "/a"}}]);
        let cases = [
            // Implemented filters, well formed: nothing to say.
            (
                prefix.clone(),
                json!([
                {"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 308,
                    "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}}},
                {"type": "CORS", "cors": {"allowOrigins": ["*", "https://*.example.com:8443"],
                    "allowMethods": ["GET"], "allowHeaders": ["*"], "maxAge": 5}}]),
                vec![],
            ),
            // The field `type` names is missing; another is set.
            (
                prefix.clone(),
                json!([{"type": "URLRewrite", "requestRedirect": {}}]),
                vec![
                    (
                        "spec.rules[0].filters[0].urlRewrite",
                        FieldErrorKind::Required,
                    ),
                    (
                        "spec.rules[0].filters[0].requestRedirect",
                        FieldErrorKind::Forbidden,
                    ),
                ],
            ),
            // Twice the same type; a redirect beside a rewrite.
            (
                prefix.clone(),
                json!([
                {"type": "URLRewrite", "urlRewrite": {"hostname": "a.example"}},
                {"type": "URLRewrite", "urlRewrite": {"hostname": "b.example"}},
                {"type": "RequestRedirect", "requestRedirect": {}}]),
                vec![
                    ("spec.rules[0].filters[1].type", FieldErrorKind::Duplicate),
                    ("spec.rules[0].filters[2].type", FieldErrorKind::Invalid),
                ],
            ),
            // A prefix replaced where the match is exact; a bad code, port and path.
            (
                exact,
                json!([{"type": "RequestRedirect", "requestRedirect": {
                "statusCode": 305, "port": 0,
                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "b"}}}]),
                vec![
                    (
                        "spec.rules[0].filters[0].requestRedirect.statusCode",
                        FieldErrorKind::NotSupported,
                    ),
                    (
                        "spec.rules[0].filters[0].requestRedirect.port",
                        FieldErrorKind::Invalid,
                    ),
                    (
                        "spec.rules[0].filters[0].requestRedirect.path.replacePrefixMatch",
                        FieldErrorKind::Invalid,
                    ),
                    (
                        "spec.rules[0].filters[0].requestRedirect.path.type",
                        FieldErrorKind::Invalid,
                    ),
                ],
            ),
            // Values the data planes could not send.
            (
                prefix,
                json!([
                {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                    "set": [{"name": "x bad", "value": "a\r\nb"}]}},
                {"type": "CORS", "cors": {"allowOrigins": ["example.com"], "maxAge": -1}}]),
                vec![
                    (
                        "spec.rules[0].filters[0].responseHeaderModifier.set[0].name",
                        FieldErrorKind::Invalid,
                    ),
                    (
                        "spec.rules[0].filters[0].responseHeaderModifier.set[0].value",
                        FieldErrorKind::Invalid,
                    ),
                    (
                        "spec.rules[0].filters[1].cors.allowOrigins[0]",
                        FieldErrorKind::Invalid,
                    ),
                    (
                        "spec.rules[0].filters[1].cors.maxAge",
                        FieldErrorKind::Invalid,
                    ),
                ],
            ),
            // Host may only be set on the request, to a hostname without a port (as
            // Datum: it becomes the rule's URLRewrite hostname), and not beside one.
            (
                json!([]),
                json!([{"type": "RequestHeaderModifier", "requestHeaderModifier": {"remove": ["Host"]}}]),
                vec![(
                    "spec.rules[0].filters[0].requestHeaderModifier.remove[0]",
                    FieldErrorKind::Forbidden,
                )],
            ),
            (
                json!([]),
                json!([{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "Host", "value": "Coffee.Example.com"}]}}]),
                vec![],
            ),
            (
                json!([]),
                json!([{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "host", "value": "example.com:8080"}],
                    "add": [{"name": "Host", "value": "example.com"}]}},
                {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                    "set": [{"name": "Host", "value": "example.com"}]}}]),
                vec![
                    (
                        "spec.rules[0].filters[0].requestHeaderModifier.set[0].value",
                        FieldErrorKind::Invalid,
                    ),
                    (
                        "spec.rules[0].filters[0].requestHeaderModifier.add[0].name",
                        FieldErrorKind::Forbidden,
                    ),
                    (
                        "spec.rules[0].filters[1].responseHeaderModifier.set[0].name",
                        FieldErrorKind::Forbidden,
                    ),
                ],
            ),
            (
                json!([]),
                json!([{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "Host", "value": "a.example.com"}]}},
                {"type": "URLRewrite", "urlRewrite": {"hostname": "b.example.com"}}]),
                vec![("spec.rules[0].filters", FieldErrorKind::Invalid)],
            ),
        ];
        for (matches, filters, want) in cases {
            let p = proxy(HttpProxySpec {
                hostnames: vec![],
                rules: vec![HttpProxyRule {
                    matches: serde_json::from_value(matches).unwrap(),
                    filters: serde_json::from_value(filters.clone()).unwrap(),
                    ..Default::default()
                }],
            });
            // Filters alone: whether the rule needs backends is another test's.
            let got: Vec<(String, FieldErrorKind)> = p
                .validate()
                .into_iter()
                .filter(|e| e.field != "spec.rules[0].backends")
                .map(|e| (e.field, e.kind))
                .collect();
            let want: Vec<(String, FieldErrorKind)> =
                want.into_iter().map(|(f, k)| (f.to_owned(), k)).collect();
            assert_eq!(got, want, "{filters}");
        }
    }

    #[test]
    fn reserved_headers_are_refused_in_every_filter() {
        let filters: Vec<
            gateway_api::apis::standard::httproutes::HttpRouteRulesBackendRefsFilters,
        > = serde_json::from_value(serde_json::json!([
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                "set": [{"name": "X-Ok", "value": "1"}, {"name": "Datum-Node-Id", "value": "ab"}],
                "add": [{"name": "x-iroh-meta", "value": "1"}],
                "remove": ["datum-target-port"]}},
            {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                "set": [{"name": "datum-target-host", "value": "h"}]}}
        ]))
        .unwrap();
        let rule_filters = serde_json::from_value(serde_json::json!([
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "datum-target-port", "value": "22"}]}}
        ]))
        .unwrap();
        let p = proxy(HttpProxySpec {
            hostnames: vec![],
            rules: vec![HttpProxyRule {
                filters: rule_filters,
                backends: vec![HttpProxyBackend {
                    endpoint: "http://127.0.0.1:3000".into(),
                    connector: Some(ConnectorReference {
                        name: Some("c".into()),
                        selector: None,
                    }),
                    tls: None,
                    filters,
                    instance: None,
                }],
                ..Default::default()
            }],
        });
        let errs = p.validate();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.rules[0].filters[0].requestHeaderModifier.set[0].name",
                "spec.rules[0].backends[0].filters[0].requestHeaderModifier.set[1].name",
                "spec.rules[0].backends[0].filters[0].requestHeaderModifier.add[0].name",
                "spec.rules[0].backends[0].filters[0].requestHeaderModifier.remove[0]",
                "spec.rules[0].backends[0].filters[1].responseHeaderModifier.set[0].name",
            ]
        );
        assert!(errs.iter().all(|e| e.kind == FieldErrorKind::Forbidden));
        assert!(
            errs[1].message.contains("\"Datum-Node-Id\" is reserved"),
            "{}",
            errs[1]
        );
    }

    #[test]
    fn advertisement_checks_addresses_and_ports() {
        let mut adv = ConnectorAdvertisement::new(
            "a",
            ConnectorAdvertisementSpec {
                connector_ref: LocalObjectReference { name: "c".into() },
                layer4: vec![Layer4Advertisement {
                    name: "web".into(),
                    services: vec![Layer4Service {
                        address: "a.*.example.com".into(),
                        ports: vec![ServicePort {
                            name: None,
                            port: 70000,
                            protocol: Protocol::Tcp,
                        }],
                    }],
                }],
            },
        );
        let fields: Vec<_> = adv.validate().into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "spec.layer4[0].services[0].address",
                "spec.layer4[0].services[0].ports[0].port"
            ]
        );
        adv.spec.layer4[0].services[0] = Layer4Service {
            address: "*.example.com".into(),
            ports: vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Protocol::Tcp,
            }],
        };
        assert!(adv.validate().is_empty());
        let port = adv.spec.layer4[0].services[0].ports[0].clone();
        adv.spec.layer4[0].services[0]
            .ports
            .push(ServicePort { port: 81, ..port });
        let fields: Vec<_> = adv.validate().into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            ["spec.layer4[0].services[0].ports[1]"],
            "names are keys"
        );
    }

    #[test]
    fn connector_status_is_checked() {
        let mut c = Connector::new(
            "c",
            ConnectorSpec {
                connector_class_name: "portway".into(),
                capabilities: vec![],
            },
        );
        c.status = Some(ConnectorStatus {
            connection_details: Some(ConnectionDetails {
                type_: ConnectionType::PublicKey,
                public_key: Some(PublicKeyConnectionDetails {
                    id: "xyz".into(),
                    discovery_mode: DiscoveryMode::Dns,
                    home_relay: Some("relay".into()),
                    addresses: vec![PublicKeyAddress {
                        address: "host".into(),
                        port: 0,
                    }],
                }),
            }),
            ..Default::default()
        });
        let fields: Vec<_> = c.validate().into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "status.connectionDetails.publicKey.id",
                "status.connectionDetails.publicKey.homeRelay",
                "status.connectionDetails.publicKey.addresses[0].address",
                "status.connectionDetails.publicKey.addresses[0].port",
            ]
        );
    }

    #[test]
    fn meta_names_labels_annotations() {
        let meta = ObjectMeta {
            name: Some("Bad".into()),
            labels: Some([("ok".to_string(), "-bad".to_string())].into()),
            annotations: Some([("a b".to_string(), "v".to_string())].into()),
            ..Default::default()
        };
        let fields: Vec<_> = validate_meta(&meta, NameRule::Subdomain)
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            [
                "metadata.name",
                "metadata.labels[ok]",
                "metadata.annotations[a b]"
            ]
        );
        let meta = ObjectMeta {
            name: Some("a.b".into()),
            ..Default::default()
        };
        assert!(validate_meta(&meta, NameRule::Subdomain).is_empty());
        assert_eq!(validate_meta(&meta, NameRule::Label).len(), 1);
    }

    /// Datum's stricter rules, one proxy each: the field each refuses, or none.
    #[test]
    fn datum_rules_for_names_paths_backends_and_origins() {
        use serde_json::json;
        let one = |v: serde_json::Value| -> Vec<(String, FieldErrorKind)> {
            let spec: HttpProxySpec = serde_json::from_value(v).unwrap();
            proxy(spec)
                .validate()
                .into_iter()
                .map(|e| (e.field, e.kind))
                .collect()
        };
        let backend = |b: serde_json::Value| json!({"rules": [{"backends": [b]}]});
        let path = |v: &str| {
            json!({"rules": [{"matches": [{"path": {"type": "PathPrefix", "value": v}}],
                "backends": [{"endpoint": "http://127.0.0.1:3000", "connector": {"name": "c"}}]}]})
        };
        let invalid = |f: &str| vec![(f.to_owned(), FieldErrorKind::Invalid)];
        let none: Vec<(String, FieldErrorKind)> = vec![];
        let cases = [
            (path("/api/v1"), none.clone()),
            (path("/a%20b"), none.clone()),
            (
                json!({"rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/a/.*"}}],
                    "backends": [{"endpoint": "http://127.0.0.1:3000", "connector": {"name": "c"}}]}]}),
                none.clone(),
            ),
            (
                path("/a//b"),
                invalid("spec.rules[0].matches[0].path.value"),
            ),
            (
                path("/a/../b"),
                invalid("spec.rules[0].matches[0].path.value"),
            ),
            (path("/a/."), invalid("spec.rules[0].matches[0].path.value")),
            (
                path("/a%2fb"),
                invalid("spec.rules[0].matches[0].path.value"),
            ),
            (path("/a#b"), invalid("spec.rules[0].matches[0].path.value")),
            (path("/a b"), invalid("spec.rules[0].matches[0].path.value")),
            (
                path("/a%zz"),
                invalid("spec.rules[0].matches[0].path.value"),
            ),
            (
                json!({"rules": [{"name": "web.v1", "backends": [{"endpoint": "http://a.example.com"}]}]}),
                none.clone(),
            ),
            (
                json!({"rules": [{"matches": [{"path": {"value": "/"}}]}]}),
                vec![(
                    "spec.rules[0].backends".to_owned(),
                    FieldErrorKind::Required,
                )],
            ),
            (
                json!({"rules": [{"filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}]}]}),
                none.clone(),
            ),
            (
                json!({"rules": [{"filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}],
                    "backends": [{"endpoint": "http://a.example.com"}]}]}),
                invalid("spec.rules[0].backends"),
            ),
            (
                json!({"rules": []}),
                vec![("spec.rules".to_owned(), FieldErrorKind::Required)],
            ),
            (
                backend(json!({"endpoint": "https://10.0.0.7"})),
                vec![(
                    "spec.rules[0].backends[0].tls.hostname".to_owned(),
                    FieldErrorKind::Required,
                )],
            ),
            (
                backend(
                    json!({"endpoint": "https://10.0.0.7", "tls": {"hostname": "api.example.com:443"}}),
                ),
                invalid("spec.rules[0].backends[0].tls.hostname"),
            ),
            (
                backend(
                    json!({"endpoint": "https://10.0.0.7", "tls": {"hostname": "api.example.com"}}),
                ),
                none.clone(),
            ),
            (
                backend(json!({"instance": {"name": "vm", "port": 80}})),
                vec![(
                    "spec.rules[0].backends[0].instance".to_owned(),
                    FieldErrorKind::NotSupported,
                )],
            ),
            (
                backend(json!({"connector": {"name": "c"}})),
                vec![(
                    "spec.rules[0].backends[0].endpoint".to_owned(),
                    FieldErrorKind::Required,
                )],
            ),
            (
                backend(json!({"endpoint": "http://intranet"})),
                invalid("spec.rules[0].backends[0].endpoint"),
            ),
            (
                backend(json!({"endpoint": "http://localhost:8080"})),
                none.clone(),
            ),
            (
                backend(json!({"endpoint": "http://db:5432", "connector": {"name": "c"}})),
                none.clone(),
            ),
            (
                backend(
                    json!({"endpoint": "http://db:5432", "connector": {"name": "laptop.home"}}),
                ),
                none.clone(),
            ),
            (
                json!({"hostnames": ["intranet"], "rules": [{"backends": [{"endpoint": "http://a.example.com"}]}]}),
                invalid("spec.hostnames[0]"),
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(one(spec.clone()), want, "{spec}");
        }
        assert_name_is_a_label::<HttpProxy>();
    }

    /// As Datum: a proxy's name names its generated Services, which are labels.
    fn assert_name_is_a_label<K: Validate>() {
        let dotted = ObjectMeta {
            name: Some("a.b".into()),
            ..Default::default()
        };
        assert_eq!(
            validate_meta(&dotted, K::NAME_RULE).len(),
            1,
            "{}: a proxy's name is a label",
            std::any::type_name::<K>()
        );
    }

    #[test]
    fn rule_names_are_unique_and_matches_bounded_as_in_datum() {
        let rule = |name: &str, matches: usize| HttpProxyRule {
            name: Some(name.into()),
            matches: vec![Default::default(); matches],
            ..Default::default()
        };
        let p = proxy(HttpProxySpec {
            hostnames: vec![],
            rules: vec![rule("a", 64), rule("a", 64), rule("b", 1)],
        });
        let got: Vec<(String, FieldErrorKind)> = p
            .validate()
            .into_iter()
            .filter(|e| !e.field.ends_with(".backends"))
            .map(|e| (e.field, e.kind))
            .collect();
        assert_eq!(
            got,
            [
                ("spec.rules[1]".to_owned(), FieldErrorKind::Duplicate),
                ("spec.rules".to_owned(), FieldErrorKind::TooMany),
            ]
        );
    }

    #[test]
    fn tcp_endpoints_are_tcp_host_port_and_nothing_else() {
        let ok = |s: &str, host: &str, port: u16| {
            assert_eq!(
                tcp_endpoint(s),
                Ok(Target {
                    host: host.into(),
                    port
                }),
                "{s}"
            );
        };
        ok("tcp://127.0.0.1:22", "127.0.0.1", 22);
        ok("tcp://[::1]:5432", "::1", 5432);
        ok("tcp://DB.internal:5432", "db.internal", 5432);
        ok("tcp://localhost:65535", "localhost", 65535);
        let refused = [
            ("http://127.0.0.1:22", "scheme \"http\""),
            ("127.0.0.1:22", "is not tcp://host:port"),
            ("tcp://127.0.0.1", "has no port"),
            ("tcp://127.0.0.1:0", "between 1 and 65535"),
            ("tcp://127.0.0.1:65536", "between 1 and 65535"),
            ("tcp://127.0.0.1:ssh", "between 1 and 65535"),
            ("tcp://127.0.0.1:22/", "a path"),
            ("tcp://127.0.0.1:22?x=1", "a query"),
            ("tcp://127.0.0.1:22#x", "a fragment"),
            ("tcp://user:pw@127.0.0.1:22", "credentials"),
            ("tcp://::1:22", "in brackets"),
            ("tcp://[db.internal]:22", "only an IPv6 address"),
            ("tcp://*.internal:22", "wildcard"),
            ("tcp://bad_host:22", "host"),
            ("tcp://:22", "host"),
        ];
        for (s, says) in refused {
            let e = tcp_endpoint(s).unwrap_err();
            assert!(e.contains(says), "{s}: {e:?} should say {says:?}");
        }
    }

    /// Each case: a TCPProxy spec (JSON), and the fields (with kinds) refused.
    #[test]
    fn tcp_proxy_errors_name_the_field() {
        use serde_json::json;
        let backend = |endpoint: &str, connector: serde_json::Value| json!({"endpoint": endpoint, "connector": connector});
        let ssh = || backend("tcp://127.0.0.1:22", json!({"name": "laptop"}));
        let invalid = |f: &str| vec![(f.to_owned(), FieldErrorKind::Invalid)];
        let none: Vec<(String, FieldErrorKind)> = vec![];
        let cases = [
            (json!({"backends": [ssh()]}), none.clone()),
            (json!({"port": 20022, "backends": [ssh()]}), none.clone()),
            (
                json!({"backends": [backend("tcp://[::1]:5432",
                    json!({"selector": {"matchLabels": {"app": "db"}}}))]}),
                none.clone(),
            ),
            (
                json!({"port": 0, "backends": [ssh()]}),
                invalid("spec.port"),
            ),
            (
                json!({"port": 65536, "backends": [ssh()]}),
                invalid("spec.port"),
            ),
            (
                json!({"backends": []}),
                vec![("spec.backends".to_owned(), FieldErrorKind::Required)],
            ),
            (
                json!({"backends": vec![ssh(); 17]}),
                vec![("spec.backends".to_owned(), FieldErrorKind::TooMany)],
            ),
            (
                json!({"backends": [backend("", json!({"name": "laptop"}))]}),
                vec![(
                    "spec.backends[0].endpoint".to_owned(),
                    FieldErrorKind::Required,
                )],
            ),
            (
                json!({"backends": [ssh(), backend("http://127.0.0.1:22", json!({"name": "laptop"}))]}),
                invalid("spec.backends[1].endpoint"),
            ),
            (
                json!({"backends": [backend("tcp://127.0.0.1:22", json!({}))]}),
                invalid("spec.backends[0].connector"),
            ),
            (
                json!({"backends": [backend("tcp://127.0.0.1:22",
                    json!({"name": "laptop", "selector": {"matchLabels": {"a": "b"}}}))]}),
                invalid("spec.backends[0].connector"),
            ),
            (
                json!({"backends": [backend("tcp://127.0.0.1:22", json!({"name": "Laptop"}))]}),
                invalid("spec.backends[0].connector.name"),
            ),
            // UDP: udp:// backends; not mixed with tcp://, not under TLS passthrough.
            (
                json!({"backends": [backend("udp://127.0.0.1:53", json!({"name": "laptop"}))]}),
                vec![],
            ),
            (
                json!({"backends": [ssh(), backend("udp://127.0.0.1:53", json!({"name": "laptop"}))]}),
                invalid("spec.backends[1].endpoint"),
            ),
            (
                json!({"tls": {}, "backends": [backend("udp://127.0.0.1:53", json!({"name": "laptop"}))]}),
                invalid("spec.backends[0].endpoint"),
            ),
            // TLS passthrough: exact, fully qualified, unique names; no port of its own.
            (
                json!({"tls": {"hostnames": ["db.example.com"]}, "backends": [ssh()]}),
                vec![],
            ),
            (
                json!({"port": 20001, "tls": {}, "backends": [ssh()]}),
                vec![("spec.port".to_owned(), FieldErrorKind::Forbidden)],
            ),
            // A certificate request is one PEM block, bounded; its contents are the
            // operator's to check.
            (
                json!({"tls": {"certificateRequest": "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"},
                       "backends": [ssh()]}),
                vec![],
            ),
            (
                json!({"tls": {"certificateRequest": "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"},
                       "backends": [ssh()]}),
                invalid("spec.tls.certificateRequest"),
            ),
            (
                json!({"tls": {"certificateRequest": format!("-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----", "A".repeat(20_000))},
                       "backends": [ssh()]}),
                vec![(
                    "spec.tls.certificateRequest".to_owned(),
                    FieldErrorKind::TooLong,
                )],
            ),
            (
                json!({"tls": {"hostnames": ["*.example.com", "db", "a.example.com", "a.example.com"]},
                       "backends": [ssh()]}),
                vec![
                    ("spec.tls.hostnames[0]".to_owned(), FieldErrorKind::Invalid),
                    ("spec.tls.hostnames[1]".to_owned(), FieldErrorKind::Invalid),
                    (
                        "spec.tls.hostnames[3]".to_owned(),
                        FieldErrorKind::Duplicate,
                    ),
                ],
            ),
            (
                json!({"backends": [backend("tcp://127.0.0.1:22",
                    json!({"selector": {"matchExpressions": [{"key": "app", "operator": "In"}]}}))]}),
                vec![(
                    "spec.backends[0].connector.selector.matchExpressions[0].values".to_owned(),
                    FieldErrorKind::Required,
                )],
            ),
        ];
        for (spec, want) in cases {
            let p = TcpProxy::new("ssh", serde_json::from_value(spec.clone()).unwrap());
            let got: Vec<(String, FieldErrorKind)> = p
                .validate()
                .into_iter()
                .map(|e| (e.field, e.kind))
                .collect();
            assert_eq!(got, want, "{spec}");
        }
        let mut p = TcpProxy::new(
            "ssh",
            serde_json::from_value(json!({"backends": [ssh()]})).unwrap(),
        );
        p.status = Some(TcpProxyStatus {
            port: Some(70000),
            ..Default::default()
        });
        let fields: Vec<_> = p.validate().into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["status.port"]);
        assert_name_is_a_label::<TcpProxy>();
    }

    #[test]
    fn tcp_route_ports_are_checked() {
        let route: TcpRoute = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "r"},
            "spec": {"parentRefs": [{"name": "g", "sectionName": "tcp"}],
                "rules": [{"backendRefs": [{"name": "a", "port": 22}, {"name": "b", "port": 0}]}]}
        }))
        .unwrap();
        let fields: Vec<_> = route.validate().into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["spec.rules[0].backendRefs[1].port"]);
    }
}
