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

/// An image found and its manifest and config checked, its layers not
/// applied yet.
pub struct Opened {
    path: PathBuf,
    image: source::Resolved,
}

impl Opened {
    /// What names the image (see [`Unpacked::id`]).
    pub fn id(&self) -> &str {
        &self.image.id
    }

    /// What the image gives a launch, as if unpacked.
    pub fn unpacked(&self) -> Unpacked {
        Unpacked {
            id: self.image.id.clone(),
            process: ImageProcess::of(&self.image.config),
            layers: self.image.layers.len(),
        }
    }
}

/// Find the image at `path` (blocking: call from spawn_blocking). An
/// archive is first unpacked into `scratch`, which the caller removes once
/// done with the image.
pub fn open(path: &Path, scratch: &Path) -> Result<Opened, ImageError> {
    Ok(Opened {
        path: path.to_path_buf(),
        image: source::resolve(path, scratch)?,
    })
}

/// Unpack the image at `path` into the empty directory `rootfs` (blocking);
/// `scratch` as for [`open`].
#[cfg(test)]
pub fn unpack(
    path: &Path,
    rootfs: &Path,
    scratch: &Path,
    reserve: Option<&Reserve>,
) -> Result<Unpacked, ImageError> {
    let opened = open(path, scratch)?;
    apply_layers(&opened, rootfs, reserve)?;
    Ok(opened.unpacked())
}

/// Apply the layers of `opened` in order into `rootfs` (blocking). Before
/// each layer, `reserve` (if any) must have room for at least the layer's
/// file: what it unpacks to is not known before, but a disk already at its
/// reserve stops the unpacking there.
pub fn apply_layers(
    opened: &Opened,
    rootfs: &Path,
    reserve: Option<&Reserve>,
) -> Result<(), ImageError> {
    let path = opened.path.as_path();
    std::fs::create_dir_all(rootfs).map_err(|e| ImageError::Read {
        path: rootfs.to_path_buf(),
        reason: e.to_string(),
    })?;
    for (index, layer) in opened.image.layers.iter().enumerate() {
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
    Ok(())
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
