//! The image `cargo xtask image` built, run with podman as Kubernetes runs it, against the real
//! test kube-apiserver, with real kernel faults:
//!
//! * as npd's DaemonSet runs it: exactly its securityContext (every capability dropped but the
//!   ones it adds, its seccomp profile, a read-only root, not privileged), its host mounts, its
//!   command line, the rules ConfigMap as files, and in-cluster credentials of npd's service
//!   account: a `/dev/kmsg` line, an OOM kill and a failed block read each reach the API server;
//! * unchanged, with the command and privileges of NPD's own
//!   `deployment/node-problem-detector.yaml` and of the deliveryhero chart's default command:
//!   NPD's README oops line gives the KernelOops Event.
//!
//! Needs root, podman and the image (`NPD_IMAGE`, set by `cargo xtask test`).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Event;
use kube::{Api, api::ListParams};
use npd_tests::{
    apiserver::{ApiServer, repo_root},
    faults, have_memory_cgroup,
    kernel::{Sysctl, TempDir, write_kmsg},
    kernel_test,
    podman::{self, Container, Spec},
    prerequisite, procstat, unique,
};
use serde_json::Value;

/// NPD's own test line for a KernelOops Event.
const KERNEL_OOPS: &str =
    "BUG: unable to handle kernel NULL pointer dereference at 0000000000000000";
const DEADLINE: Duration = Duration::from_secs(30);
const STARTED: &str = "npd-agent started";

fn hog() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_npd-test-hog"))
}

/// The image, or `None` (the test is then skipped, or fails in CI, with the reason).
fn image(test: &str) -> Option<String> {
    match podman::image() {
        Ok(image) => Some(image),
        Err(why) => {
            prerequisite(test, Err(why));
            None
        }
    }
}

/// Runs `test` on a fresh runtime.
fn block_on<F: std::future::Future>(test: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(test)
}

/// The host's tracefs, mounted for the test when it is not (as on a node, where the
/// DaemonSet mounts the host's), and unmounted after it.
struct HostTracefs(bool);

impl HostTracefs {
    fn ensure() -> HostTracefs {
        let dir = Path::new("/sys/kernel/tracing");
        if dir.join("events").is_dir() {
            return HostTracefs(false);
        }
        npd_tests::kernel::run("mount", &["-t", "tracefs", "nodev", "/sys/kernel/tracing"]);
        HostTracefs(true)
    }
}

impl Drop for HostTracefs {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::process::Command::new("umount")
                .arg("/sys/kernel/tracing")
                .status();
        }
    }
}

/// The Events about `node` with `reason`, once one whose message satisfies `pred` is there.
async fn wait_event(
    server: &ApiServer,
    node: &str,
    reason: &str,
    pred: impl Fn(&str) -> bool,
    container: &Container,
) -> Event {
    let events: Api<Event> = Api::namespaced(server.admin_client().await, "default");
    let lp = ListParams::default().fields(&format!("involvedObject.name={node},reason={reason}"));
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(event) = events
            .list(&lp)
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .find(|e| e.message.as_deref().is_some_and(&pred))
        {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "no {reason} Event about {node} within {DEADLINE:?}; the container said:\n{}",
            container.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The pod template of the shipped DaemonSet, as the API server reads it.
fn daemonset_pod(server: &ApiServer) -> Value {
    let manifest = repo_root().join("deploy/kubernetes/daemonset.yaml");
    let out = server.kubectl(&[
        "apply",
        "--dry-run=server",
        "-o",
        "json",
        "-f",
        manifest.to_str().expect("UTF-8 path"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ds: Value = serde_json::from_slice(&out.stdout).expect("the DaemonSet as JSON");
    ds["spec"]["template"]["spec"].clone()
}

/// A directory holding files, as a ConfigMap volume shows them.
fn config_dir(files: &[(&str, PathBuf)]) -> TempDir {
    let dir = TempDir::new("npd-container-config");
    for (name, source) in files {
        std::fs::copy(source, dir.join(name))
            .unwrap_or_else(|e| panic!("copying {}: {e}", source.display()));
    }
    dir
}

/// The default rule files, as the rules ConfigMap carries them.
fn default_rules() -> Vec<(&'static str, PathBuf)> {
    let config = repo_root().join("config");
    [
        "kernel-monitor.json",
        "readonly-monitor.json",
        "kernel-monitor-current.json",
        "structured.json",
    ]
    .into_iter()
    .map(|f| (f, config.join(f)))
    .collect()
}

/// Adds npd's in-cluster service account (mount and environment) to `spec`.
async fn in_cluster(server: &ApiServer, spec: &mut Spec) {
    let (dir, env) = server.in_cluster().await;
    spec.mounts.push((
        dir,
        "/var/run/secrets/kubernetes.io/serviceaccount".into(),
        true,
    ));
    spec.env.extend(env);
}

#[test]
fn the_image_runs_as_the_daemonset_runs_it() {
    const TEST: &str = "the_image_runs_as_the_daemonset_runs_it";
    let Some(_serial) = kernel_test(TEST) else {
        return;
    };
    if !have_memory_cgroup(TEST) {
        return;
    }
    let Some(image) = image(TEST) else { return };
    let Some(server) = ApiServer::shared(TEST) else {
        return;
    };
    let _tracefs = HostTracefs::ensure();
    block_on(async {
        let node = unique("npd-container-ds");
        server.create_node(&node).await;
        let config = config_dir(&default_rules());
        let mut spec = Spec::from_pod(&daemonset_pod(server), &config.0, &node);
        assert!(
            !spec.privileged && spec.drop_all && spec.read_only,
            "the DaemonSet is meant to run unprivileged, every capability dropped but those \
             added, read-only: {spec:?}"
        );
        in_cluster(server, &mut spec).await;
        let container = Container::run(&image, &spec);
        container.wait_log(STARTED, DEADLINE);
        let logs = container.logs();
        assert!(logs.contains("source=\"ebpf\""), "{logs}");
        // With the DaemonSet's capabilities and its /sys/kernel/btf mount, OOM victims'
        // memory cgroups are walked in the kernel (this kernel's mark_victim passes the task).
        assert!(
            !logs.contains("OOM victims' memory cgroups are read from"),
            "the victim_cgroup program is not attached in the container: {logs}"
        );
        let pid = container.pid();
        let idle_kib = procstat::status_kib(pid, "VmRSS");

        // A /dev/kmsg line.
        let marker = unique("npd-oops");
        write_kmsg(&format!("{KERNEL_OOPS} {marker}"));
        wait_event(
            server,
            &node,
            "KernelOops",
            |m| m.contains(&marker),
            &container,
        )
        .await;
        // A real OOM kill.
        let victim = faults::oom_kill(&hog());
        let oom = wait_event(
            server,
            &node,
            "OOMKilling",
            |m| m.contains(&format!("Killed process {victim} ")),
            &container,
        )
        .await;
        assert_eq!(oom.type_.as_deref(), Some("Warning"));
        // A real failed block read.
        let failed = faults::failed_read();
        wait_event(
            server,
            &node,
            "IOError",
            |m| m.contains(failed.dev.name()),
            &container,
        )
        .await;
        let faults_kib = procstat::status_kib(pid, "VmRSS");
        // A 100k-line flood of kernel noise, then one more oops line: the flood went through.
        {
            let _devkmsg = Sysctl::set("kernel/printk_devkmsg", "on");
            let mut kmsg = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/kmsg")
                .expect("opening /dev/kmsg");
            for i in 0..100_000 {
                writeln!(kmsg, "npd container flood: eth0: link is up {i}")
                    .expect("writing /dev/kmsg");
            }
        }
        let marker = unique("npd-after-flood");
        write_kmsg(&format!("{KERNEL_OOPS} {marker}"));
        wait_event(
            server,
            &node,
            "KernelOops",
            |m| m.contains(&marker),
            &container,
        )
        .await;
        println!(
            "container RSS: {} idle, {} after the faults, {} after a 100k-line flood (peak {})",
            procstat::mib(idle_kib),
            procstat::mib(faults_kib),
            procstat::mib(procstat::status_kib(pid, "VmRSS")),
            procstat::mib(procstat::status_kib(pid, "VmHWM"))
        );
        assert_eq!(
            container.stop(Duration::from_secs(10)),
            0,
            "{}",
            container.logs()
        );
    });
}

/// Runs `spec` (privileged, as NPD runs) with in-cluster credentials and checks that NPD's
/// README oops line gives the KernelOops Event.
fn npd_command_gives_kernel_oops(test: &str, mut spec: Spec) {
    let Some(_serial) = kernel_test(test) else {
        return;
    };
    let Some(image) = image(test) else { return };
    let Some(server) = ApiServer::shared(test) else {
        return;
    };
    block_on(async {
        let node = unique("npd-container-npd");
        server.create_node(&node).await;
        spec.env.push(("NODE_NAME".into(), node.clone()));
        in_cluster(server, &mut spec).await;
        let container = Container::run(&image, &spec);
        container.wait_log(STARTED, DEADLINE);
        let marker = unique("npd-oops");
        write_kmsg(&format!("{KERNEL_OOPS} {marker}"));
        wait_event(
            server,
            &node,
            "KernelOops",
            |m| m.contains(&marker),
            &container,
        )
        .await;
        let logs = container.logs();
        assert!(
            logs.contains("docker-monitor.json") && logs.contains("journald"),
            "NPD's journald monitor is named, not run:\n{logs}"
        );
        assert_eq!(
            container.stop(Duration::from_secs(10)),
            0,
            "{}",
            container.logs()
        );
    });
}

/// NPD's privileged container with its host mounts.
fn npd_privileged() -> Spec {
    Spec {
        privileged: true,
        mounts: vec![
            ("/var/log".into(), "/var/log".into(), true),
            ("/dev/kmsg".into(), "/dev/kmsg".into(), true),
            ("/etc/localtime".into(), "/etc/localtime".into(), true),
        ],
        ..Spec::default()
    }
}

/// NPD's `deployment/node-problem-detector.yaml`, unchanged: its command, privileged, its
/// mounts, and its ConfigMap (NPD's `kernel-monitor.json` and `docker-monitor.json`) at
/// `/config`.
#[test]
fn npds_own_manifest_runs_the_image_unchanged() {
    let config = config_dir(&[
        (
            "kernel-monitor.json",
            repo_root().join("config/kernel-monitor.json"),
        ),
        (
            "docker-monitor.json",
            repo_root().join("deploy/image/config/docker-monitor.json"),
        ),
    ]);
    let mut spec = npd_privileged();
    spec.command = [
        "/node-problem-detector",
        "--logtostderr",
        "--config.system-log-monitor=/config/kernel-monitor.json,/config/docker-monitor.json",
    ]
    .map(str::to_owned)
    .to_vec();
    spec.mounts.push((config.0.clone(), "/config".into(), true));
    npd_command_gives_kernel_oops("npds_own_manifest_runs_the_image_unchanged", spec);
}

/// The deliveryhero node-problem-detector chart's default command, unchanged: through
/// `/bin/sh`, with the image's own `/config`.
#[test]
fn the_deliveryhero_charts_command_runs_the_image_unchanged() {
    let mut spec = npd_privileged();
    spec.command = [
        "/bin/sh",
        "-c",
        "exec /node-problem-detector --logtostderr \
         --config.system-log-monitor=/config/kernel-monitor.json,/config/docker-monitor.json \
         --prometheus-address=0.0.0.0 --prometheus-port=20257 \
         --k8s-exporter-heartbeat-period=5m0s",
    ]
    .map(str::to_owned)
    .to_vec();
    npd_command_gives_kernel_oops(
        "the_deliveryhero_charts_command_runs_the_image_unchanged",
        spec,
    );
}
