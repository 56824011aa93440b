//! What the owner reports of its instances: the observed state, and the
//! baseline (this host's CPU flags, syscalls, filesystems inside) whenever
//! processes start.

use ferry_raft::{Baseline, InstanceCommand, ObservedState};

use super::commit;
use crate::api::names::InstanceName;
use crate::clock::now_ms;
use crate::driver::RunState;
use crate::node::Agent;

pub async fn observe(
    agent: &Agent,
    name: &InstanceName,
    observed: ObservedState,
    detail: Option<String>,
    checkpointed: bool,
) {
    let epoch = agent
        .state()
        .read(|s| s.instances.get(name.as_str()).map(|i| i.epoch));
    let Some(epoch) = epoch else { return };
    let cmd = InstanceCommand::Observe {
        name: name.to_string(),
        node: agent.id(),
        epoch,
        observed,
        detail,
        checkpointed,
    };
    if let Err(e) = commit(agent, cmd).await {
        tracing::warn!(instance = %name, "could not report state: {e}");
    }
}

/// Report what runs after a start or restore (or its error), with the
/// baseline of this host and the filesystems mounted inside.
pub async fn report(agent: &Agent, name: &InstanceName, error: Option<String>) {
    let status = agent.driver().status(name).await.ok().flatten();
    match (status, error) {
        (Some(s), None) if s.state == RunState::Running => {
            observe(agent, name, ObservedState::Running, None, false).await;
            record_baseline(agent, name, s.pid).await;
        }
        (_, Some(e)) => observe(agent, name, ObservedState::Error, Some(e), false).await,
        (_, None) => {
            let why = "it exited at once; see its console.log";
            observe(agent, name, ObservedState::Error, Some(why.into()), false).await
        }
    }
}

async fn record_baseline(agent: &Agent, name: &InstanceName, pid: u32) {
    let Some((facts, epoch)) = agent.state().read(|s| {
        let facts = s.members.get(&agent.id()).and_then(|m| m.facts.clone());
        Some((facts, s.instances.get(name.as_str())?.epoch))
    }) else {
        return;
    };
    // Right after the agent starts, its facts may not be replicated yet.
    let facts = match facts {
        Some(facts) => facts,
        None => agent.probe_facts().await,
    };
    let filesystems = agent.driver().mounted_filesystems(name, pid).await;
    let baseline = Baseline {
        node: agent.id(),
        arch: facts.arch,
        kernel: facts.kernel,
        cpu_flags: facts.cpu_flags,
        syscalls: facts.syscalls,
        filesystems,
        criu: facts.runtimes.criu,
        recorded_ms: now_ms(),
    };
    let cmd = InstanceCommand::RecordBaseline {
        name: name.to_string(),
        node: agent.id(),
        epoch,
        baseline,
    };
    if let Err(e) = commit(agent, cmd).await {
        tracing::warn!(instance = %name, "could not record baseline: {e}");
    }
}
