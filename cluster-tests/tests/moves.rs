//! `ferry move`: live migration of the counter container between agents on
//! loopback, compatibility refusals and bad requests. A sampler fails a
//! test if two copies ever run at once.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use anyhow::{bail, Context, Result};
use cluster_tests::partition::Partition;
use cluster_tests::{
    busybox_rootfs, require_container_runtime, require_partition_tools, wait_for, Cluster,
};

const CONVERGE: Duration = Duration::from_secs(30);

/// n1, n2, n3 with the counter instance on n2.
fn cluster_with_counter(cluster: Cluster) -> Result<Cluster> {
    cluster_with_counter_and_ballast(cluster, 0)
}

/// As above, with `ballast_mib` of random data in the rootfs so that the
/// transfer lasts long enough to interfere with.
fn cluster_with_counter_and_ballast(cluster: Cluster, ballast_mib: usize) -> Result<Cluster> {
    cluster_with_counter_sized(cluster, ballast_mib, 0)
}

/// n1, n2, n3 with the counter instance on n2: `ballast_mib` of random data
/// in its rootfs (a long pre-sync) and `memory_mib` held in memory (a long
/// freeze: the dump and its transfer).
fn cluster_with_counter_sized(
    cluster: Cluster,
    ballast_mib: usize,
    memory_mib: usize,
) -> Result<Cluster> {
    let mut cluster = cluster;
    // Facts of every member must be in before checks can run.
    cluster.start_three()?;
    let rootfs = busybox_rootfs(cluster.root())?;
    if ballast_mib > 0 {
        let ballast = cluster_tests::pseudo_random(ballast_mib << 20);
        std::fs::write(rootfs.join("ballast"), ballast)?;
    }
    cluster.launch_counter_holding("c1", "n2", &rootfs, memory_mib)?;
    Ok(cluster)
}

fn owner(cluster: &Cluster) -> Result<String> {
    let list = cluster.ferry_json(0, &["list"])?;
    Ok(list[0]["node"].as_str().unwrap_or_default().to_string())
}

#[test]
fn live_move_keeps_memory_and_files_back_and_forth() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let cluster = cluster_with_counter(Cluster::new())?;
    cluster.ferry_ok(0, &["exec", "c1", "--", "sh", "-c", "echo kept > /file"])?;
    let sampler = cluster.sampler("c1");
    let mut last = cluster.counter(0, "c1")?;
    for (round, target) in ["n3", "n1", "n2", "n3", "n1"].iter().enumerate() {
        let out = cluster.ferry_ok(0, &["move", "c1", "--target", target])?;
        assert!(out.contains("downtime"), "{out}");
        assert_eq!(owner(&cluster)?, *target);
        let now = cluster.counter(0, "c1")?;
        // Restarted, it would count from 1 again.
        assert!(
            now >= last,
            "round {round}: counter went back from {last} to {now}"
        );
        last = now;
        let file = cluster.ferry_ok(0, &["exec", "c1", "--", "cat", "/file"])?;
        assert_eq!(file.trim(), "kept");
    }
    let most = sampler.finish();
    assert_eq!(most, 1, "at some moment {most} copies ran");
    let list = cluster.ferry_json(1, &["list"])?;
    assert_eq!(
        (list[0]["state"].as_str(), list[0]["epoch"].as_u64()),
        (Some("running"), Some(6))
    );
    let job = cluster.ferry_json(0, &["job", "show", "5"])?;
    assert_eq!(job["phase"], "Done");
    for field in ["downtime_ms", "total_ms", "bytes"] {
        assert!(job[field].as_u64().is_some_and(|v| v > 0), "{field}: {job}");
    }
    assert!(job["notes"].to_string().contains("pre-copy"), "{job}");
    // Only the owner holds files of the instance.
    for agent in &cluster.agents {
        let has = agent.data_dir.join("instances/c1").exists();
        assert_eq!(
            has,
            agent.name == "n1",
            "{} has leftovers: {has}",
            agent.name
        );
    }
    Ok(())
}

/// Every regular file under `dir` (symlinks not followed) whose bytes
/// contain `needle`.
fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Result<Vec<std::path::PathBuf>> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                let bytes = std::fs::read(entry.path())?;
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(entry.path());
                }
            }
        }
    }
    Ok(found)
}

#[test]
fn a_container_swapping_a_file_for_a_host_symlink_during_a_move_gets_nothing_from_the_host(
) -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    // Ballast makes the first pass long enough for many swaps.
    let cluster = cluster_with_counter_and_ballast(Cluster::new(), 16)?;
    let secret = format!("HOST-SECRET-{}", std::process::id());
    let host_file = cluster.root().join("host-secret");
    std::fs::write(&host_file, &secret)?;
    // Inside the container the link dangles; a sender that followed it on
    // the host would read the host's file. Bounded: 20000 swaps at most.
    let swapper = format!(
        "i=0; while [ $i -lt 20000 ]; do echo plain > /swap.new; mv /swap.new /swap; \
         ln -s {0} /swap.lnk; mv /swap.lnk /swap; mkdir -p /d; ln -sfn {0} /d/inner; \
         i=$((i+1)); done",
        host_file.display()
    );
    let background = format!("sh -c '{swapper}' </dev/null >/dev/null 2>&1 &");
    cluster.ferry_ok(0, &["exec", "c1", "--", "sh", "-c", &background])?;
    wait_for("the swapping to start", CONVERGE, || {
        let out = cluster.ferry_ok(0, &["exec", "c1", "--", "ls", "-l", "/d"])?;
        if out.contains("inner") {
            Ok(())
        } else {
            bail!("no /d/inner yet: {out}")
        }
    })?;
    let out = cluster.ferry_ok(0, &["move", "c1", "--target", "n3"])?;
    assert!(out.contains("downtime"), "{out}");
    assert_eq!(owner(&cluster)?, "n3");
    // The swapping went on there; stopped, the tree holds still.
    cluster.ferry_ok(0, &["stop", "c1"])?;
    let received = cluster.agents[2].data_dir.join("instances/c1");
    let leaked = files_containing(&received, secret.as_bytes())?;
    assert!(
        leaked.is_empty(),
        "host file content reached the target: {leaked:?}"
    );
    // What arrived is the container's own: a plain file or the link itself.
    let swap = received.join("bundle/rootfs/swap");
    let meta = std::fs::symlink_metadata(&swap)?;
    if meta.file_type().is_symlink() {
        assert_eq!(std::fs::read_link(&swap)?, host_file);
    } else {
        assert_eq!(std::fs::read_to_string(&swap)?, "plain\n");
    }
    Ok(())
}

#[test]
fn a_move_between_hosts_whose_clocks_are_minutes_off_completes() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    // The source runs ten minutes ahead, the target ten behind; the
    // leader's deadlines (60 s a phase) must not see their phases as
    // twenty minutes old, nor as not yet begun.
    let mut cluster = Cluster::new();
    let offset = |ms: &str| vec![("FERRY_TEST_CLOCK_OFFSET_MS".to_string(), ms.to_string())];
    cluster.env_for.insert("n2".into(), offset("600000"));
    cluster.env_for.insert("n3".into(), offset("-600000"));
    let cluster = cluster_with_counter(cluster)?;
    let before = cluster.counter(0, "c1")?;
    let out = cluster.ferry_ok(0, &["move", "c1", "--target", "n3"])?;
    assert!(out.contains("downtime"), "{out}");
    assert_eq!(owner(&cluster)?, "n3");
    assert!(cluster.counter(0, "c1")? >= before, "the counter restarted");
    Ok(())
}

#[test]
fn a_failed_criu_dump_puts_criu_s_reason_in_the_job_and_the_instance_runs_on() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let cluster = cluster_with_counter(Cluster::new())?;
    // An established TCP connection inside the container: CRIU refuses
    // to dump it without --tcp-established, which ferry does not pass
    // (yet: the networking issue changes that, and this test with it).
    let talk = "(sleep 300 | nc -l -p 5000) </dev/null >/dev/null 2>&1 & \
                sleep 1; (sleep 300 | nc 127.0.0.1 5000) </dev/null >/dev/null 2>&1 &";
    cluster.ferry_ok(0, &["exec", "c1", "--", "sh", "-c", talk])?;
    wait_for("an established connection", CONVERGE, || {
        let tcp = cluster.ferry_ok(0, &["exec", "c1", "--", "cat", "/proc/net/tcp"])?;
        // Column 4 is the state; 01 is ESTABLISHED.
        let established = tcp
            .lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(3) == Some("01"));
        if established {
            Ok(())
        } else {
            bail!("no established connection yet: {tcp}")
        }
    })?;
    let err = cluster.ferry_err(0, &["move", "c1", "--target", "n3"])?;
    assert!(err.contains("CRIU says:"), "{err}");
    let job = cluster.ferry_json(0, &["job", "show", "1"])?;
    assert_eq!(job["phase"], "RolledBack", "{job}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(error.contains("tcp-established"), "{error}");
    let kept = cluster.agents[1]
        .data_dir
        .join("instances/c1/criu-checkpoint.log");
    assert!(error.contains(&kept.display().to_string()), "{error}");
    // The sweep of staging areas runs every 10 s; the kept log is not in
    // one.
    cluster.wait_running(None)?;
    let before = cluster.counter(0, "c1")?;
    cluster.wait_counter("c1", before + 1)?;
    assert!(std::fs::read_to_string(&kept)?.contains("Error"));
    Ok(())
}

#[test]
fn a_target_missing_a_cpu_flag_syscall_or_filesystem_is_refused_before_any_transfer() -> Result<()>
{
    if !require_container_runtime() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    let flag = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        .unwrap_or_else(|| "fpu".into());
    cluster.env_for.insert(
        "n3".into(),
        vec![(
            "FERRY_TEST_HIDE_FACTS".into(),
            format!("cpu:{flag},syscall:openat,fs:proc"),
        )],
    );
    let cluster = cluster_with_counter(cluster)?;
    let sampler = cluster.sampler("c1");
    let err = cluster.ferry_err(0, &["move", "c1", "--target", "n3", "--dry-run"])?;
    for missing in [flag.as_str(), "openat", "proc"] {
        assert!(
            err.contains(missing),
            "dry-run does not name {missing}: {err}"
        );
    }
    let report = cluster.ferry(
        0,
        &[
            "move",
            "c1",
            "--target",
            "n3",
            "--dry-run",
            "--format",
            "json",
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&report.stdout)?;
    let failed: Vec<&str> = report
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["ok"] == false)
        .filter_map(|r| r["check"].as_str())
        .collect();
    assert_eq!(failed, ["cpu", "syscalls", "filesystems"], "{report}");
    // The real move is refused the same way and ends rolled back.
    let before = cluster.counter(0, "c1")?;
    let err = cluster.ferry_err(0, &["move", "c1", "--target", "n3"])?;
    assert!(err.contains("compatibility check failed"), "{err}");
    assert!(err.contains(&flag), "{err}");
    let job = cluster.ferry_json(0, &["job", "show", "1"])?;
    assert_eq!(job["phase"], "RolledBack");
    assert!(job["report"]
        .as_array()
        .is_some_and(|r| r.iter().any(|c| c["ok"] == false)));
    // Nothing moved: still on n2, running on, nothing on n3.
    assert_eq!(owner(&cluster)?, "n2");
    assert!(cluster.counter(0, "c1")? >= before);
    assert!(!cluster.agents[2].data_dir.join("instances/c1").exists());
    assert_eq!(sampler.finish(), 1);
    Ok(())
}

#[test]
fn bad_moves_get_one_clear_line() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let cluster = cluster_with_counter(Cluster::new())?;
    let cases: [(&[&str], &str); 3] = [
        (
            &["move", "c1", "--target", "ghost"],
            "no member named 'ghost'",
        ),
        (&["move", "c1", "--target", "n2"], "already on 'n2'"),
        (
            &["move", "nope", "--target", "n1"],
            "no instance named 'nope'",
        ),
    ];
    for (args, expected) in cases {
        let err = cluster.ferry_err(0, args)?;
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    // A second move while one is active is refused.
    let started = cluster.ferry_ok(0, &["move", "c1", "--target", "n3", "--detach"])?;
    assert!(started.contains("job 1"), "{started}");
    let second = cluster.ferry(0, &["move", "c1", "--target", "n1", "--detach"]);
    let job = cluster.ferry_json(0, &["job", "show", "1"])?;
    if job["done"] == false {
        assert!(
            !second.status.success(),
            "a second move was accepted while job 1 ran"
        );
        let err = String::from_utf8_lossy(&second.stderr);
        assert!(err.contains("busy with job 1"), "{err}");
    }
    cluster.ferry_ok(0, &["job", "wait", "1"])?;
    // If job 1 had ended first, the second move ran; let it end too.
    let jobs = cluster.ferry_json(0, &["job", "list"])?;
    for job in jobs.as_array().into_iter().flatten() {
        let id = job["id"].to_string();
        cluster.ferry_ok(0, &["job", "wait", &id])?;
    }
    assert_eq!(cluster.running_copies("c1"), 1);
    let err = cluster.ferry_err(0, &["job", "show", "99"])?;
    assert!(err.contains("no job 99"), "{err}");
    Ok(())
}

#[test]
fn a_move_to_a_dead_member_is_refused_even_as_a_dry_run() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let mut cluster = cluster_with_counter(Cluster::new())?;
    cluster.kill(2);
    cluster.wait_liveness("n3", "dead", CONVERGE)?;
    for args in [
        &["move", "c1", "--target", "n3", "--dry-run"][..],
        &["move", "c1", "--target", "n3"][..],
    ] {
        let err = cluster.ferry_err(0, args)?;
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("'n3' is dead"), "{args:?}: {err}");
    }
    let jobs = cluster.ferry_json(0, &["job", "list"])?;
    assert_eq!(jobs.as_array().map(Vec::len), Some(0), "{jobs}");
    assert_eq!(cluster.running_copies("c1"), 1);
    Ok(())
}

/// Wait until job 1 is in one of `phases`; returns the phase seen.
fn wait_phase(cluster: &Cluster, phases: &[&str]) -> Result<String> {
    wait_for(&format!("job 1 in {phases:?}"), CONVERGE, || {
        let job = cluster.ferry_json(0, &["job", "show", "1"])?;
        let phase = job["phase"].as_str().unwrap_or_default().to_string();
        if phases.contains(&phase.as_str()) {
            Ok(phase)
        } else {
            bail!("phase {phase}")
        }
    })
}

fn wait_job_end(cluster: &Cluster) -> Result<serde_json::Value> {
    wait_for("job 1 to end", Duration::from_secs(90), || {
        let job = cluster.ferry_json(0, &["job", "show", "1"])?;
        if job["done"] == true {
            Ok(job)
        } else {
            bail!("phase {}", job["phase"])
        }
    })
}

#[test]
fn kill_9_of_the_target_during_the_transfer_rolls_back_and_cleans_up() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let mut cluster = cluster_with_counter_and_ballast(Cluster::new(), 64)?;
    let sampler = cluster.sampler("c1");
    cluster.ferry_ok(0, &["move", "c1", "--target", "n3", "--detach"])?;
    // Live figures come from the target while the rootfs flows (asked
    // through n1, which forwards to n3).
    let seen = wait_for("bytes flowing or the move past them", CONVERGE, || {
        let job = cluster.ferry_json(0, &["job", "show", "1"])?;
        let phase = job["phase"].as_str().unwrap_or_default().to_string();
        let bytes = job["progress"]["bytes"].as_u64().unwrap_or(0);
        match phase.as_str() {
            "Preparing" if bytes > 0 => {
                assert_eq!(job["progress"]["stage"], "rootfs", "{job}");
                Ok(phase)
            }
            "Frozen" | "Switched" | "Restored" | "Done" => Ok(phase),
            _ => bail!("{phase}, {bytes} bytes"),
        }
    })?;
    cluster.kill(2);
    let job = wait_job_end(&cluster)?;
    if seen == "Preparing" {
        assert_eq!(job["phase"], "RolledBack", "{job}");
        assert!(
            job["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{job}"
        );
        assert_eq!(owner(&cluster)?, "n2");
        // The source thawed and counts on.
        let before = cluster.counter(0, "c1")?;
        cluster.wait_counter("c1", before + 1)?;
        cluster.restart(2)?;
        wait_for("the target's leftovers to go", CONVERGE, || {
            if cluster.agents[2].data_dir.join("instances/c1").exists() {
                bail!("instances/c1 still on n3")
            }
            Ok(())
        })?;
    } else {
        eprintln!("the transfer ended before the kill (saw {seen}); checked only the invariants");
        cluster.restart(2)?;
    }
    assert!(sampler.finish() <= 1, "two copies ran at once");
    wait_for("exactly one running copy", CONVERGE, || {
        match cluster.running_copies("c1") {
            1 => Ok(()),
            n => bail!("{n} copies"),
        }
    })?;
    Ok(())
}

#[test]
fn abort_during_the_transfer_rolls_back() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let cluster = cluster_with_counter_and_ballast(Cluster::new(), 64)?;
    let sampler = cluster.sampler("c1");
    cluster.ferry_ok(0, &["move", "c1", "--target", "n3", "--detach"])?;
    wait_phase(
        &cluster,
        &["Preparing", "Frozen", "Switched", "Restored", "Done"],
    )?;
    let abort = cluster.ferry(0, &["job", "abort", "1"]);
    let job = wait_job_end(&cluster)?;
    if abort.status.success() {
        assert_eq!(job["phase"], "RolledBack", "{job}");
        assert!(
            job["error"].as_str().is_some_and(|e| e.contains("aborted")),
            "{job}"
        );
        assert_eq!(owner(&cluster)?, "n2");
        wait_for("n3 to drop what it received", CONVERGE, || {
            if cluster.agents[2].data_dir.join("instances/c1").exists() {
                bail!("leftovers")
            } else {
                Ok(())
            }
        })?;
    } else {
        let err = String::from_utf8_lossy(&abort.stderr);
        assert!(err.contains("can no longer be aborted"), "{err}");
    }
    assert!(sampler.finish() <= 1, "two copies ran at once");
    assert_eq!(cluster.running_copies("c1"), 1);
    assert!(cluster.counter(0, "c1")? > 0);
    Ok(())
}

#[test]
fn a_failed_restore_after_the_switch_switches_back_and_the_source_thaws() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let cluster = cluster_with_counter(Cluster::new())?;
    // Stale runc state for the id on the target: runc refuses to restore.
    std::fs::create_dir_all(cluster.agents[2].data_dir.join("runc/c1"))?;
    let sampler = cluster.sampler("c1");
    let err = cluster.ferry_err(0, &["move", "c1", "--target", "n3"])?;
    assert!(err.contains("restore on the target failed"), "{err}");
    let job = cluster.ferry_json(0, &["job", "show", "1"])?;
    assert_eq!(job["phase"], "RolledBack", "{job}");
    let list = cluster.ferry_json(0, &["list"])?;
    // Switched (epoch 2) then switched back (epoch 3), owned by n2 again.
    assert_eq!(
        (list[0]["node"].as_str(), list[0]["epoch"].as_u64()),
        (Some("n2"), Some(3)),
        "{list}"
    );
    cluster.wait_running(None)?;
    let before = cluster.counter(0, "c1")?;
    cluster.wait_counter("c1", before + 1)?;
    assert!(!cluster.agents[2].data_dir.join("instances/c1").exists());
    assert!(sampler.finish() <= 1, "two copies ran at once");
    assert_eq!(cluster.running_copies("c1"), 1);
    Ok(())
}

/// The pages of a container with 32 MiB in memory stream to the target
/// during the dump, so the source's own images lack them; a source that
/// then cannot thaw must still keep the instance's memory.
#[test]
fn a_source_that_cannot_thaw_after_streaming_its_pages_restores_from_a_dump_of_its_own(
) -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let cluster = cluster_with_counter_sized(Cluster::new(), 0, 32)?;
    // The target's restore fails (stale runc state), then the source's
    // thaw (test hook).
    std::fs::create_dir_all(cluster.agents[2].data_dir.join("runc/c1"))?;
    let fail_thaw = cluster.agents[1].data_dir.join("fail-thaw");
    std::fs::write(&fail_thaw, b"")?;
    let before = cluster.wait_counter("c1", 20)?;
    let sampler = cluster.sampler("c1");
    let err = cluster.ferry_err(0, &["move", "c1", "--target", "n3"])?;
    assert!(err.contains("could not thaw"), "{err}");
    assert!(err.contains("restored from its final dump"), "{err}");
    let job = cluster.ferry_json(0, &["job", "show", "1"])?;
    assert_eq!(job["phase"], "RolledBack", "{job}");
    std::fs::remove_file(&fail_thaw)?;
    cluster.wait_running(Some("n2"))?;
    // Started afresh it would count from 1 again.
    let after = cluster.wait_counter("c1", before)?;
    assert!(
        after >= before,
        "counter went back from {before} to {after}"
    );
    assert!(sampler.finish() <= 1, "two copies ran at once");
    assert_eq!(cluster.running_copies("c1"), 1);
    Ok(())
}

#[test]
fn kill_9_of_the_leader_mid_move_completes_or_rolls_back() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let mut cluster = cluster_with_counter_and_ballast(Cluster::new(), 64)?;
    let leader = cluster.wait_converged(&["n1", "n2", "n3"], CONVERGE)?;
    let dead = cluster.index_of(&leader).unwrap_or(0);
    let via = (0..3).find(|i| *i != dead).unwrap_or(1);
    let sampler = cluster.sampler("c1");
    cluster.ferry_ok(via, &["move", "c1", "--target", "n3", "--detach"])?;
    wait_for("the move to start", CONVERGE, || {
        let job = cluster.ferry_json(via, &["job", "show", "1"])?;
        if job["phase"] == "Pending" {
            bail!("pending")
        } else {
            Ok(())
        }
    })?;
    cluster.kill(dead);
    let job = wait_for("job 1 to end", Duration::from_secs(90), || {
        let job = cluster.ferry_json(via, &["job", "show", "1"])?;
        if job["done"] == true {
            Ok(job)
        } else {
            bail!("phase {}", job["phase"])
        }
    })?;
    let expected_owner = if job["phase"] == "Done" { "n3" } else { "n2" };
    cluster.restart(dead)?;
    cluster.wait_running(Some(expected_owner))?;
    assert!(sampler.finish() <= 1, "two copies ran at once");
    assert_eq!(cluster.running_copies("c1"), 1);
    Ok(())
}

/// The counter (64 MiB in memory) on n2 of a cluster with a 15 s phase
/// deadline, with a sampler running, moving to n3 and paused by n2 for its
/// final dump. (5 s was too short for the rootfs pass and the dump on a
/// loaded CI machine: the phase timed out before the freeze. 15 s still
/// lets the job be decided without the source within `CONVERGE`.)
fn frozen_source() -> Result<(Cluster, cluster_tests::Sampler)> {
    let mut cluster = Cluster::new();
    cluster.agent_flags = vec!["--job-phase-timeout".into(), "15s".into()];
    let cluster = cluster_with_counter_sized(cluster, 0, 64)?;
    let sampler = cluster.sampler("c1");
    cluster.ferry_ok(0, &["move", "c1", "--target", "n3", "--detach"])?;
    let frozen = wait_for("n2 to freeze c1", CONVERGE, || {
        match cluster.agents[1].container_status("c1").as_deref() {
            Some("paused") => Ok(()),
            other => bail!("c1 on n2 is {other:?}"),
        }
    });
    // CI once saw the move never freeze: say where the job went.
    frozen.with_context(|| {
        let job = cluster.ferry_json(0, &["job", "show", "1"]);
        format!(
            "job 1: {job:?}\n---- n2 ----\n{}\n---- n3 ----\n{}",
            cluster.log_tail(1),
            cluster.log_tail(2)
        )
    })?;
    Ok((cluster, sampler))
}

/// With the source gone, n1 and n3 decide: roll back (the transfer broke
/// off) or finish (it was complete).
fn decided_without_the_source(cluster: &Cluster) -> Result<()> {
    let decided = wait_for("a decision without the source", CONVERGE, || {
        let job = cluster
            .ferry_json(0, &["job", "show", "1"])
            .or_else(|_| cluster.ferry_json(2, &["job", "show", "1"]))?;
        match job["phase"].as_str() {
            Some(phase @ ("RollingBack" | "Done")) => Ok(phase.to_string()),
            other => bail!("phase {other:?}"),
        }
    })?;
    eprintln!("decided without the source: {decided}");
    // The source had begun its final dump into its staging area.
    assert!(cluster.agents[1].staging("c1").is_some());
    Ok(())
}

/// Wait for job 1 to end; then exactly one copy runs, on the owner the
/// outcome names, it counts on, the other side holds nothing, and no two
/// copies ever ran at once.
fn ended_safely(cluster: &Cluster, sampler: cluster_tests::Sampler) -> Result<()> {
    let job = wait_job_end(cluster)?;
    let (owner_name, other) = match job["phase"].as_str() {
        Some("Done") => ("n3", 1),
        Some("RolledBack") => ("n2", 2),
        other => bail!("job ended in {other:?}: {job}"),
    };
    cluster.wait_running(Some(owner_name))?;
    let before = cluster.counter(0, "c1")?;
    cluster.wait_counter("c1", before + 1)?;
    assert_eq!(cluster.running_copies("c1"), 1);
    wait_for("the other side to drop its copy", CONVERGE, || {
        if cluster.agents[other].data_dir.join("instances/c1").exists() {
            bail!("instances/c1 still on {}", cluster.agents[other].name)
        }
        Ok(())
    })?;
    // The final dump and configs go once the owner runs the instance.
    let owner_index = 3 - other;
    wait_for(
        "the owner's staging area to go",
        CONVERGE,
        || match cluster.agents[owner_index].staging("c1") {
            Some(staging) => bail!("{} still exists", staging.display()),
            None => Ok(()),
        },
    )?;
    assert!(sampler.finish() <= 1, "two copies ran at once");
    Ok(())
}

/// Cut off after the switch (the target owns the instance, held before
/// its restore), the source never thaws on its own: it cannot know
/// whether the target runs the instance. (Cut off during its dump, before
/// its freeze header went out, it may: the target cannot reach `Frozen`
/// without that header; the fault matrix covers those moments.)
#[test]
fn a_partitioned_frozen_source_stays_frozen_until_healed_and_the_job_ends_safely() -> Result<()> {
    if !require_container_runtime() || !require_partition_tools() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    // Longer than the hold: no switch back while the target waits.
    cluster.agent_flags = vec!["--job-phase-timeout".into(), "60s".into()];
    cluster.env_for.insert(
        "n3".into(),
        vec![("FERRY_TEST_HOLD_AT".into(), "Switched".into())],
    );
    let cluster = cluster_with_counter_sized(cluster, 0, 64)?;
    let hold = cluster.agents[2].data_dir.join("hold");
    std::fs::write(&hold, b"")?;
    let sampler = cluster.sampler("c1");
    cluster.ferry_ok(0, &["move", "c1", "--target", "n3", "--detach"])?;
    wait_for("the switch", Duration::from_secs(60), || {
        let job = cluster.ferry_json(0, &["job", "show", "1"])?;
        match job["phase"].as_str() {
            Some("Switched") => Ok(()),
            other => bail!("phase {other:?}"),
        }
    })?;
    let cut = Partition::isolate(cluster.agents[1].port()?)?;
    let watch_until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < watch_until {
        let status = cluster.agents[1].container_status("c1");
        assert_eq!(status.as_deref(), Some("paused"), "the partitioned source");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_file(&hold)?;
    let job = wait_job_end(&cluster)?;
    assert_eq!(job["phase"], "Done", "{job}");
    // Still cut off: still frozen, its copy not deleted.
    assert_eq!(
        cluster.agents[1].container_status("c1").as_deref(),
        Some("paused")
    );
    cut.heal();
    ended_safely(&cluster, sampler)
}

#[test]
fn kill_9_of_the_frozen_source_ends_with_exactly_one_copy_after_its_restart() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let (mut cluster, sampler) = frozen_source()?;
    cluster.kill(1);
    decided_without_the_source(&cluster)?;
    // Its container outlives the agent: still paused, or running again
    // when the kill broke its dump off (the pages stream through the
    // agent; CRIU resumes what it froze when a dump fails, and without the
    // freeze header the target cannot have taken over).
    let status = cluster.agents[1].container_status("c1");
    assert!(
        matches!(status.as_deref(), Some("paused" | "running")),
        "{status:?}"
    );
    cluster.restart(1)?;
    ended_safely(&cluster, sampler)
}

#[test]
fn relay_mode_moves_live_between_members_that_cannot_reach_each_other() -> Result<()> {
    if !require_container_runtime() || !require_partition_tools() {
        return Ok(());
    }
    let cluster = cluster_with_counter(Cluster::new())?;
    let names = ["n1", "n2", "n3"];
    let index = |name: &str| names.iter().position(|n| *n == name).unwrap_or(0);
    // The relay is the Raft leader (the sides must reach the leader, and
    // the relay is the one member that reaches both); a leader owning c1
    // refuses to relay its move, and c1 moves off it first.
    let leader = cluster.wait_converged(&names, CONVERGE)?;
    if owner(&cluster)? == leader {
        let refused = cluster.ferry_err(index(&leader), &["move", "c1", "--mode", "relay"])?;
        assert!(refused.contains("third member"), "{refused}");
        let other = names
            .iter()
            .find(|n| **n != leader)
            .copied()
            .unwrap_or("n1");
        cluster.ferry_ok(0, &["move", "c1", "--target", other])?;
    }
    let source = owner(&cluster)?;
    let target = names
        .into_iter()
        .find(|n| *n != source && *n != leader)
        .unwrap_or("n1");
    let via = index(&leader);
    cluster.ferry_ok(via, &["exec", "c1", "--", "sh", "-c", "echo kept > /file"])?;
    let relay_move = ["move", "c1", "--target", target, "--mode", "relay"];
    let from_a_side = cluster.ferry_err(index(&source), &relay_move)?;
    assert!(from_a_side.contains("third member"), "{from_a_side}");
    let (a, b) = (
        cluster.agents[index(&source)].port()?,
        cluster.agents[index(target)].port()?,
    );
    let _cut = Partition::between(a, b)?;
    let sampler = cluster.sampler("c1");
    // The cut is real: a pull move across it rolls back.
    let pulled = cluster.ferry_err(via, &["move", "c1", "--target", target])?;
    assert!(pulled.contains("RolledBack"), "{pulled}");
    assert_eq!(owner(&cluster)?, source);
    let before = cluster.counter(via, "c1")?;
    let out = cluster.ferry_ok(via, &relay_move)?;
    assert!(out.contains("downtime"), "{out}");
    assert_eq!(owner(&cluster)?, target);
    let after = cluster.counter(via, "c1")?;
    assert!(
        after >= before,
        "the relayed move restarted the counter: {before} -> {after}"
    );
    let file = cluster.ferry_ok(via, &["exec", "c1", "--", "cat", "/file"])?;
    assert_eq!(file.trim(), "kept");
    let jobs = cluster.ferry_json(via, &["job", "list"])?;
    let relayed = format!("relay via {leader}");
    let done = jobs.as_array().is_some_and(|jobs| {
        jobs.iter()
            .any(|j| j["mode"] == relayed.as_str() && j["phase"] == "Done")
    });
    assert!(done, "no Done job {relayed}: {jobs}");
    assert!(sampler.finish() <= 1, "two copies ran at once");
    Ok(())
}

#[test]
fn push_mode_moves_live_and_stateless_with_the_source_sending() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let cluster = cluster_with_counter(Cluster::new())?;
    cluster.ferry_ok(0, &["exec", "c1", "--", "sh", "-c", "echo kept > /file"])?;
    let sampler = cluster.sampler("c1");
    let before = cluster.counter(0, "c1")?;
    let out = cluster.ferry_ok(0, &["move", "c1", "--target", "n3", "--mode", "push"])?;
    assert!(out.contains("downtime"), "{out}");
    assert_eq!(owner(&cluster)?, "n3");
    let after = cluster.counter(0, "c1")?;
    assert!(
        after >= before,
        "live push restarted the counter: {before} -> {after}"
    );
    let job = cluster.ferry_json(0, &["job", "show", "1"])?;
    assert_eq!(job["phase"], "Done", "{job}");
    assert!(job["bytes"].as_u64().is_some_and(|b| b > 0), "{job}");
    // Back, cold: stop, push, start; the file comes along, memory does not.
    cluster.ferry_ok(
        0,
        &[
            "move",
            "c1",
            "--target",
            "n2",
            "--mode",
            "push",
            "--stateless",
        ],
    )?;
    assert_eq!(owner(&cluster)?, "n2");
    let file = cluster.ferry_ok(0, &["exec", "c1", "--", "cat", "/file"])?;
    assert_eq!(file.trim(), "kept");
    cluster.wait_running(None)?;
    assert!(sampler.finish() <= 1, "two copies ran at once");
    assert_eq!(cluster.running_copies("c1"), 1);
    assert!(!cluster.agents[2].data_dir.join("instances/c1").exists());
    Ok(())
}
