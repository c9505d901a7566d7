//! The fault-path levers `bench latency` can turn on the real pair, so their effect is
//! measured against the floor of the same run: where the threads run (`--fault-cpu`,
//! `--urgent-cpu`, `--bulk-cpus`, `--push-cpus`, the workload's own CPU) and busy-polling
//! (`--busy-poll-us`).

use std::process::Command;

use anyhow::{Result, ensure};

/// Where the workload and the daemons' threads run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinning {
    /// Nothing pinned.
    Scheduler,
    /// The workload, faultd's fault thread and pagesrv's urgent thread on the first CPU: no
    /// wake-up on the fault path crosses CPUs.
    SameCpu,
    /// The workload on the first CPU, the fault and urgent threads on the second: the fault
    /// path crosses CPUs once each way (the cross-vCPU floor's arrangement).
    SplitCpu,
}

/// One setting of the levers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Thread placement.
    pub pinning: Pinning,
    /// `--busy-poll-us` for both daemons (0: off).
    pub busy_poll_us: u64,
    /// With pinning: the bulk and push threads on a CPU neither the workload nor the fault
    /// and urgent threads use (else they run anywhere, and the real-time fault path
    /// preempts them).
    pub bulk_apart: bool,
    /// The workload hands faultd its memfd and faultd places by writing it and
    /// UFFDIO_CONTINUE (`--placement memfd`), instead of UFFDIO_COPY into anonymous memory.
    pub memfd: bool,
    /// pagesrv pre-pages a fixed 64 pages after each request (the old default) instead of
    /// learning the window from the requests.
    pub fixed_prepage: bool,
    /// Bulk connections (`faultd --streams`).
    pub streams: u32,
}

impl Tuning {
    /// The defaults of the daemons: nothing pinned, no busy-polling.
    pub const DEFAULT: Tuning = Tuning {
        pinning: Pinning::Scheduler,
        busy_poll_us: 0,
        bulk_apart: false,
        memfd: false,
        fixed_prepage: false,
        streams: 1,
    };

    /// Parses `default`, `same-cpu`, `split-cpu`, `bulk-apart`, `busy-poll[=US]`, `memfd`,
    /// `fixed-prepage`, `streams=N` and `+`-joined combinations such as
    /// `same-cpu+bulk-apart+busy-poll=30`.
    ///
    /// # Errors
    /// An unknown lever.
    pub fn parse(text: &str) -> Result<Tuning, String> {
        let mut t = Tuning::DEFAULT;
        for part in text.split('+').map(str::trim) {
            match part.split_once('=') {
                _ if part == "default" => {}
                _ if part == "same-cpu" => t.pinning = Pinning::SameCpu,
                _ if part == "split-cpu" => t.pinning = Pinning::SplitCpu,
                _ if part == "bulk-apart" => t.bulk_apart = true,
                _ if part == "memfd" => t.memfd = true,
                _ if part == "fixed-prepage" => t.fixed_prepage = true,
                _ if part == "busy-poll" => t.busy_poll_us = 50,
                Some(("busy-poll", us)) => {
                    t.busy_poll_us = us
                        .parse()
                        .map_err(|e| format!("bad busy-poll microseconds {us:?}: {e}"))?;
                }
                Some(("streams", n)) => {
                    t.streams = n
                        .parse()
                        .ok()
                        .filter(|n| (1..=common::wire::MAX_STREAMS).contains(n))
                        .ok_or_else(|| {
                            format!(
                                "bad stream count {n:?} (1 to {})",
                                common::wire::MAX_STREAMS
                            )
                        })?;
                }
                _ => {
                    return Err(format!(
                        "unknown lever {part:?} (default, same-cpu, split-cpu, bulk-apart, busy-poll[=US], memfd, fixed-prepage, streams=N, joined by +)"
                    ));
                }
            }
        }
        Ok(t)
    }

    /// The floor measured with the same placement of the fault path's threads: the like-
    /// for-like comparison.
    pub fn matching_floor(&self) -> &'static str {
        match self.pinning {
            Pinning::Scheduler => "scheduler",
            Pinning::SameCpu => "same_vcpu",
            Pinning::SplitCpu => "cross_vcpu",
        }
    }

    /// The name `parse` reads back.
    pub fn name(&self) -> String {
        let mut parts = Vec::new();
        match self.pinning {
            Pinning::Scheduler => {}
            Pinning::SameCpu => parts.push("same-cpu".to_string()),
            Pinning::SplitCpu => parts.push("split-cpu".to_string()),
        }
        if self.bulk_apart {
            parts.push("bulk-apart".to_string());
        }
        if self.busy_poll_us > 0 {
            parts.push(format!("busy-poll={}", self.busy_poll_us));
        }
        if self.memfd {
            parts.push("memfd".to_string());
        }
        if self.fixed_prepage {
            parts.push("fixed-prepage".to_string());
        }
        if self.streams > 1 {
            parts.push(format!("streams={}", self.streams));
        }
        if parts.is_empty() {
            "default".into()
        } else {
            parts.join("+")
        }
    }

    /// (the workload's CPU, the fault and urgent threads' CPU, the bulk threads' CPU if
    /// pinned).
    ///
    /// # Errors
    /// Too few CPUs for the placement.
    fn cpus(&self) -> Result<Option<(usize, usize, Option<usize>)>> {
        if self.pinning == Pinning::Scheduler {
            ensure!(!self.bulk_apart, "bulk-apart needs same-cpu or split-cpu");
            return Ok(None);
        }
        let cpus = crate::floor::allowed_cpus()?;
        ensure!(cpus.len() >= 2, "pinning levers need two CPUs");
        let (a, b) = (cpus[0], cpus[1]);
        // bulk-apart keeps the stream off both the workload's CPU and the fault path's.
        Ok(Some(match self.pinning {
            Pinning::SameCpu => (a, a, self.bulk_apart.then_some(b)),
            _ if self.bulk_apart => {
                ensure!(
                    cpus.len() >= 3,
                    "split-cpu+bulk-apart needs a third CPU (the workload and the fault path take two)"
                );
                (a, b, Some(cpus[2]))
            }
            _ => (a, b, None),
        }))
    }

    /// Extra arguments for pagesrv.
    ///
    /// # Errors
    /// Fewer than two CPUs to pin to.
    pub fn pagesrv_args(&self) -> Result<Vec<String>> {
        let mut args = vec!["--busy-poll-us".to_string(), self.busy_poll_us.to_string()];
        if self.fixed_prepage {
            args.extend(["--prepage", "fixed", "--prepage-window", "64"].map(String::from));
        }
        if let Some((_, fast, bulk)) = self.cpus()? {
            args.extend(["--urgent-cpu".into(), fast.to_string()]);
            if let Some(bulk) = bulk {
                args.extend(["--push-cpus".into(), bulk.to_string()]);
            }
        }
        Ok(args)
    }

    /// Extra arguments for faultd.
    ///
    /// # Errors
    /// Fewer than two CPUs to pin to.
    pub fn faultd_args(&self) -> Result<Vec<String>> {
        let mut args = vec!["--busy-poll-us".to_string(), self.busy_poll_us.to_string()];
        if self.memfd {
            args.extend(["--placement".into(), "memfd".into()]);
        }
        if self.streams > 1 {
            args.extend(["--streams".into(), self.streams.to_string()]);
        }
        if let Some((_, fast, bulk)) = self.cpus()? {
            args.extend(["--fault-cpu".into(), fast.to_string()]);
            if let Some(bulk) = bulk {
                args.extend(["--bulk-cpus".into(), bulk.to_string()]);
            }
        }
        Ok(args)
    }

    /// Sets up the workload (`test-vmm`): its memfd, and its CPU (all its threads), pinned
    /// before it starts.
    ///
    /// # Errors
    /// Fewer than two CPUs to pin to.
    pub fn set_up_workload(&self, cmd: &mut Command) -> Result<()> {
        use std::os::unix::process::CommandExt;
        if self.memfd {
            cmd.arg("--memfd");
        }
        let Some((cpu, _, _)) = self.cpus()? else {
            return Ok(());
        };
        // SAFETY: the closure runs in the child between fork and exec; it only makes the
        // sched_setaffinity syscall (no allocation on this path: the CPU list is valid).
        unsafe {
            cmd.pre_exec(move || common::sched::pin_current_thread(&[cpu]));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lever_names_round_trip() {
        for text in [
            "default",
            "same-cpu",
            "same-cpu+bulk-apart",
            "split-cpu+bulk-apart+busy-poll=30",
            "same-cpu+memfd",
            "same-cpu+fixed-prepage",
            "busy-poll=5",
        ] {
            assert_eq!(Tuning::parse(text).unwrap().name(), text);
        }
        assert_eq!(Tuning::parse("busy-poll").unwrap().busy_poll_us, 50);
        assert!(Tuning::parse("fast").is_err());
        assert!(Tuning::parse("busy-poll=x").is_err());
    }
}
