//! Pod attribution: the pod and container behind an OOM kill, a hung task or a failed block
//! request, taken as close to the kernel as possible, and named from a cache of this node's
//! pods. Runs in the enrichment step (`crate::enrich`), off the ring reader; the lookups that
//! read files run on tokio's blocking pool.
//!
//! - **OOM kill**: on kernels whose `oom:mark_victim` passes the victim's task (6.8, and
//!   stable kernels it was taken into), an eBPF program walks the victim's memory cgroup in the
//!   kernel as it is marked ([`crate::event::OomKill::memcg`]): exact, for every kill. Elsewhere
//!   the kernel prints `oom-kill:...,task_memcg=<path>,...,pid=<pid>` for every
//!   kill, before it marks the victim. That line passes through here first, so the victim's
//!   memory cgroup comes from the kernel itself. `printk:console` sees the line in the pieces
//!   the kernel prints it in (`pr_cont`: `oom-kill:constraint=...`, `,task_memcg=`, the path,
//!   `,task=<comm>,pid=<pid>,uid=<uid>`); they are put together here (`/dev/kmsg` has it whole). Where the line is missing (its record lost,
//!   or not printed), `/proc/<pid>/cgroup` is read at once; a victim already gone is counted.
//! - **Hung task**: the task is stuck, so `/proc/<pid>/cgroup` is stable.
//! - **Block error**: the pods whose volumes are mounted from the device, from the host's
//!   mount table ([`volumes`]).
//!
//! The cgroup path gives the pod's UID and the container's ID ([`cgroup`]); the cache
//! ([`PodCache`]) gives their names, when it has them. What is found goes into the event's
//! [`Owner`], which rules, templates, reports and the Kubernetes exporter read.

pub mod cache;
pub mod cgroup;
pub mod volumes;

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
};

use prometheus::{IntCounterVec, IntGauge, Registry};

pub use cache::PodCache;

use crate::event::{Detail, DevNum, EventKind, Owner};

/// Where attribution looks on the host.
#[derive(Clone, Debug)]
pub struct Paths {
    /// The host's `/proc` (in a container: the host's, mounted in, e.g. `/host/proc`).
    pub proc: PathBuf,
    /// kubelet's `--root-dir` (`/var/lib/kubelet`), as the host's mount table names it.
    pub kubelet_root: PathBuf,
    /// Where block device numbers resolve (`/sys/dev/block`).
    pub dev_block: PathBuf,
}

/// What attribution found, for `npd_pod_attributions_total{kind, result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A pod, named from the cache.
    Named,
    /// A pod the cache does not have (deleted, not yet seen, or no cluster): its UID only.
    UidOnly,
    /// Not a pod's (a system process; a device with no pod volume).
    NoPod,
    /// The task was gone before its cgroup could be read (an OOM victim already reaped with
    /// its `oom-kill:` line missing).
    TaskGone,
}

impl Outcome {
    const ALL: [Outcome; 4] = [
        Outcome::Named,
        Outcome::UidOnly,
        Outcome::NoPod,
        Outcome::TaskGone,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Named => "named",
            Outcome::UidOnly => "uid_only",
            Outcome::NoPod => "no_pod",
            Outcome::TaskGone => "task_gone",
        }
    }
}

/// Attribution's metrics.
#[derive(Clone, Debug)]
pub struct PodMetrics {
    /// `npd_pod_attributions_total{kind, result}`.
    pub attributions: IntCounterVec,
    /// `npd_pod_cache_pods`.
    pub cached_pods: IntGauge,
}

impl Default for PodMetrics {
    fn default() -> Self {
        let attributions = crate::metrics::int_counter_vec(
            "npd_pod_attributions_total",
            "Kernel problems attributed to pods, by event kind and result: named (pod found), \
             uid_only (pod not in the cache), no_pod (not a pod's), task_gone (the task exited \
             before its cgroup could be read).",
            &["kind", "result"],
        );
        for kind in [
            EventKind::OomKill,
            EventKind::HungTask,
            EventKind::BlockError,
        ] {
            for outcome in Outcome::ALL {
                attributions.with_label_values(&[kind.as_str(), outcome.as_str()]);
            }
        }
        PodMetrics {
            attributions,
            cached_pods: crate::metrics::int_gauge(
                "npd_pod_cache_pods",
                "Pods of this node in npd's pod cache.",
            ),
        }
    }
}

impl PodMetrics {
    /// Registers them (once per process).
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        crate::metrics::register(registry, &self.attributions)?;
        crate::metrics::register(registry, &self.cached_pods)
    }

    fn count(&self, kind: EventKind, outcome: Outcome) {
        self.attributions
            .with_label_values(&[kind.as_str(), outcome.as_str()])
            .inc();
    }
}

/// How many `oom-kill:` lines are remembered until their victim's event comes.
const OOM_LINES: usize = 64;
/// An `oom-kill:` line in pieces is given up when it grows past this many bytes or pieces
/// without ending (`,uid=<uid>`).
const OOM_LINE_BYTES: usize = 4096;
const OOM_LINE_PIECES: usize = 16;

/// Finds the pod behind kernel events.
#[derive(Clone)]
pub struct Attributor {
    paths: Paths,
    cache: PodCache,
    metrics: PodMetrics,
    /// The newest `oom-kill:` lines: (victim pid, its memory cgroup).
    oom_lines: VecDeque<(i32, String)>,
    /// An `oom-kill:` line whose pieces are still coming, and how many came.
    oom_pieces: Option<(String, usize)>,
}

impl Attributor {
    /// Attribution with these host paths, naming pods from `cache`.
    pub fn new(paths: Paths, cache: PodCache, metrics: PodMetrics) -> Self {
        Attributor {
            paths,
            cache,
            metrics,
            oom_lines: VecDeque::with_capacity(OOM_LINES),
            oom_pieces: None,
        }
    }

    /// A kernel message passing by: remembers the victim's cgroup of an `oom-kill:` line,
    /// whole or in pieces.
    pub fn note_message(&mut self, message: &str) {
        let line = if message.starts_with("oom-kill:") {
            self.oom_pieces.insert((message.to_owned(), 1))
        } else if let Some(pieces) = &mut self.oom_pieces {
            pieces.0.push_str(message);
            pieces.1 += 1;
            pieces
        } else {
            return;
        };
        let ended = cgroup::oom_kill_line(&line.0);
        // A path with a blank in it is pieces of another message that came in between.
        let parsed = ended
            .filter(|(_, memcg)| memcg.starts_with('/') && !memcg.contains(char::is_whitespace))
            .map(|(pid, memcg)| (pid, memcg.to_owned()));
        let gave_up = line.0.len() > OOM_LINE_BYTES || line.1 >= OOM_LINE_PIECES;
        if ended.is_some() || gave_up {
            self.oom_pieces = None;
        }
        if let Some(found) = parsed {
            if self.oom_lines.len() == OOM_LINES {
                self.oom_lines.pop_front();
            }
            self.oom_lines.push_back(found);
        }
    }

    /// Fills in the event's [`Owner`] (nothing for log messages).
    pub async fn attribute(&mut self, detail: &mut Detail) {
        let owner = match detail {
            Detail::Log(_) => return,
            Detail::OomKill(o) => match o.memcg.clone() {
                Some(memcg) => self.oom_victim_in(o.pid, memcg),
                None => self.oom_victim(o.pid),
            },
            Detail::HungTask(h) => self.task(h.pid, EventKind::HungTask),
            Detail::BlockError(b) => self.device(b.dev).await,
        };
        if let Some(slot) = detail.owner_mut() {
            *slot = owner.map(Box::new);
        }
    }

    /// An OOM victim: its memory cgroup from the kernel's `oom-kill:` line (each line is used
    /// once), else from `/proc/<pid>/cgroup`.
    pub fn oom_victim(&mut self, pid: i32) -> Option<Owner> {
        let from_kernel = self
            .oom_lines
            .iter()
            .rposition(|(p, _)| *p == pid)
            .and_then(|i| self.oom_lines.remove(i))
            .map(|(_, memcg)| memcg);
        let (owner, outcome) = match from_kernel {
            Some(memcg) => self.of_cgroup(Some(memcg)),
            None => self.of_task(pid),
        };
        self.metrics.count(EventKind::OomKill, outcome);
        owner
    }

    /// An OOM victim whose memory cgroup the kernel walked at `mark_victim` (the exact source,
    /// for every kill; the `oom-kill:` line is rate limited). The line for the same victim, if
    /// one came, is dropped with it.
    pub fn oom_victim_in(&mut self, pid: i32, memcg: String) -> Option<Owner> {
        if let Some(i) = self.oom_lines.iter().rposition(|(p, _)| *p == pid) {
            self.oom_lines.remove(i);
        }
        let (owner, outcome) = self.of_cgroup(Some(memcg));
        self.metrics.count(EventKind::OomKill, outcome);
        owner
    }

    /// A task (of an event of `kind`) by its pid, from `/proc/<pid>/cgroup`.
    pub fn task(&self, pid: i32, kind: EventKind) -> Option<Owner> {
        let (owner, outcome) = self.of_task(pid);
        self.metrics.count(kind, outcome);
        owner
    }

    /// The pods with a volume on a block device (or on one of its partitions).
    pub async fn device(&self, dev: DevNum) -> Option<Owner> {
        let (owner, outcome) = self.of_device(dev).await;
        self.metrics.count(EventKind::BlockError, outcome);
        owner
    }

    /// [`Attributor::device`] by the device's kernel name (`sda`, `loop0`), as the kernel's
    /// text names it.
    pub async fn device_named(&self, name: &str) -> Option<Owner> {
        let (dev_block, name) = (self.paths.dev_block.clone(), name.to_owned());
        let dev = tokio::task::spawn_blocking(move || device_number(&dev_block, &name))
            .await
            .ok()
            .flatten();
        match dev {
            Some(dev) => self.device(dev).await,
            None => {
                self.metrics.count(EventKind::BlockError, Outcome::NoPod);
                None
            }
        }
    }

    /// A task by its pid: its cgroup from `/proc/<pid>/cgroup`. Read on the caller's thread:
    /// procfs is generated from kernel memory and never waits on a disk, and the file is a
    /// few hundred bytes, so the read costs microseconds where a hand-over to the blocking
    /// pool costs tens.
    fn of_task(&self, pid: i32) -> (Option<Owner>, Outcome) {
        let file = self.paths.proc.join(pid.to_string()).join("cgroup");
        match std::fs::read_to_string(file) {
            Ok(content) => self.of_cgroup(cgroup::task_cgroup(&content).map(str::to_owned)),
            Err(_) => (None, Outcome::TaskGone),
        }
    }

    /// A task's cgroup to its pod and container.
    fn of_cgroup(&self, path: Option<String>) -> (Option<Owner>, Outcome) {
        let Some(path) = path else {
            return (None, Outcome::NoPod);
        };
        let Some(found) = cgroup::pod_of_cgroup(&path) else {
            return (
                Some(Owner {
                    cgroup: Some(path),
                    ..Owner::default()
                }),
                Outcome::NoPod,
            );
        };
        let (pod, container) = self.cache.lookup(&found.pod_uid, found.container_id);
        let outcome = if pod.name.is_some() {
            Outcome::Named
        } else {
            Outcome::UidOnly
        };
        let owner = Owner {
            cgroup: Some(path.clone()),
            pods: vec![pod],
            container,
        };
        (Some(owner), outcome)
    }

    /// A device to the pods with a volume on it. The mount table of a node with many pods is
    /// long: it is read and scanned on the blocking pool.
    async fn of_device(&self, dev: DevNum) -> (Option<Owner>, Outcome) {
        let paths = self.paths.clone();
        let uids = tokio::task::spawn_blocking(move || pods_on(&paths, dev))
            .await
            .unwrap_or_default();
        if uids.is_empty() {
            return (None, Outcome::NoPod);
        }
        let pods: Vec<_> = uids
            .iter()
            .map(|uid| self.cache.lookup(uid, None).0)
            .collect();
        let outcome = if pods.iter().all(|p| p.name.is_some()) {
            Outcome::Named
        } else {
            Outcome::UidOnly
        };
        let owner = Owner {
            pods,
            ..Owner::default()
        };
        (Some(owner), outcome)
    }
}

/// The number of the block device named `name`: the entry of `/sys/dev/block` whose link ends
/// in that name.
fn device_number(dev_block: &Path, name: &str) -> Option<DevNum> {
    std::fs::read_dir(dev_block)
        .ok()?
        .flatten()
        .find_map(|entry| {
            let target = std::fs::read_link(entry.path()).ok()?;
            if target.file_name()? != name {
                return None;
            }
            let number = entry.file_name();
            let (major, minor) = number.to_str()?.split_once(':')?;
            Some(DevNum {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
            })
        })
}

/// The UIDs of the pods with a volume on `dev` or on one of its partitions, from the host's
/// mount table (`<proc>/1/mountinfo`: the host's init, whose mount namespace is the host's).
fn pods_on(paths: &Paths, dev: DevNum) -> Vec<String> {
    let Ok(mountinfo) = std::fs::read_to_string(paths.proc.join("1/mountinfo")) else {
        return Vec::new();
    };
    let pods_dir = paths.kubelet_root.join("pods");
    volumes::pods_on_device(&mountinfo, &pods_dir.to_string_lossy(), |mounted| {
        mounted == dev || disk_of(&paths.dev_block, mounted) == Some(dev)
    })
}

/// The disk a partition is on (`/sys/dev/block/8:1/../dev` is `8:0`); `None` for a whole disk.
fn disk_of(dev_block: &Path, partition: DevNum) -> Option<DevNum> {
    let dir = dev_block.join(partition.to_string());
    if !dir.join("partition").exists() {
        return None;
    }
    let parent = std::fs::read_to_string(dir.join("../dev")).ok()?;
    let (major, minor) = parent.trim().split_once(':')?;
    Some(DevNum {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{HungTask, OomKill, PodRef, fixtures};

    const UID: &str = "0f6b4e1c-5d8a-4b7e-9c3f-2a1d6e8f7b90";
    const CID: &str = "5d3a1f9c8b7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c";

    struct Host(PathBuf);

    impl Drop for Host {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fake host: `/proc/<pid>/cgroup` files, a mount table, `/sys/dev/block`.
    fn host(name: &str) -> (Host, Attributor) {
        let root = std::env::temp_dir().join(format!("npd-pods-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let proc = root.join("proc");
        std::fs::create_dir_all(proc.join("1")).unwrap();
        std::fs::create_dir_all(proc.join("77")).unwrap();
        std::fs::write(
            proc.join("77/cgroup"),
            format!("5:memory:/kubepods/burstable/pod{UID}/{CID}\n"),
        )
        .unwrap();
        std::fs::create_dir_all(proc.join("78")).unwrap();
        std::fs::write(proc.join("78/cgroup"), "5:memory:/system.slice/x\n").unwrap();
        std::fs::write(
            proc.join("1/mountinfo"),
            format!(
                "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                 301 22 8:17 / /k/pods/{UID}/volumes/kubernetes.io~csi/pvc/mount rw - ext4 /dev/sdb1 rw\n"
            ),
        )
        .unwrap();
        // sdb1 (8:17) is a partition of sdb (8:16).
        let sys = root.join("sys");
        std::fs::create_dir_all(sys.join("block/sdb/sdb1")).unwrap();
        std::fs::write(sys.join("block/sdb/dev"), "8:16\n").unwrap();
        std::fs::write(sys.join("block/sdb/sdb1/partition"), "1\n").unwrap();
        let dev_block = root.join("dev-block");
        std::fs::create_dir_all(&dev_block).unwrap();
        std::os::unix::fs::symlink(sys.join("block/sdb/sdb1"), dev_block.join("8:17")).unwrap();
        std::os::unix::fs::symlink(sys.join("block/sdb"), dev_block.join("8:16")).unwrap();
        let paths = Paths {
            proc,
            kubelet_root: "/k".into(),
            dev_block,
        };
        (
            Host(root),
            Attributor::new(paths, PodCache::default(), PodMetrics::default()),
        )
    }

    fn count(a: &Attributor, kind: EventKind, outcome: Outcome) -> u64 {
        a.metrics
            .attributions
            .with_label_values(&[kind.as_str(), outcome.as_str()])
            .get()
    }

    #[tokio::test]
    async fn the_kernels_oom_line_first_then_proc() {
        let (_host, mut a) = host("oom");
        // The kernel's line names the victim's cgroup: no /proc read (pid 5 has none). As
        // printk:console sees it: in pieces.
        for piece in [
            "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null)",
            ",cpuset=",
            "/",
            ",mems_allowed=0",
            ",oom_memcg=",
            &format!("/kubepods/pod{UID}"),
            ",task_memcg=",
            &format!("/kubepods/pod{UID}/{CID}"),
            ",task=x,pid=5,uid=0",
        ] {
            a.note_message(piece);
        }
        // Whole (/dev/kmsg), for another victim.
        a.note_message(&format!(
            "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,\
             oom_memcg=/a,task_memcg=/kubepods/pod{UID}/{CID},task=y,pid=6,uid=0"
        ));
        assert_eq!(a.oom_lines.len(), 2);
        // Pieces of another message in between make a path that is none: not taken.
        for piece in [
            "oom-kill:constraint=CONSTRAINT_MEMCG",
            ",task_memcg=",
            "eth0: link up",
            ",task=z,pid=7,uid=0",
        ] {
            a.note_message(piece);
        }
        assert_eq!(a.oom_lines.len(), 2);
        assert_eq!(a.oom_pieces, None);
        let mut oom = Detail::from(OomKill {
            pid: 5,
            ..Default::default()
        });
        a.attribute(&mut oom).await;
        let owner = oom.owner().expect("an owner");
        assert_eq!(
            owner.cgroup.as_deref(),
            Some(format!("/kubepods/pod{UID}/{CID}").as_str())
        );
        assert_eq!(
            owner.pods,
            [PodRef {
                uid: UID.into(),
                ..Default::default()
            }]
        );
        assert_eq!(owner.container.as_ref().map(|c| c.id.as_str()), Some(CID));
        assert_eq!(count(&a, EventKind::OomKill, Outcome::UidOnly), 1);
        // The line is used once: the same pid again reads /proc, where it is gone.
        let mut again = Detail::from(OomKill {
            pid: 5,
            ..Default::default()
        });
        a.attribute(&mut again).await;
        assert_eq!(again.owner(), None);
        assert_eq!(count(&a, EventKind::OomKill, Outcome::TaskGone), 1);
        // No line: /proc.
        let mut from_proc = Detail::from(OomKill {
            pid: 77,
            ..Default::default()
        });
        a.attribute(&mut from_proc).await;
        assert_eq!(from_proc.owner().unwrap().pods[0].uid, UID);
    }

    #[tokio::test]
    async fn hung_tasks_and_processes_of_no_pod() {
        let (_host, mut a) = host("hung");
        let mut hung = Detail::from(fixtures::hung(77, "dd"));
        a.attribute(&mut hung).await;
        assert_eq!(hung.field_text("pod_uid").as_deref(), Some(UID));
        assert_eq!(hung.field_text("container_id").as_deref(), Some(CID));
        assert_eq!(hung.field_text("pod"), None, "no cluster: no name");
        let mut system = Detail::from(HungTask {
            pid: 78,
            comm: "x".into(),
            owner: None,
        });
        a.attribute(&mut system).await;
        let owner = system.owner().expect("the cgroup is still reported");
        assert_eq!(owner.cgroup.as_deref(), Some("/system.slice/x"));
        assert!(owner.pods.is_empty());
        assert_eq!(owner.message_suffix(), None);
        assert_eq!(count(&a, EventKind::HungTask, Outcome::NoPod), 1);
        assert_eq!(count(&a, EventKind::HungTask, Outcome::UidOnly), 1);
    }

    #[tokio::test]
    async fn block_errors_name_the_pods_with_a_volume_on_the_disk() {
        let (_host, mut a) = host("block");
        // The request failed on the disk (8:16); the volume is mounted from its partition.
        let mut failed = Detail::from(crate::event::BlockError {
            dev: DevNum {
                major: 8,
                minor: 16,
            },
            ..fixtures::block_error(Some("sdb"))
        });
        a.attribute(&mut failed).await;
        assert_eq!(failed.field_text("pod_uid").as_deref(), Some(UID));
        assert_eq!(
            serde_json::to_value(&failed).unwrap()["pods"],
            serde_json::json!([{"uid": UID}])
        );
        // By the name the kernel's text gives (`I/O error, dev sdb, sector ...`).
        let named = a.device_named("sdb").await.expect("the pods of sdb");
        assert_eq!(named.pods[0].uid, UID);
        assert_eq!(a.device_named("nvme9n1").await, None);
        let mut report = crate::problem::ProblemEvent {
            source: "kernel-monitor".into(),
            severity: crate::problem::Severity::Warning,
            reason: "IOError".into(),
            message: "I/O error, dev sdb, sector 8 op 0x0:(READ)".into(),
            timestamp: std::time::SystemTime::UNIX_EPOCH,
            fields: serde_json::Map::new(),
            pods: Vec::new(),
        };
        report.attribute(&named, EventKind::BlockError);
        assert_eq!(
            report.message,
            format!("I/O error, dev sdb, sector 8 op 0x0:(READ); pod uid {UID}")
        );
        assert_eq!(report.fields["pods"], serde_json::json!([{"uid": UID}]));
        assert!(
            report.pods.is_empty(),
            "no Event on a pod known by its UID only"
        );
        // The root disk: no pod volume.
        let mut root = Detail::from(crate::event::BlockError {
            dev: DevNum { major: 8, minor: 0 },
            ..fixtures::block_error(Some("sda"))
        });
        a.attribute(&mut root).await;
        assert_eq!(root.owner(), None);
        // The unknown device and the root disk.
        assert_eq!(count(&a, EventKind::BlockError, Outcome::NoPod), 2);
    }
}
