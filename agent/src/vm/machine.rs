//! One VM's QEMU process on this host: its files, starting it detached,
//! finding it again by its pid file, and the QMP sequences the driver
//! runs on it (pause, go on, save memory to a file, load it, quit). Every
//! QEMU call ends within the driver's timeout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use super::qemu::{Accel, QemuConfig};
use super::qmp::{Qmp, QmpError};
use crate::driver::DriverError;

/// The longest path a unix socket can be bound to (sun_path, with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How often a migration's progress is read while waiting for it.
const POLL: Duration = Duration::from_millis(20);

impl From<QmpError> for DriverError {
    fn from(e: QmpError) -> Self {
        DriverError::Runtime(e.to_string())
    }
}

/// The files of one VM instance, under `<data-dir>/instances/<name>`.
#[derive(Clone, Debug)]
pub struct VmDir {
    root: PathBuf,
}

impl VmDir {
    pub fn new(root: PathBuf) -> Self {
        VmDir { root }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// What a move sends: the disk and the boot files.
    pub fn files(&self) -> PathBuf {
        self.root.join("vm")
    }
    pub fn disk(&self) -> PathBuf {
        self.files().join("disk.qcow2")
    }
    /// The boot files, all a live move sends as files (the disk is
    /// mirrored by QEMU).
    pub fn boot(&self) -> PathBuf {
        self.files().join("boot")
    }
    pub fn kernel(&self) -> PathBuf {
        self.boot().join("vmlinuz")
    }
    pub fn initrd(&self) -> PathBuf {
        self.boot().join("initrd")
    }
    /// Where the target's QEMU serves its disk (NBD) and takes the
    /// migration stream during a live move.
    pub fn nbd_socket(&self) -> PathBuf {
        self.migration().join("nbd.sock")
    }
    pub fn incoming_socket(&self) -> PathBuf {
        self.migration().join("incoming.sock")
    }
    /// The machine `configure` wrote (spec and accelerator).
    pub fn machine(&self) -> PathBuf {
        self.root.join("machine.json")
    }
    pub fn console(&self) -> PathBuf {
        self.root.join("console.log")
    }
    /// QEMU's own messages (its errors).
    pub fn qemu_log(&self) -> PathBuf {
        self.root.join("qemu.log")
    }
    pub fn qmp(&self) -> PathBuf {
        self.root.join("qmp.sock")
    }
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    /// The guest agent's port (`ferry exec`).
    pub fn guest_agent(&self) -> PathBuf {
        self.root.join("qga.sock")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("qemu.pid")
    }
    pub fn held_marker(&self) -> PathBuf {
        self.root.join("held")
    }
    /// A stateful stop's memory state.
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint").join("memory")
    }
    pub fn migration(&self) -> PathBuf {
        self.root.join("migration")
    }
    /// A move's final memory state.
    pub fn final_state(&self) -> PathBuf {
        self.migration().join("images").join("memory")
    }
}

/// What `configure` keeps beside the disk: enough to start QEMU again
/// after an agent restart without the replicated state.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    pub vm: ferry_raft::VmSpec,
    pub accel: Accel,
    /// On the cluster network (absent in a machine written before VMs
    /// could be).
    #[serde(default)]
    pub nic: Option<super::net::Nic>,
}

impl Machine {
    pub fn config(&self, dir: &VmDir, incoming: bool) -> QemuConfig {
        let spec = &self.vm;
        QemuConfig {
            accel: self.accel,
            cpu_model: spec.cpu_model.clone(),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            kernel: spec.kernel.then(|| dir.kernel()),
            initrd: spec.initrd.then(|| dir.initrd()),
            append: spec.append.clone(),
            disk: Some(dir.disk()),
            serial_log: dir.console(),
            qmp_socket: dir.qmp(),
            status_socket: None,
            guest_agent_socket: dir.guest_agent(),
            pid_file: dir.pid_file(),
            incoming,
            daemonize: false,
            nic: self.nic,
        }
    }
}

pub fn file_error(what: &'static str, path: &Path, source: std::io::Error) -> DriverError {
    DriverError::File {
        what,
        path: path.to_path_buf(),
        source,
    }
}

pub fn runtime(why: impl std::fmt::Display) -> DriverError {
    DriverError::Runtime(why.to_string())
}

/// The running QEMU of `dir`: the pid in its pid file, if that process is
/// alive and is this VM's QEMU (its command line names this VM's control
/// socket), so a reused pid is never taken for it.
pub fn running_pid(dir: &VmDir) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let socket = format!("unix:{},", dir.qmp().display());
    let ours = cmdline
        .split(|b| *b == 0)
        .any(|arg| arg.starts_with(socket.as_bytes()));
    ours.then_some(pid)
}

/// The QEMU binary for this host's architecture.
pub fn qemu_binary() -> String {
    format!("qemu-system-{}", std::env::consts::ARCH)
}

/// Start QEMU in a process group of its own (so it outlives the agent and
/// no signal to the agent's group reaches it), its output appended to
/// `log`; returns once its control socket is up, or with the end of its
/// log when it exits first. A task of the agent reaps it when it ends.
pub async fn spawn(config: &QemuConfig, log: &Path, timeout: Duration) -> Result<(), DriverError> {
    for socket in std::iter::once(&config.qmp_socket).chain(&config.status_socket) {
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(runtime(format!(
                "the VM's control socket path {} is longer than a unix socket allows; use a shorter --data-dir",
                socket.display()
            )));
        }
        let _ = tokio::fs::remove_file(socket).await;
    }
    let _ = tokio::fs::remove_file(&config.pid_file).await;
    let argv = config
        .argv()
        .map_err(|e| DriverError::BadInput(e.to_string()))?;
    let output = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| file_error("cannot open", log, e))?;
    let errors = output
        .try_clone()
        .map_err(|e| file_error("cannot open", log, e))?;
    let mut child = tokio::process::Command::new(qemu_binary())
        .args(&argv)
        .stdin(std::process::Stdio::null())
        .stdout(output)
        .stderr(errors)
        .process_group(0)
        .spawn()
        .map_err(|e| runtime(format!("cannot run {}: {e}", qemu_binary())))?;
    let deadline = tokio::time::Instant::now() + timeout;
    let up = loop {
        if config.qmp_socket.exists() && config.pid_file.exists() {
            break Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let last: Vec<&str> = text.lines().rev().take(3).collect();
            let why = last.into_iter().rev().collect::<Vec<_>>().join("; ");
            break Err(runtime(format!("QEMU exited at once ({status}): {why}")));
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.start_kill();
            break Err(runtime(format!("QEMU did not start within {timeout:?}")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    up
}

/// Save the (paused) VM's memory and device state into `file` through
/// QEMU's own migration; the VM stays paused ("postmigrate").
pub async fn save_to(qmp: &Qmp, file: &Path, timeout: Duration) -> Result<(), DriverError> {
    if let Some(parent) = file.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| file_error("cannot create", parent, e))?;
    }
    let _ = tokio::fs::remove_file(file).await;
    let uri = format!("file:{}", file.display());
    qmp.execute("migrate", Some(json!({ "uri": uri }))).await?;
    migration_done(qmp, "saving its memory", timeout).await
}

/// Load memory and device state from `file` into a QEMU started with
/// `-incoming defer`; it stays paused.
pub async fn load_from(qmp: &Qmp, file: &Path, timeout: Duration) -> Result<(), DriverError> {
    let uri = format!("file:{}", file.display());
    qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
        .await?;
    migration_done(qmp, "loading its memory", timeout).await
}

/// Wait for the migration QEMU runs to complete; its error otherwise.
async fn migration_done(qmp: &Qmp, what: &str, timeout: Duration) -> Result<(), DriverError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let info = qmp.execute("query-migrate", None).await?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                let why = info["error-desc"].as_str().unwrap_or("no reason given");
                return Err(runtime(format!("QEMU failed {what}: {why}")));
            }
            _ if tokio::time::Instant::now() >= deadline => {
                let _ = qmp.execute("migrate_cancel", None).await;
                return Err(runtime(format!(
                    "QEMU did not finish {what} within {timeout:?}"
                )));
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// Quit QEMU (at once, the guest is not asked) over `qmp` and wait until
/// it is gone; SIGKILL when it does not answer or lingers.
pub async fn quit(dir: &VmDir, qmp: Option<&Qmp>) {
    let Some(pid) = running_pid(dir) else {
        return;
    };
    if let Some(qmp) = qmp {
        let _ = qmp.execute("quit", None).await;
    }
    if !gone(dir, Duration::from_secs(5)).await {
        kill(pid);
        let _ = gone(dir, Duration::from_secs(5)).await;
    }
}

/// SIGKILL to a QEMU found by [`running_pid`].
pub fn kill(pid: u32) {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// Whether QEMU of `dir` ended within `within`.
pub async fn gone(dir: &VmDir, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while running_pid(dir).is_some() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}
