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
//! Clients are served by one small thread each (a control socket has a handful); a client
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
    clients: Mutex<Vec<UnixStream>>,
    path: PathBuf,
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
            clients: Mutex::new(Vec::new()),
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
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
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
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients.retain_mut(|c| write_line(c, event).is_ok());
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
        std::io::Write::write_all(&mut client.writer, b"not json\n").unwrap();
        assert!(
            client.next_line().unwrap().unwrap()["error"]
                .as_str()
                .unwrap()
                .contains("not JSON")
        );
        drop(server);
        assert!(!path.exists(), "the socket file is removed");
    }
}
