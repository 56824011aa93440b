//! How the leader keeps the Raft membership in step with the member table.
//! Joins and removals only change the replicated member table; the leader
//! then turns the difference into openraft membership changes, one at a
//! time. Planning is pure so the rules have fast tests; the leader loop in
//! `membership/mod.rs` carries the plan out.

use std::collections::{BTreeMap, BTreeSet};

use ferry_raft::{Node, NodeId};

/// What the planner sees.
#[derive(Debug, Default)]
pub struct MembershipView {
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    /// Members in the replicated member table, with their Raft node.
    pub members: BTreeMap<NodeId, Node>,
    /// Members removed on purpose. Only these leave the Raft membership: a
    /// node the member table does not know yet (its record is still being
    /// committed) is not "departed".
    pub removed: BTreeSet<NodeId>,
    /// How many voters the cluster keeps.
    pub desired_voters: usize,
    /// Learners whose log is close enough to the leader's to vote.
    pub caught_up: BTreeSet<NodeId>,
    /// Members gossip sees as dead now; never promoted.
    pub dead: BTreeSet<NodeId>,
    /// Voters dead longer than `--heal-after`: each is swapped for a live,
    /// caught-up learner (it stays a member, as a learner), so the cluster
    /// keeps its full set of voters.
    pub dead_too_long: BTreeSet<NodeId>,
}

/// One membership change for the leader to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    /// Start replicating to a new member.
    AddLearner(NodeId, Node),
    /// Replace the voter set (removing departed voters and promoting
    /// learners in one joint change).
    SetVoters(BTreeSet<NodeId>),
    /// Forget learners that are no longer members.
    RemoveLearners(BTreeSet<NodeId>),
}

pub fn plan(view: &MembershipView) -> Option<MembershipChange> {
    let departed = |id: &NodeId| view.removed.contains(id);

    if let Some((id, node)) = view
        .members
        .iter()
        .find(|(id, _)| !view.voters.contains(id) && !view.learners.contains(id))
    {
        return Some(MembershipChange::AddLearner(*id, node.clone()));
    }

    let staying: BTreeSet<NodeId> = view
        .voters
        .iter()
        .copied()
        .filter(|id| !departed(id))
        .collect();
    let mut voters = staying.clone();
    let desired = view.desired_voters.min(view.members.len());
    let mut spare = view
        .learners
        .iter()
        .filter(|id| view.caught_up.contains(id) && !departed(id) && !view.dead.contains(id));
    for dead in staying.intersection(&view.dead_too_long) {
        // Without a spare the dead voter stays: dropping it alone would
        // shrink the voter set, not heal it.
        let Some(replacement) = spare.next() else {
            break;
        };
        voters.remove(dead);
        voters.insert(*replacement);
    }
    for id in spare {
        if voters.len() >= desired {
            break;
        }
        voters.insert(*id);
    }
    // Never hand openraft an empty voter set; removing the last voter is
    // refused before it gets here.
    if voters != view.voters && !voters.is_empty() {
        return Some(MembershipChange::SetVoters(voters));
    }

    let gone: BTreeSet<NodeId> = view.learners.iter().copied().filter(departed).collect();
    if !gone.is_empty() {
        return Some(MembershipChange::RemoveLearners(gone));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: NodeId) -> Node {
        Node {
            name: format!("n{id}"),
            addr: format!("127.0.0.1:{}", 7000 + id),
        }
    }

    fn view(voters: &[NodeId], learners: &[NodeId], members: &[NodeId]) -> MembershipView {
        MembershipView {
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            members: members.iter().map(|id| (*id, node(*id))).collect(),
            removed: BTreeSet::new(),
            desired_voters: 3,
            caught_up: learners.iter().copied().collect(),
            dead: BTreeSet::new(),
            dead_too_long: BTreeSet::new(),
        }
    }

    #[test]
    fn a_new_member_first_becomes_a_learner() {
        let v = view(&[1], &[], &[1, 2]);
        assert_eq!(plan(&v), Some(MembershipChange::AddLearner(2, node(2))));
    }

    #[test]
    fn caught_up_learners_are_promoted_up_to_the_voter_count() {
        let v = view(&[1], &[2, 3, 4], &[1, 2, 3, 4]);
        assert_eq!(
            plan(&v),
            Some(MembershipChange::SetVoters([1, 2, 3].into()))
        );
    }

    #[test]
    fn a_lagging_learner_is_not_promoted() {
        let mut v = view(&[1], &[2], &[1, 2]);
        v.caught_up.clear();
        assert_eq!(plan(&v), None);
    }

    #[test]
    fn full_voter_set_keeps_later_members_as_learners() {
        let v = view(&[1, 2, 3], &[4, 5], &[1, 2, 3, 4, 5]);
        assert_eq!(plan(&v), None);
    }

    #[test]
    fn removing_a_voter_promotes_a_learner_in_the_same_change() {
        let mut v = view(&[1, 2, 3], &[4, 5], &[1, 2, 4, 5]);
        v.removed.insert(3);
        assert_eq!(
            plan(&v),
            Some(MembershipChange::SetVoters([1, 2, 4].into()))
        );
    }

    #[test]
    fn a_voter_dead_past_heal_after_is_swapped_for_a_live_learner() {
        let mut v = view(&[1, 2, 3], &[4, 5], &[1, 2, 3, 4, 5]);
        v.dead = [3, 4].into();
        v.dead_too_long = [3].into();
        // 4 is dead too, so 5 replaces 3; nobody leaves the member table.
        assert_eq!(
            plan(&v),
            Some(MembershipChange::SetVoters([1, 2, 5].into()))
        );
    }

    #[test]
    fn a_dead_voter_stays_while_no_live_learner_can_replace_it() {
        let mut v = view(&[1, 2, 3], &[4], &[1, 2, 3, 4]);
        v.dead = [3, 4].into();
        v.dead_too_long = [3].into();
        assert_eq!(plan(&v), None);
        // Dead, but not yet for --heal-after: no change either.
        let mut v = view(&[1, 2, 3], &[4], &[1, 2, 3, 4]);
        v.dead = [3].into();
        assert_eq!(plan(&v), None);
    }

    #[test]
    fn a_dead_learner_is_not_promoted() {
        let mut v = view(&[1], &[2, 3], &[1, 2, 3]);
        v.dead = [2].into();
        assert_eq!(plan(&v), Some(MembershipChange::SetVoters([1, 3].into())));
    }

    #[test]
    fn removed_learners_are_dropped() {
        let mut v = view(&[1, 2, 3], &[4, 5], &[1, 2, 3, 4]);
        v.removed.insert(5);
        assert_eq!(plan(&v), Some(MembershipChange::RemoveLearners([5].into())));
    }

    #[test]
    fn bootstrap_node_is_not_removed_before_its_member_record_commits() {
        // Raft knows node 1 before the member table does, and a joiner's
        // record may commit first (this once removed the leader itself).
        let v = view(&[1], &[2], &[2]);
        assert_eq!(plan(&v), None);
        let v = view(&[1], &[], &[]);
        assert_eq!(plan(&v), None);
    }
}
