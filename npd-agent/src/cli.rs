//! Command-line interface: `npd-agent [run]`, `check-config`, `replay`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    Run(RunArgs),
    /// Validate rule files: exit 0 when valid, 2 with file, JSON path and reason when not.
    CheckConfig(CheckConfigArgs),
    /// Feed recorded kernel messages through the rules and print what would be reported.
    Replay(ReplayArgs),
}

/// Where kernel events come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum SourceChoice {
    /// eBPF when it can be used, else `/dev/kmsg`.
    #[default]
    Auto,
    /// eBPF only; fail when it cannot be used.
    Ebpf,
    /// `/dev/kmsg` only (kernel messages; no structured events).
    Kmsg,
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
    /// Size of the eBPF ring buffer in bytes (a power of two, at least one page).
    #[arg(long, default_value_t = 16 * 1024 * 1024, value_name = "BYTES")]
    pub ring_buffer_size: u32,
    /// Where tracefs is (mounted there when it is not).
    #[arg(long, default_value = "/sys/kernel/tracing", value_name = "DIR")]
    pub tracefs: PathBuf,
    /// The kernel log device read by the `/dev/kmsg` source.
    #[arg(long, default_value = "/dev/kmsg", value_name = "FILE", hide = true)]
    pub kmsg_path: PathBuf,
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
        let cli = Cli::try_parse_from(["npd-agent", "--source", "kmsg", "--kernel-events"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.source, SourceChoice::Kmsg);
        assert!(cli.run.kernel_events);
        let cli = Cli::try_parse_from(["npd-agent", "run", "--source", "ebpf"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Run(RunArgs { source: SourceChoice::Ebpf, .. }))));
    }

    #[test]
    fn check_config_needs_files() {
        assert!(Cli::try_parse_from(["npd-agent", "check-config"]).is_err());
    }
}
