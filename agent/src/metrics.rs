//! The agent's Prometheus metrics (layer 0), in the OpenMetrics text format
//! that Prometheus scrapes (prometheus-client). What happens is counted
//! where it happens, once in the cluster: a commit by the agent that wrote
//! it, a phase change and a move's end by the agent whose proposal
//! committed it, a failed probe by the agent that probed. What is read off
//! the node (Raft's indexes, members by liveness, this member's instances
//! by state) is set from [`Readings`] at each scrape. Units are in the
//! names (`_seconds`, `_bytes`) without `# UNIT` lines, as client_golang
//! writes them: some OpenMetrics readers refuse a unit on a histogram.

use std::sync::Mutex;
use std::time::Duration;

use ferry_raft::{MoveStats, Phase};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LivenessLabel {
    liveness: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// How a move ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    RolledBack,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::RolledBack => "rolled_back",
        }
    }
}

/// What a scrape reads off the node.
#[derive(Clone, Debug, Default)]
pub struct Readings {
    pub term: u64,
    /// The leader's id, if one is known.
    pub leader: Option<u64>,
    pub is_leader: bool,
    pub last_log_index: u64,
    /// The highest index this member knows committed.
    pub commit_index: u64,
    pub applied_index: u64,
    /// Members by liveness ("alive", "suspect", "dead"), this one included.
    pub members: Vec<(&'static str, i64)>,
    /// The instances this member holds, by state.
    pub instances: Vec<(&'static str, i64)>,
}

#[derive(Default)]
struct RaftGauges {
    term: Gauge,
    leader: Gauge,
    is_leader: Gauge,
    last_log_index: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    apply_lag: Gauge,
}

/// Histogram buckets in seconds from 1 ms to about 2 min.
fn seconds_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    /// One scrape at a time sets the gauges and encodes.
    scrape: Mutex<()>,
    commit: Histogram,
    probe_failures: Counter,
    moves: Family<OutcomeLabel, Counter>,
    downtime: Histogram,
    move_time: Histogram,
    moved_bytes: Counter,
    phases: Histograms<PhaseLabel>,
    raft: RaftGauges,
    members: Family<LivenessLabel, Gauge>,
    instances: Family<StateLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("ferry"),
            scrape: Mutex::new(()),
            commit: seconds_buckets(),
            probe_failures: Counter::default(),
            moves: Family::default(),
            downtime: seconds_buckets(),
            move_time: seconds_buckets(),
            moved_bytes: Counter::default(),
            phases: Family::new_with_constructor(seconds_buckets),
            raft: RaftGauges::default(),
            members: Family::default(),
            instances: Family::default(),
        };
        metrics.register();
        metrics
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "raft_commit_seconds",
            "Time from this agent's write to its commit (forwarded or not)",
            self.commit.clone(),
        );
        let g = &self.raft;
        r.register("raft_term", "The current Raft term", g.term.clone());
        r.register(
            "raft_leader_id",
            "The leader's member id (-1: none known)",
            g.leader.clone(),
        );
        r.register(
            "raft_is_leader",
            "1 while this member leads",
            g.is_leader.clone(),
        );
        r.register(
            "raft_last_log_index",
            "The last entry in this member's log",
            g.last_log_index.clone(),
        );
        r.register(
            "raft_commit_index",
            "The highest entry this member knows committed",
            g.commit_index.clone(),
        );
        r.register(
            "raft_applied_index",
            "The last entry this member's state machine applied",
            g.applied_index.clone(),
        );
        r.register(
            "raft_apply_lag",
            "Entries committed but not yet applied here",
            g.apply_lag.clone(),
        );
        r.register(
            "gossip_members",
            "Members by gossip liveness, as this member sees them",
            self.members.clone(),
        );
        r.register(
            "gossip_probe_failures",
            "Gossip probes of another member that got no answer",
            self.probe_failures.clone(),
        );
        r.register(
            "instances",
            "Instances this member holds, by state",
            self.instances.clone(),
        );
        r.register(
            "moves",
            "Moves ended by this member's proposal, by outcome",
            self.moves.clone(),
        );
        r.register(
            "move_downtime_seconds",
            "Moves' downtime, freeze on the source to running on the target",
            self.downtime.clone(),
        );
        r.register(
            "move_duration_seconds",
            "Moves' time from the request to done",
            self.move_time.clone(),
        );
        r.register(
            "move_transferred_bytes",
            "Bytes moves sent (counted when a move is done)",
            self.moved_bytes.clone(),
        );
        r.register(
            "job_phase_seconds",
            "Time migration jobs spent in a phase, by phase",
            self.phases.clone(),
        );
    }

    /// A write of this agent committed after `took`.
    pub fn committed(&self, took: Duration) {
        self.commit.observe(took.as_secs_f64());
    }

    /// A gossip probe got no answer.
    pub fn probe_failed(&self) {
        self.probe_failures.inc();
    }

    /// A job left `phase` after `took` (this member's proposal moved it on).
    pub fn phase_left(&self, phase: Phase, took: Duration) {
        let label = PhaseLabel {
            phase: phase_name(phase),
        };
        self.phases
            .get_or_create(&label)
            .observe(took.as_secs_f64());
    }

    /// A move ended (this member's proposal ended it), with its figures
    /// when it is done.
    pub fn move_ended(&self, outcome: Outcome, stats: Option<&MoveStats>) {
        let label = OutcomeLabel {
            outcome: outcome.as_str(),
        };
        self.moves.get_or_create(&label).inc();
        if let (Outcome::Done, Some(stats)) = (outcome, stats) {
            self.downtime.observe(stats.downtime_ms as f64 / 1000.0);
            self.move_time.observe(stats.total_ms as f64 / 1000.0);
            self.moved_bytes.inc_by(stats.bytes);
        }
    }

    /// The text a scrape gets, with the gauges set from `readings`.
    pub fn encode(&self, readings: &Readings) -> Result<String, std::fmt::Error> {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.set_gauges(readings);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    fn set_gauges(&self, r: &Readings) {
        let g = &self.raft;
        g.term.set(as_gauge(r.term));
        g.leader.set(r.leader.map_or(-1, as_gauge));
        g.is_leader.set(i64::from(r.is_leader));
        g.last_log_index.set(as_gauge(r.last_log_index));
        g.commit_index.set(as_gauge(r.commit_index));
        g.applied_index.set(as_gauge(r.applied_index));
        g.apply_lag
            .set(as_gauge(r.commit_index.saturating_sub(r.applied_index)));
        // Cleared first: a state no instance is in any more shows no stale
        // count.
        self.members.clear();
        for (liveness, n) in &r.members {
            self.members
                .get_or_create(&LivenessLabel { liveness })
                .set(*n);
        }
        self.instances.clear();
        for (state, n) in &r.instances {
            self.instances.get_or_create(&StateLabel { state }).set(*n);
        }
    }
}

fn as_gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A phase's label: pre-copy rounds are one phase.
fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Pending => "pending",
        Phase::Checking => "checking",
        Phase::Preparing => "preparing",
        Phase::Precopy(_) => "precopy",
        Phase::Frozen => "frozen",
        Phase::Switched => "switched",
        Phase::Restored => "restored",
        Phase::Done => "done",
        Phase::RollingBack => "rolling_back",
        Phase::RolledBack => "rolled_back",
        Phase::SwitchingBack => "switching_back",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn a_done_move_counts_its_figures_and_a_rollback_only_itself() {
        let m = Metrics::new();
        let stats = MoveStats {
            downtime_ms: 250,
            total_ms: 4000,
            bytes: 1 << 20,
            iterations: 2,
        };
        m.move_ended(Outcome::Done, Some(&stats));
        m.move_ended(Outcome::RolledBack, None);
        m.phase_left(Phase::Precopy(1), Duration::from_millis(30));
        m.phase_left(Phase::Precopy(2), Duration::from_millis(30));
        let text = m.encode(&Readings::default()).unwrap();
        assert_eq!(
            sample(&text, "ferry_moves_total{outcome=\"done\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "ferry_moves_total{outcome=\"rolled_back\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "ferry_move_downtime_seconds_count"),
            Some(1.0)
        );
        assert_eq!(sample(&text, "ferry_move_downtime_seconds_sum"), Some(0.25));
        assert_eq!(
            sample(&text, "ferry_move_transferred_bytes_total"),
            Some(1048576.0)
        );
        assert_eq!(
            sample(&text, "ferry_job_phase_seconds_count{phase=\"precopy\"}"),
            Some(2.0)
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn gauges_follow_the_latest_readings_only() {
        let m = Metrics::new();
        let mut r = Readings {
            term: 3,
            leader: Some(1),
            is_leader: true,
            last_log_index: 12,
            commit_index: 11,
            applied_index: 9,
            members: vec![("alive", 2), ("suspect", 1)],
            instances: vec![("running", 4)],
        };
        let text = m.encode(&r).unwrap();
        assert_eq!(sample(&text, "ferry_raft_term"), Some(3.0));
        assert_eq!(sample(&text, "ferry_raft_apply_lag"), Some(2.0));
        assert_eq!(
            sample(&text, "ferry_gossip_members{liveness=\"suspect\"}"),
            Some(1.0)
        );
        r.leader = None;
        r.members = vec![("alive", 3)];
        r.instances = vec![];
        let text = m.encode(&r).unwrap();
        assert_eq!(sample(&text, "ferry_raft_leader_id"), Some(-1.0));
        assert_eq!(
            sample(&text, "ferry_gossip_members{liveness=\"suspect\"}"),
            None,
            "{text}"
        );
        assert_eq!(sample(&text, "ferry_instances{state=\"running\"}"), None);
    }
}
