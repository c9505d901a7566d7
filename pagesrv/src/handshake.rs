//! One new connection's handshake up to admission: `Hello`, and with a key the challenge and
//! the client's proof; all within one deadline (not per read), on the connection's own
//! thread, so a silent or hostile client delays nobody else. What to answer an admitted
//! client (`Welcome` or a refusal, after `AuthOk`) is the server's decision (`server.rs`).

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::auth::{self, Answer, Psk, Transcript};
use common::framed::{FrameEncoder, FrameReader, ReadError, send_error, write_frame, write_frames};
use common::wire::phase::{Phase, ServerHandshake};
use common::wire::{Decoder, ErrorCode, Message, Role, SessionParams};
use thiserror::Error;

/// How long a new connection may take from accept to admission.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// Why a connection was not admitted.
#[derive(Debug, Error)]
pub enum Rejection {
    /// Nothing valid arrived before the deadline, or the connection broke.
    #[error("no valid handshake")]
    Read(#[from] ReadError),
    /// The client's proof was missing or wrong (it was told so).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// A socket option could not be set.
    #[error("socket setup failed")]
    Socket(#[source] std::io::Error),
}

/// A connection past the handshake, waiting for the server's answer.
#[derive(Debug)]
pub struct Admitted {
    /// The connection (blocking, no timeouts set).
    pub conn: TcpStream,
    /// Anything read past the handshake.
    pub reader: FrameReader,
    /// Who.
    pub peer: SocketAddr,
    /// Urgent or bulk.
    pub role: Role,
    /// What the client asked for.
    pub hello: SessionParams,
    /// With a key: what both MACs cover.
    pub transcript: Option<Transcript>,
    /// Encodes what pagesrv sends after `Welcome` (sealed with a key, see
    /// [`Admitted::welcome`]).
    pub encoder: FrameEncoder,
}

impl Admitted {
    /// Answers with `Welcome` (after `AuthOk` with a key); with a key, every later frame in
    /// both directions is sealed ([`common::seal`]): the reader opens, the encoder seals.
    ///
    /// # Errors
    /// The socket's error.
    pub fn welcome(&mut self, psk: Option<&Psk>, params: SessionParams) -> std::io::Result<()> {
        self.answer(psk, Answer::Welcome(params), &Message::Welcome(params))?;
        if let (Some(psk), Some(t)) = (psk, &self.transcript) {
            let (sealer, opener) = psk.channel_secrets(t).server();
            self.reader.set_opener(opener);
            self.encoder = FrameEncoder::sealed(sealer);
        }
        Ok(())
    }

    /// Refuses (after `AuthOk` with a key, so the client knows the refusal is ours); errors
    /// sending it are ignored (the client may be gone).
    pub fn refuse(&mut self, psk: Option<&Psk>, code: ErrorCode, text: &str) {
        let error = Message::Error {
            code,
            text: text.to_owned(),
        };
        let _ = self.answer(psk, Answer::Refuse(code), &error);
    }

    fn answer(
        &mut self,
        psk: Option<&Psk>,
        answer: Answer,
        message: &Message,
    ) -> std::io::Result<()> {
        self.conn.set_write_timeout(Some(HANDSHAKE_DEADLINE))?;
        match (psk, &self.transcript) {
            (Some(psk), Some(t)) => {
                let ok = Message::AuthOk(psk.server_mac(t, &answer));
                write_frames(&mut self.conn, &[(ok, &[][..]), (message.clone(), &[][..])])?;
            }
            _ => write_frame(&mut self.conn, message, &[])?,
        }
        self.conn.set_write_timeout(None)
    }
}

/// A connection that was not admitted, with the `Error` frame it is owed (sent by
/// [`Rejected::reply`] after the caller logged the rejection: the log is never behind the
/// wire).
#[derive(Debug)]
pub struct Rejected {
    /// Why.
    pub reason: Rejection,
    conn: TcpStream,
    reply: Option<(ErrorCode, String)>,
}

impl Rejected {
    /// Sends the client its `Error` frame, if it is owed one, and closes the connection.
    pub fn reply(mut self) {
        if let Some((code, text)) = self.reply.take() {
            send_error(&mut self.conn, code, &text);
        }
    }
}

/// Runs a new connection's handshake until it is admitted or rejected.
///
/// # Errors
/// A [`Rejected`] connection.
pub fn admit(
    conn: TcpStream,
    peer: SocketAddr,
    psk: Option<&Psk>,
) -> Result<Admitted, Box<Rejected>> {
    let mut conn = conn;
    let mut reply = None;
    match run_handshake(&mut conn, psk, &mut reply) {
        Ok((reader, role, hello, transcript)) => Ok(Admitted {
            conn,
            reader,
            peer,
            role,
            hello,
            transcript,
            encoder: FrameEncoder::plain(),
        }),
        Err(reason) => Err(Box::new(Rejected {
            reason,
            conn,
            reply,
        })),
    }
}

type Handshaken = (FrameReader, Role, SessionParams, Option<Transcript>);

fn run_handshake(
    conn: &mut TcpStream,
    psk: Option<&Psk>,
    reply: &mut Option<(ErrorCode, String)>,
) -> Result<Handshaken, Rejection> {
    let deadline = Instant::now() + HANDSHAKE_DEADLINE;
    conn.set_write_timeout(Some(HANDSHAKE_DEADLINE))
        .map_err(Rejection::Socket)?;
    let mut reader = FrameReader::new(Decoder::handshake());
    let mut phase = ServerHandshake::AwaitHello {
        keyed: psk.is_some(),
    };
    let (role, hello) = match read_before(conn, &mut reader, &mut phase, deadline, reply)? {
        Message::Hello { role, params } => (role, params),
        other => return Err(unexpected(&other, reply)),
    };
    let transcript = match psk {
        None => None,
        Some(psk) => {
            let server_nonce = auth::nonce();
            write_frame(conn, &Message::Challenge(server_nonce), &[])
                .map_err(|e| Rejection::Read(e.into()))?;
            let (client_nonce, mac) =
                match read_before(conn, &mut reader, &mut phase, deadline, reply)? {
                    Message::Proof { nonce, mac } => (nonce, mac),
                    other => return Err(unexpected(&other, reply)),
                };
            let t = Transcript {
                server_nonce,
                client_nonce,
                role,
                hello,
            };
            if !psk.verify_client(&t, &mac) {
                *reply = Some((
                    ErrorCode::AuthFailed,
                    "authentication failed: wrong key".into(),
                ));
                return Err(Rejection::Auth("wrong key".into()));
            }
            Some(t)
        }
    };
    conn.set_read_timeout(None).map_err(Rejection::Socket)?;
    conn.set_write_timeout(None).map_err(Rejection::Socket)?;
    Ok((reader, role, hello, transcript))
}

/// Reads one handshake frame before `deadline`, through the phase machine.
fn read_before(
    conn: &mut TcpStream,
    reader: &mut FrameReader,
    phase: &mut ServerHandshake,
    deadline: Instant,
    reply: &mut Option<(ErrorCode, String)>,
) -> Result<Message, Rejection> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Rejection::Read(ReadError::Io(
            std::io::ErrorKind::TimedOut.into(),
        )));
    }
    conn.set_read_timeout(Some(left))
        .map_err(Rejection::Socket)?;
    let (message, _) = reader.read_frame(conn)?;
    if let Err(e) = phase.receive(message.kind()) {
        let text = e.to_string();
        if matches!(phase, ServerHandshake::AwaitProof) {
            *reply = Some((
                ErrorCode::AuthFailed,
                format!("authentication failed: {text}"),
            ));
            return Err(Rejection::Auth(format!("expected Proof: {text}")));
        }
        *reply = Some((ErrorCode::Protocol, text));
        return Err(Rejection::Read(ReadError::Wire(e)));
    }
    Ok(message)
}

fn unexpected(message: &Message, reply: &mut Option<(ErrorCode, String)>) -> Rejection {
    let e = common::wire::WireError::Unexpected(message.kind());
    *reply = Some((ErrorCode::Protocol, e.to_string()));
    Rejection::Read(ReadError::Wire(e))
}
