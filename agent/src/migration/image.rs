//! A layered instance's image on a move: the target says on the rootfs
//! channel whether its image store has the image; if not, the source
//! sends the image's tree first, which the target stores. Then the
//! rootfs passes carry the instance's own changes only.

use ferry_raft::Job;
use ferry_transport::frame::{read_frame, write_frame, MAX_FRAME};

use super::error::{instance_name, MoveError};
use super::target::spec;
use crate::api::transfer::ImageWanted;
use crate::node::peers::Channel;
use crate::node::Agent;
use crate::transfer::tree;

/// The target's first frame: whether it wants the image, or why it cannot
/// take the instance.
type Answer = Result<ImageWanted, String>;

/// How long the source waits for that answer (the target lays the
/// instance first: a mkdir or two, an unmount).
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Source: send the image's tree if the target asks for it.
pub(super) async fn send(agent: &Agent, job: &Job, channel: &mut Channel) -> Result<(), MoveError> {
    let Some(image) = spec(agent, job)?.image else {
        return Ok(());
    };
    let answer = tokio::time::timeout(
        ANSWER_TIMEOUT,
        read_frame::<Answer>(&mut channel.1, MAX_FRAME),
    );
    let asked = match answer.await {
        Ok(frame) => frame?,
        Err(_) => {
            return Err(MoveError::Local(format!(
                "the target did not say within {ANSWER_TIMEOUT:?} whether it has image {image}"
            )))
        }
    }
    .map_err(|why| MoveError::TargetFailed {
        target: agent.member_name(job.target).unwrap_or_default(),
        why,
    })?;
    if asked.image != image {
        return Err(MoveError::Local(format!(
            "the target asked for image {}, the instance lies on {image}",
            asked.image
        )));
    }
    if !asked.wanted {
        return Ok(());
    }
    let tree = agent.driver().image_tree(&image).ok_or_else(|| {
        MoveError::Local(format!(
            "image {image} of '{}' is missing from this member's store",
            job.instance
        ))
    })?;
    tree::send(&mut channel.0, &mut channel.1, &tree, false, None).await?;
    Ok(())
}

/// Target: lay the instance on its image (which keeps the image in this
/// store from now on), and receive and store the image's tree unless the
/// store has it; the bytes received.
pub(super) async fn receive(
    agent: &Agent,
    job: &Job,
    channel: &mut Channel,
) -> Result<u64, MoveError> {
    let Some(image) = spec(agent, job)?.image else {
        return Ok(0);
    };
    let driver = agent.driver();
    let laid = match instance_name(job) {
        Ok(name) => driver
            .layer_on(&name, &image)
            .await
            .map_err(MoveError::from),
        Err(e) => Err(e),
    };
    // Said either way, so the source hears why instead of waiting.
    let answer: Answer = match &laid {
        Ok(have) => Ok(ImageWanted {
            image: image.clone(),
            wanted: !have,
        }),
        Err(e) => Err(e.to_string()),
    };
    write_frame(&mut channel.0, &answer).await?;
    if laid? {
        return Ok(0);
    }
    let incoming = agent.data_dir().root().join("tmp").join(format!(
        "{}-image-{}",
        job.instance,
        ferry_transport::pki::random_hex(4)
    ));
    let counter = agent.transfers().stage(job.id, "image");
    let reserve = agent.reserve();
    // Synced: the image outlives the move.
    let writing = tree::Writing::synced(&counter, &reserve);
    let (send, recv) = channel;
    let bytes =
        crate::driver::receive_image(driver, &image, &incoming, (send, recv), writing).await?;
    Ok(bytes)
}
