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
    // A process group of its own: `timeout` does not pass SIGKILL on to
    // its shell, so the drop kills the group (a loop once outlived its
    // bench that way and spun for 20 minutes).
    let spin = || -> Result<Child> {
        use std::os::unix::process::CommandExt;
        Ok(Command::new("taskset")
            .args(["-c", "1", "timeout", &secs])
            .args(["sh", "-c", "while :; do :; done"])
            .process_group(0)
            .spawn()?)
    };
    let loops = vec![spin()?, spin()?];
    Ok(Saturated { pid, loops })
}

impl Drop for Saturated {
    fn drop(&mut self) {
        for l in &mut self.loops {
            let group = format!("-{}", l.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = l.wait();
        }
        let cpus = format!(
            "0-{}",
            std::thread::available_parallelism().map_or(1, |n| n.get() - 1)
        );
        let _ = taskset(&["-a", "-p", "-c", &cpus, &self.pid.to_string()]);
    }
}
