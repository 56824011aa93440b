//! `ferry monitor` (a feature): the events the state machine recorded
//! (`ferry_raft::events`), after the index a client saw last, put in words
//! with members' names. A client with nothing new waits here for the next
//! applied entry rather than asking again and again.

use std::time::Duration;

use ferry_raft::events::{Change, Event};
use ferry_raft::{MoveStats, NodeId};

use crate::api::events::{EventView, EventsView};
use crate::api::ApiReply;
use crate::node::Agent;

/// Events in one answer, about (an entry's events are never split).
const PAGE: usize = 500;
/// The longest an answer waits for an event.
const LONGEST_WAIT: Duration = Duration::from_secs(10);

pub async fn events(agent: &Agent, after: u64, wait: Duration) -> ApiReply {
    let mut page = agent.state().events_after(after, PAGE);
    if page.events.is_empty() && !wait.is_zero() {
        let seen = page.next_after;
        let mut applied = agent.state().subscribe();
        let newer = applied.wait_for(|index| *index > seen);
        // Nothing new in time, or the state machine stopped: answer empty.
        let _ = tokio::time::timeout(wait.min(LONGEST_WAIT), newer).await;
        page = agent.state().events_after(after, PAGE);
    }
    let name = |id: NodeId| {
        agent
            .member_name(id)
            .unwrap_or_else(|| format!("node {id}"))
    };
    ApiReply::Events(EventsView {
        events: page.events.iter().map(|e| view(e, &name)).collect(),
        kept_from: page.kept_from,
        next_after: page.next_after,
    })
}

fn view(event: &Event, name: &impl Fn(NodeId) -> String) -> EventView {
    let (kind, subject, text) = words(&event.change, name);
    EventView {
        index: event.index,
        at_ms: event.at_ms,
        kind: kind.to_string(),
        subject,
        text,
        change: event.change.clone(),
    }
}

/// The kind, subject and text of a change.
fn words(change: &Change, name: &impl Fn(NodeId) -> String) -> (&'static str, String, String) {
    match change {
        Change::MemberJoined { id, name } => ("member", name.clone(), format!("joined (id {id})")),
        Change::MemberRemoved { name, .. } => ("member", name.clone(), "removed".into()),
        Change::MemberState {
            name,
            state,
            cordoned,
            ..
        } => {
            let cordon = if *cordoned { ", cordoned" } else { "" };
            (
                "member",
                name.clone(),
                format!("{}{cordon}", state.as_str()),
            )
        }
        Change::InstanceCreated { name: n, node } => {
            ("instance", n.clone(), format!("created on {}", name(*node)))
        }
        Change::InstanceDeleted { name: n, node } => (
            "instance",
            n.clone(),
            format!("deleted from {}", name(*node)),
        ),
        Change::InstanceState {
            name: n,
            node,
            from,
            to,
            detail,
        } => {
            let (from, to, on) = (from.as_str(), to.as_str(), name(*node));
            let why = detail.as_deref().unwrap_or_default();
            let text = format!(
                "{from} -> {to} on {on}{}{why}",
                if why.is_empty() { "" } else { ": " }
            );
            ("instance", n.clone(), text)
        }
        Change::InstanceOwner {
            name: n,
            from,
            to,
            epoch,
        } => {
            let text = format!("owner {} -> {} (epoch {epoch})", name(*from), name(*to));
            ("instance", n.clone(), text)
        }
        Change::JobCreated {
            id,
            instance,
            source,
            target,
        } => {
            let (from, to) = (name(*source), name(*target));
            let text = format!("move {instance} from {from} to {to}");
            ("job", id.to_string(), text)
        }
        Change::JobPhase {
            id,
            instance,
            from,
            to,
            error,
            stats,
        } => {
            let text = phase_text(instance, (&from.name(), &to.name()), error, stats);
            ("job", id.to_string(), text)
        }
        Change::HostJobCreated { id, kind, member } => {
            host_job(*id, kind, name(*member), "started")
        }
        Change::HostJobFinished { id, kind, member } => {
            host_job(*id, kind, name(*member), "finished")
        }
    }
}

fn host_job(
    id: u64,
    kind: &impl std::fmt::Display,
    member: String,
    what: &str,
) -> (&'static str, String, String) {
    (
        "host-job",
        id.to_string(),
        format!("{kind} {member} {what}"),
    )
}

/// A job's phase change, with its error or a done move's figures.
fn phase_text(
    instance: &str,
    (from, to): (&str, &str),
    error: &Option<String>,
    stats: &Option<MoveStats>,
) -> String {
    let mut text = format!("{instance}: {from} -> {to}");
    if let Some(error) = error {
        text.push_str(&format!(": {error}"));
    }
    if let Some(stats) = stats {
        text.push_str(&format!(" ({})", figures(stats)));
    }
    text
}

fn figures(stats: &MoveStats) -> String {
    format!(
        "downtime {} ms, {:.1} s in all, {:.1} MiB sent",
        stats.downtime_ms,
        stats.total_ms as f64 / 1000.0,
        stats.bytes as f64 / f64::from(1u32 << 20)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_raft::{ObservedState, Phase};

    fn named(id: NodeId) -> String {
        format!("n{id}")
    }

    #[test]
    fn changes_read_with_member_names_and_figures() {
        let change = Change::InstanceState {
            name: "c1".into(),
            node: 2,
            from: ObservedState::Running,
            to: ObservedState::Frozen,
            detail: None,
        };
        assert_eq!(
            words(&change, &named),
            ("instance", "c1".into(), "running -> frozen on n2".into())
        );
        let done = Change::JobPhase {
            id: 3,
            instance: "c1".into(),
            from: Phase::Restored,
            to: Phase::Done,
            error: None,
            stats: Some(MoveStats {
                downtime_ms: 120,
                total_ms: 2300,
                bytes: 3 << 20,
                iterations: 1,
            }),
        };
        let (_, subject, text) = words(&done, &named);
        assert_eq!(subject, "3");
        assert_eq!(
            text,
            "c1: Restored -> Done (downtime 120 ms, 2.3 s in all, 3.0 MiB sent)"
        );
    }
}
