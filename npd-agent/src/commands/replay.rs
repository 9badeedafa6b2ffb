//! `npd-agent replay --config FILE... [LOGFILE|-]`.

use std::process::ExitCode;

use crate::cli::ReplayArgs;

/// Replays recorded kernel messages through the rules.
pub fn main(_args: ReplayArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("replay is not implemented yet (rules issue)")
}
