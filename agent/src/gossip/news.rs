//! What rides on gossip besides membership: each agent's load facts, and
//! "I suspect X" notes that shorten suspicion elsewhere. foca re-sends a
//! piece of news a bounded number of times and drops it once newer news
//! with the same key replaces it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use ferry_raft::NodeId;
use ferry_transport::codec::{decode, CodecError};
use foca::Incarnation;
use serde::{Deserialize, Serialize};

use super::identity::GossipId;

/// Fast-changing figures of one agent, too frequent for Raft.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadFacts {
    pub node: NodeId,
    /// Grows with every report of this agent run; with `started_ms`, orders
    /// reports across restarts.
    pub started_ms: u64,
    pub seq: u64,
    pub memory_free_bytes: u64,
    /// Free disk on the data dir's filesystem above the agent's reserve:
    /// what instance data may still take there.
    pub disk_room_bytes: u64,
    /// 1, 5 and 15 minute load averages.
    pub load_average: [f32; 3],
    pub running_instances: u32,
    pub agent_version: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum News {
    Load(LoadFacts),
    Suspect {
        by: NodeId,
        of: NodeId,
        incarnation: Incarnation,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NewsKey {
    Load {
        node: NodeId,
        version: (u64, u64),
    },
    Suspect {
        by: NodeId,
        of: NodeId,
        incarnation: Incarnation,
    },
}

impl foca::Invalidates for NewsKey {
    fn invalidates(&self, other: &Self) -> bool {
        match (self, other) {
            (
                NewsKey::Load { node, version },
                NewsKey::Load {
                    node: n,
                    version: v,
                },
            ) => node == n && version >= v,
            (
                NewsKey::Suspect {
                    by,
                    of,
                    incarnation,
                },
                NewsKey::Suspect {
                    by: b,
                    of: o,
                    incarnation: i,
                },
            ) => by == b && of == o && incarnation >= i,
            _ => false,
        }
    }
}

/// Suspicion notes remembered to tell repeats from news.
const SEEN_SUSPICIONS: usize = 1024;

/// What this agent has heard; shared between foca's handler and readers.
#[derive(Debug, Default)]
pub struct NewsBook {
    /// Latest load facts per member, with when they arrived here.
    pub load: BTreeMap<NodeId, (LoadFacts, Instant)>,
    /// Suspicion notes not yet taken by the gossip task.
    pub suspicions: Vec<(NodeId, NodeId, Incarnation)>,
    /// The bump of each member's newest identity, as the gossip task last
    /// saw it. A restarted member starts again at incarnation 0, so notes
    /// are told from repeats per identity: before, the notes of a
    /// member's second failure were taken for repeats of its first, were
    /// neither counted nor passed on, and every suspicion of it waited
    /// out the longest time (bench-gossip: median 3.97 s to dead at 5
    /// members over 15 trials, 1.9 s over the first 3).
    pub identities: BTreeMap<NodeId, u64>,
    /// (by, of, incarnation, bump of `of`'s identity).
    seen: VecDeque<(NodeId, NodeId, Incarnation, u64)>,
}

impl NewsBook {
    /// Record `news`; true when it is new (and so worth passing on).
    pub fn record(&mut self, news: News, now: Instant) -> bool {
        match news {
            News::Load(facts) => {
                let version = (facts.started_ms, facts.seq);
                let newer = self
                    .load
                    .get(&facts.node)
                    .is_none_or(|(known, _)| (known.started_ms, known.seq) < version);
                if newer {
                    self.load.insert(facts.node, (facts, now));
                }
                newer
            }
            News::Suspect {
                by,
                of,
                incarnation,
            } => {
                let bump = self.identities.get(&of).copied().unwrap_or(0);
                let seen = (by, of, incarnation, bump);
                if self.seen.contains(&seen) {
                    return false;
                }
                if self.seen.len() >= SEEN_SUSPICIONS {
                    self.seen.pop_front();
                }
                self.seen.push_back(seen);
                self.suspicions.push((by, of, incarnation));
                true
            }
        }
    }
}

pub fn key_of(news: &News) -> NewsKey {
    match news {
        News::Load(f) => NewsKey::Load {
            node: f.node,
            version: (f.started_ms, f.seq),
        },
        News::Suspect {
            by,
            of,
            incarnation,
        } => NewsKey::Suspect {
            by: *by,
            of: *of,
            incarnation: *incarnation,
        },
    }
}

/// foca's handler for custom broadcasts.
pub struct NewsHandler {
    pub book: Arc<Mutex<NewsBook>>,
}

impl foca::BroadcastHandler<GossipId> for NewsHandler {
    type Key = NewsKey;
    type Error = CodecError;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&GossipId>,
    ) -> Result<Option<NewsKey>, CodecError> {
        let news: News = decode(data)?;
        let key = key_of(&news);
        let fresh = self
            .book
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(news, Instant::now());
        Ok(fresh.then_some(key))
    }
}

#[cfg(test)]
mod tests {
    use foca::Invalidates;

    use super::*;

    fn load(node: NodeId, started_ms: u64, seq: u64) -> News {
        News::Load(LoadFacts {
            node,
            started_ms,
            seq,
            memory_free_bytes: 1,
            disk_room_bytes: 1,
            load_average: [0.0; 3],
            running_instances: 0,
            agent_version: "test".into(),
        })
    }

    #[test]
    fn gossip_news_keeps_only_newer_load_and_counts_each_suspicion_once() {
        let now = Instant::now();
        let mut book = NewsBook::default();
        assert!(book.record(load(1, 100, 1), now));
        assert!(!book.record(load(1, 100, 1), now));
        assert!(!book.record(load(1, 99, 50), now));
        assert!(book.record(load(1, 200, 0), now));
        assert_eq!(book.load[&1].0.started_ms, 200);

        let note = News::Suspect {
            by: 2,
            of: 3,
            incarnation: 0,
        };
        assert!(book.record(note.clone(), now));
        assert!(!book.record(note, now));
        assert_eq!(book.suspicions, vec![(2, 3, 0)]);
    }

    #[test]
    fn gossip_a_note_about_a_restarted_member_is_news_though_its_incarnation_repeats() {
        let now = Instant::now();
        let mut book = NewsBook::default();
        let note = News::Suspect {
            by: 2,
            of: 3,
            incarnation: 0,
        };
        book.identities.insert(3, 100);
        assert!(book.record(note.clone(), now));
        // Member 3 restarted: a new identity, at incarnation 0 again.
        book.identities.insert(3, 200);
        assert!(book.record(note.clone(), now));
        assert!(!book.record(note, now));
        assert_eq!(book.suspicions, vec![(2, 3, 0), (2, 3, 0)]);
    }

    #[test]
    fn gossip_news_newer_load_invalidates_older_of_the_same_member_only() {
        let newer = key_of(&load(1, 100, 2));
        assert!(newer.invalidates(&key_of(&load(1, 100, 1))));
        assert!(!newer.invalidates(&key_of(&load(2, 100, 1))));
        assert!(!key_of(&load(1, 100, 1)).invalidates(&newer));
    }
}
