//! The `runc` binary, driven as a child process (never in-process). Each
//! agent has its own state root so several agents share a host; every call
//! logs to the instance's runc.log, and errors name that file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::Deserialize;
use tokio::process::Command;

use super::shim;
use crate::driver::ExecOutput;

/// How long past the runtime timeout a shim may take to report.
const SHIM_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Where the shim records how a container's process ended: beside its
/// runc log.
pub fn last_exit_file(log: &Path) -> PathBuf {
    log.with_file_name("last-exit")
}

/// The first line `out` writes, without its newline.
async fn first_line(out: tokio::process::ChildStdout) -> std::io::Result<String> {
    use tokio::io::AsyncBufReadExt;
    let mut line = String::new();
    tokio::io::BufReader::new(out).read_line(&mut line).await?;
    Ok(line.trim_end().to_string())
}

/// Output of `ferry exec` kept at most (per stream).
const MAX_EXEC_OUTPUT: usize = 1 << 20;

mod lazy;

#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    #[error("cannot run runc ({0}); is runc installed? (scripts/install-deps.sh)")]
    Spawn(std::io::Error),
    #[error("runc {op} of '{id}' failed: {message} (see {log})")]
    Failed {
        op: &'static str,
        id: String,
        message: String,
        log: PathBuf,
    },
    #[error("runc {op} of '{id}' did not finish within {}s and was killed (see {}); raise --runtime-timeout if the host is only slow", .after.as_secs(), .log.display())]
    TimedOut {
        op: &'static str,
        id: String,
        after: std::time::Duration,
        log: PathBuf,
    },
    #[error("cannot prepare {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// CRIU `Error` lines put in an error message, at most.
const CRIU_REASONS: usize = 3;

/// CRIU's own reasons (its `Error (file:line): ...` lines, first ones
/// first: the first is usually the cause), without timestamps.
pub(super) fn criu_errors(log_text: &str) -> Vec<String> {
    let mut reasons: Vec<String> = Vec::new();
    for line in log_text.lines() {
        let Some(at) = line.find("Error (") else {
            continue;
        };
        let rest = &line[at..];
        let reason = rest.split_once("): ").map_or(rest, |(_, r)| r).trim();
        if !reason.is_empty() && !reasons.iter().any(|r| r == reason) {
            reasons.push(reason.to_string());
        }
        if reasons.len() == CRIU_REASONS {
            break;
        }
    }
    reasons
}

/// A failed dump or restore with CRIU's reasons from `criu_log` added, and
/// that log copied beside the runc log (`criu-dump.log`, `criu-restore.log`):
/// the work dir it was in goes with the staging area.
fn with_criu_reasons(error: RuncError, criu_log: &Path, runc_log: &Path) -> RuncError {
    let RuncError::Failed {
        op,
        id,
        message,
        log,
    } = error
    else {
        return error;
    };
    let Ok(text) = std::fs::read_to_string(criu_log) else {
        return RuncError::Failed {
            op,
            id,
            message,
            log,
        };
    };
    let kept = runc_log.with_file_name(format!("criu-{op}.log"));
    let kept_note = match std::fs::copy(criu_log, &kept) {
        Ok(_) => kept.display().to_string(),
        Err(_) => criu_log.display().to_string(),
    };
    let reasons = criu_errors(&text);
    let criu = match reasons.is_empty() {
        true => "no Error line".to_string(),
        false => reasons.join("; "),
    };
    // runc's own last line then only names the log in the work dir,
    // which goes with the staging area.
    let message = match message.starts_with("log file:") {
        true => "CRIU failed".to_string(),
        false => message,
    };
    RuncError::Failed {
        op,
        id,
        message: format!("{message}; CRIU says: {criu} (CRIU log: {kept_note})"),
        log,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Running,
    Paused,
    /// Created or exited: present in runc's state, not running.
    Stopped,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerState {
    pub status: Status,
    pub pid: u32,
}

#[derive(Deserialize)]
struct RawState {
    id: String,
    status: String,
    #[serde(default)]
    pid: u32,
}

fn parse_status(status: &str) -> Status {
    match status {
        "running" => Status::Running,
        "paused" | "pausing" => Status::Paused,
        _ => Status::Stopped,
    }
}

#[derive(Clone, Debug)]
pub struct Runc {
    /// The runc binary (`runc` on PATH).
    binary: PathBuf,
    root: PathBuf,
    /// What each container's `console.log` keeps at most.
    console_max_bytes: u64,
    /// Every runc call (and the CRIU work it drives) ends within this, or
    /// is killed.
    timeout: std::time::Duration,
}

/// How a checkpoint dumps.
#[derive(Clone, Copy, Debug, Default)]
pub struct Dump {
    /// The container keeps its state (running or paused) after the dump.
    pub leave_running: bool,
    /// Established TCP connections are dumped (and restored) too.
    pub tcp_established: bool,
    /// The memory pages go to CRIU's page server there, not into the
    /// image directory.
    pub page_server: Option<std::net::SocketAddr>,
}

/// How a restore runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Restore {
    /// The TCP connections the dump kept come back too.
    pub tcp_established: bool,
    /// The memory pages come from CRIU's lazy-pages daemon, listening in
    /// the restore's work dir.
    pub lazy_pages: bool,
}

impl Dump {
    pub fn leaving_running(tcp_established: bool) -> Self {
        Dump {
            leave_running: true,
            tcp_established,
            page_server: None,
        }
    }
}

impl Runc {
    pub fn new(root: PathBuf, console_max_bytes: u64, timeout: std::time::Duration) -> Self {
        Runc {
            binary: PathBuf::from("runc"),
            root,
            console_max_bytes,
            timeout,
        }
    }

    /// `fut` (a runc child with `kill_on_drop`) within the timeout; the
    /// child is killed when it is exceeded.
    async fn bounded<T>(
        &self,
        op: &'static str,
        id: &str,
        log: &Path,
        fut: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> Result<T, RuncError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(RuncError::Spawn),
            Err(_) => Err(RuncError::TimedOut {
                op,
                id: id.to_string(),
                after: self.timeout,
                log: log.to_path_buf(),
            }),
        }
    }

    /// runc's options before the subcommand.
    fn global_args(&self, log: &Path) -> [OsString; 4] {
        [
            "--root".into(),
            self.root.clone().into(),
            "--log".into(),
            log.into(),
        ]
    }

    fn command(&self, log: &Path) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(self.global_args(log))
            .stdin(Stdio::null())
            // Dropped only when its timeout passed: then it must end.
            .kill_on_drop(true);
        cmd
    }

    async fn run(
        &self,
        op: &'static str,
        id: &str,
        log: &Path,
        mut cmd: Command,
    ) -> Result<std::process::Output, RuncError> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let output = self.bounded(op, id, log, cmd.output()).await?;
        if output.status.success() {
            return Ok(output);
        }
        Err(RuncError::Failed {
            op,
            id: id.to_string(),
            message: last_line(&output.stderr),
            log: log.to_path_buf(),
        })
    }

    /// Containers this agent's runc knows, by id.
    pub async fn list(&self, log: &Path) -> Result<Vec<(String, ContainerState)>, RuncError> {
        let mut cmd = self.command(log);
        cmd.args(["list", "--format", "json"]);
        let out = self.run("list", "*", log, cmd).await?;
        let raw: Option<Vec<RawState>> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        Ok(raw
            .unwrap_or_default()
            .into_iter()
            .map(|r| {
                (
                    r.id,
                    ContainerState {
                        status: parse_status(&r.status),
                        pid: r.pid,
                    },
                )
            })
            .collect())
    }

    pub async fn state(&self, id: &str, log: &Path) -> Result<Option<ContainerState>, RuncError> {
        Ok(self
            .list(log)
            .await?
            .into_iter()
            .find(|(name, _)| name == id)
            .map(|(_, state)| state))
    }

    /// Start detached.
    pub async fn run_detached(&self, id: &str, bundle: &Path, log: &Path) -> Result<(), RuncError> {
        let sub: Vec<OsString> = vec![
            "run".into(),
            "--detach".into(),
            "--bundle".into(),
            bundle.into(),
        ];
        self.detached("run", id, log, sub).await
    }

    /// Run a runc command that leaves the container behind, through
    /// `ferry shim` (see `shim.rs`), which stays as the container's parent
    /// and console logger in its own process group, outliving the agent.
    /// The console is a pipe, not the file itself: CRIU cannot dump a host
    /// file opened outside the container's mounts, while a pipe it records
    /// and runc reconnects on restore. runc hands that pipe to the
    /// container, so errors come from runc's log file.
    async fn detached(
        &self,
        op: &'static str,
        id: &str,
        log: &Path,
        mut sub: Vec<OsString>,
    ) -> Result<(), RuncError> {
        let fail = |source| RuncError::File {
            path: log.to_path_buf(),
            source,
        };
        let pid_file = log.with_file_name("init.pid");
        sub.extend(["--pid-file".into(), pid_file.clone().into(), id.into()]);
        let mut runc = vec![self.binary.clone().into_os_string()];
        runc.extend(self.global_args(log));
        runc.extend(sub);
        // The binary this agent runs, even once a package upgrade replaced
        // the file on disk (`current_exe` then names a deleted path), so
        // the shim always speaks this agent's protocol.
        let mut shim = Command::new("/proc/self/exe");
        shim.arg0("ferry")
            .arg("shim")
            .arg("--console")
            .arg(log.with_file_name("console.log"))
            .arg("--console-max-bytes")
            .arg(self.console_max_bytes.to_string())
            .arg("--exit-file")
            .arg(last_exit_file(log))
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("--timeout-ms")
            .arg(self.timeout.as_millis().to_string())
            .arg("--")
            .args(runc)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(false);
        let mut child = shim.spawn().map_err(fail)?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| fail(std::io::Error::other("no stdout")))?;
        // The shim kills runc at the timeout and says so; this bound only
        // covers a shim that cannot even do that.
        let line = tokio::time::timeout(self.timeout + SHIM_GRACE, first_line(stdout)).await;
        match line {
            Ok(Ok(line)) if line == shim::RUNC_OK => Ok(()),
            Ok(Ok(line)) if line == shim::RUNC_FAILED => Err(self.failure(op, id, log)),
            Ok(Ok(line)) if line != shim::RUNC_TIMED_OUT => Err(RuncError::Failed {
                op,
                id: id.to_string(),
                message: format!("the container shim failed: {line}"),
                log: log.to_path_buf(),
            }),
            Ok(Err(e)) => Err(fail(e)),
            _ => Err(RuncError::TimedOut {
                op,
                id: id.to_string(),
                after: self.timeout,
                log: log.to_path_buf(),
            }),
        }
    }

    /// The last runc log line, for errors of commands whose stderr went to
    /// the console log.
    fn failure(&self, op: &'static str, id: &str, log: &Path) -> RuncError {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let message = text
            .lines()
            .rev()
            .find(|l| l.contains("level=error") || l.contains("error"))
            .unwrap_or("runc exited with an error")
            .to_string();
        RuncError::Failed {
            op,
            id: id.to_string(),
            message,
            log: log.to_path_buf(),
        }
    }

    pub async fn kill(&self, id: &str, signal: &str, log: &Path) -> Result<(), RuncError> {
        let mut cmd = self.command(log);
        cmd.args(["kill", "--all", id, signal]);
        self.run("kill", id, log, cmd).await.map(|_| ())
    }

    pub async fn delete(&self, id: &str, force: bool, log: &Path) -> Result<(), RuncError> {
        let mut cmd = self.command(log);
        cmd.arg("delete");
        if force {
            cmd.arg("--force");
        }
        cmd.arg(id);
        self.run("delete", id, log, cmd).await.map(|_| ())
    }

    pub async fn pause(&self, id: &str, log: &Path) -> Result<(), RuncError> {
        let mut cmd = self.command(log);
        cmd.args(["pause", id]);
        self.run("pause", id, log, cmd).await.map(|_| ())
    }

    pub async fn resume(&self, id: &str, log: &Path) -> Result<(), RuncError> {
        let mut cmd = self.command(log);
        cmd.args(["resume", id]);
        self.run("resume", id, log, cmd).await.map(|_| ())
    }

    /// CRIU dump through runc. Without `leave_running` the container is
    /// gone afterwards; with it, it keeps its state (running or paused).
    pub async fn checkpoint(
        &self,
        id: &str,
        images: &Path,
        work: &Path,
        dump: Dump,
        log: &Path,
    ) -> Result<(), RuncError> {
        let mut cmd = self.command(log);
        cmd.args(["checkpoint", "--image-path"])
            .arg(images)
            .arg("--work-path")
            .arg(work);
        if dump.leave_running {
            cmd.arg("--leave-running");
        }
        if dump.tcp_established {
            cmd.arg("--tcp-established");
        }
        if let Some(server) = dump.page_server {
            cmd.arg("--page-server").arg(server.to_string());
        }
        cmd.arg(id);
        let result = self.run("checkpoint", id, log, cmd).await.map(|_| ());
        result.map_err(|e| with_criu_reasons(e, &work.join("dump.log"), log))
    }

    /// CRIU restore through runc, detached.
    pub async fn restore(
        &self,
        id: &str,
        (bundle, images, work): (&Path, &Path, &Path),
        how: Restore,
        log: &Path,
    ) -> Result<(), RuncError> {
        let mut sub: Vec<OsString> = vec![
            "restore".into(),
            "--detach".into(),
            "--image-path".into(),
            images.into(),
            "--work-path".into(),
            work.into(),
            "--bundle".into(),
            bundle.into(),
        ];
        if how.tcp_established {
            sub.push("--tcp-established".into());
        }
        if how.lazy_pages {
            sub.push("--lazy-pages".into());
        }
        let result = self.detached("restore", id, log, sub).await;
        result.map_err(|e| with_criu_reasons(e, &work.join("restore.log"), log))
    }

    /// Pids of every process in the container.
    pub async fn pids(&self, id: &str, log: &Path) -> Result<Vec<u32>, RuncError> {
        let mut cmd = self.command(log);
        cmd.args(["ps", "--format", "json", id]);
        let out = self.run("ps", id, log, cmd).await?;
        Ok(serde_json::from_slice(&out.stdout).unwrap_or_default())
    }

    /// SIGKILL to every task of a paused container while it is still
    /// frozen, so none runs again when runc thaws it to let them die.
    /// runc does not see to that: `delete --force` signals only the init
    /// before it thaws the cgroup (the other tasks ran on for
    /// milliseconds; see the test), and `kill --all` freezes again first,
    /// which thaws the cgroup for 10 ms whenever it reads FREEZING 50
    /// times running (runc 1.1, cgroup v1). Frozen tasks cannot fork, so
    /// the list is complete. An empty one is an error: a paused container
    /// has an init, and the caller must not thaw what it could not kill.
    pub async fn kill_frozen(&self, id: &str, log: &Path) -> Result<(), RuncError> {
        let pids = self.pids(id, log).await?;
        if pids.is_empty() {
            return Err(RuncError::Failed {
                op: "ps",
                id: id.to_string(),
                message: "it listed no tasks of the paused container, which stays frozen".into(),
                log: log.to_path_buf(),
            });
        }
        crate::driver::signal_each(&pids, rustix::process::Signal::KILL);
        Ok(())
    }

    /// Run `argv` in the container. Each output stream is read up to
    /// [`MAX_EXEC_OUTPUT`] while it arrives; then the pipe is closed, so a
    /// command printing without end gets EPIPE instead of filling memory.
    pub async fn exec(
        &self,
        id: &str,
        argv: &[String],
        log: &Path,
    ) -> Result<ExecOutput, RuncError> {
        use tokio::io::AsyncReadExt;
        let mut child = self
            .command(log)
            .args(["exec", id])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(RuncError::Spawn)?;
        let capped = |pipe: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| async move {
            let mut out = Vec::new();
            if let Some(pipe) = pipe {
                let _ = pipe
                    .take(MAX_EXEC_OUTPUT as u64)
                    .read_to_end(&mut out)
                    .await;
            }
            out
        };
        let stdout = child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>);
        let finished = async {
            let (stdout, stderr) = tokio::join!(capped(stdout), capped(stderr));
            Ok((stdout, stderr, child.wait().await?))
        };
        let (stdout, stderr, status) = self.bounded("exec", id, log, finished).await?;
        Ok(ExecOutput {
            code: status.code().unwrap_or(-1),
            stdout,
            stderr,
        })
    }
}

/// The last line runc wrote to stderr: its error.
fn last_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no error output")
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn a_hung_runc_is_killed_at_the_timeout_and_the_error_says_so() {
        let dir = tempfile::tempdir().unwrap();
        // A stand-in for a runc that hangs (say, on a stuck CRIU).
        let hung = dir.path().join("runc");
        std::fs::write(&hung, "#!/bin/sh\nsleep 60\n").unwrap();
        std::fs::set_permissions(&hung, std::fs::Permissions::from_mode(0o755)).unwrap();
        let runc = Runc {
            binary: hung,
            ..Runc::new(
                dir.path().join("root"),
                1 << 20,
                std::time::Duration::from_millis(300),
            )
        };
        let started = std::time::Instant::now();
        let err = runc
            .pause("c1", &dir.path().join("runc.log"))
            .await
            .unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(
            matches!(err, RuncError::TimedOut { op: "pause", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("--runtime-timeout"), "{err}");
    }

    use super::*;

    #[tokio::test]
    async fn a_failed_dump_names_criu_s_own_reasons_and_keeps_its_log() {
        let dir = tempfile::tempdir().unwrap();
        // A stand-in for runc whose CRIU fails the way CRIU does: reasons
        // in dump.log in the work dir, runc's own line on stderr.
        let fake = dir.path().join("runc");
        let script = r#"#!/bin/sh
while [ "$1" != "--work-path" ]; do shift; done
cat > "$2/dump.log" <<'LOG'
(00.001) Warn  (criu/kerndat.c:1): something harmless
(00.120) Error (criu/sk-inet.c:188): inet: Connected TCP socket, consider using --tcp-established option.
(00.121) Error (criu/cr-dump.c:1791): Dumping FAILED.
LOG
echo 'criu failed: type NOTIFY errno 0 path= ignored' >&2
exit 1
"#;
        std::fs::write(&fake, script).unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let runc = Runc {
            binary: fake,
            ..Runc::new(
                dir.path().join("root"),
                1 << 20,
                std::time::Duration::from_secs(10),
            )
        };
        let (images, work) = (dir.path().join("images"), dir.path().join("work"));
        std::fs::create_dir_all(&work).unwrap();
        let log = dir.path().join("runc.log");
        let err = runc
            .checkpoint("c1", &images, &work, Dump::leaving_running(false), &log)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CRIU says: inet: Connected TCP socket, consider using --tcp-established option.; Dumping FAILED."),
            "{err}"
        );
        assert!(!err.contains("harmless"), "{err}");
        let kept = dir.path().join("criu-checkpoint.log");
        assert!(err.contains(&kept.display().to_string()), "{err}");
        std::fs::remove_dir_all(&work).unwrap();
        assert!(std::fs::read_to_string(&kept)
            .unwrap()
            .contains("Dumping FAILED"));
    }

    #[test]
    fn runc_statuses_map_to_three_states() {
        assert_eq!(parse_status("running"), Status::Running);
        assert_eq!(parse_status("paused"), Status::Paused);
        assert_eq!(parse_status("created"), Status::Stopped);
        assert_eq!(parse_status("stopped"), Status::Stopped);
    }
}

#[cfg(test)]
mod frozen_tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use super::Runc;

    /// Root, runc and busybox-static: under CI their absence fails the
    /// test, elsewhere it is skipped, saying why.
    fn prerequisites() -> bool {
        let root = rustix::process::geteuid().is_root();
        let runc = Command::new("runc")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        let busybox = Path::new("/bin/busybox").exists();
        if root && runc && busybox {
            return true;
        }
        let why = "root, runc and busybox-static (scripts/install-deps.sh)";
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: this test needs {why}"
        );
        eprintln!("SKIPPED: this test needs {why}");
        false
    }

    /// A busybox bundle whose init starts three writers that append to
    /// /log as fast as they can.
    fn writers_bundle(dir: &Path) -> PathBuf {
        let bundle = dir.join("bundle");
        let rootfs = bundle.join("rootfs");
        for sub in ["bin", "proc", "dev", "sys", "tmp"] {
            std::fs::create_dir_all(rootfs.join(sub)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
        let spec = Command::new("runc")
            .args(["spec", "--bundle"])
            .arg(&bundle)
            .status()
            .unwrap();
        assert!(spec.success());
        let path = bundle.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        config["process"]["terminal"] = false.into();
        config["root"]["readonly"] = false.into();
        config["process"]["args"] = serde_json::json!([
            "sh",
            "-c",
            "for n in 1 2 3; do (while :; do echo $n >> /log; done) & done; wait"
        ]);
        std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
        bundle
    }

    fn size(path: &Path) -> u64 {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }

    /// `runc delete --force` of a paused container thaws it after it
    /// signalled the init alone: its other tasks ran on (5 of 6 tries
    /// appended to the log). Killed frozen first, none does.
    #[tokio::test]
    async fn no_task_of_a_paused_container_runs_again_while_it_is_killed() {
        if !prerequisites() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let bundle = writers_bundle(dir.path());
        let runc = Runc::new(dir.path().join("root"), 1 << 20, Duration::from_secs(30));
        let log = dir.path().join("runc.log");
        let written = bundle.join("rootfs/log");
        let unique = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        for round in 0..3 {
            let id = format!("frozen-{unique}-{round}");
            let run = Command::new("runc")
                .arg("--root")
                .arg(dir.path().join("root"))
                .args(["run", "--detach", "--bundle"])
                .arg(&bundle)
                .arg(&id)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(run.success(), "runc run {id} failed");
            let deadline = Instant::now() + Duration::from_secs(10);
            let start = size(&written);
            while size(&written) < start + 4096 {
                assert!(Instant::now() < deadline, "the writers never wrote");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            runc.pause(&id, &log).await.unwrap();
            let frozen = size(&written);
            runc.kill_frozen(&id, &log).await.unwrap();
            runc.delete(&id, true, &log).await.unwrap();
            assert_eq!(
                size(&written),
                frozen,
                "round {round}: a task of the paused container wrote while it was killed"
            );
        }
    }
}
