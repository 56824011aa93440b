//! Lazy moves (CRIU lazy pages): the source's lazy dump, whose page
//! server serves the pages from the paused container until the target
//! has them all, and the target's held restore with its lazy-pages
//! daemon, fed through one end of a socket pair (`--ps-socket 0`, as the
//! page server), so it listens on no port.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use futures::FutureExt;

use super::final_dump::criu_fed;
use super::{create_dirs, Host};
use crate::api::names::InstanceName;
use crate::driver::{Driver, DriverError, LazyDump, PageServer};

/// The smallest `fs.pipe-max-size` CRIU's lazy page server works with,
/// short of CAP_SYS_RESOURCE: it grows a pipe to 819 pages and ignores a
/// refusal (CRIU 4.2 `pipe_read_dest_init`), then fails as the target
/// connects ("splice: Bad file descriptor").
pub const LAZY_PIPE_BYTES: u64 = 4 << 20;

/// Why this host cannot serve a lazy move's pages, if it cannot.
pub fn lazy_unavailable(pipe_max_size: Option<u64>, cap_sys_resource: bool) -> Option<String> {
    match (cap_sys_resource, pipe_max_size) {
        (true, _) => None,
        (false, Some(size)) if size >= LAZY_PIPE_BYTES => None,
        (false, size) => Some(format!(
            "CRIU's lazy page server needs CAP_SYS_RESOURCE or fs.pipe-max-size of at least {LAZY_PIPE_BYTES} (it is {}); 'sysctl -w fs.pipe-max-size={LAZY_PIPE_BYTES}' on the source",
            size.map_or("unreadable".to_string(), |s| s.to_string())
        )),
    }
}

/// [`lazy_unavailable`] for this host, from /proc.
pub fn lazy_unavailable_here() -> Option<String> {
    let pipe_max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    // CAP_SYS_RESOURCE is bit 24 of the effective set.
    let cap = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("CapEff:"))?.to_string();
            u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 24) != 0);
    lazy_unavailable(pipe_max, cap)
}

/// Whether the command line `cmdline` (NUL-separated, as in /proc) is a
/// lazy dump by the runc whose state root is `root`.
fn lazy_dump_of(cmdline: &[u8], root: &Path) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let root = root.as_os_str().as_encoded_bytes();
    let rooted = args
        .windows(2)
        .any(|w| w.first() == Some(&&b"--root"[..]) && w.get(1) == Some(&root));
    let has = |arg: &[u8]| args.contains(&arg);
    rooted && has(b"checkpoint") && has(b"--lazy-pages")
}

impl Host {
    /// At the agent's start: a lazy dump an earlier agent process left
    /// running ends (no stream of this process can reach its page
    /// server, and if its target never connected, its CRIU would hold
    /// the copy's tasks until killed; they stay paused).
    pub(super) fn end_leftover_lazy_dumps(&self) {
        let root = self.data_dir.join("runc");
        for pid in crate::driver::all_pids() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if lazy_dump_of(&cmdline, &root) {
                tracing::warn!(pid, "ending a lazy dump an earlier agent process left");
                crate::driver::end_process_tree(pid);
            }
        }
    }

    /// Source, paused: everything but the memory pages into fresh staged
    /// images, the pages served on a loopback port.
    pub(super) async fn dump_lazy_frozen(
        &self,
        name: &InstanceName,
    ) -> Result<LazyDump, DriverError> {
        self.expect_paused(name, "before its lazy dump").await?;
        let staging = self.fresh_staging(name, 0).await?;
        let (images, work) = (staging.join("images"), staging.join("work"));
        create_dirs(&[images.clone(), work.clone()]).await?;
        self.criu_listens_on_loopback(name).await?;
        let server = free_loopback_port()?;
        let dir = self.dir(name);
        let checkpoint = self
            .runc
            .checkpoint_lazy(name.as_str(), (&images, &work), server, &dir.runc_log())
            .await?;
        // CRIU thawed the cgroup to seize the tasks and holds them in
        // ptrace stops while it serves (runc calls that running): frozen
        // again, a CRIU that dies lets them go into the freezer, not back
        // to running (tried by hand: after a kill -9 of CRIU the copy
        // stayed paused, its counter still).
        if let Err(e) = self.freeze(name).await {
            // Its CRIU would hold the tasks through the caller's thaw.
            if let Some(pid) = checkpoint.pid {
                crate::driver::end_process_tree(pid);
            }
            return Err(e);
        }
        Ok(LazyDump {
            server,
            done: checkpoint
                .done
                .map(|r| r.map_err(DriverError::from))
                .boxed(),
            pid: checkpoint.pid,
        })
    }

    /// In lazy mode CRIU listens on every address whatever runc says,
    /// unless its config file names one (runc hands it the file named at
    /// create, `criu.conf`).
    async fn criu_listens_on_loopback(&self, name: &InstanceName) -> Result<(), DriverError> {
        let path = self.dir(name).root().join("criu.conf");
        let now = tokio::fs::read_to_string(&path).await.unwrap_or_default();
        if now.lines().any(|l| l.trim() == LOOPBACK) {
            return Ok(());
        }
        let text = format!("{now}{LOOPBACK}\n");
        tokio::fs::write(&path, text)
            .await
            .map_err(|e| DriverError::Runtime(format!("cannot write {}: {e}", path.display())))
    }

    /// Target: CRIU's lazy-pages daemon for the staged images, listening
    /// in the restore's work dir. It fetches every page in the background
    /// once the restore registered, and first those the tasks touch;
    /// `done` ends once it has them all and logged no error.
    pub(super) async fn start_lazy_pages_daemon(
        &self,
        name: &InstanceName,
    ) -> Result<PageServer, DriverError> {
        if crate::hooks::criu_fails(&self.data_dir, "restore") {
            return Err(DriverError::Runtime(
                "CRIU restore failed (test hook)".into(),
            ));
        }
        let (images, work) = (self.images(name), self.restore_work(name, true));
        // What an earlier move left there goes (its socket above all).
        let _ = tokio::fs::remove_dir_all(&work).await;
        create_dirs(std::slice::from_ref(&work)).await?;
        let socket = work.join("lazy-pages.socket");
        let daemon = criu_fed(
            &["lazy-pages", "--page-server"],
            (&images, &work),
            LAZY_LOG,
            self.timeout,
        )?;
        wait_for_socket(&socket).await?;
        let log = work.join(LAZY_LOG);
        let done = async move {
            daemon.done.await?;
            let text = tokio::fs::read_to_string(&log).await.unwrap_or_default();
            match super::super::runc::criu_errors(&text) {
                errors if errors.is_empty() => Ok(()),
                errors => Err(DriverError::Runtime(format!(
                    "CRIU's lazy-pages daemon ended well but logged errors: {}",
                    errors.join("; ")
                ))),
            }
        };
        Ok(PageServer {
            socket: daemon.socket,
            done: done.boxed(),
        })
    }
}

const LOOPBACK: &str = "address 127.0.0.1";
const LAZY_LOG: &str = "lazy-pages.log";

/// A loopback port free now (CRIU binds it a moment later).
fn free_loopback_port() -> Result<SocketAddr, DriverError> {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| DriverError::Runtime(format!("no loopback port for the lazy dump: {e}")))
}

/// The daemon's socket appears once it listens for the restore.
async fn wait_for_socket(socket: &Path) -> Result<(), DriverError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !socket.exists() {
        if std::time::Instant::now() > deadline {
            return Err(DriverError::Runtime(format!(
                "CRIU's lazy-pages daemon did not listen ({} missing after 10 s)",
                socket.display()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leftover_lazy_dump_is_told_by_its_runc_root_and_arguments() {
        let root = Path::new("/var/lib/ferry/runc");
        let line = |args: &[&str]| args.join("\0").into_bytes();
        let lazy = ["runc", "--root", "/var/lib/ferry/runc", "--log", "l"];
        let dump = [&lazy[..], &["checkpoint", "--lazy-pages", "c1"]].concat();
        assert!(lazy_dump_of(&line(&dump), root));
        // Another agent's, a plain checkpoint, a restore: not ours to end.
        let other = dump
            .iter()
            .map(|a| a.replace("/var/lib/ferry", "/srv/n2"))
            .collect::<Vec<_>>();
        let other: Vec<&str> = other.iter().map(String::as_str).collect();
        assert!(!lazy_dump_of(&line(&other), root));
        let plain = [&lazy[..], &["checkpoint", "c1"]].concat();
        assert!(!lazy_dump_of(&line(&plain), root));
        let restore = [&lazy[..], &["restore", "--lazy-pages", "c1"]].concat();
        assert!(!lazy_dump_of(&line(&restore), root));
    }

    #[test]
    fn a_lazy_dump_needs_cap_sys_resource_or_a_pipe_max_size_of_4_mib() {
        assert_eq!(lazy_unavailable(Some(4 << 20), false), None);
        assert_eq!(lazy_unavailable(Some(1 << 20), true), None);
        let refused = lazy_unavailable(Some(1 << 20), false).unwrap_or_default();
        assert!(
            refused.contains("sysctl -w fs.pipe-max-size=4194304"),
            "{refused}"
        );
        assert!(refused.contains("(it is 1048576)"), "{refused}");
        assert!(lazy_unavailable(None, false).is_some());
    }
}
