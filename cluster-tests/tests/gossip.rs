//! Gossip membership between real agent processes on loopback: crash and
//! stop detection, real partitions, quorum healing, and datagrams from
//! strangers.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cluster_tests::partition::Partition;
use cluster_tests::{wait_for, Cluster};
use ferry_agent::datadir::DataDir;
use ferry_transport::endpoint::{Endpoint, Expect};
use ferry_transport::pki::{new_serial, ClusterCa, Identity};

const CONVERGE: Duration = Duration::from_secs(30);
/// Detection bound stated for these tests (default LAN timings: probe 1 s,
/// suspicion 2–6 s): a dead member is reported dead everywhere within this.
const DETECT: Duration = Duration::from_secs(15);

fn cluster_of(names: &[&str]) -> Result<Cluster> {
    let mut cluster = Cluster::new();
    cluster.bootstrap(names[0], 3)?;
    for (i, name) in names.iter().enumerate().skip(1) {
        cluster.join(name, i - 1)?;
    }
    cluster.wait_converged(names, CONVERGE)?;
    Ok(cluster)
}

fn signal(cluster: &Cluster, index: usize, sig: &str) -> Result<()> {
    let pid = cluster.agents[index].pid().context("agent not running")?;
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill {sig} {pid} failed");
    }
    Ok(())
}

#[test]
fn killed_agent_is_dead_everywhere_within_the_bound_and_alive_after_restart() -> Result<()> {
    let mut cluster = cluster_of(&["n1", "n2", "n3", "n4", "n5"])?;
    cluster.kill(4);
    let took = cluster.wait_liveness("n5", "dead", DETECT)?;
    eprintln!("n5 dead everywhere {took:?} after kill -9");
    cluster.restart(4)?;
    let took = cluster.wait_liveness("n5", "alive", DETECT)?;
    eprintln!("n5 alive everywhere {took:?} after restart");
    assert_eq!(cluster.members(0)?.len(), 5);
    Ok(())
}

#[test]
fn stopped_agent_turns_suspect_then_dead_and_is_alive_again_after_sigcont() -> Result<()> {
    let cluster = cluster_of(&["n1", "n2", "n3"])?;
    signal(&cluster, 2, "-STOP")?;
    let stopped = std::time::Instant::now();
    // Every observation is kept: suspect must come before dead.
    let mut seen = Vec::new();
    let outcome = wait_for("n3 dead on n1", DETECT, || {
        let liveness = cluster.liveness(0, "n3")?;
        if seen.last() != Some(&liveness) {
            seen.push(liveness.clone());
        }
        if liveness == "dead" {
            Ok(())
        } else {
            bail!("n3 is {liveness}")
        }
    });
    let resumed = signal(&cluster, 2, "-CONT");
    outcome?;
    resumed?;
    eprintln!(
        "n1 saw n3 go {seen:?} within {:?} of SIGSTOP",
        stopped.elapsed()
    );
    assert_eq!(seen.first().map(String::as_str), Some("alive"), "{seen:?}");
    let suspect = seen.iter().position(|s| s == "suspect");
    let dead = seen.iter().position(|s| s == "dead");
    assert!(
        suspect.is_some() && suspect < dead,
        "n3 was not suspect before dead: {seen:?}"
    );
    cluster.wait_liveness("n3", "alive", DETECT)?;
    // Gossip never removes anyone.
    let names: Vec<String> = cluster
        .members(0)?
        .iter()
        .filter_map(|m| m["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names, ["n1", "n2", "n3"]);
    Ok(())
}

#[test]
fn partitioned_agent_is_dead_and_alive_again_once_healed() -> Result<()> {
    if !cluster_tests::require_partition_tools() {
        return Ok(());
    }
    let cluster = cluster_of(&["n1", "n2", "n3"])?;
    let port = cluster.agents[2].port()?;
    let cut = Partition::isolate(port)?;
    let took = cluster.wait_liveness("n3", "dead", DETECT)?;
    eprintln!("partitioned n3 dead everywhere after {took:?}");
    cut.heal();
    let took = cluster.wait_liveness("n3", "alive", DETECT)?;
    eprintln!("healed n3 alive everywhere after {took:?}");
    // Its own view heals too.
    wait_for("n3 to see n1 alive", DETECT, || {
        match cluster.liveness(2, "n1")?.as_str() {
            "alive" => Ok(()),
            other => bail!("n3 sees n1 {other}"),
        }
    })?;
    Ok(())
}

#[test]
fn voter_dead_past_heal_after_is_replaced_by_a_live_learner() -> Result<()> {
    let mut cluster = Cluster::new();
    cluster.agent_flags = vec!["--heal-after".into(), "3s".into()];
    cluster.bootstrap("n1", 3)?;
    for (i, name) in ["n2", "n3", "n4", "n5"].iter().enumerate() {
        cluster.join(name, i)?;
    }
    let names = ["n1", "n2", "n3", "n4", "n5"];
    let leader = cluster.wait_converged(&names, CONVERGE)?;
    let voters = cluster.wait_voters(0, 3, CONVERGE)?;
    let victim = voters
        .iter()
        .find(|v| **v != leader)
        .context("a voter that is not the leader")?
        .clone();
    let victim_index = cluster.index_of(&victim).context("victim index")?;
    let observer = cluster.index_of(&leader).context("leader index")?;
    cluster.kill(victim_index);
    cluster.wait_liveness(&victim, "dead", DETECT)?;
    let healed = wait_for(
        "a learner promoted in place of the dead voter",
        CONVERGE,
        || {
            let voters = cluster.voters(observer)?;
            if voters.len() == 3 && !voters.contains(&victim) {
                Ok(voters)
            } else {
                bail!("voters {voters:?}")
            }
        },
    )?;
    eprintln!("voters after healing: {healed:?}");
    // The swap is two membership changes (the voters replaced, then the
    // dead one added back as a learner): between them it holds no role.
    let roles = wait_for("the dead voter back as a learner", CONVERGE, || {
        let roles = cluster.roles(observer)?;
        match roles.get(&victim).map(String::as_str) {
            Some("learner") => Ok(roles),
            other => bail!("{victim} is {other:?}"),
        }
    })?;
    assert_eq!(roles.len(), 5, "nobody is removed: {roles:?}");
    for voter in &healed {
        assert_eq!(cluster.liveness(observer, voter)?, "alive");
    }
    // A write still commits with the healed voter set.
    cluster.token(observer, "after-heal", "1h")?;
    Ok(())
}

#[test]
fn datagrams_from_strangers_are_dropped_logged_once_and_agents_keep_running() -> Result<()> {
    let cluster = cluster_of(&["n1", "n2", "n3"])?;
    let addr: std::net::SocketAddr = cluster.agents[0].addr()?.parse()?;
    let dir = DataDir::new(&cluster.agents[0].data_dir);
    let ca = cluster_tests::voter_ca(&cluster.agents[0].data_dir)?;
    let admin = dir.load_credentials("admin")?;
    let n2_dir = cluster.agents[1].data_dir.clone();

    // Not even QUIC.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..(i % 1300)).map(|b| (b * 31 + i) as u8).collect();
        socket.send_to(&junk, addr)?;
    }

    // The runtime's workers keep these connections sending after block_on
    // returns; they stay open until the log shows every refusal.
    let runtime = tokio::runtime::Runtime::new()?;
    let open = runtime.block_on(async {
        // A node of another cluster, trusting ours by fingerprint so that
        // only our agent can refuse it; it retries three times.
        let other = ClusterCa::generate()?;
        let foreign = other.issue(&Identity::Node("n9".into()), &new_serial())?;
        let client = Endpoint::client("127.0.0.1:0".parse()?, Some(&foreign))?;
        let foreign_addr = client.local_addr()?;
        for _ in 0..3 {
            let conn = client
                .connect(addr, &Expect::CaFingerprint(ca.fingerprint()))
                .await?;
            for _ in 0..20 {
                let _ = conn.send_datagram(bytes_of(b"foreign gossip"));
            }
            tokio::time::timeout(CONVERGE, conn.closed()).await?;
        }
        // Our own admin certificate: valid, but not a member node.
        let admin_client = Endpoint::client("127.0.0.1:0".parse()?, Some(&admin))?;
        let admin_conn = admin_client.connect(addr, &Expect::AnyNode).await?;
        for _ in 0..50 {
            admin_conn.send_datagram(bytes_of(b"admin gossip"))?;
        }
        // A certificate of this cluster for member n2's name but not the
        // one recorded for n2 (minted by a member gone rogue).
        let impostor = ca.issue(&Identity::Node("n2".into()), &new_serial())?;
        let client = Endpoint::client("127.0.0.1:0".parse()?, Some(&impostor))?;
        let conn = client.connect(addr, &Expect::AnyNode).await?;
        for _ in 0..50 {
            conn.send_datagram(bytes_of(&[0xff; 64]))?;
        }
        // n2's own certificate sending junk (a broken member).
        let n2 = DataDir::new(&n2_dir).load_credentials("node")?;
        let broken = Endpoint::client("127.0.0.1:0".parse()?, Some(&n2))?;
        let broken_conn = broken.connect(addr, &Expect::AnyNode).await?;
        for _ in 0..50 {
            broken_conn.send_datagram(bytes_of(&[0xff; 64]))?;
        }
        let held = (admin_client, admin_conn, client, conn, broken, broken_conn);
        anyhow::Ok((held, foreign_addr))
    })?;
    // Only this stranger's address: agents of tests running beside this
    // one may knock on a reused port too.
    let stranger = format!("peer={}", open.1);
    let from_stranger = |text: &str| {
        text.lines()
            .filter(|l| l.contains("handshake failed") && l.ends_with(&stranger))
            .count()
    };

    let log = || std::fs::read_to_string(cluster.agents[0].log_path()).unwrap_or_default();
    let count = |text: &str, needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    wait_for("every kind of refusal in n1's log", CONVERGE, || {
        let text = log();
        if from_stranger(&text) == 0 {
            bail!("no 'handshake failed' from the stranger yet");
        }
        for needle in [
            "not a node certificate",
            "not the one recorded for member 'n2'",
            "gossip from member 2 dropped",
        ] {
            if count(&text, needle) == 0 {
                bail!("no '{needle}' yet");
            }
        }
        Ok(())
    })?;
    let text = log();
    assert_eq!(from_stranger(&text), 1, "logged once per sender");
    assert_eq!(count(&text, "not a node certificate"), 1);
    assert_eq!(count(&text, "not the one recorded for member 'n2'"), 1);
    assert_eq!(count(&text, "gossip from member 2 dropped"), 1);
    // Nobody crashed and gossip still works.
    cluster.wait_converged(&["n1", "n2", "n3"], CONVERGE)?;
    Ok(())
}

fn bytes_of(data: &[u8]) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(data)
}

#[test]
fn load_facts_arrive_by_gossip_with_their_age_and_age_once_the_member_is_gone() -> Result<()> {
    let mut cluster = cluster_of(&["n1", "n2", "n3"])?;
    let load_of_n3 = |cluster: &Cluster| -> Result<serde_json::Value> {
        let show = cluster.ferry_json(0, &["cluster", "show", "n3"])?;
        match &show["load"] {
            serde_json::Value::Null => bail!("no load facts for n3 yet: {show}"),
            load => Ok(load.clone()),
        }
    };
    let fresh = wait_for("fresh load facts of n3 on n1", CONVERGE, || {
        let load = load_of_n3(&cluster)?;
        // Reported every 2 s: a fresh report is younger than that plus
        // the time to spread it.
        match load["age_ms"].as_u64() {
            Some(age) if age < 4_000 => Ok(load),
            _ => bail!("stale: {load}"),
        }
    })?;
    assert!(
        fresh["memory_free_bytes"].as_u64().is_some_and(|b| b > 0),
        "{fresh}"
    );
    assert_eq!(
        fresh["load_average"].as_array().map(Vec::len),
        Some(3),
        "{fresh}"
    );
    assert_eq!(fresh["running_instances"], 0, "{fresh}");
    assert_eq!(fresh["agent_version"], env!("CARGO_PKG_VERSION"), "{fresh}");
    // A dead member's last figures stay, and show their growing age.
    cluster.kill(2);
    wait_for("n3's load facts to age", CONVERGE, || {
        let load = load_of_n3(&cluster)?;
        match load["age_ms"].as_u64() {
            Some(age) if age > 6_000 => Ok(()),
            _ => bail!("still young: {load}"),
        }
    })?;
    Ok(())
}
