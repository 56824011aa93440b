//! What each applied entry changed, for `ferry monitor`: the member,
//! instance, job and host-job tables before and after the entry, compared.
//! A refused command changes nothing and so shows nothing; two changes of
//! one job in two entries of one batch are two events. Comparing is cheap:
//! the tables are persistent maps, and an untouched one is the same map.

use imbl::ordmap::DiffItem;
use imbl::OrdMap;
use serde::{Deserialize, Serialize};

use crate::hosts::HostJob;
use crate::ids::{JobId, NodeId};
use crate::instances::{Instance, ObservedState};
use crate::jobs::{Job, MoveStats, Phase};
use crate::model::{ClusterState, Member, MemberState};

/// One change the state machine made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    MemberJoined {
        id: NodeId,
        name: String,
    },
    MemberRemoved {
        id: NodeId,
        name: String,
    },
    /// Its host state (online, evacuating, evacuated) or cordon changed.
    MemberState {
        id: NodeId,
        name: String,
        state: MemberState,
        cordoned: bool,
    },
    InstanceCreated {
        name: String,
        node: NodeId,
    },
    InstanceDeleted {
        name: String,
        node: NodeId,
    },
    /// What its owner reports changed.
    InstanceState {
        name: String,
        node: NodeId,
        from: ObservedState,
        to: ObservedState,
        detail: Option<String>,
    },
    /// Another member owns it now (a move's switch, or a switch back).
    InstanceOwner {
        name: String,
        from: NodeId,
        to: NodeId,
        epoch: u64,
    },
    JobCreated {
        id: JobId,
        instance: String,
        source: NodeId,
        target: NodeId,
    },
    JobPhase {
        id: JobId,
        instance: String,
        from: Phase,
        to: Phase,
        error: Option<String>,
        stats: Option<MoveStats>,
    },
    HostJobCreated {
        id: JobId,
        kind: String,
        member: NodeId,
    },
    HostJobFinished {
        id: JobId,
        kind: String,
        member: NodeId,
    },
}

/// A change and the log entry that made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub index: u64,
    /// When this member applied it (its wall clock, Unix ms).
    pub at_ms: u64,
    pub change: Change,
}

/// The tables events are derived from (copies share their maps).
#[derive(Clone, Debug)]
pub struct Tables {
    members: OrdMap<NodeId, Member>,
    instances: OrdMap<String, Instance>,
    jobs: OrdMap<JobId, Job>,
    host_jobs: OrdMap<JobId, HostJob>,
}

impl Tables {
    pub fn of(state: &ClusterState) -> Tables {
        Tables {
            members: state.members.clone(),
            instances: state.instances.clone(),
            jobs: state.jobs.clone(),
            host_jobs: state.host_jobs.clone(),
        }
    }
}

/// The changes from `before` to `after`, members first, then instances,
/// jobs and host jobs, each in key order.
pub fn changes(before: &Tables, after: &Tables) -> Vec<Change> {
    let mut out = Vec::new();
    for item in before.members.diff(&after.members) {
        out.extend(member_change(item));
    }
    for item in before.instances.diff(&after.instances) {
        out.extend(instance_changes(item));
    }
    for item in before.jobs.diff(&after.jobs) {
        out.extend(job_change(item));
    }
    for item in before.host_jobs.diff(&after.host_jobs) {
        out.extend(host_job_change(item));
    }
    out
}

fn member_change(item: DiffItem<'_, '_, NodeId, Member>) -> Option<Change> {
    match item {
        DiffItem::Add(id, m) => Some(Change::MemberJoined {
            id: *id,
            name: m.name.clone(),
        }),
        DiffItem::Remove(id, m) => Some(Change::MemberRemoved {
            id: *id,
            name: m.name.clone(),
        }),
        DiffItem::Update {
            old: (_, old),
            new: (id, new),
        } => {
            (old.state != new.state || old.cordoned != new.cordoned).then(|| Change::MemberState {
                id: *id,
                name: new.name.clone(),
                state: new.state,
                cordoned: new.cordoned,
            })
        }
    }
}

fn instance_changes(item: DiffItem<'_, '_, String, Instance>) -> Vec<Change> {
    match item {
        DiffItem::Add(name, i) => vec![Change::InstanceCreated {
            name: name.clone(),
            node: i.owner,
        }],
        DiffItem::Remove(name, i) => vec![Change::InstanceDeleted {
            name: name.clone(),
            node: i.owner,
        }],
        DiffItem::Update {
            old: (_, old),
            new: (name, new),
        } => {
            let mut out = Vec::new();
            if old.owner != new.owner {
                out.push(Change::InstanceOwner {
                    name: name.clone(),
                    from: old.owner,
                    to: new.owner,
                    epoch: new.epoch,
                });
            }
            if old.observed != new.observed {
                out.push(Change::InstanceState {
                    name: name.clone(),
                    node: new.owner,
                    from: old.observed,
                    to: new.observed,
                    detail: new.detail.clone(),
                });
            }
            out
        }
    }
}

fn job_change(item: DiffItem<'_, '_, JobId, Job>) -> Option<Change> {
    match item {
        DiffItem::Add(id, j) => Some(Change::JobCreated {
            id: *id,
            instance: j.instance.clone(),
            source: j.source,
            target: j.target,
        }),
        // Old jobs pruned from the history: nothing happened to them.
        DiffItem::Remove(..) => None,
        DiffItem::Update {
            old: (_, old),
            new: (id, new),
        } => (old.phase != new.phase).then(|| Change::JobPhase {
            id: *id,
            instance: new.instance.clone(),
            from: old.phase,
            to: new.phase,
            error: new.error.clone().filter(|e| old.error.as_ref() != Some(e)),
            stats: new.stats.clone().filter(|_| new.phase.is_terminal()),
        }),
    }
}

fn host_job_change(item: DiffItem<'_, '_, JobId, HostJob>) -> Option<Change> {
    match item {
        DiffItem::Add(id, j) => Some(Change::HostJobCreated {
            id: *id,
            kind: j.kind.as_str().to_string(),
            member: j.member,
        }),
        DiffItem::Remove(..) => None,
        DiffItem::Update {
            old: (_, old),
            new: (id, new),
        } => (old.finished_ms.is_none() && new.finished_ms.is_some()).then(|| {
            Change::HostJobFinished {
                id: *id,
                kind: new.kind.as_str().to_string(),
                member: new.member,
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::JobKind;
    use crate::MoveOptions;

    fn job(phase: Phase) -> Job {
        Job {
            id: 7,
            kind: JobKind::Migrate,
            instance: "c1".into(),
            source: 1,
            target: 2,
            phase,
            options: MoveOptions::default(),
            was_running: true,
            report: vec![],
            error: None,
            notes: vec![],
            stats: None,
            created_ms: 0,
            phase_ms: 0,
            abort_requested: false,
            parent: None,
        }
    }

    #[test]
    fn a_phase_change_is_one_event_and_an_untouched_table_none() {
        let mut state = ClusterState::default();
        state.jobs.insert(7, job(Phase::Frozen));
        let before = Tables::of(&state);
        assert_eq!(changes(&before, &Tables::of(&state)), vec![]);
        state.jobs.insert(7, job(Phase::Switched));
        let after = Tables::of(&state);
        assert_eq!(
            changes(&before, &after),
            vec![Change::JobPhase {
                id: 7,
                instance: "c1".into(),
                from: Phase::Frozen,
                to: Phase::Switched,
                error: None,
                stats: None,
            }]
        );
    }

    #[test]
    fn a_pruned_job_is_no_event_and_an_error_is_told_once() {
        let mut state = ClusterState::default();
        let mut failed = job(Phase::RollingBack);
        failed.error = Some("restore failed".into());
        state.jobs.insert(7, failed.clone());
        let before = Tables::of(&state);
        failed.phase = Phase::RolledBack;
        state.jobs.insert(7, failed);
        let changed = changes(&before, &Tables::of(&state));
        assert!(
            matches!(&changed[..], [Change::JobPhase { error: None, .. }]),
            "{changed:?}"
        );
        let before = Tables::of(&state);
        state.jobs.remove(&7);
        assert_eq!(changes(&before, &Tables::of(&state)), vec![]);
    }
}
