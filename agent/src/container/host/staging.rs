//! Where a move keeps a container's memory images: in memory (a directory
//! of this agent's on `/dev/shm`, a tmpfs) when it has room, else in the
//! instance's directory on the data dir's disk. The images are written
//! and read inside the frozen window, and nothing committed depends on
//! them surviving the host: a target that loses them before `Restored`
//! fails its restore and the move switches back to the source's paused
//! copy, and a source thaws its copy. So memory is the right place, and
//! disk only the fallback for images larger than the room there.

use std::path::{Path, PathBuf};

use super::Host;
use crate::api::names::InstanceName;
use crate::driver::DriverError;

/// Room kept free on `/dev/shm` beyond the images (CRIU's work files,
/// other users of shared memory).
const MEMORY_MARGIN: u64 = 64 << 20;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// This agent's directory on `/dev/shm` when that is a tmpfs, named as
/// its cgroup parent (unique per agent on a host).
pub(super) fn memory_root(cgroup_parent: &str) -> Option<PathBuf> {
    let shm = Path::new("/dev/shm");
    let stat = rustix::fs::statfs(shm).ok()?;
    (stat.f_type as i64 == TMPFS_MAGIC).then(|| shm.join(cgroup_parent))
}

/// Whether `images` holds a whole dump: its inventory and its memory
/// pages (not there when they went to a page server).
pub(super) fn holds_pages(images: &Path) -> bool {
    images.join("inventory.img").exists()
        && std::fs::read_dir(images).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("pagemap-"))
        })
}

fn free_bytes(path: &Path) -> u64 {
    rustix::fs::statvfs(path)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .unwrap_or(0)
}

impl Host {
    fn memory_dir(&self, name: &InstanceName) -> Option<PathBuf> {
        self.memory_staging
            .as_ref()
            .map(|root| root.join(name.as_str()))
    }

    /// The move's staging directory of `name`: the one in memory while it
    /// exists, else the one on disk.
    pub(super) fn migration_dir(&self, name: &InstanceName) -> PathBuf {
        match self.memory_dir(name) {
            Some(dir) if dir.exists() => dir,
            _ => self.dir(name).migration(),
        }
    }

    /// A fresh, empty staging directory of `name` for `bytes` of images:
    /// in memory if they fit there, else on disk; whatever an earlier
    /// move left in either goes.
    pub(super) async fn fresh_staging(
        &self,
        name: &InstanceName,
        bytes: u64,
    ) -> Result<PathBuf, DriverError> {
        self.clear_staging(name).await;
        let memory = self.memory_dir(name).filter(|dir| {
            let root = dir.parent().unwrap_or(dir);
            let _ = std::fs::create_dir_all(root);
            free_bytes(root) >= bytes.saturating_add(MEMORY_MARGIN)
        });
        let dir = memory.unwrap_or_else(|| self.dir(name).migration());
        super::create_dirs(std::slice::from_ref(&dir)).await?;
        tracing::debug!(instance = %name, bytes, "memory images staged in {}", dir.display());
        Ok(dir)
    }

    /// Remove both staging directories of `name` (and this agent's
    /// directory on `/dev/shm` once nothing else is staged there).
    pub(super) async fn clear_staging(&self, name: &InstanceName) {
        if let Some(dir) = self.memory_dir(name) {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            if let Some(root) = dir.parent() {
                let _ = tokio::fs::remove_dir(root).await;
            }
        }
        let _ = tokio::fs::remove_dir_all(self.dir(name).migration()).await;
    }

    /// Memory the container uses now (its cgroup's `memory.current`, or
    /// `memory.usage_in_bytes` under cgroup v1): what its images take,
    /// about. `None`: unknown.
    pub(super) fn cgroup_memory(&self, name: &InstanceName) -> Option<u64> {
        let group = Path::new(&self.cgroup_parent).join(name.as_str());
        let v2 = Path::new("/sys/fs/cgroup")
            .join(&group)
            .join("memory.current");
        let v1 = Path::new("/sys/fs/cgroup/memory")
            .join(&group)
            .join("memory.usage_in_bytes");
        [v2, v1].iter().find_map(|file| {
            std::fs::read_to_string(file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        })
    }

    /// Move the final dump's images into `checkpoint` (on disk): a rename
    /// within the disk, a copy out of memory.
    pub(super) async fn keep_images(
        &self,
        images: &Path,
        checkpoint: &Path,
    ) -> Result<(), DriverError> {
        let _ = tokio::fs::remove_dir_all(checkpoint).await;
        if tokio::fs::rename(images, checkpoint).await.is_ok() {
            return Ok(());
        }
        let (from, to, timeout) = (images.to_path_buf(), checkpoint.to_path_buf(), self.timeout);
        tokio::task::spawn_blocking(move || super::super::bundle::copy_tree(&from, &to, timeout))
            .await
            .map_err(|e| DriverError::Runtime(format!("copying the final dump: {e}")))??;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn host(dir: &Path) -> Host {
        Host::new(dir, "n1", 1 << 20, Duration::from_secs(10))
    }

    #[tokio::test]
    async fn images_go_to_memory_when_they_fit_and_to_disk_when_not() {
        let dir = tempfile::tempdir().unwrap();
        let host = host(dir.path());
        let Some(root) = host.memory_staging.clone() else {
            eprintln!("skipped: /dev/shm is not a tmpfs here");
            return;
        };
        let name = InstanceName::parse("c1").unwrap();
        let small = host.fresh_staging(&name, 1 << 20).await.unwrap();
        assert!(small.starts_with(&root), "{}", small.display());
        assert_eq!(host.migration_dir(&name), small);
        let big = host.fresh_staging(&name, u64::MAX).await.unwrap();
        assert_eq!(big, host.dir(&name).migration());
        assert!(!small.exists(), "the memory copy of an earlier move stays");
        assert_eq!(host.migration_dir(&name), big);
        host.clear_staging(&name).await;
        assert!(!big.exists());
        assert!(!root.exists(), "an empty staging root stays on /dev/shm");
    }

    #[tokio::test]
    async fn a_final_dump_in_memory_is_kept_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let host = host(dir.path());
        let name = InstanceName::parse("c2").unwrap();
        let images = host
            .fresh_staging(&name, 1 << 20)
            .await
            .unwrap()
            .join("images");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::write(images.join("pages-1.img"), b"pages").unwrap();
        let checkpoint = host.dir(&name).checkpoint();
        host.keep_images(&images, &checkpoint).await.unwrap();
        assert_eq!(
            std::fs::read(checkpoint.join("pages-1.img")).unwrap(),
            b"pages"
        );
        host.clear_staging(&name).await;
    }
}
