//! Relay mode (`ferry move --mode relay`): a source and a target that
//! cannot reach each other move through a third member, the agent the
//! operator's command went to. Each side opens its transfer channels to
//! that relay (`Request::Relay`), which opens each one on to the other
//! side as the `Request::Transfer` it carries and copies the bytes both
//! ways untouched, so every check of a part (sizes, checksums, the freeze
//! header) stays between source and target. The relay answers only the
//! job's own participants, only for a job that names it, and only toward
//! the other participant.

use ferry_raft::{Job, NodeId};
use quinn::{RecvStream, SendStream, VarInt};

use super::source::CHANNEL_TIMEOUT;
use crate::api::transfer::{RelayRequest, TransferPart, TransferRequest};
use crate::api::Request;
use crate::node::peers::{Channel, PeerError};
use crate::node::Agent;

/// Where a participant opens a channel of `job` for `part` meant for
/// `peer`, and its first frame: the relay in relay mode, else `peer`.
pub fn route(job: &Job, peer: NodeId, part: TransferPart) -> (NodeId, Request) {
    let transfer = TransferRequest { job: job.id, part };
    match job.options.mode.relay() {
        // A relay that is a side itself reaches the other side directly.
        Some(via) if via != peer => (via, Request::Relay(RelayRequest { to: peer, transfer })),
        _ => (peer, Request::Transfer(transfer)),
    }
}

/// Whether `relay` may carry a channel of `job` from member `caller` on
/// to member `to`; why not otherwise.
pub fn may_relay(
    job: &Job,
    relay: NodeId,
    caller: Option<NodeId>,
    to: NodeId,
) -> Result<(), &'static str> {
    if job.options.mode.relay() != Some(relay) {
        return Err("the job is not relayed through this member");
    }
    if job.phase.is_terminal() {
        return Err("the job has ended");
    }
    let other = match caller {
        Some(c) if c == job.source => job.target,
        Some(c) if c == job.target => job.source,
        _ => return Err("the caller is neither side of the move"),
    };
    if to != other {
        return Err("a side may reach only the other side");
    }
    Ok(())
}

/// The relay's side: check the caller, open the channel on, then copy
/// both ways until both directions end.
pub async fn serve_relay(agent: &Agent, peer_name: &str, req: RelayRequest, channel: Channel) {
    let job_id = req.transfer.job;
    let Some(job) = agent.state().read(|s| s.jobs.get(&job_id).cloned()) else {
        return refuse(channel, job_id, peer_name, "no such job here");
    };
    let caller = agent.member_id(peer_name);
    if let Err(why) = may_relay(&job, agent.id(), caller, req.to) {
        return refuse(channel, job_id, peer_name, why);
    }
    let onward = match open_onward(agent, req).await {
        Ok(onward) => onward,
        Err(e) => {
            tracing::warn!(job = job_id, "relay: cannot open the channel on: {e}");
            return reset(channel);
        }
    };
    let ((to_send, to_recv), (from_send, from_recv)) = (onward, channel);
    let (forth, back) = tokio::join!(pipe(from_recv, to_send), pipe(to_recv, from_send));
    tracing::debug!(
        job = job_id,
        from = peer_name,
        forth,
        back,
        "relayed a channel"
    );
}

async fn open_onward(agent: &Agent, req: RelayRequest) -> Result<Channel, PeerError> {
    let peer = agent.peer(req.to)?;
    let request = Request::Transfer(req.transfer);
    agent.open_channel(&peer, &request, CHANNEL_TIMEOUT).await
}

fn refuse(channel: Channel, job: u64, peer: &str, why: &str) {
    tracing::warn!(job, peer, "relay: refused a channel: {why}");
    reset(channel);
}

fn reset((mut send, mut recv): Channel) {
    let _ = send.reset(VarInt::from_u32(0));
    let _ = recv.stop(VarInt::from_u32(0));
}

/// Copy one direction to its end; a failed read resets the onward stream
/// (never a clean end the receiver would take for a whole part), a failed
/// write stops the incoming one. A clean end waits until the far side has
/// it all: the onward stream may be its connection's last user
/// (`transfer::relay::delivered`). The bytes copied.
async fn pipe(mut from: RecvStream, mut to: SendStream) -> u64 {
    let mut bytes = 0u64;
    loop {
        match from.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                bytes += chunk.bytes.len() as u64;
                if to.write_chunk(chunk.bytes).await.is_err() {
                    let _ = from.stop(VarInt::from_u32(0));
                    return bytes;
                }
            }
            Ok(None) => {
                let _ = to.finish();
                if let Err(e) = crate::transfer::relay::delivered(&to).await {
                    tracing::info!("relay: the far side did not take a stream's end: {e}");
                }
                return bytes;
            }
            Err(_) => {
                let _ = to.reset(VarInt::from_u32(0));
                return bytes;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ferry_raft::{Phase, TransferMode};

    use super::*;

    /// A move of c1 from member 1 to member 2, in `mode`.
    fn job(mode: TransferMode) -> Job {
        let mut job = super::super::plan::tests::job(Phase::Preparing);
        job.options.mode = mode;
        job
    }

    #[test]
    fn a_relayed_job_routes_both_sides_through_the_relay_and_others_directly() {
        let relayed = job(TransferMode::Relay { via: 3 });
        for peer in [1, 2] {
            let (to, request) = route(&relayed, peer, TransferPart::Rootfs);
            assert_eq!(to, 3);
            assert!(matches!(request, Request::Relay(RelayRequest { to, .. }) if to == peer));
        }
        let (to, request) = route(&job(TransferMode::Pull), 1, TransferPart::Rootfs);
        assert_eq!(to, 1);
        assert!(matches!(request, Request::Transfer(_)));
    }

    #[test]
    fn the_relay_carries_only_its_own_job_between_its_two_sides() {
        let relayed = job(TransferMode::Relay { via: 3 });
        assert_eq!(may_relay(&relayed, 3, Some(2), 1), Ok(()));
        assert_eq!(may_relay(&relayed, 3, Some(1), 2), Ok(()));
        // Not this relay's job, or not relayed at all.
        assert!(may_relay(&relayed, 4, Some(2), 1).is_err());
        assert!(may_relay(&job(TransferMode::Pull), 3, Some(2), 1).is_err());
        // A stranger, or a side aiming elsewhere (at itself, the relay or
        // a member outside the move).
        assert!(may_relay(&relayed, 3, Some(4), 1).is_err());
        assert!(may_relay(&relayed, 3, None, 1).is_err());
        assert!(may_relay(&relayed, 3, Some(2), 2).is_err());
        assert!(may_relay(&relayed, 3, Some(2), 3).is_err());
        assert!(may_relay(&relayed, 3, Some(2), 4).is_err());
        let mut ended = relayed;
        ended.phase = Phase::Done;
        assert!(may_relay(&ended, 3, Some(2), 1).is_err());
    }
}
