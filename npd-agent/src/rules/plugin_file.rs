//! NPD's custom plugin monitor files (`"plugin": "custom"`), accepted unchanged: the fields of
//! NPD's `pkg/custompluginmonitor/types` with NPD's defaults, each checked, every problem named
//! by its JSON path. What the plugins' exits mean is in [`crate::engine`]; running them is
//! [`crate::plugins`].

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use serde_json::Value;

use super::{
    ConditionDecl, ConfigReason, Effect,
    fields::{Problems, RawCondition, RawRuleType, duration},
};

/// NPD's defaults.
pub const DEFAULT_INVOKE_INTERVAL: Duration = Duration::from_secs(30);
/// See [`DEFAULT_INVOKE_INTERVAL`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// See [`DEFAULT_INVOKE_INTERVAL`].
pub const DEFAULT_MAX_OUTPUT_LENGTH: usize = 80;
/// See [`DEFAULT_INVOKE_INTERVAL`].
pub const DEFAULT_CONCURRENCY: usize = 3;
/// The longest a plugin may be given to run.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// The most plugins one monitor may run at once.
pub const MAX_CONCURRENCY: usize = 64;

/// A custom plugin monitor: plugins run on a schedule; their exit status sets conditions or
/// posts Events.
#[derive(Clone, Debug)]
pub struct PluginMonitor {
    /// The file.
    pub name: String,
    /// The problems' source (Event source component).
    pub source: String,
    /// Whether `problem_counter` and `problem_gauge` count this monitor's problems.
    pub metrics_reporting: bool,
    /// How many plugins of this monitor run at once at most.
    pub concurrency: usize,
    /// Plugin output is cut to this many bytes (at a character boundary).
    pub max_output_length: usize,
    /// Whether a new message alone (same status and reason) updates a True condition.
    pub message_change_updates: bool,
    /// Whether the conditions are written before the first result.
    pub skip_initial_status: bool,
    /// The conditions, in their default (healthy) state.
    pub conditions: Vec<ConditionDecl>,
    /// The rules.
    pub rules: Vec<PluginRule>,
}

/// One plugin and what its exit means.
#[derive(Clone, Debug)]
pub struct PluginRule {
    /// Temporary (an Event on non-OK) or permanent (sets its condition).
    pub effect: Effect,
    /// The problem's reason.
    pub reason: String,
    /// The executable (run directly, its `#!` line as the kernel reads it; never a shell).
    pub path: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// How long it may run.
    pub timeout: Duration,
    /// How often it runs.
    pub invoke_interval: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFile {
    #[expect(dead_code, reason = "read to route the file here (\"custom\")")]
    plugin: String,
    #[serde(default)]
    plugin_config: RawConfig,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    metrics_reporting: Option<bool>,
    #[serde(default)]
    conditions: Vec<Value>,
    #[serde(default)]
    rules: Vec<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    invoke_interval: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    max_output_length: Option<i64>,
    #[serde(default)]
    concurrency: Option<i64>,
    #[serde(default)]
    enable_message_change_based_condition_update: Option<bool>,
    #[serde(default)]
    skip_initial_status: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "type")]
    type_: RawRuleType,
    #[serde(default)]
    condition: Option<String>,
    reason: String,
    path: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    invoke_interval: Option<String>,
}

/// A bounded positive duration from the file, or `default` when absent.
fn bounded(
    text: Option<&str>,
    default: Duration,
    max: Duration,
    at: &str,
    p: &mut Problems<'_>,
) -> Duration {
    let Some(text) = text else {
        return default;
    };
    match duration(text, at.to_owned(), p) {
        Some(d) if d > max => {
            p.add(
                at,
                ConfigReason::Invalid(format!(
                    "{text:?} is too long; the limit is {}",
                    humantime::format_duration(max)
                )),
            );
            default
        }
        Some(d) => d,
        None => default,
    }
}

/// A count from 1 to `max`, or `default` when absent.
fn count(value: Option<i64>, default: usize, max: usize, at: &str, p: &mut Problems<'_>) -> usize {
    match value {
        None => default,
        Some(n) if n >= 1 && n as u64 <= max as u64 => n as usize,
        Some(n) => {
            p.add(
                at,
                ConfigReason::Invalid(format!("{n} is out of range: give 1 to {max}")),
            );
            default
        }
    }
}

/// Parses and checks a custom plugin monitor file (already known to be JSON with
/// `"plugin": "custom"`). Relative plugin paths are taken from the agent's working directory,
/// as NPD takes them.
pub(super) fn parse(value: Value, p: &mut Problems<'_>) -> Option<PluginMonitor> {
    let raw: RawFile = match serde_json::from_value(value) {
        Ok(raw) => raw,
        Err(e) => {
            p.add("$", ConfigReason::Schema(e.to_string()));
            return None;
        }
    };
    let c = &raw.plugin_config;
    let interval = bounded(
        c.invoke_interval.as_deref(),
        DEFAULT_INVOKE_INTERVAL,
        crate::time::MAX_WINDOW,
        "$.pluginConfig.invoke_interval",
        p,
    );
    let timeout = bounded(
        c.timeout.as_deref(),
        DEFAULT_TIMEOUT,
        MAX_TIMEOUT,
        "$.pluginConfig.timeout",
        p,
    );
    let source = match raw.source {
        Some(s) if !s.trim().is_empty() => s,
        _ => {
            p.add(
                "$.source",
                ConfigReason::Schema(
                    "missing field `source` (e.g. \"ntp-custom-plugin-monitor\")".into(),
                ),
            );
            String::new()
        }
    };
    let mut conditions: Vec<ConditionDecl> = Vec::new();
    for (i, v) in raw.conditions.into_iter().enumerate() {
        match serde_json::from_value::<RawCondition>(v) {
            Ok(c) if c.type_.is_empty() || c.reason.is_empty() => p.add(
                format!("$.conditions[{i}]"),
                ConfigReason::Invalid("a condition needs a non-empty type and reason".into()),
            ),
            Ok(c) => conditions.push(ConditionDecl {
                type_: c.type_,
                reason: c.reason,
                message: c.message,
            }),
            Err(e) => p.add(
                format!("$.conditions[{i}]"),
                ConfigReason::Schema(e.to_string()),
            ),
        }
    }
    let mut rules = Vec::new();
    for (i, v) in raw.rules.into_iter().enumerate() {
        let at = format!("$.rules[{i}]");
        let r: RawRule = match serde_json::from_value(v) {
            Ok(r) => r,
            Err(e) => {
                p.add(at, ConfigReason::Schema(e.to_string()));
                continue;
            }
        };
        if r.reason.trim().is_empty() {
            p.add(
                format!("{at}.reason"),
                ConfigReason::Invalid("the reason must not be empty".into()),
            );
        }
        let effect = match (r.type_, r.condition) {
            (RawRuleType::Temporary, _) => Effect::Temporary,
            (RawRuleType::Permanent, Some(c)) if !c.is_empty() => {
                if !conditions.iter().any(|d| d.type_ == c) {
                    p.add(
                        format!("{at}.condition"),
                        ConfigReason::Invalid(format!(
                            "condition {c:?} is not declared in this file's \"conditions\" \
                             (NPD: a permanent plugin rule needs its default condition)"
                        )),
                    );
                }
                Effect::Permanent { condition: c }
            }
            (RawRuleType::Permanent, _) => {
                p.add(format!("{at}.condition"), ConfigReason::MissingCondition);
                Effect::Temporary
            }
        };
        let path = PathBuf::from(&r.path);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => p.add(
                format!("{at}.path"),
                ConfigReason::Invalid(format!("{:?} is not a file", r.path)),
            ),
            Err(e) => p.add(
                format!("{at}.path"),
                ConfigReason::Invalid(format!("{:?}: {e}", r.path)),
            ),
        }
        let rule_timeout = bounded(
            r.timeout.as_deref(),
            timeout,
            MAX_TIMEOUT,
            &format!("{at}.timeout"),
            p,
        );
        if rule_timeout > timeout {
            p.add(
                format!("{at}.timeout"),
                ConfigReason::Invalid(format!(
                    "the rule's timeout {} is longer than the monitor's {} (NPD refuses it too)",
                    humantime::format_duration(rule_timeout),
                    humantime::format_duration(timeout)
                )),
            );
        }
        let invoke_interval = bounded(
            r.invoke_interval.as_deref(),
            interval,
            crate::time::MAX_WINDOW,
            &format!("{at}.invoke_interval"),
            p,
        );
        rules.push(PluginRule {
            effect,
            reason: r.reason,
            path,
            args: r.args,
            timeout: rule_timeout,
            invoke_interval,
        });
    }
    Some(PluginMonitor {
        name: p.file.to_owned(),
        source,
        metrics_reporting: raw.metrics_reporting.unwrap_or(true),
        concurrency: count(
            c.concurrency,
            DEFAULT_CONCURRENCY,
            MAX_CONCURRENCY,
            "$.pluginConfig.concurrency",
            p,
        ),
        max_output_length: count(
            c.max_output_length,
            DEFAULT_MAX_OUTPUT_LENGTH,
            64 * 1024,
            "$.pluginConfig.max_output_length",
            p,
        ),
        message_change_updates: c
            .enable_message_change_based_condition_update
            .unwrap_or(false),
        skip_initial_status: c.skip_initial_status.unwrap_or(false),
        conditions,
        rules,
    })
}

#[cfg(test)]
mod tests {
    use crate::rules::{ConfigError, Effect, RuleSet};

    fn load(json: &str) -> Result<RuleSet, ConfigError> {
        RuleSet::from_sources([("plugin.json", json.as_bytes())])
    }

    /// The problems as `path: reason` lines.
    fn problems(json: &str) -> Vec<String> {
        load(json)
            .expect_err("the file should be refused")
            .problems
            .iter()
            .map(|p| {
                assert_eq!(p.file, "plugin.json");
                format!("{}: {}", p.path, p.reason)
            })
            .collect()
    }

    const CONDITIONS: &str = r#""conditions": [{"type": "NTPProblem", "reason": "NTPIsUp", "message": "ntp service is up"}]"#;

    fn file(config: &str, rules: &str) -> String {
        format!(
            r#"{{"plugin": "custom", "pluginConfig": {{{config}}}, "source": "ntp-custom-plugin-monitor",
                {CONDITIONS}, "rules": [{rules}]}}"#
        )
    }

    #[test]
    fn npds_annotated_example_loads_with_npds_defaults() {
        let set = load(&file(
            r#""invoke_interval": "30s", "timeout": "5s", "max_output_length": 80, "concurrency": 3,
               "enable_message_change_based_condition_update": false"#,
            r#"{"type": "temporary", "reason": "NTPIsDown", "path": "/bin/true", "invoke_interval": "7s", "timeout": "3s"},
               {"type": "permanent", "condition": "NTPProblem", "reason": "NTPIsDown", "path": "/bin/true", "timeout": "3s"}"#,
        ))
        .unwrap();
        let m = &set.plugins[0];
        assert_eq!(m.source, "ntp-custom-plugin-monitor");
        assert!(m.metrics_reporting);
        assert_eq!((m.concurrency, m.max_output_length), (3, 80));
        assert_eq!(m.rules[0].invoke_interval.as_secs(), 7);
        assert_eq!(m.rules[1].invoke_interval.as_secs(), 30);
        assert_eq!(m.rules[1].timeout.as_secs(), 3);
        assert!(
            matches!(&m.rules[1].effect, Effect::Permanent { condition } if condition == "NTPProblem")
        );
        let defaults = load(&file(
            "",
            r#"{"type": "temporary", "reason": "R", "path": "/bin/true"}"#,
        ))
        .unwrap();
        let d = &defaults.plugins[0];
        assert_eq!(
            (
                d.rules[0].invoke_interval.as_secs(),
                d.rules[0].timeout.as_secs(),
                d.max_output_length,
                d.concurrency
            ),
            (30, 5, 80, 3)
        );
        assert_eq!(set.rule_count(), 2);
    }

    #[test]
    fn an_unknown_field_is_named() {
        let p = problems(&file(
            r#""timeout": "5s", "invoke_intervall": "1s""#,
            r#"{"type": "temporary", "reason": "R", "path": "/bin/true"}"#,
        ));
        assert!(
            p[0].starts_with("$: unknown field `invoke_intervall`"),
            "{p:?}"
        );
        let p = problems(&file(
            "",
            r#"{"type": "temporary", "reason": "R", "path": "/bin/true", "argz": []}"#,
        ));
        assert!(
            p[0].starts_with("$.rules[0]: unknown field `argz`"),
            "{p:?}"
        );
    }

    #[test]
    fn a_bad_duration_is_named() {
        let p = problems(&file(
            r#""invoke_interval": "soon""#,
            r#"{"type": "temporary", "reason": "R", "path": "/bin/true", "timeout": "-3s"}"#,
        ));
        assert!(
            p.iter()
                .any(|l| l.starts_with("$.pluginConfig.invoke_interval:") && l.contains("soon")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|l| l.starts_with("$.rules[0].timeout:") && l.contains("-3s")),
            "{p:?}"
        );
    }

    #[test]
    fn a_rule_timeout_longer_than_the_monitors_is_refused() {
        let p = problems(&file(
            r#""timeout": "5s""#,
            r#"{"type": "temporary", "reason": "R", "path": "/bin/true", "timeout": "10s"}"#,
        ));
        assert!(
            p.iter()
                .any(|l| l.starts_with("$.rules[0].timeout:") && l.contains("longer")),
            "{p:?}"
        );
    }

    #[test]
    fn a_missing_plugin_path_is_named() {
        let p = problems(&file(
            "",
            r#"{"type": "temporary", "reason": "R", "path": "/nonexistent/check.sh"}"#,
        ));
        assert!(
            p.iter()
                .any(|l| l.starts_with("$.rules[0].path:") && l.contains("/nonexistent/check.sh")),
            "{p:?}"
        );
    }

    #[test]
    fn a_rule_naming_an_undeclared_condition_is_named() {
        let p = problems(&file(
            "",
            r#"{"type": "permanent", "condition": "NTPProblems", "reason": "R", "path": "/bin/true"}"#,
        ));
        assert!(
            p.iter()
                .any(|l| l.starts_with("$.rules[0].condition:") && l.contains("NTPProblems")),
            "{p:?}"
        );
        let p = problems(&file(
            "",
            r#"{"type": "permanent", "reason": "R", "path": "/bin/true"}"#,
        ));
        assert!(
            p.iter().any(|l| l.starts_with("$.rules[0].condition:")),
            "{p:?}"
        );
    }

    #[test]
    fn a_truncated_file_is_named_with_its_position() {
        let whole = file(
            "",
            r#"{"type": "temporary", "reason": "R", "path": "/bin/true"}"#,
        );
        let p = problems(&whole[..whole.len() / 2]);
        assert!(p[0].starts_with("$: invalid JSON at line"), "{p:?}");
    }

    #[test]
    fn out_of_range_counts_and_a_missing_source_are_named() {
        let json = file(
            r#""concurrency": 0, "max_output_length": -1"#,
            r#"{"type": "temporary", "reason": " ", "path": "/bin/true"}"#,
        )
        .replace(r#""source": "ntp-custom-plugin-monitor","#, "");
        let p = problems(&json);
        for path in [
            "$.pluginConfig.concurrency:",
            "$.pluginConfig.max_output_length:",
            "$.source:",
            "$.rules[0].reason:",
        ] {
            assert!(p.iter().any(|l| l.starts_with(path)), "{path} not in {p:?}");
        }
    }
}
