//! QMP, QEMU's control protocol, through the `qmp` crate (untyped JSON
//! values, so an event or field a newer QEMU adds never breaks the
//! stream). Every call has a timeout. QEMU is a local child of the agent
//! on a unix socket in the instance's dir, not a network peer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot reach QEMU's control socket {}: {reason}", path.display())]
    Connect { path: PathBuf, reason: String },
    #[error("QEMU refused or failed '{command}': {reason}")]
    Command { command: String, reason: String },
}

/// One QMP connection. The crate's reader task keeps it open for as long
/// as QEMU runs, even after the `Qmp` is dropped: keep one per QEMU and
/// share it (commands on one connection may run concurrently), never one
/// per call (a QMP socket serves one client at a time; the next would
/// wait for ever).
pub struct Qmp {
    client: qmp::Client,
}

/// Events QEMU sent since `Qmp::events` was called.
pub struct Events {
    stream: qmp::EventStream,
}

impl Events {
    /// The next event (name and data), or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<(String, Value)> {
        match tokio::time::timeout(timeout, self.stream.recv()).await {
            Ok(Ok(event)) => Some((event.name, event.data)),
            _ => None,
        }
    }
}

impl Qmp {
    /// Connect (retrying while QEMU starts and has not bound the socket
    /// yet) and negotiate capabilities; every later call ends within
    /// `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let builder =
                qmp::Client::builder(qmp::Endpoint::unix(path)).default_timeout(Some(timeout));
            match tokio::time::timeout_at(deadline, builder.connect()).await {
                Ok(Ok(client)) => return Ok(Qmp { client }),
                Ok(Err(e)) if tokio::time::Instant::now() < deadline => {
                    tracing::trace!("QMP not up yet: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(Err(e)) => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        reason: e.to_string(),
                    })
                }
                Err(_) => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        reason: format!("no answer within {}s", timeout.as_secs()),
                    })
                }
            }
        }
    }

    pub async fn execute(&self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.client
            .execute(command, args)
            .await
            .map_err(|e| QmpError::Command {
                command: command.to_string(),
                reason: e.to_string(),
            })
    }

    /// QEMU's run state: "running", "paused", "postmigrate", "inmigrate", ...
    pub async fn status(&self) -> Result<String, QmpError> {
        let reply = self.execute("query-status", None).await?;
        Ok(reply["status"].as_str().unwrap_or("unknown").to_string())
    }

    /// Subscribe before the command whose events are awaited.
    pub fn events(&self) -> Events {
        Events {
            stream: self.client.events(),
        }
    }
}
