//! AccessPolicies as both data planes apply them: compiled once per route table from the
//! objects, checked by the built-in edge per request ([`Policy::check`]) and rendered as
//! Envoy filters by the xDS server from the same fields.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Secret;
use portway_api::AccessPolicy;
use portway_api::access::HashKind;
use portway_api::validation::Validate;
use sha2::{Digest, Sha256};

/// One AccessPolicy, ready to apply.
#[derive(Debug)]
pub struct Policy {
    /// `namespace/name`, for logs and Envoy stat prefixes.
    pub name: String,
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    /// Empty: any method.
    pub methods: Vec<Method>,
    pub max_request_bytes: Option<u64>,
    pub basic: Option<Basic>,
    pub jwt: Option<Jwt>,
    pub oidc: Option<crate::oidc::Oidc>,
    pub rate: Option<Arc<Limits>>,
}

/// What a request that passed the policy's rate limits and sign-in carries on: headers
/// to remove (the credentials, client copies of claim headers) and to set (claims).
#[derive(Debug, Default)]
pub struct Grant {
    pub remove: Vec<header::HeaderName>,
    pub set: Vec<(header::HeaderName, HeaderValue)>,
}

impl Grant {
    /// Applies the grant to a request's headers.
    pub fn apply(self, headers: &mut HeaderMap) {
        for name in self.remove {
            headers.remove(name);
        }
        for (name, value) in self.set {
            headers.insert(name, value);
        }
    }
}

/// The request as sign-in sees it, and what signs the caller's identity for the app: the
/// data plane's key (none until the operator has made it).
#[derive(Clone, Copy, Debug)]
pub struct Identity<'a> {
    pub signer: Option<&'a crate::jwt::Signer>,
    /// The public hostname as sent (the identity's `aud`, without the port).
    pub host: &'a str,
    pub method: &'a Method,
    /// Path and query.
    pub path: &'a str,
    /// `http` or `https`.
    pub scheme: &'a str,
}

/// The answer while the data plane's key is not loaded.
fn no_key() -> Denied {
    Denied {
        rule: rules::IDENTITY,
        reason: "no-key",
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!(
            "the identity signing key (Secret {}/{}) is not loaded yet; is the operator running?",
            portway_api::certificates::SYSTEM_NAMESPACE,
            portway_api::access::IDENTITY_SECRET
        ),
        headers: vec![(header::RETRY_AFTER, HeaderValue::from(5))],
    }
}

impl Identity<'_> {
    /// The signed identity header for `claims` (`sub`, `auth`, ...).
    ///
    /// # Errors
    /// 503 while there is no key: a signed-in request never goes on without it, since
    /// the app may rely on it.
    fn sign(self, mut claims: serde_json::Value) -> Result<HeaderValue, Denied> {
        let Some(signer) = self.signer else {
            return Err(no_key());
        };
        claims["iss"] = portway_api::access::IDENTITY_ISSUER.into();
        claims["aud"] = crate::model::normalize_host(self.host).into();
        let token = signer.sign_identity(claims, portway_api::access::IDENTITY_TTL_SECS);
        HeaderValue::from_str(&token).map_err(|_| Denied {
            rule: rules::IDENTITY,
            reason: "unsignable",
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "the identity could not be written as a header".into(),
            headers: Vec::new(),
        })
    }
}

/// A token's claims.
type Claims = serde_json::Map<String, serde_json::Value>;

/// Bearer JWTs: the issuer's keys (from a Secret, or fetched), the claims required, and
/// the claims sent on as headers.
#[derive(Debug)]
pub struct Jwt {
    issuer: String,
    audiences: Vec<String>,
    keys: JwtKeys,
    required: Vec<(String, Vec<String>)>,
    to_headers: Vec<(String, header::HeaderName)>,
    challenge: HeaderValue,
    /// Tokens verified lately, by SHA-256, with their claims and until when they are
    /// taken without a new check. Per compiled policy: a change of keys starts afresh.
    verified: parking_lot::Mutex<HashMap<[u8; 32], (Claims, u64)>>,
}

#[derive(Debug)]
enum JwtKeys {
    Static(Arc<crate::jwt::Keys>),
    Remote(Arc<crate::jwt::RemoteKeys>),
    /// At the `jwks_uri` of the issuer's OpenID configuration.
    Discovered(Arc<crate::oidc::Provider>),
}

impl JwtKeys {
    /// The keys to check a token naming `kid` against.
    async fn get(&self, kid: Option<&str>) -> Result<Arc<crate::jwt::Keys>, String> {
        match self {
            Self::Static(k) => Ok(k.clone()),
            Self::Remote(r) => r.keys(kid).await,
            Self::Discovered(p) => p.jwks().await?.keys(kid).await,
        }
    }
}

impl Jwt {
    fn compile(
        j: &portway_api::JwtAuth,
        secret: Option<&Secret>,
        ns: &str,
    ) -> Result<Self, String> {
        let keys = match (&j.jwks.secret_ref, &j.jwks.uri) {
            (Some(r), _) => {
                let name = &r.name;
                let secret = secret
                    .filter(|s| s.type_.as_deref() == Some(portway_api::access::JWKS_TYPE))
                    .ok_or_else(|| {
                        format!(
                            "jwt: no Secret {ns}/{name} of type {}",
                            portway_api::access::JWKS_TYPE
                        )
                    })?;
                let text = portway_api::access::jwks_text(secret).ok_or_else(|| {
                    format!(
                        "jwt: Secret {ns}/{name} has no key {}",
                        portway_api::access::JWKS_KEY
                    )
                })?;
                JwtKeys::Static(Arc::new(
                    crate::jwt::Keys::parse(&text)
                        .map_err(|e| format!("jwt: Secret {ns}/{name}: {e}"))?,
                ))
            }
            (None, Some(uri)) => JwtKeys::Remote(crate::jwt::RemoteKeys::get(uri)),
            (None, None) => JwtKeys::Discovered(crate::oidc::Provider::get(&j.issuer)),
        };
        let to_headers = j
            .claim_to_headers
            .iter()
            .map(|c| {
                header::HeaderName::from_bytes(c.header.to_ascii_lowercase().as_bytes())
                    .map(|h| (c.claim.clone(), h))
                    .map_err(|_| format!("jwt.claimToHeaders: {:?} is not a header name", c.header))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            issuer: j.issuer.clone(),
            audiences: j.audiences.clone(),
            keys,
            required: j
                .required_claims
                .iter()
                .map(|c| (c.name.clone(), c.values.clone()))
                .collect(),
            to_headers,
            challenge: HeaderValue::from_static("Bearer realm=\"portway\""),
            verified: parking_lot::Mutex::default(),
        })
    }

    /// Checks the request's `Authorization: Bearer` token; its claims on success.
    ///
    /// # Errors
    /// [`Denied`]: 401 with a `WWW-Authenticate: Bearer` challenge (RFC 6750) for a missing
    /// or invalid token, 403 for a valid one without the required claims, 503 when the
    /// issuer's keys cannot be fetched.
    pub async fn check(
        &self,
        headers: &HeaderMap,
    ) -> Result<serde_json::Map<String, serde_json::Value>, Denied> {
        let unauthorized = |reason: &'static str, message: String, error: Option<&str>| {
            let challenge = match error {
                None => self.challenge.clone(),
                Some(e) => {
                    HeaderValue::from_str(&format!("Bearer realm=\"portway\", error=\"{e}\""))
                        .unwrap_or_else(|_| self.challenge.clone())
                }
            };
            Denied {
                rule: rules::JWT,
                reason,
                status: if error == Some("insufficient_scope") {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::UNAUTHORIZED
                },
                message,
                headers: vec![(header::WWW_AUTHENTICATE, challenge)],
            }
        };
        let Some(token) = bearer(headers) else {
            return Err(unauthorized(
                "missing",
                "this URL asks for a bearer token (Authorization: Bearer …)".into(),
                None,
            ));
        };
        let bad = |e: crate::jwt::Invalid| unauthorized(e.reason, e.message, Some("invalid_token"));
        let claims = self.verified(token).await.map_err(|e| match e {
            Ok(invalid) => bad(invalid),
            Err(unavailable) => unavailable,
        })?;
        for (name, values) in &self.required {
            if !claims
                .get(name)
                .is_some_and(|v| crate::jwt::claim_matches(v, values))
            {
                return Err(unauthorized(
                    "missing-claim",
                    format!("the token's {name} claim is not one allowed here"),
                    Some("insufficient_scope"),
                ));
            }
        }
        Ok(claims)
    }

    /// The claims of a token whose signature, issuer, audience and times check: from the
    /// tokens verified lately (a signature check per request cost more than half the
    /// edge's req/s), else checked now.
    ///
    /// # Errors
    /// `Ok(why)` for an invalid token, `Err(answer)` when the keys cannot be had.
    async fn verified(
        &self,
        token: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, Result<crate::jwt::Invalid, Denied>>
    {
        let now = crate::jwt::now();
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((claims, until)) = self.verified.lock().get(&key)
            && now < *until
        {
            return Ok(claims.clone());
        }
        let token = crate::jwt::Token::parse(token).map_err(Ok)?;
        let keys = self.keys.get(token.kid.as_deref()).await.map_err(|_| {
            Err(Denied {
                rule: rules::JWT,
                reason: "keys-unavailable",
                status: StatusCode::SERVICE_UNAVAILABLE,
                // Why (a URL, a connection error) is logged, not told to the caller.
                message: "the token issuer's keys cannot be had now; try again shortly".into(),
                headers: vec![(header::RETRY_AFTER, HeaderValue::from(5))],
            })
        })?;
        token.verify(&keys).map_err(Ok)?;
        token
            .check_claims(&self.issuer, &self.audiences, now)
            .map_err(Ok)?;
        // Kept a minute at most, and never past the token's expiry.
        let exp = token
            .claims
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(now);
        let until = exp.min(now + 60);
        let mut cache = self.verified.lock();
        if cache.len() >= VERIFIED_CAP {
            cache.clear();
        }
        cache.insert(key, (token.claims.clone(), until));
        Ok(token.claims)
    }

    /// The headers a request with `claims` carries on: each claim header set from the
    /// token, or removed when the token has no such claim (a client's own copy never
    /// passes).
    fn grant(&self, claims: &serde_json::Map<String, serde_json::Value>, grant: &mut Grant) {
        for (claim, name) in &self.to_headers {
            match claims
                .get(claim)
                .and_then(|v| HeaderValue::from_str(&crate::jwt::claim_text(v)).ok())
            {
                Some(v) => grant.set.push((name.clone(), v)),
                None => grant.remove.push(name.clone()),
            }
        }
    }
}

/// The token of an `Authorization: Bearer` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// A policy's token buckets. They outlive the compiled policy: the route table is rebuilt
/// on every change anywhere, and a bucket that started full again at each rebuild would
/// limit nothing. Kept per policy (and its rates) in [`LIMITS`].
#[derive(Debug)]
pub struct Limits {
    rates: portway_api::RateLimit,
    per_client: Option<Bucket<HashMap<IpAddr, Level>>>,
    per_tunnel: Option<Bucket<Level>>,
}

/// Tokens left and when they were counted.
#[derive(Clone, Copy, Debug)]
struct Level {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
struct Bucket<S> {
    /// Tokens per second, and the most a bucket holds.
    rate: f64,
    burst: f64,
    state: parking_lot::Mutex<S>,
}

/// Clients tracked per policy; past it, clients whose buckets are full again are
/// forgotten (they would start full anyway), then, if that is not enough, all.
const CLIENTS_CAP: usize = 65_536;

/// Every policy's buckets, by policy `namespace/name/uid`: what a new compile of the same
/// policy with the same rates takes up again.
static LIMITS: LazyLock<parking_lot::Mutex<HashMap<String, std::sync::Weak<Limits>>>> =
    LazyLock::new(parking_lot::Mutex::default);

impl Level {
    /// Takes one token from a bucket refilled since `at`; the wait for one when empty.
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }

    fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            at: now,
        }
    }
}

impl<S> Bucket<S> {
    fn new(rate: &portway_api::Rate, state: S) -> Self {
        let burst = f64::from(rate.requests);
        Self {
            rate: burst / rate.per.seconds() as f64,
            burst,
            state: parking_lot::Mutex::new(state),
        }
    }
}

impl Limits {
    /// The buckets of `key` for `rates`: the ones in use if the rates are the same.
    fn get(key: &str, rates: &portway_api::RateLimit) -> Arc<Self> {
        let mut all = LIMITS.lock();
        if let Some(l) = all.get(key).and_then(std::sync::Weak::upgrade)
            && l.rates == *rates
        {
            return l;
        }
        all.retain(|_, w| w.strong_count() > 0);
        let now = Instant::now();
        let l = Arc::new(Self {
            rates: rates.clone(),
            per_client: rates.per_client.map(|r| Bucket::new(&r, HashMap::new())),
            per_tunnel: rates
                .per_tunnel
                .map(|r| Bucket::new(&r, Level::full(f64::from(r.requests), now))),
        });
        all.insert(key.to_owned(), Arc::downgrade(&l));
        l
    }

    /// Takes a token for `client`, then one from the tunnel's bucket.
    ///
    /// # Errors
    /// [`Denied`] with 429 and `Retry-After` (whole seconds, at least 1).
    pub fn check(&self, client: IpAddr) -> Result<(), Denied> {
        let now = Instant::now();
        let denied = |reason: &'static str, wait: Duration| {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            Denied {
                rule: rules::RATE,
                reason,
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!("too many requests; try again in {} s", secs.max(1)),
                headers: vec![(header::RETRY_AFTER, HeaderValue::from(secs.max(1)))],
            }
        };
        if let Some(b) = &self.per_client {
            let client = client.to_canonical();
            let mut clients = b.state.lock();
            if clients.len() >= CLIENTS_CAP && !clients.contains_key(&client) {
                let (rate, burst) = (b.rate, b.burst);
                clients.retain(|_, l| {
                    l.tokens + now.duration_since(l.at).as_secs_f64() * rate < burst
                });
                if clients.len() >= CLIENTS_CAP {
                    clients.clear();
                }
            }
            clients
                .entry(client)
                .or_insert_with(|| Level::full(b.burst, now))
                .take(b.rate, b.burst, now)
                .map_err(|wait| denied("per-client", wait))?;
        }
        if let Some(b) = &self.per_tunnel {
            b.state
                .lock()
                .take(b.rate, b.burst, now)
                .map_err(|wait| denied("per-tunnel", wait))?;
        }
        Ok(())
    }
}

/// Basic authentication: the users and hashes from the policy's Secret.
pub struct Basic {
    challenge: HeaderValue,
    users: HashMap<String, (String, HashKind)>,
    /// The first user's hash: an unknown user's password is checked against it, so a
    /// wrong user costs what a wrong password does and answer times do not tell which
    /// users exist.
    decoy: (String, HashKind),
}

impl std::fmt::Debug for Basic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Basic")
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

/// Credentials remembered as verified, process-wide, so a slow hash is checked once and
/// not per request, nor again after every route table rebuild: each entry is a SHA-256 of
/// user, password and the stored hash, so a changed password (a new stored hash) misses,
/// and a removed user is refused before this is asked. Past the cap it starts again.
static VERIFIED: LazyLock<parking_lot::Mutex<HashSet<[u8; 32]>>> =
    LazyLock::new(parking_lot::Mutex::default);
const VERIFIED_CAP: usize = 16384;

/// Slow hash checks at once, process-wide: each costs tens of milliseconds of a core, so
/// a flood of wrong passwords queues here instead of taking every core from the traffic.
static CHECKS: LazyLock<tokio::sync::Semaphore> = LazyLock::new(|| {
    tokio::sync::Semaphore::new(
        std::thread::available_parallelism()
            .map(std::num::NonZero::get)
            .unwrap_or(2)
            .max(2)
            / 2,
    )
});

/// Sign-ins waiting for a hash check, process-wide; past [`MAX_WAITING`] more are
/// refused at once (429) rather than queued without end behind a flood of guesses.
static WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const MAX_WAITING: usize = 64;

/// Counts a waiting sign-in while it lives.
struct Waiting;

impl Waiting {
    fn enter() -> Option<Self> {
        use std::sync::atomic::Ordering::SeqCst;
        if WAITING.fetch_add(1, SeqCst) >= MAX_WAITING {
            WAITING.fetch_sub(1, SeqCst);
            return None;
        }
        Some(Self)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        WAITING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Basic {
    fn compile(
        b: &portway_api::BasicAuth,
        secret: Option<&Secret>,
        ns: &str,
    ) -> Result<Self, String> {
        let name = &b.secret_ref.name;
        let secret = secret
            .filter(|s| s.type_.as_deref() == Some(portway_api::access::HTPASSWD_TYPE))
            .ok_or_else(|| {
                format!(
                    "basicAuth: no Secret {ns}/{name} of type {}",
                    portway_api::access::HTPASSWD_TYPE
                )
            })?;
        let text = portway_api::access::htpasswd_text(secret).ok_or_else(|| {
            format!(
                "basicAuth: Secret {ns}/{name} has no key {}",
                portway_api::access::HTPASSWD_KEY
            )
        })?;
        let lines = portway_api::access::htpasswd(&text)
            .map_err(|e| format!("basicAuth: Secret {ns}/{name}: {}", e.join("; ")))?;
        let decoy = lines
            .first()
            .map(|(_, h, k)| ((*h).to_owned(), *k))
            .ok_or_else(|| format!("basicAuth: Secret {ns}/{name} holds no users"))?;
        let users = lines
            .into_iter()
            .map(|(u, h, k)| (u.to_owned(), (h.to_owned(), k)))
            .collect();
        let realm = b.realm.clone().unwrap_or_else(|| "portway".into());
        let challenge =
            HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\""))
                .map_err(|_| "basicAuth.realm: not a header value".to_owned())?;
        Ok(Self {
            challenge,
            users,
            decoy,
        })
    }

    /// Checks the request's `Authorization: Basic` credentials; the user on success.
    ///
    /// # Errors
    /// [`Denied`] with 401 and a `WWW-Authenticate` challenge.
    pub async fn check(&self, headers: &HeaderMap) -> Result<String, Denied> {
        let denied = |reason: &'static str, message: &str| Denied {
            rule: rules::BASIC_AUTH,
            reason,
            status: StatusCode::UNAUTHORIZED,
            message: message.to_owned(),
            headers: vec![(header::WWW_AUTHENTICATE, self.challenge.clone())],
        };
        let Some((user, password)) = basic_credentials(headers) else {
            return Err(denied(
                "missing",
                "sign in: this URL asks for a user name and password",
            ));
        };
        let (hash, kind) = match self.users.get(&user) {
            Some((h, k)) => (h.clone(), *k),
            None => self.decoy.clone(),
        };
        let key: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(password.as_bytes())
            .chain_update([0])
            .chain_update(hash.as_bytes())
            .finalize()
            .into();
        let known = self.users.contains_key(&user);
        if known && VERIFIED.lock().contains(&key) {
            return Ok(user);
        }
        let ok = {
            let Some(_waiting) = Waiting::enter() else {
                return Err(Denied {
                    rule: rules::BASIC_AUTH,
                    reason: "busy",
                    status: StatusCode::TOO_MANY_REQUESTS,
                    message: "too many sign-ins at once; try again in a second".into(),
                    headers: vec![(header::RETRY_AFTER, HeaderValue::from(1))],
                });
            };
            let _permit = CHECKS.acquire().await;
            // Many connections often bring the same new credential at once: the first
            // to get here checks it, the others find it verified instead of hashing again
            // (64 at bcrypt cost 12 took 16 s before this).
            if known && VERIFIED.lock().contains(&key) {
                return Ok(user);
            }
            tokio::task::spawn_blocking(move || verify(&password, &hash, kind))
                .await
                .unwrap_or(false)
        };
        if !(ok && known) {
            return Err(denied(
                "bad-credentials",
                "the user name or password is wrong",
            ));
        }
        let mut verified = VERIFIED.lock();
        if verified.len() >= VERIFIED_CAP {
            verified.clear();
        }
        verified.insert(key);
        Ok(user)
    }
}

/// The user and password of an `Authorization: Basic` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine as _;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn verify(password: &str, hash: &str, kind: HashKind) -> bool {
    match kind {
        HashKind::Bcrypt => bcrypt::verify(password, hash).unwrap_or(false),
        HashKind::Argon2 => {
            use argon2::PasswordVerifier as _;
            argon2::PasswordHash::new(hash).is_ok_and(|h| {
                argon2::Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
        }
    }
}

/// Why a request was refused: the rule and reason (the labels of the denial counter and
/// the access log's `denied=`), the status, and what the client is told.
#[derive(Debug, PartialEq, Eq)]
pub struct Denied {
    pub rule: &'static str,
    pub reason: &'static str,
    pub status: StatusCode,
    pub message: String,
    /// Headers the answer carries: `Allow` for a 405, `WWW-Authenticate` for a 401.
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

pub mod rules {
    pub const IP: &str = "ip";
    pub const METHOD: &str = "method";
    pub const SIZE: &str = "size";
    pub const BASIC_AUTH: &str = "basic-auth";
    pub const RATE: &str = "rate";
    pub const JWT: &str = "jwt";
    pub const IDENTITY: &str = "identity";
    pub const OIDC: &str = "oidc";
}

impl Policy {
    /// Compiles a stored policy.
    ///
    /// # Errors
    /// When it does not validate (stored before a rule existed, or written around the API
    /// server): a sentence naming the fields. Its routes then answer 500 rather than serve
    /// unguarded.
    pub fn compile<'a>(
        p: &AccessPolicy,
        secret: impl Fn(&str, &str) -> Option<&'a Secret>,
    ) -> Result<Self, String> {
        let errors = p.validate();
        if !errors.is_empty() {
            let e: Vec<String> = errors.iter().map(ToString::to_string).collect();
            return Err(e.join("; "));
        }
        let nets = |list: &[String]| -> Vec<IpNet> {
            list.iter()
                .filter_map(|c| portway_api::access::cidr(c).ok())
                // An IPv4-mapped range means its IPv4 one: clients are compared in
                // their canonical form.
                .map(|(ip, len)| match (ip, ip.to_canonical()) {
                    (IpAddr::V6(_), v4 @ IpAddr::V4(_)) if len >= 96 => (v4, len - 96),
                    other => (other.0, len),
                })
                .filter_map(|(ip, len)| IpNet::new(ip, len).ok())
                .map(|n| n.trunc())
                .collect()
        };
        let ip = p.spec.ip.clone().unwrap_or_default();
        let ns = p.metadata.namespace.as_deref().unwrap_or_default();
        // A device's policy (labelled with its connector) reads only that device's
        // Secrets, as the API server admits it; checked again here for one stored around it.
        let label = |o: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            o.labels
                .as_ref()
                .and_then(|l| l.get(portway_api::access::CONNECTOR_LABEL))
                .cloned()
        };
        let device = label(&p.metadata);
        let secret = |ns: &str, name: &str| {
            secret(ns, name).filter(|s| device.is_none() || label(&s.metadata) == device)
        };
        let basic = p
            .spec
            .basic_auth
            .as_ref()
            .map(|b| Basic::compile(b, secret(ns, &b.secret_ref.name), ns))
            .transpose()?;
        let jwt = p
            .spec
            .jwt
            .as_ref()
            .map(|j| {
                let secret = j.jwks.secret_ref.as_ref().and_then(|r| secret(ns, &r.name));
                Jwt::compile(j, secret, ns)
            })
            .transpose()?;
        let name = format!("{ns}/{}", p.metadata.name.as_deref().unwrap_or_default());
        let oidc = p
            .spec
            .oidc
            .as_ref()
            .map(|o| {
                let uid = p.metadata.uid.as_deref().unwrap_or_default();
                crate::oidc::Oidc::compile(
                    o,
                    secret(ns, &o.client_secret_ref.name),
                    ns,
                    &format!("{name}/{uid}"),
                )
            })
            .transpose()?;
        let rate = p.spec.rate_limit.as_ref().map(|r| {
            let uid = p.metadata.uid.as_deref().unwrap_or_default();
            Limits::get(&format!("{name}/{uid}"), r)
        });
        Ok(Self {
            name,
            basic,
            jwt,
            oidc,
            rate,
            allow: nets(&ip.allow),
            deny: nets(&ip.deny),
            methods: p
                .spec
                .methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect(),
            max_request_bytes: p.spec.max_request_bytes,
        })
    }

    /// The address rule alone (checked before CORS answers a preflight).
    ///
    /// # Errors
    /// [`Denied`] with 403 when `client` is denied or not allowed, or cannot be told
    /// (`None`) while there are address rules.
    pub fn check_ip(&self, client: Option<IpAddr>) -> Result<(), Denied> {
        if self.allow.is_empty() && self.deny.is_empty() {
            return Ok(());
        }
        let Some(client) = client.map(|c| c.to_canonical()) else {
            return Err(Denied {
                rule: rules::IP,
                reason: "unknown-client",
                status: StatusCode::FORBIDDEN,
                message: "the client's address cannot be told: X-Forwarded-For from the trusted proxy does not parse".into(),
                headers: Vec::new(),
            });
        };
        let denied = |reason, why: &str| Denied {
            rule: rules::IP,
            reason,
            status: StatusCode::FORBIDDEN,
            message: format!("{client} {why}"),
            headers: Vec::new(),
        };
        if self.deny.iter().any(|n| n.contains(&client)) {
            return Err(denied("denied", "is denied by the access policy"));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(&client)) {
            return Err(denied("not-allowed", "is not allowed by the access policy"));
        }
        Ok(())
    }

    /// The rules after the address and CORS, up to who is calling: rate limits (before
    /// anything costly, such as a password hash, is done for the caller), then basic auth
    /// or a bearer JWT. `client` is the address the rate per client counts.
    ///
    /// # Errors
    /// The first rule that fails.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        client: IpAddr,
        identity: Identity<'_>,
    ) -> Result<Grant, Denied> {
        if let Some(limits) = &self.rate {
            limits.check(client)?;
        }
        let mut grant = Grant::default();
        // The credentials are the edge's business: the app never sees a password or a
        // token, only the identity the edge vouches for.
        let mut who = None;
        if let Some(basic) = &self.basic {
            let user = basic.check(headers).await?;
            grant.remove.push(header::AUTHORIZATION);
            who = Some(serde_json::json!({"sub": user, "auth": "basic"}));
        }
        if let Some(jwt) = &self.jwt {
            let claims = jwt.check(headers).await?;
            grant.remove.push(header::AUTHORIZATION);
            jwt.grant(&claims, &mut grant);
            let mut id = serde_json::json!({"auth": "jwt", "upstream_iss": jwt.issuer});
            for k in ["sub", "email", "name", "groups"] {
                if let Some(v) = claims.get(k) {
                    id[k] = v.clone();
                }
            }
            who = Some(id);
        }
        if let Some(oidc) = &self.oidc {
            let signer = identity.signer.ok_or_else(no_key)?;
            let req = crate::oidc::Request {
                method: identity.method,
                path: identity.path,
                scheme: identity.scheme,
                host: identity.host,
                headers,
            };
            let session = oidc.check(req, signer).await?;
            match session.cookie {
                Some(c) => grant.set.push((header::COOKIE, c)),
                None => grant.remove.push(header::COOKIE),
            }
            let mut id = session.claims;
            id.insert("auth".into(), "oidc".into());
            id.insert("upstream_iss".into(), oidc.issuer().into());
            who = Some(serde_json::Value::Object(id));
        }
        let name = header::HeaderName::from_static(portway_api::access::IDENTITY_HEADER);
        match who {
            Some(claims) => grant.set.push((name, identity.sign(claims)?)),
            None => grant.remove.push(name),
        }
        // `x_user_email` is `X-User-Email` to CGI-style apps (Rack, WSGI, PHP): a client's
        // spelling of a header Portway sets, with underscores, is removed too.
        let smuggled: Vec<header::HeaderName> = headers
            .keys()
            .filter(|n| n.as_str().contains('_'))
            .filter(|n| {
                let dashed = n.as_str().replace('_', "-");
                grant
                    .set
                    .iter()
                    .map(|(s, _)| s)
                    .chain(&grant.remove)
                    .any(|ours| ours.as_str() == dashed)
            })
            .cloned()
            .collect();
        grant.remove.extend(smuggled);
        Ok(grant)
    }

    /// Whether [`Policy::authenticate`] has anything to do.
    pub fn authenticates(&self) -> bool {
        self.rate.is_some() || self.basic.is_some() || self.jwt.is_some() || self.oidc.is_some()
    }

    /// The rules on the request head after the address: method, then declared size.
    ///
    /// # Errors
    /// [`Denied`] with 405 (and `Allow`) or 413.
    pub fn check_head(&self, method: &Method, headers: &HeaderMap) -> Result<(), Denied> {
        if !self.methods.is_empty() && !self.methods.contains(method) {
            let allow = self
                .methods
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Denied {
                rule: rules::METHOD,
                reason: "not-allowed",
                status: StatusCode::METHOD_NOT_ALLOWED,
                message: format!("{method} is not allowed here; allowed: {allow}"),
                headers: HeaderValue::from_str(&allow)
                    .ok()
                    .map(|v| (header::ALLOW, v))
                    .into_iter()
                    .collect(),
            });
        }
        if let Some(max) = self.max_request_bytes {
            let declared = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > max) {
                return Err(too_large(max));
            }
        }
        Ok(())
    }
}

/// The answer to a body over `max` bytes.
pub fn too_large(max: u64) -> Denied {
    Denied {
        rule: rules::SIZE,
        reason: "too-large",
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("the request body is larger than {max} bytes"),
        headers: Vec::new(),
    }
}

/// The client's address for address rules: the peer (or the client the PROXY protocol
/// named), or — when the peer is a trusted proxy — the nearest address in its
/// `X-Forwarded-For` that is not itself a trusted proxy, read from the right (the left is
/// the client's to write). `None` when an entry on the way does not parse: the client
/// cannot be told, and address rules then refuse (a client's `X-Forwarded-For: x` must
/// not make it the balancer).
pub fn client_ip(headers: &HeaderMap, peer: IpAddr, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = peer.to_canonical();
    let trusts = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !trusts(&peer) {
        return Some(peer);
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or("?"))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut nearest = peer;
    for entry in entries.iter().rev() {
        let ip = entry
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()?
            .to_canonical();
        if !trusts(&ip) {
            return Some(ip);
        }
        nearest = ip;
    }
    // Every hop is a trusted proxy (or none is named): the farthest is the client.
    Some(nearest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(spec: serde_json::Value) -> Result<Policy, String> {
        let mut spec = spec;
        spec["targetRefs"] =
            json!([{"group": "networking.datumapis.com", "kind": "HTTPProxy", "name": "app"}]);
        let p: AccessPolicy = serde_json::from_value(json!({
            "apiVersion": "networking.datumapis.com/v1alpha", "kind": "AccessPolicy",
            "metadata": {"name": "guard", "namespace": "p"},
            "spec": spec,
        }))
        .unwrap();
        Policy::compile(&p, |_, _| None)
    }

    #[tokio::test]
    async fn jwt_claims_become_headers_and_the_app_gets_a_signed_identity() {
        use crate::jwt::{Keys, Signer, Token, now};
        let issuer = Signer::from_pkcs8(&Signer::generate().unwrap()).unwrap();
        let edge = Signer::from_pkcs8(&Signer::generate().unwrap()).unwrap();
        let secret = |type_: &str| -> Secret {
            serde_json::from_value(json!({
                "metadata": {"name": "keys", "namespace": "p"}, "type": type_,
                "stringData": {"jwks": issuer.jwks()}}))
            .unwrap()
        };
        let (keys, wrong) = (secret("portway.dev/jwks"), secret("portway.dev/htpasswd"));
        let p: AccessPolicy = serde_json::from_value(json!({
            "metadata": {"name": "guard", "namespace": "p"},
            "spec": {"targetRefs": [{"group": "networking.datumapis.com", "kind": "HTTPProxy", "name": "app"}],
                "jwt": {"issuer": "https://id", "jwks": {"secretRef": {"name": "keys"}},
                    "requiredClaims": [{"name": "groups", "values": ["dev"]}],
                    "claimToHeaders": [{"claim": "email", "header": "X-Email"}, {"claim": "team", "header": "x-team"}]}},
        }))
        .unwrap();
        let e = Policy::compile(&p, |_, _| Some(&wrong)).unwrap_err();
        assert!(e.contains("of type portway.dev/jwks"), "{e}");
        let policy = Policy::compile(&p, |_, n| (n == "keys").then_some(&keys)).unwrap();
        let mut h = HeaderMap::new();
        let claims = json!({"iss": "https://id", "exp": now() + 60, "sub": "ann",
            "email": "ann@example.com", "groups": ["dev"]});
        let bearer = format!("Bearer {}", issuer.sign(&claims));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&bearer).unwrap(),
        );
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        let identity = Identity {
            signer: Some(&edge),
            host: "App.Example.com:8443",
            method: &Method::GET,
            path: "/",
            scheme: "https",
        };
        let grant = policy.authenticate(&h, client, identity).await.unwrap();
        assert!(grant.remove.contains(&header::AUTHORIZATION));
        assert!(
            grant.remove.iter().any(|n| n == "x-team"),
            "a claim the token lacks is removed"
        );
        let set: HashMap<&str, &HeaderValue> =
            grant.set.iter().map(|(n, v)| (n.as_str(), v)).collect();
        assert_eq!(set["x-email"], "ann@example.com");
        let t = Token::parse(set["portway-identity"].to_str().unwrap()).unwrap();
        t.verify(&Keys::parse(edge.jwks()).unwrap()).unwrap();
        t.check_claims("portway", &["app.example.com".into()], now())
            .unwrap();
        assert_eq!(
            (t.claims["sub"].as_str(), t.claims["auth"].as_str()),
            (Some("ann"), Some("jwt"))
        );
        // Signed in but no key to vouch with: refused, never sent on without.
        let unsigned = Identity {
            signer: None,
            ..identity
        };
        let d = policy.authenticate(&h, client, unsigned).await.unwrap_err();
        assert_eq!(
            (d.status, d.reason),
            (StatusCode::SERVICE_UNAVAILABLE, "no-key")
        );
        // A token without the required group: 403 with insufficient_scope.
        let outsider = format!(
            "Bearer {}",
            issuer.sign(&json!({"iss": "https://id", "exp": now() + 60, "groups": "ops"}))
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&outsider).unwrap(),
        );
        let d = policy.authenticate(&h, client, identity).await.unwrap_err();
        assert_eq!(
            (d.status, d.reason),
            (StatusCode::FORBIDDEN, "missing-claim")
        );
        assert!(
            d.headers[0]
                .1
                .to_str()
                .unwrap()
                .contains("insufficient_scope")
        );
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_are_denied_first_then_must_be_allowed() {
        let p = policy(
            json!({"ip": {"allow": ["10.0.0.0/8", "2001:db8::/32", "127.0.0.1"],
                                      "deny": ["10.1.0.0/16"]}}),
        )
        .unwrap();
        let table = [
            ("10.2.3.4", None),
            ("::ffff:10.2.3.4", None),
            ("2001:db8::1", None),
            ("127.0.0.1", None),
            ("10.1.2.3", Some("denied")),
            ("127.0.0.2", Some("not-allowed")),
            ("2001:db9::1", Some("not-allowed")),
        ];
        for (client, want) in table {
            let got = p.check_ip(Some(ip(client))).err().map(|d| d.reason);
            assert_eq!(got, want, "{client}");
        }
        let mapped = policy(json!({"ip": {"allow": ["::ffff:10.0.0.0/104"]}})).unwrap();
        assert!(
            mapped.check_ip(Some(ip("10.1.2.3"))).is_ok(),
            "an IPv4-mapped range is IPv4"
        );
        assert!(mapped.check_ip(Some(ip("11.1.2.3"))).is_err());
        let deny_only = policy(json!({"ip": {"deny": ["192.168.1.5/24"]}})).unwrap();
        assert!(
            deny_only.check_ip(Some(ip("192.168.1.200"))).is_err(),
            "host bits are masked"
        );
        assert!(deny_only.check_ip(Some(ip("192.168.2.1"))).is_ok());
    }

    #[test]
    fn methods_then_declared_size() {
        let p = policy(json!({"methods": ["GET", "POST"], "maxRequestBytes": 10})).unwrap();
        let mut h = HeaderMap::new();
        assert!(p.check_head(&Method::GET, &h).is_ok());
        let d = p.check_head(&Method::DELETE, &h).unwrap_err();
        assert_eq!(d.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            d.headers[0],
            (header::ALLOW, HeaderValue::from_static("GET, POST"))
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        assert!(p.check_head(&Method::POST, &h).is_ok());
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("11"));
        assert_eq!(
            p.check_head(&Method::POST, &h).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    fn basic_header(user: &str, password: &str) -> HeaderMap {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {token}")).unwrap(),
        );
        h
    }

    #[tokio::test]
    async fn basic_auth_checks_bcrypt_and_argon2_users_from_the_secret() {
        use argon2::PasswordHasher as _;
        let bcrypt = bcrypt::hash("s3cret", 4).unwrap();
        let salt = argon2::password_hash::SaltString::from_b64("c2FsdHNhbHRzYWx0").unwrap();
        let argon = argon2::Argon2::default()
            .hash_password(b"other", &salt)
            .unwrap()
            .to_string();
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "users", "namespace": "p"}, "type": "portway.dev/htpasswd",
            "data": {"htpasswd": base64::Engine::encode(&base64::engine::general_purpose::STANDARD,
                format!("ann:{bcrypt}\nbob:{argon}\n"))},
        }))
        .unwrap();
        let p: AccessPolicy = serde_json::from_value(json!({
            "metadata": {"name": "guard", "namespace": "p"},
            "spec": {"targetRefs": [{"group": "networking.datumapis.com", "kind": "HTTPProxy", "name": "app"}],
                     "basicAuth": {"secretRef": {"name": "users"}, "realm": "team"}},
        }))
        .unwrap();
        let missing = Policy::compile(&p, |_, _| None).unwrap_err();
        assert!(missing.contains("no Secret p/users"), "{missing}");
        let policy = Policy::compile(&p, |ns, name| {
            (ns == "p" && name == "users").then_some(&secret)
        })
        .unwrap();
        let basic = policy.basic.as_ref().unwrap();
        assert_eq!(
            basic.check(&basic_header("ann", "s3cret")).await.unwrap(),
            "ann"
        );
        // Again, from what was verified.
        assert_eq!(
            basic.check(&basic_header("ann", "s3cret")).await.unwrap(),
            "ann"
        );
        assert_eq!(
            basic.check(&basic_header("bob", "other")).await.unwrap(),
            "bob"
        );
        for (user, password, reason) in [
            ("ann", "wrong", "bad-credentials"),
            ("bob", "s3cret", "bad-credentials"),
            ("eve", "s3cret", "bad-credentials"),
        ] {
            let d = basic
                .check(&basic_header(user, password))
                .await
                .unwrap_err();
            assert_eq!(
                (d.status, d.reason),
                (StatusCode::UNAUTHORIZED, reason),
                "{user}"
            );
        }
        let d = basic.check(&HeaderMap::new()).await.unwrap_err();
        assert_eq!(d.reason, "missing");
        let (name, value) = d.headers[0].clone();
        assert_eq!(
            (name, value.to_str().unwrap()),
            (
                header::WWW_AUTHENTICATE,
                "Basic realm=\"team\", charset=\"UTF-8\""
            )
        );
        let mut bearer = HeaderMap::new();
        bearer.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert_eq!(basic.check(&bearer).await.unwrap_err().reason, "missing");
    }

    #[test]
    fn token_buckets_refill_and_are_kept_across_compiles() {
        let now = Instant::now();
        let mut l = Level::full(2.0, now);
        assert!(l.take(1.0, 2.0, now).is_ok());
        assert!(l.take(1.0, 2.0, now).is_ok());
        let wait = l.take(1.0, 2.0, now).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        assert!(l.take(1.0, 2.0, now + Duration::from_millis(1000)).is_ok());

        let spec = json!({"rateLimit": {"perClient": {"requests": 2, "per": "Minute"},
                                         "perTunnel": {"requests": 3, "per": "Hour"}}});
        let p = policy(spec.clone()).unwrap();
        let limits = p.rate.as_ref().unwrap();
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        assert!(limits.check(a).is_ok());
        assert!(limits.check(a).is_ok());
        let d = limits.check(a).unwrap_err();
        assert_eq!(
            (d.status, d.reason),
            (StatusCode::TOO_MANY_REQUESTS, "per-client")
        );
        assert_eq!(d.headers[0].1, "30", "one token of 2/minute comes in 30 s");
        // Another client has its own bucket, but the tunnel's is shared: 3 in all.
        assert!(limits.check(b).is_ok());
        // A new compile of the same policy (a route table rebuild) keeps the buckets.
        let again = policy(spec).unwrap();
        assert!(Arc::ptr_eq(limits, again.rate.as_ref().unwrap()));
        assert_eq!(
            again.rate.as_ref().unwrap().check(b).unwrap_err().reason,
            "per-tunnel"
        );
        // New rates start new buckets.
        let changed =
            policy(json!({"rateLimit": {"perTunnel": {"requests": 1, "per": "Hour"}}})).unwrap();
        assert!(changed.rate.as_ref().unwrap().check(b).is_ok());
    }

    #[test]
    fn a_policy_that_does_not_validate_is_not_compiled() {
        let e = policy(json!({"methods": ["get"]})).unwrap_err();
        assert!(e.contains("spec.methods[0]"), "{e}");
    }

    #[test]
    fn the_client_behind_trusted_proxies_is_the_nearest_untrusted_hop() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-for", HeaderValue::from_static(v));
            h
        };
        let h = xff("6.6.6.6, 1.2.3.4, 10.0.0.7");
        // A client's own X-Forwarded-For counts for nothing.
        assert_eq!(client_ip(&h, ip("5.5.5.5"), &trusted), Some(ip("5.5.5.5")));
        // Through trusted balancers, the address the first of them saw.
        assert_eq!(client_ip(&h, ip("10.0.0.1"), &trusted), Some(ip("1.2.3.4")));
        // A trusted peer that names no client is the client.
        assert_eq!(
            client_ip(&HeaderMap::new(), ip("10.0.0.1"), &trusted),
            Some(ip("10.0.0.1"))
        );
        // A client that writes junk on the left cannot become the balancer; junk on the
        // way to the nearest untrusted hop makes the client unknown.
        assert_eq!(
            client_ip(&xff("x, 6.6.6.6"), ip("10.0.0.1"), &trusted),
            Some(ip("6.6.6.6"))
        );
        assert_eq!(
            client_ip(&xff("6.6.6.6, x"), ip("10.0.0.1"), &trusted),
            None
        );
        assert_eq!(
            client_ip(&xff("[2001:db8::1]"), ip("10.0.0.1"), &trusted),
            Some(ip("2001:db8::1"))
        );
        let p = policy(json!({"ip": {"deny": ["1.2.3.4"]}})).unwrap();
        assert_eq!(p.check_ip(None).unwrap_err().reason, "unknown-client");
    }
}
