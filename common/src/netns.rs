//! One lock, across processes, around creating and deleting named network namespaces (the
//! bench's link profiles and their tests).
//!
//! `ip netns add` turns `/run/netns` into a shared mount point the first time a machine
//! makes a named namespace (a bind mount of the directory onto itself). Two first uses at
//! once race: one process bind-mounts its namespace file under the other's fresh mount and
//! fails with `Bind /proc/self/ns/net -> /run/netns/NAME failed: No such file or directory`.
//! Every `ip netns add` and `ip netns del` of ours runs under [`lock`], so a brand-new
//! machine makes its first namespaces one at a time.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Where the lock lives: `/run/lock` where it exists (root), else the temp directory.
pub fn lock_path() -> PathBuf {
    let run_lock = Path::new("/run/lock");
    let dir = if run_lock.is_dir() {
        run_lock.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join("pagemig-netns.lock")
}

/// Held while a namespace is made or removed; released on drop.
#[derive(Debug)]
pub struct NetnsLock(#[allow(dead_code)] Flock<File>);

/// Waits for the machine-wide namespace lock.
///
/// # Errors
/// The lock file cannot be opened or locked.
pub fn lock() -> std::io::Result<NetnsLock> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(lock_path())?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map(NetnsLock)
        .map_err(|(_, errno)| errno.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_lock_excludes_a_second_holder_until_dropped() {
        let held = lock().unwrap();
        let other = std::fs::OpenOptions::new()
            .read(true)
            .open(lock_path())
            .unwrap();
        let refused = Flock::lock(other, FlockArg::LockExclusiveNonblock);
        let other = match refused {
            Ok(_) => panic!("a second holder got the lock"),
            Err((file, errno)) => {
                assert_eq!(errno, nix::errno::Errno::EWOULDBLOCK);
                file
            }
        };
        drop(held);
        assert!(Flock::lock(other, FlockArg::LockExclusiveNonblock).is_ok());
    }
}
