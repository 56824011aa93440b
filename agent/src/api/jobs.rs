//! Job requests and views: `ferry move` and `ferry job ...`.

use ferry_raft::{CheckResult, JobId};
use serde::{Deserialize, Serialize};

/// What `ferry move` asks for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MoveRequest {
    pub instance: String,
    /// None: chosen by placement.
    pub target: Option<String>,
    /// None: stateful if the instance runs, else stateless.
    pub stateful: Option<bool>,
    pub mode: MoveMode,
    /// A VM's live move: `--downtime-limit`, `--bandwidth`, `--multifd`,
    /// `--postcopy`.
    pub live: ferry_raft::LiveSettings,
    pub dry_run: bool,
}

/// Who opens a move's transfer channels: `ferry move --mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveMode {
    /// The target, to the source.
    Pull,
    /// The source, to the target.
    Push,
    /// Both, to the agent this request goes to, which bridges them (a
    /// source and target that cannot reach each other).
    Relay,
}

/// A job as `ferry job show --format json` prints it (CLI.md).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobView {
    pub id: JobId,
    pub kind: String,
    pub instance: String,
    pub source: String,
    pub target: String,
    /// The evacuation or restore it is part of.
    pub parent: Option<JobId>,
    pub phase: String,
    pub done: bool,
    pub succeeded: bool,
    pub stateful: bool,
    /// Who opened the transfer channels: "pull", "push" or "relay via
    /// NODE".
    #[serde(default)]
    pub mode: String,
    pub error: Option<String>,
    pub report: Vec<CheckResult>,
    pub notes: Vec<String>,
    pub abort_requested: bool,
    pub created_ms: u64,
    pub downtime_ms: Option<u64>,
    pub total_ms: Option<u64>,
    pub bytes: Option<u64>,
    pub iterations: Option<u32>,
    /// While the transfer runs: what is being sent and the bytes so far.
    pub progress: Option<TransferProgress>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferProgress {
    /// "rootfs", "memory images" or "rootfs delta"; a VM's "boot files",
    /// "disk" (the mirror) and "memory" (QEMU's migration stream).
    pub stage: String,
    /// File bytes received so far, all stages together.
    pub bytes: u64,
    /// The bytes of each stage so far.
    #[serde(default)]
    pub parts: Vec<(String, u64)>,
}
