//! Moving a directory tree (a rootfs, a CRIU image directory) over a QUIC
//! stream, checksummed end to end. Two passes: a whole one sends every
//! entry; a final one (after the freeze) sends only what changed since a
//! first whole pass and names what is gone, for the receiver to delete,
//! so its cost follows the changes, not the tree. It does so only while
//! the receiver's tree is still what that first pass wrote (the receiver
//! keeps the pass's id in memory, and a final pass takes it away); else
//! the receiver empties its tree and gets all of it. The receiver treats the sender as untrusted: no absolute
//! paths, no `..`, no writing through symlinks (metadata goes on by file
//! descriptor), bounded frames. The sender treats the tree as untrusted (a
//! running container may change it): files are opened beneath the root
//! without following symlinks (`beneath.rs`), and the final pass resends
//! every file whose inode or ctime moved since the first pass (`Stamps`),
//! which a container cannot fake.

pub mod beneath;
mod receive;
mod scan;
mod send;

pub use receive::{clear, receive, receive_counted, sync, Writing};
pub use scan::scan;
pub use send::send;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use ferry_transport::frame::{read_frame, write_frame, FrameError, MAX_FRAME};
use ring::digest::Context;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    Dir,
    File {
        size: u64,
    },
    Symlink {
        target: String,
    },
    /// Another name of the file at `target` (sent before it in the tree).
    Hardlink {
        target: String,
    },
    Device {
        block: bool,
        rdev: u64,
    },
    Fifo,
    Socket,
}

/// An extended attribute (`user.*`, `security.capability`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    pub name: String,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// One entry of a tree, relative to its root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i128,
    /// Inode and change time on the sender, for [`Stamps`]; not compared
    /// with the receiver's (its own differ).
    pub ino: u64,
    pub ctime_ns: i128,
    pub xattrs: Vec<Xattr>,
}

/// What the sender saw of each entry at a first pass: inode and ctime. A
/// container can set a file's mtime back, not its ctime, and a file put in
/// another's place has another inode. `pass` names that first pass: the
/// receiver learns it at the pass's end and, while its tree is still just
/// what that pass wrote, the final pass sends it only what changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stamps {
    pass: u128,
    /// Wall-clock ns, a margin before the first pass's scan began: an
    /// entry whose ctime is not older counts as changed. The kernel stamps
    /// ctime from a clock that ticks every few ms, so a file changed again
    /// in the tick of its scan keeps its ctime; one changed before the scan
    /// began cannot be.
    settled_before: i128,
    seen: BTreeMap<String, (u64, i128)>,
}

/// How far before a first pass's scan an entry's ctime must be for the
/// final pass to trust it: ten times the kernel's coarsest clock tick
/// (10 ms at HZ=100).
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(100);
const SETTLE_NS: i128 = SETTLE.as_nanos() as i128;

impl Stamps {
    /// The stamps of `entries`, scanned from `started_ns` (wall clock) on.
    pub fn of(entries: &[Entry], started_ns: i128) -> Stamps {
        let mut pass = [0u8; 16];
        // A fixed pass id only risks a fallback to a full resend never
        // being taken; the receiver still holds exactly one pass per job.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut pass);
        Stamps {
            pass: u128::from_le_bytes(pass),
            settled_before: started_ns - SETTLE_NS,
            seen: entries
                .iter()
                .map(|e| (e.path.clone(), (e.ino, e.ctime_ns)))
                .collect(),
        }
    }

    /// The pass these stamps are of.
    pub fn pass(&self) -> u128 {
        self.pass
    }

    /// `path` was not sent after all (it changed under the first pass).
    fn forget(&mut self, path: &str) {
        self.seen.remove(path);
    }

    /// Whether `entry` is not what the first pass saw and sent at its path.
    pub(super) fn moved(&self, entry: &Entry) -> bool {
        // A filesystem that keeps whole seconds (ext4 with small inodes)
        // stamps a change at 10.6 s as 10.0: then the margin is 2 s.
        let coarse = entry.ctime_ns % 1_000_000_000 == 0;
        let settled_before = match coarse {
            true => self.settled_before - 2_000_000_000,
            false => self.settled_before,
        };
        self.seen.get(&entry.path) != Some(&(entry.ino, entry.ctime_ns))
            || entry.ctime_ns >= settled_before
    }

    /// What a final pass sends, given the tree now (`entries`): the entries
    /// that moved since the first pass, and the parent directory of each
    /// (its mtime moves on the receiver as the child is replaced), and the
    /// paths the first pass sent that are gone, children first.
    pub fn changes(&self, entries: &[Entry]) -> (BTreeSet<String>, Vec<String>) {
        let mut send = BTreeSet::new();
        for entry in entries.iter().filter(|e| self.moved(e)) {
            if let Some((parent, _)) = entry.path.rsplit_once('/') {
                send.insert(parent.to_string());
            }
            send.insert(entry.path.clone());
        }
        let now: BTreeSet<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        let mut removed: Vec<String> = self
            .seen
            .keys()
            .filter(|p| !now.contains(p.as_str()))
            .cloned()
            .collect();
        for path in &removed {
            if let Some((parent, _)) = path.rsplit_once('/') {
                if now.contains(parent) {
                    send.insert(parent.to_string());
                }
            }
        }
        removed.sort_by(|a, b| b.cmp(a));
        (send, removed)
    }
}

/// Wall-clock ns now (for [`Stamps::of`]).
fn wall_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

impl Entry {
    /// Same kind, size, target, mode, owner and extended attributes;
    /// mtimes count for files only (a directory's changes as children
    /// arrive).
    pub fn matches(&self, other: &Entry) -> bool {
        self.path == other.path
            && self.kind == other.kind
            && self.mode == other.mode
            && self.uid == other.uid
            && self.gid == other.gid
            && self.xattrs == other.xattrs
            && (!matches!(self.kind, EntryKind::File { .. }) || self.mtime_ns == other.mtime_ns)
    }
}

/// Paths per [`Frame::Changes`]: a final pass that deletes millions of
/// files says so in many frames, each far below the frame cap.
const PATHS_PER_FRAME: usize = 2_000;

#[derive(Debug, Serialize, Deserialize)]
enum Frame {
    /// Part of a final pass's list of what the first pass `pass` sent
    /// that is gone (none: the sender has no first pass), answered by
    /// [`Frame::Holds`] once the `last` part arrived.
    Changes {
        pass: Option<u128>,
        removed: Vec<String>,
        last: bool,
    },
    /// The receiver's tree is what that first pass wrote (then the sender
    /// sends what changed), or not (then it emptied its tree, and the
    /// sender sends all of it).
    Holds(bool),
    Entry(Entry),
    // As bytes, not a sequence of u8: serde's default costs ~35x more to
    // encode and decode (measured: 280 ms vs 8 ms per 64 MiB, release).
    Chunk(#[serde(with = "serde_bytes")] Vec<u8>),
    /// This many bytes of a sparse file's hole (zeros, not stored).
    Hole(u64),
    /// End of the current file, with its SHA-256.
    FileEnd {
        sha256: String,
    },
    /// End of the tree: totals to check against what arrived, and the
    /// root directory's own owner, mode and times.
    End {
        files: u64,
        bytes: u64,
        root: Box<Entry>,
        pass: u128,
    },
    /// The other side gave up, and why (instead of a bare end of stream).
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("transfer stream failed: {0}")]
    Frame(#[from] FrameError),
    #[error("peer sent an unsafe path '{0}'")]
    UnsafePath(String),
    #[error("checksum mismatch for {path}: sent {sent}, received {received}")]
    Checksum {
        path: String,
        sent: String,
        received: String,
    },
    #[error("transfer protocol violation: {0}")]
    Protocol(String),
    #[error("background task failed: {0}")]
    Task(String),
    #[error("the peer neither sent nor took anything for {}s", .0.as_secs())]
    Stalled(std::time::Duration),
    #[error("the other side failed: {0}")]
    PeerFailed(String),
    #[error(transparent)]
    Space(#[from] crate::transfer::space::SpaceError),
}

impl TreeError {
    /// A failure of this side, which the peer cannot know about unless it
    /// is told.
    fn is_local(&self) -> bool {
        !matches!(
            self,
            TreeError::Frame(_) | TreeError::Stalled(_) | TreeError::PeerFailed(_)
        )
    }
}

/// A peer that stops sending in the middle of a tree fails the transfer
/// after this (the connection's keep-alives would keep it open forever).
const FRAME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// One frame out, within [`FRAME_TIMEOUT`]: a peer that stops reading
/// (flow control) fails the transfer instead of holding this side (and the
/// instance lock it may hold) forever.
async fn send_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), TreeError> {
    tokio::time::timeout(FRAME_TIMEOUT, write_frame(send, frame))
        .await
        .map_err(|_| TreeError::Stalled(FRAME_TIMEOUT))??;
    Ok(())
}

async fn next_frame(recv: &mut quinn::RecvStream) -> Result<Frame, TreeError> {
    let frame = tokio::time::timeout(FRAME_TIMEOUT, read_frame::<Frame>(recv, MAX_FRAME))
        .await
        .map_err(|_| TreeError::Stalled(FRAME_TIMEOUT))??;
    match frame {
        Frame::Failed(reason) => Err(TreeError::PeerFailed(reason)),
        frame => Ok(frame),
    }
}

/// Why the other side gave up, if it said so: for a sender whose writes
/// failed because the receiver stopped reading (a sender without a delta
/// reads nothing while it sends).
pub async fn peer_failure(recv: &mut quinn::RecvStream) -> Option<String> {
    let wait = std::time::Duration::from_secs(5);
    match tokio::time::timeout(wait, read_frame::<Frame>(recv, MAX_FRAME)).await {
        Ok(Ok(Frame::Failed(reason))) => Some(reason),
        _ => None,
    }
}

/// Pass `result` on, first telling the peer why this side failed, so its
/// error names the cause too (best effort: a broken stream reaches nobody).
async fn tell_peer<T>(
    send: &mut quinn::SendStream,
    result: Result<T, TreeError>,
) -> Result<T, TreeError> {
    if let Err(e) = &result {
        if e.is_local() {
            let _ = send_frame(send, &Frame::Failed(e.to_string())).await;
        }
    }
    result
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TreeError + 'a {
    move |source| TreeError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What was moved, and the id of the pass that moved it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    pub files: u64,
    pub bytes: u64,
    pub pass: u128,
}

/// Which pass a receiver takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// The whole tree, written over what is there.
    Whole,
    /// A final pass: what changed since a first pass. `holds`: the id of
    /// the first pass whose tree this root still is, untouched since.
    Changes { holds: Option<u128> },
}

/// Bytes of file content under `root` (0 if it cannot be read).
pub fn size_of(root: &Path) -> u64 {
    scan(root)
        .map(|entries| {
            entries
                .iter()
                .map(|e| match e.kind {
                    EntryKind::File { size } => size,
                    _ => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// `path` is relative and stays inside the root.
fn safe_relative(path: &str) -> Result<PathBuf, TreeError> {
    let p = Path::new(path);
    if path.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(TreeError::UnsafePath(path.to_string()));
    }
    Ok(p.to_path_buf())
}

/// Refuse to write below a symlink: a hostile sender could otherwise send
/// `link -> /etc` then `link/passwd`.
fn check_parents(root: &Path, rel: &Path) -> Result<(), TreeError> {
    let mut at = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for part in parent.components() {
            at.push(part);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(TreeError::UnsafePath(rel.to_string_lossy().into_owned()))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// A hole of `len` bytes in a file's checksum (both sides hash the same
/// stream: data as it comes, each hole as a marker and its length).
fn hash_hole(context: &mut Context, len: u64) {
    context.update(b"\0hole\0");
    context.update(&len.to_le_bytes());
}

/// The hex SHA-256 a finished `context` gives.
pub fn sha256_hex(context: Context) -> String {
    context
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TreeError> + Send + 'static,
) -> Result<T, TreeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TreeError::Task(e.to_string()))?
}

fn remove_any(path: &Path) -> Result<(), TreeError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).map_err(io("remove", path)),
        Ok(_) => std::fs::remove_file(path).map_err(io("remove", path)),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, size: u64, mtime_ns: i128) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::File { size },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns,
            ino: 1,
            ctime_ns: 1,
            xattrs: Vec::new(),
        }
    }

    fn stamped(path: &str, ino: u64, ctime_ns: i128) -> Entry {
        Entry {
            ino,
            ctime_ns,
            ..entry(path, 1, 1)
        }
    }

    /// First-pass stamps of `entries`, scanned long after they last changed.
    fn first_pass(entries: &[Entry]) -> Stamps {
        Stamps::of(entries, 100 * SETTLE_NS)
    }

    #[test]
    fn a_final_pass_sends_what_moved_with_its_directory_and_lists_what_is_gone() {
        let first = [
            stamped("a", 1, 1),
            stamped("d", 2, 1),
            stamped("d/x", 3, 1),
            stamped("d/y", 4, 1),
            stamped("e", 5, 1),
            stamped("e/z", 6, 1),
        ];
        let stamps = first_pass(&first);
        // d/x rewritten (ctime), d/y replaced (inode), e/z deleted, n new.
        let now = [
            stamped("a", 1, 1),
            stamped("d", 2, 1),
            stamped("d/x", 3, 2),
            stamped("d/y", 9, 1),
            stamped("e", 5, 1),
            stamped("n", 7, 1),
        ];
        let (send, removed) = stamps.changes(&now);
        let send: Vec<&str> = send.iter().map(String::as_str).collect();
        assert_eq!(send, ["d", "d/x", "d/y", "e", "n"]);
        assert_eq!(removed, ["e/z"]);
    }

    #[test]
    fn nothing_changed_sends_nothing() {
        let first = [stamped("a", 1, 1), stamped("b", 2, 1)];
        let (send, removed) = first_pass(&first).changes(&first);
        assert!(send.is_empty() && removed.is_empty());
    }

    #[test]
    fn an_entry_changed_about_when_the_first_pass_scanned_it_is_sent_again() {
        let scanned_from = 100 * SETTLE_NS;
        // Its ctime may not move again if it changes within the same tick.
        let whole_second = 9_000_000_000; // 0.9 s before the margin
        let first = [
            stamped("old", 1, 1),
            stamped("fresh", 2, scanned_from - 5),
            stamped("seconds", 3, whole_second),
        ];
        let (send, _) = Stamps::of(&first, scanned_from).changes(&first);
        let send: Vec<&str> = send.iter().map(String::as_str).collect();
        assert_eq!(send, ["fresh", "seconds"]);
    }

    #[test]
    fn removed_paths_come_children_first() {
        let first = [
            stamped("d", 1, 1),
            stamped("d/e", 2, 1),
            stamped("d/e/f", 3, 1),
        ];
        let (_, removed) = first_pass(&first).changes(&[]);
        assert_eq!(removed, ["d/e/f", "d/e", "d"]);
    }

    #[test]
    fn a_file_the_first_pass_skipped_is_sent_by_the_final_pass() {
        let first = [stamped("a", 1, 1), stamped("b", 2, 1)];
        let mut stamps = first_pass(&first);
        stamps.forget("b");
        let (send, removed) = stamps.changes(&first);
        let send: Vec<&str> = send.iter().map(String::as_str).collect();
        assert_eq!(send, ["b"]);
        assert!(removed.is_empty());
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./a"] {
            assert!(safe_relative(bad).is_err(), "{bad}");
        }
        assert!(safe_relative("bin/sh").is_ok());
    }

    #[test]
    fn writing_below_a_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("link")).unwrap();
        assert!(check_parents(dir.path(), Path::new("link/passwd")).is_err());
        assert!(check_parents(dir.path(), Path::new("other/passwd")).is_ok());
    }

    #[test]
    fn scan_lists_parents_before_children_with_kinds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join("bin/busybox"), b"elf").unwrap();
        std::os::unix::fs::symlink("busybox", dir.path().join("bin/sh")).unwrap();
        let entries = scan(dir.path()).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["bin", "bin/busybox", "bin/sh"]);
        assert_eq!(entries[1].kind, EntryKind::File { size: 3 });
        assert_eq!(
            entries[2].kind,
            EntryKind::Symlink {
                target: "busybox".into()
            }
        );
    }
}
