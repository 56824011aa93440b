//! Tests of the redb store: openraft's own storage suite, plus durability
//! across reopen and the agent-facing state handle.

use std::collections::{BTreeMap, BTreeSet};

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    CommittedLeaderId, EntryPayload, LogId, Membership, RaftLogReader, RaftSnapshotBuilder,
    StorageError, Vote,
};
use tempfile::TempDir;

use super::*;
use crate::model::{ClusterConfig, Command, CommandResult, Rejection};

struct TempStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for TempStoreBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, sm) = open(&dir.path().join("raft.redb")).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(TempStoreBuilder).expect("openraft storage suite");
}

fn log_id(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn normal(term: u64, index: u64, cmd: Command) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(cmd),
    }
}

fn membership(term: u64, index: u64, voters: &[NodeId]) -> Entry {
    let nodes: BTreeMap<NodeId, Node> = voters
        .iter()
        .map(|&id| {
            (
                id,
                Node {
                    name: format!("n{id}"),
                    addr: format!("10.0.0.{id}:7000"),
                },
            )
        })
        .collect();
    let ids: BTreeSet<NodeId> = voters.iter().copied().collect();
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Membership(Membership::new(vec![ids], nodes)),
    }
}

const T0: u64 = 1_700_000_000_000;

/// Entries 1..=6: blank, membership {1}, init, add alpha, token beta,
/// join beta.
fn bootstrap_log() -> Vec<Entry> {
    vec![
        Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Blank,
        },
        membership(1, 2, &[1]),
        normal(
            1,
            3,
            Command::InitCluster {
                config: ClusterConfig {
                    voters: 3,
                    ca_fingerprint: "ca".into(),
                    subnet: None,
                    job_history: 0,
                },
            },
        ),
        normal(
            1,
            4,
            Command::AddMember {
                id: 1,
                name: "alpha".into(),
                addr: "10.0.0.1:7000".into(),
                cert_serial: "01".into(),
                now_ms: T0,
            },
        ),
        normal(
            1,
            5,
            Command::CreateToken {
                name: "beta".into(),
                secret_hash: "h".into(),
                now_ms: T0,
                expires_ms: T0 + 60_000,
                by: 1,
            },
        ),
        normal(
            2,
            6,
            Command::JoinMember {
                name: "beta".into(),
                secret_hash: "h".into(),
                addr: "10.0.0.2:7000".into(),
                cert_serial: "02".into(),
                now_ms: T0 + 1,
                by: 1,
            },
        ),
    ]
}

fn expected_state() -> ClusterState {
    let mut state = ClusterState::default();
    for entry in bootstrap_log() {
        if let EntryPayload::Normal(cmd) = entry.payload {
            state.apply(&cmd);
        }
    }
    state
}

#[tokio::test]
async fn apply_returns_results_in_order_and_publishes_whole_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(&dir.path().join("raft.redb")).unwrap();
    let handle = sm.state();
    let mut rx = handle.subscribe();
    assert_eq!(*rx.borrow_and_update(), 0);

    let results = sm.apply(bootstrap_log()).await.unwrap();
    assert_eq!(
        results,
        vec![
            CommandResult::Done,
            CommandResult::Done,
            CommandResult::Done,
            CommandResult::Done,
            CommandResult::Done,
            CommandResult::Joined { id: 2 },
        ]
    );
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), 6);
    assert_eq!(handle.last_applied_index(), 6);
    handle.read(|s| assert_eq!(*s, expected_state()));

    // A rejected command still advances last_applied and notifies.
    let again = normal(
        2,
        7,
        Command::JoinMember {
            name: "beta".into(),
            secret_hash: "h".into(),
            addr: "x".into(),
            cert_serial: "03".into(),
            now_ms: T0 + 2,
            by: 1,
        },
    );
    let results = sm.apply([again]).await.unwrap();
    assert_eq!(
        results,
        vec![CommandResult::Rejected(Rejection::NameTaken("beta".into()))]
    );
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow(), 7);
    handle.read(|s| assert_eq!(*s, expected_state()));

    let (last, mem) = sm.applied_state().await.unwrap();
    assert_eq!(last, Some(log_id(2, 7)));
    assert_eq!(mem.log_id(), &Some(log_id(1, 2)));
}

#[tokio::test]
async fn everything_survives_drop_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let vote = Vote::new_committed(2, 1);
    let snapshot_meta;
    {
        let (mut log, mut sm) = open(&path).unwrap();
        log.save_vote(&vote).await.unwrap();
        log.blocking_append(bootstrap_log()).await.unwrap();
        log.save_committed(Some(log_id(2, 6))).await.unwrap();
        sm.apply(bootstrap_log().into_iter().take(5)).await.unwrap();
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        snapshot_meta = snap.meta.clone();
        assert_eq!(snapshot_meta.last_log_id, Some(log_id(1, 5)));
        sm.apply(bootstrap_log().into_iter().skip(5)).await.unwrap();
        log.purge(log_id(1, 2)).await.unwrap();
        // Drop both halves: the file must hold everything now.
    }

    let (mut log, mut sm) = open(&path).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    // Not stored: openraft learns it from the leader again.
    assert_eq!(log.read_committed().await.unwrap(), None);
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
    assert_eq!(state.last_log_id, Some(log_id(2, 6)));
    let entries = log.try_get_log_entries(0..100).await.unwrap();
    let want: Vec<Entry> = bootstrap_log().into_iter().skip(2).collect();
    assert_eq!(entries, want);

    let (last, mem) = sm.applied_state().await.unwrap();
    assert_eq!(last, Some(log_id(2, 6)));
    assert_eq!(mem.log_id(), &Some(log_id(1, 2)));
    let handle = sm.state();
    assert_eq!(handle.last_applied_index(), 6);
    assert_eq!(*handle.subscribe().borrow(), 6);
    handle.read(|s| assert_eq!(*s, expected_state()));

    let current = sm.get_current_snapshot().await.unwrap().expect("snapshot");
    assert_eq!(current.meta, snapshot_meta);

    // A snapshot built after reopening gets a fresh id.
    let next = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_ne!(next.meta.snapshot_id, snapshot_meta.snapshot_id);
    assert_eq!(next.meta.last_log_id, Some(log_id(2, 6)));
}

#[tokio::test]
async fn installed_snapshot_replaces_state_durably() {
    let dir = tempfile::tempdir().unwrap();
    let (_l, mut leader) = open(&dir.path().join("leader.redb")).unwrap();
    leader.apply(bootstrap_log()).await.unwrap();
    let snap = leader
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();

    let follower_path = dir.path().join("follower.redb");
    {
        let (_l, mut follower) = open(&follower_path).unwrap();
        let mut rx = follower.state().subscribe();
        let mut receiving = follower.begin_receiving_snapshot().await.unwrap();
        *receiving = *snap.snapshot.clone();
        follower
            .install_snapshot(&snap.meta, receiving)
            .await
            .unwrap();
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow(), 6);
        follower.state().read(|s| assert_eq!(*s, expected_state()));
    }

    let (_l, mut follower) = open(&follower_path).unwrap();
    follower.state().read(|s| assert_eq!(*s, expected_state()));
    assert_eq!(
        follower.applied_state().await.unwrap(),
        (snap.meta.last_log_id, snap.meta.last_membership.clone())
    );
    let current = follower.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snap.meta);
    assert_eq!(current.snapshot.into_inner(), snap.snapshot.into_inner());
}

#[tokio::test]
async fn truncate_removes_the_tail_durably() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    {
        let (mut log, _sm) = open(&path).unwrap();
        log.blocking_append(bootstrap_log()).await.unwrap();
        log.truncate(log_id(1, 4)).await.unwrap();
    }
    let (mut log, _sm) = open(&path).unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(1, 3)));
    assert_eq!(log.try_get_log_entries(..).await.unwrap().len(), 3);
    // Empty and inverted ranges read nothing rather than panicking.
    assert!(log.try_get_log_entries(3..3).await.unwrap().is_empty());
    #[allow(clippy::reversed_empty_ranges)]
    let inverted = log.try_get_log_entries(5..2).await.unwrap();
    assert!(inverted.is_empty());
}

#[tokio::test]
async fn removed_and_changed_rows_stay_so_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let remove = normal(2, 7, Command::RemoveMember { id: 2 });
    let revoke = normal(
        2,
        8,
        Command::RevokeToken {
            name: "beta".into(),
        },
    );
    let want = {
        let (mut log, mut sm) = open(&path).unwrap();
        sm.apply(bootstrap_log()).await.unwrap();
        sm.apply([remove, revoke]).await.unwrap();
        // A synced write carries the unsynced applies to disk with it.
        log.save_vote(&Vote::new(2, 1)).await.unwrap();
        sm.state().read(|s| s.clone())
    };
    assert!(!want.members.contains_key(&2), "the removal applied");
    let (_log, sm) = open(&path).unwrap();
    sm.state().read(|s| assert_eq!(*s, want));
}

#[test]
fn open_error_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing-dir").join("raft.redb");
    let err = open(&path).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("missing-dir/raft.redb"), "{text}");
    assert!(matches!(err, StoreError::Open { .. }));
}

const KILL9_ENV: &str = "FERRY_RAFT_KILL9_DB";

/// Child half of `acknowledged_writes_survive_kill_9`: appends, votes and
/// applies forever, printing each index once all three returned.
#[tokio::test]
#[ignore = "run by acknowledged_writes_survive_kill_9 in a child process"]
async fn kill9_child_writer() {
    use std::io::Write;
    let Ok(path) = std::env::var(KILL9_ENV) else {
        return;
    };
    let (mut log, mut sm) = open(Path::new(&path)).unwrap();
    for i in 1..100_000u64 {
        let entry = normal(
            1,
            i,
            Command::AddMember {
                id: i,
                name: format!("n{i}"),
                addr: "a".into(),
                cert_serial: format!("{i:x}"),
                now_ms: T0,
            },
        );
        log.blocking_append([entry.clone()]).await.unwrap();
        log.save_vote(&Vote::new(i, 1)).await.unwrap();
        sm.apply([entry]).await.unwrap();
        let mut out = std::io::stdout().lock();
        writeln!(out, "acked {i}").unwrap();
        out.flush().unwrap();
    }
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::tests::kill9_child_writer",
            "--ignored",
            "--nocapture",
        ])
        .env(KILL9_ENV, &path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut acked = 0u64;
    for line in std::io::BufReader::new(stdout).lines() {
        if let Some(n) = line.unwrap().strip_prefix("acked ") {
            acked = n.parse().unwrap();
            if acked >= 25 {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL, mid-write most likely
    child.wait().unwrap();
    assert!(acked >= 25, "child stopped early after {acked}");

    let (mut log, mut sm) = open(&path).unwrap();
    let state = log.get_log_state().await.unwrap();
    let last = state.last_log_id.unwrap().index;
    assert!(
        last >= acked,
        "log lost acknowledged entries: {last} < {acked}"
    );
    let entries = log.try_get_log_entries(1..=last).await.unwrap();
    let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
    assert_eq!(indexes, (1..=last).collect::<Vec<_>>(), "log has a hole");
    let vote = log.read_vote().await.unwrap().unwrap();
    assert!(vote.leader_id().term >= acked);
    // Apply is not synced: the applied state may lag what was acked, by
    // what the next synced append had not yet carried to disk, but it is
    // a whole state at its index, and the log holds what comes after it.
    let (applied, _) = sm.applied_state().await.unwrap();
    let applied = applied.unwrap().index;
    assert!(applied + 1 >= acked, "applied {applied}, acked {acked}");
    sm.state().read(|s| {
        assert_eq!(s.members.len() as u64, applied);
        assert_eq!(s.next_node_id, applied + 1);
    });
    // Re-applying the log from there (as openraft does once it knows the
    // entries are committed) reaches every acked write.
    let rest = log.try_get_log_entries(applied + 1..=acked).await.unwrap();
    sm.apply(rest).await.unwrap();
    sm.state()
        .read(|s| assert_eq!(s.members.len() as u64, acked.max(applied)));
}

#[test]
fn store_of_another_format_version_is_refused_with_both_versions_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("raft.redb");
    drop(open(&path).expect("open a new store"));
    // A reopen of our own format works.
    drop(open(&path).expect("reopen"));
    {
        let db = Database::create(&path).expect("raw open");
        let txn = db.begin_write().expect("begin");
        {
            let mut meta = txn.open_table(META).expect("meta table");
            let future = codec::encode(&(FORMAT_VERSION + 1)).expect("encode");
            meta.insert(KEY_FORMAT, future.as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let Err(err) = open(&path) else {
        panic!("a store of another format must be refused");
    };
    assert!(matches!(err, StoreError::Format { found, .. } if found == FORMAT_VERSION + 1));
    assert!(
        err.to_string()
            .contains(&format!("format {FORMAT_VERSION}")),
        "{err}"
    );
}
