//! NPD's custom plugin monitor against real plugin processes (shell scripts run as argv), the
//! real agent and the real kube-apiserver: NPD's semantics for every exit, timeouts that hold
//! against a plugin that ignores SIGTERM or has a child in uninterruptible sleep, bounded
//! output, the concurrency limit, and clear errors for bad configs.
//!
//! Needs root (the agent's eBPF sensor; the D-state test freezes a loop-mounted file system).
//! Tests run one at a time; every file, mount and process is behind a guard.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use npd_tests::{
    agent::{Agent, agent_binary},
    apiserver::{ApiServer, repo_root},
    have_root,
    http::{self, free_port, sample},
    kernel::{Frozen, LoopDevice, Mount, TempDir, run, sized_file, write_kmsg},
    kernel_test,
    node::{TestNode, block_on},
    procstat, serial, unique,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// Writes an executable script.
fn script(path: &Path, body: &str) -> PathBuf {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("writing a plugin script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .expect("making a plugin script executable");
    path.to_owned()
}

/// Writes a monitor file and returns its path.
fn monitor(path: &Path, value: &Value) -> String {
    std::fs::write(path, serde_json::to_vec_pretty(value).unwrap()).expect("writing a monitor");
    path.to_string_lossy().into_owned()
}

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
        let mut args = vec!["run", "--port", &hp, "--prometheus-port", &mp];
        args.extend_from_slice(extra);
        let agent = Agent::start(&args);
        let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        Npd {
            agent,
            health: local(health_port),
            metrics: local(metrics_port),
        }
    }

    fn metrics(&self) -> String {
        http::get(self.metrics, "/metrics")
            .unwrap_or_else(|e| panic!("GET /metrics: {e}\n{}", self.agent.stderr()))
            .body
    }

    fn metric(&self, series: &str) -> f64 {
        sample(&self.metrics(), series).unwrap_or(0.0)
    }

    /// The condition `type_` as `/conditions` lists it.
    fn condition(&self, type_: &str) -> Option<Value> {
        let body = http::get(self.health, "/conditions").ok()?.body;
        let all: Value = serde_json::from_str(&body).ok()?;
        all.as_array()?.iter().find(|c| c["type"] == type_).cloned()
    }

    /// Polls `check` every 50 ms until it holds; panics after [`WAIT`] with `what`.
    fn until(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !check() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nmetrics:\n{}\nagent stderr:\n{}",
                self.metrics()
                    .lines()
                    .filter(|l| l.starts_with("npd_plugin"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                self.agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the condition report (stdout) of `type_` with `status`.
    fn wait_condition(&self, type_: &str, status: &str) -> Value {
        self.agent
            .wait_for(WAIT, &format!("{type_}={status}"), |v| {
                v["kind"] == "condition" && v["type"] == type_ && v["status"] == status
            })
    }
}

/// Lines of a file (empty when it does not exist yet).
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Whether process `pid` is gone (not even a zombie).
fn gone(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// NPD's documented kind of plugin: an `UpFile` condition kept by a script that checks that a
/// file exists, with a temporary and a permanent rule, given with NPD's own flag. Creating and
/// removing the file moves the condition False, True, False on the Node, with NPD's Events.
#[test]
fn an_npd_plugin_config_runs_unchanged_against_the_api_server() {
    const TEST: &str = "an_npd_plugin_config_runs_unchanged_against_the_api_server";
    let _serial = serial();
    if !have_root(TEST) {
        return;
    }
    let Some(server) = ApiServer::shared(TEST) else {
        return;
    };
    let dir = TempDir::new("npd-plugin-upfile");
    let up = dir.join("up");
    std::fs::write(&up, "").unwrap();
    let check = script(
        &dir.join("check_up.sh"),
        r#"if [ -f "$1" ]; then echo "up file $1 exists"; exit 0; fi
echo "no up file at $1"
exit 1"#,
    );
    let up_arg = up.to_string_lossy().into_owned();
    let config = monitor(
        &dir.join("upfile-monitor.json"),
        &serde_json::json!({
            "plugin": "custom",
            "pluginConfig": {
                "invoke_interval": "1s",
                "timeout": "5s",
                "max_output_length": 80,
                "concurrency": 3,
                "enable_message_change_based_condition_update": false
            },
            "source": "upfile-custom-plugin-monitor",
            "metricsReporting": true,
            "conditions": [
                {"type": "UpFile", "reason": "UpFileExists", "message": "the up file exists"}
            ],
            "rules": [
                {"type": "temporary", "reason": "UpFileMissing", "path": check, "args": [up_arg], "timeout": "3s"},
                {"type": "permanent", "condition": "UpFile", "reason": "UpFileMissing", "path": check, "args": [up_arg], "timeout": "3s"}
            ]
        }),
    );
    block_on(async {
        let name = unique("npd-plugin-node");
        let node = TestNode::new(server, &name).await;
        let flag = format!("--config.custom-plugin-monitor={config}");
        let agent = node.start_agent_with(false, &[&flag]).await;
        let source = "upfile-custom-plugin-monitor";
        // The default state is written first.
        let c = node.wait_condition("UpFile", "False", "UpFileExists").await;
        assert_eq!(c.message.as_deref(), Some("the up file exists"));
        // No up file: True with the plugin's output; the temporary rule posts a Warning.
        std::fs::remove_file(&up).unwrap();
        let missing = format!("no up file at {up_arg}");
        let c = node.wait_condition("UpFile", "True", "UpFileMissing").await;
        assert_eq!(c.message.as_deref(), Some(missing.as_str()));
        let changed = format!(
            "Node condition UpFile is now: True, reason: UpFileMissing, message: \"{missing}\""
        );
        let event = node
            .wait_event_from(source, "UpFileMissing", "the condition change", |m| {
                m == changed
            })
            .await;
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        // Same source, type and reason as the condition change: folded into its Event, as
        // Kubernetes' correlator folds similar Events.
        let event = node
            .wait_event_from(source, "UpFileMissing", "the temporary rule", |m| {
                m == missing || m == format!("(combined from similar events): {missing}")
            })
            .await;
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        // The file is back: False with the default reason and message, a Normal Event.
        std::fs::write(&up, "").unwrap();
        let c = node.wait_condition("UpFile", "False", "UpFileExists").await;
        assert_eq!(c.message.as_deref(), Some("the up file exists"));
        let recovered = "Node condition UpFile is now: False, reason: UpFileExists, message: \"the up file exists\"";
        let event = node
            .wait_event_from(source, "UpFileExists", "the recovery", |m| m == recovered)
            .await;
        assert_eq!(event.type_.as_deref(), Some("Normal"));
        let stopped = agent.stop();
        assert!(stopped.status.success(), "{}", stopped.stderr);
    });
}

/// Exit 0, 1 and 2 and a timeout each give NPD's result: False (unchanged), True with the
/// output, Unknown with the output, Unknown saying it timed out; a temporary rule's exit 1 is
/// a Warning Event. `/conditions` and the metrics show them like the others.
#[test]
fn exit_codes_and_a_timeout_give_npds_plugin_results() {
    const TEST: &str = "exit_codes_and_a_timeout_give_npds_plugin_results";
    let _serial = serial();
    if !have_root(TEST) {
        return;
    }
    let dir = TempDir::new("npd-plugin-exits");
    let rule = |name: &str, body: &str, condition: &str, reason: &str| {
        let path = script(&dir.join(&format!("{name}.sh")), body);
        serde_json::json!({"type": "permanent", "condition": condition, "reason": reason, "path": path})
    };
    let cond = |type_: &str| serde_json::json!({"type": type_, "reason": format!("{type_}Fine"), "message": "all fine"});
    let config = monitor(
        &dir.join("exits.json"),
        &serde_json::json!({
            "plugin": "custom",
            "pluginConfig": {"invoke_interval": "1s", "timeout": "1s", "max_output_length": 80},
            "source": "exit-codes",
            "conditions": [cond("ExitZero"), cond("ExitOne"), cond("ExitTwo"), cond("Slow")],
            "rules": [
                rule("zero", "echo fine; exit 0", "ExitZero", "ZeroFailed"),
                rule("one", "echo the check failed; exit 1", "ExitOne", "OneFailed"),
                rule("two", "echo cannot tell; exit 2", "ExitTwo", "TwoFailed"),
                rule("slow", "exec sleep 30", "Slow", "SlowFailed"),
                {"type": "temporary", "reason": "TempFailed",
                 "path": script(&dir.join("temp.sh"), "echo temporary trouble; exit 1")}
            ]
        }),
    );
    let npd = Npd::start(&["--config", &config]);
    let one = npd.wait_condition("ExitOne", "True");
    assert_eq!(one["reason"], "OneFailed");
    assert_eq!(one["message"], "the check failed");
    assert_eq!(one["source"], "exit-codes");
    let two = npd.wait_condition("ExitTwo", "Unknown");
    assert_eq!(two["reason"], "ExitTwoFine");
    assert_eq!(two["message"], "cannot tell");
    let slow = npd.wait_condition("Slow", "Unknown");
    assert_eq!(slow["reason"], "SlowFine");
    assert_eq!(slow["message"], "timed out after 1s");
    let temp = npd.agent.wait_for(WAIT, "the temporary rule's Event", |v| {
        v["kind"] == "event" && v["reason"] == "TempFailed"
    });
    assert_eq!(temp["message"], "temporary trouble");
    // Exit 0 ran and left its condition False with its default reason.
    npd.until("an ok run", || {
        npd.metric(r#"npd_plugin_runs_total{reason="ZeroFailed",result="ok",source="exit-codes"}"#)
            >= 1.0
    });
    let zero = npd.condition("ExitZero").expect("ExitZero in /conditions");
    assert_eq!(
        (&zero["status"], &zero["reason"]),
        (&"False".into(), &"ExitZeroFine".into())
    );
    let one = npd.condition("ExitOne").expect("ExitOne in /conditions");
    assert_eq!(one["status"], "True");
    for (reason, result) in [
        ("OneFailed", "nonok"),
        ("TwoFailed", "unknown"),
        ("SlowFailed", "timeout"),
    ] {
        let series = format!(
            r#"npd_plugin_runs_total{{reason="{reason}",result="{result}",source="exit-codes"}}"#
        );
        assert!(npd.metric(&series) >= 1.0, "{series}");
    }
    let metrics = npd.metrics();
    assert!(
        sample(
            &metrics,
            r#"npd_plugin_run_duration_seconds_count{source="exit-codes"}"#
        )
        .is_some_and(|n| n >= 4.0),
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            r#"problem_gauge{reason="OneFailed",type="ExitOne"}"#
        ) == Some(1.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, r#"problem_counter{reason="TempFailed"}"#).is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    let stopped = npd.agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
}

/// A plugin that traps and ignores SIGTERM, with a child that ignores it too, is killed with
/// its whole process group after the grace period: both processes are gone.
#[test]
fn a_plugin_ignoring_sigterm_is_killed_with_its_children() {
    const TEST: &str = "a_plugin_ignoring_sigterm_is_killed_with_its_children";
    let _serial = serial();
    if !have_root(TEST) {
        return;
    }
    let dir = TempDir::new("npd-plugin-sigterm");
    let pids = dir.join("pids");
    let stubborn = script(
        &dir.join("stubborn.sh"),
        &format!(
            r#"trap '' TERM
sleep 1000 &
echo "$$ $!" >> {}
while :; do sleep 1; done"#,
            pids.display()
        ),
    );
    let config = monitor(
        &dir.join("stubborn.json"),
        &serde_json::json!({
            "plugin": "custom",
            "pluginConfig": {"invoke_interval": "1h", "timeout": "1s"},
            "source": "stubborn",
            "conditions": [{"type": "Stubborn", "reason": "Fine", "message": "fine"}],
            "rules": [{"type": "permanent", "condition": "Stubborn", "reason": "Stuck", "path": stubborn}]
        }),
    );
    let npd = Npd::start(&["--config", &config]);
    let c = npd.wait_condition("Stubborn", "Unknown");
    assert_eq!(c["message"], "timed out after 1s");
    let first = lines(&pids);
    let run: Vec<i32> = first
        .first()
        .expect("the plugin wrote its pids")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(run.len(), 2, "{first:?}");
    // The result is reported once the group is gone (or counted stuck): they are gone now.
    for pid in &run {
        assert!(
            gone(*pid),
            "process {pid} of the killed plugin is still there"
        );
    }
    assert_eq!(
        npd.metric(r#"npd_plugin_stuck{reason="Stuck",source="stubborn"}"#),
        0.0
    );
    let stopped = npd.agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
}

/// A plugin whose child blocks in D state (writing to a frozen file system) reports Unknown and
/// is counted stuck; its rule is not started again while the child lives, while the other
/// rules of its monitor, another monitor and the kernel path go on (shown by their invocation
/// counts and a kernel line's Event). After the thaw the child goes and the rule runs again.
#[test]
fn a_plugin_with_a_child_in_d_state_does_not_stall_anything() {
    const TEST: &str = "a_plugin_with_a_child_in_d_state_does_not_stall_anything";
    let Some(_serial) = kernel_test(TEST) else {
        return;
    };
    let dir = TempDir::new("npd-plugin-dstate");
    let image = dir.join("fs.img");
    sized_file(&image, 32);
    run("mkfs.ext4", &["-q", "-F", &image.to_string_lossy()]);
    let dev = LoopDevice::attach(&image);
    let mount = Mount::new(&dev.path, &dir.join("mnt"));
    let frozen = Frozen::new(&mount.0);
    let counts = dir.join("counts");
    std::fs::create_dir(&counts).unwrap();
    let count = |name: &str| counts.join(name);
    let blocked = script(
        &dir.join("blocked.sh"),
        &format!(
            "echo run >> {}\nsh -c 'echo x > {}/file'\necho done",
            count("blocked").display(),
            mount.0.display()
        ),
    );
    let healthy = |name: &str| {
        script(
            &dir.join(&format!("{name}.sh")),
            &format!("echo run >> {}\nexit 0", count(name).display()),
        )
    };
    let first = monitor(
        &dir.join("first.json"),
        &serde_json::json!({
            "plugin": "custom",
            "pluginConfig": {"invoke_interval": "1s", "timeout": "1s", "concurrency": 2},
            "source": "first",
            "conditions": [{"type": "Blocked", "reason": "Fine", "message": "fine"}],
            "rules": [
                {"type": "permanent", "condition": "Blocked", "reason": "Stuck", "path": blocked},
                {"type": "temporary", "reason": "A", "path": healthy("a")},
                {"type": "temporary", "reason": "B", "path": healthy("b")}
            ]
        }),
    );
    let second = monitor(
        &dir.join("second.json"),
        &serde_json::json!({
            "plugin": "custom",
            "pluginConfig": {"invoke_interval": "1s", "timeout": "1s"},
            "source": "second",
            "conditions": [],
            "rules": [{"type": "temporary", "reason": "C", "path": healthy("c")}]
        }),
    );
    let kernel_rules = repo_root().join("config/kernel-monitor.json");
    let npd = Npd::start(&[
        "--config",
        &first,
        "--config",
        &second,
        "--config",
        &kernel_rules.to_string_lossy(),
    ]);
    let c = npd.wait_condition("Blocked", "Unknown");
    let message = c["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("timed out after 1s; a process of it is still running after SIGKILL"),
        "{c}"
    );
    npd.until("the stuck gauge", || {
        npd.metric(r#"npd_plugin_stuck{reason="Stuck",source="first"}"#) == 1.0
    });
    // While it is stuck, the other rules and monitors keep running...
    let ran = |name: &str| lines(&count(name)).len();
    let (a0, b0, c0) = (ran("a"), ran("b"), ran("c"));
    npd.until("three more runs of every other rule", || {
        ran("a") >= a0 + 3 && ran("b") >= b0 + 3 && ran("c") >= c0 + 3
    });
    // ...the kernel path too...
    let marker = unique("npd-dstate-oops");
    write_kmsg(&format!(
        "BUG: unable to handle kernel NULL pointer dereference at {marker}"
    ));
    npd.agent.wait_for(WAIT, "the kernel line's Event", |v| {
        v["reason"] == "KernelOops" && v["message"].as_str().is_some_and(|m| m.contains(&marker))
    });
    // ...and the stuck rule was not started again.
    assert_eq!(ran("blocked"), 1, "the stuck rule was started again");
    // Thawed, the child finishes, the gauge returns to 0 and the rule runs again.
    drop(frozen);
    npd.until("the stuck run to be gone", || {
        npd.metric(r#"npd_plugin_stuck{reason="Stuck",source="first"}"#) == 0.0
    });
    npd.until("the rule to run again", || ran("blocked") >= 2);
    let stopped = npd.agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    drop(mount);
    drop(dev);
}

/// A plugin printing 100 MB on stdout and on stderr leaves the agent's peak RSS where it was;
/// its message is cut to `max_output_length`.
#[test]
fn a_plugin_printing_100_mb_leaves_the_agent_rss_bounded() {
    const TEST: &str = "a_plugin_printing_100_mb_leaves_the_agent_rss_bounded";
    let _serial = serial();
    if !have_root(TEST) {
        return;
    }
    let dir = TempDir::new("npd-plugin-flood");
    let flood = script(
        &dir.join("flood.sh"),
        "head -c 104857600 /dev/zero | tr '\\0' x\nhead -c 104857600 /dev/zero | tr '\\0' y >&2\nexit 1",
    );
    let config = monitor(
        &dir.join("flood.json"),
        &serde_json::json!({
            "plugin": "custom",
            "pluginConfig": {"invoke_interval": "1h", "timeout": "60s", "max_output_length": 80},
            "source": "flood",
            "conditions": [{"type": "Flood", "reason": "Quiet", "message": "quiet"}],
            "rules": [{"type": "permanent", "condition": "Flood", "reason": "Flooded", "path": flood}]
        }),
    );
    let npd = Npd::start(&["--config", &config]);
    let before = procstat::status_kib(npd.agent.pid(), "VmHWM");
    let c = npd.wait_condition("Flood", "True");
    let after = procstat::status_kib(npd.agent.pid(), "VmHWM");
    assert_eq!(c["message"].as_str().unwrap(), "x".repeat(80));
    eprintln!(
        "agent peak RSS before the 200 MB of output: {} KiB, after: {} KiB",
        before, after
    );
    assert!(
        after <= before + 8 * 1024,
        "peak RSS grew from {before} KiB to {after} KiB reading 200 MB of plugin output"
    );
    let stopped = npd.agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
}

/// Six rules of 300 ms each, every second, with `concurrency` 2: each run's start and end
/// recorded by the plugins themselves never overlap more than two at a time.
#[test]
fn the_plugin_concurrency_limit_holds() {
    const TEST: &str = "the_plugin_concurrency_limit_holds";
    let _serial = serial();
    if !have_root(TEST) {
        return;
    }
    let dir = TempDir::new("npd-plugin-concurrency");
    let log = dir.join("log");
    let rules: Vec<Value> = (0..6)
        .map(|i| {
            let path = script(
                &dir.join(&format!("r{i}.sh")),
                &format!(
                    "echo \"start $(date +%s%N) {i}\" >> {log}\nsleep 0.3\necho \"end $(date +%s%N) {i}\" >> {log}",
                    log = log.display()
                ),
            );
            serde_json::json!({"type": "temporary", "reason": format!("R{i}"), "path": path})
        })
        .collect();
    let config = monitor(
        &dir.join("concurrency.json"),
        &serde_json::json!({
            "plugin": "custom",
            "pluginConfig": {"invoke_interval": "1s", "timeout": "5s", "concurrency": 2},
            "source": "concurrency",
            "conditions": [],
            "rules": rules
        }),
    );
    let npd = Npd::start(&["--config", &config]);
    let ends = || lines(&log).iter().filter(|l| l.starts_with("end ")).count();
    npd.until("30 finished runs", || ends() >= 30);
    let stopped = npd.agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    // Replay the log in time order: +1 at a start, -1 at an end.
    let mut events: Vec<(u128, i32)> = lines(&log)
        .iter()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let delta = match f.next()? {
                "start" => 1,
                "end" => -1,
                _ => return None,
            };
            Some((f.next()?.parse().ok()?, delta))
        })
        .collect();
    // Ends before starts at the same instant (a run that ended frees its slot).
    events.sort();
    let (mut running, mut most) = (0, 0);
    for (_, delta) in &events {
        running += delta;
        most = most.max(running);
    }
    assert_eq!(
        most, 2,
        "at most 2 runs at once (and the limit is used): {events:?}"
    );
}

/// Bad plugin configs: `check-config` names file, JSON path and reason and exits 2, for an
/// unknown field, a bad duration, a missing plugin path, a rule naming an undeclared condition
/// and a truncated file.
#[test]
fn bad_plugin_configs_give_clear_errors() {
    let dir = TempDir::new("npd-plugin-bad");
    let good = serde_json::json!({
        "plugin": "custom",
        "pluginConfig": {"invoke_interval": "30s", "timeout": "5s"},
        "source": "bad",
        "conditions": [{"type": "Bad", "reason": "Fine", "message": "fine"}],
        "rules": [{"type": "permanent", "condition": "Bad", "reason": "Broken", "path": "/bin/true"}]
    });
    let variant = |edit: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        edit(&mut v);
        serde_json::to_string_pretty(&v).unwrap()
    };
    let truncated = {
        let text = serde_json::to_string_pretty(&good).unwrap();
        text[..text.len() - 20].to_owned()
    };
    let cases: BTreeMap<&str, (String, &str, &str)> = [
        (
            "unknown-field",
            (
                variant(&|v| v["pluginConfig"]["invoke_intervall"] = "1s".into()),
                "$",
                "unknown field `invoke_intervall`",
            ),
        ),
        (
            "bad-duration",
            (
                variant(&|v| v["pluginConfig"]["timeout"] = "5 parsecs".into()),
                "$.pluginConfig.timeout",
                "5 parsecs",
            ),
        ),
        (
            "missing-path",
            (
                variant(&|v| v["rules"][0]["path"] = "/nonexistent/check_ntp.sh".into()),
                "$.rules[0].path",
                "/nonexistent/check_ntp.sh",
            ),
        ),
        (
            "undeclared-condition",
            (
                variant(&|v| v["rules"][0]["condition"] = "Bda".into()),
                "$.rules[0].condition",
                "\"Bda\" is not declared",
            ),
        ),
        ("truncated", (truncated, "$", "invalid JSON at line")),
    ]
    .into_iter()
    .collect();
    for (name, (text, path, reason)) in &cases {
        let file = dir.join(&format!("{name}.json"));
        std::fs::write(&file, text).unwrap();
        let out = Command::new(agent_binary())
            .arg("check-config")
            .arg(&file)
            .output()
            .expect("running check-config");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        let expected = format!("{}: {path}: ", file.display());
        let line = stderr
            .lines()
            .find(|l| l.contains(&expected))
            .unwrap_or_else(|| panic!("{name}: no line naming {expected:?} in:\n{stderr}"));
        assert!(line.contains(reason), "{name}: {reason:?} not in {line:?}");
    }
}
