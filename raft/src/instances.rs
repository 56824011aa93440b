//! Instances in the replicated state: what runs where, at which epoch, and
//! the commands that change them. Apply is pure and deterministic; only the
//! owner of the current epoch may report what runs (DESIGN.md rule 1).

use serde::{Deserialize, Serialize};

use crate::ids::{JobId, NodeId};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceKind {
    #[default]
    Container,
    /// A QEMU virtual machine; its settings are `InstanceSpec::vm`.
    Vm,
}

impl InstanceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceKind::Container => "container",
            InstanceKind::Vm => "vm",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// The process to run (argv).
    pub command: Vec<String>,
    /// Memory limit through cgroups.
    pub memory_bytes: Option<u64>,
    /// Where the rootfs came from, for display; the bundle lives on the owner.
    pub rootfs_source: String,
    /// Runs without the default seccomp filter (`--security-profile
    /// unconfined`).
    pub unconfined: bool,
    /// What the owner does when the process ends without ferry ending it.
    pub restart: RestartPolicy,
    /// What an evacuation of its member does with it.
    pub evacuate: crate::hosts::EvacuatePolicy,
    /// `--network`: on the cluster network, or only its own loopback.
    pub network: NetworkMode,
    /// The instance's address on the cluster network: asked for with
    /// `--ip` or leased by apply; kept through moves and stops, freed with
    /// the instance.
    pub address: Option<std::net::Ipv4Addr>,
    /// A VM's machine: set exactly when the instance's kind is `Vm`.
    pub vm: Option<VmSpec>,
    /// The process's environment (`NAME=value`); empty: only a `PATH`.
    /// From the image config of `ferry launch --image`.
    pub env: Vec<String>,
    /// The process's working directory; empty: `/`.
    pub cwd: String,
    /// The uid and gid the process runs as; `None`: root.
    pub user: Option<(u32, u32)>,
    /// The image (its id, `ferry launch --image`) whose unpacked tree in
    /// its member's image store lies read-only under the instance's own
    /// changes (overlayfs); `None`: the rootfs is a tree of its own.
    pub image: Option<String>,
}

/// What a VM instance's QEMU runs with (`ferry launch --vm`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub cpus: u32,
    pub memory_mib: u64,
    /// A named QEMU CPU model (never `host`: the VM could not move).
    pub cpu_model: String,
    /// Booted from a kernel (and initrd) kept beside its disk, with this
    /// command line; otherwise from the disk.
    pub kernel: bool,
    pub initrd: bool,
    pub append: Option<String>,
    /// The disk's virtual size: a live move makes an empty disk of this
    /// size on the target for the source to mirror into.
    pub disk_bytes: u64,
}

/// `--network`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A network namespace with only loopback.
    #[default]
    None,
    /// An address on the cluster network, reachable from every member.
    Cluster,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Cluster => "cluster",
        }
    }
}

/// `--restart`: what the owner does when the instance's process ends on its
/// own (it exited or crashed, or the host restarted under it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartPolicy {
    /// Start it again, with a growing delay between restarts.
    #[default]
    Always,
    /// Leave it stopped (reported as such).
    Never,
    /// Start it again (as `Always`) unless it exited with code 0.
    #[serde(rename = "on-failure")]
    OnFailure,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::Never => "never",
            RestartPolicy::OnFailure => "on-failure",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    #[default]
    Running,
    Stopped,
}

/// What the owner last reported. CLI.md's `state` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObservedState {
    /// Created in the state; the owner has not reported yet.
    #[default]
    Pending,
    Running,
    Stopped,
    Frozen,
    Migrating,
    Error,
    /// Its owner was removed from the cluster (`cluster remove --force`):
    /// nothing runs it; `ferry delete` drops the record. Last: variants are
    /// encoded by position.
    Lost,
}

impl ObservedState {
    pub fn as_str(self) -> &'static str {
        match self {
            ObservedState::Pending => "pending",
            ObservedState::Running => "running",
            ObservedState::Stopped => "stopped",
            ObservedState::Frozen => "frozen",
            ObservedState::Migrating => "migrating",
            ObservedState::Error => "error",
            ObservedState::Lost => "lost",
        }
    }
}

/// The host features an instance's processes may depend on: recorded on
/// the host where they last started or were restored. A migration target
/// must offer at least these.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    pub node: NodeId,
    pub arch: String,
    pub kernel: String,
    pub cpu_flags: Vec<String>,
    pub syscalls: Vec<String>,
    /// Filesystem types mounted inside the instance.
    pub filesystems: Vec<String>,
    /// `criu --version` of the host that recorded the baseline.
    pub criu: Option<String>,
    pub recorded_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub name: String,
    /// Holds memory state (a CRIU checkpoint) as well as the rootfs.
    pub stateful: bool,
    pub created_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub name: String,
    pub kind: InstanceKind,
    pub spec: InstanceSpec,
    /// The only node that may run the instance (at `epoch`).
    pub owner: NodeId,
    /// Bumped whenever ownership changes; reports from older epochs are
    /// refused.
    pub epoch: u64,
    pub desired: DesiredState,
    pub observed: ObservedState,
    /// Error text or other detail from the owner's last report.
    pub detail: Option<String>,
    /// A stateful stop left a checkpoint on the owner; start restores it.
    pub checkpointed: bool,
    pub baseline: Option<Baseline>,
    pub snapshots: Vec<SnapshotRecord>,
    pub created_ms: u64,
    /// The active job (migration) holding the instance, if any.
    pub job: Option<JobId>,
    /// Times the owner started it again after it ended on its own, and why
    /// the last time.
    pub restarts: u32,
    pub last_restart: Option<String>,
    /// Set by an evacuation, for the restore that brings it home.
    pub origin: Option<crate::hosts::Origin>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceCommand {
    Create {
        name: String,
        kind: InstanceKind,
        spec: InstanceSpec,
        owner: NodeId,
        desired: DesiredState,
        now_ms: u64,
    },
    SetDesired {
        name: String,
        desired: DesiredState,
    },
    /// The owner's report of what runs; refused unless it comes from the
    /// owner at the current epoch.
    Observe {
        name: String,
        node: NodeId,
        epoch: u64,
        observed: ObservedState,
        detail: Option<String>,
        checkpointed: bool,
    },
    RecordBaseline {
        name: String,
        node: NodeId,
        epoch: u64,
        baseline: Baseline,
    },
    AddSnapshot {
        name: String,
        snapshot: SnapshotRecord,
    },
    RemoveSnapshot {
        name: String,
        snapshot: String,
    },
    Delete {
        name: String,
    },
    /// The owner started the instance again after it ended on its own
    /// (`reason`); only from the owner at the current epoch.
    Restarted {
        name: String,
        node: NodeId,
        epoch: u64,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum InstanceRejection {
    #[error("an instance named '{0}' already exists")]
    Exists(String),
    #[error("no instance named '{0}'; 'ferry list' shows the instances")]
    NoInstance(String),
    #[error("node {node} does not own instance '{name}' (node {owner} does)")]
    NotOwner {
        name: String,
        node: NodeId,
        owner: NodeId,
    },
    #[error("report for '{name}' is from epoch {epoch}, the instance is at epoch {current}")]
    StaleEpoch {
        name: String,
        epoch: u64,
        current: u64,
    },
    #[error("instance '{name}' already has a snapshot named '{snapshot}'")]
    SnapshotExists { name: String, snapshot: String },
    #[error("instance '{name}' has no snapshot named '{snapshot}'")]
    NoSnapshot { name: String, snapshot: String },
    #[error("instance '{name}' is busy with job {job}; wait for it ('ferry job wait {job}') or abort it")]
    Busy { name: String, job: JobId },
    /// Appended last: variants are encoded by position.
    #[error("{0}")]
    BadName(String),
    #[error("this cluster has no cluster network (it was bootstrapped without --cluster-subnet); launch with --network none")]
    NoClusterNetwork,
    #[error("{address} is not an address an instance can hold on the cluster network {subnet} (not its base, gateway or broadcast); pick another with --ip or leave --ip out")]
    AddressOutside { address: String, subnet: String },
    #[error("{address} is already held by instance '{holder}'; pick another with --ip or leave --ip out")]
    AddressTaken { address: String, holder: String },
    #[error("every address of the cluster network {0} is held; delete an instance or launch with --network none")]
    SubnetFull(String),
    #[error("--ip needs --network cluster")]
    AddressWithoutNetwork,
    #[error("a VM instance needs its machine (--vm with --memory), and only a VM has one")]
    KindMismatch,
}
