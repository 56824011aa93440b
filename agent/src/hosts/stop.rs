//! `ferry agent --evacuate-on-stop`: an agent asked to stop (its host
//! shutting down) first evacuates its own member, within the stop timeout;
//! what has not moved by then is stopped with its state kept.

use std::time::{Duration, Instant};

use ferry_raft::{DesiredState, EvacuateMode, HostJobCommand, HostJobKind};

use crate::api::instances::InstanceOp;
use crate::clock::now_ms;
use crate::node::Agent;

/// How often the stopping agent looks at its evacuation.
const POLL: Duration = Duration::from_millis(200);

/// Evacuate this member; returns what happened, for the log.
pub async fn evacuate_on_stop(agent: &Agent, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let me = agent.id();
    let existing = agent.state().read(|s| s.active_host_job(me).map(|j| j.id));
    let id = match existing {
        Some(id) => id,
        None => {
            let create = HostJobCommand::Create {
                kind: HostJobKind::Evacuate,
                member: me,
                mode: EvacuateMode::Auto,
                parallel: 2,
                now_ms: now_ms(),
            };
            match super::commit(agent, create).await {
                Ok(ferry_raft::CommandResult::JobCreated { id }) => id,
                Ok(other) => return format!("evacuation not started: {other:?}"),
                Err(e) => return format!("evacuation not started: {e}"),
            }
        }
    };
    tracing::info!(job = id, "evacuating this member before stopping");
    while Instant::now() < deadline {
        if agent
            .state()
            .read(|s| s.host_jobs.get(&id).is_none_or(|j| j.is_done()))
        {
            return format!("evacuation job {id} finished");
        }
        tokio::time::sleep(POLL).await;
    }
    let _ = super::commit(agent, HostJobCommand::RequestAbort { id }).await;
    let left = stop_what_is_left(agent).await;
    format!("evacuation job {id} did not finish within the stop timeout; {left}")
}

/// Stop every instance still running here, keeping its state.
async fn stop_what_is_left(agent: &Agent) -> String {
    let me = agent.id();
    let left: Vec<String> = agent.state().read(|s| {
        s.instances
            .values()
            .filter(|i| i.owner == me && i.job.is_none() && i.desired == DesiredState::Running)
            .map(|i| i.name.clone())
            .collect()
    });
    let mut stopped = Vec::new();
    for name in &left {
        let op = InstanceOp::Stop {
            stateful: true,
            force: false,
        };
        match super::runner::on_owner(agent, name, op).await {
            Ok(()) => stopped.push(name.as_str()),
            Err(e) => tracing::warn!(instance = %name, "cannot stop it with its state: {e}"),
        }
    }
    format!("stopped with their state kept: {}", stopped.join(", "))
}
