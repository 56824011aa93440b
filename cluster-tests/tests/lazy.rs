//! `ferry move --lazy`: a container moved with CRIU lazy pages. The target
//! runs before it has every page, fetching them from the source's frozen
//! copy; the job is Done once it has them all. A sampler fails the test
//! if two copies ever run at once.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use anyhow::Result;
use cluster_tests::{busybox_rootfs, require_container_runtime, Cluster};

/// What the lazy page server needs on the source (scripts/install-deps.sh
/// sets it); under CI its absence fails the test.
fn lazy_pages_allowed() -> bool {
    let size: u64 = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if size >= 4 << 20 {
        return true;
    }
    let why = "fs.pipe-max-size >= 4194304 (scripts/install-deps.sh sets it)";
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: the lazy move test needs {why}"
    );
    eprintln!("SKIPPED: the lazy move test needs {why}");
    false
}

#[test]
fn a_lazy_move_keeps_the_memory_and_its_dry_run_says_there_is_no_way_back() -> Result<()> {
    if !require_container_runtime() || !lazy_pages_allowed() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    cluster.start_three()?;
    let rootfs = busybox_rootfs(cluster.root())?;
    cluster.launch_counter_holding("c1", "n2", &rootfs, 64)?;

    let dry = cluster.ferry_ok(0, &["move", "c1", "--target", "n3", "--lazy", "--dry-run"])?;
    assert!(dry.contains("no way back"), "{dry}");
    let push = cluster.ferry(
        0,
        &["move", "c1", "--target", "n3", "--lazy", "--mode", "push"],
    );
    assert!(!push.status.success());
    assert!(String::from_utf8_lossy(&push.stderr).contains("--mode push"));

    let sampler = cluster.sampler("c1");
    let before = cluster.counter(0, "c1")?;
    let out = cluster.ferry_ok(0, &["move", "c1", "--target", "n3", "--lazy"])?;
    assert!(out.contains("downtime"), "{out}");
    let job = cluster.ferry_json(0, &["job", "show", "1"])?;
    assert_eq!(job["phase"], "Done", "{job}");
    assert!(job["error"].is_null(), "{job}");
    let report = job["report"].to_string();
    assert!(report.contains("lazy"), "{job}");
    // Restarted, it would count from 1 again: the memory came.
    let after = cluster.counter(0, "c1")?;
    assert!(
        after >= before,
        "the counter went back: {before} -> {after}"
    );
    let held = cluster.ferry_ok(0, &["exec", "c1", "--", "sh", "-c", "echo ok"])?;
    assert_eq!(held.trim(), "ok");
    assert_eq!(sampler.finish(), 1, "two copies ran at once");
    let source_dir = cluster.agents[1].data_dir.join("instances/c1");
    cluster_tests::wait_for(
        "n2's copy removed",
        std::time::Duration::from_secs(30),
        || match source_dir.exists() {
            true => anyhow::bail!("{} is still there", source_dir.display()),
            false => Ok(()),
        },
    )?;
    Ok(())
}

/// Job 1 once it is in one of `phases`.
fn wait_phase(cluster: &Cluster, phases: &[&str]) -> Result<serde_json::Value> {
    let what = format!("job 1 in {phases:?}");
    cluster_tests::wait_for(&what, std::time::Duration::from_secs(120), || {
        let job = cluster.ferry_json(0, &["job", "show", "1"])?;
        match job["phase"].as_str() {
            Some(p) if phases.contains(&p) => Ok(job),
            other => anyhow::bail!("phase {other:?}"),
        }
    })
}

/// Pids of every process whose command line holds all of `words`.
fn processes_with(words: &[&str]) -> Vec<u32> {
    ferry_agent::driver::all_pids()
        .into_iter()
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            words.iter().all(|w| cmdline.contains(w))
        })
        .collect()
}

#[test]
fn a_lazy_move_whose_source_dies_after_the_switch_kills_the_target_copy_and_says_so() -> Result<()>
{
    if !require_container_runtime() || !lazy_pages_allowed() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    cluster.start_three()?;
    let rootfs = busybox_rootfs(cluster.root())?;
    // Its pages take seconds to come after the thaw: time to cut them.
    cluster.launch_counter_holding("c1", "n2", &rootfs, 256)?;
    let sampler = cluster.sampler("c1");
    cluster.ferry_ok(0, &["move", "c1", "--target", "n3", "--lazy", "--detach"])?;
    let job = wait_phase(&cluster, &["Restored", "Done"])?;
    let phase = job["phase"].to_string();
    // The source's lazy dump (runc and its CRIU) dies mid-fetch.
    let source_root = cluster.agents[1].data_dir.join("runc");
    let source_root = source_root.to_string_lossy();
    let dumps = processes_with(&["runc", source_root.as_ref(), "checkpoint", "--lazy-pages"]);
    assert!(
        !dumps.is_empty(),
        "no lazy dump running on n2 (phase {phase})"
    );
    for runc in dumps {
        ferry_agent::driver::end_process_tree(runc);
    }
    let job = wait_phase(&cluster, &["Done"])?;
    let error = job["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("page fetch failed after the copy on 'n3' began to run"),
        "{job}"
    );
    assert!(error.contains("memory state is lost"), "{job}");
    assert_eq!(sampler.finish(), 1, "two copies ran at once");
    Ok(())
}

#[test]
fn a_lazy_move_whose_target_cannot_restore_rolls_back_and_the_source_runs_on() -> Result<()> {
    if !require_container_runtime() || !lazy_pages_allowed() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    cluster.start_three()?;
    let rootfs = busybox_rootfs(cluster.root())?;
    cluster.launch_counter_holding("c1", "n2", &rootfs, 16)?;
    // The target's restore fails before its lazy-pages daemon connects:
    // the source's lazy dump waits for it, holding the tasks, until the
    // rollback ends it.
    std::fs::write(cluster.agents[2].data_dir.join("fail-restore"), "")?;
    let sampler = cluster.sampler("c1");
    let out = cluster.ferry(0, &["move", "c1", "--target", "n3", "--lazy"]);
    assert!(!out.status.success());
    let job = cluster.ferry_json(0, &["job", "show", "1"])?;
    assert_eq!(job["phase"], "RolledBack", "{job}");
    // The source's copy counts again.
    let before = cluster.counter(0, "c1")?;
    cluster.wait_counter("c1", before + 1)?;
    assert_eq!(sampler.finish(), 1, "two copies ran at once");
    Ok(())
}

#[test]
fn a_lazy_dump_left_by_a_crashed_source_agent_ends_when_it_restarts() -> Result<()> {
    if !require_container_runtime() || !lazy_pages_allowed() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    cluster.agent_env = vec![("FERRY_TEST_HOLD_AT".into(), "Switched".into())];
    cluster.start_three()?;
    let rootfs = busybox_rootfs(cluster.root())?;
    cluster.launch_counter_holding("c1", "n2", &rootfs, 16)?;
    // The target holds at Switched: the source's lazy dump waits for it.
    std::fs::write(cluster.agents[2].data_dir.join("hold"), "")?;
    let sampler = cluster.sampler("c1");
    cluster.ferry_ok(0, &["move", "c1", "--target", "n3", "--lazy", "--detach"])?;
    wait_phase(&cluster, &["Switched"])?;
    let source_root = cluster.agents[1].data_dir.join("runc");
    let source_root = source_root.to_string_lossy().into_owned();
    let dump = ["runc", source_root.as_str(), "checkpoint", "--lazy-pages"];
    assert!(!processes_with(&dump).is_empty(), "no lazy dump on n2");
    cluster.kill(1);
    // It outlives the agent that started it.
    assert!(
        !processes_with(&dump).is_empty(),
        "the lazy dump died with n2"
    );
    cluster.restart(1)?;
    cluster_tests::wait_for(
        "the restarted n2 to end the lazy dump",
        std::time::Duration::from_secs(60),
        || match processes_with(&dump).len() {
            0 => Ok(()),
            n => anyhow::bail!("{n} still running"),
        },
    )?;
    // The target cannot fetch from it: the move switches back and the
    // source's copy runs on.
    std::fs::remove_file(cluster.agents[2].data_dir.join("hold"))?;
    wait_phase(&cluster, &["RolledBack"])?;
    // The source's copy counts again.
    let before = cluster.counter(0, "c1")?;
    cluster.wait_counter("c1", before + 1)?;
    assert_eq!(sampler.finish(), 1, "two copies ran at once");
    Ok(())
}
