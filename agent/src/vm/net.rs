//! A VM's place on the cluster network: a tap QEMU makes (named like a
//! container's veth host side, so routes and `set_link` treat both alike)
//! on the member's bridge, a virtio NIC whose MAC comes from the address
//! (the same on every member, as the migrated device must be), and the
//! address and gateway on the guest's kernel command line
//! (`ferry.ip=A.B.C.D ferry.gateway=G`) for it to configure: the host
//! cannot reach into a guest the way it fills a container's namespace.

use std::net::Ipv4Addr;

use ferry_raft::{InstanceSpec, NetworkMode};

use crate::driver::DriverError;
use crate::netdev;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Nic {
    pub address: Ipv4Addr,
    pub gateway: Ipv4Addr,
}

impl Nic {
    /// The tap's name on the host.
    pub fn ifname(&self) -> String {
        netdev::host_iface(self.address)
    }

    pub fn mac(&self) -> String {
        let bytes = netdev::instance_mac(self.address);
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        hex.join(":")
    }

    /// What a guest booted by ferry finds on its command line.
    pub fn kernel_args(&self) -> String {
        format!("ferry.ip={} ferry.gateway={}", self.address, self.gateway)
    }
}

fn net_error(e: netdev::NetError) -> DriverError {
    DriverError::Runtime(format!("cluster network: {e}"))
}

/// The NIC a VM with `spec` gets on this member, if it is on the cluster
/// network (which must be set up here then).
pub async fn nic_for(spec: &InstanceSpec) -> Result<Option<Nic>, DriverError> {
    let (NetworkMode::Cluster, Some(address)) = (spec.network, spec.address) else {
        return Ok(None);
    };
    let gateway = netdev::gateway().await.ok_or_else(|| {
        DriverError::Runtime(format!(
            "cluster network: {} has no address on this member yet (is the agent's network upkeep running?)",
            netdev::BRIDGE
        ))
    })?;
    Ok(Some(Nic { address, gateway }))
}

/// Once QEMU runs: its tap on the bridge, up (reachable here) or down.
pub async fn attach(nic: &Nic, up: bool) -> Result<(), DriverError> {
    netdev::attach_tap(nic.address, up).await.map_err(net_error)
}

/// Withdraw (`false`) or announce (`true`) its address on this member.
pub async fn set_link(nic: &Nic, up: bool) -> Result<(), DriverError> {
    netdev::set_link(nic.address, up).await.map_err(net_error)
}

/// A running VM: its address routed here, and QEMU's announcement
/// (gratuitous ARP from its NIC, a few rounds) so neighbours learn where
/// it is now. A failure is logged, never a reason to keep it paused.
pub async fn announce(nic: &Nic, qmp: &super::qmp::Qmp) {
    if let Err(e) = set_link(nic, true).await {
        tracing::error!(address = %nic.address, "a VM's address cannot be announced here: {e}");
    }
    let rounds = serde_json::json!({ "initial": 50, "max": 550, "rounds": 5, "step": 100 });
    if let Err(e) = qmp.execute("announce-self", Some(rounds)).await {
        tracing::warn!(address = %nic.address, "QEMU's announcement failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nic_is_named_and_addressed_by_the_instance_address_alone() {
        let nic = Nic {
            address: Ipv4Addr::new(198, 19, 0, 5),
            gateway: Ipv4Addr::new(198, 19, 0, 1),
        };
        assert_eq!(nic.mac(), "06:fe:c6:13:00:05");
        assert_eq!(nic.ifname(), netdev::host_iface(nic.address));
        assert_eq!(
            nic.kernel_args(),
            "ferry.ip=198.19.0.5 ferry.gateway=198.19.0.1"
        );
        // Never the bridge's MAC (the guest's gateway).
        assert_ne!(
            netdev::instance_mac(nic.gateway),
            netdev::gateway_mac(nic.gateway)
        );
    }
}
