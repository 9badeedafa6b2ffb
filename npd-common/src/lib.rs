//! Wire records shared by npd's eBPF programs (`npd-ebpf`) and its agent (`npd-agent`).
//!
//! Every record in the ring buffer starts with a [`RecordHeader`] followed by `data_len` bytes
//! of payload:
//!
//! * [`RecordKind::Console`]: the text of one `printk:console` event (no trailing NUL), at most
//!   [`CONSOLE_TEXT_MAX`] bytes; `orig_len` is the full length of the kernel's message, so
//!   truncation is visible (`orig_len > data_len`).
//! * [`RecordKind::HungTask`], [`RecordKind::OomVictim`], [`RecordKind::BlockError`],
//!   [`RecordKind::BlockComplete`]: the first [`RAW_RECORD_MAX`] bytes of the tracepoint's raw
//!   record, exactly as the kernel laid it out. The agent decodes them with the field offsets of
//!   the running kernel's tracepoint `format` file, so nothing here depends on one kernel's layout.
//!
//! * [`RecordKind::VictimCgroup`]: a [`VictimCgroupRecord`], the memory cgroup of an OOM victim
//!   as the kernel's own cgroup tree names it, walked from the task at `oom:mark_victim` (a raw
//!   tracepoint program, on kernels whose `mark_victim` passes the task). It is written just
//!   before the victim's [`RecordKind::OomVictim`] record.
//!
//! The layout is `#[repr(C)]` with no implicit padding: the same bytes mean the same thing on
//! both sides.
#![no_std]

/// The maximum number of message bytes a console record carries (the `/dev/kmsg` write limit).
pub const CONSOLE_TEXT_MAX: usize = 1024;

/// How many bytes of a raw tracepoint record are copied (fixed fields plus `__data_loc` strings).
pub const RAW_RECORD_MAX: usize = 256;

/// Which tracepoint produced a record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// `printk:console`.
    Console = 1,
    /// `sched:sched_process_hang`.
    HungTask = 2,
    /// `oom:mark_victim`.
    OomVictim = 3,
    /// `block:block_rq_error`.
    BlockError = 4,
    /// `block:block_rq_complete` with a non-zero error (kernels without `block_rq_error`).
    BlockComplete = 5,
    /// The memory cgroup of an OOM victim (raw tracepoint `mark_victim`).
    VictimCgroup = 6,
}

impl RecordKind {
    /// All kinds, in counter-slot order.
    pub const ALL: [RecordKind; 6] = [
        RecordKind::Console,
        RecordKind::HungTask,
        RecordKind::OomVictim,
        RecordKind::BlockError,
        RecordKind::BlockComplete,
        RecordKind::VictimCgroup,
    ];

    /// The kind for a raw header value, if it is one we know.
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Console),
            2 => Some(Self::HungTask),
            3 => Some(Self::OomVictim),
            4 => Some(Self::BlockError),
            5 => Some(Self::BlockComplete),
            6 => Some(Self::VictimCgroup),
            _ => None,
        }
    }
}

/// The header of every ring-buffer record. 24 bytes, 8-byte aligned, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// A [`RecordKind`] as `u32`.
    pub kind: u32,
    /// The CPU the program ran on.
    pub cpu: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the program ran.
    pub ktime_ns: u64,
    /// Payload bytes that follow this header.
    pub data_len: u32,
    /// Length of the data at its source (console: the message length without NUL), so that
    /// truncation is visible.
    pub orig_len: u32,
}

/// Size of [`RecordHeader`] in bytes.
pub const HEADER_LEN: usize = core::mem::size_of::<RecordHeader>();

/// A console record as the eBPF program assembles it in per-CPU scratch memory; only
/// `HEADER_LEN + data_len` bytes of it are sent.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConsoleRecord {
    /// The header.
    pub header: RecordHeader,
    /// The message text, `header.data_len` bytes of it valid.
    pub text: [u8; CONSOLE_TEXT_MAX],
}

/// A raw tracepoint record copy, sent whole.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawRecord {
    /// The header.
    pub header: RecordHeader,
    /// The tracepoint's record, from offset 0 (the common fields) on.
    pub data: [u8; RAW_RECORD_MAX],
}

/// The longest cgroup directory name a [`VictimCgroupRecord`] carries whole, with its NUL.
pub const CGROUP_NAME_MAX: usize = 128;

/// How many levels of the cgroup tree a [`VictimCgroupRecord`] carries, the root included.
pub const CGROUP_DEPTH_MAX: usize = 12;

/// An OOM victim's memory cgroup: the names of its cgroup's directories from the cgroup up to
/// the root of its hierarchy (the root's name is empty). The agent uses it only when
/// `complete` is 1: the walk reached the root and no name was cut.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VictimCgroupRecord {
    /// The header.
    pub header: RecordHeader,
    /// The victim's pid (`task_struct.pid`, as `oom:mark_victim` reports it).
    pub pid: i32,
    /// How many entries of `names` are filled, the cgroup's own first.
    pub depth: u32,
    /// 1 when the walk reached the root and every name fit.
    pub complete: u32,
    /// Zero.
    pub reserved: u32,
    /// NUL-terminated names, the cgroup's own first.
    pub names: [[u8; CGROUP_NAME_MAX]; CGROUP_DEPTH_MAX],
}

/// Where the victim's memory cgroup is in kernel memory, from the running kernel's BTF: byte
/// offsets, each [`ProgramConfig::UNKNOWN`] until known.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupWalk {
    /// `task_struct.pid`.
    pub task_pid: u32,
    /// `task_struct.cgroups` (a `struct css_set *`).
    pub task_cgroups: u32,
    /// `css_set.subsys[memory_cgrp_id]` (a `struct cgroup_subsys_state *`).
    pub css_set_memory: u32,
    /// `cgroup_subsys_state.cgroup`.
    pub css_cgroup: u32,
    /// `cgroup.kn` (a `struct kernfs_node *`).
    pub cgroup_kn: u32,
    /// `kernfs_node.name`.
    pub kn_name: u32,
    /// `kernfs_node.parent` (`__parent` since 6.15).
    pub kn_parent: u32,
}

impl CgroupWalk {
    /// Nothing known: the program is not attached.
    pub const fn unknown() -> Self {
        let u = ProgramConfig::UNKNOWN;
        Self {
            task_pid: u,
            task_cgroups: u,
            css_set_memory: u,
            css_cgroup: u,
            cgroup_kn: u,
            kn_name: u,
            kn_parent: u,
        }
    }
}

/// Why a record could not be delivered; with [`RecordKind`] it selects a loss counter.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossReason {
    /// The ring buffer was full (the agent did not keep up).
    RingFull = 0,
    /// Reading the tracepoint record failed (`bpf_probe_read_kernel` error or bad `__data_loc`).
    ReadError = 1,
}

/// Number of loss reasons.
pub const LOSS_REASONS: u32 = 2;

/// Number of slots in the per-CPU `LOSSES` array: one per (kind, reason).
pub const LOSS_SLOTS: u32 = (RecordKind::ALL.len() as u32 + 1) * LOSS_REASONS;

/// The `LOSSES` array slot for a kind and reason.
pub const fn loss_slot(kind: RecordKind, reason: LossReason) -> u32 {
    (kind as u32) * LOSS_REASONS + reason as u32
}

/// Load-time settings for the eBPF programs, written into their read-only data before load
/// (`EbpfLoader::set_global`), read off the running kernel's tracepoint `format` files.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramConfig {
    /// Offset of `printk:console`'s `__data_loc char[] msg` field.
    pub console_msg_loc_offset: u32,
    /// Offset of `block:block_rq_complete`'s `int error` field (used only on kernels without
    /// `block_rq_error`).
    pub block_complete_error_offset: u32,
    /// Where an OOM victim's memory cgroup is (read off the kernel's BTF, not a `format` file).
    pub cgroup_walk: CgroupWalk,
}

impl ProgramConfig {
    /// An offset value meaning "not known": the program counts a read error instead of guessing.
    pub const UNKNOWN: u32 = u32::MAX;

    /// Nothing known yet.
    pub const fn unknown() -> Self {
        Self {
            console_msg_loc_offset: Self::UNKNOWN,
            block_complete_error_offset: Self::UNKNOWN,
            cgroup_walk: CgroupWalk::unknown(),
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers, no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::RecordHeader {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProgramConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(HEADER_LEN, 24);
        assert_eq!(core::mem::size_of::<ConsoleRecord>(), 24 + CONSOLE_TEXT_MAX);
        assert_eq!(core::mem::size_of::<RawRecord>(), 24 + RAW_RECORD_MAX);
        assert_eq!(core::mem::size_of::<ProgramConfig>(), 8 + 7 * 4);
        assert_eq!(
            core::mem::size_of::<VictimCgroupRecord>(),
            24 + 16 + CGROUP_NAME_MAX * CGROUP_DEPTH_MAX
        );
    }

    #[test]
    fn loss_slots_are_distinct_and_in_range() {
        let mut seen = [false; LOSS_SLOTS as usize];
        for kind in RecordKind::ALL {
            for reason in [LossReason::RingFull, LossReason::ReadError] {
                let slot = loss_slot(kind, reason) as usize;
                assert!(slot < seen.len());
                assert!(!seen[slot]);
                seen[slot] = true;
            }
        }
    }

    #[test]
    fn kinds_round_trip() {
        for kind in RecordKind::ALL {
            assert_eq!(RecordKind::from_u32(kind as u32), Some(kind));
        }
        assert_eq!(RecordKind::from_u32(0), None);
    }
}
