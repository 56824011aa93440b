//! What travels on a migration's transfer channels besides the trees.

use ferry_raft::JobId;
use serde::{Deserialize, Serialize};

/// What a transfer channel carries. Pull: the target opens it and asks the
/// source. Push: the source opens it and sends to the target, which answers
/// with a [`PushAck`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum TransferPart {
    /// The rootfs in full, while the instance runs.
    Rootfs,
    /// Freeze, dump, then send the images and the rootfs delta.
    Final,
    /// Push: the rootfs in full follows.
    PushRootfs,
    /// Push: the freeze header, images and rootfs delta follow.
    PushFinal,
    /// Pull, a runtime that moves the instance itself: the live files,
    /// the target's readiness, then the source's freeze header.
    Live,
    /// Source to target during a live move: one connection of the
    /// source's runtime, relayed as raw bytes to the target's runtime.
    Stream { purpose: String },
}

/// The target's answer at the end of a pushed part.
#[derive(Debug, Serialize, Deserialize)]
pub enum PushAck {
    Received,
    Failed(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransferRequest {
    pub job: JobId,
    pub part: TransferPart,
}

/// The source's first answer on a `Final` channel.
#[derive(Debug, Serialize, Deserialize)]
pub enum FinalHeader {
    /// Frozen, for `paused_ms` already (a runtime's own switchover in a
    /// live move; 0 when the source froze just now).
    Frozen {
        note: Option<String>,
        paused_ms: u64,
        /// Bytes of memory images that follow (0 for none).
        images_bytes: u64,
    },
    Refused(String),
}
