//! Who this agent is (layer 2): its identity from the data dir, or a new
//! cluster (bootstrap), or a join by token; and the member side of a join
//! (checking the token in apply, signing the joiner's certificate).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_raft::{ClusterConfig, Command, CommandResult, NodeId, Rejection};
use ferry_transport::endpoint::{Endpoint, Expect};
use ferry_transport::pki::{self, ClusterCa, Credentials, Identity};
use ferry_transport::rpc::Pool;

use crate::api::{parse_addr, ApiError, ErrorKind, JoinAccepted, JoinRequest, Request, Response};
use crate::clock::now_ms;
use crate::datadir::{DataDir, DataDirError, NodeConfig};
use crate::node::write::rejected;
use crate::node::write::WRITE_DEADLINE;
use crate::node::{commit, Agent};
use crate::token::{JoinToken, TokenError};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
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
}

/// What the command line says about identity.
#[derive(Clone, Debug)]
pub struct IdentityOptions {
    pub name: Option<String>,
    pub listen: Option<SocketAddr>,
    pub bootstrap: bool,
    pub join: Option<String>,
    pub voters: u8,
}

/// This member's config (made now on a first start) and the members the
/// join answer named.
pub async fn establish(
    dir: &DataDir,
    opts: &IdentityOptions,
) -> Result<(NodeConfig, Vec<(NodeId, String)>), IdentityError> {
    let mut seeds = Vec::new();
    let config = match dir.node_config()? {
        Some(config) => {
            if opts.join.is_some() {
                tracing::warn!("data dir already holds a member; ignoring --join");
            }
            config
        }
        None if opts.bootstrap => bootstrap_identity(dir, opts).await?,
        None => match &opts.join {
            Some(token) => {
                let (config, members) = join_identity(dir, opts, token).await?;
                seeds = members;
                config
            }
            None => {
                return Err(IdentityError::Usage(format!(
                    "{} holds no cluster member; start with --bootstrap to create a cluster or --join TOKEN to join one",
                    dir.root().display()
                )))
            }
        },
    };
    if let Some(name) = &opts.name {
        if name != &config.name {
            return Err(IdentityError::Usage(format!(
                "{} belongs to member '{}', not '{name}'",
                dir.root().display(),
                config.name
            )));
        }
    }
    Ok((config, seeds))
}

/// Pick a port now when asked for port 0, because a joiner must tell the
/// cluster its address before it can serve with the certificate it gets.
fn concrete_addr(listen: SocketAddr) -> Result<SocketAddr, IdentityError> {
    let bind_error = |e: std::io::Error| IdentityError::Bind {
        addr: listen,
        reason: e.to_string(),
    };
    if listen.port() != 0 {
        return Ok(listen);
    }
    let socket = std::net::UdpSocket::bind(listen).map_err(bind_error)?;
    socket.local_addr().map_err(bind_error)
}

fn client_bind_for(addr: SocketAddr) -> SocketAddr {
    if addr.is_ipv6() {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from(([0, 0, 0, 0], 0))
    }
}

fn usage(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Usage(e.to_string())
}

async fn bootstrap_identity(
    dir: &DataDir,
    opts: &IdentityOptions,
) -> Result<NodeConfig, IdentityError> {
    let name = opts
        .name
        .clone()
        .ok_or_else(|| usage("--bootstrap needs --name NAME"))?;
    pki::validate_node_name(&name).map_err(usage)?;
    let listen = opts
        .listen
        .ok_or_else(|| usage("--bootstrap needs --listen ADDR"))?;
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
    opts: &IdentityOptions,
    token_text: &str,
) -> Result<(NodeConfig, Vec<(NodeId, String)>), IdentityError> {
    let token = JoinToken::decode(token_text)?;
    let name = opts.name.clone().unwrap_or_else(|| token.name.clone());
    if name != token.name {
        return Err(IdentityError::Usage(format!(
            "this join token is for member '{}', not '{name}'; start with --name {}",
            token.name, token.name
        )));
    }
    pki::validate_node_name(&name).map_err(usage)?;
    let listen = opts
        .listen
        .ok_or_else(|| usage("--join needs --listen ADDR"))?;
    let addr = concrete_addr(listen)?;
    let (csr_pem, key_pem) = pki::generate_csr(&Identity::Node(name.clone()))?;
    let request = Request::Join(JoinRequest {
        name: name.clone(),
        secret: token.secret.clone(),
        addr: addr.to_string(),
        csr_pem,
    });
    let endpoint = Endpoint::client(client_bind_for(addr), None)
        .map_err(|e| IdentityError::Join(e.to_string()))?;
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
                let joined = Joined {
                    name,
                    addr,
                    key_pem,
                    voters: opts.voters,
                };
                let result = save_joined(dir, &token, joined, accepted);
                pool.endpoint().close();
                return result;
            }
            Ok(Response::Error(e)) => return Err(IdentityError::Join(e.message)),
            Ok(_) => last_error = format!("{member} answered with an unexpected reply"),
            Err(e) => last_error = format!("{member}: {e}"),
        }
    }
    Err(IdentityError::Join(last_error))
}

/// What the joiner knows of itself when the cluster accepts it.
struct Joined {
    name: String,
    addr: SocketAddr,
    key_pem: String,
    voters: u8,
}

fn save_joined(
    dir: &DataDir,
    token: &JoinToken,
    joined: Joined,
    accepted: JoinAccepted,
) -> Result<(NodeConfig, Vec<(NodeId, String)>), IdentityError> {
    let ca = ClusterCa::from_pem(&accepted.ca_pem, &accepted.ca_key_pem)?;
    if ca.fingerprint() != token.ca_fingerprint {
        return Err(IdentityError::Join(
            "the cluster sent a CA that does not match the token".into(),
        ));
    }
    dir.create()?;
    dir.save_ca(&ca)?;
    dir.save_credentials(
        "node",
        &Credentials {
            cert_pem: accepted.cert_pem,
            key_pem: joined.key_pem,
            ca_pem: accepted.ca_pem,
        },
    )?;
    let config = NodeConfig {
        id: accepted.id,
        name: joined.name,
        addr: joined.addr.to_string(),
        bootstrap: false,
        voters: joined.voters,
        cert_serial: accepted.cert_serial,
    };
    dir.save_node_config(&config)?;
    Ok((config, accepted.members))
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::BadRequest, message)
}

/// After this many failed joins from one address within [`JOIN_WINDOW`],
/// its joins are refused before any work.
const MAX_FAILED_JOINS: u32 = 5;
const JOIN_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most; past it, the oldest windows are dropped.
const JOIN_LIMITER_ENTRIES: usize = 4096;
/// A token created a moment ago may not be applied here yet.
const TOKEN_CATCH_UP: Duration = Duration::from_secs(2);

/// Failed joins per source address.
#[derive(Default)]
pub struct JoinLimiter {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl JoinLimiter {
    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        let mut failures = self.failures();
        match failures.get(&ip) {
            Some((_, since)) if since.elapsed() >= JOIN_WINDOW => {
                failures.remove(&ip);
                true
            }
            Some((count, _)) => *count < MAX_FAILED_JOINS,
            None => true,
        }
    }

    fn failed(&self, ip: IpAddr) {
        let mut failures = self.failures();
        if failures.len() >= JOIN_LIMITER_ENTRIES {
            failures.retain(|_, (_, since)| since.elapsed() < JOIN_WINDOW);
        }
        let entry = failures.entry(ip).or_insert((0, Instant::now()));
        entry.0 += 1;
    }
}

/// A member's side of a join, from `from`: refused at once after too many
/// failures from that address; the token (single use, expiry, revocation,
/// bound name, secret) is checked before any certificate is signed or any
/// entry proposed, and again in apply; the certificate goes out only once
/// `JoinMember` committed.
pub async fn handle_join(
    agent: &Agent,
    joins: &JoinLimiter,
    from: SocketAddr,
    join: JoinRequest,
) -> Result<JoinAccepted, ApiError> {
    if !joins.allowed(from.ip()) {
        return Err(ApiError::new(
            ErrorKind::Unauthorized,
            format!(
                "too many failed joins from {}; wait a minute and check the token",
                from.ip()
            ),
        ));
    }
    let result = join_checked(agent, join).await;
    if let Err(e) = &result {
        tracing::warn!(from = %from, "refused join: {e}");
        joins.failed(from.ip());
    }
    result
}

/// The token as this member's state knows it, waiting briefly for one
/// created a moment ago elsewhere.
async fn check_token(agent: &Agent, name: &str, secret_hash: &str) -> Result<(), ApiError> {
    let check = || {
        agent
            .state()
            .read(|s| s.check_join(name, secret_hash, now_ms()))
    };
    let mut changes = agent.state().subscribe();
    let deadline = tokio::time::Instant::now() + TOKEN_CATCH_UP;
    loop {
        match check() {
            Err(Rejection::NoToken(_)) if tokio::time::Instant::now() < deadline => {
                let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
            }
            Err(rejection) => return Err(rejected(rejection)),
            Ok(()) => return Ok(()),
        }
    }
}

async fn join_checked(agent: &Agent, join: JoinRequest) -> Result<JoinAccepted, ApiError> {
    pki::validate_node_name(&join.name).map_err(|e| bad_request(e.to_string()))?;
    parse_addr(&join.addr)?;
    let secret_hash = pki::sha256_hex(join.secret.as_bytes());
    check_token(agent, &join.name, &secret_hash).await?;
    let serial = pki::new_serial();
    // The certificate is handed out only once the token is consumed.
    let cert_pem = agent
        .ca()
        .sign_csr(&join.csr_pem, &Identity::Node(join.name.clone()), &serial)
        .map_err(|e| bad_request(format!("bad certificate request: {e}")))?;
    let joined = Command::JoinMember {
        name: join.name.clone(),
        secret_hash,
        addr: join.addr.clone(),
        cert_serial: serial.clone(),
        now_ms: now_ms(),
    };
    let id = match commit(agent, joined).await? {
        CommandResult::Joined { id } => id,
        _ => return Err(ApiError::new(ErrorKind::Internal, "join was not recorded")),
    };
    tracing::info!(name = %join.name, id, "member joined");
    Ok(JoinAccepted {
        id,
        cert_pem,
        cert_serial: serial,
        ca_pem: agent.ca().cert_pem().to_string(),
        ca_key_pem: agent.ca().key_pem().to_string(),
        members: agent
            .state()
            .read(|s| s.members.values().map(|m| (m.id, m.name.clone())).collect()),
    })
}

/// The bootstrap node records the cluster config and itself; repeated
/// until committed, and harmless when already done.
pub async fn ensure_bootstrap_records(agent: Arc<Agent>, serial: String) {
    loop {
        let (initialised, recorded) = agent
            .state()
            .read(|s| (s.config.voters != 0, s.members.contains_key(&agent.id())));
        if initialised && recorded {
            return;
        }
        let command = if !initialised {
            Command::InitCluster {
                config: ClusterConfig {
                    voters: agent.tuning().voters,
                    ca_fingerprint: agent.ca().fingerprint(),
                },
            }
        } else {
            Command::AddMember {
                id: agent.id(),
                name: agent.name().to_string(),
                addr: agent.addr().to_string(),
                cert_serial: serial.clone(),
                now_ms: now_ms(),
            }
        };
        if let Err(e) = agent.write(command).await {
            tracing::warn!("bootstrap records not committed yet: {e}");
        }
    }
}

/// Record the admin client certificate in this agent's data dir with its
/// member, so that removing the member revokes it too; retried until
/// committed, harmless when already recorded.
pub async fn record_admin_cert(agent: Arc<Agent>) {
    let serial = match agent
        .data_dir()
        .load_credentials("admin")
        .map_err(|e| e.to_string())
        .and_then(|c| pki::serial_of_pem(&c.cert_pem).map_err(|e| e.to_string()))
    {
        Ok(serial) => serial,
        Err(e) => {
            tracing::warn!("cannot read this agent's admin certificate: {e}");
            return;
        }
    };
    let mut changes = agent.state().subscribe();
    loop {
        let recorded = agent.state().read(|s| {
            s.members
                .get(&agent.id())
                .map(|m| m.admin_serials.contains(&serial))
        });
        match recorded {
            Some(true) => return,
            // Our member record is not applied here yet.
            None => {
                if changes.changed().await.is_err() {
                    return;
                }
            }
            Some(false) => {
                let command = Command::RecordAdminCert {
                    id: agent.id(),
                    serial: serial.clone(),
                };
                if let Err(e) = agent.write(command).await {
                    tracing::warn!("admin certificate not recorded yet: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}
