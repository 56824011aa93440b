//! Images written by the tests themselves (no registry): an OCI image
//! layout whose layers are tars of directories, gzipped, and a `docker
//! save` archive of the same layers.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", ferry_transport::pki::sha256_hex(bytes))
}

/// A tar of the tree at `dir` (owners, modes, symlinks as they are).
pub fn layer_tar(dir: &Path) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder
        .append_dir_all(".", dir)
        .with_context(|| format!("tar {}", dir.display()))?;
    Ok(builder.into_inner()?)
}

/// The image config: `process` is its `config` object (Entrypoint, Cmd,
/// Env, WorkingDir, User), the diff_ids those of `layers`.
pub fn config(layers: &[Vec<u8>], process: serde_json::Value) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
    let arch = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    };
    serde_json::json!({
        "architecture": arch, "os": "linux", "config": process,
        "rootfs": { "type": "layers", "diff_ids": diff_ids }
    })
    .to_string()
    .into_bytes()
}

fn blob(layout: &Path, media_type: &str, bytes: &[u8]) -> Result<serde_json::Value> {
    let digest = sha256(bytes);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(&digest["sha256:".len()..]), bytes)?;
    Ok(serde_json::json!({ "mediaType": media_type, "digest": digest, "size": bytes.len() }))
}

/// An OCI image layout at `layout`: `layers` gzipped, the config from
/// [`config`].
pub fn oci_layout(layout: &Path, layers: &[Vec<u8>], config: &[u8]) -> Result<PathBuf> {
    let config = blob(layout, "application/vnd.oci.image.config.v1+json", config)?;
    let mut descriptors = Vec::new();
    for layer in layers {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(layer)?;
        let media_type = "application/vnd.oci.image.layer.v1.tar+gzip";
        descriptors.push(blob(layout, media_type, &gz.finish()?)?);
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": descriptors
    });
    let manifest = blob(
        layout,
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    )?;
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [manifest] });
    std::fs::write(layout.join("index.json"), index.to_string())?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(layout.to_path_buf())
}

/// A `docker save` archive at `path` of `layers` (plain tars) and `config`.
pub fn docker_archive(path: &Path, layers: &[Vec<u8>], config: &[u8]) -> Result<PathBuf> {
    let mut builder = tar::Builder::new(std::fs::File::create(path)?);
    let mut append = |name: &str, bytes: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, bytes)
    };
    append("config.json", config)?;
    let mut names = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        append(&name, layer)?;
        names.push(name);
    }
    let manifest = serde_json::json!([{
        "Config": "config.json", "RepoTags": ["test:1"], "Layers": names
    }]);
    append("manifest.json", manifest.to_string().as_bytes())?;
    builder.into_inner()?.flush()?;
    Ok(path.to_path_buf())
}
