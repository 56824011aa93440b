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
    /// Source to target, after the freeze of a stateful move: the final
    /// dump's memory pages as the runtime writes them (CRIU's page-server
    /// protocol, raw), for the target's page server. `stream` names this
    /// attempt (the freeze header says which stream it sent); `bytes` is
    /// about what the pages take (where the target stages them).
    Pages { stream: u64, bytes: u64 },
    /// Target to source, a lazy move's restore: the target's lazy-pages
    /// daemon fetching the pages from the source's lazy dump (CRIU's
    /// page-server protocol, raw).
    LazyPages,
}

/// What the source sent on a [`TransferPart::Pages`] stream, end to end:
/// the target compares it with what it passed to its page server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageStream {
    pub stream: u64,
    pub bytes: u64,
    /// XXH3-128 of every byte (QUIC authenticates them on the way; this
    /// checks the relays at both ends).
    pub checksum: u128,
}

/// The target's first frame on a layered instance's rootfs channel (either
/// mode): whether the source must send the image's tree before the
/// instance's own changes (the target's image store lacks it).
#[derive(Debug, Serialize, Deserialize)]
pub struct ImageWanted {
    pub image: String,
    pub wanted: bool,
}

/// How a rootfs pass travels. The source offers what it can send (btrfs
/// only for a rootfs that is a subvolume it could snapshot), the target
/// answers with the first it can take; the entry stream is always there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RootfsMethod {
    /// The tree transfer: an entry stream of every file (first pass) or
    /// of what changed since (final pass).
    Entries,
    /// `btrfs send`/`receive` of a read-only snapshot; the final pass
    /// incremental against the first pass's.
    BtrfsSend,
}

/// The source's offer before a rootfs pass, best first.
#[derive(Debug, Serialize, Deserialize)]
pub struct RootfsOffer {
    pub methods: Vec<RootfsMethod>,
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

/// A transfer channel for a move in relay mode, opened to the relay by
/// one side: the relay opens `transfer` on to the other side, `to`, and
/// copies the bytes both ways.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RelayRequest {
    pub to: ferry_raft::NodeId,
    pub transfer: TransferRequest,
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
        /// The memory pages, when they went on a stream of their own
        /// during the dump (then the images that follow are the rest).
        pages: Option<PageStream>,
    },
    Refused(String),
}
