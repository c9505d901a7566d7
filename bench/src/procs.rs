//! Starting the workspace's binaries (built beside `bench`) as child processes.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::Child;

use anyhow::{Context, Result, ensure};

/// A helper process, killed on drop if still running.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
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

/// Samples a process's private (anonymous) resident memory until it exits; returns the peak
/// in bytes.
pub fn watch_anon_rss(pid: u32) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0u64;
        while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let kib = status
                .lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
            match kib {
                Some(kib) => peak = peak.max(kib << 10),
                None => break, // a zombie: exited
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        peak
    })
}
