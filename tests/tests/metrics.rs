//! Metrics and health against the real agent, a real kernel and a real Prometheus: NPD's
//! problem metrics scraped by Prometheus, `/healthz` following the sensor's reader, and exact
//! accounting of ring-buffer drops. Needs root; tests run one at a time (`serial`) and put
//! every piece of kernel state back, also when they fail.

use std::{
    ffi::CString,
    fs::OpenOptions,
    io::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use npd_tests::{
    agent::{Agent, is_kernel_event},
    have_root,
    http::{self, free_port, sample},
    kernel::{Sysctl, write_kmsg},
    kernel_test,
    prometheus::{self, Prometheus, promtool_check_metrics},
    serial, unique,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// The NPD kernel-monitor line whose reason is `KernelOops`.
const KERNEL_OOPS: &str =
    "BUG: unable to handle kernel NULL pointer dereference at 0000000000000000";

/// An agent with its health and metrics servers on free ports.
struct Npd {
    agent: Agent,
    health: SocketAddr,
    metrics: SocketAddr,
}

impl Npd {
    fn start(extra: &[&str]) -> Npd {
        let (health_port, metrics_port) = (free_port(), free_port());
        let (hp, mp) = (health_port.to_string(), metrics_port.to_string());
        let mut args = vec![
            "run",
            "--enable-k8s-exporter=false",
            "--port",
            &hp,
            "--prometheus-port",
            &mp,
            "--debug-endpoints",
        ];
        args.extend_from_slice(extra);
        let agent = Agent::start(&args);
        let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        Npd {
            agent,
            health: local(health_port),
            metrics: local(metrics_port),
        }
    }

    fn get(&self, path: &str) -> http::Response {
        let addr = if path == "/metrics" {
            self.metrics
        } else {
            self.health
        };
        http::get(addr, path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\nagent stderr:\n{}", self.agent.stderr()))
    }

    fn post(&self, path: &str) -> http::Response {
        let r = http::post(self.health, path).unwrap_or_else(|e| panic!("POST {path}: {e}"));
        assert_eq!(r.status, 202, "POST {path}: {}", r.body);
        r
    }

    fn metric(&self, series: &str) -> Option<f64> {
        sample(&self.get("/metrics").body, series)
    }

    /// Polls `/healthz` until its status is `status`; returns the body.
    fn wait_health(&self, status: u16, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.get("/healthz");
            if r.status == status {
                return r.body;
            }
            assert!(
                Instant::now() < deadline,
                "/healthz still {} after {timeout:?}:\n{}",
                r.status,
                r.body
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn prometheus_available(test: &str) -> bool {
    npd_tests::prerequisite(
        test,
        prometheus::ensure_installed().map_err(|why| format!("Prometheus is not available: {why}")),
    )
}

/// NPD's metrics, scraped by a real Prometheus: a problem reported through the daemon's report
/// path (as the rules engine reports it) shows as `problem_counter{reason="KernelOops"} 1`; a
/// condition sets `problem_gauge` and its recovery clears it; `/conditions` follows; promtool
/// accepts the exposition; SIGTERM flushes the reports.
#[test]
fn prometheus_scrapes_problem_metrics() {
    let _serial = serial();
    if !have_root("prometheus_scrapes_problem_metrics")
        || !prometheus_available("prometheus_scrapes_problem_metrics")
    {
        return;
    }
    let npd = Npd::start(&["--source", "auto"]);
    let prom = Prometheus::start(&[npd.metrics], Duration::from_secs(1));
    prom.wait_for_value("up{job=\"npd\"}", 1.0, WAIT);

    npd.post(&format!(
        "/debug/report?reason=KernelOops&message={}",
        http::encode(KERNEL_OOPS)
    ));
    prom.wait_for_value("problem_counter{reason=\"KernelOops\"}", 1.0, WAIT);

    let message = "task docker:7 blocked for more than 120 seconds.";
    npd.post(&format!(
        "/debug/report?kind=condition&type=KernelDeadlock&reason=DockerHung&message={}",
        http::encode(message)
    ));
    prom.wait_for_value(
        "problem_gauge{type=\"KernelDeadlock\",reason=\"DockerHung\"}",
        1.0,
        WAIT,
    );
    let conditions: Value =
        serde_json::from_str(&npd.get("/conditions").body).expect("/conditions is JSON");
    assert_eq!(conditions[0]["type"], "KernelDeadlock", "{conditions}");
    assert_eq!(conditions[0]["status"], "True");
    assert_eq!(conditions[0]["reason"], "DockerHung");
    assert_eq!(conditions[0]["message"], message);

    npd.post("/debug/report?kind=condition&type=KernelDeadlock&status=False&reason=KernelHasNoDeadlock&message=ok");
    prom.wait_for_value(
        "problem_gauge{type=\"KernelDeadlock\",reason=\"DockerHung\"}",
        0.0,
        WAIT,
    );
    prom.wait_for_value("problem_counter{reason=\"DockerHung\"}", 1.0, WAIT);
    assert_eq!(prom.value("npd_sensor_reading"), Some(1.0));
    assert!(
        prom.value("npd_kernel_events_received_total{kind=\"log\"}")
            .is_some()
    );

    // promtool: every npd_* family passes; the only complaints are about NPD's own names
    // (`problem_counter` has no `_total`; both names contain their type), which dashboards and
    // alerts depend on and are kept byte for byte.
    let exposition = npd.get("/metrics").body;
    let (code, out) = promtool_check_metrics(&exposition);
    let complaints: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        code == 0
            || (code == 3
                && complaints
                    .iter()
                    .all(|l| l.starts_with("problem_counter ") || l.starts_with("problem_gauge "))),
        "promtool check metrics: exit {code}:\n{out}"
    );
    let without_npd_names: String = exposition
        .lines()
        .filter(|l| !l.contains("problem_counter") && !l.contains("problem_gauge"))
        .map(|l| format!("{l}\n"))
        .collect();
    let (code, out) = promtool_check_metrics(&without_npd_names);
    assert_eq!(
        code, 0,
        "promtool check metrics on the npd_* families:\n{out}"
    );

    // SIGTERM flushes: every report made it to stdout (standalone mode).
    let stopped = npd.agent.stop();
    assert!(stopped.status.success(), "agent exit: {}", stopped.status);
    let reasons: Vec<&str> = stopped
        .lines
        .iter()
        .filter_map(|l| l["reason"].as_str())
        .collect();
    assert_eq!(
        reasons,
        ["KernelOops", "DockerHung", "KernelHasNoDeadlock"],
        "stdout: {:?}",
        stopped.lines
    );
    assert!(
        stopped
            .stderr
            .contains("SIGTERM received: flushing the last state"),
        "{}",
        stopped.stderr
    );
}

/// The end-to-end NPD case: one KernelOops line written to /dev/kmsg is
/// `problem_counter{reason="KernelOops"} 1` in Prometheus, through the real rules (every
/// reason of the defaults starts at 0).
#[test]
fn kernel_oops_line_counts_in_prometheus() {
    let _serial = serial();
    let test = "kernel_oops_line_counts_in_prometheus";
    if !have_root(test) || !prometheus_available(test) {
        return;
    }
    let npd = Npd::start(&["--source", "auto"]);
    let series = "problem_counter{reason=\"KernelOops\"}";
    assert_eq!(
        npd.metric(series),
        Some(0.0),
        "the agent must start every reason of its rules at 0"
    );
    let prom = Prometheus::start(&[npd.metrics], Duration::from_secs(1));
    prom.wait_for_value(series, 0.0, WAIT);
    write_kmsg(KERNEL_OOPS);
    prom.wait_for_value(series, 1.0, WAIT);
}

/// `/healthz` is 200 while the reader runs, 503 with the reason while it is down (killed
/// through the documented fault-injection endpoint: nothing outside the agent can detach its
/// programs), and 200 again once the supervisor restarted it; events flow again afterwards.
fn healthz_follows_the_reader(source: &str) {
    let npd = Npd::start(&["--source", source, "--kernel-events"]);
    let body = npd.wait_health(200, WAIT);
    assert!(body.starts_with("ok\n"), "{body}");
    assert!(body.contains(&format!("source: {source}")), "{body}");

    npd.post("/debug/sensor/kill-reader?down=3s");
    let body = npd.wait_health(503, Duration::from_secs(5));
    assert!(
        body.starts_with("unhealthy\nproblem: sensor is not reading kernel events:"),
        "{body}"
    );
    assert!(body.contains("killed on request"), "{body}");
    assert_eq!(npd.metric("npd_sensor_reading"), Some(0.0));

    let body = npd.wait_health(200, Duration::from_secs(15));
    assert!(body.contains("reader restarts: 1"), "{body}");
    assert_eq!(npd.metric("npd_sensor_reading"), Some(1.0));
    assert_eq!(npd.metric("npd_sensor_reader_restarts_total"), Some(1.0));

    let marker = unique("npd-after-restart");
    write_kmsg(&marker);
    npd.agent.wait_for(WAIT, &marker, |v| {
        is_kernel_event(v, "log") && v["message"].as_str().is_some_and(|m| m.contains(&marker))
    });
}

#[test]
fn healthz_follows_the_reader_ebpf() {
    let _serial = serial();
    if have_root("healthz_follows_the_reader_ebpf") {
        healthz_follows_the_reader("ebpf");
    }
}

#[test]
fn healthz_follows_the_reader_kmsg() {
    let _serial = serial();
    if have_root("healthz_follows_the_reader_kmsg") {
        healthz_follows_the_reader("kmsg");
    }
}

/// Sequence numbers of /dev/kmsg records, to tell whether anything else was logged between two
/// of our lines.
struct KmsgSeq;

impl KmsgSeq {
    /// Writes `line` and returns the sequence number the kernel gave it.
    fn write(line: &str) -> u64 {
        let path = CString::new("/dev/kmsg").expect("path");
        // SAFETY: a valid C string; the descriptor is closed below.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        assert!(
            fd >= 0,
            "opening /dev/kmsg: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: our descriptor; SEEK_END moves past every record already logged.
        unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
        write_kmsg(line);
        let mut buf = vec![0u8; 8192];
        let deadline = Instant::now() + Duration::from_secs(5);
        let seq = loop {
            // SAFETY: reading into our buffer.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                let record = String::from_utf8_lossy(&buf[..n as usize]);
                if record.contains(line)
                    && let Some(seq) = record.split(',').nth(1).and_then(|s| s.parse().ok())
                {
                    break seq;
                }
                continue;
            }
            assert!(
                Instant::now() < deadline,
                "did not read back {line:?} from /dev/kmsg"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        // SAFETY: closing our descriptor.
        unsafe { libc::close(fd) };
        seq
    }
}

/// Writes `count` lines `<marker> <i> <padding>` as fast as one descriptor can.
fn flood(marker: &str, count: usize) {
    let mut kmsg = OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .expect("opening /dev/kmsg");
    let padding = "x".repeat(400);
    for i in 0..count {
        kmsg.write_all(format!("{marker} {i} {padding}\n").as_bytes())
            .expect("writing /dev/kmsg");
    }
}

/// A flood into a deliberately tiny ring buffer: what the agent received plus what the eBPF
/// program counted as dropped is exactly what was sent; `/metrics` and `/healthz` show the
/// drops.
#[test]
fn ring_buffer_overflow_is_counted_exactly() {
    let Some(_serial) = kernel_test("ring_buffer_overflow_is_counted_exactly") else {
        return;
    };
    const SENT: usize = 20_000;
    let _devkmsg = Sysctl::set("kernel/printk_devkmsg", "on");
    let npd = Npd::start(&[
        "--source",
        "ebpf",
        "--kernel-events",
        "--ring-buffer-size",
        "4096",
        "--health-loss-window",
        "10m",
    ]);
    let lost_series =
        |reason: &str| format!("npd_kernel_events_lost_total{{kind=\"log\",reason=\"{reason}\"}}");
    let lost = || {
        npd.metric(&lost_series("ring_buffer_full")).unwrap()
            + npd.metric(&lost_series("read_error")).unwrap()
    };
    for attempt in 1..=3 {
        let lost_before = lost();
        let marker = unique("npd-flood");
        let first = KmsgSeq::write(&format!("{marker} start"));
        flood(&marker, SENT);
        std::thread::sleep(Duration::from_secs(1));
        let end = format!("{marker} end");
        let last = KmsgSeq::write(&end);

        // Everything before the end line has been read once the end line arrives.
        let mut received = 0usize;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut end_seen = false;
        while !end_seen {
            assert!(Instant::now() < deadline, "the end line did not arrive");
            for line in npd.agent.lines_for(Duration::from_millis(200)) {
                let Some(message) = line["message"]
                    .as_str()
                    .filter(|_| is_kernel_event(&line, "log"))
                else {
                    continue;
                };
                if message == end {
                    end_seen = true;
                } else if message.starts_with(&format!("{marker} ")) && !message.ends_with(" start")
                {
                    received += 1;
                }
            }
        }
        let dropped = (lost() - lost_before) as usize;
        let foreign = (last - first - 1) as usize - SENT;
        eprintln!(
            "attempt {attempt}: sent {SENT}, received {received}, dropped {dropped}, other kernel messages {foreign}"
        );
        if foreign != 0 {
            eprintln!(
                "other kernel messages were logged during the flood: cannot attribute drops exactly; again"
            );
            continue;
        }
        assert!(
            dropped > 0,
            "a 4096-byte ring buffer did not overflow: nothing was tested"
        );
        assert_eq!(
            received + dropped,
            SENT,
            "received {received} + dropped {dropped} != sent {SENT}"
        );

        let total = lost() as u64;
        let body = npd.wait_health(503, Duration::from_secs(5));
        assert!(
            body.contains(&format!(
                "problem: kernel events are being lost: {total} lost since start"
            )),
            "{body}"
        );
        assert!(
            body.contains(&format!("lost: {total} (ring buffer full: log=")),
            "{body}"
        );
        return;
    }
    panic!("other kernel messages interleaved with every flood; cannot check exact accounting");
}
