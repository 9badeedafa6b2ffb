//! The kernel events npd understands, as the sensor decodes them (from eBPF records or from
//! `/dev/kmsg`) and as the rules consume them. Plain data, no I/O.
//!
//! One vocabulary: [`EventKind`] names each kind once (its name in JSON, rule files and metric
//! labels, and its index in per-kind counters, [`PerKind`]), and each kind's field table
//! ([`EventKind::fields`]) is the one list of its fields: rule filters, message templates and
//! the JSON of an event all read it. Adding a kind: see `docs/design.md`.
//!
//! `--kernel-events` prints each event as one JSON object per line, e.g.
//! `{"kind":"kernel","event":"hung_task","pid":42,"comm":"dd"}`.

use std::{borrow::Cow, fmt};

use serde::{Serialize, Serializer, ser::SerializeMap as _};

use crate::time::Mono;

/// The kinds of kernel events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// A kernel log message ([`LogMessage`]).
    Log,
    /// The hung-task detector found a task blocked ([`HungTask`]).
    HungTask,
    /// The OOM killer chose a victim ([`OomKill`]).
    OomKill,
    /// A block request failed ([`BlockError`]).
    BlockError,
}

impl EventKind {
    /// Every kind, in index order.
    pub const ALL: [EventKind; 4] = [
        EventKind::Log,
        EventKind::HungTask,
        EventKind::OomKill,
        EventKind::BlockError,
    ];
    /// How many kinds there are.
    pub const COUNT: usize = Self::ALL.len();

    /// The kind's index in [`EventKind::ALL`] and in every [`PerKind`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The kind's name in JSON, rule files (`"event": "oom_kill"`) and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::Log => "log",
            EventKind::HungTask => "hung_task",
            EventKind::OomKill => "oom_kill",
            EventKind::BlockError => "block_error",
        }
    }

    /// The kind named `name` ([`EventKind::as_str`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Whether structured rules may select it (every kind but kernel log messages, which log
    /// rules match by their text).
    pub const fn is_structured(self) -> bool {
        !matches!(self, EventKind::Log)
    }

    /// The kind's fields, in the order JSON writes them.
    pub fn fields(self) -> &'static [Field] {
        match self {
            EventKind::Log => &LOG_FIELDS,
            EventKind::HungTask => &HUNG_TASK_FIELDS,
            EventKind::OomKill => &OOM_KILL_FIELDS,
            EventKind::BlockError => &BLOCK_ERROR_FIELDS,
        }
    }

    /// The field named `name`, if the kind has one.
    pub fn field(self, name: &str) -> Option<&'static Field> {
        self.fields().iter().find(|f| f.name == name)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One value per [`EventKind`] (counters by kind), indexed by the kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerKind<T>(pub [T; EventKind::COUNT]);

impl<T> PerKind<T> {
    /// The value of each kind from `f`.
    pub fn from_fn(mut f: impl FnMut(EventKind) -> T) -> Self {
        PerKind(std::array::from_fn(|i| f(EventKind::ALL[i])))
    }

    /// Each kind with its value.
    pub fn iter(&self) -> impl Iterator<Item = (EventKind, &T)> {
        EventKind::ALL.into_iter().zip(self.0.iter())
    }
}

impl<T> std::ops::Index<EventKind> for PerKind<T> {
    type Output = T;
    fn index(&self, kind: EventKind) -> &T {
        &self.0[kind.index()]
    }
}

impl<T> std::ops::IndexMut<EventKind> for PerKind<T> {
    fn index_mut(&mut self, kind: EventKind) -> &mut T {
        &mut self.0[kind.index()]
    }
}

/// One thing the kernel told us, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelEvent {
    /// When the kernel saw it, on its monotonic clock: the record's `bpf_ktime_get_ns()`, or
    /// a `/dev/kmsg` record's time since boot.
    pub at: Mono,
    /// What it saw.
    pub detail: Detail,
}

impl KernelEvent {
    /// An event seen at `at`.
    pub fn new(at: Mono, detail: impl Into<Detail>) -> Self {
        KernelEvent {
            at,
            detail: detail.into(),
        }
    }

    /// Its kind.
    pub fn kind(&self) -> EventKind {
        self.detail.kind()
    }
}

/// What the kernel saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detail {
    /// A kernel log message (`printk:console`, or a `/dev/kmsg` record).
    Log(LogMessage),
    /// The hung-task detector found a task blocked (`sched:sched_process_hang`).
    HungTask(HungTask),
    /// The OOM killer chose a victim (`oom:mark_victim`).
    OomKill(OomKill),
    /// A block request failed (`block:block_rq_error`).
    BlockError(BlockError),
}

impl Detail {
    /// Its kind.
    pub fn kind(&self) -> EventKind {
        match self {
            Detail::Log(_) => EventKind::Log,
            Detail::HungTask(_) => EventKind::HungTask,
            Detail::OomKill(_) => EventKind::OomKill,
            Detail::BlockError(_) => EventKind::BlockError,
        }
    }

    /// Who it happened to, when pod attribution found out (log messages: never).
    pub fn owner(&self) -> Option<&Owner> {
        match self {
            Detail::Log(_) => None,
            Detail::HungTask(h) => h.owner.as_deref(),
            Detail::OomKill(o) => o.owner.as_deref(),
            Detail::BlockError(b) => b.owner.as_deref(),
        }
    }

    /// Where pod attribution puts what it found (log messages: nowhere).
    pub fn owner_mut(&mut self) -> Option<&mut Option<Box<Owner>>> {
        match self {
            Detail::Log(_) => None,
            Detail::HungTask(h) => Some(&mut h.owner),
            Detail::OomKill(o) => Some(&mut o.owner),
            Detail::BlockError(b) => Some(&mut b.owner),
        }
    }

    /// The value of the field named `name` as rules and templates see it (see [`Field`]).
    pub fn field_text(&self, name: &str) -> Option<Cow<'_, str>> {
        self.kind().field(name)?.text(self)
    }
}

macro_rules! detail_from {
    ($($variant:ident),*) => {$(
        impl From<$variant> for Detail {
            fn from(v: $variant) -> Detail {
                Detail::$variant(v)
            }
        }
    )*};
}
detail_from!(HungTask, OomKill, BlockError);

impl From<LogMessage> for Detail {
    fn from(v: LogMessage) -> Detail {
        Detail::Log(v)
    }
}

/// `{"event":"<kind>", <each field the event has>}`, from the kind's field table.
impl Serialize for Detail {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let kind = self.kind();
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("event", kind.as_str())?;
        for field in kind.fields().iter().filter(|f| f.in_json) {
            match (field.get)(self) {
                Some(Value::Int(v)) => map.serialize_entry(field.name, &v)?,
                Some(Value::Uint(v)) => map.serialize_entry(field.name, &v)?,
                Some(Value::Text(v)) => map.serialize_entry(field.name, v)?,
                Some(Value::Errno(v)) => map.serialize_entry(field.name, &v)?,
                Some(Value::Dev(v)) => map.serialize_entry(field.name, &v.to_string())?,
                None => {}
            }
        }
        // Pod attribution, nested as the report schema has it (`docs/pods.md`).
        if let Some(owner) = self.owner() {
            for (key, value) in owner.json(kind) {
                map.serialize_entry(key, &value)?;
            }
        }
        map.end()
    }
}

/// The JSON of an event is the JSON of what it saw (its time is printed by whoever knows the
/// wall clock).
impl Serialize for KernelEvent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.detail.serialize(s)
    }
}

/// One field of a kind of event: its name (in JSON, in rule filters and in message
/// templates), and how to read it.
pub struct Field {
    /// The name.
    pub name: &'static str,
    /// What it means, for the rules reference.
    pub doc: &'static str,
    /// Reads it; `None` when the event does not have it (the kernel did not give it).
    get: fn(&Detail) -> Option<Value<'_>>,
    /// When the event does not have it, rules and templates see this field instead.
    fallback: Option<&'static str>,
    /// Whether JSON carries it (else only rules and templates see it).
    in_json: bool,
}

/// Fields are statics: one is equal only to itself.
impl PartialEq for Field {
    fn eq(&self, other: &Field) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for Field {}

impl fmt::Debug for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl Field {
    /// The field's value as rules filter it and templates render it: numbers in decimal, an
    /// errno by its name (`EIO`) when it has one, the fallback field's value when this one is
    /// missing.
    pub fn text<'a>(&self, detail: &'a Detail) -> Option<Cow<'a, str>> {
        match (self.get)(detail) {
            Some(v) => Some(v.text()),
            None => {
                let fallback = detail.kind().field(self.fallback?)?;
                (fallback.get)(detail).map(Value::text)
            }
        }
    }
}

/// A field's value.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Value<'a> {
    Int(i64),
    Uint(u64),
    Text(&'a str),
    /// A device number: `major:minor`.
    Dev(DevNum),
    /// A negative errno: a number in JSON, its name (`EIO`) in rules and templates.
    Errno(i32),
}

impl<'a> Value<'a> {
    fn text(self) -> Cow<'a, str> {
        match self {
            Value::Int(v) => Cow::Owned(v.to_string()),
            Value::Uint(v) => Cow::Owned(v.to_string()),
            Value::Text(v) => Cow::Borrowed(v),
            Value::Dev(v) => Cow::Owned(v.to_string()),
            Value::Errno(v) => {
                errno_name(v).map_or_else(|| Cow::Owned(v.to_string()), Cow::Borrowed)
            }
        }
    }
}

/// The name of a (negative) errno that block requests fail with.
pub fn errno_name(error: i32) -> Option<&'static str> {
    Some(match error.wrapping_neg() {
        libc::EIO => "EIO",
        libc::ENOSPC => "ENOSPC",
        libc::ENOLINK => "ENOLINK",
        libc::EREMOTEIO => "EREMOTEIO",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EILSEQ => "EILSEQ",
        libc::ENODATA => "ENODATA",
        libc::EBADE => "EBADE",
        libc::ENOMEM => "ENOMEM",
        libc::EAGAIN => "EAGAIN",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENODEV => "ENODEV",
        libc::ENXIO => "ENXIO",
        libc::EBUSY => "EBUSY",
        libc::EINVAL => "EINVAL",
        libc::ENOMSG => "ENOMSG",
        _ => return None,
    })
}

/// A field of pod attribution ([`Owner`], read as `$o`), for rules and templates only: JSON
/// nests them (`"pod": {...}`).
macro_rules! owner_field {
    ($name:literal, $doc:literal, |$o:ident| $get:expr) => {
        Field {
            name: $name,
            doc: $doc,
            get: |detail| detail.owner().and_then(|$o| $get),
            fallback: None,
            in_json: false,
        }
    };
}

/// A task's event's fields (hung task, OOM kill): `$field`s, then pod attribution's.
macro_rules! with_task_owner_fields {
    ($($field:expr),* $(,)?) => {
        [
            $($field,)*
            owner_field!("cgroup", "the task's cgroup path (pod attribution)", |o| o
                .cgroup
                .as_deref()
                .map(Value::Text)),
            owner_field!("namespace", "the pod's namespace (pod attribution)", |o| o
                .pod()?
                .namespace
                .as_deref()
                .map(Value::Text)),
            owner_field!("pod", "the pod's name (pod attribution)", |o| o
                .pod()?
                .name
                .as_deref()
                .map(Value::Text)),
            owner_field!("pod_uid", "the pod's UID (pod attribution)", |o| o
                .pod()
                .map(|p| Value::Text(&p.uid))),
            owner_field!("container", "the container's name (pod attribution)", |o| o
                .container
                .as_ref()?
                .name
                .as_deref()
                .map(Value::Text)),
            owner_field!("container_id", "the container's ID (pod attribution)", |o| o
                .container
                .as_ref()
                .map(|c| Value::Text(&c.id))),
        ]
    };
}

/// A field of kind `$variant`, read from the event's struct as `$x`.
macro_rules! field {
    ($variant:ident, $name:literal, $doc:literal, |$x:ident| $get:expr) => {
        field!($variant, $name, $doc, |$x| $get, fallback: None, json: true)
    };
    ($variant:ident, $name:literal, $doc:literal, |$x:ident| $get:expr, fallback: $fallback:expr, json: $json:expr) => {
        Field {
            name: $name,
            doc: $doc,
            get: |detail| match detail {
                Detail::$variant($x) => $get,
                _ => None,
            },
            fallback: $fallback,
            in_json: $json,
        }
    };
}

static LOG_FIELDS: [Field; 3] = [
    field!(Log, "message", "the message text", |l| Some(Value::Text(
        &l.message
    ))),
    field!(
        Log,
        "truncated_from",
        "the message's full length in bytes, when it was cut short",
        |l| { l.truncated_from.map(|n| Value::Uint(n as u64)) }
    ),
    field!(
        Log,
        "seq",
        "the kernel's sequence number of the record (`/dev/kmsg`)",
        |l| { l.seq.map(Value::Uint) }
    ),
];

static HUNG_TASK_FIELDS: [Field; 8] = with_task_owner_fields![
    field!(HungTask, "pid", "the stuck task's pid", |h| Some(
        Value::Int(h.pid.into())
    )),
    field!(HungTask, "comm", "the stuck task's command name", |h| Some(
        Value::Text(&h.comm)
    )),
];

static OOM_KILL_FIELDS: [Field; 15] = with_task_owner_fields![
    field!(OomKill, "pid", "the victim's pid", |o| Some(Value::Int(
        o.pid.into()
    ))),
    field!(
        OomKill,
        "comm",
        "the victim's command name (kernels since 2024)",
        |o| { o.comm.as_deref().map(Value::Text) }
    ),
    field!(OomKill, "uid", "the victim's uid", |o| o
        .uid
        .map(|v| Value::Uint(v.into()))),
    field!(OomKill, "total_vm_kb", "total virtual memory, KiB", |o| o
        .total_vm_kb
        .map(Value::Uint)),
    field!(
        OomKill,
        "anon_rss_kb",
        "anonymous resident memory, KiB",
        |o| { o.anon_rss_kb.map(Value::Uint) }
    ),
    field!(
        OomKill,
        "file_rss_kb",
        "file-backed resident memory, KiB",
        |o| { o.file_rss_kb.map(Value::Uint) }
    ),
    field!(
        OomKill,
        "shmem_rss_kb",
        "shared-memory resident memory, KiB",
        |o| { o.shmem_rss_kb.map(Value::Uint) }
    ),
    field!(OomKill, "pgtables_kb", "page tables, KiB", |o| o
        .pgtables_kb
        .map(Value::Uint)),
    field!(
        OomKill,
        "oom_score_adj",
        "the victim's oom_score_adj",
        |o| { o.oom_score_adj.map(|v| Value::Int(v.into())) }
    ),
];

static BLOCK_ERROR_FIELDS: [Field; 11] = [
    field!(
        BlockError,
        "device",
        "the device's kernel name (`sda1`); its major:minor when the name is unknown",
        |b| b.device.as_deref().map(Value::Text),
        fallback: Some("dev"),
        json: true
    ),
    field!(BlockError, "dev", "`major:minor`", |b| Some(Value::Dev(
        b.dev
    ))),
    field!(
        BlockError,
        "sector",
        "the request's first sector (512-byte units)",
        |b| { Some(Value::Uint(b.sector)) }
    ),
    field!(
        BlockError,
        "nr_sectors",
        "the request's length in sectors",
        |b| { Some(Value::Uint(b.nr_sectors.into())) }
    ),
    field!(
        BlockError,
        "op",
        "`READ`, `WRITE`, `FLUSH`, `DISCARD`, `SECURE_ERASE` or `OTHER`",
        |b| { Some(Value::Text(b.op.as_str())) }
    ),
    field!(
        BlockError,
        "rwbs",
        "the kernel's rwbs flags (`R`, `WS`, `FWFS`...)",
        |b| { Some(Value::Text(&b.rwbs)) }
    ),
    field!(
        BlockError,
        "error",
        "the error: `EIO`, `ENOSPC`... in rules and messages, -5... in JSON",
        |b| { Some(Value::Errno(b.error)) }
    ),
    field!(
        BlockError,
        "errno",
        "the error's number (5 for EIO)",
        |b| Some(Value::Uint(b.error.unsigned_abs().into())),
        fallback: None,
        json: false
    ),
    owner_field!(
        "namespace",
        "the namespace of the first pod with a volume on the device (pod attribution)",
        |o| o.pod()?.namespace.as_deref().map(Value::Text)
    ),
    owner_field!(
        "pod",
        "the name of the first pod with a volume on the device (pod attribution)",
        |o| o.pod()?.name.as_deref().map(Value::Text)
    ),
    owner_field!(
        "pod_uid",
        "the UID of the first pod with a volume on the device (pod attribution)",
        |o| o.pod().map(|p| Value::Text(&p.uid))
    ),
];

/// A kernel log message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogMessage {
    /// The message text, without level prefix or trailing newline. Bytes that are not UTF-8
    /// are replaced with U+FFFD.
    pub message: String,
    /// When the message was cut short on its way to us: its full length in bytes.
    pub truncated_from: Option<usize>,
    /// The kernel's sequence number of the record, when the source gives one (`/dev/kmsg`).
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HungTask {
    /// The stuck task's pid (thread id).
    pub pid: i32,
    /// The stuck task's command name.
    pub comm: String,
    /// Its cgroup, pod and container (see [`Owner`]), when attribution found them.
    pub owner: Option<Box<Owner>>,
}

/// The OOM killer's victim, with every field the running kernel's tracepoint provides.
/// Sizes are in KiB, as the kernel reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OomKill {
    /// The victim's pid.
    pub pid: i32,
    /// The victim's command name (kernels since 2024; older ones only give the pid).
    pub comm: Option<String>,
    /// The victim's uid.
    pub uid: Option<u32>,
    /// Total virtual memory, KiB.
    pub total_vm_kb: Option<u64>,
    /// Anonymous resident memory, KiB.
    pub anon_rss_kb: Option<u64>,
    /// File-backed resident memory, KiB.
    pub file_rss_kb: Option<u64>,
    /// Shared-memory resident memory, KiB.
    pub shmem_rss_kb: Option<u64>,
    /// Page tables, KiB.
    pub pgtables_kb: Option<u64>,
    /// The victim's oom_score_adj.
    pub oom_score_adj: Option<i16>,
    /// The victim's memory cgroup as the kernel walked it when it marked the victim (kernels
    /// whose `mark_victim` passes the task; see `sensor::btf`). Pod attribution's first source.
    pub memcg: Option<String>,
    /// Its cgroup, pod and container (see [`Owner`]), when attribution found them.
    pub owner: Option<Box<Owner>>,
}

/// A failed block I/O request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockError {
    /// The device's kernel name (`loop0`, `nvme0n1`), when it could be resolved.
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
    /// The pods whose volumes are mounted from the device (see [`Owner`]), when attribution
    /// found any.
    pub owner: Option<Box<Owner>>,
}

/// Who a problem happened to, as pod attribution found it (`crate::pods`): the task's cgroup
/// and the pod and container it belongs to, or, for a failed block request, the pods whose
/// volumes live on the device. Each name only when it is known: a pod the cache has not seen
/// (deleted, or no cluster) is its UID alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// The task's cgroup path, from the kernel's own `oom-kill:` line or `/proc/<pid>/cgroup`.
    pub cgroup: Option<String>,
    /// The pods: one for a task; for a device, every pod with a volume on it.
    pub pods: Vec<PodRef>,
    /// The task's container.
    pub container: Option<ContainerRef>,
}

/// A pod: its UID, and its namespace and name when the pod cache knows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PodRef {
    /// The pod's namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The pod's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `metadata.uid`.
    pub uid: String,
}

impl PodRef {
    /// `namespace/name` when both are known.
    pub fn qualified_name(&self) -> Option<String> {
        Some(format!(
            "{}/{}",
            self.namespace.as_ref()?,
            self.name.as_ref()?
        ))
    }
}

/// A container: its runtime ID, and its name when the pod cache knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ContainerRef {
    /// The container's name in the pod spec.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The runtime's ID (64 hex digits for containerd, CRI-O and Docker).
    pub id: String,
}

impl Owner {
    /// Its JSON entries for an event of `kind`: `cgroup`, then `pod` (a task's) or `pods` (a
    /// device's), then `container`; each only when known.
    pub fn json(&self, kind: EventKind) -> Vec<(&'static str, serde_json::Value)> {
        let mut out = Vec::new();
        if let Some(cgroup) = &self.cgroup {
            out.push(("cgroup", serde_json::Value::from(cgroup.as_str())));
        }
        let pods = if kind == EventKind::BlockError {
            (!self.pods.is_empty()).then(|| ("pods", serde_json::to_value(&self.pods)))
        } else {
            self.pod().map(|pod| ("pod", serde_json::to_value(pod)))
        };
        if let Some((key, Ok(value))) = pods {
            out.push((key, value));
        }
        if let Some(Ok(container)) = self.container.as_ref().map(serde_json::to_value) {
            out.push(("container", container));
        }
        out
    }

    /// The pods known by namespace and name: those an Event can be posted on.
    pub fn named_pods(&self) -> Vec<PodRef> {
        self.pods
            .iter()
            .filter(|p| p.qualified_name().is_some())
            .cloned()
            .collect()
    }

    /// The first pod (the task's, for a task).
    pub fn pod(&self) -> Option<&PodRef> {
        self.pods.first()
    }

    /// What a report's message adds, after NPD's message: `; pod <ns>/<name>, container <c>`
    /// (`; pod uid <uid>` when the pod's name is not known; several pods joined by `, `).
    /// `None` when there is no pod.
    pub fn message_suffix(&self) -> Option<String> {
        if self.pods.is_empty() {
            return None;
        }
        let pods: Vec<String> = self
            .pods
            .iter()
            .map(|p| {
                p.qualified_name()
                    .unwrap_or_else(|| format!("uid {}", p.uid))
            })
            .collect();
        let mut out = format!("; pod {}", pods.join(", "));
        if let Some(name) = self.container.as_ref().and_then(|c| c.name.as_deref()) {
            out.push_str(", container ");
            out.push_str(name);
        }
        Some(out)
    }
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

/// A block request's operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    fn json_from_the_field_table() {
        let ev = KernelEvent::new(Mono::ZERO, fixtures::block_error(Some("loop0")));
        assert_eq!(
            serde_json::to_value(&ev).unwrap(),
            serde_json::json!({"event":"block_error","device":"loop0","dev":"7:0","sector":24576,
                "nr_sectors":8,"op":"READ","rwbs":"R","error":-5})
        );
        let unresolved = KernelEvent::new(Mono::ZERO, fixtures::block_error(None));
        assert!(
            serde_json::to_value(&unresolved)
                .unwrap()
                .get("device")
                .is_none()
        );
        assert_eq!(
            serde_json::to_value(KernelEvent::new(Mono::ZERO, LogMessage::new("hello"))).unwrap(),
            serde_json::json!({"event":"log","message":"hello"})
        );
        let oom = Detail::OomKill(OomKill {
            pid: 9,
            comm: Some("x".into()),
            oom_score_adj: Some(-1000),
            memcg: None,
            ..OomKill::default()
        });
        assert_eq!(
            serde_json::to_value(&oom).unwrap(),
            serde_json::json!({"event":"oom_kill","pid":9,"comm":"x","oom_score_adj":-1000})
        );
    }

    #[test]
    fn rules_see_the_same_fields_as_text() {
        let block = Detail::from(fixtures::block_error(None));
        let text = |name: &str| block.field_text(name).map(Cow::into_owned);
        assert_eq!(text("error").as_deref(), Some("EIO"));
        assert_eq!(text("errno").as_deref(), Some("5"));
        // An unresolved device is its major:minor.
        assert_eq!(text("device").as_deref(), Some("7:0"));
        assert_eq!(text("op").as_deref(), Some("READ"));
        assert_eq!(text("nope"), None);
        let unknown = Detail::from(BlockError {
            error: -4095,
            ..fixtures::block_error(Some("sda"))
        });
        assert_eq!(unknown.field_text("error").as_deref(), Some("-4095"));
        let oom = Detail::from(OomKill::default());
        assert_eq!(
            oom.field_text("comm"),
            None,
            "a field the kernel did not give"
        );
        assert_eq!(oom.field_text("pid").as_deref(), Some("0"));
    }

    #[test]
    fn one_vocabulary() {
        for (i, kind) in EventKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), i);
            assert_eq!(EventKind::from_name(kind.as_str()), Some(kind));
            assert_eq!(
                kind.fields().iter().filter(|f| f.name == "event").count(),
                0
            );
        }
        assert_eq!(EventKind::from_name("printk"), None);
        let mut counts = PerKind::<u64>::default();
        counts[EventKind::OomKill] += 2;
        assert_eq!(counts.0, [0, 0, 2, 0]);
        assert_eq!(
            counts
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect::<Vec<_>>(),
            ["log=0", "hung_task=0", "oom_kill=2", "block_error=0"]
        );
    }
}

/// Events for tests, shared by every module's tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// A failed 8-sector read at sector 24576 of 7:0 (what the loop-device recipe makes).
    pub(crate) fn block_error(device: Option<&str>) -> BlockError {
        BlockError {
            device: device.map(str::to_owned),
            dev: DevNum { major: 7, minor: 0 },
            sector: 24576,
            nr_sectors: 8,
            op: BlockOp::Read,
            rwbs: "R".into(),
            error: -5,
            owner: None,
        }
    }

    /// A hung task.
    pub(crate) fn hung(pid: i32, comm: &str) -> HungTask {
        HungTask {
            pid,
            comm: comm.into(),
            owner: None,
        }
    }
}
