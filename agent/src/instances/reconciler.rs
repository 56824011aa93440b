//! Keeps this host's instances in step with the replicated state: for each
//! instance it owns, ask the runtime, let `reconcile::decide` choose, act.
//! Instances are handled concurrently (at most [`PARALLEL`] at once) and
//! one still in hand from an earlier round is skipped, so a hung runtime
//! call for one instance never stalls the others.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_raft::{ClusterState, InstanceCommand, ObservedState};

use super::commit;
use super::reconcile::{self, Action};
use super::report::{observe, report};
use crate::api::names::InstanceName;
use crate::driver::ProcessExit;
use crate::node::Agent;

/// Instances reconciled at once.
const PARALLEL: usize = 8;

/// This agent's memory of each instance's (re)starts, for the delay
/// between restarts.
#[derive(Default)]
struct Restarts {
    /// When it was last started here, and how many quick restarts led
    /// there.
    started: HashMap<String, (Instant, u32)>,
    /// When an ended instance may start again, and its quick restarts.
    due: HashMap<String, (Instant, u32)>,
}

/// What the loop shares with the tasks it spawns.
#[derive(Default)]
struct Shared {
    in_hand: Mutex<HashSet<String>>,
    restarts: Mutex<Restarts>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keep this host's instances in step with the replicated state.
pub async fn run(agent: Arc<Agent>) {
    let shared = Arc::new(Shared::default());
    let slots = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let mut watch = agent.state().watch();
    loop {
        let owned: Vec<InstanceName> = agent.state().read(|s| {
            s.instances
                .values()
                .filter(|i| i.owner == agent.id())
                .filter_map(|i| InstanceName::parse(&i.name).ok())
                .collect()
        });
        {
            let mut r = lock(&shared.restarts);
            let mine: HashSet<&str> = owned.iter().map(|o| o.as_str()).collect();
            r.started.retain(|n, _| mine.contains(n.as_str()));
            r.due.retain(|n, _| mine.contains(n.as_str()));
        }
        for name in owned {
            if !lock(&shared.in_hand).insert(name.to_string()) {
                continue;
            }
            let (agent, shared, slots) = (agent.clone(), shared.clone(), slots.clone());
            tokio::spawn(async move {
                if let Ok(_slot) = slots.acquire().await {
                    reconcile_one(&agent, &shared, &name).await;
                }
                lock(&shared.in_hand).remove(name.as_str());
            });
        }
        let instances_changed =
            |a: &ClusterState, b: &ClusterState| !a.instances.ptr_eq(&b.instances);
        if !watch
            .changed(Duration::from_secs(2), instances_changed)
            .await
        {
            return;
        }
    }
}

async fn reconcile_one(agent: &Agent, shared: &Shared, name: &InstanceName) {
    let _guard = agent.locks().lock(name.as_str()).await;
    let Some(instance) = agent
        .state()
        .read(|s| s.instances.get(name.as_str()).cloned())
    else {
        return;
    };
    let status = match agent.driver().status(name).await {
        Ok(s) => s.map(|s| s.state),
        Err(e) => {
            tracing::warn!(instance = %name, "cannot ask the runtime: {e}");
            return;
        }
    };
    if status == Some(crate::driver::RunState::Running) {
        // Seen running: an end from now on is its own, and counts from now
        // unless a start here counted it already.
        lock(&shared.restarts)
            .started
            .entry(name.to_string())
            .or_insert((Instant::now(), 0));
    }
    let exit = match status {
        Some(crate::driver::RunState::Stopped) => agent.driver().last_exit(name),
        _ => None,
    };
    let (action, observed) = reconcile::decide(&instance, agent.id(), status, exit);
    match action {
        Action::Nothing => {
            if let Some(observed) = observed.filter(|o| *o != instance.observed) {
                let detail = match observed {
                    ObservedState::Stopped if instance.observed == ObservedState::Running => {
                        let policy = instance.spec.restart.as_str();
                        Some(format!("{} (restart policy: {policy})", ended(exit)))
                    }
                    _ => instance.detail.clone(),
                };
                observe(agent, name, observed, detail, instance.checkpointed).await;
            }
        }
        Action::Start | Action::Restore => {
            tracing::info!(instance = %name, ?action, "starting instance");
            let result = if action == Action::Restore {
                agent.driver().restore(name).await
            } else {
                agent.driver().start(name).await
            };
            if result.is_ok() {
                lock(&shared.restarts)
                    .started
                    .insert(name.to_string(), (Instant::now(), 0));
            }
            report(agent, name, result.err().map(|e| e.to_string())).await;
        }
        Action::Restart => restart(agent, shared, name, &instance, exit).await,
        Action::Stop => {
            tracing::info!(instance = %name, "stopping instance that should not run");
            if let Err(e) = agent.driver().stop(name, false).await {
                tracing::warn!(instance = %name, "stop failed: {e}");
            }
        }
    }
}

/// How a process ended, in words, for the instance's detail and restarts.
fn ended(exit: Option<ProcessExit>) -> String {
    exit.map_or_else(|| "its process ended".to_string(), |e| e.to_string())
}

/// When an ended instance may start again, and its quick restarts by then:
/// at once if this agent never started it (the host or the agent
/// restarted), else after the delay its run length earns.
fn due(restarts: &mut Restarts, name: &str, now: Instant) -> (Instant, u32) {
    let started = restarts.started.get(name).copied();
    *restarts
        .due
        .entry(name.to_string())
        .or_insert_with(|| match started {
            None => (now, 0),
            Some((at, before)) => {
                let quick = reconcile::quick_restarts(before, now - at);
                (now + reconcile::restart_delay(quick), quick)
            }
        })
}

/// An instance whose process ended on its own: report it and, once its
/// delay passed, start it again and record the restart.
async fn restart(
    agent: &Agent,
    shared: &Shared,
    name: &InstanceName,
    instance: &ferry_raft::Instance,
    exit: Option<ProcessExit>,
) {
    let now = Instant::now();
    let (at, quick, known) = {
        let mut r = lock(&shared.restarts);
        let known = r.started.contains_key(name.as_str());
        let (at, quick) = due(&mut r, name.as_str(), now);
        (at, quick, known)
    };
    if now < at {
        if instance.observed != ObservedState::Stopped {
            let wait = (at - now).as_secs().max(1);
            let detail = format!("{}; restarting in {wait}s", ended(exit));
            observe(agent, name, ObservedState::Stopped, Some(detail), false).await;
        }
        return;
    }
    lock(&shared.restarts).due.remove(name.as_str());
    let reason = match known {
        true => ended(exit),
        false => "it was not running when this agent started (host or agent restart)".to_string(),
    };
    tracing::info!(instance = %name, %reason, "restarting instance");
    let result = agent.driver().start(name).await;
    if result.is_ok() {
        lock(&shared.restarts)
            .started
            .insert(name.to_string(), (Instant::now(), quick));
        let restarted = InstanceCommand::Restarted {
            name: name.to_string(),
            node: agent.id(),
            epoch: instance.epoch,
            reason,
        };
        if let Err(e) = commit(agent, restarted).await {
            tracing::warn!(instance = %name, "restart not recorded: {e}");
        }
    }
    report(agent, name, result.err().map(|e| e.to_string())).await;
}
