//! A host driver without processes: each instance is a state in a world
//! shared by every fake host of one test, its files real files under a
//! temporary dir (so the real tree transfer moves them). The world checks
//! the safety rule on every change: never two running copies of an
//! instance. Failures are injected per host, operation and instance.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ferry_raft::{HostFacts, InstanceSpec, Runtimes};

use crate::api::names::{InstanceName, SnapshotName};
use crate::driver::{Driver, DriverError, ExecOutput, RunState, Status};

/// What one host holds of an instance, as its runtime would report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copy {
    Running,
    /// Frozen in place by the runtime.
    Paused,
    /// Restored for a move with every task stopped.
    Held,
}

#[derive(Default)]
struct Inner {
    /// (host, instance) → copy.
    copies: BTreeMap<(String, String), Copy>,
    /// (host, operation, instance) → how many more calls fail.
    failures: BTreeMap<(String, String, String), u32>,
    violations: Vec<String>,
}

/// Every fake host of one test.
#[derive(Clone, Default)]
pub struct World {
    inner: Arc<Mutex<Inner>>,
}

impl World {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next `times` calls of `op` for `instance` on `host` fail.
    pub fn fail(&self, host: &str, op: &str, instance: &str, times: u32) {
        let key = (host.to_string(), op.to_string(), instance.to_string());
        self.inner().failures.insert(key, times);
    }

    pub fn copy(&self, host: &str, instance: &str) -> Option<Copy> {
        let key = (host.to_string(), instance.to_string());
        self.inner().copies.get(&key).copied()
    }

    /// Every time a second copy of an instance ran.
    pub fn violations(&self) -> Vec<String> {
        self.inner().violations.clone()
    }

    fn injected(&self, host: &str, op: &str, instance: &str) -> Result<(), DriverError> {
        let key = (host.to_string(), op.to_string(), instance.to_string());
        let mut inner = self.inner();
        match inner.failures.get_mut(&key) {
            Some(left) if *left > 0 => {
                *left -= 1;
                Err(DriverError::Runtime(format!(
                    "injected {op} failure on {host}"
                )))
            }
            _ => Ok(()),
        }
    }

    fn set(&self, host: &str, instance: &str, copy: Option<Copy>) {
        let mut inner = self.inner();
        let key = (host.to_string(), instance.to_string());
        match copy {
            Some(copy) => inner.copies.insert(key, copy),
            None => inner.copies.remove(&key),
        };
        let running: Vec<&str> = inner
            .copies
            .iter()
            .filter(|((_, i), c)| i == instance && **c == Copy::Running)
            .map(|((h, _), _)| h.as_str())
            .collect();
        if running.len() > 1 {
            let seen = format!("{instance} runs on {running:?} at once");
            inner.violations.push(seen);
        }
    }
}

pub struct FakeDriver {
    host: String,
    root: PathBuf,
    world: World,
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), dest)?;
        }
    }
    Ok(())
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DriverError {
    let path = path.to_path_buf();
    move |source| DriverError::File { what, path, source }
}

impl FakeDriver {
    pub fn new(host: &str, root: &Path, world: &World) -> Self {
        FakeDriver {
            host: host.to_string(),
            root: root.to_path_buf(),
            world: world.clone(),
        }
    }

    fn dir(&self, name: &InstanceName) -> PathBuf {
        self.root.join(name.as_str())
    }

    fn check(&self, op: &str, name: &InstanceName) -> Result<(), DriverError> {
        self.world.injected(&self.host, op, name.as_str())
    }

    fn copy(&self, name: &InstanceName) -> Option<Copy> {
        self.world.copy(&self.host, name.as_str())
    }

    fn set(&self, name: &InstanceName, copy: Option<Copy>) {
        self.world.set(&self.host, name.as_str(), copy);
    }

    /// `op` moves the copy from one of `from` to `to`.
    fn transition(
        &self,
        op: &str,
        name: &InstanceName,
        from: &[Copy],
        to: Option<Copy>,
    ) -> Result<(), DriverError> {
        self.check(op, name)?;
        match self.copy(name) {
            Some(c) if from.contains(&c) => {
                self.set(name, to);
                Ok(())
            }
            other => Err(DriverError::Runtime(format!(
                "{op} of '{name}' on {}: it is {other:?}",
                self.host
            ))),
        }
    }
}

#[async_trait]
impl Driver for FakeDriver {
    async fn status(&self, name: &InstanceName) -> Result<Option<Status>, DriverError> {
        Ok(self.copy(name).map(|c| Status {
            state: match c {
                Copy::Running | Copy::Held => RunState::Running,
                Copy::Paused => RunState::Paused,
            },
            pid: 1,
        }))
    }

    fn has_files(&self, name: &InstanceName) -> bool {
        self.dir(name).exists()
    }

    fn is_held(&self, name: &InstanceName) -> bool {
        self.copy(name) == Some(Copy::Held)
    }

    fn rootfs(&self, name: &InstanceName) -> PathBuf {
        self.dir(name).join("rootfs")
    }

    fn images(&self, name: &InstanceName) -> PathBuf {
        self.staging(name).join("images")
    }

    fn staging(&self, name: &InstanceName) -> PathBuf {
        self.dir(name).join("staging")
    }

    fn has_checkpoint(&self, name: &InstanceName) -> bool {
        self.dir(name).join("checkpoint").exists()
    }

    fn last_exit(&self, _: &InstanceName) -> Option<crate::driver::ProcessExit> {
        // Processes here never end on their own.
        None
    }

    async fn import_rootfs(
        &self,
        name: &InstanceName,
        _spec: &InstanceSpec,
        source: &Path,
        _take: bool,
    ) -> Result<(), DriverError> {
        self.check("import_rootfs", name)?;
        let _ = std::fs::remove_dir_all(self.dir(name));
        self.stage_rootfs(source, &self.rootfs(name)).await
    }

    async fn stage_rootfs(&self, source: &Path, dest: &Path) -> Result<(), DriverError> {
        copy_tree(source, dest).map_err(|e| DriverError::BadInput(e.to_string()))
    }

    async fn configure(
        &self,
        name: &InstanceName,
        _spec: &InstanceSpec,
        held: bool,
    ) -> Result<(), DriverError> {
        self.check("configure", name)?;
        let path = self.dir(name).join("config");
        std::fs::write(&path, if held { "held" } else { "plain" })
            .map_err(io_error("cannot write", &path))
    }

    async fn start(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.check("start", name)?;
        match self.copy(name) {
            None => {
                self.set(name, Some(Copy::Running));
                Ok(())
            }
            Some(other) => Err(DriverError::Runtime(format!(
                "start of '{name}' on {}: it is {other:?}",
                self.host
            ))),
        }
    }

    async fn restore(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.start(name).await
    }

    async fn stop(&self, name: &InstanceName, _force: bool) -> Result<(), DriverError> {
        self.check("stop", name)?;
        self.set(name, None);
        Ok(())
    }

    async fn checkpoint_stop(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.transition("checkpoint_stop", name, &[Copy::Running], None)
    }

    async fn discard_checkpoint(&self, _name: &InstanceName) {}

    async fn snapshot(
        &self,
        name: &InstanceName,
        _snap: &SnapshotName,
        _stateful: bool,
    ) -> Result<(), DriverError> {
        self.check("snapshot", name)
    }

    async fn restore_snapshot(
        &self,
        name: &InstanceName,
        _snap: &SnapshotName,
        _stateful: bool,
    ) -> Result<(), DriverError> {
        self.check("restore_snapshot", name)
    }

    async fn reset_to_snapshot(
        &self,
        name: &InstanceName,
        _snap: &SnapshotName,
    ) -> Result<(), DriverError> {
        self.check("reset_to_snapshot", name)
    }

    async fn delete_snapshot(&self, _name: &InstanceName, _snap: &SnapshotName) {}

    async fn freeze(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.transition("freeze", name, &[Copy::Running], Some(Copy::Paused))
    }

    async fn thaw(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.transition("thaw", name, &[Copy::Paused], Some(Copy::Running))
    }

    async fn keep_final_dump(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.transition("keep_final_dump", name, &[Copy::Paused], None)?;
        let checkpoint = self.dir(name).join("checkpoint");
        std::fs::rename(self.images(name), &checkpoint)
            .map_err(io_error("cannot keep", &checkpoint))
    }

    async fn dump_frozen(
        &self,
        name: &InstanceName,
        _page_server: Option<std::net::SocketAddr>,
    ) -> Result<(), DriverError> {
        self.check("dump_frozen", name)?;
        if self.copy(name) != Some(Copy::Paused) {
            return Err(DriverError::Runtime(format!(
                "dump of '{name}': not frozen"
            )));
        }
        let images = self.images(name);
        std::fs::create_dir_all(&images).map_err(io_error("cannot create", &images))?;
        let memory = images.join("memory.img");
        std::fs::write(&memory, name.as_str()).map_err(io_error("cannot write", &memory))
    }

    async fn restore_held(
        &self,
        name: &InstanceName,
        _spec: &InstanceSpec,
    ) -> Result<(), DriverError> {
        self.check("restore_held", name)?;
        let memory = self.images(name).join("memory.img");
        if std::fs::read_to_string(&memory).ok().as_deref() != Some(name.as_str()) {
            return Err(DriverError::Runtime(format!(
                "no memory image of '{name}' arrived"
            )));
        }
        self.set(name, Some(Copy::Held));
        Ok(())
    }

    async fn release_held(
        &self,
        name: &InstanceName,
        _spec: &InstanceSpec,
    ) -> Result<(), DriverError> {
        self.transition("release_held", name, &[Copy::Held], Some(Copy::Running))?;
        let _ = std::fs::remove_dir_all(self.staging(name));
        // "released": the copy runs, but the agent never gets to propose
        // Done (cut off from the cluster, or it crashed right here).
        self.check("released", name)
    }

    async fn remove(&self, name: &InstanceName) -> Result<(), DriverError> {
        self.check("remove", name)?;
        self.set(name, None);
        let _ = std::fs::remove_dir_all(self.dir(name));
        Ok(())
    }

    async fn exec(&self, name: &InstanceName, _argv: &[String]) -> Result<ExecOutput, DriverError> {
        self.check("exec", name)?;
        Ok(ExecOutput::default())
    }

    async fn mounted_filesystems(&self, _name: &InstanceName, _pid: u32) -> Vec<String> {
        Vec::new()
    }

    fn stateful_unavailable(
        &self,
        _name: &InstanceName,
        _facts: Option<&HostFacts>,
    ) -> Option<(String, String)> {
        None
    }

    async fn precopy_unavailable(&self, _name: &InstanceName) -> Option<String> {
        Some("the fake driver has no dirty-memory tracking".into())
    }

    async fn runtimes(&self) -> Runtimes {
        Runtimes {
            runc: Some("fake".into()),
            criu: Some("4.1.1".into()),
            criu_check: true,
            criu_inet: true,
            criu_other_users: true,
            ..Runtimes::default()
        }
    }
}
