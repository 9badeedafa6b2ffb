//! A realistic kernel log for floods: many shapes of the noise a Kubernetes node's kernel
//! prints (network and CNI, audit and AppArmor, file systems, cgroups, the scheduler, block
//! devices, journald), with lines that match npd's default rules interleaved. Generated, not
//! stored: the same seed gives the same lines, and every matching line is a distinct fault
//! (its own pid, block or device), so that each must be counted.

/// The reasons the matching lines are for (the default rules of `config/kernel-monitor.json`),
/// in the order they are interleaved.
pub const MATCH_REASONS: [&str; 6] = [
    "OOMKilling",
    "TaskHung",
    "UnregisterNetDevice",
    "KernelOops",
    "Ext4Error",
    "IOError",
];

/// A small deterministic generator (xorshift64*): numbers that look like pids, blocks, ports.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn hex(&mut self, digits: usize) -> String {
        let v = self.next();
        format!("{v:016x}")[..digits.min(16)].to_owned()
    }

    fn uuid(&mut self) -> String {
        format!(
            "{}-{}-{}-{}-{}{}",
            self.hex(8),
            self.hex(4),
            self.hex(4),
            self.hex(4),
            self.hex(8),
            self.hex(4)
        )
    }
}

/// Kinds of noise: each a function of the generator.
const NOISE_KINDS: usize = 28;

fn noise(kind: usize, r: &mut Rng) -> String {
    let pid = 1000 + r.below(4_000_000);
    match kind {
        0 => "e1000e 0000:00:1f.6 eth0: NIC Link is Up 1000 Mbps Full Duplex, Flow Control: Rx/Tx"
            .into(),
        1 => format!(
            "IPv6: ADDRCONF(NETDEV_CHANGE): veth{}: link becomes ready",
            r.hex(8)
        ),
        2 => format!(
            "cni0: port {}(veth{}) entered blocking state",
            r.below(64),
            r.hex(8)
        ),
        3 => format!(
            "cni0: port {}(veth{}) entered forwarding state",
            r.below(64),
            r.hex(8)
        ),
        4 => format!("device veth{} entered promiscuous mode", r.hex(8)),
        5 => format!(
            "audit: type=1400 audit({}.{:03}:{}): apparmor=\"DENIED\" operation=\"open\" \
             profile=\"cri-containerd.apparmor.d\" name=\"/proc/{pid}/mounts\" pid={pid} \
             comm=\"node\" requested_mask=\"r\" denied_mask=\"r\" fsuid=0 ouid=0",
            1_700_000_000 + r.below(10_000_000),
            r.below(1000),
            r.below(100_000)
        ),
        6 => format!(
            "audit: type=1326 audit({}.{:03}:{}): auid=4294967295 uid=0 gid=0 \
             ses=4294967295 pid={pid} comm=\"runc\" exe=\"/usr/bin/runc\" sig=0 arch=c000003e \
             syscall=435 compat=0 ip=0x55d0c2{} code=0x50000",
            1_700_000_000 + r.below(10_000_000),
            r.below(1000),
            r.below(100_000),
            r.hex(4)
        ),
        7 => format!(
            "EXT4-fs (nvme0n1p{}): mounted filesystem {} r/w with ordered data mode. Quota mode: none.",
            r.below(8),
            r.uuid()
        ),
        8 => format!(
            "XFS (dm-{}): Mounting V5 Filesystem {}",
            r.below(32),
            r.uuid()
        ),
        9 => format!(
            "xfs filesystem being mounted at /var/lib/kubelet/pods/{}/volumes/kubernetes.io~csi/pvc-{}/mount supports timestamps until 2038 (0x7fffffff)",
            r.uuid(),
            r.uuid()
        ),
        10 => format!(
            "cgroup: fork rejected by pids controller in /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            r.uuid().replace('-', "_")
        ),
        11 => "sched: RT throttling activated".into(),
        12 => format!("hrtimer: interrupt took {} ns", 10_000 + r.below(1_000_000)),
        13 => format!(
            "perf: interrupt took too long ({} > {}), lowering kernel.perf_event_max_sample_rate to {}",
            2_500 + r.below(10_000),
            2_500,
            50_000 + r.below(50_000)
        ),
        14 => format!(
            "TCP: request_sock_TCP: Possible SYN flooding on port {}. Sending cookies.  Check SNMP counters.",
            1024 + r.below(60_000)
        ),
        15 => "nf_conntrack: nf_conntrack: table full, dropping packet".into(),
        16 => format!(
            "IPVS: rr: TCP 10.96.{}.{}:443 - no destination available",
            r.below(256),
            r.below(256)
        ),
        17 => format!("net_ratelimit: {} callbacks suppressed", r.below(500)),
        18 => format!("eth0: renamed from tmp{}", r.hex(5)),
        19 => format!(
            "nvme nvme0: I/O {} QID {} timeout, completion polled",
            r.below(1024),
            r.below(16)
        ),
        20 => format!(
            "sd {}:0:0:0: [sd{}] Write cache: enabled, read cache: enabled, doesn't support DPO or FUA",
            r.below(8),
            (b'a' + r.below(8) as u8) as char
        ),
        21 => format!(
            "usb 1-{}: new high-speed USB device number {} using xhci_hcd",
            r.below(8),
            r.below(128)
        ),
        22 => format!("kauditd_printk_skb: {} callbacks suppressed", r.below(300)),
        23 => format!(
            "systemd-journald[{pid}]: Data hash table of /var/log/journal/{}{}/system.journal has a fill level at 75.0 ({} of {} items, 8388608 file size, 1048 bytes per hash table item), suggesting rotation.",
            r.hex(16),
            r.hex(16),
            r.below(10_000),
            r.below(20_000)
        ),
        24 => format!("docker0: port 1(veth{}) entered disabled state", r.hex(7)),
        25 => format!(
            "process '/usr/bin/containerd-shim-runc-v2' started with executable stack (pid {pid})"
        ),
        26 => format!(
            "loop{}: detected capacity change from 0 to {}",
            r.below(64),
            8 * r.below(10_000_000)
        ),
        _ => format!(
            "vxlan.calico: link {} mtu 1450 neigh {}.{}.{}.{} lladdr 66:{}:{}:{}:{}:{} STALE",
            r.below(64),
            10,
            r.below(256),
            r.below(256),
            r.below(256),
            r.hex(2),
            r.hex(2),
            r.hex(2),
            r.hex(2),
            r.hex(2)
        ),
    }
}

/// A line for `MATCH_REASONS[which]`, distinct for each `n`.
fn matching(which: usize, n: u64, r: &mut Rng) -> String {
    match which {
        0 => format!(
            "Killed process {} (java) total-vm:{}kB, anon-rss:{}kB, file-rss:{}kB, shmem-rss:0kB, UID:0 pgtables:{}kB oom_score_adj:{}",
            100_000 + n,
            4_000_000 + r.below(1_000_000),
            1_000_000 + r.below(1_000_000),
            r.below(100_000),
            r.below(10_000),
            r.below(1000)
        ),
        1 => format!(
            "task worker-{n}:{} blocked for more than 120 seconds.",
            200_000 + n
        ),
        2 => format!(
            "unregister_netdevice: waiting for veth{} to become free. Usage count = {}",
            r.hex(8),
            1 + r.below(4)
        ),
        3 => format!(
            "BUG: unable to handle kernel NULL pointer dereference at {:016x}",
            0x10 * (n + 1)
        ),
        4 => format!(
            "EXT4-fs error (device nvme1n1): ext4_find_entry:1455: inode #{}: comm kubelet: reading directory lblock 0",
            1000 + n
        ),
        _ => format!(
            "Buffer I/O error on dev sdb, logical block {}, async page read",
            4096 + n
        ),
    }
}

/// A corpus of `noise` noise lines with `matches` matching lines spread evenly through it
/// (the kinds of each cycle through their lists). Corpora of different seeds have different
/// faults (pids, blocks, inodes), so that a second flood is not taken for a repeat of the first. Returns the lines and, per reason of
/// [`MATCH_REASONS`], how many matching lines were written for it.
pub fn realistic(noise_lines: usize, matches: usize, seed: u64) -> (Vec<String>, [u64; 6]) {
    let mut r = Rng(seed.max(1));
    let total = noise_lines + matches;
    let every = total.checked_div(matches).unwrap_or(usize::MAX);
    let mut lines = Vec::with_capacity(total);
    let mut counts = [0u64; 6];
    let (mut made, mut kind) = (0, 0);
    for i in 0..total {
        if made < matches && (i + 1) % every == 0 {
            let which = made % MATCH_REASONS.len();
            lines.push(matching(which, seed * 100_000 + made as u64, &mut r));
            counts[which] += 1;
            made += 1;
        } else {
            // Not strictly round robin: real noise comes in runs of one kind.
            if r.below(4) == 0 {
                kind = r.below(NOISE_KINDS as u64) as usize;
            }
            lines.push(noise(kind, &mut r));
        }
    }
    (lines, counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_corpus_has_its_matches_and_many_shapes_of_noise() {
        let (lines, counts) = realistic(100_000, 1000, 7);
        assert_eq!(lines.len(), 101_000);
        assert_eq!(counts.iter().sum::<u64>(), 1000);
        assert!(counts.iter().all(|&c| c >= 166), "{counts:?}");
        // Each kind of noise shows up: its first words differ.
        let shapes: std::collections::BTreeSet<String> = lines
            .iter()
            .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect();
        assert!(shapes.len() >= 28, "{} shapes", shapes.len());
        // Every matching line is a distinct fault.
        let matching: std::collections::BTreeSet<&String> = lines
            .iter()
            .filter(|l| l.starts_with("Buffer I/O error") || l.starts_with("Killed process"))
            .collect();
        assert_eq!(matching.len() as u64, counts[0] + counts[5]);
        // Same seed, same lines.
        assert_eq!(realistic(1000, 10, 7).0, realistic(1000, 10, 7).0);
    }
}
