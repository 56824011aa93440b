//! Moves whose rootfs goes by btrfs send/receive: n1's and n2's data dirs
//! sit on btrfs filesystems of their own (loop-mounted images the test
//! makes), n3's on the test's temp dir. Between n1 and n2 both passes go
//! by btrfs (the final one incremental), pulled and pushed; to and from
//! n3 the entry stream takes over, and the rootfs n1 receives that way is
//! a subvolume again; a rootfs holding a subvolume goes as entries.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use cluster_tests::{
    busybox_rootfs, pseudo_random, require_container_runtime, require_tool, run_tool, wait_for,
    Cluster,
};

/// Every tick: a line appended to /log, the count in /counter, a new
/// /mark-N and the previous one removed. A final pass that missed a
/// change leaves a gap in /log (the restored shell appends after what it
/// wrote) or two marks.
const WORKLOAD: &str = "i=0; while true; do i=$((i+1)); echo $i >> /log; echo $i > /counter; \
     touch /mark-$i; rm -f /mark-$((i-1)); sleep 0.05; done";

fn rootfs_of(cluster: &Cluster, index: usize) -> PathBuf {
    cluster.agents[index]
        .data_dir
        .join("instances/c1/bundle/rootfs")
}

fn is_subvolume(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.ino() == 256)
}

/// The workload's files are whole after a move: /log counts 1, 2, ... with
/// no gap, exactly one mark, the ballast as it was.
fn check_files(cluster: &Cluster, ballast_sum: &str) -> Result<()> {
    let log = cluster.ferry_ok(0, &["exec", "c1", "--", "cat", "/log"])?;
    let lines: Vec<u64> = log
        .lines()
        .map(|l| l.trim().parse())
        .collect::<Result<_, _>>()?;
    let expected: Vec<u64> = (1..=lines.len() as u64).collect();
    assert_eq!(lines, expected, "/log has a gap or a repeat");
    wait_for("exactly one mark", Duration::from_secs(5), || {
        let marks =
            cluster.ferry_ok(0, &["exec", "c1", "--", "sh", "-c", "ls / | grep -c mark-"])?;
        match marks.trim() {
            "1" => Ok(()),
            n => bail!("{n} marks"),
        }
    })?;
    let sum = cluster.ferry_ok(0, &["exec", "c1", "--", "md5sum", "/ballast"])?;
    assert_eq!(sum, ballast_sum);
    Ok(())
}

/// Move c1 to `target` in `mode`; the job's notes.
fn move_to(cluster: &Cluster, job: u64, target: &str, mode: &str) -> Result<String> {
    let before = cluster.counter(0, "c1")?;
    let out = cluster.ferry_ok(0, &["move", "c1", "--target", target, "--mode", mode])?;
    assert!(out.contains("downtime"), "{out}");
    let show = cluster.ferry_json(0, &["job", "show", &job.to_string()])?;
    assert_eq!(show["phase"], "Done", "{show}");
    let after = cluster.counter(0, "c1")?;
    assert!(
        after >= before,
        "the counter restarted: {before} -> {after}"
    );
    Ok(show["notes"].to_string())
}

#[test]
fn a_rootfs_on_btrfs_moves_by_send_and_receive_and_by_entries_to_other_filesystems() -> Result<()> {
    if !require_container_runtime()
        || !require_tool("btrfs moves", "mkfs.btrfs")
        || !require_tool("btrfs moves", "btrfs")
    {
        return Ok(());
    }
    let mut filesystems = cluster_tests::btrfs::Filesystems::default();
    let mut cluster = Cluster::new();
    // The default reserve (1 GiB) is more than the test's filesystems.
    cluster.agent_flags = vec!["--disk-reserve".into(), "64M".into()];
    for name in ["n1", "n2"] {
        filesystems.btrfs_data_dir(cluster.root(), name, 512 << 20)?;
    }
    cluster.start_three()?;
    let rootfs = busybox_rootfs(cluster.root())?;
    std::fs::write(rootfs.join("ballast"), pseudo_random(16 << 20))?;
    cluster.ferry_ok(
        0,
        &[
            "launch",
            "c1",
            "--rootfs",
            &rootfs.to_string_lossy(),
            "--target",
            "n1",
            "--",
            "sh",
            "-c",
            WORKLOAD,
        ],
    )?;
    wait_for(
        "the workload to count",
        Duration::from_secs(30),
        || match cluster.counter(0, "c1")? {
            n if n >= 3 => Ok(()),
            n => bail!("counter at {n}"),
        },
    )?;
    assert!(
        is_subvolume(&rootfs_of(&cluster, 0)),
        "n1's rootfs is no subvolume"
    );
    let ballast_sum = cluster.ferry_ok(0, &["exec", "c1", "--", "md5sum", "/ballast"])?;
    let sampler = cluster.sampler("c1");

    let notes = move_to(&cluster, 1, "n2", "pull")?;
    assert!(notes.contains("btrfs send/receive"), "{notes}");
    // The final pass was incremental: the 16 MiB ballast went once.
    let bytes = cluster.ferry_json(0, &["job", "show", "1"])?["bytes"]
        .as_u64()
        .unwrap_or(0);
    assert!(bytes > 16 << 20 && bytes < 28 << 20, "{bytes} bytes sent");
    assert!(
        is_subvolume(&rootfs_of(&cluster, 1)),
        "n2's rootfs is no subvolume"
    );
    check_files(&cluster, &ballast_sum)?;
    let source_dir = cluster.agents[0].data_dir.join("instances/c1");
    wait_for(
        "n1's copy removed",
        Duration::from_secs(30),
        || match source_dir.exists() {
            true => bail!("{} is still there", source_dir.display()),
            false => Ok(()),
        },
    )?;
    // The snapshots and received subvolumes go once the move is over.
    wait_for(
        "the btrfs work areas swept",
        Duration::from_secs(30),
        || {
            for agent in &cluster.agents[..2] {
                let work = agent.data_dir.join("btrfs-moves");
                let left = std::fs::read_dir(&work).map_or(0, |d| d.count());
                if left > 0 {
                    bail!("{} holds {left} entries", work.display());
                }
            }
            Ok(())
        },
    )?;

    let notes = move_to(&cluster, 2, "n3", "pull")?;
    assert!(!notes.contains("btrfs"), "{notes}");
    check_files(&cluster, &ballast_sum)?;

    let notes = move_to(&cluster, 3, "n1", "pull")?;
    assert!(!notes.contains("btrfs"), "{notes}");
    check_files(&cluster, &ballast_sum)?;
    assert!(
        is_subvolume(&rootfs_of(&cluster, 0)),
        "the rootfs n1 received as entries is no subvolume"
    );
    // Pushed from n1, whose rootfs came as entries into a subvolume: by
    // btrfs again.
    let notes = move_to(&cluster, 4, "n2", "push")?;
    assert!(notes.contains("btrfs send/receive"), "{notes}");
    check_files(&cluster, &ballast_sum)?;

    // A subvolume inside the rootfs would arrive empty by btrfs (a
    // snapshot leaves it out): such a rootfs goes as entries.
    let nested = rootfs_of(&cluster, 1).join("nested");
    run_tool("btrfs", &["subvolume", "create", &nested.to_string_lossy()])?;
    std::fs::write(nested.join("file"), "inside")?;
    let notes = move_to(&cluster, 5, "n1", "pull")?;
    assert!(!notes.contains("btrfs"), "{notes}");
    let inside = cluster.ferry_ok(0, &["exec", "c1", "--", "cat", "/nested/file"])?;
    assert_eq!(inside.trim(), "inside");
    check_files(&cluster, &ballast_sum)?;
    assert_eq!(sampler.finish(), 1, "two copies ran at once");
    // A snapshot restored into the rootfs leaves it a subvolume.
    cluster.ferry_ok(0, &["snapshot", "create", "c1", "s1"])?;
    cluster.ferry_ok(0, &["snapshot", "restore", "c1", "s1"])?;
    assert!(
        is_subvolume(&rootfs_of(&cluster, 0)),
        "a snapshot restore made n1's rootfs a plain directory"
    );
    let sum = cluster.ferry_ok(0, &["exec", "c1", "--", "md5sum", "/ballast"])?;
    assert_eq!(sum, ballast_sum);
    Ok(())
}
