//! Standalone mode's JSON lines on stdout (the schema in `docs/design.md`), and the
//! `--kernel-events` lines. The lines of a burst are handed in one piece to a thread of their
//! own, which writes them: a stalled pipe never delays the kernel path, the other exporters or
//! SIGTERM. The queue is bounded in bytes; what does not fit is dropped and counted
//! (`npd_stdout_lines_dropped_total`), never waited for. A closed stdout (EPIPE: whoever read
//! it went away) is said once, and the agent stops ([`StdoutWriter::closed`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

use prometheus::{IntCounter, Registry};
use serde::Serialize;
use tokio::sync::{Notify, oneshot};

use super::{Exporter, Shutdown};
use crate::{
    event::KernelEvent,
    logging::{LOG_INTERVAL, LogLimiter},
    metrics::{int_counter, register},
    problem::Report,
    time::WallClock,
};

/// At most this many bytes wait to be written.
pub const QUEUE_BYTES: usize = 32 * 1024 * 1024;

/// How long [`Exporter::shutdown`] waits for what is queued to be written.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What to print.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Print {
    /// Reports (standalone mode).
    pub reports: bool,
    /// Every decoded kernel event (`--kernel-events`).
    pub kernel_events: bool,
}

/// What the exporter, its writer handles and the writing thread share.
#[derive(Debug)]
struct Shared {
    queued: AtomicUsize,
    closed: AtomicBool,
    closed_notify: Notify,
    dropped: IntCounter,
}

static DROPPED: LogLimiter = LogLimiter::new(LOG_INTERVAL, 1);

/// Hands whole bursts to the writing thread.
#[derive(Clone, Debug)]
pub struct StdoutWriter {
    tx: mpsc::Sender<Vec<u8>>,
    shared: Arc<Shared>,
}

impl StdoutWriter {
    /// Queues `chunk` (`lines` lines), or drops and counts it when the queue is full.
    fn send(&self, chunk: Vec<u8>, lines: u64) {
        if chunk.is_empty() || self.shared.closed.load(Ordering::Relaxed) {
            return;
        }
        let len = chunk.len();
        let queued = self.shared.queued.fetch_add(len, Ordering::Relaxed);
        if queued + len > QUEUE_BYTES || self.tx.send(chunk).is_err() {
            self.shared.queued.fetch_sub(len, Ordering::Relaxed);
            self.shared.dropped.inc_by(lines);
            if let Some(held_back) = DROPPED.allow() {
                tracing::warn!(
                    lines,
                    held_back,
                    "stdout is not keeping up: lines dropped (counted in npd_stdout_lines_dropped_total)"
                );
            }
        }
    }

    /// Writes one line now (the final stats line).
    pub fn line(&self, value: &impl Serialize) {
        let mut chunk = Vec::new();
        if append(&mut chunk, value) {
            self.send(chunk, 1);
        }
    }

    /// Resolves once stdout is closed (EPIPE), never otherwise.
    pub async fn closed(&self) {
        loop {
            let notified = self.shared.closed_notify.notified();
            if self.shared.closed.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

/// The exporter (see the module documentation).
pub struct StdoutExporter {
    print: Print,
    writer: StdoutWriter,
    buf: Vec<u8>,
    lines: u64,
    done: Option<oneshot::Receiver<()>>,
}

impl StdoutExporter {
    /// Starts the writing thread; counts drops in `registry`.
    pub fn start(print: Print, registry: &Registry) -> anyhow::Result<Self> {
        let dropped = int_counter(
            "npd_stdout_lines_dropped_total",
            "JSON lines not written to stdout because it did not keep up (the queue was full).",
        );
        register(registry, &dropped)?;
        Self::start_with(print, dropped, std::io::stdout())
    }

    fn start_with(
        print: Print,
        dropped: IntCounter,
        out: impl std::io::Write + Send + 'static,
    ) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            closed_notify: Notify::new(),
            dropped,
        });
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let (done_tx, done) = oneshot::channel();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("npd-stdout".into())
            .spawn(move || {
                write_all(rx, out, &thread_shared);
                let _ = done_tx.send(());
            })?;
        Ok(StdoutExporter {
            print,
            writer: StdoutWriter { tx, shared },
            buf: Vec::with_capacity(64 * 1024),
            lines: 0,
            done: Some(done),
        })
    }

    /// A handle that writes lines and says when stdout is closed.
    pub fn writer(&self) -> StdoutWriter {
        self.writer.clone()
    }

    fn push(&mut self, value: &impl Serialize) {
        if append(&mut self.buf, value) {
            self.lines += 1;
        }
    }
}

/// Appends `value` as one JSON line; false when it cannot be encoded (never for npd's types).
fn append(buf: &mut Vec<u8>, value: &impl Serialize) -> bool {
    let before = buf.len();
    if serde_json::to_writer(&mut *buf, value).is_err() {
        buf.truncate(before);
        return false;
    }
    buf.push(b'\n');
    true
}

/// The writing thread: writes each burst as it comes, until every sender is gone. A closed
/// stdout is said once and ends the writing; the rest is discarded.
fn write_all(rx: mpsc::Receiver<Vec<u8>>, mut out: impl std::io::Write, shared: &Shared) {
    for chunk in rx {
        shared.queued.fetch_sub(chunk.len(), Ordering::Relaxed);
        if shared.closed.load(Ordering::Relaxed) {
            continue;
        }
        if let Err(e) = out.write_all(&chunk).and_then(|()| out.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                tracing::warn!(
                    "stdout is closed (EPIPE: its reader went away): stopping; nothing more is printed"
                );
            } else {
                tracing::error!("writing to stdout failed: {e}; stopping");
            }
            shared.closed.store(true, Ordering::SeqCst);
            shared.closed_notify.notify_waiters();
        }
    }
}

/// A `--kernel-events` line: `{"kind":"kernel","time":"...","event":...}`.
#[derive(Serialize)]
struct KernelLine<'a> {
    kind: &'static str,
    /// When the kernel saw it (wall clock, microseconds).
    time: String,
    #[serde(flatten)]
    event: &'a KernelEvent,
}

impl Exporter for StdoutExporter {
    fn export(&mut self, report: &Report) {
        if self.print.reports {
            self.push(report);
        }
    }

    fn kernel_event(&mut self, event: &KernelEvent, clock: &WallClock) {
        if self.print.kernel_events {
            let time = crate::time::clamp(clock.wall(event.at)).0;
            self.push(&KernelLine {
                kind: "kernel",
                time: humantime::format_rfc3339_micros(time).to_string(),
                event,
            });
        }
    }

    fn flush(&mut self) {
        if !self.buf.is_empty() {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(64 * 1024));
            self.writer.send(chunk, std::mem::take(&mut self.lines));
        }
    }

    /// Hands over what is buffered and waits, at most [`DRAIN_TIMEOUT`], until the thread has
    /// written everything queued (other [`StdoutWriter`]s must be gone by then).
    fn shutdown(mut self: Box<Self>) -> Shutdown {
        self.flush();
        let done = self.done.take();
        drop(self);
        Box::pin(async move {
            if let Some(done) = done
                && tokio::time::timeout(DRAIN_TIMEOUT, done).await.is_err()
            {
                tracing::warn!(
                    "stdout did not take the last lines within {}; they are not written",
                    humantime::format_duration(DRAIN_TIMEOUT)
                );
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        event::{LogMessage, fixtures},
        problem::{ProblemEvent, Severity},
        time::Mono,
    };

    /// A `Write` the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A `Write` whose reader went away.
    struct Closed;

    impl std::io::Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn counter() -> IntCounter {
        int_counter("npd_stdout_lines_dropped_total", "test")
    }

    fn report() -> Report {
        Report::Event(ProblemEvent {
            source: "kernel-monitor".into(),
            severity: Severity::Warning,
            reason: "KernelOops".into(),
            message: "BUG: x".into(),
            timestamp: std::time::SystemTime::UNIX_EPOCH,
            fields: serde_json::Map::new(),
            pods: Vec::new(),
        })
    }

    #[tokio::test]
    async fn kernel_events_then_their_reports_in_order() {
        let out = Captured::default();
        let print = Print {
            reports: true,
            kernel_events: true,
        };
        let mut e = Box::new(StdoutExporter::start_with(print, counter(), out.clone()).unwrap());
        let clock = WallClock::booted_at(std::time::SystemTime::UNIX_EPOCH);
        let event = KernelEvent::new(Mono::from_nanos(1_500_000), fixtures::block_error(None));
        e.kernel_event(&event, &clock);
        e.export(&report());
        e.flush();
        e.kernel_event(&KernelEvent::new(Mono::ZERO, LogMessage::new("x")), &clock);
        e.shutdown().await;
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(
            lines[0],
            serde_json::json!({"kind":"kernel","time":"1970-01-01T00:00:00.001500Z",
                "event":"block_error","dev":"7:0","sector":24576,"nr_sectors":8,"op":"READ",
                "rwbs":"R","error":-5})
        );
        assert_eq!(lines[1]["reason"], "KernelOops");
        assert_eq!(
            lines[2]["message"], "x",
            "shutdown writes what was buffered"
        );
    }

    #[tokio::test]
    async fn a_closed_stdout_is_said_once_and_nothing_waits_for_it() {
        let print = Print {
            reports: true,
            kernel_events: false,
        };
        let mut e = StdoutExporter::start_with(print, counter(), Closed).unwrap();
        let writer = e.writer();
        e.export(&report());
        e.flush();
        writer.closed().await;
        // Later lines are neither written nor queued.
        e.export(&report());
        e.flush();
        assert_eq!(writer.shared.queued.load(Ordering::Relaxed), 0);
        drop(writer);
        Box::new(e).shutdown().await;
    }

    #[tokio::test]
    async fn what_does_not_fit_is_dropped_and_counted() {
        /// Never returns from a write until told: a stalled pipe.
        struct Stalled(Arc<std::sync::Barrier>);
        impl std::io::Write for Stalled {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.wait();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let release = Arc::new(std::sync::Barrier::new(2));
        let dropped = counter();
        let print = Print {
            reports: true,
            kernel_events: false,
        };
        let e =
            StdoutExporter::start_with(print, dropped.clone(), Stalled(release.clone())).unwrap();
        let writer = e.writer();
        // Two chunks: the first is taken by the stalled thread, the second waits in the queue;
        // a third that would pass the byte limit is dropped.
        let big = vec![b'x'; QUEUE_BYTES - 10];
        writer.send(b"first\n".to_vec(), 1);
        writer.send(big, 1);
        writer.send(vec![b'y'; 64], 3);
        assert_eq!(dropped.get(), 3);
        // Let the thread write both, then stop.
        release.wait();
        release.wait();
        drop(writer);
        Box::new(e).shutdown().await;
    }
}
