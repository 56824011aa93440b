//! Carries out the decisions of `plan.rs` with runc, CRIU and QUIC. Every
//! agent runs it for the jobs it takes part in; the leader also supervises.
//! Each step ends by proposing the next phase through the job's
//! compare-and-set, so a crash anywhere is picked up again from the
//! committed phase.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_raft::{
    Command, CommandResult, Job, JobCommand, JobId, MoveStats, NodeId, Phase, TransferMode,
};
use ferry_transport::endpoint::Expect;
use ferry_transport::frame::{read_frame, write_frame, MAX_FRAME};
use serde::{Deserialize, Serialize};

use crate::agent::{now_ms, Agent};
use crate::container::bundle::{self, BundleConfig};
use crate::container::runc::Status;
use crate::migration::plan::{self, LocalCopy, Role, Step};
use crate::migration::{api, compat, tree};
use crate::protocol::Request;

const CHANNEL_TIMEOUT: Duration = Duration::from_secs(30);

/// What a transfer channel carries. Pull: the target opens it and asks the
/// source. Push: the source opens it and sends to the target, which answers
/// with a [`PushAck`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum TransferPart {
    /// The rootfs in full, while the instance runs.
    Rootfs,
    /// Freeze, dump, then send the images and the rootfs delta.
    Final,
    /// Push: the rootfs in full follows.
    PushRootfs,
    /// Push: the freeze header, images and rootfs delta follow.
    PushFinal,
}

/// The target's answer at the end of a pushed part.
#[derive(Debug, Serialize, Deserialize)]
enum PushAck {
    Received,
    Failed(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransferRequest {
    pub job: JobId,
    pub part: TransferPart,
}

/// The source's first answer on a `Final` channel.
#[derive(Debug, Serialize, Deserialize)]
enum FinalHeader {
    Frozen { note: Option<String> },
    Refused(String),
}

#[derive(Default)]
pub struct Engine {
    busy: Mutex<BTreeSet<JobId>>,
}

/// Live figures of the transfers this agent receives, for `job show`, and
/// the ones the target reports when the job is done.
#[derive(Default)]
pub struct Transfers {
    jobs: Mutex<HashMap<JobId, (&'static str, Arc<AtomicU64>)>>,
    /// When the source froze (wall clock ms, as the target saw it), for the
    /// downtime figure.
    froze_at: Mutex<HashMap<JobId, u64>>,
    /// Bytes received in all.
    bytes: Mutex<HashMap<JobId, u64>>,
}

impl Transfers {
    /// Count bytes for `job` under `stage`; bytes add up across stages.
    fn stage(&self, job: JobId, stage: &'static str) -> Arc<AtomicU64> {
        let mut jobs = lock(&self.jobs);
        let entry = jobs
            .entry(job)
            .or_insert_with(|| (stage, Arc::new(AtomicU64::new(0))));
        entry.0 = stage;
        entry.1.clone()
    }

    fn end(&self, job: JobId) {
        lock(&self.jobs).remove(&job);
    }

    fn froze(&self, job: JobId) {
        lock(&self.froze_at).insert(job, now_ms());
    }

    fn received(&self, job: JobId, bytes: u64) {
        lock(&self.bytes).insert(job, bytes);
    }

    fn received_so_far(&self, job: JobId) -> u64 {
        lock(&self.bytes).get(&job).copied().unwrap_or(0)
    }

    /// (downtime ms, bytes) for `job`, taken out.
    fn take_figures(&self, job: JobId, now: u64) -> (u64, u64) {
        let froze = lock(&self.froze_at).remove(&job);
        let bytes = lock(&self.bytes).remove(&job).unwrap_or(0);
        (froze.map_or(0, |t| now.saturating_sub(t)), bytes)
    }

    pub fn get(&self, job: JobId) -> Option<api::TransferProgress> {
        lock(&self.jobs)
            .get(&job)
            .map(|(stage, bytes)| api::TransferProgress {
                stage: stage.to_string(),
                bytes: bytes.load(Ordering::Relaxed),
            })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn advance(
    agent: &Agent,
    job: &Job,
    to: Phase,
    error: Option<String>,
    note: Option<String>,
    stats: Option<MoveStats>,
) -> bool {
    let cmd = Command::Job(JobCommand::Advance {
        id: job.id,
        from: job.phase,
        to,
        now_ms: now_ms(),
        error,
        report: None,
        note,
        stats,
    });
    match agent.write(cmd).await {
        Ok(CommandResult::Done) => true,
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

/// What this host holds of the instance.
async fn local_copy(agent: &Agent, name: &str) -> LocalCopy {
    let dir = agent.host.dir(name);
    match agent
        .host
        .status(name)
        .await
        .ok()
        .flatten()
        .map(|s| s.status)
    {
        Some(Status::Paused) => LocalCopy::Frozen,
        Some(Status::Running) if dir.held_marker().exists() => LocalCopy::Frozen,
        Some(Status::Running) => LocalCopy::Running,
        Some(Status::Stopped) => LocalCopy::Stopped,
        None if dir.root().exists() => LocalCopy::Stopped,
        None => LocalCopy::Absent,
    }
}

fn member(agent: &Agent, id: NodeId) -> Option<(std::net::SocketAddr, String)> {
    agent.state.read(|s| {
        let m = s.members.get(&id)?;
        Some((m.addr.parse().ok()?, m.name.clone()))
    })
}

pub async fn run(agent: Arc<Agent>) {
    let engine = Arc::new(Engine::default());
    let mut changes = agent.state.subscribe();
    let mut last_sweep = None;
    loop {
        let jobs: Vec<Job> = agent.state.read(|s| {
            s.jobs
                .values()
                .filter(|j| j.source == agent.id || j.target == agent.id)
                .filter(|j| {
                    // Ended jobs matter only while their leftovers are here
                    // and the instance is not ours now.
                    !j.phase.is_terminal()
                        || s.instances
                            .get(&j.instance)
                            .is_none_or(|i| i.owner != agent.id && i.job.is_none())
                })
                .cloned()
                .collect()
        });
        for job in jobs {
            if job.phase.is_terminal() && !agent.host.dir(&job.instance).root().exists() {
                continue;
            }
            if !lock(&engine.busy).insert(job.id) {
                continue;
            }
            let (agent, engine) = (agent.clone(), engine.clone());
            tokio::spawn(async move {
                // Step on while there is something to do, so a phase that
                // commits while this task runs is not left for the next tick.
                for _ in 0..32 {
                    if !drive(&agent, &job).await {
                        break;
                    }
                }
                lock(&engine.busy).remove(&job.id);
            });
        }
        supervise(&agent).await;
        if last_sweep.is_none_or(|at: std::time::Instant| at.elapsed() >= SWEEP_EVERY) {
            last_sweep = Some(std::time::Instant::now());
            sweep_staging(&agent).await;
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// How often (and at start) staging areas of ended moves are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Remove the staging area (CRIU images, configs) that ended moves left
/// on this host, once the instance runs here or is not ours.
async fn sweep_staging(agent: &Arc<Agent>) {
    let me = agent.id;
    let ended: BTreeSet<String> = agent.state.read(|s| {
        s.jobs
            .values()
            .filter(|j| j.phase.is_terminal() && (j.source == me || j.target == me))
            .map(|j| j.instance.clone())
            .collect()
    });
    for name in ended {
        let staging = agent.host.dir(&name).migration();
        if !staging.exists() {
            continue;
        }
        let _guard = agent.host.lock(&name).await;
        // Under the lock: a move that starts now waits for it.
        let Some((busy, owner_is_me)) = agent.state.read(|s| {
            s.instances
                .get(&name)
                .map(|i| (i.job.is_some(), i.owner == me))
        }) else {
            continue;
        };
        let local = local_copy(agent, &name).await;
        if plan::staging_is_leftover(true, busy, owner_is_me, local) {
            tracing::info!(instance = %name, "removing the staging area of an ended move");
            if let Err(e) = tokio::fs::remove_dir_all(&staging).await {
                tracing::warn!(instance = %name, "cannot remove {}: {e}", staging.display());
            }
        }
    }
}

/// The leader rolls back jobs whose phase overran or whose participant died.
async fn supervise(agent: &Arc<Agent>) {
    let leader = agent.raft.metrics().borrow().current_leader == Some(agent.id);
    if !leader {
        return;
    }
    let active: Vec<Job> = agent.state.read(|s| {
        s.jobs
            .values()
            .filter(|j| !j.phase.is_terminal())
            .cloned()
            .collect()
    });
    for job in active {
        let mut alive = HashMap::new();
        for id in [job.source, job.target] {
            alive.insert(id, crate::service::member_alive(agent, id));
        }
        let timeout_ms = u64::try_from(agent.job_phase_timeout.as_millis()).unwrap_or(u64::MAX);
        if let Some(i) = plan::supervise(&job, now_ms(), timeout_ms, |id| {
            alive.get(&id).copied().unwrap_or(false)
        }) {
            tracing::warn!(
                job = job.id,
                "supervisor: {} -> {}: {}",
                i.from.name(),
                i.to.name(),
                i.reason
            );
            advance(agent, &job, i.to, Some(i.reason), None, None).await;
        }
    }
}

/// One step of `job` for this agent; false when there was nothing to do.
async fn drive(agent: &Arc<Agent>, job: &Job) -> bool {
    let role = if job.source == agent.id {
        Role::Source
    } else {
        Role::Target
    };
    let _guard = agent.host.lock(&job.instance).await;
    // Re-read under the lock: the phase may have moved while we waited.
    let Some(job) = agent.state.read(|s| s.jobs.get(&job.id).cloned()) else {
        return false;
    };
    let local = local_copy(agent, &job.instance).await;
    let step = plan::step(&job, role, local);
    if step != Step::Wait {
        tracing::info!(job = job.id, phase = %job.phase.name(), ?role, ?local, ?step, "job step");
    }
    let name = job.instance.as_str();
    let acted = !matches!(
        step,
        Step::Wait | Step::DiscardReceived | Step::DeleteSourceCopy
    );
    match step {
        Step::Wait => {}
        Step::BeginChecks => {
            advance(agent, &job, Phase::Checking, None, None, None).await;
        }
        Step::RunChecks => run_checks(agent, &job).await,
        Step::Abort => {
            advance(
                agent,
                &job,
                Phase::RollingBack,
                Some("aborted by the operator".into()),
                None,
                None,
            )
            .await;
        }
        Step::RollBackInterruptedPush => {
            advance(
                agent,
                &job,
                Phase::RollingBack,
                Some("the source restarted in the middle of its push".into()),
                None,
                None,
            )
            .await;
        }
        Step::Push | Step::Transfer => {
            let result = if step == Step::Push {
                push(agent, &job).await
            } else {
                transfer(agent, &job).await
            };
            if let Err(e) = result {
                tracing::warn!(job = job.id, "transfer failed: {e}");
                advance(
                    agent,
                    &job,
                    Phase::RollingBack,
                    Some(format!("transfer failed: {e}")),
                    None,
                    None,
                )
                .await;
            }
        }
        Step::Switch => {
            advance(agent, &job, Phase::Switched, None, None, None).await;
        }
        Step::RestoreHeld => {
            let result = if !job.options.stateful || local == LocalCopy::Frozen {
                Ok(())
            } else {
                restore_held(agent, &job).await
            };
            match result {
                Ok(()) => {
                    advance(agent, &job, Phase::Restored, None, None, None).await;
                }
                Err(e) => {
                    let _ = agent.host.remove(name).await;
                    advance(
                        agent,
                        &job,
                        Phase::SwitchingBack,
                        Some(format!("restore on the target failed: {e}")),
                        None,
                        None,
                    )
                    .await;
                }
            }
        }
        Step::ThawAndFinish => {
            let result = if job.options.stateful {
                thaw_target(agent, &job).await
            } else if job.was_running {
                write_config(agent, &job, false)
                    .await
                    .and(agent.host.start(name).await.map_err(|e| e.to_string()))
            } else {
                Ok(())
            };
            if let Err(e) = result {
                // Restored is committed: the instance is ours and held; a
                // retry of this step (or `ferry start`) thaws it.
                tracing::warn!(job = job.id, "thaw failed: {e}");
                return false;
            }
            let now = now_ms();
            let (downtime_ms, bytes) = agent.transfers.take_figures(job.id, now);
            let stats = MoveStats {
                downtime_ms,
                total_ms: now.saturating_sub(job.created_ms),
                bytes,
                iterations: 0,
            };
            advance(agent, &job, Phase::Done, None, None, Some(stats)).await;
        }
        Step::ThawSource => match agent.host.resume(name).await {
            Ok(()) => {
                advance(agent, &job, Phase::RolledBack, None, None, None).await;
            }
            Err(e) => {
                advance(agent, &job, Phase::RolledBack, Some(format!("the source could not thaw ({e}); the instance stays stopped with its final dump")), None, None).await;
            }
        },
        Step::FinishRollback => {
            if !job.options.stateful && job.was_running && local != LocalCopy::Running {
                if let Err(e) = agent.host.start(name).await {
                    tracing::warn!(job = job.id, "restart after rollback failed: {e}");
                }
            }
            advance(agent, &job, Phase::RolledBack, None, None, None).await;
        }
        Step::DiscardReceived | Step::DeleteSourceCopy => {
            let ours = agent
                .state
                .read(|s| s.instances.get(name).is_some_and(|i| i.owner == agent.id));
            if !ours {
                if let Err(e) = agent.host.remove(name).await {
                    tracing::warn!(job = job.id, "cleanup failed: {e}");
                }
            }
        }
    }
    acted
}

async fn run_checks(agent: &Agent, job: &Job) {
    let rootfs = agent.host.dir(&job.instance).rootfs();
    let disk = tokio::task::spawn_blocking(move || {
        tree::scan(&rootfs).map(|entries| {
            entries
                .iter()
                .map(|e| match e.kind {
                    tree::EntryKind::File { size } => size,
                    _ => 0,
                })
                .sum::<u64>()
        })
    })
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or(0);
    let report = match api::report(agent, &job.instance, job.target, job.options.stateful, disk) {
        Ok(report) => report,
        Err(e) => vec![ferry_raft::CheckResult {
            check: "facts".into(),
            ok: false,
            detail: e.message,
        }],
    };
    let passed = compat::passed(&report);
    let (to, error) = if passed {
        (Phase::Preparing, None)
    } else {
        let failed: Vec<String> = report
            .iter()
            .filter(|r| !r.ok)
            .map(|r| format!("{}: {}", r.check, r.detail))
            .collect();
        (
            Phase::RollingBack,
            Some(format!("compatibility check failed: {}", failed.join("; "))),
        )
    };
    let cmd = Command::Job(JobCommand::Advance {
        id: job.id,
        from: job.phase,
        to,
        now_ms: now_ms(),
        error,
        report: Some(report),
        note: None,
        stats: None,
    });
    if let Err(e) = agent.write(cmd).await {
        tracing::warn!(job = job.id, "cannot record the check: {e}");
    }
}

async fn write_config(agent: &Agent, job: &Job, held: bool) -> Result<(), String> {
    let spec = agent
        .state
        .read(|s| s.instances.get(&job.instance).map(|i| i.spec.clone()))
        .ok_or("instance vanished")?;
    let dir = agent.host.dir(&job.instance);
    let criu_config = dir.migration().join("criu-held.conf");
    if held {
        tokio::fs::create_dir_all(dir.migration())
            .await
            .map_err(|e| e.to_string())?;
        tokio::fs::write(&criu_config, "leave-stopped\n")
            .await
            .map_err(|e| e.to_string())?;
    }
    bundle::write_config(
        &dir,
        &BundleConfig {
            name: &job.instance,
            command: &spec.command,
            memory_bytes: spec.memory_bytes,
            cgroup_parent: agent.host.cgroup_parent(),
            criu_config: held.then_some(criu_config.as_path()),
        },
    )
    .map_err(|e| e.to_string())
}

/// A transfer channel of `job` to member `peer`, its first frame asking
/// for `part`.
async fn open_channel(
    agent: &Agent,
    job: &Job,
    peer: NodeId,
    part: TransferPart,
) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let (addr, name) = member(agent, peer).ok_or(format!("node {peer} is not a member"))?;
    let request = Request::Transfer(TransferRequest { job: job.id, part });
    agent
        .pool
        .open_stream(addr, &Expect::Node(name.clone()), &request, CHANNEL_TIMEOUT)
        .await
        .map_err(|e| format!("cannot open a transfer channel to {name}: {e}"))
}

/// Target: pull the rootfs while the source runs, then the final state.
async fn transfer(agent: &Agent, job: &Job) -> Result<(), String> {
    let result = pull(agent, job).await;
    agent.transfers.end(job.id);
    result
}

async fn pull(agent: &Agent, job: &Job) -> Result<(), String> {
    let dir = agent.host.dir(&job.instance);
    let open = |part| open_channel(agent, job, job.source, part);
    // Filesystem pre-sync while the instance runs.
    let (mut send, mut recv) = open(TransferPart::Rootfs).await?;
    let counter = agent.transfers.stage(job.id, "rootfs");
    let full = tree::receive_counted(&mut send, &mut recv, &dir.rootfs(), false, &counter)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    // Final: the source freezes and dumps; images and rootfs delta follow.
    agent.transfers.froze(job.id);
    let (mut send, mut recv) = open(TransferPart::Final).await?;
    let result = receive_final(agent, job, &mut send, &mut recv, full.bytes).await;
    let _ = send.finish();
    result
}

/// Target, either mode: the source's freeze header, the memory images and
/// the rootfs delta; then the held restore config and Frozen.
async fn receive_final(
    agent: &Agent,
    job: &Job,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    rootfs_bytes: u64,
) -> Result<(), String> {
    let dir = agent.host.dir(&job.instance);
    let note = match read_frame::<FinalHeader>(recv, MAX_FRAME)
        .await
        .map_err(|e| e.to_string())?
    {
        FinalHeader::Frozen { note } => note,
        FinalHeader::Refused(why) => return Err(format!("the source refused to freeze: {why}")),
    };
    let mut bytes = rootfs_bytes;
    if job.options.stateful {
        let counter = agent.transfers.stage(job.id, "memory images");
        let images_dir = dir.migration().join("images");
        let images = tree::receive_counted(send, recv, &images_dir, false, &counter)
            .await
            .map_err(|e| e.to_string())?;
        bytes += images.bytes;
    }
    let counter = agent.transfers.stage(job.id, "rootfs delta");
    let delta = tree::receive_counted(send, recv, &dir.rootfs(), true, &counter)
        .await
        .map_err(|e| e.to_string())?;
    bytes += delta.bytes;
    write_config(agent, job, job.options.stateful).await?;
    agent.transfers.received(job.id, bytes);
    if !advance(agent, job, Phase::Frozen, None, note, None).await {
        return Err("could not record the frozen phase".into());
    }
    Ok(())
}

/// Source: serve a transfer channel opened by the job's target.
pub async fn serve_transfer(
    agent: &Agent,
    peer_name: &str,
    req: TransferRequest,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Some(job) = agent.state.read(|s| s.jobs.get(&req.job).cloned()) else {
        return;
    };
    let pushed = matches!(req.part, TransferPart::PushRootfs | TransferPart::PushFinal);
    // Pull: we are the source, the peer the target; push: the other way.
    let (we, they) = if pushed {
        (job.target, job.source)
    } else {
        (job.source, job.target)
    };
    let peer_ok = member(agent, they).is_some_and(|(_, n)| n == peer_name);
    let mode_ok = (job.options.mode == TransferMode::Push) == pushed;
    if we != agent.id || !peer_ok || !mode_ok {
        tracing::warn!(
            job = job.id,
            peer = peer_name,
            "refused a transfer channel from a non-participant or in the wrong mode"
        );
        return;
    }
    let dir = agent.host.dir(&job.instance);
    let result = match req.part {
        TransferPart::PushRootfs => {
            let _guard = agent.host.lock(&job.instance).await;
            let counter = agent.transfers.stage(job.id, "rootfs");
            let received =
                tree::receive_counted(&mut send, &mut recv, &dir.rootfs(), false, &counter)
                    .await
                    .map(|t| agent.transfers.received(job.id, t.bytes))
                    .map_err(|e| e.to_string());
            acknowledge(&mut send, received).await
        }
        TransferPart::PushFinal => {
            let _guard = agent.host.lock(&job.instance).await;
            agent.transfers.froze(job.id);
            let rootfs_bytes = agent.transfers.received_so_far(job.id);
            let received = receive_final(agent, &job, &mut send, &mut recv, rootfs_bytes).await;
            agent.transfers.end(job.id);
            acknowledge(&mut send, received).await
        }
        TransferPart::Rootfs => tree::send(&mut send, &mut recv, &dir.rootfs(), false)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        TransferPart::Final => {
            let _guard = agent.host.lock(&job.instance).await;
            serve_final(agent, &job, &mut send, &mut recv).await
        }
    };
    if let Err(e) = result {
        tracing::warn!(job = job.id, "transfer channel failed: {e}");
    }
    let _ = send.finish();
}

/// Target: tell the pushing source how the part went.
async fn acknowledge(
    send: &mut quinn::SendStream,
    received: Result<(), String>,
) -> Result<(), String> {
    let ack = match &received {
        Ok(()) => PushAck::Received,
        Err(e) => PushAck::Failed(e.clone()),
    };
    write_frame(send, &ack).await.map_err(|e| e.to_string())?;
    received
}

/// Source, pull mode: freeze on the target's request and send the rest.
async fn serve_final(
    agent: &Agent,
    job: &Job,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<(), String> {
    match freeze(agent, job).await {
        Ok(note) => send_final(agent, job, send, recv, note).await,
        Err(why) => {
            let _ = write_frame(send, &FinalHeader::Refused(why.clone())).await;
            Err(why)
        }
    }
}

/// Source, push mode: send the rootfs while running, freeze, send the rest;
/// the target records Frozen once it holds everything.
async fn push(agent: &Agent, job: &Job) -> Result<(), String> {
    let target_name = agent
        .member_name(job.target)
        .ok_or("the target is not a member")?;
    let open = |part| open_channel(agent, job, job.target, part);
    let dir = agent.host.dir(&job.instance);
    let (mut send, mut recv) = open(TransferPart::PushRootfs).await?;
    tree::send(&mut send, &mut recv, &dir.rootfs(), false)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    pushed(&mut recv, &target_name).await?;
    let (mut send, mut recv) = open(TransferPart::PushFinal).await?;
    match freeze(agent, job).await {
        Ok(note) => send_final(agent, job, &mut send, &mut recv, note).await?,
        Err(why) => {
            let _ = write_frame(&mut send, &FinalHeader::Refused(why.clone())).await;
            return Err(why);
        }
    }
    let _ = send.finish();
    pushed(&mut recv, &target_name).await
}

async fn pushed(recv: &mut quinn::RecvStream, target: &str) -> Result<(), String> {
    match read_frame::<PushAck>(recv, MAX_FRAME).await {
        Ok(PushAck::Received) => Ok(()),
        Ok(PushAck::Failed(why)) => Err(format!("{target} could not take it: {why}")),
        Err(e) => Err(format!("no answer from {target}: {e}")),
    }
}

/// Source: pause and dump (stateful) or stop (stateless), only while the
/// job still allows it; returns the note for the job. Called with the
/// instance's host lock held.
async fn freeze(agent: &Agent, job: &Job) -> Result<Option<String>, String> {
    let name = job.instance.as_str();
    let dir = agent.host.dir(name);
    // Re-read: the freeze is allowed only while we still own the instance
    // and nobody asked to roll back.
    let current = agent.state.read(|s| s.jobs.get(&job.id).cloned());
    if !current.as_ref().is_some_and(plan::may_freeze) {
        return Err("the job is no longer in a phase that allows freezing".into());
    }
    let images = dir.migration().join("images");
    let mut note = None;
    if job.options.stateful {
        note = Some(precopy_note().await);
        let running = agent
            .host
            .status(name)
            .await
            .ok()
            .flatten()
            .map(|s| s.status);
        if running == Some(Status::Running) {
            agent.host.pause(name).await.map_err(|e| e.to_string())?;
        }
        if let Err(e) = agent.host.dump_frozen(name, &images).await {
            // Nothing left this host: the instance may run on.
            let _ = agent.host.resume(name).await;
            return Err(e.to_string());
        }
    } else {
        agent
            .host
            .stop(name, false)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(note)
}

/// Source: the freeze header, the images, the rootfs delta.
async fn send_final(
    agent: &Agent,
    job: &Job,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    note: Option<String>,
) -> Result<(), String> {
    let dir = agent.host.dir(&job.instance);
    let images = dir.migration().join("images");
    write_frame(send, &FinalHeader::Frozen { note })
        .await
        .map_err(|e| e.to_string())?;
    if job.options.stateful {
        tree::send(send, recv, &images, false)
            .await
            .map_err(|e| e.to_string())?;
    }
    tree::send(send, recv, &dir.rootfs(), true)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Pre-copy needs the kernel to track dirty memory; say what happened.
async fn precopy_note() -> String {
    let tracked = tokio::process::Command::new("criu")
        .args(["check", "--feature", "mem_dirty_track"])
        .output()
        .await
        .is_ok_and(|o| o.status.success());
    if tracked {
        "pre-copy not implemented yet; went straight to the final dump".into()
    } else {
        "pre-copy unavailable: this kernel does not track dirty memory ('criu check --feature mem_dirty_track' fails); went straight to the final dump".into()
    }
}

async fn restore_held(agent: &Agent, job: &Job) -> Result<(), String> {
    let dir = agent.host.dir(&job.instance);
    write_config(agent, job, true).await?;
    // Marked before the restore: a copy that exists here is held until the
    // marker goes after the thaw.
    tokio::fs::write(dir.held_marker(), b"")
        .await
        .map_err(|e| e.to_string())?;
    agent
        .host
        .restore_held(&job.instance, &dir.migration().join("images"))
        .await
        .map_err(|e| e.to_string())
}

async fn thaw_target(agent: &Agent, job: &Job) -> Result<(), String> {
    let dir = agent.host.dir(&job.instance);
    agent
        .host
        .thaw_held(&job.instance)
        .await
        .map_err(|e| e.to_string())?;
    // Later restores of this instance must not come back held.
    write_config(agent, job, false).await?;
    let _ = tokio::fs::remove_file(dir.held_marker()).await;
    let _ = tokio::fs::remove_dir_all(dir.migration()).await;
    Ok(())
}
