//! The zone's content, derived purely from Connectors: which TXT records exist, and what
//! each Connector's `IrohDNSPublished` condition says.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use iroh::endpoint_info::EndpointInfo;
use iroh::{EndpointId, RelayUrl};
use portway_api::{Connector, find_condition};

/// The condition type this server owns on Connectors.
pub const CONDITION: &str = "IrohDNSPublished";

/// Why a connector has, or lacks, a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Published,
    /// Another, older connector claims the same id.
    Conflict,
    /// No connection details yet, or the connector is not ready.
    Pending,
    /// The connection details cannot be turned into a record.
    Invalid,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Published => "Published",
            Self::Conflict => "Conflict",
            Self::Pending => "Pending",
            Self::Invalid => "Invalid",
        }
    }
}

/// The condition a connector should carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub namespace: String,
    pub name: String,
    pub reason: Reason,
    pub message: String,
}

/// TXT strings by owner name (lower case, no trailing dot).
pub type Records = BTreeMap<String, Vec<String>>;

/// Adds ACME DNS-01 answers (`_acme-challenge.<name>`, TXT) to `records`; names outside
/// `origin`, or that are not challenge names, are ignored: the issuer proves names of this
/// zone and nothing else.
pub fn add_challenges(
    records: &mut Records,
    challenges: impl IntoIterator<Item = (String, String)>,
    origin: &str,
) {
    for (name, value) in challenges {
        let in_zone = name
            .strip_prefix("_acme-challenge.")
            .is_some_and(|rest| rest == origin || rest.ends_with(&format!(".{origin}")));
        if in_zone {
            let values = records.entry(name).or_default();
            if !values.contains(&value) {
                values.push(value);
            }
        }
    }
}

/// The record names of an endpoint in `origin`: zone-wide and per project.
pub fn record_names(id: &EndpointId, namespace: &str, origin: &str) -> [String; 2] {
    let z32 = id.to_z32();
    [
        format!("_iroh.{z32}.{origin}"),
        format!("_iroh.{z32}.{namespace}.{origin}"),
    ]
}

struct Candidate<'a> {
    connector: &'a Connector,
    id: EndpointId,
    txt: Vec<String>,
}

fn parse(c: &Connector) -> Result<Option<(EndpointId, Vec<String>)>, String> {
    let Some(pk) = c
        .status
        .as_ref()
        .and_then(|s| s.connection_details.as_ref())
        .and_then(|d| d.public_key.as_ref())
    else {
        return Ok(None);
    };
    let id: EndpointId = pk
        .id
        .parse()
        .map_err(|e| format!("publicKey.id {:?} is not an iroh endpoint id: {e}", pk.id))?;
    let mut info = EndpointInfo::new(id);
    if let Some(relay) = &pk.home_relay {
        let url: RelayUrl = relay
            .parse()
            .map_err(|e| format!("publicKey.homeRelay {relay:?} is not a URL: {e}"))?;
        info = info.with_relay_url(url);
    }
    let mut addrs = Vec::new();
    for a in &pk.addresses {
        let ip: IpAddr = a
            .address
            .parse()
            .map_err(|_| format!("publicKey.addresses: {:?} is not an IP address", a.address))?;
        let port = u16::try_from(a.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("publicKey.addresses: port {} is out of range", a.port))?;
        addrs.push(SocketAddr::new(ip, port));
    }
    if pk.home_relay.is_none() && addrs.is_empty() {
        return Err("publicKey has neither a homeRelay nor addresses: nothing to publish".into());
    }
    info = info.with_ip_addrs(addrs);
    let mut txt = info.to_txt_strings();
    txt.sort();
    Ok(Some((id, txt)))
}

fn created(c: &Connector) -> (Option<i64>, &str, &str) {
    (
        c.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second()),
        c.metadata.namespace.as_deref().unwrap_or_default(),
        c.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// The records to serve under `origin`, and the condition each connector should carry.
///
/// A connector is published when its status has a public key with a relay or addresses
/// and it is not `Ready=False` (its lease has not expired). When several claim one id,
/// the oldest keeps the record and the others get `Conflict`.
pub fn desired<'a>(
    connectors: impl IntoIterator<Item = &'a Connector>,
    origin: &str,
) -> (Records, Vec<Decision>) {
    let mut decisions = Vec::new();
    let mut candidates: Vec<Candidate<'a>> = Vec::new();
    let decide = |c: &Connector, reason, message: String| Decision {
        namespace: c.metadata.namespace.clone().unwrap_or_default(),
        name: c.metadata.name.clone().unwrap_or_default(),
        reason,
        message,
    };
    for c in connectors {
        if c.metadata.deletion_timestamp.is_some() {
            continue;
        }
        match parse(c) {
            Err(why) => decisions.push(decide(c, Reason::Invalid, why)),
            Ok(None) => decisions.push(decide(
                c,
                Reason::Pending,
                "waiting for the agent to report connection details".into(),
            )),
            Ok(Some((id, txt))) => {
                let conditions = c
                    .status
                    .as_ref()
                    .map(|s| s.conditions.as_slice())
                    .unwrap_or_default();
                if find_condition(conditions, "Ready").is_some_and(|r| r.status == "False") {
                    decisions.push(decide(
                        c,
                        Reason::Pending,
                        "the connector is not ready (its lease expired); record withdrawn".into(),
                    ));
                } else {
                    candidates.push(Candidate {
                        connector: c,
                        id,
                        txt,
                    });
                }
            }
        }
    }
    candidates.sort_by(|a, b| created(a.connector).cmp(&created(b.connector)));
    let mut owners: HashMap<EndpointId, &Connector> = HashMap::new();
    let mut records = Records::new();
    for cand in candidates {
        let c = cand.connector;
        if let Some(owner) = owners.get(&cand.id) {
            let (_, ns, name) = created(owner);
            decisions.push(decide(
                c,
                Reason::Conflict,
                format!(
                    "endpoint id {} is already published by the older connector {ns}/{name}",
                    cand.id
                ),
            ));
            continue;
        }
        owners.insert(cand.id, c);
        let namespace = c.metadata.namespace.as_deref().unwrap_or_default();
        let names = record_names(&cand.id, namespace, origin);
        for n in &names {
            records.insert(n.clone(), cand.txt.clone());
        }
        decisions.push(decide(
            c,
            Reason::Published,
            format!("published as {}", names[0]),
        ));
    }
    (records, decisions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use portway_api::*;

    fn connector(
        ns: &str,
        name: &str,
        created: i64,
        pk: Option<PublicKeyConnectionDetails>,
        ready: Option<bool>,
    ) -> Connector {
        let mut c = Connector::new(
            name,
            ConnectorSpec {
                connector_class_name: "portway".into(),
                capabilities: vec![],
            },
        );
        c.metadata.namespace = Some(ns.into());
        c.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        let mut status = ConnectorStatus {
            connection_details: pk.map(|pk| ConnectionDetails {
                type_: ConnectionType::PublicKey,
                public_key: Some(pk),
            }),
            ..Default::default()
        };
        if let Some(r) = ready {
            status.conditions.push(condition("Ready", r, "R", "", None));
        }
        c.status = Some(status);
        c
    }

    fn key(seed: u8) -> iroh::SecretKey {
        iroh::SecretKey::from_bytes(&[seed; 32])
    }

    fn pk(seed: u8, relay: Option<&str>, addrs: &[(&str, i32)]) -> PublicKeyConnectionDetails {
        PublicKeyConnectionDetails {
            id: key(seed).public().to_string(),
            discovery_mode: DiscoveryMode::Dns,
            home_relay: relay.map(Into::into),
            addresses: addrs
                .iter()
                .map(|(a, p)| PublicKeyAddress {
                    address: (*a).into(),
                    port: *p,
                })
                .collect(),
        }
    }

    fn reasons(d: &[Decision]) -> Vec<(String, Reason)> {
        let mut v: Vec<_> = d
            .iter()
            .map(|d| (format!("{}/{}", d.namespace, d.name), d.reason))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn records_use_irohs_format_under_both_names() {
        let c = connector(
            "p1",
            "laptop",
            10,
            Some(pk(
                1,
                Some("http://127.0.0.1:3340/"),
                &[("10.0.0.2", 4000), ("127.0.0.1", 4000)],
            )),
            None,
        );
        let (records, decisions) = desired(&[c], "portway.localhost");
        let z32 = key(1).public().to_z32();
        let expected = vec![
            "addr=10.0.0.2:4000".to_string(),
            "addr=127.0.0.1:4000".into(),
            "relay=http://127.0.0.1:3340/".into(),
        ];
        assert_eq!(records[&format!("_iroh.{z32}.portway.localhost")], expected);
        assert_eq!(
            records[&format!("_iroh.{z32}.p1.portway.localhost")],
            expected
        );
        assert_eq!(decisions[0].reason, Reason::Published);
        // iroh parses its own strings back to the same endpoint.
        let info = EndpointInfo::from_txt_lookup(
            format!("_iroh.{z32}.portway.localhost"),
            expected.iter(),
        )
        .unwrap();
        assert_eq!(info.endpoint_id, key(1).public());
        assert_eq!(info.ip_addrs().count(), 2);
    }

    #[test]
    fn every_branch() {
        let good = Some(pk(1, Some("http://127.0.0.1:3340/"), &[]));
        let cases = vec![
            connector("a", "pending", 1, None, None),
            connector(
                "a",
                "unready",
                2,
                Some(pk(2, Some("http://r/"), &[])),
                Some(false),
            ),
            connector(
                "a",
                "ready",
                3,
                Some(pk(3, Some("http://r/"), &[])),
                Some(true),
            ),
            connector("b", "older", 4, good.clone(), None),
            connector("a", "newer", 5, good, None),
            connector(
                "a",
                "bad-id",
                6,
                Some(PublicKeyConnectionDetails {
                    id: "zz".into(),
                    ..pk(4, Some("http://r/"), &[])
                }),
                None,
            ),
            connector("a", "bad-addr", 7, Some(pk(5, None, &[("host", 1)])), None),
            connector(
                "a",
                "bad-port",
                8,
                Some(pk(6, None, &[("10.0.0.1", 70000)])),
                None,
            ),
            connector(
                "a",
                "bad-relay",
                9,
                Some(pk(7, Some("::not a url"), &[])),
                None,
            ),
            connector("a", "nothing", 10, Some(pk(8, None, &[])), None),
        ];
        let (records, decisions) = desired(&cases, "z");
        assert_eq!(
            reasons(&decisions),
            vec![
                ("a/bad-addr".to_string(), Reason::Invalid),
                ("a/bad-id".into(), Reason::Invalid),
                ("a/bad-port".into(), Reason::Invalid),
                ("a/bad-relay".into(), Reason::Invalid),
                ("a/newer".into(), Reason::Conflict),
                ("a/nothing".into(), Reason::Invalid),
                ("a/pending".into(), Reason::Pending),
                ("a/ready".into(), Reason::Published),
                ("a/unready".into(), Reason::Pending),
                ("b/older".into(), Reason::Published),
            ]
        );
        // Two published connectors, two names each; the conflicting one's project name is absent.
        assert_eq!(records.len(), 4);
        assert!(records.keys().any(|k| k.ends_with(".b.z")));
        assert!(
            !records
                .keys()
                .any(|k| k.ends_with(".a.z") && k.contains(&key(1).public().to_z32()))
        );
        let conflict = decisions.iter().find(|d| d.name == "newer").unwrap();
        assert!(conflict.message.contains("b/older"), "{}", conflict.message);
    }

    #[test]
    fn only_challenge_names_of_the_zone_are_published() {
        let mut records = Records::new();
        add_challenges(
            &mut records,
            [
                ("_acme-challenge.p.localhost".into(), "a".into()),
                ("_acme-challenge.p.localhost".into(), "b".into()),
                ("_acme-challenge.app.p.localhost".into(), "c".into()),
                ("_acme-challenge.p.localhost".into(), "a".into()),
                ("_acme-challenge.example.com".into(), "evil".into()),
                ("_iroh.xyz.p.localhost".into(), "forged".into()),
                ("_acme-challenge.evilp.localhost".into(), "evil".into()),
            ],
            "p.localhost",
        );
        assert_eq!(
            records.into_iter().collect::<Vec<_>>(),
            [
                (
                    "_acme-challenge.app.p.localhost".to_owned(),
                    vec!["c".to_owned()]
                ),
                (
                    "_acme-challenge.p.localhost".to_owned(),
                    vec!["a".to_owned(), "b".to_owned()]
                ),
            ]
        );
    }
}
