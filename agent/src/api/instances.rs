//! Instance requests and views exchanged by the CLI and agents.

use ferry_raft::{Baseline, SnapshotRecord};

use super::names::{InstanceName, SnapshotName};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LaunchRequest {
    pub name: InstanceName,
    /// A directory or tar archive on the host of the agent that receives
    /// the request (the CLI's host).
    pub rootfs: String,
    pub target: Option<String>,
    pub memory_bytes: Option<u64>,
    pub command: Vec<String>,
    /// Without the default seccomp filter.
    pub unconfined: bool,
    pub restart: ferry_raft::RestartPolicy,
    pub evacuate: ferry_raft::EvacuatePolicy,
    /// `--network`; without it: on the cluster network when there is one
    /// (or `--ip` is given).
    pub network: Option<ferry_raft::NetworkMode>,
    /// `--ip`: this address on the cluster network, else one leased.
    pub ip: Option<std::net::Ipv4Addr>,
    /// `--vm`: a QEMU VM instead of a container (then `rootfs` and
    /// `command` are empty).
    pub vm: Option<VmLaunch>,
    /// `--image`: an OCI image layout or an image archive on the host of
    /// the agent that receives the request (then `rootfs` is empty and
    /// `command`, if given, replaces the image's command).
    pub image: Option<String>,
}

/// What `ferry launch --vm` gives: paths on the host of the agent that
/// receives the request, and the machine.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmLaunch {
    pub disk: String,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// `None`: the agent picks one every member runs.
    pub cpu_model: Option<String>,
}

/// The rootfs of a reserved instance follows; its spec is the one in the
/// replicated state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UploadRequest {
    pub name: InstanceName,
    /// The image the instance lies on (its spec's): the owner answers
    /// first whether its store lacks it, and only then is a tree (the
    /// image's) sent.
    pub image: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum InstanceOp {
    Start,
    Stop {
        stateful: bool,
        force: bool,
    },
    Delete {
        force: bool,
    },
    Exec {
        argv: Vec<String>,
    },
    SnapshotCreate {
        snapshot: SnapshotName,
        stateful: bool,
    },
    SnapshotRestore {
        snapshot: SnapshotName,
    },
    SnapshotDelete {
        snapshot: SnapshotName,
    },
}

/// `ferry list --format json` (CLI.md).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceView {
    pub name: String,
    pub kind: String,
    pub node: String,
    pub state: String,
    pub epoch: u64,
    /// Its address on the cluster network.
    pub address: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceDetail {
    pub view: InstanceView,
    pub desired: String,
    /// "default" (seccomp filter, pids limit) or "unconfined".
    pub security_profile: String,
    /// "always" or "never", with how many restarts and why the last.
    pub restart: String,
    pub restarts: u32,
    pub last_restart: Option<String>,
    pub detail: Option<String>,
    pub checkpointed: bool,
    pub command: Vec<String>,
    pub memory_bytes: Option<u64>,
    pub rootfs_source: String,
    pub baseline: Option<Baseline>,
    pub snapshots: Vec<SnapshotRecord>,
    pub job: Option<u64>,
    /// Its evacuation policy (`--evacuate`).
    pub evacuate: String,
    /// The member an evacuation took it from (a restore brings it back).
    pub origin: Option<String>,
    /// A VM's machine.
    pub vm: Option<ferry_raft::VmSpec>,
    /// The process's environment beyond the default `PATH` (an image's).
    pub env: Vec<String>,
    /// Its working directory (`/` unless an image set one).
    pub cwd: String,
    /// `uid:gid` it runs as (`0:0` unless an image named a user).
    pub user: String,
    /// The image its rootfs lies on, shared read-only with the other
    /// instances of its member that use it (its own changes above it).
    pub layered_on: Option<String>,
}
