//! Reading a tree: every entry below the root, parents before children,
//! with what makes a root filesystem work: owners, modes, times, extended
//! attributes (file capabilities among them), hard links, device nodes,
//! FIFOs and sockets.

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{io, Entry, EntryKind, Stamps, TreeError, Xattr};

fn ns(secs: i64, nsec: i64) -> i128 {
    i128::from(secs) * 1_000_000_000 + i128::from(nsec)
}

/// Extended attributes of `path` itself (not what a symlink points to);
/// none where the filesystem keeps none. Sizes are asked first: most
/// entries have none, and a zeroed 64 KiB buffer each cost a 10,000-file
/// scan more than its syscalls.
fn xattrs_of(path: &Path) -> Vec<Xattr> {
    let list = |buf: &mut [u8]| rustix::fs::llistxattr(path, buf);
    let Some(names) = read_sized(rustix::fs::llistxattr_query(path), list) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let size = rustix::fs::lgetxattr_query(path, name);
        if let Some(value) = read_sized(size, |buf| rustix::fs::lgetxattr(path, name, buf)) {
            out.push(Xattr {
                name: name.to_string(),
                value,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// What `read` gives into a buffer of the `size` asked for just before;
/// `None` if either failed (the size changed in between, say: then the
/// attributes of an entry of a live tree are missed, and its ctime moved,
/// so the final pass sends it again).
fn read_sized(
    size: rustix::io::Result<usize>,
    read: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; size.ok()?];
    let n = read(&mut buf[..]).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Whether `e` says the entry went away (or a directory turned into
/// something else) while a live tree was scanned: it is then not part of
/// this pass, and a pass over the frozen tree sees what is there.
fn vanished(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
        || e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error())
}

/// An entry for `rel` (at `path`) from its metadata, the link target read
/// where it is one, without its extended attributes; `None` for what a
/// tree does not carry.
fn entry_of(path: &Path, rel: &Path, meta: &Metadata) -> Result<Option<Entry>, TreeError> {
    let file_type = meta.file_type();
    let kind = if file_type.is_symlink() {
        let target = match std::fs::read_link(path) {
            Ok(target) => target,
            Err(e) if vanished(&e) => return Ok(None),
            Err(e) => return Err(io("readlink", path)(e)),
        };
        EntryKind::Symlink {
            target: target.to_string_lossy().into_owned(),
        }
    } else if file_type.is_dir() {
        EntryKind::Dir
    } else if file_type.is_file() {
        EntryKind::File { size: meta.len() }
    } else if file_type.is_block_device() || file_type.is_char_device() {
        EntryKind::Device {
            block: file_type.is_block_device(),
            rdev: meta.rdev(),
        }
    } else if file_type.is_fifo() {
        EntryKind::Fifo
    } else if file_type.is_socket() {
        EntryKind::Socket
    } else {
        return Ok(None);
    };
    Ok(Some(Entry {
        path: rel.to_string_lossy().into_owned(),
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
        ino: meta.ino(),
        ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        xattrs: Vec::new(),
    }))
}

/// The root directory's own entry (path "").
pub fn root_entry(root: &Path) -> Result<Entry, TreeError> {
    let meta = std::fs::symlink_metadata(root).map_err(io("stat", root))?;
    let mut entry = entry_of(root, Path::new(""), &meta)?
        .filter(|e| e.kind == EntryKind::Dir)
        .ok_or_else(|| TreeError::UnsafePath(root.display().to_string()))?;
    entry.xattrs = xattrs_of(root);
    Ok(entry)
}

/// The entries of the tree at `root`, sorted by path (parents before
/// children). The second and later names of a file with several come as
/// [`EntryKind::Hardlink`] to the first.
pub fn scan(root: &Path) -> Result<Vec<Entry>, TreeError> {
    scan_since(root, None)
}

/// [`scan`], for a final pass after `since`: the extended attributes are
/// read only of entries that moved since (the others are not sent; most
/// of a tree's entries, most of a scan's syscalls).
pub(super) fn scan_since(root: &Path, since: Option<&Stamps>) -> Result<Vec<Entry>, TreeError> {
    let mut entries = Vec::new();
    let mut links: Vec<(usize, (u64, u64))> = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let children = match std::fs::read_dir(&dir).and_then(|d| d.collect::<Result<Vec<_>, _>>())
        {
            Ok(children) => children,
            Err(e) if vanished(&e) => continue,
            Err(e) => return Err(io("read", &dir)(e)),
        };
        for child in children {
            let path = child.path();
            // By the directory's descriptor (fstatat), not a walk of the
            // whole path again; the last component is not followed.
            let meta = match child.metadata() {
                Ok(meta) => meta,
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(io("stat", &path)(e)),
            };
            let rel_path = rel.join(child.file_name());
            let Some(mut entry) = entry_of(&path, &rel_path, &meta)? else {
                continue;
            };
            if since.is_none_or(|s| s.moved(&entry)) {
                entry.xattrs = xattrs_of(&path);
            }
            if entry.kind == EntryKind::Dir {
                stack.push(rel_path);
            } else if meta.is_file() && meta.nlink() > 1 {
                links.push((entries.len(), (meta.dev(), meta.ino())));
            }
            entries.push(entry);
        }
    }
    // The first name (by path) of each linked file carries it.
    links.sort_by(|a, b| entries[a.0].path.cmp(&entries[b.0].path));
    let mut first: HashMap<(u64, u64), String> = HashMap::new();
    for (index, key) in links {
        match first.get(&key) {
            Some(target) => {
                entries[index].kind = EntryKind::Hardlink {
                    target: target.clone(),
                }
            }
            None => {
                first.insert(key, entries[index].path.clone());
            }
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}
