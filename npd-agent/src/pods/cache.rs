//! The pods of this node, by UID: a kube-rs reflector over a watch of the Pods whose
//! `spec.nodeName` is this node (so it is bounded by the pods on the node, at most 110 by
//! kubelet's default), kept with only what attribution needs (namespace, name, UID, and each
//! container's name and runtime ID). Lookups read the store as it is: the watch never delays
//! a report.

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodStatus};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use prometheus::IntGauge;

use crate::{
    event::{ContainerRef, PodRef},
    logging::{LOG_INTERVAL, LogLimiter},
};

/// Pods a page when the pods are listed (at start, and when a watch cannot resume): 11
/// requests for kubelet's maximum of 110.
const LIST_PAGE: u32 = 10;

static WATCH_ERRORS: LogLimiter = LogLimiter::new(LOG_INTERVAL, 1);
static LISTED: LogLimiter = LogLimiter::new(LOG_INTERVAL, 1);

/// The pods of this node; empty (every pod by its UID only) when no cluster is configured.
#[derive(Clone, Default)]
pub struct PodCache {
    store: Option<reflector::Store<Pod>>,
}

impl PodCache {
    /// Starts watching the pods of `node`, on the current tokio runtime, until the runtime
    /// ends. `pods` is set to the number of pods in the cache. Errors (the API server away,
    /// `pods list, watch` not granted) are logged (rate limited) and retried with backoff;
    /// meanwhile the cache keeps what it had.
    pub fn watch(client: Client, node: &str, pods: IntGauge) -> PodCache {
        let (store, writer) = reflector::store();
        let api: Api<Pod> = Api::all(client);
        // Listed a few pods a page: a page is decoded whole before the cache strips its pods,
        // and the allocator keeps what the largest page needed. Measured with 110 pods
        // (`cargo xtask bench pods`): kube's default of 500 a page cost 5.1 MiB of RSS, 10 a
        // page 1.1 MiB, 4 a page 0.9 MiB (for three times the requests). The lists are
        // quorum reads either way (kube's default `MostRecent`).
        let config = watcher::Config::default()
            .fields(&format!("spec.nodeName={node}"))
            .page_size(LIST_PAGE);
        let reader = store.clone();
        let stream = watcher(api, config)
            .default_backoff()
            .modify(keep_what_attribution_needs)
            .reflect(writer);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(event) => {
                        pods.set(i64::try_from(reader.len()).unwrap_or(i64::MAX));
                        // The list at start (and after a watch that could not resume) is in.
                        if matches!(event, watcher::Event::InitDone)
                            && let Some(held_back) = LISTED.allow()
                        {
                            tracing::info!(
                                pods = reader.len(),
                                held_back,
                                "pod attribution: the pods of this node are in the cache"
                            );
                        }
                    }
                    Err(err) => {
                        if let Some(held_back) = WATCH_ERRORS.allow() {
                            tracing::warn!(
                                held_back,
                                error = %err,
                                "watching this node's pods failed (retrying); problems name \
                                 pods not yet seen by their UID only. npd's ClusterRole must \
                                 grant pods list and watch, or run with --pod-attribution=false"
                            );
                        }
                    }
                }
            }
        });
        PodCache { store: Some(store) }
    }

    /// A cache holding `pods` (as the watch would keep them), for benchmarks and tests.
    pub fn from_pods(pods: impl IntoIterator<Item = Pod>) -> PodCache {
        let mut writer = reflector::store::Writer::<Pod>::new(());
        for mut pod in pods {
            keep_what_attribution_needs(&mut pod);
            writer.apply_watcher_event(&watcher::Event::Apply(pod));
        }
        PodCache {
            store: Some(writer.as_reader()),
        }
    }

    /// The pod with `uid`, and its container with runtime ID `container_id`, named as far as
    /// the cache knows them.
    pub fn lookup(&self, uid: &str, container_id: Option<&str>) -> (PodRef, Option<ContainerRef>) {
        let pod = self
            .store
            .as_ref()
            .and_then(|s| s.find(|p| p.metadata.uid.as_deref() == Some(uid)));
        let container = container_id.map(|id| ContainerRef {
            name: pod
                .as_deref()
                .and_then(|p| p.status.as_ref())
                .and_then(|s| container_name(s, id)),
            id: id.to_owned(),
        });
        let meta = pod.as_deref().map(|p| &p.metadata);
        let pod = PodRef {
            namespace: meta.and_then(|m| m.namespace.clone()),
            name: meta.and_then(|m| m.name.clone()),
            uid: uid.to_owned(),
        };
        (pod, container)
    }
}

/// The name of the container whose runtime ID is `id` (`containerd://<id>`), now or in its
/// last state (a container OOM-killed and already restarted has a new ID).
fn container_name(status: &PodStatus, id: &str) -> Option<String> {
    let statuses = [
        &status.container_statuses,
        &status.init_container_statuses,
        &status.ephemeral_container_statuses,
    ];
    let is = |runtime_id: Option<&String>| {
        runtime_id.is_some_and(|r| r.rsplit_once("://").map_or(r.as_str(), |(_, i)| i) == id)
    };
    statuses
        .into_iter()
        .flatten()
        .flatten()
        .find(|c: &&ContainerStatus| {
            is(c.container_id.as_ref())
                || is(c
                    .last_state
                    .as_ref()
                    .and_then(|s| s.terminated.as_ref())
                    .and_then(|t| t.container_id.as_ref()))
        })
        .map(|c| c.name.clone())
}

/// Drops everything of a Pod that attribution does not read: its spec, labels, annotations,
/// managed fields and conditions. What remains is a few hundred bytes a pod.
fn keep_what_attribution_needs(pod: &mut Pod) {
    pod.spec = None;
    let meta = &mut pod.metadata;
    meta.labels = None;
    meta.annotations = None;
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(status) = &mut pod.status {
        let keep = |statuses: &mut Option<Vec<ContainerStatus>>| {
            for c in statuses.iter_mut().flatten() {
                let terminated = c.last_state.take().and_then(|s| s.terminated).map(|t| {
                    k8s_openapi::api::core::v1::ContainerStateTerminated {
                        container_id: t.container_id,
                        ..Default::default()
                    }
                });
                *c = ContainerStatus {
                    name: std::mem::take(&mut c.name),
                    container_id: c.container_id.take(),
                    last_state: terminated.map(|t| k8s_openapi::api::core::v1::ContainerState {
                        terminated: Some(t),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
            }
        };
        keep(&mut status.container_statuses);
        keep(&mut status.init_container_statuses);
        keep(&mut status.ephemeral_container_statuses);
        *status = PodStatus {
            container_statuses: status.container_statuses.take(),
            init_container_statuses: status.init_container_statuses.take(),
            ephemeral_container_statuses: status.ephemeral_container_statuses.take(),
            ..Default::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated};

    fn status(name: &str, id: &str, last: Option<&str>) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            container_id: Some(format!("containerd://{id}")),
            image: "busybox".into(),
            last_state: last.map(|l| ContainerState {
                terminated: Some(ContainerStateTerminated {
                    container_id: Some(format!("containerd://{l}")),
                    exit_code: 137,
                    reason: Some("OOMKilled".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn containers_by_runtime_id_now_and_before_a_restart() {
        let s = PodStatus {
            container_statuses: Some(vec![
                status("app", "aaa", Some("old")),
                status("side", "bbb", None),
            ]),
            init_container_statuses: Some(vec![status("init", "ccc", None)]),
            ..Default::default()
        };
        assert_eq!(container_name(&s, "aaa").as_deref(), Some("app"));
        assert_eq!(container_name(&s, "old").as_deref(), Some("app"));
        assert_eq!(container_name(&s, "bbb").as_deref(), Some("side"));
        assert_eq!(container_name(&s, "ccc").as_deref(), Some("init"));
        assert_eq!(container_name(&s, "zzz"), None);
    }

    #[test]
    fn the_cache_keeps_only_what_attribution_reads() {
        let mut pod = Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("u".into()),
                labels: Some([("a".to_string(), "b".to_string())].into()),
                annotations: Some([("big".to_string(), "x".repeat(10_000))].into()),
                ..Default::default()
            },
            spec: Some(Default::default()),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                container_statuses: Some(vec![status("app", "aaa", Some("old"))]),
                ..Default::default()
            }),
        };
        keep_what_attribution_needs(&mut pod);
        assert_eq!(
            serde_json::to_value(&pod).unwrap(),
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web", "namespace": "default", "uid": "u"},
                "status": {"containerStatuses": [{
                    "name": "app", "containerID": "containerd://aaa", "image": "",
                    "imageID": "", "ready": false, "restartCount": 0,
                    "lastState": {"terminated": {"containerID": "containerd://old",
                        "exitCode": 0}},
                }]},
            })
        );
        // In the cache: named.
        let cache = PodCache::from_pods([pod]);
        let (p, c) = cache.lookup("u", Some("old"));
        assert_eq!(p.qualified_name().as_deref(), Some("default/web"));
        assert_eq!(c.and_then(|c| c.name).as_deref(), Some("app"));
        assert_eq!(cache.lookup("other", None).0.name, None);
        // Without a cluster: the UID alone.
        let (p, c) = PodCache::default().lookup("u", Some("aaa"));
        assert_eq!(
            (p, c),
            (
                PodRef {
                    uid: "u".into(),
                    ..Default::default()
                },
                Some(ContainerRef {
                    name: None,
                    id: "aaa".into()
                })
            )
        );
    }
}
