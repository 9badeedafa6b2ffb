//! `npd-agent check-config FILE...`: validates rule files together (as `--config` would load
//! them). Exit 0 when valid; otherwise exit 2 and one line per problem on stderr:
//! `FILE: JSON_PATH: REASON`. A monitor of a plugin npd does not run (which the agent names
//! and skips) is a problem here.

use std::process::ExitCode;

use crate::{cli::CheckConfigArgs, rules::RuleSet};

/// Validates the rule files.
pub fn main(args: CheckConfigArgs) -> anyhow::Result<ExitCode> {
    match RuleSet::load(&args.files) {
        Ok(set) if !set.unsupported.is_empty() => {
            for problem in set.unsupported_problems() {
                eprintln!("{problem}");
            }
            Ok(ExitCode::from(2))
        }
        Ok(set) => {
            println!(
                "{} file(s) valid: {} rule(s), {} condition(s)",
                set.files.len(),
                set.rule_count(),
                set.files.iter().map(|f| f.conditions.len()).sum::<usize>()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            for problem in &e.problems {
                eprintln!("{problem}");
            }
            Ok(ExitCode::from(2))
        }
    }
}
