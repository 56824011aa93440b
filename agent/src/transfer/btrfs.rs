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
/// the receiver holds) on `out`; the stream's bytes.
pub async fn send(
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
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| spawn_failed("send", snapshot, e))?;
    let (Some(mut stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(failed("send", snapshot, "no pipes".into()));
    };
    let errors = tokio::spawn(read_capped(stderr));
    let (mut sum, mut bytes) = (Xxh3::new(), 0u64);
    let mut buf = Vec::with_capacity(CHUNK);
    loop {
        buf.clear();
        let read = tokio::time::timeout(STALL_TIMEOUT, fill(&mut stdout, &mut buf)).await;
        let n = match read {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(failed("send", snapshot, e.to_string())),
            Err(_) => return Err(failed("send", snapshot, stalled())),
        };
        if n == 0 {
            break;
        }
        sum.update(&buf);
        bytes += n as u64;
        write_frame(out, &Piece::Data(buf.clone())).await?;
    }
    let status = tokio::time::timeout(COMMAND_TIMEOUT, child.wait()).await;
    let why = errors.await.unwrap_or_default();
    if !matches!(status, Ok(Ok(s)) if s.success()) {
        let why = format!("{} ({status:?})", why.trim());
        let _ = write_frame(out, &Piece::Failed(why.clone())).await;
        return Err(failed("send", snapshot, why));
    }
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
    cmd.arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| spawn_failed("receive", dir, e))?;
    let (Some(mut stdin), Some(stderr)) = (child.stdin.take(), child.stderr.take()) else {
        return Err(failed("receive", dir, "no pipes".into()));
    };
    let errors = tokio::spawn(read_capped(stderr));
    let (mut sum, mut bytes) = (Xxh3::new(), 0u64);
    let (sent_bytes, sent_sum) = loop {
        let frame = tokio::time::timeout(STALL_TIMEOUT, read_frame::<Piece>(recv, MAX_FRAME));
        match frame
            .await
            .map_err(|_| failed("receive", dir, stalled()))??
        {
            Piece::Data(data) => {
                reserve.check(data.len() as u64, "the btrfs stream of a rootfs")?;
                sum.update(&data);
                bytes += data.len() as u64;
                progress.fetch_add(data.len() as u64, Ordering::Relaxed);
                if let Err(e) = stdin.write_all(&data).await {
                    let why = errors.await.unwrap_or_default();
                    return Err(failed("receive", dir, format!("{e}: {}", why.trim())));
                }
            }
            Piece::End { bytes, checksum } => break (bytes, checksum),
            Piece::Failed(why) => return Err(BtrfsError::SenderFailed(why)),
        }
    };
    if (sent_bytes, sent_sum) != (bytes, sum.digest128()) {
        return Err(BtrfsError::Damaged(format!(
            "{bytes} bytes arrived, the sender sent {sent_bytes}, or their checksums differ"
        )));
    }
    drop(stdin);
    let status = tokio::time::timeout(COMMAND_TIMEOUT, child.wait()).await;
    let why = errors.await.unwrap_or_default();
    match status {
        Ok(Ok(s)) if s.success() => Ok(bytes),
        other => Err(failed(
            "receive",
            dir,
            format!("{} ({other:?})", why.trim()),
        )),
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

async fn read_capped<R: AsyncRead + Unpin>(from: R) -> String {
    let mut text = String::new();
    let _ = from.take(STDERR_CAP).read_to_string(&mut text).await;
    text
}

fn btrfs<const N: usize>(args: [&str; N]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("btrfs");
    cmd.args(args).kill_on_drop(true);
    cmd
}

/// Run a short btrfs command to its end within [`COMMAND_TIMEOUT`].
async fn run(
    mut cmd: tokio::process::Command,
    what: &'static str,
    path: &Path,
) -> Result<(), BtrfsError> {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(COMMAND_TIMEOUT, cmd.output())
        .await
        .map_err(|_| failed(what, path, format!("not done within {COMMAND_TIMEOUT:?}")))?
        .map_err(|e| spawn_failed(what, path, e))?;
    if output.status.success() {
        return Ok(());
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
