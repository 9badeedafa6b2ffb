//! The sensor: gets kernel events out of the kernel and hands them over in bursts (one message
//! per readiness wake-up, whatever the number of events in it), the moment the kernel reports
//! them (readiness-driven; no timers, no polling).
//!
//! Sources, chosen by [`SourceChoice`]:
//! * eBPF (`ebpf`): programs on `printk:console`, `sched:sched_process_hang`, `oom:mark_victim`
//!   and `block:block_rq_error` (or `block_rq_complete` on kernels without it) write into one
//!   ring buffer. A missing tracepoint disables only its own source; without `printk:console`,
//!   kernel messages come from `/dev/kmsg` beside the structured eBPF events.
//! * `/dev/kmsg` (`kmsg`): kernel messages only, with loss counted from sequence gaps.
//!
//! `auto` tries eBPF and falls back to `/dev/kmsg`, saying once and precisely why.

pub(crate) mod blockdev;
pub(crate) mod btf;
pub mod decode;
pub(crate) mod ebpf;
pub mod format;
pub mod kmsg;
pub(crate) mod stats;
pub(crate) mod supervise;

use std::{path::PathBuf, sync::Arc};

use thiserror::Error;
use tokio::sync::mpsc;

pub use self::stats::{Losses, SensorMetrics, SensorSnapshot, SensorStats};
use crate::{event::KernelEvent, tasks::Tasks};
pub use supervise::ReaderControl;

/// Where kernel events come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceChoice {
    /// eBPF when it can be used, else `/dev/kmsg`.
    #[default]
    Auto,
    /// eBPF only; fail when it cannot be used.
    Ebpf,
    /// `/dev/kmsg` only (kernel messages; no structured events).
    Kmsg,
}

/// The events one wake-up of a reader found, in the order the kernel reported them.
///
/// A batch from the ring buffer holds its reader's one in-flight permit until the consumer
/// drops it: the reader takes nothing more from the ring while the consumer works, so records
/// wait there, and the kernel, which wakes the reader only when it has caught up, does not wake
/// it once per record (see `ebpf::read_ring`).
#[derive(Debug, Default)]
pub struct Batch {
    events: Vec<KernelEvent>,
    _in_flight: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch that holds `permit` until it is dropped.
    pub(crate) fn in_flight(permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        Batch {
            events: Vec::new(),
            _in_flight: Some(permit),
        }
    }
}

impl From<Vec<KernelEvent>> for Batch {
    fn from(events: Vec<KernelEvent>) -> Self {
        Batch {
            events,
            _in_flight: None,
        }
    }
}

impl std::ops::Deref for Batch {
    type Target = Vec<KernelEvent>;

    fn deref(&self) -> &Vec<KernelEvent> {
        &self.events
    }
}

impl std::ops::DerefMut for Batch {
    fn deref_mut(&mut self) -> &mut Vec<KernelEvent> {
        &mut self.events
    }
}

impl IntoIterator for Batch {
    type Item = KernelEvent;
    type IntoIter = std::vec::IntoIter<KernelEvent>;

    fn into_iter(self) -> Self::IntoIter {
        self.events.into_iter()
    }
}

impl<'a> IntoIterator for &'a Batch {
    type Item = &'a KernelEvent;
    type IntoIter = std::slice::Iter<'a, KernelEvent>;

    fn into_iter(self) -> Self::IntoIter {
        self.events.iter()
    }
}

impl<'a> IntoIterator for &'a mut Batch {
    type Item = &'a mut KernelEvent;
    type IntoIter = std::slice::IterMut<'a, KernelEvent>;

    fn into_iter(self) -> Self::IntoIter {
        self.events.iter_mut()
    }
}

/// Kernel text as a `String`, bytes that are not UTF-8 replaced. Kernel text is nearly always
/// valid (ASCII): checked at memory speed first, converted chunk by chunk only when it is not
/// (`String::from_utf8_lossy` alone costs a tenth of the agent's CPU in a flood).
pub(crate) fn kernel_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// [`kernel_text`] of bytes already owned: valid text is kept without a copy.
pub(crate) fn kernel_string(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

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

/// The default ring buffer: 1 MiB. The reader keeps at most one burst in flight and takes
/// the ring every millisecond of a flood, so a flood at full speed (about 500,000 lines a
/// second here) keeps about 100 KiB waiting; 512 KiB already took three 101k-line floods at
/// that speed without a drop (`npd-test-hog kmsg`), and 1 MiB holds some 10 ms of such a
/// flood while the agent is not scheduled. It costs 2 MiB of the agent's RSS (the kernel maps the data
/// pages twice, for wrap-around); 4 MiB cost 8. A node whose floods outrun it shows
/// `npd_kernel_events_lost_total{reason="ring_buffer_full"}` and raises `--ring-buffer-size`.
pub const DEFAULT_RING_BUFFER_SIZE: u32 = 1024 * 1024;

/// The smallest and largest ring buffer: a power of two from one page to 1 GiB (the kernel's
/// rule for a BPF ring buffer, which must also be a multiple of the page size).
pub const RING_BUFFER_SIZES: (u32, u32) = (4096, 1 << 30);

/// Checks a ring buffer size; the error says what is allowed.
pub fn check_ring_buffer_size(n: u32) -> Result<u32, String> {
    let (min, max) = RING_BUFFER_SIZES;
    if !n.is_power_of_two() || n < min || n > max {
        return Err(format!(
            "{n} is not a power of two from {min} to {max} bytes (e.g. 4194304 for 4 MiB)"
        ));
    }
    Ok(n)
}

/// How the sensor is set up.
#[derive(Clone, Debug)]
pub struct SensorConfig {
    /// Which source to use.
    pub source: SourceChoice,
    /// Where tracefs is, or is to be mounted.
    pub tracefs: PathBuf,
    /// The kernel log device.
    pub kmsg_path: PathBuf,
    /// eBPF ring buffer size in bytes (see [`check_ring_buffer_size`]).
    pub ring_buffer_size: u32,
    /// How many bursts may wait between the readers and the consumer. When the consumer falls
    /// behind, the reader waits and the ring buffer absorbs the burst (and counts what it
    /// cannot take): nothing is dropped silently in userspace.
    pub channel_capacity: usize,
}

impl SensorConfig {
    /// The defaults for a source.
    pub fn new(source: SourceChoice) -> Self {
        Self {
            source,
            tracefs: PathBuf::from(ebpf::STANDARD_TRACEFS),
            kmsg_path: PathBuf::from("/dev/kmsg"),
            ring_buffer_size: DEFAULT_RING_BUFFER_SIZE,
            channel_capacity: 64,
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

/// A cheap, clonable view of a sensor's state and counters, for metrics, health and the
/// stats line, read when asked (nothing polls). Valid for as long as the process runs; holding
/// it does not keep the programs attached.
#[derive(Clone)]
pub struct SensorView {
    /// The active source.
    pub source: ActiveSource,
    /// Tracepoints attached (`group:name`).
    pub attached: Arc<[String]>,
    /// Tracepoints not attached, with the reason.
    pub disabled: Arc<[(String, String)]>,
    /// Whether kernel messages come from `/dev/kmsg` (the `kmsg` source, or eBPF without
    /// `printk:console`).
    pub kmsg_reader: bool,
    /// Live counters.
    pub stats: Arc<SensorStats>,
    control: Arc<ReaderControl>,
    loss_counters: Option<Arc<ebpf::LossCounters>>,
}

impl std::fmt::Debug for SensorView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SensorView")
            .field("source", &self.source)
            .field("attached", &self.attached)
            .field("kmsg_reader", &self.kmsg_reader)
            .finish_non_exhaustive()
    }
}

impl SensorView {
    /// A view of counters without a running sensor (tests, tools that count by hand).
    pub fn detached(source: ActiveSource, stats: Arc<SensorStats>) -> Self {
        SensorView {
            source,
            attached: Arc::from([]),
            disabled: Arc::from([]),
            kmsg_reader: source == ActiveSource::Kmsg,
            stats,
            control: Arc::new(ReaderControl::default()),
            loss_counters: None,
        }
    }

    /// Everything now, in one value: the eBPF loss counters are read once (one map lookup
    /// per slot).
    pub fn snapshot(&self) -> SensorSnapshot {
        let m = &self.stats.metrics;
        SensorSnapshot {
            source: self.source.as_str(),
            attached: self.attached.to_vec(),
            disabled: self.disabled.to_vec(),
            kmsg_reader: self.kmsg_reader,
            reading: self.stats.reading(),
            reader_error: self.stats.reader_error(),
            reader_restarts: m.reader_restarts.get(),
            received: crate::event::PerKind::from_fn(|k| m.received[k].get()),
            losses: self.losses(),
            kmsg_lost: m.kmsg_lost.get(),
            kmsg_overruns: m.kmsg_overruns.get(),
            decode_errors: m.decode_errors.get(),
        }
    }

    /// What the eBPF programs could not deliver so far (zero for `/dev/kmsg`).
    pub fn losses(&self) -> Losses {
        self.loss_counters
            .as_deref()
            .map(ebpf::LossCounters::read)
            .unwrap_or_default()
    }

    /// Everything lost so far, from any source.
    pub fn lost_total(&self) -> u64 {
        self.losses().total() + self.stats.metrics.kmsg_lost.get()
    }

    /// Registers the sensor's metrics: its counters, which source and tracepoints are in use,
    /// and the eBPF loss counters (read at scrape time).
    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        let m = &self.stats.metrics;
        m.register(registry)?;
        for candidate in [ActiveSource::Ebpf, ActiveSource::Kmsg] {
            m.source
                .with_label_values(&[candidate.as_str()])
                .set(i64::from(self.source == candidate));
        }
        for tp in self.attached.iter() {
            m.tracepoint_attached.with_label_values(&[tp]).set(1);
        }
        for (tp, _) in self.disabled.iter() {
            m.tracepoint_attached.with_label_values(&[tp]).set(0);
        }
        if let Some(counters) = &self.loss_counters {
            registry.register(Box::new(stats::LossCollector::new(counters.clone())?))?;
        }
        Ok(())
    }

    /// Fault injection: kills the running reader(s) and keeps them down for `down_for`. Only
    /// reachable through `--debug-endpoints`; see [`supervise`].
    pub fn kill_reader(&self, down_for: std::time::Duration) {
        self.control.kill(down_for);
    }
}

/// A running sensor. [`Sensor::stop`] stops its readers; dropping it detaches the programs.
pub struct Sensor {
    /// The decoded events, a burst at a time.
    pub events: mpsc::Receiver<Batch>,
    /// Its state and counters.
    pub view: SensorView,
    ebpf: Option<ebpf::EbpfSource>,
    tasks: Tasks,
}

impl Sensor {
    /// Starts the sensor. Must be called within a tokio runtime.
    pub fn start(config: &SensorConfig) -> Result<Sensor, SensorError> {
        // A bad size is the caller's mistake, not a reason to fall back to /dev/kmsg.
        check_ring_buffer_size(config.ring_buffer_size).map_err(SensorError::Config)?;
        let (tx, events) = mpsc::channel(config.channel_capacity.max(1));
        let stats = Arc::new(SensorStats::default());
        stats.reader_running();
        let control = Arc::new(ReaderControl::default());
        let tasks = Tasks::default();
        let readers = supervise::Readers {
            stats: stats.clone(),
            control: control.clone(),
            tasks: tasks.clone(),
        };
        let ebpf_result = match config.source {
            SourceChoice::Kmsg => None,
            SourceChoice::Ebpf | SourceChoice::Auto => {
                Some(ebpf::EbpfSource::start(config, tx.clone(), &readers))
            }
        };
        let mut sensor = Sensor {
            events,
            view: SensorView {
                source: ActiveSource::Kmsg,
                attached: Arc::from([]),
                disabled: Arc::from([]),
                kmsg_reader: false,
                stats: stats.clone(),
                control,
                loss_counters: None,
            },
            ebpf: None,
            tasks,
        };
        let ebpf_failure = match ebpf_result {
            Some(Ok(source)) => {
                sensor.view.source = ActiveSource::Ebpf;
                sensor.view.attached = source.attached.clone().into();
                sensor.view.disabled = source.disabled.clone().into();
                sensor.view.loss_counters = Some(source.loss_counters());
                let console = source.console_attached;
                sensor.ebpf = Some(source);
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
        sensor.view.kmsg_reader = true;
        readers.spawn("/dev/kmsg", kmsg::KmsgTask { reader, tx, stats });
        Ok(sensor)
    }

    /// Stops the readers and waits for them, at most `limit`. What they already delivered
    /// stays in [`Sensor::events`].
    pub async fn stop(&self, limit: std::time::Duration) {
        self.tasks.stop(limit, "the sensor's readers").await;
    }
}

impl Drop for Sensor {
    fn drop(&mut self) {
        // Readers that were not stopped stop now; the programs are detached with `ebpf`.
        self.tasks.cancel.cancel();
    }
}
