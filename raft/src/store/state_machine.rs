//! The cluster state machine and its snapshots on redb.

use std::fmt::Debug;
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageIOError,
    StoredMembership,
};
use tokio::sync::watch;

use crate::events::{changes, Event, Tables};
use crate::model::{ClusterState, CommandResult, Node, NodeId};
use crate::TypeConfig;
use ferry_transport::codec;

use super::*;

/// The cluster state machine and its snapshots.
#[derive(Debug)]
pub struct StateMachineStore {
    pub(super) db: Arc<Db>,
    pub(super) shared: Arc<Shared>,
    pub(super) snapshot_seq: Arc<AtomicU64>,
}

/// A cheap, cloneable read handle to the applied cluster state.
#[derive(Clone, Debug)]
pub struct StateHandle {
    pub(super) shared: Arc<Shared>,
}

impl StateHandle {
    /// Run `f` on the applied state. `f` sees a whole applied batch, never
    /// part of one; no lock is held while it runs.
    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        f(&self.shared.current().state)
    }

    /// The index of the last applied log entry (0 before any).
    pub fn last_applied_index(&self) -> u64 {
        self.shared.current().index()
    }

    /// A receiver that changes whenever the applied state changes; its
    /// value is the last applied log index.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.tx.subscribe()
    }

    /// Up to about `max` events of the entries after `after` that this
    /// member applied and still keeps (`ferry monitor`).
    pub fn events_after(&self, after: u64, max: usize) -> EventPage {
        self.shared.events().page(after, max)
    }

    /// Wake-ups for the changes that matter to one loop (see
    /// [`StateWatch::changed`]).
    pub fn watch(&self) -> StateWatch {
        StateWatch {
            rx: self.shared.tx.subscribe(),
            seen: self.shared.current(),
            shared: Arc::clone(&self.shared),
        }
    }
}

/// A loop's view of state changes that skips those it does not depend on,
/// so a loop that scans a big table does not scan it again for every
/// unrelated commit. Comparing tables is cheap: a copy of a persistent map
/// shares its root until written (`OrdMap::ptr_eq`).
#[derive(Debug)]
pub struct StateWatch {
    shared: Arc<Shared>,
    rx: watch::Receiver<u64>,
    /// The state when `changed` last returned: what the loop worked on.
    seen: Arc<Applied>,
}

impl StateWatch {
    /// Wait until a change that `matters(before, after)` is applied, or
    /// `timeout` passes; false once the state machine is gone.
    pub async fn changed(
        &mut self,
        timeout: std::time::Duration,
        matters: impl Fn(&ClusterState, &ClusterState) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.changed()).await {
                Ok(Err(_)) => return false,
                Ok(Ok(())) if !matters(&self.seen.state, &self.shared.current().state) => {}
                Ok(Ok(())) | Err(_) => {
                    self.seen = self.shared.current();
                    return true;
                }
            }
        }
    }
}

impl StateMachineStore {
    /// Shared read handle to the applied state for the agent's queries.
    pub fn state(&self) -> StateHandle {
        StateHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    fn snapshot_builder(&self) -> SnapshotBuilder {
        SnapshotBuilder {
            db: Arc::clone(&self.db),
            shared: Arc::clone(&self.shared),
            snapshot_seq: Arc::clone(&self.snapshot_seq),
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, Membership)> {
        let current = self.shared.current();
        Ok((current.last_applied, current.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let before = self.shared.current();
        let mut next = Applied::clone(&before);
        let mut results = Vec::new();
        let mut events = Vec::new();
        let at_ms = wall_clock_ms();
        for entry in entries {
            next.last_applied = Some(entry.log_id);
            let tables = Tables::of(&next.state);
            let result = match entry.payload {
                EntryPayload::Blank => CommandResult::Done,
                EntryPayload::Normal(cmd) => next.state.apply(&cmd),
                EntryPayload::Membership(membership) => {
                    next.membership = StoredMembership::new(Some(entry.log_id), membership);
                    CommandResult::Done
                }
            };
            results.push(result);
            let index = entry.log_id.index;
            events.extend(
                changes(&tables, &Tables::of(&next.state))
                    .into_iter()
                    .map(|change| Event {
                        index,
                        at_ms,
                        change,
                    }),
            );
        }
        if results.is_empty() {
            return Ok(results);
        }
        let next = Arc::new(next);
        let to_write = Arc::clone(&next);
        blocking(&self.db, "persist the applied state", move |db| {
            db.write_unsynced("persist the applied state", |txn, op| {
                to_write.persist(Some(&before), txn, op)
            })
        })
        .await
        .map_err(write_sm_err)?;
        // Before the state: whoever the new state wakes finds its events.
        self.shared.events().record(next.index(), events);
        self.shared.replace(next);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_builder()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let unreadable = |e: StoreError| StorageIOError::read_snapshot(Some(meta.signature()), &e);
        let (format, mut applied): (u32, Applied) = codec::decode(&data).map_err(|e| {
            unreadable(StoreError::Codec {
                path: self.db.path.clone(),
                op: "decode a received snapshot",
                source: Box::new(e),
            })
        })?;
        if format != FORMAT_VERSION {
            return Err(unreadable(StoreError::Format {
                path: self.db.path.clone(),
                found: format,
            })
            .into());
        }
        // The meta is what openraft reasons with: make the state agree.
        applied.last_applied = meta.last_log_id;
        applied.membership = meta.last_membership.clone();
        let applied = Arc::new(applied);
        let to_write = Arc::clone(&applied);
        let meta_owned = meta.clone();
        blocking(&self.db, "install a snapshot", move |db| {
            db.write("install a snapshot", |txn, op| {
                to_write.persist(None, txn, op)?;
                let mut snap = txn.open_table(SNAPSHOT).map_err(|e| op.db(e))?;
                op.put(&mut snap, KEY_SNAP_META, &meta_owned)?;
                snap.insert(KEY_SNAP_DATA, data.as_slice())
                    .map_err(|e| op.db(e))?;
                Ok(())
            })
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.shared.events().restart_after(applied.index());
        self.shared.replace(applied);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        blocking(&self.db, "read the current snapshot", |db| {
            db.read("read the current snapshot", |txn, op| {
                let snap = txn.open_table(SNAPSHOT).map_err(|e| op.db(e))?;
                let Some(meta) = op.get::<SnapshotMeta<NodeId, Node>>(&snap, KEY_SNAP_META)? else {
                    return Ok(None);
                };
                let data = match snap.get(KEY_SNAP_DATA).map_err(|e| op.db(e))? {
                    Some(guard) => guard.value().to_vec(),
                    None => Vec::new(),
                };
                Ok(Some(Snapshot {
                    meta,
                    snapshot: Box::new(Cursor::new(data)),
                }))
            })
        })
        .await
        .map_err(read_snapshot_err)
    }
}

/// Builds snapshots of the applied state and stores them as the current
/// snapshot.
#[derive(Debug)]
pub struct SnapshotBuilder {
    pub(super) db: Arc<Db>,
    pub(super) shared: Arc<Shared>,
    pub(super) snapshot_seq: Arc<AtomicU64>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let current = self.shared.current();
        let seq = self.snapshot_seq.fetch_add(1, Ordering::SeqCst) + 1;
        let (term, index) = current
            .last_applied
            .map_or((0, 0), |id| (id.leader_id.term, id.index));
        let meta = SnapshotMeta {
            last_log_id: current.last_applied,
            last_membership: current.membership.clone(),
            snapshot_id: format!("{term}-{index}-{seq}"),
        };
        let meta_owned = meta.clone();
        let data = blocking(&self.db, "store a built snapshot", move |db| {
            // Encoded before the write transaction, which would hold up
            // appends meanwhile; stored unsynced: the purge that relies
            // on it is synced, and syncs it.
            let data = db
                .op("encode a snapshot")
                .encode(&(FORMAT_VERSION, &*current))?;
            db.write_unsynced("store a built snapshot", |txn, op| {
                let mut snap = txn.open_table(SNAPSHOT).map_err(|e| op.db(e))?;
                // A snapshot installed meanwhile may be newer: keep it.
                let existing: Option<SnapshotMeta<NodeId, Node>> = op.get(&snap, KEY_SNAP_META)?;
                let newer_exists = existing.is_some_and(|m| m.last_log_id > meta_owned.last_log_id);
                if !newer_exists {
                    op.put(&mut snap, KEY_SNAP_META, &meta_owned)?;
                    snap.insert(KEY_SNAP_DATA, data.as_slice())
                        .map_err(|e| op.db(e))?;
                }
                let stored_seq: u64 = op.get(&snap, KEY_SNAP_SEQ)?.unwrap_or(0);
                op.put(&mut snap, KEY_SNAP_SEQ, &stored_seq.max(seq))?;
                Ok(data)
            })
        })
        .await
        .map_err(write_snapshot_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// This member's wall clock (an event's time; apply itself never reads it).
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
