//! The eBPF source: mounts tracefs when needed, reads the tracepoint formats, loads the
//! embedded programs with the offsets they need, attaches what the kernel has, and reads the
//! ring buffer whenever it becomes readable.

use std::{
    fmt::Write as _,
    path::Path,
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{RawTracePoint, TracePoint},
};
use npd_common::{CgroupWalk, LossReason, ProgramConfig, RecordKind, loss_slot};
use tokio::{
    io::unix::AsyncFd,
    sync::{Semaphore, mpsc},
};

use super::{
    Batch, Losses, SensorConfig, SensorStats,
    btf::Btf,
    decode::{self, Decoded, Layouts},
    format::TracepointFormat,
    supervise::{self, Readers},
};

/// The compiled programs, built by `build.rs` from `npd-ebpf`.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/npd"));

/// One tracepoint npd can attach to: a row of the loader table.
struct TracepointSpec {
    /// Program name in the object.
    program: &'static str,
    /// Tracepoint group and name.
    group: &'static str,
    name: &'static str,
    /// Attached only when this other tracepoint could not be (a fallback).
    fallback_for: Option<&'static str>,
}

/// The loader table: what npd attaches, in order.
const TRACEPOINTS: [TracepointSpec; 5] = [
    TracepointSpec {
        program: "console",
        group: "printk",
        name: "console",
        fallback_for: None,
    },
    TracepointSpec {
        program: "sched_process_hang",
        group: "sched",
        name: "sched_process_hang",
        fallback_for: None,
    },
    TracepointSpec {
        program: "mark_victim",
        group: "oom",
        name: "mark_victim",
        fallback_for: None,
    },
    TracepointSpec {
        program: "block_rq_error",
        group: "block",
        name: "block_rq_error",
        fallback_for: None,
    },
    TracepointSpec {
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
    /// Sums the per-CPU loss counters (one map lookup per slot), by the kind of event each
    /// record would have been.
    pub fn read(&self) -> Losses {
        let mut out = Losses::default();
        let Ok(map) = self.map.lock() else { return out };
        for record in RecordKind::ALL {
            let kind = decode::event_kind(record);
            let sum = |reason| {
                map.get(&loss_slot(record, reason), 0)
                    .map(|values| values.iter().sum::<u64>())
                    .unwrap_or(0)
            };
            out.ring_full[kind] += sum(LossReason::RingFull);
            out.read_errors[kind] += sum(LossReason::ReadError);
        }
        out
    }
}

/// The ring-buffer reader, restarted by [`supervise`] on the same ring after a failure.
struct RingReader {
    ring: AsyncFd<RingBuf<MapData>>,
    layouts: Layouts,
    tx: mpsc::Sender<Batch>,
    stats: Arc<SensorStats>,
    /// One permit: the batch the consumer works on holds it.
    in_flight: Arc<Semaphore>,
}

impl supervise::Reader for RingReader {
    fn run(
        &mut self,
    ) -> impl std::future::Future<Output = std::io::Result<supervise::Finished>> + Send + '_ {
        read_ring(
            &mut self.ring,
            &self.layouts,
            &self.tx,
            &self.stats,
            &self.in_flight,
        )
    }
}

impl EbpfSource {
    /// Loads, attaches and starts reading. Errors say precisely what is missing.
    pub(crate) fn start(
        config: &SensorConfig,
        tx: mpsc::Sender<Batch>,
        readers: &Readers,
    ) -> anyhow::Result<EbpfSource> {
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
        for tp in &TRACEPOINTS {
            if let Some(primary) = tp.fallback_for
                && usable.iter().any(|p: &&TracepointSpec| p.name == primary)
            {
                continue;
            }
            let path = config
                .tracefs
                .join("events")
                .join(tp.group)
                .join(tp.name)
                .join("format");
            let outcome = TracepointFormat::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|format| {
                    apply_format(tp, &format, &mut program_config, &mut layouts)
                        .map_err(|e| e.to_string())
                });
            match outcome {
                Ok(()) => usable.push(tp),
                Err(why) => disabled.push((format!("{}:{}", tp.group, tp.name), why)),
            }
        }

        // The OOM victim's memory cgroup, walked in the kernel (see `victim_cgroup_offsets`).
        let victim_cgroup = if usable.iter().any(|tp| tp.program == "mark_victim") {
            match Btf::vmlinux()
                .ok_or_else(|| "no BTF at /sys/kernel/btf/vmlinux".to_string())
                .and_then(|btf| victim_cgroup_offsets(&btf))
            {
                Ok(walk) => {
                    program_config.cgroup_walk = walk;
                    true
                }
                Err(why) => {
                    tracing::info!(
                        "OOM victims' memory cgroups are read from the kernel's oom-kill line or \
                         /proc/<pid>/cgroup, not walked at mark_victim: {why}"
                    );
                    false
                }
            }
        } else {
            false
        };

        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &program_config, true)
            .map_max_entries("EVENTS", config.ring_buffer_size)
            .load(PROGRAMS)
            .map_err(|e| explain_load_error(&e))?;

        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_logger(logger, readers),
            Err(e) => tracing::warn!("eBPF program diagnostics unavailable: {e}"),
        }

        // Before oom:mark_victim: the kernel calls a tracepoint's probes in the order they were
        // attached, so the victim's cgroup comes just before the victim.
        if victim_cgroup && let Err(why) = attach_victim_cgroup(&mut ebpf) {
            tracing::warn!(
                "OOM victims' memory cgroups are read from the kernel's oom-kill line or \
                 /proc/<pid>/cgroup: the mark_victim raw tracepoint program failed: {why}"
            );
        }
        let mut attached = Vec::new();
        for tp in usable {
            let name = format!("{}:{}", tp.group, tp.name);
            match attach(&mut ebpf, tp) {
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
            stats: readers.stats.clone(),
            in_flight: Arc::new(Semaphore::new(1)),
        };
        readers.spawn("eBPF ring buffer", reader);
        let console_attached = attached.iter().any(|a| a == "printk:console");
        let losses = Arc::new(LossCounters {
            map: Mutex::new(losses),
        });
        Ok(EbpfSource {
            attached,
            disabled,
            console_attached,
            losses,
            _ebpf: ebpf,
            _tracefs: tracefs,
        })
    }

    /// The loss counters, to read later without this source.
    pub fn loss_counters(&self) -> Arc<LossCounters> {
        self.losses.clone()
    }
}

/// Takes what a tracepoint's program and decoder need from its format.
fn apply_format(
    tp: &TracepointSpec,
    format: &TracepointFormat,
    program_config: &mut ProgramConfig,
    layouts: &mut Layouts,
) -> Result<(), super::format::FieldError> {
    match tp.program {
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

fn attach(ebpf: &mut Ebpf, tp: &TracepointSpec) -> Result<(), String> {
    let program: &mut TracePoint = ebpf
        .program_mut(tp.program)
        .ok_or_else(|| format!("program {} missing from the eBPF object", tp.program))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    program
        .load()
        .map_err(|e| format!("loading: {}", chain(&e)))?;
    program
        .attach(tp.group, tp.name)
        .map_err(|e| format!("attaching: {}", chain(&e)))?;
    Ok(())
}

/// Where an OOM victim's memory cgroup is, from the kernel's BTF, for the `victim_cgroup`
/// raw tracepoint program: `task_struct.cgroups` → `css_set.subsys[memory_cgrp_id]` →
/// `cgroup_subsys_state.cgroup` → `cgroup.kn`, then `kernfs_node.name` and `.parent` up to the
/// root. The raw tracepoint's first argument must be the victim's `struct task_struct *`
/// (`mark_victim(struct task_struct *task, uid_t uid)`, since 6.8 and in some stable kernels;
/// before that it passed only the pid). Says what is missing otherwise.
pub(crate) fn victim_cgroup_offsets(btf: &Btf) -> Result<CgroupWalk, String> {
    if !btf.raw_tracepoint_arg_is("mark_victim", 0, "task_struct") {
        return Err("this kernel's mark_victim does not pass the victim's task".into());
    }
    let member = |s: &str, m: &str| {
        btf.member_offset(s, m)
            .ok_or_else(|| format!("the kernel's BTF has no {s}.{m}"))
    };
    let memory = btf
        .enum_value("cgroup_subsys_id", "memory_cgrp_id")
        .and_then(|id| u32::try_from(id).ok())
        .ok_or("the kernel has no memory cgroup controller (memory_cgrp_id)")?;
    let subsys = member("css_set", "subsys")?;
    Ok(CgroupWalk {
        task_pid: member("task_struct", "pid")?,
        task_cgroups: member("task_struct", "cgroups")?,
        css_set_memory: memory
            .checked_mul(8)
            .and_then(|o| o.checked_add(subsys))
            .ok_or("memory_cgrp_id out of range")?,
        css_cgroup: member("cgroup_subsys_state", "cgroup")?,
        cgroup_kn: member("cgroup", "kn")?,
        kn_name: member("kernfs_node", "name")?,
        // Renamed `__parent` in 6.15 (it became RCU-protected).
        kn_parent: member("kernfs_node", "parent")
            .or_else(|_| member("kernfs_node", "__parent"))?,
    })
}

fn attach_victim_cgroup(ebpf: &mut Ebpf) -> Result<(), String> {
    let program: &mut RawTracePoint = ebpf
        .program_mut("victim_cgroup")
        .ok_or("program victim_cgroup missing from the eBPF object")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    program
        .load()
        .map_err(|e| format!("loading: {}", chain(&e)))?;
    program
        .attach("mark_victim")
        .map_err(|e| format!("attaching: {}", chain(&e)))?;
    Ok(())
}

/// The most records handed over in one burst: a flood is handed over in bursts of this many,
/// so that the consumer starts on the first while the reader drains the rest.
const MAX_BATCH: usize = 1024;

/// A wake-up that found at least this many records is taken for a flood in progress: the
/// reader then lets the next records gather in the ring for [`GATHER`] before it looks again.
const FLOOD_RECORDS: usize = 8;

/// How long records gather in the ring during a flood. The kernel wakes the reader for the
/// first record after it caught up, and for none after it until the reader reads again: one
/// wake-up for what a millisecond brings, instead of one for every few records (measured: 12k
/// wake-ups of the consumer in a 101k-line flood without this). An isolated record, or the
/// first of a flood, is read at once.
const GATHER: std::time::Duration = std::time::Duration::from_millis(1);

/// Reads the ring buffer each time it becomes readable, until the receiver goes away: every
/// record available is decoded and handed over in one burst (one wake-up of the consumer).
///
/// One burst is in flight at a time: before it takes more from the ring, the reader waits
/// until the consumer has finished the last burst (its permit, in `in_flight`). Meanwhile new
/// records wait in the ring, and the kernel does not wake the reader for them: it wakes the
/// reader only for a record written when the reader had taken everything before it. Under a
/// flood that is one wake-up per burst instead of one per record, for the reader and for the
/// task that writes the kernel message. At idle nothing waits: the permit is free. A wake-up
/// that found a flood in progress waits [`GATHER`] before the next (a timer only then: an
/// idle agent has none).
async fn read_ring(
    ring: &mut AsyncFd<RingBuf<MapData>>,
    layouts: &Layouts,
    tx: &mpsc::Sender<Batch>,
    stats: &SensorStats,
    in_flight: &Arc<Semaphore>,
) -> std::io::Result<supervise::Finished> {
    let mut victims = VictimCgroups::default();
    loop {
        let mut guard = ring.readable_mut().await?;
        let mut drained = false;
        let mut taken = 0;
        while !drained {
            let permit = in_flight
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| std::io::Error::other("the ring reader's permits were closed"))?;
            let mut batch = Batch::in_flight(permit);
            while batch.len() < MAX_BATCH {
                let decoded = {
                    let Some(item) = guard.get_inner_mut().next() else {
                        drained = true;
                        break;
                    };
                    decode::decode_record(&item, layouts)
                };
                match decoded {
                    Ok(Decoded::Event(mut event)) => {
                        victims.fill(&mut event);
                        stats.received(event.kind());
                        batch.push(event);
                    }
                    Ok(Decoded::VictimCgroup { pid, memcg }) => victims.note(pid, memcg),
                    Err(err) => stats.decode_error("eBPF record", &err),
                }
            }
            taken += batch.len();
            if !batch.is_empty() && tx.send(batch).await.is_err() {
                return Ok(supervise::Finished::ConsumerGone);
            }
        }
        guard.clear_ready();
        if taken >= FLOOD_RECORDS {
            tokio::time::sleep(GATHER).await;
        }
    }
}

/// OOM victims' memory cgroups (`RecordKind::VictimCgroup`) waiting for their victim's record,
/// which comes next. A few are kept, in case records of other CPUs come in between.
#[derive(Default)]
struct VictimCgroups(std::collections::VecDeque<(i32, Option<String>)>);

impl VictimCgroups {
    const KEPT: usize = 8;

    fn note(&mut self, pid: i32, memcg: Option<String>) {
        if self.0.len() == Self::KEPT {
            self.0.pop_front();
        }
        self.0.push_back((pid, memcg));
    }

    /// Gives an OOM kill its victim's memory cgroup, when it came (each is used once).
    fn fill(&mut self, event: &mut crate::event::KernelEvent) {
        if let crate::event::Detail::OomKill(o) = &mut event.detail
            && let Some(i) = self.0.iter().rposition(|(pid, _)| *pid == o.pid)
            && let Some((_, memcg)) = self.0.remove(i)
        {
            o.memcg = memcg;
        }
    }
}

/// Forwards the programs' diagnostics to the log, as a tracked task that stops with the
/// sensor.
fn spawn_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>, readers: &Readers) {
    match super::register_readable(logger) {
        Ok(mut logger) => {
            let cancel = readers.tasks.cancel.clone();
            readers.tasks.tracker.spawn(async move {
                loop {
                    tokio::select! {
                        ready = logger.readable_mut() => {
                            let Ok(mut guard) = ready else { return };
                            guard.get_inner_mut().flush();
                            guard.clear_ready();
                        }
                        () = cancel.cancelled() => return,
                    }
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
