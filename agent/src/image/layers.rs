//! One layer applied onto a rootfs (the tar crate writes the entries):
//! `.wh.NAME` removes NAME, `.wh..wh..opq` empties its directory, of what
//! lower layers put there; whatever this layer itself writes stays, before
//! or after the marker, so the result does not depend on where in the tar
//! the markers sit. A lower entry of another kind in an entry's way (a
//! directory where a file goes) is removed first. Nothing is written or
//! removed outside the rootfs: the tar crate refuses such entries, and a
//! whiteout's directory is resolved and checked to be beneath it.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use ring::digest::{Context, SHA256};

use super::sha256_digest;
use super::source::LayerFile;

const OPAQUE: &str = ".wh..wh..opq";
const WHITEOUT: &str = ".wh.";

#[derive(Debug)]
pub enum LayerError {
    Digest { what: String, digest: String },
    Io(String),
}

impl From<std::io::Error> for LayerError {
    fn from(e: std::io::Error) -> Self {
        LayerError::Io(e.to_string())
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    context: Context,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.context.update(&buf[..n]);
        Ok(n)
    }
}

/// The tar stream in `raw`, by its first bytes: gzip, zstd or plain.
fn decoder<'a>(mut raw: impl BufRead + 'a) -> std::io::Result<Box<dyn Read + 'a>> {
    let head = raw.fill_buf()?;
    let (gzip, zstd) = (
        head.starts_with(&[0x1f, 0x8b]),
        head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]),
    );
    Ok(match (gzip, zstd) {
        (true, _) => Box::new(flate2::bufread::MultiGzDecoder::new(raw)),
        (_, true) => Box::new(zstd::stream::read::Decoder::with_buffer(raw)?),
        _ => Box::new(raw),
    })
}

/// Check `path`'s bytes against `digest` (`sha256:…`).
fn verify_file(path: &Path, digest: &str) -> Result<(), LayerError> {
    let mut hashing = Hashing {
        inner: File::open(path)?,
        context: Context::new(&SHA256),
    };
    std::io::copy(&mut hashing, &mut std::io::sink())?;
    if sha256_digest(hashing.context) != digest {
        return Err(LayerError::Digest {
            what: "its file".into(),
            digest: digest.to_string(),
        });
    }
    Ok(())
}

/// An archive of an image (an OCI layout or a docker archive, possibly
/// compressed) unpacked into `dest` as plain files.
pub fn extract_archive(path: &Path, dest: &Path) -> Result<(), String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let stream = decoder(BufReader::new(file)).map_err(|e| e.to_string())?;
    let mut archive = tar::Archive::new(stream);
    archive.set_preserve_ownerships(false);
    std::fs::create_dir_all(dest).map_err(|e| e.to_string())?;
    archive.unpack(dest).map_err(|e| e.to_string())
}

/// Apply `layer` onto `rootfs`, checking its digests.
pub fn apply(layer: &LayerFile, rootfs: &Path) -> Result<(), LayerError> {
    // Read twice (the second time from the page cache) so that no byte of
    // a layer that is not the one named reaches the decompressor or the
    // rootfs; a diff_id can only be checked as the tar is applied.
    if let Some(digest) = &layer.digest {
        verify_file(&layer.path, digest)?;
    }
    let raw = BufReader::with_capacity(1 << 20, File::open(&layer.path)?);
    let mut tar_stream = Hashing {
        inner: decoder(raw)?,
        context: Context::new(&SHA256),
    };
    apply_entries(&mut tar_stream, &rootfs.canonicalize()?)?;
    // The tar's end may leave padding unread: it counts for the diff_id.
    std::io::copy(&mut tar_stream, &mut std::io::sink())?;
    if let Some(diff_id) = &layer.diff_id {
        if sha256_digest(tar_stream.context) != *diff_id {
            return Err(LayerError::Digest {
                what: "its content".into(),
                digest: diff_id.clone(),
            });
        }
    }
    Ok(())
}

/// The entries of the tar in `stream` onto `root` (canonical), in order.
fn apply_entries(stream: impl Read, root: &Path) -> Result<(), LayerError> {
    let mut archive = tar::Archive::new(stream);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    let mut written: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let Some(rel) = relative(&entry.path()?) else {
            continue;
        };
        if whiteout(root, &rel, &written)? {
            continue;
        }
        make_room(root, &rel, entry.header().entry_type().is_dir())?;
        if entry.unpack_in(root)? {
            written.insert(rel);
        }
    }
    Ok(())
}

/// An entry's path relative to the rootfs (`./a/b` and `/a/b` are `a/b`);
/// `None` for the root itself or a path with `..`, which is skipped.
fn relative(path: &Path) -> Option<PathBuf> {
    let mut rel = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => rel.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!rel.as_os_str().is_empty()).then_some(rel)
}

/// The directory `rel`'s parent is, resolved, if it is beneath `root`
/// (`None`: not there, or it leads out through a symlink).
fn parent_beneath(root: &Path, rel: &Path) -> Option<PathBuf> {
    let parent = root.join(rel.parent()?).canonicalize().ok()?;
    parent.starts_with(root).then_some(parent)
}

/// Apply `rel` if it is a whiteout marker; false when it is not one.
fn whiteout(root: &Path, rel: &Path, written: &HashSet<PathBuf>) -> Result<bool, LayerError> {
    let Some(name) = rel.file_name().and_then(|n| n.to_str()) else {
        return Ok(false);
    };
    let Some(victim) = name.strip_prefix(WHITEOUT) else {
        return Ok(false);
    };
    let dir_rel = rel.parent().unwrap_or(Path::new(""));
    if name == OPAQUE {
        if let Some(dir) = parent_beneath(root, rel) {
            hide_lower(&dir, dir_rel, written)?;
        }
    } else if !victim.is_empty() && victim != "." && victim != ".." {
        let victim_rel = dir_rel.join(victim);
        if let (Some(dir), false) = (parent_beneath(root, rel), written.contains(&victim_rel)) {
            remove(&dir.join(victim))?;
        }
    }
    Ok(true)
}

/// Remove what lower layers put in `dir` (at `dir_rel` in the rootfs),
/// keeping what this layer wrote and, below a directory it wrote, again
/// only its own entries.
fn hide_lower(dir: &Path, dir_rel: &Path, written: &HashSet<PathBuf>) -> Result<(), LayerError> {
    for child in std::fs::read_dir(dir)? {
        let child = child?;
        let child_rel = dir_rel.join(child.file_name());
        if !written.contains(&child_rel) {
            remove(&child.path())?;
        } else if child.file_type()?.is_dir() {
            hide_lower(&child.path(), &child_rel, written)?;
        }
    }
    Ok(())
}

/// Remove `path` whatever it is (a symlink itself, never what it names).
fn remove(path: &Path) -> Result<(), LayerError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path)?,
        Ok(_) => std::fs::remove_file(path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Remove a lower entry in the way of `rel`: a directory where a
/// non-directory goes, anything but a directory where a directory goes
/// (a directory onto a directory merges).
fn make_room(root: &Path, rel: &Path, is_dir: bool) -> Result<(), LayerError> {
    let (Some(parent), Some(name)) = (parent_beneath(root, rel), rel.file_name()) else {
        return Ok(());
    };
    let path = parent.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() != is_dir => remove(&path),
        _ => Ok(()),
    }
}
