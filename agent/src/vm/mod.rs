//! VM instances (layer 0): QEMU's command line (`qemu`), a QMP client
//! (`qmp`), one VM's QEMU process and its QMP sequences (`machine`), and
//! the driver (`host::VmHost`). What was measured of QEMU on this machine
//! kind is in docs/vm-migration-recipe.md.

mod guest_agent;
pub mod host;
pub mod live;
pub mod machine;
pub mod net;
pub mod probe;
pub mod qemu;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::driver::DriverError;

/// What `ferry launch --vm` gives, as paths on the agent's host.
#[derive(Clone, Debug)]
pub struct VmFiles {
    /// Any image format `qemu-img` reads; kept as qcow2.
    pub disk: PathBuf,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
}

/// Put a new VM's files into `dest` as its driver imports them:
/// `disk.qcow2` (converted by `qemu-img`), `boot/vmlinuz`, `boot/initrd`;
/// returns the disk's virtual size.
pub async fn stage(files: &VmFiles, dest: &Path, timeout: Duration) -> Result<u64, DriverError> {
    tokio::fs::create_dir_all(dest)
        .await
        .map_err(|e| machine::file_error("cannot create", dest, e))?;
    let convert = tokio::process::Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&files.disk)
        .arg(dest.join("disk.qcow2"))
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(timeout, convert).await {
        Err(_) => {
            return Err(machine::runtime(format!(
                "qemu-img did not convert the disk within {timeout:?}"
            )))
        }
        Ok(Err(e)) => {
            return Err(machine::runtime(format!(
                "cannot run qemu-img (install QEMU with scripts/install-deps.sh): {e}"
            )))
        }
        Ok(Ok(out)) => out,
    };
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(DriverError::BadInput(format!(
            "cannot use {} as a disk: {}",
            files.disk.display(),
            why.trim()
        )));
    }
    // The layout of a VM's files (`VmDir::files`): an upload to another
    // member lands there as it is.
    let boot = dest.join("boot");
    tokio::fs::create_dir_all(&boot)
        .await
        .map_err(|e| machine::file_error("cannot create", &boot, e))?;
    for (from, name) in [(&files.kernel, "vmlinuz"), (&files.initrd, "initrd")] {
        if let Some(from) = from {
            tokio::fs::copy(from, boot.join(name)).await.map_err(|e| {
                DriverError::BadInput(format!("cannot read {}: {e}", from.display()))
            })?;
        }
    }
    virtual_size(&dest.join("disk.qcow2"), timeout).await
}

/// `qemu-img info`'s virtual size of the image at `path`.
pub async fn virtual_size(path: &Path, timeout: Duration) -> Result<u64, DriverError> {
    let info = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, info)
        .await
        .map_err(|_| machine::runtime("qemu-img info did not answer"))?
        .map_err(|e| machine::runtime(format!("cannot run qemu-img: {e}")))?;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    info["virtual-size"].as_u64().ok_or_else(|| {
        machine::runtime(format!("qemu-img info gave no size for {}", path.display()))
    })
}
