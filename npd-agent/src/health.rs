//! npd's own health (`/healthz`) and the current conditions (`/conditions`).
//!
//! `/healthz` is healthy only while the sensor's reader runs, no kernel event was lost within
//! the loss window, and the exporter (when one is watched) says it is not stuck. NPD's
//! `/healthz` always answers `ok`, even with its kernel monitor dead; npd's says what is wrong.
//! Everything is read when asked: nothing polls.

use std::{
    fmt::Write as _,
    sync::{Mutex, RwLock, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    problem::{Condition, Report},
    sensor::{ActiveSource, EVENT_KINDS, SensorProbe},
};

type Check = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Decides whether npd is healthy.
pub struct Health {
    sensor: SensorProbe,
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
    pub fn new(sensor: SensorProbe, loss_window: Duration) -> Self {
        let seen = sensor.lost_total();
        Self {
            sensor,
            exporter: RwLock::new(None),
            loss_window,
            losses: Mutex::new(LossTracker {
                seen,
                last_increase: None,
            }),
        }
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
        let sensor = &self.sensor;
        let stats = &sensor.stats;
        let mut problems = Vec::new();
        let mut facts = Vec::new();

        let tracepoints = if sensor.attached.is_empty() {
            "none".to_string()
        } else {
            sensor.attached.join(",")
        };
        let mut source = format!(
            "source: {}; tracepoints attached: {tracepoints}",
            sensor.source.as_str()
        );
        if sensor.source == ActiveSource::Ebpf && sensor.kmsg_reader {
            source.push_str("; kernel messages from /dev/kmsg");
        }
        facts.push(source);
        for (tp, why) in sensor.disabled.iter() {
            facts.push(format!("tracepoint {tp} disabled: {why}"));
        }

        if !sensor.reading() {
            let why = sensor
                .reader_error()
                .unwrap_or_else(|| "reader stopped".into());
            problems.push(format!(
                "sensor is not reading kernel events: {why}; restarting with backoff"
            ));
        }
        let restarts = stats.reader_restarts.load(Ordering::Relaxed);
        if restarts > 0 {
            let last = sensor.reader_error().unwrap_or_default();
            facts.push(format!(
                "reader restarts: {restarts} (last failure: {last})"
            ));
        }

        let received: Vec<String> = EVENT_KINDS
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k}={}", stats.received[i].load(Ordering::Relaxed)))
            .collect();
        facts.push(format!("received: {}", received.join(" ")));

        let losses = sensor.losses();
        let kmsg_lost = stats.kmsg_lost.load(Ordering::Relaxed);
        let total = losses.total() + kmsg_lost;
        let mut detail = Vec::new();
        let per_kind = |counts: &[u64; 4]| {
            EVENT_KINDS
                .iter()
                .zip(counts)
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| format!("{k}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        if losses.ring_full.iter().any(|n| *n > 0) {
            detail.push(format!("ring buffer full: {}", per_kind(&losses.ring_full)));
        }
        if losses.read_errors.iter().any(|n| *n > 0) {
            detail.push(format!("read errors: {}", per_kind(&losses.read_errors)));
        }
        if kmsg_lost > 0 {
            detail.push(format!("/dev/kmsg overwritten: {kmsg_lost}"));
        }
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", detail.join("; "))
        };
        facts.push(format!("lost: {total}{detail}"));
        let decode_errors = stats.decode_errors.load(Ordering::Relaxed);
        if decode_errors > 0 {
            facts.push(format!("decode errors: {decode_errors}"));
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

/// The current state of every condition npd owns, for `/conditions`.
#[derive(Debug, Default)]
pub struct ConditionBoard {
    entries: RwLock<Vec<(Condition, SystemTime)>>,
}

impl ConditionBoard {
    /// An empty board.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a condition's state (initial conditions at start, or any update).
    pub fn set(&self, condition: &Condition) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        match entries.iter_mut().find(|(c, _)| c.type_ == condition.type_) {
            Some(entry) => *entry = (condition.clone(), now),
            None => entries.push((condition.clone(), now)),
        }
    }

    /// Applies a report: a condition change updates its condition; events change nothing.
    pub fn observe_report(&self, report: &Report) {
        if let Report::Condition(change) = report {
            self.set(&change.condition);
        }
    }

    /// The conditions, in the order they first appeared.
    pub fn snapshot(&self) -> Vec<Condition> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// The conditions as NPD's `/conditions` returns them: a JSON array of Kubernetes
    /// `NodeCondition`s (`type`, `status`, `lastHeartbeatTime`, `lastTransitionTime`, `reason`,
    /// `message`); the heartbeat is when npd last updated the condition.
    pub fn to_json(&self) -> serde_json::Value {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let time = |t: &SystemTime| crate::time::rfc3339(*t);
        serde_json::Value::Array(
            entries
                .iter()
                .map(|(c, updated)| {
                    serde_json::json!({
                        "type": c.type_,
                        "status": c.status.as_str(),
                        "lastHeartbeatTime": time(updated),
                        "lastTransitionTime": time(&c.transition_time),
                        "reason": c.reason,
                        "message": c.message,
                    })
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, atomic::AtomicBool};

    use super::*;
    use crate::{
        problem::{ConditionChange, ConditionStatus},
        sensor::SensorStats,
    };

    fn health(window: Duration) -> (Health, Arc<SensorStats>) {
        let stats = Arc::new(SensorStats::default());
        stats.reading.store(true, Ordering::SeqCst);
        let probe = SensorProbe::detached(ActiveSource::Kmsg, stats.clone());
        (Health::new(probe, window), stats)
    }

    #[test]
    fn healthy_while_reading_without_losses() {
        let (health, stats) = health(Duration::from_secs(300));
        stats.received[0].store(12, Ordering::Relaxed);
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
        stats.reader_failed("/dev/kmsg", "read failed: EIO");
        let report = health.check();
        assert_eq!(report.status(), 503);
        assert_eq!(
            report.problems,
            [
                "sensor is not reading kernel events: /dev/kmsg reader stopped: read failed: EIO; restarting with backoff"
            ]
        );
        stats.reading.store(true, Ordering::SeqCst);
        assert!(health.check().healthy);
    }

    #[test]
    fn losses_are_unhealthy_for_the_window_after_the_last_one() {
        let (health, stats) = health(Duration::from_secs(60));
        let t0 = Instant::now();
        stats.kmsg_lost.store(5, Ordering::Relaxed);
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
        stats.kmsg_lost.store(6, Ordering::Relaxed);
        assert!(!health.check_at(t0 + Duration::from_secs(61)).healthy);
    }

    #[test]
    fn zero_window_reports_losses_without_failing() {
        let (health, stats) = health(Duration::ZERO);
        stats.kmsg_lost.store(5, Ordering::Relaxed);
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

    #[test]
    fn conditions_in_npd_shape() {
        let board = ConditionBoard::new();
        let condition = |status, reason: &str| Condition {
            type_: "KernelDeadlock".into(),
            status,
            reason: reason.into(),
            message: "kernel has no deadlock".into(),
            transition_time: SystemTime::UNIX_EPOCH,
        };
        board.set(&condition(ConditionStatus::False, "KernelHasNoDeadlock"));
        board.observe_report(&Report::Condition(ConditionChange {
            source: "kernel-monitor".into(),
            condition: condition(ConditionStatus::True, "DockerHung"),
        }));
        let json = board.to_json();
        let items = json.as_array().unwrap();
        assert_eq!(items.len(), 1);
        let mut item = items[0].clone();
        assert!(item["lastHeartbeatTime"].as_str().unwrap().ends_with('Z'));
        item.as_object_mut().unwrap().remove("lastHeartbeatTime");
        assert_eq!(
            item,
            serde_json::json!({"type":"KernelDeadlock","status":"True","lastTransitionTime":"1970-01-01T00:00:00Z",
                "reason":"DockerHung","message":"kernel has no deadlock"})
        );
        assert_eq!(board.snapshot()[0].reason, "DockerHung");
    }
}
