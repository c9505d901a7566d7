//! A VMM child process (`vmm source` or `vmm dest`) with its JSON-lines stdout on a
//! channel; killed on drop.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// A child process with its JSON-lines stdout on a channel; killed on drop.
pub(super) struct Vmm {
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<Value>,
}

impl Vmm {
    pub(super) fn spawn(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the VMM")?;
        // Stopped by an interrupted bench too (it is unregistered before it is reaped).
        crate::procs::register(child.id());
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(Vmm {
            child,
            stdin,
            events,
        })
    }

    /// Waits for the VMM to exit (no longer stopped by an interrupt: its pid is reaped).
    pub(super) fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        crate::procs::unregister(self.child.id());
        self.child.wait()
    }

    pub(super) fn send(&mut self, command: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("VMM stdin closed")?;
        writeln!(stdin, "{command}").context("the VMM is gone")?;
        Ok(())
    }

    /// Next event, or an error naming the VMM's exit status if it ended.
    pub(super) fn next(&mut self, timeout: Duration) -> Result<Value> {
        match self.events.recv_timeout(timeout) {
            Ok(v) => Ok(v),
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("the VMM sent nothing for {timeout:?}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                crate::procs::unregister(self.child.id());
                let status = self.child.wait()?;
                bail!("the VMM exited ({status})")
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        crate::procs::unregister(self.child.id());
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
