//! A Node registered on the test kube-apiserver for one test, with npd's service account and
//! an admin client to read it back: its conditions, its Events, kubelet's `Ready` condition;
//! and Pods bound to it as kubelet reports them running ([`TestPod`]), with their Events.

use std::{
    future::Future,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Event, Node, NodeCondition, Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::Value;

use crate::{
    agent::Agent,
    apiserver::{ApiServer, node_condition},
    kernel::write_kmsg,
    unique,
};

/// How long a test waits for the API server to show something.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// The source of every rule in the embedded defaults (NPD's kernel monitor).
pub const KERNEL_MONITOR: &str = "kernel-monitor";

/// Runs `test` on a fresh two-thread runtime (the tests hold the `serial` lock, a std mutex,
/// outside of it).
pub fn block_on<F: Future>(test: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(test)
}

/// Polls `check` every 100 ms until it gives a value; panics after `timeout`.
pub async fn wait_for<T, F: Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out ({timeout:?}) waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Node registered for one test, with npd's service account kubeconfig and admin access.
pub struct TestNode {
    pub name: String,
    pub kubeconfig: PathBuf,
    pub admin: Client,
    pub nodes: Api<Node>,
    /// kubelet's `Ready` condition as the API server returned it right after creation.
    pub ready: Value,
    pub server_kubeconfig: PathBuf,
}

impl TestNode {
    pub async fn new(server: &ApiServer, name: &str) -> TestNode {
        server.create_node(name).await;
        let kubeconfig = server.service_account_kubeconfig().await;
        let admin = server.admin_client().await;
        let mut test = TestNode {
            name: name.to_owned(),
            kubeconfig,
            nodes: Api::all(admin.clone()),
            admin,
            ready: Value::Null,
            server_kubeconfig: server.kubeconfig.clone(),
        };
        test.ready = test.ready_json();
        test
    }

    /// The admin client again (after an API server restart).
    pub async fn reconnect(&mut self, server: &ApiServer) {
        self.admin = server.admin_client().await;
        self.nodes = Api::all(self.admin.clone());
    }

    /// Starts the real agent (eBPF source, default rules) exporting to this Node as npd's
    /// service account, and waits for its first write (npd's conditions in their default
    /// state) unless `wait_first_write` is false.
    pub async fn start_agent(&self, wait_first_write: bool) -> Agent {
        self.start_agent_with(wait_first_write, &[]).await
    }

    /// [`TestNode::start_agent`] with more arguments (`--config ...`).
    pub async fn start_agent_with(&self, wait_first_write: bool, extra: &[&str]) -> Agent {
        let mut args = vec![
            "run",
            "--source",
            "ebpf",
            "--kubeconfig",
            self.kubeconfig.to_str().expect("UTF-8 path"),
            "--hostname-override",
            &self.name,
        ];
        args.extend_from_slice(extra);
        let agent = Agent::start(&args);
        if wait_first_write {
            self.wait_condition("KernelDeadlock", "False", "KernelHasNoDeadlock")
                .await;
        }
        agent
    }

    pub async fn get(&self) -> Option<Node> {
        self.nodes.get(&self.name).await.ok()
    }

    /// Waits until the Node has condition `type_` with `status` and `reason`.
    pub async fn wait_condition(&self, type_: &str, status: &str, reason: &str) -> NodeCondition {
        let what = format!("{type_}={status} ({reason}) on {}", self.name);
        wait_for(&what, DEADLINE, || async {
            let node = self.get().await?;
            node_condition(&node, type_)
                .filter(|c| c.status == status && c.reason.as_deref() == Some(reason))
                .cloned()
        })
        .await
    }

    /// The Events about this Node with `reason`, in namespace `default` (where NPD posts).
    pub async fn events(&self, reason: &str) -> Vec<Event> {
        let api: Api<Event> = Api::namespaced(self.admin.clone(), "default");
        let lp = ListParams::default().fields(&format!(
            "involvedObject.name={},reason={reason}",
            self.name
        ));
        api.list(&lp).await.map(|l| l.items).unwrap_or_default()
    }

    /// Waits for an Event with `reason` whose message satisfies `pred`, and checks that it is
    /// about this Node, from the kernel monitor.
    pub async fn wait_event(&self, reason: &str, what: &str, pred: impl Fn(&str) -> bool) -> Event {
        self.wait_event_from(KERNEL_MONITOR, reason, what, pred)
            .await
    }

    /// Waits for an Event with `reason` whose message satisfies `pred`, and checks that it is
    /// about this Node, from `source`.
    pub async fn wait_event_from(
        &self,
        source: &str,
        reason: &str,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Event {
        let event = wait_for(
            &format!("a {reason} Event ({what}) on {}", self.name),
            DEADLINE,
            || async {
                self.events(reason)
                    .await
                    .into_iter()
                    .find(|e| e.message.as_deref().is_some_and(&pred))
            },
        )
        .await;
        let about = &event.involved_object;
        assert_eq!(about.kind.as_deref(), Some("Node"), "{event:?}");
        assert_eq!(about.name.as_deref(), Some(self.name.as_str()), "{event:?}");
        // As kubelet and NPD reference a Node: what `kubectl describe node` lists.
        assert_eq!(about.uid.as_deref(), Some(self.name.as_str()), "{event:?}");
        let from = event.source.as_ref().expect("an Event source");
        assert_eq!(from.component.as_deref(), Some(source), "{event:?}");
        assert_eq!(from.host.as_deref(), Some(self.name.as_str()), "{event:?}");
        event
    }

    /// Makes sure everything the agent reported before now has been posted: writes a unique
    /// KernelOops line and waits for its Event (the agent handles kernel messages in order and
    /// posts Events in order).
    pub async fn barrier(&self) {
        let marker = unique("npd-barrier");
        write_kmsg(&format!(
            "BUG: unable to handle kernel NULL pointer dereference at {marker}"
        ));
        self.wait_event("KernelOops", "the barrier", |m| m.contains(&marker))
            .await;
    }

    /// Creates Pod `namespace/name` bound to this Node (`spec.nodeName`) with one container,
    /// `app`, and gives it the status kubelet reports for it once it runs: phase `Running`,
    /// and `app` running as containerd container [`TestPod::container_id`] (a fresh id).
    /// The Pod is deleted when the returned value is dropped.
    pub async fn create_pod(&self, namespace: &str, name: &str) -> TestPod {
        let pods: Api<Pod> = Api::namespaced(self.admin.clone(), namespace);
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "namespace": namespace },
            "spec": {
                "nodeName": self.name,
                "containers": [{ "name": "app", "image": "registry.example/npd-test:1" }],
            },
        }))
        .expect("a Pod");
        let created = pods
            .create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("creating Pod {namespace}/{name}: {e}"));
        // Guarded from here on: deleted even if setting its status fails.
        let test_pod = TestPod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: created.metadata.uid.clone().expect("a Pod uid"),
            container_id: container_id(name),
            admin_kubeconfig: self.server_kubeconfig.clone(),
        };
        let status = serde_json::json!({ "status": {
            "phase": "Running",
            "containerStatuses": [{
                "name": "app",
                "containerID": format!("containerd://{}", test_pod.container_id),
                "image": "registry.example/npd-test:1",
                "imageID": "",
                "ready": true,
                "restartCount": 0,
                "started": true,
                "state": { "running": { "startedAt": "2024-01-01T00:00:00Z" } },
            }],
        }});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|e| panic!("setting the status of Pod {namespace}/{name}: {e}"));
        test_pod
    }

    /// The Events with `reason` about Pod `name` in `namespace`.
    pub async fn pod_events(&self, namespace: &str, name: &str, reason: &str) -> Vec<Event> {
        let api: Api<Event> = Api::namespaced(self.admin.clone(), namespace);
        let lp = ListParams::default().fields(&format!(
            "involvedObject.kind=Pod,involvedObject.name={name},reason={reason}"
        ));
        api.list(&lp).await.map(|l| l.items).unwrap_or_default()
    }

    /// Every Event about a Pod, in every namespace.
    pub async fn all_pod_events(&self) -> Vec<Event> {
        let api: Api<Event> = Api::all(self.admin.clone());
        let lp = ListParams::default().fields("involvedObject.kind=Pod");
        api.list(&lp)
            .await
            .map(|l| l.items)
            .unwrap_or_else(|e| panic!("listing the Events about Pods: {e}"))
    }

    /// Waits for an Event with `reason` about `pod` whose message satisfies `pred`, and checks
    /// that it is a Warning in the Pod's namespace, references the Pod as kubelet does
    /// (`v1`, kind, namespace, name, uid), and comes from the kernel monitor on this Node.
    pub async fn wait_pod_event(
        &self,
        pod: &TestPod,
        reason: &str,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Event {
        let event = wait_for(
            &format!(
                "a {reason} Event ({what}) on Pod {}/{}",
                pod.namespace, pod.name
            ),
            DEADLINE,
            || async {
                self.pod_events(&pod.namespace, &pod.name, reason)
                    .await
                    .into_iter()
                    .find(|e| e.message.as_deref().is_some_and(&pred))
            },
        )
        .await;
        assert_eq!(
            event.metadata.namespace.as_deref(),
            Some(pod.namespace.as_str()),
            "{event:?}"
        );
        let about = &event.involved_object;
        assert_eq!(about.api_version.as_deref(), Some("v1"), "{event:?}");
        assert_eq!(about.kind.as_deref(), Some("Pod"), "{event:?}");
        assert_eq!(
            about.namespace.as_deref(),
            Some(pod.namespace.as_str()),
            "{event:?}"
        );
        assert_eq!(about.name.as_deref(), Some(pod.name.as_str()), "{event:?}");
        assert_eq!(about.uid.as_deref(), Some(pod.uid.as_str()), "{event:?}");
        assert_eq!(event.type_.as_deref(), Some("Warning"), "{event:?}");
        let from = event.source.as_ref().expect("an Event source");
        assert_eq!(from.component.as_deref(), Some(KERNEL_MONITOR), "{event:?}");
        assert_eq!(from.host.as_deref(), Some(self.name.as_str()), "{event:?}");
        event
    }

    /// kubelet's `Ready` condition exactly as the API server serves it (all fields, as JSON).
    pub fn ready_json(&self) -> Value {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.server_kubeconfig)
            .args(["get", "node", &self.name, "-o", "json"])
            .output()
            .expect("running kubectl");
        assert!(
            out.status.success(),
            "kubectl get node {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let node: Value = serde_json::from_slice(&out.stdout).expect("a Node as JSON");
        node["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .cloned()
            .unwrap_or_else(|| panic!("no Ready condition on {}: {node}", self.name))
    }

    /// kubelet's condition is what it was when the Node was created, to the byte.
    pub fn assert_ready_unchanged(&self) {
        let now = self.ready_json();
        assert_eq!(
            now.to_string(),
            self.ready.to_string(),
            "kubelet's Ready condition on {} changed",
            self.name
        );
    }
}

/// A Pod bound to a [`TestNode`] ([`TestNode::create_pod`]), deleted (grace period 0, as
/// kubelet confirms a deletion) on drop unless [`TestPod::delete`] did it already.
pub struct TestPod {
    pub namespace: String,
    pub name: String,
    /// The uid the API server gave it.
    pub uid: String,
    /// The containerd id of its container `app` (64 lowercase hex digits).
    pub container_id: String,
    admin_kubeconfig: PathBuf,
}

impl TestPod {
    /// `{"namespace":..,"name":..,"uid":..}`: the Pod as the agent names it.
    pub fn json(&self) -> Value {
        serde_json::json!({ "namespace": self.namespace, "name": self.name, "uid": self.uid })
    }

    /// Deletes it (grace period 0: there is no kubelet to confirm a graceful deletion) and
    /// waits until the API server no longer has it.
    pub async fn delete(&self, admin: &Client) {
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &self.namespace);
        pods.delete(&self.name, &DeleteParams::default().grace_period(0))
            .await
            .unwrap_or_else(|e| panic!("deleting Pod {}/{}: {e}", self.namespace, self.name));
        wait_for(
            &format!("Pod {}/{} to be gone", self.namespace, self.name),
            DEADLINE,
            || async {
                match pods.get(&self.name).await {
                    Err(kube::Error::Api(e)) if e.code == 404 => Some(()),
                    _ => None,
                }
            },
        )
        .await;
    }
}

impl Drop for TestPod {
    fn drop(&mut self) {
        let _ = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.admin_kubeconfig)
            .args([
                "delete",
                "pod",
                "--namespace",
                &self.namespace,
                &self.name,
                "--grace-period=0",
                "--force",
                "--ignore-not-found",
                "--wait=false",
            ])
            .output();
    }
}

/// A fresh container id as containerd makes them: 64 lowercase hex digits.
pub fn container_id(seed: &str) -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let seed = unique(seed);
    (0..4)
        .map(|i| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write(seed.as_bytes());
            h.write_u32(i);
            format!("{:016x}", h.finish())
        })
        .collect()
}
