//! `ferry launch`: place the instance, put its rootfs on the owner (here,
//! or uploaded as a checksummed tree), then commit `Create`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_raft::{
    DesiredState, InstanceCommand, InstanceKind, InstanceSpec, NodeId, RestartPolicy, VmSpec,
};

use super::{commit, driver_error, err, internal, show};
use crate::api::instances::{LaunchRequest, VmLaunch};
use crate::api::names::InstanceName;
use crate::api::{ApiError, ApiReply, ErrorKind};
use crate::clock::now_ms;
use crate::node::Agent;
use crate::transfer::tree;

/// A launch waits this long for the rootfs to reach a remote owner.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// The member to place a new instance on: the named one, else the one
/// placement picks (alive, not cordoned, room for it, most free memory).
fn place(
    agent: &Agent,
    target: Option<&str>,
    memory_bytes: Option<u64>,
) -> Result<NodeId, ApiError> {
    let Some(name) = target else {
        let mut ask = crate::placement::Ask::default();
        ask.spec.memory_bytes = memory_bytes;
        return crate::placement::choose(&agent.placement_members(), &ask)
            .map_err(|why| err(ErrorKind::Unavailable, format!("cannot place it: {why}")));
    };
    agent.state().read(|s| {
        s.member_by_name(name).map(|m| m.id).ok_or_else(|| {
            err(
                ErrorKind::NotFound,
                format!("no member named '{name}'; 'ferry cluster list' shows the members"),
            )
        })
    })
}

fn spec_of(
    command: &[String],
    memory_bytes: Option<u64>,
    unconfined: bool,
    (restart, evacuate): (RestartPolicy, ferry_raft::EvacuatePolicy),
) -> InstanceSpec {
    InstanceSpec {
        command: command.to_vec(),
        memory_bytes,
        unconfined,
        restart,
        evacuate,
        ..Default::default()
    }
}

/// A VM's machine from `ferry launch --vm`.
fn machine_of(vm: &VmLaunch) -> VmSpec {
    VmSpec {
        cpus: vm.cpus,
        memory_mib: vm.memory_mib,
        // Named by then (`with_cpu_model`).
        cpu_model: vm.cpu_model.clone().unwrap_or_default(),
        kernel: vm.kernel.is_some(),
        initrd: vm.initrd.is_some(),
        append: vm.append.clone(),
        disk_bytes: 0,
    }
}

/// A new VM's files, staged in this agent's tmp dir as its driver imports
/// them (the disk converted to qcow2).
async fn stage_vm(
    agent: &Agent,
    name: &InstanceName,
    vm: &VmLaunch,
) -> Result<(PathBuf, u64), ApiError> {
    let staging = agent
        .data_dir()
        .root()
        .join("tmp")
        .join(format!("{name}-vm-{}", ferry_transport::pki::random_hex(4)));
    let files = crate::vm::VmFiles {
        disk: PathBuf::from(&vm.disk),
        kernel: vm.kernel.as_ref().map(PathBuf::from),
        initrd: vm.initrd.as_ref().map(PathBuf::from),
    };
    match crate::vm::stage(&files, &staging, UPLOAD_TIMEOUT).await {
        Ok(size) => Ok((staging, size)),
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            Err(driver_error(e))
        }
    }
}

/// A VM launched without `--cpu-model` gets the most capable model every
/// member's QEMU runs, so it can move to any of them.
fn with_cpu_model(agent: &Agent, mut req: LaunchRequest) -> Result<LaunchRequest, ApiError> {
    let Some(vm) = req.vm.as_mut().filter(|vm| vm.cpu_model.is_none()) else {
        return Ok(req);
    };
    let model = crate::placement::default_cpu_model(&agent.placement_members()).ok_or_else(|| {
        err(
            ErrorKind::Unavailable,
            "no member's QEMU runs a known CPU model (install QEMU with scripts/install-deps.sh, or name one with --cpu-model)",
        )
    })?;
    vm.cpu_model = Some(model);
    Ok(req)
}

pub async fn launch(agent: &Arc<Agent>, req: LaunchRequest) -> Result<ApiReply, ApiError> {
    let req = with_cpu_model(agent, req)?;
    if req.vm.is_some() && req.image.is_some() {
        let why = "--image is a container's rootfs; a VM boots from its --disk";
        return Err(err(ErrorKind::BadRequest, why));
    }
    let image = match &req.image {
        Some(path) => Some(stage_image(agent, &req.name, path).await?),
        None => None,
    };
    let result = launch_staged(agent, req, image.as_ref()).await;
    if let Some(image) = image {
        let _ = tokio::fs::remove_dir_all(&image.dir).await;
    }
    result
}

/// Launch with an image (if any) unpacked already.
async fn launch_staged(
    agent: &Arc<Agent>,
    mut req: LaunchRequest,
    image: Option<&StagedImage>,
) -> Result<ApiReply, ApiError> {
    let from_image = match image {
        Some(image) => Some(image.apply_to(&mut req)?),
        None => None,
    };
    if req.vm.is_none() && req.command.is_empty() {
        let why = match image {
            Some(_) => "the image names no command (no Entrypoint or Cmd); put one after '--'",
            None => "no command given; put it after '--', e.g. ferry launch c1 --rootfs DIR -- sh -c '...'",
        };
        return Err(err(ErrorKind::BadRequest, why));
    }
    let staged = match &req.vm {
        Some(vm) => Some(stage_vm(agent, &req.name, vm).await?),
        None => None,
    };
    let result = launch_from(agent, &req, staged.as_ref(), from_image.as_ref()).await;
    if let Some((staged, _)) = staged {
        let _ = tokio::fs::remove_dir_all(staged).await;
    }
    result
}

/// An image for a launch: unpacked in this agent's tmp dir (`dir`), or
/// found in this member's image store.
struct StagedImage {
    dir: PathBuf,
    source: String,
    unpacked: crate::image::Unpacked,
    /// Its tree: under `dir`, or the store's.
    rootfs: PathBuf,
    /// Whether `rootfs` is this launch's own unpacking.
    unpacked_here: bool,
    /// Holds the store's tree while the launch reads it.
    _lease: Option<crate::driver::ImageLease>,
}

/// What an image sets in a new instance's spec.
struct FromImage {
    id: String,
    env: Vec<String>,
    cwd: String,
    user: Option<(u32, u32)>,
    source: String,
    /// The tree is this launch's staging (moved into place).
    take: bool,
}

impl StagedImage {
    /// The request launches this image's rootfs and process (`command`,
    /// if given, replacing the image's command).
    fn apply_to(&self, req: &mut LaunchRequest) -> Result<FromImage, ApiError> {
        let process = &self.unpacked.process;
        req.command = process.command(&req.command);
        req.rootfs = self.rootfs.to_string_lossy().into_owned();
        let user =
            match &process.user {
                Some(user) => Some(crate::image::resolve_user(user, &self.rootfs).map_err(
                    |why| err(ErrorKind::BadRequest, format!("the image's User: {why}")),
                )?),
                None => None,
            };
        let id = &self.unpacked.id;
        Ok(FromImage {
            id: id.clone(),
            env: process.env.clone(),
            cwd: process.cwd.clone(),
            user,
            source: format!("{} (image {})", self.source, id.get(..19).unwrap_or(id)),
            take: self.unpacked_here,
        })
    }
}

/// Find the image at `path` (on this host) for the launch of `name`, and
/// unpack it unless this member's image store holds it already.
async fn stage_image(
    agent: &Agent,
    name: &InstanceName,
    path: &str,
) -> Result<StagedImage, ApiError> {
    let dir = agent.data_dir().root().join("tmp").join(format!(
        "{name}-image-{}",
        ferry_transport::pki::random_hex(4)
    ));
    let staged = open_and_unpack(agent, PathBuf::from(path), dir.clone()).await;
    let _ = tokio::fs::remove_dir_all(dir.join("archive")).await;
    match staged {
        Ok((unpacked, lease)) => {
            let unpacked_here = lease.is_none();
            tracing::info!(instance = %name, image = %unpacked.id, layers = unpacked.layers, unpacked_here, "image {path}");
            Ok(StagedImage {
                rootfs: lease
                    .as_ref()
                    .map_or_else(|| dir.join("rootfs"), |l| l.tree.clone()),
                dir,
                source: path.to_string(),
                unpacked,
                unpacked_here,
                _lease: lease,
            })
        }
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            Err(e)
        }
    }
}

/// The image's launch figures, and its tree in the store (leased) if it
/// is there, else unpacked into `dir/rootfs`.
async fn open_and_unpack(
    agent: &Agent,
    image: PathBuf,
    dir: PathBuf,
) -> Result<(crate::image::Unpacked, Option<crate::driver::ImageLease>), ApiError> {
    let failed = |e: crate::image::ImageError| err(ErrorKind::BadRequest, e.to_string());
    let scratch = dir.join("archive");
    let opened = tokio::task::spawn_blocking(move || crate::image::open(&image, &scratch))
        .await
        .map_err(|_| internal("the image reading task failed"))?
        .map_err(failed)?;
    let unpacked = opened.unpacked();
    if let Some(lease) = agent.driver().lease_image(opened.id()) {
        return Ok((unpacked, Some(lease)));
    }
    let reserve = agent.reserve();
    tokio::task::spawn_blocking(move || {
        crate::image::apply_layers(&opened, &dir.join("rootfs"), Some(&reserve))
    })
    .await
    .map_err(|_| internal("the image unpacking task failed"))?
    .map_err(failed)?;
    Ok((unpacked, None))
}

/// How long a launch onto a member that has not reported its facts yet
/// (it just started) waits for them.
const FACTS_WAIT: Duration = Duration::from_secs(10);

/// Whether `owner`'s containers can lie on a shared image: this agent's
/// own runtime knows; another member's facts say (waited for a while when
/// it has reported none yet, else its instance gets a tree of its own).
async fn can_layer(agent: &Agent, owner: NodeId) -> bool {
    if owner == agent.id() {
        return agent.driver().lays_images();
    }
    let reported = || {
        agent.state().read(|s| {
            s.members
                .get(&owner)
                .and_then(|m| m.facts.as_ref())
                .map(|f| f.runtimes.image_layers)
        })
    };
    let mut changes = agent.state().subscribe();
    let _ = tokio::time::timeout(FACTS_WAIT, async {
        while reported().is_none() && changes.changed().await.is_ok() {}
    })
    .await;
    reported().unwrap_or(false)
}

/// The spec of a new instance, without its address yet.
fn new_spec(
    agent: &Agent,
    req: &LaunchRequest,
    disk_bytes: u64,
    image: Option<&FromImage>,
) -> InstanceSpec {
    let memory_bytes = match &req.vm {
        Some(vm) => Some(vm.memory_mib.saturating_mul(1 << 20)),
        None => req.memory_bytes,
    };
    let mut spec = spec_of(
        &req.command,
        memory_bytes,
        req.unconfined,
        (req.restart, req.evacuate),
    );
    // A VM is on the cluster network only when asked (and refused then:
    // VMs cannot join it yet).
    let has_subnet = agent.state().read(|s| s.config.subnet.is_some()) && req.vm.is_none();
    spec.network = req.network.unwrap_or(if has_subnet || req.ip.is_some() {
        ferry_raft::NetworkMode::Cluster
    } else {
        ferry_raft::NetworkMode::None
    });
    spec.address = req.ip;
    spec.vm = req.vm.as_ref().map(|vm| VmSpec {
        disk_bytes,
        ..machine_of(vm)
    });
    spec.rootfs_source = match (&req.vm, image) {
        (Some(vm), _) => vm.disk.clone(),
        (None, Some(image)) => image.source.clone(),
        (None, None) => req.rootfs.clone(),
    };
    if let Some(image) = image {
        spec.env = image.env.clone();
        spec.cwd = image.cwd.clone();
        spec.user = image.user;
    }
    spec
}

/// Launch from the rootfs the request names, or a VM's `staged` files.
async fn launch_from(
    agent: &Arc<Agent>,
    req: &LaunchRequest,
    staged: Option<&(PathBuf, u64)>,
    image: Option<&FromImage>,
) -> Result<ApiReply, ApiError> {
    let name = &req.name;
    let rootfs = staged.map_or_else(|| PathBuf::from(&req.rootfs), |s| s.0.clone());
    let meta = tokio::fs::metadata(&rootfs).await.map_err(|e| {
        err(
            ErrorKind::BadRequest,
            format!("cannot read rootfs {}: {e}", rootfs.display()),
        )
    })?;
    let mut spec = new_spec(agent, req, staged.map_or(0, |s| s.1), image);
    let owner = place(agent, req.target.as_deref(), spec.memory_bytes)?;
    if let Some(image) = image {
        spec.image = can_layer(agent, owner).await.then(|| image.id.clone());
    }
    // The name is reserved in the replicated state before any file is
    // touched: of two launches of one name the second is refused here, so
    // every file under the name belongs to this launch.
    let create = InstanceCommand::Create {
        name: name.to_string(),
        kind: match spec.vm {
            Some(_) => InstanceKind::Vm,
            None => InstanceKind::Container,
        },
        spec: spec.clone(),
        owner,
        desired: DesiredState::Stopped,
        now_ms: now_ms(),
    };
    commit(agent, create).await?;
    let placed = if owner == agent.id() {
        // With the address apply leased for it.
        let spec = reserved_spec(agent, name).unwrap_or(spec);
        let _guard = agent.locks().lock(name.as_str()).await;
        // A VM's files and an image unpacked here are this agent's staging.
        let take = staged.is_some() || image.is_some_and(|i| i.take);
        prepare_local(agent, name, &spec, Some((&rootfs, take))).await
    } else {
        let image = spec.image.as_deref();
        super::upload::upload(agent, owner, req, (&rootfs, meta.is_dir()), image).await
    };
    if let Err(e) = placed {
        let delete = InstanceCommand::Delete {
            name: name.to_string(),
        };
        if let Err(undo) = commit(agent, delete).await {
            tracing::warn!(instance = %name, "cannot drop the failed launch: {undo}");
        }
        return Err(e);
    }
    let run = InstanceCommand::SetDesired {
        name: name.to_string(),
        desired: DesiredState::Running,
    };
    commit(agent, run).await?;
    show(agent, name.as_str())
}

/// Put the rootfs (from `source`, taken when its flag says it is this
/// agent's staging, or already in place) and the runtime config into this
/// host's instance dir; on failure remove what this request put there. The caller holds the instance's lock, and the name is
/// reserved for this launch, so files already there are an earlier
/// instance's leftovers.
pub(super) async fn prepare_local(
    agent: &Agent,
    name: &InstanceName,
    spec: &InstanceSpec,
    source: Option<(&Path, bool)>,
) -> Result<(), ApiError> {
    let driver = agent.driver();
    let result = async {
        if let Some((source, take)) = source {
            room_for(agent, name, source).await?;
            driver
                .import_rootfs(name, spec, source, take)
                .await
                .map_err(driver_error)?;
        }
        driver.configure(name, spec, false).await.map_err(internal)
    }
    .await;
    if result.is_err() {
        let _ = driver.remove(name).await;
    }
    result
}

/// Refuse a rootfs whose size (a directory's files, or a tar archive's
/// length) would cross this host's disk reserve.
async fn room_for(agent: &Agent, name: &InstanceName, source: &Path) -> Result<(), ApiError> {
    let owned = source.to_path_buf();
    let size = tokio::task::spawn_blocking(move || match std::fs::metadata(&owned) {
        Ok(m) if m.is_file() => m.len(),
        _ => tree::size_of(&owned),
    })
    .await
    .unwrap_or(0);
    agent
        .reserve()
        .check(size, &format!("the rootfs of {name}"))
        .map_err(|e| err(ErrorKind::Unavailable, e.to_string()))
}

/// The spec `Create` committed (with its leased address).
pub(super) fn reserved_spec(agent: &Agent, name: &InstanceName) -> Option<InstanceSpec> {
    agent
        .state()
        .read(|s| s.instances.get(name.as_str()).map(|i| i.spec.clone()))
}
