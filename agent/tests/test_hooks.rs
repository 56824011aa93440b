//! Testing aids exist only in a test build: the binary users run ignores
//! `FERRY_TEST_HIDE_FACTS`, so it cannot report a host as having less (or,
//! for an instance's baseline, the source as needing less) than it does.
//! Its own test binary: it sets an environment variable.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use ferry_agent::facts::{probe, HIDE_FACTS_ENV};
use ferry_raft::Runtimes;

async fn filesystems_with_proc_hidden() -> Vec<String> {
    // Edition 2021: set_var is safe; this binary runs no other test
    // that reads the environment at the same time.
    std::env::set_var(HIDE_FACTS_ENV, "fs:proc");
    let dir = tempfile::tempdir().unwrap();
    probe(dir.path(), Runtimes::default()).await.filesystems
}

#[cfg(not(feature = "test-hooks"))]
#[tokio::test]
async fn a_user_build_ignores_the_hide_facts_variable() {
    let filesystems = filesystems_with_proc_hidden().await;
    assert!(filesystems.iter().any(|f| f == "proc"), "{filesystems:?}");
}

#[cfg(feature = "test-hooks")]
#[tokio::test]
async fn a_test_build_hides_the_named_facts() {
    let filesystems = filesystems_with_proc_hidden().await;
    assert!(!filesystems.iter().any(|f| f == "proc"), "{filesystems:?}");
}
