//! The operator's cluster requests: list and show members, join tokens,
//! removal.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ferry_raft::{Command, Member};
use ferry_transport::pki;

use crate::api::{
    ApiError, ApiReply, ApiRequest, ErrorKind, LoadView, MemberDetail, MemberView, RaftStatus,
    Request, Response, TokenView,
};
use crate::clock::now_ms;
use crate::node::peers::Peer;
use crate::node::{commit, Agent};
use crate::token::JoinToken;

/// Liveness answers within this, or the member counts as dead.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// A removed member is told within this.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::BadRequest, message)
}

fn no_member(name: &str) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!("no member named '{name}'; 'ferry cluster list' shows the members"),
    )
}

pub fn member_views(agent: &Agent) -> Vec<MemberView> {
    let metrics = agent.raft().metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    let voters: BTreeSet<_> = membership.voter_ids().collect();
    let learners: BTreeSet<_> = membership.learner_ids().collect();
    let members: Vec<Member> = agent
        .state()
        .read(|s| s.members.values().cloned().collect());
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
            liveness: agent.gossip().liveness(m.id).as_str().into(),
            state: m.state.as_str().into(),
            cordoned: m.cordoned,
            name: m.name,
            id: m.id,
            address: m.addr,
        })
        .collect()
}

pub fn show_member(agent: &Agent, name: &str) -> Result<ApiReply, ApiError> {
    let view = member_views(agent)
        .into_iter()
        .find(|v| v.name == name)
        .ok_or_else(|| no_member(name))?;
    let (facts, admin_certificates) = agent.state().read(|s| {
        let member = s.members.get(&view.id);
        let facts = member.and_then(|m| m.facts.clone());
        (
            facts,
            member.map(|m| m.admin_serials.clone()).unwrap_or_default(),
        )
    });
    let raft = (view.id == agent.id()).then(|| raft_status(agent));
    let load = agent.gossip().load(view.id).map(|(l, age)| LoadView {
        memory_free_bytes: l.memory_free_bytes,
        disk_room_bytes: l.disk_room_bytes,
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
        admin_certificates,
    })))
}

fn raft_status(agent: &Agent) -> RaftStatus {
    let m = agent.raft().metrics().borrow().clone();
    RaftStatus {
        term: m.current_term,
        last_log_index: m.last_log_index.unwrap_or(0),
        last_applied_index: m.last_applied.map_or(0, |l| l.index),
        snapshot_index: m.snapshot.map_or(0, |l| l.index),
        purged_index: m.purged.map_or(0, |l| l.index),
    }
}

pub fn token_views(agent: &Agent) -> Vec<TokenView> {
    let now = now_ms();
    agent.state().read(|s| {
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
                } else if t.expired_at(now, agent.id()) {
                    // As a join signed here would find it.
                    "expired"
                } else {
                    "valid"
                }
                .into(),
            })
            .collect()
    })
}

pub async fn create_token(
    agent: &Agent,
    name: String,
    ttl_secs: u64,
) -> Result<ApiReply, ApiError> {
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
            by: agent.id(),
        },
    )
    .await?;
    // This agent first: it just proved it can commit.
    let own = agent.addr().to_string();
    let mut addrs = vec![own.clone()];
    agent.state().read(|s| {
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
        ca_fingerprint: agent.keyring().fingerprint(),
        addrs,
    };
    Ok(ApiReply::Token {
        token: token.encode(),
    })
}

pub async fn revoke_token(agent: &Agent, name: String) -> Result<ApiReply, ApiError> {
    commit(agent, Command::RevokeToken { name }).await?;
    Ok(ApiReply::Done)
}

async fn ping(agent: &Agent, member: &Member) -> bool {
    if member.id == agent.id() {
        return true;
    }
    let Ok(peer) = agent.peer(member.id) else {
        return false;
    };
    matches!(
        agent.call_peer(&peer, &Request::Ping, PING_TIMEOUT).await,
        Ok(Response::Pong { .. })
    )
}

pub async fn remove_member(
    agent: &Arc<Agent>,
    name: &str,
    force: bool,
) -> Result<ApiReply, ApiError> {
    let (member, count) = agent
        .state()
        .read(|s| (s.member_by_name(name).cloned(), s.members.len()));
    let member = member.ok_or_else(|| no_member(name))?;
    if count <= 1 {
        return Err(ApiError::new(
            ErrorKind::Conflict,
            format!("'{name}' is the last member; a cluster cannot remove its last member"),
        ));
    }
    let owned: Vec<String> = agent.state().read(|s| {
        s.instances
            .values()
            .filter(|i| i.owner == member.id)
            .map(|i| i.name.clone())
            .collect()
    });
    if !owned.is_empty() && !force {
        return Err(ApiError::new(
            ErrorKind::Conflict,
            format!(
                "'{name}' still owns {}; move them away first ('ferry move NAME --target NODE'), or pass --force to remove it anyway and mark them lost",
                owned.join(", ")
            ),
        ));
    }
    let reachable = ping(agent, &member).await;
    if !reachable && !force {
        return Err(ApiError::new(
            ErrorKind::Unavailable,
            format!("member '{name}' is not reachable; use --force to remove it anyway"),
        ));
    }
    // Looked up before the removal commits, which forgets its address.
    let peer = agent.peer(member.id).ok();
    commit(agent, Command::RemoveMember { id: member.id }).await?;
    tracing::info!(name, id = member.id, "member removed");
    if reachable {
        tokio::spawn(tell_removed(agent.clone(), member.id, peer));
    }
    Ok(ApiReply::Done)
}

/// Tell a removed member to stop; it may already be cut off, so this is
/// best effort.
async fn tell_removed(agent: Arc<Agent>, id: ferry_raft::NodeId, peer: Option<Peer>) {
    if id == agent.id() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        agent.request_shutdown(agent.data_dir().root().display().to_string());
        return;
    }
    if let Some(peer) = peer {
        let _ = agent
            .call_api(&peer, ApiRequest::Removed, PEER_TIMEOUT)
            .await;
    }
}

/// A member told by the leader that it was removed stops serving.
pub fn removed_notice(agent: &Agent) -> ApiReply {
    let gone = agent.removed_from_cluster();
    tracing::warn!(confirmed = gone, "told that this member was removed");
    agent.request_shutdown(agent.data_dir().root().display().to_string());
    ApiReply::Done
}
