//! A small process that integration tests make misbehave in a known way, so that its pid and
//! comm (`npd-test-hog`) are known:
//!
//! * `npd-test-hog oom CGROUP_DIR MIB`: joins the memory cgroup, then allocates and touches
//!   MIB MiB (the cgroup's OOM killer kills it).
//! * `npd-test-hog write FILE [CGROUP_DIR]`: joins the cgroup when one is given (a pod's
//!   container cgroup), then writes to FILE (blocks in D state on a frozen file system).
//! * `npd-test-hog storm CGROUP_DIR RATE SECONDS`: an OOM storm. For SECONDS it forks RATE
//!   children a second (at most [`STORM_LIVE`] alive at once), each of which joins the memory
//!   cgroup and allocates until the cgroup's OOM killer kills it. At the end it prints one JSON
//!   line: `{"forked":N,"oom_killed":K,"other_exits":O,"seconds":S}`.
//!
//! * `npd-test-hog kmsg FILE`: writes each line of FILE to `/dev/kmsg` (one write, one
//!   record) as fast as it can, then prints one JSON line with its own cost:
//!   `{"lines":N,"seconds":S,"user_us":U,"sys_us":K}` (`getrusage`), for the benchmarks that
//!   measure what npd adds to every `printk`.
//!
//! * `npd-test-hog corpus SEED`: prints the realistic corpus of the benchmarks
//!   ([`npd_tests::corpus::realistic`], 100,000 noise lines and 1,000 matches) for profiling by
//!   hand: `npd-test-hog corpus 1 > c.txt; npd-test-hog kmsg c.txt`.
//!
//! It prints `ready` when it is about to misbehave.
use std::{
    io::Write as _,
    time::{Duration, Instant},
};

/// At most this many storm children are alive at once. More make each OOM kill slower (the
/// cgroup's OOM killer kills one task at a time, and the others wait): two give the highest
/// rate here (170 kills/s in a 4 MiB cgroup on 2 cores).
const STORM_LIVE: usize = 2;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("oom") if args.len() == 4 => {
            join_cgroup(&args[2]);
            let mib: usize = args[3]
                .parse()
                .unwrap_or_else(|_| fail("MIB is not a number"));
            println!("ready");
            let _ = std::io::stdout().flush();
            let mut chunks = Vec::new();
            for _ in 0..mib {
                // Touch every page so it is really charged to the cgroup.
                chunks.push(vec![1u8; 1 << 20]);
            }
            println!("allocated {} MiB without being killed", chunks.len());
            std::process::exit(3);
        }
        Some("write") if args.len() == 3 || args.len() == 4 => {
            if let Some(cgroup) = args.get(3) {
                join_cgroup(cgroup);
            }
            println!("ready");
            let _ = std::io::stdout().flush();
            std::fs::write(&args[2], b"npd hung task test\n")
                .unwrap_or_else(|e| fail(&format!("write: {e}")));
        }
        Some("storm") if args.len() == 5 => {
            let rate: u32 = args[3]
                .parse()
                .unwrap_or_else(|_| fail("RATE is not a number"));
            let secs: u64 = args[4]
                .parse()
                .unwrap_or_else(|_| fail("SECONDS is not a number"));
            storm(&args[2], rate.max(1), Duration::from_secs(secs));
        }
        Some("kmsg") if args.len() == 3 => kmsg_flood(&args[2]),
        Some("corpus") if args.len() == 3 => {
            let seed = args[2]
                .parse()
                .unwrap_or_else(|_| fail("SEED is not a number"));
            let (lines, _) = npd_tests::corpus::realistic(100_000, 1_000, seed);
            let mut out = std::io::stdout().lock();
            for line in lines {
                let _ = writeln!(out, "{line}");
            }
        }
        _ => fail(
            "usage: npd-test-hog oom CGROUP_DIR MIB | write FILE [CGROUP_DIR] \
             | storm CGROUP_DIR RATE SECONDS | kmsg FILE | corpus SEED",
        ),
    }
}

fn kmsg_flood(file: &str) {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| fail(&format!("{file}: {e}")));
    let lines: Vec<&str> = text.lines().collect();
    let mut kmsg = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .unwrap_or_else(|e| fail(&format!("/dev/kmsg: {e}")));
    let usage = || {
        // SAFETY: getrusage fills the struct it is given.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut usage);
            usage
        };
        let us = |t: libc::timeval| t.tv_sec * 1_000_000 + t.tv_usec;
        (us(usage.ru_utime), us(usage.ru_stime))
    };
    // Only the writes are measured, not reading the file.
    let (user0, sys0) = usage();
    let start = Instant::now();
    for line in &lines {
        kmsg.write_all(line.as_bytes())
            .unwrap_or_else(|e| fail(&format!("writing /dev/kmsg: {e}")));
    }
    let seconds = start.elapsed().as_secs_f64();
    let (user1, sys1) = usage();
    println!(
        "{{\"lines\":{},\"seconds\":{seconds},\"user_us\":{},\"sys_us\":{}}}",
        lines.len(),
        user1 - user0,
        sys1 - sys0
    );
}

/// What happened to the storm's children.
#[derive(Default)]
struct Storm {
    live: usize,
    oom_killed: u64,
    other_exits: u64,
}

impl Storm {
    /// Reaps children; waits for one when `block`.
    fn reap(&mut self, block: bool) {
        loop {
            let mut status = 0;
            let flags = if block { 0 } else { libc::WNOHANG };
            // SAFETY: waitpid on our own children with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, flags) };
            if pid <= 0 {
                return;
            }
            self.live -= 1;
            if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL {
                self.oom_killed += 1;
            } else {
                self.other_exits += 1;
            }
            if block {
                return;
            }
        }
    }
}

fn storm(cgroup: &str, rate: u32, duration: Duration) -> ! {
    let procs = std::path::Path::new(cgroup).join("cgroup.procs");
    let interval = Duration::from_secs(1) / rate;
    let mut s = Storm::default();
    let mut forked = 0u64;
    println!("ready");
    let _ = std::io::stdout().flush();
    let start = Instant::now();
    let mut next = start;
    while start.elapsed() < duration {
        s.reap(false);
        if s.live >= STORM_LIVE {
            s.reap(true);
            continue;
        }
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        next += interval;
        // SAFETY: this process is single-threaded; the child only writes a file, allocates
        // and exits.
        match unsafe { libc::fork() } {
            -1 => fail(&format!("fork: {}", std::io::Error::last_os_error())),
            0 => {
                if std::fs::write(&procs, "0").is_err() {
                    // SAFETY: leaving the forked child without running the parent's atexit.
                    unsafe { libc::_exit(2) };
                }
                let mut chunks = Vec::new();
                for _ in 0..1024 {
                    chunks.push(vec![1u8; 1 << 20]);
                }
                // SAFETY: as above.
                unsafe { libc::_exit(3) };
            }
            _ => {
                forked += 1;
                s.live += 1;
            }
        }
    }
    while s.live > 0 {
        s.reap(true);
    }
    println!(
        "{{\"forked\":{forked},\"oom_killed\":{},\"other_exits\":{},\"seconds\":{:.3}}}",
        s.oom_killed,
        s.other_exits,
        start.elapsed().as_secs_f64()
    );
    std::process::exit(0);
}

/// Moves this process into the cgroup at `dir`.
fn join_cgroup(dir: &str) {
    let procs = std::path::Path::new(dir).join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .unwrap_or_else(|e| fail(&format!("joining {}: {e}", procs.display())));
}

fn fail(msg: &str) -> ! {
    eprintln!("npd-test-hog: {msg}");
    std::process::exit(2);
}
