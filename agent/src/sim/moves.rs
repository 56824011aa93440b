//! Whole moves through the real engines of two in-process members, with
//! a failure injected at each step through the fake driver. Every case
//! runs at once in one cluster; the world checks on every change that no
//! instance ever runs twice.

use std::sync::Arc;

use ferry_raft::{Phase, TransferMode};

use super::cluster::{wait_for, Sim};
use super::fake_driver::Copy;
use crate::api::names::InstanceName;

/// One move and what it must end as.
struct Case {
    instance: &'static str,
    mode: TransferMode,
    stateful: Option<bool>,
    /// (host, operation, times) failures to inject.
    failures: &'static [(&'static str, &'static str, u32)],
    phase: Phase,
    /// Where the one copy is at the end, and in which state.
    survivor: (&'static str, Copy),
    /// Part of the job's error text.
    error: Option<&'static str>,
}

const PULL: TransferMode = TransferMode::Pull;
const PUSH: TransferMode = TransferMode::Push;

const CASES: &[Case] = &[
    Case {
        instance: "ok-pull",
        mode: PULL,
        stateful: None,
        failures: &[],
        phase: Phase::Done,
        survivor: ("n2", Copy::Running),
        error: None,
    },
    Case {
        instance: "ok-push",
        mode: PUSH,
        stateful: None,
        failures: &[],
        phase: Phase::Done,
        survivor: ("n2", Copy::Running),
        error: None,
    },
    Case {
        instance: "stateless",
        mode: PULL,
        stateful: Some(false),
        failures: &[],
        phase: Phase::Done,
        survivor: ("n2", Copy::Running),
        error: None,
    },
    Case {
        instance: "freeze-fails",
        mode: PULL,
        stateful: None,
        failures: &[("n1", "freeze", 9)],
        phase: Phase::RolledBack,
        survivor: ("n1", Copy::Running),
        error: Some("injected freeze failure"),
    },
    Case {
        instance: "push-freeze-fails",
        mode: PUSH,
        stateful: None,
        failures: &[("n1", "freeze", 9)],
        phase: Phase::RolledBack,
        survivor: ("n1", Copy::Running),
        error: Some("injected freeze failure"),
    },
    Case {
        instance: "dump-fails",
        mode: PULL,
        stateful: None,
        failures: &[("n1", "dump_frozen", 9)],
        phase: Phase::RolledBack,
        survivor: ("n1", Copy::Running),
        error: Some("injected dump_frozen failure"),
    },
    Case {
        instance: "receive-fails",
        mode: PULL,
        stateful: None,
        failures: &[("n2", "configure", 9)],
        phase: Phase::RolledBack,
        survivor: ("n1", Copy::Running),
        error: Some("injected configure failure"),
    },
    Case {
        instance: "push-receive-fails",
        mode: PUSH,
        stateful: None,
        failures: &[("n2", "configure", 9)],
        phase: Phase::RolledBack,
        survivor: ("n1", Copy::Running),
        error: Some("injected configure failure"),
    },
    Case {
        instance: "restore-fails",
        mode: PULL,
        stateful: None,
        failures: &[("n2", "restore_held", 9)],
        phase: Phase::RolledBack,
        survivor: ("n1", Copy::Running),
        error: Some("restore on the target failed"),
    },
    Case {
        instance: "thaw-fails-once",
        mode: PULL,
        stateful: None,
        failures: &[("n2", "release_held", 1)],
        phase: Phase::Done,
        survivor: ("n2", Copy::Running),
        error: None,
    },
    Case {
        instance: "done-lost-after-thaw",
        mode: PULL,
        stateful: None,
        failures: &[("n2", "released", 1)],
        phase: Phase::Done,
        survivor: ("n2", Copy::Running),
        error: None,
    },
    Case {
        instance: "source-cannot-thaw",
        mode: PULL,
        stateful: None,
        failures: &[("n2", "restore_held", 9), ("n1", "thaw", 9)],
        phase: Phase::RolledBack,
        // Restored from its final dump (DESIGN rule 4).
        survivor: ("n1", Copy::Running),
        error: Some("restored from its final dump"),
    },
    Case {
        instance: "stateless-start-fails",
        mode: PULL,
        stateful: Some(false),
        failures: &[("n1", "stop", 9)],
        phase: Phase::RolledBack,
        survivor: ("n1", Copy::Running),
        error: Some("injected stop failure"),
    },
];

async fn run_case(sim: Arc<Sim>, case: &'static Case) {
    let name = case.instance;
    sim.launch(name, "n1").await;
    for (host, op, times) in case.failures {
        sim.world.fail(host, op, name, *times);
    }
    let id = sim.start_move(name, "n2", case.mode, case.stateful).await;
    let job = sim.ended(id).await;
    assert_eq!(job.phase, case.phase, "{name}: {job:?}");
    match case.error {
        Some(part) => {
            let error = job.error.clone().unwrap_or_default();
            assert!(
                error.contains(part),
                "{name}: error {error:?} lacks {part:?}"
            );
        }
        None => assert_eq!(job.error, None, "{name}"),
    }
    let (host, state) = case.survivor;
    let other = if host == "n1" { "n2" } else { "n1" };
    let world = sim.world.clone();
    wait_for(20, &format!("{name}: one copy, on {host}"), || {
        world.copy(host, name) == Some(state) && world.copy(other, name).is_none()
    })
    .await;
    let owner = sim.agent(host).id();
    let owned = sim.agents[0]
        .state()
        .read(|s| s.instances.get(name).map(|i| (i.owner, i.job)));
    assert_eq!(owned, Some((owner, None)), "{name}: owner and job");
    let other_agent = sim.agent(other).clone();
    wait_for(20, &format!("{name}: nothing left on {other}"), || {
        !other_agent
            .driver()
            .has_files(&InstanceName::parse(name).expect("name"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_move_ends_with_exactly_one_copy_whatever_step_fails() {
    let started = std::time::Instant::now();
    let sim = Arc::new(Sim::start(2).await);
    let mut cases = tokio::task::JoinSet::new();
    for case in CASES {
        cases.spawn(run_case(sim.clone(), case));
    }
    while let Some(done) = cases.join_next().await {
        if let Err(e) = done {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    assert_eq!(sim.world.violations(), Vec::<String>::new());
    eprintln!("{} moves in {:?}", CASES.len(), started.elapsed());
}
