//! `portway dns`: an authoritative DNS server for one zone whose TXT records are derived
//! from Connectors (watched through kube-rs), plus the controller that keeps each
//! Connector's `IrohDNSPublished` condition up to date.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{
    Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::rdata::{NS, SOA, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Api;
use kube::runtime::watcher;
use portway_api::certificates::{CHALLENGE_LABEL, SYSTEM_NAMESPACE, challenge_record};
use portway_api::{Connector, condition};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::zone::{self, CONDITION, Decision, Reason, Records};

/// How the DNS server listens and what it serves.
#[derive(Clone, Debug)]
pub struct Config {
    /// UDP and TCP on the same address (default `127.0.0.1:5353`).
    pub listen: SocketAddr,
    /// The zone, e.g. `portway.localhost`; records are `_iroh.<z32-id>[.<project>].<zone>`.
    pub zone: String,
    /// TTL of the TXT records (default 5 s, so changes spread quickly).
    pub ttl: u32,
    /// With several DNS servers (`--leader-elect`): true while this one leads and writes
    /// connectors' `IrohDNSPublished`; all of them answer queries.
    pub leading: Option<watch::Receiver<bool>>,
}

impl Config {
    pub fn new(zone: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 5353)),
            zone: zone.into(),
            ttl: 5,
            leading: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("zone {zone:?} is not a valid DNS name: {reason}")]
    Zone { zone: String, reason: String },
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the handler answers from; swapped whole on every change.
struct ZoneData {
    origin: String,
    soa: Record,
    ns: Record,
    records: HashMap<String, Vec<Record>>,
    /// Every name that exists, including empty non-terminals (they answer NODATA, not
    /// NXDOMAIN).
    names: HashSet<String>,
}

impl ZoneData {
    fn build(origin: &str, origin_name: &Name, serial: u32, ttl: u32, records: &Records) -> Self {
        let host = |label: &str| {
            Name::from_ascii(format!("{label}.{origin}.")).unwrap_or_else(|_| origin_name.clone())
        };
        let soa = Record::from_rdata(
            origin_name.clone(),
            ttl,
            RData::SOA(SOA::new(
                host("ns"),
                host("hostmaster"),
                serial,
                60,
                10,
                600,
                ttl,
            )),
        );
        let ns = Record::from_rdata(origin_name.clone(), ttl, RData::NS(NS(host("ns"))));
        let mut by_name = HashMap::new();
        let mut names = HashSet::new();
        for (name, strings) in records {
            let Ok(owner) = Name::from_ascii(format!("{name}.")) else {
                continue;
            };
            let recs = strings
                .iter()
                .map(|s| {
                    Record::from_rdata(owner.clone(), ttl, RData::TXT(TXT::new(vec![s.clone()])))
                })
                .collect();
            by_name.insert(name.clone(), recs);
            let mut n = name.as_str();
            while let Some((_, parent)) = n.split_once('.') {
                names.insert(n.to_owned());
                if parent == origin {
                    break;
                }
                n = parent;
            }
        }
        Self {
            origin: origin.to_owned(),
            soa,
            ns,
            records: by_name,
            names,
        }
    }
}

struct Handler {
    zone: watch::Receiver<Arc<ZoneData>>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let zone = self.zone.borrow().clone();
        let mut meta = Metadata::response_from_request(&request.metadata);
        let builder = MessageResponseBuilder::from_message_request(request);
        let query = match request.request_info() {
            Ok(info)
                if request.metadata.message_type == MessageType::Query
                    && request.metadata.op_code == OpCode::Query =>
            {
                info.query
            }
            Ok(_) => {
                meta.response_code = ResponseCode::NotImp;
                return send(&mut response, builder.build_no_records(meta), meta).await;
            }
            Err(_) => {
                meta.response_code = ResponseCode::FormErr;
                return send(&mut response, builder.build_no_records(meta), meta).await;
            }
        };
        let qname = query
            .name()
            .to_string()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let qtype = query.query_type();
        let in_zone = qname == zone.origin || qname.ends_with(&format!(".{}", zone.origin));
        if !in_zone {
            meta.response_code = ResponseCode::Refused;
            return send(&mut response, builder.build_no_records(meta), meta).await;
        }
        meta.authoritative = true;
        let empty: Vec<Record> = Vec::new();
        let (answers, negative): (&[Record], bool) = if qname == zone.origin {
            match qtype {
                RecordType::SOA => (std::slice::from_ref(&zone.soa), false),
                RecordType::NS => (std::slice::from_ref(&zone.ns), false),
                _ => (&empty, true),
            }
        } else if let Some(records) = zone.records.get(&qname) {
            match qtype {
                RecordType::TXT | RecordType::ANY => (records.as_slice(), false),
                _ => (&empty, true),
            }
        } else {
            if !zone.names.contains(&qname) {
                meta.response_code = ResponseCode::NXDomain;
            }
            (&empty, true)
        };
        // Negative answers carry the SOA, whose minimum TTL bounds negative caching.
        let soa = negative.then_some(&zone.soa);
        let msg = builder.build(
            meta,
            answers.iter(),
            std::iter::empty(),
            soa,
            std::iter::empty(),
        );
        send(&mut response, msg, meta).await
    }
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    msg: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    meta: Metadata,
) -> ResponseInfo {
    match response.send_response(msg).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "sending a DNS response failed");
            let mut failed = meta;
            failed.response_code = ResponseCode::ServFail;
            Header {
                metadata: failed,
                counts: HeaderCounts::default(),
            }
            .into()
        }
    }
}

/// A running DNS server and its controller.
pub struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    dns: hickory_server::Server<Handler>,
    controller: tokio::task::JoinHandle<()>,
}

/// Binds TCP on the port UDP got (retrying when the OS picks a port TCP cannot have).
async fn bind_pair(listen: SocketAddr) -> Result<(UdpSocket, TcpListener), Error> {
    let err = |source| Error::Bind {
        addr: listen,
        source,
    };
    let mut last = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(listen).await.map_err(err)?;
        let addr = udp.local_addr().map_err(err)?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if listen.port() == 0 => last = Some(e),
            Err(e) => return Err(err(e)),
        }
    }
    Err(err(
        last.unwrap_or_else(|| std::io::Error::other("no free port"))
    ))
}

impl Server {
    /// Binds UDP and TCP, starts answering (an empty zone until the first list of
    /// Connectors arrives) and starts the controller.
    ///
    /// # Errors
    /// When the zone name is invalid or the sockets cannot be bound.
    pub async fn bind(config: Config, client: kube::Client) -> Result<Self, Error> {
        let origin = config.zone.trim_end_matches('.').to_ascii_lowercase();
        let origin_name = Name::from_ascii(format!("{origin}.")).map_err(|e| Error::Zone {
            zone: config.zone.clone(),
            reason: e.to_string(),
        })?;
        if origin.is_empty() {
            return Err(Error::Zone {
                zone: config.zone,
                reason: "must not be empty".into(),
            });
        }
        let (udp, tcp) = bind_pair(config.listen).await?;
        let addr = udp.local_addr().map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
        let (zone_tx, zone_rx) = watch::channel(Arc::new(ZoneData::build(
            &origin,
            &origin_name,
            1,
            config.ttl,
            &BTreeMap::new(),
        )));
        let mut dns = hickory_server::Server::new(Handler { zone: zone_rx });
        dns.register_socket(udp);
        dns.register_listener(tcp, Duration::from_secs(10), 64);
        let shutdown = CancellationToken::new();
        // One token stops both the controller and hickory's listeners.
        tokio::spawn({
            let (ours, hickory) = (shutdown.clone(), dns.shutdown_token().clone());
            async move {
                ours.cancelled().await;
                hickory.cancel();
            }
        });
        let controller = tokio::spawn(run_controller(
            client,
            zone_tx,
            origin.clone(),
            origin_name,
            config.ttl,
            config.leading.clone(),
            shutdown.clone(),
        ));
        tracing::info!(%addr, zone = %origin, "dns listening (udp and tcp)");
        Ok(Self {
            addr,
            shutdown,
            dns,
            controller,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Cancelling it is [`Server::shutdown`].
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub async fn join(mut self) {
        let _ = self.dns.block_until_done().await;
        let _ = self.controller.await;
    }
}

/// How often everything is re-derived even without events, to retry failed status writes.
const RESYNC: Duration = Duration::from_secs(30);

async fn run_controller(
    client: kube::Client,
    zone_tx: watch::Sender<Arc<ZoneData>>,
    origin: String,
    origin_name: Name,
    ttl: u32,
    mut leading: Option<watch::Receiver<bool>>,
    shutdown: CancellationToken,
) {
    let api: Api<Connector> = Api::all(client.clone());
    let (reader, changes) = portway_kube::watch::reflect(api, watcher::Config::default());
    let mut changes = changes.ready_chunks(1024);
    // ACME DNS-01 answers the certificate issuer asks us to publish. Not waited for: a
    // DNS server whose role may not read them still serves the iroh records.
    let challenges_api: Api<Secret> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let (challenges, challenge_changes) = portway_kube::watch::reflect(
        challenges_api,
        watcher::Config::default().labels(&format!("{CHALLENGE_LABEL}=true")),
    );
    let mut challenge_changes = challenge_changes.ready_chunks(64);
    let events = portway_kube::Events::new(client.clone(), "portway-dns", None);
    let mut serial = 1u32;
    let mut published = Records::new();
    let mut ready = false;
    let mut resync = tokio::time::interval(RESYNC);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = portway_kube::leader::changed(&mut leading) => {}
            batch = changes.next() => {
                let Some(batch) = batch else { return };
                for e in batch {
                    match e {
                        Ok(watcher::Event::InitDone) => ready = true,
                        Ok(_) => {}
                        Err(err) => tracing::warn!(error = %err, "watching connectors"),
                    }
                }
            }
            batch = challenge_changes.next() => {
                for e in batch.into_iter().flatten() {
                    if let Err(err) = e {
                        tracing::debug!(error = %err, "watching ACME challenges");
                    }
                }
            }
            _ = resync.tick() => {}
        }
        if !ready {
            continue;
        }
        let connectors: Vec<Arc<Connector>> = reader.state();
        let (mut records, decisions) = zone::desired(connectors.iter().map(AsRef::as_ref), &origin);
        zone::add_challenges(
            &mut records,
            challenges
                .state()
                .iter()
                .filter_map(|s| challenge_record(s)),
            &origin,
        );
        if records != published {
            serial = serial.wrapping_add(1);
            zone_tx.send_replace(Arc::new(ZoneData::build(
                &origin,
                &origin_name,
                serial,
                ttl,
                &records,
            )));
            tracing::debug!(serial, names = records.len(), "zone updated");
            published = records;
        }
        let by_key: HashMap<(&str, &str), &Connector> = connectors
            .iter()
            .map(|c| {
                (
                    (
                        c.metadata.namespace.as_deref().unwrap_or_default(),
                        c.metadata.name.as_deref().unwrap_or_default(),
                    ),
                    c.as_ref(),
                )
            })
            .collect();
        if !portway_kube::leader::leads(leading.as_ref()) {
            continue;
        }
        for d in &decisions {
            if let Some(c) = by_key.get(&(d.namespace.as_str(), d.name.as_str())) {
                write_condition(&client, &events, c, d).await;
            }
        }
    }
}

fn wanted(c: &Connector, d: &Decision) -> Condition {
    condition(
        CONDITION,
        d.reason == Reason::Published,
        d.reason.as_str(),
        d.message.clone(),
        c.metadata.generation,
    )
}

/// Writes the condition if it changed, guarded by resourceVersion so the operator's
/// conditions on the same connector are never overwritten.
async fn write_condition(
    client: &kube::Client,
    events: &portway_kube::Events,
    c: &Connector,
    d: &Decision,
) {
    let api: Api<Connector> = Api::namespaced(client.clone(), &d.namespace);
    let id = format!("{}/{}", d.namespace, d.name);
    let conditions = [wanted(c, d)];
    match portway_kube::patch_conditions(
        &api,
        Some(c),
        &d.name,
        portway_api::managers::DNS,
        &conditions,
        None,
    )
    .await
    {
        Ok(true) => {
            tracing::debug!(connector = %id, reason = d.reason.as_str(), "condition written");
            let old = c.status.as_ref().map(|s| s.conditions.as_slice());
            events
                .conditions_changed(
                    &kube::Resource::object_ref(c, &()),
                    old.unwrap_or_default(),
                    &conditions,
                )
                .await;
        }
        Ok(false) => {}
        Err(e) if e.is_not_found() => {}
        Err(e) => tracing::warn!(connector = %id, error = %e, "writing IrohDNSPublished"),
    }
}
