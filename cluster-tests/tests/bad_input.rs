//! Bad input is refused with one clear error line while the cluster keeps
//! serving: join tokens, certificates, frames and stray packets.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use anyhow::{bail, Result};
use cluster_tests::{wait_for, Cluster};
use ferry_agent::api::{ApiRequest, Request, Response};
use ferry_agent::token::JoinToken;
use ferry_transport::endpoint::{Endpoint, Expect};
use ferry_transport::pki::{self, ClusterCa, Credentials, Identity};

const CONVERGE: Duration = Duration::from_secs(30);

fn one_line(text: &str) -> &str {
    assert_eq!(
        text.lines().count(),
        1,
        "expected one error line, got: {text}"
    );
    text
}

/// Try to start a joining agent; it must exit non-zero. Returns its stderr.
fn failed_join(cluster: &Cluster, name: &str, token: &str) -> Result<String> {
    let dir = cluster.root().join(format!("{name}-rejected"));
    let mut child = std::process::Command::new(cluster_tests::ferry_bin())
        .arg("--data-dir")
        .arg(&dir)
        .args([
            "agent",
            "--log-level",
            "error",
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
            "--join",
            token,
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // A join that is wrongly accepted leaves an agent running: bounded.
    let exited = wait_for(&format!("the join of {name} to fail"), CONVERGE, || {
        child
            .try_wait()?
            .ok_or_else(|| anyhow::anyhow!("still running"))
    });
    if exited.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        bail!("join of {name} succeeded (the agent kept running) but should have failed");
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        bail!("join of {name} succeeded but should have failed");
    }
    assert!(
        !dir.join("node.json").exists(),
        "a refused joiner must not keep an identity"
    );
    Ok(String::from_utf8_lossy(&out.stderr).trim().to_string())
}

fn token_status(cluster: &Cluster, name: &str) -> Result<String> {
    let list = cluster.ferry_json(0, &["cluster", "token", "list"])?;
    Ok(list
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == name))
        .map(|t| t["status"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default())
}

#[test]
fn bad_join_tokens_are_refused_and_the_cluster_keeps_serving() -> Result<()> {
    let mut cluster = Cluster::new();
    cluster.bootstrap("n1", 3)?;
    cluster.wait_converged(&["n1"], CONVERGE)?;

    let err = failed_join(&cluster, "j1", "not-a-token")?;
    assert!(one_line(&err).contains("not a ferry token"), "{err}");

    // Expired.
    let expired = cluster.token(0, "j2", "1s")?;
    wait_for(
        "the token to expire",
        Duration::from_secs(10),
        || match token_status(&cluster, "j2")?.as_str() {
            "expired" => Ok(()),
            s => bail!("status {s}"),
        },
    )?;
    let err = failed_join(&cluster, "j2", &expired)?;
    assert!(one_line(&err).contains("expired"), "{err}");

    // Revoked.
    let revoked = cluster.token(0, "j3", "1h")?;
    cluster.ferry_ok(0, &["cluster", "token", "revoke", "j3"])?;
    let err = failed_join(&cluster, "j3", &revoked)?;
    assert!(one_line(&err).contains("revoked"), "{err}");

    // A token whose CA fingerprint is not the cluster's: the joiner refuses
    // the cluster before sending the secret, so the token stays valid.
    let good = cluster.token(0, "j4", "1h")?;
    let mut forged = JoinToken::decode(&good)?;
    forged.ca_fingerprint = "00".repeat(32);
    let err = failed_join(&cluster, "j4", &forged.encode())?;
    assert!(one_line(&err).contains("join failed"), "{err}");
    assert_eq!(token_status(&cluster, "j4")?, "valid");

    // Used once for real, then again.
    cluster.join_with_token("j4", &good)?;
    let err = failed_join(&cluster, "j4", &good)?;
    assert!(one_line(&err).contains("already"), "{err}");
    assert_eq!(token_status(&cluster, "j4")?, "used");

    // A token for another name.
    let other = cluster.token(0, "j5", "1h")?;
    let err = failed_join(&cluster, "j6", &other)?;
    assert!(one_line(&err).contains("is for member 'j5'"), "{err}");

    cluster.token(0, "still-serving", "1h")?;
    cluster.wait_converged(&["n1", "j4"], CONVERGE)?;
    Ok(())
}

fn client(creds: Option<&Credentials>) -> Result<Endpoint> {
    Ok(Endpoint::client("127.0.0.1:0".parse()?, creds)?)
}

async fn ask(
    endpoint: &Endpoint,
    addr: &str,
    expect: Expect,
    request: &Request,
) -> Result<Response> {
    let conn = endpoint.connect(addr.parse()?, &expect).await?;
    Ok(ferry_transport::rpc::call(&conn, request, Duration::from_secs(5)).await?)
}

#[test]
fn foreign_missing_and_misused_certificates_are_refused() -> Result<()> {
    let mut cluster = Cluster::new();
    cluster.bootstrap("n1", 3)?;
    cluster.join("n2", 0)?;
    cluster.wait_converged(&["n1", "n2"], CONVERGE)?;
    let addr = cluster.agents[0].addr()?;
    let n2_dir = ferry_agent::datadir::DataDir::new(&cluster.agents[1].data_dir);
    let n2_creds = n2_dir.load_credentials("node")?;
    let n1_dir = cluster.agents[0].data_dir.clone();

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        // A client certificate from another cluster's CA: refused on the
        // first stream even if connect() succeeds.
        let other = ClusterCa::generate()?;
        let mut foreign = other.issue(&Identity::Admin, &pki::new_serial())?;
        foreign.ca_pem = n2_creds.ca_pem.clone();
        let endpoint = client(Some(&foreign))?;
        let result = ask(
            &endpoint,
            &addr,
            Expect::AnyNode,
            &Request::Api(ApiRequest::ClusterList),
        )
        .await;
        assert!(result.is_err(), "foreign certificate accepted: {result:?}");

        // No client certificate: only joins are allowed.
        let endpoint = client(None)?;
        let fp = pki::fingerprint_of_pem(&n2_creds.ca_pem)?;
        match ask(
            &endpoint,
            &addr,
            Expect::CaFingerprint(fp),
            &Request::Api(ApiRequest::ClusterList),
        )
        .await?
        {
            Response::Error(e) => assert!(e.message.contains("certificate"), "{}", e.message),
            other => bail!("no-cert client got {other:?}"),
        }

        // n2's certificate used to reach n1 under n1's name works, but a
        // server presenting n1's certificate is not "n2".
        let endpoint = client(Some(&n2_creds))?;
        match ask(&endpoint, &addr, Expect::Node("n1".into()), &Request::Ping).await? {
            Response::Pong { name, .. } => assert_eq!(name, "n1"),
            other => bail!("ping got {other:?}"),
        }
        let wrong = ask(&endpoint, &addr, Expect::Node("n2".into()), &Request::Ping).await;
        assert!(wrong.is_err(), "server name not checked");

        // A certificate the cluster CA signed for n2's name that is not the
        // one recorded for n2 (minted by a member gone rogue) is refused.
        let ca = cluster_tests::voter_ca(&n1_dir)?;
        let minted = ca.issue(&Identity::Node("n2".into()), &pki::new_serial())?;
        let rogue = client(Some(&minted))?;
        match ask(
            &rogue,
            &addr,
            Expect::Node("n1".into()),
            &Request::Api(ApiRequest::ClusterList),
        )
        .await?
        {
            Response::Error(e) => {
                assert!(
                    e.message.contains("not the one recorded for member 'n2'"),
                    "{}",
                    e.message
                )
            }
            other => bail!("a minted certificate got {other:?}"),
        }

        // n2's certificate speaking Raft as node 1 is refused.
        let vote = openraft::raft::VoteRequest::new(openraft::Vote::new(99, 1), None);
        let request = Request::Raft(ferry_raft::network::RaftRequest::Vote(vote));
        match ask(&endpoint, &addr, Expect::Node("n1".into()), &request).await? {
            Response::Error(e) => assert!(e.message.contains("speak for node 1"), "{}", e.message),
            other => bail!("impersonation got {other:?}"),
        }
        anyhow::Ok(())
    })?;

    // The CLI with a foreign admin certificate gets one clear line.
    let fake_dir = cluster.root().join("foreign-admin");
    let fake = ferry_agent::datadir::DataDir::new(&fake_dir);
    let other = ClusterCa::generate()?;
    fake.save_ca(&other)?;
    fake.save_credentials("admin", &other.issue(&Identity::Admin, &pki::new_serial())?)?;
    let out = std::process::Command::new(cluster_tests::ferry_bin())
        .arg("--data-dir")
        .arg(&fake_dir)
        .args(["--agent", &addr, "cluster", "list"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(one_line(err.trim()).starts_with("error:"), "{err}");

    // Still serving, and the term did not move from the forged vote.
    cluster.wait_converged(&["n1", "n2"], CONVERGE)?;
    Ok(())
}

#[test]
fn oversized_frames_and_random_packets_do_not_hurt_the_agent() -> Result<()> {
    let mut cluster = Cluster::new();
    cluster.bootstrap("n1", 3)?;
    cluster.wait_converged(&["n1"], CONVERGE)?;
    let addr = cluster.agents[0].addr()?;
    let admin = ferry_agent::datadir::DataDir::new(&cluster.agents[0].data_dir)
        .load_credentials("admin")?;

    // Random bytes straight at the UDP port, bounded.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for size in [1usize, 7, 64, 512, 1200, 1400] {
        for _ in 0..20 {
            let packet: Vec<u8> = (0..size)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            socket.send_to(&packet, &addr)?;
        }
    }

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let endpoint = client(Some(&admin))?;
        let conn = endpoint.connect(addr.parse()?, &Expect::AnyNode).await?;
        // A header announcing more than the cap; the body never comes.
        let (mut send, mut recv) = conn.open_bi().await?;
        let len = (ferry_transport::frame::MAX_FRAME as u32) + 1;
        send.write_all(&len.to_be_bytes()).await?;
        let reply: Response =
            ferry_transport::frame::read_frame(&mut recv, ferry_transport::frame::MAX_FRAME)
                .await?;
        match reply {
            Response::Error(e) => assert!(e.message.contains("exceeds"), "{}", e.message),
            other => bail!("oversized frame got {other:?}"),
        }
        // Garbage inside a well-sized frame.
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&5u32.to_be_bytes()).await?;
        send.write_all(&[0xff, 0xfe, 0xfd, 0xfc, 0xfb]).await?;
        send.finish()?;
        let reply: Response =
            ferry_transport::frame::read_frame(&mut recv, ferry_transport::frame::MAX_FRAME)
                .await?;
        assert!(
            matches!(reply, Response::Error(_)),
            "garbage frame got {reply:?}"
        );
        // The same connection still serves.
        let ok = ferry_transport::rpc::call::<_, Response>(
            &conn,
            &Request::Ping,
            Duration::from_secs(5),
        )
        .await?;
        assert!(matches!(ok, Response::Pong { .. }));
        anyhow::Ok(())
    })?;
    cluster.token(0, "after-garbage", "1h")?;
    Ok(())
}

/// The leader's last log index, from `cluster show`.
fn log_index(cluster: &Cluster) -> Result<u64> {
    let show = cluster.ferry_json(0, &["cluster", "show", "n1"])?;
    show["raft"]["last_log_index"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no raft index in {show}"))
}

/// A join with the right name and a wrong secret, from this process.
async fn bad_join(addr: &str, ca_fingerprint: &str, name: &str) -> Result<String> {
    let (csr_pem, _key) = pki::generate_csr(&Identity::Node(name.into()))?;
    let request = Request::Join(ferry_agent::api::JoinRequest {
        name: name.into(),
        secret: "not-the-secret".into(),
        addr: "127.0.0.1:9".into(),
        csr_pem: csr_pem.clone(),
        admin_csr_pem: csr_pem,
    });
    let endpoint = client(None)?;
    let expect = Expect::CaFingerprint(ca_fingerprint.into());
    match ask(&endpoint, addr, expect, &request).await? {
        Response::Error(e) => Ok(e.message),
        other => bail!("a bad join got {other:?}"),
    }
}

#[test]
fn anonymous_floods_and_failed_joins_cost_the_cluster_nothing() -> Result<()> {
    let mut cluster = Cluster::new();
    cluster.bootstrap("n1", 3)?;
    cluster.wait_converged(&["n1"], CONVERGE)?;
    let addr = cluster.agents[0].addr()?;
    let token = JoinToken::decode(&cluster.token(0, "j1", "1h")?)?;
    let runtime = tokio::runtime::Runtime::new()?;

    // The token is checked before anything is signed or proposed: a wrong
    // secret adds nothing to the log.
    wait_for("facts published", CONVERGE, || {
        let before = log_index(&cluster)?;
        let message = runtime.block_on(bad_join(&addr, &token.ca_fingerprint, "j1"))?;
        assert!(message.contains("does not match"), "{message}");
        let after = log_index(&cluster)?;
        if after != before {
            bail!("log moved {before} -> {after} (facts being published?)");
        }
        Ok(())
    })?;
    // Failed joins from one address are cut off after a few.
    let mut cut_off = None;
    for attempt in 0..10 {
        let message = runtime.block_on(bad_join(&addr, &token.ca_fingerprint, "j1"))?;
        if message.contains("too many failed joins") {
            cut_off = Some(attempt);
            break;
        }
    }
    assert!(cut_off.is_some(), "failed joins were never rate-limited");

    // A flood of anonymous connections: oversized frames, frames that
    // never finish, streams that send nothing; all held open.
    let held = runtime.block_on(async {
        let endpoint = client(None)?;
        let mut held = Vec::new();
        for i in 0..100u32 {
            let conn = endpoint
                .connect(
                    addr.parse()?,
                    &Expect::CaFingerprint(token.ca_fingerprint.clone()),
                )
                .await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            match i % 3 {
                0 => {
                    // More than an anonymous caller may send.
                    send.write_all(&(1u32 << 20).to_be_bytes()).await?;
                    let reply = ferry_transport::frame::read_frame(&mut recv, 1 << 20);
                    let reply: Response =
                        tokio::time::timeout(Duration::from_secs(5), reply).await??;
                    match reply {
                        Response::Error(e) => assert!(e.message.contains("exceeds"), "{e}"),
                        other => bail!("an oversized anonymous frame got {other:?}"),
                    }
                }
                1 => send.write_all(&100u32.to_be_bytes()).await?,
                _ => {}
            }
            held.push((conn, send, recv));
        }
        anyhow::Ok((endpoint, held))
    })?;
    // The cluster serves a write in its usual time meanwhile.
    let started = std::time::Instant::now();
    cluster.token(0, "after-flood", "1h")?;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a write took {:?} during the flood",
        started.elapsed()
    );
    drop(held);
    Ok(())
}

#[test]
fn a_removed_members_node_and_admin_certificates_are_refused_everywhere() -> Result<()> {
    let mut cluster = Cluster::new();
    cluster.bootstrap("n1", 3)?;
    cluster.join("n2", 0)?;
    cluster.join("n3", 0)?;
    cluster.wait_converged(&["n1", "n2", "n3"], CONVERGE)?;
    let n3 = ferry_agent::datadir::DataDir::new(&cluster.agents[2].data_dir);
    let (node, admin) = (n3.load_credentials("node")?, n3.load_credentials("admin")?);
    let admin_serial = pki::serial_of_pem(&admin.cert_pem)?;
    wait_for("n3's admin certificate recorded", CONVERGE, || {
        let show = cluster.ferry_json(0, &["cluster", "show", "n3"])?;
        match show["admin_certificates"].as_array() {
            Some(serials) if serials.iter().any(|s| s == admin_serial.as_str()) => Ok(()),
            _ => bail!("not yet: {show}"),
        }
    })?;
    cluster.ferry_ok(0, &["cluster", "remove", "n3"])?;
    let addr = cluster.agents[0].addr()?;

    let runtime = tokio::runtime::Runtime::new()?;
    // Held open (with the runtime) until the refusal is logged.
    let _conn = runtime.block_on(async {
        for (what, creds) in [("admin", &admin), ("node", &node)] {
            let endpoint = client(Some(creds))?;
            let reply = ask(
                &endpoint,
                &addr,
                Expect::AnyNode,
                &Request::Api(ApiRequest::ClusterList),
            )
            .await;
            match reply {
                Ok(Response::Error(e)) => assert!(e.message.contains("revoked"), "{what}: {e}"),
                other => bail!("n3's {what} certificate got {other:?}"),
            }
        }
        // Raft from the removed member.
        let endpoint = client(Some(&node))?;
        let vote = openraft::raft::VoteRequest::new(openraft::Vote::new(99, 3), None);
        let request = Request::Raft(ferry_raft::network::RaftRequest::Vote(vote));
        match ask(&endpoint, &addr, Expect::AnyNode, &request).await? {
            Response::Error(e) => assert!(e.message.contains("revoked"), "{e}"),
            other => bail!("raft from a removed member got {other:?}"),
        }
        // Gossip from the removed member.
        let conn = endpoint.connect(addr.parse()?, &Expect::AnyNode).await?;
        for _ in 0..20 {
            conn.send_datagram(bytes::Bytes::from_static(b"still here"))?;
        }
        anyhow::Ok(conn)
    })?;
    wait_for("n3's gossip refused", CONVERGE, || {
        let log = std::fs::read_to_string(cluster.agents[0].log_path())?;
        if log.contains("certificate revoked (member removed)") {
            Ok(())
        } else {
            bail!("no refusal logged yet")
        }
    })?;
    // The rest of the cluster still commits.
    cluster.token(0, "after-removal", "1h")?;
    Ok(())
}
