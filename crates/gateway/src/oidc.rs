//! Browser sign-in for AccessPolicies: OpenID Connect's authorization-code flow with PKCE,
//! run by the data plane itself so both planes behave alike (Envoy reaches it through
//! `ext_authz`, which may answer with a redirect and cookies). Nothing is kept in memory
//! between the legs of a sign-in: the login state travels in the `state` parameter, sealed
//! with the data plane's key and bound to the browser by a short cookie; the session is a
//! sealed cookie bound to the hostname and the policy, so any edge, or the xDS server,
//! opens it.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Weak};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::Secret;
use portway_api::access::{OIDC_CALLBACK_PATH, OIDC_LOGOUT_PATH};
use serde_json::{Map, Value, json};

use crate::jwt::{RemoteKeys, Signer, Token};
use crate::policy::{Denied, rules};

/// How long a sign-in may take, from the redirect to the provider to the callback.
const LOGIN_SECS: u64 = 600;
/// Token and userinfo calls in flight, process-wide.
static CALLS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(32);

/// How long a provider's configuration is used before it is read again.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);

/// One policy's `oidc` rule, compiled.
pub struct Oidc {
    issuer: String,
    client_id: String,
    client_secret: String,
    scopes: String,
    emails: Vec<String>,
    domains: Vec<String>,
    groups: Vec<String>,
    groups_claim: String,
    session_secs: u64,
    /// `namespace/name/uid` of the policy: sessions and login state are bound to it, so
    /// a session one policy let in is no session under another.
    policy: String,
    /// The session cookie's name, one per policy (a host may have several); the login
    /// cookie's is this with `-login`.
    cookie: String,
    provider: Arc<Provider>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// The request as sign-in needs it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a Method,
    /// Path and query, as sent.
    pub path: &'a str,
    /// `http` or `https`, as the client connected.
    pub scheme: &'a str,
    /// The `Host` (or `:authority`) as sent, port included.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

/// A signed-in caller: the provider's claims kept in the session, and the `Cookie` header
/// the app gets instead (the client's own cookies without Portway's; `None`: none left).
#[derive(Debug)]
pub struct Session {
    pub claims: Map<String, Value>,
    pub cookie: Option<HeaderValue>,
}

impl Oidc {
    /// Compiles the rule, with its client's Secret.
    ///
    /// # Errors
    /// A sentence naming what is missing.
    pub fn compile(
        o: &portway_api::Oidc,
        secret: Option<&Secret>,
        ns: &str,
        policy: &str,
    ) -> Result<Self, String> {
        use portway_api::access::{OIDC_CLIENT_KEY, OIDC_CLIENT_TYPE};
        let name = &o.client_secret_ref.name;
        let secret = secret
            .filter(|s| s.type_.as_deref() == Some(OIDC_CLIENT_TYPE))
            .ok_or_else(|| format!("oidc: no Secret {ns}/{name} of type {OIDC_CLIENT_TYPE}"))?;
        let client_secret = portway_api::access::oidc_client_secret(secret)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("oidc: Secret {ns}/{name} has no key {OIDC_CLIENT_KEY}"))?;
        let scopes = if o.scopes.is_empty() {
            "openid email profile".to_owned()
        } else {
            o.scopes.join(" ")
        };
        Ok(Self {
            issuer: o.issuer.clone(),
            client_id: o.client_id.clone(),
            client_secret,
            scopes,
            emails: o.allowed_emails.iter().map(|e| e.to_lowercase()).collect(),
            domains: o
                .allowed_domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            groups: o.allowed_groups.clone(),
            groups_claim: o.groups_claim.clone().unwrap_or_else(|| "groups".into()),
            session_secs: u64::from(o.session_seconds.unwrap_or(28_800)),
            policy: policy.to_owned(),
            cookie: cookie_name(policy),
            provider: Provider::get(&o.issuer),
        })
    }

    /// The caller's session; or the answer that signs it in (a redirect to the provider),
    /// finishes a sign-in (the callback), or ends a session (the logout path).
    ///
    /// # Errors
    /// [`Denied`]: 302 to the provider or back to the page, 401 for a request that cannot
    /// be redirected, 403 for a caller the policy does not let in, 400 for a callback this
    /// browser did not start, 502/503 when the provider fails.
    pub async fn check(&self, req: Request<'_>, signer: &Signer) -> Result<Session, Denied> {
        let (path, query) = req
            .path
            .split_once('?')
            .map_or((req.path, ""), |(p, q)| (p, q));
        if path == OIDC_CALLBACK_PATH {
            return Err(self.callback(req, query, signer).await);
        }
        if path == OIDC_LOGOUT_PATH {
            let mut d = answer("logout", StatusCode::OK, "signed out");
            d.headers
                .push(self.set_cookie(&self.session_cookie(req.scheme), "", 0, req.scheme));
            return Err(d);
        }
        // Every cookie of the name is tried: a sibling hostname can plant one of its own
        // (Domain=) ahead of ours over plain HTTP, and must not lock the caller out.
        if let Some(claims) = cookies(req.headers, &self.session_cookie(req.scheme))
            .find_map(|v| self.open_session(signer, v, req.host))
        {
            return Ok(Session {
                claims,
                cookie: without_cookies(req.headers, &self.cookie),
            });
        }
        if !matches!(*req.method, Method::GET | Method::HEAD) {
            return Err(answer(
                "no-session",
                StatusCode::UNAUTHORIZED,
                "sign in first: open this site in a browser",
            ));
        }
        Err(self.login(req, signer).await)
    }

    fn open_session(&self, signer: &Signer, value: &str, host: &str) -> Option<Map<String, Value>> {
        let plain = signer.open(&self.cookie, value)?;
        let mut s: Map<String, Value> = serde_json::from_slice(&plain).ok()?;
        let fresh = s
            .get("exp")
            .and_then(Value::as_u64)
            .is_some_and(|exp| crate::jwt::now() < exp);
        let here = s.get("aud").and_then(Value::as_str)
            == Some(crate::model::normalize_host(host).as_str())
            && s.get("pol").and_then(Value::as_str) == Some(self.policy.as_str());
        // The lists are asked again at every request: a person taken off them is out at
        // once, not when the cookie expires.
        if !(fresh && here && self.allows(&s)) {
            return None;
        }
        s.remove("exp");
        s.remove("aud");
        s.remove("pol");
        s.remove("email_verified");
        Some(s)
    }

    /// The redirect to the provider: PKCE, a nonce, and the state sealed and bound to
    /// this browser by a cookie (so a sign-in started elsewhere cannot be finished here).
    async fn login(&self, req: Request<'_>, signer: &Signer) -> Denied {
        let d = match self.provider.discovery().await {
            Ok(d) => d,
            Err(why) => return unavailable(&why),
        };
        let (verifier, nonce, browser) = (random(32), random(16), random(16));
        let challenge = B64.encode(ring::digest::digest(
            &ring::digest::SHA256,
            verifier.as_bytes(),
        ));
        // Back to the page asked for, on this host only (`//x` and `/\x` name other hosts
        // to browsers).
        let back = if req.path.starts_with('/')
            && !req.path.starts_with("//")
            && !req.path.starts_with("/\\")
            && !req.path.chars().any(|c| c.is_control() || c == '\\')
        {
            req.path
        } else {
            "/"
        };
        let state = json!({
            "v": verifier, "n": nonce, "r": back, "b": digest64(&browser),
            "exp": crate::jwt::now() + LOGIN_SECS, "pol": self.policy,
        });
        let state = signer.seal(&self.state_context(), state.to_string().as_bytes());
        let Ok(url) = url::Url::parse_with_params(
            &d.authorization_endpoint,
            [
                ("response_type", "code"),
                ("client_id", self.client_id.as_str()),
                ("redirect_uri", &redirect_uri(req)),
                ("scope", self.scopes.as_str()),
                ("state", state.as_str()),
                ("nonce", nonce.as_str()),
                ("code_challenge", challenge.as_str()),
                ("code_challenge_method", "S256"),
            ],
        ) else {
            return unavailable("the provider's authorization endpoint is not a URL");
        };
        let mut d = answer("sign-in", StatusCode::FOUND, "sign in at the provider");
        if let Ok(v) = HeaderValue::from_str(url.as_str()) {
            d.headers.push((header::LOCATION, v));
        }
        d.headers.push(self.set_cookie(
            &self.login_cookie(req.scheme),
            &browser,
            LOGIN_SECS,
            req.scheme,
        ));
        d
    }

    /// The provider sent the browser back: the code is exchanged, the ID token checked,
    /// the caller let in or not, and the session set.
    async fn callback(&self, req: Request<'_>, query: &str, signer: &Signer) -> Denied {
        let q: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let bad = |why: &str| answer("bad-callback", StatusCode::BAD_REQUEST, why);
        if let Some(e) = q.get("error") {
            let e: String = e
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(64)
                .collect();
            return answer(
                "provider-refused",
                StatusCode::FORBIDDEN,
                &format!("the provider did not sign you in ({e})"),
            );
        }
        let (Some(code), Some(state)) = (q.get("code"), q.get("state")) else {
            return bad("a sign-in callback needs code and state");
        };
        // RFC 9207: a provider that names itself must be this one (mix-up attacks).
        if q.get("iss").is_some_and(|i| *i != self.issuer) {
            return bad("the callback comes from another provider");
        }
        let Some(st) = signer
            .open(&self.state_context(), state)
            .and_then(|p| serde_json::from_slice::<Map<String, Value>>(&p).ok())
        else {
            return bad("this sign-in was not started here; start again");
        };
        let field = |k: &str| st.get(k).and_then(Value::as_str).unwrap_or_default();
        let expired = st
            .get("exp")
            .and_then(Value::as_u64)
            .is_none_or(|exp| crate::jwt::now() > exp);
        if expired || field("pol") != self.policy {
            return bad("this sign-in expired or belongs elsewhere; start again");
        }
        if !cookies(req.headers, &self.login_cookie(req.scheme)).any(|b| digest64(b) == field("b"))
        {
            return bad("this sign-in was started in another browser; start again");
        }
        let d = match self.provider.discovery().await {
            Ok(d) => d,
            Err(why) => return unavailable(&why),
        };
        let claims = match self.exchange(&d, req, code, field("v"), field("n")).await {
            Ok(c) => c,
            Err(d) => return d,
        };
        if !self.allows(&claims) {
            let who = claims
                .get("email")
                .or_else(|| claims.get("sub"))
                .and_then(Value::as_str)
                .unwrap_or("this account");
            let mut d = answer(
                "not-allowed",
                StatusCode::FORBIDDEN,
                &format!("{who} may not sign in here"),
            );
            d.headers
                .push(self.set_cookie(&self.login_cookie(req.scheme), "", 0, req.scheme));
            return d;
        }
        let mut session = Map::new();
        for k in ["sub", "email", "name", "email_verified"] {
            if let Some(v) = claims.get(k) {
                session.insert(k.into(), v.clone());
            }
        }
        // The groups that decide, or at most 32: a cookie past ~4 KB is dropped by
        // browsers, and the caller would be sent to sign in again and again.
        if let Some(Value::Array(g)) = claims.get(&self.groups_claim) {
            let kept: Vec<Value> = g
                .iter()
                .filter(|v| self.groups.is_empty() || crate::jwt::claim_matches(v, &self.groups))
                .take(32)
                .cloned()
                .collect();
            session.insert(self.groups_claim.clone(), Value::Array(kept));
        } else if let Some(g) = claims.get(&self.groups_claim) {
            session.insert(self.groups_claim.clone(), g.clone());
        }
        session.insert("exp".into(), (crate::jwt::now() + self.session_secs).into());
        session.insert("aud".into(), crate::model::normalize_host(req.host).into());
        session.insert("pol".into(), self.policy.clone().into());
        let sealed = signer.seal(&self.cookie, Value::Object(session).to_string().as_bytes());
        if sealed.len() > 3800 {
            return answer(
                "not-allowed",
                StatusCode::FORBIDDEN,
                "the provider's claims for this account are too large for a session",
            );
        }
        let mut d = answer("signed-in", StatusCode::FOUND, "signed in");
        if let Ok(v) = HeaderValue::from_str(field("r")) {
            d.headers.push((header::LOCATION, v));
        }
        d.headers
            .push(self.set_cookie(&self.cookie, &sealed, self.session_secs, req.scheme));
        d.headers
            .push(self.set_cookie(&self.login_cookie(req.scheme), "", 0, req.scheme));
        d
    }

    /// The code for tokens; the ID token checked (signature, issuer, audience, expiry,
    /// nonce); the claims, completed from the userinfo endpoint when the ID token lacks
    /// those the policy decides on.
    async fn exchange(
        &self,
        d: &Discovery,
        req: Request<'_>,
        code: &str,
        verifier: &str,
        nonce: &str,
    ) -> Result<Map<String, Value>, Denied> {
        let failed = |why: String| answer("provider-failed", StatusCode::BAD_GATEWAY, &why);
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                enc(&self.client_id),
                enc(&self.client_secret)
            ))
        );
        // Calls to providers at once, process-wide: each may hold a connection and an
        // answer for seconds, and a replayed callback must not pile them up.
        let Ok(_call) = CALLS.try_acquire() else {
            let mut d = answer(
                "busy",
                StatusCode::TOO_MANY_REQUESTS,
                "too many sign-ins at once; try again in a second",
            );
            d.headers.push((header::RETRY_AFTER, HeaderValue::from(1)));
            return Err(d);
        };
        let redirect = redirect_uri(req);
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect.as_str()),
            ("code_verifier", verifier),
        ];
        let (status, body) = crate::fetch::post_form(&d.token_endpoint, &form, Some(&basic))
            .await
            .map_err(|e| failed(format!("the provider's token endpoint: {e}")))?;
        let answer: Map<String, Value> = serde_json::from_slice(&body).unwrap_or_default();
        if status != 200 {
            let e = answer
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no error named");
            return Err(failed(format!(
                "the provider refused the code (status {status}, {e})"
            )));
        }
        let id = answer
            .get("id_token")
            .and_then(Value::as_str)
            .ok_or_else(|| failed("the provider sent no ID token".into()))?;
        let invalid =
            |e: crate::jwt::Invalid| failed(format!("the provider's ID token: {}", e.message));
        let token = Token::parse(id).map_err(invalid)?;
        let keys = d.keys.keys(token.kid.as_deref()).await.map_err(&failed)?;
        token.verify(&keys).map_err(invalid)?;
        token
            .check_claims(
                &self.issuer,
                std::slice::from_ref(&self.client_id),
                crate::jwt::now(),
            )
            .map_err(invalid)?;
        if token.claims.get("nonce").and_then(Value::as_str) != Some(nonce) {
            return Err(failed(
                "the provider's ID token is not for this sign-in (nonce)".into(),
            ));
        }
        if !token.claims.get("sub").is_some_and(Value::is_string) {
            return Err(failed(
                "the provider's ID token names no subject (sub)".into(),
            ));
        }
        let mut claims = token.claims;
        // Providers often keep scope claims out of the ID token when they issue an
        // access token (OpenID Connect Core 5.4): ask for them.
        let lacking = !claims.contains_key("email")
            || !self.groups.is_empty() && !claims.contains_key(&self.groups_claim);
        if lacking
            && let (Some(url), Some(at)) = (
                &d.userinfo_endpoint,
                answer.get("access_token").and_then(Value::as_str),
            )
        {
            let info = crate::fetch::get_as(url, Some(&format!("Bearer {at}")))
                .await
                .map_err(|e| failed(format!("the provider's userinfo endpoint: {e}")))?;
            let info: Map<String, Value> = serde_json::from_slice(&info).unwrap_or_default();
            // Only the same subject's claims (OpenID Connect Core 5.3.2).
            if info.get("sub") == claims.get("sub") {
                for (k, v) in info {
                    claims.entry(k).or_insert(v);
                }
            }
        }
        Ok(claims)
    }

    /// Whether the policy lets the caller with `claims` in.
    fn allows(&self, claims: &Map<String, Value>) -> bool {
        if self.emails.is_empty() && self.domains.is_empty() && self.groups.is_empty() {
            return true;
        }
        // Providers that do not say (Entra) count as verified; some send "false" as text.
        let verified = !matches!(claims.get("email_verified"), Some(Value::Bool(false)))
            && claims.get("email_verified").and_then(Value::as_str) != Some("false");
        let email = claims
            .get("email")
            .and_then(Value::as_str)
            .map(str::to_lowercase)
            .filter(|_| verified);
        if let Some(email) = &email {
            if self.emails.contains(email) {
                return true;
            }
            if let Some((_, domain)) = email.rsplit_once('@')
                && self.domains.iter().any(|d| d == domain)
            {
                return true;
            }
        }
        claims
            .get(&self.groups_claim)
            .is_some_and(|g| crate::jwt::claim_matches(g, &self.groups))
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The session cookie's name: over HTTPS with the `__Host-` prefix, which browsers
    /// take only from this very host (no `Domain=` from a sibling hostname of the zone).
    fn session_cookie(&self, scheme: &str) -> String {
        if scheme == "https" {
            format!("__Host-{}", self.cookie)
        } else {
            self.cookie.clone()
        }
    }

    fn login_cookie(&self, scheme: &str) -> String {
        format!("{}-login", self.session_cookie(scheme))
    }

    fn state_context(&self) -> String {
        format!("{}-state", self.cookie)
    }

    /// A `Set-Cookie` for `name` (HttpOnly, SameSite=Lax so the provider's redirect back
    /// carries it, Secure over HTTPS); `max_age` 0 deletes it.
    fn set_cookie(
        &self,
        name: &str,
        value: &str,
        max_age: u64,
        scheme: &str,
    ) -> (header::HeaderName, HeaderValue) {
        let secure = if scheme == "https" { "; Secure" } else { "" };
        let v =
            format!("{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}");
        (
            header::SET_COOKIE,
            HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("")),
        )
    }
}

/// The session cookie's name (over plain HTTP) for the policy `namespace/name/uid`: one per
/// policy, as a host may have several.
pub fn cookie_name(policy: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, policy.as_bytes());
    let tag: String = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("portway-{tag}")
}

/// Where the provider sends the browser back: this host's callback path.
fn redirect_uri(req: Request<'_>) -> String {
    format!("{}://{}{OIDC_CALLBACK_PATH}", req.scheme, req.host)
}

/// An answer of the `oidc` rule.
fn answer(reason: &'static str, status: StatusCode, message: &str) -> Denied {
    Denied {
        rule: rules::OIDC,
        reason,
        status,
        message: message.to_owned(),
        headers: Vec::new(),
    }
}

fn unavailable(why: &str) -> Denied {
    // Why (a URL, a connection error) is logged, not told to whoever asked.
    tracing::warn!("oidc: {why}");
    let mut d = answer(
        "provider-unavailable",
        StatusCode::SERVICE_UNAVAILABLE,
        "the sign-in provider cannot be reached now; try again shortly",
    );
    d.headers.push((header::RETRY_AFTER, HeaderValue::from(5)));
    d
}

/// `n` random bytes, as base64url.
fn random(n: usize) -> String {
    use ring::rand::SecureRandom as _;
    let mut b = vec![0u8; n];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    B64.encode(b)
}

fn digest64(s: &str) -> String {
    B64.encode(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()))
}

/// The values of cookie `name` in the request's `Cookie` headers (several may come: one
/// planted by a sibling hostname, say).
pub fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        // Several Cookie headers may arrive joined by commas (Envoy's ext_authz joins
        // repeated headers so); a cookie value of ours never holds one.
        .flat_map(|v| v.split([';', ',']))
        .filter_map(|c| c.trim().split_once('='))
        .filter(move |(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The request's cookies without Portway's (`prefix`, `__Host-prefix` and their `-login`):
/// what the app gets. Split on `;` only, so an app's `prefs=a,b` reaches it whole.
fn without_cookies(headers: &HeaderMap, prefix: &str) -> Option<HeaderValue> {
    let host = format!("__Host-{prefix}");
    let ours = |c: &str| {
        let name = c.split_once('=').map_or(c, |(k, _)| k).trim();
        [prefix, host.as_str()]
            .iter()
            .any(|p| name == *p || name.strip_prefix(p) == Some("-login"))
    };
    let kept: Vec<&str> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty())
        // Two Cookie headers joined by a comma: ours may hide in a piece's part.
        .flat_map(|c| {
            if c.contains(',') && c.split(',').any(ours) {
                c.split(',').map(str::trim).collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .filter(|c| !ours(c))
        .collect();
    (!kept.is_empty())
        .then(|| HeaderValue::from_str(&kept.join("; ")).ok())
        .flatten()
}

/// A provider's configuration, read from its discovery document and shared by every
/// policy naming the issuer.
#[derive(Debug)]
pub struct Provider {
    issuer: String,
    state: parking_lot::Mutex<Option<(Arc<Discovery>, Instant)>>,
    /// The last failed read and why: not tried again for 5 s.
    failed: parking_lot::Mutex<Option<(String, Instant)>>,
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Discovery {
    authorization_endpoint: String,
    token_endpoint: String,
    userinfo_endpoint: Option<String>,
    keys: Arc<RemoteKeys>,
}

static PROVIDERS: LazyLock<parking_lot::Mutex<HashMap<String, Weak<Provider>>>> =
    LazyLock::new(parking_lot::Mutex::default);

impl Provider {
    /// The keys at the provider's `jwks_uri` (for `jwt` rules that name no keys).
    ///
    /// # Errors
    /// When its configuration cannot be read.
    pub async fn jwks(&self) -> Result<Arc<RemoteKeys>, String> {
        Ok(self.discovery().await?.keys.clone())
    }

    /// The provider of `issuer`, shared.
    pub fn get(issuer: &str) -> Arc<Self> {
        let mut all = PROVIDERS.lock();
        if let Some(p) = all.get(issuer).and_then(Weak::upgrade) {
            return p;
        }
        all.retain(|_, w| w.strong_count() > 0);
        let p = Arc::new(Self {
            issuer: issuer.to_owned(),
            state: parking_lot::Mutex::default(),
            failed: parking_lot::Mutex::default(),
            fetching: tokio::sync::Mutex::new(()),
        });
        all.insert(issuer.to_owned(), Arc::downgrade(&p));
        p
    }

    async fn discovery(&self) -> Result<Arc<Discovery>, String> {
        let fresh = |s: &Option<(Arc<Discovery>, Instant)>| {
            s.as_ref()
                .filter(|(_, at)| at.elapsed() < DISCOVERY_TTL)
                .map(|(d, _)| d.clone())
        };
        if let Some(d) = fresh(&self.state.lock()) {
            return Ok(d);
        }
        let _one = self.fetching.lock().await;
        if let Some(d) = fresh(&self.state.lock()) {
            return Ok(d);
        }
        let stale = || self.state.lock().as_ref().map(|(d, _)| d.clone());
        if let Some((why, at)) = &*self.failed.lock()
            && at.elapsed() < Duration::from_secs(5)
        {
            return stale().ok_or_else(|| why.clone());
        }
        match self.read().await {
            Ok(d) => {
                let d = Arc::new(d);
                *self.state.lock() = Some((d.clone(), Instant::now()));
                *self.failed.lock() = None;
                Ok(d)
            }
            Err(why) => {
                tracing::warn!("{why}");
                *self.failed.lock() = Some((why.clone(), Instant::now()));
                // The configuration read before serves on while the provider is down.
                self.state
                    .lock()
                    .as_ref()
                    .map(|(d, _)| d.clone())
                    .ok_or(why)
            }
        }
    }

    async fn read(&self) -> Result<Discovery, String> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let body = crate::fetch::get(&url)
            .await
            .map_err(|e| format!("reading {url}: {e}"))?;
        let doc: Map<String, Value> =
            serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))?;
        let field = |k: &str| -> Result<String, String> {
            let v = doc
                .get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{url} names no {k}"))?;
            portway_api::access::fetch_url(v).map_err(|e| format!("{url}: {k}: {e}"))?;
            Ok(v.to_owned())
        };
        if doc.get("issuer").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(format!("{url} is for another issuer"));
        }
        Ok(Discovery {
            authorization_endpoint: field("authorization_endpoint")?,
            token_endpoint: field("token_endpoint")?,
            userinfo_endpoint: field("userinfo_endpoint").ok(),
            keys: RemoteKeys::get(&field("jwks_uri")?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(spec: Value) -> Oidc {
        let o: portway_api::Oidc = serde_json::from_value(spec).unwrap();
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "client", "namespace": "p"}, "type": "portway.dev/oidc-client",
            "stringData": {"clientSecret": "s3cret"}}))
        .unwrap();
        Oidc::compile(&o, Some(&secret), "p", "p/guard/uid-1").unwrap()
    }

    #[test]
    fn who_may_sign_in() {
        let base = json!({"issuer": "https://id.example", "clientID": "c",
            "clientSecretRef": {"name": "client"}});
        let anyone = rule(base.clone());
        assert!(anyone.allows(&Map::new()));
        let mut spec = base;
        spec["allowedEmails"] = json!(["Ann@Example.com"]);
        spec["allowedDomains"] = json!(["corp.example"]);
        spec["allowedGroups"] = json!(["dev"]);
        let o = rule(spec);
        let allows = |c: Value| o.allows(c.as_object().unwrap());
        assert!(allows(json!({"email": "ann@example.com"})));
        assert!(allows(json!({"email": "bob@corp.example"})));
        assert!(!allows(
            json!({"email": "bob@corp.example", "email_verified": false})
        ));
        assert!(!allows(json!({"email": "eve@evil.corp.example"})));
        assert!(allows(json!({"email": "eve@x", "groups": ["ops", "dev"]})));
        assert!(!allows(json!({"email": "eve@x", "groups": ["ops"]})));
        assert!(!allows(
            json!({"email": "bob@corp.example", "email_verified": "false"})
        ));
        // A session is held to the lists at every request: taken off them, out at once.
        let signer = Signer::from_pkcs8(&Signer::generate().unwrap()).unwrap();
        let session = |email: &str| {
            let s = json!({"sub": "x", "email": email, "aud": "app.example.com",
                "pol": "p/guard/uid-1", "exp": crate::jwt::now() + 60});
            signer.seal(&o.cookie, s.to_string().as_bytes())
        };
        assert!(
            o.open_session(&signer, &session("ann@example.com"), "app.example.com")
                .is_some()
        );
        assert!(
            o.open_session(&signer, &session("eve@x"), "app.example.com")
                .is_none()
        );
    }

    #[tokio::test]
    async fn sessions_open_only_for_their_host_policy_and_time() {
        let signer = Signer::from_pkcs8(&Signer::generate().unwrap()).unwrap();
        let o = rule(json!({"issuer": "https://id.example", "clientID": "c",
            "clientSecretRef": {"name": "client"}}));
        let seal = |aud: &str, pol: &str, exp: u64| {
            signer.seal(
                &o.cookie,
                json!({"sub": "ann", "aud": aud, "pol": pol, "exp": exp})
                    .to_string()
                    .as_bytes(),
            )
        };
        let later = crate::jwt::now() + 60;
        let good = seal("app.example.com", "p/guard/uid-1", later);
        let s = o
            .open_session(&signer, &good, "App.example.com:8443")
            .unwrap();
        assert_eq!(s["sub"], "ann");
        assert!(!s.contains_key("pol"), "the binding stays inside");
        assert!(
            o.open_session(&signer, &good, "other.example.com")
                .is_none()
        );
        let other_policy = seal("app.example.com", "p/open/uid-2", later);
        assert!(
            o.open_session(&signer, &other_policy, "app.example.com")
                .is_none()
        );
        let old = seal("app.example.com", "p/guard/uid-1", crate::jwt::now() - 1);
        assert!(o.open_session(&signer, &old, "app.example.com").is_none());

        // The app gets its own cookies, never the session.
        let mut h = HeaderMap::new();
        let c = format!(
            "theme=dark; {}=planted; {}={good}; {}-login=x; prefs=a,b",
            o.cookie, o.cookie, o.cookie
        );
        h.insert(header::COOKIE, HeaderValue::from_str(&c).unwrap());
        let req = Request {
            method: &Method::GET,
            path: "/page",
            scheme: "http",
            host: "app.example.com",
            headers: &h,
        };
        let session = o.check(req, &signer).await.unwrap();
        assert_eq!(session.cookie.unwrap(), "theme=dark; prefs=a,b");
        // A callback this browser did not start is refused before the provider is asked.
        let cb = Request {
            path: "/.portway/oidc/callback?code=c&state=forged",
            ..req
        };
        let d = o.check(cb, &signer).await.unwrap_err();
        assert_eq!(
            (d.status, d.reason),
            (StatusCode::BAD_REQUEST, "bad-callback")
        );
        // No session and not a page: 401, never a redirect a script cannot follow.
        let h = HeaderMap::new();
        let post = Request {
            method: &Method::POST,
            headers: &h,
            ..req
        };
        let d = o.check(post, &signer).await.unwrap_err();
        assert_eq!(d.status, StatusCode::UNAUTHORIZED);
    }
}
