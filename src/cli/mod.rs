//! The `silt` command line: its arguments (args.rs, the only file that knows clap), one
//! function per command (commands.rs), how each report prints (printers.rs) and the progress
//! bar (progress.rs, the only file that knows indicatif). It must not hold pipeline logic.

mod args;
mod commands;
mod printers;
mod progress;

pub use args::{Cli, parse};
pub use commands::run;

/// An exit code chosen by a command after it printed its own report (failed data tests,
/// findings): main exits with it and prints nothing more. Returned instead of exiting on the
/// spot, so the lake's lease is released first.
#[derive(Debug)]
pub struct ExitWith(pub u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

/// The log filter for `-v` counts: silt's own steps, and its dependencies (delta-rs,
/// delta-kernel, DataFusion) only from -vvv, since their errors reach the user as silt's, once.
/// A forget never logs what it erases: delta-rs traces file statistics (ids) at debug level, so
/// dependencies stay silent at every verbosity then, `SILT_LOG` included.
pub fn log_filter(cli: &Cli) -> tracing_subscriber::EnvFilter {
    let forget = matches!(cli.command, args::Command::Forget(_));
    let filter = match (cli.verbose, forget) {
        (0, _) => "off,silt=warn",
        (1, _) => "off,silt=info",
        (2, _) | (_, true) => "off,silt=debug",
        _ => "debug,silt=trace",
    };
    match std::env::var("SILT_LOG") {
        Ok(_) if !forget => tracing_subscriber::EnvFilter::try_from_env("SILT_LOG")
            .unwrap_or_else(|_| filter.into()),
        _ => filter.into(),
    }
}
