//! Can this host's CRIU dump a process holding an internet socket? CRIU
//! 4.1 cannot on kernels 6.16 and later ("Can't get 1:16 opt", CRIU issue
//! 2705), and a networked instance always holds one. Found out once per
//! CRIU version and kernel release (the answer is kept in the data dir) by
//! dumping a `sleep` whose stdin is a listening TCP socket, so the
//! compatibility check refuses a move before anything freezes.
//!
//! Only a yes is kept: a kept no would refuse every live move of a
//! networked instance on this member until its data dir is wiped. A no is
//! tried again at the next probe of the facts; within one probe a failed
//! dump is retried. The sleep leads its own session (see `lone_process`):
//! CI's failures were that, not a passing fault.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const CACHE_FILE: &str = "criu-inet-probe";
const ATTEMPTS: u32 = 3;
const RETRY_AFTER: Duration = Duration::from_millis(500);

pub fn can_dump_inet(data_dir: &Path, criu_version: &str, timeout: Duration) -> bool {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let key = format!("criu {criu_version} kernel {}", kernel.trim());
    let cache = data_dir.join(CACHE_FILE);
    if let Ok(text) = std::fs::read_to_string(&cache) {
        if text.trim().strip_prefix(&key).map(str::trim) == Some("yes") {
            return true;
        }
    }
    let dumped = (1..=ATTEMPTS).any(|attempt| {
        if attempt > 1 {
            std::thread::sleep(RETRY_AFTER);
        }
        probe(data_dir, timeout, attempt)
    });
    if !dumped {
        tracing::warn!("this host's CRIU cannot dump internet sockets; networked instances cannot move live here");
        return false;
    }
    if let Err(e) = std::fs::write(&cache, format!("{key} yes\n")) {
        tracing::warn!(
            "cannot keep the CRIU socket probe's answer in {}: {e}",
            cache.display()
        );
    }
    dumped
}

fn probe(data_dir: &Path, timeout: Duration, attempt: u32) -> bool {
    let listener = match std::net::TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("CRIU socket probe: cannot listen on loopback: {e}");
            return false;
        }
    };
    let spawned = spawn_holder(listener.into());
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
        let why = match out {
            None => format!("criu could not run or did not finish within {timeout:?}"),
            Some(_) => dump_errors(&log),
        };
        tracing::info!(attempt, "CRIU socket probe: the dump failed: {why}");
    }
    let _ = holder.kill();
    let _ = holder.wait();
    let _ = std::fs::remove_dir_all(&images);
    dumped
}

/// A `sleep` whose stdin is `socket`, in a session of its own.
fn spawn_holder(socket: OwnedFd) -> std::io::Result<std::process::Child> {
    let mut sleep = Command::new("sleep");
    sleep
        .arg("60")
        .stdin(Stdio::from(socket))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure only makes async-signal-safe calls.
    unsafe {
        sleep.pre_exec(lone_process);
    }
    sleep.spawn()
}

/// Runs in the forked child before exec: the sleep leads its own session.
/// CRIU refuses a process whose session leader it cannot see ("A session
/// leader of N is outside of its pid namespace"), which is what a CI
/// runner inside a pid namespace gave the agent's children.
fn lone_process() -> std::io::Result<()> {
    rustix::process::setsid()?;
    Ok(())
}

/// The errors of a failed dump's log, without the warning CRIU logs as
/// an error on every run where it may not raise its own file limit.
fn dump_errors(log: &str) -> String {
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE"))
        .collect();
    if errors.is_empty() {
        "no reason logged".to_string()
    } else {
        errors.join("; ")
    }
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
    }

    #[test]
    fn the_socket_holder_leads_its_own_session() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let mut holder = spawn_holder(listener.into()).expect("spawn sleep");
        let pid = rustix::process::Pid::from_child(&holder);
        let sid = rustix::process::getsid(Some(pid));
        let _ = holder.kill();
        let _ = holder.wait();
        assert_eq!(sid.expect("getsid"), pid);
    }

    #[test]
    fn a_failed_dump_names_its_errors_but_not_the_file_limit_warning() {
        let log = "(00.001) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self\n\
                   (00.002) Error (criu/sockets.c:628): sockets: Can't get 1:16 opt\n\
                   (00.003) Error (criu/cr-dump.c:1975): Dumping FAILED.\n";
        let why = dump_errors(log);
        assert!(
            why.contains("1:16 opt") && why.contains("Dumping FAILED"),
            "{why}"
        );
        assert!(!why.contains("RLIMIT"), "{why}");
    }
}
