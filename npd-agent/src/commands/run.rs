//! `npd-agent run`: the daemon.

use std::{
    io::Write as _, path::PathBuf, process::ExitCode, sync::atomic::Ordering, time::SystemTime,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::RunArgs,
    engine::Engine,
    event::KernelEvent,
    exporter::k8s::{K8sConfig, K8sExporter, K8sHandle},
    problem::{ConditionChange, Report},
    rules::{ConfigError, RuleSet},
    sensor::{EVENT_KINDS, Sensor, SensorConfig},
};

/// Runs the agent until SIGINT or SIGTERM.
pub fn main(args: RunArgs) -> anyhow::Result<ExitCode> {
    init_tracing();
    // Bad rules fail fast, before anything touches the kernel.
    let problems = match Problems::load(&args.config) {
        Ok(p) => p,
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
    runtime.block_on(run(args, problems))
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr: stdout carries the JSON lines.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(args: RunArgs, mut problems: Problems) -> anyhow::Result<ExitCode> {
    // Started before the sensor: problems found while the API server is unreachable are kept.
    problems.exporter = kubernetes_exporter(&args, problems.initial.clone()).await?;
    let mut config = SensorConfig::new(args.source);
    config.tracefs = args.tracefs.clone();
    config.kmsg_path = args.kmsg_path.clone();
    config.ring_buffer_size = args.ring_buffer_size;
    let mut sensor = Sensor::start(&config)?;
    tracing::info!(
        source = sensor.source.as_str(),
        attached = %sensor.attached.join(","),
        kmsg_reader = sensor.kmsg_reader,
        "sensor ready"
    );

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            event = sensor.events.recv() => {
                let Some(event) = event else {
                    anyhow::bail!("the sensor stopped: {}", reader_error(&sensor));
                };
                handle(&args, &event, &mut out)?;
                problems.on_event(&event, &mut out)?;
                // Drain what is already queued before flushing, so a burst costs one write.
                while let Ok(event) = sensor.events.try_recv() {
                    handle(&args, &event, &mut out)?;
                    problems.on_event(&event, &mut out)?;
                }
                out.flush().context("writing to stdout")?;
            }
            () = Problems::sleep_until(problems.next_deadline()) => {
                problems.on_deadline(&mut out)?;
                out.flush().context("writing to stdout")?;
            }
        }
    }
    if args.kernel_events {
        writeln!(out, "{}", stats_line(&sensor)).context("writing to stdout")?;
    }
    out.flush().context("writing to stdout")?;
    if let Some(exporter) = problems.exporter.take() {
        exporter.shutdown().await;
    }
    drop(sensor);
    tracing::info!("stopped; eBPF programs detached");
    Ok(ExitCode::SUCCESS)
}

/// The Kubernetes exporter when a cluster is configured (see [`K8sConfig::from_run_args`]);
/// `None` means standalone: problems go to stdout as JSON lines. Says which, once.
async fn kubernetes_exporter(
    args: &RunArgs,
    initial: Vec<ConditionChange>,
) -> anyhow::Result<Option<K8sHandle>> {
    let config = K8sConfig::from_run_args(args)
        .await
        .context("configuring the Kubernetes exporter")?;
    let Some(config) = config else {
        tracing::info!(
            "no cluster configured (in-cluster service account, --kubeconfig or KUBECONFIG): \
             running standalone, problems are printed as JSON lines on stdout"
        );
        return Ok(None);
    };
    tracing::info!(node = %config.node_name, "exporting to Kubernetes");
    Ok(Some(
        K8sExporter::start(config, initial).context("starting the Kubernetes exporter")?,
    ))
}

fn handle(
    args: &RunArgs,
    event: &KernelEvent,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    if args.kernel_events {
        let mut line = serde_json::Map::new();
        line.insert("kind".into(), "kernel".into());
        if let serde_json::Value::Object(fields) =
            serde_json::to_value(event).context("encoding an event")?
        {
            line.extend(fields);
        }
        writeln!(out, "{}", serde_json::Value::Object(line)).context("writing to stdout")?;
    }
    Ok(())
}

/// The rules and conditions stage: kernel events in, reports out, to the Kubernetes exporter
/// when a cluster is configured, else as JSON lines on stdout (standalone, DESIGN.md schema).
struct Problems {
    engine: Engine,
    /// Every condition in its default state, for the exporter to initialise the Node with.
    initial: Vec<ConditionChange>,
    exporter: Option<K8sHandle>,
}

impl Problems {
    /// Loads `--config` files, or the embedded defaults when none is given.
    fn load(config: &[PathBuf]) -> Result<Self, ConfigError> {
        let rules = RuleSet::load_or_defaults(config)?;
        tracing::info!(
            files = rules.files.len(),
            rules = rules.rule_count(),
            defaults = config.is_empty(),
            "rules loaded"
        );
        let mut engine = Engine::new(rules);
        let initial = engine.initial_conditions(SystemTime::now());
        Ok(Self { engine, initial, exporter: None })
    }

    fn on_event(
        &mut self,
        event: &KernelEvent,
        out: &mut impl std::io::Write,
    ) -> anyhow::Result<()> {
        let reports = self.engine.handle(event, SystemTime::now());
        self.export(&reports, out)
    }

    fn on_deadline(&mut self, out: &mut impl std::io::Write) -> anyhow::Result<()> {
        let reports = self.engine.on_deadline(SystemTime::now());
        self.export(&reports, out)
    }

    fn next_deadline(&self) -> Option<SystemTime> {
        self.engine.next_deadline()
    }

    /// Sleeps until the deadline, or forever when there is none (no periodic tick).
    async fn sleep_until(deadline: Option<SystemTime>) {
        match deadline {
            Some(at) => {
                let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(wait).await;
            }
            None => std::future::pending().await,
        }
    }

    /// Hands reports to the Kubernetes exporter (which never blocks), or prints them.
    fn export(&self, reports: &[Report], out: &mut impl std::io::Write) -> anyhow::Result<()> {
        for report in reports {
            match &self.exporter {
                Some(exporter) => {
                    tracing::info!(report = %serde_json::to_string(report).unwrap_or_default(), "problem");
                    exporter.export(report);
                }
                None => {
                    serde_json::to_writer(&mut *out, report).context("encoding a report")?;
                    writeln!(out).context("writing to stdout")?;
                }
            }
        }
        Ok(())
    }
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
        "lost": sensor.lost_total(),
    })
}
