//! The disk reserve: instance data (launches, incoming moves) may not eat
//! the last `--disk-reserve` bytes of the data dir's filesystem, so the
//! Raft log and state always have room to record what happened, even the
//! failure of the transfer that filled the disk.

use std::path::{Path, PathBuf};

/// The filesystem under `path` and the bytes on it that instance data
/// leaves free.
#[derive(Clone, Debug)]
pub struct Reserve {
    path: PathBuf,
    bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    #[error("{what} needs {} MiB, but {} has {} MiB free of which {} MiB are kept in reserve (--disk-reserve); free space there or choose another member", mib(*.needed), .path.display(), mib(*.free), mib(*.reserve))]
    Full {
        what: String,
        needed: u64,
        free: u64,
        reserve: u64,
        path: PathBuf,
    },
    #[error("cannot read the free space of {}: {source}", .path.display())]
    Unknown {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

impl Reserve {
    pub fn new(path: &Path, bytes: u64) -> Reserve {
        Reserve {
            path: path.to_path_buf(),
            bytes,
        }
    }

    /// Bytes available to unprivileged writers on the filesystem.
    pub fn free(&self) -> Result<u64, SpaceError> {
        let stat = rustix::fs::statvfs(&self.path).map_err(|e| SpaceError::Unknown {
            path: self.path.clone(),
            source: e.into(),
        })?;
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// What instance data may still take: free space above the reserve.
    pub fn room(&self) -> Result<u64, SpaceError> {
        Ok(self.free()?.saturating_sub(self.bytes))
    }

    /// Refuse `needed` more bytes for `what` if they would cross the
    /// reserve.
    pub fn check(&self, needed: u64, what: &str) -> Result<(), SpaceError> {
        let free = self.free()?;
        if free.saturating_sub(self.bytes) >= needed {
            return Ok(());
        }
        Err(SpaceError::Full {
            what: what.to_string(),
            needed,
            free,
            reserve: self.bytes,
            path: self.path.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_need_that_would_cross_the_reserve_is_refused_with_the_figures() {
        let dir = tempfile::tempdir().unwrap();
        let none = Reserve::new(dir.path(), 0);
        let free = none.free().unwrap();
        assert!(free > 0);
        assert!(none.check(1, "a file").is_ok());
        // A reserve as large as the free space leaves no room at all.
        let all = Reserve::new(dir.path(), free + (1 << 30));
        assert_eq!(all.room().unwrap(), 0);
        let err = all
            .check(5 << 20, "the rootfs of c1")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("the rootfs of c1 needs 5 MiB"), "{err}");
        assert!(err.contains("--disk-reserve"), "{err}");
    }
}
