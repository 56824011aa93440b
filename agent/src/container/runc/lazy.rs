//! `runc checkpoint --lazy-pages`: CRIU dumps all but the memory pages of
//! the paused container, then serves those, the container still paused,
//! to the target's lazy-pages daemon until it has taken every one.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::io::AsyncReadExt;

use super::{with_criu_reasons, Runc, RuncError};

/// A lazy dump whose page server listens; `done` ends with the
/// checkpoint (once the target has every page, or failed).
pub struct LazyCheckpoint {
    pub done: BoxFuture<'static, Result<(), RuncError>>,
    /// runc's pid: its process tree (runc, CRIU) is the dump.
    pub pid: Option<u32>,
}

impl Runc {
    /// Start the lazy dump of the paused container `id`, its page server
    /// on `server`; returns once CRIU says the server is ready (the byte
    /// runc writes to `--status-fd`), or with the checkpoint's error.
    pub async fn checkpoint_lazy(
        &self,
        id: &str,
        (images, work): (&Path, &Path),
        server: SocketAddr,
        log: &Path,
    ) -> Result<LazyCheckpoint, RuncError> {
        let (ready, status) = std::io::pipe().map_err(RuncError::Spawn)?;
        // runc inherits the write end: no close-on-exec on it.
        rustix::io::fcntl_setfd(&status, rustix::io::FdFlags::empty())
            .map_err(|e| RuncError::Spawn(e.into()))?;
        let mut cmd = self.command(log);
        cmd.args(["checkpoint", "--lazy-pages", "--leave-running"])
            .arg("--image-path")
            .arg(images)
            .arg("--work-path")
            .arg(work)
            .arg("--page-server")
            .arg(server.to_string())
            .arg("--status-fd")
            .arg(status.as_raw_fd().to_string())
            .arg(id)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().map_err(RuncError::Spawn)?;
        let pid = child.id();
        drop(status);
        let mut ready = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(ready))
            .map_err(RuncError::Spawn)?;
        let (id, log, dump_log) = (id.to_string(), log.to_path_buf(), work.join("dump.log"));
        let timeout = self.timeout;
        let mut finished = async move {
            let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
                Ok(out) => out.map_err(RuncError::Spawn)?,
                Err(_) => {
                    // Its CRIU (which holds the copy's tasks) goes too, not
                    // only runc, which the drop kills.
                    if let Some(pid) = pid {
                        crate::driver::end_process_tree(pid);
                    }
                    return Err(timed_out(&id, timeout, &log));
                }
            };
            match out.status.success() {
                true => Ok(()),
                false => Err(failed(&id, &out.stderr, &dump_log, &log)),
            }
        }
        .boxed();
        tokio::select! {
            byte = ready.read_u8() => match byte {
                Ok(_) => Ok(LazyCheckpoint { done: finished, pid }),
                // Closed without the byte: runc ended; its reasons.
                Err(_) => Err((&mut finished).await.err().unwrap_or_else(|| not_ready(work))),
            },
            ended = &mut finished => Err(ended.err().unwrap_or_else(|| not_ready(work))),
        }
    }
}

fn timed_out(id: &str, after: std::time::Duration, log: &Path) -> RuncError {
    RuncError::TimedOut {
        op: "checkpoint",
        id: id.to_string(),
        after,
        log: log.to_path_buf(),
    }
}

fn failed(id: &str, stderr: &[u8], dump_log: &Path, log: &Path) -> RuncError {
    let error = RuncError::Failed {
        op: "checkpoint",
        id: id.to_string(),
        message: super::last_line(stderr),
        log: log.to_path_buf(),
    };
    with_criu_reasons(error, dump_log, log)
}

fn not_ready(work: &Path) -> RuncError {
    RuncError::File {
        path: PathBuf::from(work),
        source: std::io::Error::other("the lazy dump ended before its page server was ready"),
    }
}
