//! What can go wrong in a move, carried to the job's error text.

use ferry_raft::Job;
use ferry_transport::frame::FrameError;

use crate::api::names::{InstanceName, NameError};

use crate::driver::DriverError;
use crate::node::peers::PeerError;
use crate::transfer::tree::TreeError;

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("cannot open a transfer channel: {0}")]
    Channel(#[source] PeerError),
    #[error("{0}")]
    Tree(#[from] TreeError),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Btrfs(#[from] crate::transfer::btrfs::BtrfsError),
    #[error("{0}")]
    Driver(#[from] DriverError),
    #[error("the source refused to freeze: {0}")]
    SourceRefused(String),
    #[error("{target} could not take it: {why}")]
    TargetFailed { target: String, why: String },
    #[error("no answer from {target}: {source}")]
    NoAnswer {
        target: String,
        #[source]
        source: FrameError,
    },
    #[error("the job is no longer in a phase that allows freezing")]
    NoLongerFreezable,
    #[error("instance '{0}' vanished from the cluster state")]
    InstanceGone(String),
    #[error("node {0} is not a member")]
    NotAMember(ferry_raft::NodeId),
    #[error("could not record the frozen phase")]
    NotRecorded,
    #[error(transparent)]
    Name(#[from] NameError),
    /// A relayed stream: a VM's migration streams, a container's pages.
    #[error("the relayed stream failed: {0}")]
    Relay(#[from] std::io::Error),
    /// Something on this host (a socket, a directory).
    #[error("{0}")]
    Local(String),
}

/// The job's instance as a validated name (apply validates every name at
/// `Create`, so this fails only for a corrupted state).
pub fn instance_name(job: &Job) -> Result<InstanceName, MoveError> {
    Ok(InstanceName::parse(&job.instance)?)
}
