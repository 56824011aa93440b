//! The Raft log and vote on redb.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogId, LogState, OptionalSend, RaftLogReader, Vote};
use redb::ReadableTable;

use crate::model::NodeId;
use crate::TypeConfig;

use super::*;

/// The Raft log and vote. Cloning is cheap; clones share the database and
/// serve as the log reader.
#[derive(Clone, Debug)]
pub struct LogStore {
    pub(super) db: Arc<Db>,
    pub(super) committed: Arc<Mutex<Option<LogId<NodeId>>>>,
    pub(super) tail: Arc<Mutex<Tail>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `[lo, hi]` inclusive, or `None` when the range is empty.
fn index_range(start: Bound<u64>, end: Bound<u64>) -> Option<(u64, u64)> {
    let lo = match start {
        Bound::Included(s) => s,
        Bound::Excluded(s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let hi = match end {
        Bound::Included(e) => e,
        Bound::Excluded(e) => e.checked_sub(1)?,
        Bound::Unbounded => u64::MAX,
    };
    (lo <= hi).then_some((lo, hi))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry>> {
        let Some((lo, hi)) = index_range(range.start_bound().cloned(), range.end_bound().cloned())
        else {
            return Ok(Vec::new());
        };
        if let Some(entries) = lock(&self.tail).get(lo, hi) {
            return Ok(entries);
        }
        blocking(&self.db, "read log entries", move |db| {
            db.read("read log entries", |txn, op| {
                let log = txn.open_table(LOG).map_err(|e| op.db(e))?;
                let mut entries = Vec::new();
                for item in log.range(lo..=hi).map_err(|e| op.db(e))? {
                    let (_, value) = item.map_err(|e| op.db(e))?;
                    entries.push(op.decode::<Entry>(value.value())?);
                }
                Ok(entries)
            })
        })
        .await
        .map_err(read_logs_err)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        blocking(&self.db, "read the log state", |db| {
            db.read("read the log state", |txn, op| {
                let meta = txn.open_table(META).map_err(|e| op.db(e))?;
                let last_purged: Option<LogId<NodeId>> = op.get(&meta, KEY_LAST_PURGED)?.flatten();
                let log = txn.open_table(LOG).map_err(|e| op.db(e))?;
                let last = match log.last().map_err(|e| op.db(e))? {
                    Some((_, value)) => Some(op.decode::<Entry>(value.value())?.log_id),
                    None => None,
                };
                Ok(LogState {
                    last_purged_log_id: last_purged,
                    last_log_id: last.or(last_purged),
                })
            })
        })
        .await
        .map_err(read_logs_err)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let vote = *vote;
        blocking(&self.db, "save the vote", move |db| {
            db.write("save the vote", |txn, op| {
                let mut meta = txn.open_table(META).map_err(|e| op.db(e))?;
                op.put(&mut meta, KEY_VOTE, &vote)
            })
        })
        .await
        .map_err(write_vote_err)
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        blocking(&self.db, "read the vote", |db| {
            db.read("read the vote", |txn, op| {
                let meta = txn.open_table(META).map_err(|e| op.db(e))?;
                op.get(&meta, KEY_VOTE)
            })
        })
        .await
        .map_err(read_vote_err)
    }

    /// Kept in memory only: it would cost a write on every commit of
    /// every member, and a start without it loses nothing: openraft
    /// applies the rest once the leader says what is committed, and the
    /// agent waits for that before it acts (`Command::Barrier`).
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        *lock(&self.committed) = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(*lock(&self.committed))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let tail = Arc::clone(&self.tail);
        // Synced before the callback: openraft 0.9 waits for it before it
        // replicates, so an fsync off this path would gain nothing.
        let result = blocking(&self.db, "append log entries", move |db| {
            db.write("append log entries", |txn, op| {
                let mut log = txn.open_table(LOG).map_err(|e| op.db(e))?;
                for entry in &entries {
                    let bytes = op.encode(entry)?;
                    log.insert(entry.log_id.index, bytes.as_slice())
                        .map_err(|e| op.db(e))?;
                }
                Ok(())
            })?;
            lock(&tail).appended(&entries);
            Ok(())
        })
        .await;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_logs_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        lock(&self.tail).truncated(log_id.index);
        blocking(&self.db, "truncate the log", move |db| {
            db.write("truncate the log", |txn, op| {
                let mut log = txn.open_table(LOG).map_err(|e| op.db(e))?;
                log.retain_in(log_id.index.., |_, _| false)
                    .map_err(|e| op.db(e))
            })
        })
        .await
        .map_err(write_logs_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        lock(&self.tail).purged(log_id.index);
        blocking(&self.db, "purge the log", move |db| {
            db.write("purge the log", |txn, op| {
                {
                    let mut log = txn.open_table(LOG).map_err(|e| op.db(e))?;
                    log.retain_in(..=log_id.index, |_, _| false)
                        .map_err(|e| op.db(e))?;
                }
                let mut meta = txn.open_table(META).map_err(|e| op.db(e))?;
                op.put(&mut meta, KEY_LAST_PURGED, &Some(log_id))
            })
        })
        .await
        .map_err(write_logs_err)
    }
}
