//! npd-agent: reads kernel events (eBPF tracepoints, or `/dev/kmsg` as a fallback), matches
//! them against rules, keeps Node conditions, and exports problems (stdout JSON lines,
//! Kubernetes, Prometheus, HTTP).
//!
//! Data flow (see DESIGN.md): `sensor` -> [`event::KernelEvent`] -> rules -> conditions ->
//! [`problem::Report`] -> exporters. `event`, `problem` and the decoders do no I/O.

pub mod cli;
pub mod commands;
pub mod conditions;
pub mod dedup;
pub mod engine;
#[cfg(test)]
mod engine_tests;
pub mod enrich;
pub mod event;
pub mod exporter;
pub mod health;
pub mod http;
pub mod metrics;
pub mod problem;
pub mod rules;
pub mod sensor;
pub mod time;
