//! Cluster core: bootstrap and join, leader failure, durable restart,
//! learners and voter replacement. Real agent processes on loopback.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use anyhow::{bail, Result};
use cluster_tests::{wait_for, Cluster};

const CONVERGE: Duration = Duration::from_secs(30);

fn three_member_cluster() -> Result<Cluster> {
    let mut cluster = Cluster::new();
    cluster.bootstrap("n1", 3)?;
    cluster.join("n2", 0)?;
    cluster.join("n3", 1)?;
    Ok(cluster)
}

#[test]
fn three_agents_agree_on_members_and_exactly_one_leader() -> Result<()> {
    let cluster = three_member_cluster()?;
    cluster.wait_converged(&["n1", "n2", "n3"], CONVERGE)?;
    cluster.wait_voters(2, 3, CONVERGE)?;
    // Every member's JSON carries the documented fields.
    for member in cluster.members(0)? {
        for field in [
            "name", "id", "address", "role", "leader", "liveness", "state",
        ] {
            assert!(member.get(field).is_some(), "{field} missing in {member}");
        }
        assert_eq!(member["state"], "online");
    }
    // Facts reach every member through Raft.
    let show = wait_for("facts of n3 on n1", CONVERGE, || {
        let v = cluster.ferry_json(0, &["cluster", "show", "n3"])?;
        if v["facts"]["kernel"].is_string() {
            Ok(v)
        } else {
            bail!("no facts yet: {v}")
        }
    })?;
    for field in [
        "arch",
        "cpu_model",
        "cpu_flags",
        "kernel",
        "syscalls",
        "filesystems",
        "memory_total_bytes",
        "runtimes",
    ] {
        assert!(show["facts"].get(field).is_some(), "facts.{field} missing");
    }
    assert!(show["facts"]["memory_total_bytes"].as_u64().unwrap_or(0) > 0);
    assert!(show["facts"]["filesystems"]
        .as_array()
        .is_some_and(|f| !f.is_empty()));
    Ok(())
}

#[test]
fn leader_kill_elects_a_new_leader_and_the_restarted_agent_catches_up() -> Result<()> {
    let mut cluster = three_member_cluster()?;
    let leader = cluster.wait_converged(&["n1", "n2", "n3"], CONVERGE)?;
    cluster.wait_voters(0, 3, CONVERGE)?;
    let dead = cluster.index_of(&leader).unwrap_or(0);
    cluster.kill(dead);
    let survivor = (dead + 1) % 3;
    // A write succeeds once a new leader is elected.
    cluster.token(survivor, "after-failover", "1h")?;
    let new_leader = wait_for("a new leader", CONVERGE, || {
        let members = cluster.members(survivor)?;
        match members.iter().find(|m| m["leader"] == true) {
            Some(m) if m["name"] != leader.as_str() => Ok(m["name"].to_string()),
            other => bail!("leader is {other:?}"),
        }
    })?;
    assert_ne!(new_leader, leader);
    cluster.restart(dead)?;
    // The restarted agent sees the token written while it was down.
    wait_for("the restarted agent to catch up", CONVERGE, || {
        let list = cluster.ferry_json(dead, &["cluster", "token", "list"])?;
        let names: Vec<&str> = list
            .as_array()
            .map(|a| a.iter().filter_map(|t| t["name"].as_str()).collect())
            .unwrap_or_default();
        if names.contains(&"after-failover") {
            Ok(())
        } else {
            bail!("tokens {names:?}")
        }
    })?;
    cluster.wait_converged(&["n1", "n2", "n3"], CONVERGE)?;
    Ok(())
}

#[test]
fn kill_all_and_restart_keeps_members_tokens_and_facts() -> Result<()> {
    let mut cluster = three_member_cluster()?;
    cluster.wait_converged(&["n1", "n2", "n3"], CONVERGE)?;
    cluster.token(0, "later", "2h")?;
    let facts_before = wait_for("facts of all members", CONVERGE, || {
        let mut all = Vec::new();
        for name in ["n1", "n2", "n3"] {
            let v = cluster.ferry_json(1, &["cluster", "show", name])?;
            if v["facts"].is_null() {
                bail!("{name} has no facts yet");
            }
            all.push(v["facts"].clone());
        }
        Ok(all)
    })?;
    for i in 0..3 {
        cluster.kill(i);
    }
    for i in 0..3 {
        cluster.restart(i)?;
    }
    cluster.wait_converged(&["n1", "n2", "n3"], CONVERGE)?;
    for (i, name) in ["n1", "n2", "n3"].iter().enumerate() {
        let v = cluster.ferry_json(2, &["cluster", "show", name])?;
        assert_eq!(v["facts"], facts_before[i], "facts of {name} changed");
    }
    let tokens = cluster.ferry_json(0, &["cluster", "token", "list"])?;
    let later = tokens
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == "later").cloned());
    assert_eq!(later.map(|t| t["status"].clone()), Some("valid".into()));
    Ok(())
}

#[test]
fn learners_join_and_removing_a_voter_promotes_a_learner() -> Result<()> {
    let mut cluster = three_member_cluster()?;
    cluster.wait_converged(&["n1", "n2", "n3"], CONVERGE)?;
    cluster.join("n4", 0)?;
    cluster.join("n5", 2)?;
    cluster.wait_converged(&["n1", "n2", "n3", "n4", "n5"], CONVERGE)?;
    let roles = wait_for("three voters and two learners", CONVERGE, || {
        let roles = cluster.roles(3)?;
        let learners = roles.values().filter(|r| *r == "learner").count();
        if learners == 2 && cluster.voters(3)?.len() == 3 {
            Ok(roles)
        } else {
            bail!("roles {roles:?}")
        }
    })?;
    assert_eq!(roles["n4"], "learner");
    assert_eq!(roles["n5"], "learner");
    let keys: Vec<_> = (cluster.agents.iter())
        .map(|a| a.data_dir.join("tls/ca.key"))
        .collect();
    let ca_key = |i: usize| keys[i].clone();
    for i in 0..5 {
        // Only voters hold the CA key; learners got theirs signed by one.
        assert_eq!(ca_key(i).exists(), i < 3, "CA key on {}", i + 1);
    }

    // Remove a voter that is not the one we ask through.
    cluster.ferry_ok(0, &["cluster", "remove", "n2"])?;
    let code = cluster.wait_exit(1, CONVERGE)?;
    assert_ne!(code, Some(0), "a removed agent exits non-zero saying why");
    wait_for("a learner promoted to voter", CONVERGE, || {
        let roles = cluster.roles(0)?;
        let v = cluster.voters(0)?;
        if roles.contains_key("n2") {
            bail!("n2 still listed: {roles:?}");
        }
        if v.len() == 3 && (v.contains(&"n4".into()) || v.contains(&"n5".into())) {
            Ok(())
        } else {
            bail!("roles {roles:?}")
        }
    })?;
    assert!(!ca_key(1).exists(), "the removed member kept the CA key");
    wait_for("the promoted learner holding the CA key", CONVERGE, || {
        let v = cluster.voters(0)?;
        let promoted = if v.contains(&"n4".into()) { 3 } else { 4 };
        if ca_key(promoted).exists() {
            Ok(())
        } else {
            bail!("no CA key on n{} yet", promoted + 1)
        }
    })?;
    // The cluster still commits writes.
    cluster.token(4, "n6", "1h")?;
    Ok(())
}

#[test]
fn snapshots_purge_the_log_and_bring_a_late_member_up_to_date() -> Result<()> {
    let mut cluster = Cluster::new();
    cluster.agent_flags = vec!["--snapshot-every".into(), "20".into()];
    cluster.bootstrap("n1", 3)?;
    cluster.join("n2", 0)?;
    cluster.wait_converged(&["n1", "n2"], CONVERGE)?;
    for i in 0..60 {
        cluster.token(i % 2, &format!("t{i}"), "1h")?;
    }
    // Both logs were purged behind a snapshot, so n3 can only catch up
    // from one.
    for (i, name) in ["n1", "n2"].iter().enumerate() {
        wait_for(&format!("a snapshot and purge on {name}"), CONVERGE, || {
            let raft = cluster.ferry_json(i, &["cluster", "show", name])?["raft"].clone();
            if raft["snapshot_index"].as_u64() >= Some(20)
                && raft["purged_index"].as_u64() > Some(0)
            {
                Ok(())
            } else {
                bail!("raft {raft}")
            }
        })?;
    }
    cluster.join("n3", 1)?;
    cluster.wait_converged(&["n1", "n2", "n3"], CONVERGE)?;
    wait_for("n3 to hold every token", CONVERGE, || {
        let list = cluster.ferry_json(2, &["cluster", "token", "list"])?;
        let count = list.as_array().map_or(0, |a| a.len());
        if count >= 61 {
            Ok(())
        } else {
            bail!("n3 has {count} tokens")
        }
    })?;
    let raft = cluster.ferry_json(2, &["cluster", "show", "n3"])?["raft"].clone();
    assert!(
        raft["snapshot_index"].as_u64() > Some(0),
        "n3 installed no snapshot: {raft}"
    );
    // And everything survives a restart from snapshot + log.
    for i in 0..3 {
        cluster.kill(i);
    }
    for i in 0..3 {
        cluster.restart(i)?;
    }
    cluster.wait_converged(&["n1", "n2", "n3"], CONVERGE)?;
    let list = cluster.ferry_json(2, &["cluster", "token", "list"])?;
    assert!(list.as_array().map_or(0, |a| a.len()) >= 61);
    Ok(())
}
