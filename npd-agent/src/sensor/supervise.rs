//! Keeps a reader running: when one fails (an I/O error, a panic, or a kill requested through
//! [`ReaderControl`]), marks the sensor as not reading, waits with exponential backoff and
//! starts it again on the same descriptor. [`SensorStats::reading`] is true exactly while a
//! reader task is running, which is what `/healthz` reports. Every task is tracked and stops
//! when the sensor's cancellation token is cancelled.
//!
//! The eBPF programs and the ring buffer are owned by the agent: no other process can detach a
//! program or close the ring buffer, so there is no external way to make a reader fail. Tests
//! (and operators who want to see the health check work) use [`ReaderControl::kill`], reachable
//! only through `POST /debug/sensor/kill-reader` when the agent runs with `--debug-endpoints`
//! (off by default).

use std::{
    future::Future,
    io,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use super::SensorStats;
use crate::tasks::Tasks;

/// Why a reader returned without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finished {
    /// The consumer is gone: the sensor is shutting down.
    ConsumerGone,
    /// The input ended (a file or a pipe, not the kernel's device): nothing more will come.
    EndOfInput,
}

/// A reader that runs until its receiver goes away or its input ends (`Ok`), or it fails
/// (`Err`). It is restarted on the same value after a failure, so it must keep its descriptor
/// usable.
pub(crate) trait Reader: Send + 'static {
    /// Reads until the consumer is gone, the input ends, or an error occurs.
    fn run(&mut self) -> impl Future<Output = io::Result<Finished>> + Send + '_;
}

/// First delay before a restart; doubled after each failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A reader that ran this long before failing starts the backoff over.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Fault injection for the readers (see the module documentation).
#[derive(Debug, Default)]
pub struct ReaderControl {
    kill: Notify,
    down_for: Mutex<Option<Duration>>,
}

impl ReaderControl {
    /// Kills the running reader (as if it had crashed) and keeps it down for `down_for` before
    /// the supervisor restarts it. A request made while no reader runs kills the next one.
    pub fn kill(&self, down_for: Duration) {
        if let Ok(mut slot) = self.down_for.lock() {
            *slot = Some(down_for);
        }
        self.kill.notify_one();
    }

    fn take_down_for(&self) -> Option<Duration> {
        self.down_for.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// What the sensor's readers share: their counters, the fault-injection control, the
/// tasks (a cancellation token they stop on, and the tracker that knows every one).
#[derive(Clone)]
pub(crate) struct Readers {
    pub(crate) stats: Arc<SensorStats>,
    pub(crate) control: Arc<ReaderControl>,
    pub(crate) tasks: Tasks,
}

impl Readers {
    /// Runs `reader` under supervision until its consumer goes away, its input ends, or the
    /// token is cancelled.
    pub(crate) fn spawn<R: Reader>(&self, what: &'static str, reader: R) {
        let Readers {
            stats,
            control,
            tasks,
        } = self.clone();
        let reader = Arc::new(tokio::sync::Mutex::new(reader));
        let (cancel, tracker) = (tasks.cancel, tasks.tracker);
        let subtasks = tracker.clone();
        tracker.spawn(async move {
            let mut backoff = MIN_BACKOFF;
            loop {
                let running = reader.clone();
                let mut task = subtasks.spawn(async move { running.lock().await.run().await });
                stats.reader_running();
                let started = Instant::now();
                let why = tokio::select! {
                    outcome = &mut task => match outcome {
                        // The consumer is gone: nothing left to do.
                        Ok(Ok(Finished::ConsumerGone)) => return,
                        // Nothing more will come (a file or a pipe): said once, not restarted.
                        Ok(Ok(Finished::EndOfInput)) => {
                            stats.reader_ended(what);
                            return;
                        }
                        Ok(Err(err)) => err.to_string(),
                        Err(err) if err.is_panic() => "panicked".to_string(),
                        Err(_) => "cancelled".to_string(),
                    },
                    () = control.kill.notified() => {
                        task.abort();
                        let _ = (&mut task).await;
                        "killed on request (fault injection through --debug-endpoints)".to_string()
                    }
                    () = cancel.cancelled() => {
                        task.abort();
                        let _ = task.await;
                        return;
                    }
                };
                stats.reader_failed(what, &why);
                if started.elapsed() >= STABLE_AFTER {
                    backoff = MIN_BACKOFF;
                }
                let delay = control.take_down_for().unwrap_or(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                tracing::warn!(
                    reader = what,
                    "restarting the {what} reader in {}",
                    humantime::format_duration(delay)
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => return,
                }
                tracing::info!(reader = what, "{what} reader restarted");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    fn readers(stats: &Arc<SensorStats>, control: &Arc<ReaderControl>) -> Readers {
        Readers {
            stats: stats.clone(),
            control: control.clone(),
            tasks: Tasks::default(),
        }
    }

    async fn done(readers: &Readers) {
        readers.tasks.tracker.close();
        readers.tasks.tracker.wait().await;
    }

    /// Fails the first `failures` runs, then waits until told to stop.
    struct Flaky {
        failures: u32,
        runs: Arc<std::sync::atomic::AtomicU32>,
        stop: Arc<Notify>,
    }

    impl Reader for Flaky {
        async fn run(&mut self) -> io::Result<Finished> {
            let n = self.runs.fetch_add(1, Ordering::SeqCst);
            if n < self.failures {
                return Err(io::Error::other(format!("failure {n}")));
            }
            self.stop.notified().await;
            Ok(Finished::ConsumerGone)
        }
    }

    async fn wait_for(what: impl Fn() -> bool) {
        for _ in 0..10_000 {
            if what() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("condition not reached");
    }

    #[tokio::test(start_paused = true)]
    async fn restarts_failed_readers_with_backoff() {
        let stats = Arc::new(SensorStats::default());
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let stop = Arc::new(Notify::new());
        let control = Arc::new(ReaderControl::default());
        let reader = Flaky {
            failures: 3,
            runs: runs.clone(),
            stop: stop.clone(),
        };
        let start = tokio::time::Instant::now();
        let readers = readers(&stats, &control);
        readers.spawn("test", reader);
        wait_for(|| runs.load(Ordering::SeqCst) == 4).await;
        // 100 ms + 200 ms + 400 ms of backoff.
        assert!(
            start.elapsed() >= Duration::from_millis(700),
            "{:?}",
            start.elapsed()
        );
        assert!(stats.reading());
        assert_eq!(stats.metrics.reader_restarts.get(), 3);
        assert_eq!(
            stats.reader_error().as_deref(),
            Some("test reader stopped: failure 2")
        );
        stop.notify_one();
        done(&readers).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_killed_reader_stays_down_as_long_as_asked() {
        let stats = Arc::new(SensorStats::default());
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let stop = Arc::new(Notify::new());
        let control = Arc::new(ReaderControl::default());
        let reader = Flaky {
            failures: 0,
            runs: runs.clone(),
            stop: stop.clone(),
        };
        let readers = readers(&stats, &control);
        readers.spawn("test", reader);
        wait_for(|| runs.load(Ordering::SeqCst) == 1).await;
        control.kill(Duration::from_secs(5));
        wait_for(|| !stats.reading()).await;
        let down = tokio::time::Instant::now();
        wait_for(|| stats.reading()).await;
        assert!(
            down.elapsed() >= Duration::from_millis(4990),
            "{:?}",
            down.elapsed()
        );
        wait_for(|| runs.load(Ordering::SeqCst) == 2).await;
        stop.notify_one();
        done(&readers).await;
    }

    #[tokio::test(start_paused = true)]
    async fn cancelling_stops_a_reader_and_its_supervisor() {
        let stats = Arc::new(SensorStats::default());
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let control = Arc::new(ReaderControl::default());
        let reader = Flaky {
            failures: 0,
            runs: runs.clone(),
            stop: Arc::new(Notify::new()),
        };
        let readers = readers(&stats, &control);
        readers.spawn("test", reader);
        wait_for(|| runs.load(Ordering::SeqCst) == 1).await;
        readers.tasks.cancel.cancel();
        done(&readers).await;
        assert!(readers.tasks.tracker.is_empty());
        assert_eq!(stats.metrics.reader_restarts.get(), 0);
    }
}
