//! The runc + CRIU driver: one agent's containers, each an OCI bundle
//! under `<data-dir>/instances/<name>`, run by runc with this agent's own
//! state root and cgroup parent; memory state through CRIU (runc drives
//! it).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use ferry_raft::{HostFacts, InstanceSpec, Runtimes};

use super::bundle::{self, BundleConfig, BundleError, InstanceDir};
use super::net::InstanceNet;

mod final_dump;
mod held;
mod layers;
mod lazy;
mod runtime_facts;
mod snapshots;
mod staging;
mod stop;
use super::runc::{ContainerState, Dump, Restore, Runc, RuncError, Status as RuncStatus};
use crate::api::names::{InstanceName, SnapshotName};
use crate::driver::{
    Driver, DriverError, ExecOutput, ImageLease, LazyDump, PageServer, ProcessExit, RunState,
    Status,
};

impl From<RuncError> for DriverError {
    fn from(e: RuncError) -> Self {
        DriverError::Runtime(e.to_string())
    }
}

impl From<BundleError> for DriverError {
    fn from(e: BundleError) -> Self {
        DriverError::Runtime(e.to_string())
    }
}

/// The cgroup parent of an agent's containers: unique per agent on a
/// host (names repeat across clusters sharing a host; data dirs do not),
/// so one agent freezing its container can never freeze another's.
/// Attempts at freezing a container before a move gives up.
const FREEZE_TRIES: u32 = 4;

fn cgroup_parent(data_dir: &Path, node_name: &str) -> String {
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let digest = ferry_transport::pki::sha256_hex(dir.to_string_lossy().as_bytes());
    format!("ferry-{node_name}-{}", &digest[..8])
}

fn file_error(what: &'static str, path: &Path, source: std::io::Error) -> DriverError {
    DriverError::File {
        what,
        path: path.to_path_buf(),
        source,
    }
}

async fn create_dirs(dirs: &[PathBuf]) -> Result<(), RuncError> {
    for d in dirs {
        tokio::fs::create_dir_all(d)
            .await
            .map_err(|source| RuncError::File {
                path: d.clone(),
                source,
            })?;
    }
    Ok(())
}

/// The container side of one agent.
pub struct Host {
    runc: Runc,
    /// Every runtime call ends within this, or is killed.
    timeout: Duration,
    data_dir: PathBuf,
    cgroup_parent: String,
    net: InstanceNet,
    /// Where moves stage memory images when they fit (`staging.rs`).
    memory_staging: Option<PathBuf>,
    /// Held while the image store changes or is checked (`layers.rs`).
    image_store: tokio::sync::Mutex<()>,
    /// Whether an overlayfs mounts on the data dir (probed at start).
    lays_images: bool,
    /// Images launches read from the store (`layers.rs`).
    image_leases: layers::Leases,
}

impl Host {
    pub fn new(
        data_dir: &Path,
        node_name: &str,
        console_max_bytes: u64,
        timeout: Duration,
    ) -> Self {
        let cgroup_parent = cgroup_parent(data_dir, node_name);
        layers::sweep_gone(&data_dir.join("images"));
        Host {
            runc: Runc::new(data_dir.join("runc"), console_max_bytes, timeout),
            timeout,
            data_dir: data_dir.to_path_buf(),
            memory_staging: staging::memory_root(&cgroup_parent),
            cgroup_parent,
            net: InstanceNet::new(data_dir),
            image_store: tokio::sync::Mutex::new(()),
            lays_images: layers::overlay_works(&data_dir.join("tmp").join("overlay-probe")),
            image_leases: Default::default(),
        }
    }

    fn dir(&self, name: &InstanceName) -> InstanceDir {
        InstanceDir::new(&self.data_dir, name)
    }

    fn log(&self) -> PathBuf {
        self.data_dir.join("runc.log")
    }

    async fn state(&self, name: &InstanceName) -> Result<Option<ContainerState>, RuncError> {
        tokio::fs::create_dir_all(self.data_dir.join("runc"))
            .await
            .ok();
        self.runc.state(name.as_str(), &self.log()).await
    }

    async fn expect_paused(&self, name: &InstanceName, when: &str) -> Result<(), DriverError> {
        match self.state(name).await?.map(|s| s.status) {
            Some(RuncStatus::Paused) => Ok(()),
            other => Err(DriverError::Runtime(format!(
                "'{name}' is not frozen {when} (runc says {other:?}); the move stops here"
            ))),
        }
    }

    async fn write_config(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
        held: bool,
    ) -> Result<(), DriverError> {
        let dir = self.dir(name);
        tokio::fs::create_dir_all(dir.root())
            .await
            .map_err(|e| file_error("cannot create", dir.root(), e))?;
        let netns = self.net.record(name, spec).await?;
        // runc hands CRIU this file on every dump and restore of the
        // container (it keeps the name from when it was created, so the
        // name never changes, only what is in it): a held restore leaves
        // every task stopped; a networked container's connections are
        // cut by its veth going down, so CRIU's own per-connection
        // iptables lock (run in the wrong namespace for an external one,
        // and a fork per connection) is skipped.
        let criu_config = dir.root().join("criu.conf");
        let mut options = String::new();
        if held {
            options.push_str("leave-stopped\n");
        }
        if netns.is_some() {
            options.push_str("network-lock skip\n");
        }
        tokio::fs::write(&criu_config, options)
            .await
            .map_err(|e| file_error("cannot write", &criu_config, e))?;
        bundle::write_config(
            &dir,
            &BundleConfig {
                name: name.as_str(),
                command: &spec.command,
                env: &spec.env,
                cwd: &spec.cwd,
                user: spec.user,
                memory_bytes: spec.memory_bytes,
                cgroup_parent: &self.cgroup_parent,
                criu_config: Some(criu_config.as_path()),
                unconfined: spec.unconfined,
                netns: netns.as_deref(),
            },
        )?;
        // Only root reads an instance's files (its rootfs, memory images,
        // console log) from the host.
        for dir in [self.data_dir.join("instances"), dir.root().to_path_buf()] {
            let private = std::fs::Permissions::from_mode(0o700);
            tokio::fs::set_permissions(&dir, private)
                .await
                .map_err(|e| file_error("cannot restrict", &dir, e))?;
        }
        Ok(())
    }

    async fn start_container(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.forget_exited(name).await?;
        self.mount_layers(name).await?;
        self.net.attach(name, true).await?;
        let dir = self.dir(name);
        Ok(self
            .runc
            .run_detached(name.as_str(), &dir.bundle(), &dir.runc_log())
            .await?)
    }

    async fn restore_checkpoint(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.forget_exited(name).await?;
        self.mount_layers(name).await?;
        self.net.attach(name, true).await?;
        let dir = self.dir(name);
        let _ = tokio::fs::create_dir_all(dir.criu_work()).await;
        let paths = (dir.bundle(), dir.checkpoint(), dir.criu_work());
        let how = Restore {
            tcp_established: self.net.keeps_connections(name),
            lazy_pages: false,
        };
        Ok(self
            .runc
            .restore(
                name.as_str(),
                (&paths.0, &paths.1, &paths.2),
                how,
                &dir.runc_log(),
            )
            .await?)
    }
}

#[async_trait]
impl Driver for Host {
    async fn status(&self, name: &InstanceName) -> Result<Option<Status>, DriverError> {
        Ok(self.state(name).await?.map(|s| Status {
            state: match s.status {
                RuncStatus::Running => RunState::Running,
                RuncStatus::Paused => RunState::Paused,
                RuncStatus::Stopped => RunState::Stopped,
            },
            pid: s.pid,
        }))
    }

    fn has_files(&self, name: &InstanceName) -> bool {
        self.dir(name).root().exists()
    }

    fn is_held(&self, name: &InstanceName) -> bool {
        self.dir(name).held_marker().exists()
    }

    /// A layered instance's upper dir: what a move sends.
    fn rootfs(&self, name: &InstanceName) -> PathBuf {
        self.own_tree(name)
    }

    fn images(&self, name: &InstanceName) -> PathBuf {
        self.migration_dir(name).join("images")
    }

    async fn stage_images(&self, name: &InstanceName, bytes: u64) -> Result<PathBuf, DriverError> {
        Ok(self.fresh_staging(name, bytes).await?.join("images"))
    }

    /// Its snapshots move with it.
    fn kept_files(&self, name: &InstanceName) -> Option<PathBuf> {
        Some(self.dir(name).snapshots())
    }

    fn staging(&self, name: &InstanceName) -> PathBuf {
        self.migration_dir(name)
    }

    fn has_checkpoint(&self, name: &InstanceName) -> bool {
        self.dir(name).checkpoint().join("inventory.img").exists()
    }

    fn last_exit(&self, name: &InstanceName) -> Option<ProcessExit> {
        super::shim::read_exit(&super::runc::last_exit_file(&self.dir(name).runc_log()))
    }

    async fn import_rootfs(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
        source: &Path,
        take: bool,
    ) -> Result<(), DriverError> {
        self.import_tree(name, spec.image.as_deref(), source, take)
            .await
    }

    async fn layer_on(&self, name: &InstanceName, image: &str) -> Result<bool, DriverError> {
        self.layer_instance(name, image).await
    }

    async fn store_image(&self, image: &str, tree: &Path, take: bool) -> Result<(), DriverError> {
        self.store_tree(image, tree, take).await
    }

    fn image_tree(&self, image: &str) -> Option<PathBuf> {
        self.stored_image(image).ok().filter(|t| t.is_dir())
    }

    fn lease_image(&self, image: &str) -> Option<ImageLease> {
        self.lease(image)
    }

    fn lays_images(&self) -> bool {
        self.lays_images
    }

    async fn stage_rootfs(&self, source: &Path, dest: &Path) -> Result<(), DriverError> {
        let (source, dest, timeout) = (source.to_path_buf(), dest.to_path_buf(), self.timeout);
        tokio::task::spawn_blocking(move || bundle::import_rootfs(&source, &dest, timeout))
            .await
            .map_err(|e| DriverError::Runtime(e.to_string()))?
            .map_err(|e| DriverError::BadInput(e.to_string()))
    }

    async fn configure(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
        held: bool,
    ) -> Result<(), DriverError> {
        self.write_config(name, spec, held).await
    }

    async fn start(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.start_container(name).await
    }

    async fn restore(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.restore_checkpoint(name).await
    }

    async fn stop(&self, name: &InstanceName, force: bool) -> Result<(), DriverError> {
        Ok(self.stop_container(name, force).await?)
    }

    /// CRIU dumps the processes into the checkpoint dir and they end.
    async fn checkpoint_stop(&self, name: &InstanceName) -> Result<(), DriverError> {
        let dir = self.dir(name);
        // Nothing may reach its sockets once the dump has copied them.
        self.net.set_link(name, false).await?;
        let _ = tokio::fs::remove_dir_all(dir.checkpoint()).await;
        let dumped = async {
            create_dirs(&[dir.checkpoint(), dir.criu_work()]).await?;
            let ends = Dump {
                tcp_established: self.net.keeps_connections(name),
                ..Dump::default()
            };
            let (images, work) = (dir.checkpoint(), dir.criu_work());
            self.runc
                .checkpoint(name.as_str(), &images, &work, ends, &dir.runc_log())
                .await
        }
        .await;
        if dumped.is_err() {
            // It runs on: on the network again.
            self.net.announce(name).await;
        }
        dumped?;
        Ok(self.forget_exited(name).await?)
    }

    async fn discard_checkpoint(&self, name: &InstanceName) {
        let _ = tokio::fs::remove_dir_all(self.dir(name).checkpoint()).await;
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
        self.rootfs_from_snapshot(name, snap).await
    }

    async fn delete_snapshot(&self, name: &InstanceName, snap: &SnapshotName) {
        let _ = tokio::fs::remove_dir_all(self.dir(name).snapshot(snap)).await;
    }

    /// runc gives up freezing a cgroup whose tasks do not stop in time (a
    /// busy workload on a loaded host: "unable to freeze") and thaws it
    /// again; a few more tries usually succeed.
    async fn freeze(&self, name: &InstanceName) -> Result<(), DriverError> {
        let log = self.dir(name).runc_log();
        let mut tries = 1;
        loop {
            match self.runc.pause(name.as_str(), &log).await {
                Err(e) if tries < FREEZE_TRIES && e.to_string().contains("unable to freeze") => {
                    tracing::info!(instance = %name, tries, "runc could not freeze it yet; again");
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // Frozen, its address is withdrawn here: no packet may
                // reach its sockets (and be acknowledged by this kernel)
                // after the dump copies them.
                Ok(()) => return self.net.set_link(name, false).await,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Its address is announced here again before it runs.
    async fn thaw(&self, name: &InstanceName) -> Result<(), DriverError> {
        if crate::hooks::criu_fails(&self.data_dir, "thaw") {
            return Err(DriverError::Runtime(
                "runc resume failed (test hook)".into(),
            ));
        }
        self.net.announce(name).await;
        Ok(self
            .runc
            .resume(name.as_str(), &self.dir(name).runc_log())
            .await?)
    }

    /// `runc checkpoint --leave-running` of the paused container: it stays
    /// paused (never killed).
    async fn dump_frozen(
        &self,
        name: &InstanceName,
        page_server: Option<SocketAddr>,
    ) -> Result<(), DriverError> {
        self.final_dump(name, page_server).await
    }

    async fn keep_final_dump(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.keep_dump(name).await
    }

    /// The bundle's config names a CRIU config with `leave-stopped`.
    async fn restore_held(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
    ) -> Result<(), DriverError> {
        self.held_restore(name, spec, false).await
    }

    async fn dump_lazy(&self, name: &InstanceName) -> Result<LazyDump, DriverError> {
        self.dump_lazy_frozen(name).await
    }

    fn end_leftovers(&self) {
        self.end_leftover_lazy_dumps();
    }

    fn lazy_unavailable(&self, _name: &InstanceName) -> Option<String> {
        lazy::lazy_unavailable_here()
    }

    async fn lazy_pages_daemon(&self, name: &InstanceName) -> Result<PageServer, DriverError> {
        self.start_lazy_pages_daemon(name).await
    }

    async fn restore_held_lazily(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
    ) -> Result<(), DriverError> {
        self.held_restore(name, spec, true).await
    }

    /// SIGCONT to every task of the held container.
    async fn release_held(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
    ) -> Result<(), DriverError> {
        let dir = self.dir(name);
        let pids = self.runc.pids(name.as_str(), &dir.runc_log()).await?;
        // Announced before it runs: the switch is committed, it is the
        // instance now.
        self.net.announce(name).await;
        crate::driver::signal_each(&pids, rustix::process::Signal::CONT);
        // Later restores of this instance must not come back held.
        self.write_config(name, spec, false).await?;
        let _ = tokio::fs::remove_file(dir.held_marker()).await;
        self.clear_staging(name).await;
        Ok(())
    }

    async fn remove(&self, name: &InstanceName) -> Result<(), DriverError> {
        let log = self.dir(name).runc_log();
        if let Some(state) = self.state(name).await? {
            if state.status == RuncStatus::Paused {
                // SIGKILL queued while frozen: when delete thaws the
                // tasks they die before running another instruction.
                self.runc.kill_frozen(name.as_str(), &log).await?;
            }
            self.runc.delete(name.as_str(), true, &log).await?;
        }
        self.net.detach(name).await;
        self.clear_staging(name).await;
        let image = self.image_of(name);
        self.unmount_layers(name).await?;
        let _ = tokio::fs::remove_dir_all(self.dir(name).root()).await;
        if let Some(id) = image {
            self.forget_unused_image(&id).await;
        }
        Ok(())
    }

    async fn exec(&self, name: &InstanceName, argv: &[String]) -> Result<ExecOutput, DriverError> {
        Ok(self
            .runc
            .exec(name.as_str(), argv, &self.dir(name).runc_log())
            .await?)
    }

    async fn mounted_filesystems(&self, _name: &InstanceName, pid: u32) -> Vec<String> {
        tokio::task::spawn_blocking(move || runtime_facts::mounted_types(pid))
            .await
            .unwrap_or_default()
    }

    fn stateful_unavailable(
        &self,
        _name: &InstanceName,
        facts: Option<&HostFacts>,
    ) -> Option<(String, String)> {
        let usable = facts.is_some_and(|f| f.runtimes.criu.is_some() && f.runtimes.criu_check);
        (!usable).then(|| {
            (
                "CRIU is missing or 'criu check' fails".to_string(),
                "Install CRIU >= 4 (scripts/install-deps.sh)".to_string(),
            )
        })
    }

    fn streams_pages(&self, _name: &InstanceName) -> bool {
        true
    }

    fn memory_in_use(&self, name: &InstanceName) -> Option<u64> {
        self.cgroup_memory(name)
    }

    async fn page_server(
        &self,
        name: &InstanceName,
        bytes: u64,
    ) -> Result<PageServer, DriverError> {
        self.start_page_server(name, bytes).await
    }

    async fn precopy_unavailable(&self, _name: &InstanceName) -> Option<String> {
        self.dirty_tracking_missing().await
    }

    async fn runtimes(&self) -> Runtimes {
        self.probe_runtimes().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_with_the_same_name_get_different_cgroups() {
        let a = cgroup_parent(Path::new("/tmp/cluster-a/n2"), "n2");
        let b = cgroup_parent(Path::new("/tmp/cluster-b/n2"), "n2");
        assert_ne!(a, b);
        assert!(a.starts_with("ferry-n2-"));
    }
}
