//! One new connection's handshake up to admission, as a sans-IO state machine: the pump
//! ([`crate::admission`]) puts the bytes it reads into [`Greeting::reader`] and calls
//! [`Greeting::advance`], which answers `Hello` with a `Challenge` (bytes in
//! [`Greeting::out`]) and checks the `Proof` against the key of the VM the client named.
//! What to answer an admitted client (`Welcome` or a refusal, after `AuthOk`) is the
//! manager's decision (`server.rs`), and so is whether its resume proof holds.
//!
//! ```text
//!  AwaitHello ─Hello─► (Challenge out) AwaitProof ─Proof (key's MAC checks)─► Admitted
//!       └───────────── anything else, a bad MAC, a malformed frame ─────────► Rejected
//! ```

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::auth::{self, Answer, Psk, ResumeSecret, Transcript};
use common::framed::{FrameEncoder, FrameReader, write_frames};
use common::wire::phase::{Phase, ServerHandshake};
use common::wire::{
    AUTH_BYTES, Decoder, ErrorCode, Message, Role, SessionParams, VmName, WireError, encode,
};
use thiserror::Error;

/// How long a new connection may take from accept to admission, all reads included.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// Room for the handshake frames (a `Hello` is at most 112 bytes, a `Proof` 104); the
/// buffer grows if a client sends more.
const GREETING_BUFFER_BYTES: usize = 512;

/// Why a connection was not admitted.
#[derive(Debug, Error)]
pub enum Rejection {
    /// A malformed frame, or one out of the handshake's order.
    #[error("malformed handshake")]
    Wire(#[from] WireError),
    /// The client's proof was wrong: it does not hold the key of the VM it named.
    #[error("authentication failed: wrong key for VM {vm}")]
    WrongKey {
        /// The VM it named.
        vm: VmName,
        /// Whether this pagesrv has a key (else the client has one it does not).
        keyed: bool,
    },
    /// The client gave up (sent `Error`).
    #[error("the client gave up")]
    GaveUp,
}

impl Rejection {
    /// The reason's kind, for counting rejections in the rate-limited log.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::Wire(_) => "malformed",
            Rejection::WrongKey { .. } => "wrong key",
            Rejection::GaveUp => "gave up",
        }
    }
}

/// What a step of the handshake came to.
#[derive(Debug)]
pub enum Step {
    /// Waiting for more bytes (send [`Greeting::out`] first).
    More,
    /// The client proved the key of the VM it named: the manager answers it.
    Admitted(Box<Greeted>),
    /// Not admitted; [`Greeting::out`] holds the `Error` frame the client is owed, if any.
    Rejected(Rejection),
}

/// A connection in its handshake.
#[derive(Debug)]
pub struct Greeting {
    phase: ServerHandshake,
    reader: FrameReader,
    hello: Option<(Role, SessionParams)>,
    server_nonce: [u8; AUTH_BYTES],
    /// Bytes to send the client, in order (the `Challenge`, or a refusal).
    pub out: Vec<u8>,
}

/// The handshake's result: who the client is and what it proved.
#[derive(Debug)]
pub struct Greeted {
    /// Anything read past the handshake.
    pub reader: FrameReader,
    /// Urgent or bulk.
    pub role: Role,
    /// What the client asked for.
    pub hello: SessionParams,
    /// The key of the VM it named (its MAC checked): answers are bound with it.
    pub key: Psk,
    /// What both MACs cover.
    pub transcript: Transcript,
    /// Its proof of the session's resume secret (zeros: none).
    pub resume: [u8; AUTH_BYTES],
}

impl Default for Greeting {
    fn default() -> Self {
        Greeting::new(auth::nonce())
    }
}

impl Greeting {
    /// A connection just accepted; `server_nonce` goes into its `Challenge`.
    pub fn new(server_nonce: [u8; AUTH_BYTES]) -> Self {
        Greeting {
            phase: ServerHandshake::AwaitHello,
            reader: FrameReader::with_capacity(Decoder::handshake(), GREETING_BUFFER_BYTES),
            hello: None,
            server_nonce,
            out: Vec::new(),
        }
    }

    /// Where the pump puts the bytes it reads.
    pub fn reader(&mut self) -> &mut FrameReader {
        &mut self.reader
    }

    /// Whether the client's whole `Hello` arrived (a client that dribbles it has made no
    /// progress: it is the first to make room for others).
    pub fn has_hello(&self) -> bool {
        self.hello.is_some()
    }

    /// The session the client's `Hello` names, if any (a claim to resume it, not yet
    /// proven).
    pub fn named_session(&self) -> Option<u64> {
        self.hello
            .map(|(_, hello)| hello.session_id)
            .filter(|&id| id != 0)
    }

    /// Decodes what is buffered: answers `Hello` with a `Challenge` and checks the `Proof`
    /// with `master`'s key for the VM the client named ([`Psk::unkeyed`] without a key).
    pub fn advance(&mut self, master: &Psk) -> Step {
        loop {
            let (message, _) = match self.reader.next_buffered() {
                Ok(Some(frame)) => frame,
                Ok(None) => return Step::More,
                Err(e) => return self.reject(ErrorCode::Protocol, Rejection::Wire(e)),
            };
            if let Err(e) = self.phase.receive(message.kind()) {
                let code = if self.phase == ServerHandshake::AwaitProof {
                    ErrorCode::AuthFailed
                } else {
                    ErrorCode::Protocol
                };
                return self.reject(code, Rejection::Wire(e));
            }
            match message {
                Message::Hello { role, params } => {
                    self.hello = Some((role, params));
                    encode(&Message::Challenge(self.server_nonce), 0, &mut self.out);
                }
                Message::Proof { nonce, mac, resume } => {
                    let (role, hello) = self.hello.expect("the phase machine wants Hello first");
                    let transcript = Transcript {
                        server_nonce: self.server_nonce,
                        client_nonce: nonce,
                        role,
                        hello,
                    };
                    let key = master.for_vm(&hello.vm);
                    if !key.verify_client(&transcript, &mac) {
                        let why = Rejection::WrongKey {
                            vm: hello.vm,
                            keyed: master.is_keyed(),
                        };
                        return self.reject(ErrorCode::AuthFailed, why);
                    }
                    let reader = std::mem::replace(
                        &mut self.reader,
                        FrameReader::with_capacity(Decoder::handshake(), 0),
                    );
                    return Step::Admitted(Box::new(Greeted {
                        reader,
                        role,
                        hello,
                        key,
                        transcript,
                        resume,
                    }));
                }
                Message::Error { .. } => return Step::Rejected(Rejection::GaveUp),
                other => {
                    let e = WireError::Unexpected(other.kind());
                    return self.reject(ErrorCode::Protocol, Rejection::Wire(e));
                }
            }
        }
    }

    /// Queues the `Error` frame a rejected client is owed (no detail an attacker could use:
    /// the code and the rule it broke).
    fn reject(&mut self, code: ErrorCode, why: Rejection) -> Step {
        let text = match &why {
            Rejection::WrongKey { keyed: true, .. } => {
                "authentication failed: wrong key for this VM (pagesrv's --psk-file, or the VM key derived from it), or no key: give faultd --psk-file"
                    .to_string()
            }
            Rejection::WrongKey { keyed: false, .. } => {
                "authentication failed: this pagesrv runs without a key (--insecure-no-key): faultd needs the same flag"
                    .to_string()
            }
            Rejection::Wire(e) => e.to_string(),
            Rejection::GaveUp => String::new(),
        };
        encode(&Message::Error { code, text }, 0, &mut self.out);
        Step::Rejected(why)
    }
}

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
        secret.verify(&self.greeted.transcript, &self.greeted.resume)
    }

    /// The resume secret of a session this (urgent) connection opens as `session_id`.
    pub fn new_secret(&self, session_id: u64) -> ResumeSecret {
        self.greeted
            .key
            .resume_secret(&self.greeted.transcript, session_id)
    }

    /// Answers with `AuthOk` + `Welcome`; with a real key, every later frame in both
    /// directions is sealed ([`common::seal`]): the reader opens, the encoder seals.
    ///
    /// # Errors
    /// The socket's error.
    pub fn welcome(&mut self, params: SessionParams) -> std::io::Result<()> {
        self.answer(Answer::Welcome(params), &Message::Welcome(params))?;
        if self.greeted.key.is_keyed() {
            let (sealer, opener) = self
                .greeted
                .key
                .channel_secrets(&self.greeted.transcript)
                .server();
            self.greeted.reader.set_opener(opener);
            self.encoder = FrameEncoder::sealed(sealer);
        }
        Ok(())
    }

    /// Refuses (after `AuthOk`, so the client knows the refusal is ours); errors sending it
    /// are ignored (the client may be gone).
    pub fn refuse(&mut self, code: ErrorCode, text: &str) {
        let error = Message::Error {
            code,
            text: text.to_owned(),
        };
        let _ = self.answer(Answer::Refuse(code), &error);
    }

    fn answer(&mut self, answer: Answer, message: &Message) -> std::io::Result<()> {
        self.conn.set_write_timeout(Some(HANDSHAKE_DEADLINE))?;
        let ok = Message::AuthOk(
            self.greeted
                .key
                .server_mac(&self.greeted.transcript, &answer),
        );
        write_frames(&mut self.conn, &[(ok, &[][..]), (message.clone(), &[][..])])?;
        self.conn.set_write_timeout(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::wire::PROTOCOL_VERSION;

    fn hello(vm: &str, session_id: u64) -> SessionParams {
        SessionParams {
            version: PROTOCOL_VERSION,
            page_size: 4096,
            total_pages: 16,
            session_id,
            image_id: 0,
            flags: 0,
            vm: VmName::new(vm).unwrap(),
        }
    }

    fn feed(g: &mut Greeting, message: &Message) {
        let mut bytes = Vec::new();
        encode(message, 0, &mut bytes);
        g.reader().fill(&mut bytes.as_slice()).unwrap();
    }

    /// The client's half: the Proof for `hello` with `key`, given the server's nonce.
    fn proof(key: &Psk, sn: [u8; AUTH_BYTES], hello: SessionParams) -> (Message, Transcript) {
        let t = Transcript {
            server_nonce: sn,
            client_nonce: auth::nonce(),
            role: Role::Urgent,
            hello,
        };
        let message = Message::Proof {
            nonce: t.client_nonce,
            mac: key.client_mac(&t),
            resume: [0; AUTH_BYTES],
        };
        (message, t)
    }

    #[test]
    fn test_a_dribbled_hello_waits_and_a_whole_one_is_challenged() {
        let sn = [7; AUTH_BYTES];
        let mut g = Greeting::new(sn);
        let mut bytes = Vec::new();
        let params = hello("a", 0);
        encode(
            &Message::Hello {
                role: Role::Urgent,
                params,
            },
            0,
            &mut bytes,
        );
        let master = Psk::from_bytes(b"0123456789abcdef0123");
        for byte in &bytes[..bytes.len() - 1] {
            g.reader().fill(&mut std::slice::from_ref(byte)).unwrap();
            assert!(matches!(g.advance(&master), Step::More));
            assert!(
                !g.has_hello() && g.out.is_empty(),
                "nothing before the whole Hello"
            );
        }
        g.reader().fill(&mut &bytes[bytes.len() - 1..]).unwrap();
        assert!(matches!(g.advance(&master), Step::More));
        assert!(g.has_hello() && g.named_session().is_none());
        let mut challenge = Vec::new();
        encode(&Message::Challenge(sn), 0, &mut challenge);
        assert_eq!(g.out, challenge);
    }

    #[test]
    fn test_the_proof_must_be_made_with_the_key_of_the_vm_named() {
        let master = Psk::from_bytes(b"the master key of a fleet");
        for (client_key, admitted) in [
            (master.for_vm(&VmName::new("a").unwrap()), true),
            (master.for_vm(&VmName::new("b").unwrap()), false),
            (master.clone(), false),
            (Psk::unkeyed().for_vm(&VmName::new("a").unwrap()), false),
        ] {
            let sn = auth::nonce();
            let mut g = Greeting::new(sn);
            let params = hello("a", 9);
            feed(
                &mut g,
                &Message::Hello {
                    role: Role::Urgent,
                    params,
                },
            );
            assert!(matches!(g.advance(&master), Step::More));
            assert_eq!(g.named_session(), Some(9));
            g.out.clear();
            let (p, t) = proof(&client_key, sn, params);
            feed(&mut g, &p);
            match g.advance(&master) {
                Step::Admitted(greeted) => {
                    assert!(admitted, "admitted with the wrong key");
                    assert_eq!(greeted.hello, params);
                    assert_eq!(greeted.transcript.client_nonce, t.client_nonce);
                    assert!(greeted.key.verify_client(&t, &client_key.client_mac(&t)));
                }
                Step::Rejected(why) => {
                    assert!(!admitted, "refused with the right key: {why}");
                    assert!(matches!(why, Rejection::WrongKey { .. }), "{why}");
                    let (m, _) = FrameReader::new(Decoder::handshake())
                        .read_frame(&mut g.out.as_slice())
                        .unwrap();
                    let Message::Error { code, text } = m else {
                        panic!("{m:?}")
                    };
                    assert_eq!(code, ErrorCode::AuthFailed);
                    assert!(!text.contains("09"), "no session id: {text}");
                }
                Step::More => panic!("a whole Proof was buffered"),
            }
        }
    }

    #[test]
    fn test_frames_out_of_order_are_refused() {
        let master = Psk::unkeyed();
        let mut g = Greeting::new(auth::nonce());
        feed(
            &mut g,
            &Message::Proof {
                nonce: [0; AUTH_BYTES],
                mac: [0; AUTH_BYTES],
                resume: [0; AUTH_BYTES],
            },
        );
        assert!(matches!(
            g.advance(&master),
            Step::Rejected(Rejection::Wire(_))
        ));
        let mut g = Greeting::new(auth::nonce());
        g.reader().fill(&mut [0xFFu8; 8].as_slice()).unwrap();
        assert!(matches!(
            g.advance(&master),
            Step::Rejected(Rejection::Wire(_))
        ));
    }

    #[test]
    fn test_resume_proofs_bind_the_session_secret() {
        let master = Psk::unkeyed();
        let key = master.for_vm(&VmName::default());
        let opened = Transcript {
            server_nonce: auth::nonce(),
            client_nonce: auth::nonce(),
            role: Role::Urgent,
            hello: hello("", 0),
        };
        let secret = key.resume_secret(&opened, 42);
        let sn = auth::nonce();
        let mut g = Greeting::new(sn);
        let params = hello("", 42);
        feed(
            &mut g,
            &Message::Hello {
                role: Role::Bulk,
                params,
            },
        );
        let _ = g.advance(&master);
        let t = Transcript {
            server_nonce: sn,
            client_nonce: auth::nonce(),
            role: Role::Bulk,
            hello: params,
        };
        feed(
            &mut g,
            &Message::Proof {
                nonce: t.client_nonce,
                mac: key.client_mac(&t),
                resume: secret.prove(&t),
            },
        );
        let Step::Admitted(greeted) = g.advance(&master) else {
            panic!("the key's proof is right")
        };
        let admitted_proves = |s: &ResumeSecret| s.verify(&greeted.transcript, &greeted.resume);
        assert!(admitted_proves(&secret));
        assert!(
            !admitted_proves(&key.resume_secret(&opened, 43)),
            "another session"
        );
        let other = Transcript {
            client_nonce: auth::nonce(),
            ..opened
        };
        assert!(
            !admitted_proves(&key.resume_secret(&other, 42)),
            "a session opened by another handshake"
        );
    }
}
