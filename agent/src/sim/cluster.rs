//! An in-process cluster: real node handles (Raft on redb, the QUIC
//! endpoint on 127.0.0.1, gossip, the service, every loop that `run`
//! starts) whose host driver is a [`FakeDriver`] in one shared [`World`].
//! Bootstrap and join go the production way; no root, no runc.

use std::sync::Arc;
use std::time::Duration;

use ferry_raft::{Job, JobId, ObservedState, TransferMode};

use super::fake_driver::{FakeDriver, World};
use crate::api::instances::LaunchRequest;
use crate::api::jobs::{MoveMode, MoveRequest};
use crate::api::names::InstanceName;
use crate::api::ApiReply;
use crate::datadir::DataDir;
use crate::identity::{self, IdentityOptions};
use crate::node::Agent;
use crate::run::{self, AgentOptions};

pub struct Sim {
    pub world: World,
    pub agents: Vec<Arc<Agent>>,
    dir: tempfile::TempDir,
}

fn options(dir: &std::path::Path) -> AgentOptions {
    AgentOptions {
        data_dir: dir.to_path_buf(),
        listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        name: None,
        bootstrap: false,
        join: None,
        voters: 3,
        cluster_subnet: None,
        job_history: 0,
        snapshot_every: ferry_raft::DEFAULT_SNAPSHOT_EVERY,
        gossip: Default::default(),
        heal_after: Duration::from_secs(600),
        job_phase_timeout: Duration::from_secs(30),
        console_log_max_bytes: 8 << 20,
        runtime_timeout: Duration::from_secs(300),
        disk_reserve_bytes: 0,
        evacuate_on_stop: false,
        stop_timeout: Duration::from_secs(1),
        metrics: None,
    }
}

/// Wait for `cond`, polling; panics with `what` after `secs`.
pub async fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Sim {
    /// `n` members, `n1` bootstrapped, the others joined by token; three
    /// voters.
    pub async fn start(n: usize) -> Sim {
        Sim::start_with(n, 3).await
    }

    /// `n` members of a cluster that keeps `voters` voters.
    pub async fn start_with(n: usize, voters: u8) -> Sim {
        let mut sim = Sim {
            world: World::default(),
            agents: Vec::new(),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        for i in 1..=n {
            let name = format!("n{i}");
            let token = match i {
                1 => None,
                _ => Some(sim.token(&name).await),
            };
            sim.add(&name, token, voters).await;
        }
        sim.settled().await;
        sim
    }

    /// Wait until every member knows every member and its facts.
    pub async fn settled(&self) {
        let n = self.agents.len();
        for agent in &self.agents {
            wait_for(30, "every member with its facts, everywhere", || {
                agent
                    .state()
                    .read(|s| s.members.len() == n && s.members.values().all(|m| m.facts.is_some()))
            })
            .await;
        }
    }

    /// A join token for `name`, created on the first member.
    pub async fn token(&self, name: &str) -> String {
        match crate::membership::handlers::create_token(&self.agents[0], name.into(), 600).await {
            Ok(ApiReply::Token { token }) => token,
            other => panic!("token for {name}: {other:?}"),
        }
    }

    /// Start member `name`: it bootstraps without a token, joins with one.
    pub async fn add(&mut self, name: &str, join: Option<String>, voters: u8) -> Arc<Agent> {
        let data = self.dir.path().join(name);
        let mut opts = options(&data);
        opts.name = Some(name.to_string());
        opts.bootstrap = join.is_none();
        opts.join = join;
        opts.voters = voters;
        let id_opts = IdentityOptions {
            name: opts.name.clone(),
            listen: opts.listen,
            bootstrap: opts.bootstrap,
            join: opts.join.clone(),
            voters: opts.voters,
        };
        let data_dir = DataDir::new(&data);
        let (config, seeds) = identity::establish(&data_dir, &id_opts)
            .await
            .expect("identity");
        let driver = Arc::new(FakeDriver::new(name, &data.join("fake-host"), &self.world));
        let agent = run::start(data_dir, config, seeds, &opts, |_: &_| driver as _)
            .await
            .expect("agent");
        self.agents.push(agent.clone());
        agent
    }

    pub fn agent(&self, name: &str) -> &Arc<Agent> {
        self.agents
            .iter()
            .find(|a| a.name() == name)
            .expect("agent by name")
    }

    /// Launch `name` on `target` with a small rootfs; returns once it runs.
    pub async fn launch(&self, name: &str, target: &str) {
        let rootfs = self.dir.path().join(format!("rootfs-{name}"));
        std::fs::create_dir_all(rootfs.join("etc")).expect("rootfs");
        std::fs::write(rootfs.join("etc/hostname"), name).expect("rootfs file");
        std::fs::write(rootfs.join("data"), vec![7u8; 300_000]).expect("rootfs file");
        let request = LaunchRequest {
            name: InstanceName::parse(name).expect("instance name"),
            rootfs: rootfs.display().to_string(),
            target: Some(target.into()),
            memory_bytes: None,
            command: vec!["sleep".into(), "1000".into()],
            unconfined: false,
            restart: Default::default(),
            evacuate: Default::default(),
            network: None,
            ip: None,
            vm: None,
            image: None,
        };
        crate::instances::launch::launch(&self.agents[0], request)
            .await
            .expect("launch");
        let agent = self.agents[0].clone();
        wait_for(20, "the launched instance running", || {
            agent.state().read(|s| {
                s.instances
                    .get(name)
                    .is_some_and(|i| i.observed == ObservedState::Running && i.baseline.is_some())
            })
        })
        .await;
    }

    /// Start a move of `name` to `target`; the job's id.
    pub async fn start_move(
        &self,
        name: &str,
        target: &str,
        mode: TransferMode,
        stateful: Option<bool>,
    ) -> JobId {
        let request = MoveRequest {
            instance: name.into(),
            target: Some(target.into()),
            stateful,
            mode: match mode {
                TransferMode::Push => MoveMode::Push,
                TransferMode::Pull => MoveMode::Pull,
                TransferMode::Relay { .. } => MoveMode::Relay,
            },
            live: Default::default(),
            dry_run: false,
        };
        match crate::migration::jobs::start_move(&self.agents[0], request).await {
            Ok(ApiReply::Job(view)) => view.id,
            other => panic!("move of {name}: {other:?}"),
        }
    }

    /// The job once it ended, as every member sees it.
    pub async fn ended(&self, id: JobId) -> Job {
        for agent in &self.agents {
            wait_for(30, "the job to end", || {
                agent
                    .state()
                    .read(|s| s.jobs.get(&id).is_some_and(|j| j.phase.is_terminal()))
            })
            .await;
        }
        self.agents[0]
            .state()
            .read(|s| s.jobs.get(&id).cloned())
            .expect("job")
    }
}
