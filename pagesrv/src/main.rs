//! pagesrv: serves a paused VM's memory file to a postcopy destination (faultd).
//!
//! Exit codes: 0 a destination verified every page and completed the migration (every VM's,
//! with several); 1 a fatal error, or the migration failed (the destination reported a
//! digest mismatch or its own failure: keep the source VM); 2 bad usage; 3 every page
//! reached the destination but it compared no digests (`faultd --no-verify`): nothing proves
//! the source VM redundant. With `--vmm-uds` the source VMM is told the same (see
//! `common::source_link`).
#![forbid(unsafe_code)]

mod admission;
mod claim;
mod fleet;
mod handshake;
mod metrics;
mod precopy;
mod prepage;
mod push_order;
mod report;
mod served;
mod server;
mod session;
mod source;
mod store_cmd;
mod store_source;
mod vm_memory;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use common::working_set::WorkingSet;
use tracing::{info, warn};

use crate::metrics::Published;
use crate::precopy::Strategy;
use crate::report::Events;
use crate::server::{ServerConfig, serve};
use crate::session::{SessionConfig, error_chain};
use crate::vm_memory::VmMemory;

/// Serve a paused VM's memory to a postcopy destination.
///
/// Maps the memory file read-only and serves its pages over TCP to faultd: requested pages at
/// once on the urgent connection, every other page pushed in the background on the bulk
/// connection (zero pages as ranges without payload). Serves until a destination has
/// verified every page and completed, then exits 0; a session that breaks off (or goes
/// silent) waits for the destination to reconnect and resume (a restarted pagesrv on the same
/// file works the same way). If the destination reports a failure or a digest mismatch,
/// pagesrv exits 1: the source must keep the VM.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The guest memory file (e.g. /dev/shm/vm1, a Firecracker snapshot's memory file, or a
    /// hugetlbfs file) of a paused VM, served under its file name; `NAME=PATH` serves it
    /// under NAME. A snapshot in an object store, `s3://BUCKET/SNAPSHOT` (uploaded with
    /// `pagesrv store put`), is served through a local cache (--store-cache) to any number
    /// of restores. Repeat to serve several VMs at once (destinations name theirs with
    /// `faultd --vm NAME`).
    #[arg(long, value_name = "[NAME=]PATH", value_parser = fleet::parse_vm_spec,
          required_unless_present_any = ["gen_psk", "vmm_uds", "vm_dir", "derive_vm_key"])]
    vm_mem: Vec<fleet::VmSpec>,
    /// With `--vm-mem NAME=s3://BUCKET/SNAPSHOT` (a snapshot `pagesrv store put` uploaded;
    /// credentials and endpoint from the `AWS_*` environment, as for `pagesrv store`): the
    /// directory of its local cache (a file the size of the image, unlinked at once).
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    store_cache: PathBuf,
    /// The most a stored snapshot's local cache holds before it evicts what was used least
    /// recently, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    store_cache_mib: u64,
    /// Serve every regular file in DIR as a paused VM's memory, each under its file name.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["vm_mem", "vmm_uds", "gen_psk"])]
    vm_dir: Option<PathBuf>,
    /// Take a running VM's RAM from its VMM instead (a Unix socket this pagesrv listens on;
    /// the VMM hands over its RAM fd, answers dirty-page requests and pauses on request: see
    /// `common/src/source_link.rs`). Needed for --strategy precopy and hybrid. `NAME=PATH`
    /// serves it under NAME; repeat to migrate several running VMs at once (each its own
    /// precopy; destinations name theirs with `faultd --vm NAME`).
    #[arg(long, value_name = "[NAME=]PATH", conflicts_with = "vm_mem")]
    vmm_uds: Vec<String>,
    /// Free-page hints of the paused VM (with --vm-mem): a bitmap of its memory in 4 KiB
    /// pages, bit i%8 of byte i/8 set for a page its allocator holds free, ceil(pages/8) bytes
    /// (see common/src/free_hints.rs); with one VM only. Those pages are never sent: the destination gets them as
    /// zero, resolves faults on them locally, and the digests count them as zero.
    #[arg(long, value_name = "FILE", conflicts_with = "vmm_uds")]
    free_pages: Option<PathBuf>,
    /// What happens before the destination resumes: `postcopy` (pause the source first, move
    /// every page afterwards), `precopy` (rounds while the source runs until they converge,
    /// then stop-and-copy), `hybrid` (rounds, then postcopy for what changed since).
    #[arg(long, value_enum, default_value = "postcopy")]
    strategy: Strategy,
    /// Downtime budget of the precopy convergence rule: switch once what is left can be sent
    /// in this many milliseconds at the last round's bandwidth.
    #[arg(long, value_name = "MS", default_value_t = 20)]
    max_downtime_ms: u64,
    /// Control socket for orchestrators: newline-delimited JSON; `{"cmd":"status"}`,
    /// `{"cmd":"start-postcopy"}` (switch at the end of the current round), and the events
    /// `round`, `converged`, `switched`, `completed`, `failed`.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Write a new random pre-shared key to FILE (mode 0600; an existing file is never
    /// replaced), then exit. Give the same file to pagesrv and faultd with --psk-file.
    #[arg(long, value_name = "FILE", conflicts_with = "vm_mem")]
    gen_psk: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Serve only destinations with this page size (4k or 2m). Without it, pagesrv serves the
    /// page size each destination asks for, if the file is a whole number of such pages (a
    /// Firecracker snapshot of a huge-page guest is an ordinary file served in 2 MiB pages).
    #[arg(long, value_parser = parse_page_size)]
    page_size: Option<u64>,
    /// Keep serving further sessions instead of exiting after the first that completed or
    /// failed.
    #[arg(long, conflicts_with = "vmm_uds")]
    serve_forever: bool,
    /// A link with no frame from the destination for this many seconds is dead (the session
    /// waits for a reconnect). Both sides send heartbeats on idle connections.
    #[arg(long, value_name = "SECS", default_value = "2", value_parser = common::netopt::parse_seconds)]
    link_timeout: std::time::Duration,
    /// Most pages pushed after a requested page (the pre-paging window; 0 disables; at
    /// most 8 MiB of pages, so 4 with 2 MiB pages). With `--prepage adaptive` the window
    /// follows the guest up to this; with `fixed` it is always this.
    #[arg(long, value_name = "PAGES", default_value_t = 1024)]
    prepage_window: u64,
    /// `adaptive`: learn each access stream's stride and direction from the requests; grow
    /// the window while the guest follows it, shrink it on random access. `fixed`: always
    /// `--prepage-window` pages forward.
    #[arg(long, value_enum, default_value = "adaptive")]
    prepage: PrepageChoice,
    /// No background push: serve requested pages, the pages pre-paging pushes after them
    /// (`--prepage-window 0` for none) and a `--prefetch` working set, nothing else.
    #[arg(long)]
    no_push: bool,
    /// A working set recorded by `faultd --record-working-set` on this memory image (with
    /// one VM only): its pages are pushed first, in the order the guest first touched them. A file that is
    /// damaged or was recorded on another image is reported and ignored.
    #[arg(long, value_name = "FILE")]
    prefetch: Option<PathBuf>,
    /// Serve metrics (OpenMetrics text: the running session's pages by kind and bytes, the
    /// sessions so far by outcome) on `GET /metrics` at this address.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<SocketAddr>,
    /// Pin the urgent thread (the one that answers page requests) to this CPU.
    #[arg(long, value_name = "CPU")]
    urgent_cpu: Option<usize>,
    /// Pin the push thread (the background stream) to these CPUs, e.g. `1` or `2-3`
    /// (default: every CPU pagesrv may use).
    #[arg(long, value_name = "LIST", value_parser = common::sched::parse_cpu_list)]
    push_cpus: Option<common::sched::CpuList>,
    /// After each request the urgent thread polls for the next one this many microseconds
    /// before sleeping (0: sleep at once). Costs CPU; helps where waking a sleeping thread
    /// is slow. At most 1000.
    #[arg(long, value_name = "US", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=common::sched::MAX_BUSY_POLL_US))]
    busy_poll_us: u64,
    /// Benchmark baseline: push pages on the urgent connection too, so requested pages queue
    /// behind background pages (what a single-connection design does).
    #[arg(long)]
    naive_single_connection: bool,
    /// The master key file (make one with --gen-psk; it must belong to this user and be
    /// readable by its owner only). Each VM's key derives from it and the VM's name:
    /// destinations prove they hold their VM's key (this file, or the VM key file
    /// --derive-vm-key writes) before any page moves, pagesrv proves it too, and every frame
    /// after the handshake is encrypted and authenticated.
    #[arg(long, value_name = "FILE")]
    psk_file: Option<PathBuf>,
    /// Write the key of VM NAME (derived from --psk-file) to a new FILE, then exit: a
    /// destination that holds it can migrate that VM and no other. Repeatable.
    #[arg(long, value_name = "NAME=FILE", requires = "psk_file", conflicts_with_all = ["vm_mem", "vm_dir", "vmm_uds"])]
    derive_vm_key: Vec<String>,
    /// INSECURE: serve without a key. Anyone who can connect (every local user on
    /// loopback) can read the VM's memory and tell pagesrv the migration completed, so the
    /// source VM may be destroyed while no destination holds it. faultd needs the same flag.
    #[arg(long, conflicts_with = "psk_file")]
    insecure_no_key: bool,
    /// With --insecure-no-key, also allow a non-loopback listen address.
    #[arg(long, requires = "insecure_no_key")]
    insecure_listen: bool,
    /// Most connections in their handshake at once (at most 1024; fewer if the file limit
    /// is low). When all are taken, a new connection makes room by closing the one that
    /// made the least progress.
    #[arg(long, value_name = "N", default_value_t = admission::MAX_HANDSHAKES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=admission::MAX_HANDSHAKES as u64))]
    max_handshakes: usize,
    /// Serve every --vm-mem file as a template: any number of destinations restore it at
    /// once, each in its own session, and pagesrv keeps serving it (a stored snapshot,
    /// `s3://...`, always is one). Without it a VM has one destination at a time.
    #[arg(long, conflicts_with = "vmm_uds")]
    template: bool,
    /// Most restores of one template at once (connecting, running, or cut off and waiting
    /// for their destinations); more are refused as busy until one ends.
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    max_restores: usize,
    /// Test-only fault injection: send this page with one byte flipped (the destination's
    /// digest check must catch it).
    #[arg(long, hide = true, value_name = "PAGE")]
    corrupt_page: Option<u64>,
}

/// What pagesrv does instead of serving.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Snapshots in an S3-compatible object store: `put`, `get`, `ls`, `rm`. Credentials and
    /// the endpoint come from the standard environment: AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL (and AWS_ALLOW_HTTP=true for a
    /// plain-HTTP endpoint).
    Store {
        #[command(subcommand)]
        action: store_cmd::StoreAction,
    },
}

/// `--prepage`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PrepageChoice {
    /// Learnt from the requests.
    Adaptive,
    /// Always `--prepage-window` pages forward.
    Fixed,
}

fn parse_page_size(text: &str) -> Result<u64, String> {
    match text.to_ascii_lowercase().as_str() {
        "4k" | "4096" => Ok(4096),
        "2m" | "2097152" => Ok(2 << 20),
        _ => Err(format!("unsupported page size {text:?}: use 4k or 2m")),
    }
}

/// The working set of `--prefetch`, if it is whole and was recorded on this image; else
/// says why it is ignored (the migration goes on without it).
fn load_prefetch(path: &Path, source: &VmMemory) -> Option<Arc<WorkingSet>> {
    let checked = WorkingSet::read(path).and_then(|set| {
        let total = source.size_bytes() / u64::from(set.page_size.max(1));
        set.check_image(set.page_size, total, source.image_id())?;
        Ok(set)
    });
    match checked {
        Ok(set) => {
            info!(
                pages = set.pages.len(),
                file = %path.display(),
                "prefetch: the recorded working set is pushed first"
            );
            Some(Arc::new(set))
        }
        Err(e) => {
            warn!(
                file = %path.display(),
                error = %error_chain(&e),
                "ignoring the --prefetch working set"
            );
            None
        }
    }
}

fn run(cli: Cli) -> Result<server::Verdict> {
    if let Some(path) = &cli.gen_psk {
        common::auth::Psk::generate(path)?;
        println!(
            "pagesrv: wrote a new key to {} (mode 0600); give it to pagesrv and faultd with --psk-file",
            path.display()
        );
        return Ok(server::Verdict::Verified);
    }
    let key = match (&cli.psk_file, cli.insecure_no_key) {
        (Some(path), _) => {
            let file = common::auth::Psk::load(path)?;
            if let Some(vm) = file.vm {
                bail!(
                    "{} holds the key of VM {vm} only; pagesrv needs the master key (the file --gen-psk wrote)",
                    path.display()
                );
            }
            file.psk
        }
        (None, true) => {
            warn!(
                "--insecure-no-key: anyone who can connect can read the VM's memory and end its migration"
            );
            common::auth::Psk::unkeyed()
        }
        (None, false) => bail!("no key: give --psk-file FILE, or --insecure-no-key"),
    };
    if !cli.derive_vm_key.is_empty() {
        derive_vm_keys(&key, &cli.derive_vm_key)?;
        return Ok(server::Verdict::Verified);
    }
    let mut vms = served::open_vms(&served::Sources {
        vm_dir: cli.vm_dir.as_deref(),
        vm_mem: &cli.vm_mem,
        vmm_uds: &cli.vmm_uds,
        strategy: cli.strategy,
        max_downtime: Duration::from_millis(cli.max_downtime_ms),
        store_cache: &cli.store_cache,
        store_cache_mib: cli.store_cache_mib,
        templates: cli.template,
    })?;
    if vms.len() > 1 && (cli.free_pages.is_some() || cli.prefetch.is_some()) {
        bail!(
            "--free-pages and --prefetch describe one VM's memory: give them with one --vm-mem only"
        );
    }
    if let Some(path) = &cli.free_pages {
        let Some(source) = vms[0].source.file_mut() else {
            bail!("--free-pages describes a memory file's pages, not a stored snapshot's");
        };
        let hints = common::free_hints::FreeHints::load(path, source.size_bytes())?;
        info!(
            free_pages = hints.free_pages(),
            "free-page hints: those pages are served as zero"
        );
        source.set_free_hints(hints);
    }
    for vm in &vms {
        // Every destination asks for 4 KiB or 2 MiB pages: a file that is not even a whole
        // number of 4 KiB pages (or of the --page-size pages) can serve none.
        vm.source
            .paged(cli.page_size.unwrap_or(4096))
            .with_context(|| format!("cannot serve VM {}", vm.name))?;
    }
    let prefetch = match (&cli.prefetch, &vms[0].source) {
        (Some(path), source) => load_prefetch(path, source),
        // A stored snapshot's recorded working set goes first, as --prefetch would.
        (None, VmMemory::Store(store)) if vms.len() == 1 => store.working_set().map(Arc::new),
        (None, _) => None,
    };
    let config = ServerConfig {
        key,
        handshake_capacity: handshake_capacity().min(cli.max_handshakes),
        insecure_listen: cli.insecure_listen,
        listen: cli.listen,
        // A template serves any number of restores: pagesrv never ends with one.
        serve_forever: cli.serve_forever || vms.iter().any(|vm| vm.template),
        max_restores: cli.max_restores,
        page_size: cli.page_size,
        session: SessionConfig {
            prepage_window_pages: cli.prepage_window,
            prepage: match cli.prepage {
                PrepageChoice::Adaptive => prepage::Policy::Adaptive,
                PrepageChoice::Fixed => prepage::Policy::Fixed,
            },
            push: !cli.no_push,
            corrupt_page: cli.corrupt_page,
            naive_single_connection: cli.naive_single_connection,
            liveness: common::netopt::Liveness::new(cli.link_timeout),
            fast_path: common::sched::FastPath::new(
                cli.urgent_cpu,
                cli.push_cpus.clone(),
                std::time::Duration::from_micros(cli.busy_poll_us),
            )
            .context("bad --urgent-cpu or --push-cpus")?,
            prefetch,
        },
    };
    let names: Vec<_> = vms.iter().map(|vm| (vm.name, vm.template)).collect();
    let published = cli.metrics_listen.map(|_| Arc::new(Published::new(&names)));
    if let (Some(addr), Some(published)) = (cli.metrics_listen, &published) {
        let published = published.clone();
        let server =
            common::metrics::MetricsServer::start(addr, Arc::new(move || published.snapshot()))?;
        info!(addr = %server.addr(), "serving metrics");
    }
    let events = Events {
        control: cli
            .control
            .as_deref()
            .map(|path| served::control_server(path, &vms))
            .transpose()?,
        metrics: published,
    };
    serve(&vms, &config, events)
}

/// `--derive-vm-key NAME=FILE`: writes each VM's key.
fn derive_vm_keys(master: &common::auth::Psk, specs: &[String]) -> Result<()> {
    for spec in specs {
        let (name, file) = spec
            .split_once('=')
            .with_context(|| format!("--derive-vm-key {spec:?}: expected NAME=FILE"))?;
        let vm = common::wire::VmName::new(name)
            .map_err(|e| anyhow::anyhow!("--derive-vm-key {spec:?}: {e}"))?;
        master.write_vm_key(&vm, Path::new(file))?;
        println!(
            "pagesrv: wrote the key of VM {name} to {file} (mode 0600); give it to that VM's faultd with --psk-file"
        );
    }
    Ok(())
}

/// How many handshakes may run at once: [`admission::MAX_HANDSHAKES`], fewer where the
/// file limit is low (after raising the soft limit to the hard one).
fn handshake_capacity() -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let limit = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard))
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() =>
        {
            hard
        }
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    };
    // Half the descriptors for sessions, memory files and the rest.
    usize::try_from(limit / 2)
        .unwrap_or(usize::MAX)
        .clamp(16, admission::MAX_HANDSHAKES)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Store { action }) = &cli.command {
        return match store_cmd::run(action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pagesrv: error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if cli.psk_file.is_none() && !cli.insecure_no_key && cli.gen_psk.is_none() {
        use clap::CommandFactory;
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "no key: give --psk-file FILE (make one with: pagesrv --gen-psk FILE), or --insecure-no-key to serve without authentication (anyone who can connect can then read the VM's memory and end its migration)",
            )
            .exit();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(server::Verdict::Verified) => ExitCode::SUCCESS,
        Ok(server::Verdict::Unverified) => {
            eprintln!(
                "pagesrv: every page reached the destination, but it compared no digests (faultd --no-verify): exit 3"
            );
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("pagesrv: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod cli_tests {
    use clap::{CommandFactory, Parser};

    const ARGS: &[&str] = &[
        "pagesrv",
        "--vm-mem",
        "/x",
        "--insecure-no-key",
        "--urgent-cpu",
        "0",
        "--push-cpus",
        "1-3",
        "--busy-poll-us",
        "30",
    ];

    #[test]
    fn the_command_line_is_consistent_and_takes_the_fast_path_flags() {
        super::Cli::command().debug_assert();
        let cli = super::Cli::try_parse_from(ARGS).unwrap();
        assert_eq!(cli.busy_poll_us, 30);
        assert_eq!(cli.push_cpus.unwrap().0, vec![1, 2, 3]);
        let bad: Vec<&str> = ARGS
            .iter()
            .map(|a| if *a == "1-3" { "3-1" } else { a })
            .collect();
        assert!(super::Cli::try_parse_from(bad).is_err());
    }
}
