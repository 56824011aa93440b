//! What the owner does so its host matches the replicated state (layer 0):
//! pure, instance and what the runtime reports in, action out. The
//! reconciler loop (`reconciler.rs`) carries the action out under the
//! instance's host lock, which operator actions share, so it never races a
//! stop or a checkpoint.

use std::time::Duration;

use ferry_raft::{DesiredState, Instance, NodeId, ObservedState, RestartPolicy};

use crate::driver::{ProcessExit, RunState};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Run the instance's command afresh.
    Start,
    /// Restore it from the checkpoint of a stateful stop.
    Restore,
    /// Stop it: desired stopped but it runs (e.g. the agent died between
    /// committing a stop and doing it).
    Stop,
    /// Its process ended without ferry ending it (exit, crash, or the host
    /// restarted under it) and its policy is `always`: start it again once
    /// its restart delay passed.
    Restart,
}

/// A run at least this long resets the restart delay.
pub const STABLE_RUN: Duration = Duration::from_secs(60);
/// The longest wait between restarts.
pub const MAX_RESTART_DELAY: Duration = Duration::from_secs(60);

/// How long to wait before the restart that follows `quick` restarts in a
/// row (each run shorter than [`STABLE_RUN`]): 1 s, doubling, at most
/// [`MAX_RESTART_DELAY`].
pub fn restart_delay(quick: u32) -> Duration {
    let secs = 1u64.checked_shl(quick.min(16)).unwrap_or(u64::MAX);
    Duration::from_secs(secs).min(MAX_RESTART_DELAY)
}

/// Quick restarts in a row after a run of `ran_for`.
pub fn quick_restarts(before: u32, ran_for: Duration) -> u32 {
    if ran_for >= STABLE_RUN {
        0
    } else {
        before.saturating_add(1)
    }
}

/// What the owner should do for `instance`, and what to report; `exit` is
/// how its process last ended, when its parent recorded that.
pub fn decide(
    instance: &Instance,
    me: NodeId,
    runtime: Option<RunState>,
    exit: Option<ProcessExit>,
) -> (Action, Option<ObservedState>) {
    // Only the owner runs an instance; a job's participants drive it while
    // it moves.
    if instance.owner != me || instance.job.is_some() {
        return (Action::Nothing, None);
    }
    let observed = match runtime {
        Some(RunState::Running) => ObservedState::Running,
        Some(RunState::Paused) => ObservedState::Frozen,
        Some(RunState::Stopped) | None => ObservedState::Stopped,
    };
    match (instance.desired, runtime) {
        (DesiredState::Running, None) if instance.observed == ObservedState::Error => {
            // A failed start is retried by `ferry start`, not in a loop.
            (Action::Nothing, None)
        }
        (DesiredState::Running, None) if instance.checkpointed => (Action::Restore, None),
        (DesiredState::Running, None) => (Action::Start, None),
        (DesiredState::Running, Some(RunState::Stopped)) => {
            // An end nobody recorded (the shim was killed too) counts as a
            // failure: restarting is the safe side for a wanted service.
            let failed = exit.is_none_or(ProcessExit::is_failure);
            match instance.spec.restart {
                RestartPolicy::Always => (Action::Restart, None),
                RestartPolicy::OnFailure if failed => (Action::Restart, None),
                RestartPolicy::OnFailure | RestartPolicy::Never => {
                    (Action::Nothing, Some(ObservedState::Stopped))
                }
            }
        }
        (DesiredState::Stopped, Some(RunState::Running | RunState::Paused)) => (Action::Stop, None),
        _ => (Action::Nothing, Some(observed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_raft::{InstanceKind, InstanceSpec};

    fn instance(desired: DesiredState, observed: ObservedState) -> Instance {
        Instance {
            name: "c1".into(),
            kind: InstanceKind::Container,
            spec: InstanceSpec::default(),
            owner: 1,
            epoch: 1,
            desired,
            observed,
            detail: None,
            checkpointed: false,
            baseline: None,
            snapshots: Vec::new(),
            created_ms: 0,
            job: None,
            restarts: 0,
            last_restart: None,
            origin: None,
        }
    }

    #[test]
    fn never_starts_a_second_copy_when_the_runtime_reports_one() {
        let i = instance(DesiredState::Running, ObservedState::Pending);
        for status in [RunState::Running, RunState::Paused] {
            assert_eq!(
                decide(&i, 1, Some(status), None).0,
                Action::Nothing,
                "{status:?}"
            );
        }
    }

    #[test]
    fn an_ended_process_is_restarted_only_with_policy_always() {
        let mut i = instance(DesiredState::Running, ObservedState::Running);
        assert_eq!(
            decide(&i, 1, Some(RunState::Stopped), None).0,
            Action::Restart
        );
        i.spec.restart = RestartPolicy::Never;
        assert_eq!(
            decide(&i, 1, Some(RunState::Stopped), None),
            (Action::Nothing, Some(ObservedState::Stopped))
        );
        // Stopped on purpose, or moving: never restarted.
        let mut stopped = instance(DesiredState::Stopped, ObservedState::Stopped);
        assert_eq!(
            decide(&stopped, 1, Some(RunState::Stopped), None).0,
            Action::Nothing
        );
        stopped.desired = DesiredState::Running;
        stopped.job = Some(3);
        assert_eq!(
            decide(&stopped, 1, Some(RunState::Stopped), None).0,
            Action::Nothing
        );
    }

    #[test]
    fn on_failure_restarts_anything_but_a_clean_exit() {
        let mut i = instance(DesiredState::Running, ObservedState::Running);
        i.spec.restart = RestartPolicy::OnFailure;
        let stopped = Some(RunState::Stopped);
        for exit in [ProcessExit::Code(3), ProcessExit::Signal(9)] {
            assert_eq!(
                decide(&i, 1, stopped, Some(exit)).0,
                Action::Restart,
                "{exit}"
            );
        }
        assert_eq!(
            decide(&i, 1, stopped, Some(ProcessExit::Code(0))),
            (Action::Nothing, Some(ObservedState::Stopped))
        );
        // Nobody saw how it ended: restarted, the safe side for a service.
        assert_eq!(decide(&i, 1, stopped, None).0, Action::Restart);
        // `always` restarts a clean exit too.
        i.spec.restart = RestartPolicy::Always;
        let clean = Some(ProcessExit::Code(0));
        assert_eq!(decide(&i, 1, stopped, clean).0, Action::Restart);
    }

    #[test]
    fn restarts_back_off_and_a_stable_run_resets_the_delay() {
        let delays: Vec<u64> = (0..8).map(|n| restart_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(restart_delay(u32::MAX), MAX_RESTART_DELAY);
        assert_eq!(quick_restarts(5, Duration::from_secs(3)), 6);
        assert_eq!(quick_restarts(5, STABLE_RUN), 0);
    }

    #[test]
    fn non_owner_never_runs_or_stops_an_instance() {
        for desired in [DesiredState::Running, DesiredState::Stopped] {
            for status in [None, Some(RunState::Running)] {
                let i = instance(desired, ObservedState::Running);
                assert_eq!(decide(&i, 2, status, None), (Action::Nothing, None));
            }
        }
    }

    #[test]
    fn an_instance_held_by_a_job_is_left_to_the_job() {
        let mut i = instance(DesiredState::Running, ObservedState::Running);
        i.job = Some(4);
        assert_eq!(decide(&i, 1, None, None), (Action::Nothing, None));
    }

    #[test]
    fn a_missing_container_is_started_or_restored() {
        let mut i = instance(DesiredState::Running, ObservedState::Pending);
        assert_eq!(decide(&i, 1, None, None).0, Action::Start);
        i.checkpointed = true;
        assert_eq!(decide(&i, 1, None, None).0, Action::Restore);
        i.observed = ObservedState::Error;
        assert_eq!(decide(&i, 1, None, None).0, Action::Nothing);
    }

    #[test]
    fn a_running_container_that_should_be_stopped_is_stopped() {
        let i = instance(DesiredState::Stopped, ObservedState::Running);
        assert_eq!(decide(&i, 1, Some(RunState::Running), None).0, Action::Stop);
        assert_eq!(
            decide(&i, 1, None, None),
            (Action::Nothing, Some(ObservedState::Stopped))
        );
    }
}
