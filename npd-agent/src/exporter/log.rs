//! In a cluster, reports go to the Kubernetes API, and the log says so: one line per report,
//! rate limited (a storm is ten lines a minute and the count of the rest, not a line per
//! fault).
//! Standalone, stdout carries the reports instead.

use super::Exporter;
use crate::{
    logging::{LOG_INTERVAL, LogLimiter},
    problem::Report,
};

/// Logs reports (see the module documentation).
#[derive(Debug, Default)]
pub struct ReportLog;

static REPORTS: LogLimiter = LogLimiter::new(LOG_INTERVAL, 10);

impl Exporter for ReportLog {
    fn export(&mut self, report: &Report) {
        if let Some(suppressed) = REPORTS.allow()
            && let Ok(line) = serde_json::to_string(report)
        {
            tracing::info!(report = %line, held_back = suppressed, "problem");
        }
    }
}
