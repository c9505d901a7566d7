//! A control socket for orchestrators (`--control PATH` on both daemons): newline-delimited
//! JSON over a Unix socket. A client sends commands and receives, on the same connection,
//! the answers and every event the daemon emits from then on.
//!
//! ```text
//!  client ──{"cmd":"status"}\n──►            ◄──{"status":{...}}\n
//!  client ──{"cmd":"start-postcopy"}\n──►    ◄──{"ok":"start-postcopy"}\n   (pagesrv)
//!                                           ◄──{"event":"switched",...}\n   (any time)
//!  an unknown or malformed command           ◄──{"error":"..."}\n
//! ```
//!
//! Events that mark a state (`switched`, `completed`, `failed`) are replayed to a client
//! that connects after them.
//!
//! Who may connect and what a client can cost the daemon: the socket is mode 0600 and a
//! client must run as root or as the daemon's user (`SO_PEERCRED`); at most
//! [`MAX_CLIENTS`] at once (more are told so and closed). Each client has a reader thread
//! and a writer thread with a bounded queue: [`ControlServer::emit`], called on the
//! migration's critical path (the switch), only queues, never writes, and a client whose
//! queue is full (it stopped reading) is dropped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use thiserror::Error;

use crate::uds::{BindError, bind_private};

/// Longest command line accepted.
const MAX_COMMAND_BYTES: u64 = 4096;
/// How long a write to a client may block (on its own writer thread) before it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_millis(200);
/// Most clients at once.
pub const MAX_CLIENTS: usize = 16;
/// Lines queued for one client before it counts as not reading and is dropped.
const QUEUE_LINES: usize = 256;

/// Errors setting up the control socket.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The socket could not be bound.
    #[error("cannot serve the control socket")]
    Bind(#[from] BindError),
    /// The acceptor thread could not start.
    #[error("cannot start the control socket's thread")]
    Thread(#[source] std::io::Error),
}

/// Answers commands: `(cmd, full command) -> answer` (the answer is sent as one line).
pub type Handler = dyn Fn(&str, &Value) -> Value + Send + Sync;

/// A bound control socket.
pub struct ControlServer {
    subscribers: Mutex<Subscribers>,
    path: PathBuf,
}

/// Who gets events, and the events a late client still gets.
#[derive(Default)]
struct Subscribers {
    /// Each client's queue (its writer thread drains it) and its socket (shut down when
    /// the client is dropped).
    clients: Vec<Client>,
    /// Events that mark a state (`switched`, `completed`, …), replayed to new clients.
    sticky: Vec<Value>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControlServer({})", self.path.display())
    }
}

impl ControlServer {
    /// Listens on `path` (mode 0600; a stale socket is replaced, a live one refused) and
    /// serves clients on background threads with `handler`.
    ///
    /// # Errors
    /// The path holds something else or a live socket, or binding failed.
    pub fn bind(path: &Path, handler: Arc<Handler>) -> Result<Arc<Self>, ControlError> {
        let listener = bind_private(path)?;
        let server = Arc::new(ControlServer {
            subscribers: Mutex::new(Subscribers::default()),
            path: path.to_owned(),
        });
        let weak = Arc::downgrade(&server);
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Some(server) = weak.upgrade() else { return };
                    let Ok(conn) = conn else { continue };
                    server.serve(conn, handler.clone());
                }
            })
            .map_err(ControlError::Thread)?;
        Ok(server)
    }

    fn serve(&self, mut conn: UnixStream, handler: Arc<Handler>) {
        let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
        if let Err(e) = crate::vmm_link::check_peer(&conn) {
            let _ = write_line(&mut conn, &json!({"error": e.to_string()}));
            return;
        }
        let (tx, rx) = mpsc::sync_channel::<Value>(QUEUE_LINES);
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            // Under the lock `emit` takes: a client sees every sticky event exactly once.
            let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
            subscribers.clients.retain(|c| !c.is_gone());
            if subscribers.clients.len() >= MAX_CLIENTS {
                let refusal = json!({"error": format!("{MAX_CLIENTS} control clients are connected already")});
                let _ = write_line(&mut conn, &refusal);
                return;
            }
            let replayed = subscribers
                .sticky
                .iter()
                .all(|event| tx.try_send(event.clone()).is_ok());
            if !replayed {
                return;
            }
            let Ok(handle) = conn.try_clone() else { return };
            subscribers.clients.push(Client {
                queue: tx.clone(),
                conn: handle,
                closed: closed.clone(),
            });
        }
        let Ok(reader) = conn.try_clone() else { return };
        let writer = std::thread::Builder::new()
            .name("control-out".into())
            .spawn(move || write_queue(conn, rx));
        if writer.is_err() {
            return;
        }
        let _ = std::thread::Builder::new()
            .name("control-in".into())
            .spawn(move || {
                read_commands(reader, tx, &*handler);
                // Its slot is free from now on (the writer ends once the list lets go).
                closed.store(true, std::sync::atomic::Ordering::Release);
            });
    }

    /// Queues an event for every client (never blocks); clients that stopped reading are
    /// dropped.
    pub fn emit(&self, event: &Value) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subscribers.clients.retain(|c| c.offer(event));
    }

    /// [`ControlServer::emit`] for an event that marks a state: clients that connect later
    /// get it first (a VMM that subscribes after the switch still learns of it).
    pub fn emit_sticky(&self, event: &Value) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subscribers.clients.retain(|c| c.offer(event));
        subscribers.sticky.push(event.clone());
    }
}

/// A connected client.
struct Client {
    queue: SyncSender<Value>,
    conn: UnixStream,
    /// Set by its reader thread when the client closed (or its socket failed).
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl Client {
    /// Queues `event`; `false` (and the client is cut off) if it cannot take it.
    fn offer(&self, event: &Value) -> bool {
        let taken = self.queue.try_send(event.clone()).is_ok();
        if !taken {
            let _ = self.conn.shutdown(std::net::Shutdown::Both);
        }
        taken
    }

    /// Whether the client closed, or its writer thread ended (a write failed).
    fn is_gone(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
            || matches!(
                self.queue.try_send(Value::Null),
                Err(TrySendError::Disconnected(_))
            )
    }
}

/// A client's writer thread: sends what is queued until the queue is dropped or a write
/// fails (the client is then dropped: its queue's receiver goes away).
fn write_queue(mut conn: UnixStream, queue: Receiver<Value>) {
    for line in queue {
        if line.is_null() {
            continue; // a liveness probe (is_gone)
        }
        if write_line(&mut conn, &line).is_err() {
            return;
        }
    }
}

/// Parses one command line: its name and the whole command, or the answer that refuses it.
///
/// # Errors
/// The `{"error": ...}` answer: not JSON, or no string `cmd` field.
pub fn parse_command(line: &str) -> Result<(String, Value), Value> {
    let cmd = serde_json::from_str::<Value>(line)
        .map_err(|e| json!({"error": format!("not JSON: {e}")}))?;
    match cmd.get("cmd").and_then(Value::as_str) {
        Some(name) => Ok((name.to_owned(), cmd.clone())),
        None => Err(json!({"error": "no \"cmd\" field"})),
    }
}

/// A client's reader thread: answers each command through the client's queue.
fn read_commands(reader: UnixStream, answers: SyncSender<Value>, handler: &Handler) {
    let mut lines = BufReader::new(reader);
    loop {
        let mut line = String::new();
        let read = std::io::Read::take(&mut lines, MAX_COMMAND_BYTES).read_line(&mut line);
        let answer = match read {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with('\n') => {
                json!({"error": format!("a command longer than {MAX_COMMAND_BYTES} bytes")})
            }
            Ok(_) => match parse_command(&line) {
                Ok((name, cmd)) => handler(&name, &cmd),
                Err(refusal) => refusal,
            },
        };
        if answers.try_send(answer).is_err() {
            return;
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn write_line(w: &mut UnixStream, value: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).expect("JSON values serialize");
    line.push(b'\n');
    w.write_all(&line)
}

/// A client's view (for tools and tests): sends commands, reads answers and events.
pub struct ControlClient {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl ControlClient {
    /// Connects to a control socket.
    ///
    /// # Errors
    /// Connecting failed.
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        let writer = UnixStream::connect(path)?;
        let reader = BufReader::new(writer.try_clone()?);
        Ok(ControlClient { writer, reader })
    }

    /// Sends one command.
    ///
    /// # Errors
    /// The socket's error.
    pub fn send(&mut self, command: &Value) -> std::io::Result<()> {
        write_line(&mut self.writer, command)
    }

    /// The next line the daemon sent (`None` when it closed the socket).
    ///
    /// # Errors
    /// The socket's error, or a line that is not JSON.
    pub fn next_line(&mut self) -> std::io::Result<Option<Value>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line)
            .map(Some)
            .map_err(std::io::Error::other)
    }

    /// Reads lines until one satisfies `pred` (`None` when the daemon closed the socket).
    ///
    /// # Errors
    /// As [`ControlClient::next_line`].
    pub fn wait_for(&mut self, pred: impl Fn(&Value) -> bool) -> std::io::Result<Option<Value>> {
        while let Some(v) = self.next_line()? {
            if pred(&v) {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_commands_answers_and_events() {
        let path = std::env::temp_dir().join(format!("control-{}", std::process::id()));
        let handler: Arc<Handler> = Arc::new(|name, _| match name {
            "status" => json!({"status": {"phase": "precopy"}}),
            other => json!({"error": format!("unknown command {other}")}),
        });
        let server = ControlServer::bind(&path, handler).unwrap();
        let mut client = ControlClient::connect(&path).unwrap();
        client.send(&json!({"cmd": "status"})).unwrap();
        assert_eq!(
            client.next_line().unwrap().unwrap(),
            json!({"status": {"phase": "precopy"}})
        );
        client.send(&json!({"cmd": "dance"})).unwrap();
        assert!(client.next_line().unwrap().unwrap()["error"].is_string());
        server.emit(&json!({"event": "switched"}));
        assert_eq!(
            client
                .wait_for(|v| v["event"] == "switched")
                .unwrap()
                .unwrap(),
            json!({"event": "switched"})
        );
        server.emit_sticky(&json!({"event": "completed"}));
        server.emit(&json!({"event": "round"}));
        let mut late = ControlClient::connect(&path).unwrap();
        late.send(&json!({"cmd": "status"})).unwrap();
        // The state it missed first, then the answer; not the passing event.
        assert_eq!(
            late.next_line().unwrap().unwrap(),
            json!({"event": "completed"})
        );
        assert!(late.next_line().unwrap().unwrap()["status"].is_object());
        std::io::Write::write_all(&mut client.writer, b"not json\n").unwrap();
        // (after the two events it got meanwhile)
        assert!(
            client
                .wait_for(|v| v.get("error").is_some())
                .unwrap()
                .unwrap()["error"]
                .as_str()
                .unwrap()
                .contains("not JSON")
        );
        drop(server);
        assert!(!path.exists(), "the socket file is removed");
    }

    #[test]
    fn test_private_socket_bounded_clients_and_a_stuck_one_never_blocks_emit() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("control-limits-{}", std::process::id()));
        let handler: Arc<Handler> = Arc::new(|_, _| json!({"ok": true}));
        let server = ControlServer::bind(&path, handler.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            matches!(
                ControlServer::bind(&path, handler),
                Err(ControlError::Bind(BindError::InUse(_)))
            ),
            "a live control socket is not taken over"
        );
        // A client that never reads, with a tiny receive buffer: its queue fills.
        let stuck = UnixStream::connect(&path).unwrap();
        let mut watcher = ControlClient::connect(&path).unwrap();
        watcher.send(&json!({"cmd": "status"})).unwrap();
        assert_eq!(watcher.next_line().unwrap().unwrap(), json!({"ok": true}));
        let big = json!({"event": "round", "pad": "x".repeat(2000)});
        // Every emit only queues: this loop ends whatever the stuck client does, and the
        // stuck one is cut off once its queue is full.
        for _ in 0..(QUEUE_LINES * 8) {
            server.emit(&big);
            let _ = watcher.next_line();
        }
        let clients = server.subscribers.lock().unwrap().clients.len();
        assert_eq!(
            clients, 1,
            "the stuck client was dropped, the reading one kept"
        );
        drop(stuck);
        // At most MAX_CLIENTS: the next one is told so.
        let mut others: Vec<ControlClient> = (1..MAX_CLIENTS)
            .map(|_| ControlClient::connect(&path).unwrap())
            .collect();
        for c in &mut others {
            c.send(&json!({"cmd": "status"})).unwrap();
            assert_eq!(c.next_line().unwrap().unwrap(), json!({"ok": true}));
        }
        let mut refused = ControlClient::connect(&path).unwrap();
        let answer = refused.next_line().unwrap().unwrap();
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("control clients"),
            "{answer}"
        );
        // Clients that left free their slots, with no event in between.
        drop(others);
        drop(watcher);
        let mut served = None;
        for _ in 0..500 {
            let mut c = ControlClient::connect(&path).unwrap();
            c.send(&json!({"cmd": "status"})).unwrap();
            if c.next_line().unwrap().unwrap() == json!({"ok": true}) {
                served = Some(c);
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(
            served.is_some(),
            "the slots of clients that left are never freed"
        );
        drop(server);
    }
}
