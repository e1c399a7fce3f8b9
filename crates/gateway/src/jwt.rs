//! JSON Web Tokens, as AccessPolicies check them and as the data planes sign the
//! caller's identity: JWS compact tokens signed with RS256, ES256 or EdDSA, verified
//! with `ring` against a JWKS. Deliberately narrow: no `none`, no HMAC (a shared secret
//! in a policy would let anyone who reads it mint tokens), no `crit` extensions, no
//! key material from the token itself (`jwk`, `jku`, `x5u` are ignored), and a key is
//! used only for the algorithm its type allows, so an RSA key can never verify an
//! HMAC-shaped token.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{self, KeyPair as _};
use serde_json::{Map, Value};

/// The longest token taken (headers are bounded anyway; this bounds the work).
pub const MAX_TOKEN_BYTES: usize = 16 << 10;
/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
    EdDsa,
}

impl Alg {
    fn from_name(s: &str) -> Option<Self> {
        match s {
            "RS256" => Some(Self::Rs256),
            "ES256" => Some(Self::Es256),
            "EdDSA" => Some(Self::EdDsa),
            _ => None,
        }
    }
}

#[derive(Debug)]
enum Public {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed P-256 point: 0x04, x, y.
    Ec(Vec<u8>),
    Ed(Vec<u8>),
}

#[derive(Debug)]
struct Key {
    kid: Option<String>,
    public: Public,
}

impl Key {
    /// Key `i` of a JWKS: `None` when it is for another use or algorithm.
    fn read(i: usize, k: &Value) -> Result<Option<Self>, String> {
        let s = |f: &str| k.get(f).and_then(Value::as_str);
        let bytes = |f: &str| {
            s(f).and_then(|v| B64.decode(v).ok())
                .ok_or_else(|| format!("keys[{i}].{f} is not base64url"))
        };
        if s("use").is_some_and(|u| u != "sig") {
            return Ok(None);
        }
        let public = match (s("kty"), s("crv")) {
            (Some("RSA"), _) => Public::Rsa {
                n: bytes("n")?,
                e: bytes("e")?,
            },
            (Some("EC"), Some("P-256")) => {
                let (x, y) = (bytes("x")?, bytes("y")?);
                if x.len() != 32 || y.len() != 32 {
                    return Err(format!("keys[{i}]: a P-256 x and y are 32 bytes each"));
                }
                Public::Ec([&[4u8][..], &x, &y].concat())
            }
            (Some("OKP"), Some("Ed25519")) => {
                let x = bytes("x")?;
                if x.len() != 32 {
                    return Err(format!("keys[{i}]: an Ed25519 x is 32 bytes"));
                }
                Public::Ed(x)
            }
            _ => return Err(format!("keys[{i}]: not an RSA, P-256 or Ed25519 key")),
        };
        let key = Self {
            kid: s("kid").map(str::to_owned),
            public,
        };
        if s("alg").is_some_and(|a| Alg::from_name(a) != Some(key.alg())) {
            return Ok(None);
        }
        Ok(Some(key))
    }

    fn alg(&self) -> Alg {
        match self.public {
            Public::Rsa { .. } => Alg::Rs256,
            Public::Ec(_) => Alg::Es256,
            Public::Ed(_) => Alg::EdDsa,
        }
    }

    fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        match &self.public {
            Public::Rsa { n, e } => signature::RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok(),
            Public::Ec(point) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
            Public::Ed(x) => signature::UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(message, sig)
                .is_ok(),
        }
    }
}

/// The usable signing keys of a JWKS.
#[derive(Debug, Default)]
pub struct Keys(Vec<Key>);

impl Keys {
    /// Reads a JWKS. Keys marked for another use (`use` other than `sig`) or another
    /// algorithm (`alg` other than their type's) are left out.
    ///
    /// # Errors
    /// A sentence naming the first bad key, or saying none is usable.
    pub fn parse(text: &str) -> Result<Self, String> {
        portway_api::access::jwks(text)?;
        Self::read(text, false)
    }

    /// Reads an issuer's published JWKS: keys of other types (P-384, `oct`, ...) or that do
    /// not decode are left out rather than failing the set, as issuers publish what they
    /// like; at most 100 keys and 1 MiB are read.
    ///
    /// # Errors
    /// When it is not a JWKS or holds no usable key.
    pub fn parse_published(text: &str) -> Result<Self, String> {
        Self::read(text, true)
    }

    fn read(text: &str, lenient: bool) -> Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let list = v["keys"].as_array().ok_or("a JWKS is {\"keys\": [...]}")?;
        let mut keys = Vec::new();
        for (i, k) in list.iter().take(100).enumerate() {
            match Key::read(i, k) {
                Ok(Some(key)) => keys.push(key),
                Ok(None) => {}
                Err(e) if !lenient => return Err(e),
                Err(_) => {}
            }
        }
        if keys.is_empty() {
            return Err("no signing key for RS256, ES256 or EdDSA".into());
        }
        Ok(Self(keys))
    }

    /// Whether a token naming `kid` (or none) has a key here to try.
    pub fn has(&self, kid: Option<&str>) -> bool {
        kid.is_none_or(|kid| self.0.iter().any(|k| k.kid.as_deref() == Some(kid)))
    }
}

/// Why a token was refused: a reason for the denial counter and a sentence.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

fn invalid(reason: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        reason,
        message: message.into(),
    }
}

/// A token read but not yet verified.
#[derive(Debug)]
pub struct Token<'a> {
    alg: Alg,
    pub kid: Option<String>,
    signed: &'a str,
    sig: Vec<u8>,
    pub claims: Map<String, Value>,
}

impl<'a> Token<'a> {
    /// Reads a compact JWS.
    ///
    /// # Errors
    /// A malformed token, or one with an algorithm or extension this does not take.
    pub fn parse(token: &'a str) -> Result<Self, Invalid> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid(
                "malformed",
                format!("the token is longer than {MAX_TOKEN_BYTES} bytes"),
            ));
        }
        let malformed = || {
            invalid(
                "malformed",
                "the token is not a signed JWT (header.payload.signature)",
            )
        };
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let json = |part: &str| -> Option<Map<String, Value>> {
            serde_json::from_slice(&B64.decode(part).ok()?).ok()
        };
        let header = json(h).ok_or_else(malformed)?;
        let claims = json(p).ok_or_else(malformed)?;
        let sig = B64.decode(s).map_err(|_| malformed())?;
        let name = header
            .get("alg")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let alg = Alg::from_name(name).ok_or_else(|| {
            invalid(
                "unsupported-alg",
                format!("the token's alg {name:?} is not taken: RS256, ES256 or EdDSA"),
            )
        })?;
        if header.contains_key("crit") {
            return Err(invalid(
                "unsupported-alg",
                "the token names critical extensions (crit), which are not understood",
            ));
        }
        Ok(Self {
            alg,
            kid: header.get("kid").and_then(Value::as_str).map(str::to_owned),
            signed: &token[..h.len() + 1 + p.len()],
            sig,
            claims,
        })
    }

    /// Checks the signature against the keys: the one the token names, or any of its
    /// algorithm when it names none.
    ///
    /// # Errors
    /// No such key, or no key that the signature verifies with.
    pub fn verify(&self, keys: &Keys) -> Result<(), Invalid> {
        let mut candidates = keys
            .0
            .iter()
            .filter(|k| k.alg() == self.alg)
            .filter(|k| self.kid.is_none() || k.kid == self.kid)
            .peekable();
        if candidates.peek().is_none() {
            return Err(invalid(
                "unknown-key",
                "the token is signed with a key the issuer's JWKS does not hold",
            ));
        }
        if candidates.any(|k| k.verify(self.signed.as_bytes(), &self.sig)) {
            Ok(())
        } else {
            Err(invalid(
                "bad-signature",
                "the token's signature does not verify",
            ))
        }
    }

    /// Checks `iss`, `aud` (when `audiences` is not empty), `exp` (required) and `nbf`.
    ///
    /// # Errors
    /// The first that fails.
    pub fn check_claims(
        &self,
        issuer: &str,
        audiences: &[String],
        now: u64,
    ) -> Result<(), Invalid> {
        let c = &self.claims;
        if c.get("iss").and_then(Value::as_str) != Some(issuer) {
            return Err(invalid("wrong-issuer", "the token is not from this issuer"));
        }
        if !audiences.is_empty() {
            let ok = match c.get("aud") {
                Some(Value::String(a)) => audiences.contains(a),
                Some(Value::Array(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| audiences.iter().any(|x| x == a)),
                _ => false,
            };
            if !ok {
                return Err(invalid(
                    "wrong-audience",
                    "the token is not for this audience",
                ));
            }
        }
        let leeway = LEEWAY.as_secs();
        let time = |k: &str| c.get(k).and_then(Value::as_f64).map(|t| t as u64);
        let Some(exp) = time("exp") else {
            return Err(invalid("expired", "the token has no expiry (exp)"));
        };
        if now > exp.saturating_add(leeway) {
            return Err(invalid("expired", "the token has expired"));
        }
        if time("nbf").is_some_and(|nbf| now.saturating_add(leeway) < nbf) {
            return Err(invalid("not-yet-valid", "the token is not valid yet (nbf)"));
        }
        Ok(())
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A claim as text: a string as it is, a list comma-separated, anything else as JSON.
pub fn claim_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(list) => list.iter().map(claim_text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Whether claim `v` is one of `values` (a list: holds one of them).
pub fn claim_matches(v: &Value, values: &[String]) -> bool {
    match v {
        Value::Array(list) => list.iter().any(|i| claim_matches(i, values)),
        Value::Object(_) | Value::Null => false,
        other => values.contains(&claim_text(other)),
    }
}

/// An issuer's keys fetched from its JWKS URL, shared by every policy naming the URL
/// and kept across route-table rebuilds (as rate-limit buckets are).
#[derive(Debug)]
pub struct RemoteKeys {
    uri: String,
    state: parking_lot::Mutex<Fetched>,
    /// One fetch at a time; the others wait for it and take its answer.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Fetched {
    keys: Option<(Arc<Keys>, Instant)>,
    failed: Option<(String, Instant)>,
}

/// How long fetched keys are used before they are fetched again; how soon a token naming
/// an unknown key may cause another fetch; how long a failed fetch is not tried again.
const KEYS_TTL: Duration = Duration::from_secs(300);
const REFETCH_AFTER: Duration = Duration::from_secs(30);
const RETRY_AFTER: Duration = Duration::from_secs(5);

static REMOTE: LazyLock<parking_lot::Mutex<HashMap<String, Weak<RemoteKeys>>>> =
    LazyLock::new(parking_lot::Mutex::default);

impl RemoteKeys {
    /// The cache of `uri`'s keys, the one in use if any.
    pub fn get(uri: &str) -> Arc<Self> {
        let mut all = REMOTE.lock();
        if let Some(r) = all.get(uri).and_then(Weak::upgrade) {
            return r;
        }
        all.retain(|_, w| w.strong_count() > 0);
        let r = Arc::new(Self {
            uri: uri.to_owned(),
            state: parking_lot::Mutex::default(),
            fetching: tokio::sync::Mutex::new(()),
        });
        all.insert(uri.to_owned(), Arc::downgrade(&r));
        r
    }

    /// Keys for a token naming `kid`: the cached ones while fresh and holding it, else
    /// fetched again. Keys that were fetched before are used when a new fetch fails.
    ///
    /// # Errors
    /// When no keys were ever fetched, why the fetch failed.
    pub async fn keys(&self, kid: Option<&str>) -> Result<Arc<Keys>, String> {
        let usable = |f: &Fetched, kid: Option<&str>| -> Option<Arc<Keys>> {
            let (keys, at) = f.keys.as_ref()?;
            let age = at.elapsed();
            (age < KEYS_TTL && (keys.has(kid) || age < REFETCH_AFTER)).then(|| keys.clone())
        };
        if let Some(k) = usable(&self.state.lock(), kid) {
            return Ok(k);
        }
        let _one = self.fetching.lock().await;
        {
            let f = self.state.lock();
            if let Some(k) = usable(&f, kid) {
                return Ok(k);
            }
            if let Some((why, at)) = &f.failed
                && at.elapsed() < RETRY_AFTER
            {
                return f
                    .keys
                    .as_ref()
                    .map(|(k, _)| k.clone())
                    .ok_or_else(|| why.clone());
            }
        }
        let fetched = crate::fetch::get(&self.uri)
            .await
            .and_then(|body| {
                let text =
                    String::from_utf8(body).map_err(|_| "the JWKS is not UTF-8".to_owned())?;
                Keys::parse_published(&text)
            })
            .map_err(|e| format!("fetching the JWKS at {}: {e}", self.uri));
        let mut f = self.state.lock();
        match fetched {
            Ok(keys) => {
                let keys = Arc::new(keys);
                f.keys = Some((keys.clone(), Instant::now()));
                f.failed = None;
                Ok(keys)
            }
            Err(why) => {
                tracing::warn!("{why}");
                f.failed = Some((why.clone(), Instant::now()));
                f.keys.as_ref().map(|(k, _)| k.clone()).ok_or(why)
            }
        }
    }
}

/// The data plane's own key: it signs the caller's identity for the app
/// ([`portway_api::access::IDENTITY_HEADER`]), and its public half is published as a
/// JWKS so the app can check that signature.
pub struct Signer {
    kid: String,
    pair: signature::Ed25519KeyPair,
    jwks: String,
    /// Seals browser sessions and login state (OIDC): derived from the same key, so
    /// every edge and the xDS server open each other's cookies.
    seal: ring::aead::LessSafeKey,
    /// Identities signed lately, by a digest of their claims: signing each request anew
    /// cost a third of the edge's req/s with basic auth (an Ed25519 signature per request
    /// on 2 cores); one is reused for [`IDENTITY_REUSE_SECS`].
    identities: parking_lot::Mutex<HashMap<[u8; 32], (String, u64)>>,
}

/// How long a signed identity is reused: it is valid [`portway_api::access::IDENTITY_TTL_SECS`],
/// so an app always gets one with at least four minutes left.
pub const IDENTITY_REUSE_SECS: u64 = 60;
const IDENTITIES_CAP: usize = 16_384;

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A new Ed25519 key, as PKCS#8 DER.
    ///
    /// # Errors
    /// When the system has no randomness.
    pub fn generate() -> Result<Vec<u8>, String> {
        signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| "generating an Ed25519 key failed".into())
    }

    /// The signer of an Ed25519 PKCS#8 key.
    ///
    /// # Errors
    /// When the bytes are not one.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        let pair = signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))?;
        let public = pair.public_key().as_ref();
        let digest = ring::digest::digest(&ring::digest::SHA256, public);
        let kid = B64.encode(&digest.as_ref()[..12]);
        let jwks = serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
            "kid": kid, "x": B64.encode(public),
        }]})
        .to_string();
        let derived = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, der),
            b"portway session sealing v1",
        );
        let seal = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, derived.as_ref())
            .map(ring::aead::LessSafeKey::new)
            .map_err(|_| "deriving the session key failed".to_owned())?;
        Ok(Self {
            kid,
            pair,
            jwks,
            seal,
            identities: parking_lot::Mutex::default(),
        })
    }

    /// A JWT of `claims` stamped `iat` now and `exp` `ttl` later, or the same claims'
    /// token signed in the last [`IDENTITY_REUSE_SECS`].
    pub fn sign_identity(&self, mut claims: Value, ttl: u64) -> String {
        let now = now();
        let key: [u8; 32] =
            ring::digest::digest(&ring::digest::SHA256, claims.to_string().as_bytes())
                .as_ref()
                .try_into()
                .unwrap_or([0; 32]);
        if let Some((token, at)) = self.identities.lock().get(&key)
            && now.saturating_sub(*at) < IDENTITY_REUSE_SECS
        {
            return token.clone();
        }
        claims["iat"] = now.into();
        claims["exp"] = (now + ttl).into();
        let token = self.sign(&claims);
        let mut cache = self.identities.lock();
        if cache.len() >= IDENTITIES_CAP {
            cache.retain(|_, (_, at)| now.saturating_sub(*at) < IDENTITY_REUSE_SECS);
            if cache.len() >= IDENTITIES_CAP {
                cache.clear();
            }
        }
        cache.insert(key, (token.clone(), now));
        token
    }

    /// `plain` encrypted and authenticated (AES-256-GCM, a random nonce), bound to
    /// `context` (e.g. a cookie's name), as base64url.
    pub fn seal(&self, context: &str, plain: &[u8]) -> String {
        use ring::rand::SecureRandom as _;
        let mut nonce = [0u8; 12];
        // The system's randomness does not fail on the platforms Portway runs on; a
        // zero nonce would still be sealed, never reused on purpose.
        let _ = ring::rand::SystemRandom::new().fill(&mut nonce);
        let mut data = plain.to_vec();
        let sealed = self.seal.seal_in_place_append_tag(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(context.as_bytes()),
            &mut data,
        );
        if sealed.is_err() {
            return String::new();
        }
        B64.encode([&nonce[..], &data].concat())
    }

    /// What [`Signer::seal`] sealed with `context`; `None` when it was not sealed by this
    /// key for this context, or was changed.
    pub fn open(&self, context: &str, sealed: &str) -> Option<Vec<u8>> {
        let raw = B64.decode(sealed).ok()?;
        if raw.len() < 12 + 16 {
            return None;
        }
        let (nonce, data) = raw.split_at(12);
        let mut data = data.to_vec();
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let plain = self
            .seal
            .open_in_place(nonce, ring::aead::Aad::from(context.as_bytes()), &mut data)
            .ok()?;
        Some(plain.to_vec())
    }

    /// A compact JWS of `claims`.
    pub fn sign(&self, claims: &Value) -> String {
        let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": self.kid});
        let signed = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = self.pair.sign(signed.as_bytes());
        format!("{signed}.{}", B64.encode(sig.as_ref()))
    }

    /// The public key, as a JWKS.
    pub fn jwks(&self) -> &str {
        &self.jwks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn es256() -> (signature::EcdsaKeyPair, Value) {
        let rng = ring::rand::SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let der = signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = signature::EcdsaKeyPair::from_pkcs8(alg, der.as_ref(), &rng).unwrap();
        let p = pair.public_key().as_ref();
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "ec1",
            "x": B64.encode(&p[1..33]), "y": B64.encode(&p[33..])});
        (pair, jwk)
    }

    fn sign_es(pair: &signature::EcdsaKeyPair, header: &Value, claims: &Value) -> String {
        let signed = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = pair
            .sign(&ring::rand::SystemRandom::new(), signed.as_bytes())
            .unwrap();
        format!("{signed}.{}", B64.encode(sig.as_ref()))
    }

    #[test]
    fn tokens_verify_only_with_their_own_key_and_algorithm() {
        let (pair, jwk) = es256();
        let keys = Keys::parse(&json!({"keys": [jwk]}).to_string()).unwrap();
        let claims = json!({"iss": "https://id", "aud": ["app"], "exp": now() + 60, "sub": "ann"});
        let good = sign_es(&pair, &json!({"alg": "ES256", "kid": "ec1"}), &claims);
        let t = Token::parse(&good).unwrap();
        assert_eq!(t.verify(&keys), Ok(()));
        assert_eq!(t.check_claims("https://id", &["app".into()], now()), Ok(()));
        let reason = |token: &str| match Token::parse(token) {
            Err(e) => e.reason,
            Ok(t) => t.verify(&keys).err().map_or("ok", |e| e.reason),
        };
        // Another key with the same kid, a changed payload, an unknown kid, alg none
        // or HMAC, and critical extensions are all refused.
        let (other, _) = es256();
        assert_eq!(
            reason(&sign_es(
                &other,
                &json!({"alg": "ES256", "kid": "ec1"}),
                &claims
            )),
            "bad-signature"
        );
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged =
            B64.encode(json!({"iss": "https://id", "exp": now() + 60, "sub": "root"}).to_string());
        parts[1] = &forged;
        assert_eq!(reason(&parts.join(".")), "bad-signature");
        assert_eq!(
            reason(&sign_es(
                &pair,
                &json!({"alg": "ES256", "kid": "x"}),
                &claims
            )),
            "unknown-key"
        );
        assert_eq!(
            reason(&sign_es(
                &pair,
                &json!({"alg": "EdDSA", "kid": "ec1"}),
                &claims
            )),
            "unknown-key"
        );
        for alg in ["none", "HS256", "RS512"] {
            assert_eq!(
                reason(&sign_es(&pair, &json!({"alg": alg}), &claims)),
                "unsupported-alg"
            );
        }
        assert_eq!(
            reason(&sign_es(
                &pair,
                &json!({"alg": "ES256", "crit": ["b64"]}),
                &claims
            )),
            "unsupported-alg"
        );
        assert_eq!(reason("a.b"), "malformed");
        assert_eq!(reason(&"x".repeat(MAX_TOKEN_BYTES + 1)), "malformed");
        // No kid: any key of the algorithm is tried.
        assert_eq!(
            reason(&sign_es(&pair, &json!({"alg": "ES256"}), &claims)),
            "ok"
        );
    }

    #[test]
    fn claims_are_checked_for_issuer_audience_and_time() {
        let (pair, _) = es256();
        let check = |claims: Value, auds: &[&str]| {
            let token = sign_es(&pair, &json!({"alg": "ES256"}), &claims);
            let auds: Vec<String> = auds.iter().map(|s| (*s).to_owned()).collect();
            Token::parse(&token)
                .unwrap()
                .check_claims("https://id", &auds, 1_000_000)
                .err()
                .map_or("ok", |e| e.reason)
        };
        assert_eq!(
            check(json!({"iss": "https://id", "exp": 1_000_001}), &[]),
            "ok"
        );
        assert_eq!(
            check(json!({"iss": "https://id", "exp": 999_950}), &[]),
            "ok",
            "within the leeway"
        );
        assert_eq!(
            check(json!({"iss": "https://id", "exp": 999_000}), &[]),
            "expired"
        );
        assert_eq!(check(json!({"iss": "https://id"}), &[]), "expired");
        assert_eq!(
            check(
                json!({"iss": "https://id", "exp": 2_000_000, "nbf": 1_100_000}),
                &[]
            ),
            "not-yet-valid"
        );
        assert_eq!(
            check(json!({"iss": "https://evil", "exp": 2_000_000}), &[]),
            "wrong-issuer"
        );
        assert_eq!(
            check(
                json!({"iss": "https://id", "exp": 2_000_000, "aud": "b"}),
                &["a"]
            ),
            "wrong-audience"
        );
        assert_eq!(
            check(json!({"iss": "https://id", "exp": 2_000_000}), &["a"]),
            "wrong-audience"
        );
        assert_eq!(
            check(
                json!({"iss": "https://id", "exp": 2_000_000, "aud": ["x", "a"]}),
                &["a"]
            ),
            "ok"
        );
    }

    #[test]
    fn rs256_and_eddsa_verify_and_the_signer_publishes_its_key() {
        // RS256 with a fixed 2048-bit test key (ring cannot generate RSA keys).
        let der = B64.decode(RSA_TEST_KEY).unwrap();
        let pair = signature::RsaKeyPair::from_der(&der).unwrap();
        let c: signature::RsaPublicKeyComponents<Vec<u8>> = pair.public().into();
        let (n, e) = (&c.n, &c.e);
        let jwks = json!({"keys": [{"kty": "RSA", "kid": "r1", "alg": "RS256", "n": B64.encode(n), "e": B64.encode(e)}]});
        let keys = Keys::parse(&jwks.to_string()).unwrap();
        let signed = format!(
            "{}.{}",
            B64.encode(json!({"alg": "RS256", "kid": "r1"}).to_string()),
            B64.encode(json!({"iss": "i", "exp": now() + 60}).to_string())
        );
        let mut sig = vec![0; pair.public().modulus_len()];
        pair.sign(
            &signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            signed.as_bytes(),
            &mut sig,
        )
        .unwrap();
        let token = format!("{signed}.{}", B64.encode(&sig));
        assert_eq!(Token::parse(&token).unwrap().verify(&keys), Ok(()));
        // A published set keeps its usable keys beside ones of other types.
        let mixed = json!({"keys": [{"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"},
            {"kty": "oct", "k": "c2VjcmV0"}, jwks["keys"][0].clone()]});
        assert!(Keys::parse(&mixed.to_string()).is_err());
        assert_eq!(
            Keys::parse_published(&mixed.to_string()).unwrap().0.len(),
            1
        );
        // An RSA key marked for another algorithm is not used.
        let other = json!({"keys": [{"kty": "RSA", "alg": "RS512", "n": B64.encode(n), "e": B64.encode(e)}]});
        assert!(Keys::parse(&other.to_string()).is_err());

        let signer = Signer::from_pkcs8(&Signer::generate().unwrap()).unwrap();
        let token = signer.sign(&json!({"iss": "portway", "exp": now() + 60, "sub": "ann"}));
        let keys = Keys::parse(signer.jwks()).unwrap();
        let t = Token::parse(&token).unwrap();
        assert_eq!(t.verify(&keys), Ok(()));
        assert_eq!(t.claims["sub"], "ann");
        // The same identity is signed once a minute, not per request.
        let a = signer.sign_identity(json!({"sub": "ann"}), 300);
        assert_eq!(signer.sign_identity(json!({"sub": "ann"}), 300), a);
        assert_ne!(signer.sign_identity(json!({"sub": "bob"}), 300), a);
        // Sealed data opens only with the same key and context, and unchanged.
        let sealed = signer.seal("cookie-a", b"ann");
        assert_eq!(
            signer.open("cookie-a", &sealed).as_deref(),
            Some(&b"ann"[..])
        );
        assert_eq!(signer.open("cookie-b", &sealed), None);
        let other = Signer::from_pkcs8(&Signer::generate().unwrap()).unwrap();
        assert_eq!(other.open("cookie-a", &sealed), None);
        let mut bytes = B64.decode(&sealed).unwrap();
        bytes[14] ^= 1;
        assert_eq!(signer.open("cookie-a", &B64.encode(bytes)), None);
        // A private key is never published, and a JWKS holding one is refused.
        assert!(!signer.jwks().contains("\"d\""));
        let mut leaked: Value = serde_json::from_str(signer.jwks()).unwrap();
        leaked["keys"][0]["d"] = json!("AAAA");
        assert!(
            Keys::parse(&leaked.to_string())
                .unwrap_err()
                .contains("private key")
        );
    }

    #[test]
    fn claims_match_and_render_as_header_text() {
        let vals = ["admin".to_owned(), "true".to_owned()];
        assert!(claim_matches(&json!("admin"), &vals));
        assert!(claim_matches(&json!(["dev", "admin"]), &vals));
        assert!(claim_matches(&json!(true), &vals));
        assert!(!claim_matches(&json!(["dev"]), &vals));
        assert!(!claim_matches(&json!({"admin": 1}), &vals));
        assert_eq!(claim_text(&json!(["a", "b"])), "a,b");
        assert_eq!(claim_text(&json!(7)), "7");
    }

    /// A 2048-bit RSA key in PKCS#1 DER, base64url: a test fixture only.
    const RSA_TEST_KEY: &str = concat!(
        "MIIEowIBAAKCAQEApd2CUZWm-B5aN9BN3p0osh-cqwtjKJjO9fgzbeS9KtMpXhiZiAdcwPDRJ9IyVT7qoAZY4UOy",
        "x3v_IBovQ3Wr1UyTAjY7HOVcyrfoUPT891XqYbMMQxvviTo4pRnI1vjgzq84qy6a58pKMm2ILf6mwKfMZ7AprbM-",
        "y2Q8DAkpJ3ezZ0a7leIFN9KLvrzF9Tqs5ZZPdMOIwHlBzVjLehVsmcmjyJbrgD90RdqsZgoz5-9FbVf4nUPzCJzz",
        "Ly8xAwHTOTX4awZ-4wO5lf1XD2NYHogyf4jiSNBtZitbmoPOQtImmNxsvUfUa5RVuwlAZjGgX2bIHYZRgzjqqhHv",
        "Ff_1UQIDAQABAoIBABCwldTkxJzR3Q0hsjw0vywRPz_80Nj8a1LXy0EDE7_T6KU1v3kvGHe3o6wom_T09EHu8ZGV",
        "MM-e3ACcceYNWKGJZ3-A-njBYZFqaP-Ab1Xp-MAk9pZoILXDvIBsdEehWmmhuweKlH6_XbDuUZYjOh9HoytJ0B_Q",
        "2gA4UUx6vX_hg5OyWOuJ0gTRv_n90jQOFG95y0ScIz9ghT0ptSdO-TQu_3Z8wub2eM39OfLuFWS272sHVzwNgw0i",
        "G5sEl58DsupeVI0ISl2sODG2SpO9V42oE5ykxpB5RSpDoCqHhTnfq_W3BlwskIJn6Nhcz8y6YWsgRHijuLWiqszU",
        "Xy2_nPsCgYEA1vMi_9KvVb-KDrZBz0T1-jxY2IBqReh_MaGMjq8H0gqTqCz4skK-qK1rCKm_BoYGCr1gAGk7Y_4x",
        "fVEoq0RSGD4Q-S_hSMvhStWYsj0sdRUQA-RUnDMmy655lQ627K3P_g5EgQTyVoImliSIvpsqEXaP3xWa_WdCgiJD",
        "b4MmcbcCgYEAxYqji2WczF24PYiEbZ5_QjJdF_wJ6wgfdkLb7Y96g2-VfoyRB2zZaVfMmNci92QwTc7IJvdi_IcL",
        "wmCICm2jBP07NI5S6BoZ1s_TImdEj0NTcpxaj9VYC60Q2Vk111ZvJxITnlf3NbUVMJBI3w6gwa-ma4dby-70jCXv",
        "JVTSsTcCgYAPAH0q2at_EpUyHapOKwP36QpSYfQI2Qc3kYzb0H99O1u-2xSobFweLaxQuHgqnmQBj-IJZU7N1cni",
        "cy2hdm08X-iTW7IfgItCy9GSbw6RRV0OyHrXRAKrKIw3yQUfU6o2kwxY7N11CDRlOjuJAg9XlKzJ5xogIXrU1kta",
        "lw6x1QKBgQCZgdL1UFE4vtuddajzRme-GUUejk1mxzkrvWkKgqTB3sRdQv6wtnV81y221_fkJ4ch7766CSRy-L66",
        "nikZcXltNxv7C16B30aVF4sLARTV_4upVLdLbo6tBCBDxn-Ahzp5MiLsuY7xvXZp9rWqIMPrv4Ojq9w57cc74X6l",
        "k_TmoQKBgEo2MsSXJQv8P6P1Dh7eZzclLdbWy8N7bXMMKhP5oiAyWdRcOwAbF_a4Hwiiq52X9bQvD3CbLs1C9F5m",
        "TqotQzgQuK4oC1pDsbZjzlxTChNp8efwKxKoYnVGinYeta99BijqBhajSKPGVC_zMz--vVYNajYSplLJYVxNn7ld",
        "MzWn",
    );
}
