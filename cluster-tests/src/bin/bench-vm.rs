//! VM live-move benchmark (not a test): the counting test guest with
//! `MEMORY` MiB of RAM, a `DISK` MiB disk and `DIRTY` MiB of memory it
//! keeps rewriting, moved live by ferry (two agents on loopback, QEMU's
//! streams relayed over the move's QUIC connection) against the same QMP
//! sequence between two local QEMUs over direct unix sockets, in one run.
//! TCG on this machine kind (its KVM runs only PVM guests).
//!
//! cargo build --release --bin ferry && cargo run --release -p cluster-tests --bin bench-vm [-- MEMORY DISK DIRTY [--multifd N | --postcopy]]
//!
//! The move options after the sizes apply to both paths.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cluster_tests::vm::{test_guest, ticks};
use cluster_tests::{run_tool, wait_for, Cluster};
use ferry_agent::vm::machine::{self, Machine, VmDir};
use ferry_agent::vm::qemu::Accel;
use ferry_agent::vm::qmp::Qmp;
use ferry_raft::LiveSettings;

const TIMEOUT: Duration = Duration::from_secs(600);

struct Run {
    path: &'static str,
    /// QEMU's own figures of the copy (the job's note).
    note: String,
    total_ms: u64,
    paused_ms: u64,
    bytes: u64,
}

fn append(dirty: u64) -> String {
    format!("console=ttyS0 quiet panic=-1 dirty={dirty}")
}

fn machine(memory: u64, disk_bytes: u64, dirty: u64) -> Machine {
    Machine {
        vm: ferry_raft::VmSpec {
            cpus: 1,
            memory_mib: memory,
            cpu_model: "qemu64".into(),
            kernel: true,
            initrd: true,
            append: Some(append(dirty)),
            disk_bytes,
        },
        accel: Accel::Tcg,
        nic: None,
    }
}

/// A VM dir under `root` with the guest's boot files and a disk.
fn vm_dir(root: &Path, guest: &Path, disk_mib: u64, empty: bool) -> Result<VmDir> {
    let dir = VmDir::new(root.to_path_buf());
    std::fs::create_dir_all(dir.boot())?;
    std::fs::create_dir_all(dir.migration())?;
    std::fs::copy(guest.join("vmlinuz"), dir.kernel())?;
    std::fs::copy(guest.join("initrd.gz"), dir.initrd())?;
    let disk = dir.disk().to_string_lossy().into_owned();
    let size = format!("{disk_mib}M");
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", &disk, &size])?;
    if !empty {
        // Fill most of the disk so the mirror has something to copy.
        let raw = root.join("fill.raw");
        let fill = format!("count={}", disk_mib * 3 / 4);
        let of = format!("of={}", raw.display());
        run_tool(
            "dd",
            &["if=/dev/urandom", &of, "bs=1M", &fill, "status=none"],
        )?;
        run_tool(
            "qemu-img",
            &["convert", "-O", "qcow2", &raw.to_string_lossy(), &disk],
        )?;
        run_tool("qemu-img", &["resize", "-q", &disk, &size])?;
        std::fs::remove_file(raw)?;
    }
    Ok(dir)
}

async fn wait_dirtying(console: &Path) -> Result<()> {
    let console = console.to_path_buf();
    tokio::task::spawn_blocking(move || {
        wait_for(
            "the guest to dirty memory",
            Duration::from_secs(300),
            || {
                let text = std::fs::read_to_string(&console).unwrap_or_default();
                match text.contains("DIRTYING") && !ticks(&console).is_empty() {
                    true => Ok(()),
                    false => bail!("not yet"),
                }
            },
        )
    })
    .await?
}

/// The same QMP sequence as ferry's, QEMU to QEMU over unix sockets.
async fn direct(
    root: &Path,
    guest: &Path,
    (memory, disk, dirty): (u64, u64, u64),
    settings: &LiveSettings,
) -> Result<Run> {
    let m = machine(memory, disk << 20, dirty);
    let (src, dst) = (
        vm_dir(&root.join("src"), guest, disk, false)?,
        vm_dir(&root.join("dst"), guest, disk, true)?,
    );
    let moved = direct_move(&m, (&src, &dst), (root, disk), settings).await;
    // Neither QEMU outlives the run, however it ended.
    for dir in [&src, &dst] {
        machine::quit(dir, None).await;
    }
    moved
}

async fn direct_move(
    m: &Machine,
    (src, dst): (&VmDir, &VmDir),
    (root, disk): (&Path, u64),
    settings: &LiveSettings,
) -> Result<Run> {
    let log = |d: &VmDir| d.qemu_log();
    machine::spawn(&m.config(src, false), &log(src), TIMEOUT).await?;
    let source = Qmp::connect(&src.qmp(), TIMEOUT).await?;
    wait_dirtying(&src.console()).await?;
    machine::spawn(&m.config(dst, true), &log(dst), TIMEOUT).await?;
    let target = Qmp::connect(&dst.qmp(), TIMEOUT).await?;
    let sockets = (
        dst.migration().join("disk.sock"),
        dst.migration().join("memory.sock"),
    );
    ferry_agent::vm::live::prepare_incoming(&target, &sockets, settings).await?;
    let started = Instant::now();
    let end = ferry_agent::vm::live::send(
        &source,
        (&dst.migration(), root),
        settings,
        &|| true,
        TIMEOUT,
    )
    .await
    .context("direct migration")?;
    ferry_agent::vm::live::incoming_done(&target, TIMEOUT).await?;
    if settings.postcopy {
        // The target runs and fetches the rest, as ferry's does.
        target.execute("cont", None).await?;
        ferry_agent::vm::live::sent(&source, TIMEOUT).await?;
    }
    let total_ms = started.elapsed().as_millis() as u64;
    let info = source.execute("query-migrate", None).await?;
    let ram = info["ram"]["transferred"].as_u64().unwrap_or(0);
    let _ = source.execute("quit", None).await;
    let _ = target.execute("quit", None).await;
    Ok(Run {
        path: "QEMU to QEMU, unix sockets",
        note: end.note.unwrap_or_default(),
        total_ms,
        paused_ms: end.paused_ms,
        bytes: ram + (disk << 20) * 3 / 4,
    })
}

/// Two agents; the VM launched on n1 and moved to n2.
fn through_ferry(
    root: &Path,
    guest: &Path,
    (memory, disk, dirty): (u64, u64, u64),
    options: &[String],
) -> Result<Run> {
    let mut cluster = Cluster::new();
    cluster.bootstrap("n1", 3)?;
    cluster.join("n2", 0)?;
    cluster.wait_converged(&["n1", "n2"], Duration::from_secs(30))?;
    let image = vm_dir(&root.join("image"), guest, disk, false)?;
    let p = |p: &Path| p.to_string_lossy().into_owned();
    let (disk_path, kernel, initrd) = (
        p(&image.disk()),
        p(&guest.join("vmlinuz")),
        p(&guest.join("initrd.gz")),
    );
    let (memory, append) = (format!("{memory}M"), append(dirty));
    let launch = [
        "launch", "v1", "--vm", "--disk", &disk_path, "--kernel", &kernel, "--initrd", &initrd,
        "--append", &append, "--memory", &memory, "--target", "n1",
    ];
    cluster.ferry_ok(0, &launch)?;
    let console = cluster.agents[0].data_dir.join("instances/v1/console.log");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(wait_dirtying(&console))?;
    let mut args = vec!["move", "v1", "--target", "n2"];
    args.extend(options.iter().map(String::as_str));
    cluster.ferry_ok(0, &args)?;
    let job = cluster.ferry_json(0, &["job", "show", "1"])?;
    let figure = |k: &str| job[k].as_u64().unwrap_or(0);
    Ok(Run {
        path: "ferry move (QUIC relay)",
        note: job["notes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str())
            .find(|n| n.contains("QEMU copied"))
            .unwrap_or_default()
            .to_string(),
        total_ms: figure("total_ms"),
        paused_ms: figure("downtime_ms"),
        bytes: figure("bytes"),
    })
}

fn main() -> Result<()> {
    let all: Vec<String> = std::env::args().skip(1).collect();
    let sizes_end = all
        .iter()
        .position(|a| a.starts_with("--"))
        .unwrap_or(all.len());
    let args: Vec<u64> = all[..sizes_end]
        .iter()
        .map(|a| a.parse().with_context(|| format!("{a}: not a size in MiB")))
        .collect::<Result<_>>()?;
    let options = &all[sizes_end..];
    let settings = live_settings(options)?;
    let (memory, disk, dirty) = (
        args.first().copied().unwrap_or(512),
        args.get(1).copied().unwrap_or(256),
        args.get(2).copied().unwrap_or(64),
    );
    let root = tempfile::tempdir()?;
    let guest = root.path().join("guest");
    test_guest(&guest)?;
    let sizes = (memory, disk, dirty);
    let runtime = tokio::runtime::Runtime::new()?;
    let direct = runtime.block_on(direct(
        &root.path().join("direct"),
        &guest,
        sizes,
        &settings,
    ))?;
    let ferry = through_ferry(&root.path().join("ferry"), &guest, sizes, options)?;
    println!("guest: {memory} MiB RAM ({dirty} MiB rewritten continuously), {disk} MiB disk (3/4 full), TCG");
    println!(
        "{:<28} {:>9} {:>12} {:>9} {:>8}",
        "PATH", "TOTAL ms", "DOWNTIME ms", "MiB", "MiB/s"
    );
    for run in [&direct, &ferry] {
        let mib = run.bytes as f64 / f64::from(1 << 20);
        let rate = mib / (run.total_ms.max(1) as f64 / 1000.0);
        println!(
            "{:<28} {:>9} {:>12} {:>9.0} {:>8.1}",
            run.path, run.total_ms, run.paused_ms, mib, rate
        );
    }
    let ratio = (ferry.bytes as f64 / ferry.total_ms.max(1) as f64)
        / (direct.bytes as f64 / direct.total_ms.max(1) as f64);
    println!("ferry's throughput: {ratio:.2}x direct, whole move against the copy alone (direct downtime is QEMU's own; ferry's is freeze to thaw)");
    for run in [&direct, &ferry] {
        println!("{}: {}", run.path, run.note);
    }
    if let (Some(d), Some(f)) = (copy_rate(&direct.note), copy_rate(&ferry.note)) {
        println!(
            "the copy alone (disk mirror and memory, by QEMU): direct {d:.1} MiB/s, ferry {f:.1} MiB/s, {:.2}x",
            f / d
        );
    }
    Ok(())
}

/// The direct path's settings for ferry's move options.
fn live_settings(options: &[String]) -> Result<LiveSettings> {
    let mut settings = LiveSettings::default();
    let mut words = options.iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "--postcopy" => settings.postcopy = true,
            "--multifd" => {
                let n = words.next().context("--multifd needs a number")?;
                settings.multifd_channels = n.parse().context("--multifd N")?;
            }
            other => bail!("{other}: the options are --multifd N and --postcopy"),
        }
    }
    Ok(settings)
}

/// MiB/s of the copy in a note "QEMU copied D MiB of disk and R MiB of
/// memory in T ms ...".
fn copy_rate(note: &str) -> Option<f64> {
    let words: Vec<&str> = note.split_whitespace().collect();
    let number = |i: usize| words.get(i)?.parse::<f64>().ok();
    let (disk, memory, ms) = (number(2)?, number(7)?, number(12)?);
    Some((disk + memory) / (ms.max(1.0) / 1000.0))
}
