//! What the local UI shows of the data path: traffic counters per tunnel (always kept: an
//! atomic add per read), a pause switch per tunnel, and, when the inspector is on, the
//! HTTP exchanges seen on http tunnels, kept in memory in a ring bounded by count and by
//! bytes. The exchanges are observed beside the splice ([`crate::tap`]), never in it: the
//! bytes the app and the client exchange are the same with the inspector on or off.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::tap::Exchange;

/// Body bytes kept per message.
pub const BODY_CAP: usize = 64 * 1024;
/// Exchanges kept, and the bytes their heads and bodies may hold together: the oldest go
/// first past either.
const MAX_RECORDS: usize = 1000;
const MAX_BYTES: usize = 16 * 1024 * 1024;

/// Every tunnel's counters, by tunnel name.
#[derive(Debug, Default)]
pub struct Traffic {
    tunnels: RwLock<HashMap<String, Arc<TunnelTraffic>>>,
}

impl Traffic {
    /// The counters of `tunnel`, made on first use.
    pub fn of(&self, tunnel: &str) -> Arc<TunnelTraffic> {
        if let Some(t) = self.tunnels.read().get(tunnel) {
            return t.clone();
        }
        self.tunnels
            .write()
            .entry(tunnel.to_owned())
            .or_default()
            .clone()
    }
}

/// One tunnel's counters and switch.
#[derive(Debug, Default)]
pub struct TunnelTraffic {
    /// HTTP exchanges seen (http tunnels while the inspector is on), else streams.
    pub requests: AtomicU64,
    /// Bytes from the public client toward the app, and back.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    paused: AtomicBool,
    /// Cancelled on pause: the tunnel's open streams end with it, so connections the
    /// gateway keeps pooled do not go on serving a paused tunnel.
    stop: Mutex<CancellationToken>,
}

impl TunnelTraffic {
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Pausing refuses new streams (503) and ends the open ones.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
        if paused {
            std::mem::take(&mut *self.stop.lock()).cancel();
        }
    }

    /// Cancelled when the tunnel is next paused.
    pub fn stopped(&self) -> CancellationToken {
        self.stop.lock().clone()
    }

    pub fn count(&self, from_client: bool, n: usize) {
        let c = if from_client {
            &self.bytes_in
        } else {
            &self.bytes_out
        };
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// One exchange as the inspector keeps it.
#[derive(Clone, Debug)]
pub struct Record {
    pub id: u64,
    pub tunnel: String,
    /// The public client's address, as the edge wrote it last in `X-Forwarded-For`; for a
    /// replay, `None`.
    pub client: Option<String>,
    /// The exchange this one replayed.
    pub replay_of: Option<u64>,
    pub exchange: Exchange,
}

impl Record {
    fn weight(&self) -> usize {
        let e = &self.exchange;
        let heads: usize = e
            .request_headers
            .iter()
            .chain(&e.response_headers)
            .map(|(n, v)| n.len() + v.len())
            .sum();
        // Each header and string is an allocation of its own: 32 bytes of overhead apiece.
        let strings = e.method.len()
            + e.target.len()
            + self.tunnel.len()
            + self.client.as_ref().map_or(0, String::len)
            + e.error.as_ref().map_or(0, String::len);
        heads
            + 32 * (e.request_headers.len() + e.response_headers.len())
            + strings
            + e.request_body.bytes.len()
            + e.response_body.bytes.len()
            + 256
    }
}

/// The exchanges seen, newest last, and a feed of each as it is recorded.
#[derive(Debug)]
pub struct Inspector {
    ring: Mutex<Ring>,
    next: AtomicU64,
    feed: broadcast::Sender<Arc<Record>>,
}

#[derive(Debug, Default)]
struct Ring {
    records: VecDeque<Arc<Record>>,
    bytes: usize,
}

impl Default for Inspector {
    fn default() -> Self {
        Self {
            ring: Mutex::default(),
            next: AtomicU64::new(1),
            // A stalled viewer holds at most this many records past the ring's budget.
            feed: broadcast::channel(64).0,
        }
    }
}

impl Inspector {
    pub fn record(&self, tunnel: &str, exchange: Exchange, replay_of: Option<u64>) -> Arc<Record> {
        let client = replay_of.is_none().then(|| client_of(&exchange)).flatten();
        let record = {
            let mut ring = self.ring.lock();
            // Numbered under the lock, so ids grow along the ring (`get` searches by id).
            let record = Arc::new(Record {
                id: self.next.fetch_add(1, Ordering::Relaxed),
                tunnel: tunnel.to_owned(),
                client,
                replay_of,
                exchange,
            });
            let weight = record.weight();
            ring.records.push_back(record.clone());
            ring.bytes += weight;
            while ring.records.len() > MAX_RECORDS || ring.bytes > MAX_BYTES {
                let Some(old) = ring.records.pop_front() else {
                    break;
                };
                ring.bytes -= old.weight();
            }
            record
        };
        // No viewer, no one to tell.
        let _ = self.feed.send(record.clone());
        record
    }

    /// Newest first.
    pub fn list(&self) -> Vec<Arc<Record>> {
        self.ring.lock().records.iter().rev().cloned().collect()
    }

    pub fn get(&self, id: u64) -> Option<Arc<Record>> {
        let ring = self.ring.lock();
        // Ids grow with position: a binary search finds it.
        let i = ring.records.binary_search_by_key(&id, |r| r.id).ok()?;
        ring.records.get(i).cloned()
    }

    pub fn clear(&self) {
        let mut ring = self.ring.lock();
        ring.records.clear();
        ring.bytes = 0;
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Record>> {
        self.feed.subscribe()
    }
}

/// The last `X-Forwarded-For` hop: the address the edge saw (it replaces or appends to
/// what the client sent, see the edge's `set_forwarded`).
fn client_of(e: &Exchange) -> Option<String> {
    let value = e
        .request_headers
        .iter()
        .rev()
        .find(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-for"))?;
    let text = std::str::from_utf8(&value.1).ok()?;
    let last = text.rsplit(',').next()?.trim();
    (!last.is_empty()).then(|| last.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::Body;

    fn exchange(path: &str, body: usize, xff: Option<&str>) -> Exchange {
        Exchange {
            started: std::time::SystemTime::now(),
            method: "GET".into(),
            target: path.into(),
            request_headers: xff
                .map(|x| vec![("X-Forwarded-For".into(), x.as_bytes().to_vec())])
                .unwrap_or_default(),
            request_body: Body::default(),
            status: Some(200),
            response_headers: Vec::new(),
            response_body: Body {
                bytes: vec![b'x'; body],
                size: body as u64,
                truncated: false,
            },
            duration: std::time::Duration::from_millis(1),
            error: None,
            upgraded: false,
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_within_its_count_and_bytes() {
        let i = Inspector::default();
        for n in 0..MAX_RECORDS + 10 {
            i.record("web", exchange(&format!("/{n}"), 0, None), None);
        }
        let list = i.list();
        assert_eq!(list.len(), MAX_RECORDS);
        assert_eq!(list[0].exchange.target, format!("/{}", MAX_RECORDS + 9));
        assert!(i.get(1).is_none(), "the oldest went");
        assert_eq!(
            i.get(list[5].id).unwrap().exchange.target,
            list[5].exchange.target
        );
        // Big bodies: the byte budget binds first.
        i.clear();
        for n in 0..400 {
            i.record("web", exchange(&format!("/{n}"), BODY_CAP, None), None);
        }
        let kept = i.list().len();
        assert!(kept < 400 && kept * BODY_CAP <= MAX_BYTES, "kept {kept}");
    }

    #[test]
    fn the_client_is_the_last_forwarded_hop() {
        let i = Inspector::default();
        let r = i.record("web", exchange("/", 0, Some("10.0.0.9, 203.0.113.7")), None);
        assert_eq!(r.client.as_deref(), Some("203.0.113.7"));
        let r = i.record("web", exchange("/", 0, None), None);
        assert_eq!(r.client, None);
        let r = i.record("web", exchange("/", 0, Some("203.0.113.7")), Some(1));
        assert_eq!(r.client, None, "a replay came from here");
    }

    #[test]
    fn pausing_ends_open_streams_and_later_ones_get_a_fresh_switch() {
        let t = TunnelTraffic::default();
        let open = t.stopped();
        t.set_paused(true);
        assert!(open.is_cancelled() && t.paused());
        t.set_paused(false);
        assert!(!t.stopped().is_cancelled() && !t.paused());
    }
}
