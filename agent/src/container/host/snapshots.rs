//! Snapshots of a container: its rootfs copied, and with `stateful` its
//! memory through a CRIU dump taken while it is paused.

use std::path::PathBuf;
use std::time::Duration;

use super::super::bundle;
use super::super::runc::{Dump, RuncError, Status as RuncStatus};
use super::{create_dirs, Host};
use crate::api::names::{InstanceName, SnapshotName};
use crate::driver::DriverError;

impl Host {
    /// Taken while the instance is paused; it runs on afterwards.
    pub(super) async fn take_snapshot(
        &self,
        name: &InstanceName,
        snap: &SnapshotName,
        stateful: bool,
    ) -> Result<(), DriverError> {
        let dir = self.dir(name);
        let target = dir.snapshot(snap);
        let log = dir.runc_log();
        let running = matches!(
            self.state(name).await?.map(|s| s.status),
            Some(RuncStatus::Running)
        );
        if running {
            self.runc.pause(name.as_str(), &log).await?;
        }
        // Its sockets hear nothing while CRIU copies them.
        let cut = running && stateful;
        if cut {
            if let Err(e) = self.net.set_link(name, false).await {
                self.runc.resume(name.as_str(), &log).await?;
                return Err(e);
            }
        }
        let result = async {
            if stateful {
                let images = target.join("checkpoint");
                create_dirs(&[images.clone(), dir.criu_work()]).await?;
                let keep = Dump::leaving_running(self.net.keeps_connections(name));
                self.runc
                    .checkpoint(name.as_str(), &images, &dir.criu_work(), keep, &log)
                    .await?;
            }
            // A layered instance's own changes: the image is kept anyway.
            copy_dir(self.own_tree(name), target.join("rootfs"), self.timeout).await
        }
        .await;
        if cut {
            self.net.announce(name).await;
        }
        if running {
            self.runc.resume(name.as_str(), &log).await?;
        }
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(&target).await;
        }
        Ok(result?)
    }

    /// The current processes end first.
    pub(super) async fn back_to_snapshot(
        &self,
        name: &InstanceName,
        snap: &SnapshotName,
        stateful: bool,
    ) -> Result<(), DriverError> {
        let dir = self.dir(name);
        let source = dir.snapshot(snap);
        self.stop_container(name, true).await?;
        self.rootfs_from_snapshot(name, snap).await?;
        if stateful {
            copy_dir(source.join("checkpoint"), dir.checkpoint(), self.timeout).await?;
            self.restore_checkpoint(name).await
        } else {
            let _ = tokio::fs::remove_dir_all(dir.checkpoint()).await;
            self.start_container(name).await
        }
    }

    pub(super) async fn rootfs_from_snapshot(
        &self,
        name: &InstanceName,
        snap: &SnapshotName,
    ) -> Result<(), DriverError> {
        let dir = self.dir(name);
        // overlayfs's upper dir is not changed under a mount.
        self.unmount_layers(name).await?;
        let own = self.own_tree(name);
        Ok(copy_dir(dir.snapshot(snap).join("rootfs"), own, self.timeout).await?)
    }
}

async fn copy_dir(source: PathBuf, dest: PathBuf, timeout: Duration) -> Result<(), RuncError> {
    let at = dest.clone();
    tokio::task::spawn_blocking(move || bundle::copy_tree(&source, &dest, timeout))
        .await
        .map_err(|e| RuncError::File {
            path: at.clone(),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(|e| RuncError::File {
            path: at,
            source: std::io::Error::other(e.to_string()),
        })
}
