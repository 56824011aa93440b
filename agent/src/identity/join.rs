//! The member side of a join: the token checked before any work, then the
//! certificates signed by a voter (here, or forwarded to one when this
//! member holds no CA key) and the join committed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_raft::{Command, CommandResult, Rejection};
use ferry_transport::pki::{self, ClusterCa, Identity};

use crate::api::{
    parse_addr, ApiError, ApiReply, ApiRequest, ErrorKind, JoinAccepted, JoinRequest, Request,
};
use crate::clock::now_ms;
use crate::node::write::{rejected, WRITE_DEADLINE};
use crate::node::{commit, Agent};

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
            .read(|s| s.check_join(name, secret_hash, (now_ms(), agent.id())))
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
    let secret_hash = check_request(agent, &join).await?;
    match agent.keyring().signer() {
        Some(ca) => sign_and_commit(agent, &ca, join, secret_hash).await,
        None => forward_to_voter(agent, join).await,
    }
}

/// A join a member without the CA key passed on: checked again here, and
/// signed only here.
pub async fn signed_join(agent: &Agent, join: JoinRequest) -> Result<ApiReply, ApiError> {
    let secret_hash = check_request(agent, &join).await?;
    let ca = agent.keyring().signer().ok_or_else(|| {
        ApiError::new(
            ErrorKind::Unavailable,
            format!("{} holds no CA key (yet); ask another voter", agent.name()),
        )
    })?;
    let accepted = sign_and_commit(agent, &ca, join, secret_hash).await?;
    Ok(ApiReply::Joined(Box::new(accepted)))
}

/// The request's name, address and token; the token's secret hash.
async fn check_request(agent: &Agent, join: &JoinRequest) -> Result<String, ApiError> {
    pki::validate_node_name(&join.name).map_err(|e| bad_request(e.to_string()))?;
    parse_addr(&join.addr)?;
    let secret_hash = pki::sha256_hex(join.secret.as_bytes());
    check_token(agent, &join.name, &secret_hash).await?;
    Ok(secret_hash)
}

async fn forward_to_voter(agent: &Agent, join: JoinRequest) -> Result<JoinAccepted, ApiError> {
    let name = join.name.clone();
    let request = Request::Api(ApiRequest::ForwardedJoin(join));
    match agent.call_voters(&request, WRITE_DEADLINE).await? {
        ApiReply::Joined(accepted) => {
            tracing::info!(name = %name, id = accepted.id, "join signed by a voter");
            Ok(*accepted)
        }
        _ => Err(ApiError::new(
            ErrorKind::Internal,
            "a voter answered the join with an unexpected reply",
        )),
    }
}

/// Sign both certificates, commit the join, then record the admin
/// certificate with the new member; the certificates go out only once the
/// join committed. Should the record fail, the joiner's own agent records
/// it (`record_admin_cert`): the join is not failed for it, since its
/// token is already spent.
async fn sign_and_commit(
    agent: &Agent,
    ca: &ClusterCa,
    join: JoinRequest,
    secret_hash: String,
) -> Result<JoinAccepted, ApiError> {
    let bad_csr = |e: pki::PkiError| bad_request(format!("bad certificate request: {e}"));
    let serial = pki::new_serial();
    let cert_pem = ca
        .sign_csr(&join.csr_pem, &Identity::Node(join.name.clone()), &serial)
        .map_err(bad_csr)?;
    let admin_serial = pki::new_serial();
    let admin_cert_pem = ca
        .sign_csr(&join.admin_csr_pem, &Identity::Admin, &admin_serial)
        .map_err(bad_csr)?;
    let joined = Command::JoinMember {
        name: join.name.clone(),
        secret_hash,
        addr: join.addr.clone(),
        cert_serial: serial.clone(),
        now_ms: now_ms(),
        by: agent.id(),
    };
    let id = match commit(agent, joined).await? {
        CommandResult::Joined { id } => id,
        _ => return Err(ApiError::new(ErrorKind::Internal, "join was not recorded")),
    };
    let admin = Command::RecordAdminCert {
        id,
        serial: admin_serial,
    };
    if let Err(e) = commit(agent, admin).await {
        tracing::warn!(name = %join.name, "admin certificate not recorded yet: {e}");
    }
    tracing::info!(name = %join.name, id, "member joined");
    Ok(JoinAccepted {
        id,
        cert_pem,
        cert_serial: serial,
        ca_pem: agent.keyring().cert_pem().to_string(),
        admin_cert_pem,
        members: agent
            .state()
            .read(|s| s.members.values().map(|m| (m.id, m.name.clone())).collect()),
    })
}
