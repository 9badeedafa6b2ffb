//! The engine: kernel events in, reports out, in order. It runs every rule of a [`RuleSet`]
//! with NPD's semantics, keeps the conditions ([`ConditionManager`]), counts rate rules, and
//! makes one kernel fault one problem: the structured event and the kernel's printed line for
//! the same fault, and the hung-task detector's repeated sightings of a task, are reported once
//! (per reason) and the rest counted. No I/O; the time is a parameter, so timers are tested
//! deterministically.
//!
//! Speed: every log pattern that can only match inside the newest line (all of NPD's kernel
//! rules) is in one [`RegexSet`], so a message costs one scan whatever the number of rules;
//! only patterns that can span lines use NPD's buffer of recent messages.

mod plugin;

use std::{collections::VecDeque, time::SystemTime};

use self::plugin::PluginState;
pub use self::plugin::{PluginResult, PluginStatus};

use aho_corasick::{AhoCorasick, MatchKind};
use prometheus::{Counter, IntCounter, Registry};
use regex::bytes::RegexSet;

use crate::{
    conditions::ConditionManager,
    dedup::{ReportedFaults, Seen},
    event::{Detail, EventKind, KernelEvent, Owner, PerKind, PodRef},
    problem::{Condition, ConditionChange, ProblemEvent, Report, Severity},
    rules::{
        Effect, Matcher, Rule, RuleSet,
        pattern::build_set,
        structured::{self, BlockAt, DedupWindow, FaultKey, default_dedup, disk_of},
    },
    time::{Mono, WallClock},
};

/// The engine's metrics (see [`Engine::metrics`]).
#[derive(Clone, Debug)]
pub struct EngineMetrics {
    /// `npd_problems_reported_total`.
    pub problems_reported: IntCounter,
    /// `npd_problems_deduplicated_total`.
    pub problems_deduplicated: IntCounter,
    /// `npd_rule_match_seconds_total`.
    pub match_seconds: Counter,
}

impl EngineMetrics {
    fn new() -> Self {
        EngineMetrics {
            problems_reported: crate::metrics::int_counter(
                "npd_problems_reported_total",
                "Problems reported by the rules engine (events and condition changes).",
            ),
            problems_deduplicated: crate::metrics::int_counter(
                "npd_problems_deduplicated_total",
                "Problems not reported again because another source already reported the same fault.",
            ),
            match_seconds: crate::metrics::counter(
                "npd_rule_match_seconds_total",
                "Time spent matching kernel events against rules.",
            ),
        }
    }

    /// Registers them (once per process).
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        crate::metrics::register(registry, &self.problems_reported)?;
        crate::metrics::register(registry, &self.problems_deduplicated)?;
        crate::metrics::register(registry, &self.match_seconds)
    }
}

/// What the engine did, for tests and `replay`. Plain numbers, monotonic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Kernel messages matched against the log rules (empty ones are skipped, as NPD does).
    pub log_messages: u64,
    /// Structured events (hung task, OOM kill, block error) handled.
    pub structured_events: u64,
    /// Rule matches (before rate thresholds and de-duplication).
    pub rule_matches: u64,
    /// Reports produced: problem events and condition changes (recoveries included).
    pub problems_reported: u64,
    /// Problems not reported because the same fault was already reported under the same
    /// reason (repeated sightings and correlated duplicates, see `correlated`).
    pub repeats_suppressed: u64,
    /// Of `repeats_suppressed`: those seen by the other source (a kernel line for a fault
    /// already reported from its structured event, or the reverse).
    pub correlated: u64,
    /// Permanent-rule matches that did not change their condition (already True, same reason).
    pub condition_repeats: u64,
}

/// Where a problem was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Log,
    Structured,
}

#[derive(Clone, Debug)]
struct FileState {
    source: String,
    buffer_size: usize,
    /// Recent messages, only for files with multi-line patterns.
    buffer: Option<VecDeque<String>>,
}

#[derive(Clone, Debug)]
struct EngineRule {
    file: usize,
    rule: Rule,
}

/// The rule engine. See the module documentation. A clone shares the compiled patterns.
#[derive(Clone, Debug)]
pub struct Engine {
    rules: Vec<EngineRule>,
    files: Vec<FileState>,
    /// One-line log patterns, and the rule of each.
    fast_set: Option<RegexSet>,
    /// The literals one of which a line must contain to match any of `fast_set` (when every
    /// pattern in it has them): one SIMD pass that rejects most lines before the patterns run.
    fast_prefilter: Option<AhoCorasick>,
    fast_rules: Vec<usize>,
    /// Log patterns that may span lines.
    slow_rules: Vec<usize>,
    /// Structured rules by kind.
    structured: PerKind<Vec<usize>>,
    conditions: ConditionManager,
    rates: Vec<VecDeque<Mono>>,
    reported: ReportedFaults<(String, FaultKey), Origin>,
    requests: FailedRequests,
    /// NPD custom plugin monitors: what their rules mean.
    plugins: Vec<PluginState>,
    /// Turns the kernel's times into the reports' wall-clock times.
    clock: WallClock,
    stats: EngineStats,
    metrics: EngineMetrics,
}

impl Engine {
    /// Builds an engine; every condition starts in its default False state. Its wall clock
    /// says boot was at the Unix epoch (as `replay` wants) until [`Engine::set_clock`].
    pub fn new(rules: RuleSet) -> Engine {
        let mut conditions = ConditionManager::default();
        let plugins = rules
            .plugins
            .iter()
            .map(|monitor| {
                for c in &monitor.conditions {
                    conditions.declare(
                        &monitor.source,
                        &c.type_,
                        &c.reason,
                        &c.message,
                        SystemTime::UNIX_EPOCH,
                    );
                }
                PluginState::new(monitor)
            })
            .collect();
        let mut files = Vec::new();
        let mut flat = Vec::new();
        for (i, file) in rules.files.into_iter().enumerate() {
            for c in &file.conditions {
                conditions.declare(
                    &file.source,
                    &c.type_,
                    &c.reason,
                    &c.message,
                    SystemTime::UNIX_EPOCH,
                );
            }
            let multi_line = file.rules.iter().any(
                |r| matches!(&r.matcher, Matcher::Log { pattern, .. } if !pattern.last_line_only),
            );
            files.push(FileState {
                source: file.source,
                buffer_size: file.buffer_size,
                buffer: multi_line.then(|| VecDeque::with_capacity(file.buffer_size)),
            });
            flat.extend(
                file.rules
                    .into_iter()
                    .map(|rule| EngineRule { file: i, rule }),
            );
        }
        let mut fast_rules = Vec::new();
        let mut slow_rules = Vec::new();
        let mut structured: PerKind<Vec<usize>> = PerKind::default();
        for (i, r) in flat.iter().enumerate() {
            match &r.rule.matcher {
                Matcher::Log { pattern, .. } if pattern.last_line_only => fast_rules.push(i),
                Matcher::Log { .. } => slow_rules.push(i),
                Matcher::Event { kind, .. } => structured[*kind].push(i),
            }
        }
        let fast_set = if fast_rules.is_empty() {
            None
        } else {
            let anchored = fast_rules.iter().map(|&i| match &flat[i].rule.matcher {
                Matcher::Log { pattern, .. } => pattern.anchored.as_str(),
                Matcher::Event { .. } => "",
            });
            match build_set(anchored) {
                Ok(set) => Some(set),
                // Too large together: each pattern compiled alone, so match them one by one.
                Err(_) => {
                    slow_rules.append(&mut fast_rules);
                    slow_rules.sort_unstable();
                    for &i in &slow_rules {
                        files[flat[i].file].buffer.get_or_insert_with(VecDeque::new);
                    }
                    None
                }
            }
        };
        let fast_prefilter = fast_set.as_ref().and_then(|_| {
            let mut literals = Vec::new();
            for &i in &fast_rules {
                let Matcher::Log { pattern, .. } = &flat[i].rule.matcher else {
                    return None;
                };
                literals.extend(pattern.required.clone()?);
            }
            // Leftmost-first: what lets the crate use its SIMD searcher (Teddy) for a few dozen
            // literals; any match is enough here.
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostFirst)
                .build(literals)
                .ok()
        });
        let rates = vec![VecDeque::new(); flat.len()];
        Engine {
            rules: flat,
            files,
            fast_set,
            fast_prefilter,
            fast_rules,
            slow_rules,
            structured,
            conditions,
            rates,
            reported: ReportedFaults::default(),
            requests: FailedRequests::default(),
            plugins,
            clock: WallClock::booted_at(SystemTime::UNIX_EPOCH),
            stats: EngineStats::default(),
            metrics: EngineMetrics::new(),
        }
    }

    /// The wall clock reports are stamped with from now on (the daemon takes the system's
    /// again for every burst of events, so that a stepped wall clock is followed).
    pub fn set_clock(&mut self, clock: WallClock) {
        self.clock = clock;
    }

    /// Its metrics, to register.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

    /// Every condition's default False state (with its source), for exporters to initialise;
    /// `now` becomes their transition time. A plugin monitor's with `skip_initial_status`
    /// are left out: their first result writes them.
    pub fn initial_conditions(&mut self, now: SystemTime) -> Vec<ConditionChange> {
        self.conditions.set_initial_time(now);
        let unwritten: Vec<&String> = self.plugins.iter().flat_map(|p| p.unwritten()).collect();
        let mut all = self.conditions.all();
        all.retain(|c| !unwritten.contains(&&c.condition.type_));
        all
    }

    /// Takes over the states of npd's conditions found on the Node (see
    /// [`ConditionManager::adopt`]): a True condition recovers after its rule's `recoverAfter`
    /// counted from `now` (the rule with the condition's reason; else the longest of the
    /// condition's rules). Returns the states that changed npd's view.
    pub fn adopt(&mut self, found: &[Condition], now: Mono) -> Vec<ConditionChange> {
        let mut changes = Vec::new();
        for c in found {
            let rules = self.rules.iter().filter(|r| {
                matches!(&r.rule.effect, Effect::Permanent { condition } if *condition == c.type_)
            });
            let (same_reason, others): (Vec<_>, Vec<_>) =
                rules.partition(|r| r.rule.reason == c.reason);
            let recover_after = same_reason
                .iter()
                .find_map(|r| r.rule.recover_after)
                .or_else(|| others.iter().filter_map(|r| r.rule.recover_after).max());
            changes.extend(self.conditions.adopt(c, now, recover_after));
        }
        changes
    }

    /// Every condition's current state.
    pub fn conditions(&self) -> Vec<ConditionChange> {
        self.conditions.all()
    }

    /// Every (source, reason, condition type for permanent rules) the rules can report, once
    /// each, in rule order: for metrics to initialise every reason to 0.
    pub fn reasons(&self) -> Vec<(String, String, Option<String>)> {
        let mut out: Vec<(String, String, Option<String>)> = Vec::new();
        for r in &self.rules {
            let condition = match &r.rule.effect {
                Effect::Temporary => None,
                Effect::Permanent { condition } => Some(condition.clone()),
            };
            let item = (
                self.files[r.file].source.clone(),
                r.rule.reason.clone(),
                condition,
            );
            if !out.contains(&item) {
                out.push(item);
            }
        }
        for plugin in self.plugins.iter().filter(|p| p.metrics_reporting) {
            for (reason, condition) in plugin.reasons() {
                let item = (
                    plugin.source().to_owned(),
                    reason.to_owned(),
                    condition.map(str::to_owned),
                );
                if !out.contains(&item) {
                    out.push(item);
                }
            }
        }
        out
    }

    /// The sources of plugin monitors with `"metricsReporting": false`: NPD's problem metrics
    /// leave their problems out.
    pub fn sources_without_metrics(&self) -> Vec<String> {
        self.plugins
            .iter()
            .filter(|p| !p.metrics_reporting)
            .map(|p| p.source().to_owned())
            .collect()
    }

    /// The counters (those also exported read from the metrics).
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            problems_reported: self.metrics.problems_reported.get(),
            repeats_suppressed: self.metrics.problems_deduplicated.get(),
            ..self.stats
        }
    }

    /// When [`Engine::on_deadline`] has something to do (a condition recovery), if ever.
    pub fn next_deadline(&self) -> Option<Mono> {
        self.conditions.next_deadline()
    }

    /// Does what is due at `now` (condition recoveries), in order.
    pub fn on_deadline(&mut self, now: Mono) -> Vec<Report> {
        let mut out = Vec::new();
        self.expire(now, &mut out);
        self.count(&out);
        out
    }

    /// Handles one kernel event at the time the kernel saw it; returns what to report, in
    /// order (anything due before it first).
    pub fn handle(&mut self, event: &KernelEvent) -> Vec<Report> {
        let mut out = Vec::new();
        self.handle_into(event, &mut out);
        self.count(&out);
        out
    }

    /// Handles a burst of events: what to report, in order, each with the index of the event
    /// it came from. The time it takes is counted in `npd_rule_match_seconds_total` (one clock
    /// read per burst, not per event).
    pub fn handle_batch(&mut self, events: &[KernelEvent]) -> Vec<(usize, Report)> {
        let start = std::time::Instant::now();
        let mut out = Vec::new();
        let mut reports = Vec::new();
        for (i, event) in events.iter().enumerate() {
            self.handle_into(event, &mut reports);
            out.extend(reports.drain(..).map(|r| (i, r)));
        }
        self.metrics
            .match_seconds
            .inc_by(start.elapsed().as_secs_f64());
        self.metrics.problems_reported.inc_by(out.len() as u64);
        out
    }

    fn count(&self, reports: &[Report]) {
        self.metrics.problems_reported.inc_by(reports.len() as u64);
    }

    fn handle_into(&mut self, event: &KernelEvent, out: &mut Vec<Report>) {
        let now = event.at;
        self.expire(now, out);
        match &event.detail {
            Detail::Log(log) => self.handle_log(&log.message, now, out),
            other => self.handle_structured(other, now, out),
        }
    }

    fn expire(&mut self, now: Mono, out: &mut Vec<Report>) {
        if self.conditions.next_deadline().is_some_and(|d| d <= now) {
            for change in self.conditions.expire(now, &self.clock) {
                out.push(Report::Condition(change));
            }
        }
    }

    fn handle_log(&mut self, message: &str, now: Mono, out: &mut Vec<Report>) {
        // NPD trims each message and skips empty ones.
        let msg = message.trim();
        if msg.is_empty() {
            return;
        }
        self.stats.log_messages += 1;
        let mut fired: Vec<(usize, String)> = Vec::new();
        // The literal prefilter turns away most lines. A line it lets through nearly always
        // matches (it holds a literal every match of some rule must hold), so the set is
        // searched once, for every rule it matches: an `is_match` pass before it searched the
        // line twice (in an OOM storm, each kill's line arrives alone, with the search's
        // tables out of the CPU's caches, and that pass was 8% of the agent's samples). Without
        // a prefilter, `is_match` still turns away what matches nothing, allocating nothing.
        if let Some(set) = &self.fast_set {
            let candidate = match &self.fast_prefilter {
                Some(p) => p.is_match(msg.as_bytes()),
                None => set.is_match(msg.as_bytes()),
            };
            if candidate {
                let matches = set.matches(msg.as_bytes());
                fired.extend(matches.iter().map(|i| (self.fast_rules[i], msg.to_owned())));
            }
        }
        if !self.slow_rules.is_empty() {
            self.match_buffers(msg, &mut fired);
        }
        if fired.is_empty() {
            return;
        }
        fired.sort_by_key(|(i, _)| *i);
        // Several rules may give the same problem for one line (NPD's pattern and npd's
        // current-kernel one): report it once.
        let mut this_line: Vec<(String, String)> = Vec::new();
        for (i, lines) in fired {
            self.stats.rule_matches += 1;
            let rule = &self.rules[i].rule;
            let Matcher::Log { suffix, .. } = &rule.matcher else {
                continue;
            };
            let message = match suffix {
                Some(s) => format!("{lines}; {s}"),
                None => lines,
            };
            let key = (rule.reason.clone(), message);
            if this_line.contains(&key) {
                continue;
            }
            let fault = FaultKey::of_message(&key.1).map(|f| self.requests.correlate(f, now));
            let message = key.1.clone();
            this_line.push(key);
            self.fire(
                i,
                message,
                (serde_json::Map::new(), Vec::new()),
                fault,
                Origin::Log,
                now,
                out,
            );
        }
    }

    /// NPD's buffer semantics for patterns that may span lines: the last `bufferSize` messages
    /// (empty strings before the buffer fills) joined with `"\n"`; the message is every line
    /// from the one where the match starts.
    fn match_buffers(&mut self, msg: &str, fired: &mut Vec<(usize, String)>) {
        let mut joined: Vec<Option<String>> = vec![None; self.files.len()];
        for (f, file) in self.files.iter_mut().enumerate() {
            if let Some(buf) = &mut file.buffer {
                if buf.len() == file.buffer_size {
                    buf.pop_front();
                }
                buf.push_back(msg.to_owned());
                let empty = file.buffer_size - buf.len();
                let mut text = "\n".repeat(empty);
                for (j, line) in buf.iter().enumerate() {
                    if j > 0 {
                        text.push('\n');
                    }
                    text.push_str(line);
                }
                joined[f] = Some(text);
            }
        }
        for &i in &self.slow_rules {
            let r = &self.rules[i];
            let (Matcher::Log { pattern, .. }, Some(text), Some(buf)) =
                (&r.rule.matcher, &joined[r.file], &self.files[r.file].buffer)
            else {
                continue;
            };
            let Some(m) = pattern.regex.find(text.as_bytes()) else {
                continue;
            };
            let s = text.len() as isize - m.start() as isize - 1;
            let mut total = 0isize;
            let mut n = 0;
            for line in buf.iter().rev() {
                n += 1;
                total += line.len() as isize + 1;
                if total > s {
                    break;
                }
            }
            let lines: Vec<&str> = buf.iter().skip(buf.len() - n).map(String::as_str).collect();
            fired.push((i, lines.join("\n")));
        }
    }

    fn handle_structured(&mut self, event: &Detail, now: Mono, out: &mut Vec<Report>) {
        let kind = event.kind();
        self.stats.structured_events += 1;
        let fault = FaultKey::of_event(event);
        if let (Detail::BlockError(b), Some(FaultKey::BlockError { device, .. })) = (event, &fault)
        {
            self.requests.note(device, b.sector, b.nr_sectors, now);
        }
        for n in 0..self.structured[kind].len() {
            let i = self.structured[kind][n];
            let Matcher::Event {
                filters, template, ..
            } = &self.rules[i].rule.matcher
            else {
                continue;
            };
            if !filters.iter().all(|f| f.matches(event)) {
                continue;
            }
            self.stats.rule_matches += 1;
            let mut message = template.render(event);
            // The pod it happened in, after NPD's message (which stays a prefix).
            let owner = event.owner();
            if let Some(suffix) = owner.and_then(Owner::message_suffix) {
                message.push_str(&suffix);
            }
            let pods = owner.map_or_else(Vec::new, Owner::named_pods);
            let fields = structured::event_fields(event);
            self.fire(
                i,
                message,
                (fields, pods),
                fault.clone(),
                Origin::Structured,
                now,
                out,
            );
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "private; one call site per source"
    )]
    fn fire(
        &mut self,
        i: usize,
        mut message: String,
        (fields, pods): (serde_json::Map<String, serde_json::Value>, Vec<PodRef>),
        fault: Option<FaultKey>,
        origin: Origin,
        now: Mono,
        out: &mut Vec<Report>,
    ) {
        let rule = &self.rules[i].rule;
        if let Some(rate) = rule.rate {
            // The matches within the window, at most `count` of them: a storm costs no memory.
            let seen = &mut self.rates[i];
            seen.push_back(now);
            while seen.len() > rate.count as usize
                || seen.front().is_some_and(|&t| now.since(t) >= rate.window)
            {
                seen.pop_front();
            }
            if seen.len() < rate.count as usize {
                return;
            }
            message = format!(
                "{message}; {} times within {}",
                seen.len(),
                humantime::format_duration(rate.window)
            );
            if rule.effect == Effect::Temporary {
                seen.clear();
            }
        }
        let reason = rule.reason.clone();
        let source = self.files[self.rules[i].file].source.clone();
        match rule.effect.clone() {
            Effect::Temporary => {
                if let Some(fault) = fault
                    && let Some(default) = default_dedup(fault.kind())
                {
                    let window = DedupWindow {
                        window: rule.dedup_window.unwrap_or(default.window),
                        ..default
                    };
                    if self.suppress(reason.clone(), fault, window, origin, now) {
                        return;
                    }
                }
                out.push(Report::Event(ProblemEvent {
                    source,
                    severity: Severity::Warning,
                    reason,
                    message,
                    timestamp: self.clock.wall(now),
                    fields,
                    pods,
                }));
            }
            Effect::Permanent { condition } => {
                let recover_after = rule.recover_after;
                let wall = self.clock.wall(now);
                match self.conditions.set_true(
                    &condition,
                    &reason,
                    &message,
                    (now, wall),
                    recover_after,
                ) {
                    Some(change) => {
                        out.push(Report::Condition(change));
                    }
                    None => self.stats.condition_repeats += 1,
                }
            }
        }
    }

    /// Whether a problem about `fault` under `reason` was already reported within its window
    /// (then it is counted, not reported).
    fn suppress(
        &mut self,
        reason: String,
        fault: FaultKey,
        window: DedupWindow,
        origin: Origin,
        now: Mono,
    ) -> bool {
        match self
            .reported
            .check(&(reason, fault), origin, window.window, window.sliding, now)
        {
            Seen::New => false,
            Seen::Repeat { origin: first } => {
                self.metrics.problems_deduplicated.inc();
                if first != origin {
                    self.stats.correlated += 1;
                }
                true
            }
        }
    }
}

/// Block requests that failed recently, by disk: the kernel's `Buffer I/O error on dev D,
/// logical block B` lines about the buffers of a failed request are that request's fault, not
/// new ones. Bounded: the newest [`FailedRequests::PER_DISK`] per disk, forgotten after the
/// block-error de-duplication window.
#[derive(Clone, Debug, Default)]
struct FailedRequests {
    by_disk: std::collections::HashMap<String, VecDeque<(Mono, u64, u32)>>,
}

impl FailedRequests {
    const PER_DISK: usize = 64;
    /// At most this many disks are remembered.
    const DISKS: usize = 256;

    fn window() -> std::time::Duration {
        default_dedup(EventKind::BlockError).map_or(std::time::Duration::ZERO, |d| d.window)
    }

    fn note(&mut self, disk: &str, sector: u64, nr_sectors: u32, now: Mono) {
        if !self.by_disk.contains_key(disk) && self.by_disk.len() >= Self::DISKS {
            self.by_disk.retain(|_, r| {
                r.back()
                    .is_some_and(|&(t, ..)| now.since(t) < Self::window())
            });
            if self.by_disk.len() >= Self::DISKS {
                return;
            }
        }
        let recent = self.by_disk.entry(disk.to_owned()).or_default();
        if recent.len() == Self::PER_DISK {
            recent.pop_front();
        }
        recent.push_back((now, sector, nr_sectors.max(1)));
    }

    /// The fault of a failed request the logical block falls in, for a whole-disk device (for
    /// a partition the block's disk sector depends on where the partition starts, which the
    /// line does not say): a block of 512 to 64 KiB bytes whose first sector is in the request.
    /// Any other fault is returned unchanged.
    fn correlate(&self, fault: FaultKey, now: Mono) -> FaultKey {
        let FaultKey::BlockError {
            device,
            at: BlockAt::LogicalBlock(block),
        } = &fault
        else {
            return fault;
        };
        if disk_of(device) != *device {
            return fault;
        }
        let Some(recent) = self.by_disk.get(device) else {
            return fault;
        };
        let hit = recent.iter().rev().find(|&&(t, start, len)| {
            now.since(t) < Self::window()
                && (0..8).any(|shift| {
                    block
                        .checked_mul(1 << shift)
                        .is_some_and(|s| s >= start && s - start < u64::from(len))
                })
        });
        match hit {
            Some(&(_, start, _)) => FaultKey::BlockError {
                device: device.clone(),
                at: BlockAt::Sector(start),
            },
            None => fault,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every one-line pattern of the defaults names literals, so that the engine rejects most
    /// lines in one pass (the behaviour with it is what `engine_tests` checks).
    #[test]
    fn the_default_rules_have_a_literal_prefilter() {
        let engine = Engine::new(RuleSet::defaults());
        assert!(engine.fast_set.is_some());
        let prefilter = engine.fast_prefilter.expect("a prefilter");
        // Few enough literals for the SIMD searcher.
        assert!(
            prefilter.patterns_len() <= 64,
            "{}",
            prefilter.patterns_len()
        );
    }

    /// A storm against a permanent rate rule keeps at most `count` match times, however many
    /// matches come within its window (issue 8: a storm costs no memory).
    #[test]
    fn a_rate_window_keeps_at_most_count_matches() {
        let set = RuleSet::from_sources([(
            "rate.json",
            br#"{"source":"s",
                "conditions":[{"type":"Frequent","reason":"NotFrequent","message":"fine"}],
                "rules":[{"type":"permanent","condition":"Frequent","reason":"Storm",
                          "pattern":"storm line \\d+","rate":{"count":3,"window":"1h"}}]}"#
                .as_slice(),
        )])
        .expect("the rule file");
        let mut engine = Engine::new(set);
        let mut fired = 0;
        for i in 0..10_000u64 {
            let event = KernelEvent::new(
                Mono::since_boot(std::time::Duration::from_millis(i)),
                crate::event::Detail::Log(crate::event::LogMessage::new(format!("storm line {i}"))),
            );
            fired += engine.handle(&event).len();
            assert!(
                engine.rates.iter().all(|seen| seen.len() <= 3),
                "after {i} matches: {:?}",
                engine.rates.iter().map(VecDeque::len).collect::<Vec<_>>()
            );
        }
        assert_eq!(fired, 1, "the condition turns True once, and stays");
        assert_eq!(engine.rates[0].len(), 3);
    }
}
