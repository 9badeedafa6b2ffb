//! The eBPF source: mounts tracefs when needed, reads the tracepoint formats, loads the
//! embedded programs with the offsets they need, attaches what the kernel has, and reads the
//! ring buffer whenever it becomes readable.

use std::{
    fmt::Write as _,
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use npd_common::{LossReason, ProgramConfig, RecordKind, loss_slot};
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};

use super::{
    Losses, ReaderControl, SensorConfig, SensorStats,
    decode::{self, Layouts},
    format::TracepointFormat,
    supervise,
};
use crate::event::KernelEvent;

/// The compiled programs, built by `build.rs` from `npd-ebpf`.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/npd"));

/// One tracepoint npd can attach to.
struct Probe {
    /// Program name in the object.
    program: &'static str,
    /// Tracepoint group and name.
    group: &'static str,
    name: &'static str,
    /// Attached only when this other probe could not be (a fallback).
    fallback_for: Option<&'static str>,
}

/// The loader table: what npd attaches, in order.
const PROBES: [Probe; 5] = [
    Probe {
        program: "console",
        group: "printk",
        name: "console",
        fallback_for: None,
    },
    Probe {
        program: "sched_process_hang",
        group: "sched",
        name: "sched_process_hang",
        fallback_for: None,
    },
    Probe {
        program: "mark_victim",
        group: "oom",
        name: "mark_victim",
        fallback_for: None,
    },
    Probe {
        program: "block_rq_error",
        group: "block",
        name: "block_rq_error",
        fallback_for: None,
    },
    Probe {
        program: "block_rq_complete",
        group: "block",
        name: "block_rq_complete",
        fallback_for: Some("block_rq_error"),
    },
];

/// Loaded and attached programs. Dropping it detaches them.
pub struct EbpfSource {
    /// Attached tracepoints, `group:name`.
    pub attached: Vec<String>,
    /// Tracepoints not attached, with the reason.
    pub disabled: Vec<(String, String)>,
    /// Whether `printk:console` is attached.
    pub console_attached: bool,
    losses: Arc<LossCounters>,
    // Keeps the programs loaded and attached; the maps we use were taken out of it.
    _ebpf: Ebpf,
    // Dropped after the programs: the tracefs npd mounted, if it did.
    _tracefs: Option<TracefsMount>,
}

/// The programs' per-CPU loss counters (the `LOSSES` map). Shared with metrics and health,
/// which read it when asked; holding it does not keep the programs attached.
pub struct LossCounters {
    map: Mutex<PerCpuArray<MapData, u64>>,
}

impl LossCounters {
    /// Sums the per-CPU loss counters (one map lookup per slot).
    pub fn read(&self) -> Losses {
        let mut out = Losses::default();
        let Ok(map) = self.map.lock() else { return out };
        let kinds = [
            (0, RecordKind::Console),
            (1, RecordKind::HungTask),
            (2, RecordKind::OomVictim),
            (3, RecordKind::BlockError),
            (3, RecordKind::BlockComplete),
        ];
        for (index, kind) in kinds {
            let sum = |reason| {
                map.get(&loss_slot(kind, reason), 0)
                    .map(|values| values.iter().sum::<u64>())
                    .unwrap_or(0)
            };
            out.ring_full[index] += sum(LossReason::RingFull);
            out.read_errors[index] += sum(LossReason::ReadError);
        }
        out
    }
}

/// The ring-buffer reader, restarted by [`supervise`] on the same ring after a failure.
struct RingReader {
    ring: AsyncFd<RingBuf<MapData>>,
    layouts: Layouts,
    tx: mpsc::Sender<KernelEvent>,
    stats: Arc<SensorStats>,
}

impl supervise::Reader for RingReader {
    fn run(
        &mut self,
    ) -> impl std::future::Future<Output = std::io::Result<supervise::Finished>> + Send + '_ {
        read_ring(&mut self.ring, &self.layouts, &self.tx, &self.stats)
    }
}

impl EbpfSource {
    /// Loads, attaches and starts reading. Errors say precisely what is missing.
    pub fn start(
        config: &SensorConfig,
        tx: mpsc::Sender<KernelEvent>,
        stats: Arc<SensorStats>,
        control: Arc<ReaderControl>,
    ) -> anyhow::Result<(EbpfSource, JoinHandle<()>)> {
        use anyhow::Context as _;

        if PROGRAMS.is_empty() {
            anyhow::bail!(
                "this binary was built without its eBPF programs (AYA_BUILD_SKIP was set)"
            );
        }
        let tracefs = ensure_tracefs(&config.tracefs)?;
        raise_memlock_limit();

        // Formats first: they decide what can be attached and how records are decoded.
        let mut program_config = ProgramConfig::unknown();
        let mut layouts = Layouts::default();
        let mut usable = Vec::new();
        let mut disabled = Vec::new();
        for probe in &PROBES {
            if let Some(primary) = probe.fallback_for
                && usable.iter().any(|p: &&Probe| p.name == primary)
            {
                continue;
            }
            let path = config
                .tracefs
                .join("events")
                .join(probe.group)
                .join(probe.name)
                .join("format");
            let outcome = TracepointFormat::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|format| {
                    apply_format(probe, &format, &mut program_config, &mut layouts)
                        .map_err(|e| e.to_string())
                });
            match outcome {
                Ok(()) => usable.push(probe),
                Err(why) => disabled.push((format!("{}:{}", probe.group, probe.name), why)),
            }
        }

        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &program_config, true)
            .map_max_entries("EVENTS", config.ring_buffer_size)
            .load(PROGRAMS)
            .map_err(|e| explain_load_error(&e))?;

        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_logger(logger),
            Err(e) => tracing::warn!("eBPF program diagnostics unavailable: {e}"),
        }

        let mut attached = Vec::new();
        for probe in usable {
            let name = format!("{}:{}", probe.group, probe.name);
            match attach(&mut ebpf, probe) {
                Ok(()) => attached.push(name),
                Err(why) => disabled.push((name, why)),
            }
        }
        for (name, why) in &disabled {
            tracing::warn!("tracepoint {name} disabled: {why}");
        }
        if attached.is_empty() {
            anyhow::bail!("no tracepoint could be attached");
        }

        let ring = RingBuf::try_from(
            ebpf.take_map("EVENTS")
                .context("map EVENTS missing from the eBPF object")?,
        )
        .context("opening the EVENTS ring buffer")?;
        let losses = PerCpuArray::try_from(
            ebpf.take_map("LOSSES")
                .context("map LOSSES missing from the eBPF object")?,
        )
        .context("opening the LOSSES counters")?;
        let ring = super::register_readable(ring)
            .context("registering the ring buffer with the reactor")?;

        let reader = RingReader {
            ring,
            layouts,
            tx,
            stats: stats.clone(),
        };
        let task = supervise::spawn("eBPF ring buffer", reader, stats, control);
        let console_attached = attached.iter().any(|a| a == "printk:console");
        let losses = Arc::new(LossCounters {
            map: Mutex::new(losses),
        });
        Ok((
            EbpfSource {
                attached,
                disabled,
                console_attached,
                losses,
                _ebpf: ebpf,
                _tracefs: tracefs,
            },
            task,
        ))
    }

    /// Sums the per-CPU loss counters.
    pub fn losses(&self) -> Losses {
        self.losses.read()
    }

    /// The loss counters, to read later without this source.
    pub fn loss_counters(&self) -> Arc<LossCounters> {
        self.losses.clone()
    }
}

/// Takes what a probe needs from its tracepoint format.
fn apply_format(
    probe: &Probe,
    format: &TracepointFormat,
    program_config: &mut ProgramConfig,
    layouts: &mut Layouts,
) -> Result<(), super::format::FieldError> {
    match probe.program {
        "console" => program_config.console_msg_loc_offset = format.require("msg")?.offset as u32,
        "sched_process_hang" => layouts.set_hung_task(format)?,
        "mark_victim" => layouts.set_oom(format)?,
        "block_rq_error" => layouts.set_block(format)?,
        "block_rq_complete" => {
            program_config.block_complete_error_offset = format.require("error")?.offset as u32;
            layouts.set_block(format)?;
        }
        _ => {}
    }
    Ok(())
}

fn attach(ebpf: &mut Ebpf, probe: &Probe) -> Result<(), String> {
    let program: &mut TracePoint = ebpf
        .program_mut(probe.program)
        .ok_or_else(|| format!("program {} missing from the eBPF object", probe.program))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    program
        .load()
        .map_err(|e| format!("loading: {}", chain(&e)))?;
    program
        .attach(probe.group, probe.name)
        .map_err(|e| format!("attaching: {}", chain(&e)))?;
    Ok(())
}

/// Reads the ring buffer each time it becomes readable, until the receiver goes away.
async fn read_ring(
    ring: &mut AsyncFd<RingBuf<MapData>>,
    layouts: &Layouts,
    tx: &mpsc::Sender<KernelEvent>,
    stats: &SensorStats,
) -> std::io::Result<supervise::Finished> {
    loop {
        let mut guard = ring.readable_mut().await?;
        loop {
            let decoded = {
                let Some(item) = guard.get_inner_mut().next() else {
                    break;
                };
                decode::decode(&item, layouts)
            };
            match decoded {
                Ok(event) => {
                    stats.received[super::kind_index(&event)].fetch_add(1, Ordering::Relaxed);
                    if tx.send(event).await.is_err() {
                        return Ok(supervise::Finished::ConsumerGone);
                    }
                }
                Err(err) => {
                    let n = stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                    if n < 10 {
                        tracing::warn!("undecodable eBPF record (counted): {err}");
                    }
                }
            }
        }
        guard.clear_ready();
    }
}

fn spawn_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    match super::register_readable(logger) {
        Ok(mut logger) => {
            tokio::spawn(async move {
                while let Ok(mut guard) = logger.readable_mut().await {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(e) => tracing::warn!("eBPF program diagnostics unavailable: {e}"),
    }
}

/// The standard place of tracefs, where npd may mount it.
pub const STANDARD_TRACEFS: &str = "/sys/kernel/tracing";

/// A tracefs npd mounted itself: unmounted when dropped (after the programs are detached).
struct TracefsMount(std::ffi::CString);

impl Drop for TracefsMount {
    fn drop(&mut self) {
        // SAFETY: a valid NUL-terminated path; MNT_DETACH never blocks on users of the mount.
        let rc = unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
        let dir = self.0.to_string_lossy();
        if rc == 0 {
            tracing::info!("unmounted the tracefs npd mounted at {dir}");
        } else {
            tracing::warn!(
                "could not unmount the tracefs npd mounted at {dir}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Makes sure tracefs is at `dir`: uses it when `dir/events` is there, else mounts it, but only
/// at the standard path or on an empty directory (never over a directory that holds something
/// else). Returns the mount to undo when npd made it.
fn ensure_tracefs(dir: &Path) -> anyhow::Result<Option<TracefsMount>> {
    if dir.join("events").is_dir() {
        return Ok(None);
    }
    if dir != Path::new(STANDARD_TRACEFS) {
        let mut entries = std::fs::read_dir(dir).map_err(|e| {
            anyhow::anyhow!(
                "--tracefs {}: not tracefs, and not a directory npd can mount it on: {e}",
                dir.display()
            )
        })?;
        if entries.next().is_some() {
            anyhow::bail!(
                "--tracefs {}: not tracefs (no events/ in it) and not empty; npd mounts tracefs \
                 only at {STANDARD_TRACEFS} or on an empty directory",
                dir.display()
            );
        }
    }
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        let hint = match err.raw_os_error() {
            Some(libc::EPERM) => {
                " (needs root or CAP_SYS_ADMIN; or mount it: mount -t tracefs nodev /sys/kernel/tracing)"
            }
            _ => "",
        };
        anyhow::bail!(
            "tracefs is not mounted at {} and mounting it failed: {err}{hint}",
            dir.display()
        );
    }
    tracing::info!("mounted tracefs at {} (unmounted at exit)", dir.display());
    Ok(Some(TracefsMount(target)))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it (harmless on newer ones).
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Turns an aya load error into a sentence that names what is missing.
fn explain_load_error(err: &aya::EbpfError) -> anyhow::Error {
    let text = chain(err);
    let hint = if text.contains("Operation not permitted") || text.contains("EPERM") {
        ": permission denied; loading eBPF needs root, or CAP_BPF and CAP_PERFMON \
         (CAP_SYS_ADMIN on kernels before 5.8)"
    } else if text.contains("Invalid argument") && text.contains("EVENTS") {
        ": the kernel rejected the ring buffer (BPF_MAP_TYPE_RINGBUF needs Linux 5.8 or later)"
    } else {
        ""
    };
    anyhow::anyhow!("loading the eBPF object failed: {text}{hint}")
}

/// An error and its sources on one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let _ = write!(out, ": {e}");
        source = e.source();
    }
    out
}
