//! Which of its hostnames the proxy may serve. A name another proxy owns refuses the whole
//! proxy, so its status never claims a URL that serves someone else's app.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use portway_api::{HostnameStatus, HttpProxy};

use super::conditions::{Problem, Stamp};
use super::reasons::{HOSTNAME_IN_USE, HOSTNAMES_IN_USE};
use crate::certs::reasons::CERTIFICATES_READY;
use crate::verify::Verification;
use crate::verify::reasons::{HOSTNAMES_VERIFIED, NOT_REQUIRED, NOT_VERIFIED, VERIFIED};

/// The proxy's hostnames, sorted by whether it may have them.
pub(super) struct Hostnames {
    /// One per spec hostname: whether another proxy owns it.
    pub statuses: Vec<HostnameStatus>,
    /// What the Gateway listens on and the route matches: the free hostnames (lowercase),
    /// then the canonical one.
    pub active: Vec<String>,
    /// The proxy's `HostnamesInUse` condition.
    pub condition: Condition,
    /// One per hostname another proxy owns.
    pub problems: Vec<Problem>,
}

pub(super) fn resolve(
    proxy: &HttpProxy,
    claimed_by: &dyn Fn(&str) -> Option<String>,
    canonical: Option<&str>,
    certificate: Option<super::CertificateReady<'_>>,
    verification: Option<&dyn Fn(&str) -> Verification>,
    stamp: Stamp,
) -> Hostnames {
    let certificate_ready = |h: &str| {
        certificate.map(|c| {
            let (ok, reason, message) = c(h);
            stamp.condition(CERTIFICATES_READY, ok, reason, message)
        })
    };
    let mut statuses = Vec::new();
    let mut active = Vec::new();
    let mut in_use = Vec::new();
    for h in &proxy.spec.hostnames {
        let h = h.to_ascii_lowercase();
        let verdict = verification.map(|v| v(&h));
        let verified = verdict.as_ref().map(|v| {
            let (ok, reason, message) = match v {
                Verification::NotRequired(why) => (true, NOT_REQUIRED, why.clone()),
                Verification::Verified(how) => (true, VERIFIED, how.clone()),
                Verification::Pending {
                    instructions,
                    found,
                } => (
                    false,
                    NOT_VERIFIED,
                    format!("{h} is not routed until this project proves it controls it: {instructions} ({found})"),
                ),
            };
            stamp.condition(HOSTNAMES_VERIFIED, ok, reason, message)
        });
        let owner = claimed_by(&h);
        let pending = verdict.as_ref().is_some_and(|v| !v.routable());
        let c = match &owner {
            Some(other) => {
                let claimed = format!("{h} is already claimed by {other}");
                in_use.push(claimed.clone());
                stamp.condition(HOSTNAMES_IN_USE, true, HOSTNAME_IN_USE, claimed)
            }
            None => {
                if !pending {
                    active.push(h.clone());
                }
                stamp.condition(
                    HOSTNAMES_IN_USE,
                    false,
                    "HostnameAvailable",
                    if pending {
                        format!("no other proxy holds {h}")
                    } else {
                        format!("{h} is routed to this proxy")
                    },
                )
            }
        };
        let mut conditions = vec![c];
        conditions.extend(verified);
        // A name another proxy holds, or one not proven, is not served for this one: no
        // certificate to tell.
        if owner.is_none() && !pending {
            conditions.extend(certificate_ready(&h));
        }
        statuses.push(HostnameStatus {
            hostname: h,
            conditions,
        });
    }
    // The canonical name is always this proxy's: it has no HostnamesInUse to report, but
    // its certificate is the one `portway http` prints an https:// URL for.
    if let Some(c) = canonical
        && let Some(cond) = certificate_ready(c)
    {
        statuses.push(HostnameStatus {
            hostname: c.to_owned(),
            conditions: vec![cond],
        });
    }
    active.extend(canonical.map(str::to_owned));
    let condition = if in_use.is_empty() {
        stamp.condition(
            HOSTNAMES_IN_USE,
            false,
            "NoConflicts",
            "all hostnames are available".into(),
        )
    } else {
        stamp.condition(
            HOSTNAMES_IN_USE,
            true,
            HOSTNAMES_IN_USE,
            format!("hostnames already claimed: {}", in_use.join(", ")),
        )
    };
    let problems = in_use
        .iter()
        .map(|u| {
            Problem::new(
                HOSTNAME_IN_USE,
                format!("spec.hostnames: {u}; choose another hostname or delete the other claim"),
            )
        })
        .collect();
    Hostnames {
        statuses,
        active,
        condition,
        problems,
    }
}
