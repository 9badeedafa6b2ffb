//! The rules and conditions on the real kernel: the agent in standalone mode (problems as JSON
//! lines on stdout) sees NPD's documented `/dev/kmsg` examples and real faults, and reports each
//! real fault exactly once, although the kernel also prints text about it that the log rules
//! match, and the hung-task tracepoint fires again at every check while the task stays stuck.

use std::{path::Path, process::Command, time::Duration};

use npd_tests::{
    agent::{Agent, agent_binary},
    faults::{HungWriter, failed_read, oom_kill},
    have_memory_cgroup, have_root,
    kernel::write_kmsg,
    kernel_test, serial,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
/// How long to keep listening for duplicates after a fault was reported.
const SETTLE: Duration = Duration::from_secs(6);

fn hog() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_npd-test-hog"))
}

/// The agent in standalone mode (no cluster, whatever the environment says).
fn standalone_agent() -> Agent {
    Agent::start_with(
        Command::new(agent_binary())
            .args(["run", "--source", "ebpf", "--enable-k8s-exporter=false"])
            .env_remove("KUBECONFIG"),
    )
}

fn is_event(v: &Value, reason: &str) -> bool {
    v["kind"] == "event" && v["reason"] == reason
}

/// Waits for the first `reason` event matching `pred`, then counts every further one for
/// [`SETTLE`]; returns the first and how many there were in all.
fn first_and_count(agent: &Agent, reason: &str, pred: impl Fn(&Value) -> bool) -> (Value, usize) {
    let first = agent.wait_for(WAIT, reason, |v| is_event(v, reason) && pred(v));
    let more = agent
        .lines_for(SETTLE)
        .iter()
        .filter(|v| is_event(v, reason) && pred(v))
        .count();
    (first, 1 + more)
}

#[test]
fn npd_readme_examples_through_real_kmsg() {
    let Some(_serial) = kernel_test("npd_readme_examples_through_real_kmsg") else {
        return;
    };
    let agent = standalone_agent();
    // NPD's README: `sudo sh -c "echo 'kernel: BUG: unable to handle kernel NULL pointer
    // dereference at TESTING' >> /dev/kmsg"` gives KernelOops; the DockerHung line gives
    // TaskHung plus KernelDeadlock=True.
    write_kmsg("kernel: BUG: unable to handle kernel NULL pointer dereference at TESTING");
    let oops = agent.wait_for(WAIT, "KernelOops", |v| is_event(v, "KernelOops"));
    assert!(
        oops["message"]
            .as_str()
            .unwrap()
            .contains("NULL pointer dereference at TESTING"),
        "{oops}"
    );
    assert_eq!(oops["source"], "kernel-monitor");

    write_kmsg("INFO: task docker:20744 blocked for more than 120 seconds.");
    let hung = agent.wait_for(WAIT, "TaskHung", |v| is_event(v, "TaskHung"));
    assert_eq!(
        hung["message"],
        "INFO: task docker:20744 blocked for more than 120 seconds."
    );
    let condition = agent.wait_for(WAIT, "KernelDeadlock", |v| {
        v["kind"] == "condition" && v["type"] == "KernelDeadlock"
    });
    assert_eq!(condition["status"], "True");
    assert_eq!(condition["reason"], "DockerHung");
    assert!(agent.stop().status.success());
}

#[test]
fn current_kernel_wording_is_caught() {
    let Some(_serial) = kernel_test("current_kernel_wording_is_caught") else {
        return;
    };
    let agent = standalone_agent();
    // What 6.x kernels print for a NULL dereference (NPD's pattern is the pre-4.x wording).
    write_kmsg("BUG: kernel NULL pointer dereference, address: 0000000000000000");
    let oops = agent.wait_for(WAIT, "KernelOops", |v| is_event(v, "KernelOops"));
    assert!(
        oops["message"]
            .as_str()
            .unwrap()
            .contains("kernel NULL pointer dereference"),
        "{oops}"
    );
    assert!(agent.stop().status.success());
}

#[test]
fn real_oom_kill_is_one_problem() {
    let _serial = serial();
    if !have_root("real_oom_kill_is_one_problem")
        || !have_memory_cgroup("real_oom_kill_is_one_problem")
    {
        return;
    }
    let agent = standalone_agent();
    let pid = oom_kill(hog());
    let (event, count) = first_and_count(&agent, "OOMKilling", |_| true);
    assert_eq!(count, 1, "one OOM kill, one problem");
    assert_eq!(event["pid"], pid, "{event}");
    assert_eq!(event["comm"], "npd-test-hog", "{event}");
    let message = event["message"].as_str().unwrap();
    assert!(
        message.contains(&pid.to_string()) && message.contains("npd-test-hog"),
        "{message}"
    );
    assert!(agent.stop().status.success());
}

fn real_hung_task_is_one_problem(warnings: &str) {
    let agent = standalone_agent();
    let writer = HungWriter::start(hog(), warnings);
    let pid = writer.pid();
    // The detector checks every 2 s: within SETTLE the tracepoint fires again, and (with
    // warnings left) the kernel prints its "blocked for more than" text too.
    let (event, count) = first_and_count(&agent, "TaskHung", |v| v["pid"] == pid);
    assert_eq!(count, 1, "one stuck task, one problem");
    assert_eq!(event["comm"], "npd-test-hog", "{event}");
    writer.finish();
    assert!(agent.stop().status.success());
}

#[test]
fn real_hung_task_is_one_problem_with_kernel_text() {
    let Some(_serial) = kernel_test("real_hung_task_is_one_problem_with_kernel_text") else {
        return;
    };
    real_hung_task_is_one_problem("10");
}

#[test]
fn real_hung_task_is_reported_when_the_kernel_prints_nothing() {
    let Some(_serial) = kernel_test("real_hung_task_is_reported_when_the_kernel_prints_nothing")
    else {
        return;
    };
    real_hung_task_is_one_problem("0");
}

#[test]
fn real_block_error_is_one_problem_naming_the_device() {
    let Some(_serial) = kernel_test("real_block_error_is_one_problem_naming_the_device") else {
        return;
    };
    let agent = standalone_agent();
    let failed = failed_read();
    let name = failed.dev.name().to_string();
    let (event, count) = first_and_count(&agent, "IOError", |v| {
        v["device"] == name.as_str() || v["message"].as_str().is_some_and(|m| m.contains(&name))
    });
    assert_eq!(count, 1, "one failed request, one problem");
    assert!(
        event["message"].as_str().unwrap().contains(&name),
        "{event}"
    );
    assert!(agent.stop().status.success());
}
