//! Who holds each public TCP port. One index holds every TCPProxy's claim, across all
//! projects (the edge has one set of ports). A proxy claims:
//!
//! - its `spec.port` when it names one (a port outside the edge's range is refused);
//! - otherwise the port in its `status.port` (granted earlier: kept across restarts,
//!   since the index is rebuilt from every proxy's status before reconciling);
//! - otherwise the lowest port of the range that nobody claims.
//!
//! Several claims on one port: the one already granted (in its proxy's `status.port`)
//! wins over one only asked for, then the older proxy, then namespace/name. A proxy that
//! loses the port it asked for is refused (`PortInUse`); one without `spec.port` that
//! loses its status port takes another. Updated by the TCPProxy watch (and by each
//! reconcile's [`PortIndex::assign`]); both return the proxies whose verdict may have
//! changed, to be reconciled again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::ops::RangeInclusive;

use parking_lot::Mutex;
use portway_api::TcpProxy;

use crate::hostnames::Claim;

/// The ports TCPProxies get when the operator is not told otherwise.
pub const DEFAULT_RANGE: RangeInclusive<u16> = 20000..=20999;

/// A proxy, as the index names it: (namespace, name).
pub type Key = (String, String);

/// Why a proxy holds no port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `spec.port` is outside the range the edge publishes.
    NotAllowed {
        port: i32,
        range: RangeInclusive<u16>,
    },
    /// `spec.port` is held by another proxy.
    InUse { port: u16, holder: Holder },
    /// No port was asked for, and every one of the range is held.
    Exhausted { range: RangeInclusive<u16> },
}

/// The port granted, or why there is none.
pub type Verdict = Result<u16, Refusal>;

/// The proxy that holds a port, as the refused proxy's status tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// `namespace/name` when it is in the refused proxy's project; another project's
    /// names are not shown to this one.
    pub proxy: Option<String>,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.proxy {
            Some(p) => write!(f, "the TCPProxy {p}"),
            None => f.write_str("another project"),
        }
    }
}

fn range_text(range: &RangeInclusive<u16>) -> String {
    format!("{}-{}", range.start(), range.end())
}

impl Refusal {
    /// The `Accepted=False` reason.
    pub fn reason(&self) -> &'static str {
        use super::desired::reasons::{NO_PORT_AVAILABLE, PORT_IN_USE, PORT_NOT_ALLOWED};
        match self {
            Self::NotAllowed { .. } => PORT_NOT_ALLOWED,
            Self::InUse { .. } => PORT_IN_USE,
            Self::Exhausted { .. } => NO_PORT_AVAILABLE,
        }
    }

    /// A sentence naming the field.
    pub fn message(&self) -> String {
        match self {
            Self::NotAllowed { port, range } => format!(
                "spec.port: {port} is not a port this edge publishes: choose one of {}, or leave spec.port out to be given one",
                range_text(range)
            ),
            Self::InUse { port, holder } => {
                format!("spec.port: port {port} is already held by {holder}")
            }
            Self::Exhausted { range } => format!(
                "spec.port is not set and every port of {} is held by another TCPProxy",
                range_text(range)
            ),
        }
    }
}

/// How a claim on a port was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    /// In the proxy's `status.port`: it has been serving there.
    Granted,
    /// Its `spec.port`, not granted yet.
    Asked,
    /// Chosen by [`PortIndex::assign`], not yet in the proxy's status.
    Allocated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    port: u16,
    source: Source,
}

/// A claim's place in the queue for its port: granted first, then by [`Claim`] (the
/// older proxy, then namespace/name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    asked: bool,
    claim: Claim,
}

impl Rank {
    fn new(claim: &Claim, held: Held) -> Self {
        Self {
            asked: held.source != Source::Granted,
            claim: claim.clone(),
        }
    }

    fn key(&self) -> Key {
        (self.claim.ns.clone(), self.claim.name.clone())
    }
}

struct Entry {
    claim: Claim,
    held: Option<Held>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    by_port: BTreeMap<u16, BTreeSet<Rank>>,
}

fn key_of(claim: &Claim) -> Key {
    (claim.ns.clone(), claim.name.clone())
}

/// A port number as the API spells it, if it is one.
fn port_of(p: Option<i32>) -> Option<u16> {
    p.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0)
}

/// The claim a proxy's spec and status make; `pending` is what the index allocated it
/// before its status could say so.
fn held_by(p: &TcpProxy, range: &RangeInclusive<u16>, pending: Option<Held>) -> Option<Held> {
    // A passthrough proxy shares the TLS port: it holds none of the range.
    if p.spec.tls.is_some() {
        return None;
    }
    let status = port_of(p.status.as_ref().and_then(|s| s.port));
    match p.spec.port {
        Some(asked) => port_of(Some(asked))
            .filter(|a| range.contains(a))
            .map(|port| Held {
                port,
                source: if status == Some(port) {
                    Source::Granted
                } else {
                    Source::Asked
                },
            }),
        None => match status.filter(|s| range.contains(s)) {
            Some(port) => Some(Held {
                port,
                source: Source::Granted,
            }),
            None => pending.filter(|h| h.source == Source::Allocated && range.contains(&h.port)),
        },
    }
}

impl Inner {
    /// The best claim on `port` other than `me`'s.
    fn best_other(&self, port: u16, me: &Key) -> Option<&Rank> {
        self.by_port
            .get(&port)
            .into_iter()
            .flatten()
            .find(|r| r.key() != *me)
    }

    /// The lowest port of `range` no other proxy claims.
    fn lowest_free(&self, range: &RangeInclusive<u16>, me: &Key) -> Option<u16> {
        range.clone().find(|p| self.best_other(*p, me).is_none())
    }

    /// Every proxy (but `me`) claiming one of `ports`, and with `waiting` every proxy that
    /// holds no port (it may get one that was freed).
    fn interested(&self, ports: &[u16], waiting: bool, me: &Key) -> BTreeSet<Key> {
        let mut out: BTreeSet<Key> = ports
            .iter()
            .flat_map(|p| self.by_port.get(p).into_iter().flatten())
            .map(Rank::key)
            .collect();
        if waiting {
            out.extend(
                self.entries
                    .iter()
                    .filter(|(_, e)| e.held.is_none())
                    .map(|(k, _)| k.clone()),
            );
        }
        out.remove(me);
        out
    }

    fn unlink(&mut self, claim: &Claim, held: Held) {
        let port = held.port;
        if let Some(set) = self.by_port.get_mut(&port) {
            set.remove(&Rank::new(claim, held));
            if set.is_empty() {
                self.by_port.remove(&port);
            }
        }
    }

    /// Records what `claim`'s proxy holds; returns the proxies that should decide again.
    fn set(&mut self, claim: Claim, held: Option<Held>) -> BTreeSet<Key> {
        let key = key_of(&claim);
        let old = self.entries.get(&key).map(|e| (e.claim.clone(), e.held));
        if let Some((old_claim, old_held)) = &old {
            if *old_claim == claim && *old_held == held {
                return BTreeSet::new();
            }
            if let Some(h) = old_held {
                self.unlink(old_claim, *h);
            }
        }
        if let Some(h) = held {
            self.by_port
                .entry(h.port)
                .or_default()
                .insert(Rank::new(&claim, h));
        }
        let old_port = old.and_then(|(_, h)| h).map(|h| h.port);
        let new_port = held.map(|h| h.port);
        self.entries.insert(key.clone(), Entry { claim, held });
        let ports: Vec<u16> = old_port.into_iter().chain(new_port).collect();
        let released = old_port.is_some() && old_port != new_port;
        self.interested(&ports, released, &key)
    }

    fn remove(&mut self, key: &Key) -> BTreeSet<Key> {
        let Some(e) = self.entries.remove(key) else {
            return BTreeSet::new();
        };
        let Some(h) = e.held else {
            return BTreeSet::new();
        };
        self.unlink(&e.claim, h);
        self.interested(&[h.port], true, key)
    }
}

/// Every TCPProxy's port claim; see the module docs for the rule.
pub struct PortIndex {
    range: RangeInclusive<u16>,
    inner: Mutex<Inner>,
}

impl PortIndex {
    pub fn new(range: RangeInclusive<u16>) -> Self {
        Self {
            range,
            inner: Mutex::default(),
        }
    }

    /// The ports proxies may have.
    pub fn range(&self) -> &RangeInclusive<u16> {
        &self.range
    }

    /// Records a proxy as the watch reports it; returns the proxies whose verdict may
    /// have changed.
    pub fn observe(&self, p: &TcpProxy) -> BTreeSet<Key> {
        let claim = Claim::of(p);
        let mut inner = self.inner.lock();
        let pending = inner.entries.get(&key_of(&claim)).and_then(|e| e.held);
        let held = held_by(p, &self.range, pending);
        inner.set(claim, held)
    }

    /// Forgets a deleted proxy; returns the proxies that may take its port.
    pub fn forget(&self, p: &TcpProxy) -> BTreeSet<Key> {
        self.inner.lock().remove(&key_of(&Claim::of(p)))
    }

    /// Replaces everything (after a relist, when deletions may have been missed), keeping
    /// allocations the proxies' status does not tell yet.
    pub fn rebuild<'a>(&self, all: impl IntoIterator<Item = &'a TcpProxy>) {
        let mut inner = self.inner.lock();
        let old = std::mem::take(&mut *inner);
        for p in all {
            let claim = Claim::of(p);
            let pending = old.entries.get(&key_of(&claim)).and_then(|e| e.held);
            let held = held_by(p, &self.range, pending);
            inner.set(claim, held);
        }
    }

    /// Decides the proxy's port and records it (an allocation at once, so two proxies
    /// reconciled together never get the same one). Returns the verdict and the proxies
    /// that should decide again (a port was freed or contested).
    pub fn assign(&self, p: &TcpProxy) -> (Verdict, BTreeSet<Key>) {
        let claim = Claim::of(p);
        let key = key_of(&claim);
        let range = &self.range;
        let mut inner = self.inner.lock();
        let pending = inner.entries.get(&key).and_then(|e| e.held);
        let wins = |inner: &Inner, h: Held| {
            inner
                .best_other(h.port, &key)
                .is_none_or(|other| Rank::new(&claim, h) < *other)
        };
        let (held, verdict) = match p.spec.port {
            Some(asked) => match held_by(p, range, None) {
                None => (
                    None,
                    Err(Refusal::NotAllowed {
                        port: asked,
                        range: range.clone(),
                    }),
                ),
                // A loser keeps its claim: it wins when the holder lets go.
                Some(h) if wins(&inner, h) => (Some(h), Ok(h.port)),
                Some(h) => {
                    let holder = inner.best_other(h.port, &key).map(|r| Holder {
                        proxy: (r.claim.ns == claim.ns)
                            .then(|| format!("{}/{}", r.claim.ns, r.claim.name)),
                    });
                    let refusal = Refusal::InUse {
                        port: h.port,
                        holder: holder.unwrap_or(Holder { proxy: None }),
                    };
                    (Some(h), Err(refusal))
                }
            },
            None => match held_by(p, range, pending).filter(|h| wins(&inner, *h)) {
                Some(h) => (Some(h), Ok(h.port)),
                None => match inner.lowest_free(range, &key) {
                    Some(port) => (
                        Some(Held {
                            port,
                            source: Source::Allocated,
                        }),
                        Ok(port),
                    ),
                    None => (
                        None,
                        Err(Refusal::Exhausted {
                            range: range.clone(),
                        }),
                    ),
                },
            },
        };
        // A proxy the watch has not reported, or has reported deleted, records nothing: a
        // reconcile that was under way when its proxy was deleted must not leave the port
        // held by a ghost.
        if !inner.entries.contains_key(&key) {
            return (verdict, BTreeSet::new());
        }
        let touched = inner.set(claim, held);
        (verdict, touched)
    }
}

/// [`parse_range`]: what is wrong with a port range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RangeError {
    #[error("{0:?} is not a port range: write FIRST-LAST, as 20000-20999")]
    Syntax(String),
    #[error("{range:?}: {port:?} is not a port between 1 and 65535")]
    Port { range: String, port: String },
    #[error("{0:?}: the first port is above the last")]
    Reversed(String),
}

/// Parses a port range written `FIRST-LAST` (`20000-20999`), both included.
///
/// # Errors
/// [`RangeError`] naming what is wrong.
pub fn parse_range(s: &str) -> Result<RangeInclusive<u16>, RangeError> {
    let (first, last) = s
        .split_once('-')
        .ok_or_else(|| RangeError::Syntax(s.to_owned()))?;
    let port = |p: &str| {
        port_of(p.trim().parse::<i32>().ok()).ok_or_else(|| RangeError::Port {
            range: s.to_owned(),
            port: p.to_owned(),
        })
    };
    let (first, last) = (port(first)?, port(last)?);
    if first > last {
        return Err(RangeError::Reversed(s.to_owned()));
    }
    Ok(first..=last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use portway_api::{TcpProxySpec, TcpProxyStatus};

    fn proxy(
        ns: &str,
        name: &str,
        created: i64,
        spec: Option<i32>,
        status: Option<i32>,
    ) -> TcpProxy {
        let mut p = TcpProxy::new(
            name,
            TcpProxySpec {
                port: spec,
                backends: vec![],
                ..Default::default()
            },
        );
        p.metadata.namespace = Some(ns.into());
        p.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        p.status = status.map(|port| TcpProxyStatus {
            conditions: vec![],
            port: Some(port),
            ..Default::default()
        });
        p
    }

    fn key(ns: &str, name: &str) -> Key {
        (ns.into(), name.into())
    }

    /// As the operator decides: the watch reports the proxy, then it is reconciled.
    fn verdict(idx: &PortIndex, p: &TcpProxy) -> Verdict {
        idx.observe(p);
        idx.assign(p).0
    }

    /// A reconcile that was under way when its proxy was deleted takes no port.
    #[test]
    fn a_deleted_proxy_holds_nothing() {
        let idx = PortIndex::new(20000..=20001);
        let gone = proxy("p1", "gone", 1, Some(20000), None);
        assert_eq!(verdict(&idx, &gone), Ok(20000));
        idx.forget(&gone);
        assert_eq!(idx.assign(&gone).0, Ok(20000));
        let next = proxy("p1", "next", 2, Some(20000), None);
        assert_eq!(verdict(&idx, &next), Ok(20000));
    }

    #[test]
    fn allocates_the_lowest_free_port_and_keeps_it() {
        let idx = PortIndex::new(20000..=20002);
        let a = proxy("p1", "a", 1, None, None);
        let b = proxy("p1", "b", 2, None, None);
        assert_eq!(verdict(&idx, &a), Ok(20000));
        assert_eq!(
            verdict(&idx, &b),
            Ok(20001),
            "taken at once, before status says so"
        );
        assert_eq!(verdict(&idx, &a), Ok(20000), "the same answer again");
        // Status written: the watch reports it; nothing changes.
        assert!(
            idx.observe(&proxy("p1", "a", 1, None, Some(20000)))
                .is_empty()
        );
        assert_eq!(
            verdict(&idx, &proxy("p1", "a", 1, None, Some(20000))),
            Ok(20000)
        );
    }

    #[test]
    fn a_restart_keeps_every_granted_port() {
        let idx = PortIndex::new(20000..=20999);
        let kept = proxy("p1", "kept", 5, None, Some(20007));
        let asked = proxy("p2", "asked", 6, Some(20000), Some(20000));
        idx.rebuild([&kept, &asked]);
        let fresh = proxy("p1", "fresh", 1, None, None);
        assert_eq!(verdict(&idx, &fresh), Ok(20001), "20000 is held");
        assert_eq!(verdict(&idx, &kept), Ok(20007));
        assert_eq!(verdict(&idx, &asked), Ok(20000));
    }

    #[test]
    fn a_requested_port_goes_to_the_holder_then_to_the_older_claim() {
        let idx = PortIndex::new(20000..=20999);
        // Younger, but granted: an older proxy asking later does not take it.
        let holder = proxy("p1", "holder", 9, Some(20022), Some(20022));
        idx.observe(&holder);
        let old_asker = proxy("p1", "old", 1, Some(20022), None);
        let other_project = proxy("p2", "other", 2, Some(20022), None);
        assert_eq!(
            verdict(&idx, &old_asker),
            Err(Refusal::InUse {
                port: 20022,
                holder: Holder {
                    proxy: Some("p1/holder".into())
                }
            })
        );
        let refused = verdict(&idx, &other_project).unwrap_err();
        assert_eq!(refused.reason(), "PortInUse");
        assert_eq!(
            refused.message(),
            "spec.port: port 20022 is already held by another project"
        );
        // The holder goes: the older of the two waiting is told, and wins.
        let touched = idx.forget(&holder);
        assert!(touched.contains(&key("p1", "old")) && touched.contains(&key("p2", "other")));
        assert_eq!(verdict(&idx, &old_asker), Ok(20022));
        assert!(verdict(&idx, &other_project).is_err());
        // Two asking at once, neither granted: the older wins; a tie by namespace/name.
        let idx = PortIndex::new(20000..=20999);
        let (x, y) = (
            proxy("b", "x", 3, Some(20100), None),
            proxy("a", "y", 3, Some(20100), None),
        );
        idx.observe(&x);
        idx.observe(&y);
        assert!(verdict(&idx, &x).is_err());
        assert_eq!(verdict(&idx, &y), Ok(20100));
    }

    #[test]
    fn changing_spec_port_claims_the_new_and_frees_the_old() {
        let idx = PortIndex::new(20000..=20999);
        let a = proxy("p1", "a", 1, None, Some(20000));
        idx.observe(&a);
        let waiting = proxy("p1", "w", 2, Some(20000), None);
        assert!(verdict(&idx, &waiting).is_err());
        let moved = proxy("p1", "a", 1, Some(20500), Some(20000));
        let touched = idx.observe(&moved);
        assert!(touched.contains(&key("p1", "w")), "{touched:?}");
        assert_eq!(verdict(&idx, &moved), Ok(20500));
        assert_eq!(verdict(&idx, &waiting), Ok(20000));
        // Dropping spec.port keeps what status says.
        let idx = PortIndex::new(20000..=20999);
        let p = proxy("p1", "a", 1, None, Some(20500));
        assert_eq!(verdict(&idx, &p), Ok(20500));
    }

    #[test]
    fn ports_outside_the_range_and_an_exhausted_range_are_refused() {
        let idx = PortIndex::new(20000..=20001);
        let low = proxy("p1", "low", 1, Some(22), None);
        let refusal = verdict(&idx, &low).unwrap_err();
        assert_eq!(refusal.reason(), "PortNotAllowed");
        assert!(
            refusal.message().contains("20000-20001"),
            "{}",
            refusal.message()
        );
        assert!(verdict(&idx, &proxy("p1", "x", 1, Some(70000), None)).is_err());
        // A status port outside a narrowed range is not kept: another is given.
        let moved = proxy("p1", "moved", 1, None, Some(30000));
        assert_eq!(verdict(&idx, &moved), Ok(20000));
        assert_eq!(verdict(&idx, &proxy("p1", "b", 2, None, None)), Ok(20001));
        let late = proxy("p1", "late", 3, None, None);
        let refusal = verdict(&idx, &late).unwrap_err();
        assert_eq!(refusal.reason(), "NoPortAvailable");
        assert!(refusal.message().contains("20000-20001"));
        // One goes: the one waiting is told.
        assert!(idx.forget(&moved).contains(&key("p1", "late")));
        assert_eq!(verdict(&idx, &late), Ok(20000));
    }

    #[test]
    fn of_two_granted_the_older_keeps_the_port_and_the_other_moves() {
        let idx = PortIndex::new(20000..=20999);
        let old = proxy("p1", "old", 1, None, Some(20000));
        let young = proxy("p2", "young", 2, None, Some(20000));
        idx.rebuild([&old, &young]);
        assert_eq!(verdict(&idx, &young), Ok(20001));
        assert_eq!(verdict(&idx, &old), Ok(20000));
    }

    #[test]
    fn port_ranges_parse_with_clear_errors() {
        assert_eq!(parse_range("20000-20999"), Ok(20000..=20999));
        assert_eq!(parse_range("22-22"), Ok(22..=22));
        assert_eq!(
            parse_range("20000").unwrap_err().to_string(),
            "\"20000\" is not a port range: write FIRST-LAST, as 20000-20999"
        );
        assert_eq!(
            parse_range("0-10").unwrap_err().to_string(),
            "\"0-10\": \"0\" is not a port between 1 and 65535"
        );
        assert!(matches!(
            parse_range("1-70000"),
            Err(RangeError::Port { .. })
        ));
        assert_eq!(
            parse_range("30-20"),
            Err(RangeError::Reversed("30-20".into()))
        );
    }
}
