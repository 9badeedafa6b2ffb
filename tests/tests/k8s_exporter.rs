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
    exporter::k8s::{ApiCall, K8sConfig, K8sExporter, K8sHandle},
    problem::{
        Condition, ConditionChange, ConditionStatus, ProblemEvent, Report, Severity,
        condition_change_message,
    },
};
use npd_tests::apiserver::{ApiServer, client_from_kubeconfig, node_condition, repo_root};

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
    })
}

async fn start_exporter(kubeconfig: &Path, node: &str) -> K8sHandle {
    let config = K8sConfig::from_kubeconfig(kubeconfig, node)
        .await
        .expect("exporter config");
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
    let pods: Api<Pod> = Api::all(npd.clone());
    forbidden(
        "listing pods",
        pods.list(&ListParams::default()).await.map(drop),
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
    let node_uid = created.metadata.uid.clone().unwrap();
    let involved = &event.involved_object;
    assert_eq!(involved.kind.as_deref(), Some("Node"));
    assert_eq!(involved.name.as_deref(), Some(name));
    assert_eq!(involved.uid.as_deref(), Some(node_uid.as_str()));
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
    assert_eq!(
        event.involved_object.uid.as_deref(),
        Some(node_uid.as_str())
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

    let second = start_exporter(&kubeconfig, name).await;
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
    assert_eq!(event.involved_object.uid, created.metadata.uid);
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
    let mut config = K8sConfig::from_kubeconfig(&kubeconfig, name).await.unwrap();
    config.heartbeat_period = Duration::from_secs(1);
    let exporter = K8sExporter::start(config, defaults()).unwrap();
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
        assert_eq!(shipped, source, "{f} differs: run deploy/gen-configmap.sh");
    }
}
