//! Making the owner's host match the replicated state. `decide` is pure
//! (instance + what runc reports in, action out); `Host` carries actions
//! out with runc under a per-instance lock that operator actions share, so
//! the reconciler never races a stop or a checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_raft::{DesiredState, Instance, NodeId, ObservedState};

use super::bundle::InstanceDir;
use super::runc::{ContainerState, ExecOutput, Runc, RuncError, Status};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Run the instance's command afresh.
    Start,
    /// Restore it from the checkpoint of a stateful stop.
    Restore,
    /// Stop it: desired stopped but it runs (e.g. the agent died between
    /// committing a stop and doing it).
    Stop,
}

/// What the owner should do for `instance`, and what to report.
pub fn decide(
    instance: &Instance,
    me: NodeId,
    runc: Option<Status>,
) -> (Action, Option<ObservedState>) {
    // Only the owner runs an instance; a job's participants drive it while
    // it moves.
    if instance.owner != me || instance.job.is_some() {
        return (Action::Nothing, None);
    }
    let observed = match runc {
        Some(Status::Running) => ObservedState::Running,
        Some(Status::Paused) => ObservedState::Frozen,
        Some(Status::Stopped) | None => ObservedState::Stopped,
    };
    match (instance.desired, runc) {
        (DesiredState::Running, None) if instance.observed == ObservedState::Error => {
            // A failed start is retried by `ferry start`, not in a loop.
            (Action::Nothing, None)
        }
        (DesiredState::Running, None) if instance.checkpointed => (Action::Restore, None),
        (DesiredState::Running, None) => (Action::Start, None),
        (DesiredState::Stopped, Some(Status::Running | Status::Paused)) => (Action::Stop, None),
        _ => (Action::Nothing, Some(observed)),
    }
}

/// The cgroup parent of an agent's containers: unique per agent on a
/// host (names repeat across clusters sharing a host; data dirs do not),
/// so one agent freezing its container can never freeze another's.
fn cgroup_parent(data_dir: &Path, node_name: &str) -> String {
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let digest = ferry_transport::pki::sha256_hex(dir.to_string_lossy().as_bytes());
    format!("ferry-{node_name}-{}", &digest[..8])
}

/// The container side of one agent.
pub struct Host {
    runc: Runc,
    data_dir: PathBuf,
    cgroup_parent: String,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Host {
    pub fn new(data_dir: &Path, node_name: &str) -> Self {
        Host {
            runc: Runc::new(data_dir.join("runc")),
            data_dir: data_dir.to_path_buf(),
            cgroup_parent: cgroup_parent(data_dir, node_name),
            locks: Mutex::new(HashMap::new()),
        }
    }

    pub fn dir(&self, name: &str) -> InstanceDir {
        InstanceDir::new(&self.data_dir, name)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// Held across every change to one instance on this host.
    pub async fn lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(name.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }

    fn log(&self) -> PathBuf {
        self.data_dir.join("runc.log")
    }

    pub async fn list(&self) -> Result<Vec<(String, ContainerState)>, RuncError> {
        tokio::fs::create_dir_all(self.data_dir.join("runc"))
            .await
            .ok();
        self.runc.list(&self.log()).await
    }

    pub async fn status(&self, name: &str) -> Result<Option<ContainerState>, RuncError> {
        tokio::fs::create_dir_all(self.data_dir.join("runc"))
            .await
            .ok();
        self.runc.state(name, &self.log()).await
    }

    /// Remove runc's record of an exited container so the id can run again.
    async fn forget_exited(&self, name: &str) -> Result<(), RuncError> {
        if let Some(state) = self.status(name).await? {
            if state.status == Status::Stopped {
                self.runc
                    .delete(name, true, &self.dir(name).runc_log())
                    .await?;
            }
        }
        Ok(())
    }

    pub async fn start(&self, name: &str) -> Result<(), RuncError> {
        self.forget_exited(name).await?;
        let dir = self.dir(name);
        self.runc
            .run_detached(name, &dir.bundle(), &dir.runc_log())
            .await
    }

    pub async fn restore(&self, name: &str) -> Result<(), RuncError> {
        self.forget_exited(name).await?;
        let dir = self.dir(name);
        let _ = tokio::fs::create_dir_all(dir.criu_work()).await;
        self.runc
            .restore(
                name,
                &dir.bundle(),
                &dir.checkpoint(),
                &dir.criu_work(),
                &dir.runc_log(),
            )
            .await
    }

    /// SIGTERM, then SIGKILL after `grace` (at once with `force`), then
    /// forget the container. The rootfs stays.
    pub async fn stop(&self, name: &str, force: bool) -> Result<(), RuncError> {
        let log = self.dir(name).runc_log();
        if self.status(name).await?.is_none() {
            return Ok(());
        }
        if self.status(name).await?.map(|s| s.status) == Some(Status::Paused) {
            self.runc.resume(name, &log).await?;
        }
        if !force {
            let _ = self.runc.kill(name, "TERM", &log).await;
            for _ in 0..50 {
                match self.status(name).await? {
                    Some(s) if s.status != Status::Stopped => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    _ => break,
                }
            }
        }
        self.runc.delete(name, true, &log).await
    }

    /// Stateful stop: CRIU dumps the processes into the checkpoint dir and
    /// they end; start restores them. On failure the instance keeps running.
    pub async fn checkpoint_stop(&self, name: &str) -> Result<(), RuncError> {
        let dir = self.dir(name);
        let _ = tokio::fs::remove_dir_all(dir.checkpoint()).await;
        for d in [dir.checkpoint(), dir.criu_work()] {
            tokio::fs::create_dir_all(&d)
                .await
                .map_err(|source| RuncError::File { path: d, source })?;
        }
        self.runc
            .checkpoint(
                name,
                &dir.checkpoint(),
                &dir.criu_work(),
                false,
                &dir.runc_log(),
            )
            .await?;
        self.forget_exited(name).await
    }

    /// A consistent copy of the rootfs (and, `stateful`, of memory) while
    /// the instance is paused; it runs on afterwards.
    pub async fn snapshot(&self, name: &str, snap: &str, stateful: bool) -> Result<(), RuncError> {
        let dir = self.dir(name);
        let target = dir.snapshot(snap);
        let log = dir.runc_log();
        let running = matches!(
            self.status(name).await?.map(|s| s.status),
            Some(Status::Running)
        );
        if running {
            self.runc.pause(name, &log).await?;
        }
        let result = async {
            if stateful {
                let images = target.join("checkpoint");
                for d in [images.clone(), dir.criu_work()] {
                    tokio::fs::create_dir_all(&d)
                        .await
                        .map_err(|source| RuncError::File { path: d, source })?;
                }
                self.runc
                    .checkpoint(name, &images, &dir.criu_work(), true, &log)
                    .await?;
            }
            copy_dir(dir.rootfs(), target.join("rootfs")).await
        }
        .await;
        if running {
            self.runc.resume(name, &log).await?;
        }
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(&target).await;
        }
        result
    }

    /// Bring the rootfs (and memory, for a stateful snapshot) back to the
    /// snapshot. The current processes end first.
    pub async fn restore_snapshot(
        &self,
        name: &str,
        snap: &str,
        stateful: bool,
    ) -> Result<(), RuncError> {
        let dir = self.dir(name);
        let source = dir.snapshot(snap);
        self.stop(name, true).await?;
        copy_dir(source.join("rootfs"), dir.rootfs()).await?;
        if stateful {
            copy_dir(source.join("checkpoint"), dir.checkpoint()).await?;
            self.restore(name).await
        } else {
            let _ = tokio::fs::remove_dir_all(dir.checkpoint()).await;
            self.start(name).await
        }
    }

    pub async fn pause(&self, name: &str) -> Result<(), RuncError> {
        self.runc.pause(name, &self.dir(name).runc_log()).await
    }

    pub async fn resume(&self, name: &str) -> Result<(), RuncError> {
        self.runc.resume(name, &self.dir(name).runc_log()).await
    }

    /// Final dump of a paused instance; it stays paused (never killed), so
    /// it can be thawed if the move rolls back.
    pub async fn dump_frozen(&self, name: &str, images: &Path) -> Result<(), RuncError> {
        let dir = self.dir(name);
        let work = dir.migration().join("work");
        for d in [images.to_path_buf(), work.clone()] {
            let _ = tokio::fs::remove_dir_all(&d).await;
            tokio::fs::create_dir_all(&d)
                .await
                .map_err(|source| RuncError::File { path: d, source })?;
        }
        self.runc
            .checkpoint(name, images, &work, true, &dir.runc_log())
            .await
    }

    /// Restore from `images` with every task held stopped (the bundle's
    /// config names a CRIU config with `leave-stopped`).
    pub async fn restore_held(&self, name: &str, images: &Path) -> Result<(), RuncError> {
        self.forget_exited(name).await?;
        let dir = self.dir(name);
        let work = dir.migration().join("restore-work");
        let _ = tokio::fs::create_dir_all(&work).await;
        self.runc
            .restore(name, &dir.bundle(), images, &work, &dir.runc_log())
            .await
    }

    /// SIGCONT every task of a held container.
    pub async fn thaw_held(&self, name: &str) -> Result<(), RuncError> {
        let log = self.dir(name).runc_log();
        for pid in self.runc.pids(name, &log).await? {
            let _ = tokio::process::Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status()
                .await;
        }
        Ok(())
    }

    pub async fn exec(&self, name: &str, argv: &[String]) -> Result<ExecOutput, RuncError> {
        self.runc.exec(name, argv, &self.dir(name).runc_log()).await
    }

    /// Forget the container and delete every file of the instance.
    pub async fn remove(&self, name: &str) -> Result<(), RuncError> {
        if let Some(state) = self.status(name).await? {
            if state.status == Status::Paused {
                // Queue SIGKILL while frozen: when delete thaws the tasks
                // they die before running another instruction.
                let _ = self
                    .runc
                    .kill(name, "KILL", &self.dir(name).runc_log())
                    .await;
            }
            self.runc
                .delete(name, true, &self.dir(name).runc_log())
                .await?;
        }
        let root = self.dir(name).root().to_path_buf();
        let _ = tokio::fs::remove_dir_all(&root).await;
        Ok(())
    }
}

async fn copy_dir(source: PathBuf, dest: PathBuf) -> Result<(), RuncError> {
    let at = dest.clone();
    tokio::task::spawn_blocking(move || super::bundle::copy_tree(&source, &dest))
        .await
        .map_err(|e| RuncError::File {
            path: at.clone(),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(|e| RuncError::File {
            path: at,
            source: std::io::Error::other(e.to_string()),
        })
}

/// Filesystem types mounted inside the container whose init is `pid`.
pub fn mounted_types(pid: u32) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap_or_default();
    let mut types: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .collect();
    types.sort();
    types.dedup();
    types
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_raft::{InstanceKind, InstanceSpec};

    fn instance(desired: DesiredState, observed: ObservedState) -> Instance {
        Instance {
            name: "c1".into(),
            kind: InstanceKind::Container,
            spec: InstanceSpec::default(),
            owner: 1,
            epoch: 1,
            desired,
            observed,
            detail: None,
            checkpointed: false,
            baseline: None,
            snapshots: Vec::new(),
            created_ms: 0,
            job: None,
        }
    }

    #[test]
    fn agents_with_the_same_name_get_different_cgroups() {
        let a = cgroup_parent(Path::new("/tmp/cluster-a/n2"), "n2");
        let b = cgroup_parent(Path::new("/tmp/cluster-b/n2"), "n2");
        assert_ne!(a, b);
        assert!(a.starts_with("ferry-n2-"));
    }

    #[test]
    fn never_starts_a_second_copy_when_runc_reports_one() {
        let i = instance(DesiredState::Running, ObservedState::Pending);
        for status in [Status::Running, Status::Paused, Status::Stopped] {
            assert_eq!(decide(&i, 1, Some(status)).0, Action::Nothing, "{status:?}");
        }
    }

    #[test]
    fn non_owner_never_runs_or_stops_an_instance() {
        for desired in [DesiredState::Running, DesiredState::Stopped] {
            for status in [None, Some(Status::Running)] {
                let i = instance(desired, ObservedState::Running);
                assert_eq!(decide(&i, 2, status), (Action::Nothing, None));
            }
        }
    }

    #[test]
    fn an_instance_held_by_a_job_is_left_to_the_job() {
        let mut i = instance(DesiredState::Running, ObservedState::Running);
        i.job = Some(4);
        assert_eq!(decide(&i, 1, None), (Action::Nothing, None));
    }

    #[test]
    fn a_missing_container_is_started_or_restored() {
        let mut i = instance(DesiredState::Running, ObservedState::Pending);
        assert_eq!(decide(&i, 1, None).0, Action::Start);
        i.checkpointed = true;
        assert_eq!(decide(&i, 1, None).0, Action::Restore);
        i.observed = ObservedState::Error;
        assert_eq!(decide(&i, 1, None).0, Action::Nothing);
    }

    #[test]
    fn a_running_container_that_should_be_stopped_is_stopped() {
        let i = instance(DesiredState::Stopped, ObservedState::Running);
        assert_eq!(decide(&i, 1, Some(Status::Running)).0, Action::Stop);
        assert_eq!(
            decide(&i, 1, None),
            (Action::Nothing, Some(ObservedState::Stopped))
        );
    }
}
