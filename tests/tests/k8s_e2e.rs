//! End to end on the real kernel and a real kube-apiserver: the real `npd-agent` binary runs
//! as npd's service account (bound to the shipped ClusterRole in `deploy/kubernetes/rbac.yaml`,
//! not admin), real kernel faults happen, and the test reads the Node and its Events back with
//! an admin client.
//!
//! Needs root (eBPF, /dev/kmsg, cgroups, loop devices). Tests run one at a time (`serial`), each
//! with its own Node and agent; every fault is behind a guard that puts the kernel back, also
//! when the test fails. All but the outage test share one API server; the outage test stops
//! its own.

use std::{
    future::Future,
    path::Path,
    time::{Duration, Instant},
};

use futures::{StreamExt as _, TryStreamExt as _, stream::BoxStream};
use k8s_openapi::api::core::v1::{Event, Node};
use kube::api::{Patch, PatchParams, WatchEvent, WatchParams};
use npd_tests::{
    agent::Agent,
    apiserver::{ApiServer, node_condition},
    faults, have_memory_cgroup, have_root,
    kernel::write_kmsg,
    kernel_test,
    node::{DEADLINE, TestNode, block_on, wait_for},
    serial, unique,
};

/// NPD's own test line for its DockerHung rule (KernelDeadlock=True).
const DOCKER_HUNG: &str = "INFO: task docker:20744 blocked for more than 120 seconds.";
/// NPD's own test line for a KernelOops Event.
const KERNEL_OOPS: &str =
    "BUG: unable to handle kernel NULL pointer dereference at 0000000000000000";

fn stop(agent: Agent) {
    agent.stop_cleanly();
}

/// The DockerHung line sets KernelDeadlock=True with the NPD condition-change Event; the
/// KernelOops line posts a Warning Event.
async fn docker_hung_and_kernel_oops(node: &TestNode) {
    write_kmsg(DOCKER_HUNG);
    let c = node
        .wait_condition("KernelDeadlock", "True", "DockerHung")
        .await;
    let message = c.message.clone().unwrap_or_default();
    assert!(
        message.contains("task docker:20744 blocked for more than 120 seconds."),
        "{c:?}"
    );
    let expected = format!(
        "Node condition KernelDeadlock is now: True, reason: DockerHung, message: \"{message}\""
    );
    let event = node
        .wait_event("DockerHung", "the condition change", |m| m == expected)
        .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"), "{event:?}");
    assert_eq!(event.count, Some(1), "{event:?}");

    write_kmsg(KERNEL_OOPS);
    let event = node
        .wait_event("KernelOops", "NPD's oops line", |m| m.contains(KERNEL_OOPS))
        .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"), "{event:?}");
}

/// A real OOM kill in a memory cgroup: exactly one OOMKilling Event (count 1) naming the
/// victim's pid and comm, although the kernel also prints text the log rules match.
async fn oom_kill(node: &TestNode) {
    let pid = faults::oom_kill(Path::new(env!("CARGO_BIN_EXE_npd-test-hog")));
    let victim_text = format!("Killed process {pid} (npd-test-hog)");
    node.wait_event("OOMKilling", &victim_text, |m| m.contains(&victim_text))
        .await;
    // The kernel printed its OOM report before the victim died; once an Event for a later
    // line is posted, a duplicate would have been posted too.
    node.barrier().await;
    let about_victim: Vec<Event> = node
        .events("OOMKilling")
        .await
        .into_iter()
        .filter(|e| {
            e.message
                .as_deref()
                .is_some_and(|m| m.contains(&format!("process {pid} ")))
        })
        .collect();
    assert_eq!(
        about_victim.len(),
        1,
        "one OOM kill, one Event: {about_victim:#?}"
    );
    let event = &about_victim[0];
    assert_eq!(event.count, Some(1), "{event:#?}");
    assert_eq!(event.type_.as_deref(), Some("Warning"), "{event:?}");
    let message = event.message.as_deref().unwrap_or_default();
    assert!(
        message.contains(&pid.to_string()) && message.contains("npd-test-hog"),
        "{message}"
    );
}

/// A real failed block read (direct read past the end of a shrunk loop device): an IOError
/// Event naming the device, once.
async fn block_error(node: &TestNode) {
    let failed = faults::failed_read();
    let name = failed.dev.name().to_owned();
    // `dev loop1 ` or `dev loop1,`, never `dev loop10`.
    let names_device =
        |m: &str| m.contains(&format!("dev {name} ")) || m.contains(&format!("dev {name},"));
    let event = node
        .wait_event("IOError", &format!("naming {name}"), names_device)
        .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"), "{event:?}");
    node.barrier().await;
    let about_device: Vec<Event> = node
        .events("IOError")
        .await
        .into_iter()
        .filter(|e| e.message.as_deref().is_some_and(names_device))
        .collect();
    assert_eq!(
        about_device.len(),
        1,
        "one failed request, one Event: {about_device:#?}"
    );
    assert_eq!(about_device[0].count, Some(1), "{about_device:#?}");
}

/// Runs `fault` against a fresh Node and agent on the shared API server, then checks that
/// kubelet's Ready condition is unchanged.
fn one_fault(
    test: &str,
    node_name: &str,
    needs_memory_cgroup: bool,
    fault: impl for<'a> FnOnce(&'a TestNode) -> std::pin::Pin<Box<dyn Future<Output = ()> + 'a>>,
) {
    let _serial = serial();
    if !have_root(test) || (needs_memory_cgroup && !have_memory_cgroup(test)) {
        return;
    }
    let Some(server) = ApiServer::shared(test) else {
        return;
    };
    block_on(async {
        let node = TestNode::new(server, node_name).await;
        let agent = node.start_agent(true).await;
        fault(&node).await;
        node.assert_ready_unchanged();
        stop(agent);
    });
}

#[test]
fn docker_hung_and_kernel_oops_lines_reach_the_node() {
    one_fault(
        "docker_hung_and_kernel_oops_lines_reach_the_node",
        "npd-e2e-lines",
        false,
        |node| Box::pin(docker_hung_and_kernel_oops(node)),
    );
}

#[test]
fn a_real_oom_kill_posts_one_oomkilling_event() {
    one_fault(
        "a_real_oom_kill_posts_one_oomkilling_event",
        "npd-e2e-oom",
        true,
        |node| Box::pin(oom_kill(node)),
    );
}

#[test]
fn a_real_block_error_posts_an_ioerror_event_naming_the_device() {
    one_fault(
        "a_real_block_error_posts_an_ioerror_event_naming_the_device",
        "npd-e2e-blk",
        false,
        |node| Box::pin(block_error(node)),
    );
}

#[test]
fn kubelets_ready_condition_is_byte_for_byte_unchanged_after_every_fault() {
    const TEST: &str = "kubelets_ready_condition_is_byte_for_byte_unchanged_after_every_fault";
    let _serial = serial();
    if !have_root(TEST) || !have_memory_cgroup(TEST) {
        return;
    }
    let Some(server) = ApiServer::shared(TEST) else {
        return;
    };
    block_on(async {
        // Every fault against one Node and one agent.
        let node = TestNode::new(server, "npd-e2e-all").await;
        let agent = node.start_agent(true).await;
        docker_hung_and_kernel_oops(&node).await;
        oom_kill(&node).await;
        block_error(&node).await;
        node.assert_ready_unchanged();
        stop(agent);
        node.assert_ready_unchanged();
        // npd's conditions sit beside kubelet's; kubelet still owns its condition.
        let stored = node.get().await.expect("the Node");
        let types: Vec<&str> = stored
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .map(|c| c.type_.as_str())
            .collect();
        assert!(
            types.contains(&"Ready") && types.contains(&"KernelDeadlock"),
            "{types:?}"
        );
    });
}

/// The Node's versions from a watch, in order.
async fn next_version(watch: &mut BoxStream<'_, kube::Result<WatchEvent<Node>>>) -> Node {
    let next = tokio::time::timeout(DEADLINE, watch.try_next()).await;
    match next
        .expect("a watch event in time")
        .expect("watch error")
        .expect("watch ended")
    {
        WatchEvent::Added(n) | WatchEvent::Modified(n) => n,
        other => panic!("unexpected watch event {other:?}"),
    }
}

#[test]
fn an_agent_restart_keeps_a_true_condition_true() {
    const TEST: &str = "an_agent_restart_keeps_a_true_condition_true";
    let Some(_serial) = kernel_test(TEST) else {
        return;
    };
    let Some(server) = ApiServer::shared(TEST) else {
        return;
    };
    block_on(async {
        let node = TestNode::new(server, "npd-e2e-restart").await;
        let first = node.start_agent(true).await;
        write_kmsg(DOCKER_HUNG);
        let before = node
            .wait_condition("KernelDeadlock", "True", "DockerHung")
            .await;
        let heartbeat_before = before.last_heartbeat_time.clone().expect("a heartbeat");

        // Every version of the Node from here on must have KernelDeadlock=True.
        let rv = node
            .get()
            .await
            .and_then(|n| n.metadata.resource_version)
            .expect("a resourceVersion");
        let wp = WatchParams::default().fields(&format!("metadata.name={}", node.name));
        let mut watch = node
            .nodes
            .watch(&wp, &rv)
            .await
            .expect("watching the Node")
            .boxed();
        let mut versions = 0;
        let mut check = |n: &Node| {
            versions += 1;
            let c = node_condition(n, "KernelDeadlock").expect("KernelDeadlock on the Node");
            assert_eq!(
                (c.status.as_str(), c.reason.as_deref(), c.message.as_deref()),
                ("True", Some("DockerHung"), before.message.as_deref()),
                "KernelDeadlock changed across the restart (Node version {versions}): {c:?}"
            );
        };

        stop(first);
        // Heartbeats have second resolution: the restarted agent's write is recognisable.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let second = node.start_agent(false).await;
        // The restarted agent refreshes every condition it owns once connected.
        loop {
            let n = next_version(&mut watch).await;
            check(&n);
            let c = node_condition(&n, "KernelDeadlock").expect("KernelDeadlock");
            if c.last_heartbeat_time
                .as_ref()
                .is_some_and(|t| t.0 > heartbeat_before.0)
            {
                break;
            }
        }
        // Anything else it writes soon after must not flip it either: a change of our own
        // marks the end of what is checked.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let marker = serde_json::json!({"metadata": {"labels": {"npd-test/marker": "done"}}});
        node.nodes
            .patch(&node.name, &PatchParams::default(), &Patch::Merge(&marker))
            .await
            .expect("labelling the Node");
        loop {
            let n = next_version(&mut watch).await;
            check(&n);
            if n.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key("npd-test/marker"))
            {
                break;
            }
        }
        assert!(
            second.stderr().contains("Kubernetes exporter connected"),
            "{}",
            second.stderr()
        );
        node.assert_ready_unchanged();
        stop(second);
    });
}

#[test]
fn a_fault_during_an_api_server_outage_lands_when_it_returns() {
    const TEST: &str = "a_fault_during_an_api_server_outage_lands_when_it_returns";
    let Some(_serial) = kernel_test(TEST) else {
        return;
    };
    // Its own API server: this test stops it.
    let Some(server) = ApiServer::start(TEST) else {
        return;
    };
    block_on(async {
        let mut node = TestNode::new(&server, "npd-e2e-outage").await;
        let agent = node.start_agent(true).await;

        server.stop_apiserver();
        write_kmsg(DOCKER_HUNG);
        // The agent reported the fault and could not reach the API server (the first failure
        // of an outage is logged, whether writing the condition or posting the TaskHung Event
        // the same line gives).
        wait_for("the fault reported during the outage", DEADLINE, || async {
            let stderr = agent.stderr();
            (stderr.contains(r#""type":"KernelDeadlock","status":"True","reason":"DockerHung""#)
                && stderr.contains("failed; retrying with backoff"))
            .then_some(())
        })
        .await;

        server.start_apiserver();
        let back = Instant::now();
        node.reconnect(&server).await;
        let c = node
            .wait_condition("KernelDeadlock", "True", "DockerHung")
            .await;
        eprintln!(
            "KernelDeadlock=True visible {:.1} s after the API server was ready again",
            back.elapsed().as_secs_f64()
        );
        let message = c.message.clone().unwrap_or_default();
        let expected = format!(
            "Node condition KernelDeadlock is now: True, reason: DockerHung, message: \"{message}\""
        );
        node.wait_event("DockerHung", "the condition change", |m| m == expected)
            .await;
        node.assert_ready_unchanged();
        stop(agent);
    });
}

/// NPD counts every failed block (`Buffer I/O error` lines are distinct faults): 20 distinct
/// lines through real /dev/kmsg are one IOError Event with count 20 on the Node (the same
/// line printed twice stays one problem), not 20 Events and not 1 occurrence.
#[test]
fn distinct_block_errors_count_each_in_one_event() {
    const TEST: &str = "distinct_block_errors_count_each_in_one_event";
    let Some(_serial) = kernel_test(TEST) else {
        return;
    };
    let Some(server) = ApiServer::shared(TEST) else {
        return;
    };
    block_on(async {
        let node = TestNode::new(server, "npd-e2e-io-errors").await;
        let agent = node.start_agent(true).await;
        let disk = unique("sdz").replace('-', "");
        for block in 0..20 {
            let line =
                format!("Buffer I/O error on dev {disk}, logical block {block}, async page read");
            write_kmsg(&line);
            if block == 0 {
                write_kmsg(&line);
            }
        }
        let event = wait_for("one IOError Event with count 20", DEADLINE, || async {
            node.events("IOError").await.into_iter().find(|e| {
                e.message.as_deref().is_some_and(|m| m.contains(&disk)) && e.count == Some(20)
            })
        })
        .await;
        assert!(
            event
                .message
                .as_deref()
                .is_some_and(|m| m.ends_with(&format!("{disk}, logical block 19, async page read"))),
            "{event:?}"
        );
        node.barrier().await;
        let about_disk: Vec<Event> = node
            .events("IOError")
            .await
            .into_iter()
            .filter(|e| e.message.as_deref().is_some_and(|m| m.contains(&disk)))
            .collect();
        assert_eq!(about_disk.len(), 1, "{about_disk:#?}");
        assert_eq!(
            about_disk[0].count,
            Some(20),
            "the repeated line counted once"
        );
        stop(agent);
    });
}

/// A True condition found on the Node at start is taken over by the engine: with
/// `recoverAfter`, it recovers that long after the agent started, although no rule fired.
#[test]
fn an_adopted_true_condition_recovers_after_its_quiet_period() {
    const TEST: &str = "an_adopted_true_condition_recovers_after_its_quiet_period";
    let Some(_serial) = kernel_test(TEST) else {
        return;
    };
    let Some(server) = ApiServer::shared(TEST) else {
        return;
    };
    block_on(async {
        let node = TestNode::new(server, "npd-e2e-adopt-recover").await;
        // As an earlier npd left it.
        let status = serde_json::json!({"status": {"conditions": [{
            "type": "KernelDeadlock", "status": "True", "reason": "DockerHung",
            "message": "task docker:1 blocked for more than 120 seconds.",
            "lastHeartbeatTime": "2024-01-01T00:00:00Z", "lastTransitionTime": "2024-01-01T00:00:00Z",
        }]}});
        let params = PatchParams {
            field_manager: Some("npd".into()),
            ..Default::default()
        };
        node.nodes
            .patch_status(&node.name, &params, &Patch::Strategic(&status))
            .await
            .expect("writing the old state");
        let dir = npd_tests::kernel::TempDir::new("npd-recover-rules");
        let rules = dir.join("rules.json");
        std::fs::write(
            &rules,
            r#"{"source":"kernel-monitor",
              "conditions":[{"type":"KernelDeadlock","reason":"KernelHasNoDeadlock","message":"kernel has no deadlock"}],
              "rules":[{"type":"permanent","condition":"KernelDeadlock","reason":"DockerHung",
                        "pattern":"task docker:\\w+ blocked for more than \\w+ seconds\\.","recoverAfter":"3s"}]}"#,
        )
        .unwrap();
        let agent = node
            .start_agent_with(false, &["--config", rules.to_str().unwrap()])
            .await;
        let recovered = node
            .wait_condition("KernelDeadlock", "False", "KernelHasNoDeadlock")
            .await;
        assert_eq!(recovered.message.as_deref(), Some("kernel has no deadlock"));
        node.wait_event("KernelHasNoDeadlock", "the recovery", |m| {
            m.contains("is now: False")
        })
        .await;
        let stopped = agent.stop();
        assert!(stopped.status.success(), "{}", stopped.stderr);
        assert!(
            stopped
                .stderr
                .contains("took over the conditions found on the Node"),
            "{}",
            stopped.stderr
        );
    });
}
