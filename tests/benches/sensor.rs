//! The sensor benchmark (needs root): prints a table of
//! * latency from a write to /dev/kmsg to the decoded event in the agent (p50, p99, max) over
//!   2,000 samples, for the eBPF and the /dev/kmsg sources, in-process through the library;
//! * a 100,000-message flood at full speed: throughput and drops, for both sources;
//! * the load+attach time of the eBPF programs;
//! * the real agent binary at idle: context switches (all threads), CPU ticks and RSS over 30 s.
//!
//! Run with `cargo xtask bench`. Numbers, not assertions.

use std::{
    fs::OpenOptions,
    io::Write as _,
    time::{Duration, Instant},
};

use npd_agent::{
    event::{Detail, KernelEvent},
    sensor::{Sensor, SensorConfig, SourceChoice},
};
use npd_tests::{agent::agent_binary, kernel::Sysctl, procstat::context_switches, unique};

const SAMPLES: usize = 2_000;
const FLOOD: usize = 100_000;
const IDLE: Duration = Duration::from_secs(30);

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED sensor benchmark: needs root (cargo xtask bench uses sudo)");
        return;
    }
    let _devkmsg = Sysctl::set("kernel/printk_devkmsg", "on");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "\nnpd sensor benchmark ({} samples, {} message flood)",
        SAMPLES, FLOOD
    );
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>14} {:>10} {:>10}",
        "source", "p50 us", "p99 us", "max us", "flood msg/s", "received", "dropped"
    );
    for source in [SourceChoice::Ebpf, SourceChoice::Kmsg] {
        runtime.block_on(bench_source(source));
    }
    idle_agent();
}

fn message(event: &KernelEvent) -> Option<&str> {
    match &event.detail {
        Detail::Log(log) => Some(&log.message),
        _ => None,
    }
}

async fn bench_source(source: SourceChoice) {
    let started = Instant::now();
    let mut sensor = Sensor::start(&SensorConfig::new(source)).expect("starting the sensor");
    let start_time = started.elapsed();
    let mut kmsg = OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .expect("opening /dev/kmsg");

    let marker = unique("npd-bench");
    let mut latencies = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let text = format!("{marker} {i}");
        let t0 = Instant::now();
        kmsg.write_all(format!("{text}\n").as_bytes())
            .expect("writing /dev/kmsg");
        'found: loop {
            let batch = sensor.events.recv().await.expect("sensor stopped");
            for event in &batch {
                if message(event) == Some(text.as_str()) {
                    latencies.push(t0.elapsed());
                    break 'found;
                }
            }
        }
    }
    latencies.sort();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64()
            * 1e6
    };

    let flood_marker = unique("npd-flood");
    let end = format!("{flood_marker} end");
    let lost_before = sensor.view.lost_total();
    let writer = {
        let flood_marker = flood_marker.clone();
        let end = end.clone();
        std::thread::spawn(move || {
            let mut kmsg = OpenOptions::new()
                .write(true)
                .open("/dev/kmsg")
                .expect("opening /dev/kmsg");
            for i in 0..FLOOD {
                kmsg.write_all(format!("{flood_marker} {i}\n").as_bytes())
                    .expect("writing /dev/kmsg");
            }
            kmsg.write_all(format!("{end}\n").as_bytes())
                .expect("writing /dev/kmsg");
        })
    };
    let t0 = Instant::now();
    let mut received = 0u64;
    'flood: loop {
        let batch = sensor.events.recv().await.expect("sensor stopped");
        for event in &batch {
            match message(event) {
                Some(m) if m == end => break 'flood,
                Some(m) if m.starts_with(&flood_marker) => received += 1,
                _ => {}
            }
        }
    }
    let elapsed = t0.elapsed();
    writer.join().expect("flood writer");
    let dropped = sensor.view.lost_total() - lost_before;
    println!(
        "{:<8} {:>10.1} {:>10.1} {:>10.1} {:>14.0} {:>10} {:>10}",
        match source {
            SourceChoice::Ebpf => "ebpf",
            _ => "kmsg",
        },
        pct(0.50),
        pct(0.99),
        pct(1.0),
        FLOOD as f64 / elapsed.as_secs_f64(),
        received,
        dropped
    );
    if source == SourceChoice::Ebpf {
        println!(
            "         eBPF load + attach of the programs: {:.1} ms",
            start_time.as_secs_f64() * 1e3
        );
    }
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields after the comm: state is [0], utime is [11], stime is [12].
    fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn idle_agent() {
    let mut child = std::process::Command::new(agent_binary())
        .args(["run", "--source", "ebpf"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting npd-agent");
    let pid = child.id();
    std::thread::sleep(Duration::from_secs(3));
    let (cs0, cpu0) = (context_switches(pid), cpu_ticks(pid));
    std::thread::sleep(IDLE);
    let (cs1, cpu1) = (context_switches(pid), cpu_ticks(pid));
    let rss = rss_kib(pid);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    println!(
        "idle agent ({}s, no kernel events): {} context switches (all threads), {} CPU ticks, RSS {} KiB",
        IDLE.as_secs(),
        cs1 - cs0,
        cpu1 - cpu0,
        rss
    );
}
