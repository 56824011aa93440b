//! Can this host's CRIU dump a process holding an internet socket? CRIU
//! 4.1 cannot on kernels 6.16 and later ("Can't get 1:16 opt", CRIU issue
//! 2705), and a networked instance always holds one. Found out once per
//! CRIU version and kernel release (the answer is kept in the data dir) by
//! dumping a `sleep` whose stdin is a listening TCP socket, so the
//! compatibility check refuses a move before anything freezes.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const CACHE_FILE: &str = "criu-inet-probe";

pub fn can_dump_inet(data_dir: &Path, criu_version: &str, timeout: Duration) -> bool {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let key = format!("criu {criu_version} kernel {}", kernel.trim());
    let cache = data_dir.join(CACHE_FILE);
    if let Ok(text) = std::fs::read_to_string(&cache) {
        if let Some(answer) = text.trim().strip_prefix(&key) {
            return answer.trim() == "yes";
        }
    }
    let dumped = probe(data_dir, timeout);
    let answer = if dumped { "yes" } else { "no" };
    if let Err(e) = std::fs::write(&cache, format!("{key} {answer}\n")) {
        tracing::warn!(
            "cannot keep the CRIU socket probe's answer in {}: {e}",
            cache.display()
        );
    }
    dumped
}

fn probe(data_dir: &Path, timeout: Duration) -> bool {
    let listener = match std::net::TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("CRIU socket probe: cannot listen on loopback: {e}");
            return false;
        }
    };
    let socket: OwnedFd = listener.into();
    let spawned = Command::new("sleep")
        .arg("60")
        .stdin(Stdio::from(socket))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut holder = match spawned {
        Ok(child) => child,
        Err(e) => {
            tracing::warn!("CRIU socket probe: cannot start sleep: {e}");
            return false;
        }
    };
    let images = data_dir.join("tmp").join(CACHE_FILE);
    let _ = std::fs::remove_dir_all(&images);
    let _ = std::fs::create_dir_all(&images);
    let pid = holder.id().to_string();
    let dir = images.to_string_lossy().into_owned();
    let args = ["dump", "-t", &pid, "-D", &dir, "-o", "dump.log"];
    let out = crate::facts::run_with_timeout(
        "criu",
        &[&args[..], &["--shell-job", "--leave-running"]].concat(),
        timeout,
    );
    let dumped = out.as_ref().is_some_and(|o| o.success);
    if !dumped {
        let log = std::fs::read_to_string(images.join("dump.log")).unwrap_or_default();
        let why = log
            .lines()
            .find(|l| l.contains("Error"))
            .unwrap_or("no reason logged");
        tracing::warn!("this host's CRIU cannot dump internet sockets ({why}); networked instances cannot move live here");
    }
    let _ = holder.kill();
    let _ = holder.wait();
    let _ = std::fs::remove_dir_all(&images);
    dumped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_kept_per_criu_version_and_kernel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let key = format!("criu 9.9 kernel {}", kernel.trim());
        std::fs::write(dir.path().join(CACHE_FILE), format!("{key} yes\n")).expect("write");
        // Kept: no probe runs (there is no CRIU 9.9 to run).
        assert!(can_dump_inet(dir.path(), "9.9", Duration::from_secs(1)));
        std::fs::write(dir.path().join(CACHE_FILE), format!("{key} no\n")).expect("write");
        assert!(!can_dump_inet(dir.path(), "9.9", Duration::from_secs(1)));
    }
}
