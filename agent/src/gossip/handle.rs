//! The agent's handle on gossip (layer 0): the liveness view and the load
//! facts heard, and the inbox of the gossip task. The node handle holds
//! it; the runner (`runner.rs`) feeds it.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_raft::NodeId;
use tokio::sync::mpsc;

use super::identity::GossipId;
use super::news::{LoadFacts, NewsBook};

/// Datagrams and timer events waiting for the gossip task; beyond this,
/// datagrams are dropped (SWIM copes with loss).
const INBOX: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Suspect,
    Dead,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Suspect => "suspect",
            Liveness::Dead => "dead",
        }
    }
}

/// Timings (LAN profile by default).
#[derive(Clone, Debug)]
pub struct GossipConfig {
    /// Each member probes one random member this often.
    pub probe_period: Duration,
    /// Shortest time a suspect has to refute before it is declared dead,
    /// reached once enough other members confirm the suspicion; an
    /// unconfirmed suspicion lasts three times as long.
    pub suspicion: Duration,
    /// How often an agent gossips its load facts.
    pub load_every: Duration,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            probe_period: Duration::from_millis(500),
            suspicion: Duration::from_secs(1),
            load_every: Duration::from_secs(2),
        }
    }
}

impl GossipConfig {
    pub fn suspicion_max(&self) -> Duration {
        self.suspicion * 3
    }

    /// A member not heard of this long after our start counts as dead.
    pub(super) fn grace(&self) -> Duration {
        self.probe_period * 3 + self.suspicion_max()
    }
}

pub(super) enum Input {
    Data { from: NodeId, data: Bytes },
    Timer(foca::Timer<GossipId>),
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Seen {
    pub(super) liveness: Liveness,
    pub(super) since: Instant,
}

#[derive(Debug)]
pub(super) struct View {
    pub(super) started: Instant,
    pub(super) members: BTreeMap<NodeId, Seen>,
}

/// The agent's handle on gossip: feed it datagrams, ask it who is alive.
#[derive(Clone)]
pub struct Gossip {
    me: NodeId,
    pub(super) inbox: mpsc::Sender<Input>,
    pub(super) view: Arc<Mutex<View>>,
    pub(super) book: Arc<Mutex<NewsBook>>,
    refused: Arc<Mutex<HashSet<String>>>,
    pub config: GossipConfig,
}

/// The receiving end, taken by the gossip task.
pub struct GossipInbox(mpsc::Receiver<Input>);

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every holder leaves the data consistent between statements.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Gossip {
    pub fn new(me: NodeId, config: GossipConfig) -> (Gossip, GossipInbox) {
        let (inbox, rx) = mpsc::channel(INBOX);
        let gossip = Gossip {
            me,
            inbox,
            view: Arc::new(Mutex::new(View {
                started: Instant::now(),
                members: BTreeMap::new(),
            })),
            book: Arc::new(Mutex::new(NewsBook::default())),
            refused: Arc::new(Mutex::new(HashSet::new())),
            config,
        };
        (gossip, GossipInbox(rx))
    }

    /// A datagram from member `from` (already checked to be a certified,
    /// unrevoked member).
    pub fn deliver(&self, from: NodeId, data: Bytes) {
        if self.inbox.try_send(Input::Data { from, data }).is_err() {
            tracing::debug!(from, "gossip inbox full; datagram dropped");
        }
    }

    /// Log a refused datagram once per sender and reason.
    pub fn refuse(&self, sender: &str, reason: &str) {
        let first = {
            let mut refused = lock(&self.refused);
            refused.len() < 1024 && refused.insert(format!("{sender}: {reason}"))
        };
        if first {
            tracing::warn!(
                sender,
                "gossip datagram dropped: {reason} (logged once per sender)"
            );
        }
    }

    pub fn liveness(&self, id: NodeId) -> Liveness {
        self.seen(id).liveness
    }

    /// How long `id` has been dead, if it is.
    pub fn dead_for(&self, id: NodeId) -> Option<Duration> {
        let seen = self.seen(id);
        (seen.liveness == Liveness::Dead).then(|| seen.since.elapsed())
    }

    fn seen(&self, id: NodeId) -> Seen {
        let view = lock(&self.view);
        if id == self.me {
            return Seen {
                liveness: Liveness::Alive,
                since: view.started,
            };
        }
        if let Some(seen) = view.members.get(&id) {
            return *seen;
        }
        // Never heard of since we started: give it time to answer first.
        let dead_from = view.started + self.config.grace();
        if Instant::now() < dead_from {
            Seen {
                liveness: Liveness::Suspect,
                since: view.started,
            }
        } else {
            Seen {
                liveness: Liveness::Dead,
                since: dead_from,
            }
        }
    }

    /// Latest load facts of `id` and how old they are.
    pub fn load(&self, id: NodeId) -> Option<(LoadFacts, Duration)> {
        lock(&self.book)
            .load
            .get(&id)
            .map(|(facts, at)| (facts.clone(), at.elapsed()))
    }
}

impl GossipInbox {
    pub(super) async fn recv(&mut self) -> Option<Input> {
        self.0.recv().await
    }
}
