//! Snapshots of a VM: a copy of its qcow2 disk taken while QEMU has the
//! guest paused (QMP `stop` flushes the disk first), and with `stateful`
//! its memory through QEMU's migration to a file, the guest running on
//! afterwards. They live in the instance's `snapshots/` dir and move with
//! it (`kept_files`). Copies, not qcow2 internal snapshots: a live move
//! mirrors only the disk's active layer, so internal ones would be lost.

use std::path::PathBuf;

use super::{machine, VmHost};
use crate::api::names::{InstanceName, SnapshotName};
use crate::driver::DriverError;
use crate::vm::machine::{runtime, VmDir};

/// Where one snapshot's disk and memory are.
fn files(dir: &VmDir, snap: &SnapshotName) -> (PathBuf, PathBuf, PathBuf) {
    let root = dir.snapshots().join(snap.as_str());
    (root.join("disk.qcow2"), root.join("memory"), root)
}

impl VmHost {
    /// Taken while the guest is paused; it runs on afterwards.
    pub(super) async fn take_snapshot(
        &self,
        name: &InstanceName,
        snap: &SnapshotName,
        stateful: bool,
    ) -> Result<(), DriverError> {
        let dir = self.dir(name);
        let (disk, memory, root) = files(&dir, snap);
        let _ = tokio::fs::remove_dir_all(&root).await;
        tokio::fs::create_dir_all(&root)
            .await
            .map_err(|e| machine::file_error("cannot create", &root, e))?;
        let taken = match machine::running_pid(&dir) {
            None if stateful => Err(runtime(format!(
                "'{name}' does not run; a stateful snapshot needs a running VM"
            ))),
            None => self.copy_in(&dir.disk(), &disk).await,
            Some(_) => {
                self.paused_copy(&dir, (&disk, stateful.then_some(&memory)))
                    .await
            }
        };
        if taken.is_err() {
            let _ = tokio::fs::remove_dir_all(&root).await;
        }
        taken
    }

    /// Pause the guest, copy its disk (and save its memory), let it run.
    async fn paused_copy(
        &self,
        dir: &VmDir,
        (disk, memory): (&PathBuf, Option<&PathBuf>),
    ) -> Result<(), DriverError> {
        let qmp = self.qmp(dir).await?;
        let was_running = qmp.status().await? == "running";
        qmp.execute("stop", None).await?;
        let copied = async {
            self.copy_in(&dir.disk(), disk).await?;
            if let Some(memory) = memory {
                machine::save_to(&qmp, memory, self.transfer_timeout).await?;
            }
            Ok::<(), DriverError>(())
        }
        .await;
        let resumed = match was_running {
            true => qmp.execute("cont", None).await.map(|_| ()),
            false => Ok(()),
        };
        copied?;
        Ok(resumed?)
    }

    /// Back to a snapshot: QEMU quits, the disk is put back, and the VM
    /// starts (from the snapshot's memory when it has one).
    pub(super) async fn back_to_snapshot(
        &self,
        name: &InstanceName,
        snap: &SnapshotName,
        stateful: bool,
    ) -> Result<(), DriverError> {
        self.shut_down(name, true).await?;
        self.disk_from_snapshot(name, snap).await?;
        let (_, memory, _) = files(&self.dir(name), snap);
        if !stateful {
            return self.launch(name, false).await.map(|_| ());
        }
        let qmp = self.launch_from(name, &memory).await?;
        self.resume(&self.dir(name), &qmp).await
    }

    /// Put a snapshot's disk back (QEMU does not run); a stateful stop's
    /// memory no longer fits that disk and is dropped.
    pub(super) async fn disk_from_snapshot(
        &self,
        name: &InstanceName,
        snap: &SnapshotName,
    ) -> Result<(), DriverError> {
        let dir = self.dir(name);
        let (disk, _, _) = files(&dir, snap);
        if !disk.exists() {
            return Err(runtime(format!(
                "the disk of snapshot '{snap}' is missing on this member ({})",
                disk.display()
            )));
        }
        self.copy_in(&disk, &dir.disk()).await?;
        let _ = tokio::fs::remove_file(dir.checkpoint()).await;
        Ok(())
    }
}
