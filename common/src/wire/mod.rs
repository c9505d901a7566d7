//! The pagesrv ⇄ faultd wire protocol: frame layout, typed messages and a sans-IO codec;
//! [`phase`] holds each side's conversation as a state machine.
//!
//! Every connection starts with a handshake and then carries frames:
//!
//! ```text
//!  faultd (destination)                         pagesrv (source)
//!  urgent conn ── Hello{role=Urgent, layout, session, image} ──►
//!              ◄── Challenge ── Proof ──► ◄── AuthOk   (crate::auth; with a key or, with
//!                                                       --insecure-no-key, a public one)
//!              ◄── Welcome{session_id, layout, image_id} ─   (or Error, then close)
//!  bulk conn   ── Hello{role=Bulk, session_id} ─►   (the same, its Proof proving the
//!              ◄── Welcome ─────────────────────    session's resume secret)
//!  urgent      ── DoneMap{first,count}+bitmap ──►   pages already here (after a reconnect)
//!              ── SkipMap{first,count}+bitmap ──►   pages removed before they arrived
//!              ── MapEnd ──────────────────────►   the push may start
//!              ── Request{first,count} ────────►   answered before any bulk work
//!              ◄── PageRun{first,count}+bytes ──   or ZeroRun{first,count} (no payload)
//!              ── Skip{first,count} ───────────►   removed by the VMM: never needed, not verified
//!  bulk        ◄── PageRun / ZeroRun … ─────────   every page not yet sent, in file order,
//!              ◄── BulkDone ────────────────────   pre-paging after each request
//!  extra bulk conns (faultd --streams N: Hello{role=Bulk, session_id, flag EXTRA_STREAM},
//!  opened once the session runs), once the push has begun on the first bulk connection:
//!  extra bulk  ◄── PageRun / ZeroRun … ◄── BulkDone   the same push, shared between them
//!  urgent      ── DigestQuery{chunk_pages} ────►   every page present: compare digests
//!              ◄── Digests{chunk_pages}+u64s ───   (skipped pages count as zero)
//!              ── Goodbye ─────────────────────►   verified; pagesrv closes, its job is done
//!           or ── Error{VerifyFailed|DestinationFailed} ► the source must keep the VM
//!  with the guest's free-page hints (Welcome flag FREE), first of all on the bulk connection:
//!  bulk        ◄── ZeroRun … ◄── Sync ───────────   the free pages; the destination asks for
//!              ── Synced ──►                        no page before this (a fault on one: zero)
//!  a destination with a base image (Hello flag BASE), before the push (and any round):
//!  bulk        ◄── PageHashes{first,count}+hashes  XXH3-128 of each page, seeded with the session id
//!              ── DoneMap{first,count}+bitmap ─►   (bulk) the pages its base holds: placed from it
//!              ◄── Sync ──── … ──── Synced ─────►   then only the pages it lacks are pushed
//!  precopy first (Welcome flag PRECOPY: the source VM still runs), before the push above:
//!  bulk        ◄── PageRun / ZeroRun … ─────────   a round: every page not sent yet
//!              ◄── Discard{first,count}+bitmap ─   drop these: written since they were sent
//!              ◄── Patch{page,1}+bitmap+pieces ─   (pages over 4 KiB) write these 4 KiB pieces,
//!                                                    written since it was sent, in place
//!              ◄── Sync ────────────────────────   ── Synced ──► (bulk) all of it is applied
//!              ◄── Switchover ──────────────────   the source is paused: the guest may resume
//!              ◄── Sync ───── … ───── Synced ──►   (after the switch's discards, which come
//!                                                    before Switchover) the push, extra streams
//!                                                    too, begins only once they are applied
//!  any conn, either way, after the handshake:
//!              ◄─ Heartbeat ─►                       when the connection was idle 200 ms;
//!                                                    silence for the link timeout = dead link
//! ```
//!
//! A session id in an urgent `Hello` asks to resume that session: if its `Proof` proves the
//! session's resume secret, pagesrv aborts the old session (a stale one on a link that went
//! silent) and serves the new connections in its place; without that proof it refuses and
//! changes nothing. Every bulk connection proves it too. `image_id` identifies the memory image pagesrv serves; faultd pins the first one it
//! sees and pagesrv refuses a `Hello` that names another. With a key, the server's `AuthOk`
//! MAC covers the client's `Hello` and the server's answer (`Welcome` or `Error`), see
//! [`crate::auth`].
//!
//! A frame is an 8-byte header followed by `body_len` bytes: a fixed little-endian body whose
//! size depends on the kind, then (for `PageRun`, `DoneMap`, `SkipMap`, `Digests` and
//! `Error`) a payload.
//!
//! ```text
//!  0      2      4              8
//!  ┌──────┬──────┬──────────────┬──────────────────┬───────────────┐
//!  │ kind │ 0000 │   body_len   │ fixed body (kind) │ payload ...   │
//!  └──────┴──────┴──────────────┴──────────────────┴───────────────┘
//! ```
//!
//! The decoder checks the header (known kind, zero reserved bits, `body_len` no larger than
//! [`MAX_BODY_BYTES`] and consistent with the kind) before the caller allocates or reads the
//! body, and checks page ranges against the session's page count. It never panics on input.

pub mod phase;

use thiserror::Error;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Identifies this protocol in every `Hello` and `Welcome` ("PGM1").
pub const MAGIC: u32 = 0x314D_4750;
/// The piece a `Patch` carries: the source's dirty-log granularity, whatever the page size.
pub const PATCH_BYTES: u64 = 4096;
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 4;
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 8;
/// Largest page payload carried by one frame.
pub const MAX_PAYLOAD_BYTES: usize = 4 << 20;
/// Most bytes one `Request` may ask for (a destination asks for the pages it faults on;
/// pre-paging is the source's): a larger one is refused, so no key holder can make the
/// source read and seal a whole guest on its urgent thread at once.
pub const MAX_REQUEST_BYTES: u64 = 8 << 20;
/// Longest error text carried by an `Error` frame.
pub const MAX_ERROR_TEXT_BYTES: usize = 1024;
/// Largest `body_len` any frame may declare.
pub const MAX_BODY_BYTES: usize = MAX_PAYLOAD_BYTES + RANGE_BODY_LEN;

/// Bytes of a `Request`, `ZeroRun`, `Skip` frame, and of a `PageRun` before its pages.
pub const RANGE_FRAME_BYTES: usize = HEADER_LEN + RANGE_BODY_LEN;

/// Bytes of a nonce or MAC in the authentication frames.
pub const AUTH_BYTES: usize = 32;

const HELLO_BODY_LEN: usize = size_of::<HelloBody>();
const RANGE_BODY_LEN: usize = size_of::<RangeBody>();
const ERROR_BODY_LEN: usize = size_of::<ErrorBody>();

/// Errors found while decoding a frame. Each names the field that was wrong.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    /// The frame kind is not one this version knows.
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    /// A reserved field was not zero.
    #[error("reserved field of a {kind:?} frame is not zero")]
    ReservedNotZero {
        /// The frame kind.
        kind: Kind,
    },
    /// `body_len` is larger than [`MAX_BODY_BYTES`].
    #[error("frame body of {body_len} bytes exceeds the maximum of {MAX_BODY_BYTES}")]
    TooLarge {
        /// Declared body length.
        body_len: u32,
    },
    /// `body_len` does not fit the kind's fixed body.
    #[error("{kind:?} frame has a body of {body_len} bytes, expected {expected}")]
    BadLength {
        /// The frame kind.
        kind: Kind,
        /// Declared body length.
        body_len: u32,
        /// What the kind requires.
        expected: String,
    },
    /// The handshake magic is wrong: the peer does not speak this protocol.
    #[error("bad magic {0:#x}: the peer does not speak the page migration protocol")]
    BadMagic(u32),
    /// A role byte that is neither urgent nor bulk.
    #[error("unknown connection role {0}")]
    UnknownRole(u8),
    /// An error code this version does not know.
    #[error("unknown error code {0}")]
    UnknownErrorCode(u32),
    /// A page range that is empty or leaves the guest's pages.
    #[error("page range {first}+{count} is outside the {total_pages} pages of this session")]
    RangeOutOfBounds {
        /// First page of the range.
        first: u64,
        /// Page count of the range.
        count: u64,
        /// Pages in the session.
        total_pages: u64,
    },
    /// An error text that is not UTF-8.
    #[error("error text is not UTF-8")]
    BadErrorText,
    /// A VM name with a byte outside the allowed set ([`VmName`]).
    #[error("malformed VM name in the handshake")]
    BadVmName,
    /// A frame that is not allowed at this point of the conversation.
    #[error("unexpected {0:?} frame")]
    Unexpected(Kind),
    /// A sealed frame that failed authentication (the channel's seal, `crate::seal`).
    #[error(
        "frame {counter} failed authentication (tampered, replayed, reordered or from another connection)"
    )]
    Unauthentic {
        /// The frame's position in its direction.
        counter: u64,
    },
    /// [`Decoder::decode`] was given a sealed stream (open frames with a `FrameReader`).
    #[error("a sealed stream cannot be decoded without opening its frames")]
    Sealed,
    /// A frame that does not belong in the connection's current phase ([`phase`]).
    #[error("unexpected {kind:?} frame while {phase}")]
    OutOfPhase {
        /// The frame kind.
        kind: Kind,
        /// The phase the connection was in.
        phase: &'static str,
    },
}

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Client → server: open a connection.
    Hello = 1,
    /// Server → client: accept a connection.
    Welcome = 2,
    /// Client → server (urgent): send these pages now.
    Request = 3,
    /// Server → client: pages with their bytes.
    PageRun = 4,
    /// Server → client: pages that are all zero, no payload.
    ZeroRun = 5,
    /// Client → server: these pages are no longer needed.
    Skip = 6,
    /// Server → client (bulk): every page has been pushed.
    BulkDone = 7,
    /// Client → server (urgent): migration complete.
    Goodbye = 8,
    /// Either way: a fatal error, then close.
    Error = 9,
    /// Client → server (urgent): a bitmap of pages the destination already holds.
    DoneMap = 10,
    /// Client → server (urgent): the done map is complete; the push may start.
    MapEnd = 11,
    /// Server → client (handshake): prove you hold the key for this nonce.
    Challenge = 12,
    /// Client → server (handshake): the client's nonce and its MAC.
    Proof = 13,
    /// Server → client (handshake): the server's MAC; then `Welcome`.
    AuthOk = 14,
    /// Client → server (urgent): send the digest of every chunk of this many pages.
    DigestQuery = 15,
    /// Server → client (urgent): one u64 digest per chunk.
    Digests = 16,
    /// Either way, any connection: nothing else was sent for a while; the sender is alive.
    Heartbeat = 17,
    /// Client → server (urgent): a bitmap of pages the destination will never need (removed
    /// by the VMM before they arrived); they are not sent and not verified.
    SkipMap = 18,
    /// Server → client (bulk, precopy): a bitmap of pages written since they were sent:
    /// drop them (they are sent again, or requested).
    Discard = 19,
    /// Server → client (bulk): the source is paused and precopy is over; the destination may
    /// resume the guest. Postcopy follows on the same connections.
    Switchover = 20,
    /// Server → client (bulk, precopy): answer `Synced` once every frame before this one is
    /// applied.
    Sync = 21,
    /// Client → server (bulk): every frame before the `Sync` is applied.
    Synced = 22,
    /// Server → client (bulk, before the push, to a destination with a base image): a
    /// [`PAGE_HASH_BYTES`]-byte hash of each page of a range (all zero: not offered, e.g. a
    /// zero page); the destination answers with a `DoneMap` of the pages its base holds, on
    /// the bulk connection.
    PageHashes = 23,
    /// Server → client (bulk, precopy, huge pages): the 4 KiB pieces of one page that the
    /// guest wrote since it was sent (payload: a bitmap of the page's [`PATCH_BYTES`] pieces,
    /// then the set pieces in order); the destination writes them in place.
    Patch = 24,
}

impl TryFrom<u16> for Kind {
    type Error = WireError;

    fn try_from(raw: u16) -> Result<Self, WireError> {
        Ok(match raw {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Request,
            4 => Kind::PageRun,
            5 => Kind::ZeroRun,
            6 => Kind::Skip,
            7 => Kind::BulkDone,
            8 => Kind::Goodbye,
            9 => Kind::Error,
            10 => Kind::DoneMap,
            11 => Kind::MapEnd,
            12 => Kind::Challenge,
            13 => Kind::Proof,
            14 => Kind::AuthOk,
            15 => Kind::DigestQuery,
            16 => Kind::Digests,
            17 => Kind::Heartbeat,
            18 => Kind::SkipMap,
            19 => Kind::Discard,
            20 => Kind::Switchover,
            21 => Kind::Sync,
            22 => Kind::Synced,
            23 => Kind::PageHashes,
            24 => Kind::Patch,
            other => return Err(WireError::UnknownKind(other)),
        })
    }
}

/// Which of a session's two connections this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Requests in, requested pages out; served first.
    Urgent = 1,
    /// Background push.
    Bulk = 2,
}

impl TryFrom<u8> for Role {
    type Error = WireError;

    fn try_from(raw: u8) -> Result<Self, WireError> {
        match raw {
            1 => Ok(Role::Urgent),
            2 => Ok(Role::Bulk),
            other => Err(WireError::UnknownRole(other)),
        }
    }
}

/// Why a peer gave up on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// The peer speaks another protocol version.
    VersionMismatch = 1,
    /// Page size or guest size differ between the two sides.
    LayoutMismatch = 2,
    /// A malformed or unexpected frame.
    Protocol = 3,
    /// The bulk connection named a session the server does not have.
    UnknownSession = 4,
    /// The server is already serving another destination.
    Busy = 5,
    /// Something failed on the sender's side.
    Internal = 6,
    /// The peer failed authentication (or does not authenticate).
    AuthFailed = 7,
    /// The source serves another memory image than the one this session started from.
    ImageMismatch = 8,
    /// The destination's pages differ from the source's (digest mismatch): keep the source.
    VerifyFailed = 9,
    /// The destination failed (its VMM went away, a placement failed): keep the source.
    DestinationFailed = 10,
    /// The source serves no VM of the name the destination asked for (or the destination
    /// named none and the source serves several).
    UnknownVm = 11,
}

impl TryFrom<u32> for ErrorCode {
    type Error = WireError;

    fn try_from(raw: u32) -> Result<Self, WireError> {
        Ok(match raw {
            1 => ErrorCode::VersionMismatch,
            2 => ErrorCode::LayoutMismatch,
            3 => ErrorCode::Protocol,
            4 => ErrorCode::UnknownSession,
            5 => ErrorCode::Busy,
            6 => ErrorCode::Internal,
            7 => ErrorCode::AuthFailed,
            8 => ErrorCode::ImageMismatch,
            9 => ErrorCode::VerifyFailed,
            10 => ErrorCode::DestinationFailed,
            11 => ErrorCode::UnknownVm,
            other => return Err(WireError::UnknownErrorCode(other)),
        })
    }
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy)]
#[repr(C)]
struct RawHeader {
    kind: U16,
    reserved: U16,
    body_len: U32,
}
const _: () = assert!(size_of::<RawHeader>() == HEADER_LEN);

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy)]
#[repr(C)]
struct HelloBody {
    magic: U32,
    version: U16,
    /// Role for `Hello`; zero for `Welcome`.
    role: u8,
    reserved0: u8,
    page_size: U32,
    /// [`FLAG_PRECOPY`] in a `Welcome`; zero in a `Hello`.
    flags: U32,
    total_pages: U64,
    session_id: U64,
    image_id: U64,
}
const _: () = assert!(size_of::<HelloBody>() == 40);

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy)]
#[repr(C)]
struct RangeBody {
    first_page: U64,
    count: U64,
}
const _: () = assert!(size_of::<RangeBody>() == 16);

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy)]
#[repr(C)]
struct ErrorBody {
    code: U32,
    reserved: U32,
}
const _: () = assert!(size_of::<ErrorBody>() == 8);

/// A checked frame header: the kind is known and `body_len` fits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The frame kind.
    pub kind: Kind,
    /// Bytes of the (plaintext) body.
    pub body_len: usize,
    /// Bytes that follow the header on the wire: the body, and its tag when sealed.
    pub wire_len: usize,
}

/// The parameters both sides must agree on, carried by `Hello` and `Welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionParams {
    /// Protocol version of the sender.
    pub version: u16,
    /// Page size in bytes.
    pub page_size: u32,
    /// Guest RAM size in pages.
    pub total_pages: u64,
    /// The session this connection belongs to. In an urgent `Hello`: 0 for a new session,
    /// else the session to resume (replacing it if it still runs).
    pub session_id: u64,
    /// The memory image: in `Welcome`, the one served; in `Hello`, the one the destination
    /// pinned (0 before its first `Welcome`).
    pub image_id: u64,
    /// In `Welcome`: [`FLAG_PRECOPY`], [`FLAG_FREE`], [`FLAG_PROVEN`]; in `Hello`: [`FLAG_RESUMED`],
    /// [`FLAG_BASE`], [`FLAG_EXTRA_STREAM`], [`FLAG_SHARED_RAM`].
    pub flags: u32,
    /// The VM: in `Hello`, the one the destination asks for (empty: the only one the source
    /// serves); in `Welcome`, the one served. On the wire, the bytes after the fixed body.
    pub vm: VmName,
}

/// Longest VM name, in bytes.
pub const MAX_VM_NAME_BYTES: usize = 64;

/// A VM's name in `Hello` and `Welcome`: 0 to [`MAX_VM_NAME_BYTES`] bytes of ASCII letters,
/// digits, `.`, `_` and `-`, not starting with `.` or `-` (so a name is also a safe file
/// name and metric label). Empty means "the only VM the source serves".
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VmName {
    len: u8,
    bytes: [u8; MAX_VM_NAME_BYTES],
}

impl Default for VmName {
    fn default() -> Self {
        VmName {
            len: 0,
            bytes: [0; MAX_VM_NAME_BYTES],
        }
    }
}

impl VmName {
    /// Checks and wraps a name.
    ///
    /// # Errors
    /// A name that is too long or has a character outside the allowed set (the text says
    /// which).
    pub fn new(name: &str) -> Result<Self, String> {
        if name.len() > MAX_VM_NAME_BYTES {
            return Err(format!(
                "VM name {name:?} is longer than {MAX_VM_NAME_BYTES} bytes"
            ));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "VM name {name:?} has {bad:?}: use letters, digits, '.', '_' and '-'"
            ));
        }
        if name.starts_with(['.', '-']) {
            return Err(format!("VM name {name:?} starts with {:?}", &name[..1]));
        }
        let mut out = VmName::default();
        out.bytes[..name.len()].copy_from_slice(name.as_bytes());
        out.len = name.len() as u8;
        Ok(out)
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        // Only `new` fills the bytes, with checked ASCII.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }

    /// Whether no VM is named.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Display for VmName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for VmName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl std::str::FromStr for VmName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        VmName::new(s)
    }
}

impl SessionParams {
    /// Whether the destination must wait for `Switchover` (a `Welcome` flag).
    pub fn precopy(&self) -> bool {
        self.welcome_flags().precopy
    }

    /// Whether free pages come first on the bulk connection (a `Welcome` flag).
    pub fn free_first(&self) -> bool {
        self.welcome_flags().free_first
    }

    /// Whether the connection proved the named session's resume secret (a `Welcome` flag).
    pub fn proven(&self) -> bool {
        self.welcome_flags().proven
    }

    /// Whether the destination's guest runs already (a `Hello` flag).
    pub fn resumed(&self) -> bool {
        self.hello_flags().resumed
    }

    /// Whether the destination holds a base image (a `Hello` flag).
    pub fn has_base(&self) -> bool {
        self.hello_flags().base
    }

    /// Whether this bulk connection is an extra stream of a running session (a `Hello`
    /// flag).
    pub fn extra_stream(&self) -> bool {
        self.hello_flags().extra_stream
    }

    /// Whether the destination shares its guest RAM with other restores of the image on its
    /// host (a `Hello` flag).
    pub fn shares_ram(&self) -> bool {
        self.hello_flags().shared_ram
    }

    /// The flags read as a `Hello`'s.
    pub fn hello_flags(&self) -> HelloFlags {
        HelloFlags::from_bits(self.flags)
    }

    /// The flags read as a `Welcome`'s.
    pub fn welcome_flags(&self) -> WelcomeFlags {
        WelcomeFlags::from_bits(self.flags)
    }
}

/// What a destination says of itself in its `Hello` (the decoder refuses other bits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HelloFlags {
    /// [`FLAG_RESUMED`]: its guest runs already.
    pub resumed: bool,
    /// [`FLAG_BASE`]: it holds a base image.
    pub base: bool,
    /// [`FLAG_EXTRA_STREAM`]: an extra bulk connection of a running session.
    pub extra_stream: bool,
    /// [`FLAG_SHARED_RAM`]: its guest RAM is shared with other restores on its host.
    pub shared_ram: bool,
}

impl HelloFlags {
    /// Every bit a `Hello` may carry.
    pub const KNOWN: u32 = FLAG_RESUMED | FLAG_BASE | FLAG_EXTRA_STREAM | FLAG_SHARED_RAM;

    /// The bits on the wire.
    pub fn bits(self) -> u32 {
        bit(self.resumed, FLAG_RESUMED)
            | bit(self.base, FLAG_BASE)
            | bit(self.extra_stream, FLAG_EXTRA_STREAM)
            | bit(self.shared_ram, FLAG_SHARED_RAM)
    }

    /// From the wire's bits (unknown ones ignored: the decoder refused them).
    pub fn from_bits(bits: u32) -> Self {
        HelloFlags {
            resumed: bits & FLAG_RESUMED != 0,
            base: bits & FLAG_BASE != 0,
            extra_stream: bits & FLAG_EXTRA_STREAM != 0,
            shared_ram: bits & FLAG_SHARED_RAM != 0,
        }
    }
}

/// What a source tells a destination in its `Welcome` (the decoder refuses other bits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WelcomeFlags {
    /// [`FLAG_PRECOPY`]: wait for `Switchover` on the bulk connection.
    pub precopy: bool,
    /// [`FLAG_FREE`]: the free pages come first, closed by a `Sync`.
    pub free_first: bool,
    /// [`FLAG_PROVEN`]: the session named kept its resume secret.
    pub proven: bool,
}

impl WelcomeFlags {
    /// Every bit a `Welcome` may carry.
    pub const KNOWN: u32 = FLAG_PRECOPY | FLAG_FREE | FLAG_PROVEN;

    /// The bits on the wire.
    pub fn bits(self) -> u32 {
        bit(self.precopy, FLAG_PRECOPY)
            | bit(self.free_first, FLAG_FREE)
            | bit(self.proven, FLAG_PROVEN)
    }

    /// From the wire's bits (unknown ones ignored: the decoder refused them).
    pub fn from_bits(bits: u32) -> Self {
        WelcomeFlags {
            precopy: bits & FLAG_PRECOPY != 0,
            free_first: bits & FLAG_FREE != 0,
            proven: bits & FLAG_PROVEN != 0,
        }
    }
}

fn bit(set: bool, flag: u32) -> u32 {
    if set { flag } else { 0 }
}

/// `Welcome` flag: the destination must wait for `Switchover` on the bulk connection before
/// its guest resumes: precopy rounds (with `Discard` of pages written since they were sent)
/// come first, or, if the source switched already, the discards this destination missed.
pub const FLAG_PRECOPY: u32 = 1;
/// `Hello` flag: the destination's guest runs already; nothing it holds may be dropped.
pub const FLAG_RESUMED: u32 = 2;
/// `Hello` flag: the destination holds a base image (an older copy of this VM, or its
/// template): hash pages first, send only those it does not hold.
pub const FLAG_BASE: u32 = 4;
/// `Hello` flag (bulk): another bulk connection of a running session (`faultd --streams`):
/// it carries part of the background push and nothing else.
pub const FLAG_EXTRA_STREAM: u32 = 16;
/// `Hello` flag (urgent): the destination's guest RAM is a file shared with other restores
/// of the image on its host (`faultd --shared-ram`): it takes over, and skips, pages they
/// placed; a source serving a template starts each such restore's push at a different page.
pub const FLAG_SHARED_RAM: u32 = 64;
/// Most bulk connections of one session.
pub const MAX_STREAMS: u32 = 8;
/// `Welcome` flag: the guest's free pages come first on the bulk connection, as zero ranges
/// closed by a `Sync`; the destination asks for no page before that `Sync` (a fault on a
/// free page is then a local zero fill, never a request).
pub const FLAG_FREE: u32 = 8;
/// `Welcome` flag: the urgent connection proved the resume secret of the session it named
/// ([`crate::auth`]): the session keeps its secret. Without it, the session (new, or adopted
/// by a source that does not know it) takes the secret of this connection's handshake.
pub const FLAG_PROVEN: u32 = 32;
/// Bytes of a page hash in `PageHashes`: XXH3-128 seeded with the session id.
pub use crate::digest::PAGE_HASH_BYTES;

/// A peer's text (an `Error` frame's) made safe to log: control characters (newlines
/// included) escaped, so it cannot forge log lines or drive a terminal.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A contiguous range of page indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    /// First page index.
    pub first: u64,
    /// Number of pages (at least one).
    pub count: u64,
}

impl PageRange {
    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.first + self.count
    }
}

/// A decoded message. Payloads (`PageRun`, `DoneMap`, `Digests`) are returned beside the
/// message, not inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Open a connection with the given role.
    Hello {
        /// Urgent or bulk.
        role: Role,
        /// What the client expects.
        params: SessionParams,
    },
    /// The server's parameters; the client checks them against its own.
    Welcome(SessionParams),
    /// Send these pages now.
    Request(PageRange),
    /// These pages follow as payload (`count * page_size` bytes).
    PageRun(PageRange),
    /// These pages are all zero.
    ZeroRun(PageRange),
    /// The destination no longer needs these pages.
    Skip(PageRange),
    /// Every page has been pushed on the bulk connection.
    BulkDone,
    /// The migration is complete.
    Goodbye,
    /// A fatal error; the sender closes the connection after it.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// Human-readable detail.
        text: String,
    },
    /// A bitmap (payload, `ceil(count / 8)` bytes, bit `i` = page `first + i`) of pages the
    /// destination holds.
    DoneMap(PageRange),
    /// The done map is complete.
    MapEnd,
    /// The server's nonce.
    Challenge([u8; AUTH_BYTES]),
    /// The client's nonce, its MAC over both nonces and the session parameters, and its
    /// proof of the session's resume secret ([`crate::auth`]).
    Proof {
        /// Client nonce.
        nonce: [u8; AUTH_BYTES],
        /// HMAC proving the client holds the key.
        mac: [u8; AUTH_BYTES],
        /// HMAC proving the client opened the session it names (all zero on a session's
        /// first connection).
        resume: [u8; AUTH_BYTES],
    },
    /// The server's MAC proving it holds the key.
    AuthOk([u8; AUTH_BYTES]),
    /// Asks for per-chunk digests.
    DigestQuery {
        /// Pages per chunk.
        chunk_pages: u64,
    },
    /// Per-chunk digests (payload: one little-endian u64 per chunk).
    Digests {
        /// Pages per chunk.
        chunk_pages: u64,
    },
    /// The sender is alive (sent on an idle connection).
    Heartbeat,
    /// A bitmap (payload as for `DoneMap`) of pages the destination will never need.
    SkipMap(PageRange),
    /// A bitmap (payload as for `DoneMap`) of pages to drop: written since they were sent.
    Discard(PageRange),
    /// Precopy is over: the source is paused.
    Switchover,
    /// Answer `Synced` once everything before is applied.
    Sync,
    /// Everything before the `Sync` is applied.
    Synced,
    /// Hashes of the pages of a range (payload: [`PAGE_HASH_BYTES`] per page).
    PageHashes(PageRange),
    /// Pieces of one page (`count` 1) written since it was sent (payload: the bitmap of its
    /// [`PATCH_BYTES`] pieces, then the set pieces).
    Patch(PageRange),
}

impl Message {
    /// The frame kind that carries this message.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello { .. } => Kind::Hello,
            Message::Welcome(_) => Kind::Welcome,
            Message::Request(_) => Kind::Request,
            Message::PageRun(_) => Kind::PageRun,
            Message::ZeroRun(_) => Kind::ZeroRun,
            Message::Skip(_) => Kind::Skip,
            Message::BulkDone => Kind::BulkDone,
            Message::Goodbye => Kind::Goodbye,
            Message::Error { .. } => Kind::Error,
            Message::DoneMap(_) => Kind::DoneMap,
            Message::MapEnd => Kind::MapEnd,
            Message::Challenge(_) => Kind::Challenge,
            Message::Proof { .. } => Kind::Proof,
            Message::AuthOk(_) => Kind::AuthOk,
            Message::DigestQuery { .. } => Kind::DigestQuery,
            Message::Digests { .. } => Kind::Digests,
            Message::Heartbeat => Kind::Heartbeat,
            Message::SkipMap(_) => Kind::SkipMap,
            Message::Discard(_) => Kind::Discard,
            Message::Switchover => Kind::Switchover,
            Message::Sync => Kind::Sync,
            Message::Synced => Kind::Synced,
            Message::PageHashes(_) => Kind::PageHashes,
            Message::Patch(_) => Kind::Patch,
        }
    }
}

/// Decodes frames for one connection. Before the handshake completes `page_size` and
/// `total_pages` are zero and only `Hello`, `Welcome` and `Error` are accepted.
#[derive(Debug, Clone, Copy)]
pub struct Decoder {
    page_size: u64,
    total_pages: u64,
    /// Bytes of authentication tag after every body (0: a plain stream).
    tag_bytes: usize,
}

/// Result of [`Decoder::decode`] on a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// More bytes are needed; at least this many in total.
    Incomplete {
        /// Total bytes the buffer must hold before decoding can progress.
        need_bytes: usize,
    },
    /// A whole frame.
    Frame {
        /// The message.
        message: Message,
        /// Page bytes of a `PageRun` (empty otherwise).
        payload: &'a [u8],
        /// Bytes of the buffer this frame used.
        consumed: usize,
    },
}

impl Decoder {
    /// A decoder for the handshake: only `Hello`, `Welcome` and `Error` are accepted.
    pub fn handshake() -> Self {
        Decoder {
            page_size: 0,
            total_pages: 0,
            tag_bytes: 0,
        }
    }

    /// A decoder for an established session.
    pub fn session(page_size: u64, total_pages: u64) -> Self {
        Decoder {
            page_size,
            total_pages,
            tag_bytes: 0,
        }
    }

    /// This decoder for a sealed stream: every body is followed by a `tag_bytes` tag, which
    /// `body_len` counts ([`crate::seal`]).
    pub fn sealed(self, tag_bytes: usize) -> Self {
        Decoder { tag_bytes, ..self }
    }

    /// Checks a frame header.
    ///
    /// # Errors
    /// Unknown kind, non-zero reserved bits, or a `body_len` that is too large or does not
    /// fit the kind.
    pub fn decode_header(&self, bytes: &[u8; HEADER_LEN]) -> Result<FrameHeader, WireError> {
        let raw = RawHeader::read_from_bytes(bytes).expect("HEADER_LEN is the header size");
        let kind = Kind::try_from(raw.kind.get())?;
        if raw.reserved.get() != 0 {
            return Err(WireError::ReservedNotZero { kind });
        }
        let body_len = raw.body_len.get();
        if body_len as usize > MAX_BODY_BYTES + self.tag_bytes {
            return Err(WireError::TooLarge { body_len });
        }
        let wire_len = body_len as usize;
        let Some(len) = wire_len.checked_sub(self.tag_bytes) else {
            return Err(WireError::BadLength {
                kind,
                body_len,
                expected: format!("at least the {}-byte tag", self.tag_bytes),
            });
        };
        let bad = |expected: String| WireError::BadLength {
            kind,
            body_len,
            expected,
        };
        match kind {
            Kind::Hello | Kind::Welcome
                if !(HELLO_BODY_LEN..=HELLO_BODY_LEN + MAX_VM_NAME_BYTES).contains(&len) =>
            {
                return Err(bad(format!(
                    "{HELLO_BODY_LEN}..={}",
                    HELLO_BODY_LEN + MAX_VM_NAME_BYTES
                )));
            }
            Kind::Request | Kind::ZeroRun | Kind::Skip if len != RANGE_BODY_LEN => {
                return Err(bad(RANGE_BODY_LEN.to_string()));
            }
            Kind::PageRun
            | Kind::DoneMap
            | Kind::SkipMap
            | Kind::Discard
            | Kind::PageHashes
            | Kind::Patch
                if len <= RANGE_BODY_LEN =>
            {
                return Err(bad(format!("more than {RANGE_BODY_LEN}")));
            }
            Kind::BulkDone
            | Kind::Goodbye
            | Kind::MapEnd
            | Kind::Heartbeat
            | Kind::Switchover
            | Kind::Sync
            | Kind::Synced
                if len != 0 =>
            {
                return Err(bad("0".into()));
            }
            Kind::Challenge | Kind::AuthOk if len != AUTH_BYTES => {
                return Err(bad(AUTH_BYTES.to_string()));
            }
            Kind::Proof if len != 3 * AUTH_BYTES => return Err(bad((3 * AUTH_BYTES).to_string())),
            Kind::DigestQuery if len != 8 => return Err(bad("8".into())),
            Kind::Digests if len < 8 => return Err(bad("at least 8".into())),
            Kind::Error
                if !(ERROR_BODY_LEN..=ERROR_BODY_LEN + MAX_ERROR_TEXT_BYTES).contains(&len) =>
            {
                return Err(bad(format!(
                    "{ERROR_BODY_LEN}..={}",
                    ERROR_BODY_LEN + MAX_ERROR_TEXT_BYTES
                )));
            }
            _ => {}
        }
        let in_session = self.page_size != 0;
        let handshake_kind = matches!(
            kind,
            Kind::Hello
                | Kind::Welcome
                | Kind::Error
                | Kind::Challenge
                | Kind::Proof
                | Kind::AuthOk
        );
        if in_session == handshake_kind && kind != Kind::Error {
            return Err(WireError::Unexpected(kind));
        }
        Ok(FrameHeader {
            kind,
            body_len: len,
            wire_len,
        })
    }

    /// Decodes a frame body whose header was checked by [`Decoder::decode_header`].
    /// Returns the message and, for `PageRun`, its page bytes.
    ///
    /// # Errors
    /// Any field that is out of range, reserved bits that are set, or a payload whose size is
    /// not `count * page_size`.
    pub fn decode_body<'a>(
        &self,
        header: FrameHeader,
        body: &'a [u8],
    ) -> Result<(Message, &'a [u8]), WireError> {
        let kind = header.kind;
        if body.len() != header.body_len {
            return Err(WireError::BadLength {
                kind,
                body_len: body.len() as u32,
                expected: header.body_len.to_string(),
            });
        }
        let message = match kind {
            Kind::Hello | Kind::Welcome => {
                let (raw, name) =
                    HelloBody::read_from_prefix(body).map_err(|_| self.short(header))?;
                if raw.magic.get() != MAGIC {
                    return Err(WireError::BadMagic(raw.magic.get()));
                }
                let vm = std::str::from_utf8(name)
                    .map_err(|e| e.to_string())
                    .and_then(VmName::new)
                    .map_err(|_| WireError::BadVmName)?;
                let known_flags = if kind == Kind::Welcome {
                    WelcomeFlags::KNOWN
                } else {
                    HelloFlags::KNOWN
                };
                if raw.reserved0 != 0 || raw.flags.get() & !known_flags != 0 {
                    return Err(WireError::ReservedNotZero { kind });
                }
                let params = SessionParams {
                    version: raw.version.get(),
                    page_size: raw.page_size.get(),
                    total_pages: raw.total_pages.get(),
                    session_id: raw.session_id.get(),
                    image_id: raw.image_id.get(),
                    flags: raw.flags.get(),
                    vm,
                };
                if kind == Kind::Hello {
                    Message::Hello {
                        role: Role::try_from(raw.role)?,
                        params,
                    }
                } else if raw.role != 0 {
                    return Err(WireError::ReservedNotZero { kind });
                } else {
                    Message::Welcome(params)
                }
            }
            Kind::Request | Kind::ZeroRun | Kind::Skip | Kind::PageRun => {
                let (raw, payload) =
                    RangeBody::read_from_prefix(body).map_err(|_| self.short(header))?;
                let range = self.check_range(raw.first_page.get(), raw.count.get())?;
                match kind {
                    Kind::Request => Message::Request(range),
                    Kind::ZeroRun => Message::ZeroRun(range),
                    Kind::Skip => Message::Skip(range),
                    _ => {
                        let expected = range.count.checked_mul(self.page_size);
                        if expected != Some(payload.len() as u64) {
                            return Err(WireError::BadLength {
                                kind,
                                body_len: header.body_len as u32,
                                expected: format!(
                                    "{RANGE_BODY_LEN} + {} pages of {} bytes",
                                    range.count, self.page_size
                                ),
                            });
                        }
                        return Ok((Message::PageRun(range), payload));
                    }
                }
            }
            Kind::DoneMap | Kind::SkipMap | Kind::Discard => {
                let (raw, payload) =
                    RangeBody::read_from_prefix(body).map_err(|_| self.short(header))?;
                let range = self.check_range(raw.first_page.get(), raw.count.get())?;
                if range.count.div_ceil(8) != payload.len() as u64 {
                    return Err(WireError::BadLength {
                        kind,
                        body_len: header.body_len as u32,
                        expected: format!(
                            "{RANGE_BODY_LEN} + {} bitmap bytes",
                            range.count.div_ceil(8)
                        ),
                    });
                }
                let message = match kind {
                    Kind::DoneMap => Message::DoneMap(range),
                    Kind::SkipMap => Message::SkipMap(range),
                    _ => Message::Discard(range),
                };
                return Ok((message, payload));
            }
            Kind::PageHashes => {
                let (raw, payload) =
                    RangeBody::read_from_prefix(body).map_err(|_| self.short(header))?;
                let range = self.check_range(raw.first_page.get(), raw.count.get())?;
                if range.count.checked_mul(PAGE_HASH_BYTES as u64) != Some(payload.len() as u64) {
                    return Err(WireError::BadLength {
                        kind,
                        body_len: header.body_len as u32,
                        expected: format!(
                            "{RANGE_BODY_LEN} + {} hashes of {PAGE_HASH_BYTES} bytes",
                            range.count
                        ),
                    });
                }
                return Ok((Message::PageHashes(range), payload));
            }
            Kind::Patch => {
                let (raw, payload) =
                    RangeBody::read_from_prefix(body).map_err(|_| self.short(header))?;
                let range = self.check_range(raw.first_page.get(), raw.count.get())?;
                let bad = |expected: String| WireError::BadLength {
                    kind,
                    body_len: header.body_len as u32,
                    expected,
                };
                let pieces = self.page_size / PATCH_BYTES;
                if range.count != 1 || pieces < 2 || !self.page_size.is_multiple_of(PATCH_BYTES) {
                    return Err(bad(format!(
                        "one page of more than {PATCH_BYTES} bytes, not {} of {}",
                        range.count, self.page_size
                    )));
                }
                let bitmap_len = pieces.div_ceil(8) as usize;
                let set = payload
                    .get(..bitmap_len)
                    .map_or(0, |b| b.iter().map(|x| u64::from(x.count_ones())).sum());
                if set == 0 || payload.len() as u64 != bitmap_len as u64 + set * PATCH_BYTES {
                    return Err(bad(format!(
                        "{RANGE_BODY_LEN} + a {bitmap_len}-byte bitmap with at least one piece set + {PATCH_BYTES} bytes per set piece"
                    )));
                }
                return Ok((Message::Patch(range), payload));
            }
            Kind::MapEnd => Message::MapEnd,
            Kind::Challenge => Message::Challenge(body.try_into().map_err(|_| self.short(header))?),
            Kind::AuthOk => Message::AuthOk(body.try_into().map_err(|_| self.short(header))?),
            Kind::Proof => {
                let field = |i: usize| -> Result<[u8; AUTH_BYTES], WireError> {
                    body.get(i * AUTH_BYTES..(i + 1) * AUTH_BYTES)
                        .and_then(|b| b.try_into().ok())
                        .ok_or_else(|| self.short(header))
                };
                Message::Proof {
                    nonce: field(0)?,
                    mac: field(1)?,
                    resume: field(2)?,
                }
            }
            Kind::DigestQuery | Kind::Digests => {
                let (raw, payload) = U64::read_from_prefix(body).map_err(|_| self.short(header))?;
                let chunk_pages = raw.get();
                if chunk_pages == 0 {
                    return Err(WireError::RangeOutOfBounds {
                        first: 0,
                        count: 0,
                        total_pages: self.total_pages,
                    });
                }
                if kind == Kind::DigestQuery {
                    Message::DigestQuery { chunk_pages }
                } else {
                    let chunks = self.total_pages.div_ceil(chunk_pages);
                    if chunks * 8 != payload.len() as u64 {
                        return Err(WireError::BadLength {
                            kind,
                            body_len: header.body_len as u32,
                            expected: format!("8 + {chunks} digests of 8 bytes"),
                        });
                    }
                    return Ok((Message::Digests { chunk_pages }, payload));
                }
            }
            Kind::BulkDone => Message::BulkDone,
            Kind::Goodbye => Message::Goodbye,
            Kind::Heartbeat => Message::Heartbeat,
            Kind::Switchover => Message::Switchover,
            Kind::Sync => Message::Sync,
            Kind::Synced => Message::Synced,
            Kind::Error => {
                let (raw, text) =
                    ErrorBody::read_from_prefix(body).map_err(|_| self.short(header))?;
                if raw.reserved.get() != 0 {
                    return Err(WireError::ReservedNotZero { kind });
                }
                let code = ErrorCode::try_from(raw.code.get())?;
                let text = std::str::from_utf8(text)
                    .map_err(|_| WireError::BadErrorText)?
                    .to_owned();
                Message::Error { code, text }
            }
        };
        Ok((message, &[]))
    }

    /// Decodes the first frame of `buf`, or says how many bytes are needed.
    ///
    /// # Errors
    /// As [`Decoder::decode_header`] and [`Decoder::decode_body`].
    pub fn decode<'a>(&self, buf: &'a [u8]) -> Result<Decoded<'a>, WireError> {
        if self.tag_bytes != 0 {
            return Err(WireError::Sealed);
        }
        let Some(header_bytes) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(Decoded::Incomplete {
                need_bytes: HEADER_LEN,
            });
        };
        let header = self.decode_header(header_bytes)?;
        let frame_len = HEADER_LEN + header.body_len;
        let Some(body) = buf.get(HEADER_LEN..frame_len) else {
            return Ok(Decoded::Incomplete {
                need_bytes: frame_len,
            });
        };
        let (message, payload) = self.decode_body(header, body)?;
        Ok(Decoded::Frame {
            message,
            payload,
            consumed: frame_len,
        })
    }

    fn short(&self, header: FrameHeader) -> WireError {
        WireError::BadLength {
            kind: header.kind,
            body_len: header.body_len as u32,
            expected: "a complete fixed body".into(),
        }
    }

    fn check_range(&self, first: u64, count: u64) -> Result<PageRange, WireError> {
        let fits = count > 0
            && first
                .checked_add(count)
                .is_some_and(|end| end <= self.total_pages);
        if !fits {
            return Err(WireError::RangeOutOfBounds {
                first,
                count,
                total_pages: self.total_pages,
            });
        }
        Ok(PageRange { first, count })
    }
}

/// Appends the header and fixed body of `message` to `out`. For `PageRun`, `DoneMap` and
/// `Digests` the caller sends `payload_len` payload bytes right after; `payload_len` is
/// ignored for other kinds.
pub fn encode(message: &Message, payload_len: usize, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let mut trailing = 0;
    match message {
        Message::Hello { role, params } => encode_params(*role as u8, params, out),
        Message::Welcome(params) => encode_params(0, params, out),
        Message::Request(r) | Message::ZeroRun(r) | Message::Skip(r) | Message::PageRun(r) => {
            let body = RangeBody {
                first_page: r.first.into(),
                count: r.count.into(),
            };
            out.extend_from_slice(body.as_bytes());
            if matches!(message, Message::PageRun(_)) {
                trailing = payload_len;
            }
        }
        Message::BulkDone
        | Message::Goodbye
        | Message::MapEnd
        | Message::Heartbeat
        | Message::Switchover
        | Message::Sync
        | Message::Synced => {}
        Message::DoneMap(r)
        | Message::SkipMap(r)
        | Message::Discard(r)
        | Message::PageHashes(r)
        | Message::Patch(r) => {
            let body = RangeBody {
                first_page: r.first.into(),
                count: r.count.into(),
            };
            out.extend_from_slice(body.as_bytes());
            trailing = payload_len;
        }
        Message::Challenge(bytes) | Message::AuthOk(bytes) => out.extend_from_slice(bytes),
        Message::Proof { nonce, mac, resume } => {
            out.extend_from_slice(nonce);
            out.extend_from_slice(mac);
            out.extend_from_slice(resume);
        }
        Message::DigestQuery { chunk_pages } => out.extend_from_slice(&chunk_pages.to_le_bytes()),
        Message::Digests { chunk_pages } => {
            out.extend_from_slice(&chunk_pages.to_le_bytes());
            trailing = payload_len;
        }
        Message::Error { code, text } => {
            let body = ErrorBody {
                code: (*code as u32).into(),
                reserved: 0.into(),
            };
            out.extend_from_slice(body.as_bytes());
            out.extend_from_slice(truncate_utf8(text, MAX_ERROR_TEXT_BYTES).as_bytes());
        }
    }
    let body_len = out.len() - start - HEADER_LEN + trailing;
    let header = RawHeader {
        kind: (message.kind() as u16).into(),
        reserved: 0.into(),
        body_len: (body_len as u32).into(),
    };
    out[start..start + HEADER_LEN].copy_from_slice(header.as_bytes());
}

fn encode_params(role: u8, params: &SessionParams, out: &mut Vec<u8>) {
    let body = HelloBody {
        magic: MAGIC.into(),
        version: params.version.into(),
        role,
        reserved0: 0,
        page_size: params.page_size.into(),
        flags: params.flags.into(),
        total_pages: params.total_pages.into(),
        session_id: params.session_id.into(),
        image_id: params.image_id.into(),
    };
    out.extend_from_slice(body.as_bytes());
    out.extend_from_slice(params.vm.as_str().as_bytes());
}

/// The longest prefix of `text` of at most `max_bytes` bytes that ends on a character boundary.
pub fn truncate_utf8(text: &str, max_bytes: usize) -> &str {
    let mut end = text.len().min(max_bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_typed_flags_round_trip_and_keep_to_their_frame() {
        for bits in 0..64u32 {
            let hello = HelloFlags::from_bits(bits);
            assert_eq!(hello.bits(), bits & HelloFlags::KNOWN);
            let welcome = WelcomeFlags::from_bits(bits);
            assert_eq!(welcome.bits(), bits & WelcomeFlags::KNOWN);
        }
        assert_eq!(HelloFlags::KNOWN & WelcomeFlags::KNOWN, 0);
        let params = |kind_flags: u32| SessionParams {
            version: PROTOCOL_VERSION,
            page_size: 4096,
            total_pages: 8,
            session_id: 1,
            image_id: 2,
            flags: kind_flags,
            vm: VmName::default(),
        };
        // A Welcome bit in a Hello is refused by the decoder, and the other way round.
        let decode = |message: Message| {
            let mut bytes = Vec::new();
            encode(&message, 0, &mut bytes);
            Decoder::handshake().decode(&bytes).map(|_| ())
        };
        let hello = |flags| Message::Hello {
            role: Role::Urgent,
            params: params(flags),
        };
        assert!(decode(hello(HelloFlags::KNOWN)).is_ok());
        assert!(matches!(
            decode(hello(FLAG_PROVEN)),
            Err(WireError::ReservedNotZero { .. })
        ));
        assert!(decode(Message::Welcome(params(WelcomeFlags::KNOWN))).is_ok());
        assert!(matches!(
            decode(Message::Welcome(params(FLAG_RESUMED))),
            Err(WireError::ReservedNotZero { .. })
        ));
        let ours = params(
            WelcomeFlags {
                precopy: true,
                free_first: false,
                proven: true,
            }
            .bits(),
        );
        assert!(ours.precopy() && ours.proven() && !ours.free_first());
    }
    use proptest::prelude::*;

    const PAGE: u64 = 4096;

    fn session() -> Decoder {
        Decoder::session(PAGE, 1000)
    }

    fn frame(message: &Message, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(message, payload.len(), &mut out);
        out.extend_from_slice(payload);
        out
    }

    fn decode_all(decoder: &Decoder, buf: &[u8]) -> Result<(Message, Vec<u8>), WireError> {
        match decoder.decode(buf)? {
            Decoded::Frame {
                message,
                payload,
                consumed,
            } => {
                assert_eq!(consumed, buf.len());
                Ok((message, payload.to_vec()))
            }
            Decoded::Incomplete { need_bytes } => panic!("incomplete, need {need_bytes}"),
        }
    }

    fn params() -> SessionParams {
        SessionParams {
            version: PROTOCOL_VERSION,
            page_size: 4096,
            total_pages: 1000,
            session_id: 7,
            image_id: 0x1234_5678_9abc_def0,
            flags: 0,
            vm: VmName::default(),
        }
    }

    #[test]
    fn test_handshake_round_trip() {
        let d = Decoder::handshake();
        for m in [
            Message::Hello {
                role: Role::Bulk,
                params: params(),
            },
            Message::Welcome(params()),
            Message::Hello {
                role: Role::Urgent,
                params: SessionParams {
                    vm: VmName::new(&"v".repeat(MAX_VM_NAME_BYTES)).unwrap(),
                    ..params()
                },
            },
            Message::Welcome(SessionParams {
                vm: VmName::new("web-1.prod_a").unwrap(),
                ..params()
            }),
            Message::Error {
                code: ErrorCode::LayoutMismatch,
                text: "sizes differ ✗".into(),
            },
        ] {
            assert_eq!(decode_all(&d, &frame(&m, &[])).unwrap().0, m);
        }
    }

    #[test]
    fn test_vm_names_are_checked_on_both_ends() {
        for bad in [
            "a b",
            "-x",
            ".x",
            "é",
            "a/b",
            &"v".repeat(MAX_VM_NAME_BYTES + 1),
        ] {
            assert!(VmName::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(VmName::new("").unwrap().is_empty());
        // A name with a bad byte on the wire is refused, not trusted.
        let hello = Message::Hello {
            role: Role::Urgent,
            params: SessionParams {
                vm: VmName::new("abc").unwrap(),
                ..params()
            },
        };
        let mut bytes = frame(&hello, &[]);
        let last = bytes.len() - 1;
        bytes[last] = b'/';
        assert_eq!(
            decode_all(&Decoder::handshake(), &bytes).unwrap_err(),
            WireError::BadVmName
        );
        // A name longer than the limit cannot even be framed as a Hello.
        let mut long = frame(&hello, &[]);
        long.extend(std::iter::repeat_n(b'a', MAX_VM_NAME_BYTES));
        let len = (long.len() - HEADER_LEN) as u32;
        long[4..8].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            decode_all(&Decoder::handshake(), &long),
            Err(WireError::BadLength { .. })
        ));
    }

    #[test]
    fn test_session_messages_round_trip() {
        let r = PageRange {
            first: 10,
            count: 2,
        };
        for m in [
            Message::Request(r),
            Message::ZeroRun(r),
            Message::Skip(r),
            Message::BulkDone,
            Message::Goodbye,
            Message::Heartbeat,
            Message::Switchover,
            Message::Sync,
            Message::Synced,
        ] {
            assert_eq!(decode_all(&session(), &frame(&m, &[])).unwrap().0, m);
        }
        let payload = vec![0xAB; 2 * PAGE as usize];
        let (m, p) = decode_all(&session(), &frame(&Message::PageRun(r), &payload)).unwrap();
        assert_eq!(m, Message::PageRun(r));
        assert_eq!(p, payload);
    }

    #[test]
    fn test_recovery_auth_and_digest_messages_round_trip() {
        let r = PageRange {
            first: 3,
            count: 17,
        };
        let (m, p) = decode_all(&session(), &frame(&Message::DoneMap(r), &[0xFF; 3])).unwrap();
        assert_eq!((m, p.len()), (Message::DoneMap(r), 3));
        let (m, p) = decode_all(&session(), &frame(&Message::SkipMap(r), &[0x0F; 3])).unwrap();
        assert_eq!((m, p), (Message::SkipMap(r), vec![0x0F; 3]));
        let (m, p) = decode_all(&session(), &frame(&Message::Discard(r), &[0x11; 3])).unwrap();
        assert_eq!((m, p), (Message::Discard(r), vec![0x11; 3]));
        let hashes = vec![0x5A; 17 * PAGE_HASH_BYTES];
        let (m, p) = decode_all(&session(), &frame(&Message::PageHashes(r), &hashes)).unwrap();
        assert_eq!((m, p), (Message::PageHashes(r), hashes.clone()));
        assert!(matches!(
            session().decode(&frame(&Message::PageHashes(r), &hashes[1..])),
            Err(WireError::BadLength { .. })
        ));
        assert!(matches!(
            session().decode(&frame(&Message::SkipMap(r), &[0xFF; 4])),
            Err(WireError::BadLength { .. })
        ));
        assert!(matches!(
            session().decode(&frame(&Message::DoneMap(r), &[0xFF; 2])),
            Err(WireError::BadLength { .. })
        ));
        assert_eq!(
            decode_all(&session(), &frame(&Message::MapEnd, &[]))
                .unwrap()
                .0,
            Message::MapEnd
        );
        for m in [
            Message::Challenge([1; AUTH_BYTES]),
            Message::AuthOk([2; AUTH_BYTES]),
            Message::Proof {
                nonce: [3; AUTH_BYTES],
                mac: [4; AUTH_BYTES],
                resume: [5; AUTH_BYTES],
            },
        ] {
            assert_eq!(
                decode_all(&Decoder::handshake(), &frame(&m, &[]))
                    .unwrap()
                    .0,
                m
            );
            assert_eq!(
                session().decode(&frame(&m, &[])),
                Err(WireError::Unexpected(m.kind()))
            );
        }
        let q = Message::DigestQuery { chunk_pages: 300 };
        assert_eq!(decode_all(&session(), &frame(&q, &[])).unwrap().0, q);
        let d = Message::Digests { chunk_pages: 300 };
        let (m, p) = decode_all(&session(), &frame(&d, &[7; 32])).unwrap();
        assert_eq!((m, p.len()), (d.clone(), 32));
        assert!(matches!(
            session().decode(&frame(&d, &[7; 24])),
            Err(WireError::BadLength { .. })
        ));
        assert!(
            session()
                .decode(&frame(&Message::DigestQuery { chunk_pages: 0 }, &[]))
                .is_err()
        );
    }

    #[test]
    fn test_rejects_unknown_kind_and_reserved() {
        let mut f = frame(&Message::Goodbye, &[]);
        f[0] = 99;
        assert_eq!(session().decode(&f), Err(WireError::UnknownKind(99)));
        f[0] = 25;
        assert_eq!(session().decode(&f), Err(WireError::UnknownKind(25)));
        let mut f = frame(&Message::Goodbye, &[]);
        f[2] = 1;
        assert!(matches!(
            session().decode(&f),
            Err(WireError::ReservedNotZero { .. })
        ));
        let mut f = frame(&Message::Welcome(params()), &[]);
        f[HEADER_LEN + 7] = 1; // reserved0
        assert!(matches!(
            Decoder::handshake().decode(&f),
            Err(WireError::ReservedNotZero { .. })
        ));
        let mut f = frame(&Message::Welcome(params()), &[]);
        f[HEADER_LEN + 6] = 1; // role in a Welcome
        assert!(matches!(
            Decoder::handshake().decode(&f),
            Err(WireError::ReservedNotZero { .. })
        ));
    }

    #[test]
    fn test_rejects_oversized_before_reading_body() {
        let mut f = frame(&Message::Goodbye, &[]);
        f[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            session().decode(&f),
            Err(WireError::TooLarge { body_len: u32::MAX })
        );
    }

    #[test]
    fn test_rejects_wrong_fixed_lengths() {
        let mut f = frame(&Message::Request(PageRange { first: 1, count: 1 }), &[]);
        f[4] = 15;
        f.pop();
        assert!(matches!(
            session().decode(&f),
            Err(WireError::BadLength { .. })
        ));
        let f = frame(
            &Message::PageRun(PageRange { first: 1, count: 2 }),
            &[0; 4096],
        );
        assert!(matches!(
            session().decode(&f),
            Err(WireError::BadLength { .. })
        ));
    }

    #[test]
    fn test_rejects_bad_magic_role_and_code() {
        let mut f = frame(
            &Message::Hello {
                role: Role::Urgent,
                params: params(),
            },
            &[],
        );
        f[HEADER_LEN + 6] = 3;
        assert_eq!(
            Decoder::handshake().decode(&f),
            Err(WireError::UnknownRole(3))
        );
        f[HEADER_LEN] ^= 0xFF;
        assert!(matches!(
            Decoder::handshake().decode(&f),
            Err(WireError::BadMagic(_))
        ));
        let mut f = frame(
            &Message::Error {
                code: ErrorCode::Busy,
                text: String::new(),
            },
            &[],
        );
        f[HEADER_LEN] = 200;
        assert_eq!(session().decode(&f), Err(WireError::UnknownErrorCode(200)));
    }

    #[test]
    fn test_rejects_out_of_range_pages() {
        for (first, count) in [(999, 2), (0, 0), (u64::MAX, 2), (1000, 1)] {
            let f = frame(&Message::Request(PageRange { first, count }), &[]);
            assert!(matches!(
                session().decode(&f),
                Err(WireError::RangeOutOfBounds { .. })
            ));
        }
    }

    #[test]
    fn test_rejects_frames_outside_their_phase() {
        let f = frame(&Message::Goodbye, &[]);
        assert_eq!(
            Decoder::handshake().decode(&f),
            Err(WireError::Unexpected(Kind::Goodbye))
        );
        let f = frame(&Message::Welcome(params()), &[]);
        assert_eq!(
            session().decode(&f),
            Err(WireError::Unexpected(Kind::Welcome))
        );
    }

    #[test]
    fn test_incomplete_reports_needed_bytes() {
        let f = frame(&Message::Skip(PageRange { first: 3, count: 4 }), &[]);
        assert_eq!(
            session().decode(&f[..3]),
            Ok(Decoded::Incomplete {
                need_bytes: HEADER_LEN
            })
        );
        assert_eq!(
            session().decode(&f[..HEADER_LEN + 1]),
            Ok(Decoded::Incomplete {
                need_bytes: f.len()
            })
        );
    }

    #[test]
    fn test_error_text_is_truncated_on_char_boundary() {
        let text = "é".repeat(MAX_ERROR_TEXT_BYTES);
        let f = frame(
            &Message::Error {
                code: ErrorCode::Internal,
                text,
            },
            &[],
        );
        let (m, _) = decode_all(&session(), &f).unwrap();
        let Message::Error { text, .. } = m else {
            panic!("not an error")
        };
        assert_eq!(text.len(), MAX_ERROR_TEXT_BYTES);
    }

    proptest! {
        #[test]
        fn prop_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = session().decode(&bytes);
            let _ = Decoder::handshake().decode(&bytes);
        }

        #[test]
        fn prop_ranges_round_trip(first in 0u64..1000, count in 1u64..1000) {
            let m = Message::ZeroRun(PageRange { first, count });
            let bytes = frame(&m, &[]);
            let decoded = session().decode(&bytes);
            if first + count <= 1000 {
                prop_assert_eq!(decoded.map(|d| matches!(d, Decoded::Frame { .. })), Ok(true));
            } else {
                let rejected = matches!(decoded, Err(WireError::RangeOutOfBounds { .. }));
                prop_assert!(rejected);
            }
        }

        #[test]
        fn prop_any_single_byte_flip_in_header_is_caught_or_consistent(pos in 0usize..HEADER_LEN, bit in 0u8..8) {
            let m = Message::Request(PageRange { first: 5, count: 3 });
            let mut f = frame(&m, &[]);
            f[pos] ^= 1 << bit;
            match session().decode(&f) {
                Err(_) | Ok(Decoded::Incomplete { .. }) => {}
                Ok(Decoded::Frame { message, .. }) => prop_assert_ne!(message, m),
            }
        }
    }

    #[test]
    fn test_printable_escapes_what_could_forge_a_log_line() {
        assert_eq!(printable("plain text, é"), "plain text, é");
        assert_eq!(
            printable("ok\n2026-12-07 INFO pagesrv: completed\u{1b}[2J\r"),
            "ok\\n2026-12-07 INFO pagesrv: completed\\u{1b}[2J\\r"
        );
    }

    #[test]
    fn test_a_patch_carries_the_set_pieces_of_one_huge_page_and_nothing_else() {
        let huge = Decoder::session(2 << 20, 8);
        let one = PageRange { first: 3, count: 1 };
        // 512 pieces: a 64-byte bitmap with pieces 0 and 9 set, then their bytes.
        let mut payload = vec![0u8; 64];
        payload[0] = 1;
        payload[1] = 2;
        payload.extend(vec![7u8; 2 * PATCH_BYTES as usize]);
        let (m, p) = decode_all(&huge, &frame(&Message::Patch(one), &payload)).unwrap();
        assert_eq!((m, p), (Message::Patch(one), payload.clone()));
        let bad = |range: PageRange, payload: &[u8], decoder: &Decoder| {
            matches!(
                decode_all(decoder, &frame(&Message::Patch(range), payload)),
                Err(WireError::BadLength { .. } | WireError::RangeOutOfBounds { .. })
            )
        };
        assert!(
            bad(PageRange { first: 3, count: 2 }, &payload, &huge),
            "one page"
        );
        assert!(
            bad(one, &payload[..payload.len() - 1], &huge),
            "a piece short"
        );
        assert!(bad(one, &[0u8; 64], &huge), "no piece set");
        assert!(
            bad(PageRange { first: 8, count: 1 }, &payload, &huge),
            "past the end"
        );
        let mut small = vec![1u8];
        small.extend(vec![0u8; PATCH_BYTES as usize]);
        assert!(bad(one, &small, &session()), "4 KiB pages have no pieces");
    }
}
