//! The source's half of a move: the compatibility check, freezing (pause +
//! final dump, never a kill), sending the final state (pull: on the
//! target's request; push: on its own), and rolling back.

use ferry_raft::{Command, InstanceCommand, Job, ObservedState, Phase};
use ferry_transport::frame::{read_frame, write_frame, MAX_FRAME};

use super::compat;
use super::engine::Proposal;
use super::error::{instance_name, MoveError};
use super::plan::{self, LocalCopy};
use crate::api::names::InstanceName;
use crate::api::transfer::{FinalHeader, PageStream, PushAck, TransferPart};
use crate::driver::RunState;
use crate::node::peers::Channel;
use crate::node::{commit, Agent};
use crate::transfer::tree;

/// A transfer channel's first frame must arrive within this.
pub const CHANNEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A channel of `job` to member `peer`, its first frame asking for `part`
/// (in relay mode, through the relay).
pub async fn open(
    agent: &Agent,
    job: &Job,
    peer: ferry_raft::NodeId,
    part: TransferPart,
) -> Result<Channel, MoveError> {
    let (to, request) = super::relay::route(job, peer, part);
    let peer = agent.peer(to).map_err(MoveError::Channel)?;
    agent
        .open_channel(&peer, &request, CHANNEL_TIMEOUT)
        .await
        .map_err(MoveError::Channel)
}

/// Checking: the report from the replicated facts; Preparing if it
/// passes, else RollingBack naming every failed check.
pub async fn run_checks(agent: &Agent, job: &Job, name: &InstanceName) -> Proposal {
    let rootfs = agent.driver().rootfs(name);
    let rootfs_bytes = tokio::task::spawn_blocking(move || tree::size_of(&rootfs))
        .await
        .unwrap_or(0);
    let disk = disk_needed(agent, job, rootfs_bytes);
    let room = agent
        .gossip()
        .load(job.target)
        .filter(|(_, age)| *age < FRESH_LOAD)
        .map(|(load, _)| load.disk_room_bytes);
    let report = agent.state().read(|s| {
        compat::report(
            s,
            &job.instance,
            job.target,
            job.options.stateful,
            disk,
            room,
        )
    });
    let mut report = report.unwrap_or_else(|e| {
        vec![ferry_raft::CheckResult {
            check: "facts".into(),
            ok: false,
            detail: e.message,
        }]
    });
    let kind = agent
        .state()
        .read(|s| s.instances.get(&job.instance).map(|i| i.kind));
    let unavailable = agent.driver().lazy_unavailable(name);
    report.extend(super::lazy::check(kind, &job.options, unavailable));
    let mut proposal = if compat::passed(&report) {
        Proposal::to(Phase::Preparing)
    } else {
        let failed: Vec<String> = report
            .iter()
            .filter(|r| !r.ok)
            .map(|r| format!("{}: {}", r.check, r.detail))
            .collect();
        let why = format!("compatibility check failed: {}", failed.join("; "));
        Proposal::failed(Phase::RollingBack, why)
    };
    proposal.report = Some(report);
    proposal
}

/// Gossip figures older than this do not count as the target's free disk.
const FRESH_LOAD: std::time::Duration = std::time::Duration::from_secs(30);
/// Room a move keeps free beyond what it sends (directories, configs,
/// logs, CRIU work files).
const DISK_MARGIN: u64 = 64 << 20;

/// What the move writes on the target: the rootfs, the memory images (at
/// most the memory limit, when one is set) and a margin.
fn disk_needed(agent: &Agent, job: &Job, rootfs_bytes: u64) -> u64 {
    let images = match job.options.stateful {
        true => agent
            .state()
            .read(|s| {
                s.instances
                    .get(&job.instance)
                    .and_then(|i| i.spec.memory_bytes)
            })
            .unwrap_or(0),
        false => 0,
    };
    rootfs_bytes
        .saturating_add(images)
        .saturating_add(DISK_MARGIN)
}

/// The source's copy frozen for the final pass: the note for the job
/// and, when the dump streamed them, what it sent of the memory pages.
struct Frozen {
    note: Option<String>,
    pages: Option<PageStream>,
}

/// Pause and dump (stateful) or stop (stateless), only while the job still
/// allows it. Called with the instance's host lock held.
async fn freeze(agent: &Agent, job: &Job) -> Result<Frozen, MoveError> {
    let name = &instance_name(job)?;
    let driver = agent.driver();
    // Re-read: the freeze is allowed only while we still own the instance
    // and nobody asked to roll back.
    let current = agent.state().read(|s| s.jobs.get(&job.id).cloned());
    if !current.as_ref().is_some_and(plan::may_freeze) {
        return Err(MoveError::NoLongerFreezable);
    }
    if !job.options.stateful {
        driver.stop(name, false).await?;
        return Ok(Frozen {
            note: None,
            pages: None,
        });
    }
    let note = Some(precopy_note(agent, name).await);
    // Frozen unless the runtime says for sure it is paused already (a
    // retried final pass): a status that cannot be read must not let a
    // running copy be dumped and go on running.
    let state = driver.status(name).await?.map(|s| s.state);
    let started = std::time::Instant::now();
    if state != Some(RunState::Paused) {
        driver.freeze(name).await?;
    }
    let frozen = started.elapsed();
    let streamed = driver
        .memory_in_use(name)
        .filter(|bytes| worth_streaming(driver.streams_pages(name), *bytes));
    let dumped = match streamed {
        _ if super::lazy::moves_lazily(agent, job, name) => {
            super::lazy::dump(agent, job, name).await.map(|()| None)
        }
        Some(bytes) => super::pages::dump_streaming(agent, job, name, bytes)
            .await
            .map(Some),
        None => driver
            .dump_frozen(name, None)
            .await
            .map(|_| None)
            .map_err(MoveError::from),
    };
    let pages = match dumped {
        Ok(pages) => pages,
        Err(e) => {
            // Nothing left this host that the target may run: the
            // instance may run on.
            let _ = driver.thaw(name).await;
            return Err(e);
        }
    };
    tracing::debug!(job = job.id, ?frozen, dumped = ?started.elapsed(), "frozen and dumped");
    Ok(Frozen { note, pages })
}

/// Memory below which the pages go as files after the dump: the page
/// server's start and the stream's setup cost more than sending a few
/// MiB of files (bench-move: a 2 MiB container's dump took 400 ms
/// streamed against 330 ms dumped and sent).
const STREAM_FROM: u64 = 16 << 20;

/// Whether a final dump streams its pages (else it writes files, sent
/// after it): when the runtime can and knows how much memory the
/// instance has (the target checks its room for it first), enough of it
/// to be worth a stream.
fn worth_streaming(runtime_can: bool, memory_bytes: u64) -> bool {
    runtime_can && memory_bytes >= STREAM_FROM
}

/// Pre-copy needs the host to track dirty memory; say what happened.
async fn precopy_note(agent: &Agent, name: &InstanceName) -> String {
    match agent.driver().precopy_unavailable(name).await {
        Some(why) => format!("pre-copy unavailable: {why}; went straight to the final dump"),
        None => "pre-copy not implemented yet; went straight to the final dump".into(),
    }
}

/// The freeze header, then (stateful) the images, then the rootfs delta.
async fn send_final(
    agent: &Agent,
    job: &Job,
    channel: &mut Channel,
    frozen: Frozen,
) -> Result<(), MoveError> {
    let (send, recv) = (&mut channel.0, &mut channel.1);
    let (driver, name) = (agent.driver(), &instance_name(job)?);
    let images = driver.images(name);
    let images_bytes = match job.options.stateful {
        true => {
            let dir = images.clone();
            tokio::task::spawn_blocking(move || tree::size_of(&dir))
                .await
                .unwrap_or(0)
        }
        false => 0,
    };
    let header = FinalHeader::Frozen {
        note: frozen.note,
        paused_ms: 0,
        images_bytes,
        pages: frozen.pages,
    };
    write_frame(send, &header).await?;
    let started = std::time::Instant::now();
    if job.options.stateful {
        tree::send(send, recv, &images, false, None).await?;
    }
    let images_sent = started.elapsed();
    super::method::send_changes(agent, job, channel).await?;
    tracing::debug!(job = job.id, ?images_sent, rootfs_delta_sent = ?started.elapsed(), "final state sent");
    Ok(())
}

/// Freeze, then send the final state on `channel`; a refusal is sent as
/// such, so the target stops waiting.
async fn freeze_and_send(agent: &Agent, job: &Job, channel: &mut Channel) -> Result<(), MoveError> {
    match freeze(agent, job).await {
        Ok(frozen) => send_final(agent, job, channel, frozen).await,
        Err(why) => {
            let _ = write_frame(&mut channel.0, &FinalHeader::Refused(why.to_string())).await;
            Err(why)
        }
    }
}

/// Pull mode: serve the target's `Rootfs` or `Final` channel.
pub async fn serve(
    agent: &Agent,
    job: &Job,
    part: TransferPart,
    channel: &mut Channel,
) -> Result<(), MoveError> {
    let name = instance_name(job)?;
    match part {
        TransferPart::Live => super::live::serve(agent, job, channel).await,
        TransferPart::Rootfs => {
            super::image::send(agent, job, channel).await?;
            super::method::send_first(agent, job, channel).await?;
            send_kept(agent, &name, channel).await
        }
        _ => {
            let _guard = agent.locks().lock(name.as_str()).await;
            freeze_and_send(agent, job, channel).await
        }
    }
}

/// Push mode: send the rootfs while running, freeze, send the rest; the
/// target records Frozen once it holds everything.
pub async fn push(agent: &Agent, job: &Job) -> Result<(), MoveError> {
    let target_name = agent
        .member_name(job.target)
        .ok_or(MoveError::NotAMember(job.target))?;
    let mut channel = open(agent, job, job.target, TransferPart::PushRootfs).await?;
    super::image::send(agent, job, &mut channel).await?;
    super::method::send_first(agent, job, &mut channel).await?;
    send_kept(agent, &instance_name(job)?, &mut channel).await?;
    let _ = channel.0.finish();
    pushed(&mut channel.1, &target_name).await?;
    let mut channel = open(agent, job, job.target, TransferPart::PushFinal).await?;
    freeze_and_send(agent, job, &mut channel).await?;
    let _ = channel.0.finish();
    pushed(&mut channel.1, &target_name).await
}

/// After the rootfs, on its channel: the files that move with the
/// instance besides it (its snapshots), if its driver keeps any.
pub(super) async fn send_kept(
    agent: &Agent,
    name: &InstanceName,
    channel: &mut Channel,
) -> Result<(), MoveError> {
    let Some(dir) = agent.driver().kept_files(name) else {
        return Ok(());
    };
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| MoveError::Local(format!("cannot create {}: {e}", dir.display())))?;
    tree::send(&mut channel.0, &mut channel.1, &dir, false, None).await?;
    Ok(())
}

async fn pushed(recv: &mut quinn::RecvStream, target: &str) -> Result<(), MoveError> {
    match read_frame::<PushAck>(recv, MAX_FRAME).await {
        Ok(PushAck::Received) => Ok(()),
        Ok(PushAck::Failed(why)) => Err(MoveError::TargetFailed {
            target: target.to_string(),
            why,
        }),
        Err(source) => Err(MoveError::NoAnswer {
            target: target.to_string(),
            source,
        }),
    }
}

/// Rolling back with a frozen copy: thaw it. A copy that cannot thaw is
/// ended without running again and its final dump becomes its checkpoint,
/// recorded before the rollback commits, so the owner's reconciler
/// restores it from there (DESIGN rule 4, as `ferry start` would). `None`
/// (try again) while that record does not commit.
pub async fn thaw(agent: &Agent, job: &Job, name: &InstanceName) -> Option<Proposal> {
    super::lazy::end_dump(agent, job);
    let driver = agent.driver();
    let Err(e) = driver.thaw(name).await else {
        return Some(Proposal::to(Phase::RolledBack));
    };
    tracing::warn!(instance = %name, "the source could not thaw: {e}");
    if let Err(kept) = driver.keep_final_dump(name).await {
        return Some(Proposal::failed(
            Phase::RolledBack,
            format!("the source could not thaw ({e}) nor keep its final dump ({kept}); the instance stays paused: 'ferry delete --force' or fix the host and 'ferry start'"),
        ));
    }
    record_kept_dump(agent, name).await.ok()?;
    Some(Proposal::failed(
        Phase::RolledBack,
        format!("the source could not thaw ({e}); it is restored from its final dump instead"),
    ))
}

/// Tell the cluster the instance is stopped with a checkpoint (its final
/// dump), before the rollback commits: otherwise the reconciler would
/// start it afresh.
async fn record_kept_dump(agent: &Agent, name: &InstanceName) -> Result<(), ()> {
    let epoch = agent
        .state()
        .read(|s| s.instances.get(name.as_str()).map(|i| i.epoch))
        .ok_or(())?;
    let observe = InstanceCommand::Observe {
        name: name.to_string(),
        node: agent.id(),
        epoch,
        observed: ObservedState::Stopped,
        detail: Some("could not thaw after a rollback; restored from its final dump".into()),
        checkpointed: true,
    };
    commit(agent, Command::Instance(observe))
        .await
        .map(|_| ())
        .map_err(|e| {
            tracing::warn!(instance = %name, "kept final dump not recorded yet: {e}");
        })
}

/// Rolling back with nothing to thaw: a stateless move of a running
/// instance starts it again. A final dump kept after a failed thaw whose
/// record did not commit is recorded first.
pub async fn finish_rollback(
    agent: &Agent,
    job: &Job,
    name: &InstanceName,
    local: LocalCopy,
) -> Option<Proposal> {
    let recorded = agent.state().read(|s| {
        s.instances
            .get(name.as_str())
            .is_some_and(|i| i.checkpointed)
    });
    if job.options.stateful && agent.driver().has_checkpoint(name) && !recorded {
        record_kept_dump(agent, name).await.ok()?;
    }
    if !job.options.stateful && job.was_running && local != LocalCopy::Running {
        if let Err(e) = agent.driver().start(name).await {
            tracing::warn!(job = job.id, "restart after rollback failed: {e}");
        }
    }
    Some(Proposal::to(Phase::RolledBack))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_stream_only_from_a_runtime_that_can_and_for_enough_memory() {
        assert!(worth_streaming(true, 64 << 20));
        assert!(!worth_streaming(false, 64 << 20));
        assert!(!worth_streaming(true, 2 << 20));
    }
}
