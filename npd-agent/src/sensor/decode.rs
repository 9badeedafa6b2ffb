//! Decodes ring-buffer records (see `npd-common`) into [`KernelEvent`]s, using the running
//! kernel's tracepoint formats. No I/O: a block error's device name is resolved later, off the
//! reader (see [`crate::enrich`]).

use npd_common::{HEADER_LEN, RecordHeader, RecordKind};
use thiserror::Error;

use super::format::{Field, FieldError, TracepointFormat};
use crate::{
    event::{
        BlockError, BlockOp, Detail, DevNum, EventKind, HungTask, KernelEvent, LogMessage, OomKill,
    },
    time::Mono,
};

/// The kind of event a record becomes (both block tracepoints give block errors).
pub fn event_kind(record: RecordKind) -> EventKind {
    match record {
        RecordKind::Console => EventKind::Log,
        RecordKind::HungTask => EventKind::HungTask,
        // A victim's cgroup that could not be delivered is counted with the OOM kills: it is
        // part of one.
        RecordKind::OomVictim | RecordKind::VictimCgroup => EventKind::OomKill,
        RecordKind::BlockError | RecordKind::BlockComplete => EventKind::BlockError,
    }
}

/// A record that could not be decoded. Each is counted; none stops the sensor.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Shorter than a header.
    #[error("record of {have} bytes is shorter than its {need}-byte header")]
    NotEnoughBytes {
        /// Bytes needed.
        need: usize,
        /// Bytes received.
        have: usize,
    },
    /// The header's payload length does not match the record size.
    #[error("record header says {said} payload bytes, the record has {have}")]
    SizeMismatch {
        /// Payload length in the header.
        said: usize,
        /// Payload bytes present.
        have: usize,
    },
    /// A kind this agent does not know (eBPF object and agent out of step).
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    /// A record for a tracepoint whose format we did not load.
    #[error("record kind {0:?} arrived but its tracepoint format is not loaded")]
    NoFormat(RecordKind),
    /// A field could not be read.
    #[error(transparent)]
    Field(#[from] FieldError),
}

/// Field layouts of the structured tracepoints on the running kernel.
#[derive(Debug, Default)]
pub struct Layouts {
    hung_task: Option<HungLayout>,
    oom: Option<OomLayout>,
    block: Option<BlockLayout>,
}

#[derive(Debug)]
struct HungLayout {
    pid: Field,
    comm: Field,
}

#[derive(Debug)]
struct OomLayout {
    pid: Field,
    comm: Option<Field>,
    uid: Option<Field>,
    total_vm: Option<Field>,
    anon_rss: Option<Field>,
    file_rss: Option<Field>,
    shmem_rss: Option<Field>,
    pgtables: Option<Field>,
    oom_score_adj: Option<Field>,
}

#[derive(Debug)]
struct BlockLayout {
    dev: Field,
    sector: Field,
    nr_sector: Field,
    rwbs: Field,
    error: Field,
}

impl Layouts {
    /// Takes the layout of `sched:sched_process_hang`.
    pub fn set_hung_task(&mut self, f: &TracepointFormat) -> Result<(), FieldError> {
        self.hung_task = Some(HungLayout {
            pid: f.require("pid")?.clone(),
            comm: f.require("comm")?.clone(),
        });
        Ok(())
    }

    /// Takes the layout of `oom:mark_victim` (only `pid` is required; 2024 kernels added the rest).
    pub fn set_oom(&mut self, f: &TracepointFormat) -> Result<(), FieldError> {
        let opt = |name: &str| f.field(name).cloned();
        self.oom = Some(OomLayout {
            pid: f.require("pid")?.clone(),
            comm: opt("comm"),
            uid: opt("uid"),
            total_vm: opt("total_vm"),
            anon_rss: opt("anon_rss"),
            file_rss: opt("file_rss"),
            shmem_rss: opt("shmem_rss"),
            pgtables: opt("pgtables"),
            oom_score_adj: opt("oom_score_adj"),
        });
        Ok(())
    }

    /// Takes the layout of `block:block_rq_error` (or `block_rq_complete`: same fields).
    pub fn set_block(&mut self, f: &TracepointFormat) -> Result<(), FieldError> {
        self.block = Some(BlockLayout {
            dev: f.require("dev")?.clone(),
            sector: f.require("sector")?.clone(),
            nr_sector: f.require("nr_sector")?.clone(),
            rwbs: f.require("rwbs")?.clone(),
            error: f.require("error")?.clone(),
        });
        Ok(())
    }
}

/// Splits a record into header and payload, checking sizes.
pub fn split_record(record: &[u8]) -> Result<(RecordHeader, &[u8]), DecodeError> {
    if record.len() < HEADER_LEN {
        return Err(DecodeError::NotEnoughBytes {
            need: HEADER_LEN,
            have: record.len(),
        });
    }
    let u32_at =
        |i: usize| u32::from_ne_bytes([record[i], record[i + 1], record[i + 2], record[i + 3]]);
    let mut ktime = [0u8; 8];
    ktime.copy_from_slice(&record[8..16]);
    let header = RecordHeader {
        kind: u32_at(0),
        cpu: u32_at(4),
        ktime_ns: u64::from_ne_bytes(ktime),
        data_len: u32_at(16),
        orig_len: u32_at(20),
    };
    let payload = &record[HEADER_LEN..];
    // The ring buffer rounds allocations up to 8 bytes, so the payload may be a little longer.
    if (header.data_len as usize) > payload.len() {
        return Err(DecodeError::SizeMismatch {
            said: header.data_len as usize,
            have: payload.len(),
        });
    }
    Ok((header, &payload[..header.data_len as usize]))
}

/// What one ring-buffer record holds.
#[derive(Debug)]
pub enum Decoded {
    /// An event.
    Event(KernelEvent),
    /// An OOM victim's memory cgroup (`None` when the kernel's walk was cut short), for the
    /// victim's event, which comes next.
    VictimCgroup {
        /// The victim's pid.
        pid: i32,
        /// Its memory cgroup's path, `/` for the root.
        memcg: Option<String>,
    },
}

/// Decodes one ring-buffer record; an event's time is the record's `ktime_ns`.
pub fn decode_record(record: &[u8], layouts: &Layouts) -> Result<Decoded, DecodeError> {
    let (header, data) = split_record(record)?;
    decode_payload(&header, data, layouts)
}

/// A [`npd_common::VictimCgroupRecord`]'s payload: pid, depth, complete, reserved, then the
/// names, the cgroup's own first and the root's (empty) last.
fn victim_cgroup(data: &[u8]) -> Result<Decoded, DecodeError> {
    use npd_common::{CGROUP_DEPTH_MAX, CGROUP_NAME_MAX};
    const FIXED: usize = 16;
    let need = FIXED + CGROUP_NAME_MAX * CGROUP_DEPTH_MAX;
    if data.len() < need {
        return Err(DecodeError::NotEnoughBytes {
            need,
            have: data.len(),
        });
    }
    let word = |i: usize| u32::from_ne_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
    let pid = word(0) as i32;
    let (depth, complete) = (word(4) as usize, word(8) == 1);
    if !complete || depth == 0 || depth > CGROUP_DEPTH_MAX {
        return Ok(Decoded::VictimCgroup { pid, memcg: None });
    }
    let names = &data[FIXED..need];
    let mut memcg = String::new();
    // The last name is the root's: the path is the others, from the top down.
    for level in (0..depth - 1).rev() {
        let slot = &names[level * CGROUP_NAME_MAX..(level + 1) * CGROUP_NAME_MAX];
        let name = &slot[..slot.iter().position(|&b| b == 0).unwrap_or(slot.len())];
        if name.is_empty() || name.contains(&b'/') {
            return Ok(Decoded::VictimCgroup { pid, memcg: None });
        }
        memcg.push('/');
        memcg.push_str(&String::from_utf8_lossy(name));
    }
    if memcg.is_empty() {
        memcg.push('/');
    }
    Ok(Decoded::VictimCgroup {
        pid,
        memcg: Some(memcg),
    })
}

fn decode_payload(
    header: &RecordHeader,
    data: &[u8],
    layouts: &Layouts,
) -> Result<Decoded, DecodeError> {
    let kind = RecordKind::from_u32(header.kind).ok_or(DecodeError::UnknownKind(header.kind))?;
    let detail = match kind {
        RecordKind::Console => Detail::Log(decode_console(header, data)),
        RecordKind::HungTask => {
            let l = layouts
                .hung_task
                .as_ref()
                .ok_or(DecodeError::NoFormat(kind))?;
            Detail::HungTask(HungTask {
                pid: l.pid.read_i64(data)? as i32,
                comm: l.comm.read_string(data)?,
                owner: None,
            })
        }
        RecordKind::OomVictim => {
            let l = layouts.oom.as_ref().ok_or(DecodeError::NoFormat(kind))?;
            let u64_of = |f: &Option<Field>| f.as_ref().map(|f| f.read_u64(data)).transpose();
            Detail::OomKill(OomKill {
                pid: l.pid.read_i64(data)? as i32,
                comm: l.comm.as_ref().map(|f| f.read_string(data)).transpose()?,
                uid: u64_of(&l.uid)?.map(|v| v as u32),
                total_vm_kb: u64_of(&l.total_vm)?,
                anon_rss_kb: u64_of(&l.anon_rss)?,
                file_rss_kb: u64_of(&l.file_rss)?,
                shmem_rss_kb: u64_of(&l.shmem_rss)?,
                pgtables_kb: u64_of(&l.pgtables)?,
                oom_score_adj: l
                    .oom_score_adj
                    .as_ref()
                    .map(|f| f.read_i64(data))
                    .transpose()?
                    .map(|v| v as i16),
                memcg: None,
                owner: None,
            })
        }
        RecordKind::VictimCgroup => return victim_cgroup(data),
        RecordKind::BlockError | RecordKind::BlockComplete => {
            let l = layouts.block.as_ref().ok_or(DecodeError::NoFormat(kind))?;
            let dev = DevNum::from_kernel_dev(l.dev.read_u64(data)? as u32);
            let rwbs = l.rwbs.read_string(data)?;
            Detail::BlockError(BlockError {
                device: None,
                dev,
                sector: l.sector.read_u64(data)?,
                nr_sectors: l.nr_sector.read_u64(data)? as u32,
                op: BlockOp::from_rwbs(&rwbs),
                rwbs,
                error: l.error.read_i64(data)? as i32,
                owner: None,
            })
        }
    };
    Ok(Decoded::Event(KernelEvent::new(
        Mono::from_nanos(header.ktime_ns),
        detail,
    )))
}

fn decode_console(header: &RecordHeader, text: &[u8]) -> LogMessage {
    let mut text = text;
    // Older kernels pass the trailing newline, and 5.10's tracepoint, which cuts the newline
    // after sizing the text, leaves the terminating NUL inside it: neither is the message.
    while let Some((b'\n' | b'\0', rest)) = text.split_last() {
        text = rest;
    }
    let text = strip_console_timestamp(text);
    LogMessage {
        message: super::kernel_text(text),
        truncated_from: (header.orig_len > header.data_len).then_some(header.orig_len as usize),
        seq: None,
    }
}

/// Kernels that fire `printk:console` only when a message reaches a console (5.10; the
/// tracepoint moved into the log store in 5.19/6.0) pass the console line as printed, with the
/// `printk.time` prefix: `[%5lu.%06lu] `, e.g. `[    4.642578] ` or `[123456.000001] `. Strips
/// exactly that shape (seconds right-aligned in at least five columns, six digits of
/// microseconds, `]`, one space) and nothing else: text that merely starts with `[` stays.
fn strip_console_timestamp(text: &[u8]) -> &[u8] {
    let Some(rest) = text.strip_prefix(b"[") else {
        return text;
    };
    let spaces = rest.iter().take_while(|&&b| b == b' ').count();
    let rest = &rest[spaces..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    // `%5lu`: padded to five columns, never padded beyond them.
    if digits == 0 || spaces + digits != digits.max(5) {
        return text;
    }
    let Some(rest) = rest[digits..].strip_prefix(b".") else {
        return text;
    };
    match rest.split_at_checked(6) {
        Some((micros, tail)) if micros.iter().all(u8::is_ascii_digit) => {
            tail.strip_prefix(b"] ").unwrap_or(text)
        }
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use npd_common::RAW_RECORD_MAX;

    use super::*;
    use crate::sensor::format::tests::{KERNELS, kernel_format};

    fn record(kind: RecordKind, data: &[u8], orig_len: u32) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [kind as u32, 0] {
            v.extend_from_slice(&x.to_ne_bytes());
        }
        v.extend_from_slice(&123u64.to_ne_bytes());
        v.extend_from_slice(&(data.len() as u32).to_ne_bytes());
        v.extend_from_slice(&orig_len.to_ne_bytes());
        v.extend_from_slice(data);
        v
    }

    /// Builds a raw tracepoint record for `format` with the given field values, the way the
    /// kernel lays it out (strings either inline or after the fixed part via __data_loc).
    fn raw(format: &TracepointFormat, ints: &[(&str, i64)], strs: &[(&str, &str)]) -> Vec<u8> {
        let mut rec = vec![0u8; RAW_RECORD_MAX];
        let mut dyn_at = format
            .fields
            .iter()
            .map(|f| f.offset + f.size)
            .max()
            .unwrap();
        for (name, v) in ints {
            let f = format.field(name).unwrap();
            rec[f.offset..f.offset + f.size].copy_from_slice(&v.to_ne_bytes()[..f.size]);
        }
        for (name, s) in strs {
            let f = format.field(name).unwrap();
            match f.kind {
                super::super::format::FieldKind::DataLoc => {
                    let loc = ((s.len() as u32 + 1) << 16) | dyn_at as u32;
                    rec[f.offset..f.offset + 4].copy_from_slice(&loc.to_ne_bytes());
                    rec[dyn_at..dyn_at + s.len()].copy_from_slice(s.as_bytes());
                    dyn_at += s.len() + 1;
                }
                _ => rec[f.offset..f.offset + s.len()].copy_from_slice(s.as_bytes()),
            }
        }
        rec
    }

    #[test]
    fn console_text_and_truncation() {
        let layouts = Layouts::default();
        let event = decode(&record(RecordKind::Console, b"hello\n", 6), &layouts).unwrap();
        assert_eq!(event.at, Mono::from_nanos(123), "the record's ktime_ns");
        let ev = event.detail;
        assert_eq!(ev, Detail::Log(LogMessage::new("hello")));
        let ev = decode(&record(RecordKind::Console, b"abc", 5000), &layouts)
            .unwrap()
            .detail;
        assert_eq!(
            ev,
            Detail::Log(LogMessage {
                message: "abc".into(),
                truncated_from: Some(5000),
                seq: None
            })
        );
    }

    #[test]
    fn console_timestamp_prefix_of_older_kernels_is_stripped() {
        let layouts = Layouts::default();
        let message = |text: &[u8]| match decode(
            &record(RecordKind::Console, text, text.len() as u32),
            &layouts,
        )
        .unwrap()
        {
            KernelEvent {
                detail: Detail::Log(log),
                ..
            } => log.message,
            other => panic!("{other:?}"),
        };
        // As 5.10 passes it: the console line with its `printk.time` prefix.
        assert_eq!(message(b"[    4.642578] npd: hello\n"), "npd: hello");
        assert_eq!(message(b"[   12.000001] x"), "x");
        assert_eq!(message(b"[12345.123456] wide"), "wide");
        assert_eq!(message(b"[1234567.123456] long uptime"), "long uptime");
        assert_eq!(message(b"[    4.642578] "), "");
        // 5.10's record exactly: prefix, text, and the NUL where its newline was.
        assert_eq!(message(b"[   41.015625] npd: exact\0"), "npd: exact");
        assert_eq!(message(b"no prefix\n\0"), "no prefix");
        // Anything else is the message itself, untouched.
        for text in [
            "[drm] Initialized",
            "[    4.642578]no space",
            "[    4.64257] five digits of micros",
            "[ 4.642578] under-padded",
            "[      4.642578] over-padded",
            "[ 12345.123456] padded beyond five columns",
            "[    4,642578] comma",
            "[    a.642578] letter",
            "[.642578] no seconds",
            " [    4.642578] leading space",
            "[    4.642578",
            "",
        ] {
            assert_eq!(message(text.as_bytes()), text, "{text:?}");
        }
    }

    #[test]
    fn hung_task_on_every_kernel() {
        for kernel in KERNELS {
            let f = kernel_format(kernel, "sched_sched_process_hang.format");
            let mut layouts = Layouts::default();
            layouts.set_hung_task(&f).unwrap();
            let data = raw(&f, &[("pid", 4242)], &[("comm", "writer")]);
            let ev = decode(&record(RecordKind::HungTask, &data, 0), &layouts)
                .unwrap()
                .detail;
            assert_eq!(
                ev,
                Detail::HungTask(HungTask {
                    pid: 4242,
                    comm: "writer".into(),
                    owner: None,
                }),
                "{kernel}"
            );
        }
    }

    #[test]
    fn oom_fields_follow_the_kernel() {
        let old = kernel_format("5.10.0-32-cloud-amd64", "oom_mark_victim.format");
        let mut layouts = Layouts::default();
        layouts.set_oom(&old).unwrap();
        let ev = decode(
            &record(RecordKind::OomVictim, &raw(&old, &[("pid", 7)], &[]), 0),
            &layouts,
        )
        .unwrap()
        .detail;
        assert_eq!(
            ev,
            Detail::OomKill(OomKill {
                pid: 7,
                ..Default::default()
            })
        );

        let new = kernel_format("6.18.44", "oom_mark_victim.format");
        layouts.set_oom(&new).unwrap();
        let data = raw(
            &new,
            &[
                ("pid", 99),
                ("uid", 1000),
                ("total_vm", 300),
                ("anon_rss", 200),
                ("file_rss", 10),
                ("shmem_rss", 1),
                ("pgtables", 4),
                ("oom_score_adj", -17),
            ],
            &[("comm", "stress")],
        );
        let ev = decode(&record(RecordKind::OomVictim, &data, 0), &layouts)
            .unwrap()
            .detail;
        assert_eq!(
            ev,
            Detail::OomKill(OomKill {
                pid: 99,
                comm: Some("stress".into()),
                uid: Some(1000),
                total_vm_kb: Some(300),
                anon_rss_kb: Some(200),
                file_rss_kb: Some(10),
                shmem_rss_kb: Some(1),
                pgtables_kb: Some(4),
                oom_score_adj: Some(-17),
                memcg: None,
                owner: None,
            })
        );
    }

    /// An event record's event.
    fn decode(record: &[u8], layouts: &Layouts) -> Result<KernelEvent, DecodeError> {
        match decode_record(record, layouts)? {
            Decoded::Event(event) => Ok(event),
            other => panic!("not an event: {other:?}"),
        }
    }

    /// A victim's cgroup record as the program writes it: names from the cgroup up, the
    /// root's empty name last.
    fn victim_record(pid: i32, names: &[&str], complete: bool) -> Vec<u8> {
        use npd_common::{CGROUP_DEPTH_MAX, CGROUP_NAME_MAX};
        let mut data = Vec::new();
        for word in [pid as u32, names.len() as u32, u32::from(complete), 0] {
            data.extend_from_slice(&word.to_ne_bytes());
        }
        let mut slots = vec![0xaa; CGROUP_NAME_MAX * CGROUP_DEPTH_MAX];
        for (i, name) in names.iter().enumerate() {
            let at = i * CGROUP_NAME_MAX;
            slots[at..at + name.len()].copy_from_slice(name.as_bytes());
            slots[at + name.len()] = 0;
        }
        data.extend_from_slice(&slots);
        record(RecordKind::VictimCgroup, &data, data.len() as u32)
    }

    #[test]
    fn victim_cgroups_become_paths() {
        let layouts = Layouts::default();
        let path = |names: &[&str], complete| match decode_record(
            &victim_record(42, names, complete),
            &layouts,
        )
        .unwrap()
        {
            Decoded::VictimCgroup { pid, memcg } => {
                assert_eq!(pid, 42);
                memcg
            }
            Decoded::Event(e) => panic!("not an event: {e:?}"),
        };
        let pod = [
            "cri-containerd-0123abcd.scope",
            "kubepods-burstable-pod1234.slice",
            "kubepods-burstable.slice",
            "kubepods.slice",
            "",
        ];
        assert_eq!(
            path(&pod, true).as_deref(),
            Some(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/\
                 cri-containerd-0123abcd.scope"
            )
        );
        assert_eq!(path(&[""], true).as_deref(), Some("/"));
        // A walk cut short (too deep, or a name cut) gives no path; so do names no directory
        // can have.
        assert_eq!(path(&pod, false), None);
        assert_eq!(path(&["a/b", ""], true), None);
        assert_eq!(path(&["", ""], true), None);
        assert_eq!(path(&[], true), None);
        // A short one is an error.
        assert!(matches!(
            decode_record(&record(RecordKind::VictimCgroup, &[0; 40], 40), &layouts),
            Err(DecodeError::NotEnoughBytes { .. })
        ));
    }

    #[test]
    fn block_error_on_every_kernel() {
        for kernel in KERNELS {
            let f = kernel_format(kernel, "block_block_rq_complete.format");
            let mut layouts = Layouts::default();
            layouts.set_block(&f).unwrap();
            let data = raw(
                &f,
                &[
                    ("dev", 7 << 20),
                    ("sector", 24576),
                    ("nr_sector", 8),
                    ("error", -5),
                ],
                &[("rwbs", "R")],
            );
            let ev = decode(&record(RecordKind::BlockComplete, &data, 0), &layouts)
                .unwrap()
                .detail;
            assert_eq!(
                ev,
                Detail::BlockError(BlockError {
                    // Resolved later, off the reader.
                    device: None,
                    dev: DevNum { major: 7, minor: 0 },
                    sector: 24576,
                    nr_sectors: 8,
                    op: BlockOp::Read,
                    rwbs: "R".into(),
                    error: -5,
                    owner: None,
                }),
                "{kernel}"
            );
        }
    }

    #[test]
    fn malformed_records_are_typed_errors() {
        let layouts = Layouts::default();
        assert!(matches!(
            decode(&[0; 3], &layouts),
            Err(DecodeError::NotEnoughBytes { .. })
        ));
        let mut bad = record(RecordKind::Console, b"hi", 2);
        bad[16] = 200;
        assert!(matches!(
            decode(&bad, &layouts),
            Err(DecodeError::SizeMismatch { .. })
        ));
        let mut unknown = record(RecordKind::Console, b"", 0);
        unknown[0] = 77;
        assert_eq!(
            decode(&unknown, &layouts),
            Err(DecodeError::UnknownKind(77))
        );
        assert_eq!(
            decode(&record(RecordKind::HungTask, &[0; 64], 0), &layouts),
            Err(DecodeError::NoFormat(RecordKind::HungTask))
        );
    }
}
