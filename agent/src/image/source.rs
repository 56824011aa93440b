//! Where an image's parts are: an OCI image layout (`index.json`,
//! `blobs/sha256/<hex>`) or a docker archive's `manifest.json`, read from a
//! directory, or from an archive of either unpacked into scratch first.
//! Every blob read here is checked against its digest; layers are checked
//! as they are applied.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use serde::Deserialize;

use super::{digest_of, ImageError};

/// Index, manifest and config blobs are small; a larger one is refused
/// rather than read into memory.
const MAX_JSON: u64 = 4 << 20;
/// Indexes may name indexes (a multi-platform image in a layout); this
/// many levels at most.
const MAX_DEPTH: usize = 4;

/// One layer: its file, and the digests its bytes must have.
#[derive(Debug)]
pub struct LayerFile {
    pub path: PathBuf,
    /// `sha256:…` of the file as stored (an OCI descriptor's digest).
    pub digest: Option<String>,
    /// `sha256:…` of the uncompressed tar (the config's diff_id).
    pub diff_id: Option<String>,
}

pub struct Resolved {
    pub id: String,
    pub config: ImageConfiguration,
    pub layers: Vec<LayerFile>,
}

pub fn resolve(path: &Path, scratch: &Path) -> Result<Resolved, ImageError> {
    let meta = std::fs::metadata(path).map_err(|e| read_err(path, e))?;
    let root = if meta.is_dir() {
        path.to_path_buf()
    } else {
        super::layers::extract_archive(path, scratch).map_err(|reason| ImageError::Bad {
            path: path.to_path_buf(),
            reason: format!("cannot unpack the archive: {reason}"),
        })?;
        scratch.to_path_buf()
    };
    let image = Image { path, root: &root };
    if root.join("index.json").is_file() {
        image.oci()
    } else if root.join("manifest.json").is_file() {
        image.docker()
    } else {
        Err(ImageError::NotAnImage {
            path: path.to_path_buf(),
        })
    }
}

fn read_err(path: &Path, e: impl ToString) -> ImageError {
    ImageError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// The Go name of this host's architecture, as image platforms give it.
pub(super) fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// A docker archive's `manifest.json` holds one of these per image.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

struct Image<'a> {
    /// As the user named it, for errors.
    path: &'a Path,
    /// The layout's (or the unpacked archive's) directory.
    root: &'a Path,
}

impl Image<'_> {
    fn bad(&self, reason: impl Into<String>) -> ImageError {
        ImageError::Bad {
            path: self.path.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// A file of the layout named by a path relative to its root: no
    /// absolute path, no `..`, no symlink.
    fn member(&self, rel: &str) -> Result<PathBuf, ImageError> {
        let rel_path = Path::new(rel);
        let plain = rel_path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !plain || rel.is_empty() {
            return Err(self.bad(format!("names a file outside the image: {rel}")));
        }
        let path = self.root.join(rel_path);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(path),
            Ok(_) => Err(self.bad(format!("{rel} is not a regular file"))),
            Err(e) => Err(self.bad(format!("{rel}: {e}"))),
        }
    }

    /// A small file read whole, refused past `MAX_JSON`.
    fn small(&self, path: &Path) -> Result<Vec<u8>, ImageError> {
        let file = std::fs::File::open(path).map_err(|e| read_err(path, e))?;
        let mut bytes = Vec::new();
        file.take(MAX_JSON + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| read_err(path, e))?;
        if bytes.len() as u64 > MAX_JSON {
            return Err(self.bad(format!("{} is larger than 4 MiB", path.display())));
        }
        Ok(bytes)
    }

    fn blob_path(&self, descriptor: &Descriptor) -> Result<PathBuf, ImageError> {
        let Some(hex) = descriptor.as_digest_sha256() else {
            return Err(self.bad(format!(
                "{} is not a sha256 digest; only sha256 is read",
                descriptor.digest()
            )));
        };
        self.member(&format!("blobs/sha256/{hex}"))
    }

    /// A small blob, checked against its descriptor's digest.
    fn blob(&self, descriptor: &Descriptor, what: &str) -> Result<Vec<u8>, ImageError> {
        let bytes = self.small(&self.blob_path(descriptor)?)?;
        let digest = descriptor.digest().to_string();
        if digest_of(&bytes) != digest {
            return Err(ImageError::Digest {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                digest,
            });
        }
        Ok(bytes)
    }

    fn oci(&self) -> Result<Resolved, ImageError> {
        let index_bytes = self.small(&self.root.join("index.json"))?;
        let index = ImageIndex::from_reader(&index_bytes[..])
            .map_err(|e| self.bad(format!("index.json: {e}")))?;
        let chosen = self.pick(index.manifests(), 0)?;
        let bytes = self.blob(&chosen, "the manifest")?;
        let manifest = ImageManifest::from_reader(&bytes[..])
            .map_err(|e| self.bad(format!("the manifest: {e}")))?;
        let config = self.config(&self.blob(manifest.config(), "the config")?)?;
        let diff_ids = config.rootfs().diff_ids().clone();
        let layers = manifest
            .layers()
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                Ok(LayerFile {
                    path: self.blob_path(layer)?,
                    digest: Some(layer.digest().to_string()),
                    diff_id: diff_ids.get(i).cloned(),
                })
            })
            .collect::<Result<_, ImageError>>()?;
        Ok(Resolved {
            id: chosen.digest().to_string(),
            config,
            layers,
        })
    }

    fn config(&self, bytes: &[u8]) -> Result<ImageConfiguration, ImageError> {
        ImageConfiguration::from_reader(bytes).map_err(|e| self.bad(format!("the config: {e}")))
    }

    /// The one image manifest for this host among `manifests`, following
    /// nested indexes.
    fn pick(&self, manifests: &[Descriptor], depth: usize) -> Result<Descriptor, ImageError> {
        let candidates: Vec<&Descriptor> = manifests
            .iter()
            .filter(|d| kind_of(d.media_type()).is_some())
            .filter(|d| {
                d.platform().as_ref().is_none_or(|p| {
                    p.os().to_string() == "linux" && p.architecture().to_string() == host_arch()
                })
            })
            .collect();
        let chosen = match candidates.as_slice() {
            [one] => *one,
            [] => {
                return Err(self.bad(format!(
                    "holds no image for linux/{} (this host)",
                    host_arch()
                )))
            }
            many => {
                return Err(self.bad(format!(
                    "holds {} images ({}); keep one in the layout (skopeo copy IMAGE oci:DIR)",
                    many.len(),
                    names(many)
                )))
            }
        };
        match kind_of(chosen.media_type()) {
            Some(Kind::Index) if depth < MAX_DEPTH => {
                let bytes = self.blob(chosen, "an image index")?;
                let nested = ImageIndex::from_reader(&bytes[..])
                    .map_err(|e| self.bad(format!("an image index: {e}")))?;
                self.pick(nested.manifests(), depth + 1)
            }
            Some(Kind::Index) => Err(self.bad("indexes nested too deep")),
            _ => Ok(chosen.clone()),
        }
    }

    fn docker(&self) -> Result<Resolved, ImageError> {
        let bytes = self.small(&self.root.join("manifest.json"))?;
        let images: Vec<DockerManifest> =
            serde_json::from_slice(&bytes).map_err(|e| self.bad(format!("manifest.json: {e}")))?;
        let image = match images.as_slice() {
            [one] => one,
            other => {
                let tags: Vec<String> = other
                    .iter()
                    .flat_map(|m| m.repo_tags.clone().unwrap_or_default())
                    .collect();
                return Err(self.bad(format!(
                    "holds {} images ({}); save one image per archive",
                    other.len(),
                    tags.join(", ")
                )));
            }
        };
        let config_bytes = self.small(&self.member(&image.config)?)?;
        let config = self.config(&config_bytes)?;
        let diff_ids = config.rootfs().diff_ids().clone();
        if diff_ids.len() != image.layers.len() {
            return Err(self.bad(format!(
                "the config lists {} layers, manifest.json {}",
                diff_ids.len(),
                image.layers.len()
            )));
        }
        let layers = image
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(layer, diff_id)| {
                Ok(LayerFile {
                    path: self.member(layer)?,
                    digest: None,
                    diff_id: Some(diff_id),
                })
            })
            .collect::<Result<_, ImageError>>()?;
        Ok(Resolved {
            id: digest_of(&config_bytes),
            config,
            layers,
        })
    }
}

enum Kind {
    Manifest,
    Index,
}

/// Manifests and indexes by media type, OCI's and Docker's.
fn kind_of(media_type: &MediaType) -> Option<Kind> {
    match media_type {
        MediaType::ImageManifest => Some(Kind::Manifest),
        MediaType::ImageIndex => Some(Kind::Index),
        MediaType::Other(t) if t == "application/vnd.docker.distribution.manifest.v2+json" => {
            Some(Kind::Manifest)
        }
        MediaType::Other(t) if t == "application/vnd.docker.distribution.manifest.list.v2+json" => {
            Some(Kind::Index)
        }
        _ => None,
    }
}

/// The images' reference names (or digests) for an error.
fn names(descriptors: &[&Descriptor]) -> String {
    let name = |d: &Descriptor| {
        d.annotations()
            .as_ref()
            .and_then(|a| a.get("org.opencontainers.image.ref.name").cloned())
            .unwrap_or_else(|| d.digest().to_string())
    };
    descriptors
        .iter()
        .map(|d| name(d))
        .collect::<Vec<_>>()
        .join(", ")
}
