//! `AccessPolicy`: who may call an HTTPProxy's public URL, enforced by the data plane in
//! front of the tunnel (the built-in edge and Envoy alike).
//!
//! A policy attaches to proxies by `targetRefs`, as Envoy Gateway's SecurityPolicy does,
//! rather than living inline in HTTPProxy: the proxy belongs to whoever publishes the app
//! (often the device's agent, which rewrites it), the policy to whoever decides who may
//! call it; one policy can guard several proxies; and the operator carries it to the
//! generated HTTPRoute as an `ExtensionRef` filter, which is how Gateway API data planes
//! expect route-level extensions.

use std::net::IpAddr;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{PolicyAncestorStatus, PolicyTargetReference};

/// The kind an AccessPolicy targets, and the group of both.
pub const TARGET_KIND: &str = "HTTPProxy";
pub const GROUP: &str = "networking.datumapis.com";
pub const KIND: &str = "AccessPolicy";

/// The largest `maxRequestBytes`: a limited body is held whole before it is sent on (so a
/// request over the limit gets 413 and never half-reaches the app), as Envoy's buffer
/// filter does, and this bounds that memory.
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;

/// The Secret type that holds `basicAuth` users, and its key: `user:hash` lines.
pub const HTPASSWD_TYPE: &str = "portway.dev/htpasswd";
pub const HTPASSWD_KEY: &str = "htpasswd";

/// The most requests a `rateLimit` rate may name per period.
pub const MAX_RATE_REQUESTS: u32 = 1_000_000;

/// Rules for the requests to the targeted proxies, checked in this order, the first that
/// fails answering: `ip` (403), `rateLimit` (429), `basicAuth` or `jwt` (401; 403 for a
/// valid token without the required claims), `methods` (405), `maxRequestBytes` (413).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "networking.datumapis.com",
    version = "v1alpha",
    kind = "AccessPolicy",
    namespaced,
    status = "AccessPolicyStatus",
    shortname = "ap",
    derive = "Default",
    derive = "PartialEq",
    printcolumn(
        name = "Targets",
        type_ = "string",
        json_path = ".spec.targetRefs[*].name"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.ancestors[*].conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicySpec {
    /// The HTTPProxies (same namespace) this policy guards: `{group:
    /// networking.datumapis.com, kind: HTTPProxy, name}`. A proxy takes one policy: when
    /// several name it, the oldest applies and the others are refused as `Conflicted`.
    pub target_refs: Vec<PolicyTargetReference>,
    /// Client addresses, as the edge sees them (the PROXY protocol's, or a trusted
    /// proxy's `X-Forwarded-For`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpRules>,
    /// Token buckets: per client address, and per tunnel (all clients together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// HTTP Basic authentication against hashed passwords in a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuth>,
    /// Bearer JWTs (`Authorization: Bearer …`) signed by an issuer's keys. Not with
    /// `basicAuth`: both read the one `Authorization` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtAuth>,
    /// Browser sign-in with an OpenID Connect provider. Not with `basicAuth` or `jwt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<Oidc>,
    /// The only methods answered (e.g. `[GET, HEAD]`); others get 405 with `Allow`.
    /// Empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// The largest request body, in bytes, at most 64 MiB; larger gets 413.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_bytes: Option<u64>,
}

/// Requests over a rate get 429 with `Retry-After`. A bucket holds `requests` tokens
/// (the burst) and refills at `requests` per `per`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// For each client address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_client: Option<Rate>,
    /// For the proxy as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_tunnel: Option<Rate>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rate {
    pub requests: u32,
    pub per: Period,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Period {
    #[default]
    Second,
    Minute,
    Hour,
}

impl Period {
    pub fn seconds(self) -> u64 {
        match self {
            Self::Second => 1,
            Self::Minute => 60,
            Self::Hour => 3600,
        }
    }
}

/// A rate as the one-liner takes it: `N/s`, `N/m` or `N/h` (or the words: `100/minute`).
///
/// # Errors
/// A sentence with an example.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let bad = || format!("{s:?} is not a rate: N/s, N/m or N/h, e.g. 100/m");
    let (n, per) = s.split_once('/').ok_or_else(bad)?;
    let per = match per.trim().to_ascii_lowercase().as_str() {
        "s" | "sec" | "second" => Period::Second,
        "m" | "min" | "minute" => Period::Minute,
        "h" | "hour" => Period::Hour,
        _ => return Err(bad()),
    };
    let rate = Rate {
        requests: n.trim().parse().map_err(|_| bad())?,
        per,
    };
    rate_value(&rate)?;
    Ok(rate)
}

/// A rate's count, checked.
///
/// # Errors
/// When the count is 0 or over [`MAX_RATE_REQUESTS`].
pub fn rate_value(r: &Rate) -> Result<(), String> {
    if (1..=MAX_RATE_REQUESTS).contains(&r.requests) {
        Ok(())
    } else {
        Err(format!(
            "requests must be 1 to {MAX_RATE_REQUESTS}, got {}",
            r.requests
        ))
    }
}

/// Users and their password hashes come from a Secret of this namespace, of type
/// `portway.dev/htpasswd`, key `htpasswd`: `user:hash` lines, the hash bcrypt (`$2y$`,
/// `$2b$`, `$2a$`) or Argon2 (`$argon2id$`, `$argon2i$`), as `htpasswd -B` or `argon2`
/// print them. Never a plaintext password: the API server refuses one.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BasicAuth {
    pub secret_ref: SecretRef,
    /// Shown by browsers in the login prompt; default the hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realm: Option<String>,
}

/// Bearer tokens: a JWT signed with RS256, ES256 or EdDSA by a key of the issuer's JWKS,
/// whose `iss` is `issuer`, whose `aud` names one of `audiences` (when given), that has
/// not expired (`exp` is required; a minute of clock skew is allowed) and holds the
/// required claims. The token is not passed on; chosen claims are, as headers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtAuth {
    /// The `iss` a token must carry, exactly.
    pub issuer: String,
    /// A token's `aud` must name one of these. Empty: any audience.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where the issuer's public keys are; default (`{}`): found from the issuer.
    #[serde(default)]
    pub jwks: JwksSource,
    /// Claims a token must hold: a string claim equal to one of `values`, or a list claim
    /// holding one of them (e.g. `groups`). A valid token without them gets 403.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_claims: Vec<RequiredClaim>,
    /// Claims sent to the app as request headers. A header of this list that the client
    /// sent is always removed, so the app sees only what a token said.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claim_to_headers: Vec<ClaimToHeader>,
}

/// A JWKS (`{"keys": [...]}`): in a Secret of type `portway.dev/jwks`, key `jwks`; or at
/// an `https://` URL (`http://` only on a loopback address), fetched by the data plane,
/// cached for five minutes and fetched again (at most every 30 s) when a token names a
/// key it does not hold. At most one of the two; neither: the `jwks_uri` the issuer's
/// OpenID configuration (`<issuer>/.well-known/openid-configuration`) names.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwksSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequiredClaim {
    /// A top-level claim, e.g. `groups` or `email_verified`.
    pub name: String,
    /// Accepted values; a number or boolean claim compares as its JSON text (`true`).
    pub values: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimToHeader {
    /// A top-level claim; a list is sent comma-separated, a number or boolean as JSON.
    pub claim: String,
    pub header: String,
}

/// Browser sign-in: OpenID Connect's authorization-code flow with PKCE (S256), `state`
/// bound to the browser by a cookie, and `nonce`; the provider's ID token is checked as
/// `jwt` checks bearer tokens (its keys from the provider's `jwks_uri`). The session is a
/// cookie the data plane encrypts and authenticates (AES-256-GCM), bound to the hostname
/// and this policy. The provider must list
/// `<scheme>://<hostname>/.portway/oidc/callback` as a redirect URI of the client.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Oidc {
    /// The provider (`iss`); its configuration is read from
    /// `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// A Secret of type `portway.dev/oidc-client`, key `clientSecret`.
    pub client_secret_ref: SecretRef,
    /// Default `[openid, email, profile]`; must include `openid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Who may in, by the provider's claims: an `email` listed here, or at one of
    /// `allowedDomains` (the provider must not say `email_verified: false`), or in one of
    /// `allowedGroups`. All three empty: anyone the provider signs in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_emails: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_groups: Vec<String>,
    /// The claim holding the groups; default `groups`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_claim: Option<String>,
    /// How long a session lasts, 60 to 2 592 000 (30 days); default 28 800 (8 hours).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_seconds: Option<u32>,
}

/// The Secret type that holds an `oidc` client's secret, and its key.
pub const OIDC_CLIENT_TYPE: &str = "portway.dev/oidc-client";
pub const OIDC_CLIENT_KEY: &str = "clientSecret";
/// The path the provider sends the browser back to, on every guarded hostname, and the
/// one that ends a session.
pub const OIDC_CALLBACK_PATH: &str = "/.portway/oidc/callback";
pub const OIDC_LOGOUT_PATH: &str = "/.portway/oidc/logout";

/// The Secret type that holds a `jwt` JWKS, and its key.
pub const JWKS_TYPE: &str = "portway.dev/jwks";
pub const JWKS_KEY: &str = "jwks";

/// Headers the data planes set themselves and a policy may not name for claims: the
/// request's framing and routing, its credentials, and Portway's identity.
pub fn claim_header(name: &str) -> Result<(), String> {
    crate::filters::header_name(name)?;
    let lower = name.to_ascii_lowercase();
    const OWN: [&str; 9] = [
        "host",
        "authorization",
        "cookie",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        IDENTITY_HEADER,
    ];
    if OWN.contains(&lower.as_str()) || crate::headers::is_reserved(&lower) {
        return Err(format!(
            "header {name:?} is set by Portway or the client's connection; name another"
        ));
    }
    Ok(())
}

/// On an AccessPolicy or Secret a device wrote (`portway http --basic-auth ...`): the
/// device's connector. Such a policy guards only proxies whose backends all name that
/// connector, so a device cannot guard (or lock out, or open) another's proxy, even one
/// that later takes the name of a proxy it deleted; the API server lets a device write
/// only policies and Secrets labelled with its own connector.
pub const CONNECTOR_LABEL: &str = "portway.dev/connector";
/// On an HTTPProxy: the AccessPolicy it waits for. While no policy guards the proxy, its
/// routes answer 500 (the window between a device creating its proxy and its policy never
/// serves unguarded). Only a policy that targets the proxy guards it, never one that
/// merely has this name.
pub const POLICY_ANNOTATION: &str = "portway.dev/access-policy";

/// The header that carries the caller's identity to the app after `basicAuth` or `jwt`:
/// a JWT the data plane signs (EdDSA), for the app to check against the JWKS published
/// at [`IDENTITY_JWKS_PATH`] on every public hostname. Any copy a client sends is removed.
pub const IDENTITY_HEADER: &str = "portway-identity";
/// Where each public hostname publishes the keys [`IDENTITY_HEADER`] is signed with.
pub const IDENTITY_JWKS_PATH: &str = "/.well-known/portway/jwks.json";
/// The identity's issuer (`iss`), and how long it is valid.
pub const IDENTITY_ISSUER: &str = "portway";
pub const IDENTITY_TTL_SECS: u64 = 300;
/// The Secret (in `portway-system`) holding the data planes' signing key, created by
/// the operator: one key shared by every edge and the xDS server.
pub const IDENTITY_SECRET: &str = "portway-identity";
pub const IDENTITY_SECRET_TYPE: &str = "portway.dev/identity-key";
pub const IDENTITY_SECRET_KEY: &str = "ed25519.pk8";

/// A JWKS URL: `https://`, or `http://` on a loopback address only (a provider on the
/// same machine, as OAuth allows for native apps): keys fetched in clear from anywhere
/// else could be swapped on the way.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn fetch_url(s: &str) -> Result<(), String> {
    let url = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if s.len() > 2048 {
        return Err("a URL is at most 2048 characters".into());
    }
    if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
        return Err(format!("{s:?}: no user, password or #fragment"));
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err(format!("{s:?} names no host")),
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(format!(
            "{s:?} must be https:// (http:// only on a loopback address)"
        )),
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    pub name: String,
}

/// Address rules: a client in `deny` is refused; with `allow` set, so is every client not
/// in it. Entries are CIDRs (`10.0.0.0/8`, `2001:db8::/32`) or single addresses.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IpRules {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicyStatus {
    /// Per target: `Accepted` (attached, or why not), and per data plane whether it
    /// enforces the policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ancestors: Vec<PolicyAncestorStatus>,
}

/// A CIDR or single address, as an address and prefix length (host bits kept: the data
/// planes mask them).
///
/// # Errors
/// A sentence saying what is wrong.
pub fn cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| {
        format!("{s:?} is not an IP address or CIDR (e.g. 10.0.0.0/8, 2001:db8::/32)")
    })?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= max && !l.starts_with('+') => n,
            _ => return Err(format!("{s:?}: the prefix length must be 0 to {max}")),
        },
    };
    Ok((ip, len))
}

/// An HTTP method token as the policy names it: upper case letters only (`GET`,
/// `PROPFIND`), so a typo in case cannot silently match nothing.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn method(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 32 || !s.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "{s:?} must be an HTTP method in upper case letters, e.g. GET"
        ));
    }
    Ok(())
}

/// Which scheme a stored password hash is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashKind {
    Bcrypt,
    Argon2,
}

/// The scheme of `hash`, checked for shape only (the data planes verify against it).
///
/// # Errors
/// A sentence saying what is wrong, naming the accepted schemes; a plaintext password or
/// a weak scheme (`{SHA}`, MD5 `$apr1$`, crypt) is refused.
pub fn password_hash(hash: &str) -> Result<HashKind, String> {
    const SCHEMES: &str =
        "bcrypt ($2y$, $2b$, $2a$; `htpasswd -B`) or Argon2 ($argon2id$, $argon2i$)";
    // bcrypt's own alphabet, and Argon2's (standard base64 without padding).
    let bcrypt64 = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/')
    };
    let b64 = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    };
    if let Some(rest) = ["$2y$", "$2b$", "$2a$"]
        .iter()
        .find_map(|p| hash.strip_prefix(p))
    {
        // $2y$10$ + 22 characters of salt + 31 of hash. A cost past 14 (over a second
        // a check) would let one Secret hold the edge's hashing for minutes.
        let cost = rest
            .get(..2)
            .and_then(|c| c.parse::<u32>().ok())
            .unwrap_or(0);
        let ok = rest.len() == 56
            && rest.is_char_boundary(2)
            && rest[..2].bytes().all(|b| b.is_ascii_digit())
            && (4..=MAX_BCRYPT_COST).contains(&cost)
            && rest.as_bytes()[2] == b'$'
            && bcrypt64(&rest[3..]);
        return if ok {
            Ok(HashKind::Bcrypt)
        } else {
            Err(format!(
                "a bcrypt hash is $2y$ (or $2b$, $2a$), a cost 04-{MAX_BCRYPT_COST}, $, and 53 characters"
            ))
        };
    }
    if hash.starts_with("$argon2id$") || hash.starts_with("$argon2i$") {
        // $argon2id$v=19$m=…,t=…,p=…$salt$hash, with bounded costs: memory is allocated
        // per check, and m=4294967295 would abort the process that checks it.
        let parts: Vec<&str> = hash.split('$').collect();
        let params = |p: &str| -> Option<(u32, u32, u32)> {
            let mut m = None;
            let mut t = None;
            let mut par = None;
            for kv in p.split(',') {
                let (k, v) = kv.split_once('=')?;
                let v: u32 = v.parse().ok()?;
                match k {
                    "m" => m = Some(v),
                    "t" => t = Some(v),
                    "p" => par = Some(v),
                    _ => return None,
                }
            }
            Some((m?, t?, par?))
        };
        let bounded = parts
            .get(3)
            .and_then(|p| params(p))
            .is_some_and(|(m, t, p)| {
                (8..=MAX_ARGON2_KIB).contains(&m) && (1..=10).contains(&t) && (1..=8).contains(&p)
            });
        let ok = parts.len() == 6
            && parts[2].starts_with("v=")
            && bounded
            && b64(parts[4])
            && b64(parts[5]);
        return if ok {
            Ok(HashKind::Argon2)
        } else {
            Err(format!(
                "an Argon2 hash is $argon2id$v=19$m=…,t=…,p=…$salt$hash, with m (KiB) at most {MAX_ARGON2_KIB}, t 1-10 and p 1-8"
            ))
        };
    }
    Err(format!(
        "not a password hash this accepts (a plaintext password or a weak scheme such as {{SHA}} or $apr1$ is refused); use {SCHEMES}"
    ))
}

/// The highest bcrypt cost taken (cost 14 is about a second a check here).
pub const MAX_BCRYPT_COST: u32 = 14;
/// The most memory an Argon2 hash may ask per check, in KiB (64 MiB).
pub const MAX_ARGON2_KIB: u32 = 65_536;

/// The `htpasswd` text of a Secret, from `stringData` (as written) or `data` (as stored).
pub fn htpasswd_text(secret: &k8s_openapi::api::core::v1::Secret) -> Option<String> {
    secret_text(secret, HTPASSWD_KEY)
}

/// The `clientSecret` of a Secret, as [`htpasswd_text`].
pub fn oidc_client_secret(secret: &k8s_openapi::api::core::v1::Secret) -> Option<String> {
    secret_text(secret, OIDC_CLIENT_KEY)
}

/// The `jwks` text of a Secret, as [`htpasswd_text`].
pub fn jwks_text(secret: &k8s_openapi::api::core::v1::Secret) -> Option<String> {
    secret_text(secret, JWKS_KEY)
}

fn secret_text(secret: &k8s_openapi::api::core::v1::Secret, key: &str) -> Option<String> {
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key).cloned())
        .or_else(|| {
            secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        })
}

/// The most keys, and bytes, a JWKS may hold.
pub const MAX_JWKS_KEYS: usize = 32;
pub const MAX_JWKS_BYTES: usize = 64 << 10;

/// The shape of a JWKS: `{"keys": [...]}` of RSA (`n`, `e`), EC P-256 (`x`, `y`) or OKP
/// Ed25519 (`x`) public keys, the count of keys. The data planes decode the values.
///
/// # Errors
/// A sentence naming the first bad key and why.
pub fn jwks(text: &str) -> Result<usize, String> {
    if text.len() > MAX_JWKS_BYTES {
        return Err(format!("a JWKS is at most {MAX_JWKS_BYTES} bytes"));
    }
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let keys = v
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("a JWKS is {\"keys\": [...]}")?;
    if keys.is_empty() || keys.len() > MAX_JWKS_KEYS {
        return Err(format!("a JWKS holds 1 to {MAX_JWKS_KEYS} keys"));
    }
    for (i, k) in keys.iter().enumerate() {
        let field = |f: &str| k.get(f).and_then(|v| v.as_str());
        let has = |fs: &[&str]| fs.iter().all(|f| field(f).is_some_and(|v| !v.is_empty()));
        let ok = match field("kty") {
            Some("RSA") => has(&["n", "e"]),
            Some("EC") => field("crv") == Some("P-256") && has(&["x", "y"]),
            Some("OKP") => field("crv") == Some("Ed25519") && has(&["x"]),
            _ => false,
        };
        if !ok {
            return Err(format!(
                "keys[{i}]: a public key of kty RSA (n, e), EC with crv P-256 (x, y) or OKP with crv Ed25519 (x)"
            ));
        }
        if k.get("d").is_some() {
            return Err(format!(
                "keys[{i}] holds a private key (d): publish only the public part"
            ));
        }
    }
    Ok(keys.len())
}

/// The users of an htpasswd text: `user:hash` per line; blank lines and `#` comments are
/// skipped.
///
/// # Errors
/// Each bad line, as `line N: why` (the hash itself is never repeated).
pub fn htpasswd(text: &str) -> Result<Vec<(&str, &str, HashKind)>, Vec<String>> {
    let mut users = Vec::new();
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let n = i + 1;
        let Some((user, hash)) = line.split_once(':') else {
            errors.push(format!("line {n}: expected user:hash"));
            continue;
        };
        if user.is_empty() || user.len() > 256 || user.chars().any(char::is_control) {
            errors.push(format!(
                "line {n}: the user name must be 1 to 256 printable characters"
            ));
            continue;
        }
        if !seen.insert(user) {
            errors.push(format!("line {n}: user {user:?} appears twice"));
            continue;
        }
        match password_hash(hash) {
            Ok(kind) => users.push((user, hash, kind)),
            Err(why) => errors.push(format!("line {n} (user {user:?}): {why}")),
        }
    }
    if users.is_empty() && errors.is_empty() {
        errors.push("no users: add user:hash lines".into());
    }
    if errors.is_empty() {
        Ok(users)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_addresses_parse_and_bad_ones_say_why() {
        assert_eq!(cidr("10.0.0.0/8").unwrap().1, 8);
        assert_eq!(cidr("127.0.0.1").unwrap().1, 32);
        assert_eq!(cidr("2001:db8::/32").unwrap().1, 32);
        assert_eq!(cidr("::1").unwrap().1, 128);
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "x",
        ] {
            assert!(cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_bcrypt_and_argon2_hashes_are_taken() {
        let bcrypt = "$2y$05$abcdefghijklmnopqrstuuLBHxAyqSvrL8Q0zCD0Q26c1Y9VTn3NG";
        let argon = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo";
        assert_eq!(password_hash(bcrypt), Ok(HashKind::Bcrypt));
        assert_eq!(password_hash(argon), Ok(HashKind::Argon2));
        for bad in [
            "hunter2",
            "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
            "$apr1$x$y",
            "$2y$99$x",
            "",
        ] {
            let e = password_hash(bad).unwrap_err();
            assert!(!e.contains("hunter2"), "never echoes the secret: {e}");
        }
        let text =
            format!("# team\nann:{bcrypt}\n\nbob:{argon}\r\nbob:{argon}\neve:plain\nnocolon\n");
        let errors = htpasswd(&text).unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors[0].starts_with("line 5: user \"bob\" appears twice"),
            "{errors:?}"
        );
        assert!(errors[1].starts_with("line 6 (user \"eve\")"), "{errors:?}");
        assert!(errors[2].starts_with("line 7:"), "{errors:?}");
        let two = format!("ann:{bcrypt}\nbob:{argon}\n");
        assert_eq!(htpasswd(&two).unwrap().len(), 2);
        assert!(htpasswd("# nobody\n").is_err());
    }

    #[test]
    fn rates_read_as_the_one_liner_writes_them() {
        assert_eq!(
            parse_rate("100/m"),
            Ok(Rate {
                requests: 100,
                per: Period::Minute
            })
        );
        assert_eq!(parse_rate("5/second").unwrap().per, Period::Second);
        assert_eq!(parse_rate("1/h").unwrap().per, Period::Hour);
        for bad in ["100", "x/m", "0/s", "10/day", "/m"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn methods_are_upper_case_tokens() {
        assert!(method("GET").is_ok());
        assert!(method("get").is_err());
        assert!(method("GE T").is_err());
        assert!(method("").is_err());
    }
}
