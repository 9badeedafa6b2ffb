//! Pod attribution (issue 11) on the real kernel and a real kube-apiserver: a real fault
//! happens to a process in a pod's container cgroup, laid out as kubelet lays it out (cgroupfs
//! and systemd drivers), or on a volume mounted under kubelet's pod directory, and the real
//! `npd-agent` (npd's service account from the shipped RBAC, not admin) names the pod: in its
//! `--kernel-events` JSON line, in the Node Event's message, and with an Event on the Pod
//! itself, in the Pod's namespace. A process outside any pod, a pod the API server no longer
//! has, and `--pod-attribution=false` (run as an account that may not read pods at all) give
//! no Pod Event and name no pod that is not there.
//!
//! The Pods are API objects only (no kubelet, no container runtime): created bound to the
//! test's Node with the status kubelet would report (container `app` running as a containerd
//! id), before the agent starts, so that the agent's first list of its Node's pods has them.
//!
//! Needs root (eBPF, cgroups, loop devices, mounts). Tests run one at a time (`kernel_test`),
//! each with its own Node, namespace and agent on the shared API server; every cgroup, mount,
//! loop device, sysctl, process, Pod and namespace is behind a guard that removes or restores
//! it, also when the test fails.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, ListParams};
use npd_tests::{
    agent::{Agent, is_kernel_event},
    apiserver::{ApiServer, Applied, client_from_kubeconfig},
    faults::{self, HungWriter},
    have_memory_cgroup,
    kernel::{MemCgroup, TempDir},
    kernel_test,
    node::{TestNode, TestPod, block_on},
    unique,
};
use serde_json::{Value, json};

/// How long a test waits for an agent's JSON line.
const WAIT: Duration = Duration::from_secs(30);

fn hog() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_npd-test-hog"))
}

/// kubelet's cgroup drivers: how it names a pod's container cgroup.
#[derive(Clone, Copy, Debug)]
enum Driver {
    /// `kubepods/burstable/pod<uid>/<container-id>`.
    Cgroupfs,
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, _ for ->.slice/
    /// cri-containerd-<container-id>.scope`.
    Systemd,
}

/// The cgroup of `pod`'s container `app` (Burstable QoS) as kubelet and containerd lay it
/// out, relative to the memory controller's root.
fn container_cgroup(driver: Driver, pod: &TestPod) -> PathBuf {
    let (uid, id) = (&pod.uid, &pod.container_id);
    PathBuf::from(match driver {
        Driver::Cgroupfs => format!("kubepods/burstable/pod{uid}/{id}"),
        Driver::Systemd => {
            let uid = uid.replace('-', "_");
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/\
                 cri-containerd-{id}.scope"
            )
        }
    })
}

/// What every test here shares: the API server, a Node of its own and a namespace of its own
/// for its Pods (deleted at the end).
struct Setup {
    server: &'static ApiServer,
    node: TestNode,
    namespace: String,
    _namespace: Applied,
}

/// Runs `test` (root, and a memory cgroup controller when `needs_memory_cgroup`; skipped,
/// or failed in a strict run, without them) against a fresh Node `node_name` and a fresh
/// namespace on the shared API server, then checks that kubelet's Ready condition is
/// unchanged.
fn pod_test(
    test: &str,
    node_name: &str,
    needs_memory_cgroup: bool,
    body: impl AsyncFnOnce(&mut Setup),
) {
    let Some(_serial) = kernel_test(test) else {
        return;
    };
    if needs_memory_cgroup && !have_memory_cgroup(test) {
        return;
    }
    let Some(server) = ApiServer::shared(test) else {
        return;
    };
    block_on(async {
        let namespace = unique("npd-pods");
        let guard = server.apply(
            &namespace,
            &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n"),
        );
        let mut setup = Setup {
            server,
            node: TestNode::new(server, node_name).await,
            namespace,
            _namespace: guard,
        };
        body(&mut setup).await;
        setup.node.assert_ready_unchanged();
    });
}

/// Starts the agent with `--kernel-events` (and `extra`) as the Node's account, once its
/// first write landed and (with attribution on) its pod cache is filled.
async fn start_agent(node: &TestNode, extra: &[&str]) -> Agent {
    let mut args = vec!["--kernel-events"];
    args.extend_from_slice(extra);
    let agent = node.start_agent_with(true, &args).await;
    // The agent's first list of its Node's pods is in (the fault must not race it).
    if !extra.contains(&"--pod-attribution=false") {
        let deadline = std::time::Instant::now() + WAIT;
        while !agent.stderr().contains(CACHE_READY) {
            assert!(
                std::time::Instant::now() < deadline,
                "the agent never said {CACHE_READY:?}:\n{}",
                agent.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    agent
}

/// What the agent logs once its first list of the Node's pods is in its cache.
const CACHE_READY: &str = "the pods of this node are in the cache";

/// Stops the agent; it exits cleanly, and it logged no error and did not panic.
fn stop(agent: Agent) -> String {
    let stopped = agent.stop_cleanly();
    assert!(
        !stopped.stderr.contains(" ERROR ") && !stopped.stderr.contains("panicked"),
        "the agent logged an error:\n{}",
        stopped.stderr
    );
    stopped.stderr
}

/// The start of the message the default rules give an OOM kill of `pid` (the hog).
fn killed(pid: u32) -> String {
    format!("Killed process {pid} (npd-test-hog)")
}

/// The agent's `event` line about the hog `pid` in `pod`'s container `app`: the hog, its
/// cgroup as the kernel names it, the Pod (namespace, name, uid) and the container (name, id).
fn assert_task_line(agent: &Agent, event: &str, pid: u32, cgroup: &MemCgroup, pod: &TestPod) {
    let line = agent.wait_for(WAIT, &format!("{event} of the hog"), |v| {
        is_kernel_event(v, event) && v["pid"] == pid
    });
    assert_eq!(line["comm"], "npd-test-hog", "{line}");
    assert_eq!(line["cgroup"], cgroup.kernel_path().as_str(), "{line}");
    assert_eq!(line["pod"], pod.json(), "{line}");
    assert_eq!(
        line["container"],
        json!({"name": "app", "id": pod.container_id}),
        "{line}"
    );
}

/// A line of the agent about a process outside any pod: no pod keys.
fn assert_no_pod_keys(line: &Value) {
    for key in ["pod", "container", "pods"] {
        assert!(line.get(key).is_none(), "`{key}` in {line}");
    }
}

/// The Events about any Pod, in any namespace, whose message mentions `text`.
async fn pod_events_mentioning(node: &TestNode, text: &str) -> Vec<Event> {
    node.all_pod_events()
        .await
        .into_iter()
        .filter(|e| e.message.as_deref().is_some_and(|m| m.contains(text)))
        .collect()
}

/// Makes sure every Pod Event the agent would post about the faults before now was posted:
/// OOM-kills a hog in `pod`'s container and waits for that kill's Pod Event (the agent
/// reports kernel events in order and posts their Events in order); then [`TestNode::barrier`]
/// for the Node Events.
async fn pod_barrier(node: &TestNode, pod: &TestPod) {
    let cgroup = MemCgroup::at(&container_cgroup(Driver::Cgroupfs, pod), Some(32));
    let pid = faults::oom_kill_in(hog(), &cgroup);
    node.wait_pod_event(pod, "OOMKilling", "the barrier's kill", |m| {
        m.starts_with(&format!("{} ", killed(pid)))
    })
    .await;
    node.barrier().await;
}

/// An OOM kill in Pod `<namespace>/web`'s container `app`, its cgroup named as `driver` names
/// it: the oom_kill line carries the victim's cgroup path, the Pod (namespace, name, uid) and
/// the container (name, containerd id); the Node's OOMKilling Event is NPD's message
/// followed by `; pod <namespace>/web, container app`; and the Pod gets one OOMKilling Event
/// with the same message, in its namespace.
async fn oom_kill_in_a_pod(setup: &mut Setup, driver: Driver) {
    let node = &setup.node;
    let pod = node.create_pod(&setup.namespace, "web").await;
    let agent = start_agent(node, &[]).await;
    let cgroup = MemCgroup::at(&container_cgroup(driver, &pod), Some(32));
    let pid = faults::oom_kill_in(hog(), &cgroup);

    assert_task_line(&agent, "oom_kill", pid, &cgroup, &pod);

    let victim = killed(pid);
    let on_node = node
        .wait_event("OOMKilling", &victim, |m| m.contains(&victim))
        .await;
    let message = on_node.message.clone().unwrap_or_default();
    assert!(message.starts_with(&format!("{victim} ")), "{message}");
    assert!(
        message.ends_with(&format!("; pod {}/web, container app", setup.namespace)),
        "the Node's OOMKilling Event should end with `; pod {}/web, container app`: {message}",
        setup.namespace
    );
    let on_pod = node
        .wait_pod_event(&pod, "OOMKilling", &victim, |m| m.contains(&victim))
        .await;
    assert_eq!(on_pod.message.as_deref(), Some(message.as_str()));
    assert!(message.contains("container app"), "{message}");

    // One kill, one Event on each (the kernel's own text of the kill is the same fault).
    node.barrier().await;
    let about_victim = |events: Vec<Event>| {
        events
            .into_iter()
            .filter(|e| e.message.as_deref().is_some_and(|m| m.contains(&victim)))
            .collect::<Vec<_>>()
    };
    let on_node = about_victim(node.events("OOMKilling").await);
    assert_eq!(on_node.len(), 1, "{on_node:#?}");
    let on_pod = about_victim(node.pod_events(&setup.namespace, "web", "OOMKilling").await);
    assert_eq!(on_pod.len(), 1, "{on_pod:#?}");
    assert_eq!(on_pod[0].count, Some(1), "{on_pod:#?}");
    stop(agent);
}

/// [`oom_kill_in_a_pod`], with kubelet's cgroupfs driver.
#[test]
fn an_oom_kill_in_a_pod_names_the_pod_cgroupfs_driver() {
    pod_test(
        "an_oom_kill_in_a_pod_names_the_pod_cgroupfs_driver",
        "npd-pods-oom-cgroupfs",
        true,
        async |setup| oom_kill_in_a_pod(setup, Driver::Cgroupfs).await,
    );
}

/// An OOM storm in a pod: every kill names the pod, though the kernel prints its `oom-kill:`
/// line (with the victim's memory cgroup) for at most 10 kills in 5 s, and `/proc` is no help
/// (the agent is given an empty `--host-proc`). The cgroup comes from the kernel itself, walked
/// by the eBPF program at `mark_victim` from the victim's task (kernels whose `mark_victim`
/// passes the task: 6.8 and later, as this machine's). Before that program, every kill past
/// the kernel's rate limit named no pod here, and in a real storm each cost a wait on the
/// victim's task lock.
#[test]
fn every_kill_of_an_oom_storm_in_a_pod_names_the_pod() {
    const KILLS: usize = 16;
    pod_test(
        "every_kill_of_an_oom_storm_in_a_pod_names_the_pod",
        "npd-pods-oom-storm",
        true,
        async |setup| {
            let node = &setup.node;
            let pod = node.create_pod(&setup.namespace, "storm").await;
            let no_proc = TempDir::new("npd-no-proc");
            let host_proc = format!("--host-proc={}", no_proc.0.display());
            let agent = start_agent(node, &[&host_proc]).await;
            let cgroup = MemCgroup::at(&container_cgroup(Driver::Systemd, &pod), Some(32));
            // More kills than the kernel's OOM report rate limit lets through in 5 s.
            let pids: Vec<u32> = (0..KILLS)
                .map(|_| faults::oom_kill_in(hog(), &cgroup))
                .collect();
            for pid in pids {
                assert_task_line(&agent, "oom_kill", pid, &cgroup, &pod);
            }
            stop(agent);
        },
    );
}

/// [`oom_kill_in_a_pod`], with kubelet's systemd driver.
#[test]
fn an_oom_kill_in_a_pod_names_the_pod_systemd_driver() {
    pod_test(
        "an_oom_kill_in_a_pod_names_the_pod_systemd_driver",
        "npd-pods-oom-systemd",
        true,
        async |setup| oom_kill_in_a_pod(setup, Driver::Systemd).await,
    );
}

/// A task of Pod `<namespace>/web`'s container stuck in D state (a write to a frozen ext4;
/// the kernel prints nothing, `hung_task_warnings` 0): the hung_task line carries the cgroup,
/// the Pod and the container; the Node's TaskHung Event names the task and ends with `; pod
/// <namespace>/web, container app`, and the Pod gets the same TaskHung Event.
#[test]
fn a_hung_task_in_a_pod_names_the_pod() {
    pod_test(
        "a_hung_task_in_a_pod_names_the_pod",
        "npd-pods-hung",
        true,
        async |setup| {
            let node = &setup.node;
            let pod = node.create_pod(&setup.namespace, "web").await;
            let agent = start_agent(node, &[]).await;
            // Declared before the writer: the writer is thawed and reaped first.
            let cgroup = MemCgroup::at(&container_cgroup(Driver::Cgroupfs, &pod), None);
            let writer = HungWriter::start_in(hog(), "0", Some(&cgroup.dir));
            let pid = writer.pid();

            assert_task_line(&agent, "hung_task", pid, &cgroup, &pod);

            let task = format!("task npd-test-hog:{pid} blocked");
            let on_node = node
                .wait_event("TaskHung", &task, |m| m.contains(&task))
                .await;
            let message = on_node.message.clone().unwrap_or_default();
            assert!(
                message.ends_with(&format!("; pod {}/web, container app", setup.namespace)),
                "the Node's TaskHung Event should end with `; pod {}/web, container app`: \
                 {message}",
                setup.namespace
            );
            let on_pod = node
                .wait_pod_event(&pod, "TaskHung", &task, |m| m.contains(&task))
                .await;
            assert_eq!(on_pod.message.as_deref(), Some(message.as_str()));
            writer.finish();
            stop(agent);
        },
    );
}

/// A failed read of a block device whose ext4 file system is mounted as a CSI volume of Pod
/// `<namespace>/db` (`<kubelet root>/pods/<uid>/volumes/kubernetes.io~csi/pvc-test/mount`,
/// kubelet's root given with `--kubelet-root-dir`): the block_error line lists the Pod in
/// `pods`, the Node's IOError Event names the device and ends with `; pod <namespace>/db`,
/// and the Pod gets the same IOError Event. The process that read (dd) is in no pod: the pod
/// comes from the device's mounts.
#[test]
fn a_block_error_under_a_pod_volume_names_the_pod() {
    pod_test(
        "a_block_error_under_a_pod_volume_names_the_pod",
        "npd-pods-blk",
        false,
        async |setup| {
            let node = &setup.node;
            let pod = node.create_pod(&setup.namespace, "db").await;
            // Declared before the failed read: unmounted before it is removed.
            let kubelet = TempDir::new("npd-kubelet");
            let root = kubelet.0.to_str().expect("UTF-8 path");
            let agent = start_agent(node, &["--kubelet-root-dir", root]).await;
            let volume = kubelet.0.join(format!(
                "pods/{}/volumes/kubernetes.io~csi/pvc-test/mount",
                pod.uid
            ));
            let failed = faults::failed_read_mounted_at(&volume);
            let name = failed.dev.name().to_owned();

            let line = agent.wait_for(WAIT, "block_error on the loop device", |v| {
                is_kernel_event(v, "block_error") && v["device"] == name.as_str()
            });
            assert_eq!(line["pods"], json!([pod.json()]), "{line}");
            assert!(line.get("pod").is_none(), "{line}");

            // `dev loop1 ` or `dev loop1,`, never `dev loop10`.
            let names_device = |m: &str| {
                m.contains(&format!("dev {name} ")) || m.contains(&format!("dev {name},"))
            };
            let on_node = node
                .wait_event("IOError", &format!("naming {name}"), names_device)
                .await;
            let message = on_node.message.clone().unwrap_or_default();
            assert!(
                message.ends_with(&format!("; pod {}/db", setup.namespace)),
                "the Node's IOError Event should end with `; pod {}/db`: {message}",
                setup.namespace
            );
            let on_pod = node
                .wait_pod_event(&pod, "IOError", &format!("naming {name}"), names_device)
                .await;
            assert_eq!(on_pod.message.as_deref(), Some(message.as_str()));
            stop(agent);
        },
    );
}

/// An OOM kill of a process in a cgroup of no pod: its oom_kill line has no `pod`,
/// `container` or `pods` key, the Node's OOMKilling Event names no pod, and no Event about any
/// Pod mentions the victim (checked once a later kill in a real pod got its Pod Event).
#[test]
fn a_process_outside_any_pod_gets_no_pod() {
    pod_test(
        "a_process_outside_any_pod_gets_no_pod",
        "npd-pods-outside",
        true,
        async |setup| {
            let node = &setup.node;
            let pod = node.create_pod(&setup.namespace, "web").await;
            let agent = start_agent(node, &[]).await;
            let pid = faults::oom_kill(hog());

            let line = agent.wait_for(WAIT, "oom_kill of the hog", |v| {
                is_kernel_event(v, "oom_kill") && v["pid"] == pid
            });
            assert_no_pod_keys(&line);
            let victim = killed(pid);
            let on_node = node
                .wait_event("OOMKilling", &victim, |m| m.contains(&victim))
                .await;
            let message = on_node.message.unwrap_or_default();
            assert!(!message.contains("; pod "), "{message}");

            pod_barrier(node, &pod).await;
            let about_victim = pod_events_mentioning(node, &format!("{victim} ")).await;
            assert!(about_victim.is_empty(), "{about_victim:#?}");
            stop(agent);
        },
    );
}

/// An OOM kill in a Pod whose namespace is being deleted (the API server then refuses every
/// new object in it, the Pod's Event included, with 403): the Node's OOMKilling Event still
/// names the pod, the refused Pod Event is dropped and counted (said once in the log), and it
/// never holds up the Node's Events nor makes the agent unhealthy.
#[test]
fn a_pod_event_refused_in_a_terminating_namespace_holds_up_nothing() {
    pod_test(
        "a_pod_event_refused_in_a_terminating_namespace_holds_up_nothing",
        "npd-pods-terminating",
        true,
        async |setup| {
            let node = &setup.node;
            let pod = node.create_pod(&setup.namespace, "web").await;
            let health_port = npd_tests::http::free_port();
            let agent = start_agent(node, &["--port", &health_port.to_string()]).await;
            // No namespace controller here: the namespace stays Terminating, its Pod stays.
            let out =
                setup
                    .server
                    .kubectl(&["delete", "namespace", &setup.namespace, "--wait=false"]);
            assert!(out.status.success(), "{out:?}");
            let cgroup = MemCgroup::at(&container_cgroup(Driver::Cgroupfs, &pod), Some(32));
            let pid = faults::oom_kill_in(hog(), &cgroup);

            let victim = killed(pid);
            let on_node = node
                .wait_event("OOMKilling", &victim, |m| m.contains(&victim))
                .await;
            let message = on_node.message.unwrap_or_default();
            assert!(
                message.ends_with(&format!("; pod {}/web, container app", setup.namespace)),
                "{message}"
            );
            // Later Node Events are posted, and the agent stays healthy.
            node.barrier().await;
            let health = npd_tests::http::get(([127, 0, 0, 1], health_port).into(), "/healthz")
                .expect("GET /healthz");
            assert_eq!(health.status, 200, "{}", health.body);
            assert!(
                pod_events_mentioning(node, &format!("{victim} "))
                    .await
                    .is_empty(),
                "a Pod Event in a namespace being deleted"
            );
            let stderr = stop(agent);
            assert!(stderr.contains("about a pod, refused"), "{stderr}");
        },
    );
}

/// An OOM kill in the container cgroup of a Pod the API server no longer has (deleted before
/// the agent started, so its cache never had it): the oom_kill line names the pod and the
/// container by what the cgroup path says only (`{"uid":..}`, `{"id":..}`), the Node's
/// OOMKilling Event ends with `; pod uid <uid>`, no Pod gets an Event about it, and the agent
/// logs no error.
#[test]
fn a_deleted_pods_oom_kill_names_its_uid_only() {
    pod_test(
        "a_deleted_pods_oom_kill_names_its_uid_only",
        "npd-pods-deleted",
        true,
        async |setup| {
            let node = &setup.node;
            let gone = node.create_pod(&setup.namespace, "gone").await;
            gone.delete(&node.admin).await;
            let pod = node.create_pod(&setup.namespace, "web").await;
            let agent = start_agent(node, &[]).await;
            let cgroup = MemCgroup::at(&container_cgroup(Driver::Cgroupfs, &gone), Some(32));
            let pid = faults::oom_kill_in(hog(), &cgroup);

            let line = agent.wait_for(WAIT, "oom_kill of the hog", |v| {
                is_kernel_event(v, "oom_kill") && v["pid"] == pid
            });
            assert_eq!(line["cgroup"], cgroup.kernel_path().as_str(), "{line}");
            assert_eq!(line["pod"], json!({"uid": gone.uid}), "{line}");
            assert_eq!(
                line["container"],
                json!({"id": gone.container_id}),
                "{line}"
            );
            assert!(line.get("pods").is_none(), "{line}");

            let victim = killed(pid);
            let on_node = node
                .wait_event("OOMKilling", &victim, |m| m.contains(&victim))
                .await;
            let message = on_node.message.unwrap_or_default();
            assert!(
                message.ends_with(&format!("; pod uid {}", gone.uid)),
                "{message}"
            );

            pod_barrier(node, &pod).await;
            let about_victim = pod_events_mentioning(node, &format!("{victim} ")).await;
            assert!(about_victim.is_empty(), "{about_victim:#?}");
            stop(agent);
        },
    );
}

/// npd's access without pods, for service account `ACCOUNT` in kube-system: the rules of the
/// shipped ClusterRole before issue 11 (nodes and events only).
const NO_PODS_RBAC: &str = r#"apiVersion: v1
kind: ServiceAccount
metadata:
  name: ACCOUNT
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: ACCOUNT
rules:
  - apiGroups: [""]
    resources: ["nodes"]
    verbs: ["get"]
  - apiGroups: [""]
    resources: ["nodes/status"]
    verbs: ["patch"]
  - apiGroups: [""]
    resources: ["events"]
    verbs: ["create", "patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: ACCOUNT
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: ACCOUNT
subjects:
  - kind: ServiceAccount
    name: ACCOUNT
    namespace: kube-system
"#;

/// `--pod-attribution=false`, run as a service account that may not read pods (nodes and
/// events only, as before issue 11): an OOM kill in a pod's container cgroup still gives the
/// Node's OOMKilling Event, naming no pod; no Pod gets an Event; the oom_kill line has no pod
/// keys; and the agent says `pod attribution is off` once, and never asked for pods (no
/// error, nothing forbidden).
#[test]
fn pod_attribution_off_needs_no_pod_access_and_names_no_pod() {
    pod_test(
        "pod_attribution_off_needs_no_pod_access_and_names_no_pod",
        "npd-pods-off",
        true,
        async |setup| {
            let account = unique("npd-nopods");
            let _rbac = setup
                .server
                .apply(&account, &NO_PODS_RBAC.replace("ACCOUNT", &account));
            setup.node.kubeconfig = setup
                .server
                .kubeconfig_for(("kube-system", account.as_str()))
                .await;
            let node = &setup.node;
            // The premise: this account may not list pods.
            let as_account = client_from_kubeconfig(&node.kubeconfig).await;
            match Api::<Pod>::all(as_account)
                .list(&ListParams::default())
                .await
            {
                Err(kube::Error::Api(e)) if e.code == 403 => {}
                other => panic!("{account} should not be allowed to list pods: {other:?}"),
            }

            let pod = node.create_pod(&setup.namespace, "web").await;
            let agent = start_agent(node, &["--pod-attribution=false"]).await;
            let cgroup = MemCgroup::at(&container_cgroup(Driver::Cgroupfs, &pod), Some(32));
            let pid = faults::oom_kill_in(hog(), &cgroup);

            let line = agent.wait_for(WAIT, "oom_kill of the hog", |v| {
                is_kernel_event(v, "oom_kill") && v["pid"] == pid
            });
            assert_no_pod_keys(&line);
            let victim = killed(pid);
            let on_node = node
                .wait_event("OOMKilling", &victim, |m| m.contains(&victim))
                .await;
            let message = on_node.message.unwrap_or_default();
            assert!(message.starts_with(&format!("{victim} ")), "{message}");
            assert!(!message.contains("; pod "), "{message}");

            node.barrier().await;
            let on_pod = node
                .pod_events(&setup.namespace, &pod.name, "OOMKilling")
                .await;
            assert!(on_pod.is_empty(), "{on_pod:#?}");
            let about_victim = pod_events_mentioning(node, &format!("{victim} ")).await;
            assert!(about_victim.is_empty(), "{about_victim:#?}");

            let stderr = stop(agent);
            let off = stderr
                .lines()
                .filter(|l| l.contains("pod attribution is off"))
                .count();
            assert_eq!(off, 1, "`pod attribution is off` once:\n{stderr}");
            assert!(!stderr.contains("forbidden"), "{stderr}");
        },
    );
}
