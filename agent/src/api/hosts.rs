//! Host workflow requests and views: cordon, evacuate, restore, and
//! placement's verdicts.

use ferry_raft::{EvacuateMode, JobId};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvacuateRequest {
    pub member: String,
    pub mode: EvacuateMode,
    pub parallel: u32,
    pub dry_run: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpgradeRequest {
    pub hook: String,
    pub verify: Option<String>,
    /// Member names in order; empty: every member.
    pub members: Vec<String>,
    pub max_unavailable: u32,
    pub dry_run: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpgradeView {
    pub hook: String,
    pub verify: Option<String>,
    pub max_unavailable: u32,
    pub members: Vec<UpgradeMemberView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpgradeMemberView {
    pub name: String,
    /// "waiting" | "evacuating" | "hook" | "verified" | "restoring" | "done" | "failed"
    pub stage: String,
    pub evacuation: Option<JobId>,
    pub restore: Option<JobId>,
    /// What changed on the host ("kernel: a -> b", "syscalls: +x").
    pub diff: Vec<String>,
    pub detail: Option<String>,
}

/// An evacuation, restore or upgrade as `ferry job show --format json`
/// prints it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostJobView {
    pub id: JobId,
    /// "evacuate" | "restore"
    pub kind: String,
    pub member: String,
    pub mode: String,
    pub parallel: u32,
    /// "running" | "aborting" | "done"
    pub state: String,
    pub items: Vec<HostItemView>,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
    /// The upgrade this job is a step of.
    pub parent: Option<JobId>,
    pub upgrade: Option<UpgradeView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostItemView {
    pub instance: String,
    /// "waiting" | "moving" | "moved" | "stopped" | "started" | "stayed" | "failed"
    pub state: String,
    /// The child move, its phase and figures.
    pub child: Option<JobId>,
    pub child_phase: Option<String>,
    pub target: Option<String>,
    pub detail: Option<String>,
    pub downtime_ms: Option<u64>,
}

/// What a dry run would do with one instance.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlannedItem {
    pub instance: String,
    pub action: String,
}

/// One member's verdict from placement (`--dry-run` without `--target`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CandidateView {
    pub name: String,
    pub score: Option<i64>,
    pub rejected: Option<String>,
}
