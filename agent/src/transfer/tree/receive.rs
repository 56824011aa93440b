//! The receiving side of a tree. The sender is untrusted: paths stay
//! relative and below no symlink, files are created new (never opened
//! through a link), and modes, owners and times go on by file descriptor,
//! so an entry the sender replaced by a symlink changes nothing outside
//! the root.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ring::digest::{Context, SHA256};

use crate::transfer::space::Reserve;

use super::{
    beneath, blocking, check_parents, io, next_frame, remove_any, safe_relative, send_frame,
    sha256_hex, tell_peer, Entry, EntryKind, Frame, Pass, Transferred, TreeError,
};

fn system_time(ns: i128) -> std::time::SystemTime {
    let secs = ns.div_euclid(1_000_000_000);
    let nanos = ns.rem_euclid(1_000_000_000) as u32;
    match u64::try_from(secs) {
        Ok(secs) => std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos),
        Err(_) => std::time::UNIX_EPOCH,
    }
}

/// Owner, mode, extended attributes and mtime of an entry, through its
/// open descriptor. In this order: a chown clears file capabilities, and
/// setting attributes must not move the mtime again.
fn apply_by_fd(file: &std::fs::File, path: &Path, entry: &Entry) -> Result<(), TreeError> {
    std::os::unix::fs::fchown(file, Some(entry.uid), Some(entry.gid)).map_err(io("chown", path))?;
    file.set_permissions(std::fs::Permissions::from_mode(entry.mode))
        .map_err(io("chmod", path))?;
    set_xattrs(entry, path, |name, value| {
        rustix::fs::fsetxattr(file, name, value, rustix::fs::XattrFlags::empty())
    })?;
    file.set_modified(system_time(entry.mtime_ns))
        .map_err(io("set mtime", path))?;
    Ok(())
}

/// A file created new at `path` (`rel` beneath `root`), never through
/// whatever was at the path.
fn create_new(
    root: PathBuf,
    rel: PathBuf,
    path: PathBuf,
) -> impl FnOnce() -> Result<std::fs::File, TreeError> {
    move || {
        check_parents(&root, &rel)?;
        remove_any(&path)?;
        std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io("create", &path))
    }
}

/// Every extended attribute of `entry`, through `set` (by descriptor or by
/// path).
fn set_xattrs(
    entry: &Entry,
    path: &Path,
    set: impl Fn(&str, &[u8]) -> rustix::io::Result<()>,
) -> Result<(), TreeError> {
    for x in &entry.xattrs {
        set(x.name.as_str(), &x.value).map_err(|e| io("set xattr", path)(e.into()))?;
    }
    Ok(())
}

/// The same for what cannot be opened safely (links, device nodes, FIFOs,
/// sockets): by path, right after this receiver made it, never following
/// the last component.
fn apply_by_path(path: &Path, entry: &Entry) -> Result<(), TreeError> {
    std::os::unix::fs::lchown(path, Some(entry.uid), Some(entry.gid)).map_err(io("chown", path))?;
    if !matches!(entry.kind, EntryKind::Symlink { .. }) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(entry.mode))
            .map_err(io("chmod", path))?;
    }
    set_xattrs(entry, path, |name, value| {
        rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty())
    })
}

/// A device node, FIFO or socket at `path`.
fn make_node(path: &Path, entry: &Entry) -> Result<(), TreeError> {
    use rustix::fs::{FileType, Mode};
    let (file_type, dev) = match entry.kind {
        EntryKind::Device { block: true, rdev } => (FileType::BlockDevice, rdev),
        EntryKind::Device { block: false, rdev } => (FileType::CharacterDevice, rdev),
        EntryKind::Fifo => (FileType::Fifo, 0),
        EntryKind::Socket => (FileType::Socket, 0),
        _ => return Err(TreeError::Protocol(format!("{} is not a node", entry.path))),
    };
    let mode = Mode::from_raw_mode(entry.mode & 0o777);
    rustix::fs::mknodat(rustix::fs::CWD, path, file_type, mode, dev)
        .map_err(|e| io("mknod", path)(e.into()))
}

/// Another name for a file this tree already has.
fn make_hardlink(root: &Path, path: &Path, target: &str) -> Result<(), TreeError> {
    let rel = safe_relative(target)?;
    check_parents(root, &rel)?;
    let original = root.join(&rel);
    // Never a link to a symlink (or through one): only to a plain file.
    if !std::fs::symlink_metadata(&original).is_ok_and(|m| m.is_file()) {
        return Err(TreeError::UnsafePath(target.to_string()));
    }
    std::fs::hard_link(&original, path).map_err(io("link", path))
}

/// Make a directory, link or node entry at `path` (`rel` below `root`),
/// replacing what was there; never below a symlink.
fn place(root: &Path, rel: &Path, path: &Path, entry: &Entry) -> Result<(), TreeError> {
    check_parents(root, rel)?;
    if let EntryKind::Dir = entry.kind {
        if std::fs::symlink_metadata(path).is_ok_and(|m| !m.is_dir()) {
            remove_any(path)?;
        }
        return std::fs::create_dir_all(path).map_err(io("mkdir", path));
    }
    remove_any(path)?;
    match &entry.kind {
        EntryKind::Symlink { target } => {
            std::os::unix::fs::symlink(target, path).map_err(io("symlink", path))?
        }
        EntryKind::Hardlink { target } => return make_hardlink(root, path, target),
        _ => make_node(path, entry)?,
    }
    apply_by_path(path, entry)
}

/// How a received tree is written: every file byte added to `progress`
/// as it arrives; with `reserve`, a file that would cross the disk
/// reserve refused before it is created; with `synced`, every file and
/// directory synced as it completes (else the caller syncs, with [`sync`],
/// before anything committed depends on them).
#[derive(Clone, Copy)]
pub struct Writing<'a> {
    pub progress: &'a AtomicU64,
    pub reserve: Option<&'a Reserve>,
    pub synced: bool,
}

impl<'a> Writing<'a> {
    pub fn synced(progress: &'a AtomicU64, reserve: &'a Reserve) -> Self {
        Writing {
            progress,
            reserve: Some(reserve),
            synced: true,
        }
    }

    pub fn unsynced(progress: &'a AtomicU64, reserve: &'a Reserve) -> Self {
        Writing {
            synced: false,
            ..Writing::synced(progress, reserve)
        }
    }
}

/// Receive a tree into `root` (created if missing), synced, as `pass`
/// says: the whole tree, or a final pass (what is gone deleted first).
pub async fn receive(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    root: &Path,
    pass: Pass,
) -> Result<Transferred, TreeError> {
    let writing = Writing {
        progress: &AtomicU64::new(0),
        reserve: None,
        synced: true,
    };
    receive_counted(send, recv, root, pass, writing).await
}

/// [`receive`], written as `writing` says.
pub async fn receive_counted(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    root: &Path,
    pass: Pass,
    writing: Writing<'_>,
) -> Result<Transferred, TreeError> {
    let result = receive_tree(send, recv, root, pass, writing).await;
    tell_peer(send, result).await
}

/// Make everything written on `root`'s filesystem durable (one `syncfs`,
/// after an unsynced receive).
pub async fn sync(root: &Path) -> Result<(), TreeError> {
    let root = root.to_path_buf();
    blocking(move || {
        let dir = std::fs::File::open(&root).map_err(io("open", &root))?;
        rustix::fs::syncfs(&dir).map_err(|e| io("sync", &root)(e.into()))
    })
    .await
}

async fn receive_tree(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    root: &Path,
    pass: Pass,
    writing: Writing<'_>,
) -> Result<Transferred, TreeError> {
    let owned = root.to_path_buf();
    let root_fd = blocking(move || {
        std::fs::create_dir_all(&owned).map_err(io("create", &owned))?;
        beneath::root(&owned)
            .map(Arc::new)
            .map_err(io("open", &owned))
    })
    .await?;
    if let Pass::Changes { holds } = pass {
        answer_changes(send, recv, root, holds).await?;
    }
    let mut total = Transferred::default();
    let mut dirs: Vec<Entry> = Vec::new();
    loop {
        let entry = match next_frame(recv).await? {
            Frame::Entry(entry) => entry,
            Frame::End {
                files,
                bytes,
                root,
                pass,
            } => {
                if (files, bytes) != (total.files, total.bytes) {
                    return Err(TreeError::Protocol(format!(
                        "sender counted {files} files / {bytes} bytes, received {} / {}",
                        total.files, total.bytes
                    )));
                }
                dirs.insert(
                    0,
                    Entry {
                        path: String::new(),
                        ..*root
                    },
                );
                total.pass = pass;
                break;
            }
            other => {
                return Err(TreeError::Protocol(format!(
                    "expected Entry, got {other:?}"
                )))
            }
        };
        let rel = safe_relative(&entry.path)?;
        let path = root.join(&rel);
        let owned_root = root.to_path_buf();
        match entry.kind.clone() {
            EntryKind::File { size } => {
                if let Some(reserve) = writing.reserve {
                    reserve.check(size, &format!("receiving {}", entry.path))?;
                }
                let file = blocking(create_new(owned_root, rel, path.clone())).await?;
                let received = receive_file(recv, (file, path), entry, size, writing).await?;
                total.files += 1;
                total.bytes += received;
            }
            EntryKind::Dir => {
                let dir = entry.clone();
                blocking(move || place(&owned_root, &rel, &path, &dir)).await?;
                // Directory modes and owners last: a read-only directory
                // must still receive its children.
                dirs.push(entry);
            }
            _ => blocking(move || place(&owned_root, &rel, &path, &entry)).await?,
        }
    }
    let synced = writing.synced;
    blocking(move || apply_dirs(&root_fd, &dirs, synced)).await?;
    Ok(total)
}

/// Directory owners, modes, attributes and mtimes, deepest first (the root,
/// path "", last), each through a descriptor opened beneath the root and
/// synced; a directory the sender replaced since (by a symlink, say) is
/// left alone.
fn apply_dirs(root_fd: &OwnedFd, dirs: &[Entry], synced: bool) -> Result<(), TreeError> {
    for entry in dirs.iter().rev() {
        let rel = Path::new(&entry.path);
        let dir = if entry.path.is_empty() {
            Some(std::fs::File::from(
                root_fd.try_clone().map_err(io("open", rel))?,
            ))
        } else {
            beneath::dir(root_fd, rel).map_err(io("open", rel))?
        };
        if let Some(dir) = dir {
            apply_by_fd(&dir, rel, entry)?;
            if synced {
                dir.sync_all().map_err(io("sync", rel))?;
            }
        }
    }
    Ok(())
}

/// A final pass: read what of its first pass the sender no longer has.
/// If this root still holds that pass, delete it (never below a symlink)
/// and say so; the sender then sends only what changed. Else empty the
/// root, and it sends everything.
async fn answer_changes(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    root: &Path,
    holds: Option<u128>,
) -> Result<(), TreeError> {
    let mut removed = Vec::new();
    let first = loop {
        match next_frame(recv).await? {
            Frame::Changes {
                pass,
                removed: gone,
                last,
            } => {
                removed.extend(gone);
                if last {
                    break pass;
                }
            }
            other => {
                return Err(TreeError::Protocol(format!(
                    "expected Changes, got {other:?}"
                )))
            }
        }
    };
    let held = first.is_some() && first == holds;
    let owned = root.to_path_buf();
    blocking(move || match held {
        true => remove_beneath(&owned, &removed),
        false => empty(&owned),
    })
    .await?;
    send_frame(send, &Frame::Holds(held)).await
}

/// Delete `paths` (relative, sent by the peer) below `root`.
fn remove_beneath(root: &Path, paths: &[String]) -> Result<(), TreeError> {
    for path in paths {
        let rel = safe_relative(path)?;
        check_parents(root, &rel)?;
        remove_any(&root.join(rel))?;
    }
    Ok(())
}

/// Delete everything below `root` (created if missing): a whole pass that
/// a final pass will build on must start from nothing, since it writes
/// over what is there and deletes nothing.
pub async fn clear(root: &Path) -> Result<(), TreeError> {
    let root = root.to_path_buf();
    blocking(move || {
        std::fs::create_dir_all(&root).map_err(io("create", &root))?;
        empty(&root)
    })
    .await
}

/// Delete everything below `root`.
fn empty(root: &Path) -> Result<(), TreeError> {
    for child in std::fs::read_dir(root).map_err(io("read", root))? {
        remove_any(&child.map_err(io("read", root))?.path())?;
    }
    Ok(())
}

/// One file's chunks into `file` (created at `path`), checked against the
/// announced size and the sender's SHA-256, then synced (if `writing`
/// says so), its metadata set through the same descriptor; its byte count.
async fn receive_file(
    recv: &mut quinn::RecvStream,
    (mut file, path): (std::fs::File, PathBuf),
    entry: Entry,
    size: u64,
    writing: Writing<'_>,
) -> Result<u64, TreeError> {
    let progress = writing.progress;
    let mut context = Context::new(&SHA256);
    // All of the file so far, and its data without holes.
    let (mut received, mut data) = (0u64, 0u64);
    let sent = loop {
        match next_frame(recv).await? {
            Frame::Chunk(bytes) => {
                received += bytes.len() as u64;
                data += bytes.len() as u64;
                progress.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                if received > size {
                    return Err(TreeError::Protocol(format!(
                        "{} is longer than the announced {size} bytes",
                        entry.path
                    )));
                }
                context.update(&bytes);
                let at = path.clone();
                file = blocking(move || {
                    file.write_all(&bytes).map_err(io("write", &at))?;
                    Ok(file)
                })
                .await?;
            }
            Frame::Hole(len) => {
                received = received.saturating_add(len);
                if received > size {
                    return Err(TreeError::Protocol(format!(
                        "{} is longer than the announced {size} bytes",
                        entry.path
                    )));
                }
                super::hash_hole(&mut context, len);
                let at = path.clone();
                file = blocking(move || {
                    use std::io::Seek;
                    let skip = i64::try_from(len)
                        .map_err(|_| TreeError::Protocol("hole too large".into()))?;
                    file.seek(std::io::SeekFrom::Current(skip))
                        .map_err(io("seek", &at))?;
                    Ok(file)
                })
                .await?;
            }
            Frame::FileEnd { sha256 } => break sha256,
            other => {
                return Err(TreeError::Protocol(format!(
                    "expected Chunk, got {other:?}"
                )))
            }
        }
    };
    let got = sha256_hex(context);
    if got != sent {
        return Err(TreeError::Checksum {
            path: entry.path.clone(),
            sent,
            received: got,
        });
    }
    let (holes, synced) = (received - data, writing.synced);
    blocking(move || {
        // A trailing hole has no data after it to set the length.
        file.set_len(received).map_err(io("truncate", &path))?;
        if synced {
            file.sync_all().map_err(io("sync", &path))?;
        }
        apply_by_fd(&file, &path, &entry)
    })
    .await?;
    Ok(received - holes)
}
