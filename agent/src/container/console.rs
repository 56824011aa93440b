//! The console logger: what a container prints reaches it through a pipe
//! (which CRIU can dump and restore) and it appends to `console.log`,
//! keeping at most `max_bytes` there: past that the file becomes
//! `console.log.1` (replacing the older one) and a new one starts. It runs
//! in the container's shim (`shim.rs`), so it outlives the agent. The cap is `ferry agent --console-log-max` (8M by default).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

fn open(path: &Path) -> std::io::Result<(File, u64)> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let len = file.metadata()?.len();
    Ok((file, len))
}

fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Copy `input` to `path` until it ends, rotating at `max_bytes`.
pub fn run_logger(mut input: impl Read, path: &Path, max_bytes: u64) -> std::io::Result<()> {
    let max_bytes = max_bytes.max(1);
    let (mut file, mut len) = open(path)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            if len >= max_bytes {
                std::fs::rename(path, rotated(path))?;
                (file, len) = open(path)?;
            }
            let room = usize::try_from(max_bytes - len).unwrap_or(usize::MAX);
            let (now, later) = chunk.split_at(chunk.len().min(room));
            file.write_all(now)?;
            len += now.len() as u64;
            chunk = later;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_rotates_at_its_cap_and_keeps_one_older_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let input = vec![b'x'; 2500];
        run_logger(&input[..], &path, 1000).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 500);
        assert_eq!(std::fs::metadata(rotated(&path)).unwrap().len(), 1000);
        // Appends across restarts of the logger, still within the cap.
        run_logger(&b"yy"[..], &path, 1000).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 502);
    }
}
