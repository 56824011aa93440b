//! What placement (`crate::placement`, pure) needs to know of every
//! member, read from the replicated state and gossip's load facts.

use ferry_raft::ClusterState;

use super::Agent;
use crate::placement::Member;

impl Agent {
    /// Every member as placement sees it now.
    pub fn placement_members(&self) -> Vec<Member> {
        self.state().read(|s| members_of(self, s))
    }
}

fn members_of(agent: &Agent, s: &ClusterState) -> Vec<Member> {
    let upgrade = s.active_upgrade().and_then(|j| j.upgrade.as_ref());
    let upgraded = |id| {
        upgrade
            .and_then(|u| u.member(id))
            .is_some_and(|m| m.stage == ferry_raft::Stage::Done)
    };
    s.members
        .values()
        .map(|m| {
            let load = agent.gossip().load(m.id).map(|(facts, _)| facts);
            Member {
                id: m.id,
                name: m.name.clone(),
                alive: agent.member_alive(m.id),
                cordoned: m.cordoned,
                facts: m.facts.clone(),
                free_memory_bytes: load.as_ref().map(|l| l.memory_free_bytes),
                disk_room_bytes: load.as_ref().map(|l| l.disk_room_bytes),
                load_1m: load.as_ref().map(|l| l.load_average[0]),
                instances: s.instances.values().filter(|i| i.owner == m.id).count() as u32,
                upgraded: upgraded(m.id),
            }
        })
        .collect()
}
