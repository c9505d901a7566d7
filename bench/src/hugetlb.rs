//! The host's 2 MiB hugetlb pool: pages reserved for a run and given back when it ends, or
//! when the bench is interrupted (the link module's signal handler calls [`give_back`]).

use anyhow::{Context, Result, bail};

/// The 2 MiB pool (the default huge page size may be another).
const NR_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

/// The pool size to give back if the bench is interrupted while pages are reserved.
static RESTORE: std::sync::Mutex<Option<u64>> = std::sync::Mutex::new(None);

/// Gives reserved huge pages back (the interrupt handler calls it before exiting).
pub fn give_back() {
    if let Some(old) = RESTORE.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = std::fs::write(NR_HUGEPAGES, old.to_string());
    }
}

/// Huge pages reserved for the run, given back on drop.
pub struct Reserved {
    old: u64,
}

impl Reserved {
    /// Adds `n` pages to the 2 MiB pool.
    ///
    /// # Errors
    /// Not root, or the kernel gave fewer.
    pub fn pages(n: u64) -> Result<Reserved> {
        let read = || -> Result<u64> {
            Ok(std::fs::read_to_string(NR_HUGEPAGES)
                .with_context(|| format!("cannot read {NR_HUGEPAGES}"))?
                .trim()
                .parse()?)
        };
        let old = read()?;
        *RESTORE.lock().unwrap_or_else(|p| p.into_inner()) = Some(old);
        let reserved = Reserved { old };
        std::fs::write(NR_HUGEPAGES, (old + n).to_string())
            .with_context(|| format!("cannot reserve {n} huge pages (root needed)"))?;
        if read()? < old + n {
            bail!("the kernel gave fewer than {n} more huge pages (memory too fragmented?)");
        }
        Ok(reserved)
    }
}

impl Reserved {
    /// Touches `n` pages of the pool once and gives them back: on this nested machine the
    /// host backs a guest's memory on first use (≈ 6 ms per 2 MiB page), a cost bare metal
    /// does not have and a destination pays once, when its pool is first used. Best effort.
    pub fn warm(&self, n: u64) {
        let len = (n as usize) << 21;
        // SAFETY: a fresh anonymous mapping nobody else knows; written only within its
        // length, then unmapped.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
                -1,
                0,
            );
            if addr == libc::MAP_FAILED {
                return;
            }
            for offset in (0..len).step_by(2 << 20) {
                addr.cast::<u8>().add(offset).write_volatile(1);
            }
            libc::munmap(addr, len);
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        RESTORE.lock().unwrap_or_else(|p| p.into_inner()).take();
        let _ = std::fs::write(NR_HUGEPAGES, self.old.to_string());
    }
}
