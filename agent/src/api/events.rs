//! What `ferry monitor` gets: the cluster's changes as they commit.

use serde::{Deserialize, Serialize};

/// One change, with the log index of the entry that made it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventView {
    pub index: u64,
    /// When the answering member applied it (Unix ms).
    pub at_ms: u64,
    /// "member", "instance", "job" or "host-job".
    pub kind: String,
    /// Its name (a job's id).
    pub subject: String,
    /// What happened, in words, members by name.
    pub text: String,
    pub change: ferry_raft::events::Change,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventsView {
    pub events: Vec<EventView>,
    /// Every event from this index on is kept by the answering agent; of
    /// older entries it may keep none (it started later, got them in a
    /// snapshot, or keeps only the latest ones).
    pub kept_from: u64,
    /// Ask next for the events after this index.
    pub next_after: u64,
}
