//! The tests' workloads (a busybox rootfs, the counter, a memory-dirtying
//! loop) and the cluster's view of them: running copies across every
//! agent's runc, sampled in the background, counters read through `ferry
//! exec`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{copy_detail, keep_logs, wait_for, AgentProc, Cluster};

/// A busybox root filesystem (Debian's busybox-static) in `dir`.
pub fn busybox_rootfs(dir: &Path) -> Result<PathBuf> {
    let root = dir.join("busybox-rootfs");
    for sub in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("copy /bin/busybox (install busybox-static)")?;
    let list = Command::new("/bin/busybox").arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
        }
    }
    Ok(root)
}

/// The counter workload of the tests: a shell variable, written to
/// /counter every 100 ms; it only survives a restart through memory.
pub const COUNTER: &[&str] = &[
    "sh",
    "-c",
    "i=0; while true; do i=$((i+1)); echo $i > /counter; sleep 0.1; done",
];

/// A benchmark workload (a shell command): fill `mib` MiB with 1 KiB
/// strings, write `/ready`, then rewrite them forever.
pub fn dirtying_workload(mib: usize) -> String {
    let n = mib * 1024;
    format!(
        "exec awk 'BEGIN {{ n = {n}; for (i = 0; i < n; i++) a[i] = sprintf(\"%1024d\", i); print \"ready\" > \"/ready\"; close(\"/ready\"); while (1) for (i = 0; i < n; i++) a[i] = sprintf(\"%1024d\", i + 1) }}'"
    )
}

/// `len` bytes that neither compress nor dedupe (rootfs ballast).
pub fn pseudo_random(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    data
}

/// Counts running copies of an instance in the background.
pub struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<usize>,
}

impl Sampler {
    /// The most copies seen running at one sampled moment.
    pub fn finish(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap_or(usize::MAX)
    }
}

impl Cluster {
    /// Running copies of `instance` across every agent's runc.
    pub fn running_copies(&self, instance: &str) -> usize {
        self.agents
            .iter()
            .flat_map(|a| a.containers())
            .filter(|(id, status)| id == instance && status == "running")
            .count()
    }

    /// Start sampling, every 20 ms until stopped, how many copies of
    /// `instance` run across all agents.
    pub fn sampler(&self, instance: &str) -> Sampler {
        self.sampler_of(&[instance])
    }

    /// The same for several instances: the most copies of any one of them.
    pub fn sampler_of(&self, instances: &[&str]) -> Sampler {
        let dirs: Vec<PathBuf> = self.agents.iter().map(|a| a.data_dir.clone()).collect();
        let instances: Vec<String> = instances.iter().map(|i| i.to_string()).collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut most = 0;
            // Bounded: at most 10 minutes of sampling.
            for _ in 0..30_000 {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let running: Vec<(String, PathBuf)> = dirs
                    .iter()
                    .map(|d| AgentProc {
                        name: String::new(),
                        data_dir: d.clone(),
                        child: None,
                    })
                    .flat_map(|a| {
                        let dir = a.data_dir.clone();
                        a.containers().into_iter().map(move |c| (c, dir.clone()))
                    })
                    .filter(|((_, status), _)| status == "running")
                    .map(|((id, _), dir)| (id, dir))
                    .collect();
                for instance in &instances {
                    let on: Vec<&PathBuf> = running
                        .iter()
                        .filter(|(id, _)| id == instance)
                        .map(|(_, dir)| dir)
                        .collect();
                    if on.len() > most.max(1) {
                        // Said at once, so the agents' logs can be read
                        // around this moment.
                        let detail: Vec<String> =
                            on.iter().map(|d| copy_detail(d, instance)).collect();
                        eprintln!(
                            "sampler: {instance} runs {} times at once: {}",
                            on.len(),
                            detail.join(" | ")
                        );
                        keep_logs(&dirs);
                    }
                    most = most.max(on.len());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            most
        });
        Sampler { stop, handle }
    }

    /// Launch the counter workload as `name` on member `target` (through
    /// member 0) from the busybox rootfs at `rootfs`, and wait until it
    /// counts.
    pub fn launch_counter(&self, name: &str, target: &str, rootfs: &Path) -> Result<()> {
        self.launch_counter_holding(name, target, rootfs, 0)
    }

    /// The counter workload, holding `memory_mib` MiB in a shell variable
    /// first, so that its CRIU dump (and the time it is frozen for a
    /// move) is that much larger.
    pub fn launch_counter_holding(
        &self,
        name: &str,
        target: &str,
        rootfs: &Path,
        memory_mib: usize,
    ) -> Result<()> {
        let rootfs = rootfs.to_string_lossy().into_owned();
        let mut args = vec![
            "launch", name, "--rootfs", &rootfs, "--target", target, "--",
        ];
        let holding;
        if memory_mib == 0 {
            args.extend(COUNTER);
        } else {
            holding = format!(
                "b=$(head -c {} /dev/zero | tr '\\0' x); {}",
                memory_mib << 20,
                COUNTER[2]
            );
            args.extend(["sh", "-c", &holding]);
        }
        self.ferry_ok(0, &args)?;
        wait_for(
            "the counter to count",
            Duration::from_secs(30),
            || match self.counter(0, name)? {
                n if n >= 3 => Ok(()),
                n => bail!("counter at {n}"),
            },
        )?;
        Ok(())
    }

    /// Wait until [`dirtying_workload`] `name` on agent `index` filled its
    /// memory (its `/ready` exists).
    pub fn wait_workload_ready(&self, index: usize, name: &str) -> Result<()> {
        let ready = self.agents[index]
            .data_dir
            .join(format!("instances/{name}/bundle/rootfs/ready"));
        wait_for(
            "the workload to fill its memory",
            Duration::from_secs(300),
            || match ready.exists() {
                true => Ok(()),
                false => bail!("filling"),
            },
        )
    }

    /// Wait until the counter of `name` (read through member 0) reaches at
    /// least `at_least`; returns the value seen. Proves the workload runs.
    pub fn wait_counter(&self, name: &str, at_least: u64) -> Result<u64> {
        wait_for(
            &format!("{name}'s counter to reach {at_least}"),
            Duration::from_secs(30),
            || match self.counter(0, name)? {
                n if n >= at_least => Ok(n),
                n => bail!("counter at {n}"),
            },
        )
    }

    /// `ferry exec NAME -- cat /counter` through member `index`. The
    /// workload truncates and rewrites the file every 100 ms, so a read may
    /// catch it empty; that read is repeated (for up to 15 s: CI once saw
    /// it empty for 5 s right after the owner's agent restarted; the cause
    /// was not found).
    pub fn counter(&self, index: usize, instance: &str) -> Result<u64> {
        wait_for("a complete /counter", Duration::from_secs(15), || {
            let text = self.ferry_ok(index, &["exec", instance, "--", "cat", "/counter"])?;
            Ok(text.trim().parse::<u64>()?)
        })
    }

    /// Wait until the only instance is reported running (on `owner`, when
    /// given), as member 0 sees it.
    pub fn wait_running(&self, owner: Option<&str>) -> Result<()> {
        wait_for(
            "the instance running on its owner",
            Duration::from_secs(30),
            || {
                let list = self.ferry_json(0, &["list"])?;
                let on_owner = owner.is_none_or(|o| list[0]["node"] == o);
                if on_owner && list[0]["state"] == "running" {
                    Ok(())
                } else {
                    bail!("{list}")
                }
            },
        )
    }
}
