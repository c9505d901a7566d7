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
//! that connects after them. Clients are served by one small thread each (a control socket has a handful); a client
//! that stops reading is dropped when a write to it fails, never blocking the daemon.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use thiserror::Error;

/// Longest command line accepted.
const MAX_COMMAND_BYTES: u64 = 4096;
/// How long a write to a client may block before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_millis(200);

/// Errors setting up the control socket.
#[derive(Debug, Error)]
pub enum ControlError {
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Binding failed.
    #[error("cannot listen on {path}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
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
    clients: Vec<UnixStream>,
    /// Events that mark a state (`switched`, `completed`, …), replayed to new clients.
    sticky: Vec<Value>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControlServer({})", self.path.display())
    }
}

impl ControlServer {
    /// Listens on `path` (a stale socket is replaced) and serves clients on background
    /// threads with `handler`.
    ///
    /// # Errors
    /// The path holds something else, or binding failed.
    pub fn bind(path: &Path, handler: Arc<Handler>) -> Result<Arc<Self>, ControlError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ControlError::NotASocket(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
            path: path.to_owned(),
            source,
        })?;
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
            .map_err(|source| ControlError::Bind {
                path: path.to_owned(),
                source,
            })?;
        Ok(server)
    }

    fn serve(&self, conn: UnixStream, handler: Arc<Handler>) {
        let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
        let (Ok(reader), Ok(writer)) = (conn.try_clone(), conn.try_clone()) else {
            return;
        };
        {
            // Under the lock `emit` takes: a client sees every sticky event exactly once.
            let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
            let mut conn = conn;
            if subscribers
                .sticky
                .iter()
                .all(|event| write_line(&mut conn, event).is_ok())
            {
                subscribers.clients.push(conn);
            }
        }
        std::thread::spawn(move || {
            let mut writer = writer;
            let mut lines = BufReader::new(reader);
            loop {
                let mut line = String::new();
                let read = std::io::Read::take(&mut lines, MAX_COMMAND_BYTES).read_line(&mut line);
                let answer = match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) if !line.ends_with('\n') => {
                        json!({"error": format!("a command longer than {MAX_COMMAND_BYTES} bytes")})
                    }
                    Ok(_) => match serde_json::from_str::<Value>(&line) {
                        Ok(cmd) => match cmd.get("cmd").and_then(Value::as_str) {
                            Some(name) => handler(name, &cmd),
                            None => json!({"error": "no \"cmd\" field"}),
                        },
                        Err(e) => json!({"error": format!("not JSON: {e}")}),
                    },
                };
                if write_line(&mut writer, &answer).is_err() {
                    return;
                }
            }
        });
    }

    /// Sends an event to every client; clients that cannot take it are dropped.
    pub fn emit(&self, event: &Value) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subscribers
            .clients
            .retain_mut(|c| write_line(c, event).is_ok());
    }

    /// [`ControlServer::emit`] for an event that marks a state: clients that connect later
    /// get it first (a VMM that subscribes after the switch still learns of it).
    pub fn emit_sticky(&self, event: &Value) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subscribers
            .clients
            .retain_mut(|c| write_line(c, event).is_ok());
        subscribers.sticky.push(event.clone());
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
}
