//! The kernel events npd understands, as the sensor decodes them (from eBPF records or from
//! `/dev/kmsg`) and as the rules consume them. Plain data, no I/O.
//!
//! `--kernel-events` prints each as one JSON object per line, e.g.
//! `{"kind":"kernel","event":"hung_task","pid":42,"comm":"dd"}`.

use serde::Serialize;

/// One thing the kernel told us.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum KernelEvent {
    /// A kernel log message (`printk:console`, or a `/dev/kmsg` record).
    Log(LogMessage),
    /// The hung-task detector found a task blocked (`sched:sched_process_hang`).
    HungTask(HungTask),
    /// The OOM killer chose a victim (`oom:mark_victim`).
    OomKill(OomKill),
    /// A block request failed (`block:block_rq_error`).
    BlockError(BlockError),
}

impl KernelEvent {
    /// A short name of the event's kind, as used in JSON and metric labels.
    pub fn kind_name(&self) -> &'static str {
        match self {
            KernelEvent::Log(_) => "log",
            KernelEvent::HungTask(_) => "hung_task",
            KernelEvent::OomKill(_) => "oom_kill",
            KernelEvent::BlockError(_) => "block_error",
        }
    }
}

/// A kernel log message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LogMessage {
    /// The message text, without level prefix or trailing newline. Bytes that are not UTF-8
    /// are replaced with U+FFFD.
    pub message: String,
    /// When the message was cut short on its way to us: its full length in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated_from: Option<usize>,
    /// The kernel's sequence number of the record, when the source gives one (`/dev/kmsg`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl LogMessage {
    /// A complete (not truncated) message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            truncated_from: None,
            seq: None,
        }
    }
}

/// A task stuck in uninterruptible sleep longer than `hung_task_timeout_secs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HungTask {
    /// The stuck task's pid (thread id).
    pub pid: i32,
    /// The stuck task's command name.
    pub comm: String,
}

/// The OOM killer's victim, with every field the running kernel's tracepoint provides.
/// Sizes are in KiB, as the kernel reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OomKill {
    /// The victim's pid.
    pub pid: i32,
    /// The victim's command name (kernels since 2024; older ones only give the pid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// The victim's uid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Total virtual memory, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_vm_kb: Option<u64>,
    /// Anonymous resident memory, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anon_rss_kb: Option<u64>,
    /// File-backed resident memory, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_rss_kb: Option<u64>,
    /// Shared-memory resident memory, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shmem_rss_kb: Option<u64>,
    /// Page tables, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pgtables_kb: Option<u64>,
    /// The victim's oom_score_adj.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i16>,
}

/// A failed block I/O request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlockError {
    /// The device's kernel name (`loop0`, `nvme0n1`), when it could be resolved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// `major:minor`.
    pub dev: DevNum,
    /// First sector of the request (512-byte units).
    pub sector: u64,
    /// Number of sectors.
    pub nr_sectors: u32,
    /// The operation, from the kernel's rwbs flags.
    pub op: BlockOp,
    /// The kernel's rwbs string (`R`, `WS`, `FWFS`...).
    pub rwbs: String,
    /// The error as a negative errno (`-5` is EIO).
    pub error: i32,
}

/// A block device number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DevNum {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl DevNum {
    /// Splits a kernel-internal `dev_t` (as tracepoints record it: 12-bit major, 20-bit minor).
    pub fn from_kernel_dev(dev: u32) -> Self {
        Self {
            major: dev >> 20,
            minor: dev & ((1 << 20) - 1),
        }
    }
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl Serialize for DevNum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A block request's operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BlockOp {
    /// Read.
    Read,
    /// Write.
    Write,
    /// Cache flush.
    Flush,
    /// Discard.
    Discard,
    /// Secure erase.
    SecureErase,
    /// Anything else (`N` in rwbs).
    Other,
}

impl BlockOp {
    /// The operation encoded in a kernel rwbs string (see the kernel's `blk_fill_rwbs`): an
    /// optional leading `F` (pre-flush), then `W`, `R`, `D`, `DE` (secure erase), `F` (flush) or
    /// `N`, then modifier letters.
    pub fn from_rwbs(rwbs: &str) -> Self {
        let b = rwbs.as_bytes();
        let op_at = |i: usize| match b.get(i) {
            Some(b'R') => Some(BlockOp::Read),
            Some(b'W') => Some(BlockOp::Write),
            Some(b'D') if b.get(i + 1) == Some(&b'E') => Some(BlockOp::SecureErase),
            Some(b'D') => Some(BlockOp::Discard),
            Some(b'N') => Some(BlockOp::Other),
            _ => None,
        };
        match b.first() {
            Some(b'F') => op_at(1).unwrap_or(BlockOp::Flush),
            _ => op_at(0).unwrap_or(BlockOp::Other),
        }
    }

    /// The name used in JSON and messages (`READ`, `WRITE`...).
    pub fn as_str(self) -> &'static str {
        match self {
            BlockOp::Read => "READ",
            BlockOp::Write => "WRITE",
            BlockOp::Flush => "FLUSH",
            BlockOp::Discard => "DISCARD",
            BlockOp::SecureErase => "SECURE_ERASE",
            BlockOp::Other => "OTHER",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rwbs_to_op() {
        for (rwbs, op) in [
            ("R", BlockOp::Read),
            ("RA", BlockOp::Read),
            ("RS", BlockOp::Read),
            ("W", BlockOp::Write),
            ("WS", BlockOp::Write),
            ("FWS", BlockOp::Write),
            ("FWFS", BlockOp::Write),
            ("F", BlockOp::Flush),
            ("FS", BlockOp::Flush),
            ("D", BlockOp::Discard),
            ("DE", BlockOp::SecureErase),
            ("N", BlockOp::Other),
            ("", BlockOp::Other),
        ] {
            assert_eq!(BlockOp::from_rwbs(rwbs), op, "rwbs {rwbs:?}");
        }
    }

    #[test]
    fn kernel_dev_split() {
        let dev = DevNum::from_kernel_dev((7 << 20) | 3);
        assert_eq!(dev, DevNum { major: 7, minor: 3 });
        assert_eq!(dev.to_string(), "7:3");
    }

    #[test]
    fn json_shape() {
        let ev = KernelEvent::BlockError(BlockError {
            device: Some("loop0".into()),
            dev: DevNum { major: 7, minor: 0 },
            sector: 24576,
            nr_sectors: 8,
            op: BlockOp::Read,
            rwbs: "R".into(),
            error: -5,
        });
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"block_error","device":"loop0","dev":"7:0","sector":24576,
                "nr_sectors":8,"op":"READ","rwbs":"R","error":-5})
        );
        let ev = KernelEvent::Log(LogMessage::new("hello"));
        assert_eq!(
            serde_json::to_value(&ev).unwrap(),
            serde_json::json!({"event":"log","message":"hello"})
        );
    }
}
