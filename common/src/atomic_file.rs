//! Replacing a file whole (stats, working sets): the bytes go to a new temporary file beside
//! it, created exclusively (so a symlink or file planted at a predictable name is never
//! followed or overwritten), synced, then renamed over the target. A reader sees the old
//! file or the new one, never half of it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically (module docs).
///
/// # Errors
/// The directory cannot be written, or writing, syncing or renaming failed.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let (tmp, mut file) = create_temp(path)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    let result = written.and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Checks that [`write`] to `path` can work (its directory exists and takes new files),
/// before the work whose result goes there.
///
/// # Errors
/// The directory is missing or cannot be written.
pub fn check_writable(path: &Path) -> std::io::Result<()> {
    let (tmp, file) = create_temp(path)?;
    drop(file);
    std::fs::remove_file(tmp)
}

/// A new, exclusively created file beside `path` (not following symlinks), mode 0600.
fn create_temp(path: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?;
    for _ in 0..16 {
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{:016x}.tmp", rand::random::<u64>()));
        let tmp = path.with_file_name(tmp_name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(
        "no free temporary name (16 random names taken)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_replaces_whole_and_never_follows_a_planted_link() {
        let dir = std::env::temp_dir().join(format!("atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("stats.json");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        // The old fixed temporary name, planted as a link to another file.
        std::os::unix::fs::symlink(&victim, dir.join("stats.json.tmp")).unwrap();
        write(&target, b"one").unwrap();
        write(&target, b"two").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"two");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp") && n != "stats.json.tmp")
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
        assert!(check_writable(&target).is_ok());
        assert!(check_writable(&dir.join("no/such/dir/x.json")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
