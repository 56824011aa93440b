//! btrfs filesystems for agents' data dirs, on loop-mounted sparse image
//! files the harness makes (moves whose rootfs goes by btrfs
//! send/receive).

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::run_tool;

/// Mounted filesystems, unmounted when it drops: declare it before the
/// cluster, so the cluster (and its containers, whose files are on them)
/// goes first.
#[derive(Default)]
pub struct Filesystems(Vec<PathBuf>);

impl Filesystems {
    /// A fresh btrfs of `size` bytes (sparse) in `image`, mounted at `dir`.
    pub fn btrfs(&mut self, dir: &Path, image: &Path, size: u64) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::File::create(image)?.set_len(size)?;
        run_tool("mkfs.btrfs", &["-q", &image.to_string_lossy()])?;
        let (image, at) = (image.to_string_lossy(), dir.to_string_lossy());
        run_tool("mount", &["-o", "loop", &image, &at])?;
        self.0.push(dir.to_path_buf());
        Ok(())
    }

    /// Member `name`'s data dir of `cluster_root` on a btrfs of its own
    /// (before the member starts).
    pub fn btrfs_data_dir(&mut self, cluster_root: &Path, name: &str, size: u64) -> Result<()> {
        let image = cluster_root.join(format!("{name}.btrfs"));
        self.btrfs(&cluster_root.join(name), &image, size)
    }
}

impl Drop for Filesystems {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = run_tool("umount", &["-l", &dir.to_string_lossy()]);
        }
    }
}
