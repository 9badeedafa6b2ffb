//! Detection latency end to end (needs root): from a write to /dev/kmsg to the condition it
//! sets being visible through a watch on the Node. The real agent binary (`NPD_AGENT_BIN`,
//! `cargo xtask bench` sets it to the release build), as npd's service account, against a real
//! kube-apiserver on loopback started for the run.
//!
//! Each trial must be a real condition change, so the agent gets a rule file with one
//! permanent rule per trial: line `npd-latency-<i>` sets condition `NpdLatency<i>` to True.
//! Prints p50, p90, p99 and max. Numbers, not assertions.
//!
//! `TRIALS` in the environment overrides the number of trials (default 100, at least 20).

use std::{
    pin::pin,
    time::{Duration, Instant},
};

use futures::TryStreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    api::{WatchEvent, WatchParams},
};
use npd_tests::{
    agent::Agent,
    apiserver::{ApiServer, node_condition},
    kernel::{TempDir, write_kmsg},
    unique,
};

const NODE: &str = "npd-bench-latency";

fn condition_type(i: usize) -> String {
    format!("NpdLatency{i}")
}

/// An NPD-format rule file: per trial, a condition (default False) and a permanent rule.
/// The run's marker keeps other writers' lines from matching.
fn rule_file(marker: &str, trials: usize) -> serde_json::Value {
    let conditions: Vec<_> = (0..trials)
        .map(|i| {
            serde_json::json!({
                "type": condition_type(i),
                "reason": format!("NpdLatency{i}Clear"),
                "message": "not triggered yet",
            })
        })
        .collect();
    let rules: Vec<_> = (0..trials)
        .map(|i| {
            serde_json::json!({
                "type": "permanent",
                "condition": condition_type(i),
                "reason": format!("NpdLatency{i}Hit"),
                "pattern": format!("{marker} npd-latency-{i}"),
            })
        })
        .collect();
    serde_json::json!({
        "plugin": "kmsg",
        "source": "npd-latency",
        "conditions": conditions,
        "rules": rules,
    })
}

fn status<'a>(node: &'a Node, type_: &str) -> Option<&'a str> {
    node_condition(node, type_).map(|c| c.status.as_str())
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED Kubernetes latency benchmark: needs root (cargo xtask bench uses sudo)");
        return;
    }
    let trials: usize = std::env::var("TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(100)
        .max(20);
    let Some(server) = ApiServer::start("Kubernetes latency benchmark") else {
        return;
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(bench(&server, trials));
}

async fn bench(server: &ApiServer, trials: usize) {
    let dir = TempDir::new("npd-bench-k8s");
    let marker = unique("npd-bench");
    let rules = dir.join("latency.json");
    std::fs::write(&rules, rule_file(&marker, trials).to_string()).expect("writing the rules");
    server.create_node(NODE).await;
    let kubeconfig = server.service_account_kubeconfig().await;
    let nodes: Api<Node> = Api::all(server.admin_client().await);

    let agent = Agent::start(&[
        "run",
        "--config",
        rules.to_str().expect("UTF-8 path"),
        "--kubeconfig",
        kubeconfig.to_str().expect("UTF-8 path"),
        "--hostname-override",
        NODE,
    ]);
    // The agent's first write: every condition in its default state.
    let last = condition_type(trials - 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    let rv = loop {
        if let Ok(node) = nodes.get(NODE).await
            && status(&node, &last) == Some("False")
        {
            break node.metadata.resource_version.expect("a resourceVersion");
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not initialise the Node"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let wp = WatchParams::default()
        .fields(&format!("metadata.name={NODE}"))
        .timeout(290);
    let mut watch = pin!(nodes.watch(&wp, &rv).await.expect("watching the Node"));

    let mut latencies = Vec::with_capacity(trials);
    for i in 0..trials {
        let type_ = condition_type(i);
        let start = Instant::now();
        write_kmsg(&format!("{marker} npd-latency-{i}"));
        loop {
            let event = tokio::time::timeout(Duration::from_secs(30), watch.try_next())
                .await
                .expect("the condition within 30 s")
                .expect("watch error")
                .expect("watch ended");
            if let WatchEvent::Modified(node) = event
                && status(&node, &type_) == Some("True")
            {
                break;
            }
        }
        latencies.push(start.elapsed());
        // Isolated changes, as kernel faults are.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped = agent.stop();
    assert!(stopped.status.success(), "agent exit: {}", stopped.status);

    latencies.sort();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "\nnpd detection latency: /dev/kmsg write -> Node condition visible in a watch \
         ({trials} trials; real agent, real kube-apiserver on loopback)"
    );
    println!(
        "{:>10} {:>10} {:>10} {:>10}",
        "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    println!(
        "{:>10.2} {:>10.2} {:>10.2} {:>10.2}",
        ms(pct(0.50)),
        ms(pct(0.90)),
        ms(pct(0.99)),
        ms(*latencies.last().expect("trials"))
    );
}
