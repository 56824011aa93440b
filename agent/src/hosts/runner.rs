//! The leader's host-job loop: for every unfinished evacuation or restore,
//! the steps `plan::next` gives, each carried out once at a time per item
//! (a step still in hand is not started again). Only the leader acts; a new
//! leader takes over from the committed state.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_raft::{HostJobCommand, ItemState, JobId, MoveOptions};

use super::plan::{self, Step};
use crate::api::instances::InstanceOp;
use crate::api::{ApiError, ApiRequest};
use crate::clock::now_ms;
use crate::node::Agent;

/// How often the leader looks at its host jobs.
const TICK: Duration = Duration::from_millis(500);
/// A stop or start on the owner ends within this (a CRIU dump included).
const OWNER_CALL: Duration = Duration::from_secs(300);

type InHand = Arc<Mutex<HashSet<(JobId, String)>>>;

/// A leader that tried to hand off waits this long before trying again.
const HAND_OFF_EVERY: Duration = Duration::from_secs(30);
/// How long a hand-off may take before the leader gives up and leads on.
const HAND_OFF_WAIT: Duration = Duration::from_secs(10);

fn wants_hand_off(agent: &Agent) -> bool {
    let me = agent.id();
    let others = agent
        .voter_ids()
        .iter()
        .filter(|v| **v != me && agent.member_alive(**v))
        .count();
    agent
        .state()
        .read(|s| plan::should_hand_off(s.members.get(&me), others))
}

/// openraft 0.9 has no leadership transfer: the leader stops sending
/// heartbeats and does not campaign, so the other voters' leader lease
/// runs out and one of them is elected; then it behaves as usual again.
/// Entries still replicated meanwhile can delay that; after the wait it
/// leads on and tries again later.
async fn hand_off_leadership(agent: &Agent) {
    let me = agent.id();
    let config = agent.raft().runtime_config();
    config.elect(false);
    config.heartbeat(false);
    let mut metrics = agent.raft().metrics();
    let moved = tokio::time::timeout(
        HAND_OFF_WAIT,
        metrics.wait_for(|m| m.current_leader.is_some_and(|l| l != me)),
    )
    .await;
    config.heartbeat(true);
    config.elect(true);
    match moved {
        Ok(Ok(_)) => tracing::info!("handed the Raft leadership away from this evacuated member"),
        _ => tracing::warn!(
            "the Raft leadership did not move away within {HAND_OFF_WAIT:?}; leading on"
        ),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub async fn run(agent: Arc<Agent>) {
    let in_hand: InHand = Arc::default();
    let mut last_hand_off: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = agent.stopped() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        let upgrade = agent.state().read(|s| s.active_upgrade().cloned());
        if let Some(job) = upgrade {
            let leads = agent.is_leader();
            spawn_once(
                &agent,
                &in_hand,
                (job.id, "upgrade: member".into()),
                move |agent| async move {
                    match &job.upgrade {
                        Some(upgrade) => {
                            super::upgrade::take_part(&agent, &job, upgrade).await?;
                            if leads {
                                super::upgrade::lead(&agent, &job, upgrade).await?;
                            }
                            Ok(())
                        }
                        None => Ok(()),
                    }
                },
            );
        }
        if !agent.is_leader() {
            continue;
        }
        if last_hand_off.is_none_or(|at| at.elapsed() > HAND_OFF_EVERY) && wants_hand_off(&agent) {
            last_hand_off = Some(Instant::now());
            hand_off_leadership(&agent).await;
            continue;
        }
        let members = agent.placement_members();
        let work: Vec<(JobId, Vec<Step>)> = agent.state().read(|s| {
            s.host_jobs
                .values()
                .filter(|j| !j.is_done() && j.upgrade.is_none())
                .map(|j| (j.id, plan::next(j, s, &mut super::placer(s, &members))))
                .collect()
        });
        for (id, steps) in work {
            for step in steps {
                let key = (id, step.instance().unwrap_or_default().to_string());
                spawn_once(&agent, &in_hand, key, move |agent| async move {
                    take(&agent, id, step).await
                });
            }
        }
    }
}

/// Run `work` in a task unless work under the same key is still in hand.
fn spawn_once<F, Fut>(agent: &Arc<Agent>, in_hand: &InHand, key: (JobId, String), work: F)
where
    F: FnOnce(Arc<Agent>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), ApiError>> + Send,
{
    if !lock(in_hand).insert(key.clone()) {
        return;
    }
    let (agent, in_hand) = (agent.clone(), in_hand.clone());
    tokio::spawn(async move {
        if let Err(e) = work(agent).await {
            tracing::warn!(job = key.0, what = %key.1, "host job step failed: {e}");
        }
        lock(&in_hand).remove(&key);
    });
}

async fn commit(agent: &Agent, cmd: HostJobCommand) -> Result<(), ApiError> {
    super::commit(agent, cmd).await.map(|_| ())
}

async fn settle(
    agent: &Agent,
    id: JobId,
    instance: String,
    state: ItemState,
    detail: String,
) -> Result<(), ApiError> {
    let detail = Some(detail);
    commit(
        agent,
        HostJobCommand::Settle {
            id,
            instance,
            state,
            detail,
        },
    )
    .await
}

async fn take(agent: &Agent, id: JobId, step: Step) -> Result<(), ApiError> {
    match step {
        Step::StartMove {
            instance,
            target,
            stateful,
        } => {
            let options = MoveOptions {
                stateful,
                ..MoveOptions::default()
            };
            let start = HostJobCommand::StartMove {
                id,
                instance,
                target,
                options,
                now_ms: now_ms(),
            };
            commit(agent, start).await
        }
        Step::Settle {
            instance,
            state,
            detail,
        } => settle(agent, id, instance, state, detail).await,
        Step::Finish => {
            commit(
                agent,
                HostJobCommand::Finish {
                    id,
                    now_ms: now_ms(),
                },
            )
            .await
        }
        Step::StopInPlace { instance, why } => {
            let (state, detail) = stop_in_place(agent, &instance, why).await;
            settle(agent, id, instance, state, detail).await
        }
        Step::StartInPlace { instance } => {
            let (state, detail) = match on_owner(agent, &instance, InstanceOp::Start).await {
                Ok(()) => (ItemState::Started, "started where it is".to_string()),
                Err(e) => (ItemState::Failed, format!("cannot start it: {e}")),
            };
            settle(agent, id, instance, state, detail).await
        }
    }
}

/// Stop `instance` on its owner keeping its memory state; if that cannot
/// be done, stop it plainly (its files stay) and say why.
async fn stop_in_place(agent: &Agent, instance: &str, why: String) -> (ItemState, String) {
    let stateful = InstanceOp::Stop {
        stateful: true,
        force: false,
    };
    let Err(e) = on_owner(agent, instance, stateful).await else {
        return (ItemState::Stopped, why);
    };
    let plain = InstanceOp::Stop {
        stateful: false,
        force: false,
    };
    match on_owner(agent, instance, plain).await {
        Ok(()) => (
            ItemState::Stopped,
            format!("{why} (files only: a stateful stop failed: {e})"),
        ),
        Err(e2) => (
            ItemState::Failed,
            format!("{why}, but it cannot be stopped: {e2}"),
        ),
    }
}

/// Run `op` on `instance`'s owner (this agent forwards to it).
pub(super) async fn on_owner(agent: &Agent, instance: &str, op: InstanceOp) -> Result<(), String> {
    let owner = agent
        .state()
        .read(|s| s.instances.get(instance).map(|i| i.owner))
        .ok_or_else(|| format!("no instance named '{instance}'"))?;
    let peer = agent.peer(owner).map_err(|e| e.to_string())?;
    let request = ApiRequest::Instance {
        name: instance.to_string(),
        op,
        forwarded: true,
    };
    agent
        .call_api(&peer, request, OWNER_CALL)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
