//! The next steps of a host job (layer 0, pure): the job and the state
//! in, steps out. The leader's loop (`runner.rs`) carries them out; a new
//! leader computes the same steps from the same committed state, so an
//! evacuation carries on after a leader change.

use std::collections::BTreeMap;

use ferry_raft::{
    ClusterState, DesiredState, EvacuateMode, EvacuatePolicy, HostItem, HostJob, HostJobKind,
    Instance, ItemState, Job, NodeId, ObservedState, Phase,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Start a child move (commit `StartMove`).
    StartMove {
        instance: String,
        target: NodeId,
        stateful: bool,
    },
    /// Stop it on its owner with its state kept, then settle it `Stopped`
    /// with `why`.
    StopInPlace { instance: String, why: String },
    /// Start it again on its owner (it was stopped by the evacuation),
    /// then settle it `Started`.
    StartInPlace { instance: String },
    Settle {
        instance: String,
        state: ItemState,
        detail: String,
    },
    /// Every item is final.
    Finish,
}

impl Step {
    /// The instance a step deals with (none for `Finish`).
    pub fn instance(&self) -> Option<&str> {
        match self {
            Step::StartMove { instance, .. }
            | Step::StopInPlace { instance, .. }
            | Step::StartInPlace { instance }
            | Step::Settle { instance, .. } => Some(instance),
            Step::Finish => None,
        }
    }

    /// Whether it takes one of the job's `parallel` slots.
    fn busy(&self) -> bool {
        !matches!(self, Step::Settle { .. } | Step::Finish)
    }
}

/// Whether a leader should hand its leadership to another voter: its own
/// member is being (or was) evacuated, so its host may go down next, and a
/// voter that could take over is alive.
pub fn should_hand_off(me: Option<&ferry_raft::Member>, other_voters_alive: usize) -> bool {
    let evacuated = me.is_some_and(|m| {
        m.cordoned
            && matches!(
                m.state,
                ferry_raft::MemberState::Evacuating | ferry_raft::MemberState::Evacuated
            )
    });
    evacuated && other_voters_alive > 0
}

/// What placement is asked for one instance.
pub struct PlaceAsk<'a> {
    pub instance: &'a Instance,
    pub stateful: bool,
    /// Only this member (a restore's home).
    pub only: Option<NodeId>,
    /// Instances already headed to each member.
    pub planned: &'a BTreeMap<NodeId, u32>,
}

/// Placement: a member, or why none can take it.
pub type Place<'p> = dyn FnMut(PlaceAsk<'_>) -> Result<NodeId, String> + 'p;

/// The steps to take now for `job`.
pub fn next(job: &HostJob, s: &ClusterState, place: &mut Place<'_>) -> Vec<Step> {
    if job.is_done() {
        return Vec::new();
    }
    let mut steps = Vec::new();
    let mut planned = BTreeMap::new();
    for item in job.items.iter().filter(|i| i.state == ItemState::Moving) {
        match child_outcome(job, item, s) {
            Some(step) => steps.push(step),
            None => *planned.entry(item.target.unwrap_or(0)).or_insert(0) += 1,
        }
    }
    let mut in_flight =
        planned.values().sum::<u32>() + steps.iter().filter(|s| s.busy()).count() as u32;
    for item in job.items.iter().filter(|i| i.state == ItemState::Waiting) {
        if job.abort_requested {
            steps.push(settle(
                item,
                ItemState::Stayed,
                "the job was aborted before it started",
            ));
            continue;
        }
        if in_flight >= job.parallel {
            break;
        }
        let Some(step) = waiting_step(job, item, s, place, &planned) else {
            continue;
        };
        if let Step::StartMove { target, .. } = &step {
            *planned.entry(*target).or_insert(0) += 1;
        }
        if step.busy() {
            in_flight += 1;
        }
        steps.push(step);
    }
    let all_final = job.items.iter().all(|i| i.state.is_final());
    if steps.is_empty() && all_final {
        steps.push(Step::Finish);
    }
    steps
}

fn settle(item: &HostItem, state: ItemState, detail: &str) -> Step {
    Step::Settle {
        instance: item.instance.clone(),
        state,
        detail: detail.to_string(),
    }
}

/// A moving item whose child ended: its outcome (`None` while it runs).
fn child_outcome(job: &HostJob, item: &HostItem, s: &ClusterState) -> Option<Step> {
    let Some(child) = item.child.and_then(|id| s.jobs.get(&id)) else {
        return Some(settle(item, ItemState::Failed, "its move job is gone"));
    };
    let target = s
        .members
        .get(&child.target)
        .map_or_else(|| format!("node {}", child.target), |m| m.name.clone());
    match child.phase {
        Phase::Done => Some(settle(item, ItemState::Moved, &format!("to {target}"))),
        Phase::RolledBack => {
            let error = child.error.as_deref().unwrap_or("rolled back");
            let why = format!("move {} to {target} failed: {error}", child.id);
            if may_retry(job, item, child, s) {
                return Some(settle(
                    item,
                    ItemState::Waiting,
                    &format!("{why}; trying again"),
                ));
            }
            let owner_here = s
                .instances
                .get(&item.instance)
                .is_some_and(|i| i.owner == job.member);
            Some(match job.kind {
                HostJobKind::Evacuate if owner_here => Step::StopInPlace {
                    instance: item.instance.clone(),
                    why: format!("{why}; stopped with its state kept"),
                },
                _ => settle(item, ItemState::Stayed, &why),
            })
        }
        _ => None,
    }
}

/// Moves of one item a host job tries before it settles the item.
pub const MOVE_ATTEMPTS: usize = 2;

/// Whether a rolled-back child move is tried again: a rollback leaves the
/// instance as it was, and a transient failure (a connection lost to a
/// member that just restarted, say) should not leave a host unrestored.
/// Not after an abort, nor once the item had its attempts.
fn may_retry(job: &HostJob, item: &HostItem, child: &Job, s: &ClusterState) -> bool {
    let failed = s
        .jobs
        .values()
        .filter(|j| j.parent == Some(job.id) && j.instance == item.instance)
        .filter(|j| j.phase == Phase::RolledBack)
        .count();
    let unchanged = s
        .instances
        .get(&item.instance)
        .is_some_and(|i| i.owner == child.source && i.job.is_none());
    !job.abort_requested && !child.abort_requested && unchanged && failed < MOVE_ATTEMPTS
}

/// What to do with a waiting item; `None` to wait (another job holds it).
fn waiting_step(
    job: &HostJob,
    item: &HostItem,
    s: &ClusterState,
    place: &mut Place<'_>,
    planned: &BTreeMap<NodeId, u32>,
) -> Option<Step> {
    let Some(inst) = s.instances.get(&item.instance) else {
        return Some(settle(item, ItemState::Stayed, "it was deleted"));
    };
    if inst.job.is_some() {
        return None;
    }
    Some(match job.kind {
        HostJobKind::Evacuate => evacuate_step(job, item, inst, place, planned),
        HostJobKind::Restore => restore_step(job, item, inst, place, planned),
        // An upgrade has no items of its own (see `rolling.rs`).
        HostJobKind::Upgrade => return None,
    })
}

/// The policy that applies: the instance's own, else the job's mode.
fn policy(inst: &Instance, mode: EvacuateMode) -> EvacuatePolicy {
    match (inst.spec.evacuate, mode) {
        (EvacuatePolicy::Auto, EvacuateMode::Auto) => EvacuatePolicy::Auto,
        (EvacuatePolicy::Auto, EvacuateMode::Live) => EvacuatePolicy::Live,
        (EvacuatePolicy::Auto, EvacuateMode::Stateless) => EvacuatePolicy::Stateless,
        (EvacuatePolicy::Auto, EvacuateMode::Stop) => EvacuatePolicy::Stop,
        (own, _) => own,
    }
}

fn evacuate_step(
    job: &HostJob,
    item: &HostItem,
    inst: &Instance,
    place: &mut Place<'_>,
    planned: &BTreeMap<NodeId, u32>,
) -> Step {
    if inst.owner != job.member {
        return settle(item, ItemState::Stayed, "it is no longer on this member");
    }
    if inst.desired == DesiredState::Stopped {
        return settle(item, ItemState::Stayed, "stopped already; its files stay");
    }
    let stop = |why: String| Step::StopInPlace {
        instance: item.instance.clone(),
        why,
    };
    let stateful = match policy(inst, job.mode) {
        EvacuatePolicy::Stay => {
            return settle(item, ItemState::Stayed, "its evacuation policy is 'stay'");
        }
        EvacuatePolicy::Stop => {
            return stop("evacuation policy 'stop': stopped with its state kept".into())
        }
        EvacuatePolicy::Stateless => false,
        EvacuatePolicy::Auto | EvacuatePolicy::Live => inst.observed == ObservedState::Running,
    };
    let ask = PlaceAsk {
        instance: inst,
        stateful,
        only: None,
        planned,
    };
    match place(ask) {
        Ok(target) => Step::StartMove {
            instance: item.instance.clone(),
            target,
            stateful,
        },
        Err(why) => stop(format!("{why}; stopped with its state kept")),
    }
}

fn restore_step(
    job: &HostJob,
    item: &HostItem,
    inst: &Instance,
    place: &mut Place<'_>,
    planned: &BTreeMap<NodeId, u32>,
) -> Step {
    let Some(origin) = &inst.origin else {
        return settle(item, ItemState::Stayed, "no longer marked as evacuated");
    };
    if inst.owner == job.member {
        return match origin.stopped && inst.desired == DesiredState::Stopped {
            true => Step::StartInPlace {
                instance: item.instance.clone(),
            },
            false => settle(item, ItemState::Stayed, "it is home already"),
        };
    }
    let stateful = inst.observed == ObservedState::Running;
    let ask = PlaceAsk {
        instance: inst,
        stateful,
        only: Some(job.member),
        planned,
    };
    match place(ask) {
        Ok(target) => Step::StartMove {
            instance: item.instance.clone(),
            target,
            stateful,
        },
        Err(why) => settle(item, ItemState::Stayed, &format!("cannot go home: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_raft::{
        Command, CommandResult, HostJobCommand, InstanceCommand, InstanceKind, InstanceSpec,
        JobCommand, Member, MoveOptions,
    };

    /// Members 1–3; c1..cN running on member 1.
    fn cluster(n: usize) -> ClusterState {
        let mut s = ClusterState::default();
        for id in 1..=3 {
            let addr = format!("127.0.0.1:{}", 7000 + id);
            let m = Member::online(id, &format!("n{id}"), &addr, &format!("{id:02x}"), 0);
            s.members.insert(id, m);
        }
        for i in 1..=n {
            let name = format!("c{i}");
            s.apply(&Command::Instance(InstanceCommand::Create {
                name: name.clone(),
                kind: InstanceKind::Container,
                spec: InstanceSpec::default(),
                owner: 1,
                desired: DesiredState::Running,
                now_ms: 0,
            }));
            s.apply(&Command::Instance(InstanceCommand::Observe {
                name,
                node: 1,
                epoch: 1,
                observed: ObservedState::Running,
                detail: None,
                checkpointed: false,
            }));
        }
        s
    }

    fn create(s: &mut ClusterState, kind: HostJobKind, mode: EvacuateMode, parallel: u32) -> u64 {
        let cmd = HostJobCommand::Create {
            kind,
            member: 1,
            mode,
            parallel,
            now_ms: 1,
        };
        match s.apply(&Command::Host(cmd)) {
            CommandResult::JobCreated { id } => id,
            other => panic!("{other:?}"),
        }
    }

    /// Placement that sends everything to member 2.
    fn to_two(_: PlaceAsk<'_>) -> Result<NodeId, String> {
        Ok(2)
    }

    fn steps(s: &ClusterState, id: u64, place: &mut Place<'_>) -> Vec<Step> {
        next(&s.host_jobs[&id], s, place)
    }

    /// Commit what the runner would for `steps` (moves only created).
    fn take(s: &mut ClusterState, id: u64, steps: &[Step]) {
        for step in steps {
            let cmd = match step.clone() {
                Step::StartMove {
                    instance,
                    target,
                    stateful,
                } => HostJobCommand::StartMove {
                    id,
                    instance,
                    target,
                    options: MoveOptions {
                        stateful,
                        ..MoveOptions::default()
                    },
                    now_ms: 2,
                },
                Step::Settle {
                    instance,
                    state,
                    detail,
                } => HostJobCommand::Settle {
                    id,
                    instance,
                    state,
                    detail: Some(detail),
                },
                Step::Finish => HostJobCommand::Finish { id, now_ms: 3 },
                other => panic!("not committed here: {other:?}"),
            };
            s.apply(&Command::Host(cmd));
        }
    }

    fn end_child(s: &mut ClusterState, child: u64, to: Phase) {
        let path: &[(Phase, Phase)] = match to {
            Phase::Done => &[
                (Phase::Pending, Phase::Checking),
                (Phase::Checking, Phase::Preparing),
                (Phase::Preparing, Phase::Frozen),
                (Phase::Frozen, Phase::Switched),
                (Phase::Switched, Phase::Restored),
                (Phase::Restored, Phase::Done),
            ],
            _ => &[
                (Phase::Pending, Phase::RollingBack),
                (Phase::RollingBack, Phase::RolledBack),
            ],
        };
        for (from, to) in path {
            s.apply(&Command::Job(JobCommand::Advance {
                id: child,
                from: *from,
                to: *to,
                now_ms: 3,
                error: Some("target failed".into()),
                report: None,
                note: None,
                stats: None,
            }));
        }
    }

    fn moves(steps: &[Step]) -> usize {
        steps
            .iter()
            .filter(|s| matches!(s, Step::StartMove { .. }))
            .count()
    }

    #[test]
    fn only_an_evacuated_leader_with_a_live_voter_to_take_over_hands_off() {
        let mut s = cluster(0);
        assert!(!should_hand_off(s.members.get(&1), 2), "online");
        create(&mut s, HostJobKind::Evacuate, EvacuateMode::Auto, 2);
        assert!(should_hand_off(s.members.get(&1), 2));
        assert!(
            !should_hand_off(s.members.get(&1), 0),
            "nobody to take over"
        );
        s.members.get_mut(&1).unwrap().cordoned = false;
        assert!(!should_hand_off(s.members.get(&1), 2), "uncordoned");
    }

    #[test]
    fn at_most_parallel_children_run_and_the_rest_wait() {
        let mut s = cluster(6);
        let id = create(&mut s, HostJobKind::Evacuate, EvacuateMode::Auto, 2);
        let first = steps(&s, id, &mut to_two);
        assert_eq!(moves(&first), 2);
        take(&mut s, id, &first);
        // Two children run: nothing new starts.
        assert!(steps(&s, id, &mut to_two).is_empty());
        // One ends: its item is settled, and one more starts.
        let child = s.host_jobs[&id].items[0].child.unwrap();
        end_child(&mut s, child, Phase::Done);
        let after = steps(&s, id, &mut to_two);
        assert!(after.contains(&Step::Settle {
            instance: "c1".into(),
            state: ItemState::Moved,
            detail: "to n2".into(),
        }));
        assert_eq!(moves(&after), 1);
    }

    #[test]
    fn an_instance_no_member_takes_is_stopped_with_its_state_kept() {
        let mut s = cluster(1);
        let id = create(&mut s, HostJobKind::Evacuate, EvacuateMode::Auto, 2);
        let mut nowhere = |_: PlaceAsk<'_>| Err("n2: cpu: lacks avx2".to_string());
        let got = steps(&s, id, &mut nowhere);
        assert!(
            matches!(&got[..], [Step::StopInPlace { why, .. }] if why.contains("avx2") && why.contains("state kept")),
            "{got:?}"
        );
    }

    #[test]
    fn a_failed_child_is_tried_again_then_falls_back_to_a_stop_in_place() {
        let mut s = cluster(1);
        let id = create(&mut s, HostJobKind::Evacuate, EvacuateMode::Auto, 2);
        let first = steps(&s, id, &mut to_two);
        take(&mut s, id, &first);
        let child = s.host_jobs[&id].items[0].child.unwrap();
        end_child(&mut s, child, Phase::RolledBack);
        let retry = steps(&s, id, &mut to_two);
        assert!(
            matches!(&retry[..], [Step::Settle { state: ItemState::Waiting, detail, .. }] if detail.contains("trying again")),
            "{retry:?}"
        );
        take(&mut s, id, &retry);
        let again = steps(&s, id, &mut to_two);
        assert_eq!(moves(&again), 1, "{again:?}");
        take(&mut s, id, &again);
        let child = s.host_jobs[&id].items[0].child.unwrap();
        end_child(&mut s, child, Phase::RolledBack);
        let got = steps(&s, id, &mut to_two);
        assert!(
            matches!(&got[..], [Step::StopInPlace { why, .. }] if why.contains("target failed")),
            "{got:?}"
        );
    }

    #[test]
    fn the_instance_s_policy_wins_over_the_mode() {
        let mut s = cluster(4);
        let policies = [
            EvacuatePolicy::Stay,
            EvacuatePolicy::Stop,
            EvacuatePolicy::Stateless,
            EvacuatePolicy::Auto,
        ];
        for (i, policy) in policies.iter().enumerate() {
            let inst = s.instances.get_mut(&format!("c{}", i + 1)).unwrap();
            inst.spec.evacuate = *policy;
        }
        let id = create(&mut s, HostJobKind::Evacuate, EvacuateMode::Live, 10);
        let got = steps(&s, id, &mut to_two);
        assert!(matches!(
            &got[0],
            Step::Settle {
                state: ItemState::Stayed,
                ..
            }
        ));
        assert!(matches!(&got[1], Step::StopInPlace { .. }));
        assert!(matches!(
            &got[2],
            Step::StartMove {
                stateful: false,
                ..
            }
        ));
        assert!(matches!(&got[3], Step::StartMove { stateful: true, .. }));
        // A mode of stop stops even what auto would move.
        let mut s = cluster(1);
        let id = create(&mut s, HostJobKind::Evacuate, EvacuateMode::Stop, 2);
        assert!(matches!(
            &steps(&s, id, &mut to_two)[..],
            [Step::StopInPlace { .. }]
        ));
    }

    #[test]
    fn abort_starts_nothing_new_and_the_job_finishes_when_all_are_final() {
        let mut s = cluster(3);
        let id = create(&mut s, HostJobKind::Evacuate, EvacuateMode::Auto, 1);
        let first = steps(&s, id, &mut to_two);
        take(&mut s, id, &first);
        s.apply(&Command::Host(HostJobCommand::RequestAbort { id }));
        let got = steps(&s, id, &mut to_two);
        assert_eq!(moves(&got), 0);
        take(&mut s, id, &got);
        // The running child still counts: not finished yet.
        assert!(steps(&s, id, &mut to_two).is_empty());
        let child = s.host_jobs[&id].items[0].child.unwrap();
        end_child(&mut s, child, Phase::Done);
        let settled = steps(&s, id, &mut to_two);
        take(&mut s, id, &settled);
        assert_eq!(steps(&s, id, &mut to_two), vec![Step::Finish]);
    }

    #[test]
    fn a_busy_instance_waits_and_a_stopped_one_stays() {
        let mut s = cluster(2);
        s.apply(&Command::Job(JobCommand::CreateMove {
            instance: "c1".into(),
            target: 3,
            options: MoveOptions::default(),
            now_ms: 0,
        }));
        s.instances.get_mut("c2").unwrap().desired = DesiredState::Stopped;
        let id = create(&mut s, HostJobKind::Evacuate, EvacuateMode::Auto, 2);
        let got = steps(&s, id, &mut to_two);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            matches!(&got[0], Step::Settle { instance, state: ItemState::Stayed, .. } if instance == "c2")
        );
    }

    #[test]
    fn a_restore_moves_home_only_to_the_member_and_starts_what_it_stopped() {
        let mut s = cluster(2);
        let id = create(&mut s, HostJobKind::Evacuate, EvacuateMode::Auto, 2);
        // c1 moved to n2; c2 stopped in place.
        take(
            &mut s,
            id,
            &[Step::StartMove {
                instance: "c1".into(),
                target: 2,
                stateful: true,
            }],
        );
        let child = s.host_jobs[&id].items[0].child.unwrap();
        end_child(&mut s, child, Phase::Done);
        s.instances.get_mut("c2").unwrap().desired = DesiredState::Stopped;
        take(
            &mut s,
            id,
            &[
                Step::Settle {
                    instance: "c1".into(),
                    state: ItemState::Moved,
                    detail: String::new(),
                },
                Step::Settle {
                    instance: "c2".into(),
                    state: ItemState::Stopped,
                    detail: String::new(),
                },
                Step::Finish,
            ],
        );
        let back = create(&mut s, HostJobKind::Restore, EvacuateMode::Auto, 2);
        let mut asked = Vec::new();
        let mut home = |ask: PlaceAsk<'_>| {
            asked.push(ask.only);
            ask.only.ok_or_else(|| "no home".to_string())
        };
        let got = steps(&s, back, &mut home);
        assert_eq!(asked, [Some(1)]);
        assert!(
            got.iter().any(
                |s| matches!(s, Step::StartMove { instance, target: 1, .. } if instance == "c1")
            ),
            "{got:?}"
        );
        assert!(got.contains(&Step::StartInPlace {
            instance: "c2".into()
        }));
    }
}
