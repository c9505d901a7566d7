//! Mutual authentication with a pre-shared key, before any page moves.
//!
//! ```text
//!  client                                   server
//!  Hello{role, params} ───────────────────►
//!                      ◄─────────────────── Challenge{server_nonce}
//!  Proof{client_nonce, mac_c} ────────────►   mac_c = HMAC(key, "pagemig client" ‖ sn ‖ cn ‖ params)
//!                      ◄─────────────────── AuthOk{mac_s}   (or Error{AuthFailed}, close)
//!                      ◄─────────────────── Welcome           mac_s = HMAC(key, "pagemig server" ‖ sn ‖ cn ‖ params)
//! ```
//!
//! Fresh nonces on both sides make every proof single-use; binding the session parameters
//! stops a proof for one guest being replayed for another. MACs are compared in constant
//! time.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

use crate::wire::{AUTH_BYTES, Role, SessionParams};

/// Shortest key accepted.
pub const MIN_KEY_BYTES: usize = 16;

/// Errors loading a key.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read the key file {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key is too short.
    #[error("the key in {path} has {len} bytes; at least {MIN_KEY_BYTES} are needed")]
    TooShort {
        /// The file.
        path: String,
        /// Its length (after trimming).
        len: usize,
    },
}

/// A pre-shared key.
#[derive(Clone)]
pub struct Psk(Vec<u8>);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(..)")
    }
}

/// Which side computes a MAC.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    /// The destination (faultd).
    Client,
    /// The source (pagesrv).
    Server,
}

impl Psk {
    /// Reads a key file (surrounding whitespace is ignored).
    ///
    /// # Errors
    /// An unreadable file or a key shorter than [`MIN_KEY_BYTES`].
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: name.clone(),
            source,
        })?;
        let key = bytes.trim_ascii().to_vec();
        if key.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort {
                path: name,
                len: key.len(),
            });
        }
        Ok(Psk(key))
    }

    /// A key from bytes (tests).
    pub fn from_bytes(key: &[u8]) -> Self {
        Psk(key.to_vec())
    }

    /// The MAC `side` sends for these nonces and parameters.
    pub fn mac(
        &self,
        side: Side,
        server_nonce: &[u8; AUTH_BYTES],
        client_nonce: &[u8; AUTH_BYTES],
        role: Role,
        params: &SessionParams,
    ) -> [u8; AUTH_BYTES] {
        let mut mac = self.keyed();
        feed(&mut mac, side, server_nonce, client_nonce, role, params);
        mac.finalize().into_bytes().into()
    }

    /// Checks a MAC `side` sent, in constant time.
    pub fn verify(
        &self,
        side: Side,
        server_nonce: &[u8; AUTH_BYTES],
        client_nonce: &[u8; AUTH_BYTES],
        role: Role,
        params: &SessionParams,
        tag: &[u8; AUTH_BYTES],
    ) -> bool {
        let mut mac = self.keyed();
        feed(&mut mac, side, server_nonce, client_nonce, role, params);
        mac.verify_slice(tag).is_ok()
    }

    fn keyed(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts keys of any length")
    }
}

fn feed(
    mac: &mut Hmac<Sha256>,
    side: Side,
    server_nonce: &[u8; AUTH_BYTES],
    client_nonce: &[u8; AUTH_BYTES],
    role: Role,
    params: &SessionParams,
) {
    mac.update(match side {
        Side::Client => b"pagemig client",
        Side::Server => b"pagemig server",
    });
    mac.update(server_nonce);
    mac.update(client_nonce);
    mac.update(&[role as u8]);
    mac.update(&params.version.to_le_bytes());
    mac.update(&params.page_size.to_le_bytes());
    mac.update(&params.total_pages.to_le_bytes());
}

/// A fresh random nonce.
pub fn nonce() -> [u8; AUTH_BYTES] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SessionParams {
        SessionParams {
            version: 1,
            page_size: 4096,
            total_pages: 10,
            session_id: 0,
        }
    }

    #[test]
    fn test_macs_bind_key_side_nonces_and_params() {
        let key = Psk::from_bytes(b"0123456789abcdef");
        let (sn, cn) = (nonce(), nonce());
        let tag = key.mac(Side::Client, &sn, &cn, Role::Urgent, &params());
        assert!(key.verify(Side::Client, &sn, &cn, Role::Urgent, &params(), &tag));
        assert!(!key.verify(Side::Server, &sn, &cn, Role::Urgent, &params(), &tag));
        assert!(!key.verify(Side::Client, &cn, &sn, Role::Urgent, &params(), &tag));
        assert!(!key.verify(Side::Client, &sn, &cn, Role::Bulk, &params(), &tag));
        let other = SessionParams {
            total_pages: 11,
            ..params()
        };
        assert!(!key.verify(Side::Client, &sn, &cn, Role::Urgent, &other, &tag));
        let wrong = Psk::from_bytes(b"0123456789abcdeX");
        assert!(!wrong.verify(Side::Client, &sn, &cn, Role::Urgent, &params(), &tag));
    }

    #[test]
    fn test_short_keys_are_refused() {
        let path = std::env::temp_dir().join(format!("psk-{}", std::process::id()));
        std::fs::write(&path, b"short\n").unwrap();
        assert!(matches!(
            Psk::load(&path),
            Err(KeyError::TooShort { len: 5, .. })
        ));
        std::fs::write(&path, b"  a-long-enough-secret-key \n").unwrap();
        assert!(Psk::load(&path).is_ok());
        std::fs::remove_file(&path).unwrap();
    }
}
