//! Which route each instance address takes on one member (pure): to the
//! bridge where its owner is this member, via the owner's underlay address
//! elsewhere. A move changes the owner at the switch, so every member's
//! route follows the instance as soon as it applies that entry.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ferry_raft::{ClusterState, NodeId};

pub use crate::netdev::RouteTo;

/// The underlay address of a member, from its advertised `IP:port`; none
/// for a loopback one (agents sharing one host cannot route to each other).
pub fn underlay(addr: &str) -> Option<Ipv4Addr> {
    match addr.parse::<SocketAddr>().ok()?.ip() {
        IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_unspecified() => Some(ip),
        _ => None,
    }
}

pub fn desired(state: &ClusterState, me: NodeId) -> BTreeMap<Ipv4Addr, RouteTo> {
    let mut routes = BTreeMap::new();
    for instance in state.instances.values() {
        let Some(ip) = instance.spec.address else {
            continue;
        };
        let to = if instance.owner == me {
            Some(RouteTo::Bridge)
        } else {
            state
                .members
                .get(&instance.owner)
                .and_then(|m| underlay(&m.addr))
                .map(RouteTo::Member)
        };
        if let Some(to) = to {
            routes.insert(ip, to);
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_raft::{Instance, InstanceSpec, Member, NetworkMode};

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for (id, addr) in [
            (1, "198.18.0.1:7000"),
            (2, "198.18.0.2:7000"),
            (3, "127.0.0.1:7003"),
        ] {
            s.members
                .insert(id, Member::online(id, &format!("m{id}"), addr, "serial", 0));
        }
        s
    }

    fn put(s: &mut ClusterState, name: &str, owner: NodeId, address: Option<[u8; 4]>) {
        let spec = InstanceSpec {
            network: NetworkMode::Cluster,
            address: address.map(Ipv4Addr::from),
            ..Default::default()
        };
        let instance = Instance {
            name: name.into(),
            spec,
            owner,
            ..Default::default()
        };
        s.instances.insert(name.into(), instance);
    }

    #[test]
    fn an_address_routes_to_the_bridge_on_its_owner_and_via_the_owner_elsewhere() {
        let mut s = state();
        put(&mut s, "web", 1, Some([198, 18, 100, 2]));
        put(&mut s, "plain", 1, None);
        let web = Ipv4Addr::new(198, 18, 100, 2);
        assert_eq!(desired(&s, 1), BTreeMap::from([(web, RouteTo::Bridge)]));
        let via_one = RouteTo::Member(Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(desired(&s, 2), BTreeMap::from([(web, via_one)]));
        // The switch of a move makes member 2 the owner: both routes follow.
        s.instances.get_mut("web").expect("web").owner = 2;
        assert_eq!(desired(&s, 2)[&web], RouteTo::Bridge);
        assert_eq!(
            desired(&s, 1)[&web],
            RouteTo::Member(Ipv4Addr::new(198, 18, 0, 2))
        );
    }

    #[test]
    fn a_member_on_loopback_gets_no_route() {
        let mut s = state();
        put(&mut s, "web", 3, Some([198, 18, 100, 2]));
        assert!(desired(&s, 1).is_empty());
        assert_eq!(underlay("[::1]:7000"), None);
        assert_eq!(underlay("0.0.0.0:7000"), None);
    }
}
