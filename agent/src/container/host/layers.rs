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
use crate::driver::{DriverError, ImageLease};

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
    use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags, CWD};
    // The kernel's own answer where it gives one: a btrfs subvolume has a
    // device number of its own without being a mount.
    let root = StatxAttributes::MOUNT_ROOT;
    match statx(
        CWD,
        path,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS,
    ) {
        Ok(s) if s.stx_attributes_mask.contains(root) => return s.stx_attributes.contains(root),
        Ok(_) => {}
        Err(_) => return false,
    }
    // Kernels before 5.8: another device than the parent's, unless it
    // is a subvolume's (ferry mounts nothing there but overlayfs).
    let dev = |p: &Path| rustix::fs::lstat(p).ok().map(|s| s.st_dev);
    match (dev(path), path.parent().and_then(dev)) {
        (Some(here), Some(parent)) => here != parent && !crate::transfer::btrfs::is_subvolume(path),
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
    // Fixed features, not the kernel's defaults: an upper dir moves to
    // other hosts, whose overlayfs must read it the same way (no index of
    // lower inodes, no metadata-only copies, no redirects to follow).
    let options = format!(
        "lowerdir={},upperdir={},workdir={},index=off,metacopy=off,redirect_dir=off",
        lower.display(),
        upper.display(),
        work.display()
    );
    let options = std::ffi::CString::new(options).map_err(std::io::Error::other)?;
    rustix::mount::mount("overlay", at, "overlay", MountFlags::empty(), &*options)?;
    Ok(())
}

/// Unmount whatever is mounted at `at`, every layer of it (blocking); a
/// mount still busy is detached, said so (its upper dir is not reused
/// safely while that lasts).
fn unmount(at: &Path) -> std::io::Result<()> {
    for _ in 0..8 {
        if !is_mounted(at) {
            return Ok(());
        }
        if let Err(e) = rustix::mount::unmount(at, UnmountFlags::empty()) {
            tracing::warn!(path = %at.display(), "unmount: {e}; detached instead");
            rustix::mount::unmount(at, UnmountFlags::DETACH)?;
        }
    }
    Ok(())
}

/// Whether an overlayfs with its upper dir under `scratch` mounts and
/// takes a write here (blocking).
pub(super) fn overlay_works(scratch: &Path) -> bool {
    let [lower, upper, work, merged] =
        ["lower", "upper", "work", "merged"].map(|d| scratch.join(d));
    let works = std::fs::create_dir_all(&lower).is_ok()
        && unmount(&merged).is_ok()
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
        let previous = self.image_of(name).filter(|p| p != id);
        let store = self.image_store.lock().await;
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
        let have = tree.is_dir();
        drop(store);
        if let Some(previous) = previous {
            self.forget_unused_image(&previous).await;
        }
        Ok(have)
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
            // On disk before it is named present: a rename that outlives a
            // power cut must not name files whose data did not.
            rustix::fs::syncfs(std::fs::File::open(&incoming)?)?;
            std::fs::rename(&incoming, &to)?;
            std::fs::File::open(&parent)?.sync_all()
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
        let previous = self.image_of(name);
        self.unmount_layers(name).await?;
        let _ = tokio::fs::remove_dir_all(dir.root()).await;
        if let Some(previous) = previous.filter(|p| Some(p.as_str()) != image) {
            self.forget_unused_image(&previous).await;
        }
        if let Some(id) = image {
            if !self.layer_instance(name, id).await? {
                self.store_tree(id, source, take).await?;
            } else if take {
                let _ = tokio::fs::remove_dir_all(source).await;
            }
            return Ok(());
        }
        // On btrfs the rootfs is a subvolume, so a move can send it by
        // btrfs; a rename would make it a plain directory.
        crate::transfer::btrfs::make_root(&dir.rootfs())
            .await
            .map_err(|e| DriverError::Runtime(e.to_string()))?;
        if take && source.is_dir() && !dir.rootfs().exists() {
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
    /// another instance here lies on it or a launch holds it. Renamed away
    /// first, so a removal cut short never leaves a partial image named
    /// present.
    pub(super) async fn forget_unused_image(&self, id: &str) {
        let Ok(tree) = self.stored_image(id) else {
            return;
        };
        let Some(image_dir) = tree.parent().map(Path::to_path_buf) else {
            return;
        };
        let _store = self.image_store.lock().await;
        let (instances, wanted) = (self.data_dir.join("instances"), id.to_string());
        let used = tokio::task::spawn_blocking(move || named_by_an_instance(&instances, &wanted))
            .await
            .unwrap_or(true);
        if used {
            return;
        }
        let gone = self
            .images_root()
            .join(format!(".gone-{}", ferry_transport::pki::random_hex(4)));
        let renamed = {
            let leases = self.image_leases.lock().unwrap_or_else(|e| e.into_inner());
            leases.get(id).copied().unwrap_or(0) == 0 && std::fs::rename(&image_dir, &gone).is_ok()
        };
        if renamed {
            tracing::info!(
                image = id,
                "no instance here uses the image any more; removed"
            );
            let _ = tokio::fs::remove_dir_all(&gone).await;
        }
    }

    /// Image `id`'s tree, held in the store until the lease drops.
    pub(super) fn lease(&self, id: &str) -> Option<ImageLease> {
        let tree = self.stored_image(id).ok()?;
        let mut leases = self.image_leases.lock().unwrap_or_else(|e| e.into_inner());
        if !tree.is_dir() {
            return None;
        }
        *leases.entry(id.to_string()).or_insert(0) += 1;
        let held = Leased {
            leases: self.image_leases.clone(),
            id: id.to_string(),
        };
        Some(ImageLease::new(tree, held))
    }
}

/// Images leased by launches, by id.
pub(super) type Leases = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>;

struct Leased {
    leases: Leases,
    id: String,
}

impl Drop for Leased {
    fn drop(&mut self) {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = leases.get_mut(&self.id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                leases.remove(&self.id);
            }
        }
    }
}

/// Whether an instance dir under `instances` names image `id`; any error
/// but a missing file counts as named (an image is kept when unsure).
fn named_by_an_instance(instances: &Path, id: &str) -> bool {
    let dirs = match std::fs::read_dir(instances) {
        Ok(dirs) => dirs,
        Err(e) => return e.kind() != std::io::ErrorKind::NotFound,
    };
    dirs.into_iter().any(|d| {
        let Ok(d) = d else { return true };
        match std::fs::read_to_string(d.path().join("image")) {
            Ok(text) => text.trim() == id,
            Err(e) => e.kind() != std::io::ErrorKind::NotFound,
        }
    })
}

/// Remove what a removal of images cut short left (blocking, at start).
pub(super) fn sweep_gone(images: &Path) {
    let Ok(dirs) = std::fs::read_dir(images) else {
        return;
    };
    for d in dirs.flatten() {
        if d.file_name().to_string_lossy().starts_with(".gone-") {
            let _ = std::fs::remove_dir_all(d.path());
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

    fn host(dir: &Path) -> Host {
        Host::new(dir, "n1", 1 << 20, std::time::Duration::from_secs(10))
    }

    fn a_tree(dir: &Path) -> PathBuf {
        let tree = dir.join("unpacked");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/sh"), b"#!").unwrap();
        tree
    }

    const ID: &str = "sha256:0123abcd";

    #[tokio::test]
    async fn an_image_stays_while_an_instance_names_it_or_a_launch_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let host = host(dir.path());
        host.store_tree(ID, &a_tree(dir.path()), true)
            .await
            .unwrap();
        let stored = host.stored_image(ID).unwrap();
        assert!(stored.join("bin/sh").is_file());
        // A lease keeps it from the store's clean-up.
        let lease = host.lease(ID).unwrap();
        host.forget_unused_image(ID).await;
        assert!(stored.is_dir(), "removed under a launch reading it");
        drop(lease);
        // So does an instance dir naming it.
        let marker = dir.path().join("instances/c1/image");
        std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
        std::fs::write(&marker, ID).unwrap();
        host.forget_unused_image(ID).await;
        assert!(stored.is_dir(), "removed under an instance");
        std::fs::remove_file(&marker).unwrap();
        host.forget_unused_image(ID).await;
        assert!(!stored.exists());
        assert!(host.lease(ID).is_none());
        let left: Vec<_> = std::fs::read_dir(dir.path().join("images"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "left in the store: {left:?}");
    }

    #[test]
    fn an_unreadable_marker_counts_as_naming_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let instances = dir.path().join("instances");
        assert!(
            !named_by_an_instance(&instances, ID),
            "no instances dir: unused"
        );
        std::fs::create_dir_all(instances.join("c1/image")).unwrap(); // a dir: EISDIR
        assert!(named_by_an_instance(&instances, ID));
    }

    #[tokio::test]
    async fn a_stored_image_is_never_replaced_and_a_taken_tree_goes() {
        let dir = tempfile::tempdir().unwrap();
        let host = host(dir.path());
        host.store_tree(ID, &a_tree(dir.path()), false)
            .await
            .unwrap();
        let second = dir.path().join("second");
        std::fs::create_dir_all(&second).unwrap();
        host.store_tree(ID, &second, true).await.unwrap();
        assert!(!second.exists());
        assert!(host.stored_image(ID).unwrap().join("bin/sh").is_file());
    }

    #[test]
    fn paths_overlayfs_cannot_name_are_refused() {
        assert!(nameable(Path::new("/var/lib/ferry/images/x")));
        assert!(!nameable(Path::new("/data/a:b")));
        assert!(!nameable(Path::new("/data/a,b")));
    }
}
