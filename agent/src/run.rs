//! The composition root (top layer): the only place that builds the node
//! handle and spawns loops. `run` establishes the identity, opens the
//! store, Raft and the endpoint, then starts gossip, the service, the
//! bootstrap records, membership upkeep, facts, the reconciler and the
//! migration engine, and waits for a stop.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_raft::network::Network;
use ferry_raft::store::StateHandle;
use ferry_raft::{Node, NodeId, Raft};
use ferry_transport::endpoint::Endpoint;
use ferry_transport::pki::{self, Identity};
use ferry_transport::rpc::Pool;

use crate::container::host::Host;
use crate::datadir::{ApiInfo, DataDir, DataDirError, NodeConfig};
use crate::driver::Driver;
use crate::gossip::handle::Gossip;
use crate::gossip::GossipConfig;
use crate::identity::{self, IdentityError, IdentityOptions};
use crate::kinds::Kinds;
use crate::node::{Agent, Keyring, Parts, RaftClient, Tuning};

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub data_dir: PathBuf,
    pub listen: Option<SocketAddr>,
    pub name: Option<String>,
    pub bootstrap: bool,
    pub join: Option<String>,
    pub voters: u8,
    /// The cluster network's range, set at bootstrap.
    pub cluster_subnet: Option<ferry_raft::subnet::Subnet>,
    /// Finished moves the cluster keeps, set at bootstrap.
    pub job_history: u32,
    /// Take a Raft snapshot every this many applied entries.
    pub snapshot_every: u64,
    pub gossip: GossipConfig,
    /// A voter dead (by gossip) this long is replaced by a live learner.
    pub heal_after: Duration,
    /// The leader rolls back (or switches back) a migration job whose phase
    /// has not moved for this long.
    pub job_phase_timeout: Duration,
    /// What each container's console.log keeps at most (as much again in
    /// console.log.1).
    pub console_log_max_bytes: u64,
    /// Every runc and CRIU call ends within this, or is killed.
    pub runtime_timeout: Duration,
    /// Bytes of the data dir's filesystem instance data may not use.
    pub disk_reserve_bytes: u64,
    /// On SIGTERM or Ctrl-C, evacuate this member first, for at most
    /// `stop_timeout`.
    pub evacuate_on_stop: bool,
    pub stop_timeout: Duration,
    /// Serve Prometheus metrics here (`exporter.rs`).
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("{0}")]
    Usage(String),
    #[error("certificates: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("cannot serve on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error("raft storage: {0}")]
    Store(#[from] ferry_raft::store::StoreError),
    #[error("raft: {0}")]
    Raft(String),
    #[error(
        "this member was removed from the cluster; to rejoin, wipe {0} and join with a new token"
    )]
    Removed(String),
    #[error("the raft store failed ({reason}), so this agent stopped serving; free space (or fix the disk) under {dir} and start it again: it catches up from the others")]
    StoreFailed { reason: String, dir: String },
}

fn raft_error(e: impl std::fmt::Display) -> AgentError {
    AgentError::Raft(e.to_string())
}

/// Start the agent and serve until it is told to stop (signal, or this
/// member was removed).
pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
    let dir = DataDir::new(&opts.data_dir);
    let identity_opts = IdentityOptions {
        name: opts.name.clone(),
        listen: opts.listen,
        bootstrap: opts.bootstrap,
        join: opts.join.clone(),
        voters: opts.voters,
    };
    let (config, seeds) = identity::establish(&dir, &identity_opts).await?;
    let containers = Host::new(
        dir.root(),
        &config.name,
        opts.console_log_max_bytes,
        opts.runtime_timeout,
    );
    let accel = crate::vm::probe::host_accel();
    let vms = crate::vm::host::VmHost::new(dir.root(), accel, opts.runtime_timeout);
    let data_dir = dir.root().to_path_buf();
    let driver = move |state: &StateHandle| -> Arc<dyn Driver> {
        let state = state.clone();
        let kind_of = move |name: &crate::api::names::InstanceName| {
            state.read(|s| s.instances.get(name.as_str()).map(|i| i.kind))
        };
        let kinds = Kinds::new(
            Box::new(containers),
            Box::new(vms),
            &data_dir,
            Box::new(kind_of),
        );
        Arc::new(kinds)
    };
    let agent = start(dir, config, seeds, &opts, driver).await?;
    let evacuate = opts.evacuate_on_stop.then_some(opts.stop_timeout);
    wait_for_shutdown(agent, evacuate).await
}

async fn open_raft(
    dir: &DataDir,
    config: &NodeConfig,
    opts: &AgentOptions,
    pool: &Pool,
) -> Result<(Raft, StateHandle), AgentError> {
    let db = dir.raft_db();
    let (log_store, sm_store) = tokio::task::spawn_blocking(move || ferry_raft::store::open(&db))
        .await
        .map_err(raft_error)??;
    let state = sm_store.state();
    let raft_config = ferry_raft::raft_config(opts.snapshot_every).map_err(raft_error)?;
    let network = Network::new(RaftClient {
        pool: pool.clone(),
        state: state.clone(),
    });
    let raft = Raft::new(config.id, raft_config, network, log_store, sm_store)
        .await
        .map_err(raft_error)?;
    Ok((raft, state))
}

pub(crate) async fn start(
    dir: DataDir,
    config: NodeConfig,
    seeds: Vec<(NodeId, String)>,
    opts: &AgentOptions,
    driver: impl FnOnce(&StateHandle) -> Arc<dyn Driver>,
) -> Result<Arc<Agent>, AgentError> {
    let addr: SocketAddr = config
        .addr
        .parse()
        .map_err(|_| AgentError::Usage(format!("bad address in node.json: {}", config.addr)))?;
    let creds = dir.load_credentials("node")?;
    let (ca_pem, ca_key) = dir.load_ca()?;
    let keyring = Keyring::new(&ca_pem, ca_key.as_deref())?;
    ensure_admin_credentials(&dir, &keyring)?;
    let endpoint = Endpoint::bind(addr, &creds).map_err(|e| AgentError::Bind {
        addr,
        reason: e.to_string(),
    })?;
    let metrics = match opts.metrics {
        Some(addr) => Some(
            crate::exporter::bind(addr)
                .await
                .map_err(|e| AgentError::Bind {
                    addr,
                    reason: format!("metrics: {e}"),
                })?,
        ),
        None => None,
    };
    let pool = Pool::new(endpoint.clone());
    let (raft, state) = open_raft(&dir, &config, opts, &pool).await?;
    if state.read(|s| s.next_node_id > config.id && !s.members.contains_key(&config.id)) {
        return Err(AgentError::Removed(dir.root().display().to_string()));
    }
    let driver = driver(&state);
    let (gossip, gossip_inbox) = Gossip::new(config.id, opts.gossip.clone());
    let agent = Agent::new(Parts {
        id: config.id,
        name: config.name.clone(),
        addr,
        data_dir: dir.clone(),
        raft: raft.clone(),
        state,
        pool,
        keyring,
        seeds,
        driver,
        gossip,
        tuning: Tuning {
            voters: config.voters,
            cluster_subnet: opts.cluster_subnet,
            job_history: opts.job_history,
            heal_after: opts.heal_after,
            job_phase_timeout: opts.job_phase_timeout,
            disk_reserve_bytes: opts.disk_reserve_bytes,
        },
    });
    tokio::spawn(crate::gossip::run(agent.clone(), gossip_inbox));
    if let Some(listener) = metrics {
        tokio::spawn(crate::exporter::serve(agent.clone(), listener));
    }
    tokio::spawn(ferry_transport::rpc::serve(
        endpoint,
        Arc::new(crate::service::AgentService::new(agent.clone())),
    ));
    if config.bootstrap {
        initialize(&raft, &config).await?;
        tokio::spawn(identity::ensure_bootstrap_records(
            agent.clone(),
            config.cert_serial.clone(),
        ));
    }
    tokio::spawn(crate::membership::publish_facts(agent.clone()));
    tokio::spawn(identity::record_admin_cert(agent.clone()));
    #[cfg(feature = "test-hooks")]
    tokio::spawn(fill_on_request(agent.clone()));
    tokio::spawn(acting_loops(agent.clone()));

    dir.save_api_info(&ApiInfo {
        address: addr.to_string(),
        name: config.name.clone(),
    })?;
    println!(
        "ferry agent {} (id {}) ready on {addr}, data dir {}",
        config.name,
        config.id,
        dir.root().display()
    );
    Ok(agent)
}

/// What acts on the state (runs, deletes, moves, leads) starts once the
/// state has caught up with the cluster (`Agent::catch_up`).
async fn acting_loops(agent: Arc<Agent>) {
    agent.catch_up().await;
    tokio::spawn(crate::membership::leader_loop(agent.clone()));
    tokio::spawn(identity::keep_ca_key(agent.clone()));
    tokio::spawn(crate::instances::reconciler::run(agent.clone()));
    tokio::spawn(crate::migration::run(agent.clone()));
    tokio::spawn(crate::hosts::runner::run(agent.clone()));
    tokio::spawn(crate::network::upkeep(agent));
}

/// A test build fills the state for a benchmark that writes the file
/// `fill` ("INSTANCES JOBS") into the data dir, then writes `filled`.
#[cfg(feature = "test-hooks")]
async fn fill_on_request(agent: Arc<Agent>) {
    let request = agent.data_dir().root().join("fill");
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(text) = std::fs::read_to_string(&request) else {
            continue;
        };
        let mut numbers = text.split_whitespace().map(|n| n.parse::<u32>());
        let (Some(Ok(instances)), Some(Ok(jobs))) = (numbers.next(), numbers.next()) else {
            continue;
        };
        let _ = std::fs::remove_file(&request);
        let result = agent
            .write(ferry_raft::Command::TestFill { instances, jobs })
            .await;
        tracing::warn!(instances, jobs, ?result, "test build: state filled");
        let _ = std::fs::write(request.with_file_name("filled"), format!("{result:?}"));
    }
}

/// The CLI's certificate on this host: a joiner got it with its join; a
/// member holding the CA key makes a missing one.
fn ensure_admin_credentials(dir: &DataDir, keyring: &Keyring) -> Result<(), AgentError> {
    if dir.root().join("tls/admin.pem").exists() {
        return Ok(());
    }
    match keyring.signer() {
        Some(ca) => {
            let admin = ca.issue(&Identity::Admin, &pki::new_serial())?;
            dir.save_credentials("admin", &admin)?;
        }
        None => tracing::warn!(
            "no admin certificate in {}/tls and this member holds no CA key (only voters do): the CLI cannot reach this agent; rejoin with a new token to get one",
            dir.root().display()
        ),
    }
    Ok(())
}

/// The bootstrap node makes itself the first voter, once.
async fn initialize(raft: &Raft, config: &NodeConfig) -> Result<(), AgentError> {
    if raft.is_initialized().await.map_err(raft_error)? {
        return Ok(());
    }
    let node = Node {
        name: config.name.clone(),
        addr: config.addr.clone(),
    };
    raft.initialize(BTreeMap::from([(config.id, node)]))
        .await
        .map_err(raft_error)
}

/// A stop asked by a signal: evacuate first when the agent was told to.
async fn stop_asked(agent: &Agent, evacuate_on_stop: Option<Duration>) -> Option<String> {
    if let Some(timeout) = evacuate_on_stop {
        let outcome = crate::hosts::stop::evacuate_on_stop(agent, timeout).await;
        tracing::info!("{outcome}");
    }
    None
}

async fn wait_for_shutdown(
    agent: Arc<Agent>,
    evacuate_on_stop: Option<Duration>,
) -> Result<(), AgentError> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| AgentError::Raft(format!("cannot watch SIGTERM: {e}")))?;
    let mut metrics = agent.raft().metrics();
    let reason = tokio::select! {
        _ = tokio::signal::ctrl_c() => stop_asked(&agent, evacuate_on_stop).await,
        _ = sigterm.recv() => stop_asked(&agent, evacuate_on_stop).await,
        reason = agent.stopped() => reason,
        failed = metrics.wait_for(|m| m.running_state.is_err()) => {
            // Raft stopped for good (a storage error: ENOSPC, EIO): an
            // agent without it must not live on looking healthy.
            let reason = match failed.as_deref().map(|m| &m.running_state) {
                Ok(Err(fatal)) => fatal.to_string(),
                _ => "raft stopped".to_string(),
            };
            tracing::error!("raft failed: {reason}; stopping");
            agent.pool().endpoint().close();
            return Err(AgentError::StoreFailed {
                reason,
                dir: agent.data_dir().root().display().to_string(),
            });
        }
    };
    tracing::info!("shutting down");
    let _ = agent.raft().shutdown().await;
    agent.pool().endpoint().close();
    match reason {
        Some(why) => {
            identity::forget_ca_key(&agent, "this member was removed");
            Err(AgentError::Removed(why))
        }
        None => Ok(()),
    }
}
