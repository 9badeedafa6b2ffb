//! The sensor against real kernel faults: each test makes the fault really happen and checks
//! the agent's `--kernel-events` output. Needs root; tests run one at a time (`serial`) and put
//! every piece of kernel state back, also when they fail.

use std::{
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use npd_tests::{
    agent::{Agent, agent_binary, is_kernel_event},
    faults::{HungWriter, failed_read, oom_kill},
    have_memory_cgroup, have_root,
    kernel::{Sysctl, write_kmsg},
    kernel_test, serial, unique,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn hog() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_npd-test-hog"))
}

fn kmsg_message_arrives_exactly(source: &str) {
    let agent = Agent::start(&["run", "--source", source, "--kernel-events"]);
    let marker = unique("npd-kmsg");
    let text = format!("{marker}: hello from the test, with unicode \u{2713} and a tab\there");
    write_kmsg(&text);
    let event = agent.wait_for(WAIT, &marker, |v| {
        is_kernel_event(v, "log") && v["message"].as_str().is_some_and(|m| m.contains(&marker))
    });
    assert_eq!(event["message"], Value::String(text));
    let stopped = agent.stop();
    assert!(stopped.status.success(), "agent exit: {}", stopped.status);
}

#[test]
fn kmsg_line_arrives_with_its_exact_text_ebpf() {
    let Some(_serial) = kernel_test("kmsg_line_arrives_with_its_exact_text_ebpf") else {
        return;
    };
    kmsg_message_arrives_exactly("ebpf");
}

#[test]
fn kmsg_line_arrives_with_its_exact_text_kmsg_source() {
    let Some(_serial) = kernel_test("kmsg_line_arrives_with_its_exact_text_kmsg_source") else {
        return;
    };
    kmsg_message_arrives_exactly("kmsg");
}

#[test]
fn oom_kill_reports_victim_pid_and_comm() {
    let _serial = serial();
    if !have_root("oom_kill_reports_victim_pid_and_comm")
        || !have_memory_cgroup("oom_kill_reports_victim_pid_and_comm")
    {
        return;
    }
    let agent = Agent::start(&["run", "--source", "ebpf", "--kernel-events"]);
    let pid = oom_kill(hog());
    let event = agent.wait_for(WAIT, "oom_kill of the hog", |v| {
        is_kernel_event(v, "oom_kill") && v["pid"] == pid
    });
    assert_eq!(event["comm"], "npd-test-hog");
    // This kernel's mark_victim has the 2024 fields: the victim had ~32 MiB resident.
    let rss = event["anon_rss_kb"].as_u64().expect("anon_rss_kb");
    assert!(rss > 1024, "anon_rss_kb {rss}");
    assert_eq!(event["uid"], 0);
    assert!(agent.stop().status.success());
}

/// A writer blocked on a frozen ext4 file system; `warnings` is `hung_task_warnings`.
fn hung_task_is_reported(warnings: &str) {
    let agent = Agent::start(&["run", "--source", "ebpf", "--kernel-events"]);
    let writer = HungWriter::start(hog(), warnings);
    let pid = writer.pid();
    let event = agent.wait_for(WAIT, "hung_task of the writer", |v| {
        is_kernel_event(v, "hung_task") && v["pid"] == pid
    });
    assert_eq!(event["comm"], "npd-test-hog");
    writer.finish();
    assert!(agent.stop().status.success());
}

#[test]
fn hung_task_reports_pid_and_comm() {
    let Some(_serial) = kernel_test("hung_task_reports_pid_and_comm") else {
        return;
    };
    hung_task_is_reported("10");
}

#[test]
fn hung_task_is_seen_when_the_kernel_prints_nothing() {
    let Some(_serial) = kernel_test("hung_task_is_seen_when_the_kernel_prints_nothing") else {
        return;
    };
    hung_task_is_reported("0");
}

#[test]
fn failed_block_read_reports_device_sector_op_and_error() {
    let Some(_serial) = kernel_test("failed_block_read_reports_device_sector_op_and_error") else {
        return;
    };
    let agent = Agent::start(&["run", "--source", "ebpf", "--kernel-events"]);
    let failed = failed_read();
    let name = failed.dev.name().to_string();
    let event = agent.wait_for(WAIT, "block_error on the loop device", |v| {
        is_kernel_event(v, "block_error") && v["device"] == name.as_str()
    });
    assert_eq!(event["sector"], 24576);
    assert_eq!(event["op"], "READ");
    assert_eq!(event["error"], -5);
    assert!(event["nr_sectors"].as_u64().unwrap_or(0) >= 8);
    assert!(agent.stop().status.success());
}

/// Writes `count` numbered lines through one descriptor as fast as the kernel takes them.
fn flood(marker: &str, count: usize) {
    use std::io::Write as _;
    let mut kmsg = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .expect("opening /dev/kmsg");
    for i in 0..count {
        kmsg.write_all(format!("{marker} {i}\n").as_bytes())
            .expect("writing /dev/kmsg");
    }
}

fn marker_lines<'a>(lines: &'a [Value], marker: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    lines.iter().filter(move |v| {
        is_kernel_event(v, "log") && v["message"].as_str().is_some_and(|m| m.starts_with(marker))
    })
}

const FLOOD: usize = 100_000;

/// Writes end markers (one a second: a marker written while the ring buffer is full is dropped
/// like any other message) until one arrives; returns every line read until then and how many
/// markers were written.
fn read_until_end_marker(agent: &Agent, end: &str) -> (Vec<Value>, u64) {
    let mut lines: Vec<Value> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let mut written = 0;
    loop {
        write_kmsg(end);
        written += 1;
        let batch = agent.lines_for(Duration::from_secs(1));
        let done = batch.iter().any(|v| v["message"] == end);
        lines.extend(batch);
        if done {
            return (lines, written);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no end marker received"
        );
    }
}

#[test]
fn flood_of_100k_messages_is_received_or_counted_ebpf() {
    let Some(_serial) = kernel_test("flood_of_100k_messages_is_received_or_counted_ebpf") else {
        return;
    };
    let _devkmsg = Sysctl::set("kernel/printk_devkmsg", "on");
    let agent = Agent::start(&["run", "--source", "ebpf", "--kernel-events"]);
    let marker = unique("npd-flood");
    flood(&marker, FLOOD);
    let end = format!("{marker}-end");
    // Everything before an end marker has been read or counted once it arrives.
    let (lines, end_written) = read_until_end_marker(&agent, &end);
    let stopped = agent.stop();
    assert!(stopped.status.success());
    // End markers that neither arrived before nor after the stop were dropped too.
    let end_received = lines
        .iter()
        .chain(&stopped.lines)
        .filter(|v| v["message"] == end.as_str())
        .count() as u64;
    let stats = stopped
        .lines
        .iter()
        .find(|v| v["kind"] == "stats")
        .expect("stats line at exit");
    let received = marker_lines(&lines, &marker)
        .filter(|v| v["message"] != end.as_str())
        .count() as u64;
    let dropped = stats["ring_full"]["log"].as_u64().unwrap()
        + stats["read_errors"]["log"].as_u64().unwrap()
        - (end_written - end_received);
    eprintln!("flood (eBPF): sent {FLOOD}, received {received}, dropped {dropped}");
    assert_eq!(
        received + dropped,
        FLOOD as u64,
        "received + dropped must equal sent"
    );
    // Each line arrives once and in order.
    let mut next = 0u64;
    for v in marker_lines(&lines, &marker).filter(|v| v["message"] != end.as_str()) {
        let i: u64 = v["message"]
            .as_str()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(i >= next, "line {i} after {next}: out of order or repeated");
        next = i + 1;
    }
}

#[test]
fn flood_of_100k_messages_is_received_or_counted_kmsg_source() {
    let Some(_serial) = kernel_test("flood_of_100k_messages_is_received_or_counted_kmsg_source")
    else {
        return;
    };
    let _devkmsg = Sysctl::set("kernel/printk_devkmsg", "on");
    let agent = Agent::start(&["run", "--source", "kmsg", "--kernel-events"]);
    let marker = unique("npd-flood");
    let start = format!("{marker}-start");
    write_kmsg(&start);
    let start_seq = agent.wait_for(WAIT, "start marker", |v| v["message"] == start.as_str())["seq"]
        .as_u64()
        .expect("seq");
    flood(&marker, FLOOD);
    let end = format!("{marker}-end");
    write_kmsg(&end);
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let end_seq = loop {
        if let Some(v) = lines.iter().find(|v: &&Value| v["message"] == end.as_str()) {
            break v["seq"].as_u64().expect("seq");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "end marker not received"
        );
        lines.extend(agent.lines_for(Duration::from_millis(200)));
    };
    let stopped = agent.stop();
    assert!(stopped.status.success());
    let stats = stopped
        .lines
        .iter()
        .find(|v| v["kind"] == "stats")
        .expect("stats line at exit");
    let lost = stats["kmsg_lost"].as_u64().unwrap();
    // Every record the kernel logged between the markers was either read or counted as lost.
    let between = lines
        .iter()
        .filter(|v| {
            is_kernel_event(v, "log")
                && v["seq"]
                    .as_u64()
                    .is_some_and(|s| s > start_seq && s < end_seq)
        })
        .count() as u64;
    let logged = end_seq - start_seq - 1;
    let ours = marker_lines(&lines, &marker)
        .filter(|v| v["message"] != end.as_str())
        .count();
    eprintln!(
        "flood (/dev/kmsg): sent {FLOOD}, kernel logged {logged} between markers, received {between} (ours {ours}), counted lost {lost}"
    );
    assert!(logged >= FLOOD as u64);
    assert_eq!(
        between + lost,
        logged,
        "received + counted lost must equal what the kernel logged"
    );
}

#[test]
fn without_root_it_exits_non_zero_naming_what_is_missing() {
    let Some(_serial) = kernel_test("without_root_it_exits_non_zero_naming_what_is_missing") else {
        return;
    };
    for source in ["auto", "ebpf"] {
        let out = Command::new(agent_binary())
            .args(["run", "--source", source])
            .uid(65534)
            .gid(65534)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .expect("running npd-agent as nobody");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "--source {source} as nobody should fail:\n{stderr}"
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "exit code (not a panic):\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains("root")
                && (stderr.contains("CAP_BPF") || stderr.contains("CAP_SYS_ADMIN")),
            "--source {source}: {stderr}"
        );
    }
}
