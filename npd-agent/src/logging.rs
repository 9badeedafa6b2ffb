//! Logs, written for `kubectl logs`: to stderr (stdout carries the JSON lines), as text or
//! JSON, colour only when stderr is a terminal and `NO_COLOR` is not set; and
//! [`LogLimiter`], the one rate limiter every repeated occurrence's log line goes through, so
//! that a storm is one line, not one per occurrence.
//!
//! Each observable occurrence (events lost, a reader restarted, an API call failed) is one
//! function in the module where it happens, which counts it in its metric and logs it through
//! a limiter together, so that the two never drift apart.

use std::{io::IsTerminal as _, sync::Mutex, time::Duration};

use crate::time::Mono;

/// How logs are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Whether text logs may carry colour: stderr is a terminal and `NO_COLOR` is unset or empty
/// (<https://no-color.org>).
pub fn colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Starts logging to stderr, filtered by `level` (`info`, `debug`, `npd_agent=trace,warn`),
/// else `RUST_LOG`, else `info`. A bad filter is an error naming it.
pub fn init(format: LogFormat, level: Option<&str>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(level) => {
            EnvFilter::try_new(level).with_context(|| format!("--log-level {level:?}"))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let ansi = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // A second initialisation (tests) keeps the first.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

/// The window of the limiters: each kind of occurrence is logged at most a burst of times in
/// it.
pub const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Lets the first `burst` occurrences of a kind in each interval be logged and holds back the
/// rest (they are still counted in their metric); the first line of the next interval says how
/// many were held back. A `static` per call site.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    burst: u32,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// When the current interval started; `None` before the first occurrence.
    start: Option<Mono>,
    logged: u32,
    held_back: u64,
}

impl LogLimiter {
    /// At most `burst` lines per `interval`.
    pub const fn new(interval: Duration, burst: u32) -> Self {
        LogLimiter {
            interval,
            burst,
            state: Mutex::new(Window {
                start: None,
                logged: 0,
                held_back: 0,
            }),
        }
    }

    /// Whether to write this occurrence's line now; when yes, how many occurrences were held
    /// back since the last line.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Mono::now())
    }

    fn allow_at(&self, now: Mono) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if w.start
            .is_none_or(|start| now.since(start) >= self.interval)
        {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged < self.burst {
            w.logged += 1;
            return Some(std::mem::take(&mut w.held_back));
        }
        w.held_back += 1;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Mono {
        Mono::since_boot(Duration::from_secs(secs))
    }

    #[test]
    fn a_burst_per_interval_and_the_count_of_the_rest() {
        let limiter = LogLimiter::new(Duration::from_secs(60), 2);
        assert_eq!(limiter.allow_at(at(0)), Some(0));
        assert_eq!(limiter.allow_at(at(1)), Some(0));
        for s in 2..60 {
            assert_eq!(limiter.allow_at(at(s)), None);
        }
        assert_eq!(limiter.allow_at(at(60)), Some(58));
        assert_eq!(limiter.allow_at(at(61)), Some(0));
        assert_eq!(limiter.allow_at(at(62)), None);
        assert_eq!(limiter.allow_at(at(500)), Some(1));
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }
}
