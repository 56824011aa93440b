//! ferry-raft: the openraft type config, durable storage (redb), the
//! cluster state machine and the Raft network over ferry-transport.

mod apply_hosts;
mod apply_instances;
mod apply_jobs;
mod apply_upgrade;
pub mod events;
pub mod hosts;
pub mod ids;
pub mod instances;
pub mod jobs;
pub mod model;
pub mod names;
pub mod network;
pub mod state;
pub mod store;
pub mod subnet;
#[cfg(feature = "test-hooks")]
pub mod test_fill;

pub use hosts::*;
pub use ids::*;
pub use instances::*;
pub use jobs::*;
pub use model::*;

// openraft 0.9's `declare_raft_types!` names the default `SnapshotData` as a
// bare `Cursor<Vec<u8>>`, so it must be in scope here.
use std::io::Cursor;

openraft::declare_raft_types!(
    /// The openraft type configuration for ferry's cluster state.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = Node,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// How often the leader sends heartbeats, in ms.
pub const HEARTBEAT_MS: u64 = 100;

/// Default for [`raft_config`]'s `snapshot_every`.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 2_000;

/// Raft timings for a LAN cluster. openraft 0.9 lets a follower campaign
/// only after the leader lease (`election_timeout_max`) and then its own
/// election timeout have passed without a heartbeat: 650-800 ms here, so a
/// dead leader is replaced within about a second, while a heartbeat every
/// 100 ms leaves six of them to be lost (a CPU-starved member) before a
/// live leader is wrongly deposed.
/// A snapshot is taken every `snapshot_every` applied entries; the log up
/// to a quarter of that behind it is purged.
pub fn raft_config(
    snapshot_every: u64,
) -> Result<std::sync::Arc<openraft::Config>, Box<openraft::ConfigError>> {
    let config = openraft::Config {
        cluster_name: "ferry".into(),
        heartbeat_interval: HEARTBEAT_MS,
        election_timeout_min: 250,
        election_timeout_max: 400,
        install_snapshot_timeout: 5_000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every.max(1)),
        max_in_snapshot_log_to_keep: snapshot_every / 4,
        purge_batch_size: 1,
        ..Default::default()
    };
    Ok(std::sync::Arc::new(config.validate().map_err(Box::new)?))
}
