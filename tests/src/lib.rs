//! Fixtures for the integration tests: patterned memory files, and the real pagesrv, faultd
//! and test-vmm binaries started as child processes that are killed if a test fails.

pub mod s3;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Page size of the fixtures.
pub const PAGE: usize = 4096;

/// Whether the kernel features the tests need are here. Under `CI=true` their absence fails
/// the test; elsewhere the test is skipped with the reason printed.
pub fn require_userfaultfd() -> bool {
    let ok = Path::new("/dev/userfaultfd").exists() || {
        // SAFETY: probes the syscall; a returned fd is closed at once.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
        if fd >= 0 {
            // SAFETY: closes the fd we just got.
            unsafe { libc::close(fd as i32) };
        }
        fd >= 0
    };
    if !ok {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "userfaultfd is required in CI"
        );
        eprintln!("SKIPPED: neither /dev/userfaultfd nor the userfaultfd syscall is available");
    }
    ok
}

/// Whether /dev/kvm is usable. Under `CI=true` its absence fails the test; elsewhere the test
/// is skipped with the reason printed.
pub fn require_kvm() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "/dev/kvm is required in CI"
        );
        eprintln!("SKIPPED: /dev/kvm is not available");
    }
    ok
}

/// Path of a workspace binary built next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile> directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A new directory under /dev/shm (or the temp dir) named after `tag`.
    pub fn new(tag: &str) -> Self {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        // Unique within the process too: tests that run at once never share a directory.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = base.join(format!("pm-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a memory file of `pages` pages: each data page carries its index and `seed` in
/// every word; every `zero_every`-th page is written as zeros, and pages in `hole` are left
/// as a hole (never written).
pub fn write_source(
    path: &Path,
    pages: usize,
    seed: u64,
    zero_every: usize,
    hole: std::ops::Range<usize>,
) {
    let mut f = std::fs::File::create(path).expect("create source");
    f.set_len((pages * PAGE) as u64).expect("size source");
    let mut page = vec![0u8; PAGE];
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut f);
    for p in 0..pages {
        if hole.contains(&p) {
            w.flush().expect("flush");
            std::io::Seek::seek(
                w.get_mut(),
                std::io::SeekFrom::Start(((p + 1) * PAGE) as u64),
            )
            .expect("seek");
            continue;
        }
        if zero_every > 0 && p % zero_every == 0 {
            page.fill(0);
        } else {
            for (i, word) in page.chunks_exact_mut(8).enumerate() {
                let v = (p as u64) << 32 ^ seed.rotate_left(i as u32 % 64) ^ i as u64;
                word.copy_from_slice(&v.to_le_bytes());
            }
        }
        w.write_all(&page).expect("write source");
    }
    w.flush().expect("flush source");
}

/// A child process, killed on drop, with its stderr collected by a thread.
pub struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: std::sync::mpsc::Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    /// What stderr brought so far (the reader thread appends as it reads).
    stderr_so_far: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Proc {
    /// Starts `cmd` with piped stdout and stderr.
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {name}: {e}"));
        let mut err = child.stderr.take().expect("piped stderr");
        let stderr_so_far = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let so_far = stderr_so_far.clone();
        let stderr = std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match err.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => so_far.lock().unwrap().extend_from_slice(&chunk[..n]),
                }
            }
            String::from_utf8_lossy(&so_far.lock().unwrap()).into_owned()
        });
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let (tx, stdout) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Proc {
            name: name.into(),
            child,
            stdin,
            stdout,
            stderr: Some(stderr),
            stderr_so_far,
        }
    }

    /// Waits up to `limit` for stderr to contain `needle` `times` times (lines the process
    /// writes after something the test saw happen, e.g. pagesrv's totals after it answered a
    /// destination); true if it did.
    pub fn wait_for_stderr(&self, needle: &str, times: usize, limit: Duration) -> bool {
        assert!(
            !needle.is_empty(),
            "wait_for_stderr needs something to wait for"
        );
        let deadline = Instant::now() + limit;
        let holds = || {
            let bytes = self.stderr_so_far.lock().unwrap();
            let found = bytes
                .windows(needle.len())
                .filter(|w| *w == needle.as_bytes());
            found.count() >= times
        };
        while !holds() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Reads one line of stdout; empty if the process closed stdout. Panics after 60 s
    /// without a line, so a hung peer fails the test instead of hanging it.
    pub fn read_line(&mut self) -> String {
        match self.stdout.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line.trim_end().to_owned(),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => String::new(),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("{} printed nothing for 60 s", self.name)
            }
        }
    }

    /// Writes one line to the process's stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write stdin");
    }

    /// Closes the process's stdin.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Reads JSON lines from stdout until one satisfies `pred`; panics if stdout ends first.
    pub fn read_event_until(
        &mut self,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        loop {
            let line = self.read_line();
            assert!(!line.is_empty(), "{} ended its output early", self.name);
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && pred(&v)
            {
                return v;
            }
        }
    }

    /// The rest of stdout, after the process exited: up to the end of the stream (the
    /// reader thread may not have passed the last lines on yet when the exit is seen).
    pub fn rest_of_stdout(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => lines.push(line),
                // The stream ended, or something else holds it open: what came is all.
                Err(_) => break,
            }
        }
        lines.join("\n")
    }

    /// Waits up to `limit` for the process to exit; kills it and panics with its stderr if
    /// it does not. Returns the status and the collected stderr.
    pub fn wait(&mut self, limit: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let stderr = self
                    .stderr
                    .take()
                    .map(|h| h.join().unwrap_or_default())
                    .unwrap_or_default();
                return (status, stderr);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let stderr = self
                    .stderr
                    .take()
                    .map(|h| h.join().unwrap_or_default())
                    .unwrap_or_default();
                panic!(
                    "{} did not exit within {limit:?}; stderr:\n{stderr}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGKILL (a crash, as opposed to an orderly exit) and reaps the process.
    pub fn kill9(&mut self) {
        // std's Child::kill is SIGKILL on Unix.
        self.child
            .kill()
            .unwrap_or_else(|e| panic!("kill -9 {}: {e}", self.name));
        let _ = self.child.wait();
    }

    /// Kills the process and returns its stderr.
    pub fn kill_and_collect(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The key file every daemon a test starts uses (unless the test gives its own, or
/// `--insecure-no-key`): made once per test process, as `pagesrv --gen-psk` makes one, and
/// removed when the process exits.
pub fn test_key() -> &'static Path {
    static KEY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("pm-test-{}.key", std::process::id()));
        let _ = std::fs::remove_file(&path);
        common::auth::Psk::generate(&path).expect("make the test key");
        extern "C" fn remove_key() {
            let path = std::env::temp_dir().join(format!("pm-test-{}.key", std::process::id()));
            let _ = std::fs::remove_file(path);
        }
        // SAFETY: registers a plain function with no arguments to run at exit.
        unsafe { libc::atexit(remove_key) };
        path
    })
}

/// `--psk-file` with [`test_key`], unless `args` already choose a key (or none).
pub fn key_args<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Vec<std::ffi::OsString> {
    let chosen = args.iter().any(|a| {
        let a = a.as_ref();
        a == "--psk-file" || a == "--insecure-no-key" || a == "--gen-psk"
    });
    if chosen {
        return Vec::new();
    }
    vec!["--psk-file".into(), test_key().into()]
}

/// pagesrv serving `mem` on a free loopback port; returns the process and its address.
pub fn start_pagesrv(mem: &Path, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["--vm-mem".into(), mem.as_os_str().to_owned()];
    args.extend(extra.iter().map(Into::into));
    start_pagesrv_with(&args)
}

/// pagesrv with exactly these arguments (the VMs among them) on a free loopback port;
/// returns the process and its address.
pub fn start_pagesrv_with(args: &[std::ffi::OsString]) -> (Proc, String) {
    let mut p = Proc::spawn(
        "pagesrv",
        Command::new(bin("pagesrv"))
            .args(["--listen", "127.0.0.1:0"])
            .args(key_args(args))
            .args(args),
    );
    let line = p.read_line();
    let addr = line
        .strip_prefix("pagesrv listening on ")
        .unwrap_or_else(|| {
            let (_, err) = p.wait(Duration::from_secs(5));
            panic!("pagesrv did not start: {line:?}\n{err}")
        })
        .to_owned();
    (p, addr)
}

/// faultd connecting to `addr`, accepting the VMM on `uds`, writing stats to `stats`.
pub fn start_faultd(addr: &str, uds: &Path, stats: &Path) -> Proc {
    start_faultd_with(addr, uds, stats, &[])
}

/// [`start_faultd`] with extra arguments.
pub fn start_faultd_with(addr: &str, uds: &Path, stats: &Path, extra: &[&str]) -> Proc {
    let mut p = Proc::spawn(
        "faultd",
        Command::new(bin("faultd"))
            .args(["--connect", addr])
            .arg("--uds")
            .arg(uds)
            .arg("--stats-json")
            .arg(stats)
            .args(key_args(extra))
            .args(extra),
    );
    let line = p.read_line();
    assert!(
        line.starts_with("faultd waiting for the VMM"),
        "faultd did not start: {line:?}"
    );
    p
}

/// One destination restoring from pagesrv at `addr`: faultd (with `faultd_args`) and
/// test-vmm over `image` (with `vmm_args`), their files in `dir` named after `tag`. Waits for
/// both and asserts that both succeeded, that the guest found every byte right during and
/// after, and that faultd's digests matched pagesrv's. Returns faultd's stats and stderr.
pub fn restore_one(
    dir: &Scratch,
    tag: &str,
    addr: &str,
    image: &Path,
    faultd_args: &[&str],
    vmm_args: &[&str],
) -> (serde_json::Value, String) {
    let (uds, stats) = (
        dir.path(&format!("{tag}.sock")),
        dir.path(&format!("{tag}.json")),
    );
    let mut faultd = start_faultd_with(addr, &uds, &stats, faultd_args);
    let mut vmm = start_vmm(&uds, image, vmm_args);
    let limit = Duration::from_secs(120);
    let (vmm_status, vmm_err) = vmm.wait(limit);
    let report = vmm.rest_of_stdout();
    let (faultd_status, faultd_err) = faultd.wait(limit);
    assert!(
        vmm_status.success(),
        "{tag}: test-vmm failed: {report}\n{vmm_err}\nfaultd:\n{faultd_err}"
    );
    assert!(
        faultd_status.success(),
        "{tag}: faultd failed:\n{faultd_err}"
    );
    let vmm = json(&report);
    assert_eq!(vmm["mismatches_during"], 0, "{tag}: {vmm}");
    assert_eq!(vmm["mismatches_after"], 0, "{tag}: {vmm}");
    let stats = json(&std::fs::read_to_string(&stats).expect("faultd's stats"));
    assert_eq!(stats["digest_check"], "match", "{tag}: {stats}");
    (stats, faultd_err)
}

/// Starts the test VMM with `args`.
pub fn start_vmm(uds: &Path, source: &Path, args: &[&str]) -> Proc {
    Proc::spawn(
        "test-vmm",
        Command::new(bin("test-vmm"))
            .arg("--uds")
            .arg(uds)
            .arg("--source")
            .arg(source)
            .args(args),
    )
}

/// A proxy in front of `target`; returns it and its address.
pub fn start_proxy(target: &str, args: &[&str]) -> (Proc, String) {
    let mut proxy = Proc::spawn(
        "cut-proxy",
        Command::new(bin("cut-proxy"))
            .args(["--target", target])
            .args(args),
    );
    let addr = proxy
        .read_line()
        .strip_prefix("proxy listening on ")
        .expect("proxy started")
        .to_owned();
    (proxy, addr)
}

/// Parses a JSON document.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A loopback address with a port nobody listens on (bound, then released).
pub fn free_loopback_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").to_string()
}

/// What a migration that succeeded left behind.
pub struct Finished {
    /// test-vmm's JSON report.
    pub vmm: serde_json::Value,
    /// faultd's stats JSON.
    pub stats: serde_json::Value,
    /// faultd's stderr.
    pub faultd_err: String,
    /// pagesrv's stderr.
    pub pagesrv_err: String,
}

/// Waits for test-vmm, faultd and pagesrv to end; asserts that all three succeeded, that the
/// VMM found every byte right during and after the migration, and that the digests matched.
/// `what` names the run in failure messages.
pub fn finish_migration(
    what: &str,
    vmm: &mut Proc,
    faultd: &mut Proc,
    pagesrv: &mut Proc,
    stats: &Path,
) -> Finished {
    let limit = Duration::from_secs(120);
    let (status, vmm_err) = vmm.wait(limit);
    let report = vmm.rest_of_stdout();
    let (faultd_status, faultd_err) = faultd.wait(limit);
    assert!(
        status.success(),
        "{what}: test-vmm: {report}\n{vmm_err}\nfaultd:\n{faultd_err}"
    );
    assert!(faultd_status.success(), "{what}: {faultd_err}");
    let (pagesrv_status, pagesrv_err) = pagesrv.wait(limit);
    assert!(pagesrv_status.success(), "{what}: {pagesrv_err}");
    let vmm = json(&report);
    assert_eq!(vmm["mismatches_during"], 0, "{what}: {vmm}");
    assert_eq!(vmm["mismatches_after"], 0, "{what}: {vmm}");
    let stats = json(&std::fs::read_to_string(stats).expect("faultd wrote its stats"));
    assert_eq!(stats["digest_check"], "match", "{what}: {stats}");
    Finished {
        vmm,
        stats,
        faultd_err,
        pagesrv_err,
    }
}

/// The digest of a whole memory file, as faultd's stats report it.
pub fn source_digest(mem: &Path) -> String {
    let image = std::fs::read(mem).expect("read the source");
    format!("{:016x}", common::digest::run_digest(0, &image, PAGE))
}

/// Huge pages reserved for a test (the 2 MiB pool), given back on drop. Tests that reserve
/// them run one at a time.
pub struct HugePages {
    old: u64,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static HUGE_PAGES: std::sync::Mutex<()> = std::sync::Mutex::new(());

const NR_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

impl HugePages {
    /// Reserves `pages` more 2 MiB pages. Under `CI=true` failing to is a failure; elsewhere
    /// the test is skipped with the reason printed (`None`).
    pub fn reserve(pages: u64) -> Option<HugePages> {
        let guard = HUGE_PAGES.lock().unwrap_or_else(|p| p.into_inner());
        let read = || -> Option<u64> {
            std::fs::read_to_string(NR_HUGEPAGES)
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let free = || -> u64 {
            std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| {
                    m.lines()
                        .find_map(|l| l.strip_prefix("HugePages_Free:"))
                        .and_then(|v| v.trim().parse().ok())
                })
                .unwrap_or(0)
        };
        let fail = |why: String| {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "huge pages are required in CI: {why}"
            );
            eprintln!("SKIPPED: {why}");
        };
        let Some(old) = read() else {
            fail(format!("cannot read {NR_HUGEPAGES}"));
            return None;
        };
        let reserved = HugePages {
            old,
            _one_at_a_time: guard,
        };
        if std::fs::write(NR_HUGEPAGES, (old + pages).to_string()).is_err() || free() < pages {
            let why = format!("cannot reserve {pages} huge pages ({} free)", free());
            drop(reserved);
            fail(why);
            return None;
        }
        Some(reserved)
    }
}

impl HugePages {
    /// For a child that reserves its own pages (bench migrate --page-size 2m): checks that
    /// `pages` can be reserved, gives them back at once, and keeps only the turn (no other
    /// huge-page test in this process runs until the result drops). `None` as for
    /// [`HugePages::reserve`].
    pub fn probe(pages: u64) -> Option<HugePages> {
        let mut reserved = HugePages::reserve(pages)?;
        let _ = std::fs::write(NR_HUGEPAGES, reserved.old.to_string());
        reserved.old = std::fs::read_to_string(NR_HUGEPAGES)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(reserved.old);
        Some(reserved)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.old.to_string());
    }
}

/// Writes a key file readable by its owner only (as `pagesrv --psk-file` requires).
pub fn write_key(path: &Path, key: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, key).expect("write key");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
}
