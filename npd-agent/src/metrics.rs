//! Prometheus metrics: the one registry, and how it is served.
//!
//! Each module owns its metrics, typed (counters, gauges, histograms, vectors with fixed label
//! sets) and counted where the thing happens, and registers them here at start: the sensor
//! (`sensor::SensorMetrics`), the rules engine (`engine::EngineMetrics`), the Kubernetes
//! exporter, NPD's problem metrics (`exporter::problems`), the HTTP servers. Only what must be
//! read at scrape time is a custom collector: the eBPF programs' per-CPU loss counters, which
//! only the kernel can count.
//!
//! NPD's `problem_counter` and `problem_gauge` keep NPD's names, help and labels byte for byte
//! (see `exporter::problems`); every `npd_*` metric passes `promtool check metrics`.

use prometheus::{
    Counter, Encoder as _, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder, core::Collector,
};

/// The content type of [`Metrics::encode`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The registry every module registers into. Cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// A registry with `npd_build_info`.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let build = int_gauge_vec("npd_build_info", "npd version; always 1.", &["version"]);
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        register(&registry, &build)?;
        Ok(Metrics { registry })
    }

    /// The registry, for modules to register their metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The current values in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding well-formed families into a Vec does not fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Registers a metric (a clone: it shares its values with the one its module keeps).
pub fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    metric: &C,
) -> prometheus::Result<()> {
    registry.register(Box::new(metric.clone()))
}

// Constructors for metrics defined in the code. Their names, help and labels are constants,
// checked by the unit tests of every module that defines one; the only error the library can
// return for them is a malformed name, so a failure is a bug in this file's callers that the
// tests catch before any release.

/// An integer counter.
pub fn int_counter(name: &str, help: &str) -> IntCounter {
    IntCounter::with_opts(Opts::new(name, help)).expect("a valid metric definition")
}

/// A floating-point counter (seconds).
pub fn counter(name: &str, help: &str) -> Counter {
    Counter::with_opts(Opts::new(name, help)).expect("a valid metric definition")
}

/// An integer gauge.
pub fn int_gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::with_opts(Opts::new(name, help)).expect("a valid metric definition")
}

/// Integer counters by labels.
pub fn int_counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric definition")
}

/// Integer gauges by labels.
pub fn int_gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric definition")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_and_text_format() {
        let metrics = Metrics::new().unwrap();
        let text = metrics.encode();
        assert!(text.contains("# TYPE npd_build_info gauge\n"), "{text}");
        assert!(
            text.contains(&format!(
                "npd_build_info{{version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        // Registering the same name twice is refused, not a panic.
        let again = int_gauge("npd_build_info", "again");
        assert!(register(metrics.registry(), &again).is_err());
    }
}
