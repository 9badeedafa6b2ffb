//! Hostile and mistaken input against the real agent binary: flags out of range, windows that
//! would overflow the clock, a kernel log input that ends, a stdout nobody reads, a tracefs
//! directory that is not one, the HTTP servers under too many connections and bodies they must
//! not read, the debug controls from outside the host, and a developer's cluster the tests
//! must never reach. Each fails with a clear message and a non-zero exit, or stops cleanly:
//! never a panic, a spin or a hang. Tests that need root say so; tests run one at a time
//! (`serial`) and put back everything they change.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use npd_tests::{
    agent::{Agent, agent_binary, is_kernel_event},
    http::{self, free_port},
    kernel::{TempDir, run, write_kmsg},
    kernel_test, serial, unique,
};

const WAIT: Duration = Duration::from_secs(30);

/// NPD's README oops line (reason KernelOops).
const KERNEL_OOPS: &str =
    "BUG: unable to handle kernel NULL pointer dereference at 0000000000000000";

/// Runs the agent to completion (it must exit within [`WAIT`]): exit code and stderr.
fn run_agent(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(agent_binary())
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting npd-agent");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for npd-agent") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("npd-agent {args:?} did not exit within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr)
        .expect("reading stderr");
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    (status.code(), stderr)
}

#[test]
fn out_of_range_flags_are_errors_at_start() {
    for (flag, named) in [
        ("--ring-buffer-size=5000", "--ring-buffer-size"),
        ("--ring-buffer-size=0", "--ring-buffer-size"),
        (
            "--k8s-exporter-heartbeat-period=0s",
            "--k8s-exporter-heartbeat-period",
        ),
        (
            "--k8s-exporter-heartbeat-period=400000000000y",
            "--k8s-exporter-heartbeat-period",
        ),
    ] {
        let (code, stderr) = run_agent(&["run", "--source", "kmsg", flag]);
        assert_eq!(code, Some(2), "{flag}:\n{stderr}");
        assert!(stderr.contains(named), "{flag}: {stderr}");
    }
}

#[test]
fn rule_windows_beyond_a_year_are_configuration_errors() {
    let dir = TempDir::new("npd-windows");
    let file = dir.join("rules.json");
    std::fs::write(
        &file,
        r#"{"source":"kernel-monitor","rules":[
            {"type":"temporary","reason":"OOMKilling","event":"oom_kill","dedupWindow":"400000000000y"}]}"#,
    )
    .unwrap();
    let file = file.to_string_lossy().into_owned();
    let (code, stderr) = run_agent(&["check-config", &file]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{file}: $.rules[0].dedupWindow: duration")),
        "{stderr}"
    );
    // The daemon refuses them too, before touching the kernel.
    let (code, stderr) = run_agent(&["run", "--source", "kmsg", "--config", &file]);
    assert_eq!(code, Some(2), "{stderr}");
}

#[test]
fn replay_survives_times_at_the_end_of_every_clock() {
    let mut child = Command::new(agent_binary())
        .arg("replay")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting npd-agent replay");
    let input = format!(
        "[18446744073709551615.0] x\n[253402300800.000000] {KERNEL_OOPS}\n\
         6,1,18446744073709551615,-;task docker:7 blocked for more than 120 seconds.\n"
    );
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let reasons: Vec<&str> = lines.iter().filter_map(|v| v["reason"].as_str()).collect();
    assert_eq!(
        reasons,
        ["KernelOops", "TaskHung", "DockerHung"],
        "{stdout}"
    );
    // The latest time every Kubernetes client can read.
    assert_eq!(lines[2]["transition_time"], "9999-12-30T22:00:00Z");
}

/// A file given as `--kmsg-path` is read to its end, which ends the agent cleanly (it never
/// spins on a read of 0 bytes).
#[test]
fn a_kmsg_input_that_ends_ends_the_agent_cleanly() {
    let _serial = serial();
    let dir = TempDir::new("npd-kmsg-file");
    let file = dir.join("kmsg");
    std::fs::write(
        &file,
        format!("6,100,1000,-;hello\n SUBSYSTEM=x\n2,101,2000,-;{KERNEL_OOPS}\n"),
    )
    .unwrap();
    let path = file.to_string_lossy().into_owned();
    let agent = Agent::start(&["run", "--source", "kmsg", "--kmsg-path", &path]);
    let stopped = agent.wait_exit(WAIT);
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("end of input"),
        "{}",
        stopped.stderr
    );
    let oops: Vec<_> = stopped
        .lines
        .iter()
        .filter(|v| v["reason"] == "KernelOops")
        .collect();
    assert_eq!(oops.len(), 1, "{:?}", stopped.lines);
    assert_eq!(oops[0]["message"], KERNEL_OOPS);
}

/// Whoever read stdout went away (EPIPE): the agent says so and stops cleanly, exit 0.
#[test]
fn a_closed_stdout_stops_the_agent_cleanly() {
    let Some(_serial) = kernel_test("a_closed_stdout_stops_the_agent_cleanly") else {
        return;
    };
    let mut child = Command::new(agent_binary())
        .args([
            "run",
            "--source",
            "kmsg",
            "--kernel-events",
            "--port",
            "0",
            "--prometheus-port",
            "0",
            "--enable-k8s-exporter=false",
        ])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting npd-agent");
    let stderr = BufReader::new(child.stderr.take().expect("piped"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_stderr = |what: &str| loop {
        match rx.recv_timeout(WAIT) {
            Ok(line) if line.contains(what) => return line,
            Ok(_) => {}
            Err(_) => panic!("no stderr line with {what:?}"),
        }
    };
    wait_stderr("npd-agent started");
    let marker = unique("npd-epipe");
    write_kmsg(&format!("{marker} first"));
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    let mut first = String::new();
    while !first.contains(&marker) {
        first.clear();
        stdout.read_line(&mut first).expect("reading stdout");
    }
    drop(stdout);
    // More output for a closed pipe.
    let deadline = Instant::now() + WAIT;
    let status = loop {
        write_kmsg(&format!("{marker} after the reader left"));
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the agent kept running");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit status {status}");
    wait_stderr("stdout is closed");
}

/// Whether tracefs is mounted at `dir`, from /proc/self/mounts.
fn tracefs_mounted_at(dir: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let mut f = l.split_whitespace();
            let (_, at, fs) = (f.next(), f.next(), f.next());
            at == Some(&*dir.to_string_lossy()) && fs == Some("tracefs")
        })
}

/// `--tracefs DIR`: npd never mounts tracefs over a directory that holds something else; on
/// an empty one it mounts it, and unmounts it at exit.
#[test]
fn tracefs_is_mounted_only_where_safe_and_unmounted_at_exit() {
    let Some(_serial) = kernel_test("tracefs_is_mounted_only_where_safe_and_unmounted_at_exit")
    else {
        return;
    };
    // The programs attach through the standard tracefs; make sure it is there (as on a node).
    let standard = std::path::Path::new("/sys/kernel/tracing");
    let _standard = (!standard.join("events").is_dir()).then(|| {
        run("mount", &["-t", "tracefs", "nodev", "/sys/kernel/tracing"]);
        npd_tests::kernel::Mount(standard.to_path_buf())
    });

    let occupied = TempDir::new("npd-tracefs-occupied");
    std::fs::write(occupied.join("data"), "keep me").unwrap();
    let dir = occupied.0.to_string_lossy().into_owned();
    let (code, stderr) = run_agent(&[
        "run",
        "--source",
        "ebpf",
        "--tracefs",
        &dir,
        "--port",
        "0",
        "--prometheus-port",
        "0",
        "--enable-k8s-exporter=false",
    ]);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&dir) && stderr.contains("not empty"),
        "{stderr}"
    );
    assert!(!tracefs_mounted_at(&occupied.0));
    assert_eq!(
        std::fs::read_to_string(occupied.join("data")).unwrap(),
        "keep me"
    );

    let empty = TempDir::new("npd-tracefs-empty");
    let dir = empty.0.to_string_lossy().into_owned();
    let agent = Agent::start(&["run", "--source", "ebpf", "--tracefs", &dir]);
    assert!(tracefs_mounted_at(&empty.0), "{}", agent.stderr());
    let stopped = agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        !tracefs_mounted_at(&empty.0),
        "left mounted:\n{}",
        stopped.stderr
    );
}

/// An address on `lo` that is not a loopback address (10.253.0.1/32): a way to reach the
/// agent from "outside" on any machine. Removed on drop.
struct OutsideAddress;

const OUTSIDE: [u8; 4] = [10, 253, 0, 1];

impl OutsideAddress {
    fn add() -> OutsideAddress {
        run("ip", &["addr", "add", "10.253.0.1/32", "dev", "lo"]);
        OutsideAddress
    }
}

impl Drop for OutsideAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", "10.253.0.1/32", "dev", "lo"])
            .status();
    }
}

/// `--debug-endpoints` answers on loopback only, whatever `--address` says: from another
/// address the controls do not exist (404), while `/healthz` is served.
#[test]
fn debug_endpoints_answer_only_on_loopback() {
    let Some(_serial) = kernel_test("debug_endpoints_answer_only_on_loopback") else {
        return;
    };
    let _outside = OutsideAddress::add();
    let port = free_port();
    let port_arg = port.to_string();
    let agent = Agent::start(&[
        "run",
        "--source",
        "kmsg",
        "--address",
        "0.0.0.0",
        "--port",
        &port_arg,
        "--debug-endpoints",
    ]);
    let outside = SocketAddr::from((OUTSIDE, port));
    let inside = SocketAddr::from(([127, 0, 0, 1], port));
    let path = "/debug/report?reason=KernelOops&message=injected";
    assert_eq!(http::get(outside, "/healthz").unwrap().status, 200);
    assert_eq!(http::post(outside, path).unwrap().status, 404);
    assert_eq!(http::post(inside, path).unwrap().status, 202);
    let stopped = agent.stop();
    let injected = stopped
        .lines
        .iter()
        .filter(|v| v["reason"] == "KernelOops")
        .count();
    assert_eq!(injected, 1, "only the loopback request got through");
}

/// Reads until the server closes the connection (`Ok(bytes)`), or fails after `timeout`.
fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> std::io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(timeout))?;
    let mut out = Vec::new();
    match stream.read_to_end(&mut out) {
        Ok(_) => Ok(out),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(out),
        Err(e) => Err(e),
    }
}

/// The HTTP servers hold at most 64 connections (more are closed at once, and counted), close
/// idle ones, and never read a request body: a request announcing 100 MB is answered without
/// it, and its connection closed.
#[test]
fn http_servers_bound_connections_and_read_no_body() {
    let Some(_serial) = kernel_test("http_servers_bound_connections_and_read_no_body") else {
        return;
    };
    let (port, metrics_port) = (free_port(), free_port());
    let (p, mp) = (port.to_string(), metrics_port.to_string());
    let agent = Agent::start(&[
        "run",
        "--source",
        "kmsg",
        "--port",
        &p,
        "--prometheus-port",
        &mp,
    ]);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));

    let mut idle: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(addr).expect("connecting"))
        .collect();
    // Give the server time to accept them all, then one more is closed without an answer.
    std::thread::sleep(Duration::from_millis(500));
    let mut extra = TcpStream::connect(addr).expect("connecting");
    let _ = write!(extra, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let answer = read_until_closed(&mut extra, WAIT).expect("the extra connection is closed");
    assert!(
        answer.is_empty(),
        "served beyond the cap: {:?}",
        String::from_utf8_lossy(&answer)
    );
    let metrics = http::get(SocketAddr::from(([127, 0, 0, 1], metrics_port)), "/metrics").unwrap();
    assert!(
        http::sample(&metrics.body, "npd_http_connections_refused_total").unwrap_or(0.0) >= 1.0,
        "{}",
        metrics.body
    );
    // Idle connections are closed by the server.
    let closed = read_until_closed(&mut idle[0], WAIT).expect("an idle connection is closed");
    assert!(closed.is_empty());
    idle.clear();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(http::get(addr, "/healthz").unwrap().status, 200);

    // A body announced but never sent: answered at once, connection closed.
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
    )
    .unwrap();
    let answer = read_until_closed(&mut stream, WAIT).expect("answered and closed");
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 405"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(agent.stop().status.success());
}

/// However the developer's shell is set up (`KUBECONFIG`, an in-cluster environment), an agent
/// a test starts without its own API server runs standalone.
#[test]
fn test_agents_never_reach_a_real_cluster() {
    let Some(_serial) = kernel_test("test_agents_never_reach_a_real_cluster") else {
        return;
    };
    let mut cmd = Command::new(agent_binary());
    cmd.args(["run", "--source", "kmsg", "--kernel-events"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("KUBERNETES_SERVICE_HOST", "10.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", "443");
    let agent = Agent::start_with(&mut cmd);
    let marker = unique("npd-standalone");
    write_kmsg(&marker);
    agent.wait_for(WAIT, &marker, |v| {
        is_kernel_event(v, "log") && v["message"].as_str().is_some_and(|m| m.contains(&marker))
    });
    let stopped = agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("running standalone"),
        "{}",
        stopped.stderr
    );
}

/// Logs are for `kubectl logs`: on a stderr that is not a terminal, no colour codes (and none
/// needs NO_COLOR to be set).
#[test]
fn logs_off_a_terminal_have_no_colour_codes() {
    let _serial = serial();
    let dir = TempDir::new("npd-kmsg-colour");
    let file = dir.join("kmsg");
    std::fs::write(&file, format!("2,1,1000,-;{KERNEL_OOPS}\n")).unwrap();
    let out = Command::new(agent_binary())
        .args([
            "run",
            "--source",
            "kmsg",
            "--kmsg-path",
            &file.to_string_lossy(),
            "--port",
            "0",
            "--prometheus-port",
            "0",
            "--enable-k8s-exporter=false",
        ])
        .env_remove("NO_COLOR")
        .env_remove("KUBECONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("running npd-agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("npd-agent started"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "an escape sequence in logs written to a pipe:\n{stderr:?}"
    );
}
