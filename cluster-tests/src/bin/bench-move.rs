//! Migration benchmark (not a test): a container dirtying N MiB of memory
//! as fast as it can is moved live between two agents; reported against
//! the floor of the same container checkpointed and restored locally by
//! runc to tmpfs, with no network and no cluster.
//!
//! cargo build --release --bin ferry && cargo run --release -p cluster-tests --bin bench-move [-- 64 256]
//!
//! `FERRY_BENCH_ROOTFS_FILES=N` adds N files of 1 KiB to the rootfs (how
//! long the final rootfs pass takes shows in the agents' debug log:
//! `FERRY_TEST_LOG=info,ferry_agent::migration=debug`).
//!
//! `FERRY_BENCH_MODE=push|relay` moves in that mode (relay: from n2 to
//! n3 through n1, the leader, which the move command goes to).
//!
//! `FERRY_BENCH_BTRFS=1` puts every agent's data dir on a btrfs of its
//! own (a loop-mounted sparse image), so the rootfs goes by btrfs
//! send/receive.

use std::io::{Read, Seek, SeekFrom};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cluster_tests::{busybox_rootfs, dirtying_workload as workload, figures, wait_for, Cluster};

fn runc(root: &std::path::Path, args: &[&str]) -> Result<()> {
    // A restored container inherits runc's stdio: no pipe here, or reading
    // runc's output would wait for the container to exit.
    let errors = tempfile::tempfile()?;
    let status = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(errors.try_clone()?)
        .status()?;
    if !status.success() {
        let mut text = String::new();
        let mut errors = errors;
        errors.seek(SeekFrom::Start(0))?;
        errors.read_to_string(&mut text)?;
        bail!("runc {args:?}: {text}");
    }
    Ok(())
}

/// `FERRY_BENCH_ROOTFS_FILES` files of 1 KiB under `rootfs/many`, a
/// thousand to a directory.
fn add_files(rootfs: &std::path::Path) -> Result<()> {
    let count: usize = match std::env::var("FERRY_BENCH_ROOTFS_FILES") {
        Ok(n) => n.parse().context("FERRY_BENCH_ROOTFS_FILES")?,
        Err(_) => return Ok(()),
    };
    for i in 0..count {
        let dir = rootfs.join("many").join((i / 1000).to_string());
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(i.to_string()), [b'x'; 1024])?;
    }
    println!("rootfs with {count} more files of 1 KiB");
    Ok(())
}

fn main() -> Result<()> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() {
        vec![64, 256]
    } else {
        sizes
    };
    let mode = std::env::var("FERRY_BENCH_MODE").unwrap_or_else(|_| "pull".into());
    let mut members = vec!["n1", "n2"];
    // Source and target; the command goes to n1 (the relay in relay mode).
    let (from, to) = if mode == "relay" {
        members.push("n3");
        (1, 2)
    } else {
        (0, 1)
    };
    let suffix = match mode.as_str() {
        "pull" => String::new(),
        other => format!(", {other} mode"),
    };
    let mut filesystems = cluster_tests::btrfs::Filesystems::default();
    let mut cluster = Cluster::new();
    if std::env::var("FERRY_BENCH_BTRFS").is_ok_and(|v| v == "1") {
        for name in &members {
            filesystems.btrfs_data_dir(cluster.root(), name, 8 << 30)?;
        }
        cluster.agent_flags = vec!["--disk-reserve".into(), "256M".into()];
        println!("data dirs on btrfs");
    }
    cluster.bootstrap("n1", 3)?;
    for name in &members[1..] {
        cluster.join(name, 0)?;
    }
    cluster.wait_converged(&members, Duration::from_secs(60))?;
    for name in &members {
        wait_for("facts", Duration::from_secs(60), || {
            let v = cluster.ferry_json(0, &["cluster", "show", name])?;
            if v["facts"].is_null() {
                bail!("no facts")
            } else {
                Ok(())
            }
        })?;
    }
    let rootfs = busybox_rootfs(cluster.root())?;
    add_files(&rootfs)?;
    let rootfs = rootfs.to_string_lossy().into_owned();
    for (job, mib) in sizes.iter().enumerate() {
        let name = format!("dirty{mib}");
        let script = workload(*mib);
        cluster.ferry_ok(
            0,
            &[
                "launch",
                &name,
                "--rootfs",
                &rootfs,
                "--target",
                members[from],
                "--",
                "sh",
                "-c",
                &script,
            ],
        )?;
        cluster.wait_workload_ready(from, &name)?;
        let started = Instant::now();
        cluster.ferry_ok(
            0,
            &["move", &name, "--target", members[to], "--mode", &mode],
        )?;
        let wall = started.elapsed();
        let id = (job + 1).to_string();
        let view = cluster.ferry_json(0, &["job", "show", &id])?;
        let (down, total, bytes) = (
            view["downtime_ms"].as_u64().unwrap_or(0),
            view["total_ms"].as_u64().unwrap_or(0),
            view["bytes"].as_u64().unwrap_or(0),
        );
        // Floor: the same container, now on the target, dumped and
        // restored by runc on this host to tmpfs.
        let root = cluster.agents[to].data_dir.join("runc");
        let bundle = cluster.agents[to]
            .data_dir
            .join(format!("instances/{name}/bundle"));
        let images = std::path::PathBuf::from(format!("/dev/shm/ferry-bench-{name}"));
        let _ = std::fs::remove_dir_all(&images);
        std::fs::create_dir_all(&images)?;
        let images_s = images.to_string_lossy().into_owned();
        let t = Instant::now();
        runc(&root, &["checkpoint", "--image-path", &images_s, &name])
            .context("floor checkpoint")?;
        let dump = t.elapsed();
        let t = Instant::now();
        runc(
            &root,
            &[
                "restore",
                "--detach",
                "--image-path",
                &images_s,
                "--bundle",
                &bundle.to_string_lossy(),
                &name,
            ],
        )
        .context("floor restore")?;
        let restore = t.elapsed();
        let _ = std::fs::remove_dir_all(&images);
        let floor = (dump + restore).as_millis() as u64;
        println!(
            "{mib} MiB dirtied: ferry move downtime {down} ms, total {total} ms (CLI wall {} ms), {:.1} MiB sent; floor runc checkpoint {} ms + restore {} ms = {floor} ms; downtime/floor {:.2}",
            wall.as_millis(),
            bytes as f64 / (1u64 << 20) as f64,
            dump.as_millis(),
            restore.as_millis(),
            down as f64 / floor.max(1) as f64
        );
        figures::report(
            &format!("container downtime, {mib} MiB dirtied{suffix}"),
            &format!("{down} ms = {:.2}x", down as f64 / floor.max(1) as f64),
            &format!("runc checkpoint+restore to tmpfs {floor} ms"),
            "<= 1.2x",
        );
        cluster.ferry_ok(0, &["delete", &name, "--force"])?;
    }
    Ok(())
}
