//! `npd-agent run`: the daemon. The wiring: it builds each module's configuration from the
//! command line and the environment, starts the sensor, the rules engine, the exporters and the
//! HTTP servers, and runs the loop that hands each burst of kernel events through the engine to
//! every exporter, until SIGTERM or SIGINT.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use kube::config::KubeConfigOptions;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    cli::RunArgs,
    engine::{Engine, PluginResult},
    enrich::Enricher,
    event::Detail,
    exporter::{
        Exporters,
        board::ConditionBoard,
        k8s::{self, K8sConfig, K8sConfigError, K8sExporter, K8sStats},
        log::ReportLog,
        problems::ProblemMetrics,
        stdout::{Print, StdoutExporter, StdoutWriter},
    },
    health::Health,
    http::{self, DebugControls, HealthRoutes, MetricsRoutes, Servers},
    logging,
    metrics::Metrics,
    plugins::{PluginMetrics, PluginRunner},
    pods::{self, Attributor, PodCache, PodMetrics},
    problem::{Condition, Report},
    rules::{ConfigError, PluginMonitor, RuleSet, UnsupportedMonitor},
    sensor::{Batch, Sensor, SensorConfig},
    time::{Mono, WallClock},
};

/// How long stopping may take, for each part that holds something to hand over (the sensor's
/// readers, the HTTP connections); the exporters keep their own deadlines.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the agent until SIGINT or SIGTERM.
pub fn main(args: RunArgs) -> anyhow::Result<ExitCode> {
    // `--log-level`, else `RUST_LOG`, else glog's `--v`, else `info`.
    let level = args.log_level.as_deref().or_else(|| {
        std::env::var_os("RUST_LOG")
            .is_none()
            .then(|| args.npd.log_filter())
            .flatten()
    });
    logging::init(args.log_format, level)?;
    // Bad rules fail fast, before anything touches the kernel or the cluster.
    let mut rules = match load_rules(&args) {
        Ok(rules) => rules,
        Err(e) => {
            eprintln!("npd-agent: invalid rules:\n{e}");
            return Ok(ExitCode::from(2));
        }
    };
    tune_malloc();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let unsupported = std::mem::take(&mut rules.unsupported);
    let plugins = rules.plugins.clone();
    // The pipeline runs as a task on the workers, not on this thread: the ring reader's
    // hand-over then wakes it on the reader's own worker (tokio's LIFO slot), where running it
    // on this thread cost a cross-thread wake-up and two context switches per kernel burst.
    let pipeline = runtime.spawn(run(args, Engine::new(rules), plugins, unsupported));
    runtime
        .block_on(pipeline)
        .context("the agent's main task panicked")?
}

/// glibc's allocator, set for a daemon that allocates little:
///
/// - One arena. glibc gives each thread that allocates its own (64 MiB reserved each, pages
///   kept after use); npd allocates little, on a few threads, so one is enough: in a 40 s OOM
///   storm the agent's RSS grew 0.6 MiB with one, 1.4 MiB without. `MALLOC_ARENA_MAX`, when
///   set, still wins.
/// - A fixed mmap threshold (glibc's default, 128 KiB). glibc otherwise raises it to the size
///   of the largest mapped block freed, up to 32 MiB: after the start reads the kernel's BTF
///   (a few MiB, twice: npd's offsets and aya's loader), every later block below that size
///   came from the heap, and the heap they left did not shrink. Idle RSS was 30.8 MiB that
///   way, 17.8 MiB (median of 3) with the threshold fixed. `MALLOC_MMAP_THRESHOLD_` still wins.
///
/// musl (the image's static build) has neither arenas nor a moving threshold.
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: mallopt only sets an allocator parameter, before the runtime starts
            // threads.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
        }
    }
}

/// Loads the monitor files given (`--config` and NPD's `--config.*-monitor` flags), or the
/// embedded defaults when none is given. Monitors npd does not run are named, once each.
fn load_rules(args: &RunArgs) -> Result<RuleSet, ConfigError> {
    let npd = &args.npd;
    // A file says what it is (its `plugin`): any flag takes any monitor file.
    let files: Vec<PathBuf> = [
        &args.config,
        &npd.system_log_monitor,
        &npd.system_log_monitors,
        &npd.custom_plugin_monitor,
        &npd.custom_plugin_monitors,
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect();
    let not_run: Vec<(PathBuf, &str)> = npd
        .system_stats_monitor
        .iter()
        .map(|f| (f.clone(), "system-stats-monitor"))
        .collect();
    let mut rules = if files.is_empty() && not_run.is_empty() {
        RuleSet::defaults()
    } else {
        RuleSet::load(&files)?
    };
    rules.unsupported.extend(
        not_run
            .into_iter()
            .map(|(file, plugin)| UnsupportedMonitor {
                file: file.display().to_string(),
                plugin: plugin.to_owned(),
            }),
    );
    for u in &rules.unsupported {
        tracing::warn!(
            file = %u.file,
            plugin = %u.plugin,
            "monitor not run: npd does not implement NPD's {} monitors; everything else runs",
            u.plugin
        );
    }
    if let Some(config) = &npd.stackdriver {
        tracing::warn!(
            config = %config,
            "--exporter.stackdriver: npd has no Stackdriver exporter; ignored"
        );
    }
    tracing::info!(
        files = rules.files.len(),
        plugin_monitors = rules.plugins.len(),
        rules = rules.rule_count(),
        defaults = files.is_empty(),
        "rules loaded"
    );
    Ok(rules)
}

/// The sensor's configuration from the command line.
fn sensor_config(args: &RunArgs) -> SensorConfig {
    let mut config = SensorConfig::new(args.source);
    config.tracefs = args.tracefs.clone();
    config.kmsg_path = args.kmsg_path.clone();
    config.ring_buffer_size = args.ring_buffer_size;
    config
}

/// The Kubernetes exporter's configuration, or `None` when npd runs standalone.
///
/// Cluster access, first found wins: `--kubeconfig`, the `KUBECONFIG` environment variable,
/// the in-cluster service account (`KUBERNETES_SERVICE_HOST` set). None of them, or
/// `--enable-k8s-exporter=false`: standalone. Node name: `--hostname-override`, else
/// `NODE_NAME`, else the host name.
async fn kubernetes_config(args: &RunArgs) -> Result<Option<K8sConfig>, K8sConfigError> {
    if !args.enable_k8s_exporter {
        return Ok(None);
    }
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let apiserver_override = args
        .npd
        .apiserver_override
        .as_deref()
        .filter(|uri| !uri.is_empty());
    let client = if let Some(uri) = apiserver_override {
        k8s::ApiServerOverride::parse(uri)?.client().await?
    } else if let Some(path) = &args.kubeconfig {
        k8s::kubeconfig_file(path).await?
    } else if env("KUBECONFIG").is_some() {
        kube::Config::from_kubeconfig(&KubeConfigOptions::default())
            .await
            .map_err(K8sConfigError::KubeconfigEnv)?
    } else if env("KUBERNETES_SERVICE_HOST").is_some() {
        kube::Config::incluster().map_err(K8sConfigError::InCluster)?
    } else {
        return Ok(None);
    };
    let node_env = std::env::var("NODE_NAME").ok();
    let node = k8s::node_name([args.hostname_override.as_deref(), node_env.as_deref()])?;
    let mut config = K8sConfig::new(node, client);
    config.heartbeat_period = args.k8s_exporter_heartbeat_period;
    config.event_namespace = args.event_namespace.clone();
    config.retry_max = args.npd.apiserver_wait_interval.max(config.retry_min);
    config.update_conditions = args.npd.k8s_exporter_update_node_conditions;
    config.write_events = args.npd.k8s_exporter_write_events;
    Ok(Some(config))
}

/// The enrichment step: the host's `/proc`, and pod attribution (with the pods of this node
/// watched when a cluster is configured), unless `--pod-attribution=false`.
fn enricher(
    args: &RunArgs,
    kubernetes: Option<&K8sConfig>,
    registry: &prometheus::Registry,
) -> anyhow::Result<Enricher> {
    let mut enricher = Enricher {
        proc: args.host_proc.clone(),
        ..Enricher::default()
    };
    if !args.pod_attribution {
        tracing::info!(
            "pod attribution is off (--pod-attribution=false): problems name no pod, and \
             npd needs no access to pods"
        );
        return Ok(enricher);
    }
    let metrics = PodMetrics::default();
    metrics.register(registry)?;
    let cache = match kubernetes {
        Some(config) => {
            let client = kube::Client::try_from(config.client.clone())
                .context("the Kubernetes client for the pod watch")?;
            PodCache::watch(client, &config.node_name, metrics.cached_pods.clone())
        }
        None => {
            tracing::info!(
                "pod attribution without a cluster: problems name pods by their UID and \
                 containers by their ID"
            );
            PodCache::default()
        }
    };
    let paths = pods::Paths {
        proc: args.host_proc.clone(),
        kubelet_root: args.kubelet_root_dir.clone(),
        dev_block: enricher.dev_block.clone(),
    };
    enricher.pods = Some(Attributor::new(paths, cache, metrics));
    Ok(enricher)
}

/// Why the main loop ended.
enum Stop {
    Signal(&'static str),
    /// The only kernel event input ended (a file or a pipe given as `--kmsg-path`).
    InputEnded,
    /// Nobody reads stdout any more.
    StdoutClosed,
}

/// What the loop hands events and reports through.
struct Pipeline {
    engine: Engine,
    exporters: Exporters,
    enricher: Enricher,
    kernel_events: bool,
}

impl Pipeline {
    /// One burst: host facts added, matched (one clock reading for the whole burst), and every
    /// exporter sees each event (with `--kernel-events`) followed by the reports it led to.
    async fn handle(&mut self, mut batch: Batch) {
        for event in &mut batch {
            self.enricher.enrich(event).await;
        }
        let clock = WallClock::system();
        self.engine.set_clock(clock);
        let mut reports = self.engine.handle_batch(&batch);
        for (i, report) in &mut reports {
            if let (Report::Event(e), Some(Detail::Log(log))) =
                (report, batch.get(*i).map(|event| &event.detail))
            {
                self.enricher.attribute_report(e, &log.message).await;
            }
        }
        if self.kernel_events {
            let mut reports = reports.into_iter().peekable();
            for (i, event) in batch.iter().enumerate() {
                self.exporters.kernel_event(event, &clock);
                while let Some((_, report)) = reports.next_if(|(from, _)| *from == i) {
                    self.exporters.export(&report);
                }
            }
        } else {
            for (_, report) in &reports {
                self.exporters.export(report);
            }
        }
        self.exporters.flush();
    }

    /// What is due now (condition recoveries).
    fn on_deadline(&mut self) {
        self.engine.set_clock(WallClock::system());
        for report in self.engine.on_deadline(Mono::now()) {
            self.exporters.export(&report);
        }
        self.exporters.flush();
    }

    /// A custom plugin's result.
    fn plugin_result(&mut self, result: &PluginResult) {
        self.engine.set_clock(WallClock::system());
        for report in self.engine.plugin_result(result) {
            self.exporters.export(&report);
        }
        self.exporters.flush();
    }

    /// A report from outside the engine (`--debug-endpoints`).
    fn inject(&mut self, report: &Report) {
        self.exporters.export(report);
        self.exporters.flush();
    }

    /// The conditions the exporter found on the Node: the engine takes them over, so that
    /// their recovery starts now, and the exporters show them.
    fn adopt(&mut self, found: &[Condition]) {
        let changes = self.engine.adopt(found, Mono::now());
        if !changes.is_empty() {
            tracing::info!(
                conditions = %changes
                    .iter()
                    .map(|c| format!("{}={}", c.condition.type_, c.condition.status.as_str()))
                    .collect::<Vec<_>>()
                    .join(","),
                "took over the conditions found on the Node"
            );
        }
        self.exporters.adopted(&changes);
    }
}

async fn run(
    args: RunArgs,
    engine: Engine,
    plugins: Vec<PluginMonitor>,
    unsupported: Vec<UnsupportedMonitor>,
) -> anyhow::Result<ExitCode> {
    let metrics = Metrics::new().context("creating the metrics registry")?;
    let registry = metrics.registry();
    engine.metrics().register(registry)?;
    UnsupportedMonitor::register_metric(&unsupported, registry)?;
    let plugin_metrics = PluginMetrics::new(registry)?;
    // Every condition the rules own, in its default state. The exporters start before the
    // sensor: problems found while the API server is unreachable are kept, not lost.
    let mut engine = engine;
    let initial = engine.initial_conditions(SystemTime::now());
    let mut exporters = Exporters::default();
    let mut problems = ProblemMetrics::new(registry)?;
    problems.leave_out(engine.sources_without_metrics());
    problems.init_reasons(engine.reasons());
    exporters.push(problems);
    let board = ConditionBoard::new(&initial);
    exporters.push(board.clone());

    let kubernetes = kubernetes_config(&args)
        .await
        .context("configuring the Kubernetes exporter")?;
    let exporter_mode = match &kubernetes {
        Some(config) => {
            tracing::info!(node = %config.node_name, "exporting to Kubernetes");
            format!("kubernetes (node {})", config.node_name)
        }
        None => {
            tracing::info!(
                "no cluster configured (in-cluster service account, --kubeconfig or KUBECONFIG): \
                 running standalone, problems are printed as JSON lines on stdout"
            );
            "standalone (JSON lines on stdout)".to_string()
        }
    };
    let print = Print {
        reports: kubernetes.is_none(),
        kernel_events: args.kernel_events,
    };
    let stdout: Option<StdoutWriter> = if print.reports || print.kernel_events {
        let stdout = StdoutExporter::start(print, registry).context("starting stdout")?;
        let writer = stdout.writer();
        exporters.push(stdout);
        Some(writer)
    } else {
        None
    };
    // Plugins see the node's name: the exporter's, else the one given to the agent.
    let node_name = kubernetes
        .as_ref()
        .map(|c| c.node_name.clone())
        .or_else(|| args.hostname_override.clone())
        .or_else(|| std::env::var("NODE_NAME").ok())
        .filter(|n| !n.is_empty());
    let enricher = enricher(&args, kubernetes.as_ref(), registry)?;
    let mut kubernetes = match kubernetes {
        Some(config) => {
            let mut handle =
                K8sExporter::start(config, initial).context("starting the Kubernetes exporter")?;
            handle.register(registry)?;
            let adoptions = handle.adoptions();
            Some((handle, adoptions))
        }
        None => None,
    };

    let mut sensor = Sensor::start(&sensor_config(&args))?;
    sensor.view.register(registry)?;
    let health = Arc::new(Health::new(sensor.view.clone(), args.health_loss_window));
    for u in &unsupported {
        health.note(u.note());
    }
    let mut adoptions = None;
    if let Some((handle, adopted)) = kubernetes.take() {
        let read = handle.stats_reader();
        let limit = args.k8s_exporter_heartbeat_period;
        health.watch_exporter(move || exporter_health(&read(), limit));
        adoptions = adopted;
        exporters.push(ReportLog);
        exporters.push(handle);
    }

    // Reports injected through the debug endpoint (tests); the rules engine's go directly.
    let (report_tx, mut injected) = mpsc::channel::<Report>(1024);
    let servers = Servers::new(registry)?;
    let health_addr = if args.port == 0 {
        None
    } else {
        let listener =
            http::bind(SocketAddr::new(args.address, args.port), "--address/--port").await?;
        let addr = listener.local_addr()?;
        let debug = args.debug_endpoints.then(|| DebugControls {
            sensor: sensor.view.clone(),
            reports: report_tx.clone(),
        });
        servers.serve(
            listener,
            Arc::new(HealthRoutes {
                health: health.clone(),
                conditions: board,
                debug,
            }),
        );
        Some(addr)
    };
    let metrics_addr = if args.prometheus_port == 0 {
        None
    } else {
        let listener = http::bind(
            SocketAddr::new(args.prometheus_address, args.prometheus_port),
            "--prometheus-address/--prometheus-port",
        )
        .await?;
        let addr = listener.local_addr()?;
        servers.serve(listener, Arc::new(MetricsRoutes { metrics }));
        Some(addr)
    };
    log_startup(&args, &sensor, &exporter_mode, health_addr, metrics_addr);
    if args.debug_endpoints && health_addr.is_some() {
        tracing::warn!(
            "--debug-endpoints: test controls are enabled under /debug/ on the health port"
        );
    }

    // Custom plugin monitors: a scheduler each (none, and no timer, without any).
    let (plugin_tx, mut plugin_results) = mpsc::channel::<PluginResult>(256);
    let plugin_runner = PluginRunner::start(&plugins, plugin_tx, plugin_metrics, node_name);

    let mut pipeline = Pipeline {
        engine,
        exporters,
        enricher,
        kernel_events: args.kernel_events,
    };
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let stop = loop {
        tokio::select! {
            _ = sigterm.recv() => break Stop::Signal("SIGTERM"),
            _ = sigint.recv() => break Stop::Signal("SIGINT"),
            batch = sensor.events.recv() => {
                let Some(batch) = batch else {
                    if sensor.view.stats.input_ended() {
                        break Stop::InputEnded;
                    }
                    let why = sensor.view.stats.reader_error();
                    anyhow::bail!("the sensor stopped: {}", why.as_deref().unwrap_or("reader ended"));
                };
                pipeline.handle(batch).await;
            }
            () = sleep_until(pipeline.engine.next_deadline()) => pipeline.on_deadline(),
            Some(report) = injected.recv() => pipeline.inject(&report),
            Some(result) = plugin_results.recv() => pipeline.plugin_result(&result),
            Some(found) = next_adoption(&mut adoptions) => pipeline.adopt(&found),
            () = closed(stdout.as_ref()) => break Stop::StdoutClosed,
        }
    };

    // Flush the last state: what the sensor already delivered and every queued report, then
    // the exporters (stdout; the Kubernetes exporter's final status write joins here).
    match stop {
        Stop::Signal(name) => tracing::info!("{name} received: flushing the last state"),
        Stop::InputEnded => {
            tracing::info!("the kernel event input ended: flushing the last state and stopping")
        }
        Stop::StdoutClosed => tracing::info!("stdout is closed: stopping"),
    }
    sensor.stop(STOP_TIMEOUT).await;
    plugin_runner.stop(STOP_TIMEOUT).await;
    while let Ok(batch) = sensor.events.try_recv() {
        pipeline.handle(batch).await;
    }
    while let Ok(result) = plugin_results.try_recv() {
        pipeline.plugin_result(&result);
    }
    while let Ok(report) = injected.try_recv() {
        pipeline.inject(&report);
    }
    let snapshot = sensor.view.snapshot();
    if args.kernel_events
        && let Some(stdout) = &stdout
    {
        stdout.line(&snapshot.to_json());
    }
    drop(stdout);
    pipeline.exporters.shutdown().await;
    servers.stop(STOP_TIMEOUT).await;
    drop(sensor);
    let received: u64 = snapshot.received.0.iter().sum();
    tracing::info!(
        received,
        lost = snapshot.lost(),
        "stopped; eBPF programs detached"
    );
    Ok(ExitCode::SUCCESS)
}

/// Sleeps until the engine's next deadline (recovery), or forever when there is none: no
/// periodic tick.
async fn sleep_until(deadline: Option<Mono>) {
    match deadline {
        Some(at) => tokio::time::sleep(at.since(Mono::now())).await,
        None => std::future::pending().await,
    }
}

/// Resolves when stdout is closed; never without stdout.
async fn closed(stdout: Option<&StdoutWriter>) {
    match stdout {
        Some(stdout) => stdout.closed().await,
        None => std::future::pending().await,
    }
}

/// The next conditions the exporter found on the Node; pending for ever without an exporter.
async fn next_adoption(
    adoptions: &mut Option<mpsc::UnboundedReceiver<Vec<Condition>>>,
) -> Option<Vec<Condition>> {
    match adoptions {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The exporter is stuck when its task is no longer running, or when every API call has failed
/// for longer than `limit` (the Node's conditions on the API server are then stale).
fn exporter_health(stats: &K8sStats, limit: Duration) -> Result<(), String> {
    if !stats.running {
        return Err("the Kubernetes exporter task is not running".into());
    }
    if let Some(problem) = &stats.problem {
        return Err(format!("Kubernetes exporter: {problem}"));
    }
    if let Some(since) = stats.api_failing_since
        && let Ok(failing) = since.elapsed()
        && failing >= limit
    {
        return Err(format!(
            "every Kubernetes API call has failed for {} (Node status not updated); {} Events queued",
            humantime::format_duration(Duration::from_secs(failing.as_secs())),
            stats.events_queued
        ));
    }
    Ok(())
}

/// The one-line startup summary: source, tracepoints, rule files, exporter, listen addresses.
fn log_startup(
    args: &RunArgs,
    sensor: &Sensor,
    exporter: &str,
    health: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
) {
    let view = &sensor.view;
    let tracepoints = if view.attached.is_empty() {
        "none".to_string()
    } else {
        view.attached.join(",")
    };
    let rules = if args.config.is_empty() {
        "embedded defaults".to_string()
    } else {
        args.config
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let disabled = view
        .disabled
        .iter()
        .map(|(tp, _)| tp.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let show = |addr: Option<SocketAddr>, path: &str| {
        addr.map_or_else(|| "disabled".to_string(), |a| format!("http://{a}{path}"))
    };
    tracing::info!(
        source = view.source.as_str(),
        tracepoints = %tracepoints,
        tracepoints_disabled = %disabled,
        kmsg_reader = view.kmsg_reader,
        rules = %rules,
        exporter = %exporter,
        health = %show(health, "/healthz"),
        metrics = %show(metrics, "/metrics"),
        "npd-agent started"
    );
}
