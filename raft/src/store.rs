//! Durable Raft storage on one redb database file per agent.
//!
//! Tables:
//! - `log`: index → encoded `Entry`;
//! - `meta`: `vote`, `committed`, `last_purged_log_id`;
//! - `sm`: `state` (encoded [`ClusterState`]), `last_applied`,
//!   `last_membership`: always written together in one transaction;
//! - `snapshot`: `meta`, `data` and `seq` (the counter in snapshot ids).
//!
//! Every write openraft relies on (append, vote, committed, truncate, purge,
//! apply, snapshot build and install) is one redb write transaction
//! committed with redb's default durability (fsync) before the call returns
//! (and, for `append`, before the flush callback fires), so the store
//! survives `kill -9` at any moment. The redb calls are blocking and run on
//! tokio's blocking pool.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    EntryPayload, LogId, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::model::{ClusterState, CommandResult, Node, NodeId};
use crate::TypeConfig;
use ferry_transport::codec;

type Entry = openraft::Entry<TypeConfig>;
type Membership = StoredMembership<NodeId, Node>;
type StorageResult<T> = Result<T, StorageError<NodeId>>;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SM: TableDefinition<&str, &[u8]> = TableDefinition::new("sm");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged_log_id";
const KEY_STATE: &str = "state";
const KEY_LAST_APPLIED: &str = "last_applied";
const KEY_MEMBERSHIP: &str = "last_membership";
const KEY_SNAP_META: &str = "meta";
const KEY_SNAP_DATA: &str = "data";
const KEY_SNAP_SEQ: &str = "seq";
const KEY_FORMAT: &str = "format";

/// Version of what this store writes (tables, the encoded state, snapshot
/// data). An agent refuses a data dir or a snapshot of another version
/// instead of misreading it; raise it with every incompatible change of
/// `ClusterState` or the tables.
pub const FORMAT_VERSION: u32 = 1;

/// A storage failure, naming the database file and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("raft store {}: cannot open the database: {source}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::DatabaseError>,
    },
    #[error("raft store {}: {op}: {source}", .path.display())]
    Db {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
    #[error(
        "raft store {}: written in storage format {found}, this ferry reads format {}; \
         run the ferry version that wrote it",
        .path.display(),
        FORMAT_VERSION
    )]
    Format { path: PathBuf, found: u32 },
    #[error("raft store {}: {op}: {source}", .path.display())]
    Codec {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: Box<codec::CodecError>,
    },
    #[error("raft store {}: {op}: the storage task failed: {message}", .path.display())]
    Task {
        path: PathBuf,
        op: &'static str,
        message: String,
    },
}

/// The database and its file name, shared by the log store, the state
/// machine and their readers.
#[derive(Debug)]
struct Db {
    db: Database,
    path: PathBuf,
}

/// Context for building errors inside one storage operation.
#[derive(Clone, Copy)]
struct Op<'a> {
    path: &'a Path,
    op: &'static str,
}

impl Op<'_> {
    fn db(self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: self.path.to_path_buf(),
            op: self.op,
            source: Box::new(e.into()),
        }
    }

    fn codec(self, e: codec::CodecError) -> StoreError {
        StoreError::Codec {
            path: self.path.to_path_buf(),
            op: self.op,
            source: Box::new(e),
        }
    }

    fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, StoreError> {
        codec::encode(value).map_err(|e| self.codec(e))
    }

    fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, StoreError> {
        codec::decode(bytes).map_err(|e| self.codec(e))
    }

    fn put<T: Serialize>(
        self,
        table: &mut redb::Table<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = self.encode(value)?;
        table
            .insert(key, bytes.as_slice())
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    fn get<T: DeserializeOwned>(
        self,
        table: &impl ReadableTable<&'static str, &'static [u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        match table.get(key).map_err(|e| self.db(e))? {
            Some(guard) => Ok(Some(self.decode(guard.value())?)),
            None => Ok(None),
        }
    }
}

impl Db {
    fn op(&self, op: &'static str) -> Op<'_> {
        Op {
            path: &self.path,
            op,
        }
    }

    /// One write transaction, committed durably (fsync) before returning.
    /// An error inside `f` drops (aborts) the transaction.
    fn write<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&WriteTransaction, Op<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let op = self.op(op);
        let txn = self.db.begin_write().map_err(|e| op.db(e))?;
        let out = f(&txn, op)?;
        txn.commit().map_err(|e| op.db(e))?;
        Ok(out)
    }

    fn read<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&ReadTransaction, Op<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let op = self.op(op);
        let txn = self.db.begin_read().map_err(|e| op.db(e))?;
        f(&txn, op)
    }
}

/// Run a blocking storage operation on tokio's blocking pool.
async fn blocking<T, F>(db: &Arc<Db>, op: &'static str, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Db) -> Result<T, StoreError> + Send + 'static,
{
    let db = Arc::clone(db);
    let path = db.path.clone();
    match tokio::task::spawn_blocking(move || f(&db)).await {
        Ok(result) => result,
        Err(e) => Err(StoreError::Task {
            path,
            op,
            message: e.to_string(),
        }),
    }
}

fn read_logs_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::read_logs(&e).into()
}
fn write_logs_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}
fn read_vote_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::read_vote(&e).into()
}
fn write_vote_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::write_vote(&e).into()
}
fn write_sm_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&e).into()
}
fn read_snapshot_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::read_snapshot(None, &e).into()
}
fn write_snapshot_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, &e).into()
}

/// The applied state machine: what `sm` holds and what a snapshot carries.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    state: ClusterState,
}

impl Applied {
    fn index(&self) -> u64 {
        self.last_applied.map_or(0, |id| id.index)
    }

    /// Write the three `sm` keys in `txn`.
    fn persist(&self, txn: &WriteTransaction, op: Op<'_>) -> Result<(), StoreError> {
        let mut sm = txn.open_table(SM).map_err(|e| op.db(e))?;
        op.put(&mut sm, KEY_STATE, &self.state)?;
        op.put(&mut sm, KEY_LAST_APPLIED, &self.last_applied)?;
        op.put(&mut sm, KEY_MEMBERSHIP, &self.membership)?;
        Ok(())
    }
}

/// Shared between the state machine, its snapshot builders and the
/// agent's [`StateHandle`]s. The state is swapped whole, so readers see
/// either the state before a batch or after it, never in between.
#[derive(Debug)]
struct Shared {
    applied: RwLock<Arc<Applied>>,
    tx: watch::Sender<u64>,
}

impl Shared {
    fn current(&self) -> Arc<Applied> {
        Arc::clone(&self.applied.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn replace(&self, next: Arc<Applied>) {
        let index = next.index();
        *self.applied.write().unwrap_or_else(|e| e.into_inner()) = next;
        self.tx.send_replace(index);
    }
}

/// Open (or create) the store in the redb file at `path`. Blocking: call
/// it at startup, or from `spawn_blocking`.
pub fn open(path: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let database = Database::create(path).map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    let db = Arc::new(Db {
        db: database,
        path: path.to_path_buf(),
    });
    db.write("create tables", |txn, op| {
        txn.open_table(LOG).map_err(|e| op.db(e))?;
        txn.open_table(META).map_err(|e| op.db(e))?;
        txn.open_table(SM).map_err(|e| op.db(e))?;
        txn.open_table(SNAPSHOT).map_err(|e| op.db(e))?;
        let mut meta = txn.open_table(META).map_err(|e| op.db(e))?;
        match op.get::<u32>(&meta, KEY_FORMAT)? {
            Some(FORMAT_VERSION) => {}
            Some(found) => {
                return Err(StoreError::Format {
                    path: op.path.to_path_buf(),
                    found,
                })
            }
            // New, or written before the version was recorded (the same
            // format as version 1).
            None => op.put(&mut meta, KEY_FORMAT, &FORMAT_VERSION)?,
        }
        Ok(())
    })?;
    let (applied, seq) = db.read("load the state machine", |txn, op| {
        let sm = txn.open_table(SM).map_err(|e| op.db(e))?;
        let applied = Applied {
            last_applied: op.get(&sm, KEY_LAST_APPLIED)?.flatten(),
            membership: op.get(&sm, KEY_MEMBERSHIP)?.unwrap_or_default(),
            state: op.get(&sm, KEY_STATE)?.unwrap_or_default(),
        };
        let snap = txn.open_table(SNAPSHOT).map_err(|e| op.db(e))?;
        let seq: u64 = op.get(&snap, KEY_SNAP_SEQ)?.unwrap_or(0);
        Ok((applied, seq))
    })?;
    let (tx, _) = watch::channel(applied.index());
    let shared = Arc::new(Shared {
        applied: RwLock::new(Arc::new(applied)),
        tx,
    });
    Ok((
        LogStore {
            db: Arc::clone(&db),
        },
        StateMachineStore {
            db,
            shared,
            snapshot_seq: Arc::new(AtomicU64::new(seq)),
        },
    ))
}

// ---------------------------------------------------------------- log store

/// The Raft log and vote. Cloning is cheap; clones share the database and
/// serve as the log reader.
#[derive(Clone, Debug)]
pub struct LogStore {
    db: Arc<Db>,
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

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        blocking(&self.db, "save the committed log id", move |db| {
            db.write("save the committed log id", |txn, op| {
                let mut meta = txn.open_table(META).map_err(|e| op.db(e))?;
                op.put(&mut meta, KEY_COMMITTED, &committed)
            })
        })
        .await
        .map_err(write_logs_err)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        blocking(&self.db, "read the committed log id", |db| {
            db.read("read the committed log id", |txn, op| {
                let meta = txn.open_table(META).map_err(|e| op.db(e))?;
                Ok(op
                    .get::<Option<LogId<NodeId>>>(&meta, KEY_COMMITTED)?
                    .flatten())
            })
        })
        .await
        .map_err(read_logs_err)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let result = blocking(&self.db, "append log entries", move |db| {
            db.write("append log entries", |txn, op| {
                let mut log = txn.open_table(LOG).map_err(|e| op.db(e))?;
                for entry in &entries {
                    let bytes = op.encode(entry)?;
                    log.insert(entry.log_id.index, bytes.as_slice())
                        .map_err(|e| op.db(e))?;
                }
                Ok(())
            })
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

// ------------------------------------------------------------ state machine

/// The cluster state machine and its snapshots.
#[derive(Debug)]
pub struct StateMachineStore {
    db: Arc<Db>,
    shared: Arc<Shared>,
    snapshot_seq: Arc<AtomicU64>,
}

/// A cheap, cloneable read handle to the applied cluster state.
#[derive(Clone, Debug)]
pub struct StateHandle {
    shared: Arc<Shared>,
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
        let mut next = Applied::clone(&self.shared.current());
        let mut results = Vec::new();
        for entry in entries {
            next.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => CommandResult::Done,
                EntryPayload::Normal(cmd) => next.state.apply(&cmd),
                EntryPayload::Membership(membership) => {
                    next.membership = StoredMembership::new(Some(entry.log_id), membership);
                    CommandResult::Done
                }
            };
            results.push(result);
        }
        if results.is_empty() {
            return Ok(results);
        }
        let next = Arc::new(next);
        let to_write = Arc::clone(&next);
        blocking(&self.db, "persist the applied state", move |db| {
            db.write("persist the applied state", |txn, op| {
                to_write.persist(txn, op)
            })
        })
        .await
        .map_err(write_sm_err)?;
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
                to_write.persist(txn, op)?;
                let mut snap = txn.open_table(SNAPSHOT).map_err(|e| op.db(e))?;
                op.put(&mut snap, KEY_SNAP_META, &meta_owned)?;
                snap.insert(KEY_SNAP_DATA, data.as_slice())
                    .map_err(|e| op.db(e))?;
                Ok(())
            })
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
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
    db: Arc<Db>,
    shared: Arc<Shared>,
    snapshot_seq: Arc<AtomicU64>,
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
            db.write("store a built snapshot", |txn, op| {
                let data = op.encode(&(FORMAT_VERSION, &*current))?;
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

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
