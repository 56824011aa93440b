//! The write path: propose a command on the local Raft or forward it to
//! the leader, wait out elections up to a deadline, and return once this
//! agent applied it (read-your-writes). Every write is wrapped once in
//! `Command::Once` with a random id kept across retries, so a write whose
//! reply was lost is never applied twice.

use std::time::Duration;

use ferry_raft::store::StateHandle;
use ferry_raft::{Command, CommandResult, Node, NodeId, Rejection};
use ferry_transport::pki;
use ferry_transport::rpc::Pool;
use openraft::error::{ClientWriteError, RaftError};

use super::batch::Batcher;
use super::Agent;
use crate::api::{parse_addr, ApiError, ApiReply, ApiRequest, ErrorKind, Request, Response};

/// How long a write may wait for a leader before giving up.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(15);

/// How a write reaches the leader when this agent does not lead. The
/// agent's is [`PoolForwarder`]; tests route it in memory.
pub trait Forwarder: Send + Sync {
    fn forward(
        &self,
        leader_id: NodeId,
        leader: &Node,
        command: &Command,
    ) -> impl std::future::Future<Output = Result<(CommandResult, u64), ApiError>> + Send;
}

/// Forwards over the agent's QUIC connection pool, to the leader's
/// recorded certificate.
pub struct PoolForwarder<'a>(pub &'a Pool, pub &'a StateHandle);

impl Forwarder for PoolForwarder<'_> {
    async fn forward(
        &self,
        leader_id: NodeId,
        leader: &Node,
        command: &Command,
    ) -> Result<(CommandResult, u64), ApiError> {
        let addr = parse_addr(&leader.addr)?;
        let request = Request::Api(ApiRequest::Write(command.clone()));
        let expect = super::expect_member(self.1, leader_id, &leader.name);
        match self
            .0
            .call::<Request, Response>(addr, &expect, &request, WRITE_DEADLINE)
            .await
        {
            Ok(Response::Api(ApiReply::Written { result, index })) => Ok((result, index)),
            Ok(Response::Error(e)) => Err(e),
            Ok(_) => Err(ApiError::new(
                ErrorKind::Internal,
                "leader sent an unexpected reply",
            )),
            Err(e) => Err(ApiError::new(
                ErrorKind::Unavailable,
                format!("leader {} unreachable: {e}", leader.name),
            )),
        }
    }
}

/// Every retry below (and a leader's retry of a forwarded write) carries
/// the same request id.
fn once(command: Command) -> Command {
    match command {
        once @ Command::Once { .. } => once,
        command => Command::Once {
            request: pki::random_u64(),
            command: Box::new(command),
        },
    }
}

/// Commit `command` through `raft` (node `me`), forwarding to the leader
/// with `forwarder`; returns the result and the entry's log index.
pub async fn write_indexed(
    batcher: &Batcher,
    me: NodeId,
    forwarder: &impl Forwarder,
    command: Command,
) -> Result<(CommandResult, u64), ApiError> {
    let command = once(command);
    let deadline = tokio::time::Instant::now() + WRITE_DEADLINE;
    let mut last = String::from("no leader elected");
    let raft = batcher.raft();
    while tokio::time::Instant::now() < deadline {
        match batcher.client_write(command.clone()).await {
            Ok(written) => return Ok(written),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                if let (Some(leader), Some(node)) = (forward.leader_id, forward.leader_node) {
                    if leader != me {
                        // A dead leader's connection only fails after the
                        // QUIC idle timeout; an election tells sooner.
                        let mut metrics = raft.metrics();
                        let moved = metrics.wait_for(|m| m.current_leader != Some(leader));
                        tokio::select! {
                            result = forwarder.forward(leader, &node, &command) => match result {
                                Ok(result) => return Ok(result),
                                Err(e) if e.kind == ErrorKind::Unavailable => last = e.message,
                                Err(e) => return Err(e),
                            },
                            _ = moved => {
                                last = format!("leader {} lost its leadership", node.name);
                                continue;
                            }
                        }
                    }
                }
            }
            Err(e) => last = e.to_string(),
        }
        // Without a leader, retry as soon as one is elected; else (or at
        // the latest) in 100 ms.
        let mut metrics = raft.metrics();
        if metrics.borrow().current_leader.is_some() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        } else {
            let elected = metrics.wait_for(|m| m.current_leader.is_some());
            let _ = tokio::time::timeout(Duration::from_millis(100), elected).await;
        }
    }
    Err(ApiError::new(
        ErrorKind::Unavailable,
        format!(
            "the cluster could not commit the change within {}s ({last}); is a majority of voters running?",
            WRITE_DEADLINE.as_secs()
        ),
    ))
}

impl Agent {
    /// Propose a command (forwarded to the leader when this agent does not
    /// lead) and return once this agent's own state has applied it, so a
    /// caller reads its own write.
    pub async fn write(&self, command: Command) -> Result<CommandResult, ApiError> {
        let (result, index) = self.write_indexed(command).await?;
        let mut applied = self.state.subscribe();
        let caught_up = applied.wait_for(|at| *at >= index);
        if tokio::time::timeout(WRITE_DEADLINE, caught_up)
            .await
            .is_err()
        {
            tracing::warn!(index, "committed entry not applied here in time");
        }
        Ok(result)
    }

    /// Return once this agent's state holds everything committed before
    /// it started: a [`Command::Barrier`] written and applied here,
    /// retried until the cluster takes it. What acts on the state waits
    /// for this, since a crash may have lost the unsynced tail of the
    /// applied state (the log re-applies it, but only once a leader says
    /// it is committed).
    pub async fn catch_up(&self) {
        let mut attempt = 0u32;
        loop {
            match self.write_indexed(Command::Barrier).await {
                Ok((_, index)) => {
                    let mut applied = self.state.subscribe();
                    if applied.wait_for(|at| *at >= index).await.is_ok() {
                        return;
                    }
                }
                Err(e) if attempt.is_multiple_of(10) => {
                    tracing::warn!(error = %e, "waiting to catch up with the cluster before acting");
                }
                Err(_) => {}
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// [`Agent::write`] without waiting for the local apply; also returns
    /// the entry's log index.
    pub async fn write_indexed(&self, command: Command) -> Result<(CommandResult, u64), ApiError> {
        let started = std::time::Instant::now();
        let written = write_indexed(
            &self.batcher,
            self.id,
            &PoolForwarder(&self.pool, &self.state),
            command,
        )
        .await;
        if written.is_ok() {
            self.metrics.committed(started.elapsed());
        }
        written
    }
}

/// A state-machine refusal as the caller sees it.
pub fn rejected(rejection: Rejection) -> ApiError {
    let kind = match rejection {
        Rejection::NoToken(_) | Rejection::NoMember(_) => ErrorKind::NotFound,
        Rejection::NameTaken(_)
        | Rejection::TokenExists(_)
        | Rejection::AlreadyInitialised
        | Rejection::Instance(_)
        | Rejection::Job(_) => ErrorKind::Conflict,
        _ => ErrorKind::Unauthorized,
    };
    ApiError::new(kind, rejection.to_string())
}

/// Commit a command and turn a state-machine refusal into an error.
pub async fn commit(agent: &Agent, command: Command) -> Result<CommandResult, ApiError> {
    match agent.write(command).await? {
        CommandResult::Rejected(r) => Err(rejected(r)),
        ok => Ok(ok),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::sim::net::{cluster, create, leader, MemForwarder, MemNet, MemNode};

    async fn write_on(
        nodes: &[MemNode],
        net: &MemNet,
        id: NodeId,
        command: Command,
    ) -> Result<(CommandResult, u64), ApiError> {
        let node = &nodes[(id - 1) as usize];
        let batcher = Batcher::new(node.raft.clone());
        write_indexed(&batcher, id, &MemForwarder::new(id, net), command).await
    }

    fn follower(nodes: &[MemNode], leader: NodeId, not: Option<NodeId>) -> NodeId {
        nodes
            .iter()
            .map(|n| n.id)
            .find(|id| *id != leader && Some(*id) != not)
            .expect("a follower")
    }

    async fn applied(node: &MemNode, index: u64) {
        let mut at = node.state.subscribe();
        tokio::time::timeout(Duration::from_secs(5), at.wait_for(|i| *i >= index))
            .await
            .expect("applied in time")
            .expect("state open");
    }

    #[tokio::test]
    async fn a_write_on_a_follower_is_forwarded_to_the_leader_and_applied_there_and_here() {
        let net = MemNet::default();
        let nodes = cluster(&net, 3).await;
        let lead = leader(&nodes, None).await;
        let from = follower(&nodes, lead, None);
        let (result, index) = write_on(&nodes, &net, from, create("c1"))
            .await
            .expect("write");
        assert_eq!(result, CommandResult::Done);
        let node = &nodes[(from - 1) as usize];
        applied(node, index).await;
        assert!(node.state.read(|s| s.instances.contains_key("c1")));
    }

    #[tokio::test]
    async fn a_write_reaches_the_new_leader_after_the_old_one_is_cut_off() {
        let net = MemNet::default();
        let nodes = cluster(&net, 3).await;
        let old = leader(&nodes, None).await;
        net.isolate(old);
        let from = follower(&nodes, old, None);
        let started = std::time::Instant::now();
        let (result, index) = write_on(&nodes, &net, from, create("c1"))
            .await
            .expect("write after the leader was cut off");
        assert_eq!(result, CommandResult::Done);
        let new = leader(&nodes, Some(old)).await;
        assert_ne!(new, old);
        applied(&nodes[(from - 1) as usize], index).await;
        // The cut-off leader never saw it.
        assert!(!nodes[(old - 1) as usize]
            .state
            .read(|s| s.instances.contains_key("c1")));
        assert!(
            started.elapsed() < WRITE_DEADLINE,
            "took {:?}",
            started.elapsed()
        );
        net.heal();
        applied(&nodes[(old - 1) as usize], index).await;
    }

    #[tokio::test]
    async fn a_retried_write_whose_reply_was_lost_is_applied_once() {
        let net = MemNet::default();
        let nodes = cluster(&net, 3).await;
        let lead = leader(&nodes, None).await;
        let from = follower(&nodes, lead, None);
        let forwarder = MemForwarder::new(from, &net);
        forwarder.lose_replies.store(1, Ordering::SeqCst);
        let node = &nodes[(from - 1) as usize];
        let batcher = Batcher::new(node.raft.clone());
        let (result, index) = write_indexed(&batcher, from, &forwarder, create("c1"))
            .await
            .expect("retried write");
        // Applied twice, the second Create would be refused: the name exists.
        assert_eq!(result, CommandResult::Done);
        assert_eq!(
            forwarder.lose_replies.load(Ordering::SeqCst),
            0,
            "a reply was lost"
        );
        applied(node, index).await;
        assert_eq!(node.state.read(|s| s.instances.len()), 1);
        // Without the request id the same write is refused.
        let (again, _) = write_on(&nodes, &net, from, create("c1"))
            .await
            .expect("write");
        assert!(matches!(again, CommandResult::Rejected(_)), "{again:?}");
    }
}
