//! Custom plugin monitor files and plugin output from anywhere: the first part of the input is
//! a plugin monitor file, the rest a sequence of plugin results (rule, exit status, output).
//! Loading never panics, and a file that loads takes any result for any rule, in any order,
//! at any time, with any output: NPD's five condition cases never panic, and a condition's
//! state is always one of False, True or Unknown with a reason.
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use npd_agent::{
    engine::{Engine, PluginResult, PluginStatus},
    problem::Report,
    rules::RuleSet,
    time::Mono,
};

fuzz_target!(|data: &[u8]| {
    // The file, then `\0` and the results: [rule, status, len, output...]*.
    let (file, mut results) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(rules) = RuleSet::from_sources([("fuzz.json", file)]) else {
        return;
    };
    let monitors: Vec<usize> = rules.plugins.iter().map(|m| m.rules.len()).collect();
    let mut engine = Engine::new(rules);
    engine.initial_conditions(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    let mut at = Mono::since_boot(Duration::from_secs(1));
    while let [rule, status, len, rest @ ..] = results {
        let step = Duration::from_secs(u64::from(*len) * 1_000_000);
        let len = usize::from(*len).min(rest.len());
        let (output, rest) = rest.split_at(len);
        results = rest;
        let monitor = usize::from(*rule >> 4) % monitors.len().max(1) + usize::from(*rule >> 7);
        let status = match status % 3 {
            0 => PluginStatus::Ok,
            1 => PluginStatus::NonOk,
            _ => PluginStatus::Unknown,
        };
        let result = PluginResult {
            monitor,
            rule: usize::from(*rule & 0x0f),
            status,
            message: String::from_utf8_lossy(output).into_owned(),
            at,
        };
        for report in engine.plugin_result(&result) {
            if let Report::Condition(change) = report {
                // Every reason in a valid file is non-empty: a change always carries one.
                assert!(!change.condition.reason.is_empty(), "{change:?}");
            }
        }
        at = at.saturating_add(step);
    }
});
