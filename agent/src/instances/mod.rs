//! Instances as the operator sees them (layer 2): launch (`launch.rs`, a
//! remote owner's rootfs or image sent by `upload.rs`),
//! list and show (here), the operations that need the owner's host
//! (`ops.rs`, forwarded to the owner), what the owner reports
//! (`report.rs`), and the reconciler loop (`reconciler.rs`) that keeps the
//! owner's host in step with the replicated state (`reconcile.rs` decides,
//! pure).

pub mod launch;
pub mod ops;
pub mod reconcile;
pub mod reconciler;
mod report;
pub mod upload;

use ferry_raft::{Command, CommandResult, DesiredState, Instance, InstanceCommand};

use crate::api::instances::{InstanceDetail, InstanceView};
use crate::api::{ApiError, ApiReply, ErrorKind};
use crate::driver::DriverError;
use crate::node::Agent;

fn err(kind: ErrorKind, message: impl Into<String>) -> ApiError {
    ApiError::new(kind, message)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    err(ErrorKind::Internal, e.to_string())
}

/// A runtime failure as the operator sees it.
fn driver_error(e: DriverError) -> ApiError {
    match e {
        DriverError::BadInput(_) => err(ErrorKind::BadRequest, e.to_string()),
        _ => internal(e),
    }
}

fn no_instance(name: &str) -> ApiError {
    err(
        ErrorKind::NotFound,
        format!("no instance named '{name}'; 'ferry list' shows the instances"),
    )
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
        address: i.spec.address.map(|a| a.to_string()),
    }
}

pub fn list(agent: &Agent) -> ApiReply {
    let all: Vec<Instance> = agent
        .state()
        .read(|s| s.instances.values().cloned().collect());
    ApiReply::Instances(all.iter().map(|i| view(agent, i)).collect())
}

pub fn show(agent: &Agent, name: &str) -> Result<ApiReply, ApiError> {
    let i = agent
        .state()
        .read(|s| s.instances.get(name).cloned())
        .ok_or_else(|| no_instance(name))?;
    Ok(ApiReply::Instance(Box::new(InstanceDetail {
        view: view(agent, &i),
        desired: match i.desired {
            DesiredState::Running => "running",
            DesiredState::Stopped => "stopped",
        }
        .into(),
        restart: i.spec.restart.as_str().into(),
        restarts: i.restarts,
        last_restart: i.last_restart.clone(),
        security_profile: if i.spec.unconfined {
            "unconfined"
        } else {
            "default"
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
        evacuate: i.spec.evacuate.as_str().into(),
        origin: i.origin.as_ref().map(|o| {
            let name = agent
                .member_name(o.member)
                .unwrap_or_else(|| format!("node-{}", o.member));
            match o.stopped {
                true => format!("{name} (stopped there by an evacuation)"),
                false => name,
            }
        }),
        vm: i.spec.vm.clone(),
        env: i.spec.env.clone(),
        cwd: match i.spec.cwd.as_str() {
            "" => "/".into(),
            cwd => cwd.into(),
        },
        user: match i.spec.user {
            Some((uid, gid)) => format!("{uid}:{gid}"),
            None => "0:0".into(),
        },
        layered_on: i.spec.image.clone(),
    })))
}

/// Commit an instance command; a refusal is a conflict.
async fn commit(agent: &Agent, cmd: InstanceCommand) -> Result<(), ApiError> {
    match agent.write(Command::Instance(cmd)).await? {
        CommandResult::Rejected(r) => Err(err(ErrorKind::Conflict, r.to_string())),
        _ => Ok(()),
    }
}
