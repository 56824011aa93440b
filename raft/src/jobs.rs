//! Migration jobs in the replicated state. Every phase change is a
//! compare-and-set (`from` → `to`) checked against the phase graph, so a
//! retried or duplicated proposal is harmless and of two racing proposals
//! at most one commits. Ownership moves only through these transitions:
//! `Switched` makes the target the owner, `SwitchingBack` makes the source
//! the owner again, each with a new epoch (DESIGN.md rules 1–4).

use serde::{Deserialize, Serialize};

use crate::ids::{JobId, NodeId};
use crate::instances::InstanceRejection;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    #[default]
    Migrate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Checking,
    Preparing,
    /// Pre-copy iteration n (from 1).
    Precopy(u32),
    Frozen,
    Switched,
    Restored,
    Done,
    RollingBack,
    RolledBack,
    SwitchingBack,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Done | Phase::RolledBack)
    }

    /// Before `Switched`: the source still owns the instance.
    pub fn before_switch(self) -> bool {
        matches!(
            self,
            Phase::Pending | Phase::Checking | Phase::Preparing | Phase::Precopy(_) | Phase::Frozen
        )
    }

    /// The phase graph of DESIGN.md "Migration job phases".
    pub fn may_advance_to(self, to: Phase) -> bool {
        use Phase::*;
        match (self, to) {
            (Pending, Checking) => true,
            (Pending | Checking | Preparing | Precopy(_) | Frozen, RollingBack) => true,
            (Checking, Preparing) => true,
            (Preparing, Precopy(1)) => true,
            (Precopy(n), Precopy(m)) => m == n + 1,
            (Preparing | Precopy(_), Frozen) => true,
            (Frozen, Switched) => true,
            (Switched, Restored | SwitchingBack) => true,
            (Restored, Done) => true,
            (RollingBack | SwitchingBack, RolledBack) => true,
            _ => false,
        }
    }

    pub fn name(self) -> String {
        match self {
            Phase::Precopy(n) => format!("Precopy({n})"),
            other => format!("{other:?}"),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferMode {
    /// The target connects to the source.
    #[default]
    Pull,
    /// The source connects to the target.
    Push,
    /// The target pulls through `via`, a third member that reaches both
    /// (`ferry move --mode relay`: the agent the CLI talks to), for a
    /// source and target that cannot reach each other. Every transfer
    /// channel either side opens goes to `via`, which opens it on to the
    /// other side and copies the bytes both ways.
    Relay { via: NodeId },
}

impl TransferMode {
    /// Whether the source opens the transfer channels (else the target).
    pub fn pushes(self) -> bool {
        self == TransferMode::Push
    }

    /// The member every transfer channel goes through, if any.
    pub fn relay(self) -> Option<NodeId> {
        match self {
            TransferMode::Relay { via } => Some(via),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveOptions {
    /// Move memory state (CRIU); false: stop, copy, start.
    pub stateful: bool,
    pub mode: TransferMode,
    /// For a runtime that moves the instance itself (a VM's QEMU).
    pub live: LiveSettings,
}

/// How a runtime that moves an instance itself (QEMU) runs a live move.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveSettings {
    /// The longest pause the runtime aims for at the switchover, in ms
    /// (0: 300).
    pub downtime_limit_ms: u64,
    /// Bytes per second at most (0: as fast as the link goes).
    pub bandwidth: u64,
    /// Memory over this many parallel connections (QEMU's multifd; 0: one
    /// connection, no multifd).
    pub multifd_channels: u8,
    /// Post-copy: the target runs from the switchover and fetches the
    /// pages it lacks from the source. Once it runs there is no way back.
    pub postcopy: bool,
}

impl Default for MoveOptions {
    fn default() -> Self {
        MoveOptions {
            stateful: true,
            mode: TransferMode::Pull,
            live: LiveSettings::default(),
        }
    }
}

/// One item of the compatibility report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

/// Figures of a finished move.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveStats {
    /// Freeze on the source to thaw on the target.
    pub downtime_ms: u64,
    pub total_ms: u64,
    pub bytes: u64,
    pub iterations: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub kind: JobKind,
    pub instance: String,
    pub source: NodeId,
    pub target: NodeId,
    pub phase: Phase,
    pub options: MoveOptions,
    /// The instance ran on the source when the job was created: on
    /// rollback the source thaws it, else it stays stopped.
    pub was_running: bool,
    pub report: Vec<CheckResult>,
    pub error: Option<String>,
    /// Things a user should know, e.g. "pre-copy unavailable".
    pub notes: Vec<String>,
    pub stats: Option<MoveStats>,
    pub created_ms: u64,
    /// When the current phase was entered (for phase deadlines).
    pub phase_ms: u64,
    /// Abort was requested; participants roll back at the next chance.
    pub abort_requested: bool,
    /// The host job (evacuate, restore) this move is a child of.
    pub parent: Option<JobId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobCommand {
    /// Start moving `instance` to `target`; holds the instance until the
    /// job ends.
    CreateMove {
        instance: String,
        target: NodeId,
        options: MoveOptions,
        now_ms: u64,
    },
    /// Compare-and-set of the phase, with what the proposer learned.
    Advance {
        id: JobId,
        from: Phase,
        to: Phase,
        now_ms: u64,
        error: Option<String>,
        report: Option<Vec<CheckResult>>,
        note: Option<String>,
        stats: Option<MoveStats>,
    },
    /// Ask the participants to roll back (only before `Switched`).
    RequestAbort { id: JobId },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum JobRejection {
    #[error("no job {0}")]
    NoJob(JobId),
    #[error("job {id} is in phase {current}, not {expected}; someone else moved it on")]
    PhaseMoved {
        id: JobId,
        expected: String,
        current: String,
    },
    #[error("job {id} cannot go from {from} to {to}")]
    BadTransition { id: JobId, from: String, to: String },
    #[error("instance '{instance}' is already on member {target}")]
    AlreadyThere { instance: String, target: NodeId },
    #[error("no member with id {0}")]
    NoTarget(NodeId),
    #[error("job {0} has passed the switch; it can no longer be aborted")]
    TooLateToAbort(JobId),
    #[error(transparent)]
    Instance(#[from] InstanceRejection),
    #[error(
        "member {via} cannot relay this move: the relay must be a member that is neither \
         its source nor its target"
    )]
    BadRelay { via: NodeId },
}
