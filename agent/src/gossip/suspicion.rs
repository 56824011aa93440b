//! Suspicion that shrinks with confirmations (Lifeguard, as in memberlist):
//! a suspect that nobody else has suspected gets the longest time to refute;
//! each other member that independently suspects it shortens the time,
//! down to the minimum once the expected number have. foca itself only has
//! one fixed timeout, so it is set to the maximum and this module declares
//! a member down sooner.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ferry_raft::NodeId;
use foca::Incarnation;

/// The time a suspect gets with `confirmations` independent suspicions
/// besides ours, when `expected` of them bring it down to `min`.
pub fn timeout(min: Duration, max: Duration, expected: u32, confirmations: u32) -> Duration {
    if expected == 0 || max <= min {
        return min;
    }
    let done = f64::from(confirmations.min(expected));
    let fraction = (done + 1.0).ln() / (f64::from(expected) + 1.0).ln();
    let span = (max - min).as_secs_f64();
    min + Duration::from_secs_f64(span * (1.0 - fraction))
}

#[derive(Debug)]
struct Suspicion {
    incarnation: Incarnation,
    since: Instant,
    confirmers: BTreeSet<NodeId>,
}

/// Open suspicions, by suspected member.
#[derive(Debug, Default)]
pub struct Suspicions {
    open: BTreeMap<NodeId, Suspicion>,
}

impl Suspicions {
    /// We see `node` as suspect at `incarnation` (a refutation raises the
    /// incarnation; a new suspicion of it starts afresh).
    pub fn suspect(&mut self, node: NodeId, incarnation: Incarnation, now: Instant) {
        let fresh = self
            .open
            .get(&node)
            .is_none_or(|s| s.incarnation < incarnation);
        if fresh {
            self.open.insert(
                node,
                Suspicion {
                    incarnation,
                    since: now,
                    confirmers: BTreeSet::new(),
                },
            );
        }
    }

    /// Member `by` told that it suspects `node` at `incarnation`.
    pub fn confirm(&mut self, node: NodeId, incarnation: Incarnation, by: NodeId, now: Instant) {
        self.suspect(node, incarnation, now);
        if let Some(s) = self.open.get_mut(&node) {
            if s.incarnation == incarnation {
                s.confirmers.insert(by);
            }
        }
    }

    /// `node` is no longer suspect (alive again, or down).
    pub fn clear(&mut self, node: NodeId) {
        self.open.remove(&node);
    }

    #[cfg(test)]
    pub fn is_open(&self, node: NodeId) -> bool {
        self.open.contains_key(&node)
    }

    /// Suspects whose time ran out at `now`.
    pub fn expired(
        &self,
        now: Instant,
        min: Duration,
        max: Duration,
        expected: u32,
    ) -> Vec<(NodeId, Incarnation)> {
        self.open
            .iter()
            .filter(|(_, s)| {
                let confirmations = u32::try_from(s.confirmers.len()).unwrap_or(u32::MAX);
                now.duration_since(s.since) >= timeout(min, max, expected, confirmations)
            })
            .map(|(node, s)| (*node, s.incarnation))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(2);
    const MAX: Duration = Duration::from_secs(6);

    #[test]
    fn gossip_suspicion_shrinks_with_each_confirmation_down_to_the_minimum() {
        let times: Vec<Duration> = (0..5).map(|c| timeout(MIN, MAX, 3, c)).collect();
        assert_eq!(times[0], MAX);
        assert!(times[1] < times[0] && times[2] < times[1] && times[3] < times[2]);
        assert_eq!(times[3], MIN);
        assert_eq!(times[4], MIN);
        // Nobody else to confirm: the minimum applies at once.
        assert_eq!(timeout(MIN, MAX, 0, 0), MIN);
    }

    #[test]
    fn gossip_confirmed_suspect_expires_before_an_unconfirmed_one() {
        let start = Instant::now();
        let mut s = Suspicions::default();
        s.suspect(1, 0, start);
        s.suspect(2, 0, start);
        for by in [7, 8, 9] {
            s.confirm(2, 0, by, start);
        }
        let at = |secs| start + Duration::from_secs(secs);
        assert!(s.expired(at(1), MIN, MAX, 3).is_empty());
        assert_eq!(s.expired(at(2), MIN, MAX, 3), vec![(2, 0)]);
        assert_eq!(s.expired(at(6), MIN, MAX, 3), vec![(1, 0), (2, 0)]);
    }

    #[test]
    fn gossip_refutation_restarts_the_suspicion_and_old_confirmations_do_not_count() {
        let start = Instant::now();
        let mut s = Suspicions::default();
        s.suspect(1, 0, start);
        s.confirm(1, 0, 7, start);
        s.clear(1);
        assert!(!s.is_open(1));
        let later = start + Duration::from_secs(5);
        s.suspect(1, 1, later);
        // A late confirmation of the refuted incarnation.
        s.confirm(1, 0, 8, later);
        assert!(s.expired(later + MIN, MIN, MAX, 1).is_empty());
        assert_eq!(s.expired(later + MAX, MIN, MAX, 1), vec![(1, 1)]);
    }
}
