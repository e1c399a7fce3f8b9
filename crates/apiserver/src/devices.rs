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
//! Only SHA-256 hashes of secrets are stored (table `devices` and `join_tokens` in the
//! API server's SQLite file).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use crate::auth::{Namespaces, Role, User};
use crate::error::ApiError;
use crate::registry::Res;

/// Ed25519 signatures are made over this prefix and the fields, newline-separated.
pub const JOIN_CONTEXT: &str = "portway-join-v1";
/// How long a challenge nonce may be answered.
const NONCE_TTL: Duration = Duration::from_secs(60);
/// Longest a join token may live.
pub const MAX_JOIN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

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
    #[error("opening the device table in {path}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
}

struct JoinToken {
    secret_hash: String,
    ns: String,
    expires: i64,
    uses_left: i64,
}

#[derive(Default)]
struct State {
    by_token: HashMap<String, Binding>,
    /// (ns, connector) → token hash.
    by_connector: HashMap<(String, String), String>,
    nonces: HashMap<String, (String, Instant)>,
}

/// The device credentials and join tokens.
pub struct Devices {
    db: Mutex<Connection>,
    state: Mutex<State>,
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

fn db_err(e: rusqlite::Error) -> ApiError {
    ApiError::internal(format!("device table: {e}"))
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(http::StatusCode::UNAUTHORIZED, "Unauthorized", message)
}

impl Devices {
    /// # Errors
    /// When the SQLite file cannot be opened or the tables created.
    pub fn open(path: &Path) -> Result<Self, DevicesError> {
        let err = |source| DevicesError::Open {
            path: path.display().to_string(),
            source,
        };
        let db = Connection::open(path).map_err(err)?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;
CREATE TABLE IF NOT EXISTS join_tokens (id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL,
  namespace TEXT NOT NULL, expires INTEGER NOT NULL, uses_left INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS devices (token_sha256 TEXT PRIMARY KEY, namespace TEXT NOT NULL,
  connector TEXT NOT NULL, connector_uid TEXT NOT NULL, node_id TEXT NOT NULL,
  created INTEGER NOT NULL, UNIQUE(namespace, connector));",
        )
        .map_err(err)?;
        let mut state = State::default();
        {
            let mut stmt = db
                .prepare("SELECT token_sha256, namespace, connector, connector_uid, node_id FROM devices")
                .map_err(err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        Binding {
                            ns: r.get(1)?,
                            connector: r.get(2)?,
                            connector_uid: r.get(3)?,
                            node_id: r.get(4)?,
                        },
                    ))
                })
                .map_err(err)?;
            for row in rows {
                let (hash, b) = row.map_err(err)?;
                state
                    .by_connector
                    .insert((b.ns.clone(), b.connector.clone()), hash.clone());
                state.by_token.insert(hash, b);
            }
        }
        Ok(Self {
            db: Mutex::new(db),
            state: Mutex::new(state),
        })
    }

    /// Creates a join token for `ns`.
    ///
    /// # Errors
    /// 500 when it cannot be stored.
    pub fn create_join_token(
        &self,
        ns: &str,
        ttl: Duration,
        uses: u32,
    ) -> Result<(String, i64), ApiError> {
        let id = random_hex(4);
        let secret = random_hex(16);
        let expires = unix_now() + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
        self.db
            .lock()
            .execute(
                "INSERT INTO join_tokens (id, secret_sha256, namespace, expires, uses_left) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, sha256_hex(&secret), ns, expires, i64::from(uses)],
            )
            .map_err(db_err)?;
        Ok((format!("pwj.{id}.{secret}"), expires))
    }

    /// Whether `token` looks like a join token (as opposed to a credential).
    pub fn is_join_token(token: &str) -> bool {
        token.starts_with("pwj.")
    }

    fn join_token(&self, token: &str) -> Result<(String, JoinToken), ApiError> {
        let bad = || {
            unauthorized(
                "the join token is unknown, expired or used up; create a new one with `portway token create`",
            )
        };
        let mut parts = token.trim().splitn(3, '.');
        let (Some("pwj"), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let t = self
            .db
            .lock()
            .query_row(
                "SELECT secret_sha256, namespace, expires, uses_left FROM join_tokens WHERE id = ?1",
                params![id],
                |r| {
                    Ok(JoinToken {
                        secret_hash: r.get(0)?,
                        ns: r.get(1)?,
                        expires: r.get(2)?,
                        uses_left: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(db_err)?
            .ok_or_else(bad)?;
        // Digests are compared, so timing says nothing of the secret; still, no early exit.
        let given = sha256_hex(secret);
        let matches = given.len() == t.secret_hash.len()
            && given
                .bytes()
                .zip(t.secret_hash.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !matches || t.expires <= unix_now() || t.uses_left <= 0 {
            return Err(bad());
        }
        Ok((id.to_owned(), t))
    }

    /// A nonce for the holder of a valid join token to sign, and the token's project.
    ///
    /// # Errors
    /// 401 for an unknown, expired or used-up token.
    pub fn challenge(&self, token: &str) -> Result<(String, String), ApiError> {
        let (id, t) = self.join_token(token)?;
        let nonce = random_hex(16);
        let mut st = self.state.lock();
        st.nonces.retain(|_, (_, at)| at.elapsed() < NONCE_TTL);
        if st.nonces.len() > 10_000 {
            return Err(ApiError::new(
                http::StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "too many joins in progress; try again shortly",
            ));
        }
        st.nonces.insert(nonce.clone(), (id, Instant::now()));
        Ok((nonce, t.ns))
    }

    /// Checks a join: the token, the nonce it was given, and the signature by the key whose
    /// public half is `node_id`. Returns the project; the caller then binds the connector
    /// with [`Devices::bind`].
    ///
    /// # Errors
    /// 401 for a bad token, nonce or signature; 400 for a malformed NodeID or signature.
    pub fn verify_join(&self, req: &JoinRequest) -> Result<String, ApiError> {
        let (id, t) = self.join_token(&req.join_token)?;
        let nonce_ok = matches!(
            self.state.lock().nonces.remove(&req.nonce),
            Some((nid, at)) if nid == id && at.elapsed() < NONCE_TTL
        );
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
        let sig = unhex(&req.signature)
            .filter(|s| s.len() == 64)
            .ok_or_else(|| ApiError::bad_request("signature: must be 128 hex digits (Ed25519)"))?;
        let msg = join_message(&req.nonce, &t.ns, &req.connector, &req.node_id);
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &key)
            .verify(msg.as_bytes(), &sig)
            .map_err(|_| unauthorized("the signature does not match the NodeID: the device must prove it holds the key"))?;
        Ok(t.ns)
    }

    /// Binds a new credential to the connector and spends one use of the join token.
    /// A connector already bound to a credential of the same NodeID is re-bound (a device
    /// that lost its credential file); of another NodeID, refused.
    ///
    /// # Errors
    /// 409 when the connector belongs to another device.
    pub fn bind(&self, join_token: &str, b: Binding) -> Result<String, ApiError> {
        let (id, _) = self.join_token(join_token)?;
        let key = (b.ns.clone(), b.connector.clone());
        let mut st = self.state.lock();
        // A binding to an older Connector of that name (deleted since) is stale.
        if let Some(old) = st.by_connector.get(&key).and_then(|h| st.by_token.get(h))
            && old.connector_uid == b.connector_uid
            && old.node_id != b.node_id
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
        let secret = format!("pwd.{}", random_hex(32));
        let hash = sha256_hex(&secret);
        let mut db = self.db.lock();
        let tx = db.transaction().map_err(db_err)?;
        let used = tx
            .execute(
                "UPDATE join_tokens SET uses_left = uses_left - 1 WHERE id = ?1 AND uses_left > 0",
                params![id],
            )
            .map_err(db_err)?;
        if used == 0 {
            return Err(unauthorized("the join token is used up"));
        }
        tx.execute(
            "DELETE FROM devices WHERE namespace = ?1 AND connector = ?2",
            params![b.ns, b.connector],
        )
        .map_err(db_err)?;
        tx.execute(
            "INSERT INTO devices (token_sha256, namespace, connector, connector_uid, node_id, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![hash, b.ns, b.connector, b.connector_uid, b.node_id, unix_now()],
        )
        .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        if let Some(old) = st.by_connector.insert(key, hash.clone()) {
            st.by_token.remove(&old);
        }
        st.by_token.insert(hash, b);
        Ok(secret)
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
        let b = self.state.lock().by_token.get(&hash).cloned()?;
        if connector_uid(&b.ns, &b.connector).as_deref() != Some(b.connector_uid.as_str()) {
            self.forget(&hash);
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
    /// with the old one must not revoke.
    fn forget(&self, hash: &str) {
        let mut st = self.state.lock();
        let Some(b) = st.by_token.remove(hash) else {
            return;
        };
        let key = (b.ns.clone(), b.connector.clone());
        if st.by_connector.get(&key).is_some_and(|h| h == hash) {
            st.by_connector.remove(&key);
        }
        let _ = self
            .db
            .lock()
            .execute("DELETE FROM devices WHERE token_sha256 = ?1", params![hash]);
        tracing::info!(project = %b.ns, connector = %b.connector, "device credential revoked: its connector is gone");
    }

    /// The NodeID of the device bound to a connector, if any.
    pub fn bound(&self, ns: &str, connector: &str) -> Option<String> {
        let st = self.state.lock();
        let hash = st
            .by_connector
            .get(&(ns.to_owned(), connector.to_owned()))?;
        st.by_token.get(hash).map(|b| b.node_id.clone())
    }
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

/// NodeRestriction: what a write may do given who makes it. `old`/`new` are the stored
/// and the resulting object (`new` is `None` for a delete).
///
/// # Errors
/// 403 naming the rule.
pub fn check_write(
    devices: &Devices,
    user: &User,
    res: Res,
    ns: &str,
    old: Option<&Value>,
    new: Option<&Value>,
) -> Result<(), ApiError> {
    let forbid = |why: String| {
        Err(ApiError::forbidden(format!(
            "{} is forbidden: User \"{}\" {why}",
            res.key(),
            user.name
        )))
    };
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
            if devices.bound(ns, &c).is_some() {
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
    use crate::registry::registry;
    use serde_json::json;

    fn sign(key: &ring::signature::Ed25519KeyPair, msg: &str) -> String {
        hex(key.sign(msg.as_bytes()).as_ref())
    }

    fn keypair(seed: u8) -> (ring::signature::Ed25519KeyPair, String) {
        let k = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap();
        let id = hex(ring::signature::KeyPair::public_key(&k).as_ref());
        (k, id)
    }

    /// A device that joined again (its connector was collected and made anew) keeps its
    /// new credential when a late request still carries the old one.
    #[test]
    fn a_stale_credential_revokes_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let d = Devices::open(&dir.path().join("db")).unwrap();
        let (token, _) = d
            .create_join_token("p1", Duration::from_secs(60), 2)
            .unwrap();
        let (_, id) = keypair(1);
        let bind = |uid: &str| {
            d.bind(
                &token,
                Binding {
                    ns: "p1".into(),
                    connector: "laptop".into(),
                    connector_uid: uid.into(),
                    node_id: id.clone(),
                },
            )
            .unwrap()
        };
        let old = bind("u1");
        let new = bind("u2");
        let now = |_: &str, _: &str| Some("u2".to_owned());
        assert!(d.authenticate(&old, now).is_none());
        assert!(
            d.authenticate(&new, now).is_some(),
            "the new credential survives"
        );
        assert!(d.bound("p1", "laptop").is_some());
    }

    #[test]
    fn join_needs_a_live_token_a_fresh_nonce_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = Devices::open(&dir.path().join("db")).unwrap();
        let (token, _) = d
            .create_join_token("p1", Duration::from_secs(60), 1)
            .unwrap();
        let (key, id) = keypair(1);
        let (_, other_id) = keypair(2);
        let (nonce, _) = d.challenge(&token).unwrap();
        let mut req = JoinRequest {
            join_token: token.clone(),
            connector: "laptop".into(),
            connector_class_name: None,
            node_id: other_id.clone(),
            nonce: nonce.clone(),
            signature: sign(&key, &join_message(&nonce, "p1", "laptop", &other_id)),
        };
        // Signed by another key than the NodeID claimed.
        assert_eq!(d.verify_join(&req).unwrap_err().code, 401);
        // The nonce was spent by that attempt.
        req.node_id = id.clone();
        req.signature = sign(&key, &join_message(&nonce, "p1", "laptop", &id));
        assert_eq!(d.verify_join(&req).unwrap_err().code, 401);
        let (nonce, _) = d.challenge(&token).unwrap();
        req.nonce = nonce.clone();
        req.signature = sign(&key, &join_message(&nonce, "p1", "laptop", &id));
        assert_eq!(d.verify_join(&req).unwrap(), "p1");
        let b = Binding {
            ns: "p1".into(),
            connector: "laptop".into(),
            connector_uid: "u1".into(),
            node_id: id.clone(),
        };
        let cred = d.bind(&token, b.clone()).unwrap();
        assert!(d.challenge(&token).is_err(), "a one-use token is spent");
        let user = d.authenticate(&cred, |_, _| Some("u1".into())).unwrap();
        assert_eq!(user.name, "system:connector:p1:laptop");
        assert_eq!(user.device.as_ref(), Some(&b));
        assert!(
            d.authenticate("pwd.nope", |_, _| Some("u1".into()))
                .is_none()
        );
        // Persisted: a restarted server knows the credential.
        let d = Devices::open(&dir.path().join("db")).unwrap();
        assert!(d.authenticate(&cred, |_, _| Some("u1".into())).is_some());
        // The connector was deleted (or recreated: another uid): revoked for good.
        assert!(d.authenticate(&cred, |_, _| Some("u2".into())).is_none());
        assert!(d.authenticate(&cred, |_, _| Some("u1".into())).is_none());
        assert_eq!(d.bound("p1", "laptop"), None);
        let (expired, _) = d.create_join_token("p1", Duration::ZERO, 1).unwrap();
        assert!(d.challenge(&expired).is_err());
    }

    #[test]
    fn devices_write_only_their_own_objects() {
        let dir = tempfile::tempdir().unwrap();
        let d = Devices::open(&dir.path().join("db")).unwrap();
        let reg = registry();
        let conn = reg.by_key("connectors.networking.datumapis.com").unwrap();
        let ad = reg
            .by_key("connectoradvertisements.networking.datumapis.com")
            .unwrap();
        let proxy = reg.by_key("httpproxies.networking.datumapis.com").unwrap();
        let (token, _) = d
            .create_join_token("p1", Duration::from_secs(60), 2)
            .unwrap();
        let bind = |c: &str, id: &str| {
            d.bind(
                &token,
                Binding {
                    ns: "p1".into(),
                    connector: c.into(),
                    connector_uid: format!("uid-{c}"),
                    node_id: id.into(),
                },
            )
            .unwrap()
        };
        let cred = bind("a", &"aa".repeat(32));
        bind("b", &"bb".repeat(32));
        let a = d
            .authenticate(&cred, |_, c| Some(format!("uid-{c}")))
            .unwrap();
        let ok = |u: &User, res, old: Option<&Value>, new: Option<&Value>| {
            check_write(&d, u, res, "p1", old, new).is_ok()
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
    }
}
