//! Connector and ConnectorAdvertisement status, as pure functions of the objects, the
//! class, the lease and the time.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use portway_api::{Connector, ConnectorAdvertisement, ConnectorClass, condition_at};

/// What a connector's status should say, and when to look again.
#[derive(Debug, PartialEq)]
pub struct ConnectorDecision {
    /// `Accepted` and `Ready`.
    pub conditions: Vec<Condition>,
    /// When the lease expires, so a silent device goes not-ready on time.
    pub requeue_after: Option<Duration>,
}

/// `None` when the connector's class belongs to another controller: not ours to touch.
pub fn connector(
    c: &Connector,
    class: Option<&ConnectorClass>,
    lease: Option<&Lease>,
    controller: &str,
    now: Timestamp,
) -> Option<ConnectorDecision> {
    let generation = c.metadata.generation;
    let class_name = &c.spec.connector_class_name;
    let accepted = match class {
        Some(cls) if cls.spec.controller_name != controller => return None,
        Some(_) => condition_at(
            "Accepted",
            true,
            "Accepted",
            format!("connector class {class_name} is served by {controller}"),
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
            let d = connector(&c, Some(&cls), l.as_ref(), ME, now).unwrap();
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
    fn class_decides_acceptance_and_ownership() {
        let now = Timestamp::from_second(1).unwrap();
        let c = Connector::new(
            "c",
            ConnectorSpec {
                connector_class_name: "portway".into(),
                capabilities: vec![],
            },
        );
        let missing = connector(&c, None, None, ME, now).unwrap();
        let accepted = find_condition(&missing.conditions, "Accepted").unwrap();
        assert_eq!(
            (accepted.status.as_str(), accepted.reason.as_str()),
            ("False", "ConnectorClassNotFound")
        );
        assert!(connector(&c, Some(&class("someone.else/controller")), None, ME, now).is_none());
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
