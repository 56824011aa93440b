//! Membership upkeep (layer 2): the leader keeps the Raft membership in
//! step with the member table (`plan.rs` decides, pure), every agent keeps
//! its host facts current, and the operator's cluster requests
//! (`handlers.rs`).

pub mod handlers;
pub mod plan;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ferry_raft::{Command, Node, NodeId};

use crate::node::Agent;
use plan::{MembershipChange, MembershipView};

/// A learner this close to the leader's last log index may vote.
const CAUGHT_UP_LAG: u64 = 20;

/// While this agent leads, bring the Raft membership in step with the
/// member table.
pub async fn leader_loop(agent: Arc<Agent>) {
    let mut metrics = agent.raft().metrics();
    let mut changes = agent.state().subscribe();
    loop {
        let view = {
            let m = metrics.borrow_and_update();
            // A leader that has voted itself out must stop: openraft
            // 0.9 panics on a membership change from a stepping-down
            // leader.
            let voter = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == agent.id());
            if m.current_leader != Some(agent.id()) || !voter {
                None
            } else {
                Some(membership_view(&agent, &m))
            }
        };
        if let Some(change) = view.as_ref().and_then(plan::plan) {
            tracing::info!(?change, "membership change");
            if let Err(e) = apply_change(&agent, change).await {
                tracing::warn!("membership change failed: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            continue;
        }
        tokio::select! {
            r = metrics.changed() => if r.is_err() { return },
            r = changes.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn caught_up(m: &openraft::RaftMetrics<NodeId, Node>) -> BTreeSet<NodeId> {
    let last = m.last_log_index.unwrap_or(0);
    m.replication
        .as_ref()
        .map(|r| {
            r.iter()
                .filter(|(_, matched)| matched.map_or(0, |l| l.index) + CAUGHT_UP_LAG >= last)
                .map(|(id, _)| *id)
                .collect()
        })
        .unwrap_or_default()
}

fn membership_view(agent: &Agent, m: &openraft::RaftMetrics<NodeId, Node>) -> MembershipView {
    let membership = m.membership_config.membership();
    let (members, removed, desired) = agent.state().read(|s| {
        let members = s
            .members
            .iter()
            .map(|(id, m)| {
                let node = Node {
                    name: m.name.clone(),
                    addr: m.addr.clone(),
                };
                (*id, node)
            })
            .collect();
        let desired = s.config.voters.max(1) as usize;
        (members, s.removed_members.clone(), desired)
    });
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
    let mut dead = BTreeSet::new();
    let mut dead_too_long = BTreeSet::new();
    for id in voters.iter().chain(&learners) {
        if let Some(for_how_long) = agent.gossip().dead_for(*id) {
            dead.insert(*id);
            if voters.contains(id) && for_how_long >= agent.tuning().heal_after {
                dead_too_long.insert(*id);
            }
        }
    }
    MembershipView {
        voters,
        learners,
        members,
        removed,
        desired_voters: desired,
        caught_up: caught_up(m),
        dead,
        dead_too_long,
    }
}

async fn apply_change(agent: &Agent, change: MembershipChange) -> Result<(), String> {
    use openraft::ChangeMembers;
    let raft = agent.raft();
    let result = match change {
        MembershipChange::AddLearner(id, node) => raft.add_learner(id, node, false).await,
        MembershipChange::SetVoters(voters) => {
            raft.change_membership(ChangeMembers::ReplaceAllVoters(voters), false)
                .await
        }
        MembershipChange::RemoveLearners(ids) => {
            raft.change_membership(ChangeMembers::RemoveNodes(ids), false)
                .await
        }
    };
    result.map(|_| ()).map_err(|e| e.to_string())
}

/// Probe host facts and keep the replicated copy current.
pub async fn publish_facts(agent: Arc<Agent>) {
    let mut changes = agent.state().subscribe();
    loop {
        let facts = agent.probe_facts().await;
        loop {
            let (present, same) = agent.state().read(|s| match s.members.get(&agent.id()) {
                Some(m) => (true, m.facts.as_ref() == Some(&facts)),
                None => (false, false),
            });
            if same {
                break;
            }
            if !present {
                // Our member record is not applied here yet.
                if changes.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let command = Command::UpdateFacts {
                id: agent.id(),
                facts: facts.clone(),
            };
            match agent.write(command).await {
                Ok(_) => break,
                Err(e) => tracing::warn!("host facts not published yet: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
}
