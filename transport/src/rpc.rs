use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use quinn::{ConnectionError, VarInt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::endpoint::{peer_cert, Endpoint, Expect, TlsRejection, TransportError};
use crate::frame::{
    encode_frame, read_frame, write_encoded, write_frame, FrameError, StreamError, MAX_FRAME,
};
use crate::pki::PeerCert;

/// Sent with STOP_SENDING when we give up reading a bad request.
const BAD_FRAME_CODE: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("could not connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: TransportError,
    },
    #[error("TLS with {addr} failed: {rejection}")]
    Rejected {
        addr: SocketAddr,
        rejection: TlsRejection,
    },
    #[error(
        "connection to {addr} was lost: {source}; the peer may have restarted or be unreachable"
    )]
    ConnectionLost {
        addr: SocketAddr,
        #[source]
        source: ConnectionError,
    },
    #[error(
        "request to {addr} timed out after {after:?}; the peer may be overloaded or unreachable"
    )]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("request to {addr} failed: {source}")]
    Frame {
        addr: SocketAddr,
        #[source]
        source: FrameError,
    },
}

impl RpcError {
    fn from_connection(addr: SocketAddr, source: ConnectionError) -> RpcError {
        match TlsRejection::from_connection_error(&source) {
            Some(rejection) => RpcError::Rejected { addr, rejection },
            None => RpcError::ConnectionLost { addr, source },
        }
    }

    fn from_frame(addr: SocketAddr, source: FrameError) -> RpcError {
        match source.connection_error() {
            Some(e) => RpcError::from_connection(addr, e.clone()),
            None => RpcError::Frame { addr, source },
        }
    }

    fn from_transport(addr: SocketAddr, source: TransportError) -> RpcError {
        match source {
            TransportError::Rejected { addr, rejection } => RpcError::Rejected { addr, rejection },
            source => RpcError::Connect { addr, source },
        }
    }

    /// The connection as a whole failed (not just this request), so a new
    /// connection may succeed where this one cannot.
    fn is_connection_lost(&self) -> bool {
        matches!(self, RpcError::ConnectionLost { .. })
    }
}

/// The caller of a request, as the server sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    /// `None` for an anonymous client (a joiner).
    pub cert: Option<PeerCert>,
}

/// Server side of RPC, implemented by the agent.
pub trait Service: Send + Sync + 'static {
    type Request: DeserializeOwned + Send + 'static;
    type Response: Serialize + Send + 'static;

    fn handle(
        &self,
        peer: Arc<Peer>,
        request: Self::Request,
    ) -> impl Future<Output = Self::Response> + Send;

    /// Response sent when the request frame could not be read (too large,
    /// malformed); the stream is then closed.
    fn bad_frame(&self, error: &FrameError) -> Self::Response;

    /// Whether `request` opens a long-lived channel (the rest of the
    /// bi-stream belongs to [`Service::handle_stream`]) instead of getting
    /// one response. Bulk transfers use this; everything else is RPC.
    fn wants_stream(&self, _request: &Self::Request) -> bool {
        false
    }

    /// Serve a channel opened by a request for which `wants_stream` is true.
    fn handle_stream(
        &self,
        _peer: Arc<Peer>,
        _request: Self::Request,
        _send: quinn::SendStream,
        _recv: quinn::RecvStream,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The largest request frame this peer may send. A caller without a
    /// certificate (a joiner) gets less: it may only ask to join.
    fn frame_cap(&self, _peer: &Peer) -> usize {
        MAX_FRAME
    }

    /// Whether this service reads unreliable datagrams (gossip) from its
    /// peers' connections.
    fn wants_datagrams(&self) -> bool {
        false
    }

    /// One datagram from `peer`. Called on the connection's reader task:
    /// hand the data on (e.g. into a bounded channel), never block.
    fn handle_datagram(&self, _peer: &Arc<Peer>, _data: bytes::Bytes) {}
}

/// A request's first frame must arrive within this.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshake failures are logged at warn once per remote address: a
/// stranger (another cluster, a scanner) retrying must not flood the log.
#[derive(Default)]
struct HandshakeLog {
    seen: Mutex<std::collections::HashSet<SocketAddr>>,
}

/// Past this many remembered addresses every further failure is debug only.
const HANDSHAKE_LOG_MAX: usize = 4096;

impl HandshakeLog {
    fn failed(&self, addr: SocketAddr, reason: &str) {
        let first = {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            seen.len() < HANDSHAKE_LOG_MAX && seen.insert(addr)
        };
        if first {
            warn!(peer = %addr, "handshake failed: {reason} (further failures from this address are logged at debug level)");
        } else {
            debug!(peer = %addr, "handshake failed: {reason}");
        }
    }
}

/// Accept connections until the endpoint is closed. Each connection and each
/// bi-stream (one request/response) runs in its own task, so one slow or
/// hostile peer cannot stall others.
pub async fn serve<S: Service>(endpoint: Endpoint, service: Arc<S>) {
    let handshakes = Arc::new(HandshakeLog::default());
    while let Some(incoming) = endpoint.inner().accept().await {
        tokio::spawn(serve_connection(
            incoming,
            service.clone(),
            handshakes.clone(),
        ));
    }
}

/// At most one warning per connection: a misbehaving peer must not be able
/// to flood the log.
struct ConnLog {
    addr: SocketAddr,
    warned: AtomicBool,
}

impl ConnLog {
    fn error(&self, what: &str, error: &dyn std::fmt::Display) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            warn!(peer = %self.addr, "{what}: {error} (further errors on this connection are logged at debug level)");
        } else {
            debug!(peer = %self.addr, "{what}: {error}");
        }
    }
}

async fn serve_connection<S: Service>(
    incoming: quinn::Incoming,
    service: Arc<S>,
    handshakes: Arc<HandshakeLog>,
) {
    let log = Arc::new(ConnLog {
        addr: incoming.remote_address(),
        warned: AtomicBool::new(false),
    });
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            let reason = match TlsRejection::from_connection_error(&e) {
                Some(rejection) => rejection.to_string(),
                None => e.to_string(),
            };
            handshakes.failed(log.addr, &reason);
            return;
        }
    };
    let peer = Arc::new(Peer {
        addr: conn.remote_address(),
        cert: peer_cert(&conn),
    });
    if service.wants_datagrams() {
        tokio::spawn(read_datagrams(conn.clone(), peer.clone(), service.clone()));
    }
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(
                    send,
                    recv,
                    peer.clone(),
                    service.clone(),
                    log.clone(),
                ));
            }
            Err(
                ConnectionError::ApplicationClosed(_)
                | ConnectionError::LocallyClosed
                | ConnectionError::TimedOut
                | ConnectionError::Reset,
            ) => return,
            Err(e) => {
                log.error("connection failed", &e);
                return;
            }
        }
    }
}

async fn read_datagrams<S: Service>(conn: quinn::Connection, peer: Arc<Peer>, service: Arc<S>) {
    // Ends with the connection; its close is reported by the stream loop.
    while let Ok(data) = conn.read_datagram().await {
        service.handle_datagram(&peer, data);
    }
}

async fn serve_stream<S: Service>(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: Arc<Peer>,
    service: Arc<S>,
    log: Arc<ConnLog>,
) {
    let cap = service.frame_cap(&peer);
    let first = tokio::time::timeout(
        REQUEST_READ_TIMEOUT,
        read_frame::<S::Request>(&mut recv, cap),
    );
    let Ok(first) = first.await else {
        // A peer that opens a stream and sends nothing holds no task long.
        debug!(peer = %peer.addr, "no request within {REQUEST_READ_TIMEOUT:?}; stream dropped");
        let _ = recv.stop(VarInt::from_u32(BAD_FRAME_CODE));
        return;
    };
    let response = match first {
        Ok(request) if service.wants_stream(&request) => {
            service.handle_stream(peer, request, send, recv).await;
            return;
        }
        Ok(request) => service.handle(peer, request).await,
        Err(e @ (FrameError::TooLarge { .. } | FrameError::Malformed(_))) => {
            log.error("bad request frame", &e);
            // Do not make the peer push (or us buffer) the rest of a body
            // we have already refused.
            let _ = recv.stop(VarInt::from_u32(BAD_FRAME_CODE));
            service.bad_frame(&e)
        }
        Err(e) => {
            log.error("reading request failed", &e);
            return;
        }
    };
    let encoded = match encode_frame(&response) {
        Ok(encoded) => encoded,
        Err(e) => {
            log.error("encoding response failed", &e);
            return;
        }
    };
    drop(response);
    if let Err(e) = write_encoded(&mut send, &encoded).await {
        log.error("writing response failed", &e);
        return;
    }
    if let Err(e) = send.finish() {
        log.error(
            "finishing response failed",
            &FrameError::Io(StreamError::Finish(e)),
        );
    }
}

/// One request/response over a new bi-stream; `timeout` covers the whole
/// exchange.
pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
    conn: &quinn::Connection,
    request: &Req,
    timeout: Duration,
) -> Result<Resp, RpcError> {
    let addr = conn.remote_address();
    match tokio::time::timeout(timeout, exchange(conn, request)).await {
        Ok(result) => result,
        Err(_) => Err(RpcError::Timeout {
            addr,
            after: timeout,
        }),
    }
}

async fn exchange<Req: Serialize, Resp: DeserializeOwned>(
    conn: &quinn::Connection,
    request: &Req,
) -> Result<Resp, RpcError> {
    let addr = conn.remote_address();
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| RpcError::from_connection(addr, e))?;
    write_frame(&mut send, request)
        .await
        .map_err(|e| RpcError::from_frame(addr, e))?;
    send.finish()
        .map_err(|e| RpcError::from_frame(addr, FrameError::Io(StreamError::Finish(e))))?;
    read_frame(&mut recv, MAX_FRAME)
        .await
        .map_err(|e| RpcError::from_frame(addr, e))
}

type PoolKey = (SocketAddr, Expect);

#[derive(Debug, thiserror::Error)]
pub enum DatagramError {
    #[error("no connection to {addr} yet; it is being made and the datagram goes out with it")]
    Connecting { addr: SocketAddr },
    #[error("datagram to {addr} not sent: {source}")]
    Send {
        addr: SocketAddr,
        #[source]
        source: quinn::SendDatagramError,
    },
}

/// Connections reused per (address, expected server).
#[derive(Clone, Debug)]
pub struct Pool {
    endpoint: Endpoint,
    conns: Arc<Mutex<HashMap<PoolKey, quinn::Connection>>>,
    /// Peers a background connect (for a datagram) is under way to.
    connecting: Arc<Mutex<std::collections::HashSet<PoolKey>>>,
}

impl Pool {
    pub fn new(endpoint: Endpoint) -> Pool {
        Pool {
            endpoint,
            conns: Arc::new(Mutex::new(HashMap::new())),
            connecting: Arc::new(Mutex::new(std::collections::HashSet::new())),
        }
    }

    /// Send an unreliable datagram on the pooled connection, never waiting:
    /// without a connection one is made in the background (one attempt per
    /// peer at a time) and `data` is sent once it is up. Loss is the
    /// caller's business (SWIM is built for it).
    pub fn send_datagram(
        &self,
        addr: SocketAddr,
        expect: &Expect,
        data: bytes::Bytes,
    ) -> Result<(), DatagramError> {
        let key = (addr, expect.clone());
        let Some(conn) = self.cached(&key) else {
            self.connect_in_background(key, data);
            return Err(DatagramError::Connecting { addr });
        };
        conn.send_datagram(data).map_err(|source| {
            if matches!(source, quinn::SendDatagramError::ConnectionLost(_)) {
                self.forget(&key, &conn);
            }
            DatagramError::Send { addr, source }
        })
    }

    fn connect_in_background(&self, key: PoolKey, first: bytes::Bytes) {
        let fresh = self
            .connecting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone());
        if !fresh {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            let result = pool.connect(&key).await;
            pool.connecting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&key);
            match result {
                Ok(conn) => {
                    if let Err(e) = conn.send_datagram(first) {
                        debug!(peer = %key.0, "first datagram not sent: {e}");
                    }
                }
                Err(e) => debug!(peer = %key.0, "connecting for datagrams failed: {e}"),
            }
        });
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// One request/response on a pooled connection. If a reused connection
    /// turns out to be dead, it is dropped and the call is retried once on a
    /// fresh one, so a restarted peer is reached again. `timeout` covers
    /// everything, connecting and the retry included.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        expect: &Expect,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, RpcError> {
        let deadline = Instant::now() + timeout;
        let key = (addr, expect.clone());
        let attempt = async {
            let (conn, reused) = match self.cached(&key) {
                Some(conn) => (conn, true),
                None => (self.connect(&key).await?, false),
            };
            match exchange(&conn, request).await {
                Err(e) if e.is_connection_lost() => {
                    self.forget(&key, &conn);
                    if !reused {
                        return Err(e);
                    }
                    debug!(peer = %addr, "pooled connection was dead ({e}); reconnecting once");
                    let conn = self.connect(&key).await?;
                    let result = exchange(&conn, request).await;
                    if matches!(&result, Err(e) if e.is_connection_lost()) {
                        self.forget(&key, &conn);
                    }
                    result
                }
                result => result,
            }
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(result) => result,
            Err(_) => {
                // A peer killed and restarted answers nothing on the old
                // connection until QUIC's idle timeout (5 s) ends it: meet
                // the next call with a fresh connection instead.
                if let Some(conn) = self.cached(&key) {
                    self.forget(&key, &conn);
                }
                Err(RpcError::Timeout {
                    addr,
                    after: timeout,
                })
            }
        }
    }

    /// [`Pool::call`] for requests that may be sent twice (Raft's): an
    /// open connection gets only `answer` to answer before it is dropped
    /// as dead and the request goes again on a fresh one, which gets all
    /// of `timeout` (a first handshake on a busy host). A killed and
    /// restarted peer answers nothing on the old connection until QUIC's
    /// idle timeout; the leader must reach it before it campaigns.
    pub async fn call_retrying<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        expect: &Expect,
        request: &Req,
        answer: Duration,
        timeout: Duration,
    ) -> Result<Resp, RpcError> {
        let key = (addr, expect.clone());
        if let Some(conn) = self.cached(&key) {
            match tokio::time::timeout(answer, exchange(&conn, request)).await {
                Ok(Err(e)) if !e.is_connection_lost() => return Err(e),
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(_)) | Err(_) => {
                    debug!(peer = %addr, "no answer on the pooled connection; reconnecting");
                    self.forget(&key, &conn);
                }
            }
        }
        self.call(addr, expect, request, timeout).await
    }

    /// Open a channel: a bi-stream on the pooled connection whose first
    /// frame is `request`; the caller then owns both halves. The peer's
    /// service must answer `wants_stream` for that request.
    pub async fn open_stream<Req: Serialize>(
        &self,
        addr: SocketAddr,
        expect: &Expect,
        request: &Req,
        timeout: Duration,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), RpcError> {
        let attempt = async {
            let key = (addr, expect.clone());
            let conn = match self.cached(&key) {
                Some(conn) => conn,
                None => self.connect(&key).await?,
            };
            let (mut send, recv) = match conn.open_bi().await {
                Ok(pair) => pair,
                Err(e) => {
                    self.forget(&key, &conn);
                    return Err(RpcError::from_connection(addr, e));
                }
            };
            write_frame(&mut send, request)
                .await
                .map_err(|e| RpcError::from_frame(addr, e))?;
            Ok((send, recv))
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(RpcError::Timeout {
                addr,
                after: timeout,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, quinn::Connection>> {
        // The map holds no invariant a panicking holder could break.
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cached(&self, key: &PoolKey) -> Option<quinn::Connection> {
        let mut conns = self.lock();
        match conns.get(key) {
            Some(conn) if conn.close_reason().is_none() => Some(conn.clone()),
            Some(_) => {
                conns.remove(key);
                None
            }
            None => None,
        }
    }

    async fn connect(&self, key: &PoolKey) -> Result<quinn::Connection, RpcError> {
        let conn = self
            .endpoint
            .connect(key.0, &key.1)
            .await
            .map_err(|e| RpcError::from_transport(key.0, e))?;
        let mut conns = self.lock();
        // Keep the map from growing with addresses of departed peers.
        conns.retain(|_, c| c.close_reason().is_none());
        // A concurrent caller may have connected first; keep one connection.
        if let Some(existing) = conns.get(key) {
            conn.close(VarInt::from_u32(0), b"duplicate connection");
            return Ok(existing.clone());
        }
        conns.insert(key.clone(), conn.clone());
        Ok(conn)
    }

    fn forget(&self, key: &PoolKey, conn: &quinn::Connection) {
        let mut conns = self.lock();
        if conns
            .get(key)
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            conns.remove(key);
        }
    }
}
