//! Route filters beyond header changes, as parsed once into the route table: a redirect,
//! a rewrite, a CORS policy. Each says what it does to a request here, for the built-in
//! edge, and gives the xDS renderer what Envoy needs to do the same.

use gateway_api::apis::standard::httproutes::{
    HttpRouteRulesFiltersCors, HttpRouteRulesFiltersRequestRedirect,
    HttpRouteRulesFiltersRequestRedirectPathType, HttpRouteRulesFiltersRequestRedirectScheme,
    HttpRouteRulesFiltersUrlRewrite, HttpRouteRulesFiltersUrlRewritePathType,
};
use http::HeaderValue;

use crate::model::PathMatch;

/// A path change of a redirect or a rewrite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathChange {
    /// The whole path becomes this.
    Full(String),
    /// The matched prefix (whole segments; no trailing slash, `""` for `/`) becomes `with`.
    Prefix { prefix: String, with: String },
}

impl PathChange {
    /// `ReplacePrefixMatch` needs the route's prefix; a rule whose match is not a prefix
    /// cannot use it (admission refuses that), so it yields `None`.
    fn new(
        full: Option<&String>,
        prefix: Option<&String>,
        is_prefix: bool,
        m: &PathMatch,
    ) -> Option<Self> {
        if !is_prefix {
            return full.map(|p| Self::Full(p.clone()));
        }
        let PathMatch::Prefix(matched) = m else {
            return None;
        };
        Some(Self::Prefix {
            prefix: matched.trim_end_matches('/').to_owned(),
            with: prefix?.clone(),
        })
    }

    /// The new path for `path` (which the route matched; the query is not part of it).
    pub fn apply(&self, path: &str) -> String {
        match self {
            Self::Full(p) => p.clone(),
            Self::Prefix { prefix, with } => {
                let rest = path.strip_prefix(prefix.as_str()).unwrap_or(path);
                let out = format!("{}{rest}", with.trim_end_matches('/'));
                if out.is_empty() { "/".into() } else { out }
            }
        }
    }

    /// The same change as an RE2 pattern and substitution over the path, for Envoy's
    /// `regex_rewrite` (which keeps the query). A prefix replaced by `/` also takes the
    /// slash after it, so `/old/x` becomes `/x`, not `//x`.
    pub fn regex(&self) -> (String, String) {
        match self {
            Self::Full(p) => ("^.*$".into(), p.replace('\\', "\\\\")),
            Self::Prefix { prefix, with } => {
                let with = with.trim_end_matches('/');
                if with.is_empty() {
                    (format!("^{}/?", re2_escape(prefix)), "/".into())
                } else {
                    (
                        format!("^{}", re2_escape(prefix)),
                        with.replace('\\', "\\\\"),
                    )
                }
            }
        }
    }
}

/// Escapes RE2's special characters.
pub fn re2_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A RequestRedirect: the answer is a redirect, no backend is asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<&'static str>,
    pub hostname: Option<String>,
    /// The port to send to; `None` keeps the request's. A new scheme without a port means
    /// that scheme's own port (Gateway API), so it is set here.
    pub port: Option<u16>,
    pub path: Option<PathChange>,
    pub status: u16,
}

/// The port a scheme implies (`http` 80, `https` 443).
pub(crate) fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

impl Redirect {
    pub(crate) fn new(r: &HttpRouteRulesFiltersRequestRedirect, m: &PathMatch) -> Option<Self> {
        let scheme = r.scheme.as_ref().map(|s| match s {
            HttpRouteRulesFiltersRequestRedirectScheme::Http => "http",
            HttpRouteRulesFiltersRequestRedirectScheme::Https => "https",
        });
        let port = match r.port {
            Some(p) => Some(u16::try_from(p).ok()?),
            None => scheme.and_then(default_port),
        };
        let path = match &r.path {
            Some(p) => Some(PathChange::new(
                p.replace_full_path.as_ref(),
                p.replace_prefix_match.as_ref(),
                p.r#type == HttpRouteRulesFiltersRequestRedirectPathType::ReplacePrefixMatch,
                m,
            )?),
            None => None,
        };
        Some(Self {
            scheme,
            hostname: r.hostname.clone(),
            port,
            path,
            status: r
                .status_code
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(302),
        })
    }

    /// The `Location` for a request to `scheme://authority{path}?{query}`. The port is left
    /// out when it is the scheme's own.
    pub fn location(
        &self,
        scheme: &str,
        authority: &str,
        path: &str,
        query: Option<&str>,
    ) -> String {
        let scheme = self.scheme.unwrap_or(scheme);
        let (host, port) = split_authority(authority);
        let host = self.hostname.as_deref().unwrap_or(host);
        let port = self.port.or(port);
        let mut out = format!("{scheme}://{host}");
        if let Some(p) = port.filter(|p| default_port(scheme) != Some(*p)) {
            out.push_str(&format!(":{p}"));
        }
        match &self.path {
            Some(change) => out.push_str(&change.apply(path)),
            None => out.push_str(path),
        }
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

/// `host[:port]` (or `[v6]:port`) → host and port.
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    let (host, port) = if authority.starts_with('[') {
        match authority.rsplit_once("]:") {
            Some((h, p)) => (&authority[..h.len() + 1], Some(p)),
            None => (authority, None),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    (host, port.and_then(|p| p.parse().ok()))
}

/// A URLRewrite: what the device sees instead of the public host and path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrite {
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathChange>,
}

impl Rewrite {
    pub(crate) fn new(r: &HttpRouteRulesFiltersUrlRewrite, m: &PathMatch) -> Option<Self> {
        let path = match &r.path {
            Some(p) => Some(PathChange::new(
                p.replace_full_path.as_ref(),
                p.replace_prefix_match.as_ref(),
                p.r#type == HttpRouteRulesFiltersUrlRewritePathType::ReplacePrefixMatch,
                m,
            )?),
            None => None,
        };
        Some(Self {
            hostname: match &r.hostname {
                Some(h) => Some(HeaderValue::from_str(h).ok()?),
                None => None,
            },
            path,
        })
    }

    /// The request target after the rewrite: the new path with the old query.
    pub fn path_and_query(&self, path: &str, query: Option<&str>) -> String {
        let path = self
            .path
            .as_ref()
            .map_or_else(|| path.to_owned(), |c| c.apply(path));
        match query {
            Some(q) => format!("{path}?{q}"),
            None => path,
        }
    }
}

/// A CORS policy, answered as Envoy's CORS filter does: a preflight from an allowed
/// origin is answered here, other requests get the allow headers on their response, and
/// an origin not allowed gets none (its preflight goes on to the app).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cors {
    /// `*` or `scheme://host[:port]`, where `*` in a pattern matches any characters.
    pub allow_origins: Vec<String>,
    pub allow_methods: String,
    pub allow_headers: String,
    pub expose_headers: String,
    pub max_age: Option<i32>,
    pub allow_credentials: bool,
}

impl Cors {
    pub(crate) fn new(c: &HttpRouteRulesFiltersCors) -> Self {
        let join = |l: &Option<Vec<String>>| l.as_deref().unwrap_or_default().join(",");
        Self {
            allow_origins: c
                .allow_origins
                .iter()
                .flatten()
                .map(|o| o.to_ascii_lowercase())
                .collect(),
            allow_methods: join(&c.allow_methods),
            allow_headers: join(&c.allow_headers),
            expose_headers: join(&c.expose_headers),
            max_age: c.max_age,
            allow_credentials: c.allow_credentials.unwrap_or(false),
        }
    }

    pub fn allows(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        self.allow_origins.iter().any(|p| glob(p, &origin))
    }

    /// Each allowed origin as an RE2 pattern, for Envoy.
    pub fn origin_regexes(&self) -> Vec<String> {
        self.allow_origins
            .iter()
            .map(|p| {
                let parts: Vec<String> = p.split('*').map(re2_escape).collect();
                format!("(?i)^{}$", parts.join(".*"))
            })
            .collect()
    }

    /// The headers of a preflight answer to `origin`.
    pub fn preflight(&self, origin: &HeaderValue) -> Vec<(&'static str, HeaderValue)> {
        let mut out = vec![("access-control-allow-origin", origin.clone())];
        if self.allow_credentials {
            out.push((
                "access-control-allow-credentials",
                HeaderValue::from_static("true"),
            ));
        }
        for (name, v) in [
            ("access-control-allow-methods", &self.allow_methods),
            ("access-control-allow-headers", &self.allow_headers),
        ] {
            if let Ok(v) = HeaderValue::from_str(v)
                && !v.is_empty()
            {
                out.push((name, v));
            }
        }
        if let Some(age) = self.max_age {
            out.push(("access-control-max-age", HeaderValue::from(age)));
        }
        out
    }

    /// The headers added to an answer to `origin`.
    pub fn response(&self, origin: &HeaderValue) -> Vec<(&'static str, HeaderValue)> {
        let mut out = vec![("access-control-allow-origin", origin.clone())];
        if self.allow_credentials {
            out.push((
                "access-control-allow-credentials",
                HeaderValue::from_static("true"),
            ));
        }
        if let Ok(v) = HeaderValue::from_str(&self.expose_headers)
            && !v.is_empty()
        {
            out.push(("access-control-expose-headers", v));
        }
        out
    }
}

/// `*` matches any run of characters (including none).
fn glob(pattern: &str, s: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = s.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(prefix: &str, with: &str) -> PathChange {
        PathChange::new(
            None,
            Some(&with.to_owned()),
            true,
            &PathMatch::Prefix(prefix.into()),
        )
        .unwrap()
    }

    #[test]
    fn a_prefix_is_replaced_by_whole_segments() {
        for (p, with, path, want) in [
            ("/old", "/new", "/old", "/new"),
            ("/old", "/new", "/old/", "/new/"),
            ("/old", "/new", "/old/x/y", "/new/x/y"),
            ("/old/", "/new/", "/old/x", "/new/x"),
            ("/old", "/", "/old", "/"),
            ("/old", "/", "/old/x", "/x"),
            ("/old", "/", "/old/", "/"),
            ("/", "/app", "/x", "/app/x"),
            ("/", "/", "/x", "/x"),
        ] {
            assert_eq!(prefix(p, with).apply(path), want, "{p} → {with} on {path}");
        }
        assert_eq!(
            PathChange::Full("/fixed".into()).apply("/any/thing"),
            "/fixed"
        );
    }

    /// The Envoy form gives the same paths (checked here with the RE2 subset that the
    /// patterns use: an anchored literal, an optional slash).
    #[test]
    fn the_envoy_pattern_says_the_same() {
        for (p, with, path) in [
            ("/old", "/new", "/old/x"),
            ("/old", "/", "/old/x"),
            ("/old", "/", "/old"),
            ("/", "/app", "/x"),
            ("/a.b", "/c", "/a.b/d"),
        ] {
            let change = prefix(p, with);
            let (pattern, sub) = change.regex();
            let literal = pattern
                .trim_start_matches('^')
                .trim_end_matches("/?")
                .replace('\\', "");
            let rest = path.strip_prefix(&literal).unwrap();
            let rest = if pattern.ends_with("/?") {
                rest.strip_prefix('/').unwrap_or(rest)
            } else {
                rest
            };
            assert_eq!(format!("{sub}{rest}"), change.apply(path), "{pattern}");
        }
        assert_eq!(re2_escape("/a.b(c)"), "/a\\.b\\(c\\)");
    }

    #[test]
    fn redirect_locations_follow_gateway_api() {
        let r = |scheme: Option<&'static str>,
                 hostname: Option<&str>,
                 port: Option<u16>,
                 path: Option<PathChange>| Redirect {
            scheme,
            hostname: hostname.map(str::to_owned),
            port: port.or(scheme.and_then(default_port)),
            path,
            status: 302,
        };
        // The request's port stays when nothing changes the scheme or port.
        assert_eq!(
            r(None, Some("b.example"), None, None).location(
                "http",
                "a.example:8080",
                "/x",
                Some("q=1")
            ),
            "http://b.example:8080/x?q=1"
        );
        // A new scheme without a port: the scheme's own, left out.
        assert_eq!(
            r(Some("https"), None, None, None).location("http", "a.example:8080", "/x", None),
            "https://a.example/x"
        );
        assert_eq!(
            r(Some("https"), None, Some(8443), None).location("http", "a.example", "/", None),
            "https://a.example:8443/"
        );
        assert_eq!(
            r(None, None, Some(80), Some(PathChange::Full("/y".into()))).location(
                "http",
                "[::1]:8080",
                "/x",
                None
            ),
            "http://[::1]/y"
        );
    }

    #[test]
    fn cors_origins_match_exactly_or_by_wildcard() {
        let c = Cors {
            allow_origins: vec!["https://app.example".into(), "https://*.example.org".into()],
            allow_methods: String::new(),
            allow_headers: String::new(),
            expose_headers: String::new(),
            max_age: None,
            allow_credentials: false,
        };
        assert!(c.allows("https://app.example"));
        assert!(c.allows("HTTPS://APP.EXAMPLE"));
        assert!(c.allows("https://a.b.example.org"));
        assert!(!c.allows("http://app.example"));
        assert!(!c.allows("https://app.example.evil"));
        assert!(!c.allows("https://example.org"));
        assert_eq!(
            c.origin_regexes(),
            [
                "(?i)^https://app\\.example$",
                "(?i)^https://.*\\.example\\.org$"
            ]
        );
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "abc") && glob("a*b*c", "axxbyyc") && !glob("a*b*c", "acb"));
    }
}
