//! Connector and ConnectorAdvertisement status, as pure functions of the objects, the
//! class, the lease and the time.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use portway_api::{Connector, ConnectorAdvertisement, ConnectorClass, condition_at, labels};

/// What a connector's status should say, and when to look again.
#[derive(Debug, PartialEq)]
pub struct ConnectorDecision {
    /// `Accepted` and `Ready`.
    pub conditions: Vec<Condition>,
    /// When the lease expires, so a silent device goes not-ready on time.
    pub requeue_after: Option<Duration>,
}

/// `None` when the connector's class belongs to a controller not among `controllers`: not
/// ours to touch.
pub fn connector(
    c: &Connector,
    class: Option<&ConnectorClass>,
    lease: Option<&Lease>,
    controllers: &[String],
    now: Timestamp,
) -> Option<ConnectorDecision> {
    let generation = c.metadata.generation;
    let class_name = &c.spec.connector_class_name;
    let accepted = match class {
        Some(cls) if !controllers.contains(&cls.spec.controller_name) => return None,
        Some(cls) => condition_at(
            "Accepted",
            true,
            "Accepted",
            format!(
                "connector class {class_name} is served by {}",
                cls.spec.controller_name
            ),
            generation,
            now,
        ),
        None => condition_at(
            "Accepted",
            false,
            "ConnectorClassNotFound",
            format!("connector class {class_name:?} does not exist"),
            generation,
            now,
        ),
    };
    let spec = lease.and_then(|l| l.spec.as_ref());
    let holder = spec
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default();
    let expiry = lease.and_then(portway_kube::lease::expiry);
    let (ready, requeue_after) = match (lease, holder.is_empty(), expiry) {
        (None, ..) => (
            condition_at(
                "Ready",
                false,
                "ConnectorNotReady",
                "no heartbeat lease yet: the agent has not connected",
                generation,
                now,
            ),
            None,
        ),
        (Some(_), true, _) | (Some(_), _, None) => (
            condition_at(
                "Ready",
                false,
                "ConnectorNotReady",
                "the agent released its lease (it shut down)",
                generation,
                now,
            ),
            None,
        ),
        (Some(_), false, Some(exp)) if exp > now => {
            let left = now.duration_until(exp).unsigned_abs();
            (
                condition_at(
                    "Ready",
                    true,
                    "ConnectorReady",
                    format!("lease held by {holder}, renewed in time"),
                    generation,
                    now,
                ),
                Some(left + Duration::from_millis(100)),
            )
        }
        (Some(_), false, Some(exp)) => (
            condition_at(
                "Ready",
                false,
                "ConnectorNotReady",
                format!("lease expired at {exp}: the agent stopped renewing it"),
                generation,
                now,
            ),
            None,
        ),
    };
    Some(ConnectorDecision {
        conditions: vec![accepted, ready],
        requeue_after,
    })
}

/// How long a Lease the operator creates lasts between renewals, as in Datum.
pub const LEASE_SECONDS: i32 = 30;

/// The heartbeat Lease to create for an accepted connector whose agent has not named one
/// (`status.leaseRef`): Datum's agent only renews the Lease the control plane made; Portway's
/// makes its own, and either way the Lease is named after the connector and owned by it.
/// `None` when the connector names its Lease, or one of that name already exists (then
/// only `leaseRef` is missing). The holder is the connector: Datum's agent renews without
/// saying who it is, and an empty holder means a released lease.
pub fn lease_to_create(c: &Connector, accepted: bool, exists: bool) -> Option<Lease> {
    let named = c.status.as_ref().is_some_and(|s| s.lease_ref.is_some());
    if !accepted || named || exists {
        return None;
    }
    let name = c.metadata.name.clone()?;
    let owner = kube::Resource::controller_owner_ref(c, &())?;
    Some(Lease {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.clone()),
            namespace: c.metadata.namespace.clone(),
            owner_references: Some(vec![owner]),
            labels: Some(
                [(
                    labels::MANAGED_BY.to_owned(),
                    portway_api::managers::OPERATOR.to_owned(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some(name),
            lease_duration_seconds: Some(LEASE_SECONDS),
            ..Default::default()
        }),
    })
}

/// What becomes of a connector that may be collected.
#[derive(Debug, PartialEq, Eq)]
pub enum Collect {
    /// Not ephemeral, or its device is online.
    Never,
    /// Its device has been gone for the TTL: delete it (its advertisements and proxies
    /// are owned by it and go too, freeing their hostnames).
    Now,
    /// Look again then.
    After(Duration),
}

/// How long a connector that never had a lease is kept at least, whatever the TTL. An
/// agent takes its lease moments after joining (which creates the connector), and
/// creation times are whole seconds: collecting sooner would delete a device mid-join and
/// revoke the credential it was just given.
pub const NEVER_LEASED_GRACE: Duration = Duration::from_secs(60);

/// Whether an ephemeral connector (label [`labels::EPHEMERAL`]) is gone for good: its
/// lease ran out `ttl` ago, or it never had one and was created `ttl` (at least
/// [`NEVER_LEASED_GRACE`]) ago.
pub fn collect(c: &Connector, lease: Option<&Lease>, ttl: Duration, now: Timestamp) -> Collect {
    if c.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(labels::EPHEMERAL))
        .map(String::as_str)
        != Some("true")
    {
        return Collect::Never;
    }
    // A lease owned by an earlier connector of the same name (deleted, its lease not yet
    // collected) says nothing about this one.
    let lease = lease.filter(|l| {
        l.metadata
            .owner_references
            .as_ref()
            .is_none_or(|refs| refs.iter().any(|r| Some(&r.uid) == c.metadata.uid.as_ref()))
    });
    if lease.is_some_and(|l| portway_kube::lease::current_holder(l, now).is_some()) {
        return Collect::Never;
    }
    let (since, ttl) = match lease.and_then(portway_kube::lease::expiry) {
        Some(expiry) => (expiry, ttl),
        None => match c.metadata.creation_timestamp.as_ref() {
            Some(created) => (created.0, ttl.max(NEVER_LEASED_GRACE)),
            None => return Collect::Never,
        },
    };
    let ttl_signed = k8s_openapi::jiff::SignedDuration::try_from(ttl).unwrap_or_default();
    match since.checked_add(ttl_signed) {
        Ok(deadline) if deadline > now => {
            Collect::After(now.duration_until(deadline).unsigned_abs())
        }
        Ok(_) => Collect::Now,
        Err(_) => Collect::Never,
    }
}

/// An advertisement is accepted when its connector exists.
pub fn advertisement(
    a: &ConnectorAdvertisement,
    connector_exists: bool,
    now: Timestamp,
) -> Condition {
    let name = &a.spec.connector_ref.name;
    if connector_exists {
        condition_at(
            "Accepted",
            true,
            "Accepted",
            format!("connector {name} exists"),
            a.metadata.generation,
            now,
        )
    } else {
        condition_at(
            "Accepted",
            false,
            "ConnectorNotFound",
            format!("connector {name:?} does not exist in this project"),
            a.metadata.generation,
            now,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use portway_api::{ConnectorClassSpec, ConnectorSpec, find_condition};

    const ME: &str = "portway.dev/operator";

    fn lease(
        holder: Option<&str>,
        renewed_secs_ago: Option<i64>,
        duration: i32,
        now: Timestamp,
    ) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                renew_time: renewed_secs_ago
                    .map(|s| MicroTime(now - k8s_openapi::jiff::SignedDuration::from_secs(s))),
                lease_duration_seconds: Some(duration),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn class(controller: &str) -> ConnectorClass {
        ConnectorClass::new(
            "portway",
            ConnectorClassSpec {
                controller_name: controller.into(),
            },
        )
    }

    #[test]
    fn readiness_follows_the_lease() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let c = Connector::new(
            "c",
            ConnectorSpec {
                connector_class_name: "portway".into(),
                capabilities: vec![],
            },
        );
        let cls = class(ME);
        let cases = [
            (
                "fresh",
                Some(lease(Some("id"), Some(10), 30, now)),
                "True",
                "ConnectorReady",
                Some(20),
            ),
            (
                "expired",
                Some(lease(Some("id"), Some(31), 30, now)),
                "False",
                "ConnectorNotReady",
                None,
            ),
            (
                "released",
                Some(lease(None, None, 30, now)),
                "False",
                "ConnectorNotReady",
                None,
            ),
            ("no lease", None, "False", "ConnectorNotReady", None),
        ];
        for (what, l, status, reason, requeue) in cases {
            let d = connector(&c, Some(&cls), l.as_ref(), &[ME.to_owned()], now).unwrap();
            let ready = find_condition(&d.conditions, "Ready").unwrap();
            assert_eq!(
                (ready.status.as_str(), ready.reason.as_str()),
                (status, reason),
                "{what}"
            );
            assert_eq!(
                d.requeue_after.map(|d| d.as_secs()),
                requeue,
                "{what}: requeue at expiry"
            );
            assert_eq!(
                find_condition(&d.conditions, "Accepted").unwrap().status,
                "True"
            );
        }
    }

    #[test]
    fn ephemeral_connectors_are_collected_a_ttl_after_their_device_left() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let ttl = Duration::from_secs(60);
        let mut c = Connector::new(
            "c",
            ConnectorSpec {
                connector_class_name: "portway".into(),
                capabilities: vec![],
            },
        );
        c.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            now - k8s_openapi::jiff::SignedDuration::from_secs(100),
        ));
        let kept = connector_with(&c, None);
        assert_eq!(
            collect(&kept, None, ttl, now),
            Collect::Never,
            "not ephemeral"
        );
        let eph = connector_with(&c, Some("true"));
        let cases = [
            (
                "online",
                Some(lease(Some("id"), Some(10), 30, now)),
                Collect::Never,
            ),
            // Expired 20 s ago (renewed 50 s ago, 30 s lease): 40 s to go.
            (
                "expired lately",
                Some(lease(Some("id"), Some(50), 30, now)),
                Collect::After(Duration::from_secs(40)),
            ),
            (
                "expired long ago",
                Some(lease(Some("id"), Some(100), 30, now)),
                Collect::Now,
            ),
            // Released: the holder is gone, the last renewal still dates it.
            (
                "released long ago",
                Some(lease(None, Some(100), 30, now)),
                Collect::Now,
            ),
            (
                "released lately",
                Some(lease(None, Some(40), 30, now)),
                Collect::After(Duration::from_secs(50)),
            ),
            // Never connected: counted from creation, 100 s ago.
            ("no lease", None, Collect::Now),
        ];
        let mut eph = eph;
        eph.metadata.uid = Some("new".into());
        for (what, l, want) in cases {
            assert_eq!(collect(&eph, l.as_ref(), ttl, now), want, "{what}");
        }
        // The long-expired lease of a deleted connector of the same name is not this
        // connector's: a fresh one (created 100 s ago here) counts from its creation.
        let mut stale = lease(Some("id"), Some(100), 30, now);
        stale.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                uid: "old".into(),
                ..Default::default()
            },
        ]);
        eph.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
        assert_eq!(
            collect(&eph, Some(&stale), ttl, now),
            Collect::After(ttl),
            "a stale lease of an earlier incarnation"
        );
        // A TTL shorter than the grace does not collect a device that is still joining.
        assert_eq!(
            collect(&eph, None, Duration::from_secs(1), now),
            Collect::After(NEVER_LEASED_GRACE),
            "never leased, just created"
        );
    }

    fn connector_with(c: &Connector, ephemeral: Option<&str>) -> Connector {
        let mut c = c.clone();
        if let Some(v) = ephemeral {
            c.metadata.labels = Some([(labels::EPHEMERAL.to_owned(), v.to_owned())].into());
        }
        c
    }

    #[test]
    fn class_decides_acceptance_and_ownership() {
        let now = Timestamp::from_second(1).unwrap();
        let c = Connector::new(
            "c",
            ConnectorSpec {
                connector_class_name: "portway".into(),
                capabilities: vec![],
            },
        );
        let me = [ME.to_owned()];
        let missing = connector(&c, None, None, &me, now).unwrap();
        let accepted = find_condition(&missing.conditions, "Accepted").unwrap();
        assert_eq!(
            (accepted.status.as_str(), accepted.reason.as_str()),
            ("False", "ConnectorClassNotFound")
        );
        assert!(connector(&c, Some(&class("someone.else/controller")), None, &me, now).is_none());
        // Several controller names may be served at once, Datum's among them.
        let both = [
            ME.to_owned(),
            portway_api::DATUM_CONNECT_CONTROLLER.to_owned(),
        ];
        let datum = connector(
            &c,
            Some(&class(portway_api::DATUM_CONNECT_CONTROLLER)),
            None,
            &both,
            now,
        )
        .unwrap();
        let accepted = find_condition(&datum.conditions, "Accepted").unwrap();
        assert_eq!(accepted.status, "True", "{accepted:?}");
        assert!(accepted.message.contains("datum-connect"), "{accepted:?}");
    }

    #[test]
    fn a_lease_is_made_for_an_accepted_connector_that_names_none() {
        let mut c = Connector::new(
            "datum-connect-abcde",
            ConnectorSpec {
                connector_class_name: "datum-connect".into(),
                capabilities: vec![],
            },
        );
        c.metadata.namespace = Some("p".into());
        c.metadata.uid = Some("u-1".into());
        let lease = lease_to_create(&c, true, false).unwrap();
        assert_eq!(lease.metadata.name.as_deref(), Some("datum-connect-abcde"));
        assert_eq!(lease.metadata.namespace.as_deref(), Some("p"));
        let owner = &lease.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.uid.as_str(), owner.controller), ("u-1", Some(true)));
        let spec = lease.spec.unwrap();
        assert_eq!(spec.lease_duration_seconds, Some(LEASE_SECONDS));
        assert_eq!(spec.holder_identity.as_deref(), Some("datum-connect-abcde"));
        assert!(
            spec.renew_time.is_none(),
            "not renewed until the agent says so"
        );
        // Not accepted (no class), already there, or named by the agent: nothing to make.
        assert!(lease_to_create(&c, false, false).is_none());
        assert!(lease_to_create(&c, true, true).is_none());
        c.status = Some(portway_api::ConnectorStatus {
            lease_ref: Some(portway_api::LocalObjectReference {
                name: "datum-connect-abcde".into(),
            }),
            ..Default::default()
        });
        assert!(lease_to_create(&c, true, false).is_none());
    }

    #[test]
    fn advertisements_need_their_connector() {
        let now = Timestamp::from_second(1).unwrap();
        let a = ConnectorAdvertisement::new(
            "a",
            portway_api::ConnectorAdvertisementSpec {
                connector_ref: portway_api::LocalObjectReference {
                    name: "gone".into(),
                },
                layer4: vec![],
            },
        );
        assert_eq!(advertisement(&a, true, now).reason, "Accepted");
        let c = advertisement(&a, false, now);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "ConnectorNotFound")
        );
        assert!(c.message.contains("gone"));
        assert_eq!(c.last_transition_time.0, now, "stamped with the given time");
    }
}
