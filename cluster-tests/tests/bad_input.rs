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
    let out = std::process::Command::new(cluster_tests::ferry_bin())
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
        .output()?;
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
