//! Answers every request that reaches the agent's QUIC endpoint (top
//! layer): who may ask what (certificate identity and revocation), then
//! dispatch to the feature that answers it.

use std::sync::Arc;

use ferry_raft::network::RaftRequest;
use ferry_transport::frame::FrameError;
use ferry_transport::pki::{Identity, PeerCert};
use ferry_transport::rpc::{Peer, Service};

use crate::api::{ApiError, ApiReply, ApiRequest, ErrorKind, Request, Response};
use crate::node::Agent;
use crate::{hosts, identity, instances, membership, migration};

/// A request frame from a caller without a certificate (a joiner) may
/// be at most this large: a join request is a name, a secret, an address
/// and a CSR.
const ANONYMOUS_FRAME_CAP: usize = 64 * 1024;

pub struct AgentService {
    agent: Arc<Agent>,
    joins: identity::JoinLimiter,
}

impl AgentService {
    pub fn new(agent: Arc<Agent>) -> Self {
        AgentService {
            agent,
            joins: identity::JoinLimiter::default(),
        }
    }
}

fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Unauthorized, message)
}

/// Whether `cert` is a node certificate of this cluster, not revoked, and
/// the one recorded for its member.
fn member_cert<'a>(agent: &Agent, cert: Option<&'a PeerCert>) -> Option<&'a str> {
    let cert = cert?;
    match &cert.identity {
        Identity::Node(name)
            if !agent.state().read(|s| s.is_revoked(&cert.serial))
                && not_pinned(agent, cert).is_none() =>
        {
            Some(name.as_str())
        }
        _ => None,
    }
}

/// Why a node certificate is not the one the member table records for its
/// name (one the CA signed for that name later, by a member gone rogue, is
/// refused); `None` when it is, or when the member is not known here yet.
fn not_pinned(agent: &Agent, cert: &PeerCert) -> Option<String> {
    let Identity::Node(name) = &cert.identity else {
        return None;
    };
    let recorded = agent
        .state()
        .read(|s| s.member_by_name(name).map(|m| m.cert_serial.clone()))?;
    (recorded != cert.serial).then(|| {
        format!(
            "certificate {} is not the one recorded for member '{name}'",
            cert.serial
        )
    })
}

impl Service for AgentService {
    type Request = Request;
    type Response = Response;

    async fn handle(&self, peer: Arc<Peer>, request: Request) -> Response {
        let agent = &self.agent;
        if let Request::Join(join) = request {
            return match identity::handle_join(agent, &self.joins, peer.addr, join).await {
                Ok(accepted) => Response::Joined(accepted),
                Err(e) => Response::Error(e),
            };
        }
        let Some(cert) = &peer.cert else {
            return Response::Error(unauthorized(
                "a client certificate signed by the cluster CA is required; use the admin credentials from the agent's data dir",
            ));
        };
        if agent.state().read(|s| s.is_revoked(&cert.serial)) {
            tracing::warn!(peer = %peer.addr, serial = %cert.serial, "refused revoked certificate");
            return Response::Error(unauthorized(format!(
                "certificate {} was revoked (its member was removed)",
                cert.serial
            )));
        }
        if let Some(why) = not_pinned(agent, cert) {
            tracing::warn!(peer = %peer.addr, "refused: {why}");
            return Response::Error(unauthorized(why));
        }
        match request {
            Request::Join(_) => {
                Response::Error(ApiError::new(ErrorKind::Internal, "join handled above"))
            }
            Request::Upload(_) | Request::Transfer(_) | Request::Relay(_) => Response::Error(
                ApiError::new(ErrorKind::BadRequest, "a transfer must open a channel"),
            ),
            Request::Ping => Response::Pong {
                id: agent.id(),
                name: agent.name().to_string(),
            },
            Request::Raft(raft) => match check_raft_sender(agent, cert, &raft) {
                Ok(()) => Response::Raft(raft.handle(agent.raft()).await),
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

    fn frame_cap(&self, peer: &Peer) -> usize {
        match peer.cert {
            Some(_) => ferry_transport::frame::MAX_FRAME,
            None => ANONYMOUS_FRAME_CAP,
        }
    }

    /// Gossip: only from certified, unrevoked members of this cluster.
    fn handle_datagram(&self, peer: &Arc<Peer>, data: bytes::Bytes) {
        let gossip = self.agent.gossip();
        let Some(cert) = &peer.cert else {
            gossip.refuse(&peer.addr.to_string(), "no client certificate");
            return;
        };
        let Identity::Node(name) = &cert.identity else {
            gossip.refuse(&cert.identity.to_string(), "not a node certificate");
            return;
        };
        if self.agent.state().read(|s| s.is_revoked(&cert.serial)) {
            gossip.refuse(name, "certificate revoked (member removed)");
            return;
        }
        if let Some(why) = not_pinned(&self.agent, cert) {
            gossip.refuse(name, &why);
            return;
        }
        match self.agent.member_id(name) {
            Some(id) => gossip.deliver(id, data),
            None => gossip.refuse(name, "not a member (yet)"),
        }
    }

    fn wants_stream(&self, request: &Request) -> bool {
        matches!(
            request,
            Request::Upload(_) | Request::Transfer(_) | Request::Relay(_)
        )
    }

    async fn handle_stream(
        &self,
        peer: Arc<Peer>,
        request: Request,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let agent = &self.agent;
        match (member_cert(agent, peer.cert.as_ref()), request) {
            (Some(_), Request::Upload(upload)) => {
                instances::upload::receive_upload(agent, upload, send, recv).await
            }
            (Some(name), Request::Transfer(transfer)) => {
                migration::serve_transfer(agent, name, transfer, (send, recv)).await
            }
            (Some(name), Request::Relay(relay)) => {
                migration::serve_relay(agent, name, relay, (send, recv)).await
            }
            _ => {
                let reply =
                    Response::Error(unauthorized("only members may open transfer channels"));
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

/// A member may only speak Raft as itself: the node id it claims must
/// belong to the name in its certificate.
fn check_raft_sender(
    agent: &Agent,
    cert: &PeerCert,
    request: &RaftRequest,
) -> Result<(), ApiError> {
    let Identity::Node(name) = &cert.identity else {
        return Err(unauthorized(
            "only member certificates may send Raft traffic",
        ));
    };
    let claimed = request.claimed_sender();
    let consistent = match (agent.member_name(claimed), agent.member_id(name)) {
        (Some(n), _) => &n == name,
        (None, Some(id)) => id == claimed,
        // A member we know nothing about yet (our log is behind).
        (None, None) => true,
    };
    if consistent {
        Ok(())
    } else {
        Err(unauthorized(format!(
            "certificate of member '{name}' used to speak for node {claimed}"
        )))
    }
}

async fn handle_api(
    agent: &Arc<Agent>,
    cert: &PeerCert,
    api: ApiRequest,
) -> Result<ApiReply, ApiError> {
    use membership::handlers as cluster;
    use migration::jobs;
    let from_member = matches!(cert.identity, Identity::Node(_));
    match api {
        ApiRequest::ClusterList => Ok(ApiReply::Members(cluster::member_views(agent))),
        ApiRequest::ClusterShow { name } => cluster::show_member(agent, &name),
        ApiRequest::TokenCreate { name, ttl_secs } => {
            cluster::create_token(agent, name, ttl_secs).await
        }
        ApiRequest::TokenList => Ok(ApiReply::Tokens(cluster::token_views(agent))),
        ApiRequest::TokenRevoke { name } => cluster::revoke_token(agent, name).await,
        ApiRequest::Remove { name, force } => cluster::remove_member(agent, &name, force).await,
        ApiRequest::Write(command) if from_member => {
            let (result, index) = agent.write_indexed(command).await?;
            Ok(ApiReply::Written { result, index })
        }
        ApiRequest::Removed if from_member => Ok(cluster::removed_notice(agent)),
        ApiRequest::ForwardedJoin(join) if from_member => identity::signed_join(agent, join).await,
        ApiRequest::CaKey => match &cert.identity {
            Identity::Node(name) => identity::hand_over_ca_key(agent, name),
            _ => Err(unauthorized("only voters hold the CA key")),
        },
        ApiRequest::Move(request) => jobs::start_move(agent, request).await,
        ApiRequest::JobList => Ok(jobs::list(agent)),
        ApiRequest::JobShow { id } if hosts::is_host_job(agent, id) => hosts::show(agent, id),
        ApiRequest::JobShow { id } => jobs::show(agent, id).await,
        ApiRequest::JobProgress { id } => Ok(ApiReply::Progress(agent.transfers().get(id))),
        ApiRequest::JobTargetRuns { id } if from_member => jobs::target_runs(agent, id).await,
        ApiRequest::JobAbort { id } if hosts::is_host_job(agent, id) => {
            hosts::abort(agent, id).await
        }
        ApiRequest::JobAbort { id } => jobs::abort(agent, id).await,
        ApiRequest::Cordon { name, cordoned } => hosts::cordon(agent, &name, cordoned).await,
        ApiRequest::Evacuate(request) => hosts::evacuate(agent, request).await,
        ApiRequest::Restore { member, dry_run } => hosts::restore(agent, &member, dry_run).await,
        ApiRequest::HostJobList => Ok(hosts::list(agent)),
        ApiRequest::Upgrade(request) => hosts::start_upgrade(agent, request).await,
        ApiRequest::ResumeUpgrade { id } => hosts::resume_upgrade(agent, id).await,
        ApiRequest::Placement { instance, stateful } => {
            hosts::placement(agent, instance.as_deref(), stateful)
        }
        ApiRequest::Launch(request) => instances::launch::launch(agent, request).await,
        ApiRequest::InstanceList => Ok(instances::list(agent)),
        ApiRequest::Network => Ok(crate::network::show(agent)),
        ApiRequest::Events { after, wait_ms } => {
            let wait = std::time::Duration::from_millis(wait_ms);
            Ok(crate::monitor::events(agent, after, wait).await)
        }
        ApiRequest::InstanceShow { name } => instances::show(agent, &name),
        ApiRequest::Instance {
            name,
            op,
            forwarded,
        } => instances::ops::operate(agent, &name, op, forwarded).await,
        ApiRequest::Write(_)
        | ApiRequest::Removed
        | ApiRequest::ForwardedJoin(_)
        | ApiRequest::JobTargetRuns { .. } => {
            Err(unauthorized("only members may send internal requests"))
        }
    }
}
