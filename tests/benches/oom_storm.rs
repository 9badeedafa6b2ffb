//! Soak: a real OOM storm (needs root and a memory cgroup controller). For `OOM_SECONDS`
//! (default 180) `npd-test-hog storm` forks `OOM_RATE` (default 80) children a second into a
//! 4 MiB memory cgroup, each killed by the cgroup's OOM killer: at least 4,500 kills a minute,
//! the rate at which NPD burned CPU (NPD #282). The real agent (`NPD_AGENT_BIN`, the release
//! build under `cargo xtask bench`) exports to a real kube-apiserver on loopback.
//!
//! Prints the agent's CPU over the storm, its RSS before and after, the kills made against
//! the kills it counted (`problem_counter{reason="OOMKilling"}`, and the `count` of the
//! OOMKilling Event on the Node), and the Event writes it made per second. Each figure is
//! printed beside its target; numbers, not assertions. `POD_ATTRIBUTION=false` runs the agent
//! with `--pod-attribution=false`, to see what attribution costs in a storm.

use std::{
    net::SocketAddr,
    os::unix::process::ExitStatusExt as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Event, Node};
use kube::{Api, api::ListParams};
use npd_tests::{
    agent::Agent,
    apiserver::{ApiServer, node_condition},
    env_or, have_memory_cgroup, have_root,
    http::{self, free_port, sample},
    kernel::MemCgroup,
    procstat::{cpu_seconds, mib, own_kib, status_kib},
};

const NODE: &str = "npd-bench-oom-storm";
const NAME: &str = "OOM storm soak benchmark";

fn main() {
    if !have_root(NAME) || !have_memory_cgroup(NAME) {
        return;
    }
    let Some(server) = ApiServer::start(NAME) else {
        return;
    };
    let rate = env_or("OOM_RATE", 80u64);
    let secs = env_or("OOM_SECONDS", 180u64);
    let attribution = env_or("POD_ATTRIBUTION", true);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(bench(&server, rate, secs, attribution));
}

/// The storm's own account of its children.
struct StormResult {
    forked: u64,
    oom_killed: u64,
    other_exits: u64,
    seconds: f64,
}

fn storm(rate: u64, secs: u64) -> StormResult {
    let cgroup = MemCgroup::new(4);
    let out = Command::new(env!("CARGO_BIN_EXE_npd-test-hog"))
        .args([
            "storm",
            &cgroup.dir.to_string_lossy(),
            &rate.to_string(),
            &secs.to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("running npd-test-hog storm");
    assert!(
        out.status.success(),
        "npd-test-hog storm: {} (signal {:?})",
        out.status,
        out.status.signal()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().expect("the storm's summary line");
    let v: serde_json::Value = serde_json::from_str(line).expect("the storm's JSON summary");
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    StormResult {
        forked: n("forked"),
        oom_killed: n("oom_killed"),
        other_exits: n("other_exits"),
        seconds: v["seconds"].as_f64().unwrap_or(0.0),
    }
}

async fn bench(server: &ApiServer, rate: u64, secs: u64, attribution: bool) {
    server.create_node(NODE).await;
    let kubeconfig = server.service_account_kubeconfig().await;
    let admin = server.admin_client().await;
    let nodes: Api<Node> = Api::all(admin.clone());
    let port = free_port();
    let agent = Agent::start(&[
        "run",
        "--source",
        "ebpf",
        "--kubeconfig",
        kubeconfig.to_str().expect("UTF-8 path"),
        "--hostname-override",
        NODE,
        "--port",
        "0",
        "--prometheus-port",
        &port.to_string(),
        &format!("--pod-attribution={attribution}"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !nodes
        .get(NODE)
        .await
        .is_ok_and(|n| node_condition(&n, "KernelDeadlock").is_some())
    {
        assert!(
            Instant::now() < deadline,
            "the agent did not initialise the Node"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics = SocketAddr::from(([127, 0, 0, 1], port));
    let scrape = |series: &str| {
        http::get(metrics, "/metrics")
            .ok()
            .and_then(|r| sample(&r.body, series))
            .unwrap_or(0.0)
    };
    let counted = || scrape("problem_counter{reason=\"OOMKilling\"}");
    let event_writes = || {
        ["create_event", "patch_event"]
            .iter()
            .map(|call| {
                scrape(&format!(
                    "npd_k8s_api_calls_total{{call=\"{call}\",result=\"success\"}}"
                )) + scrape(&format!(
                    "npd_k8s_api_calls_total{{call=\"{call}\",result=\"failure\"}}"
                ))
            })
            .sum::<f64>()
    };
    let pid = agent.pid();
    let (cpu0, rss0, own0) = (cpu_seconds(pid), status_kib(pid, "VmRSS"), own_kib(pid));
    let (counted0, writes0) = (counted(), event_writes());
    let window = Instant::now();

    let storm = tokio::task::spawn_blocking(move || storm(rate, secs))
        .await
        .expect("the storm");
    // Until everything the kernel reported is counted (or nothing moves for 10 s).
    let (mut last, mut since) = (counted(), Instant::now());
    while since.elapsed() < Duration::from_secs(10) && last - counted0 < storm.oom_killed as f64 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = counted();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    // The last repeats are written within a second of the storm's end.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = cpu_seconds(pid) - cpu0;
    let (rss1, own1) = (status_kib(pid, "VmRSS"), own_kib(pid));
    let npd_counted = counted() - counted0;
    let writes = event_writes() - writes0;
    // Over the whole time writes were counted: the storm, and the drain after it.
    let window = window.elapsed().as_secs_f64();
    let events: Api<Event> = Api::namespaced(admin, "default");
    let lp = ListParams::default().fields(&format!("involvedObject.name={NODE},reason=OOMKilling"));
    let event_count: i64 = events
        .list(&lp)
        .await
        .map(|l| l.items.iter().filter_map(|e| e.count).map(i64::from).sum())
        .unwrap_or(0);
    let stopped = agent.stop();

    let per_min = storm.oom_killed as f64 * 60.0 / storm.seconds.max(1.0);
    let core_pct = cpu / storm.seconds.max(1.0) * 100.0;
    let rss_growth = own1 as i64 - own0 as i64;
    let writes_per_s = writes / window.max(1.0);
    let verdict = |ok: bool| if ok { "met" } else { "NOT MET" };
    println!(
        "\nnpd OOM storm soak: {} kills in {:.0} s ({per_min:.0}/min; {} forked, {} other exits), \
         real agent, real kube-apiserver on loopback, pod attribution {}",
        storm.oom_killed,
        storm.seconds,
        storm.forked,
        storm.other_exits,
        if attribution { "on" } else { "off" }
    );
    println!(
        "{:<44} {:>18} {:>22} {:>8}",
        "figure", "value", "target", ""
    );
    let row = |what: &str, value: String, target: &str, ok: bool| {
        println!("{what:<44} {value:>18} {target:>22} {:>8}", verdict(ok));
    };
    row(
        "kills counted (problem_counter OOMKilling)",
        format!("{npd_counted:.0} / {}", storm.oom_killed),
        "every kill",
        npd_counted as u64 == storm.oom_killed,
    );
    row(
        "kills in the Node's OOMKilling Event count",
        format!("{event_count} / {}", storm.oom_killed),
        "every kill",
        event_count as u64 == storm.oom_killed,
    );
    row(
        "agent CPU over the storm",
        format!("{cpu:.2} s ({core_pct:.2}%)"),
        "< 2% of one core",
        core_pct < 2.0,
    );
    row(
        "agent own RSS, start -> end",
        format!("{} -> {}", mib(own0), mib(own1)),
        "flat within 1 MiB",
        rss_growth.abs() <= 1024,
    );
    row(
        "agent RSS (with the ring buffer)",
        format!("{} -> {}", mib(rss0), mib(rss1)),
        "",
        true,
    );
    row(
        "Event writes (create + patch), one reason",
        format!("{writes:.0} in {window:.0} s ({writes_per_s:.2}/s)"),
        "<= 1/s per reason",
        writes_per_s <= 1.0 + 1e-9,
    );
    assert!(stopped.status.success(), "agent exit: {}", stopped.status);
}
