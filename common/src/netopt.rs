//! Noticing a dead or silent peer. Two layers: socket options (keepalive probes when idle,
//! a user timeout when sent data goes unacknowledged), and, because neither sees a peer
//! whose kernel still ACKs (a hung process, a middlebox that dropped the flow, a proxy that
//! stopped forwarding), heartbeats at the application level: each side sends a `Heartbeat`
//! frame on a connection idle for [`Liveness::heartbeat`], and declares the link dead after
//! [`Liveness::timeout`] without any frame from the peer.

use std::net::TcpStream;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// Default time without any frame after which a link is dead.
pub const DEFAULT_LINK_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest interval between heartbeats on an idle connection.
pub const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);

/// When to send heartbeats and when to give up on a silent peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// A link without any frame from the peer for this long is dead.
    pub timeout: Duration,
    /// Send a heartbeat when nothing was sent for this long.
    pub heartbeat: Duration,
}

impl Liveness {
    /// Heartbeats every 200 ms (or a quarter of `timeout`, if shorter).
    pub fn new(timeout: Duration) -> Self {
        Liveness {
            timeout,
            heartbeat: MAX_HEARTBEAT_INTERVAL.min(timeout / 4),
        }
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness::new(DEFAULT_LINK_TIMEOUT)
    }
}

/// Sets TCP_NODELAY, keepalive (1 s idle, 1 s interval, 1 probe) and TCP_USER_TIMEOUT
/// (unacknowledged data for `timeout` kills the connection).
///
/// # Errors
/// The kernel's refusal of an option.
pub fn detect_dead_peer(conn: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    let sock = SockRef::from(conn);
    sock.set_nodelay(true)?;
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(Duration::from_secs(1))
            .with_interval(Duration::from_secs(1))
            .with_retries(1),
    )?;
    sock.set_tcp_user_timeout(Some(timeout.max(Duration::from_millis(100))))
}

/// DSCP Expedited Forwarding (46) in the TOS byte: the urgent connection.
pub const TOS_URGENT: u32 = 46 << 2;
/// DSCP CS1 (8, lower effort) in the TOS byte: the bulk connection.
pub const TOS_BULK: u32 = 8 << 2;

/// Marks a connection's packets for networks that honour DSCP: the urgent connection as
/// Expedited Forwarding (replies to faults go before queued bulk data at a congested hop),
/// the bulk connection as lower effort. Networks that ignore DSCP are unaffected.
///
/// # Errors
/// The kernel's refusal.
pub fn mark_traffic(conn: &TcpStream, urgent: bool) -> std::io::Result<()> {
    let tos = if urgent { TOS_URGENT } else { TOS_BULK };
    let sock = SockRef::from(conn);
    match conn.local_addr()? {
        std::net::SocketAddr::V4(_) => sock.set_tos(tos),
        std::net::SocketAddr::V6(_) => sock.set_tclass_v6(tos),
    }
}

/// Parses a duration in seconds from the command line (`2`, `0.5`).
///
/// # Errors
/// Not a positive finite number of seconds.
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 || secs > 86_400.0 {
        return Err(format!("{text:?}: give a number of seconds in (0, 86400]"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod marking_tests {
    use super::*;

    #[test]
    fn urgent_and_bulk_connections_carry_their_dscp() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        mark_traffic(&conn, true).unwrap();
        assert_eq!(SockRef::from(&conn).tos().unwrap(), TOS_URGENT);
        mark_traffic(&conn, false).unwrap();
        assert_eq!(SockRef::from(&conn).tos().unwrap(), TOS_BULK);
        assert_eq!((TOS_URGENT >> 2, TOS_BULK >> 2), (46, 8));
    }
}
