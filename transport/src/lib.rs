//! QUIC transport for ferry: the cluster CA and certificates, mutually
//! authenticated endpoints, size-capped framing and request/response RPC.

pub mod codec;
pub mod endpoint;
pub mod frame;
pub mod pki;
pub mod rpc;
mod verify;

pub use codec::CodecError;
pub use endpoint::{peer_cert, Endpoint, Expect, TlsRejection, TransportError};
pub use frame::{FrameError, StreamError, MAX_FRAME};
pub use pki::{ClusterCa, Credentials, Identity, PeerCert, PkiError};
pub use rpc::{call, serve, Peer, Pool, RpcError, Service};
