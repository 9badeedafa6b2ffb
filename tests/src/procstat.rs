//! What a process costs, read from `/proc`: CPU time, RSS, and the part of RSS that is the
//! BPF ring buffer's mapping. For benchmarks (numbers, never assertions in tests).

/// Clock-tick fields of `/proc/PID/stat`, counted from the state field (0) after the command
/// name (which may contain spaces): utime 11, stime 12, cutime 13, cstime 14. In seconds.
fn stat_seconds(pid: u32, fields: &[usize]) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest)
        .unwrap_or("")
        .split(' ')
        .collect();
    let ticks: u64 = fields
        .iter()
        .map(|&i| {
            after
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// CPU time (user + system) of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_seconds(pid, &[11, 12])
}

/// CPU time (user + system) of a process's reaped children (its plugins), in seconds.
pub fn children_cpu_seconds(pid: u32) -> f64 {
    stat_seconds(pid, &[13, 14])
}

/// CPU time of every live thread of a process, in seconds, to the microsecond: the sum of
/// `se.sum_exec_runtime` in `/proc/PID/task/*/sched` (clock ticks, 10 ms, are too coarse for
/// a flood that costs 100 ms). Falls back to [`cpu_seconds`] where the kernel has no
/// `sched` files.
pub fn exact_cpu_seconds(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let mut total_ms = 0.0;
    for task in tasks.flatten() {
        let Ok(sched) = std::fs::read_to_string(task.path().join("sched")) else {
            return cpu_seconds(pid);
        };
        let Some(ms) = sched.lines().find_map(|l| {
            l.strip_prefix("se.sum_exec_runtime")?
                .split(':')
                .nth(1)?
                .trim()
                .parse::<f64>()
                .ok()
        }) else {
            return cpu_seconds(pid);
        };
        total_ms += ms;
    }
    total_ms / 1e3
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`); 0 when absent.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .trim()
                .strip_suffix(" kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Context switches of every live thread of a process (voluntary and not), from
/// `/proc/PID/task/*/status`: `/proc/PID/status` alone counts the main thread only.
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .map(|task| {
            std::fs::read_to_string(task.path().join("status"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Resident KiB of the BPF map mappings (the ring buffer: the kernel maps all of its pages,
/// twice, at mmap time; kernel memory counted in RSS, not memory the agent allocates).
pub fn bpf_map_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut in_map = false;
    let mut total = 0;
    for line in smaps.lines() {
        if line.split_whitespace().next().is_some_and(|f| {
            f.contains('-') && f.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        }) {
            in_map = line.contains("anon_inode:bpf-map");
        } else if in_map && let Some(kib) = line.strip_prefix("Rss:") {
            total += kib
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    total
}

/// RSS without the BPF map mappings: what the agent itself uses.
pub fn own_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS").saturating_sub(bpf_map_kib(pid))
}

/// `12.3 MiB`.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
