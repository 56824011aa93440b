//! The container shim: `ferry shim`, one process per started container,
//! in its own process group so it outlives the agent. It runs the runc
//! command that starts or restores the container (bounded by the runtime
//! timeout), tells the agent runc's outcome in one line on its stdout, and
//! then stays as the container's parent: it is a child subreaper, so the
//! container's first process, orphaned when runc exits, becomes its child.
//! When that process ends the shim writes how (`last-exit`), which is what
//! `--restart on-failure` decides on; nothing else can learn an exit
//! status, since only a parent can wait for a process. It is also the
//! console logger (`console.rs`): the container's stdout and stderr are a
//! pipe to it.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use rustix::process::{Pid, Signal, WaitOptions};

use crate::driver::ProcessExit;

/// What the shim tells the agent about the runc command it ran.
pub const RUNC_OK: &str = "ok";
pub const RUNC_FAILED: &str = "failed";
pub const RUNC_TIMED_OUT: &str = "timed-out";

pub struct ShimArgs {
    pub console: PathBuf,
    pub console_max_bytes: u64,
    /// Where the container's first process's end is written.
    pub exit_file: PathBuf,
    /// runc's `--pid-file`: the container's first process.
    pub pid_file: PathBuf,
    pub timeout: Duration,
    /// The runc command line, binary first.
    pub runc: Vec<OsString>,
}

/// `last-exit`'s text for an end.
pub fn exit_text(exit: ProcessExit) -> String {
    match exit {
        ProcessExit::Code(code) => format!("code {code}"),
        ProcessExit::Signal(signal) => format!("signal {signal}"),
    }
}

/// The end recorded in `last-exit`, if one was.
pub fn read_exit(path: &Path) -> Option<ProcessExit> {
    let text = std::fs::read_to_string(path).ok()?;
    let (kind, value) = text.trim().split_once(' ')?;
    let value = value.parse().ok()?;
    match kind {
        "code" => Some(ProcessExit::Code(value)),
        "signal" => Some(ProcessExit::Signal(value)),
        _ => None,
    }
}

/// Run the shim; returns when the container's processes are gone and its
/// console is closed.
pub fn run_shim(args: ShimArgs) -> std::io::Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
    let _ = std::fs::remove_file(&args.exit_file);
    let (reader, writer) = std::io::pipe()?;
    let console = args.console.clone();
    let max = args.console_max_bytes;
    let logger = std::thread::spawn(move || super::console::run_logger(reader, &console, max));
    let outcome = run_runc(&args, writer);
    tell_agent(&outcome);
    if outcome == RUNC_OK {
        if let Some(exit) = std::fs::read_to_string(&args.pid_file)
            .ok()
            .and_then(|pid| pid.trim().parse::<i32>().ok())
            .and_then(Pid::from_raw)
            .and_then(reap_until)
        {
            write_exit(&args.exit_file, exit)?;
        }
    }
    logger
        .join()
        .map_err(|_| std::io::Error::other("console logger panicked"))?
}

/// runc's outcome as one of the `RUNC_*` words (or a spawn error's text);
/// runc is killed at the timeout.
fn run_runc(args: &ShimArgs, console: std::io::PipeWriter) -> String {
    let Some((binary, rest)) = args.runc.split_first() else {
        return "no runc command given".to_string();
    };
    let spawned = console.try_clone().and_then(|err| {
        Command::new(binary)
            .args(rest)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(err)
            .spawn()
    });
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return format!("cannot run {}: {e}", binary.to_string_lossy()),
    };
    let pid = child.id();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait());
    });
    match finished.recv_timeout(args.timeout) {
        Ok(Ok(status)) if status.success() => RUNC_OK.to_string(),
        Ok(_) => RUNC_FAILED.to_string(),
        Err(_) => {
            if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, Signal::KILL);
            }
            let _ = finished.recv();
            RUNC_TIMED_OUT.to_string()
        }
    }
}

/// Write the outcome line, then let go of stdout so the agent's read ends.
fn tell_agent(outcome: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{outcome}");
    let _ = out.flush();
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = rustix::stdio::dup2_stdout(&null);
    }
}

/// Reap children (the container's first process and whatever else is
/// orphaned onto the shim) until `init` ends; how it ended, or `None` if
/// it was never ours to wait for.
fn reap_until(init: Pid) -> Option<ProcessExit> {
    loop {
        match rustix::process::wait(WaitOptions::empty()) {
            Ok(Some((pid, status))) if pid == init => {
                if let Some(code) = status.exit_status() {
                    return Some(ProcessExit::Code(code));
                }
                return status.terminating_signal().map(ProcessExit::Signal);
            }
            Ok(_) => continue,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return None,
        }
    }
}

/// Written whole or not at all: a reader never sees half a record.
fn write_exit(path: &Path, exit: ProcessExit) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, exit_text(exit))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_record_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last-exit");
        assert_eq!(read_exit(&path), None);
        for exit in [
            ProcessExit::Code(0),
            ProcessExit::Code(3),
            ProcessExit::Signal(9),
        ] {
            write_exit(&path, exit).unwrap();
            assert_eq!(read_exit(&path), Some(exit));
        }
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(read_exit(&path), None);
    }

    /// A stand-in runc that starts a "container" (a child that outlives
    /// it) and writes its pid: the shim becomes that child's parent and
    /// records its exit code.
    #[test]
    fn the_shim_reports_runc_and_records_how_the_orphaned_process_ended() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!(
            "(sleep 0.2; echo bye; exit 7) & echo $! > {}; echo started",
            pid_file.display()
        );
        // In a process of its own (this test binary again, running only
        // `shim_child`): subreaping would change the test process.
        let status = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "container::shim::tests::shim_child", "--ignored"])
            .env("FERRY_SHIM_TEST_DIR", dir.path())
            .env("FERRY_SHIM_TEST_SCRIPT", &script)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let exit_file = dir.path().join("last-exit");
        assert_eq!(read_exit(&exit_file), Some(ProcessExit::Code(7)));
        let log = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
        assert_eq!(log, "started\nbye\n");
    }

    #[test]
    #[ignore = "run by the_shim_reports_runc_and_records_how_the_orphaned_process_ended"]
    fn shim_child() {
        let dir = PathBuf::from(std::env::var_os("FERRY_SHIM_TEST_DIR").unwrap());
        let script = std::env::var("FERRY_SHIM_TEST_SCRIPT").unwrap();
        run_shim(ShimArgs {
            console: dir.join("console.log"),
            console_max_bytes: 1 << 20,
            exit_file: dir.join("last-exit"),
            pid_file: dir.join("pid"),
            timeout: Duration::from_secs(10),
            runc: ["sh", "-c", &script].map(OsString::from).to_vec(),
        })
        .unwrap();
    }
}
