//! Leases as heartbeats: a device renews its connector's Lease; everyone else asks when
//! it runs out.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// When the lease runs out: its last renewal plus its duration. `None` when it was never
/// renewed, was released, or names no duration.
pub fn expiry(lease: &Lease) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    let renewed = spec.renew_time.as_ref()?.0;
    let secs = i64::from(spec.lease_duration_seconds?);
    renewed.checked_add(SignedDuration::from_secs(secs)).ok()
}

/// The holder, when the lease has one and it is still current at `now`.
pub fn current_holder(lease: &Lease, now: Timestamp) -> Option<&str> {
    let holder = lease.spec.as_ref()?.holder_identity.as_deref()?;
    (!holder.is_empty() && expiry(lease).is_some_and(|e| e > now)).then_some(holder)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(holder: Option<&str>, renewed: Option<i64>, duration: Option<i32>) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                renew_time: renewed.map(|s| MicroTime(Timestamp::from_second(s).unwrap())),
                lease_duration_seconds: duration,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn expiry_and_holder() {
        let now = Timestamp::from_second(1_000).unwrap();
        let cases = [
            // (holder, renewed, duration) -> (expiry, current holder)
            ((Some("a"), Some(990), Some(30)), (Some(1_020), Some("a"))),
            ((Some("a"), Some(900), Some(30)), (Some(930), None)),
            ((Some("a"), Some(970), Some(30)), (Some(1_000), None)),
            ((Some(""), Some(990), Some(30)), (Some(1_020), None)),
            ((None, Some(990), Some(30)), (Some(1_020), None)),
            ((Some("a"), None, Some(30)), (None, None)),
            ((Some("a"), Some(990), None), (None, None)),
        ];
        for ((holder, renewed, duration), (want_expiry, want_holder)) in cases {
            let l = lease(holder, renewed, duration);
            assert_eq!(
                expiry(&l).map(|t| t.as_second()),
                want_expiry,
                "{holder:?} {renewed:?} {duration:?}"
            );
            assert_eq!(current_holder(&l, now), want_holder);
        }
        assert_eq!(expiry(&Lease::default()), None);
    }
}
