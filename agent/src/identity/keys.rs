//! Who keeps the CA key and which certificates the cluster records: the
//! key follows the Raft membership (fetched from another voter on
//! promotion, forgotten on demotion, handed only to voters), and the
//! bootstrap and admin records are committed until they are.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ferry_raft::{ClusterConfig, Command, NodeId};
use ferry_transport::pki;

use super::duty::{self, KeyDuty};
use crate::api::{ApiError, ApiReply, ApiRequest, ErrorKind, Request};
use crate::clock::now_ms;
use crate::node::write::WRITE_DEADLINE;
use crate::node::Agent;

/// How soon a failed key fetch is tried again.
const FETCH_RETRY: Duration = Duration::from_secs(1);

fn membership(agent: &Agent) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
    let metrics = agent.raft().metrics();
    let m = metrics.borrow();
    let membership = m.membership_config.membership();
    (
        membership.voter_ids().collect(),
        membership.learner_ids().collect(),
    )
}

/// Keep the CA key exactly while this member is a voter, for the life of
/// the agent.
pub async fn keep_ca_key(agent: Arc<Agent>) {
    let mut metrics = agent.raft().metrics();
    let mut last_error = String::new();
    loop {
        let (voters, learners) = membership(&agent);
        let role = duty::role_in(agent.id(), &voters, &learners);
        let retry = match duty::key_duty(role, agent.keyring().holds_key()) {
            KeyDuty::Fetch => match fetch_ca_key(&agent).await {
                Ok(()) => {
                    tracing::info!("this member is a voter: it now holds the CA key");
                    false
                }
                Err(e) => {
                    if e != last_error {
                        tracing::warn!("cannot fetch the CA key from a voter yet: {e}");
                        last_error = e;
                    }
                    true
                }
            },
            KeyDuty::Forget => {
                forget_ca_key(&agent, "this member is no longer a voter");
                false
            }
            KeyDuty::Keep => false,
        };
        if retry {
            let _ = tokio::time::timeout(FETCH_RETRY, metrics.changed()).await;
        } else if metrics.changed().await.is_err() {
            return;
        }
    }
}

async fn fetch_ca_key(agent: &Agent) -> Result<(), String> {
    let request = Request::Api(ApiRequest::CaKey);
    let key_pem = match agent.call_voters(&request, WRITE_DEADLINE).await {
        Ok(ApiReply::CaKey { key_pem }) => key_pem,
        Ok(_) => return Err("a voter answered with an unexpected reply".into()),
        Err(e) => return Err(e.to_string()),
    };
    agent
        .keyring()
        .install(&key_pem)
        .map_err(|e| format!("the key a voter sent does not fit the CA: {e}"))?;
    agent
        .data_dir()
        .save_ca_key(&key_pem)
        .map_err(|e| e.to_string())
}

/// Drop the CA key from memory and from the data dir.
pub fn forget_ca_key(agent: &Agent, why: &str) {
    agent.keyring().forget();
    match agent.data_dir().remove_ca_key() {
        Ok(()) => tracing::info!("{why}: forgot the CA key"),
        Err(e) => tracing::error!("{why}, but the CA key stays on disk: {e}"),
    }
}

/// A voter's answer to another member asking for the CA key: only a
/// member this node's membership lists as a voter gets it.
pub fn hand_over_ca_key(agent: &Agent, caller: &str) -> Result<ApiReply, ApiError> {
    let (voters, _) = membership(agent);
    let is_voter = agent
        .member_id(caller)
        .is_some_and(|id| duty::may_hold_key(id, &voters));
    if !is_voter {
        tracing::warn!(member = caller, "refused the CA key to a non-voter");
        return Err(ApiError::new(
            ErrorKind::Unauthorized,
            format!("only voters hold the CA key, and {caller} is not a voter here"),
        ));
    }
    let ca = agent.keyring().signer().ok_or_else(|| {
        ApiError::new(
            ErrorKind::Unavailable,
            format!("{} holds no CA key (yet)", agent.name()),
        )
    })?;
    Ok(ApiReply::CaKey {
        key_pem: ca.key_pem().to_string(),
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
                    ca_fingerprint: agent.keyring().fingerprint(),
                    subnet: agent.tuning().cluster_subnet,
                    job_history: agent.tuning().job_history,
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
