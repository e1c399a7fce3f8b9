//! The certificate issuer: one per installation (in the operator), so several edges never
//! race for the same order. It keeps a `kubernetes.io/tls` Secret per certificate in
//! [`SYSTEM_NAMESPACE`] (see [`portway_api::certificates`]), issues what is missing,
//! renews what expires within `renew_before`, and backs off on failure. Every edge serves
//! those Secrets by SNI; HTTPProxy status reads [`Certificates::condition`].
//!
//! It issues the zone's wildcard (`*.<zone>`), which covers every canonical name and
//! every spec hostname one label below the zone, and a certificate per proven hostname
//! outside the zone ([`crate::verify`]), from the local CA or an ACME directory
//! ([`crate::acme`]: DNS-01 through Portway's DNS server in the zone, HTTP-01 through
//! the edges outside it). An ACME certificate whose name is no longer wanted is revoked
//! when it is deleted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Secret};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use parking_lot::RwLock;
use portway_api::certificates::{
    self, HOSTNAMES, ISSUED_AT, ISSUER, Info, LABEL, NOT_AFTER, SYSTEM_NAMESPACE,
};
use portway_api::managers;
use portway_tls::ca::LocalCa;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Condition type and reasons, per hostname in `HTTPProxy.status.hostnameStatuses`.
pub mod reasons {
    pub const CERTIFICATES_READY: &str = "CertificatesReady";
    pub const ISSUED: &str = "Issued";
    pub const PENDING: &str = "Pending";
    pub const ISSUE_FAILED: &str = "IssueFailed";
    pub const NOT_COVERED: &str = "NotCovered";
}
use reasons::*;

/// Where certificates come from.
#[derive(Clone)]
pub enum Issuer {
    /// Portway's own CA (`portway up` without ACME): trusted once, by whoever adds it.
    LocalCa(Arc<LocalCa>),
    /// An ACME directory: DNS-01 answered by Portway's DNS server, HTTP-01 by the edges.
    Acme(Arc<crate::acme::Acme>),
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl Issuer {
    /// As written in the Secrets' issuer annotation.
    pub fn name(&self) -> String {
        match self {
            Self::LocalCa(_) => "local-ca".into(),
            Self::Acme(a) => a.directory().to_owned(),
        }
    }

    /// A chain (PEM, leaf first), its key (PEM) and expiry.
    async fn issue(
        &self,
        hostnames: &[String],
        zone: &str,
        validity: Duration,
    ) -> Result<(String, String, Timestamp), String> {
        match self {
            Self::LocalCa(ca) => {
                let issued = ca
                    .issue(hostnames, &hostnames[0], validity)
                    .map_err(|e| format!("the local CA could not sign: {e}"))?;
                let not_after = Timestamp::try_from(issued.not_after)
                    .map_err(|e| format!("certificate expiry out of range: {e}"))?;
                Ok((
                    format!("{}{}", issued.cert_pem, ca.cert_pem),
                    issued.key_pem,
                    not_after,
                ))
            }
            // The CA decides the validity; the leaf says what it chose.
            Self::Acme(acme) => {
                let (chain, key) = acme.issue(hostnames, zone).await?;
                let not_after = leaf_not_after(&chain)?;
                Ok((chain, key, not_after))
            }
        }
    }
}

/// The expiry of the first certificate in a PEM chain.
fn leaf_not_after(chain_pem: &str) -> Result<Timestamp, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or("the ACME server sent no certificate")?
        .map_err(|e| format!("the ACME server sent a bad certificate: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf)
        .map_err(|e| format!("the ACME server sent a bad certificate: {e}"))?;
    Timestamp::from_second(cert.validity().not_after.timestamp())
        .map_err(|e| format!("certificate expiry out of range: {e}"))
}

#[derive(Clone, Debug)]
pub struct Config {
    pub issuer: Issuer,
    /// Asked-for validity (ACME servers decide their own).
    pub validity: Duration,
    /// Renew once less than this is left.
    pub renew_before: Duration,
    /// First retry after a failure; doubles up to `max_retry`.
    pub retry: Duration,
    pub max_retry: Duration,
}

impl Config {
    /// 90 days, renewed with 30 left; retries from 5 s up to 10 min.
    pub fn new(issuer: Issuer) -> Self {
        Self {
            issuer,
            validity: Duration::from_secs(90 * 86_400),
            renew_before: Duration::from_secs(30 * 86_400),
            retry: Duration::from_secs(5),
            max_retry: Duration::from_secs(600),
        }
    }
}

/// Where one certificate stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Pending,
    Ready {
        secret: String,
        issuer: String,
        not_after: Timestamp,
    },
    Failed {
        error: String,
    },
}

/// Every certificate the issuer keeps, by the hostname pattern it covers.
#[derive(Debug, Default)]
pub struct Certificates {
    states: RwLock<BTreeMap<String, State>>,
}

impl Certificates {
    /// Records `state`; true when it changed (status must be rewritten).
    fn set(&self, pattern: &str, state: State) -> bool {
        let mut states = self.states.write();
        let old = states.insert(pattern.to_owned(), state.clone());
        old.as_ref() != Some(&state)
    }

    /// `CertificatesReady` for `host` at `now`: status, reason, message.
    pub fn condition(&self, host: &str, now: Timestamp) -> (bool, &'static str, String) {
        let states = self.states.read();
        let Some((pattern, state)) = states.iter().find(|(p, _)| certificates::covers(p, host))
        else {
            let known: Vec<&str> = states.keys().map(String::as_str).collect();
            return (
                false,
                NOT_COVERED,
                format!(
                    "the issuer keeps no certificate for {host} (it keeps {}); an edge's --cert-dir may still serve one",
                    known.join(", ")
                ),
            );
        };
        match state {
            State::Ready {
                secret,
                issuer,
                not_after,
            } if *not_after > now => (
                true,
                ISSUED,
                format!(
                    "served with {pattern} (Secret {SYSTEM_NAMESPACE}/{secret}, issued by {issuer}, valid until {not_after})"
                ),
            ),
            State::Ready { not_after, .. } => (
                false,
                PENDING,
                format!("the certificate for {pattern} expired at {not_after}; renewing"),
            ),
            State::Pending => (
                false,
                PENDING,
                format!("the certificate for {pattern} is being issued"),
            ),
            State::Failed { error } => (
                false,
                ISSUE_FAILED,
                format!("issuing the certificate for {pattern} failed: {error}"),
            ),
        }
    }
}

/// Why a certificate must be (re)issued now, or `None` while the stored one will do.
pub fn due(
    hostnames: &[String],
    stored: Option<&Info>,
    issuer: &str,
    now: Timestamp,
    renew_before: Duration,
) -> Option<&'static str> {
    let Some(info) = stored else {
        return Some("missing");
    };
    if info.hostnames != hostnames {
        return Some("hostnames changed");
    }
    if info.issuer != issuer {
        return Some("issuer changed");
    }
    let mut renew_before = SignedDuration::try_from(renew_before).unwrap_or(SignedDuration::MAX);
    // Never more than two thirds of the lifetime: a CA that issues short certificates (or
    // a window as long as the validity) must not make every pass a renewal.
    if let (Some(issued), Some(expires)) = (info.issued_at, info.not_after) {
        let lifetime = expires.duration_since(issued);
        renew_before = renew_before.min(lifetime * 2 / 3);
    }
    match info.not_after {
        Some(t) if t.checked_sub(renew_before).is_ok_and(|at| at > now) => None,
        Some(_) => Some("expiring"),
        None => Some("expiry unknown"),
    }
}

fn reference(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Secret".into()),
        namespace: Some(SYSTEM_NAMESPACE.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

/// What the issuer loop needs.
pub(crate) struct Run {
    pub client: kube::Client,
    pub config: Config,
    pub zone: String,
    pub certificates: Arc<Certificates>,
    pub events: portway_kube::Events,
    /// Called when a certificate's state changed: proxies' status is rewritten.
    pub changed: Box<dyn Fn() + Send + Sync>,
    /// Names that need a certificate of their own besides the zone's wildcard: the proven
    /// hostnames outside the zone.
    pub wanted: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    /// Woken when `wanted` may have changed.
    pub wake: Arc<tokio::sync::Notify>,
}

/// Whether this issuer can serve `name`, and why not: an ACME order for a wildcard
/// outside the zone needs DNS-01 at someone else's DNS server.
fn issuable(issuer: &Issuer, zone: &str, name: &str) -> Result<(), String> {
    match issuer {
        Issuer::LocalCa(_) => Ok(()),
        Issuer::Acme(_) => crate::acme::solver(zone, name).map(|_| ()),
    }
}

/// Keeps the zone's wildcard, and a certificate per proven name outside the zone, issued
/// and current until `shutdown`; removes the certificates of names no longer wanted.
pub(crate) async fn run(run: Run, shutdown: CancellationToken) {
    let api: Api<Secret> = Api::namespaced(run.client.clone(), SYSTEM_NAMESPACE);
    sweep_answers(&api).await;
    let wildcard = format!("*.{}", run.zone);
    let mut retry_at: BTreeMap<String, (tokio::time::Instant, Duration)> = BTreeMap::new();
    let mut unwanted_since = BTreeMap::new();
    loop {
        let mut patterns = vec![wildcard.clone()];
        patterns.extend(
            (run.wanted)()
                .into_iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase()),
        );
        patterns.sort();
        patterns.dedup();
        let mut wait = Duration::from_secs(60);
        let mut changed = false;
        for pattern in &patterns {
            let now = tokio::time::Instant::now();
            if let Some((at, _)) = retry_at.get(pattern)
                && *at > now
            {
                wait = wait.min(*at - now);
                continue;
            }
            if run.certificates.states.read().get(pattern).is_none() {
                changed |= run.certificates.set(pattern, State::Pending);
            }
            let name = certificates::secret_name(pattern);
            let hostnames = vec![pattern.clone()];
            let result = match issuable(&run.config.issuer, &run.zone, pattern) {
                Ok(()) => keep(&run, &api, &name, &hostnames).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(not_after) => {
                    retry_at.remove(pattern);
                    let state = State::Ready {
                        secret: name.clone(),
                        issuer: run.config.issuer.name(),
                        not_after,
                    };
                    changed |= run.certificates.set(pattern, state);
                    // As `due` decides: at most two thirds of what is left before expiry.
                    let left = not_after.duration_since(Timestamp::now());
                    let renew = SignedDuration::try_from(run.config.renew_before)
                        .ok()
                        .map(|d| d.min(left * 2 / 3))
                        .and_then(|d| not_after.checked_sub(d).ok())
                        .map_or(Duration::ZERO, |at| {
                            Duration::try_from(at.duration_since(Timestamp::now()))
                                .unwrap_or(Duration::ZERO)
                        });
                    wait = wait.min(renew.max(Duration::from_secs(1)));
                }
                Err(error) => {
                    let backoff = retry_at.get(pattern).map_or(run.config.retry, |(_, b)| {
                        (*b * 2).min(run.config.max_retry)
                    });
                    retry_at.insert(pattern.clone(), (now + backoff, backoff));
                    wait = wait.min(backoff);
                    tracing::warn!(certificate = %pattern, %error, retry = ?backoff, "issuing failed");
                    let state = State::Failed {
                        error: error.clone(),
                    };
                    if run.certificates.set(pattern, state) {
                        changed = true;
                        run.events
                            .record(
                                &reference(&name),
                                portway_kube::events::Kind::Warning,
                                ISSUE_FAILED,
                                "Issue",
                                format!("{pattern}: {error}"),
                            )
                            .await;
                    }
                }
            }
        }
        changed |= forget(&run, &api, &patterns, &mut unwanted_since).await;
        retry_at.retain(|p, _| patterns.contains(p));
        if changed {
            (run.changed)();
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            () = run.wake.notified() => {}
        }
    }
}

/// Deletes the ACME answers an earlier run left (it stopped mid-order): no order is open
/// before this issuer starts one, and a stale answer would be published for nothing.
async fn sweep_answers(api: &Api<Secret>) {
    let selector = format!(
        "{}=true,{}={}",
        certificates::CHALLENGE_LABEL,
        portway_api::labels::MANAGED_BY,
        managers::OPERATOR
    );
    let dp = kube::api::DeleteParams::default();
    match api
        .delete_collection(&dp, &ListParams::default().labels(&selector))
        .await
    {
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "removing ACME answers left by an earlier run"),
    }
}

/// How long a certificate left by an earlier run may be unwanted before it is deleted.
const STALE_GRACE: Duration = Duration::from_secs(600);

/// Deletes the certificates of names no longer wanted, those left by an earlier run
/// included: a name whose proxy or proof is gone is no longer served. True when a state
/// went.
async fn forget(
    run: &Run,
    api: &Api<Secret>,
    patterns: &[String],
    unwanted_since: &mut BTreeMap<String, tokio::time::Instant>,
) -> bool {
    let gone_states: Vec<String> = run
        .certificates
        .states
        .read()
        .keys()
        .filter(|p| !patterns.contains(p))
        .cloned()
        .collect();
    for pattern in &gone_states {
        run.certificates.states.write().remove(pattern);
    }
    let selector = format!(
        "{LABEL}=true,{}={}",
        portway_api::labels::MANAGED_BY,
        managers::OPERATOR
    );
    let stored = match api.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => list.items,
        Err(e) => {
            tracing::warn!(error = %e, "listing certificates");
            return !gone_states.is_empty();
        }
    };
    let now = tokio::time::Instant::now();
    unwanted_since.retain(|name, _| {
        !patterns
            .iter()
            .any(|p| certificates::secret_name(p) == *name)
    });
    for secret in stored {
        let Some(info) = Info::of(&secret) else {
            continue;
        };
        if info.hostnames.iter().any(|h| patterns.contains(h)) {
            continue;
        }
        // A certificate this run kept goes at once; one left by an earlier run waits: just
        // after a restart the proofs are not looked up yet, and its name may be wanted.
        let ours = info.hostnames.iter().any(|h| gone_states.contains(h));
        let since = *unwanted_since.entry(info.name.clone()).or_insert(now);
        if !ours && now.duration_since(since) < STALE_GRACE {
            continue;
        }
        unwanted_since.remove(&info.name);
        let revoked = revoke(run, &secret, &info).await;
        match api.delete(&info.name, &Default::default()).await {
            Ok(_) => {
                tracing::info!(certificate = %info.hostnames.join(","), %revoked, "certificate removed: no longer wanted");
                run.events
                    .record(
                        &reference(&info.name),
                        portway_kube::events::Kind::Normal,
                        "Removed",
                        "Remove",
                        format!(
                            "{} is no longer routed here; its certificate is no longer served ({revoked})",
                            info.hostnames.join(", ")
                        ),
                    )
                    .await;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => tracing::warn!(secret = %info.name, error = %e, "removing a certificate"),
        }
    }
    !gone_states.is_empty()
}

/// Revokes a certificate about to be deleted, when the configured ACME directory issued
/// it; says what became of it. A revocation that fails does not keep the certificate:
/// the name is no longer routed, and its key goes with the Secret.
async fn revoke(run: &Run, secret: &Secret, info: &Info) -> String {
    let Issuer::Acme(acme) = &run.config.issuer else {
        return format!("issued by {}, which keeps no revocation list", info.issuer);
    };
    if info.issuer != acme.directory() {
        return format!("issued by {}, not revoked", info.issuer);
    }
    let Some(chain) = secret.data.as_ref().and_then(|d| d.get("tls.crt")) else {
        return "no certificate to revoke".into();
    };
    match acme.revoke(&chain.0).await {
        Ok(()) => format!("revoked at {}", info.issuer),
        Err(error) => {
            tracing::warn!(certificate = %info.hostnames.join(","), %error, "revoking");
            run.events
                .record(
                    &reference(&info.name),
                    portway_kube::events::Kind::Warning,
                    "RevokeFailed",
                    "Revoke",
                    format!("{}: {error}", info.hostnames.join(", ")),
                )
                .await;
            format!("not revoked: {error}")
        }
    }
}

/// Makes sure a current certificate for `hostnames` is stored; returns its expiry.
async fn keep(
    run: &Run,
    api: &Api<Secret>,
    name: &str,
    hostnames: &[String],
) -> Result<Timestamp, String> {
    let stored = api
        .get_opt(name)
        .await
        .map_err(|e| format!("reading Secret {SYSTEM_NAMESPACE}/{name}: {e}"))?;
    let info = stored.as_ref().and_then(Info::of);
    let issuer = run.config.issuer.name();
    let Some(why) = due(
        hostnames,
        info.as_ref(),
        &issuer,
        Timestamp::now(),
        run.config.renew_before,
    ) else {
        return info
            .and_then(|i| i.not_after)
            .ok_or_else(|| "stored certificate has no expiry".to_owned());
    };
    let (chain, key, not_after) = run
        .config
        .issuer
        .issue(hostnames, &run.zone, run.config.validity)
        .await?;
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": SYSTEM_NAMESPACE,
            "labels": {LABEL: "true", portway_api::labels::MANAGED_BY: managers::OPERATOR},
            "annotations": {
                HOSTNAMES: hostnames.join(","),
                NOT_AFTER: not_after.to_string(),
                ISSUED_AT: Timestamp::now().to_string(),
                ISSUER: issuer,
            },
        },
        "type": portway_api::validation::TLS_SECRET,
    }))
    .map_err(|e| e.to_string())?;
    let secret = Secret {
        data: Some(
            [
                ("tls.crt".to_owned(), ByteString(chain.into_bytes())),
                ("tls.key".to_owned(), ByteString(key.into_bytes())),
            ]
            .into(),
        ),
        ..secret
    };
    api.patch(
        name,
        &PatchParams::apply(managers::OPERATOR).force(),
        &Patch::Apply(&secret),
    )
    .await
    .map_err(|e| format!("writing Secret {SYSTEM_NAMESPACE}/{name}: {e}"))?;
    tracing::info!(certificate = %hostnames.join(","), why, %not_after, "certificate issued");
    run.events
        .record(
            &reference(name),
            portway_kube::events::Kind::Normal,
            if stored.is_some() {
                "Renewed"
            } else {
                "Issued"
            },
            "Issue",
            format!(
                "{} issued by {issuer} ({why}), valid until {not_after}",
                hostnames.join(", ")
            ),
        )
        .await;
    Ok(not_after)
}

/// Creates the system namespace the certificates live in, if it is missing.
/// Creates `portway-system` if it is missing (the issuer's Secrets and the leader
/// lease live there).
///
/// # Errors
/// When the API refuses.
pub async fn ensure_namespace(client: &kube::Client) -> Result<(), kube::Error> {
    let api: Api<Namespace> = Api::all(client.clone());
    if api.get_opt(SYSTEM_NAMESPACE).await?.is_some() {
        return Ok(());
    }
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": SYSTEM_NAMESPACE}})).unwrap_or_default();
    let pp = PostParams {
        field_manager: Some(managers::OPERATOR.into()),
        ..Default::default()
    };
    match api.create(&pp, &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(hostnames: &[&str], issuer: &str, not_after: &str) -> Info {
        Info {
            name: "wildcard.p.localhost".into(),
            hostnames: hostnames.iter().map(|h| h.to_string()).collect(),
            not_after: not_after.parse().ok(),
            issued_at: None,
            issuer: issuer.into(),
        }
    }

    #[test]
    fn a_certificate_is_due_when_missing_changed_or_expiring() {
        let now: Timestamp = "2026-12-01T00:00:00Z".parse().unwrap();
        let want = vec!["*.p.localhost".to_owned()];
        let month = Duration::from_secs(30 * 86_400);
        let cases = [
            None,
            Some(info(&["*.p.localhost"], "local-ca", "2027-03-01T00:00:00Z")),
            Some(info(&["*.q.localhost"], "local-ca", "2027-03-01T00:00:00Z")),
            Some(info(&["*.p.localhost"], "acme", "2027-03-01T00:00:00Z")),
            Some(info(&["*.p.localhost"], "local-ca", "2026-12-20T00:00:00Z")),
            Some(info(&["*.p.localhost"], "local-ca", "garbage")),
        ];
        let reasons: Vec<Option<&str>> = cases
            .iter()
            .map(|i| due(&want, i.as_ref(), "local-ca", now, month))
            .collect();
        // A window as long as the lifetime is capped at two thirds of it.
        let mut short = info(&["*.p.localhost"], "local-ca", "2026-12-01T00:00:20Z");
        short.issued_at = "2026-12-01T00:00:00Z".parse().ok();
        let just_issued: Timestamp = "2026-12-01T00:00:01Z".parse().unwrap();
        assert_eq!(
            due(&want, Some(&short), "local-ca", just_issued, month),
            None
        );
        let later: Timestamp = "2026-12-01T00:00:08Z".parse().unwrap();
        assert_eq!(
            due(&want, Some(&short), "local-ca", later, month),
            Some("expiring")
        );
        assert_eq!(
            reasons,
            [
                Some("missing"),
                None,
                Some("hostnames changed"),
                Some("issuer changed"),
                Some("expiring"),
                Some("expiry unknown"),
            ]
        );
    }

    #[test]
    fn the_condition_names_the_certificate_or_the_trouble() {
        let now: Timestamp = "2026-12-01T00:00:00Z".parse().unwrap();
        let certs = Certificates::default();
        assert!(certs.set("*.p.localhost", State::Pending));
        assert!(!certs.set("*.p.localhost", State::Pending));
        assert_eq!(certs.condition("a.p.localhost", now).1, PENDING);
        let (ok, reason, msg) = certs.condition("app.example.com", now);
        assert_eq!((ok, reason), (false, NOT_COVERED));
        assert!(msg.contains("*.p.localhost"), "{msg}");
        certs.set(
            "*.p.localhost",
            State::Failed {
                error: "connection refused".into(),
            },
        );
        let (ok, reason, msg) = certs.condition("a.p.localhost", now);
        assert_eq!((ok, reason), (false, ISSUE_FAILED));
        assert!(msg.contains("connection refused"), "{msg}");
        certs.set(
            "*.p.localhost",
            State::Ready {
                secret: "wildcard.p.localhost".into(),
                issuer: "local-ca".into(),
                not_after: "2027-01-01T00:00:00Z".parse().unwrap(),
            },
        );
        assert_eq!(certs.condition("a.p.localhost", now).1, ISSUED);
        assert_eq!(certs.condition("a.b.p.localhost", now).1, NOT_COVERED);
        let later: Timestamp = "2027-02-01T00:00:00Z".parse().unwrap();
        assert_eq!(certs.condition("a.p.localhost", later).1, PENDING);
    }
}
