//! Command-line interface: `npd-agent [run]`, `check-config`, `replay`. Only parsing: each
//! option's type lives with the module it configures, and `commands` builds their
//! configurations from these values.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::{logging::LogFormat, sensor::SourceChoice};

/// npd: eBPF kernel problem sensor for Kubernetes nodes.
#[derive(Debug, Parser)]
#[command(name = "npd-agent", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `run`, accepted without the subcommand name too.
    #[command(flatten)]
    pub run: RunArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (the default).
    Run(Box<RunArgs>),
    /// Validate rule files: exit 0 when valid, 2 with file, JSON path and reason when not.
    CheckConfig(CheckConfigArgs),
    /// Feed recorded kernel messages through the rules and print what would be reported.
    Replay(ReplayArgs),
}

/// Options of `run`.
#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// Where kernel events come from.
    #[arg(long, value_enum, default_value_t = SourceChoice::Auto)]
    pub source: SourceChoice,
    /// Print every decoded kernel event to stdout as one JSON object per line (a debugging aid).
    #[arg(long)]
    pub kernel_events: bool,
    /// Rule files (NPD system-log-monitor JSON or npd structured rules); the embedded defaults
    /// when none is given.
    #[arg(long = "config", value_name = "FILE")]
    pub config: Vec<PathBuf>,
    /// Size of the eBPF ring buffer in bytes: a power of two from 4096 (one page) to 1 GiB.
    #[arg(long, default_value_t = crate::sensor::DEFAULT_RING_BUFFER_SIZE, value_name = "BYTES",
          value_parser = ring_buffer_size)]
    pub ring_buffer_size: u32,
    /// Where tracefs is. When it is not there, npd mounts it, but only at /sys/kernel/tracing
    /// or on an empty directory, and unmounts it at exit.
    #[arg(long, default_value = "/sys/kernel/tracing", value_name = "DIR")]
    pub tracefs: PathBuf,
    /// The kernel log device read by the `/dev/kmsg` source.
    #[arg(long, default_value = "/dev/kmsg", value_name = "FILE", hide = true)]
    pub kmsg_path: PathBuf,
    /// Export to Kubernetes when a cluster is configured (in-cluster service account,
    /// `--kubeconfig`, `KUBECONFIG` or `--apiserver-override`); `false` always runs standalone.
    #[arg(long, default_value_t = true, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_name = "BOOL")]
    pub enable_k8s_exporter: bool,
    /// Kubeconfig file giving cluster access (else `KUBECONFIG`, else the in-cluster service
    /// account).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The Node's name (else `NODE_NAME`, else the host name).
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,
    /// How often npd's Node conditions are re-written to refresh `lastHeartbeatTime`: from 1s
    /// to 24h.
    #[arg(long, default_value = "5m", value_parser = heartbeat_period, value_name = "DURATION")]
    pub k8s_exporter_heartbeat_period: Duration,
    /// Namespace of the Events npd posts about its Node (NPD's `--event-namespace`).
    #[arg(long, default_value = "default", value_name = "NAMESPACE")]
    pub event_namespace: String,
    /// Address of the health server (`/healthz`, `/conditions`), as NPD's `--address`.
    #[arg(long, default_value = "127.0.0.1", value_name = "IP")]
    pub address: IpAddr,
    /// Port of the health server, as NPD's `--port`; 0 disables it.
    #[arg(long, default_value_t = 20256, value_name = "PORT")]
    pub port: u16,
    /// Address of the Prometheus `/metrics` server, as NPD's `--prometheus-address`.
    #[arg(long, default_value = "127.0.0.1", value_name = "IP")]
    pub prometheus_address: IpAddr,
    /// Port of the Prometheus `/metrics` server, as NPD's `--prometheus-port`; 0 disables it.
    #[arg(long, default_value_t = 20257, value_name = "PORT")]
    pub prometheus_port: u16,
    /// Log format (logs go to stderr; stdout carries the JSON lines).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log level or filter (`info`, `debug`, `npd_agent=trace,warn`); overrides `RUST_LOG`.
    /// Default: `RUST_LOG`, else `info`.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// How long a lost kernel event keeps `/healthz` unhealthy after it is seen (`0s`: losses
    /// are reported in the body and in metrics, never as unhealthy).
    #[arg(long, default_value = "5m", value_parser = crate::time::parse_duration, value_name = "DURATION")]
    pub health_loss_window: Duration,
    /// Enable test controls on the health port: `POST /debug/sensor/kill-reader?down=2s` (kills
    /// the sensor's reader, which then restarts) and `POST /debug/report?reason=..` (feeds a
    /// report through the exporters). Off by default; for tests and demonstrations only.
    #[arg(long)]
    pub debug_endpoints: bool,
    /// Name the pod and container behind each OOM kill, hung task and failed block request,
    /// and post the Event on the pod too. Watches this node's pods (needs `pods list, watch`);
    /// `false` turns it off (the chart then drops that permission).
    #[arg(long, default_value_t = true, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_name = "BOOL")]
    pub pod_attribution: bool,
    /// kubelet's `--root-dir`: pods' volumes are mounted under `<DIR>/pods/<uid>/volumes`.
    #[arg(long, default_value = "/var/lib/kubelet", value_name = "DIR")]
    pub kubelet_root_dir: PathBuf,
    /// The host's `/proc` (in a container, the host's mounted in: `/host/proc`): victims' and
    /// stuck tasks' cgroups, and the host's mount table.
    #[arg(long, default_value = "/proc", value_name = "DIR")]
    pub host_proc: PathBuf,
    /// node-problem-detector's own flags, so that a DaemonSet switches by changing its image.
    #[command(flatten)]
    pub npd: NpdFlags,
}

/// node-problem-detector's command line, accepted unchanged (NPD's `cmd/options`): a
/// DaemonSet that runs NPD keeps its arguments when only its image changes to npd's.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "node-problem-detector flags")]
pub struct NpdFlags {
    /// NPD's system log monitors, comma separated (repeatable): rule files, as `--config`.
    #[arg(
        long = "config.system-log-monitor",
        value_delimiter = ',',
        value_name = "FILES"
    )]
    pub system_log_monitor: Vec<PathBuf>,
    /// NPD's custom plugin monitors, comma separated (repeatable).
    #[arg(
        long = "config.custom-plugin-monitor",
        value_delimiter = ',',
        value_name = "FILES"
    )]
    pub custom_plugin_monitor: Vec<PathBuf>,
    /// NPD's system stats monitors: not implemented by npd; named in a warning, the rest runs.
    #[arg(
        long = "config.system-stats-monitor",
        value_delimiter = ',',
        value_name = "FILES"
    )]
    pub system_stats_monitor: Vec<PathBuf>,
    /// NPD's deprecated `--system-log-monitors`.
    #[arg(
        long = "system-log-monitors",
        value_delimiter = ',',
        value_name = "FILES",
        hide = true
    )]
    pub system_log_monitors: Vec<PathBuf>,
    /// NPD's deprecated `--custom-plugin-monitors`.
    #[arg(
        long = "custom-plugin-monitors",
        value_delimiter = ',',
        value_name = "FILES",
        hide = true
    )]
    pub custom_plugin_monitors: Vec<PathBuf>,
    /// The API server, in NPD's URI form: `https://HOST:PORT?inClusterConfig=false&auth=KUBECONFIG`
    /// (`inClusterConfig` defaults to true; `insecure=true` skips TLS verification).
    #[arg(long, value_name = "URI")]
    pub apiserver_override: Option<String>,
    /// Accepted for NPD: npd never waits for the API server to start (problems found meanwhile
    /// are kept and written once it answers).
    #[arg(long, default_value = "5m", value_parser = crate::time::parse_duration, value_name = "DURATION")]
    pub apiserver_wait_timeout: Duration,
    /// The longest wait between retries while the API server does not answer.
    #[arg(long, default_value = "5s", value_parser = retry_interval, value_name = "DURATION")]
    pub apiserver_wait_interval: Duration,
    /// Post Events (NPD's `--k8s-exporter-write-events`).
    #[arg(long, default_value_t = true, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_name = "BOOL")]
    pub k8s_exporter_write_events: bool,
    /// Write Node conditions (NPD's `--k8s-exporter-update-node-conditions`).
    #[arg(long, default_value_t = true, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_name = "BOOL")]
    pub k8s_exporter_update_node_conditions: bool,
    /// Accepted for NPD; npd writes at most once a second per Event reason.
    #[arg(long, value_name = "QPS", hide = true)]
    pub kube_api_qps: Option<f32>,
    /// Accepted for NPD; see `--kube-api-qps`.
    #[arg(long, value_name = "N", hide = true)]
    pub kube_api_burst: Option<u32>,
    /// NPD's Stackdriver exporter: not implemented by npd; named in a warning.
    #[arg(long = "exporter.stackdriver", value_name = "CONFIG", hide = true)]
    pub stackdriver: Option<String>,
    /// glog's `--v=N`: 0 and 1 log at info, 2 and 3 add npd's debug lines, 4 and more trace
    /// (unless `--log-level` or `RUST_LOG` says otherwise).
    #[arg(long = "v", value_name = "N")]
    pub verbosity: Option<u8>,
    /// glog's flags, accepted: npd always logs to stderr.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          action = ArgAction::Set, value_name = "BOOL", hide = true)]
    pub logtostderr: Option<bool>,
    /// See `--logtostderr`.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          action = ArgAction::Set, value_name = "BOOL", hide = true)]
    pub alsologtostderr: Option<bool>,
    /// glog's other flags, accepted and ignored (npd logs to stderr only).
    #[arg(
        long = "log_dir",
        alias = "log_file",
        alias = "stderrthreshold",
        alias = "vmodule",
        alias = "log_backtrace_at",
        value_name = "VALUE",
        hide = true
    )]
    pub glog_ignored: Vec<String>,
    /// glog's boolean flags, accepted and ignored.
    #[arg(long = "skip_headers", alias = "add_dir_header", alias = "skip_log_headers",
          alias = "one_output", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Append, value_name = "BOOL",
          hide = true)]
    pub glog_ignored_bools: Vec<String>,
}

impl NpdFlags {
    /// The log filter `--v=N` asks for.
    pub fn log_filter(&self) -> Option<&'static str> {
        self.verbosity.map(|v| match v {
            0 | 1 => "info",
            2 | 3 => "info,npd_agent=debug",
            _ => "info,npd_agent=trace",
        })
    }
}

/// `--apiserver-wait-interval`: from 100ms to 10m.
fn retry_interval(text: &str) -> Result<Duration, String> {
    crate::time::parse_bounded(text, Duration::from_millis(100), Duration::from_secs(600))
}

/// `--ring-buffer-size`: see [`crate::sensor::check_ring_buffer_size`].
fn ring_buffer_size(text: &str) -> Result<u32, String> {
    let n: u32 = text
        .parse()
        .map_err(|e| format!("{text:?} is not a size in bytes: {e}"))?;
    crate::sensor::check_ring_buffer_size(n)
}

/// `--k8s-exporter-heartbeat-period`: 0s would write the Node in a tight loop, and a huge value
/// overflows the clock.
fn heartbeat_period(text: &str) -> Result<Duration, String> {
    crate::time::parse_bounded(text, Duration::from_secs(1), Duration::from_secs(24 * 3600))
}

/// Options of `check-config`.
#[derive(Clone, Debug, Args)]
pub struct CheckConfigArgs {
    /// Rule files to validate.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// Options of `replay`.
#[derive(Clone, Debug, Args)]
pub struct ReplayArgs {
    /// Rule files; the embedded defaults when none is given.
    #[arg(long = "config", value_name = "FILE")]
    pub config: Vec<PathBuf>,
    /// Recorded kernel messages (plain text, /dev/kmsg records or dmesg lines); `-` or nothing
    /// for standard input.
    #[arg(value_name = "LOGFILE")]
    pub log: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_is_the_default() {
        let cli =
            Cli::try_parse_from(["npd-agent", "--source", "kmsg", "--kernel-events"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.source, SourceChoice::Kmsg);
        assert!(cli.run.kernel_events);
        let cli = Cli::try_parse_from(["npd-agent", "run", "--source", "ebpf"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Run(args)) if args.source == SourceChoice::Ebpf
        ));
    }

    #[test]
    fn npd_compatible_listen_defaults() {
        let cli = Cli::try_parse_from(["npd-agent"]).unwrap();
        assert_eq!(
            (cli.run.address.to_string(), cli.run.port),
            ("127.0.0.1".into(), 20256)
        );
        assert_eq!(
            (
                cli.run.prometheus_address.to_string(),
                cli.run.prometheus_port
            ),
            ("127.0.0.1".into(), 20257)
        );
        assert_eq!(cli.run.log_format, LogFormat::Text);
        assert_eq!(cli.run.health_loss_window, Duration::from_secs(300));
        assert!(!cli.run.debug_endpoints);
        let cli = Cli::try_parse_from([
            "npd-agent",
            "--address",
            "0.0.0.0",
            "--port",
            "0",
            "--prometheus-port",
            "9100",
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "--health-loss-window",
            "30s",
        ])
        .unwrap();
        assert_eq!(
            (
                cli.run.address.to_string(),
                cli.run.port,
                cli.run.prometheus_port
            ),
            ("0.0.0.0".into(), 0, 9100)
        );
        assert_eq!(cli.run.log_format, LogFormat::Json);
        assert_eq!(cli.run.log_level.as_deref(), Some("debug"));
        assert_eq!(cli.run.health_loss_window, Duration::from_secs(30));
    }

    #[test]
    fn kubernetes_flags_as_npd_spells_them() {
        let cli = Cli::try_parse_from(["npd-agent"]).unwrap();
        assert!(cli.run.enable_k8s_exporter);
        assert_eq!(
            cli.run.k8s_exporter_heartbeat_period,
            Duration::from_secs(300)
        );
        assert_eq!(cli.run.kubeconfig, None);
        let cli = Cli::try_parse_from([
            "npd-agent",
            "--enable-k8s-exporter=false",
            "--kubeconfig=/etc/kubeconfig",
            "--hostname-override",
            "node-1",
            "--k8s-exporter-heartbeat-period=1m30s",
        ])
        .unwrap();
        assert!(!cli.run.enable_k8s_exporter);
        assert_eq!(cli.run.kubeconfig, Some(PathBuf::from("/etc/kubeconfig")));
        assert_eq!(cli.run.hostname_override.as_deref(), Some("node-1"));
        assert_eq!(
            cli.run.k8s_exporter_heartbeat_period,
            Duration::from_secs(90)
        );
        for bad in ["often", "0s", "400000000000y", "25h"] {
            let flag = format!("--k8s-exporter-heartbeat-period={bad}");
            let err = Cli::try_parse_from(["npd-agent", flag.as_str()]).unwrap_err();
            assert!(
                err.to_string().contains("--k8s-exporter-heartbeat-period"),
                "{err}"
            );
        }
    }

    #[test]
    fn npd_command_lines_parse_unchanged() {
        // NPD's own deployment/node-problem-detector.yaml.
        let cli = Cli::try_parse_from([
            "/node-problem-detector",
            "--logtostderr",
            "--config.system-log-monitor=/config/kernel-monitor.json,/config/docker-monitor.json",
        ])
        .unwrap();
        assert_eq!(
            cli.run.npd.system_log_monitor,
            [
                PathBuf::from("/config/kernel-monitor.json"),
                PathBuf::from("/config/docker-monitor.json")
            ]
        );
        assert_eq!(cli.run.npd.logtostderr, Some(true));
        // The deliveryhero chart's default command.
        let cli = Cli::try_parse_from([
            "/node-problem-detector",
            "--logtostderr",
            "--config.system-log-monitor=/config/kernel-monitor.json,/config/docker-monitor.json",
            "--prometheus-address=0.0.0.0",
            "--prometheus-port=20257",
            "--k8s-exporter-heartbeat-period=5m0s",
        ])
        .unwrap();
        assert_eq!(
            cli.run.k8s_exporter_heartbeat_period,
            Duration::from_secs(300)
        );
        assert_eq!(cli.run.prometheus_address.to_string(), "0.0.0.0");
        // The rest of NPD's flags.
        let cli = Cli::try_parse_from([
            "npd-agent",
            "--enable-k8s-exporter",
            "--apiserver-override=https://10.0.0.1:6443?inClusterConfig=false&auth=/var/lib/kubelet/kubeconfig",
            "--apiserver-wait-timeout=2m",
            "--apiserver-wait-interval=10s",
            "--k8s-exporter-write-events=false",
            "--k8s-exporter-update-node-conditions",
            "--event-namespace=kube-system",
            "--hostname-override=node-1",
            "--address=0.0.0.0",
            "--port=20256",
            "--config.custom-plugin-monitor=/config/a.json",
            "--config.custom-plugin-monitor=/config/b.json,/config/c.json",
            "--config.system-stats-monitor=/config/system-stats-monitor.json",
            "--alsologtostderr",
            "--v=2",
            "--kube-api-qps=500",
            "--kube-api-burst=500",
        ])
        .unwrap();
        let npd = &cli.run.npd;
        assert!(cli.run.enable_k8s_exporter);
        assert!(!npd.k8s_exporter_write_events);
        assert!(npd.k8s_exporter_update_node_conditions);
        assert_eq!(cli.run.event_namespace, "kube-system");
        assert_eq!(npd.apiserver_wait_interval, Duration::from_secs(10));
        assert_eq!(npd.custom_plugin_monitor.len(), 3);
        assert_eq!(npd.log_filter(), Some("info,npd_agent=debug"));
        assert!(npd.apiserver_override.as_deref().unwrap().contains("auth="));
        // Go's booleans take `=false`, never a separate word.
        assert!(Cli::try_parse_from(["npd-agent", "--enable-k8s-exporter", "false"]).is_err());
        let cli = Cli::try_parse_from(["npd-agent", "--enable-k8s-exporter=false"]).unwrap();
        assert!(!cli.run.enable_k8s_exporter);
    }

    #[test]
    fn ring_buffer_size_is_checked_at_start() {
        let cli = Cli::try_parse_from(["npd-agent", "--ring-buffer-size", "8192"]).unwrap();
        assert_eq!(cli.run.ring_buffer_size, 8192);
        for bad in ["0", "4095", "5000", "2048", "2147483648", "-1", "lots"] {
            let flag = format!("--ring-buffer-size={bad}");
            let err = Cli::try_parse_from(["npd-agent", flag.as_str()]).unwrap_err();
            assert!(
                err.to_string().contains("--ring-buffer-size"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn check_config_needs_files() {
        assert!(Cli::try_parse_from(["npd-agent", "check-config"]).is_err());
    }
}
