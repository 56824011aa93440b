//! The applied state as tables: one row per member, token, instance, job
//! and host job, and the rest of the state (config, counters, recent
//! requests) as one small row. A batch writes only the rows it changed,
//! found by diffing the persistent maps before and after it.

use imbl::ordmap::DiffItem;
use imbl::OrdMap;
use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::ClusterState;

use super::{Op, StoreError};

type Rows = TableDefinition<'static, &'static [u8], &'static [u8]>;

const MEMBERS: Rows = TableDefinition::new("members");
const TOKENS: Rows = TableDefinition::new("tokens");
const INSTANCES: Rows = TableDefinition::new("instances");
const JOBS: Rows = TableDefinition::new("jobs");
const HOST_JOBS: Rows = TableDefinition::new("host_jobs");

/// A map key as a row key; numbers big-endian so rows keep the map's order.
trait RowKey: Ord + Clone + Sized {
    fn to_row(&self) -> Vec<u8>;
    fn from_row(row: &[u8]) -> Option<Self>;
}

impl RowKey for u64 {
    fn to_row(&self) -> Vec<u8> {
        self.to_be_bytes().to_vec()
    }
    fn from_row(row: &[u8]) -> Option<Self> {
        Some(u64::from_be_bytes(row.try_into().ok()?))
    }
}

impl RowKey for String {
    fn to_row(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn from_row(row: &[u8]) -> Option<Self> {
        String::from_utf8(row.to_vec()).ok()
    }
}

/// Create the tables if they are missing.
pub(super) fn create(txn: &WriteTransaction, op: Op<'_>) -> Result<(), StoreError> {
    for table in [MEMBERS, TOKENS, INSTANCES, JOBS, HOST_JOBS] {
        txn.open_table(table).map_err(|e| op.db(e))?;
    }
    Ok(())
}

/// The state without its tables: what the `sm` table's `state` row holds.
pub(super) fn rest(state: &ClusterState) -> ClusterState {
    ClusterState {
        members: OrdMap::new(),
        tokens: OrdMap::new(),
        instances: OrdMap::new(),
        jobs: OrdMap::new(),
        host_jobs: OrdMap::new(),
        ..state.clone()
    }
}

/// Write the rows of `after` that differ from `before`.
pub(super) fn write_changes(
    txn: &WriteTransaction,
    op: Op<'_>,
    before: &ClusterState,
    after: &ClusterState,
) -> Result<(), StoreError> {
    write_diff(txn, op, MEMBERS, &before.members, &after.members)?;
    write_diff(txn, op, TOKENS, &before.tokens, &after.tokens)?;
    write_diff(txn, op, INSTANCES, &before.instances, &after.instances)?;
    write_diff(txn, op, JOBS, &before.jobs, &after.jobs)?;
    write_diff(txn, op, HOST_JOBS, &before.host_jobs, &after.host_jobs)
}

/// Replace every row with those of `state` (a snapshot being installed).
pub(super) fn write_all(
    txn: &WriteTransaction,
    op: Op<'_>,
    state: &ClusterState,
) -> Result<(), StoreError> {
    for table in [MEMBERS, TOKENS, INSTANCES, JOBS, HOST_JOBS] {
        txn.delete_table(table).map_err(|e| op.db(e))?;
    }
    write_changes(txn, op, &ClusterState::default(), state)
}

/// Fill `state`'s tables from the stored rows.
pub(super) fn load(
    txn: &ReadTransaction,
    op: Op<'_>,
    state: &mut ClusterState,
) -> Result<(), StoreError> {
    state.members = load_rows(txn, op, MEMBERS)?;
    state.tokens = load_rows(txn, op, TOKENS)?;
    state.instances = load_rows(txn, op, INSTANCES)?;
    state.jobs = load_rows(txn, op, JOBS)?;
    state.host_jobs = load_rows(txn, op, HOST_JOBS)?;
    Ok(())
}

fn write_diff<K: RowKey, V: Serialize + PartialEq>(
    txn: &WriteTransaction,
    op: Op<'_>,
    table: Rows,
    before: &OrdMap<K, V>,
    after: &OrdMap<K, V>,
) -> Result<(), StoreError> {
    if before.ptr_eq(after) {
        return Ok(());
    }
    let mut rows = txn.open_table(table).map_err(|e| op.db(e))?;
    for change in before.diff(after) {
        match change {
            DiffItem::Add(key, value)
            | DiffItem::Update {
                new: (key, value), ..
            } => {
                let bytes = op.encode(value)?;
                rows.insert(key.to_row().as_slice(), bytes.as_slice())
                    .map_err(|e| op.db(e))?;
            }
            DiffItem::Remove(key, _) => {
                rows.remove(key.to_row().as_slice()).map_err(|e| op.db(e))?;
            }
        }
    }
    Ok(())
}

fn load_rows<K: RowKey, V: DeserializeOwned + Clone>(
    txn: &ReadTransaction,
    op: Op<'_>,
    table: Rows,
) -> Result<OrdMap<K, V>, StoreError> {
    let rows = txn.open_table(table).map_err(|e| op.db(e))?;
    let mut map = OrdMap::new();
    for row in rows.iter().map_err(|e| op.db(e))? {
        let (key, value) = row.map_err(|e| op.db(e))?;
        let key = K::from_row(key.value()).ok_or_else(|| op.corrupt("a row key"))?;
        map.insert(key, op.decode(value.value())?);
    }
    Ok(map)
}
