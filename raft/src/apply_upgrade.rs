//! Applying the rolling-upgrade commands: one member's stage moves by
//! compare-and-set, and the stages that need a child job (evacuate,
//! restore) create it in the same entry, so no leader change can start
//! one twice.

use crate::hosts::*;
use crate::ids::{JobId, NodeId};
use crate::model::{ClusterState, CommandResult, Rejection};

/// One member's stage change, as proposed.
pub(crate) struct StageChange {
    pub member: NodeId,
    pub from: Stage,
    pub to: Stage,
    pub detail: Option<String>,
    pub diff: Option<Vec<String>>,
}

impl ClusterState {
    /// The unfinished upgrade, if one runs.
    pub fn active_upgrade(&self) -> Option<&HostJob> {
        self.host_jobs
            .values()
            .find(|j| j.kind == HostJobKind::Upgrade && !j.is_done())
    }

    pub(crate) fn apply_upgrade(
        &mut self,
        cmd: &HostJobCommand,
    ) -> Result<CommandResult, Rejection> {
        match cmd {
            HostJobCommand::CreateUpgrade {
                hook,
                verify,
                members,
                max_unavailable,
                now_ms,
            } => {
                let upgrade = Upgrade {
                    hook: hook.clone(),
                    verify: verify.clone(),
                    members: Vec::new(),
                    max_unavailable: *max_unavailable,
                };
                self.create_upgrade(upgrade, members, *now_ms)
            }
            HostJobCommand::UpgradeStage {
                id,
                member,
                from,
                to,
                detail,
                diff,
                now_ms,
            } => {
                let change = StageChange {
                    member: *member,
                    from: *from,
                    to: *to,
                    detail: detail.clone(),
                    diff: diff.clone(),
                };
                self.upgrade_stage(*id, change, *now_ms)
            }
            HostJobCommand::ResumeUpgrade { id } => self.resume_upgrade(*id),
            // Only the upgrade commands are sent here (`apply_host`).
            _ => Ok(CommandResult::Done),
        }
    }

    pub(crate) fn create_upgrade(
        &mut self,
        mut upgrade: Upgrade,
        members: &[NodeId],
        now_ms: u64,
    ) -> Result<CommandResult, Rejection> {
        if let Some(job) = self.active_upgrade() {
            return Err(HostJobRejection::UpgradeRunning(job.id).into());
        }
        if let Some(missing) = members.iter().find(|m| !self.members.contains_key(*m)) {
            return Err(HostJobRejection::NoMember(*missing).into());
        }
        upgrade.members = members
            .iter()
            .map(|m| UpgradeMember {
                member: *m,
                stage: Stage::Waiting,
                failed_in: None,
                evacuation: None,
                restore: None,
                facts_before: None,
                diff: Vec::new(),
                detail: None,
                attempt: 0,
            })
            .collect();
        let id = self.next_job_id.max(1);
        self.next_job_id = id + 1;
        let job = HostJob {
            id,
            kind: HostJobKind::Upgrade,
            member: 0,
            mode: EvacuateMode::Auto,
            parallel: upgrade.max_unavailable.max(1),
            items: Vec::new(),
            abort_requested: false,
            created_ms: now_ms,
            finished_ms: None,
            parent: None,
            upgrade: Some(upgrade),
        };
        self.host_jobs.insert(id, job);
        Ok(CommandResult::JobCreated { id })
    }

    fn upgrade_member_mut(
        &mut self,
        id: JobId,
        member: NodeId,
    ) -> Result<&mut UpgradeMember, HostJobRejection> {
        let job = self.unfinished_host_job_mut(id)?;
        let upgrade = job
            .upgrade
            .as_mut()
            .ok_or(HostJobRejection::NotAnUpgrade(id))?;
        upgrade
            .members
            .iter_mut()
            .find(|m| m.member == member)
            .ok_or(HostJobRejection::NoMember(member))
    }

    pub(crate) fn upgrade_stage(
        &mut self,
        id: JobId,
        change: StageChange,
        now_ms: u64,
    ) -> Result<CommandResult, Rejection> {
        let current = self.upgrade_member_mut(id, change.member)?.stage;
        if current != change.from {
            return Err(HostJobRejection::StageMoved {
                id,
                member: change.member,
                expected: change.from.as_str().into(),
                current: current.as_str().into(),
            }
            .into());
        }
        let child = match change.to {
            Stage::Evacuating => Some(HostJobKind::Evacuate),
            Stage::Restoring => Some(HostJobKind::Restore),
            _ => None,
        };
        let child_id = match child {
            Some(kind) => {
                let created = self.create_host_job(
                    kind,
                    change.member,
                    (EvacuateMode::Auto, 2),
                    now_ms,
                    Some(id),
                )?;
                match created {
                    CommandResult::JobCreated { id } => Some(id),
                    _ => None,
                }
            }
            None => None,
        };
        let facts = self
            .members
            .get(&change.member)
            .and_then(|m| m.facts.clone());
        let m = self.upgrade_member_mut(id, change.member)?;
        match change.to {
            Stage::Evacuating => {
                m.evacuation = child_id;
                m.facts_before = facts;
            }
            Stage::Restoring => m.restore = child_id,
            Stage::Failed => m.failed_in = Some(change.from),
            _ => {}
        }
        m.stage = change.to;
        if change.detail.is_some() {
            m.detail = change.detail;
        }
        if let Some(diff) = change.diff {
            m.diff = diff;
        }
        Ok(CommandResult::Done)
    }

    pub(crate) fn resume_upgrade(&mut self, id: JobId) -> Result<CommandResult, Rejection> {
        if let Some(job) = self.active_upgrade().filter(|j| j.id != id) {
            return Err(HostJobRejection::UpgradeRunning(job.id).into());
        }
        let job = self
            .host_jobs
            .get_mut(&id)
            .ok_or(HostJobRejection::NoJob(id))?;
        let upgrade = job
            .upgrade
            .as_mut()
            .ok_or(HostJobRejection::NotAnUpgrade(id))?;
        let failed = upgrade
            .members
            .iter_mut()
            .find(|m| m.stage == Stage::Failed)
            .ok_or(HostJobRejection::NothingToResume(id))?;
        failed.stage = failed.failed_in.take().unwrap_or(Stage::Waiting);
        failed.attempt += 1;
        failed.detail = None;
        job.finished_ms = None;
        job.abort_requested = false;
        Ok(CommandResult::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::apply_hosts::tests::{host, members as cluster};

    fn upgrade(s: &mut ClusterState) -> CommandResult {
        let create = HostJobCommand::CreateUpgrade {
            hook: "true".into(),
            verify: None,
            members: vec![1, 2, 3],
            max_unavailable: 1,
            now_ms: 0,
        };
        host(s, create)
    }

    fn stage(id: JobId, member: NodeId, from: Stage, to: Stage) -> HostJobCommand {
        HostJobCommand::UpgradeStage {
            id,
            member,
            from,
            to,
            detail: Some(format!("{from:?} -> {to:?}")),
            diff: None,
            now_ms: 1,
        }
    }

    #[test]
    fn one_upgrade_at_a_time_and_each_stage_moves_once() {
        let mut s = cluster();
        let CommandResult::JobCreated { id } = upgrade(&mut s) else {
            panic!("not created");
        };
        assert!(matches!(upgrade(&mut s), CommandResult::Rejected(_)));
        let evacuate = stage(id, 1, Stage::Waiting, Stage::Evacuating);
        assert_eq!(host(&mut s, evacuate.clone()), CommandResult::Done);
        // The same proposal again (another leader) is refused: one child.
        assert!(matches!(host(&mut s, evacuate), CommandResult::Rejected(_)));
        let child = s.host_jobs[&id].upgrade.as_ref().unwrap().members[0].evacuation;
        let child = child.expect("evacuation created");
        assert_eq!(s.host_jobs[&child].kind, HostJobKind::Evacuate);
        assert_eq!(s.host_jobs[&child].parent, Some(id));
        assert!(s.members[&1].cordoned);
    }

    #[test]
    fn resume_retries_the_stage_that_failed_as_a_new_attempt() {
        let mut s = cluster();
        let CommandResult::JobCreated { id } = upgrade(&mut s) else {
            panic!("not created");
        };
        for (from, to) in [
            (Stage::Waiting, Stage::Evacuating),
            (Stage::Evacuating, Stage::Hook),
            (Stage::Hook, Stage::Failed),
        ] {
            assert_eq!(host(&mut s, stage(id, 1, from, to)), CommandResult::Done);
        }
        host(&mut s, HostJobCommand::Finish { id, now_ms: 2 });
        assert!(s.host_jobs[&id].is_done());
        assert_eq!(
            host(&mut s, HostJobCommand::ResumeUpgrade { id }),
            CommandResult::Done
        );
        let m = &s.host_jobs[&id].upgrade.as_ref().unwrap().members[0];
        assert_eq!((m.stage, m.attempt), (Stage::Hook, 1));
        assert!(!s.host_jobs[&id].is_done());
    }
}
