//! One connection's handshake, both halves, as sans-IO state machines: the caller moves
//! bytes (into [`ServerGreeting::reader`] / [`ClientGreeting::reader`], out of their `out`
//! buffers) and calls `advance`; the machines decide everything else. Both daemons use them:
//! pagesrv's admission thread drives [`ServerGreeting`], faultd's connector drives
//! [`ClientGreeting`] (see [`crate::auth`] for what the MACs and the resume secret prove).
//!
//! ```text
//!  client                                        server
//!  ClientGreeting::new ── Hello ─────────────►   ServerGreeting: AwaitHello
//!                      ◄──────────── Challenge   (queued on Hello)
//!  AwaitServer ─────── Proof ────────────────►   AwaitProof: the named VM's key checks the MAC
//!                                                → Greeted (the manager decides the answer)
//!                      ◄──── AuthOk + Welcome    Greeted::answer(Welcome)  (or AuthOk + Error)
//!  AwaitAuthOk ─► AwaitWelcome ─► Welcomed (the server's MAC checks; keys for sealing)
//! ```

use crate::auth::{self, Answer, Psk, ResumeSecret, Transcript};
use crate::framed::{FrameEncoder, FrameReader};
use crate::seal::{Opener, Sealer};
use crate::wire::phase::{ClientHandshake, Phase, ServerHandshake};
use crate::wire::{
    AUTH_BYTES, Decoder, ErrorCode, Message, Role, SessionParams, VmName, WireError, encode,
};

/// Room for the handshake frames (a `Hello` is at most 112 bytes, a `Proof` 104); the
/// buffer grows if a peer sends more.
const GREETING_BUFFER_BYTES: usize = 512;

/// Why the server side did not admit a client.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// A malformed frame, or one out of the handshake's order.
    #[error("malformed handshake")]
    Wire(#[from] WireError),
    /// The client's proof was wrong: it does not hold the key of the VM it named.
    #[error("authentication failed: wrong key for VM {vm}")]
    WrongKey {
        /// The VM it named.
        vm: VmName,
        /// Whether the server has a key (else the client has one it does not).
        keyed: bool,
    },
    /// The client gave up (sent `Error`).
    #[error("the client gave up")]
    GaveUp,
}

impl Rejection {
    /// The reason's kind, for counting rejections in a rate-limited log.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::Wire(_) => "malformed",
            Rejection::WrongKey { .. } => "wrong key",
            Rejection::GaveUp => "gave up",
        }
    }
}

/// What a step of the server's handshake came to.
#[derive(Debug)]
pub enum ServerStep {
    /// Waiting for more bytes (send `out` first).
    More,
    /// The client proved the key of the VM it named: the caller answers it.
    Admitted(Box<Greeted>),
    /// Not admitted; `out` holds the `Error` frame the client is owed, if any.
    Rejected(Rejection),
}

/// The server's half of one connection's handshake.
#[derive(Debug)]
pub struct ServerGreeting {
    phase: ServerHandshake,
    reader: FrameReader,
    hello: Option<(Role, SessionParams)>,
    server_nonce: [u8; AUTH_BYTES],
    /// Bytes to send the client, in order (the `Challenge`, or a refusal).
    pub out: Vec<u8>,
}

/// The server's handshake result: who the client is and what it proved.
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

impl Default for ServerGreeting {
    fn default() -> Self {
        ServerGreeting::new(auth::nonce())
    }
}

impl ServerGreeting {
    /// A connection just accepted; `server_nonce` goes into its `Challenge`.
    pub fn new(server_nonce: [u8; AUTH_BYTES]) -> Self {
        ServerGreeting {
            phase: ServerHandshake::AwaitHello,
            reader: FrameReader::with_capacity(Decoder::handshake(), GREETING_BUFFER_BYTES),
            hello: None,
            server_nonce,
            out: Vec::new(),
        }
    }

    /// Where the caller puts the bytes it reads.
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
    pub fn advance(&mut self, master: &Psk) -> ServerStep {
        loop {
            let (message, _) = match self.reader.next_buffered() {
                Ok(Some(frame)) => frame,
                Ok(None) => return ServerStep::More,
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
                    // The phase machine wants Hello first: it is here.
                    let Some((role, hello)) = self.hello else {
                        let e = WireError::Unexpected(message.kind());
                        return self.reject(ErrorCode::Protocol, Rejection::Wire(e));
                    };
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
                    return ServerStep::Admitted(Box::new(Greeted {
                        reader,
                        role,
                        hello,
                        key,
                        transcript,
                        resume,
                    }));
                }
                Message::Error { .. } => return ServerStep::Rejected(Rejection::GaveUp),
                other => {
                    let e = WireError::Unexpected(other.kind());
                    return self.reject(ErrorCode::Protocol, Rejection::Wire(e));
                }
            }
        }
    }

    /// Queues the `Error` frame a rejected client is owed (no detail an attacker could use:
    /// the code and the rule it broke).
    fn reject(&mut self, code: ErrorCode, why: Rejection) -> ServerStep {
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
        ServerStep::Rejected(why)
    }
}

impl Greeted {
    /// Whether the client proved `secret` (the resume secret of the session it names).
    pub fn proves(&self, secret: &ResumeSecret) -> bool {
        secret.verify(&self.transcript, &self.resume)
    }

    /// The resume secret of a session this (urgent) connection opens as `session_id`.
    pub fn new_secret(&self, session_id: u64) -> ResumeSecret {
        self.key.resume_secret(&self.transcript, session_id)
    }

    /// The server's answer as bytes: `AuthOk` (its MAC binds `answer`) and the `Welcome` or
    /// `Error` itself. For a welcome with a real key, the reader opens every later frame and
    /// the returned encoder seals them.
    pub fn answer(&mut self, answer: Answer, text: &str) -> (Vec<u8>, FrameEncoder) {
        let mut out = Vec::new();
        let ok = Message::AuthOk(self.key.server_mac(&self.transcript, &answer));
        encode(&ok, 0, &mut out);
        let message = match answer {
            Answer::Welcome(params) => Message::Welcome(params),
            Answer::Refuse(code) => Message::Error {
                code,
                text: text.to_owned(),
            },
        };
        encode(&message, 0, &mut out);
        let encoder = match (answer, self.key.is_keyed()) {
            (Answer::Welcome(_), true) => {
                let (sealer, opener) = self.key.channel_secrets(&self.transcript).server();
                self.reader.set_opener(opener);
                FrameEncoder::sealed(sealer)
            }
            _ => FrameEncoder::plain(),
        };
        (out, encoder)
    }
}

/// Why the client side's handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientFailure {
    /// The server sent a malformed frame, or one out of the handshake's order.
    #[error("pagesrv sent a malformed handshake")]
    Wire(#[from] WireError),
    /// The server refused (`trusted`: after proving the key, so the refusal is its own).
    #[error("pagesrv refused the session ({code:?}): {text}")]
    Refused {
        /// Its code.
        code: ErrorCode,
        /// Its text, made safe to log ([`crate::wire::printable`]).
        text: String,
        /// Whether the server proved the key and bound this refusal.
        trusted: bool,
    },
    /// The server did not prove the key.
    #[error("authentication with pagesrv failed: {0}")]
    Auth(&'static str),
}

/// What a step of the client's handshake came to.
#[derive(Debug)]
pub enum ClientStep {
    /// Waiting for more bytes (send `out` first).
    More,
    /// Welcomed, the server's proof checked.
    Welcomed(Box<Welcomed>),
    /// The handshake failed.
    Failed(ClientFailure),
}

/// The client's handshake result.
#[derive(Debug)]
pub struct Welcomed {
    /// What the server welcomed us with.
    pub params: SessionParams,
    /// What both MACs covered (a new session's secret derives from it).
    pub transcript: Transcript,
    /// Anything read past the handshake (with a real key: opens what the server sends).
    pub reader: FrameReader,
    /// Encodes (with a real key: seals) what the client sends.
    pub encoder: FrameEncoder,
}

/// The client's half of one connection's handshake.
#[derive(Debug)]
pub struct ClientGreeting {
    phase: ClientHandshake,
    reader: FrameReader,
    key: Psk,
    role: Role,
    hello: SessionParams,
    secret: Option<ResumeSecret>,
    client_nonce: [u8; AUTH_BYTES],
    transcript: Option<Transcript>,
    server_tag: Option<[u8; AUTH_BYTES]>,
    /// Bytes to send the server, in order (the `Hello`, then the `Proof`).
    pub out: Vec<u8>,
}

impl ClientGreeting {
    /// A handshake for a `role` connection asking for `hello`, with the VM's `key`
    /// ([`Psk::unkeyed`] without one), proving `secret` if the session was opened already.
    /// The `Hello` is queued in `out`.
    pub fn new(
        key: Psk,
        role: Role,
        hello: SessionParams,
        secret: Option<ResumeSecret>,
        client_nonce: [u8; AUTH_BYTES],
    ) -> Self {
        let mut out = Vec::new();
        encode(
            &Message::Hello {
                role,
                params: hello,
            },
            0,
            &mut out,
        );
        ClientGreeting {
            phase: ClientHandshake::AwaitServer,
            reader: FrameReader::with_capacity(Decoder::handshake(), GREETING_BUFFER_BYTES),
            key,
            role,
            hello,
            secret,
            client_nonce,
            transcript: None,
            server_tag: None,
            out,
        }
    }

    /// Where the caller puts the bytes it reads.
    pub fn reader(&mut self) -> &mut FrameReader {
        &mut self.reader
    }

    /// Decodes what is buffered: answers the `Challenge` with the `Proof`, checks the
    /// server's proof over its answer.
    pub fn advance(&mut self) -> ClientStep {
        loop {
            let (message, _) = match self.reader.next_buffered() {
                Ok(Some(frame)) => frame,
                Ok(None) => return ClientStep::More,
                Err(e) => return ClientStep::Failed(ClientFailure::Wire(e)),
            };
            if let Err(e) = self.phase.receive(message.kind()) {
                return ClientStep::Failed(ClientFailure::Wire(e));
            }
            match message {
                Message::Challenge(server_nonce) => {
                    let t = Transcript {
                        server_nonce,
                        client_nonce: self.client_nonce,
                        role: self.role,
                        hello: self.hello,
                    };
                    let proof = Message::Proof {
                        nonce: t.client_nonce,
                        mac: self.key.client_mac(&t),
                        resume: self
                            .secret
                            .as_ref()
                            .map_or([0; AUTH_BYTES], |secret| secret.prove(&t)),
                    };
                    encode(&proof, 0, &mut self.out);
                    self.transcript = Some(t);
                }
                Message::AuthOk(tag) => self.server_tag = Some(tag),
                Message::Error { code, text } => {
                    // Only a real key makes an answer the server's own: a public one proves
                    // nothing.
                    let trusted = self.key.is_keyed()
                        && matches!(
                            (&self.transcript, &self.server_tag),
                            (Some(t), Some(tag)) if self.key.verify_server(t, &Answer::Refuse(code), tag)
                        );
                    return ClientStep::Failed(ClientFailure::Refused {
                        code,
                        text: crate::wire::printable(&text),
                        trusted,
                    });
                }
                Message::Welcome(params) => return self.welcomed(params),
                other => {
                    let e = WireError::Unexpected(other.kind());
                    return ClientStep::Failed(ClientFailure::Wire(e));
                }
            }
        }
    }

    fn welcomed(&mut self, params: SessionParams) -> ClientStep {
        // The phase machine wants Challenge and AuthOk first: both are here.
        let (Some(t), Some(tag)) = (self.transcript, self.server_tag) else {
            return ClientStep::Failed(ClientFailure::Auth(
                "pagesrv welcomed us without its proof",
            ));
        };
        if !self.key.verify_server(&t, &Answer::Welcome(params), &tag) {
            return ClientStep::Failed(ClientFailure::Auth(if self.key.is_keyed() {
                "pagesrv proved a different key (or none)"
            } else {
                "pagesrv has a key: give the same --psk-file to faultd"
            }));
        }
        let mut reader = std::mem::replace(
            &mut self.reader,
            FrameReader::with_capacity(Decoder::handshake(), 0),
        );
        let encoder = if self.key.is_keyed() {
            let (sealer, opener): (Sealer, Opener) = self.key.channel_secrets(&t).client();
            reader.set_opener(opener);
            FrameEncoder::sealed(sealer)
        } else {
            FrameEncoder::plain()
        };
        ClientStep::Welcomed(Box::new(Welcomed {
            params,
            transcript: t,
            reader,
            encoder,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PROTOCOL_VERSION;

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

    /// Moves `bytes` into `reader` (what a socket would do).
    fn deliver(bytes: &mut Vec<u8>, reader: &mut FrameReader) {
        reader.fill(&mut bytes.as_slice()).unwrap();
        bytes.clear();
    }

    /// Runs both halves against each other in memory; the server answers an admitted
    /// client with `answer` (the session id it welcomes with, or a refusal).
    fn pipe(
        client_key: Psk,
        master: &Psk,
        params: SessionParams,
        secret: Option<ResumeSecret>,
        answer: impl FnOnce(&Greeted) -> Answer,
    ) -> (Result<Box<Welcomed>, ClientFailure>, Option<Box<Greeted>>) {
        let mut answer = Some(answer);
        let mut client =
            ClientGreeting::new(client_key, Role::Urgent, params, secret, auth::nonce());
        let mut server = ServerGreeting::default();
        let mut greeted = None;
        for _ in 0..4 {
            deliver(&mut client.out, server.reader());
            match server.advance(master) {
                ServerStep::More => {}
                ServerStep::Rejected(_) => {}
                ServerStep::Admitted(mut g) => {
                    let a = (answer.take().expect("one admission"))(&g);
                    let (bytes, _) = g.answer(a, "refused");
                    server.out.extend_from_slice(&bytes);
                    greeted = Some(g);
                }
            }
            deliver(&mut server.out, client.reader());
            match client.advance() {
                ClientStep::More => {}
                ClientStep::Welcomed(w) => return (Ok(w), greeted),
                ClientStep::Failed(f) => return (Err(f), greeted),
            }
        }
        panic!("the handshake did not end")
    }

    fn welcome(g: &Greeted, id: u64) -> Answer {
        Answer::Welcome(SessionParams {
            session_id: id,
            ..g.hello
        })
    }

    #[test]
    fn test_both_halves_agree_and_seal_with_the_same_keys() {
        let master = Psk::from_bytes(b"a fleet's master key, long enough");
        let key = master.for_vm(&VmName::new("a").unwrap());
        let (welcomed, greeted) = pipe(key, &master, hello("a", 0), None, |g| welcome(g, 42));
        let mut welcomed = welcomed.unwrap();
        let mut greeted = greeted.unwrap();
        assert_eq!(welcomed.params.session_id, 42);
        assert_eq!(
            welcomed.transcript.client_nonce,
            greeted.transcript.client_nonce
        );
        // The server's encoder for the same answer seals what the client's reader opens.
        let (_, mut server_tx) = greeted.answer(welcome(&greeted, 42), "");
        let mut wire = Vec::new();
        server_tx
            .write_frame(&mut wire, &Message::Heartbeat, &[])
            .unwrap();
        welcomed.reader.set_decoder(Decoder::session(4096, 16));
        let (m, _) = welcomed.reader.read_frame(&mut wire.as_slice()).unwrap();
        assert_eq!(m, Message::Heartbeat);
        assert!(welcomed.encoder.is_sealed());
        // Both derive the same session secret.
        let secret = greeted.new_secret(42);
        assert_eq!(
            secret,
            master
                .for_vm(&VmName::new("a").unwrap())
                .resume_secret(&welcomed.transcript, 42)
        );
    }

    #[test]
    fn test_a_resume_proves_the_secret_and_nothing_else_does() {
        let master = Psk::unkeyed();
        let key = master.for_vm(&VmName::default());
        let opened = Transcript {
            server_nonce: auth::nonce(),
            client_nonce: auth::nonce(),
            role: Role::Urgent,
            hello: hello("", 0),
        };
        let secret = key.resume_secret(&opened, 9);
        let (welcomed, greeted) = pipe(
            key.clone(),
            &master,
            hello("", 9),
            Some(secret.clone()),
            |g| {
                assert!(g.proves(&secret));
                welcome(g, 9)
            },
        );
        assert!(welcomed.is_ok());
        assert!(!greeted.unwrap().proves(&key.resume_secret(&opened, 10)));
        let (_, greeted) = pipe(key, &master, hello("", 9), None, |g| {
            assert!(!g.proves(&secret), "no proof, no resume");
            Answer::Refuse(ErrorCode::Busy)
        });
        assert!(greeted.is_some());
    }

    #[test]
    fn test_refusals_are_trusted_only_when_the_key_binds_them() {
        let master = Psk::from_bytes(b"a fleet's master key, long enough");
        let key = master.for_vm(&VmName::default());
        let (result, _) = pipe(key, &master, hello("", 0), None, |_| {
            Answer::Refuse(ErrorCode::UnknownVm)
        });
        assert!(matches!(
            result,
            Err(ClientFailure::Refused {
                code: ErrorCode::UnknownVm,
                trusted: true,
                ..
            })
        ));
        // Keyless: the same refusal proves nothing.
        let (result, _) = pipe(Psk::unkeyed(), &Psk::unkeyed(), hello("", 0), None, |_| {
            Answer::Refuse(ErrorCode::UnknownVm)
        });
        assert!(matches!(
            result,
            Err(ClientFailure::Refused { trusted: false, .. })
        ));
        // A wrong key never gets an answer bound to it.
        let other = Psk::from_bytes(b"another key, just as long as it");
        let (result, greeted) = pipe(other, &master, hello("", 0), None, |_| {
            unreachable!("never admitted")
        });
        assert!(greeted.is_none());
        assert!(matches!(
            result,
            Err(ClientFailure::Refused {
                code: ErrorCode::AuthFailed,
                trusted: false,
                ..
            })
        ));
    }

    #[test]
    fn test_a_server_that_does_not_prove_the_key_is_not_believed() {
        // An impostor with another key answers the client's Hello.
        let key = Psk::from_bytes(b"the real key, long enough for it");
        let impostor = Psk::from_bytes(b"an impostor's key, just as long!");
        let mut client = ClientGreeting::new(key, Role::Urgent, hello("", 0), None, auth::nonce());
        let mut server = ServerGreeting::default();
        deliver(&mut client.out, server.reader());
        assert!(matches!(server.advance(&impostor), ServerStep::More));
        deliver(&mut server.out, client.reader());
        assert!(matches!(client.advance(), ClientStep::More));
        deliver(&mut client.out, server.reader());
        // The impostor cannot check the proof either: it refuses, untrusted.
        assert!(matches!(server.advance(&impostor), ServerStep::Rejected(_)));
        let mut refusal = server.out.clone();
        deliver(&mut refusal, client.reader());
        assert!(matches!(
            client.advance(),
            ClientStep::Failed(ClientFailure::Refused { trusted: false, .. })
        ));
        // Or it skips the check and welcomes: its AuthOk does not verify.
        let key = Psk::from_bytes(b"the real key, long enough for it");
        let mut client = ClientGreeting::new(key, Role::Urgent, hello("", 0), None, auth::nonce());
        let mut fake = Vec::new();
        encode(&Message::Challenge([3; AUTH_BYTES]), 0, &mut fake);
        encode(&Message::AuthOk([4; AUTH_BYTES]), 0, &mut fake);
        encode(&Message::Welcome(hello("", 77)), 0, &mut fake);
        deliver(&mut fake, client.reader());
        assert!(matches!(
            client.advance(),
            ClientStep::Failed(ClientFailure::Auth(_))
        ));
    }

    #[test]
    fn test_a_dribbled_hello_waits_and_a_whole_one_is_challenged() {
        let sn = [7; AUTH_BYTES];
        let mut g = ServerGreeting::new(sn);
        let mut bytes = Vec::new();
        let params = hello("a", 5);
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
            assert!(matches!(g.advance(&master), ServerStep::More));
            assert!(
                !g.has_hello() && g.out.is_empty(),
                "nothing before the whole Hello"
            );
        }
        g.reader().fill(&mut &bytes[bytes.len() - 1..]).unwrap();
        assert!(matches!(g.advance(&master), ServerStep::More));
        assert!(g.has_hello());
        assert_eq!(g.named_session(), Some(5));
        let mut challenge = Vec::new();
        encode(&Message::Challenge(sn), 0, &mut challenge);
        assert_eq!(g.out, challenge);
    }

    #[test]
    fn test_frames_out_of_order_are_refused() {
        let master = Psk::unkeyed();
        let mut g = ServerGreeting::default();
        let mut bytes = Vec::new();
        let proof = Message::Proof {
            nonce: [0; AUTH_BYTES],
            mac: [0; AUTH_BYTES],
            resume: [0; AUTH_BYTES],
        };
        encode(&proof, 0, &mut bytes);
        deliver(&mut bytes, g.reader());
        assert!(matches!(
            g.advance(&master),
            ServerStep::Rejected(Rejection::Wire(_))
        ));
        let mut g = ServerGreeting::default();
        g.reader().fill(&mut [0xFFu8; 8].as_slice()).unwrap();
        assert!(matches!(
            g.advance(&master),
            ServerStep::Rejected(Rejection::Wire(_))
        ));
        // The client refuses a Welcome before the server proved anything.
        let mut c = ClientGreeting::new(
            Psk::unkeyed(),
            Role::Urgent,
            hello("", 0),
            None,
            auth::nonce(),
        );
        let mut early = Vec::new();
        encode(&Message::Welcome(hello("", 1)), 0, &mut early);
        deliver(&mut early, c.reader());
        assert!(matches!(
            c.advance(),
            ClientStep::Failed(ClientFailure::Wire(_))
        ));
    }
}
