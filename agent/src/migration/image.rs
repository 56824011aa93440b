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

/// Source: send the image's tree if the target asks for it.
pub(super) async fn send(agent: &Agent, job: &Job, channel: &mut Channel) -> Result<(), MoveError> {
    let Some(image) = spec(agent, job)?.image else {
        return Ok(());
    };
    let asked: ImageWanted = read_frame(&mut channel.1, MAX_FRAME).await?;
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
    let have = driver.layer_on(&instance_name(job)?, &image).await?;
    let asked = ImageWanted {
        image: image.clone(),
        wanted: !have,
    };
    write_frame(&mut channel.0, &asked).await?;
    if have {
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
