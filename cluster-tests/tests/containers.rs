//! Container instances on real runc + CRIU across agents on loopback.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use anyhow::{bail, Result};
use cluster_tests::{busybox_rootfs, require_container_runtime, wait_for, Cluster};

const CONVERGE: Duration = Duration::from_secs(30);

/// Two members and the counter instance running on n2, launched via n1.
fn with_counter_on_n2() -> Result<Cluster> {
    counter_on_n2(Cluster::new())
}

fn counter_on_n2(mut cluster: Cluster) -> Result<Cluster> {
    cluster.bootstrap("n1", 3)?;
    cluster.join("n2", 0)?;
    cluster.wait_converged(&["n1", "n2"], CONVERGE)?;
    let rootfs = busybox_rootfs(cluster.root())?;
    cluster.launch_counter("c1", "n2", &rootfs)?;
    Ok(cluster)
}

#[test]
fn launch_on_a_chosen_member_and_every_member_agrees() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let cluster = with_counter_on_n2()?;
    for via in [0, 1] {
        let list = cluster.ferry_json(via, &["list"])?;
        let c1 = &list[0];
        assert_eq!(
            (
                c1["name"].as_str(),
                c1["node"].as_str(),
                c1["state"].as_str(),
                c1["kind"].as_str()
            ),
            (Some("c1"), Some("n2"), Some("running"), Some("container")),
            "{list}"
        );
        assert_eq!(c1["epoch"], 1);
    }
    assert_eq!(cluster.running_copies("c1"), 1);
    assert!(
        cluster.agents[0].containers().is_empty(),
        "n1 must not run c1"
    );
    let show = wait_for("the baseline", CONVERGE, || {
        let show = cluster.ferry_json(0, &["show", "c1"])?;
        if show["baseline"].is_null() {
            bail!("no baseline yet")
        } else {
            Ok(show)
        }
    })?;
    let baseline = &show["baseline"];
    // What the instance prints is kept on its owner.
    let rootfs = cluster
        .root()
        .join("busybox-rootfs")
        .to_string_lossy()
        .into_owned();
    cluster.ferry_ok(
        0,
        &[
            "launch",
            "talker",
            "--rootfs",
            &rootfs,
            "--target",
            "n2",
            "--",
            "sh",
            "-c",
            "echo hello from talker; exec sleep 600",
        ],
    )?;
    let console = cluster.agents[1]
        .data_dir
        .join("instances/talker/console.log");
    wait_for("the console log", CONVERGE, || {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("hello from talker") {
            Ok(())
        } else {
            bail!("console: {text:?}")
        }
    })?;
    assert!(
        baseline["cpu_flags"]
            .as_array()
            .is_some_and(|f| !f.is_empty()),
        "{show}"
    );
    assert!(
        baseline["filesystems"]
            .as_array()
            .is_some_and(|f| f.iter().any(|t| t == "proc")),
        "{show}"
    );
    Ok(())
}

#[test]
fn stateful_stop_then_start_continues_the_counter() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let cluster = with_counter_on_n2()?;
    let counted = cluster.counter(1, "c1")?;
    cluster.ferry_ok(0, &["stop", "c1", "--stateful"])?;
    assert_eq!(cluster.running_copies("c1"), 0);
    let rootfs = cluster.agents[1]
        .data_dir
        .join("instances/c1/bundle/rootfs");
    // Empty if the dump came between the shell's truncate and its write
    // (the count is in its memory all the same).
    let written = std::fs::read_to_string(rootfs.join("counter"))?;
    let stopped_at: u64 = match written.trim() {
        "" => counted,
        n => n.parse()?,
    };
    assert!(stopped_at >= 3);
    let show = cluster.ferry_json(1, &["show", "c1"])?;
    assert_eq!(
        (show["state"].as_str(), show["checkpointed"].as_bool()),
        (Some("stopped"), Some(true))
    );
    cluster.ferry_ok(0, &["start", "c1"])?;
    // Restarted from scratch it would count from 1 again.
    let after = cluster.counter(1, "c1")?;
    assert!(
        after >= stopped_at,
        "counter went back from {stopped_at} to {after}"
    );
    cluster.wait_counter("c1", stopped_at + 1)?;
    assert_eq!(cluster.running_copies("c1"), 1);
    Ok(())
}

#[test]
fn owner_agent_kill_9_and_restart_keeps_exactly_one_copy() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let mut cluster = with_counter_on_n2()?;
    cluster.kill(1);
    // The container does not depend on its agent.
    assert_eq!(cluster.running_copies("c1"), 1);
    // The counter is rewritten in place: wait for a complete value.
    let counter = cluster.agents[1]
        .data_dir
        .join("instances/c1/bundle/rootfs/counter");
    let before: u64 = wait_for("a complete counter", Duration::from_secs(15), || {
        Ok(std::fs::read_to_string(&counter)?.trim().parse::<u64>()?)
    })?;
    cluster.restart(1)?;
    cluster.wait_running(None)?;
    let after = cluster.counter(0, "c1")?;
    assert!(
        after >= before,
        "the instance restarted: {before} -> {after}"
    );
    assert_eq!(cluster.running_copies("c1"), 1);
    Ok(())
}

#[test]
fn bad_instance_input_gets_one_clear_line_and_loses_nothing() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let cluster = with_counter_on_n2()?;
    let rootfs = cluster
        .root()
        .join("busybox-rootfs")
        .to_string_lossy()
        .into_owned();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["show", "nope"], "no instance named 'nope'"),
        (
            vec!["exec", "nope", "--", "true"],
            "no instance named 'nope'",
        ),
        (vec!["stop", "nope"], "no instance named 'nope'"),
        (
            vec!["launch", "c1", "--rootfs", &rootfs, "--", "true"],
            "already exists",
        ),
        (
            vec!["launch", "Bad_Name", "--rootfs", &rootfs, "--", "true"],
            "invalid instance name",
        ),
        (
            vec!["launch", "c2", "--rootfs", "/does/not/exist", "--", "true"],
            "cannot read rootfs",
        ),
        (
            vec![
                "launch", "c3", "--rootfs", &rootfs, "--target", "ghost", "--", "true",
            ],
            "no member named 'ghost'",
        ),
        (
            vec!["delete", "c1"],
            "is running; stop it first or pass --force",
        ),
        (vec!["start", "c1"], "already running"),
    ];
    for (args, expected) in cases {
        let err = cluster.ferry_err(0, &args)?;
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    // Nothing was lost or added.
    let list = cluster.ferry_json(1, &["list"])?;
    assert_eq!(list.as_array().map(|a| a.len()), Some(1), "{list}");
    assert_eq!(cluster.running_copies("c1"), 1);
    assert!(cluster.counter(0, "c1")? > 0);
    // And delete --force really deletes.
    cluster.ferry_ok(0, &["delete", "c1", "--force"])?;
    assert_eq!(cluster.running_copies("c1"), 0);
    assert!(!cluster.agents[1].data_dir.join("instances/c1").exists());
    Ok(())
}

#[test]
fn a_stateful_snapshot_moves_with_the_container_and_restore_takes_the_counter_back() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let cluster = with_counter_on_n2()?;
    cluster.ferry_ok(0, &["snapshot", "create", "c1", "s1", "--stateful"])?;
    let at_snapshot: u64 = std::fs::read_to_string(
        cluster.agents[1]
            .data_dir
            .join("instances/c1/snapshots/s1/rootfs/counter"),
    )?
    .trim()
    .parse()?;
    assert_eq!(
        cluster.running_copies("c1"),
        1,
        "a snapshot leaves it running"
    );
    // The snapshot moves with it: restored on n1, where it went live.
    cluster.ferry_ok(0, &["move", "c1", "--target", "n1"])?;
    let on_n1 = cluster.agents[0].data_dir.join("instances/c1/snapshots/s1");
    assert!(
        on_n1.join("rootfs/counter").exists(),
        "the snapshot stayed behind"
    );
    let later = cluster.wait_counter("c1", at_snapshot + 10)?;
    let list = cluster.ferry_json(0, &["snapshot", "list", "c1"])?;
    assert_eq!(list[0]["name"], "s1");
    assert_eq!(list[0]["stateful"], true);
    cluster.ferry_ok(0, &["snapshot", "restore", "c1", "s1"])?;
    let back = cluster.counter(0, "c1")?;
    assert!(
        back >= at_snapshot && back < later,
        "after restore the counter is {back}; snapshot {at_snapshot}, before restore {later}"
    );
    assert_eq!(cluster.running_copies("c1"), 1);
    cluster.ferry_ok(0, &["snapshot", "delete", "c1", "s1"])?;
    assert!(!on_n1.exists());
    let err = cluster.ferry_err(0, &["snapshot", "restore", "c1", "s1"])?;
    assert!(err.contains("no snapshot named 's1'"), "{err}");
    Ok(())
}

#[test]
fn stateless_snapshot_restore_brings_back_files_and_restarts() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let cluster = with_counter_on_n2()?;
    cluster.ferry_ok(
        0,
        &["exec", "c1", "--", "sh", "-c", "echo before > /marker"],
    )?;
    cluster.ferry_ok(0, &["snapshot", "create", "c1", "plain"])?;
    cluster.ferry_ok(0, &["exec", "c1", "--", "sh", "-c", "echo after > /marker"])?;
    cluster.ferry_ok(0, &["snapshot", "restore", "c1", "plain"])?;
    let marker = cluster.ferry_ok(0, &["exec", "c1", "--", "cat", "/marker"])?;
    assert_eq!(marker.trim(), "before");
    assert_eq!(cluster.running_copies("c1"), 1);
    Ok(())
}

#[test]
fn stateful_stop_without_usable_criu_says_so_and_keeps_running() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    cluster.agent_env = vec![("FERRY_TEST_HIDE_FACTS".into(), "runtime:criu".into())];
    let cluster = counter_on_n2(cluster)?;
    wait_for("n2's facts without criu", CONVERGE, || {
        let show = cluster.ferry_json(0, &["cluster", "show", "n2"])?;
        if show["facts"]["runtimes"]["criu_check"] == false {
            Ok(())
        } else {
            bail!("{show}")
        }
    })?;
    let err = cluster.ferry_err(0, &["stop", "c1", "--stateful"])?;
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("CRIU is missing or 'criu check' fails on n2"),
        "{err}"
    );
    assert!(err.contains("keeps running"), "{err}");
    let before = cluster.counter(0, "c1")?;
    cluster.wait_counter("c1", before + 1)?;
    assert_eq!(cluster.running_copies("c1"), 1);
    Ok(())
}

#[test]
fn containers_are_confined_by_default_and_their_output_is_capped() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !require_container_runtime() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    cluster.agent_flags = vec!["--console-log-max".into(), "4M".into()];
    cluster.bootstrap("n1", 3)?;
    cluster.wait_converged(&["n1"], CONVERGE)?;
    let rootfs = busybox_rootfs(cluster.root())?
        .to_string_lossy()
        .into_owned();
    // 10 MB of output, then quiet: the console log keeps its cap.
    let chatty = "head -c 10000000 /dev/zero | tr '\\0' x; sleep 1000";
    cluster.ferry_ok(
        0,
        &[
            "launch", "chatty", "--rootfs", &rootfs, "--", "sh", "-c", chatty,
        ],
    )?;
    let dir = cluster.agents[0].data_dir.join("instances/chatty");
    let (console, older) = (dir.join("console.log"), dir.join("console.log.1"));
    wait_for("10 MB through the console logger", CONVERGE, || {
        let len = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let (now, before) = (len(&console), len(&older));
        // 10 MB through a 4 MiB cap: console.log.1 full, console.log the rest.
        if before == 4 << 20 && now == 10_000_000 - 2 * (4 << 20) {
            Ok(())
        } else {
            bail!("console.log {now} bytes, console.log.1 {before} bytes")
        }
    })?;
    for (name, profile) in [("confined", "default"), ("free", "unconfined")] {
        cluster.ferry_ok(
            0,
            &[
                "launch",
                name,
                "--rootfs",
                &rootfs,
                "--security-profile",
                profile,
                "--",
                "sleep",
                "1000",
            ],
        )?;
        let show = cluster.ferry_json(0, &["show", name])?;
        assert_eq!(show["security_profile"], profile, "{show}");
    }
    let seccomp = |name: &str| -> Result<String> {
        let out = cluster.ferry_ok(
            0,
            &["exec", name, "--", "grep", "Seccomp:", "/proc/self/status"],
        )?;
        Ok(out
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string())
    };
    assert_eq!(seccomp("confined")?, "2", "a seccomp filter in force");
    assert_eq!(seccomp("free")?, "0", "no filter when unconfined");
    // A process limit, and files only root can read.
    let data_dir = &cluster.agents[0].data_dir;
    let pids_max = glob_one("/sys/fs/cgroup/pids", "confined/pids.max")?;
    assert_eq!(std::fs::read_to_string(&pids_max)?.trim(), "4096");
    for dir in [
        data_dir.join("instances"),
        data_dir.join("instances/confined"),
    ] {
        let mode = std::fs::metadata(&dir)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", dir.display());
    }
    // A command that prints without end: exec returns with the first MiB.
    let started = std::time::Instant::now();
    let out = cluster.ferry(0, &["exec", "confined", "--", "yes"]);
    assert_eq!(out.stdout.len(), 1 << 20);
    assert!(
        started.elapsed() < CONVERGE,
        "exec took {:?}",
        started.elapsed()
    );
    Ok(())
}

/// The one `<parent>/<agent cgroup>/<leaf>` that exists.
fn glob_one(parent: &str, leaf: &str) -> Result<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(parent)? {
        let path = entry?.path().join(leaf);
        if path.exists() {
            found.push(path);
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        other => bail!("expected one {parent}/*/{leaf}, found {other:?}"),
    }
}

/// SIGKILL to container `id`'s first process on agent `i`, from the host.
fn kill_container(cluster: &Cluster, i: usize, id: &str) -> Result<()> {
    let Some(pid) = cluster.agents[i].container_pid(id) else {
        bail!("{id} is not running on {}", cluster.agents[i].name);
    };
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    assert!(status.success(), "kill -9 {pid}");
    Ok(())
}

fn show(cluster: &Cluster, name: &str) -> Result<serde_json::Value> {
    cluster.ferry_json(0, &["show", name])
}

/// Whether `name` runs again after `times` restarts, the last for `why`.
fn restarted(cluster: &Cluster, name: &str, times: u64, why: &str) -> Result<()> {
    let s = show(cluster, name)?;
    if s["state"] == "running"
        && s["restarts"].as_u64() == Some(times)
        && s["last_restart"].as_str().is_some_and(|r| r.contains(why))
    {
        Ok(())
    } else {
        bail!("not restarted {times} times yet: {s}")
    }
}

#[test]
fn an_ended_process_is_restarted_by_policy_and_after_a_host_restart() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    cluster.bootstrap("n1", 3)?;
    cluster.wait_converged(&["n1"], CONVERGE)?;
    let rootfs = busybox_rootfs(cluster.root())?;
    cluster.launch_counter("c1", "n1", &rootfs)?;
    let root = rootfs.to_string_lossy().into_owned();
    cluster.ferry_ok(
        0,
        &[
            "launch",
            "once",
            "--rootfs",
            &root,
            "--restart",
            "never",
            "--",
            "sleep",
            "1000",
        ],
    )?;
    // `on-failure`: the shim records how the process ended.
    for (name, code) in [("fails", 3), ("clean", 0)] {
        let script = format!("sleep 1; exit {code}");
        let args = [
            "launch",
            name,
            "--detach",
            "--rootfs",
            &root,
            "--restart",
            "on-failure",
        ];
        let command = ["--", "sh", "-c", &script];
        cluster.ferry_ok(0, &[&args[..], &command[..]].concat())?;
    }
    // The process dies: `always` (the default) starts it again, `never`
    // leaves it stopped, saying so.
    kill_container(&cluster, 0, "c1")?;
    kill_container(&cluster, 0, "once")?;
    wait_for("c1 restarted", CONVERGE, || {
        restarted(&cluster, "c1", 1, "killed by signal 9")
    })?;
    wait_for("fails restarted for its exit code", CONVERGE, || {
        let s = show(&cluster, "fails")?;
        let why = s["last_restart"].as_str().unwrap_or_default();
        if s["restarts"].as_u64() >= Some(1) && why.contains("exited with code 3") {
            Ok(())
        } else {
            bail!("{s}")
        }
    })?;
    wait_for("clean left stopped after exit 0", CONVERGE, || {
        let s = show(&cluster, "clean")?;
        let detail = s["detail"].as_str().unwrap_or_default();
        if s["state"] == "stopped" && s["restarts"] == 0 && detail.contains("exited with code 0") {
            Ok(())
        } else {
            bail!("{s}")
        }
    })?;
    wait_for("once reported stopped", CONVERGE, || {
        let s = show(&cluster, "once")?;
        if s["state"] == "stopped" && s["restarts"] == 0 {
            Ok(())
        } else {
            bail!("{s}")
        }
    })?;
    let text = cluster.ferry_ok(0, &["show", "c1"])?;
    assert!(
        text.contains("restart:   always (1 restarts; last: its process was killed by signal 9)"),
        "{text}"
    );

    // The host restarts: the agent and every container die; the agent
    // comes back and runs c1 again, once.
    cluster.kill(0);
    kill_container(&cluster, 0, "c1")?;
    cluster.restart(0)?;
    wait_for("c1 back after the host restart", CONVERGE, || {
        restarted(&cluster, "c1", 2, "host or agent restart")
    })?;
    assert_eq!(cluster.running_copies("c1"), 1);
    assert_eq!(show(&cluster, "once")?["state"], "stopped");
    Ok(())
}
