//! Exporters: where reports go, as NPD's problem detector fans them out. Each takes the
//! [`Report`]s in order through the one [`Exporter`] interface and never makes the kernel path
//! wait: whatever does I/O does it on its own task behind a bounded queue.
//!
//! - [`stdout`]: standalone mode's JSON lines (and `--kernel-events`);
//! - [`k8s`]: Node conditions and Events through the Kubernetes API;
//! - [`board`]: the current conditions, served at `/conditions`;
//! - [`problems`]: NPD's `problem_counter` and `problem_gauge`;
//! - [`log`]: in a cluster, one log line per report (rate limited).

pub(crate) mod board;
pub mod k8s;
pub(crate) mod log;
pub(crate) mod problems;
pub(crate) mod stdout;

use std::{future::Future, pin::Pin};

use crate::{
    event::KernelEvent,
    problem::{ConditionChange, Report},
    time::WallClock,
};

/// A future an exporter's shutdown returns.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where reports go. Every method returns at once: an exporter that writes somewhere queues.
pub trait Exporter: Send {
    /// Takes one report.
    fn export(&mut self, report: &Report);

    /// Takes conditions npd found on the Node at start and took over: nothing happened, so
    /// nothing is reported, but what the exporter shows follows them.
    fn adopted(&mut self, _changes: &[ConditionChange]) {}

    /// Sees a decoded kernel event before the reports it leads to (`--kernel-events`).
    fn kernel_event(&mut self, _event: &KernelEvent, _clock: &WallClock) {}

    /// The end of a burst: hand over what was buffered.
    fn flush(&mut self) {}

    /// Stops after handing over what it holds, within its own deadline.
    fn shutdown(self: Box<Self>) -> Shutdown {
        Box::pin(async {})
    }
}

/// Every exporter, in the order they see each report.
#[derive(Default)]
pub struct Exporters(Vec<Box<dyn Exporter>>);

impl Exporters {
    /// Adds one.
    pub fn push(&mut self, exporter: impl Exporter + 'static) {
        self.0.push(Box::new(exporter));
    }

    /// Each exporter sees `report`.
    pub fn export(&mut self, report: &Report) {
        for e in &mut self.0 {
            e.export(report);
        }
    }

    /// Each exporter sees the conditions taken over from the Node.
    pub fn adopted(&mut self, changes: &[ConditionChange]) {
        for e in &mut self.0 {
            e.adopted(changes);
        }
    }

    /// Each exporter sees a kernel event.
    pub fn kernel_event(&mut self, event: &KernelEvent, clock: &WallClock) {
        for e in &mut self.0 {
            e.kernel_event(event, clock);
        }
    }

    /// The end of a burst.
    pub fn flush(&mut self) {
        for e in &mut self.0 {
            e.flush();
        }
    }

    /// Stops every exporter, all at once; each keeps its own deadline.
    pub async fn shutdown(self) {
        let mut all = tokio::task::JoinSet::new();
        for e in self.0 {
            all.spawn(e.shutdown());
        }
        while all.join_next().await.is_some() {}
    }
}
