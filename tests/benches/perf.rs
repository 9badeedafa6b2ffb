//! npd's performance table (needs root; `cargo xtask bench perf`): every figure of the
//! performance goals from one run, printed beside its goal and written to
//! `target/bench/perf.json` for the next run to compare against. Numbers, not assertions.
//!
//! The release agent (`NPD_AGENT_BIN`), real floods through `/dev/kmsg`, a real kube-apiserver
//! on loopback:
//!
//! 1. **printk cost without npd.** `npd-test-hog kmsg` writes the realistic corpus
//!    ([`npd_tests::corpus`]: 100,000 lines of 28 kinds of kernel noise and 1,000 lines that
//!    match six default rules, each a distinct fault) to `/dev/kmsg` at full speed, three
//!    times, and reports its own system time.
//! 2. **Standalone agent** (default rules, stdout, metrics on): wake-ups over 60 s idle, then
//!    the same three floods: the agent's CPU per line (`se.sum_exec_runtime` of all its
//!    threads), the writer's system time per line with npd attached, ring-buffer drops and the
//!    matches counted (`problem_counter`).
//! 3. **Exporter on.** With the default rules, as deployed: RSS idle, then after each of the
//!    three floods. With two bench rule files beside them: the condition latency, from a
//!    `/dev/kmsg` write to the Node condition seen in a watch, over `TRIALS` (default 100)
//!    trials, and the agent's CPU per Event written, over a flood of 200 lines for 200
//!    distinct reasons (200 Events).

use std::{
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::pin,
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Event, Node};
use kube::{
    Api,
    api::{ListParams, WatchParams},
};
use npd_tests::{
    agent::Agent,
    apiserver::{ApiServer, repo_root, wait_for_node_condition, watch_for_condition},
    corpus::{self, MATCH_REASONS},
    have_root,
    http::{self, free_port, sample},
    kernel::{Sysctl, TempDir, write_kmsg},
    procstat::{context_switches, exact_cpu_seconds, status_kib},
    unique,
};
use serde_json::{Value, json};

const NAME: &str = "performance benchmark";
const NODE: &str = "npd-bench-perf";
const FLOODS: u64 = 3;
const NOISE: usize = 100_000;
const MATCHES: usize = 1_000;
const EVENT_REASONS: usize = 200;
const IDLE: Duration = Duration::from_secs(60);

/// The default rule files, in the order the agent embeds them.
const DEFAULT_RULES: [&str; 4] = [
    "kernel-monitor.json",
    "readonly-monitor.json",
    "kernel-monitor-current.json",
    "structured.json",
];

fn main() {
    if !have_root(NAME) {
        return;
    }
    let _devkmsg = Sysctl::set("kernel/printk_devkmsg", "on");
    let dir = TempDir::new("npd-bench-perf");
    let floods: Vec<Flood> = (1..=FLOODS).map(|seed| Flood::new(&dir, seed)).collect();

    // 1. The writer alone.
    let without: Vec<f64> = floods.iter().map(|f| f.write().sys_us_per_line()).collect();

    // 2. Standalone.
    let standalone = standalone(&floods);

    // 3. Exporter on.
    let Some(server) = ApiServer::start(NAME) else {
        return;
    };
    let trials = std::env::var("TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(100usize)
        .max(20);
    let exporter = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(exporter_on(&server, &dir, &floods, trials));

    report(&without, &standalone, &exporter, trials);
}

/// One realistic flood: the corpus with its own seed (distinct faults in every flood), and a
/// last, unique line that matches `KernelOops`, by which the agent is known to be done.
struct Flood {
    file: PathBuf,
    marker: String,
    lines: usize,
    expected: [u64; 6],
}

/// The writer's account of one flood.
struct Written {
    lines: u64,
    seconds: f64,
    sys_us: f64,
}

impl Written {
    fn sys_us_per_line(&self) -> f64 {
        self.sys_us / self.lines as f64
    }

    fn rate(&self) -> f64 {
        self.lines as f64 / self.seconds
    }
}

impl Flood {
    fn new(dir: &TempDir, seed: u64) -> Flood {
        let (mut lines, mut expected) = corpus::realistic(NOISE, MATCHES, seed);
        let marker = unique("npd-perf-done");
        lines.push(format!(
            "BUG: unable to handle kernel NULL pointer dereference at {marker}"
        ));
        expected[3] += 1;
        let file = dir.join(&format!("flood-{seed}.txt"));
        std::fs::write(&file, lines.join("\n")).expect("writing the corpus");
        Flood {
            file,
            marker,
            lines: lines.len(),
            expected,
        }
    }

    fn write(&self) -> Written {
        let out = Command::new(env!("CARGO_BIN_EXE_npd-test-hog"))
            .arg("kmsg")
            .arg(&self.file)
            .output()
            .expect("running npd-test-hog kmsg");
        assert!(out.status.success(), "npd-test-hog kmsg: {}", out.status);
        let v: Value = serde_json::from_slice(&out.stdout).expect("the writer's JSON line");
        Written {
            lines: v["lines"].as_u64().expect("lines"),
            seconds: v["seconds"].as_f64().expect("seconds"),
            sys_us: v["sys_us"].as_f64().expect("sys_us"),
        }
    }
}

/// Scrapes one series from the agent's metrics; NaN when absent.
fn scrape(addr: SocketAddr, series: &str) -> f64 {
    http::get(addr, "/metrics")
        .ok()
        .and_then(|r| sample(&r.body, series))
        .unwrap_or(f64::NAN)
}

fn scrape_all(addr: SocketAddr) -> String {
    http::get(addr, "/metrics")
        .map(|r| r.body)
        .unwrap_or_default()
}

const RECEIVED: &str = "npd_kernel_events_received_total{kind=\"log\"}";
const LOST: &str = "npd_kernel_events_lost_total{kind=\"log\",reason=\"ring_buffer_full\"}";

fn counted(metrics: &str, reason: &str) -> f64 {
    sample(metrics, &format!("problem_counter{{reason=\"{reason}\"}}")).unwrap_or(0.0)
}

struct FloodResult {
    cpu_us_per_line: f64,
    writer_sys_us_per_line: f64,
    rate: f64,
    drops: f64,
    counted: u64,
    expected: u64,
}

struct Standalone {
    idle_switches: u64,
    idle_cpu_ms: f64,
    floods: Vec<FloodResult>,
}

fn standalone(floods: &[Flood]) -> Standalone {
    let port = free_port();
    let agent = Agent::start(&[
        "run",
        "--source",
        "ebpf",
        "--prometheus-port",
        &port.to_string(),
    ]);
    let metrics = SocketAddr::from(([127, 0, 0, 1], port));
    let pid = agent.pid();
    std::thread::sleep(Duration::from_secs(5));
    let (cs0, cpu0) = (context_switches(pid), exact_cpu_seconds(pid));
    std::thread::sleep(IDLE);
    let (cs1, cpu1) = (context_switches(pid), exact_cpu_seconds(pid));

    let mut results = Vec::new();
    for flood in floods {
        let before = scrape_all(metrics);
        let lost0 = sample(&before, LOST).unwrap_or(0.0);
        let cpu_before = exact_cpu_seconds(pid);
        let written = flood.write();
        agent.wait_for(Duration::from_secs(120), &flood.marker, |v| {
            v.to_string().contains(&flood.marker)
        });
        let cpu = exact_cpu_seconds(pid) - cpu_before;
        let after = scrape_all(metrics);
        let counted_now: u64 = MATCH_REASONS
            .iter()
            .map(|r| (counted(&after, r) - counted(&before, r)) as u64)
            .sum();
        results.push(FloodResult {
            cpu_us_per_line: cpu * 1e6 / flood.lines as f64,
            writer_sys_us_per_line: written.sys_us_per_line(),
            rate: written.rate(),
            drops: sample(&after, LOST).unwrap_or(0.0) - lost0,
            counted: counted_now,
            expected: flood.expected.iter().sum(),
        });
    }
    let stopped = agent.stop();
    assert!(stopped.status.success(), "agent exit: {}", stopped.status);
    Standalone {
        idle_switches: cs1 - cs0,
        idle_cpu_ms: (cpu1 - cpu0) * 1e3,
        floods: results,
    }
}

struct ExporterOn {
    rss_idle_kib: u64,
    rss_after_floods_kib: Vec<u64>,
    latencies: Vec<Duration>,
    event_cpu_ms: f64,
    events_written: f64,
}

fn latency_type(i: usize) -> String {
    format!("NpdPerfLatency{i}")
}

/// Rule files for the exporter run: a permanent rule per latency trial (line
/// `<marker> npd-latency-<i>` sets condition `NpdPerfLatency<i>`), and a temporary rule per
/// Event reason (line `<marker> npd-event-<i>` posts Event `NpdPerfEvent<i>`).
fn bench_rules(dir: &TempDir, marker: &str, trials: usize) -> (PathBuf, PathBuf) {
    let conditions: Vec<_> = (0..trials)
        .map(|i| json!({"type": latency_type(i), "reason": format!("NpdPerfLatency{i}Clear"), "message": "not yet"}))
        .collect();
    let rules: Vec<_> = (0..trials)
        .map(|i| json!({"type": "permanent", "condition": latency_type(i), "reason": format!("NpdPerfLatency{i}Hit"), "pattern": format!("{marker} npd-latency-{i}")}))
        .collect();
    let latency = dir.join("latency.json");
    std::fs::write(
        &latency,
        json!({"plugin": "kmsg", "source": "npd-perf-latency", "conditions": conditions, "rules": rules}).to_string(),
    )
    .expect("writing the latency rules");
    let rules: Vec<_> = (0..EVENT_REASONS)
        .map(|i| json!({"type": "temporary", "reason": format!("NpdPerfEvent{i}"), "pattern": format!("{marker} npd-event-{i}")}))
        .collect();
    let events = dir.join("events.json");
    std::fs::write(
        &events,
        json!({"plugin": "kmsg", "source": "npd-perf-events", "conditions": [], "rules": rules})
            .to_string(),
    )
    .expect("writing the Event rules");
    (latency, events)
}

/// An agent exporting to the test API server as the bench's Node, with these rule files and
/// its metrics on a free port.
fn k8s_agent(kubeconfig: &Path, rules: &[PathBuf]) -> (Agent, SocketAddr) {
    let port = free_port();
    let mut args: Vec<String> = vec!["run".into(), "--source".into(), "ebpf".into()];
    for file in rules {
        args.push("--config".into());
        args.push(file.to_string_lossy().into_owned());
    }
    args.extend([
        "--kubeconfig".into(),
        kubeconfig.to_string_lossy().into_owned(),
        "--hostname-override".into(),
        NODE.into(),
        "--prometheus-port".into(),
        port.to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (
        Agent::start(&args),
        SocketAddr::from(([127, 0, 0, 1], port)),
    )
}

async fn exporter_on(
    server: &ApiServer,
    dir: &TempDir,
    floods: &[Flood],
    trials: usize,
) -> ExporterOn {
    let marker = unique("npd-perf");
    let (latency_rules, event_rules) = bench_rules(dir, &marker, trials);
    server.create_node(NODE).await;
    let kubeconfig = server.service_account_kubeconfig().await;
    let admin = server.admin_client().await;
    let nodes: Api<Node> = Api::all(admin.clone());
    let events: Api<Event> = Api::namespaced(admin, "default");
    let config = repo_root().join("config");
    let defaults: Vec<PathBuf> = DEFAULT_RULES.iter().map(|f| config.join(f)).collect();

    // RSS idle and after floods, as deployed: the default rules.
    let (agent, metrics) = k8s_agent(&kubeconfig, &defaults);
    let pid = agent.pid();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_idle_kib = status_kib(pid, "VmRSS");
    let mut rss_after_floods_kib = Vec::new();
    for flood in floods {
        let received0 = scrape(metrics, RECEIVED);
        let lost0 = scrape(metrics, LOST);
        flood.write();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let taken =
                scrape(metrics, RECEIVED) - received0 + (scrape(metrics, LOST) - lost0).max(0.0);
            if taken >= flood.lines as f64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The Events it led to are written (aggregated) within a few seconds.
        tokio::time::sleep(Duration::from_secs(5)).await;
        rss_after_floods_kib.push(status_kib(pid, "VmRSS"));
    }
    let stopped = agent.stop();
    assert!(stopped.status.success(), "agent exit: {}", stopped.status);

    // Latency and Event writes: the bench's own rules beside the defaults.
    let rules: Vec<PathBuf> = defaults
        .into_iter()
        .chain([latency_rules, event_rules])
        .collect();
    let (agent, metrics) = k8s_agent(&kubeconfig, &rules);
    let pid = agent.pid();

    // The agent's first write: every condition in its default state.
    let last = latency_type(trials - 1);
    let rv = wait_for_node_condition(&nodes, NODE, &last, "False").await;

    // Condition latency.
    let wp = WatchParams::default()
        .fields(&format!("metadata.name={NODE}"))
        .timeout(290);
    let mut latencies = Vec::with_capacity(trials);
    {
        let mut watch = pin!(nodes.watch(&wp, &rv).await.expect("watching the Node"));
        for i in 0..trials {
            let type_ = latency_type(i);
            let start = Instant::now();
            write_kmsg(&format!("{marker} npd-latency-{i}"));
            watch_for_condition(&mut watch, &type_, "True").await;
            latencies.push(start.elapsed());
            // Isolated changes, as kernel faults are.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // CPU per Event written: 200 distinct reasons, one line each, as fast as they come.
    let writes = |m: &str| {
        ["create_event", "patch_event"]
            .iter()
            .map(|c| {
                sample(
                    m,
                    &format!("npd_k8s_api_calls_total{{call=\"{c}\",result=\"success\"}}"),
                )
                .unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    let writes0 = writes(&scrape_all(metrics));
    let cpu0 = exact_cpu_seconds(pid);
    {
        let mut kmsg = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/kmsg")
            .expect("opening /dev/kmsg");
        for i in 0..EVENT_REASONS {
            kmsg.write_all(format!("{marker} npd-event-{i}").as_bytes())
                .expect("writing /dev/kmsg");
        }
    }
    // Done when every reason has its Event (the API server is asked, not the agent).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let posted = events
            .list(&ListParams::default().fields(&format!("involvedObject.name={NODE}")))
            .await
            .expect("listing Events")
            .items
            .iter()
            .filter(|e| {
                e.reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with("NpdPerfEvent"))
            })
            .count();
        if posted >= EVENT_REASONS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {posted} of {EVENT_REASONS} Events after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let event_cpu_ms = (exact_cpu_seconds(pid) - cpu0) * 1e3;
    let events_written = writes(&scrape_all(metrics)) - writes0;

    let stopped = agent.stop();
    assert!(stopped.status.success(), "agent exit: {}", stopped.status);
    ExporterOn {
        rss_idle_kib,
        rss_after_floods_kib,
        latencies,
        event_cpu_ms,
        events_written,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(without: &[f64], s: &Standalone, e: &ExporterOn, trials: usize) {
    let per_line = median(s.floods.iter().map(|f| f.cpu_us_per_line).collect());
    let with = median(s.floods.iter().map(|f| f.writer_sys_us_per_line).collect());
    let without_median = median(without.to_vec());
    let added = with - without_median;
    let per_event = e.event_cpu_ms / e.events_written.max(1.0);
    let drops: f64 = s.floods.iter().map(|f| f.drops).sum();
    let rate = median(s.floods.iter().map(|f| f.rate).collect());
    let mib = |kib: u64| kib as f64 / 1024.0;
    let rss_idle = mib(e.rss_idle_kib);
    let first = mib(*e.rss_after_floods_kib.first().expect("floods"));
    let last = mib(*e.rss_after_floods_kib.last().expect("floods"));
    let mut lat = e.latencies.clone();
    lat.sort();
    let pct = |p: f64| {
        lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1].as_secs_f64() * 1e3
    };
    let (p50, p99) = (pct(0.50), pct(0.99));
    let wakeups = s.idle_switches as f64 / IDLE.as_secs_f64();

    println!(
        "\nnpd performance (release agent; floods of the realistic corpus, {} lines)",
        NOISE + MATCHES + 1
    );
    println!("{:<64} {:>14} {:>10}", "figure", "measured", "goal");
    let row = |name: &str, measured: String, goal: &str| {
        println!("{name:<64} {measured:>14} {goal:>10}");
    };
    row(
        "agent CPU per line, realistic corpus, standalone (median of 3)",
        format!("{per_line:.3} us"),
        "<= 0.6 us",
    );
    row(
        &format!(
            "agent CPU per Event write ({} writes for {EVENT_REASONS} Events)",
            e.events_written
        ),
        format!("{per_event:.3} ms"),
        "<= 0.1 ms",
    );
    row(
        &format!("added printk cost in the writer ({with:.3} vs {without_median:.3} us)"),
        format!("{added:.3} us"),
        "<= 0.3 us",
    );
    row(
        &format!("ring-buffer drops in 3 floods at {rate:.0} lines/s"),
        format!("{drops}"),
        "0",
    );
    row(
        "RSS idle, exporter on",
        format!("{rss_idle:.1} MiB"),
        "<= 16 MiB",
    );
    row(
        &format!("RSS after three floods (after the first: {first:.1} MiB)"),
        format!("{last:.1} MiB"),
        "",
    );
    row(
        "  growth from the first flood to the third",
        format!("{:+.2} MiB", last - first),
        "<= 0.5 MiB",
    );
    row(
        &format!("condition on the Node, p99 over {trials} trials (p50 {p50:.2} ms)"),
        format!("{p99:.2} ms"),
        "<= 15 ms",
    );
    row(
        &format!(
            "idle wake-ups over {} s (CPU {:.1} ms)",
            IDLE.as_secs(),
            s.idle_cpu_ms
        ),
        format!("{}", s.idle_switches),
        "0",
    );
    for (i, f) in s.floods.iter().enumerate() {
        println!(
            "  flood {}: {:.3} us/line, writer {:.3} us/line, {:.0} lines/s, drops {}, matches counted {} of {}",
            i + 1,
            f.cpu_us_per_line,
            f.writer_sys_us_per_line,
            f.rate,
            f.drops,
            f.counted,
            f.expected
        );
    }
    println!(
        "  writer alone: {}",
        without
            .iter()
            .map(|w| format!("{w:.3} us/line"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let json = json!({
        "agent_cpu_us_per_line": per_line,
        "agent_cpu_ms_per_event_write": per_event,
        "event_writes": e.events_written,
        "printk_added_us": added,
        "writer_sys_us_per_line_with_npd": with,
        "writer_sys_us_per_line_without_npd": without_median,
        "ring_buffer_drops": drops,
        "flood_lines_per_second": rate,
        "rss_idle_exporter_on_mib": rss_idle,
        "rss_after_floods_mib": e.rss_after_floods_kib.iter().map(|&k| mib(k)).collect::<Vec<_>>(),
        "condition_p50_ms": p50,
        "condition_p99_ms": p99,
        "condition_trials": trials,
        "idle_wakeups_60s": s.idle_switches,
        "wakeups_per_second": wakeups,
        "floods": s.floods.iter().map(|f| json!({
            "cpu_us_per_line": f.cpu_us_per_line,
            "writer_sys_us_per_line": f.writer_sys_us_per_line,
            "lines_per_second": f.rate,
            "drops": f.drops,
            "matches_counted": f.counted,
            "matches_written": f.expected,
        })).collect::<Vec<_>>(),
        "match_reasons": MATCH_REASONS,
    });
    let out = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("bench");
    write_json(&out, &json);
}

fn write_json(dir: &Path, json: &Value) {
    let file = dir.join("perf.json");
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&file, serde_json::to_string_pretty(json).expect("JSON")))
        .unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
    println!("  written to {}", file.display());
}
