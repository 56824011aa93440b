//! The next steps of a rolling upgrade (layer 0, pure): one member at a
//! time (or `--max-unavailable`), each through evacuate → hook → verify →
//! restore; the first failure stops it, leaving everything as it is. The
//! hook stage is the member's own (its agent runs the hook and reports);
//! every other stage is the leader's.

use ferry_raft::{ClusterState, HostFacts, HostJob, MemberState, NodeId, Stage, Upgrade};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpStep {
    /// Move `member` from one stage to the next.
    Stage {
        member: NodeId,
        from: Stage,
        to: Stage,
        detail: Option<String>,
    },
    Finish,
}

impl UpStep {
    /// The command that takes this step of upgrade job `id`.
    pub fn command(self, id: u64, now_ms: u64) -> ferry_raft::HostJobCommand {
        match self {
            UpStep::Stage {
                member,
                from,
                to,
                detail,
            } => ferry_raft::HostJobCommand::UpgradeStage {
                id,
                member,
                from,
                to,
                detail,
                diff: None,
                now_ms,
            },
            UpStep::Finish => ferry_raft::HostJobCommand::Finish { id, now_ms },
        }
    }
}

/// The leader's steps for `job` now; `preflight` says whether a member may
/// start (quorum, a target for each of its instances), `alive` whether
/// gossip takes a member for alive.
pub fn next(
    job: &HostJob,
    upgrade: &Upgrade,
    s: &ClusterState,
    preflight: &mut dyn FnMut(NodeId) -> Result<(), String>,
    alive: &dyn Fn(NodeId) -> bool,
) -> Vec<UpStep> {
    if job.is_done() {
        return Vec::new();
    }
    let mut steps: Vec<UpStep> = upgrade
        .members
        .iter()
        .filter_map(|m| match (m.stage, alive(m.member)) {
            // A restore placed while gossip still takes the restarted
            // member for dead would leave its instances away (CI saw it).
            (Stage::Verified, false) => None,
            _ => in_progress_step(m.member, m.stage, m.evacuation, m.restore, s),
        })
        .collect();
    let in_progress = upgrade
        .members
        .iter()
        .filter(|m| m.stage.in_progress())
        .count() as u32;
    let stopped = job.abort_requested || upgrade.members.iter().any(|m| m.stage == Stage::Failed);
    if !stopped {
        let room = upgrade.max_unavailable.max(1).saturating_sub(in_progress);
        let waiting = upgrade.members.iter().filter(|m| m.stage == Stage::Waiting);
        for m in waiting.take(room as usize) {
            let (to, detail) = match preflight(m.member) {
                Ok(()) => (Stage::Evacuating, None),
                Err(why) => (Stage::Failed, Some(format!("preflight: {why}"))),
            };
            steps.push(UpStep::Stage {
                member: m.member,
                from: Stage::Waiting,
                to,
                detail,
            });
            if to == Stage::Failed {
                break;
            }
        }
    }
    let all_done = upgrade.members.iter().all(|m| m.stage == Stage::Done);
    if steps.is_empty() && in_progress == 0 && (all_done || stopped) {
        steps.push(UpStep::Finish);
    }
    steps
}

/// The leader's step for a member under way, once its child job ended.
fn in_progress_step(
    member: NodeId,
    stage: Stage,
    evacuation: Option<u64>,
    restore: Option<u64>,
    s: &ClusterState,
) -> Option<UpStep> {
    let step = |from, to, detail: String| {
        Some(UpStep::Stage {
            member,
            from,
            to,
            detail: Some(detail),
        })
    };
    match stage {
        Stage::Evacuating => {
            let child = s.host_jobs.get(&evacuation?)?;
            if !child.is_done() {
                return None;
            }
            let emptied = s
                .members
                .get(&member)
                .is_some_and(|m| m.state == MemberState::Evacuated);
            match emptied {
                true => step(Stage::Evacuating, Stage::Hook, "evacuated".into()),
                false => {
                    let left: Vec<String> = child
                        .items
                        .iter()
                        .filter(|i| {
                            !matches!(
                                i.state,
                                ferry_raft::ItemState::Moved | ferry_raft::ItemState::Stopped
                            )
                        })
                        .map(|i| {
                            format!("{} ({})", i.instance, i.detail.clone().unwrap_or_default())
                        })
                        .collect();
                    let why = format!(
                        "the evacuation left instances running there: {}",
                        left.join(", ")
                    );
                    step(Stage::Evacuating, Stage::Failed, why)
                }
            }
        }
        Stage::Verified => step(Stage::Verified, Stage::Restoring, "restoring".into()),
        Stage::Restoring => {
            let child = s.host_jobs.get(&restore?)?;
            if !child.is_done() {
                return None;
            }
            let back = child
                .items
                .iter()
                .filter(|i| i.state != ferry_raft::ItemState::Stayed)
                .count();
            let stayed: Vec<String> = child
                .items
                .iter()
                .filter(|i| i.state == ferry_raft::ItemState::Stayed)
                .map(|i| format!("{} ({})", i.instance, i.detail.clone().unwrap_or_default()))
                .collect();
            let mut detail = format!("{back} instances back home");
            if !stayed.is_empty() {
                detail.push_str(&format!("; stayed away: {}", stayed.join(", ")));
            }
            step(Stage::Restoring, Stage::Done, detail)
        }
        _ => None,
    }
}

/// What changed on a host across its upgrade, e.g. "kernel: 6.1.0 ->
/// 6.2.0", "syscalls: +openat3", "criu: 4.1.1 -> 4.2.1".
pub fn facts_diff(before: &HostFacts, after: &HostFacts) -> Vec<String> {
    let mut diff = Vec::new();
    let mut changed = |what: &str, a: &str, b: &str| {
        if a != b {
            diff.push(format!("{what}: {a} -> {b}"));
        }
    };
    changed("kernel", &before.kernel, &after.kernel);
    changed("cpu model", &before.cpu_model, &after.cpu_model);
    let none = String::from("none");
    changed(
        "runc",
        before.runtimes.runc.as_ref().unwrap_or(&none),
        after.runtimes.runc.as_ref().unwrap_or(&none),
    );
    changed(
        "criu",
        before.runtimes.criu.as_ref().unwrap_or(&none),
        after.runtimes.criu.as_ref().unwrap_or(&none),
    );
    for (what, a, b) in [
        ("syscalls", &before.syscalls, &after.syscalls),
        ("cpu flags", &before.cpu_flags, &after.cpu_flags),
        ("filesystems", &before.filesystems, &after.filesystems),
    ] {
        let added: Vec<&str> = b
            .iter()
            .filter(|x| !a.contains(x))
            .map(String::as_str)
            .collect();
        let gone: Vec<&str> = a
            .iter()
            .filter(|x| !b.contains(x))
            .map(String::as_str)
            .collect();
        let mut parts: Vec<String> = added.iter().map(|x| format!("+{x}")).collect();
        parts.extend(gone.iter().map(|x| format!("-{x}")));
        if !parts.is_empty() {
            diff.push(format!("{what}: {}", parts.join(" ")));
        }
    }
    diff
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_raft::{Command, CommandResult, HostJobCommand, Member};

    fn cluster() -> (ClusterState, u64) {
        let mut s = ClusterState::default();
        for id in 1..=3 {
            let addr = format!("127.0.0.1:{}", 7000 + id);
            let m = Member::online(id, &format!("n{id}"), &addr, &format!("{id:02x}"), 0);
            s.members.insert(id, m);
        }
        let create = HostJobCommand::CreateUpgrade {
            hook: "true".into(),
            verify: None,
            members: vec![1, 2, 3],
            max_unavailable: 1,
            now_ms: 0,
        };
        let CommandResult::JobCreated { id } = s.apply(&Command::Host(create)) else {
            panic!("no upgrade");
        };
        (s, id)
    }

    fn steps(s: &ClusterState, id: u64, ok: bool) -> Vec<UpStep> {
        steps_alive(s, id, ok, true)
    }

    fn steps_alive(s: &ClusterState, id: u64, ok: bool, alive: bool) -> Vec<UpStep> {
        let job = &s.host_jobs[&id];
        let mut preflight = |_| {
            if ok {
                Ok(())
            } else {
                Err("quorum".to_string())
            }
        };
        next(
            job,
            job.upgrade.as_ref().unwrap(),
            s,
            &mut preflight,
            &|_| alive,
        )
    }

    fn take(s: &mut ClusterState, id: u64, steps: &[UpStep]) {
        for step in steps {
            s.apply(&Command::Host(step.clone().command(id, 1)));
        }
    }

    fn stage(s: &ClusterState, id: u64, member: usize) -> Stage {
        s.host_jobs[&id].upgrade.as_ref().unwrap().members[member].stage
    }

    /// Finish member `m`'s child job `child` as the runner would.
    fn finish_child(s: &mut ClusterState, child: u64) {
        s.apply(&Command::Host(HostJobCommand::Finish {
            id: child,
            now_ms: 3,
        }));
    }

    #[test]
    fn members_go_one_at_a_time_through_every_stage() {
        let (mut s, id) = cluster();
        let first = steps(&s, id, true);
        assert_eq!(first.len(), 1, "one at a time: {first:?}");
        take(&mut s, id, &first);
        assert_eq!(stage(&s, id, 0), Stage::Evacuating);
        assert!(steps(&s, id, true).is_empty(), "the evacuation runs");
        let evacuation = s.host_jobs[&id].upgrade.as_ref().unwrap().members[0]
            .evacuation
            .unwrap();
        finish_child(&mut s, evacuation);
        let got = steps(&s, id, true);
        take(&mut s, id, &got);
        assert_eq!(stage(&s, id, 0), Stage::Hook);
        // The hook is the member's: the leader waits.
        assert!(steps(&s, id, true).is_empty());
        take(
            &mut s,
            id,
            &[UpStep::Stage {
                member: 1,
                from: Stage::Hook,
                to: Stage::Verified,
                detail: None,
            }],
        );
        assert!(
            steps_alive(&s, id, true, false).is_empty(),
            "no restore while gossip takes the member for dead"
        );
        let got = steps(&s, id, true);
        take(&mut s, id, &got);
        assert_eq!(stage(&s, id, 0), Stage::Restoring);
        let restore = s.host_jobs[&id].upgrade.as_ref().unwrap().members[0]
            .restore
            .unwrap();
        finish_child(&mut s, restore);
        let got = steps(&s, id, true);
        take(&mut s, id, &got);
        assert_eq!(stage(&s, id, 0), Stage::Done);
        assert_eq!(
            stage(&s, id, 1),
            Stage::Waiting,
            "the next starts on the next round"
        );
        let got = steps(&s, id, true);
        take(&mut s, id, &got);
        assert_eq!(stage(&s, id, 1), Stage::Evacuating);
    }

    #[test]
    fn a_failure_stops_the_upgrade_and_leaves_the_rest_untouched() {
        let (mut s, id) = cluster();
        let got = steps(&s, id, false);
        take(&mut s, id, &got);
        assert_eq!(stage(&s, id, 0), Stage::Failed);
        let got = steps(&s, id, true);
        assert_eq!(got, vec![UpStep::Finish]);
        take(&mut s, id, &got);
        assert!(s.host_jobs[&id].is_done());
        assert_eq!(stage(&s, id, 1), Stage::Waiting);
        assert_eq!(stage(&s, id, 2), Stage::Waiting);
    }

    #[test]
    fn the_facts_diff_names_what_changed() {
        let before = HostFacts {
            kernel: "6.1.0".into(),
            syscalls: vec!["openat".into(), "old".into()],
            ..Default::default()
        };
        let after = HostFacts {
            kernel: "6.2.0".into(),
            syscalls: vec!["openat".into(), "openat3".into()],
            ..Default::default()
        };
        assert_eq!(
            facts_diff(&before, &after),
            ["kernel: 6.1.0 -> 6.2.0", "syscalls: +openat3 -old"]
        );
        assert!(facts_diff(&before, &before).is_empty());
    }
}
