//! Who a gossip member is: the Raft node id (stable across restarts) and a
//! per-run `bump`. A restarted agent, or one the others declared dead,
//! comes back with a larger bump, and the larger bump wins over the old
//! identity at once instead of waiting for the cluster to forget it.

use std::net::SocketAddr;

use ferry_raft::NodeId;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GossipId {
    pub node: NodeId,
    pub addr: SocketAddr,
    pub bump: u64,
}

impl foca::Identity for GossipId {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        Some(GossipId {
            bump: self.bump.wrapping_add(1),
            ..*self
        })
    }

    fn addr(&self) -> NodeId {
        self.node
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

#[cfg(test)]
mod tests {
    use foca::Identity;

    use super::*;

    #[test]
    fn gossip_renewed_identity_wins_over_the_old_one() {
        let old = GossipId {
            node: 3,
            addr: "127.0.0.1:7000".parse().unwrap(),
            bump: 10,
        };
        let new = old.renew().unwrap();
        assert_eq!(new.addr(), old.addr());
        assert!(new.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&new));
    }
}
