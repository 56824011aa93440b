//! VM test helpers: the prerequisites (QEMU and the guest kernel
//! install-deps.sh downloads), the counting test guest of
//! scripts/make-test-guest.sh, its serial counter, and the guest's disk
//! read from the host.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Whether QEMU and the guest kernel are here (same CI rule as the
/// container tests: missing fails under `CI=true`, skips elsewhere).
pub fn require_qemu() -> bool {
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let guest = std::fs::read_dir("/var/cache/ferry-build/guest").is_ok_and(|mut d| {
        d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".deb")))
    });
    let missing = (!(qemu && guest))
        .then(|| "QEMU and the guest kernel (run scripts/install-deps.sh as root)".to_string());
    crate::require("VM tests", missing)
}

/// The test guest in `dir`: (kernel, initrd, a 32 MiB raw disk).
pub fn test_guest(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-test-guest.sh");
    let out = Command::new("bash").arg(script).arg(dir).output()?;
    if !out.status.success() {
        bail!(
            "make-test-guest.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let disk = dir.join("disk.raw");
    crate::run_tool(
        "qemu-img",
        &["create", "-q", "-f", "raw", &disk.to_string_lossy(), "32M"],
    )?;
    Ok((dir.join("vmlinuz"), dir.join("initrd.gz"), disk))
}

/// The guest's serial counter in a console log, in order ("tick N").
pub fn ticks(console: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .collect()
}

/// How many times the guest booted by its console ("BOOTED" lines).
pub fn boots(console: &Path) -> usize {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    text.lines().filter(|l| l.trim() == "BOOTED").count()
}

/// A file of the guest's ext2 disk (qcow2), read from the host while the
/// VM is stopped.
pub fn guest_file(disk: &Path, file: &str, scratch: &Path) -> Result<String> {
    let raw = scratch.join("guest-disk.raw");
    crate::run_tool(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "raw",
            &disk.to_string_lossy(),
            &raw.to_string_lossy(),
        ],
    )?;
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(&raw)
        .output()
        .context("debugfs")?;
    let _ = std::fs::remove_file(&raw);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// SIGKILL every QEMU whose pid file is under `data_dir` (a test's VMs
/// must not outlive it).
pub fn kill_vms(data_dir: &Path) {
    let Ok(instances) = std::fs::read_dir(data_dir.join("instances")) else {
        return;
    };
    for dir in instances.flatten() {
        let pid = std::fs::read_to_string(dir.path().join("qemu.pid")).unwrap_or_default();
        let Ok(pid) = pid.trim().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let ours = String::from_utf8_lossy(&cmdline).contains(&*dir.path().to_string_lossy());
        if ours {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// The test guest launched as VM `v1` on `target`, counting on its console.
pub fn launch_vm(cluster: &crate::Cluster, target: &str) -> Result<()> {
    launch_vm_with(cluster, target, "", &[])
}

/// `launch_vm` with more on the guest's command line (`ferry.echo`: an
/// echo server on port 7000 once it is on the cluster network) and more
/// launch options.
pub fn launch_vm_with(
    cluster: &crate::Cluster,
    target: &str,
    append: &str,
    options: &[&str],
) -> Result<()> {
    let guest = cluster.root().join("guest");
    let (kernel, initrd, disk) = test_guest(&guest)?;
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let (kernel, initrd, disk) = (path(&kernel), path(&initrd), path(&disk));
    let append = format!("console=ttyS0 quiet panic=-1 {append}");
    let mut launch = vec![
        "launch", "v1", "--vm", "--disk", &disk, "--kernel", &kernel, "--initrd", &initrd,
        "--append", &append, "--memory", "256M", "--target", target,
    ];
    launch.extend(options);
    cluster.ferry_ok(0, &launch)?;
    Ok(())
}
