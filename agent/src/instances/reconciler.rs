//! Keeps this host's instances in step with the replicated state: for each
//! instance it owns, ask the runtime, let `reconcile::decide` choose, act.

use std::sync::Arc;
use std::time::Duration;

use super::reconcile::{self, Action};
use super::report::{observe, report};
use crate::api::names::InstanceName;
use crate::node::Agent;

async fn reconcile_one(agent: &Agent, name: &InstanceName) {
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
    let (action, observed) = reconcile::decide(&instance, agent.id(), status);
    match action {
        Action::Nothing => {
            if let Some(observed) = observed.filter(|o| *o != instance.observed) {
                let detail = instance.detail.clone();
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
            report(agent, name, result.err().map(|e| e.to_string())).await;
        }
        Action::Stop => {
            tracing::info!(instance = %name, "stopping instance that should not run");
            if let Err(e) = agent.driver().stop(name, false).await {
                tracing::warn!(instance = %name, "stop failed: {e}");
            }
        }
    }
}

/// Keep this host's instances in step with the replicated state.
pub async fn run(agent: Arc<Agent>) {
    let mut changes = agent.state().subscribe();
    loop {
        let owned: Vec<InstanceName> = agent.state().read(|s| {
            s.instances
                .values()
                .filter(|i| i.owner == agent.id())
                .filter_map(|i| InstanceName::parse(&i.name).ok())
                .collect()
        });
        for name in owned {
            reconcile_one(&agent, &name).await;
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
