//! Real QUIC on 127.0.0.1 between endpoints built from real certificates.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_transport::endpoint::{Endpoint, Expect, TlsRejection, TransportError};
use ferry_transport::frame::{read_frame, FrameError, MAX_FRAME};
use ferry_transport::pki::{new_serial, ClusterCa, Credentials, Identity};
use ferry_transport::rpc::{call, serve, DatagramError, Peer, Pool, RpcError, Service};
use serde::{Deserialize, Serialize};

const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Reply {
    Echo {
        text: String,
        identity: Option<String>,
        serial: Option<String>,
    },
    Bad(String),
}

#[derive(Default)]
struct Echo {
    calls: AtomicUsize,
    /// A "hang-once" request hung already.
    hung: std::sync::atomic::AtomicBool,
    peers: Mutex<Vec<Arc<Peer>>>,
    /// (sender identity, payload) of every datagram received.
    datagrams: Mutex<Vec<(Option<String>, Vec<u8>)>>,
}

impl Echo {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Each connection gets its own `Arc<Peer>`, so distinct pointers count
    /// distinct connections.
    fn connections(&self) -> usize {
        let peers = self.peers.lock().unwrap();
        let mut distinct: Vec<&Arc<Peer>> = Vec::new();
        for p in peers.iter() {
            if !distinct.iter().any(|d| Arc::ptr_eq(d, p)) {
                distinct.push(p);
            }
        }
        distinct.len()
    }
}

impl Service for Echo {
    type Request = String;
    type Response = Reply;

    async fn handle(&self, peer: Arc<Peer>, request: String) -> Reply {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.peers.lock().unwrap().push(peer.clone());
        let first_hang = request == "hang-once" && !self.hung.swap(true, Ordering::SeqCst);
        if request == "hang" || first_hang {
            // A peer that stopped answering (killed, not closed).
            std::future::pending::<()>().await;
        }
        Reply::Echo {
            text: request,
            identity: peer.cert.as_ref().map(|c| format!("{:?}", c.identity)),
            serial: peer.cert.as_ref().map(|c| c.serial.clone()),
        }
    }

    fn bad_frame(&self, error: &FrameError) -> Reply {
        Reply::Bad(format!("{error:?}"))
    }

    fn wants_stream(&self, request: &String) -> bool {
        request == "channel"
    }

    /// Echo every frame back, upper-cased, until the peer finishes.
    async fn handle_stream(
        &self,
        _peer: Arc<Peer>,
        _request: String,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        while let Ok(text) = read_frame::<String>(&mut recv, MAX_FRAME).await {
            if ferry_transport::frame::write_frame(&mut send, &text.to_uppercase())
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = send.finish();
    }

    fn wants_datagrams(&self) -> bool {
        true
    }

    fn handle_datagram(&self, peer: &Arc<Peer>, data: bytes::Bytes) {
        let identity = peer.cert.as_ref().map(|c| format!("{:?}", c.identity));
        self.datagrams
            .lock()
            .unwrap()
            .push((identity, data.to_vec()));
    }
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

struct Server {
    endpoint: Endpoint,
    addr: SocketAddr,
    service: Arc<Echo>,
    task: tokio::task::JoinHandle<()>,
}

fn start(creds: &Credentials, addr: SocketAddr) -> Server {
    let endpoint = Endpoint::bind(addr, creds).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let service = Arc::new(Echo::default());
    let task = tokio::spawn(serve(endpoint.clone(), service.clone()));
    Server {
        endpoint,
        addr,
        service,
        task,
    }
}

fn node(ca: &ClusterCa, name: &str) -> (Credentials, String) {
    let serial = new_serial();
    (
        ca.issue(&Identity::Node(name.into()), &serial).unwrap(),
        serial,
    )
}

#[tokio::test]
async fn node_calls_node_and_pool_reuses_the_connection() {
    let ca = ClusterCa::generate().unwrap();
    let (a_creds, _) = node(&ca, "a");
    let (b_creds, b_serial) = node(&ca, "b");
    let a = start(&a_creds, localhost());
    let b = Endpoint::bind(localhost(), &b_creds).unwrap();
    let pool = Pool::new(b.clone());

    for text in ["one", "two", "three"] {
        let reply: Reply = pool
            .call(
                a.addr,
                &Expect::Node("a".into()),
                &text.to_string(),
                TIMEOUT,
            )
            .await
            .unwrap();
        assert_eq!(
            reply,
            Reply::Echo {
                text: text.into(),
                identity: Some(format!("{:?}", Identity::Node("b".into()))),
                serial: Some(b_serial.clone()),
            }
        );
    }
    assert_eq!(a.service.calls(), 3);
    assert_eq!(a.service.connections(), 1);
}

/// Node "a" serving, and node "b"'s pool with what to expect of "a".
fn server_and_client_pool() -> (Server, Pool, Expect) {
    let ca = ClusterCa::generate().unwrap();
    let (a_creds, _) = node(&ca, "a");
    let (b_creds, _) = node(&ca, "b");
    let a = start(&a_creds, localhost());
    let pool = Pool::new(Endpoint::client(localhost(), Some(&b_creds)).unwrap());
    (a, pool, Expect::Node("a".into()))
}

#[tokio::test]
async fn a_call_that_times_out_leaves_the_next_one_a_fresh_connection() {
    let (a, pool, expect) = server_and_client_pool();
    let call = |text: &str| {
        let text = text.to_string();
        let (pool, expect) = (pool.clone(), expect.clone());
        async move {
            pool.call::<String, Reply>(a.addr, &expect, &text, Duration::from_millis(300))
                .await
        }
    };
    call("first").await.unwrap();
    assert!(matches!(call("hang").await, Err(RpcError::Timeout { .. })));
    call("after").await.unwrap();
    // A killed and restarted peer never answers on the old connection.
    assert_eq!(a.service.connections(), 2);
}

#[tokio::test]
async fn a_retried_call_goes_again_on_a_fresh_connection_when_the_open_one_does_not_answer() {
    let (a, pool, expect) = server_and_client_pool();
    let _: Reply = pool
        .call(a.addr, &expect, &"first".to_string(), TIMEOUT)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let reply: Reply = pool
        .call_retrying(
            a.addr,
            &expect,
            &"hang-once".to_string(),
            Duration::from_millis(200),
            TIMEOUT,
        )
        .await
        .unwrap();
    assert!(matches!(reply, Reply::Echo { ref text, .. } if text == "hang-once"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(a.service.connections(), 2);
}

#[tokio::test]
async fn pool_reconnects_after_the_server_restarts_on_the_same_port() {
    let ca = ClusterCa::generate().unwrap();
    let (a_creds, _) = node(&ca, "a");
    let (b_creds, _) = node(&ca, "b");
    let first = start(&a_creds, localhost());
    let addr = first.addr;
    let pool = Pool::new(Endpoint::client(localhost(), Some(&b_creds)).unwrap());
    let expect = Expect::Node("a".into());

    let _: Reply = pool
        .call(addr, &expect, &"before".to_string(), TIMEOUT)
        .await
        .unwrap();
    first.endpoint.close();
    first.endpoint.wait_idle().await;
    first.task.await.unwrap();
    drop(first.endpoint);

    // The old socket is released by quinn's driver task shortly after the
    // last handle goes; poll for it rather than sleeping a fixed time.
    let mut second = None;
    for _ in 0..200 {
        match Endpoint::bind(addr, &a_creds) {
            Ok(endpoint) => {
                let service = Arc::new(Echo::default());
                let task = tokio::spawn(serve(endpoint.clone(), service.clone()));
                second = Some(Server {
                    endpoint,
                    addr,
                    service,
                    task,
                });
                break;
            }
            Err(TransportError::Bind { .. }) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let second = second.expect("port was not released");

    let reply: Reply = pool
        .call(addr, &expect, &"after".to_string(), TIMEOUT)
        .await
        .unwrap();
    assert!(matches!(reply, Reply::Echo { ref text, .. } if text == "after"));
    assert_eq!(second.service.calls(), 1);
    second.task.abort();
}

#[tokio::test]
async fn expecting_another_node_name_fails_the_handshake() {
    let ca = ClusterCa::generate().unwrap();
    let (a_creds, _) = node(&ca, "a");
    let (b_creds, _) = node(&ca, "b");
    let a = start(&a_creds, localhost());
    let b = Endpoint::client(localhost(), Some(&b_creds)).unwrap();

    let err = b
        .connect(a.addr, &Expect::Node("b".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Rejected {
                rejection: TlsRejection::ByUs { .. },
                ..
            }
        ),
        "{err}"
    );
    let err = Pool::new(b)
        .call::<_, Reply>(a.addr, &Expect::Node("b".into()), &"x".to_string(), TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Rejected { .. }), "{err}");
    assert_eq!(a.service.calls(), 0);
}

#[tokio::test]
async fn expecting_a_members_recorded_certificate_refuses_another_with_its_name() {
    let ca = ClusterCa::generate().unwrap();
    let (a_creds, a_serial) = node(&ca, "a");
    let (b_creds, _) = node(&ca, "b");
    let a = start(&a_creds, localhost());
    let pool = Pool::new(Endpoint::client(localhost(), Some(&b_creds)).unwrap());
    let recorded = Expect::Member {
        name: "a".into(),
        serial: a_serial,
    };
    let reply = pool
        .call::<_, Reply>(a.addr, &recorded, &"x".to_string(), TIMEOUT)
        .await
        .unwrap();
    assert!(matches!(reply, Reply::Echo { .. }));
    // A certificate the same CA signed for "a" later is not a's.
    let other = Expect::Member {
        name: "a".into(),
        serial: new_serial(),
    };
    let err = pool
        .call::<_, Reply>(a.addr, &other, &"x".to_string(), TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Rejected { .. }), "{err}");
    assert!(err.to_string().contains("not the one recorded"), "{err}");
    assert_eq!(a.service.calls(), 1);
}

/// Node a, and a client with a node certificate of another cluster that
/// trusts a's CA by fingerprint, so that only a can refuse it.
fn server_and_intruder() -> (Server, Endpoint, Expect) {
    let ca = ClusterCa::generate().unwrap();
    let other_ca = ClusterCa::generate().unwrap();
    let (a_creds, _) = node(&ca, "a");
    let (intruder, _) = node(&other_ca, "b");
    let a = start(&a_creds, localhost());
    let client = Endpoint::client(localhost(), Some(&intruder)).unwrap();
    (a, client, Expect::CaFingerprint(ca.fingerprint()))
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_rejected_on_the_first_stream() {
    let (a, client, expect) = server_and_intruder();

    let result = match client.connect(a.addr, &expect).await {
        Ok(conn) => call::<_, Reply>(&conn, &"hello".to_string(), TIMEOUT).await,
        Err(e) => panic!("handshake should complete client-side under TLS 1.3, got {e}"),
    };
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            RpcError::Rejected {
                rejection: TlsRejection::ByPeer { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("the peer rejected our certificate"),
        "{err}"
    );
    assert_eq!(a.service.calls(), 0);
}

#[tokio::test]
async fn anonymous_client_connects_and_server_sees_no_certificate() {
    let ca = ClusterCa::generate().unwrap();
    let (a_creds, _) = node(&ca, "a");
    let a = start(&a_creds, localhost());
    let joiner = Endpoint::client(localhost(), None).unwrap();
    let conn = joiner
        .connect(a.addr, &Expect::CaFingerprint(ca.fingerprint()))
        .await
        .unwrap();
    let reply: Reply = call(&conn, &"join".to_string(), TIMEOUT).await.unwrap();
    assert_eq!(
        reply,
        Reply::Echo {
            text: "join".into(),
            identity: None,
            serial: None
        }
    );
    assert_eq!(a.service.peers.lock().unwrap()[0].cert, None);
}

#[tokio::test]
async fn wrong_ca_fingerprint_fails_before_any_request_is_sent() {
    let ca = ClusterCa::generate().unwrap();
    let other_ca = ClusterCa::generate().unwrap();
    let (a_creds, _) = node(&ca, "a");
    let a = start(&a_creds, localhost());
    let joiner = Pool::new(Endpoint::client(localhost(), None).unwrap());

    let err = joiner
        .call::<_, Reply>(
            a.addr,
            &Expect::CaFingerprint(other_ca.fingerprint()),
            &"secret token".to_string(),
            TIMEOUT,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Rejected { .. }), "{err}");
    assert!(err.to_string().contains("fingerprint"), "{err}");
    assert_eq!(a.service.calls(), 0);
}

#[tokio::test]
async fn admin_reaches_any_node_and_is_seen_as_admin() {
    let ca = ClusterCa::generate().unwrap();
    let (a_creds, _) = node(&ca, "a");
    let admin_serial = new_serial();
    let admin = ca.issue(&Identity::Admin, &admin_serial).unwrap();
    let a = start(&a_creds, localhost());
    let cli = Endpoint::client(localhost(), Some(&admin)).unwrap();
    let conn = cli.connect(a.addr, &Expect::AnyNode).await.unwrap();
    let reply: Reply = call(&conn, &"status".to_string(), TIMEOUT).await.unwrap();
    assert_eq!(
        reply,
        Reply::Echo {
            text: "status".into(),
            identity: Some(format!("{:?}", Identity::Admin)),
            serial: Some(admin_serial),
        }
    );
}

#[tokio::test]
async fn admin_certificate_cannot_serve() {
    let ca = ClusterCa::generate().unwrap();
    let admin = ca.issue(&Identity::Admin, &new_serial()).unwrap();
    let err = Endpoint::bind(localhost(), &admin).unwrap_err();
    assert!(matches!(err, TransportError::NotANode { .. }), "{err}");
}

async fn raw_request(conn: &quinn::Connection, bytes: &[u8]) -> Reply {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    tokio::time::timeout(TIMEOUT, read_frame(&mut recv, MAX_FRAME))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn oversized_frame_gets_bad_frame_reply_and_connection_keeps_serving() {
    let ca = ClusterCa::generate().unwrap();
    let (a_creds, _) = node(&ca, "a");
    let (b_creds, _) = node(&ca, "b");
    let a = start(&a_creds, localhost());
    let b = Endpoint::client(localhost(), Some(&b_creds)).unwrap();
    let conn = b.connect(a.addr, &Expect::Node("a".into())).await.unwrap();

    let header = u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes();
    let reply = raw_request(&conn, &header).await;
    assert!(
        matches!(&reply, Reply::Bad(e) if e.contains("TooLarge")),
        "{reply:?}"
    );

    let mut garbage = 3u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
    let reply = raw_request(&conn, &garbage).await;
    assert!(
        matches!(&reply, Reply::Bad(e) if e.contains("Malformed")),
        "{reply:?}"
    );

    let reply: Reply = call(&conn, &"still here".to_string(), TIMEOUT)
        .await
        .unwrap();
    assert!(matches!(reply, Reply::Echo { ref text, .. } if text == "still here"));
    assert_eq!(a.service.calls(), 1);
}

#[tokio::test]
async fn timeout_names_the_address_and_duration() {
    struct Stall;
    impl Service for Stall {
        type Request = String;
        type Response = String;
        async fn handle(&self, _: Arc<Peer>, _: String) -> String {
            std::future::pending().await
        }
        fn bad_frame(&self, _: &FrameError) -> String {
            String::new()
        }
    }
    let ca = ClusterCa::generate().unwrap();
    let (a_creds, _) = node(&ca, "a");
    let (b_creds, _) = node(&ca, "b");
    let server = Endpoint::bind(localhost(), &a_creds).unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(serve(server, Arc::new(Stall)));
    let pool = Pool::new(Endpoint::client(localhost(), Some(&b_creds)).unwrap());
    let err = pool
        .call::<_, String>(
            addr,
            &Expect::AnyNode,
            &"x".to_string(),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Timeout { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&addr.to_string()) && text.contains("200ms"),
        "{text}"
    );
}

#[tokio::test]
async fn a_channel_carries_many_frames_both_ways_beside_rpc() {
    let ca = ClusterCa::generate().unwrap();
    let (a_creds, _) = node(&ca, "a");
    let (b_creds, _) = node(&ca, "b");
    let a = start(&a_creds, localhost());
    let pool = Pool::new(Endpoint::bind(localhost(), &b_creds).unwrap());
    let expect = Expect::Node("a".into());
    let (mut send, mut recv) = pool
        .open_stream(a.addr, &expect, &"channel".to_string(), TIMEOUT)
        .await
        .unwrap();
    for word in ["state", "filesystem", "control"] {
        ferry_transport::frame::write_frame(&mut send, &word.to_string())
            .await
            .unwrap();
        let back: String = read_frame(&mut recv, MAX_FRAME).await.unwrap();
        assert_eq!(back, word.to_uppercase());
        // Plain RPC keeps working on the same connection meanwhile.
        let reply: Reply = pool
            .call(a.addr, &expect, &word.to_string(), TIMEOUT)
            .await
            .unwrap();
        assert!(matches!(reply, Reply::Echo { .. }));
    }
    send.finish().unwrap();
    assert!(read_frame::<String>(&mut recv, MAX_FRAME).await.is_err());
    assert_eq!(a.service.calls(), 3, "the channel request is not an RPC");
}

async fn wait_datagrams(service: &Echo, count: usize) -> Vec<(Option<String>, Vec<u8>)> {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            let got = service.datagrams.lock().unwrap().clone();
            if got.len() >= count {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("datagrams did not arrive in time")
}

#[tokio::test]
async fn datagrams_from_a_member_reach_the_service_with_its_identity() {
    let ca = ClusterCa::generate().unwrap();
    let (a_creds, _) = node(&ca, "a");
    let (b_creds, _) = node(&ca, "b");
    let a = start(&a_creds, localhost());
    let b = Endpoint::bind(localhost(), &b_creds).unwrap();
    let pool = Pool::new(b.clone());
    let expect = Expect::Node("a".into());

    // No connection yet: made in the background, the datagram goes with it.
    let first = pool.send_datagram(a.addr, &expect, bytes::Bytes::from_static(b"one"));
    assert!(
        matches!(first, Err(DatagramError::Connecting { .. })),
        "{first:?}"
    );
    wait_datagrams(&a.service, 1).await;
    pool.send_datagram(a.addr, &expect, bytes::Bytes::from_static(b"two"))
        .unwrap();
    let got = wait_datagrams(&a.service, 2).await;
    let who = Some(format!("{:?}", Identity::Node("b".into())));
    assert_eq!(
        got,
        vec![(who.clone(), b"one".to_vec()), (who, b"two".to_vec())]
    );
    assert_eq!(a.service.calls(), 0);
}

#[tokio::test]
async fn datagrams_from_another_cluster_never_reach_the_service() {
    let (a, client, expect) = server_and_intruder();
    let conn = client
        .connect(a.addr, &expect)
        .await
        .expect("handshake completes client-side under TLS 1.3");
    for _ in 0..10 {
        let _ = conn.send_datagram(bytes::Bytes::from_static(b"gossip from elsewhere"));
    }
    // The server refuses the certificate and closes the connection.
    let reason = tokio::time::timeout(TIMEOUT, conn.closed())
        .await
        .expect("the server closes the connection");
    assert!(
        TlsRejection::from_connection_error(&reason).is_some(),
        "{reason}"
    );
    assert!(a.service.datagrams.lock().unwrap().is_empty());
}
