//! Gateway API filters: which ones Portway carries out, and the rules a filter list must
//! follow before any data plane sees it.
//!
//! Both data planes (the built-in edge and Envoy) implement, on a rule,
//! RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite and CORS; on a
//! backend, RequestHeaderModifier and ResponseHeaderModifier. The schema admits more
//! (RequestMirror, ExtensionRef, and the rule-only kinds on a backend): those are stored,
//! then refused by the operator with `Accepted=False`, reason [`UNSUPPORTED_VALUE`],
//! naming the field, because status must never claim what no data plane does.

use serde::Serialize;
use serde_json::Value;

use crate::httpproxy::HttpProxySpec;
use crate::validation::{FieldError, FieldErrorKind};

/// The condition reason for a filter that is valid but not implemented.
pub const UNSUPPORTED_VALUE: &str = "UnsupportedValue";

/// Where a filter list sits: a rule's filters apply to all its requests, a backend's only
/// to the requests that backend serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Rule,
    Backend,
}

impl Level {
    /// The filter fields both data planes carry out at this level.
    pub fn implemented(self) -> &'static [&'static str] {
        match self {
            Self::Rule => &[
                "requestHeaderModifier",
                "responseHeaderModifier",
                "requestRedirect",
                "urlRewrite",
                "cors",
            ],
            Self::Backend => &["requestHeaderModifier", "responseHeaderModifier"],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Rule => "on a rule",
            Self::Backend => "on a backend",
        }
    }
}

/// Each filter `type` and the field it names.
const TYPES: &[(&str, &str)] = &[
    ("RequestHeaderModifier", "requestHeaderModifier"),
    ("ResponseHeaderModifier", "responseHeaderModifier"),
    ("RequestMirror", "requestMirror"),
    ("RequestRedirect", "requestRedirect"),
    ("URLRewrite", "urlRewrite"),
    ("ExtensionRef", "extensionRef"),
    ("CORS", "cors"),
];

/// The field a filter `type` names (`URLRewrite` → `urlRewrite`).
pub fn field_of(type_: &str) -> Option<&'static str> {
    TYPES.iter().find(|(t, _)| *t == type_).map(|(_, f)| *f)
}

/// The `type` that names `field` (`urlRewrite` → `URLRewrite`).
fn type_of(field: &str) -> &'static str {
    TYPES
        .iter()
        .find(|(_, f)| *f == field)
        .map_or("", |(t, _)| *t)
}

fn as_json<T: Serialize>(filters: &[T]) -> Vec<Value> {
    filters
        .iter()
        .map(|f| serde_json::to_value(f).unwrap_or_default())
        .collect()
}

/// Filters in `filters` (the list at `field`) that no data plane implements at `level`.
pub fn unsupported<T: Serialize>(field: &str, level: Level, filters: &[T]) -> Vec<FieldError> {
    let mut out = Vec::new();
    for (i, f) in as_json(filters).iter().enumerate() {
        let type_ = f.get("type").and_then(Value::as_str).unwrap_or_default();
        let Some(name) = field_of(type_) else {
            continue;
        };
        if !level.implemented().contains(&name) {
            let supported = level
                .implemented()
                .iter()
                .map(|n| type_of(n))
                .collect::<Vec<_>>()
                .join(", ");
            out.push(FieldError {
                field: format!("{field}[{i}].{name}"),
                kind: FieldErrorKind::NotSupported,
                message: format!(
                    "{type_} filters are not implemented {}; supported there: {supported}",
                    level.name()
                ),
            });
        }
    }
    out
}

/// Every filter of an HTTPProxy that no data plane implements.
pub fn unsupported_in_proxy(spec: &HttpProxySpec) -> Vec<FieldError> {
    let mut out = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let f = format!("spec.rules[{i}]");
        out.extend(unsupported(
            &format!("{f}.filters"),
            Level::Rule,
            &rule.filters,
        ));
        for (j, b) in rule.backends.iter().enumerate() {
            out.extend(unsupported(
                &format!("{f}.backends[{j}].filters"),
                Level::Backend,
                &b.filters,
            ));
        }
    }
    out
}

/// The shape rules of a filter list, whatever the level: the field `type` names is set and
/// no other, each type appears once (RequestMirror excepted), and a rule does not both
/// redirect and rewrite.
pub(crate) fn shapes<T: Serialize>(field: &str, filters: &[T]) -> Vec<FieldError> {
    let mut out = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    let values = as_json(filters);
    for (i, f) in values.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let type_ = f.get("type").and_then(Value::as_str).unwrap_or_default();
        let Some(name) = field_of(type_) else {
            out.push(FieldError {
                field: format!("{at}.type"),
                kind: FieldErrorKind::NotSupported,
                message: format!("unknown filter type {type_:?}"),
            });
            continue;
        };
        if f.get(name).is_none_or(Value::is_null) {
            out.push(FieldError {
                field: format!("{at}.{name}"),
                kind: FieldErrorKind::Required,
                message: format!("a {type_} filter needs {name}"),
            });
        }
        for (key, v) in f.as_object().into_iter().flatten() {
            if key != "type" && key != name && !v.is_null() {
                out.push(FieldError {
                    field: format!("{at}.{key}"),
                    kind: FieldErrorKind::Forbidden,
                    message: format!("only {name} may be set on a {type_} filter"),
                });
            }
        }
        if name != "requestMirror" && seen.contains(&name) {
            out.push(FieldError {
                field: format!("{at}.type"),
                kind: FieldErrorKind::Duplicate,
                message: format!("{type_} may appear once in a filter list"),
            });
        }
        let conflicting = match name {
            "requestRedirect" => "urlRewrite",
            "urlRewrite" => "requestRedirect",
            _ => "",
        };
        if seen.contains(&conflicting) {
            out.push(FieldError {
                field: format!("{at}.type"),
                kind: FieldErrorKind::Invalid,
                message: "RequestRedirect and URLRewrite cannot be used together".into(),
            });
        }
        seen.push(name);
    }
    out
}

/// Whether `name` is an HTTP field name (RFC 9110 token).
/// The `Host` a rule's or backend's `RequestHeaderModifier` sets (lower-case): Datum's
/// way to rewrite it, which Portway turns into the rule's URLRewrite hostname (no data
/// plane lets a header filter change `Host`). Filters walked as JSON, so both levels'
/// types answer alike.
pub fn host_set<T: Serialize>(filters: &[T]) -> Option<String> {
    filters.iter().find_map(|f| {
        let v = serde_json::to_value(f).ok()?;
        v["requestHeaderModifier"]["set"]
            .as_array()?
            .iter()
            .find(|h| {
                h["name"]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case("host"))
            })
            .and_then(|h| h["value"].as_str())
            .map(str::to_ascii_lowercase)
    })
}

/// The hostname a rule rewrites `Host` to: its URLRewrite's, or what its (or its one
/// backend's) `RequestHeaderModifier` sets.
pub fn host_override(rule: &crate::HttpProxyRule) -> Option<String> {
    rule.filters
        .iter()
        .find_map(|f| f.url_rewrite.as_ref()?.hostname.clone())
        .or_else(|| host_set(&rule.filters))
        .or_else(|| rule.backends.iter().find_map(|b| host_set(&b.filters)))
}

pub fn header_name(name: &str) -> Result<(), String> {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(tchar) {
        return Err(format!("{name:?} is not a valid header name"));
    }
    Ok(())
}

/// Whether `value` may be sent as a header value (visible ASCII, spaces and tabs; no line
/// breaks, which would let a value start a header of its own).
pub fn header_value(value: &str) -> Result<(), String> {
    if value
        .chars()
        .any(|c| c != '\t' && (c.is_control() || !c.is_ascii()))
    {
        return Err(format!(
            "{value:?} is not a valid header value (control or non-ASCII characters)"
        ));
    }
    Ok(())
}

/// Whether `origin` is a CORS origin pattern: `*`, or `scheme://host[:port]` where the host
/// may start with `*.`.
pub fn cors_origin(origin: &str) -> Result<(), String> {
    if origin == "*" {
        return Ok(());
    }
    let bad = || format!("{origin:?} is not \"*\" nor scheme://host[:port]");
    let (scheme, rest) = origin.split_once("://").ok_or_else(bad)?;
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return Err(bad());
    }
    let (host, port) = match rest.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6.split_once(']').ok_or_else(bad)?;
            match after {
                "" => (h, None),
                _ => (h, Some(after.strip_prefix(':').ok_or_else(bad)?)),
            }
        }
        None => match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        },
    };
    if let Some(p) = port
        && p.parse::<u16>().is_err()
    {
        return Err(bad());
    }
    let host = host.strip_prefix("*.").unwrap_or(host);
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.:".contains(c))
    {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_origins() {
        for ok in [
            "*",
            "https://a.example",
            "https://*.example.com:8443",
            "http://[::1]",
            "http://[::1]:80",
        ] {
            assert_eq!(cors_origin(ok), Ok(()), "{ok}");
        }
        for bad in [
            "a.example",
            "https://",
            "https://a.example:x",
            "http://[::1",
            "https://a b",
            "://a",
        ] {
            assert!(cors_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_implemented_filters_pass() {
        let rule: Vec<gateway_api::apis::standard::httproutes::HttpRouteRulesFilters> =
            serde_json::from_value(serde_json::json!([
                {"type": "CORS", "cors": {}},
                {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s"}}},
                {"type": "ExtensionRef", "extensionRef": {"group": "g", "kind": "k", "name": "n"}},
            ]))
            .unwrap();
        let fields: Vec<String> = unsupported("f", Level::Rule, &rule)
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["f[1].requestMirror", "f[2].extensionRef"]);
        let backend: Vec<
            gateway_api::apis::standard::httproutes::HttpRouteRulesBackendRefsFilters,
        > = serde_json::from_value(serde_json::json!([
            {"type": "ResponseHeaderModifier", "responseHeaderModifier": {}},
            {"type": "RequestRedirect", "requestRedirect": {}},
        ]))
        .unwrap();
        let errs = unsupported("b", Level::Backend, &backend);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "b[1].requestRedirect");
        assert!(
            errs[0].message.contains("not implemented on a backend"),
            "{}",
            errs[0]
        );
    }
}
