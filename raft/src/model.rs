//! The replicated data model: what the cluster state machine holds and the
//! commands that change it. Pure data; `state.rs` applies commands.

use std::collections::BTreeMap;
use std::fmt;

pub use imbl::OrdMap;

use serde::{Deserialize, Serialize};

pub use crate::ids::NodeId;

/// What openraft carries for each node in the membership config: enough to
/// open a mutually authenticated QUIC connection to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub addr: String,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    #[default]
    Online,
    Evacuating,
    Evacuated,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Online => "online",
            MemberState::Evacuating => "evacuating",
            MemberState::Evacuated => "evacuated",
        }
    }
}

/// Versions of the runtimes an agent found on its host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtimes {
    /// `runc --version` first line's version, when runc is installed.
    pub runc: Option<String>,
    /// `criu --version`, when criu is installed.
    pub criu: Option<String>,
    /// Whether `criu check` passed on this host.
    pub criu_check: bool,
    /// Whether this host's CRIU can dump a process holding an internet
    /// socket (CRIU before 4.2 cannot on kernels 6.16 and later).
    pub criu_inet: bool,
    /// Whether the agent holds CAP_SYS_RESOURCE, without which CRIU cannot
    /// checkpoint a process running as another user than root (the kernel
    /// refuses prlimit of another user's task): true on an ordinary host,
    /// false in a container that drops the capability.
    pub criu_other_users: bool,
    /// Whether containers here can lie on a shared image (overlayfs with
    /// its upper dir on the data dir's filesystem): a layered instance
    /// moves only to a member that can.
    pub image_layers: bool,
    /// `qemu-system-<arch> --version`, when QEMU is installed.
    pub qemu: Option<String>,
    /// How this host's QEMU runs guests: "kvm", or "tcg" where KVM cannot
    /// run an ordinary guest.
    pub vm_accel: Option<String>,
    /// QEMU's CPU models here (`query-cpu-definitions` under `vm_accel`),
    /// each with the features it would need that this host lacks (empty:
    /// runnable; at most a few named).
    pub vm_cpu_models: BTreeMap<String, Vec<String>>,
}

/// Static facts about a host, collected at agent start and replicated
/// through Raft (fast-changing load figures go through gossip instead).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub arch: String,
    pub cpu_model: String,
    /// Sorted, deduplicated.
    pub cpu_flags: Vec<String>,
    pub kernel: String,
    /// Sorted syscall names without the arch prefix (e.g. "openat").
    pub syscalls: Vec<String>,
    /// Sorted filesystem type names from /proc/filesystems.
    pub filesystems: Vec<String>,
    pub memory_total_bytes: u64,
    /// Total bytes of the filesystem holding the agent's data dir.
    pub disk_total_bytes: u64,
    pub runtimes: Runtimes,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub name: String,
    pub addr: String,
    pub state: MemberState,
    /// Hex serial of the member's node certificate.
    pub cert_serial: String,
    pub joined_ms: u64,
    pub facts: Option<HostFacts>,
    /// Serials of the admin client certificates this member's agent issued
    /// (for the CLI on its host); revoked with the member.
    pub admin_serials: Vec<String>,
    /// Gets no new instances (`cluster cordon`, or an evacuation).
    pub cordoned: bool,
}

impl Member {
    /// A member just added or joined: online, facts not reported yet.
    pub fn online(id: NodeId, name: &str, addr: &str, cert_serial: &str, now_ms: u64) -> Self {
        Member {
            id,
            name: name.to_string(),
            addr: addr.to_string(),
            state: MemberState::Online,
            cert_serial: cert_serial.to_string(),
            joined_ms: now_ms,
            facts: None,
            admin_serials: Vec::new(),
            cordoned: false,
        }
    }
}

/// A join token as the cluster stores it: only a hash of the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// The member name the token admits; tokens are keyed by it.
    pub name: String,
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// The member whose clock set `created_ms` and `expires_ms`.
    pub created_by: NodeId,
    pub used: bool,
    pub revoked: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// How many voters the cluster keeps (3 or 5); the first members to
    /// join become voters up to this count, later ones learners.
    pub voters: u8,
    /// Hex SHA-256 of the cluster CA certificate (DER).
    pub ca_fingerprint: String,
    /// The cluster network's range (`--cluster-subnet`); without it
    /// instances have no network but their own loopback.
    pub subnet: Option<crate::subnet::Subnet>,
    /// Finished moves kept (the oldest go first; 0:
    /// [`DEFAULT_JOB_HISTORY`]), so the state does not grow with every
    /// move ever made.
    pub job_history: u32,
}

/// Finished moves a cluster keeps unless its bootstrap said otherwise.
pub const DEFAULT_JOB_HISTORY: u32 = 1000;

impl ClusterConfig {
    pub fn job_history(&self) -> usize {
        match self.job_history {
            0 => DEFAULT_JOB_HISTORY as usize,
            n => n as usize,
        }
    }
}

/// Everything the cluster state machine holds. The tables that grow with
/// the cluster are persistent maps (`imbl`): applying a batch to a copy
/// costs only what the batch changes, and the store writes just the rows
/// that differ from the state before the batch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub config: ClusterConfig,
    pub members: OrdMap<NodeId, Member>,
    pub tokens: OrdMap<String, JoinToken>,
    /// Hex serials of revoked certificates.
    pub revoked_serials: Vec<String>,
    /// Ids of members that were removed; the leader drops them from the
    /// Raft membership.
    pub removed_members: std::collections::BTreeSet<NodeId>,
    pub next_node_id: NodeId,
    pub instances: OrdMap<String, crate::instances::Instance>,
    pub jobs: OrdMap<crate::ids::JobId, crate::jobs::Job>,
    /// Evacuations and restores; their ids come from `next_job_id` too.
    pub host_jobs: OrdMap<crate::ids::JobId, crate::hosts::HostJob>,
    pub next_job_id: crate::ids::JobId,
    /// Results of the latest `Once` writes, oldest first, so that a write
    /// retried after its reply was lost gets its first result again.
    pub recent_requests: std::collections::VecDeque<(RequestId, CommandResult)>,
}

/// Names one write across all its retries (random, chosen by the agent that
/// takes the write first).
pub type RequestId = u64;

/// How many `Once` results the state keeps: far more than the writes that
/// can be in flight while one is retried.
pub const RECENT_REQUESTS: usize = 1024;

/// A change to the cluster state. Every time-dependent command carries the
/// proposer's clock (`now_ms`, Unix milliseconds) so that apply stays
/// deterministic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Set once at bootstrap.
    InitCluster {
        config: ClusterConfig,
    },
    /// Add a member with a known id (the bootstrap node, id 1).
    AddMember {
        id: NodeId,
        name: String,
        addr: String,
        cert_serial: String,
        now_ms: u64,
    },
    /// Consume the join token for `name` and add the member with a freshly
    /// allocated id. Fails without changing anything if the token is
    /// missing, revoked, used, expired, or the secret does not match, or the
    /// name is taken.
    JoinMember {
        name: String,
        secret_hash: String,
        addr: String,
        cert_serial: String,
        now_ms: u64,
        /// The member whose clock stamped `now_ms` (the signer).
        by: NodeId,
    },
    UpdateFacts {
        id: NodeId,
        facts: HostFacts,
    },
    /// Remove a member and revoke its certificate.
    RemoveMember {
        id: NodeId,
    },
    CreateToken {
        name: String,
        secret_hash: String,
        now_ms: u64,
        expires_ms: u64,
        /// The member whose clock stamped both times.
        by: NodeId,
    },
    RevokeToken {
        name: String,
    },
    Instance(crate::instances::InstanceCommand),
    Job(crate::jobs::JobCommand),
    /// `command` applied at most once for `request`: a retry of the same
    /// request returns the first result and changes nothing.
    Once {
        request: RequestId,
        command: Box<Command>,
    },
    /// Member `id`'s agent issued an admin client certificate. Last:
    /// variants are encoded by position.
    RecordAdminCert {
        id: NodeId,
        serial: String,
    },
    /// Host workflows (evacuate, restore, cordon).
    Host(crate::hosts::HostJobCommand),
    /// Changes nothing. A starting agent writes one and waits until its
    /// own state has applied it before it acts on that state: the store
    /// does not sync what it applies, so after a crash the state may be
    /// older than what this host already did.
    Barrier,
    /// Several commands committed in one entry (the agent's group commit),
    /// each applied as if alone: one result each, in order.
    Batch(Vec<Command>),
    /// A test build's bulk fill (`test_fill.rs`); absent from the binary
    /// users run.
    #[cfg(feature = "test-hooks")]
    TestFill {
        instances: u32,
        jobs: u32,
    },
}

/// Why a command was refused by the state machine. Carried back to the
/// proposer; each message says what failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error(
        "no join token exists for member '{0}'; create one with 'ferry cluster token create {0}'"
    )]
    NoToken(String),
    #[error("the join token for '{0}' was revoked; create a new one")]
    TokenRevoked(String),
    #[error("the join token for '{0}' was already used; create a new one")]
    TokenUsed(String),
    #[error("the join token for '{0}' expired; create a new one")]
    TokenExpired(String),
    #[error("the join token for '{0}' does not match (wrong secret)")]
    TokenMismatch(String),
    #[error("a member named '{0}' already exists")]
    NameTaken(String),
    #[error("a valid join token for '{0}' already exists; revoke it first")]
    TokenExists(String),
    #[error("no member with id {0}")]
    NoMember(NodeId),
    #[error("the cluster is already initialised")]
    AlreadyInitialised,
    #[error(transparent)]
    Instance(#[from] crate::instances::InstanceRejection),
    #[error(transparent)]
    Job(#[from] crate::jobs::JobRejection),
    #[error(transparent)]
    Host(#[from] crate::hosts::HostJobRejection),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    #[default]
    Done,
    /// `JoinMember` succeeded with this id.
    Joined {
        id: NodeId,
    },
    /// `JobCommand::CreateMove` succeeded with this job id.
    JobCreated {
        id: crate::ids::JobId,
    },
    Rejected(Rejection),
    /// One per command of a `Batch`.
    Batch(Vec<CommandResult>),
}
