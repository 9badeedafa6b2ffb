//! Behaviour tests of the rules, the engine and `replay`: NPD's documented examples, its
//! problem generator texts, current kernels' wording, structured events with the kernel's
//! accompanying lines (one fault, one problem), recovery, rates, and bad input.

use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::{
    commands::replay::replay,
    engine::Engine,
    event::{BlockError, BlockOp, Detail, KernelEvent, LogMessage, OomKill, fixtures},
    problem::{ConditionStatus, Report, condition_change_message},
    rules::RuleSet,
    time::Mono,
};

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn log(text: &str) -> Detail {
    Detail::Log(LogMessage::new(text))
}

/// `time` on the kernel's clock (boot at the epoch, as `replay` has it).
fn mono(time: SystemTime) -> Mono {
    Mono::since_boot(time.duration_since(SystemTime::UNIX_EPOCH).unwrap())
}

/// `detail` seen at `time`.
fn at(time: SystemTime, detail: &Detail) -> KernelEvent {
    KernelEvent::new(mono(time), detail.clone())
}

/// Replays text through the embedded defaults (or the given rule files) and returns the JSON
/// lines without `transition_time`.
fn replay_lines(rules: RuleSet, input: &str) -> Vec<Value> {
    let mut out = Vec::new();
    replay(rules, input.as_bytes(), &mut out).unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("transition_time");
            v
        })
        .collect()
}

fn defaults(input: &str) -> Vec<Value> {
    replay_lines(RuleSet::defaults(), input)
}

fn event(reason: &str, message: &str) -> Value {
    json!({"kind":"event","source":"kernel-monitor","reason":reason,"message":message})
}

fn rules(json: &str) -> RuleSet {
    RuleSet::from_sources([("test.json", json.as_bytes())]).unwrap()
}

#[test]
fn npd_readme_kernel_oops() {
    let line = "kernel: BUG: unable to handle kernel NULL pointer dereference at TESTING";
    assert_eq!(defaults(line), vec![event("KernelOops", line)]);
}

#[test]
fn npd_readme_docker_hung() {
    let line = "kernel: INFO: task docker:20744 blocked for more than 120 seconds.";
    assert_eq!(
        defaults(line),
        vec![
            event("TaskHung", line),
            json!({"kind":"condition","source":"kernel-monitor","type":"KernelDeadlock","status":"True",
                "reason":"DockerHung","message":line}),
        ]
    );
}

#[test]
fn npd_docker_hung_condition_change_message() {
    let mut engine = Engine::new(RuleSet::defaults());
    let line = "INFO: task docker:20744 blocked for more than 120 seconds.";
    let reports = engine.handle(&at(t(1), &log(line)));
    let Some(Report::Condition(change)) = reports.last() else {
        panic!("{reports:?}")
    };
    assert_eq!(
        condition_change_message(&change.condition),
        format!(
            "Node condition KernelDeadlock is now: True, reason: DockerHung, message: \"{line}\""
        )
    );
}

#[test]
fn npd_problem_maker_oom_kill() {
    let input = "Memory cgroup out of memory: Kill process 1012 (heapster) score 1035 or sacrifice child\n\
                 Killed process 1012 (heapster) total-vm:327128kB, anon-rss:306328kB, file-rss:11132kB, shmem-rss:12345kB\n";
    assert_eq!(
        defaults(input),
        vec![event(
            "OOMKilling",
            "Killed process 1012 (heapster) total-vm:327128kB, anon-rss:306328kB, file-rss:11132kB, shmem-rss:12345kB"
        )]
    );
}

#[test]
fn npd_problem_maker_docker_hung() {
    let input = r#"INFO: task docker:20744 blocked for more than 120 seconds.
      Tainted: G         C    3.16.0-4-amd64 #1
"echo 0 > /proc/sys/kernel/hung_task_timeout_secs" disables this message.
docker          D ffff8801a8f2b078     0 20744      1 0x00000000
 ffff8801a8f2ac20 0000000000000082 0000000000012f00 ffff880057a17fd8
Call Trace:
 [<ffffffff81510915>] ? schedule_preempt_disabled+0x25/0x70
 [<ffffffff81513d0d>] ? system_call_fast_compare_end+0x10/0x15"#;
    let out = defaults(input);
    let reasons: Vec<&str> = out.iter().map(|v| v["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["TaskHung", "DockerHung"]);
    assert_eq!(out[1]["type"], "KernelDeadlock");
}

#[test]
fn npd_problem_maker_ext4_error() {
    let line = "EXT4-fs error (device sda1): trigger_test_error:1043: comm problem-maker: fake filesystem error from problem-maker";
    assert_eq!(defaults(line), vec![event("Ext4Error", line)]);
}

#[test]
fn npd_default_conditions() {
    let cases = [
        (
            "EXT4-fs (sda1): Remounting filesystem read-only",
            "readonly-monitor",
            "ReadonlyFilesystem",
            "FilesystemIsReadOnly",
        ),
        (
            "XFS (dm-0): Corruption of in-memory data detected.  Shutting down filesystem",
            "kernel-monitor",
            "XfsShutdown",
            "XfsHasShutdown",
        ),
        (
            "{1}[Hardware Error]: event severity: fatal",
            "kernel-monitor",
            "CperHardwareErrorFatal",
            "CperHardwareErrorFatal",
        ),
        (
            "mce: [Hardware Error]: event severity: fatal",
            "kernel-monitor",
            "CperHardwareErrorFatal",
            "CperHardwareErrorFatal",
        ),
    ];
    for (line, source, type_, reason) in cases {
        assert_eq!(
            defaults(line),
            vec![
                json!({"kind":"condition","source":source,"type":type_,"status":"True","reason":reason,"message":line})
            ],
            "{line}"
        );
    }
    let line = "{37}[Hardware Error]: event severity: corrected";
    assert_eq!(
        defaults(line),
        vec![event("CperHardwareErrorCorrected", line)]
    );
    let line = "{3}[Hardware Error]: event severity: recoverable";
    assert_eq!(
        defaults(line),
        vec![event("CperHardwareErrorRecoverable", line)]
    );
}

#[test]
fn current_kernel_wording() {
    for (line, reason) in [
        (
            "BUG: kernel NULL pointer dereference, address: 0000000000000000",
            "KernelOops",
        ),
        (
            "BUG: kernel NULL pointer dereference, address: 0000002c",
            "KernelOops",
        ),
        (
            "Unable to handle kernel NULL pointer dereference at virtual address 0000000000000000",
            "KernelOops",
        ),
        (
            "Oops: divide error: 0000 [#1] PREEMPT SMP NOPTI",
            "KernelOops",
        ),
        ("divide error: 0000 [#1] SMP PTI", "KernelOops"),
        // Both NPD's pattern and npd's match: still one problem.
        ("divide error: 0000 [#1] SMP", "KernelOops"),
        (
            "Out of memory: Killed process 1234 (stress) total-vm:1049044kB, anon-rss:1047588kB, file-rss:4kB, shmem-rss:0kB, UID:0 pgtables:2092kB oom_score_adj:0",
            "OOMKilling",
        ),
        (
            "Memory cgroup out of memory: Killed process 4321 (python3) total-vm:417196kB, anon-rss:262144kB, file-rss:8196kB, shmem-rss:0kB, UID:1000 pgtables:620kB oom_score_adj:985",
            "OOMKilling",
        ),
        (
            "INFO: task dd:1234 blocked for more than 120 seconds.",
            "TaskHung",
        ),
        (
            "INFO: task kworker/u16:3:812 blocked for more than 122 seconds.",
            "TaskHung",
        ),
        (
            "unregister_netdevice: waiting for lo to become free. Usage count = 1",
            "UnregisterNetDevice",
        ),
        (
            "I/O error, dev loop0, sector 24576 op 0x0:(READ) flags 0x80700 phys_seg 1 prio class 2",
            "IOError",
        ),
        (
            "critical medium error, dev sdb, sector 1024 op 0x1:(WRITE) flags 0x0 phys_seg 1 prio class 0",
            "IOError",
        ),
        (
            "Buffer I/O error on dev loop0, logical block 3072, async page read",
            "IOError",
        ),
    ] {
        assert_eq!(defaults(line), vec![event(reason, line)], "{line}");
    }
    // What must not match.
    for line in [
        "systemd[1]: Started Session 4321 of user core.",
        "oom_reaper: reaped process 1234 (stress), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB",
        "EXT4-fs (sda1): mounted filesystem with ordered data mode.",
    ] {
        assert_eq!(defaults(line), Vec::<Value>::new(), "{line}");
    }
}

#[test]
fn default_rule_inventory() {
    let set = RuleSet::defaults();
    let kernel = &set.files[0];
    assert_eq!(kernel.rules.len(), 14);
    let mut engine = Engine::new(set);
    let types: Vec<String> = engine
        .initial_conditions(t(0))
        .into_iter()
        .map(|c| {
            assert_eq!(c.condition.status, ConditionStatus::False);
            c.condition.type_
        })
        .collect();
    assert_eq!(
        types,
        [
            "KernelDeadlock",
            "XfsShutdown",
            "CperHardwareErrorFatal",
            "ReadonlyFilesystem"
        ]
    );
    let reasons = engine.reasons();
    assert!(reasons.contains(&(
        "kernel-monitor".into(),
        "DockerHung".into(),
        Some("KernelDeadlock".into())
    )));
    assert!(reasons.contains(&("kernel-monitor".into(), "OOMKilling".into(), None)));
    assert!(reasons.contains(&(
        "readonly-monitor".into(),
        "FilesystemIsReadOnly".into(),
        Some("ReadonlyFilesystem".into())
    )));
    assert_eq!(reasons.iter().filter(|r| r.1 == "KernelOops").count(), 1);
}

fn hung(pid: i32, comm: &str) -> Detail {
    Detail::from(fixtures::hung(pid, comm))
}

fn reasons(reports: &[Report]) -> Vec<String> {
    reports
        .iter()
        .map(|r| match r {
            Report::Event(e) => e.reason.clone(),
            Report::Condition(c) => {
                format!("{}={}", c.condition.type_, c.condition.status.as_str())
            }
        })
        .collect()
}

#[test]
fn hung_task_is_one_problem() {
    let mut engine = Engine::new(RuleSet::defaults());
    let first = engine.handle(&at(t(100), &hung(1234, "dd")));
    assert_eq!(reasons(&first), ["TaskHung"]);
    let Report::Event(e) = &first[0] else {
        panic!()
    };
    assert_eq!(
        e.message,
        "task dd:1234 blocked for more than kernel.hung_task_timeout_secs seconds."
    );
    assert_eq!(e.fields["pid"], 1234);
    assert_eq!(e.fields["comm"], "dd");
    // The kernel's own line for the same fault, then the detector's next sightings.
    assert!(
        engine
            .handle(&at(
                t(100),
                &log("INFO: task dd:1234 blocked for more than 2 seconds.")
            ))
            .is_empty()
    );
    for i in 1..=12 {
        assert!(
            engine
                .handle(&at(t(100 + 120 * i), &hung(1234, "dd")))
                .is_empty()
        );
    }
    // Another task is another problem.
    assert_eq!(
        reasons(&engine.handle(&at(t(2000), &hung(99, "dd")))),
        ["TaskHung"]
    );
    let s = engine.stats();
    assert_eq!(
        (s.problems_reported, s.repeats_suppressed, s.correlated),
        (2, 13, 1)
    );
}

#[test]
fn hung_task_line_first_then_tracepoint() {
    let mut engine = Engine::new(RuleSet::defaults());
    assert_eq!(
        reasons(&engine.handle(&at(
            t(5),
            &log("INFO: task dd:77 blocked for more than 120 seconds.")
        ))),
        ["TaskHung"]
    );
    assert!(engine.handle(&at(t(5), &hung(77, "dd"))).is_empty());
    assert_eq!(engine.stats().correlated, 1);
}

#[test]
fn hung_task_after_the_kernel_stops_printing() {
    // hung_task_warnings exhausted: only the tracepoint fires, and npd still reports it.
    let mut engine = Engine::new(RuleSet::defaults());
    assert_eq!(
        reasons(&engine.handle(&at(t(1), &hung(4242, "postgres")))),
        ["TaskHung"]
    );
}

#[test]
fn docker_hang_structured_and_printed() {
    let mut engine = Engine::new(RuleSet::defaults());
    let out = engine.handle(&at(t(1), &hung(20744, "docker")));
    assert_eq!(reasons(&out), ["TaskHung", "KernelDeadlock=True"]);
    let Report::Condition(c) = &out[1] else {
        panic!()
    };
    assert_eq!(c.condition.reason, "DockerHung");
    assert_eq!(c.source, "kernel-monitor");
    assert!(
        engine
            .handle(&at(
                t(1),
                &log("INFO: task docker:20744 blocked for more than 120 seconds.")
            ))
            .is_empty()
    );
    assert_eq!(engine.stats().condition_repeats, 1);
}

#[test]
fn oom_kill_is_one_problem() {
    let mut engine = Engine::new(RuleSet::defaults());
    let oom = Detail::OomKill(OomKill {
        pid: 1234,
        comm: Some("stress".into()),
        uid: Some(0),
        total_vm_kb: Some(1049044),
        anon_rss_kb: Some(1047588),
        file_rss_kb: Some(4),
        shmem_rss_kb: Some(0),
        pgtables_kb: Some(2092),
        oom_score_adj: Some(0),
        memcg: None,
        owner: None,
    });
    let out = engine.handle(&at(t(1), &oom));
    assert_eq!(reasons(&out), ["OOMKilling"]);
    let Report::Event(e) = &out[0] else { panic!() };
    let text = "Killed process 1234 (stress) total-vm:1049044kB, anon-rss:1047588kB, file-rss:4kB, shmem-rss:0kB, UID:0 pgtables:2092kB oom_score_adj:0";
    assert_eq!(e.message, text);
    let printed = format!("Out of memory: {text}");
    for line in [
        "stress invoked oom-killer: gfp_mask=0x140dca(GFP_HIGHUSER_MOVABLE|__GFP_COMP|__GFP_ZERO), order=0, oom_score_adj=0",
        "oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,task_memcg=/user.slice,task=stress,pid=1234,uid=0",
        &printed,
        "oom_reaper: reaped process 1234 (stress), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB",
    ] {
        assert!(engine.handle(&at(t(1), &log(line))).is_empty(), "{line}");
    }
    // A second kill is a second problem.
    let other = Detail::OomKill(OomKill {
        pid: 1300,
        ..Default::default()
    });
    assert_eq!(reasons(&engine.handle(&at(t(2), &other))), ["OOMKilling"]);
    // The kernel reuses pids: a victim with pid 1234 a minute later is another kill.
    assert_eq!(reasons(&engine.handle(&at(t(61), &oom))), ["OOMKilling"]);
    assert!(engine.handle(&at(t(61), &log(&printed))).is_empty());
}

fn block(device: &str) -> Detail {
    Detail::BlockError(BlockError {
        rwbs: "RA".into(),
        ..fixtures::block_error(Some(device))
    })
}

#[test]
fn block_error_is_one_problem() {
    let mut engine = Engine::new(RuleSet::defaults());
    let out = engine.handle(&at(t(10), &block("loop0")));
    assert_eq!(reasons(&out), ["IOError"]);
    let Report::Event(e) = &out[0] else { panic!() };
    assert_eq!(
        e.message,
        "EIO error on dev loop0 (7:0), sector 24576, 8 sectors, op READ (RA)"
    );
    assert_eq!(e.fields["device"], "loop0");
    for line in [
        "I/O error, dev loop0, sector 24576 op 0x0:(READ) flags 0x80700 phys_seg 1 prio class 2",
        "Buffer I/O error on dev loop0, logical block 3072, async page read",
    ] {
        assert!(engine.handle(&at(t(10), &log(line))).is_empty(), "{line}");
    }
    // Readahead retries of the same request in the same burst.
    assert!(engine.handle(&at(t(11), &block("loop0"))).is_empty());
    // Another disk; and the same disk after the window.
    assert_eq!(
        reasons(&engine.handle(&at(t(12), &block("loop1")))),
        ["IOError"]
    );
    assert_eq!(
        reasons(&engine.handle(&at(t(100), &block("loop0")))),
        ["IOError"]
    );
}

/// Distinct faults are distinct problems, as NPD counts them: every failed block of a flood of
/// `Buffer I/O error` lines (NPD's IOError rule) counts, and so does every failed request on
/// other sectors. A line seen twice is still one problem.
#[test]
fn distinct_block_errors_are_distinct_problems() {
    let mut engine = Engine::new(RuleSet::defaults());
    let mut reported = 0;
    for n in 0..166u64 {
        let line = format!("Buffer I/O error on dev sdb, logical block {n}, async page read");
        reported += reasons(&engine.handle(&at(t(1), &log(&line)))).len();
        // The same line again (the kernel printing the same buffer twice).
        assert!(engine.handle(&at(t(1), &log(&line))).is_empty(), "{line}");
    }
    assert_eq!(reported, 166);
    let mut other_sector = block("loop0");
    if let Detail::BlockError(b) = &mut other_sector {
        b.sector = 8;
    }
    assert_eq!(
        reasons(&engine.handle(&at(t(2), &block("loop0")))),
        ["IOError"]
    );
    assert_eq!(
        reasons(&engine.handle(&at(t(2), &other_sector))),
        ["IOError"]
    );
    // A logical block outside every failed request on that disk is a fault of its own.
    assert_eq!(
        reasons(&engine.handle(&at(
            t(2),
            &log("Buffer I/O error on dev loop0, logical block 9999")
        ))),
        ["IOError"]
    );
}

#[test]
fn multi_line_patterns_use_npd_buffer_semantics() {
    let set = rules(
        r#"{"source":"m","bufferSize":3,"rules":[
            {"type":"temporary","reason":"OldOOM","patternGeneratedMessageSuffix":"see runbook",
             "pattern":"Kill process \\d+ (.+) score \\d+ or sacrifice child\\nKilled process \\d+ (.+) total-vm:\\d+kB"},
            {"type":"temporary","reason":"Only","pattern":"^only"}]}"#,
    );
    let input = "noise\nKill process 1 (a) score 5 or sacrifice child\nKilled process 1 (a) total-vm:10kB\nonly\n";
    let out = replay_lines(set, input);
    assert_eq!(
        out,
        vec![json!({"kind":"event","source":"m","reason":"OldOOM",
            "message":"Kill process 1 (a) score 5 or sacrifice child\nKilled process 1 (a) total-vm:10kB; see runbook"})]
    );
    // `^` is the start of the whole buffer: with bufferSize 1 it is the line.
    let set = rules(
        r#"{"source":"m","bufferSize":1,"rules":[{"type":"temporary","reason":"Only","pattern":"^only"}]}"#,
    );
    assert_eq!(replay_lines(set, "only\nnot only\n").len(), 1);
}

#[test]
fn recovery_after_a_quiet_period() {
    let set = rules(
        r#"{"source":"s","conditions":[{"type":"FrequentThing","reason":"NoThing","message":"fine"}],
            "rules":[{"type":"permanent","condition":"FrequentThing","reason":"Thing","pattern":"thing happened",
                      "recoverAfter":"10m"}]}"#,
    );
    let mut engine = Engine::new(set);
    assert_eq!(engine.next_deadline(), None);
    assert_eq!(
        reasons(&engine.handle(&at(t(0), &log("thing happened")))),
        ["FrequentThing=True"]
    );
    assert_eq!(engine.next_deadline(), Some(mono(t(600))));
    assert!(
        engine
            .handle(&at(t(300), &log("thing happened")))
            .is_empty()
    );
    assert_eq!(engine.next_deadline(), Some(mono(t(900))));
    assert!(engine.on_deadline(mono(t(899))).is_empty());
    let back = engine.on_deadline(mono(t(900)));
    let [Report::Condition(c)] = back.as_slice() else {
        panic!("{back:?}")
    };
    assert_eq!(
        (
            c.condition.status,
            c.condition.reason.as_str(),
            c.condition.message.as_str()
        ),
        (ConditionStatus::False, "NoThing", "fine")
    );
    assert_eq!(c.severity(), crate::problem::Severity::Normal);
    assert_eq!(engine.next_deadline(), None);
    // handle() also does what is due first.
    engine.handle(&at(t(1000), &log("thing happened")));
    let out = engine.handle(&at(t(5000), &log("unrelated")));
    assert_eq!(reasons(&out), ["FrequentThing=False"]);
}

#[test]
fn rate_condition_without_a_plugin() {
    let set = rules(
        r#"{"source":"kernel-monitor",
            "conditions":[{"type":"FrequentUnregisterNetDevice","reason":"NoFrequentUnregisterNetDevice","message":"node is functioning properly"}],
            "rules":[{"type":"permanent","condition":"FrequentUnregisterNetDevice","reason":"UnregisterNetDevice",
                      "pattern":"unregister_netdevice: waiting for \\w+ to become free. Usage count = \\d+",
                      "rate":{"count":3,"window":"20m"},"recoverAfter":"1h"}]}"#,
    );
    let mut engine = Engine::new(set);
    let line = "unregister_netdevice: waiting for eth0 to become free. Usage count = 1";
    assert!(engine.handle(&at(t(0), &log(line))).is_empty());
    assert!(engine.handle(&at(t(60), &log(line))).is_empty());
    // The first one is out of the 20-minute window by now.
    assert!(engine.handle(&at(t(1210), &log(line))).is_empty());
    let out = engine.handle(&at(t(1250), &log(line)));
    let [Report::Condition(c)] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(c.condition.reason, "UnregisterNetDevice");
    assert_eq!(c.condition.message, format!("{line}; 3 times within 20m"));
}

#[test]
fn structured_filters_and_templates() {
    let set = rules(
        r#"{"source":"s","rules":[
            {"type":"temporary","reason":"DiskWriteFailed","event":"block_error",
             "match":{"device":"nvme.*|loop0","op":"WRITE","error":"EIO"},
             "message":"write to {device} failed at sector {sector} ({error}, errno {errno})"}]}"#,
    );
    let mut engine = Engine::new(set);
    assert!(
        engine.handle(&at(t(0), &block("loop0"))).is_empty(),
        "a read"
    );
    let write = Detail::BlockError(BlockError {
        op: BlockOp::Write,
        rwbs: "W".into(),
        ..match block("loop0") {
            Detail::BlockError(b) => b,
            _ => unreachable!(),
        }
    });
    let out = engine.handle(&at(t(0), &write));
    let [Report::Event(e)] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(
        e.message,
        "write to loop0 failed at sector 24576 (EIO, errno 5)"
    );
}

#[test]
fn hostile_messages() {
    let mut engine = Engine::new(RuleSet::defaults());
    let big = format!("EXT4-fs error {}", "x".repeat(100 * 1024));
    assert_eq!(
        reasons(&engine.handle(&at(t(0), &log(&big)))),
        ["Ext4Error"]
    );
    assert!(
        engine
            .handle(&at(t(0), &log(&"\u{fffd}".repeat(50_000))))
            .is_empty()
    );
    assert!(engine.handle(&at(t(0), &log(""))).is_empty());
    assert!(engine.handle(&at(t(0), &log("   \t  "))).is_empty());
    let set = rules(
        r#"{"source":"m","bufferSize":1000,"rules":[{"type":"temporary","reason":"X","pattern":"a[\\s\\S]*b"}]}"#,
    );
    let mut engine = Engine::new(set);
    for _ in 0..50 {
        engine.handle(&at(t(0), &log(&"a".repeat(10_000))));
    }
    assert_eq!(reasons(&engine.handle(&at(t(0), &log("b")))), ["X"]);
}

/// Times a replayed line claims are clamped to year 9999: no overflow, and every report is
/// still written, with the latest time RFC 3339 can hold.
#[test]
fn replay_survives_any_time() {
    let windows = rules(
        r#"{"source":"m","conditions":[{"type":"KernelDeadlock","reason":"KernelHasNoDeadlock","message":"ok"}],
        "rules":[
          {"type":"permanent","condition":"KernelDeadlock","reason":"DockerHung","pattern":"task docker:\\w+ blocked.*","recoverAfter":"366d"},
          {"type":"temporary","reason":"Often","pattern":"often","rate":{"count":2,"window":"366d"}},
          {"type":"temporary","reason":"OOMKilling","pattern":"Killed process .*","dedupWindow":"366d"}
        ]}"#,
    );
    let input = [
        "[18446744073709551615.0] x",
        "[18446744073709551615.999999999] task docker:7 blocked for more than 120 seconds.",
        "6,1,18446744073709551615,-;often",
        "[253402300800.0] often",
        "6,2,18446744073709551615,-;Killed process 7 (x) total-vm:1kB",
    ]
    .join("\n");
    let mut out = Vec::new();
    replay(windows, input.as_bytes(), &mut out).unwrap();
    let lines: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let reasons: Vec<&str> = lines
        .iter()
        .map(|v| v["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["DockerHung", "Often", "OOMKilling"], "{lines:?}");
    assert_eq!(lines[0]["transition_time"], "9999-12-30T22:00:00Z");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn replay_survives_any_recorded_time(
        stamps in proptest::collection::vec((any::<u64>(), 0u32..1_000_000_000, any::<bool>()), 1..20),
    ) {
        let input: Vec<String> = stamps
            .iter()
            .enumerate()
            .map(|(i, (secs, nanos, kmsg))| {
                let text = ["task docker:1 blocked for more than 120 seconds.",
                    "Killed process 1 (x) total-vm:1kB", "BUG: unable to handle kernel x"][i % 3];
                if *kmsg {
                    format!("6,{i},{secs},-;{text}")
                } else {
                    format!("[{secs}.{nanos:09}] {text}")
                }
            })
            .collect();
        let mut out = Vec::new();
        replay(RuleSet::defaults(), input.join("\n").as_bytes(), &mut out).unwrap();
        prop_assert!(!out.is_empty());
    }

    #[test]
    fn replay_survives_arbitrary_bytes(input in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut out = Vec::new();
        replay(RuleSet::defaults(), &input[..], &mut out).unwrap();
        for line in String::from_utf8(out).unwrap().lines() {
            let _: Value = serde_json::from_str(line).unwrap();
        }
    }

    #[test]
    fn replay_survives_kernel_like_lines(lines in proptest::collection::vec(
        prop_oneof![
            Just("INFO: task dd:1 blocked for more than 120 seconds.".to_string()),
            Just("6,100,5000,-;Killed process 1 (x) total-vm:1kB, anon-rss:1kB, file-rss:1kB".to_string()),
            Just("[   1.0] Buffer I/O error on dev sda1, logical block 1".to_string()),
            "[ -~]{0,80}",
            "\\PC{0,40}",
        ], 0..40)) {
        let input = lines.join("\n");
        let mut out = Vec::new();
        replay(RuleSet::defaults(), input.as_bytes(), &mut out).unwrap();
    }
}
