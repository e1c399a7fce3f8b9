//! The proxy's conditions: refused with the first problem's reason, or accepted with what
//! the gateway and the connectors have reported so far.

use std::collections::BTreeSet;

use gateway_api::apis::standard::httproutes::HttpRouteStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use portway_api::condition_at;

use super::backends::Backend;
use super::reasons::{ACCEPTED, BACKENDS_READY, METADATA, NO_READY_BACKEND, PENDING, PROGRAMMED};

/// What every condition of one decision shares: the generation it observed and the time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stamp {
    pub generation: Option<i64>,
    pub now: Timestamp,
}

impl Stamp {
    pub fn condition(self, type_: &str, status: bool, reason: &str, message: String) -> Condition {
        condition_at(type_, status, reason, message, self.generation, self.now)
    }
}

/// Why the proxy is refused: the condition reason, and a sentence naming the field.
#[derive(Clone, Debug)]
pub(crate) struct Problem {
    pub reason: &'static str,
    pub message: String,
}

impl Problem {
    pub fn new(reason: &'static str, message: String) -> Self {
        Self { reason, message }
    }
}

/// `None` when there is no problem. Otherwise every problem is in `Accepted`'s message
/// (so one read shows all that needs fixing) under the first one's reason.
pub(super) fn refused(
    problems: &[Problem],
    hostnames: &Condition,
    stamp: Stamp,
) -> Option<Vec<Condition>> {
    let reason = problems.first()?.reason;
    let message = problems
        .iter()
        .map(|p| p.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    let not_accepted = || "not programmed: the proxy is not accepted".to_owned();
    Some(vec![
        stamp.condition(ACCEPTED, false, reason, message),
        stamp.condition(PROGRAMMED, false, reason, not_accepted()),
        stamp.condition(METADATA, false, reason, not_accepted()),
        hostnames.clone(),
    ])
}

/// The per-hostname `HostnamesVerified` and `CertificatesReady`, summed up on the proxy as
/// Datum does: `HostnamesVerified` when it has spec hostnames and they are checked, and
/// `CertificatesReady` when an issuer runs.
pub(super) fn hostname_summaries(
    statuses: &[portway_api::HostnameStatus],
    has_spec_hostnames: bool,
    stamp: Stamp,
) -> Vec<Condition> {
    use crate::certs::reasons::{CERTIFICATES_READY, ISSUE_FAILED};
    use crate::verify::reasons::HOSTNAMES_VERIFIED;
    let of = |type_: &str| -> Vec<(&str, &Condition)> {
        statuses
            .iter()
            .filter_map(|s| {
                let c = s.conditions.iter().find(|c| c.type_ == type_)?;
                Some((s.hostname.as_str(), c))
            })
            .collect()
    };
    let not_true = |list: &[(&str, &Condition)]| -> Vec<String> {
        list.iter()
            .filter(|(_, c)| c.status != "True")
            .map(|(h, c)| format!("{h} ({})", c.reason))
            .collect()
    };
    let mut out = Vec::new();
    let verified = of(HOSTNAMES_VERIFIED);
    if has_spec_hostnames && !verified.is_empty() {
        let missing = not_true(&verified);
        out.push(if missing.is_empty() {
            stamp.condition(
                HOSTNAMES_VERIFIED,
                true,
                HOSTNAMES_VERIFIED,
                format!("all {} hostnames are verified", verified.len()),
            )
        } else {
            stamp.condition(
                HOSTNAMES_VERIFIED,
                false,
                "UnverifiedHostnamesPresent",
                format!(
                    "unverified hostnames present: {}; see status.hostnameStatuses",
                    missing.join(", ")
                ),
            )
        });
    }
    let certs = of(CERTIFICATES_READY);
    if !certs.is_empty() {
        let missing = not_true(&certs);
        let failed = certs
            .iter()
            .any(|(_, c)| c.status != "True" && c.reason == ISSUE_FAILED);
        out.push(match (missing.is_empty(), failed) {
            (true, _) => stamp.condition(
                CERTIFICATES_READY,
                true,
                "AllCertificatesReady",
                format!("certificates are ready for all {} hostnames", certs.len()),
            ),
            (false, true) => stamp.condition(
                CERTIFICATES_READY,
                false,
                "CertificatesFailed",
                format!(
                    "not ready: {}; see status.hostnameStatuses",
                    missing.join(", ")
                ),
            ),
            (false, false) => stamp.condition(
                CERTIFICATES_READY,
                false,
                "CertificatesPending",
                format!(
                    "not ready: {}; see status.hostnameStatuses",
                    missing.join(", ")
                ),
            ),
        });
    }
    out
}

/// Whether our gateway accepted the generated route (named like the proxy).
pub(super) fn accepted_by_gateway(
    route_status: Option<&HttpRouteStatus>,
    controller_name: &str,
    route: &str,
) -> bool {
    let parents = route_status.map(|s| {
        s.parents.iter().map(|p| {
            (
                p.controller_name.as_str(),
                p.parent_ref.name.as_str(),
                p.conditions.as_slice(),
            )
        })
    });
    parent_accepted(parents.into_iter().flatten(), controller_name, route)
}

/// Whether a route's `status.parents`, as (controller name, parent name, conditions) of
/// whichever route kind, has our gateway's `Accepted=True` for the Gateway `gateway`.
pub(crate) fn parent_accepted<'a>(
    parents: impl IntoIterator<Item = (&'a str, &'a str, &'a [Condition])>,
    controller_name: &str,
    gateway: &str,
) -> bool {
    parents.into_iter().any(|(controller, parent, conditions)| {
        controller == controller_name
            && parent == gateway
            && conditions
                .iter()
                .any(|c| c.type_ == "Accepted" && c.status == "True")
    })
}

/// The conditions of an accepted proxy.
pub(super) fn accepted(
    backends: &[Backend<'_>],
    forwards: bool,
    accepted_by_gateway: bool,
    hostnames: &Condition,
    stamp: Stamp,
) -> Vec<Condition> {
    let ready = backends.iter().filter(|b| b.ready()).count();
    let connectors = backends
        .iter()
        .filter_map(|b| b.connector?.metadata.name.as_deref())
        .collect::<BTreeSet<_>>()
        .len();
    let origins = backends.iter().filter(|b| b.connector.is_none()).count();
    vec![
        stamp.condition(
            ACCEPTED,
            true,
            ACCEPTED,
            if origins == 0 {
                format!(
                    "{} backend(s) through {connectors} connector(s), {ready} ready",
                    backends.len()
                )
            } else {
                format!(
                    "{} backend(s): {origins} origin(s), the others through {connectors} connector(s); {ready} ready",
                    backends.len()
                )
            },
        ),
        programmed(accepted_by_gateway, stamp),
        // A backend exists only once its connector has reported its id.
        if !forwards {
            stamp.condition(
                METADATA,
                true,
                METADATA,
                "every rule redirects: no device is needed".into(),
            )
        } else if backends.is_empty() {
            stamp.condition(
                METADATA,
                false,
                PENDING,
                "no backend connector has reported its endpoint id yet".into(),
            )
        } else {
            stamp.condition(
                METADATA,
                true,
                METADATA,
                "datum-node-id and datum-target-* headers are set on every backend".into(),
            )
        },
        if !forwards {
            stamp.condition(
                BACKENDS_READY,
                true,
                BACKENDS_READY,
                "every rule redirects: no device is needed".into(),
            )
        } else {
            backends_ready(ready, backends.len(), "requests get 503", stamp)
        },
        hostnames.clone(),
    ]
}

/// `Programmed`, of a proxy of either kind: True once our gateway accepted the route.
pub(crate) fn programmed(accepted_by_gateway: bool, stamp: Stamp) -> Condition {
    if accepted_by_gateway {
        stamp.condition(
            PROGRAMMED,
            true,
            PROGRAMMED,
            "the gateway accepted the route".into(),
        )
    } else {
        stamp.condition(
            PROGRAMMED,
            false,
            PENDING,
            "waiting for the gateway to accept the route".into(),
        )
    }
}

/// `BackendsReady`, of a proxy of either kind: True while one of its `total` backends has
/// a Ready connector; `otherwise` says what clients meet when none has.
pub(crate) fn backends_ready(
    ready: usize,
    total: usize,
    otherwise: &str,
    stamp: Stamp,
) -> Condition {
    if ready > 0 {
        stamp.condition(
            BACKENDS_READY,
            true,
            BACKENDS_READY,
            format!("{ready} of {total} backend(s) ready"),
        )
    } else {
        stamp.condition(
            BACKENDS_READY,
            false,
            NO_READY_BACKEND,
            format!(
                "none of the {total} backend(s) has a Ready connector: the agent is offline or \
                 has not connected yet, so {otherwise}"
            ),
        )
    }
}
