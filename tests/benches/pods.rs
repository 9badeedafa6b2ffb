//! What pod attribution costs (needs root and a real kube-apiserver). Numbers, not assertions;
//! `cargo xtask bench pods` runs it and writes `target/bench/pods.json`.
//!
//! 1. **The detection path, attribution on and off.** For each kind it attributes, the time
//!    from a decoded event to its report: the rules engine alone (off), and pod attribution
//!    followed by the engine (on), as the agent runs them (on a 2-worker tokio runtime, file
//!    reads as the agent does them), with a cache of 110 pods (kubelet's default maximum;
//!    `PODS` to change). The
//!    OOM kill is attributed from the kernel's `oom-kill:` line, in the pieces
//!    `printk:console` delivers (their matching by the log rules is the engine's cost with or
//!    without attribution, and is left out of both); the hung task reads a real `/proc/<pid>/cgroup`; the block
//!    error scans the host's real mount table. Median of `ROUNDS` (default 5) rounds of
//!    `EVENTS` (default 20,000) events each.
//! 2. **RSS with 110 pods.** 110 Pods with this node's name (two containers each, with the
//!    labels, annotations and statuses a real pod has) in the test kube-apiserver; the release
//!    agent exports to that Node with attribution on until its cache holds all 110
//!    (`npd_pod_cache_pods`), then with `--pod-attribution=false`. VmRSS of each, 5 s after.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use npd_agent::{
    engine::Engine,
    event::{BlockError, BlockOp, DevNum, HungTask, KernelEvent, OomKill},
    pods::{Attributor, Paths, PodCache, PodMetrics},
    rules::RuleSet,
    time::Mono,
};
use npd_tests::{
    agent::Agent,
    apiserver::{ApiServer, repo_root},
    env_or, have_root,
    http::{self, free_port, sample},
    procstat::{mib, status_kib},
};
use serde_json::{Value, json};

const NAME: &str = "pod attribution benchmark";
const NODE: &str = "npd-bench-pods";
/// kubelet's default maximum (`PODS` to change).
const MAX_PODS: usize = 110;

fn main() {
    let pods = env_or("PODS", MAX_PODS);
    if !have_root(NAME) {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let rounds = env_or("ROUNDS", 5usize).max(1);
    let events = env_or("EVENTS", 20_000usize).max(100);
    let path = runtime.block_on(detection_path(rounds, events, pods.max(1)));
    let Some(server) = ApiServer::start(NAME) else {
        return;
    };
    let rss = runtime.block_on(rss_with_pods(&server, pods));

    println!(
        "\npod attribution: the detection path (µs per event, median of {rounds} rounds of {events})"
    );
    println!("| event | engine alone | attribution + engine | ratio |");
    println!("|---|---|---|---|");
    for (kind, off, on) in &path {
        println!("| {kind} | {off:.2} | {on:.2} | {:.2}x |", on / off);
    }
    println!("\nRSS, release agent exporting to a Node with {pods} pods");
    println!("| attribution | RSS |");
    println!("|---|---|");
    println!("| on, {pods} pods in the cache | {} |", mib(rss.on_kib));
    println!("| off | {} |", mib(rss.off_kib));
    let out = json!({
        "rounds": rounds,
        "events": events,
        "detection_path_us": path.iter().map(|(k, off, on)| json!({
            "event": k, "off": off, "on": on, "ratio": on / off,
        })).collect::<Vec<_>>(),
        "pods": pods,
        "rss_on_kib": rss.on_kib,
        "rss_off_kib": rss.off_kib,
    });
    let dir = repo_root().join("target/bench");
    std::fs::create_dir_all(&dir).expect("creating target/bench");
    std::fs::write(dir.join("pods.json"), format!("{out:#}\n")).expect("writing pods.json");
}

const CID: &str = "5d3a1f9c8b7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c";

fn uid(i: usize) -> String {
    format!("0f6b4e1c-5d8a-4b7e-9c3f-{i:012x}")
}

/// A pod as the API server serves one that runs: two containers, labels, annotations,
/// conditions and container statuses. The agent's cache drops all but what it reads.
fn pod_json(i: usize, node: &str) -> Value {
    let container = |name: &str, n: usize| {
        json!({"name": name, "image": "registry.example/team/app:1.2.3",
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
            "env": [{"name": "MODE", "value": "production"}, {"name": "INDEX", "value": n.to_string()}],
            "ports": [{"containerPort": 8080 + n, "protocol": "TCP"}]})
    };
    let status = |name: &str, n: usize| {
        json!({"name": name, "containerID": format!("containerd://{:0>64x}", i * 2 + n),
            "image": "registry.example/team/app:1.2.3",
            "imageID": format!("registry.example/team/app@sha256:{CID}"),
            "ready": true, "restartCount": 0, "started": true,
            "state": {"running": {"startedAt": "2026-12-03T10:00:00Z"}}})
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("web-{i}"), "namespace": "default",
            "labels": {"app": "web", "pod-template-hash": "7d4b9c8f6", "team": "payments"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-12-01T00:00:00Z",
                "example.com/config": "x".repeat(512)}},
        "spec": {"nodeName": node, "containers": [container("app", 0), container("sidecar", 1)]},
        "status": {"phase": "Running", "podIP": "10.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [status("app", 0), status("sidecar", 1)]},
    })
}

/// The per-event times of the rules engine alone and of attribution + engine, by kind.
async fn detection_path(
    rounds: usize,
    events: usize,
    count: usize,
) -> Vec<(&'static str, f64, f64)> {
    let pods: Vec<Pod> = (0..count)
        .map(|i| serde_json::from_value(pod_json(i, NODE)).expect("a Pod"))
        .collect();
    let cache = PodCache::from_pods(pods);
    let paths = Paths {
        proc: "/proc".into(),
        kubelet_root: "/var/lib/kubelet".into(),
        dev_block: "/sys/dev/block".into(),
    };
    let mut attributor = Attributor::new(paths, cache, PodMetrics::default());
    let victim_uid = uid(count / 2);
    let pid = i32::try_from(std::process::id()).unwrap_or(1);
    let oom_pieces: Vec<String> = vec![
        "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null)".into(),
        ",cpuset=".into(),
        "/".into(),
        ",mems_allowed=0".into(),
        ",oom_memcg=".into(),
        format!("/kubepods/burstable/pod{victim_uid}"),
        ",task_memcg=".into(),
        format!("/kubepods/burstable/pod{victim_uid}/{:0>64x}", count),
    ];
    let kinds: [(&str, KernelEvent); 3] = [
        (
            "oom_kill",
            KernelEvent::new(
                Mono::ZERO,
                OomKill {
                    pid,
                    comm: Some("stress".into()),
                    uid: Some(0),
                    total_vm_kb: Some(36668),
                    anon_rss_kb: Some(32768),
                    file_rss_kb: Some(1856),
                    shmem_rss_kb: Some(0),
                    pgtables_kb: Some(112),
                    oom_score_adj: Some(0),
                    memcg: None,
                    owner: None,
                },
            ),
        ),
        (
            "hung_task",
            KernelEvent::new(
                Mono::ZERO,
                HungTask {
                    pid,
                    comm: "dd".into(),
                    owner: None,
                },
            ),
        ),
        (
            "block_error",
            KernelEvent::new(
                Mono::ZERO,
                BlockError {
                    device: Some("loop0".into()),
                    dev: DevNum { major: 7, minor: 0 },
                    sector: 24576,
                    nr_sectors: 8,
                    op: BlockOp::Read,
                    rwbs: "R".into(),
                    error: -5,
                    owner: None,
                },
            ),
        ),
    ];
    let mut out = Vec::new();
    for (kind, template) in kinds {
        let mut off = Vec::new();
        let mut on = Vec::new();
        for round in 0..rounds {
            for attribute in [false, true] {
                // Distinct faults (pids, sectors) a second apart: every event is reported.
                let mut engine = Engine::new(RuleSet::defaults());
                let start = Instant::now();
                for n in 0..events {
                    let mut event = template.clone();
                    event.at = Mono::ZERO
                        .saturating_add(Duration::from_secs((round * events + n) as u64 * 3600));
                    if attribute {
                        if kind == "oom_kill" {
                            for piece in &oom_pieces {
                                attributor.note_message(piece);
                            }
                            attributor.note_message(&format!(",task=stress,pid={pid},uid=0"));
                        }
                        attributor.attribute(&mut event.detail).await;
                    }
                    std::hint::black_box(engine.handle(&event));
                }
                let us = start.elapsed().as_secs_f64() * 1e6 / events as f64;
                if attribute { &mut on } else { &mut off }.push(us);
            }
        }
        out.push((kind, median(&mut off), median(&mut on)));
    }
    out
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Rss {
    on_kib: u64,
    off_kib: u64,
}

fn agent(kubeconfig: &Path, extra: &[&str]) -> (Agent, SocketAddr) {
    let port = free_port().to_string();
    let mut args = vec![
        "run",
        "--source",
        "ebpf",
        "--kubeconfig",
        kubeconfig.to_str().expect("UTF-8 path"),
        "--hostname-override",
        NODE,
        "--prometheus-port",
        &port,
    ];
    args.extend_from_slice(extra);
    let agent = Agent::start(&args);
    let addr = SocketAddr::from(([127, 0, 0, 1], port.parse::<u16>().expect("a port")));
    (agent, addr)
}

fn scrape(addr: SocketAddr, series: &str) -> Option<f64> {
    http::get(addr, "/metrics")
        .ok()
        .and_then(|r| sample(&r.body, series))
}

async fn rss_with_pods(server: &ApiServer, count: usize) -> Rss {
    server.create_node(NODE).await;
    let kubeconfig = server.service_account_kubeconfig().await;
    let pods: Api<Pod> = Api::namespaced(server.admin_client().await, "default");
    for i in 0..count {
        let pod: Pod = serde_json::from_value(pod_json(i, NODE)).expect("a Pod");
        match pods.create(&PostParams::default(), &pod).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("creating pod web-{i}: {e}"),
        }
    }
    let (on, metrics) = agent(&kubeconfig, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while scrape(metrics, "npd_pod_cache_pods") != Some(count as f64) {
        assert!(
            Instant::now() < deadline,
            "the agent's pod cache did not reach {count} pods: {:?}\n{}",
            scrape(metrics, "npd_pod_cache_pods"),
            on.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let on_kib = status_kib(on.pid(), "VmRSS");
    assert!(on.stop().status.success());
    let (off, _) = agent(&kubeconfig, &["--pod-attribution=false"]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let off_kib = status_kib(off.pid(), "VmRSS");
    assert!(off.stop().status.success());
    Rss { on_kib, off_kib }
}
