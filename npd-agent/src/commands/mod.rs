//! The subcommands. Each `main` returns the process exit code, or an error that `main.rs`
//! prints (with its context chain) before exiting non-zero.

pub mod check_config;
pub mod replay;
pub mod run;
