//! The sensor: gets kernel events out of the kernel and hands them over as [`KernelEvent`]s on
//! a channel, the moment the kernel reports them (readiness-driven; no timers, no polling).
//!
//! Sources, chosen by [`SourceChoice`]:
//! * eBPF (`ebpf`): programs on `printk:console`, `sched:sched_process_hang`, `oom:mark_victim`
//!   and `block:block_rq_error` (or `block_rq_complete` on kernels without it) write into one
//!   ring buffer. A missing tracepoint disables only its own source; without `printk:console`,
//!   kernel messages come from `/dev/kmsg` beside the structured eBPF events.
//! * `/dev/kmsg` (`kmsg`): kernel messages only, with loss counted from sequence gaps.
//!
//! `auto` tries eBPF and falls back to `/dev/kmsg`, saying once and precisely why.

pub mod blockdev;
pub mod decode;
pub mod ebpf;
pub mod format;
pub mod kmsg;
pub mod supervise;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use thiserror::Error;
use tokio::{sync::mpsc, task::JoinHandle};

pub use crate::cli::SourceChoice;
use crate::event::KernelEvent;
pub use supervise::ReaderControl;

/// Registers a descriptor we own with the tokio reactor, for readability.
pub(crate) fn register_readable<T: std::os::fd::AsRawFd>(
    inner: T,
) -> std::io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `inner` owns its descriptor, and the AsyncFd owns `inner`: the descriptor is
    // neither closed nor replaced while registered.
    Ok(unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
    }?)
}

/// The default ring buffer: 4 MiB holds tens of thousands of messages of backlog (a 100,000
/// message flood at full speed arrives without a drop), and costs 8 MiB of the agent's RSS (the
/// kernel maps the data pages twice, for wrap-around).
pub const DEFAULT_RING_BUFFER_SIZE: u32 = 4 * 1024 * 1024;

/// How the sensor is set up.
#[derive(Clone, Debug)]
pub struct SensorConfig {
    /// Which source to use.
    pub source: SourceChoice,
    /// Where tracefs is, or is to be mounted.
    pub tracefs: PathBuf,
    /// The kernel log device.
    pub kmsg_path: PathBuf,
    /// eBPF ring buffer size in bytes.
    pub ring_buffer_size: u32,
    /// Capacity of the channel between the reader and the consumer. When the consumer falls
    /// behind, the reader waits and the ring buffer absorbs the burst (and counts what it
    /// cannot take): nothing is dropped silently in userspace.
    pub channel_capacity: usize,
}

impl SensorConfig {
    /// The defaults for a source.
    pub fn new(source: SourceChoice) -> Self {
        Self {
            source,
            tracefs: PathBuf::from("/sys/kernel/tracing"),
            kmsg_path: PathBuf::from("/dev/kmsg"),
            ring_buffer_size: DEFAULT_RING_BUFFER_SIZE,
            channel_capacity: 8192,
        }
    }
}

/// Why the sensor could not start.
#[derive(Debug, Error)]
pub enum SensorError {
    /// The configuration asks for something impossible: an error whatever the source.
    #[error("invalid sensor configuration: {0}")]
    Config(String),
    /// eBPF was required and cannot be used.
    #[error("eBPF source unavailable: {0}")]
    Ebpf(String),
    /// `/dev/kmsg` could not be opened.
    #[error("cannot read {path}: {source}{hint}")]
    Kmsg {
        /// The device path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// Neither source works.
    #[error("no kernel event source works: eBPF: {ebpf}; /dev/kmsg: {kmsg}")]
    NoSource {
        /// Why eBPF failed.
        ebpf: String,
        /// Why /dev/kmsg failed.
        kmsg: String,
    },
}

/// Which source is delivering events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActiveSource {
    /// eBPF tracepoints.
    Ebpf,
    /// `/dev/kmsg` only.
    Kmsg,
}

impl ActiveSource {
    /// `ebpf` or `kmsg`.
    pub fn as_str(self) -> &'static str {
        match self {
            ActiveSource::Ebpf => "ebpf",
            ActiveSource::Kmsg => "kmsg",
        }
    }
}

/// Kernel-event kinds, in the order of [`SensorStats::received`].
pub const EVENT_KINDS: [&str; 4] = ["log", "hung_task", "oom_kill", "block_error"];

/// Index of an event's kind in [`SensorStats::received`].
pub fn kind_index(event: &KernelEvent) -> usize {
    match event {
        KernelEvent::Log(_) => 0,
        KernelEvent::HungTask(_) => 1,
        KernelEvent::OomKill(_) => 2,
        KernelEvent::BlockError(_) => 3,
    }
}

/// Counters the sensor keeps while it runs; read by metrics and health at any time.
#[derive(Debug, Default)]
pub struct SensorStats {
    /// Events delivered, by kind ([`EVENT_KINDS`] order).
    pub received: [AtomicU64; 4],
    /// Records that could not be decoded.
    pub decode_errors: AtomicU64,
    /// `/dev/kmsg` records lost to log-buffer overruns (sequence gaps).
    pub kmsg_lost: AtomicU64,
    /// Times `/dev/kmsg` reported an overrun (EPIPE).
    pub kmsg_overruns: AtomicU64,
    /// False once a reader stopped (its error is in `reader_error`).
    pub reading: AtomicBool,
    /// Why a reader last stopped, if one did (kept after a restart, for the record).
    pub reader_error: Mutex<Option<String>>,
    /// Times a failed reader was restarted.
    pub reader_restarts: AtomicU64,
    /// True once a reader's input ended (a file or a pipe given as `--kmsg-path`).
    pub input_ended: AtomicBool,
}

impl SensorStats {
    pub(crate) fn reader_ended(&self, what: &str) {
        tracing::warn!("{what} reader: end of input; no more kernel messages will come from it");
        self.input_ended.store(true, Ordering::SeqCst);
        self.reading.store(false, Ordering::SeqCst);
        if let Ok(mut slot) = self.reader_error.lock() {
            *slot = Some(format!("{what} reader: end of input"));
        }
    }

    pub(crate) fn reader_failed(&self, what: &str, err: impl std::fmt::Display) {
        tracing::error!("{what} reader stopped: {err}");
        self.reading.store(false, Ordering::SeqCst);
        if let Ok(mut slot) = self.reader_error.lock() {
            *slot = Some(format!("{what} reader stopped: {err}"));
        }
    }
}

/// What the kernel side could not deliver (eBPF only), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Losses {
    /// Records the ring buffer could not take, by kind ([`EVENT_KINDS`] order).
    pub ring_full: [u64; 4],
    /// Records whose tracepoint data could not be read, by kind.
    pub read_errors: [u64; 4],
}

impl Losses {
    /// All losses together.
    pub fn total(&self) -> u64 {
        self.ring_full.iter().chain(&self.read_errors).sum()
    }
}

/// A running sensor. Dropping it detaches the programs and stops the readers.
pub struct Sensor {
    /// The decoded events, in the order each reader saw them.
    pub events: mpsc::Receiver<KernelEvent>,
    /// The active source.
    pub source: ActiveSource,
    /// Tracepoints attached (`group:name`), empty for `/dev/kmsg`.
    pub attached: Vec<String>,
    /// Tracepoints not attached, with the reason.
    pub disabled: Vec<(String, String)>,
    /// Whether kernel messages come from `/dev/kmsg` (the `kmsg` source, or eBPF without
    /// `printk:console`).
    pub kmsg_reader: bool,
    /// Live counters.
    pub stats: Arc<SensorStats>,
    control: Arc<ReaderControl>,
    loss_counters: Option<Arc<ebpf::LossCounters>>,
    ebpf: Option<ebpf::EbpfSource>,
    tasks: Vec<JoinHandle<()>>,
}

impl Sensor {
    /// Starts the sensor. Must be called within a tokio runtime.
    pub fn start(config: &SensorConfig) -> Result<Sensor, SensorError> {
        // A bad size is the caller's mistake, not a reason to fall back to /dev/kmsg.
        let size = config.ring_buffer_size;
        if !size.is_power_of_two() || size < 4096 {
            return Err(SensorError::Config(format!(
                "ring buffer size {size} is not a power of two of at least 4096 bytes"
            )));
        }
        let (tx, events) = mpsc::channel(config.channel_capacity);
        let stats = Arc::new(SensorStats::default());
        stats.reading.store(true, Ordering::SeqCst);
        let control = Arc::new(ReaderControl::default());
        let ebpf_result = match config.source {
            SourceChoice::Kmsg => None,
            SourceChoice::Ebpf | SourceChoice::Auto => Some(ebpf::EbpfSource::start(
                config,
                tx.clone(),
                stats.clone(),
                control.clone(),
            )),
        };
        let mut sensor = Sensor {
            events,
            source: ActiveSource::Kmsg,
            attached: Vec::new(),
            disabled: Vec::new(),
            kmsg_reader: false,
            stats: stats.clone(),
            control: control.clone(),
            loss_counters: None,
            ebpf: None,
            tasks: Vec::new(),
        };
        let ebpf_failure = match ebpf_result {
            Some(Ok((source, task))) => {
                sensor.source = ActiveSource::Ebpf;
                sensor.attached = source.attached.clone();
                sensor.disabled = source.disabled.clone();
                let console = source.console_attached;
                sensor.loss_counters = Some(source.loss_counters());
                sensor.ebpf = Some(source);
                sensor.tasks.push(task);
                if console {
                    return Ok(sensor);
                }
                if config.source == SourceChoice::Ebpf {
                    tracing::warn!(
                        "printk:console is not attached and --source ebpf forbids /dev/kmsg: no kernel messages"
                    );
                    return Ok(sensor);
                }
                tracing::warn!(
                    "printk:console is not attached: reading kernel messages from {}",
                    config.kmsg_path.display()
                );
                None
            }
            Some(Err(err)) if config.source == SourceChoice::Ebpf => {
                return Err(SensorError::Ebpf(err.to_string()));
            }
            Some(Err(err)) => Some(err.to_string()),
            None => None,
        };
        let reader = match kmsg::KmsgReader::open(&config.kmsg_path) {
            Ok(reader) => reader,
            Err(source) => {
                let hint = match source.raw_os_error() {
                    Some(libc::EPERM) | Some(libc::EACCES) => {
                        " (needs root or CAP_SYSLOG while kernel.dmesg_restrict=1)"
                    }
                    _ => "",
                };
                let err = SensorError::Kmsg {
                    path: config.kmsg_path.display().to_string(),
                    source,
                    hint,
                };
                return Err(match ebpf_failure {
                    Some(ebpf) => SensorError::NoSource {
                        ebpf,
                        kmsg: err.to_string(),
                    },
                    None => err,
                });
            }
        };
        if let Some(why) = &ebpf_failure {
            tracing::warn!(
                "eBPF source unavailable, falling back to {} (kernel messages only; no structured \
                 hung-task, OOM or block-error events): {why}",
                config.kmsg_path.display()
            );
        }
        sensor.kmsg_reader = true;
        let task = kmsg::KmsgTask {
            reader,
            tx,
            stats: stats.clone(),
        };
        sensor
            .tasks
            .push(supervise::spawn("/dev/kmsg", task, stats, control));
        Ok(sensor)
    }

    /// What the eBPF programs could not deliver so far (zero for `/dev/kmsg`).
    pub fn losses(&self) -> Losses {
        read_losses(self.loss_counters.as_deref())
    }

    /// Everything lost so far, from any source.
    pub fn lost_total(&self) -> u64 {
        lost_total(self.loss_counters.as_deref(), &self.stats)
    }

    /// A cheap, clonable view of the sensor's state and counters for metrics and health, valid
    /// for as long as the process runs (it does not keep the programs attached).
    pub fn probe(&self) -> SensorProbe {
        SensorProbe {
            source: self.source,
            attached: self.attached.clone().into(),
            disabled: self.disabled.clone().into(),
            kmsg_reader: self.kmsg_reader,
            stats: self.stats.clone(),
            control: self.control.clone(),
            loss_counters: self.loss_counters.clone(),
        }
    }
}

fn read_losses(counters: Option<&ebpf::LossCounters>) -> Losses {
    counters.map(ebpf::LossCounters::read).unwrap_or_default()
}

fn lost_total(counters: Option<&ebpf::LossCounters>, stats: &SensorStats) -> u64 {
    read_losses(counters).total() + stats.kmsg_lost.load(Ordering::Relaxed)
}

/// What metrics and health read from a running sensor, at the moment they are asked (nothing
/// polls). Obtained with [`Sensor::probe`].
#[derive(Clone)]
pub struct SensorProbe {
    /// The active source.
    pub source: ActiveSource,
    /// Tracepoints attached (`group:name`).
    pub attached: Arc<[String]>,
    /// Tracepoints not attached, with the reason.
    pub disabled: Arc<[(String, String)]>,
    /// Whether kernel messages come from `/dev/kmsg`.
    pub kmsg_reader: bool,
    /// Live counters.
    pub stats: Arc<SensorStats>,
    control: Arc<ReaderControl>,
    loss_counters: Option<Arc<ebpf::LossCounters>>,
}

impl std::fmt::Debug for SensorProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SensorProbe")
            .field("source", &self.source)
            .field("attached", &self.attached)
            .field("kmsg_reader", &self.kmsg_reader)
            .finish_non_exhaustive()
    }
}

impl SensorProbe {
    /// A probe of counters without a running sensor (tests, tools that count by hand).
    pub fn detached(source: ActiveSource, stats: Arc<SensorStats>) -> Self {
        SensorProbe {
            source,
            attached: Arc::from([]),
            disabled: Arc::from([]),
            kmsg_reader: source == ActiveSource::Kmsg,
            stats,
            control: Arc::new(ReaderControl::default()),
            loss_counters: None,
        }
    }

    /// What the eBPF programs could not deliver so far (zero for `/dev/kmsg`); one map read.
    pub fn losses(&self) -> Losses {
        read_losses(self.loss_counters.as_deref())
    }

    /// Everything lost so far, from any source.
    pub fn lost_total(&self) -> u64 {
        lost_total(self.loss_counters.as_deref(), &self.stats)
    }

    /// Whether a reader task is running now.
    pub fn reading(&self) -> bool {
        self.stats.reading.load(Ordering::SeqCst)
    }

    /// Why the reader last stopped, if it ever did.
    pub fn reader_error(&self) -> Option<String> {
        self.stats.reader_error.lock().ok().and_then(|e| e.clone())
    }

    /// Fault injection: kills the running reader(s) and keeps them down for `down_for`. Only
    /// reachable through `--debug-endpoints`; see [`supervise`].
    pub fn kill_reader(&self, down_for: std::time::Duration) {
        self.control.kill(down_for);
    }
}

impl Drop for Sensor {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
