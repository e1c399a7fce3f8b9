//! Certificates as objects: `kubernetes.io/tls` Secrets in the system namespace, written
//! by the operator's issuer and served by every edge (built-in or Envoy) by SNI. The
//! hostnames a Secret covers are in an annotation, so a gateway picks a certificate
//! without parsing it, and an edge restart re-issues nothing.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;

/// Where certificate Secrets live: readable by the operator and edge roles only.
pub const SYSTEM_NAMESPACE: &str = "portway-system";
/// Marks a Secret as a certificate for the edges (value `"true"`).
pub const LABEL: &str = "portway.dev/certificate";
/// The names the certificate covers, comma-separated (`*.portway.localhost`).
pub const HOSTNAMES: &str = "portway.dev/hostnames";
/// When the certificate expires (RFC 3339).
pub const NOT_AFTER: &str = "portway.dev/not-after";
/// When it was issued (RFC 3339): with the expiry, its lifetime.
pub const ISSUED_AT: &str = "portway.dev/issued-at";
/// Who issued it (`local-ca`, or the ACME directory URL).
pub const ISSUER: &str = "portway.dev/issuer";
/// On an HTTPProxy (copied to its HTTPRoute): `"false"` keeps plain HTTP to its names
/// instead of redirecting it to HTTPS once a certificate covers them.
pub const HTTPS_REDIRECT: &str = "portway.dev/https-redirect";
/// On an HTTPProxy (copied to its HTTPRoute): the `Strict-Transport-Security` value its
/// names answer with over HTTPS, e.g. `max-age=31536000; includeSubDomains`.
pub const HSTS: &str = "portway.dev/hsts";

/// Checks an HSTS value (RFC 6797): `max-age=<seconds>`, then optionally
/// `includeSubDomains` and `preload`.
///
/// # Errors
/// The reason, for a field error.
pub fn hsts(value: &str) -> Result<(), String> {
    let mut parts = value.split(';').map(str::trim);
    let max_age = parts
        .next()
        .and_then(|p| p.strip_prefix("max-age="))
        .ok_or("must start with max-age=<seconds>")?;
    max_age
        .parse::<u32>()
        .map_err(|_| format!("max-age must be a number of seconds, got {max_age:?}"))?;
    for p in parts {
        if !p.eq_ignore_ascii_case("includeSubDomains") && !p.eq_ignore_ascii_case("preload") {
            return Err(format!(
                "unknown directive {p:?} (includeSubDomains, preload)"
            ));
        }
    }
    Ok(())
}

/// Marks a Secret holding an ACME DNS-01 answer (value `"true"`), which Portway's DNS
/// server publishes: the TXT value `data.txt` at the name in annotation [`RECORD`].
pub const CHALLENGE_LABEL: &str = "portway.dev/acme-challenge";
pub const RECORD: &str = "portway.dev/record";

fn is_challenge(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(CHALLENGE_LABEL))
        .is_some_and(|v| v == "true")
}

/// The record a challenge Secret asks to publish: name (lowercase, no trailing dot) and
/// TXT value.
pub fn challenge_record(secret: &Secret) -> Option<(String, String)> {
    let meta = &secret.metadata;
    if !is_challenge(secret) {
        return None;
    }
    let name = meta.annotations.as_ref()?.get(RECORD)?;
    let value = secret.data.as_ref()?.get("txt")?;
    Some((
        name.trim_end_matches('.').to_ascii_lowercase(),
        String::from_utf8(value.0.clone()).ok()?,
    ))
}

/// On a challenge Secret (with [`CHALLENGE_LABEL`]) holding an ACME HTTP-01 answer: the
/// host it is for. Every edge answers plain-HTTP `GET` [`HTTP01_PATH`]`<token>` to that
/// host with `data.key-authorization` (`<token>.<thumbprint>`).
pub const HTTP01_HOST: &str = "portway.dev/http01-host";
/// Where ACME servers look for an HTTP-01 answer (RFC 8555 §8.3).
pub const HTTP01_PATH: &str = "/.well-known/acme-challenge/";

/// An HTTP-01 answer, as an edge serves it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Http01 {
    /// Lowercase, no trailing dot.
    pub host: String,
    pub token: String,
    pub key_authorization: String,
}

impl Http01 {
    /// The request path the ACME server asks.
    pub fn path(&self) -> String {
        format!("{HTTP01_PATH}{}", self.token)
    }
}

/// The HTTP-01 answer a challenge Secret holds. The token and thumbprint are base64url
/// (RFC 8555 §8.1), checked here: they end up in a URL path and in Envoy's configuration.
pub fn http01_answer(secret: &Secret) -> Option<Http01> {
    let meta = &secret.metadata;
    if !is_challenge(secret) {
        return None;
    }
    let host = meta.annotations.as_ref()?.get(HTTP01_HOST)?;
    let value = secret.data.as_ref()?.get("key-authorization")?;
    let key_authorization = String::from_utf8(value.0.clone()).ok()?;
    let (token, thumbprint) = key_authorization.split_once('.')?;
    let base64url = |s: &str| {
        !s.is_empty()
            && s.len() <= 256
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !base64url(token) || !base64url(thumbprint) {
        return None;
    }
    Some(Http01 {
        host: host.trim_end_matches('.').to_ascii_lowercase(),
        token: token.to_owned(),
        key_authorization,
    })
}

/// A Secret name for a certificate of `hostname`: the name itself, `*.` written
/// `wildcard.` (a Secret's name is a DNS subdomain, which `*` is not). A name that itself
/// starts with `wildcard.` or `exact.` gets `exact.` in front, so no two patterns share
/// a Secret.
pub fn secret_name(hostname: &str) -> String {
    let h = hostname.trim_end_matches('.').to_ascii_lowercase();
    match h.strip_prefix("*.") {
        Some(rest) => format!("wildcard.{rest}"),
        None if h.starts_with("wildcard.") || h.starts_with("exact.") => format!("exact.{h}"),
        None => h,
    }
}

/// Whether a certificate for `pattern` is valid for `host`: the same name, or `*.x`
/// for a name exactly one label below `x` (as TLS clients check).
pub fn covers(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.');
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// What a certificate Secret says of itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    pub hostnames: Vec<String>,
    pub not_after: Option<Timestamp>,
    pub issued_at: Option<Timestamp>,
    pub issuer: String,
}

impl Info {
    /// `None` for a Secret that is not a certificate of ours.
    pub fn of(secret: &Secret) -> Option<Self> {
        let meta = &secret.metadata;
        if meta.labels.as_ref()?.get(LABEL).map(String::as_str) != Some("true")
            || secret.type_.as_deref() != Some(crate::validation::TLS_SECRET)
        {
            return None;
        }
        let ann = meta.annotations.as_ref()?;
        Some(Self {
            name: meta.name.clone().unwrap_or_default(),
            hostnames: ann
                .get(HOSTNAMES)?
                .split(',')
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
            not_after: ann.get(NOT_AFTER).and_then(|t| t.parse().ok()),
            issued_at: ann.get(ISSUED_AT).and_then(|t| t.parse().ok()),
            issuer: ann.get(ISSUER).cloned().unwrap_or_default(),
        })
    }

    /// Whether it covers `host` and is still valid at `now`.
    pub fn serves(&self, host: &str, now: Timestamp) -> bool {
        self.not_after.is_some_and(|t| t > now) && self.hostnames.iter().any(|p| covers(p, host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_covers_one_label_only() {
        let cases = [
            ("*.p.localhost", "a.p.localhost", true),
            ("*.p.localhost", "A.P.localhost.", true),
            ("*.p.localhost", "p.localhost", false),
            ("*.p.localhost", "a.b.p.localhost", false),
            ("*.p.localhost", ".p.localhost", false),
            ("app.example.com", "APP.example.com", true),
            ("app.example.com", "x.app.example.com", false),
        ];
        for (pattern, host, want) in cases {
            assert_eq!(covers(pattern, host), want, "{pattern} covers {host}");
        }
        assert_eq!(secret_name("*.P.localhost."), "wildcard.p.localhost");
        assert_eq!(secret_name("app.example.com"), "app.example.com");
        assert_eq!(
            secret_name("wildcard.p.localhost"),
            "exact.wildcard.p.localhost"
        );
        assert_eq!(secret_name("exact.p.localhost"), "exact.exact.p.localhost");
    }

    #[test]
    fn an_http01_answer_needs_the_label_a_host_and_a_base64url_key_authorization() {
        let secret = |label: bool, host: Option<&str>, value: &str| {
            let mut s: Secret = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "acme-http01-0",
                    "labels": if label { serde_json::json!({CHALLENGE_LABEL: "true"}) } else { serde_json::json!({}) },
                    "annotations": host.map_or(serde_json::json!({}), |h| serde_json::json!({HTTP01_HOST: h}))},
            }))
            .unwrap();
            s.data = Some(
                [(
                    "key-authorization".to_owned(),
                    k8s_openapi::ByteString(value.as_bytes().to_vec()),
                )]
                .into(),
            );
            s
        };
        let answer = http01_answer(&secret(true, Some("Shop.Test."), "tok_en-1.thumb")).unwrap();
        assert_eq!(answer.host, "shop.test");
        assert_eq!(answer.path(), "/.well-known/acme-challenge/tok_en-1");
        assert_eq!(answer.key_authorization, "tok_en-1.thumb");
        for (label, host, value) in [
            (false, Some("shop.test"), "tok.thumb"),
            (true, None, "tok.thumb"),
            (true, Some("shop.test"), "no-dot"),
            (true, Some("shop.test"), "../etc.thumb"),
            (true, Some("shop.test"), "tok.thumb\r\nx: y"),
            (true, Some("shop.test"), ".thumb"),
        ] {
            assert_eq!(
                http01_answer(&secret(label, host, value)),
                None,
                "{value:?}"
            );
        }
    }
}
