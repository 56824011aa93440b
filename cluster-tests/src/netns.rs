//! Agents standing for separate hosts: each in a network namespace of its
//! own, joined by a veth to a bridge in a hub namespace (the underlay).
//! Everything lives in namespaces the test made (198.18.0.0/24 on the
//! underlay) and goes when the `Underlay` is dropped, also after a panic.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The cluster subnet tests bootstrap with (inside the member namespaces).
pub const TEST_CLUSTER_SUBNET: &str = "198.19.0.0/24";

pub struct Underlay {
    hub: String,
    members: Vec<String>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Underlay {
    /// `members` namespaces on one underlay bridge, member i at
    /// 198.18.0.(i+1).
    pub fn new(members: usize) -> Result<Self> {
        let tag = format!(
            "fy{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut underlay = Underlay {
            hub: format!("{tag}hub"),
            members: Vec::new(),
        };
        ip(&["netns", "add", &underlay.hub])?;
        ip(&["-n", &underlay.hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &underlay.hub, "link", "set", "br0", "up"])?;
        for i in 0..members {
            let ns = format!("{tag}m{i}");
            ip(&["netns", "add", &ns])?;
            underlay.members.push(ns.clone());
            let (hub_side, member_side) = (format!("h{i}"), format!("{tag}u{i}"));
            ip(&[
                "-n",
                &underlay.hub,
                "link",
                "add",
                &hub_side,
                "type",
                "veth",
                "peer",
                "name",
                &member_side,
            ])?;
            ip(&[
                "-n",
                &underlay.hub,
                "link",
                "set",
                &member_side,
                "netns",
                &ns,
            ])?;
            ip(&[
                "-n",
                &underlay.hub,
                "link",
                "set",
                &hub_side,
                "master",
                "br0",
                "up",
            ])?;
            ip(&["-n", &ns, "link", "set", &member_side, "name", "u0"])?;
            let addr = format!("{}/24", underlay.address(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "u0"])?;
            ip(&["-n", &ns, "link", "set", "u0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(underlay)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn address(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, i as u8 + 1)
    }

    /// What `nsenter --net=` takes for member i.
    pub fn path(&self, i: usize) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.members[i])
    }

    /// The `ip netns` name of member i.
    pub fn name(&self, i: usize) -> &str {
        &self.members[i]
    }

    /// `program args` inside member i's namespace (not `ip netns exec`:
    /// that remounts /sys and runc then finds no cgroup mount).
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path(i).display()))
            .arg("--")
            .arg(program);
        cmd
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        for ns in self.members.iter().chain(std::iter::once(&self.hub)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
