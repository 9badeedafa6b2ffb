//! NPD's problem metrics, byte for byte (checked against NPD's `pkg/problemmetrics` and its
//! OpenCensus and OpenTelemetry Prometheus exporters, which both keep the names without
//! `_total` or unit suffixes):
//!
//! * `# HELP problem_counter Number of times a specific type of problem have occurred.`,
//!   `# TYPE problem_counter counter`, label `reason`: every report (temporary event or
//!   condition change) adds one under its reason.
//! * `# HELP problem_gauge Whether a specific type of problem is affecting the node or not.`,
//!   `# TYPE problem_gauge gauge`, labels `reason`, `type`: 1 while condition `type` is True
//!   with that reason. Unlike NPD's, it follows a recovery back to 0.
//! * Every rule's reason starts at 0 ([`ProblemMetrics::init_reasons`]), as in NPD.
//!
//! `problem_counter` breaks Prometheus' naming lint (`promtool check metrics` wants `_total`);
//! the name is kept because NPD's dashboards and alerts use it.

use prometheus::{IntCounterVec, IntGaugeVec, Registry, core::Collector as _};

use super::Exporter;
use crate::{
    metrics::{int_counter_vec, int_gauge_vec, register},
    problem::{Condition, ConditionChange, ConditionStatus, Report},
};

/// NPD's help text for `problem_counter`.
pub const PROBLEM_COUNTER_HELP: &str = "Number of times a specific type of problem have occurred.";
/// NPD's help text for `problem_gauge`.
pub const PROBLEM_GAUGE_HELP: &str =
    "Whether a specific type of problem is affecting the node or not.";

/// `problem_counter` and `problem_gauge`, fed as an exporter.
#[derive(Clone, Debug)]
pub struct ProblemMetrics {
    counter: IntCounterVec,
    gauge: IntGaugeVec,
    /// Sources whose problems are left out (plugin monitors with `"metricsReporting": false`).
    left_out: Vec<String>,
}

impl ProblemMetrics {
    /// The two metrics, registered in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = ProblemMetrics {
            counter: int_counter_vec("problem_counter", PROBLEM_COUNTER_HELP, &["reason"]),
            gauge: int_gauge_vec("problem_gauge", PROBLEM_GAUGE_HELP, &["type", "reason"]),
            left_out: Vec::new(),
        };
        register(registry, &m.counter)?;
        register(registry, &m.gauge)?;
        Ok(m)
    }

    /// Leaves out the problems of these sources (NPD's `"metricsReporting": false`).
    pub fn leave_out(&mut self, sources: Vec<String>) {
        self.left_out = sources;
    }

    /// Initialises every rule's reason to 0, as NPD does at start: `problem_counter{reason}` for
    /// every rule, `problem_gauge{type,reason}` for rules that set a condition. Takes the rules
    /// engine's `(source, reason, condition type)` list.
    pub fn init_reasons<I, S>(&self, reasons: I)
    where
        I: IntoIterator<Item = (S, S, Option<S>)>,
        S: AsRef<str>,
    {
        for (_source, reason, condition) in reasons {
            self.counter.with_label_values(&[reason.as_ref()]);
            if let Some(type_) = condition {
                self.gauge
                    .with_label_values(&[type_.as_ref(), reason.as_ref()])
                    .set(0);
            }
        }
    }

    /// `problem_gauge{type,reason}` follows a condition's state: 1 for its reason while True,
    /// 0 for every other reason the gauge has for that type (NPD keeps one reason per type).
    /// The gauge's own series are the only memory: no copy of the condition is kept here.
    fn show(&self, c: &Condition) {
        for family in self.gauge.collect() {
            for metric in family.get_metric() {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                };
                if let (Some(type_), Some(reason)) = (label("type"), label("reason"))
                    && type_ == c.type_
                    && reason != c.reason
                {
                    self.gauge.with_label_values(&[&type_, &reason]).set(0);
                }
            }
        }
        self.gauge
            .with_label_values(&[c.type_.as_str(), c.reason.as_str()])
            .set(i64::from(c.status == ConditionStatus::True));
    }
}

impl Exporter for ProblemMetrics {
    /// `problem_counter{reason}` +1 for every event and condition change; a condition change
    /// also moves the gauge.
    fn export(&mut self, report: &Report) {
        if !self.left_out.is_empty() && self.left_out.iter().any(|s| *s == report.source()) {
            return;
        }
        match report {
            Report::Event(event) => self
                .counter
                .with_label_values(&[event.reason.as_str()])
                .inc(),
            Report::Condition(change) => {
                let c = &change.condition;
                self.counter.with_label_values(&[c.reason.as_str()]).inc();
                self.show(c);
            }
        }
    }

    /// States taken over from the Node move the gauge without counting a problem.
    fn adopted(&mut self, changes: &[ConditionChange]) {
        for change in changes {
            self.show(&change.condition);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::{
        metrics::Metrics,
        problem::{ProblemEvent, Severity},
    };

    fn event(reason: &str) -> Report {
        Report::Event(ProblemEvent {
            source: "kernel-monitor".into(),
            severity: Severity::Warning,
            reason: reason.into(),
            message: "BUG: unable to handle kernel NULL pointer dereference at 0000000000000000"
                .into(),
            timestamp: SystemTime::UNIX_EPOCH,
            fields: serde_json::Map::new(),
            pods: Vec::new(),
        })
    }

    fn change(type_: &str, status: ConditionStatus, reason: &str) -> Report {
        Report::Condition(ConditionChange {
            source: "kernel-monitor".into(),
            condition: Condition {
                type_: type_.into(),
                status,
                reason: reason.into(),
                message: "m".into(),
                transition_time: SystemTime::UNIX_EPOCH,
            },
        })
    }

    /// The lines of the exposition that belong to the given families.
    fn lines(metrics: &Metrics, families: &[&str]) -> Vec<String> {
        metrics
            .encode()
            .lines()
            .filter(|l| {
                let name = l
                    .trim_start_matches("# HELP ")
                    .trim_start_matches("# TYPE ");
                families.iter().any(|f| {
                    name.starts_with(&format!("{f} ")) || name.starts_with(&format!("{f}{{"))
                })
            })
            .map(str::to_string)
            .collect()
    }

    fn samples(metrics: &Metrics, family: &str) -> Vec<String> {
        lines(metrics, &[family])
            .into_iter()
            .filter(|l| !l.starts_with('#'))
            .collect()
    }

    #[test]
    fn npd_names_help_and_labels_byte_for_byte() {
        let metrics = Metrics::new().unwrap();
        let problems = ProblemMetrics::new(metrics.registry()).unwrap();
        problems.init_reasons([
            ("kernel-monitor", "KernelOops", None),
            ("kernel-monitor", "DockerHung", Some("KernelDeadlock")),
        ]);
        assert_eq!(
            lines(&metrics, &["problem_counter", "problem_gauge"]),
            [
                "# HELP problem_counter Number of times a specific type of problem have occurred.",
                "# TYPE problem_counter counter",
                "problem_counter{reason=\"DockerHung\"} 0",
                "problem_counter{reason=\"KernelOops\"} 0",
                "# HELP problem_gauge Whether a specific type of problem is affecting the node or not.",
                "# TYPE problem_gauge gauge",
                "problem_gauge{reason=\"DockerHung\",type=\"KernelDeadlock\"} 0",
            ]
        );
    }

    #[test]
    fn counter_counts_every_report_and_gauge_follows_the_condition() {
        let metrics = Metrics::new().unwrap();
        let mut problems = ProblemMetrics::new(metrics.registry()).unwrap();
        problems.init_reasons([("kernel-monitor", "DockerHung", Some("KernelDeadlock"))]);
        problems.export(&event("KernelOops"));
        problems.export(&event("KernelOops"));
        problems.export(&change(
            "KernelDeadlock",
            ConditionStatus::True,
            "DockerHung",
        ));
        assert_eq!(
            [
                samples(&metrics, "problem_counter"),
                samples(&metrics, "problem_gauge")
            ]
            .concat(),
            [
                "problem_counter{reason=\"DockerHung\"} 1",
                "problem_counter{reason=\"KernelOops\"} 2",
                "problem_gauge{reason=\"DockerHung\",type=\"KernelDeadlock\"} 1",
            ]
        );
        // Another reason for the same condition: one reason per type is 1 (NPD's rule).
        problems.export(&change(
            "KernelDeadlock",
            ConditionStatus::True,
            "AUFSUmountHung",
        ));
        assert_eq!(
            samples(&metrics, "problem_gauge"),
            [
                "problem_gauge{reason=\"AUFSUmountHung\",type=\"KernelDeadlock\"} 1",
                "problem_gauge{reason=\"DockerHung\",type=\"KernelDeadlock\"} 0",
            ]
        );
        // Recovery: the gauge goes back to 0 (NPD's never does).
        problems.export(&change(
            "KernelDeadlock",
            ConditionStatus::False,
            "KernelHasNoDeadlock",
        ));
        assert_eq!(
            samples(&metrics, "problem_gauge"),
            [
                "problem_gauge{reason=\"AUFSUmountHung\",type=\"KernelDeadlock\"} 0",
                "problem_gauge{reason=\"DockerHung\",type=\"KernelDeadlock\"} 0",
                "problem_gauge{reason=\"KernelHasNoDeadlock\",type=\"KernelDeadlock\"} 0",
            ]
        );
        // A state taken over from the Node moves the gauge and counts nothing.
        problems.adopted(&[ConditionChange {
            source: "kernel-monitor".into(),
            condition: Condition {
                type_: "KernelDeadlock".into(),
                status: ConditionStatus::True,
                reason: "DockerHung".into(),
                message: "m".into(),
                transition_time: SystemTime::UNIX_EPOCH,
            },
        }]);
        assert!(
            samples(&metrics, "problem_gauge")
                .contains(&"problem_gauge{reason=\"DockerHung\",type=\"KernelDeadlock\"} 1".into())
        );
        assert!(
            samples(&metrics, "problem_counter")
                .contains(&"problem_counter{reason=\"DockerHung\"} 1".into())
        );
    }
}
