//! How a move's rootfs passes travel, agreed before each pass on its
//! channel (LXD's migration header): the source offers what it can send,
//! best first, and the target answers with the first it can take. btrfs
//! send/receive when the instance's rootfs is a subvolume the source could
//! snapshot and the target's data dir is on btrfs (`transfer::btrfs`);
//! the entry stream (`transfer::tree`) otherwise. A final pass goes by
//! btrfs only when both sides still hold that job's first btrfs pass
//! (source: its snapshot; target: the subvolume it received), so a side
//! that restarted in between gets the whole tree as entries instead.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use ferry_raft::Job;
use ferry_transport::frame::{read_frame, write_frame, MAX_FRAME};

use super::error::{instance_name, MoveError};
use crate::api::transfer::{RootfsMethod, RootfsOffer};
use crate::node::peers::Channel;
use crate::node::Agent;
use crate::transfer::{btrfs, tree};

/// Snapshot (source) and received subvolume (target) names of a job's
/// first and final pass; the received one is named by the sent one.
const FIRST: &str = "first";
const FINAL: &str = "final";

/// How long the source waits for the target's choice.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Source, first pass while the instance runs.
pub(super) async fn send_first(
    agent: &Agent,
    job: &Job,
    channel: &mut Channel,
) -> Result<(), MoveError> {
    let (rootfs, work) = paths(agent, job)?;
    let snapshot = snapshot_for_send(&rootfs, &work, FIRST).await;
    if ask(agent, job, channel, snapshot.is_some()).await? == RootfsMethod::BtrfsSend {
        if let Some(snapshot) = snapshot {
            btrfs::send(&snapshot, None, &mut channel.0).await?;
            agent.transfers().remember_btrfs_pass(job.id);
            return Ok(());
        }
    }
    if let Some(snapshot) = snapshot {
        let _ = btrfs::remove(&snapshot).await;
    }
    let (_, stamps) = tree::send(&mut channel.0, &mut channel.1, &rootfs, false, None).await?;
    agent.transfers().remember_stamps(job.id, stamps);
    Ok(())
}

/// Source, final pass while frozen: what changed since the first.
pub(super) async fn send_changes(
    agent: &Agent,
    job: &Job,
    channel: &mut Channel,
) -> Result<(), MoveError> {
    let (rootfs, work) = paths(agent, job)?;
    let stamps = agent.transfers().take_stamps(job.id);
    let first = agent.transfers().take_btrfs_pass(job.id) && btrfs::is_subvolume(&work.join(FIRST));
    let snapshot = match first {
        true => snapshot_for_send(&rootfs, &work, FINAL).await,
        false => None,
    };
    if ask(agent, job, channel, snapshot.is_some()).await? == RootfsMethod::BtrfsSend {
        if let Some(snapshot) = snapshot {
            btrfs::send(&snapshot, Some(&work.join(FIRST)), &mut channel.0).await?;
            return Ok(());
        }
    }
    tree::send(
        &mut channel.0,
        &mut channel.1,
        &rootfs,
        true,
        stamps.as_ref(),
    )
    .await?;
    Ok(())
}

/// Target, first pass; its bytes.
pub(super) async fn receive_first(
    agent: &Agent,
    job: &Job,
    channel: &mut Channel,
    counter: &AtomicU64,
) -> Result<u64, MoveError> {
    let (rootfs, work) = paths(agent, job)?;
    // The work area and the rootfs both on btrfs: the rootfs becomes a
    // snapshot of what the work area received (one filesystem assumed:
    // the data dir's).
    let parent = rootfs.parent().unwrap_or(&rootfs);
    let can = btrfs::usable(&work).await && btrfs::usable(parent).await;
    let offered = answer(channel, can).await?;
    let reserve = agent.reserve();
    let (send, recv) = channel;
    if offered == RootfsMethod::BtrfsSend {
        let bytes = receive_subvolume(&work, FIRST, recv, counter, &reserve).await?;
        lay_rootfs(&work.join(FIRST), &rootfs).await?;
        agent.transfers().remember_btrfs_pass(job.id);
        return Ok(bytes);
    }
    // What an earlier attempt left (a restart of either side) goes first:
    // the final pass deletes only what this pass sent. A rootfs that can
    // be a subvolume becomes one, so a later move can go by btrfs (a
    // flat one: a layered instance's rootfs is its overlay's upper dir).
    let flat = super::target::spec(agent, job)?.image.is_none();
    if flat && !btrfs::is_subvolume(&rootfs) && btrfs::usable(&rootfs).await {
        btrfs::remove(&rootfs).await?;
        btrfs::make_root(&rootfs).await?;
    }
    tree::clear(&rootfs).await?;
    let writing = tree::Writing::synced(counter, &reserve);
    let full = tree::receive_counted(send, recv, &rootfs, tree::Pass::Whole, writing).await?;
    agent.transfers().remember_rootfs_pass(job.id, full.pass);
    Ok(full.bytes)
}

/// Target, final pass, written unsynced (the rootfs is synced before
/// Done); the bytes and the method it went by.
pub(super) async fn receive_changes(
    agent: &Agent,
    job: &Job,
    channel: &mut Channel,
    counter: &AtomicU64,
) -> Result<(u64, RootfsMethod), MoveError> {
    let (rootfs, work) = paths(agent, job)?;
    let holds = agent.transfers().take_rootfs_pass(job.id);
    let first = agent.transfers().take_btrfs_pass(job.id) && btrfs::is_subvolume(&work.join(FIRST));
    let offered = answer(channel, first).await?;
    let reserve = agent.reserve();
    let (send, recv) = channel;
    if offered == RootfsMethod::BtrfsSend {
        let bytes = receive_subvolume(&work, FINAL, recv, counter, &reserve).await?;
        lay_rootfs(&work.join(FINAL), &rootfs).await?;
        return Ok((bytes, offered));
    }
    let writing = tree::Writing::unsynced(counter, &reserve);
    let pass = tree::Pass::Changes { holds };
    let received = tree::receive_counted(send, recv, &rootfs, pass, writing).await?;
    Ok((received.bytes, offered))
}

/// Remove what ended moves left in the btrfs work area (snapshots,
/// received subvolumes): every job directory whose job is over or gone.
pub async fn sweep(agent: &Agent) {
    let root = agent.data_dir().btrfs_moves();
    let Ok(mut entries) = tokio::fs::read_dir(&root).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let job = entry.file_name().to_str().and_then(|n| n.parse().ok());
        let active = job.is_some_and(|id: ferry_raft::JobId| {
            agent
                .state()
                .read(|s| s.jobs.get(&id).is_some_and(|j| !j.phase.is_terminal()))
        });
        if active {
            continue;
        }
        if let Err(e) = btrfs::remove_all_below(&entry.path()).await {
            tracing::warn!("cannot remove {}: {e}", entry.path().display());
        }
    }
}

fn work_dir(agent: &Agent, job: &Job) -> PathBuf {
    agent.data_dir().btrfs_moves().join(job.id.to_string())
}

/// The instance's rootfs and the job's btrfs work area.
fn paths(agent: &Agent, job: &Job) -> Result<(PathBuf, PathBuf), MoveError> {
    let rootfs = agent.driver().rootfs(&instance_name(job)?);
    Ok((rootfs, work_dir(agent, job)))
}

/// A read-only snapshot of `rootfs` at `work/name` for a send, if
/// `rootfs` is a subvolume holding no other (a snapshot would leave their
/// files out; checked again at the final pass, while frozen) and the
/// snapshot could be made.
async fn snapshot_for_send(rootfs: &Path, work: &Path, name: &str) -> Option<PathBuf> {
    if !btrfs::is_subvolume(rootfs) || !btrfs::tools_present().await {
        return None;
    }
    match btrfs::holds_subvolumes(rootfs).await {
        Ok(false) => {}
        Ok(true) => {
            tracing::info!("{} holds subvolumes: sent as entries", rootfs.display());
            return None;
        }
        Err(e) => {
            tracing::warn!("no btrfs send of {}: {e}", rootfs.display());
            return None;
        }
    }
    let snapshot = work.join(name);
    let made = async {
        btrfs::remove(&snapshot).await?;
        tokio::fs::create_dir_all(work)
            .await
            .map_err(|e| MoveError::Local(format!("cannot create {}: {e}", work.display())))?;
        btrfs::snapshot(rootfs, &snapshot, true).await?;
        Ok::<(), MoveError>(())
    };
    match made.await {
        Ok(()) => Some(snapshot),
        Err(e) => {
            tracing::warn!("no btrfs send of {}: {e}", rootfs.display());
            None
        }
    }
}

/// Source: offer the methods (btrfs first when `btrfs`), read the
/// target's choice.
async fn ask(
    agent: &Agent,
    job: &Job,
    (send, recv): &mut Channel,
    btrfs: bool,
) -> Result<RootfsMethod, MoveError> {
    let methods = match btrfs {
        true => vec![RootfsMethod::BtrfsSend, RootfsMethod::Entries],
        false => vec![RootfsMethod::Entries],
    };
    let offered = methods.clone();
    write_frame(send, &RootfsOffer { methods }).await?;
    let target = agent.member_name(job.target).unwrap_or_default();
    let choice = tokio::time::timeout(ANSWER_TIMEOUT, read_frame::<RootfsMethod>(recv, MAX_FRAME))
        .await
        .map_err(|_| {
            MoveError::Local(format!(
                "{target} did not choose a rootfs method within {ANSWER_TIMEOUT:?}"
            ))
        })?
        .map_err(|source| MoveError::NoAnswer {
            target: target.clone(),
            source,
        })?;
    if !offered.contains(&choice) {
        return Err(MoveError::TargetFailed {
            target,
            why: format!("it chose rootfs method {choice:?}, which was not offered"),
        });
    }
    Ok(choice)
}

/// Target: read the offer and answer with [`choose`]'s method.
async fn answer((send, recv): &mut Channel, can_btrfs: bool) -> Result<RootfsMethod, MoveError> {
    let offer = read_frame::<RootfsOffer>(recv, MAX_FRAME).await?;
    let choice = choose(&offer, can_btrfs);
    write_frame(send, &choice).await?;
    Ok(choice)
}

/// The method a pass goes by: btrfs only when the source offered it and
/// the target can take it (first pass: its data dir is on btrfs; final
/// pass: it still holds the subvolume the first pass received, which the
/// incremental stream is applied to); the entry stream otherwise.
fn choose(offer: &RootfsOffer, target_can_btrfs: bool) -> RootfsMethod {
    match offer.methods.contains(&RootfsMethod::BtrfsSend) && target_can_btrfs {
        true => RootfsMethod::BtrfsSend,
        false => RootfsMethod::Entries,
    }
}

/// Receive a subvolume the sender named `name` into `work`, replacing
/// one an earlier attempt left; its bytes.
async fn receive_subvolume(
    work: &Path,
    name: &str,
    recv: &mut quinn::RecvStream,
    counter: &AtomicU64,
    reserve: &crate::transfer::space::Reserve,
) -> Result<u64, MoveError> {
    let received = work.join(name);
    btrfs::remove(&received).await?;
    let bytes = btrfs::receive(work, recv, counter, reserve).await;
    if bytes.is_err() || !btrfs::is_subvolume(&received) {
        let _ = btrfs::remove(&received).await;
    }
    let bytes = bytes?;
    if !btrfs::is_subvolume(&received) {
        return Err(MoveError::Local(format!(
            "the btrfs stream did not hold the snapshot '{name}' it was sent for"
        )));
    }
    Ok(bytes)
}

/// Make the instance's rootfs a writable snapshot of `received`.
async fn lay_rootfs(received: &Path, rootfs: &Path) -> Result<(), MoveError> {
    btrfs::remove(rootfs).await?;
    if let Some(parent) = rootfs.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| MoveError::Local(format!("cannot create {}: {e}", parent.display())))?;
    }
    btrfs::snapshot(received, rootfs, false).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn btrfs_only_when_offered_and_the_target_can_take_it() {
        let both = RootfsOffer {
            methods: vec![RootfsMethod::BtrfsSend, RootfsMethod::Entries],
        };
        let entries = RootfsOffer {
            methods: vec![RootfsMethod::Entries],
        };
        assert_eq!(choose(&both, true), RootfsMethod::BtrfsSend);
        // A target without the first pass's subvolume (or off btrfs).
        assert_eq!(choose(&both, false), RootfsMethod::Entries);
        // A source without the first pass's snapshot offers entries only.
        assert_eq!(choose(&entries, true), RootfsMethod::Entries);
    }
}
