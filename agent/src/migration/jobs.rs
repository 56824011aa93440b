//! The job side of the operator API: `ferry move`, `ferry job ...`.

use std::sync::Arc;

use ferry_raft::{
    Command, CommandResult, InstanceKind, Job, JobCommand, JobId, LiveSettings, MoveOptions,
    NodeId, ObservedState, Phase, TransferMode,
};

use super::compat;
use crate::api::jobs::{JobView, MoveMode, MoveRequest, TransferProgress};
use crate::api::names::InstanceName;
use crate::api::{ApiError, ApiReply, ApiRequest, ErrorKind};
use crate::clock::now_ms;
use crate::node::Agent;
use crate::placement;

fn not_found(message: String) -> ApiError {
    ApiError::new(ErrorKind::NotFound, message)
}

pub fn job_view(agent: &Agent, job: &Job) -> JobView {
    let name = |id| {
        agent
            .member_name(id)
            .unwrap_or_else(|| format!("node-{id}"))
    };
    JobView {
        id: job.id,
        kind: "migrate".into(),
        instance: job.instance.clone(),
        source: name(job.source),
        target: name(job.target),
        parent: job.parent,
        phase: job.phase.name(),
        done: job.phase.is_terminal(),
        succeeded: job.phase == Phase::Done,
        stateful: job.options.stateful,
        mode: match job.options.mode {
            TransferMode::Pull => "pull".into(),
            TransferMode::Push => "push".into(),
            TransferMode::Relay { via } => format!("relay via {}", name(via)),
        },
        error: job.error.clone(),
        report: job.report.clone(),
        notes: job.notes.clone(),
        abort_requested: job.abort_requested,
        created_ms: job.created_ms,
        downtime_ms: job.stats.as_ref().map(|s| s.downtime_ms),
        total_ms: job.stats.as_ref().map(|s| s.total_ms),
        bytes: job.stats.as_ref().map(|s| s.bytes),
        iterations: job.stats.as_ref().map(|s| s.iterations),
        progress: None,
    }
}

/// The member named `target`, else the one placement picks for a move of
/// `instance` (stateful or not).
fn target_of(
    agent: &Agent,
    instance: &str,
    target: Option<&str>,
    stateful: Option<bool>,
) -> Result<(NodeId, String), ApiError> {
    let members = agent.placement_members();
    agent.state().read(|s| {
        let inst = s.instances.get(instance).ok_or_else(|| {
            not_found(format!(
                "no instance named '{instance}'; 'ferry list' shows the instances"
            ))
        })?;
        let Some(name) = target else {
            let stateful = stateful.unwrap_or(inst.observed == ObservedState::Running);
            let ask = placement::Ask::existing(s, inst, stateful);
            let id = placement::choose(&members, &ask).map_err(|why| {
                ApiError::new(
                    ErrorKind::Unavailable,
                    format!("cannot place '{instance}': {why}"),
                )
            })?;
            let name = s
                .members
                .get(&id)
                .map(|m| m.name.clone())
                .unwrap_or_default();
            return Ok((id, name));
        };
        let member = s.member_by_name(name).ok_or_else(|| {
            not_found(format!(
                "no member named '{name}'; 'ferry cluster list' shows the members"
            ))
        })?;
        Ok((member.id, name.to_string()))
    })
}

/// Settings only QEMU's migration has (multifd), asked for a container's
/// move; post-copy is a container's lazy move.
fn vm_only_settings(kind: Option<InstanceKind>, live: &LiveSettings) -> Option<String> {
    (live.multifd_channels > 0 && kind != Some(InstanceKind::Vm)).then(|| {
        "--multifd is for a VM's live move (QEMU's migration); leave it out for a container"
            .to_string()
    })
}

/// The job's transfer mode for what the CLI asked: relay mode bridges
/// through this agent, which must then be neither side of the move, and
/// needs a leader that is neither (the sides reach only the relay, and
/// each must reach the leader for the log and its proposals).
fn transfer_mode(
    agent: &Agent,
    asked: MoveMode,
    source: NodeId,
    target: NodeId,
) -> Result<TransferMode, ApiError> {
    Ok(match asked {
        MoveMode::Pull => TransferMode::Pull,
        MoveMode::Push => TransferMode::Push,
        MoveMode::Relay if agent.id() == source || agent.id() == target => {
            let me = agent.member_name(agent.id()).unwrap_or_default();
            return Err(ApiError::new(
                ErrorKind::BadRequest,
                format!(
                    "--mode relay bridges the move through the agent the CLI talks to, and '{me}' is \
                     one side of it; run the move against a third member that reaches both \
                     ('ferry --agent ADDR move ...'), or use --mode pull"
                ),
            ));
        }
        MoveMode::Relay => match agent.leader() {
            Some(leader) if leader == source || leader == target => {
                let name = agent.member_name(leader).unwrap_or_default();
                return Err(ApiError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "--mode relay needs a Raft leader that reaches both sides, and the leader \
                         '{name}' is one side of the move; try again once another member leads \
                         ('ferry cluster list' shows the leader)"
                    ),
                ));
            }
            _ => TransferMode::Relay { via: agent.id() },
        },
    })
}

pub async fn start_move(
    agent: &Arc<Agent>,
    mut request: MoveRequest,
) -> Result<ApiReply, ApiError> {
    let (target, target_name) = target_of(
        agent,
        &request.instance,
        request.target.as_deref(),
        request.stateful,
    )?;
    request.target = Some(target_name);
    let (running, owner, kind) = agent.state().read(|s| {
        let inst = s.instances.get(&request.instance);
        (
            inst.is_some_and(|i| i.observed == ObservedState::Running),
            inst.map_or(0, |i| i.owner),
            inst.map(|i| i.kind),
        )
    });
    if let Some(why) = vm_only_settings(kind, &request.live) {
        return Err(ApiError::new(ErrorKind::BadRequest, why));
    }
    if owner == target {
        return Err(ApiError::new(
            ErrorKind::Conflict,
            format!(
                "instance '{}' is already on '{}'",
                request.instance,
                request.target.as_deref().unwrap_or_default()
            ),
        ));
    }
    // A dry run that passed every check for a dead target would mislead.
    if !agent.member_alive(target) {
        return Err(ApiError::new(
            ErrorKind::Unavailable,
            format!(
                "member '{}' is dead by gossip ('ferry cluster list' shows it); a move to it cannot run",
                request.target.as_deref().unwrap_or_default()
            ),
        ));
    }
    let stateful = request.stateful.unwrap_or(running);
    let options = MoveOptions {
        stateful,
        mode: transfer_mode(agent, request.mode, owner, target)?,
        live: request.live,
    };
    if let Some(why) = super::lazy::refused(kind, &options) {
        return Err(ApiError::new(ErrorKind::BadRequest, why));
    }
    if request.dry_run {
        let mut report = agent
            .state()
            .read(|s| compat::report(s, &request.instance, target, stateful, 0, None))?;
        report.extend(super::lazy::check(kind, &options, None));
        return Ok(ApiReply::Report(report));
    }
    let result = agent
        .write(Command::Job(JobCommand::CreateMove {
            instance: request.instance.clone(),
            target,
            options,
            now_ms: now_ms(),
        }))
        .await?;
    match result {
        CommandResult::JobCreated { id } => show(agent, id).await,
        CommandResult::Rejected(r) => Err(ApiError::new(ErrorKind::Conflict, r.to_string())),
        other => Err(ApiError::new(
            ErrorKind::Internal,
            format!("unexpected result {other:?}"),
        )),
    }
}

pub async fn show(agent: &Agent, id: JobId) -> Result<ApiReply, ApiError> {
    let job = agent
        .state()
        .read(|s| s.jobs.get(&id).cloned())
        .ok_or_else(|| not_found(format!("no job {id}; 'ferry job list' shows the jobs")))?;
    let mut view = job_view(agent, &job);
    if !job.phase.is_terminal() {
        view.progress = progress(agent, &job).await;
    }
    Ok(ApiReply::Job(Box::new(view)))
}

/// Live figures from the receiving agent (the target); best effort.
async fn progress(agent: &Agent, job: &Job) -> Option<TransferProgress> {
    if job.target == agent.id() {
        return agent.transfers().get(job.id);
    }
    let peer = agent.peer(job.target).ok()?;
    let request = ApiRequest::JobProgress { id: job.id };
    match agent.call_api(&peer, request, PROGRESS_TIMEOUT).await {
        Ok(ApiReply::Progress(progress)) => progress,
        _ => None,
    }
}

/// Whether this agent runs (not holds) its copy of job `id`'s instance.
pub async fn target_runs(agent: &Agent, id: JobId) -> Result<ApiReply, ApiError> {
    let job = agent
        .state()
        .read(|s| s.jobs.get(&id).cloned())
        .ok_or_else(|| ApiError::new(ErrorKind::NotFound, format!("no job {id}")))?;
    let name = InstanceName::parse(&job.instance)
        .map_err(|e| ApiError::new(ErrorKind::BadRequest, e.to_string()))?;
    let local = crate::driver::local_copy(agent.driver(), &name).await;
    Ok(ApiReply::Runs(
        job.target == agent.id() && local == super::plan::LocalCopy::Running,
    ))
}

/// `job show` waits this long at most for the target's live figures.
const PROGRESS_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

pub fn list(agent: &Agent) -> ApiReply {
    let jobs: Vec<Job> = agent.state().read(|s| s.jobs.values().cloned().collect());
    ApiReply::Jobs(jobs.iter().map(|j| job_view(agent, j)).collect())
}

pub async fn abort(agent: &Agent, id: JobId) -> Result<ApiReply, ApiError> {
    match agent
        .write(Command::Job(JobCommand::RequestAbort { id }))
        .await?
    {
        CommandResult::Rejected(r) => Err(ApiError::new(ErrorKind::Conflict, r.to_string())),
        _ => show(agent, id).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multifd_is_refused_for_a_container_and_post_copy_taken_for_both_kinds() {
        let postcopy = LiveSettings {
            postcopy: true,
            ..LiveSettings::default()
        };
        let multifd = LiveSettings {
            multifd_channels: 2,
            ..LiveSettings::default()
        };
        let why = vm_only_settings(Some(InstanceKind::Container), &multifd);
        assert!(why.is_some_and(|w| w.contains("is for a VM")));
        assert_eq!(vm_only_settings(Some(InstanceKind::Vm), &multifd), None);
        // A container's post-copy is a lazy move (CRIU lazy pages).
        for kind in [InstanceKind::Container, InstanceKind::Vm] {
            assert_eq!(vm_only_settings(Some(kind), &postcopy), None);
        }
        let plain = LiveSettings::default();
        assert_eq!(
            vm_only_settings(Some(InstanceKind::Container), &plain),
            None
        );
    }
}
