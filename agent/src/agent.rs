//! The running agent: identity from the data dir (or a bootstrap / join),
//! the QUIC endpoint, Raft, and the background loops around them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_raft::network::{Network, RaftReply, RaftRequest, RaftRpcClient, RaftRpcFailure};
use ferry_raft::store::StateHandle;
use ferry_raft::{ClusterConfig, Command, CommandResult, Node, NodeId, Raft};
use ferry_transport::endpoint::{Endpoint, Expect};
use ferry_transport::pki::{self, ClusterCa, Credentials, Identity};
use ferry_transport::rpc::Pool;
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::watch;

use crate::datadir::{ApiInfo, DataDir, DataDirError, NodeConfig};
use crate::membership::{self, MembershipChange, MembershipView};
use crate::protocol::{ApiError, ApiRequest, ErrorKind, JoinRequest, Request, Response};
use crate::token::{JoinToken, TokenError};

/// How long a write may wait for a leader before giving up.
const WRITE_DEADLINE: Duration = Duration::from_secs(15);
pub(crate) const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// openraft's RPC deadline follows the heartbeat (150 ms), shorter than a
/// first TLS handshake on a busy host; the spawned call gets at least this.
const RAFT_RPC_MIN_TIMEOUT: Duration = Duration::from_secs(1);
/// A learner this close to the leader's last log index may vote.
const CAUGHT_UP_LAG: u64 = 20;

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub data_dir: std::path::PathBuf,
    pub listen: Option<SocketAddr>,
    pub name: Option<String>,
    pub bootstrap: bool,
    pub join: Option<String>,
    pub voters: u8,
    /// Take a Raft snapshot every this many applied entries.
    pub snapshot_every: u64,
    pub gossip: crate::gossip::GossipConfig,
    /// A voter dead (by gossip) this long is replaced by a live learner.
    pub heal_after: Duration,
    /// The leader rolls back (or switches back) a migration job whose phase
    /// has not moved for this long.
    pub job_phase_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("join failed: {0}")]
    Join(String),
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
}

/// The state shared by every task of a running agent.
pub struct Agent {
    pub id: NodeId,
    pub name: String,
    pub addr: SocketAddr,
    pub data_dir: DataDir,
    pub raft: Raft,
    pub state: StateHandle,
    pub pool: Pool,
    pub ca: ClusterCa,
    pub bootstrap: bool,
    pub voters: u8,
    /// Names of members known from the join answer, for checking Raft
    /// senders before our own log has caught up.
    pub seed_names: Mutex<BTreeMap<NodeId, String>>,
    pub host: crate::container::reconcile::Host,
    pub gossip: crate::gossip::Gossip,
    pub heal_after: Duration,
    pub job_phase_timeout: Duration,
    /// Live figures of the transfers this agent receives.
    pub transfers: crate::migration::engine::Transfers,
    shutdown: watch::Sender<Option<String>>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn parse_addr(text: &str) -> Result<SocketAddr, ApiError> {
    text.parse().map_err(|_| {
        ApiError::new(
            ErrorKind::BadRequest,
            format!("'{text}' is not an IP:port address"),
        )
    })
}

/// Carries Raft RPCs over the agent's connection pool.
#[derive(Clone)]
struct RaftClient {
    pool: Pool,
}

impl RaftRpcClient for RaftClient {
    async fn send(
        &self,
        _target: NodeId,
        node: &Node,
        request: RaftRequest,
        timeout: Duration,
    ) -> Result<RaftReply, RaftRpcFailure> {
        let addr: SocketAddr = node
            .addr
            .parse()
            .map_err(|_| RaftRpcFailure::Failed(format!("bad address {}", node.addr)))?;
        let expect = Expect::Node(node.name.clone());
        let pool = self.pool.clone();
        // openraft drops this future after its heartbeat interval; in a task
        // of its own the call (and a first TLS handshake) runs to the end,
        // so the connection is there for the next heartbeat.
        let call = tokio::spawn(async move {
            pool.call::<Request, Response>(
                addr,
                &expect,
                &Request::Raft(request),
                timeout.max(RAFT_RPC_MIN_TIMEOUT),
            )
            .await
        });
        let result = call
            .await
            .map_err(|e| RaftRpcFailure::Failed(format!("rpc task failed: {e}")))?;
        match result {
            Ok(Response::Raft(reply)) => Ok(reply),
            Ok(Response::Error(e)) => Err(RaftRpcFailure::Failed(e.message)),
            Ok(_) => Err(RaftRpcFailure::Failed("unexpected reply".into())),
            Err(e) => Err(RaftRpcFailure::Unreachable(e.to_string())),
        }
    }
}

/// Pick a port now when asked for port 0, because a joiner must tell the
/// cluster its address before it can serve with the certificate it gets.
fn concrete_addr(listen: SocketAddr) -> Result<SocketAddr, AgentError> {
    if listen.port() != 0 {
        return Ok(listen);
    }
    let socket = std::net::UdpSocket::bind(listen).map_err(|e| AgentError::Bind {
        addr: listen,
        reason: e.to_string(),
    })?;
    socket.local_addr().map_err(|e| AgentError::Bind {
        addr: listen,
        reason: e.to_string(),
    })
}

fn client_bind_for(addr: SocketAddr) -> SocketAddr {
    if addr.is_ipv6() {
        "[::]:0".parse().unwrap_or(addr)
    } else {
        SocketAddr::from(([0, 0, 0, 0], 0))
    }
}

async fn bootstrap_identity(dir: &DataDir, opts: &AgentOptions) -> Result<NodeConfig, AgentError> {
    let name = opts
        .name
        .clone()
        .ok_or_else(|| AgentError::Usage("--bootstrap needs --name NAME".into()))?;
    pki::validate_node_name(&name).map_err(|e| AgentError::Usage(e.to_string()))?;
    let listen = opts
        .listen
        .ok_or_else(|| AgentError::Usage("--bootstrap needs --listen ADDR".into()))?;
    let addr = concrete_addr(listen)?;
    let ca = ClusterCa::generate()?;
    let cert_serial = pki::new_serial();
    let node = ca.issue(&Identity::Node(name.clone()), &cert_serial)?;
    dir.create()?;
    dir.save_ca(&ca)?;
    dir.save_credentials("node", &node)?;
    let config = NodeConfig {
        id: ferry_raft::state::BOOTSTRAP_NODE_ID,
        name,
        addr: addr.to_string(),
        bootstrap: true,
        voters: opts.voters,
        cert_serial,
    };
    dir.save_node_config(&config)?;
    Ok(config)
}

async fn join_identity(
    dir: &DataDir,
    opts: &AgentOptions,
    token_text: &str,
) -> Result<(NodeConfig, Vec<(NodeId, String)>), AgentError> {
    let token = JoinToken::decode(token_text)?;
    let name = opts.name.clone().unwrap_or_else(|| token.name.clone());
    if name != token.name {
        return Err(AgentError::Usage(format!(
            "this join token is for member '{}', not '{name}'; start with --name {}",
            token.name, token.name
        )));
    }
    pki::validate_node_name(&name).map_err(|e| AgentError::Usage(e.to_string()))?;
    let listen = opts
        .listen
        .ok_or_else(|| AgentError::Usage("--join needs --listen ADDR".into()))?;
    let addr = concrete_addr(listen)?;
    let (csr_pem, key_pem) = pki::generate_csr(&Identity::Node(name.clone()))?;
    let request = Request::Join(JoinRequest {
        name: name.clone(),
        secret: token.secret.clone(),
        addr: addr.to_string(),
        csr_pem,
    });
    let endpoint = Endpoint::client(client_bind_for(addr), None)
        .map_err(|e| AgentError::Join(e.to_string()))?;
    let pool = Pool::new(endpoint);
    let expect = Expect::CaFingerprint(token.ca_fingerprint.clone());
    let mut last_error = String::from("the token names no member address");
    for member in &token.addrs {
        let Ok(member_addr) = member.parse::<SocketAddr>() else {
            last_error = format!("bad member address '{member}' in token");
            continue;
        };
        match pool
            .call::<Request, Response>(member_addr, &expect, &request, WRITE_DEADLINE)
            .await
        {
            Ok(Response::Joined(accepted)) => {
                let ca = ClusterCa::from_pem(&accepted.ca_pem, &accepted.ca_key_pem)?;
                if ca.fingerprint() != token.ca_fingerprint {
                    return Err(AgentError::Join(
                        "the cluster sent a CA that does not match the token".into(),
                    ));
                }
                dir.create()?;
                dir.save_ca(&ca)?;
                dir.save_credentials(
                    "node",
                    &Credentials {
                        cert_pem: accepted.cert_pem,
                        key_pem,
                        ca_pem: accepted.ca_pem,
                    },
                )?;
                let config = NodeConfig {
                    id: accepted.id,
                    name,
                    addr: addr.to_string(),
                    bootstrap: false,
                    voters: opts.voters,
                    cert_serial: accepted.cert_serial,
                };
                dir.save_node_config(&config)?;
                pool.endpoint().close();
                return Ok((config, accepted.members));
            }
            Ok(Response::Error(e)) => return Err(AgentError::Join(e.message)),
            Ok(_) => last_error = format!("{member} answered with an unexpected reply"),
            Err(e) => last_error = format!("{member}: {e}"),
        }
    }
    Err(AgentError::Join(last_error))
}

impl Agent {
    /// Start the agent and serve until it is told to stop (signal, or this
    /// member was removed).
    pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
        let dir = DataDir::new(&opts.data_dir);
        let mut seeds = Vec::new();
        let config = match dir.node_config()? {
            Some(config) => {
                if opts.join.is_some() {
                    tracing::warn!("data dir already holds a member; ignoring --join");
                }
                config
            }
            None if opts.bootstrap => bootstrap_identity(&dir, &opts).await?,
            None => match &opts.join {
                Some(token) => {
                    let (config, members) = join_identity(&dir, &opts, token).await?;
                    seeds = members;
                    config
                }
                None => {
                    return Err(AgentError::Usage(format!(
                        "{} holds no cluster member; start with --bootstrap to create a cluster or --join TOKEN to join one",
                        dir.root().display()
                    )))
                }
            },
        };
        if let Some(name) = &opts.name {
            if name != &config.name {
                return Err(AgentError::Usage(format!(
                    "{} belongs to member '{}', not '{name}'",
                    dir.root().display(),
                    config.name
                )));
            }
        }
        let agent = Agent::start(dir, config, seeds, &opts).await?;
        agent.wait_for_shutdown().await
    }

    async fn start(
        dir: DataDir,
        config: NodeConfig,
        seeds: Vec<(NodeId, String)>,
        opts: &AgentOptions,
    ) -> Result<Arc<Agent>, AgentError> {
        let snapshot_every = opts.snapshot_every;
        let addr: SocketAddr = config
            .addr
            .parse()
            .map_err(|_| AgentError::Usage(format!("bad address in node.json: {}", config.addr)))?;
        let creds = dir.load_credentials("node")?;
        let ca = dir.load_ca()?;
        if !dir.root().join("tls/admin.pem").exists() {
            let admin = ca.issue(&Identity::Admin, &pki::new_serial())?;
            dir.save_credentials("admin", &admin)?;
        }
        let endpoint = Endpoint::bind(addr, &creds).map_err(|e| AgentError::Bind {
            addr,
            reason: e.to_string(),
        })?;
        let pool = Pool::new(endpoint.clone());
        let db = dir.raft_db();
        let (log_store, sm_store) =
            tokio::task::spawn_blocking(move || ferry_raft::store::open(&db))
                .await
                .map_err(|e| AgentError::Raft(e.to_string()))??;
        let state = sm_store.state();
        let raft_config =
            ferry_raft::raft_config(snapshot_every).map_err(|e| AgentError::Raft(e.to_string()))?;
        let raft = Raft::new(
            config.id,
            raft_config,
            Network::new(RaftClient { pool: pool.clone() }),
            log_store,
            sm_store,
        )
        .await
        .map_err(|e| AgentError::Raft(e.to_string()))?;

        let removed =
            state.read(|s| s.next_node_id > config.id && !s.members.contains_key(&config.id));
        if removed {
            return Err(AgentError::Removed(dir.root().display().to_string()));
        }

        let (shutdown, _) = watch::channel(None);
        let (gossip, gossip_inbox) = crate::gossip::Gossip::new(config.id, opts.gossip.clone());
        let agent = Arc::new(Agent {
            id: config.id,
            name: config.name.clone(),
            addr,
            data_dir: dir.clone(),
            raft: raft.clone(),
            state,
            pool,
            ca,
            bootstrap: config.bootstrap,
            voters: config.voters,
            seed_names: Mutex::new(seeds.into_iter().collect()),
            host: crate::container::reconcile::Host::new(dir.root(), &config.name),
            gossip,
            heal_after: opts.heal_after,
            job_phase_timeout: opts.job_phase_timeout,
            transfers: Default::default(),
            shutdown,
        });
        tokio::spawn(crate::gossip::run(agent.clone(), gossip_inbox));
        tokio::spawn(ferry_transport::rpc::serve(
            endpoint,
            Arc::new(crate::service::AgentService::new(agent.clone())),
        ));

        if config.bootstrap {
            let initialized = raft
                .is_initialized()
                .await
                .map_err(|e| AgentError::Raft(e.to_string()))?;
            if !initialized {
                let nodes = BTreeMap::from([(
                    config.id,
                    Node {
                        name: config.name.clone(),
                        addr: config.addr.clone(),
                    },
                )]);
                raft.initialize(nodes)
                    .await
                    .map_err(|e| AgentError::Raft(e.to_string()))?;
            }
            tokio::spawn(
                agent
                    .clone()
                    .ensure_bootstrap_records(config.cert_serial.clone()),
            );
        }
        tokio::spawn(agent.clone().leader_loop());
        tokio::spawn(agent.clone().publish_facts());
        tokio::spawn(crate::instances::run_reconciler(agent.clone()));
        tokio::spawn(crate::migration::engine::run(agent.clone()));

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

    async fn wait_for_shutdown(self: Arc<Self>) -> Result<(), AgentError> {
        let mut stop = self.shutdown.subscribe();
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| AgentError::Raft(format!("cannot watch SIGTERM: {e}")))?;
        let reason = tokio::select! {
            _ = tokio::signal::ctrl_c() => None,
            _ = sigterm.recv() => None,
            reason = stop.wait_for(|r| r.is_some()) => reason.ok().and_then(|r| r.clone()),
        };
        tracing::info!("shutting down");
        let _ = self.raft.shutdown().await;
        self.pool.endpoint().close();
        match reason {
            Some(why) => Err(AgentError::Removed(why)),
            None => Ok(()),
        }
    }

    pub(crate) fn request_shutdown(&self, reason: String) {
        let _ = self.shutdown.send(Some(reason));
    }

    /// Propose a command, forwarding it to the leader when this agent is
    /// not the leader, and waiting out elections up to a deadline. Returns
    /// once this agent's own state has applied it, so a caller reads its
    /// own write.
    pub async fn write(&self, command: Command) -> Result<CommandResult, ApiError> {
        let (result, index) = self.write_indexed(command).await?;
        let mut applied = self.state.subscribe();
        let caught_up = applied.wait_for(|at| *at >= index);
        if tokio::time::timeout(WRITE_DEADLINE, caught_up)
            .await
            .is_err()
        {
            tracing::warn!(index, "committed entry not applied here in time");
        }
        Ok(result)
    }

    /// [`Agent::write`] without waiting for the local apply; also returns
    /// the entry's log index.
    pub async fn write_indexed(&self, command: Command) -> Result<(CommandResult, u64), ApiError> {
        // Every retry below (and a leader's retry of a forwarded write)
        // carries the same request id, so a write whose reply was lost is
        // not applied twice.
        let command = match command {
            once @ Command::Once { .. } => once,
            command => Command::Once {
                request: pki::random_u64(),
                command: Box::new(command),
            },
        };
        let deadline = tokio::time::Instant::now() + WRITE_DEADLINE;
        let mut last = String::from("no leader elected");
        while tokio::time::Instant::now() < deadline {
            match self.raft.client_write(command.clone()).await {
                Ok(response) => return Ok((response.data, response.log_id.index)),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                    if let (Some(leader), Some(node)) = (forward.leader_id, forward.leader_node) {
                        if leader != self.id {
                            // A dead leader's connection only fails after the
                            // QUIC idle timeout; an election tells sooner.
                            let mut metrics = self.raft.metrics();
                            let moved = metrics.wait_for(|m| m.current_leader != Some(leader));
                            tokio::select! {
                                result = self.forward_write(&node, &command) => match result {
                                    Ok(result) => return Ok(result),
                                    Err(e) if e.kind == ErrorKind::Unavailable => last = e.message,
                                    Err(e) => return Err(e),
                                },
                                _ = moved => {
                                    last = format!("leader {} lost its leadership", node.name);
                                    continue;
                                }
                            }
                        }
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(ApiError::new(
            ErrorKind::Unavailable,
            format!(
                "the cluster could not commit the change within {}s ({last}); is a majority of voters running?",
                WRITE_DEADLINE.as_secs()
            ),
        ))
    }

    async fn forward_write(
        &self,
        leader: &Node,
        command: &Command,
    ) -> Result<(CommandResult, u64), ApiError> {
        let addr = parse_addr(&leader.addr)?;
        let request = Request::Api(ApiRequest::Write(command.clone()));
        match self
            .pool
            .call::<Request, Response>(
                addr,
                &Expect::Node(leader.name.clone()),
                &request,
                WRITE_DEADLINE,
            )
            .await
        {
            Ok(Response::Api(crate::protocol::ApiReply::Written { result, index })) => {
                Ok((result, index))
            }
            Ok(Response::Error(e)) => Err(e),
            Ok(_) => Err(ApiError::new(
                ErrorKind::Internal,
                "leader sent an unexpected reply",
            )),
            Err(e) => Err(ApiError::new(
                ErrorKind::Unavailable,
                format!("leader {} unreachable: {e}", leader.name),
            )),
        }
    }

    /// The bootstrap node records the cluster config and itself; repeated
    /// until committed, and harmless when already done.
    async fn ensure_bootstrap_records(self: Arc<Self>, serial: String) {
        loop {
            let (initialised, recorded) = self
                .state
                .read(|s| (s.config.voters != 0, s.members.contains_key(&self.id)));
            if initialised && recorded {
                return;
            }
            let command = if !initialised {
                Command::InitCluster {
                    config: ClusterConfig {
                        voters: self.voters,
                        ca_fingerprint: self.ca.fingerprint(),
                    },
                }
            } else {
                Command::AddMember {
                    id: self.id,
                    name: self.name.clone(),
                    addr: self.addr.to_string(),
                    cert_serial: serial.clone(),
                    now_ms: now_ms(),
                }
            };
            if let Err(e) = self.write(command).await {
                tracing::warn!("bootstrap records not committed yet: {e}");
            }
        }
    }

    /// Probe host facts and keep the replicated copy current.
    async fn publish_facts(self: Arc<Self>) {
        let mut changes = self.state.subscribe();
        loop {
            let facts = crate::facts::probe(self.data_dir.root()).await;
            loop {
                let (present, same) = self.state.read(|s| match s.members.get(&self.id) {
                    Some(m) => (true, m.facts.as_ref() == Some(&facts)),
                    None => (false, false),
                });
                if same {
                    break;
                }
                if !present {
                    // Our member record is not applied here yet.
                    if changes.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                let command = Command::UpdateFacts {
                    id: self.id,
                    facts: facts.clone(),
                };
                match self.write(command).await {
                    Ok(_) => break,
                    Err(e) => tracing::warn!("host facts not published yet: {e}"),
                }
            }
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
    }

    /// While this agent leads, bring the Raft membership in step with the
    /// member table.
    async fn leader_loop(self: Arc<Self>) {
        let mut metrics = self.raft.metrics();
        let mut changes = self.state.subscribe();
        loop {
            let view = {
                let m = metrics.borrow_and_update();
                // A leader that has voted itself out must stop: openraft
                // 0.9 panics on a membership change from a stepping-down
                // leader.
                let voter = m
                    .membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == self.id);
                if m.current_leader != Some(self.id) || !voter {
                    None
                } else {
                    Some(self.membership_view(&m))
                }
            };
            if let Some(view) = view {
                if let Some(change) = membership::plan(&view) {
                    tracing::info!(?change, "membership change");
                    if let Err(e) = self.apply_membership_change(change).await {
                        tracing::warn!("membership change failed: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    continue;
                }
            }
            tokio::select! {
                r = metrics.changed() => if r.is_err() { return },
                r = changes.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    fn membership_view(&self, m: &openraft::RaftMetrics<NodeId, Node>) -> MembershipView {
        let membership = m.membership_config.membership();
        let last = m.last_log_index.unwrap_or(0);
        let caught_up = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .filter(|(_, matched)| matched.map_or(0, |l| l.index) + CAUGHT_UP_LAG >= last)
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        let (members, removed, desired) = self.state.read(|s| {
            let members = s
                .members
                .iter()
                .map(|(id, m)| {
                    (
                        *id,
                        Node {
                            name: m.name.clone(),
                            addr: m.addr.clone(),
                        },
                    )
                })
                .collect();
            (
                members,
                s.removed_members.clone(),
                s.config.voters.max(1) as usize,
            )
        });
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: std::collections::BTreeSet<NodeId> = membership.learner_ids().collect();
        let mut dead = std::collections::BTreeSet::new();
        let mut dead_too_long = std::collections::BTreeSet::new();
        for id in voters.iter().chain(&learners) {
            if let Some(for_how_long) = self.gossip.dead_for(*id) {
                dead.insert(*id);
                if voters.contains(id) && for_how_long >= self.heal_after {
                    dead_too_long.insert(*id);
                }
            }
        }
        MembershipView {
            voters,
            learners,
            members,
            removed,
            desired_voters: desired,
            caught_up,
            dead,
            dead_too_long,
        }
    }

    async fn apply_membership_change(&self, change: MembershipChange) -> Result<(), String> {
        use openraft::ChangeMembers;
        let result = match change {
            MembershipChange::AddLearner(id, node) => self.raft.add_learner(id, node, false).await,
            MembershipChange::SetVoters(voters) => {
                self.raft
                    .change_membership(ChangeMembers::ReplaceAllVoters(voters), false)
                    .await
            }
            MembershipChange::RemoveLearners(ids) => {
                self.raft
                    .change_membership(ChangeMembers::RemoveNodes(ids), false)
                    .await
            }
        };
        result.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Names of members by id, from the applied state and the join seeds.
    pub fn member_name(&self, id: NodeId) -> Option<String> {
        self.state
            .read(|s| s.members.get(&id).map(|m| m.name.clone()))
            .or_else(|| self.seed_names.lock().ok()?.get(&id).cloned())
    }

    pub fn member_id(&self, name: &str) -> Option<NodeId> {
        self.state
            .read(|s| s.member_by_name(name).map(|m| m.id))
            .or_else(|| {
                self.seed_names
                    .lock()
                    .ok()?
                    .iter()
                    .find(|(_, n)| n.as_str() == name)
                    .map(|(id, _)| *id)
            })
    }
}
