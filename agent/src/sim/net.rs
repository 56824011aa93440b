//! An in-memory Raft network: a map of node id → Raft, and a set of cut
//! links. Each RPC goes straight to the peer's Raft unless its link is
//! cut; forwarded writes go the same way. Real openraft on real redb
//! stores in temporary dirs; no QUIC, no root.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_raft::network::{Network, RaftReply, RaftRequest, RaftRpcClient, RaftRpcFailure};
use ferry_raft::store::StateHandle;
use ferry_raft::{Command, CommandResult, Node, NodeId, Raft};
use openraft::error::{ClientWriteError, RaftError};

use crate::api::{ApiError, ErrorKind};
use crate::node::write::Forwarder;

#[derive(Default)]
struct Links {
    rafts: BTreeMap<NodeId, Raft>,
    /// (from, to): messages from `from` to `to` are lost.
    cut: BTreeSet<(NodeId, NodeId)>,
}

/// The network all nodes of one test share.
#[derive(Clone, Default)]
pub struct MemNet {
    links: Arc<Mutex<Links>>,
}

impl MemNet {
    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The peer's Raft, unless the link from `from` to it is cut.
    fn reach(&self, from: NodeId, to: NodeId) -> Option<Raft> {
        let links = self.links();
        if links.cut.contains(&(from, to)) {
            return None;
        }
        links.rafts.get(&to).cloned()
    }

    /// Cut `node` off from every other node, both ways.
    pub fn isolate(&self, node: NodeId) {
        let mut links = self.links();
        let others: Vec<NodeId> = links.rafts.keys().copied().filter(|n| *n != node).collect();
        for other in others {
            links.cut.insert((node, other));
            links.cut.insert((other, node));
        }
    }

    pub fn heal(&self) {
        self.links().cut.clear();
    }

    pub fn client(&self, from: NodeId) -> MemClient {
        MemClient {
            from,
            net: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct MemClient {
    from: NodeId,
    net: MemNet,
}

impl RaftRpcClient for MemClient {
    async fn send(
        &self,
        target: NodeId,
        _node: &Node,
        request: RaftRequest,
        _timeout: Duration,
    ) -> Result<RaftReply, RaftRpcFailure> {
        let raft = self.net.reach(self.from, target).ok_or_else(|| {
            RaftRpcFailure::Unreachable(format!("link {} -> {target} cut", self.from))
        })?;
        Ok(request.handle(&raft).await)
    }
}

/// Forwards a write to the leader's Raft over the in-memory links; can
/// lose the first reply after the write committed.
pub struct MemForwarder {
    pub from: NodeId,
    pub net: MemNet,
    pub lose_replies: std::sync::atomic::AtomicU32,
}

impl MemForwarder {
    pub fn new(from: NodeId, net: &MemNet) -> Self {
        MemForwarder {
            from,
            net: net.clone(),
            lose_replies: Default::default(),
        }
    }
}

fn node_id(name: &str) -> Option<NodeId> {
    name.strip_prefix('n')?.parse().ok()
}

impl Forwarder for MemForwarder {
    async fn forward(
        &self,
        _leader_id: NodeId,
        leader: &Node,
        command: &Command,
    ) -> Result<(CommandResult, u64), ApiError> {
        let unavailable = |why: String| ApiError::new(ErrorKind::Unavailable, why);
        let to = node_id(&leader.name).ok_or_else(|| unavailable("unknown leader".into()))?;
        let raft = self
            .net
            .reach(self.from, to)
            .ok_or_else(|| unavailable(format!("leader {} unreachable", leader.name)))?;
        let written = match raft.client_write(command.clone()).await {
            Ok(r) => (r.data, r.log_id.index),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                return Err(unavailable(format!("{} no longer leads", leader.name)))
            }
            Err(e) => return Err(unavailable(e.to_string())),
        };
        let lost = self
            .lose_replies
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok();
        if lost {
            return Err(unavailable("the reply was lost".into()));
        }
        Ok(written)
    }
}

/// Raft timings for in-memory tests: elections in a few hundred ms.
pub fn fast_config() -> Arc<openraft::Config> {
    let config = openraft::Config {
        cluster_name: "ferry-test".into(),
        heartbeat_interval: 50,
        election_timeout_min: 200,
        election_timeout_max: 400,
        ..Default::default()
    };
    Arc::new(config.validate().expect("valid test raft config"))
}

/// One node of an in-memory cluster.
pub struct MemNode {
    pub id: NodeId,
    pub raft: Raft,
    pub state: StateHandle,
    _dir: tempfile::TempDir,
}

/// A command that creates container `name` on node 1.
pub fn create(name: &str) -> Command {
    Command::Instance(ferry_raft::InstanceCommand::Create {
        name: name.into(),
        kind: ferry_raft::InstanceKind::Container,
        spec: ferry_raft::InstanceSpec::default(),
        owner: 1,
        desired: ferry_raft::DesiredState::Running,
        now_ms: 1,
    })
}

pub fn node_of(id: NodeId) -> Node {
    Node {
        name: format!("n{id}"),
        addr: format!("127.0.0.1:{}", 1000 + id),
    }
}

/// `n` voters on `net`, node 1 initialised with all of them; returns once
/// a leader is elected.
pub async fn cluster(net: &MemNet, n: u64) -> Vec<MemNode> {
    let mut nodes = Vec::new();
    for id in 1..=n {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = ferry_raft::store::open(&dir.path().join("raft.redb")).expect("store");
        let state = sm.state();
        let raft = Raft::new(id, fast_config(), Network::new(net.client(id)), log, sm)
            .await
            .expect("raft");
        net.links().rafts.insert(id, raft.clone());
        nodes.push(MemNode {
            id,
            raft,
            state,
            _dir: dir,
        });
    }
    let members: BTreeMap<NodeId, Node> = (1..=n).map(|id| (id, node_of(id))).collect();
    nodes[0].raft.initialize(members).await.expect("initialize");
    leader(&nodes, None).await;
    nodes
}

/// The leader all reachable nodes agree on, other than `not`.
pub async fn leader(nodes: &[MemNode], not: Option<NodeId>) -> NodeId {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen: BTreeSet<Option<NodeId>> = nodes
            .iter()
            .filter(|n| Some(n.id) != not)
            .map(|n| n.raft.metrics().borrow().current_leader)
            .collect();
        if let [Some(id)] = seen.iter().copied().collect::<Vec<_>>()[..] {
            if Some(id) != not {
                return id;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
