//! The Kubernetes exporter against a real kube-apiserver: RBAC, conditions, Events,
//! aggregation, kubelet's conditions left alone, restart adoption, API server outage.
//!
//! The exporter is driven directly with `Report`s (no kernel, no root). Tests share one API
//! server (distinct Node names), except the outage test, which stops its own.

use std::{
    future::Future,
    path::Path,
    time::{Duration, SystemTime},
};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Event, Node, NodeCondition, Pod};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, WatchEvent, WatchParams},
};
use npd_agent::{
    exporter::k8s::{ApiCall, K8sConfig, K8sExporter, K8sHandle, K8sStats},
    problem::{
        Condition, ConditionChange, ConditionStatus, ProblemEvent, Report, Severity,
        condition_change_message,
    },
};
use npd_tests::apiserver::{ApiServer, client_from_kubeconfig, node_condition, repo_root};

/// The marker the test webhook rejects (`ApiServer::reject_with_422`).
const REJECTED: &str = "NpdTestReject";

const DEADLINE: Duration = Duration::from_secs(30);
const SOURCE: &str = "kernel-monitor";

fn condition(type_: &str, status: ConditionStatus, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message: message.into(),
        transition_time: SystemTime::now(),
    }
}

/// What the rules engine hands over at start: every owned condition in its default state.
fn defaults() -> Vec<ConditionChange> {
    [
        (
            "KernelDeadlock",
            "KernelHasNoDeadlock",
            "kernel has no deadlock",
        ),
        (
            "ReadonlyFilesystem",
            "FilesystemIsNotReadOnly",
            "Filesystem is not read-only",
        ),
    ]
    .into_iter()
    .map(|(t, r, m)| ConditionChange {
        source: SOURCE.into(),
        condition: condition(t, ConditionStatus::False, r, m),
    })
    .collect()
}

fn change(type_: &str, status: ConditionStatus, reason: &str, message: &str) -> Report {
    Report::Condition(ConditionChange {
        source: SOURCE.into(),
        condition: condition(type_, status, reason, message),
    })
}

const DOCKER_HUNG: &str = "task docker:1234 blocked for more than 120 seconds.";

fn docker_hung(message: &str) -> Report {
    change(
        "KernelDeadlock",
        ConditionStatus::True,
        "DockerHung",
        message,
    )
}

fn problem(reason: &str, message: &str) -> Report {
    Report::Event(ProblemEvent {
        source: SOURCE.into(),
        severity: Severity::Warning,
        reason: reason.into(),
        message: message.into(),
        timestamp: SystemTime::now(),
        fields: serde_json::Map::new(),
        pods: Vec::new(),
    })
}

async fn start_exporter(kubeconfig: &Path, node: &str) -> K8sHandle {
    start_tuned(kubeconfig, node, |_| {}).await
}

/// [`start_exporter`] with its configuration changed by `tune` first.
async fn start_tuned(
    kubeconfig: &Path,
    node: &str,
    tune: impl FnOnce(&mut K8sConfig),
) -> K8sHandle {
    let mut config = K8sConfig::from_kubeconfig(kubeconfig, node)
        .await
        .expect("exporter config");
    tune(&mut config);
    K8sExporter::start(config, defaults()).expect("starting the exporter")
}

/// Polls `check` every 100 ms until it gives a value; panics after [`DEADLINE`].
async fn wait_for<T, F: Future<Output = Option<T>>>(what: &str, mut check: impl FnMut() -> F) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fetch_condition(nodes: &Api<Node>, node: &str, type_: &str) -> Option<NodeCondition> {
    let node = nodes.get(node).await.ok()?;
    node_condition(&node, type_).cloned()
}

/// Waits until the Node has condition `type_` with `status` and `reason`.
async fn wait_condition(
    nodes: &Api<Node>,
    node: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> NodeCondition {
    wait_for(
        &format!("{type_}={status} ({reason}) on {node}"),
        || async {
            fetch_condition(nodes, node, type_)
                .await
                .filter(|c| c.status == status && c.reason.as_deref() == Some(reason))
        },
    )
    .await
}

/// The Events about `node` with `reason` (in namespace `default`).
async fn events(client: &Client, node: &str, reason: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), "default");
    let lp = ListParams::default().fields(&format!("involvedObject.name={node},reason={reason}"));
    api.list(&lp).await.map(|l| l.items).unwrap_or_default()
}

fn ready_json(node: &Node) -> serde_json::Value {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .expect("the Node has a Ready condition");
    serde_json::to_value(ready).unwrap()
}

#[test]
fn shipped_manifests_pass_server_side_dry_run() {
    let Some(server) = ApiServer::shared("shipped_manifests_pass_server_side_dry_run") else {
        return;
    };
    let dir = repo_root().join("deploy/kubernetes");
    let out = server.kubectl(&["apply", "--dry-run=server", "-f", dir.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl apply --dry-run=server -f deploy/kubernetes/ failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for object in [
        "daemonset.apps/npd",
        "clusterrole.rbac.authorization.k8s.io/npd",
        "configmap/npd-config",
    ] {
        assert!(stdout.contains(object), "{object} missing from:\n{stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_role_allows_what_npd_needs_and_nothing_else() {
    let Some(server) = ApiServer::shared("shipped_role_allows_what_npd_needs_and_nothing_else")
    else {
        return;
    };
    let name = "npd-rbac";
    server.create_node(name).await;
    let npd = client_from_kubeconfig(&server.service_account_kubeconfig().await).await;
    let nodes: Api<Node> = Api::all(npd.clone());
    nodes.get(name).await.expect("nodes get is allowed");
    let status =
        serde_json::json!({"status": {"conditions": [{"type": "RbacProbe", "status": "False"}]}});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(&status))
        .await
        .expect("nodes/status patch is allowed");

    let forbidden = |what: &str, result: Result<(), kube::Error>| match result {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what} should be forbidden (403), got {other:?}"),
    };
    let spec = serde_json::json!({"spec": {"unschedulable": true}});
    forbidden(
        "patching the Node itself",
        nodes
            .patch(name, &PatchParams::default(), &Patch::Strategic(&spec))
            .await
            .map(drop),
    );
    forbidden(
        "listing nodes",
        nodes.list(&ListParams::default()).await.map(drop),
    );
    forbidden(
        "deleting the node",
        nodes.delete(name, &Default::default()).await.map(drop),
    );
    // Pod attribution watches pods (list, watch); nothing more of pods, and no secrets.
    let pods: Api<Pod> = Api::all(npd.clone());
    pods.list(&ListParams::default())
        .await
        .expect("pods list is allowed (pod attribution)");
    let in_default: Api<Pod> = Api::namespaced(npd.clone(), "default");
    forbidden("reading a pod", in_default.get("anything").await.map(drop));
    forbidden(
        "deleting a pod",
        in_default
            .delete("anything", &Default::default())
            .await
            .map(drop),
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::all(npd.clone());
    forbidden(
        "listing secrets",
        secrets.list(&ListParams::default()).await.map(drop),
    );
    let events: Api<Event> = Api::namespaced(npd, "default");
    forbidden(
        "listing events",
        events.list(&ListParams::default()).await.map(drop),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_and_events_land_with_the_shipped_role() {
    let Some(server) = ApiServer::shared("conditions_and_events_land_with_the_shipped_role") else {
        return;
    };
    let name = "npd-flow";
    let created = server.create_node(name).await;
    let ready_before = ready_json(&created);
    let admin = server.admin_client().await;
    let nodes: Api<Node> = Api::all(admin.clone());

    // Runs as npd's service account, bound to the shipped ClusterRole: not as admin.
    let exporter = start_exporter(&server.service_account_kubeconfig().await, name).await;

    // Start: every owned condition in its default state.
    wait_condition(
        &nodes,
        name,
        "KernelDeadlock",
        "False",
        "KernelHasNoDeadlock",
    )
    .await;
    wait_condition(
        &nodes,
        name,
        "ReadonlyFilesystem",
        "False",
        "FilesystemIsNotReadOnly",
    )
    .await;

    // A permanent problem: the condition and NPD's condition-change Event.
    let report = docker_hung(DOCKER_HUNG);
    exporter.export(&report);
    let c = wait_condition(&nodes, name, "KernelDeadlock", "True", "DockerHung").await;
    assert_eq!(c.message.as_deref(), Some(DOCKER_HUNG));
    assert!(c.last_heartbeat_time.is_some() && c.last_transition_time.is_some());
    let Report::Condition(dockerhung) = &report else {
        unreachable!()
    };
    let expected_message = condition_change_message(&dockerhung.condition);
    let event = wait_for("the condition-change Event", || async {
        events(&admin, name, "DockerHung")
            .await
            .into_iter()
            .find(|e| e.message.as_deref() == Some(expected_message.as_str()))
    })
    .await;
    assert_eq!(
        expected_message,
        format!(
            "Node condition KernelDeadlock is now: True, reason: DockerHung, message: \"{DOCKER_HUNG}\""
        )
    );
    // As kubelet and NPD reference the Node (uid = its name): what `kubectl describe node`
    // lists.
    let involved = &event.involved_object;
    assert_eq!(involved.kind.as_deref(), Some("Node"));
    assert_eq!(involved.name.as_deref(), Some(name));
    assert_eq!(involved.uid.as_deref(), Some(name));
    assert_eq!(involved.api_version.as_deref(), Some("v1"));
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.metadata.namespace.as_deref(), Some("default"));
    let source = event.source.as_ref().expect("Event source");
    assert_eq!(source.component.as_deref(), Some(SOURCE));
    assert_eq!(source.host.as_deref(), Some(name));
    assert_eq!(event.count, Some(1));

    // A temporary problem: a Warning Event.
    let oops = "BUG: unable to handle kernel NULL pointer dereference at 0000000000000000";
    exporter.export(&problem("KernelOops", oops));
    let event = wait_for("the KernelOops Event", || async {
        events(&admin, name, "KernelOops").await.into_iter().next()
    })
    .await;
    assert_eq!(event.message.as_deref(), Some(oops));
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let described = server.kubectl(&["describe", "node", name]);
    let described = String::from_utf8_lossy(&described.stdout);
    assert!(
        described.contains("KernelOops") && described.contains(oops),
        "`kubectl describe node` does not list the Event:\n{described}"
    );

    // Repeats aggregate into one Event object with a count.
    let hung = "task kworker/0:1:42 blocked for more than 120 seconds.";
    for _ in 0..3 {
        exporter.export(&problem("TaskHung", hung));
    }
    wait_for("one TaskHung Event with count 3", || async {
        let found = events(&admin, name, "TaskHung").await;
        (found.iter().map(|e| e.count.unwrap_or(1)).sum::<i32>() == 3).then_some(())
    })
    .await;
    exporter.export(&problem("TaskHung", hung));
    let event = wait_for("the TaskHung Event with count 4", || async {
        events(&admin, name, "TaskHung")
            .await
            .into_iter()
            .find(|e| e.count == Some(4))
    })
    .await;
    assert_eq!(
        events(&admin, name, "TaskHung").await.len(),
        1,
        "repeats make no new Event"
    );
    assert!(event.last_timestamp >= event.first_timestamp);

    // Recovery: Normal Event, condition back to False.
    exporter.export(&change(
        "KernelDeadlock",
        ConditionStatus::False,
        "KernelHasNoDeadlock",
        "kernel has no deadlock",
    ));
    wait_condition(
        &nodes,
        name,
        "KernelDeadlock",
        "False",
        "KernelHasNoDeadlock",
    )
    .await;
    let recovered = wait_for("the recovery Event", || async {
        events(&admin, name, "KernelHasNoDeadlock")
            .await
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(recovered.type_.as_deref(), Some("Normal"));

    let stats = exporter.shutdown().await;
    assert_eq!(stats.call(ApiCall::PatchNodeStatus).failed, 0, "{stats:?}");
    assert_eq!(stats.call(ApiCall::CreateEvent).failed, 0, "{stats:?}");
    assert_eq!(stats.events_received, 7, "{stats:?}");
    assert_eq!(
        stats.events_created + stats.events_aggregated,
        7,
        "every occurrence is an Event or a count: {stats:?}"
    );
    assert_eq!(stats.events_created, 4, "{stats:?}");

    // kubelet's condition is exactly as it was, and npd wrote as field manager `npd`.
    let after = nodes.get(name).await.unwrap();
    assert_eq!(
        ready_json(&after),
        ready_before,
        "kubelet's Ready condition was touched"
    );
    let managers: Vec<_> = after
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.as_deref())
        .collect();
    assert!(managers.contains(&"npd"), "field managers: {managers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_exporter_adopts_a_true_condition() {
    let Some(server) = ApiServer::shared("a_restarted_exporter_adopts_a_true_condition") else {
        return;
    };
    let name = "npd-restart";
    server.create_node(name).await;
    let kubeconfig = server.service_account_kubeconfig().await;
    let admin = server.admin_client().await;
    let nodes: Api<Node> = Api::all(admin.clone());

    let first = start_exporter(&kubeconfig, name).await;
    first.export(&docker_hung(DOCKER_HUNG));
    wait_condition(&nodes, name, "KernelDeadlock", "True", "DockerHung").await;
    first.shutdown().await;

    // Watch the Node from here on: every version of it must keep KernelDeadlock=True.
    let rv = nodes
        .get(name)
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let wp = WatchParams::default().fields(&format!("metadata.name={name}"));
    let mut watch = nodes
        .watch(&wp, &rv)
        .await
        .expect("watching the Node")
        .boxed();

    let mut second = start_exporter(&kubeconfig, name).await;
    // The engine is handed what was found, to take it over (its recovery starts now).
    let mut adoptions = second.adoptions().expect("adoptions");
    let adopted = tokio::time::timeout(DEADLINE, adoptions.recv())
        .await
        .expect("adoptions in time")
        .expect("the found conditions");
    let deadlock = adopted
        .iter()
        .find(|c| c.type_ == "KernelDeadlock")
        .expect("KernelDeadlock adopted");
    assert_eq!(
        (
            deadlock.status,
            deadlock.reason.as_str(),
            deadlock.message.as_str()
        ),
        (ConditionStatus::True, "DockerHung", DOCKER_HUNG)
    );
    wait_for("the restarted exporter's first write", || async {
        (second.stats().call(ApiCall::PatchNodeStatus).ok >= 1).then_some(())
    })
    .await;
    // A change of our own marks the end of what the exporter wrote.
    let marker = serde_json::json!({"metadata": {"labels": {"npd-test/marker": "done"}}});
    nodes
        .patch(name, &PatchParams::default(), &Patch::Merge(&marker))
        .await
        .unwrap();
    let mut versions = 0;
    loop {
        let next = tokio::time::timeout(DEADLINE, watch.try_next()).await;
        let event = next
            .expect("watch event in time")
            .expect("watch error")
            .expect("watch ended");
        let node = match event {
            WatchEvent::Added(n) | WatchEvent::Modified(n) => n,
            other => panic!("unexpected watch event {other:?}"),
        };
        versions += 1;
        let conditions = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let deadlock = conditions
            .iter()
            .find(|c| c.type_ == "KernelDeadlock")
            .expect("KernelDeadlock");
        assert_eq!(
            (deadlock.status.as_str(), deadlock.reason.as_deref()),
            ("True", Some("DockerHung")),
            "KernelDeadlock flickered in version {versions}"
        );
        if node
            .metadata
            .labels
            .unwrap_or_default()
            .contains_key("npd-test/marker")
        {
            break;
        }
    }
    // The restarted exporter did write (heartbeat of adopted conditions), just not False.
    assert!(second.stats().call(ApiCall::PatchNodeStatus).ok >= 1);
    second.shutdown().await;
    let c = fetch_condition(&nodes, name, "KernelDeadlock")
        .await
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.message.as_deref()),
        ("True", Some(DOCKER_HUNG))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_state_lands_once_when_the_api_server_returns() {
    // Its own API server: this test stops it.
    let Some(server) = ApiServer::start("the_newest_state_lands_once_when_the_api_server_returns")
    else {
        return;
    };
    let name = "npd-outage";
    server.create_node(name).await;
    let kubeconfig = server.service_account_kubeconfig().await;
    let exporter = start_exporter(&kubeconfig, name).await;
    let nodes: Api<Node> = Api::all(server.admin_client().await);
    wait_for("the exporter's first write", || async {
        (exporter.stats().call(ApiCall::PatchNodeStatus).ok >= 1).then_some(())
    })
    .await;
    wait_condition(
        &nodes,
        name,
        "KernelDeadlock",
        "False",
        "KernelHasNoDeadlock",
    )
    .await;
    let before = exporter.stats();

    server.stop_apiserver();
    // Problems while the API server is away; only the newest condition state matters.
    exporter.export(&docker_hung("first"));
    exporter.export(&change(
        "KernelDeadlock",
        ConditionStatus::False,
        "KernelHasNoDeadlock",
        "kernel has no deadlock",
    ));
    exporter.export(&docker_hung(DOCKER_HUNG));
    exporter.export(&problem(
        "KernelOops",
        "BUG: unable to handle kernel paging request",
    ));
    wait_for("a failed write while the API server is down", || async {
        (exporter.stats().call(ApiCall::PatchNodeStatus).failed
            > before.call(ApiCall::PatchNodeStatus).failed)
            .then_some(())
    })
    .await;
    assert!(!exporter.stats().api_available);

    server.start_apiserver();
    let nodes: Api<Node> = Api::all(server.admin_client().await);
    let c = wait_condition(&nodes, name, "KernelDeadlock", "True", "DockerHung").await;
    assert_eq!(
        c.message.as_deref(),
        Some(DOCKER_HUNG),
        "the newest state landed"
    );
    let admin = server.admin_client().await;
    wait_for("the KernelOops Event queued during the outage", || async {
        events(&admin, name, "KernelOops").await.into_iter().next()
    })
    .await;

    let stats = exporter.shutdown().await;
    let writes = stats.call(ApiCall::PatchNodeStatus).ok - before.call(ApiCall::PatchNodeStatus).ok;
    assert_eq!(
        writes, 1,
        "the condition is written once after the outage: {stats:?}"
    );
    assert_eq!(
        stats.events_dropped_queue_full + stats.events_dropped_rejected,
        0,
        "{stats:?}"
    );
    assert_eq!(stats.events_dropped_at_shutdown, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn problems_before_the_api_server_answers_are_kept() {
    let Some(server) = ApiServer::shared("problems_before_the_api_server_answers_are_kept") else {
        return;
    };
    let name = "npd-late-node";
    let kubeconfig = server.service_account_kubeconfig().await;
    // The Node does not exist yet (kubelet has not registered it): the exporter keeps trying.
    let exporter = start_exporter(&kubeconfig, name).await;
    exporter.export(&docker_hung(DOCKER_HUNG));
    wait_for("a failed read of the missing Node", || async {
        (exporter.stats().call(ApiCall::GetNode).failed >= 1).then_some(())
    })
    .await;
    let created = server.create_node(name).await;
    let nodes: Api<Node> = Api::all(server.admin_client().await);
    wait_condition(&nodes, name, "KernelDeadlock", "True", "DockerHung").await;
    wait_condition(
        &nodes,
        name,
        "ReadonlyFilesystem",
        "False",
        "FilesystemIsNotReadOnly",
    )
    .await;
    let admin = server.admin_client().await;
    let event = wait_for("the Event", || async {
        events(&admin, name, "DockerHung").await.into_iter().next()
    })
    .await;
    assert_eq!(
        event.involved_object.uid.as_deref(),
        created.metadata.name.as_deref()
    );
    exporter.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_refresh_every_owned_condition() {
    let Some(server) = ApiServer::shared("heartbeats_refresh_every_owned_condition") else {
        return;
    };
    let name = "npd-heartbeat";
    let created = server.create_node(name).await;
    let kubeconfig = server.service_account_kubeconfig().await;
    let exporter = start_tuned(&kubeconfig, name, |c| {
        c.heartbeat_period = Duration::from_secs(1);
    })
    .await;
    let nodes: Api<Node> = Api::all(server.admin_client().await);
    let first = wait_condition(
        &nodes,
        name,
        "KernelDeadlock",
        "False",
        "KernelHasNoDeadlock",
    )
    .await;
    for type_ in ["KernelDeadlock", "ReadonlyFilesystem"] {
        let later = wait_for(&format!("a newer heartbeat of {type_}"), || async {
            fetch_condition(&nodes, name, type_)
                .await
                .filter(|c| c.last_heartbeat_time > first.last_heartbeat_time)
        })
        .await;
        assert_eq!(later.status, "False");
        if type_ == "KernelDeadlock" {
            assert_eq!(later.last_transition_time, first.last_transition_time);
        }
    }
    exporter.shutdown().await;
    let after = nodes.get(name).await.unwrap();
    assert_eq!(
        ready_json(&after),
        ready_json(&created),
        "kubelet's Ready condition was touched"
    );
}

#[test]
fn configmap_carries_the_default_rule_files() {
    let test = "configmap_carries_the_default_rule_files";
    let config = repo_root().join("config");
    // Every default rule file must be shipped.
    let files: Vec<String> = std::fs::read_dir(&config)
        .expect("config/")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".json"))
        .collect();
    assert!(!files.is_empty(), "no rule files in config/");
    let Some(server) = ApiServer::shared(test) else {
        return;
    };
    let manifest = repo_root().join("deploy/kubernetes/configmap.yaml");
    let out = server.kubectl(&[
        "apply",
        "--dry-run=server",
        "-o",
        "json",
        "-f",
        manifest.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let configmap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for f in &files {
        let shipped: serde_json::Value = serde_json::from_str(
            configmap["data"][f.as_str()]
                .as_str()
                .expect("the file in the ConfigMap"),
        )
        .expect("the ConfigMap's copy is JSON");
        let source: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(config.join(f)).unwrap()).unwrap();
        assert_eq!(
            shipped, source,
            "{f} differs: run deploy/helm/render-manifests.sh"
        );
    }
}

/// Polls the exporter's stats until `pred` holds.
async fn wait_stats(
    exporter: &K8sHandle,
    what: &str,
    pred: impl Fn(&K8sStats) -> bool,
) -> K8sStats {
    wait_for(what, || async {
        let stats = exporter.stats();
        pred(&stats).then_some(stats)
    })
    .await
}

/// Distinct faults of one reason (166 failed blocks, as in a flood) are one Event whose count
/// is their number and whose message is the newest, as Kubernetes aggregates similar Events:
/// none is dropped, and the API server sees a handful of writes, not 166.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_faults_of_one_reason_are_one_event_with_their_count() {
    let Some(server) =
        ApiServer::shared("distinct_faults_of_one_reason_are_one_event_with_their_count")
    else {
        return;
    };
    let name = "npd-io-errors";
    server.create_node(name).await;
    let admin = server.admin_client().await;
    let exporter = start_exporter(&server.service_account_kubeconfig().await, name).await;
    let message =
        |n: u32| format!("Buffer I/O error on dev sdb, logical block {n}, async page read");
    for n in 0..166 {
        exporter.export(&problem("IOError", &message(n)));
    }
    let event = wait_for("one IOError Event with count 166", || async {
        events(&admin, name, "IOError")
            .await
            .into_iter()
            .find(|e| e.count == Some(166))
    })
    .await;
    assert_eq!(events(&admin, name, "IOError").await.len(), 1);
    assert_eq!(
        event.message.as_deref(),
        Some(format!("(combined from similar events): {}", message(165)).as_str())
    );
    let stats = exporter.shutdown().await;
    let writes = stats.call(ApiCall::CreateEvent).ok + stats.call(ApiCall::PatchEvent).ok;
    assert!(
        writes <= 3,
        "166 occurrences of one reason are folded into few writes, not {writes}: {stats:?}"
    );
    assert_eq!(
        stats.events_created + stats.events_aggregated,
        166,
        "{stats:?}"
    );
}

/// A condition the API server refuses (422, here from a validating webhook) is logged, counted
/// and dropped; the other conditions are written all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_condition_is_dropped_and_the_others_land() {
    let Some(server) = ApiServer::start("a_rejected_condition_is_dropped_and_the_others_land")
    else {
        return;
    };
    let name = "npd-rejected-condition";
    server.create_node(name).await;
    let _webhook = server.reject_with_422(REJECTED).await;
    let nodes: Api<Node> = Api::all(server.admin_client().await);
    let exporter = start_exporter(&server.service_account_kubeconfig().await, name).await;
    wait_condition(
        &nodes,
        name,
        "KernelDeadlock",
        "False",
        "KernelHasNoDeadlock",
    )
    .await;
    // Two changes in one write: the server refuses the write, npd finds the refused one.
    exporter.export(&change(
        REJECTED,
        ConditionStatus::True,
        "Refused",
        "refused",
    ));
    exporter.export(&docker_hung(DOCKER_HUNG));
    wait_condition(&nodes, name, "KernelDeadlock", "True", "DockerHung").await;
    let stats = wait_stats(&exporter, "the rejected write counted", |s| {
        s.condition_writes_rejected == 1
    })
    .await;
    assert!(fetch_condition(&nodes, name, REJECTED).await.is_none());
    assert!(
        stats.problem.is_none(),
        "a rejected body is not a health problem: {stats:?}"
    );
    // Later changes still land.
    exporter.export(&change(
        "KernelDeadlock",
        ConditionStatus::False,
        "KernelHasNoDeadlock",
        "kernel has no deadlock",
    ));
    wait_condition(
        &nodes,
        name,
        "KernelDeadlock",
        "False",
        "KernelHasNoDeadlock",
    )
    .await;
    let stats = exporter.shutdown().await;
    assert_eq!(stats.condition_writes_rejected, 1, "{stats:?}");
}

/// An Event the API server refuses (422) is counted as rejected and never retried; the Events
/// after it are posted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_event_is_counted_and_never_retried() {
    let Some(server) = ApiServer::start("a_rejected_event_is_counted_and_never_retried") else {
        return;
    };
    let name = "npd-rejected-event";
    server.create_node(name).await;
    let _webhook = server.reject_with_422(REJECTED).await;
    let admin = server.admin_client().await;
    let exporter = start_exporter(&server.service_account_kubeconfig().await, name).await;
    exporter.export(&problem(REJECTED, "refused"));
    exporter.export(&problem("KernelOops", "BUG: after the refused one"));
    wait_for("the KernelOops Event", || async {
        events(&admin, name, "KernelOops").await.into_iter().next()
    })
    .await;
    let stats = wait_stats(&exporter, "the rejected Event counted", |s| {
        s.events_dropped_rejected == 1
    })
    .await;
    // Given time to retry, it does not: one create of the refused Event, one of the other.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats_later = exporter.shutdown().await;
    assert_eq!(
        stats_later.call(ApiCall::CreateEvent).failed,
        1,
        "{stats:?} then {stats_later:?}"
    );
    assert_eq!(stats_later.events_dropped_rejected, 1);
}

/// A create whose name exists (409: an earlier attempt landed though its answer was lost)
/// updates that Event instead of making another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_exists_is_updated() {
    let Some(server) = ApiServer::shared("an_event_that_exists_is_updated") else {
        return;
    };
    let name = "npd-event-exists";
    server.create_node(name).await;
    let admin = server.admin_client().await;
    // Events are named `<node>.<hex nanoseconds of the first occurrence>`.
    let first = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let event_name = format!(
        "{name}.{:x}",
        first
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let api: Api<Event> = Api::namespaced(admin.clone(), "default");
    let existing: Event = serde_json::from_value(serde_json::json!({
        "metadata": {"name": event_name, "namespace": "default"},
        "involvedObject": {"kind": "Node", "name": name, "uid": name, "apiVersion": "v1"},
        "reason": "KernelOops", "message": "created by an earlier attempt", "type": "Warning",
        "source": {"component": SOURCE, "host": name}, "count": 1,
    }))
    .unwrap();
    api.create(&Default::default(), &existing).await.unwrap();
    let exporter = start_exporter(&server.service_account_kubeconfig().await, name).await;
    let Report::Event(mut oops) = problem("KernelOops", "BUG: the real message") else {
        unreachable!()
    };
    oops.timestamp = first;
    exporter.export(&Report::Event(oops));
    let updated = wait_for("the existing Event updated", || async {
        api.get(&event_name)
            .await
            .ok()
            .filter(|e| e.message.as_deref() == Some("BUG: the real message"))
    })
    .await;
    assert_eq!(updated.count, Some(1));
    assert_eq!(
        events(&admin, name, "KernelOops").await.len(),
        1,
        "no second Event"
    );
    let stats = exporter.shutdown().await;
    assert_eq!(stats.call(ApiCall::CreateEvent).failed, 1, "{stats:?}");
    assert_eq!(stats.call(ApiCall::PatchEvent).ok, 1, "{stats:?}");
    assert_eq!(stats.events_dropped_rejected, 0, "{stats:?}");
}

/// Without its RoleBinding (RBAC not yet propagated at rollout, or removed), npd is unhealthy
/// with a message naming the permission, and retries: once the binding is back, the condition
/// and the Event land. An Event still forbidden after the bounded retry time is counted as
/// rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_writes_are_retried_and_named_in_health() {
    let Some(server) = ApiServer::start("forbidden_writes_are_retried_and_named_in_health") else {
        return;
    };
    let name = "npd-forbidden";
    server.create_node(name).await;
    let kubeconfig = server.service_account_kubeconfig().await;
    let admin = server.admin_client().await;
    let nodes: Api<Node> = Api::all(admin.clone());
    let exporter = start_tuned(&kubeconfig, name, |c| {
        c.retry_forbidden_max = Duration::from_millis(500);
    })
    .await;
    wait_condition(
        &nodes,
        name,
        "KernelDeadlock",
        "False",
        "KernelHasNoDeadlock",
    )
    .await;

    let unbind = server.kubectl(&["delete", "clusterrolebinding", "npd"]);
    assert!(
        unbind.status.success(),
        "{}",
        String::from_utf8_lossy(&unbind.stderr)
    );
    exporter.export(&docker_hung(DOCKER_HUNG));
    let stats = wait_stats(&exporter, "both permissions named as missing", |s| {
        s.problem
            .as_deref()
            .is_some_and(|p| p.contains("nodes/status patch") && p.contains("events create"))
    })
    .await;
    assert!(stats.api_available, "a refusal is an answer: {stats:?}");

    server.apply_rbac();
    let c = wait_condition(&nodes, name, "KernelDeadlock", "True", "DockerHung").await;
    assert_eq!(c.message.as_deref(), Some(DOCKER_HUNG));
    wait_for("the DockerHung Event", || async {
        events(&admin, name, "DockerHung").await.into_iter().next()
    })
    .await;
    wait_stats(&exporter, "health back", |s| s.problem.is_none()).await;
    let stats = exporter.shutdown().await;
    assert_eq!(stats.events_dropped_rejected, 0, "{stats:?}");

    // Forbidden for longer than the Event retry time: counted as rejected.
    let exporter = start_tuned(&kubeconfig, name, |c| {
        c.retry_forbidden_max = Duration::from_millis(200);
        c.event_forbidden_retry_for = Duration::from_secs(1);
    })
    .await;
    let unbind = server.kubectl(&["delete", "clusterrolebinding", "npd"]);
    assert!(unbind.status.success());
    exporter.export(&problem("KernelOops", "BUG: while forbidden"));
    let stats = wait_stats(&exporter, "the forbidden Event counted as rejected", |s| {
        s.events_dropped_rejected == 1
    })
    .await;
    assert!(
        stats.call(ApiCall::CreateEvent).failed >= 2,
        "retried first: {stats:?}"
    );
    server.apply_rbac();
    exporter.shutdown().await;
}

/// The condition path and the Event path are independent: with `nodes/status patch`
/// forbidden, Events still land while the condition waits; with `events create` forbidden,
/// conditions still land while the Event waits. Each lands once its permission is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_condition_path_never_blocks_events_nor_the_reverse() {
    let Some(server) =
        ApiServer::start("a_stuck_condition_path_never_blocks_events_nor_the_reverse")
    else {
        return;
    };
    let name = "npd-independent";
    server.create_node(name).await;
    let kubeconfig = server.service_account_kubeconfig().await;
    let admin = server.admin_client().await;
    let nodes: Api<Node> = Api::all(admin.clone());
    let exporter = start_tuned(&kubeconfig, name, |c| {
        c.retry_forbidden_max = Duration::from_millis(500);
        c.event_forbidden_retry_for = Duration::from_secs(120);
    })
    .await;
    wait_condition(
        &nodes,
        name,
        "KernelDeadlock",
        "False",
        "KernelHasNoDeadlock",
    )
    .await;
    // The shipped ClusterRole's rules: nodes get, nodes/status patch, events create/patch.
    let drop_rule = |index: usize| {
        let out = server.kubectl(&[
            "patch",
            "clusterrole",
            "npd",
            "--type=json",
            &format!(r#"-p=[{{"op":"remove","path":"/rules/{index}"}}]"#),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // Conditions forbidden: the Event lands all the same.
    drop_rule(1);
    exporter.export(&docker_hung(DOCKER_HUNG));
    wait_stats(&exporter, "nodes/status patch named as missing", |s| {
        s.problem
            .as_deref()
            .is_some_and(|p| p.contains("nodes/status patch"))
    })
    .await;
    exporter.export(&problem(
        "KernelOops",
        "BUG: while conditions are forbidden",
    ));
    wait_for(
        "the KernelOops Event while conditions are forbidden",
        || async { events(&admin, name, "KernelOops").await.into_iter().next() },
    )
    .await;
    let c = fetch_condition(&nodes, name, "KernelDeadlock").await;
    assert_eq!(
        c.and_then(|c| c.reason).as_deref(),
        Some("KernelHasNoDeadlock"),
        "the forbidden condition write cannot have landed"
    );
    server.apply_rbac();
    wait_condition(&nodes, name, "KernelDeadlock", "True", "DockerHung").await;

    // Events forbidden: the condition lands all the same.
    drop_rule(2);
    exporter.export(&problem(
        "OOMKilling",
        "Killed process 1234 (while Events are forbidden)",
    ));
    wait_stats(&exporter, "events create named as missing", |s| {
        s.problem
            .as_deref()
            .is_some_and(|p| p.contains("events create"))
    })
    .await;
    exporter.export(&change(
        "ReadonlyFilesystem",
        ConditionStatus::True,
        "FilesystemIsReadOnly",
        "Remounting filesystem read-only",
    ));
    wait_condition(
        &nodes,
        name,
        "ReadonlyFilesystem",
        "True",
        "FilesystemIsReadOnly",
    )
    .await;
    assert!(
        events(&admin, name, "OOMKilling").await.is_empty(),
        "the forbidden Event cannot have landed"
    );
    server.apply_rbac();
    wait_for("the OOMKilling Event once permitted", || async {
        events(&admin, name, "OOMKilling").await.into_iter().next()
    })
    .await;
    let stats = exporter.shutdown().await;
    assert_eq!(stats.events_dropped_rejected, 0, "{stats:?}");
}

/// The Node deleted under a running agent (404): npd is unhealthy saying so, reads the Node
/// again with backoff, and writes every condition, the newest state included, once it is
/// registered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_node_is_read_again_and_written_when_back() {
    let Some(server) = ApiServer::shared("a_deleted_node_is_read_again_and_written_when_back")
    else {
        return;
    };
    let name = "npd-node-gone";
    server.create_node(name).await;
    let nodes: Api<Node> = Api::all(server.admin_client().await);
    let exporter = start_exporter(&server.service_account_kubeconfig().await, name).await;
    wait_condition(
        &nodes,
        name,
        "KernelDeadlock",
        "False",
        "KernelHasNoDeadlock",
    )
    .await;
    nodes.delete(name, &Default::default()).await.unwrap();
    exporter.export(&docker_hung(DOCKER_HUNG));
    wait_stats(&exporter, "the missing Node named in health", |s| {
        s.problem
            .as_deref()
            .is_some_and(|p| p.contains(&format!("Node {name} not found")))
    })
    .await;
    server.create_node(name).await;
    wait_condition(&nodes, name, "KernelDeadlock", "True", "DockerHung").await;
    wait_condition(
        &nodes,
        name,
        "ReadonlyFilesystem",
        "False",
        "FilesystemIsNotReadOnly",
    )
    .await;
    wait_stats(&exporter, "health back", |s| s.problem.is_none()).await;
    exporter.shutdown().await;
}

/// A condition npd wrote whose rule file is gone is removed at start (NPD #1011); ownership
/// comes from the Node's managedFields. kubelet's condition, another writer's, and NPD's own
/// are untouched, whatever their names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_conditions_npd_wrote_are_removed_at_start() {
    let Some(server) = ApiServer::shared("stale_conditions_npd_wrote_are_removed_at_start") else {
        return;
    };
    let name = "npd-stale";
    let created = server.create_node(name).await;
    let nodes: Api<Node> = Api::all(server.admin_client().await);
    let write_as = |manager: &str, type_: &str| {
        let nodes = nodes.clone();
        let params = PatchParams {
            field_manager: Some(manager.into()),
            ..Default::default()
        };
        let status = serde_json::json!({"status": {"conditions": [{
            "type": type_, "status": "True", "reason": "Old", "message": "from an old config",
            "lastHeartbeatTime": "2021-01-02T03:04:05Z", "lastTransitionTime": "2021-01-01T00:00:00Z",
        }]}});
        async move {
            nodes
                .patch_status(name, &params, &Patch::Strategic(&status))
                .await
                .unwrap();
        }
    };
    write_as("npd", "StaleNpd").await;
    write_as("some-other-agent", "OtherWriter").await;
    write_as("node-problem-detector", "FrequentDockerRestart").await;
    let exporter = start_exporter(&server.service_account_kubeconfig().await, name).await;
    wait_for("StaleNpd removed", || async {
        fetch_condition(&nodes, name, "StaleNpd")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    wait_condition(
        &nodes,
        name,
        "KernelDeadlock",
        "False",
        "KernelHasNoDeadlock",
    )
    .await;
    for kept in ["OtherWriter", "FrequentDockerRestart"] {
        let c = fetch_condition(&nodes, name, kept).await;
        assert_eq!(
            c.map(|c| c.status),
            Some("True".to_string()),
            "{kept} touched"
        );
    }
    exporter.shutdown().await;
    assert_eq!(
        ready_json(&nodes.get(name).await.unwrap()),
        ready_json(&created)
    );
}

/// Condition timestamps on the Node are anyone's to set (who may patch nodes/status): npd
/// adopts one from before 1970 and one from the end of year 9999 (beyond what k8s-openapi's
/// time type holds, so a typed client cannot read that Node at all) without failing, and
/// writes them back clamped into what every client reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_condition_timestamps_on_the_node_are_clamped() {
    let Some(server) = ApiServer::shared("hostile_condition_timestamps_on_the_node_are_clamped")
    else {
        return;
    };
    let name = "npd-hostile-times";
    server.create_node(name).await;
    let nodes: Api<Node> = Api::all(server.admin_client().await);
    let status = serde_json::json!({"status": {"conditions": [
        {"type": "KernelDeadlock", "status": "True", "reason": "DockerHung", "message": "m",
         "lastHeartbeatTime": "1900-01-01T00:00:00Z", "lastTransitionTime": "1900-01-01T00:00:00Z"},
        {"type": "ReadonlyFilesystem", "status": "True", "reason": "FilesystemIsReadOnly",
         "message": "m", "lastHeartbeatTime": "9999-12-31T23:59:59Z",
         "lastTransitionTime": "9999-12-31T23:59:59Z"},
    ]}});
    // Written and read back as plain JSON: k8s-openapi's types cannot even hold the second.
    let raw: Api<kube::core::DynamicObject> = Api::all_with(
        server.admin_client().await,
        &kube::core::ApiResource::erase::<Node>(&()),
    );
    raw.patch_status(name, &PatchParams::default(), &Patch::Strategic(&status))
        .await
        .unwrap();
    assert!(
        nodes.get(name).await.is_err(),
        "k8s-openapi refuses such a Node"
    );
    let mut config = K8sConfig::from_kubeconfig(&server.service_account_kubeconfig().await, name)
        .await
        .unwrap();
    config.heartbeat_period = Duration::from_secs(1);
    let exporter = K8sExporter::start(config, defaults()).unwrap();
    // A heartbeat writes both back: npd is alive and wrote them.
    let c = wait_for("KernelDeadlock rewritten with a clamped time", || async {
        fetch_condition(&nodes, name, "KernelDeadlock")
            .await
            .filter(|c| {
                c.last_heartbeat_time
                    .as_ref()
                    .is_some_and(|t| t.0.to_string() != "1900-01-01T00:00:00Z")
            })
    })
    .await;
    assert_eq!(c.status, "True");
    assert_eq!(
        c.last_transition_time.map(|t| t.0.to_string()).as_deref(),
        Some("1970-01-01T00:00:00Z")
    );
    let c = fetch_condition(&nodes, name, "ReadonlyFilesystem")
        .await
        .unwrap();
    assert_eq!(
        c.last_transition_time.map(|t| t.0.to_string()).as_deref(),
        Some("9999-12-30T22:00:00Z")
    );
    let stats = exporter.shutdown().await;
    assert!(
        stats.running || stats.call(ApiCall::PatchNodeStatus).ok >= 1,
        "{stats:?}"
    );
}
