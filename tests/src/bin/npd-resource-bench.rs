//! Resource use of the real agent (root): RSS and CPU while idle, and during and after floods
//! of kernel messages. Prints a table; `cargo xtask bench` can run it.
//!
//! Usage: `npd-resource-bench [--idle-secs 60] [--flood 100000] [--floods 2] [-- AGENT ARGS...]`
//! (agent arguments default to `run --source ebpf`, with the health and metrics servers on).

use std::{
    fs::OpenOptions,
    io::Write as _,
    time::{Duration, Instant},
};

use npd_tests::{
    agent::Agent,
    have_root,
    http::{self, free_port, sample},
    kernel::Sysctl,
    procstat::{bpf_map_kib, cpu_seconds, mib, own_kib, status_kib},
    unique,
};

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !have_root("npd-resource-bench") {
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (own, agent_args) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], args[i + 1..].to_vec()),
        None => (
            &args[..],
            vec!["run".into(), "--source".into(), "ebpf".into()],
        ),
    };
    let idle_secs = arg(own, "--idle-secs", 60);
    let flood = arg(own, "--flood", 100_000) as usize;
    let floods = arg(own, "--floods", 2);

    let metrics_port = free_port();
    let mut full: Vec<String> = agent_args;
    full.extend([
        "--enable-k8s-exporter=false".into(),
        "--port".into(),
        free_port().to_string(),
    ]);
    full.extend(["--prometheus-port".into(), metrics_port.to_string()]);
    let full_ref: Vec<&str> = full.iter().map(String::as_str).collect();
    let agent = Agent::start(&full_ref);
    let pid = agent.pid();
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let scrape = |series: &str| {
        http::get(metrics, "/metrics")
            .ok()
            .and_then(|r| sample(&r.body, series))
            .unwrap_or(f64::NAN)
    };
    std::thread::sleep(Duration::from_secs(2));

    println!("npd-agent {} (pid {pid})", full.join(" "));
    println!(
        "ring buffer mapping: {} of RSS (kernel memory, mapped twice); 'own RSS' is RSS without it",
        mib(bpf_map_kib(pid))
    );
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>12}",
        "phase", "CPU (s)", "RSS", "peak RSS", "own RSS"
    );
    let rss0 = status_kib(pid, "VmRSS");
    let own0 = own_kib(pid);
    let cpu0 = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(idle_secs));
    let (cpu1, rss1) = (cpu_seconds(pid), status_kib(pid, "VmRSS"));
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>12}",
        "start",
        "",
        mib(rss0),
        "",
        mib(own0)
    );
    println!(
        "{:<34} {:>12.2} {:>12} {:>12} {:>12}",
        format!("idle {idle_secs} s"),
        cpu1 - cpu0,
        mib(rss1),
        mib(status_kib(pid, "VmHWM")),
        mib(own_kib(pid))
    );

    let _devkmsg = Sysctl::set("kernel/printk_devkmsg", "on");
    let padding = "x".repeat(80);
    for round in 1..=floods {
        let marker = unique("npd-bench");
        let before = scrape("npd_kernel_events_received_total{kind=\"log\"}");
        let cpu_before = cpu_seconds(pid);
        let started = Instant::now();
        let mut kmsg = OpenOptions::new()
            .write(true)
            .open("/dev/kmsg")
            .expect("opening /dev/kmsg");
        let mut peak = 0;
        for i in 0..flood {
            kmsg.write_all(format!("{marker} {i} {padding}\n").as_bytes())
                .expect("writing /dev/kmsg");
            if i % 1000 == 0 {
                peak = peak.max(status_kib(pid, "VmRSS"));
            }
        }
        let wrote = started.elapsed();
        // Wait until the agent has taken everything (or 30 s).
        let deadline = Instant::now() + Duration::from_secs(30);
        let lost_series = "npd_kernel_events_lost_total{kind=\"log\",reason=\"ring_buffer_full\"}";
        while Instant::now() < deadline {
            let got = scrape("npd_kernel_events_received_total{kind=\"log\"}") - before;
            if got + scrape(lost_series) >= flood as f64 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            peak = peak.max(status_kib(pid, "VmRSS"));
        }
        let received = scrape("npd_kernel_events_received_total{kind=\"log\"}") - before;
        println!(
            "{:<34} {:>12.2} {:>12} {:>12} {:>12}",
            format!(
                "flood {round}: {flood} lines in {:.2} s",
                wrote.as_secs_f64()
            ),
            cpu_seconds(pid) - cpu_before,
            mib(status_kib(pid, "VmRSS")),
            mib(peak.max(status_kib(pid, "VmRSS"))),
            mib(own_kib(pid))
        );
        println!(
            "    received {received}, ring-buffer drops so far {}",
            scrape(lost_series)
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>12}",
        "after floods",
        "",
        mib(status_kib(pid, "VmRSS")),
        mib(status_kib(pid, "VmHWM")),
        mib(own_kib(pid))
    );
    drop(agent);
}
