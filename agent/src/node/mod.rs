//! The node handle (layer 1): what every feature of a running agent
//! shares, with private fields behind accessors, and the write path
//! (`write.rs`) and peer calls (`peers.rs`) every feature uses. It starts
//! nothing: `run.rs` builds it and spawns the loops.

pub mod batch;
mod keyring;
mod locks;
pub mod peers;
mod placement;
mod raft_client;
pub mod write;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_raft::store::StateHandle;
use ferry_raft::{NodeId, Raft};
use ferry_transport::rpc::Pool;
use tokio::sync::watch;

use crate::datadir::DataDir;
use crate::driver::Driver;
use crate::gossip::handle::Gossip;
use crate::metrics::Metrics;
use crate::transfer::progress::Transfers;

pub use keyring::Keyring;
pub use locks::InstanceLocks;
pub use raft_client::RaftClient;
pub use write::commit;

/// Tuning a running agent reads.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// The cluster keeps this many voters.
    pub voters: u8,
    /// `--cluster-subnet`, recorded by the bootstrap.
    pub cluster_subnet: Option<ferry_raft::subnet::Subnet>,
    /// `--job-history`, recorded by the bootstrap.
    pub job_history: u32,
    /// A voter dead (by gossip) this long is replaced by a live learner.
    pub heal_after: Duration,
    /// The leader rolls back a job whose phase has not moved for this long.
    pub job_phase_timeout: Duration,
    /// Bytes of the data dir's filesystem instance data may not use.
    pub disk_reserve_bytes: u64,
}

/// Everything a node handle is made of.
pub struct Parts {
    pub id: NodeId,
    pub name: String,
    pub addr: SocketAddr,
    pub data_dir: DataDir,
    pub raft: Raft,
    pub state: StateHandle,
    pub pool: Pool,
    pub keyring: Keyring,
    /// Names of members known from the join answer.
    pub seeds: Vec<(NodeId, String)>,
    pub driver: Arc<dyn Driver>,
    pub gossip: Gossip,
    pub tuning: Tuning,
}

/// The state shared by every task of a running agent.
pub struct Agent {
    id: NodeId,
    name: String,
    addr: SocketAddr,
    data_dir: DataDir,
    raft: Raft,
    /// Group commit of this member's writes (`batch.rs`).
    batcher: batch::Batcher,
    state: StateHandle,
    pool: Pool,
    /// The CA certificate, and its key while this member is a voter.
    keyring: Keyring,
    /// Names of members known from the join answer, for checking Raft
    /// senders before our own log has caught up.
    seed_names: Mutex<BTreeMap<NodeId, String>>,
    driver: Arc<dyn Driver>,
    locks: InstanceLocks,
    gossip: Gossip,
    tuning: Tuning,
    /// Live figures of the transfers this agent receives.
    transfers: Transfers,
    metrics: Metrics,
    shutdown: watch::Sender<Option<String>>,
}

impl Agent {
    pub fn new(parts: Parts) -> Arc<Agent> {
        Arc::new(Agent {
            id: parts.id,
            name: parts.name,
            addr: parts.addr,
            data_dir: parts.data_dir,
            batcher: batch::Batcher::new(parts.raft.clone()),
            raft: parts.raft,
            state: parts.state,
            pool: parts.pool,
            keyring: parts.keyring,
            seed_names: Mutex::new(parts.seeds.into_iter().collect()),
            driver: parts.driver,
            locks: InstanceLocks::default(),
            gossip: parts.gossip,
            tuning: parts.tuning,
            transfers: Transfers::default(),
            metrics: Metrics::new(),
            shutdown: watch::channel(None).0,
        })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn data_dir(&self) -> &DataDir {
        &self.data_dir
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The applied replicated state.
    pub fn state(&self) -> &StateHandle {
        &self.state
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The disk reserve instance data written here must respect.
    pub fn reserve(&self) -> crate::transfer::space::Reserve {
        crate::transfer::space::Reserve::new(self.data_dir.root(), self.tuning.disk_reserve_bytes)
    }

    /// The host runtime of this agent's instances.
    pub fn driver(&self) -> &dyn Driver {
        self.driver.as_ref()
    }

    pub fn locks(&self) -> &InstanceLocks {
        &self.locks
    }

    pub fn gossip(&self) -> &Gossip {
        &self.gossip
    }

    pub fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    /// What `ferry agent --metrics` serves.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn transfers(&self) -> &Transfers {
        &self.transfers
    }

    /// This host's facts, with the runtime's part from the driver.
    pub async fn probe_facts(&self) -> ferry_raft::HostFacts {
        let runtimes = self.driver.runtimes().await;
        crate::facts::probe(self.data_dir.root(), runtimes).await
    }

    /// Whether this agent leads the cluster now.
    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.id)
    }

    /// The member that leads the cluster as this agent knows it.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// The voters of the Raft membership as this node sees it.
    pub fn voter_ids(&self) -> Vec<NodeId> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        metrics.membership_config.membership().voter_ids().collect()
    }

    /// Whether member `id` is alive or only suspect by gossip (not dead).
    pub fn member_alive(&self, id: NodeId) -> bool {
        self.gossip.liveness(id) != crate::gossip::handle::Liveness::Dead
    }

    /// Whether the applied state says this member was removed.
    pub fn removed_from_cluster(&self) -> bool {
        self.state
            .read(|s| s.next_node_id > self.id && !s.members.contains_key(&self.id))
    }

    /// Resolves when a stop is requested; the reason, if one was given.
    pub async fn stopped(&self) -> Option<String> {
        let mut stop = self.shutdown.subscribe();
        stop.wait_for(|r| r.is_some())
            .await
            .ok()
            .and_then(|r| r.clone())
    }

    /// Ask the agent to stop serving (this member was removed).
    pub fn request_shutdown(&self, reason: String) {
        let _ = self.shutdown.send(Some(reason));
    }

    /// What member `id` must present when we connect to it (`name` from
    /// Raft or gossip): its recorded certificate once the member table
    /// knows it, else the name alone (our log is behind).
    pub fn expect_member(&self, id: NodeId, name: &str) -> ferry_transport::endpoint::Expect {
        expect_member(&self.state, id, name)
    }

    /// Names of members by id, from the applied state and the join seeds.
    pub fn member_name(&self, id: NodeId) -> Option<String> {
        self.state
            .read(|s| s.members.get(&id).map(|m| m.name.clone()))
            .or_else(|| self.seed_names.lock().ok()?.get(&id).cloned())
    }

    pub fn member_id(&self, name: &str) -> Option<NodeId> {
        self.state
            .read(|s| s.member_by_name(name).map(|m| m.id))
            .or_else(|| {
                self.seed_names
                    .lock()
                    .ok()?
                    .iter()
                    .find(|(_, n)| n.as_str() == name)
                    .map(|(id, _)| *id)
            })
    }
}

/// [`Agent::expect_member`] from a state handle alone (the Raft client
/// has no node handle).
pub fn expect_member(
    state: &StateHandle,
    id: NodeId,
    name: &str,
) -> ferry_transport::endpoint::Expect {
    use ferry_transport::endpoint::Expect;
    let serial = state.read(|s| {
        s.members
            .get(&id)
            .filter(|m| m.name == name)
            .map(|m| m.cert_serial.clone())
    });
    match serial {
        Some(serial) => Expect::Member {
            name: name.to_string(),
            serial,
        },
        None => Expect::Node(name.to_string()),
    }
}
