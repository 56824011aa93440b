//! Container instances as the operator sees them: launch, list, show, and
//! the operations that need the owner's host (start, stop, delete, exec),
//! forwarded to the owner. The reconciler loop keeps the owner's host in
//! step with the replicated state.

use std::sync::Arc;
use std::time::Duration;

use ferry_raft::{
    Baseline, Command, CommandResult, DesiredState, Instance, InstanceCommand, InstanceKind,
    InstanceSpec, NodeId, ObservedState, SnapshotRecord,
};
use ferry_transport::endpoint::Expect;
use serde::{Deserialize, Serialize};

use crate::agent::{now_ms, parse_addr, Agent};
use crate::container::bundle::{self, BundleConfig};
use crate::container::reconcile::{self, Action};
use crate::container::runc::Status;
use crate::migration::tree;
use crate::protocol::{ApiError, ApiReply, ApiRequest, ErrorKind, Request, Response};

/// A launch waits this long for the rootfs to reach a remote owner.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LaunchRequest {
    pub name: String,
    /// A directory or tar archive on the host of the agent that receives
    /// the request (the CLI's host).
    pub rootfs: String,
    pub target: Option<String>,
    pub memory_bytes: Option<u64>,
    pub command: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UploadRequest {
    pub name: String,
    pub command: Vec<String>,
    pub memory_bytes: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum InstanceOp {
    Start,
    Stop { stateful: bool, force: bool },
    Delete { force: bool },
    Exec { argv: Vec<String> },
    SnapshotCreate { snapshot: String, stateful: bool },
    SnapshotRestore { snapshot: String },
    SnapshotDelete { snapshot: String },
}

/// `ferry list --format json` (CLI.md).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceView {
    pub name: String,
    pub kind: String,
    pub node: String,
    pub state: String,
    pub epoch: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceDetail {
    pub view: InstanceView,
    pub desired: String,
    pub detail: Option<String>,
    pub checkpointed: bool,
    pub command: Vec<String>,
    pub memory_bytes: Option<u64>,
    pub rootfs_source: String,
    pub baseline: Option<Baseline>,
    pub snapshots: Vec<SnapshotRecord>,
    pub job: Option<u64>,
}

fn err(kind: ErrorKind, message: impl Into<String>) -> ApiError {
    ApiError::new(kind, message)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    err(ErrorKind::Internal, e.to_string())
}

fn no_instance(name: &str) -> ApiError {
    err(
        ErrorKind::NotFound,
        format!("no instance named '{name}'; 'ferry list' shows the instances"),
    )
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    ferry_transport::pki::validate_node_name(name).map_err(|_| {
        err(
            ErrorKind::BadRequest,
            format!("invalid instance name '{name}': use 1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-'"),
        )
    })
}

fn view(agent: &Agent, i: &Instance) -> InstanceView {
    InstanceView {
        name: i.name.clone(),
        kind: i.kind.as_str().into(),
        node: agent
            .member_name(i.owner)
            .unwrap_or_else(|| format!("node-{}", i.owner)),
        state: if i.job.is_some() {
            "migrating".into()
        } else {
            i.observed.as_str().into()
        },
        epoch: i.epoch,
    }
}

pub fn list(agent: &Agent) -> ApiReply {
    let all: Vec<Instance> = agent
        .state
        .read(|s| s.instances.values().cloned().collect());
    ApiReply::Instances(all.iter().map(|i| view(agent, i)).collect())
}

pub fn show(agent: &Agent, name: &str) -> Result<ApiReply, ApiError> {
    let i = agent
        .state
        .read(|s| s.instances.get(name).cloned())
        .ok_or_else(|| no_instance(name))?;
    Ok(ApiReply::Instance(Box::new(InstanceDetail {
        view: view(agent, &i),
        desired: match i.desired {
            DesiredState::Running => "running",
            DesiredState::Stopped => "stopped",
        }
        .into(),
        detail: i.detail.clone(),
        checkpointed: i.checkpointed,
        command: i.spec.command.clone(),
        memory_bytes: i.spec.memory_bytes,
        rootfs_source: i.spec.rootfs_source.clone(),
        baseline: i.baseline.clone(),
        snapshots: i.snapshots.clone(),
        job: i.job,
    })))
}

pub(crate) async fn commit(agent: &Agent, cmd: InstanceCommand) -> Result<(), ApiError> {
    match agent.write(Command::Instance(cmd)).await? {
        CommandResult::Rejected(r) => Err(err(ErrorKind::Conflict, r.to_string())),
        _ => Ok(()),
    }
}

/// The member to place a new instance on: the named one, else the one with
/// the most memory. (Gossip load facts will refine this to free memory.)
fn place(agent: &Agent, target: Option<&str>) -> Result<NodeId, ApiError> {
    agent.state.read(|s| match target {
        Some(name) => s.member_by_name(name).map(|m| m.id).ok_or_else(|| {
            err(
                ErrorKind::NotFound,
                format!("no member named '{name}'; 'ferry cluster list' shows the members"),
            )
        }),
        None => s
            .members
            .values()
            .max_by_key(|m| {
                (
                    m.facts.as_ref().map_or(0, |f| f.memory_total_bytes),
                    std::cmp::Reverse(m.id),
                )
            })
            .map(|m| m.id)
            .ok_or_else(|| err(ErrorKind::Unavailable, "the cluster has no members yet")),
    })
}

pub async fn launch(agent: &Arc<Agent>, req: LaunchRequest) -> Result<ApiReply, ApiError> {
    validate_name(&req.name)?;
    if req.command.is_empty() {
        return Err(err(
            ErrorKind::BadRequest,
            "no command given; put it after '--', e.g. ferry launch c1 --rootfs DIR -- sh -c '...'",
        ));
    }
    if agent.state.read(|s| s.instances.contains_key(&req.name)) {
        return Err(err(
            ErrorKind::Conflict,
            format!("an instance named '{}' already exists", req.name),
        ));
    }
    let rootfs = std::path::PathBuf::from(&req.rootfs);
    let meta = tokio::fs::metadata(&rootfs).await.map_err(|e| {
        err(
            ErrorKind::BadRequest,
            format!("cannot read rootfs {}: {e}", rootfs.display()),
        )
    })?;
    let owner = place(agent, req.target.as_deref())?;
    if owner == agent.id {
        let _guard = agent.host.lock(&req.name).await;
        prepare_local(
            agent,
            &req.name,
            &req.command,
            req.memory_bytes,
            Some(rootfs.clone()),
        )
        .await?;
    } else {
        upload(agent, owner, &req, &rootfs, meta.is_dir()).await?;
    }
    let created = commit(
        agent,
        InstanceCommand::Create {
            name: req.name.clone(),
            kind: InstanceKind::Container,
            spec: InstanceSpec {
                command: req.command.clone(),
                memory_bytes: req.memory_bytes,
                rootfs_source: req.rootfs.clone(),
            },
            owner,
            desired: DesiredState::Running,
            now_ms: now_ms(),
        },
    )
    .await;
    if let Err(e) = created {
        if owner == agent.id {
            let _ = agent.host.remove(&req.name).await;
        }
        return Err(e);
    }
    show(agent, &req.name)
}

/// Put the rootfs (from `source`, or already in place) and config.json
/// into this host's instance dir.
pub(crate) async fn prepare_local(
    agent: &Agent,
    name: &str,
    command: &[String],
    memory_bytes: Option<u64>,
    source: Option<std::path::PathBuf>,
) -> Result<(), ApiError> {
    let dir = agent.host.dir(name);
    if let Some(source) = source {
        let _ = tokio::fs::remove_dir_all(dir.root()).await;
        let dest = dir.rootfs();
        tokio::task::spawn_blocking(move || bundle::import_rootfs(&source, &dest))
            .await
            .map_err(internal)?
            .map_err(|e| err(ErrorKind::BadRequest, e.to_string()))?;
    }
    bundle::write_config(
        &dir,
        &BundleConfig {
            name,
            command,
            memory_bytes,
            cgroup_parent: agent.host.cgroup_parent(),
            criu_config: None,
        },
    )
    .map_err(internal)
}

/// Send the rootfs to a remote owner over a channel, checksummed.
async fn upload(
    agent: &Agent,
    owner: NodeId,
    req: &LaunchRequest,
    rootfs: &std::path::Path,
    is_dir: bool,
) -> Result<(), ApiError> {
    let member = agent
        .state
        .read(|s| s.members.get(&owner).cloned())
        .ok_or_else(|| err(ErrorKind::NotFound, format!("no member with id {owner}")))?;
    // A tar archive is unpacked here first, so owners and special files
    // travel the same way as from a directory.
    let staging = agent.host.data_dir().join("tmp").join(format!(
        "{}-{}",
        req.name,
        ferry_transport::pki::random_hex(4)
    ));
    let send_root = if is_dir {
        rootfs.to_path_buf()
    } else {
        let (source, dest) = (rootfs.to_path_buf(), staging.clone());
        tokio::task::spawn_blocking(move || bundle::import_rootfs(&source, &dest))
            .await
            .map_err(internal)?
            .map_err(|e| err(ErrorKind::BadRequest, e.to_string()))?;
        staging.clone()
    };
    let result = async {
        let request = Request::Upload(UploadRequest {
            name: req.name.clone(),
            command: req.command.clone(),
            memory_bytes: req.memory_bytes,
        });
        let (mut send, mut recv) = agent
            .pool
            .open_stream(
                parse_addr(&member.addr)?,
                &Expect::Node(member.name.clone()),
                &request,
                UPLOAD_TIMEOUT,
            )
            .await
            .map_err(|e| {
                err(
                    ErrorKind::Unavailable,
                    format!("cannot reach {}: {e}", member.name),
                )
            })?;
        tree::send(&mut send, &mut recv, &send_root, false)
            .await
            .map_err(|e| {
                err(
                    ErrorKind::Unavailable,
                    format!("sending the rootfs to {} failed: {e}", member.name),
                )
            })?;
        let _ = send.finish();
        match ferry_transport::frame::read_frame::<Response>(
            &mut recv,
            ferry_transport::frame::MAX_FRAME,
        )
        .await
        {
            Ok(Response::Api(_)) => Ok(()),
            Ok(Response::Error(e)) => Err(e),
            Ok(_) => Err(internal("unexpected reply to the upload")),
            Err(e) => Err(err(
                ErrorKind::Unavailable,
                format!("{} did not confirm the upload: {e}", member.name),
            )),
        }
    }
    .await;
    if !is_dir {
        let _ = tokio::fs::remove_dir_all(&staging).await;
    }
    result
}

/// The owner's side of an upload: receive the tree, write the bundle.
pub async fn receive_upload(
    agent: &Agent,
    req: UploadRequest,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let result = async {
        validate_name(&req.name)?;
        if agent.state.read(|s| s.instances.contains_key(&req.name)) {
            return Err(err(
                ErrorKind::Conflict,
                format!("an instance named '{}' already exists", req.name),
            ));
        }
        let _guard = agent.host.lock(&req.name).await;
        let dir = agent.host.dir(&req.name);
        let _ = tokio::fs::remove_dir_all(dir.root()).await;
        tree::receive(&mut send, &mut recv, &dir.rootfs(), false)
            .await
            .map_err(|e| {
                err(
                    ErrorKind::BadRequest,
                    format!("receiving the rootfs failed: {e}"),
                )
            })?;
        prepare_local(agent, &req.name, &req.command, req.memory_bytes, None).await
    }
    .await;
    let reply = match result {
        Ok(()) => Response::Api(ApiReply::Done),
        Err(e) => {
            let _ = agent.host.remove(&req.name).await;
            Response::Error(e)
        }
    };
    let _ = ferry_transport::frame::write_frame(&mut send, &reply).await;
    let _ = send.finish();
}

/// Run an operation on the owner: here if this agent owns the instance,
/// else forwarded once.
pub async fn operate(
    agent: &Arc<Agent>,
    name: &str,
    op: InstanceOp,
    forwarded: bool,
) -> Result<ApiReply, ApiError> {
    let instance = agent
        .state
        .read(|s| s.instances.get(name).cloned())
        .ok_or_else(|| no_instance(name))?;
    if instance.owner != agent.id {
        if forwarded {
            return Err(err(
                ErrorKind::Unavailable,
                format!("ownership of '{name}' is changing; retry"),
            ));
        }
        return forward(agent, &instance, op).await;
    }
    if let (Some(job), false) = (instance.job, matches!(op, InstanceOp::Exec { .. })) {
        return Err(err(
            ErrorKind::Conflict,
            format!("instance '{name}' is busy with job {job}; wait for it ('ferry job wait {job}') or abort it"),
        ));
    }
    let _guard = agent.host.lock(name).await;
    let running = matches!(
        agent
            .host
            .status(name)
            .await
            .map_err(internal)?
            .map(|s| s.status),
        Some(Status::Running | Status::Paused)
    );
    match op {
        InstanceOp::Exec { argv } => {
            if !running {
                return Err(err(
                    ErrorKind::Conflict,
                    format!("instance '{name}' is not running"),
                ));
            }
            let out = agent.host.exec(name, &argv).await.map_err(internal)?;
            Ok(ApiReply::Exec {
                code: out.code,
                stdout: out.stdout,
                stderr: out.stderr,
            })
        }
        InstanceOp::Start => {
            if running {
                return Err(err(
                    ErrorKind::Conflict,
                    format!("instance '{name}' is already running"),
                ));
            }
            commit(
                agent,
                InstanceCommand::SetDesired {
                    name: name.into(),
                    desired: DesiredState::Running,
                },
            )
            .await?;
            let started = if instance.checkpointed {
                agent.host.restore(name).await
            } else {
                agent.host.start(name).await
            };
            if let Err(e) = started {
                report(agent, name, Some(e.to_string())).await;
                return Err(internal(e));
            }
            report(agent, name, None).await;
            show(agent, name)
        }
        InstanceOp::Stop { stateful, force } => {
            if !running {
                return Err(err(
                    ErrorKind::Conflict,
                    format!("instance '{name}' is not running"),
                ));
            }
            if stateful {
                let usable = agent.state.read(|s| {
                    s.members
                        .get(&agent.id)
                        .and_then(|m| m.facts.as_ref())
                        .is_some_and(|f| f.runtimes.criu.is_some() && f.runtimes.criu_check)
                });
                if !usable {
                    return Err(err(
                        ErrorKind::Unavailable,
                        format!("CRIU is missing or 'criu check' fails on {}; '{name}' keeps running. Install CRIU >= 4 (scripts/install-deps.sh)", agent.name),
                    ));
                }
                agent.host.checkpoint_stop(name).await.map_err(|e| {
                    internal(format!("stateful stop failed, '{name}' keeps running: {e}"))
                })?;
            } else {
                let _ = tokio::fs::remove_dir_all(agent.host.dir(name).checkpoint()).await;
            }
            commit(
                agent,
                InstanceCommand::SetDesired {
                    name: name.into(),
                    desired: DesiredState::Stopped,
                },
            )
            .await?;
            if !stateful {
                agent.host.stop(name, force).await.map_err(internal)?;
            }
            observe(agent, name, ObservedState::Stopped, None, stateful).await;
            show(agent, name)
        }
        InstanceOp::SnapshotCreate { snapshot, stateful } => {
            validate_name(&snapshot)?;
            if instance.snapshots.iter().any(|s| s.name == snapshot) {
                return Err(err(
                    ErrorKind::Conflict,
                    format!("instance '{name}' already has a snapshot named '{snapshot}'"),
                ));
            }
            if stateful && !running {
                return Err(err(ErrorKind::Conflict, format!("instance '{name}' is not running; a stateful snapshot needs running processes")));
            }
            agent
                .host
                .snapshot(name, &snapshot, stateful)
                .await
                .map_err(|e| internal(format!("snapshot failed, '{name}' is unchanged: {e}")))?;
            let record = SnapshotRecord {
                name: snapshot.clone(),
                stateful,
                created_ms: now_ms(),
            };
            if let Err(e) = commit(
                agent,
                InstanceCommand::AddSnapshot {
                    name: name.into(),
                    snapshot: record,
                },
            )
            .await
            {
                let _ = tokio::fs::remove_dir_all(agent.host.dir(name).snapshot(&snapshot)).await;
                return Err(e);
            }
            show(agent, name)
        }
        InstanceOp::SnapshotRestore { snapshot } => {
            let record = instance
                .snapshots
                .iter()
                .find(|s| s.name == snapshot)
                .ok_or_else(|| {
                    err(
                        ErrorKind::NotFound,
                        format!("instance '{name}' has no snapshot named '{snapshot}'"),
                    )
                })?;
            let stateful = record.stateful;
            let restart = stateful || running || instance.desired == DesiredState::Running;
            if restart {
                commit(
                    agent,
                    InstanceCommand::SetDesired {
                        name: name.into(),
                        desired: DesiredState::Running,
                    },
                )
                .await?;
                if let Err(e) = agent.host.restore_snapshot(name, &snapshot, stateful).await {
                    report(agent, name, Some(e.to_string())).await;
                    return Err(internal(e));
                }
                report(agent, name, None).await;
            } else {
                let dir = agent.host.dir(name);
                copy_rootfs(dir.snapshot(&snapshot).join("rootfs"), dir.rootfs()).await?;
            }
            show(agent, name)
        }
        InstanceOp::SnapshotDelete { snapshot } => {
            commit(
                agent,
                InstanceCommand::RemoveSnapshot {
                    name: name.into(),
                    snapshot: snapshot.clone(),
                },
            )
            .await?;
            let _ = tokio::fs::remove_dir_all(agent.host.dir(name).snapshot(&snapshot)).await;
            show(agent, name)
        }
        InstanceOp::Delete { force } => {
            if running && !force {
                return Err(err(
                    ErrorKind::Conflict,
                    format!("instance '{name}' is running; stop it first or pass --force"),
                ));
            }
            if running {
                agent.host.stop(name, true).await.map_err(internal)?;
            }
            commit(agent, InstanceCommand::Delete { name: name.into() }).await?;
            agent.host.remove(name).await.map_err(internal)?;
            Ok(ApiReply::Done)
        }
    }
}

async fn copy_rootfs(source: std::path::PathBuf, dest: std::path::PathBuf) -> Result<(), ApiError> {
    tokio::task::spawn_blocking(move || bundle::copy_tree(&source, &dest))
        .await
        .map_err(internal)?
        .map_err(internal)
}

async fn forward(agent: &Agent, instance: &Instance, op: InstanceOp) -> Result<ApiReply, ApiError> {
    let owner = agent
        .state
        .read(|s| s.members.get(&instance.owner).cloned())
        .ok_or_else(|| {
            err(
                ErrorKind::Unavailable,
                format!("the owner of '{}' is not a member", instance.name),
            )
        })?;
    let request = Request::Api(ApiRequest::Instance {
        name: instance.name.clone(),
        op,
        forwarded: true,
    });
    match agent
        .pool
        .call::<Request, Response>(
            parse_addr(&owner.addr)?,
            &Expect::Node(owner.name.clone()),
            &request,
            Duration::from_secs(120),
        )
        .await
    {
        Ok(Response::Api(reply)) => Ok(reply),
        Ok(Response::Error(e)) => Err(e),
        Ok(_) => Err(internal("owner sent an unexpected reply")),
        Err(e) => Err(err(
            ErrorKind::Unavailable,
            format!(
                "the owner of '{}', {}, is unreachable: {e}",
                instance.name, owner.name
            ),
        )),
    }
}

async fn observe(
    agent: &Agent,
    name: &str,
    observed: ObservedState,
    detail: Option<String>,
    checkpointed: bool,
) {
    let epoch = agent.state.read(|s| s.instances.get(name).map(|i| i.epoch));
    let Some(epoch) = epoch else { return };
    let cmd = InstanceCommand::Observe {
        name: name.into(),
        node: agent.id,
        epoch,
        observed,
        detail,
        checkpointed,
    };
    if let Err(e) = commit(agent, cmd).await {
        tracing::warn!(instance = name, "could not report state: {e}");
    }
}

/// Report what runs after a start or restore (or its error), with the
/// baseline of this host and the filesystems mounted inside.
async fn report(agent: &Agent, name: &str, error: Option<String>) {
    let state = agent.host.status(name).await.ok().flatten();
    match (state, error) {
        (Some(s), None) if s.status == Status::Running => {
            observe(agent, name, ObservedState::Running, None, false).await;
            record_baseline(agent, name, s.pid).await;
        }
        (_, Some(e)) => observe(agent, name, ObservedState::Error, Some(e), false).await,
        (_, None) => {
            observe(
                agent,
                name,
                ObservedState::Error,
                Some("the container exited at once; see its console.log".into()),
                false,
            )
            .await
        }
    }
}

async fn record_baseline(agent: &Agent, name: &str, pid: u32) {
    let Some((facts, epoch)) = agent.state.read(|s| {
        let facts = s.members.get(&agent.id).and_then(|m| m.facts.clone());
        Some((facts, s.instances.get(name)?.epoch))
    }) else {
        return;
    };
    // Right after the agent starts, its facts may not be replicated yet.
    let facts = match facts {
        Some(facts) => facts,
        None => crate::facts::probe(agent.data_dir.root()).await,
    };
    let filesystems = tokio::task::spawn_blocking(move || reconcile::mounted_types(pid))
        .await
        .unwrap_or_default();
    let baseline = Baseline {
        node: agent.id,
        arch: facts.arch,
        kernel: facts.kernel,
        cpu_flags: facts.cpu_flags,
        syscalls: facts.syscalls,
        filesystems,
        criu: facts.runtimes.criu,
        recorded_ms: now_ms(),
    };
    let cmd = InstanceCommand::RecordBaseline {
        name: name.into(),
        node: agent.id,
        epoch,
        baseline,
    };
    if let Err(e) = commit(agent, cmd).await {
        tracing::warn!(instance = name, "could not record baseline: {e}");
    }
}

async fn reconcile_one(agent: &Agent, name: &str) {
    let _guard = agent.host.lock(name).await;
    let Some(instance) = agent.state.read(|s| s.instances.get(name).cloned()) else {
        return;
    };
    let status = match agent.host.status(name).await {
        Ok(s) => s.map(|s| s.status),
        Err(e) => {
            tracing::warn!(instance = name, "cannot ask runc: {e}");
            return;
        }
    };
    let (action, observed) = reconcile::decide(&instance, agent.id, status);
    match action {
        Action::Nothing => {
            if let Some(observed) = observed {
                if observed != instance.observed {
                    observe(
                        agent,
                        name,
                        observed,
                        instance.detail.clone(),
                        instance.checkpointed,
                    )
                    .await;
                }
            }
        }
        Action::Start | Action::Restore => {
            tracing::info!(instance = name, ?action, "starting instance");
            let result = if action == Action::Restore {
                agent.host.restore(name).await
            } else {
                agent.host.start(name).await
            };
            report(agent, name, result.err().map(|e| e.to_string())).await;
        }
        Action::Stop => {
            tracing::info!(instance = name, "stopping instance that should not run");
            if let Err(e) = agent.host.stop(name, false).await {
                tracing::warn!(instance = name, "stop failed: {e}");
            }
        }
    }
}

/// Keep this host's instances in step with the replicated state.
pub async fn run_reconciler(agent: Arc<Agent>) {
    let mut changes = agent.state.subscribe();
    loop {
        let owned: Vec<String> = agent.state.read(|s| {
            s.instances
                .values()
                .filter(|i| i.owner == agent.id)
                .map(|i| i.name.clone())
                .collect()
        });
        for name in owned {
            reconcile_one(&agent, &name).await;
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
