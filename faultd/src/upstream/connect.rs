//! Opening a session with pagesrv: both connections, the handshake (with the key, if any),
//! and the checks that the source serves what this VM needs: same protocol, same layout,
//! and, once pinned, the same memory image.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use std::io::Write;

use common::auth::{self, Psk, ResumeSecret, Transcript};
use common::framed::{FramedConn, ReadError};
use common::handshake::{ClientFailure, ClientGreeting, ClientStep, Welcomed};
use common::wire::{Decoder, ErrorCode, HelloFlags, PROTOCOL_VERSION, Role, SessionParams};
use thiserror::Error;
use tracing::warn;

/// How long connecting plus the handshake of one connection may take, in all.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// Errors reaching pagesrv; each names the step.
#[derive(Debug, Error)]
pub enum UpstreamError {
    /// The address did not resolve.
    #[error("cannot resolve {addr}")]
    Resolve {
        /// The address given.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TCP connect failed.
    #[error("cannot connect to pagesrv at {addr} ({role:?} connection)")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// Which connection.
        role: Role,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The handshake failed on the wire (including its deadline).
    #[error("handshake with pagesrv failed ({role:?} connection)")]
    Handshake {
        /// Which connection.
        role: Role,
        /// Why.
        #[source]
        source: ReadError,
    },
    /// Sending failed.
    #[error("failed to send to pagesrv")]
    Send(#[source] std::io::Error),
    /// pagesrv refused us.
    #[error("pagesrv refused the session ({code:?}): {text}")]
    Refused {
        /// Its error code.
        code: ErrorCode,
        /// Its explanation.
        text: String,
        /// Whether the refusal came after pagesrv proved the key (and bound the refusal).
        trusted: bool,
    },
    /// Authentication failed or was not possible.
    #[error("authentication with pagesrv failed: {0}")]
    Auth(&'static str),
    /// No key, and pagesrv is not on this host.
    #[error(
        "refusing to connect to {addr} without a key: --insecure-no-key is for loopback only (give --psk-file)"
    )]
    KeylessRemote {
        /// Where pagesrv is.
        addr: SocketAddr,
    },
    /// The source's memory does not match the VMM's layout (or the pinned image).
    #[error(
        "the source has {source_pages} pages of {source_page_size} bytes (protocol v{source_version}, image {source_image:016x}), \
         this VM needs {our_pages} pages of {our_page_size} bytes (protocol v{PROTOCOL_VERSION}{})",
        if *.our_image == 0 { String::new() } else { format!(", image {:016x}", .our_image) }
    )]
    Mismatch {
        /// pagesrv's page count.
        source_pages: u64,
        /// pagesrv's page size.
        source_page_size: u32,
        /// pagesrv's protocol version.
        source_version: u16,
        /// pagesrv's image.
        source_image: u64,
        /// Our page count.
        our_pages: u64,
        /// Our page size.
        our_page_size: u32,
        /// The image this session pinned (0: none yet).
        our_image: u64,
        /// Whether pagesrv proved the key.
        trusted: bool,
    },
}

impl UpstreamError {
    /// Whether trying again cannot help and the migration must fail rather than wait. Only
    /// what pagesrv itself says can be final: on the first contact (a misconfiguration is
    /// better reported at once), or later when it proved the key; nothing an
    /// unauthenticated peer says during a reconnect ends the migration (a stranger on the
    /// port must not), and name resolution or connection failures are always transient.
    pub fn is_fatal(&self, first_contact: bool) -> bool {
        let final_answer = |trusted: bool| trusted || first_contact;
        match self {
            UpstreamError::Resolve { .. }
            | UpstreamError::Connect { .. }
            | UpstreamError::Handshake { .. }
            | UpstreamError::Send(_) => false,
            UpstreamError::Auth(_) => first_contact,
            UpstreamError::KeylessRemote { .. } => true,
            UpstreamError::Mismatch { trusted, .. } => final_answer(*trusted),
            UpstreamError::Refused { code, trusted, .. } => {
                matches!(
                    code,
                    ErrorCode::LayoutMismatch
                        | ErrorCode::VersionMismatch
                        | ErrorCode::AuthFailed
                        | ErrorCode::ImageMismatch
                        | ErrorCode::UnknownVm
                ) && final_answer(*trusted)
            }
        }
    }
}

/// What a destination asks pagesrv for.
#[derive(Debug, Clone)]
pub struct Target {
    /// pagesrv's address.
    pub addr: String,
    /// The key of this VM (derived from the master key, or read from a VM key file), or
    /// [`Psk::unkeyed`] (`--insecure-no-key`).
    pub key: Psk,
    /// Page size of the VMM's memory.
    pub page_size: u32,
    /// Pages of the VMM's memory.
    pub total_pages: u64,
    /// Whether we hold a base image (pagesrv offers page hashes first).
    pub base: bool,
    /// Whether guest RAM is shared with other restores on this host (`--shared-ram`).
    pub shared_ram: bool,
    /// The VM to ask for (empty: the only one pagesrv serves).
    pub vm: common::wire::VmName,
    /// Bulk connections to open (the first carries everything; the others share the push).
    pub streams: u32,
}

impl Pins {
    /// Whether `welcome` is to the session and image these pin.
    fn welcomed_to(&self, welcome: &SessionParams) -> bool {
        welcome.session_id == self.session_id && welcome.image_id == self.image_id
    }
}

/// What a reconnect resumes: the session to replace (and the secret that proves it is
/// ours) and the image pinned (0: none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pins {
    /// The session to resume.
    pub session_id: u64,
    /// The memory image every later connection must serve.
    pub image_id: u64,
    /// The guest here runs already: pagesrv must not ask to drop pages.
    pub resumed: bool,
    /// The session's resume secret ([`common::auth`]): every connection after the one
    /// that opened the session proves it.
    pub secret: Option<ResumeSecret>,
}

/// An open session with pagesrv.
pub struct Upstream {
    /// Requests out, requested pages in (with a key, sealed both ways).
    pub urgent: FramedConn,
    /// Pushed pages in, answers to `Sync` out.
    pub bulk: FramedConn,
    /// Extra bulk connections (`--streams`).
    pub extra_bulk: Vec<FramedConn>,
    /// The session and image pagesrv welcomed us to.
    pub pins: Pins,
    /// Precopy rounds come first (the source still runs).
    pub precopy: bool,
    /// The free pages come first on the bulk connection, closed by a `Sync`: ask for
    /// nothing before it.
    pub free_first: bool,
}

/// Connects both connections and checks the source against the target and the pins. The
/// pins follow the urgent connection's `Welcome` at once (the session and its secret), so a
/// retry after a failed bulk connection resumes the session pagesrv just opened.
///
/// # Errors
/// Any [`UpstreamError`].
pub fn connect(
    target: &Target,
    pins: &mut Pins,
    link_timeout: Duration,
) -> Result<Upstream, UpstreamError> {
    let resolved = target
        .addr
        .to_socket_addrs()
        .map_err(|source| UpstreamError::Resolve {
            addr: target.addr.clone(),
            source,
        })?
        .next()
        .ok_or_else(|| UpstreamError::Resolve {
            addr: target.addr.clone(),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
    if !target.key.is_keyed() && !resolved.ip().is_loopback() {
        return Err(UpstreamError::KeylessRemote { addr: resolved });
    }
    let ours = SessionParams {
        version: PROTOCOL_VERSION,
        page_size: target.page_size,
        total_pages: target.total_pages,
        session_id: pins.session_id,
        image_id: pins.image_id,
        flags: HelloFlags {
            resumed: pins.resumed,
            base: target.base,
            shared_ram: target.shared_ram,
            extra_stream: false,
        }
        .bits(),
        vm: target.vm,
    };
    let key = &target.key;
    let (mut urgent, welcome, transcript) =
        open(resolved, key, Role::Urgent, ours, pins, link_timeout)?;
    if !welcome.proven() || pins.session_id != welcome.session_id {
        // A new session (or one a restarted pagesrv adopted): its secret is this handshake's.
        pins.secret = Some(key.resume_secret(&transcript, welcome.session_id));
    }
    pins.session_id = welcome.session_id;
    pins.image_id = welcome.image_id;
    let pins = &*pins;
    let bulk_hello = SessionParams {
        session_id: pins.session_id,
        image_id: pins.image_id,
        flags: 0,
        ..ours
    };
    let (mut bulk, bulk_welcome, _) =
        open(resolved, key, Role::Bulk, bulk_hello, pins, link_timeout)?;
    if !pins.welcomed_to(&bulk_welcome) {
        return Err(UpstreamError::Refused {
            code: ErrorCode::UnknownSession,
            text: format!(
                "pagesrv welcomed the bulk connection to session {:016x} (image {:016x}), not {:016x} (image {:016x})",
                bulk_welcome.session_id, bulk_welcome.image_id, pins.session_id, pins.image_id
            ),
            trusted: false,
        });
    }
    let decoder = Decoder::session(u64::from(target.page_size), target.total_pages);
    let extra_hello = SessionParams {
        flags: HelloFlags {
            extra_stream: true,
            ..HelloFlags::default()
        }
        .bits(),
        ..bulk_hello
    };
    let mut extra_bulk = Vec::new();
    for _ in 1..target.streams {
        // A refused extra stream (an older pagesrv, its limit, the naive baseline) costs only
        // itself: the session goes on with the connections it has.
        match open(resolved, key, Role::Bulk, extra_hello, pins, link_timeout) {
            Ok((mut conn, welcome, _)) if pins.welcomed_to(&welcome) => {
                conn.reader.set_decoder(decoder);
                extra_bulk.push(conn);
            }
            Ok((_, welcome, _)) => {
                warn!(
                    session = format_args!("{:016x}", welcome.session_id),
                    "pagesrv welcomed an extra bulk connection to another session: not using it"
                );
                break;
            }
            Err(e) => {
                warn!(error = %e, streams = 1 + extra_bulk.len(), "an extra bulk connection was not opened: going on with fewer");
                break;
            }
        }
    }
    urgent.reader.set_decoder(decoder);
    bulk.reader.set_decoder(decoder);
    Ok(Upstream {
        urgent,
        bulk,
        extra_bulk,
        pins: pins.clone(),
        precopy: welcome.precopy(),
        free_first: welcome.free_first(),
    })
}

/// Opens one connection: Hello, the key exchange (with the VM's key, or the public one of
/// the keyless mode), Welcome; within [`HANDSHAKE_DEADLINE`] in all. With a real key, every
/// later frame is sealed: the reader opens what pagesrv sends, the encoder seals what faultd
/// sends. Returns what pagesrv welcomed it with and the transcript too (a new session's
/// secret derives from it).
fn open(
    addr: SocketAddr,
    key: &Psk,
    role: Role,
    hello: SessionParams,
    pins: &Pins,
    link_timeout: Duration,
) -> Result<(FramedConn, SessionParams, Transcript), UpstreamError> {
    let deadline = Instant::now() + HANDSHAKE_DEADLINE;
    let connect_err = |source| UpstreamError::Connect { addr, role, source };
    let handshake_err = |source| UpstreamError::Handshake { role, source };
    let mut conn = TcpStream::connect_timeout(&addr, HANDSHAKE_DEADLINE).map_err(connect_err)?;
    common::netopt::detect_dead_peer(&conn, link_timeout).map_err(connect_err)?;
    // Best effort: a network that honours DSCP serves fault replies before bulk data.
    let _ = common::netopt::mark_traffic(&conn, role == Role::Urgent);
    conn.set_write_timeout(Some(HANDSHAKE_DEADLINE))
        .map_err(connect_err)?;
    let mut greeting =
        ClientGreeting::new(key.clone(), role, hello, pins.secret.clone(), auth::nonce());
    loop {
        let step = greeting.advance();
        // What it queued (the Hello, then the Proof) goes before anything is read.
        conn.write_all(&greeting.out).map_err(UpstreamError::Send)?;
        greeting.out.clear();
        match step {
            ClientStep::More => {}
            ClientStep::Welcomed(welcomed) => {
                let Welcomed {
                    params,
                    transcript,
                    reader,
                    encoder,
                } = *welcomed;
                check_welcome(&hello, &params, key.is_keyed())?;
                conn.set_read_timeout(None).map_err(connect_err)?;
                conn.set_write_timeout(None).map_err(connect_err)?;
                return Ok((FramedConn::new(conn, reader, encoder), params, transcript));
            }
            ClientStep::Failed(ClientFailure::Wire(e)) => {
                return Err(handshake_err(ReadError::Wire(e)));
            }
            ClientStep::Failed(ClientFailure::Auth(why)) => return Err(UpstreamError::Auth(why)),
            ClientStep::Failed(ClientFailure::Refused {
                code,
                text,
                trusted,
            }) => {
                return Err(UpstreamError::Refused {
                    code,
                    text,
                    trusted,
                });
            }
        }
        // Every read within the one deadline.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(handshake_err(ReadError::Io(
                std::io::ErrorKind::TimedOut.into(),
            )));
        }
        conn.set_read_timeout(Some(left)).map_err(connect_err)?;
        match greeting.reader().fill(&mut conn) {
            Ok(0) => {
                let mid_frame = greeting.reader().has_partial();
                return Err(handshake_err(ReadError::Closed { mid_frame }));
            }
            Ok(_) => {}
            Err(e) => return Err(handshake_err(ReadError::Io(e))),
        }
    }
}

fn check_welcome(
    ours: &SessionParams,
    theirs: &SessionParams,
    trusted: bool,
) -> Result<(), UpstreamError> {
    let image_differs = ours.image_id != 0 && theirs.image_id != ours.image_id;
    if !ours.vm.is_empty() && theirs.vm != ours.vm {
        return Err(UpstreamError::Refused {
            code: ErrorCode::UnknownVm,
            text: format!(
                "pagesrv welcomed us to VM {:?}, not {:?}",
                theirs.vm.as_str(),
                ours.vm.as_str()
            ),
            trusted,
        });
    }
    if theirs.version != ours.version
        || theirs.page_size != ours.page_size
        || theirs.total_pages != ours.total_pages
        || image_differs
    {
        return Err(UpstreamError::Mismatch {
            source_pages: theirs.total_pages,
            source_page_size: theirs.page_size,
            source_version: theirs.version,
            source_image: theirs.image_id,
            our_pages: ours.total_pages,
            our_page_size: ours.page_size,
            our_image: ours.image_id,
            trusted,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_only_final_answers_end_the_migration() {
        let refused = |code, trusted| UpstreamError::Refused {
            code,
            text: String::new(),
            trusted,
        };
        let stranger = refused(ErrorCode::LayoutMismatch, false);
        assert!(stranger.is_fatal(true), "first contact: report at once");
        assert!(!stranger.is_fatal(false), "a stranger during a reconnect");
        assert!(refused(ErrorCode::ImageMismatch, true).is_fatal(false));
        assert!(!refused(ErrorCode::Busy, true).is_fatal(true));
        assert!(!UpstreamError::Auth("x").is_fatal(false));
        assert!(UpstreamError::Auth("x").is_fatal(true));
        let resolve = UpstreamError::Resolve {
            addr: "nowhere".into(),
            source: std::io::ErrorKind::NotFound.into(),
        };
        assert!(
            !resolve.is_fatal(true),
            "name resolution failures are transient"
        );
    }
}
