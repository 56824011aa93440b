//! The QEMU driver: one agent's VMs, each a qcow2 disk (and its boot
//! files) under `<data-dir>/instances/<name>/vm`, run by a detached QEMU
//! controlled over QMP. Memory state is QEMU's own migration stream,
//! written to a file: a stateful stop's checkpoint, or a move's final
//! state, which the target loads into a QEMU started `-incoming defer`.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferry_raft::{HostFacts, InstanceSpec, LiveSettings, Runtimes};

use super::machine::{self, file_error, runtime, Machine, VmDir};
use super::probe;
use super::qemu::Accel;
use super::qmp::Qmp;
use crate::api::names::{InstanceName, SnapshotName};
use crate::driver::{Driver, DriverError, ExecOutput, ProcessExit, RunState, Status};

mod snapshots;

/// How long a guest has to power off when asked, before QEMU is quit.
const POWERDOWN_GRACE: Duration = Duration::from_secs(5);

/// The VM side of one agent.
pub struct VmHost {
    data_dir: PathBuf,
    /// The one QMP connection to each running QEMU, by instance, with the
    /// pid it belongs to (see `qmp::Qmp`).
    connections: tokio::sync::Mutex<HashMap<String, (u32, Arc<Qmp>)>>,
    accel: Accel,
    /// Every QEMU call ends within this.
    timeout: Duration,
    /// Saving or loading memory, and copying a disk, end within this.
    transfer_timeout: Duration,
}

impl VmHost {
    pub fn new(data_dir: &Path, accel: Accel, timeout: Duration) -> Self {
        VmHost {
            data_dir: data_dir.to_path_buf(),
            connections: Default::default(),
            accel,
            timeout,
            transfer_timeout: timeout.max(Duration::from_secs(600)),
        }
    }

    fn dir(&self, name: &InstanceName) -> VmDir {
        VmDir::new(self.data_dir.join("instances").join(name.as_str()))
    }

    /// The connection to `dir`'s running QEMU (made once per QEMU).
    async fn qmp(&self, dir: &VmDir) -> Result<Arc<Qmp>, DriverError> {
        let pid = machine::running_pid(dir)
            .ok_or_else(|| runtime(format!("no QEMU runs for {}", dir.root().display())))?;
        let key = dir.root().to_string_lossy().into_owned();
        let mut connections = self.connections.lock().await;
        if let Some((known, qmp)) = connections.get(&key) {
            if *known == pid {
                return Ok(qmp.clone());
            }
        }
        let qmp = Arc::new(Qmp::connect(&dir.qmp(), self.timeout).await?);
        connections.insert(key, (pid, qmp.clone()));
        Ok(qmp)
    }

    async fn run_state(&self, dir: &VmDir) -> Result<String, DriverError> {
        Ok(self.qmp(dir).await?.status().await?)
    }

    /// Quit the QEMU of `dir` (the guest is not asked) and forget its
    /// connection.
    async fn quit(&self, dir: &VmDir) {
        let qmp = self.qmp(dir).await.ok();
        machine::quit(dir, qmp.as_deref()).await;
        let key = dir.root().to_string_lossy().into_owned();
        self.connections.lock().await.remove(&key);
    }

    /// Let a paused (or loaded) guest run, and on the cluster network
    /// announce its address here (after a launch from a memory state or a
    /// move its tap is down until now).
    pub(super) async fn resume(&self, dir: &VmDir, qmp: &Qmp) -> Result<(), DriverError> {
        qmp.execute("cont", None).await?;
        if let Ok(Machine { nic: Some(nic), .. }) = self.machine(dir).await {
            super::net::announce(&nic, qmp).await;
        }
        Ok(())
    }

    async fn machine(&self, dir: &VmDir) -> Result<Machine, DriverError> {
        let path = dir.machine();
        let text = tokio::fs::read(&path)
            .await
            .map_err(|e| file_error("cannot read", &path, e))?;
        serde_json::from_slice(&text).map_err(|e| runtime(format!("{}: {e}", path.display())))
    }

    /// Start QEMU; with `incoming`, paused and waiting for a memory state.
    async fn launch(&self, name: &InstanceName, incoming: bool) -> Result<VmDir, DriverError> {
        let dir = self.dir(name);
        if machine::running_pid(&dir).is_some() {
            return Err(runtime(format!("'{name}' already runs here")));
        }
        let config = self.machine(&dir).await?.config(&dir, incoming);
        machine::spawn(&config, &dir.qemu_log(), self.timeout).await?;
        if let Some(nic) = &config.nic {
            // QEMU greets on QMP once its devices (the tap) are made. Down
            // while it waits for a migration: a held copy is not reachable
            // until released.
            let attached = match self.qmp(&dir).await {
                Ok(_) => super::net::attach(nic, !incoming).await,
                Err(e) => Err(e),
            };
            if let Err(e) = attached {
                self.quit(&dir).await;
                return Err(e);
            }
        }
        Ok(dir)
    }

    /// Start QEMU and load `state` into it; it stays paused.
    async fn launch_from(
        &self,
        name: &InstanceName,
        state: &Path,
    ) -> Result<Arc<Qmp>, DriverError> {
        let dir = self.launch(name, true).await?;
        let loaded = async {
            let qmp = self.qmp(&dir).await?;
            machine::load_from(&qmp, state, self.transfer_timeout).await?;
            Ok(qmp)
        }
        .await;
        if loaded.is_err() {
            self.quit(&dir).await;
        }
        loaded
    }

    async fn expect_paused(&self, dir: &VmDir, name: &InstanceName) -> Result<(), DriverError> {
        match self.run_state(dir).await?.as_str() {
            "paused" | "postmigrate" => Ok(()),
            other => Err(runtime(format!(
                "'{name}' is not paused (QEMU says {other}); the move stops here"
            ))),
        }
    }

    /// Ask the guest to power off; quit QEMU when it has not within the
    /// grace period (at once with `force`).
    async fn shut_down(&self, name: &InstanceName, force: bool) -> Result<(), DriverError> {
        let dir = self.dir(name);
        if machine::running_pid(&dir).is_none() {
            return Ok(());
        }
        if !force {
            let qmp = self.qmp(&dir).await?;
            let _ = qmp.execute("cont", None).await;
            let _ = qmp.execute("system_powerdown", None).await;
            if machine::gone(&dir, POWERDOWN_GRACE).await {
                return Ok(());
            }
        }
        self.quit(&dir).await;
        Ok(())
    }

    /// A new empty qcow2 disk of `size` bytes for `dir`.
    async fn empty_disk(&self, dir: &VmDir, size: u64) -> Result<(), DriverError> {
        if size == 0 {
            return Err(runtime(
                "the VM's spec has no disk size; it cannot move live",
            ));
        }
        let _ = tokio::fs::create_dir_all(dir.files()).await;
        let create = tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(dir.disk())
            .arg(size.to_string())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(self.timeout, create).await {
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => Err(runtime(format!(
                "qemu-img cannot create the disk: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
            Ok(Err(e)) => Err(runtime(format!("cannot run qemu-img: {e}"))),
            Err(_) => Err(runtime("qemu-img did not create the disk in time")),
        }
    }

    async fn copy_in(&self, from: &Path, to: &Path) -> Result<(), DriverError> {
        tokio::fs::copy(from, to)
            .await
            .map(|_| ())
            .map_err(|e| file_error("cannot copy", from, e))
    }
}

fn unsupported(what: &str) -> DriverError {
    DriverError::BadInput(format!("{what} is not available for VM instances yet"))
}

#[async_trait]
impl Driver for VmHost {
    async fn status(&self, name: &InstanceName) -> Result<Option<Status>, DriverError> {
        let dir = self.dir(name);
        let Some(pid) = machine::running_pid(&dir) else {
            return Ok(None);
        };
        let state = match self.run_state(&dir).await?.as_str() {
            "running" => RunState::Running,
            "shutdown" | "guest-panicked" | "internal-error" => RunState::Stopped,
            _ => RunState::Paused,
        };
        Ok(Some(Status { state, pid }))
    }

    fn has_files(&self, name: &InstanceName) -> bool {
        self.dir(name).root().exists()
    }

    fn is_held(&self, name: &InstanceName) -> bool {
        self.dir(name).held_marker().exists()
    }

    fn rootfs(&self, name: &InstanceName) -> PathBuf {
        self.dir(name).files()
    }

    fn images(&self, name: &InstanceName) -> PathBuf {
        self.dir(name).migration().join("images")
    }

    /// Its snapshots move with it.
    fn kept_files(&self, name: &InstanceName) -> Option<PathBuf> {
        Some(self.dir(name).snapshots())
    }

    fn staging(&self, name: &InstanceName) -> PathBuf {
        self.dir(name).migration()
    }

    fn has_checkpoint(&self, name: &InstanceName) -> bool {
        self.dir(name).checkpoint().exists()
    }

    fn last_exit(&self, _name: &InstanceName) -> Option<ProcessExit> {
        None
    }

    /// `source` is a staged VM (`vm::stage`): its disk already qcow2.
    async fn import_rootfs(
        &self,
        name: &InstanceName,
        _spec: &InstanceSpec,
        source: &Path,
        take: bool,
    ) -> Result<(), DriverError> {
        let dir = self.dir(name);
        let _ = tokio::fs::remove_dir_all(dir.root()).await;
        let boot = dir.boot();
        tokio::fs::create_dir_all(&boot)
            .await
            .map_err(|e| file_error("cannot create", &boot, e))?;
        for (file, dest) in [
            ("disk.qcow2", dir.disk()),
            ("boot/vmlinuz", dir.kernel()),
            ("boot/initrd", dir.initrd()),
        ] {
            let from = source.join(file);
            let taken = take && tokio::fs::rename(&from, &dest).await.is_ok();
            if !taken && from.exists() {
                self.copy_in(&from, &dest).await?;
            }
        }
        Ok(())
    }

    async fn stage_rootfs(&self, _source: &Path, _dest: &Path) -> Result<(), DriverError> {
        Err(unsupported("a rootfs"))
    }

    async fn configure(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
        _held: bool,
    ) -> Result<(), DriverError> {
        let dir = self.dir(name);
        let vm = spec
            .vm
            .clone()
            .ok_or_else(|| runtime(format!("'{name}' is not a VM")))?;
        tokio::fs::create_dir_all(dir.root())
            .await
            .map_err(|e| file_error("cannot create", dir.root(), e))?;
        let machine = Machine {
            vm,
            accel: self.accel,
            nic: super::net::nic_for(spec).await?,
        };
        let text = serde_json::to_vec_pretty(&machine).map_err(runtime)?;
        let path = dir.machine();
        tokio::fs::write(&path, text)
            .await
            .map_err(|e| file_error("cannot write", &path, e))?;
        // Only root reads a VM's disk, memory state and console.
        for d in [self.data_dir.join("instances"), dir.root().to_path_buf()] {
            tokio::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))
                .await
                .map_err(|e| file_error("cannot restrict", &d, e))?;
        }
        Ok(())
    }

    async fn start(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.launch(name, false).await.map(|_| ())
    }

    async fn restore(&self, name: &InstanceName) -> Result<(), DriverError> {
        let dir = self.dir(name);
        let qmp = self.launch_from(name, &dir.checkpoint()).await?;
        self.resume(&dir, &qmp).await
    }

    async fn stop(&self, name: &InstanceName, force: bool) -> Result<(), DriverError> {
        self.shut_down(name, force).await
    }

    /// QEMU pauses the guest, writes its memory to the checkpoint file and
    /// quits; on failure the guest runs on.
    async fn checkpoint_stop(&self, name: &InstanceName) -> Result<(), DriverError> {
        let dir = self.dir(name);
        let qmp = self.qmp(&dir).await?;
        qmp.execute("stop", None).await?;
        if let Err(e) = machine::save_to(&qmp, &dir.checkpoint(), self.transfer_timeout).await {
            let _ = qmp.execute("cont", None).await;
            let _ = tokio::fs::remove_file(dir.checkpoint()).await;
            return Err(e);
        }
        self.quit(&dir).await;
        Ok(())
    }

    async fn discard_checkpoint(&self, name: &InstanceName) {
        let _ = tokio::fs::remove_file(self.dir(name).checkpoint()).await;
    }

    async fn snapshot(
        &self,
        name: &InstanceName,
        snap: &SnapshotName,
        stateful: bool,
    ) -> Result<(), DriverError> {
        self.take_snapshot(name, snap, stateful).await
    }

    async fn restore_snapshot(
        &self,
        name: &InstanceName,
        snap: &SnapshotName,
        stateful: bool,
    ) -> Result<(), DriverError> {
        self.back_to_snapshot(name, snap, stateful).await
    }

    async fn reset_to_snapshot(
        &self,
        name: &InstanceName,
        snap: &SnapshotName,
    ) -> Result<(), DriverError> {
        self.disk_from_snapshot(name, snap).await
    }

    async fn delete_snapshot(&self, name: &InstanceName, snap: &SnapshotName) {
        let _ = tokio::fs::remove_dir_all(self.dir(name).snapshots().join(snap.as_str())).await;
    }

    async fn freeze(&self, name: &InstanceName) -> Result<(), DriverError> {
        let qmp = self.qmp(&self.dir(name)).await?;
        Ok(qmp.execute("stop", None).await.map(|_| ())?)
    }

    async fn thaw(&self, name: &InstanceName) -> Result<(), DriverError> {
        let dir = self.dir(name);
        let qmp = self.qmp(&dir).await?;
        self.resume(&dir, &qmp).await
    }

    /// QEMU writes the paused guest's memory to the final state file; it
    /// stays paused, so a rollback can let it go on.
    async fn dump_frozen(
        &self,
        name: &InstanceName,
        _page_server: Option<std::net::SocketAddr>,
    ) -> Result<(), DriverError> {
        let dir = self.dir(name);
        self.expect_paused(&dir, name).await?;
        let qmp = self.qmp(&dir).await?;
        machine::save_to(&qmp, &dir.final_state(), self.transfer_timeout).await?;
        self.expect_paused(&dir, name).await
    }

    async fn keep_final_dump(&self, name: &InstanceName) -> Result<(), DriverError> {
        let dir = self.dir(name);
        let state = dir.final_state();
        if !state.exists() {
            return Err(runtime(format!(
                "no final memory state of '{name}' in {}",
                state.display()
            )));
        }
        self.quit(&dir).await;
        let checkpoint = dir.checkpoint();
        if let Some(parent) = checkpoint.parent() {
            let _ = tokio::fs::create_dir_all(parent).await;
        }
        tokio::fs::rename(&state, &checkpoint)
            .await
            .map_err(|e| file_error("cannot keep", &checkpoint, e))?;
        let _ = tokio::fs::remove_dir_all(dir.migration()).await;
        Ok(())
    }

    /// QEMU loads the final state and stays paused until released.
    async fn restore_held(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
    ) -> Result<(), DriverError> {
        self.configure(name, spec, true).await?;
        let dir = self.dir(name);
        let marker = dir.held_marker();
        tokio::fs::write(&marker, b"")
            .await
            .map_err(|e| file_error("cannot write", &marker, e))?;
        self.launch_from(name, &dir.final_state()).await.map(|_| ())
    }

    async fn release_held(
        &self,
        name: &InstanceName,
        _spec: &InstanceSpec,
    ) -> Result<(), DriverError> {
        let dir = self.dir(name);
        let qmp = self.qmp(&dir).await?;
        self.resume(&dir, &qmp).await?;
        let _ = tokio::fs::remove_file(dir.held_marker()).await;
        let _ = tokio::fs::remove_dir_all(dir.migration()).await;
        Ok(())
    }

    /// A paused VM is quit without running again.
    async fn remove(&self, name: &InstanceName) -> Result<(), DriverError> {
        let dir = self.dir(name);
        self.quit(&dir).await;
        if let Some(pid) = machine::running_pid(&dir) {
            return Err(runtime(format!(
                "QEMU of '{name}' (pid {pid}) does not end"
            )));
        }
        let _ = tokio::fs::remove_dir_all(dir.root()).await;
        Ok(())
    }

    /// Through the QEMU guest agent, when the guest runs one.
    async fn exec(&self, name: &InstanceName, argv: &[String]) -> Result<ExecOutput, DriverError> {
        let socket = self.dir(name).guest_agent();
        super::guest_agent::exec(&socket, argv, self.timeout)
            .await
            .map_err(|e| DriverError::Runtime(format!("{name}: {e}")))
    }

    async fn mounted_filesystems(&self, _name: &InstanceName, _pid: u32) -> Vec<String> {
        Vec::new()
    }

    fn stateful_unavailable(
        &self,
        _name: &InstanceName,
        facts: Option<&HostFacts>,
    ) -> Option<(String, String)> {
        let usable = facts.is_some_and(|f| f.runtimes.qemu.is_some());
        (!usable).then(|| {
            (
                "QEMU is missing".to_string(),
                "Install QEMU (scripts/install-deps.sh)".to_string(),
            )
        })
    }

    async fn precopy_unavailable(&self, _name: &InstanceName) -> Option<String> {
        Some("memory pre-copy is for containers; a VM's memory moves with QEMU's migration".into())
    }

    fn moves_itself(&self, _name: &InstanceName) -> bool {
        true
    }

    fn live_streams(&self, _name: &InstanceName) -> &'static [&'static str] {
        &["disk", "memory"]
    }

    fn live_socket(&self, name: &InstanceName, purpose: &str) -> PathBuf {
        let dir = self.dir(name);
        match purpose {
            "disk" => dir.nbd_socket(),
            _ => dir.incoming_socket(),
        }
    }

    fn live_files(&self, name: &InstanceName) -> PathBuf {
        self.dir(name).boot()
    }

    /// An empty disk of the source's size, served over NBD by a QEMU
    /// waiting for the migration stream; marked held before it starts.
    async fn receive_live(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
        settings: &LiveSettings,
    ) -> Result<(), DriverError> {
        let dir = self.dir(name);
        // A leftover of an interrupted attempt goes first.
        self.quit(&dir).await;
        self.configure(name, spec, true).await?;
        let marker = dir.held_marker();
        tokio::fs::write(&marker, b"")
            .await
            .map_err(|e| file_error("cannot write", &marker, e))?;
        let size = spec.vm.as_ref().map_or(0, |vm| vm.disk_bytes);
        self.empty_disk(&dir, size).await?;
        let _ = tokio::fs::create_dir_all(dir.migration()).await;
        let dir = self.launch(name, true).await?;
        let qmp = self.qmp(&dir).await?;
        let sockets = (dir.nbd_socket(), dir.incoming_socket());
        super::live::prepare_incoming(&qmp, &sockets, settings).await
    }

    async fn send_live(
        &self,
        name: &InstanceName,
        relay_dir: &Path,
        settings: &LiveSettings,
        go_on: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<crate::driver::LiveEnd, DriverError> {
        let qmp = self.qmp(&self.dir(name)).await?;
        let timeout = self.transfer_timeout;
        let dirs = (relay_dir, self.data_dir.as_path());
        let end = super::live::send(&qmp, dirs, settings, go_on, timeout).await?;
        // Paused for the switchover: its address is the target's to
        // announce now (a rollback's thaw announces it here again).
        if let Some(nic) = self.machine(&self.dir(name)).await?.nic {
            super::net::set_link(&nic, false).await?;
        }
        Ok(end)
    }

    async fn live_sent(&self, name: &InstanceName) -> Result<(), DriverError> {
        let qmp = self.qmp(&self.dir(name)).await?;
        super::live::sent(&qmp, self.transfer_timeout).await
    }

    async fn live_received(&self, name: &InstanceName) -> Result<(), DriverError> {
        let qmp = self.qmp(&self.dir(name)).await?;
        super::live::incoming_done(&qmp, self.transfer_timeout).await
    }

    async fn runtimes(&self) -> Runtimes {
        let timeout = self.timeout;
        let accel = self.accel;
        tokio::task::spawn_blocking(move || {
            let binary = machine::qemu_binary();
            let out = crate::facts::run_with_timeout(&binary, &["--version"], timeout);
            let qemu = out
                .filter(|o| o.success)
                .and_then(|o| probe::qemu_version(&o.stdout));
            Runtimes {
                vm_cpu_models: match qemu {
                    Some(_) => probe::cpu_models(&binary, accel, timeout),
                    None => Default::default(),
                },
                qemu,
                vm_accel: Some(accel.as_str().to_string()),
                ..Runtimes::default()
            }
        })
        .await
        .unwrap_or_default()
    }
}
