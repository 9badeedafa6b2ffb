//! The Event task: posts core/v1 Events about the Node (and about the pods problems happened
//! in, in their namespaces), and updates the one already posted for the repeats of its reason.
//! See the parent module for the error classes.

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    core::{ApiResource, DynamicObject},
};
use tokio::time::Instant;

use crate::logging::{LOG_INTERVAL, LogLimiter};

use super::{
    ApiCall, CallError, Caller, ErrorClass, FIELD_MANAGER, k8s_time,
    state::{EventKey, PendingEvent, PostedEvents},
};

/// The `problems` key of this task.
const TASK: &str = "events";

static REJECTED: LogLimiter = LogLimiter::new(LOG_INTERVAL, 10);

pub(super) struct EventWriter {
    caller: Caller,
    client: Client,
    resource: ApiResource,
    /// Events in the Events' namespace (`--event-namespace`), about the Node.
    events: Api<DynamicObject>,
    posted: PostedEvents,
    /// For unique, increasing Event names.
    last_event_nanos: u128,
    /// Since when Events have been refused as forbidden (401/403), if they are.
    forbidden_since: Option<Instant>,
}

impl EventWriter {
    pub(super) fn new(caller: Caller, client: Client, resource: ApiResource) -> Self {
        let events =
            Api::namespaced_with(client.clone(), &caller.config.event_namespace, &resource);
        EventWriter {
            posted: PostedEvents::new(caller.config.event_aggregation_window),
            caller,
            client,
            resource,
            events,
            last_event_nanos: 0,
            forbidden_since: None,
        }
    }

    pub(super) async fn run(mut self) {
        loop {
            let min_interval = self.caller.config.event_min_interval;
            // Shutting down: what waits only for its interval is written now.
            let shutting_down = self.caller.deadline.is_some();
            let next = {
                let posted = &self.posted;
                self.caller
                    .shared
                    .lock()
                    .events
                    .pop_ready(Instant::now(), |k| {
                        (!shutting_down)
                            .then(|| posted.ready_at(k, min_interval))
                            .flatten()
                    })
            };
            let mut event = match next {
                Ok(event) => event,
                Err(_) if shutting_down => break,
                Err(ready_at) => {
                    self.wait(ready_at).await;
                    continue;
                }
            };
            if self.caller.past_deadline() {
                self.caller.shared.lock().events.requeue(event);
                break;
            }
            match self.post(&mut event).await {
                Ok(()) => {
                    self.caller.succeeded();
                    self.forbidden_since = None;
                    self.caller.shared.set_problem(TASK, None);
                }
                Err(err) => self.on_error(event, &err).await,
            }
        }
        let dropped = self.caller.shared.lock().events.clear();
        self.caller
            .shared
            .counters
            .events_dropped_at_shutdown
            .inc_by(dropped);
        if dropped == 0 {
            tracing::info!("Kubernetes Event writer stopped; every Event written");
        } else {
            tracing::warn!(
                events = dropped,
                "Kubernetes Event writer stopped before writing these Events"
            );
        }
    }

    /// Waits for a new Event, for the next one to be ready, or for shutdown.
    async fn wait(&mut self, ready_at: Option<Instant>) {
        let sleep = async {
            match ready_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let stop = tokio::select! {
            _ = self.caller.shared.events_queued.notified() => false,
            () = sleep => false,
            _ = self.caller.shutdown.wait_for(|stop| *stop) => true,
        };
        if stop {
            self.caller.start_deadline();
        }
    }

    async fn on_error(&mut self, event: PendingEvent, err: &CallError) {
        match err.class() {
            // An Event about a pod is refused for reasons of its namespace (being deleted: 403;
            // gone: 404), not of npd's access: dropped and counted, never held in line before
            // the Node's Events, and never a reason to be unhealthy.
            ErrorClass::Forbidden | ErrorClass::NotFound if event.key.pod.is_some() => {
                self.rejected(&event, err, "about a pod, refused; dropped (not retried)");
            }
            ErrorClass::Transient => {
                self.caller.shared.lock().events.requeue(event);
                self.caller.failed("posting an Event", err).await;
            }
            ErrorClass::Forbidden => {
                let since = *self.forbidden_since.get_or_insert_with(Instant::now);
                let limit = self.caller.config.event_forbidden_retry_for;
                if since.elapsed() < limit {
                    self.caller.shared.set_problem(
                        TASK,
                        Some(format!(
                            "forbidden to write Events in namespace {} ({err}): npd's \
                             ClusterRole must grant events create and patch",
                            self.caller.config.event_namespace
                        )),
                    );
                    self.caller.shared.lock().events.requeue(event);
                    self.caller.failed("posting an Event", err).await;
                } else {
                    let why = format!(
                        "still forbidden after {}; dropped (counted as rejected)",
                        humantime::format_duration(limit)
                    );
                    self.rejected(&event, err, &why);
                }
            }
            ErrorClass::NotFound | ErrorClass::Conflict | ErrorClass::Rejected => {
                self.rejected(
                    &event,
                    err,
                    "rejected by the API server; dropped (not retried)",
                );
            }
        }
    }

    /// An Event the API server will not take: its occurrences are counted as rejected, and
    /// said (rate limited).
    fn rejected(&self, event: &PendingEvent, err: &CallError, why: &str) {
        let counter = &self.caller.shared.counters.events_dropped_rejected;
        counter.inc_by(u64::from(event.count));
        if let Some(held_back) = REJECTED.allow() {
            tracing::warn!(
                reason = %event.key.reason,
                error = %err,
                rejected = counter.get(),
                held_back,
                "Event {why}"
            );
        }
    }

    /// Posts an Event, or updates the one already posted for its reason.
    async fn post(&mut self, event: &mut PendingEvent) -> Result<(), CallError> {
        if let Some(posted) = self.posted.get(&event.key, Instant::now()).cloned() {
            let next = posted.with(event);
            match self.patch(&posted.name, &next).await {
                Ok(()) => {
                    self.posted.record(&next, posted.name, Instant::now());
                    let c = &self.caller.shared.counters;
                    c.events_aggregated.inc_by(u64::from(event.count));
                    return Ok(());
                }
                // Expired (Events live an hour by default) or deleted: post a new one.
                Err(err) if err.class() == ErrorClass::NotFound => self.posted.forget(&event.key),
                Err(err) => return Err(err),
            }
        }
        let first = event.first;
        let name = match &event.name {
            Some(name) => name.clone(),
            None => {
                let name = self.event_name(&event.key, first);
                event.name = Some(name.clone());
                name
            }
        };
        let body = self.body(&name, event)?;
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let events = self.api(&event.key);
        let created = self
            .caller
            .call(ApiCall::CreateEvent, events.create(&params, &body))
            .await;
        match created {
            Ok(_) => {}
            // This name exists: an earlier attempt of ours landed (its answer was lost), or
            // the Event is someone else's. Either way, it now shows this Event.
            Err(err) if err.class() == ErrorClass::Conflict => {
                tracing::debug!(event = %name, "Event exists (409): updating it");
                self.patch(&name, event).await?;
            }
            Err(err) => return Err(err),
        }
        self.posted.record(event, name, Instant::now());
        let c = &self.caller.shared.counters;
        c.events_created.inc();
        c.events_aggregated.inc_by(u64::from(event.count) - 1);
        Ok(())
    }

    /// Sets an Event's count, lastTimestamp and message.
    async fn patch(&self, name: &str, event: &PendingEvent) -> Result<(), CallError> {
        let patch = serde_json::json!({
            "count": event.count,
            "lastTimestamp": crate::time::rfc3339(event.last),
            "message": event.display_message(),
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let patch = Patch::Merge(&patch);
        self.caller
            .call(
                ApiCall::PatchEvent,
                self.api(&event.key).patch(name, &params, &patch),
            )
            .await
            .map(drop)
    }

    /// Where the Event with `key` lives: the pod's namespace for an Event about a pod, else
    /// `--event-namespace`.
    fn api(&self, key: &EventKey) -> Api<DynamicObject> {
        match key.pod.as_ref().and_then(|p| p.namespace.as_deref()) {
            Some(namespace) => Api::namespaced_with(self.client.clone(), namespace, &self.resource),
            None => self.events.clone(),
        }
    }

    fn body(&self, name: &str, event: &PendingEvent) -> Result<DynamicObject, CallError> {
        let config = &self.caller.config;
        let node = &config.node_name;
        let (namespace, involved_object) = match &event.key.pod {
            // As kubelet references a pod: in its namespace, with its UID.
            Some(pod) => (
                pod.namespace.clone().unwrap_or_default(),
                ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    uid: Some(pod.uid.clone()),
                    ..Default::default()
                },
            ),
            // As kubelet and NPD reference the Node: its uid is its name, which is what
            // `kubectl describe node` looks for. Outside `default`, the reference carries the
            // Events' namespace, which the API server requires of such Events.
            None => (
                config.event_namespace.clone(),
                ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Node".into()),
                    name: Some(node.clone()),
                    uid: Some(node.clone()),
                    namespace: (config.event_namespace != "default")
                        .then(|| config.event_namespace.clone()),
                    ..Default::default()
                },
            ),
        };
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace),
                ..Default::default()
            },
            involved_object,
            reason: Some(event.key.reason.clone()),
            message: Some(event.display_message()),
            type_: Some(event.key.type_.into()),
            source: Some(EventSource {
                component: Some(event.key.source.clone()),
                host: Some(node.clone()),
            }),
            first_timestamp: Some(k8s_time(event.first)),
            last_timestamp: Some(k8s_time(event.last)),
            count: Some(i32::try_from(event.count).unwrap_or(i32::MAX)),
            ..Default::default()
        };
        let mut body = serde_json::to_value(&event).map_err(kube::Error::SerdeError)?;
        body["apiVersion"] = "v1".into();
        body["kind"] = "Event".into();
        Ok(serde_json::from_value(body).map_err(kube::Error::SerdeError)?)
    }

    /// `<object>.<hex nanoseconds of the first occurrence>` (the object: the Node, or the
    /// pod), as client-go's recorder names Events; strictly increasing.
    fn event_name(&mut self, key: &EventKey, first: std::time::SystemTime) -> String {
        let nanos = first
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        self.last_event_nanos = nanos.max(self.last_event_nanos + 1);
        let object = key
            .pod
            .as_ref()
            .and_then(|p| p.name.as_deref())
            .unwrap_or(&self.caller.config.node_name);
        format!("{object}.{:x}", self.last_event_nanos)
    }
}
