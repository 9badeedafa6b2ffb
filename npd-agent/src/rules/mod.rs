//! Rules: what turns kernel events into problems. Loads NPD system-log-monitor JSON files
//! (unchanged) and npd's structured rules (the same file format, rules with `event` instead of
//! `pattern`), validates them, and compiles them. No I/O except reading the files in
//! [`RuleSet::load`]; matching lives in [`crate::engine`].

pub(crate) mod defaults;
pub(crate) mod fields;
pub(crate) mod monitor_file;
pub(crate) mod npd_file;
pub mod pattern;
pub mod plugin_file;
pub mod structured;

use std::{collections::HashMap, path::PathBuf, time::Duration};

pub use pattern::LogPattern;
pub use plugin_file::{PluginMonitor, PluginRule};
pub use structured::{DedupWindow, FieldFilter, Template};

use crate::event::EventKind;

/// A loaded, validated set of rule files.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    /// The files, in load order.
    pub files: Vec<MonitorFile>,
    /// NPD custom plugin monitors, in load order.
    pub plugins: Vec<PluginMonitor>,
    /// Monitor files given whose plugin npd does not run: named, not run.
    pub unsupported: Vec<UnsupportedMonitor>,
}

/// A monitor file npd does not run (NPD's `journald` or `filelog` log monitors, its
/// system-stats monitor...): the agent names it (log, `/healthz`, `npd_monitor_unsupported`)
/// and runs everything else; `check-config` refuses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsupportedMonitor {
    /// The file.
    pub file: String,
    /// Its plugin, or the kind of monitor.
    pub plugin: String,
}

/// One rule file (NPD: one system-log-monitor).
#[derive(Clone, Debug)]
pub struct MonitorFile {
    /// Where it came from (a path, or `<embedded>/config/...` for the defaults).
    pub name: String,
    /// The `source` of its problems (Kubernetes Event source component), e.g. `kernel-monitor`.
    pub source: String,
    /// How many recent messages multi-line patterns see (NPD's `bufferSize`, default 10).
    pub buffer_size: usize,
    /// The conditions this file declares, each starting False with its reason and message.
    pub conditions: Vec<ConditionDecl>,
    /// The rules, in file order.
    pub rules: Vec<Rule>,
}

/// A declared condition and its default (False) state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionDecl {
    /// Condition type, e.g. `KernelDeadlock`.
    pub type_: String,
    /// Default reason, e.g. `KernelHasNoDeadlock`.
    pub reason: String,
    /// Default message.
    pub message: String,
}

/// One compiled rule.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Temporary (an event) or permanent (sets a condition).
    pub effect: Effect,
    /// The problem's reason, e.g. `OOMKilling`.
    pub reason: String,
    /// What the rule matches.
    pub matcher: Matcher,
    /// Fire only when this many matches happen within the window.
    pub rate: Option<Rate>,
    /// Permanent rules: back to the default False state after this long without a match.
    pub recover_after: Option<Duration>,
    /// Overrides the de-duplication window of the fault kind.
    pub dedup_window: Option<Duration>,
}

/// What a rule does when it fires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Report an event (NPD `temporary`).
    Temporary,
    /// Set the condition True (NPD `permanent`).
    Permanent {
        /// The condition type.
        condition: String,
    },
}

/// What a rule matches.
#[derive(Clone, Debug)]
pub enum Matcher {
    /// An NPD log pattern on kernel messages.
    Log {
        /// The compiled pattern.
        pattern: LogPattern,
        /// NPD's `patternGeneratedMessageSuffix`, appended as `"; <suffix>"`.
        suffix: Option<String>,
    },
    /// A structured event.
    Event {
        /// Which events.
        kind: EventKind,
        /// All must pass.
        filters: Vec<FieldFilter>,
        /// The message.
        template: Template,
    },
}

/// "N matches within W".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// N.
    pub count: u32,
    /// W.
    pub window: Duration,
}

/// One problem found in a rule file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {path}: {reason}")]
pub struct ConfigProblem {
    /// The file (path as given, or the embedded name).
    pub file: String,
    /// A JSON path in the file, e.g. `$.rules[3].pattern` (`$` for the whole file).
    pub path: String,
    /// What is wrong.
    pub reason: ConfigReason,
}

/// What is wrong with a rule file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigReason {
    /// The file could not be read.
    #[error("cannot read the file: {0}")]
    Read(String),
    /// Not JSON.
    #[error("invalid JSON at line {line}, column {column}: {message}")]
    Json {
        /// Line (1-based).
        line: usize,
        /// Column (1-based).
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// A field is unknown, missing or of the wrong type.
    #[error("{0}")]
    Schema(String),
    /// A plugin npd does not implement.
    #[error(
        "plugin {0:?} is not supported by npd: npd reads the kernel log itself (plugin \"kmsg\"); \
         keep running NPD for {0} monitors (the agent names this file and runs the others)"
    )]
    UnsupportedPlugin(String),
    /// A plugin name nobody knows.
    #[error(
        "unknown plugin {0:?} (npd runs \"kmsg\", NPD's kernel monitor, and \"custom\", its \
         custom plugin monitor)"
    )]
    UnknownPlugin(String),
    /// A bad regular expression.
    #[error("{0}")]
    Pattern(#[from] pattern::PatternError),
    /// A permanent rule names no condition.
    #[error("a permanent rule needs a \"condition\"")]
    MissingCondition,
    /// A permanent rule names a condition no loaded file declares.
    #[error("condition {0:?} is not declared in the \"conditions\" of any loaded file")]
    UndeclaredCondition(String),
    /// The same condition type twice.
    #[error("condition type {type_:?} is already declared in {first}")]
    DuplicateCondition {
        /// The type.
        type_: String,
        /// Where it was first declared (file and path).
        first: String,
    },
    /// Anything else, said precisely.
    #[error("{0}")]
    Invalid(String),
}

/// Every problem found while loading rule files.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    /// The problems, in file order.
    pub problems: Vec<ConfigProblem>,
}

impl RuleSet {
    /// Reads and validates rule files; every problem in every file is reported, with file,
    /// JSON path and reason.
    pub fn load(paths: &[PathBuf]) -> Result<RuleSet, ConfigError> {
        let mut sources = Vec::new();
        let mut problems = Vec::new();
        for path in paths {
            let name = path.display().to_string();
            match std::fs::read(path) {
                Ok(bytes) => sources.push((name, bytes)),
                Err(e) => problems.push(ConfigProblem {
                    file: name,
                    path: "$".into(),
                    reason: ConfigReason::Read(e.to_string()),
                }),
            }
        }
        match Self::from_sources(sources.iter().map(|(n, b)| (n.as_str(), b.as_slice()))) {
            Ok(set) if problems.is_empty() => Ok(set),
            Ok(_) => Err(ConfigError { problems }),
            Err(e) => {
                problems.extend(e.problems);
                Err(ConfigError { problems })
            }
        }
    }

    /// Validates rule files given as (name, content).
    pub fn from_sources<'a>(
        sources: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<RuleSet, ConfigError> {
        let mut problems = Vec::new();
        let mut files = Vec::new();
        let mut plugins = Vec::new();
        let mut unsupported = Vec::new();
        for (name, bytes) in sources {
            match monitor_file::parse(name, bytes) {
                Ok(monitor_file::Parsed::Rules(file)) => files.push(file),
                Ok(monitor_file::Parsed::Plugin(monitor)) => plugins.push(monitor),
                Ok(monitor_file::Parsed::Unsupported(plugin)) => {
                    unsupported.push(UnsupportedMonitor {
                        file: name.to_owned(),
                        plugin,
                    })
                }
                Err(mut p) => problems.append(&mut p),
            }
        }
        // Condition types are node-wide: each is declared once, and a permanent rule may use
        // one declared in any loaded file.
        let mut declared: HashMap<&str, String> = HashMap::new();
        let all_conditions = files
            .iter()
            .map(|f| (&f.name, &f.conditions))
            .chain(plugins.iter().map(|m| (&m.name, &m.conditions)));
        for (name, conditions) in all_conditions {
            for (i, c) in conditions.iter().enumerate() {
                let here = format!("{name}: $.conditions[{i}]");
                if let Some(first) = declared.get(c.type_.as_str()) {
                    problems.push(ConfigProblem {
                        file: name.clone(),
                        path: format!("$.conditions[{i}].type"),
                        reason: ConfigReason::DuplicateCondition {
                            type_: c.type_.clone(),
                            first: first.clone(),
                        },
                    });
                } else {
                    declared.insert(&c.type_, here);
                }
            }
        }
        for file in &files {
            for (i, rule) in file.rules.iter().enumerate() {
                if let Effect::Permanent { condition } = &rule.effect
                    && !declared.contains_key(condition.as_str())
                {
                    problems.push(ConfigProblem {
                        file: file.name.clone(),
                        path: format!("$.rules[{i}].condition"),
                        reason: ConfigReason::UndeclaredCondition(condition.clone()),
                    });
                }
            }
        }
        if problems.is_empty() {
            Ok(RuleSet {
                files,
                plugins,
                unsupported,
            })
        } else {
            Err(ConfigError { problems })
        }
    }

    /// The monitors npd does not run, as problems (`check-config` exits 2 for them).
    pub fn unsupported_problems(&self) -> Vec<ConfigProblem> {
        self.unsupported
            .iter()
            .map(|u| ConfigProblem {
                file: u.file.clone(),
                path: "$.plugin".into(),
                reason: ConfigReason::UnsupportedPlugin(u.plugin.clone()),
            })
            .collect()
    }

    /// The embedded defaults: NPD's `kernel-monitor.json` and `readonly-monitor.json`, npd's
    /// patterns for current kernels' wording, and the structured rules.
    pub fn defaults() -> RuleSet {
        match Self::from_sources(defaults::FILES.iter().map(|(n, t)| (*n, t.as_bytes()))) {
            Ok(set) => set,
            // The embedded files are tested; this cannot happen in a released binary.
            Err(e) => panic!("the embedded default rules are invalid: {e}"),
        }
    }

    /// The rule files given, or the defaults when none is.
    pub fn load_or_defaults(paths: &[PathBuf]) -> Result<RuleSet, ConfigError> {
        if paths.is_empty() {
            Ok(Self::defaults())
        } else {
            Self::load(paths)
        }
    }

    /// Number of rules in all files (plugin rules included).
    pub fn rule_count(&self) -> usize {
        self.files.iter().map(|f| f.rules.len()).sum::<usize>()
            + self.plugins.iter().map(|m| m.rules.len()).sum::<usize>()
    }
}

impl UnsupportedMonitor {
    /// `npd_monitor_unsupported{file,plugin}`: 1 for each monitor npd does not run.
    pub fn register_metric(
        all: &[UnsupportedMonitor],
        registry: &prometheus::Registry,
    ) -> prometheus::Result<()> {
        let gauge = crate::metrics::int_gauge_vec(
            "npd_monitor_unsupported",
            "Monitor files given whose plugin npd does not run (named, not run): 1 each.",
            &["file", "plugin"],
        );
        for u in all {
            gauge.with_label_values(&[&u.file, &u.plugin]).set(1);
        }
        crate::metrics::register(registry, &gauge)
    }

    /// What `/healthz` says of it.
    pub fn note(&self) -> String {
        format!(
            "monitor {} not run: npd does not implement NPD's {} monitors",
            self.file, self.plugin
        )
    }
}
