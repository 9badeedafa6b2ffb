//! `npd-agent check-config FILE...`.

use std::process::ExitCode;

use crate::cli::CheckConfigArgs;

/// Validates the rule files.
pub fn main(_args: CheckConfigArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("check-config is not implemented yet (rules issue)")
}
