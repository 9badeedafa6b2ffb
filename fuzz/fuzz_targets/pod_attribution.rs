//! Pod attribution's parsers on what the host hands them: cgroup paths (from `/proc/<pid>/cgroup`
//! and from the kernel's `oom-kill:` line, which anyone who may write `/dev/kmsg` can forge),
//! `oom-kill:` lines whole and in pieces, and mount tables. Never a panic; a pod UID is only ever
//! hex digits and dashes, a container ID only hex digits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use npd_agent::{
    event::DevNum,
    pods::{
        Attributor, Paths, PodCache, PodMetrics,
        cgroup::{oom_kill_line, pod_of_cgroup, task_cgroup},
        volumes::pods_on_device,
    },
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        if let Some(found) = pod_of_cgroup(line) {
            assert!(found.pod_uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'));
            assert!(found.container_id.is_none_or(|c| c.bytes().all(|b| b.is_ascii_hexdigit())));
        }
        if let Some((_, memcg)) = oom_kill_line(line) {
            let _ = pod_of_cgroup(memcg);
        }
    }
    let _ = task_cgroup(&text);
    let _ = pods_on_device(&text, "/var/lib/kubelet/pods", |d| d == DevNum { major: 7, minor: 0 });
    // The lines as printk:console pieces.
    let paths = Paths {
        proc: "/nonexistent".into(),
        kubelet_root: "/var/lib/kubelet".into(),
        dev_block: "/nonexistent".into(),
    };
    let mut attributor = Attributor::new(paths, PodCache::default(), PodMetrics::default());
    for piece in text.split(|c: char| c == '\n' || c == ',') {
        attributor.note_message(piece);
    }
    let _ = attributor.oom_victim(1);
});
