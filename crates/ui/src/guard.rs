//! Who may use the UI: a browser page of this very origin, or a local script.
//!
//! - DNS rebinding: a page at `evil.example` whose name comes to resolve to 127.0.0.1 is
//!   still sent with `Host: evil.example`, so only loopback Host values are answered.
//! - Cross-site requests: a change (any method but GET/HEAD) and revealing secrets need
//!   the per-run token, which only the page itself carries (no other origin can read it),
//!   sent in a header (which a cross-site form or image cannot set); an `Origin` or
//!   `Sec-Fetch-Site` saying another site is refused outright.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Method, StatusCode, header};

use crate::api::error;

/// The header a change carries the token in.
pub const TOKEN_HEADER: &str = "x-portway-token";

pub fn new_token() -> String {
    let bytes: [u8; 24] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `host` (a Host header or an Origin's authority) names this UI on loopback.
pub fn loopback_host(host: &str, port: u16) -> bool {
    let (name, at) = match host.rsplit_once(':') {
        // `[::1]` alone ends in `]`, not a port.
        Some((name, p)) if !p.contains(']') => (name, p.parse::<u16>().ok()),
        _ => (host, Some(80)),
    };
    at == Some(port)
        && matches!(
            name.to_ascii_lowercase().as_str(),
            "127.0.0.1" | "localhost" | "[::1]"
        )
}

/// Whether an `Origin` header is this UI's own (or absent: not a browser's cross-origin
/// request).
fn own_origin(headers: &HeaderMap, port: u16) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    origin
        .to_str()
        .ok()
        .and_then(|o| o.strip_prefix("http://"))
        .is_some_and(|authority| loopback_host(authority, port))
}

fn same_site(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| matches!(v, "same-origin" | "none"))
}

/// Compares in time independent of where they differ.
fn token_ok(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers.get(TOKEN_HEADER).map(http::HeaderValue::as_bytes) else {
        return false;
    };
    given.len() == token.len()
        && given
            .iter()
            .zip(token.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Why a request is refused, if it is.
pub fn check(
    method: &Method,
    headers: &HeaderMap,
    query: Option<&str>,
    port: u16,
    token: &str,
) -> Option<(StatusCode, String)> {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if !host.is_some_and(|h| loopback_host(h, port)) {
        return Some((
            StatusCode::FORBIDDEN,
            format!(
                "this UI answers only at http://127.0.0.1:{port}/ or http://localhost:{port}/ \
                 (Host {:?} refused: DNS rebinding protection)",
                host.unwrap_or("")
            ),
        ));
    }
    if !own_origin(headers, port) || !same_site(headers) {
        return Some((
            StatusCode::FORBIDDEN,
            "cross-site requests are refused (Origin or Sec-Fetch-Site names another site)".into(),
        ));
    }
    let reveal = query.is_some_and(|q| q.split('&').any(|p| p == "reveal=1" || p == "reveal=true"));
    let changes = !matches!(*method, Method::GET | Method::HEAD);
    if (changes || reveal) && !token_ok(headers, token) {
        return Some((
            StatusCode::FORBIDDEN,
            format!(
                "missing or wrong {TOKEN_HEADER} header: changes and revealing secrets need the \
                 token this run's page carries (also in the ready file)"
            ),
        ));
    }
    None
}

pub async fn layer(
    State(state): State<std::sync::Arc<crate::State>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some((status, why)) = check(
        req.method(),
        req.headers(),
        req.uri().query(),
        state.port,
        &state.token,
    ) {
        return error(status, why, None).into_response();
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    for (name, value) in [
        (
            "content-security-policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
        ("cross-origin-resource-policy", "same-origin"),
    ] {
        h.insert(name, http::HeaderValue::from_static(value));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn only_loopback_hosts_of_this_port_are_answered() {
        for (host, ok) in [
            ("127.0.0.1:4040", true),
            ("localhost:4040", true),
            ("LOCALHOST:4040", true),
            ("[::1]:4040", true),
            ("127.0.0.1:4041", false),
            ("127.0.0.1", false),
            ("evil.example:4040", false),
            ("127.0.0.1.evil.example:4040", false),
            ("localhost.:4040", false),
            ("[::1]", false),
            ("", false),
        ] {
            assert_eq!(loopback_host(host, 4040), ok, "{host}");
        }
        assert!(loopback_host("localhost", 80));
        assert!(loopback_host("[::1]", 80));
    }

    #[test]
    fn reads_changes_and_reveals_are_held_to_their_rules() {
        let t = "secret";
        let get = Method::GET;
        let post = Method::POST;
        let ok = [("host", "127.0.0.1:4040")];
        assert_eq!(check(&get, &headers(&ok), None, 4040, t), None);
        let rebound = headers(&[("host", "evil.example:4040")]);
        assert_eq!(check(&get, &rebound, None, 4040, t).unwrap().0, 403);
        // A change needs the token.
        assert_eq!(check(&post, &headers(&ok), None, 4040, t).unwrap().0, 403);
        let wrong = headers(&[("host", "127.0.0.1:4040"), (TOKEN_HEADER, "secreT")]);
        assert!(check(&post, &wrong, None, 4040, t).is_some());
        let short = headers(&[("host", "127.0.0.1:4040"), (TOKEN_HEADER, "secre")]);
        assert!(check(&post, &short, None, 4040, t).is_some());
        let good = headers(&[("host", "127.0.0.1:4040"), (TOKEN_HEADER, "secret")]);
        assert_eq!(check(&post, &good, None, 4040, t), None);
        assert_eq!(check(&Method::DELETE, &good, None, 4040, t), None);
        // Revealing secrets is a read that needs it too.
        assert!(check(&get, &headers(&ok), Some("reveal=1"), 4040, t).is_some());
        assert_eq!(check(&get, &good, Some("a=b&reveal=1"), 4040, t), None);
        // Another site, even with the token (it cannot have it, but still).
        for extra in [
            ("origin", "http://evil.example"),
            ("origin", "null"),
            ("origin", "https://127.0.0.1:4040"),
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-site", "same-site"),
        ] {
            let h = headers(&[("host", "127.0.0.1:4040"), (TOKEN_HEADER, "secret"), extra]);
            assert!(check(&post, &h, None, 4040, t).is_some(), "{extra:?}");
            assert!(check(&get, &h, None, 4040, t).is_some(), "{extra:?}");
        }
        let own = headers(&[
            ("host", "localhost:4040"),
            (TOKEN_HEADER, "secret"),
            ("origin", "http://localhost:4040"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(check(&post, &own, None, 4040, t), None);
    }
}
