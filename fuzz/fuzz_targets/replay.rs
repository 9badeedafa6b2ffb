//! `npd-agent replay` on any input: every line (plain text, `/dev/kmsg` records, `dmesg` lines
//! with any time in them) through the default rules. Nothing may panic, whatever the clock the
//! lines claim; every report must serialise.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use npd_agent::{commands::replay, engine::Engine, rules::RuleSet};

/// A fresh engine with the default rules, compiled once.
fn fresh() -> Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::new(RuleSet::defaults())).clone()
}

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    replay::replay_with(fresh(), data, &mut out).expect("replay into memory never fails");
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        serde_json_check(line);
    }
});

/// Every report line is one JSON object.
fn serde_json_check(line: &[u8]) {
    assert!(
        line.starts_with(b"{") && line.ends_with(b"}"),
        "not a JSON object: {}",
        String::from_utf8_lossy(line)
    );
}
