//! The cluster network's kernel devices on one member, through netlink
//! (rtnetlink): the instances' bridge with the gateway address, one
//! network namespace (a bind-mounted file under the data dir) and veth pair
//! per instance, and the host routes to every instance (ours carry
//! protocol [`ROUTE_PROTOCOL`], so other routes are never touched).
//!
//! Routes, not an overlay: every instance address is a /32 route on every
//! member (to the bridge where it runs, via its member's underlay address
//! elsewhere), so a move changes one route per member and no packet is
//! encapsulated (no MTU loss, nothing to configure per member pair).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::packet_route::route::{RouteScope, RouteType};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

use ferry_raft::subnet::Subnet;

/// Every member's bridge for its instances.
pub const BRIDGE: &str = "ferry0";
/// Marks the routes ferry made (`ip route show proto 243`).
pub const ROUTE_PROTOCOL: u8 = 243;
/// Inside each instance's namespace.
const INSTANCE_IFACE: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network namespace {path}: {reason}")]
    Namespace { path: PathBuf, reason: String },
    #[error("netlink: {what} failed: {reason}")]
    Netlink { what: String, reason: String },
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |e| NetError::Netlink {
        what,
        reason: e.to_string(),
    }
}

/// Where a route to an instance's address leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteTo {
    /// It runs here: through the bridge.
    Bridge,
    /// It runs on the member with this underlay address.
    Member(Ipv4Addr),
}

/// The host side of an instance's veth pair, named after its address
/// (unique in the cluster, at most 15 characters).
pub fn host_iface(ip: Ipv4Addr) -> String {
    format!("fv{:08x}", u32::from(ip))
}

/// The bridge's MAC, from the gateway address (locally administered).
pub fn gateway_mac(gateway: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = gateway.octets();
    [0x02, 0xfe, a, b, c, d]
}

/// A VM's NIC's MAC, from its address: the same on every member, as the
/// migrated NIC must be (and unlike the bridge's, `0x06`).
pub fn instance_mac(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x06, 0xfe, a, b, c, d]
}

fn peer_iface(ip: Ipv4Addr) -> String {
    format!("fp{:08x}", u32::from(ip))
}

/// A netlink connection in the network namespace bound at `ns` (this
/// process's own when `None`): the socket is made on a thread of its own
/// that entered the namespace, and keeps it after the thread ends.
async fn connect(ns: Option<&Path>) -> Result<Handle, NetError> {
    let runtime = tokio::runtime::Handle::current();
    let ns = ns.map(Path::to_path_buf);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _entered = runtime.enter();
        let made = (|| -> Result<Handle, NetError> {
            if let Some(path) = &ns {
                let file = std::fs::File::open(path).map_err(|e| ns_err(path, e))?;
                rustix::thread::move_into_link_name_space(
                    file.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(|e| ns_err(path, e))?;
            }
            let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| NetError::Netlink {
                what: "open a socket".into(),
                reason: e.to_string(),
            })?;
            runtime.spawn(conn);
            Ok(handle)
        })();
        let _ = tx.send(made);
    });
    rx.await.map_err(|_| NetError::Netlink {
        what: "open a socket".into(),
        reason: "the thread making it ended".into(),
    })?
}

fn ns_err(path: &Path, e: impl ToString) -> NetError {
    NetError::Namespace {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// A new network namespace kept alive by a bind mount on `path` (nothing
/// to do when one is mounted there already).
pub async fn create_namespace(path: &Path) -> Result<(), NetError> {
    let path = path.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(bind_new_namespace(&path));
    });
    rx.await.map_err(|_| NetError::Netlink {
        what: "make a namespace".into(),
        reason: "its thread ended".into(),
    })?
}

const NSFS_MAGIC: i64 = 0x6e73_6673;

fn is_namespace(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type == NSFS_MAGIC)
}

/// Runs on a thread of its own, which ends right after.
fn bind_new_namespace(path: &Path) -> Result<(), NetError> {
    if is_namespace(path) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| ns_err(path, e))?;
    }
    std::fs::write(path, b"").map_err(|e| ns_err(path, e))?;
    // SAFETY: only this thread changes namespace, and it does nothing
    // after the bind mount but end.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
        .map_err(|e| ns_err(path, e))?;
    rustix::mount::mount_bind("/proc/thread-self/ns/net", path).map_err(|e| ns_err(path, e))
}

/// Unmount and remove an instance's namespace file (gone already is fine).
pub fn remove_namespace(path: &Path) {
    if is_namespace(path) {
        let _ = rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH);
    }
    let _ = std::fs::remove_file(path);
}

async fn link_index(handle: &Handle, name: &str) -> Option<u32> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    links
        .try_next()
        .await
        .ok()
        .flatten()
        .map(|l| l.header.index)
}

/// The bridge with the gateway address, forwarding on: what every
/// instance here routes through.
pub async fn ensure_bridge(subnet: &Subnet) -> Result<(), NetError> {
    let handle = connect(None).await?;
    let index = match link_index(&handle, BRIDGE).await {
        Some(index) => index,
        None => {
            let add = handle.link().add(LinkBridge::new(BRIDGE).build()).execute();
            add.await
                .map_err(netlink(format!("create bridge {BRIDGE}")))?;
            link_index(&handle, BRIDGE)
                .await
                .ok_or_else(|| NetError::Netlink {
                    what: format!("find bridge {BRIDGE}"),
                    reason: "it vanished after it was made".into(),
                })?
        }
    };
    // The same MAC on every member's bridge: a VM's guest keeps the
    // gateway's MAC in its ARP cache through a live move (a container's
    // namespace is made anew on the target; a guest's memory is not).
    let mac = LinkUnspec::new_with_index(index).address(gateway_mac(subnet.gateway()).to_vec());
    let set = handle.link().set(mac.build()).execute();
    set.await
        .map_err(netlink(format!("set the MAC of {BRIDGE}")))?;
    let gateway = IpAddr::V4(subnet.gateway());
    let add = handle.address().add(index, gateway, 32).replace().execute();
    add.await
        .map_err(netlink(format!("add {gateway} to {BRIDGE}")))?;
    let up = handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build());
    up.execute()
        .await
        .map_err(netlink(format!("set {BRIDGE} up")))?;
    // Instances on this bridge reach each other through the gateway: it
    // must forward and must not redirect them to each other.
    for (file, value) in [
        ("/proc/sys/net/ipv4/ip_forward".to_string(), "1"),
        (
            format!("/proc/sys/net/ipv4/conf/{BRIDGE}/send_redirects"),
            "0",
        ),
    ] {
        std::fs::write(&file, value).map_err(|e| NetError::Netlink {
            what: format!("write {file}"),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// An instance's namespace with its address: a veth pair whose host side
/// is on the bridge (up only with `up`: a held copy receives nothing
/// until it is released) and whose other side is `eth0` inside.
pub async fn attach(ns: &Path, ip: Ipv4Addr, up: bool) -> Result<(), NetError> {
    create_namespace(ns).await?;
    let handle = connect(None).await?;
    let host = host_iface(ip);
    let peer = peer_iface(ip);
    if let Some(index) = link_index(&handle, &host).await {
        let del = handle.link().del(index).execute();
        del.await
            .map_err(netlink(format!("delete the old {host}")))?;
    }
    let add = handle
        .link()
        .add(LinkVeth::new(&host, &peer).build())
        .execute();
    add.await.map_err(netlink(format!("create veth {host}")))?;
    let not_ready = || NetError::Netlink {
        what: format!("find bridge {BRIDGE} and its address"),
        reason: "the cluster network is not set up on this member yet".into(),
    };
    let bridge = link_index(&handle, BRIDGE).await.ok_or_else(not_ready)?;
    let gateway = first_address(&handle, bridge).await.ok_or_else(not_ready)?;
    let host_index = need_index(&handle, &host).await?;
    let peer_index = need_index(&handle, &peer).await?;
    let ns_file = std::fs::File::open(ns).map_err(|e| ns_err(ns, e))?;
    let into_ns = LinkUnspec::new_with_index(peer_index)
        .setns_by_fd(std::os::fd::AsRawFd::as_raw_fd(&ns_file));
    let set = handle.link().set(into_ns.build()).execute();
    set.await
        .map_err(netlink(format!("move {peer} into {}", ns.display())))?;
    let on_bridge = LinkUnspec::new_with_index(host_index).controller(bridge);
    let on_bridge = if up { on_bridge.up() } else { on_bridge.down() };
    let set = handle.link().set(on_bridge.build()).execute();
    set.await
        .map_err(netlink(format!("put {host} on {BRIDGE}")))?;
    configure_inside(ns, &peer, ip, gateway).await
}

/// A VM's tap (QEMU made it, named `host_iface(ip)`) on the bridge, up
/// (routed here) or down (a held copy receives nothing until released).
pub async fn attach_tap(ip: Ipv4Addr, up: bool) -> Result<(), NetError> {
    let handle = connect(None).await?;
    let bridge = link_index(&handle, BRIDGE)
        .await
        .ok_or_else(|| NetError::Netlink {
            what: format!("find bridge {BRIDGE}"),
            reason: "the cluster network is not set up on this member yet".into(),
        })?;
    let tap = host_iface(ip);
    let index = need_index(&handle, &tap).await?;
    let on_bridge = LinkUnspec::new_with_index(index).controller(bridge).down();
    let set = handle.link().set(on_bridge.build()).execute();
    set.await
        .map_err(netlink(format!("put {tap} on {BRIDGE}")))?;
    match up {
        true => set_link(ip, true).await,
        false => Ok(()),
    }
}

/// This member's gateway address for its instances (its bridge's), once
/// the cluster network is set up here.
pub async fn gateway() -> Option<Ipv4Addr> {
    let handle = connect(None).await.ok()?;
    let bridge = link_index(&handle, BRIDGE).await?;
    first_address(&handle, bridge).await
}

/// The bridge's IPv4 address: the gateway of the cluster subnet.
async fn first_address(handle: &Handle, index: u32) -> Option<Ipv4Addr> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let dump = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let all: Vec<_> = dump.try_collect().await.ok()?;
    all.iter()
        .flat_map(|a| a.attributes.iter())
        .find_map(|attr| match attr {
            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        })
}

async fn need_index(handle: &Handle, name: &str) -> Result<u32, NetError> {
    link_index(handle, name)
        .await
        .ok_or_else(|| NetError::Netlink {
            what: format!("find {name}"),
            reason: "it vanished after it was made".into(),
        })
}

/// Inside the namespace: loopback up, `eth0` with the address, a route to
/// the gateway on the link and the default route through it.
async fn configure_inside(
    ns: &Path,
    peer: &str,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
) -> Result<(), NetError> {
    let inside = connect(Some(ns)).await?;
    if let Some(lo) = link_index(&inside, "lo").await {
        let up = inside
            .link()
            .set(LinkUnspec::new_with_index(lo).up().build());
        up.execute().await.map_err(netlink("set lo up"))?;
    }
    let index = need_index(&inside, peer).await?;
    let rename = LinkUnspec::new_with_index(index)
        .name(INSTANCE_IFACE.into())
        .up();
    let set = inside.link().set(rename.build()).execute();
    set.await
        .map_err(netlink(format!("rename {peer} to {INSTANCE_IFACE}")))?;
    let add = inside
        .address()
        .add(index, IpAddr::V4(ip), 32)
        .replace()
        .execute();
    add.await.map_err(netlink(format!("add {ip} inside")))?;
    let to_gateway = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(gateway, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    let add = inside.route().add(to_gateway).replace().execute();
    add.await
        .map_err(netlink(format!("route to {gateway} inside")))?;
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gateway)
        .output_interface(index)
        .build();
    let add = inside.route().add(default).replace().execute();
    add.await.map_err(netlink("default route inside"))
}

/// Set the host side of an instance's veth up or down: down, nothing
/// reaches the instance and nothing it sends leaves (a frozen source, a
/// held target); up, it is on the network again.
pub async fn set_link(ip: Ipv4Addr, up: bool) -> Result<(), NetError> {
    let handle = connect(None).await?;
    let host = host_iface(ip);
    let index = need_index(&handle, &host).await?;
    let link = LinkUnspec::new_with_index(index);
    let link = if up { link.up() } else { link.down() };
    let set = handle.link().set(link.build()).execute();
    set.await.map_err(netlink(format!(
        "set {host} {}",
        if up { "up" } else { "down" }
    )))?;
    if up {
        // It runs here from now on, whether or not the route upkeep has
        // seen the state that says so yet.
        replace_route(&handle, ip, RouteTo::Bridge).await?;
    }
    Ok(())
}

/// Remove an instance's veth pair and namespace (gone already is fine).
pub async fn detach(ns: &Path, ip: Ipv4Addr) {
    if let Ok(handle) = connect(None).await {
        if let Some(index) = link_index(&handle, &host_iface(ip)).await {
            let _ = handle.link().del(index).execute().await;
        }
    }
    remove_namespace(ns);
}

fn route_message(handle_bridge: Option<u32>, ip: Ipv4Addr, to: RouteTo) -> RouteMessage {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
    match (to, handle_bridge) {
        (RouteTo::Member(via), _) => route.gateway(via).build(),
        (RouteTo::Bridge, Some(bridge)) => route
            .output_interface(bridge)
            .scope(RouteScope::Link)
            .build(),
        (RouteTo::Bridge, None) => route.kind(RouteType::Unreachable).build(),
    }
}

async fn replace_route(handle: &Handle, ip: Ipv4Addr, to: RouteTo) -> Result<(), NetError> {
    let bridge = link_index(handle, BRIDGE).await;
    let add = handle
        .route()
        .add(route_message(bridge, ip, to))
        .replace()
        .execute();
    add.await.map_err(netlink(format!("route {ip} to {to:?}")))
}

/// The routes ferry made, by destination.
async fn our_routes(
    handle: &Handle,
    bridge: Option<u32>,
) -> Result<BTreeMap<Ipv4Addr, RouteTo>, NetError> {
    let dump = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let all: Vec<RouteMessage> = dump.try_collect().await.map_err(netlink("list routes"))?;
    let mut ours = BTreeMap::new();
    for route in all {
        if route.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
            continue;
        }
        let mut dest = None;
        let mut to = None;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => dest = Some(*ip),
                RouteAttribute::Gateway(RouteAddress::Inet(via)) => {
                    to = Some(RouteTo::Member(*via))
                }
                RouteAttribute::Oif(oif) if Some(*oif) == bridge && to.is_none() => {
                    to = Some(RouteTo::Bridge)
                }
                _ => {}
            }
        }
        if let (Some(dest), Some(to)) = (dest, to) {
            ours.insert(dest, to);
        }
    }
    Ok(ours)
}

/// Make this member's routes to instances exactly `desired`: add or
/// replace what differs, delete ours that are no longer wanted.
pub async fn sync_routes(desired: &BTreeMap<Ipv4Addr, RouteTo>) -> Result<usize, NetError> {
    let handle = connect(None).await?;
    let bridge = link_index(&handle, BRIDGE).await;
    let current = our_routes(&handle, bridge).await?;
    let mut changed = 0;
    for (ip, to) in desired {
        if current.get(ip) != Some(to) {
            replace_route(&handle, *ip, *to).await?;
            changed += 1;
        }
    }
    for (ip, to) in &current {
        if !desired.contains_key(ip) {
            let del = handle
                .route()
                .del(route_message(bridge, *ip, *to))
                .execute();
            del.await
                .map_err(netlink(format!("delete the route to {ip}")))?;
            changed += 1;
        }
    }
    Ok(changed)
}
