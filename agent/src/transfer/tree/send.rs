//! The sending side of a tree.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use ferry_transport::frame::write_frame;
use ring::digest::{Context, SHA256};

use super::{
    beneath, blocking, io, next_frame, sha256_hex, Entry, EntryKind, Frame, Stamps, Transferred,
    TreeError,
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
    let owned = root.to_path_buf();
    let (entries, root_fd) = blocking(move || {
        let entries = super::scan(&owned)?;
        let fd = beneath::root(&owned).map_err(io("open", &owned))?;
        Ok((entries, Arc::new(fd)))
    })
    .await?;
    let stamps = Stamps::of(&entries);
    let wanted: Option<BTreeSet<String>> = if delta {
        let changed = entries
            .iter()
            .filter(|e| since.is_none_or(|s| s.moved(e)))
            .map(|e| e.path.clone())
            .collect();
        let manifest = Frame::Manifest {
            entries: entries.clone(),
            changed,
        };
        write_frame(send, &manifest).await?;
        match next_frame(recv).await? {
            Frame::Want(paths) => Some(paths.into_iter().collect()),
            other => return Err(TreeError::Protocol(format!("expected Want, got {other:?}"))),
        }
    } else {
        None
    };
    let mut total = Transferred::default();
    for entry in entries {
        if wanted.as_ref().is_some_and(|w| !w.contains(&entry.path)) {
            continue;
        }
        let EntryKind::File { .. } = entry.kind else {
            write_frame(send, &Frame::Entry(entry)).await?;
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
        write_frame(send, &Frame::Entry(entry.clone())).await?;
        total.bytes += send_content(send, file, root, &entry).await?;
        total.files += 1;
    }
    let end = Frame::End {
        files: total.files,
        bytes: total.bytes,
    };
    write_frame(send, &end).await?;
    Ok((total, stamps))
}

async fn open_file(
    root_fd: &Arc<OwnedFd>,
    root: &Path,
    entry: &Entry,
) -> Result<Option<std::fs::File>, TreeError> {
    let (fd, at, rel) = (root_fd.clone(), root.join(&entry.path), entry.path.clone());
    blocking(move || beneath::file(&fd, Path::new(&rel)).map_err(io("open", &at))).await
}

/// The announced size of `entry` from `file`, chunk by chunk; a file grown
/// since the scan is cut at the announced size (the final pass sends the
/// rest), one shrunk ends early. Returns the bytes sent.
async fn send_content(
    send: &mut quinn::SendStream,
    mut file: std::fs::File,
    root: &Path,
    entry: &Entry,
) -> Result<u64, TreeError> {
    let EntryKind::File { size } = entry.kind else {
        return Ok(0);
    };
    let path = root.join(&entry.path);
    let mut remaining = size;
    let mut sent = 0;
    let mut context = Context::new(&SHA256);
    loop {
        let at = path.clone();
        let want = remaining.min(CHUNK as u64) as usize;
        let (chunk, back) = blocking(move || {
            let mut buf = vec![0u8; want];
            let n = file.read(&mut buf).map_err(io("read", &at))?;
            buf.truncate(n);
            Ok((buf, file))
        })
        .await?;
        file = back;
        if chunk.is_empty() {
            break;
        }
        remaining -= chunk.len() as u64;
        context.update(&chunk);
        sent += chunk.len() as u64;
        write_frame(send, &Frame::Chunk(chunk)).await?;
    }
    let end = Frame::FileEnd {
        sha256: sha256_hex(context),
    };
    write_frame(send, &end).await?;
    Ok(sent)
}
