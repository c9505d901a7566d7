//! Mutual authentication before any page moves, keys per VM, and the secret that binds a
//! session's later connections to the one that opened it.
//!
//! ```text
//!  client                                   server
//!  Hello{role, params} ───────────────────►
//!                      ◄─────────────────── Challenge{server_nonce}
//!  Proof{client_nonce, mac_c, resume} ────►   mac_c = HMAC(K_vm, "pagemig client" ‖ T)
//!                      ◄─────────────────── AuthOk{mac_s}   (or Error{AuthFailed}, close)
//!                      ◄─────────────────── Welcome | Error   mac_s = HMAC(K_vm, "pagemig server" ‖ T ‖ answer)
//!  T = sn ‖ cn ‖ role ‖ Hello params (version, page size, pages, session id, pinned image id,
//!      flags, VM name)
//!  K_vm = HKDF(PSK, "pagemig v3 vm key", VM name): the key of one VM (a VM key file holds
//!         it alone, so its holder opens that VM and no other)
//!  resume = HMAC(R, "pagemig resume" ‖ T), zeros on a session's first connection
//!  R = HKDF(K_vm, salt sn ‖ cn of the urgent connection that opened the session, session id)
//! ```
//!
//! Fresh nonces on both sides make every proof single-use; binding the session parameters
//! stops a proof for one guest being replayed for another, and binding the server's answer
//! (the `Welcome` with its session and image ids, or the refusal's code) lets the client trust
//! what follows `AuthOk`: a refusal from a stranger on the port is recognisable as such.
//! MACs are compared in constant time.
//!
//! **Resumption.** A session id is not a secret (it travels in clear in every `Hello` and
//! `Welcome`): what joins a connection to a session is `R`, which only the two ends of the
//! session's first urgent handshake can compute. Every later connection of the session (its
//! bulk and extra connections, and an urgent connection that resumes it after a cut) proves
//! `R` in its `Proof`; a key holder that did not open the session cannot take it over.
//!
//! **Without a key** (`--insecure-no-key` on both daemons) the same handshake runs with a
//! well-known key ([`Psk::unkeyed`]): it authenticates nobody and frames travel plain, but
//! `R` still depends on nonces only the two ends saw, so a local process that did not watch
//! the session's first handshake on the wire cannot resume (take over) it.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

use crate::wire::{AUTH_BYTES, ErrorCode, Role, SessionParams, VmName};

/// Shortest key accepted.
pub const MIN_KEY_BYTES: usize = 16;

/// How a VM key file starts: `pagemig-vm-key v1 NAME HEX`.
const VM_KEY_PREFIX: &str = "pagemig-vm-key v1 ";

/// The well-known key of the keyless mode: public, so it proves nothing.
const UNKEYED: &[u8] = b"pagemig v3: no key (--insecure-no-key); this authenticates nobody";

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
    /// Others than its owner may read the key file.
    #[error("the key file {path} is readable by others (mode {mode:03o}); run: chmod 600 {path}")]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file belongs to another user (who could replace the key).
    #[error("the key file {path} belongs to uid {owner}, not to this user (uid {us})")]
    NotOwned {
        /// The file.
        path: String,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        us: u32,
    },
    /// A VM key file that does not parse.
    #[error("the VM key file {path} is malformed: {why}")]
    Malformed {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A new key file could not be written.
    #[error("cannot create the key file {path} (an existing file is never replaced)")]
    Create {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A pre-shared key: the master key of a key file, the key of one VM derived from it
/// ([`Psk::for_vm`]), or the public stand-in of the keyless mode ([`Psk::unkeyed`]).
#[derive(Clone)]
pub struct Psk {
    bytes: Vec<u8>,
    keyed: bool,
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.keyed {
            "Psk(..)"
        } else {
            "Psk(unkeyed)"
        })
    }
}

/// What a key file holds: a master key (`vm` is `None`; keys of every VM derive from it), or
/// the key of one VM.
#[derive(Debug, Clone)]
pub struct KeyFile {
    /// The key.
    pub psk: Psk,
    /// The VM whose key this is, for a VM key file.
    pub vm: Option<VmName>,
}

/// The secret that binds a session's later connections to its first urgent handshake
/// (module docs).
#[derive(Clone, PartialEq, Eq)]
pub struct ResumeSecret([u8; 32]);

impl std::fmt::Debug for ResumeSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResumeSecret(..)")
    }
}

impl ResumeSecret {
    /// The proof for a connection with transcript `t`: `HMAC(R, "pagemig resume" ‖ T)`.
    pub fn prove(&self, t: &Transcript) -> [u8; AUTH_BYTES] {
        self.mac(t).finalize().into_bytes().into()
    }

    /// Checks a connection's proof in constant time.
    pub fn verify(&self, t: &Transcript, tag: &[u8; AUTH_BYTES]) -> bool {
        self.mac(t).verify_slice(tag).is_ok()
    }

    fn mac(&self, t: &Transcript) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts keys of any length");
        mac.update(b"pagemig resume");
        feed_transcript(&mut mac, t);
        mac
    }
}

/// What both MACs of one connection's handshake cover: both nonces, the role and the
/// client's `Hello` parameters (protocol, layout, the session it resumes, the image it pinned).
#[derive(Debug, Clone, Copy)]
pub struct Transcript {
    /// The server's nonce (`Challenge`).
    pub server_nonce: [u8; AUTH_BYTES],
    /// The client's nonce (`Proof`).
    pub client_nonce: [u8; AUTH_BYTES],
    /// Urgent or bulk.
    pub role: Role,
    /// The client's `Hello`.
    pub hello: SessionParams,
}

/// The server's answer to an authenticated client, bound into the server's MAC: a client can
/// trust the `Welcome` (session id, image id) or the refusal that follows `AuthOk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The `Welcome` that follows.
    Welcome(SessionParams),
    /// The `Error` code that follows.
    Refuse(ErrorCode),
}

impl Psk {
    /// The public stand-in of the keyless mode: every handshake runs as with a key, but it
    /// authenticates nobody and frames are not sealed.
    pub fn unkeyed() -> Self {
        Psk {
            bytes: UNKEYED.to_vec(),
            keyed: false,
        }
    }

    /// Whether this is a real key (frames are sealed, answers can be trusted).
    pub fn is_keyed(&self) -> bool {
        self.keyed
    }

    /// The key of VM `vm` (the empty name: the one VM a source serves alone), derived from
    /// this master key: `HKDF(PSK, "pagemig v3 vm key", name)`. Whoever holds it can open
    /// that VM and no other.
    pub fn for_vm(&self, vm: &VmName) -> Psk {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"pagemig v3 vm key");
        let prk = salt.extract(&self.bytes);
        let info = [vm.as_str().as_bytes()];
        let mut out = [0u8; 32];
        prk.expand(&info, ring::hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut out))
            .expect("32 bytes is within HKDF-SHA256's output limit");
        Psk {
            bytes: out.to_vec(),
            keyed: self.keyed,
        }
    }

    /// Reads a key file: a master key (surrounding whitespace is ignored) or a VM key file
    /// ([`Psk::write_vm_key`]). The file must be a regular file (not a symlink) that only its
    /// owner, this user, may read.
    ///
    /// # Errors
    /// An unreadable, exposed or foreign file, a malformed VM key file, or a key shorter than
    /// [`MIN_KEY_BYTES`].
    pub fn load(path: &Path) -> Result<KeyFile, KeyError> {
        use std::io::Read;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let name = path.display().to_string();
        let read_err = |source| KeyError::Read {
            path: name.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(read_err)?;
        // The checks and the read are on the same open file (no swap in between).
        let meta = file.metadata().map_err(read_err)?;
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed { path: name, mode });
        }
        let us = nix::unistd::geteuid().as_raw();
        if meta.uid() != us {
            return Err(KeyError::NotOwned {
                path: name,
                owner: meta.uid(),
                us,
            });
        }
        let mut bytes = Vec::new();
        file.take(64 << 10)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        let text = bytes.trim_ascii();
        if let Some(rest) = text.strip_prefix(VM_KEY_PREFIX.as_bytes()) {
            return parse_vm_key(rest).map_err(|why| KeyError::Malformed { path: name, why });
        }
        if text.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort {
                path: name,
                len: text.len(),
            });
        }
        Ok(KeyFile {
            psk: Psk {
                bytes: text.to_vec(),
                keyed: true,
            },
            vm: None,
        })
    }

    /// Writes a new random master key (32 bytes, hex) to `path`, readable by its owner only;
    /// an existing file is never replaced.
    ///
    /// # Errors
    /// The file exists or cannot be written.
    pub fn generate(path: &Path) -> Result<(), KeyError> {
        let key: [u8; 32] = rand::random();
        write_new_private(path, &format!("{}\n", hex(&key)))
    }

    /// Writes the key of VM `vm` (derived from this master key) to a new file `path`
    /// (`pagemig-vm-key v1 NAME HEX`, readable by its owner only): give it to that VM's
    /// destination; it opens no other VM.
    ///
    /// # Errors
    /// The file exists or cannot be written.
    pub fn write_vm_key(&self, vm: &VmName, path: &Path) -> Result<(), KeyError> {
        let key = self.for_vm(vm);
        write_new_private(
            path,
            &format!("{VM_KEY_PREFIX}{} {}\n", vm.as_str(), hex(&key.bytes)),
        )
    }

    /// A key from bytes (tests).
    pub fn from_bytes(key: &[u8]) -> Self {
        Psk {
            bytes: key.to_vec(),
            keyed: true,
        }
    }

    /// The secret of the session `session_id` opened by the urgent handshake `t` (module
    /// docs).
    pub fn resume_secret(&self, t: &Transcript, session_id: u64) -> ResumeSecret {
        let salt = ring::hkdf::Salt::new(
            ring::hkdf::HKDF_SHA256,
            &[t.server_nonce, t.client_nonce].concat(),
        );
        let prk = salt.extract(&self.bytes);
        let id = session_id.to_le_bytes();
        let info = [b"pagemig v3 resume".as_slice(), &id];
        let mut out = [0u8; 32];
        prk.expand(&info, ring::hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut out))
            .expect("32 bytes is within HKDF-SHA256's output limit");
        ResumeSecret(out)
    }

    /// The client's proof: `HMAC(key, "pagemig client" ‖ transcript)`.
    pub fn client_mac(&self, t: &Transcript) -> [u8; AUTH_BYTES] {
        let mut mac = self.keyed(b"pagemig client", t);
        mac.update(&[0]);
        mac.finalize().into_bytes().into()
    }

    /// Checks a client's proof in constant time.
    pub fn verify_client(&self, t: &Transcript, tag: &[u8; AUTH_BYTES]) -> bool {
        let mut mac = self.keyed(b"pagemig client", t);
        mac.update(&[0]);
        mac.verify_slice(tag).is_ok()
    }

    /// The server's proof: `HMAC(key, "pagemig server" ‖ transcript ‖ answer)`.
    pub fn server_mac(&self, t: &Transcript, answer: &Answer) -> [u8; AUTH_BYTES] {
        let mut mac = self.keyed(b"pagemig server", t);
        feed_answer(&mut mac, answer);
        mac.finalize().into_bytes().into()
    }

    /// Checks a server's proof (over the answer that followed it) in constant time.
    pub fn verify_server(&self, t: &Transcript, answer: &Answer, tag: &[u8; AUTH_BYTES]) -> bool {
        let mut mac = self.keyed(b"pagemig server", t);
        feed_answer(&mut mac, answer);
        mac.verify_slice(tag).is_ok()
    }

    /// The keys that seal this connection's frames after the handshake (see
    /// [`crate::seal`]): HKDF-SHA256 of the key, salted with both nonces, one key per
    /// direction, bound to the role.
    pub fn channel_secrets(&self, t: &Transcript) -> crate::seal::ChannelSecrets {
        let salt = ring::hkdf::Salt::new(
            ring::hkdf::HKDF_SHA256,
            &[t.server_nonce, t.client_nonce].concat(),
        );
        let prk = salt.extract(&self.bytes);
        let expand = |direction: &[u8]| -> [u8; 32] {
            let info = [b"pagemig v2 channel".as_slice(), &[t.role as u8], direction];
            let mut out = [0u8; 32];
            prk.expand(&info, ring::hkdf::HKDF_SHA256)
                .and_then(|okm| okm.fill(&mut out))
                .expect("32 bytes is within HKDF-SHA256's output limit");
            out
        };
        crate::seal::ChannelSecrets {
            client_to_server: expand(b"c2s"),
            server_to_client: expand(b"s2c"),
        }
    }

    fn keyed(&self, label: &[u8], t: &Transcript) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.bytes).expect("HMAC accepts keys of any length");
        mac.update(label);
        feed_transcript(&mut mac, t);
        mac
    }
}

fn feed_transcript(mac: &mut Hmac<Sha256>, t: &Transcript) {
    mac.update(&t.server_nonce);
    mac.update(&t.client_nonce);
    mac.update(&[t.role as u8]);
    feed_params(mac, &t.hello);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `NAME HEX` of a VM key file.
fn parse_vm_key(rest: &[u8]) -> Result<KeyFile, String> {
    let text = std::str::from_utf8(rest).map_err(|_| "not UTF-8".to_string())?;
    let (name, key_hex) = text
        .split_once(' ')
        .ok_or("expected `pagemig-vm-key v1 NAME HEX`")?;
    let vm = VmName::new(name)?;
    if vm.is_empty() || key_hex.len() != 64 || !key_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("expected a VM name and 64 hex digits".into());
    }
    let bytes = (0..32)
        .map(|i| u8::from_str_radix(&key_hex[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| "the key is not hex".to_string())?;
    Ok(KeyFile {
        psk: Psk { bytes, keyed: true },
        vm: Some(vm),
    })
}

/// Creates `path` (never replacing a file, never through a symlink) with mode 0600 and
/// writes `text`.
fn write_new_private(path: &Path, text: &str) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let create_err = |source| KeyError::Create {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(create_err)?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(create_err)
}

fn feed_params(mac: &mut Hmac<Sha256>, params: &SessionParams) {
    mac.update(&params.version.to_le_bytes());
    mac.update(&params.page_size.to_le_bytes());
    mac.update(&params.total_pages.to_le_bytes());
    mac.update(&params.session_id.to_le_bytes());
    mac.update(&params.image_id.to_le_bytes());
    mac.update(&params.flags.to_le_bytes());
    // Only a named VM adds bytes (so peers that name none keep their MAC); length first, so
    // no two names feed the same bytes.
    if !params.vm.is_empty() {
        mac.update(&[params.vm.as_str().len() as u8]);
        mac.update(params.vm.as_str().as_bytes());
    }
}

fn feed_answer(mac: &mut Hmac<Sha256>, answer: &Answer) {
    match answer {
        Answer::Welcome(params) => {
            mac.update(&[1]);
            feed_params(mac, params);
        }
        Answer::Refuse(code) => {
            mac.update(&[2]);
            mac.update(&(*code as u32).to_le_bytes());
        }
    }
}

/// A fresh random nonce.
pub fn nonce() -> [u8; AUTH_BYTES] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript() -> Transcript {
        Transcript {
            server_nonce: nonce(),
            client_nonce: nonce(),
            role: Role::Urgent,
            hello: SessionParams {
                version: 3,
                page_size: 4096,
                total_pages: 10,
                session_id: 0,
                image_id: 0,
                flags: 0,
                vm: crate::wire::VmName::default(),
            },
        }
    }

    #[test]
    fn test_macs_bind_key_side_nonces_and_params() {
        let key = Psk::from_bytes(b"0123456789abcdef");
        let t = transcript();
        let tag = key.client_mac(&t);
        assert!(key.verify_client(&t, &tag));
        let welcome = Answer::Welcome(t.hello);
        assert!(!key.verify_server(&t, &welcome, &tag), "sides differ");
        let swapped = Transcript {
            server_nonce: t.client_nonce,
            client_nonce: t.server_nonce,
            ..t
        };
        assert!(!key.verify_client(&swapped, &tag));
        let bulk = Transcript {
            role: Role::Bulk,
            ..t
        };
        assert!(!key.verify_client(&bulk, &tag));
        for hello in [
            SessionParams {
                total_pages: 11,
                ..t.hello
            },
            SessionParams {
                session_id: 5,
                ..t.hello
            },
            SessionParams {
                image_id: 9,
                ..t.hello
            },
            SessionParams {
                vm: crate::wire::VmName::new("other").expect("a valid name"),
                ..t.hello
            },
        ] {
            assert!(!key.verify_client(&Transcript { hello, ..t }, &tag));
        }
        // Two named VMs differ too.
        let mut named_a = t;
        named_a.hello.vm = crate::wire::VmName::new("a").expect("a valid name");
        let mut named_b = t;
        named_b.hello.vm = crate::wire::VmName::new("b").expect("a valid name");
        let tag_a = key.client_mac(&named_a);
        assert!(key.verify_client(&named_a, &tag_a));
        assert!(!key.verify_client(&named_b, &tag_a));
        let wrong = Psk::from_bytes(b"0123456789abcdeX");
        assert!(!wrong.verify_client(&t, &tag));
    }

    #[test]
    fn test_server_mac_binds_its_answer() {
        let key = Psk::from_bytes(b"0123456789abcdef");
        let t = transcript();
        let ours = SessionParams {
            session_id: 77,
            image_id: 0xABCD,
            ..t.hello
        };
        let tag = key.server_mac(&t, &Answer::Welcome(ours));
        assert!(key.verify_server(&t, &Answer::Welcome(ours), &tag));
        let other_image = SessionParams {
            image_id: 0xABCE,
            ..ours
        };
        assert!(!key.verify_server(&t, &Answer::Welcome(other_image), &tag));
        let other_session = SessionParams {
            session_id: 78,
            ..ours
        };
        assert!(!key.verify_server(&t, &Answer::Welcome(other_session), &tag));
        assert!(!key.verify_server(&t, &Answer::Refuse(ErrorCode::Busy), &tag));
        let refusal = key.server_mac(&t, &Answer::Refuse(ErrorCode::ImageMismatch));
        assert!(key.verify_server(&t, &Answer::Refuse(ErrorCode::ImageMismatch), &refusal));
        assert!(!key.verify_server(&t, &Answer::Refuse(ErrorCode::Busy), &refusal));
    }

    #[test]
    fn test_generated_keys_are_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("psk-gen-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Psk::generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert!(Psk::load(&path).unwrap().vm.is_none(), "a master key");
        assert!(matches!(Psk::generate(&path), Err(KeyError::Create { .. })));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            text,
            "not replaced"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Psk::load(&path).unwrap_err();
        assert!(
            matches!(err, KeyError::Exposed { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));
        assert!(
            !err.to_string().contains(text.trim()),
            "the key never appears"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn test_vm_keys_open_their_vm_only_and_bad_vm_key_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("vmkey-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let master = Psk::from_bytes(b"a master key of the fleet, 32 by");
        let a = VmName::new("a").unwrap();
        master.write_vm_key(&a, &dir.join("a.key")).unwrap();
        let file = Psk::load(&dir.join("a.key")).unwrap();
        assert_eq!(file.vm, Some(a));
        let mut t = transcript();
        t.hello.vm = a;
        let tag = file.psk.client_mac(&t);
        assert!(
            master.for_vm(&a).verify_client(&t, &tag),
            "the master derives it"
        );
        let b = VmName::new("b").unwrap();
        assert!(
            !master.for_vm(&b).verify_client(&t, &tag),
            "b's key is another"
        );
        assert!(
            !master.verify_client(&t, &tag),
            "the master itself is another"
        );
        for bad in [
            "pagemig-vm-key v1 a 00".to_string(),
            format!("pagemig-vm-key v1 a {}", "é".repeat(32)),
            format!("pagemig-vm-key v1 a/b {}", "0".repeat(64)),
            format!("pagemig-vm-key v1  {}", "0".repeat(64)),
        ] {
            let path = dir.join("bad.key");
            std::fs::write(&path, &bad).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert!(
                matches!(Psk::load(&path), Err(KeyError::Malformed { .. })),
                "{bad}"
            );
        }
        std::os::unix::fs::symlink(dir.join("a.key"), dir.join("link.key")).unwrap();
        assert!(
            matches!(Psk::load(&dir.join("link.key")), Err(KeyError::Read { .. })),
            "a symlink is not followed"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_short_keys_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("psk-{}", std::process::id()));
        std::fs::write(&path, b"short\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Psk::load(&path),
            Err(KeyError::TooShort { len: 5, .. })
        ));
        std::fs::write(&path, b"  a-long-enough-secret-key \n").unwrap();
        assert!(Psk::load(&path).is_ok());
        std::fs::remove_file(&path).unwrap();
    }
}
