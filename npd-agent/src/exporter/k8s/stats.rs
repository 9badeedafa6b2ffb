//! The Kubernetes exporter's metrics, for `/metrics` and `/healthz`: API calls by kind (ok,
//! failed, latency histogram) and what happened to Events.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry,
};

use crate::metrics::{int_counter, int_counter_vec, int_gauge, register};

/// The API calls the exporter makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiCall {
    /// GET the Node (at start, to adopt its conditions and learn its uid).
    GetNode,
    /// PATCH `nodes/<name>/status` (condition changes and heartbeats).
    PatchNodeStatus,
    /// POST a new Event.
    CreateEvent,
    /// PATCH an existing Event's count and lastTimestamp (a repeat).
    PatchEvent,
}

impl ApiCall {
    /// Every kind, in the order of [`K8sStats::calls`].
    pub const ALL: [ApiCall; 4] = [
        ApiCall::GetNode,
        ApiCall::PatchNodeStatus,
        ApiCall::CreateEvent,
        ApiCall::PatchEvent,
    ];

    /// A short label value, e.g. `patch_node_status`.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiCall::GetNode => "get_node",
            ApiCall::PatchNodeStatus => "patch_node_status",
            ApiCall::CreateEvent => "create_event",
            ApiCall::PatchEvent => "patch_event",
        }
    }
}

/// Upper bounds (seconds) of the latency histogram buckets (Prometheus' defaults).
pub const LATENCY_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Counters of one kind of API call.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CallStats {
    /// Calls that succeeded.
    pub ok: u64,
    /// Calls that failed (error response, connection failure or timeout).
    pub failed: u64,
    /// Sum of the latencies of all calls, ok or failed, in seconds.
    pub latency_sum_seconds: f64,
}

/// A snapshot of the exporter's counters (all monotonic except the gauges noted), read from
/// its metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct K8sStats {
    /// Per API call kind, indexed like [`ApiCall::ALL`]; see [`K8sStats::call`].
    pub calls: [CallStats; 4],
    /// Event occurrences handed to the exporter (events and condition changes).
    pub events_received: u64,
    /// Event objects created.
    pub events_created: u64,
    /// Occurrences that became a count increment of an existing Event instead of a new one.
    pub events_aggregated: u64,
    /// Occurrences dropped because the queue was full (the API server was unavailable long
    /// enough for the queue to fill with distinct Events).
    pub events_dropped_queue_full: u64,
    /// Occurrences dropped because the API server refused them (not a transient error).
    pub events_dropped_rejected: u64,
    /// Occurrences still queued when the exporter stopped.
    pub events_dropped_at_shutdown: u64,
    /// Gauge: Events waiting to be posted.
    pub events_queued: u64,
    /// Gauge: the last API call succeeded (false before the first one and during outages).
    pub api_available: bool,
    /// Gauge: the Node was read and its conditions adopted.
    pub node_adopted: bool,
    /// Since when every API call has failed (`None` while the last call succeeded or before
    /// the first one).
    pub api_failing_since: Option<SystemTime>,
    /// Whether the exporter tasks are running (false once one ended, or if one panicked).
    pub running: bool,
    /// Condition writes the API server rejected (422 and other 4xx), dropped.
    pub condition_writes_rejected: u64,
    /// What keeps the exporter from doing its job now (the Node missing, a permission
    /// missing), for `/healthz`; `None` when nothing does.
    pub problem: Option<String>,
}

impl K8sStats {
    /// The counters of one kind of API call.
    pub fn call(&self, call: ApiCall) -> &CallStats {
        &self.calls[call as usize]
    }
}

/// The exporter's metrics (typed, counted where things happen), and the state `/healthz`
/// reads: since when calls fail, and whether the tasks run.
#[derive(Debug)]
pub(super) struct Counters {
    calls_vec: IntCounterVec,
    /// `(success, failure)` of each call kind.
    calls: [(IntCounter, IntCounter); 4],
    durations_vec: HistogramVec,
    durations: [Histogram; 4],
    pub(super) events_received: IntCounter,
    pub(super) events_created: IntCounter,
    pub(super) events_aggregated: IntCounter,
    suppressed_vec: IntCounterVec,
    pub(super) events_dropped_queue_full: IntCounter,
    pub(super) events_dropped_rejected: IntCounter,
    pub(super) events_dropped_at_shutdown: IntCounter,
    pub(super) events_queued: IntGauge,
    pub(super) api_available: IntGauge,
    pub(super) node_adopted: IntGauge,
    pub(super) condition_writes_rejected: IntCounter,
    /// Unix time in nanoseconds of the first failure since the last success; 0 when none.
    failing_since_nanos: AtomicU64,
    pub(super) running: AtomicBool,
}

impl Default for Counters {
    fn default() -> Self {
        let calls_vec = int_counter_vec(
            "npd_k8s_api_calls_total",
            "Kubernetes API calls, by call and result (success, failure).",
            &["call", "result"],
        );
        let durations_vec = HistogramVec::new(
            HistogramOpts::new(
                "npd_k8s_api_call_duration_seconds",
                "Latency of Kubernetes API calls, successful or not.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["call"],
        )
        .expect("a valid metric definition");
        let suppressed_vec = int_counter_vec(
            "npd_k8s_events_suppressed_total",
            "Occurrences not posted as Kubernetes Events, by reason (queue_full, rejected, shutdown).",
            &["reason"],
        );
        Counters {
            calls: ApiCall::ALL.map(|c| {
                (
                    calls_vec.with_label_values(&[c.as_str(), "success"]),
                    calls_vec.with_label_values(&[c.as_str(), "failure"]),
                )
            }),
            calls_vec,
            durations: ApiCall::ALL.map(|c| durations_vec.with_label_values(&[c.as_str()])),
            durations_vec,
            events_received: int_counter(
                "npd_k8s_events_received_total",
                "Problem occurrences handed to the Kubernetes exporter.",
            ),
            events_created: int_counter(
                "npd_k8s_events_created_total",
                "Kubernetes Events created.",
            ),
            events_aggregated: int_counter(
                "npd_k8s_events_aggregated_total",
                "Occurrences folded into an existing Kubernetes Event (its count incremented).",
            ),
            events_dropped_queue_full: suppressed_vec.with_label_values(&["queue_full"]),
            events_dropped_rejected: suppressed_vec.with_label_values(&["rejected"]),
            events_dropped_at_shutdown: suppressed_vec.with_label_values(&["shutdown"]),
            suppressed_vec,
            events_queued: int_gauge(
                "npd_k8s_events_queued",
                "Kubernetes Events waiting to be posted.",
            ),
            api_available: int_gauge(
                "npd_k8s_api_available",
                "Whether the last Kubernetes API call succeeded.",
            ),
            node_adopted: int_gauge(
                "npd_k8s_node_adopted",
                "Whether the Node was read and the conditions npd owns adopted.",
            ),
            condition_writes_rejected: int_counter(
                "npd_k8s_condition_writes_rejected_total",
                "Node condition writes the API server rejected (422 or another 4xx), dropped.",
            ),
            failing_since_nanos: AtomicU64::new(0),
            running: AtomicBool::new(false),
        }
    }
}

impl Counters {
    /// Registers the metrics.
    pub(super) fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        register(registry, &self.calls_vec)?;
        register(registry, &self.durations_vec)?;
        register(registry, &self.events_received)?;
        register(registry, &self.events_created)?;
        register(registry, &self.events_aggregated)?;
        register(registry, &self.suppressed_vec)?;
        register(registry, &self.events_queued)?;
        register(registry, &self.api_available)?;
        register(registry, &self.node_adopted)?;
        register(registry, &self.condition_writes_rejected)
    }

    /// Counts a call: `ok` when it succeeded, `answered` when the server gave an answer that
    /// is not a server error (a refusal is an answer: the server is available).
    pub(super) fn record_call(&self, call: ApiCall, ok: bool, answered: bool, latency: Duration) {
        let (success, failure) = &self.calls[call as usize];
        if ok { success } else { failure }.inc();
        self.durations[call as usize].observe(latency.as_secs_f64());
        self.api_available.set(i64::from(answered));
        if answered {
            self.failing_since_nanos.store(0, Ordering::Relaxed);
        } else {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(1, |d| {
                    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
                });
            let _ = self.failing_since_nanos.compare_exchange(
                0,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    pub(super) fn snapshot(&self) -> K8sStats {
        let call = |i: usize| CallStats {
            ok: self.calls[i].0.get(),
            failed: self.calls[i].1.get(),
            latency_sum_seconds: self.durations[i].get_sample_sum(),
        };
        K8sStats {
            calls: std::array::from_fn(call),
            events_received: self.events_received.get(),
            events_created: self.events_created.get(),
            events_aggregated: self.events_aggregated.get(),
            events_dropped_queue_full: self.events_dropped_queue_full.get(),
            events_dropped_rejected: self.events_dropped_rejected.get(),
            events_dropped_at_shutdown: self.events_dropped_at_shutdown.get(),
            events_queued: u64::try_from(self.events_queued.get()).unwrap_or(0),
            api_available: self.api_available.get() == 1,
            node_adopted: self.node_adopted.get() == 1,
            api_failing_since: match self.failing_since_nanos.load(Ordering::Relaxed) {
                0 => None,
                n => Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(n)),
            },
            running: self.running.load(Ordering::Relaxed),
            condition_writes_rejected: self.condition_writes_rejected.get(),
            problem: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_land_in_their_kind_and_buckets() {
        let c = Counters::default();
        let registry = Registry::new();
        c.register(&registry).unwrap();
        c.record_call(
            ApiCall::PatchNodeStatus,
            true,
            true,
            Duration::from_millis(3),
        );
        c.record_call(
            ApiCall::PatchNodeStatus,
            false,
            false,
            Duration::from_millis(30),
        );
        c.record_call(ApiCall::CreateEvent, true, true, Duration::from_secs(20));
        let s = c.snapshot();
        let status = s.call(ApiCall::PatchNodeStatus);
        assert_eq!((status.ok, status.failed), (1, 1));
        assert!((status.latency_sum_seconds - 0.033).abs() < 1e-9);
        let create = s.call(ApiCall::CreateEvent);
        assert_eq!(create.ok, 1);
        assert!(s.api_available);
        assert_eq!(s.api_failing_since, None, "the last call succeeded");
        assert_eq!(s.call(ApiCall::GetNode), &CallStats::default());
        let text = {
            let mut out = Vec::new();
            prometheus::Encoder::encode(
                &prometheus::TextEncoder::new(),
                &registry.gather(),
                &mut out,
            )
            .unwrap();
            String::from_utf8(out).unwrap()
        };
        for expected in [
            "npd_k8s_api_calls_total{call=\"patch_node_status\",result=\"success\"} 1",
            "npd_k8s_api_calls_total{call=\"patch_node_status\",result=\"failure\"} 1",
            "npd_k8s_api_calls_total{call=\"get_node\",result=\"success\"} 0",
            "npd_k8s_api_call_duration_seconds_bucket{call=\"patch_node_status\",le=\"0.005\"} 1",
            "npd_k8s_api_call_duration_seconds_bucket{call=\"patch_node_status\",le=\"+Inf\"} 2",
            "npd_k8s_api_call_duration_seconds_bucket{call=\"create_event\",le=\"10\"} 0",
            "npd_k8s_api_call_duration_seconds_count{call=\"create_event\"} 1",
            "npd_k8s_events_suppressed_total{reason=\"queue_full\"} 0",
            "npd_k8s_api_available 1",
        ] {
            assert!(
                text.lines().any(|l| l == expected),
                "missing {expected:?} in\n{text}"
            );
        }
        c.record_call(
            ApiCall::PatchNodeStatus,
            false,
            false,
            Duration::from_millis(1),
        );
        let since = c.snapshot().api_failing_since.expect("failing");
        c.record_call(
            ApiCall::PatchNodeStatus,
            false,
            false,
            Duration::from_millis(1),
        );
        assert_eq!(
            c.snapshot().api_failing_since,
            Some(since),
            "since the first failure"
        );
        // A refusal is an answer: the server is available, the call failed.
        c.record_call(ApiCall::CreateEvent, false, true, Duration::from_millis(1));
        let s = c.snapshot();
        assert!(s.api_available);
        assert_eq!(s.api_failing_since, None);
        assert_eq!(s.call(ApiCall::CreateEvent).failed, 1);
        for (i, call) in ApiCall::ALL.iter().enumerate() {
            assert_eq!(*call as usize, i);
        }
    }
}
