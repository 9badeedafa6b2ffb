//! Replays a realistic mix of kernel messages (mostly chatter that matches nothing, a few
//! problems) through the embedded default rules. Run: `cargo bench -p npd-agent --bench rules`.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use npd_agent::{
    engine::Engine,
    event::{Detail, KernelEvent, LogMessage, OomKill},
    rules::RuleSet,
    time::Mono,
};

/// Typical kernel chatter on a Kubernetes node (none of it a problem).
const CHATTER: &[&str] = &[
    "IPv6: ADDRCONF(NETDEV_CHANGE): cali3f1c2a9b5e4: link becomes ready",
    "cni0: port 3(veth9a8b7c6d) entered blocking state",
    "cni0: port 3(veth9a8b7c6d) entered forwarding state",
    "device veth9a8b7c6d entered promiscuous mode",
    "EXT4-fs (nvme1n1): mounted filesystem with ordered data mode. Opts: (null)",
    "overlayfs: upper fs does not support RENAME_WHITEOUT.",
    "audit: type=1400 audit(1700000000.123:456): apparmor=\"DENIED\" operation=\"open\" profile=\"cri-containerd.apparmor.d\" name=\"/proc/sys/kernel/random/boot_id\" pid=12345 comm=\"java\" requested_mask=\"r\" denied_mask=\"r\"",
    "TCP: request_sock_TCP: Possible SYN flooding on port 10250. Sending cookies.  Check SNMP counters.",
    "nf_conntrack: nf_conntrack: table full, dropping packet",
    "systemd[1]: Started Session 4321 of user core.",
    "xfs filesystem being mounted at /var/lib/kubelet/pods/abc/volumes supports timestamps until 2038",
    "Memory cgroup stats for /kubepods/burstable/pod1234/5678:",
    "usb 1-1: new high-speed USB device number 2 using xhci_hcd",
    "igb 0000:01:00.0 eth0: igb: eth0 NIC Link is Up 1000 Mbps Full Duplex, Flow Control: RX/TX",
    "hrtimer: interrupt took 2143567 ns",
    "perf: interrupt took too long (2503 > 2500), lowering kernel.perf_event_max_sample_rate to 79800",
];

/// Problems, about 1 line in 50.
const PROBLEMS: &[&str] = &[
    "Out of memory: Killed process 1234 (stress) total-vm:1049044kB, anon-rss:1047588kB, file-rss:4kB, shmem-rss:0kB, UID:0 pgtables:2092kB oom_score_adj:0",
    "INFO: task dd:4321 blocked for more than 120 seconds.",
    "EXT4-fs error (device sda1): ext4_find_entry:1455: inode #2: comm ls: reading directory lblock 0",
    "BUG: kernel NULL pointer dereference, address: 0000000000000008",
    "Buffer I/O error on dev sdb, logical block 12, async page read",
];

fn mix() -> Vec<KernelEvent> {
    (0..10_000)
        .map(|i| {
            let text = if i % 50 == 49 {
                PROBLEMS[(i / 50) % PROBLEMS.len()]
            } else {
                CHATTER[(i * 7) % CHATTER.len()]
            };
            KernelEvent::new(Mono::ZERO, LogMessage::new(text))
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut events = mix();
    let mut group = c.benchmark_group("rules");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("replay_mix_defaults", |b| {
        let mut engine = Engine::new(RuleSet::defaults());
        let mut now = Mono::ZERO;
        b.iter(|| {
            let mut reports = 0;
            for e in &mut events {
                now = now.saturating_add(Duration::from_millis(1));
                e.at = now;
                reports += engine.handle(e).len();
            }
            reports
        });
    });
    let chatter: Vec<KernelEvent> = events
        .iter()
        .filter(|e| matches!(&e.detail, Detail::Log(l) if CHATTER.contains(&l.message.as_str())))
        .map(|e| KernelEvent::new(Mono::ZERO, e.detail.clone()))
        .collect();
    group.throughput(Throughput::Elements(chatter.len() as u64));
    group.bench_function("non_matching_only", |b| {
        let mut engine = Engine::new(RuleSet::defaults());
        b.iter(|| {
            let mut reports = 0;
            for e in &chatter {
                reports += engine.handle(e).len();
            }
            reports
        });
    });
    // One kill of an OOM storm as the kernel delivers it once its OOM report is rate limited:
    // the victim's `mark_victim` event, then the kernel's text of the same kill (one problem).
    group.throughput(Throughput::Elements(1));
    group.bench_function("oom_storm_kill", |b| {
        let mut engine = Engine::new(RuleSet::defaults());
        let mut now = Mono::ZERO;
        let mut pid = 1000;
        b.iter(|| {
            pid += 1;
            now = now.saturating_add(Duration::from_millis(12));
            let victim = KernelEvent::new(
                now,
                Detail::OomKill(OomKill {
                    pid,
                    comm: Some("npd-test-hog".into()),
                    uid: Some(0),
                    total_vm_kb: Some(7084),
                    anon_rss_kb: Some(3968),
                    file_rss_kb: Some(572),
                    shmem_rss_kb: Some(0),
                    pgtables_kb: Some(48),
                    oom_score_adj: Some(0),
                    memcg: None,
                    owner: None,
                }),
            );
            let line = KernelEvent::new(
                now,
                LogMessage::new(format!(
                    "Memory cgroup out of memory: Killed process {pid} (npd-test-hog) \
                     total-vm:7084kB, anon-rss:3968kB, file-rss:572kB, shmem-rss:0kB, UID:0 \
                     pgtables:48kB oom_score_adj:0"
                )),
            );
            engine.handle(&victim).len() + engine.handle(&line).len()
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
