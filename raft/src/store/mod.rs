//! Durable Raft storage on one redb database file per agent.
//!
//! Tables:
//! - `log`: index → encoded `Entry`;
//! - `meta`: `vote`, `last_purged_log_id` (the committed log id is kept in
//!   memory only, see `LogStore::save_committed`);
//! - `sm`: `state` (the encoded [`ClusterState`] without its tables),
//!   `last_applied`, `last_membership`;
//! - `members`, `tokens`, `instances`, `jobs`, `host_jobs`: one row each
//!   (`tables.rs`), written per batch only where the batch changed them,
//!   in the same transaction as the `sm` keys;
//! - `snapshot`: `meta`, `data` and `seq` (the counter in snapshot ids).
//!
//! Durability comes from the log: append, vote, truncate and purge commit
//! with an fsync before the call returns (for `append`, before the flush
//! callback fires). Apply and a built snapshot commit without one: redb
//! makes them durable with the next synced commit, and a crash before that
//! loses only state the log re-applies (openraft applies the log after
//! `last_applied` once the leader says it is committed; a purge is synced,
//! so the entries after the persisted state are always there). One fsync
//! per append, none per apply or commit. The redb calls are blocking and
//! run on tokio's blocking pool.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use openraft::{LogId, StorageError, StorageIOError, StoredMembership};
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::model::{ClusterState, Node, NodeId};
use crate::TypeConfig;
use ferry_transport::codec;

type Entry = openraft::Entry<TypeConfig>;
type Membership = StoredMembership<NodeId, Node>;
type StorageResult<T> = Result<T, StorageError<NodeId>>;

const LOG: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("meta");
const SM: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("sm");
const SNAPSHOT: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("snapshot");

const KEY_VOTE: &str = "vote";
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
pub const FORMAT_VERSION: u32 = 10;

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
    #[error(
        "raft store {}: {op}: {what} is unreadable; restore the data dir from a backup \
         or remove this member and join it anew",
        .path.display()
    )]
    Corrupt {
        path: PathBuf,
        op: &'static str,
        what: &'static str,
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

    fn corrupt(self, what: &'static str) -> StoreError {
        StoreError::Corrupt {
            path: self.path.to_path_buf(),
            op: self.op,
            what,
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
        table: &mut redb::Table<'_, &str, &[u8]>,
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
        self.write_with(Durability::Immediate, op, f)
    }

    /// One write transaction committed without an fsync: durable with the
    /// next [`Db::write`] (see the module's note on what may be lost).
    fn write_unsynced<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&WriteTransaction, Op<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.write_with(Durability::None, op, f)
    }

    fn write_with<T>(
        &self,
        durability: Durability,
        op: &'static str,
        f: impl FnOnce(&WriteTransaction, Op<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let op = self.op(op);
        let mut txn = self.db.begin_write().map_err(|e| op.db(e))?;
        txn.set_durability(durability).map_err(|e| op.db(e))?;
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

    /// Write the `sm` keys and the table rows that differ from `before`
    /// (every row, replacing what is stored, without a `before`).
    fn persist(
        &self,
        before: Option<&Applied>,
        txn: &WriteTransaction,
        op: Op<'_>,
    ) -> Result<(), StoreError> {
        {
            let mut sm = txn.open_table(SM).map_err(|e| op.db(e))?;
            op.put(&mut sm, KEY_STATE, &tables::rest(&self.state))?;
            op.put(&mut sm, KEY_LAST_APPLIED, &self.last_applied)?;
            op.put(&mut sm, KEY_MEMBERSHIP, &self.membership)?;
        }
        match before {
            Some(before) => tables::write_changes(txn, op, &before.state, &self.state),
            None => tables::write_all(txn, op, &self.state),
        }
    }

    /// The stored state machine: the `sm` keys and the tables.
    fn load(txn: &ReadTransaction, op: Op<'_>) -> Result<Applied, StoreError> {
        let sm = txn.open_table(SM).map_err(|e| op.db(e))?;
        let mut applied = Applied {
            last_applied: op.get(&sm, KEY_LAST_APPLIED)?.flatten(),
            membership: op.get(&sm, KEY_MEMBERSHIP)?.unwrap_or_default(),
            state: op.get(&sm, KEY_STATE)?.unwrap_or_default(),
        };
        tables::load(txn, op, &mut applied.state)?;
        Ok(applied)
    }
}

/// Shared between the state machine, its snapshot builders and the
/// agent's [`StateHandle`]s. The state is swapped whole, so readers see
/// either the state before a batch or after it, never in between.
#[derive(Debug)]
struct Shared {
    applied: RwLock<Arc<Applied>>,
    tx: watch::Sender<u64>,
    events: std::sync::Mutex<EventLog>,
}

impl Shared {
    fn current(&self) -> Arc<Applied> {
        Arc::clone(&self.applied.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn events(&self) -> std::sync::MutexGuard<'_, EventLog> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
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
        tables::create(txn, op)?;
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
        let applied = Applied::load(txn, op)?;
        let snap = txn.open_table(SNAPSHOT).map_err(|e| op.db(e))?;
        let seq: u64 = op.get(&snap, KEY_SNAP_SEQ)?.unwrap_or(0);
        Ok((applied, seq))
    })?;
    let (tx, _) = watch::channel(applied.index());
    let shared = Arc::new(Shared {
        events: std::sync::Mutex::new(EventLog::after(applied.index())),
        applied: RwLock::new(Arc::new(applied)),
        tx,
    });
    Ok((
        LogStore {
            db: Arc::clone(&db),
            committed: Arc::default(),
            tail: Arc::default(),
        },
        StateMachineStore {
            db,
            shared,
            snapshot_seq: Arc::new(AtomicU64::new(seq)),
        },
    ))
}

mod event_log;
mod log;
mod state_machine;
mod tables;
mod tail;

use event_log::EventLog;
use tail::Tail;

pub use event_log::{EventPage, EVENTS_KEPT};

pub use log::LogStore;
pub use state_machine::{SnapshotBuilder, StateHandle, StateMachineStore, StateWatch};

#[cfg(test)]
mod tests;
