//! npd's own health (`/healthz`).
//!
//! `/healthz` is healthy only while the sensor's reader runs, no kernel event was lost within
//! the loss window, and the exporter (when one is watched) says it is not stuck. NPD's
//! `/healthz` always answers `ok`, even with its kernel monitor dead; npd's says what is wrong.
//! Everything is read when asked, from one snapshot of the sensor: nothing polls.

use std::{
    fmt::Write as _,
    sync::{Mutex, RwLock},
    time::{Duration, Instant},
};

use crate::{
    event::PerKind,
    sensor::{SensorSnapshot, SensorView},
};

type Check = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Decides whether npd is healthy.
pub struct Health {
    sensor: SensorView,
    /// Standing facts said in every answer (monitors npd does not run).
    notes: RwLock<Vec<String>>,
    exporter: RwLock<Option<Check>>,
    loss_window: Duration,
    losses: Mutex<LossTracker>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("sensor", &self.sensor)
            .field("loss_window", &self.loss_window)
            .finish()
    }
}

/// When the loss count last grew.
#[derive(Debug, Default)]
struct LossTracker {
    seen: u64,
    last_increase: Option<Instant>,
}

/// The answer to one health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthReport {
    /// Whether every check passed.
    pub healthy: bool,
    /// What is wrong, one sentence each (empty when healthy).
    pub problems: Vec<String>,
    /// What the checks saw (source, counts), for the body.
    pub facts: Vec<String>,
}

impl HealthReport {
    /// HTTP status: 200 when healthy, 503 otherwise.
    pub fn status(&self) -> u16 {
        if self.healthy { 200 } else { 503 }
    }

    /// The plain-text body: `ok` or `unhealthy`, then one `problem:` line per problem, then the
    /// facts.
    pub fn body(&self) -> String {
        let mut out = String::from(if self.healthy { "ok\n" } else { "unhealthy\n" });
        for p in &self.problems {
            let _ = writeln!(out, "problem: {p}");
        }
        for f in &self.facts {
            let _ = writeln!(out, "{f}");
        }
        out
    }
}

impl Health {
    /// Checks `sensor`; a loss makes npd unhealthy for `loss_window` after it was first seen
    /// (zero: losses are reported in the body but never make it unhealthy).
    pub fn new(sensor: SensorView, loss_window: Duration) -> Self {
        let seen = sensor.lost_total();
        Self {
            sensor,
            notes: RwLock::new(Vec::new()),
            exporter: RwLock::new(None),
            loss_window,
            losses: Mutex::new(LossTracker {
                seen,
                last_increase: None,
            }),
        }
    }

    /// Adds a standing fact to every answer (a monitor npd does not run).
    pub fn note(&self, fact: String) {
        self.notes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(fact);
    }

    /// Adds the exporter's check: `Err(why)` when it is stuck (e.g. a change not written for
    /// longer than its deadline).
    pub fn watch_exporter(&self, check: impl Fn() -> Result<(), String> + Send + Sync + 'static) {
        *self.exporter.write().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(check));
    }

    /// Runs every check now.
    pub fn check(&self) -> HealthReport {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> HealthReport {
        let snap = self.sensor.snapshot();
        let mut problems = Vec::new();
        let mut facts = Vec::new();

        let tracepoints = if snap.attached.is_empty() {
            "none".to_string()
        } else {
            snap.attached.join(",")
        };
        let mut source = format!(
            "source: {}; tracepoints attached: {tracepoints}",
            snap.source
        );
        if snap.source == "ebpf" && snap.kmsg_reader {
            source.push_str("; kernel messages from /dev/kmsg");
        }
        facts.push(source);
        facts.extend(
            self.notes
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        );
        for (tp, why) in &snap.disabled {
            facts.push(format!("tracepoint {tp} disabled: {why}"));
        }

        if !snap.reading {
            let why = snap
                .reader_error
                .clone()
                .unwrap_or_else(|| "reader stopped".into());
            problems.push(format!(
                "sensor is not reading kernel events: {why}; restarting with backoff"
            ));
        }
        if snap.reader_restarts > 0 {
            let last = snap.reader_error.clone().unwrap_or_default();
            facts.push(format!(
                "reader restarts: {} (last failure: {last})",
                snap.reader_restarts
            ));
        }
        facts.push(format!("received: {}", per_kind(&snap.received, true)));

        let total = snap.lost();
        let detail = loss_detail(&snap);
        facts.push(format!("lost: {total}{detail}"));
        if snap.decode_errors > 0 {
            facts.push(format!("decode errors: {}", snap.decode_errors));
        }

        let last_increase = {
            let mut tracker = self.losses.lock().unwrap_or_else(|e| e.into_inner());
            if total > tracker.seen {
                tracker.seen = total;
                tracker.last_increase = Some(now);
            }
            tracker.last_increase
        };
        if let Some(at) = last_increase
            && !self.loss_window.is_zero()
            && now.saturating_duration_since(at) < self.loss_window
        {
            let ago = now.saturating_duration_since(at);
            problems.push(format!(
                "kernel events are being lost: {total} lost since start{detail}; last new loss seen {} ago \
                 (healthy again {} after the last loss)",
                humantime::format_duration(Duration::from_secs(ago.as_secs())),
                humantime::format_duration(self.loss_window),
            ));
        }

        if let Some(check) = self
            .exporter
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            && let Err(why) = check()
        {
            problems.push(format!("exporter is stuck: {why}"));
        }

        HealthReport {
            healthy: problems.is_empty(),
            problems,
            facts,
        }
    }
}

/// `log=1 hung_task=0 ...`, every kind or only those above zero.
fn per_kind(counts: &PerKind<u64>, all: bool) -> String {
    counts
        .iter()
        .filter(|(_, n)| all || **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// ` (ring buffer full: log=3; /dev/kmsg overwritten: 5)`, or nothing without losses.
fn loss_detail(snap: &SensorSnapshot) -> String {
    let mut detail = Vec::new();
    let losses = &snap.losses;
    if losses.ring_full.0.iter().any(|n| *n > 0) {
        detail.push(format!(
            "ring buffer full: {}",
            per_kind(&losses.ring_full, false)
        ));
    }
    if losses.read_errors.0.iter().any(|n| *n > 0) {
        detail.push(format!(
            "read errors: {}",
            per_kind(&losses.read_errors, false)
        ));
    }
    if snap.kmsg_lost > 0 {
        detail.push(format!("/dev/kmsg overwritten: {}", snap.kmsg_lost));
    }
    if detail.is_empty() {
        String::new()
    } else {
        format!(" ({})", detail.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use super::*;
    use crate::{
        event::EventKind,
        sensor::{ActiveSource, SensorStats},
    };

    fn health(window: Duration) -> (Health, Arc<SensorStats>) {
        let stats = Arc::new(SensorStats::default());
        stats.reader_running();
        let view = SensorView::detached(ActiveSource::Kmsg, stats.clone());
        (Health::new(view, window), stats)
    }

    #[test]
    fn healthy_while_reading_without_losses() {
        let (health, stats) = health(Duration::from_secs(300));
        stats.metrics.received[EventKind::Log].inc_by(12);
        let report = health.check();
        assert!(report.healthy, "{report:?}");
        assert_eq!(report.status(), 200);
        assert_eq!(
            report.body(),
            "ok\nsource: kmsg; tracepoints attached: none\nreceived: log=12 hung_task=0 oom_kill=0 block_error=0\nlost: 0\n"
        );
    }

    #[test]
    fn a_stopped_reader_is_unhealthy_with_its_reason() {
        let (health, stats) = health(Duration::from_secs(300));
        stats.reader_failed("/dev/kmsg", &"read failed: EIO");
        let report = health.check();
        assert_eq!(report.status(), 503);
        assert_eq!(
            report.problems,
            [
                "sensor is not reading kernel events: /dev/kmsg reader stopped: read failed: EIO; restarting with backoff"
            ]
        );
        stats.reader_running();
        assert!(health.check().healthy);
    }

    #[test]
    fn losses_are_unhealthy_for_the_window_after_the_last_one() {
        let (health, stats) = health(Duration::from_secs(60));
        let t0 = Instant::now();
        stats.kmsg_lost(5);
        let report = health.check_at(t0);
        assert!(!report.healthy);
        assert!(report.problems[0].starts_with(
            "kernel events are being lost: 5 lost since start (/dev/kmsg overwritten: 5)"
        ));
        assert!(
            report
                .facts
                .contains(&"lost: 5 (/dev/kmsg overwritten: 5)".to_string())
        );
        assert!(!health.check_at(t0 + Duration::from_secs(59)).healthy);
        assert!(health.check_at(t0 + Duration::from_secs(60)).healthy);
        stats.kmsg_lost(1);
        assert!(!health.check_at(t0 + Duration::from_secs(61)).healthy);
    }

    #[test]
    fn zero_window_reports_losses_without_failing() {
        let (health, stats) = health(Duration::ZERO);
        stats.kmsg_lost(5);
        let report = health.check();
        assert!(report.healthy);
        assert!(report.body().contains("lost: 5"));
    }

    #[test]
    fn a_stuck_exporter_is_unhealthy() {
        let (health, _) = health(Duration::from_secs(60));
        let stuck = Arc::new(AtomicBool::new(true));
        let s = stuck.clone();
        health.watch_exporter(move || {
            if s.load(Ordering::SeqCst) {
                Err("status not written for 6m (API server unreachable)".into())
            } else {
                Ok(())
            }
        });
        assert_eq!(
            health.check().problems,
            ["exporter is stuck: status not written for 6m (API server unreachable)"]
        );
        stuck.store(false, Ordering::SeqCst);
        assert!(health.check().healthy);
    }
}
