//! The cluster network: each agent in a network namespace of its own (a
//! host), joined by an underlay bridge; instances reach each other by
//! address across members, and a live move keeps both the address and an
//! open TCP connection.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cluster_tests::echo::{clients, downtime_ms, echoes, unbroken_gap_ms, ECHO_SERVER};
use cluster_tests::netns::TEST_CLUSTER_SUBNET;
use cluster_tests::vm::{boots, launch_vm_with, require_qemu};
use cluster_tests::{busybox_rootfs, require_container_runtime, wait_for, Cluster};

/// n1, n2, n3, each on a host of its own, bootstrapped with a cluster subnet.
fn three_hosts() -> Result<(Cluster, PathBuf)> {
    let mut cluster = Cluster::with_underlay(3)?;
    cluster.start_three_with(&["--cluster-subnet", TEST_CLUSTER_SUBNET])?;
    let rootfs = busybox_rootfs(cluster.root())?;
    Ok((cluster, rootfs))
}

fn launch(cluster: &Cluster, name: &str, target: &str, rootfs: &Path, cmd: &[&str]) -> Result<()> {
    let rootfs = rootfs.to_string_lossy();
    let mut args = vec![
        "launch", name, "--rootfs", &rootfs, "--target", target, "--",
    ];
    args.extend(cmd);
    cluster.ferry_ok(0, &args).map(|_| ())
}

fn address(cluster: &Cluster, name: &str) -> Result<String> {
    let list = cluster.ferry_json(0, &["list"])?;
    let found = list
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == name);
    found
        .and_then(|i| i["address"].as_str())
        .map(str::to_string)
        .with_context(|| format!("{name} has no address: {list}"))
}

/// `echo TEXT | nc ADDR 7000` inside instance `from`; returns the echo.
fn echo_from(cluster: &Cluster, from: &str, addr: &str, text: &str) -> Result<String> {
    let script = format!("echo {text} | timeout 5 nc {addr} 7000");
    let out = cluster.ferry_ok(0, &["exec", from, "--", "sh", "-c", &script])?;
    Ok(out.trim().to_string())
}

#[test]
fn instances_on_different_members_reach_each_other_and_every_member_reaches_them() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let (cluster, rootfs) = three_hosts()?;
    launch(&cluster, "a", "n1", &rootfs, ECHO_SERVER)?;
    launch(&cluster, "c", "n3", &rootfs, ECHO_SERVER)?;
    let (a, c) = (address(&cluster, "a")?, address(&cluster, "c")?);
    assert_ne!(a, c);
    for ip in [&a, &c] {
        assert!(
            ip.starts_with("198.19.0."),
            "{ip} is outside the cluster subnet"
        );
    }
    // TCP both ways between members, over the underlay.
    assert_eq!(echo_from(&cluster, "a", &c, "from-a")?, "from-a");
    assert_eq!(echo_from(&cluster, "c", &a, "from-c")?, "from-c");
    // A member without either instance reaches both.
    for ip in [&a, &c] {
        let out = cluster
            .command_for(1, "sh")
            .args([
                "-c",
                &format!("echo from-n2 | timeout 5 busybox nc {ip} 7000"),
            ])
            .output()?;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "from-n2",
            "to {ip}"
        );
    }
    let network = cluster.ferry_json(0, &["network", "show"])?;
    assert_eq!(network["subnet"], TEST_CLUSTER_SUBNET);
    assert_eq!(
        network["leases"].as_array().map(Vec::len),
        Some(2),
        "{network}"
    );
    // `--network none` is what it always was: loopback only, no address.
    let rootfs_text = rootfs.to_string_lossy();
    let none = [
        "launch",
        "n",
        "--rootfs",
        &rootfs_text,
        "--network",
        "none",
        "--",
        "sleep",
        "600",
    ];
    cluster.ferry_ok(0, &none)?;
    let list = cluster.ferry_json(0, &["list"])?;
    let plain = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "n")
        .unwrap();
    assert!(plain["address"].is_null(), "{plain}");
    let links = cluster.ferry_ok(0, &["exec", "n", "--", "ls", "/sys/class/net"])?;
    assert_eq!(links.split_whitespace().collect::<Vec<_>>(), ["lo"]);
    // An address held is refused to a second instance, naming the holder.
    let taken = [
        "launch",
        "x",
        "--rootfs",
        &rootfs_text,
        "--ip",
        &a,
        "--",
        "sleep",
        "600",
    ];
    let err = cluster.ferry_err(0, &taken)?;
    assert!(err.contains("already held by instance 'a'"), "{err}");
    Ok(())
}

/// A client in `cli` on n3 sending a counter to `server` every 50 ms over
/// one connection (at most 3000 values), logging each echo.
fn start_client(cluster: &Cluster, rootfs: &Path, server: &str) -> Result<PathBuf> {
    let script = clients(server, 1, 50, 3000);
    launch(cluster, "cli", "n3", rootfs, &["sh", "-c", &script])?;
    let log = cluster.agents[2]
        .data_dir
        .join("instances/cli/bundle/rootfs/log1");
    wait_echoes(&log, 20)?;
    Ok(log)
}

fn wait_echoes(log: &Path, more_than: usize) -> Result<usize> {
    wait_for("the client's echoes", Duration::from_secs(30), || {
        let n = echoes(log).len();
        if n <= more_than {
            bail!("{n} echoes");
        }
        Ok(n)
    })
}

/// What member `index` routes `ip` through (`ip route get`).
fn route_on(cluster: &Cluster, index: usize, ip: &str) -> Result<String> {
    let out = cluster
        .command_for(index, "ip")
        .args(["route", "get", ip])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Three hosts, the echo server `srv` on n1 and a client of it on n3:
/// the cluster, the server's address and the client's log.
fn server_and_client() -> Result<(Cluster, String, PathBuf)> {
    let (cluster, rootfs) = three_hosts()?;
    launch(&cluster, "srv", "n1", &rootfs, ECHO_SERVER)?;
    let addr = address(&cluster, "srv")?;
    let log = start_client(&cluster, &rootfs, &addr)?;
    Ok((cluster, addr, log))
}

/// Move `name` (holding `addr`) live to `target` (n1 or n2) while the
/// client logging to `log` talks to it: the address stays, the client's
/// echoes go on, and the other of n1 and n2 routes the address to
/// `target`. Returns the move's downtime.
fn move_keeping_the_connection(
    cluster: &Cluster,
    (name, addr): (&str, &str),
    log: &Path,
    target: &str,
) -> Result<u64> {
    let out = cluster.ferry_ok(0, &["move", name, "--target", target])?;
    let downtime = downtime_ms(&out).with_context(|| format!("no downtime in: {out}"))?;
    assert_eq!(address(cluster, name)?, addr, "the address changed");
    let seen = echoes(log).len();
    wait_echoes(log, seen + 10)?;
    let gap = unbroken_gap_ms(log)?;
    eprintln!("{name} to {target}: downtime {downtime} ms, longest gap the client saw {gap} ms");
    let (left, via) = match target {
        "n2" => (0, "198.18.0.2"),
        _ => (1, "198.18.0.1"),
    };
    let route = route_on(cluster, left, addr)?;
    assert!(route.contains(&format!("via {via}")), "{route}");
    Ok(downtime)
}

#[test]
fn a_live_move_keeps_the_address_and_the_open_connection() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let (cluster, addr, log) = server_and_client()?;
    let mut worst = 0;
    for (target, index) in [("n2", 1), ("n1", 0)] {
        worst = worst.max(move_keeping_the_connection(
            &cluster,
            ("srv", &addr),
            &log,
            target,
        )?);
        // The one left behind holds nothing for it, once it has deleted
        // its copy (after Done, which the move command returns at).
        let left = &cluster.agents[1 - index];
        let netns = left.data_dir.join("netns/srv");
        wait_for(
            "the source's namespace removed",
            Duration::from_secs(30),
            || match netns.exists() {
                true => bail!("{} still has its namespace", left.name),
                false => Ok(()),
            },
        )?;
    }
    let gap = unbroken_gap_ms(&log)?;
    // Retransmission backs off while the address is withdrawn: allow that
    // on top of the downtime, never a reconnect.
    assert!(
        gap < worst + 3_000,
        "a gap of {gap} ms (downtime at most {worst} ms)"
    );
    Ok(())
}

#[test]
fn a_move_that_fails_after_the_switch_leaves_the_server_on_its_connection() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let (cluster, addr, log) = server_and_client()?;
    // Stale runc state for the id on the target: its restore fails.
    std::fs::create_dir_all(cluster.agents[1].data_dir.join("runc/srv"))?;
    let err = cluster.ferry_err(0, &["move", "srv", "--target", "n2"])?;
    assert!(err.contains("restore on the target failed"), "{err}");
    let list = cluster.ferry_json(0, &["list"])?;
    let srv = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "srv")
        .unwrap();
    assert_eq!(srv["node"], "n1", "{srv}");
    let seen = echoes(&log).len();
    wait_echoes(&log, seen + 10)?;
    let gap = unbroken_gap_ms(&log)?;
    eprintln!("rolled back: longest gap the client saw {gap} ms");
    assert!(route_on(&cluster, 2, &addr)?.contains("via 198.18.0.1"));
    Ok(())
}

#[test]
fn a_vm_on_the_cluster_network_keeps_its_address_and_the_open_connection_through_live_moves(
) -> Result<()> {
    if !require_container_runtime() || !require_qemu() {
        return Ok(());
    }
    let (cluster, rootfs) = three_hosts()?;
    launch_vm_with(&cluster, "n1", "ferry.echo", &["--network", "cluster"])?;
    let addr = address(&cluster, "v1")?;
    let console = |i: usize| cluster.agents[i].data_dir.join("instances/v1/console.log");
    wait_for("the guest on the network", Duration::from_secs(90), || {
        let text = std::fs::read_to_string(console(0)).unwrap_or_default();
        match text.contains(&format!("NETWORK {addr}")) {
            true => Ok(()),
            false => bail!("not yet"),
        }
    })?;
    // The guest's echo server, from another member's host and from a
    // container there, over one connection.
    wait_echo(&cluster, &addr, "the guest's echo server from n3")?;
    let log = start_client(&cluster, &rootfs, &addr)?;
    let mut worst = 0;
    for (target, index) in [("n2", 1), ("n1", 0)] {
        worst = worst.max(move_keeping_the_connection(
            &cluster,
            ("v1", &addr),
            &log,
            target,
        )?);
        assert_eq!(boots(&console(index)), 0, "the guest booted on {target}");
    }
    let gap = unbroken_gap_ms(&log)?;
    assert!(
        gap < worst + 3_000,
        "a gap of {gap} ms (downtime at most {worst} ms)"
    );
    cluster.ferry_ok(0, &["delete", "v1", "--force"])?;
    Ok(())
}

/// `echo TEXT | nc ADDR 7000` from member `index`'s host namespace.
fn echo_from_member(cluster: &Cluster, index: usize, addr: &str, text: &str) -> Result<String> {
    let script = format!("echo {text} | timeout 5 busybox nc {addr} 7000");
    let out = cluster
        .command_for(index, "sh")
        .args(["-c", &script])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn wait_echo(cluster: &Cluster, addr: &str, what: &str) -> Result<()> {
    wait_for(what, Duration::from_secs(20), || {
        match echo_from_member(cluster, 2, addr, "hello")?.as_str() {
            "hello" => Ok(()),
            other => bail!("got '{other}'"),
        }
    })
}

#[test]
fn the_address_stays_through_a_stateless_move_a_stateful_stop_and_a_snapshot() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let (cluster, rootfs) = three_hosts()?;
    launch(&cluster, "a", "n1", &rootfs, ECHO_SERVER)?;
    let addr = address(&cluster, "a")?;
    wait_echo(&cluster, &addr, "the server on n1")?;
    cluster.ferry_ok(0, &["move", "a", "--target", "n2", "--stateless"])?;
    assert_eq!(address(&cluster, "a")?, addr);
    wait_echo(&cluster, &addr, "the server moved stateless to n2")?;
    cluster.ferry_ok(0, &["stop", "a", "--stateful"])?;
    assert_eq!(echo_from_member(&cluster, 2, &addr, "stopped")?, "");
    cluster.ferry_ok(0, &["start", "a"])?;
    assert_eq!(address(&cluster, "a")?, addr);
    wait_echo(&cluster, &addr, "the server restored from its checkpoint")?;
    cluster.ferry_ok(0, &["snapshot", "create", "a", "s1", "--stateful"])?;
    cluster.ferry_ok(0, &["snapshot", "restore", "a", "s1"])?;
    assert_eq!(address(&cluster, "a")?, addr);
    wait_echo(&cluster, &addr, "the server restored from its snapshot")?;
    // Deleted, its address is free again and the next launch gets it.
    cluster.ferry_ok(0, &["delete", "a", "--force"])?;
    launch(&cluster, "b", "n3", &rootfs, ECHO_SERVER)?;
    assert_eq!(address(&cluster, "b")?, addr);
    Ok(())
}

#[test]
fn leases_stay_unique_when_launches_race_and_the_leader_is_killed() -> Result<()> {
    if !require_container_runtime() {
        return Ok(());
    }
    let (mut cluster, rootfs) = three_hosts()?;
    let rootfs = rootfs.to_string_lossy().into_owned();
    let launch_via = |cluster: &Cluster, via: usize, name: &str| {
        let args = [
            "launch", name, "--rootfs", &rootfs, "--detach", "--", "sleep", "600",
        ];
        cluster.ferry(via, &args).status.success()
    };
    let (shared, launch_via) = (&cluster, &launch_via);
    // Four launches at once through three members.
    let launched: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = [(0, "r1"), (1, "r2"), (2, "r3"), (1, "r4")]
            .into_iter()
            .map(|(via, name)| s.spawn(move || launch_via(shared, via, name)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(launched, [true; 4]);
    // Launches through n2 and n3 while the leader n1 is killed.
    let raced: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = [(1, "k1"), (2, "k2")]
            .into_iter()
            .map(|(via, name)| s.spawn(move || launch_via(shared, via, name)))
            .collect();
        cluster_kill_leader(shared);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    cluster.kill(0);
    // A new leader takes later launches; every address is held once.
    // (The write path waits out the election.)
    let after = [
        "launch", "after", "--rootfs", &rootfs, "--target", "n2", "--", "sleep", "600",
    ];
    cluster.ferry_ok(1, &after)?;
    let network = cluster.ferry_json(1, &["network", "show"])?;
    let leases = network["leases"].as_array().unwrap();
    let mut addresses: Vec<&str> = leases
        .iter()
        .filter_map(|l| l["address"].as_str())
        .collect();
    let held = addresses.len();
    addresses.sort();
    addresses.dedup();
    assert_eq!(addresses.len(), held, "an address is held twice: {network}");
    let list = cluster.ferry_json(1, &["list"])?;
    let instances = list.as_array().unwrap();
    assert!(instances.iter().all(|i| i["address"].is_string()), "{list}");
    assert_eq!(instances.len(), held, "{list}");
    // Those whose launch said yes exist; one cut short by the election
    // either exists or left nothing behind.
    assert!(held >= 5 + raced.iter().filter(|ok| **ok).count());
    Ok(())
}

/// `kill -9` of n1, the leader the test bootstrapped, without waiting.
fn cluster_kill_leader(cluster: &Cluster) {
    if let Some(pid) = cluster.agents[0].pid() {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
}
