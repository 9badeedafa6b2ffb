//! The `npd-agent` binary: parses the command line and hands over to `commands`.

use std::process::ExitCode;

use clap::Parser as _;
use npd_agent::{
    cli::{Cli, Command},
    commands,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => commands::run::main(cli.run),
        Some(Command::Run(args)) => commands::run::main(*args),
        Some(Command::CheckConfig(args)) => commands::check_config::main(args),
        Some(Command::Replay(args)) => commands::replay::main(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("npd-agent: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
