//! The sending side of a tree.

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use ring::digest::{Context, SHA256};

use super::{
    beneath, blocking, io, next_frame, send_frame, sha256_hex, tell_peer, Entry, EntryKind, Frame,
    Stamps, Transferred, TreeError, PATHS_PER_FRAME,
};

/// File content travels in chunks of this size.
const CHUNK: usize = 1 << 20;

/// Send the tree at `root`; returns what was sent and the stamps of the
/// entries sent. With `delta` (a final pass), first say what of the first
/// pass `since` is gone; then send what moved since it if the receiver
/// still holds that pass, else everything. Only a first pass may skip a
/// file that changed under it (a symlink now, or gone): the final pass
/// sends it as it then is.
pub async fn send(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    root: &Path,
    delta: bool,
    since: Option<&Stamps>,
) -> Result<(Transferred, Stamps), TreeError> {
    let result = send_tree(send, recv, root, delta, since).await;
    tell_peer(send, result).await
}

async fn send_tree(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    root: &Path,
    delta: bool,
    since: Option<&Stamps>,
) -> Result<(Transferred, Stamps), TreeError> {
    let (owned, first) = (root.to_path_buf(), since.filter(|_| delta).cloned());
    let started = super::wall_ns();
    let (entries, root_entry, root_fd) = blocking(move || {
        let entries = super::scan::scan_since(&owned, first.as_ref())?;
        let root_entry = super::scan::root_entry(&owned)?;
        let fd = beneath::root(&owned).map_err(io("open", &owned))?;
        Ok((entries, root_entry, Arc::new(fd)))
    })
    .await?;
    let scanned = std::time::Instant::now();
    let mut stamps = Stamps::of(&entries, started);
    let wanted = match delta {
        true => offer(send, recv, &entries, since).await?,
        false => None,
    };
    tracing::debug!(
        root = %root.display(),
        entries = entries.len(),
        scan_ms = super::wall_ns().saturating_sub(started) / 1_000_000,
        offered = ?scanned.elapsed(),
        sending = wanted.as_ref().map_or(entries.len(), BTreeSet::len),
        "tree scanned"
    );
    let mut total = Transferred {
        pass: stamps.pass(),
        ..Transferred::default()
    };
    for entry in entries {
        if wanted.as_ref().is_some_and(|w| !w.contains(&entry.path)) {
            continue;
        }
        let EntryKind::File { .. } = entry.kind else {
            send_frame(send, &Frame::Entry(entry)).await?;
            continue;
        };
        let Some(file) = open_file(&root_fd, root, &entry).await? else {
            if delta {
                return Err(TreeError::Protocol(format!(
                    "{} changed while the tree was frozen",
                    entry.path
                )));
            }
            stamps.forget(&entry.path);
            continue;
        };
        send_frame(send, &Frame::Entry(entry.clone())).await?;
        total.bytes += send_content(send, file, root, &entry).await?;
        total.files += 1;
    }
    let end = Frame::End {
        files: total.files,
        bytes: total.bytes,
        root: Box::new(root_entry),
        pass: total.pass,
    };
    send_frame(send, &end).await?;
    Ok((total, stamps))
}

/// A final pass: what of the first pass is gone, in parts; then what to
/// send, if the receiver holds that pass (`None`: all of it).
async fn offer(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    entries: &[Entry],
    since: Option<&Stamps>,
) -> Result<Option<BTreeSet<String>>, TreeError> {
    let (changed, removed) = since.map(|s| s.changes(entries)).unwrap_or_default();
    let parts: Vec<&[String]> = removed.chunks(PATHS_PER_FRAME).collect();
    let count = parts.len().max(1);
    for i in 0..count {
        let frame = Frame::Changes {
            pass: since.map(Stamps::pass),
            removed: parts.get(i).map_or_else(Vec::new, |p| p.to_vec()),
            last: i + 1 == count,
        };
        send_frame(send, &frame).await?;
    }
    match next_frame(recv).await? {
        Frame::Holds(true) if since.is_some() => Ok(Some(changed)),
        Frame::Holds(_) => Ok(None),
        other => Err(TreeError::Protocol(format!(
            "expected Holds, got {other:?}"
        ))),
    }
}

async fn open_file(
    root_fd: &Arc<OwnedFd>,
    root: &Path,
    entry: &Entry,
) -> Result<Option<std::fs::File>, TreeError> {
    let (fd, at, rel) = (root_fd.clone(), root.join(&entry.path), entry.path.clone());
    blocking(move || beneath::file(&fd, Path::new(&rel)).map_err(io("open", &at))).await
}

/// Where the data after `pos` starts and ends (a sparse file's holes in
/// between are not read); `None` when only a hole is left.
fn next_data(file: &std::fs::File, pos: u64, size: u64) -> Option<(u64, u64)> {
    use rustix::fs::{seek, SeekFrom};
    let start = seek(file, SeekFrom::Data(pos)).ok()?.min(size);
    if start >= size {
        return None;
    }
    let end = seek(file, SeekFrom::Hole(start)).map_or(size, |e| e.min(size));
    Some((start, end))
}

/// The announced size of `entry` from `file`: its data chunk by chunk, its
/// holes as [`Frame::Hole`]; a file grown since the scan is cut at the
/// announced size (the final pass sends the rest), one shrunk ends early.
/// Returns the data bytes sent.
async fn send_content(
    send: &mut quinn::SendStream,
    file: std::fs::File,
    root: &Path,
    entry: &Entry,
) -> Result<u64, TreeError> {
    let EntryKind::File { size } = entry.kind else {
        return Ok(0);
    };
    let path = root.join(&entry.path);
    let file = Arc::new(file);
    let (mut pos, mut sent) = (0u64, 0u64);
    let mut context = Context::new(&SHA256);
    while pos < size {
        let (f, at) = (file.clone(), path.clone());
        let (start, end) = blocking(move || Ok(next_data(&f, pos, size)))
            .await?
            .unwrap_or((size, size));
        if start > pos {
            super::hash_hole(&mut context, start - pos);
            send_frame(send, &Frame::Hole(start - pos)).await?;
            pos = start;
        }
        while pos < end {
            let (f, at) = (file.clone(), at.clone());
            let want = (end - pos).min(CHUNK as u64) as usize;
            let chunk = blocking(move || {
                let mut buf = vec![0u8; want];
                let n = std::os::unix::fs::FileExt::read_at(&*f, &mut buf, pos)
                    .map_err(io("read", &at))?;
                buf.truncate(n);
                Ok(buf)
            })
            .await?;
            if chunk.is_empty() {
                // Shrunk since the scan.
                pos = size;
                break;
            }
            pos += chunk.len() as u64;
            context.update(&chunk);
            sent += chunk.len() as u64;
            send_frame(send, &Frame::Chunk(chunk)).await?;
        }
    }
    let end = Frame::FileEnd {
        sha256: sha256_hex(context),
    };
    send_frame(send, &end).await?;
    Ok(sent)
}
