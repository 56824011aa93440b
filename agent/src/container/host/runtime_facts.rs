//! What this host's container runtime can do, for its facts and a move's
//! compatibility check.

use ferry_raft::Runtimes;

use super::Host;

impl Host {
    /// runc and CRIU, and whether this CRIU dumps internet sockets.
    pub(super) async fn probe_runtimes(&self) -> Runtimes {
        let timeout = crate::facts::RUNTIME_COMMAND_TIMEOUT;
        let data_dir = self.data_dir.clone();
        let lays_images = self.lays_images;
        tokio::task::spawn_blocking(move || {
            let mut runtimes = crate::facts::probe_runtimes(timeout);
            runtimes.criu_inet = match (&runtimes.criu, runtimes.criu_check) {
                (Some(version), true) => {
                    super::super::criu_probe::can_dump_inet(&data_dir, version, timeout)
                }
                _ => false,
            };
            runtimes.image_layers = lays_images;
            runtimes
        })
        .await
        .unwrap_or_default()
    }

    /// Why memory pre-copy cannot run here, if it cannot.
    pub(super) async fn dirty_tracking_missing(&self) -> Option<String> {
        let check = tokio::process::Command::new("criu")
            .args(["check", "--feature", "mem_dirty_track"])
            .kill_on_drop(true)
            .output();
        let tracked = tokio::time::timeout(self.timeout, check)
            .await
            .is_ok_and(|o| o.is_ok_and(|o| o.status.success()));
        (!tracked).then(|| {
            "this kernel does not track dirty memory ('criu check --feature mem_dirty_track' fails)"
                .to_string()
        })
    }
}

/// Filesystem types mounted inside the container whose init is `pid`.
pub fn mounted_types(pid: u32) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap_or_default();
    let mut types: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .collect();
    types.sort();
    types.dedup();
    types
}
