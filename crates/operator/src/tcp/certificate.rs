//! A device's own certificate for its passthrough names: the device puts a request for
//! its own key in `spec.tls.certificateRequest` (`portway tls --cert-dir`), the operator
//! checks it names only names this proxy serves, and has the installation's issuer sign it
//! — an ACME order answered over DNS-01 by Portway's DNS server for names in the zone
//! (HTTP-01 by the edges outside it), or the local CA. The chain goes to
//! `status.certificate` and is renewed before it expires. The key never leaves the device,
//! and the edge, which only splices the TLS bytes, never sees it either.
//!
//! [`check`] decides from the proxy alone (pure); [`DeviceCertificates`] remembers each
//! request's state between reconciles, and [`run`] issues and renews in the background,
//! so a slow ACME order never holds a reconcile.

use std::collections::btree_map::Entry as Slot;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kube::runtime::reflector::{ObjectRef, Store};
use parking_lot::Mutex;
use portway_api::TcpProxy;
use portway_tls::csr::{self, Request};
use tokio_util::sync::CancellationToken;

use crate::certs::Issuer;

/// The condition type, on TCPProxies with a certificate request.
pub const CERTIFICATE_READY: &str = "CertificateReady";
pub const ISSUED: &str = "Issued";
pub const PENDING: &str = "Pending";
pub const ISSUE_FAILED: &str = "IssueFailed";
pub const INVALID_REQUEST: &str = "InvalidRequest";
pub const NAME_NOT_SERVED: &str = "NameNotServed";
pub const NO_ISSUER: &str = "NoIssuer";
pub const NAME_NOT_PROVEN: &str = "NameNotProven";

/// A proxy gets a certificate for a new request (a new key, other names) at most this
/// often; renewals are not counted.
pub const NEW_REQUEST_EVERY: Duration = Duration::from_secs(600);
/// Certificates issued for devices in any hour, across the installation: ACME CAs limit
/// how many they issue per domain and account, and the zone's own renewals need some.
pub const PER_HOUR: usize = 30;

const FIELD: &str = "spec.tls.certificateRequest";

/// What a proxy's request calls for, before any issuing.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No request: no condition and no certificate.
    None,
    /// Refused: the reason and a sentence naming the field; no certificate.
    Refused(&'static str, String),
    /// A sound request for names the proxy serves.
    Wanted(Request),
}

/// Checks `request` (PEM, as written) against `served`: the names this proxy is serving,
/// as the operator decided them (never a status someone else wrote). `proven` says
/// whether a name may be in a certificate: under the zone, or proven by the project —
/// serving a name (which an installation without proofs allows) is not enough to have a
/// CA vouch for it.
pub fn check(
    request: Option<&str>,
    served: &[String],
    proven: &dyn Fn(&str) -> bool,
    issuer: bool,
) -> Verdict {
    let Some(pem) = request else {
        return Verdict::None;
    };
    let request = match csr::parse(pem) {
        Ok(r) => r,
        Err(e) => return Verdict::Refused(INVALID_REQUEST, format!("{FIELD}: {e}")),
    };
    let unserved: Vec<&str> = request
        .names
        .iter()
        .filter(|n| !served.contains(n))
        .map(String::as_str)
        .collect();
    if !unserved.is_empty() {
        let serving = if served.is_empty() {
            "none yet: it is not accepted".to_owned()
        } else {
            served.join(", ")
        };
        return Verdict::Refused(
            NAME_NOT_SERVED,
            format!(
                "{FIELD} names {}, which this proxy does not serve (it serves {serving}); a certificate is issued only for a proxy's own names",
                unserved.join(", ")
            ),
        );
    }
    let unproven: Vec<&str> = request
        .names
        .iter()
        .filter(|n| !proven(n))
        .map(String::as_str)
        .collect();
    if !unproven.is_empty() {
        return Verdict::Refused(
            NAME_NOT_PROVEN,
            format!(
                "{FIELD} names {}, outside the zone and not proven by this project (see HostnamesVerified): a certificate vouches for a custom name only once it is proven",
                unproven.join(", ")
            ),
        );
    }
    if !issuer {
        return Verdict::Refused(
            NO_ISSUER,
            format!(
                "{FIELD}: this installation issues no certificates (start it with --https, or --acme-directory for ACME)"
            ),
        );
    }
    Verdict::Wanted(request)
}

/// When a certificate valid from `not_before` to `not_after` should be renewed: with
/// `renew_before` left, but never before a third of its life has passed (so a short-lived
/// certificate, or a window as long as the validity, does not make every pass a renewal).
pub fn renew_at(
    not_before: SystemTime,
    not_after: SystemTime,
    renew_before: Duration,
) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    not_after - renew_before.min(lifetime / 3 * 2).min(lifetime)
}

/// Where one request stands.
#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Pending,
    Ready,
    Failed(String),
}

#[derive(Debug)]
struct Entry {
    request: Request,
    /// The chain answering `request`: issued here, or found in status.
    chain: Option<String>,
    not_after: SystemTime,
    renew_at: SystemTime,
    state: State,
    /// Next attempt after a failure, and the delay that led to it.
    retry: Option<(tokio::time::Instant, Duration)>,
    /// Why it waits although due (a limit), for the condition.
    waiting: Option<String>,
}

impl Entry {
    fn new(request: Request) -> Self {
        Self {
            request,
            chain: None,
            not_after: SystemTime::UNIX_EPOCH,
            renew_at: SystemTime::UNIX_EPOCH,
            state: State::Pending,
            retry: None,
            waiting: None,
        }
    }
}

/// The same request, for issuing: the same key for the same names (a request made again
/// differs in its signature bytes only).
fn same(a: &Request, b: &Request) -> bool {
    a.public_key == b.public_key && a.names == b.names
}

type Key = (String, String);

/// How many certificates were issued lately, for [`NEW_REQUEST_EVERY`] and [`PER_HOUR`].
#[derive(Debug, Default)]
struct Limits {
    recent: VecDeque<tokio::time::Instant>,
    /// When each proxy last got a certificate for a new request; kept after its entry
    /// goes, so deleting and recreating a request does not reset it.
    last_new: HashMap<Key, tokio::time::Instant>,
}

/// Every passthrough proxy's request, by namespace and name.
#[derive(Debug, Default)]
pub struct DeviceCertificates {
    entries: Mutex<BTreeMap<Key, Entry>>,
    limits: Mutex<Limits>,
    /// Chains no longer wanted (their names lost, or a new key asked for): revoked, so a
    /// key that leaves a name behind does not keep a certificate for it.
    unwanted: Mutex<Vec<String>>,
    wake: tokio::sync::Notify,
}

/// What a reconcile writes: the condition (status, reason, message) and the chain.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub condition: Option<(bool, &'static str, String)>,
    pub chain: Option<String>,
}

impl DeviceCertificates {
    /// Records what a reconcile decided for the proxy `key` (whose status holds
    /// `current`) and says what its status should show. A current chain that answers the
    /// request is kept, so a restarted operator issues nothing.
    pub fn observe(
        &self,
        key: (&str, &str),
        verdict: Verdict,
        current: Option<&str>,
        issuer: &str,
        renew_before: Duration,
    ) -> Outcome {
        let key = (key.0.to_owned(), key.1.to_owned());
        let mut entries = self.entries.lock();
        let request = match verdict {
            Verdict::None => {
                self.drop_entry(entries.remove(&key));
                return Outcome {
                    condition: None,
                    chain: None,
                };
            }
            Verdict::Refused(reason, message) => {
                self.drop_entry(entries.remove(&key));
                return Outcome {
                    condition: Some((false, reason, message)),
                    chain: None,
                };
            }
            Verdict::Wanted(r) => r,
        };
        let entry = match entries.entry(key) {
            Slot::Occupied(e) if same(&e.get().request, &request) => e.into_mut(),
            slot => {
                // Status is the operator's alone (the API server refuses anyone else's
                // write), so a chain there that answers the request was issued here.
                let kept = current.and_then(|c| Some((c, csr::leaf(c).ok()?)));
                let entry = match kept {
                    Some((chain, leaf)) if leaf.answers(&request) => Entry {
                        chain: Some(chain.to_owned()),
                        not_after: leaf.not_after,
                        renew_at: renew_at(leaf.not_before, leaf.not_after, renew_before),
                        state: State::Ready,
                        ..Entry::new(request)
                    },
                    _ => Entry::new(request),
                };
                self.wake.notify_one();
                match slot {
                    Slot::Occupied(mut e) => {
                        let old = e.insert(entry);
                        self.drop_entry(Some(old));
                        e.into_mut()
                    }
                    Slot::Vacant(e) => e.insert(entry),
                }
            }
        };
        let now = SystemTime::now();
        let valid = entry.chain.is_some() && entry.not_after > now;
        let names = entry.request.names.join(", ");
        let until = k8s_openapi::jiff::Timestamp::try_from(entry.not_after)
            .map(|t| t.to_string())
            .unwrap_or_default();
        let condition = match (&entry.state, valid) {
            (State::Failed(e), true) => (
                true,
                ISSUED,
                format!(
                    "issued for {names} by {issuer}, valid until {until}; renewing failed: {e}"
                ),
            ),
            (_, true) => (
                true,
                ISSUED,
                format!("issued for {names} by {issuer}, valid until {until}"),
            ),
            (State::Failed(e), false) => (
                false,
                ISSUE_FAILED,
                format!("issuing the certificate for {names} failed: {e}"),
            ),
            (_, false) => (
                false,
                PENDING,
                match &entry.waiting {
                    Some(why) => format!("the certificate for {names} waits: {why}"),
                    None => format!("the certificate for {names} is being issued by {issuer}"),
                },
            ),
        };
        Outcome {
            condition: Some(condition),
            chain: entry.chain.clone().filter(|_| valid),
        }
    }

    /// A chain no longer wanted goes to be revoked.
    fn drop_entry(&self, entry: Option<Entry>) {
        if let Some(chain) = entry.and_then(|e| e.chain) {
            self.unwanted.lock().push(chain);
            self.wake.notify_one();
        }
    }

    /// The requests due now (new, retried, or to renew, within the limits), and how long
    /// until the next one.
    fn due(&self, now: tokio::time::Instant, wall: SystemTime) -> (Vec<(Key, Request)>, Duration) {
        const HOUR: Duration = Duration::from_secs(3600);
        let mut next = Duration::from_secs(60);
        let mut due = Vec::new();
        let mut limits = self.limits.lock();
        while limits
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= HOUR)
        {
            limits.recent.pop_front();
        }
        limits
            .last_new
            .retain(|_, t| now.duration_since(*t) < NEW_REQUEST_EVERY);
        for (key, e) in self.entries.lock().iter_mut() {
            if let Some((at, _)) = e.retry
                && at > now
            {
                next = next.min(at - now);
                continue;
            }
            let renew = e.renew_at.duration_since(wall);
            if let (State::Ready, Ok(left)) = (&e.state, renew) {
                next = next.min(left);
                continue;
            }
            let renewal = e.chain.is_some();
            let last = limits.last_new.get(key).copied();
            e.waiting = match last {
                Some(t) if !renewal => {
                    let wait = NEW_REQUEST_EVERY - now.duration_since(t);
                    next = next.min(wait);
                    Some(format!(
                        "a proxy gets a certificate for a new request at most every {} minutes ({} s to go)",
                        NEW_REQUEST_EVERY.as_secs() / 60,
                        wait.as_secs()
                    ))
                }
                _ if limits.recent.len() + due.len() >= PER_HOUR => {
                    let oldest = limits.recent.front().copied().unwrap_or(now);
                    let wait = HOUR.saturating_sub(now.duration_since(oldest));
                    next = next.min(wait.max(Duration::from_secs(1)));
                    Some(format!(
                        "at most {PER_HOUR} device certificates are issued an hour, and that many were ({} s to go)",
                        wait.as_secs()
                    ))
                }
                _ => None,
            };
            if e.waiting.is_none() {
                due.push((key.clone(), e.request.clone()));
            }
        }
        (due, next)
    }

    /// Records an issuance for `request` (unless the proxy has asked for another since).
    fn issued(&self, key: &Key, request: &Request, result: Result<String, String>, config: &Retry) {
        let mut entries = self.entries.lock();
        let Some(e) = entries.get_mut(key).filter(|e| same(&e.request, request)) else {
            return;
        };
        let now = SystemTime::now();
        let leaf = result.and_then(|chain| {
            let leaf = csr::leaf(&chain).map_err(|e| format!("the issuer sent {e}"))?;
            if !leaf.answers(request) {
                Err("the issuer sent a certificate for another key or other names".to_owned())
            } else if leaf.not_after <= now + Duration::from_secs(2) {
                Err("the issuer sent a certificate that has already expired".to_owned())
            } else {
                Ok((chain, leaf))
            }
        });
        match leaf {
            Ok((chain, leaf)) => {
                let mut limits = self.limits.lock();
                limits.recent.push_back(tokio::time::Instant::now());
                if e.chain.is_none() {
                    limits
                        .last_new
                        .insert(key.clone(), tokio::time::Instant::now());
                }
                // Counted from now, not from a backdated start (the local CA's allows for
                // clock skew), and never sooner than a minute or half its life away: a
                // window longer than the certificate must not make the loop sign again
                // at once.
                let lifetime = leaf.not_after.duration_since(now).unwrap_or_default();
                let soonest = now + Duration::from_secs(60).min(lifetime / 2);
                e.renew_at = renew_at(now, leaf.not_after, config.renew_before).max(soonest);
                e.chain = Some(chain);
                e.not_after = leaf.not_after;
                e.state = State::Ready;
                e.retry = None;
            }
            Err(error) => {
                let delay = e
                    .retry
                    .map_or(config.first, |(_, d)| (d * 2).min(config.max));
                e.retry = Some((tokio::time::Instant::now() + delay, delay));
                e.state = State::Failed(error);
            }
        }
    }

    fn forget_missing(&self, store: &Store<TcpProxy>) -> Vec<Key> {
        let mut entries = self.entries.lock();
        let gone: Vec<Key> = entries
            .keys()
            .filter(|(ns, name)| store.get(&ObjectRef::new(name).within(ns)).is_none())
            .cloned()
            .collect();
        for k in &gone {
            self.drop_entry(entries.remove(k));
        }
        gone
    }

    fn take_unwanted(&self) -> Vec<String> {
        std::mem::take(&mut *self.unwanted.lock())
    }
}

/// How issuing is retried and renewed.
#[derive(Clone, Debug)]
pub struct Retry {
    pub first: Duration,
    pub max: Duration,
    pub renew_before: Duration,
}

/// What the issuing loop needs.
pub(crate) struct Run {
    pub certificates: Arc<DeviceCertificates>,
    pub issuer: Issuer,
    pub zone: String,
    pub validity: Duration,
    pub retry: Retry,
    pub proxies: Store<TcpProxy>,
    /// Reconciles a proxy whose certificate changed, so its status shows it.
    pub requeue: crate::Tx<TcpProxy>,
    pub events: portway_kube::Events,
}

/// Issues what is wanted and renews what is due, one order at a time, until `shutdown`.
pub(crate) async fn run(run: Run, shutdown: CancellationToken) {
    loop {
        run.certificates.forget_missing(&run.proxies);
        for chain in run.certificates.take_unwanted() {
            revoke(&run, &chain).await;
        }
        let (due, next) = run
            .certificates
            .due(tokio::time::Instant::now(), SystemTime::now());
        // What was issued now is next due at its renewal: look again before waiting.
        let issued_any = !due.is_empty();
        for (key, request) in due {
            let names = request.names.join(", ");
            tracing::info!(proxy = %format!("{}/{}", key.0, key.1), %names, "issuing a device's certificate");
            let result = sign(&run, &request).await;
            let reference = run
                .proxies
                .get(&ObjectRef::new(&key.1).within(&key.0))
                .map(|p| kube::Resource::object_ref(&*p, &()));
            if let Some(reference) = &reference {
                let (kind, reason, note) = match &result {
                    Ok(_) => (
                        portway_kube::events::Kind::Normal,
                        "CertificateIssued",
                        format!("issued for {names} by {}", run.issuer.name()),
                    ),
                    Err(e) => (
                        portway_kube::events::Kind::Warning,
                        "CertificateFailed",
                        format!("issuing for {names}: {e}"),
                    ),
                };
                run.events
                    .record(reference, kind, reason, "Issue", note)
                    .await;
            }
            if let Err(e) = &result {
                tracing::warn!(proxy = %format!("{}/{}", key.0, key.1), error = %e, "issuing a device's certificate");
            }
            run.certificates.issued(&key, &request, result, &run.retry);
            let _ = run.requeue.send(ObjectRef::new(&key.1).within(&key.0));
        }
        if issued_any && !shutdown.is_cancelled() {
            continue;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = run.certificates.wake.notified() => {}
            () = tokio::time::sleep(next) => {}
        }
    }
}

/// Revokes a chain no longer wanted, where the issuer can: an ACME CA publishes it. The
/// local CA keeps no revocation list; its certificates end at their expiry.
async fn revoke(run: &Run, chain: &str) {
    let Issuer::Acme(acme) = &run.issuer else {
        return;
    };
    match acme.revoke(chain.as_bytes()).await {
        Ok(()) => tracing::info!("revoked a device's certificate no longer wanted"),
        Err(e) => tracing::warn!(error = %e, "revoking a device's certificate"),
    }
}

async fn sign(run: &Run, request: &Request) -> Result<String, String> {
    match &run.issuer {
        Issuer::LocalCa(ca) => ca
            .sign(request, run.validity)
            .map(|issued| format!("{}{}", issued.cert_pem, ca.cert_pem))
            .map_err(|e| format!("the local CA could not sign: {e}")),
        Issuer::Acme(acme) => acme.sign(request, &run.zone).await,
    }
}

#[cfg(test)]
mod tests;
