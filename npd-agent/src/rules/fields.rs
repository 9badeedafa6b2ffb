//! The pieces both monitor file formats share ([`super::npd_file`], [`super::plugin_file`]):
//! the problems found in a file, a condition's and a rule type's fields, bounded durations.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigProblem, ConfigReason};

/// The problems found in one file.
pub(super) struct Problems<'a> {
    pub(super) file: &'a str,
    pub(super) list: Vec<ConfigProblem>,
}

impl Problems<'_> {
    pub(super) fn add(&mut self, path: impl Into<String>, reason: ConfigReason) {
        self.list.push(ConfigProblem {
            file: self.file.to_owned(),
            path: path.into(),
            reason,
        });
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCondition {
    #[serde(rename = "type")]
    pub(super) type_: String,
    pub(super) reason: String,
    pub(super) message: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawRuleType {
    Temporary,
    Permanent,
}

/// A positive duration of at most [`crate::time::MAX_WINDOW`], in Go's syntax (`5m0s`) or
/// humantime's (`5min`); a problem at `at` otherwise.
pub(super) fn duration(text: &str, at: String, p: &mut Problems<'_>) -> Option<Duration> {
    match crate::time::parse_duration(text) {
        Ok(d) if d > crate::time::MAX_WINDOW => {
            p.add(
                at,
                ConfigReason::Invalid(format!(
                    "duration {text:?} is too long; the limit is {}",
                    humantime::format_duration(crate::time::MAX_WINDOW)
                )),
            );
            None
        }
        Ok(d) if !d.is_zero() => Some(d),
        Ok(_) => {
            p.add(
                at,
                ConfigReason::Invalid("the duration must be positive".into()),
            );
            None
        }
        Err(e) => {
            p.add(
                at,
                ConfigReason::Invalid(format!(
                    "invalid duration {e} (e.g. \"90s\", \"5m\", \"1h30m\")"
                )),
            );
            None
        }
    }
}
