//! What npd reports: the plain types that flow from the rules and condition logic to the
//! exporters (stdout JSON, Kubernetes, Prometheus, HTTP). Kept apart from Kubernetes API types,
//! as NPD keeps its `Condition`/`Event`/`Status` apart.

use std::time::SystemTime;

use serde::{Serialize, Serializer};

use crate::event::{EventKind, Owner};

/// How a problem shows up as a Kubernetes Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Severity {
    /// A problem (Kubernetes Event type `Warning`).
    Warning,
    /// A recovery or informational change (Kubernetes Event type `Normal`).
    Normal,
}

/// A Node condition's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ConditionStatus {
    /// The problem is present.
    True,
    /// The problem is absent (every condition's default).
    False,
    /// Not known.
    Unknown,
}

impl ConditionStatus {
    /// `"True"`, `"False"` or `"Unknown"`, as Kubernetes spells them.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

/// The state of one Node condition npd owns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Condition {
    /// Condition type, e.g. `KernelDeadlock`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Current status.
    pub status: ConditionStatus,
    /// Reason of the last transition, e.g. `DockerHung` (or the default reason).
    pub reason: String,
    /// Human-readable message of the last transition.
    pub message: String,
    /// When the status last changed.
    #[serde(serialize_with = "rfc3339")]
    pub transition_time: SystemTime,
}

/// One thing to report, in the order it happened.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Report {
    /// A problem that is an event only (NPD: a temporary rule).
    Event(ProblemEvent),
    /// A condition changed (NPD: a permanent rule; npd also: recovery). Exporters also post the
    /// NPD-format condition-change Event for it, see [`condition_change_message`].
    Condition(ConditionChange),
}

impl Report {
    /// The monitor's `source` it came from.
    pub fn source(&self) -> &str {
        match self {
            Report::Event(e) => &e.source,
            Report::Condition(c) => &c.source,
        }
    }
}

/// A problem event.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProblemEvent {
    /// The rule file's `source`, e.g. `kernel-monitor` (Kubernetes Event source component).
    pub source: String,
    /// Warning for problems, Normal for recoveries.
    #[serde(skip)]
    pub severity: Severity,
    /// The rule's reason, e.g. `OOMKilling`.
    pub reason: String,
    /// The message: the matched text (log rules) or the expanded template (structured rules).
    pub message: String,
    /// When it happened.
    #[serde(skip)]
    pub timestamp: SystemTime,
    /// Structured fields of the kernel event behind it (pid, comm, device...), when there is one.
    #[serde(flatten, skip_serializing_if = "serde_json::Map::is_empty")]
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// The pods it happened in, known by namespace and name (pod attribution; the JSON has
    /// them in `fields`): the Kubernetes exporter also posts the Event on each.
    #[serde(skip)]
    pub pods: Vec<crate::event::PodRef>,
}

impl ProblemEvent {
    /// Names the pods it happened in (pod attribution, for a report a log rule made from the
    /// kernel's text): the message gets [`Owner::message_suffix`] after NPD's message, the
    /// JSON the owner's fields it lacks, and `pods` those an Event can be posted on.
    pub fn attribute(&mut self, owner: &Owner, kind: EventKind) {
        if let Some(suffix) = owner.message_suffix() {
            self.message.push_str(&suffix);
        }
        for (key, value) in owner.json(kind) {
            self.fields.entry(key).or_insert(value);
        }
        self.pods = owner.named_pods();
    }
}

/// A condition's new state.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConditionChange {
    /// The rule file's `source`.
    pub source: String,
    /// The condition after the change.
    #[serde(flatten)]
    pub condition: Condition,
}

impl ConditionChange {
    /// The Event severity of this change: Warning when a problem appears, Normal otherwise.
    pub fn severity(&self) -> Severity {
        match self.condition.status {
            ConditionStatus::True => Severity::Warning,
            _ => Severity::Normal,
        }
    }
}

/// NPD's message for a condition-change Event:
/// `Node condition <type> is now: <status>, reason: <reason>, message: "<message>"`.
pub fn condition_change_message(c: &Condition) -> String {
    format!(
        "Node condition {} is now: {}, reason: {}, message: \"{}\"",
        c.type_,
        c.status.as_str(),
        c.reason,
        c.message
    )
}

/// A condition as a Kubernetes `NodeCondition` (what `/conditions` lists and what the
/// Kubernetes exporter writes to the Node): `type`, `status`, `reason`, `message`,
/// `lastTransitionTime`, and `lastHeartbeatTime` = `heartbeat`.
pub fn node_condition_json(c: &Condition, heartbeat: SystemTime) -> serde_json::Value {
    serde_json::json!({
        "type": c.type_,
        "status": c.status.as_str(),
        "reason": c.reason,
        "message": c.message,
        "lastTransitionTime": crate::time::rfc3339(c.transition_time),
        "lastHeartbeatTime": crate::time::rfc3339(heartbeat),
    })
}

/// Serializes a time as RFC 3339 UTC with second precision (what Kubernetes uses), clamped to
/// what RFC 3339 can write (see [`crate::time::rfc3339`]): it never fails.
pub fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::time::rfc3339(*t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition(status: ConditionStatus) -> Condition {
        Condition {
            type_: "KernelDeadlock".into(),
            status,
            reason: "DockerHung".into(),
            message: "task docker:7 blocked for more than 120 seconds.".into(),
            transition_time: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn npd_condition_change_message() {
        assert_eq!(
            condition_change_message(&condition(ConditionStatus::True)),
            "Node condition KernelDeadlock is now: True, reason: DockerHung, message: \
             \"task docker:7 blocked for more than 120 seconds.\""
        );
    }

    #[test]
    fn json_lines_match_the_design_schema() {
        let ev = Report::Event(ProblemEvent {
            source: "kernel-monitor".into(),
            severity: Severity::Warning,
            reason: "OOMKilling".into(),
            message: "Killed process 42 (stress)".into(),
            timestamp: SystemTime::UNIX_EPOCH,
            fields: serde_json::Map::new(),
            pods: Vec::new(),
        });
        assert_eq!(
            serde_json::to_value(&ev).unwrap(),
            serde_json::json!({"kind":"event","source":"kernel-monitor","reason":"OOMKilling",
                "message":"Killed process 42 (stress)"})
        );
        let change = Report::Condition(ConditionChange {
            source: "kernel-monitor".into(),
            condition: condition(ConditionStatus::True),
        });
        assert_eq!(
            serde_json::to_value(&change).unwrap(),
            serde_json::json!({"kind":"condition","source":"kernel-monitor","type":"KernelDeadlock",
                "status":"True","reason":"DockerHung",
                "message":"task docker:7 blocked for more than 120 seconds.",
                "transition_time":"1970-01-01T00:00:00Z"})
        );
    }
}
