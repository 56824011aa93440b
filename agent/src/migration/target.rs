//! The target's half of a move: receive the rootfs while the source runs,
//! then the freeze header, images and rootfs delta (pull: it asks; push:
//! it answers the source's channels); restore held stopped after the
//! switch; thaw only once Restored is committed.

use ferry_raft::{InstanceSpec, Job, MoveStats, Phase};
use ferry_transport::frame::{read_frame, write_frame, MAX_FRAME};

use super::engine::{self, Proposal};
use super::error::{instance_name, MoveError};
use super::plan::LocalCopy;
use super::source;
use crate::api::names::InstanceName;
use crate::api::transfer::{FinalHeader, PushAck, RootfsMethod, TransferPart};
use crate::clock::now_ms;
use crate::node::peers::Channel;
use crate::node::Agent;
use crate::transfer::tree;

pub(super) fn spec(agent: &Agent, job: &Job) -> Result<InstanceSpec, MoveError> {
    agent
        .state()
        .read(|s| s.instances.get(&job.instance).map(|i| i.spec.clone()))
        .ok_or_else(|| MoveError::InstanceGone(job.instance.clone()))
}

/// Pull mode: the rootfs while the source runs, then the final state;
/// returns the source's note for the Frozen proposal.
pub async fn pull(agent: &Agent, job: &Job) -> Result<Option<String>, MoveError> {
    let live = agent.driver().moves_itself(&instance_name(job)?);
    let result = match live {
        true => super::live::pull(agent, job).await,
        false => pull_parts(agent, job).await,
    };
    agent.transfers().end(job.id);
    result
}

async fn pull_parts(agent: &Agent, job: &Job) -> Result<Option<String>, MoveError> {
    // Filesystem pre-sync while the instance runs.
    let mut channel = source::open(agent, job, job.source, TransferPart::Rootfs).await?;
    let bytes = receive_rootfs(agent, job, &mut channel).await?;
    let _ = channel.0.finish();
    // Final: the source freezes and dumps; images and rootfs delta follow.
    agent.transfers().froze(job.id);
    let mut channel = source::open(agent, job, job.source, TransferPart::Final).await?;
    let result = receive_final(agent, job, &mut channel, bytes).await;
    let _ = channel.0.finish();
    result
}

/// Either mode: the source's freeze header, the memory images and the
/// rootfs delta, then the runtime config; returns the source's note.
async fn receive_final(
    agent: &Agent,
    job: &Job,
    channel: &mut Channel,
    rootfs_bytes: u64,
) -> Result<Option<String>, MoveError> {
    let (send, recv) = (&mut channel.0, &mut channel.1);
    let (driver, name) = (agent.driver(), &instance_name(job)?);
    let reserve = agent.reserve();
    // The source's page stream is taken only while this runs.
    let _pass = agent.transfers().final_pass(job.id);
    let (note, images_bytes, pages) = match read_frame::<FinalHeader>(recv, MAX_FRAME).await? {
        FinalHeader::Frozen {
            note,
            images_bytes,
            pages,
            ..
        } => (note, images_bytes, pages),
        FinalHeader::Refused(why) => return Err(MoveError::SourceRefused(why)),
    };
    let mut bytes = rootfs_bytes;
    // Unsynced, both: nothing committed depends on the images surviving
    // this host, and the rootfs is synced before Done (`finish`).
    if job.options.stateful {
        // Streamed pages are in the images staged for them already.
        let images = match &pages {
            Some(sent) => {
                bytes += super::pages::received(agent, job, sent).await?;
                driver.images(name)
            }
            None => driver.stage_images(name, images_bytes).await?,
        };
        let counter = agent.transfers().stage(job.id, "memory images");
        let writing = tree::Writing::unsynced(&counter, &reserve);
        bytes += tree::receive_counted(send, recv, &images, tree::Pass::Whole, writing)
            .await?
            .bytes;
    }
    let counter = agent.transfers().stage(job.id, "rootfs delta");
    let started = std::time::Instant::now();
    let (delta, method) = super::method::receive_changes(agent, job, channel, &counter).await?;
    bytes += delta;
    let note = with_rootfs_pass(note, method, started.elapsed());
    driver
        .configure(name, &spec(agent, job)?, job.options.stateful)
        .await?;
    agent.transfers().received(job.id, bytes);
    Ok(note)
}

/// The rootfs and the kept files, while the instance runs; their bytes.
/// The rootfs pass is kept for the final pass only once all of it arrived.
async fn receive_rootfs(agent: &Agent, job: &Job, channel: &mut Channel) -> Result<u64, MoveError> {
    // Layered: the image first (if wanted), then rootfs means its changes.
    let image_bytes = super::image::receive(agent, job, channel).await?;
    let counter = agent.transfers().stage(job.id, "rootfs");
    let _ = agent.transfers().take_rootfs_pass(job.id);
    let _ = agent.transfers().take_btrfs_pass(job.id);
    let bytes = super::method::receive_first(agent, job, channel, &counter).await?;
    Ok(image_bytes + bytes + receive_kept(agent, job, channel).await?)
}

/// The job's note, with how long the final rootfs pass took (inside the
/// frozen window: what an operator reads when the downtime is long) and
/// how, when btrfs carried the rootfs. `bench-move` reads it back.
fn with_rootfs_pass(
    note: Option<String>,
    method: RootfsMethod,
    took: std::time::Duration,
) -> Option<String> {
    let ms = took.as_millis();
    let said = match method {
        RootfsMethod::BtrfsSend => {
            format!("rootfs moved by btrfs send/receive, final pass in {ms} ms")
        }
        RootfsMethod::Entries => format!("final rootfs pass in {ms} ms"),
    };
    Some(match note {
        Some(note) => format!("{note}; {said}"),
        None => said,
    })
}

/// After the rootfs, on its channel: the files that move with the
/// instance besides it (its snapshots), if its driver keeps any.
pub(super) async fn receive_kept(
    agent: &Agent,
    job: &Job,
    channel: &mut Channel,
) -> Result<u64, MoveError> {
    let Some(dir) = agent.driver().kept_files(&instance_name(job)?) else {
        return Ok(0);
    };
    let counter = agent.transfers().stage(job.id, "snapshots");
    let reserve = agent.reserve();
    let (send, recv) = channel;
    let writing = tree::Writing::synced(&counter, &reserve);
    let kept = tree::receive_counted(send, recv, &dir, tree::Pass::Whole, writing).await?;
    Ok(kept.bytes)
}

/// Push mode: take a part the source sends and acknowledge it; with the
/// final part, propose Frozen before the acknowledgement.
pub async fn serve_push(
    agent: &Agent,
    job: &Job,
    part: TransferPart,
    channel: &mut Channel,
) -> Result<(), MoveError> {
    let name = instance_name(job)?;
    let _guard = agent.locks().lock(name.as_str()).await;
    let received = if matches!(part, TransferPart::PushRootfs) {
        receive_rootfs(agent, job, channel)
            .await
            .map(|bytes| agent.transfers().received(job.id, bytes))
    } else {
        agent.transfers().froze(job.id);
        let rootfs_bytes = agent.transfers().received_so_far(job.id);
        let received = receive_final(agent, job, channel, rootfs_bytes).await;
        agent.transfers().end(job.id);
        match received {
            Ok(note) => {
                let frozen = Proposal {
                    note,
                    ..Proposal::to(Phase::Frozen)
                };
                if engine::advance(agent, job, frozen).await {
                    Ok(())
                } else {
                    Err(MoveError::NotRecorded)
                }
            }
            Err(e) => Err(e),
        }
    };
    if received
        .as_ref()
        .is_err_and(|e| !matches!(e, MoveError::NotRecorded))
    {
        // A failed receive: what arrived goes now (see engine::act).
        engine::discard(agent, job, &name).await;
    }
    let ack = match &received {
        Ok(()) => PushAck::Received,
        Err(e) => PushAck::Failed(e.to_string()),
    };
    write_frame(&mut channel.0, &ack).await?;
    received
}

/// Switched: restore held stopped (unless a held copy is here already),
/// then Restored; a failed restore switches back.
pub async fn restore(agent: &Agent, job: &Job, name: &InstanceName, local: LocalCopy) -> Proposal {
    let started = std::time::Instant::now();
    let result = if !job.options.stateful || local == LocalCopy::Frozen {
        Ok(())
    } else {
        match spec(agent, job) {
            Ok(spec) if super::lazy::moves_lazily(agent, job, name) => {
                super::lazy::restore(agent, job, name, &spec).await
            }
            Ok(spec) => agent
                .driver()
                .restore_held(name, &spec)
                .await
                .map_err(MoveError::from),
            Err(e) => Err(e),
        }
    };
    tracing::debug!(job = job.id, restored = ?started.elapsed(), "held restore");
    match result {
        Ok(()) => Proposal::to(Phase::Restored),
        Err(e) => {
            let _ = agent.driver().remove(name).await;
            Proposal::failed(
                Phase::SwitchingBack,
                format!("restore on the target failed: {e}"),
            )
        }
    }
}

/// Restored: thaw the held copy (stateful) or start it (stateless, if it
/// was running), then Done with the move's figures. A failed thaw is
/// retried: Restored is committed, the instance is ours and held.
pub async fn finish(agent: &Agent, job: &Job, name: &InstanceName) -> Option<Proposal> {
    let result = async {
        let spec = spec(agent, job)?;
        let started = std::time::Instant::now();
        if job.options.stateful {
            agent.driver().release_held(name, &spec).await?;
        } else if job.was_running {
            agent.driver().configure(name, &spec, false).await?;
            agent.driver().start(name).await?;
        }
        agent.transfers().thawed(job.id);
        tracing::debug!(job = job.id, released = ?started.elapsed(), "the copy runs");
        // The final pass was written unsynced; Done lets the source
        // delete its copy, so this one must be on disk first.
        let rootfs = agent.driver().rootfs(name);
        if rootfs.exists() {
            tree::sync(&rootfs).await?;
        }
        Ok::<(), MoveError>(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(job = job.id, "thaw failed: {e}");
        return None;
    }
    Some(done_once_paged(agent, job, name).await)
}

/// [`done`], for a lazy move only once every page came; else its copy
/// is killed at once (it ran on memory it lacked) and Done says so.
pub async fn done_once_paged(agent: &Agent, job: &Job, name: &InstanceName) -> Proposal {
    if super::lazy::moves_lazily(agent, job, name) {
        match super::lazy::fetched(agent, job).await {
            Ok(bytes) => agent.transfers().count_lazy_pages(job.id, bytes),
            Err(why) => return lazy_failed(agent, job, name, &why).await,
        }
    }
    done(agent, job)
}

async fn lazy_failed(agent: &Agent, job: &Job, name: &InstanceName, why: &str) -> Proposal {
    tracing::error!(job = job.id, "lazy page fetch failed after the thaw: {why}");
    if let Err(e) = agent.driver().stop(name, true).await {
        tracing::error!(job = job.id, "cannot kill the copy that lacks pages: {e}");
    }
    let target = agent.member_name(job.target).unwrap_or_default();
    Proposal {
        error: Some(super::lazy::failed_after_running(&target, why)),
        ..done(agent, job)
    }
}

/// `Done` with the move's figures; proposed again, with the same figures,
/// for as long as it does not commit.
pub fn done(agent: &Agent, job: &Job) -> Proposal {
    let now = now_ms();
    let (downtime_ms, bytes) = agent.transfers().figures(job.id, now);
    let stats = MoveStats {
        downtime_ms,
        total_ms: now.saturating_sub(job.created_ms),
        bytes,
        iterations: 0,
    };
    Proposal {
        stats: Some(stats),
        ..Proposal::to(Phase::Done)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_note_says_how_long_the_final_rootfs_pass_took_and_how() {
        let took = Duration::from_millis(12);
        let btrfs = with_rootfs_pass(None, RootfsMethod::BtrfsSend, took);
        assert_eq!(
            btrfs.as_deref(),
            Some("rootfs moved by btrfs send/receive, final pass in 12 ms")
        );
        let entries = with_rootfs_pass(Some("x".into()), RootfsMethod::Entries, took);
        // bench-move reads the time back after "pass in ".
        assert_eq!(entries.as_deref(), Some("x; final rootfs pass in 12 ms"));
    }
}
