//! A test build's bulk fill of the state (cargo feature `test-hooks`), for
//! the benchmark of commit latency with a large state: instances owned by
//! no member (so no agent acts on them) and finished moves of them.

use crate::instances::{DesiredState, Instance, ObservedState};
use crate::jobs::{Job, JobKind, MoveOptions, MoveStats, Phase};
use crate::model::{ClusterState, CommandResult};

/// The owner of filled instances: never a member's id.
pub const NO_OWNER: u64 = u64::MAX;

impl ClusterState {
    pub(crate) fn test_fill(&mut self, instances: u32, jobs: u32) -> CommandResult {
        for i in 0..instances {
            let name = format!("fill-{i}");
            let instance = Instance {
                name: name.clone(),
                owner: NO_OWNER,
                desired: DesiredState::Stopped,
                observed: ObservedState::Stopped,
                ..Instance::default()
            };
            self.instances.insert(name, instance);
        }
        for j in 0..jobs {
            let id = self.next_job_id;
            self.next_job_id += 1;
            let job = Job {
                id,
                kind: JobKind::Migrate,
                instance: format!("fill-{}", j % instances.max(1)),
                source: NO_OWNER,
                target: NO_OWNER,
                phase: Phase::Done,
                options: MoveOptions::default(),
                was_running: false,
                report: Vec::new(),
                error: None,
                notes: vec!["filled by a test build".into()],
                stats: Some(MoveStats::default()),
                created_ms: 0,
                phase_ms: 0,
                abort_requested: false,
                parent: None,
            };
            self.jobs.insert(id, job);
        }
        CommandResult::Done
    }
}
