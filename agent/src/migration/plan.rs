//! What each participant of a migration does next, decided from the
//! committed job and what it sees locally. Pure: phase in, decision out.
//! The engine carries decisions out with runc/CRIU/QUIC and proposes the
//! next phase through the job's compare-and-set. The safety rules of
//! DESIGN.md are properties of these functions, tested below.

use ferry_raft::{Job, NodeId, Phase};

/// What a participant holds of the instance on its own host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalCopy {
    Absent,
    Running,
    /// Paused (source) or restored with its tasks held stopped (target).
    Frozen,
    /// Present but not running (stopped container, or files only).
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Source,
    Target,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do until the job moves on.
    Wait,
    /// Source, Pending: start checking.
    BeginChecks,
    /// Source, Checking: run the compatibility check, then Preparing or
    /// RollingBack.
    RunChecks,
    /// Source, before the switch, abort requested: roll back.
    Abort,
    /// Target, Preparing, pull mode: receive the filesystem while the
    /// source runs, then have the source freeze and send the final state;
    /// propose Frozen.
    Transfer,
    /// Source, Preparing, push mode: send the filesystem while running,
    /// freeze, send the final state; the target proposes Frozen.
    Push,
    /// Source, Preparing, push mode, already frozen: it restarted in the
    /// middle of its push, so the target holds an unknown part; roll back.
    RollBackInterruptedPush,
    /// Target, Frozen: it holds everything, checksummed; propose Switched.
    Switch,
    /// Target, Switched: restore with tasks held stopped (unless already
    /// held), propose Restored (or SwitchingBack if the restore fails).
    RestoreHeld,
    /// Target, Restored: thaw the held copy and propose Done.
    ThawAndFinish,
    /// Target, Restored, its copy already running (thawed, but `Done` did
    /// not commit: cut off, or restarted): propose Done again, every tick,
    /// until it commits; the source's paused copy waits for it.
    ProposeDone,
    /// Source, rolling back with a frozen copy: thaw it, propose RolledBack.
    ThawSource,
    /// Source, rolling back with nothing to thaw (it was stopped, or it
    /// cannot be thawed): propose RolledBack, the instance stays stopped.
    FinishRollback,
    /// Target after a rollback: delete everything it received.
    DiscardReceived,
    /// Source after Done: delete its frozen copy.
    DeleteSourceCopy,
}

/// The next step of `role` in `job`, given its local copy.
pub fn step(job: &Job, role: Role, local: LocalCopy) -> Step {
    use Phase::*;
    let push = job.options.mode.pushes();
    match (role, job.phase) {
        (Role::Source, p) if p.before_switch() && job.abort_requested => Step::Abort,
        (Role::Source, Pending) => Step::BeginChecks,
        (Role::Source, Checking) => Step::RunChecks,
        // A frozen copy here was frozen by this move (ferry never leaves
        // one paused otherwise): thaw it, whatever the job recorded about
        // the instance when it was created.
        (Role::Source, RollingBack | SwitchingBack) => match local {
            LocalCopy::Frozen => Step::ThawSource,
            _ => Step::FinishRollback,
        },
        (Role::Source, Done) if local != LocalCopy::Absent => Step::DeleteSourceCopy,
        (Role::Source, Preparing | Precopy(_)) if push => match local {
            LocalCopy::Frozen => Step::RollBackInterruptedPush,
            _ => Step::Push,
        },
        (Role::Source, _) => Step::Wait,

        (Role::Target, Preparing | Precopy(_)) if !job.abort_requested && !push => Step::Transfer,
        (Role::Target, Frozen) => Step::Switch,
        // Also with a held copy already there: the target may have crashed
        // between restoring and proposing Restored.
        (Role::Target, Switched) if local != LocalCopy::Running => Step::RestoreHeld,
        (Role::Target, Restored) if local == LocalCopy::Running => Step::ProposeDone,
        (Role::Target, Restored) if local == LocalCopy::Frozen || !job.options.stateful => {
            Step::ThawAndFinish
        }
        (Role::Target, RollingBack | SwitchingBack | RolledBack) if local != LocalCopy::Absent => {
            Step::DiscardReceived
        }
        (Role::Target, _) => Step::Wait,
    }
}

/// Whether the source may freeze and dump now (asked by the target over
/// the control channel): only while it still owns the instance and nobody
/// asked to roll back.
pub fn may_freeze(job: &Job) -> bool {
    matches!(job.phase, Phase::Preparing | Phase::Precopy(_)) && !job.abort_requested
}

/// Whether the staging area of an ended move (`instances/NAME/migration`:
/// CRIU images, restore configs) may go. The owner keeps it while its copy
/// is not running: after a failed thaw the final dump is what `ferry start`
/// restores. A non-owner's whole copy is handled by `step`.
pub fn staging_is_leftover(
    job_ended: bool,
    instance_busy: bool,
    owner_is_me: bool,
    local: LocalCopy,
) -> bool {
    job_ended && !instance_busy && owner_is_me && local == LocalCopy::Running
}

/// Whether an ended job may still clean this host's copy of its instance:
/// only while no other job holds the instance and it is not ours. Checked
/// again under the instance's lock, right before acting: a later move may
/// have brought a copy here since the job was picked (a VM or rootfs
/// received for it, which the ended job must not take for its leftover).
pub fn ended_job_may_clean(instance_busy: bool, owner_is_me: bool) -> bool {
    !instance_busy && !owner_is_me
}

/// What the leader does about a job it supervises.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intervention {
    pub from: Phase,
    pub to: Phase,
    pub reason: String,
}

/// Whether the supervisor takes a member for dead: gossip has said so for
/// at least `hold`. A member wrongly declared dead (its answers were late
/// on a loaded host) refutes within a fraction of a second, and a move
/// rolled back for that would have been lost for nothing.
pub fn dead_long_enough(dead_for: Option<std::time::Duration>, hold: std::time::Duration) -> bool {
    dead_for.is_some_and(|d| d >= hold)
}

/// Roll a stuck job back through the same compare-and-set the participants
/// use. `stuck_ms`: how long the supervising leader has seen the job in its
/// phase, on its own monotonic clock (never a proposer's wall clock, which
/// may be minutes off). `alive` tells whether a node is reachable (gossip
/// liveness).
pub fn supervise(
    job: &Job,
    stuck_ms: u64,
    phase_timeout_ms: u64,
    alive: impl Fn(NodeId) -> bool,
) -> Option<Intervention> {
    let overdue = stuck_ms > phase_timeout_ms;
    let intervene = |to: Phase, reason: String| {
        Some(Intervention {
            from: job.phase,
            to,
            reason,
        })
    };
    if job.phase.before_switch() {
        if !alive(job.target) {
            return intervene(
                Phase::RollingBack,
                format!("target node {} is dead", job.target),
            );
        }
        if !alive(job.source) && job.phase != Phase::Frozen {
            return intervene(
                Phase::RollingBack,
                format!("source node {} is dead", job.source),
            );
        }
        if overdue {
            return intervene(
                Phase::RollingBack,
                format!(
                    "phase {} exceeded its {phase_timeout_ms} ms deadline",
                    job.phase.name()
                ),
            );
        }
    }
    if job.phase == Phase::Switched && (overdue || !alive(job.target)) {
        let why = if overdue {
            format!("restore on the target exceeded its {phase_timeout_ms} ms deadline")
        } else {
            format!("target node {} died before restoring", job.target)
        };
        return intervene(Phase::SwitchingBack, why);
    }
    None
}

/// Whether the supervisor asks the target of `job` if its copy runs, and
/// proposes Done when it does: only at Restored (the target may already
/// run the instance, so nothing but Done is ever proposed there) and only
/// past the deadline (the target's own Done did not commit).
pub fn ask_target_to_finish(job: &Job, stuck_ms: u64, phase_timeout_ms: u64) -> bool {
    job.phase == Phase::Restored && stuck_ms > phase_timeout_ms
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ferry_raft::{JobKind, MoveOptions, TransferMode};

    #[test]
    fn a_member_just_declared_dead_is_not_yet_dead_to_the_supervisor() {
        use std::time::Duration;
        let hold = Duration::from_secs(1);
        assert!(!dead_long_enough(None, hold));
        assert!(!dead_long_enough(Some(Duration::from_millis(400)), hold));
        assert!(dead_long_enough(Some(hold), hold));
    }

    const PHASES: [Phase; 11] = [
        Phase::Pending,
        Phase::Checking,
        Phase::Preparing,
        Phase::Precopy(1),
        Phase::Frozen,
        Phase::Switched,
        Phase::Restored,
        Phase::Done,
        Phase::RollingBack,
        Phase::RolledBack,
        Phase::SwitchingBack,
    ];
    const COPIES: [LocalCopy; 4] = [
        LocalCopy::Absent,
        LocalCopy::Running,
        LocalCopy::Frozen,
        LocalCopy::Stopped,
    ];

    /// A pull move of c1 from node 1 to node 2 in `phase`.
    pub(crate) fn job(phase: Phase) -> Job {
        Job {
            id: 1,
            kind: JobKind::Migrate,
            instance: "c1".into(),
            source: 1,
            target: 2,
            phase,
            options: MoveOptions::default(),
            was_running: true,
            report: Vec::new(),
            error: None,
            notes: Vec::new(),
            stats: None,
            created_ms: 0,
            phase_ms: 1_000,
            abort_requested: false,
            parent: None,
        }
    }

    #[test]
    fn staging_goes_only_when_the_job_ended_and_the_owner_runs_the_instance() {
        for local in COPIES {
            for busy in [false, true] {
                for ended in [false, true] {
                    for owner in [false, true] {
                        let expected = ended && !busy && owner && local == LocalCopy::Running;
                        assert_eq!(
                            staging_is_leftover(ended, busy, owner, local),
                            expected,
                            "ended {ended} busy {busy} owner {owner} {local:?}"
                        );
                    }
                }
            }
        }
    }

    /// Every (phase, abort, was_running, copy) combination.
    fn every_case(mut check: impl FnMut(&Job, LocalCopy)) {
        for phase in PHASES {
            for abort in [false, true] {
                for was_running in [false, true] {
                    for mode in [TransferMode::Pull, TransferMode::Push] {
                        for copy in COPIES {
                            let mut j = job(phase);
                            j.abort_requested = abort;
                            j.was_running = was_running;
                            j.options.mode = mode;
                            check(&j, copy);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn exactly_one_side_sends_in_preparing_and_only_without_an_abort() {
        every_case(|j, copy| {
            if !matches!(j.phase, Phase::Preparing | Phase::Precopy(_)) {
                assert!(!matches!(step(j, Role::Source, copy), Step::Push));
                assert!(!matches!(step(j, Role::Target, copy), Step::Transfer));
                return;
            }
            let source = step(j, Role::Source, copy);
            let target = step(j, Role::Target, copy);
            let pushes = source == Step::Push;
            let pulls = target == Step::Transfer;
            if j.abort_requested {
                assert!(!pushes && !pulls, "{j:?} {copy:?}");
            } else if j.options.mode == TransferMode::Push {
                assert!(!pulls);
                // A source already frozen in Preparing restarted mid-push.
                let expected = if copy == LocalCopy::Frozen {
                    Step::RollBackInterruptedPush
                } else {
                    Step::Push
                };
                assert_eq!(source, expected);
            } else {
                assert!(pulls && !pushes, "{j:?} {copy:?}");
            }
        });
    }

    #[test]
    fn frozen_source_never_thaws_without_rollback_or_switch_back_committed() {
        every_case(|j, copy| {
            if step(j, Role::Source, copy) == Step::ThawSource {
                assert!(
                    matches!(j.phase, Phase::RollingBack | Phase::SwitchingBack),
                    "source thaws in {:?}",
                    j.phase
                );
            }
        });
    }

    #[test]
    fn target_copy_thaws_only_after_restored_is_committed() {
        every_case(|j, copy| {
            if step(j, Role::Target, copy) == Step::ThawAndFinish {
                assert_eq!(j.phase, Phase::Restored);
            }
        });
    }

    #[test]
    fn a_target_that_runs_the_copy_proposes_done_until_it_commits() {
        for stateful in [true, false] {
            let mut j = job(Phase::Restored);
            j.options.stateful = stateful;
            assert_eq!(
                step(&j, Role::Target, LocalCopy::Running),
                Step::ProposeDone,
                "stateful {stateful}"
            );
        }
        // Never before the restore committed.
        every_case(|j, copy| {
            if step(j, Role::Target, copy) == Step::ProposeDone {
                assert_eq!(j.phase, Phase::Restored);
            }
        });
    }

    #[test]
    fn a_rollback_thaws_what_the_host_froze_not_what_the_job_recorded() {
        for was_running in [false, true] {
            let mut j = job(Phase::RollingBack);
            j.was_running = was_running;
            // Frozen here means this move froze it: it ran at the freeze.
            assert_eq!(step(&j, Role::Source, LocalCopy::Frozen), Step::ThawSource);
            assert_eq!(
                step(&j, Role::Source, LocalCopy::Stopped),
                Step::FinishRollback
            );
        }
    }

    #[test]
    fn a_failed_restore_switches_back_and_the_source_thaws() {
        let j = job(Phase::SwitchingBack);
        assert_eq!(step(&j, Role::Source, LocalCopy::Frozen), Step::ThawSource);
        assert_eq!(
            step(&j, Role::Target, LocalCopy::Frozen),
            Step::DiscardReceived
        );
    }

    #[test]
    fn source_never_acts_between_switch_and_done() {
        for phase in [Phase::Frozen, Phase::Switched, Phase::Restored] {
            for copy in COPIES {
                assert_eq!(
                    step(&job(phase), Role::Source, copy),
                    Step::Wait,
                    "{phase:?}"
                );
            }
        }
    }

    #[test]
    fn a_target_that_restarts_after_restoring_proposes_restored_again() {
        let j = job(Phase::Switched);
        assert_eq!(step(&j, Role::Target, LocalCopy::Frozen), Step::RestoreHeld);
        assert_eq!(step(&j, Role::Target, LocalCopy::Absent), Step::RestoreHeld);
    }

    #[test]
    fn done_deletes_the_source_copy_and_nothing_else() {
        assert_eq!(
            step(&job(Phase::Done), Role::Source, LocalCopy::Frozen),
            Step::DeleteSourceCopy
        );
        assert_eq!(
            step(&job(Phase::Done), Role::Source, LocalCopy::Absent),
            Step::Wait
        );
        assert_eq!(
            step(&job(Phase::Done), Role::Target, LocalCopy::Running),
            Step::Wait
        );
    }

    #[test]
    fn abort_before_the_switch_rolls_back_and_is_ignored_after() {
        let mut j = job(Phase::Preparing);
        j.abort_requested = true;
        assert_eq!(step(&j, Role::Source, LocalCopy::Running), Step::Abort);
        assert_eq!(step(&j, Role::Target, LocalCopy::Absent), Step::Wait);
        assert!(!may_freeze(&j));
        j.phase = Phase::Switched;
        assert_eq!(step(&j, Role::Source, LocalCopy::Frozen), Step::Wait);
    }

    #[test]
    fn the_source_freezes_only_while_it_owns_the_instance() {
        for phase in PHASES {
            let allowed = may_freeze(&job(phase));
            assert_eq!(
                allowed,
                matches!(phase, Phase::Preparing | Phase::Precopy(_)),
                "{phase:?}"
            );
        }
    }

    #[test]
    fn a_dead_target_before_the_switch_rolls_back() {
        let j = job(Phase::Frozen);
        let i = supervise(&j, 500, 60_000, |n| n != 2).unwrap();
        assert_eq!((i.from, i.to), (Phase::Frozen, Phase::RollingBack));
    }

    #[test]
    fn an_overdue_restore_switches_back_but_restored_is_never_undone() {
        let j = job(Phase::Switched);
        assert_eq!(supervise(&j, 1_000, 60_000, |_| true), None);
        let i = supervise(&j, 99_000, 60_000, |_| true).unwrap();
        assert_eq!(i.to, Phase::SwitchingBack);
        for phase in [
            Phase::Restored,
            Phase::Done,
            Phase::RolledBack,
            Phase::RollingBack,
            Phase::SwitchingBack,
        ] {
            assert_eq!(
                supervise(&job(phase), 999_000, 60_000, |_| false),
                None,
                "{phase:?}"
            );
        }
    }

    #[test]
    fn the_supervisor_finishes_only_an_overdue_restored_job() {
        for phase in PHASES {
            let j = job(phase);
            assert_eq!(
                ask_target_to_finish(&j, 61_000, 60_000),
                phase == Phase::Restored,
                "{phase:?}"
            );
            assert!(!ask_target_to_finish(&j, 59_000, 60_000), "{phase:?}");
        }
    }

    #[test]
    fn a_partitioned_frozen_source_is_rolled_back_only_by_commit() {
        // The source is unreachable while frozen: the leader does not roll
        // back for that alone (the source cannot hear it), only at the
        // deadline; the source thaws once it sees RollingBack.
        let j = job(Phase::Frozen);
        assert_eq!(supervise(&j, 1_000, 60_000, |n| n != 1), None);
        let i = supervise(&j, 99_000, 60_000, |n| n != 1).unwrap();
        assert_eq!(i.to, Phase::RollingBack);
    }

    #[test]
    fn an_ended_job_never_cleans_a_copy_a_later_move_brought() {
        // Another move holds the instance: its incoming copy stays.
        assert!(!ended_job_may_clean(true, false));
        // Ours again: nothing of it is a leftover.
        assert!(!ended_job_may_clean(false, true));
        assert!(ended_job_may_clean(false, false));
    }
}
