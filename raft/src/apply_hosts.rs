//! Applying host-job commands: the parent job's items, the member's state
//! and cordon, and the instances' origins.

use crate::hosts::*;
use crate::ids::{JobId, NodeId};
use crate::instances::Instance;
use crate::model::{ClusterState, CommandResult, MemberState, Rejection};

impl ClusterState {
    /// The unfinished host job of `member`, if any.
    pub fn active_host_job(&self, member: NodeId) -> Option<&HostJob> {
        self.host_jobs
            .values()
            .find(|j| j.member == member && !j.is_done())
    }

    pub(crate) fn apply_host(&mut self, cmd: &HostJobCommand) -> Result<CommandResult, Rejection> {
        match cmd {
            HostJobCommand::Create {
                kind,
                member,
                mode,
                parallel,
                now_ms,
            } => self.create_host_job(*kind, *member, (*mode, *parallel), *now_ms, None),
            HostJobCommand::StartMove {
                id,
                instance,
                target,
                options,
                now_ms,
            } => {
                self.waiting_item(*id, instance)?;
                let result = self.create_move(instance, *target, options, *now_ms, Some(*id))?;
                if let CommandResult::JobCreated { id: child } = result {
                    let item = self.item_mut(*id, instance)?;
                    item.state = ItemState::Moving;
                    item.child = Some(child);
                    item.target = Some(*target);
                }
                Ok(result)
            }
            HostJobCommand::Settle {
                id,
                instance,
                state,
                detail,
            } => self.settle(*id, instance, *state, detail.clone()),
            HostJobCommand::Finish { id, now_ms } => self.finish_host_job(*id, *now_ms),
            HostJobCommand::RequestAbort { id } => {
                let job = self
                    .host_jobs
                    .get_mut(id)
                    .ok_or(HostJobRejection::NoJob(*id))?;
                job.abort_requested = true;
                Ok(CommandResult::Done)
            }
            HostJobCommand::CreateUpgrade { .. }
            | HostJobCommand::UpgradeStage { .. }
            | HostJobCommand::ResumeUpgrade { .. } => self.apply_upgrade(cmd),
            HostJobCommand::Cordon { member, cordoned } => {
                let m = self
                    .members
                    .get_mut(member)
                    .ok_or(HostJobRejection::NoMember(*member))?;
                m.cordoned = *cordoned;
                Ok(CommandResult::Done)
            }
        }
    }

    pub(crate) fn create_host_job(
        &mut self,
        kind: HostJobKind,
        member: NodeId,
        (mode, parallel): (EvacuateMode, u32),
        now_ms: u64,
        parent: Option<JobId>,
    ) -> Result<CommandResult, Rejection> {
        if !self.members.contains_key(&member) {
            return Err(HostJobRejection::NoMember(member).into());
        }
        if let Some(job) = self.active_host_job(member) {
            let job = job.id;
            return Err(HostJobRejection::MemberBusy { member, job }.into());
        }
        let belongs = |i: &Instance| match kind {
            HostJobKind::Evacuate => i.owner == member,
            HostJobKind::Restore => i.origin.as_ref().is_some_and(|o| o.member == member),
            HostJobKind::Upgrade => false,
        };
        let items = self
            .instances
            .values()
            .filter(|i| belongs(i))
            .map(|i| HostItem {
                instance: i.name.clone(),
                state: ItemState::Waiting,
                child: None,
                target: None,
                detail: None,
            })
            .collect();
        let id = self.next_job_id.max(1);
        self.next_job_id = id + 1;
        self.host_jobs.insert(
            id,
            HostJob {
                id,
                kind,
                member,
                mode,
                parallel: parallel.max(1),
                items,
                abort_requested: false,
                created_ms: now_ms,
                finished_ms: None,
                parent,
                upgrade: None,
            },
        );
        if let Some(m) = self.members.get_mut(&member) {
            match kind {
                HostJobKind::Evacuate => {
                    m.cordoned = true;
                    m.state = MemberState::Evacuating;
                }
                HostJobKind::Restore => {
                    m.cordoned = false;
                    m.state = MemberState::Online;
                }
                HostJobKind::Upgrade => {}
            }
        }
        Ok(CommandResult::JobCreated { id })
    }

    /// Host job `id`, refused once it is finished.
    pub(crate) fn unfinished_host_job_mut(
        &mut self,
        id: JobId,
    ) -> Result<&mut HostJob, HostJobRejection> {
        let job = self
            .host_jobs
            .get_mut(&id)
            .ok_or(HostJobRejection::NoJob(id))?;
        if job.finished_ms.is_some() {
            return Err(HostJobRejection::Finished(id));
        }
        Ok(job)
    }

    fn item_mut(&mut self, id: JobId, instance: &str) -> Result<&mut HostItem, HostJobRejection> {
        let job = self.unfinished_host_job_mut(id)?;
        job.items
            .iter_mut()
            .find(|i| i.instance == instance)
            .ok_or_else(|| HostJobRejection::NoItem {
                id,
                instance: instance.to_string(),
            })
    }

    fn waiting_item(&mut self, id: JobId, instance: &str) -> Result<(), HostJobRejection> {
        let item = self.item_mut(id, instance)?;
        if item.state != ItemState::Waiting {
            return Err(HostJobRejection::NotWaiting {
                id,
                instance: instance.to_string(),
            });
        }
        Ok(())
    }

    fn settle(
        &mut self,
        id: JobId,
        instance: &str,
        state: ItemState,
        detail: Option<String>,
    ) -> Result<CommandResult, Rejection> {
        let item = self.item_mut(id, instance)?;
        if item.state.is_final() {
            // Settled already (a retried or duplicated proposal).
            return Ok(CommandResult::Done);
        }
        item.state = state;
        item.detail = detail;
        let (kind, member) = match self.host_jobs.get(&id) {
            Some(job) => (job.kind, job.member),
            None => return Ok(CommandResult::Done),
        };
        if let Some(inst) = self.instances.get_mut(instance) {
            match (kind, state) {
                (HostJobKind::Evacuate, ItemState::Moved) => {
                    inst.origin = Some(Origin {
                        member,
                        stopped: false,
                    });
                }
                (HostJobKind::Evacuate, ItemState::Stopped) => {
                    inst.origin = Some(Origin {
                        member,
                        stopped: true,
                    });
                }
                (HostJobKind::Restore, ItemState::Moved | ItemState::Started) => {
                    inst.origin = None;
                }
                _ => {}
            }
        }
        Ok(CommandResult::Done)
    }

    fn finish_host_job(&mut self, id: JobId, now_ms: u64) -> Result<CommandResult, Rejection> {
        let job = self
            .host_jobs
            .get_mut(&id)
            .ok_or(HostJobRejection::NoJob(id))?;
        if job.finished_ms.is_some() {
            return Ok(CommandResult::Done);
        }
        let upgrade_busy = job
            .upgrade
            .as_ref()
            .is_some_and(|u| u.members.iter().any(|m| m.stage.in_progress()));
        if upgrade_busy || !job.items.iter().all(|i| i.state.is_final()) {
            return Err(HostJobRejection::NotFinished(id).into());
        }
        job.finished_ms = Some(now_ms);
        let (kind, member) = (job.kind, job.member);
        // Evacuated only when nothing of it still runs there.
        let emptied = !self
            .instances
            .values()
            .any(|i| i.owner == member && i.desired == crate::instances::DesiredState::Running);
        if let Some(m) = self.members.get_mut(&member) {
            m.state = match (kind, emptied) {
                (HostJobKind::Evacuate, true) => MemberState::Evacuated,
                (HostJobKind::Upgrade, _) => m.state,
                _ => MemberState::Online,
            };
        }
        Ok(CommandResult::Done)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::instances::{DesiredState, InstanceCommand, InstanceKind, InstanceSpec};
    use crate::jobs::{JobCommand, MoveOptions, Phase};
    use crate::model::{Command, Member};

    /// Three members; c1 and c2 on node 1, c3 on node 2.
    /// Members n1, n2, n3 and nothing else.
    pub(crate) fn members() -> ClusterState {
        let mut s = ClusterState::default();
        for id in 1..=3 {
            let addr = format!("127.0.0.1:{}", 7000 + id);
            let m = Member::online(id, &format!("n{id}"), &addr, &format!("{id:02x}"), 0);
            s.members.insert(id, m);
        }
        s
    }

    fn cluster() -> ClusterState {
        let mut s = members();
        for (name, owner) in [("c1", 1), ("c2", 1), ("c3", 2)] {
            s.apply(&Command::Instance(InstanceCommand::Create {
                name: name.into(),
                kind: InstanceKind::Container,
                spec: InstanceSpec::default(),
                owner,
                desired: DesiredState::Running,
                now_ms: 0,
            }));
        }
        s
    }

    pub(crate) fn host(s: &mut ClusterState, cmd: HostJobCommand) -> CommandResult {
        s.apply(&Command::Host(cmd))
    }

    fn evacuate(s: &mut ClusterState, member: NodeId) -> JobId {
        let created = host(
            s,
            HostJobCommand::Create {
                kind: HostJobKind::Evacuate,
                member,
                mode: EvacuateMode::Auto,
                parallel: 2,
                now_ms: 1,
            },
        );
        match created {
            CommandResult::JobCreated { id } => id,
            other => panic!("{other:?}"),
        }
    }

    fn start_move(s: &mut ClusterState, id: JobId, instance: &str) -> CommandResult {
        let cmd = HostJobCommand::StartMove {
            id,
            instance: instance.into(),
            target: 3,
            options: MoveOptions::default(),
            now_ms: 2,
        };
        host(s, cmd)
    }

    #[test]
    fn an_evacuation_lists_the_member_s_instances_and_cordons_it() {
        let mut s = cluster();
        let id = evacuate(&mut s, 1);
        let job = &s.host_jobs[&id];
        let names: Vec<&str> = job.items.iter().map(|i| i.instance.as_str()).collect();
        assert_eq!(names, ["c1", "c2"]);
        assert!(s.members[&1].cordoned);
        assert_eq!(s.members[&1].state, MemberState::Evacuating);
        // One host job per member at a time.
        let again = host(
            &mut s,
            HostJobCommand::Create {
                kind: HostJobKind::Evacuate,
                member: 1,
                mode: EvacuateMode::Auto,
                parallel: 2,
                now_ms: 3,
            },
        );
        assert!(matches!(again, CommandResult::Rejected(_)), "{again:?}");
    }

    #[test]
    fn a_child_move_starts_once_and_its_outcome_records_the_origin() {
        let mut s = cluster();
        let id = evacuate(&mut s, 1);
        let CommandResult::JobCreated { id: child } = start_move(&mut s, id, "c1") else {
            panic!("no child");
        };
        assert_eq!(s.jobs[&child].parent, Some(id));
        assert_eq!(s.instances["c1"].job, Some(child));
        // A second start of the same item is refused: never two children.
        assert!(matches!(
            start_move(&mut s, id, "c1"),
            CommandResult::Rejected(_)
        ));
        let settle = |state| HostJobCommand::Settle {
            id,
            instance: "c1".into(),
            state,
            detail: None,
        };
        host(&mut s, settle(ItemState::Moved));
        // Settled once: a late duplicate changes nothing.
        host(&mut s, settle(ItemState::Failed));
        assert_eq!(s.host_jobs[&id].items[0].state, ItemState::Moved);
        let origin = s.instances["c1"].origin.clone().expect("origin");
        assert_eq!((origin.member, origin.stopped), (1, false));
    }

    #[test]
    fn finishing_needs_every_item_final_and_names_the_member_s_state() {
        let mut s = cluster();
        let id = evacuate(&mut s, 1);
        let finish = HostJobCommand::Finish { id, now_ms: 9 };
        assert!(matches!(
            host(&mut s, finish.clone()),
            CommandResult::Rejected(_)
        ));
        for (name, state) in [("c1", ItemState::Moved), ("c2", ItemState::Stayed)] {
            let cmd = HostJobCommand::Settle {
                id,
                instance: name.into(),
                state,
                detail: None,
            };
            host(&mut s, cmd);
        }
        assert_eq!(host(&mut s, finish), CommandResult::Done);
        // c2 still runs there: not evacuated.
        assert_eq!(s.members[&1].state, MemberState::Online);
        assert!(s.members[&1].cordoned);
    }

    #[test]
    fn a_restore_lists_what_came_from_the_member_and_uncordons_it() {
        let mut s = cluster();
        let id = evacuate(&mut s, 1);
        start_move(&mut s, id, "c1");
        let child = s.instances["c1"].job.expect("child");
        for (from, to) in [
            (Phase::Pending, Phase::Checking),
            (Phase::Checking, Phase::Preparing),
            (Phase::Preparing, Phase::Frozen),
            (Phase::Frozen, Phase::Switched),
            (Phase::Switched, Phase::Restored),
            (Phase::Restored, Phase::Done),
        ] {
            s.apply(&Command::Job(JobCommand::Advance {
                id: child,
                from,
                to,
                now_ms: 3,
                error: None,
                report: None,
                note: None,
                stats: None,
            }));
        }
        for (name, state) in [("c1", ItemState::Moved), ("c2", ItemState::Stopped)] {
            let cmd = HostJobCommand::Settle {
                id,
                instance: name.into(),
                state,
                detail: None,
            };
            host(&mut s, cmd);
        }
        s.apply(&Command::Instance(InstanceCommand::SetDesired {
            name: "c2".into(),
            desired: DesiredState::Stopped,
        }));
        host(&mut s, HostJobCommand::Finish { id, now_ms: 4 });
        assert_eq!(s.members[&1].state, MemberState::Evacuated);
        let restore = host(
            &mut s,
            HostJobCommand::Create {
                kind: HostJobKind::Restore,
                member: 1,
                mode: EvacuateMode::Auto,
                parallel: 2,
                now_ms: 5,
            },
        );
        let CommandResult::JobCreated { id: back } = restore else {
            panic!("{restore:?}");
        };
        let names: Vec<&str> = s.host_jobs[&back]
            .items
            .iter()
            .map(|i| i.instance.as_str())
            .collect();
        assert_eq!(names, ["c1", "c2"]);
        assert!(!s.members[&1].cordoned);
        assert_eq!(s.members[&1].state, MemberState::Online);
    }
}
