//! bench: the main job (a full loopback live migration of a KVM guest) and the latency
//! benchmark. Runs the real pagesrv, faultd and VMM binaries built beside it.

mod clones;
mod fleet;
mod floor;
mod huge;
mod hugetlb;
mod latency;
mod link;
mod matrix;
mod migrate;
mod procs;
mod profiles;
mod restore;
mod scenario;
mod store_server;
mod svg;
mod tuning;

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
    /// Live-migrate a running KVM guest over loopback and report what both sides saw.
    Migrate(migrate::MigrateArgs),
    /// Measure fault latency and throughput of the real pair against this machine's floor.
    Latency(scenario::LatencyArgs),
    /// Migrate many VMs at once through one pagesrv, against one VM alone.
    Fleet(fleet::FleetArgs),
    /// Restore one template to many destinations at once (a clone storm), against one
    /// restore alone: from a memory file, or cold from an object store.
    Clones(clones::ClonesArgs),
    /// Run the features together: strategy × saving × page size, every cell verified.
    Matrix(matrix::MatrixArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Migrate(args) => migrate::run(&args),
        Command::Latency(args) => latency::run(&args),
        Command::Fleet(args) => fleet::run(&args),
        Command::Clones(args) => clones::run(&args),
        Command::Matrix(args) => matrix::run(&args),
    };
    procs::remove_key();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
        let cli = <super::Cli as clap::Parser>::try_parse_from([
            "bench",
            "latency",
            "--tuning",
            "same-cpu",
            "--compare-levers",
            "default,split-cpu+busy-poll=20",
        ])
        .unwrap();
        let super::Command::Latency(args) = cli.command else {
            panic!("not latency")
        };
        assert_eq!(args.compare_levers.len(), 2);
        assert_eq!(args.compare_levers[1].busy_poll_us, 20);
    }
}
