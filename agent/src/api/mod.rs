//! What agents and the CLI say to each other: one request and one response
//! per QUIC bi-stream, framed and size-capped by ferry-transport. Every wire
//! type lives here (layer 0), so the CLI and every feature share one
//! vocabulary without importing each other.

pub mod events;
pub mod hosts;
pub mod instances;
pub mod jobs;
pub mod names;
pub mod network;
pub mod transfer;

use ferry_raft::network::{RaftReply, RaftRequest};
use ferry_raft::{Command, CommandResult, HostFacts, NodeId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Raft traffic between members (node certificates only).
    Raft(RaftRequest),
    /// A new host asking to join (the only request allowed without a
    /// client certificate).
    Join(JoinRequest),
    /// Liveness probe; answers with the agent's identity.
    Ping,
    /// Operator and internal commands (admin or node certificates).
    Api(ApiRequest),
    /// Opens a channel carrying an instance's rootfs to its new owner
    /// (member certificates only).
    Upload(instances::UploadRequest),
    /// Opens a migration transfer channel (the job's target to its source).
    Transfer(transfer::TransferRequest),
    /// Opens a transfer channel through this member, the relay of a move
    /// in relay mode (the move's source or target only).
    Relay(transfer::RelayRequest),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    Raft(RaftReply),
    Joined(JoinAccepted),
    Pong { id: NodeId, name: String },
    Api(ApiReply),
    Error(ApiError),
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub name: String,
    /// The token's secret; the cluster stores only its hash.
    pub secret: String,
    /// The address the joiner will serve on.
    pub addr: String,
    /// PEM certificate signing request; only its public key is used.
    pub csr_pem: String,
    /// The same for the admin certificate the CLI on the joiner's host
    /// uses.
    pub admin_csr_pem: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinAccepted {
    pub id: NodeId,
    pub cert_pem: String,
    pub cert_serial: String,
    pub ca_pem: String,
    /// Signed by a voter and recorded with the member, like the node
    /// certificate. The CA key itself never goes to a joiner: only voters
    /// hold it (see ARCHITECTURE.md, "Trust").
    pub admin_cert_pem: String,
    /// Known members, so the joiner can check Raft senders' identities
    /// before its log has caught up.
    pub members: Vec<(NodeId, String)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ApiRequest {
    ClusterList,
    ClusterShow {
        name: String,
    },
    TokenCreate {
        name: String,
        ttl_secs: u64,
    },
    TokenList,
    TokenRevoke {
        name: String,
    },
    Remove {
        name: String,
        force: bool,
    },
    /// A state-machine write; forwarded to the leader by whoever receives it.
    Write(Command),
    /// Sent to a member that was removed, so it stops serving.
    Removed,
    /// A join that reached a member without the CA key, passed on to a
    /// voter once the token checked out there.
    ForwardedJoin(JoinRequest),
    /// The CA key, for a member that just became a voter.
    CaKey,
    Move(jobs::MoveRequest),
    Launch(instances::LaunchRequest),
    InstanceList,
    InstanceShow {
        name: String,
    },
    /// An operation that needs the owner's host; forwarded to the owner.
    Instance {
        name: String,
        op: instances::InstanceOp,
        /// Already forwarded once: do not forward again.
        forwarded: bool,
    },
    JobList,
    JobShow {
        id: ferry_raft::JobId,
    },
    JobAbort {
        id: ferry_raft::JobId,
    },
    /// Live transfer figures of a job, from the agent that receives.
    JobProgress {
        id: ferry_raft::JobId,
    },
    /// Whether the asked agent runs its copy of the job's instance (the
    /// supervisor finishing a job whose target's `Done` was lost; members
    /// only).
    JobTargetRuns {
        id: ferry_raft::JobId,
    },
    /// `ferry cluster cordon|uncordon`.
    Cordon {
        name: String,
        cordoned: bool,
    },
    Evacuate(hosts::EvacuateRequest),
    Restore {
        member: String,
        dry_run: bool,
    },
    HostJobList,
    Upgrade(hosts::UpgradeRequest),
    ResumeUpgrade {
        id: ferry_raft::JobId,
    },
    /// Placement's verdict on every member for `instance` (a new instance
    /// when `None`).
    Placement {
        instance: Option<String>,
        stateful: Option<bool>,
    },
    /// The cluster network and its leases.
    Network,
    /// `ferry monitor`: the events of the entries after log index `after`
    /// (`u64::MAX`: none, only where "now" is), waiting up to `wait_ms` (at
    /// most 10 s) for one when there is none.
    Events {
        after: u64,
        wait_ms: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ApiReply {
    Members(Vec<MemberView>),
    Member(Box<MemberDetail>),
    Token {
        token: String,
    },
    Tokens(Vec<TokenView>),
    /// A committed write and its log index.
    Written {
        result: CommandResult,
        index: u64,
    },
    Done,
    /// A compatibility report (`ferry move --dry-run`).
    Report(Vec<ferry_raft::CheckResult>),
    Job(Box<jobs::JobView>),
    Jobs(Vec<jobs::JobView>),
    Progress(Option<jobs::TransferProgress>),
    Instances(Vec<instances::InstanceView>),
    Instance(Box<instances::InstanceDetail>),
    Exec {
        code: i32,
        #[serde(with = "serde_bytes")]
        stdout: Vec<u8>,
        #[serde(with = "serde_bytes")]
        stderr: Vec<u8>,
    },
    /// Answer to `JobTargetRuns`.
    Runs(bool),
    /// A forwarded join, accepted by a voter.
    Joined(Box<JoinAccepted>),
    CaKey {
        key_pem: String,
    },
    HostJob(Box<hosts::HostJobView>),
    HostJobs(Vec<hosts::HostJobView>),
    /// What an evacuation or restore would do (`--dry-run`).
    HostPlan(Vec<hosts::PlannedItem>),
    Placement(Vec<hosts::CandidateView>),
    Network(network::NetworkView),
    Events(events::EventsView),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberView {
    pub name: String,
    pub id: NodeId,
    pub address: String,
    /// "voter" | "learner" | "none" (not yet in the Raft membership)
    pub role: String,
    pub leader: bool,
    /// "alive" | "suspect" | "dead"
    pub liveness: String,
    /// "online" | "evacuating" | "evacuated"
    pub state: String,
    /// Gets no new instances (`cluster cordon`, an evacuation).
    pub cordoned: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberDetail {
    // Not `#[serde(flatten)]`: bincode cannot decode it. The CLI flattens
    // for JSON output.
    pub member: MemberView,
    pub facts: Option<HostFacts>,
    /// Raft progress, when the shown member is the agent answering.
    pub raft: Option<RaftStatus>,
    /// Load facts heard through gossip.
    pub load: Option<LoadView>,
    /// Serials of the admin certificates its agent issued (revoked with it).
    pub admin_certificates: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadView {
    pub memory_free_bytes: u64,
    /// Free disk above the member's `--disk-reserve`.
    pub disk_room_bytes: u64,
    /// 1, 5 and 15 minute load averages.
    pub load_average: Vec<f32>,
    pub running_instances: u32,
    pub agent_version: String,
    /// How long ago this agent heard these figures.
    pub age_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RaftStatus {
    pub term: u64,
    pub last_log_index: u64,
    pub last_applied_index: u64,
    /// Index covered by the latest snapshot (0: none yet).
    pub snapshot_index: u64,
    /// Entries up to here were removed from the log (0: none).
    pub purged_index: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenView {
    pub name: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// "valid" | "used" | "expired" | "revoked"
    pub status: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    BadRequest,
    NotFound,
    Conflict,
    Unauthorized,
    Unavailable,
    Internal,
}

/// An error as the caller sees it: one line that says what failed and, where
/// it can, what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }
}

/// A peer or member address from the wire or the state.
pub fn parse_addr(text: &str) -> Result<std::net::SocketAddr, ApiError> {
    text.parse().map_err(|_| {
        ApiError::new(
            ErrorKind::BadRequest,
            format!("'{text}' is not an IP:port address"),
        )
    })
}
