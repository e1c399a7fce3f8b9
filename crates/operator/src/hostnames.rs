//! Who owns each hostname. One index holds every claimed name, canonical ones included,
//! across all projects and both kinds that serve names: HTTPProxies, and TCPProxies in
//! TLS passthrough (a name is either terminated at the edge or passed through, never
//! both). The rule:
//!
//! - a proxy's canonical name (`<uid>.<zone>`) belongs to it, whatever else claims it;
//! - otherwise the oldest claimant (creation time, then namespace/name) wins;
//! - claims overlap when they are the same name, or when a wildcard (`*.example.com`)
//!   covers the other name. Within one project a wildcard and the names below it may
//!   coexist (routing picks the most specific); across projects they may not.
//!
//! Updated by the proxy watch before any reconcile it triggers, so decisions read a
//! current index.

use std::collections::{BTreeSet, HashMap};

use std::sync::Arc;

use parking_lot::RwLock;
use portway_api::{HttpProxy, TcpProxy};

use crate::verify::Verifier;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Claim {
    pub created: i64,
    pub ns: String,
    pub name: String,
    /// `HTTPProxy` or `TCPProxy`: both may hold names, and may share a name.
    pub kind: String,
}

/// A proxy in the index: its kind, namespace and name.
pub type Key = (String, String, String);

impl Claim {
    /// The claim of a proxy of either kind (a hostname's, or a TCP port's): its age and
    /// name, which order claims.
    pub fn of<K: kube::Resource<DynamicType = ()>>(p: &K) -> Self {
        let m = p.meta();
        Self {
            kind: K::kind(&()).into_owned(),
            created: m
                .creation_timestamp
                .as_ref()
                .map_or(i64::MAX, |t| t.0.as_second()),
            ns: m.namespace.clone().unwrap_or_default(),
            name: m.name.clone().unwrap_or_default(),
        }
    }
}

/// One claim on one name: canonical names rank before every spec claim.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Held {
    spec: bool,
    claim: Claim,
}

#[derive(Default)]
struct Inner {
    /// Each proxy's claims, by kind and name.
    by_proxy: HashMap<Key, Vec<(String, Held)>>,
    by_host: HashMap<String, BTreeSet<Held>>,
    /// Names claimed as wildcards, `*.x` stored as `.x`: few, scanned for overlaps.
    wildcards: BTreeSet<String>,
    /// The `resourceVersion` each proxy's claims were taken from.
    versions: HashMap<Key, Option<String>>,
}

/// A name another proxy owns, as the refused proxy's status tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The owner's kind and name (`HTTPProxy namespace/name`) when it is in the same
    /// project; another project's names are not shown to this one.
    pub proxy: Option<String>,
    /// The name it holds (the same name, or an overlapping wildcard or canonical name).
    pub hostname: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.proxy {
            Some(p) => write!(f, "the {p} (as {})", self.hostname),
            None => write!(f, "another project (as {})", self.hostname),
        }
    }
}

pub struct HostnameIndex {
    zone: String,
    verifier: Option<Arc<Verifier>>,
    inner: RwLock<Inner>,
}

fn lower(h: &str) -> String {
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// A kind whose objects claim hostnames.
pub trait Claimant: kube::Resource<DynamicType = ()> {
    /// The names its spec asks for; `None` when it serves no name at all (a TCPProxy
    /// with a port of its own), not even its canonical one.
    fn spec_hostnames(&self) -> Option<&[String]>;
}

impl Claimant for HttpProxy {
    fn spec_hostnames(&self) -> Option<&[String]> {
        Some(&self.spec.hostnames)
    }
}

impl Claimant for TcpProxy {
    fn spec_hostnames(&self) -> Option<&[String]> {
        self.spec.tls.as_ref().map(|t| t.hostnames.as_slice())
    }
}

fn key_of(c: &Claim) -> Key {
    (c.kind.clone(), c.ns.clone(), c.name.clone())
}

/// The names a proxy claims: its spec's (those it has proven, where proof is needed), and
/// its canonical name.
fn claims<P: Claimant>(p: &P, zone: &str, verifier: Option<&Verifier>) -> Vec<(String, bool)> {
    let Some(spec) = p.spec_hostnames() else {
        return Vec::new();
    };
    let meta = p.meta();
    let ns = meta.namespace.as_deref().unwrap_or_default();
    let mut h: Vec<(String, bool)> = spec
        .iter()
        .filter(|h| verifier.is_none_or(|v| v.may_claim(ns, h)))
        // The zone and wildcards in it are refused (the proxy is not Accepted), and must
        // not block anyone's names meanwhile.
        .filter(|h| {
            let h = lower(h);
            let in_zone = |n: &str| n == zone || n.ends_with(&format!(".{zone}"));
            !(h == zone || h.strip_prefix("*.").is_some_and(in_zone))
        })
        .map(|h| (lower(h), true))
        .collect();
    if let Some(uid) = &meta.uid {
        h.push((lower(&format!("{uid}.{zone}")), false));
    }
    h.sort();
    h.dedup_by(|a, b| a.0 == b.0);
    h
}

/// Does wildcard `.suffix` (for `*.suffix`) cover `host`? Strictly below only.
fn covers(suffix: &str, host: &str) -> bool {
    host.strip_prefix('*').unwrap_or(host).ends_with(suffix)
        && host.len() > suffix.len()
        && host != format!("*{suffix}")
}

impl Inner {
    fn remove(&mut self, key: &Key) -> Vec<String> {
        self.versions.remove(key);
        let Some(claims) = self.by_proxy.remove(key) else {
            return Vec::new();
        };
        for (h, held) in &claims {
            if let Some(set) = self.by_host.get_mut(h) {
                set.remove(held);
                if set.is_empty() {
                    self.by_host.remove(h);
                    if let Some(s) = h.strip_prefix('*') {
                        self.wildcards.remove(s);
                    }
                }
            }
        }
        claims.into_iter().map(|(h, _)| h).collect()
    }

    fn insert(&mut self, claim: Claim, names: Vec<(String, bool)>) {
        let key = key_of(&claim);
        let mut claims = Vec::new();
        for (h, spec) in names {
            let held = Held {
                spec,
                claim: claim.clone(),
            };
            self.by_host
                .entry(h.clone())
                .or_default()
                .insert(held.clone());
            if let Some(s) = h.strip_prefix('*') {
                self.wildcards.insert(s.to_owned());
            }
            claims.push((h, held));
        }
        self.by_proxy.insert(key, claims);
    }

    /// Every (name, claim) that overlaps `host`: the same name, wildcards above it, and,
    /// for a wildcard, the names below it.
    fn overlapping<'a>(&'a self, host: &'a str) -> impl Iterator<Item = (&'a str, &'a Held)> + 'a {
        let same = self.by_host.get_key_value(host);
        let above = self
            .wildcards
            .iter()
            .filter(move |s| covers(s, host))
            .filter_map(|s| self.by_host.get_key_value(&format!("*{s}")));
        let below = host
            .strip_prefix('*')
            .into_iter()
            .flat_map(move |suffix| self.by_host.iter().filter(move |(h, _)| covers(suffix, h)));
        same.into_iter()
            .chain(above)
            .chain(below)
            .flat_map(|(h, set)| set.iter().map(move |c| (h.as_str(), c)))
    }

    fn claimants(&self, hosts: &[String]) -> BTreeSet<Key> {
        hosts
            .iter()
            .flat_map(|h| self.overlapping(h))
            .map(|(_, c)| key_of(&c.claim))
            .collect()
    }
}

impl HostnameIndex {
    pub fn new(zone: &str, verifier: Option<Arc<Verifier>>) -> Self {
        Self {
            zone: lower(zone),
            verifier,
            inner: RwLock::default(),
        }
    }

    /// Records the proxy's names; returns every proxy (kind, namespace, name) whose
    /// claims may have changed: those overlapping an old or new name.
    pub fn upsert<P: Claimant>(&self, p: &P) -> BTreeSet<Key> {
        self.set(p, false)
    }

    /// As [`HostnameIndex::upsert`], after a proxy's proofs changed, from a snapshot
    /// that may be stale: applied only while the index holds that very version of the
    /// proxy. A proxy deleted or changed meanwhile is left as the watch last told, so a
    /// slow lookup never brings back a claim the watch removed.
    pub fn refresh<P: Claimant>(&self, p: &P) -> BTreeSet<Key> {
        self.set(p, true)
    }

    fn set<P: Claimant>(&self, p: &P, known_only: bool) -> BTreeSet<Key> {
        let claim = Claim::of(p);
        let key = key_of(&claim);
        let version = p.meta().resource_version.clone();
        let names = claims(p, &self.zone, self.verifier.as_deref());
        let mut inner = self.inner.write();
        if known_only && inner.versions.get(&key) != Some(&version) {
            return BTreeSet::new();
        }
        let mut touched = inner.remove(&key);
        touched.extend(names.iter().map(|(h, _)| h.clone()));
        inner.insert(claim, names);
        inner.versions.insert(key, version);
        inner.claimants(&touched)
    }

    /// Forgets a proxy; returns the proxies that overlapped its names.
    pub fn remove<P: Claimant>(&self, p: &P) -> BTreeSet<Key> {
        let claim = Claim::of(p);
        let mut inner = self.inner.write();
        let old = inner.remove(&key_of(&claim));
        inner.claimants(&old)
    }

    /// Replaces every claim of `P`'s kind (after a relist, when deletions may have been
    /// missed); the other kind's stay.
    pub fn rebuild<'a, P: Claimant + 'a>(&self, all: impl IntoIterator<Item = &'a P>) {
        let kind = P::kind(&());
        let mut inner = self.inner.write();
        let stale: Vec<Key> = inner
            .by_proxy
            .keys()
            .filter(|k| k.0 == kind)
            .cloned()
            .collect();
        for k in &stale {
            inner.remove(k);
        }
        for p in all {
            let claim = Claim::of(p);
            let key = key_of(&claim);
            inner.insert(claim, claims(p, &self.zone, self.verifier.as_deref()));
            inner
                .versions
                .insert(key, p.meta().resource_version.clone());
        }
    }

    /// Who owns `host` if `me` (claiming it in its spec) may not have it: a canonical
    /// name, an older claim on the same name, or an older overlapping claim from another
    /// project.
    pub fn claimed_by(&self, host: &str, me: &Claim) -> Option<Owner> {
        let host = lower(host);
        let mine = Held {
            spec: true,
            claim: me.clone(),
        };
        let inner = self.inner.read();
        inner
            .overlapping(&host)
            .filter(|(h, c)| {
                c.claim != *me && **c < mine && (*h == host || c.claim.ns != me.ns || !c.spec)
            })
            .min_by(|a, b| a.1.cmp(b.1))
            .map(|(h, c)| Owner {
                proxy: (c.claim.ns == me.ns)
                    .then(|| format!("{} {}/{}", c.claim.kind, c.claim.ns, c.claim.name)),
                hostname: h.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use portway_api::HttpProxySpec;

    fn proxy(ns: &str, name: &str, created: i64, hosts: &[&str]) -> HttpProxy {
        let mut p = HttpProxy::new(
            name,
            HttpProxySpec {
                hostnames: hosts.iter().map(|h| h.to_string()).collect(),
                rules: vec![],
            },
        );
        p.metadata.namespace = Some(ns.into());
        p.metadata.uid = Some(format!("uid-{name}"));
        p.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        p
    }

    fn owner(idx: &HostnameIndex, host: &str, p: &HttpProxy) -> Option<String> {
        idx.claimed_by(host, &Claim::of(p)).map(|o| o.to_string())
    }

    #[test]
    fn oldest_claimant_wins_and_release_is_reported() {
        let idx = HostnameIndex::new("portway.localhost", None);
        let old = proxy("a", "old", 1, &["x.example.com"]);
        let new = proxy("a", "new", 2, &["X.example.com", "y.example.com"]);
        idx.upsert(&old);
        let touched = idx.upsert(&new);
        assert!(
            touched.contains(&("HTTPProxy".into(), "a".into(), "old".into()))
                && touched.contains(&("HTTPProxy".into(), "a".into(), "new".into()))
        );
        assert_eq!(
            owner(&idx, "x.example.com", &new).as_deref(),
            Some("the HTTPProxy a/old (as x.example.com)")
        );
        assert_eq!(owner(&idx, "x.example.com", &old), None);
        assert_eq!(owner(&idx, "y.example.com", &new), None);
        // The old proxy drops the hostname: the new one must be told.
        let touched = idx.upsert(&proxy("a", "old", 1, &["z.example.com"]));
        assert!(touched.contains(&("HTTPProxy".into(), "a".into(), "new".into())));
        assert_eq!(owner(&idx, "x.example.com", &new), None);
        let touched = idx.remove(&proxy("a", "new", 2, &[]));
        assert!(touched.is_empty());
    }

    fn tls_proxy(ns: &str, name: &str, created: i64, hosts: Option<&[&str]>) -> TcpProxy {
        let mut p = TcpProxy::new(
            name,
            portway_api::TcpProxySpec {
                tls: hosts.map(|h| portway_api::TlsPassthrough {
                    hostnames: h.iter().map(|h| h.to_string()).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        p.metadata.namespace = Some(ns.into());
        p.metadata.uid = Some(format!("uid-{name}"));
        p.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        p
    }

    /// A name is terminated at the edge or passed through, never both: HTTPProxies and
    /// passthrough TCPProxies claim from one index; a TCPProxy with a port claims nothing.
    #[test]
    fn passthrough_proxies_and_http_proxies_share_names() {
        let idx = HostnameIndex::new("portway.localhost", None);
        let tls = tls_proxy("a", "db", 1, Some(&["db.example.com"]));
        // Same name as the passthrough proxy, in another kind: it is not the same claim.
        let http = proxy("a", "db", 2, &["db.example.com"]);
        let port = tls_proxy("a", "plain", 0, None);
        idx.upsert(&tls);
        idx.upsert(&port);
        let touched = idx.upsert(&http);
        assert!(touched.contains(&("TCPProxy".into(), "a".into(), "db".into())));
        assert_eq!(
            owner(&idx, "db.example.com", &http).as_deref(),
            Some("the TCPProxy a/db (as db.example.com)")
        );
        assert_eq!(idx.claimed_by("db.example.com", &Claim::of(&tls)), None);
        assert_eq!(
            idx.claimed_by("uid-plain.portway.localhost", &Claim::of(&http)),
            None
        );
        // Relisting HTTPProxies keeps the passthrough proxy's claims.
        idx.rebuild([&http]);
        assert!(owner(&idx, "db.example.com", &http).is_some());
        let touched = idx.remove(&tls);
        assert!(touched.contains(&("HTTPProxy".into(), "a".into(), "db".into())));
        assert_eq!(owner(&idx, "db.example.com", &http), None);
        // A refresh from a snapshot of the deleted proxy (a slow proof lookup) brings
        // nothing back; one of an older version of a live proxy neither.
        assert!(idx.refresh(&tls).is_empty());
        assert_eq!(owner(&idx, "db.example.com", &http), None);
        let mut newer = tls_proxy("a", "db", 1, Some(&["other.example.com"]));
        newer.metadata.resource_version = Some("2".into());
        idx.upsert(&newer);
        let mut older = tls_proxy("a", "db", 1, Some(&["db.example.com"]));
        older.metadata.resource_version = Some("1".into());
        assert!(idx.refresh(&older).is_empty());
        assert_eq!(owner(&idx, "db.example.com", &http), None);
    }

    #[test]
    fn canonical_names_belong_to_their_proxy_and_other_projects_are_not_named() {
        let idx = HostnameIndex::new("portway.localhost", None);
        let victim = proxy("a", "web", 5, &[]);
        // Older, and in another project: it still cannot take the canonical name.
        let thief = proxy("b", "steal", 1, &["uid-web.portway.localhost"]);
        idx.upsert(&thief);
        let touched = idx.upsert(&victim);
        assert!(touched.contains(&("HTTPProxy".into(), "b".into(), "steal".into())));
        assert_eq!(
            owner(&idx, "UID-web.portway.localhost", &thief).as_deref(),
            Some("another project (as uid-web.portway.localhost)")
        );
    }

    #[test]
    fn wildcards_overlap_across_projects_only() {
        let idx = HostnameIndex::new("portway.localhost", None);
        let wild = proxy("a", "wild", 1, &["*.example.com"]);
        let same_project = proxy("a", "one", 2, &["one.example.com"]);
        let other_project = proxy("b", "two", 3, &["two.example.com", "deep.two.example.com"]);
        let apex = proxy("b", "apex", 4, &["example.com"]);
        for p in [&wild, &same_project, &other_project, &apex] {
            idx.upsert(p);
        }
        assert_eq!(owner(&idx, "one.example.com", &same_project), None);
        assert_eq!(
            owner(&idx, "deep.two.example.com", &other_project).as_deref(),
            Some("another project (as *.example.com)")
        );
        assert_eq!(
            owner(&idx, "example.com", &apex),
            None,
            "a wildcard does not cover its apex"
        );
        // A younger wildcard from another project over an older name is refused too.
        let late = proxy("c", "late", 9, &["*.two.example.com"]);
        idx.upsert(&late);
        assert_eq!(
            owner(&idx, "*.two.example.com", &late).as_deref(),
            Some("another project (as *.example.com)")
        );
        idx.remove(&wild);
        assert_eq!(
            owner(&idx, "*.two.example.com", &late).as_deref(),
            Some("another project (as deep.two.example.com)")
        );
        assert_eq!(owner(&idx, "two.example.com", &other_project), None);
    }
}
