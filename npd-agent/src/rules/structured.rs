//! Structured rules (an npd extension): rules on the eBPF events (hung task, OOM kill, block
//! error) instead of message text, with filters on the event's fields and a message template
//! built from them. Also: which kernel fault a problem is about ([`FaultKey`]), so that the
//! structured event and the kernel's printed line for the same fault are reported once.

use std::time::Duration;

use regex::Regex;

use crate::event::{Detail, EventKind, Field};

/// How long a problem about the same fault of `kind` is de-duplicated, and whether each repeat
/// extends that window. A task stays hung while the detector keeps seeing it (it checks every
/// `hung_task_check_interval_secs`, 120 s by default), so each sighting extends it. An OOM
/// kill is seen twice at most (`mark_victim` and the kernel's `Killed process` line,
/// milliseconds apart), and its key is a pid, which the kernel reuses (`pid_max` is 32768 on
/// small nodes): the window is short, so that a later victim with the same pid is a fault of
/// its own. Kernel log messages are no fault of their own: `None`.
pub fn default_dedup(kind: EventKind) -> Option<DedupWindow> {
    Some(match kind {
        EventKind::Log => return None,
        EventKind::HungTask => DedupWindow {
            window: Duration::from_secs(15 * 60),
            sliding: true,
        },
        EventKind::OomKill => DedupWindow {
            window: Duration::from_secs(30),
            sliding: false,
        },
        EventKind::BlockError => DedupWindow {
            window: Duration::from_secs(60),
            sliding: false,
        },
    })
}

/// How long repeats of one fault are folded into its first report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupWindow {
    /// The window.
    pub window: Duration,
    /// Whether each repeat extends the window (else it runs from the first report).
    pub sliding: bool,
}

/// The field `name` of `kind` (written `shown` in the rule file), or an error that lists the
/// kind's fields.
pub fn field_of(kind: EventKind, name: &str, shown: &str) -> Result<&'static Field, String> {
    kind.field(name).ok_or_else(|| {
        format!(
            "unknown field {shown} for {kind} events; known: {}",
            kind.fields()
                .iter()
                .map(|f| f.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// A filter on one field: the field's text must match the regex entirely.
#[derive(Clone, Debug)]
pub struct FieldFilter {
    /// The field.
    pub field: &'static Field,
    /// `^(?:...)$` of the pattern from the rule file.
    pub regex: Regex,
}

impl FieldFilter {
    /// Whether the event passes (a missing field never does).
    pub fn matches(&self, event: &Detail) -> bool {
        self.field
            .text(event)
            .is_some_and(|v| self.regex.is_match(&v))
    }
}

/// A message template: literal text with `{field}` placeholders (`{{` and `}}` for braces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(&'static Field),
}

impl Template {
    /// Parses a template; the error says what is wrong.
    pub fn parse(text: &str, kind: EventKind) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => {
                                return Err(format!(
                                    "unclosed `{{{name}` (write `{{{{` for a literal brace)"
                                ));
                            }
                        }
                    }
                    let field = field_of(kind, &name, &format!("{{{name}}}"))?;
                    if !lit.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Field(field));
                }
                '}' => return Err("unmatched `}` (write `}}` for a literal brace)".into()),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Text(lit));
        }
        Ok(Self { parts })
    }

    /// The message for an event; a field the kernel did not give renders as `?`.
    pub fn render(&self, event: &Detail) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => match f.text(event) {
                    Some(v) => out.push_str(&v),
                    None => out.push('?'),
                },
            }
        }
        out
    }

    /// The default message of a kind when a rule gives none.
    pub fn default_for(kind: EventKind) -> Self {
        let text = match kind {
            EventKind::Log => "{message}",
            EventKind::HungTask => {
                "task {comm}:{pid} blocked for more than kernel.hung_task_timeout_secs seconds."
            }
            EventKind::OomKill => "Killed process {pid} ({comm})",
            EventKind::BlockError => "{error} error on dev {device}, sector {sector}, op {op}",
        };
        Self::parse(text, kind).unwrap_or(Self { parts: Vec::new() })
    }
}

/// Which kernel fault a problem is about, for correlation and de-duplication: the same fault
/// seen twice (by its tracepoint and by the kernel's text of it, or again by the hung-task
/// detector) is one problem; distinct faults (other victims, other sectors) are distinct
/// problems.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FaultKey {
    /// A hung task, by pid.
    HungTask(i32),
    /// An OOM kill, by the victim's pid.
    OomKill(i32),
    /// A failed block request, by where it failed.
    BlockError {
        /// The disk (partitions folded into their disk) for a sector, the device as named for
        /// a logical block.
        device: String,
        /// Where on it.
        at: BlockAt,
    },
}

/// Where a block I/O error happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockAt {
    /// A request's first sector on the disk: what `block_rq_error` and the kernel's
    /// `I/O error, dev sda, sector N` line report for the same failed request.
    Sector(u64),
    /// A file system's logical block on the named device (`Buffer I/O error on dev sda1,
    /// logical block N`): a failed buffer, one line each.
    LogicalBlock(u64),
}

impl FaultKey {
    /// The fault behind a structured event.
    pub fn of_event(event: &Detail) -> Option<Self> {
        match event {
            Detail::Log(_) => None,
            Detail::HungTask(h) => Some(FaultKey::HungTask(h.pid)),
            Detail::OomKill(o) => Some(FaultKey::OomKill(o.pid)),
            Detail::BlockError(b) => Some(FaultKey::BlockError {
                device: disk_of(&b.device.clone().unwrap_or_else(|| b.dev.to_string())),
                at: BlockAt::Sector(b.sector),
            }),
        }
    }

    /// The fault a kernel message reports, recognised from the kernel's own wording:
    /// `task dd:1234 blocked for more than ...`, `Killed process 1234 (...)`,
    /// `I/O error, dev sda, sector 2048 ...`, `Buffer I/O error on dev sda1, logical block 7`.
    /// A block error line that does not say where is no known fault: every such line counts.
    pub fn of_message(message: &str) -> Option<Self> {
        if let Some(i) = message.find(" blocked for more than ") {
            let head = &message[..i];
            let task = head.rfind("task ")?;
            let (_, pid) = head[task + 5..].rsplit_once(':')?;
            return pid.parse().ok().map(FaultKey::HungTask);
        }
        if let Some(i) = message.find("Killed process ") {
            let rest = &message[i + "Killed process ".len()..];
            return leading_number(rest).map(FaultKey::OomKill);
        }
        for (marker, place, at) in [
            (
                " error, dev ",
                ", sector ",
                BlockAt::Sector as fn(u64) -> BlockAt,
            ),
            (
                "I/O error on dev ",
                ", logical block ",
                BlockAt::LogicalBlock,
            ),
            (
                "I/O error on device ",
                ", logical block ",
                BlockAt::LogicalBlock,
            ),
        ] {
            let Some(i) = message.find(marker) else {
                continue;
            };
            let rest = &message[i + marker.len()..];
            let dev = rest.split([',', ' ']).next().unwrap_or_default();
            let n = rest[dev.len()..]
                .strip_prefix(place)
                .and_then(leading_number)?;
            if dev.is_empty() {
                return None;
            }
            let device = match at(n) {
                BlockAt::Sector(_) => disk_of(dev),
                BlockAt::LogicalBlock(_) => dev.to_owned(),
            };
            return Some(FaultKey::BlockError { device, at: at(n) });
        }
        None
    }

    /// The event kind this fault is about.
    pub fn kind(&self) -> EventKind {
        match self {
            FaultKey::HungTask(_) => EventKind::HungTask,
            FaultKey::OomKill(_) => EventKind::OomKill,
            FaultKey::BlockError { .. } => EventKind::BlockError,
        }
    }
}

/// The decimal number at the start of `text`.
fn leading_number<T: std::str::FromStr>(text: &str) -> Option<T> {
    let end = text
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(text.len());
    text[..end].parse().ok()
}

/// The disk a block device name belongs to: `sda1` -> `sda`, `nvme0n1p2` -> `nvme0n1`,
/// `mmcblk0p1` -> `mmcblk0`, `loop0p1` -> `loop0`; other names unchanged.
pub fn disk_of(name: &str) -> String {
    let b = name.as_bytes();
    let digits = b.iter().rev().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 || digits == b.len() {
        return name.to_owned();
    }
    let head = &name[..name.len() - digits];
    if let Some(disk) = head.strip_suffix('p')
        && disk.as_bytes().last().is_some_and(u8::is_ascii_digit)
    {
        return disk.to_owned();
    }
    if ["sd", "vd", "xvd", "hd"]
        .iter()
        .any(|p| head.starts_with(p))
        && head.bytes().all(|c| c.is_ascii_lowercase())
    {
        return head.to_owned();
    }
    name.to_owned()
}

/// The structured fields of a kernel event as JSON, for the report's extra fields.
pub fn event_fields(event: &Detail) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(event) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{OomKill, fixtures};

    fn block(device: Option<&str>) -> Detail {
        Detail::from(fixtures::block_error(device))
    }

    #[test]
    fn templates() {
        let t =
            Template::parse("{error} on {device} ({dev}) {{x}}", EventKind::BlockError).unwrap();
        assert_eq!(t.render(&block(Some("loop0"))), "EIO on loop0 (7:0) {x}");
        assert_eq!(t.render(&block(None)), "EIO on 7:0 (7:0) {x}");
        assert!(
            Template::parse("{nope}", EventKind::HungTask)
                .unwrap_err()
                .contains("unknown field {nope}")
        );
        assert!(Template::parse("a } b", EventKind::HungTask).is_err());
        assert!(
            Template::parse("{pid", EventKind::HungTask)
                .unwrap_err()
                .contains("unclosed")
        );
        let oom = Detail::from(OomKill {
            pid: 9,
            ..Default::default()
        });
        assert_eq!(
            Template::default_for(EventKind::OomKill).render(&oom),
            "Killed process 9 (?)"
        );
    }

    fn sector(device: &str, n: u64) -> Option<FaultKey> {
        Some(FaultKey::BlockError {
            device: device.into(),
            at: BlockAt::Sector(n),
        })
    }

    fn logical(device: &str, n: u64) -> Option<FaultKey> {
        Some(FaultKey::BlockError {
            device: device.into(),
            at: BlockAt::LogicalBlock(n),
        })
    }

    #[test]
    fn fault_keys_from_kernel_text() {
        for (msg, key) in [
            (
                "INFO: task dd:1234 blocked for more than 120 seconds.",
                Some(FaultKey::HungTask(1234)),
            ),
            (
                "INFO: task kworker/u8:2:77 blocked for more than 2 seconds.",
                Some(FaultKey::HungTask(77)),
            ),
            (
                "task my task:5 blocked for more than 2 seconds.",
                Some(FaultKey::HungTask(5)),
            ),
            (
                "Out of memory: Killed process 1234 (stress) total-vm:10kB, anon-rss:1kB",
                Some(FaultKey::OomKill(1234)),
            ),
            (
                "Memory cgroup out of memory: Killed process 42 (x) total-vm:1kB",
                Some(FaultKey::OomKill(42)),
            ),
            (
                "I/O error, dev loop0, sector 24576 op 0x0:(READ) flags 0x80700 phys_seg 1 prio class 2",
                sector("loop0", 24576),
            ),
            (
                "blk_update_request: I/O error, dev sda1, sector 2048",
                sector("sda", 2048),
            ),
            (
                "critical medium error, dev nvme0n1p1, sector 99 op 0x1:(WRITE)",
                sector("nvme0n1", 99),
            ),
            (
                "Buffer I/O error on dev sda1, logical block 3072, async page read",
                logical("sda1", 3072),
            ),
            (
                "Buffer I/O error on device nvme0n1p2, logical block 1",
                logical("nvme0n1p2", 1),
            ),
            // Where is not said: not a known fault (each line is a problem, as in NPD).
            ("I/O error, dev sda, sector", None),
            ("Buffer I/O error on dev sda1, async page read", None),
            ("Buffer I/O error on dev , logical block 3", None),
            ("EXT4-fs error (device sda1): oops", None),
        ] {
            assert_eq!(FaultKey::of_message(msg), key, "{msg:?}");
        }
        assert_eq!(
            FaultKey::of_event(&block(Some("loop0"))),
            sector("loop0", 24576)
        );
        // The text and the tracepoint of one failed request are one fault.
        assert_eq!(
            FaultKey::of_event(&block(Some("loop0"))),
            FaultKey::of_message("I/O error, dev loop0, sector 24576 op 0x0:(READ) flags 0x0")
        );
    }

    #[test]
    fn disks() {
        for (part, disk) in [
            ("sda1", "sda"),
            ("sda", "sda"),
            ("vdb12", "vdb"),
            ("xvda1", "xvda"),
            ("nvme0n1p2", "nvme0n1"),
            ("nvme0n1", "nvme0n1"),
            ("mmcblk0p1", "mmcblk0"),
            ("loop0", "loop0"),
            ("loop0p1", "loop0"),
            ("dm-3", "dm-3"),
            ("7:0", "7:0"),
        ] {
            assert_eq!(disk_of(part), disk, "{part}");
        }
    }
}
