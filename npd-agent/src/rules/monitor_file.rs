//! A monitor file as NPD names it (`--config.system-log-monitor`,
//! `--config.custom-plugin-monitor`): its JSON is read once, then its `plugin` says which
//! format it is: a system log monitor ([`super::npd_file`]), a custom plugin monitor
//! ([`super::plugin_file`]), or a plugin npd does not run. What both formats share is in
//! [`super::fields`].

use serde_json::Value;

use super::{
    ConfigProblem, ConfigReason, MonitorFile, PluginMonitor, fields::Problems, npd_file,
    plugin_file,
};

/// What a monitor file is, read from its `plugin`.
#[derive(Debug)]
pub enum Parsed {
    /// A system log monitor npd runs (plugin `kmsg`, or none): its rules.
    Rules(MonitorFile),
    /// A custom plugin monitor (plugin `custom`).
    Plugin(PluginMonitor),
    /// A monitor of a plugin npd does not run (`journald`, `filelog`): named, not run.
    Unsupported(String),
}

/// NPD's monitor plugins npd knows of and does not run.
pub const UNSUPPORTED_PLUGINS: [&str; 2] = ["journald", "filelog"];

/// Parses one monitor file; every problem is reported with its JSON path.
pub fn parse(name: &str, bytes: &[u8]) -> Result<Parsed, Vec<ConfigProblem>> {
    let mut p = Problems {
        file: name,
        list: Vec::new(),
    };
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            p.add(
                "$",
                ConfigReason::Json {
                    line: e.line(),
                    column: e.column(),
                    message: e.to_string(),
                },
            );
            return Err(p.list);
        }
    };
    if !value.is_object() {
        p.add(
            "$",
            ConfigReason::Schema("a rule file is a JSON object".into()),
        );
        return Err(p.list);
    }
    // A monitor of another plugin is named, not read: its fields are that plugin's.
    match value.get("plugin").and_then(Value::as_str) {
        Some(plugin) if UNSUPPORTED_PLUGINS.contains(&plugin) => {
            return Ok(Parsed::Unsupported(plugin.to_owned()));
        }
        Some("custom") => {
            let monitor = plugin_file::parse(value, &mut p);
            return match monitor {
                Some(m) if p.list.is_empty() => Ok(Parsed::Plugin(m)),
                _ => Err(p.list),
            };
        }
        _ => {}
    }
    match npd_file::parse(name, value, &mut p) {
        Some(file) if p.list.is_empty() => Ok(Parsed::Rules(file)),
        _ => Err(p.list),
    }
}
