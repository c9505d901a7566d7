//! The listener: accepts a destination's urgent and bulk connections, checks its handshake
//! against the memory file, and runs one session at a time.
//!
//! While a session runs, further connections wait in the listen backlog and are served after
//! it (with `--serve-forever`).

use std::io::IsTerminal;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::auth::{self, Psk, Side};
use common::framed::{FrameReader, send_error, write_frame};
use common::wire::{Decoder, ErrorCode, Message, PROTOCOL_VERSION, Role, SessionParams};
use indicatif::{ProgressBar, ProgressStyle};
use socket2::SockRef;
use tracing::{info, info_span, warn};

use crate::session::{Outcome, Session, SessionConfig};
use crate::source::MemorySource;

/// How long a new connection may take to send its `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Send buffer of the bulk connection: small enough that pre-paging takes effect quickly.
const BULK_SNDBUF_BYTES: usize = 1 << 20;

/// Server settings from the command line.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Keep serving sessions after the first.
    pub serve_forever: bool,
    /// Per-session tuning.
    pub session: SessionConfig,
    /// Pre-shared key: destinations must prove they hold it (and so must we).
    pub psk: Option<Psk>,
    /// Serve a non-loopback address without a key.
    pub insecure_listen: bool,
}

/// Serves sessions until one completes (or forever, with `serve_forever`). A session that
/// breaks off is not an error: the destination reconnects and resumes in a new session.
///
/// # Errors
/// Refusing an unsafe address, or failing to bind it.
pub fn serve(source: &MemorySource, config: &ServerConfig) -> Result<()> {
    if !config.listen.ip().is_loopback() && config.psk.is_none() && !config.insecure_listen {
        bail!(
            "refusing to serve VM memory on {} without authentication: give --psk-file (or --insecure-listen)",
            config.listen
        );
    }
    let listener = TcpListener::bind(config.listen)
        .with_context(|| format!("failed to listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    // One line on stdout for scripts and tests: where to connect.
    println!("pagesrv listening on {addr}");
    info!(
        %addr,
        pages = source.total_pages(),
        page_size = source.page_size(),
        "serving memory"
    );
    loop {
        let (urgent, reader, bulk, session_id) =
            accept_session(&listener, source, config.psk.as_ref())?;
        let _span = info_span!("session", id = format_args!("{session_id:016x}")).entered();
        source.refresh_holes();
        let session = Session::new(source, config.session);
        let outcome = std::thread::scope(|s| {
            let (done_tx, done_rx) = mpsc::channel::<()>();
            let reporter = s.spawn(|| report_progress(&session, done_rx));
            let outcome = session.run(urgent, reader, bulk);
            drop(done_tx);
            let _ = reporter.join();
            outcome
        });
        print_summary(&session, &outcome);
        match (&outcome, config.serve_forever) {
            (Outcome::Completed, false) => return Ok(()),
            (Outcome::Completed, true) => {}
            (Outcome::Aborted(why), _) => {
                warn!(%why, "session broke off; waiting for the destination to reconnect");
            }
        }
    }
}

/// Accepts connections until one destination has opened both its urgent and bulk
/// connections.
fn accept_session(
    listener: &TcpListener,
    source: &MemorySource,
    psk: Option<&Psk>,
) -> Result<(TcpStream, FrameReader, TcpStream, u64)> {
    let ours = SessionParams {
        version: PROTOCOL_VERSION,
        page_size: source.page_size() as u32,
        total_pages: source.total_pages(),
        session_id: 0,
    };
    let mut pending: Option<(TcpStream, FrameReader, u64)> = None;
    loop {
        let (mut conn, peer) = listener.accept().context("accept failed")?;
        let hello = read_hello(&mut conn).and_then(|(role, theirs, mut reader)| {
            authenticate(&mut conn, &mut reader, psk, role, &theirs)?;
            Ok((role, theirs, reader))
        });
        let (role, theirs, reader) = match hello {
            Ok(h) => h,
            Err(e) => {
                // Log first, then tell the peer: the log is never behind the wire.
                warn!(%peer, error = %format!("{e:#}"), "rejected a connection");
                if let Some(r) = e.downcast_ref::<Refusal>() {
                    send_error(&mut conn, r.code, &r.text);
                }
                continue;
            }
        };
        let reply = match role {
            Role::Urgent => check_params(&theirs, &ours).map(|()| rand::random::<u64>() | 1),
            Role::Bulk => match &pending {
                Some((_, _, id)) if *id == theirs.session_id => Ok(*id),
                _ => Err((
                    ErrorCode::UnknownSession,
                    format!("no pending session {:#x}", theirs.session_id),
                )),
            },
        };
        let session_id = match reply {
            Ok(id) => id,
            Err((code, text)) => {
                warn!(%peer, ?role, %text, "refused a destination");
                send_error(&mut conn, code, &text);
                continue;
            }
        };
        let welcome = Message::Welcome(SessionParams { session_id, ..ours });
        if let Err(e) =
            prepare_socket(&conn, role).and_then(|()| Ok(write_frame(&mut conn, &welcome, &[])?))
        {
            warn!(%peer, error = %format!("{e:#}"), "failed to welcome a destination");
            continue;
        }
        info!(%peer, ?role, "destination connected");
        match role {
            Role::Urgent => pending = Some((conn, reader, session_id)),
            Role::Bulk => {
                let (urgent, reader, id) = pending.take().expect("matched a pending session above");
                return Ok((urgent, reader, conn, id));
            }
        }
    }
}

/// A connection refused with an `Error` frame the caller sends after logging it.
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
struct Refusal {
    code: ErrorCode,
    text: String,
}

fn read_hello(conn: &mut TcpStream) -> Result<(Role, SessionParams, FrameReader)> {
    conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut reader = FrameReader::new(Decoder::handshake());
    let (message, _) = reader.read_frame(conn).context("no valid Hello")?;
    match message {
        Message::Hello { role, params } => Ok((role, params, reader)),
        other => Err(Refusal {
            code: ErrorCode::Protocol,
            text: format!("expected Hello, got {:?}", other.kind()),
        }
        .into()),
    }
}

/// With a key: challenge the client, check its proof, prove ourselves. Without: nothing.
fn authenticate(
    conn: &mut TcpStream,
    reader: &mut FrameReader,
    psk: Option<&Psk>,
    role: Role,
    theirs: &SessionParams,
) -> Result<()> {
    let Some(psk) = psk else { return Ok(()) };
    let server_nonce = auth::nonce();
    write_frame(conn, &Message::Challenge(server_nonce), &[])?;
    let (message, _) = reader.read_frame(conn).context("no authentication proof")?;
    let refuse = |text: String| Refusal {
        code: ErrorCode::AuthFailed,
        text,
    };
    let Message::Proof { nonce, mac } = message else {
        let text = format!(
            "authentication failed: expected Proof, got {:?}",
            message.kind()
        );
        return Err(refuse(text).into());
    };
    if !psk.verify(Side::Client, &server_nonce, &nonce, role, theirs, &mac) {
        return Err(refuse("authentication failed: wrong key".into()).into());
    }
    let ours = psk.mac(Side::Server, &server_nonce, &nonce, role, theirs);
    write_frame(conn, &Message::AuthOk(ours), &[])?;
    Ok(())
}

fn check_params(theirs: &SessionParams, ours: &SessionParams) -> Result<(), (ErrorCode, String)> {
    if theirs.version != ours.version {
        return Err((
            ErrorCode::VersionMismatch,
            format!(
                "destination speaks protocol version {}, source speaks {}",
                theirs.version, ours.version
            ),
        ));
    }
    if theirs.page_size != ours.page_size || theirs.total_pages != ours.total_pages {
        return Err((
            ErrorCode::LayoutMismatch,
            format!(
                "destination expects {} pages of {} bytes ({} MiB), the source memory file has {} pages of {} bytes ({} MiB)",
                theirs.total_pages,
                theirs.page_size,
                (theirs.total_pages * u64::from(theirs.page_size)) >> 20,
                ours.total_pages,
                ours.page_size,
                (ours.total_pages * u64::from(ours.page_size)) >> 20,
            ),
        ));
    }
    Ok(())
}

fn prepare_socket(conn: &TcpStream, role: Role) -> Result<()> {
    conn.set_read_timeout(None)?;
    common::netopt::detect_dead_peer(conn)?;
    if role == Role::Bulk {
        SockRef::from(conn).set_send_buffer_size(BULK_SNDBUF_BYTES)?;
    }
    Ok(())
}

/// Shows progress until `done` is dropped: a bar on a terminal, a line every 2 s otherwise.
fn report_progress(session: &Session<'_>, done: mpsc::Receiver<()>) {
    let total = session.total_pages();
    if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} pages ({percent}%) {msg}",
            )
            .expect("static template"),
        );
        while done.recv_timeout(Duration::from_millis(100)) == Err(mpsc::RecvTimeoutError::Timeout)
        {
            bar.set_position(session.pages_settled());
            bar.set_message(format!(
                "{} MiB sent",
                session.stats.bytes_sent.load(Ordering::Relaxed) >> 20
            ));
        }
        bar.finish_and_clear();
    } else {
        while done.recv_timeout(Duration::from_secs(2)) == Err(mpsc::RecvTimeoutError::Timeout) {
            let settled = session.pages_settled();
            info!(
                pages = settled,
                total,
                percent = settled * 100 / total.max(1),
                sent_mib = session.stats.bytes_sent.load(Ordering::Relaxed) >> 20,
                "progress"
            );
        }
    }
}

fn print_summary(session: &Session<'_>, outcome: &Outcome) {
    let s = &session.stats;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let secs = session.elapsed().as_secs_f64();
    let bytes = get(&s.bytes_sent);
    eprintln!(
        "pagesrv: session {}: {:.3} s, {} pages requested (urgent: {} data, {} zero), pushed {} data + {} zero pages, {} skipped, {:.1} MiB sent ({:.0} MiB/s)",
        match outcome {
            Outcome::Completed => "completed".to_string(),
            Outcome::Aborted(why) => format!("aborted ({why})"),
        },
        secs,
        get(&s.requested_pages),
        get(&s.urgent_data_pages),
        get(&s.urgent_zero_pages),
        get(&s.pushed_data_pages),
        get(&s.pushed_zero_pages),
        get(&s.skipped_pages),
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / (1 << 20) as f64 / secs.max(1e-9),
    );
}
