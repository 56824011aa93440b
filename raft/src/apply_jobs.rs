//! Applying job commands to the cluster state: phases change only by
//! compare-and-set along the phase graph; the switch moves ownership.

use crate::ids::{JobId, NodeId};
use crate::instances::{InstanceRejection, ObservedState};
use crate::jobs::*;
use crate::model::{ClusterState, CommandResult};

impl ClusterState {
    /// The job holding `instance`, if one is active.
    pub fn active_job(&self, instance: &str) -> Option<&Job> {
        let id = self.instances.get(instance)?.job?;
        self.jobs.get(&id)
    }

    pub(crate) fn apply_job(&mut self, cmd: &JobCommand) -> Result<CommandResult, JobRejection> {
        match cmd {
            JobCommand::CreateMove {
                instance,
                target,
                options,
                now_ms,
            } => self.create_move(instance, *target, options, *now_ms, None),
            JobCommand::Advance {
                id,
                from,
                to,
                now_ms,
                error,
                report,
                note,
                stats,
            } => {
                self.advance_phase(*id, *from, *to, *now_ms)?;
                if let Some(job) = self.jobs.get_mut(id) {
                    if error.is_some() {
                        job.error = error.clone();
                    }
                    if let Some(report) = report {
                        job.report = report.clone();
                    }
                    if let Some(note) = note {
                        job.notes.push(note.clone());
                    }
                    if stats.is_some() {
                        job.stats = stats.clone();
                    }
                }
                Ok(CommandResult::Done)
            }
            JobCommand::RequestAbort { id } => {
                let job = self.jobs.get_mut(id).ok_or(JobRejection::NoJob(*id))?;
                if !job.phase.before_switch() && !job.phase.is_terminal() {
                    return Err(JobRejection::TooLateToAbort(*id));
                }
                job.abort_requested = true;
                Ok(CommandResult::Done)
            }
        }
    }

    pub(crate) fn create_move(
        &mut self,
        instance: &str,
        target: NodeId,
        options: &MoveOptions,
        now_ms: u64,
        parent: Option<JobId>,
    ) -> Result<CommandResult, JobRejection> {
        let inst = self
            .instances
            .get(instance)
            .ok_or_else(|| InstanceRejection::NoInstance(instance.to_string()))?;
        if let Some(job) = inst.job {
            return Err(InstanceRejection::Busy {
                name: instance.to_string(),
                job,
            }
            .into());
        }
        if !self.members.contains_key(&target) {
            return Err(JobRejection::NoTarget(target));
        }
        if inst.owner == target {
            return Err(JobRejection::AlreadyThere {
                instance: instance.to_string(),
                target,
            });
        }
        if let Some(via) = options.mode.relay() {
            if via == inst.owner || via == target || !self.members.contains_key(&via) {
                return Err(JobRejection::BadRelay { via });
            }
        }
        let id = self.next_job_id.max(1);
        let job = Job {
            id,
            kind: JobKind::Migrate,
            instance: instance.to_string(),
            source: inst.owner,
            target,
            phase: Phase::Pending,
            options: options.clone(),
            was_running: inst.observed == ObservedState::Running,
            report: Vec::new(),
            error: None,
            notes: Vec::new(),
            stats: None,
            created_ms: now_ms,
            phase_ms: now_ms,
            abort_requested: false,
            parent,
        };
        self.next_job_id = id + 1;
        self.jobs.insert(id, job);
        if let Some(inst) = self.instances.get_mut(instance) {
            inst.job = Some(id);
        }
        Ok(CommandResult::JobCreated { id })
    }

    /// The compare-and-set: `from` must be the job's phase and `to` a
    /// phase it may go to; the switch phases move ownership (epoch + 1).
    fn advance_phase(
        &mut self,
        id: JobId,
        from: Phase,
        to: Phase,
        now_ms: u64,
    ) -> Result<(), JobRejection> {
        let job = self.jobs.get(&id).ok_or(JobRejection::NoJob(id))?;
        if job.phase != from {
            return Err(JobRejection::PhaseMoved {
                id,
                expected: from.name(),
                current: job.phase.name(),
            });
        }
        if !from.may_advance_to(to) {
            return Err(JobRejection::BadTransition {
                id,
                from: from.name(),
                to: to.name(),
            });
        }
        let (instance, source, target) = (job.instance.clone(), job.source, job.target);
        if let Some(inst) = self.instances.get_mut(&instance) {
            match to {
                Phase::Switched => {
                    inst.owner = target;
                    inst.epoch += 1;
                }
                Phase::SwitchingBack => {
                    inst.owner = source;
                    inst.epoch += 1;
                }
                _ => {}
            }
            if to.is_terminal() && inst.job == Some(id) {
                inst.job = None;
            }
        }
        if let Some(job) = self.jobs.get_mut(&id) {
            job.phase = to;
            job.phase_ms = now_ms;
        }
        if to.is_terminal() {
            self.prune_finished_jobs();
        }
        Ok(())
    }

    /// Past the configured history, the oldest finished moves go; never
    /// one an unfinished evacuation, restore or upgrade still lists.
    fn prune_finished_jobs(&mut self) {
        // The common case, without a walk over every job.
        if self.jobs.len() <= self.config.job_history() {
            return;
        }
        let unfinished_parent = |job: &Job| {
            job.parent.is_some_and(|p| {
                self.host_jobs
                    .get(&p)
                    .is_some_and(|h| h.finished_ms.is_none())
            })
        };
        let finished: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| j.phase.is_terminal() && !unfinished_parent(j))
            .map(|j| j.id)
            .collect();
        let excess = finished.len().saturating_sub(self.config.job_history());
        // Job ids grow: the first ones are the oldest.
        for id in finished.into_iter().take(excess) {
            self.jobs.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instances::{DesiredState, InstanceCommand, InstanceKind, InstanceSpec};
    use crate::model::{Command, Member, Rejection};

    fn member(id: NodeId) -> Member {
        let addr = format!("127.0.0.1:{}", 7000 + id);
        Member::online(id, &format!("n{id}"), &addr, &format!("{id:02x}"), 0)
    }

    /// Three members; instance c1 running on node 1.
    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        for id in 1..=3 {
            s.members.insert(id, member(id));
        }
        s.apply(&Command::Instance(InstanceCommand::Create {
            name: "c1".into(),
            kind: InstanceKind::Container,
            spec: InstanceSpec::default(),
            owner: 1,
            desired: DesiredState::Running,
            now_ms: 0,
        }));
        s.apply(&Command::Instance(InstanceCommand::Observe {
            name: "c1".into(),
            node: 1,
            epoch: 1,
            observed: ObservedState::Running,
            detail: None,
            checkpointed: false,
        }));
        s
    }

    fn create(s: &mut ClusterState, target: NodeId) -> CommandResult {
        s.apply(&Command::Job(JobCommand::CreateMove {
            instance: "c1".into(),
            target,
            options: MoveOptions::default(),
            now_ms: 10,
        }))
    }

    fn advance(s: &mut ClusterState, from: Phase, to: Phase) -> CommandResult {
        s.apply(&Command::Job(JobCommand::Advance {
            id: 1,
            from,
            to,
            now_ms: 20,
            error: None,
            report: None,
            note: None,
            stats: None,
        }))
    }

    fn walk(s: &mut ClusterState, phases: &[Phase]) {
        for pair in phases.windows(2) {
            assert_eq!(
                advance(s, pair[0], pair[1]),
                CommandResult::Done,
                "{pair:?}"
            );
        }
    }

    fn job_rejection(result: CommandResult) -> JobRejection {
        match result {
            CommandResult::Rejected(Rejection::Job(r)) => r,
            other => panic!("expected a job rejection, got {other:?}"),
        }
    }

    use Phase::*;

    #[test]
    fn finished_moves_past_the_history_go_oldest_first_never_an_unfinished_one_or_an_evacuations() {
        let mut s = cluster();
        s.config.job_history = 2;
        create(&mut s, 2);
        let template = s.jobs[&1].clone();
        // 2..=5 done; 6 done but its evacuation runs on; 7 still moving.
        for id in 2..=7 {
            let job = Job {
                id,
                phase: if id == 7 { Preparing } else { Done },
                parent: (id == 6).then_some(100),
                ..template.clone()
            };
            s.jobs.insert(id, job);
        }
        s.host_jobs.insert(
            100,
            crate::hosts::HostJob {
                id: 100,
                kind: crate::hosts::HostJobKind::Evacuate,
                member: 1,
                mode: Default::default(),
                parallel: 1,
                items: Vec::new(),
                abort_requested: false,
                created_ms: 0,
                finished_ms: None,
                parent: None,
                upgrade: None,
            },
        );
        // Job 1 ends: of the finished 1..=5 the two newest stay.
        walk(&mut s, &[Pending, RollingBack, RolledBack]);
        let kept: Vec<JobId> = s.jobs.keys().copied().collect();
        assert_eq!(kept, vec![4, 5, 6, 7]);
        // Unset, the history is the default.
        s.config.job_history = 0;
        assert_eq!(
            s.config.job_history(),
            crate::model::DEFAULT_JOB_HISTORY as usize
        );
    }

    #[test]
    fn a_move_holds_the_instance_and_records_where_it_ran() {
        let mut s = cluster();
        assert_eq!(create(&mut s, 2), CommandResult::JobCreated { id: 1 });
        let job = &s.jobs[&1];
        assert_eq!((job.source, job.target, job.phase), (1, 2, Pending));
        assert!(job.was_running);
        assert_eq!(s.instances["c1"].job, Some(1));
    }

    #[test]
    fn a_second_move_of_a_busy_instance_is_refused() {
        let mut s = cluster();
        create(&mut s, 2);
        let before = s.clone();
        let r = job_rejection(create(&mut s, 3));
        assert!(matches!(
            r,
            JobRejection::Instance(InstanceRejection::Busy { job: 1, .. })
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn a_relay_must_be_a_member_besides_the_two_sides() {
        let mut s = cluster();
        let relayed = |via| MoveOptions {
            mode: TransferMode::Relay { via },
            ..MoveOptions::default()
        };
        let before = s.clone();
        for via in [1, 2, 9] {
            let r = s.apply(&Command::Job(JobCommand::CreateMove {
                instance: "c1".into(),
                target: 2,
                options: relayed(via),
                now_ms: 10,
            }));
            assert!(
                matches!(job_rejection(r), JobRejection::BadRelay { .. }),
                "via {via}"
            );
        }
        assert_eq!(s, before);
        let r = s.apply(&Command::Job(JobCommand::CreateMove {
            instance: "c1".into(),
            target: 2,
            options: relayed(3),
            now_ms: 10,
        }));
        assert!(matches!(r, CommandResult::JobCreated { .. }), "{r:?}");
    }

    #[test]
    fn moves_to_itself_or_to_unknown_members_are_refused() {
        let mut s = cluster();
        assert!(matches!(
            job_rejection(create(&mut s, 1)),
            JobRejection::AlreadyThere { .. }
        ));
        assert!(matches!(
            job_rejection(create(&mut s, 9)),
            JobRejection::NoTarget(9)
        ));
        assert!(s.jobs.is_empty());
    }

    #[test]
    fn switched_makes_the_target_the_owner_with_a_new_epoch() {
        let mut s = cluster();
        create(&mut s, 2);
        walk(&mut s, &[Pending, Checking, Preparing, Frozen]);
        assert_eq!((s.instances["c1"].owner, s.instances["c1"].epoch), (1, 1));
        walk(&mut s, &[Frozen, Switched]);
        assert_eq!((s.instances["c1"].owner, s.instances["c1"].epoch), (2, 2));
        walk(&mut s, &[Switched, Restored, Done]);
        assert_eq!(s.instances["c1"].job, None);
    }

    #[test]
    fn the_old_owner_cannot_report_after_the_switch() {
        let mut s = cluster();
        create(&mut s, 2);
        walk(&mut s, &[Pending, Checking, Preparing, Frozen, Switched]);
        let stale = Command::Instance(InstanceCommand::Observe {
            name: "c1".into(),
            node: 1,
            epoch: 1,
            observed: ObservedState::Running,
            detail: None,
            checkpointed: false,
        });
        assert!(matches!(s.apply(&stale), CommandResult::Rejected(_)));
    }

    #[test]
    fn restored_and_switching_back_cannot_both_commit() {
        let mut a = cluster();
        create(&mut a, 2);
        walk(&mut a, &[Pending, Checking, Preparing, Frozen, Switched]);
        let mut b = a.clone();
        assert_eq!(advance(&mut a, Switched, Restored), CommandResult::Done);
        assert!(matches!(
            job_rejection(advance(&mut a, Switched, SwitchingBack)),
            JobRejection::PhaseMoved { .. }
        ));
        assert_eq!(
            advance(&mut b, Switched, SwitchingBack),
            CommandResult::Done
        );
        assert!(matches!(
            job_rejection(advance(&mut b, Switched, Restored)),
            JobRejection::PhaseMoved { .. }
        ));
        // Switching back returns ownership to the source, again with a new epoch.
        assert_eq!((b.instances["c1"].owner, b.instances["c1"].epoch), (1, 3));
    }

    #[test]
    fn switched_and_rolling_back_cannot_both_commit() {
        let mut s = cluster();
        create(&mut s, 2);
        walk(&mut s, &[Pending, Checking, Preparing, Frozen]);
        let mut other = s.clone();
        assert_eq!(advance(&mut s, Frozen, RollingBack), CommandResult::Done);
        assert!(matches!(
            job_rejection(advance(&mut s, Frozen, Switched)),
            JobRejection::PhaseMoved { .. }
        ));
        assert_eq!(s.instances["c1"].owner, 1);
        assert_eq!(advance(&mut other, Frozen, Switched), CommandResult::Done);
        assert!(matches!(
            job_rejection(advance(&mut other, Frozen, RollingBack)),
            JobRejection::PhaseMoved { .. }
        ));
    }

    #[test]
    fn a_duplicated_proposal_is_harmless() {
        let mut s = cluster();
        create(&mut s, 2);
        walk(&mut s, &[Pending, Checking, Preparing, Frozen, Switched]);
        let before = s.clone();
        assert!(matches!(
            job_rejection(advance(&mut s, Frozen, Switched)),
            JobRejection::PhaseMoved { .. }
        ));
        assert_eq!(s, before, "the epoch must not be bumped twice");
    }

    #[test]
    fn the_phase_graph_refuses_shortcuts() {
        let mut s = cluster();
        create(&mut s, 2);
        for (from, to) in [(Pending, Switched), (Pending, Done), (Pending, Restored)] {
            assert!(matches!(
                job_rejection(advance(&mut s, from, to)),
                JobRejection::BadTransition { .. }
            ));
        }
        walk(
            &mut s,
            &[Pending, Checking, Preparing, Precopy(1), Precopy(2), Frozen],
        );
        assert!(!Precopy(2).may_advance_to(Precopy(4)));
        assert!(!Switched.may_advance_to(RollingBack));
        assert!(!Restored.may_advance_to(SwitchingBack));
        assert!(!Done.may_advance_to(RollingBack));
    }

    #[test]
    fn rollback_before_the_switch_keeps_the_source_owner_and_releases_the_instance() {
        let mut s = cluster();
        create(&mut s, 2);
        walk(
            &mut s,
            &[Pending, Checking, Preparing, RollingBack, RolledBack],
        );
        let inst = &s.instances["c1"];
        assert_eq!((inst.owner, inst.epoch, inst.job), (1, 1, None));
        // The instance can move again.
        assert_eq!(create(&mut s, 3), CommandResult::JobCreated { id: 2 });
    }

    #[test]
    fn abort_is_refused_once_switched() {
        let mut s = cluster();
        create(&mut s, 2);
        let abort = Command::Job(JobCommand::RequestAbort { id: 1 });
        assert_eq!(s.apply(&abort), CommandResult::Done);
        assert!(s.jobs[&1].abort_requested);
        walk(&mut s, &[Pending, Checking, Preparing, Frozen, Switched]);
        assert!(matches!(
            job_rejection(s.apply(&abort)),
            JobRejection::TooLateToAbort(1)
        ));
    }

    #[test]
    fn advance_records_report_error_notes_and_stats() {
        let mut s = cluster();
        create(&mut s, 2);
        let report = vec![CheckResult {
            check: "cpu".into(),
            ok: false,
            detail: "missing: avx2".into(),
        }];
        let result = s.apply(&Command::Job(JobCommand::Advance {
            id: 1,
            from: Pending,
            to: RollingBack,
            now_ms: 33,
            error: Some("compatibility check failed".into()),
            report: Some(report.clone()),
            note: Some("pre-copy unavailable".into()),
            stats: None,
        }));
        assert_eq!(result, CommandResult::Done);
        let job = &s.jobs[&1];
        assert_eq!(job.report, report);
        assert_eq!(job.error.as_deref(), Some("compatibility check failed"));
        assert_eq!(job.notes, vec!["pre-copy unavailable".to_string()]);
        assert_eq!(job.phase_ms, 33);
    }
}
