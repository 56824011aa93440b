//! A live move the runtime drives itself (a VM: QEMU's disk mirror and
//! migration), in pull mode. The target opens the `Live` control channel;
//! the source sends the instance's live files (a VM's boot files), the
//! target makes its receiving copy (held, listening) and says so, then the
//! source's runtime moves the instance through the relay: every
//! connection it makes to a socket in its relay dir becomes its own
//! stream (`Stream { purpose }`) on the move's QUIC connection, which the
//! target connects to its runtime's socket for that purpose. At the end
//! the source's copy is paused and the target holds everything; the
//! source sends the freeze header and the target proposes Frozen.

use std::path::PathBuf;

use ferry_raft::Job;
use ferry_transport::frame::{read_frame, write_frame, MAX_FRAME};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::net::{UnixListener, UnixStream};

use super::error::{instance_name, MoveError};
use super::{plan, source};
use crate::api::transfer::{FinalHeader, PushAck, TransferPart};
use crate::node::peers::Channel;
use crate::node::Agent;
use crate::transfer::relay::{self, Tap};
use crate::transfer::tree;

/// Target, Preparing: the whole live move; returns the source's note.
pub async fn pull(agent: &Agent, job: &Job) -> Result<Option<String>, MoveError> {
    let (driver, name) = (agent.driver(), &instance_name(job)?);
    let mut channel = source::open(agent, job, job.source, TransferPart::Live).await?;
    let counter = agent.transfers().stage(job.id, "boot files");
    let reserve = agent.reserve();
    let files = driver.live_files(name);
    let writing = tree::Writing::synced(&counter, &reserve);
    let boot = tree::receive_counted(
        &mut channel.0,
        &mut channel.1,
        &files,
        tree::Pass::Whole,
        writing,
    )
    .await?;
    let kept = super::target::receive_kept(agent, job, &mut channel).await?;
    let (send, recv) = &mut channel;
    let spec = super::target::spec(agent, job)?;
    let ready = driver.receive_live(name, &spec, &job.options.live).await;
    let answer = match &ready {
        Ok(()) => PushAck::Received,
        Err(e) => PushAck::Failed(e.to_string()),
    };
    write_frame(send, &answer).await?;
    ready?;
    let (note, paused_ms) = match read_frame::<FinalHeader>(recv, MAX_FRAME).await? {
        FinalHeader::Frozen {
            note, paused_ms, ..
        } => (note, paused_ms),
        FinalHeader::Refused(why) => return Err(MoveError::SourceRefused(why)),
    };
    agent.transfers().froze_for(job.id, paused_ms);
    driver.live_received(name).await?;
    let relayed = agent.transfers().received_so_far(job.id);
    agent
        .transfers()
        .received(job.id, relayed + boot.bytes + kept);
    let _ = send.finish();
    Ok(note)
}

/// Source: serve the target's `Live` channel.
pub async fn serve(agent: &Agent, job: &Job, channel: &mut Channel) -> Result<(), MoveError> {
    let (driver, name) = (agent.driver(), &instance_name(job)?);
    tree::send(
        &mut channel.0,
        &mut channel.1,
        &driver.live_files(name),
        false,
        None,
    )
    .await?;
    source::send_kept(agent, name, channel).await?;
    let (send, recv) = channel;
    match read_frame::<PushAck>(recv, MAX_FRAME).await? {
        PushAck::Received => {}
        PushAck::Failed(why) => {
            return Err(MoveError::TargetFailed {
                target: agent.member_name(job.target).unwrap_or_default(),
                why,
            })
        }
    }
    let _guard = agent.locks().lock(name.as_str()).await;
    relayed(agent, job, send).await
}

/// The source's runtime moves the instance while the relay runs; once it
/// is paused with the target holding its state, the final header goes to
/// the target, and the relay carries on until the runtime has sent the
/// rest (a VM's post-copy pages; nothing otherwise).
async fn relayed(
    agent: &Agent,
    job: &Job,
    header_to: &mut quinn::SendStream,
) -> Result<(), MoveError> {
    let (driver, name) = (agent.driver(), &instance_name(job)?);
    let relay_dir = driver.staging(name).join("relay");
    let listeners = match listen(&relay_dir, driver.live_streams(name)).await {
        Ok(listeners) => listeners,
        Err(e) => {
            let _ = write_frame(header_to, &FinalHeader::Refused(e.to_string())).await;
            return Err(e);
        }
    };
    let job_id = job.id;
    let go_on = move || {
        let current = agent.state().read(|s| s.jobs.get(&job_id).cloned());
        current.as_ref().is_some_and(plan::may_freeze)
    };
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let send = async {
        let moved = driver
            .send_live(name, &relay_dir, &job.options.live, &go_on)
            .await
            .map_err(MoveError::from);
        let header = match &moved {
            Ok(end) => FinalHeader::Frozen {
                note: end.note.clone(),
                paused_ms: end.paused_ms,
                images_bytes: 0,
                pages: None,
            },
            Err(e) => FinalHeader::Refused(e.to_string()),
        };
        let sent = async {
            write_frame(header_to, &header).await?;
            moved?;
            Ok(driver.live_sent(name).await?)
        }
        .await;
        let _ = stop.send(());
        sent
    };
    // A relay that fails drops its connections: the runtime's move fails
    // on them and cleans up (the instance runs on) before `send` ends.
    let (sent, relayed) = tokio::join!(send, relay(agent, job, listeners, stopped));
    let _ = tokio::fs::remove_dir_all(&relay_dir).await;
    relayed?;
    sent
}

async fn listen(
    relay_dir: &std::path::Path,
    purposes: &'static [&'static str],
) -> Result<Vec<(&'static str, UnixListener)>, MoveError> {
    let _ = tokio::fs::remove_dir_all(relay_dir).await;
    tokio::fs::create_dir_all(relay_dir)
        .await
        .map_err(|e| MoveError::Local(format!("cannot create {}: {e}", relay_dir.display())))?;
    let mut listeners = Vec::new();
    for purpose in purposes {
        let path = relay_dir.join(format!("{purpose}.sock"));
        let listener = UnixListener::bind(&path)
            .map_err(|e| MoveError::Local(format!("cannot listen on {}: {e}", path.display())))?;
        listeners.push((*purpose, listener));
    }
    Ok(listeners)
}

/// How long the relay may take to pass on what the runtime wrote before
/// it said it was done.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Accept the runtime's connections on `listeners` and carry each over a
/// stream of its own to the target until `stop`, then let every stream
/// finish: QEMU reports a migration complete once its last bytes are in
/// its socket, not at the target, so cutting the streams then would cut
/// the end of the device state off (the target fails to load it).
async fn relay(
    agent: &Agent,
    job: &Job,
    listeners: Vec<(&'static str, UnixListener)>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), MoveError> {
    let mut accepts = FuturesUnordered::new();
    for (purpose, listener) in &listeners {
        accepts.push(accept(purpose, listener));
    }
    let mut carried = FuturesUnordered::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some((purpose, accepted)) = accepts.next() => {
                let Ok(local) = accepted else {
                    return Err(MoveError::Local(format!("the {purpose} relay stopped accepting")));
                };
                if let Some((_, listener)) = listeners.iter().find(|(p, _)| *p == purpose) {
                    accepts.push(accept(purpose, listener));
                }
                let part = TransferPart::Stream { purpose: purpose.to_string() };
                carried.push(async move {
                    let channel = source::open(agent, job, job.target, part).await?;
                    relay::splice(local, channel, Tap::default(), Tap::default())
                        .await
                        .map(|_| ())
                        .map_err(MoveError::from)
                });
            }
            // A connection that ends, well or not, ends only itself: the
            // runtime sees it end and decides (QEMU fails its migration
            // on a cut stream, and closes its disk's when the mirror is
            // done); cutting the others here would break a good move.
            Some(result) = carried.next() => {
                if let Err(e) = result {
                    tracing::info!(job = job.id, "a relayed stream ended: {e}");
                }
            }
        }
    }
    drop(accepts);
    let drained = tokio::time::timeout(DRAIN, async {
        while let Some(result) = carried.next().await {
            if let Err(e) = result {
                tracing::info!(job = job.id, "a relayed stream ended: {e}");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            job = job.id,
            "relayed streams still open {DRAIN:?} after the runtime was done; cut"
        );
    }
    Ok(())
}

async fn accept(
    purpose: &'static str,
    listener: &UnixListener,
) -> (&'static str, std::io::Result<UnixStream>) {
    (purpose, listener.accept().await.map(|(s, _)| s))
}

/// Target: connect a `Stream` the source opened to the runtime's socket
/// for its purpose, counting what arrives.
pub async fn serve_stream(
    agent: &Agent,
    job: &Job,
    purpose: &str,
    channel: Channel,
) -> Result<(), MoveError> {
    let (driver, name) = (agent.driver(), &instance_name(job)?);
    let Some(purpose) = driver.live_streams(name).iter().find(|p| **p == purpose) else {
        return Err(MoveError::Local(format!(
            "no live stream '{purpose}' for {name}"
        )));
    };
    let path: PathBuf = driver.live_socket(name, purpose);
    let local = connect(&path).await?;
    // Each stream counts under its purpose: a VM's "disk" and "memory".
    let counter = agent.transfers().stage(job.id, purpose);
    let (inbound, _) =
        relay::splice(local, channel, Tap::counted(&counter), Tap::default()).await?;
    let bytes = inbound.bytes;
    let total = agent.transfers().received_so_far(job.id) + bytes;
    agent.transfers().received(job.id, total);
    Ok(())
}

/// Connect to the runtime's socket; while its listen backlog is full (it
/// accepts several streams of one move one by one) try again.
async fn connect(path: &std::path::Path) -> Result<UnixStream, MoveError> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await
            }
            Err(e) => {
                return Err(MoveError::Local(format!(
                    "cannot reach {}: {e}",
                    path.display()
                )))
            }
        }
    }
}
