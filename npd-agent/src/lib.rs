//! npd-agent: reads kernel events (eBPF tracepoints, or `/dev/kmsg` as a fallback), matches
//! them against rules, keeps Node conditions, and exports problems (stdout JSON lines,
//! Kubernetes, Prometheus, HTTP).
//!
//! Data flow: `sensor` -> bursts of [`event::KernelEvent`] -> `enrich` -> `engine` (rules,
//! conditions, de-duplication) -> [`problem::Report`] -> `exporter`s. `docs/design.md` has the
//! module map; dependencies point down it. `event`, `problem`, `rules`, `engine` and the
//! decoders do no I/O.
//!
//! The modules a test crate, a fuzz target or a benchmark uses are public; the rest is the
//! agent's own.

pub mod cli;
pub mod commands;
pub(crate) mod conditions;
pub(crate) mod dedup;
pub mod engine;
#[cfg(test)]
mod engine_tests;
pub(crate) mod enrich;
pub mod event;
pub mod exporter;
pub(crate) mod health;
pub(crate) mod http;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod plugins;
pub mod pods;
pub mod problem;
pub mod rules;
pub mod sensor;
pub(crate) mod tasks;
pub mod time;
