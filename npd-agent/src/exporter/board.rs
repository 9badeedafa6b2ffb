//! The current conditions, as `/conditions` serves them: what the reports said last, per
//! condition type, in NPD's shape (a JSON array of Kubernetes `NodeCondition`s whose
//! `lastHeartbeatTime` is when npd last updated the condition).

use std::{
    sync::{Arc, RwLock},
    time::SystemTime,
};

use super::Exporter;
use crate::problem::{Condition, ConditionChange, Report, node_condition_json};

/// The board, shared between its exporter side and the HTTP server.
#[derive(Clone, Debug, Default)]
pub struct ConditionBoard {
    entries: Arc<RwLock<Vec<(Condition, SystemTime)>>>,
}

impl ConditionBoard {
    /// A board showing `initial` (every condition in its default state).
    pub fn new(initial: &[ConditionChange]) -> Self {
        let board = ConditionBoard::default();
        for change in initial {
            board.set(&change.condition);
        }
        board
    }

    fn set(&self, condition: &Condition) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        match entries.iter_mut().find(|(c, _)| c.type_ == condition.type_) {
            Some(entry) => *entry = (condition.clone(), now),
            None => entries.push((condition.clone(), now)),
        }
    }

    /// The conditions, in the order they first appeared.
    #[cfg(test)]
    pub fn snapshot(&self) -> Vec<Condition> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// NPD's `/conditions` body.
    pub fn to_json(&self) -> serde_json::Value {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .map(|(c, updated)| node_condition_json(c, *updated))
            .collect()
    }
}

impl Exporter for ConditionBoard {
    fn export(&mut self, report: &Report) {
        if let Report::Condition(change) = report {
            self.set(&change.condition);
        }
    }

    fn adopted(&mut self, changes: &[ConditionChange]) {
        for change in changes {
            self.set(&change.condition);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::ConditionStatus;

    #[test]
    fn conditions_in_npd_shape() {
        let condition = |status, reason: &str| Condition {
            type_: "KernelDeadlock".into(),
            status,
            reason: reason.into(),
            message: "kernel has no deadlock".into(),
            transition_time: SystemTime::UNIX_EPOCH,
        };
        let change = |c| ConditionChange {
            source: "kernel-monitor".into(),
            condition: c,
        };
        let mut board = ConditionBoard::new(&[change(condition(
            ConditionStatus::False,
            "KernelHasNoDeadlock",
        ))]);
        board.export(&Report::Condition(change(condition(
            ConditionStatus::True,
            "DockerHung",
        ))));
        let json = board.to_json();
        let items = json.as_array().unwrap();
        assert_eq!(items.len(), 1);
        let mut item = items[0].clone();
        assert!(item["lastHeartbeatTime"].as_str().unwrap().ends_with('Z'));
        item.as_object_mut().unwrap().remove("lastHeartbeatTime");
        assert_eq!(
            item,
            serde_json::json!({"type":"KernelDeadlock","status":"True","lastTransitionTime":"1970-01-01T00:00:00Z",
                "reason":"DockerHung","message":"kernel has no deadlock"})
        );
        assert_eq!(board.snapshot()[0].reason, "DockerHung");
    }
}
