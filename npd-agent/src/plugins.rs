//! Runs NPD's custom plugins ([`PluginMonitor`]), so that a plugin that hangs, floods its
//! output or cannot be killed never stalls anything else:
//!
//! * **No tick.** One scheduler task per monitor sleeps until its next plugin is due; a node
//!   with no plugin monitor has no plugin task at all. The first runs are spread over the first
//!   five seconds (or the rule's interval when shorter; a fixed pseudo-random phase per rule),
//!   so that rules do not all start at once (NPD #412); each rule then keeps its own interval,
//!   and a late run is not run twice. A rule never runs alongside itself.
//! * **Bounded.** At most `concurrency` plugins of a monitor run at once. A plugin runs as
//!   argv (its `#!` line used as the kernel uses it, never through a shell), in a process
//!   group of its own, with stdin closed and a small environment: `PATH` (a standard one) and
//!   `NODE_NAME` when the agent has it. Its stdout and stderr are read with a bound (4 KiB
//!   each, the rest drained and dropped), so a plugin that prints gigabytes costs nothing.
//! * **Timeouts always hold.** At its timeout the whole process group gets SIGTERM, then
//!   SIGKILL after [`KILL_GRACE`]; the result is Unknown ("timed out after 5s"). A run ends
//!   with its process group: what a plugin leaves running when it exits is killed too. The
//!   agent is the plugins' child subreaper, so what they leave behind is reaped by it (also
//!   when it is not PID 1). A process that still does not go (a child in uninterruptible
//!   sleep, NPD #1050) is left to go on its own: the result is Unknown at once,
//!   `npd_plugin_stuck{source,reason}` is 1 until it is gone (checked once a second), and that
//!   rule is not started again while it is there. Output is never waited for once the plugin
//!   has exited (a stuck child may hold the pipe open). A plugin that leaves its process
//!   group (`setsid`) is out of reach, as it is for NPD.
//!
//! Results go to the run loop, where the engine gives them NPD's meaning
//! ([`crate::engine::PluginResult`]).

use std::{
    os::unix::process::ExitStatusExt as _,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Registry};
use tokio::{io::AsyncReadExt as _, sync::mpsc, time::Instant};

use crate::{
    engine::{PluginResult, PluginStatus},
    logging::{LOG_INTERVAL, LogLimiter},
    metrics::{int_counter_vec, int_gauge_vec, register},
    rules::{PluginMonitor, PluginRule},
    tasks::Tasks,
    time::Mono,
};

/// How long a plugin that passed its timeout has after SIGTERM before SIGKILL, and after
/// SIGKILL before it is called stuck.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// The most bytes kept of a plugin's stdout and of its stderr (NPD's limit); the rest is read
/// and dropped.
pub const OUTPUT_LIMIT: usize = 4 * 1024;

/// The first runs are spread over this much time at most (or the rule's interval when shorter),
/// so that a node's checks all run soon after the agent starts, yet not at the same instant.
const FIRST_RUN_SPREAD: Duration = Duration::from_secs(5);

/// How often a run that could not be ended is checked again.
const LINGER_CHECK: Duration = Duration::from_secs(1);

/// How long output is read after the plugin exited (a child it left may hold the pipe).
const OUTPUT_AFTER_EXIT: Duration = Duration::from_millis(200);

/// The `PATH` plugins get.
pub const PLUGIN_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The plugins' metrics.
#[derive(Clone, Debug)]
pub struct PluginMetrics {
    runs: IntCounterVec,
    duration: HistogramVec,
    stuck: IntGaugeVec,
}

impl PluginMetrics {
    /// The metrics, registered in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = PluginMetrics {
            runs: int_counter_vec(
                "npd_plugin_runs_total",
                "Custom plugin runs, by monitor source, rule reason and result (ok, nonok, unknown, timeout, error).",
                &["source", "reason", "result"],
            ),
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "npd_plugin_run_duration_seconds",
                    "How long custom plugin runs took, by monitor source.",
                )
                .buckets(vec![
                    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ]),
                &["source"],
            )?,
            stuck: int_gauge_vec(
                "npd_plugin_stuck",
                "Custom plugins whose process did not exit after SIGKILL (still running), by monitor source and rule reason.",
                &["source", "reason"],
            ),
        };
        register(registry, &m.runs)?;
        register(registry, &m.duration)?;
        register(registry, &m.stuck)?;
        Ok(m)
    }
}

/// How one run ended, for the metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    Ok,
    NonOk,
    Unknown,
    Timeout,
    Error,
}

impl Ended {
    fn as_str(self) -> &'static str {
        match self {
            Ended::Ok => "ok",
            Ended::NonOk => "nonok",
            Ended::Unknown => "unknown",
            Ended::Timeout => "timeout",
            Ended::Error => "error",
        }
    }
}

/// The running plugin monitors.
#[derive(Debug)]
pub struct PluginRunner {
    tasks: Tasks,
}

impl PluginRunner {
    /// Starts a scheduler per monitor (none when there is none). Results go to `results`.
    pub fn start(
        monitors: &[PluginMonitor],
        results: mpsc::Sender<PluginResult>,
        metrics: PluginMetrics,
        node_name: Option<String>,
    ) -> PluginRunner {
        let tasks = Tasks::default();
        if !monitors.is_empty() {
            // What plugins leave behind is re-parented to the agent, which reaps it
            // ([`group_alive`]); without this it would go to the host's init.
            // SAFETY: a plain prctl on this process.
            if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
                tracing::warn!(
                    "could not become the plugins' subreaper: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        for (index, monitor) in monitors.iter().enumerate() {
            let scheduler = Scheduler {
                index,
                monitor: Arc::new(monitor.clone()),
                results: results.clone(),
                metrics: metrics.clone(),
                node_name: node_name.clone(),
                tasks: tasks.clone(),
            };
            tasks.tracker.spawn(scheduler.run());
        }
        PluginRunner { tasks }
    }

    /// Stops scheduling, kills the plugins that run (their process groups), and waits for
    /// the tasks, at most `limit`.
    pub async fn stop(&self, limit: Duration) {
        self.tasks.stop(limit, "the plugin monitors").await;
    }
}

/// One monitor's schedule.
struct Scheduler {
    index: usize,
    monitor: Arc<PluginMonitor>,
    results: mpsc::Sender<PluginResult>,
    metrics: PluginMetrics,
    node_name: Option<String>,
    tasks: Tasks,
}

/// A fixed pseudo-random phase in `[0, 1)` for rule `rule` of monitor `monitor` (the golden
/// ratio's fractional sequence: evenly spread, the same at every start).
fn phase(monitor: usize, rule: usize) -> f64 {
    let n = (monitor * 1009 + rule + 1) as f64;
    (n * 0.618_033_988_749_895).fract()
}

impl Scheduler {
    async fn run(self) {
        let permits = Arc::new(tokio::sync::Semaphore::new(self.monitor.concurrency));
        let start = Instant::now();
        let mut due: Vec<Instant> = self
            .monitor
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                start
                    + r.invoke_interval
                        .min(FIRST_RUN_SPREAD)
                        .mul_f64(phase(self.index, i))
            })
            .collect();
        let alive: Vec<Arc<AtomicBool>> = self
            .monitor
            .rules
            .iter()
            .map(|_| Arc::new(AtomicBool::new(false)))
            .collect();
        let cancel = self.tasks.cancel.clone();
        loop {
            let Some(next) = due.iter().min().copied() else {
                return;
            };
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = cancel.cancelled() => return,
            }
            let now = Instant::now();
            for (i, rule) in self.monitor.rules.iter().enumerate() {
                if due[i] > now {
                    continue;
                }
                // The next run keeps the rule's phase; a late one does not run twice.
                while due[i] <= now {
                    due[i] += rule.invoke_interval;
                }
                if alive[i].swap(true, Ordering::SeqCst) {
                    // Its previous run is still alive (slow, or stuck): not started again.
                    continue;
                }
                let run = Run {
                    monitor: self.index,
                    rule_index: i,
                    source: self.monitor.source.clone(),
                    rule: rule.clone(),
                    max_output: self.monitor.max_output_length,
                    node_name: self.node_name.clone(),
                    results: self.results.clone(),
                    metrics: self.metrics.clone(),
                    alive: alive[i].clone(),
                    permits: permits.clone(),
                    cancel: cancel.clone(),
                    tasks: self.tasks.clone(),
                };
                self.tasks.tracker.spawn(run.run());
            }
        }
    }
}

/// One run of one rule's plugin.
struct Run {
    monitor: usize,
    rule_index: usize,
    source: String,
    rule: PluginRule,
    max_output: usize,
    node_name: Option<String>,
    results: mpsc::Sender<PluginResult>,
    metrics: PluginMetrics,
    /// True while this rule has a run alive; cleared when its process has exited.
    alive: Arc<AtomicBool>,
    permits: Arc<tokio::sync::Semaphore>,
    cancel: tokio_util::sync::CancellationToken,
    tasks: Tasks,
}

static START_FAILURES: LogLimiter = LogLimiter::new(LOG_INTERVAL, 10);
static STUCK: LogLimiter = LogLimiter::new(LOG_INTERVAL, 10);

impl Run {
    async fn run(self) {
        let Ok(_permit) = self.permits.clone().acquire_owned().await else {
            self.alive.store(false, Ordering::SeqCst);
            return;
        };
        let started = Instant::now();
        // Stopped with the agent: killed, and nothing reported (the Node keeps its state).
        let Some((status, ended, message)) = self.execute().await else {
            return;
        };
        let took = started.elapsed();
        let reason = self.rule.reason.as_str();
        self.metrics
            .runs
            .with_label_values(&[&self.source, reason, ended.as_str()])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[&self.source])
            .observe(took.as_secs_f64());
        let result = PluginResult {
            monitor: self.monitor,
            rule: self.rule_index,
            status,
            message,
            at: Mono::now(),
        };
        let _ = self.results.send(result).await;
    }

    /// Runs the plugin; returns its status, how it ended and its message, or `None` when the
    /// agent stops first (the plugin is killed). Clears `alive` once its process has exited
    /// (later, from a task of its own, when it is stuck).
    async fn execute(&self) -> Option<(PluginStatus, Ended, String)> {
        let mut command = tokio::process::Command::new(&self.rule.path);
        command
            .args(&self.rule.args)
            .env_clear()
            .env("PATH", PLUGIN_PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        if let Some(node) = &self.node_name {
            command.env("NODE_NAME", node);
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                self.alive.store(false, Ordering::SeqCst);
                let why = format!("could not start {}: {e}", self.rule.path.display());
                if let Some(held_back) = START_FAILURES.allow() {
                    tracing::warn!(source = %self.source, reason = %self.rule.reason, held_back, "{why}");
                }
                return Some((PluginStatus::Unknown, Ended::Error, self.cut(&why)));
            }
        };
        let pgid = child.id().and_then(|id| i32::try_from(id).ok());
        let stdout = Captured::start(child.stdout.take(), &self.tasks);
        let stderr = Captured::start(child.stderr.take(), &self.tasks);
        let timeout = self.rule.timeout;
        let exited = tokio::select! {
            status = child.wait() => Some(status),
            () = tokio::time::sleep(timeout) => None,
            () = self.cancel.cancelled() => {
                kill_group(pgid, libc::SIGKILL);
                let _ = tokio::time::timeout(KILL_GRACE, child.wait()).await;
                return None;
            }
        };
        let timed_out = exited.is_none();
        let (status, ended, mut why) = match exited {
            Some(Ok(exit)) => {
                let status = PluginStatus::of_exit(exit.code());
                let ended = match status {
                    PluginStatus::Ok => Ended::Ok,
                    PluginStatus::NonOk => Ended::NonOk,
                    PluginStatus::Unknown => Ended::Unknown,
                };
                let why = match (exit.code(), exit.signal()) {
                    (Some(_), _) => None,
                    (None, Some(signal)) => Some(format!("killed by signal {signal}")),
                    (None, None) => Some("ended without an exit status".to_string()),
                };
                (status, ended, why)
            }
            Some(Err(e)) => (
                PluginStatus::Unknown,
                Ended::Error,
                Some(format!("waiting for it failed: {e}")),
            ),
            None => (
                PluginStatus::Unknown,
                Ended::Timeout,
                Some(format!(
                    "timed out after {}",
                    humantime::format_duration(self.rule.timeout)
                )),
            ),
        };
        // The run ends with its process group: what the plugin left running is killed (after
        // a timeout, SIGTERM first). Usually nothing is left, at the cost of two syscalls.
        let signals: &[i32] = if timed_out {
            &[libc::SIGTERM, libc::SIGKILL]
        } else {
            &[libc::SIGKILL]
        };
        if !end_group(&mut child, pgid, signals).await {
            self.linger(child, pgid);
            let stuck = "a process of it is still running after SIGKILL (uninterruptible sleep?)";
            why = Some(match why {
                Some(why) => format!("{why}; {stuck}"),
                None => stuck.to_string(),
            });
        } else {
            self.alive.store(false, Ordering::SeqCst);
        }
        let output = stdout.take().await;
        let errors = stderr.take().await;
        if status != PluginStatus::Ok && !errors.trim().is_empty() {
            tracing::debug!(source = %self.source, reason = %self.rule.reason, stderr = %errors.trim(), "plugin stderr");
        }
        let output = output.trim();
        let message = match why {
            Some(why) if output.is_empty() => why,
            Some(why) => format!("{why}: {output}"),
            None => output.to_owned(),
        };
        Some((status, ended, self.cut(&message)))
    }

    /// A run that could not be ended (a process of it in uninterruptible sleep, NPD #1050):
    /// counted as stuck and waited for on the side, once a second, until every process of it
    /// is gone; the rule is not started again until then.
    fn linger(&self, mut child: tokio::process::Child, pgid: Option<i32>) {
        let reason = self.rule.reason.clone();
        let stuck = self
            .metrics
            .stuck
            .with_label_values(&[&self.source, &reason]);
        stuck.inc();
        if let Some(held_back) = STUCK.allow() {
            tracing::warn!(
                source = %self.source,
                reason = %reason,
                held_back,
                "plugin {} did not exit after SIGKILL (uninterruptible sleep?): reported Unknown; \
                 not started again until it is gone",
                self.rule.path.display()
            );
        }
        let alive = self.alive.clone();
        let cancel = self.cancel.clone();
        self.tasks.tracker.spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(LINGER_CHECK) => {}
                    () = cancel.cancelled() => return,
                }
                let reaped = matches!(child.try_wait(), Ok(Some(_)) | Err(_));
                if reaped && !group_alive(pgid) {
                    break;
                }
                kill_group(pgid, libc::SIGKILL);
            }
            stuck.dec();
            alive.store(false, Ordering::SeqCst);
        });
    }

    /// `message` cut to the monitor's `max_output_length` bytes, at a character boundary.
    fn cut(&self, message: &str) -> String {
        let mut end = message.len().min(self.max_output);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message[..end].to_owned()
    }
}

/// Sends `signals` in turn to a run's process group, each followed by up to [`KILL_GRACE`]
/// for the plugin and every process of its group to be gone (checked every 20 ms; the common
/// case, nothing left, returns at once without a signal). Whether all of it is gone.
async fn end_group(child: &mut tokio::process::Child, pgid: Option<i32>, signals: &[i32]) -> bool {
    let gone = |child: &mut tokio::process::Child| {
        matches!(child.try_wait(), Ok(Some(_)) | Err(_)) && !group_alive(pgid)
    };
    if gone(child) {
        return true;
    }
    for &signal in signals {
        kill_group(pgid, signal);
        let until = Instant::now() + KILL_GRACE;
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if gone(child) {
                return true;
            }
        }
    }
    false
}

/// Reaps the processes of group `pgid` that were left to the agent (it is their subreaper) and
/// have exited, and says whether any process of the group is still there. Call it only once
/// the group's leader was reaped (it would otherwise be taken from tokio).
fn group_alive(pgid: Option<i32>) -> bool {
    let Some(pgid) = pgid.filter(|p| *p > 0) else {
        return false;
    };
    loop {
        // SAFETY: waitid writes into the zeroed siginfo it is given.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PGID,
                pgid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        // SAFETY: si_pid is set by a successful waitid (0: nothing had exited).
        if r != 0 || unsafe { info.si_pid() } == 0 {
            break;
        }
    }
    // SAFETY: signal 0 only checks that the group exists.
    let r = unsafe { libc::kill(-pgid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Sends `signal` to a process group (nothing without one).
fn kill_group(pgid: Option<i32>, signal: i32) {
    if let Some(pgid) = pgid.filter(|p| *p > 0) {
        // SAFETY: a plain syscall; the group is the plugin's own (process_group(0)).
        unsafe { libc::kill(-pgid, signal) };
    }
}

/// One output stream, read in the background with a bound.
struct Captured {
    kept: Arc<Mutex<Vec<u8>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Captured {
    fn start<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
        stream: Option<R>,
        tasks: &Tasks,
    ) -> Captured {
        let kept = Arc::new(Mutex::new(Vec::new()));
        let task = stream.map(|mut stream| {
            let kept = kept.clone();
            let cancel = tasks.cancel.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                loop {
                    let n = tokio::select! {
                        n = stream.read(&mut buf) => n,
                        () = cancel.cancelled() => return,
                    };
                    let Ok(n) = n else { return };
                    if n == 0 {
                        return;
                    }
                    let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
                    let room = OUTPUT_LIMIT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            })
        });
        Captured { kept, task }
    }

    /// What was read: the stream's end, or what came within a short time after the plugin
    /// exited (a child it left behind may keep the pipe open for ever).
    async fn take(self) -> String {
        if let Some(mut task) = self.task
            && tokio::time::timeout(OUTPUT_AFTER_EXIT, &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&kept).into_owned()
    }
}
