//! The Kubernetes exporter: npd's conditions on its Node's status and its problems as Events on
//! the Node, as node-problem-detector's k8s exporter does, but event-driven.
//!
//! [`K8sExporter::start`] spawns two independent tasks that own all API traffic, so that one
//! stuck never blocks the other; the sensor side only calls [`K8sHandle::export`], which never
//! waits on the API server.
//!
//! - The Node task ([`node`]) reads the Node (retrying with backoff; reports made meanwhile
//!   are kept), adopts the states of npd's conditions already there (an agent restart never
//!   flips a True condition to False, and the engine takes them over, see
//!   [`K8sHandle::adoptions`]), removes the conditions npd wrote but no longer configures, and
//!   writes the others in their default state. It writes each condition change to
//!   `nodes/<name>/status` at once, as a strategic-merge patch keyed on the condition type, so
//!   other conditions (kubelet's `Ready`...) are untouched, and refreshes every condition's
//!   `lastHeartbeatTime` each heartbeat period. It coalesces: only the newest desired state of
//!   each condition is written, once, when the server is back.
//! - The Event task ([`events`]) posts core/v1 Events about the Node, as kubelet and NPD
//!   reference it (uid = the Node's name, which is what `kubectl describe node` lists).
//!   Repeats of one reason within the aggregation window update the Event's `count`,
//!   `lastTimestamp` and message, at most once per `event_min_interval` per reason.
//!
//! API errors are handled by their class ([`CallError::class`]): transient ones (no answer,
//! 408, 429, 5xx) are retried with backoff; the Node gone (404) makes the Node task read it
//! again; forbidden (401/403) is retried with long backoff (Events: for a bounded time, as RBAC
//! propagates at rollout) and makes `/healthz` name the permission; a body the server rejects
//! (422 and other 4xx) is dropped and counted, never retried. Every write uses the field
//! manager `npd`.

mod events;
mod node;
mod state;
mod stats;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError, atomic::Ordering},
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    api::core::v1::{Event, Node},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
};
use prometheus::Registry;
use tokio::{
    sync::{Notify, mpsc, watch},
    task::JoinHandle,
    time::Instant,
};

pub use self::stats::{ApiCall, CallStats, K8sStats, LATENCY_BUCKETS};
use self::{
    state::{Backoff, EventKey, EventQueue, Pushed},
    stats::Counters,
};
use crate::{
    logging::{LOG_INTERVAL, LogLimiter},
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
    /// At most one write per this interval for each Event (source, type, reason): the repeats
    /// of a storm are folded into the next write, so the API server sees one write per
    /// interval per reason, and no repeat is lost.
    pub event_min_interval: Duration,
    /// First delay between retries while the API server is unavailable; doubles each time.
    pub retry_min: Duration,
    /// Longest delay between retries: once the server is back, the last state lands within
    /// about this long.
    pub retry_max: Duration,
    /// Longest delay between retries while a write is forbidden (401/403: the ClusterRole or
    /// its binding is missing). `/healthz` names the permission meanwhile.
    pub retry_forbidden_max: Duration,
    /// How long an Event refused as forbidden is retried (RBAC propagating at rollout) before
    /// it is counted as rejected.
    pub event_forbidden_retry_for: Duration,
    /// Timeout of one API request.
    pub request_timeout: Duration,
    /// How long [`K8sHandle::shutdown`] may spend writing what is still pending.
    pub shutdown_timeout: Duration,
    /// Whether Node conditions are written (NPD's `--k8s-exporter-update-node-conditions`).
    pub update_conditions: bool,
    /// Whether Events are posted (NPD's `--k8s-exporter-write-events`).
    pub write_events: bool,
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
            event_min_interval: Duration::from_secs(1),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(5),
            retry_forbidden_max: Duration::from_secs(5 * 60),
            event_forbidden_retry_for: Duration::from_secs(2 * 60),
            request_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(5),
            update_conditions: true,
            write_events: true,
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
}

/// The cluster access of the kubeconfig file at `path` (its current context).
pub async fn kubeconfig_file(path: &Path) -> Result<kube::Config, K8sConfigError> {
    let err = |source| K8sConfigError::Kubeconfig {
        path: path.to_owned(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(err)?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(err)
}

/// The Node's name: the first of `chosen` (`--hostname-override`, then `NODE_NAME`) that is
/// not empty, else the host name in lower case (as kubelet names its Node by default).
pub fn node_name<'a>(
    chosen: impl IntoIterator<Item = Option<&'a str>>,
) -> Result<String, K8sConfigError> {
    let chosen = chosen
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|s| !s.is_empty());
    if let Some(name) = chosen {
        return Ok(name.to_owned());
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

/// NPD's `--apiserver-override`:
/// `SCHEME://HOST[:PORT]?inClusterConfig=BOOL&auth=KUBECONFIG&insecure=BOOL`, as NPD reads it
/// (heapster's URI form): the in-cluster service account unless `inClusterConfig=false`, the
/// kubeconfig file `auth` otherwise; a server named in the URI replaces the one they give;
/// `insecure=true` skips TLS verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiServerOverride {
    /// `SCHEME://HOST[:PORT]`, when the URI names a server.
    pub server: Option<String>,
    /// Whether the in-cluster service account gives the credentials (NPD's default).
    pub in_cluster: bool,
    /// The kubeconfig file (`auth=`), when not in cluster.
    pub auth: Option<PathBuf>,
    /// Skip TLS verification.
    pub insecure: bool,
}

impl ApiServerOverride {
    /// Parses the URI; the error names the part that is wrong.
    pub fn parse(uri: &str) -> Result<Self, K8sConfigError> {
        let bad = |why: String| K8sConfigError::ApiServerOverride {
            uri: uri.to_owned(),
            why,
        };
        let (base, query) = uri.split_once('?').unwrap_or((uri, ""));
        let server = if base.is_empty() {
            None
        } else {
            let parsed: hyper::Uri = base.parse().map_err(|e| bad(format!("not a URI: {e}")))?;
            match (parsed.scheme_str(), parsed.authority()) {
                (Some(scheme @ ("http" | "https")), Some(authority)) => {
                    Some(format!("{scheme}://{authority}"))
                }
                _ => return Err(bad("the server must be http(s)://HOST[:PORT]".into())),
            }
        };
        let mut over = ApiServerOverride {
            server,
            in_cluster: true,
            auth: None,
            insecure: false,
        };
        let flag = |key: &str, value: &str| match value {
            "true" | "1" | "t" | "T" | "TRUE" | "True" => Ok(true),
            "false" | "0" | "f" | "F" | "FALSE" | "False" => Ok(false),
            other => Err(bad(format!("{key}={other:?} is not a boolean"))),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "inClusterConfig" => over.in_cluster = flag(key, value)?,
                "insecure" => over.insecure = flag(key, value)?,
                "auth" if !value.is_empty() => over.auth = Some(PathBuf::from(value)),
                // Heapster's other options (apiVersion, useServiceAccount...) change nothing
                // for npd.
                _ => {}
            }
        }
        if !over.in_cluster && over.auth.is_none() && over.server.is_none() {
            return Err(bad(
                "with inClusterConfig=false, give the server or auth=KUBECONFIG".into(),
            ));
        }
        Ok(over)
    }

    /// The cluster access it describes.
    pub async fn client(&self) -> Result<kube::Config, K8sConfigError> {
        let mut config =
            if self.in_cluster {
                kube::Config::incluster().map_err(K8sConfigError::InCluster)?
            } else if let Some(auth) = &self.auth {
                kubeconfig_file(auth).await?
            } else {
                let server = self.server.as_deref().unwrap_or_default();
                kube::Config::new(server.parse().map_err(|e| {
                    K8sConfigError::ApiServerOverride {
                        uri: server.to_owned(),
                        why: format!("not a URI: {e}"),
                    }
                })?)
            };
        if let Some(server) = &self.server {
            config.cluster_url = server
                .parse()
                .map_err(|e| K8sConfigError::ApiServerOverride {
                    uri: server.clone(),
                    why: format!("not a URI: {e}"),
                })?;
        }
        if self.insecure {
            config.accept_invalid_certs = true;
        }
        Ok(config)
    }
}

/// Why the Kubernetes exporter could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum K8sConfigError {
    /// `--apiserver-override` is not NPD's URI form.
    #[error("--apiserver-override {uri:?}: {why}")]
    ApiServerOverride {
        /// The URI given.
        uri: String,
        /// What is wrong.
        why: String,
    },
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

/// Starts the exporter tasks.
pub struct K8sExporter;

impl K8sExporter {
    /// Starts exporting for `config.node_name`. `initial` is every condition npd owns in its
    /// default state. Must be called within a tokio runtime; returns at once (the API server
    /// is contacted by the spawned tasks).
    pub fn start(
        config: K8sConfig,
        initial: Vec<ConditionChange>,
    ) -> Result<K8sHandle, K8sConfigError> {
        let mut client_config = config.client.clone();
        // Retries are ours: with coalescing, the newest state, not a stale request, is retried.
        client_config.default_retry = false;
        client_config.connect_timeout = Some(config.request_timeout);
        let client = Client::try_from(client_config).map_err(K8sConfigError::Client)?;
        let counters = Counters::default();
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                conditions: BTreeMap::new(),
                events: EventQueue::new(
                    config.event_queue_capacity,
                    counters.events_queued.clone(),
                ),
            }),
            conditions_changed: Notify::new(),
            events_queued: Notify::new(),
            counters,
            problems: Mutex::new(BTreeMap::new()),
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (adopted_tx, adopted_rx) = mpsc::unbounded_channel();
        shared.counters.running.store(true, Ordering::Relaxed);
        let config = Arc::new(config);
        let node = node::NodeWriter::new(
            Caller::new(&config, &shared, shutdown_rx.clone()),
            Api::all_with(client.clone(), &resource::<Node>()),
            initial.into_iter().map(|c| c.condition),
            adopted_tx,
        );
        let events = events::EventWriter::new(
            Caller::new(&config, &shared, shutdown_rx),
            client,
            resource::<Event>(),
        );
        let mut tasks = Vec::new();
        if config.update_conditions {
            // Cleared however the task ends (return, panic or abort), for `/healthz`.
            let running = RunningFlag(Arc::clone(&shared));
            tasks.push(tokio::spawn(async move {
                let _running = running;
                node.run().await;
            }));
        }
        if config.write_events {
            let running = RunningFlag(Arc::clone(&shared));
            tasks.push(tokio::spawn(async move {
                let _running = running;
                events.run().await;
            }));
        }
        Ok(K8sHandle {
            shared,
            shutdown: shutdown_tx,
            tasks,
            adoptions: Some(adopted_rx),
            shutdown_timeout: config.shutdown_timeout,
            update_conditions: config.update_conditions,
            write_events: config.write_events,
        })
    }
}

/// The sensor side of a running exporter.
#[derive(Debug)]
pub struct K8sHandle {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    adoptions: Option<mpsc::UnboundedReceiver<Vec<Condition>>>,
    shutdown_timeout: Duration,
    update_conditions: bool,
    write_events: bool,
}

impl K8sHandle {
    /// Hands a report over. Never waits on the API server: it only records the newest desired
    /// state of the condition and queues the Event, then wakes the task concerned.
    pub fn export(&self, report: &Report) {
        let (condition, key, message, at, pods) = match report {
            Report::Condition(change) => {
                let c = &change.condition;
                let key = EventKey {
                    source: change.source.clone(),
                    type_: event_type(change.severity()),
                    reason: c.reason.clone(),
                    pod: None,
                };
                let message = condition_change_message(c);
                (Some(c), key, message, c.transition_time, &[][..])
            }
            Report::Event(e) => {
                let key = EventKey {
                    source: e.source.clone(),
                    type_: event_type(e.severity),
                    reason: e.reason.clone(),
                    pod: None,
                };
                (None, key, e.message.clone(), e.timestamp, &e.pods[..])
            }
        };
        let condition = condition.filter(|_| self.update_conditions);
        let pushed: Vec<Pushed> = {
            let mut pending = self.shared.lock();
            if let Some(c) = condition {
                pending.conditions.insert(c.type_.clone(), c.clone());
            }
            if self.write_events {
                // The same Event on each pod it happened in, so `kubectl describe pod`
                // shows it, then on the Node.
                let on_pods: Vec<EventKey> = pods
                    .iter()
                    .map(|pod| EventKey {
                        pod: Some(pod.clone()),
                        ..key.clone()
                    })
                    .collect();
                let mut pushed: Vec<Pushed> = on_pods
                    .into_iter()
                    .map(|k| pending.events.push(k, message.clone(), at))
                    .collect();
                pushed.push(pending.events.push(key, message, at));
                pushed
            } else {
                Vec::new()
            }
        };
        if condition.is_some() {
            self.shared.conditions_changed.notify_one();
        }
        if pushed.is_empty() {
            return;
        }
        let c = &self.shared.counters;
        // An occurrence folded into an Event already waiting wakes nobody: the writer knows
        // when that Event is due. In an OOM storm that is every kill after the first of each
        // second, where a wake-up of the writer's thread per kill cost more than the kill.
        let wake = pushed.contains(&Pushed::Queued);
        for pushed in pushed {
            c.events_received.inc();
            if pushed == Pushed::Dropped {
                c.events_dropped_queue_full.inc();
                if let Some(held_back) = QUEUE_FULL.allow() {
                    tracing::warn!(
                        held_back,
                        dropped = c.events_dropped_queue_full.get(),
                        "Kubernetes Event queue full: Events dropped (counted)"
                    );
                }
            }
        }
        if wake {
            self.shared.events_queued.notify_one();
        }
    }

    /// The states of npd's conditions found on the Node each time it is read (at start, and
    /// again after the Node was deleted and registered anew): for the rules engine to take them
    /// over. `None` after the first call.
    pub fn adoptions(&mut self) -> Option<mpsc::UnboundedReceiver<Vec<Condition>>> {
        self.adoptions.take()
    }

    /// A snapshot of the exporter's counters.
    pub fn stats(&self) -> K8sStats {
        self.shared.stats()
    }

    /// Registers the exporter's metrics.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        self.shared.counters.register(registry)
    }

    /// Reads the counters later, without the handle (for `/metrics` and `/healthz`).
    pub fn stats_reader(&self) -> impl Fn() -> K8sStats + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move || shared.stats()
    }

    /// Stops the exporter after writing what is pending (newest condition states, and queued
    /// Events), spending at most the configured `shutdown_timeout` on it.
    pub async fn shutdown(mut self) -> K8sStats {
        let _ = self.shutdown.send(true);
        // The tasks keep to the deadline themselves; this is a safety net.
        let limit = tokio::time::Instant::now() + self.shutdown_timeout + Duration::from_secs(1);
        for mut task in std::mem::take(&mut self.tasks) {
            if tokio::time::timeout_at(limit, &mut task).await.is_err() {
                task.abort();
                tracing::warn!("Kubernetes exporter did not stop in time; aborted");
            }
        }
        self.shared.stats()
    }
}

impl Drop for K8sHandle {
    fn drop(&mut self) {
        // Tasks not stopped through `shutdown` stop now, without writing what is pending.
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl crate::exporter::Exporter for K8sHandle {
    fn export(&mut self, report: &Report) {
        K8sHandle::export(self, report);
    }

    fn shutdown(self: Box<Self>) -> crate::exporter::Shutdown {
        Box::pin(async move {
            (*self).shutdown().await;
        })
    }
}

static QUEUE_FULL: LogLimiter = LogLimiter::new(LOG_INTERVAL, 1);
static CALL_FAILURES: LogLimiter = LogLimiter::new(LOG_INTERVAL, 1);

fn event_type(severity: Severity) -> &'static str {
    match severity {
        Severity::Warning => "Warning",
        Severity::Normal => "Normal",
    }
}

/// Clears `running` when dropped with an exporter task.
struct RunningFlag(Arc<Shared>);

impl Drop for RunningFlag {
    fn drop(&mut self) {
        self.0.counters.running.store(false, Ordering::Relaxed);
    }
}

/// What the handle and the tasks share.
#[derive(Debug)]
struct Shared {
    pending: Mutex<Pending>,
    /// Signalled by `export` for the Node task.
    conditions_changed: Notify,
    /// Signalled by `export` for the Event task.
    events_queued: Notify,
    counters: Counters,
    /// What keeps each task from doing its job now (`/healthz` says it), by task.
    problems: Mutex<BTreeMap<&'static str, String>>,
}

/// Reports not yet taken by the tasks.
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
        let mut stats = self.counters.snapshot();
        let problems = self.problems.lock().unwrap_or_else(PoisonError::into_inner);
        if !problems.is_empty() {
            stats.problem = Some(problems.values().cloned().collect::<Vec<_>>().join("; "));
        }
        stats
    }

    /// Sets (or with `None` clears) what keeps `task` from doing its job.
    fn set_problem(&self, task: &'static str, problem: Option<String>) {
        let mut problems = self.problems.lock().unwrap_or_else(PoisonError::into_inner);
        match problem {
            Some(p) => {
                problems.insert(task, p);
            }
            None => {
                problems.remove(task);
            }
        }
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

/// What a failed call means for what to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrorClass {
    /// No answer (connection refused, timeout...), 408, 429 or 5xx: retry with backoff.
    Transient,
    /// 404: the object is not there.
    NotFound,
    /// 401 or 403: npd lacks a permission (or its credentials).
    Forbidden,
    /// 409: the object already exists.
    Conflict,
    /// 422 or another 4xx: the server refuses this body; retrying it cannot help.
    Rejected,
}

impl CallError {
    /// The HTTP status of an error response.
    fn status(&self) -> Option<u16> {
        match self {
            CallError::Kube(kube::Error::Api(status)) => Some(status.code),
            _ => None,
        }
    }

    fn class(&self) -> ErrorClass {
        match self.status() {
            None | Some(408 | 429) => ErrorClass::Transient,
            Some(code) if code >= 500 => ErrorClass::Transient,
            Some(404) => ErrorClass::NotFound,
            Some(401 | 403) => ErrorClass::Forbidden,
            Some(409) => ErrorClass::Conflict,
            Some(_) => ErrorClass::Rejected,
        }
    }
}

/// Since when and how often API calls have been failing (for the line that says the server is
/// back).
#[derive(Debug)]
struct Failing {
    since: Instant,
    attempts: u32,
}

/// What each task uses to make calls: the configuration, the shared state, the shutdown
/// signal and deadline, and its own backoff and outage log.
struct Caller {
    config: Arc<K8sConfig>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    /// Set once shutdown is requested: pending writes must be done by then.
    deadline: Option<Instant>,
    backoff: Backoff,
    forbidden_backoff: Backoff,
    failing: Option<Failing>,
}

impl Caller {
    fn new(config: &Arc<K8sConfig>, shared: &Arc<Shared>, shutdown: watch::Receiver<bool>) -> Self {
        Caller {
            backoff: Backoff::new(config.retry_min, config.retry_max),
            forbidden_backoff: Backoff::new(config.retry_min, config.retry_forbidden_max),
            config: Arc::clone(config),
            shared: Arc::clone(shared),
            shutdown,
            deadline: None,
            failing: None,
        }
    }

    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn succeeded(&mut self) {
        self.backoff.reset();
        self.forbidden_backoff.reset();
        if let Some(f) = self.failing.take() {
            tracing::info!(
                after = %humantime::format_duration(round_secs(f.since.elapsed())),
                attempts = f.attempts,
                "Kubernetes API server reachable again"
            );
        }
    }

    /// Logs a failure (rate limited; the calls are counted in their metric) and waits the
    /// backoff delay (the long one when forbidden), or less when shutdown is requested
    /// meanwhile.
    async fn failed(&mut self, what: &str, err: &CallError) {
        let failing = self.failing.get_or_insert_with(|| Failing {
            since: Instant::now(),
            attempts: 0,
        });
        failing.attempts += 1;
        if let Some(held_back) = CALL_FAILURES.allow() {
            tracing::warn!(error = %err, held_back, "{what} failed; retrying with backoff");
        }
        let delay = if err.class() == ErrorClass::Forbidden {
            self.forbidden_backoff.next_delay()
        } else {
            self.backoff.next_delay()
        };
        self.sleep(delay).await;
    }

    /// Sleeps `delay`, or until the shutdown deadline; a shutdown requested meanwhile sets the
    /// deadline.
    async fn sleep(&mut self, delay: Duration) {
        let mut until = Instant::now() + delay;
        if let Some(deadline) = self.deadline {
            tokio::time::sleep_until(until.min(deadline)).await;
            return;
        }
        let stop = tokio::select! {
            _ = tokio::time::sleep_until(until) => false,
            _ = self.shutdown.wait_for(|stop| *stop) => true,
        };
        if stop {
            let deadline = self.start_deadline();
            until = until.min(deadline);
            tokio::time::sleep_until(until).await;
        }
    }

    /// Shutdown was requested: what is pending must be written by the returned deadline.
    fn start_deadline(&mut self) -> Instant {
        *self
            .deadline
            .get_or_insert_with(|| Instant::now() + self.config.shutdown_timeout)
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
        let answered = match &result {
            Ok(_) => true,
            Err(e) => e.class() != ErrorClass::Transient,
        };
        self.shared
            .counters
            .record_call(kind, result.is_ok(), answered, start.elapsed());
        result
    }
}

/// npd's view of one of the Node's conditions, read from its JSON (not through
/// k8s-openapi's types, which refuse a whole Node over one time they cannot hold). Its
/// transition time is whatever the Node says, which anyone who may patch `nodes/status` can
/// set: a missing one becomes now, and one that cannot be written back (before 1970, after
/// 9999-12-30T22:00:00Z, unreadable) is clamped, and said so. `None` without a type.
fn condition_from_json(c: &serde_json::Value) -> Option<Condition> {
    let text = |key: &str| c.get(key).and_then(|v| v.as_str());
    let type_ = text("type")?.to_owned();
    let transition_time = match text("lastTransitionTime") {
        None => SystemTime::now(),
        Some(found) => {
            let (used, moved) = node_time(found);
            if moved {
                tracing::warn!(
                    condition = %type_,
                    found,
                    used = %crate::time::rfc3339(used),
                    "the Node's condition has a lastTransitionTime npd cannot write back; clamped"
                );
            }
            used
        }
    };
    Some(Condition {
        type_,
        status: match text("status") {
            Some("True") => ConditionStatus::True,
            Some("False") => ConditionStatus::False,
            _ => ConditionStatus::Unknown,
        },
        reason: text("reason").unwrap_or_default().to_owned(),
        message: text("message").unwrap_or_default().to_owned(),
        transition_time,
    })
}

/// An RFC 3339 time from the Node, clamped into what npd writes; true when it was moved (or
/// could not be read, and became now).
fn node_time(text: &str) -> (SystemTime, bool) {
    if let Ok(t) = text.parse::<k8s_openapi::jiff::Timestamp>() {
        return crate::time::clamp(SystemTime::from(t));
    }
    // Beyond jiff's range: far past or far future, by its year.
    let year: Option<i64> = text
        .split('-')
        .find(|p| !p.is_empty())
        .and_then(|y| y.parse().ok());
    match year {
        Some(y) if !text.starts_with('-') && y >= 9999 => (crate::time::latest(), true),
        Some(_) if text.starts_with('-') => (SystemTime::UNIX_EPOCH, true),
        Some(y) if y < 1970 => (SystemTime::UNIX_EPOCH, true),
        _ => (SystemTime::now(), true),
    }
}

/// The API resource of Nodes and Events, read as JSON ([`kube::core::DynamicObject`]): what
/// the API server returns is parsed leniently, so that a hostile field elsewhere in the object
/// never makes a read or a write fail.
fn resource<K: kube::Resource<DynamicType = ()>>() -> kube::core::ApiResource {
    kube::core::ApiResource::erase::<K>(&())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apiserver_override_as_npd_reads_it() {
        let p = |uri: &str| ApiServerOverride::parse(uri).map_err(|e| e.to_string());
        assert_eq!(
            p("https://10.0.0.1:6443?inClusterConfig=false&auth=/var/lib/kubelet/kubeconfig"),
            Ok(ApiServerOverride {
                server: Some("https://10.0.0.1:6443".into()),
                in_cluster: false,
                auth: Some("/var/lib/kubelet/kubeconfig".into()),
                insecure: false,
            })
        );
        assert_eq!(
            p("https://kubernetes.default"),
            Ok(ApiServerOverride {
                server: Some("https://kubernetes.default".into()),
                in_cluster: true,
                auth: None,
                insecure: false,
            })
        );
        assert!(p("?inClusterConfig=false&auth=/k").is_ok());
        assert!(
            p("http://h:8080?inClusterConfig=false&insecure=true")
                .unwrap()
                .insecure
        );
        for bad in [
            "ftp://h",
            "not a uri",
            "https://h?inClusterConfig=maybe",
            "?inClusterConfig=false",
        ] {
            let err = p(bad).unwrap_err();
            assert!(err.starts_with("--apiserver-override"), "{bad}: {err}");
        }
    }

    #[test]
    fn hostile_condition_times_are_clamped() {
        let at = |t: &str| {
            condition_from_json(&serde_json::json!({
                "type": "KernelDeadlock", "status": "True", "reason": "DockerHung",
                "lastTransitionTime": t,
            }))
            .unwrap()
            .transition_time
        };
        let epoch = SystemTime::UNIX_EPOCH;
        assert_eq!(at("1900-01-01T00:00:00Z"), epoch);
        assert_eq!(at("-0042-01-01T00:00:00Z"), epoch);
        assert_eq!(at("9999-12-31T23:59:59Z"), crate::time::latest());
        assert_eq!(at("99999-01-01T00:00:00Z"), crate::time::latest());
        assert_eq!(
            at("2021-01-01T00:00:00Z"),
            epoch + Duration::from_secs(1_609_459_200)
        );
        let unreadable = at("yesterday");
        assert!(unreadable > epoch + Duration::from_secs(1_700_000_000));
        // Every one of them can be written back.
        for t in [at("1900-01-01T00:00:00Z"), at("9999-12-31T23:59:59Z")] {
            assert!(
                crate::time::rfc3339(t)
                    .parse::<k8s_openapi::jiff::Timestamp>()
                    .is_ok()
            );
        }
        assert!(condition_from_json(&serde_json::json!({"status": "True"})).is_none());
        let c = condition_from_json(&serde_json::json!({"type": "X", "status": 7})).unwrap();
        assert_eq!(c.status, ConditionStatus::Unknown);
    }
}
