//! npd's eBPF programs: one per kernel tracepoint, all writing into the one `EVENTS` ring buffer.
//!
//! The programs do as little as possible. `console` copies the message text; the others copy
//! the first [`RAW_RECORD_MAX`] bytes of their tracepoint's raw record, which the agent decodes
//! with the running kernel's `format` file (field layouts differ between kernels). Offsets the
//! programs themselves need are written into [`CONFIG`] by the agent before load.
//!
//! Nothing here panics: every program is `match try_x(..) { .. }` and every read is bounded.
//! Whatever cannot be delivered (ring buffer full, failed read) is counted in the per-CPU
//! `LOSSES` array, one slot per (record kind, reason); the agent exports the sums.
#![no_std]
#![no_main]

use core::{ffi::c_void, mem::size_of, ptr};

use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::warn;
use npd_common::{
    CGROUP_DEPTH_MAX, CGROUP_NAME_MAX, CONSOLE_TEXT_MAX, ConsoleRecord, HEADER_LEN, LOSS_SLOTS,
    LossReason, ProgramConfig, RAW_RECORD_MAX, RawRecord, RecordHeader, RecordKind,
    VictimCgroupRecord, loss_slot,
};

/// The one ring buffer every program writes into. The agent may resize it at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

/// Records that could not be delivered, per CPU, indexed by [`loss_slot`].
#[map]
static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_SLOTS, 0);

/// Per-CPU scratch space where a console record is assembled before it is copied out with its
/// exact length (the ring buffer then holds only the bytes of the message).
#[map]
static CONSOLE_SCRATCH: PerCpuArray<ConsoleRecord> = PerCpuArray::with_max_entries(1, 0);

/// Layout facts of the running kernel, set by the agent with `EbpfLoader::set_global`.
#[unsafe(no_mangle)]
static CONFIG: ProgramConfig = ProgramConfig::unknown();

/// Largest tracepoint field offset we accept from [`CONFIG`] (records are far smaller).
const MAX_FIELD_OFFSET: u32 = 4096;

fn config() -> ProgramConfig {
    // SAFETY: reading our own static; volatile so the compiler does not fold the default value
    // (the loader rewrites it in the object's read-only data).
    unsafe { ptr::read_volatile(&CONFIG) }
}

fn count_loss(kind: RecordKind, reason: LossReason) {
    if let Some(counter) = LOSSES.get_ptr_mut(loss_slot(kind, reason)) {
        // SAFETY: the pointer comes from the map lookup and is this CPU's own slot.
        unsafe { *counter += 1 };
    }
}

fn header(kind: RecordKind, data_len: u32, orig_len: u32) -> RecordHeader {
    RecordHeader {
        kind: kind as u32,
        // SAFETY: helpers without preconditions.
        cpu: unsafe { bpf_get_smp_processor_id() },
        // SAFETY: as above.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        data_len,
        orig_len,
    }
}

/// Copies `len` bytes from kernel memory at `src` to `dst`.
///
/// # Safety
/// `dst` must be valid for `len` bytes of writes.
unsafe fn read_kernel(dst: *mut u8, len: u32, src: *const u8) -> Result<(), LossReason> {
    // SAFETY: the helper checks `src` itself; `dst` is valid by this function's contract.
    let ret = unsafe { bpf_probe_read_kernel(dst.cast::<c_void>(), len, src.cast::<c_void>()) };
    if ret < 0 {
        Err(LossReason::ReadError)
    } else {
        Ok(())
    }
}

/// `printk:console`: one record per printk() call, carrying the message text.
#[tracepoint]
pub fn console(ctx: TracePointContext) -> u32 {
    match try_console(&ctx) {
        Ok(()) => 0,
        Err(reason) => {
            count_loss(RecordKind::Console, reason);
            if reason == LossReason::ReadError {
                warn!(&ctx, "npd: could not read a printk:console record");
            }
            0
        }
    }
}

fn try_console(ctx: &TracePointContext) -> Result<(), LossReason> {
    let loc_offset = config().console_msg_loc_offset;
    if loc_offset > MAX_FIELD_OFFSET {
        return Err(LossReason::ReadError);
    }
    // SAFETY: bounded offset into the tracepoint record, read through the probe-read helper.
    let loc: u32 =
        unsafe { ctx.read_at(loc_offset as usize) }.map_err(|_| LossReason::ReadError)?;
    // __data_loc: low 16 bits offset of the data from the record start, high 16 bits its length
    // (the kernel stores the message with a terminating NUL).
    let data_offset = loc & 0xffff;
    let stored_len = loc >> 16;
    let msg_len = if stored_len > 0 { stored_len - 1 } else { 0 };
    let copy_len = if msg_len as usize > CONSOLE_TEXT_MAX {
        CONSOLE_TEXT_MAX as u32
    } else {
        msg_len
    };

    let record = CONSOLE_SCRATCH
        .get_ptr_mut(0)
        .ok_or(LossReason::ReadError)?;
    // SAFETY: the scratch slot is this CPU's own and lives as long as the map.
    let text = unsafe { ptr::addr_of_mut!((*record).text) }.cast::<u8>();
    if copy_len > 0 {
        // SAFETY: copy_len <= CONSOLE_TEXT_MAX, the size of `text`.
        unsafe {
            read_kernel(
                text,
                copy_len,
                ctx.as_ptr().cast::<u8>().add(data_offset as usize),
            )?
        };
    }
    // SAFETY: as above; a plain store of a Copy value.
    unsafe {
        ptr::addr_of_mut!((*record).header).write(header(RecordKind::Console, copy_len, msg_len))
    };

    let total = HEADER_LEN + copy_len as usize;
    let total = if total > size_of::<ConsoleRecord>() {
        size_of::<ConsoleRecord>()
    } else {
        total
    };
    // SAFETY: `record` points at a whole ConsoleRecord; `total` is within it.
    let bytes = unsafe { core::slice::from_raw_parts(record.cast::<u8>(), total) };
    EVENTS
        .output::<[u8]>(bytes, 0)
        .map_err(|_| LossReason::RingFull)
}

/// Copies the tracepoint's raw record into a new ring-buffer entry of `kind`.
fn emit_raw(ctx: &TracePointContext, kind: RecordKind) -> Result<(), LossReason> {
    let mut entry = EVENTS.reserve::<RawRecord>(0).ok_or(LossReason::RingFull)?;
    let record = entry.as_mut_ptr();
    // SAFETY: `record` is a reserved, writable RawRecord; `data` is RAW_RECORD_MAX bytes.
    let read = unsafe {
        read_kernel(
            ptr::addr_of_mut!((*record).data).cast::<u8>(),
            RAW_RECORD_MAX as u32,
            ctx.as_ptr().cast::<u8>(),
        )
    };
    if let Err(reason) = read {
        entry.discard(0);
        return Err(reason);
    }
    // SAFETY: as above.
    unsafe {
        ptr::addr_of_mut!((*record).header).write(header(
            kind,
            RAW_RECORD_MAX as u32,
            RAW_RECORD_MAX as u32,
        ))
    };
    entry.submit(0);
    Ok(())
}

fn finish_raw(ctx: &TracePointContext, kind: RecordKind, result: Result<(), LossReason>) -> u32 {
    if let Err(reason) = result {
        count_loss(kind, reason);
        if reason == LossReason::ReadError {
            warn!(
                ctx,
                "npd: could not read a tracepoint record (kind {})", kind as u32
            );
        }
    }
    0
}

/// `sched:sched_process_hang`: the hung-task detector found a task stuck in D state.
#[tracepoint]
pub fn sched_process_hang(ctx: TracePointContext) -> u32 {
    finish_raw(
        &ctx,
        RecordKind::HungTask,
        emit_raw(&ctx, RecordKind::HungTask),
    )
}

/// `oom:mark_victim`: the OOM killer chose a victim.
#[tracepoint]
pub fn mark_victim(ctx: TracePointContext) -> u32 {
    finish_raw(
        &ctx,
        RecordKind::OomVictim,
        emit_raw(&ctx, RecordKind::OomVictim),
    )
}

/// Largest kernel struct member offset we accept from [`CONFIG`] (`task_struct` is the largest
/// struct read, under 16 KiB).
const MAX_MEMBER_OFFSET: u32 = 64 * 1024;

/// Raw tracepoint `mark_victim` (kernels whose `mark_victim` passes the victim's task): the
/// victim's memory cgroup, as the names of its cgroup's directories up to the root. Attached
/// before `oom:mark_victim`, so this record comes just before the victim's. The agent reads
/// the same cgroup from `/proc/<pid>/cgroup` where this program is not attached; here it costs
/// no wait on the victim's task lock, which the kernel holds while it prints the kill.
#[raw_tracepoint(tracepoint = "mark_victim")]
pub fn victim_cgroup(ctx: RawTracePointContext) -> i32 {
    if let Err(reason) = try_victim_cgroup(&ctx) {
        count_loss(RecordKind::VictimCgroup, reason);
    }
    0
}

/// Reads the pointer at `base + offset` in kernel memory.
fn read_pointer(base: u64, offset: u32) -> Result<u64, LossReason> {
    if base == 0 || offset > MAX_MEMBER_OFFSET {
        return Err(LossReason::ReadError);
    }
    let mut value: u64 = 0;
    // SAFETY: `value` is 8 writable bytes; the helper checks the source itself.
    unsafe {
        read_kernel(
            ptr::addr_of_mut!(value).cast::<u8>(),
            8,
            (base + u64::from(offset)) as *const u8,
        )?
    };
    Ok(value)
}

fn try_victim_cgroup(ctx: &RawTracePointContext) -> Result<(), LossReason> {
    let walk = config().cgroup_walk;
    let task: u64 = ctx.arg(0);
    let mut entry = EVENTS
        .reserve::<VictimCgroupRecord>(0)
        .ok_or(LossReason::RingFull)?;
    let record = entry.as_mut_ptr();
    // SAFETY: `record` is a reserved, writable VictimCgroupRecord.
    match unsafe { fill_victim_cgroup(record, task, &walk) } {
        Ok(()) => {
            entry.submit(0);
            Ok(())
        }
        Err(reason) => {
            entry.discard(0);
            Err(reason)
        }
    }
}

/// Walks from the task to its memory cgroup's kernfs node, then up to the root, copying each
/// directory name.
///
/// # Safety
/// `record` must point at a writable `VictimCgroupRecord`.
unsafe fn fill_victim_cgroup(
    record: *mut VictimCgroupRecord,
    task: u64,
    walk: &npd_common::CgroupWalk,
) -> Result<(), LossReason> {
    if task == 0 || walk.task_pid > MAX_MEMBER_OFFSET {
        return Err(LossReason::ReadError);
    }
    let mut pid: i32 = 0;
    // SAFETY: `pid` is 4 writable bytes; the helper checks the source.
    unsafe {
        read_kernel(
            ptr::addr_of_mut!(pid).cast::<u8>(),
            4,
            (task + u64::from(walk.task_pid)) as *const u8,
        )?
    };
    let css_set = read_pointer(task, walk.task_cgroups)?;
    let css = read_pointer(css_set, walk.css_set_memory)?;
    let cgroup = read_pointer(css, walk.css_cgroup)?;
    let mut kn = read_pointer(cgroup, walk.cgroup_kn)?;
    let mut depth: u32 = 0;
    let mut complete: u32 = 0;
    let mut whole = true;
    for level in 0..CGROUP_DEPTH_MAX {
        let name = read_pointer(kn, walk.kn_name)?;
        // SAFETY: `level < CGROUP_DEPTH_MAX`: the slot is inside the record.
        let slot = unsafe { ptr::addr_of_mut!((*record).names[level]) }.cast::<u8>();
        // SAFETY: the slot is CGROUP_NAME_MAX writable bytes; the helper checks the source.
        let copied = unsafe {
            bpf_probe_read_kernel_str(
                slot.cast::<c_void>(),
                CGROUP_NAME_MAX as u32,
                name as *const c_void,
            )
        };
        if copied < 0 {
            return Err(LossReason::ReadError);
        }
        // A name that filled the slot may have been cut.
        if copied as usize >= CGROUP_NAME_MAX {
            whole = false;
        }
        depth = level as u32 + 1;
        let parent = read_pointer(kn, walk.kn_parent)?;
        if parent == 0 {
            complete = u32::from(whole);
            break;
        }
        kn = parent;
    }
    let data_len = (size_of::<VictimCgroupRecord>() - HEADER_LEN) as u32;
    // SAFETY: plain stores into the reserved record.
    unsafe {
        ptr::addr_of_mut!((*record).header).write(header(
            RecordKind::VictimCgroup,
            data_len,
            data_len,
        ));
        ptr::addr_of_mut!((*record).pid).write(pid);
        ptr::addr_of_mut!((*record).depth).write(depth);
        ptr::addr_of_mut!((*record).complete).write(complete);
        ptr::addr_of_mut!((*record).reserved).write(0);
    }
    Ok(())
}

/// `block:block_rq_error`: a block request completed with an error.
#[tracepoint]
pub fn block_rq_error(ctx: TracePointContext) -> u32 {
    finish_raw(
        &ctx,
        RecordKind::BlockError,
        emit_raw(&ctx, RecordKind::BlockError),
    )
}

/// `block:block_rq_complete`, for kernels without `block_rq_error`: only completions with a
/// non-zero error are sent.
#[tracepoint]
pub fn block_rq_complete(ctx: TracePointContext) -> u32 {
    let result = try_block_rq_complete(&ctx);
    finish_raw(&ctx, RecordKind::BlockComplete, result)
}

fn try_block_rq_complete(ctx: &TracePointContext) -> Result<(), LossReason> {
    let offset = config().block_complete_error_offset;
    if offset > MAX_FIELD_OFFSET {
        return Err(LossReason::ReadError);
    }
    // SAFETY: bounded offset, read through the probe-read helper.
    let error: i32 = unsafe { ctx.read_at(offset as usize) }.map_err(|_| LossReason::ReadError)?;
    if error == 0 {
        return Ok(());
    }
    emit_raw(ctx, RecordKind::BlockComplete)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: there is no panicking code path left after
    // optimisation, and the verifier rejects unbounded loops.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
