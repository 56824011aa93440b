//! Full and failing disks: a move to a member without room above its
//! `--disk-reserve` is refused with the figures, and an agent whose Raft
//! store fails stops (non-zero, saying why) instead of living on as a
//! zombie, then comes back once the disk works again. Data dirs sit on
//! small tmpfs mounts the test makes.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use cluster_tests::{busybox_rootfs, require_container_runtime, run_tool, wait_for, Cluster};

const CONVERGE: Duration = Duration::from_secs(30);

/// tmpfs mounts made by a test, unmounted when it drops: declared before
/// the cluster, so the cluster (and its containers, whose runc state is on
/// them) goes first.
#[derive(Default)]
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn tmpfs(&mut self, dir: &Path, size: &str) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let opts = format!("size={size}");
        run_tool(
            "mount",
            &["-t", "tmpfs", "-o", &opts, "tmpfs", &dir.to_string_lossy()],
        )?;
        self.0.push(dir.to_path_buf());
        Ok(())
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = run_tool("umount", &["-l", &dir.to_string_lossy()]);
        }
    }
}

#[test]
fn a_move_to_a_member_without_room_above_its_reserve_is_refused_with_the_figures() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let mut mounts = Mounts::default();
    let mut cluster = Cluster::new();
    cluster.agent_flags = vec!["--disk-reserve".into(), "32M".into()];
    mounts.tmpfs(&cluster.root().join("n2"), "96m")?;
    cluster.bootstrap("n1", 3)?;
    cluster.join("n2", 0)?;
    cluster.wait_converged(&["n1", "n2"], CONVERGE)?;
    let rootfs = busybox_rootfs(cluster.root())?;
    std::fs::write(rootfs.join("ballast"), vec![1u8; 24 << 20])?;
    cluster.launch_counter("c1", "n1", &rootfs)?;
    // n2's room above the reserve (about 60 MiB) is less than the rootfs
    // and the margin a move keeps; gossip carries the figure.
    wait_for("n2's disk room by gossip", CONVERGE, || {
        let show = cluster.ferry_json(0, &["cluster", "show", "n2"])?;
        match show["load"]["disk_room_bytes"].as_u64() {
            Some(room) if room > 0 => Ok(()),
            _ => bail!("no disk figure yet: {}", show["load"]),
        }
    })?;
    let err = cluster.ferry_err(0, &["move", "c1", "--target", "n2"])?;
    assert!(err.contains("disk: needs"), "{err}");
    assert!(err.contains("above its --disk-reserve"), "{err}");
    assert!(!cluster.agents[1].data_dir.join("instances/c1").exists());
    // A launch whose rootfs does not fit above n2's reserve is refused
    // as its upload arrives, before the file that would cross it.
    let big = busybox_rootfs(&cluster.root().join("big"))?;
    std::fs::write(big.join("ballast"), vec![1u8; 80 << 20])?;
    let root = big.to_string_lossy().into_owned();
    let err = cluster.ferry_err(
        0,
        &[
            "launch", "c2", "--rootfs", &root, "--target", "n2", "--", "sleep", "100",
        ],
    )?;
    assert!(err.contains("receiving ballast needs 80 MiB"), "{err}");
    assert!(err.contains("--disk-reserve"), "{err}");
    assert!(!cluster.agents[1].data_dir.join("instances/c2").exists());
    // n2 serves on: a write through it commits.
    cluster.token(1, "later", "1h")?;
    Ok(())
}

#[test]
fn an_agent_whose_raft_store_fails_stops_saying_why_and_comes_back() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let mut mounts = Mounts::default();
    let mut cluster = Cluster::new();
    let n3_dir = cluster.root().join("n3");
    mounts.tmpfs(&n3_dir, "64m")?;
    cluster.bootstrap("n1", 3)?;
    cluster.join("n2", 0)?;
    cluster.join("n3", 0)?;
    cluster.wait_converged(&["n1", "n2", "n3"], CONVERGE)?;
    // n3's disk fills up under it (not through ferry, so no reserve
    // helps); the others go on writing, and n3's log must grow.
    let filler = n3_dir.join("filler");
    let of = format!("of={}", filler.display());
    let _ = Command::new("dd")
        .args(["if=/dev/zero", &of, "bs=1M"])
        .output()?;
    let mut written = 0;
    let code = loop {
        if let Ok(code) = cluster.wait_exit(2, Duration::from_millis(100)) {
            break code;
        }
        if written == 2000 {
            bail!("n3 kept running on a full disk: {}", cluster.log_tail(2));
        }
        cluster.token(0, &format!("t{written}"), "1h")?;
        written += 1;
    };
    let log = cluster.log_tail(2);
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}: {log}");
    assert!(log.contains("the raft store failed"), "{log}");
    // Space is freed: n3 starts again and catches up.
    std::fs::remove_file(&filler)?;
    cluster.restart(2)?;
    cluster.token(0, "after", "1h")?;
    wait_for("n3 caught up", CONVERGE, || {
        let tokens = cluster.ferry_ok(2, &["cluster", "token", "list"])?;
        if tokens.contains("after") {
            Ok(())
        } else {
            bail!("not yet: {tokens}")
        }
    })?;
    Ok(())
}
