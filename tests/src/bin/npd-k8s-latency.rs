//! Measures the Kubernetes exporter's share of detection latency: from `K8sHandle::export` of a
//! condition change to the change being visible through a watch on the Node, against a real
//! API server started with `tests/k8s/cluster.sh`. Prints a table (p50, p99, max).
//!
//! Usage: `npd-k8s-latency [TRIALS]` (default 50). The kernel-to-export part is measured by
//! `cargo xtask bench`.

use std::time::{Duration, Instant, SystemTime};

use futures::TryStreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    api::{WatchEvent, WatchParams},
};
use npd_agent::{
    exporter::k8s::{K8sConfig, K8sExporter},
    problem::{Condition, ConditionChange, ConditionStatus, Report},
};
use npd_tests::apiserver::ApiServer;

fn change(status: ConditionStatus, reason: &str, message: String) -> ConditionChange {
    ConditionChange {
        source: "kernel-monitor".into(),
        condition: Condition {
            type_: "KernelDeadlock".into(),
            status,
            reason: reason.into(),
            message,
            transition_time: SystemTime::now(),
        },
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let trials: usize = std::env::args()
        .nth(1)
        .map_or(50, |a| a.parse().expect("TRIALS: a number"));
    let Some(server) = ApiServer::start("npd-k8s-latency") else {
        std::process::exit(2);
    };
    let name = "npd-latency";
    server.create_node(name).await;
    let kubeconfig = server.service_account_kubeconfig().await;
    let config = K8sConfig::from_kubeconfig(&kubeconfig, name)
        .await
        .expect("config");
    let default = change(
        ConditionStatus::False,
        "KernelHasNoDeadlock",
        "kernel has no deadlock".into(),
    );
    let exporter = K8sExporter::start(config, vec![default]).expect("exporter");

    let nodes: Api<Node> = Api::all(server.admin_client().await);
    let deadlock = |node: &Node| {
        node.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "KernelDeadlock"))
            .and_then(|c| c.message.clone())
    };
    // Wait for the exporter's first write.
    while nodes
        .get(name)
        .await
        .ok()
        .as_ref()
        .and_then(deadlock)
        .is_none()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rv = nodes
        .get(name)
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let wp = WatchParams::default().fields(&format!("metadata.name={name}"));
    let mut watch = Box::pin(nodes.watch(&wp, &rv).await.expect("watch"));

    let mut latencies = Vec::with_capacity(trials);
    for i in 0..trials {
        // Alternate True/False so every trial is a real change.
        let (status, reason) = if i % 2 == 0 {
            (ConditionStatus::True, "DockerHung")
        } else {
            (ConditionStatus::False, "KernelHasNoDeadlock")
        };
        let message = format!("trial {i}");
        let start = Instant::now();
        exporter.export(&Report::Condition(change(status, reason, message.clone())));
        loop {
            let event = tokio::time::timeout(Duration::from_secs(30), watch.try_next())
                .await
                .expect("watch event within 30 s")
                .expect("watch error")
                .expect("watch ended");
            if let WatchEvent::Modified(node) = event
                && deadlock(&node).as_deref() == Some(message.as_str())
            {
                break;
            }
        }
        latencies.push(start.elapsed());
        // Spread trials so each is an isolated change, as kernel faults are.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    exporter.shutdown().await;

    latencies.sort();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "export -> visible in a Node watch, {trials} trials (real kube-apiserver on loopback)"
    );
    println!("{:>10} {:>10} {:>10}", "p50 ms", "p99 ms", "max ms");
    println!(
        "{:>10.2} {:>10.2} {:>10.2}",
        ms(pct(0.50)),
        ms(pct(0.99)),
        ms(*latencies.last().unwrap())
    );
}
