//! Admission: the listener and the handshake of every new connection, on one thread (a mio
//! loop over non-blocking sockets, each handshake a sans-IO [`ServerGreeting`]). A connection is
//! admitted (handed to the manager) once it proved the key of the VM it named; what that
//! costs an attacker who holds no key:
//!
//! - **One deadline per handshake**, [`HANDSHAKE_DEADLINE`] from accept, over every read: a
//!   client that dribbles its `Hello` a byte at a time is closed when it runs out, however
//!   often it sends.
//! - **Room for many**: up to [`MAX_HANDSHAKES`] handshakes at once (fewer if the file
//!   limit is low), a socket and half a kilobyte each, not a thread. A connection from
//!   beyond loopback shares [`MAX_HANDSHAKES_PER_PEER`] with the others from its address.
//! - **When full, the least advanced makes room**: a new connection evicts the oldest one
//!   that has not sent a whole `Hello`, then the oldest waiting for its `Proof`, and a
//!   `Hello` that names one of the sessions pagesrv has ([`LiveSessions`]) last. A real
//!   destination sends its `Hello` at once and its `Proof` one round trip later, so a crowd
//!   of slow clients does not keep it out, and a destination that lost its link gets back in
//!   ahead of strangers (who do not know its session's id: refusals name none).
//! - **Quiet logs**: the first rejection of every [`LOG_WINDOW`] is logged with its reason,
//!   the rest are counted and summed up at the window's end.
//!
//! ```text
//!  listener ─accept─► room? (evict the least advanced) ─► Greeting ─Hello─► Challenge
//!    ─Proof (MAC of the named VM's key)─► blocking again ─► deliver(Admitted) ─► manager
//!  deadline, bad frame, wrong key ─► Error frame (if owed), close, count
//! ```

use std::collections::BTreeMap;
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::auth::Psk;
use common::framed::FrameEncoder;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use tracing::warn;

use common::handshake::{Greeted, Rejection, ServerGreeting, ServerStep};

use crate::handshake::{Admitted, HANDSHAKE_DEADLINE};

/// Most connections in their handshake at once.
pub const MAX_HANDSHAKES: usize = 1024;
/// Most connections in their handshake at once from one address beyond loopback.
pub const MAX_HANDSHAKES_PER_PEER: usize = 64;
/// Rejections are logged one per window, then summed.
pub const LOG_WINDOW: Duration = Duration::from_secs(10);
/// A client that sends more than this before it is admitted is refused.
const MAX_HANDSHAKE_BYTES: usize = 64 << 10;

const LISTENER: Token = Token(usize::MAX);

/// Hands an admitted connection to the manager.
pub type Deliver = Box<dyn Fn(Box<Admitted>) + Send>;

/// The ids of the sessions pagesrv has (running, connecting or cut off), as the manager
/// last published them: a `Hello` naming one is the last to be evicted.
#[derive(Debug, Default)]
pub struct LiveSessions(std::sync::Mutex<Vec<u64>>);

impl LiveSessions {
    /// Publishes the sessions now known.
    pub fn set(&self, ids: Vec<u64>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = ids;
    }

    fn snapshot(&self) -> Vec<u64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Starts the admission thread on `listener`: handshakes checked with `master` (the master
/// key, or [`Psk::unkeyed`]), at most `capacity` at once, each admitted one passed to
/// `deliver`. Ends with the process.
///
/// # Errors
/// The poll cannot be set up.
pub fn spawn(
    listener: TcpListener,
    master: Psk,
    capacity: usize,
    live: std::sync::Arc<LiveSessions>,
    deliver: Deliver,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let poll = Poll::new()?;
    poll.registry().register(
        &mut SourceFd(&listener.as_raw_fd()),
        LISTENER,
        Interest::READABLE,
    )?;
    let mut admission = Admission {
        poll,
        listener,
        master,
        deliver,
        live,
        table: Table::new(capacity.max(1)),
        log: RejectionLog::default(),
        accept_retry: false,
    };
    std::thread::Builder::new()
        .name("admission".into())
        .spawn(move || admission.run())?;
    Ok(())
}

/// A connection in its handshake.
struct InHandshake {
    conn: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
    greeting: ServerGreeting,
    /// Bytes of `greeting.out` already sent.
    sent: usize,
}

impl InHandshake {
    /// Which goes first when room is made: no whole `Hello` yet, then waiting for the
    /// `Proof`, then naming a session pagesrv has (`live`); the oldest first within each.
    fn eviction_rank(&self, live: &[u64]) -> (u8, Instant) {
        let class = if !self.greeting.has_hello() {
            0
        } else if !self
            .greeting
            .named_session()
            .is_some_and(|id| live.contains(&id))
        {
            1
        } else {
            2
        };
        (class, self.accepted)
    }

    /// Reads what arrived, advances the handshake and sends what it queued (a refusal
    /// included: the socket has room for one small frame).
    fn pump(&mut self, master: &Psk) -> Pumped {
        let mut peer_closed = false;
        while self.greeting.reader().buffered() <= MAX_HANDSHAKE_BYTES {
            match self.greeting.reader().fill(&mut self.conn) {
                Ok(0) => {
                    peer_closed = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Pumped::Close("read failed", e.to_string()),
            }
        }
        let step = self.greeting.advance(master);
        // A refusal's `Error` frame is sent by the caller once the refusal is logged: a
        // client told it was refused finds the line in pagesrv's log already.
        let flushed = match step {
            ServerStep::Rejected(_) => Ok(false),
            _ => self.flush(),
        };
        match step {
            ServerStep::Admitted(greeted) => Pumped::Admitted(greeted),
            ServerStep::Rejected(why) => Pumped::Rejected(why),
            ServerStep::More if peer_closed => {
                Pumped::Close("closed early", "the client closed".into())
            }
            ServerStep::More if self.greeting.reader().buffered() > MAX_HANDSHAKE_BYTES => {
                Pumped::Close("oversized", "too many bytes before admission".into())
            }
            ServerStep::More => match flushed {
                Err(e) => Pumped::Close("write failed", e.to_string()),
                Ok(_) => Pumped::Wait,
            },
        }
    }

    /// Sends what is queued; `Ok(true)` when all of it went.
    fn flush(&mut self) -> std::io::Result<bool> {
        while self.sent < self.greeting.out.len() {
            match self.conn.write(&self.greeting.out[self.sent..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// What one turn of a handshake came to.
enum Pumped {
    /// More bytes are needed.
    Wait,
    /// Close it (a reason and its detail).
    Close(&'static str, String),
    /// Refused (its `Error` frame queued, not yet sent).
    Rejected(Rejection),
    /// Admitted.
    Admitted(Box<Greeted>),
}

/// The connections in their handshake, by token.
struct Table {
    slots: Vec<Option<InHandshake>>,
    free: Vec<usize>,
    len: usize,
}

impl Table {
    fn new(capacity: usize) -> Self {
        Table {
            slots: (0..capacity).map(|_| None).collect(),
            free: (0..capacity).rev().collect(),
            len: 0,
        }
    }

    fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    fn insert(&mut self, entry: InHandshake) -> usize {
        let at = self.free.pop().expect("checked for room first");
        self.slots[at] = Some(entry);
        self.len += 1;
        at
    }

    fn remove(&mut self, at: usize) -> Option<InHandshake> {
        let entry = self.slots.get_mut(at)?.take()?;
        self.free.push(at);
        self.len -= 1;
        Some(entry)
    }

    fn count_from(&self, ip: IpAddr) -> usize {
        self.iter().filter(|(_, e)| e.peer.ip() == ip).count()
    }

    fn iter(&self) -> impl Iterator<Item = (usize, &InHandshake)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (i, e)))
    }

    /// The connection to close to make room (among those from `ip`, if given).
    fn victim(&self, ip: Option<IpAddr>, live: &[u64]) -> Option<usize> {
        self.iter()
            .filter(|(_, e)| ip.is_none_or(|ip| e.peer.ip() == ip))
            .min_by_key(|(_, e)| e.eviction_rank(live))
            .map(|(i, _)| i)
    }
}

/// Counts rejections; logs the first of each window and a sum at its end.
#[derive(Default)]
struct RejectionLog {
    window_start: Option<Instant>,
    counts: BTreeMap<&'static str, u64>,
}

impl RejectionLog {
    fn reject(&mut self, peer: SocketAddr, kind: &'static str, detail: &dyn std::fmt::Display) {
        self.roll();
        if self.window_start.is_none() {
            self.window_start = Some(Instant::now());
            warn!(%peer, reason = %kind, error = %detail, "rejected a connection (more in the next {} s are counted, then summed up)", LOG_WINDOW.as_secs());
            return;
        }
        *self.counts.entry(kind).or_default() += 1;
    }

    /// Ends a window that is over: the sum of what it counted.
    fn roll(&mut self) {
        if self
            .window_start
            .is_some_and(|start| start.elapsed() >= LOG_WINDOW)
        {
            if !self.counts.is_empty() {
                let total: u64 = self.counts.values().sum();
                let by_reason = self
                    .counts
                    .iter()
                    .map(|(k, n)| format!("{k}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                warn!(
                    total,
                    %by_reason,
                    "rejected more connections in the last {} s",
                    LOG_WINDOW.as_secs()
                );
            }
            self.window_start = None;
            self.counts.clear();
        }
    }
}

struct Admission {
    poll: Poll,
    listener: TcpListener,
    master: Psk,
    deliver: Deliver,
    live: std::sync::Arc<LiveSessions>,
    table: Table,
    log: RejectionLog,
    /// Accepting failed for want of file descriptors: try again on the next turn.
    accept_retry: bool,
}

impl Admission {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != ErrorKind::Interrupted {
                    warn!(error = %e, "the admission poll failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
            for event in &events {
                match event.token() {
                    LISTENER => self.accept_all(),
                    Token(at) => self.service(at),
                }
            }
            if self.accept_retry {
                self.accept_all();
            }
            self.expire();
            self.log.roll();
        }
    }

    /// Until the oldest handshake's deadline (at most a second; soon when accepting must be
    /// retried).
    fn next_timeout(&self) -> Duration {
        if self.accept_retry {
            return Duration::from_millis(20);
        }
        let now = Instant::now();
        self.table
            .iter()
            .map(|(_, e)| (e.accepted + HANDSHAKE_DEADLINE).saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(1), Duration::from_secs(1))
    }

    fn accept_all(&mut self) {
        self.accept_retry = false;
        loop {
            match self.listener.accept() {
                Ok((conn, peer)) => self.take(conn, peer),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors (or another transient failure): make room and
                    // try again shortly; the listener does not signal again by itself.
                    if let Some(victim) = self.table.victim(None, &self.live.snapshot()) {
                        self.close(victim, "evicted", &"out of file descriptors");
                    } else {
                        self.log.reject(
                            self.listener
                                .local_addr()
                                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
                            "accept failed",
                            &e,
                        );
                    }
                    self.accept_retry = true;
                    return;
                }
            }
        }
    }

    /// A new connection: room made if need be, then its handshake begins.
    fn take(&mut self, conn: TcpStream, peer: SocketAddr) {
        let live = self.live.snapshot();
        if !peer.ip().is_loopback()
            && self.table.count_from(peer.ip()) >= MAX_HANDSHAKES_PER_PEER
            && let Some(victim) = self.table.victim(Some(peer.ip()), &live)
        {
            self.close(
                victim,
                "evicted",
                &"its address has too many handshakes open",
            );
        }
        if self.table.is_full()
            && let Some(victim) = self.table.victim(None, &live)
        {
            self.close(victim, "evicted", &"every handshake slot is taken");
        }
        if conn.set_nonblocking(true).is_err() {
            return;
        }
        let entry = InHandshake {
            conn,
            peer,
            accepted: Instant::now(),
            greeting: ServerGreeting::default(),
            sent: 0,
        };
        let fd = entry.conn.as_raw_fd();
        let at = self.table.insert(entry);
        let registered = self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(at),
            Interest::READABLE | Interest::WRITABLE,
        );
        if let Err(e) = registered {
            self.close(at, "socket setup failed", &e);
            return;
        }
        // What already arrived (edge-triggered: the poll may not say so again).
        self.service(at);
    }

    /// Reads what arrived, advances the handshake, sends what it queued.
    fn service(&mut self, at: usize) {
        let Some(entry) = self.table.slots.get_mut(at).and_then(Option::as_mut) else {
            return;
        };
        match entry.pump(&self.master) {
            Pumped::Wait => {}
            Pumped::Close(kind, why) => self.close(at, kind, &why),
            Pumped::Rejected(why) => {
                self.log.reject(entry.peer, why.kind(), &why);
                let _ = entry.flush();
                self.forget(at);
            }
            Pumped::Admitted(greeted) => {
                let entry = self.table.remove(at).expect("serviced above");
                let fd = entry.conn.as_raw_fd();
                let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
                if let Err(e) = entry.conn.set_nonblocking(false) {
                    self.log.reject(entry.peer, "socket setup failed", &e);
                    return;
                }
                (self.deliver)(Box::new(Admitted {
                    conn: entry.conn,
                    peer: entry.peer,
                    greeted: *greeted,
                    encoder: FrameEncoder::plain(),
                }));
            }
        }
    }

    fn close(&mut self, at: usize, kind: &'static str, detail: &dyn std::fmt::Display) {
        if let Some(entry) = self.forget(at) {
            self.log.reject(entry.peer, kind, detail);
        }
    }

    /// Takes a connection out of the table and the poll (it closes when dropped).
    fn forget(&mut self, at: usize) -> Option<InHandshake> {
        let entry = self.table.remove(at)?;
        let fd = entry.conn.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        Some(entry)
    }

    /// Closes every handshake past its deadline.
    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<usize> = self
            .table
            .iter()
            .filter(|(_, e)| now >= e.accepted + HANDSHAKE_DEADLINE)
            .map(|(at, _)| at)
            .collect();
        for at in late {
            self.close(at, "deadline", &"no valid handshake within the deadline");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(peer: &str, age_ms: u64) -> InHandshake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        InHandshake {
            conn,
            peer: peer.parse().unwrap(),
            accepted: Instant::now() - Duration::from_millis(age_ms),
            greeting: ServerGreeting::default(),
            sent: 0,
        }
    }

    fn with_hello(mut e: InHandshake, session_id: u64) -> InHandshake {
        let params = common::wire::SessionParams {
            version: common::wire::PROTOCOL_VERSION,
            page_size: 4096,
            total_pages: 1,
            session_id,
            image_id: 0,
            flags: 0,
            vm: common::wire::VmName::default(),
        };
        let mut bytes = Vec::new();
        common::wire::encode(
            &common::wire::Message::Hello {
                role: common::wire::Role::Urgent,
                params,
            },
            0,
            &mut bytes,
        );
        e.greeting.reader().fill(&mut bytes.as_slice()).unwrap();
        assert!(matches!(
            e.greeting.advance(&Psk::unkeyed()),
            ServerStep::More
        ));
        e
    }

    #[test]
    fn test_room_is_made_by_the_least_advanced_oldest_first() {
        let mut t = Table::new(5);
        let live = [7];
        let resuming = t.insert(with_hello(entry("10.0.0.1:1", 900), 7));
        let proving = t.insert(with_hello(entry("10.0.0.2:1", 700), 0));
        let claiming = t.insert(with_hello(entry("10.0.0.4:1", 800), 99));
        let dribbling_young = t.insert(entry("10.0.0.3:1", 10));
        let dribbling_old = t.insert(entry("10.0.0.3:2", 500));
        assert!(t.is_full());
        assert_eq!(t.victim(None, &live), Some(dribbling_old));
        t.remove(dribbling_old);
        assert_eq!(t.victim(None, &live), Some(dribbling_young));
        t.remove(dribbling_young);
        assert_eq!(
            t.victim(None, &live),
            Some(claiming),
            "naming a session pagesrv does not have earns nothing"
        );
        t.remove(claiming);
        assert_eq!(t.victim(None, &live), Some(proving), "a resume goes last");
        t.remove(proving);
        assert_eq!(t.victim(None, &live), Some(resuming));
        assert_eq!(t.victim(Some("10.0.0.9".parse().unwrap()), &live), None);
        assert_eq!(t.count_from("10.0.0.1".parse().unwrap()), 1);
    }
}
