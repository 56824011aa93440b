//! The operations that need the owner's host: start, stop, delete, exec,
//! snapshots. Run here if this agent owns the instance, else forwarded to
//! the owner once. Each runs under the instance's host lock.

use std::sync::Arc;
use std::time::Duration;

use ferry_raft::{DesiredState, Instance, InstanceCommand, ObservedState, SnapshotRecord};

use super::report::{observe, report};
use super::{commit, err, internal, no_instance, show};
use crate::api::instances::InstanceOp;
use crate::api::names::{InstanceName, SnapshotName};
use crate::api::{ApiError, ApiReply, ApiRequest, ErrorKind};
use crate::clock::now_ms;
use crate::driver;
use crate::node::Agent;

/// A forwarded operation may take this long on the owner.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(120);

/// Run an operation on the owner: here if this agent owns the instance,
/// else forwarded once.
pub async fn operate(
    agent: &Arc<Agent>,
    name: &str,
    op: InstanceOp,
    forwarded: bool,
) -> Result<ApiReply, ApiError> {
    let instance = agent
        .state()
        .read(|s| s.instances.get(name).cloned())
        .ok_or_else(|| no_instance(name))?;
    if instance.observed == ObservedState::Lost {
        return lost(agent, &instance, op).await;
    }
    if instance.owner != agent.id() {
        if forwarded {
            return Err(err(
                ErrorKind::Unavailable,
                format!("ownership of '{name}' is changing; retry"),
            ));
        }
        return forward(agent, &instance, op).await;
    }
    if let (Some(job), false) = (instance.job, matches!(op, InstanceOp::Exec { .. })) {
        return Err(err(
            ErrorKind::Conflict,
            format!("instance '{name}' is busy with job {job}; wait for it ('ferry job wait {job}') or abort it"),
        ));
    }
    let name = InstanceName::parse(name).map_err(|e| err(ErrorKind::BadRequest, e.to_string()))?;
    let _guard = agent.locks().lock(name.as_str()).await;
    let running = driver::is_up(agent.driver(), &name)
        .await
        .map_err(internal)?;
    let here = Here {
        agent,
        instance: &instance,
        name: &name,
        running,
    };
    match op {
        InstanceOp::Exec { argv } => here.exec(&argv).await,
        InstanceOp::Start => here.start().await,
        InstanceOp::Stop { stateful, force } => here.stop(stateful, force).await,
        InstanceOp::SnapshotCreate { snapshot, stateful } => {
            here.snapshot_create(&snapshot, stateful).await
        }
        InstanceOp::SnapshotRestore { snapshot } => here.snapshot_restore(&snapshot).await,
        InstanceOp::SnapshotDelete { snapshot } => here.snapshot_delete(&snapshot).await,
        InstanceOp::Delete { force } => here.delete(force).await,
    }
}

/// An operation on an instance this agent owns, under its lock.
struct Here<'a> {
    agent: &'a Agent,
    instance: &'a Instance,
    name: &'a InstanceName,
    /// Whether the runtime reports it running or frozen.
    running: bool,
}

impl Here<'_> {
    fn name(&self) -> &InstanceName {
        self.name
    }

    fn conflict(&self, why: &str) -> ApiError {
        err(
            ErrorKind::Conflict,
            format!("instance '{}' {why}", self.name()),
        )
    }

    async fn set_desired(&self, desired: DesiredState) -> Result<(), ApiError> {
        let name = self.name().to_string();
        commit(self.agent, InstanceCommand::SetDesired { name, desired }).await
    }

    async fn exec(&self, argv: &[String]) -> Result<ApiReply, ApiError> {
        if !self.running {
            return Err(self.conflict("is not running"));
        }
        let out = self
            .agent
            .driver()
            .exec(self.name(), argv)
            .await
            .map_err(internal)?;
        Ok(ApiReply::Exec {
            code: out.code,
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    async fn start(&self) -> Result<ApiReply, ApiError> {
        if self.running {
            return self.thaw_leftover().await;
        }
        self.set_desired(DesiredState::Running).await?;
        let driver = self.agent.driver();
        let started = if self.instance.checkpointed {
            driver.restore(self.name()).await
        } else {
            driver.start(self.name()).await
        };
        self.reported(started).await
    }

    /// Start of an instance the runtime reports up: a copy left paused (a
    /// move that could neither thaw it nor keep its final dump) is thawed;
    /// a running one is refused.
    async fn thaw_leftover(&self) -> Result<ApiReply, ApiError> {
        let driver = self.agent.driver();
        let state = driver.status(self.name()).await.map_err(internal)?;
        let paused = state.is_some_and(|s| s.state == driver::RunState::Paused);
        if !paused {
            return Err(self.conflict("is already running"));
        }
        tracing::info!(instance = %self.name(), "thawing a paused leftover");
        let thawed = driver.thaw(self.name()).await.map_err(|e| {
            driver::DriverError::Runtime(format!(
                "'{}' is paused and cannot thaw ({e}); 'ferry stop --force {}' ends it",
                self.name(),
                self.name()
            ))
        });
        self.reported(thawed).await
    }

    /// Report what runs after a start or restore; its error, if any.
    async fn reported(
        &self,
        result: Result<(), driver::DriverError>,
    ) -> Result<ApiReply, ApiError> {
        if let Err(e) = result {
            report(self.agent, self.name(), Some(e.to_string())).await;
            return Err(internal(e));
        }
        report(self.agent, self.name(), None).await;
        show(self.agent, self.name().as_str())
    }

    async fn stop(&self, stateful: bool, force: bool) -> Result<ApiReply, ApiError> {
        let (agent, name) = (self.agent, self.name());
        if !self.running {
            return Err(self.conflict("is not running"));
        }
        if stateful {
            let facts = agent
                .state()
                .read(|s| s.members.get(&agent.id()).and_then(|m| m.facts.clone()));
            if let Some((why, fix)) = agent.driver().stateful_unavailable(name, facts.as_ref()) {
                return Err(err(
                    ErrorKind::Unavailable,
                    format!("{why} on {}; '{name}' keeps running. {fix}", agent.name()),
                ));
            }
            agent.driver().checkpoint_stop(name).await.map_err(|e| {
                internal(format!("stateful stop failed, '{name}' keeps running: {e}"))
            })?;
        } else {
            agent.driver().discard_checkpoint(name).await;
        }
        self.set_desired(DesiredState::Stopped).await?;
        if !stateful {
            agent.driver().stop(name, force).await.map_err(internal)?;
        }
        observe(agent, name, ObservedState::Stopped, None, stateful).await;
        show(agent, name.as_str())
    }

    async fn snapshot_create(
        &self,
        snapshot: &SnapshotName,
        stateful: bool,
    ) -> Result<ApiReply, ApiError> {
        let (agent, name) = (self.agent, self.name());
        if self
            .instance
            .snapshots
            .iter()
            .any(|s| s.name == snapshot.as_str())
        {
            return Err(self.conflict(&format!("already has a snapshot named '{snapshot}'")));
        }
        if stateful && !self.running {
            return Err(
                self.conflict("is not running; a stateful snapshot needs running processes")
            );
        }
        agent
            .driver()
            .snapshot(name, snapshot, stateful)
            .await
            .map_err(|e| internal(format!("snapshot failed, '{name}' is unchanged: {e}")))?;
        let record = SnapshotRecord {
            name: snapshot.to_string(),
            stateful,
            created_ms: now_ms(),
        };
        let added = InstanceCommand::AddSnapshot {
            name: name.to_string(),
            snapshot: record,
        };
        if let Err(e) = commit(agent, added).await {
            agent.driver().delete_snapshot(name, snapshot).await;
            return Err(e);
        }
        show(agent, name.as_str())
    }

    async fn snapshot_restore(&self, snapshot: &SnapshotName) -> Result<ApiReply, ApiError> {
        let (agent, name) = (self.agent, self.name());
        let record = self
            .instance
            .snapshots
            .iter()
            .find(|s| s.name == snapshot.as_str())
            .ok_or_else(|| {
                err(
                    ErrorKind::NotFound,
                    format!("instance '{name}' has no snapshot named '{snapshot}'"),
                )
            })?;
        let stateful = record.stateful;
        let restart = stateful || self.running || self.instance.desired == DesiredState::Running;
        if !restart {
            agent
                .driver()
                .reset_to_snapshot(name, snapshot)
                .await
                .map_err(internal)?;
            return show(agent, name.as_str());
        }
        self.set_desired(DesiredState::Running).await?;
        let restored = agent
            .driver()
            .restore_snapshot(name, snapshot, stateful)
            .await;
        self.reported(restored).await
    }

    async fn snapshot_delete(&self, snapshot: &SnapshotName) -> Result<ApiReply, ApiError> {
        let (agent, name) = (self.agent, self.name());
        let removed = InstanceCommand::RemoveSnapshot {
            name: name.to_string(),
            snapshot: snapshot.to_string(),
        };
        commit(agent, removed).await?;
        agent.driver().delete_snapshot(name, snapshot).await;
        show(agent, name.as_str())
    }

    async fn delete(&self, force: bool) -> Result<ApiReply, ApiError> {
        let (agent, name) = (self.agent, self.name());
        if self.running && !force {
            return Err(self.conflict("is running; stop it first or pass --force"));
        }
        if self.running {
            agent.driver().stop(name, true).await.map_err(internal)?;
        }
        commit(
            agent,
            InstanceCommand::Delete {
                name: name.to_string(),
            },
        )
        .await?;
        agent.driver().remove(name).await.map_err(internal)?;
        Ok(ApiReply::Done)
    }
}

/// An instance whose owner was removed: only its record is left, and only
/// `delete` applies.
async fn lost(agent: &Agent, instance: &Instance, op: InstanceOp) -> Result<ApiReply, ApiError> {
    let name = &instance.name;
    if !matches!(op, InstanceOp::Delete { .. }) {
        return Err(err(
            ErrorKind::Conflict,
            format!(
                "instance '{name}' was lost with its owner; 'ferry delete {name}' drops the record"
            ),
        ));
    }
    commit(agent, InstanceCommand::Delete { name: name.clone() }).await?;
    Ok(ApiReply::Done)
}

async fn forward(agent: &Agent, instance: &Instance, op: InstanceOp) -> Result<ApiReply, ApiError> {
    let owner = agent.peer(instance.owner).map_err(|_| {
        err(
            ErrorKind::Unavailable,
            format!("the owner of '{}' is not a member", instance.name),
        )
    })?;
    let request = ApiRequest::Instance {
        name: instance.name.clone(),
        op,
        forwarded: true,
    };
    agent
        .call_api(&owner, request, FORWARD_TIMEOUT)
        .await
        .map_err(|e| match e {
            crate::node::peers::PeerError::Unreachable { reason, .. } => err(
                ErrorKind::Unavailable,
                format!(
                    "the owner of '{}', {}, is unreachable: {reason}",
                    instance.name, owner.name
                ),
            ),
            other => other.into(),
        })
}
