//! How the CLI reaches an agent: the address and admin credentials from
//! the data dir, a mutually authenticated QUIC connection, one request.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ferry_transport::endpoint::{Endpoint, Expect};
use ferry_transport::rpc::Pool;

use crate::api::{ApiError, ApiReply, ApiRequest, Request, Response};
use crate::datadir::DataDir;

/// Covers a write waiting out an election on the agent's side.
const API_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no agent address in {0}/api.json; is 'ferry agent' running with this --data-dir? (or pass --agent ADDR)")]
    NoAgent(String),
    #[error("cannot read the admin credentials in {dir}: {reason}; run the CLI as a user who can read the agent's data dir")]
    Credentials { dir: String, reason: String },
    #[error("bad agent address '{0}'; expected IP:port")]
    BadAddress(String),
    #[error("cannot reach the ferry agent at {addr}: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error("the agent answered with an unexpected reply")]
    Unexpected,
}

pub struct Client {
    pool: Pool,
    addr: SocketAddr,
    expect: Expect,
}

impl Client {
    pub fn connect(data_dir: &Path, agent: Option<&str>) -> Result<Client, ClientError> {
        let dir = DataDir::new(data_dir);
        let root = data_dir.display().to_string();
        let (addr_text, expect) = match agent {
            Some(addr) => (addr.to_string(), Expect::AnyNode),
            None => {
                let info = dir
                    .api_info()
                    .ok()
                    .flatten()
                    .ok_or_else(|| ClientError::NoAgent(root.clone()))?;
                (info.address, Expect::Node(info.name))
            }
        };
        let addr: SocketAddr = addr_text
            .parse()
            .map_err(|_| ClientError::BadAddress(addr_text.clone()))?;
        let creds = dir
            .load_credentials("admin")
            .map_err(|e| ClientError::Credentials {
                dir: root.clone(),
                reason: e.to_string(),
            })?;
        let bind = if addr.is_ipv6() {
            SocketAddr::from(([0u16; 8], 0))
        } else {
            SocketAddr::from(([0, 0, 0, 0], 0))
        };
        let endpoint =
            Endpoint::client(bind, Some(&creds)).map_err(|e| ClientError::Unreachable {
                addr,
                reason: e.to_string(),
            })?;
        Ok(Client {
            pool: Pool::new(endpoint),
            addr,
            expect,
        })
    }

    pub async fn call(&self, request: ApiRequest) -> Result<ApiReply, ClientError> {
        let response = self
            .pool
            .call::<Request, Response>(self.addr, &self.expect, &Request::Api(request), API_TIMEOUT)
            .await
            .map_err(|e| ClientError::Unreachable {
                addr: self.addr,
                reason: e.to_string(),
            })?;
        match response {
            Response::Api(reply) => Ok(reply),
            Response::Error(e) => Err(ClientError::Api(e)),
            _ => Err(ClientError::Unexpected),
        }
    }
}
