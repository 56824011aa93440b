//! VM instances on real QEMU across agents on loopback (TCG: this machine
//! kind's KVM runs only PVM guests, see docs/vm-migration-recipe.md). The
//! guest counts on its serial console every 100 ms and logs every tenth
//! tick to its disk.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use cluster_tests::vm::{boots, guest_file, require_qemu, test_guest, ticks};
use cluster_tests::{wait_for, Cluster};

const BOOT: Duration = Duration::from_secs(90);

fn console(cluster: &Cluster, index: usize, name: &str) -> PathBuf {
    cluster.agents[index]
        .data_dir
        .join("instances")
        .join(name)
        .join("console.log")
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
    let guest = cluster.root().join("guest");
    let (kernel, initrd, disk) = test_guest(&guest)?;
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let (kernel, initrd, disk) = (path(&kernel), path(&initrd), path(&disk));
    let launch = [
        "launch",
        "v1",
        "--vm",
        "--disk",
        &disk,
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--append",
        "console=ttyS0 quiet panic=-1",
        "--memory",
        "256M",
        "--target",
        "n1",
    ];
    cluster.ferry_ok(0, &launch)?;
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

    // A live (stateful) move: memory and disk go to n2, the source's
    // QEMU and files go.
    let out = cluster.ferry_ok(0, &["move", "v1", "--target", "n2"])?;
    assert!(out.contains("moved v1 from n1 to n2"), "{out}");
    let on_n2 = console(&cluster, 1, "v1");
    let last_on_n1 = *ticks(&on_n1).last().unwrap();
    wait_ticks(&on_n2, last_on_n1 + 5, Duration::from_secs(30))?;
    let moved = ticks(&on_n2);
    assert_eq!(
        moved[0],
        last_on_n1 + 1,
        "the counter did not carry on: {moved:?}"
    );
    assert_consecutive(&moved, "after the move");
    assert_eq!(boots(&on_n2), 0, "the guest booted again on n2");
    assert_eq!(state(&cluster, "v1")?, ("n2".into(), "running".into()));
    let n1_dir = cluster.agents[0].data_dir.join("instances/v1");
    assert!(!n1_dir.exists(), "the source kept {}", n1_dir.display());

    // What the guest wrote to its disk before the move is on n2's copy.
    cluster.ferry_ok(0, &["stop", "v1", "--force"])?;
    let n2_disk = cluster.agents[1]
        .data_dir
        .join("instances/v1/vm/disk.qcow2");
    let log = guest_file(&n2_disk, "/log", cluster.root())?;
    let before_move = format!("tick {}", last_on_n1 / 10 * 10);
    assert!(
        log.contains(&before_move),
        "{before_move} missing from the guest's /log: {log}"
    );

    cluster.ferry_ok(0, &["delete", "v1"])?;
    let n2_dir = cluster.agents[1].data_dir.join("instances/v1");
    wait_for("v1's files to go", Duration::from_secs(10), || {
        if n2_dir.exists() {
            bail!("{} still there", n2_dir.display())
        }
        Ok(())
    })?;
    Ok(())
}
