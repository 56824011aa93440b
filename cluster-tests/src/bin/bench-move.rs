//! Migration benchmark (not a test): a container dirtying N MiB of memory
//! as fast as it can is moved live between two agents; reported against
//! the floor of the same container checkpointed and restored locally by
//! runc to tmpfs, with no network and no cluster.
//!
//! cargo build --release --bin ferry && cargo run --release -p cluster-tests --bin bench-move [-- 64 256]
//!
//! `FERRY_BENCH_ROOTFS_FILES=N` adds N files of 1 KiB to the rootfs; each
//! move also reports how long its final rootfs pass took (the target's
//! note on the job).
//!
//! `FERRY_BENCH_MODE=push|relay` moves in that mode (relay: from n2 to
//! n3 through n1, the leader, which the move command goes to).
//!
//! `FERRY_BENCH_BTRFS=1` puts every agent's data dir on a btrfs of its
//! own (a loop-mounted sparse image), so the rootfs goes by btrfs
//! send/receive. `FERRY_BENCH_BTRFS=compare` runs the sizes twice, on
//! plain data dirs and then on btrfs ones, and reports the final rootfs
//! pass by btrfs beside the one by entries.
//!
//! `FERRY_BENCH_LAZY=compare` runs the sizes twice, stop-and-copy and then
//! lazily (`--lazy`: CRIU lazy pages; the source needs fs.pipe-max-size
//! of at least 4194304), and reports the lazy downtime against the
//! stop-and-copy one.

use std::io::{Read, Seek, SeekFrom};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cluster_tests::btrfs::Filesystems;
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
    let count = extra_files()?;
    for i in 0..count {
        let dir = rootfs.join("many").join((i / 1000).to_string());
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(i.to_string()), [b'x'; 1024])?;
    }
    if count > 0 {
        println!("rootfs with {count} more files of 1 KiB");
    }
    Ok(())
}

fn extra_files() -> Result<usize> {
    match std::env::var("FERRY_BENCH_ROOTFS_FILES") {
        Ok(n) => n.parse().context("FERRY_BENCH_ROOTFS_FILES"),
        Err(_) => Ok(0),
    }
}

/// Who takes part, and which member is the source and which the target.
struct Setup {
    mode: String,
    members: Vec<&'static str>,
    from: usize,
    to: usize,
    /// Every data dir on a btrfs of its own.
    btrfs: bool,
    /// Moves with `--lazy`.
    lazy: bool,
}

impl Setup {
    fn new(btrfs: bool) -> Setup {
        let mode = std::env::var("FERRY_BENCH_MODE").unwrap_or_else(|_| "pull".into());
        // The command goes to n1 (the relay in relay mode).
        let (members, from, to) = match mode.as_str() {
            "relay" => (vec!["n1", "n2", "n3"], 1, 2),
            _ => (vec!["n1", "n2"], 0, 1),
        };
        Setup {
            mode,
            members,
            from,
            to,
            btrfs,
            lazy: false,
        }
    }

    /// What the figures' names add: the mode, the extra files, btrfs.
    fn suffix(&self) -> Result<String> {
        let mut suffix = String::new();
        if self.mode != "pull" {
            suffix += &format!(", {} mode", self.mode);
        }
        if self.lazy {
            suffix += ", lazy";
        }
        let files = extra_files()?;
        if files > 0 {
            suffix += &format!(", {files} extra files");
        }
        if self.btrfs {
            suffix += ", btrfs";
        }
        Ok(suffix)
    }
}

/// A converged cluster of the setup's members, each with its facts.
fn start(setup: &Setup, filesystems: &mut Filesystems) -> Result<Cluster> {
    let mut cluster = Cluster::new();
    if setup.btrfs {
        for name in &setup.members {
            filesystems.btrfs_data_dir(cluster.root(), name, 8 << 30)?;
        }
        cluster.agent_flags = vec!["--disk-reserve".into(), "256M".into()];
        println!("data dirs on btrfs");
    }
    cluster.bootstrap("n1", 3)?;
    for name in &setup.members[1..] {
        cluster.join(name, 0)?;
    }
    cluster.wait_converged(&setup.members, Duration::from_secs(60))?;
    for name in &setup.members {
        wait_for("facts", Duration::from_secs(60), || {
            let v = cluster.ferry_json(0, &["cluster", "show", name])?;
            if v["facts"].is_null() {
                bail!("no facts")
            } else {
                Ok(())
            }
        })?;
    }
    Ok(cluster)
}

/// One move's figures.
struct Outcome {
    downtime_ms: u64,
    floor_ms: u64,
    /// The final rootfs pass, from the target's note on the job.
    final_pass_ms: Option<u64>,
}

/// The milliseconds in the job's note "... final ... pass in N ms".
fn final_pass_ms(notes: &serde_json::Value) -> Option<u64> {
    let notes = notes.as_array()?;
    notes.iter().filter_map(|n| n.as_str()).find_map(|note| {
        let (_, after) = note.split_once("pass in ")?;
        after.split(' ').next()?.parse().ok()
    })
}

/// The floor: the container, now on the target, dumped and restored by
/// runc on this host to tmpfs; the checkpoint's and the restore's time.
fn floor(cluster: &Cluster, to: usize, name: &str) -> Result<(Duration, Duration)> {
    let root = cluster.agents[to].data_dir.join("runc");
    let bundle = cluster.agents[to]
        .data_dir
        .join(format!("instances/{name}/bundle"));
    let images = std::path::PathBuf::from(format!("/dev/shm/ferry-bench-{name}"));
    let _ = std::fs::remove_dir_all(&images);
    std::fs::create_dir_all(&images)?;
    let images_s = images.to_string_lossy().into_owned();
    let t = Instant::now();
    runc(&root, &["checkpoint", "--image-path", &images_s, name]).context("floor checkpoint")?;
    let dump = t.elapsed();
    let t = Instant::now();
    let bundle = bundle.to_string_lossy();
    let restore = ["restore", "--detach", "--image-path", &images_s];
    runc(
        &root,
        &[&restore[..], &["--bundle", &bundle, name]].concat(),
    )
    .context("floor restore")?;
    let restore = t.elapsed();
    let _ = std::fs::remove_dir_all(&images);
    Ok((dump, restore))
}

/// Launch a container dirtying `mib` MiB on the source, move it, measure
/// the floor, delete it.
fn measure(
    cluster: &Cluster,
    setup: &Setup,
    rootfs: &str,
    job: usize,
    mib: usize,
) -> Result<Outcome> {
    let name = format!("dirty{mib}");
    let script = workload(mib);
    let on = setup.members[setup.from];
    let launch = ["launch", &name, "--rootfs", rootfs, "--target", on];
    cluster.ferry_ok(0, &[&launch[..], &["--", "sh", "-c", &script]].concat())?;
    cluster.wait_workload_ready(setup.from, &name)?;
    let started = Instant::now();
    let to = setup.members[setup.to];
    let lazy: &[&str] = if setup.lazy { &["--lazy"] } else { &[] };
    let moving = ["move", &name, "--target", to, "--mode", &setup.mode];
    cluster.ferry_ok(0, &[&moving[..], lazy].concat())?;
    let wall = started.elapsed();
    let view = cluster.ferry_json(0, &["job", "show", &job.to_string()])?;
    let (down, total, bytes) = (
        view["downtime_ms"].as_u64().unwrap_or(0),
        view["total_ms"].as_u64().unwrap_or(0),
        view["bytes"].as_u64().unwrap_or(0),
    );
    let final_pass = final_pass_ms(&view["notes"]);
    let (dump, restore) = floor(cluster, setup.to, &name)?;
    let floor_ms = (dump + restore).as_millis() as u64;
    println!(
        "{mib} MiB dirtied: ferry move downtime {down} ms, total {total} ms (CLI wall {} ms), {:.1} MiB sent, final rootfs pass {final_pass:?} ms; floor runc checkpoint {} ms + restore {} ms = {floor_ms} ms; downtime/floor {:.2}",
        wall.as_millis(),
        bytes as f64 / (1u64 << 20) as f64,
        dump.as_millis(),
        restore.as_millis(),
        down as f64 / floor_ms.max(1) as f64
    );
    cluster.ferry_ok(0, &["delete", &name, "--force"])?;
    Ok(Outcome {
        downtime_ms: down,
        floor_ms,
        final_pass_ms: final_pass,
    })
}

/// Every size moved once in a fresh cluster of `setup`.
fn run(setup: &Setup, sizes: &[usize]) -> Result<Vec<Outcome>> {
    // Declared first: it drops last, after the cluster's containers.
    let mut filesystems = Filesystems::default();
    let cluster = start(setup, &mut filesystems)?;
    let rootfs = busybox_rootfs(cluster.root())?;
    add_files(&rootfs)?;
    let rootfs = rootfs.to_string_lossy().into_owned();
    let suffix = setup.suffix()?;
    let mut outcomes = Vec::new();
    for (job, mib) in sizes.iter().enumerate() {
        let outcome = measure(&cluster, setup, &rootfs, job + 1, *mib)?;
        let ratio = outcome.downtime_ms as f64 / outcome.floor_ms.max(1) as f64;
        figures::report(
            &format!("container downtime, {mib} MiB dirtied{suffix}"),
            &format!("{} ms = {ratio:.2}x", outcome.downtime_ms),
            &format!("runc checkpoint+restore to tmpfs {} ms", outcome.floor_ms),
            "<= 1.2x",
        );
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

fn ms(value: Option<u64>) -> String {
    value.map_or_else(|| "?".into(), |v| format!("{v} ms"))
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
    if std::env::var("FERRY_BENCH_LAZY").as_deref() == Ok("compare") {
        return compare_lazy(&sizes);
    }
    let btrfs = std::env::var("FERRY_BENCH_BTRFS").unwrap_or_default();
    if btrfs != "compare" {
        run(&Setup::new(btrfs == "1"), &sizes)?;
        return Ok(());
    }
    let by_entries = run(&Setup::new(false), &sizes)?;
    let setup = Setup::new(true);
    let by_btrfs = run(&setup, &sizes)?;
    let suffix = setup.suffix()?;
    for ((mib, entries), btrfs) in sizes.iter().zip(&by_entries).zip(&by_btrfs) {
        figures::report(
            &format!("final rootfs pass, {mib} MiB dirtied{suffix}"),
            &ms(btrfs.final_pass_ms),
            &format!("entries {}", ms(entries.final_pass_ms)),
            "bounded by what changed",
        );
    }
    Ok(())
}

/// The sizes stop-and-copy, then lazily: the lazy downtime beside the
/// stop-and-copy one.
fn compare_lazy(sizes: &[usize]) -> Result<()> {
    let copied = run(&Setup::new(false), sizes)?;
    let lazy = Setup {
        lazy: true,
        ..Setup::new(false)
    };
    let lazily = run(&lazy, sizes)?;
    for ((mib, copy), lazy) in sizes.iter().zip(&copied).zip(&lazily) {
        let ratio = lazy.downtime_ms as f64 / copy.downtime_ms.max(1) as f64;
        figures::report(
            &format!("lazy move downtime, {mib} MiB dirtied"),
            &format!("{} ms = {ratio:.2}x", lazy.downtime_ms),
            &format!("stop-and-copy move {} ms", copy.downtime_ms),
            "<= 0.3x",
        );
    }
    Ok(())
}
