//! What the sensor counts, and the one place each occurrence is counted and logged: its typed
//! metrics ([`SensorMetrics`]), the readers' state ([`SensorStats`]), and the one snapshot of
//! both ([`SensorSnapshot`]) that `/healthz` and the final stats line render (`/metrics`
//! renders the metrics themselves, and the eBPF loss counters through [`LossCollector`]).

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use prometheus::{
    IntCounter, IntGauge, IntGaugeVec, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use super::ebpf::LossCounters;
use crate::{
    event::{EventKind, PerKind},
    logging::{LOG_INTERVAL, LogLimiter},
    metrics::{int_counter, int_counter_vec, int_gauge, int_gauge_vec, register},
};

/// The sensor's metrics. Counted where things happen; read by `/metrics`, `/healthz` and the
/// final stats line.
#[derive(Clone, Debug)]
pub struct SensorMetrics {
    /// `npd_kernel_events_received_total{kind}`.
    pub received: PerKind<IntCounter>,
    /// `npd_decode_errors_total`.
    pub decode_errors: IntCounter,
    /// `npd_kmsg_records_lost_total`.
    pub kmsg_lost: IntCounter,
    /// `npd_kmsg_overruns_total`.
    pub kmsg_overruns: IntCounter,
    /// `npd_sensor_reader_restarts_total`.
    pub reader_restarts: IntCounter,
    /// `npd_sensor_reading`: 1 while a reader runs.
    pub reading: IntGauge,
    /// `npd_sensor_source{source}`.
    pub source: IntGaugeVec,
    /// `npd_tracepoint_attached{tracepoint}`.
    pub tracepoint_attached: IntGaugeVec,
    received_vec: prometheus::IntCounterVec,
}

impl Default for SensorMetrics {
    fn default() -> Self {
        let received_vec = int_counter_vec(
            "npd_kernel_events_received_total",
            "Kernel events received from the sensor, by kind.",
            &["kind"],
        );
        SensorMetrics {
            received: PerKind::from_fn(|k| received_vec.with_label_values(&[k.as_str()])),
            received_vec,
            decode_errors: int_counter(
                "npd_decode_errors_total",
                "Kernel records that could not be decoded.",
            ),
            kmsg_lost: int_counter(
                "npd_kmsg_records_lost_total",
                "/dev/kmsg records overwritten before they were read (sequence gaps).",
            ),
            kmsg_overruns: int_counter(
                "npd_kmsg_overruns_total",
                "Times /dev/kmsg reported that the kernel log buffer wrapped under the reader.",
            ),
            reader_restarts: int_counter(
                "npd_sensor_reader_restarts_total",
                "Times a failed sensor reader was restarted.",
            ),
            reading: int_gauge(
                "npd_sensor_reading",
                "Whether the sensor's reader is running (1) or stopped (0).",
            ),
            source: int_gauge_vec(
                "npd_sensor_source",
                "Kernel event source in use (1) or not (0): ebpf, or the kmsg fallback.",
                &["source"],
            ),
            tracepoint_attached: int_gauge_vec(
                "npd_tracepoint_attached",
                "Whether a tracepoint's eBPF program is attached (1) or disabled (0).",
                &["tracepoint"],
            ),
        }
    }
}

impl SensorMetrics {
    /// Registers them.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        register(registry, &self.received_vec)?;
        register(registry, &self.decode_errors)?;
        register(registry, &self.kmsg_lost)?;
        register(registry, &self.kmsg_overruns)?;
        register(registry, &self.reader_restarts)?;
        register(registry, &self.reading)?;
        register(registry, &self.source)?;
        register(registry, &self.tracepoint_attached)
    }
}

/// The sensor's live state, shared by its readers, metrics and health.
#[derive(Debug, Default)]
pub struct SensorStats {
    /// The counters and gauges.
    pub metrics: SensorMetrics,
    /// Why a reader last stopped, if one did (kept after a restart, for the record).
    reader_error: Mutex<Option<String>>,
    /// True once a reader's input ended (a file or a pipe given as `--kmsg-path`).
    input_ended: AtomicBool,
}

/// The rate limiters of the sensor's occurrences.
static DECODE_ERRORS: LogLimiter = LogLimiter::new(LOG_INTERVAL, 10);
static KMSG_OVERRUNS: LogLimiter = LogLimiter::new(LOG_INTERVAL, 1);
static READER_FAILURES: LogLimiter = LogLimiter::new(LOG_INTERVAL, 10);

impl SensorStats {
    /// An event was delivered.
    pub(crate) fn received(&self, kind: EventKind) {
        self.metrics.received[kind].inc();
    }

    /// A record could not be decoded: counted, and logged (rate limited).
    pub(crate) fn decode_error(&self, what: &str, err: &dyn std::fmt::Display) {
        self.metrics.decode_errors.inc();
        if let Some(held_back) = DECODE_ERRORS.allow() {
            tracing::warn!(held_back, "undecodable {what} (counted): {err}");
        }
    }

    /// `/dev/kmsg` records were lost (the sequence gap after an overrun): counted (the overrun
    /// itself is logged).
    pub(crate) fn kmsg_lost(&self, lost: u64) {
        self.metrics.kmsg_lost.inc_by(lost);
    }

    /// `/dev/kmsg` reported an overrun (EPIPE): counted, and logged (rate limited).
    pub(crate) fn kmsg_overrun(&self) {
        self.metrics.kmsg_overruns.inc();
        if let Some(held_back) = KMSG_OVERRUNS.allow() {
            tracing::warn!(
                held_back,
                "/dev/kmsg: the kernel log buffer wrapped before npd read it; the lost records are counted"
            );
        }
    }

    /// A reader is running.
    pub(crate) fn reader_running(&self) {
        self.metrics.reading.set(1);
    }

    /// A reader's input ended (a file or a pipe): said once, not restarted.
    pub(crate) fn reader_ended(&self, what: &str) {
        tracing::warn!("{what} reader: end of input; no more kernel messages will come from it");
        self.input_ended.store(true, Ordering::SeqCst);
        self.metrics.reading.set(0);
        self.set_error(format!("{what} reader: end of input"));
    }

    /// A reader failed: counted as a restart to come, logged (rate limited).
    pub(crate) fn reader_failed(&self, what: &str, err: &dyn std::fmt::Display) {
        if let Some(held_back) = READER_FAILURES.allow() {
            tracing::error!(held_back, "{what} reader stopped: {err}");
        }
        self.metrics.reading.set(0);
        self.metrics.reader_restarts.inc();
        self.set_error(format!("{what} reader stopped: {err}"));
    }

    fn set_error(&self, error: String) {
        *self.reader_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    /// Whether a reader runs now.
    pub fn reading(&self) -> bool {
        self.metrics.reading.get() == 1
    }

    /// Whether the input ended (nothing more will come).
    pub fn input_ended(&self) -> bool {
        self.input_ended.load(Ordering::SeqCst)
    }

    /// Why the reader last stopped, if it ever did.
    pub fn reader_error(&self) -> Option<String> {
        self.reader_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What the kernel side could not deliver (eBPF only), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Losses {
    /// Records the ring buffer could not take, by kind.
    pub ring_full: PerKind<u64>,
    /// Records whose tracepoint data could not be read, by kind.
    pub read_errors: PerKind<u64>,
}

impl Losses {
    /// All losses together.
    pub fn total(&self) -> u64 {
        self.ring_full.0.iter().chain(&self.read_errors.0).sum()
    }
}

/// Everything the sensor knows about itself at one moment: what `/healthz` and the final stats
/// line render.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SensorSnapshot {
    /// `ebpf` or `kmsg`.
    pub source: &'static str,
    /// Tracepoints attached (`group:name`).
    pub attached: Vec<String>,
    /// Tracepoints not attached, with the reason.
    pub disabled: Vec<(String, String)>,
    /// Whether kernel messages come from `/dev/kmsg`.
    pub kmsg_reader: bool,
    /// Whether a reader runs now.
    pub reading: bool,
    /// Why the reader last stopped, if it ever did.
    pub reader_error: Option<String>,
    /// Reader restarts.
    pub reader_restarts: u64,
    /// Events received, by kind.
    pub received: PerKind<u64>,
    /// What the eBPF programs could not deliver.
    pub losses: Losses,
    /// `/dev/kmsg` records lost to overruns.
    pub kmsg_lost: u64,
    /// `/dev/kmsg` overruns.
    pub kmsg_overruns: u64,
    /// Records that could not be decoded.
    pub decode_errors: u64,
}

impl SensorSnapshot {
    /// Everything lost, from any source.
    pub fn lost(&self) -> u64 {
        self.losses.total() + self.kmsg_lost
    }

    /// The final stats line (`--kernel-events`): what was received and what was lost.
    pub fn to_json(&self) -> serde_json::Value {
        let by_kind = |counts: &PerKind<u64>| {
            counts
                .iter()
                .map(|(k, n)| (k.as_str().to_owned(), (*n).into()))
                .collect::<serde_json::Map<_, _>>()
        };
        serde_json::json!({
            "kind": "stats",
            "source": self.source,
            "attached": self.attached,
            "received": by_kind(&self.received),
            "ring_full": by_kind(&self.losses.ring_full),
            "read_errors": by_kind(&self.losses.read_errors),
            "kmsg_lost": self.kmsg_lost,
            "kmsg_overruns": self.kmsg_overruns,
            "decode_errors": self.decode_errors,
            "reader_restarts": self.reader_restarts,
            "lost": self.lost(),
        })
    }
}

/// `npd_kernel_events_lost_total{kind,reason}`, read from the eBPF programs' per-CPU counters
/// when Prometheus scrapes (only the kernel can count a record it could not deliver).
pub(crate) struct LossCollector {
    desc: Desc,
    counters: Arc<LossCounters>,
}

impl LossCollector {
    pub(crate) fn new(counters: Arc<LossCounters>) -> prometheus::Result<Self> {
        Ok(LossCollector {
            desc: Desc::new(
                "npd_kernel_events_lost_total".into(),
                "Kernel events the eBPF programs could not deliver, by kind and reason (ring_buffer_full, read_error).".into(),
                vec!["kind".into(), "reason".into()],
                Default::default(),
            )?,
            counters,
        })
    }
}

impl Collector for LossCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let losses = self.counters.read();
        let lost = prometheus::IntCounterVec::new(
            prometheus::Opts::new(self.desc.fq_name.clone(), self.desc.help.clone()),
            &["kind", "reason"],
        );
        let Ok(lost) = lost else { return Vec::new() };
        for (kind, n) in losses.ring_full.iter() {
            lost.with_label_values(&[kind.as_str(), "ring_buffer_full"])
                .inc_by(*n);
        }
        for (kind, n) in losses.read_errors.iter() {
            lost.with_label_values(&[kind.as_str(), "read_error"])
                .inc_by(*n);
        }
        lost.collect()
    }
}
