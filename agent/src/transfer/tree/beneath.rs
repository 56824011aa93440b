//! Opening entries of a tree relative to its root without ever leaving it:
//! `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, so a path one
//! component of which a running container swapped for a symlink (to a
//! host file, say) fails to open instead of being followed.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{openat2, Mode, OFlags, ResolveFlags, CWD};
use rustix::io::Errno;

fn resolve() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

/// The root directory itself (not a symlink to one).
pub fn root(path: &Path) -> std::io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(openat2(
        CWD,
        path,
        flags,
        Mode::empty(),
        ResolveFlags::NO_MAGICLINKS,
    )?)
}

/// `rel` beneath `root`, opened with `flags`; `None` when it is not there
/// any more as such: gone, or a symlink somewhere on the way.
fn open(root: &OwnedFd, rel: &Path, flags: OFlags) -> std::io::Result<Option<File>> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match openat2(root, rel, flags, Mode::empty(), resolve()) {
        Ok(fd) => Ok(Some(File::from(fd))),
        Err(Errno::LOOP | Errno::NOENT | Errno::NOTDIR | Errno::XDEV) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A regular file beneath `root`, for reading.
pub fn file(root: &OwnedFd, rel: &Path) -> std::io::Result<Option<File>> {
    let Some(file) = open(root, rel, OFlags::RDONLY)? else {
        return Ok(None);
    };
    Ok(file.metadata()?.is_file().then_some(file))
}

/// A directory beneath `root`, to set its metadata through.
pub fn dir(root: &OwnedFd, rel: &Path) -> std::io::Result<Option<File>> {
    open(root, rel, OFlags::RDONLY | OFlags::DIRECTORY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_outside_the_root_opens_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"host").unwrap();
        std::fs::write(dir.path().join("plain"), b"mine").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("up")).unwrap();
        let root = root(dir.path()).unwrap();
        assert!(file(&root, Path::new("plain")).unwrap().is_some());
        assert!(file(&root, Path::new("link")).unwrap().is_none());
        assert!(file(&root, Path::new("up/secret")).unwrap().is_none());
        assert!(super::dir(&root, Path::new("up")).unwrap().is_none());
    }
}
