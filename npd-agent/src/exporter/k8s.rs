//! The Kubernetes exporter: npd's conditions on its Node's status and its problems as Events on
//! the Node, as node-problem-detector's k8s exporter does, but event-driven.
//!
//! [`K8sExporter::start`] spawns one task that owns all API traffic; the sensor side only calls
//! [`K8sHandle::export`], which never waits on the API server. The task
//! - waits for the API server (retrying with backoff; reports made meanwhile are kept), reads
//!   the Node, adopts the states of npd's conditions already there (an agent restart never
//!   flips a True condition to False) and writes the others in their default state;
//! - writes each condition change to `nodes/<name>/status` at once, as a strategic-merge patch
//!   keyed on the condition type, so other conditions (kubelet's `Ready`...) are untouched;
//!   refreshes every condition's `lastHeartbeatTime` each heartbeat period;
//! - posts core/v1 Events about the Node; repeats of an Event (same source, type, reason and
//!   message) within the aggregation window update its `count` and `lastTimestamp`;
//! - retries with backoff while the API server fails, and coalesces: only the newest desired
//!   state of each condition is written, once, when the server is back.
//!
//! Every write uses the field manager `npd`.

mod state;
mod stats;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    api::core::v1::{Event, EventSource, Node, NodeCondition, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
    time::Instant,
};

pub use self::stats::{ApiCall, CallStats, K8sStats, LATENCY_BUCKETS};
use self::{
    state::{Backoff, ConditionBook, EventKey, EventQueue, PendingEvent, PostedEvents, Pushed},
    stats::Counters,
};
use crate::{
    cli::RunArgs,
    problem::{
        Condition, ConditionChange, ConditionStatus, Report, Severity, condition_change_message,
    },
};

/// The field manager of every write (visible in the Node's and Events' `managedFields`).
pub const FIELD_MANAGER: &str = "npd";

/// Settings of the Kubernetes exporter. [`K8sConfig::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct K8sConfig {
    /// The Node npd runs on (and reports about).
    pub node_name: String,
    /// Cluster access: API server URL, credentials, TLS.
    pub client: kube::Config,
    /// How often every owned condition's `lastHeartbeatTime` is refreshed (NPD's
    /// `--k8s-exporter-heartbeat-period`, 5m).
    pub heartbeat_period: Duration,
    /// Namespace the Events are posted in (NPD: `default`).
    pub event_namespace: String,
    /// At most this many distinct Events wait to be posted; further ones are dropped and
    /// counted (repeats of a waiting Event are folded into it and never dropped).
    pub event_queue_capacity: usize,
    /// A repeat of an Event updated less than this long ago updates it (count, lastTimestamp)
    /// instead of creating a new one.
    pub event_aggregation_window: Duration,
    /// First delay between retries while the API server is unavailable; doubles each time.
    pub retry_min: Duration,
    /// Longest delay between retries: once the server is back, the last state lands within
    /// about this long.
    pub retry_max: Duration,
    /// Timeout of one API request.
    pub request_timeout: Duration,
    /// How long [`K8sHandle::shutdown`] may spend writing what is still pending.
    pub shutdown_timeout: Duration,
}

/// What `--heartbeat-period` defaults to, as in NPD.
pub const DEFAULT_HEARTBEAT_PERIOD: Duration = Duration::from_secs(5 * 60);

impl K8sConfig {
    /// The defaults for `node_name` with cluster access `client`.
    pub fn new(node_name: impl Into<String>, client: kube::Config) -> Self {
        K8sConfig {
            node_name: node_name.into(),
            client,
            heartbeat_period: DEFAULT_HEARTBEAT_PERIOD,
            event_namespace: "default".into(),
            event_queue_capacity: 1024,
            event_aggregation_window: Duration::from_secs(10 * 60),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(5),
        }
    }

    /// The defaults for `node_name`, with the cluster access of the kubeconfig file at `path`
    /// (its current context).
    pub async fn from_kubeconfig(
        path: &Path,
        node_name: impl Into<String>,
    ) -> Result<Self, K8sConfigError> {
        let client = kubeconfig_file(path).await?;
        Ok(K8sConfig::new(node_name, client))
    }

    /// The configuration `npd-agent run` asks for, or `None` when it runs standalone.
    ///
    /// Cluster access, first found wins: `--kubeconfig`, the `KUBECONFIG` environment
    /// variable, the in-cluster service account (`KUBERNETES_SERVICE_HOST` set). None of them,
    /// or `--enable-k8s-exporter=false`: standalone. Node name: `--hostname-override`, else
    /// `NODE_NAME`, else the host name.
    pub async fn from_run_args(args: &RunArgs) -> Result<Option<Self>, K8sConfigError> {
        if !args.enable_k8s_exporter {
            return Ok(None);
        }
        let client = if let Some(path) = &args.kubeconfig {
            kubeconfig_file(path).await?
        } else if std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty()) {
            kube::Config::from_kubeconfig(&KubeConfigOptions::default())
                .await
                .map_err(K8sConfigError::KubeconfigEnv)?
        } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            kube::Config::incluster().map_err(K8sConfigError::InCluster)?
        } else {
            return Ok(None);
        };
        let node_name = node_name(args.hostname_override.as_deref())?;
        let mut config = K8sConfig::new(node_name, client);
        config.heartbeat_period = args.k8s_exporter_heartbeat_period;
        Ok(Some(config))
    }
}

async fn kubeconfig_file(path: &Path) -> Result<kube::Config, K8sConfigError> {
    let err = |source| K8sConfigError::Kubeconfig {
        path: path.to_owned(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(err)?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(err)
}

/// The Node's name: `hostname_override`, else `NODE_NAME`, else the host name in lower case
/// (as kubelet names its Node by default).
pub fn node_name(hostname_override: Option<&str>) -> Result<String, K8sConfigError> {
    let chosen = hostname_override
        .map(str::to_owned)
        .or_else(|| std::env::var("NODE_NAME").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    if let Some(name) = chosen {
        return Ok(name);
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(K8sConfigError::HostName)?
        .trim()
        .to_lowercase();
    if host.is_empty() {
        return Err(K8sConfigError::HostName(std::io::Error::other(
            "empty host name",
        )));
    }
    Ok(host)
}

/// Why the Kubernetes exporter could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum K8sConfigError {
    /// `--kubeconfig` could not be loaded.
    #[error("loading kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        source: kube::config::KubeconfigError,
    },
    /// `KUBECONFIG` is set but could not be loaded.
    #[error("loading the kubeconfig named by KUBECONFIG: {0}")]
    KubeconfigEnv(#[source] kube::config::KubeconfigError),
    /// Running in a pod, but the service account could not be loaded.
    #[error("loading the in-cluster service account: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    /// No `--hostname-override`, no `NODE_NAME`, and no host name.
    #[error("no node name (--hostname-override, NODE_NAME) and no host name: {0}")]
    HostName(#[source] std::io::Error),
    /// The HTTP client could not be built (e.g. a bad CA certificate).
    #[error("creating the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Starts the exporter task.
pub struct K8sExporter;

impl K8sExporter {
    /// Starts exporting for `config.node_name`. `initial` is every condition npd owns in its
    /// default state. Must be called within a tokio runtime; returns at once (the API server
    /// is contacted by the spawned task).
    pub fn start(
        config: K8sConfig,
        initial: Vec<ConditionChange>,
    ) -> Result<K8sHandle, K8sConfigError> {
        let mut client_config = config.client.clone();
        // Retries are ours: with coalescing, the newest state, not a stale request, is retried.
        client_config.default_retry = false;
        client_config.connect_timeout = Some(config.request_timeout);
        let client = Client::try_from(client_config).map_err(K8sConfigError::Client)?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                conditions: BTreeMap::new(),
                events: EventQueue::new(config.event_queue_capacity),
            }),
            wake: Notify::new(),
            counters: Counters::default(),
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let worker = Worker {
            nodes: Api::all(client.clone()),
            events: Api::namespaced(client, &config.event_namespace),
            book: ConditionBook::new(initial.into_iter().map(|c| c.condition)),
            posted: PostedEvents::new(config.event_aggregation_window),
            backoff: Backoff::new(config.retry_min, config.retry_max),
            shared: Arc::clone(&shared),
            shutdown: shutdown_rx,
            deadline: None,
            node_uid: String::new(),
            failing: None,
            last_event_nanos: 0,
            config,
        };
        let shutdown_timeout = worker.config.shutdown_timeout;
        shared
            .counters
            .running
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let task = tokio::spawn(async move {
            // Cleared however the task ends (return, panic or abort), for `/healthz`.
            let _running = RunningFlag(Arc::clone(&worker.shared));
            worker.run().await;
        });
        Ok(K8sHandle {
            shared,
            shutdown: shutdown_tx,
            task: Some(task),
            shutdown_timeout,
        })
    }
}

/// The sensor side of a running exporter.
#[derive(Debug)]
pub struct K8sHandle {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    shutdown_timeout: Duration,
}

impl K8sHandle {
    /// Hands a report over. Never waits on the API server: it only records the newest desired
    /// state of the condition and queues the Event, then wakes the exporter task.
    pub fn export(&self, report: &Report) {
        let (condition, event, at) = match report {
            Report::Condition(change) => {
                let c = &change.condition;
                let event = EventKey {
                    source: change.source.clone(),
                    type_: event_type(change.severity()),
                    reason: c.reason.clone(),
                    message: condition_change_message(c),
                };
                (Some(c), event, c.transition_time)
            }
            Report::Event(e) => {
                let event = EventKey {
                    source: e.source.clone(),
                    type_: event_type(e.severity),
                    reason: e.reason.clone(),
                    message: e.message.clone(),
                };
                (None, event, e.timestamp)
            }
        };
        let pushed = {
            let mut pending = self.shared.lock();
            if let Some(c) = condition {
                pending.conditions.insert(c.type_.clone(), c.clone());
            }
            pending.events.push(event, at)
        };
        let c = &self.shared.counters;
        Counters::add(&c.events_received, 1);
        if pushed == Pushed::Dropped {
            let dropped = Counters::add(&c.events_dropped_queue_full, 1);
            // Logged at 1, 2, 4, 8... drops: a long outage does not flood the log.
            if dropped.is_power_of_two() {
                tracing::warn!(dropped, "Kubernetes Event queue full: Events dropped");
            }
        }
        self.shared.wake.notify_one();
    }

    /// A snapshot of the exporter's counters.
    pub fn stats(&self) -> K8sStats {
        self.shared.stats()
    }

    /// Reads the counters later, without the handle (for `/metrics` and `/healthz`).
    pub fn stats_reader(&self) -> impl Fn() -> K8sStats + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move || shared.stats()
    }

    /// Stops the exporter after writing what is pending (newest condition states first, then
    /// queued Events), spending at most the configured `shutdown_timeout` on it.
    pub async fn shutdown(mut self) -> K8sStats {
        let _ = self.shutdown.send(true);
        if let Some(mut task) = self.task.take() {
            // The task keeps to the deadline itself; this is a safety net.
            let limit = self.shutdown_timeout + Duration::from_secs(1);
            if tokio::time::timeout(limit, &mut task).await.is_err() {
                task.abort();
                tracing::warn!("Kubernetes exporter did not stop in time; aborted");
            }
        }
        self.shared.stats()
    }
}

impl Drop for K8sHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn event_type(severity: Severity) -> &'static str {
    match severity {
        Severity::Warning => "Warning",
        Severity::Normal => "Normal",
    }
}

/// Clears `running` when dropped with the exporter task.
struct RunningFlag(Arc<Shared>);

impl Drop for RunningFlag {
    fn drop(&mut self) {
        Counters::set(&self.0.counters.running, false);
    }
}

/// What the handle and the task share.
#[derive(Debug)]
struct Shared {
    pending: Mutex<Pending>,
    /// Signalled by `export`.
    wake: Notify,
    counters: Counters,
}

/// Reports not yet taken by the task.
#[derive(Debug)]
struct Pending {
    /// Newest desired state per condition type.
    conditions: BTreeMap<String, Condition>,
    events: EventQueue,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Nothing panics while holding the lock; recover anyway rather than lose reports.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stats(&self) -> K8sStats {
        let queued = self.lock().events.len() as u64;
        self.counters.snapshot(queued)
    }
}

/// A failed API call.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl CallError {
    /// The HTTP status of an error response.
    fn status(&self) -> Option<u16> {
        match self {
            CallError::Kube(kube::Error::Api(status)) => Some(status.code),
            _ => None,
        }
    }

    /// Worth retrying: no answer (connection refused, timeout...), 408, 429 or 5xx.
    fn is_transient(&self) -> bool {
        self.status()
            .is_none_or(|code| code == 408 || code == 429 || code >= 500)
    }
}

/// Since when and how often API calls have been failing (for logging once per outage).
#[derive(Debug)]
struct Failing {
    since: Instant,
    attempts: u32,
}

/// The exporter task.
struct Worker {
    config: K8sConfig,
    nodes: Api<Node>,
    events: Api<Event>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    /// Set once shutdown is requested: pending writes must be done by then.
    deadline: Option<Instant>,
    book: ConditionBook,
    posted: PostedEvents,
    backoff: Backoff,
    node_uid: String,
    failing: Option<Failing>,
    /// For unique Event names.
    last_event_nanos: u128,
}

/// Why the idle wait ended.
enum Wake {
    Reports,
    Heartbeat,
    Shutdown,
}

impl Worker {
    async fn run(mut self) {
        tracing::info!(
            node = %self.config.node_name,
            server = %self.config.client.cluster_url,
            "Kubernetes exporter starting"
        );
        let Some(node) = self.connect().await else {
            self.stop();
            return;
        };
        self.node_uid = node.metadata.uid.unwrap_or_default();
        let found = node.status.and_then(|s| s.conditions).unwrap_or_default();
        self.book.adopt(found.iter().map(from_node_condition));
        Counters::set(&self.shared.counters.node_adopted, true);
        tracing::info!(node = %self.config.node_name, "Kubernetes exporter connected");

        // The first write refreshes every owned condition (adopted ones keep their state).
        let mut full_write = true;
        let mut next_heartbeat = Instant::now() + self.config.heartbeat_period;
        loop {
            self.take_conditions();
            let writes = if full_write {
                self.book.all()
            } else {
                self.book.dirty()
            };
            if writes.is_empty() && full_write {
                // No condition owned yet: nothing to refresh until the next period.
                full_write = false;
                next_heartbeat = Instant::now() + self.config.heartbeat_period;
            }
            if !writes.is_empty() {
                if self.past_deadline() {
                    break;
                }
                match self.patch_conditions(&writes).await {
                    Ok(()) => {
                        self.book.mark_written(&writes);
                        if full_write {
                            full_write = false;
                            next_heartbeat = Instant::now() + self.config.heartbeat_period;
                        }
                        self.succeeded();
                    }
                    Err(err) => self.failed("writing node conditions", &err).await,
                }
                continue;
            }
            if let Some(event) = self.take_event() {
                if self.past_deadline() {
                    self.shared.lock().events.requeue(event);
                    break;
                }
                match self.post_event(&event).await {
                    Ok(()) => self.succeeded(),
                    Err(err) if err.is_transient() => {
                        self.shared.lock().events.requeue(event);
                        self.failed("posting an Event", &err).await;
                    }
                    Err(err) => {
                        let c = &self.shared.counters;
                        Counters::add(&c.events_dropped_rejected, u64::from(event.count));
                        tracing::warn!(reason = %event.key.reason, error = %err, "Event refused; dropped");
                    }
                }
                continue;
            }
            if self.deadline.is_some() {
                break;
            }
            let wake = tokio::select! {
                _ = self.shared.wake.notified() => Wake::Reports,
                _ = tokio::time::sleep_until(next_heartbeat) => Wake::Heartbeat,
                _ = self.shutdown.wait_for(|stop| *stop) => Wake::Shutdown,
            };
            match wake {
                Wake::Reports => {}
                Wake::Heartbeat => full_write = true,
                Wake::Shutdown => {
                    self.deadline = Some(Instant::now() + self.config.shutdown_timeout)
                }
            }
        }
        self.stop();
    }

    /// Reads the Node, retrying until it answers (or the shutdown deadline passes).
    async fn connect(&mut self) -> Option<Node> {
        loop {
            if self.past_deadline() {
                return None;
            }
            let nodes = self.nodes.clone();
            let name = self.config.node_name.clone();
            match self.call(ApiCall::GetNode, nodes.get(&name)).await {
                Ok(node) => {
                    self.succeeded();
                    return Some(node);
                }
                Err(err) => self.failed("reading the node", &err).await,
            }
        }
    }

    /// Logs what could not be written before stopping.
    fn stop(&mut self) {
        self.take_conditions();
        let unwritten: Vec<String> = self.book.dirty().into_iter().map(|c| c.type_).collect();
        let dropped = self.shared.lock().events.clear();
        Counters::add(&self.shared.counters.events_dropped_at_shutdown, dropped);
        if unwritten.is_empty() && dropped == 0 {
            tracing::info!("Kubernetes exporter stopped; everything written");
        } else {
            tracing::warn!(
                conditions = %unwritten.join(","),
                events = dropped,
                "Kubernetes exporter stopped before writing everything"
            );
        }
    }

    fn take_conditions(&mut self) {
        let taken = std::mem::take(&mut self.shared.lock().conditions);
        for c in taken.into_values() {
            self.book.set(c);
        }
    }

    fn take_event(&mut self) -> Option<PendingEvent> {
        self.shared.lock().events.pop()
    }

    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn succeeded(&mut self) {
        self.backoff.reset();
        if let Some(f) = self.failing.take() {
            tracing::info!(
                after = %humantime::format_duration(round_secs(f.since.elapsed())),
                attempts = f.attempts,
                "Kubernetes API server reachable again"
            );
        }
    }

    /// Logs a failure (the first of an outage at warn, later ones at debug) and waits the
    /// backoff delay, or less when shutdown is requested meanwhile.
    async fn failed(&mut self, what: &str, err: &CallError) {
        match &mut self.failing {
            Some(f) => {
                f.attempts += 1;
                tracing::debug!(error = %err, attempts = f.attempts, "{what} failed again");
            }
            None => {
                tracing::warn!(error = %err, "{what} failed; retrying with backoff");
                self.failing = Some(Failing {
                    since: Instant::now(),
                    attempts: 1,
                });
            }
        }
        let mut until = Instant::now() + self.backoff.next_delay();
        if let Some(deadline) = self.deadline {
            tokio::time::sleep_until(until.min(deadline)).await;
            return;
        }
        let stop = tokio::select! {
            _ = tokio::time::sleep_until(until) => false,
            _ = self.shutdown.wait_for(|stop| *stop) => true,
        };
        if stop {
            let deadline = Instant::now() + self.config.shutdown_timeout;
            self.deadline = Some(deadline);
            until = until.min(deadline);
            tokio::time::sleep_until(until).await;
        }
    }

    /// Runs one API call with the request timeout (shortened to the shutdown deadline) and
    /// counts it.
    async fn call<T>(
        &self,
        kind: ApiCall,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, CallError> {
        let start = Instant::now();
        let mut limit = self.config.request_timeout;
        if let Some(deadline) = self.deadline {
            limit = limit.min(deadline.saturating_duration_since(start));
        }
        let result = match tokio::time::timeout(limit, request).await {
            Ok(r) => r.map_err(CallError::from),
            Err(_) => Err(CallError::Timeout(limit)),
        };
        self.shared
            .counters
            .record_call(kind, result.is_ok(), start.elapsed());
        result
    }

    /// Writes these conditions to the Node's status, leaving every other condition alone.
    async fn patch_conditions(&self, conditions: &[Condition]) -> Result<(), CallError> {
        let now = crate::time::rfc3339(SystemTime::now());
        let conditions: Vec<serde_json::Value> = conditions
            .iter()
            .map(|c| {
                serde_json::json!({
                    "type": c.type_,
                    "status": c.status.as_str(),
                    "reason": c.reason,
                    "message": c.message,
                    "lastTransitionTime":
                        crate::time::rfc3339(c.transition_time),
                    "lastHeartbeatTime": now,
                })
            })
            .collect();
        // Node status conditions merge by `type` (patchMergeKey): a strategic-merge patch
        // changes exactly the listed types.
        let patch = serde_json::json!({ "status": { "conditions": conditions } });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        self.call(
            ApiCall::PatchNodeStatus,
            self.nodes
                .patch_status(&self.config.node_name, &params, &Patch::Strategic(&patch)),
        )
        .await
        .map(drop)
    }

    /// Posts an Event, or updates the one already posted for its repeats.
    async fn post_event(&mut self, event: &PendingEvent) -> Result<(), CallError> {
        let c = &self.shared.counters;
        if let Some(posted) = self.posted.get(&event.key, Instant::now()).cloned() {
            let count = posted.count.saturating_add(event.count);
            let patch = serde_json::json!({
                "count": count,
                "lastTimestamp": crate::time::rfc3339(event.last),
            });
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            let patch = Patch::Merge(&patch);
            let request = self.events.patch(&posted.name, &params, &patch);
            match self.call(ApiCall::PatchEvent, request).await {
                Ok(_) => {
                    self.posted
                        .record(event.key.clone(), posted.name, count, Instant::now());
                    Counters::add(&c.events_aggregated, u64::from(event.count));
                    return Ok(());
                }
                // Expired (Events live an hour by default) or deleted: post a new one.
                Err(err) if err.status() == Some(404) => self.posted.forget(&event.key),
                Err(err) => return Err(err),
            }
        }
        let name = self.event_name();
        let body = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.config.event_namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(self.config.node_name.clone()),
                uid: Some(self.node_uid.clone()).filter(|u| !u.is_empty()),
                ..Default::default()
            },
            reason: Some(event.key.reason.clone()),
            message: Some(event.key.message.clone()),
            type_: Some(event.key.type_.into()),
            source: Some(EventSource {
                component: Some(event.key.source.clone()),
                host: Some(self.config.node_name.clone()),
            }),
            first_timestamp: Some(k8s_time(event.first)),
            last_timestamp: Some(k8s_time(event.last)),
            count: Some(i32::try_from(event.count).unwrap_or(i32::MAX)),
            ..Default::default()
        };
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let request = self.events.create(&params, &body);
        self.call(ApiCall::CreateEvent, request).await?;
        self.posted
            .record(event.key.clone(), name, event.count, Instant::now());
        let c = &self.shared.counters;
        Counters::add(&c.events_created, 1);
        Counters::add(&c.events_aggregated, u64::from(event.count) - 1);
        Ok(())
    }

    /// `<node>.<hex nanoseconds>`, as client-go's recorder names Events; strictly increasing.
    fn event_name(&mut self) -> String {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        self.last_event_nanos = now.max(self.last_event_nanos + 1);
        format!("{}.{:x}", self.config.node_name, self.last_event_nanos)
    }
}

/// npd's view of a Node condition. Its transition time is whatever the Node says, which anyone
/// who may patch `nodes/status` can set: a missing one becomes now, and one that cannot be
/// written back (before 1970, after year 9999) is clamped, and said so.
fn from_node_condition(c: &NodeCondition) -> Condition {
    let transition_time = match &c.last_transition_time {
        None => SystemTime::now(),
        Some(t) => {
            let (clamped, moved) = crate::time::clamp(SystemTime::from(t.0));
            if moved {
                tracing::warn!(
                    condition = %c.type_,
                    found = %t.0,
                    used = %crate::time::rfc3339(clamped),
                    "the Node's condition has a lastTransitionTime npd cannot write back; clamped"
                );
            }
            clamped
        }
    };
    Condition {
        type_: c.type_.clone(),
        status: match c.status.as_str() {
            "True" => ConditionStatus::True,
            "False" => ConditionStatus::False,
            _ => ConditionStatus::Unknown,
        },
        reason: c.reason.clone().unwrap_or_default(),
        message: c.message.clone().unwrap_or_default(),
        transition_time,
    }
}

fn k8s_time(t: SystemTime) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::try_from(crate::time::clamp(t).0)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}
