//! Plain counters of the Kubernetes exporter, for `/metrics` and `/healthz`: API calls by kind
//! (ok, failed, latency histogram) and what happened to Events.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

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
    /// Cumulative histogram: `latency_buckets[i]` calls took at most `LATENCY_BUCKETS[i]`
    /// seconds; `ok + failed` is the total (the `+Inf` bucket).
    pub latency_buckets: [u64; LATENCY_BUCKETS.len()],
}

/// A snapshot of the exporter's counters (all monotonic except the gauges noted).
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

#[derive(Debug, Default)]
struct CallCounters {
    ok: AtomicU64,
    failed: AtomicU64,
    latency_sum_nanos: AtomicU64,
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
}

/// The live counters, shared between the exporter task and its handle.
#[derive(Debug, Default)]
pub(super) struct Counters {
    calls: [CallCounters; 4],
    pub(super) events_received: AtomicU64,
    pub(super) events_created: AtomicU64,
    pub(super) events_aggregated: AtomicU64,
    pub(super) events_dropped_queue_full: AtomicU64,
    pub(super) events_dropped_rejected: AtomicU64,
    pub(super) events_dropped_at_shutdown: AtomicU64,
    pub(super) api_available: AtomicBool,
    pub(super) node_adopted: AtomicBool,
    /// Unix time in nanoseconds of the first failure since the last success; 0 when none.
    failing_since_nanos: AtomicU64,
    pub(super) running: AtomicBool,
    pub(super) condition_writes_rejected: AtomicU64,
}

impl Counters {
    /// Counts a call: `ok` when it succeeded, `answered` when the server gave an answer that
    /// is not a server error (a refusal is an answer: the server is available).
    pub(super) fn record_call(&self, call: ApiCall, ok: bool, answered: bool, latency: Duration) {
        let c = &self.calls[call as usize];
        if ok { &c.ok } else { &c.failed }.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        c.latency_sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        let secs = latency.as_secs_f64();
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&c.buckets) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.api_available.store(answered, Ordering::Relaxed);
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

    /// Adds `n`; returns the new value.
    pub(super) fn add(counter: &AtomicU64, n: u64) -> u64 {
        counter.fetch_add(n, Ordering::Relaxed) + n
    }

    pub(super) fn set(flag: &AtomicBool, value: bool) {
        flag.store(value, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self, events_queued: u64) -> K8sStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let call = |c: &CallCounters| CallStats {
            ok: get(&c.ok),
            failed: get(&c.failed),
            latency_sum_seconds: get(&c.latency_sum_nanos) as f64 / 1e9,
            latency_buckets: std::array::from_fn(|i| get(&c.buckets[i])),
        };
        K8sStats {
            calls: std::array::from_fn(|i| call(&self.calls[i])),
            events_received: get(&self.events_received),
            events_created: get(&self.events_created),
            events_aggregated: get(&self.events_aggregated),
            events_dropped_queue_full: get(&self.events_dropped_queue_full),
            events_dropped_rejected: get(&self.events_dropped_rejected),
            events_dropped_at_shutdown: get(&self.events_dropped_at_shutdown),
            events_queued,
            api_available: self.api_available.load(Ordering::Relaxed),
            node_adopted: self.node_adopted.load(Ordering::Relaxed),
            api_failing_since: match get(&self.failing_since_nanos) {
                0 => None,
                n => Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(n)),
            },
            running: self.running.load(Ordering::Relaxed),
            condition_writes_rejected: get(&self.condition_writes_rejected),
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
        let s = c.snapshot(0);
        let status = s.call(ApiCall::PatchNodeStatus);
        assert_eq!((status.ok, status.failed), (1, 1));
        assert_eq!(status.latency_buckets, [1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]);
        assert!((status.latency_sum_seconds - 0.033).abs() < 1e-9);
        let create = s.call(ApiCall::CreateEvent);
        assert_eq!(
            create.latency_buckets, [0; 11],
            "beyond the last bound: only in +Inf"
        );
        assert_eq!(create.ok, 1);
        assert!(s.api_available);
        assert_eq!(s.api_failing_since, None, "the last call succeeded");
        assert_eq!(s.call(ApiCall::GetNode), &CallStats::default());
        c.record_call(
            ApiCall::PatchNodeStatus,
            false,
            false,
            Duration::from_millis(1),
        );
        let since = c.snapshot(0).api_failing_since.expect("failing");
        c.record_call(
            ApiCall::PatchNodeStatus,
            false,
            false,
            Duration::from_millis(1),
        );
        assert_eq!(
            c.snapshot(0).api_failing_since,
            Some(since),
            "since the first failure"
        );
        // A refusal is an answer: the server is available, the call failed.
        c.record_call(ApiCall::CreateEvent, false, true, Duration::from_millis(1));
        let s = c.snapshot(0);
        assert!(s.api_available);
        assert_eq!(s.api_failing_since, None);
        assert_eq!(s.call(ApiCall::CreateEvent).failed, 1);
        for (i, call) in ApiCall::ALL.iter().enumerate() {
            assert_eq!(*call as usize, i);
        }
    }
}
