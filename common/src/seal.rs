//! Every frame after an authenticated handshake is sealed with AES-256-GCM (ring, which uses
//! AES-NI/VAES and carry-less multiplication where the CPU has them).
//!
//! ```text
//!  keys:   HKDF-SHA256(salt = server nonce ‖ client nonce, ikm = PSK)
//!            expand("pagemig v2 channel" ‖ role ‖ "c2s") → client-to-server key
//!            expand("pagemig v2 channel" ‖ role ‖ "s2c") → server-to-client key
//!          new nonces on every connection, so new keys on every connection and reconnect
//!  nonce:  4 zero bytes ‖ frame counter (u64, big-endian), per direction, from 0
//!  frame:  ┌ header (8 bytes, clear, AAD) ┬ body (encrypted) ┬ tag (16) ┐
//!          body_len in the header counts the tag
//! ```
//!
//! The receiver uses its own counter as the nonce, so a replayed, dropped, reordered or
//! spliced frame (from another connection: other keys) fails its tag, as does any flipped
//! bit; a truncated frame never completes. A failed tag is a broken link, never data: the
//! frame is not decoded.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use thiserror::Error;

use crate::wire::HEADER_LEN;

/// Bytes of the tag after every sealed frame's body.
pub const TAG_BYTES: usize = 16;

/// A frame that failed authentication.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "frame {counter} failed authentication (tampered, replayed, reordered or from another connection)"
)]
pub struct TagMismatch {
    /// The frame's position in its direction.
    pub counter: u64,
}

/// Secrets for one connection: one AES-256 key per direction (made by
/// [`crate::auth::Psk::channel_secrets`]).
pub struct ChannelSecrets {
    pub(crate) client_to_server: [u8; 32],
    pub(crate) server_to_client: [u8; 32],
}

impl std::fmt::Debug for ChannelSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelSecrets(..)")
    }
}

impl ChannelSecrets {
    /// The client's sealer (for what it sends) and opener (for what it receives).
    pub fn client(self) -> (Sealer, Opener) {
        (
            Sealer::new(&self.client_to_server),
            Opener::new(&self.server_to_client),
        )
    }

    /// The server's sealer and opener.
    pub fn server(self) -> (Sealer, Opener) {
        (
            Sealer::new(&self.server_to_client),
            Opener::new(&self.client_to_server),
        )
    }
}

fn key(bytes: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32 bytes is an AES-256 key"))
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Seals the frames one side sends on one connection.
pub struct Sealer {
    key: LessSafeKey,
    counter: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer {{ counter: {} }}", self.counter)
    }
}

impl Sealer {
    fn new(bytes: &[u8; 32]) -> Self {
        Sealer {
            key: key(bytes),
            counter: 0,
        }
    }

    /// Seals the frame at `out[start..]` (header and body, the header's `body_len` already
    /// counting the tag) in place and appends its tag.
    pub fn seal(&mut self, out: &mut Vec<u8>, start: usize) {
        let (header, body) = out[start..].split_at_mut(HEADER_LEN);
        let tag: Tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.counter), Aad::from(&*header), body)
            .expect("a frame is far below AES-GCM's length limit");
        self.counter += 1;
        out.extend_from_slice(tag.as_ref());
    }
}

/// Opens the frames one side receives on one connection.
pub struct Opener {
    key: LessSafeKey,
    counter: u64,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Opener {{ counter: {} }}", self.counter)
    }
}

impl Opener {
    fn new(bytes: &[u8; 32]) -> Self {
        Opener {
            key: key(bytes),
            counter: 0,
        }
    }

    /// Authenticates and decrypts a frame's body in place (`body_and_tag` is everything after
    /// the header); returns the plaintext's length.
    ///
    /// # Errors
    /// [`TagMismatch`]: the frame is not the next one its peer sealed on this connection.
    pub fn open(
        &mut self,
        header: &[u8; HEADER_LEN],
        body_and_tag: &mut [u8],
    ) -> Result<usize, TagMismatch> {
        let counter = self.counter;
        let plain = self
            .key
            .open_in_place(nonce(counter), Aad::from(header), body_and_tag)
            .map_err(|_| TagMismatch { counter })?;
        self.counter += 1;
        Ok(plain.len())
    }
}

#[cfg(test)]
pub(crate) fn test_secrets(seed: u8) -> ChannelSecrets {
    ChannelSecrets {
        client_to_server: [seed; 32],
        server_to_client: [seed.wrapping_add(1); 32],
    }
}
