//! The fault matrix of stateful moves, run for real: for a moment of a
//! move (a phase the test build holds the job at, or the rootfs transfer
//! in flight) and a fault (kill -9 of a participant or the leader, a
//! partition, the target's disk filling, CRIU failing), one three-agent
//! cluster moves the counter from n2 to n3 while a sampler counts running
//! copies. A cell passes when no two copies ever ran, the job ended, one
//! copy runs on the owner the outcome names with its memory kept, and no
//! copy or staging area is left elsewhere once the faults are healed.
//! Needs the test build (`FERRY_BIN`, cargo feature `test-hooks`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::partition::Partition;
use crate::{busybox_rootfs, pseudo_random, run_tool, wait_for, Cluster};

const CONVERGE: Duration = Duration::from_secs(30);

/// A moment of a stateful move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// Before the target starts pulling.
    Preparing,
    /// The rootfs in flight.
    Transfer,
    /// The source frozen and dumped, the target holding everything.
    Frozen,
    /// The target owns it, before its restore.
    Switched,
    /// Restored held stopped on the target, the source paused.
    Restored,
    /// The target thawed it (Done), the source's copy not yet deleted.
    Thaw,
}

impl When {
    pub const ALL: [When; 6] = [
        When::Preparing,
        When::Transfer,
        When::Frozen,
        When::Switched,
        When::Restored,
        When::Thaw,
    ];

    pub fn name(self) -> &'static str {
        match self {
            When::Preparing => "Preparing",
            When::Transfer => "transfer",
            When::Frozen => "Frozen",
            When::Switched => "Switched",
            When::Restored => "Restored",
            When::Thaw => "thaw",
        }
    }

    /// The phase the agents hold the job at (the transfer is caught in
    /// flight instead).
    fn held_phase(self) -> Option<&'static str> {
        match self {
            When::Preparing => Some("Preparing"),
            When::Transfer => None,
            When::Frozen => Some("Frozen"),
            When::Switched => Some("Switched"),
            When::Restored => Some("Restored"),
            When::Thaw => Some("Done"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    KillSource,
    KillTarget,
    KillLeader,
    PartitionSource,
    PartitionTarget,
    TargetDiskFull,
    CriuDump,
    CriuRestore,
}

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::KillSource,
        Fault::KillTarget,
        Fault::KillLeader,
        Fault::PartitionSource,
        Fault::PartitionTarget,
        Fault::TargetDiskFull,
        Fault::CriuDump,
        Fault::CriuRestore,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillSource => "kill -9 source",
            Fault::KillTarget => "kill -9 target",
            Fault::KillLeader => "kill -9 leader",
            Fault::PartitionSource => "partition source",
            Fault::PartitionTarget => "partition target",
            Fault::TargetDiskFull => "target disk full",
            Fault::CriuDump => "CRIU fails dump",
            Fault::CriuRestore => "CRIU fails restore",
        }
    }

    /// Whether the fault can still matter at `when` (CRIU cannot fail a
    /// dump already taken, or a restore already done).
    pub fn applies(self, when: When) -> bool {
        match self {
            Fault::CriuDump => matches!(when, When::Preparing | When::Transfer),
            Fault::CriuRestore => !matches!(when, When::Restored | When::Thaw),
            _ => true,
        }
    }
}

/// How a cell ended.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Done or RolledBack.
    pub phase: String,
    pub owner: String,
    /// The most copies that ran at one sampled moment.
    pub most_copies: usize,
    pub took: Duration,
}

/// tmpfs mounts of a cell, unmounted after its cluster is gone.
#[derive(Default)]
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = run_tool("umount", &["-l", &dir.to_string_lossy()]);
        }
    }
}

/// The fault in effect, undone by [`Injected::heal`].
enum Injected {
    Killed(usize),
    Cut(Partition),
    Filler(PathBuf),
    Marker(PathBuf),
}

/// Run one cell of the matrix.
pub fn run_cell(when: When, fault: Fault) -> Result<Outcome> {
    let started = Instant::now();
    let mut mounts = Mounts::default();
    let mut cluster = Cluster::new();
    cluster.agent_flags = vec![
        "--job-phase-timeout".into(),
        "20s".into(),
        "--disk-reserve".into(),
        "16M".into(),
    ];
    if let Some(phase) = when.held_phase() {
        cluster.agent_env = vec![("FERRY_TEST_HOLD_AT".into(), phase.into())];
    }
    if fault == Fault::TargetDiskFull {
        let dir = cluster.root().join("n3");
        std::fs::create_dir_all(&dir)?;
        run_tool(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "size=256m",
                "tmpfs",
                &dir.to_string_lossy(),
            ],
        )?;
        mounts.0.push(dir);
    }
    three_with_counter(&mut cluster, when == When::Transfer)?;
    let holds = hold_files(&cluster, when)?;
    let sampler = cluster.sampler("c1");
    let before = cluster.counter(0, "c1")?;
    cluster.ferry_ok(0, &["move", "c1", "--target", "n3", "--detach"])?;
    reach(&cluster, when)?;
    let injected = inject(&mut cluster, fault)?;
    release(&holds);
    // The move goes on under the fault for a while, or ends.
    let _ = wait_for("the job under the fault", Duration::from_secs(10), || {
        job_end(&cluster)
    });
    heal(&mut cluster, injected)?;
    let job = wait_for("the job to end", Duration::from_secs(120), || {
        job_end(&cluster)
    })?;
    let outcome = check_end(&cluster, &job, before)?;
    let most_copies = sampler.finish();
    if most_copies > 1 {
        bail!("{most_copies} copies ran at one moment");
    }
    drop(cluster);
    drop(mounts);
    Ok(Outcome {
        most_copies,
        took: started.elapsed(),
        ..outcome
    })
}

/// n1 (the leader), n2 and n3, facts in, the counter on n2 (with 48 MiB of
/// ballast when the transfer must last).
fn three_with_counter(cluster: &mut Cluster, ballast: bool) -> Result<()> {
    cluster.start_three()?;
    let rootfs = busybox_rootfs(cluster.root())?;
    if ballast {
        std::fs::write(rootfs.join("ballast"), pseudo_random(48 << 20))?;
    }
    cluster.launch_counter_holding("c1", "n2", &rootfs, 16)
}

/// The `hold` file in every agent's data dir, when the moment is a phase.
fn hold_files(cluster: &Cluster, when: When) -> Result<Vec<PathBuf>> {
    if when.held_phase().is_none() {
        return Ok(Vec::new());
    }
    let files: Vec<PathBuf> = cluster
        .agents
        .iter()
        .map(|a| a.data_dir.join("hold"))
        .collect();
    for file in &files {
        std::fs::write(file, b"")?;
    }
    Ok(files)
}

fn release(holds: &[PathBuf]) {
    for file in holds {
        let _ = std::fs::remove_file(file);
    }
}

/// Job 1 as any live member reports it.
fn job(cluster: &Cluster) -> Result<serde_json::Value> {
    let mut last = anyhow::anyhow!("no member answered");
    // A killed member would only time out.
    let live = (0..cluster.agents.len()).filter(|i| cluster.agents[*i].is_running());
    for i in live {
        match cluster.ferry_json(i, &["job", "show", "1"]) {
            Ok(job) => return Ok(job),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn job_end(cluster: &Cluster) -> Result<serde_json::Value> {
    let job = job(cluster)?;
    if job["done"] == true {
        Ok(job)
    } else {
        bail!("phase {}", job["phase"])
    }
}

/// Wait until the move is at `when`.
fn reach(cluster: &Cluster, when: When) -> Result<()> {
    wait_for(&format!("the move at {}", when.name()), CONVERGE, || {
        let job = job(cluster)?;
        let phase = job["phase"].as_str().unwrap_or_default().to_string();
        let at = match when.held_phase() {
            Some(held) => phase == held,
            None => phase == "Preparing" && job["progress"]["bytes"].as_u64() > Some(0),
        };
        if at {
            Ok(())
        } else if job["done"] == true {
            bail!("the move ended ({phase}) before {}: {job}", when.name())
        } else {
            bail!("{phase}")
        }
    })
}

fn inject(cluster: &mut Cluster, fault: Fault) -> Result<Injected> {
    let (source, target) = (1, 2);
    Ok(match fault {
        Fault::KillSource => kill(cluster, source),
        Fault::KillTarget => kill(cluster, target),
        Fault::KillLeader => {
            let leader = leader(cluster)?;
            kill(cluster, leader)
        }
        Fault::PartitionSource => {
            Injected::Cut(Partition::isolate(cluster.agents[source].port()?)?)
        }
        Fault::PartitionTarget => {
            Injected::Cut(Partition::isolate(cluster.agents[target].port()?)?)
        }
        Fault::TargetDiskFull => {
            let filler = cluster.agents[target].data_dir.join("filler");
            let of = format!("of={}", filler.display());
            // Fails when the disk is full: that is the point.
            let _ = std::process::Command::new("dd")
                .args(["if=/dev/zero", &of, "bs=1M"])
                .output()?;
            Injected::Filler(filler)
        }
        Fault::CriuDump => marker(&cluster.agents[source].data_dir, "fail-dump")?,
        Fault::CriuRestore => marker(&cluster.agents[target].data_dir, "fail-restore")?,
    })
}

fn kill(cluster: &mut Cluster, index: usize) -> Injected {
    cluster.kill(index);
    Injected::Killed(index)
}

fn marker(dir: &Path, name: &str) -> Result<Injected> {
    let file = dir.join(name);
    std::fs::write(&file, b"")?;
    Ok(Injected::Marker(file))
}

fn leader(cluster: &Cluster) -> Result<usize> {
    let list = cluster.ferry_json(0, &["cluster", "list"])?;
    let name = list
        .as_array()
        .and_then(|l| l.iter().find(|m| m["leader"] == true))
        .and_then(|m| m["name"].as_str())
        .unwrap_or("n1")
        .to_string();
    cluster
        .index_of(&name)
        .ok_or_else(|| anyhow::anyhow!("no agent named {name}"))
}

/// Undo the fault: restart a killed agent, heal the partition, free the
/// disk (restarting an agent that stopped on its failed store), drop the
/// CRIU marker.
fn heal(cluster: &mut Cluster, injected: Injected) -> Result<()> {
    match injected {
        Injected::Killed(index) => cluster.restart(index)?,
        Injected::Cut(partition) => drop(partition),
        Injected::Filler(file) => {
            std::fs::remove_file(&file)?;
            let index = cluster.agents.len() - 1;
            if cluster.wait_exit(index, Duration::from_millis(200)).is_ok() {
                cluster.restart(index)?;
            }
        }
        Injected::Marker(file) => std::fs::remove_file(&file)?,
    }
    Ok(())
}

/// One copy runs on the owner the outcome names and counts on from where
/// it was; nothing is left on the other side or in staging areas.
fn check_end(cluster: &Cluster, job: &serde_json::Value, before: u64) -> Result<Outcome> {
    let phase = job["phase"].as_str().unwrap_or_default().to_string();
    let (owner, other) = match phase.as_str() {
        "Done" => (2, 1),
        "RolledBack" => (1, 2),
        _ => bail!("the job ended in {phase}: {job}"),
    };
    let owner_name = cluster.agents[owner].name.clone();
    cluster.wait_running(Some(&owner_name))?;
    let now = cluster.counter(0, "c1")?;
    if now < before {
        bail!("the counter went back from {before} to {now}: its memory was lost");
    }
    let leftovers = |i: usize, path: &str| cluster.agents[i].data_dir.join(path);
    wait_for("no leftovers once healed", Duration::from_secs(25), || {
        let staging = |i: usize| cluster.agents[i].staging("c1");
        for path in [
            Some(leftovers(other, "instances/c1")),
            staging(owner),
            staging(other),
        ] {
            if let Some(path) = path.filter(|p| p.exists()) {
                bail!("{} is still there", path.display());
            }
        }
        if cluster.running_copies("c1") != 1 {
            bail!("{} running copies", cluster.running_copies("c1"));
        }
        Ok(())
    })?;
    Ok(Outcome {
        phase,
        owner: owner_name,
        most_copies: 0,
        took: Duration::ZERO,
    })
}
