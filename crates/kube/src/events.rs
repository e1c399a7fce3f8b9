//! Events: what each part records so that `kubectl describe` says why, and `kubectl get
//! events -w` follows a tunnel's life. One [`Events`] per part publishes through kube-rs's
//! `Recorder` (which writes `events.k8s.io/v1`).
//!
//! Recording never fails the caller: an event that cannot be written is logged at debug,
//! since the state it describes is already in the object's status.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// A part's event recorder.
///
/// Each event is published by a fresh `Recorder`: kube-rs folds events with the same
/// type, reason and object into a series *keeping the first note*, so "lease expired"
/// would be shown under the earlier "no lease yet". Callers record only changes, so
/// repeats that a series would fold are rare.
#[derive(Clone)]
pub struct Events {
    client: kube::Client,
    reporter: Reporter,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events")
    }
}

/// An event's kind: `Normal` for progress, `Warning` for what needs a person.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Normal,
    Warning,
}

impl Events {
    /// `controller` names the part (`portway-operator`, `portway-agent`, …) in the events'
    /// `reportingController`; `instance` tells replicas apart.
    pub fn new(client: kube::Client, controller: &str, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: controller.to_owned(),
            instance,
        };
        Self { client, reporter }
    }

    /// Records one event about `about`.
    pub async fn record(
        &self,
        about: &ObjectReference,
        kind: Kind,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_: match kind {
                Kind::Normal => EventType::Normal,
                Kind::Warning => EventType::Warning,
            },
            reason: reason.to_owned(),
            note: Some(truncate(note)),
            action: action.to_owned(),
            secondary: None,
        };
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        if let Err(e) = recorder.publish(&event, about).await {
            tracing::debug!(error = %e, reason, "recording an event");
        }
    }

    /// One event for the conditions of `new` whose status or reason differs from `old`:
    /// a reconcile that settles five conditions at once is one line in `kubectl get
    /// events` and one write, not five (a new proxy cost the API server ten writes of
    /// events alone). It is a Warning when any change is trouble (a condition turning
    /// False, such as `BackendsReady=False`, or `HostnamesInUse=True`), under that
    /// condition's reason; otherwise Normal under the first change's. The note lists
    /// every change, troubles first, so truncation drops the least useful end.
    pub async fn conditions_changed(
        &self,
        about: &ObjectReference,
        old: &[Condition],
        new: &[Condition],
    ) {
        if let Some((kind, reason, note)) = summary(old, new) {
            self.record(about, kind, &reason, "Reconcile", note).await;
        }
    }
}

/// The one event [`Events::conditions_changed`] records: kind, reason and note.
pub fn summary(old: &[Condition], new: &[Condition]) -> Option<(Kind, String, String)> {
    let trouble =
        |c: &Condition| (c.status == "True") == ABNORMAL_WHEN_TRUE.contains(&c.type_.as_str());
    let mut changes = changed(old, new);
    // Stable: troubles first, each group in the object's own order.
    changes.sort_by_key(|c| !trouble(c));
    let first = changes.first()?;
    let kind = if trouble(first) {
        Kind::Warning
    } else {
        Kind::Normal
    };
    let note = changes
        .iter()
        .map(|c| {
            if c.message.is_empty() {
                format!("{}={}", c.type_, c.status)
            } else {
                format!("{}={}: {}", c.type_, c.status, c.message)
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    Some((kind, first.reason.clone(), note))
}

/// Conditions whose True is the trouble (Kubernetes' "abnormal-true" polarity).
const ABNORMAL_WHEN_TRUE: &[&str] = &["HostnamesInUse"];

/// The conditions of `new` whose status or reason is not what `old` says.
pub fn changed<'a>(old: &[Condition], new: &'a [Condition]) -> Vec<&'a Condition> {
    new.iter()
        .filter(|c| {
            !old.iter()
                .any(|o| o.type_ == c.type_ && o.status == c.status && o.reason == c.reason)
        })
        .collect()
}

/// Kubernetes refuses notes over 1 KiB; the end of a long message is the least useful.
fn truncate(mut note: String) -> String {
    const MAX: usize = portway_api::validation::MAX_EVENT_NOTE;
    if note.len() > MAX {
        let mut end = MAX - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(type_: &str, status: &str, reason: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ),
            observed_generation: None,
        }
    }

    #[test]
    fn only_changed_conditions_are_events() {
        let old = [
            c("Accepted", "True", "Accepted"),
            c("Ready", "True", "Ready"),
        ];
        let new = [
            c("Accepted", "True", "Accepted"),
            c("Ready", "False", "LeaseExpired"),
            c("Programmed", "True", "Programmed"),
        ];
        let types: Vec<&str> = changed(&old, &new)
            .iter()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(types, ["Ready", "Programmed"]);
        assert_eq!(truncate("é".repeat(600)).len(), 1023);
    }

    #[test]
    fn one_event_per_reconcile_with_troubles_first() {
        let mut ready = c("BackendsReady", "False", "NoReadyBackend");
        ready.message = "0 of 1 ready".into();
        let new = [
            c("Accepted", "True", "Accepted"),
            ready,
            c("HostnamesInUse", "False", "NoConflict"),
        ];
        assert_eq!(
            summary(&[], &new),
            Some((
                Kind::Warning,
                "NoReadyBackend".into(),
                "BackendsReady=False: 0 of 1 ready; Accepted=True; HostnamesInUse=False".into()
            ))
        );
        let fine = [
            c("Accepted", "True", "Accepted"),
            c("Programmed", "True", "Programmed"),
        ];
        assert_eq!(
            summary(&[], &fine),
            Some((
                Kind::Normal,
                "Accepted".into(),
                "Accepted=True; Programmed=True".into()
            ))
        );
        assert_eq!(summary(&fine, &fine), None);
    }
}
