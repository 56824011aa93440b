//! VM instances on real QEMU across agents on loopback (TCG: this machine
//! kind's KVM runs only PVM guests, see docs/vm-migration-recipe.md). The
//! guest counts on its serial console every 100 ms and logs every tenth
//! tick to its disk.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cluster_tests::vm::{boots, guest_file, launch_vm, require_qemu, ticks};
use cluster_tests::{busybox_rootfs, require_container_runtime, wait_for, Cluster};

const BOOT: Duration = Duration::from_secs(90);

fn console(cluster: &Cluster, index: usize, name: &str) -> PathBuf {
    cluster.agents[index]
        .data_dir
        .join("instances")
        .join(name)
        .join("console.log")
}

/// Launch the counting test guest as VM v1 on member `target`.
/// The CPU model `ferry show` names on the machine line.
fn cpu_model_of(cluster: &Cluster, name: &str) -> Result<String> {
    let out = cluster.ferry_ok(0, &["show", name])?;
    let model = out
        .lines()
        .find_map(|l| l.strip_prefix("machine:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .map(|m| m.trim_end_matches(','));
    model
        .map(str::to_string)
        .with_context(|| format!("no machine line with a CPU model in: {out}"))
}

/// Wait until the guest's counter in `log` passed `at_least`.
fn wait_ticks(log: &Path, at_least: u64, within: Duration) -> Result<u64> {
    wait_for("the guest to count", within, || match ticks(log).last() {
        Some(&n) if n > at_least => Ok(n),
        last => bail!("counter at {last:?}"),
    })
}

/// Every tick follows the one before it: nothing lost, nothing counted
/// twice, never started again from 1.
fn assert_consecutive(ticks: &[u64], what: &str) {
    for pair in ticks.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "{what}: counter jumped: {ticks:?}");
    }
}

/// QEMU processes of VMs under `data_dir`.
fn running_vms(data_dir: &Path) -> Vec<u32> {
    let needle = data_dir.to_string_lossy().into_owned();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.starts_with("qemu-system") && cmdline.contains(&needle)
        })
        .collect()
}

/// Move v1 live from agent `from` to agent `to`: the counter carries on
/// on the target after the last tick the source showed before the move,
/// with no boot in between. Returns that last tick.
fn live_move(cluster: &Cluster, from: usize, to: usize, options: &[&str]) -> Result<u64> {
    let before = ticks(&console(cluster, from, "v1"))
        .last()
        .copied()
        .unwrap_or(0);
    let target = cluster.agents[to].name.clone();
    let mut args = vec!["move", "v1", "--target", &target];
    args.extend(options);
    let started = std::time::Instant::now();
    let out = cluster.ferry_ok(0, &args)?;
    let took = started.elapsed();
    assert!(out.contains(&format!("to {target}")), "{out}");
    let on_target = console(cluster, to, "v1");
    wait_ticks(&on_target, before + 5, Duration::from_secs(30))?;
    let text = std::fs::read_to_string(&on_target)?;
    let lines: Vec<&str> = text.lines().collect();
    let first = lines
        .iter()
        .position(|l| {
            l.strip_prefix("tick ")
                .and_then(|n| n.trim().parse::<u64>().ok())
                > Some(before)
        })
        .unwrap_or(0);
    let after = &lines[first..];
    assert!(
        !after.contains(&"BOOTED"),
        "the guest booted again on {target}"
    );
    let counted: Vec<u64> = after
        .iter()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .collect();
    // The guest counts at most ten a second: it ran on the source while
    // its memory was copied, and was paused for the switchover; a larger
    // jump is not the same guest carrying on.
    let most = before + 10 * took.as_secs() + 20;
    assert!(
        counted[0] <= most,
        "the counter jumped from {before} to {} in a {took:?} move",
        counted[0]
    );
    assert_consecutive(&counted, &format!("after the move to {target}"));
    assert_eq!(state(cluster, "v1")?, (target, "running".into()));
    Ok(before)
}

fn state(cluster: &Cluster, name: &str) -> Result<(String, String)> {
    let v = cluster.ferry_json(0, &["show", name])?;
    let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    Ok((field("node"), field("state")))
}

#[test]
fn a_vm_stops_with_its_memory_starts_again_and_moves_with_memory_and_disk() -> Result<()> {
    if !require_qemu() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    cluster.start_three()?;
    launch_vm(&cluster, "n1")?;
    let on_n1 = console(&cluster, 0, "v1");
    let before_stop = wait_ticks(&on_n1, 12, BOOT)?;
    let shown = cluster.ferry_json(0, &["show", "v1"])?;
    assert_eq!(shown["kind"], "vm", "{shown}");
    assert_eq!(shown["vm"]["memory_mib"], 256, "{shown}");

    // A stateful stop keeps the memory: the counter goes on where it was.
    cluster.ferry_ok(0, &["stop", "v1", "--stateful"])?;
    assert_eq!(state(&cluster, "v1")?, ("n1".into(), "stopped".into()));
    let stopped_at = *ticks(&on_n1).last().unwrap();
    assert!(stopped_at >= before_stop);
    cluster.ferry_ok(0, &["start", "v1"])?;
    wait_ticks(&on_n1, stopped_at + 5, Duration::from_secs(30))?;
    assert_consecutive(&ticks(&on_n1), "through the stateful stop");
    assert_eq!(boots(&on_n1), 1, "the guest booted again");
    // A stateful snapshot (disk and memory); it moves with the VM below.
    cluster.ferry_ok(0, &["snapshot", "create", "v1", "s1", "--stateful"])?;
    let at_snapshot = *ticks(&on_n1).last().unwrap();

    // A live (stateful) move: memory and disk go to n2, the source's
    // QEMU and files go; and back, and there again.
    let before_move = live_move(&cluster, 0, 1, &[])?;
    let n1_dir = cluster.agents[0].data_dir.join("instances/v1");
    wait_for("the source's copy to go", Duration::from_secs(10), || {
        if n1_dir.exists() || !running_vms(&cluster.agents[0].data_dir).is_empty() {
            bail!("the source kept {} or its QEMU", n1_dir.display())
        }
        Ok(())
    })?;
    let job = cluster.ferry_json(0, &["job", "show", "1"])?;
    let notes = job["notes"].to_string();
    assert!(
        notes.contains("QEMU copied") && notes.contains("MiB of memory"),
        "no QEMU figures: {job}"
    );
    // Back in post-copy (the target runs from the switchover and fetches
    // the rest), and there again with the memory over three connections.
    live_move(&cluster, 1, 0, &["--postcopy"])?;
    let notes = cluster.ferry_json(0, &["job", "show", "2"])?["notes"].to_string();
    assert!(notes.contains("post-copy from the switchover"), "{notes}");
    live_move(&cluster, 0, 1, &["--multifd", "2"])?;
    let notes = cluster.ferry_json(0, &["job", "show", "3"])?["notes"].to_string();
    assert!(notes.contains("over 2 multifd channels"), "{notes}");

    // exec runs in the guest through its agent, on the member it is on now.
    let exec = ["exec", "v1", "--", "sh", "-c", "cat /mnt/hello; exit 3"];
    let out = cluster.ferry(0, &exec);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("boot at"), "{stdout}");

    // What the guest wrote to its disk before the move is on n2's copy.
    cluster.ferry_ok(0, &["stop", "v1", "--force"])?;
    let n2_disk = cluster.agents[1]
        .data_dir
        .join("instances/v1/vm/disk.qcow2");
    let log = guest_file(&n2_disk, "/log", cluster.root())?;
    let before_move = format!("tick {}", before_move / 10 * 10);
    assert!(
        log.contains(&before_move),
        "{before_move} missing from the guest's /log: {log}"
    );

    // Back to the snapshot, on n2 where it moved: the guest goes on from
    // its memory then (the counter back where it was), not booting again.
    let on_n2 = console(&cluster, 1, "v1");
    let seen = ticks(&on_n2).len();
    let latest = *ticks(&on_n2).last().unwrap();
    cluster.ferry_ok(0, &["snapshot", "restore", "v1", "s1"])?;
    wait_for(
        "the guest to count on from the snapshot",
        BOOT,
        || match ticks(&on_n2).get(seen + 5) {
            Some(_) => Ok(()),
            None => bail!("no new ticks on n2"),
        },
    )?;
    let resumed = ticks(&on_n2)[seen];
    assert!(
        resumed <= at_snapshot + 20 && resumed + 20 < latest,
        "after the restore the counter is at {resumed}: snapshot at {at_snapshot}, before the restore {latest}"
    );
    assert_eq!(boots(&on_n2), 0, "the guest booted on the restore");
    cluster.ferry_ok(0, &["snapshot", "delete", "v1", "s1"])?;

    cluster.ferry_ok(0, &["delete", "v1", "--force"])?;
    let n2_dir = cluster.agents[1].data_dir.join("instances/v1");
    wait_for("v1's files to go", Duration::from_secs(10), || {
        if n2_dir.exists() {
            bail!("{} still there", n2_dir.display())
        }
        Ok(())
    })?;
    Ok(())
}

/// A VM counting on n1, with the source's live move held at `moment` (a
/// test-build hold point) once the hold file is there.
fn vm_on_n1_held_at(moment: &str) -> Result<Cluster> {
    let mut cluster = Cluster::new();
    cluster.agent_flags = vec!["--job-phase-timeout".into(), "20s".into()];
    cluster.env_for.insert(
        "n1".into(),
        vec![("FERRY_TEST_HOLD_AT".into(), moment.into())],
    );
    cluster.start_three()?;
    launch_vm(&cluster, "n1")?;
    wait_ticks(&console(&cluster, 0, "v1"), 5, BOOT)?;
    Ok(cluster)
}

/// kill -9 of the target's agent while the source's move is held at
/// `moment`: the move rolls back, the VM runs on on n1 with its counter
/// unbroken, and once n2's agent is back its QEMU and files are gone.
fn kill_target_during(moment: &str, bandwidth: &str) -> Result<()> {
    let mut cluster = vm_on_n1_held_at(moment)?;
    let hold = cluster.agents[0].data_dir.join("hold");
    std::fs::write(&hold, b"")?;
    cluster.ferry_ok(
        0,
        &[
            "move",
            "v1",
            "--target",
            "n2",
            "--detach",
            "--bandwidth",
            bandwidth,
        ],
    )?;
    let log = cluster.agents[0].log_path();
    wait_for(
        "the move to reach its hold",
        Duration::from_secs(60),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            match text
                .lines()
                .any(|l| l.contains("holding the job here") && l.contains(moment))
            {
                true => Ok(()),
                false => bail!("not held yet"),
            }
        },
    )?;
    cluster.kill(1);
    std::fs::remove_file(&hold)?;
    let job = wait_for("the move to roll back", Duration::from_secs(90), || {
        let job = cluster.ferry_json(0, &["job", "show", "1"])?;
        match job["phase"].as_str() {
            Some("RolledBack") => Ok(job),
            other => bail!("{other:?}"),
        }
    })?;
    assert_eq!(
        state(&cluster, "v1")?,
        ("n1".into(), "running".into()),
        "{job}"
    );
    let on_n1 = console(&cluster, 0, "v1");
    let last = *ticks(&on_n1).last().unwrap();
    wait_ticks(&on_n1, last + 5, Duration::from_secs(30))?;
    assert_consecutive(&ticks(&on_n1), "through the failed move");
    cluster.restart(1)?;
    let n2 = cluster.agents[1].data_dir.clone();
    wait_for(
        "n2 to remove what it received",
        Duration::from_secs(60),
        || {
            let left = running_vms(&n2);
            if !left.is_empty() || n2.join("instances/v1").exists() {
                bail!("QEMU {left:?} or files left on n2")
            }
            Ok(())
        },
    )?;
    Ok(())
}

#[test]
fn killing_the_target_agent_during_the_disk_mirror_leaves_the_vm_running_on_the_source(
) -> Result<()> {
    if !require_qemu() {
        return Ok(());
    }
    kill_target_during("live-mirror", "1G")
}

#[test]
fn killing_the_target_agent_during_the_memory_migration_leaves_the_vm_running_on_the_source(
) -> Result<()> {
    if !require_qemu() {
        return Ok(());
    }
    // 4 MiB/s: the memory (~90 MiB) is still on its way when it dies.
    kill_target_during("live-memory", "4M")
}

#[test]
fn evacuating_a_member_moves_its_container_and_its_vm_live_and_restore_brings_them_back(
) -> Result<()> {
    if !require_qemu() || !require_container_runtime() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    cluster.start_three()?;
    let rootfs = busybox_rootfs(cluster.root())?;
    cluster.launch_counter("c1", "n1", &rootfs)?;
    launch_vm(&cluster, "n1")?;
    let before_vm = wait_ticks(&console(&cluster, 0, "v1"), 5, BOOT)?;
    let before_c1 = cluster.counter(0, "c1")?;

    let plan = cluster.ferry_ok(0, &["cluster", "evacuate", "n1", "--dry-run"])?;
    assert_eq!(plan.matches("live move to").count(), 2, "{plan}");
    let out = cluster.ferry_ok(0, &["cluster", "evacuate", "n1"])?;
    assert!(out.contains("moved 2, stopped 0"), "{out}");
    let (vm_node, _) = state(&cluster, "v1")?;
    assert_ne!(vm_node, "n1");
    let (c1_node, _) = state(&cluster, "c1")?;
    assert_ne!(c1_node, "n1");
    let vm_at = cluster.index_of(&vm_node).unwrap();
    let on_new = console(&cluster, vm_at, "v1");
    wait_ticks(&on_new, before_vm + 3, Duration::from_secs(30))?;
    assert_eq!(boots(&on_new), 0, "the VM booted again on {vm_node}");
    assert_consecutive(&ticks(&on_new), "after the evacuation");
    assert!(
        cluster.counter(0, "c1")? >= before_c1,
        "the container's counter went back"
    );

    let out = cluster.ferry_ok(0, &["cluster", "restore", "n1"])?;
    assert!(out.contains("moved 2"), "{out}");
    assert_eq!(state(&cluster, "v1")?, ("n1".into(), "running".into()));
    assert_eq!(state(&cluster, "c1")?.0, "n1");
    Ok(())
}

#[test]
fn a_target_whose_qemu_lacks_a_feature_of_the_vm_cpu_model_is_refused_naming_it() -> Result<()> {
    if !require_qemu() {
        return Ok(());
    }
    let mut cluster = Cluster::new();
    let hide = (
        "FERRY_TEST_HIDE_FACTS".to_string(),
        "vmcpu:sse2".to_string(),
    );
    cluster.env_for.insert("n2".into(), vec![hide]);
    cluster.start_three()?;
    launch_vm(&cluster, "n1")?;
    let dry = cluster.ferry(0, &["move", "v1", "--target", "n2", "--dry-run"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&dry.stdout),
        String::from_utf8_lossy(&dry.stderr)
    );
    assert!(
        text.contains("cpu-model") && text.contains("lacks sse2"),
        "the dry run did not name the feature: {text}"
    );
    let err = cluster.ferry_err(0, &["move", "v1", "--target", "n2"])?;
    assert!(err.contains("lacks sse2"), "{err}");
    assert_eq!(state(&cluster, "v1")?, ("n1".into(), "running".into()));
    // Another member runs the model: the same move there goes. The model
    // was the default: the best one n1 and n3 run (n2 runs none).
    let model = cpu_model_of(&cluster, "v1")?;
    let out = cluster.ferry_ok(0, &["move", "v1", "--target", "n3", "--dry-run"])?;
    assert!(
        out.contains(&format!("the target runs CPU model {model}")),
        "{out}"
    );
    Ok(())
}
