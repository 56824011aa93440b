//! Answers every request that reaches the agent's QUIC endpoint: who may
//! ask what (certificate identity and revocation), Raft traffic, joins and
//! the operator API.

use std::sync::Arc;
use std::time::Duration;

use ferry_raft::network::RaftRequest;
use ferry_raft::{Command, CommandResult, Member, Rejection};
use ferry_transport::endpoint::Expect;
use ferry_transport::frame::FrameError;
use ferry_transport::pki::{self, Identity, PeerCert};
use ferry_transport::rpc::{Peer, Service};

use crate::agent::{now_ms, parse_addr, Agent, PEER_TIMEOUT};
use crate::protocol::{
    ApiError, ApiReply, ApiRequest, ErrorKind, JoinAccepted, JoinRequest, LoadView, MemberDetail,
    MemberView, RaftStatus, Request, Response, TokenView,
};
use crate::token::JoinToken;

/// Liveness answers within this, or the member counts as dead.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;

pub struct AgentService {
    agent: Arc<Agent>,
}

impl AgentService {
    pub fn new(agent: Arc<Agent>) -> Self {
        AgentService { agent }
    }
}

fn unauthorized(message: impl Into<String>) -> Response {
    Response::Error(ApiError::new(ErrorKind::Unauthorized, message))
}

impl Service for AgentService {
    type Request = Request;
    type Response = Response;

    async fn handle(&self, peer: Arc<Peer>, request: Request) -> Response {
        let agent = &self.agent;
        if let Request::Join(join) = request {
            return match handle_join(agent, join).await {
                Ok(accepted) => Response::Joined(accepted),
                Err(e) => Response::Error(e),
            };
        }
        let Some(cert) = &peer.cert else {
            return unauthorized(
                "a client certificate signed by the cluster CA is required; use the admin credentials from the agent's data dir",
            );
        };
        if agent.state.read(|s| s.is_revoked(&cert.serial)) {
            tracing::warn!(peer = %peer.addr, serial = %cert.serial, "refused revoked certificate");
            return unauthorized(format!(
                "certificate {} was revoked (its member was removed)",
                cert.serial
            ));
        }
        match request {
            Request::Join(_) => unreachable_join(),
            Request::Upload(_) | Request::Transfer(_) => Response::Error(ApiError::new(
                ErrorKind::BadRequest,
                "a transfer must open a channel",
            )),
            Request::Ping => Response::Pong {
                id: agent.id,
                name: agent.name.clone(),
            },
            Request::Raft(raft) => match check_raft_sender(agent, cert, &raft) {
                Ok(()) => Response::Raft(raft.handle(&agent.raft).await),
                Err(e) => {
                    tracing::warn!(peer = %peer.addr, "refused raft request: {e}");
                    Response::Error(e)
                }
            },
            Request::Api(api) => match handle_api(agent, cert, api).await {
                Ok(reply) => Response::Api(reply),
                Err(e) => Response::Error(e),
            },
        }
    }

    fn wants_datagrams(&self) -> bool {
        true
    }

    /// Gossip: only from certified, unrevoked members of this cluster.
    fn handle_datagram(&self, peer: &Arc<Peer>, data: bytes::Bytes) {
        let gossip = &self.agent.gossip;
        let Some(cert) = &peer.cert else {
            gossip.refuse(&peer.addr.to_string(), "no client certificate");
            return;
        };
        let Identity::Node(name) = &cert.identity else {
            gossip.refuse(&cert.identity.to_string(), "not a node certificate");
            return;
        };
        if self.agent.state.read(|s| s.is_revoked(&cert.serial)) {
            gossip.refuse(name, "certificate revoked (member removed)");
            return;
        }
        match self.agent.member_id(name) {
            Some(id) => gossip.deliver(id, data),
            None => gossip.refuse(name, "not a member (yet)"),
        }
    }

    fn wants_stream(&self, request: &Request) -> bool {
        matches!(request, Request::Upload(_) | Request::Transfer(_))
    }

    async fn handle_stream(
        &self,
        peer: Arc<Peer>,
        request: Request,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let member = peer.cert.as_ref().is_some_and(|c| {
            matches!(c.identity, Identity::Node(_))
                && !self.agent.state.read(|s| s.is_revoked(&c.serial))
        });
        match request {
            Request::Upload(upload) if member => {
                crate::instances::receive_upload(&self.agent, upload, send, recv).await
            }
            Request::Transfer(transfer) if member => {
                let name = match peer.cert.as_ref().map(|c| &c.identity) {
                    Some(Identity::Node(name)) => name.clone(),
                    _ => return,
                };
                crate::migration::engine::serve_transfer(&self.agent, &name, transfer, send, recv)
                    .await
            }
            _ => {
                let reply = unauthorized("only members may open transfer channels");
                let _ = ferry_transport::frame::write_frame(&mut send, &reply).await;
                let _ = send.finish();
            }
        }
    }

    fn bad_frame(&self, error: &FrameError) -> Response {
        Response::Error(ApiError::new(
            ErrorKind::BadRequest,
            format!("request refused: {error}"),
        ))
    }
}

fn unreachable_join() -> Response {
    Response::Error(ApiError::new(ErrorKind::Internal, "join handled above"))
}

/// A member may only speak Raft as itself: the node id it claims must
/// belong to the name in its certificate.
fn check_raft_sender(
    agent: &Agent,
    cert: &PeerCert,
    request: &RaftRequest,
) -> Result<(), ApiError> {
    let Identity::Node(name) = &cert.identity else {
        return Err(ApiError::new(
            ErrorKind::Unauthorized,
            "only member certificates may send Raft traffic",
        ));
    };
    let claimed = request.claimed_sender();
    let known_name = agent.member_name(claimed);
    let known_id = agent.member_id(name);
    let consistent = match (known_name, known_id) {
        (Some(n), _) => &n == name,
        (None, Some(id)) => id == claimed,
        // A member we know nothing about yet (our log is behind).
        (None, None) => true,
    };
    if consistent {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorKind::Unauthorized,
            format!("certificate of member '{name}' used to speak for node {claimed}"),
        ))
    }
}

fn rejected(rejection: Rejection) -> ApiError {
    let kind = match rejection {
        Rejection::NoToken(_) | Rejection::NoMember(_) => ErrorKind::NotFound,
        Rejection::NameTaken(_) | Rejection::TokenExists(_) | Rejection::AlreadyInitialised => {
            ErrorKind::Conflict
        }
        _ => ErrorKind::Unauthorized,
    };
    ApiError::new(kind, rejection.to_string())
}

/// Commit a command and turn a state-machine refusal into an error.
async fn commit(agent: &Agent, command: Command) -> Result<CommandResult, ApiError> {
    match agent.write(command).await? {
        CommandResult::Rejected(r) => Err(rejected(r)),
        ok => Ok(ok),
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::BadRequest, message)
}

async fn handle_join(agent: &Agent, join: JoinRequest) -> Result<JoinAccepted, ApiError> {
    pki::validate_node_name(&join.name).map_err(|e| bad_request(e.to_string()))?;
    parse_addr(&join.addr)?;
    let serial = pki::new_serial();
    // Signing has no side effect; the certificate is handed out only once
    // the token is consumed.
    let cert_pem = agent
        .ca
        .sign_csr(&join.csr_pem, &Identity::Node(join.name.clone()), &serial)
        .map_err(|e| bad_request(format!("bad certificate request: {e}")))?;
    let result = commit(
        agent,
        Command::JoinMember {
            name: join.name.clone(),
            secret_hash: pki::sha256_hex(join.secret.as_bytes()),
            addr: join.addr.clone(),
            cert_serial: serial.clone(),
            now_ms: now_ms(),
        },
    )
    .await;
    let id = match result {
        Ok(CommandResult::Joined { id }) => id,
        Ok(_) => return Err(ApiError::new(ErrorKind::Internal, "join was not recorded")),
        Err(e) => {
            tracing::warn!(name = %join.name, "refused join: {e}");
            return Err(e);
        }
    };
    tracing::info!(name = %join.name, id, "member joined");
    Ok(JoinAccepted {
        id,
        cert_pem,
        cert_serial: serial,
        ca_pem: agent.ca.cert_pem().to_string(),
        ca_key_pem: agent.ca.key_pem().to_string(),
        members: agent
            .state
            .read(|s| s.members.values().map(|m| (m.id, m.name.clone())).collect()),
    })
}

async fn handle_api(
    agent: &Arc<Agent>,
    cert: &PeerCert,
    api: ApiRequest,
) -> Result<ApiReply, ApiError> {
    let from_member = matches!(cert.identity, Identity::Node(_));
    match api {
        ApiRequest::ClusterList => Ok(ApiReply::Members(member_views(agent))),
        ApiRequest::ClusterShow { name } => {
            let views = member_views(agent);
            let view = views
                .into_iter()
                .find(|v| v.name == name)
                .ok_or_else(|| no_member(&name))?;
            let facts = agent
                .state
                .read(|s| s.members.get(&view.id).and_then(|m| m.facts.clone()));
            let raft = (view.id == agent.id).then(|| raft_status(agent));
            let load = agent.gossip.load(view.id).map(|(l, age)| LoadView {
                memory_free_bytes: l.memory_free_bytes,
                load_average: l.load_average.to_vec(),
                running_instances: l.running_instances,
                agent_version: l.agent_version,
                age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
            });
            Ok(ApiReply::Member(Box::new(MemberDetail {
                member: view,
                facts,
                raft,
                load,
            })))
        }
        ApiRequest::TokenCreate { name, ttl_secs } => create_token(agent, name, ttl_secs).await,
        ApiRequest::TokenList => Ok(ApiReply::Tokens(token_views(agent))),
        ApiRequest::TokenRevoke { name } => {
            commit(agent, Command::RevokeToken { name }).await?;
            Ok(ApiReply::Done)
        }
        ApiRequest::Remove { name, force } => remove_member(agent, &name, force).await,
        ApiRequest::Write(command) if from_member => {
            let (result, index) = agent.write_indexed(command).await?;
            Ok(ApiReply::Written { result, index })
        }
        ApiRequest::Removed if from_member => {
            let gone = agent
                .state
                .read(|s| s.next_node_id > agent.id && !s.members.contains_key(&agent.id));
            tracing::warn!(confirmed = gone, "told that this member was removed");
            agent.request_shutdown(agent.data_dir.root().display().to_string());
            Ok(ApiReply::Done)
        }
        ApiRequest::Move(request) => crate::migration::api::start_move(agent, request).await,
        ApiRequest::JobList => Ok(crate::migration::api::list(agent)),
        ApiRequest::JobShow { id } => crate::migration::api::show(agent, id).await,
        ApiRequest::JobProgress { id } => Ok(ApiReply::Progress(agent.transfers.get(id))),
        ApiRequest::JobAbort { id } => crate::migration::api::abort(agent, id).await,
        ApiRequest::Launch(request) => crate::instances::launch(agent, request).await,
        ApiRequest::InstanceList => Ok(crate::instances::list(agent)),
        ApiRequest::InstanceShow { name } => crate::instances::show(agent, &name),
        ApiRequest::Instance {
            name,
            op,
            forwarded,
        } => crate::instances::operate(agent, &name, op, forwarded).await,
        ApiRequest::Write(_) | ApiRequest::Removed => Err(ApiError::new(
            ErrorKind::Unauthorized,
            "only members may send internal requests",
        )),
    }
}

fn raft_status(agent: &Agent) -> RaftStatus {
    let m = agent.raft.metrics().borrow().clone();
    RaftStatus {
        term: m.current_term,
        last_log_index: m.last_log_index.unwrap_or(0),
        last_applied_index: m.last_applied.map_or(0, |l| l.index),
        snapshot_index: m.snapshot.map_or(0, |l| l.index),
        purged_index: m.purged.map_or(0, |l| l.index),
    }
}

fn no_member(name: &str) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!("no member named '{name}'; 'ferry cluster list' shows the members"),
    )
}

/// Whether member `id` is alive or only suspect by gossip (not dead).
pub(crate) fn member_alive(agent: &Agent, id: ferry_raft::NodeId) -> bool {
    agent.gossip.liveness(id) != crate::gossip::Liveness::Dead
}

async fn ping(agent: &Agent, member: &Member) -> bool {
    if member.id == agent.id {
        return true;
    }
    let Ok(addr) = member.addr.parse() else {
        return false;
    };
    matches!(
        agent
            .pool
            .call::<Request, Response>(
                addr,
                &Expect::Node(member.name.clone()),
                &Request::Ping,
                PING_TIMEOUT
            )
            .await,
        Ok(Response::Pong { .. })
    )
}

fn member_views(agent: &Arc<Agent>) -> Vec<MemberView> {
    let metrics = agent.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    let voters: std::collections::BTreeSet<_> = membership.voter_ids().collect();
    let learners: std::collections::BTreeSet<_> = membership.learner_ids().collect();
    let members: Vec<Member> = agent.state.read(|s| s.members.values().cloned().collect());
    members
        .into_iter()
        .map(|m| MemberView {
            role: if voters.contains(&m.id) {
                "voter"
            } else if learners.contains(&m.id) {
                "learner"
            } else {
                "none"
            }
            .into(),
            leader: metrics.current_leader == Some(m.id),
            liveness: agent.gossip.liveness(m.id).as_str().into(),
            state: m.state.as_str().into(),
            name: m.name,
            id: m.id,
            address: m.addr,
        })
        .collect()
}

fn token_views(agent: &Agent) -> Vec<TokenView> {
    let now = now_ms();
    agent.state.read(|s| {
        s.tokens
            .values()
            .map(|t| TokenView {
                name: t.name.clone(),
                created_ms: t.created_ms,
                expires_ms: t.expires_ms,
                status: if t.revoked {
                    "revoked"
                } else if t.used {
                    "used"
                } else if now >= t.expires_ms {
                    "expired"
                } else {
                    "valid"
                }
                .into(),
            })
            .collect()
    })
}

async fn create_token(agent: &Agent, name: String, ttl_secs: u64) -> Result<ApiReply, ApiError> {
    pki::validate_node_name(&name).map_err(|e| bad_request(e.to_string()))?;
    if ttl_secs == 0 || ttl_secs > MAX_TOKEN_TTL_SECS {
        return Err(bad_request(format!(
            "token lifetime must be between 1s and {} days",
            MAX_TOKEN_TTL_SECS / 86400
        )));
    }
    let secret = pki::random_hex(32);
    let now = now_ms();
    commit(
        agent,
        Command::CreateToken {
            name: name.clone(),
            secret_hash: pki::sha256_hex(secret.as_bytes()),
            now_ms: now,
            expires_ms: now + ttl_secs * 1000,
        },
    )
    .await?;
    // This agent first: it just proved it can commit.
    let own = agent.addr.to_string();
    let mut addrs = vec![own.clone()];
    agent.state.read(|s| {
        addrs.extend(
            s.members
                .values()
                .map(|m| m.addr.clone())
                .filter(|a| *a != own),
        )
    });
    let token = JoinToken {
        name,
        secret,
        ca_fingerprint: agent.ca.fingerprint(),
        addrs,
    };
    Ok(ApiReply::Token {
        token: token.encode(),
    })
}

async fn remove_member(agent: &Arc<Agent>, name: &str, force: bool) -> Result<ApiReply, ApiError> {
    let (member, count) = agent
        .state
        .read(|s| (s.member_by_name(name).cloned(), s.members.len()));
    let member = member.ok_or_else(|| no_member(name))?;
    if count <= 1 {
        return Err(ApiError::new(
            ErrorKind::Conflict,
            format!("'{name}' is the last member; a cluster cannot remove its last member"),
        ));
    }
    let reachable = ping(agent, &member).await;
    if !reachable && !force {
        return Err(ApiError::new(
            ErrorKind::Unavailable,
            format!("member '{name}' is not reachable; use --force to remove it anyway"),
        ));
    }
    commit(agent, Command::RemoveMember { id: member.id }).await?;
    tracing::info!(name, id = member.id, "member removed");
    if reachable {
        // Tell it to stop; it may already be cut off, so this is best effort.
        let agent = agent.clone();
        tokio::spawn(async move {
            if member.id == agent.id {
                tokio::time::sleep(Duration::from_millis(500)).await;
                agent.request_shutdown(agent.data_dir.root().display().to_string());
                return;
            }
            if let Ok(addr) = member.addr.parse() {
                let _ = agent
                    .pool
                    .call::<Request, Response>(
                        addr,
                        &Expect::Node(member.name.clone()),
                        &Request::Api(ApiRequest::Removed),
                        PEER_TIMEOUT,
                    )
                    .await;
            }
        });
    }
    Ok(ApiReply::Done)
}
