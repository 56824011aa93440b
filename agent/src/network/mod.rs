//! The cluster network on this member: `ferry network show`, and the
//! upkeep loop that sets the bridge up once the state has a subnet and
//! keeps this member's routes to every instance in step with the state.

pub mod routes;

use std::sync::Arc;
use std::time::Duration;

use ferry_raft::ClusterState;

use crate::api::network::{LeaseView, NetworkView};
use crate::api::ApiReply;
use crate::node::Agent;

/// Routes are checked against the kernel at least this often, so one
/// removed by hand or a failed change comes back.
const RESYNC_EVERY: Duration = Duration::from_secs(5);

pub fn show(agent: &Agent) -> ApiReply {
    let view = agent.state().read(|s| {
        let subnet = s.config.subnet;
        let mut leases: Vec<LeaseView> = s
            .instances
            .values()
            .filter_map(|i| {
                Some(LeaseView {
                    address: i.spec.address?.to_string(),
                    instance: i.name.clone(),
                    member: s
                        .members
                        .get(&i.owner)
                        .map_or_else(|| format!("node-{}", i.owner), |m| m.name.clone()),
                })
            })
            .collect();
        leases.sort_by_key(|l| l.address.parse::<std::net::Ipv4Addr>().ok());
        NetworkView {
            subnet: subnet.map(|n| n.to_string()),
            gateway: subnet.map(|n| n.gateway().to_string()),
            capacity: subnet.map_or(0, |n| n.capacity()),
            leases,
        }
    });
    ApiReply::Network(view)
}

/// Runs for the agent's life; idle while the cluster has no network.
pub async fn upkeep(agent: Arc<Agent>) {
    let mut watch = agent.state().watch();
    let mut bridge_ready = false;
    loop {
        let (subnet, desired) = agent
            .state()
            .read(|s| (s.config.subnet, routes::desired(s, agent.id())));
        if let Some(subnet) = subnet {
            if !bridge_ready {
                match crate::netdev::ensure_bridge(&subnet).await {
                    Ok(()) => {
                        tracing::info!(%subnet, bridge = crate::netdev::BRIDGE, "cluster network ready");
                        bridge_ready = true;
                    }
                    Err(e) => tracing::warn!("cannot set up the cluster network: {e}"),
                }
            }
            if bridge_ready {
                match crate::netdev::sync_routes(&desired).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(changed = n, "instance routes updated"),
                    Err(e) => tracing::warn!("cannot update the instance routes: {e}"),
                }
            }
        }
        let routes_changed = |a: &ClusterState, b: &ClusterState| {
            !a.instances.ptr_eq(&b.instances)
                || !a.members.ptr_eq(&b.members)
                || a.config != b.config
        };
        if !watch.changed(RESYNC_EVERY, routes_changed).await {
            return;
        }
    }
}
