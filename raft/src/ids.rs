//! Identifiers shared by every part of the replicated state.

/// A member's Raft node id; never reused (see `ClusterState::next_node_id`).
pub type NodeId = u64;

/// A job's id, allocated in apply.
pub type JobId = u64;
