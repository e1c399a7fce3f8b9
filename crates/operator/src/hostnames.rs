//! Which HTTPProxy owns each hostname: the oldest claimant (creation time, then
//! namespace/name) across all projects. Updated by the proxy watch before any reconcile
//! it triggers, so decisions read a current index.

use std::collections::{BTreeSet, HashMap};

use parking_lot::RwLock;
use portway_api::HttpProxy;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Claim {
    pub created: i64,
    pub ns: String,
    pub name: String,
}

impl Claim {
    pub fn of(p: &HttpProxy) -> Self {
        Self {
            created: p
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(i64::MAX, |t| t.0.as_second()),
            ns: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone().unwrap_or_default(),
        }
    }
}

#[derive(Default)]
struct Inner {
    by_proxy: HashMap<(String, String), (Claim, Vec<String>)>,
    by_host: HashMap<String, BTreeSet<Claim>>,
}

#[derive(Default)]
pub struct HostnameIndex {
    inner: RwLock<Inner>,
}

fn hosts(p: &HttpProxy) -> Vec<String> {
    let mut h: Vec<String> = p
        .spec
        .hostnames
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    h.sort();
    h.dedup();
    h
}

impl Inner {
    fn remove(&mut self, key: &(String, String)) -> Vec<String> {
        let Some((claim, hosts)) = self.by_proxy.remove(key) else {
            return Vec::new();
        };
        for h in &hosts {
            if let Some(set) = self.by_host.get_mut(h) {
                set.remove(&claim);
                if set.is_empty() {
                    self.by_host.remove(h);
                }
            }
        }
        hosts
    }

    fn claimants(&self, hosts: &[String]) -> BTreeSet<(String, String)> {
        hosts
            .iter()
            .filter_map(|h| self.by_host.get(h))
            .flatten()
            .map(|c| (c.ns.clone(), c.name.clone()))
            .collect()
    }
}

impl HostnameIndex {
    /// Records the proxy's hostnames; returns every proxy (namespace, name) whose claims
    /// may have changed: those sharing an old or new hostname.
    pub fn upsert(&self, p: &HttpProxy) -> BTreeSet<(String, String)> {
        let claim = Claim::of(p);
        let key = (claim.ns.clone(), claim.name.clone());
        let new = hosts(p);
        let mut inner = self.inner.write();
        let mut touched = inner.remove(&key);
        for h in &new {
            inner
                .by_host
                .entry(h.clone())
                .or_default()
                .insert(claim.clone());
        }
        touched.extend(new.iter().cloned());
        inner.by_proxy.insert(key, (claim, new));
        inner.claimants(&touched)
    }

    /// Forgets a proxy; returns the proxies that shared its hostnames.
    pub fn remove(&self, p: &HttpProxy) -> BTreeSet<(String, String)> {
        let claim = Claim::of(p);
        let mut inner = self.inner.write();
        let old = inner.remove(&(claim.ns, claim.name));
        inner.claimants(&old)
    }

    /// Replaces everything (after a relist, when deletions may have been missed).
    pub fn rebuild<'a>(&self, all: impl IntoIterator<Item = &'a HttpProxy>) {
        let mut inner = Inner::default();
        for p in all {
            let claim = Claim::of(p);
            let h = hosts(p);
            for host in &h {
                inner
                    .by_host
                    .entry(host.clone())
                    .or_default()
                    .insert(claim.clone());
            }
            inner
                .by_proxy
                .insert((claim.ns.clone(), claim.name.clone()), (claim, h));
        }
        *self.inner.write() = inner;
    }

    /// The `namespace/name` of an older proxy holding `host`, if `me` is not the owner.
    pub fn claimed_by(&self, host: &str, me: &Claim) -> Option<String> {
        let inner = self.inner.read();
        let owner = inner
            .by_host
            .get(&host.to_ascii_lowercase())?
            .iter()
            .next()?;
        (owner < me).then(|| format!("{}/{}", owner.ns, owner.name))
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
        p.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        p
    }

    #[test]
    fn oldest_claimant_wins_and_release_is_reported() {
        let idx = HostnameIndex::default();
        let old = proxy("a", "old", 1, &["x.example.com"]);
        let new = proxy("b", "new", 2, &["X.example.com", "y.example.com"]);
        idx.upsert(&old);
        let touched = idx.upsert(&new);
        assert!(
            touched.contains(&("a".into(), "old".into()))
                && touched.contains(&("b".into(), "new".into()))
        );
        assert_eq!(
            idx.claimed_by("x.example.com", &Claim::of(&new)),
            Some("a/old".into())
        );
        assert_eq!(idx.claimed_by("x.example.com", &Claim::of(&old)), None);
        assert_eq!(idx.claimed_by("y.example.com", &Claim::of(&new)), None);
        // The old proxy drops the hostname: the new one must be told.
        let touched = idx.upsert(&proxy("a", "old", 1, &["z.example.com"]));
        assert!(touched.contains(&("b".into(), "new".into())));
        assert_eq!(idx.claimed_by("x.example.com", &Claim::of(&new)), None);
        let touched = idx.remove(&proxy("b", "new", 2, &[]));
        assert!(touched.is_empty());
    }
}
