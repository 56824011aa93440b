use std::fmt;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    ConnectionError, EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt,
};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::RootCertStore;

use crate::pki::{
    cert_der_from_pem, validate_node_name, Credentials, Identity, PeerCert, PkiError,
};
use crate::verify::{FerryServerVerifier, Mode};

const ALPN: &[u8] = b"ferry/1";
const KEEP_ALIVE: Duration = Duration::from_secs(1);
const MAX_IDLE_MS: u32 = 5_000;
const DATAGRAM_BUFFER: usize = 1 << 20;
/// SNI for connections that accept more than one name; never checked.
const ANY_NODE_SNI: &str = "node.ferry";
const CLOSE_CODE: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid credentials: {0}")]
    Credentials(#[from] PkiError),
    #[error(
        "could not load the private key: {detail}; check the key file is an unmodified PEM key"
    )]
    PrivateKey { detail: String },
    #[error(
        "the credentials are for {found}, but an agent endpoint needs a node certificate; \
         use the node's credentials"
    )]
    NotANode { found: String },
    #[error("could not build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("could not build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the TLS configuration is unusable for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error(
        "could not bind a UDP socket on {addr}: {source}; is another process using that port?"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no tokio runtime is running; create endpoints from inside a tokio runtime")]
    NoRuntime,
    #[error("could not read the endpoint's local address: {0}")]
    LocalAddr(#[source] std::io::Error),
    #[error(
        "cannot verify the server at {addr}: this endpoint has no cluster CA; \
         connect with Expect::CaFingerprint or create the endpoint with credentials"
    )]
    NoCa { addr: SocketAddr },
    #[error("invalid CA fingerprint {0:?}: expected 64 hex digits (SHA-256)")]
    BadFingerprint(String),
    #[error("could not start a connection to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("TLS handshake with {addr} failed: {rejection}")]
    Rejected {
        addr: SocketAddr,
        rejection: TlsRejection,
    },
    #[error("connecting to {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: ConnectionError,
    },
}

/// A handshake failed on certificates: which side refused, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsRejection {
    /// Our verifier refused the peer's certificate.
    ByUs { reason: String },
    /// The peer sent a TLS alert, typically because it refused our certificate.
    ByPeer { alert: String, reason: String },
}

impl fmt::Display for TlsRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsRejection::ByUs { reason } => {
                write!(f, "we rejected the peer's certificate: {reason}")
            }
            TlsRejection::ByPeer { alert, reason } => {
                write!(
                    f,
                    "the peer rejected our certificate (TLS alert {alert}{}); \
                     check that our credentials are from this cluster's CA and not revoked",
                    if reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {reason}")
                    }
                )
            }
        }
    }
}

impl TlsRejection {
    /// QUIC carries TLS alerts as transport error codes 0x100..0x1ff.
    pub fn from_connection_error(error: &ConnectionError) -> Option<TlsRejection> {
        let alert_of = |code: quinn::TransportErrorCode| {
            let code = u64::from(code);
            (0x100..0x200)
                .contains(&code)
                .then(|| format!("{:?}", rustls::AlertDescription::from((code & 0xff) as u8)))
        };
        match error {
            ConnectionError::TransportError(e) => {
                alert_of(e.code)?;
                Some(TlsRejection::ByUs {
                    reason: e.reason.clone(),
                })
            }
            ConnectionError::ConnectionClosed(close) => Some(TlsRejection::ByPeer {
                alert: alert_of(close.error_code)?,
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            }),
            _ => None,
        }
    }
}

/// What the client requires of the server it connects to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Expect {
    /// Exactly this node name, chained to our CA.
    Node(String),
    /// Exactly this node name and certificate serial (the one the member
    /// table records for it), chained to our CA.
    Member { name: String, serial: String },
    /// Any node certificate chained to our CA.
    AnyNode,
    /// A joiner without the CA yet: the server chain must contain a CA cert
    /// whose SHA-256 (DER, hex) is this; the end-entity is then verified
    /// against that CA as any node. A mismatch fails the handshake, so the
    /// joiner never sends its secret.
    CaFingerprint(String),
}

struct ClientAuth {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

struct Shared {
    provider: Arc<CryptoProvider>,
    roots: Option<Arc<RootCertStore>>,
    client_auth: Option<ClientAuth>,
    transport: Arc<TransportConfig>,
}

/// A QUIC endpoint whose connections verify the peer against the cluster CA.
#[derive(Clone)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    shared: Arc<Shared>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("local_addr", &self.inner.local_addr().ok())
            .field("has_credentials", &self.shared.client_auth.is_some())
            .finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What one stream may have in flight unread (a move's bulk stream).
/// Not more: what is in flight when QEMU pauses a guest for its
/// switchover still has to arrive before the target can run it, and QEMU
/// does not count it in its downtime. Measured with bench-vm (512 MiB
/// guest): 16 MiB gave a freeze-to-thaw of 335-448 ms, 4 MiB 174-207 ms,
/// at the same throughput.
const STREAM_WINDOW: u32 = 4 << 20;

/// Concurrent request streams one connection may have open.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

fn transport_config() -> Arc<TransportConfig> {
    let mut config = TransportConfig::default();
    config
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(MAX_IDLE_MS))))
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER))
        // Each stream is a task on the server: a peer gets this many at once.
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_CONNECTION))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .mtu_discovery_config(Some(mtu_discovery()))
        // quinn's defaults (1.25 MB a stream, 10 MB in flight) suit 100
        // Mbit/s at 100 ms; a move's bulk stream on a fast link, with the
        // receiver's window updates late on a busy host, needs more (but
        // see STREAM_WINDOW).
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .send_window(u64::from(STREAM_WINDOW) * 4);
    Arc::new(config)
}

/// The kernel buffers of an agent's UDP socket. A move's bulk stream
/// arrives in bursts that a busy receiver reads late: with the default
/// (208 KiB) a 64 MiB container's move lost 2.5 % of its datagrams to a
/// full buffer (`UdpRcvbufErrors`), and each loss halves the sender's
/// congestion window.
const UDP_BUFFER: usize = 4 << 20;

/// Set both buffers to [`UDP_BUFFER`], past the host's `rmem_max` when
/// the agent may (root); the kernel's own size otherwise.
fn widen_buffers(socket: &UdpSocket) {
    use rustix::net::sockopt;
    let recv = sockopt::set_socket_recv_buffer_size_force(socket, UDP_BUFFER)
        .or_else(|_| sockopt::set_socket_recv_buffer_size(socket, UDP_BUFFER));
    let send = sockopt::set_socket_send_buffer_size_force(socket, UDP_BUFFER)
        .or_else(|_| sockopt::set_socket_send_buffer_size(socket, UDP_BUFFER));
    if let Err(e) = recv.and(send) {
        tracing::debug!("UDP buffers left at the kernel's size: {e}");
    }
}

/// Path MTU discovery (quinn starts at 1200 and probes). Its bound here
/// is only an upper one: quinn never probes past the payload the peer
/// says it takes (`EndpointConfig::max_udp_payload_size`, 1472 by
/// default), so paths settle at 1472-byte packets even on loopback.
/// Raising that to 8952 or 65527 was measured and made moves slower
/// (bench-move 64 MiB: 1063-1096 ms of downtime against 898-968 ms, 256
/// MiB: 1772-1991 against 1381-1659), so it stays at the default.
fn mtu_discovery() -> MtuDiscoveryConfig {
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(65527);
    mtu
}

struct Loaded {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    identity: Option<Identity>,
}

fn load(creds: &Credentials) -> Result<Loaded, TransportError> {
    let leaf = cert_der_from_pem(&creds.cert_pem, "certificate")?;
    let ca = cert_der_from_pem(&creds.ca_pem, "CA certificate")?;
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).map_err(|e| {
        TransportError::PrivateKey {
            detail: e.to_string(),
        }
    })?;
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    let identity = PeerCert::from_der(&leaf).map(|p| p.identity);
    Ok(Loaded {
        chain: vec![leaf, ca],
        key,
        roots: Arc::new(roots),
        identity,
    })
}

/// A restarted agent with the same key derives the same reset key, so it can
/// send valid stateless resets for connections of its previous run and peers
/// notice at once instead of after the idle timeout.
fn reset_key(key: &PrivateKeyDer<'_>) -> ring::hmac::Key {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"ferry stateless reset key v1\0");
    ctx.update(key.secret_der());
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, ctx.finish().as_ref())
}

fn runtime() -> Result<Arc<dyn quinn::Runtime>, TransportError> {
    quinn::default_runtime().ok_or(TransportError::NoRuntime)
}

impl Endpoint {
    /// Server+client endpoint of an agent. The server presents [node, CA].
    /// Client certificates are verified against the CA when presented; a
    /// connection without one is accepted (anonymous, for join only: the
    /// application refuses everything else to such peers).
    pub fn bind(addr: SocketAddr, creds: &Credentials) -> Result<Endpoint, TransportError> {
        let loaded = load(creds)?;
        match &loaded.identity {
            Some(Identity::Node(_)) => {}
            Some(other) => {
                return Err(TransportError::NotANode {
                    found: other.to_string(),
                })
            }
            None => {
                return Err(TransportError::NotANode {
                    found: "an unrecognized certificate".into(),
                })
            }
        }
        let provider = provider();
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(loaded.roots.clone(), provider.clone())
                .allow_unauthenticated()
                .build()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(loaded.chain.clone(), loaded.key.clone_key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        // No resumption: every connection re-presents and re-verifies its
        // certificate, so a revoked or replaced certificate takes effect.
        tls.session_storage = Arc::new(NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;
        tls.max_early_data_size = 0;

        let transport = transport_config();
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
        server.transport_config(transport.clone());

        let endpoint_config = EndpointConfig::new(Arc::new(reset_key(&loaded.key)));
        let socket =
            UdpSocket::bind(addr).map_err(|source| TransportError::Bind { addr, source })?;
        widen_buffers(&socket);
        let inner = quinn::Endpoint::new(endpoint_config, Some(server), socket, runtime()?)
            .map_err(|source| TransportError::Bind { addr, source })?;
        Ok(Endpoint {
            inner,
            shared: Arc::new(Shared {
                provider,
                roots: Some(loaded.roots),
                client_auth: Some(ClientAuth {
                    chain: loaded.chain,
                    key: loaded.key,
                }),
                transport,
            }),
        })
    }

    /// Client-only endpoint bound to `bind` (use 0.0.0.0:0 or [::]:0 matching
    /// the target's family). `creds` None makes an anonymous joiner.
    pub fn client(
        bind: SocketAddr,
        creds: Option<&Credentials>,
    ) -> Result<Endpoint, TransportError> {
        let (roots, client_auth) = match creds {
            Some(creds) => {
                let loaded = load(creds)?;
                (
                    Some(loaded.roots),
                    Some(ClientAuth {
                        chain: loaded.chain,
                        key: loaded.key,
                    }),
                )
            }
            None => (None, None),
        };
        // Validates that a runtime exists before quinn would report it vaguely.
        runtime()?;
        let inner = quinn::Endpoint::client(bind)
            .map_err(|source| TransportError::Bind { addr: bind, source })?;
        Ok(Endpoint {
            inner,
            shared: Arc::new(Shared {
                provider: provider(),
                roots,
                client_auth,
                transport: transport_config(),
            }),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.inner.local_addr().map_err(TransportError::LocalAddr)
    }

    /// Connect and complete the handshake. Note that with TLS 1.3 the server
    /// checks our certificate after we consider the handshake done, so its
    /// refusal shows up on the first stream (see `RpcError::Rejected`).
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expect: &Expect,
    ) -> Result<quinn::Connection, TransportError> {
        let config = self.client_config(addr, expect)?;
        let sni = match expect {
            Expect::Node(name) | Expect::Member { name, .. } => {
                Identity::Node(name.clone()).dns_name()?
            }
            Expect::AnyNode | Expect::CaFingerprint(_) => ANY_NODE_SNI.to_string(),
        };
        let connecting = self
            .inner
            .connect_with(config, addr, &sni)
            .map_err(|source| TransportError::Connect { addr, source })?;
        connecting.await.map_err(
            |source| match TlsRejection::from_connection_error(&source) {
                Some(rejection) => TransportError::Rejected { addr, rejection },
                None => TransportError::Handshake { addr, source },
            },
        )
    }

    fn client_config(
        &self,
        addr: SocketAddr,
        expect: &Expect,
    ) -> Result<quinn::ClientConfig, TransportError> {
        let shared = &self.shared;
        let webpki = || -> Result<Arc<WebPkiServerVerifier>, TransportError> {
            let roots = shared.roots.clone().ok_or(TransportError::NoCa { addr })?;
            WebPkiServerVerifier::builder_with_provider(roots, shared.provider.clone())
                .build()
                .map_err(TransportError::Verifier)
        };
        let mode = match expect {
            Expect::Node(name) => {
                validate_node_name(name)?;
                Mode::Name(webpki()?, Identity::Node(name.clone()).dns_name()?, None)
            }
            Expect::Member { name, serial } => {
                validate_node_name(name)?;
                let dns = Identity::Node(name.clone()).dns_name()?;
                Mode::Name(webpki()?, dns, Some(serial.clone()))
            }
            Expect::AnyNode => Mode::AnyNode(webpki()?),
            Expect::CaFingerprint(fingerprint) => {
                let fingerprint = fingerprint.to_ascii_lowercase();
                if fingerprint.len() != 64 || hex::decode(&fingerprint).is_err() {
                    return Err(TransportError::BadFingerprint(fingerprint));
                }
                Mode::CaFingerprint(fingerprint)
            }
        };
        let verifier = Arc::new(FerryServerVerifier::new(mode, shared.provider.clone()));
        let builder = rustls::ClientConfig::builder_with_provider(shared.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut tls = match &shared.client_auth {
            Some(auth) => {
                builder.with_client_auth_cert(auth.chain.clone(), auth.key.clone_key())?
            }
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![ALPN.to_vec()];
        // A resumed session skips certificate verification; each config is
        // built for one Expect, but resumption is off anyway for clarity.
        tls.resumption = rustls::client::Resumption::disabled();
        tls.enable_early_data = false;
        let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
        config.transport_config(shared.transport.clone());
        Ok(config)
    }

    /// The quinn endpoint, for accept loops.
    pub fn inner(&self) -> &quinn::Endpoint {
        &self.inner
    }

    /// Close every connection at once; `serve` returns afterwards.
    pub fn close(&self) {
        self.inner
            .close(VarInt::from_u32(CLOSE_CODE), b"endpoint closed");
    }

    /// Wait until peers were told about closed connections (after `close`),
    /// so a restart on the same port is not confused with the old one.
    pub async fn wait_idle(&self) {
        self.inner.wait_idle().await;
    }
}

/// The verified certificate of the peer; `None` when it sent none
/// (an anonymous joiner).
pub fn peer_cert(conn: &quinn::Connection) -> Option<PeerCert> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    PeerCert::from_der(chain.first()?)
}
