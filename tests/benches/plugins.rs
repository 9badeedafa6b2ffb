//! What NPD's custom plugin monitor costs in npd (needs root: the agent attaches its eBPF
//! programs). Two parts, numbers, not assertions:
//!
//! 1. **Cost.** Two agents side by side for `PLUGIN_SECONDS` (default 600): both load the
//!    repository's `config/kernel-monitor.json`; one also runs a plugin monitor of 10 rules at
//!    NPD's default 30 s interval (a shell script that checks a file and exits 0). Prints each
//!    agent's CPU, its plugins' CPU (reaped children), context switches of all its threads, and
//!    its RSS, with the plugin runs counted by the scripts themselves.
//! 2. **Latency.** One permanent rule at a 1 s interval against a real kube-apiserver: a
//!    script that exits 1 while a trigger file exists and 0 otherwise, and stamps the wall
//!    clock each time its answer changes, just before it exits. The trigger is toggled
//!    `TRIALS` times (default 30); each trial is the time from the stamp to the condition's
//!    new status seen in a watch on the Node. This is the plugin-exit-to-Node path: the wait
//!    for the next invocation is not in it.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    pin::pin,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::core::v1::Node;
use kube::{Api, api::WatchParams};
use npd_tests::{
    agent::Agent,
    apiserver::{ApiServer, repo_root, wait_for_node_condition, watch_for_condition},
    env_or, have_root,
    kernel::TempDir,
    procstat::{children_cpu_seconds, context_switches, cpu_seconds, mib, status_kib},
};

const NAME: &str = "plugin monitor benchmark";
const NODE: &str = "npd-bench-plugins";

fn write_script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}")).expect("writing a plugin script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .expect("making a plugin script executable");
}

fn main() {
    if !have_root(NAME) {
        return;
    }
    cost(env_or("PLUGIN_SECONDS", 600u64));
    let Some(server) = ApiServer::start(NAME) else {
        return;
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(latency(&server, env_or("TRIALS", 30u64).max(5) as usize));
}

struct Sample {
    cpu: f64,
    children: f64,
    switches: u64,
}

fn sample(pid: u32) -> Sample {
    Sample {
        cpu: cpu_seconds(pid),
        children: children_cpu_seconds(pid),
        switches: context_switches(pid),
    }
}

fn cost(seconds: u64) {
    let dir = TempDir::new("npd-bench-plugins");
    let runs = dir.join("runs");
    let script = dir.join("check.sh");
    write_script(
        &script,
        &format!(
            "echo run >> {runs}\n[ -e /proc/self/status ] || {{ echo missing; exit 1; }}\nexit 0\n",
            runs = runs.display()
        ),
    );
    let rules: Vec<_> = (0..10)
        .map(|i| {
            serde_json::json!({
                "type": "permanent",
                "condition": "NpdBenchPlugin",
                "reason": format!("NpdBenchRule{i}"),
                "path": script,
            })
        })
        .collect();
    let monitor = dir.join("plugins.json");
    std::fs::write(
        &monitor,
        serde_json::json!({
            "plugin": "custom",
            "pluginConfig": {"invoke_interval": "30s", "timeout": "5s", "concurrency": 3},
            "source": "npd-bench-plugins",
            "conditions": [{"type": "NpdBenchPlugin", "reason": "NpdBenchFine", "message": "fine"}],
            "rules": rules,
        })
        .to_string(),
    )
    .expect("writing the plugin monitor");
    let kernel = repo_root().join("config/kernel-monitor.json");
    let kernel = kernel.to_str().expect("UTF-8 path");
    let plain = Agent::start(&["run", "--config", kernel]);
    let with = Agent::start(&[
        "run",
        "--config",
        kernel,
        &format!("--config.custom-plugin-monitor={}", monitor.display()),
    ]);
    // Both past their start-up, and the plugins past their first (jittered) round.
    std::thread::sleep(Duration::from_secs(35));
    let runs_before = std::fs::read_to_string(&runs)
        .unwrap_or_default()
        .lines()
        .count();
    let (p0, w0) = (sample(plain.pid()), sample(with.pid()));
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let elapsed = start.elapsed().as_secs_f64();
    let (p1, w1) = (sample(plain.pid()), sample(with.pid()));
    let runs_made = std::fs::read_to_string(&runs)
        .unwrap_or_default()
        .lines()
        .count()
        - runs_before;
    let rss = |a: &Agent| mib(status_kib(a.pid(), "VmRSS"));
    let (plain_rss, with_rss) = (rss(&plain), rss(&with));
    for agent in [plain, with] {
        let stopped = agent.stop();
        assert!(stopped.status.success(), "agent exit: {}", stopped.status);
    }

    println!(
        "\nnpd plugin monitor cost over {elapsed:.0} s: 10 rules at 30 s ({runs_made} runs, \
         counted by the script) beside the same agent without plugin configs"
    );
    println!(
        "{:<22} {:>12} {:>14} {:>12} {:>12} {:>10}",
        "agent", "CPU ms", "plugins CPU ms", "ctx switches", "switches/s", "RSS"
    );
    for (name, a, b, rss) in [
        ("no plugin configs", &p0, &p1, plain_rss),
        ("10 rules @ 30s", &w0, &w1, with_rss),
    ] {
        let switches = b.switches.saturating_sub(a.switches);
        println!(
            "{:<22} {:>12.0} {:>14.0} {:>12} {:>12.2} {:>10}",
            name,
            (b.cpu - a.cpu) * 1e3,
            (b.children - a.children) * 1e3,
            switches,
            switches as f64 / elapsed,
            rss
        );
    }
}

fn unix_nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).expect("after 1970").as_nanos()
}

async fn latency(server: &ApiServer, trials: usize) {
    let dir = TempDir::new("npd-bench-plugin-latency");
    let trigger = dir.join("trigger");
    let stamps = dir.join("stamps");
    let last = dir.join("last");
    let script = dir.join("toggle.sh");
    write_script(
        &script,
        &format!(
            "if [ -e {trigger} ]; then s=1; else s=0; fi\n\
             if [ \"$(cat {last} 2>/dev/null)\" != \"$s\" ]; then\n\
             \techo $s > {last}\n\
             \tdate +%s%N >> {stamps}\n\
             fi\n\
             [ $s = 1 ] && echo triggered\n\
             exit $s\n",
            trigger = trigger.display(),
            last = last.display(),
            stamps = stamps.display(),
        ),
    );
    let monitor = dir.join("toggle.json");
    std::fs::write(
        &monitor,
        serde_json::json!({
            "plugin": "custom",
            "pluginConfig": {"invoke_interval": "1s", "timeout": "5s"},
            "source": "npd-bench-plugin-latency",
            "conditions": [{"type": "NpdPluginLatency", "reason": "NpdPluginIdle", "message": "idle"}],
            "rules": [{"type": "permanent", "condition": "NpdPluginLatency",
                       "reason": "NpdPluginTriggered", "path": script}],
        })
        .to_string(),
    )
    .expect("writing the plugin monitor");
    server.create_node(NODE).await;
    let kubeconfig = server.service_account_kubeconfig().await;
    let nodes: Api<Node> = Api::all(server.admin_client().await);
    let agent = Agent::start(&[
        "run",
        "--config",
        monitor.to_str().expect("UTF-8 path"),
        "--kubeconfig",
        kubeconfig.to_str().expect("UTF-8 path"),
        "--hostname-override",
        NODE,
    ]);
    let rv = wait_for_node_condition(&nodes, NODE, "NpdPluginLatency", "False").await;
    let wp = WatchParams::default()
        .fields(&format!("metadata.name={NODE}"))
        .timeout(290);
    let mut watch = pin!(nodes.watch(&wp, &rv).await.expect("watching the Node"));

    let stamp_count = || {
        std::fs::read_to_string(&stamps)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let mut latencies = Vec::with_capacity(trials);
    for i in 0..trials {
        let before = stamp_count();
        let want = if i % 2 == 0 {
            std::fs::write(&trigger, "").expect("creating the trigger");
            "True"
        } else {
            std::fs::remove_file(&trigger).expect("removing the trigger");
            "False"
        };
        watch_for_condition(&mut watch, "NpdPluginLatency", want).await;
        let seen = SystemTime::now();
        let text = std::fs::read_to_string(&stamps).expect("the plugin's stamps");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), before + 1, "one answer change per trial");
        let stamp: u128 = lines[before].trim().parse().expect("a date +%s%N stamp");
        latencies.push(Duration::from_nanos(
            unix_nanos(seen).saturating_sub(stamp) as u64
        ));
    }
    let stopped = agent.stop();
    assert!(stopped.status.success(), "agent exit: {}", stopped.status);

    latencies.sort();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "\nnpd plugin latency: the plugin's answer changes -> Node condition visible in a watch \
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
