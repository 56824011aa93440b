//! The gossip task: owns foca, turns its output into datagrams and timers,
//! keeps foca's member list in step with the Raft member table, and
//! publishes liveness and load to the [`Gossip`] handle.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_raft::NodeId;
use foca::{AccumulatingRuntime, Codec, Foca, Incarnation, Member, OwnedNotification, State};
use rand::SeedableRng;

use super::codec::GossipCodec;
use super::handle::{lock, Gossip, GossipConfig, GossipInbox, Input, Liveness, Seen};
use super::identity::GossipId;
use super::news::{LoadFacts, News, NewsHandler};
use super::suspicion::Suspicions;
use crate::clock::now_ms;
use crate::node::Agent;

type Swim = Foca<GossipId, GossipCodec, rand::rngs::StdRng, NewsHandler>;
type Runtime = AccumulatingRuntime<GossipId>;

/// Below quinn's datagram limit on a 1200-byte path (about 1178 bytes).
const MAX_PACKET: usize = 1100;
/// How often the task looks at the Raft member table, suspicion deadlines
/// and the load report clock.
const TICK: Duration = Duration::from_millis(100);
/// A member foca does not know yet is announced to at most this often.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);

fn foca_config(config: &GossipConfig, members: usize) -> foca::Config {
    let size = NonZeroU32::new(u32::try_from(members.max(1)).unwrap_or(u32::MAX))
        .unwrap_or(NonZeroU32::MIN);
    let mut c = foca::Config::new_lan(size);
    c.probe_period = config.probe_period;
    c.probe_rtt = (config.probe_period * 2 / 5).max(Duration::from_millis(1));
    // Our own suspicion tracking declares confirmed suspects dead sooner.
    c.suspect_to_down_after = config.suspicion_max();
    c.max_packet_size = NonZeroUsize::new(MAX_PACKET).unwrap_or(NonZeroUsize::MIN);
    // A healed partition or a resumed agent is found again within seconds.
    c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
        frequency: config.probe_period * 3,
        num_members: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
    });
    c
}

/// Other members whose suspicion brings a suspect to the minimum time.
fn expected_confirmations(members: usize) -> u32 {
    u32::try_from(members.saturating_sub(2).min(3)).unwrap_or(3)
}

fn rng() -> rand::rngs::StdRng {
    let mut seed = [0u8; 8];
    // Only the order of probes depends on it; a fixed seed would still work.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
    rand::rngs::StdRng::seed_from_u64(u64::from_le_bytes(seed))
}

struct Task {
    agent: Arc<Agent>,
    gossip: Gossip,
    swim: Swim,
    rt: Runtime,
    suspicions: Suspicions,
    members: usize,
    announced: HashMap<NodeId, Instant>,
    started_ms: u64,
    seq: u64,
    next_load: Instant,
    /// Members whose undecodable gossip was logged already.
    bad_senders: BTreeSet<NodeId>,
}

pub(crate) async fn run(agent: Arc<Agent>, mut inbox: GossipInbox) {
    let gossip = agent.gossip().clone();
    let started_ms = now_ms();
    let me = GossipId {
        node: agent.id(),
        addr: agent.addr(),
        bump: started_ms,
    };
    let members = agent.state().read(|s| s.members.len());
    let swim = Foca::with_custom_broadcast(
        me,
        foca_config(&gossip.config, members),
        rng(),
        GossipCodec,
        NewsHandler {
            book: gossip.book.clone(),
        },
    );
    let mut task = Task {
        agent,
        gossip,
        swim,
        rt: Runtime::new(),
        suspicions: Suspicions::default(),
        members,
        announced: HashMap::new(),
        started_ms,
        seq: 0,
        next_load: Instant::now(),
        bad_senders: BTreeSet::new(),
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            input = inbox.recv() => match input {
                Some(Input::Data { from, data }) => task.on_data(from, &data),
                Some(Input::Timer(timer)) => {
                    if let Err(e) = task.swim.handle_timer(timer, &mut task.rt) {
                        tracing::debug!("gossip timer: {e}");
                    }
                }
                None => return,
            },
            _ = tick.tick() => task.on_tick().await,
        }
        task.flush();
        task.observe();
    }
}

impl Task {
    fn on_data(&mut self, from: NodeId, data: &[u8]) {
        // The certificate says who sent it; the packet must not claim to be
        // someone else.
        let claimed = GossipCodec.decode_header(data).map(|h| h.src.node);
        let result = match claimed {
            Ok(node) if node == from => self.swim.handle_data(data, &mut self.rt),
            Ok(node) => {
                self.gossip.refuse(
                    &format!("member {from}"),
                    &format!("packet claims to come from member {node}"),
                );
                return;
            }
            Err(e) => Err(foca::Error::Decode(Box::new(e))),
        };
        match result {
            Ok(()) | Err(foca::Error::DataFromOurselves) => {}
            Err(e) => {
                if self.bad_senders.insert(from) {
                    tracing::warn!(
                        from,
                        "gossip from member {from} dropped: {e} (logged once per member)"
                    );
                } else {
                    tracing::debug!(from, "gossip dropped: {e}");
                }
            }
        }
    }

    async fn on_tick(&mut self) {
        self.sync_members();
        if Instant::now() >= self.next_load {
            self.next_load = Instant::now() + self.gossip.config.load_every;
            self.publish_load().await;
        }
        let now = Instant::now();
        let notes = std::mem::take(&mut lock(&self.gossip.book).suspicions);
        for (by, of, incarnation) in notes {
            if by != self.agent.id() && self.is_suspect(of, incarnation) {
                self.suspicions.confirm(of, incarnation, by, now);
            }
        }
        let config = &self.gossip.config;
        let expired = self.suspicions.expired(
            now,
            config.suspicion,
            config.suspicion_max(),
            expected_confirmations(self.members),
        );
        for (node, incarnation) in expired {
            self.suspicions.clear(node);
            if let Some(id) = self.current(node).map(|m| *m.id()) {
                tracing::info!(node, "suspicion confirmed; declaring member {node} dead");
                let down = Member::new(id, incarnation, State::Down);
                if let Err(e) = self
                    .swim
                    .apply_many(std::iter::once(down), true, &mut self.rt)
                {
                    tracing::debug!("declaring {node} dead: {e}");
                }
            }
        }
    }

    /// foca's newest knowledge of `node` (the identity with the highest bump).
    fn current(&self, node: NodeId) -> Option<&Member<GossipId>> {
        self.swim
            .iter_membership_state()
            .filter(|m| m.id().node == node)
            .max_by_key(|m| m.id().bump)
    }

    fn is_suspect(&self, node: NodeId, incarnation: Incarnation) -> bool {
        self.current(node)
            .is_some_and(|m| m.state() == State::Suspect && m.incarnation() == incarnation)
    }

    /// Announce ourselves to members foca has not met (new joiners, or all
    /// of them right after our start); forget members removed for good.
    fn sync_members(&mut self) {
        let (members, removed) = self.agent.state().read(|s| {
            let members: Vec<(NodeId, String)> =
                s.members.values().map(|m| (m.id, m.addr.clone())).collect();
            (members, s.removed_members.clone())
        });
        if members.len() != self.members {
            self.members = members.len();
            let config = foca_config(&self.gossip.config, self.members);
            if let Err(e) = self.swim.set_config(config) {
                tracing::debug!("gossip config not updated: {e}");
            }
        }
        let known: BTreeSet<NodeId> = self
            .swim
            .iter_membership_state()
            .map(|m| m.id().node)
            .collect();
        let now = Instant::now();
        for (id, addr) in members {
            if id == self.agent.id() || known.contains(&id) {
                continue;
            }
            let due = self
                .announced
                .get(&id)
                .is_none_or(|at| now.duration_since(*at) >= ANNOUNCE_EVERY);
            let Ok(addr) = addr.parse() else { continue };
            if due {
                self.announced.insert(id, now);
                let dst = GossipId {
                    node: id,
                    addr,
                    bump: 0,
                };
                if let Err(e) = self.swim.announce(dst, &mut self.rt) {
                    tracing::debug!("announce to {id}: {e}");
                }
            }
        }
        let gone: Vec<Member<GossipId>> = self
            .swim
            .iter_membership_state()
            .filter(|m| removed.contains(&m.id().node) && m.state() != State::Down)
            .map(|m| Member::new(*m.id(), m.incarnation(), State::Down))
            .collect();
        if !gone.is_empty() {
            if let Err(e) = self.swim.apply_many(gone.into_iter(), true, &mut self.rt) {
                tracing::debug!("forgetting removed members: {e}");
            }
        }
    }

    async fn publish_load(&mut self) {
        let (memory_free_bytes, load_average) = tokio::task::spawn_blocking(read_proc_load)
            .await
            .unwrap_or((0, [0.0; 3]));
        let reserve = self.agent.reserve();
        let disk_room_bytes = tokio::task::spawn_blocking(move || reserve.room().unwrap_or(0))
            .await
            .unwrap_or(0);
        let me = self.agent.id();
        let running_instances = self.agent.state().read(|s| {
            s.instances
                .values()
                .filter(|i| {
                    i.owner == me && i.observed == ferry_raft::instances::ObservedState::Running
                })
                .count()
        });
        self.seq += 1;
        let news = News::Load(LoadFacts {
            node: me,
            started_ms: self.started_ms,
            seq: self.seq,
            memory_free_bytes,
            disk_room_bytes,
            load_average,
            running_instances: u32::try_from(running_instances).unwrap_or(u32::MAX),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        });
        self.add_news(&news);
    }

    fn add_news(&mut self, news: &News) {
        match ferry_transport::codec::encode(news) {
            Ok(bytes) => {
                if let Err(e) = self.swim.add_broadcast(&bytes) {
                    tracing::debug!("gossip news not queued: {e}");
                }
            }
            Err(e) => tracing::debug!("gossip news not encoded: {e}"),
        }
    }

    /// Hand foca's output to the network, the timer wheel and the log.
    fn flush(&mut self) {
        while let Some((to, data)) = self.rt.to_send() {
            let Some(name) = self.agent.member_name(to.node) else {
                continue;
            };
            if let Err(e) = self.agent.pool().send_datagram(
                to.addr,
                &self.agent.expect_member(to.node, &name),
                data,
            ) {
                tracing::trace!("gossip to {}: {e}", to.node);
            }
        }
        while let Some((after, timer)) = self.rt.to_schedule() {
            let inbox = self.gossip.inbox.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = inbox.send(Input::Timer(timer)).await;
            });
        }
        let mut probe_failed = Vec::new();
        while let Some(notification) = self.rt.to_notify() {
            match notification {
                OwnedNotification::MemberUp(id) => {
                    tracing::info!(node = id.node, "gossip: member {} is up", id.node)
                }
                OwnedNotification::MemberDown(id) => {
                    tracing::warn!(node = id.node, "gossip: member {} is down", id.node)
                }
                OwnedNotification::Rejoin(id) => {
                    tracing::info!("gossip: others saw us as down; rejoined as {id:?}")
                }
                OwnedNotification::Idle => tracing::debug!("gossip: no active members"),
                OwnedNotification::Defunct => {
                    tracing::warn!("gossip: the cluster declared us down")
                }
                OwnedNotification::ProbeFailed(_, id) => {
                    self.agent.metrics().probe_failed();
                    probe_failed.push(id.node)
                }
                _ => {}
            }
        }
        // Our own failed probe is an independent suspicion: tell the others,
        // it shortens their suspicion time.
        for node in probe_failed {
            if let Some(member) = self.current(node) {
                let news = News::Suspect {
                    by: self.agent.id(),
                    of: node,
                    incarnation: member.incarnation(),
                };
                // Our own note reaches the book too; `on_tick` skips it.
                self.add_news(&news);
            }
        }
        // Datagrams the news may have produced go out on the next flush.
    }

    /// Publish liveness per member and track suspicions.
    fn observe(&mut self) {
        let mut latest: BTreeMap<NodeId, (u64, State, Incarnation)> = BTreeMap::new();
        for m in self.swim.iter_membership_state() {
            let entry = (m.id().bump, m.state(), m.incarnation());
            match latest.get(&m.id().node) {
                Some((bump, _, _)) if *bump >= entry.0 => {}
                _ => {
                    latest.insert(m.id().node, entry);
                }
            }
        }
        lock(&self.gossip.book).identities = latest
            .iter()
            .map(|(node, (bump, _, _))| (*node, *bump))
            .collect();
        let now = Instant::now();
        for (node, (_, state, incarnation)) in &latest {
            if *state == State::Suspect {
                self.suspicions.suspect(*node, *incarnation, now);
            } else {
                self.suspicions.clear(*node);
            }
        }
        let mut view = lock(&self.gossip.view);
        for (node, (_, state, _)) in latest {
            let liveness = match state {
                State::Alive => Liveness::Alive,
                State::Suspect => Liveness::Suspect,
                State::Down => Liveness::Dead,
            };
            match view.members.get(&node) {
                Some(seen) if seen.liveness == liveness => {}
                _ => {
                    view.members.insert(
                        node,
                        Seen {
                            liveness,
                            since: now,
                        },
                    );
                }
            }
        }
    }
}

/// (MemAvailable in bytes, load averages) from procfs.
fn read_proc_load() -> (u64, [f32; 3]) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut load = [0.0f32; 3];
    for (slot, text) in load.iter_mut().zip(loadavg.split_whitespace()) {
        *slot = text.parse().unwrap_or(0.0);
    }
    (available_kib.saturating_mul(1024), load)
}
