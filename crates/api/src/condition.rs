//! Helpers for `metav1.Condition` lists, shared by every controller.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Builds a condition stamped now; `set_condition` keeps the old stamp when the status
/// did not change, so `lastTransitionTime` means what it says.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    condition_at(type_, status, reason, message, generation, Timestamp::now())
}

/// [`condition`] stamped at `now`: pure decisions take the time as an input, so their
/// output depends on nothing else and tests can fix the clock.
pub fn condition_at(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(now),
    }
}

/// Inserts or replaces the condition of the same type, keeping `lastTransitionTime` when
/// the status is unchanged. Returns whether anything other than the timestamp changed.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            let changed = *old != new;
            *old = new;
            changed
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// The condition of the given type, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of the given type is present with status `True`.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_status_keeps_transition_time() {
        let mut list = vec![];
        let mut first = condition("Ready", true, "Ok", "", Some(1));
        first.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        assert!(set_condition(&mut list, first));
        assert!(!set_condition(
            &mut list,
            condition("Ready", true, "Ok", "", Some(1))
        ));
        assert_eq!(list[0].last_transition_time, Time(Timestamp::UNIX_EPOCH));
        assert!(set_condition(
            &mut list,
            condition("Ready", false, "Gone", "", Some(1))
        ));
        assert_ne!(list[0].last_transition_time, Time(Timestamp::UNIX_EPOCH));
        assert!(is_condition_true(
            &[condition("A", true, "R", "", None)],
            "A"
        ));
    }

    #[test]
    fn condition_at_stamps_the_given_time() {
        let c = condition_at("Ready", false, "Gone", "m", Some(2), Timestamp::UNIX_EPOCH);
        assert_eq!(c.last_transition_time, Time(Timestamp::UNIX_EPOCH));
        assert_eq!(
            (c.status.as_str(), c.observed_generation),
            ("False", Some(2))
        );
    }
}
