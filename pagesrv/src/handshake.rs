//! A connection past its handshake (`common::handshake`, driven by the admission thread),
//! waiting for the manager's answer: `Welcome` or a refusal, each after `AuthOk`.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::auth::{Answer, ResumeSecret};
use common::framed::{FrameEncoder, FramedConn};
use common::handshake::Greeted;
use common::wire::{ErrorCode, Role, SessionParams};

/// How long a new connection may take from accept to admission, all reads included.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// A connection past the handshake, waiting for the manager's answer.
#[derive(Debug)]
pub struct Admitted {
    /// The connection (blocking, no timeouts set).
    pub conn: TcpStream,
    /// Who.
    pub peer: SocketAddr,
    /// The handshake's result.
    pub greeted: Greeted,
    /// Encodes what pagesrv sends after `Welcome` (sealed with a key, see
    /// [`Admitted::welcome`]).
    pub encoder: FrameEncoder,
}

impl Admitted {
    /// The connection, its reader (anything read past the handshake) and its encoder, for
    /// the session.
    pub fn into_framed(self) -> FramedConn {
        FramedConn::new(self.conn, self.greeted.reader, self.encoder)
    }

    /// Urgent or bulk.
    pub fn role(&self) -> Role {
        self.greeted.role
    }

    /// What the client asked for.
    pub fn hello(&self) -> &SessionParams {
        &self.greeted.hello
    }

    /// Whether the client proved `secret` (the resume secret of the session it names).
    pub fn proves(&self, secret: &ResumeSecret) -> bool {
        self.greeted.proves(secret)
    }

    /// The resume secret of a session this (urgent) connection opens as `session_id`.
    pub fn new_secret(&self, session_id: u64) -> ResumeSecret {
        self.greeted.new_secret(session_id)
    }

    /// Answers with `AuthOk` + `Welcome`; with a real key, every later frame in both
    /// directions is sealed ([`common::seal`]): the reader opens, the encoder seals.
    ///
    /// # Errors
    /// The socket's error.
    pub fn welcome(&mut self, params: SessionParams) -> std::io::Result<()> {
        let (bytes, encoder) = self.greeted.answer(Answer::Welcome(params), "");
        self.send(&bytes)?;
        self.encoder = encoder;
        Ok(())
    }

    /// Refuses (after `AuthOk`, so the client knows the refusal is ours); errors sending it
    /// are ignored (the client may be gone).
    pub fn refuse(&mut self, code: ErrorCode, text: &str) {
        let (bytes, _) = self.greeted.answer(Answer::Refuse(code), text);
        let _ = self.send(&bytes);
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.conn.set_write_timeout(Some(HANDSHAKE_DEADLINE))?;
        self.conn.write_all(bytes)?;
        self.conn.set_write_timeout(None)
    }
}
