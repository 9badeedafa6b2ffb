//! NPD's custom plugin monitor semantics (NPD's `pkg/custompluginmonitor`): a plugin's exit is
//! a result, and the result moves its rule's condition or posts an Event. No I/O: running the
//! plugins is [`crate::plugins`].
//!
//! * Exit 0 is OK: a permanent rule's condition is False with its default reason and message;
//!   a temporary rule does nothing.
//! * Exit 1 is NonOK: the condition is True with the rule's reason and the plugin's output as
//!   its message; a temporary rule posts a Warning Event with the output.
//! * Any other exit, a timeout, or a plugin that could not run is Unknown: the condition is
//!   Unknown with its default reason and a message that says why; a temporary rule posts an
//!   Event too (NPD posts for every status above OK).
//! * A condition changes when its status changes, or stays True with another reason, or (only
//!   with `enable_message_change_based_condition_update`) stays True with another message.

use std::{collections::HashSet, time::SystemTime};

use super::Engine;
use crate::{
    problem::{ConditionStatus, ProblemEvent, Report, Severity},
    rules::{Effect, PluginMonitor},
    time::Mono,
};

/// What one run of a plugin gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginResult {
    /// Which monitor (its index in the rule set's plugins).
    pub monitor: usize,
    /// Which rule of it.
    pub rule: usize,
    /// What its exit means.
    pub status: PluginStatus,
    /// Its output (trimmed and cut to the monitor's `max_output_length`), or why it has none.
    pub message: String,
    /// When it ended.
    pub at: Mono,
}

/// What a plugin's exit means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginStatus {
    /// Exit 0.
    Ok,
    /// Exit 1.
    NonOk,
    /// Any other exit, a timeout, or no exit at all.
    Unknown,
}

impl PluginStatus {
    /// The meaning of an exit code (`None`: killed by a signal).
    pub fn of_exit(code: Option<i32>) -> Self {
        match code {
            Some(0) => PluginStatus::Ok,
            Some(1) => PluginStatus::NonOk,
            _ => PluginStatus::Unknown,
        }
    }

    fn condition_status(self) -> ConditionStatus {
        match self {
            PluginStatus::Ok => ConditionStatus::False,
            PluginStatus::NonOk => ConditionStatus::True,
            PluginStatus::Unknown => ConditionStatus::Unknown,
        }
    }
}

/// A plugin monitor as the engine keeps it: what its rules mean (its conditions are in the
/// engine's condition store with the others).
#[derive(Clone, Debug)]
pub(super) struct PluginState {
    source: String,
    message_change_updates: bool,
    /// Each rule's effect and reason.
    rules: Vec<(Effect, String)>,
    /// Conditions not written yet (`skip_initial_status`): their first result writes them.
    unwritten: HashSet<String>,
    /// Whether `problem_counter` and `problem_gauge` count its problems.
    pub(super) metrics_reporting: bool,
}

impl PluginState {
    pub(super) fn new(monitor: &PluginMonitor) -> Self {
        PluginState {
            source: monitor.source.clone(),
            message_change_updates: monitor.message_change_updates,
            rules: monitor
                .rules
                .iter()
                .map(|r| (r.effect.clone(), r.reason.clone()))
                .collect(),
            unwritten: if monitor.skip_initial_status {
                monitor.conditions.iter().map(|c| c.type_.clone()).collect()
            } else {
                HashSet::new()
            },
            metrics_reporting: monitor.metrics_reporting,
        }
    }

    /// The conditions not to write before their first result.
    pub(super) fn unwritten(&self) -> &HashSet<String> {
        &self.unwritten
    }

    /// Its source.
    pub(super) fn source(&self) -> &str {
        &self.source
    }

    /// Each rule's reason and, for a permanent rule, its condition.
    pub(super) fn reasons(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.rules.iter().map(|(effect, reason)| match effect {
            Effect::Temporary => (reason.as_str(), None),
            Effect::Permanent { condition } => (reason.as_str(), Some(condition.as_str())),
        })
    }
}

impl Engine {
    /// What a plugin's result reports (NPD's semantics, see the module documentation).
    pub fn plugin_result(&mut self, result: &PluginResult) -> Vec<Report> {
        let wall = self.clock.wall(result.at);
        let Some(state) = self.plugins.get_mut(result.monitor) else {
            return Vec::new();
        };
        let Some((effect, reason)) = state.rules.get(result.rule).cloned() else {
            return Vec::new();
        };
        let source = state.source.clone();
        let reports = match effect {
            Effect::Temporary if result.status == PluginStatus::Ok => Vec::new(),
            Effect::Temporary => vec![Report::Event(ProblemEvent {
                source,
                severity: Severity::Warning,
                reason,
                message: result.message.clone(),
                timestamp: wall,
                fields: serde_json::Map::new(),
                pods: Vec::new(),
            })],
            Effect::Permanent { condition } => {
                let first = state.unwritten.remove(&condition);
                let message_change = state.message_change_updates;
                self.plugin_condition(&condition, &reason, result, (first, message_change), wall)
                    .map(Report::Condition)
                    .into_iter()
                    .collect()
            }
        };
        self.count(&reports);
        reports
    }

    /// NPD's five cases for a permanent rule's condition.
    fn plugin_condition(
        &mut self,
        type_: &str,
        reason: &str,
        result: &PluginResult,
        (first, message_change): (bool, bool),
        wall: SystemTime,
    ) -> Option<crate::problem::ConditionChange> {
        let current = self.conditions.get(type_)?.clone();
        let (default_reason, default_message) = self.conditions.default_of(type_)?;
        let (default_reason, default_message) =
            (default_reason.to_owned(), default_message.to_owned());
        let new = result.status.condition_status();
        let (reason, message) = match (current.status, new) {
            // True to False or Unknown; False to Unknown and back.
            (old, new) if old != new && new != ConditionStatus::True => (
                default_reason,
                if new == ConditionStatus::False {
                    default_message
                } else {
                    result.message.clone()
                },
            ),
            // To True.
            (old, ConditionStatus::True) if old != ConditionStatus::True => {
                (reason.to_owned(), result.message.clone())
            }
            // Stays True with another reason, or another message when asked.
            (ConditionStatus::True, ConditionStatus::True)
                if current.reason != reason
                    || (message_change && current.message != result.message) =>
            {
                (reason.to_owned(), result.message.clone())
            }
            // Unchanged: written only if it never was (`skip_initial_status`).
            _ if first => (current.reason.clone(), current.message.clone()),
            _ => return None,
        };
        self.conditions.set(type_, new, &reason, &message, wall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{problem::ConditionChange, rules::RuleSet};

    /// NPD's documented example (`docs/custom_plugin_monitor.md`), with `/bin/true` as the
    /// script so that the file validates.
    fn upfile(extra: &str) -> Engine {
        let json = format!(
            r#"{{
              "plugin": "custom",
              "pluginConfig": {{"invoke_interval": "10s", "timeout": "3s", "max_output_length": 80,
                                "concurrency": 3 {extra}}},
              "source": "upfile-custom-plugin-monitor",
              "conditions": [{{"type": "UpFile", "reason": "UpFileExists", "message": "up file exists"}}],
              "rules": [
                {{"type": "temporary", "reason": "UpFileMissing", "path": "/bin/true", "timeout": "3s"}},
                {{"type": "permanent", "condition": "UpFile", "reason": "UpFileMissing", "path": "/bin/true"}}
              ]
            }}"#
        );
        let rules = RuleSet::from_sources([("upfile.json", json.as_bytes())]).unwrap();
        Engine::new(rules)
    }

    fn result(rule: usize, status: PluginStatus, message: &str) -> PluginResult {
        PluginResult {
            monitor: 0,
            rule,
            status,
            message: message.into(),
            at: Mono::since_boot(std::time::Duration::from_secs(1)),
        }
    }

    fn change(reports: &[Report]) -> Option<&ConditionChange> {
        match reports {
            [Report::Condition(c)] => Some(c),
            _ => None,
        }
    }

    #[test]
    fn exit_codes_give_npds_condition_states() {
        let mut e = upfile("");
        // OK while False: nothing.
        assert!(e.plugin_result(&result(1, PluginStatus::Ok, "")).is_empty());
        // NonOK: True with the rule's reason and the output.
        let r = e.plugin_result(&result(1, PluginStatus::NonOk, "no up file"));
        let c = &change(&r).unwrap().condition;
        assert_eq!(
            (c.status, c.reason.as_str(), c.message.as_str()),
            (ConditionStatus::True, "UpFileMissing", "no up file")
        );
        assert_eq!(change(&r).unwrap().source, "upfile-custom-plugin-monitor");
        // Same reason, new message: unchanged without message-change updates.
        assert!(
            e.plugin_result(&result(1, PluginStatus::NonOk, "still none"))
                .is_empty()
        );
        // Unknown: the default reason, the message says why.
        let r = e.plugin_result(&result(1, PluginStatus::Unknown, "timed out after 3s"));
        let c = &change(&r).unwrap().condition;
        assert_eq!(
            (c.status, c.reason.as_str(), c.message.as_str()),
            (
                ConditionStatus::Unknown,
                "UpFileExists",
                "timed out after 3s"
            )
        );
        // Unknown again: nothing.
        assert!(
            e.plugin_result(&result(1, PluginStatus::Unknown, "x"))
                .is_empty()
        );
        // OK: False with the default reason and message (recovery).
        let r = e.plugin_result(&result(1, PluginStatus::Ok, "fine"));
        let c = &change(&r).unwrap().condition;
        assert_eq!(
            (c.status, c.reason.as_str(), c.message.as_str()),
            (ConditionStatus::False, "UpFileExists", "up file exists")
        );
    }

    #[test]
    fn a_message_change_updates_only_when_enabled() {
        let mut e = upfile(r#", "enable_message_change_based_condition_update": true"#);
        e.plugin_result(&result(1, PluginStatus::NonOk, "one"));
        let r = e.plugin_result(&result(1, PluginStatus::NonOk, "two"));
        assert_eq!(change(&r).unwrap().condition.message, "two");
    }

    #[test]
    fn a_temporary_rule_posts_a_warning_for_anything_but_ok() {
        let mut e = upfile("");
        assert!(e.plugin_result(&result(0, PluginStatus::Ok, "")).is_empty());
        for status in [PluginStatus::NonOk, PluginStatus::Unknown] {
            let r = e.plugin_result(&result(0, status, "missing"));
            match r.as_slice() {
                [Report::Event(ev)] => {
                    assert_eq!(ev.reason, "UpFileMissing");
                    assert_eq!(ev.message, "missing");
                    assert_eq!(ev.severity, Severity::Warning);
                }
                other => panic!("expected one event, got {other:?}"),
            }
        }
    }

    #[test]
    fn skip_initial_status_leaves_the_condition_to_the_first_result() {
        let mut e = upfile(r#", "skip_initial_status": true"#);
        let initial = e.initial_conditions(SystemTime::UNIX_EPOCH);
        assert!(initial.iter().all(|c| c.condition.type_ != "UpFile"));
        // The first result writes it, even unchanged (False).
        let r = e.plugin_result(&result(1, PluginStatus::Ok, ""));
        assert_eq!(change(&r).unwrap().condition.status, ConditionStatus::False);
        // Later ones follow the usual rules.
        assert!(e.plugin_result(&result(1, PluginStatus::Ok, "")).is_empty());
    }

    #[test]
    fn results_for_rules_that_do_not_exist_are_ignored() {
        let mut e = upfile("");
        assert!(
            e.plugin_result(&result(7, PluginStatus::NonOk, ""))
                .is_empty()
        );
        let mut r = result(0, PluginStatus::NonOk, "");
        r.monitor = 3;
        assert!(e.plugin_result(&r).is_empty());
    }

    #[test]
    fn plugin_reasons_start_in_the_problem_metrics() {
        let e = upfile("");
        let reasons = e.reasons();
        assert!(reasons.contains(&(
            "upfile-custom-plugin-monitor".to_string(),
            "UpFileMissing".to_string(),
            Some("UpFile".to_string())
        )));
        assert!(e.sources_without_metrics().is_empty());
    }
}
