//! A container's place on the cluster network: its address (recorded next
//! to its bundle when its config is written, so a start after a host
//! restart finds it), its network namespace under `<data-dir>/netns`, and
//! the veth that is up only while the container may talk.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ferry_raft::{InstanceSpec, NetworkMode};

use crate::api::names::InstanceName;
use crate::driver::DriverError;
use crate::netdev;

pub struct InstanceNet {
    data_dir: PathBuf,
}

fn net_error(e: netdev::NetError) -> DriverError {
    DriverError::Runtime(format!("cluster network: {e}"))
}

impl InstanceNet {
    pub fn new(data_dir: &Path) -> Self {
        InstanceNet {
            data_dir: data_dir.to_path_buf(),
        }
    }

    fn address_file(&self, name: &InstanceName) -> PathBuf {
        self.data_dir
            .join("instances")
            .join(name.as_str())
            .join("address")
    }

    /// The namespace runc puts the container in (given in its config).
    pub fn namespace(&self, name: &InstanceName) -> PathBuf {
        self.data_dir.join("netns").join(name.as_str())
    }

    /// Its address, when it is on the cluster network.
    pub fn address(&self, name: &InstanceName) -> Option<Ipv4Addr> {
        let text = std::fs::read_to_string(self.address_file(name)).ok()?;
        text.trim().parse().ok()
    }

    /// Record (or forget) the address the spec gives it; the namespace path
    /// for its config when it has one.
    pub async fn record(
        &self,
        name: &InstanceName,
        spec: &InstanceSpec,
    ) -> Result<Option<PathBuf>, DriverError> {
        let file = self.address_file(name);
        match (spec.network, spec.address) {
            (NetworkMode::Cluster, Some(ip)) => {
                tokio::fs::write(&file, format!("{ip}\n"))
                    .await
                    .map_err(|e| {
                        DriverError::Runtime(format!("cannot write {}: {e}", file.display()))
                    })?;
                Ok(Some(self.namespace(name)))
            }
            _ => {
                let _ = tokio::fs::remove_file(&file).await;
                Ok(None)
            }
        }
    }

    /// Before runc starts or restores it: its namespace with its address,
    /// reachable at once (`up`) or only once released.
    pub async fn attach(&self, name: &InstanceName, up: bool) -> Result<(), DriverError> {
        let Some(ip) = self.address(name) else {
            return Ok(());
        };
        netdev::attach(&self.namespace(name), ip, up)
            .await
            .map_err(net_error)
    }

    /// Withdraw (`false`) or announce (`true`) its address on this member.
    pub async fn set_link(&self, name: &InstanceName, up: bool) -> Result<(), DriverError> {
        let Some(ip) = self.address(name) else {
            return Ok(());
        };
        netdev::set_link(ip, up).await.map_err(net_error)
    }

    /// Announce it where it must run whatever the network says: a failure
    /// is logged, never a reason to leave the instance frozen.
    pub async fn announce(&self, name: &InstanceName) {
        if let Err(e) = self.set_link(name, true).await {
            tracing::error!(instance = %name, "its address cannot be announced here: {e}");
        }
    }

    pub async fn detach(&self, name: &InstanceName) {
        if let Some(ip) = self.address(name) {
            netdev::detach(&self.namespace(name), ip).await;
        }
        netdev::remove_namespace(&self.namespace(name));
    }

    /// CRIU must dump and restore its TCP connections (they live on).
    pub fn keeps_connections(&self, name: &InstanceName) -> bool {
        self.address(name).is_some()
    }
}
