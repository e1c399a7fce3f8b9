//! Proof that a project controls a hostname outside Portway's zone, before any of its
//! proxies may claim or route it: a TXT record `_portway-challenge.<name>` holding the
//! project's token for that name, or (for a plain name) a CNAME from the name to the
//! proxy's canonical name. Names under the zone are the project's by construction (the
//! zone is ours), and `.localhost` names resolve only on the machine that asks, so
//! nobody owns them: neither needs proof.
//!
//! Until a name is verified it is not routed and claims nothing in the hostname index,
//! so a project that names someone else's domain first blocks nobody (cross-project
//! squatting). Answers are cached: an unverified name is asked again every
//! `recheck_pending`, a verified one every `recheck_verified`, and a proof that
//! disappears unverifies the name.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use parking_lot::RwLock;
use sha2::{Digest, Sha256};

#[derive(Clone, Debug)]
pub struct Config {
    /// The resolver asked (recursion desired), e.g. the machine's own.
    pub resolver: SocketAddr,
    pub recheck_pending: Duration,
    pub recheck_verified: Duration,
}

impl Config {
    /// Asks `resolver`; unverified names every 5 s, verified ones every 5 min.
    pub fn new(resolver: SocketAddr) -> Self {
        Self {
            resolver,
            recheck_pending: Duration::from_secs(5),
            recheck_verified: Duration::from_secs(300),
        }
    }
}

/// Condition type and reasons, per hostname.
pub mod reasons {
    pub const HOSTNAMES_VERIFIED: &str = "HostnamesVerified";
    pub const VERIFIED: &str = "Verified";
    pub const NOT_REQUIRED: &str = "VerificationNotRequired";
    pub const NOT_VERIFIED: &str = "NotVerified";
}

/// Where one name stands, as status tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verification {
    /// Under the zone, or `.localhost`: the reason.
    NotRequired(String),
    /// How it was proven.
    Verified(String),
    /// What to publish, and what the last look found.
    Pending { instructions: String, found: String },
}

impl Verification {
    pub fn routable(&self) -> bool {
        !matches!(self, Self::Pending { .. })
    }
}

/// The lowercase name without a wildcard: what a proof is about.
fn base(host: &str) -> String {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    h.strip_prefix("*.").map(str::to_owned).unwrap_or(h)
}

/// Why `host` needs no proof in `zone`, if it needs none.
pub fn exempt(host: &str, zone: &str) -> Option<String> {
    let h = base(host);
    let zone = zone.trim_end_matches('.').to_ascii_lowercase();
    if h == zone || h.ends_with(&format!(".{zone}")) {
        Some(format!("{h} is under Portway's zone {zone}"))
    } else if h == "localhost" || h.ends_with(".localhost") {
        Some(format!(
            "{h} is a .localhost name, reachable only from this machine"
        ))
    } else {
        None
    }
}

/// Where the TXT proof for `host` goes.
pub fn record_name(host: &str) -> String {
    format!("_portway-challenge.{}", base(host))
}

/// The project's token for `host`: the same for every proxy of the project, another for
/// every other project, so one project's proof never verifies the name for another.
pub fn token(project: &str, host: &str) -> String {
    let digest = Sha256::digest(format!("portway-hostname-v1\0{project}\0{}", base(host)));
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("portway-verify={hex}")
}

#[derive(Clone, Debug)]
struct Entry {
    verified: Option<String>,
    found: String,
    checked: Instant,
}

/// Cached proofs, by (project, name).
pub struct Verifier {
    config: Config,
    zone: String,
    entries: RwLock<HashMap<(String, String), Entry>>,
    pruned: parking_lot::Mutex<Instant>,
}

/// An entry not looked at for this long belongs to no proxy any more.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

impl Verifier {
    pub fn new(config: Config, zone: &str) -> Self {
        Self {
            config,
            zone: zone.to_owned(),
            entries: RwLock::default(),
            pruned: parking_lot::Mutex::new(Instant::now()),
        }
    }

    fn instructions(&self, project: &str, host: &str, canonical: Option<&str>) -> String {
        let txt = format!(
            "publish TXT {} \"{}\"",
            record_name(host),
            token(project, host)
        );
        match canonical {
            Some(c) if !host.starts_with("*.") => format!("{txt}, or CNAME {} to {c}", base(host)),
            _ => txt,
        }
    }

    /// What is known of `host` for `project` now (no lookup).
    pub fn state(&self, project: &str, host: &str, canonical: Option<&str>) -> Verification {
        if let Some(why) = exempt(host, &self.zone) {
            return Verification::NotRequired(why);
        }
        let entries = self.entries.read();
        match entries.get(&(project.to_owned(), base(host))) {
            Some(Entry {
                verified: Some(how),
                ..
            }) => Verification::Verified(how.clone()),
            other => Verification::Pending {
                instructions: self.instructions(project, host, canonical),
                found: other.map_or_else(|| "not looked up yet".into(), |e| e.found.clone()),
            },
        }
    }

    /// Whether a proxy of `project` may claim `host` in the hostname index.
    pub fn may_claim(&self, project: &str, host: &str) -> bool {
        self.state(project, host, None).routable()
    }

    /// Looks `host` up again if its last look is old enough, or at once with `force` (a
    /// proxy that has not been told yet: new, or changed); true when its verdict changed
    /// (claims and routes must follow).
    pub async fn refresh(
        &self,
        project: &str,
        host: &str,
        canonical: Option<&str>,
        force: bool,
    ) -> bool {
        if exempt(host, &self.zone).is_some() {
            return false;
        }
        let key = (project.to_owned(), base(host));
        self.prune();
        let previous = self.entries.read().get(&key).cloned();
        let due = force
            || previous.as_ref().is_none_or(|e| {
                let every = if e.verified.is_some() {
                    self.config.recheck_verified
                } else {
                    self.config.recheck_pending
                };
                e.checked.elapsed() >= every
            });
        if !due {
            return false;
        }
        let (verified, found, answered) = self.look(project, host, canonical).await;
        // A resolver that did not answer proves nothing either way: a proven name keeps
        // its verdict (and is asked again soon) instead of losing its route and
        // certificate to one lost packet.
        if !answered && let Some(prev) = previous.as_ref().filter(|e| e.verified.is_some()) {
            let soon = self
                .config
                .recheck_verified
                .saturating_sub(self.config.recheck_pending);
            let mut kept = prev.clone();
            kept.checked = Instant::now()
                .checked_sub(soon)
                .unwrap_or_else(Instant::now);
            self.entries.write().insert(key, kept);
            tracing::warn!(host, project, %found, "the resolver did not answer; keeping the proof");
            return false;
        }
        let changed = previous.and_then(|e| e.verified).is_some() != verified.is_some();
        self.entries.write().insert(
            key,
            Entry {
                verified,
                found,
                checked: Instant::now(),
            },
        );
        changed
    }

    /// Forgets names nobody asked about for an hour (every listed name is looked at every
    /// 5 min at most), so edited hostnames do not pile up.
    fn prune(&self) {
        let mut last = self.pruned.lock();
        if last.elapsed() < FORGET_AFTER / 6 {
            return;
        }
        *last = Instant::now();
        self.entries
            .write()
            .retain(|_, e| e.checked.elapsed() < FORGET_AFTER);
    }

    /// When the next look at `host` is due.
    pub fn next_look(&self, project: &str, host: &str) -> Option<Duration> {
        if exempt(host, &self.zone).is_some() {
            return None;
        }
        let entries = self.entries.read();
        let e = entries.get(&(project.to_owned(), base(host)))?;
        let every = if e.verified.is_some() {
            self.config.recheck_verified
        } else {
            self.config.recheck_pending
        };
        Some(every.saturating_sub(e.checked.elapsed()))
    }

    /// Asks the resolver: the proof, or what was found instead.
    async fn look(
        &self,
        project: &str,
        host: &str,
        canonical: Option<&str>,
    ) -> (Option<String>, String, bool) {
        let resolver = self.config.resolver;
        let record = record_name(host);
        let want = token(project, host);
        let txt = crate::dns::ask(resolver, &record, RecordType::TXT).await;
        if let Ok(a) = &txt
            && a.txt.iter().any(|v| v.trim() == want)
        {
            return (
                Some(format!("TXT {record} holds this project's token")),
                String::new(),
                true,
            );
        }
        let cname = match canonical {
            Some(c) if !host.starts_with("*.") => {
                let a = crate::dns::ask(resolver, &base(host), RecordType::CNAME).await;
                if let Ok(a) = &a
                    && a.cname.iter().any(|t| t == c)
                {
                    return (
                        Some(format!("{} is a CNAME to {c}", base(host))),
                        String::new(),
                        true,
                    );
                }
                Some(a)
            }
            _ => None,
        };
        let mut answered = txt.is_ok();
        let mut found = match txt {
            Ok(a) if a.txt.is_empty() => format!("{resolver} has no TXT at {record}"),
            Ok(a) => format!(
                "{resolver} has TXT {record} {:?}, not this project's token",
                a.txt
            ),
            Err(e) => e,
        };
        if let Some(c) = cname {
            answered &= c.is_ok();
            found.push_str(&match c {
                Ok(a) if a.cname.is_empty() => format!("; no CNAME at {}", base(host)),
                Ok(a) => format!("; CNAME {} to {}", base(host), a.cname.join(", ")),
                Err(e) => format!("; {e}"),
            });
        }
        (None, found, answered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_and_localhost_names_need_no_proof_and_tokens_differ_by_project() {
        assert!(exempt("a.portway.localhost", "portway.localhost").is_some());
        assert!(exempt("*.p.example.com", "p.example.com").is_some());
        assert!(exempt("app.localhost", "p.example.com").is_some());
        assert!(exempt("shop.example.com", "p.example.com").is_none());
        assert!(exempt("evilp.example.com", "p.example.com").is_none());
        assert_eq!(
            record_name("*.Shop.example.com."),
            "_portway-challenge.shop.example.com"
        );
        assert_eq!(token("team-a", "shop.test"), token("team-a", "SHOP.test."));
        assert_ne!(token("team-a", "shop.test"), token("team-b", "shop.test"));
        assert_eq!(token("team-a", "*.shop.test"), token("team-a", "shop.test"));
    }
}
