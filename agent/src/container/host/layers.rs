//! Images shared by the containers that use them: each image unpacked
//! once per member into `<data-dir>/images/<id>/rootfs` (never written
//! again), and a layered instance's rootfs an overlayfs mount of that tree
//! under its own upper dir. A move sends the upper dir only (and the
//! image first, if the target's store lacks it); snapshots copy it.
//!
//! An instance dir's `image` file names the image it lies on; the store
//! keeps an image while some instance dir names it (checked under one
//! lock, so a launch or a move that names it first keeps it).

use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, UnmountFlags};

use super::{file_error, Host};
use crate::api::names::InstanceName;
use crate::driver::DriverError;

/// The store's directory name of image `id` (`sha256:<hex>` → `sha256-<hex>`),
/// refused unless it is a digest's characters (it comes from the
/// replicated spec and names a directory).
fn store_name(id: &str) -> Result<String, DriverError> {
    let ok = !id.is_empty()
        && id.len() <= 160
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b':');
    match ok {
        true => Ok(id.replace(':', "-")),
        false => Err(DriverError::BadInput(format!(
            "'{id}' is not an image id (expected sha256:<hex>)"
        ))),
    }
}

/// Whether overlayfs's mount options can name `path` (they separate
/// layers with ':' and options with ',').
fn nameable(path: &Path) -> bool {
    !path.to_string_lossy().contains([',', ':', '\\'])
}

/// Whether a filesystem other than its parent's is mounted at `path`.
fn is_mounted(path: &Path) -> bool {
    let dev = |p: &Path| rustix::fs::lstat(p).ok().map(|s| s.st_dev);
    match (dev(path), path.parent().and_then(dev)) {
        (Some(here), Some(parent)) => here != parent,
        _ => false,
    }
}

/// Mount `lower` under `upper` (with `work`) at `at` (blocking).
fn mount_overlay(lower: &Path, upper: &Path, work: &Path, at: &Path) -> std::io::Result<()> {
    for dir in [upper, work, at] {
        std::fs::create_dir_all(dir)?;
    }
    if ![lower, upper, work].iter().all(|p| nameable(p)) {
        return Err(std::io::Error::other(
            "overlayfs cannot name a path holding ',' or ':'; use another --data-dir",
        ));
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let options = std::ffi::CString::new(options).map_err(std::io::Error::other)?;
    rustix::mount::mount("overlay", at, "overlay", MountFlags::empty(), &*options)?;
    Ok(())
}

/// Detach whatever is mounted at `at` (blocking).
fn unmount(at: &Path) -> std::io::Result<()> {
    if is_mounted(at) {
        rustix::mount::unmount(at, UnmountFlags::DETACH)?;
    }
    Ok(())
}

/// Whether an overlayfs with its upper dir under `scratch` mounts and
/// takes a write here (blocking).
pub(super) fn overlay_works(scratch: &Path) -> bool {
    let [lower, upper, work, merged] =
        ["lower", "upper", "work", "merged"].map(|d| scratch.join(d));
    let works = std::fs::create_dir_all(&lower).is_ok()
        && mount_overlay(&lower, &upper, &work, &merged).is_ok()
        && std::fs::write(merged.join("probe"), b"").is_ok();
    let _ = unmount(&merged);
    let _ = std::fs::remove_dir_all(scratch);
    works
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    path: &Path,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, DriverError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(|e| file_error(what, path, e)),
        Err(e) => Err(file_error(what, path, std::io::Error::other(e.to_string()))),
    }
}

impl Host {
    fn images_root(&self) -> PathBuf {
        self.data_dir.join("images")
    }

    /// Where image `id`'s tree is in this member's store.
    pub(super) fn stored_image(&self, id: &str) -> Result<PathBuf, DriverError> {
        Ok(self.images_root().join(store_name(id)?).join("rootfs"))
    }

    /// The image `name` lies on, if it is layered.
    pub(super) fn image_of(&self, name: &InstanceName) -> Option<String> {
        let text = std::fs::read_to_string(self.dir(name).image_marker()).ok()?;
        Some(text.trim().to_string())
    }

    /// The tree of `name`'s own files: its upper dir when layered.
    pub(super) fn own_tree(&self, name: &InstanceName) -> PathBuf {
        let dir = self.dir(name);
        match dir.image_marker().exists() {
            true => dir.upper(),
            false => dir.rootfs(),
        }
    }

    /// Make `name` a layered instance on `id`: unmounted, the marker
    /// written (which keeps the image in the store from now on), an empty
    /// work dir. Whether the store holds the image already.
    pub(super) async fn layer_instance(
        &self,
        name: &InstanceName,
        id: &str,
    ) -> Result<bool, DriverError> {
        let tree = self.stored_image(id)?;
        let _store = self.image_store.lock().await;
        self.unmount_layers(name).await?;
        let dir = self.dir(name);
        let (root, marker, work) = (
            dir.root().to_path_buf(),
            dir.image_marker(),
            dir.overlay_work(),
        );
        let (upper, rootfs, id) = (dir.upper(), dir.rootfs(), id.to_string());
        blocking("cannot layer", dir.root(), move || {
            for d in [&root, &upper, &rootfs] {
                std::fs::create_dir_all(d)?;
            }
            if work.exists() {
                std::fs::remove_dir_all(&work)?;
            }
            std::fs::create_dir_all(&work)?;
            std::fs::write(&marker, id)
        })
        .await?;
        Ok(tree.is_dir())
    }

    /// Put `tree` into the store as image `id` (renamed when `take`,
    /// else copied); an image there already stays, and a taken `tree`
    /// goes.
    pub(super) async fn store_tree(
        &self,
        id: &str,
        tree: &Path,
        take: bool,
    ) -> Result<(), DriverError> {
        let dest = self.stored_image(id)?;
        let _store = self.image_store.lock().await;
        if dest.is_dir() {
            if take {
                let _ = tokio::fs::remove_dir_all(tree).await;
            }
            return Ok(());
        }
        let (from, to, timeout) = (tree.to_path_buf(), dest.clone(), self.timeout);
        blocking("cannot store the image", &dest, move || {
            let parent = to.parent().unwrap_or(&to).to_path_buf();
            std::fs::create_dir_all(&parent)?;
            let incoming = parent.join("rootfs.incoming");
            if incoming.exists() {
                std::fs::remove_dir_all(&incoming)?;
            }
            if !(take && std::fs::rename(&from, &incoming).is_ok()) {
                super::super::bundle::copy_tree(&from, &incoming, timeout)
                    .map_err(std::io::Error::other)?;
                if take {
                    let _ = std::fs::remove_dir_all(&from);
                }
            }
            std::fs::rename(&incoming, &to)
        })
        .await
    }

    /// A new instance's rootfs from `source` (taken: renamed when it is
    /// this agent's staging): on image `image` when given, the image
    /// stored from `source` unless the store has it.
    pub(super) async fn import_tree(
        &self,
        name: &InstanceName,
        image: Option<&str>,
        source: &Path,
        take: bool,
    ) -> Result<(), DriverError> {
        let dir = self.dir(name);
        self.unmount_layers(name).await?;
        let _ = tokio::fs::remove_dir_all(dir.root()).await;
        if let Some(id) = image {
            if !self.layer_instance(name, id).await? {
                self.store_tree(id, source, take).await?;
            } else if take {
                let _ = tokio::fs::remove_dir_all(source).await;
            }
            return Ok(());
        }
        if take && source.is_dir() {
            let bundle = dir.bundle();
            tokio::fs::create_dir_all(&bundle)
                .await
                .map_err(|e| file_error("cannot create", &bundle, e))?;
            // Another filesystem than the data dir's: copied below.
            if tokio::fs::rename(source, dir.rootfs()).await.is_ok() {
                return Ok(());
            }
        }
        crate::driver::Driver::stage_rootfs(self, source, &dir.rootfs()).await
    }

    /// Mount a layered instance's rootfs, unless it is mounted already.
    pub(super) async fn mount_layers(&self, name: &InstanceName) -> Result<(), DriverError> {
        let Some(id) = self.image_of(name) else {
            return Ok(());
        };
        let lower = self.stored_image(&id)?;
        if !lower.is_dir() {
            return Err(DriverError::Runtime(format!(
                "'{name}' lies on image {id}, which is missing from this member's store ({}); delete the instance and launch it again",
                lower.display()
            )));
        }
        let dir = self.dir(name);
        let (upper, work, at) = (dir.upper(), dir.overlay_work(), dir.rootfs());
        blocking(
            "cannot mount the layers of",
            &dir.rootfs(),
            move || match is_mounted(&at) {
                true => Ok(()),
                false => mount_overlay(&lower, &upper, &work, &at),
            },
        )
        .await
    }

    pub(super) async fn unmount_layers(&self, name: &InstanceName) -> Result<(), DriverError> {
        let at = self.dir(name).rootfs();
        let path = at.clone();
        blocking("cannot unmount", &path, move || unmount(&at)).await
    }

    /// After `name`'s dir is gone: drop image `id` from the store unless
    /// another instance here lies on it.
    pub(super) async fn forget_unused_image(&self, id: &str) {
        let Ok(tree) = self.stored_image(id) else {
            return;
        };
        let _store = self.image_store.lock().await;
        let instances = self.data_dir.join("instances");
        let wanted = id.to_string();
        let used = tokio::task::spawn_blocking(move || {
            let Ok(dirs) = std::fs::read_dir(instances) else {
                return false;
            };
            dirs.flatten().any(|d| {
                std::fs::read_to_string(d.path().join("image")).is_ok_and(|t| t.trim() == wanted)
            })
        })
        .await
        .unwrap_or(true);
        if !used {
            if let Some(image_dir) = tree.parent() {
                tracing::info!(
                    image = id,
                    "no instance here uses the image any more; removed"
                );
                let _ = tokio::fs::remove_dir_all(image_dir).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_digest_ids_name_a_store_dir() {
        assert_eq!(store_name("sha256:ab12").unwrap(), "sha256-ab12");
        for bad in ["", "../x", "sha256:AB", "a/b", ".", "x y"] {
            assert!(store_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn paths_overlayfs_cannot_name_are_refused() {
        assert!(nameable(Path::new("/var/lib/ferry/images/x")));
        assert!(!nameable(Path::new("/data/a:b")));
        assert!(!nameable(Path::new("/data/a,b")));
    }
}
