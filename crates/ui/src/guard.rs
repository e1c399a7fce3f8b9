//! Who may use the UI: the person who started the agent (in a browser, through the link
//! it printed), or their scripts (with the token from the ready file, which only they can
//! read).
//!
//! - Other people and programs on the machine: every request needs the per-run token, as
//!   the header `X-Portway-Token` or as the cookie the printed link (`/?token=…`) sets.
//! - DNS rebinding: a page at `evil.example` whose name comes to resolve to 127.0.0.1 is
//!   still sent with `Host: evil.example`, so only loopback Host values are answered.
//! - Cross-site requests: a change (any method but GET/HEAD) and revealing secrets need
//!   the token in the header (which a cross-site form or image cannot set; the cookie is
//!   `SameSite=Strict` besides); an `Origin` or `Sec-Fetch-Site` saying another site is
//!   refused outright.

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
fn same(given: &[u8], token: &str) -> bool {
    given.len() == token.len()
        && given
            .iter()
            .zip(token.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn token_ok(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(TOKEN_HEADER)
        .is_some_and(|given| same(given.as_bytes(), token))
}

/// The cookie the printed link sets: named after the port, since browsers share cookies
/// across the ports of one host (two agents' UIs must not overwrite each other's).
pub fn cookie_name(port: u16) -> String {
    format!("portway-ui-{port}")
}

fn cookie_ok(headers: &HeaderMap, port: u16, token: &str) -> bool {
    let name = cookie_name(port);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .any(|(n, v)| n == name && same(v.as_bytes(), token))
}

/// A query's `name`, percent-decoded as the handlers decode it.
pub fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query?).ok()?;
    pairs.into_iter().find(|(n, _)| n == name).map(|(_, v)| v)
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
    let reveal = query_value(query, "reveal").is_some_and(|v| v == "1" || v == "true");
    let changes = !matches!(*method, Method::GET | Method::HEAD);
    let header = token_ok(headers, token);
    if !header && !cookie_ok(headers, port, token) {
        return Some((
            StatusCode::UNAUTHORIZED,
            format!(
                "open the link portway printed (http://127.0.0.1:{port}/?token=…), or send the \
                 {TOKEN_HEADER} header with the token from the ready file"
            ),
        ));
    }
    if (changes || reveal) && !header {
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
    let mut resp = admit(&state, req, next).await;
    // On every answer, refusals included.
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

async fn admit(state: &crate::State, req: Request, next: Next) -> Response {
    // The printed link: its token becomes the cookie, and the address bar loses it.
    if req.method() == Method::GET
        && req.uri().path() == "/"
        && let Some(given) = query_value(req.uri().query(), "token")
        && check(req.method(), req.headers(), None, state.port, &given)
            .is_none_or(|(s, _)| s == StatusCode::UNAUTHORIZED)
        && same(given.as_bytes(), &state.token)
    {
        let cookie = format!(
            "{}={}; HttpOnly; SameSite=Strict; Path=/",
            cookie_name(state.port),
            state.token
        );
        let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
        if let Ok(v) = http::HeaderValue::from_str(&cookie) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
        return resp;
    }
    if let Some((status, why)) = check(
        req.method(),
        req.headers(),
        req.uri().query(),
        state.port,
        &state.token,
    ) {
        return error(status, why, None).into_response();
    }
    next.run(req).await
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
        let ok = [
            ("host", "127.0.0.1:4040"),
            ("cookie", "a=b; portway-ui-4040=secret"),
        ];
        assert_eq!(check(&get, &headers(&ok), None, 4040, t), None);
        // Nothing without the token, not even a read.
        let anyone = headers(&[("host", "127.0.0.1:4040")]);
        assert_eq!(check(&get, &anyone, None, 4040, t).unwrap().0, 401);
        for cookie in [
            "portway-ui-4041=secret",
            "portway-ui-4040=secreT",
            "portway-ui-4040",
        ] {
            let h = headers(&[("host", "127.0.0.1:4040"), ("cookie", cookie)]);
            assert_eq!(check(&get, &h, None, 4040, t).unwrap().0, 401, "{cookie}");
        }
        let rebound = headers(&[
            ("host", "evil.example:4040"),
            ("cookie", "portway-ui-4040=secret"),
        ]);
        assert_eq!(check(&get, &rebound, None, 4040, t).unwrap().0, 403);
        // A change needs the token in the header: the cookie alone is not enough.
        assert_eq!(check(&post, &headers(&ok), None, 4040, t).unwrap().0, 403);
        let wrong = headers(&[("host", "127.0.0.1:4040"), (TOKEN_HEADER, "secreT")]);
        assert!(check(&post, &wrong, None, 4040, t).is_some());
        let short = headers(&[("host", "127.0.0.1:4040"), (TOKEN_HEADER, "secre")]);
        assert!(check(&post, &short, None, 4040, t).is_some());
        let good = headers(&[("host", "127.0.0.1:4040"), (TOKEN_HEADER, "secret")]);
        assert_eq!(check(&post, &good, None, 4040, t), None);
        assert_eq!(check(&Method::DELETE, &good, None, 4040, t), None);
        // Revealing secrets is a read that needs it too, however the query spells it.
        assert!(check(&get, &headers(&ok), Some("reveal=1"), 4040, t).is_some());
        assert!(check(&get, &headers(&ok), Some("reveal=%31"), 4040, t).is_some());
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

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_value(Some("token=abc"), "token").as_deref(),
            Some("abc")
        );
        assert_eq!(
            query_value(Some("reveal=%31&a=b"), "reveal").as_deref(),
            Some("1")
        );
        assert_eq!(query_value(None, "token"), None);
    }
}
