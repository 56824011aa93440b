//! A rootfs moved by btrfs itself: a read-only snapshot of the instance's
//! subvolume sent with `btrfs send` (the final pass incremental against
//! the first pass's snapshot, so its cost follows what changed, not the
//! size of the tree) and applied with `btrfs receive`. Through
//! btrfs-progs, as LXD and Incus do: no maintained crate writes or
//! applies the send stream (libbtrfsutil has no send).
//!
//! The stream travels as frames on the move's channel, each checked
//! against a cap, with its length and XXH3-128 in the last frame (QUIC
//! authenticates the bytes on the wire; the sum checks both ends'
//! handling). The receiver runs `btrfs receive --chroot`, so a stream's
//! paths cannot leave the directory it receives into, and refuses data
//! that would cross the disk reserve.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use ferry_transport::frame::{read_frame, write_frame, FrameError, MAX_FRAME};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use xxhash_rust::xxh3::Xxh3;

use super::space::{Reserve, SpaceError};

/// `statfs.f_type` of btrfs.
const BTRFS_SUPER_MAGIC: u64 = 0x9123_683E;
/// The inode number of every subvolume's root directory.
const SUBVOLUME_INODE: u64 = 256;
/// A subvolume command (create, snapshot, delete) ends within this.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// A send or receive that moves no byte for this long is stopped.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// What one data frame carries at most.
const CHUNK: usize = 256 << 10;
/// What of a command's stderr is kept for its error.
const STDERR_CAP: u64 = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum BtrfsError {
    #[error("btrfs {what} of {} failed: {why}", .path.display())]
    Command {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("the btrfs stream broke off: {0}")]
    Frame(#[from] FrameError),
    #[error("the sender's btrfs send failed: {0}")]
    SenderFailed(String),
    #[error("the btrfs stream arrived damaged: {0}; the move is rolled back, try it again")]
    Damaged(String),
    #[error("{0}")]
    Space(#[from] SpaceError),
}

/// One frame of a send stream on the channel.
#[derive(Debug, Serialize, Deserialize)]
enum Piece {
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    End { bytes: u64, checksum: u128 },
    Failed(String),
}

/// Whether `path` (or, while it does not exist, its nearest existing
/// ancestor) is on btrfs.
pub fn on_btrfs(path: &Path) -> bool {
    let existing = path.ancestors().find(|p| p.exists());
    existing
        .and_then(|p| rustix::fs::statfs(p).ok())
        .is_some_and(|s| s.f_type as u64 == BTRFS_SUPER_MAGIC)
}

/// Whether `path` is the root of a btrfs subvolume.
pub fn is_subvolume(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    on_btrfs(path)
        && std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.ino() == SUBVOLUME_INODE)
}

/// Whether btrfs-progs runs here (asked once).
pub async fn tools_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    if let Some(present) = PRESENT.get() {
        return *present;
    }
    let mut version = tokio::process::Command::new("btrfs");
    version.arg("--version");
    let present = run(version, "version check", Path::new("btrfs"))
        .await
        .is_ok();
    *PRESENT.get_or_init(|| present)
}

/// Whether a rootfs at `path` can be sent or received by btrfs: the
/// filesystem is btrfs and btrfs-progs runs.
pub async fn usable(path: &Path) -> bool {
    on_btrfs(path) && tools_present().await
}

/// A new rootfs at `path`: a subvolume where btrfs can move it later,
/// else nothing (the caller makes a directory). One that exists stays.
pub async fn make_root(path: &Path) -> Result<(), BtrfsError> {
    if path.exists() || !usable(path).await {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| failed("subvolume create", path, e.to_string()))?;
    }
    let mut create = btrfs(["subvolume", "create"]);
    create.arg(path);
    run(create, "subvolume create", path).await
}

/// A snapshot of subvolume `from` at `to` (read-only for a send).
pub async fn snapshot(from: &Path, to: &Path, read_only: bool) -> Result<(), BtrfsError> {
    let mut snap = btrfs(["subvolume", "snapshot"]);
    if read_only {
        snap.arg("-r");
    }
    snap.arg(from).arg(to);
    run(snap, "snapshot", from).await
}

/// Whether subvolume `path` holds other subvolumes: a snapshot leaves
/// their files out (they would arrive as empty directories).
pub async fn holds_subvolumes(path: &Path) -> Result<bool, BtrfsError> {
    let mut list = btrfs(["subvolume", "list", "-o"]);
    list.arg(path);
    let listed = output(list, "subvolume list", path).await?;
    Ok(!listed.trim().is_empty())
}

/// Remove `path`, a subvolume (read-only ones too) or a directory; gone
/// already is fine.
pub async fn remove(path: &Path) -> Result<(), BtrfsError> {
    if is_subvolume(path) {
        let mut delete = btrfs(["subvolume", "delete"]);
        delete.arg(path);
        return run(delete, "subvolume delete", path).await;
    }
    match tokio::fs::remove_dir_all(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(failed("removal", path, e.to_string()))
        }
        _ => Ok(()),
    }
}

/// Remove every subvolume and file below `dir`, then `dir` itself.
pub async fn remove_all_below(dir: &Path) -> Result<(), BtrfsError> {
    if let Ok(mut entries) = tokio::fs::read_dir(dir).await {
        while let Ok(Some(entry)) = entries.next_entry().await {
            remove(&entry.path()).await?;
        }
    }
    remove(dir).await
}

/// Send the read-only `snapshot` (incremental against `parent`, which
/// the receiver holds) on `out`; the stream's bytes. A failure is said
/// on the stream too, so the receiver's error names it.
pub async fn send(
    snapshot: &Path,
    parent: Option<&Path>,
    out: &mut quinn::SendStream,
) -> Result<u64, BtrfsError> {
    let result = send_stream(snapshot, parent, out).await;
    if let Err(e) = &result {
        if !matches!(e, BtrfsError::Frame(_)) {
            let _ = write_frame(out, &Piece::Failed(e.to_string())).await;
        }
    }
    result
}

async fn send_stream(
    snapshot: &Path,
    parent: Option<&Path>,
    out: &mut quinn::SendStream,
) -> Result<u64, BtrfsError> {
    let mut cmd = btrfs(["send", "-q"]);
    if let Some(parent) = parent {
        cmd.arg("-p").arg(parent);
    }
    cmd.arg(snapshot)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut process = Process::spawn(cmd, "send", snapshot)?;
    let Some(mut stdout) = process.child.stdout.take() else {
        return Err(process.failed("no pipe".into()).await);
    };
    let (mut sum, mut bytes) = (Xxh3::new(), 0u64);
    let mut buf = Vec::with_capacity(CHUNK);
    loop {
        buf.clear();
        let n = match tokio::time::timeout(STALL_TIMEOUT, fill(&mut stdout, &mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(process.failed(e.to_string()).await),
            Err(_) => return Err(process.failed(stalled()).await),
        };
        if n == 0 {
            break;
        }
        sum.update(&buf);
        bytes += n as u64;
        write_frame(out, &Piece::Data(buf.clone())).await?;
    }
    process.finish().await?;
    let checksum = sum.digest128();
    write_frame(out, &Piece::End { bytes, checksum }).await?;
    Ok(bytes)
}

/// Apply a send stream from `recv` below `dir` (created if missing),
/// counting its bytes in `progress`; the stream's bytes. The received
/// subvolume is named by the sender's snapshot; the caller checks it.
pub async fn receive(
    dir: &Path,
    recv: &mut quinn::RecvStream,
    progress: &AtomicU64,
    reserve: &Reserve,
) -> Result<u64, BtrfsError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| failed("receive", dir, e.to_string()))?;
    let mut cmd = btrfs(["receive", "-q", "--chroot"]);
    cmd.arg(dir).stdin(Stdio::piped()).stdout(Stdio::null());
    let mut process = Process::spawn(cmd, "receive", dir)?;
    let received = receive_into(&mut process, recv, progress, reserve).await;
    match received {
        Ok(bytes) => process.finish().await.map(|()| bytes),
        // Ended before the caller looks at (and removes) what it left.
        Err(e) => {
            let _ = process.child.kill().await;
            Err(e)
        }
    }
}

/// Feed the stream to a running `btrfs receive`; its bytes.
async fn receive_into(
    process: &mut Process,
    recv: &mut quinn::RecvStream,
    progress: &AtomicU64,
    reserve: &Reserve,
) -> Result<u64, BtrfsError> {
    let Some(mut stdin) = process.child.stdin.take() else {
        return Err(process.failed("no pipe".into()).await);
    };
    let (mut sum, mut bytes) = (Xxh3::new(), 0u64);
    let (sent_bytes, sent_sum) = loop {
        let frame = tokio::time::timeout(STALL_TIMEOUT, read_frame::<Piece>(recv, MAX_FRAME));
        let data = match frame.await {
            Ok(Ok(Piece::Data(data))) => data,
            Ok(Ok(Piece::End { bytes, checksum })) => break (bytes, checksum),
            Ok(Ok(Piece::Failed(why))) => return Err(BtrfsError::SenderFailed(why)),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(process.failed(stalled()).await),
        };
        reserve.check(data.len() as u64, "the btrfs stream of a rootfs")?;
        sum.update(&data);
        bytes += data.len() as u64;
        progress.fetch_add(data.len() as u64, Ordering::Relaxed);
        match tokio::time::timeout(STALL_TIMEOUT, stdin.write_all(&data)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(process.failed(e.to_string()).await),
            Err(_) => return Err(process.failed(stalled()).await),
        }
    };
    if (sent_bytes, sent_sum) != (bytes, sum.digest128()) {
        return Err(BtrfsError::Damaged(format!(
            "{bytes} bytes arrived, the sender sent {sent_bytes}, or their checksums differ"
        )));
    }
    Ok(bytes)
}

/// A running btrfs send or receive and what it writes to stderr.
struct Process {
    child: tokio::process::Child,
    stderr: Option<tokio::task::JoinHandle<String>>,
    what: &'static str,
    path: PathBuf,
}

impl Process {
    fn spawn(
        mut cmd: tokio::process::Command,
        what: &'static str,
        path: &Path,
    ) -> Result<Process, BtrfsError> {
        let mut child = cmd
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| spawn_failed(what, path, e))?;
        let stderr = child.stderr.take().map(|e| tokio::spawn(read_capped(e)));
        Ok(Process {
            child,
            stderr,
            what,
            path: path.to_path_buf(),
        })
    }

    /// Wait for its end (within [`COMMAND_TIMEOUT`], else killed); an
    /// error naming its stderr unless it succeeded.
    async fn finish(mut self) -> Result<(), BtrfsError> {
        match tokio::time::timeout(COMMAND_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(self.failed(status.to_string()).await),
            Ok(Err(e)) => Err(self.failed(e.to_string()).await),
            Err(_) => Err(self
                .failed(format!("not done within {COMMAND_TIMEOUT:?}"))
                .await),
        }
    }

    /// Kill it (it is no use any more) and name `why` and its stderr.
    async fn failed(&mut self, why: String) -> BtrfsError {
        let _ = self.child.start_kill();
        let stderr = match self.stderr.take() {
            // Killed, it closes stderr; the wait is bounded all the same.
            Some(task) => tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default(),
            None => String::new(),
        };
        let why = match stderr.trim() {
            "" => why,
            said => format!("{said} ({why})"),
        };
        failed(self.what, &self.path, why)
    }
}

/// Read until `buf` holds a chunk or the reader ends; what it read.
async fn fill<R: AsyncRead + Unpin>(from: &mut R, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    while buf.len() < CHUNK {
        let mut limited = (&mut *from).take((CHUNK - buf.len()) as u64);
        if limited.read_buf(buf).await? == 0 {
            break;
        }
    }
    Ok(buf.len())
}

/// The first [`STDERR_CAP`] bytes of `from`, read to its end: a pipe
/// closed early would kill the writer with SIGPIPE.
async fn read_capped<R: AsyncRead + Unpin>(mut from: R) -> String {
    let mut kept = Vec::new();
    let _ = (&mut from).take(STDERR_CAP).read_to_end(&mut kept).await;
    let _ = tokio::io::copy(&mut from, &mut tokio::io::sink()).await;
    String::from_utf8_lossy(&kept).into_owned()
}

fn btrfs<const N: usize>(args: [&str; N]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("btrfs");
    cmd.args(args).kill_on_drop(true);
    cmd
}

/// Run a short btrfs command to its end within [`COMMAND_TIMEOUT`].
async fn run(
    cmd: tokio::process::Command,
    what: &'static str,
    path: &Path,
) -> Result<(), BtrfsError> {
    output(cmd, what, path).await.map(drop)
}

/// As [`run`], its stdout.
async fn output(
    mut cmd: tokio::process::Command,
    what: &'static str,
    path: &Path,
) -> Result<String, BtrfsError> {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(COMMAND_TIMEOUT, cmd.output())
        .await
        .map_err(|_| failed(what, path, format!("not done within {COMMAND_TIMEOUT:?}")))?
        .map_err(|e| spawn_failed(what, path, e))?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let why = String::from_utf8_lossy(&output.stderr);
    Err(failed(
        what,
        path,
        format!("{} ({})", why.trim(), output.status),
    ))
}

fn failed(what: &'static str, path: &Path, why: String) -> BtrfsError {
    BtrfsError::Command {
        what,
        path: path.to_path_buf(),
        why,
    }
}

fn spawn_failed(what: &'static str, path: &Path, e: std::io::Error) -> BtrfsError {
    failed(
        what,
        path,
        format!("cannot run btrfs ({e}); install btrfs-progs"),
    )
}

fn stalled() -> String {
    format!("no data moved for {STALL_TIMEOUT:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_off_btrfs_is_no_subvolume() {
        let dir = tempfile::tempdir().unwrap();
        if on_btrfs(dir.path()) {
            return;
        }
        assert!(!is_subvolume(dir.path()));
        assert!(!on_btrfs(&dir.path().join("not/there/yet")));
    }

    #[tokio::test]
    async fn a_short_read_is_topped_up_to_a_chunk() {
        let data = vec![3u8; CHUNK + 10];
        let mut reader = &data[..];
        let mut buf = Vec::new();
        assert_eq!(fill(&mut reader, &mut buf).await.unwrap(), CHUNK);
        buf.clear();
        assert_eq!(fill(&mut reader, &mut buf).await.unwrap(), 10);
        buf.clear();
        assert_eq!(fill(&mut reader, &mut buf).await.unwrap(), 0);
    }
}
