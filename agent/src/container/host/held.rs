//! The target's held restore: CRIU restores every task stopped (a CRIU
//! config with `leave-stopped`), and the copy is released (SIGCONT) only
//! once `Restored` commits.

use ferry_raft::InstanceSpec;

use super::super::runc::Restore;
use super::{file_error, Host};
use crate::api::names::InstanceName;
use crate::driver::{Driver, DriverError};

impl Host {
    /// CRIU's work dir for a held restore. A lazy one's is not in the
    /// staging area, which goes at the thaw: its lazy-pages daemon works
    /// there until it has every page.
    pub(super) fn restore_work(&self, name: &InstanceName, lazy: bool) -> std::path::PathBuf {
        match lazy {
            true => self.dir(name).root().join("lazy-work"),
            false => self.migration_dir(name).join("restore-work"),
        }
    }

    pub(super) async fn held_restore(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
        lazy: bool,
    ) -> Result<(), DriverError> {
        let how = Restore {
            tcp_established: self.net.keeps_connections(name),
            lazy_pages: lazy,
        };
        let dir = self.dir(name);
        if crate::hooks::criu_fails(&self.data_dir, "restore") {
            return Err(DriverError::Runtime(
                "CRIU restore failed (test hook)".into(),
            ));
        }
        self.write_config(name, spec, true).await?;
        // Marked before the restore: a copy that exists here is held until
        // the marker goes after the thaw.
        let marker = dir.held_marker();
        tokio::fs::write(&marker, b"")
            .await
            .map_err(|e| file_error("cannot write", &marker, e))?;
        self.forget_exited(name).await?;
        self.mount_layers(name).await?;
        let work = self.restore_work(name, how.lazy_pages);
        let _ = tokio::fs::create_dir_all(&work).await;
        // Its address is not announced here until it is released: a
        // packet its sockets acknowledged now would be lost to a rollback.
        self.net.attach(name, false).await?;
        let (bundle, images) = (dir.bundle(), self.images(name));
        Ok(self
            .runc
            .restore(
                name.as_str(),
                (&bundle, &images, &work),
                how,
                &dir.runc_log(),
            )
            .await?)
    }
}
