//! What the migration engine, the reconciler and the instance operations
//! need from a host runtime, whatever the instance kind (layer 0). The
//! runc + CRIU driver (`container::host::Host`) and the QEMU driver
//! (`vm::host::VmHost`) implement it; `kinds::Kinds` sends each call to the
//! one of the instance's kind. Nothing above this trait names a runtime.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use ferry_raft::{HostFacts, InstanceSpec, LiveSettings, Runtimes};

use crate::api::names::{InstanceName, SnapshotName};
use crate::migration::plan::LocalCopy;

/// What the runtime reports of an instance it knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    /// Frozen in place (every task stopped by the runtime).
    Paused,
    /// Known to the runtime but not running.
    Stopped,
}

/// How an instance's first process ended, as its parent saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessExit {
    Code(i32),
    Signal(i32),
}

impl ProcessExit {
    /// What `--restart on-failure` restarts: anything but exit code 0.
    pub fn is_failure(self) -> bool {
        self != ProcessExit::Code(0)
    }
}

impl std::fmt::Display for ProcessExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessExit::Code(code) => write!(f, "its process exited with code {code}"),
            ProcessExit::Signal(signal) => write!(f, "its process was killed by signal {signal}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub state: RunState,
    /// The instance's first process on this host.
    pub pid: u32,
}

#[derive(Clone, Debug, Default)]
pub struct ExecOutput {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// How a live move the runtime drove ended on the source.
#[derive(Clone, Debug, Default)]
pub struct LiveEnd {
    /// For the job (the runtime's own figures).
    pub note: Option<String>,
    /// How long the instance has been paused already (the runtime's own
    /// switchover), so the move's downtime counts it.
    pub paused_ms: u64,
}

/// A runtime's failure, in the runtime's own words.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The runtime failed or refused.
    #[error("{0}")]
    Runtime(String),
    /// What the user gave (a rootfs, an argument) cannot be used.
    #[error("{0}")]
    BadInput(String),
    /// A file of the instance on this host.
    #[error("{what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Every operation takes the instance's name; the caller holds the
/// instance's host lock (`node::locks`) around each change.
#[async_trait]
pub trait Driver: Send + Sync {
    /// The runtime's view of `name`; `None` when it knows no such instance.
    async fn status(&self, name: &InstanceName) -> Result<Option<Status>, DriverError>;
    /// Whether this host holds any file of `name`.
    fn has_files(&self, name: &InstanceName) -> bool;
    /// Whether a copy restored for a move is held here (its tasks stay
    /// stopped until [`Driver::release_held`]).
    fn is_held(&self, name: &InstanceName) -> bool;
    /// Where `name`'s root filesystem lives here (what a move sends).
    fn rootfs(&self, name: &InstanceName) -> PathBuf;
    /// Where a move's final memory images of `name` live here.
    fn images(&self, name: &InstanceName) -> PathBuf;
    /// An empty [`Driver::images`] directory for `bytes` of incoming
    /// images (a driver may keep them in memory when they fit).
    async fn stage_images(&self, name: &InstanceName, _bytes: u64) -> Result<PathBuf, DriverError> {
        Ok(self.images(name))
    }
    /// Files that move with `name` besides its rootfs (its snapshots),
    /// sent once while it runs: nothing changes them during a move (the
    /// instance's operations wait for its job).
    fn kept_files(&self, _name: &InstanceName) -> Option<PathBuf> {
        None
    }
    /// A move's staging area of `name` (images, restore configs).
    fn staging(&self, name: &InstanceName) -> PathBuf;
    /// Whether `name` has the memory state of a stateful stop (or of a
    /// final dump kept after a failed thaw) to restore from.
    fn has_checkpoint(&self, name: &InstanceName) -> bool;
    /// How `name`'s process last ended here, when its parent recorded it.
    fn last_exit(&self, name: &InstanceName) -> Option<ProcessExit>;

    /// Replace `name`'s files with the rootfs at `source` (a directory or
    /// a tar archive; a VM's staged files). With `take`, `source` is this
    /// agent's own staging (an unpacked image, a VM's converted disk),
    /// which the import moves in rather than copies where the filesystem
    /// allows.
    async fn import_rootfs(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
        source: &Path,
        take: bool,
    ) -> Result<(), DriverError>;
    /// Make `name`'s rootfs its own changes over image `image` (read-only,
    /// shared): `rootfs` is then the changes alone. Whether this member's
    /// image store holds the image already (else `store_image` it next).
    async fn layer_on(&self, name: &InstanceName, image: &str) -> Result<bool, DriverError> {
        let _ = (name, image);
        Err(no_layers())
    }
    /// Keep the unpacked `tree` as image `image` in this member's store
    /// (moved in with `take`); an image stored already stays.
    async fn store_image(&self, image: &str, tree: &Path, take: bool) -> Result<(), DriverError> {
        let _ = (image, tree, take);
        Err(no_layers())
    }
    /// Image `image`'s tree in this member's store, kept there while the
    /// lease lives (a launch reading it).
    fn lease_image(&self, _image: &str) -> Option<ImageLease> {
        None
    }
    /// Whether this runtime lays instances on shared images here.
    fn lays_images(&self) -> bool {
        false
    }
    /// Image `image`'s tree in this member's store, if it is there.
    fn image_tree(&self, _image: &str) -> Option<PathBuf> {
        None
    }
    /// Unpack the rootfs at `source` (a directory or a tar archive) into
    /// `dest`, owners and modes kept, to send it elsewhere.
    async fn stage_rootfs(&self, source: &Path, dest: &Path) -> Result<(), DriverError>;
    /// Write the runtime's config for `spec`; with `held`, a restore leaves
    /// every task stopped.
    async fn configure(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
        held: bool,
    ) -> Result<(), DriverError>;
    /// Run the instance's command afresh.
    async fn start(&self, name: &InstanceName) -> Result<(), DriverError>;
    /// Bring back the memory state of a stateful stop.
    async fn restore(&self, name: &InstanceName) -> Result<(), DriverError>;
    /// End the processes (at once with `force`); files stay.
    async fn stop(&self, name: &InstanceName, force: bool) -> Result<(), DriverError>;
    /// Save memory state, then end the processes; on failure they run on.
    async fn checkpoint_stop(&self, name: &InstanceName) -> Result<(), DriverError>;
    /// Forget the memory state of an earlier stateful stop.
    async fn discard_checkpoint(&self, name: &InstanceName);
    /// A consistent copy of the files (and, `stateful`, of memory).
    async fn snapshot(
        &self,
        name: &InstanceName,
        snap: &SnapshotName,
        stateful: bool,
    ) -> Result<(), DriverError>;
    /// Back to a snapshot, running again.
    async fn restore_snapshot(
        &self,
        name: &InstanceName,
        snap: &SnapshotName,
        stateful: bool,
    ) -> Result<(), DriverError>;
    /// Put a snapshot's files back without starting anything.
    async fn reset_to_snapshot(
        &self,
        name: &InstanceName,
        snap: &SnapshotName,
    ) -> Result<(), DriverError>;
    async fn delete_snapshot(&self, name: &InstanceName, snap: &SnapshotName);
    /// Stop every task where it is (never a kill).
    async fn freeze(&self, name: &InstanceName) -> Result<(), DriverError>;
    /// Undo [`Driver::freeze`].
    async fn thaw(&self, name: &InstanceName) -> Result<(), DriverError>;
    /// Final dump of a frozen instance into [`Driver::images`]; it stays
    /// frozen, so a rollback can thaw it. With `page_server`, the memory
    /// pages go to the page server listening there as they are dumped
    /// (see [`Driver::page_server`]) and the images hold the rest.
    async fn dump_frozen(
        &self,
        name: &InstanceName,
        page_server: Option<SocketAddr>,
    ) -> Result<(), DriverError>;
    /// A frozen copy that cannot thaw: end it without letting it run (its
    /// state is all in the final dump) and make the final dump its
    /// checkpoint, so [`Driver::restore`] brings it back from there.
    async fn keep_final_dump(&self, name: &InstanceName) -> Result<(), DriverError>;
    /// Restore from [`Driver::images`] with every task held stopped; marked
    /// held before it starts.
    async fn restore_held(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
    ) -> Result<(), DriverError>;
    /// Let a held copy run; later restores are not held, the staging goes.
    async fn release_held(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
    ) -> Result<(), DriverError>;
    /// End the processes (a frozen copy dies without running again) and
    /// delete every file of `name`.
    async fn remove(&self, name: &InstanceName) -> Result<(), DriverError>;
    async fn exec(&self, name: &InstanceName, argv: &[String]) -> Result<ExecOutput, DriverError>;
    /// Filesystem types mounted inside the instance whose first process is
    /// `pid` (part of its baseline).
    async fn mounted_filesystems(&self, name: &InstanceName, pid: u32) -> Vec<String>;
    /// Why this host cannot save `name`'s memory state, from its facts,
    /// and what to do about it (`None`: it can).
    fn stateful_unavailable(
        &self,
        name: &InstanceName,
        facts: Option<&HostFacts>,
    ) -> Option<(String, String)>;
    /// Why memory pre-copy of `name` cannot run here (`None`: it could).
    async fn precopy_unavailable(&self, name: &InstanceName) -> Option<String>;
    /// The runtime's versions and self-check, for the host facts the
    /// compatibility check reads.
    async fn runtimes(&self) -> Runtimes;

    // A live move the runtime drives itself (QEMU's migration) instead of
    // a final dump of files: the engine relays the streams the source's
    // runtime opens, each to its own stream on the move's connection.

    // A final dump whose memory pages stream to the target while they are
    // dumped (CRIU's page server), instead of files sent after the dump.

    /// Whether `name`'s final dump can send its pages to a page server.
    fn streams_pages(&self, _name: &InstanceName) -> bool {
        false
    }
    /// About how many bytes `name`'s memory takes now, when the runtime
    /// knows.
    fn memory_in_use(&self, _name: &InstanceName) -> Option<u64> {
        None
    }
    /// Target: a page server writing into a fresh [`Driver::images`] of
    /// `name` (staged for about `bytes`), fed through its socket.
    async fn page_server(
        &self,
        name: &InstanceName,
        _bytes: u64,
    ) -> Result<PageServer, DriverError> {
        Err(DriverError::Runtime(format!(
            "'{name}' has no page server here"
        )))
    }

    /// Source, frozen: a lazy dump (CRIU lazy pages) into a fresh
    /// [`Driver::images`], all but the memory pages, which its page
    /// server then serves from the still frozen copy.
    async fn dump_lazy(&self, name: &InstanceName) -> Result<LazyDump, DriverError> {
        Err(DriverError::Runtime(format!(
            "'{name}' cannot move lazily here (--lazy is for containers)"
        )))
    }
    /// At the agent's start: end what an earlier agent process's moves
    /// left running that nothing of this process can reach (lazy dumps).
    fn end_leftovers(&self) {}
    /// Why this host cannot be the source of `name`'s lazy move, if not.
    fn lazy_unavailable(&self, _name: &InstanceName) -> Option<String> {
        None
    }
    /// Target: CRIU's lazy-pages daemon for [`Driver::images`] without
    /// memory pages, fed through the returned socket from the source's
    /// lazy dump; `done` ends once it has every page.
    async fn lazy_pages_daemon(&self, name: &InstanceName) -> Result<PageServer, DriverError> {
        Err(DriverError::Runtime(format!(
            "'{name}' cannot move lazily here (--lazy is for containers)"
        )))
    }
    /// Target: [`Driver::restore_held`], the pages from the running
    /// [`Driver::lazy_pages_daemon`].
    async fn restore_held_lazily(
        &self,
        name: &InstanceName,
        _spec: &InstanceSpec,
    ) -> Result<(), DriverError> {
        Err(DriverError::Runtime(format!(
            "'{name}' cannot move lazily here (--lazy is for containers)"
        )))
    }

    /// Whether the runtime moves `name` live by itself.
    fn moves_itself(&self, _name: &InstanceName) -> bool {
        false
    }
    /// The streams the source's runtime opens: each a unix socket the
    /// engine listens on (`relay_dir/<purpose>.sock`) and relays to the
    /// target's [`Driver::live_socket`].
    fn live_streams(&self, _name: &InstanceName) -> &'static [&'static str] {
        &[]
    }
    /// Target: where the receiving runtime listens for stream `purpose`.
    fn live_socket(&self, name: &InstanceName, purpose: &str) -> PathBuf {
        self.staging(name).join(format!("{purpose}.sock"))
    }
    /// The files a live move sends as a tree first (a VM's boot files).
    fn live_files(&self, name: &InstanceName) -> PathBuf {
        self.rootfs(name)
    }
    /// Target: make the receiving copy, held, listening on its sockets.
    async fn receive_live(
        &self,
        name: &InstanceName,
        _spec: &InstanceSpec,
        _settings: &LiveSettings,
    ) -> Result<(), DriverError> {
        Err(DriverError::Runtime(format!(
            "'{name}' cannot move live by its runtime"
        )))
    }
    /// Source: move the running instance through the relay sockets in
    /// `relay_dir`; it ends paused with the target holding everything.
    /// `go_on` is asked right before the runtime pauses it for the last
    /// part: `false` stops the move and it runs on.
    async fn send_live(
        &self,
        name: &InstanceName,
        _relay_dir: &Path,
        _settings: &LiveSettings,
        _go_on: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<LiveEnd, DriverError> {
        Err(DriverError::Runtime(format!(
            "'{name}' cannot move live by its runtime"
        )))
    }
    /// Source, after `send_live`: wait until the runtime has sent the
    /// rest (a VM in post-copy sends the pages the target lacks while it
    /// runs); the relay carries on until then.
    async fn live_sent(&self, _name: &InstanceName) -> Result<(), DriverError> {
        Ok(())
    }
    /// Target: wait until the receiving copy holds the whole state.
    async fn live_received(&self, name: &InstanceName) -> Result<(), DriverError> {
        Err(DriverError::Runtime(format!(
            "'{name}' cannot move live by its runtime"
        )))
    }
}

/// A running page server: what the source's dump sends goes into
/// `socket`; `done` ends once the server has written every page (or
/// failed, with its reasons).
pub struct PageServer {
    pub socket: tokio::net::UnixStream,
    pub done: futures::future::BoxFuture<'static, Result<(), DriverError>>,
}

/// A lazy dump whose page server listens on `server` (loopback); `done`
/// ends with the dump, once the target took every page (or failed).
pub struct LazyDump {
    pub server: SocketAddr,
    pub done: futures::future::BoxFuture<'static, Result<(), DriverError>>,
    /// The process whose tree is the dump ([`end_process_tree`] ends it).
    pub pid: Option<u32>,
}

/// SIGKILL to `pid` and everything under it, children first seen first:
/// a lazy dump that must end (its runc and the CRIU under it, which
/// holds the copy's tasks in ptrace stops and would not let them go
/// while it waits for a target that never connects).
pub fn end_process_tree(pid: u32) {
    let mut tree = vec![pid];
    let mut i = 0;
    while let Some(&parent) = tree.get(i) {
        tree.extend(children_of(parent));
        i += 1;
    }
    signal_each(&tree, rustix::process::Signal::KILL);
}

/// `signal` to each of `pids`: a system call each, not a `kill` process
/// each (those took tens of ms inside a move's downtime).
pub fn signal_each(pids: &[u32], signal: rustix::process::Signal) {
    for pid in pids {
        let pid = i32::try_from(*pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }
}

/// Every process's pid, from /proc.
pub fn all_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

fn children_of(parent: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // After "pid (comm)": state, then the parent's pid.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            ppid == Some(parent)
        })
        .collect()
}

/// What this host holds of `name`, for the migration plan.
/// A stored image's tree, held in the store while this lives.
pub struct ImageLease {
    pub tree: PathBuf,
    _held: Box<dyn Send + Sync>,
}

impl ImageLease {
    /// `held` ends the lease when dropped.
    pub fn new(tree: PathBuf, held: impl Send + Sync + 'static) -> Self {
        ImageLease {
            tree,
            _held: Box::new(held),
        }
    }
}

/// Receive image `image`'s tree (as `tree::send` sends it) into
/// `incoming`, this agent's staging, and keep it in the store; the bytes
/// received. `incoming` is gone afterwards either way.
pub async fn receive_image(
    driver: &dyn Driver,
    image: &str,
    incoming: &Path,
    (send, recv): (&mut quinn::SendStream, &mut quinn::RecvStream),
    writing: crate::transfer::tree::Writing<'_>,
) -> Result<u64, DriverError> {
    use crate::transfer::tree;
    let received = tree::receive_counted(send, recv, incoming, tree::Pass::Whole, writing).await;
    let stored = match received {
        Ok(got) => driver
            .store_image(image, incoming, true)
            .await
            .map(|()| got.bytes),
        Err(e) => Err(DriverError::Runtime(format!(
            "receiving image {image} failed: {e}"
        ))),
    };
    let _ = tokio::fs::remove_dir_all(incoming).await;
    stored
}

fn no_layers() -> DriverError {
    DriverError::Runtime("this runtime cannot lay instances on shared images".into())
}

pub async fn local_copy(driver: &dyn Driver, name: &InstanceName) -> LocalCopy {
    match driver.status(name).await.ok().flatten().map(|s| s.state) {
        Some(RunState::Paused) => LocalCopy::Frozen,
        Some(RunState::Running) if driver.is_held(name) => LocalCopy::Frozen,
        Some(RunState::Running) => LocalCopy::Running,
        Some(RunState::Stopped) => LocalCopy::Stopped,
        None if driver.has_files(name) => LocalCopy::Stopped,
        None => LocalCopy::Absent,
    }
}

/// Whether the runtime reports `name` running or frozen.
pub async fn is_up(driver: &dyn Driver, name: &InstanceName) -> Result<bool, DriverError> {
    Ok(matches!(
        driver.status(name).await?.map(|s| s.state),
        Some(RunState::Running | RunState::Paused)
    ))
}
