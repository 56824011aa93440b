//! Host workflows (layer 2): cordon, evacuate and restore a member. An
//! evacuation or restore is a parent job in the replicated state
//! (`ferry_raft::hosts`) whose children are ordinary moves; `plan.rs`
//! decides each next step, `runner.rs` (the leader's loop) takes it.

pub mod plan;
pub mod rolling;
pub mod runner;
pub mod stop;
pub mod upgrade;

use std::collections::BTreeMap;

use ferry_raft::{
    ClusterState, Command, CommandResult, HostJob, HostJobCommand, HostJobKind, ItemState, JobId,
    NodeId,
};

use crate::api::hosts::{
    CandidateView, EvacuateRequest, HostItemView, HostJobView, PlannedItem, UpgradeMemberView,
    UpgradeRequest, UpgradeView,
};
use crate::api::{ApiError, ApiReply, ErrorKind};
use crate::clock::now_ms;
use crate::node::Agent;
use crate::placement::{self, Ask, Verdict};

fn err(kind: ErrorKind, message: impl Into<String>) -> ApiError {
    ApiError::new(kind, message.into())
}

fn member_id(agent: &Agent, name: &str) -> Result<NodeId, ApiError> {
    agent
        .state()
        .read(|s| s.member_by_name(name).map(|m| m.id))
        .ok_or_else(|| {
            err(
                ErrorKind::NotFound,
                format!("no member named '{name}'; 'ferry cluster list' shows the members"),
            )
        })
}

async fn commit(agent: &Agent, cmd: HostJobCommand) -> Result<CommandResult, ApiError> {
    match agent.write(Command::Host(cmd)).await? {
        CommandResult::Rejected(r) => Err(err(ErrorKind::Conflict, r.to_string())),
        other => Ok(other),
    }
}

pub async fn cordon(agent: &Agent, name: &str, cordoned: bool) -> Result<ApiReply, ApiError> {
    let member = member_id(agent, name)?;
    commit(agent, HostJobCommand::Cordon { member, cordoned }).await?;
    Ok(ApiReply::Done)
}

pub async fn evacuate(agent: &Agent, req: EvacuateRequest) -> Result<ApiReply, ApiError> {
    let member = member_id(agent, &req.member)?;
    keeps_quorum(agent, member, &req.member)?;
    let create = HostJobCommand::Create {
        kind: HostJobKind::Evacuate,
        member,
        mode: req.mode,
        parallel: req.parallel,
        now_ms: now_ms(),
    };
    start(agent, create, req.dry_run).await
}

pub async fn restore(agent: &Agent, name: &str, dry_run: bool) -> Result<ApiReply, ApiError> {
    let member = member_id(agent, name)?;
    let create = HostJobCommand::Create {
        kind: HostJobKind::Restore,
        member,
        mode: Default::default(),
        parallel: 2,
        now_ms: now_ms(),
    };
    start(agent, create, dry_run).await
}

async fn start(agent: &Agent, create: HostJobCommand, dry_run: bool) -> Result<ApiReply, ApiError> {
    if dry_run {
        return Ok(ApiReply::HostPlan(preview(agent, create)?));
    }
    match commit(agent, create).await? {
        CommandResult::JobCreated { id } => show(agent, id),
        other => Err(err(
            ErrorKind::Internal,
            format!("unexpected result {other:?}"),
        )),
    }
}

/// A voter may be evacuated only if the others alive keep a majority.
pub(crate) fn keeps_quorum(agent: &Agent, member: NodeId, name: &str) -> Result<(), ApiError> {
    let voters = agent.voter_ids();
    if !voters.contains(&member) {
        return Ok(());
    }
    let need = voters.len() / 2 + 1;
    let alive: Vec<NodeId> = voters
        .iter()
        .copied()
        .filter(|v| *v != member && agent.member_alive(*v))
        .collect();
    if alive.len() >= need {
        return Ok(());
    }
    let names = |ids: &[NodeId]| {
        ids.iter()
            .map(|id| {
                agent
                    .member_name(*id)
                    .unwrap_or_else(|| format!("node-{id}"))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let dead: Vec<NodeId> = voters
        .iter()
        .copied()
        .filter(|v| *v != member && !alive.contains(v))
        .collect();
    Err(err(
        ErrorKind::Conflict,
        format!(
            "evacuating voter '{name}' would leave {} of {} voters alive, and the cluster needs {need}: bring back {} first",
            alive.len(),
            voters.len(),
            names(&dead)
        ),
    ))
}

/// What the job would do now, from a copy of the state with it created.
fn preview(agent: &Agent, create: HostJobCommand) -> Result<Vec<PlannedItem>, ApiError> {
    let members = agent.placement_members();
    let mut s = agent.state().read(ClusterState::clone);
    let id = match s.apply(&Command::Host(create)) {
        CommandResult::JobCreated { id } => id,
        CommandResult::Rejected(r) => return Err(err(ErrorKind::Conflict, r.to_string())),
        other => return Err(err(ErrorKind::Internal, format!("unexpected {other:?}"))),
    };
    let Some(mut job) = s.host_jobs.get(&id).cloned() else {
        return Ok(Vec::new());
    };
    job.parallel = u32::MAX;
    let steps = plan::next(&job, &s, &mut placer(&s, &members));
    let name = |id: NodeId| {
        s.members
            .get(&id)
            .map_or(format!("node-{id}"), |m| m.name.clone())
    };
    Ok(steps
        .into_iter()
        .filter_map(|step| {
            let instance = step.instance()?.to_string();
            let action = match step {
                plan::Step::StartMove {
                    target, stateful, ..
                } => format!(
                    "{} move to {}",
                    if stateful { "live" } else { "stateless" },
                    name(target)
                ),
                plan::Step::StopInPlace { why, .. } => format!("stop: {why}"),
                plan::Step::StartInPlace { .. } => "start where it is".into(),
                plan::Step::Settle { state, detail, .. } => format!("{}: {detail}", state.as_str()),
                plan::Step::Finish => return None,
            };
            Some(PlannedItem { instance, action })
        })
        .collect())
}

/// Placement for the plan, over `members` as seen now.
pub(crate) fn placer<'a>(
    s: &'a ClusterState,
    members: &'a [placement::Member],
) -> impl FnMut(plan::PlaceAsk<'_>) -> Result<NodeId, String> + 'a {
    move |ask: plan::PlaceAsk<'_>| {
        let mut request = Ask::existing(s, ask.instance, ask.stateful);
        request.only = ask.only.map(|m| vec![m]);
        request.prefer = ask.only;
        request.planned = ask.planned.clone();
        placement::choose(members, &request)
    }
}

pub fn list(agent: &Agent) -> ApiReply {
    let jobs: Vec<HostJob> = agent
        .state()
        .read(|s| s.host_jobs.values().cloned().collect());
    ApiReply::HostJobs(jobs.iter().map(|j| view(agent, j)).collect())
}

/// Whether `id` names a host job (not a move).
pub fn is_host_job(agent: &Agent, id: JobId) -> bool {
    agent.state().read(|s| s.host_jobs.contains_key(&id))
}

pub fn show(agent: &Agent, id: JobId) -> Result<ApiReply, ApiError> {
    let job = agent
        .state()
        .read(|s| s.host_jobs.get(&id).cloned())
        .ok_or_else(|| {
            err(
                ErrorKind::NotFound,
                format!("no job {id}; 'ferry job list' shows the jobs"),
            )
        })?;
    Ok(ApiReply::HostJob(Box::new(view(agent, &job))))
}

pub async fn abort(agent: &Agent, id: JobId) -> Result<ApiReply, ApiError> {
    commit(agent, HostJobCommand::RequestAbort { id }).await?;
    show(agent, id)
}

fn view(agent: &Agent, job: &HostJob) -> HostJobView {
    let name = |id: NodeId| {
        agent
            .member_name(id)
            .unwrap_or_else(|| format!("node-{id}"))
    };
    let children: BTreeMap<JobId, ferry_raft::Job> = agent.state().read(|s| {
        job.items
            .iter()
            .filter_map(|i| {
                i.child
                    .and_then(|c| s.jobs.get(&c).cloned())
                    .map(|j| (j.id, j))
            })
            .collect()
    });
    let items = job
        .items
        .iter()
        .map(|i| {
            let child = i.child.and_then(|c| children.get(&c));
            HostItemView {
                instance: i.instance.clone(),
                state: i.state.as_str().into(),
                child: i.child,
                child_phase: child.map(|c| c.phase.name()),
                target: i.target.map(name),
                detail: i.detail.clone(),
                downtime_ms: child
                    .filter(|_| i.state == ItemState::Moved)
                    .and_then(|c| c.stats.as_ref().map(|s| s.downtime_ms)),
            }
        })
        .collect();
    let state = match (job.is_done(), job.abort_requested) {
        (true, _) => "done",
        (false, true) => "aborting",
        (false, false) => "running",
    };
    HostJobView {
        id: job.id,
        kind: job.kind.as_str().into(),
        member: name(job.member),
        mode: format!("{:?}", job.mode).to_lowercase(),
        parallel: job.parallel,
        state: state.into(),
        items,
        created_ms: job.created_ms,
        finished_ms: job.finished_ms,
        parent: job.parent,
        upgrade: job.upgrade.as_ref().map(|u| UpgradeView {
            hook: u.hook.clone(),
            verify: u.verify.clone(),
            max_unavailable: u.max_unavailable,
            members: u
                .members
                .iter()
                .map(|m| UpgradeMemberView {
                    name: name(m.member),
                    stage: m.stage.as_str().into(),
                    evacuation: m.evacuation,
                    restore: m.restore,
                    diff: m.diff.clone(),
                    detail: m.detail.clone(),
                })
                .collect(),
        }),
    }
}

pub async fn start_upgrade(agent: &Agent, req: UpgradeRequest) -> Result<ApiReply, ApiError> {
    let members: Vec<NodeId> = match req.members.is_empty() {
        true => agent.state().read(|s| s.members.keys().copied().collect()),
        false => req
            .members
            .iter()
            .map(|n| member_id(agent, n))
            .collect::<Result<_, _>>()?,
    };
    if req.hook.trim().is_empty() {
        return Err(err(
            ErrorKind::BadRequest,
            "--hook is empty: give the command that upgrades a member",
        ));
    }
    if req.dry_run {
        let plan = members
            .iter()
            .map(|m| PlannedItem {
                instance: agent.member_name(*m).unwrap_or_else(|| format!("node-{m}")),
                action: match upgrade::preflight(agent, *m) {
                    Ok(()) => "preflight ok: evacuate, run the hook, verify, restore".into(),
                    Err(why) => format!("preflight fails now: {why}"),
                },
            })
            .collect();
        return Ok(ApiReply::HostPlan(plan));
    }
    let create = HostJobCommand::CreateUpgrade {
        hook: req.hook,
        verify: req.verify,
        members,
        max_unavailable: req.max_unavailable.max(1),
        now_ms: now_ms(),
    };
    match commit(agent, create).await? {
        CommandResult::JobCreated { id } => show(agent, id),
        other => Err(err(
            ErrorKind::Internal,
            format!("unexpected result {other:?}"),
        )),
    }
}

pub async fn resume_upgrade(agent: &Agent, id: JobId) -> Result<ApiReply, ApiError> {
    commit(agent, HostJobCommand::ResumeUpgrade { id }).await?;
    show(agent, id)
}

/// Placement's verdict on every member, for `--dry-run` without a target.
pub fn placement(
    agent: &Agent,
    instance: Option<&str>,
    stateful: Option<bool>,
) -> Result<ApiReply, ApiError> {
    let members = agent.placement_members();
    let ask = agent.state().read(|s| match instance {
        None => Ok(Ask::default()),
        Some(name) => s
            .instances
            .get(name)
            .map(|i| {
                let running = i.observed == ferry_raft::ObservedState::Running;
                Ask::existing(s, i, stateful.unwrap_or(running))
            })
            .ok_or_else(|| err(ErrorKind::NotFound, format!("no instance named '{name}'"))),
    })?;
    let ranked = placement::rank(&members, &ask);
    Ok(ApiReply::Placement(
        ranked
            .into_iter()
            .map(|c| CandidateView {
                name: c.name,
                score: match c.verdict {
                    Verdict::Score(s) => Some(s),
                    Verdict::Rejected(_) => None,
                },
                rejected: match c.verdict {
                    Verdict::Rejected(why) => Some(why),
                    Verdict::Score(_) => None,
                },
            })
            .collect(),
    ))
}
