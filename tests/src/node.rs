//! A Node registered on the test kube-apiserver for one test, with npd's service account and
//! an admin client to read it back: its conditions, its Events, kubelet's `Ready` condition.

use std::{
    future::Future,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Event, Node, NodeCondition};
use kube::{Api, Client, api::ListParams};
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
