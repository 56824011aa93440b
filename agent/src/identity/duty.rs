//! Who keeps the cluster CA key (layer 0, pure): only voters. A member
//! promoted to voter fetches it from another voter, a member demoted to
//! learner (or removed) forgets it, and a voter hands it only to a member
//! its own Raft membership lists as a voter.

use std::collections::BTreeSet;

use ferry_raft::NodeId;

/// A member's place in the Raft membership as one node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Voter,
    Learner,
    /// The membership is known and does not list the member.
    Outside,
    /// No membership yet (a joiner before its log caught up, or a
    /// bootstrap node before it initialised Raft).
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyDuty {
    Fetch,
    Forget,
    Keep,
}

pub fn role_in(id: NodeId, voters: &BTreeSet<NodeId>, learners: &BTreeSet<NodeId>) -> Role {
    if voters.contains(&id) {
        Role::Voter
    } else if learners.contains(&id) {
        Role::Learner
    } else if voters.is_empty() && learners.is_empty() {
        Role::Unknown
    } else {
        Role::Outside
    }
}

/// What a member does about the CA key given its role and whether it
/// holds the key now. While the membership is unknown nothing changes: a
/// bootstrap node keeps the key it made.
pub fn key_duty(role: Role, holds_key: bool) -> KeyDuty {
    match (role, holds_key) {
        (Role::Voter, false) => KeyDuty::Fetch,
        (Role::Learner | Role::Outside, true) => KeyDuty::Forget,
        _ => KeyDuty::Keep,
    }
}

/// Whether a voter may hand the key to `caller`.
pub fn may_hold_key(caller: NodeId, voters: &BTreeSet<NodeId>) -> bool {
    voters.contains(&caller)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn roles_come_from_the_membership() {
        let (voters, learners) = (set(&[1, 2]), set(&[3]));
        assert_eq!(role_in(1, &voters, &learners), Role::Voter);
        assert_eq!(role_in(3, &voters, &learners), Role::Learner);
        assert_eq!(role_in(4, &voters, &learners), Role::Outside);
        assert_eq!(role_in(4, &set(&[]), &set(&[])), Role::Unknown);
    }

    #[test]
    fn only_voters_keep_the_key() {
        assert_eq!(key_duty(Role::Voter, false), KeyDuty::Fetch);
        assert_eq!(key_duty(Role::Voter, true), KeyDuty::Keep);
        assert_eq!(key_duty(Role::Learner, true), KeyDuty::Forget);
        assert_eq!(key_duty(Role::Outside, true), KeyDuty::Forget);
        assert_eq!(key_duty(Role::Learner, false), KeyDuty::Keep);
        assert_eq!(key_duty(Role::Unknown, true), KeyDuty::Keep);
        assert_eq!(key_duty(Role::Unknown, false), KeyDuty::Keep);
    }

    #[test]
    fn the_key_goes_only_to_a_voter() {
        let voters = set(&[1, 2]);
        assert!(may_hold_key(2, &voters));
        assert!(!may_hold_key(3, &voters));
    }
}
