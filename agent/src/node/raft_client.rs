//! Carries Raft RPCs over the agent's connection pool.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_raft::network::{RaftReply, RaftRequest, RaftRpcClient, RaftRpcFailure};
use ferry_raft::store::StateHandle;
use ferry_raft::{Node, NodeId};
use ferry_transport::rpc::Pool;

use crate::api::{Request, Response};

/// openraft's RPC deadline follows the heartbeat (100 ms), shorter than a
/// first TLS handshake on a busy host; the spawned call gets at least this.
const RAFT_RPC_MIN_TIMEOUT: Duration = Duration::from_secs(1);

/// How long an open connection may take to answer before it is taken for
/// dead and the call goes again on a new one: well inside the election
/// timeout (650 ms), so a restarted member hears from the leader before it
/// would campaign.
const RAFT_RPC_ANSWER: Duration = Duration::from_millis(300);

#[derive(Clone)]
pub struct RaftClient {
    pub pool: Pool,
    /// For the certificate each member must present.
    pub state: StateHandle,
}

impl RaftRpcClient for RaftClient {
    async fn send(
        &self,
        target: NodeId,
        node: &Node,
        request: RaftRequest,
        timeout: Duration,
    ) -> Result<RaftReply, RaftRpcFailure> {
        let addr: SocketAddr = node
            .addr
            .parse()
            .map_err(|_| RaftRpcFailure::Failed(format!("bad address {}", node.addr)))?;
        let expect = super::expect_member(&self.state, target, &node.name);
        let pool = self.pool.clone();
        // openraft drops this future after its heartbeat interval; in a task
        // of its own the call (and a first TLS handshake) runs to the end,
        // so the connection is there for the next heartbeat.
        let call = tokio::spawn(async move {
            pool.call_retrying::<Request, Response>(
                addr,
                &expect,
                &Request::Raft(request),
                timeout.max(RAFT_RPC_ANSWER),
                timeout.max(RAFT_RPC_MIN_TIMEOUT),
            )
            .await
        });
        let result = call
            .await
            .map_err(|e| RaftRpcFailure::Failed(format!("rpc task failed: {e}")))?;
        match result {
            Ok(Response::Raft(reply)) => Ok(reply),
            Ok(Response::Error(e)) => Err(RaftRpcFailure::Failed(e.message)),
            Ok(_) => Err(RaftRpcFailure::Failed("unexpected reply".into())),
            Err(e) => Err(RaftRpcFailure::Unreachable(e.to_string())),
        }
    }
}
