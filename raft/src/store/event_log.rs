//! The latest events this member applied (`ferry monitor`), in memory: a
//! client that lost its connection asks again from the last index it saw
//! and misses nothing this agent still keeps; what it no longer keeps
//! (older than the last [`EVENTS_KEPT`], before the agent started, or
//! arrived in a snapshot) the answer says.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::events::Event;

/// Events kept, at most.
pub const EVENTS_KEPT: usize = 10_000;

/// The events after an index, as one answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventPage {
    pub events: Vec<Event>,
    /// Every event of an entry from this index on is kept; of older
    /// entries, none or some.
    pub kept_from: u64,
    /// Ask next for the events after this index.
    pub next_after: u64,
}

#[derive(Debug)]
pub(super) struct EventLog {
    events: VecDeque<Event>,
    kept_from: u64,
    last_index: u64,
}

impl EventLog {
    /// A log that knows nothing up to `index` (the state it starts with).
    pub(super) fn after(index: u64) -> EventLog {
        EventLog {
            events: VecDeque::new(),
            kept_from: index + 1,
            last_index: index,
        }
    }

    /// Entries up to `last_index` applied, with these events.
    pub(super) fn record(&mut self, last_index: u64, new: Vec<Event>) {
        self.events.extend(new);
        while self.events.len() > EVENTS_KEPT {
            if let Some(dropped) = self.events.pop_front() {
                self.kept_from = self.kept_from.max(dropped.index + 1);
            }
        }
        self.last_index = last_index;
    }

    /// A snapshot replaced the state: its entries' events are unknown.
    pub(super) fn restart_after(&mut self, index: u64) {
        *self = EventLog::after(index);
    }

    /// Up to about `max` events after `after` (never part of one entry's).
    pub(super) fn page(&self, after: u64, max: usize) -> EventPage {
        let start = self.events.partition_point(|e| e.index <= after);
        let mut events: Vec<Event> = self.events.range(start..).take(max).cloned().collect();
        let next_after = match events.last() {
            Some(last) if start + events.len() < self.events.len() => {
                // Cut at a whole entry: the rest of its events come along.
                let index = last.index;
                let rest = self.events.range(start + events.len()..);
                events.extend(rest.take_while(|e| e.index == index).cloned());
                index
            }
            // `u64::MAX`: from now on.
            _ if after == u64::MAX => self.last_index,
            _ => self.last_index.max(after),
        };
        EventPage {
            events,
            kept_from: self.kept_from,
            next_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Change;

    fn event(index: u64, name: &str) -> Event {
        Event {
            index,
            at_ms: 0,
            change: Change::InstanceCreated {
                name: name.into(),
                node: 1,
            },
        }
    }

    #[test]
    fn a_page_never_splits_an_entry_and_resumes_after_it() {
        let mut log = EventLog::after(4);
        log.record(6, vec![event(5, "a"), event(6, "b"), event(6, "c")]);
        log.record(9, vec![event(9, "d")]);
        let first = log.page(4, 2);
        assert_eq!(first.events.len(), 3, "{first:?}");
        assert_eq!(first.next_after, 6);
        let second = log.page(first.next_after, 2);
        assert_eq!(second.events, vec![event(9, "d")]);
        assert_eq!(second.next_after, 9);
        assert_eq!(log.page(9, 2).events, vec![]);
        assert_eq!(log.page(9, 2).next_after, 9);
    }

    #[test]
    fn what_fell_out_or_came_in_a_snapshot_is_said() {
        let mut log = EventLog::after(0);
        let many: Vec<Event> = (1..=EVENTS_KEPT as u64 + 5)
            .map(|i| event(i, "x"))
            .collect();
        log.record(EVENTS_KEPT as u64 + 5, many);
        assert_eq!(log.page(0, 10).kept_from, 6);
        log.restart_after(20_000);
        let page = log.page(3, 10);
        assert_eq!((page.kept_from, page.next_after), (20_001, 20_000));
    }
}
