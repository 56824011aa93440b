//! The sending side of a tree.

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use ring::digest::{Context, SHA256};

use super::{
    beneath, blocking, io, next_frame, send_frame, sha256_hex, tell_peer, Entry, EntryKind, Frame,
    Stamps, Transferred, TreeError, MANIFEST_PART,
};

/// File content travels in chunks of this size.
const CHUNK: usize = 1 << 20;

/// Send the tree at `root`; returns what was sent and the stamps of the
/// entries scanned. With `delta`, first send the manifest, marking every
/// entry that moved since `since` (all, without it), and send what the
/// receiver asks for. Only a first (full) pass may skip a file that
/// changed under it (a symlink now, or gone): the final pass sends it as
/// it then is.
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
    let owned = root.to_path_buf();
    let (entries, root_entry, root_fd) = blocking(move || {
        let entries = super::scan(&owned)?;
        let root_entry = super::scan::root_entry(&owned)?;
        let fd = beneath::root(&owned).map_err(io("open", &owned))?;
        Ok((entries, root_entry, Arc::new(fd)))
    })
    .await?;
    let stamps = Stamps::of(&entries);
    let wanted = if delta {
        Some(offer(send, recv, &entries, since).await?)
    } else {
        None
    };
    let mut total = Transferred::default();
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
    };
    send_frame(send, &end).await?;
    Ok((total, stamps))
}

/// Delta: the manifest in parts, marking what moved since `since` (all,
/// without it); the paths the receiver wants, in parts.
async fn offer(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    entries: &[Entry],
    since: Option<&Stamps>,
) -> Result<BTreeSet<String>, TreeError> {
    let parts: Vec<&[Entry]> = entries.chunks(MANIFEST_PART).collect();
    let count = parts.len().max(1);
    for i in 0..count {
        let part = parts.get(i).copied().unwrap_or(&[]);
        let changed = part
            .iter()
            .filter(|e| since.is_none_or(|s| s.moved(e)))
            .map(|e| e.path.clone())
            .collect();
        let frame = Frame::Manifest {
            entries: part.to_vec(),
            changed,
            last: i + 1 == count,
        };
        send_frame(send, &frame).await?;
    }
    let mut wanted = BTreeSet::new();
    loop {
        match next_frame(recv).await? {
            Frame::Want { paths, last } => {
                wanted.extend(paths);
                if last {
                    return Ok(wanted);
                }
            }
            other => return Err(TreeError::Protocol(format!("expected Want, got {other:?}"))),
        }
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
