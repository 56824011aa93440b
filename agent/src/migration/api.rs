//! The job side of the operator API: `ferry move`, `ferry job ...`.

use std::sync::Arc;

use ferry_raft::{
    Baseline, CheckResult, Command, CommandResult, HostFacts, Job, JobCommand, JobId, MoveOptions,
    ObservedState, Phase, TransferMode,
};
use serde::{Deserialize, Serialize};

use crate::agent::{now_ms, Agent};
use crate::migration::compat;
use crate::protocol::{ApiError, ApiReply, ErrorKind};

/// What `ferry move` asks for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MoveRequest {
    pub instance: String,
    pub target: String,
    /// None: stateful if the instance runs, else stateless.
    pub stateful: Option<bool>,
    pub mode: TransferMode,
    pub precopy_iterations: u32,
    pub precopy_goal_percent: u8,
    pub dry_run: bool,
}

/// A job as `ferry job show --format json` prints it (CLI.md).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobView {
    pub id: JobId,
    pub kind: String,
    pub instance: String,
    pub source: String,
    pub target: String,
    pub phase: String,
    pub done: bool,
    pub succeeded: bool,
    pub stateful: bool,
    pub error: Option<String>,
    pub report: Vec<CheckResult>,
    pub notes: Vec<String>,
    pub abort_requested: bool,
    pub created_ms: u64,
    pub downtime_ms: Option<u64>,
    pub total_ms: Option<u64>,
    pub bytes: Option<u64>,
    pub iterations: Option<u32>,
    /// While the transfer runs: what is being sent and the bytes so far.
    pub progress: Option<TransferProgress>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferProgress {
    /// "rootfs", "memory images" or "rootfs delta".
    pub stage: String,
    /// File bytes received so far, all stages together.
    pub bytes: u64,
}

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
        phase: job.phase.name(),
        done: job.phase.is_terminal(),
        succeeded: job.phase == Phase::Done,
        stateful: job.options.stateful,
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

/// The baseline to hold a target to: the one recorded when the instance's
/// processes started, else (never started) the source host itself.
pub fn baseline_or_source(baseline: Option<&Baseline>, source: &HostFacts) -> Baseline {
    baseline.cloned().unwrap_or_else(|| Baseline {
        arch: source.arch.clone(),
        kernel: source.kernel.clone(),
        cpu_flags: source.cpu_flags.clone(),
        syscalls: source.syscalls.clone(),
        filesystems: source.filesystems.clone(),
        criu: source.runtimes.criu.clone(),
        ..Default::default()
    })
}

/// The compatibility report for moving `instance` to `target`, from the
/// replicated facts. `disk_bytes` is what the source knows the move needs.
pub fn report(
    agent: &Agent,
    instance: &str,
    target: u64,
    stateful: bool,
    disk_bytes: u64,
) -> Result<Vec<CheckResult>, ApiError> {
    agent.state.read(|s| {
        let inst = s
            .instances
            .get(instance)
            .ok_or_else(|| not_found(format!("no instance named '{instance}'")))?;
        let facts = |id: u64| {
            s.members
                .get(&id)
                .and_then(|m| m.facts.clone())
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorKind::Unavailable,
                        format!("member {id} has not reported its host facts yet; retry shortly"),
                    )
                })
        };
        let (source, target) = (facts(inst.owner)?, facts(target)?);
        let baseline = baseline_or_source(inst.baseline.as_ref(), &source);
        let needs = compat::Needs {
            stateful,
            memory_bytes: inst.spec.memory_bytes,
            target_free_memory_bytes: None,
            disk_bytes,
            target_free_disk_bytes: None,
        };
        Ok(compat::check(&baseline, &source, &target, &needs))
    })
}

pub async fn start_move(agent: &Arc<Agent>, request: MoveRequest) -> Result<ApiReply, ApiError> {
    let (target, running, owner) = agent.state.read(|s| {
        let inst = s.instances.get(&request.instance).ok_or_else(|| {
            not_found(format!(
                "no instance named '{}'; 'ferry list' shows the instances",
                request.instance
            ))
        })?;
        let target = s.member_by_name(&request.target).ok_or_else(|| {
            not_found(format!(
                "no member named '{}'; 'ferry cluster list' shows the members",
                request.target
            ))
        })?;
        Ok::<_, ApiError>((
            target.id,
            inst.observed == ObservedState::Running,
            inst.owner,
        ))
    })?;
    if owner == target {
        return Err(ApiError::new(
            ErrorKind::Conflict,
            format!(
                "instance '{}' is already on '{}'",
                request.instance, request.target
            ),
        ));
    }
    let stateful = request.stateful.unwrap_or(running);
    if request.dry_run {
        return Ok(ApiReply::Report(report(
            agent,
            &request.instance,
            target,
            stateful,
            0,
        )?));
    }
    let options = MoveOptions {
        stateful,
        mode: request.mode,
        precopy_iterations: request.precopy_iterations,
        precopy_goal_percent: request.precopy_goal_percent,
    };
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
        .state
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
    if job.target == agent.id {
        return agent.transfers.get(job.id);
    }
    let (addr, name) = agent.state.read(|s| {
        let m = s.members.get(&job.target)?;
        Some((m.addr.parse::<std::net::SocketAddr>().ok()?, m.name.clone()))
    })?;
    let request =
        crate::protocol::Request::Api(crate::protocol::ApiRequest::JobProgress { id: job.id });
    let reply = agent
        .pool
        .call::<_, crate::protocol::Response>(
            addr,
            &ferry_transport::endpoint::Expect::Node(name),
            &request,
            PROGRESS_TIMEOUT,
        )
        .await;
    match reply {
        Ok(crate::protocol::Response::Api(ApiReply::Progress(progress))) => progress,
        _ => None,
    }
}

/// `job show` waits this long at most for the target's live figures.
const PROGRESS_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

pub fn list(agent: &Agent) -> ApiReply {
    let jobs: Vec<Job> = agent.state.read(|s| s.jobs.values().cloned().collect());
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
