//! Enrichment: what the kernel's record does not carry and a lookup on the host adds, done
//! between the sensor and the rules, never on the ring reader (which only reads and decodes,
//! so that a slow lookup never makes the kernel drop records). Lookups are blocking file-system
//! reads and run on tokio's blocking pool.
//!
//! Today: the name of a failed block request's device (`/sys/dev/block`), and, where the
//! kernel's `oom:mark_victim` carries only the pid (before 6.8; Debian's 5.10), the victim's
//! comm, uid and memory from `/proc/<pid>` (read as the event arrives: the victim is marked
//! before it is sent SIGKILL, so it is normally still there; if it is gone they stay unknown),
//! and the pod and container behind OOM kills, hung tasks and failed requests (`crate::pods`,
//! unless `--pod-attribution=false`).

use std::path::{Path, PathBuf};

use crate::{
    event::{Detail, EventKind, KernelEvent, OomKill},
    pods::Attributor,
    problem::ProblemEvent,
    rules::structured::FaultKey,
    sensor::blockdev,
};

/// Adds host facts to kernel events.
#[derive(Clone)]
pub struct Enricher {
    /// Where block device numbers resolve to names (normally `/sys/dev/block`).
    pub dev_block: PathBuf,
    /// Where the host's processes are (normally `/proc`; in a container, the host's mounted in).
    pub proc: PathBuf,
    /// Pod attribution; `None` when it is off.
    pub pods: Option<Attributor>,
}

impl Default for Enricher {
    fn default() -> Self {
        Enricher {
            dev_block: PathBuf::from(blockdev::SYSFS_DEV_BLOCK),
            proc: PathBuf::from("/proc"),
            pods: None,
        }
    }
}

impl Enricher {
    /// Fills in what `event` lacks. Most events need nothing and cost nothing.
    pub async fn enrich(&mut self, event: &mut KernelEvent) {
        if let Detail::BlockError(b) = &mut event.detail
            && b.device.is_none()
        {
            let (root, dev) = (self.dev_block.clone(), b.dev);
            let partitions = self.proc.join("partitions");
            b.device =
                tokio::task::spawn_blocking(move || blockdev::device_name(&root, &partitions, dev))
                    .await
                    .ok()
                    .flatten();
        }
        if let Detail::OomKill(o) = &mut event.detail
            && o.comm.is_none()
        {
            let (root, pid) = (self.proc.clone(), o.pid);
            if let Ok(facts) = tokio::task::spawn_blocking(move || victim(&root, pid)).await {
                facts.fill(o);
            }
        }
        if let Some(pods) = &mut self.pods {
            match &event.detail {
                Detail::Log(log) => pods.note_message(&log.message),
                _ => pods.attribute(&mut event.detail).await,
            }
        }
    }

    /// Names the pod of a report a log rule made from the kernel's text of a fault (`message`):
    /// a hung task's or an OOM victim's by its pid, a failed block request's by its device.
    /// The kernel prints some faults before their tracepoint fires (6.x prints a failed
    /// request's `I/O error, dev ...` first), and the `/dev/kmsg` source has only the text.
    /// Attributed when the report is made, so lines that match no rule cost nothing.
    pub async fn attribute_report(&mut self, report: &mut ProblemEvent, message: &str) {
        let Some(pods) = &mut self.pods else {
            return;
        };
        if !report.pods.is_empty() || report.fields.contains_key("event") {
            return;
        }
        let (owner, kind) = match FaultKey::of_message(message) {
            Some(FaultKey::HungTask(pid)) => {
                (pods.task(pid, EventKind::HungTask), EventKind::HungTask)
            }
            Some(FaultKey::OomKill(pid)) => (pods.oom_victim(pid), EventKind::OomKill),
            Some(FaultKey::BlockError { device, .. }) => {
                (pods.device_named(&device).await, EventKind::BlockError)
            }
            None => return,
        };
        if let Some(owner) = owner {
            report.attribute(&owner, kind);
        }
    }
}

/// What `/proc/<pid>` says of an OOM victim: the fields of the kernel's own "Killed process"
/// line, each when present (a process whose memory is already gone has no `Vm*` lines).
#[derive(Debug, Default, PartialEq, Eq)]
struct Victim {
    comm: Option<String>,
    uid: Option<u32>,
    total_vm_kb: Option<u64>,
    anon_rss_kb: Option<u64>,
    file_rss_kb: Option<u64>,
    shmem_rss_kb: Option<u64>,
    pgtables_kb: Option<u64>,
    oom_score_adj: Option<i16>,
}

fn victim(proc: &Path, pid: i32) -> Victim {
    let dir = proc.join(pid.to_string());
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let status = read("status").unwrap_or_default();
    // `VmSize:\t  33544 kB`; `Uid:\t0\t0\t0\t0` (real uid first).
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Victim {
        // One read of `status` gives the name and the memory together (the victim may be gone
        // by the next read); `comm` only when `status` could not be read.
        comm: status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .map(|n| n.trim().to_string())
            .or_else(|| read("comm").map(|c| c.trim_end_matches('\n').to_string())),
        uid: field("Uid").and_then(|u| u32::try_from(u).ok()),
        total_vm_kb: field("VmSize"),
        anon_rss_kb: field("RssAnon"),
        file_rss_kb: field("RssFile"),
        shmem_rss_kb: field("RssShmem"),
        pgtables_kb: field("VmPTE"),
        oom_score_adj: read("oom_score_adj").and_then(|v| v.trim().parse().ok()),
    }
}

impl Victim {
    /// Fills in what the kernel's record lacked; never overrides what it had.
    fn fill(self, o: &mut OomKill) {
        o.comm = o.comm.take().or(self.comm);
        o.uid = o.uid.or(self.uid);
        o.total_vm_kb = o.total_vm_kb.or(self.total_vm_kb);
        o.anon_rss_kb = o.anon_rss_kb.or(self.anon_rss_kb);
        o.file_rss_kb = o.file_rss_kb.or(self.file_rss_kb);
        o.shmem_rss_kb = o.shmem_rss_kb.or(self.shmem_rss_kb);
        o.pgtables_kb = o.pgtables_kb.or(self.pgtables_kb);
        o.oom_score_adj = o.oom_score_adj.or(self.oom_score_adj);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{LogMessage, fixtures},
        time::Mono,
    };

    #[tokio::test]
    async fn block_errors_get_their_device_name() {
        let dir = std::env::temp_dir().join(format!("npd-enrich-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join("7:0"));
        std::os::unix::fs::symlink("../../devices/virtual/block/loop0", dir.join("7:0")).unwrap();
        let mut enricher = Enricher {
            dev_block: dir.clone(),
            ..Default::default()
        };
        let mut event = KernelEvent::new(Mono::ZERO, fixtures::block_error(None));
        enricher.enrich(&mut event).await;
        let Detail::BlockError(b) = &event.detail else {
            unreachable!()
        };
        assert_eq!(b.device.as_deref(), Some("loop0"));
        let mut log = KernelEvent::new(Mono::ZERO, LogMessage::new("x"));
        let before = log.clone();
        enricher.enrich(&mut log).await;
        assert_eq!(log, before);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn pid_only_oom_victims_get_their_facts_from_proc() {
        let dir = std::env::temp_dir().join(format!("npd-enrich-proc-{}", std::process::id()));
        let victim_dir = dir.join("114");
        std::fs::create_dir_all(&victim_dir).unwrap();
        std::fs::write(victim_dir.join("comm"), "npd-test-hog\n").unwrap();
        std::fs::write(
            victim_dir.join("status"),
            "Name:\tnpd-test-hog\nUid:\t1000\t1000\t1000\t1000\nVmSize:\t   33544 kB\n\
             VmPTE:\t      96 kB\nRssAnon:\t   32700 kB\nRssFile:\t       0 kB\n\
             RssShmem:\t     372 kB\n",
        )
        .unwrap();
        std::fs::write(victim_dir.join("oom_score_adj"), "-17\n").unwrap();
        let mut enricher = Enricher {
            proc: dir.clone(),
            ..Default::default()
        };
        // 5.10: the tracepoint gives the pid only.
        let mut event = KernelEvent::new(
            Mono::ZERO,
            OomKill {
                pid: 114,
                ..Default::default()
            },
        );
        enricher.enrich(&mut event).await;
        assert_eq!(
            event.detail,
            Detail::OomKill(OomKill {
                pid: 114,
                comm: Some("npd-test-hog".into()),
                uid: Some(1000),
                total_vm_kb: Some(33544),
                anon_rss_kb: Some(32700),
                file_rss_kb: Some(0),
                shmem_rss_kb: Some(372),
                pgtables_kb: Some(96),
                oom_score_adj: Some(-17),
                memcg: None,
                owner: None,
            })
        );
        // A victim already gone: the pid alone, as the kernel gave it.
        let mut gone = KernelEvent::new(
            Mono::ZERO,
            OomKill {
                pid: 999_999,
                ..Default::default()
            },
        );
        enricher.enrich(&mut gone).await;
        assert_eq!(
            gone.detail,
            Detail::OomKill(OomKill {
                pid: 999_999,
                ..Default::default()
            })
        );
        // What the kernel gave is never replaced (comm present: no lookup at all).
        let full = KernelEvent::new(
            Mono::ZERO,
            OomKill {
                pid: 114,
                comm: Some("stress".into()),
                ..Default::default()
            },
        );
        let mut same = full.clone();
        enricher.enrich(&mut same).await;
        assert_eq!(same, full);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
