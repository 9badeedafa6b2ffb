//! The rule file format: NPD's system-log-monitor JSON, accepted unchanged, plus npd's
//! extensions on rules (`event`, `match`, `message`, `rate`, `recoverAfter`, `dedupWindow`).
//! Every field is checked: an unknown one is an error naming its JSON path.

use std::collections::BTreeMap;

use regex::RegexBuilder;
use serde::Deserialize;
use serde_json::Value;

use super::{
    ConditionDecl, ConfigReason, Effect, FieldFilter, Matcher, MonitorFile, Rate, Rule,
    fields::{Problems, RawCondition, RawRuleType, duration},
    pattern::LogPattern,
    structured::{Template, field_of},
};
use crate::event::EventKind;

/// NPD's default `bufferSize`.
pub const DEFAULT_BUFFER_SIZE: usize = 10;
/// The largest `bufferSize` accepted (each message is matched against this many lines).
pub const MAX_BUFFER_SIZE: usize = 1000;

/// A rule file's top level, as NPD defines it (`MonitorConfig` + `WatcherConfig`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFile {
    /// NPD's log watcher: only `kmsg` is meaningful to npd (absent means `kmsg`).
    #[serde(default)]
    plugin: Option<String>,
    /// Watcher options (accepted, unused).
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "accepted for NPD compatibility; npd has no use for it"
    )]
    plugin_config: Option<Value>,
    /// Accepted, unused: npd reads the kernel log itself.
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "accepted for NPD compatibility; npd has no use for it"
    )]
    log_path: Option<String>,
    /// Accepted, unused: npd reports what happens from its start on.
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "accepted for NPD compatibility; npd has no use for it"
    )]
    lookback: Option<String>,
    /// Accepted, unused.
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "accepted for NPD compatibility; npd has no use for it"
    )]
    delay: Option<String>,
    /// How many recent lines multi-line patterns see.
    #[serde(default)]
    buffer_size: Option<usize>,
    /// The problems' source.
    #[serde(default)]
    source: Option<String>,
    /// Accepted: npd always reports metrics.
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "accepted for NPD compatibility; npd always reports metrics"
    )]
    metrics_reporting: Option<bool>,
    #[serde(default)]
    conditions: Vec<Value>,
    #[serde(default)]
    rules: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRule {
    #[serde(rename = "type")]
    type_: RawRuleType,
    #[serde(default)]
    condition: Option<String>,
    reason: String,
    #[serde(default)]
    pattern: Option<String>,
    #[serde(default)]
    pattern_generated_message_suffix: Option<String>,
    // npd extensions.
    #[serde(default)]
    event: Option<String>,
    #[serde(default, rename = "match")]
    filter: BTreeMap<String, String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    rate: Option<RawRate>,
    #[serde(default)]
    recover_after: Option<String>,
    #[serde(default)]
    dedup_window: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    count: u32,
    window: String,
}

/// The rules of a system log monitor file (plugin `kmsg`, or none) named `name`, its JSON
/// already read by [`super::monitor_file::parse`]; `None` when `p` has problems.
pub(super) fn parse(name: &str, value: Value, p: &mut Problems<'_>) -> Option<MonitorFile> {
    let raw: RawFile = match serde_json::from_value(value) {
        Ok(raw) => raw,
        Err(e) => {
            p.add("$", ConfigReason::Schema(e.to_string()));
            return None;
        }
    };
    match raw.plugin.as_deref() {
        None | Some("kmsg") => {}
        Some(other) => p.add("$.plugin", ConfigReason::UnknownPlugin(other.to_owned())),
    }
    let buffer_size = match raw.buffer_size {
        None | Some(0) => DEFAULT_BUFFER_SIZE,
        Some(n) if n > MAX_BUFFER_SIZE => {
            p.add(
                "$.bufferSize",
                ConfigReason::Invalid(format!(
                    "bufferSize {n} is too large; the limit is {MAX_BUFFER_SIZE}"
                )),
            );
            DEFAULT_BUFFER_SIZE
        }
        Some(n) => n,
    };
    let source = match raw.source {
        Some(s) if !s.trim().is_empty() => s,
        _ => {
            p.add(
                "$.source",
                ConfigReason::Schema("missing field `source` (e.g. \"kernel-monitor\")".into()),
            );
            String::new()
        }
    };
    let mut conditions = Vec::new();
    for (i, v) in raw.conditions.into_iter().enumerate() {
        match serde_json::from_value::<RawCondition>(v) {
            Ok(c) if c.type_.is_empty() || c.reason.is_empty() => p.add(
                format!("$.conditions[{i}]"),
                ConfigReason::Invalid("a condition needs a non-empty type and reason".into()),
            ),
            Ok(c) => {
                if let Some(j) = conditions
                    .iter()
                    .position(|d: &ConditionDecl| d.type_ == c.type_)
                {
                    p.add(
                        format!("$.conditions[{i}].type"),
                        ConfigReason::DuplicateCondition {
                            type_: c.type_.clone(),
                            first: format!("{name}: $.conditions[{j}]"),
                        },
                    );
                }
                conditions.push(ConditionDecl {
                    type_: c.type_,
                    reason: c.reason,
                    message: c.message,
                });
            }
            Err(e) => p.add(
                format!("$.conditions[{i}]"),
                ConfigReason::Schema(e.to_string()),
            ),
        }
    }
    let mut rules = Vec::new();
    for (i, v) in raw.rules.into_iter().enumerate() {
        let at = format!("$.rules[{i}]");
        match serde_json::from_value::<RawRule>(v) {
            Ok(raw) => {
                if let Some(rule) = compile_rule(raw, &at, p) {
                    rules.push(rule);
                }
            }
            Err(e) => p.add(at, ConfigReason::Schema(e.to_string())),
        }
    }
    p.list.is_empty().then(|| MonitorFile {
        name: name.to_owned(),
        source,
        buffer_size,
        conditions,
        rules,
    })
}

fn compile_rule(raw: RawRule, at: &str, p: &mut Problems<'_>) -> Option<Rule> {
    let before = p.list.len();
    if raw.reason.trim().is_empty() {
        p.add(
            format!("{at}.reason"),
            ConfigReason::Invalid("the reason must not be empty".into()),
        );
    }
    let effect = match raw.type_ {
        RawRuleType::Temporary => Effect::Temporary,
        RawRuleType::Permanent => match raw.condition {
            Some(c) if !c.is_empty() => Effect::Permanent { condition: c },
            _ => {
                p.add(format!("{at}.condition"), ConfigReason::MissingCondition);
                Effect::Temporary
            }
        },
    };
    let event = match raw
        .event
        .as_deref()
        .map(|name| (name, EventKind::from_name(name)))
    {
        None => None,
        Some((_, Some(kind))) if kind.is_structured() => Some(kind),
        Some((name, _)) => {
            let known: Vec<&str> = EventKind::ALL
                .into_iter()
                .filter(|k| k.is_structured())
                .map(EventKind::as_str)
                .collect();
            p.add(
                format!("{at}.event"),
                ConfigReason::Invalid(format!(
                    "unknown event {name:?}; structured rules select one of: {}",
                    known.join(", ")
                )),
            );
            return None;
        }
    };
    let matcher = match (raw.pattern, event) {
        (Some(pattern), None) => {
            for (field, set) in [
                ("match", !raw.filter.is_empty()),
                ("message", raw.message.is_some()),
            ] {
                if set {
                    p.add(
                        format!("{at}.{field}"),
                        ConfigReason::Invalid(format!(
                            "\"{field}\" is for structured rules (with \"event\")"
                        )),
                    );
                }
            }
            match LogPattern::compile(&pattern) {
                Ok(pattern) => Some(Matcher::Log {
                    pattern,
                    suffix: raw
                        .pattern_generated_message_suffix
                        .filter(|s| !s.is_empty()),
                }),
                Err(e) => {
                    p.add(format!("{at}.pattern"), e.into());
                    None
                }
            }
        }
        (None, Some(kind)) => {
            if raw.pattern_generated_message_suffix.is_some() {
                p.add(
                    format!("{at}.patternGeneratedMessageSuffix"),
                    ConfigReason::Invalid(
                        "structured rules take a \"message\" template instead".into(),
                    ),
                );
            }
            let mut filters = Vec::new();
            for (name, expr) in &raw.filter {
                let field = match field_of(kind, name, &format!("{name:?}")) {
                    Ok(field) => field,
                    Err(e) => {
                        p.add(format!("{at}.match.{name}"), ConfigReason::Invalid(e));
                        continue;
                    }
                };
                if let Err(e) = LogPattern::compile(expr) {
                    p.add(format!("{at}.match.{name}"), e.into());
                    continue;
                }
                match RegexBuilder::new(&format!("^(?:{expr})$"))
                    .size_limit(1 << 20)
                    .build()
                {
                    Ok(regex) => filters.push(FieldFilter { field, regex }),
                    Err(e) => p.add(
                        format!("{at}.match.{name}"),
                        ConfigReason::Invalid(format!("invalid regular expression: {e}")),
                    ),
                }
            }
            let template = match &raw.message {
                None => Some(Template::default_for(kind)),
                Some(text) => match Template::parse(text, kind) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        p.add(format!("{at}.message"), ConfigReason::Invalid(e));
                        None
                    }
                },
            };
            template.map(|template| Matcher::Event {
                kind,
                filters,
                template,
            })
        }
        (Some(_), Some(_)) => {
            p.add(
                at,
                ConfigReason::Invalid(
                    "a rule has either a \"pattern\" (log rule) or an \"event\", not both".into(),
                ),
            );
            None
        }
        (None, None) => {
            p.add(
                at,
                ConfigReason::Schema(
                    "missing field `pattern` (or `event` for a structured rule)".into(),
                ),
            );
            None
        }
    };
    let rate = raw.rate.and_then(|r| {
        if r.count == 0 {
            p.add(
                format!("{at}.rate.count"),
                ConfigReason::Invalid("count must be at least 1".into()),
            );
        }
        let window = duration(&r.window, format!("{at}.rate.window"), p)?;
        Some(Rate {
            count: r.count,
            window,
        })
    });
    let recover_after = raw
        .recover_after
        .and_then(|d| duration(&d, format!("{at}.recoverAfter"), p));
    if recover_after.is_some() && effect == Effect::Temporary {
        p.add(
            format!("{at}.recoverAfter"),
            ConfigReason::Invalid(
                "recoverAfter is for permanent rules (it returns their condition to False)".into(),
            ),
        );
    }
    let dedup_window = raw
        .dedup_window
        .and_then(|d| duration(&d, format!("{at}.dedupWindow"), p));
    if p.list.len() != before {
        return None;
    }
    Some(Rule {
        effect,
        reason: raw.reason,
        matcher: matcher?,
        rate,
        recover_after,
        dedup_window,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RuleSet;
    use crate::rules::monitor_file::{self, Parsed};

    fn problems(text: &str) -> Vec<(String, String)> {
        match RuleSet::from_sources([("f.json", text.as_bytes())]) {
            Ok(set) => set
                .unsupported_problems()
                .into_iter()
                .map(|p| (p.path, p.reason.to_string()))
                .collect(),
            Err(e) => e
                .problems
                .into_iter()
                .map(|p| (p.path, p.reason.to_string()))
                .collect(),
        }
    }

    fn has(list: &[(String, String)], path: &str, needle: &str) -> bool {
        list.iter().any(|(p, r)| p == path && r.contains(needle))
    }

    #[test]
    fn npd_files_are_accepted_unchanged() {
        for (name, text) in crate::rules::defaults::FILES {
            assert!(
                matches!(
                    monitor_file::parse(name, text.as_bytes()),
                    Ok(Parsed::Rules(_))
                ),
                "{name}"
            );
        }
        // NPD's older example with a multi-line pattern and options npd does not use.
        let Ok(Parsed::Rules(file)) = monitor_file::parse(
            "old.json",
            br#"{"plugin":"kmsg","logPath":"/dev/kmsg","lookback":"10m","delay":"0","bufferSize":10,
            "source":"kernel-monitor","metricsReporting":false,"pluginConfig":{},
            "conditions":[{"type":"KernelDeadlock","reason":"KernelHasNoDeadlock","message":"kernel has no deadlock"}],
            "rules":[{"type":"temporary","reason":"OOMKilling","pattern":"Kill process \\d+ (.+) score \\d+ or sacrifice child\\nKilled process \\d+ (.+) total-vm:\\d+kB, anon-rss:\\d+kB, file-rss:\\d+kB",
              "patternGeneratedMessageSuffix":"see the OOM docs"}]}"#,
        ) else {
            panic!("a rule file")
        };
        assert_eq!(file.buffer_size, 10);
        let Matcher::Log { pattern, suffix } = &file.rules[0].matcher else {
            panic!()
        };
        assert!(!pattern.last_line_only);
        assert_eq!(suffix.as_deref(), Some("see the OOM docs"));
    }

    #[test]
    fn bad_files_name_file_path_and_reason() {
        let l = problems("{");
        assert!(has(&l, "$", "invalid JSON at line 1"), "{l:?}");
        let l = problems("[]");
        assert!(has(&l, "$", "JSON object"), "{l:?}");
        let l = problems(r#"{"source":"s","bogus":1}"#);
        assert!(has(&l, "$", "unknown field `bogus`"), "{l:?}");
        let l = problems(r#"{"plugin":"journald","source":"s"}"#);
        assert!(
            has(&l, "$.plugin", "\"journald\" is not supported"),
            "{l:?}"
        );
        let l = problems(r#"{"plugin":"filelog","source":"s"}"#);
        assert!(has(&l, "$.plugin", "\"filelog\""), "{l:?}");
        let l = problems(r#"{"plugin":"nope","source":"s"}"#);
        assert!(has(&l, "$.plugin", "unknown plugin"), "{l:?}");
        let l = problems(r#"{"rules":[]}"#);
        assert!(has(&l, "$.source", "source"), "{l:?}");
        let l = problems(
            r#"{"source":"s","rules":[
                {"type":"temporary","reason":"A","pattern":"(unclosed"},
                {"type":"temporary","reason":"B","patern":"x"},
                {"type":"permanent","reason":"C","pattern":"x"},
                {"type":"sometimes","reason":"D","pattern":"x"},
                {"type":"temporary","reason":"E","pattern":"((a{100}){100}){100}"},
                {"type":"temporary","reason":"F","event":"hung_task","match":{"nope":"x"},"message":"{bad}"},
                {"type":"temporary","reason":"G","pattern":"x","recoverAfter":"5m"},
                {"type":"permanent","condition":"X","reason":"H","pattern":"x","rate":{"count":0,"window":"soon"}}
            ]}"#,
        );
        assert!(
            has(&l, "$.rules[0].pattern", "invalid regular expression"),
            "{l:?}"
        );
        assert!(has(&l, "$.rules[1]", "unknown field `patern`"), "{l:?}");
        assert!(
            has(&l, "$.rules[2].condition", "needs a \"condition\""),
            "{l:?}"
        );
        assert!(
            has(&l, "$.rules[3]", "unknown variant `sometimes`"),
            "{l:?}"
        );
        assert!(has(&l, "$.rules[4].pattern", "size limit"), "{l:?}");
        assert!(
            has(&l, "$.rules[5].match.nope", "unknown field \"nope\""),
            "{l:?}"
        );
        assert!(
            has(&l, "$.rules[5].message", "unknown field {bad}"),
            "{l:?}"
        );
        assert!(
            has(&l, "$.rules[6].recoverAfter", "permanent rules"),
            "{l:?}"
        );
        assert!(has(&l, "$.rules[7].rate.count", "at least 1"), "{l:?}");
        assert!(
            has(&l, "$.rules[7].rate.window", "invalid duration"),
            "{l:?}"
        );
        // Windows beyond a year (they would overflow the clock at the first match).
        let l = problems(
            r#"{"source":"s","conditions":[{"type":"A","reason":"r","message":"m"}],"rules":[
                {"type":"temporary","reason":"A","event":"oom_kill","dedupWindow":"400000000000y"},
                {"type":"permanent","condition":"A","reason":"B","pattern":"x","recoverAfter":"367d"},
                {"type":"temporary","reason":"C","pattern":"x","rate":{"count":2,"window":"18446744073709551615s"}},
                {"type":"temporary","reason":"D","pattern":"x","rate":{"count":2,"window":"366d"}}
            ]}"#,
        );
        assert!(has(&l, "$.rules[0].dedupWindow", "too long"), "{l:?}");
        assert!(has(&l, "$.rules[1].recoverAfter", "too long"), "{l:?}");
        assert!(has(&l, "$.rules[2].rate.window", "too long"), "{l:?}");
        assert_eq!(l.len(), 3, "a year is allowed: {l:?}");
        let l = problems(
            r#"{"source":"s","conditions":[{"type":"A","reason":"r","message":"m"},{"type":"A","reason":"r","message":"m"}]}"#,
        );
        assert!(has(&l, "$.conditions[1].type", "already declared"), "{l:?}");
    }

    #[test]
    fn cross_file_checks() {
        let a = br#"{"source":"a","conditions":[{"type":"A","reason":"r","message":"m"}],
            "rules":[{"type":"permanent","condition":"B","reason":"x","pattern":"x"}]}"#;
        let b = br#"{"source":"b","conditions":[{"type":"A","reason":"r","message":"m"}]}"#;
        let e = RuleSet::from_sources([("a.json", &a[..]), ("b.json", &b[..])]).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("a.json: $.rules[0].condition: condition \"B\" is not declared"),
            "{text}"
        );
        assert!(
            text.contains(
                "b.json: $.conditions[0].type: condition type \"A\" is already declared in a.json"
            ),
            "{text}"
        );
    }
}
