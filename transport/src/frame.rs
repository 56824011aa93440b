use quinn::{ConnectionError, RecvStream, SendStream};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{self, CodecError};

/// Largest frame payload anyone accepts; bounds memory per stream.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
const HEADER: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {cap}-byte limit")]
    TooLarge { len: usize, cap: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[source] CodecError),
    #[error("could not encode frame: {0}")]
    Encode(#[source] CodecError),
    #[error("stream failed: {0}")]
    Io(#[source] StreamError),
}

/// The QUIC stream operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("reading: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("writing: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("finishing: {0}")]
    Finish(#[from] quinn::ClosedStream),
}

impl FrameError {
    /// The connection-level cause, when the whole connection (not just this
    /// stream) failed.
    pub fn connection_error(&self) -> Option<&ConnectionError> {
        match self {
            FrameError::Io(StreamError::Read(quinn::ReadExactError::ReadError(
                quinn::ReadError::ConnectionLost(e),
            )))
            | FrameError::Io(StreamError::Write(quinn::WriteError::ConnectionLost(e))) => Some(e),
            _ => None,
        }
    }
}

/// Write one frame: u32 big-endian payload length, then the codec payload.
pub async fn write_frame<T: Serialize>(send: &mut SendStream, value: &T) -> Result<(), FrameError> {
    let buf = encode_frame(value)?;
    write_encoded(send, &buf).await
}

/// Header and payload in one buffer, so holding it across an await does not
/// require the value itself to be `Sync`.
pub(crate) fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let payload = codec::encode(value).map_err(FrameError::Encode)?;
    // Refuse locally what every receiver would refuse anyway.
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            cap: MAX_FRAME,
        });
    }
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: payload.len(),
        cap: MAX_FRAME,
    })?;
    let mut buf = Vec::with_capacity(HEADER + payload.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&payload);
    Ok(buf)
}

pub(crate) async fn write_encoded(send: &mut SendStream, buf: &[u8]) -> Result<(), FrameError> {
    send.write_all(buf)
        .await
        .map_err(|e| FrameError::Io(StreamError::Write(e)))
}

/// Read one frame of at most `cap` payload bytes. The length is checked
/// from the header alone, before anything is allocated or read.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut RecvStream,
    cap: usize,
) -> Result<T, FrameError> {
    let mut header = [0u8; HEADER];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| FrameError::Io(StreamError::Read(e)))?;
    let len = u32::from_be_bytes(header) as usize;
    if len > cap {
        return Err(FrameError::TooLarge { len, cap });
    }
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload)
        .await
        .map_err(|e| FrameError::Io(StreamError::Read(e)))?;
    codec::decode(&payload).map_err(FrameError::Malformed)
}

// A whole frame always decodes within the codec's limit.
const _: () = assert!(MAX_FRAME * 2 <= codec::DECODE_LIMIT);
