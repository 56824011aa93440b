//! The Raft network: openraft's RPCs carried by whatever request/response
//! transport the agent provides (QUIC with mutual TLS in practice). The
//! raft crate stays unaware of the agent's wire envelope through
//! [`RaftRpcClient`].

use std::future::Future;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::{Node, NodeId, TypeConfig};

/// A Raft RPC as it travels between members.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
}

impl RaftRequest {
    /// The node id the sender claims to be; the receiver checks it against
    /// the name in the sender's certificate.
    pub fn claimed_sender(&self) -> NodeId {
        match self {
            RaftRequest::AppendEntries(r) => r.vote.leader_id().voted_for().unwrap_or_default(),
            RaftRequest::Vote(r) => r.vote.leader_id().voted_for().unwrap_or_default(),
            RaftRequest::InstallSnapshot(r) => r.vote.leader_id().voted_for().unwrap_or_default(),
        }
    }

    /// Hand the request to the local Raft instance.
    pub async fn handle(self, raft: &crate::Raft) -> RaftReply {
        match self {
            RaftRequest::AppendEntries(r) => RaftReply::AppendEntries(raft.append_entries(r).await),
            RaftRequest::Vote(r) => RaftReply::Vote(raft.vote(r).await),
            RaftRequest::InstallSnapshot(r) => {
                RaftReply::InstallSnapshot(raft.install_snapshot(r).await)
            }
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
}

/// Why a Raft RPC did not get an answer from the peer's Raft.
#[derive(Debug, thiserror::Error)]
pub enum RaftRpcFailure {
    /// The peer could not be reached (connection refused, timed out).
    #[error("node unreachable: {0}")]
    Unreachable(String),
    /// The peer answered, but not with a Raft reply (e.g. it refused us).
    #[error("rpc failed: {0}")]
    Failed(String),
}

/// What the agent provides to carry a Raft RPC to a member.
pub trait RaftRpcClient: Clone + Send + Sync + 'static {
    fn send(
        &self,
        target: NodeId,
        node: &Node,
        request: RaftRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<RaftReply, RaftRpcFailure>> + Send;
}

/// openraft's network factory over a [`RaftRpcClient`].
#[derive(Clone)]
pub struct Network<T> {
    client: T,
}

impl<T: RaftRpcClient> Network<T> {
    pub fn new(client: T) -> Self {
        Network { client }
    }
}

impl<T: RaftRpcClient> RaftNetworkFactory<TypeConfig> for Network<T> {
    type Network = PeerLink<T>;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        PeerLink {
            client: self.client.clone(),
            target,
            node: node.clone(),
        }
    }
}

/// The link from this node to one peer.
pub struct PeerLink<T> {
    client: T,
    target: NodeId,
    node: Node,
}

type RpcResult<R, E = openraft::error::Infallible> =
    Result<R, RPCError<NodeId, Node, RaftError<NodeId, E>>>;

impl<T: RaftRpcClient> PeerLink<T> {
    async fn send(
        &self,
        request: RaftRequest,
        option: &RPCOption,
    ) -> Result<RaftReply, RaftRpcFailure> {
        self.client
            .send(self.target, &self.node, request, option.hard_ttl())
            .await
    }

    fn remote<E: std::error::Error>(
        &self,
        error: RaftError<NodeId, E>,
    ) -> RPCError<NodeId, Node, RaftError<NodeId, E>> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            error,
        ))
    }
}

fn transport_error<E: std::error::Error>(
    failure: RaftRpcFailure,
) -> RPCError<NodeId, Node, RaftError<NodeId, E>> {
    match failure {
        RaftRpcFailure::Unreachable(_) => RPCError::Unreachable(Unreachable::new(&failure)),
        RaftRpcFailure::Failed(_) => RPCError::Network(NetworkError::new(&failure)),
    }
}

fn unexpected_reply<E: std::error::Error>() -> RPCError<NodeId, Node, RaftError<NodeId, E>> {
    transport_error(RaftRpcFailure::Failed(
        "peer answered with a reply of the wrong kind".into(),
    ))
}

impl<T: RaftRpcClient> RaftNetwork<TypeConfig> for PeerLink<T> {
    /// How soon the leader tries an unreachable member again (openraft's
    /// default: 500 ms). A restarted member that hears nothing from the
    /// leader for its election timeout campaigns, and its higher term then
    /// deposes the live leader: retry as often as heartbeats go.
    fn backoff(&self) -> openraft::network::Backoff {
        let every = Duration::from_millis(crate::HEARTBEAT_MS);
        openraft::network::Backoff::new(std::iter::repeat(every))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        match self.send(RaftRequest::AppendEntries(rpc), &option).await {
            Ok(RaftReply::AppendEntries(reply)) => reply.map_err(|e| self.remote(e)),
            Ok(_) => Err(unexpected_reply()),
            Err(e) => Err(transport_error(e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self.send(RaftRequest::InstallSnapshot(rpc), &option).await {
            Ok(RaftReply::InstallSnapshot(reply)) => reply.map_err(|e| self.remote(e)),
            Ok(_) => Err(unexpected_reply()),
            Err(e) => Err(transport_error(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        match self.send(RaftRequest::Vote(rpc), &option).await {
            Ok(RaftReply::Vote(reply)) => reply.map_err(|e| self.remote(e)),
            Ok(_) => Err(unexpected_reply()),
            Err(e) => Err(transport_error(e)),
        }
    }
}
