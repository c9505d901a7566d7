//! The two connections to pagesrv: connect, handshake, and check that the source's memory
//! matches the VMM's layout.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use common::auth::{self, Psk, Side};
use common::framed::{FrameReader, ReadError, write_frame};
use common::wire::{Decoder, ErrorCode, Message, PROTOCOL_VERSION, Role, SessionParams};
use thiserror::Error;

/// How long connecting and the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// The handshake failed on the wire.
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
    },
    /// pagesrv answered with something other than Welcome.
    #[error("pagesrv answered the handshake with {0:?}")]
    Unexpected(common::wire::Kind),
    /// Authentication failed or was not possible.
    #[error("authentication with pagesrv failed: {0}")]
    Auth(&'static str),
    /// The source's memory does not match the VMM's layout.
    #[error(
        "the source has {source_pages} pages of {source_page_size} bytes (protocol v{source_version}), \
         the VMM's layout has {our_pages} pages of {our_page_size} bytes (protocol v{PROTOCOL_VERSION})"
    )]
    Mismatch {
        /// pagesrv's page count.
        source_pages: u64,
        /// pagesrv's page size.
        source_page_size: u32,
        /// pagesrv's protocol version.
        source_version: u16,
        /// Our page count.
        our_pages: u64,
        /// Our page size.
        our_page_size: u32,
    },
}

impl UpstreamError {
    /// Whether trying again cannot help (wrong layout, wrong key, bad address): the
    /// migration must fail rather than wait.
    pub fn is_fatal(&self) -> bool {
        match self {
            UpstreamError::Resolve { .. }
            | UpstreamError::Mismatch { .. }
            | UpstreamError::Auth(_) => true,
            UpstreamError::Refused { code, .. } => matches!(
                code,
                ErrorCode::LayoutMismatch | ErrorCode::VersionMismatch | ErrorCode::AuthFailed
            ),
            _ => false,
        }
    }
}

/// An open session with pagesrv.
pub struct Upstream {
    /// Requests out, requested pages in.
    pub urgent: TcpStream,
    /// Anything read past the urgent handshake.
    pub urgent_reader: FrameReader,
    /// Pushed pages in.
    pub bulk: TcpStream,
    /// Anything read past the bulk handshake.
    pub bulk_reader: FrameReader,
    /// The session id pagesrv assigned.
    pub session_id: u64,
}

/// Connects both connections and checks the source against `page_size` and `total_pages`.
///
/// # Errors
/// Any [`UpstreamError`].
pub fn connect(
    addr: &str,
    psk: Option<&Psk>,
    page_size: u32,
    total_pages: u64,
) -> Result<Upstream, UpstreamError> {
    let resolved = addr
        .to_socket_addrs()
        .map_err(|source| UpstreamError::Resolve {
            addr: addr.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| UpstreamError::Resolve {
            addr: addr.to_owned(),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
    let ours = SessionParams {
        version: PROTOCOL_VERSION,
        page_size,
        total_pages,
        session_id: 0,
    };
    let (urgent, urgent_reader, session_id) = open(resolved, psk, Role::Urgent, ours)?;
    let (bulk, bulk_reader, _) = open(
        resolved,
        psk,
        Role::Bulk,
        SessionParams { session_id, ..ours },
    )?;
    let decoder = Decoder::session(u64::from(page_size), total_pages);
    let (mut urgent_reader, mut bulk_reader) = (urgent_reader, bulk_reader);
    urgent_reader.set_decoder(decoder);
    bulk_reader.set_decoder(decoder);
    Ok(Upstream {
        urgent,
        urgent_reader,
        bulk,
        bulk_reader,
        session_id,
    })
}

fn open(
    addr: SocketAddr,
    psk: Option<&Psk>,
    role: Role,
    ours: SessionParams,
) -> Result<(TcpStream, FrameReader, u64), UpstreamError> {
    let connect_err = |source| UpstreamError::Connect { addr, role, source };
    let mut conn = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(connect_err)?;
    common::netopt::detect_dead_peer(&conn).map_err(connect_err)?;
    conn.set_read_timeout(Some(CONNECT_TIMEOUT))
        .map_err(connect_err)?;
    write_frame(&mut conn, &Message::Hello { role, params: ours }, &[])
        .map_err(UpstreamError::Send)?;
    let mut reader = FrameReader::new(Decoder::handshake());
    let mut read = |conn: &mut TcpStream| {
        reader
            .read_frame(conn)
            .map(|(m, _)| m)
            .map_err(|source| UpstreamError::Handshake { role, source })
    };
    let mut message = read(&mut conn)?;
    match (&message, psk) {
        (Message::Challenge(server_nonce), Some(psk)) => {
            let client_nonce = auth::nonce();
            let mac = psk.mac(Side::Client, server_nonce, &client_nonce, role, &ours);
            write_frame(
                &mut conn,
                &Message::Proof {
                    nonce: client_nonce,
                    mac,
                },
                &[],
            )
            .map_err(UpstreamError::Send)?;
            match read(&mut conn)? {
                Message::AuthOk(tag)
                    if psk.verify(Side::Server, server_nonce, &client_nonce, role, &ours, &tag) => {
                }
                Message::AuthOk(_) => {
                    return Err(UpstreamError::Auth("pagesrv proved a different key"));
                }
                Message::Error { code, text } => return Err(UpstreamError::Refused { code, text }),
                other => return Err(UpstreamError::Unexpected(other.kind())),
            }
            message = read(&mut conn)?;
        }
        (Message::Challenge(_), None) => {
            return Err(UpstreamError::Auth(
                "pagesrv requires a key: give --psk-file",
            ));
        }
        (Message::Welcome(_), Some(_)) => {
            return Err(UpstreamError::Auth(
                "pagesrv does not authenticate itself; refusing to take pages from it with --psk-file",
            ));
        }
        _ => {}
    }
    let theirs = match message {
        Message::Welcome(p) => p,
        Message::Error { code, text } => return Err(UpstreamError::Refused { code, text }),
        other => return Err(UpstreamError::Unexpected(other.kind())),
    };
    if theirs.version != ours.version
        || theirs.page_size != ours.page_size
        || theirs.total_pages != ours.total_pages
    {
        return Err(UpstreamError::Mismatch {
            source_pages: theirs.total_pages,
            source_page_size: theirs.page_size,
            source_version: theirs.version,
            our_pages: ours.total_pages,
            our_page_size: ours.page_size,
        });
    }
    conn.set_read_timeout(None).map_err(connect_err)?;
    Ok((conn, reader, theirs.session_id))
}
