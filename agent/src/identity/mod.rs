//! Who this agent is (layer 2): its identity from the data dir, or a new
//! cluster (bootstrap), or a join by token (here); the member side of a
//! join (`join.rs`); who keeps the CA key and which certificates are
//! recorded (`keys.rs`, deciding with the pure `duty.rs`).

pub mod duty;
mod join;
mod keys;

use std::net::SocketAddr;

use ferry_raft::NodeId;
use ferry_transport::endpoint::{Endpoint, Expect};
use ferry_transport::pki::{self, ClusterCa, Credentials, Identity};
use ferry_transport::rpc::Pool;

use crate::api::{JoinAccepted, JoinRequest, Request, Response};
use crate::datadir::{DataDir, DataDirError, NodeConfig};
use crate::node::write::WRITE_DEADLINE;
use crate::token::{JoinToken, TokenError};

pub use join::{handle_join, signed_join, JoinLimiter};
pub use keys::{
    ensure_bootstrap_records, forget_ca_key, hand_over_ca_key, keep_ca_key, record_admin_cert,
};

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
    let (admin_csr_pem, admin_key_pem) = pki::generate_csr(&Identity::Admin)?;
    let request = Request::Join(JoinRequest {
        name: name.clone(),
        secret: token.secret.clone(),
        addr: addr.to_string(),
        csr_pem,
        admin_csr_pem,
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
            .call::<Request, Response>(member_addr, &expect, &request, JOIN_DEADLINE)
            .await
        {
            Ok(Response::Joined(accepted)) => {
                let joined = Joined {
                    name,
                    addr,
                    key_pem,
                    admin_key_pem,
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

/// How long a joiner waits for the member it asked: longer than that
/// member's own write deadline (it may forward to a voter, which commits
/// within its own), so the member's answer, an error naming the cause,
/// arrives before the joiner gives up on it.
const JOIN_DEADLINE: std::time::Duration = WRITE_DEADLINE.saturating_mul(3);

/// What the joiner knows of itself when the cluster accepts it.
struct Joined {
    name: String,
    addr: SocketAddr,
    key_pem: String,
    admin_key_pem: String,
    voters: u8,
}

fn save_joined(
    dir: &DataDir,
    token: &JoinToken,
    joined: Joined,
    accepted: JoinAccepted,
) -> Result<(NodeConfig, Vec<(NodeId, String)>), IdentityError> {
    if pki::fingerprint_of_pem(&accepted.ca_pem)? != token.ca_fingerprint {
        return Err(IdentityError::Join(
            "the cluster sent a CA that does not match the token".into(),
        ));
    }
    dir.create()?;
    dir.save_ca_cert(&accepted.ca_pem)?;
    dir.save_credentials(
        "admin",
        &Credentials {
            cert_pem: accepted.admin_cert_pem,
            key_pem: joined.admin_key_pem,
            ca_pem: accepted.ca_pem.clone(),
        },
    )?;
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
