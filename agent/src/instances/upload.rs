//! A launch's rootfs sent to a remote owner: a checksummed tree, or for an
//! instance on an image the image's tree, sent only when the owner's
//! image store lacks it (the owner says so first).

use std::path::Path;
use std::time::Duration;

use ferry_raft::{DesiredState, NodeId, ObservedState};
use ferry_transport::frame::{read_frame, write_frame, MAX_FRAME};

use super::launch::{prepare_local, reserved_spec};
use super::{driver_error, err, internal};
use crate::api::instances::{LaunchRequest, UploadRequest};
use crate::api::names::InstanceName;
use crate::api::transfer::ImageWanted;
use crate::api::{ApiError, ApiReply, ErrorKind, Request, Response};
use crate::node::Agent;
use crate::transfer::tree;

/// A launch waits this long for the rootfs to reach a remote owner.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// How long the owner waits to see the launcher's `Create` applied.
const RESERVATION_WAIT: Duration = Duration::from_secs(10);

/// The owner's first answer on a layered instance's upload.
type ImageAnswer = Result<ImageWanted, ApiError>;

/// Send the rootfs (or, with `image`, the image's tree if the owner lacks
/// it) to a remote owner over a channel, checksummed.
pub(super) async fn upload(
    agent: &Agent,
    owner: NodeId,
    req: &LaunchRequest,
    (rootfs, is_dir): (&Path, bool),
    image: Option<&str>,
) -> Result<(), ApiError> {
    let peer = agent.peer(owner)?;
    // A tar archive is unpacked here first, so owners and special files
    // travel the same way as from a directory.
    let staging = agent.data_dir().root().join("tmp").join(format!(
        "{}-{}",
        req.name.as_str(),
        ferry_transport::pki::random_hex(4)
    ));
    let send_root = if is_dir {
        rootfs.to_path_buf()
    } else {
        agent
            .driver()
            .stage_rootfs(rootfs, &staging)
            .await
            .map_err(driver_error)?;
        staging.clone()
    };
    let request = Request::Upload(UploadRequest {
        name: req.name.clone(),
        image: image.map(str::to_string),
    });
    let result = async {
        let (mut send, mut recv) = agent.open_channel(&peer, &request, UPLOAD_TIMEOUT).await?;
        let wanted = match image {
            Some(_) => match read_frame::<ImageAnswer>(&mut recv, MAX_FRAME).await {
                Ok(Ok(answer)) => answer.wanted,
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(no_answer(&peer.name, e)),
            },
            None => true,
        };
        if wanted {
            send_tree(&mut send, &mut recv, &send_root, &peer.name).await?;
        }
        let _ = send.finish();
        match read_frame::<Response>(&mut recv, MAX_FRAME).await {
            Ok(Response::Api(_)) => Ok(()),
            Ok(Response::Error(e)) => Err(e),
            Ok(_) => Err(internal("unexpected reply to the upload")),
            Err(e) => Err(no_answer(&peer.name, e)),
        }
    }
    .await;
    if !is_dir {
        let _ = tokio::fs::remove_dir_all(&staging).await;
    }
    result
}

fn no_answer(owner: &str, e: impl std::fmt::Display) -> ApiError {
    err(
        ErrorKind::Unavailable,
        format!("{owner} did not confirm the upload: {e}"),
    )
}

async fn send_tree(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    root: &Path,
    owner: &str,
) -> Result<(), ApiError> {
    if let Err(e) = tree::send(send, recv, root, false, None).await {
        let why = match tree::peer_failure(recv).await {
            Some(reason) => reason,
            None => e.to_string(),
        };
        let why = format!("sending the rootfs to {owner} failed: {why}");
        return Err(err(ErrorKind::Unavailable, why));
    }
    Ok(())
}

/// The owner's side of an upload: only for an instance reserved in the
/// replicated state with this agent as its owner, on the image the
/// launcher names; receive the tree (the rootfs, or the image's when the
/// store lacks it), write the config.
pub async fn receive_upload(
    agent: &Agent,
    req: UploadRequest,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let name = &req.name;
    let result = async {
        let reserved = match reserved_here(agent, name).await {
            Ok(()) => reserved_spec(agent, name).ok_or_else(|| {
                err(
                    ErrorKind::NotFound,
                    format!("'{name}' is no longer reserved"),
                )
            }),
            Err(e) => Err(e),
        };
        let spec = reserved.and_then(|spec| match spec.image == req.image {
            true => Ok(spec),
            false => Err(err(
                ErrorKind::Conflict,
                format!("the launch of '{name}' and its reservation name different images"),
            )),
        });
        let spec = match spec {
            Ok(spec) => spec,
            Err(e) => {
                // The launcher of a layered instance waits for this first.
                if req.image.is_some() {
                    let _ = write_frame(&mut send, &ImageAnswer::Err(e.clone())).await;
                }
                return Err(e);
            }
        };
        let _guard = agent.locks().lock(name.as_str()).await;
        let _ = agent.driver().remove(name).await;
        let received = match &spec.image {
            Some(image) => receive_image(agent, name, image, (&mut send, &mut recv)).await,
            None => receive_rootfs(agent, name, (&mut send, &mut recv)).await,
        };
        if let Err(e) = received {
            let _ = agent.driver().remove(name).await;
            return Err(e);
        }
        prepare_local(agent, name, &spec, None).await
    }
    .await;
    let reply = match result {
        Ok(()) => Response::Api(ApiReply::Done),
        Err(e) => Response::Error(e),
    };
    let _ = write_frame(&mut send, &reply).await;
    let _ = send.finish();
}

/// The instance's own tree into its rootfs.
async fn receive_rootfs(
    agent: &Agent,
    name: &InstanceName,
    (send, recv): (&mut quinn::SendStream, &mut quinn::RecvStream),
) -> Result<(), ApiError> {
    let rootfs = agent.driver().rootfs(name);
    // A subvolume on btrfs, so a move can send it by btrfs later.
    if let Err(e) = crate::transfer::btrfs::make_root(&rootfs).await {
        return Err(err(ErrorKind::Internal, e.to_string()));
    }
    let reserve = agent.reserve();
    let progress = std::sync::atomic::AtomicU64::new(0);
    let writing = tree::Writing::synced(&progress, &reserve);
    match tree::receive_counted(send, recv, &rootfs, tree::Pass::Whole, writing).await {
        Ok(_) => Ok(()),
        Err(e) => Err(err(
            ErrorKind::BadRequest,
            format!("receiving the rootfs failed: {e}"),
        )),
    }
}

/// Lay `name` on `image`, say whether the store lacks it, and receive and
/// store it if so.
async fn receive_image(
    agent: &Agent,
    name: &InstanceName,
    image: &str,
    (send, recv): (&mut quinn::SendStream, &mut quinn::RecvStream),
) -> Result<(), ApiError> {
    let laid = agent
        .driver()
        .layer_on(name, image)
        .await
        .map_err(driver_error);
    let answer: ImageAnswer = laid.clone().map(|have| ImageWanted {
        image: image.to_string(),
        wanted: !have,
    });
    write_frame(send, &answer).await.map_err(|e| {
        err(
            ErrorKind::Unavailable,
            format!("cannot answer the upload: {e}"),
        )
    })?;
    if laid? {
        tracing::info!(instance = %name, image, "the image is in this member's store: no tree sent");
        return Ok(());
    }
    let incoming = agent.data_dir().root().join("tmp").join(format!(
        "{name}-image-{}",
        ferry_transport::pki::random_hex(4)
    ));
    let reserve = agent.reserve();
    let progress = std::sync::atomic::AtomicU64::new(0);
    let writing = tree::Writing::synced(&progress, &reserve);
    crate::driver::receive_image(agent.driver(), image, &incoming, (send, recv), writing)
        .await
        .map(|_| ())
        .map_err(|e| err(ErrorKind::BadRequest, e.to_string()))
}

/// Wait for the launcher's `Create` of `name` to apply here; refuse unless
/// it names this agent the owner and the instance has not started yet.
async fn reserved_here(agent: &Agent, name: &InstanceName) -> Result<(), ApiError> {
    let record = || {
        agent.state().read(|s| {
            s.instances
                .get(name.as_str())
                .map(|i| (i.owner, i.desired, i.observed))
        })
    };
    let mut changes = agent.state().subscribe();
    let _ = tokio::time::timeout(RESERVATION_WAIT, async {
        while record().is_none() && changes.changed().await.is_ok() {}
    })
    .await;
    match record() {
        Some((owner, DesiredState::Stopped, ObservedState::Pending | ObservedState::Stopped))
            if owner == agent.id() =>
        {
            Ok(())
        }
        None => Err(err(
            ErrorKind::Conflict,
            format!("no launch of '{name}' is reserved in the cluster state"),
        )),
        Some(_) => Err(err(
            ErrorKind::Conflict,
            format!(
                "'{name}' is not an instance being launched on {}",
                agent.name()
            ),
        )),
    }
}
