//! The `XdsAccepted` condition on Gateways: whether the Envoys fed by every xDS server
//! accepted the current configuration.
//!
//! Each xDS server knows only its own Envoys. So each publishes them in a Lease of its own
//! in `portway-system` (labelled [`REPORT_LABEL`], renewed every half minute), and the
//! one that writes the condition (the leader, with `--leader-elect`; otherwise the only
//! one) merges its own with every report still being renewed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gateway_api::apis::standard::gateways::Gateway;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use portway_kube::watch::is_ready;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Envoy, Envoys};
use crate::routes::Gateways;

/// The condition the xDS server keeps on every Gateway of its class: whether the Envoys
/// it feeds accepted the current configuration.
pub const CONDITION: &str = "XdsAccepted";

/// [`CONDITION`] for a Gateway, given the connected Envoys: `False` when any of them
/// rejected a resource type, `Unknown` when none is connected, `True` otherwise.
pub fn condition(envoys: &Envoys, generation: Option<i64>) -> Condition {
    let rejections: Vec<String> = envoys
        .iter()
        .flat_map(|(node, e)| {
            e.rejected
                .iter()
                .map(move |(t, m)| format!("Envoy {node:?} rejected {t}: {m}"))
        })
        .collect();
    if !rejections.is_empty() {
        return portway_api::condition(
            CONDITION,
            false,
            "Rejected",
            rejections.join("; "),
            generation,
        );
    }
    if envoys.is_empty() {
        let mut c = portway_api::condition(
            CONDITION,
            false,
            "NoEnvoy",
            "no Envoy is connected to the xDS server",
            generation,
        );
        c.status = "Unknown".into();
        return c;
    }
    let names: Vec<String> = envoys.keys().map(|n| format!("{n:?}")).collect();
    portway_api::condition(
        CONDITION,
        true,
        "Accepted",
        format!("accepted by every connected Envoy: {}", names.join(", ")),
        generation,
    )
}

/// The field manager of [`CONDITION`] (the edge owns the other Gateway conditions).
const MANAGER: &str = "portway-xds";

/// How often the cached Gateways are checked even without a change: a write that failed
/// (the API server was away) is made again.
const RESYNC: Duration = Duration::from_secs(30);

/// The Gateways of `class` whose [`CONDITION`] is not yet what `envoys` say, each with
/// the condition it should carry.
fn stale<'a>(
    class: &str,
    envoys: &Envoys,
    gateways: impl IntoIterator<Item = &'a Gateway>,
) -> Vec<(&'a Gateway, Condition)> {
    gateways
        .into_iter()
        .filter(|g| g.spec.gateway_class_name == class)
        .filter_map(|g| {
            let mut conditions = g
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            let ours = condition(envoys, g.metadata.generation);
            portway_api::set_condition(&mut conditions, ours.clone()).then_some((g, ours))
        })
        .collect()
}

/// Labels the Leases in which xDS servers publish their Envoys; the value is the
/// GatewayClass they serve, so servers of another class are not counted.
pub const REPORT_LABEL: &str = "portway.dev/xds-envoys";
/// The annotation holding them: node id → `{"streams": n, "rejected": {type: message}}`.
const REPORT_ANNOTATION: &str = "portway.dev/envoys";
/// A report unchanged for this long (by the reader's own clock) is from a server gone:
/// four renewals missed.
const REPORT_TTL: Duration = Duration::from_secs(120);
/// Reports older than this (by the time their writer put in them) are removed by the
/// condition's writer: their servers died without removing them.
const REPORT_FORGOTTEN: Duration = Duration::from_secs(3600);

/// How long ago, by the wall clock, `lease` was renewed (by its writer's clock: only to
/// judge reports seen for the first time, and to forget old ones).
fn age(lease: &Lease) -> Option<Duration> {
    let renewed = lease.spec.as_ref()?.renew_time.as_ref()?.0;
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(renewed);
    Duration::try_from(age).ok()
}

/// `own` Envoys and those of every other server's report, merged by node id (an Envoy
/// connected to two servers counts its streams and NACKs from both).
pub fn merge<'a>(own: &Envoys, reports: impl IntoIterator<Item = &'a Envoys>) -> Envoys {
    let mut all = own.clone();
    for report in reports {
        for (node, e) in report {
            let merged = all.entry(node.clone()).or_default();
            merged.streams += e.streams;
            for (t, m) in &e.rejected {
                merged
                    .rejected
                    .entry(t.clone())
                    .or_insert_with(|| m.clone());
            }
        }
    }
    all
}

fn to_json(envoys: &Envoys) -> serde_json::Value {
    envoys
        .iter()
        .map(|(node, e)| {
            (
                node.clone(),
                serde_json::json!({"streams": e.streams, "rejected": e.rejected}),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The Envoys a report Lease carries (none when it is not one, or unreadable).
fn from_report(lease: &Lease) -> Envoys {
    let Some(text) = lease.annotations().get(REPORT_ANNOTATION) else {
        return Envoys::new();
    };
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str(text) else {
        return Envoys::new();
    };
    map.into_iter()
        .map(|(node, v)| {
            let streams = v["streams"].as_u64().unwrap_or(0) as usize;
            let rejected = v["rejected"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(t, m)| (t.clone(), m.as_str().unwrap_or_default().to_owned()))
                .collect();
            (node, Envoy { streams, rejected })
        })
        .collect()
}

/// Which reports are live: each one's resourceVersion and when this server saw it change.
#[derive(Default)]
struct Liveness(HashMap<String, (String, Instant)>);

impl Liveness {
    /// The reports among `leases` other than `own` that changed within [`REPORT_TTL`].
    fn live<'a>(
        &mut self,
        own: &str,
        leases: &'a [std::sync::Arc<Lease>],
        now: Instant,
    ) -> Vec<&'a Lease> {
        let mut live = Vec::new();
        let mut seen = HashMap::new();
        for lease in leases {
            let name = lease.name_any();
            let rv = lease.resource_version().unwrap_or_default();
            let since = match self.0.get(&name) {
                Some((old, at)) if *old == rv => *at,
                Some(_) => now,
                // Seen for the first time (this server just started or took over): as
                // old as its renewal says, so a dead server's last word does not count.
                None => match age(lease) {
                    Some(age) if age >= REPORT_TTL => now.checked_sub(REPORT_TTL).unwrap_or(now),
                    _ => now,
                },
            };
            if name != own && now.duration_since(since) < REPORT_TTL {
                live.push(lease.as_ref());
            }
            seen.insert(name, (rv, since));
        }
        self.0 = seen;
        live
    }
}

/// Publishes this server's Envoys in its report Lease (created on first use).
async fn publish(api: &Api<Lease>, name: &str, class: &str, envoys: &Envoys) -> kube::Result<()> {
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    );
    let lease = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {
            "name": name,
            "labels": {REPORT_LABEL: class},
            "annotations": {REPORT_ANNOTATION: to_json(envoys).to_string()},
        },
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": REPORT_TTL.as_secs(),
            "renewTime": now,
        },
    });
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&lease),
    )
    .await
    .map(drop)
}

/// Writes [`CONDITION`] on the Gateways of `class` whenever the connected Envoys (of
/// this server or, by their reports, of the others) or their NACKs change, or a Gateway
/// changes in the route watcher's cache (created, or its status replaced by another
/// writer). With `leading`, only while this server leads; every server publishes its
/// own report either way.
pub fn spawn_reporter(
    client: kube::Client,
    class: String,
    mut envoys: watch::Receiver<Envoys>,
    gateways: Gateways,
    mut leading: Option<watch::Receiver<bool>>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut changed = gateways.changed();
    let leases: Api<Lease> =
        Api::namespaced(client.clone(), portway_api::certificates::SYSTEM_NAMESPACE);
    let own = format!("portway-xds-envoys-{:08x}", rand::random::<u32>());
    let (reports, events) = portway_kube::watch::reflect(
        leases.clone(),
        kube::runtime::watcher::Config::default().labels(&format!("{REPORT_LABEL}={class}")),
    );
    let (reported_tx, mut reported) = watch::channel(());
    tokio::spawn(portway_kube::watch::drive(
        events,
        vec![Box::new(move |_| {
            reported_tx.send_replace(());
        })],
        shutdown.clone(),
    ));
    tokio::spawn(async move {
        let mut resync = tokio::time::interval(RESYNC);
        let mut liveness = Liveness::default();
        let mut published: Option<Envoys> = None;
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                r = envoys.changed() => if r.is_err() { break },
                r = changed.changed() => if r.is_err() { break },
                r = reported.changed() => if r.is_err() { break },
                () = portway_kube::leader::changed(&mut leading) => {}
                _ = resync.tick() => {}
            }
            changed.mark_unchanged();
            let current = envoys.borrow_and_update().clone();
            // Renewed at every resync tick (a second early, so a tick never just misses).
            let due = renewed.elapsed() + Duration::from_secs(1) >= RESYNC;
            if published.as_ref() != Some(&current) || due {
                match publish(&leases, &own, &class, &current).await {
                    Ok(()) => {
                        published = Some(current.clone());
                        renewed = Instant::now();
                    }
                    Err(e) => tracing::warn!(error = %e, "publishing this xDS server's Envoys"),
                }
            }
            let state = reports.state();
            let live = liveness.live(&own, &state, Instant::now());
            if !portway_kube::leader::leads(leading.as_ref())
                || !is_ready(gateways.store())
                || !is_ready(&reports)
            {
                continue;
            }
            let others: Vec<Envoys> = live.into_iter().map(from_report).collect();
            for gone in state
                .iter()
                .filter(|l| age(l).is_some_and(|a| a > REPORT_FORGOTTEN))
            {
                let _ = leases
                    .delete(&gone.name_any(), &DeleteParams::default())
                    .await;
            }
            let all = merge(&current, &others);
            let cached = gateways.store().state();
            for (g, ours) in stale(&class, &all, cached.iter().map(AsRef::as_ref)) {
                let (ns, name) = (g.namespace().unwrap_or_default(), g.name_any());
                let api: Api<Gateway> = Api::namespaced(client.clone(), &ns);
                let result =
                    portway_kube::patch_conditions(&api, Some(g), &name, MANAGER, &[ours], None)
                        .await;
                if let Err(e) = result {
                    tracing::warn!(gateway = %format!("{ns}/{name}"), error = %e, "writing XdsAccepted");
                }
            }
        }
        // Gone: the others stop counting this server's Envoys at once.
        if let Err(e) = leases.delete(&own, &DeleteParams::default()).await {
            tracing::debug!(error = %e, "removing this xDS server's report");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::{CLUSTER_TYPE, Envoy};

    #[test]
    fn condition_follows_the_connected_envoys() {
        let envoy = |rejected: &[(&str, &str)]| Envoy {
            streams: 1,
            rejected: rejected
                .iter()
                .map(|(t, m)| ((*t).to_owned(), (*m).to_owned()))
                .collect(),
        };
        let cases: [(Envoys, &str, &str, &[&str]); 3] = [
            (Envoys::new(), "Unknown", "NoEnvoy", &["no Envoy"]),
            (
                [("e1".into(), envoy(&[])), ("e2".into(), envoy(&[]))].into(),
                "True",
                "Accepted",
                &["\"e1\", \"e2\""],
            ),
            (
                [
                    ("e1".into(), envoy(&[])),
                    ("e2".into(), envoy(&[(CLUSTER_TYPE, "bad cluster")])),
                ]
                .into(),
                "False",
                "Rejected",
                &["\"e2\"", CLUSTER_TYPE, "bad cluster"],
            ),
        ];
        for (envoys, status, reason, words) in cases {
            let c = condition(&envoys, Some(3));
            assert_eq!(
                (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
                (CONDITION, status, reason)
            );
            assert_eq!(c.observed_generation, Some(3));
            for w in words {
                assert!(c.message.contains(w), "{:?} lacks {w:?}", c.message);
            }
        }
    }

    /// The condition's writer counts every server's Envoys: a NACK at an Envoy of
    /// another xDS server makes it False; a report that stopped changing for the TTL
    /// (its server gone) and the writer's own report stop counting.
    #[test]
    fn every_servers_envoys_count_while_their_report_is_renewed() {
        let own: Envoys = [(
            "e1".into(),
            Envoy {
                streams: 1,
                ..Envoy::default()
            },
        )]
        .into();
        let theirs: Envoys = [(
            "e2".into(),
            Envoy {
                streams: 1,
                rejected: [(CLUSTER_TYPE.to_owned(), "bad cluster".to_owned())].into(),
            },
        )]
        .into();
        let report = |name: &str, rv: &str, envoys: &Envoys| -> std::sync::Arc<Lease> {
            std::sync::Arc::new(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "resourceVersion": rv,
                        "annotations": {REPORT_ANNOTATION: to_json(envoys).to_string()}},
                }))
                .unwrap(),
            )
        };
        let start = Instant::now();
        let mut liveness = Liveness::default();
        let leases = vec![report("mine", "1", &own), report("other", "1", &theirs)];
        let live = liveness.live("mine", &leases, start);
        assert_eq!(live.len(), 1, "only the other server's report");
        let others: Vec<Envoys> = live.into_iter().map(from_report).collect();
        assert_eq!(others[0], theirs, "a report reads back as written");
        let all = merge(&own, &others);
        let c = condition(&all, Some(1));
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "Rejected")
        );
        assert!(c.message.contains("\"e2\"") && c.message.contains("bad cluster"));
        // Renewed (a new resourceVersion) within the TTL: still counted.
        let later = start + REPORT_TTL - Duration::from_secs(1);
        let leases = vec![report("mine", "2", &own), report("other", "2", &theirs)];
        assert_eq!(liveness.live("mine", &leases, later).len(), 1);
        // Unchanged for the TTL: its server is gone.
        let much_later = later + REPORT_TTL;
        assert!(liveness.live("mine", &leases, much_later).is_empty());
        let c = condition(&merge(&own, &[]), Some(1));
        assert_eq!(c.status, "True");
        // A report first seen long after its last renewal (its server died before this
        // one took over) does not count.
        let mut fresh = Liveness::default();
        let mut dead = (*report("dead", "7", &theirs)).clone();
        dead.spec = Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            renew_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                k8s_openapi::jiff::Timestamp::now() - std::time::Duration::from_secs(600),
            )),
            ..Default::default()
        });
        assert!(
            fresh
                .live("mine", &[std::sync::Arc::new(dead)], start)
                .is_empty()
        );
        // One Envoy connected to two servers: streams add up, NACKs from either count.
        let both = merge(&theirs, std::slice::from_ref(&theirs));
        assert_eq!(both["e2"].streams, 2);
        assert_eq!(both["e2"].rejected.len(), 1);
    }

    #[test]
    fn only_gateways_of_the_class_whose_condition_differs_are_stale() {
        let envoys: Envoys = [("e1".into(), Envoy::default())].into();
        let gateway = |name: &str, class: &str, generation: i64, carries: Option<i64>| {
            let conditions: Vec<Condition> = carries
                .map(|g| condition(&envoys, Some(g)))
                .into_iter()
                .collect();
            serde_json::from_value::<Gateway>(serde_json::json!({
                "metadata": {"name": name, "namespace": "p", "generation": generation},
                "spec": {"gatewayClassName": class, "listeners": []},
                "status": {"conditions": conditions},
            }))
            .unwrap()
        };
        let gateways = [
            gateway("foreign", "istio", 1, None),
            gateway("new", "portway", 1, None),
            gateway("current", "portway", 1, Some(1)),
            gateway("edited", "portway", 2, Some(1)),
        ];
        let names: Vec<_> = stale("portway", &envoys, &gateways)
            .into_iter()
            .map(|(g, c)| (g.name_any(), c.observed_generation))
            .collect();
        assert_eq!(
            names,
            [("new".to_owned(), Some(1)), ("edited".to_owned(), Some(2))]
        );
        let none = Envoys::new();
        assert_eq!(
            stale("portway", &none, &gateways).len(),
            3,
            "no Envoy left: every Gateway of the class says Unknown"
        );
    }
}
