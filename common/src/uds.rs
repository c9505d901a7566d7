//! The daemons' Unix sockets (the VMM sockets, the source link, the control sockets): bound
//! so that only their owner can connect, never over a file that is not a socket, and never
//! over a socket another live process listens on.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Errors binding a socket.
#[derive(Debug, Error)]
pub enum BindError {
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A live process listens on the path.
    #[error("another process listens on {0}; refusing to take its socket")]
    InUse(PathBuf),
    /// Removing the stale socket, binding or setting its mode failed.
    #[error("cannot listen on {path}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Listens on `path` with mode 0600 (only this user connects; root always can). A stale
/// socket (nobody listens) is replaced; a live one, or any other file, is refused.
///
/// # Errors
/// Any [`BindError`].
pub fn bind_private(path: &Path) -> Result<UnixListener, BindError> {
    let bind_err = |source| BindError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket(path.to_owned()));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(BindError::InUse(path.to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            // Another answer (e.g. no permission to connect): not ours to judge stale.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(bind_err(e)),
            Err(_) => {}
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_binds_private_replaces_stale_and_refuses_live_or_foreign() {
        let dir = std::env::temp_dir().join(format!("uds-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let live = bind_private(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind_private(&path), Err(BindError::InUse(_))));
        drop(live);
        // The file stays behind with nobody listening: stale, replaced.
        assert!(path.exists());
        let again = bind_private(&path).unwrap();
        drop(again);
        let file = dir.join("f");
        std::fs::write(&file, b"not a socket").unwrap();
        assert!(matches!(bind_private(&file), Err(BindError::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
