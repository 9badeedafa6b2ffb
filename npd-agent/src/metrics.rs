//! Prometheus metrics: NPD's `problem_counter` and `problem_gauge`, byte for byte, and npd's own
//! `npd_*` metrics about the sensor, the rules engine and the Kubernetes exporter.
//!
//! Problem metrics are pushed as reports happen ([`Metrics::observe_report`]). Everything else
//! is pulled from its owner at scrape time (a [`SensorProbe`], and closures returning
//! [`EngineCounters`] / [`K8sStats`]): nothing polls, and nothing is copied between scrapes.
//!
//! NPD compatibility (checked against NPD's `pkg/problemmetrics` and its OpenCensus and
//! OpenTelemetry Prometheus exporters, which both keep the names without `_total` or unit
//! suffixes):
//! * `# HELP problem_counter Number of times a specific type of problem have occurred.`,
//!   `# TYPE problem_counter counter`, label `reason`; every report (temporary event or
//!   condition change) adds one under its reason.
//! * `# HELP problem_gauge Whether a specific type of problem is affecting the node or not.`,
//!   `# TYPE problem_gauge gauge`, labels `reason`, `type`; 1 while condition `type` is True with
//!   that reason. Unlike NPD, it follows a recovery back to 0.
//! * Every rule's reason is initialised to 0 at start ([`Metrics::init_reasons`]), as NPD does.
//!
//! `problem_counter` breaks Prometheus' naming lint (`promtool check metrics` wants `_total`);
//! the name is kept because NPD's dashboards and alerts use it. Every `npd_*` metric passes it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock, atomic::Ordering},
};

use prometheus::{
    Encoder as _, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
};

use crate::{
    exporter::k8s::{ApiCall, K8sStats, LATENCY_BUCKETS},
    problem::{Condition, ConditionStatus, Report},
    sensor::{ActiveSource, EVENT_KINDS, SensorProbe},
};

/// NPD's help text for `problem_counter`.
pub const PROBLEM_COUNTER_HELP: &str = "Number of times a specific type of problem have occurred.";
/// NPD's help text for `problem_gauge`.
pub const PROBLEM_GAUGE_HELP: &str =
    "Whether a specific type of problem is affecting the node or not.";

/// The rules engine's counters, read at scrape time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineCounters {
    /// Problems reported (events and condition changes).
    pub problems_reported: u64,
    /// Problems not reported again because another source already reported the same fault.
    pub problems_deduplicated: u64,
    /// Total time spent matching rules, in nanoseconds.
    pub match_nanos: u64,
}

type Pull<T> = Box<dyn Fn() -> T + Send + Sync>;

/// The sources read at scrape time.
#[derive(Default)]
struct Sources {
    sensor: Option<SensorProbe>,
    engine: Option<Pull<EngineCounters>>,
    exporter: Option<Pull<K8sStats>>,
}

/// All of npd's metrics, in one registry. Share it as `Arc<Metrics>`.
pub struct Metrics {
    registry: Registry,
    problem_counter: IntCounterVec,
    problem_gauge: IntGaugeVec,
    /// The reason each condition type's gauge was last set with (NPD keeps one reason per type).
    gauge_reason: Mutex<HashMap<String, String>>,
    sources: Arc<RwLock<Sources>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with the problem metrics and npd's own, without any source yet.
    pub fn new() -> Self {
        let registry = Registry::new();
        let problem_counter = IntCounterVec::new(
            Opts::new("problem_counter", PROBLEM_COUNTER_HELP),
            &["reason"],
        )
        .expect("valid metric definition");
        let problem_gauge = IntGaugeVec::new(
            Opts::new("problem_gauge", PROBLEM_GAUGE_HELP),
            &["type", "reason"],
        )
        .expect("valid metric definition");
        let sources = Arc::new(RwLock::new(Sources::default()));
        registry
            .register(Box::new(problem_counter.clone()))
            .expect("registered once");
        registry
            .register(Box::new(problem_gauge.clone()))
            .expect("registered once");
        registry
            .register(Box::new(NpdCollector {
                descs: npd_descs(),
                sources: sources.clone(),
            }))
            .expect("registered once");
        Self {
            registry,
            problem_counter,
            problem_gauge,
            gauge_reason: Mutex::new(HashMap::new()),
            sources,
        }
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
            self.problem_counter.with_label_values(&[reason.as_ref()]);
            if let Some(type_) = condition {
                self.problem_gauge
                    .with_label_values(&[type_.as_ref(), reason.as_ref()])
                    .set(0);
            }
        }
    }

    /// Counts one report: `problem_counter{reason}` +1 for every event and condition change;
    /// for a condition change, `problem_gauge{type,reason}` is 1 while the condition is True
    /// with that reason, and the gauge of the reason it had before drops to 0.
    pub fn observe_report(&self, report: &Report) {
        match report {
            Report::Event(event) => self
                .problem_counter
                .with_label_values(&[event.reason.as_str()])
                .inc(),
            Report::Condition(change) => {
                let c = &change.condition;
                self.problem_counter
                    .with_label_values(&[c.reason.as_str()])
                    .inc();
                self.observe_condition(c);
            }
        }
    }

    /// Sets `problem_gauge{type,reason}` to a condition's state (1 while True with that
    /// reason; the reason it had before drops to 0), without counting a problem: for states
    /// taken over from the Node at start.
    pub fn observe_condition(&self, c: &Condition) {
        let mut last = self.gauge_reason.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(previous) = last.get(&c.type_)
            && *previous != c.reason
        {
            self.problem_gauge
                .with_label_values(&[c.type_.as_str(), previous.as_str()])
                .set(0);
        }
        let value = i64::from(c.status == ConditionStatus::True);
        self.problem_gauge
            .with_label_values(&[c.type_.as_str(), c.reason.as_str()])
            .set(value);
        last.insert(c.type_.clone(), c.reason.clone());
    }

    /// Reads the sensor's counters at every scrape from now on.
    pub fn watch_sensor(&self, sensor: SensorProbe) {
        self.sources
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .sensor = Some(sensor);
    }

    /// Reads the rules engine's counters at every scrape from now on.
    pub fn watch_engine(&self, read: impl Fn() -> EngineCounters + Send + Sync + 'static) {
        self.sources
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .engine = Some(Box::new(read));
    }

    /// Reads the Kubernetes exporter's counters at every scrape from now on (e.g.
    /// `K8sHandle::stats_reader()`).
    pub fn watch_exporter(&self, read: impl Fn() -> K8sStats + Send + Sync + 'static) {
        self.sources
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .exporter = Some(Box::new(read));
    }

    /// The registry, to add more collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The current values in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding plain families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The content type of [`Metrics::encode`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The `npd_*` families, as (name, help, type).
const NPD_FAMILIES: &[(&str, &str, MetricType)] = &[
    (
        "npd_build_info",
        "npd version; always 1.",
        MetricType::GAUGE,
    ),
    (
        "npd_sensor_source",
        "Kernel event source in use (1) or not (0): ebpf, or the kmsg fallback.",
        MetricType::GAUGE,
    ),
    (
        "npd_tracepoint_attached",
        "Whether a tracepoint's eBPF program is attached (1) or disabled (0).",
        MetricType::GAUGE,
    ),
    (
        "npd_sensor_reading",
        "Whether the sensor's reader is running (1) or stopped (0).",
        MetricType::GAUGE,
    ),
    (
        "npd_sensor_reader_restarts_total",
        "Times a failed sensor reader was restarted.",
        MetricType::COUNTER,
    ),
    (
        "npd_kernel_events_received_total",
        "Kernel events received from the sensor, by kind.",
        MetricType::COUNTER,
    ),
    (
        "npd_kernel_events_lost_total",
        "Kernel events the eBPF programs could not deliver, by kind and reason (ring_buffer_full, read_error).",
        MetricType::COUNTER,
    ),
    (
        "npd_kmsg_records_lost_total",
        "/dev/kmsg records overwritten before they were read (sequence gaps).",
        MetricType::COUNTER,
    ),
    (
        "npd_kmsg_overruns_total",
        "Times /dev/kmsg reported that the kernel log buffer wrapped under the reader.",
        MetricType::COUNTER,
    ),
    (
        "npd_decode_errors_total",
        "Kernel records that could not be decoded.",
        MetricType::COUNTER,
    ),
    (
        "npd_problems_reported_total",
        "Problems reported by the rules engine (events and condition changes).",
        MetricType::COUNTER,
    ),
    (
        "npd_problems_deduplicated_total",
        "Problems not reported again because another source already reported the same fault.",
        MetricType::COUNTER,
    ),
    (
        "npd_rule_match_seconds_total",
        "Time spent matching kernel events against rules.",
        MetricType::COUNTER,
    ),
    (
        "npd_k8s_api_calls_total",
        "Kubernetes API calls, by call and result (success, failure).",
        MetricType::COUNTER,
    ),
    (
        "npd_k8s_condition_writes_rejected_total",
        "Node condition writes the API server rejected (422 or another 4xx), dropped.",
        MetricType::COUNTER,
    ),
    (
        "npd_http_connections_refused_total",
        "HTTP connections closed at once because the listener had its maximum open.",
        MetricType::COUNTER,
    ),
    (
        "npd_k8s_api_call_duration_seconds",
        "Latency of Kubernetes API calls, successful or not.",
        MetricType::HISTOGRAM,
    ),
    (
        "npd_k8s_api_available",
        "Whether the last Kubernetes API call succeeded.",
        MetricType::GAUGE,
    ),
    (
        "npd_k8s_node_adopted",
        "Whether the Node was read and the conditions npd owns adopted.",
        MetricType::GAUGE,
    ),
    (
        "npd_k8s_events_received_total",
        "Problem occurrences handed to the Kubernetes exporter.",
        MetricType::COUNTER,
    ),
    (
        "npd_k8s_events_created_total",
        "Kubernetes Events created.",
        MetricType::COUNTER,
    ),
    (
        "npd_k8s_events_aggregated_total",
        "Occurrences folded into an existing Kubernetes Event (its count incremented).",
        MetricType::COUNTER,
    ),
    (
        "npd_k8s_events_suppressed_total",
        "Occurrences not posted as Kubernetes Events, by reason (queue_full, rejected, shutdown).",
        MetricType::COUNTER,
    ),
    (
        "npd_k8s_events_queued",
        "Kubernetes Events waiting to be posted.",
        MetricType::GAUGE,
    ),
];

fn npd_descs() -> Vec<Desc> {
    NPD_FAMILIES
        .iter()
        .map(|(name, help, _)| {
            Desc::new((*name).into(), (*help).into(), Vec::new(), HashMap::new())
                .expect("valid metric name")
        })
        .collect()
}

/// Builds one metric family from samples.
struct Family {
    family: MetricFamily,
}

impl Family {
    fn new(name: &str) -> Self {
        let (name, help, kind) = NPD_FAMILIES
            .iter()
            .find(|f| f.0 == name)
            .expect("family is declared in NPD_FAMILIES");
        let mut family = MetricFamily::default();
        family.set_name((*name).into());
        family.set_help((*help).into());
        family.set_field_type(*kind);
        Self { family }
    }

    fn metric(labels: &[(&str, &str)]) -> proto::Metric {
        let mut pairs: Vec<proto::LabelPair> = labels
            .iter()
            .map(|(name, value)| {
                let mut pair = proto::LabelPair::default();
                pair.set_name((*name).into());
                pair.set_value((*value).into());
                pair
            })
            .collect();
        pairs.sort_by(|a, b| a.name().cmp(b.name()));
        let mut metric = proto::Metric::default();
        metric.set_label(pairs);
        metric
    }

    fn sample(mut self, labels: &[(&str, &str)], value: f64) -> Self {
        let mut metric = Self::metric(labels);
        match self.family.get_field_type() {
            MetricType::COUNTER => {
                let mut counter = proto::Counter::default();
                counter.set_value(value);
                metric.set_counter(counter);
            }
            _ => {
                let mut gauge = proto::Gauge::default();
                gauge.set_value(value);
                metric.set_gauge(gauge);
            }
        }
        self.family.mut_metric().push(metric);
        self
    }

    fn histogram(
        mut self,
        labels: &[(&str, &str)],
        cumulative: &[u64],
        count: u64,
        sum: f64,
    ) -> Self {
        let mut metric = Self::metric(labels);
        let mut histogram = proto::Histogram::default();
        histogram.set_sample_count(count);
        histogram.set_sample_sum(sum);
        histogram.set_bucket(
            LATENCY_BUCKETS
                .iter()
                .zip(cumulative)
                .map(|(bound, n)| {
                    let mut bucket = proto::Bucket::default();
                    bucket.set_upper_bound(*bound);
                    bucket.set_cumulative_count(*n);
                    bucket
                })
                .collect(),
        );
        metric.set_histogram(histogram);
        self.family.mut_metric().push(metric);
        self
    }
}

/// Collects the `npd_*` families from the registered sources at scrape time.
struct NpdCollector {
    descs: Vec<Desc>,
    sources: Arc<RwLock<Sources>>,
}

impl Collector for NpdCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let sources = self.sources.read().unwrap_or_else(|e| e.into_inner());
        let refused = crate::http::CONNECTIONS_REFUSED.load(std::sync::atomic::Ordering::Relaxed);
        let mut out = vec![
            Family::new("npd_build_info").sample(&[("version", env!("CARGO_PKG_VERSION"))], 1.0),
            Family::new("npd_http_connections_refused_total").sample(&[], refused as f64),
        ];
        if let Some(sensor) = &sources.sensor {
            collect_sensor(sensor, &mut out);
        }
        if let Some(engine) = &sources.engine {
            let c = engine();
            out.push(
                Family::new("npd_problems_reported_total").sample(&[], c.problems_reported as f64),
            );
            out.push(
                Family::new("npd_problems_deduplicated_total")
                    .sample(&[], c.problems_deduplicated as f64),
            );
            out.push(
                Family::new("npd_rule_match_seconds_total").sample(&[], c.match_nanos as f64 / 1e9),
            );
        }
        if let Some(exporter) = &sources.exporter {
            collect_exporter(&exporter(), &mut out);
        }
        out.into_iter().map(|f| f.family).collect()
    }
}

fn collect_exporter(stats: &K8sStats, out: &mut Vec<Family>) {
    let mut calls = Family::new("npd_k8s_api_calls_total");
    let mut latency = Family::new("npd_k8s_api_call_duration_seconds");
    for call in ApiCall::ALL {
        let c = stats.call(call);
        calls = calls
            .sample(
                &[("call", call.as_str()), ("result", "success")],
                c.ok as f64,
            )
            .sample(
                &[("call", call.as_str()), ("result", "failure")],
                c.failed as f64,
            );
        latency = latency.histogram(
            &[("call", call.as_str())],
            &c.latency_buckets,
            c.ok + c.failed,
            c.latency_sum_seconds,
        );
    }
    out.push(calls);
    out.push(latency);
    let flag = |b: bool| f64::from(u8::from(b));
    out.push(
        Family::new("npd_k8s_condition_writes_rejected_total")
            .sample(&[], stats.condition_writes_rejected as f64),
    );
    out.push(Family::new("npd_k8s_api_available").sample(&[], flag(stats.api_available)));
    out.push(Family::new("npd_k8s_node_adopted").sample(&[], flag(stats.node_adopted)));
    out.push(
        Family::new("npd_k8s_events_received_total").sample(&[], stats.events_received as f64),
    );
    out.push(Family::new("npd_k8s_events_created_total").sample(&[], stats.events_created as f64));
    out.push(
        Family::new("npd_k8s_events_aggregated_total").sample(&[], stats.events_aggregated as f64),
    );
    out.push(
        Family::new("npd_k8s_events_suppressed_total")
            .sample(
                &[("reason", "queue_full")],
                stats.events_dropped_queue_full as f64,
            )
            .sample(
                &[("reason", "rejected")],
                stats.events_dropped_rejected as f64,
            )
            .sample(
                &[("reason", "shutdown")],
                stats.events_dropped_at_shutdown as f64,
            ),
    );
    out.push(Family::new("npd_k8s_events_queued").sample(&[], stats.events_queued as f64));
}

fn collect_sensor(sensor: &SensorProbe, out: &mut Vec<Family>) {
    let stats = &sensor.stats;
    let mut source = Family::new("npd_sensor_source");
    for candidate in [ActiveSource::Ebpf, ActiveSource::Kmsg] {
        source = source.sample(
            &[("source", candidate.as_str())],
            f64::from(u8::from(sensor.source == candidate)),
        );
    }
    out.push(source);
    if !sensor.attached.is_empty() || !sensor.disabled.is_empty() {
        let mut attached = Family::new("npd_tracepoint_attached");
        for tp in sensor.attached.iter() {
            attached = attached.sample(&[("tracepoint", tp)], 1.0);
        }
        for (tp, _) in sensor.disabled.iter() {
            attached = attached.sample(&[("tracepoint", tp)], 0.0);
        }
        out.push(attached);
    }
    out.push(Family::new("npd_sensor_reading").sample(&[], f64::from(u8::from(sensor.reading()))));
    out.push(
        Family::new("npd_sensor_reader_restarts_total")
            .sample(&[], stats.reader_restarts.load(Ordering::Relaxed) as f64),
    );
    let mut received = Family::new("npd_kernel_events_received_total");
    for (i, kind) in EVENT_KINDS.iter().enumerate() {
        received = received.sample(
            &[("kind", kind)],
            stats.received[i].load(Ordering::Relaxed) as f64,
        );
    }
    out.push(received);
    if sensor.source == ActiveSource::Ebpf {
        let losses = sensor.losses();
        let mut lost = Family::new("npd_kernel_events_lost_total");
        for (i, kind) in EVENT_KINDS.iter().enumerate() {
            lost = lost
                .sample(
                    &[("kind", kind), ("reason", "ring_buffer_full")],
                    losses.ring_full[i] as f64,
                )
                .sample(
                    &[("kind", kind), ("reason", "read_error")],
                    losses.read_errors[i] as f64,
                );
        }
        out.push(lost);
    }
    if sensor.kmsg_reader {
        out.push(
            Family::new("npd_kmsg_records_lost_total")
                .sample(&[], stats.kmsg_lost.load(Ordering::Relaxed) as f64),
        );
        out.push(
            Family::new("npd_kmsg_overruns_total")
                .sample(&[], stats.kmsg_overruns.load(Ordering::Relaxed) as f64),
        );
    }
    out.push(
        Family::new("npd_decode_errors_total")
            .sample(&[], stats.decode_errors.load(Ordering::Relaxed) as f64),
    );
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::problem::{ConditionChange, ProblemEvent, Severity};

    fn event(reason: &str) -> Report {
        Report::Event(ProblemEvent {
            source: "kernel-monitor".into(),
            severity: Severity::Warning,
            reason: reason.into(),
            message: "BUG: unable to handle kernel NULL pointer dereference at 0000000000000000"
                .into(),
            timestamp: SystemTime::UNIX_EPOCH,
            fields: serde_json::Map::new(),
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

    #[test]
    fn npd_names_help_and_labels_byte_for_byte() {
        let metrics = Metrics::new();
        metrics.init_reasons([
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
        let metrics = Metrics::new();
        metrics.init_reasons([("kernel-monitor", "DockerHung", Some("KernelDeadlock"))]);
        metrics.observe_report(&event("KernelOops"));
        metrics.observe_report(&event("KernelOops"));
        metrics.observe_report(&change(
            "KernelDeadlock",
            ConditionStatus::True,
            "DockerHung",
        ));
        assert_eq!(
            lines(&metrics, &["problem_counter", "problem_gauge"])
                .into_iter()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>(),
            [
                "problem_counter{reason=\"DockerHung\"} 1",
                "problem_counter{reason=\"KernelOops\"} 2",
                "problem_gauge{reason=\"DockerHung\",type=\"KernelDeadlock\"} 1",
            ]
        );
        // Another reason for the same condition: one reason per type is 1 (NPD's rule).
        metrics.observe_report(&change(
            "KernelDeadlock",
            ConditionStatus::True,
            "AUFSUmountHung",
        ));
        // Recovery: the gauge goes back to 0 (NPD's never does).
        metrics.observe_report(&change(
            "KernelDeadlock",
            ConditionStatus::False,
            "KernelHasNoDeadlock",
        ));
        assert_eq!(
            lines(&metrics, &["problem_gauge"])
                .into_iter()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>(),
            [
                "problem_gauge{reason=\"AUFSUmountHung\",type=\"KernelDeadlock\"} 0",
                "problem_gauge{reason=\"DockerHung\",type=\"KernelDeadlock\"} 0",
                "problem_gauge{reason=\"KernelHasNoDeadlock\",type=\"KernelDeadlock\"} 0",
            ]
        );
    }

    #[test]
    fn engine_and_exporter_counters_are_read_at_scrape_time() {
        let metrics = Metrics::new();
        assert!(
            lines(
                &metrics,
                &["npd_problems_reported_total", "npd_k8s_api_calls_total"]
            )
            .is_empty()
        );
        let reported = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let r = reported.clone();
        metrics.watch_engine(move || EngineCounters {
            problems_reported: r.load(Ordering::Relaxed),
            problems_deduplicated: 2,
            match_nanos: 1_500_000_000,
        });
        metrics.watch_exporter(|| {
            let mut stats = K8sStats {
                events_aggregated: 4,
                events_dropped_queue_full: 5,
                ..K8sStats::default()
            };
            let status = &mut stats.calls[ApiCall::PatchNodeStatus as usize];
            status.ok = 3;
            status.failed = 1;
            status.latency_sum_seconds = 0.25;
            status.latency_buckets = [1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4];
            stats
        });
        reported.store(7, Ordering::Relaxed);
        let text = metrics.encode();
        for expected in [
            "npd_problems_reported_total 7",
            "npd_problems_deduplicated_total 2",
            "npd_rule_match_seconds_total 1.5",
            "npd_k8s_api_calls_total{call=\"patch_node_status\",result=\"success\"} 3",
            "npd_k8s_api_calls_total{call=\"patch_node_status\",result=\"failure\"} 1",
            "npd_k8s_api_calls_total{call=\"create_event\",result=\"success\"} 0",
            "# TYPE npd_k8s_api_call_duration_seconds histogram",
            "npd_k8s_api_call_duration_seconds_bucket{call=\"patch_node_status\",le=\"0.005\"} 1",
            "npd_k8s_api_call_duration_seconds_bucket{call=\"patch_node_status\",le=\"+Inf\"} 4",
            "npd_k8s_api_call_duration_seconds_sum{call=\"patch_node_status\"} 0.25",
            "npd_k8s_api_call_duration_seconds_count{call=\"patch_node_status\"} 4",
            "npd_k8s_events_aggregated_total 4",
            "npd_k8s_events_suppressed_total{reason=\"queue_full\"} 5",
            "npd_k8s_api_available 0",
        ] {
            assert!(
                text.lines().any(|l| l == expected),
                "missing {expected:?} in\n{text}"
            );
        }
    }
}
