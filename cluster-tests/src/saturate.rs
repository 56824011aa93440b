//! One agent's CPU saturated, for benchmarks: the agent pinned to CPU 1
//! with two busy loops there, each ending by itself after a given time.

use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// While this lives, the process `pid` shares CPU 1 with two busy loops.
/// Dropped, the loops are killed and the process may use every CPU again.
pub struct Saturated {
    pid: u32,
    loops: Vec<Child>,
}

fn taskset(args: &[&str]) -> Result<()> {
    let out = Command::new("taskset")
        .args(args)
        .output()
        .context("taskset (util-linux)")?;
    if !out.status.success() {
        bail!("taskset failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Saturate the CPU that process `pid` (every thread) runs on for at
/// most `within` (the loops stop by themselves then, even if this side
/// dies).
pub fn saturate(pid: u32, within: Duration) -> Result<Saturated> {
    taskset(&["-a", "-p", "-c", "1", &pid.to_string()])?;
    let secs = within.as_secs().max(1).to_string();
    let spin = || -> Result<Child> {
        Ok(Command::new("taskset")
            .args(["-c", "1", "timeout", &secs])
            .args(["sh", "-c", "while :; do :; done"])
            .spawn()?)
    };
    let loops = vec![spin()?, spin()?];
    Ok(Saturated { pid, loops })
}

impl Drop for Saturated {
    fn drop(&mut self) {
        for l in &mut self.loops {
            let _ = l.kill();
            let _ = l.wait();
        }
        let cpus = format!(
            "0-{}",
            std::thread::available_parallelism().map_or(1, |n| n.get() - 1)
        );
        let _ = taskset(&["-a", "-p", "-c", &cpus, &self.pid.to_string()]);
    }
}
