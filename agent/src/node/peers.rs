//! Calls to other members, written once: look a member up, call it, open
//! a channel to it. Every call names the peer's certificate name, so only
//! that member can answer.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_raft::NodeId;
use ferry_transport::endpoint::Expect;

use super::Agent;
use crate::api::{ApiError, ApiReply, ApiRequest, ErrorKind, Request, Response};

/// A member as a peer: its certificate name and serial, and its address.
#[derive(Clone, Debug)]
pub struct Peer {
    pub name: String,
    /// The serial the member table records: only that certificate answers.
    pub serial: String,
    pub addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("node {0} is not a member (or has a bad address)")]
    NotAMember(NodeId),
    #[error("{name} is unreachable: {reason}")]
    Unreachable { name: String, reason: String },
    /// The peer answered with an error of its own.
    #[error("{0}")]
    Refused(ApiError),
    #[error("{0} sent an unexpected reply")]
    Unexpected(String),
}

impl From<PeerError> for ApiError {
    fn from(e: PeerError) -> Self {
        match e {
            PeerError::Refused(e) => e,
            PeerError::Unexpected(_) => ApiError::new(ErrorKind::Internal, e.to_string()),
            _ => ApiError::new(ErrorKind::Unavailable, e.to_string()),
        }
    }
}

impl Peer {
    /// What the peer's server certificate must be.
    pub fn expect(&self) -> Expect {
        Expect::Member {
            name: self.name.clone(),
            serial: self.serial.clone(),
        }
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> PeerError {
        PeerError::Unreachable {
            name: self.name.clone(),
            reason: e.to_string(),
        }
    }
}

fn api_reply(peer: &Peer, response: Response) -> Result<ApiReply, PeerError> {
    match response {
        Response::Api(reply) => Ok(reply),
        Response::Error(e) => Err(PeerError::Refused(e)),
        _ => Err(PeerError::Unexpected(peer.name.clone())),
    }
}

pub type Channel = (quinn::SendStream, quinn::RecvStream);

impl Agent {
    /// Member `id` as a peer.
    pub fn peer(&self, id: NodeId) -> Result<Peer, PeerError> {
        self.state
            .read(|s| {
                let m = s.members.get(&id)?;
                Some(Peer {
                    name: m.name.clone(),
                    serial: m.cert_serial.clone(),
                    addr: m.addr.parse().ok()?,
                })
            })
            .ok_or(PeerError::NotAMember(id))
    }

    /// One request to `peer`, its raw response.
    pub async fn call_peer(
        &self,
        peer: &Peer,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, PeerError> {
        self.pool
            .call::<Request, Response>(peer.addr, &peer.expect(), request, timeout)
            .await
            .map_err(|e| peer.unreachable(e))
    }

    /// An API request to `peer`, its reply or its error.
    pub async fn call_api(
        &self,
        peer: &Peer,
        request: ApiRequest,
        timeout: Duration,
    ) -> Result<ApiReply, PeerError> {
        let response = self
            .call_peer(peer, &Request::Api(request), timeout)
            .await?;
        api_reply(peer, response)
    }

    /// The voters of the Raft membership as this node sees it, the leader
    /// first, this node left out.
    pub fn voter_peers(&self) -> Vec<Peer> {
        let (leader, voters): (Option<NodeId>, Vec<NodeId>) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let voters = m.membership_config.membership().voter_ids().collect();
            (m.current_leader, voters)
        };
        let mut ids: Vec<NodeId> = leader.filter(|l| voters.contains(l)).into_iter().collect();
        ids.extend(voters.into_iter().filter(|v| Some(*v) != leader));
        ids.into_iter()
            .filter(|id| *id != self.id)
            .filter_map(|id| self.peer(id).ok())
            .collect()
    }

    /// An API request to the voters in turn (see [`Agent::voter_peers`])
    /// until one answers without an error; the last error otherwise.
    pub async fn call_voters(
        &self,
        request: &Request,
        timeout: Duration,
    ) -> Result<ApiReply, PeerError> {
        let mut last = PeerError::Refused(ApiError::new(
            ErrorKind::Unavailable,
            "no other voter is known yet; try again once the cluster has a leader",
        ));
        for peer in self.voter_peers() {
            match self.call_peer(&peer, request, timeout).await {
                Ok(response) => match api_reply(&peer, response) {
                    Ok(reply) => return Ok(reply),
                    Err(e) => last = e,
                },
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// A channel to `peer` whose first frame is `request`.
    pub async fn open_channel(
        &self,
        peer: &Peer,
        request: &Request,
        timeout: Duration,
    ) -> Result<Channel, PeerError> {
        self.pool
            .open_stream(peer.addr, &peer.expect(), request, timeout)
            .await
            .map_err(|e| peer.unreachable(e))
    }
}
