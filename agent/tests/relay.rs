//! A relay over a real QUIC connection hands over everything it read,
//! even when it is the connection's last user: dropping the last user
//! closes the connection, and QUIC drops what it still held.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use ferry_agent::transfer::relay::{splice, Tap};
use ferry_transport::endpoint::{Endpoint, Expect};
use ferry_transport::pki::{new_serial, ClusterCa, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SENT: usize = 32 << 20;

/// The peer answers at once (as CRIU's page server acknowledges its
/// sender's last command before the stream's end has arrived), then
/// reads the stream to its end: the bytes it got, or why it could not.
async fn peer(endpoint: Endpoint) -> Result<usize, String> {
    let incoming = endpoint.inner().accept().await.ok_or("no connection")?;
    let conn = incoming.await.map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    send.write_all(b"ack!").await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    let mut got = 0;
    loop {
        match recv.read_chunk(1 << 20, true).await {
            Ok(Some(chunk)) => got += chunk.bytes.len(),
            Ok(None) => return Ok(got),
            Err(e) => return Err(format!("after {got} bytes: {e}")),
        }
    }
}

#[tokio::test]
async fn a_relay_that_is_its_connections_last_user_delivers_every_byte() {
    let ca = ClusterCa::generate().unwrap();
    let server = ca
        .issue(&Identity::Node("target".into()), &new_serial())
        .unwrap();
    let server = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &server).unwrap();
    let addr = server.local_addr().unwrap();
    let received = tokio::spawn(peer(server));
    let client = ca
        .issue(&Identity::Node("source".into()), &new_serial())
        .unwrap();
    let client = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &client).unwrap();
    let conn = client
        .connect(addr, &Expect::Node("target".into()))
        .await
        .unwrap();
    let streams = conn.open_bi().await.unwrap();
    // The streams are all that keep the connection open now.
    drop(conn);

    let (local, mut runtime) = tokio::net::UnixStream::pair().unwrap();
    let runtime_side = async {
        runtime.write_all(&vec![7u8; SENT]).await.unwrap();
        runtime.shutdown().await.unwrap();
        let mut answer = Vec::new();
        runtime.read_to_end(&mut answer).await.unwrap();
        answer
    };
    let relayed = async {
        let passed = splice(local, streams, Tap::default(), Tap::checksummed(None)).await;
        // The relay's end: its streams go, and the connection with them.
        passed.unwrap()
    };
    let (answer, (inbound, outbound)) = tokio::join!(runtime_side, relayed);
    assert_eq!(answer, b"ack!");
    assert_eq!((inbound.bytes, outbound.bytes), (4, SENT as u64));
    let got = tokio::time::timeout(Duration::from_secs(30), received)
        .await
        .expect("the peer finished in time")
        .unwrap();
    assert_eq!(got, Ok(SENT));
}
