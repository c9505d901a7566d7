//! Starting the workspace's binaries (built beside `bench`) as child processes.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, ensure};

/// A helper process, killed on drop if still running.
pub struct Guard(pub Child);

/// The daemons started and not yet reaped, for [`kill_children`].
static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Lists a child for [`kill_children`] (call [`unregister`] before reaping it).
pub(crate) fn register(pid: u32) {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
}

/// Called before a child is reaped: a reaped pid may soon name another process.
pub(crate) fn unregister(pid: u32) {
    CHILDREN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|&p| p != pid);
}

impl Guard {
    /// Wraps a started daemon (registered so an interrupted bench can stop it).
    pub fn new(child: Child) -> Guard {
        register(child.id());
        Guard(child)
    }
}

impl Guard {
    /// Waits for the process to end (it is no longer killed on interrupt: once reaped its
    /// pid may name another process).
    ///
    /// # Errors
    /// The wait failing.
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.forget();
        self.0.wait()
    }

    /// Waits at most `limit` for the process to end; `None` if it still runs.
    ///
    /// # Errors
    /// The wait failing.
    pub fn wait_at_most(
        &mut self,
        limit: std::time::Duration,
    ) -> std::io::Result<Option<std::process::ExitStatus>> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            // try_wait reaps: forget the pid first.
            self.forget();
            if let Some(status) = self.0.try_wait()? {
                return Ok(Some(status));
            }
            if std::time::Instant::now() >= deadline {
                register(self.0.id());
                return Ok(None);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn forget(&self) {
        unregister(self.0.id());
    }
}

/// Runs `cmd` to its end like `Command::output`, registered meanwhile so an interrupted
/// bench stops it too.
///
/// # Errors
/// Starting or waiting for it.
pub fn output_registered(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id();
    register(pid);
    let out = child.wait_with_output();
    // A reaped pid may name another process soon: not ours to kill any more.
    unregister(pid);
    out
}

/// How the daemons the bench starts authenticate: `None` until the first start, then a key
/// made for this run (the default), or no key (`--insecure-no-key`, for comparisons).
static KEYING: std::sync::Mutex<Option<Keying>> = std::sync::Mutex::new(None);

#[derive(Debug, Clone)]
enum Keying {
    Key(PathBuf),
    Insecure,
}

/// Runs the daemons without a key (`--insecure-no-key` on both): only for measuring what
/// the key costs.
pub fn run_without_key() {
    *KEYING.lock().unwrap_or_else(|p| p.into_inner()) = Some(Keying::Insecure);
}

/// The arguments that give a daemon this run's key: made (`pagesrv --gen-psk` does the
/// same) on first use, in a private file removed when the bench ends or is interrupted.
///
/// # Errors
/// The key file cannot be made.
pub fn key_args() -> Result<Vec<std::ffi::OsString>> {
    let mut keying = KEYING.lock().unwrap_or_else(|p| p.into_inner());
    if keying.is_none() {
        let path = std::env::temp_dir().join(format!("pagemig-bench-{}.key", std::process::id()));
        let _ = std::fs::remove_file(&path);
        common::auth::Psk::generate(&path)
            .with_context(|| format!("cannot make a key at {}", path.display()))?;
        remove_on_interrupt(&path);
        *keying = Some(Keying::Key(path));
    }
    Ok(match keying.as_ref().expect("set above") {
        Keying::Key(path) => vec!["--psk-file".into(), path.into()],
        Keying::Insecure => vec!["--insecure-no-key".into()],
    })
}

/// Removes this run's key file (at the end of the bench).
pub fn remove_key() {
    if let Some(Keying::Key(path)) = KEYING.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = std::fs::remove_file(path);
    }
}

/// Files and directories an interrupted bench removes on its way out.
static LEFTOVERS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Removes `path` if the bench is interrupted (it is the caller's to remove otherwise).
pub fn remove_on_interrupt(path: &Path) {
    LEFTOVERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(path.to_path_buf());
}

/// Removes what [`remove_on_interrupt`] listed.
pub fn remove_leftovers() {
    for path in LEFTOVERS.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = std::fs::remove_dir_all(path).or_else(|_| std::fs::remove_file(path));
    }
}

/// Kills every daemon still registered (the bench is being interrupted; from a terminal
/// they got the signal too, from `kill` they did not).
pub fn kill_children() {
    for &pid in CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        // SAFETY: kill(2) with a pid we started and have not reaped (a Guard drops it from
        // the list before waiting for it), so it cannot name a recycled process.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.forget();
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Path of a binary built beside this one.
///
/// # Errors
/// The binary is not built.
pub fn sibling(name: &str) -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    ensure!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --release --workspace --bins`, as scripts/migrate.sh does)",
        path.display()
    );
    Ok(path)
}

/// The first line the child prints on stdout; the rest is drained in the background so the
/// child never blocks on a full pipe.
///
/// # Errors
/// No stdout, or reading it failed.
pub fn first_line(child: &mut Child) -> Result<String> {
    let out = child.stdout.take().context("no stdout")?;
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
    });
    Ok(line.trim_end().to_owned())
}

/// What [`watch`] saw of a process until it exited.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Peak private (anonymous) resident memory, bytes.
    pub peak_anon_rss: u64,
    /// Peak resident memory of every kind (anonymous, file, shared), bytes.
    pub peak_rss: u64,
    /// CPU time (user + system) at the last sample, ms (10 ms resolution).
    pub cpu_ms: f64,
}

/// CPU time (user + system) a process has used so far, ms; `None` once it is gone.
pub fn cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 * 1000.0 / hz)
}

/// Samples a process's private (anonymous) resident memory and CPU time every 20 ms until it
/// exits (its peak of all resident memory is the kernel's, `VmHWM`).
pub fn watch(pid: u32) -> std::thread::JoinHandle<Usage> {
    watch_every(pid, std::time::Duration::from_millis(20))
}

/// [`watch`], sampling every `interval` (a clone storm watches 33 processes: reading /proc
/// for each every 20 ms took 5 % of the two CPUs from what it measures).
pub fn watch_every(pid: u32, interval: std::time::Duration) -> std::thread::JoinHandle<Usage> {
    std::thread::spawn(move || {
        let mut usage = Usage::default();
        while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            };
            // The kernel's own high-water mark: exact however seldom it is read.
            if let Some(kib) = field("VmHWM:").or(field("VmRSS:")) {
                usage.peak_rss = usage.peak_rss.max(kib << 10);
            }
            match field("RssAnon:") {
                Some(kib) => usage.peak_anon_rss = usage.peak_anon_rss.max(kib << 10),
                None => break, // a zombie: exited
            }
            if let Some(ms) = cpu_ms(pid) {
                usage.cpu_ms = ms;
            }
            std::thread::sleep(interval);
        }
        usage
    })
}

/// Starts the child inside network namespace `name`.
fn in_netns(cmd: &mut Command, name: &str) -> Result<()> {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let file = std::fs::File::open(format!("/var/run/netns/{name}"))
        .with_context(|| format!("open network namespace {name}"))?;
    let fd: OwnedFd = file.into();
    // SAFETY: between fork and exec the closure makes one system call on an fd that stays
    // open (moved into the closure, which lives in the Command) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Sends a child's stderr (its log) to `log`, or leaves it on ours.
fn log_to(cmd: &mut Command, log: Option<&Path>) -> Result<()> {
    if let Some(path) = log {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        cmd.stderr(file);
    }
    Ok(())
}

/// The last `lines` lines of a log file, for an error message.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Starts pagesrv on `mem` at a free loopback port with `extra` arguments; returns it and
/// its address. Its log goes to `log`, or to our stderr.
///
/// # Errors
/// pagesrv is missing or did not start.
pub fn start_pagesrv(mem: &Path, extra: &[&str], log: Option<&Path>) -> Result<(Guard, String)> {
    start_pagesrv_at(mem, "127.0.0.1:0", None, extra, log)
}

/// [`start_pagesrv`] listening on `listen`, inside network namespace `netns` if given.
///
/// # Errors
/// As [`start_pagesrv`], or the namespace cannot be entered.
pub fn start_pagesrv_at(
    mem: &Path,
    listen: &str,
    netns: Option<&str>,
    extra: &[&str],
    log: Option<&Path>,
) -> Result<(Guard, String)> {
    let vm = [std::ffi::OsString::from("--vm-mem"), mem.into()];
    start_pagesrv_serving(&vm, listen, netns, extra, log)
}

/// pagesrv serving the VMs `(name, memory file)` at a free loopback port.
///
/// # Errors
/// As [`start_pagesrv`].
pub fn start_pagesrv_fleet(
    vms: &[(String, PathBuf)],
    extra: &[&str],
    log: Option<&Path>,
) -> Result<(Guard, String)> {
    let args: Vec<std::ffi::OsString> = vms
        .iter()
        .flat_map(|(name, path)| {
            let spec = format!("{name}={}", path.display());
            ["--vm-mem".into(), spec.into()]
        })
        .collect();
    start_pagesrv_serving(&args, "127.0.0.1:0", None, extra, log)
}

/// pagesrv serving `what` (a memory file or `s3://...`) at a free loopback port, with `env`
/// added to its environment.
///
/// # Errors
/// As [`start_pagesrv`].
pub fn start_pagesrv_env(
    what: &str,
    env: &[(String, String)],
    extra: &[&str],
    log: Option<&Path>,
) -> Result<(Guard, String)> {
    let vm = [std::ffi::OsString::from("--vm-mem"), what.into()];
    start_pagesrv_serving_env(&vm, env, "127.0.0.1:0", None, extra, log)
}

fn start_pagesrv_serving(
    vm_args: &[std::ffi::OsString],
    listen: &str,
    netns: Option<&str>,
    extra: &[&str],
    log: Option<&Path>,
) -> Result<(Guard, String)> {
    start_pagesrv_serving_env(vm_args, &[], listen, netns, extra, log)
}

fn start_pagesrv_serving_env(
    vm_args: &[std::ffi::OsString],
    env: &[(String, String)],
    listen: &str,
    netns: Option<&str>,
    extra: &[&str],
    log: Option<&Path>,
) -> Result<(Guard, String)> {
    let mut cmd = Command::new(sibling("pagesrv")?);
    let keys = key_args()?;
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.args(vm_args)
        .args(["--listen", listen])
        .args(&keys)
        .args(extra)
        .stdout(Stdio::piped());
    if let Some(name) = netns {
        if keys.iter().any(|a| a == "--insecure-no-key") {
            // Its address exists only inside that namespace and its pair.
            cmd.arg("--insecure-listen");
        }
        in_netns(&mut cmd, name)?;
    }
    log_to(&mut cmd, log)?;
    let mut pagesrv = Guard::new(cmd.spawn().context("cannot start pagesrv")?);
    let addr = first_line(&mut pagesrv.0)?
        .strip_prefix("pagesrv listening on ")
        .context("pagesrv did not start")?
        .to_owned();
    Ok((pagesrv, addr))
}

/// Starts faultd against `addr`, accepting the VMM on `uds` and writing stats to `stats`;
/// returns once it is ready.
///
/// # Errors
/// faultd is missing or did not start.
pub fn start_faultd(
    addr: &str,
    uds: &Path,
    stats: &Path,
    extra: &[&str],
    log: Option<&Path>,
) -> Result<Guard> {
    let mut cmd = Command::new(sibling("faultd")?);
    cmd.args(["--connect", addr])
        .arg("--uds")
        .arg(uds)
        .arg("--stats-json")
        .arg(stats)
        .args(key_args()?)
        .args(extra)
        .stdout(Stdio::piped());
    log_to(&mut cmd, log)?;
    let mut faultd = Guard::new(cmd.spawn().context("cannot start faultd")?);
    first_line(&mut faultd.0)?;
    Ok(faultd)
}
