//! OCI images as a container's rootfs (`ferry launch --image PATH`): an
//! OCI image layout directory (`skopeo copy … oci:DIR`), an archive of one
//! (`podman save --format oci-archive`, `skopeo copy … oci-archive:`), or a
//! `docker save` / `podman save` archive. `source.rs` finds the manifest,
//! config and layers (every blob checked against its digest), `layers.rs`
//! applies the layers in order with whiteouts honoured, `process.rs` reads
//! the default process from the image config.

mod layers;
mod process;
mod source;

use std::path::{Path, PathBuf};

use crate::transfer::space::Reserve;

pub use process::{resolve_user, ImageProcess};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(
        "{path} is not an image: expected an OCI image layout (index.json, blobs/), an archive \
         of one, or a 'docker save' archive (manifest.json)"
    )]
    NotAnImage { path: PathBuf },
    #[error("image {path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error(
        "image {path}: {what} does not match its digest {digest} (the image is damaged; save \
         or copy it again)"
    )]
    Digest {
        path: PathBuf,
        what: String,
        digest: String,
    },
    #[error("image {path}: no room for layer {index}: {reason}")]
    Space {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("image {path}: cannot unpack layer {index} ({layer}): {reason}")]
    Layer {
        path: PathBuf,
        index: usize,
        layer: PathBuf,
        reason: String,
    },
}

/// An image unpacked into a rootfs.
#[derive(Clone, Debug)]
pub struct Unpacked {
    /// What names the image: its manifest's digest (OCI) or its config's
    /// (a docker archive has no manifest digest).
    pub id: String,
    pub process: ImageProcess,
    pub layers: usize,
}

/// Unpack the image at `path` into the empty directory `rootfs` (blocking:
/// call from spawn_blocking). An archive is first unpacked into `scratch`,
/// which the caller removes afterwards. Before each layer, `reserve` (if
/// any) must have room for at least the layer's file: what it unpacks to
/// is not known before, but a disk already at its reserve stops the
/// unpacking there.
pub fn unpack(
    path: &Path,
    rootfs: &Path,
    scratch: &Path,
    reserve: Option<&Reserve>,
) -> Result<Unpacked, ImageError> {
    let image = source::resolve(path, scratch)?;
    std::fs::create_dir_all(rootfs).map_err(|e| ImageError::Read {
        path: rootfs.to_path_buf(),
        reason: e.to_string(),
    })?;
    for (index, layer) in image.layers.iter().enumerate() {
        if let Some(reserve) = reserve {
            let size = std::fs::metadata(&layer.path).map_or(0, |m| m.len());
            reserve
                .check(size, &format!("layer {index} of the image"))
                .map_err(|e| ImageError::Space {
                    path: path.to_path_buf(),
                    index,
                    reason: e.to_string(),
                })?;
        }
        layers::apply(layer, rootfs).map_err(|e| match e {
            layers::LayerError::Digest { what, digest } => ImageError::Digest {
                path: path.to_path_buf(),
                what: format!("layer {index} ({what})"),
                digest,
            },
            layers::LayerError::Io(reason) => ImageError::Layer {
                path: path.to_path_buf(),
                index,
                layer: layer.path.clone(),
                reason,
            },
        })?;
    }
    Ok(Unpacked {
        id: image.id,
        process: ImageProcess::of(&image.config),
        layers: image.layers.len(),
    })
}

/// What a finished SHA-256 `context` gives, as an OCI digest
/// (`sha256:<hex>`).
fn sha256_digest(context: ring::digest::Context) -> String {
    format!("sha256:{}", crate::transfer::tree::sha256_hex(context))
}

/// The OCI digest of `bytes`.
fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", ferry_transport::pki::sha256_hex(bytes))
}

#[cfg(test)]
mod tests;
