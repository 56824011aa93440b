//! A transfer channel opened by the other participant of a move (or by the
//! move's relay on its behalf): only the job's own peer, in the job's
//! mode, gets an answer.

use super::{source, target};
use crate::api::transfer::{TransferPart, TransferRequest};
use crate::node::peers::Channel;
use crate::node::Agent;

pub async fn serve_transfer(
    agent: &Agent,
    peer_name: &str,
    req: TransferRequest,
    mut channel: Channel,
) {
    let Some(job) = agent.state().read(|s| s.jobs.get(&req.job).cloned()) else {
        return;
    };
    let pushed = matches!(
        req.part,
        TransferPart::PushRootfs
            | TransferPart::PushFinal
            | TransferPart::Stream { .. }
            | TransferPart::Pages { .. }
    );
    // Pull: we are the source, the peer the target; push: the other way.
    let (we, they) = if pushed {
        (job.target, job.source)
    } else {
        (job.source, job.target)
    };
    // The relay checked that the channel came from `they`.
    let relay = job.options.mode.relay();
    let from_relay = relay.is_some_and(|via| agent.peer(via).is_ok_and(|p| p.name == peer_name));
    let peer_ok = from_relay || agent.peer(they).is_ok_and(|p| p.name == peer_name);
    // A live move's relayed streams come from the source in pull mode,
    // a final dump's pages in either mode, a lazy move's from the target.
    let relayed = matches!(
        req.part,
        TransferPart::Stream { .. } | TransferPart::Pages { .. } | TransferPart::LazyPages
    );
    let mode_ok = relayed || job.options.mode.pushes() == pushed;
    if we != agent.id() || !peer_ok || !mode_ok {
        tracing::warn!(
            job = job.id,
            peer = peer_name,
            "refused a transfer channel from a non-participant or in the wrong mode"
        );
        return;
    }
    if let TransferPart::LazyPages = req.part {
        return super::lazy::serve(agent, &job, channel).await;
    }
    if let TransferPart::Pages { stream, bytes } = req.part {
        return super::pages::serve(agent, &job, (stream, bytes), channel).await;
    }
    let result = if let TransferPart::Stream { purpose } = &req.part {
        return match super::live::serve_stream(agent, &job, purpose, channel).await {
            Ok(()) => {}
            Err(e) => tracing::warn!(job = job.id, "relayed stream failed: {e}"),
        };
    } else if pushed {
        target::serve_push(agent, &job, req.part, &mut channel).await
    } else {
        source::serve(agent, &job, req.part, &mut channel).await
    };
    if let Err(e) = result {
        tracing::warn!(job = job.id, "transfer channel failed: {e}");
    }
    let _ = channel.0.finish();
}
