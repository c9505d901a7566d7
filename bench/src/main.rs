//! bench: the main job (a full loopback migration) and, in a later issue, the latency
//! benchmark. Runs the real pagesrv, faultd and VMM binaries built beside it.

mod migrate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Loopback migration runs and benchmarks for pagesrv + faultd.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Migrate a patterned guest memory image over loopback into a VMM and check every byte.
    Migrate(migrate::MigrateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Migrate(args) => migrate::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
