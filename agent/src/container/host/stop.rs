//! Ending a container: runc's record of an exited one forgotten, a
//! running one stopped.

use std::time::Duration;

use super::super::runc::{RuncError, Status as RuncStatus};
use super::Host;
use crate::api::names::InstanceName;

impl Host {
    /// Remove runc's record of an exited container so the id can run again.
    pub(super) async fn forget_exited(&self, name: &InstanceName) -> Result<(), RuncError> {
        if let Some(state) = self.state(name).await? {
            if state.status == RuncStatus::Stopped {
                self.runc
                    .delete(name.as_str(), true, &self.dir(name).runc_log())
                    .await?;
            }
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after a grace period (at once with `force`),
    /// then forget the container. The rootfs stays.
    pub(super) async fn stop_container(
        &self,
        name: &InstanceName,
        force: bool,
    ) -> Result<(), RuncError> {
        let log = self.dir(name).runc_log();
        let Some(state) = self.state(name).await? else {
            return Ok(());
        };
        // A forced stop does not let a paused copy run again first: not
        // even for the moment runc's delete thaws it.
        if state.status == RuncStatus::Paused {
            match force {
                true => self.runc.kill_frozen(name.as_str(), &log).await?,
                false => self.runc.resume(name.as_str(), &log).await?,
            }
        }
        if !force {
            let _ = self.runc.kill(name.as_str(), "TERM", &log).await;
            for _ in 0..50 {
                match self.state(name).await? {
                    Some(s) if s.status != RuncStatus::Stopped => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    _ => break,
                }
            }
        }
        self.runc.delete(name.as_str(), true, &log).await
    }
}
