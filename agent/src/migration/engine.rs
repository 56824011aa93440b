//! The migration engine: every agent drives its half of the jobs it takes
//! part in, and the leader supervises. Each step is decide → act → report:
//! `plan::step` decides from the committed job and the local copy, `act`
//! carries the step out (`source.rs`, `target.rs`) and returns what to
//! propose, and `advance` (the only code that proposes a job's next phase)
//! writes it through the job's compare-and-set. A crash anywhere is picked
//! up again from the committed phase.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_raft::{
    CheckResult, ClusterState, Command, CommandResult, Job, JobCommand, JobId, MoveStats, Phase,
};

use super::plan::{self, LocalCopy, Role, Step};
use super::{source, target};
use crate::api::names::InstanceName;
use crate::clock::now_ms;
use crate::driver;
use crate::metrics::Outcome;
use crate::node::Agent;

/// How often (and at start) staging areas of ended moves are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// A job's next phase and what to record with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposal {
    pub to: Phase,
    pub error: Option<String>,
    pub note: Option<String>,
    pub report: Option<Vec<CheckResult>>,
    pub stats: Option<MoveStats>,
}

impl Proposal {
    pub fn to(phase: Phase) -> Self {
        Proposal {
            to: phase,
            error: None,
            note: None,
            report: None,
            stats: None,
        }
    }

    pub fn failed(phase: Phase, error: impl Into<String>) -> Self {
        Proposal {
            error: Some(error.into()),
            ..Proposal::to(phase)
        }
    }
}

/// Propose `proposal` as the next phase of `job` (compare-and-set from the
/// phase `job` is in); whether it was taken.
pub async fn advance(agent: &Agent, job: &Job, proposal: Proposal) -> bool {
    let to = proposal.to;
    let now = now_ms();
    let cmd = Command::Job(JobCommand::Advance {
        id: job.id,
        from: job.phase,
        to,
        now_ms: now,
        error: proposal.error,
        report: proposal.report,
        note: proposal.note,
        stats: proposal.stats,
    });
    match agent.write(cmd).await {
        Ok(CommandResult::Done) => {
            count_advance(agent, job, to, now);
            true
        }
        Ok(other) => {
            tracing::info!(job = job.id, ?other, "phase change not taken");
            false
        }
        Err(e) => {
            tracing::warn!(job = job.id, "cannot propose {}: {e}", to.name());
            false
        }
    }
}

/// The metrics of a phase change this member's proposal made.
fn count_advance(agent: &Agent, job: &Job, to: Phase, now_ms: u64) {
    let metrics = agent.metrics();
    let in_phase = Duration::from_millis(now_ms.saturating_sub(job.phase_ms));
    metrics.phase_left(job.phase, in_phase);
    let outcome = match to {
        Phase::Done => Outcome::Done,
        Phase::RolledBack => Outcome::RolledBack,
        _ => return,
    };
    // The figures may have come with an earlier phase change: the
    // committed job has them all.
    let stats = agent
        .state()
        .read(|s| s.jobs.get(&job.id).and_then(|j| j.stats.clone()));
    metrics.move_ended(outcome, stats.as_ref());
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The jobs this agent takes part in that still need it: active ones, and
/// ended ones whose leftovers are here while the instance is not ours.
fn my_jobs(agent: &Agent) -> Vec<Job> {
    let me = agent.id();
    agent.state().read(|s| {
        s.jobs
            .values()
            .filter(|j| j.source == me || j.target == me)
            .filter(|j| {
                !j.phase.is_terminal()
                    || s.instances
                        .get(&j.instance)
                        .is_none_or(|i| plan::ended_job_may_clean(i.job.is_some(), i.owner == me))
            })
            .cloned()
            .collect()
    })
}

pub async fn run(agent: Arc<Agent>) {
    let busy: Arc<Mutex<BTreeSet<JobId>>> = Arc::default();
    let mut watch = agent.state().watch();
    let mut last_sweep: Option<Instant> = None;
    let sweeping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut phase_clock = PhaseClock::default();
    agent.driver().end_leftovers();
    loop {
        for job in my_jobs(&agent) {
            let Ok(name) = InstanceName::parse(&job.instance) else {
                tracing::warn!(job = job.id, "job names an invalid instance; skipped");
                continue;
            };
            if job.phase.is_terminal() && !agent.driver().has_files(&name) {
                continue;
            }
            if !lock(&busy).insert(job.id) {
                continue;
            }
            let (agent, busy) = (agent.clone(), busy.clone());
            tokio::spawn(async move {
                // Step on while there is something to do, so a phase that
                // commits while this task runs is not left for the next tick.
                for _ in 0..32 {
                    if !drive(&agent, &job).await {
                        break;
                    }
                }
                lock(&busy).remove(&job.id);
            });
        }
        supervise(&agent, &mut phase_clock).await;
        if last_sweep.is_none_or(|at| at.elapsed() >= SWEEP_EVERY) {
            last_sweep = Some(Instant::now());
            sweep_staging(&agent).await;
            // Its btrfs commands may take a while: not in this loop's way.
            if !sweeping.swap(true, std::sync::atomic::Ordering::AcqRel) {
                let (agent, sweeping) = (agent.clone(), sweeping.clone());
                tokio::spawn(async move {
                    // Cleared even if the sweep panics.
                    let _done = Cleared(sweeping);
                    super::method::sweep(&agent).await;
                });
            }
        }
        let moves_changed = |a: &ClusterState, b: &ClusterState| {
            !a.jobs.ptr_eq(&b.jobs) || !a.instances.ptr_eq(&b.instances)
        };
        if !watch
            .changed(Duration::from_millis(500), moves_changed)
            .await
        {
            return;
        }
    }
}

/// Clears its flag when dropped.
struct Cleared(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Cleared {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Remove the staging area (memory images, configs) that ended moves left
/// on this host, once the instance runs here or is not ours.
async fn sweep_staging(agent: &Agent) {
    let me = agent.id();
    let ended: BTreeSet<InstanceName> = agent.state().read(|s| {
        s.jobs
            .values()
            .filter(|j| j.phase.is_terminal() && (j.source == me || j.target == me))
            .filter_map(|j| InstanceName::parse(&j.instance).ok())
            .collect()
    });
    for name in ended {
        let staging = agent.driver().staging(&name);
        if !staging.exists() {
            continue;
        }
        let _guard = agent.locks().lock(name.as_str()).await;
        // Under the lock: a move that starts now waits for it.
        let Some((busy, owner_is_me)) = agent.state().read(|s| {
            s.instances
                .get(name.as_str())
                .map(|i| (i.job.is_some(), i.owner == me))
        }) else {
            continue;
        };
        let local = driver::local_copy(agent.driver(), &name).await;
        if plan::staging_is_leftover(true, busy, owner_is_me, local) {
            tracing::info!(instance = %name, "removing the staging area of an ended move");
            if let Err(e) = tokio::fs::remove_dir_all(&staging).await {
                tracing::warn!(instance = %name, "cannot remove {}: {e}", staging.display());
            }
        }
    }
}

/// When this node first saw each active job in its current phase, on its
/// own monotonic clock: phase deadlines never compare two hosts' clocks.
/// A new leader starts counting when it takes over, so a deadline can run
/// up to one phase timeout longer across a failover, never shorter.
#[derive(Default)]
pub struct PhaseClock {
    seen: HashMap<JobId, (Phase, Instant)>,
}

impl PhaseClock {
    /// How long `job` has been in its phase as far as this node saw.
    pub fn stuck_ms(&mut self, job: &Job) -> u64 {
        let entry = self
            .seen
            .entry(job.id)
            .or_insert((job.phase, Instant::now()));
        if entry.0 != job.phase {
            *entry = (job.phase, Instant::now());
        }
        u64::try_from(entry.1.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Forget every job not in `active`.
    fn retain(&mut self, active: &[Job]) {
        self.seen.retain(|id, _| active.iter().any(|j| j.id == *id));
    }
}

/// The leader rolls back jobs whose phase overran or whose participant died.
async fn supervise(agent: &Agent, clock: &mut PhaseClock) {
    if !agent.is_leader() {
        // A leader-to-be counts from when it takes over.
        clock.retain(&[]);
        return;
    }
    let active: Vec<Job> = agent.state().read(|s| {
        s.jobs
            .values()
            .filter(|j| !j.phase.is_terminal())
            .cloned()
            .collect()
    });
    clock.retain(&active);
    let timeout_ms =
        u64::try_from(agent.tuning().job_phase_timeout.as_millis()).unwrap_or(u64::MAX);
    let hold = agent.gossip().config.suspicion;
    for job in active {
        let alive: HashMap<_, _> = [job.source, job.target]
            .into_iter()
            .map(|id| {
                let dead_for = agent.gossip().dead_for(id);
                (id, !plan::dead_long_enough(dead_for, hold))
            })
            .collect();
        let stuck_ms = clock.stuck_ms(&job);
        if plan::ask_target_to_finish(&job, stuck_ms, timeout_ms) {
            finish_for_target(agent, &job).await;
            continue;
        }
        let intervention = plan::supervise(&job, stuck_ms, timeout_ms, |id| {
            alive.get(&id).copied().unwrap_or(false)
        });
        if let Some(i) = intervention {
            tracing::warn!(
                job = job.id,
                "supervisor: {} -> {}: {}",
                i.from.name(),
                i.to.name(),
                i.reason
            );
            advance(agent, &job, Proposal::failed(i.to, i.reason)).await;
        }
    }
}

/// The supervisor's question to the target of a job stuck at Restored.
const TARGET_RUNS_TIMEOUT: Duration = Duration::from_secs(2);

/// A job stuck at Restored whose target runs its copy (it thawed, its
/// `Done` was lost): propose Done for it. A target that does not answer
/// or holds its copy still is left to finish itself.
async fn finish_for_target(agent: &Agent, job: &Job) {
    let Ok(peer) = agent.peer(job.target) else {
        return;
    };
    let request = crate::api::ApiRequest::JobTargetRuns { id: job.id };
    let runs = agent.call_api(&peer, request, TARGET_RUNS_TIMEOUT).await;
    if let Ok(crate::api::ApiReply::Runs(true)) = runs {
        tracing::warn!(
            job = job.id,
            "supervisor: the target runs the instance; proposing Done"
        );
        let done = Proposal {
            note: Some("Done proposed by the supervisor: the target ran it".into()),
            ..Proposal::to(Phase::Done)
        };
        advance(agent, job, done).await;
    }
}

/// One step of `job` for this agent; false when there was nothing to do.
async fn drive(agent: &Agent, job: &Job) -> bool {
    let role = if job.source == agent.id() {
        Role::Source
    } else {
        Role::Target
    };
    let Ok(name) = InstanceName::parse(&job.instance) else {
        return false;
    };
    let _guard = agent.locks().lock(name.as_str()).await;
    // Re-read under the lock: the phase may have moved while we waited.
    let Some(job) = agent.state().read(|s| s.jobs.get(&job.id).cloned()) else {
        return false;
    };
    if job.phase.is_terminal() {
        let me = agent.id();
        let (busy, ours) = agent.state().read(|s| {
            s.instances
                .get(&job.instance)
                .map_or((false, false), |i| (i.job.is_some(), i.owner == me))
        });
        if !plan::ended_job_may_clean(busy, ours) {
            return false;
        }
    }
    let local = driver::local_copy(agent.driver(), &name).await;
    let step = plan::step(&job, role, local);
    if step != Step::Wait {
        tracing::info!(job = job.id, phase = %job.phase.name(), ?role, ?local, ?step, "job step");
        crate::hooks::hold_at(agent.data_dir().root(), &job.phase.name()).await;
    }
    // Steps that only repeat a proposal or clean up wait for the next
    // tick or change instead of spinning.
    let acted = !matches!(
        step,
        Step::Wait | Step::DiscardReceived | Step::DeleteSourceCopy | Step::ProposeDone
    );
    if let Some(proposal) = act(agent, &job, &name, step, local).await {
        let ended = proposal.to.is_terminal();
        if advance(agent, &job, proposal).await && ended {
            agent.transfers().forget(job.id);
        }
    }
    acted
}

/// Carry `step` out on this host; what to propose next, if anything.
async fn act(
    agent: &Agent,
    job: &Job,
    name: &InstanceName,
    step: Step,
    local: LocalCopy,
) -> Option<Proposal> {
    match step {
        Step::Wait => None,
        Step::BeginChecks => Some(Proposal::to(Phase::Checking)),
        Step::RunChecks => Some(source::run_checks(agent, job, name).await),
        Step::Abort => Some(Proposal::failed(
            Phase::RollingBack,
            "aborted by the operator",
        )),
        Step::RollBackInterruptedPush => Some(Proposal::failed(
            Phase::RollingBack,
            "the source restarted in the middle of its push",
        )),
        Step::Push => source::push(agent, job)
            .await
            .err()
            .map(|e| transfer_failed(job, e)),
        Step::Transfer => Some(match target::pull(agent, job).await {
            Ok(note) => Proposal {
                note,
                ..Proposal::to(Phase::Frozen)
            },
            Err(e) => {
                // What arrived goes now, not once RollingBack commits: a
                // disk it filled must not keep this agent from writing.
                discard(agent, job, name).await;
                transfer_failed(job, e)
            }
        }),
        Step::Switch => Some(Proposal::to(Phase::Switched)),
        Step::RestoreHeld => Some(target::restore(agent, job, name, local).await),
        Step::ThawAndFinish => target::finish(agent, job, name).await,
        Step::ProposeDone => Some(target::done_once_paged(agent, job, name).await),
        Step::ThawSource => source::thaw(agent, job, name).await,
        Step::FinishRollback => source::finish_rollback(agent, job, name, local).await,
        Step::DiscardReceived | Step::DeleteSourceCopy => {
            discard(agent, job, name).await;
            None
        }
    }
}

fn transfer_failed(job: &Job, e: super::error::MoveError) -> Proposal {
    tracing::warn!(job = job.id, "transfer failed: {e}");
    Proposal::failed(Phase::RollingBack, format!("transfer failed: {e}"))
}

/// Delete this host's copy of an instance that is no longer (or not yet)
/// ours.
pub(super) async fn discard(agent: &Agent, job: &Job, name: &InstanceName) {
    // Whatever comes next for this job, its first rootfs pass is not here.
    let _ = agent.transfers().take_rootfs_pass(job.id);
    let ours = agent.state().read(|s| {
        s.instances
            .get(name.as_str())
            .is_some_and(|i| i.owner == agent.id())
    });
    if !ours {
        if let Err(e) = agent.driver().remove(name).await {
            tracing::warn!(job = job.id, "cleanup failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(phase: Phase, phase_ms: u64) -> Job {
        Job {
            id: 7,
            phase_ms,
            ..plan::tests::job(phase)
        }
    }

    #[test]
    fn phase_deadlines_count_from_when_this_node_saw_the_phase_not_the_proposers_clock() {
        let mut clock = PhaseClock::default();
        // A proposer whose clock is an hour behind (or ahead): the phase
        // is new here all the same.
        for phase_ms in [0, now_ms() + 3_600_000] {
            let j = job(Phase::Preparing, phase_ms);
            assert!(clock.stuck_ms(&j) < 1_000);
            assert_eq!(
                plan::supervise(&j, clock.stuck_ms(&j), 60_000, |_| true),
                None
            );
        }
        let first = clock.seen[&7].1;
        let moved = job(Phase::Frozen, 0);
        clock.stuck_ms(&moved);
        let (phase, since) = clock.seen[&7];
        assert!(
            phase == Phase::Frozen && since >= first,
            "a new phase restarts the count"
        );
        clock.retain(&[]);
        assert!(clock.seen.is_empty());
    }
}
