//! `npd-agent run`: the daemon.

use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};

use crate::{
    cli::{LogFormat, RunArgs},
    engine::{Engine, EngineStats},
    enrich::Enricher,
    event::KernelEvent,
    exporter::k8s::{K8sConfig, K8sExporter, K8sHandle, K8sStats},
    health::{ConditionBoard, Health},
    http::{self, DebugControls, HealthRoutes, MetricsRoutes},
    metrics::{EngineCounters, Metrics},
    problem::{Condition, ConditionChange, Report},
    rules::{ConfigError, RuleSet},
    sensor::{EVENT_KINDS, Sensor, SensorConfig},
};

/// Runs the agent until SIGINT or SIGTERM.
pub fn main(args: RunArgs) -> anyhow::Result<ExitCode> {
    init_tracing(args.log_format, args.log_level.as_deref())?;
    // Bad rules fail fast, before anything touches the kernel or the cluster.
    let rules = match load_rules(&args.config) {
        Ok(rules) => rules,
        Err(e) => {
            eprintln!("npd-agent: invalid rules:\n{e}");
            return Ok(ExitCode::from(2));
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args, Engine::new(rules)))
}

/// Loads `--config` files, or the embedded defaults when none is given.
fn load_rules(config: &[PathBuf]) -> Result<RuleSet, ConfigError> {
    let rules = RuleSet::load_or_defaults(config)?;
    tracing::info!(
        files = rules.files.len(),
        rules = rules.rule_count(),
        defaults = config.is_empty(),
        "rules loaded"
    );
    Ok(rules)
}

/// The engine's counters as the metrics export them.
fn engine_counters(stats: &EngineStats) -> EngineCounters {
    EngineCounters {
        problems_reported: stats.problems_reported,
        problems_deduplicated: stats.repeats_suppressed,
        match_nanos: stats.match_nanos,
    }
}

/// Sleeps until the engine's next deadline (recovery, rate window, de-duplication window), or
/// forever when there is none: no periodic tick.
async fn sleep_until(deadline: Option<SystemTime>) {
    match deadline {
        Some(at) => {
            tokio::time::sleep(at.duration_since(SystemTime::now()).unwrap_or_default()).await
        }
        None => std::future::pending().await,
    }
}

/// Logs go to stderr (stdout carries the JSON lines), as text or JSON, filtered by
/// `--log-level`, else `RUST_LOG`, else `info`.
fn init_tracing(format: LogFormat, level: Option<&str>) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(level) => {
            EnvFilter::try_new(level).with_context(|| format!("--log-level {level:?}"))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

/// JSON lines on stdout, buffered per burst. A closed stdout (EPIPE: whoever read it went
/// away) is not an error: it is remembered, nothing more is written, and the agent stops
/// cleanly.
struct JsonLines<W: std::io::Write> {
    out: std::io::BufWriter<W>,
    closed: bool,
}

impl<W: std::io::Write> JsonLines<W> {
    fn new(out: W) -> Self {
        JsonLines {
            out: std::io::BufWriter::with_capacity(64 * 1024, out),
            closed: false,
        }
    }

    /// Writes one value as a line (buffered).
    fn line(&mut self, value: &impl serde::Serialize) -> anyhow::Result<()> {
        if self.closed {
            return Ok(());
        }
        let mut line = serde_json::to_vec(value).context("encoding a JSON line")?;
        line.push(b'\n');
        let written = self.out.write_all(&line);
        self.check(written)
    }

    /// Writes out what is buffered.
    fn flush(&mut self) -> anyhow::Result<()> {
        if self.closed {
            return Ok(());
        }
        let flushed = self.out.flush();
        self.check(flushed)
    }

    fn check(&mut self, result: std::io::Result<()>) -> anyhow::Result<()> {
        match result {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            other => other.context("writing to stdout"),
        }
    }
}

/// Where reports go: Kubernetes (or, standalone, stdout JSON lines), metrics, `/conditions`.
struct Publisher {
    metrics: Arc<Metrics>,
    conditions: Arc<ConditionBoard>,
    kubernetes: Option<K8sHandle>,
}

impl Publisher {
    /// Conditions the engine took over from the Node at start: `/conditions` and the problem
    /// gauge show them; nothing is reported (nothing changed on the Node).
    fn adopted(&self, changes: &[ConditionChange]) {
        for change in changes {
            self.metrics.observe_condition(&change.condition);
            self.conditions.set(&change.condition);
        }
    }

    /// Publishes every report, in order.
    fn publish_all<W: std::io::Write>(
        &self,
        reports: &[Report],
        out: &mut JsonLines<W>,
    ) -> anyhow::Result<()> {
        reports.iter().try_for_each(|r| self.publish(r, out))
    }

    /// The one place a report is exported: every exporter sees it, in order.
    fn publish<W: std::io::Write>(
        &self,
        report: &Report,
        out: &mut JsonLines<W>,
    ) -> anyhow::Result<()> {
        self.metrics.observe_report(report);
        self.conditions.observe_report(report);
        match &self.kubernetes {
            Some(kubernetes) => {
                // Standalone mode prints the same line on stdout; in a cluster it goes to the log.
                if let Ok(line) = serde_json::to_string(report) {
                    tracing::info!(report = %line, "problem");
                }
                kubernetes.export(report);
                Ok(())
            }
            None => out.line(report),
        }
    }
}

/// Why the main loop ended.
enum Stop {
    Signal(&'static str),
    /// The only kernel event input ended (a file or a pipe given as `--kmsg-path`).
    InputEnded,
    /// Nobody reads stdout any more.
    StdoutClosed,
}

async fn run(args: RunArgs, mut engine: Engine) -> anyhow::Result<ExitCode> {
    // Every condition the rules own, in its default state. The exporter starts before the
    // sensor: problems found while the API server is unreachable are kept, not lost.
    let initial: Vec<ConditionChange> = engine.initial_conditions(SystemTime::now());
    let (mut kubernetes, exporter_mode) = kubernetes_exporter(&args, initial.clone()).await?;
    let mut config = SensorConfig::new(args.source);
    config.tracefs = args.tracefs.clone();
    config.kmsg_path = args.kmsg_path.clone();
    config.ring_buffer_size = args.ring_buffer_size;
    let mut sensor = Sensor::start(&config)?;
    let probe = sensor.probe();

    let metrics = Arc::new(Metrics::new());
    metrics.init_reasons(engine.reasons());
    metrics.watch_sensor(probe.clone());
    // The engine lives in the loop below; metrics read a copy of its counters at scrape time.
    let engine_stats = Arc::new(Mutex::new(engine_counters(&engine.stats())));
    let for_metrics = Arc::clone(&engine_stats);
    metrics.watch_engine(move || {
        for_metrics
            .lock()
            .map(|c| *c)
            .unwrap_or_else(|p| *p.into_inner())
    });
    let conditions = Arc::new(ConditionBoard::new());
    for change in &initial {
        conditions.set(&change.condition);
    }
    let health = Arc::new(Health::new(probe.clone(), args.health_loss_window));
    if let Some(kubernetes) = &kubernetes {
        let read = Arc::new(kubernetes.stats_reader());
        let for_metrics = Arc::clone(&read);
        metrics.watch_exporter(move || for_metrics());
        let limit = args.k8s_exporter_heartbeat_period;
        health.watch_exporter(move || exporter_health(&read(), limit));
    }
    // Reports injected through the debug endpoint (tests); the rules engine publishes directly.
    let (report_tx, mut injected) = mpsc::channel::<Report>(1024);

    let mut servers: Vec<JoinHandle<()>> = Vec::new();
    let health_addr = if args.port == 0 {
        None
    } else {
        let listener =
            http::bind(SocketAddr::new(args.address, args.port), "--address/--port").await?;
        let addr = listener.local_addr()?;
        let debug = args.debug_endpoints.then(|| DebugControls {
            sensor: probe.clone(),
            reports: report_tx.clone(),
        });
        let routes = HealthRoutes {
            health: health.clone(),
            conditions: conditions.clone(),
            debug,
        };
        servers.push(http::serve(listener, Arc::new(routes)));
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
        servers.push(http::serve(
            listener,
            Arc::new(MetricsRoutes {
                metrics: metrics.clone(),
            }),
        ));
        Some(addr)
    };
    log_startup(&args, &sensor, &exporter_mode, health_addr, metrics_addr);
    if args.debug_endpoints && health_addr.is_some() {
        tracing::warn!(
            "--debug-endpoints: test controls are enabled under /debug/ on the health port"
        );
    }

    // The conditions the exporter finds on the Node (each time it reads it): the engine takes
    // them over, so that their recovery starts at adoption.
    let mut adoptions = kubernetes.as_mut().and_then(K8sHandle::adoptions);
    let publisher = Publisher {
        metrics,
        conditions,
        kubernetes,
    };
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let enricher = Enricher::default();
    let stdout = std::io::stdout();
    let mut out = JsonLines::new(stdout.lock());
    let stop = loop {
        if out.closed {
            break Stop::StdoutClosed;
        }
        tokio::select! {
            _ = sigterm.recv() => break Stop::Signal("SIGTERM"),
            _ = sigint.recv() => break Stop::Signal("SIGINT"),
            event = sensor.events.recv() => {
                let Some(mut event) = event else {
                    if sensor.stats.input_ended.load(Ordering::SeqCst) {
                        break Stop::InputEnded;
                    }
                    anyhow::bail!("the sensor stopped: {}", reader_error(&sensor));
                };
                enricher.enrich(&mut event).await;
                handle(&args, &event, &mut out)?;
                publisher.publish_all(&engine.handle(&event, SystemTime::now()), &mut out)?;
                // Drain what is already queued before flushing, so a burst costs one write.
                while let Ok(mut event) = sensor.events.try_recv() {
                    enricher.enrich(&mut event).await;
                    handle(&args, &event, &mut out)?;
                    publisher.publish_all(&engine.handle(&event, SystemTime::now()), &mut out)?;
                }
                out.flush()?;
                set_counters(&engine_stats, &engine);
            }
            () = sleep_until(engine.next_deadline()) => {
                publisher.publish_all(&engine.on_deadline(SystemTime::now()), &mut out)?;
                out.flush()?;
                set_counters(&engine_stats, &engine);
            }
            Some(report) = injected.recv() => {
                publisher.publish(&report, &mut out)?;
                out.flush()?;
            }
            Some(found) = next_adoption(&mut adoptions) => {
                let changes = engine.adopt(&found, SystemTime::now());
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
                publisher.adopted(&changes);
            }
        }
    };

    // Flush the last state: what the sensor already delivered and every queued report, then
    // the exporters (stdout here; the Kubernetes exporter's final status write joins here).
    match stop {
        Stop::Signal(name) => tracing::info!("{name} received: flushing the last state"),
        Stop::InputEnded => {
            tracing::info!("the kernel event input ended: flushing the last state and stopping")
        }
        Stop::StdoutClosed => tracing::warn!(
            "stdout is closed (EPIPE: its reader went away): stopping; nothing more is printed"
        ),
    }
    while let Ok(mut event) = sensor.events.try_recv() {
        enricher.enrich(&mut event).await;
        handle(&args, &event, &mut out)?;
        publisher.publish_all(&engine.handle(&event, SystemTime::now()), &mut out)?;
    }
    while let Ok(report) = injected.try_recv() {
        publisher.publish(&report, &mut out)?;
    }
    if args.kernel_events {
        out.line(&stats_line(&sensor))?;
    }
    out.flush()?;
    if let Some(kubernetes) = publisher.kubernetes {
        kubernetes.shutdown().await;
    }
    for server in &servers {
        server.abort();
    }
    let received: u64 = sensor
        .stats
        .received
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .sum();
    let lost = sensor.lost_total();
    drop(sensor);
    tracing::info!(received, lost, "stopped; eBPF programs detached");
    Ok(ExitCode::SUCCESS)
}

/// The next conditions the exporter found on the Node; pending for ever without an exporter.
async fn next_adoption(
    adoptions: &mut Option<tokio::sync::mpsc::UnboundedReceiver<Vec<Condition>>>,
) -> Option<Vec<Condition>> {
    match adoptions {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn set_counters(shared: &Mutex<EngineCounters>, engine: &Engine) {
    let counters = engine_counters(&engine.stats());
    match shared.lock() {
        Ok(mut c) => *c = counters,
        Err(p) => *p.into_inner() = counters,
    }
}

/// The Kubernetes exporter when a cluster is configured (see [`K8sConfig::from_run_args`]);
/// `None` means standalone: problems go to stdout as JSON lines. Says which, once.
/// Also returns the mode for the startup summary.
async fn kubernetes_exporter(
    args: &RunArgs,
    initial: Vec<ConditionChange>,
) -> anyhow::Result<(Option<K8sHandle>, String)> {
    let config = K8sConfig::from_run_args(args)
        .await
        .context("configuring the Kubernetes exporter")?;
    let Some(config) = config else {
        tracing::info!(
            "no cluster configured (in-cluster service account, --kubeconfig or KUBECONFIG): \
             running standalone, problems are printed as JSON lines on stdout"
        );
        return Ok((None, "standalone (JSON lines on stdout)".into()));
    };
    tracing::info!(node = %config.node_name, "exporting to Kubernetes");
    let mode = format!("kubernetes (node {})", config.node_name);
    let handle = K8sExporter::start(config, initial).context("starting the Kubernetes exporter")?;
    Ok((Some(handle), mode))
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
    let tracepoints = if sensor.attached.is_empty() {
        "none".to_string()
    } else {
        sensor.attached.join(",")
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
    let disabled = sensor
        .disabled
        .iter()
        .map(|(tp, _)| tp.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let show = |addr: Option<SocketAddr>, path: &str| {
        addr.map_or_else(|| "disabled".to_string(), |a| format!("http://{a}{path}"))
    };
    tracing::info!(
        source = sensor.source.as_str(),
        tracepoints = %tracepoints,
        tracepoints_disabled = %disabled,
        kmsg_reader = sensor.kmsg_reader,
        rules = %rules,
        exporter = %exporter,
        health = %show(health, "/healthz"),
        metrics = %show(metrics, "/metrics"),
        "npd-agent started"
    );
}

fn handle<W: std::io::Write>(
    args: &RunArgs,
    event: &KernelEvent,
    out: &mut JsonLines<W>,
) -> anyhow::Result<()> {
    if args.kernel_events {
        let mut line = serde_json::Map::new();
        line.insert("kind".into(), "kernel".into());
        if let serde_json::Value::Object(fields) =
            serde_json::to_value(event).context("encoding an event")?
        {
            line.extend(fields);
        }
        out.line(&serde_json::Value::Object(line))?;
    }
    Ok(())
}

fn reader_error(sensor: &Sensor) -> String {
    sensor
        .stats
        .reader_error
        .lock()
        .ok()
        .and_then(|e| e.clone())
        .unwrap_or_else(|| "reader ended".into())
}

/// The summary printed at exit with `--kernel-events`: what was received and what was lost.
fn stats_line(sensor: &Sensor) -> serde_json::Value {
    let stats = &sensor.stats;
    let losses = sensor.losses();
    let by_kind = |counts: &dyn Fn(usize) -> u64| {
        EVENT_KINDS
            .iter()
            .enumerate()
            .map(|(i, k)| ((*k).to_string(), counts(i).into()))
            .collect::<serde_json::Map<_, _>>()
    };
    serde_json::json!({
        "kind": "stats",
        "source": sensor.source.as_str(),
        "attached": sensor.attached,
        "received": by_kind(&|i| stats.received[i].load(Ordering::Relaxed)),
        "ring_full": by_kind(&|i| losses.ring_full[i]),
        "read_errors": by_kind(&|i| losses.read_errors[i]),
        "kmsg_lost": stats.kmsg_lost.load(Ordering::Relaxed),
        "kmsg_overruns": stats.kmsg_overruns.load(Ordering::Relaxed),
        "decode_errors": stats.decode_errors.load(Ordering::Relaxed),
        "reader_restarts": stats.reader_restarts.load(Ordering::Relaxed),
        "lost": sensor.lost_total(),
    })
}
