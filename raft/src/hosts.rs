//! Host workflows in the replicated state: a parent job (evacuate or
//! restore a member) whose children are ordinary moves. The parent lists
//! every instance it deals with and what became of each; the leader's
//! host-job loop proposes each next step, and any leader carries on from
//! what is committed here.

use serde::{Deserialize, Serialize};

use crate::ids::{JobId, NodeId};
use crate::jobs::MoveOptions;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostJobKind {
    Evacuate,
    Restore,
    /// A rolling upgrade: for each member in turn, evacuate, run the hook
    /// there, verify, restore (`HostJob::upgrade`).
    Upgrade,
}

impl HostJobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HostJobKind::Evacuate => "evacuate",
            HostJobKind::Restore => "restore",
            HostJobKind::Upgrade => "upgrade",
        }
    }
}

/// `ferry cluster evacuate --mode`: what to do with an instance whose own
/// policy is `auto`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvacuateMode {
    /// Live if it runs and a compatible member exists, else stop it with
    /// its state kept.
    #[default]
    Auto,
    /// Live, or stop it with its state kept.
    Live,
    /// Stop, copy, start elsewhere.
    Stateless,
    /// Stop it in place with its state kept.
    Stop,
}

/// `ferry launch --evacuate`: an instance's own evacuation policy, which
/// wins over the job's mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvacuatePolicy {
    /// Whatever the evacuation's `--mode` says.
    #[default]
    Auto,
    Live,
    Stateless,
    Stop,
    /// Left where it is, running.
    Stay,
}

impl EvacuatePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            EvacuatePolicy::Auto => "auto",
            EvacuatePolicy::Live => "live",
            EvacuatePolicy::Stateless => "stateless",
            EvacuatePolicy::Stop => "stop",
            EvacuatePolicy::Stay => "stay",
        }
    }
}

/// What became of one instance of a host job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemState {
    /// Nothing done yet.
    Waiting,
    /// A child move runs (`HostItem::child`).
    Moving,
    /// Moved (to `HostItem::target`).
    Moved,
    /// Stopped where it is, its state kept (evacuate), or started again
    /// where it is (restore).
    Stopped,
    Started,
    /// Left as it was, for the reason in `detail`.
    Stayed,
    /// Could not be dealt with; `detail` says why.
    Failed,
}

impl ItemState {
    pub fn is_final(self) -> bool {
        !matches!(self, ItemState::Waiting | ItemState::Moving)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ItemState::Waiting => "waiting",
            ItemState::Moving => "moving",
            ItemState::Moved => "moved",
            ItemState::Stopped => "stopped",
            ItemState::Started => "started",
            ItemState::Stayed => "stayed",
            ItemState::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostItem {
    pub instance: String,
    pub state: ItemState,
    /// The latest child move.
    pub child: Option<JobId>,
    pub target: Option<NodeId>,
    pub detail: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostJob {
    pub id: JobId,
    pub kind: HostJobKind,
    pub member: NodeId,
    pub mode: EvacuateMode,
    /// Children running at once, at most.
    pub parallel: u32,
    /// In the order they are dealt with.
    pub items: Vec<HostItem>,
    /// `job abort`: no new children; running ones finish or roll back.
    pub abort_requested: bool,
    pub created_ms: u64,
    /// Set when every item is final.
    pub finished_ms: Option<u64>,
    /// The upgrade this evacuation or restore is a step of.
    pub parent: Option<JobId>,
    /// An upgrade's members and where each stands.
    pub upgrade: Option<Upgrade>,
}

/// Where one member of a rolling upgrade stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Waiting,
    /// Its evacuation (`UpgradeMember::evacuation`) runs.
    Evacuating,
    /// Its agent runs the hook (which may restart the agent or the host).
    Hook,
    /// The hook ended well and the member checked out (facts diff, CRIU,
    /// `--verify`); its restore comes next.
    Verified,
    /// Its restore (`UpgradeMember::restore`) runs.
    Restoring,
    Done,
    /// Stopped here; `detail` says why; `--resume` retries this stage.
    Failed,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Waiting => "waiting",
            Stage::Evacuating => "evacuating",
            Stage::Hook => "hook",
            Stage::Verified => "verified",
            Stage::Restoring => "restoring",
            Stage::Done => "done",
            Stage::Failed => "failed",
        }
    }

    /// Under way: counts against `--max-unavailable`.
    pub fn in_progress(self) -> bool {
        !matches!(self, Stage::Waiting | Stage::Done | Stage::Failed)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeMember {
    pub member: NodeId,
    pub stage: Stage,
    /// The stage a failure happened in (what `--resume` retries).
    pub failed_in: Option<Stage>,
    pub evacuation: Option<JobId>,
    pub restore: Option<JobId>,
    /// Its facts when its evacuation started, and what changed after the
    /// hook ("kernel: 6.1 -> 6.2", "syscalls: +openat3").
    pub facts_before: Option<crate::model::HostFacts>,
    pub diff: Vec<String>,
    pub detail: Option<String>,
    /// Bumped by each `--resume`: a new attempt runs the hook afresh.
    pub attempt: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upgrade {
    /// The operator's command, run by each member's agent with `sh`.
    pub hook: String,
    /// Run after the hook on the member; it must exit 0.
    pub verify: Option<String>,
    pub members: Vec<UpgradeMember>,
    pub max_unavailable: u32,
}

impl Upgrade {
    pub fn member(&self, id: NodeId) -> Option<&UpgradeMember> {
        self.members.iter().find(|m| m.member == id)
    }
}

impl HostJob {
    pub fn is_done(&self) -> bool {
        self.finished_ms.is_some()
    }

    pub fn item(&self, instance: &str) -> Option<&HostItem> {
        self.items.iter().find(|i| i.instance == instance)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostJobCommand {
    /// Start evacuating or restoring `member`. Apply lists the items from
    /// the state it applies to (evacuate: every instance the member owns;
    /// restore: every instance whose origin is the member), cordons the
    /// member (evacuate) or uncordons it (restore).
    Create {
        kind: HostJobKind,
        member: NodeId,
        mode: EvacuateMode,
        parallel: u32,
        now_ms: u64,
    },
    /// A waiting item's child move: created here, in the same entry.
    StartMove {
        id: JobId,
        instance: String,
        target: NodeId,
        options: MoveOptions,
        now_ms: u64,
    },
    /// An item's outcome. `Moved`, `Stopped` and `Started` also record or
    /// clear the instance's origin.
    Settle {
        id: JobId,
        instance: String,
        state: ItemState,
        detail: Option<String>,
    },
    /// Every item is final: the member is `evacuated` (or `online`).
    Finish {
        id: JobId,
        now_ms: u64,
    },
    RequestAbort {
        id: JobId,
    },
    /// `ferry cluster cordon|uncordon`.
    Cordon {
        member: NodeId,
        cordoned: bool,
    },
    CreateUpgrade {
        hook: String,
        verify: Option<String>,
        members: Vec<NodeId>,
        max_unavailable: u32,
        now_ms: u64,
    },
    /// Compare-and-set of one upgrade member's stage. Going to
    /// `Evacuating` or `Restoring` creates that child job in the same
    /// entry; going to `Evacuating` records the member's facts as
    /// `facts_before`.
    UpgradeStage {
        id: JobId,
        member: NodeId,
        from: Stage,
        to: Stage,
        detail: Option<String>,
        diff: Option<Vec<String>>,
        now_ms: u64,
    },
    /// `ferry cluster upgrade --resume`: the failed member retries the
    /// stage it failed in.
    ResumeUpgrade {
        id: JobId,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum HostJobRejection {
    #[error("no host job {0}")]
    NoJob(JobId),
    #[error("no member with id {0}")]
    NoMember(NodeId),
    #[error("member {member} is already in host job {job}; wait for it or abort it ('ferry job abort {job}')")]
    MemberBusy { member: NodeId, job: JobId },
    #[error("host job {id} has no waiting item '{instance}'")]
    NotWaiting { id: JobId, instance: String },
    #[error("host job {id} has no item '{instance}'")]
    NoItem { id: JobId, instance: String },
    #[error("host job {0} still has items in progress")]
    NotFinished(JobId),
    #[error("host job {0} is finished")]
    Finished(JobId),
    #[error(
        "upgrade job {id}: member {member} is {current}, not {expected}; someone else moved it on"
    )]
    StageMoved {
        id: JobId,
        member: NodeId,
        expected: String,
        current: String,
    },
    #[error("an upgrade (job {0}) is already under way; wait for it, or abort it with 'ferry job abort {0}'")]
    UpgradeRunning(JobId),
    #[error("job {0} is not an upgrade")]
    NotAnUpgrade(JobId),
    #[error("upgrade job {0} has no failed member to resume")]
    NothingToResume(JobId),
}

/// Where an evacuation left an instance, for the restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The member it was evacuated from.
    pub member: NodeId,
    /// Stopped in place (its state kept) rather than moved.
    pub stopped: bool,
}
