//! Socket options both sides set so a dead or stalled peer is noticed within about 2 s:
//! keepalive probes when idle, and a user timeout when sent data goes unacknowledged.

use std::net::TcpStream;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// How long a silent or stalled peer may take to be declared dead.
pub const DEAD_PEER_AFTER: Duration = Duration::from_secs(2);

/// Sets TCP_NODELAY, keepalive (1 s idle, 1 s interval, 1 probe) and TCP_USER_TIMEOUT.
///
/// # Errors
/// The kernel's refusal of an option.
pub fn detect_dead_peer(conn: &TcpStream) -> std::io::Result<()> {
    let sock = SockRef::from(conn);
    sock.set_nodelay(true)?;
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(Duration::from_secs(1))
            .with_interval(Duration::from_secs(1))
            .with_retries(1),
    )?;
    sock.set_tcp_user_timeout(Some(DEAD_PEER_AFTER))
}
