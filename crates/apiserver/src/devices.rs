//! Device identity, after the Kubernetes Node authorizer and NodeRestriction: each device
//! holds its own credential, bound to one Connector (by uid) and one NodeID.
//!
//! - An admin creates a short-lived, single-project **join token** (`pwj.<id>.<secret>`,
//!   default one use, one hour).
//! - The device asks for a challenge with it, signs `portway-join-v1` + the nonce, its
//!   project, connector name and NodeID with its iroh key (Ed25519), and exchanges the
//!   token for a **device credential** (`pwd.<secret>`). The server creates the Connector
//!   if it does not exist and binds the credential to its uid.
//! - With it the device may write only its own Connector (and only its own NodeID as
//!   `status.connectionDetails.publicKey.id`), its Lease (named after the connector), and
//!   the ConnectorAdvertisements, HTTPProxies and TCPProxies that point at its connector alone
//!   ([`check_write`]). People's tokens may not write a device's objects either.
//! - Deleting the Connector revokes the credential at once: every request re-checks the
//!   bound uid.
//!
//! All of it lives in the store, as Secrets in `portway-system` (as Kubernetes keeps its
//! bootstrap tokens in `kube-system`), so every API server replica on one etcd knows every
//! join token, challenge and credential: `join-token-<id>` (of type
//! `portway.dev/join-token`, whose `nonces` field holds its open challenges) and
//! `device-<hash>` (`portway.dev/device-credential`). Only SHA-256 hashes of secrets are
//! stored. What an earlier version kept in `portway.db`'s `join_tokens` and `devices`
//! tables is moved there on start, and the `join-nonce-<nonce>` Secrets (type
//! `portway.dev/join-nonce`) it made per challenge are swept once expired.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rusqlite::{Connection, OpenFlags};
use serde_json::{Value, json};

use crate::auth::{Namespaces, Role, User};
use crate::error::ApiError;
use crate::registry::{Res, registry};
use crate::store::{Store, Txn};

/// Ed25519 signatures are made over this prefix and the fields, newline-separated.
pub const JOIN_CONTEXT: &str = "portway-join-v1";
/// How long a challenge nonce may be answered.
const NONCE_TTL: Duration = Duration::from_secs(60);
/// Longest a join token may live.
pub const MAX_JOIN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Challenges of one join token in the last [`NONCE_TTL`], answered or not, past which
/// its challenges are refused (429): a rate limit per token (answering one does not make
/// room, so a holder cycling challenge and answer gets no more), which leaves the other
/// tokens theirs. They live in the token's Secret, so this also bounds its size (about 60
/// bytes a challenge); tokens are made by people, so all of them are bounded too.
const MAX_NONCES_PER_TOKEN: usize = 128;
/// Expired `join-nonce-*` Secrets (of an earlier version) removed per write: one etcd
/// transaction holds a bounded number of operations.
const SWEEP_PER_WRITE: usize = 32;
/// The join token Secret's field holding its open challenges: nonce → expiry (unix s).
const NONCES: &str = "nonces";

const SYSTEM: &str = portway_api::certificates::SYSTEM_NAMESPACE;
const JOIN_TOKEN: &str = "portway.dev/join-token";
const JOIN_NONCE: &str = "portway.dev/join-nonce";
const CREDENTIAL: &str = "portway.dev/device-credential";

/// What a device credential is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub ns: String,
    pub connector: String,
    pub connector_uid: String,
    /// Hex NodeID (the device's iroh public key).
    pub node_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error("moving device credentials from {path} into the store: {message}")]
    Migrate { path: String, message: String },
}

fn sha256_hex(s: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn random_hex(bytes: usize) -> String {
    let b: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex(&b)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The message a joining device signs.
pub fn join_message(nonce: &str, ns: &str, connector: &str, node_id: &str) -> String {
    format!("{JOIN_CONTEXT}\n{nonce}\n{ns}\n{connector}\n{node_id}")
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(http::StatusCode::UNAUTHORIZED, "Unauthorized", message)
}

fn secrets() -> Res {
    registry()
        .by_key("secrets")
        .unwrap_or_else(|| registry().namespaces())
}

/// A Secret of ours in `portway-system`: `fields` base64-encoded into `data`.
fn secret(name: &str, type_: &str, fields: &[(&str, &str)]) -> Value {
    let data: serde_json::Map<String, Value> = fields
        .iter()
        .map(|(k, v)| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(v.as_bytes());
            ((*k).to_owned(), Value::String(b64))
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": type_,
        "metadata": {"name": name, "namespace": SYSTEM,
            "labels": {portway_api::labels::MANAGED_BY: "portway-apiserver"}},
        "data": data,
    })
}

/// A field of a Secret of ours.
fn field(s: &Value, key: &str) -> Option<String> {
    let b64 = s["data"][key].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    String::from_utf8(bytes).ok()
}

fn is(s: &Value, type_: &str) -> bool {
    s["type"].as_str() == Some(type_)
}

/// `s` with one field of its `data` set.
fn with_field(s: &Value, key: &str, value: &str) -> Value {
    let mut s = s.clone();
    s["data"][key] = Value::String(base64::engine::general_purpose::STANDARD.encode(value));
    s
}

/// A join token Secret's challenges: nonce → expiry (unix s), negated once answered (a
/// spent challenge still counts against [`MAX_NONCES_PER_TOKEN`] until it would have
/// expired); expired ones may linger until the next change.
fn nonces(token: &Value) -> BTreeMap<String, i64> {
    field(token, NONCES)
        .and_then(|j| serde_json::from_str(&j).ok())
        .unwrap_or_default()
}

/// `token` holding `open` as its challenges.
fn with_nonces(token: &Value, open: &BTreeMap<String, i64>) -> Value {
    let json = serde_json::to_string(open).unwrap_or_default();
    with_field(token, NONCES, &json)
}

fn too_many(message: &str) -> ApiError {
    ApiError::new(
        http::StatusCode::TOO_MANY_REQUESTS,
        "TooManyRequests",
        message,
    )
}

/// A credential's Secret is named after its hash: found in one lookup per request.
fn credential_name(hash: &str) -> String {
    format!("device-{}", &hash[..40])
}

fn binding(s: &Value) -> Option<(String, Binding)> {
    Some((
        field(s, "token-sha256")?,
        Binding {
            ns: field(s, "namespace")?,
            connector: field(s, "connector")?,
            connector_uid: field(s, "connector-uid")?,
            node_id: field(s, "node-id")?,
        },
    ))
}

/// A join token, checked: its id and project.
struct JoinToken {
    id: String,
    ns: String,
}

/// The join token `token` names, if it is known, unexpired and not used up.
fn join_token(
    txn_or_store: &dyn Fn(&str) -> Option<Arc<Value>>,
    token: &str,
) -> Result<JoinToken, ApiError> {
    let bad = || {
        unauthorized(
            "the join token is unknown, expired or used up; create a new one with `portway token create`",
        )
    };
    let mut parts = token.trim().splitn(3, '.');
    let (Some("pwj"), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let s = txn_or_store(&format!("join-token-{id}"))
        .filter(|s| is(s, JOIN_TOKEN))
        .ok_or_else(bad)?;
    let stored = field(&s, "secret-sha256").unwrap_or_default();
    // Digests are compared, so timing says nothing of the secret; still, no early exit.
    let given = sha256_hex(secret);
    let matches = given.len() == stored.len()
        && given
            .bytes()
            .zip(stored.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    let number = |k| {
        field(&s, k)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    };
    if !matches || number("expires") <= unix_now() || number("uses-left") <= 0 {
        return Err(bad());
    }
    Ok(JoinToken {
        id: id.to_owned(),
        ns: field(&s, "namespace").unwrap_or_default(),
    })
}

/// The device credentials and join tokens, kept in the store.
pub struct Devices {
    store: Store,
    /// Credentials whose removal is under way: several requests noticing the same stale
    /// one start one removal.
    removing: Arc<parking_lot::Mutex<HashSet<String>>>,
}

impl Devices {
    /// On `store`; what an earlier version kept in the SQLite file `legacy` (its
    /// `join_tokens` and `devices` tables) is moved into it first.
    ///
    /// # Errors
    /// When the old tables cannot be read or the store written.
    pub async fn open(store: Store, legacy: Option<&Path>) -> Result<Self, DevicesError> {
        let devices = Self {
            store,
            removing: Arc::default(),
        };
        if let Some(path) = legacy.filter(|p| p.exists()) {
            devices.migrate(path).await?;
        }
        // An earlier version kept a Secret per challenge; what it left behind goes.
        loop {
            match devices.sweep_nonce_secrets().await {
                Ok(n) if n == SWEEP_PER_WRITE => {}
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e.message, "sweeping expired join-nonce Secrets");
                    break;
                }
            }
        }
        Ok(devices)
    }

    /// Removes up to [`SWEEP_PER_WRITE`] expired `join-nonce-*` Secrets (an earlier
    /// version's challenges) in one write; returns how many.
    async fn sweep_nonce_secrets(&self) -> Result<usize, ApiError> {
        let now = unix_now();
        let expired = move |s: &Value| {
            is(s, JOIN_NONCE)
                && field(s, "expires")
                    .and_then(|e| e.parse::<i64>().ok())
                    .is_none_or(|e| e <= now)
        };
        let names: Vec<String> = self
            .store
            .list(secrets(), Some(SYSTEM))
            .1
            .iter()
            .filter(|s| expired(s))
            .filter_map(|s| s["metadata"]["name"].as_str().map(str::to_owned))
            .take(SWEEP_PER_WRITE)
            .collect();
        if names.is_empty() {
            return Ok(0);
        }
        self.store
            .write(move |txn| {
                let mut removed = 0;
                for name in &names {
                    // Looked at again: it may have gone (or changed) since the list.
                    if txn
                        .get(secrets(), SYSTEM, name)
                        .is_some_and(|s| expired(&s))
                    {
                        txn.remove(secrets(), SYSTEM, name);
                        removed += 1;
                    }
                }
                Ok(removed)
            })
            .await
    }

    async fn migrate(&self, path: &Path) -> Result<(), DevicesError> {
        let err = |message: String| DevicesError::Migrate {
            path: path.display().to_string(),
            message,
        };
        let db = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(|e| err(e.to_string()))?;
        let has = |table: &str| {
            db.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get::<_, i64>(0),
            )
            .unwrap_or(0)
                > 0
        };
        let mut objects = Vec::new();
        if has("join_tokens") {
            let mut stmt = db
                .prepare("SELECT id, secret_sha256, namespace, expires, uses_left FROM join_tokens")
                .map_err(|e| err(e.to_string()))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })
                .map_err(|e| err(e.to_string()))?;
            for row in rows {
                let (id, hash, ns, expires, uses) = row.map_err(|e| err(e.to_string()))?;
                objects.push(secret(
                    &format!("join-token-{id}"),
                    JOIN_TOKEN,
                    &[
                        ("secret-sha256", &hash),
                        ("namespace", &ns),
                        ("expires", &expires.to_string()),
                        ("uses-left", &uses.to_string()),
                    ],
                ));
            }
        }
        if has("devices") {
            let mut stmt = db
                .prepare("SELECT token_sha256, namespace, connector, connector_uid, node_id, created FROM devices")
                .map_err(|e| err(e.to_string()))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, i64>(5)?,
                    ))
                })
                .map_err(|e| err(e.to_string()))?;
            for row in rows {
                let (hash, ns, connector, uid, node, created) =
                    row.map_err(|e| err(e.to_string()))?;
                objects.push(secret(
                    &credential_name(&hash),
                    CREDENTIAL,
                    &[
                        ("token-sha256", &hash),
                        ("namespace", &ns),
                        ("connector", &connector),
                        ("connector-uid", &uid),
                        ("node-id", &node),
                        ("created", &created.to_string()),
                    ],
                ));
            }
        }
        if objects.is_empty() {
            return Ok(());
        }
        let n = objects.len();
        let res = secrets();
        // A part at a time (one etcd transaction holds so much); moving again what was
        // moved changes nothing, so a start interrupted midway just runs again.
        for part in objects.chunks(SWEEP_PER_WRITE) {
            let part = part.to_vec();
            self.store
                .write(move |txn| {
                    for o in &part {
                        let name = o["metadata"]["name"].as_str().unwrap_or_default();
                        if txn.get(res, SYSTEM, name).is_none() {
                            txn.put(res, o.clone());
                        }
                    }
                    Ok(())
                })
                .await
                .map_err(|e| err(e.message))?;
        }
        // Moved: the old rows go, so a later start does not bring back what was revoked.
        db.execute_batch("DELETE FROM join_tokens; DELETE FROM devices;")
            .map_err(|e| err(e.to_string()))?;
        tracing::info!(moved = n, path = %path.display(), "device credentials and join tokens moved into the store");
        Ok(())
    }

    fn lookup(&self) -> impl Fn(&str) -> Option<Arc<Value>> + '_ {
        |name| self.store.get(secrets(), SYSTEM, name)
    }

    /// Creates a join token for `ns`.
    ///
    /// # Errors
    /// 500 when it cannot be stored.
    pub async fn create_join_token(
        &self,
        ns: &str,
        ttl: Duration,
        uses: u32,
    ) -> Result<(String, i64), ApiError> {
        let id = random_hex(4);
        let token_secret = random_hex(16);
        let expires = unix_now() + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
        let object = secret(
            &format!("join-token-{id}"),
            JOIN_TOKEN,
            &[
                ("secret-sha256", &sha256_hex(&token_secret)),
                ("namespace", ns),
                ("expires", &expires.to_string()),
                ("uses-left", &uses.to_string()),
            ],
        );
        self.store
            .write(move |txn| Ok(txn.put(secrets(), object.clone())))
            .await?;
        Ok((format!("pwj.{id}.{token_secret}"), expires))
    }

    /// Whether `token` looks like a join token (as opposed to a credential).
    pub fn is_join_token(token: &str) -> bool {
        token.starts_with("pwj.")
    }

    /// A nonce for the holder of a valid join token to sign, and the token's project.
    ///
    /// # Errors
    /// 401 for an unknown, expired or used-up token; 429 with too many joins in progress
    /// with this token in the last minute ([`MAX_NONCES_PER_TOKEN`]).
    pub async fn challenge(&self, token: &str) -> Result<(String, String), ApiError> {
        let t = join_token(&self.lookup(), token)?;
        let nonce = random_hex(16);
        let expires = unix_now() + i64::try_from(NONCE_TTL.as_secs()).unwrap_or(60);
        let name = format!("join-token-{}", t.id);
        let added = nonce.clone();
        self.store
            .write(move |txn| {
                // The token's Secret alone: one challenge is one change of it.
                let stored = txn
                    .get(secrets(), SYSTEM, &name)
                    .filter(|s| is(s, JOIN_TOKEN))
                    .ok_or_else(|| unauthorized("the join token is gone"))?;
                let now = unix_now();
                let mut open = nonces(&stored);
                // Its expired challenges go as new ones come; answered ones count until
                // they would have expired.
                open.retain(|_, e| e.abs() > now);
                if open.len() >= MAX_NONCES_PER_TOKEN {
                    return Err(too_many(
                        "too many joins in progress with this join token; try again shortly",
                    ));
                }
                open.insert(added.clone(), expires);
                txn.put(secrets(), with_nonces(&stored, &open));
                Ok(())
            })
            .await?;
        Ok((nonce, t.ns))
    }

    /// Checks a join: the token, the nonce it was given (spent, whatever the outcome), and
    /// the signature by the key whose public half is `node_id`. Returns the project; the
    /// caller then binds the connector with [`Devices::bind`].
    ///
    /// # Errors
    /// 401 for a bad token, nonce or signature; 400 for a malformed NodeID or signature.
    pub async fn verify_join(&self, req: &JoinRequest) -> Result<String, ApiError> {
        let t = join_token(&self.lookup(), &req.join_token)?;
        let name = format!("join-token-{}", t.id);
        let nonce = req.nonce.clone();
        let nonce_ok = self
            .store
            .write(move |txn| {
                let Some(stored) = txn
                    .get(secrets(), SYSTEM, &name)
                    .filter(|s| is(s, JOIN_TOKEN))
                else {
                    return Ok(false);
                };
                let mut open = nonces(&stored);
                let now = unix_now();
                // An unknown, spent or expired nonce changes nothing; an open one is
                // spent (kept, negated, until it would have expired).
                let Some(expires) = open.get_mut(&nonce).filter(|e| **e > now) else {
                    return Ok(false);
                };
                *expires = -*expires;
                open.retain(|_, e| e.abs() > now);
                txn.put(secrets(), with_nonces(&stored, &open));
                Ok(true)
            })
            .await?;
        if !nonce_ok {
            return Err(unauthorized(
                "the challenge nonce is unknown or expired; ask for a new one",
            ));
        }
        let key = unhex(&req.node_id)
            .filter(|k| k.len() == 32)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "nodeId: must be 64 hex digits (the device's iroh public key)",
                )
            })?;
        // A key of small order (all zeros, say) verifies signatures nobody made: it would
        // bind a credential to a NodeID no device holds.
        let usable = <[u8; 32]>::try_from(key.as_slice())
            .ok()
            .and_then(|k| ed25519_dalek::VerifyingKey::from_bytes(&k).ok())
            .is_some_and(|k| !k.is_weak());
        if !usable {
            return Err(ApiError::bad_request(
                "nodeId: not a usable Ed25519 public key (a point of small order, or none at all)",
            ));
        }
        let sig = unhex(&req.signature)
            .filter(|s| s.len() == 64)
            .ok_or_else(|| ApiError::bad_request("signature: must be 128 hex digits (Ed25519)"))?;
        let msg = join_message(&req.nonce, &t.ns, &req.connector, &req.node_id);
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &key)
            .verify(msg.as_bytes(), &sig)
            .map_err(|_| unauthorized("the signature does not match the NodeID: the device must prove it holds the key"))?;
        Ok(t.ns)
    }

    /// Binds a new credential to the connector and spends one use of the join token, in
    /// one transaction. A connector already bound to a credential of the same NodeID is
    /// re-bound (a device that lost its credential file); of another NodeID, refused.
    ///
    /// # Errors
    /// 409 when the connector belongs to another device.
    pub async fn bind(&self, join_token_text: &str, b: Binding) -> Result<String, ApiError> {
        let credential = format!("pwd.{}", random_hex(32));
        let hash = sha256_hex(&credential);
        let token = join_token_text.to_owned();
        self.store
            .write(move |txn| {
                let lookup = |name: &str| txn.get(secrets(), SYSTEM, name);
                let t = join_token(&lookup, &token)?;
                let bound = bindings(txn)
                    .into_iter()
                    .filter(|(_, _, o)| o.ns == b.ns && o.connector == b.connector)
                    .collect::<Vec<_>>();
                // A binding to an older Connector of that name (deleted since) is stale.
                if bound
                    .iter()
                    .any(|(_, _, o)| o.connector_uid == b.connector_uid && o.node_id != b.node_id)
                {
                    return Err(ApiError::new(
                        http::StatusCode::CONFLICT,
                        "AlreadyExists",
                        format!(
                            "connector {} in project {} belongs to another device; delete the Connector to free the name, or join with another name",
                            b.connector, b.ns
                        ),
                    ));
                }
                let stored = txn
                    .get(secrets(), SYSTEM, &format!("join-token-{}", t.id))
                    .ok_or_else(|| unauthorized("the join token is used up"))?;
                let left = field(&stored, "uses-left")
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0);
                txn.put(
                    secrets(),
                    with_field(&stored, "uses-left", &(left - 1).to_string()),
                );
                for (name, _, _) in &bound {
                    txn.remove(secrets(), SYSTEM, name);
                }
                txn.put(
                    secrets(),
                    secret(
                        &credential_name(&hash),
                        CREDENTIAL,
                        &[
                            ("token-sha256", &hash),
                            ("namespace", &b.ns),
                            ("connector", &b.connector),
                            ("connector-uid", &b.connector_uid),
                            ("node-id", &b.node_id),
                            ("created", &unix_now().to_string()),
                        ],
                    ),
                );
                Ok(())
            })
            .await?;
        Ok(credential)
    }

    /// The device a `pwd.` credential names, if its Connector still exists with the
    /// bound uid; a credential whose Connector is gone is revoked on the spot.
    pub fn authenticate(
        &self,
        token: &str,
        connector_uid: impl Fn(&str, &str) -> Option<String>,
    ) -> Option<Arc<User>> {
        if !token.starts_with("pwd.") {
            return None;
        }
        let hash = sha256_hex(token);
        let name = credential_name(&hash);
        let s = self.store.get(secrets(), SYSTEM, &name)?;
        let (stored, b) = binding(&s).filter(|_| is(&s, CREDENTIAL))?;
        if stored != hash {
            return None;
        }
        if connector_uid(&b.ns, &b.connector).as_deref() != Some(b.connector_uid.as_str()) {
            self.forget(&name, &b);
            return None;
        }
        Some(Arc::new(User {
            name: format!("system:connector:{}:{}", b.ns, b.connector),
            roles: vec![Role::Agent],
            namespaces: Namespaces::Only(vec![b.ns.clone()]),
            device: Some(b),
        }))
    }

    /// Forgets one credential (its Connector is gone). Only that one: a device that has
    /// joined again since holds a new credential for the same name, which a late request
    /// with the old one must not revoke. Returns whether this call started the removal
    /// (not when one is under way already).
    fn forget(&self, name: &str, b: &Binding) -> bool {
        if !self.removing.lock().insert(name.to_owned()) {
            return false;
        }
        tracing::info!(project = %b.ns, connector = %b.connector, "device credential revoked: its connector is gone");
        let store = self.store.clone();
        let removing = self.removing.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let target = name.clone();
            let removed = store
                .write(move |txn| Ok(txn.remove(secrets(), SYSTEM, &target)))
                .await;
            if let Err(e) = removed {
                tracing::warn!(error = %e.message, "removing a revoked device credential");
            }
            // Gone from the store (or failed, to be tried by the next request).
            removing.lock().remove(&name);
        });
        true
    }
}

/// Every credential's Secret name, hash and binding, as `txn` sees them.
fn bindings(txn: &Txn<'_>) -> Vec<(String, String, Binding)> {
    txn.list(secrets(), Some(SYSTEM))
        .into_iter()
        .filter(|s| is(s, CREDENTIAL))
        .filter_map(|s| {
            let (hash, b) = binding(&s)?;
            Some((s["metadata"]["name"].as_str()?.to_owned(), hash, b))
        })
        .collect()
}

/// The NodeID of the device bound to a connector, if any, as `txn` sees it.
pub fn bound(txn: &Txn<'_>, ns: &str, connector: &str) -> Option<String> {
    bindings(txn)
        .into_iter()
        .find(|(_, _, b)| b.ns == ns && b.connector == connector)
        .map(|(_, _, b)| b.node_id)
}

/// `POST /portway/v1/join`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinRequest {
    pub join_token: String,
    pub connector: String,
    #[serde(default)]
    pub connector_class_name: Option<String>,
    pub node_id: String,
    pub nonce: String,
    pub signature: String,
}

/// The connector an object of a device-owned kind belongs to: a Connector's or Lease's
/// own name, an advertisement's `spec.connectorRef.name`; for an HTTPProxy or a TCPProxy,
/// every connector its backends name (a selector backend yields `None`: it could reach
/// any).
fn owners(res: Res, obj: &Value) -> Option<Vec<String>> {
    let s = |v: &Value| v.as_str().map(str::to_owned);
    match res.kind {
        "Connector" | "Lease" => Some(vec![s(&obj["metadata"]["name"])?]),
        "ConnectorAdvertisement" => Some(vec![s(&obj["spec"]["connectorRef"]["name"])?]),
        "HTTPProxy" => obj["spec"]["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r["backends"].as_array().into_iter().flatten())
            .map(|b| s(&b["connector"]["name"]))
            .collect(),
        "TCPProxy" => obj["spec"]["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| s(&b["connector"]["name"]))
            .collect(),
        _ => Some(Vec::new()),
    }
}

/// 403 in Kubernetes' words: `<resource> is forbidden: User "<name>" <why>`.
fn forbidden(res: Res, user: &User, why: &str) -> ApiError {
    ApiError::forbidden(format!(
        "{} is forbidden: User \"{}\" {why}",
        res.key(),
        user.name
    ))
}

/// A device's AccessPolicies and their htpasswd Secrets (the one-liner's `--basic-auth`,
/// `--allow-ip`, ...): labelled `portway.dev/connector` with its own connector, before and
/// after; a policy names only existing HTTPProxies whose backends all name that connector
/// (the operator holds a labelled policy to the same rule, for proxies that change hands
/// later); a Secret is of type `portway.dev/htpasswd` only. People with the agent role
/// write neither: whom a proxy admits is the device's word or an admin's.
fn check_guard(
    txn: &Txn<'_>,
    user: &User,
    res: Res,
    ns: &str,
    old: Option<&Value>,
    new: Option<&Value>,
) -> Result<(), ApiError> {
    use portway_api::access::{CONNECTOR_LABEL, HTPASSWD_TYPE};
    let forbid = |why: String| Err(forbidden(res, user, &why));
    let Some(me) = &user.device else {
        return forbid(format!(
            "may not write {}: only admins and devices (for their own proxies) do",
            res.plural
        ));
    };
    for obj in old.into_iter().chain(new) {
        let label = obj["metadata"]["labels"][CONNECTOR_LABEL].as_str();
        if label != Some(me.connector.as_str()) {
            return forbid(format!(
                "may write only {} labelled {CONNECTOR_LABEL}={} (its own connector), not {}",
                res.plural,
                me.connector,
                label.unwrap_or("unlabelled ones")
            ));
        }
        if res.kind == "Secret" && obj["type"].as_str() != Some(HTPASSWD_TYPE) {
            return forbid(format!(
                "may write only Secrets of type {HTPASSWD_TYPE} (basic auth users)"
            ));
        }
    }
    let Some(new) = new.filter(|_| res.kind == "AccessPolicy") else {
        return Ok(());
    };
    let proxies = crate::registry::registry()
        .by_key("httpproxies.networking.datumapis.com")
        .ok_or_else(|| ApiError::internal("no HTTPProxy kind"))?;
    // The Secrets it reads must be the device's own too: another's users would let the
    // device's hostname guess their passwords, and an OIDC client secret would be sent
    // to a provider of the device's choosing.
    let secrets = crate::registry::registry()
        .by_key("secrets")
        .ok_or_else(|| ApiError::internal("no Secret kind"))?;
    let spec = &new["spec"];
    for (field, name) in [
        (
            "basicAuth.secretRef",
            &spec["basicAuth"]["secretRef"]["name"],
        ),
        (
            "oidc.clientSecretRef",
            &spec["oidc"]["clientSecretRef"]["name"],
        ),
        (
            "jwt.jwks.secretRef",
            &spec["jwt"]["jwks"]["secretRef"]["name"],
        ),
    ] {
        let Some(name) = name.as_str() else { continue };
        let own = txn.get(secrets, ns, name).is_some_and(|s| {
            s["metadata"]["labels"][CONNECTOR_LABEL].as_str() == Some(me.connector.as_str())
        });
        if !own {
            return forbid(format!(
                "may name in {field} only a Secret labelled {CONNECTOR_LABEL}={} (written first); {name:?} is not one",
                me.connector
            ));
        }
    }
    for t in new["spec"]["targetRefs"].as_array().into_iter().flatten() {
        let name = t["name"].as_str().unwrap_or_default();
        let mine = txn.get(proxies, ns, name).is_some_and(|p| {
            owners(proxies, &p)
                .is_some_and(|l| !l.is_empty() && l.iter().all(|c| *c == me.connector))
        });
        if !mine {
            return forbid(format!(
                "may guard only its own connector's HTTPProxies ({}); {name:?} is not one",
                me.connector
            ));
        }
    }
    Ok(())
}

/// NodeRestriction: what a write may do given who makes it. `old`/`new` are the stored
/// and the resulting object (`new` is `None` for a delete).
///
/// # Errors
/// 403 naming the rule.
pub fn check_write(
    txn: &Txn<'_>,
    user: &User,
    res: Res,
    ns: &str,
    old: Option<&Value>,
    new: Option<&Value>,
) -> Result<(), ApiError> {
    let forbid = |why: String| Err(forbidden(res, user, &why));
    // A device tells only its own story: events about its own Connector.
    if res.kind == "Event"
        && let Some(me) = &user.device
    {
        for obj in old.into_iter().chain(new) {
            let about = obj.get("regarding").or_else(|| obj.get("involvedObject"));
            let kind = about.and_then(|a| a["kind"].as_str()).unwrap_or_default();
            let name = about.and_then(|a| a["name"].as_str()).unwrap_or_default();
            let elsewhere = about
                .and_then(|a| a["namespace"].as_str())
                .is_some_and(|n| n != ns);
            let related = obj.get("related").is_some_and(|r| !r.is_null());
            if kind != "Connector" || name != me.connector || elsewhere || related {
                return forbid(format!(
                    "cannot record events about {kind} {name}: a device records events only about its own connector {}",
                    me.connector
                ));
            }
        }
        return Ok(());
    }
    if matches!(res.kind, "AccessPolicy" | "Secret")
        && !user
            .roles
            .iter()
            .any(|r| matches!(r, Role::Admin | Role::Operator))
    {
        return check_guard(txn, user, res, ns, old, new);
    }
    if !matches!(
        res.kind,
        "Connector" | "Lease" | "ConnectorAdvertisement" | "HTTPProxy" | "TCPProxy"
    ) {
        return Ok(());
    }
    let objects = old.into_iter().chain(new);
    if let Some(me) = &user.device {
        for obj in objects {
            match owners(res, obj) {
                Some(list) if !list.is_empty() && list.iter().all(|c| *c == me.connector) => {}
                Some(list) => {
                    let other = list
                        .iter()
                        .find(|c| **c != me.connector)
                        .map_or("none", String::as_str);
                    return forbid(format!(
                        "cannot write objects of connector {other}: a device writes only those of its own connector {}",
                        me.connector
                    ));
                }
                None => {
                    return forbid(format!(
                        "cannot write a proxy that selects connectors: a device names its own connector {} (by name)",
                        me.connector
                    ));
                }
            }
        }
        if res.kind == "Connector"
            && let Some(id) =
                new.and_then(|n| n["status"]["connectionDetails"]["publicKey"]["id"].as_str())
            && !id.eq_ignore_ascii_case(&me.node_id)
        {
            return forbid(format!(
                "may only report its own NodeID {} as status.connectionDetails.publicKey.id, not {id}",
                me.node_id
            ));
        }
        if res.kind == "Connector" && new.is_none() {
            return forbid(
                "may not delete its own connector; an admin revokes a device by deleting it".into(),
            );
        }
        return Ok(());
    }
    if user
        .roles
        .iter()
        .any(|r| matches!(r, Role::Admin | Role::Operator))
        || matches!(res.kind, "HTTPProxy" | "TCPProxy")
    {
        return Ok(());
    }
    // People with the agent role keep managing connectors that no device owns.
    for obj in objects {
        for c in owners(res, obj).into_iter().flatten() {
            if bound(txn, ns, &c).is_some() {
                return forbid(format!(
                    "may not write objects of connector {c}: it belongs to a joined device, which alone writes them"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(key: &ring::signature::Ed25519KeyPair, msg: &str) -> String {
        hex(key.sign(msg.as_bytes()).as_ref())
    }

    fn keypair(seed: u8) -> (ring::signature::Ed25519KeyPair, String) {
        let k = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap();
        let id = hex(ring::signature::KeyPair::public_key(&k).as_ref());
        (k, id)
    }

    async fn devices(dir: &Path) -> (Store, Devices) {
        let store = Store::open(&dir.join("db"), 100).unwrap();
        let d = Devices::open(store.clone(), None).await.unwrap();
        (store, d)
    }

    fn binding(connector: &str, uid: &str, id: &str) -> Binding {
        Binding {
            ns: "p1".into(),
            connector: connector.into(),
            connector_uid: uid.into(),
            node_id: id.into(),
        }
    }

    /// Every change to the store since revision `rv`: (type, name).
    fn changes_since(store: &Store, rv: u64) -> Vec<(crate::store::EventType, String)> {
        store
            .events_after(rv)
            .unwrap()
            .iter()
            .map(|e| (e.type_, e.key.name.clone()))
            .collect()
    }

    fn token_id(token: &str) -> &str {
        token.split('.').nth(1).unwrap()
    }

    /// An earlier version's challenge Secret, expired or not.
    async fn put_old_nonce(store: &Store, n: usize, expires: i64) {
        let object = secret(
            &format!("join-nonce-{n:04}"),
            JOIN_NONCE,
            &[("join-token", "abcd"), ("expires", &expires.to_string())],
        );
        store
            .write(move |txn| Ok(txn.put(secrets(), object.clone())))
            .await
            .unwrap();
    }

    /// A challenge and its answer each change their token's Secret and nothing else: no
    /// Secret made and deleted per join for every Secret watcher to see, and nothing else
    /// in `portway-system` looked at or swept.
    #[tokio::test]
    async fn a_challenge_and_its_answer_change_only_their_tokens_secret() {
        use crate::store::EventType::Modified;
        let dir = tempfile::tempdir().unwrap();
        let (store, d) = devices(dir.path()).await;
        let (token, _) = d
            .create_join_token("p1", Duration::from_secs(60), 1)
            .await
            .unwrap();
        let token_secret = format!("join-token-{}", token_id(&token));
        put_old_nonce(&store, 1, 0).await;
        let rv = store.revision();
        let (nonce, _) = d.challenge(&token).await.unwrap();
        assert_eq!(
            changes_since(&store, rv),
            vec![(Modified, token_secret.clone())]
        );
        let (key, id) = keypair(1);
        let mut req = JoinRequest {
            join_token: token.clone(),
            connector: "laptop".into(),
            connector_class_name: None,
            node_id: id.clone(),
            nonce: "0".repeat(32),
            signature: sign(&key, &join_message(&nonce, "p1", "laptop", &id)),
        };
        let rv = store.revision();
        assert_eq!(d.verify_join(&req).await.unwrap_err().code, 401);
        assert_eq!(changes_since(&store, rv), vec![], "an unknown nonce");
        req.nonce = nonce;
        assert_eq!(d.verify_join(&req).await.unwrap(), "p1");
        assert_eq!(changes_since(&store, rv), vec![(Modified, token_secret)]);
        assert!(
            store.get(secrets(), SYSTEM, "join-nonce-0001").is_some(),
            "another's Secret is not the challenge's business"
        );
    }

    /// The holder of one join token cannot use up the challenges of the others, nor get
    /// more by answering them (even with a bad signature): answered ones count until they
    /// would have expired.
    #[tokio::test]
    async fn one_token_at_its_limit_leaves_the_others_their_challenges() {
        let dir = tempfile::tempdir().unwrap();
        let (store, d) = devices(dir.path()).await;
        let new_token = || d.create_join_token("p1", Duration::from_secs(60), 1);
        let (a, _) = new_token().await.unwrap();
        let (b, _) = new_token().await.unwrap();
        let (_, id) = keypair(1);
        for _ in 0..MAX_NONCES_PER_TOKEN {
            let (nonce, _) = d.challenge(&a).await.unwrap();
            // Answered with a bad signature: spent, and still counted.
            let req = JoinRequest {
                join_token: a.clone(),
                connector: "x".into(),
                connector_class_name: None,
                node_id: id.clone(),
                nonce: nonce.clone(),
                signature: "00".repeat(64),
            };
            assert_eq!(d.verify_join(&req).await.unwrap_err().code, 401);
            // Spent: the same nonce again is unknown.
            assert!(
                d.verify_join(&req)
                    .await
                    .unwrap_err()
                    .message
                    .contains("unknown")
            );
        }
        for _ in 0..3 {
            assert_eq!(d.challenge(&a).await.unwrap_err().code, 429);
        }
        d.challenge(&b).await.expect("another token's challenge");
        // Expired challenges make room again.
        let name = format!("join-token-{}", token_id(&a));
        store
            .write(move |txn| {
                let s = txn.get(secrets(), SYSTEM, &name).unwrap();
                let mut open = nonces(&s);
                open.values_mut().for_each(|e| *e = e.signum());
                Ok(txn.put(secrets(), with_nonces(&s, &open)))
            })
            .await
            .unwrap();
        d.challenge(&a).await.expect("room once the others expired");
        let s = store
            .get(secrets(), SYSTEM, &format!("join-token-{}", token_id(&a)))
            .unwrap();
        assert_eq!(nonces(&s).len(), 1, "expired challenges are dropped");
    }

    /// An earlier version's challenge Secrets go once expired, a bounded number per write.
    #[tokio::test]
    async fn old_challenge_secrets_are_swept_a_few_per_write() {
        let dir = tempfile::tempdir().unwrap();
        let (store, d) = devices(dir.path()).await;
        for n in 0..SWEEP_PER_WRITE + 8 {
            put_old_nonce(&store, n, 0).await;
        }
        put_old_nonce(&store, 9999, unix_now() + 60).await;
        assert_eq!(d.sweep_nonce_secrets().await.unwrap(), SWEEP_PER_WRITE);
        assert_eq!(d.sweep_nonce_secrets().await.unwrap(), 8);
        assert_eq!(d.sweep_nonce_secrets().await.unwrap(), 0);
        assert!(
            store.get(secrets(), SYSTEM, "join-nonce-9999").is_some(),
            "an open challenge stays"
        );
        // On start, every expired one goes, in as many writes as it takes.
        for n in 0..SWEEP_PER_WRITE * 2 + 1 {
            put_old_nonce(&store, n, 0).await;
        }
        let rv = store.revision();
        Devices::open(store.clone(), None).await.unwrap();
        let after = store.revision();
        let old = store
            .list(secrets(), Some(SYSTEM))
            .1
            .iter()
            .filter(|s| is(s, JOIN_NONCE))
            .count();
        assert_eq!(old, 1);
        assert_eq!(after - rv, u64::try_from(SWEEP_PER_WRITE * 2 + 1).unwrap());
    }

    /// Requests that notice the same stale credential at once start one removal.
    #[tokio::test]
    async fn a_stale_credential_is_removed_once() {
        let dir = tempfile::tempdir().unwrap();
        let (store, d) = devices(dir.path()).await;
        let (token, _) = d
            .create_join_token("p1", Duration::from_secs(60), 1)
            .await
            .unwrap();
        let (_, id) = keypair(1);
        let b = binding("laptop", "u1", &id);
        let cred = d.bind(&token, b.clone()).await.unwrap();
        let name = credential_name(&sha256_hex(&cred));
        assert!(d.forget(&name, &b));
        assert!(!d.forget(&name, &b), "one removal is under way already");
        assert!(d.authenticate(&cred, |_, _| Some("u2".into())).is_none());
        let mut changed = store.subscribe();
        tokio::time::timeout(
            Duration::from_secs(10),
            changed.wait_for(|_| store.get(secrets(), SYSTEM, &name).is_none()),
        )
        .await
        .unwrap()
        .unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !d.removing.lock().is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("done, the credential is no longer being removed");
    }

    /// A device that joined again (its connector was collected and made anew) keeps its
    /// new credential when a late request still carries the old one.
    #[tokio::test]
    async fn a_stale_credential_revokes_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (store, d) = devices(dir.path()).await;
        let (token, _) = d
            .create_join_token("p1", Duration::from_secs(60), 2)
            .await
            .unwrap();
        let (_, id) = keypair(1);
        let old = d.bind(&token, binding("laptop", "u1", &id)).await.unwrap();
        let new = d.bind(&token, binding("laptop", "u2", &id)).await.unwrap();
        let now = |_: &str, _: &str| Some("u2".to_owned());
        assert!(d.authenticate(&old, now).is_none());
        assert!(
            d.authenticate(&new, now).is_some(),
            "the new credential survives"
        );
        let bound = store
            .write(|txn| Ok(bound(txn, "p1", "laptop")))
            .await
            .unwrap();
        assert_eq!(bound, Some(id));
    }

    #[tokio::test]
    async fn join_needs_a_live_token_a_fresh_nonce_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (store, d) = devices(dir.path()).await;
        let (token, _) = d
            .create_join_token("p1", Duration::from_secs(60), 1)
            .await
            .unwrap();
        let (key, id) = keypair(1);
        let (_, other_id) = keypair(2);
        let (nonce, _) = d.challenge(&token).await.unwrap();
        let mut req = JoinRequest {
            join_token: token.clone(),
            connector: "laptop".into(),
            connector_class_name: None,
            node_id: other_id.clone(),
            nonce: nonce.clone(),
            signature: sign(&key, &join_message(&nonce, "p1", "laptop", &other_id)),
        };
        // Signed by another key than the NodeID claimed.
        assert_eq!(d.verify_join(&req).await.unwrap_err().code, 401);
        // The nonce was spent by that attempt.
        req.node_id = id.clone();
        req.signature = sign(&key, &join_message(&nonce, "p1", "laptop", &id));
        assert_eq!(d.verify_join(&req).await.unwrap_err().code, 401);
        let (nonce, _) = d.challenge(&token).await.unwrap();
        req.nonce = nonce.clone();
        req.signature = sign(&key, &join_message(&nonce, "p1", "laptop", &id));
        assert_eq!(d.verify_join(&req).await.unwrap(), "p1");
        let b = binding("laptop", "u1", &id);
        let cred = d.bind(&token, b.clone()).await.unwrap();
        assert!(
            d.challenge(&token).await.is_err(),
            "a one-use token is spent"
        );
        let user = d.authenticate(&cred, |_, _| Some("u1".into())).unwrap();
        assert_eq!(user.name, "system:connector:p1:laptop");
        assert_eq!(user.device.as_ref(), Some(&b));
        assert!(
            d.authenticate("pwd.nope", |_, _| Some("u1".into()))
                .is_none()
        );
        // In the store: another replica (or a restart) knows the credential, and the
        // store holds its hash only.
        let other = Devices::open(store.clone(), None).await.unwrap();
        assert!(
            other
                .authenticate(&cred, |_, _| Some("u1".into()))
                .is_some()
        );
        let stored = store
            .list(secrets(), Some(SYSTEM))
            .1
            .iter()
            .map(|s| s.to_string())
            .collect::<String>();
        assert!(
            !stored.contains(&cred[4..]),
            "a secret was stored in the clear"
        );
        // The connector was deleted (or recreated: another uid): revoked for good.
        assert!(d.authenticate(&cred, |_, _| Some("u2".into())).is_none());
        let mut changed = store.subscribe();
        tokio::time::timeout(
            Duration::from_secs(10),
            changed.wait_for(|_| {
                store
                    .get(secrets(), SYSTEM, &credential_name(&sha256_hex(&cred)))
                    .is_none()
            }),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(d.authenticate(&cred, |_, _| Some("u1".into())).is_none());
        let (expired, _) = d.create_join_token("p1", Duration::ZERO, 1).await.unwrap();
        assert!(d.challenge(&expired).await.is_err());
    }

    /// Credentials and join tokens an earlier version kept in its own SQLite tables are
    /// moved into the store, once.
    #[tokio::test]
    async fn old_tables_move_into_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("old.db");
        let cred = "pwd.0123456789abcdef";
        {
            let db = Connection::open(&legacy).unwrap();
            db.execute_batch(&format!(
                "CREATE TABLE join_tokens (id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL,
  namespace TEXT NOT NULL, expires INTEGER NOT NULL, uses_left INTEGER NOT NULL);
CREATE TABLE devices (token_sha256 TEXT PRIMARY KEY, namespace TEXT NOT NULL,
  connector TEXT NOT NULL, connector_uid TEXT NOT NULL, node_id TEXT NOT NULL,
  created INTEGER NOT NULL, UNIQUE(namespace, connector));
INSERT INTO join_tokens VALUES ('abcd', '{}', 'p1', {}, 3);
INSERT INTO devices VALUES ('{}', 'p1', 'laptop', 'u1', '{}', 0);",
                sha256_hex("s3cret"),
                unix_now() + 600,
                sha256_hex(cred),
                "aa".repeat(32),
            ))
            .unwrap();
        }
        let store = Store::open(&dir.path().join("db"), 100).unwrap();
        let d = Devices::open(store.clone(), Some(&legacy)).await.unwrap();
        assert!(d.authenticate(cred, |_, _| Some("u1".into())).is_some());
        assert!(d.challenge("pwj.abcd.s3cret").await.is_ok());
        let left: i64 = Connection::open(&legacy)
            .unwrap()
            .query_row("SELECT count(*) FROM devices", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0, "moved, not copied");
    }

    #[tokio::test]
    async fn devices_write_only_their_own_objects() {
        let dir = tempfile::tempdir().unwrap();
        let (store, d) = devices(dir.path()).await;
        let reg = registry();
        let conn = reg.by_key("connectors.networking.datumapis.com").unwrap();
        let ad = reg
            .by_key("connectoradvertisements.networking.datumapis.com")
            .unwrap();
        let proxy = reg.by_key("httpproxies.networking.datumapis.com").unwrap();
        let (token, _) = d
            .create_join_token("p1", Duration::from_secs(60), 2)
            .await
            .unwrap();
        let cred = d
            .bind(&token, binding("a", "uid-a", &"aa".repeat(32)))
            .await
            .unwrap();
        d.bind(&token, binding("b", "uid-b", &"bb".repeat(32)))
            .await
            .unwrap();
        let a = d
            .authenticate(&cred, |_, c| Some(format!("uid-{c}")))
            .unwrap();
        // Every check runs in a transaction, as writes do; a failed assertion fails it.
        store.write(move |txn| {
        let ok = |u: &User, res, old: Option<&Value>, new: Option<&Value>| {
            check_write(txn, u, res, "p1", old, new).is_ok()
        };
        let connector = |name: &str, id: &str| json!({"metadata": {"name": name}, "status": {"connectionDetails": {"publicKey": {"id": id}}}});
        assert!(ok(&a, conn, None, Some(&connector("a", &"aa".repeat(32)))));
        assert!(
            !ok(&a, conn, None, Some(&connector("a", &"cc".repeat(32)))),
            "its own NodeID only"
        );
        assert!(
            !ok(
                &a,
                conn,
                Some(&connector("b", "")),
                Some(&connector("b", &"aa".repeat(32)))
            ),
            "hijack"
        );
        assert!(
            !ok(&a, conn, Some(&connector("a", "")), None),
            "no self-delete"
        );
        let advert =
            |c: &str| json!({"metadata": {"name": "x"}, "spec": {"connectorRef": {"name": c}}});
        assert!(ok(&a, ad, None, Some(&advert("a"))));
        assert!(
            !ok(&a, ad, None, Some(&advert("b"))),
            "allow-list injection"
        );
        assert!(!ok(&a, ad, Some(&advert("b")), None), "deleting another's");
        let px = |backend: Value| json!({"metadata": {"name": "x"}, "spec": {"rules": [{"backends": [backend]}]}});
        assert!(ok(
            &a,
            proxy,
            None,
            Some(&px(json!({"connector": {"name": "a"}})))
        ));
        assert!(!ok(
            &a,
            proxy,
            None,
            Some(&px(json!({"connector": {"name": "b"}})))
        ));
        assert!(!ok(
            &a,
            proxy,
            None,
            Some(&px(
                json!({"connector": {"selector": {"matchLabels": {"x": "y"}}}})
            ))
        ));
        let tcp = reg.by_key("tcpproxies.networking.datumapis.com").unwrap();
        let tp = |connectors: &[Value]| {
            let backends: Vec<Value> = connectors
                .iter()
                .map(|c| json!({"endpoint": "tcp://127.0.0.1:22", "connector": c}))
                .collect();
            json!({"metadata": {"name": "x"}, "spec": {"backends": backends}})
        };
        let named = |c: &str| json!({"name": c});
        assert!(ok(&a, tcp, None, Some(&tp(&[named("a"), named("a")]))));
        assert!(
            !ok(&a, tcp, None, Some(&tp(&[named("a"), named("b")]))),
            "another device's connector among its own"
        );
        assert!(
            !ok(&a, tcp, Some(&tp(&[named("b")])), Some(&tp(&[named("a")]))),
            "taking over another device's proxy"
        );
        assert!(
            !ok(&a, tcp, Some(&tp(&[named("b")])), None),
            "deleting another's"
        );
        assert!(!ok(
            &a,
            tcp,
            None,
            Some(&tp(&[json!({"selector": {"matchLabels": {"x": "y"}}})]))
        ));
        assert!(
            !ok(&a, tcp, None, Some(&tp(&[]))),
            "a proxy naming no connector"
        );
        // A person with the agent role cannot touch a joined device's objects.
        let person = User {
            name: "dev".into(),
            roles: vec![Role::Agent],
            namespaces: Namespaces::Only(vec!["p1".into()]),
            device: None,
        };
        assert!(!ok(
            &person,
            conn,
            Some(&connector("b", "")),
            Some(&connector("b", &"dd".repeat(32)))
        ));
        assert!(!ok(&person, ad, None, Some(&advert("b"))));
        assert!(ok(&person, ad, None, Some(&advert("legacy"))));
        assert!(ok(
            &person,
            proxy,
            None,
            Some(&px(json!({"connector": {"name": "b"}})))
        ));
        assert!(ok(&person, tcp, None, Some(&tp(&[named("b")]))));
        Ok(())
        })
        .await
        .expect("an assertion failed in the transaction");
    }
}
